//! The HTTP/1.1 relay: the proxy's fast lane for the common request — a GET or HEAD without a body, a WebSocket
//! handshake (whose tunnel is then registered like hyper's, to close with its session), or a POST, PUT, PATCH,
//! DELETE or OPTIONS with no body or a `Content-Length` one, to an http or https app, from a signed-in session (or
//! for a bypass path). It is parsed once with httparse, checked, rewritten into a reused
//! buffer and written to a pooled upstream connection (TCP, or TLS through the app's own trust roots); the answer
//! is relayed back the same way, with its framing (RFC 9112 §6.3) followed to know where it ends. No
//! `http::Request` or `Response`, no header map, no task per upstream connection.
//!
//! A session not in the cache (a fresh login, or one a revocation dropped) is read from the store here, once per
//! request, and the request stays on the relay. A body is streamed to the app as it comes, by its length:
//! client-side body framing is where request smuggling lives, so the relay takes only the unambiguous form (one
//! `Content-Length` of plain digits, no `Transfer-Encoding`) and leaves chunked bodies, `Expect` and anything odd
//! to hyper's parser. A request the relay parsed in full but doesn't forward itself — a portal page, a request
//! that needs a login, a denial, a session it can't find — is answered by the gateway's own handlers on the same
//! connection (the `local` module), which stays on the relay. Everything else — another upgrade, HTTP/1.0 or
//! HTTP/2, odd framing, a long body the relay wouldn't forward — is handed to hyper together with the bytes read
//! so far, and the connection stays with hyper from then on. Both paths apply the same header rules ([`crate::headers`]), the same policy decision and the
//! same session checks, and reach the app through the same pooled connections: what hyper's server parsed goes
//! out through [`Pool::send`] (the `client` module), so there is one HTTP/1.1 client and one pool per app.

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::headers::{self, ForwardedHeaders, Framing, Headers};
use crate::metrics::Lane;
use crate::policy::{Admission, admit};
use crate::proxy::State;
use crate::proxy::pool::{Affinity, IdlePool};
use crate::respond::Reject;
use crate::session::CacheAnswer;

mod body;
mod client;
mod forward;
mod local;
mod plan;
mod pool;
mod wire;

use body::*;
pub use client::{AnswerBody, SendError, Sent};
pub use forward::Limits;
use forward::*;
use local::*;
use plan::*;
use pool::*;
pub use pool::{Pool, UpStream};
pub use wire::Prefixed;
use wire::*;

/// Header lines the relay parses per request; more go to hyper.
const MAX_HEADERS: usize = 64;
/// Header lines accepted in an app's response: hyper's client limit (100) and then some, so no answer that works
/// through hyper fails on the relay.
const MAX_RESPONSE_HEADERS: usize = 128;
/// A request head longer than this goes to hyper, whose limit is higher.
const MAX_REQUEST_HEAD: usize = 16 * 1024;
/// The longest response head accepted from an app: hyper's client limit (its read buffer's maximum).
const MAX_RESPONSE_HEAD: usize = 8192 + 4096 * 100;
/// Read size for bodies.
const CHUNK: usize = 16 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How a connection left the relay.
pub enum Outcome<IO> {
    /// It is closed (by the client, a timeout, shutdown or an error).
    Closed,
    /// hyper takes over: the connection with the bytes read but not yet handled.
    Handover(Prefixed<IO>),
    /// The app accepted a WebSocket upgrade (RFC 6455 §4): the client's connection and the app's, each with the
    /// bytes already read from it in front, are a tunnel now.
    Tunnel(Tunnel<IO>),
}

/// A WebSocket tunnel the relay opened, for [`crate::proxy::tunnels::Tunnels::open`].
pub struct Tunnel<IO> {
    /// The client's side.
    pub client: Prefixed<IO>,
    /// The app's side.
    pub app: Prefixed<UpStream>,
    /// The session it belongs to and its user's name (none: a bypass path).
    pub owner: Option<(crate::session::SessionId, std::sync::Arc<str>)>,
}

/// What the client connection does after an answer.
enum Next {
    /// Reads the next request.
    Continue,
    /// Closes.
    Close,
    /// Becomes a tunnel to the app (after a 101).
    Tunnel(Upstream),
}

/// The buffers of one client connection, reused for every request on it.
struct Conn {
    /// Bytes from the client not handled yet (a head being read, pipelined requests).
    input: BytesMut,
    /// The head being written: to the app, then to the client.
    out: Vec<u8>,
    peer: SocketAddr,
    /// The peer's address as text, formatted once per connection.
    peer_ip: String,
    /// The status of the answer to the request being forwarded, once the app answered or a refusal was chosen
    /// (499 before: the client left first).
    status: u16,
    /// The app's response time for the request being forwarded, once it answered or failed.
    upstream: Option<Duration>,
}

