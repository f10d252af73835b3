//! The second-factor challenge after the password: a TOTP code, or a recovery code, then a fully verified session.

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use minijinja::context;

use crate::Body;
use crate::audit::{AuditEvent, EventKind};
use crate::client::Client;
use crate::credentials::lockout::Step;
use crate::credentials::{recovery, totp};
use crate::gateway::Gateway;
use crate::notify::{Notice, notify};
use crate::portal::form::{self, check_csrf};
use crate::portal::pages::redirect;
use crate::portal::redirect::target_or_root;
use crate::portal::{Gate, elevate, query_param, require_session};
use crate::respond::Reject;
use crate::session::Authenticated;
use crate::store::{Consumed, Level, SecondFactor};

/// Purpose label the TOTP secret is sealed under.
pub const TOTP_PURPOSE: &str = "totp-secret";

fn page(
    gw: &Gateway,
    status: StatusCode,
    auth: &Authenticated,
    rd: &str,
    method: &str,
    error: Option<&str>,
) -> Response<Body> {
    let ctx = context! { csrf => gw.keys.csrf_token(&auth.id.0), rd, method, error };
    gw.pages.page(gw, "challenge.html", status, ctx)
}

/// Whom the challenge is for: a pending session whose user has two-factor on.
async fn pending_with_2fa(
    gw: &Gateway,
    headers: &http::HeaderMap,
    rd: &str,
) -> Result<Result<Authenticated, Response<Body>>, Reject> {
    let auth = match require_session(gw, headers, rd, Gate::Pending).await? {
        Ok(a) => a,
        Err(resp) => return Ok(Err(resp)),
    };
    if auth.record.level != Level::Pending {
        return Ok(Err(redirect(StatusCode::SEE_OTHER, rd)));
    }
    if auth.user.two_factor.is_none() {
        return Ok(Err(redirect(StatusCode::SEE_OTHER, &crate::portal::enroll_url(gw, rd))));
    }
    Ok(Ok(auth))
}

/// GET challenge.
pub async fn show(gw: &Gateway, req: &Request<Incoming>) -> Result<Response<Body>, Reject> {
    let rd = target_or_root(&query_param(req.uri(), "rd"));
    let auth = match pending_with_2fa(gw, req.headers(), &rd).await? {
        Ok(a) => a,
        Err(resp) => return Ok(resp),
    };
    let method = if query_param(req.uri(), "method") == "recovery" { "recovery" } else { "totp" };
    Ok(page(gw, StatusCode::OK, &auth, &rd, method, None))
}

