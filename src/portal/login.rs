//! Sign-in and sign-out: show the form → check CSRF, lockout and password → new session → back to the app.

use http::{Request, Response, StatusCode};
use minijinja::context;

use crate::Body;
use crate::accounts::source::{Asked, PasswordStep};
use crate::audit::{AuditEvent, EventKind};
use crate::client::Client;
use crate::gateway::Gateway;
use crate::keys::random_bytes;
use crate::pages::redirect;
use crate::portal::form::{self, check_csrf};
use crate::portal::redirect::target_or_root;
use crate::portal::{next_step_url, query_param, signin_rules, step_url, with_cookie};
use crate::respond::Reject;
use crate::session::{self};
use crate::signin;
use crate::store::Level;

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

    let user = match crate::portal::password_step(gw, client, typed, password, Asked::SignIn).await? {
        PasswordStep::Accepted(user) => *user,
        PasswordStep::Refused => {
            let msg = Some("Invalid username or password.");
            return Ok(login_page(gw, StatusCode::UNAUTHORIZED, &binding, &rd, typed, msg));
        }
        PasswordStep::Locked { retry_after, .. } => return Err(Reject::TooManyAttempts(retry_after)),
        PasswordStep::AccountLocked => return Err(Reject::AccountLocked),
    };

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
        crate::portal::signed_in(gw, client, &user.username, None).await?;
    }
    gw.metrics.login("success");
    let detail = if level == Level::Pending { "second factor due" } else { "password only" };
    gw.audit(AuditEvent::new(now, EventKind::LoginSucceeded, &user.username).from_addr(client.addr).detail(detail))
        .await;
    Ok(with_cookie(redirect(StatusCode::SEE_OTHER, &next), Some(cookie)))
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
