//! The HTTP/1.1 relay (src/proxy/relay/), the proxy's fast lane: which requests take it, what the app sees of
//! them, how the app's answers are framed back, the upstream pool's retry and the relay's own 502/504 pages.
//! Every test reads the relay's counters on the metrics endpoint (`portcullis_relayed_requests_total`,
//! `portcullis_relay_handovers_total`) and asserts they moved by exactly the expected amount, so a test can't pass
//! on hyper's path while claiming to test the relay. Framing cases run against a scripted raw upstream that sends
//! exactly the bytes a case needs.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::support::*;

/// one_factor app (the echo upstream or a script).
const APP: &str = "app.test";
/// bypass app on a scripted upstream.
const RAW: &str = "raw.test";
/// A Date the scripted upstream sends, to tell it from one the gateway adds.
const FIXED_DATE: &str = "Sun, 06 Nov 1994 08:49:37 GMT";

// ---------------------------------------------------------------------------------------------
// The relay's counters
// ---------------------------------------------------------------------------------------------

/// Asserts the counters moved from `before` by exactly `relayed` / `handovers`.
async fn assert_moved(maddr: SocketAddr, before: Counts, relayed: u64, handovers: u64, what: &str) {
    let delta = counts(maddr).await - before;
    assert_eq!(delta, Counts { relayed, handovers }, "{what}: relay counters moved by {delta:?}");
}

// ---------------------------------------------------------------------------------------------
// A raw HTTP/1.1 client connection that keeps what it read beyond one response
// ---------------------------------------------------------------------------------------------

/// One parsed response.
#[derive(Debug)]
struct Msg {
    status: u16,
    /// (lower-case name, value), in order.
    headers: Vec<(String, String)>,
    /// The body as it came on the wire (chunk framing included).
    wire: Vec<u8>,
    /// The body (chunk framing removed).
    body: Vec<u8>,
    trailers: Vec<(String, String)>,
}

impl Msg {
    fn all(&self, name: &str) -> Vec<&str> {
        self.headers.iter().filter(|(k, _)| k == name).map(|(_, v)| v.as_str()).collect()
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.all(name).first().copied()
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The echo upstream's JSON.
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// (lower-case name, value) pairs, in order.
type Fields = Vec<(String, String)>;

/// Decodes a chunked body at the start of `b`: (body, bytes used, trailers), `None` when incomplete. Panics on
/// broken framing.
fn dechunk(b: &[u8]) -> Option<(Vec<u8>, usize, Fields)> {
    let mut i = 0;
    let mut out = Vec::new();
    loop {
        let e = i + find(&b[i..], b"\r\n")?;
        let line = lossy(&b[i..e]);
        let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16)
            .unwrap_or_else(|e| panic!("bad chunk size line {line:?}: {e}"));
        i = e + 2;
        if size == 0 {
            break;
        }
        if b.len() < i + size + 2 {
            return None;
        }
        out.extend_from_slice(&b[i..i + size]);
        assert_eq!(&b[i + size..i + size + 2], b"\r\n", "chunk data not followed by CRLF");
        i += size + 2;
    }
    let mut trailers = Vec::new();
    loop {
        let e = i + find(&b[i..], b"\r\n")?;
        if e == i {
            return Some((out, e + 2, trailers));
        }
        let line = lossy(&b[i..e]);
        let (k, v) = line.split_once(':').unwrap_or_else(|| panic!("bad trailer line {line:?}"));
        trailers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        i = e + 2;
    }
}

/// Parses one response from the start of `buf` (`head`: it answers a HEAD request; `eof`: no more bytes will
/// come). `None`: incomplete. 1xx answers come back as responses of their own.
fn parse_response(buf: &[u8], head: bool, eof: bool) -> Option<(Msg, usize)> {
    let mut slots = [httparse::EMPTY_HEADER; 128];
    let mut r = httparse::Response::new(&mut slots);
    let n = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return None,
        Err(e) => panic!("malformed response head ({e}): {:?}", lossy(buf)),
    };
    let status = r.code.unwrap();
    let headers: Vec<(String, String)> =
        r.headers.iter().map(|h| (h.name.to_ascii_lowercase(), lossy(h.value))).collect();
    let mut m = Msg { status, headers, wire: Vec::new(), body: Vec::new(), trailers: Vec::new() };
    let rest = &buf[n..];
    if head || status < 200 || status == 204 || status == 304 {
        return Some((m, n));
    }
    if m.header("transfer-encoding").is_some() {
        let (body, used, trailers) = dechunk(rest)?;
        m.wire = rest[..used].to_vec();
        m.body = body;
        m.trailers = trailers;
        return Some((m, n + used));
    }
    if let Some(cl) = m.header("content-length") {
        let cl: usize = cl.trim().parse().unwrap_or_else(|e| panic!("Content-Length {cl:?}: {e}"));
        if rest.len() < cl {
            return None;
        }
        m.wire = rest[..cl].to_vec();
        m.body = m.wire.clone();
        return Some((m, n + cl));
    }
    if !eof {
        return None;
    }
    m.wire = rest.to_vec();
    m.body = m.wire.clone();
    Some((m, buf.len()))
}

struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
    eof: bool,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Raw {
        let s = within("connect", TcpStream::connect(addr)).await.unwrap();
        Raw { s, buf: Vec::new(), eof: false }
    }

    async fn send(&mut self, data: &[u8]) {
        within("write", self.s.write_all(data)).await.unwrap();
    }

    async fn read_more(&mut self) {
        self.buf.reserve(65536);
        match self.s.read_buf(&mut self.buf).await {
            Ok(0) | Err(_) => self.eof = true,
            Ok(_) => {}
        }
    }

    /// Reads one response (`head`: to a HEAD request); panics if the connection closes before it is complete.
    async fn response(&mut self, head: bool) -> Msg {
        within("raw response", async {
            loop {
                if let Some((m, used)) = parse_response(&self.buf, head, self.eof) {
                    self.buf.drain(..used);
                    return m;
                }
                assert!(!self.eof, "connection closed before a complete response; got {:?}", lossy(&self.buf));
                self.read_more().await;
            }
        })
        .await
    }

    /// Reads until the peer closes; returns the bytes after the responses already read.
    async fn rest(&mut self) -> Vec<u8> {
        within("the gateway to close the connection", async {
            while !self.eof {
                self.read_more().await;
            }
        })
        .await;
        std::mem::take(&mut self.buf)
    }
}

/// A request head (with the blank line) for `target` on `host`, with extra header lines.
fn req(method: &str, target: &str, host: &str, extra: &str) -> String {
    format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n")
}

// ---------------------------------------------------------------------------------------------
// A scripted raw upstream: answers by path with exactly the bytes a case needs
// ---------------------------------------------------------------------------------------------

/// A request the script received.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Seen {
    fn all(&self, name: &str) -> Vec<String> {
        self.headers.iter().filter(|(k, _)| k == name).map(|(_, v)| v.clone()).collect()
    }
}

