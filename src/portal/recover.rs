//! Forgot password: ask → email a single-use link → (second factor, if enrolled) → new password.
//!
//! The answer to "send me a link" is the same whether or not the account exists. Opening the link never spends
//! it (mail scanners prefetch links); only the final POST does, in the same transaction that sets the password.
//! A reset never removes two-factor and never signs anyone in.

use http::{Request, Response, StatusCode};
use minijinja::context;

use crate::Body;
use crate::accounts::Actor;
use crate::accounts::factors::{Factor, Outcome, Purpose};
use crate::client::Client;
use crate::credentials::lockout::FailureRule;
use crate::credentials::{password, tokens};
use crate::gateway::Gateway;
use crate::portal::form::{self, check_csrf};
use crate::portal::login::anonymous_binding;
use crate::portal::{query_param, with_cookie};
use crate::respond::Reject;
use crate::session;
use crate::store::{TokenKind, TokenRecord, User, normalize_login};

/// Reset requests allowed per account, per recipient and per address in a window.
const PER_ACCOUNT: u32 = 3;
const PER_ADDRESS: u32 = 10;
const RATE_WINDOW: u64 = 900;

fn forgot_page(gw: &Gateway, csrf: String, sent: bool) -> Response<Body> {
    let ctx = context! {
        csrf, sent,
        enabled => gw.config.password_reset_enabled(),
        ttl_minutes => gw.config.accounts.reset_token_ttl.secs() / 60,
    };
    gw.pages.page("forgot.html", StatusCode::OK, ctx)
}

/// GET forgot.
pub async fn show_forgot(gw: &Gateway, client: &Client, req: &Request<Body>) -> Result<Response<Body>, Reject> {
    let (binding, cookie) = anonymous_binding(gw, client, req.headers())?;
    Ok(with_cookie(forgot_page(gw, gw.keys.csrf_token(&binding), false), cookie))
}

/// Whether a counter still allows an action (counts this attempt).
async fn allowed(gw: &Gateway, key: String, max: u32, now: u64) -> Result<bool, Reject> {
    let rule = FailureRule { max: max + 1, window: RATE_WINDOW, lockout: RATE_WINDOW };
    let f = rule.count(&gw.store, key, now).await?;
    Ok(f.count <= max && f.locked_until <= now)
}

/// POST forgot: always the same page; an email only for a real, unlimited account.
pub async fn submit_forgot(
    gw: &std::sync::Arc<Gateway>,
    client: &Client,
    req: Request<Body>,
) -> Result<Response<Body>, Reject> {
    let (parts, form) = form::read(req).await?;
    let binding = session::csrf_binding(&gw.keys, &parts.headers, &gw.config.csrf_cookie_name());
    check_csrf(gw, &parts, &form, binding.as_ref().map(|b| b.as_slice()))?;
    let csrf = binding.map(|b| gw.keys.csrf_token(&b)).unwrap_or_default();
    if !gw.config.password_reset_enabled() {
        return Ok(forgot_page(gw, csrf, false));
    }
    let now = gw.clock.now();
    if !allowed(gw, format!("reset:addr:{}", client.addr), PER_ADDRESS, now).await? {
        return Err(Reject::TooManyAttempts(RATE_WINDOW));
    }
    let login = normalize_login(form.get("username"));
    // The same work happens for unknown names (counter, lookup) before the answer; the extra work for a real
    // account (recipient counter, token, mail) happens after it, so the answer and its timing match.
    let account_ok = allowed(gw, format!("reset:acct:{login}"), PER_ACCOUNT, now).await?;
    let user = if login.is_empty() { None } else { gw.store.find_login(&login).await? };
    if let Some(user) = user.filter(|u| !u.locked && account_ok) {
        let gw = gw.clone();
        let client = client.clone();
        tokio::spawn(async move {
            let sent = async {
                if allowed(&gw, format!("reset:rcpt:{}", user.email), PER_ACCOUNT, now).await? {
                    gw.accounts.send_reset_link(&Actor::User { address: client.addr }, &user).await?;
                }
                Ok::<(), Reject>(())
            };
            if sent.await.is_err() {
                tracing::error!(user = %user.username, "password reset email could not be prepared");
            }
        });
    }
    Ok(forgot_page(gw, csrf, true))
}

