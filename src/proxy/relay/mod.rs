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

use crate::config::Policy;
use crate::headers::{self, ForwardedHeaders, Framing, Headers};
use crate::policy::{Admission, admission};
use crate::proxy::State;
use crate::proxy::pool::{Affinity, IdlePool};
use crate::respond::Reject;
use crate::session::CacheAnswer;

mod body;
mod client;
mod local;
mod pool;
mod wire;

use body::*;
pub use client::{AnswerBody, SendError, Sent};
use local::*;
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
    /// A WebSocket opening handshake: the session it belongs to and its user's name (`Some(None)`: a bypass path).
    upgrade: Option<Option<(crate::session::SessionId, std::sync::Arc<str>)>>,
    /// For a WebSocket handshake, the `Sec-WebSocket-Accept` the app's 101 must carry ([`headers::websocket_accept`]).
    accept: Option<String>,
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
    let mut c = Conn { input: BytesMut::new(), out: Vec::new(), peer, peer_ip: peer.ip().to_string() };
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
        match forward_one(gw, &mut io, &mut c, &forward, timers.upstream.as_mut()).await {
            Ok(Next::Continue) if !stop.is_cancelled() => {}
            Ok(Next::Tunnel(up)) => {
                idle_flag.store(false, std::sync::atomic::Ordering::Relaxed);
                let client = Prefixed { prefix: Bytes::copy_from_slice(&c.input), io };
                let app = Prefixed { prefix: up.buf.freeze(), io: up.stream };
                return Outcome::Tunnel(Tunnel { client, app, owner: forward.upgrade.flatten() });
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

/// Bytes a request target may hold on the relay: RFC 3986 path and query characters (`pchar`, `/`, `?`). Anything
/// else (`#`, `\`, quotes, non-ASCII…) is left to hyper and the policy's full handling.
fn plain_target_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b)
}

