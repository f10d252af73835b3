//! The request flow: request → policy → session → portal or proxy. [`handle`] is the one entry point for every
//! request hyper's server reads (the HTTP/1.1 relay decides its own requests with the same policy and session
//! calls, see [`crate::proxy::relay`]).

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response, StatusCode};

use crate::Body;
use crate::client::Client;
use crate::gateway::Gateway;
use crate::metrics::{Lane, Served};
use crate::pages::redirect;
use crate::policy::{Admission, admit};
use crate::respond::{Reject, reject};

/// Whether a request is from a browser that can follow a redirect to the login page.
fn wants_html(req: &Request<Body>) -> bool {
    let get = req.method() == http::Method::GET || req.method() == http::Method::HEAD;
    let html = req
        .headers()
        .get_all(http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/html"));
    get && html
}

/// Handles one request from start to finish. Never fails: every error becomes a page.
pub async fn handle(gw: Arc<Gateway>, peer: SocketAddr, mut req: Request<Body>) -> Response<Body> {
    let started = std::time::Instant::now();
    let mut served = Served::default();
    crate::headers::strip_identity_headers(&gw.config, req.headers_mut());
    let client = gw.client(peer, req.headers());
    let portal = crate::policy::owns(gw.prefix(), req.uri().path());
    let host = crate::headers::request_host(&req);
    // RFC 9112 §3.2: an HTTP/1.1 request without a Host, with several, or with one that is not a host is a 400,
    // before any app or rule is chosen (HTTP/2 names its host in `:authority`).
    let hosts = req.headers().get_all(http::header::HOST).iter().count();
    let bad_host = hosts > 1
        || (hosts == 0 && req.version() == http::Version::HTTP_11 && req.uri().authority().is_none())
        || host.as_deref().is_some_and(|h| !crate::normalize::valid_host(h.trim()));
    let app = if portal || bad_host { None } else { crate::policy::find_app(&gw.config.apps, host.as_deref()) };
    let result = if bad_host {
        Err(Reject::BadRequest("The Host header is not a valid host name."))
    } else if !portal {
        protected(&gw, &client, app, req, &mut served).await
    } else if let Some(sub) = admin_path(&req.uri().path()[gw.prefix().len()..]) {
        crate::admin::handle(&gw, &client, req, &sub).await
    } else {
        crate::portal::handle(&gw, &client, req).await
    };
    let resp = result.unwrap_or_else(|r| reject(&gw.pages, &r));
    let n = gw.config.apps.len();
    let slot = match app {
        Some(i) => i,
        None if portal => n,
        None => n + 1,
    };
    gw.finished(&served.outcome(Lane::Handlers, slot, resp.status().as_u16(), started.elapsed()));
    resp
}

/// A GET or HEAD that looks as if it carries a body ([`crate::headers::bodyless_method_with_body`]) is refused,
/// except an HTTP/2 one whose stream ends without data: HEADERS without END_STREAM, then an empty DATA frame that
/// ends the stream, is a bodyless request (RFC 9113 §8.1), and some clients send it. Such a stream is read to its
/// end (within `limit`) before the request goes on, with no body.
async fn bodyless(req: Request<Body>, limit: std::time::Duration) -> Result<Request<Body>, Reject> {
    use http_body_util::BodyExt;
    let refused = Reject::BadRequest("A GET or HEAD request can't carry a body.");
    if req.version() != http::Version::HTTP_2 {
        return Err(refused);
    }
    let (parts, mut body) = req.into_parts();
    let ended = tokio::time::timeout(limit, async {
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) if f.data_ref().is_none_or(|d| d.is_empty()) => {}
                Ok(_) => return Err(Reject::BadRequest("A GET or HEAD request can't carry a body.")),
                // The stream was reset or its connection closed (a load tool stopping, a tab closed): that is
                // the client leaving, not a client error to count as one.
                Err(_) => return Err(Reject::ClientClosed),
            }
        }
        Ok(())
    });
    match ended.await {
        Ok(Ok(())) => Ok(Request::from_parts(parts, crate::body::full(bytes::Bytes::new()))),
        Ok(Err(r)) => Err(r),
        Err(_) => Err(refused),
    }
}

/// The part of a portal path after `/admin`, for the admin pages.
fn admin_path(sub: &str) -> Option<String> {
    (sub == "/admin" || sub.starts_with("/admin/")).then(|| sub["/admin".len()..].to_string())
}

