//! An HTTP/2 answer whose client stops granting flow-control window (RFC 9113 §5.2). Such a client still answers
//! PINGs, so the connection looks alive, and hyper, with no window to send into, stops asking the app's body for
//! more: nothing is written, so no write stalls either (`server::SendTimeout`), and the app's connection would be
//! held for as long as the client likes. [`Guarded`] notices that the answer has waited on the client, not on the
//! app, for `send_timeout`, and then lets go of the app's body (its connection closes); the stream is reset the next
//! time hyper asks.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use crate::Body;

/// What the answer and its watchdog share.
struct Shared {
    /// The app's body; taken (and so dropped) by the watchdog when the client stalls.
    body: Mutex<Option<Body>>,
    /// Polls so far: the watchdog sees progress as a change.
    polls: AtomicU64,
    /// The last poll handed out a frame: the answer waits on the client to take it, not on the app.
    holding: AtomicBool,
    /// The answer ended or was dropped: the watchdog stops.
    done: AtomicBool,
}

/// The app's answer to an HTTP/2 client, let go of when that client grants no window for `limit`.
pub struct Guarded {
    shared: Arc<Shared>,
    limit: Duration,
    armed: bool,
}

impl Guarded {
    /// Guards `body`; the watchdog starts once the answer has more than its first frame to send.
    pub fn new(body: Body, limit: Duration) -> Guarded {
        let shared = Shared {
            body: Mutex::new(Some(body)),
            polls: AtomicU64::new(0),
            holding: AtomicBool::new(false),
            done: AtomicBool::new(false),
        };
        Guarded { shared: Arc::new(shared), limit, armed: false }
    }

    fn arm(&mut self) {
        self.armed = true;
        let (shared, limit) = (self.shared.clone(), self.limit);
        tokio::spawn(async move {
            let mut seen = shared.polls.load(Ordering::Acquire);
            loop {
                tokio::time::sleep(limit).await;
                if shared.done.load(Ordering::Acquire) {
                    return;
                }
                let now = shared.polls.load(Ordering::Acquire);
                if now == seen && shared.holding.load(Ordering::Acquire) {
                    tracing::info!(limit = ?limit, "an HTTP/2 client took no more of an answer: the app's connection is let go");
                    drop(shared.body.lock().unwrap_or_else(PoisonError::into_inner).take());
                    return;
                }
                seen = now;
            }
        });
    }
}

impl http_body::Body for Guarded {
    type Data = bytes::Bytes;
    type Error = crate::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        this.shared.polls.fetch_add(1, Ordering::AcqRel);
        let (polled, more) = {
            let mut slot = this.shared.body.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(body) = slot.as_mut() else {
                return Poll::Ready(Some(Err("the client took no more of the answer for send_timeout".into())));
            };
            let polled = Pin::new(&mut *body).poll_frame(cx);
            (polled, !body.is_end_stream())
        };
        match &polled {
            Poll::Ready(Some(Ok(_))) => {
                this.shared.holding.store(true, Ordering::Release);
                if more && !this.armed {
                    this.arm();
                }
            }
            Poll::Pending => this.shared.holding.store(false, Ordering::Release),
            Poll::Ready(_) => this.shared.done.store(true, Ordering::Release),
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.shared.body.lock().unwrap_or_else(PoisonError::into_inner).as_ref().is_some_and(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.shared.body.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            Some(b) => b.size_hint(),
            None => http_body::SizeHint::default(),
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.shared.done.store(true, Ordering::Release);
    }
}