/// A request the relay forwards.
struct Forward {
    /// Index of the app.
    app: usize,
    /// Length of the request head in `input`.
    len: usize,
    /// A HEAD request: the answer has no body.
    head: bool,
    /// The request body's length (`Content-Length`; 0 without one).
    body: u64,
    /// Whether a pooled connection that fails before answering may be replaced by a new one: only for a GET or
    /// HEAD without a body, which is idempotent (RFC 9110 §9.2.2) and still whole in the buffer.
    retry: bool,
    /// The client asked to close after this answer.
    close: bool,
    /// Whose requests the upstream connection may carry afterwards.
    who: Affinity,
    /// A WebSocket opening handshake: the session it belongs to, whose user is `user` (`Some(None)`: a bypass path).
    upgrade: Option<Option<crate::session::SessionId>>,
    /// For a WebSocket handshake, the `Sec-WebSocket-Accept` the app's 101 must carry ([`headers::websocket_accept`]).
    accept: Option<String>,
    /// The session's user named to the app (none on bypass paths).
    user: Option<std::sync::Arc<crate::store::User>>,
}

enum Planned {
    Forward(Forward),
    /// The gateway's own handlers answer it on this connection ([`local`]).
    Local(Box<Local>),
    Partial,
    Handover,
    /// The session cookie values sent are not cached (at this revocation revision): read the session from the
    /// store, then plan the same request again.
    Lookup(Vec<String>, u64),
}

/// A connection's two timers, re-armed for each request rather than made anew: moving a tokio timer's deadline
/// later is one atomic update, where a timer per request is a wheel insert and removal under the driver's lock.
struct Timers<'a> {
    /// `header_read_timeout`: from the moment a request is awaited until its head is complete.
    head: Pin<&'a mut tokio::time::Sleep>,
    /// `upstream_timeout`: from sending a request until the app's answer head is in.
    upstream: Pin<&'a mut tokio::time::Sleep>,
}

/// Runs `work` until `timer` reaches `deadline`; `None` when it does first.
async fn within<F: Future>(mut timer: Pin<&mut tokio::time::Sleep>, deadline: Instant, work: F) -> Option<F::Output> {
    timer.as_mut().reset(deadline.into());
    tokio::select! {
        biased;
        out = work => Some(out),
        () = timer => None,
    }
}

/// Serves a client connection until it closes, or until a request needs hyper.
pub async fn serve<IO, S: State>(
    current: &arc_swap::ArcSwap<S>,
    mut io: IO,
    peer: SocketAddr,
    stop: &CancellationToken,
    idle_flag: &std::sync::atomic::AtomicBool,
) -> Outcome<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    // `stop` is the connection's own token (shutdown, or shed at the connection cap): checking and awaiting it
    // locks its node, not the one all connections share.
    let mut stopped = std::pin::pin!(stop.cancelled());
    let far = tokio::time::Instant::now() + Duration::from_secs(86_400);
    let mut timers = Timers {
        head: std::pin::pin!(tokio::time::sleep_until(far)),
        upstream: std::pin::pin!(tokio::time::sleep_until(far)),
    };
    let mut c = Conn {
        input: BytesMut::new(),
        out: Vec::new(),
        peer,
        peer_ip: peer.ip().to_string(),
        status: 0,
        upstream: None,
    };
    // The connection's own handle on the current gateway: a pointer check per request, where `load_full` would
    // bump the reference count that every connection shares (a reload still takes effect at the next request).
    let mut current = arc_swap::Cache::new(current);
    loop {
        let shared: &std::sync::Arc<S> = current.load();
        let gw: &S = shared;
        let mut deadline = Instant::now() + gw.config().server.header_read_timeout.0;
        timers.head.as_mut().reset(deadline.into());
        // At most one store read per request: a session that is still not cached after it (none, or the
        // revision moved again meanwhile) is the gateway's handlers' to answer.
        let mut looked_up = false;
        let forward = loop {
            if !c.input.is_empty() {
                let planned = match plan(gw, &mut c, looked_up) {
                    Planned::Lookup(raws, revision) => {
                        looked_up = true;
                        // Found or not, the request is planned again: with the session cached, or answered
                        // by the handlers (which read the store themselves, and so see a store failure).
                        let _ = gw.sessions().warm(&raws, revision).await;
                        continue;
                    }
                    planned => planned,
                };
                match planned {
                    Planned::Forward(f) => break f,
                    Planned::Local(l) => match answer_local(shared.clone(), &mut io, &mut c, *l, deadline).await {
                        Ok(Next::Continue) if !stop.is_cancelled() => {
                            deadline = Instant::now() + gw.config().server.header_read_timeout.0;
                            timers.head.as_mut().reset(deadline.into());
                            looked_up = false;
                            continue;
                        }
                        ended => return end(&mut io, c.peer, ended).await,
                    },
                    Planned::Partial if c.input.len() < MAX_REQUEST_HEAD => {}
                    Planned::Partial | Planned::Handover | Planned::Lookup(..) => {
                        gw.metrics().handovers.inc();
                        idle_flag.store(false, std::sync::atomic::Ordering::Relaxed);
                        // A copy of just the unread bytes: the read buffer itself shouldn't outlive the relay.
                        return Outcome::Handover(Prefixed { prefix: Bytes::copy_from_slice(&c.input), io });
                    }
                }
            }
            c.input.reserve(4096);
            let idle = c.input.is_empty();
            idle_flag.store(idle, std::sync::atomic::Ordering::Relaxed);
            tokio::select! {
                biased;
                read = io.read_buf(&mut c.input) => match read {
                    Ok(n) if n > 0 => {}
                    _ => return Outcome::Closed,
                },
                () = timers.head.as_mut() => return Outcome::Closed,
                () = stopped.as_mut(), if idle => return Outcome::Closed,
            }
            idle_flag.store(false, std::sync::atomic::Ordering::Relaxed);
        };
        let started = Instant::now();
        (c.status, c.upstream) = (499, None);
        let ended = forward_one(gw, &mut io, &mut c, &forward, started, timers.upstream.as_mut()).await;
        // Every forwarded request ends here, however it ended; the relay's local answers end in the handlers.
        let user = forward.user.as_deref().map(|u| u.username.as_str());
        let (slot, status, upstream) = (forward.app, c.status, c.upstream);
        gw.finished(&crate::metrics::Outcome {
            lane: Lane::Relay,
            slot,
            status,
            user,
            elapsed: started.elapsed(),
            upstream,
        });
        match ended {
            Ok(Next::Continue) if !stop.is_cancelled() => {}
            Ok(Next::Tunnel(up)) => {
                idle_flag.store(false, std::sync::atomic::Ordering::Relaxed);
                let client = Prefixed { prefix: Bytes::copy_from_slice(&c.input), io };
                let app = Prefixed { prefix: up.buf.freeze(), io: up.stream };
                let name = forward.user.as_ref().map(|u| u.username.as_str().into());
                return Outcome::Tunnel(Tunnel { client, app, owner: forward.upgrade.flatten().zip(name) });
            }
            ended => return end(&mut io, c.peer, ended).await,
        }
    }
}

