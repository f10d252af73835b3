//! An HTTP/2 answer whose client stops granting flow-control window (RFC 9113 §5.2). Such a client still answers
//! PINGs, so the connection looks alive, and hyper, with no window to send into, stops asking the app's body for
//! more: nothing is written, so no write stalls either (`server::SendTimeout`), and the app's connection would be
//! held for as long as the client likes. [`Guarded`] notices that the answer has waited on the client, not on the
//! app, for `send_timeout`, and then lets go of the app's body (its connection closes); the stream itself stays
//! until the client grants window (hyper then finds the body failed and resets it) or its connection ends.
//!
//! Progress is counted per piece of at most [`PIECE`] bytes (hyper asks for the next piece only once the client's
//! window covers the last), so a slow but steady client keeps showing progress, as a write does over HTTP/1.1.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;

use crate::Body;

/// The most the answer hands hyper at once: one default HTTP/2 frame (RFC 9113 §4.2).
pub const PIECE: usize = 16 * 1024;

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
    /// The watchdog, once armed: stopped when the answer is dropped.
    watchdog: Option<tokio::task::AbortHandle>,
    /// What is left of a data frame larger than a piece.
    rest: Bytes,
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
        Guarded { shared: Arc::new(shared), limit, watchdog: None, rest: Bytes::new() }
    }

    fn arm(&mut self) {
        let (shared, limit) = (self.shared.clone(), self.limit);
        let task = tokio::spawn(async move {
            let mut seen = shared.polls.load(Ordering::Relaxed);
            loop {
                tokio::time::sleep(limit).await;
                if shared.done.load(Ordering::Relaxed) {
                    return;
                }
                let now = shared.polls.load(Ordering::Relaxed);
                if now == seen && shared.holding.load(Ordering::Relaxed) {
                    tracing::info!(limit = ?limit, "an HTTP/2 client took no more of an answer: the app's connection is let go");
                    drop(shared.body.lock().unwrap_or_else(PoisonError::into_inner).take());
                    return;
                }
                seen = now;
            }
        });
        self.watchdog = Some(task.abort_handle());
    }

    /// Hands out the next piece of `self.rest`.
    fn piece(&mut self) -> Frame<Bytes> {
        let n = self.rest.len().min(PIECE);
        Frame::data(self.rest.split_to(n))
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
        this.shared.polls.fetch_add(1, Ordering::Relaxed);
        if !this.rest.is_empty() {
            this.shared.holding.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Ok(this.piece())));
        }
        let (polled, more) = {
            let mut slot = this.shared.body.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(body) = slot.as_mut() else {
                return Poll::Ready(Some(Err("the client took no more of the answer for send_timeout".into())));
            };
            let polled = Pin::new(&mut *body).poll_frame(cx);
            (polled, !body.is_end_stream())
        };
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                this.shared.holding.store(true, Ordering::Relaxed);
                let frame = match frame.into_data() {
                    Ok(data) if data.len() > PIECE => {
                        this.rest = data;
                        this.piece()
                    }
                    Ok(data) => Frame::data(data),
                    Err(frame) => frame,
                };
                if (more || !this.rest.is_empty()) && this.watchdog.is_none() {
                    this.arm();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                this.shared.holding.store(false, Ordering::Relaxed);
                Poll::Pending
            }
            ended => {
                this.shared.done.store(true, Ordering::Relaxed);
                ended
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
            && self
                .shared
                .body
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
                .is_some_and(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let rest = self.rest.len() as u64;
        match self.shared.body.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            Some(b) => {
                let inner = b.size_hint();
                let mut hint = http_body::SizeHint::new();
                hint.set_lower(inner.lower().saturating_add(rest));
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper.saturating_add(rest));
                }
                hint
            }
            None => http_body::SizeHint::default(),
        }
    }
}

impl Drop for Guarded {
    /// The answer is over (ended, or its stream reset): the app's body goes now, not at the watchdog's next look.
    fn drop(&mut self) {
        self.shared.done.store(true, Ordering::Relaxed);
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.abort();
        }
        drop(self.shared.body.lock().unwrap_or_else(PoisonError::into_inner).take());
    }
}
