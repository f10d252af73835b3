//! Sign-in and sign-out: show the form → check CSRF, lockout and password → new session → back to the app.

use http::{Request, Response, StatusCode};
use minijinja::context;

use crate::Body;
use crate::audit::{AuditEvent, EventKind};
use crate::client::Client;
use crate::credentials::lockout::Step;
use crate::gateway::Gateway;
use crate::keys::random_bytes;
use crate::pages::redirect;
use crate::portal::form::{self, check_csrf};
use crate::portal::redirect::target_or_root;
use crate::portal::{next_step_url, query_param, signin_rules, step_url, with_cookie};
use crate::respond::Reject;
use crate::session::{self};
use crate::signin;
use crate::store::{LastLogin, Level, User, normalize_login};

/// The `rd` query parameter, made safe.
fn rd_param(req: &Request<Body>) -> String {
    target_or_root(&query_param(req.uri(), "rd"))
}

/// The anonymous CSRF binding of this browser, and the Set-Cookie to send when it is new.
pub fn anonymous_binding(
    gw: &Gateway,
    client: &Client,
    headers: &http::HeaderMap,
) -> Result<([u8; 32], Option<String>), Reject> {
    let name = gw.config.csrf_cookie_name();
    if let Some(b) = session::csrf_binding(&gw.keys, headers, &name) {
        return Ok((b, None));
    }
    let fresh = random_bytes::<32>()?;
    let cookie = session::csrf_cookie(&gw.keys, &name, &fresh, gw.secure_cookies(client));
    Ok((fresh, Some(cookie)))
}

fn login_page(
    gw: &Gateway,
    status: StatusCode,
    binding: &[u8; 32],
    rd: &str,
    username: &str,
    error: Option<&str>,
) -> Response<Body> {
    let ctx = context! {
        csrf => gw.keys.csrf_token(binding), rd, username, error,
        reset_enabled => gw.config.password_reset_enabled(),
        invitations_enabled => gw.config.invitations_enabled(),
    };
    gw.pages.page("login.html", status, ctx)
}

/// GET login: already signed in → straight on; otherwise the form.
pub async fn show(gw: &Gateway, client: &Client, req: &Request<Body>) -> Result<Response<Body>, Reject> {
    let rd = rd_param(req);
    if let Some(auth) = gw.sessions.authenticate(req.headers()).await? {
        let next = match auth.record.level {
            Level::Pending => next_step_url(gw, &auth.user, &rd),
            _ => rd,
        };
        return Ok(redirect(StatusCode::SEE_OTHER, &next));
    }
    let (binding, cookie) = anonymous_binding(gw, client, req.headers())?;
    Ok(with_cookie(login_page(gw, StatusCode::OK, &binding, &rd, "", None), cookie))
}

