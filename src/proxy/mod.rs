//! The reverse proxy: streams requests to the app and responses back, with hop-by-hop headers removed
//! (RFC 9110 §7.6.1), forwarding headers set, identity added from the session only, and WebSocket upgrades
//! tunnelled (RFC 6455 §4 over RFC 9110 §7.8 Upgrade).

use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::Body;
use crate::client::Client;
use crate::config::{App, Config};
use crate::headers::{
    ForwardedHeaders, Framing, Listed, foreign_cookies, has_token, passes_downstream, passes_upstream, request_host,
};
use crate::policy::Decision;
use crate::respond::Reject;
use crate::store::User;

pub mod pool;
pub mod relay;
pub mod stall;
pub mod tunnels;

/// What the proxy paths read from the running gateway state (the gateway's state type implements it). The
/// proxy names no state type, so the state can own the proxy's parts (clients, pools, tunnels) without a cycle.
pub trait State: Send + Sync + 'static {
    /// The configuration in force.
    fn config(&self) -> &Config;
    /// The names of the gateway's own cookies, which never reach an app.
    fn own_cookies(&self) -> [&str; 2];
    /// The portal prefix.
    fn prefix(&self) -> &str;
    /// The upstream clients and relay pools.
    fn upstreams(&self) -> &Upstreams;
    /// The session service.
    fn sessions(&self) -> &crate::session::Sessions;
    /// Open upgraded tunnels.
    fn tunnels(&self) -> &Arc<tunnels::Tunnels>;
    /// The metrics registry.
    fn metrics(&self) -> &crate::metrics::Metrics;
    /// Records how a request ended: every request on either lane ends here, once.
    fn finished(&self, outcome: &crate::metrics::Outcome<'_>);
    /// The templates (for refusal pages).
    fn pages(&self) -> &crate::pages::Pages;
    /// The client of a request from `peer`.
    fn client<H: crate::headers::Headers + ?Sized>(&self, peer: std::net::SocketAddr, headers: &H) -> Client;
    /// Answers a request as hyper's path would (policy, portal, proxy): the relay's way to serve what it doesn't
    /// forward itself without giving the connection away.
    fn handle(
        self: Arc<Self>,
        peer: std::net::SocketAddr,
        req: Request<Body>,
    ) -> impl Future<Output = Response<Body>> + Send;
}

/// Building an upstream client failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The app's CA file can't be read.
    #[error("ca_file {path}: {why}")]
    CaFile {
        /// The file.
        path: String,
        /// Why.
        why: String,
    },
    /// rustls refused the configuration.
    #[error("TLS client configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The upstream's host can't be a TLS server name.
    #[error("upstream host is not a valid TLS server name: {0}")]
    Name(String),
}

/// The client's request body on its way upstream, noting whether the client broke it (bad chunking, cut short),
/// so that failure is answered as the client's 400 and not blamed on the app as a 502.
pub struct Watched {
    inner: Body,
    failed: Arc<std::sync::atomic::AtomicBool>,
}

impl http_body::Body for Watched {
    type Data = bytes::Bytes;
    type Error = crate::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Err(_))) = &polled {
            self.failed.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The connection pool of each app (each https app with its own trust roots), which the relay and the client for
/// hyper's requests ([`relay::Pool::send`]) share.
pub struct Upstreams {
    pools: Vec<Arc<relay::Pool>>,
}

impl Upstreams {
    /// Builds the clients for every app.
    pub fn new(config: &Config) -> Result<Upstreams, UpstreamError> {
        let native = Arc::new(native_roots());
        let mut pools = Vec::with_capacity(config.apps.len());
        for app in &config.apps {
            let tls = match tls_for(app, &native)? {
                Some(connector) => Some((connector, server_name(&app.upstream.authority)?)),
                None => None,
            };
            pools.push(Arc::new(relay::Pool::new(
                &app.upstream.authority,
                tls,
                app.max_idle_connections,
                app.reuse_after_body,
            )));
        }
        Ok(Upstreams { pools })
    }

    /// The connection pool of an app.
    pub fn relay(&self, app: usize) -> Option<&Arc<relay::Pool>> {
        self.pools.get(app)
    }
}

fn native_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for cert in found.certs {
        // A single unparsable system certificate shouldn't disable all the others.
        let _ = roots.add(cert);
    }
    roots
}

/// The name an https app's certificate must carry.
fn server_name(authority: &http::uri::Authority) -> Result<rustls::pki_types::ServerName<'static>, UpstreamError> {
    let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_string();
    rustls::pki_types::ServerName::try_from(host).map_err(|e| UpstreamError::Name(e.to_string()))
}

