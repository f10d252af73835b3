//! The gateway's own pages under the portal prefix, served on every host.

pub mod account;
pub mod form;
pub mod invite;
pub mod login;
pub mod recover;
pub mod redirect;
pub mod two_factor;
pub mod verify;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, header};

use crate::Body;
use crate::accounts::source::{Asked, PasswordStep};
use crate::client::Client;
use crate::gateway::Gateway;
use crate::pages::{self, redirect};
use crate::respond::Reject;
use crate::session::{Authenticated, SessionId};
use crate::signin;
use crate::store::{LastLogin, Level, SecondFactor, User};
use account::Sensitive;

/// Routes a portal request. Paths match exactly, so no rule or header can reach a page by accident.
pub async fn handle(
    gw: &std::sync::Arc<Gateway>,
    client: &Client,
    req: Request<Body>,
) -> Result<Response<Body>, Reject> {
    let sub = req.uri().path()[gw.prefix().len()..].to_string();
    let get = matches!(*req.method(), Method::GET | Method::HEAD);
    let post = req.method() == Method::POST;
    match sub.as_str() {
        "/health" if get => Ok(plain(StatusCode::OK, "text/plain; charset=utf-8", "ok")),
        "/static/portcullis.css" if get => Ok(asset("text/css; charset=utf-8", pages::STYLESHEET)),
        "/static/portcullis.js" if get => Ok(asset("text/javascript; charset=utf-8", pages::SCRIPT)),
        "/login" if get => login::show(gw, client, &req).await,
        "/login" if post => login::submit(gw, client, req).await,
        "/logout" if get => login::show_logout(gw, &req).await,
        "/logout" if post => login::logout(gw, client, req).await,
        "/challenge" if get => two_factor::show(gw, &req).await,
        "/challenge" if post => two_factor::submit(gw, client, req).await,
        "/settings" if get => account::settings(gw, &req).await,
        "/verify" => verify::verify(gw, client, &req).await,
        "/forgot" if get => recover::show_forgot(gw, client, &req).await,
        "/forgot" if post => recover::submit_forgot(gw, client, req).await,
        "/reset" if get => recover::show_reset(gw, client, &req).await,
        "/reset" if post => recover::submit_reset(gw, client, req).await,
        "/invite" if get => invite::show(gw, client, &req).await,
        "/invite" if post => invite::accept(gw, client, req).await,
        "/settings/password" if get => account::show_password(gw, &req).await,
        "/settings/password" if post => account::change_password(gw, client, req).await,
        "/enroll/confirm" if post => account::confirm_enrolment(gw, client, req).await,
        "/enroll/cancel" if post => account::cancel_enrolment(gw, client, req).await,
        "/recovery/download" if post => account::download(gw, req).await,
        _ => match sensitive(&sub) {
            Some(what) if get => account::ask_password(gw, client, &req, what).await,
            Some(what) if post => account::confirm(gw, client, req, what).await,
            Some(_) => Err(Reject::MethodNotAllowed),
            None if is_page(&sub) => Err(Reject::MethodNotAllowed),
            None => Err(Reject::NotFound),
        },
    }
}

fn sensitive(sub: &str) -> Option<Sensitive> {
    match sub {
        "/enroll" => Some(Sensitive::Enable),
        "/settings/disable" => Some(Sensitive::Disable),
        "/settings/recovery" => Some(Sensitive::ShowCodes),
        "/settings/recovery/regenerate" => Some(Sensitive::Regenerate),
        _ => None,
    }
}

fn is_page(sub: &str) -> bool {
    matches!(
        sub,
        "/health"
            | "/login"
            | "/logout"
            | "/challenge"
            | "/settings"
            | "/enroll/confirm"
            | "/enroll/cancel"
            | "/recovery/download"
            | "/forgot"
            | "/reset"
            | "/invite"
            | "/settings/password"
    )
}

fn plain(status: StatusCode, content_type: &'static str, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(pages::full(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut().insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    resp
}

fn asset(content_type: &'static str, body: &'static str) -> Response<Body> {
    let mut r = plain(StatusCode::OK, content_type, body);
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=3600"));
    r
}

/// Percent-encodes a value for a query string.
pub fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// A query parameter's decoded value, or "".
pub fn query_param(uri: &Uri, name: &str) -> String {
    uri.query()
        .and_then(|q| serde_urlencoded::from_str::<Vec<(String, String)>>(q).ok())
        .and_then(|pairs| pairs.into_iter().find(|(k, _)| k == name).map(|(_, v)| v))
        .unwrap_or_default()
}

/// The login page, returning to `rd`.
pub fn login_url(gw: &Gateway, rd: &str) -> String {
    format!("{}/login?rd={}", gw.prefix(), encode(rd))
}

/// The enrolment page, returning to `rd`.
pub fn enroll_url(gw: &Gateway, rd: &str) -> String {
    format!("{}/enroll?rd={}", gw.prefix(), encode(rd))
}

