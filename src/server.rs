//! The listener: accepts connections, terminates TLS (ALPN h2 + http/1.1), serves HTTP/1.1 and HTTP/2 with
//! upgrades, and shuts down gracefully, letting in-flight requests and tunnels finish within the grace period.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::gateway::{Gateway, handle};
use crate::proxy::relay::{self, Outcome};

/// TLS set-up failures.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file can't be read or holds nothing usable.
    #[error("{path}: {why}")]
    Pem {
        /// The file.
        path: String,
        /// Why.
        why: String,
    },
    /// rustls refused the certificate or key.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Builds the TLS acceptor from PEM files.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let pem = |path: &Path, why: String| TlsError::Pem { path: path.display().to_string(), why };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem(cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem(cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(pem(cert, "no certificate found".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| pem(key, e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Time a client has to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts and serves connections until `shutdown` resolves, then drains.
pub async fn serve(
    current: Arc<arc_swap::ArcSwap<Gateway>>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let gw = current.load_full();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(gw.config.server.header_read_timeout.0)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    // Tells connections idling on the relay to close when shutdown begins (hyper's are told by `graceful`).
    let stop = CancellationToken::new();
    let connections = tokio_util::task::TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        // Each connection uses the TLS set-up current when it arrives; each request, the current config.
        let tls = current.load().tls_acceptor.clone();
        let current = current.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let stop = stop.clone();
        let task = async move {
            let Some(acceptor) = tls else {
                return relay_then_hyper(current, stream, peer, &stop, &builder, watcher).await;
            };
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                // HTTP/2 (chosen by ALPN) is hyper's; HTTP/1.1 starts on the relay.
                Ok(Ok(s)) if s.get_ref().1.alpn_protocol() == Some(b"h2") => {
                    Box::pin(serve_hyper(current, s, peer, &builder, watcher)).await;
                }
                Ok(Ok(s)) => Box::pin(relay_then_hyper(current, s, peer, &stop, &builder, watcher)).await,
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => {}
            }
        };
        connections.spawn(task);
    }
    stop.cancel();
    drop(listener);
    tracing::info!("shutting down: waiting for in-flight requests");
    let gw = current.load_full();
    let grace = gw.config.server.shutdown_grace.0;
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!("grace period over; closing remaining connections");
    }
    gw.tunnels.close();
    let _ = tokio::time::timeout(grace, gw.tunnels.wait()).await;
    connections.close();
}

/// Serves a connection on the relay first ([`relay::serve`]); hyper takes over when a request needs it.
async fn relay_then_hyper<IO>(
    current: Arc<arc_swap::ArcSwap<Gateway>>,
    io: IO,
    peer: SocketAddr,
    stop: &CancellationToken,
    builder: &auto::Builder<TokioExecutor>,
    watcher: Watcher,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The watcher is held while the relay serves, so a graceful shutdown waits for its request too.
    // Boxed, so the relay's state is freed before hyper's connection (long-lived, often idle) starts.
    match Box::pin(relay::serve(&current, io, peer, stop)).await {
        Outcome::Closed => drop(watcher),
        // Boxed too: inline, the two states would make every connection's task as large as both.
        Outcome::Handover(io) => Box::pin(serve_hyper(current, io, peer, builder, watcher)).await,
    }
}

/// Serves a connection with hyper: HTTP/1.1 with upgrades, or HTTP/2.
async fn serve_hyper<IO>(
    current: Arc<arc_swap::ArcSwap<Gateway>>,
    io: IO,
    peer: SocketAddr,
    builder: &auto::Builder<TokioExecutor>,
    watcher: Watcher,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let gw = current.load_full();
        async move { Ok::<_, Infallible>(handle(gw, peer, req).await) }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc).into_owned();
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