/// The TLS set-up of an https app (the system roots plus its `ca_file`); `None` for plain HTTP.
fn tls_for(app: &App, native: &RootCertStore) -> Result<Option<tokio_rustls::TlsConnector>, UpstreamError> {
    let tls = if app.upstream.scheme == http::uri::Scheme::HTTPS {
        let mut roots = native.clone();
        if let Some(path) = &app.ca_file {
            let err = |why: String| UpstreamError::CaFile { path: path.display().to_string(), why };
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| err(e.to_string()))?
                .collect::<Result<_, _>>()
                .map_err(|e| err(e.to_string()))?;
            if certs.is_empty() {
                return Err(err("no certificates in the file".into()));
            }
            for c in certs {
                roots.add(c).map_err(|e| err(e.to_string()))?;
            }
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Some(tokio_rustls::TlsConnector::from(Arc::new(tls)))
    } else {
        None
    };
    Ok(tls)
}

/// A WebSocket opening handshake (RFC 6455 §4.1): `Connection: upgrade` and `Upgrade: websocket`.
fn is_websocket(headers: &HeaderMap) -> bool {
    has_token(headers, "connection", "upgrade") && has_token(headers, "upgrade", "websocket")
}

/// The request headers for the app: what passes as sent ([`passes_upstream`]), then our own cookies removed,
/// the forwarding headers and the identity from the session.
fn upstream_headers(
    gw: &impl State,
    client: &Client,
    host: Option<&str>,
    identity: Option<&User>,
    own: &[&str],
    from: &HeaderMap,
) -> HeaderMap {
    let mut to = HeaderMap::with_capacity(from.len() + 8);
    let listed = Listed::of(from);
    for (name, value) in from {
        if passes_upstream(gw.config(), &listed, name.as_str().as_bytes(), client.trusted) {
            to.append(name.clone(), value.clone());
        }
    }
    if let Some(v) = foreign_cookies(from, own).and_then(|c| HeaderValue::from_str(&c).ok()) {
        to.insert(header::COOKIE, v);
    }
    let peer_ip = client.peer.ip().to_string();
    for (name, value) in ForwardedHeaders::new(from, client.via(), &peer_ip, host).pairs() {
        if let Ok(v) = HeaderValue::from_str(value) {
            to.insert(HeaderName::from_static(name), v);
        }
    }
    if let Some(user) = identity {
        crate::headers::set_identity(&mut to, gw.config(), user);
    }
    // HTTP/2 clients send :authority, not Host; the upstream speaks HTTP/1.1 and needs Host.
    if let Some(v) = host.and_then(|h| HeaderValue::from_str(h).ok()) {
        to.insert(header::HOST, v);
    }
    to
}

