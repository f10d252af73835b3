//! Invitations ("Create new account"): an admin invites an address; the invitee chooses a username and password,
//! then (when two-factor is required) enrols, saves recovery codes, and only then has a session.
//! There is no open self-registration.

use http::{Request, Response, StatusCode};
use minijinja::context;

use crate::Body;
use crate::audit::{AuditEvent, EventKind};
use crate::client::Client;
use crate::credentials::{password, tokens};
use crate::gateway::Gateway;
use crate::pages::redirect;
use crate::portal::form::{self, check_csrf};
use crate::portal::login::anonymous_binding;
use crate::portal::{query_param, with_cookie};
use crate::respond::Reject;
use crate::session::{self};
use crate::signin;
use crate::store::{Level, TokenKind, TokenRecord, TokenUse, User};

/// A valid invitation's record, or None.
async fn valid(gw: &Gateway, token: &str) -> Result<Option<TokenRecord>, Reject> {
    if token.is_empty() {
        return Ok(None);
    }
    let rec = gw.store.token(tokens::hash(&gw.keys, token)).await?;
    Ok(rec.filter(|r| r.kind == TokenKind::Invitation && gw.clock.now() < r.expires))
}

/// The token from what the user pasted: the whole link or the bare code.
fn token_from(input: &str) -> String {
    let input = input.trim();
    match input.split_once("token=") {
        Some((_, rest)) => rest.split('&').next().unwrap_or_default().to_string(),
        None => input.to_string(),
    }
}

fn invalid(gw: &Gateway) -> Response<Body> {
    let ctx = context! {
        heading => "Invitation not valid",
        detail => "This invitation is not valid: it was already used or it expired. Ask your administrator for a new one.",
        action_href => format!("{}/login", gw.prefix()),
        action_label => "Back to sign-in",
    };
    gw.pages.page("error.html", StatusCode::GONE, ctx)
}

/// What the invitation form shows.
#[derive(Debug, Default, serde::Serialize)]
struct View<'a> {
    csrf: String,
    token: &'a str,
    email: &'a str,
    username: &'a str,
    name: &'a str,
}

fn page(gw: &Gateway, status: StatusCode, view: &View<'_>, error: Option<&str>) -> Response<Body> {
    let ctx = context! { error, enabled => gw.config.invitations_enabled(), ..minijinja::Value::from(minijinja::value::Serde(view)) };
    gw.pages.page("invite.html", status, ctx)
}

/// GET invite[?token=…].
pub async fn show(gw: &Gateway, client: &Client, req: &Request<Body>) -> Result<Response<Body>, Reject> {
    let token = token_from(&query_param(req.uri(), "token"));
    let (binding, cookie) = anonymous_binding(gw, client, req.headers())?;
    let csrf = gw.keys.csrf_token(&binding);
    if token.is_empty() || !gw.config.invitations_enabled() {
        return Ok(with_cookie(page(gw, StatusCode::OK, &View { csrf, ..View::default() }, None), cookie));
    }
    let Some(rec) = valid(gw, &token).await? else {
        return Ok(invalid(gw));
    };
    let view = View { csrf, token: &token, email: &rec.email, ..View::default() };
    Ok(with_cookie(page(gw, StatusCode::OK, &view, None), cookie))
}

/// POST invite: create the account, spending the invitation; then enrolment or a session.
pub async fn accept(gw: &Gateway, client: &Client, req: Request<Body>) -> Result<Response<Body>, Reject> {
    let (parts, form) = form::read(req).await?;
    let binding = session::csrf_binding(&gw.keys, &parts.headers, &gw.config.csrf_cookie_name());
    check_csrf(gw, &parts, &form, binding.as_ref().map(|b| b.as_slice()))?;
    let csrf = binding.map(|b| gw.keys.csrf_token(&b)).unwrap_or_default();
    if !gw.config.invitations_enabled() {
        return Ok(invalid(gw));
    }
    let token = form.get("token");
    let Some(rec) = valid(gw, token).await? else {
        return Ok(invalid(gw));
    };
    let (typed, name) = (form.get("username"), form.get("name").trim());
    let view = View { csrf, token, email: &rec.email, username: typed, name };
    let again = |status, msg: &str| Ok(page(gw, status, &view, Some(msg)));
    let Ok(username) = crate::accounts::validate::username(typed) else {
        return again(StatusCode::UNPROCESSABLE_ENTITY, "A username is 1 to 64 letters, digits or . _ @ + -");
    };
    let pw = form.get("password");
    if pw != form.get("password2") {
        return again(StatusCode::UNPROCESSABLE_ENTITY, "The two passwords differ.");
    }
    if password::check_new(pw).is_err() {
        return again(StatusCode::UNPROCESSABLE_ENTITY, "A password must be 8 to 1024 characters long.");
    }
    let now = gw.clock.now();
    // Email and groups come from the invitation, inside the transaction that spends it.
    let display_name = if name.is_empty() { typed.trim() } else { name };
    let user = User::new(&username, "", display_name, Vec::new(), gw.hasher.hash(pw.to_string()).await?, now);
    match gw.store.accept_invitation(tokens::hash(&gw.keys, token), user, now).await? {
        TokenUse::Done(_) => {}
        TokenUse::Conflict(msg) => return again(StatusCode::CONFLICT, &format!("That didn't work: {msg}.")),
        TokenUse::Invalid => return Ok(invalid(gw)),
    }
    let event = AuditEvent::new(now, EventKind::InvitationAccepted, &username).from_addr(client.addr);
    gw.audit(event.by(&rec.issued_by)).await;
    // The new account starts like a fresh login (with no factor yet): with two-factor required, only enrolment is
    // open to it.
    let rules = crate::portal::signin_rules(gw);
    let state =
        signin::State::Anonymous.after(signin::Event::PasswordAccepted, signin::Enrolled::default(), rules, now);
    let level = state.level().unwrap_or(Level::Pending);
    let (_, cookie) = gw.sessions.start(&username, level, client.addr, None, client.https).await?;
    let next = crate::portal::step_url(gw, &state, "/");
    Ok(with_cookie(redirect(StatusCode::SEE_OTHER, &next), Some(cookie)))
}
