//! Idle upstream connections of the relay, per app and affinity.

use super::*;

/// Idle keep-alive connections to one plain-HTTP app, private to the identity that used them last.
pub struct Pool {
    pub(super) authority: String,
    pub(super) idle: IdlePool<Upstream>,
}

/// A connection to an app, with its read buffer (kept with the connection, so idle clients hold none).
pub(super) struct Upstream {
    pub(super) stream: TcpStream,
    pub(super) buf: BytesMut,
}

impl Pool {
    /// A pool for an upstream `host[:port]` (port 80 when none is given) of at most `max_idle` connections.
    pub fn new(authority: &http::uri::Authority, max_idle: usize) -> Pool {
        let authority = format!("{}:{}", authority.host(), authority.port_u16().unwrap_or(80));
        Pool { authority, idle: IdlePool::new(max_idle) }
    }

    /// The most recently used idle connection of `who` that is not too old and still quiet.
    pub(super) fn checkout(&self, who: &Affinity, now: Instant) -> Option<Upstream> {
        self.idle.checkout(who, now, |up| {
            // An idle connection must have nothing to read. End of stream means the app closed it; bytes mean it
            // spoke unasked (a 408 before closing, say), and they must not be taken as the next answer.
            let mut probe = [0u8; 1];
            match up.stream.try_read(&mut probe) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
                _ => {
                    tracing::debug!("dropping a pooled upstream connection the app closed or spoke on");
                    false
                }
            }
        })
    }

    pub(super) fn checkin(&self, who: Affinity, stream: Upstream) {
        self.idle.checkin(who, stream);
    }

    pub(super) async fn connect(&self) -> io::Result<Upstream> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.authority.as_str()))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connecting to the app timed out"))??;
        stream.set_nodelay(true)?;
        Ok(Upstream { stream, buf: BytesMut::new() })
    }
}
