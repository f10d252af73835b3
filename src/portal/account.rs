//! The account page and its two-factor actions: enable (setup with QR code and confirmation), recovery codes
//! (show, regenerate, download), disable. Each sensitive action asks for the password again.

use http::{HeaderValue, Request, Response, StatusCode, header};
use minijinja::{Value, context};

use crate::Body;
use crate::accounts::factors::Enrolment;
use crate::accounts::source::{Asked, PasswordStep};
use crate::accounts::{Actor, Keep};
use crate::client::Client;
use crate::clock::rfc3339;
use crate::credentials::{recovery, totp};
use crate::gateway::Gateway;
use crate::pages::{full, redirect, secure_headers};
use crate::portal::form::{self, Form, check_csrf};
use crate::portal::redirect::target_or_root;
use crate::portal::{Gate, query_param, require_session, rotate, with_cookie};
use crate::respond::Reject;
use crate::session::Authenticated;
use crate::store::{ENROLMENT_TTL, Level, SecondFactor};

/// Purpose of the grant that lets a recovery codes page offer its download.
const DOWNLOAD_GRANT: &str = "recovery-download";
/// How long that grant lasts.
const GRANT_TTL: u64 = 600;

/// The actions that need the password again, and how their confirmation page reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sensitive {
    /// Start enrolment.
    Enable,
    /// Turn two-factor off.
    Disable,
    /// View the remaining recovery codes.
    ShowCodes,
    /// Replace the recovery codes.
    Regenerate,
}

impl Sensitive {
    fn path(self) -> &'static str {
        match self {
            Sensitive::Enable => "/enroll",
            Sensitive::Disable => "/settings/disable",
            Sensitive::ShowCodes => "/settings/recovery",
            Sensitive::Regenerate => "/settings/recovery/regenerate",
        }
    }

    fn texts(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Sensitive::Enable => (
                "Enable two-factor authentication",
                "Enter your password to start setting up an authenticator app.",
                "Continue",
            ),
            Sensitive::Disable => (
                "Disable two-factor authentication",
                "Enter your password to turn two-factor authentication off. Your other sessions will be signed out.",
                "Disable",
            ),
            Sensitive::ShowCodes => {
                ("Show recovery codes", "Enter your password to see your remaining recovery codes.", "Show codes")
            }
            Sensitive::Regenerate => (
                "Regenerate recovery codes",
                "Enter your password to make a new set of recovery codes. Every old code stops working at once.",
                "Regenerate",
            ),
        }
    }

    /// Whether the action needs two-factor to be on (or off, for Enable).
    fn needs_two_factor(self) -> bool {
        self != Sensitive::Enable
    }
}

fn confirm_page(
    gw: &Gateway,
    status: StatusCode,
    auth: &Authenticated,
    what: Sensitive,
    rd: &str,
    error: Option<&str>,
) -> Response<Body> {
    let (heading, explain, button) = what.texts();
    let ctx = context! {
        heading, explain, button, rd, error,
        action => format!("{}{}", gw.prefix(), what.path()),
        csrf => gw.keys.csrf_token(&auth.id.0),
        username => &auth.user.username,
    };
    gw.pages.page("confirm_password.html", status, ctx)
}

fn settings_redirect(gw: &Gateway) -> Response<Body> {
    redirect(StatusCode::SEE_OTHER, &format!("{}/settings", gw.prefix()))
}

/// GET settings.
pub async fn settings(gw: &Gateway, req: &Request<Body>) -> Result<Response<Body>, Reject> {
    let here = format!("{}/settings", gw.prefix());
    let auth = match require_session(gw, req.headers(), &here, Gate::SignedIn).await? {
        Ok(a) => a,
        Err(resp) => return Ok(resp),
    };
    let message = match query_param(req.uri(), "done").as_str() {
        "disabled" => Some("Two-factor authentication is off."),
        _ => None,
    };
    Ok(settings_page(gw, &auth, message))
}

fn settings_page(gw: &Gateway, auth: &Authenticated, message: Option<&str>) -> Response<Body> {
    let tf = &auth.user.factors;
    let ctx = context! {
        csrf => gw.keys.csrf_token(&auth.id.0),
        username => &auth.user.username,
        email => &auth.user.email,
        enabled => tf.on(),
        enabled_at => tf.enabled_at().map(rfc3339),
        codes_left => tf.recovery.len(),
        required => gw.config.two_factor.required,
        message,
    };
    gw.pages.page("settings.html", StatusCode::OK, ctx)
}

