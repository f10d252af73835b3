//! The gateway's shared state and the request flow: request → policy → session → portal or proxy.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::{HeaderMap, HeaderName, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::Body;
use crate::clock::Clock;
use crate::config::{Config, Policy, Secure};
use crate::credentials::lockout::Lockout;
use crate::credentials::password::Hasher;
use crate::headers::Headers;
use crate::keys::Keys;
use crate::portal::pages::{Pages, redirect};
use crate::proxy::Upstreams;
use crate::respond::{Reject, reject};
use crate::session::{self, Authenticated, SessionId};
use crate::store::{Level, Store};

/// Everything a request handler needs, shared by all connections.
pub struct Gateway {
    /// The configuration.
    pub config: Config,
    /// Users, sessions, counters.
    pub store: Store,
    /// Derived keys.
    pub keys: Keys,
    /// Injected time.
    pub clock: Arc<dyn Clock>,
    /// Bounded password hashing.
    pub hasher: Hasher,
    /// Lockout rules.
    pub lockout: Lockout,
    /// Templates.
    pub pages: Pages,
    /// One pooled client per app.
    pub upstreams: Upstreams,
    /// Whether the listener terminates TLS.
    pub tls: bool,
    /// Upgraded tunnels (WebSocket), each closed when its session ends; shutdown waits for them.
    pub tunnels: Arc<crate::proxy::tunnels::Tunnels>,
    /// TLS termination, when configured.
    pub tls_acceptor: Option<tokio_rustls::TlsAcceptor>,
    /// Prometheus metrics (shared across reloads).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Metric handles of each app (labelled by its host pattern), then of "portal" and "unknown".
    pub app_metrics: Vec<Arc<crate::metrics::LabelHandles>>,
    /// Outgoing mail queue.
    pub mailer: crate::mail::Mailer,
    /// Session lookups for the proxy hot path (shared across reloads).
    pub cache: Arc<session::SessionCache>,
    /// The CSRF cookie's name, worked out once.
    csrf_cookie: String,
}

/// What the session cache says about a request.
pub enum CacheAnswer {
    /// A cached, still valid session.
    Hit(Authenticated),
    /// No session cookie, or its session just expired.
    NoSession,
    /// Not cached; the store has to be asked (at this revocation revision).
    Miss(u64),
}

/// What a signed-in session may do with an app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// It may use the app.
    Pass,
    /// It owes its second factor (or enrolment): nothing but the portal.
    Pending,
    /// Signed in with the password alone, and the app needs two factors: enrolment first.
    NeedsSecondFactor,
    /// The user's groups don't include one the app requires.
    NotInGroup,
}

/// Whether `auth` may use `app`, whose path needs `needed` (an authenticating policy, not deny or bypass).
pub fn admission(app: &crate::config::App, needed: Policy, auth: &Authenticated) -> Admission {
    match (auth.record.level, needed) {
        (Level::Pending, _) => Admission::Pending,
        (Level::Password, Policy::TwoFactor) => Admission::NeedsSecondFactor,
        _ if !app.groups.is_empty() && !app.groups.iter().any(|g| auth.user.groups.contains(g)) => {
            Admission::NotInGroup
        }
        _ => Admission::Pass,
    }
}

/// What we know about the client of one request.
#[derive(Debug, Clone)]
pub struct Client {
    /// The TCP peer.
    pub peer: SocketAddr,
    /// The client's address: the peer, or what a trusted proxy says.
    pub addr: IpAddr,
    /// Whether the peer is a trusted proxy.
    pub trusted: bool,
    /// Whether the client used https (our TLS, or a trusted proxy's word).
    pub https: bool,
}