/// A valid reset token's record and user, or None.
async fn valid_token(gw: &Gateway, token: &str) -> Result<Option<(TokenRecord, User)>, Reject> {
    let Some(rec) = gw.store.token(tokens::hash(&gw.keys, token)).await? else {
        return Ok(None);
    };
    let now = gw.clock.now();
    if !rec.usable(TokenKind::PasswordReset, now, None) {
        return Ok(None);
    }
    let user = gw.store.user(&rec.username).await?;
    Ok(user.filter(|u| rec.usable(TokenKind::PasswordReset, now, Some(u.stamp))).map(|u| (rec, u)))
}

fn invalid_link(gw: &Gateway) -> Response<Body> {
    let ctx = context! {
        heading => "Link not valid",
        detail => "This password reset link is not valid: it was already used, it expired, or the password or two-factor settings changed since it was sent. Ask for a new one.",
        action_href => format!("{}/forgot", gw.prefix()),
        action_label => "Ask for a new link",
    };
    gw.pages.page("error.html", StatusCode::GONE, ctx)
}

fn reset_page(
    gw: &Gateway,
    status: StatusCode,
    csrf: String,
    token: &str,
    user: &User,
    error: Option<&str>,
) -> Response<Body> {
    let ctx = context! {
        csrf, token, error, username => &user.username, two_factor => user.factors.on(),
    };
    gw.pages.page("reset.html", status, ctx)
}

/// GET reset?token=…: the form. Never spends the token.
pub async fn show_reset(gw: &Gateway, client: &Client, req: &Request<Body>) -> Result<Response<Body>, Reject> {
    let token = query_param(req.uri(), "token");
    let Some((_, user)) = valid_token(gw, &token).await? else {
        return Ok(invalid_link(gw));
    };
    let (binding, cookie) = anonymous_binding(gw, client, req.headers())?;
    let page = reset_page(gw, StatusCode::OK, gw.keys.csrf_token(&binding), &token, &user, None);
    Ok(with_cookie(page, cookie))
}

/// POST reset: the new passwords are checked, then the second factor (if enrolled) is spent, the password set and
/// every session ended.
pub async fn submit_reset(gw: &Gateway, client: &Client, req: Request<Body>) -> Result<Response<Body>, Reject> {
    let (parts, form) = form::read(req).await?;
    let binding = session::csrf_binding(&gw.keys, &parts.headers, &gw.config.csrf_cookie_name());
    check_csrf(gw, &parts, &form, binding.as_ref().map(|b| b.as_slice()))?;
    let csrf = binding.map(|b| gw.keys.csrf_token(&b)).unwrap_or_default();
    let token = form.get("token");
    let Some((_, user)) = valid_token(gw, token).await? else {
        return Ok(invalid_link(gw));
    };
    let again = |status, msg| Ok(reset_page(gw, status, csrf.clone(), token, &user, Some(msg)));
    // Everything that needs no secret is checked first: a second factor is spent only for a password that will
    // be set.
    let pw = form.get("password");
    if pw != form.get("password2") {
        return again(StatusCode::UNPROCESSABLE_ENTITY, "The two passwords differ.");
    }
    if password::check_new(pw).is_err() {
        return again(StatusCode::UNPROCESSABLE_ENTITY, "A password must be 8 to 1024 characters long.");
    }
    let actor = Actor::User { address: client.addr };
    if user.factors.on() {
        // A typed recovery code wins; otherwise the TOTP field is the factor.
        let factor = match form.get("recovery_code") {
            r if !r.trim().is_empty() => Factor::RecoveryCode(r),
            _ => Factor::Totp(form.get("code")),
        };
        let browser = parts.headers.get(http::header::USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or("unknown");
        match gw.accounts.second_factor(&actor, &user, factor, browser, Purpose::PasswordReset).await? {
            Outcome::Accepted(_) => {}
            Outcome::Locked { retry_after, .. } => return Err(Reject::TooManyAttempts(retry_after)),
            Outcome::Refused(_) => {
                return again(
                    StatusCode::UNAUTHORIZED,
                    "The code is not valid. Enter a current code from your app or an unused recovery code.",
                );
            }
        }
    }
    if !gw.accounts.reset_password(&actor, &user, token, pw).await? {
        return Ok(invalid_link(gw));
    }
    let ctx = context! {
        heading => "Password changed",
        detail => "Your password was changed and every session of your account was signed out. Sign in with the new password.",
        action_href => format!("{}/login", gw.prefix()),
        action_label => "Sign in",
    };
    Ok(gw.pages.page("error.html", StatusCode::OK, ctx))
}
