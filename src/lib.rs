//! Portcullis: a two-factor authentication gateway in front of web applications.
//!
//! A request flows request → [`policy`] → [`session`] → [`portal`] (the gateway's own pages) or [`proxy`]
//! (the application). [`run`] serves on an already-bound listener so tests can start a real gateway on port 0.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cli;
pub mod clock;
pub mod config;
pub mod credentials;
pub mod demo;
pub mod gateway;
pub mod keys;
pub mod policy;
pub mod portal;
pub mod proxy;
pub mod respond;
pub mod server;
pub mod session;
pub mod store;

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use tokio::net::TcpListener;

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::gateway::Gateway;

/// Any error a body can carry.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The response body type: our own pages and streamed upstream bodies alike.
pub type Body = BoxBody<Bytes, BoxError>;

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
    Tls(#[from] server::TlsError),
    /// An upstream client can't be built.
    #[error(transparent)]
    Upstream(#[from] proxy::UpstreamError),
    /// Password hashing doesn't work.
    #[error(transparent)]
    Password(#[from] credentials::password::PasswordError),
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
    let tls = match (&config.server.tls_cert, &config.server.tls_key) {
        (Some(cert), Some(key)) => Some(server::tls_acceptor(cert, key)?),
        _ => None,
    };
    let gw = Arc::new(build_gateway(config, clock, tls.is_some())?);
    let sweeper = tokio::spawn(sweep_sessions(gw.clone()));
    server::serve(gw, listener, tls, shutdown).await;
    sweeper.abort();
    Ok(())
}

fn build_gateway(config: Config, clock: Arc<dyn Clock>, tls: bool) -> Result<Gateway, Error> {
    let path = config.storage.path.clone();
    let store = store::Store::open(&path).map_err(|source| Error::Store {
        path: path.display().to_string(),
        source,
    })?;
    let keys = keys::Keys::load_or_create(&config.storage.secret_key_file)?;
    Ok(Gateway {
        hasher: credentials::password::Hasher::new(config.server.max_concurrent_hashes)?,
        lockout: credentials::lockout::Lockout::new(&config.limits),
        pages: portal::pages::Pages::new(config.portal.templates.clone()),
        upstreams: proxy::Upstreams::new(&config)?,
        tunnels: tokio_util::task::TaskTracker::new(),
        store,
        keys,
        clock,
        tls,
        config,
    })
}

/// Deletes expired sessions every few minutes, so the table doesn't grow without bound.
async fn sweep_sessions(gw: Arc<Gateway>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(300));
    loop {
        tick.tick().await;
        let s = &gw.config.session;
        match gw
            .store
            .purge_sessions(gw.clock.now(), s.idle_timeout.secs(), s.max_lifetime.secs())
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::debug!(sessions = n, "expired sessions removed"),
            Err(e) => tracing::warn!(error = %e, "session sweep failed"),
        }
    }
}
