//! Idle upstream connections of the relay, per app and affinity, plain or over TLS.

use super::*;

/// Idle keep-alive connections to one app, private to the identity that used them last.
pub struct Pool {
    pub(super) authority: String,
    /// For an https app: the TLS set-up and the name its certificate must carry.
    tls: Option<(tokio_rustls::TlsConnector, rustls::pki_types::ServerName<'static>)>,
    pub(super) idle: IdlePool<Upstream>,
    /// `[[app]] reuse_after_body`: a connection that carried a request body may go back to the pool.
    pub(super) reuse_after_body: bool,
}

/// A connection to an app, with its read buffer (kept with the connection, so idle clients hold none).
pub(super) struct Upstream {
    pub(super) stream: UpStream,
    pub(super) buf: BytesMut,
}

/// The byte stream to an app: TCP, or TLS over TCP.
pub enum UpStream {
    /// An http app.
    Plain(TcpStream),
    /// An https app.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl UpStream {
    /// Whether an idle connection is still quiet: nothing to read and not closed. End of stream means the app
    /// closed it; bytes mean it spoke unasked (a 408 before closing, a second answer, a TLS alert), and they must
    /// not be taken as the next answer. Peeked at the TCP level, so a TLS stream's records stay where they are;
    /// over TLS, what rustls has already read (decrypted, or records not yet processed) counts too: an unasked
    /// answer that came in the same read as the last one is there, not on the socket.
    fn quiet(&mut self) -> bool {
        let tcp = match self {
            UpStream::Plain(s) => s,
            UpStream::Tls(s) => {
                let (tcp, tls) = s.get_mut();
                match tls.process_new_packets() {
                    Ok(state) if state.plaintext_bytes_to_read() == 0 && !state.peer_has_closed() => tcp,
                    _ => return false,
                }
            }
        };
        let mut probe = [0u8; 1];
        futures_util::FutureExt::now_or_never(tcp.peek(&mut probe)).is_none()
    }
}

impl UpStream {
    /// Sends what a TLS stream holds back until flushed (plain TCP writes go out at once: nothing to do).
    pub(super) async fn flush_tls(&mut self) -> io::Result<()> {
        match self {
            UpStream::Plain(_) => Ok(()),
            UpStream::Tls(s) => s.flush().await,
        }
    }
}

impl AsyncRead for UpStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpStream::Plain(s) => Pin::new(s).poll_write(cx, data),
            UpStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, data),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl Pool {
    /// A pool for an upstream `host[:port]` of at most `max_idle` connections; with `tls`, an https app (port 443
    /// when none is given, else 80); `reuse_after_body`: a connection that carried a body may be used again.
    pub fn new(
        authority: &http::uri::Authority,
        tls: Option<(tokio_rustls::TlsConnector, rustls::pki_types::ServerName<'static>)>,
        max_idle: usize,
        reuse_after_body: bool,
    ) -> Pool {
        let port = authority.port_u16().unwrap_or(if tls.is_some() { 443 } else { 80 });
        let authority = format!("{}:{port}", authority.host());
        Pool { authority, tls, idle: IdlePool::new(max_idle), reuse_after_body }
    }

    /// The most recently used idle connection of `who` that is not too old and still quiet.
    pub(super) fn checkout(&self, who: &Affinity, now: Instant) -> Option<Upstream> {
        self.idle.checkout(who, now, |up| {
            let quiet = up.stream.quiet();
            if !quiet {
                tracing::debug!("dropping a pooled upstream connection the app closed or spoke on");
            }
            quiet
        })
    }

    pub(super) fn checkin(&self, who: Affinity, stream: Upstream) {
        self.idle.checkin(who, stream);
    }

    pub(super) async fn connect(&self) -> io::Result<Upstream> {
        let timed_out = |what: &str| io::Error::new(io::ErrorKind::TimedOut, format!("{what} timed out"));
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.authority.as_str()))
            .await
            .map_err(|_| timed_out("connecting to the app"))??;
        tcp.set_nodelay(true)?;
        let stream = match &self.tls {
            None => UpStream::Plain(tcp),
            Some((connector, name)) => {
                let tls = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name.clone(), tcp))
                    .await
                    .map_err(|_| timed_out("the TLS handshake with the app"))??;
                UpStream::Tls(Box::new(tls))
            }
        };
        Ok(Upstream { stream, buf: BytesMut::new() })
    }
}