/// A request for an application: decide, authenticate, then proxy or send to the login page.
async fn protected(
    gw: &Arc<Gateway>,
    client: &Client,
    app: Option<usize>,
    req: Request<Body>,
    served: &mut Served,
) -> Result<Response<Body>, Reject> {
    let decision = crate::policy::decide_for(&gw.config, app, req.uri().path()).map_err(|e| match e {
        crate::policy::PolicyError::UnknownHost => Reject::UnknownHost,
        crate::policy::PolicyError::BadPath(why) => Reject::BadRequest(why),
    })?;
    let app = &gw.config.apps[decision.app];
    let req = if !app.allow_get_body && crate::headers::bodyless_method_with_body(&req) {
        bodyless(req, gw.config.server.body_timeout.0).await?
    } else {
        req
    };
    let session = match decision.policy.needs_session() {
        true => gw.sessions.authenticate_cached(req.headers()).await?,
        false => None,
    };
    served.user = session.as_ref().map(|a| a.user.clone());
    let held = session.as_ref().map(|a| (a.record.level, a.user.groups.as_slice()));
    let identity = match (admit(app, decision.policy, held), session) {
        (Admission::Pass { identity }, session) => session.filter(|_| identity),
        (Admission::Pending, Some(auth)) => {
            return Ok(send_to(gw, &req, |rd| crate::portal::next_step_url(gw, &auth.user, rd)));
        }
        (Admission::NeedsSecondFactor, _) => return Ok(send_to(gw, &req, |rd| crate::portal::enroll_url(gw, rd))),
        (Admission::NoSession | Admission::Pending, _) => {
            return Ok(send_to(gw, &req, |rd| crate::portal::login_url(gw, rd)));
        }
        (Admission::Denied, _) => return Err(Reject::Denied),
        (Admission::NotInGroup, _) => return Err(Reject::NotInGroup),
    };
    crate::proxy::forward(&**gw, client, decision, identity, req, served).await
}

/// Browsers go to the portal page `url(where they were going)`; everything else gets 401.
fn send_to(gw: &Gateway, req: &Request<Body>, url: impl FnOnce(&str) -> String) -> Response<Body> {
    if !wants_html(req) {
        return reject(&gw.pages, &Reject::Unauthorized);
    }
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    redirect(StatusCode::FOUND, &url(target))
}

/// The proxy paths read the gateway through this; the relay answers what it doesn't forward itself with
/// [`handle`], so the state needn't know the request flow.
impl crate::proxy::State for Gateway {
    fn config(&self) -> &crate::config::Config {
        &self.config
    }
    fn own_cookies(&self) -> [&str; 2] {
        Gateway::own_cookies(self)
    }
    fn prefix(&self) -> &str {
        Gateway::prefix(self)
    }
    fn upstreams(&self) -> &crate::proxy::Upstreams {
        &self.upstreams
    }
    fn sessions(&self) -> &crate::session::Sessions {
        &self.sessions
    }
    fn tunnels(&self) -> &Arc<crate::proxy::tunnels::Tunnels> {
        &self.tunnels
    }
    fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }
    fn finished(&self, outcome: &crate::metrics::Outcome<'_>) {
        Gateway::finished(self, outcome)
    }
    fn pages(&self) -> &crate::pages::Pages {
        &self.pages
    }
    fn client<H: crate::headers::Headers + ?Sized>(&self, peer: SocketAddr, headers: &H) -> Client {
        Gateway::client(self, peer, headers)
    }
    fn handle(
        self: Arc<Self>,
        peer: SocketAddr,
        req: http::Request<crate::Body>,
    ) -> impl Future<Output = http::Response<crate::Body>> + Send {
        handle(self, peer, req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn h2_get(frames: Vec<Result<http_body::Frame<bytes::Bytes>, crate::BoxError>>) -> Request<Body> {
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed();
        let mut req = Request::get("/x").body(body).unwrap();
        *req.version_mut() = http::Version::HTTP_2;
        req
    }

    #[tokio::test]
    async fn an_h2_get_whose_stream_ends_empty_passes_and_one_with_data_or_cut_off_does_not() {
        let limit = std::time::Duration::from_secs(5);
        let empty = vec![Ok(http_body::Frame::data(bytes::Bytes::new()))];
        assert!(bodyless(h2_get(empty), limit).await.is_ok(), "an empty DATA frame that ends the stream");
        let data = vec![Ok(http_body::Frame::data(bytes::Bytes::from_static(b"GET /admin")))];
        assert!(matches!(bodyless(h2_get(data), limit).await, Err(Reject::BadRequest(_))), "data is a body");
        let reset = vec![Err::<http_body::Frame<bytes::Bytes>, crate::BoxError>("stream reset".into())];
        let gone = bodyless(h2_get(reset), limit).await;
        assert!(matches!(gone, Err(Reject::ClientClosed)), "a reset stream is the client leaving, not a 400");
        assert_eq!(Reject::ClientClosed.status().as_u16(), 499);
    }
}