/// Parses a request head from `c.input` and, when the relay can take it, writes the upstream head into `c.out`.
/// Nothing here has effects that matter if hyper then handles the request instead.
fn plan(gw: &impl State, c: &mut Conn, looked_up: bool) -> Planned {
    let Conn { input, out, peer, peer_ip, .. } = c;
    // Uninitialised slots: zeroing them would cost more than parsing a short head.
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(&mut req, input, &mut slots) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Planned::Partial,
        // Malformed, too many headers, or HTTP/2's preface: hyper answers it.
        Err(_) => return Planned::Handover,
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Planned::Handover;
    };
    let (head, idempotent) = match method {
        "GET" => (false, true),
        "HEAD" => (true, true),
        "POST" | "PUT" | "PATCH" | "DELETE" | "OPTIONS" => (false, false),
        _ => return Planned::Handover,
    };
    let hs: &[httparse::Header<'_>] = req.headers;
    // Origin form only (RFC 9112 §3.2.1); chunked bodies, upgrades and expectations need hyper's handling.
    if !target.starts_with('/') || !target.bytes().all(plain_target_byte) {
        return Planned::Handover;
    }
    let listed = headers::Listed::of(hs);
    let Some(scan) = Scan::of(hs) else {
        return Planned::Handover;
    };
    // A WebSocket opening handshake (RFC 6455 §4.1) is relayed; any other upgrade is hyper's.
    let websocket = scan.websocket && method == "GET" && listed.has("upgrade");
    if !websocket && (scan.upgrades > 0 || listed.has("upgrade")) {
        return Planned::Handover;
    }
    // A GET or HEAD body has no defined meaning (RFC 9110 §9.3.1): such a request is hyper's, as before.
    let Some(body) = scan.length().filter(|b| !idempotent || b.is_none()) else {
        return Planned::Handover;
    };
    let (Some(host), 1) = (scan.host.and_then(headers::text), scan.hosts) else {
        return Planned::Handover;
    };
    // From here on, a request the relay doesn't forward is the handlers' to answer on this connection (an upgrade
    // or a long body still goes to hyper).
    let local = || {
        let n = body.unwrap_or(0);
        if websocket || n > MAX_LOCAL_BODY {
            return Planned::Handover;
        }
        Local::of(method, target, hs, len, n, listed.has("close"))
            .map_or(Planned::Handover, |l| Planned::Local(Box::new(l)))
    };
    let (path, query) = target.split_once('?').map_or((target, None), |(p, q)| (p, Some(q)));
    // A Host that is not a host is the handlers' 400 (RFC 9112 §3.2), before any app or rule is chosen.
    if crate::policy::owns(gw.prefix(), path) || !crate::normalize::valid_host(host) {
        return local();
    }
    let app_index = crate::policy::find_app(&gw.config().apps, Some(host));
    let Ok(decision) = crate::policy::decide_for(gw.config(), app_index, path) else {
        return local();
    };
    if gw.upstreams().relay(decision.app).is_none() {
        return local();
    }
    let app = &gw.config().apps[decision.app];
    // One pass over the cookies: the session's values for the cache, the app's for the upstream.
    let own = gw.own_cookies();
    let mut sessions = [""; crate::session::MAX_SESSION_COOKIES];
    let mut found = 0;
    let foreign = headers::split_cookies(hs, &own, |name, value| {
        if name == own[0] {
            if let Some(slot) = sessions.get_mut(found) {
                *slot = value;
            }
            found += 1;
        }
    });
    if found > sessions.len() {
        return local();
    }
    let mut owner = None;
    let user = match decision.policy {
        Policy::Deny => return local(),
        Policy::Bypass => None,
        needed => match gw.sessions().cached_of(sessions[..found].iter().copied()) {
            Ok(CacheAnswer::Hit(auth))
                if admission(app, needed, auth.record.level, &auth.user.groups) == Admission::Pass =>
            {
                if websocket {
                    owner = Some((auth.id, auth.user.username.as_str().into()));
                }
                Some(auth.user)
            }
            Ok(CacheAnswer::Miss(_)) if looked_up => return local(),
            Ok(CacheAnswer::Miss(revision)) => {
                return Planned::Lookup(sessions[..found].iter().map(|s| s.to_string()).collect(), revision);
            }
            _ => return local(),
        },
    };
    let client = gw.client(*peer, hs);

    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(decision.path.as_bytes());
    if let Some(q) = query {
        out.push(b'?');
        out.extend_from_slice(q.as_bytes());
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    put_header(out, b"host", host.as_bytes());
    for h in hs {
        if !(body.is_some() && h.name.eq_ignore_ascii_case("content-length"))
            && headers::passes_upstream(gw.config(), &listed, h.name.as_bytes(), client.trusted)
        {
            put_header(out, h.name.as_bytes(), h.value);
        }
    }
    // The length in its one canonical form (a Connection header naming it can't remove it).
    if let Some(n) = body {
        put_header(out, b"content-length", n.to_string().as_bytes());
    }
    if !foreign.is_empty() {
        put_header(out, b"cookie", foreign.as_bytes());
    }
    if websocket {
        out.extend_from_slice(b"connection: upgrade\r\nupgrade: websocket\r\n");
    }
    for (name, value) in ForwardedHeaders::new(hs, client.via(), peer_ip, Some(host)).pairs() {
        put_header(out, name.as_bytes(), value.as_bytes());
    }
    if let Some(user) = &user {
        for (name, value) in headers::identity(gw.config(), user) {
            put_header(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    out.extend_from_slice(b"\r\n");
    let who = Affinity::of(app.shared_connections, user.as_ref());
    let body = body.unwrap_or(0);
    let retry = idempotent && body == 0;
    let upgrade = websocket.then_some(owner);
    let accept = if websocket { headers::websocket_accept(hs) } else { None };
    let close = listed.has("close");
    Planned::Forward(Forward { app: decision.app, len, head, body, retry, close, who, upgrade, accept })
}

/// The request headers that decide whether and how the relay takes a request, read in one pass.
struct Scan<'h> {
    host: Option<&'h [u8]>,
    hosts: usize,
    length: Option<&'h [u8]>,
    lengths: usize,
    upgrades: usize,
    /// The one Upgrade header is `websocket`.
    websocket: bool,
}

impl<'h> Scan<'h> {
    /// `None` when a header sends the request to hyper whatever the rest says: a `Transfer-Encoding` (chunked
    /// bodies are hyper's to parse) or an `Expect`.
    fn of(hs: &'h [httparse::Header<'_>]) -> Option<Scan<'h>> {
        let mut scan = Scan { host: None, hosts: 0, length: None, lengths: 0, upgrades: 0, websocket: false };
        for h in hs {
            let n = h.name.as_bytes();
            // The length first: most names are told apart without comparing a byte.
            match n.len() {
                4 if n.eq_ignore_ascii_case(b"host") => {
                    scan.hosts += 1;
                    scan.host = Some(h.value);
                }
                6 if n.eq_ignore_ascii_case(b"expect") => return None,
                7 if n.eq_ignore_ascii_case(b"upgrade") => {
                    scan.upgrades += 1;
                    scan.websocket = scan.upgrades == 1 && h.value.trim_ascii().eq_ignore_ascii_case(b"websocket");
                }
                14 if n.eq_ignore_ascii_case(b"content-length") => {
                    scan.lengths += 1;
                    scan.length = Some(h.value);
                }
                17 if n.eq_ignore_ascii_case(b"transfer-encoding") => return None,
                _ => {}
            }
        }
        Some(scan)
    }

    /// The body's length from the one `Content-Length` (RFC 9112 §6.2, §6.3): `Some(None)` without one, `None`
    /// when the relay leaves it to hyper — several, a list, or anything but 1 to 19 plain digits.
    fn length(&self) -> Option<Option<u64>> {
        let Some(v) = self.length else {
            return Some(None);
        };
        if self.lengths > 1 || v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(v).ok()?.parse().ok().map(Some)
    }
}

/// A request's body length ([`Scan::length`]) as the relay reads it from `hs`.
#[cfg(test)]
fn request_length(hs: &[httparse::Header<'_>]) -> Option<Option<u64>> {
    Scan::of(hs)?.length()
}

/// Sends one request and relays its answer. `Ok(true)`: the client connection can carry another request.
async fn forward_one<IO>(
    gw: &impl State,
    client: &mut IO,
    c: &mut Conn,
    f: &Forward,
    timer: Pin<&mut tokio::time::Sleep>,
) -> io::Result<Next>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    c.input.advance(f.len);
    gw.metrics().relayed.inc();
    let app = &gw.config().apps[f.app];
    let Some(pool) = gw.upstreams().relay(f.app) else {
        return answer(gw, client, c, f, &Reject::BadGateway).await;
    };
    let own = gw.own_cookies();
    // Two clock reads serve the deadlines, the pool's checkout, the latency metric and the Date (a third, the
    // checkin's, comes after the body).
    let started = Instant::now();
    let limits = Limits { answer: app.upstream_timeout.0, body: gw.config().server.body_timeout.0 };
    let exchanged = exchange(pool, c, client, &own, f, started, timer, limits).await;
    let answered = Instant::now();
    gw.app_metrics(f.app).upstream(answered.saturating_duration_since(started));
    let (mut up, head, whole) = match exchanged {
        Ok(sent) => sent,
        // The client broke off its body: nobody is left to answer.
        Err(Failed::Client(e)) => return Err(e),
        Err(Failed::ClientStalled) => return answer(gw, client, c, f, &Reject::RequestTimeout).await,
        Err(Failed::App(e)) => {
            tracing::warn!(upstream = %pool.authority, error = %e, "upstream request failed");
            return answer(gw, client, c, f, &Reject::BadGateway).await;
        }
        Err(Failed::Timeout) => return answer(gw, client, c, f, &Reject::GatewayTimeout).await,
    };
    gw.app_metrics(f.app).request(head.status);
    finish_head(&mut c.out, &head, answered);
    if head.status == 101 {
        client.write_all(&c.out).await?;
        client.flush().await?;
        return Ok(Next::Tunnel(up));
    }
    let complete = relay_body(&mut up, client, &mut c.out, head.framing, &own).await?;
    client.flush().await?;
    if !complete {
        // The app broke off mid-body: the client sees the answer cut short, as with hyper.
        return Ok(Next::Close);
    }
    // A connection that carried a body is never used again: an app that didn't read it (or read it as another
    // request) would answer the next request with what the body asked for (see SECURITY.md).
    if head.reusable && up.buf.is_empty() && f.body == 0 {
        pool.checkin(f.who.clone(), up);
    }
    // What is left of a body the app answered before taking can't be told from the next request: close.
    Ok(if head.close || !whole { Next::Close } else { Next::Continue })
}

/// How long the parts of an exchange with an app may take.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// `upstream_timeout`: from the moment the request is sent until the app's answer head is in.
    pub answer: Duration,
    /// `body_timeout`: the longest pause in a request body, reading it from the client or writing it to the app.
    pub body: Duration,
}

