//! Portcullis: a two-factor authentication gateway in front of web applications.
//!
//! A request flows request → [`policy`] → [`session`] → [`portal`] (the gateway's own pages) or [`proxy`]
//! (the application). [`run`] serves on an already-bound listener so tests can start a real gateway on port 0.
//!
//! # Layout
//!
//! Layers, lowest first; a module uses only modules of lower layers (checked by the `layout` integration test):
//!
//! | layer | modules | what |
//! |---|---|---|
//! | 0 | [`files`], [`clock`], [`audit`], [`body`], [`normalize`] | private files, injected time, audit events, the body type, path/host normal forms |
//! | 1 | [`keys`], [`config`], [`pages`], [`tls`] | derived keys; the TOML configuration; templates; TLS settings |
//! | 2 | [`store`], [`mail`] | users, sessions, tokens, counters (redb or PostgreSQL); outgoing mail |
//! | 3 | [`credentials`], [`policy`], [`headers`], [`notify`], [`metrics`] | passwords, TOTP, recovery codes, the lockout rule; the access decision; header rules; security notices; metrics |
//! | 4 | [`client`], [`session`], [`accounts`] | who sent a request; the [`session::Sessions`] service; every account operation, for web, admin and CLI |
//! | 5 | [`respond`] | refusals as HTTP responses, in one place |
//! | 6 | [`gateway`], [`router`], [`portal`], [`proxy`], [`admin`], [`server`], [`cli`], [`demo`] | the shared state, the request flow, pages, proxy paths, admin pages, listeners, commands |
//!
//! Within layer 6, [`proxy`] (the forwarder and the HTTP/1.1 relay lane) still takes `&Gateway` while the gateway
//! state builds its upstream clients: the two request engines are to become one, and their state with them.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod accounts;
pub mod admin;
pub mod audit;
pub mod body;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod credentials;
pub mod demo;
pub mod files;
pub mod gateway;
pub mod headers;
pub mod keys;
pub mod mail;
pub mod metrics;
pub mod normalize;
pub mod notify;
pub mod pages;
pub mod policy;
pub mod portal;
pub mod proxy;
pub mod respond;
pub mod router;
pub mod server;
pub mod session;
pub mod store;
pub mod tls;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::gateway::Gateway;

pub use body::{Body, BoxError};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Storage can't be opened.
    #[error("storage {path}: {source}")]
    Store {
        /// The redb file.
        path: String,
        /// Why.
        source: store::StoreError,
    },
    /// The secret key can't be loaded.
    #[error(transparent)]
    Key(#[from] keys::KeyError),
    /// TLS can't be set up.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// An upstream client can't be built.
    #[error(transparent)]
    Upstream(#[from] proxy::UpstreamError),
    /// Password hashing doesn't work.
    #[error(transparent)]
    Password(#[from] credentials::password::PasswordError),
    /// Mail can't be set up.
    #[error("mail: {0}")]
    Mail(mail::MailError),
    /// A listener can't be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Runs the gateway on `listener` until `shutdown` resolves, then lets in-flight requests finish.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    run_with_clock(listener, config, Arc::new(SystemClock), shutdown).await
}

/// [`run`] with an injected clock (tests move time by hand).
pub async fn run_with_clock(
    listener: TcpListener,
    config: Config,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let metrics_listen = config.metrics.listen;
    let gw = Arc::new(arc_swap::ArcSwap::from_pointee(Gateway::build(config, clock).await?));
    let mut background = vec![
        tokio::spawn(sweep(gw.clone())),
        tokio::spawn(reload_on_sighup(gw.clone())),
        tokio::spawn(watch_tunnels(gw.clone())),
    ];
    if let Some(addr) = metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr: addr.to_string(), source })?;
        let current = gw.clone();
        let scrape = move || {
            let gw = current.load();
            metrics::Scrape {
                token: gw.config.metrics.token.clone(),
                metrics: gw.metrics.clone(),
                store: gw.store.clone(),
            }
        };
        background.push(tokio::spawn(server::serve_metrics(listener, scrape)));
    }
    server::serve(gw, listener, shutdown).await;
    for task in background {
        task.abort();
    }
    Ok(())
}

/// Re-reads the config file on SIGHUP; an invalid file keeps the running config and says why.
async fn reload_on_sighup(gw: Arc<arc_swap::ArcSwap<Gateway>>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        let current = gw.load_full();
        let Some(path) = current.config.source.clone() else {
            tracing::warn!("SIGHUP: the config did not come from a file; nothing to reload");
            continue;
        };
        let next =
            Config::load(&path).map_err(|e| e.to_string()).and_then(|c| current.reload(c).map_err(|e| e.to_string()));
        match next {
            Ok(new) => {
                gw.store(Arc::new(new));
                tracing::info!(config = %path.display(), "configuration reloaded");
            }
            Err(e) => tracing::error!(error = %e, "reload failed; still running the previous configuration"),
        }
    }
}

/// How often the tunnel watcher looks for revocations: well inside the ~1 s revocation bound.
const TUNNEL_CHECK: std::time::Duration = std::time::Duration::from_millis(250);

/// Closes every upgraded tunnel whose session ended ([`proxy::tunnels`]): on each move of the revocation revision
/// (here, the CLI or another instance) every tunnel's session is read again; otherwise a tunnel's session is
/// read right after the tunnel opens and when it reaches its idle or absolute limit. Tunnels the client used
/// refresh their sessions first.
async fn watch_tunnels(gw: Arc<arc_swap::ArcSwap<Gateway>>) {
    let mut tick = tokio::time::interval(TUNNEL_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut seen = None;
    loop {
        tick.tick().await;
        let gw = gw.load_full();
        if gw.tunnels.count() == 0 {
            seen = None;
            continue;
        }
        // An unreadable revision counts as moved: every tunnel's session is checked (and fails closed).
        let revision = gw.store.revision().ok();
        let all = revision.is_none() || revision != seen;
        seen = revision;
        let now = gw.clock.now();
        // Traffic through a tunnel is use of the app: it refreshes the session before any look at its limits.
        for (session, at) in gw.tunnels.active(gw.sessions.touch_every()) {
            gw.sessions.refresh(session, at).await;
            gw.metrics.tunnel_refreshes.inc();
        }
        for due in gw.tunnels.due(now, all) {
            match gw.sessions.recheck(due.session, now).await {
                Ok(next) => gw.tunnels.extend(due.tunnel, next),
                Err(why) => gw.tunnels.end(due.tunnel, why),
            }
        }
    }
}

/// Deletes expired sessions and old audit events every few minutes, so neither grows without bound.
async fn sweep(gw: Arc<arc_swap::ArcSwap<Gateway>>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(300));
    loop {
        tick.tick().await;
        let gw = gw.load_full();
        let s = &gw.config.session;
        let now = gw.clock.now();
        if let Err(e) = gw.store.purge_sessions(now, s.idle_timeout.secs(), s.max_lifetime.secs()).await {
            tracing::warn!(error = %e, "session sweep failed");
        }
        let before = now.saturating_sub(gw.config.audit.retention.secs());
        if let Err(e) = gw.store.purge_audit(before).await {
            tracing::warn!(error = %e, "audit sweep failed");
        }
    }
}