/// GET of a sensitive action: the password confirmation page (or, for a just-signed-in pending session, the
/// setup page straight away: the password was entered a moment ago).
pub async fn ask_password(
    gw: &Gateway,
    client: &Client,
    req: &Request<Body>,
    what: Sensitive,
) -> Result<Response<Body>, Reject> {
    let rd = target_or_root(&query_param(req.uri(), "rd"));
    let gate = if what == Sensitive::Enable { Gate::Pending } else { Gate::SignedIn };
    let auth = match require_session(gw, req.headers(), &rd, gate).await? {
        Ok(a) => a,
        Err(resp) => return Ok(resp),
    };
    if let Some(resp) = wrong_state(gw, &auth, what, &rd) {
        return Ok(resp);
    }
    if what == Sensitive::Enable && auth.record.level == Level::Pending {
        return setup_page(gw, client, &auth, &rd, None).await;
    }
    Ok(confirm_page(gw, StatusCode::OK, &auth, what, &rd, None))
}

/// Redirects when the action doesn't fit the account's state (enable when on, the rest when off).
fn wrong_state(gw: &Gateway, auth: &Authenticated, what: Sensitive, rd: &str) -> Option<Response<Body>> {
    let on = auth.user.factors.on();
    if what.needs_two_factor() == on {
        return None;
    }
    if auth.record.level == Level::Pending {
        return Some(redirect(StatusCode::SEE_OTHER, &crate::portal::next_step_url(gw, &auth.user, rd)));
    }
    Some(settings_redirect(gw))
}

/// POST of a sensitive action: check the password (counted like login failures), then do it.
pub async fn confirm(
    gw: &Gateway,
    client: &Client,
    req: Request<Body>,
    what: Sensitive,
) -> Result<Response<Body>, Reject> {
    let (parts, form) = form::read(req).await?;
    let rd = target_or_root(form.get("rd"));
    let auth = match require_session(gw, &parts.headers, &rd, Gate::SignedIn).await? {
        Ok(a) => a,
        Err(resp) => return Ok(resp),
    };
    check_csrf(gw, &parts, &form, Some(&auth.id.0))?;
    if let Some(resp) = wrong_state(gw, &auth, what, &rd) {
        return Ok(resp);
    }
    if !password_ok(gw, client, &auth, &form).await? {
        return Ok(confirm_page(gw, StatusCode::UNAUTHORIZED, &auth, what, &rd, Some("That password is not right.")));
    }
    let name = &auth.user.username;
    match what {
        Sensitive::Enable => setup_page(gw, client, &auth, &rd, None).await,
        Sensitive::Disable => {
            let actor = Actor::User { address: client.addr };
            gw.accounts.reset_two_factor(&actor, name, Keep::Session(auth.id.0)).await?;
            Ok(redirect(StatusCode::SEE_OTHER, &format!("{}/settings?done=disabled", gw.prefix())))
        }
        Sensitive::ShowCodes => {
            let codes = auth.user.factors.recovery.clone();
            let shown = recovery::reveal(&gw.keys, name, &codes)?;
            Ok(codes_page(gw, &auth.id.0, &shown, &rd, false, None, None))
        }
        Sensitive::Regenerate => {
            let actor = Actor::User { address: client.addr };
            let shown = gw.accounts.regenerate_recovery_codes(&actor, &auth.user).await?;
            let msg = "New recovery codes are ready. Your old codes no longer work.";
            Ok(codes_page(gw, &auth.id.0, &shown, &rd, false, Some(msg), None))
        }
    }
}

/// Verifies the re-entered password: the same password step as the sign-in's.
async fn password_ok(gw: &Gateway, client: &Client, auth: &Authenticated, form: &Form) -> Result<bool, Reject> {
    let typed = form.get("password").to_string();
    match crate::portal::password_step(gw, client, &auth.user.username, typed, Asked::Reauthentication).await? {
        PasswordStep::Accepted(_) => Ok(true),
        PasswordStep::Refused => Ok(false),
        PasswordStep::Locked { retry_after, .. } => Err(Reject::TooManyAttempts(retry_after)),
        PasswordStep::AccountLocked => Err(Reject::AccountLocked),
    }
}

fn codes_page(
    gw: &Gateway,
    session: &[u8; 32],
    codes: &[String],
    rd: &str,
    finish: bool,
    message: Option<&str>,
    cookie: Option<String>,
) -> Response<Body> {
    let now = gw.clock.now();
    let ctx = context! {
        codes => codes.to_vec(), rd, finish, message,
        csrf => gw.keys.csrf_token(session),
        grant => gw.keys.grant(DOWNLOAD_GRANT, session, now + GRANT_TTL),
    };
    with_cookie(gw.pages.page("recovery_codes.html", StatusCode::OK, ctx), cookie)
}