/// Why an exchange with the app ended without an answer.
enum Failed {
    /// The client broke off its body.
    Client(io::Error),
    /// The client's body paused longer than `body_timeout`.
    ClientStalled,
    /// The app or the connection to it failed.
    App(io::Error),
    /// The app's answer head didn't come within `upstream_timeout`.
    Timeout,
}

/// Writes the request in `c.out` (and its body, from the client) to the app and reads the answer's head, on a
/// pooled connection when there is one. `true` with the head: the whole body was sent.
#[allow(clippy::too_many_arguments)]
async fn exchange<IO>(
    pool: &Pool,
    c: &mut Conn,
    client: &mut IO,
    own: &[&str],
    f: &Forward,
    now: Instant,
    mut timer: Pin<&mut tokio::time::Sleep>,
    limits: Limits,
) -> Result<(Upstream, ResponseHead, bool), Failed>
where
    IO: AsyncRead + Unpin,
{
    let mut pooled = pool.checkout(&f.who, now);
    loop {
        let reused = pooled.is_some();
        let mut up = match pooled.take() {
            Some(s) => s,
            None => pool.connect().await.map_err(Failed::App)?,
        };
        up.buf.clear();
        match send(&mut up, c, client, own, f, timer.as_mut(), limits).await {
            Ok((head, whole)) => return Ok((up, head, whole)),
            // A pooled connection the app closed while it was idle fails before any answer: try once more on a
            // new one, for a request that may be sent twice (see `Forward::retry`). `c.out` still holds it.
            Err(Failed::App(e)) if f.retry && reused && up.buf.is_empty() && e.kind() != io::ErrorKind::InvalidData => {
                tracing::debug!(error = %e, "pooled upstream connection was closed; reconnecting");
            }
            Err(e) => return Err(e),
        }
    }
}

