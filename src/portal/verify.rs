//! Forward-auth: `{prefix}/verify` answers a front proxy (nginx `auth_request`, Caddy `forward_auth`, Traefik
//! `forwardAuth`) with the same decision the gateway would make itself.
//!
//! The original request is read from X-Original-URL / X-Original-Method (nginx) or X-Forwarded-Method / -Proto /
//! -Host / -Uri (Caddy, Traefik), believed only from `trusted_proxies`. Answers: 200 with the identity headers;
//! 401 (nginx, which maps it to its own login redirect) or 302 to the login page (Caddy, Traefik); 403.

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, header};

use crate::Body;
use crate::client::Client;
use crate::config::Policy;
use crate::gateway::Gateway;
use crate::pages::{full, redirect};
use crate::respond::Reject;
use crate::store::Level;

/// How the front proxy told us the original request, which decides how "sign in first" is said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    /// nginx auth_request: 401, nginx redirects.
    Nginx,
    /// Caddy / Traefik: a 302 the proxy passes to the browser.
    Redirect,
}

/// The original request as the front proxy describes it.
#[derive(Debug)]
struct Original {
    style: Style,
    scheme: String,
    host: String,
    path_and_query: String,
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty())
}

fn original(headers: &HeaderMap) -> Option<Original> {
    if let Some(url) = header_str(headers, "x-original-url") {
        let uri: Uri = url.parse().ok()?;
        let host = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| header_str(headers, "host").map(str::to_string))?;
        return Some(Original {
            style: Style::Nginx,
            scheme: uri.scheme_str().unwrap_or("http").to_string(),
            host,
            path_and_query: uri.path_and_query().map_or("/", |p| p.as_str()).to_string(),
        });
    }
    let path_and_query = header_str(headers, "x-forwarded-uri")?.to_string();
    let host = header_str(headers, "x-forwarded-host").or_else(|| header_str(headers, "host"))?;
    Some(Original {
        style: Style::Redirect,
        scheme: header_str(headers, "x-forwarded-proto").unwrap_or("http").to_string(),
        host: host.to_string(),
        path_and_query,
    })
}

fn status(code: StatusCode) -> Response<Body> {
    let mut r = Response::new(full(bytes::Bytes::new()));
    *r.status_mut() = code;
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// "Sign in first", in the front proxy's dialect; `page` is the portal path with `rd`.
fn sign_in(orig: &Original, page: String) -> Response<Body> {
    match orig.style {
        Style::Nginx => status(StatusCode::UNAUTHORIZED),
        Style::Redirect => {
            let scheme = if orig.scheme.eq_ignore_ascii_case("https") { "https" } else { "http" };
            redirect(StatusCode::FOUND, &format!("{scheme}://{}{page}", orig.host))
        }
    }
}

/// GET verify.
pub async fn verify(gw: &Gateway, client: &Client, req: &Request<Body>) -> Result<Response<Body>, Reject> {
    if !client.trusted {
        // Anyone could write X-Original-URL: only our configured front proxies may ask.
        tracing::warn!(peer = %client.peer, "forward-auth request from an untrusted peer refused");
        return Ok(status(StatusCode::FORBIDDEN));
    }
    let Some(orig) = original(req.headers()) else {
        return Ok(status(StatusCode::FORBIDDEN));
    };
    let path = orig.path_and_query.split('?').next().unwrap_or("/");
    // Fail closed: an unknown host or an unsafe path is a refusal, never a pass.
    let Ok(decision) = crate::policy::decide(&gw.config, Some(&orig.host), path) else {
        return Ok(status(StatusCode::FORBIDDEN));
    };
    let app = &gw.config.apps[decision.app];
    let needed = match decision.policy {
        Policy::Deny => return Ok(status(StatusCode::FORBIDDEN)),
        Policy::Bypass => return Ok(status(StatusCode::OK)),
        p => p,
    };
    let rd = crate::portal::redirect::target_or_root(&orig.path_and_query);
    let Some(auth) = gw.sessions.authenticate_cached(req.headers()).await? else {
        return Ok(sign_in(&orig, crate::portal::login_url(gw, &rd)));
    };
    match (auth.record.level, needed) {
        (Level::Pending, _) => return Ok(sign_in(&orig, crate::portal::next_step_url(gw, &auth.user, &rd))),
        (Level::Password, Policy::TwoFactor) => return Ok(sign_in(&orig, crate::portal::enroll_url(gw, &rd))),
        _ => {}
    }
    if !app.groups.is_empty() && !app.groups.iter().any(|g| auth.user.groups.contains(g)) {
        return Ok(status(StatusCode::FORBIDDEN));
    }
    let mut resp = status(StatusCode::OK);
    crate::headers::set_identity(resp.headers_mut(), &gw.config, &auth.user);
    Ok(resp)
}
