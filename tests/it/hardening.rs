//! What an outside review and real apps broke: login memory, tunnels outliving their session, GET bodies,
//! upstream connections crossing identities, unframed answers, header-name variants, descriptor exhaustion, codes
//! spent before the rest of a form is checked, short idle timeouts, state-file modes, and smaller framing rules.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::*;

const APP: &str = "app.test";

// =============================================================================================
// Login memory
// =============================================================================================

/// Each argon2 hash needs 19 MiB; allocated per hash, glibc kept the freed blocks and 100 logins took 300 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_logins_and_fifty_failures_grow_memory_by_at_most_64_mib() {
    let up = start_upstream().await;
    let env = Env::password_only(&format!(
        "[server]\nlisten = \"{{LISTEN}}\"\nmax_concurrent_hashes = 2\n\n[log]\nlevel = \"warn\"\n\n\
         [limits]\nmax_failures = 1000\nmax_failures_per_address = 1000\n\n{}",
        app(APP, &up.url(), "one_factor")
    ));
    for i in 0..4 {
        env.add_user(&format!("user{i}"), &format!("user{i}@example.com"), "User", &[], PW).await;
    }
    let gw = env.spawn_child().await;
    let rss0 = gw.rss_kb();
    let addr = gw.addr;
    let ok = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    // 4 at a time: 200 good logins, 25 wrong passwords, 25 unknown names (the dummy hash).
    let mut workers = Vec::new();
    for w in 0..4 {
        let (ok, refused) = (ok.clone(), refused.clone());
        workers.push(tokio::spawn(async move {
            for i in 0..(250 / 4 + 1) {
                let n = w + 4 * i;
                if n >= 250 {
                    break;
                }
                let mut c = Client::new(addr, APP);
                let user = format!("user{w}");
                let (name, pass) = match n % 10 {
                    0 => (user.as_str(), "wrong-password-1"),
                    5 => ("nobody-by-that-name", PW),
                    _ => (user.as_str(), PW),
                };
                let r = c.login(name, pass, "/").await;
                match r.status {
                    303 => ok.fetch_add(1, Ordering::Relaxed),
                    401 | 403 => refused.fetch_add(1, Ordering::Relaxed),
                    s => panic!("login {n}: status {s}: {}", r.text()),
                };
            }
        }));
    }
    for w in workers {
        within_for(Duration::from_secs(300), "logins", w).await.unwrap();
    }
    let rss1 = gw.rss_kb();
    let grew_mib = rss1.saturating_sub(rss0) as f64 / 1024.0;
    eprintln!(
        "logins: {} accepted, {} refused in {:.1}s; RSS {rss0} KiB -> {rss1} KiB (+{grew_mib:.1} MiB)",
        ok.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        t.elapsed().as_secs_f64()
    );
    assert_eq!(ok.load(Ordering::Relaxed), 200);
    assert_eq!(refused.load(Ordering::Relaxed), 50);
    assert!(grew_mib <= 64.0, "RSS grew by {grew_mib:.1} MiB over 250 logins (bound: 64 MiB)");
    gw.stop().await;
}

// =============================================================================================
// Tunnels end with their session
// =============================================================================================

pub(crate) type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// Opens a WebSocket to the echo app with `c`'s cookies on `lane` and reads the greeting (the identity the app saw).
pub(crate) async fn open_tunnel(addr: std::net::SocketAddr, c: &Client, lane: Lane) -> Ws {
    let tcp = within("connect", TcpStream::connect(addr)).await.unwrap();
    let mut req = format!("ws://{}/ws", c.host).into_client_request().unwrap();
    req.headers_mut().insert("cookie", c.cookie_header().parse().unwrap());
    for (name, value) in lane.headers() {
        req.headers_mut().insert(*name, value.parse().unwrap());
    }
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(tcp);
    let (mut ws, resp) = within("ws handshake", tokio_tungstenite::client_async(req, stream)).await.unwrap();
    assert_eq!(resp.status().as_u16(), 101);
    let hello = within("ws greeting", ws.next()).await.expect("ws closed").expect("ws error");
    assert!(!hello.to_text().unwrap().is_empty());
    ws
}

