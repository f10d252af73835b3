//! hyper's side of the proxy upstream: HTTP/1.1 client connections to one app (plain or TLS), each kept for
//! the identity that used it last ([`super::pool`]), for requests the relay doesn't carry (bodies, upgrades,
//! HTTP/2 clients, https apps).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::Watched;
use super::pool::{Affinity, IdlePool};
use crate::BoxError;

/// Time allowed to open a TCP connection (and its TLS session) to an app.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a pooled connection may take to say it is ready for the next request.
const READY_TIMEOUT: Duration = Duration::from_secs(1);

/// The client of one app.
pub struct AppClient {
    /// `host:port` to connect to.
    addr: String,
    /// For an https app: the TLS set-up (its trust roots) and the name its certificate must carry.
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    /// Idle connections by identity.
    idle: IdlePool<SendRequest<Watched>>,
}

/// Puts a connection back in its pool once its answer's body has been read to the end.
pub struct Checkin {
    client: Arc<AppClient>,
    who: Affinity,
    sender: SendRequest<Watched>,
}

impl AppClient {
    /// A client for `authority` (`https`: through `tls`), keeping at most `max_idle` idle connections.
    pub fn new(
        authority: &http::uri::Authority,
        tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
        max_idle: usize,
    ) -> AppClient {
        let default_port = if tls.is_some() { 443 } else { 80 };
        AppClient {
            addr: format!("{}:{}", authority.host(), authority.port_u16().unwrap_or(default_port)),
            tls,
            idle: IdlePool::new(max_idle),
        }
    }

    /// Sends `req` for `who` on one of their idle connections or a new one. The [`Checkin`] returns the
    /// connection to the pool when the answer's body has been read (drop it for an upgrade).
    pub async fn request(
        self: &Arc<Self>,
        who: Affinity,
        mut req: Request<Watched>,
    ) -> Result<(Response<Incoming>, Checkin), BoxError> {
        loop {
            let (mut sender, reused) = match self.pooled(&who).await {
                Some(s) => (s, true),
                None => (self.connect().await?, false),
            };
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, Checkin { client: self.clone(), who, sender })),
                // A pooled connection that closed before the request went out: the request is intact, so it
                // goes out once more on a new connection.
                Err(mut e) if reused && e.message().is_some() => {
                    tracing::debug!(error = %e.error(), "pooled upstream connection was closed; reconnecting");
                    req = e.take_message().ok_or("request lost")?;
                }
                Err(e) => return Err(e.into_error().into()),
            }
        }
    }

    /// An idle connection of `who` that is ready for a request.
    async fn pooled(&self, who: &Affinity) -> Option<SendRequest<Watched>> {
        loop {
            let mut sender = self.idle.checkout(who, Instant::now(), |s| !s.is_closed())?;
            if matches!(tokio::time::timeout(READY_TIMEOUT, sender.ready()).await, Ok(Ok(()))) {
                return Some(sender);
            }
        }
    }

    async fn connect(&self) -> Result<SendRequest<Watched>, BoxError> {
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.addr.as_str()))
            .await
            .map_err(|_| "connecting to the app timed out")??;
        tcp.set_nodelay(true)?;
        match &self.tls {
            Some((tls, name)) => {
                let stream = tokio::time::timeout(CONNECT_TIMEOUT, tls.connect(name.clone(), tcp))
                    .await
                    .map_err(|_| "the TLS handshake with the app timed out")??;
                handshake(stream).await
            }
            _ => handshake(tcp).await,
        }
    }
}

/// Starts an HTTP/1.1 client connection on `io`, its driver on a task of its own (upgrades allowed).
async fn handshake<IO>(io: IO) -> Result<SendRequest<Watched>, BoxError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::Builder::new().handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

/// An app's answer body that returns its connection to the pool once read to the end. Dropped earlier (the
/// client went away), the connection is dropped with it.
pub struct Returning {
    inner: Incoming,
    back: Option<Checkin>,
    ended: bool,
}

impl Returning {
    /// `inner`, returning `back` when it ends.
    pub fn new(inner: Incoming, back: Checkin) -> Returning {
        Returning { inner, back: Some(back), ended: false }
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        if let Some(Checkin { client, who, sender }) = self.back.take()
            && (self.ended || self.inner.is_end_stream())
        {
            client.idle.checkin(who, sender);
        }
    }
}

impl http_body::Body for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.ended = true,
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
