//! The listener: accepts connections, terminates TLS (ALPN h2 + http/1.1), serves HTTP/1.1 and HTTP/2 with
//! upgrades, and shuts down gracefully, letting in-flight requests and tunnels finish within the grace period.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::gateway::Gateway;
use crate::proxy::relay::{self, Outcome};
use crate::router::handle;

/// Time a client has to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Raises the soft limit on open files to the hard limit (systemd's default soft limit is 1,024: a thousand idle
/// clients would leave no descriptor for `accept`), and returns the limit now in force.
pub fn raise_nofile_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-files limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft)
        }
    }
}

/// The most client connections served at once: `[server] max_connections`, or three quarters of the open-files
/// limit (the rest is for upstream connections, the store and the listeners).
pub fn connection_cap(configured: Option<usize>, nofile: u64) -> usize {
    configured.unwrap_or_else(|| usize::try_from(nofile / 4 * 3).unwrap_or(usize::MAX).max(16))
}

/// The live client connections, so that at the cap the idle ones can be asked to make room.
#[derive(Default)]
struct Connections {
    live: std::sync::Mutex<std::collections::BTreeMap<u64, Slot>>,
    next: std::sync::atomic::AtomicU64,
}

/// One live connection.
struct Slot {
    /// Closes it: at once when idle, after its answer otherwise.
    shed: CancellationToken,
    /// Waiting for its next request (a kept-alive connection on the relay).
    idle: Arc<std::sync::atomic::AtomicBool>,
}

/// A connection's place in [`Connections`], freed when it ends.
struct Registered {
    id: u64,
    all: Arc<Connections>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.all.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

impl Connections {
    fn register(self: &Arc<Self>, shed: CancellationToken, idle: Arc<std::sync::atomic::AtomicBool>) -> Registered {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(id, Slot { shed, idle });
        Registered { id, all: self.clone() }
    }

    fn count(&self) -> usize {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Asks one connection to close: the oldest idle one, else the oldest. False when none is left to ask.
    fn shed_one(&self) -> bool {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let pick = live
            .iter()
            .find(|(_, s)| s.idle.load(std::sync::atomic::Ordering::Relaxed))
            .or_else(|| live.iter().find(|(_, s)| !s.shed.is_cancelled()))
            .map(|(id, _)| *id);
        match pick.and_then(|id| live.remove(&id)) {
            Some(slot) => {
                slot.shed.cancel();
                true
            }
            None => false,
        }
    }
}

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
    // An h2 client that stops reading stalls on flow control, not on a socket write (`SendTimeout`): PINGs while
    // streams are open, answered within `send_timeout`, find it, and the connection (and the apps' behind it) end.
    let send_timeout = gw.config.server.send_timeout.0;
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(Some(send_timeout)).keep_alive_timeout(send_timeout);
    let cap = connection_cap(gw.config.server.max_connections, raise_nofile_limit());
    // Tells every connection to close when shutdown begins: idle ones at once, busy ones after their answer.
    let stop = CancellationToken::new();
    let tasks = tokio_util::task::TaskTracker::new();
    let live = Arc::new(Connections::default());
    let mut warned: Option<std::time::Instant> = None;
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
        if live.count() >= cap {
            // A flood degrades service instead of starving accept: idle kept-alive connections make room first.
            if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                tracing::warn!(max_connections = cap, "connection limit reached; closing idle connections first");
                warned = Some(std::time::Instant::now());
            }
            if !live.shed_one() {
                drop(stream);
                continue;
            }
        }
        let _ = stream.set_nodelay(true);
        let stream = SendTimeout::new(stream, current.load().config.server.send_timeout.0);
        // Each connection uses the TLS set-up current when it arrives; each request, the current config.
        let tls = current.load().tls_acceptor.clone();
        let current = current.clone();
        let builder = builder.clone();
        let shed = stop.child_token();
        let idle = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let registered = live.register(shed.clone(), idle.clone());
        let task = async move {
            let _registered = registered;
            let Some(acceptor) = tls else {
                return relay_then_hyper(current, stream, peer, &shed, &idle, &builder).await;
            };
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                // HTTP/2 (chosen by ALPN) is hyper's; HTTP/1.1 starts on the relay.
                Ok(Ok(s)) if s.get_ref().1.alpn_protocol() == Some(b"h2") => {
                    Box::pin(serve_hyper(current, s, peer, &builder, &shed)).await;
                }
                Ok(Ok(s)) => Box::pin(relay_then_hyper(current, s, peer, &shed, &idle, &builder)).await,
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => {}
            }
        };
        tasks.spawn(task);
    }
    stop.cancel();
    drop(listener);
    tracing::info!("shutting down: waiting for in-flight requests");
    let gw = current.load_full();
    let grace = gw.config.server.shutdown_grace.0;
    tasks.close();
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        tracing::warn!("grace period over; closing remaining connections");
    }
    gw.tunnels.close();
    let _ = tokio::time::timeout(grace, gw.tunnels.wait()).await;
}