/// POST login.
pub async fn submit(gw: &Gateway, client: &Client, req: Request<Body>) -> Result<Response<Body>, Reject> {
    let (parts, form) = form::read(req).await?;
    let csrf_name = gw.config.csrf_cookie_name();
    let binding = session::csrf_binding(&gw.keys, &parts.headers, &csrf_name);
    check_csrf(gw, &parts, &form, binding.as_ref().map(|b| b.as_slice()))?;
    let binding = binding.ok_or(Reject::Csrf)?;
    let rd = target_or_root(form.get("rd"));
    let typed = form.get("username");
    let password = form.get("password").to_string();
    let now = gw.clock.now();

    let login = normalize_login(typed);
    let user = if login.is_empty() { None } else { gw.store.find_login(&login).await? };
    // Unknown names are counted under what was typed, so they lock like real accounts.
    let account = user.as_ref().map_or(login.clone(), |u| u.username.clone());
    if let Some(secs) = gw.accounts.lockout().retry_after(&gw.store, Step::Password, &account, client.addr, now).await?
    {
        gw.metrics.login("locked");
        gw.audit(AuditEvent::new(now, EventKind::LockedOut, &account).from_addr(client.addr).detail("password")).await;
        return Err(Reject::TooManyAttempts(secs));
    }
    let ok = gw.hasher.verify(password, user.as_ref().map(|u| u.password_hash.clone())).await?;
    let user = match user {
        Some(u) if ok => u,
        known => return failed_login(gw, client, &account, known.as_ref(), now, &binding, &rd, typed).await,
    };
    if user.locked {
        gw.metrics.login("account_locked");
        let event = AuditEvent::new(now, EventKind::LoginFailed, &user.username).from_addr(client.addr);
        gw.audit(event.detail("account locked")).await;
        return Err(Reject::AccountLocked);
    }
    gw.accounts.lockout().succeed(&gw.store, Step::Password, &user.username).await?;

    // With two-factor on (or required), the password only opens the way to the challenge (or enrolment).
    let state = signin::State::Anonymous.after(
        signin::Event::PasswordAccepted,
        signin::Enrolled::of(&user),
        signin_rules(gw),
        now,
    );
    // After an accepted password there is always a level; Pending would reach nothing but the challenge.
    let level = state.level().unwrap_or(Level::Pending);
    let next = step_url(gw, &state, &rd);
    // A new id at every level change (session fixation); the old session goes in the same transaction.
    let old = gw.sessions.authenticate(&parts.headers).await?.map(|a| a.id);
    let (_, cookie) = gw.sessions.start(&user.username, level, client.addr, old, client.https).await?;
    if level == Level::Password {
        let login = LastLogin { at: now, address: client.addr.to_string(), second_factor: None };
        gw.store.record_login(&user.username, login).await?;
    }
    gw.metrics.login("success");
    let detail = if level == Level::Pending { "second factor due" } else { "password only" };
    gw.audit(AuditEvent::new(now, EventKind::LoginSucceeded, &user.username).from_addr(client.addr).detail(detail))
        .await;
    Ok(with_cookie(redirect(StatusCode::SEE_OTHER, &next), Some(cookie)))
}

/// A wrong password or unknown name: count it (both alike), maybe lock, and show the form again.
#[allow(clippy::too_many_arguments)]
async fn failed_login(
    gw: &Gateway,
    client: &Client,
    account: &str,
    known: Option<&User>,
    now: u64,
    binding: &[u8; 32],
    rd: &str,
    typed: &str,
) -> Result<Response<Body>, Reject> {
    gw.metrics.login("failure");
    if let Some(secs) = crate::portal::password_refused(gw, client, account, known, now, None).await? {
        return Err(Reject::TooManyAttempts(secs));
    }
    let page = login_page(gw, StatusCode::UNAUTHORIZED, binding, rd, typed, Some("Invalid username or password."));
    Ok(page)
}

/// GET logout: a confirmation form (logout is a POST, so a link or image can't sign anyone out).
pub async fn show_logout(gw: &Gateway, req: &Request<Body>) -> Result<Response<Body>, Reject> {
    let Some(auth) = gw.sessions.authenticate(req.headers()).await? else {
        return Ok(redirect(StatusCode::SEE_OTHER, &format!("{}/login", gw.prefix())));
    };
    let ctx = context! { csrf => gw.keys.csrf_token(&auth.id.0), username => &auth.user.username };
    Ok(gw.pages.page("logout.html", StatusCode::OK, ctx))
}

/// POST logout: deletes the session server-side, so a copied cookie dies too.
pub async fn logout(gw: &Gateway, client: &Client, req: Request<Body>) -> Result<Response<Body>, Reject> {
    let (parts, form) = form::read(req).await?;
    let login = format!("{}/login", gw.prefix());
    // The session the logout page was shown for: the first valid one, as everywhere (a stale cookie may come first).
    let Some(auth) = gw.sessions.authenticate(&parts.headers).await? else {
        return Ok(redirect(StatusCode::SEE_OTHER, &login));
    };
    check_csrf(gw, &parts, &form, Some(&auth.id.0))?;
    gw.sessions.end(auth.id).await?;
    gw.audit(AuditEvent::new(gw.clock.now(), EventKind::Logout, &auth.user.username).from_addr(client.addr)).await;
    Ok(with_cookie(redirect(StatusCode::SEE_OTHER, &login), Some(gw.sessions.clear_cookie(client.https))))
}
