//! The reverse proxy: streams requests to the app and responses back, with hop-by-hop headers removed
//! (RFC 9110 §7.6.1), forwarding headers set, identity added from the session only, and WebSocket upgrades
//! tunnelled (RFC 6455 §4 over RFC 9110 §7.8 Upgrade).

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::Body;
use crate::config::{App, Config};
use crate::gateway::{Client, Gateway, request_host};
use crate::policy::Decision;
use crate::respond::Reject;
use crate::store::User;

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
}

type Pooled = HttpClient<HttpsConnector<HttpConnector>, Watched>;

/// The client's request body on its way upstream, noting whether the client broke it (bad chunking, cut short),
/// so that failure is answered as the client's 400 and not blamed on the app as a 502.
pub struct Watched {
    inner: Incoming,
    failed: Arc<std::sync::atomic::AtomicBool>,
}

impl http_body::Body for Watched {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

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

/// One pooled HTTP client per app (each may trust its own CA).
pub struct Upstreams {
    clients: Vec<Pooled>,
}

impl Upstreams {
    /// Builds the clients for every app.
    pub fn new(config: &Config) -> Result<Upstreams, UpstreamError> {
        let native = Arc::new(native_roots());
        let clients = config.apps.iter().map(|app| client_for(app, &native)).collect::<Result<_, _>>()?;
        Ok(Upstreams { clients })
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

fn client_for(app: &App, native: &RootCertStore) -> Result<Pooled, UpstreamError> {
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
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(HttpClient::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .build(https))
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1, plus the legacy Keep-Alive and
/// Proxy-Connection).
const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

// Header names used on every request, built once (parsing a name from a string costs a hash and a copy).
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Removes hop-by-hop headers, including any named in Connection.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in listed.iter().chain(HOP_BY_HOP) {
        headers.remove(name);
    }
    headers.remove(KEEP_ALIVE);
    headers.remove(PROXY_CONNECTION);
}

/// A WebSocket opening handshake (RFC 6455 §4.1): `Connection: upgrade` and `Upgrade: websocket`.
fn is_websocket(headers: &HeaderMap) -> bool {
    let has_token = |name: HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    has_token(header::CONNECTION, "upgrade") && has_token(header::UPGRADE, "websocket")
}

/// Removes the gateway's own cookies from the Cookie header sent upstream.
fn strip_own_cookies(headers: &mut HeaderMap, own: &[&str]) {
    let kept: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|pair| {
            let name = pair.split_once('=').map_or(*pair, |(k, _)| k).trim();
            !pair.is_empty() && !own.contains(&name)
        })
        .map(str::to_string)
        .collect();
    headers.remove(header::COOKIE);
    if !kept.is_empty()
        && let Ok(v) = HeaderValue::from_str(&kept.join("; "))
    {
        headers.insert(header::COOKIE, v);
    }
}

/// Drops upstream Set-Cookie headers that would replace the gateway's cookies.
fn strip_own_set_cookies(headers: &mut HeaderMap, own: &[&str]) {
    let kept: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter(|v| {
            let s = String::from_utf8_lossy(v.as_bytes());
            let name = s.split_once('=').map_or("", |(k, _)| k).trim().to_string();
            !own.contains(&name.as_str())
        })
        .cloned()
        .collect();
    headers.remove(header::SET_COOKIE);
    for v in kept {
        headers.append(header::SET_COOKIE, v);
    }
}

/// Sets X-Forwarded-For / -Proto / -Host; client values are kept only from trusted proxies.
fn set_forwarded(headers: &mut HeaderMap, client: &Client, host: Option<&str>) {
    let peer = client.peer.ip().to_string();
    let xff = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) if client.trusted => format!("{prior}, {peer}"),
        _ => peer,
    };
    if !client.trusted {
        headers.remove(X_FORWARDED_HOST);
        headers.remove(X_FORWARDED_PROTO);
        headers.remove(header::FORWARDED);
        headers.remove(X_REAL_IP);
    }
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert(X_FORWARDED_FOR, v);
    }
    let proto = if client.https { "https" } else { "http" };
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    if !headers.contains_key(X_FORWARDED_HOST)
        && let Some(v) = host.and_then(|h| HeaderValue::from_str(h).ok())
    {
        headers.insert(X_FORWARDED_HOST, v);
    }
    if let Ok(v) = HeaderValue::from_str(&client.addr.to_string()) {
        headers.insert(X_REAL_IP, v);
    }
}

/// A header value from user data; control characters (which can't appear in headers) are dropped.
fn header_value(s: &str) -> Option<HeaderValue> {
    if !s.chars().any(char::is_control) {
        return HeaderValue::from_str(s).ok().or_else(|| HeaderValue::from_bytes(s.as_bytes()).ok());
    }
    let clean: String = s.chars().filter(|c| !c.is_control()).collect();
    HeaderValue::from_bytes(clean.as_bytes()).ok()
}

