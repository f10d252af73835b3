//! The second-factor challenge after the password: a TOTP code, or a recovery code, then a fully verified session.

use http::{Request, Response, StatusCode};
use minijinja::context;

use crate::Body;
use crate::accounts::Actor;
use crate::accounts::factors::{Factor, Failure, Outcome, Purpose};
use crate::client::Client;
use crate::gateway::Gateway;
use crate::pages::redirect;
use crate::portal::form::{self, check_csrf};
use crate::portal::redirect::target_or_root;
use crate::portal::{Gate, elevate, query_param, require_session};
use crate::respond::Reject;
use crate::session::Authenticated;
use crate::signin;
use crate::store::Level;

fn page(
    gw: &Gateway,
    status: StatusCode,
    auth: &Authenticated,
    rd: &str,
    method: &str,
    error: Option<&str>,
) -> Response<Body> {
    let ctx = context! { csrf => gw.keys.csrf_token(&auth.id.0), rd, method, error };
    gw.pages.page("challenge.html", status, ctx)
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
    if !auth.user.factors.on() {
        return Ok(Err(redirect(StatusCode::SEE_OTHER, &crate::portal::enroll_url(gw, rd))));
    }
    Ok(Ok(auth))
}

/// GET challenge.
pub async fn show(gw: &Gateway, req: &Request<Body>) -> Result<Response<Body>, Reject> {
    let rd = target_or_root(&query_param(req.uri(), "rd"));
    let auth = match pending_with_2fa(gw, req.headers(), &rd).await? {
        Ok(a) => a,
        Err(resp) => return Ok(resp),
    };
    let method = if query_param(req.uri(), "method") == "recovery" { "recovery" } else { "totp" };
    Ok(page(gw, StatusCode::OK, &auth, &rd, method, None))
}

/// POST challenge: the lockout, then the code; success rotates the session to the full level.
pub async fn submit(gw: &Gateway, client: &Client, req: Request<Body>) -> Result<Response<Body>, Reject> {
    let (parts, form) = form::read(req).await?;
    let rd = target_or_root(form.get("rd"));
    let auth = match pending_with_2fa(gw, &parts.headers, &rd).await? {
        Ok(a) => a,
        Err(resp) => return Ok(resp),
    };
    check_csrf(gw, &parts, &form, Some(&auth.id.0))?;
    let recovery_path = form.get("method") == "recovery";
    let factor =
        if recovery_path { Factor::RecoveryCode(form.get("recovery_code")) } else { Factor::Totp(form.get("code")) };
    let browser = parts.headers.get(http::header::USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or("unknown");
    // Where a right factor leads, asked before one is spent: a lapsed sign-in starts again with the code unused.
    let offered = if recovery_path { signin::Factor::RecoveryCode } else { signin::Factor::Totp };
    let Some(level) = crate::portal::advance(gw, &auth, signin::Event::FactorAccepted(offered)) else {
        return Ok(redirect(StatusCode::SEE_OTHER, &crate::portal::login_url(gw, &rd)));
    };
    let actor = Actor::User { address: client.addr };
    let method = factor.method();
    match gw.accounts.second_factor(&actor, &auth.user, factor, browser, Purpose::SignIn).await? {
        Outcome::Accepted(factor) => {
            gw.metrics.factor(method, "success");
            elevate(gw, client, &auth, level, Some(factor), &rd).await
        }
        Outcome::Locked { retry_after, now } => {
            if now {
                gw.metrics.lockout("second_factor");
            }
            gw.metrics.factor(method, if now { "failure" } else { "locked" });
            Err(Reject::TooManyAttempts(retry_after))
        }
        Outcome::Refused(failure) => {
            gw.metrics.factor(method, if failure == Failure::Replayed { "replay" } else { "failure" });
            let shown = if recovery_path { "recovery" } else { "totp" };
            Ok(page(gw, StatusCode::UNAUTHORIZED, &auth, &rd, shown, Some(failure.message())))
        }
    }
}