struct Script {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// `/stale`: the test tells the script to send its late 408 ...
    go: Arc<Notify>,
    /// ... and the script says it has sent it and closed.
    done: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Script {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    /// Connections accepted so far.
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Script {
    /// Aborting the accept loop drops its JoinSet, which aborts every connection task.
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the script does for a request.
enum Reply {
    /// Write these pieces (each flushed on its own) and wait for the next request.
    Keep(Vec<Vec<u8>>),
    /// Write these pieces, then close the connection (without having said so).
    Close(Vec<Vec<u8>>),
    /// Answer nothing; wait until the gateway gives up and closes.
    Hang,
    /// Write these pieces; when told to (`go`), write a `408 Request Timeout` nobody asked for, close, and say so
    /// (`done`) — what a server timing out an idle keep-alive connection may do.
    Stale(Vec<Vec<u8>>),
}

fn b(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

/// `200 OK` with a Content-Length body and a Date.
fn ok(body: &[u8]) -> Vec<u8> {
    let mut v = b(&format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nDate: {FIXED_DATE}\r\n\r\n",
        body.len()
    ));
    v.extend_from_slice(body);
    v
}

/// The chunked body the script sends for `/chunked`, piece by piece (a chunk extension, a chunk split over two
/// writes, a trailer).
const CHUNKED_PIECES: &[&str] =
    &["6\r\nhello \r\n", "8;lang=en\r\nchunked \r\n", "5\r\nwor", "ld\r\n", "0\r\nX-Trailer: done\r\n\r\n"];

/// Deterministic pseudo-random bytes (xorshift64).
fn pattern(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

fn sha256(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// `n` from a `?n=...` query.
fn query_n(path: &str) -> usize {
    query_param(path, "n").and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no n in {path}"))
}

/// The big chunked body: `pattern(n, 2)` in chunks of cycling odd sizes, some with an extension.
fn big_chunked(n: usize) -> Vec<u8> {
    let data = pattern(n, 2);
    let sizes = [1usize, 13, 4096, 16383, 16384, 16385, 65535, 100_000, 1_000_000];
    let mut out = Vec::with_capacity(n + 4096);
    let (mut at, mut i) = (0, 0);
    while at < n {
        let k = sizes[i % sizes.len()].min(n - at);
        let ext = if i % 4 == 1 { ";n=v" } else { "" };
        out.extend_from_slice(format!("{k:x}{ext}\r\n").as_bytes());
        out.extend_from_slice(&data[at..at + k]);
        out.extend_from_slice(b"\r\n");
        at += k;
        i += 1;
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

fn reply(seen: &Seen) -> Reply {
    let path = seen.path.split('?').next().unwrap();
    match path {
        "/chunked" => {
            let mut pieces = vec![b(&format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\nDate: {FIXED_DATE}\r\n\r\n"
            ))];
            pieces.extend(CHUNKED_PIECES.iter().map(|p| b(p)));
            Reply::Keep(pieces)
        }
        "/close" => Reply::Close(vec![
            b(&format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nDate: {FIXED_DATE}\r\n\r\n")),
            b("close-"),
            b("delimited body"),
        ]),
        "/early" => Reply::Keep(vec![
            b("HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"),
            ok(b"after hints"),
        ]),
        // As many header lines as hyper's client accepts (100), one of them 100 KiB long.
        "/many-headers" => {
            let mut head = format!("HTTP/1.1 200 OK\r\nDate: {FIXED_DATE}\r\nX-Long: {}\r\n", "v".repeat(100 * 1024));
            for i in 0..96 {
                head.push_str(&format!("X-Many-{i}: {i}\r\n"));
            }
            head.push_str("Content-Length: 4\r\n\r\nmany");
            Reply::Keep(vec![b(&head)])
        }
        "/no-date" => Reply::Keep(vec![b("HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nno date")]),
        "/no-content" => Reply::Keep(vec![b(&format!("HTTP/1.1 204 No Content\r\nDate: {FIXED_DATE}\r\n\r\n"))]),
        // A 304 may announce the length of the representation it stands for, without a body.
        "/not-modified" => Reply::Keep(vec![b(&format!(
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 12\r\nDate: {FIXED_DATE}\r\n\r\n"
        ))]),
        "/cl-te" => Reply::Keep(vec![b(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        )]),
        "/two-cl" => Reply::Keep(vec![b("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!")]),
        "/gzip-te" => Reply::Keep(vec![b("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxxxx")]),
        "/switch" => Reply::Keep(vec![b(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        )]),
        "/hang" => Reply::Hang,
        "/big-cl" => {
            let n = query_n(&seen.path);
            let mut v =
                b(&format!("HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\n\r\n"));
            v.extend_from_slice(&pattern(n, 1));
            Reply::Keep(vec![v])
        }
        "/big-chunked" => {
            let mut v =
                b("HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n");
            v.extend_from_slice(&big_chunked(query_n(&seen.path)));
            Reply::Keep(vec![v])
        }
        "/echo-body" => Reply::Keep(vec![ok(&seen.body)]),
        "/stale" => Reply::Stale(vec![ok(b"fresh")]),
        // An app that closes every connection after one answer, without a `Connection: close`.
        p if p.starts_with("/once/") => Reply::Close(vec![ok(b"once")]),
        _ => Reply::Keep(vec![ok(format!("{} {}", seen.method, seen.path).as_bytes())]),
    }
}

/// Parses a request (head and Content-Length or chunked body) from the start of `buf`. `Ok(None)`: incomplete.
fn parse_request(buf: &[u8]) -> Result<Option<(Seen, usize)>, String> {
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut r = httparse::Request::new(&mut slots);
    let n = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("malformed request ({e}): {:?}", lossy(buf))),
    };
    let headers: Vec<(String, String)> =
        r.headers.iter().map(|h| (h.name.to_ascii_lowercase(), lossy(h.value))).collect();
    let mut seen =
        Seen { method: r.method.unwrap().to_string(), path: r.path.unwrap().to_string(), headers, body: Vec::new() };
    let rest = &buf[n..];
    if !seen.all("transfer-encoding").is_empty() {
        return Ok(dechunk(rest).map(|(body, used, _)| {
            seen.body = body;
            (seen, n + used)
        }));
    }
    let cl: usize = seen.all("content-length").first().map(|v| v.trim().parse().unwrap()).unwrap_or(0);
    if rest.len() < cl {
        return Ok(None);
    }
    seen.body = rest[..cl].to_vec();
    Ok(Some((seen, n + cl)))
}

async fn serve_script(mut s: TcpStream, seen: Arc<Mutex<Vec<Seen>>>, go: Arc<Notify>, done: Arc<Notify>) {
    let mut buf = Vec::new();
    let mut tmp = vec![0u8; 65536];
    loop {
        let (request, used) = loop {
            match parse_request(&buf) {
                Ok(Some(x)) => break x,
                Ok(None) => {}
                Err(e) => {
                    eprintln!("script: {e}");
                    return;
                }
            }
            match s.read(&mut tmp).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
        };
        buf.drain(..used);
        seen.lock().unwrap().push(request.clone());
        let (pieces, close) = match reply(&request) {
            Reply::Keep(p) => (p, false),
            Reply::Close(p) => (p, true),
            Reply::Hang => {
                while matches!(s.read(&mut tmp).await, Ok(n) if n > 0) {}
                return;
            }
            Reply::Stale(p) => {
                for p in p {
                    let _ = s.write_all(&p).await;
                }
                go.notified().await;
                let _ = s
                    .write_all(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
                let _ = s.shutdown().await;
                done.notify_one();
                return;
            }
        };
        for p in pieces {
            if s.write_all(&p).await.is_err() || s.flush().await.is_err() {
                return;
            }
        }
        if close {
            let _ = s.shutdown().await;
            return;
        }
    }
}

async fn script() -> Script {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::new(Mutex::new(Vec::new()));
    let (go, done) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let (a, sn, g, d) = (accepted.clone(), seen.clone(), go.clone(), done.clone());
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            a.fetch_add(1, Ordering::SeqCst);
            conns.spawn(serve_script(s, sn.clone(), g.clone(), d.clone()));
            while conns.try_join_next().is_some() {}
        }
    });
    Script { addr, accepted, seen, go, done, task }
}

/// A gateway with the metrics endpoint, `apps` and the user alice; returns it with the metrics address.
pub(crate) async fn gateway(apps: &str) -> (Env, Gateway, SocketAddr) {
    let (maddr, metrics) = metrics_section();
    let env = Env::password_only(&format!("{metrics}{apps}"));
    env.add_user("alice", "alice@example.com", "Alice Liddell", &["staff"], PW).await;
    let gw = env.start().await;
    (env, gw, maddr)
}

/// The echo app behind a gateway, with alice's session warm: the app, the gateway and its metrics address, and the
/// session as a `Cookie:` header line.
async fn warm_app() -> (Upstream, Env, Gateway, SocketAddr, String) {
    let up = start_upstream().await;
    let (env, gw, maddr) = gateway(&app(APP, &up.url(), "one_factor")).await;
    let c = warm_session(&gw).await;
    let cookie = format!("Cookie: {}\r\n", c.cookie_header());
    (up, env, gw, maddr, cookie)
}

/// Signs alice in and makes one proxied request, which puts the session into the cache (the relay reads it from
/// the store); returns the client, whose later requests the relay takes from the cache.
async fn warm_session(gw: &Gateway) -> Client {
    let mut c = gw.client(APP);
    c.login_ok("alice", PW).await;
    let r = c.get("/warm").await;
    assert_eq!(r.status, 200, "first proxied request: {}", r.text());
    c
}

/// Asserts the identity headers an upstream saw are alice's (`get` reads a header's values).
fn assert_alice(get: impl Fn(&str) -> Vec<String>, what: &str) {
    for (name, want) in [
        ("remote-user", "alice"),
        ("remote-email", "alice@example.com"),
        ("remote-name", "Alice Liddell"),
        ("remote-groups", "staff"),
    ] {
        assert_eq!(get(name), vec![want.to_string()], "{what}: {name} at the upstream");
    }
}

// ---------------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------------

/// [`gateway`] with a TLS listener (a fresh self-signed certificate for `APP`); also returns the certificate to
/// trust. Not probed: the harness checks health over plain HTTP.
pub(crate) async fn tls_gateway(apps: &str) -> (Env, Gateway, SocketAddr, rcgen::Certificate) {
    tls_gateway_with("", apps).await
}

/// [`tls_gateway`] with more `[server]` lines.
pub(crate) async fn tls_gateway_with(server: &str, apps: &str) -> (Env, Gateway, SocketAddr, rcgen::Certificate) {
    let (maddr, metrics) = metrics_section();
    let env = Env::password_only(&format!(
        "[server]\ntls_cert = \"{{DIR}}/cert.pem\"\ntls_key = \"{{DIR}}/key.pem\"\n{server}\n{metrics}{apps}"
    ));
    let ck = rcgen::generate_simple_self_signed(vec![APP.to_string()]).unwrap();
    std::fs::write(env.path().join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(env.path().join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
    env.add_user("alice", "alice@example.com", "Alice Liddell", &["staff"], PW).await;
    let gw = env.start_unchecked().await;
    (env, gw, maddr, ck.cert)
}

/// A TLS connection to the gateway trusting `cert` and offering only `alpn`, which it asserts was chosen.
pub(crate) async fn tls_connect(
    addr: SocketAddr,
    cert: &rcgen::Certificate,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = within("connect", TcpStream::connect(addr)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(APP).unwrap();
    let tls = within("TLS handshake", tls_connector(cert, alpn).connect(name, tcp))
        .await
        .expect("TLS handshake with the gateway");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn), "ALPN chose another protocol");
    tls
}

type H1 = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// hyper's HTTP/1.1 client on a new TLS connection that negotiated http/1.1 (requests on it share the connection).
async fn tls_h1(addr: SocketAddr, cert: &rcgen::Certificate) -> H1 {
    let tls = tls_connect(addr, cert, b"http/1.1").await;
    let (send, conn) =
        within("HTTP/1.1 handshake", hyper::client::conn::http1::handshake(TokioIo::new(tls))).await.unwrap();
    tokio::spawn(conn);
    send
}

/// The whole answer as a [`Resp`]; its cookies go into `c`'s jar.
async fn into_resp(r: hyper::Response<hyper::body::Incoming>, c: &mut Client) -> Resp {
    let (parts, body) = r.into_parts();
    let body = within("body", body.collect()).await.expect("response body").to_bytes();
    c.store_cookies(&parts.headers);
    Resp { status: parts.status.as_u16(), headers: parts.headers, body, version: parts.version }
}

/// Signs alice in over TLS http/1.1 (on the relay: the gateway's handlers answer the portal), checks the session cookie is
/// `Secure`, and warms the session with one proxied GET; returns the client holding the session.
async fn tls_sign_in(gw: &Gateway, cert: &rcgen::Certificate) -> Client {
    // Sign in and warm the session over TLS.
    let mut c = gw.client(APP);
    let html = [("accept", "text/html")];
    let mut h1 = tls_h1(gw.addr, cert).await;
    let page = tls_send(&mut h1, &mut c, "GET", &format!("{PREFIX}/login?rd=%2F"), &html, None).await;
    assert_eq!(page.status, 200, "login page over TLS: {}", page.text());
    let csrf = extract_csrf(&page.text()).unwrap_or_else(|| panic!("no csrf field in the login page: {}", page.text()));
    let form =
        serde_urlencoded::to_string([("csrf", csrf.as_str()), ("rd", "/"), ("username", "alice"), ("password", PW)])
            .unwrap();
    let r = tls_send(&mut h1, &mut c, "POST", &format!("{PREFIX}/login"), &html, Some(form)).await;
    assert_eq!(r.status, 303, "login over TLS: {}", r.text());
    let set = session_set_cookie(&r).unwrap_or_else(|| panic!("no session cookie set: {:?}", r.set_cookies()));
    assert!(set.to_ascii_lowercase().contains("; secure"), "session cookie set over TLS without Secure: {set}");
    let r = tls_send(&mut h1, &mut c, "GET", "/warm", &[], None).await;
    assert_eq!(r.status, 200, "first proxied request: {}", r.text());
    drop(h1);
    c
}

/// An h2 connection to the gateway over TLS.
pub(crate) async fn tls_h2(
    addr: SocketAddr,
    cert: &rcgen::Certificate,
) -> hyper::client::conn::http2::SendRequest<H2Body> {
    let tls = tls_connect(addr, cert, b"h2").await;
    let (h2, conn) =
        within("h2 handshake", hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    h2
}

pub(crate) type H2Body = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

/// A request on `send` with `c`'s host and cookies, `headers` and an optional form body.
async fn tls_send(
    send: &mut H1,
    c: &mut Client,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    form: Option<String>,
) -> Resp {
    let mut b = Request::builder().method(method).uri(path).header("host", &c.host);
    if !c.jar.is_empty() {
        b = b.header("cookie", c.cookie_header());
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    if form.is_some() {
        b = b.header("content-type", "application/x-www-form-urlencoded");
    }
    let request = b.body(Full::new(Bytes::from(form.unwrap_or_default()))).unwrap();
    let what = format!("{method} {path} over TLS http/1.1");
    within(&what, send.ready()).await.unwrap_or_else(|e| panic!("{what}: connection not ready: {e}"));
    let r = within(&what, send.send_request(request)).await.unwrap_or_else(|e| panic!("{what}: {e}"));
    into_resp(r, c).await
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// Once a session is in the cache, GETs and HEADs on new connections take the relay (the relayed counter rises
/// by exactly the number sent, no handover): 200s with the echo's body, no body after a HEAD's head, and the
/// session user's identity at the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_session_gets_and_heads_are_relayed_with_the_session_identity() {
    let up = start_upstream().await;
    let (_env, gw, maddr) = gateway(&app(APP, &up.url(), "one_factor")).await;
    let mut c = warm_session(&gw).await;

    let before = counts(maddr).await;
    for i in 0..5 {
        let target = format!("/page/{i}?q={i}&x=a%20b");
        let r = c.get(&target).await;
        assert_eq!(r.status, 200, "GET {target}: {}", r.text());
        assert_eq!(r.json()["method"], "GET");
        assert_eq!(r.upstream_path(), target);
        assert_alice(|n| r.upstream_header(n).unwrap_or_default(), &format!("GET {target}"));
        assert!(r.header("date").is_some(), "no Date on a relayed response");
    }
    assert_moved(maddr, before, 5, 0, "five GETs of a cached session").await;

    let mut raw = Raw::connect(gw.addr).await;
    let cookie = c.cookie_header();
    raw.send(req("HEAD", "/head", APP, &format!("Cookie: {cookie}\r\nConnection: close\r\n")).as_bytes()).await;
    let r = raw.response(true).await;
    assert_eq!(r.status, 200, "HEAD: {r:?}");
    let cl: usize = r.header("content-length").expect("HEAD answer without Content-Length").parse().unwrap();
    assert!(cl > 0, "the echo announces its JSON body's length");
    assert_eq!(r.header("connection"), Some("close"), "HEAD with Connection: close: {r:?}");
    let rest = raw.rest().await;
    assert!(rest.is_empty(), "bytes after the HEAD answer's head: {:?}", lossy(&rest));
    let hit = up.last_hit();
    assert_eq!((hit.method.as_str(), hit.path.as_str()), ("HEAD", "/head"));
    assert_alice(|n| hit.header(n).unwrap_or_default(), "HEAD");
    assert_moved(maddr, before, 6, 0, "five GETs and a HEAD").await;
    gw.stop().await;
}

/// On the relay, nothing the client sends decides what the app believes: spoofed identity headers (any case,
/// `_` for `-`) are replaced by the session's, names listed in Connection are dropped, the gateway's cookies are
/// cut out of Cookie (the others kept in order), X-Forwarded-For / X-Real-IP are the peer's and X-Forwarded-Host
/// the real host (the peer isn't a trusted proxy). The relayed counter proves the relay did it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_identity_connection_listed_cookie_and_forwarding_headers_are_rewritten_on_the_relay() {
    let up = start_upstream().await;
    let (_env, gw, maddr) = gateway(&app(APP, &up.url(), "one_factor")).await;
    let c = warm_session(&gw).await;
    let sess = c.session_cookie().unwrap();

    let before = counts(maddr).await;
    let extra = format!(
        "Remote-User: admin\r\nX_Remote_User: admin\r\nremote-email: x@evil\r\nX-Forwarded-User: admin\r\n\
         REMOTE_GROUPS: admins\r\nX-Auth-Request-User: admin\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\n\
         Cookie: a=1; {SESSION}={sess}; b=2\r\nX-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n\
         X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\nX-Kept: yes\r\n"
    );
    let mut raw = Raw::connect(gw.addr).await;
    raw.send(req("GET", "/spoof", APP, &extra).as_bytes()).await;
    let r = raw.response(false).await;
    assert_eq!(r.status, 200, "{r:?}");
    let j = r.json();
    let h: std::collections::BTreeMap<String, Vec<String>> = serde_json::from_value(j["headers"].clone()).unwrap();
    let get = |n: &str| h.get(n).cloned().unwrap_or_default();
    assert_alice(get, "spoofed request");
    for gone in ["x_remote_user", "x-remote-user", "x-forwarded-user", "x-auth-request-user", "x-secret", "connection"]
    {
        assert!(!h.contains_key(gone), "{gone} reached the upstream: {h:?}");
    }
    assert_eq!(get("cookie"), vec!["a=1; b=2".to_string()], "Cookie at the upstream");
    assert_eq!(get("x-forwarded-for"), vec!["127.0.0.1".to_string()]);
    assert_eq!(get("x-real-ip"), vec!["127.0.0.1".to_string()]);
    assert_eq!(get("x-forwarded-proto"), vec!["http".to_string()]);
    assert_eq!(get("x-forwarded-host"), vec![APP.to_string()]);
    assert_eq!(get("host"), vec![APP.to_string()]);
    assert_eq!(get("x-kept"), vec!["yes".to_string()], "an ordinary header must pass");
    for (k, vs) in &h {
        for v in vs {
            for bad in ["admin", "evil", "6.6.6.6", &sess] {
                assert!(!v.contains(bad), "{k}: {v} reached the upstream (contains {bad:?})");
            }
        }
    }
    assert_moved(maddr, before, 1, 0, "the spoofing request").await;
    gw.stop().await;
}

/// Requests written in one go on one connection (GET, HEAD, GET) are all relayed and answered in order, each
/// complete, the HEAD's without a body, and the connection closes after the last (which asked for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_relayed_and_answered_in_order() {
    let (up, _env, gw, maddr, cookie) = warm_app().await;

    let before = counts(maddr).await;
    let mut raw = Raw::connect(gw.addr).await;
    let all = format!(
        "{}{}{}",
        req("GET", "/p1", APP, &cookie),
        req("HEAD", "/p2", APP, &cookie),
        req("GET", "/p3?last=1", APP, &format!("{cookie}Connection: close\r\n"))
    );
    raw.send(all.as_bytes()).await;
    let r1 = raw.response(false).await;
    let r2 = raw.response(true).await;
    let r3 = raw.response(false).await;
    assert_eq!((r1.status, r2.status, r3.status), (200, 200, 200), "{r1:?}\n{r2:?}\n{r3:?}");
    assert_eq!(r1.json()["path"], "/p1");
    assert_eq!(r1.json()["method"], "GET");
    assert!(r2.header("content-length").is_some(), "HEAD answer: {r2:?}");
    assert_eq!(r3.json()["path"], "/p3?last=1");
    assert_alice(
        |n| {
            r3.json()["headers"][n]
                .as_array()
                .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
                .unwrap_or_default()
        },
        "third pipelined request",
    );
    assert_eq!(r3.header("connection"), Some("close"));
    let rest = raw.rest().await;
    assert!(rest.is_empty(), "bytes after the last answer: {:?}", lossy(&rest));
    let order: Vec<(String, String)> =
        up.hits().iter().rev().take(3).rev().map(|h| (h.method.clone(), h.path.clone())).collect();
    let want = [("GET", "/p1"), ("HEAD", "/p2"), ("GET", "/p3?last=1")].map(|(m, p)| (m.to_string(), p.to_string()));
    assert_eq!(order, want, "order at the upstream");
    assert_moved(maddr, before, 3, 0, "three pipelined requests").await;
    gw.stop().await;
}

/// A POST with a `Content-Length` body between two GETs stays on the relay, its body split over writes reaching
/// the app intact. A request the relay can't take (a POST with a chunked body) hands the connection to hyper with
/// the bytes read so far, so the body reaches the app intact — also when the POST came in the same write as a
/// relayed GET and its body was split over writes — and the connection goes on working (on hyper) for the next
/// request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_a_body_hands_the_connection_to_hyper_mid_stream() {
    let s = script().await;
    let (_env, gw, maddr) = gateway(&app(APP, &s.url(), "one_factor")).await;
    let c = warm_session(&gw).await;
    let cookie = format!("Cookie: {}\r\n", c.cookie_header());
    let body = pattern(100_000, 7);
    let post_head = req(
        "POST",
        "/echo-body",
        APP,
        &format!("{cookie}Content-Type: application/octet-stream\r\nContent-Length: {}\r\n", body.len()),
    );

    let before = counts(maddr).await;
    // Sequential: GET, POST, GET, all relayed.
    let mut raw = Raw::connect(gw.addr).await;
    raw.send(req("GET", "/first", APP, &cookie).as_bytes()).await;
    let r = raw.response(false).await;
    assert_eq!((r.status, r.text().as_str()), (200, "GET /first"));
    assert_moved(maddr, before, 1, 0, "the GET before the POST").await;
    let mut first = post_head.clone().into_bytes();
    first.extend_from_slice(&body[..50_000]);
    raw.send(&first).await;
    raw.send(&body[50_000..]).await;
    let r = raw.response(false).await;
    assert_eq!(r.status, 200, "POST: {}", r.text());
    assert!(r.body == body, "POST body came back as {} bytes, sha256 {}", r.body.len(), sha256(&r.body));
    raw.send(req("GET", "/after", APP, &format!("{cookie}Connection: close\r\n")).as_bytes()).await;
    let r = raw.response(false).await;
    assert_eq!((r.status, r.text().as_str()), (200, "GET /after"));
    assert!(raw.rest().await.is_empty());
    assert_moved(maddr, before, 3, 0, "GET, POST, GET on one connection").await;

    // Pipelined: the GET and a chunked POST's head with part of its body in one write, the rest after.
    let chunked_head = req(
        "POST",
        "/echo-body",
        APP,
        &format!("{cookie}Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n"),
    );
    let mut chunked = Vec::new();
    for part in body.chunks(7_000) {
        chunked.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        chunked.extend_from_slice(part);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let mut raw = Raw::connect(gw.addr).await;
    let mut first = req("GET", "/p-first", APP, &cookie).into_bytes();
    first.extend_from_slice(chunked_head.as_bytes());
    first.extend_from_slice(&chunked[..30_000]);
    raw.send(&first).await;
    raw.send(&chunked[30_000..]).await;
    let r = raw.response(false).await;
    assert_eq!((r.status, r.text().as_str()), (200, "GET /p-first"));
    let r = raw.response(false).await;
    assert_eq!(r.status, 200, "pipelined POST: {}", r.text());
    assert!(r.body == body, "pipelined POST body came back as {} bytes", r.body.len());
    raw.send(req("GET", "/p-after", APP, &format!("{cookie}Connection: close\r\n")).as_bytes()).await;
    assert_eq!(raw.response(false).await.text(), "GET /p-after");
    assert!(raw.rest().await.is_empty());
    assert_moved(maddr, before, 4, 1, "both connections").await;

    let seen = s.seen();
    let posts: Vec<&Seen> = seen.iter().filter(|r| r.method == "POST").collect();
    assert_eq!(posts.len(), 2, "POSTs at the app: {posts:?}");
    for p in &posts {
        assert!(p.body == body, "the app got a {}-byte body, sha256 {}", p.body.len(), sha256(&p.body));
    }
    assert_eq!(posts[0].all("content-length"), vec![body.len().to_string()], "the relayed POST's length");
    for r in seen.iter().filter(|r| r.path != "/warm") {
        assert_alice(|n| r.all(n), &format!("{} {}", r.method, r.path));
        assert!(r.all("cookie").is_empty(), "{}: the gateway's cookies reached the app: {:?}", r.path, r.all("cookie"));
    }
    gw.stop().await;
}

/// Response framing on the relay (bypass app, scripted upstream): a chunked body is relayed verbatim (extension
/// and trailer included) under exactly one `transfer-encoding: chunked`; a close-delimited body arrives whole with
/// `connection: close` and the connection then closes; a 103 before the 200 is not passed on; a missing Date is
/// added and an app's Date kept; a head as large as hyper accepts passes; 204 and a 304 announcing a length have no
/// body, and the connection stays in step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_response_framing_chunked_close_delimited_interim_and_date() {
    let s = script().await;
    let (_env, gw, maddr) = gateway(&app(RAW, &s.url(), "bypass")).await;
    let before = counts(maddr).await;

    let mut raw = Raw::connect(gw.addr).await;
    raw.send(req("GET", "/chunked", RAW, "").as_bytes()).await;
    let r = raw.response(false).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.all("transfer-encoding"), vec!["chunked"], "{r:?}");
    assert!(r.header("content-length").is_none());
    assert_eq!(r.text(), "hello chunked world");
    assert_eq!(lossy(&r.wire), CHUNKED_PIECES.concat(), "chunk framing not relayed verbatim");
    assert_eq!(r.trailers, vec![("x-trailer".to_string(), "done".to_string())]);
    assert_eq!(r.all("date"), vec![FIXED_DATE], "the app's Date must be kept, alone");

    raw.send(req("GET", "/early", RAW, "").as_bytes()).await;
    let r = raw.response(false).await;
    assert_eq!(r.status, 200, "the 103 was passed on: {r:?}");
    assert_eq!(r.text(), "after hints");
    assert!(r.header("link").is_none(), "the 103's Link leaked into the 200: {r:?}");

    let t0 = std::time::SystemTime::now();
    raw.send(req("GET", "/no-date", RAW, "").as_bytes()).await;
    let r = raw.response(false).await;
    assert_eq!((r.status, r.text().as_str()), (200, "no date"));
    let dates = r.all("date");
    assert_eq!(dates.len(), 1, "Date headers: {dates:?}");
    let d = httpdate::parse_http_date(dates[0]).unwrap_or_else(|e| panic!("Date {:?}: {e}", dates[0]));
    let skew = d.duration_since(t0).unwrap_or_else(|e| e.duration());
    assert!(skew < Duration::from_secs(60), "added Date {:?} is {skew:?} off", dates[0]);

    // A head as large as hyper's client takes (100 header lines, one of 100 KiB) passes whole.
    raw.send(req("GET", "/many-headers", RAW, "").as_bytes()).await;
    let r = raw.response(false).await;
    assert_eq!((r.status, r.text().as_str()), (200, "many"), "{}", r.status);
    assert_eq!(r.header("x-long").map(str::len), Some(100 * 1024));
    assert_eq!(r.header("x-many-95"), Some("95"));

    raw.send(req("GET", "/no-content", RAW, "").as_bytes()).await;
    let r = raw.response(false).await;
    assert_eq!(r.status, 204, "{r:?}");
    raw.send(req("GET", "/not-modified", RAW, "").as_bytes()).await;
    let r = raw.response(false).await;
    assert_eq!(r.status, 304, "{r:?}");
    // In step: the next answer is the next request's.
    raw.send(req("GET", "/plain", RAW, "Connection: close\r\n").as_bytes()).await;
    let r = raw.response(false).await;
    assert_eq!((r.status, r.text().as_str()), (200, "GET /plain"));
    let rest = raw.rest().await;
    assert!(rest.is_empty(), "bytes after the last answer: {:?}", lossy(&rest));

    let mut raw = Raw::connect(gw.addr).await;
    raw.send(req("GET", "/close", RAW, "").as_bytes()).await;
    let r = raw.response(false).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("connection"), Some("close"), "close-delimited answer without connection: close: {r:?}");
    assert!(r.header("content-length").is_none() && r.header("transfer-encoding").is_none(), "{r:?}");
    assert_eq!(r.text(), "close-delimited body");
    assert!(raw.rest().await.is_empty());

    assert_moved(maddr, before, 8, 0, "bypass requests to the scripted app").await;
    gw.stop().await;
}

/// Ambiguous or impossible answers from an app become a 502 page, never a guess: Content-Length beside
/// Transfer-Encoding, two different Content-Lengths, a transfer coding other than chunked, a 101 to a plain GET.
/// The client connection stays usable and in step after each. On both paths: the relay's own checks, and hyper's
/// (the same requests with `Content-Length: 0`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_response_framing_from_the_app_is_a_502_on_both_paths() {
    let s = script().await;
    let (_env, gw, maddr) = gateway(&app(RAW, &s.url(), "bypass")).await;
    for (lane, steer, moved) in [(Lane::Relay, "", (8, 0)), (Lane::Hyper, "Content-Length: 0\r\n", (0, 1))] {
        let before = counts(maddr).await;
        let mut raw = Raw::connect(gw.addr).await;
        for path in ["/cl-te", "/two-cl", "/gzip-te", "/switch"] {
            raw.send(req("GET", path, RAW, steer).as_bytes()).await;
            let r = raw.response(false).await;
            assert_eq!(r.status, 502, "{path} ({lane:?}): {r:?}");
            assert!(!r.text().contains("hello"), "{path} ({lane:?}): the app's body reached the client: {}", r.text());
            assert!(r.header("date").is_some(), "{path} ({lane:?}): 502 page without Date");
            raw.send(req("GET", &format!("/after{path}"), RAW, steer).as_bytes()).await;
            let r = raw.response(false).await;
            assert_eq!(
                (r.status, r.text()),
                (200, format!("GET /after{path}")),
                "{path} ({lane:?}): connection out of step"
            );
        }
        assert_moved(maddr, before, moved.0, moved.1, &format!("four bad answers and four good ones ({lane:?})")).await;
    }
    gw.stop().await;
}