/// A setup page with a fresh secret (each visit starts again), remembered for this session only.
async fn setup_page(
    gw: &Gateway,
    client: &Client,
    auth: &Authenticated,
    rd: &str,
    error: Option<&str>,
) -> Result<Response<Body>, Reject> {
    let secret = gw.accounts.start_enrolment(&auth.user, auth.id.0).await?;
    tracing::info!(user = %auth.user.username, addr = %client.addr, "two-factor setup started");
    render_setup(gw, auth, &secret, rd, error, StatusCode::OK)
}

fn render_setup(
    gw: &Gateway,
    auth: &Authenticated,
    secret: &[u8],
    rd: &str,
    error: Option<&str>,
    status: StatusCode,
) -> Result<Response<Body>, Reject> {
    let issuer = &gw.config.two_factor.issuer;
    let uri = totp::otpauth_uri(secret, issuer, &auth.user.username).map_err(|e| {
        tracing::error!(error = %e, "cannot build otpauth URI");
        Reject::Unavailable
    })?;
    let qr = qrcode::QrCode::new(uri.as_bytes())
        .map_err(|_| Reject::Unavailable)?
        .render::<qrcode::render::svg::Color>()
        .min_dimensions(200, 200)
        .quiet_zone(true)
        .build();
    let ctx = context! {
        rd, error,
        qr => Value::from_safe_string(qr),
        secret => totp::grouped_base32(secret),
        otpauth => uri,
        csrf => gw.keys.csrf_token(&auth.id.0),
        minutes => ENROLMENT_TTL / 60,
    };
    Ok(gw.pages.page("enroll.html", status, ctx))
}

/// POST enroll/confirm: a valid code activates two-factor (its step counts as used), then the recovery codes.
pub async fn confirm_enrolment(gw: &Gateway, client: &Client, req: Request<Body>) -> Result<Response<Body>, Reject> {
    let (parts, form) = form::read(req).await?;
    let rd = target_or_root(form.get("rd"));
    let auth = match require_session(gw, &parts.headers, &rd, Gate::Pending).await? {
        Ok(a) => a,
        Err(resp) => return Ok(resp),
    };
    check_csrf(gw, &parts, &form, Some(&auth.id.0))?;
    if let Some(resp) = wrong_state(gw, &auth, Sensitive::Enable, &rd) {
        return Ok(resp);
    }
    let now = gw.clock.now();
    let name = auth.user.username.clone();
    let pending = gw.store.pending_enrolment(auth.id.0).await?;
    let Some(pending) = pending.filter(|p| p.username == name && now < p.created + ENROLMENT_TTL) else {
        let restart = format!("{}/enroll?rd={}", gw.prefix(), crate::portal::encode(&rd));
        let ctx = context! {
            heading => "Setup expired",
            detail => "The setup key expired or was replaced. Start again: you will get a new QR code.",
            action_href => restart,
            action_label => "Start again",
        };
        return Ok(gw.pages.page("error.html", StatusCode::GONE, ctx));
    };
    // Where the enrolment leads, asked before it is made: a lapsed sign-in starts again with nothing enrolled.
    let Some(level) = crate::portal::advance(gw, &auth, crate::signin::Event::Enrolled) else {
        return Ok(redirect(StatusCode::SEE_OTHER, &crate::portal::login_url(gw, &rd)));
    };
    let actor = Actor::User { address: client.addr };
    let shown = match gw.accounts.confirm_enrolment(&actor, &auth.user, auth.id.0, pending, form.get("code")).await? {
        Enrolment::Enabled(shown) => shown,
        Enrolment::Stale => return Ok(settings_redirect(gw)),
        Enrolment::WrongCode(secret) => {
            tracing::info!(user = %name, addr = %client.addr, "two-factor setup: wrong code");
            let msg = Some("That code is not valid. Check the app shows a code for this account and try again.");
            return render_setup(gw, &auth, &secret, &rd, msg, StatusCode::UNPROCESSABLE_ENTITY);
        }
    };
    // Enrolment proved the factor: the session rises (to the full level, the machine says), under a new id.
    let (id, cookie) = rotate(gw, client, &auth, level).await?;
    crate::portal::signed_in(gw, client, &name, Some(SecondFactor::Totp)).await?;
    let msg = Some("Two-factor authentication is on. Save these recovery codes now.");
    Ok(codes_page(gw, &id.0, &shown, &rd, true, msg, Some(cookie)))
}

