//! Upgraded connections (WebSocket tunnels), each tied to the session that opened it.
//!
//! A tunnel outlives the request that opened it, so the per-request session check alone would let it run on after
//! a logout, lock, deletion, 2FA reset or expiry. Every tunnel opened by a session is registered here with that
//! session, and a watcher (in [`crate::start`]) re-reads a tunnel's session whenever the revocation revision
//! moves (a revocation by this process, the CLI or another instance), whenever its session reaches its idle or
//! absolute limit, and once right after it opens: the session was checked before the app answered the handshake,
//! and a revocation in between would otherwise go unseen until the idle limit. A tunnel whose session is gone is
//! closed at both ends: the client's connection and the app's.
//!
//! What the client sends through a tunnel is use of the app, as a plain request is: it keeps the session alive
//! (refreshed at most once per touch interval), so someone working all day in a dashboard isn't cut off.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::Clock;
use crate::session::SessionId;

/// The open tunnels.
#[derive(Default)]
pub struct Tunnels {
    /// Every tunnel task, so shutdown can wait for them.
    tracker: TaskTracker,
    /// The tunnels opened by a session (bypass tunnels belong to nobody and aren't listed).
    live: Arc<Mutex<HashMap<u64, Live>>>,
    /// Ids for `live`.
    next: AtomicU64,
}

/// One registered tunnel.
struct Live {
    session: SessionId,
    /// Whose session it is, for the log line that says why it closed.
    user: Arc<str>,
    /// Ends the tunnel.
    stop: CancellationToken,
    /// When its session must be looked at again even without a revocation (unix seconds; 0: at once).
    due: u64,
    /// When the client last sent something through it ([`Traffic`]; unix seconds).
    active: Arc<AtomicU64>,
    /// The time the tunnel last refreshed its session with.
    touched: u64,
}

/// A tunnel the watcher should look at.
pub struct Due {
    /// Its id.
    pub tunnel: u64,
    /// Its session.
    pub session: SessionId,
}

/// Notes when the client last sent something through a tunnel: wrap the client's side of the copy in
/// [`Traffic::count`].
pub struct Traffic {
    clock: Arc<dyn Clock>,
    active: Arc<AtomicU64>,
}

impl Traffic {
    /// The client's stream, watched.
    pub fn count<IO>(self, io: IO) -> Counted<IO> {
        Counted { io, clock: self.clock, active: self.active }
    }
}

/// A stream whose reads note the time ([`Traffic`]).
pub struct Counted<IO> {
    io: IO,
    clock: Arc<dyn Clock>,
    active: Arc<AtomicU64>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Counted<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            let now = this.clock.now();
            if this.active.load(Ordering::Relaxed) != now {
                this.active.store(now, Ordering::Relaxed);
            }
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Counted<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, data)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl Tunnels {
    /// Runs `tunnel` (the copy between client and app, which watches the client's side with the [`Traffic`] it is
    /// given) until it ends or, when it belongs to `owner` (a session and its user's name), until the session ends.
    /// A registered tunnel is due a look at once (see the module doc).
    pub fn open<F>(
        &self,
        owner: Option<(SessionId, Arc<str>)>,
        clock: &Arc<dyn Clock>,
        tunnel: impl FnOnce(Traffic) -> F,
    ) where
        F: Future<Output = ()> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let now = clock.now();
        let traffic = Traffic { clock: clock.clone(), active: Arc::new(AtomicU64::new(now)) };
        let registered = owner.is_some();
        if let Some((session, user)) = owner {
            let live = Live { session, user, stop: stop.clone(), due: 0, active: traffic.active.clone(), touched: now };
            self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(id, live);
        }
        let tunnel = tunnel(traffic);
        let live = self.live.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                () = tunnel => {}
                () = stop.cancelled() => {}
            }
            if registered {
                live.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            }
        });
    }

    /// How many tunnels belong to a session.
    pub fn count(&self) -> usize {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The tunnels to look at: all of them when `all` (the revocation revision moved), else those whose time
    /// came by `now`.
    pub fn due(&self, now: u64, all: bool) -> Vec<Due> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.iter()
            .filter(|(_, l)| all || now >= l.due)
            .map(|(&tunnel, l)| Due { tunnel, session: l.session })
            .collect()
    }

    /// The tunnel's session is still valid until `due`.
    pub fn extend(&self, tunnel: u64, due: u64) {
        if let Some(l) = self.live.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&tunnel) {
            l.due = due;
        }
    }

    /// The sessions whose tunnels carried client traffic at least `every` seconds after they last refreshed
    /// them: to be refreshed, with the time of that traffic.
    pub fn active(&self, every: u64) -> Vec<(SessionId, u64)> {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let mut refresh: Vec<(SessionId, u64)> = Vec::new();
        for l in live.values_mut() {
            let active = l.active.load(Ordering::Relaxed);
            // Traffic at or past the session's limit (as last looked at) can't revive it: the look due then
            // decides, and a session refreshed meanwhile by a request is refreshed here at the next pass.
            let late = l.due != 0 && active >= l.due;
            if !late && active >= l.touched.saturating_add(every) {
                l.touched = active;
                match refresh.iter_mut().find(|(s, _)| *s == l.session) {
                    Some((_, at)) => *at = (*at).max(active),
                    None => refresh.push((l.session, active)),
                }
            }
        }
        refresh
    }

    /// Closes a tunnel whose session ended, saying whose it was and `why`.
    pub fn end(&self, tunnel: u64, why: &str) {
        if let Some(l) = self.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&tunnel) {
            tracing::info!(user = %l.user.escape_debug(), reason = why, "tunnel closed: its session ended");
            l.stop.cancel();
        }
    }

    /// Shutdown: no new tunnels; see [`Tunnels::wait`].
    pub fn close(&self) {
        self.tracker.close();
    }

    /// Waits until every tunnel has ended.
    pub async fn wait(&self) {
        self.tracker.wait().await;
    }
}