/// Adds the identity headers from the session's user.
pub fn set_identity(headers: &mut HeaderMap, config: &Config, user: &User) {
    let h = &config.headers;
    let pairs = [
        (&h.user.0, user.username.clone()),
        (&h.email.0, user.email.clone()),
        (&h.name.0, user.display_name.clone()),
        (&h.groups.0, user.groups.join(",")),
    ];
    for (name, value) in pairs {
        if let Some(v) = header_value(&value) {
            headers.insert(name.clone(), v);
        }
    }
}

/// Forwards an allowed request to its app and streams the answer back.
pub async fn forward(
    gw: &Arc<Gateway>,
    client: &Client,
    decision: Decision,
    identity: Option<std::sync::Arc<User>>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Reject> {
    let app = &gw.config.apps[decision.app];
    let path_and_query = match req.uri().query() {
        Some(q) => format!("{}?{}", decision.path, q),
        None => decision.path,
    };
    let uri = Uri::builder()
        .scheme(app.upstream.scheme.clone())
        .authority(app.upstream.authority.clone())
        .path_and_query(path_and_query)
        .build()
        .map_err(|_| Reject::BadRequest("The address could not be understood."))?;
    let host = request_host(&req);
    let websocket = req.version() == Version::HTTP_11 && is_websocket(req.headers());
    let client_upgrade = websocket.then(|| hyper::upgrade::on(&mut req));

    let (mut parts, body) = req.into_parts();
    let headers = &mut parts.headers;
    remove_hop_by_hop(headers);
    if websocket {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    let session_cookie = gw.config.session.cookie_name.0.clone();
    let csrf_cookie = gw.config.csrf_cookie_name();
    let own = [session_cookie.as_str(), csrf_cookie.as_str()];
    strip_own_cookies(headers, &own);
    set_forwarded(headers, client, host.as_deref());
    if let Some(user) = &identity {
        set_identity(headers, &gw.config, user);
    }
    // HTTP/2 clients send :authority, not Host; the upstream speaks HTTP/1.1 and needs Host.
    if let Some(v) = host.as_deref().and_then(|h| HeaderValue::from_str(h).ok()) {
        headers.insert(header::HOST, v);
    }
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let upstream_req = Request::from_parts(parts, Watched { inner: body, failed: failed.clone() });

    let pending = gw.upstreams.clients[decision.app].request(upstream_req);
    let started = std::time::Instant::now();
    let outcome = tokio::time::timeout(app.upstream_timeout.0, pending).await;
    gw.app_metrics[decision.app].upstream(started.elapsed());
    let mut resp = match outcome {
        Err(_) => return Err(Reject::GatewayTimeout),
        Ok(Err(_)) if failed.load(std::sync::atomic::Ordering::Relaxed) => {
            return Err(Reject::BadRequest("The request body was malformed or cut short."));
        }
        Ok(Err(e)) => {
            tracing::warn!(upstream = %app.upstream.authority, error = %e, "upstream request failed");
            return Err(Reject::BadGateway);
        }
        Ok(Ok(r)) => r,
    };

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            return Err(Reject::BadGateway);
        };
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        gw.tunnels.spawn(async move {
            match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok((down, up)) => {
                    let mut down = TokioIo::new(down);
                    let mut up = TokioIo::new(up);
                    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                }
                Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
            }
        });
        let (parts, _) = resp.into_parts();
        return Ok(Response::from_parts(parts, crate::portal::pages::full(bytes::Bytes::new())));
    }

    let (mut parts, body) = resp.into_parts();
    remove_hop_by_hop(&mut parts.headers);
    strip_own_set_cookies(&mut parts.headers, &own);
    Ok(Response::from_parts(parts, body.map_err(Into::into).boxed()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_connection_listed_ones_go() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn own_cookies_are_not_forwarded() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1; portcullis_session=x"));
        h.append(header::COOKIE, HeaderValue::from_static("portcullis_session_csrf=y; b=2"));
        strip_own_cookies(&mut h, &["portcullis_session", "portcullis_session_csrf"]);
        assert_eq!(h.get(header::COOKIE).unwrap(), "a=1; b=2");
    }

    #[test]
    fn upstream_cannot_set_our_cookie() {
        let mut h = HeaderMap::new();
        h.append(header::SET_COOKIE, HeaderValue::from_static("portcullis_session=evil; Path=/"));
        h.append(header::SET_COOKIE, HeaderValue::from_static("app=1"));
        strip_own_set_cookies(&mut h, &["portcullis_session"]);
        assert_eq!(h.get_all(header::SET_COOKIE).iter().count(), 1);
    }
}
