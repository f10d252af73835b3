//! The gateway's shared state: configuration, store, keys, sessions, upstream clients, templates and metrics,
//! built at start and rebuilt (sharing what outlives it) on a config reload. The request flow is in
//! [`crate::router`].

use std::net::SocketAddr;
use std::sync::Arc;

use crate::accounts::Accounts;
use crate::client::Client;
use crate::clock::Clock;
use crate::config::Config;
use crate::credentials::password::Hasher;
use crate::headers::Headers;
use crate::keys::Keys;
use crate::mail::Outbox;
use crate::notify::Notifier;
use crate::pages::Pages;
use crate::proxy::Upstreams;
use crate::session::{SessionCache, Sessions};
use crate::store::Store;

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
    /// Account operations (with the mail queue their notices go through).
    pub accounts: Accounts,
    /// Sessions: create, rotate, authenticate (the cache inside is shared across reloads), end.
    pub sessions: Sessions,
    /// The session cache, kept to hand to the next reload's [`Sessions`].
    shared_cache: Arc<SessionCache>,
    /// The CSRF cookie's name, worked out once.
    csrf_cookie: String,
}

impl Gateway {
    /// Builds a gateway: opens the store, loads keys, prepares TLS, templates and upstream clients.
    pub async fn build(config: Config, clock: Arc<dyn Clock>) -> Result<Gateway, Error> {
        let store = Store::from_config(&config.storage)
            .await
            .map_err(|source| Error::Store { path: config.storage.display_name(), source })?;
        store.listen_for_wakeups(&config.storage);
        let keys = Keys::load_or_create(&config.storage.secret_key_file)?;
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let hasher = Hasher::new(config.server.max_concurrent_hashes.unwrap_or((cores / 2).clamp(1, 4)))?;
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let cache = Arc::new(SessionCache::new(metrics.cache_fills.clone(), metrics.cache_flushes.clone()));
        let shared = Shared { store, keys, clock, hasher, tunnels: Arc::default(), metrics, cache };
        Gateway::assemble(config, shared)
    }

    /// A gateway for a reloaded config, sharing this one's store, keys, clock, hasher, tunnels and metrics.
    /// Storage settings can't change without a restart; they are kept.
    pub fn reload(&self, mut config: Config) -> Result<Gateway, Error> {
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
            cache: self.shared_cache.clone(),
        };
        Gateway::assemble(config, shared)
    }

    fn assemble(config: Config, shared: Shared) -> Result<Gateway, Error> {
        let tls_acceptor = match (&config.server.tls_cert, &config.server.tls_key) {
            (Some(cert), Some(key)) => Some(crate::tls::tls_acceptor(cert, key)?),
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
        let mailer = crate::mail::Mailer::start(&config.mail).map_err(Error::Mail)?;
        let notifier =
            Notifier::new(shared.store.clone(), Outbox::Queue(mailer), &config.portal.title, config.mail_ready());
        let accounts = Accounts::new(
            &config,
            shared.store.clone(),
            shared.keys.clone(),
            shared.clock.clone(),
            shared.hasher.clone(),
            notifier,
        );
        Ok(Gateway {
            sessions: Sessions::new(
                shared.store.clone(),
                shared.keys.clone(),
                shared.clock.clone(),
                shared.cache.clone(),
                &config.session,
            ),
            accounts,
            pages: Pages::new(config.portal.templates.clone(), &config.portal.title, &config.server.portal_prefix.0),
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
            shared_cache: shared.cache,
            csrf_cookie: config.csrf_cookie_name(),
            config,
        })
    }

    /// Records a security event: tracing at once, then the store. A failed write is logged, not fatal.
    pub async fn audit(&self, event: crate::audit::AuditEvent) {
        self.accounts.audit(event).await
    }

    /// Records how a request ended, whichever lane served it: the one place every request's outcome is written
    /// (the per-app request counter and upstream latency today).
    pub fn finished(&self, outcome: &crate::metrics::Outcome<'_>) {
        let Some(handles) = self.app_metrics.get(outcome.slot) else { return };
        if let Some(upstream) = outcome.upstream {
            handles.upstream(upstream);
        }
        handles.request(outcome.status);
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
        self.sessions.secure_cookies(client.https)
    }

    /// The client of a request from `peer` ([`Client::of`] under this config's trusted proxies).
    pub fn client<H: Headers + ?Sized>(&self, peer: SocketAddr, headers: &H) -> Client {
        Client::of(&self.config.server.trusted_proxies, self.tls, peer, headers)
    }
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Storage can't be opened.
    #[error("storage {path}: {source}")]
    Store {
        /// The redb file.
        path: String,
        /// Why.
        source: crate::store::StoreError,
    },
    /// The secret key can't be loaded.
    #[error(transparent)]
    Key(#[from] crate::keys::KeyError),
    /// TLS can't be set up.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// An upstream client can't be built.
    #[error(transparent)]
    Upstream(#[from] crate::proxy::UpstreamError),
    /// Password hashing doesn't work.
    #[error(transparent)]
    Password(#[from] crate::credentials::password::PasswordError),
    /// Mail can't be set up.
    #[error("mail: {0}")]
    Mail(crate::mail::MailError),
    /// A listener can't be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
}

/// The parts of a gateway that outlive a config reload.
struct Shared {
    store: Store,
    keys: Keys,
    clock: Arc<dyn Clock>,
    hasher: Hasher,
    tunnels: Arc<crate::proxy::tunnels::Tunnels>,
    metrics: Arc<crate::metrics::Metrics>,
    cache: Arc<SessionCache>,
}