/// POST challenge: check the lockout, then the code; success rotates the session to the full level.
pub async fn submit(gw: &Gateway, client: &Client, req: Request<Incoming>) -> Result<Response<Body>, Reject> {
    let (parts, form) = form::read(req).await?;
    let rd = target_or_root(form.get("rd"));
    let auth = match pending_with_2fa(gw, &parts.headers, &rd).await? {
        Ok(a) => a,
        Err(resp) => return Ok(resp),
    };
    check_csrf(gw, &parts, &form, Some(&auth.id.0))?;
    let now = gw.clock.now();
    let user = &auth.user;
    let recovery_path = form.get("method") == "recovery";
    let method = if recovery_path { "recovery_code" } else { "totp" };
    if let Some(secs) = gw.lockout.retry_after(&gw.store, Step::SecondFactor, &user.username, client.addr, now).await? {
        gw.metrics.factor(method, "locked");
        let event = AuditEvent::new(now, EventKind::LockedOut, &user.username).from_addr(client.addr);
        gw.audit(event.detail("second factor")).await;
        return Err(Reject::TooManyAttempts(secs));
    }
    let outcome = if recovery_path {
        check_recovery(gw, client, &auth, form.get("recovery_code")).await?
    } else {
        check_totp(gw, &auth, form.get("code"), now).await?
    };
    match outcome {
        Ok(factor) => {
            gw.lockout.succeed(&gw.store, Step::SecondFactor, &user.username).await?;
            gw.metrics.factor(method, "success");
            let event = AuditEvent::new(now, EventKind::SecondFactorSucceeded, &user.username).from_addr(client.addr);
            gw.audit(event.detail(method)).await;
            elevate(gw, client, &auth, Level::Full, Some(factor), &rd).await
        }
        Err(failure) => {
            let (kind, outcome) = match failure {
                Failure::Replayed => (EventKind::ReplayRejected, "replay"),
                Failure::Invalid(_) => (EventKind::SecondFactorFailed, "failure"),
            };
            gw.metrics.factor(method, outcome);
            gw.audit(AuditEvent::new(now, kind, &user.username).from_addr(client.addr).detail(method)).await;
            let browser =
                parts.headers.get(http::header::USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or("unknown");
            let notice = Notice::SecondFactorFailed {
                address: client.addr.to_string(),
                browser: browser.chars().take(200).collect(),
            };
            notify(gw, user, notice).await;
            if let Some(secs) = gw.lockout.fail(&gw.store, Step::SecondFactor, &user.username, client.addr, now).await?
            {
                gw.metrics.lockout("second_factor");
                let event = AuditEvent::new(now, EventKind::Lockout, &user.username).from_addr(client.addr);
                gw.audit(event.detail("second factor")).await;
                notify(gw, user, Notice::AccountLocked).await;
                return Err(Reject::TooManyAttempts(secs));
            }
            let shown = if recovery_path { "recovery" } else { "totp" };
            Ok(page(gw, StatusCode::UNAUTHORIZED, &auth, &rd, shown, Some(failure.message())))
        }
    }
}

/// Why a second factor failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// A TOTP code for a step already used.
    Replayed,
    /// Not a valid code; the message for the user.
    Invalid(&'static str),
}

impl Failure {
    fn message(self) -> &'static str {
        match self {
            Failure::Replayed => "That code was already used. Wait for the next code in your app.",
            Failure::Invalid(m) => m,
        }
    }
}

/// Checks a TOTP code and atomically records its step, so one code works once across all sessions.
async fn check_totp(
    gw: &Gateway,
    auth: &Authenticated,
    code: &str,
    now: u64,
) -> Result<Result<SecondFactor, Failure>, Reject> {
    let Some(tf) = &auth.user.two_factor else {
        return Ok(Err(Failure::Invalid("Two-factor authentication is not set up.")));
    };
    let secret = gw.keys.open(&auth.user.username, TOTP_PURPOSE, &tf.secret)?;
    match totp::check(&secret, code, now, gw.config.two_factor.skew, Some(tf.last_step)) {
        totp::Check::Accepted(step) => {
            // The snapshot may be stale: the store accepts the step only if it is still newer than the last.
            if gw.store.accept_totp_step(&auth.user.username, step).await? {
                Ok(Ok(SecondFactor::Totp))
            } else {
                Ok(Err(Failure::Replayed))
            }
        }
        totp::Check::Replayed => Ok(Err(Failure::Replayed)),
        totp::Check::Invalid => Ok(Err(Failure::Invalid("That code is not valid. Check your app and try again."))),
    }
}

/// Spends a recovery code atomically (replacing it when the set replenishes).
async fn check_recovery(
    gw: &Gateway,
    client: &Client,
    auth: &Authenticated,
    typed: &str,
) -> Result<Result<SecondFactor, Failure>, Reject> {
    const BAD: Failure = Failure::Invalid("That recovery code is not valid or was already used.");
    let Some(code) = recovery::normalize(typed) else {
        return Ok(Err(BAD));
    };
    let name = &auth.user.username;
    let replacement = if gw.config.two_factor.replenish_recovery_codes {
        Some(recovery::entry(&gw.keys, name, &recovery::generate()?)?)
    } else {
        None
    };
    match gw.store.consume_recovery_code(name, recovery::hash(&gw.keys, name, &code), replacement).await? {
        Consumed::Ok(left) => {
            let event = AuditEvent::new(gw.clock.now(), EventKind::RecoveryCodeUsed, name).from_addr(client.addr);
            gw.audit(event.detail(format!("{left} left"))).await;
            notify(gw, &auth.user, Notice::RecoveryCodeUsed(left)).await;
            Ok(Ok(SecondFactor::RecoveryCode))
        }
        Consumed::NoMatch => Ok(Err(BAD)),
    }
}