impl Gateway {
    /// Builds a gateway: opens the store, loads keys, prepares TLS, templates and upstream clients.
    pub async fn build(config: Config, clock: Arc<dyn Clock>) -> Result<Gateway, crate::Error> {
        let store = Store::from_config(&config.storage)
            .await
            .map_err(|source| crate::Error::Store { path: storage_name(&config.storage), source })?;
        store.listen_for_wakeups(&config.storage);
        let keys = Keys::load_or_create(&config.storage.secret_key_file)?;
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let hasher = Hasher::new(config.server.max_concurrent_hashes.unwrap_or((cores / 2).clamp(1, 4)))?;
        let shared = Shared {
            store,
            keys,
            clock,
            hasher,
            tunnels: Arc::default(),
            metrics: Arc::new(crate::metrics::Metrics::new()),
            cache: Arc::new(session::SessionCache::default()),
        };
        Gateway::assemble(config, shared)
    }

    /// A gateway for a reloaded config, sharing this one's store, keys, clock, hasher, tunnels and metrics.
    /// Storage settings can't change without a restart; they are kept.
    pub fn reload(&self, mut config: Config) -> Result<Gateway, crate::Error> {
        if config.storage.path != self.config.storage.path
            || config.storage.secret_key_file != self.config.storage.secret_key_file
        {
            tracing::warn!("[storage] changes need a restart; keeping the running storage");
            config.storage = self.config.storage.clone();
        }
        let shared = Shared {
            store: self.store.clone(),
            keys: self.keys.clone(),
            clock: self.clock.clone(),
            hasher: self.hasher.clone(),
            tunnels: self.tunnels.clone(),
            metrics: self.metrics.clone(),
            cache: self.cache.clone(),
        };
        Gateway::assemble(config, shared)
    }

    fn assemble(config: Config, shared: Shared) -> Result<Gateway, crate::Error> {
        let tls_acceptor = match (&config.server.tls_cert, &config.server.tls_key) {
            (Some(cert), Some(key)) => Some(crate::server::tls_acceptor(cert, key)?),
            _ => None,
        };
        let mut app_metrics: Vec<_> = config
            .apps
            .iter()
            .map(|a| match &a.host {
                crate::config::HostPattern::Any => shared.metrics.handles("*"),
                crate::config::HostPattern::Exact(h) => shared.metrics.handles(h),
            })
            .collect();
        app_metrics.push(shared.metrics.handles("portal"));
        app_metrics.push(shared.metrics.handles("unknown"));
        let mailer = crate::mail::Mailer::start(&config.mail).map_err(crate::Error::Mail)?;
        Ok(Gateway {
            mailer,
            lockout: Lockout::new(&config.limits),
            pages: Pages::new(config.portal.templates.clone()),
            upstreams: Upstreams::new(&config)?,
            tls: tls_acceptor.is_some(),
            tls_acceptor,
            app_metrics,
            store: shared.store,
            keys: shared.keys,
            clock: shared.clock,
            hasher: shared.hasher,
            tunnels: shared.tunnels,
            metrics: shared.metrics,
            cache: shared.cache,
            csrf_cookie: config.csrf_cookie_name(),
            config,
        })
    }

    /// Records a security event: tracing at once, then the store. A failed write is logged, not fatal.
    pub async fn audit(&self, event: crate::audit::AuditEvent) {
        event.emit();
        if let Err(e) = self.store.append_audit(event).await {
            tracing::error!(error = %e, "could not store an audit event");
        }
    }

    /// The names of the gateway's own cookies (session and CSRF), which never reach an app.
    pub fn own_cookies(&self) -> [&str; 2] {
        [&self.config.session.cookie_name.0, &self.csrf_cookie]
    }

    /// The portal prefix, e.g. `/_portcullis`.
    pub fn prefix(&self) -> &str {
        &self.config.server.portal_prefix.0
    }

    /// Whether cookies set for this client carry `Secure`.
    pub fn secure_cookies(&self, client: &Client) -> bool {
        match self.config.session.secure {
            Secure::Always => true,
            Secure::Never => false,
            Secure::Auto => client.https,
        }
    }