/// The relay keeps upstream connections in a pool: on one client connection, five requests to a keep-alive app
/// share one upstream connection. An app that closes every connection after one answer (without saying so) leaves
/// a dead connection in the pool each time; the relay retries on a new one, so every request succeeds, each on a
/// connection of its own, and none reaches the app twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_app_closed_is_retried_on_a_new_one() {
    let keep = script().await;
    let once = script().await;
    let (_env, gw, maddr) =
        gateway(&format!("{}{}", app("keep.test", &keep.url(), "bypass"), app(RAW, &once.url(), "bypass"))).await;
    let before = counts(maddr).await;

    let mut raw = Raw::connect(gw.addr).await;
    for i in 0..5 {
        raw.send(req("GET", &format!("/k/{i}"), "keep.test", "").as_bytes()).await;
        let r = raw.response(false).await;
        assert_eq!((r.status, r.text()), (200, format!("GET /k/{i}")));
    }
    assert_eq!(keep.accepted(), 1, "a keep-alive app: the pooled connection should serve every request");

    let mut raw = Raw::connect(gw.addr).await;
    for i in 0..5 {
        raw.send(req("GET", &format!("/once/{i}"), RAW, "").as_bytes()).await;
        let r = raw.response(false).await;
        assert_eq!((r.status, r.text().as_str()), (200, "once"), "request {i} after the app closed its connection");
    }
    for i in 5..8 {
        let r = raw_get(gw.addr, RAW, &format!("/once/{i}"), "").await;
        assert_eq!((r.status, r.body.as_slice()), (200, &b"once"[..]), "request {i} on a new client connection");
    }
    assert_eq!(once.accepted(), 8, "one upstream connection per request");
    assert_eq!(once.seen().len(), 8, "a request reached the app twice: {:?}", once.seen());
    assert_moved(maddr, before, 13, 0, "pooled and retried requests").await;
    gw.stop().await;
}