/// Forwards an allowed request to its app and streams the answer back.
pub async fn forward(
    gw: &impl State,
    client: &Client,
    decision: Decision,
    session: Option<crate::session::Authenticated>,
    mut req: Request<Body>,
    served: &mut crate::metrics::Served,
) -> Result<Response<Body>, Reject> {
    let app = &gw.config().apps[decision.app];
    let path_and_query = match req.uri().query() {
        Some(q) => format!("{}?{}", decision.path, q),
        None => decision.path,
    };
    // Origin form (RFC 9112 §3.2.1): the connection already goes to the app.
    let uri = Uri::builder()
        .path_and_query(path_and_query)
        .build()
        .map_err(|_| Reject::BadRequest("The address could not be understood."))?;
    let host = request_host(&req);
    let websocket = req.version() == Version::HTTP_11 && is_websocket(req.headers());
    let h2 = req.version() == Version::HTTP_2;
    let client_upgrade = websocket.then(|| hyper::upgrade::on(&mut req));
    let accept = if websocket { crate::headers::websocket_accept(req.headers()) } else { None };

    let (mut parts, body) = req.into_parts();
    let own = gw.own_cookies();
    let identity = session.as_ref().map(|s| &*s.user);
    parts.headers = upstream_headers(gw, client, host.as_deref(), identity, &own, &parts.headers);
    if websocket {
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let upstream_req = Request::from_parts(parts, Watched { inner: body, failed: failed.clone() });

    let who = pool::Affinity::of(app.shared_connections, session.as_ref().map(|s| &s.user));
    let Some(upstream) = gw.upstreams().relay(decision.app) else {
        return Err(Reject::BadGateway);
    };
    let limits = relay::Limits { answer: app.upstream_timeout.0, body: gw.config().server.body_timeout.0 };
    let started = std::time::Instant::now();
    let outcome = upstream.send(who, upstream_req, websocket, limits).await;
    served.upstream = Some(started.elapsed());
    let sent = match outcome {
        Err(relay::SendError::Timeout) => return Err(Reject::GatewayTimeout),
        Err(relay::SendError::BodyStalled) => return Err(Reject::RequestTimeout),
        Err(_) if failed.load(std::sync::atomic::Ordering::Relaxed) => {
            return Err(Reject::BadRequest("The request body was malformed or cut short."));
        }
        Err(relay::SendError::Body(e)) => {
            tracing::debug!(error = %e, "the client's request body failed");
            return Err(Reject::BadRequest("The request body was malformed or cut short."));
        }
        Err(e) => {
            tracing::warn!(upstream = %app.upstream.authority, error = %e, "upstream request failed");
            return Err(Reject::BadGateway);
        }
        Ok(r) => r,
    };

    let (resp, framing) = match sent {
        relay::Sent::Answer(resp, framing) => (resp, framing),
        relay::Sent::Upgraded(parts, mut up) => {
            let Some(client_upgrade) = client_upgrade else {
                return Err(Reject::BadGateway);
            };
            if !crate::headers::websocket_accepted(accept.as_deref(), &parts.headers) {
                tracing::warn!(upstream = %app.upstream.authority, "the app answered 101 without the handshake's Sec-WebSocket-Accept");
                return Err(Reject::BadGateway);
            }
            // The tunnel lives while its session does (bypass tunnels belong to nobody).
            let owner = session.as_ref().map(|s| (s.id, s.user.username.as_str().into()));
            gw.tunnels().open(owner, gw.sessions().clock(), move |traffic| async move {
                match client_upgrade.await {
                    Ok(down) => {
                        let mut down = traffic.count(TokioIo::new(down));
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                    Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
                }
            });
            // The app's fields under the response rules (no Set-Cookie for our cookies), the upgrade named by us.
            let mut parts = parts;
            let listed = Listed::of(&parts.headers);
            let mut headers = HeaderMap::with_capacity(parts.headers.len() + 2);
            for (name, value) in &parts.headers {
                if passes_downstream(&listed, name.as_str().as_bytes(), value.as_bytes(), &own) {
                    headers.append(name.clone(), value.clone());
                }
            }
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            parts.headers = headers;
            return Ok(Response::from_parts(parts, crate::body::full(bytes::Bytes::new())));
        }
    };
    let (mut parts, body) = resp.into_parts();
    let mut headers = HeaderMap::with_capacity(parts.headers.len());
    let listed = Listed::of(&parts.headers);
    for (name, value) in &parts.headers {
        if name != header::CONTENT_LENGTH
            && passes_downstream(&listed, name.as_str().as_bytes(), value.as_bytes(), &own)
        {
            headers.append(name.clone(), value.clone());
        }
    }
    // One canonical length (hyper accepted `056` or `5, 5`); a HEAD or 304 answer keeps the length it states.
    let length = match framing {
        Framing::Length(n) => Some(n),
        Framing::Empty if parts.status != StatusCode::NO_CONTENT => {
            crate::headers::content_length(&parts.headers).ok().flatten()
        }
        _ => None,
    };
    if let Some(n) = length {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    parts.headers = headers;
    // Trailers pass under the rules headers do: nothing connection-scoped, no Set-Cookie for our cookies.
    let own_names: Vec<String> = own.iter().map(|s| s.to_string()).collect();
    let body = body.map_frame(move |frame| match frame.into_trailers() {
        Ok(trailers) => {
            let own: Vec<&str> = own_names.iter().map(String::as_str).collect();
            let listed = Listed::of(&trailers);
            let mut kept = HeaderMap::with_capacity(trailers.len());
            for (name, value) in &trailers {
                if passes_downstream(&listed, name.as_str().as_bytes(), value.as_bytes(), &own) {
                    kept.append(name.clone(), value.clone());
                }
            }
            http_body::Frame::trailers(kept)
        }
        Err(data) => data,
    });
    let body = body.map_err(Into::into).boxed();
    // Over HTTP/2 a client can hold an answer (and the app's connection) by granting no window: see `stall`.
    let body = if h2 { stall::Guarded::new(body, gw.config().server.send_timeout.0).boxed() } else { body };
    Ok(Response::from_parts(parts, body))
}