/// The sign-in rules of the configuration in force ([`crate::signin`]).
pub fn signin_rules(gw: &Gateway) -> signin::Rules {
    signin::Rules { required: gw.config.two_factor.required, pending_lifetime: crate::session::PENDING_LIFETIME }
}

/// The level `auth`'s sign-in reaches after `event`, as the sign-in machine says; `None` when it is not done (a
/// lapsed pending step starts again at the login page).
pub fn advance(gw: &Gateway, auth: &Authenticated, event: signin::Event) -> Option<Level> {
    let enrolled = signin::Enrolled::of(&auth.user);
    let state = signin::State::of_session(auth.record.level, enrolled, auth.record.created).after(
        event,
        enrolled,
        signin_rules(gw),
        gw.clock.now(),
    );
    (state.step() == signin::Step::Done).then(|| state.level()).flatten()
}

/// Where a sign-in in `state` goes next: its page, or `rd` once it is done.
pub fn step_url(gw: &Gateway, state: &signin::State, rd: &str) -> String {
    match state.step() {
        signin::Step::Login => login_url(gw, rd),
        signin::Step::Challenge => format!("{}/challenge?rd={}", gw.prefix(), encode(rd)),
        signin::Step::Enrol => enroll_url(gw, rd),
        signin::Step::Done => rd.to_string(),
    }
}

/// What a pending session of `user` must do next, as the sign-in machine says: the challenge when a factor is
/// enrolled, enrolment when not.
pub fn next_step_url(gw: &Gateway, user: &User, rd: &str) -> String {
    step_url(gw, &signin::State::of_session(Level::Pending, signin::Enrolled::of(user), 0), rd)
}

/// The password step as every portal page takes it ([`crate::accounts::Accounts::password_step`]: lockout,
/// audit and notices, written once) against the local accounts, with its metrics.
pub async fn password_step(
    gw: &Gateway,
    client: &Client,
    login: &str,
    password: String,
    asked: Asked,
) -> Result<PasswordStep, Reject> {
    let step = gw.accounts.password_step(&gw.accounts.local_users(), client.addr, login, password, asked).await?;
    if asked == Asked::SignIn {
        match &step {
            PasswordStep::Locked { now: false, .. } => gw.metrics.login("locked"),
            PasswordStep::Refused | PasswordStep::Locked { now: true, .. } => gw.metrics.login("failure"),
            PasswordStep::AccountLocked => gw.metrics.login("account_locked"),
            PasswordStep::Accepted(_) => {}
        }
    }
    if let PasswordStep::Locked { now: true, .. } = step {
        gw.metrics.lockout("password");
    }
    Ok(step)
}

/// Which sessions a page accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Any session, including one still owing its second factor.
    Pending,
    /// A completed sign-in.
    SignedIn,
}

/// The page's session, or the response that sends the browser where it must go first.
pub async fn require_session(
    gw: &Gateway,
    headers: &HeaderMap,
    rd: &str,
    gate: Gate,
) -> Result<Result<Authenticated, Response<Body>>, Reject> {
    let Some(auth) = gw.sessions.authenticate(headers).await? else {
        return Ok(Err(redirect(StatusCode::SEE_OTHER, &login_url(gw, rd))));
    };
    if gate == Gate::SignedIn && auth.record.level == Level::Pending {
        return Ok(Err(redirect(StatusCode::SEE_OTHER, &next_step_url(gw, &auth.user, rd))));
    }
    Ok(Ok(auth))
}

/// Adds a Set-Cookie header.
pub fn with_cookie(mut resp: Response<Body>, cookie: Option<String>) -> Response<Body> {
    if let Some(v) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

/// Replaces a session with a new id at a new level (fixation defence); returns the id and its Set-Cookie.
pub async fn rotate(
    gw: &Gateway,
    client: &Client,
    auth: &Authenticated,
    level: Level,
) -> Result<(SessionId, String), Reject> {
    Ok(gw.sessions.rotate(auth, level, client.addr, client.https).await?)
}

/// Completes a sign-in: rotate to `level`, record the login, go to `rd`.
pub async fn elevate(
    gw: &Gateway,
    client: &Client,
    auth: &Authenticated,
    level: Level,
    factor: Option<SecondFactor>,
    rd: &str,
) -> Result<Response<Body>, Reject> {
    let (_, cookie) = rotate(gw, client, auth, level).await?;
    signed_in(gw, client, &auth.user.username, factor).await?;
    Ok(with_cookie(redirect(StatusCode::SEE_OTHER, rd), Some(cookie)))
}

/// A sign-in completed (password alone where that is enough, a second factor, or an enrolment that proved one):
/// the one place the last login is recorded.
pub async fn signed_in(
    gw: &Gateway,
    client: &Client,
    username: &str,
    factor: Option<SecondFactor>,
) -> Result<(), Reject> {
    let login = LastLogin { at: gw.clock.now(), address: client.addr.to_string(), second_factor: factor };
    Ok(gw.store.record_login(username, login).await?)
}