/// A pooled connection on which the app, while it sat idle, sent a `408 Request Timeout` and closed must not
/// answer the next request with that 408: the app never saw that request. (hyper's client drops an idle
/// connection that receives bytes.) The next request gets its own answer from a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_answer_on_an_idle_pooled_connection_is_not_relayed_as_the_next_requests_answer() {
    let s = script().await;
    let (_env, gw, maddr) = gateway(&app(RAW, &s.url(), "bypass")).await;
    // Control, on hyper's path (`Content-Length: 0` makes the relay hand the connection over at once).
    let before = counts(maddr).await;
    let mut raw = Raw::connect(gw.addr).await;
    raw.send(req("GET", "/stale", RAW, "Content-Length: 0\r\n").as_bytes()).await;
    let r = raw.response(false).await;
    assert_eq!((r.status, r.text().as_str()), (200, "fresh"));
    s.go.notify_one();
    within("the script's 408", s.done.notified()).await;
    raw.send(req("GET", "/second-hyper", RAW, "Content-Length: 0\r\nConnection: close\r\n").as_bytes()).await;
    let r = raw.response(false).await;
    assert_eq!((r.status, r.text().as_str()), (200, "GET /second-hyper"), "hyper's path: {r:?}");
    assert_moved(maddr, before, 0, 1, "the control on hyper's path").await;

    // The relay.
    let before = counts(maddr).await;
    let mut raw = Raw::connect(gw.addr).await;
    raw.send(req("GET", "/stale", RAW, "").as_bytes()).await;
    let r = raw.response(false).await;
    assert_eq!((r.status, r.text().as_str()), (200, "fresh"));
    // The upstream connection is back in the pool (checked in before this client connection's next request is
    // read). Now the app times it out: a 408 and a close, both in the gateway's socket buffer once `done` fires.
    s.go.notify_one();
    within("the script's 408", s.done.notified()).await;
    raw.send(req("GET", "/second", RAW, "Connection: close\r\n").as_bytes()).await;
    let r = raw.response(false).await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "GET /second"),
        "the next request was answered with bytes the app sent before it was asked: {r:?}"
    );
    assert_eq!(s.seen().iter().filter(|r| r.path == "/second").count(), 1, "the app saw /second once");
    assert_moved(maddr, before, 2, 0, "the two requests").await;
    gw.stop().await;
}