/// A client connection whose writes may stall at most `limit` (`[server] send_timeout`, as nginx's): a client
/// that stops reading would otherwise hold its connection, and the app's connection behind it, for as long as it
/// stays connected. Past the limit the write fails, and whichever lane serves the connection closes both.
struct SendTimeout<IO> {
    io: IO,
    limit: Duration,
    /// The stall timer, kept for reuse; armed while a write waits.
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    armed: bool,
}

impl<IO> SendTimeout<IO> {
    fn new(io: IO, limit: Duration) -> SendTimeout<IO> {
        SendTimeout { io, limit, timer: None, armed: false }
    }

    /// Passes on a write's result; a write still waiting when the limit has passed since it began to wait fails.
    fn watch<T>(&mut self, cx: &mut Context<'_>, polled: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        if polled.is_ready() {
            self.armed = false;
            return polled;
        }
        let deadline = tokio::time::Instant::now() + self.limit;
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.armed {
            timer.as_mut().reset(deadline);
            self.armed = true;
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the client stopped reading")))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for SendTimeout<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for SendTimeout<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.watch(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.watch(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Serves a connection on the relay first ([`relay::serve`]); hyper takes over when a request needs it.
async fn relay_then_hyper<IO>(
    current: Arc<arc_swap::ArcSwap<Gateway>>,
    io: IO,
    peer: SocketAddr,
    shed: &CancellationToken,
    idle: &std::sync::atomic::AtomicBool,
    builder: &auto::Builder<TokioExecutor>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Boxed, so the relay's state is freed before hyper's connection (long-lived, often idle) starts.
    match Box::pin(relay::serve(&current, io, peer, shed, idle)).await {
        Outcome::Closed => {}
        // Boxed too: inline, the two states would make every connection's task as large as both.
        Outcome::Handover(io) => Box::pin(serve_hyper(current, io, peer, builder, shed)).await,
        // The tunnel lives while its session does, like one opened on hyper's path.
        Outcome::Tunnel(relay::Tunnel { client, mut app, owner }) => {
            let gw = current.load();
            gw.tunnels.open(owner, &gw.clock, move |traffic| async move {
                let mut client = traffic.count(client);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut app).await;
            });
        }
    }
}

/// A request body from hyper as the handlers' one body type.
fn boxed(body: hyper::body::Incoming) -> crate::Body {
    use http_body_util::BodyExt;
    body.map_err(|e| -> crate::BoxError { Box::new(e) }).boxed()
}

/// Serves a connection with hyper: HTTP/1.1 with upgrades, or HTTP/2. When `shed` fires (shutdown, or the
/// connection cap) it closes gracefully: at once when idle, after the requests in flight otherwise.
async fn serve_hyper<IO>(
    current: Arc<arc_swap::ArcSwap<Gateway>>,
    io: IO,
    peer: SocketAddr,
    builder: &auto::Builder<TokioExecutor>,
    shed: &CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let recorder = current.clone();
    let svc = service_fn(move |req| {
        let gw = current.load_full();
        // Boxed like the relay's own requests (`State::handle`): the handlers take one body type.
        let req = req.map(boxed);
        async move { Ok::<_, Infallible>(handle(gw, peer, req).await) }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let ended = tokio::select! {
        ended = conn.as_mut() => ended,
        () = shed.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
        // A head hyper couldn't parse never reached `handle`: hyper answered it itself (400; 431 for a head too
        // large, 414 for a target too long: hyper's `on_error`), and it is recorded here, so every answer is.
        if let Some(e) = e.downcast_ref::<hyper::Error>().filter(|e| e.is_parse()) {
            let status = match e.is_parse_too_large() {
                true if e.to_string().contains("URI") => 414,
                true => 431,
                false => 400,
            };
            let gw = recorder.load();
            let slot = gw.config.apps.len() + 1;
            let lane = crate::metrics::Lane::Handlers;
            let (user, elapsed, upstream) = (None, Duration::ZERO, None);
            gw.finished(&crate::metrics::Outcome { lane, slot, status, user, elapsed, upstream });
        }
    }
}

/// Serves `GET /metrics` on its own listener (Bearer token checked when `[metrics] token` is set). `current`
/// gives what the running config says at each scrape, so a reload changes the token at once.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    current: impl Fn() -> crate::metrics::Scrape + Clone + Send + Sync + 'static,
) {
    use http::{Response, StatusCode, header};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use subtle::ConstantTimeEq;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let current = current.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let gw = current();
                async move {
                    let authorized = match &gw.token {
                        None => true,
                        Some(token) => {
                            let want = format!("Bearer {token}");
                            let got =
                                req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes()).unwrap_or_default();
                            got.len() == want.len() && bool::from(got.ct_eq(want.as_bytes()))
                        }
                    };
                    let (status, body) = if req.uri().path() != "/metrics" {
                        (StatusCode::NOT_FOUND, "not found\n".to_string())
                    } else if !authorized {
                        (StatusCode::UNAUTHORIZED, "unauthorized\n".to_string())
                    } else {
                        if let Ok(n) = gw.store.count_sessions().await {
                            gw.metrics.active_sessions.set(i64::try_from(n).unwrap_or(i64::MAX));
                        }
                        (StatusCode::OK, gw.metrics.render())
                    };
                    let mut resp = Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
                    *resp.status_mut() = status;
                    resp.headers_mut().insert(
                        header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
                    );
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}