/// POST enroll/cancel: forget the setup secret. A forced enrolment can't be skipped, so it signs out.
pub async fn cancel_enrolment(gw: &Gateway, client: &Client, req: Request<Body>) -> Result<Response<Body>, Reject> {
    let (parts, form) = form::read(req).await?;
    let auth = match require_session(gw, &parts.headers, "/", Gate::Pending).await? {
        Ok(a) => a,
        Err(resp) => return Ok(resp),
    };
    check_csrf(gw, &parts, &form, Some(&auth.id.0))?;
    gw.store.delete_pending_enrolment(auth.id.0).await?;
    if auth.record.level == Level::Pending {
        gw.sessions.end(auth.id).await?;
        let clear = gw.sessions.clear_cookie(client.https);
        let login = format!("{}/login", gw.prefix());
        return Ok(with_cookie(redirect(StatusCode::SEE_OTHER, &login), Some(clear)));
    }
    Ok(settings_redirect(gw))
}

/// POST recovery/download: the codes as a text file, for a page that was just shown them.
pub async fn download(gw: &Gateway, req: Request<Body>) -> Result<Response<Body>, Reject> {
    let (parts, form) = form::read(req).await?;
    let auth = match require_session(gw, &parts.headers, "/", Gate::SignedIn).await? {
        Ok(a) => a,
        Err(resp) => return Ok(resp),
    };
    check_csrf(gw, &parts, &form, Some(&auth.id.0))?;
    if !gw.keys.check_grant(form.get("grant"), DOWNLOAD_GRANT, &auth.id.0, gw.clock.now()) {
        return Err(Reject::Csrf);
    }
    let codes = auth.user.factors.recovery.clone();
    let mut text = recovery::reveal(&gw.keys, &auth.user.username, &codes)?.join("\n");
    text.push('\n');
    let mut resp = Response::new(full(text));
    let h = resp.headers_mut();
    secure_headers(h);
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    h.insert(header::CONTENT_DISPOSITION, HeaderValue::from_static("attachment; filename=\"recovery-codes.txt\""));
    Ok(resp)
}

fn password_page(gw: &Gateway, status: StatusCode, auth: &Authenticated, error: Option<&str>) -> Response<Body> {
    let ctx = context! { csrf => gw.keys.csrf_token(&auth.id.0), username => &auth.user.username, error };
    gw.pages.page("password.html", status, ctx)
}

/// GET settings/password.
pub async fn show_password(gw: &Gateway, req: &Request<Body>) -> Result<Response<Body>, Reject> {
    let here = format!("{}/settings/password", gw.prefix());
    let auth = match require_session(gw, req.headers(), &here, Gate::SignedIn).await? {
        Ok(a) => a,
        Err(resp) => return Ok(resp),
    };
    Ok(password_page(gw, StatusCode::OK, &auth, None))
}

/// POST settings/password: current password (counted like login failures) and the new one twice; the user's
/// other sessions end.
pub async fn change_password(gw: &Gateway, client: &Client, req: Request<Body>) -> Result<Response<Body>, Reject> {
    let (parts, form) = form::read(req).await?;
    let here = format!("{}/settings/password", gw.prefix());
    let auth = match require_session(gw, &parts.headers, &here, Gate::SignedIn).await? {
        Ok(a) => a,
        Err(resp) => return Ok(resp),
    };
    check_csrf(gw, &parts, &form, Some(&auth.id.0))?;
    let new = form.get("password");
    if new != form.get("password2") {
        return Ok(password_page(gw, StatusCode::UNPROCESSABLE_ENTITY, &auth, Some("The two new passwords differ.")));
    }
    if crate::credentials::password::check_new(new).is_err() {
        let msg = Some("A password must be 8 to 1024 characters long.");
        return Ok(password_page(gw, StatusCode::UNPROCESSABLE_ENTITY, &auth, msg));
    }
    let mut current = Form::default();
    current.insert("password", form.get("current"));
    if !password_ok(gw, client, &auth, &current).await? {
        return Ok(password_page(gw, StatusCode::UNAUTHORIZED, &auth, Some("The current password is not right.")));
    }
    let actor = Actor::User { address: client.addr };
    gw.accounts.set_password(&actor, &auth.user.username, new, Keep::Session(auth.id.0)).await?;
    Ok(settings_page(gw, &auth, Some("Your password was changed. Your other sessions were signed out.")))
}