/// The relay's own pages: a refused connection to the app is a 502 (also for HEAD, without a body), an app that
/// doesn't answer within `upstream_timeout` a 504 after about that long; the app then still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_502_and_slow_upstream_is_504_on_the_relay() {
    let s = script().await;
    let closed = free_addr();
    let (_env, gw, maddr) = gateway(&format!(
        "{}[[app]]\nhost = \"slow.test\"\nupstream = \"{}\"\npolicy = \"bypass\"\nupstream_timeout = \"1s\"\n\n",
        app("down.test", &format!("http://{closed}"), "bypass"),
        s.url()
    ))
    .await;
    let before = counts(maddr).await;

    let mut raw = Raw::connect(gw.addr).await;
    raw.send(req("GET", "/x", "down.test", "").as_bytes()).await;
    let r = raw.response(false).await;
    assert_eq!(r.status, 502, "refused upstream: {r:?}");
    assert!(!r.body.is_empty(), "the 502 page has a body");
    raw.send(req("HEAD", "/x", "down.test", "").as_bytes()).await;
    let r = raw.response(true).await;
    assert_eq!(r.status, 502, "HEAD, refused upstream: {r:?}");

    hang_is_504_after_about_a_second(&mut raw, "504 came too late").await;
    raw.send(req("GET", "/fast", "slow.test", "Connection: close\r\n").as_bytes()).await;
    let r = raw.response(false).await;
    assert_eq!((r.status, r.text().as_str()), (200, "GET /fast"));
    // Only HEAD's 502 had no body: nothing is left over.
    assert!(raw.rest().await.is_empty());
    assert_moved(maddr, before, 4, 0, "502, 502 (HEAD), 504, 200").await;
    gw.stop().await;
}

/// Asks `slow.test` (`upstream_timeout = 1s`) for `/hang` on `raw` and expects the relay's 504 after about that long.
async fn hang_is_504_after_about_a_second(raw: &mut Raw, too_late: &str) {
    raw.send(req("GET", "/hang", "slow.test", "").as_bytes()).await;
    let t = Instant::now();
    let r = raw.response(false).await;
    let el = t.elapsed();
    assert_eq!(r.status, 504, "hanging upstream with upstream_timeout = 1s: {r:?}");
    assert!(el >= Duration::from_millis(900), "504 came too early: {el:?}");
    assert!(el < Duration::from_secs(15), "{too_late}: {el:?}");
}

/// Large bodies through the relay arrive byte-exact: 20 MiB with a Content-Length and 20 MiB + 7 chunked in
/// chunks of odd sizes (1 byte to 1 MB, some with extensions), read by hyper's strict client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_content_length_and_chunked_downloads_are_relayed_byte_exact() {
    const LIMIT: Duration = Duration::from_secs(180);
    let s = script().await;
    let (_env, gw, maddr) = gateway(&app(RAW, &s.url(), "bypass")).await;
    let before = counts(maddr).await;
    for (path, n, seed) in [("/big-cl", 20 << 20, 1), ("/big-chunked", (20 << 20) + 7, 2)] {
        let target = format!("{path}?n={n}");
        let t = Instant::now();
        let mut c = gw.client(RAW);
        let r = within_for(LIMIT, &target, c.try_send("GET", &target, &[], None))
            .await
            .unwrap_or_else(|e| panic!("{target}: {e}"));
        assert_eq!(r.status, 200, "{target}");
        let want = pattern(n, seed);
        eprintln!("{target}: {} bytes in {:.1}s", r.body.len(), t.elapsed().as_secs_f64());
        assert_eq!(r.body.len(), n, "{target}: length");
        assert_eq!(sha256(&r.body), sha256(&want), "{target}: sha256");
        if path == "/big-cl" {
            assert_eq!(r.header("content-length"), Some(n.to_string()));
        } else {
            assert_eq!(r.header("transfer-encoding").as_deref(), Some("chunked"));
        }
    }
    assert_moved(maddr, before, 2, 0, "two downloads").await;
    gw.stop().await;
}

