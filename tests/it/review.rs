//! The second outside review of the relay paths (issue "Hardening, second round"): each test drives the real gateway
//! against a scripted app that misbehaves the way the review's did, on every lane the finding applies to.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::hardening::{closed_within, echoes, open_tunnel};
use crate::relay::gateway;
use crate::support::*;

/// A one_factor app.
const APP: &str = "app.test";
/// A bypass app on a scripted upstream.
const RAW: &str = "raw.test";
/// RFC 6455 §1.3's example key and the accept value it calls for.
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

// ---------------------------------------------------------------------------------------------
// A scripted app
// ---------------------------------------------------------------------------------------------

/// Starts an app on 127.0.0.1:0 that runs `serve` for every connection it accepts (with the connection's index);
/// returns its address.
async fn scripted<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(TcpStream, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(serve(s, n));
            n += 1;
        }
    });
    addr
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// Appends everything `s` still sends to `into` until it closes.
async fn drain_into(s: &mut TcpStream, mut buf: Vec<u8>, into: &Mutex<Vec<u8>>) {
    let mut tmp = [0u8; 16384];
    loop {
        into.lock().unwrap().append(&mut buf);
        match s.read(&mut tmp).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// A WebSocket opening handshake for `path` on `host`, steered to `lane`.
fn ws_handshake(host: &str, path: &str, lane: Lane, extra: &str) -> String {
    let steer: String = lane.headers().iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}{steer}\r\n"
    )
}

/// Reads a response head from the gateway.
async fn read_response_head(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    within("response head", read_head(s, &mut buf)).await.unwrap_or_default()
}