/// Sends the head in `c.out` with the body bytes already read, streams the rest of the body from the client as
/// it comes (each piece within `limits.body`), then reads the answer's head (within `limits.answer` of the
/// request's end; written to `c.out` for the client). When the app stops taking the body, the answer it may have
/// sent before (a 413, say) is still read and passed on (`false`: the body wasn't sent whole).
async fn send<IO>(
    up: &mut Upstream,
    c: &mut Conn,
    client: &mut IO,
    own: &[&str],
    f: &Forward,
    mut timer: Pin<&mut tokio::time::Sleep>,
    limits: Limits,
) -> Result<(ResponseHead, bool), Failed>
where
    IO: AsyncRead + Unpin,
{
    let mut left = f.body;
    if left > 0 {
        let k = body_part(&c.input, left);
        c.out.extend_from_slice(&c.input[..k]);
        c.input.advance(k);
        left -= k as u64;
    }
    let mut sent = put(timer.as_mut(), limits.body, &mut up.stream, &c.out).await;
    while sent.is_ok() && left > 0 {
        c.input.reserve(CHUNK);
        let deadline = Instant::now() + limits.body;
        match within(timer.as_mut(), deadline, client.read_buf(&mut c.input)).await {
            None => return Err(Failed::ClientStalled),
            Some(Ok(n)) if n > 0 => {}
            Some(_) => {
                let e = io::Error::new(io::ErrorKind::ConnectionAborted, "the client ended its body early");
                return Err(Failed::Client(e));
            }
        }
        let k = body_part(&c.input, left);
        sent = put(timer.as_mut(), limits.body, &mut up.stream, &c.input[..k]).await;
        c.input.advance(k);
        left -= k as u64;
    }
    let deadline = Instant::now() + limits.answer;
    let head = within(timer, deadline, async {
        loop {
            if let Some(head) = response_head(&mut up.buf, &mut c.out, own, f)? {
                return Ok(head);
            }
            up.buf.reserve(CHUNK);
            if up.stream.read_buf(&mut up.buf).await? == 0 {
                let why = "the app closed the connection before answering";
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, why));
            }
        }
    });
    match (sent, head.await) {
        (Ok(()), Some(Ok(head))) => Ok((head, true)),
        // The app may have answered and closed before taking the whole body: its answer counts.
        (Err(_), Some(Ok(head))) => Ok((head, false)),
        (Err(e), _) => Err(Failed::App(e)),
        (Ok(()), Some(Err(e))) => Err(Failed::App(e)),
        (Ok(()), None) => Err(Failed::Timeout),
    }
}

/// Writes `w` to the app within `limit`: an app that takes no more of a body for that long has stopped reading it.
async fn put(timer: Pin<&mut tokio::time::Sleep>, limit: Duration, stream: &mut UpStream, w: &[u8]) -> io::Result<()> {
    let write = async {
        stream.write_all(w).await?;
        stream.flush_tls().await
    };
    within(timer, Instant::now() + limit, write)
        .await
        .unwrap_or_else(|| Err(io::Error::new(io::ErrorKind::TimedOut, "the app stopped taking the request body")))
}

/// Writes one of our own pages (408, 502, 504) to the client.
async fn answer<IO>(gw: &impl State, client: &mut IO, c: &mut Conn, f: &Forward, r: &Reject) -> io::Result<Next>
where
    IO: AsyncWrite + Unpin,
{
    let resp = crate::respond::reject(gw.pages(), r);
    gw.app_metrics(f.app).request(resp.status().as_u16());
    // After a failure, what is left of a request body can't be told from the next request: close.
    let close = f.close || f.body > 0;
    write_response(client, &mut c.out, resp, f.head, close).await?;
    Ok(if close { Next::Close } else { Next::Continue })
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