/// Whether the tunnel still echoes.
pub(crate) async fn echoes(ws: &mut Ws) -> bool {
    if within("ws send", ws.send(Message::text("ping"))).await.is_err() {
        return false;
    }
    matches!(within("ws echo", ws.next()).await, Some(Ok(m)) if m.to_text().ok() == Some("ping"))
}

/// Waits (at most 10 s) for the tunnel to be closed by the gateway; returns how long it took.
pub(crate) async fn closed_within(ws: &mut Ws, what: &str) -> Duration {
    let t = Instant::now();
    let deadline = Duration::from_secs(10);
    loop {
        match tokio::time::timeout(deadline.saturating_sub(t.elapsed()), ws.next()).await {
            Err(_) => panic!("{what}: the tunnel is still open after {deadline:?}"),
            Ok(None | Some(Err(_))) => return t.elapsed(),
            Ok(Some(Ok(m))) if m.is_close() => return t.elapsed(),
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// Waits for both of `name`'s tunnels to close; how long each took.
async fn both_closed<'a>(
    tunnels: &mut std::collections::BTreeMap<(&'a str, Lane), Ws>,
    name: &'a str,
    what: &str,
) -> (String, [Duration; 2]) {
    let mut took = [Duration::ZERO; 2];
    for (i, lane) in Lane::BOTH.into_iter().enumerate() {
        let ws = tunnels.get_mut(&(name, lane)).unwrap();
        took[i] = closed_within(ws, &format!("{name}'s tunnel on {lane:?} {what}")).await;
    }
    (what.to_string(), took)
}

/// Every user has a tunnel on each lane (relayed, and opened through hyper's path); each revocation closes both of
/// its user's, and no one else's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_closes_on_logout_lock_delete_2fa_reset_and_expiry_while_others_stay_open() {
    let up = start_upstream().await;
    let (maddr, metrics) = metrics_section();
    let env = Env::password_only(&format!(
        "[session]\nidle_timeout = \"10m\"\n\n{metrics}{}",
        app(APP, &up.url(), "one_factor")
    ));
    for name in ["alice", "bob", "carol", "dave", "erin", "zed"] {
        env.add_user(name, &format!("{name}@example.com"), name, &[], PW).await;
    }
    let gw = env.start().await;
    let mut clients = std::collections::BTreeMap::new();
    for name in ["alice", "bob", "carol", "dave", "erin", "zed"] {
        let mut c = gw.client(APP);
        c.login_ok(name, PW).await;
        clients.insert(name, c);
    }
    // dave turns on two-factor (his session is then a two-factor one).
    {
        let c = clients.get_mut("dave").unwrap();
        let page = signed_in_setup_page(c, PW).await;
        let clock = gw.clock.clone();
        confirm_setup_page(c, &page, "/", || portcullis::clock::Clock::now(&*clock)).await;
    }
    let mut tunnels = std::collections::BTreeMap::new();
    for (name, c) in clients.iter_mut() {
        for lane in Lane::BOTH {
            // Warm: the session is cached, so a relayed handshake is relayed at once, not handed over.
            assert_eq!(c.get("/warm").await.status, 200);
            let before = counts(maddr).await;
            tunnels.insert((*name, lane), open_tunnel(gw.addr, c, lane).await);
            lane.assert_served(maddr, before, 1, &format!("{name}'s WebSocket handshake")).await;
        }
    }
    for ws in tunnels.values_mut() {
        assert!(echoes(ws).await);
    }

    let mut took = Vec::new();
    logout(clients.get_mut("alice").unwrap()).await;
    took.push(both_closed(&mut tunnels, "alice", "after logout").await);
    for (cmd, name) in [("lock", "bob"), ("delete", "carol"), ("reset-2fa", "dave")] {
        let o = env.cli(&["user", cmd, name], None).await;
        assert!(o.status.success(), "user {cmd} {name}: {}", out_text(&o));
        took.push(both_closed(&mut tunnels, name, &format!("after user {cmd}")).await);
    }
    // Another user's tunnels stayed open through all of it.
    for lane in Lane::BOTH {
        let zed = tunnels.get_mut(&("zed", lane)).unwrap();
        assert!(echoes(zed).await, "zed's tunnel on {lane:?} was closed by other users' revocations");
        assert!(echoes(tunnels.get_mut(&("erin", lane)).unwrap()).await);
    }

    // Expiry: past the idle timeout, with no request in between.
    gw.clock.advance(11 * 60);
    took.push(both_closed(&mut tunnels, "erin", "after the idle timeout").await);
    eprintln!("tunnels closed after: {took:?}");
}

// =============================================================================================
// GET and HEAD bodies
// =============================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_or_head_with_a_body_is_refused_unless_the_app_opts_in() {
    let up = start_upstream().await;
    let cfg = format!(
        "{}[[app.rule]]\npath = \"/public\"\npolicy = \"bypass\"\n\n{}allow_get_body = true\n\n",
        app(APP, &up.url(), "one_factor"),
        app("search.test", &up.url(), "bypass")
    );
    let env = Env::password_only(&cfg);
    let gw = env.start().await;
    let smuggled = "GET /secret HTTP/1.1\r\nHost: app.test\r\nRemote-User: admin\r\n\r\n";
    let chunked = format!("{:x}\r\n{smuggled}\r\n0\r\n\r\n", smuggled.len());
    for method in ["GET", "HEAD"] {
        for framing in [
            format!("Content-Length: {}\r\n\r\n{smuggled}", smuggled.len()),
            format!("Transfer-Encoding: chunked\r\n\r\n{chunked}"),
        ] {
            let req = format!("{method} /public/x HTTP/1.1\r\nHost: {APP}\r\n{framing}");
            let r = raw_send(gw.addr, req.as_bytes()).await;
            assert_eq!(r.status, 400, "{method} with {framing:?}: {}", r.head);
        }
    }
    assert_eq!(up.hit_count(), 0, "a GET/HEAD body reached the app: {:?}", up.hits());
    // A zero length is no body.
    let r = raw_send(gw.addr, format!("GET /public/y HTTP/1.1\r\nHost: {APP}\r\nContent-Length: 0\r\n\r\n").as_bytes())
        .await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(up.hit_count(), 1);
    // An app that opted in gets the body.
    let req = "GET /upload HTTP/1.1\r\nHost: search.test\r\nContent-Length: 5\r\nConnection: close\r\n\r\nquery";
    let r = raw_send(gw.addr, req.as_bytes()).await;
    assert_eq!((r.status, String::from_utf8_lossy(&r.body).to_string()), (200, "5".to_string()), "{}", r.head);
}

// =============================================================================================
// Upstream connections never cross identities
// =============================================================================================

/// An app that sends bytes past the end of its answers, each time naming the user it answers (`remote-user`):
/// - `HEAD /head-body`: a body on a HEAD answer;
/// - `/no-content`: a 204 followed by a whole second answer;
/// - `/not-modified`: a 304 with a body;
/// - `/extra`: a normal answer, then a second one;
/// - `/late`: a normal answer, then a second one 20 ms later;
/// - anything else: a normal `page-for-USER`.
async fn misbehaving_app() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    scripted_app(|head| {
        let mut words = head.split_whitespace();
        let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        let user = head
            .lines()
            .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("remote-user")))
            .map_or("-".to_string(), |(_, v)| v.trim().to_string());
        let page = |text: &str| format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{text}", text.len());
        let forged = page(&format!("forged-by-{user}"));
        let normal = page(&format!("page-for-{user}"));
        match (method, path) {
            ("HEAD", "/head-body") => {
                (format!("HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\nforged-by-{user:<10}"), None)
            }
            (_, "/no-content") => (format!("HTTP/1.1 204 No Content\r\n\r\n{forged}"), None),
            (_, "/not-modified") => (format!("HTTP/1.1 304 Not Modified\r\n\r\n{forged}"), None),
            (_, "/extra") => (format!("{normal}{forged}"), None),
            (_, "/late") => (normal, Some(forged)),
            _ => (normal, None),
        }
    })
    .await
}