/// Over TLS, ALPN decides who serves a connection: http/1.1 starts on the relay, h2 is hyper's alone. Two
/// keep-alive GETs of a warm session on one http/1.1 TLS connection are relayed (the relayed counter rises by
/// exactly 2, no handover) with the session user's identity, not a spoofed one, and `X-Forwarded-Proto: https` at
/// the app; a GET on an h2 connection gets the same identity without the relay's counters moving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_http1_requests_take_the_relay_and_h2_stays_with_hyper() {
    let up = start_upstream().await;
    let (_env, gw, maddr, cert) = tls_gateway(&app(APP, &up.url(), "one_factor")).await;

    let mut c = tls_sign_in(&gw, &cert).await;

    // http/1.1: two keep-alive GETs on one connection, both relayed.
    let before = counts(maddr).await;
    let mut h1 = tls_h1(gw.addr, &cert).await;
    for i in 0..2 {
        let path = format!("/tls/{i}?q={i}");
        let r = tls_send(&mut h1, &mut c, "GET", &path, &[("Remote-User", "admin")], None).await;
        assert_eq!(r.status, 200, "GET {path} over TLS http/1.1: {}", r.text());
        assert_eq!(r.version, hyper::Version::HTTP_11);
        assert_eq!(r.upstream_path(), path);
        assert_alice(|n| r.upstream_header(n).unwrap_or_default(), &format!("GET {path} over TLS http/1.1"));
        assert_eq!(r.upstream_header("x-forwarded-proto"), Some(vec!["https".to_string()]), "GET {path}");
    }
    assert_moved(maddr, before, 2, 0, "two keep-alive GETs on a TLS http/1.1 connection").await;
    drop(h1);

    // h2: hyper serves it; the relay never sees it.
    let before = counts(maddr).await;
    let mut h2 = tls_h2(gw.addr, &cert).await;
    let request = Request::get(format!("https://{APP}/over/h2"))
        .header("cookie", c.cookie_header())
        .header("remote-user", "admin")
        .body(Full::new(Bytes::new()).boxed())
        .unwrap();
    let r = within("GET over h2", h2.send_request(request)).await.expect("GET over h2");
    let r = into_resp(r, &mut c).await;
    assert_eq!(r.status, 200, "GET over h2: {}", r.text());
    assert_eq!(r.version, hyper::Version::HTTP_2);
    assert_eq!(r.upstream_path(), "/over/h2");
    assert_alice(|n| r.upstream_header(n).unwrap_or_default(), "GET over h2");
    assert_eq!(r.upstream_header("x-forwarded-proto"), Some(vec!["https".to_string()]), "GET over h2");
    assert_moved(maddr, before, 0, 0, "a GET on an h2 connection").await;
    drop(h2);
    gw.stop().await;
}

/// The relay re-arms one header-read and one upstream timer per connection instead of making new ones per request,
/// so each must still count from the right moment: a 1 s `upstream_timeout` after a request to an app with the
/// default 30 s is a 504 after about 1 s (the deadline moved earlier), and with `header_read_timeout = 2s` a
/// connection that waits 1.2 s before each of its requests stays open well past 2 s of idling in all, then closes
/// about 2 s after its last answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connections_timers_are_re_armed_for_every_request() {
    let s = script().await;
    let (_env, gw, maddr) = gateway(&format!(
        "[server]\nlisten = \"{{LISTEN}}\"\nheader_read_timeout = \"2s\"\n\n{}[[app]]\nhost = \"slow.test\"\n\
         upstream = \"{}\"\npolicy = \"bypass\"\nupstream_timeout = \"1s\"\n\n",
        app(RAW, &s.url(), "bypass"),
        s.url()
    ))
    .await;
    let before = counts(maddr).await;
    let mut raw = Raw::connect(gw.addr).await;

    raw.send(req("GET", "/first", RAW, "").as_bytes()).await;
    assert_eq!(raw.response(false).await.text(), "GET /first");
    hang_is_504_after_about_a_second(
        &mut raw,
        "504 came that long after the request: the 30 s deadline of the one before?",
    )
    .await;

    // Idle 1.2 s before each request: 2.4 s in all, past the 2 s a timer armed only once would allow.
    let mut last = Instant::now();
    for i in 0..2 {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        raw.send(req("GET", &format!("/again-{i}"), RAW, "").as_bytes()).await;
        let r = raw.response(false).await;
        assert_eq!((r.status, r.text()), (200, format!("GET /again-{i}")), "request {i} after 1.2 s idle");
        last = Instant::now();
    }
    assert!(raw.rest().await.is_empty(), "nothing but a close after the last answer");
    let idle = last.elapsed();
    assert!(idle >= Duration::from_millis(1500), "closed {idle:?} after the last answer, header_read_timeout is 2s");
    assert!(idle < Duration::from_secs(15), "an idle connection stayed {idle:?} with header_read_timeout = 2s");
    assert_moved(maddr, before, 4, 0, "first, 504, two after idling").await;
    gw.stop().await;
}

/// A logout anywhere empties the session cache. The other sessions' open connections read their sessions again
/// on the relay and stay on it — no handover — while the logged-out session is refused (by hyper, after the relay
/// found no session for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_logout_the_other_sessions_stay_cached_and_their_connections_on_the_relay() {
    let up = start_upstream().await;
    let (env, gw, maddr) = gateway(&app(APP, &up.url(), "one_factor")).await;
    let mut conns = Vec::new();
    // All accounts first: a CLI change wakes the gateway, and on PostgreSQL a wake-up empties the cache.
    for name in ["bob", "carol", "dave"] {
        env.add_user(name, &format!("{name}@example.com"), name, &[], PW).await;
    }
    for name in ["bob", "carol", "dave"] {
        let mut c = gw.client(APP);
        c.login_ok(name, PW).await;
        let mut raw = Raw::connect(gw.addr).await;
        let cookie = format!("Cookie: {}\r\n", c.cookie_header());
        // Not cached yet (a fresh login): the relay reads the session itself.
        let before = counts(maddr).await;
        raw.send(req("GET", "/first", APP, &cookie).as_bytes()).await;
        let r = raw.response(false).await;
        assert_eq!(r.status, 200, "{name}'s first request: {r:?}");
        assert_moved(maddr, before, 1, 0, &format!("{name}'s first request, its session not yet cached")).await;
        conns.push((name, cookie, raw));
    }
    let mut alice = warm_session(&gw).await;
    let alice_cookie = format!("Cookie: {}\r\n", alice.cookie_header());
    let fills = metric(maddr, "portcullis_session_cache_fills_total").await;
    let flushes = metric(maddr, "portcullis_session_cache_flushes_total").await;
    logout(&mut alice).await;

    for round in 0..2 {
        let before = counts(maddr).await;
        for (name, cookie, raw) in &mut conns {
            raw.send(req("GET", &format!("/after/{round}"), APP, cookie).as_bytes()).await;
            let r = raw.response(false).await;
            assert_eq!(r.status, 200, "{name} after another user's logout (round {round}): {r:?}");
            assert_eq!(up.last_hit().header("remote-user"), Some(vec![name.to_string()]), "{name}");
        }
        assert_moved(maddr, before, 3, 0, &format!("round {round} after a logout: the three stay on the relay")).await;
    }
    // The logout named alice's session in the revocation journal: only it left the cache, so the others were
    // served from it without a store read, and nothing emptied the cache.
    assert_eq!(metric(maddr, "portcullis_session_cache_fills_total").await, fills, "a session was read again");
    assert_eq!(metric(maddr, "portcullis_session_cache_flushes_total").await, flushes, "the cache was emptied");
    // The logged-out session: not in the cache nor the store, so the gateway's handlers refuse it, on the relay.
    let before = counts(maddr).await;
    let local = metric(maddr, "portcullis_relay_local_answers_total").await;
    let hits = up.hit_count();
    let mut raw = Raw::connect(gw.addr).await;
    raw.send(req("GET", "/ended", APP, &format!("{alice_cookie}Connection: close\r\n")).as_bytes()).await;
    let r = raw.response(false).await;
    assert_eq!(r.status, 401, "a logged-out session: {r:?}");
    assert_eq!(up.hit_count(), hits, "a logged-out session reached the app");
    assert_moved(maddr, before, 0, 0, "a logged-out session is refused on the relay").await;
    assert_eq!(metric(maddr, "portcullis_relay_local_answers_total").await, local + 1, "refused by the handlers");
    gw.stop().await;
}