fn status(head: &str) -> u16 {
    head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// 7. A 101 is a tunnel only with the handshake's Sec-WebSocket-Accept
// ---------------------------------------------------------------------------------------------

/// An app that answers 101 without the accept value the client's key calls for (none, or a wrong one) and goes on
/// speaking HTTP must not get a tunnel: what the client sent next (say, a request claiming `Remote-User: admin`)
/// would reach it unfiltered. The right value still opens one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_101_without_the_handshakes_accept_key_opens_no_tunnel_on_either_lane() {
    let after: Arc<Mutex<Vec<u8>>> = Arc::default();
    let seen = after.clone();
    let addr = scripted(move |mut s, _| {
        let seen = seen.clone();
        async move {
            let mut buf = Vec::new();
            let Some(head) = read_head(&mut s, &mut buf).await else { return };
            let accept = match head.split_whitespace().nth(1).unwrap_or_default() {
                "/none" => String::new(),
                "/wrong" => "Sec-WebSocket-Accept: dGhlIHNhbXBsZSBub25jZQ==\r\n".to_string(),
                "/two" => format!("Sec-WebSocket-Accept: {WS_ACCEPT}\r\nSec-WebSocket-Accept: {WS_ACCEPT}\r\n"),
                _ => {
                    let key = header(&head, "sec-websocket-key").unwrap_or_default();
                    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
                    format!("Sec-WebSocket-Accept: {accept}\r\n")
                }
            };
            let answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{accept}\r\n"
            );
            if s.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
            drain_into(&mut s, buf, &seen).await;
        }
    })
    .await;
    let (_env, gw, _maddr) = gateway(&app(RAW, &format!("http://{addr}"), "bypass")).await;
    let smuggled = "GET /admin HTTP/1.1\r\nHost: raw.test\r\nRemote-User: admin\r\n\r\n";
    for lane in Lane::BOTH {
        for path in ["/none", "/wrong", "/two"] {
            let mut s = within("connect", TcpStream::connect(gw.addr)).await.unwrap();
            s.write_all(ws_handshake(RAW, path, lane, "").as_bytes()).await.unwrap();
            let head = read_response_head(&mut s).await;
            assert_eq!(status(&head), 502, "{path} on the {lane:?} lane: {head}");
            // Whatever the client sends now is a request to the gateway, never bytes for the app.
            let _ = s.write_all(smuggled.as_bytes()).await;
            drop(s);
        }
        // The control: with the right accept value the tunnel opens, and carries bytes unparsed.
        let mut s = within("connect", TcpStream::connect(gw.addr)).await.unwrap();
        s.write_all(ws_handshake(RAW, "/right", lane, "").as_bytes()).await.unwrap();
        let head = read_response_head(&mut s).await;
        assert_eq!(status(&head), 101, "the right accept value on the {lane:?} lane: {head}");
        assert_eq!(header(&head, "sec-websocket-accept"), Some(WS_ACCEPT), "{head}");
        s.write_all(b"tunnel bytes").await.unwrap();
        within("tunnel bytes at the app", async {
            while find(&after.lock().unwrap(), b"tunnel bytes").is_none() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        // Nothing of what was sent after a refused 101 (earlier) reached the app.
        let got = String::from_utf8_lossy(&std::mem::take(&mut *after.lock().unwrap())).into_owned();
        assert!(!got.contains("Remote-User"), "on the {lane:?} lane, smuggled bytes reached the app: {got}");
    }
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 1. A tunnel opened while its session ends is closed
// ---------------------------------------------------------------------------------------------

/// The session is checked before the app answers the handshake, the tunnel registered after the 101: a logout in
/// between must still close the tunnel. It used to stay open until the idle limit (an hour by default) whenever
/// another tunnel was open, since the watcher had then already taken in the logout's revocation when the new
/// tunnel joined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_whose_session_ends_during_the_handshake_is_closed_on_both_lanes() {
    let got = Arc::new(tokio::sync::Notify::new());
    let go = Arc::new(tokio::sync::Notify::new());
    let (g, o) = (got.clone(), go.clone());
    let addr = scripted(move |mut s, _| {
        let (got, go) = (g.clone(), o.clone());
        async move {
            let mut buf = Vec::new();
            let Some(head) = read_head(&mut s, &mut buf).await else { return };
            // `/held` answers only when the test says so; any other path at once.
            if head.starts_with("GET /held ") {
                got.notify_one();
                go.notified().await;
            }
            let key = header(&head, "sec-websocket-key").unwrap_or_default();
            let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            let answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {accept}\r\n\r\n"
            );
            if s.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
            // Echo until the gateway closes the tunnel.
            let mut tmp = [0u8; 4096];
            while let Ok(n @ 1..) = s.read(&mut tmp).await {
                if s.write_all(&tmp[..n]).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    let (env, gw, _maddr) = gateway(&app(APP, &format!("http://{addr}"), "one_factor")).await;
    env.add_user("bob", "bob@example.com", "Bob", &[], PW).await;
    // Bob's tunnel stays open throughout, so the watcher is looking at tunnels when alice's session ends.
    let mut bob = gw.client(APP);
    bob.login_ok("bob", PW).await;
    let mut bystander = within("connect", TcpStream::connect(gw.addr)).await.unwrap();
    let cookie = format!("Cookie: {}\r\n", bob.cookie_header());
    bystander.write_all(ws_handshake(APP, "/open", Lane::Relay, &cookie).as_bytes()).await.unwrap();
    assert_eq!(status(&read_response_head(&mut bystander).await), 101, "bob's tunnel");
    for lane in Lane::BOTH {
        let mut c = gw.client(APP);
        c.login_ok("alice", PW).await;
        let cookie = format!("Cookie: {}\r\n", c.cookie_header());
        let mut s = within("connect", TcpStream::connect(gw.addr)).await.unwrap();
        s.write_all(ws_handshake(APP, "/held", lane, &cookie).as_bytes()).await.unwrap();
        within("the handshake at the app", got.notified()).await;
        logout(&mut c).await;
        // Not a synchronisation: this gives the watcher (every 250 ms) time to take in the logout before the tunnel
        // joins, which is what the old race needed; the tunnel must close whether or not it did.
        tokio::time::sleep(Duration::from_secs(1)).await;
        go.notify_one();
        let head = read_response_head(&mut s).await;
        assert_eq!(status(&head), 101, "on the {lane:?} lane: {head}");
        // The tunnel works until the watcher sees the session is gone; then both ends close.
        let closed = within_for(Duration::from_secs(20), "the tunnel to close", async {
            let mut tmp = [0u8; 64];
            loop {
                if s.write_all(b"ping").await.is_err() {
                    return;
                }
                match s.read(&mut tmp).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        closed.await;
    }
    // Bob's tunnel is still open.
    bystander.write_all(b"still here").await.unwrap();
    let mut tmp = [0u8; 16];
    let n = within("bob's echo", bystander.read(&mut tmp)).await.unwrap();
    assert!(n > 0, "bob's tunnel was closed");
    drop(bystander);
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 10. Working in a WebSocket app is activity
// ---------------------------------------------------------------------------------------------

/// With `idle_timeout = "20s"`, a user who sends something through the app's WebSocket every 5 s for 30 s and
/// makes no plain request stays signed in: the tunnels stay open and the next plain request is served. Once the
/// tunnels go quiet past the idle limit, they close and the session is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn working_in_a_websocket_app_keeps_the_session_alive_on_both_lanes() {
    let up = start_upstream().await;
    let (maddr, metrics) = metrics_section();
    let env = Env::password_only(&format!(
        "[session]\nidle_timeout = \"20s\"\n\n{metrics}{}",
        app(APP, &up.url(), "one_factor")
    ));
    env.add_user("alice", "alice@example.com", "Alice Liddell", &["staff"], PW).await;
    let gw = env.start().await;
    let mut c = gw.client(APP);
    c.login_ok("alice", PW).await;
    assert_eq!(c.get("/warm").await.status, 200);
    let mut tunnels = Vec::new();
    for lane in Lane::BOTH {
        tunnels.push((lane, open_tunnel(gw.addr, &c, lane).await));
    }
    const REFRESHES: &str = "portcullis_tunnel_session_refreshes_total";
    for round in 1..=6 {
        let before = metric(maddr, REFRESHES).await;
        gw.clock.advance(5);
        for (lane, ws) in tunnels.iter_mut() {
            assert!(echoes(ws).await, "round {round}: the tunnel on the {lane:?} lane was closed");
        }
        // The watcher saw the traffic and refreshed the session.
        within("a refresh by the tunnels' traffic", async {
            while metric(maddr, REFRESHES).await <= before {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }
    // 30 s after the last plain request, with a 20 s idle limit: still signed in.
    let r = c.get("/after-work").await;
    assert_eq!(r.status, 200, "the session ended though its tunnels were in use: {}", r.text());
    for (lane, ws) in tunnels.iter_mut() {
        assert!(echoes(ws).await, "the tunnel on the {lane:?} lane");
    }
    // Quiet past the idle limit: the tunnels close, and the session with them.
    gw.clock.advance(25);
    for (lane, ws) in tunnels.iter_mut() {
        closed_within(ws, &format!("the quiet tunnel on the {lane:?} lane")).await;
    }
    let r = c.get("/after-quiet").await;
    assert!(is_no_session(&r), "a session idle past its limit was served: {} {}", r.status, r.text());
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Helpers for request/answer scripts
// ---------------------------------------------------------------------------------------------

/// Sends `data` on a new connection to the gateway and reads one final answer: its status and body.
async fn exchange(addr: SocketAddr, data: &[u8]) -> (u16, String) {
    within("an answer from the gateway", async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(data).await.unwrap();
        read_answer(&mut s).await
    })
    .await
}

/// Reads one final answer (1xx skipped, Content-Length framing): its status and body; status 0 when the
/// connection ended first.
async fn read_answer<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> (u16, String) {
    let mut buf = Vec::new();
    loop {
        let Some(head) = read_head(s, &mut buf).await else { return (0, String::new()) };
        if (100..200).contains(&status(&head)) {
            continue;
        }
        let n: usize = header(&head, "content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut tmp = [0u8; 16384];
        while buf.len() < n {
            match s.read(&mut tmp).await {
                Ok(0) | Err(_) => break,
                Ok(k) => buf.extend_from_slice(&tmp[..k]),
            }
        }
        buf.truncate(n);
        return (status(&head), String::from_utf8_lossy(&buf).into_owned());
    }
}

/// Reads one head from `s` (with whatever came after it in `buf`); `None` at the end of the stream.
async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> Option<String> {
    let mut tmp = [0u8; 16384];
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            buf.drain(..end + 4);
            return Some(head);
        }
        match s.read(&mut tmp).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
}

/// A 200 answer of exactly `total` bytes, head included.
fn page_of_size(total: usize) -> String {
    let answer = (total.saturating_sub(64)..total).map(|n| page(&"a".repeat(n))).find(|a| a.len() == total);
    answer.unwrap_or_else(|| panic!("no answer of {total} bytes"))
}

/// `HTTP/1.1 200` with `text` as its body.
fn page(text: &str) -> String {
    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{text}", text.len())
}

// ---------------------------------------------------------------------------------------------
// 2. Bytes rustls already read make a pooled TLS connection unusable
// ---------------------------------------------------------------------------------------------

/// An https app (certificate for `localhost`, its PEM returned) that answers `/big/N` with an answer of exactly N
/// bytes followed, in the same write, by an unasked second answer ("forged"); any other path with `page PATH`.
async fn forging_tls_app() -> (SocketAddr, String) {
    let (acceptor, pem) = localhost_tls();
    let addr = scripted(move |tcp, _| {
        let acceptor = acceptor.clone();
        async move {
            let Ok(mut s) = acceptor.accept(tcp).await else { return };
            let mut buf = Vec::new();
            while let Some(head) = read_head(&mut s, &mut buf).await {
                let path = head.split_whitespace().nth(1).unwrap_or_default().to_string();
                let answer = if let Some(total) = path.strip_prefix("/big/").and_then(|t| t.parse().ok()) {
                    format!("{}{}", page_of_size(total), page("forged"))
                } else {
                    page(&format!("page {path}"))
                };
                if s.write_all(answer.as_bytes()).await.is_err() || s.flush().await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    (addr, pem)
}

/// An https app that sends an unasked second answer in the same write as a 16 KiB one (head included: a TLS
/// record's worth, so the first answer ends where a record does): the second answer is read into rustls with the
/// first, where the TCP-level idle check can't see it. The next request on that pool must get its own answer, on
/// both lanes (answers of 8 and 32 KiB too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unasked_answer_rustls_already_read_is_never_the_next_requests_answer() {
    let (addr, pem) = forging_tls_app().await;
    let (env, gw, _maddr) = {
        let port = addr.port();
        let (maddr, metrics) = metrics_section();
        let env = Env::password_only(&format!(
            "{metrics}[[app]]\nhost = \"{RAW}\"\nupstream = \"https://localhost:{port}\"\n\
             ca_file = \"{{DIR}}/app-ca.pem\"\npolicy = \"bypass\"\n\n"
        ));
        std::fs::write(env.path().join("app-ca.pem"), &pem).unwrap();
        let gw = env.start().await;
        (env, gw, maddr)
    };
    for lane in Lane::BOTH {
        let steer: String = lane.headers().iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
        for round in 0..6 {
            let total = [16384, 8192, 32768][round % 3];
            let big = format!("GET /big/{total} HTTP/1.1\r\nHost: {RAW}\r\n{steer}Connection: close\r\n\r\n");
            let (code, body) = exchange(gw.addr, big.as_bytes()).await;
            assert_eq!((code, page(&body).len()), (200, total), "round {round} on the {lane:?} lane");
            let next = format!("GET /next-{round} HTTP/1.1\r\nHost: {RAW}\r\n{steer}Connection: close\r\n\r\n");
            let got = exchange(gw.addr, next.as_bytes()).await;
            assert_eq!(got, (200, format!("page /next-{round}")), "round {round} on the {lane:?} lane");
        }
    }
    gw.stop().await;
    drop(env);
}

// ---------------------------------------------------------------------------------------------
// 3. A connection that carried a body serves nothing after it
// ---------------------------------------------------------------------------------------------

/// An app route (`/ignore`) that answers a POST before reading its body and keeps the connection: the body is
/// parsed as the app's next request. The app running it can't be prevented, but nothing after it may be confused
/// with it: a body ending in an unfinished `POST` with a length must not swallow the next client's request, and a
/// finished smuggled request's answer must not reach anyone. Both lanes: a plain length (relay) and
/// `Expect: 100-continue` (hyper's parser).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_the_app_does_not_read_never_becomes_another_clients_request() {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let heads = seen.clone();
    let addr = scripted(move |mut s, _| {
        let heads = heads.clone();
        async move {
            let mut buf = Vec::new();
            while let Some(head) = read_head(&mut s, &mut buf).await {
                heads.lock().unwrap().push(head.clone());
                let path = head.split_whitespace().nth(1).unwrap_or_default().to_string();
                if path != "/ignore" {
                    let n: usize = header(&head, "content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
                    let mut tmp = [0u8; 4096];
                    while buf.len() < n {
                        match s.read(&mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => buf.extend_from_slice(&tmp[..k]),
                        }
                    }
                    buf.drain(..n);
                }
                let user = header(&head, "remote-user").unwrap_or("-");
                if s.write_all(page(&format!("answer for {path} as {user}")).as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    let (_env, gw, maddr) = gateway(&app(RAW, &format!("http://{addr}"), "bypass")).await;
    let smuggled = format!("GET /admin HTTP/1.1\r\nHost: {RAW}\r\nRemote-User: admin\r\n\r\n");
    let unfinished = format!("POST /swallow HTTP/1.1\r\nHost: {RAW}\r\nContent-Length: 60\r\n\r\n");
    for (lane, steer) in [(Lane::Relay, ""), (Lane::Hyper, "Expect: 100-continue\r\n")] {
        for body in [&smuggled, &unfinished] {
            let before = counts(maddr).await;
            let post = format!(
                "POST /ignore HTTP/1.1\r\nHost: {RAW}\r\nContent-Length: {}\r\n{steer}Connection: close\r\n\r\n{body}",
                body.len()
            );
            let got = exchange(gw.addr, post.as_bytes()).await;
            assert_eq!(got, (200, "answer for /ignore as -".to_string()), "on the {lane:?} lane");
            lane.assert_served(maddr, before, 1, "the POST").await;
            for i in 0..3 {
                let victim = format!(
                    "GET /victim-{i} HTTP/1.1\r\nHost: {RAW}\r\nCookie: app_session=victims-cookie\r\nConnection: close\r\n\r\n"
                );
                let got = exchange(gw.addr, victim.as_bytes()).await;
                assert_eq!(
                    got,
                    (200, format!("answer for /victim-{i} as -")),
                    "another client's request after a body the app didn't read, on the {lane:?} lane"
                );
            }
        }
    }
    // Every victim request reached the app as a request of its own.
    let heads = seen.lock().unwrap().clone();
    let victims = heads.iter().filter(|h| h.starts_with("GET /victim-")).count();
    assert_eq!(victims, 12, "victim requests seen as requests by the app: {heads:#?}");
    gw.stop().await;
}

/// The request-head lines that steer a request with a body to a lane: a plain length is the relay's; with
/// `Expect: 100-continue`, hyper's parser takes it.
const BODY_LANES: [(Lane, &str); 2] = [(Lane::Relay, ""), (Lane::Hyper, "Expect: 100-continue\r\n")];

/// Sends `head` on a new connection, then the body in `pieces` (`gap` apart, then the connection stays open), while
/// reading the gateway's final answer (1xx skipped): its status and body. Write errors are ignored: the gateway may
/// answer and close before taking the whole body.
async fn upload(addr: SocketAddr, head: String, pieces: Vec<Vec<u8>>, gap: Duration) -> (u16, String) {
    let s = within("connect", TcpStream::connect(addr)).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        if wr.write_all(head.as_bytes()).await.is_err() {
            return wr;
        }
        for p in pieces {
            tokio::time::sleep(gap).await;
            if wr.write_all(&p).await.is_err() {
                break;
            }
        }
        wr
    });
    let got = within_for(Duration::from_secs(60), "an answer to the upload", read_answer(&mut rd)).await;
    writer.abort();
    got
}

/// An app that reads each request with its `Content-Length` body and answers `got N`; `/refuse` is answered with
/// 413 and the connection closed before any of the body is read; `/ignore` is answered at once and its body left
/// to be read as the next request.
async fn upload_app() -> SocketAddr {
    upload_app_counted().await.0
}

/// [`upload_app`] and the number of connections it accepted.
async fn upload_app_counted() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    let addr = scripted(move |mut s, _| {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            let mut buf = Vec::new();
            while let Some(head) = read_head(&mut s, &mut buf).await {
                if head.split_whitespace().nth(1) == Some("/refuse") {
                    let _ = s
                        .write_all(
                            b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big!",
                        )
                        .await;
                    return;
                }
                if head.split_whitespace().nth(1) == Some("/ignore") {
                    if s.write_all(page("ignored").as_bytes()).await.is_err() {
                        return;
                    }
                    continue;
                }
                let n: usize = header(&head, "content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
                let mut tmp = [0u8; 65536];
                while buf.len() < n {
                    match s.read(&mut tmp).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => buf.extend_from_slice(&tmp[..k]),
                    }
                }
                buf.drain(..n);
                if s.write_all(page(&format!("got {n}")).as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    (addr, accepted)
}

// ---------------------------------------------------------------------------------------------
// 4. upstream_timeout starts once the request is sent; a slow upload has its own limit
// ---------------------------------------------------------------------------------------------

/// With `upstream_timeout = "2s"`, a 4 KB body sent a kilobyte every 800 ms reaches the app and its answer comes
/// back, on both lanes; with `body_timeout = "1s"`, an upload that stops halfway is answered 408.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_is_bounded_by_the_body_timeout_not_the_upstream_timeout() {
    let addr = upload_app().await;
    let (_env, gw, _maddr) = gateway(&format!(
        "[server]\nbody_timeout = \"1s\"\n\n[[app]]\nhost = \"{RAW}\"\nupstream = \"http://{addr}\"\npolicy = \"bypass\"\n\
         upstream_timeout = \"2s\"\n\n"
    ))
    .await;
    for (lane, steer) in BODY_LANES {
        let head = format!("POST /slow HTTP/1.1\r\nHost: {RAW}\r\nContent-Length: 4096\r\n{steer}\r\n");
        let pieces = vec![vec![b'x'; 1024]; 4];
        let got = upload(gw.addr, head, pieces, Duration::from_millis(800)).await;
        assert_eq!(got, (200, "got 4096".to_string()), "a slow upload on the {lane:?} lane");
        let head = format!("POST /stalled HTTP/1.1\r\nHost: {RAW}\r\nContent-Length: 4096\r\n{steer}\r\n");
        let (code, _) = upload(gw.addr, head, vec![vec![b'x'; 1024]], Duration::ZERO).await;
        assert_eq!(code, 408, "an upload that stopped halfway on the {lane:?} lane");
    }
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 6. An answer that came before the body was taken is passed on
// ---------------------------------------------------------------------------------------------

/// An app that refuses an 8 MB upload with 413 and closes before reading it: the client gets the 413, not a 502,
/// on both lanes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_413_from_the_app_reaches_the_client_on_both_lanes() {
    let addr = upload_app().await;
    let (_env, gw, _maddr) = gateway(&app(RAW, &format!("http://{addr}"), "bypass")).await;
    for (lane, steer) in BODY_LANES {
        let n = 8 * 1024 * 1024;
        let head = format!("POST /refuse HTTP/1.1\r\nHost: {RAW}\r\nContent-Length: {n}\r\n{steer}\r\n");
        let pieces = vec![vec![b'x'; 64 * 1024]; n / (64 * 1024)];
        let got = upload(gw.addr, head, pieces, Duration::ZERO).await;
        assert_eq!(got, (413, "too big!".to_string()), "on the {lane:?} lane");
    }
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 8. A Host that is not a host is refused before any app is chosen
// ---------------------------------------------------------------------------------------------

/// Near-misses of a configured name used to miss it and fall through to the `*` app, unauthenticated. Each is a
/// 400 on both lanes (RFC 9112 §3.2), and neither app sees a request; the real name and the `*` app still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_is_not_a_host_is_refused_before_any_app_on_both_lanes() {
    let up = start_upstream().await;
    let (_env, gw, maddr) =
        gateway(&format!("{}{}", app("admin.test", &up.url(), "one_factor"), app("*", &up.url(), "bypass"))).await;
    for lane in Lane::BOTH {
        let steer: String = lane.headers().iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
        for host in ["admin.test..", ".admin.test", "admin .test", "admin.test:abc", "admin..test", "[::1", "a:b:c"] {
            let r = raw_get(gw.addr, host, "/secret", &steer).await;
            assert_eq!(r.status, 400, "Host {host:?} on the {lane:?} lane: {}", r.head);
        }
        let before = counts(maddr).await;
        let r = raw_get(gw.addr, "admin.test.", "/secret", &steer).await;
        assert_eq!(r.status, 401, "the configured name with its trailing dot needs a session: {}", r.head);
        let r = raw_get(gw.addr, "other.test:8080", "/open", &steer).await;
        assert_eq!(r.status, 200, "another name goes to the * app: {}", r.head);
        if lane == Lane::Relay {
            let delta = counts(maddr).await - before;
            assert_eq!(delta.handovers, 0, "valid hosts stayed on the relay");
        }
    }
    assert_eq!(up.hit_count(), 2, "only the two valid requests reached an app: {:?}", up.hits());
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. A client that stops reading is disconnected after send_timeout
// ---------------------------------------------------------------------------------------------

/// An app that answers any request with a 64 MB file, written as fast as it is taken; the semaphore gets a permit
/// for each connection whose writes failed (the gateway closed it).
async fn big_file_app() -> (SocketAddr, Arc<tokio::sync::Semaphore>) {
    let closed = Arc::new(tokio::sync::Semaphore::new(0));
    let done = closed.clone();
    let addr = scripted(move |mut s, _| {
        let done = done.clone();
        async move {
            let mut buf = Vec::new();
            if read_head(&mut s, &mut buf).await.is_none() {
                return;
            }
            let n = 64 * 1024 * 1024;
            let chunk = vec![b'z'; 256 * 1024];
            let mut sent = 0;
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n");
            let mut ok = s.write_all(head.as_bytes()).await.is_ok();
            while ok && sent < n {
                ok = s.write_all(&chunk).await.is_ok();
                sent += chunk.len();
            }
            if !ok {
                done.add_permits(1);
            }
        }
    })
    .await;
    (addr, closed)
}

/// Clients that GET a 64 MB bypassed file and read nothing used to hold the app's connection for as long as they
/// stayed connected. With `send_timeout = "1s"`, once the gateway's writes to such a client stall for a second,
/// the client's connection and the app's are closed, on both lanes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_and_the_apps_connection_closed() {
    let (addr, closed) = big_file_app().await;
    let (_env, gw, _maddr) =
        gateway(&format!("[server]\nsend_timeout = \"1s\"\n\n{}", app(RAW, &format!("http://{addr}"), "bypass"))).await;
    let mut clients = Vec::new();
    for lane in Lane::BOTH {
        let steer: String = lane.headers().iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
        let mut s = within("connect", TcpStream::connect(gw.addr)).await.unwrap();
        s.write_all(format!("GET /big.iso HTTP/1.1\r\nHost: {RAW}\r\n{steer}\r\n").as_bytes()).await.unwrap();
        // Read nothing.
        clients.push(s);
    }
    let both = within_for(Duration::from_secs(60), "the app's connections to be closed", closed.acquire_many(2));
    both.await.unwrap().forget();
    drop(clients);
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 11. Secure cookies over plain HTTP say so
// ---------------------------------------------------------------------------------------------

/// Following an example with `secure = true` on a host without TLS, the browser drops the gateway's Secure
/// cookies and the password form used to answer only "This form has expired". `check-config` now warns, the page
/// says what is wrong, and the log names the setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_cookies_over_plain_http_are_named_by_check_config_the_page_and_the_log() {
    let up = start_upstream().await;
    let env = Env::new(&format!(
        "[server]\nlisten = \"{{LISTEN}}\"\n\n[session]\nsecure = true\n\n{}",
        app(APP, &up.url(), "two_factor")
    ));
    env.add_user("alice", "alice@example.com", "Alice Liddell", &[], PW).await;
    let out = env.cli(&["check-config"], None).await;
    assert!(out.status.success(), "check-config: {}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("warning:") && stderr.contains("secure = true"), "check-config said: {stderr}");

    let gw = env.spawn_child().await;
    let mut c = gw.client(APP);
    let csrf = c.login_csrf("/").await;
    let set = c.jar.clone();
    assert!(!set.is_empty(), "the login page set its cookie");
    // What a browser does with a Secure cookie over http: it doesn't send it back.
    c.jar.clear();
    let r = c.post_login(&csrf, "alice", PW, "/").await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("https"), "the page doesn't name the cause: {}", r.text());
    assert!(!r.text().contains("expired"), "the page blames an expired form: {}", r.text());
    let log = gw.log();
    assert!(log.contains("secure = true"), "the log doesn't name the cause:\n{log}");

    // With TLS or a trusted proxy configured, the config is fine and nothing is said.
    let quiet = Env::new(&format!(
        "[server]\ntrusted_proxies = [\"127.0.0.1/32\"]\n\n[session]\nsecure = true\n\n{}",
        app(APP, &up.url(), "two_factor")
    ));
    let out = quiet.cli(&["check-config"], None).await;
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("warning:"), "{}", String::from_utf8_lossy(&out.stderr));
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The same over HTTP/2
// ---------------------------------------------------------------------------------------------

/// HTTP/2 streams reach the app through the upstream client hyper's lane uses; over h2 too, an early 413 is passed
/// on (6), a body the app doesn't read never becomes another client's request (3), and an `:authority` that is not
/// a host is a 400 (8).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http2_early_answers_unread_bodies_and_bad_authorities_hold_too() {
    use http_body_util::{BodyExt, Full};
    let addr = upload_app().await;
    let (env, gw, _maddr, cert) = crate::relay::tls_gateway(&app(APP, &format!("http://{addr}"), "bypass")).await;
    let mut h2 = crate::relay::tls_h2(gw.addr, &cert).await;
    let mut send = async |method: &str, path: &str, body: Vec<u8>| {
        let request = hyper::Request::builder()
            .method(method)
            .uri(format!("https://{APP}{path}"))
            .body(Full::new(bytes::Bytes::from(body)).boxed())
            .unwrap();
        let what = format!("{method} {path} over h2");
        within(&what, h2.ready()).await.unwrap_or_else(|e| panic!("{what}: {e}"));
        let r = within(&what, h2.send_request(request)).await.unwrap_or_else(|e| panic!("{what}: {e}"));
        let status = r.status().as_u16();
        let body = within(&what, r.into_body().collect()).await.map(|b| b.to_bytes()).unwrap_or_default();
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    let got = send("POST", "/refuse", vec![b'x'; 8 * 1024 * 1024]).await;
    assert_eq!(got, (413, "too big!".to_string()), "an early 413 over h2");
    let unfinished = format!("POST /swallow HTTP/1.1\r\nHost: {APP}\r\nContent-Length: 60\r\n\r\n");
    let got = send("POST", "/ignore", unfinished.into_bytes()).await;
    assert_eq!(got, (200, "ignored".to_string()));
    for i in 0..3 {
        let got = send("GET", &format!("/victim-{i}"), Vec::new()).await;
        assert_eq!(got, (200, "got 0".to_string()), "a GET after a body the app didn't read, over h2");
    }
    let got = send("GET", "/x", Vec::new()).await;
    assert_eq!(got.0, 200, "the control");
    let request = hyper::Request::get("https://app.test../x").body(Full::new(bytes::Bytes::new()).boxed()).unwrap();
    let r = within("a bad :authority", h2.send_request(request)).await.expect("a bad :authority");
    assert_eq!(r.status(), 400, "an :authority that is not a host over h2");
    gw.stop().await;
    drop(env);
}

/// `[[app]] reuse_after_body = true` is the opt-in for an app known to read every body: uploads one after another
/// then share one upstream connection, on both lanes; by default each takes its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reuse_after_body_is_an_opt_in_per_app() {
    let (addr, accepted) = upload_app_counted().await;
    let (_env, gw, _maddr) = gateway(&format!(
        "{}[[app]]\nhost = \"reuse.test\"\nupstream = \"http://{addr}\"\npolicy = \"bypass\"\nreuse_after_body = true\n\n",
        app(RAW, &format!("http://{addr}"), "bypass")
    ))
    .await;
    for (host, reuse) in [(RAW, false), ("reuse.test", true)] {
        for (lane, steer) in BODY_LANES {
            let before = accepted.load(std::sync::atomic::Ordering::SeqCst);
            // One after another on one client connection: each answer is done, its upstream connection back in the
            // pool or closed, before the next request is read.
            let mut s = within("connect", TcpStream::connect(gw.addr)).await.unwrap();
            for i in 0..3 {
                let post = format!("POST /up-{i} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3\r\n{steer}\r\nabc");
                s.write_all(post.as_bytes()).await.unwrap();
                let got = within("an upload's answer", read_answer(&mut s)).await;
                assert_eq!(got, (200, "got 3".to_string()), "{host} {lane:?}");
            }
            drop(s);
            let opened = accepted.load(std::sync::atomic::Ordering::SeqCst) - before;
            // With the opt-in, the one connection may already be idle in the pool from the other lane's uploads.
            let fits = if reuse { opened <= 1 } else { opened == 3 };
            assert!(fits, "{opened} upstream connections for three uploads to {host} on the {lane:?} lane");
        }
    }
    gw.stop().await;
}

/// A client connection whose reads can be stopped: from then on it reads nothing (no PING answered, no window
/// granted), while the socket stays open.
struct Pausable<S> {
    io: S,
    paused: Arc<std::sync::atomic::AtomicBool>,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Pausable<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.paused.load(std::sync::atomic::Ordering::SeqCst) {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Pausable<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, data)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Over HTTP/2 a client that stops reading stalls on flow control, not on a socket write: the gateway's PINGs
/// (every `send_timeout`, answered within it) find it, and its connection and the app's are closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_stops_reading_is_cut_off_and_the_apps_connection_closed() {
    use http_body_util::{BodyExt, Full};
    let (addr, closed) = big_file_app().await;
    let apps = app(APP, &format!("http://{addr}"), "bypass");
    let (env, gw, _maddr, cert) = crate::relay::tls_gateway_with("send_timeout = \"1s\"\n", &apps).await;
    let tls = crate::relay::tls_connect(gw.addr, &cert, b"h2").await;
    let paused = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let io = Pausable { io: tls, paused: paused.clone() };
    let (mut h2, conn) = within(
        "h2 handshake",
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(io)),
    )
    .await
    .expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let request =
        hyper::Request::get(format!("https://{APP}/big.iso")).body(Full::new(bytes::Bytes::new()).boxed()).unwrap();
    let r: hyper::Response<hyper::body::Incoming> = within("h2 GET", h2.send_request(request)).await.expect("h2 GET");
    assert_eq!(r.status(), 200);
    // Read nothing more.
    paused.store(true, std::sync::atomic::Ordering::SeqCst);
    let one = within_for(Duration::from_secs(60), "the app's connection to be closed", closed.acquire());
    one.await.unwrap().forget();
    drop(r);
    conn.abort();
    gw.stop().await;
    drop(env);
}

/// What the HTTP/2 stall tests share: the 64 MB app behind a TLS gateway with `send_timeout = "1s"`, and an HTTP/2
/// client with a fixed 64 KiB window whose connection task runs throughout (it reads every frame and answers every
/// PING), having asked for the file.
struct BigOverH2 {
    env: Env,
    gw: Gateway,
    /// A permit for each of the app's connections closed mid-answer.
    closed: Arc<tokio::sync::Semaphore>,
    answer: hyper::Response<hyper::body::Incoming>,
    conn: tokio::task::JoinHandle<Result<(), hyper::Error>>,
    /// Kept: without a sender hyper's client ends its connection.
    _send: hyper::client::conn::http2::SendRequest<crate::relay::H2Body>,
}

async fn big_file_over_narrow_h2() -> BigOverH2 {
    use http_body_util::{BodyExt, Full};
    let (addr, closed) = big_file_app().await;
    let apps = app(APP, &format!("http://{addr}"), "bypass");
    let (env, gw, _maddr, cert) = crate::relay::tls_gateway_with("send_timeout = \"1s\"\n", &apps).await;
    let tls = crate::relay::tls_connect(gw.addr, &cert, b"h2").await;
    let (mut h2, conn) = within(
        "h2 handshake",
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .adaptive_window(false)
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(65_535)
            .handshake(hyper_util::rt::TokioIo::new(tls)),
    )
    .await
    .expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let request =
        hyper::Request::get(format!("https://{APP}/big.iso")).body(Full::new(bytes::Bytes::new()).boxed()).unwrap();
    let answer = within("h2 GET", h2.send_request(request)).await.expect("h2 GET");
    assert_eq!(answer.status(), 200);
    BigOverH2 { env, gw, closed, answer, conn, _send: h2 }
}

/// Item 5 over HTTP/2, the other way to stop: a client that keeps its connection alive (it answers PINGs, its TCP
/// reads go on) but grants no more flow-control window, so the gateway never has a write to time out. The answer
/// has waited on the client for `send_timeout`: the app's connection is let go (src/proxy/stall.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_grants_no_window_is_cut_off_and_the_apps_connection_closed() {
    let BigOverH2 { env, gw, closed, answer: r, conn, _send } = big_file_over_narrow_h2().await;
    // The body is never read, so no WINDOW_UPDATE is sent once the first 64 KiB have arrived.
    let one = within_for(Duration::from_secs(60), "the app's connection to be closed", closed.acquire());
    one.await.unwrap().forget();
    assert!(!conn.is_finished(), "the client's connection ended: the test no longer shows a live, windowless client");
    drop(r);
    conn.abort();
    gw.stop().await;
    drop(env);
}

/// A stream the client resets (a tab closed, a seek in a video) releases the app's connection at once, not at the
/// stall watchdog's next look (`send_timeout`, 60 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_the_client_resets_lets_go_of_the_apps_connection_at_once() {
    use http_body_util::{BodyExt, Full};
    let (addr, closed) = big_file_app().await;
    let apps = app(APP, &format!("http://{addr}"), "bypass");
    let (env, gw, _maddr, cert) = crate::relay::tls_gateway_with("send_timeout = \"60s\"\n", &apps).await;
    let mut h2 = crate::relay::tls_h2(gw.addr, &cert).await;
    let request =
        hyper::Request::get(format!("https://{APP}/big.iso")).body(Full::new(bytes::Bytes::new()).boxed()).unwrap();
    within("h2 ready", h2.ready()).await.unwrap();
    let r = within("h2 GET", h2.send_request(request)).await.expect("h2 GET");
    assert_eq!(r.status(), 200);
    let mut body = r.into_body();
    // Some of the answer (so the watchdog is armed), then the stream is dropped: hyper's client resets it.
    let mut got = 0;
    while got < 256 * 1024 {
        let frame = within("a frame of the answer", body.frame()).await.expect("the answer ended early").unwrap();
        got += frame.data_ref().map_or(0, |d| d.len());
    }
    drop(body);
    let one = within_for(Duration::from_secs(20), "the app's connection to be closed", closed.acquire());
    one.await.unwrap().forget();
    gw.stop().await;
    drop(env);
}

/// And a client that reads slowly but steadily (a 64 KiB window, 16 KiB taken every quarter second, well under
/// what the app could send) shows progress at every piece and is never cut off, even with `send_timeout = 1s`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_but_steady_http2_client_is_not_cut_off() {
    use http_body_util::BodyExt;
    let BigOverH2 { env, gw, closed, answer: r, conn, _send } = big_file_over_narrow_h2().await;
    let mut body = r.into_body();
    let (mut got, mut taken) = (0usize, 0usize);
    // About four seconds of reading: four of the watchdog's looks.
    while got < 16 * 16 * 1024 {
        let frame =
            within("a frame of the answer", body.frame()).await.expect("the answer ended").unwrap_or_else(|e| {
                panic!("a slow but steady client was cut off after {got} bytes: {e}");
            });
        got += frame.data_ref().map_or(0, |d| d.len());
        // The client's own pace, the behaviour under test.
        while taken + 16 * 1024 <= got {
            taken += 16 * 1024;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    assert_eq!(closed.available_permits(), 0, "the app's connection was let go while the client was reading");
    drop(body);
    conn.abort();
    gw.stop().await;
    drop(env);
}

/// The other side of the same rule: an answer that waits on a slow app (a stream that pauses longer than
/// `send_timeout` between events) is not the client stalling, and reaches an HTTP/2 client whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_answer_that_waits_on_a_slow_app_is_not_cut_off() {
    use http_body_util::{BodyExt, Full};
    let addr = scripted(|mut s, _| async move {
        let mut buf = Vec::new();
        if read_head(&mut s, &mut buf).await.is_none() {
            return;
        }
        let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
        let _ = s.write_all(format!("{head}6\r\nfirst\n\r\n").as_bytes()).await;
        // The app's own pace: three times the gateway's send_timeout before its next event.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let _ = s.write_all(b"7\r\nsecond\n\r\n0\r\n\r\n").await;
    })
    .await;
    let apps = app(APP, &format!("http://{addr}"), "bypass");
    let (env, gw, _maddr, cert) = crate::relay::tls_gateway_with("send_timeout = \"1s\"\n", &apps).await;
    let mut h2 = crate::relay::tls_h2(gw.addr, &cert).await;
    let request =
        hyper::Request::get(format!("https://{APP}/events")).body(Full::new(bytes::Bytes::new()).boxed()).unwrap();
    within("h2 ready", h2.ready()).await.unwrap();
    let r = within("h2 GET", h2.send_request(request)).await.expect("h2 GET");
    assert_eq!(r.status(), 200);
    let body = within("the whole stream", r.into_body().collect()).await.expect("the stream was cut off").to_bytes();
    assert_eq!(&body[..], b"first\nsecond\n");
    gw.stop().await;
    drop(env);
}

/// Items 2 and 4 over HTTP/2 (TLS to the gateway, the upstream client hyper's lane uses): an unasked answer read
/// into rustls never answers the next h2 request, a slow upload with a length reaches the app past
/// `upstream_timeout`, and one that stalls gets 408.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http2_tls_leftovers_and_slow_uploads_hold_too() {
    use http_body_util::{BodyExt, Full, StreamBody};
    use hyper::body::Frame;
    type Piece = Result<Frame<bytes::Bytes>, std::convert::Infallible>;
    let (forging, pem) = forging_tls_app().await;
    let uploads = upload_app().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("app-ca.pem");
    std::fs::write(&ca, &pem).unwrap();
    let apps = format!(
        "[[app]]\nhost = \"{APP}\"\nupstream = \"https://localhost:{}\"\nca_file = \"{}\"\npolicy = \"bypass\"\n\n\
         [[app]]\nhost = \"{RAW}\"\nupstream = \"http://{uploads}\"\npolicy = \"bypass\"\nupstream_timeout = \"2s\"\n\n",
        forging.port(),
        ca.display()
    );
    let (env, gw, _maddr, cert) = crate::relay::tls_gateway_with("body_timeout = \"1s\"\n", &apps).await;
    let mut h2 = crate::relay::tls_h2(gw.addr, &cert).await;
    let mut send = async |request: hyper::Request<crate::relay::H2Body>| {
        let what = format!("{} {} over h2", request.method(), request.uri());
        within(&what, h2.ready()).await.unwrap_or_else(|e| panic!("{what}: {e}"));
        let r = within(&what, h2.send_request(request)).await.unwrap_or_else(|e| panic!("{what}: {e}"));
        let status = r.status().as_u16();
        let body = within(&what, r.into_body().collect()).await.map(|b| b.to_bytes()).unwrap_or_default();
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    let get = |path: String| hyper::Request::get(format!("https://{APP}{path}")).body(Full::default().boxed()).unwrap();
    for round in 0..6 {
        let total = [16384, 8192, 32768][round % 3];
        let (code, body) = send(get(format!("/big/{total}"))).await;
        assert_eq!((code, page(&body).len()), (200, total), "round {round} over h2");
        let got = send(get(format!("/next-{round}"))).await;
        assert_eq!(got, (200, format!("page /next-{round}")), "round {round} over h2");
    }
    let slow = futures_util::stream::unfold(0, |i| async move {
        if i == 4 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(800)).await;
        Some((Ok::<_, std::convert::Infallible>(Frame::data(bytes::Bytes::from(vec![b'x'; 1024]))), i + 1))
    });
    let request = hyper::Request::post(format!("https://{RAW}/slow"))
        .header("content-length", "4096")
        .body(StreamBody::new(slow).boxed())
        .unwrap();
    assert_eq!(send(request).await, (200, "got 4096".to_string()), "a slow upload over h2");
    let first: Piece = Ok(Frame::data(bytes::Bytes::from(vec![b'x'; 1024])));
    let stalled = futures_util::StreamExt::chain(futures_util::stream::iter([first]), futures_util::stream::pending());
    let request = hyper::Request::post(format!("https://{RAW}/stalled"))
        .header("content-length", "4096")
        .body(StreamBody::new(stalled).boxed())
        .unwrap();
    assert_eq!(send(request).await.0, 408, "an upload that stopped halfway over h2");
    gw.stop().await;
    drop(env);
}

/// The log says whose tunnel ended and why: a child gateway (its log captured), a tunnel on each lane, a logout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_names_whose_tunnel_ended_and_why() {
    let up = start_upstream().await;
    let env =
        Env::password_only(&format!("[server]\nlisten = \"{{LISTEN}}\"\n\n{}", app(APP, &up.url(), "one_factor")));
    env.add_user("alice", "alice@example.com", "Alice Liddell", &[], PW).await;
    let gw = env.spawn_child().await;
    let mut c = gw.client(APP);
    c.login_ok("alice", PW).await;
    let mut tunnels = Vec::new();
    for lane in Lane::BOTH {
        tunnels.push(open_tunnel(gw.addr, &c, lane).await);
    }
    logout(&mut c).await;
    for ws in tunnels.iter_mut() {
        closed_within(ws, "alice's tunnel after her logout").await;
    }
    let closed: Vec<String> = within("the log lines", async {
        loop {
            let lines: Vec<String> =
                gw.log().lines().filter(|l| l.contains("tunnel closed")).map(str::to_string).collect();
            if lines.len() >= 2 {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    for line in &closed {
        assert!(line.contains("alice") && line.contains("revoked"), "the line doesn't say whose and why: {line}");
    }
    gw.stop().await;
}