    /// Works out the client from the peer and, only for trusted proxies, X-Forwarded-For / -Proto.
    pub fn client<H: Headers + ?Sized>(&self, peer: SocketAddr, headers: &H) -> Client {
        let trusted = self.is_trusted(peer.ip());
        let mut addr = peer.ip();
        let mut https = self.tls;
        if trusted {
            // The right-most address that isn't one of our proxies is the client (earlier entries are the
            // client's own claims).
            let chain: Vec<IpAddr> = headers
                .values("x-forwarded-for")
                .filter_map(crate::headers::text)
                .flat_map(|v| v.split(','))
                .filter_map(|s| s.trim().parse().ok())
                .collect();
            if let Some(ip) = chain.iter().rev().find(|ip| !self.is_trusted(**ip)).or(chain.first()) {
                addr = *ip;
            }
            if let Some(proto) = headers.first_text("x-forwarded-proto") {
                https = proto.trim().eq_ignore_ascii_case("https");
            }
        }
        Client { peer, addr, trusted, https }
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.config.server.trusted_proxies.iter().any(|net| net.contains(&ip))
    }

    /// The verified session of a request, if any. Expired or orphaned sessions count as none.
    /// Refreshes last-seen at most once per [`session::touch_interval`], off the request path.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Option<Authenticated>, Reject> {
        match session::session_id(&self.keys, headers, &self.config.session.cookie_name.0) {
            Some(id) => self.load_session(id).await,
            None => Ok(None),
        }
    }

    /// Reads a verified session id's record and user from the store and checks them.
    async fn load_session(&self, id: SessionId) -> Result<Option<Authenticated>, Reject> {
        let Some((record, user)) = self.store.session_with_user(id.0).await? else {
            return Ok(None);
        };
        let auth = Authenticated { id, record: Arc::new(record), user: Arc::new(user) };
        let now = self.clock.now();
        if !self.still_valid(&auth, now) {
            return Ok(None);
        }
        if now >= auth.record.last_seen + self.touch_every() {
            self.touch(id, now);
        }
        Ok(Some(auth))
    }

    /// [`Gateway::authenticate`] through the in-memory cache: the proxy hot path. A hit costs a map lookup of the
    /// signed cookie value and a check of the in-memory revocation revision: no signature check, no store read.
    pub async fn authenticate_cached<H: Headers + ?Sized>(&self, headers: &H) -> Result<Option<Authenticated>, Reject> {
        let revision = match self.cached_session(headers)? {
            CacheAnswer::Hit(auth) => return Ok(Some(auth)),
            CacheAnswer::NoSession => return Ok(None),
            CacheAnswer::Miss(revision) => revision,
        };
        let name = &self.config.session.cookie_name.0;
        let Some((id, raw)) = session::session_id_raw(&self.keys, headers, name) else {
            return Ok(None);
        };
        // Verified once here; the store read doesn't check the signature again.
        let found = self.load_session(id).await?;
        if let Some(auth) = &found {
            self.cache.put(raw, auth, revision);
        }
        Ok(found)
    }

    /// The cache's part of [`Gateway::authenticate_cached`]: synchronous, so the relay can ask it in passing.
    pub fn cached_session<H: Headers + ?Sized>(&self, headers: &H) -> Result<CacheAnswer, Reject> {
        self.cached_session_of(session::cookie_values(headers, &self.config.session.cookie_name.0))
    }

    /// [`Gateway::cached_session`] for the session cookie values already picked from the request.
    pub fn cached_session_of<'a>(&self, raws: impl Iterator<Item = &'a str>) -> Result<CacheAnswer, Reject> {
        let mut raws = raws.peekable();
        if raws.peek().is_none() {
            return Ok(CacheAnswer::NoSession);
        }
        let revision = self.store.revision()?;
        let now = self.clock.now();
        for raw in raws {
            if let session::Lookup::Hit(auth, touch_due) = self.cache.get(raw, revision, now, self.touch_every()) {
                if !self.still_valid(&auth, now) {
                    self.cache.remove(raw);
                    return Ok(CacheAnswer::NoSession);
                }
                if touch_due {
                    self.touch(auth.id, now);
                }
                return Ok(CacheAnswer::Hit(auth));
            }
        }
        Ok(CacheAnswer::Miss(revision))
    }

    /// A tunnel's session, looked at again (see [`crate::proxy::tunnels`]): `Some(when to look next)` while it is
    /// valid; `None` when it ended, expired, or can't be read (fail closed).
    pub async fn tunnel_session(&self, id: SessionId, now: u64) -> Option<u64> {
        let (record, user) = match self.store.session_with_user(id.0).await {
            Ok(found) => found?,
            Err(e) => {
                tracing::warn!(error = %e, "cannot check a tunnel's session; closing the tunnel");
                return None;
            }
        };
        let auth = Authenticated { id, record: Arc::new(record), user: Arc::new(user) };
        self.still_valid(&auth, now).then(|| self.session_due(&auth.record))
    }

    /// When a session reaches its idle or absolute limit, as its record stands (unix seconds).
    pub fn session_due(&self, record: &crate::store::SessionRecord) -> u64 {
        let (idle, max_lifetime) = self.session_limits(record.level);
        record.created.saturating_add(max_lifetime).min(record.last_seen.saturating_add(idle))
    }

    /// The idle and absolute limits of a session at `level` (seconds). A password-only (pending) session exists
    /// just to finish the login: it ends [`PENDING_LIFETIME`] after the password, however it is used.
    fn session_limits(&self, level: Level) -> (u64, u64) {
        let s = &self.config.session;
        match level {
            Level::Pending => {
                (s.idle_timeout.secs().min(PENDING_LIFETIME), s.max_lifetime.secs().min(PENDING_LIFETIME))
            }
            _ => (s.idle_timeout.secs(), s.max_lifetime.secs()),
        }
    }

    /// Checks idle and absolute expiry and the lock flag; an invalid session is deleted.
    fn still_valid(&self, auth: &Authenticated, now: u64) -> bool {
        let (idle, max_lifetime) = self.session_limits(auth.record.level);
        if session::expired(&auth.record, now, idle, max_lifetime) || auth.user.locked {
            self.forget_session(auth.id);
            return false;
        }
        true
    }

    /// How often a session's last-seen is refreshed (from the idle limit).
    fn touch_every(&self) -> u64 {
        session::touch_interval(self.config.session.idle_timeout.secs())
    }

    /// Refreshes last-seen in the background.
    fn touch(&self, id: SessionId, now: u64) {
        let store = self.store.clone();
        tokio::spawn(async move {
            if let Err(e) = store.touch_session(id.0, now).await {
                tracing::warn!(error = %e, "could not refresh session last-seen");
            }
        });
    }

    /// Deletes a session in the background (it is already treated as gone).
    pub fn forget_session(&self, id: SessionId) {
        let store = self.store.clone();
        tokio::spawn(async move {
            if let Err(e) = store.delete_session(id.0).await {
                tracing::warn!(error = %e, "could not delete an expired session");
            }
        });
    }
}

