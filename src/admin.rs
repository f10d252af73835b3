//! Admin pages: who has two-factor, and help for users who lost a phone. Only members of `[admin] group` with a
//! fully verified session get in; everyone else gets 403 on every route. Admins never see hashes, secrets or codes.

use http::{Method, Request, Response, StatusCode};
use minijinja::{Value, context};
use serde::Serialize;

use crate::Body;
use crate::accounts::{Actor, Keep};
use crate::client::Client;
use crate::clock::rfc3339;
use crate::gateway::Gateway;
use crate::pages::redirect;
use crate::portal::form::{self, check_csrf};
use crate::portal::{encode, query_param};
use crate::respond::Reject;
use crate::session::Authenticated;
use crate::store::{Level, SecondFactor, User, UserFilter, normalize_login};

/// Rows per page of the user list.
const PAGE_SIZE: usize = 50;
/// Events shown on a user's page.
const EVENTS_SHOWN: usize = 50;

/// A user as admins see it: no hash, no secret, no codes.
#[derive(Debug, Serialize)]
pub struct UserRow {
    username: String,
    email: String,
    name: String,
    groups: String,
    two_factor: bool,
    enabled_at: Option<String>,
    /// The kinds enrolled ("totp").
    factors: Vec<&'static str>,
    codes_left: usize,
    locked: bool,
    created: String,
    last_login_at: Option<String>,
    last_login_address: Option<String>,
    last_login_factor: &'static str,
}

impl From<&User> for UserRow {
    fn from(u: &User) -> Self {
        UserRow {
            username: u.username.clone(),
            email: u.email.clone(),
            name: u.display_name.clone(),
            groups: u.groups.join(", "),
            two_factor: u.factors.on(),
            enabled_at: u.factors.enabled_at().map(rfc3339),
            factors: u.factors.kinds().iter().map(|k| k.as_str()).collect(),
            codes_left: u.factors.recovery.len(),
            locked: u.locked,
            created: rfc3339(u.created),
            last_login_at: u.last_login.as_ref().map(|l| rfc3339(l.at)),
            last_login_address: u.last_login.as_ref().map(|l| l.address.clone()),
            last_login_factor: match u.last_login.as_ref().and_then(|l| l.second_factor) {
                Some(SecondFactor::Totp) => "with 2FA (TOTP)",
                Some(SecondFactor::RecoveryCode) => "with 2FA (recovery code)",
                None => "password only",
            },
        }
    }
}

/// The request's admin, or 403.
async fn require_admin(gw: &Gateway, req_headers: &http::HeaderMap) -> Result<Authenticated, Reject> {
    let auth = gw.sessions.authenticate(req_headers).await?.ok_or(Reject::AdminOnly)?;
    let admin = auth.record.level == Level::Full && auth.user.groups.contains(&gw.config.admin.group);
    if admin { Ok(auth) } else { Err(Reject::AdminOnly) }
}

/// The actions an admin can take on an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Lock,
    Unlock,
    ResetTwoFactor,
    EndSessions,
    Delete,
}

impl Action {
    fn parse(s: &str) -> Option<Action> {
        match s {
            "lock" => Some(Action::Lock),
            "unlock" => Some(Action::Unlock),
            "reset-2fa" => Some(Action::ResetTwoFactor),
            "end-sessions" => Some(Action::EndSessions),
            "delete" => Some(Action::Delete),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Action::Lock => "lock",
            Action::Unlock => "unlock",
            Action::ResetTwoFactor => "reset-2fa",
            Action::EndSessions => "end-sessions",
            Action::Delete => "delete",
        }
    }
}

/// Routes `{prefix}/admin/...`; `sub` is the part after `/admin`.
pub async fn handle(gw: &Gateway, client: &Client, req: Request<Body>, sub: &str) -> Result<Response<Body>, Reject> {
    // Authorisation comes first, before the route is even looked at: non-admins learn nothing.
    let admin = require_admin(gw, req.headers()).await?;
    if sub == "/invite" && req.method() == Method::POST {
        return invite(gw, client, &admin, req).await;
    }
    let rest = sub.strip_prefix("/users").ok_or(Reject::NotFound)?;
    let get = matches!(*req.method(), Method::GET | Method::HEAD);
    let segments: Vec<String> = rest
        .split('/')
        .skip(1)
        .map(|s| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned())
        .collect();
    match segments.as_slice() {
        [] if get => list(gw, &admin, &req).await,
        [name] if get => detail(gw, &admin, name, &query_param(req.uri(), "done")).await,
        [name, action] if req.method() == Method::POST => {
            let action = Action::parse(action).ok_or(Reject::NotFound)?;
            act(gw, client, &admin, req, name, action).await
        }
        _ => Err(Reject::NotFound),
    }
}