/// Form posts and API writes take the relay: a POST, PUT or PATCH with a `Content-Length` body is streamed to the
/// app as it comes and reaches it byte for byte (a 300 KiB binary body in several writes, its digest checked by the
/// app), with one canonical length; a small POST pipelined with a GET behind it is answered in order; a PUT with
/// `Content-Length: 0` and a bodyless DELETE pass too. All of it on one connection, every request relayed, none
/// handed over. Bodies the relay leaves to hyper's parser (chunked, two lengths, `Expect`) are handed over and
/// reach the app just the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_with_a_length_are_relayed_byte_for_byte_and_other_framings_go_to_hyper() {
    let (up, _env, gw, maddr, cookie) = warm_app().await;
    let digest = |b: &[u8]| format!("{} {}", b.len(), hex::encode(Sha256::digest(b)));

    let before = counts(maddr).await;
    let mut raw = Raw::connect(gw.addr).await;
    // Every byte value, CRLFs and something that looks like a request head included.
    let mut big: Vec<u8> = (0..300 * 1024).map(|i| (i * 7 % 256) as u8).collect();
    big.splice(1000..1000, b"\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: app.test\r\n\r\n".iter().copied());
    let head = req(
        "POST",
        "/digest",
        APP,
        &format!("{cookie}Content-Type: application/octet-stream\r\nContent-Length: 00{}\r\n", big.len()),
    );
    let mut first = head.into_bytes();
    first.extend_from_slice(&big[..700]);
    raw.send(&first).await;
    for part in big[700..].chunks(64 * 1024) {
        raw.send(part).await;
    }
    let r = raw.response(false).await;
    assert_eq!(r.status, 200, "a 300 KiB POST: {r:?}");
    assert_eq!(r.text(), digest(&big), "the body the app got");
    let hit = up.last_hit();
    assert_eq!(hit.header("content-length"), Some(vec![big.len().to_string()]), "one canonical length");
    assert_eq!(hit.header("remote-user"), Some(vec!["alice".to_string()]));

    // A small POST with a GET pipelined behind it, in one write.
    let form = b"a=1&b=%0D%0A";
    let mut two = req("POST", "/digest", APP, &format!("{cookie}Content-Length: {}\r\n", form.len())).into_bytes();
    two.extend_from_slice(form);
    two.extend_from_slice(req("GET", "/after-the-post", APP, &cookie).as_bytes());
    raw.send(&two).await;
    let r = raw.response(false).await;
    assert_eq!((r.status, r.text()), (200, digest(form)), "the pipelined POST");
    let r = raw.response(false).await;
    assert_eq!(r.status, 200, "the GET behind it: {r:?}");
    assert_eq!(r.json()["path"], "/after-the-post");

    for (method, extra, sent) in
        [("PUT", "Content-Length: 0\r\n", &b""[..]), ("PATCH", "Content-Length: 3\r\n", b"xyz")]
    {
        let mut m = req(method, "/digest", APP, &format!("{cookie}{extra}")).into_bytes();
        m.extend_from_slice(sent);
        raw.send(&m).await;
        let r = raw.response(false).await;
        assert_eq!((r.status, r.text()), (200, digest(sent)), "{method}");
        assert_eq!(up.last_hit().method, method);
    }
    raw.send(req("DELETE", "/thing", APP, &cookie).as_bytes()).await;
    let r = raw.response(false).await;
    assert_eq!((r.status, up.last_hit().method.as_str()), (200, "DELETE"), "a bodyless DELETE: {r:?}");
    assert_moved(maddr, before, 6, 0, "six requests with and without bodies on one connection").await;
    assert!(up.hits().iter().all(|h| h.path != "/smuggled"), "bytes of a body were taken as a request");

    // What the relay leaves to hyper: the same bodies arrive through it.
    for (what, extra, body) in [
        ("chunked", "Transfer-Encoding: chunked\r\n", &b"3\r\nabc\r\n0\r\n\r\n"[..]),
        ("100-continue", "Expect: 100-continue\r\nContent-Length: 3\r\n", b"abc"),
    ] {
        let before = counts(maddr).await;
        let mut raw = Raw::connect(gw.addr).await;
        let mut m = req("POST", "/digest", APP, &format!("{cookie}{extra}")).into_bytes();
        m.extend_from_slice(body);
        raw.send(&m).await;
        let mut r = raw.response(false).await;
        if r.status == 100 {
            r = raw.response(false).await;
        }
        assert_eq!((r.status, r.text()), (200, digest(b"abc")), "{what}: {r:?}");
        assert_moved(maddr, before, 0, 1, &format!("a {what} body")).await;
    }
    gw.stop().await;
}

/// A client that stops sending in the middle of a relayed body gets no answer made up from half a request, and
/// the app's connection that carried the half body is never used again: the next request, on a new client
/// connection, goes out on a fresh upstream connection and is answered normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_cut_short_by_the_client_closes_both_sides() {
    let (_up, _env, gw, maddr, cookie) = warm_app().await;
    let before = counts(maddr).await;
    let mut raw = Raw::connect(gw.addr).await;
    let mut m = req("POST", "/digest", APP, &format!("{cookie}Content-Length: 100\r\n")).into_bytes();
    m.extend_from_slice(&[b'x'; 10]);
    raw.send(&m).await;
    raw.s.shutdown().await.unwrap();
    assert_eq!(raw.rest().await, b"", "an answer to half a request");
    assert_moved(maddr, before, 1, 0, "the cut POST was the relay's").await;

    let mut raw = Raw::connect(gw.addr).await;
    let mut m = req("POST", "/digest", APP, &format!("{cookie}Content-Length: 4\r\n")).into_bytes();
    m.extend_from_slice(b"next");
    raw.send(&m).await;
    let r = raw.response(false).await;
    assert_eq!((r.status, r.text()), (200, format!("4 {}", hex::encode(Sha256::digest(b"next")))), "{r:?}");
    gw.stop().await;
}

/// An https app is the relay's too: GETs and a POST with a body to an app behind TLS (trusted through its
/// `ca_file`) are relayed (the counters move, nothing is handed over), reach it with the session's identity, and
/// share one pooled TLS connection; an app whose certificate isn't trusted gets the relay's 502, not the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_apps_are_relayed_over_pooled_tls_connections_that_verify_the_app() {
    let (up, pem, accepted) = start_tls_upstream().await;
    let (env, gw, maddr) = {
        let (maddr, metrics) = metrics_section();
        let port = up.addr.port();
        let env = Env::password_only(&format!(
            "{metrics}[[app]]\nhost = \"{APP}\"\nupstream = \"https://localhost:{port}\"\nca_file = \"{{DIR}}/app-ca.pem\"\n\
             policy = \"one_factor\"\n\n[[app]]\nhost = \"{RAW}\"\nupstream = \"https://localhost:{port}\"\npolicy = \"bypass\"\n\n"
        ));
        std::fs::write(env.path().join("app-ca.pem"), &pem).unwrap();
        env.add_user("alice", "alice@example.com", "Alice Liddell", &["staff"], PW).await;
        let gw = env.start().await;
        (env, gw, maddr)
    };
    let c = warm_session(&gw).await;
    let cookie = format!("Cookie: {}\r\n", c.cookie_header());
    let connections = accepted.load(Ordering::SeqCst);
    let before = counts(maddr).await;
    let mut raw = Raw::connect(gw.addr).await;
    for i in 0..3 {
        raw.send(req("GET", &format!("/tls/{i}"), APP, &format!("{cookie}Remote-User: admin\r\n")).as_bytes()).await;
        let r = raw.response(false).await;
        assert_eq!(r.status, 200, "GET {i} to the https app: {r:?}");
        assert_eq!(r.json()["path"], format!("/tls/{i}"));
        assert_eq!(up.last_hit().header("remote-user"), Some(vec!["alice".to_string()]), "GET {i}");
    }
    let mut post = req("POST", "/digest", APP, &format!("{cookie}Content-Length: 5\r\n")).into_bytes();
    post.extend_from_slice(b"hello");
    raw.send(&post).await;
    let r = raw.response(false).await;
    assert_eq!((r.status, r.text()), (200, format!("5 {}", hex::encode(Sha256::digest(b"hello")))), "POST: {r:?}");
    assert_moved(maddr, before, 4, 0, "three GETs and a POST to an https app").await;
    assert!(
        accepted.load(Ordering::SeqCst) <= connections + 1,
        "the app accepted {} connections for four requests on one client connection",
        accepted.load(Ordering::SeqCst) - connections
    );

    // Without the app's CA (the bypass app has no ca_file): the certificate is refused, the request never answered
    // by the app.
    let hits = up.hit_count();
    let before = counts(maddr).await;
    raw.send(req("GET", "/untrusted", RAW, "").as_bytes()).await;
    let r = raw.response(false).await;
    assert_eq!(r.status, 502, "an app whose certificate is not trusted: {r:?}");
    assert_eq!(up.hit_count(), hits, "the untrusted app got the request");
    assert_moved(maddr, before, 1, 0, "the refused https request was the relay's").await;
    gw.stop().await;
    drop(env);
}