/// Closes a client connection after an answer that ends it (`Ok`: a clean close) or a failure.
async fn end<IO: AsyncWrite + Unpin>(io: &mut IO, peer: SocketAddr, ended: io::Result<Next>) -> Outcome<IO> {
    match ended {
        Ok(_) => {
            let _ = io.shutdown().await;
        }
        Err(e) => tracing::debug!(%peer, error = %e, "relayed connection ended"),
    }
    Outcome::Closed
}

/// Entry points for the fuzz targets (fuzz/) and their CI replay: the relay's parsing of what an app sends, without
/// sockets.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// Feeds `input` to the chunked-framing tracker in two pieces split at `cut`: the bytes that belong to the body
    /// (`None`: the framing is broken) and whether the body ended.
    pub fn chunked(input: &[u8], cut: usize) -> (Option<usize>, bool) {
        let cut = cut.min(input.len());
        let mut c = Chunked::default();
        let used = c.feed(&input[..cut]).ok().and_then(|a| {
            if c.done() {
                return Some(a);
            }
            c.feed(&input[cut..]).ok().map(|b| a + b)
        });
        (used, c.done())
    }

    /// Decodes `input` as the upstream client does for hyper's server (in two pieces split at `cut`): the body's
    /// data when the chunked body ends within `input`, else `None`.
    pub fn chunked_data(input: &[u8], cut: usize) -> Option<Vec<u8>> {
        let cut = cut.min(input.len());
        let mut c = Chunked::default();
        let mut data = Vec::new();
        c.feed_with(&input[..cut], |r| data.extend_from_slice(&input[r])).ok()?;
        if !c.done() {
            let rest = &input[cut..];
            c.feed_with(rest, |r| data.extend_from_slice(&rest[r])).ok()?;
        }
        c.done().then_some(data)
    }

    /// Parses an app's response head as the relay does, with `own` the gateway's cookie names: `Ok(None)` when
    /// more bytes are needed, `Err` when the relay answers 502, else the head the client would get and the framing
    /// (`"empty"`, `"length:N"`, `"chunked"`, `"close"`).
    pub fn response(input: &[u8], head_request: bool, own: &[&str]) -> Result<Option<(Vec<u8>, String)>, String> {
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        let f = Forward {
            app: 0,
            len: 0,
            head: head_request,
            body: 0,
            retry: true,
            close: false,
            who: Affinity::Anonymous,
            upgrade: None,
            accept: None,
            user: None,
        };
        let head = response_head(&mut buf, &mut out, own, &f).map_err(|e| e.to_string())?;
        Ok(head.map(|h| {
            finish_head(&mut out, &h, Instant::now());
            let framing = match h.framing {
                Framing::Empty => "empty".to_string(),
                Framing::Length(n) => format!("length:{n}"),
                Framing::Chunked => "chunked".to_string(),
                Framing::UntilClose => "close".to_string(),
            };
            (out, framing)
        }))
    }
}

#[cfg(test)]
mod tests;
