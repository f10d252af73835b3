//! Upgraded connections (WebSocket tunnels), each tied to the session that opened it.
//!
//! A tunnel outlives the request that opened it, so the per-request session check alone would let it run on after
//! a logout, lock, deletion, 2FA reset or expiry. Every tunnel opened by a session is registered here with that
//! session and the time its session will next need a look (its idle or absolute limit). A watcher
//! ([`crate::watch_tunnels`]) re-reads a tunnel's session whenever the revocation revision moves (a revocation by
//! this process, the CLI or another instance) and whenever that time comes, and closes the tunnel when the session
//! is gone. Both ends are dropped: the client's connection and the app's.
//!
//! Tunnel traffic doesn't keep a session alive: like any other use of the app, the page's own requests do.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
    /// Ends the tunnel.
    stop: CancellationToken,
    /// When its session must be looked at again even without a revocation (unix seconds).
    due: u64,
}

/// A tunnel the watcher should look at.
pub struct Due {
    /// Its id.
    pub tunnel: u64,
    /// Its session.
    pub session: SessionId,
}

impl Tunnels {
    /// Runs `tunnel` (the copy between client and app) until it ends or, when it belongs to `session`, until
    /// the session ends. `due`: when the session reaches its idle or absolute limit (unix seconds).
    pub fn open<F>(&self, session: Option<(SessionId, u64)>, tunnel: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Some((session, due)) = session {
            let live = Live { session, stop: stop.clone(), due };
            self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(id, live);
        }
        let registered = session.is_some();
        let live = self.live.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                () = tunnel => {}
                () = stop.cancelled() => tracing::info!("tunnel closed: its session ended"),
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

    /// Closes a tunnel whose session ended.
    pub fn end(&self, tunnel: u64) {
        if let Some(l) = self.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&tunnel) {
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