/// An app on 127.0.0.1:0 that answers each request head (keep-alive, in order) with `answer(head)`: bytes to
/// write at once and, optionally, bytes to write 20 ms later.
async fn scripted_app(
    answer: impl Fn(&str) -> (String, Option<String>) + Send + Sync + 'static,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = Arc::new(answer);
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { continue };
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 8192];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match s.read(&mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    buf.drain(..end + 4);
                    let (first, later) = answer(&head);
                    if s.write_all(first.as_bytes()).await.is_err() {
                        return;
                    }
                    if let Some(late) = later {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        if s.write_all(late.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_byte_an_app_sends_for_one_user_reaches_another_through_the_upstream_pool() {
    let (addr, task) = misbehaving_app().await;
    let (maddr, metrics) = metrics_section();
    let env = Env::password_only(&format!("{metrics}{}", app(APP, &format!("http://{addr}"), "one_factor")));
    env.add_user("alice", "alice@example.com", "Alice", &[], PW).await;
    env.add_user("bob", "bob@example.com", "Bob", &[], PW).await;
    let gw = env.start().await;
    let mut alice = gw.client(APP);
    alice.login_ok("alice", PW).await;
    let mut bob = gw.client(APP);
    bob.login_ok("bob", PW).await;
    let before = counts(maddr).await;
    let mut seen = 0;
    for round in 0..12 {
        for misbehaviour in ["/head-body", "/no-content", "/not-modified", "/extra", "/late"] {
            // Both proxy paths: a bodyless GET (the relay) and the same with `Content-Length: 0` (hyper).
            for extra in [&[][..], &[("content-length", "0")][..]] {
                let (first, second, first_name, second_name) = if round % 2 == 0 {
                    (&mut alice, &mut bob, "alice", "bob")
                } else {
                    (&mut bob, &mut alice, "bob", "alice")
                };
                let method = if misbehaviour == "/head-body" { "HEAD" } else { "GET" };
                let r = first.send(method, misbehaviour, extra, None).await;
                assert!(!r.text().contains(second_name), "{first_name} got {second_name}'s bytes: {}", r.text());
                for path in ["/page", "/page2"] {
                    let r = second.send("GET", path, extra, None).await;
                    seen += 1;
                    assert!(
                        !r.text().contains(first_name),
                        "round {round}, {misbehaviour} {extra:?}: {second_name} received bytes the app sent for \
                         {first_name}: {:?}",
                        r.text()
                    );
                    assert!(r.status == 200 || r.status == 502, "{}: {}", r.status, r.text());
                }
            }
        }
    }
    let moved = counts(maddr).await - before;
    eprintln!("{seen} answers checked; relay counters moved by {moved:?}");
    assert!(moved.relayed >= 100 && moved.handovers >= 100, "both paths must have been exercised: {moved:?}");
    task.abort();
}

// =============================================================================================
// Framing: the relay writes the length it frames by; lengths are canonical on both paths
// =============================================================================================

/// An app whose every answer is `head` followed by `body`.
async fn fixed_app(head: &'static str, body: &'static str) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    scripted_app(move |request| {
        let answer = if request.starts_with("HEAD") { head.to_string() } else { format!("{head}{body}") };
        (answer, None)
    })
    .await
}

/// Sends `req` on `s` and reads one answer framed by Content-Length: (head, body).
async fn exchange(s: &mut TcpStream, req: &str) -> (String, String) {
    within("write", s.write_all(req.as_bytes())).await.unwrap();
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse::<usize>().unwrap_or_else(|_| panic!("odd length in {head}")));
            let Some(len) = len else { panic!("an answer without Content-Length on a kept-alive connection: {head}") };
            let body_len = if req.starts_with("HEAD") { 0 } else { len };
            if buf.len() >= end + 4 + body_len {
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + body_len]).to_string();
                assert_eq!(
                    buf.len(),
                    end + 4 + body_len,
                    "bytes after the answer: {:?}",
                    String::from_utf8_lossy(&buf)
                );
                return (head, body);
            }
        }
        let n = within("read", s.read(&mut tmp)).await.unwrap();
        assert!(n > 0, "closed mid-answer after {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&tmp[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_length_the_app_lists_in_connection_or_writes_oddly_still_frames_the_answer_on_both_paths() {
    const BODY: &str = "thirty-seven bytes of an app's answer";
    for (head, what) in [
        ("HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 37\r\n\r\n", "listed in Connection"),
        ("HTTP/1.1 200 OK\r\nContent-Length: 37, 37\r\n\r\n", "a list of equal values"),
        ("HTTP/1.1 200 OK\r\nContent-Length: 37\r\nContent-Length: 37\r\n\r\n", "repeated"),
        ("HTTP/1.1 200 OK\r\nContent-Length: 037\r\n\r\n", "a leading zero"),
    ] {
        let (addr, task) = fixed_app(head, BODY).await;
        let env = Env::password_only(&app(APP, &format!("http://{addr}"), "bypass"));
        let gw = env.start().await;
        let mut s = within("connect", TcpStream::connect(gw.addr)).await.unwrap();
        for (i, extra) in ["", "Content-Length: 0\r\n", "", "Content-Length: 0\r\n"].iter().enumerate() {
            for method in ["GET", "HEAD"] {
                let req = format!("{method} /{i} HTTP/1.1\r\nHost: {APP}\r\n{extra}\r\n");
                let (head, body) = exchange(&mut s, &req).await;
                let lengths: Vec<_> = head.lines().filter(|l| l.starts_with("content-length:")).collect();
                assert_eq!(lengths, ["content-length: 37"], "{what}, {method} {extra:?}: {head}");
                if method == "GET" {
                    assert_eq!(body, BODY, "{what}");
                }
            }
        }
        task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apps_sees_one_canonical_content_length_for_a_request_body() {
    let up = start_upstream().await;
    let env = Env::password_only(&app(APP, &up.url(), "bypass"));
    let gw = env.start().await;
    let body = "x".repeat(56);
    // hyper reads a length with leading zeros as the number, and refuses the list form (400, nothing forwarded).
    for (length, forwarded) in [("056", true), ("56", true), ("56, 56", false)] {
        let hits = up.hit_count();
        let req = format!(
            "POST /upload HTTP/1.1\r\nHost: {APP}\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n{body}"
        );
        let r = raw_send(gw.addr, req.as_bytes()).await;
        if forwarded {
            assert_eq!((r.status, String::from_utf8_lossy(&r.body).to_string()), (200, "56".to_string()), "{length:?}");
            assert_eq!(up.last_hit().header("content-length"), Some(vec!["56".to_string()]), "{length:?}");
        } else {
            assert_eq!((r.status, up.hit_count()), (400, hits), "{length:?}: {}", r.head);
        }
    }
}

// =============================================================================================
// Header-name variants
// =============================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_framing_and_identity_header_variants_never_reach_the_app_on_either_path() {
    let up = start_upstream().await;
    let spoofs = [
        "X_Forwarded_For: 6.6.6.6",
        "X.Forwarded.For: 6.6.6.6",
        "X_Forwarded_Host: evil.test",
        "X_Forwarded_Proto: https",
        "X_Real_IP: 6.6.6.6",
        "X.Real.Ip: 6.6.6.6",
        "Transfer_Encoding: chunked",
        "Content_Length: 5",
        "Remote.User: admin",
        "Remote_User: admin",
        "X.Forwarded.User: admin",
        "Forwarded: for=6.6.6.6;host=evil.test;proto=https",
        "X-Forwarded-Prefix: /evil",
        "X-Forwarded-Port: 8443",
        "X-Forwarded-Host: evil.test",
    ];
    let (maddr, metrics) = metrics_section();
    let env = Env::password_only(&format!("{metrics}{}", app(APP, &up.url(), "bypass")));
    let gw = env.start().await;
    for extra in ["", "Content-Length: 0\r\n"] {
        let before = counts(maddr).await;
        let lines: String = spoofs.iter().map(|l| format!("{l}\r\n")).collect();
        let r = raw_get(gw.addr, APP, "/variants", &format!("{extra}{lines}")).await;
        assert_eq!(r.status, 200, "{extra:?}: {}", r.head);
        let moved = counts(maddr).await - before;
        let on_relay = extra.is_empty();
        assert_eq!((moved.relayed, moved.handovers), if on_relay { (1, 0) } else { (0, 1) }, "path pinned: {moved:?}");
        let hit = up.last_hit();
        for name in hit.headers.keys() {
            let folded = name.replace(['_', '.'], "-");
            assert!(
                !(folded.starts_with("x-forwarded-") || folded.starts_with("remote-") || folded == "forwarded")
                    || ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"].contains(&name.as_str()),
                "{extra:?}: {name} reached the app: {:?}",
                hit.headers
            );
            assert!(
                !["transfer-encoding", "content-length", "x-real-ip"].contains(&folded.as_str())
                    || !name.contains(['_', '.']),
                "{extra:?}: {name} reached the app"
            );
        }
        assert_eq!(hit.header("x-forwarded-for"), Some(vec!["127.0.0.1".to_string()]), "{extra:?}");
        assert_eq!(hit.header("x-forwarded-host"), Some(vec![APP.to_string()]), "{extra:?}");
        assert_eq!(hit.header("x-forwarded-proto"), Some(vec!["http".to_string()]), "{extra:?}");
        assert_eq!(hit.header("x-real-ip"), Some(vec!["127.0.0.1".to_string()]), "{extra:?}");
    }
}

// =============================================================================================
// Descriptors: the open-files limit is raised and a connection flood sheds idle connections
// =============================================================================================

/// `portcullis serve` under `prlimit --nofile=SOFT:HARD`, healthy.
async fn spawn_limited(env: &Env, soft: u64, hard: u64) -> ChildGateway {
    let log_path = env.path().join("limited.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let child = tokio::process::Command::new("prlimit")
        .arg(format!("--nofile={soft}:{hard}"))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_portcullis"))
        .args(["serve", "-c"])
        .arg(&env.config_path)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("run prlimit (util-linux)");
    let pid = child.id().unwrap();
    let mut gw = ChildGateway { child, addr: env.listen, pid, log_path };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        gw.assert_running();
        let probe = tokio::time::timeout(
            Duration::from_secs(5),
            gw.client(APP).try_send("GET", "/_portcullis/health", &[], None),
        )
        .await;
        if matches!(probe, Ok(Ok(ref r)) if r.status == 200) {
            return gw;
        }
        assert!(Instant::now() < deadline, "not healthy: {}", gw.log());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn soft_nofile(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    s.lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eleven_hundred_idle_connections_under_a_1024_descriptor_limit_do_not_lock_a_user_out() {
    let up = start_upstream().await;
    let env = Env::password_only(&format!(
        "[server]\nlisten = \"{{LISTEN}}\"\nheader_read_timeout = \"120s\"\n\n[log]\nlevel = \"warn\"\n\n{}",
        app(APP, &up.url(), "one_factor")
    ));
    env.add_user("alice", "alice@example.com", "Alice", &[], PW).await;
    // The soft limit is raised to the hard one at start.
    let gw = spawn_limited(&env, 256, 1024).await;
    assert_eq!(soft_nofile(gw.pid), 1024, "the soft open-files limit was not raised to the hard limit");
    let addr = gw.addr;
    let mut idle = Vec::new();
    let req = format!("GET {PREFIX}/health HTTP/1.1\r\nHost: {APP}\r\n\r\n");
    for _ in 0..1100 {
        let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await else {
            break;
        };
        // A kept-alive connection that made one request and then idles.
        if s.write_all(req.as_bytes()).await.is_err() {
            continue;
        }
        let mut tmp = [0u8; 512];
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut tmp)).await;
        idle.push(s);
    }
    let t = Instant::now();
    let mut c = Client::new(addr, APP);
    within_for(Duration::from_secs(20), "login with 1,100 idle connections open", c.login_ok("alice", PW)).await;
    let r = within_for(Duration::from_secs(20), "a proxied request", c.get("/after-the-flood")).await;
    assert_eq!(r.status, 200);
    eprintln!("login + request with {} idle connections opened: {:.2}s", idle.len(), t.elapsed().as_secs_f64());
    let mut gw = gw;
    gw.assert_running();
    assert!(gw.log().contains("connection limit reached"), "no log line about the limit: {}", gw.log());
    drop(idle);
    gw.stop().await;
}

// =============================================================================================
// Short idle timeouts, state-file modes
// =============================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_used_every_second_outlives_a_20_second_idle_timeout_on_both_paths() {
    let up = start_upstream().await;
    let env =
        Env::password_only(&format!("[session]\nidle_timeout = \"20s\"\n\n{}", app(APP, &up.url(), "one_factor")));
    env.add_user("alice", "alice@example.com", "Alice", &[], PW).await;
    let gw = env.start().await;
    let mut c = gw.client(APP);
    c.login_ok("alice", PW).await;
    for i in 0..50 {
        gw.clock.advance(1);
        let extra: &[(&str, &str)] = if i % 2 == 0 { &[] } else { &[("content-length", "0")] };
        let r = c.send("GET", &format!("/busy/{i}"), extra, None).await;
        assert_eq!(r.status, 200, "request {i}, {}s after login: {}", i + 1, r.text());
    }
    gw.clock.advance(21);
    assert!(is_no_session(&c.get("/after-a-pause").await), "the session outlived its idle timeout");
    // What the design can't honour is refused with a reason.
    let bad = Env::password_only(&format!("[session]\nidle_timeout = \"5s\"\n\n{}", app(APP, &up.url(), "one_factor")));
    let o = bad.cli(&["check-config"], None).await;
    assert!(!o.status.success() && out_text(&o).contains("idle_timeout"), "{}", out_text(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_files_are_private_to_the_gateways_user() {
    use std::os::unix::fs::PermissionsExt;
    let up = start_upstream().await;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("var/lib/portcullis");
    let listen = free_addr();
    let config = tmp.path().join("portcullis.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"{listen}\"\n\n[storage]\nbackend = \"redb\"\npath = \"{0}/portcullis.redb\"\n\
             secret_key_file = \"{0}/secret.key\"\n\n{1}",
            data.display(),
            app(APP, &up.url(), "one_factor")
        ),
    )
    .unwrap();
    let o = run_cli(&["user", "add", "alice", "--email", "a@example.com", "--password-stdin"], &config, Some(PW)).await;
    assert!(o.status.success(), "{}", out_text(&o));
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "data directory");
    assert_eq!(mode(&tmp.path().join("var/lib")), 0o700, "a parent the gateway created");
    assert_eq!(mode(&data.join("portcullis.redb")), 0o600, "the state file");
    // A file an older version left readable is tightened at start; so is the wake-up socket.
    std::fs::set_permissions(data.join("portcullis.redb"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["serve", "-c"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Client::new(listen, APP).try_send("GET", "/_portcullis/health", &[], None).await.map(|r| r.status).ok()
        != Some(200)
    {
        assert!(Instant::now() < deadline, "serve did not become healthy");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(mode(&data.join("portcullis.redb")), 0o600, "an old state file was not tightened");
    assert_eq!(mode(&data.join("portcullis.redb.wakeup")) & 0o077, 0, "the wake-up socket is open to others");
    assert_eq!(mode(&data.join("secret.key")), 0o600, "the key file");
    let _ = child.kill().await;
}

// =============================================================================================
// Trailers
// =============================================================================================

/// Sends `req` (with `Connection: close`) and reads everything until the gateway closes.
async fn read_to_close(addr: std::net::SocketAddr, req: &str) -> String {
    let mut s = within("connect", TcpStream::connect(addr)).await.unwrap();
    within("write", s.write_all(req.as_bytes())).await.unwrap();
    let mut all = Vec::new();
    within("read to close", s.read_to_end(&mut all)).await.unwrap();
    String::from_utf8_lossy(&all).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_trailers_never_set_the_gateways_cookie_on_either_path() {
    let (addr, task) = fixed_app(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: Set-Cookie, X-Checksum\r\n\r\n",
        "5\r\nhello\r\n0\r\nSet-Cookie: portcullis_session=planted; Path=/\r\nX-Checksum: 42\r\n\r\n",
    )
    .await;
    let env = Env::password_only(&app(APP, &format!("http://{addr}"), "bypass"));
    let gw = env.start().await;
    for extra in ["", "Content-Length: 0\r\n"] {
        let req = format!("GET /t HTTP/1.1\r\nHost: {APP}\r\nTE: trailers\r\n{extra}Connection: close\r\n\r\n");
        let all = read_to_close(gw.addr, &req).await;
        assert!(all.starts_with("HTTP/1.1 200"), "{extra:?}: {all}");
        assert!(all.contains("hello"), "{extra:?}: {all}");
        assert!(!all.contains("planted"), "{extra:?}: a trailer set the gateway's cookie: {all}");
        assert!(all.ends_with("\r\n\r\n"), "{extra:?}: the chunked body was not closed: {all:?}");
    }
    task.abort();
}