/// How to name the storage in messages (never the database URL: it may hold a password).
pub fn storage_name(s: &crate::config::Storage) -> String {
    match s.backend {
        crate::config::StorageBackend::Redb => s.path.display().to_string(),
        crate::config::StorageBackend::Postgres => "PostgreSQL".to_string(),
    }
}

/// The parts of a gateway that outlive a config reload.
struct Shared {
    store: Store,
    keys: Keys,
    clock: Arc<dyn Clock>,
    hasher: Hasher,
    tunnels: Arc<crate::proxy::tunnels::Tunnels>,
    metrics: Arc<crate::metrics::Metrics>,
    cache: Arc<session::SessionCache>,
}

/// Lifetime of a password-only session from the password, in seconds (idle or not).
pub const PENDING_LIFETIME: u64 = 300;

/// Removes every client-sent identity header ([`crate::headers::is_identity_header`]).
pub fn strip_identity_headers(config: &Config, headers: &mut HeaderMap) {
    let spoofable = |name: &HeaderName| crate::headers::is_identity_header(config, name.as_str().as_bytes());
    if !headers.keys().any(spoofable) {
        return;
    }
    let doomed: Vec<HeaderName> = headers.keys().filter(|n| spoofable(n)).cloned().collect();
    for name in doomed {
        headers.remove(&name);
    }
}