/// HTTP/2 requests reach the app through the relay's pooled HTTP/1.1 client, the one every path uses: over h2 (TLS
/// to the gateway, TLS to an https app) a 300 KiB binary POST with a length arrives byte for byte with one canonical
/// `Content-Length`, a body streamed in pieces without a length arrives byte for byte chunked, a GET follows. Each
/// goes over a pooled connection: a POST takes the one the session's first request opened, and since a connection
/// that carried a body is never used again (SECURITY.md), the second POST and the GET open one each; a relayed
/// http/1.1 GET of the same user then takes the GET's connection from the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_requests_and_their_bodies_reach_the_app_byte_for_byte_over_the_relays_pooled_connections() {
    let (up, pem, accepted) = start_tls_upstream().await;
    let (maddr, metrics) = metrics_section();
    let env = Env::password_only(&format!(
        "[server]\ntls_cert = \"{{DIR}}/cert.pem\"\ntls_key = \"{{DIR}}/key.pem\"\n\n{metrics}[[app]]\nhost = \"{APP}\"\n\
         upstream = \"https://localhost:{}\"\nca_file = \"{{DIR}}/app-ca.pem\"\npolicy = \"one_factor\"\n\n",
        up.addr.port()
    ));
    let ck = rcgen::generate_simple_self_signed(vec![APP.to_string()]).unwrap();
    std::fs::write(env.path().join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(env.path().join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
    std::fs::write(env.path().join("app-ca.pem"), &pem).unwrap();
    env.add_user("alice", "alice@example.com", "Alice Liddell", &["staff"], PW).await;
    let gw = env.start_unchecked().await;
    let cert = ck.cert;
    let mut c = tls_sign_in(&gw, &cert).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "the warm-up GET opened one connection to the app");

    let mut h2 = tls_h2(gw.addr, &cert).await;
    let before = counts(maddr).await;
    let sized: Vec<u8> = (0..300 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let streamed: Vec<Vec<u8>> = (0..5u8).map(|k| vec![k.wrapping_mul(37); 10_000 + usize::from(k) * 777]).collect();
    let whole: Vec<u8> = streamed.concat();
    for (what, body, want) in [
        ("a 300 KiB POST with a length", Full::new(Bytes::from(sized.clone())).boxed(), &sized),
        (
            "a POST streamed without a length",
            http_body_util::StreamBody::new(futures_util::stream::iter(
                streamed.iter().map(|p| Ok(hyper::body::Frame::data(Bytes::from(p.clone())))).collect::<Vec<_>>(),
            ))
            .boxed(),
            &whole,
        ),
    ] {
        let request = Request::post(format!("https://{APP}/digest"))
            .header("cookie", c.cookie_header())
            .header("remote-user", "admin")
            .header("content-type", "application/octet-stream")
            .body(body)
            .unwrap();
        let r = within(what, h2.send_request(request)).await.unwrap_or_else(|e| panic!("{what}: {e}"));
        let r = into_resp(r, &mut c).await;
        assert_eq!(r.version, hyper::Version::HTTP_2, "{what}");
        assert_eq!(
            r.text(),
            format!("{} {}", want.len(), hex::encode(Sha256::digest(want))),
            "{what}: the app's digest"
        );
        let hit = up.last_hit();
        assert_eq!(hit.header("remote-user"), Some(vec!["alice".to_string()]), "{what}: identity at the app");
        let framing = (hit.header("content-length"), hit.header("transfer-encoding"));
        if want.len() == sized.len() {
            assert_eq!(framing, (Some(vec![sized.len().to_string()]), None), "{what}: framing at the app");
        } else {
            assert_eq!(framing, (None, Some(vec!["chunked".to_string()])), "{what}: framing at the app");
        }
    }
    let request = Request::get(format!("https://{APP}/after/h2")).header("cookie", c.cookie_header());
    let r = within("GET over h2", h2.send_request(request.body(Full::new(Bytes::new()).boxed()).unwrap())).await;
    let r = into_resp(r.expect("GET over h2"), &mut c).await;
    assert_eq!((r.status, r.upstream_path()), (200, "/after/h2".to_string()), "GET over h2: {}", r.text());
    assert_moved(maddr, before, 0, 0, "h2 requests are hyper's to parse").await;

    assert_eq!(accepted.load(Ordering::SeqCst), 3, "each POST's connection closed after its answer");
    // A relayed http/1.1 GET of the same user takes the same upstream connection.
    let mut h1 = tls_h1(gw.addr, &cert).await;
    let r = tls_send(&mut h1, &mut c, "GET", "/relayed", &[], None).await;
    assert_eq!(r.status, 200, "relayed GET: {}", r.text());
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        3,
        "h2 and relayed GETs of one user should share the one pooled upstream connection"
    );
    gw.stop().await;
    drop(env);
}

/// A browser's sign-in on one keep-alive connection never leaves the relay: the redirect to the login page, the
/// page, the form post and the first proxied request after it are all served on the relay (the first three by the
/// gateway's own handlers, the fourth forwarded), with no handover to hyper; a refusal (403) and a portal page
/// later on the same connection keep it there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_in_and_the_requests_after_it_stay_on_the_relays_connection() {
    let up = start_upstream().await;
    let cfg = format!("{}[[app.rule]]\npath = \"/closed\"\npolicy = \"deny\"\n\n", app(APP, &up.url(), "one_factor"));
    let (_env, gw, maddr) = gateway(&cfg).await;
    let before = counts(maddr).await;
    let local = metric(maddr, "portcullis_relay_local_answers_total").await;
    let mut raw = Raw::connect(gw.addr).await;
    let html = "Accept: text/html\r\n";

    raw.send(req("GET", "/private?x=1", APP, html).as_bytes()).await;
    let r = raw.response(false).await;
    assert_eq!(r.status, 302, "no session: to the login page: {r:?}");
    let login = r.header("location").unwrap_or_default().to_string();
    assert!(login.contains("/login"), "redirected to {login}");

    raw.send(req("GET", &format!("{PREFIX}/login?rd=%2F"), APP, html).as_bytes()).await;
    let r = raw.response(false).await;
    assert_eq!(r.status, 200, "login page: {r:?}");
    let csrf = extract_csrf(&r.text()).unwrap_or_else(|| panic!("no csrf field: {}", r.text()));
    let cookie_of = |m: &Msg| -> String {
        m.all("set-cookie")
            .iter()
            .map(|c| c.split(';').next().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
            .join("; ")
    };
    let csrf_cookie = cookie_of(&r);
    assert!(!csrf_cookie.is_empty(), "the login page set no cookie: {r:?}");

    let form =
        serde_urlencoded::to_string([("csrf", csrf.as_str()), ("rd", "/"), ("username", "alice"), ("password", PW)])
            .unwrap();
    let head = format!(
        "{html}Cookie: {csrf_cookie}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
        form.len()
    );
    let mut post = req("POST", &format!("{PREFIX}/login"), APP, &head).into_bytes();
    post.extend_from_slice(form.as_bytes());
    raw.send(&post).await;
    let r = raw.response(false).await;
    assert_eq!(r.status, 303, "sign-in: {r:?}");
    let session = cookie_of(&r);
    assert!(session.contains('='), "no session cookie: {r:?}");

    raw.send(req("GET", "/after", APP, &format!("Cookie: {session}\r\nRemote-User: admin\r\n")).as_bytes()).await;
    let r = raw.response(false).await;
    assert_eq!((r.status, r.json()["path"].as_str()), (200, Some("/after")), "first request signed in: {r:?}");
    assert_eq!(up.last_hit().header("remote-user"), Some(vec!["alice".to_string()]));

    raw.send(req("GET", "/closed", APP, &format!("Cookie: {session}\r\n")).as_bytes()).await;
    assert_eq!(raw.response(false).await.status, 403, "a deny rule");
    raw.send(req("HEAD", &format!("{PREFIX}/login"), APP, html).as_bytes()).await;
    let r = raw.response(true).await;
    assert!(r.body.is_empty(), "a HEAD answer with a body: {r:?}");
    raw.send(req("GET", "/again", APP, &format!("Cookie: {session}\r\n")).as_bytes()).await;
    assert_eq!(raw.response(false).await.status, 200, "and back to the app");

    assert_moved(maddr, before, 2, 0, "two forwarded requests, no handover").await;
    assert_eq!(metric(maddr, "portcullis_relay_local_answers_total").await - local, 5, "five answered by the handlers");
    gw.stop().await;
}

/// The relay's upstream pool holds at most `max_idle_connections` idle connections, whatever the load opened:
/// after a burst of 8 concurrent requests (8 connections to the app, each answer 1.5 s away) only 2 stay, so the next burst of 8 opens 6
/// new ones and re-uses 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_pool_keeps_no_more_idle_connections_than_its_limit() {
    let (up, pem, accepted) = start_tls_upstream().await;
    let (maddr, metrics) = metrics_section();
    let env = Env::password_only(&format!(
        "{metrics}[[app]]\nhost = \"{RAW}\"\nupstream = \"https://localhost:{}\"\nca_file = \"{{DIR}}/app-ca.pem\"\n\
         policy = \"bypass\"\nmax_idle_connections = 2\n\n",
        up.addr.port()
    ));
    std::fs::write(env.path().join("app-ca.pem"), &pem).unwrap();
    let gw = env.start().await;
    let burst = |round: usize| {
        let addr = gw.addr;
        async move {
            let tasks: Vec<_> = (0..8)
                .map(|i| {
                    tokio::spawn(async move {
                        let mut raw = Raw::connect(addr).await;
                        raw.send(req("GET", &format!("/sleep?ms=1500&r={round}&i={i}"), RAW, "").as_bytes()).await;
                        raw.response(false).await.status
                    })
                })
                .collect();
            for t in tasks {
                assert_eq!(t.await.unwrap(), 200, "round {round}");
            }
        }
    };
    let before = counts(maddr).await;
    burst(0).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 8, "eight concurrent requests, eight connections");
    burst(1).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 8 + 6, "two idle connections were kept and re-used, no more");
    assert_moved(maddr, before, 16, 0, "both bursts on the relay").await;
    gw.stop().await;
    drop(up);
}

/// An HTTP/2 GET sent as HEADERS without END_STREAM and then an empty DATA frame that ends the stream carries no
/// body (RFC 9113 §8.1; some clients send it): it reaches the app as a plain GET, where it used to be a 400. A GET
/// whose DATA carries bytes is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_get_ended_by_an_empty_data_frame_is_a_bodyless_get() {
    let up = start_upstream().await;
    let (env, gw, _maddr, cert) = tls_gateway(&app(APP, &up.url(), "bypass")).await;
    let mut h2 = tls_h2(gw.addr, &cert).await;
    let frames: Vec<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>> = Vec::new();
    // No frames, and no word of it up front: hyper sends HEADERS, then DATA of length 0 with END_STREAM.
    let empty = http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed();
    let request = Request::get(format!("https://{APP}/h2-empty")).body(empty).unwrap();
    let r = within("h2 GET", h2.send_request(request)).await.expect("h2 GET");
    assert_eq!(r.status(), 200, "an h2 GET ended by an empty DATA frame");
    let hit = up.last_hit();
    assert_eq!(hit.path, "/h2-empty");
    assert_eq!((hit.header("content-length"), hit.header("transfer-encoding")), (None, None), "{hit:?}");
    let data = Full::new(Bytes::from_static(b"GET /admin HTTP/1.1\r\n\r\n")).boxed();
    let request = Request::get(format!("https://{APP}/h2-data")).body(data).unwrap();
    let r = within("h2 GET with data", h2.send_request(request)).await.expect("h2 GET with data");
    assert_eq!(r.status(), 400, "an h2 GET with bytes in its DATA");
    assert_eq!(up.hit_count(), 1, "the GET with data reached the app");
    gw.stop().await;
    drop(env);
}
