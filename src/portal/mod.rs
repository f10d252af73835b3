//! The gateway's own pages under the portal prefix, served on every host.

pub mod form;
pub mod login;
pub mod pages;
pub mod redirect;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;

use crate::Body;
use crate::gateway::{Client, Gateway};
use crate::respond::Reject;

/// Whether a path belongs to the portal.
pub fn owns(prefix: &str, path: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Routes a portal request. Paths match exactly, so no rule or header can reach a page by accident.
pub async fn handle(gw: &Gateway, client: &Client, req: Request<Incoming>) -> Result<Response<Body>, Reject> {
    let sub = req.uri().path()[gw.prefix().len()..].to_string();
    let method = req.method().clone();
    match (method, sub.as_str()) {
        (Method::GET | Method::HEAD, "/health") => Ok(plain(StatusCode::OK, "text/plain; charset=utf-8", "ok")),
        (Method::GET | Method::HEAD, "/static/portcullis.css") => {
            let mut r = plain(StatusCode::OK, "text/css; charset=utf-8", pages::STYLESHEET);
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=3600"));
            Ok(r)
        }
        (Method::GET | Method::HEAD, "/login") => login::show(gw, client, &req).await,
        (Method::POST, "/login") => login::submit(gw, client, req).await,
        (Method::GET | Method::HEAD, "/logout") => login::show_logout(gw, &req).await,
        (Method::POST, "/logout") => login::logout(gw, client, req).await,
        (_, "/health" | "/login" | "/logout") => Err(Reject::MethodNotAllowed),
        _ => Err(Reject::NotFound),
    }
}

fn plain(status: StatusCode, content_type: &'static str, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(pages::full(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut()
        .insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    resp
}