/// Whether a request is from a browser that can follow a redirect to the login page.
fn wants_html(req: &Request<Incoming>) -> bool {
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
pub async fn handle(gw: Arc<Gateway>, peer: SocketAddr, mut req: Request<Incoming>) -> Response<Body> {
    strip_identity_headers(&gw.config, req.headers_mut());
    let client = gw.client(peer, req.headers());
    let portal = crate::portal::owns(gw.prefix(), req.uri().path());
    let app = if portal { None } else { crate::policy::find_app(&gw.config.apps, request_host(&req).as_deref()) };
    let result =
        if portal { crate::portal::handle(&gw, &client, req).await } else { protected(&gw, &client, app, req).await };
    let resp = result.unwrap_or_else(|r| reject(&gw, &r));
    let n = gw.config.apps.len();
    let slot = match app {
        Some(i) => i,
        None if portal => n,
        None => n + 1,
    };
    gw.app_metrics[slot].request(resp.status().as_u16());
    resp
}

/// A request for an application: decide, authenticate, then proxy or send to the login page.
async fn protected(
    gw: &Arc<Gateway>,
    client: &Client,
    app: Option<usize>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Reject> {
    let decision = crate::policy::decide_for(&gw.config, app, req.uri().path()).map_err(|e| match e {
        crate::policy::PolicyError::UnknownHost => Reject::UnknownHost,
        crate::policy::PolicyError::BadPath(why) => Reject::BadRequest(why),
    })?;
    let app = &gw.config.apps[decision.app];
    if !app.allow_get_body && crate::headers::bodyless_method_with_body(&req) {
        return Err(Reject::BadRequest("A GET or HEAD request can't carry a body."));
    }
    let identity = match decision.policy {
        Policy::Deny => return Err(Reject::Denied),
        Policy::Bypass => None,
        needed => {
            let Some(auth) = gw.authenticate_cached(req.headers()).await? else {
                return Ok(send_to(gw, &req, |rd| crate::portal::login_url(gw, rd)));
            };
            match admission(app, needed, &auth) {
                Admission::Pending => {
                    return Ok(send_to(gw, &req, |rd| crate::portal::next_step_url(gw, &auth.user, rd)));
                }
                Admission::NeedsSecondFactor => {
                    return Ok(send_to(gw, &req, |rd| crate::portal::enroll_url(gw, rd)));
                }
                Admission::NotInGroup => return Err(Reject::NotInGroup),
                Admission::Pass => {}
            }
            Some(auth)
        }
    };
    crate::proxy::forward(gw, client, decision, identity, req).await
}

/// The request's host: the URI authority (HTTP/2) or the Host header.
pub fn request_host<B>(req: &Request<B>) -> Option<String> {
    host_of(req.uri(), req.headers())
}

/// The host from a URI authority or, failing that, a Host header.
pub fn host_of(uri: &http::Uri, headers: &HeaderMap) -> Option<String> {
    uri.authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| headers.get(http::header::HOST).and_then(|v| v.to_str().ok()).map(str::to_string))
}

/// Browsers go to the portal page `url(where they were going)`; everything else gets 401.
fn send_to(gw: &Gateway, req: &Request<Incoming>, url: impl FnOnce(&str) -> String) -> Response<Body> {
    if !wants_html(req) {
        return reject(gw, &Reject::Unauthorized);
    }
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    redirect(StatusCode::FOUND, &url(target))
}