async fn list(gw: &Gateway, admin: &Authenticated, req: &Request<Body>) -> Result<Response<Body>, Reject> {
    let tf = query_param(req.uri(), "two_factor");
    let q = query_param(req.uri(), "q");
    let after = query_param(req.uri(), "after");
    let filter = UserFilter {
        two_factor: match tf.as_str() {
            "enabled" => Some(true),
            "disabled" => Some(false),
            _ => None,
        },
        search: (!q.trim().is_empty()).then(|| q.trim().to_string()),
    };
    let (users, more) = gw.store.users_page(after.clone(), PAGE_SIZE, filter).await?;
    let rows: Vec<UserRow> = users.iter().map(UserRow::from).collect();
    let next = more.then(|| {
        let last = users.last().map_or("", |u| u.username.as_str());
        format!("{}/admin/users?two_factor={}&q={}&after={}", gw.prefix(), encode(&tf), encode(&q), encode(last))
    });
    let invited = query_param(req.uri(), "invited");
    let deleted = query_param(req.uri(), "deleted");
    let message = match (invited.is_empty(), deleted.is_empty()) {
        (false, _) => Some(format!("Invitation sent to {invited}.")),
        (_, false) => Some(format!("The account {deleted} was deleted.")),
        _ => None,
    };
    let ctx = context! { rows => Value::from(minijinja::value::Serde(&rows)), next, q, two_factor => tf, first_page => after.is_empty(),
                         message, csrf => gw.keys.csrf_token(&admin.id.0), invitations => gw.config.invitations_enabled(),
    admin => &admin.user.username };
    Ok(gw.pages.page("admin_users.html", StatusCode::OK, ctx))
}

async fn detail(gw: &Gateway, admin: &Authenticated, name: &str, done: &str) -> Result<Response<Body>, Reject> {
    let user = gw.store.user(&normalize_login(name)).await?.ok_or(Reject::NotFound)?;
    let events: Vec<_> = gw
        .store
        .audit_for_user(&user.username, EVENTS_SHOWN)
        .await?
        .into_iter()
        .map(|e| {
            context! {
                at => rfc3339(e.at), kind => e.kind.as_str(), address => e.address,
                actor => e.actor, detail => e.detail,
            }
        })
        .collect();
    let message = Action::parse(done).map(|a| match a {
        Action::Lock => "The account is locked and its sessions ended.",
        Action::Unlock => "The account is unlocked.",
        Action::ResetTwoFactor => "Two-factor authentication was removed and the sessions ended.",
        Action::EndSessions => "All sessions of this account ended.",
        Action::Delete => "The account was deleted.",
    });
    let ctx = context! {
        user => Value::from(minijinja::value::Serde(UserRow::from(&user))), events, message,
        csrf => gw.keys.csrf_token(&admin.id.0),
        base => format!("{}/admin/users/{}", gw.prefix(), encode(&user.username)),
    };
    Ok(gw.pages.page("admin_user.html", StatusCode::OK, ctx))
}

async fn act(
    gw: &Gateway,
    client: &Client,
    admin: &Authenticated,
    req: Request<Body>,
    name: &str,
    action: Action,
) -> Result<Response<Body>, Reject> {
    let (parts, form) = form::read(req).await?;
    check_csrf(gw, &parts, &form, Some(&admin.id.0))?;
    let actor = Actor::Admin { name: admin.user.username.clone(), address: client.addr };
    let accounts = &gw.accounts;
    let user = match action {
        Action::Lock => accounts.lock(&actor, name).await?,
        Action::Unlock => accounts.unlock(&actor, name).await?,
        Action::ResetTwoFactor => accounts.reset_two_factor(&actor, name, Keep::Nothing).await?.0,
        Action::EndSessions => accounts.end_sessions(&actor, name).await?.0,
        Action::Delete => {
            // An admin who deletes their own account locks themselves out mid-session; the CLI can still do it.
            if normalize_login(name) == admin.user.username {
                return Err(Reject::BadRequest("You can't delete your own account here."));
            }
            let user = accounts.delete(&actor, name).await?;
            let back = format!("{}/admin/users?deleted={}", gw.prefix(), encode(&user.username));
            return Ok(redirect(StatusCode::SEE_OTHER, &back));
        }
    };
    let back = format!("{}/admin/users/{}?done={}", gw.prefix(), encode(&user.username), action.name());
    Ok(redirect(StatusCode::SEE_OTHER, &back))
}

/// POST admin/invite: email an invitation bound to an address, carrying groups.
async fn invite(
    gw: &Gateway,
    client: &Client,
    admin: &Authenticated,
    req: Request<Body>,
) -> Result<Response<Body>, Reject> {
    let (parts, form) = form::read(req).await?;
    check_csrf(gw, &parts, &form, Some(&admin.id.0))?;
    let actor = Actor::Admin { name: admin.user.username.clone(), address: client.addr };
    let groups: Vec<&str> = form.get("groups").split(',').collect();
    let email = gw.accounts.invite(&actor, form.get("email"), &groups).await?;
    tracing::info!(admin = %admin.user.username, addr = %client.addr, "invitation sent");
    Ok(redirect(StatusCode::SEE_OTHER, &format!("{}/admin/users?invited={}", gw.prefix(), encode(&email))))
}
