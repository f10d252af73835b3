//! Proxying: header hygiene, cookies, path normalisation, WebSocket, HTTP/2+TLS, streaming,
//! upstream failures.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, StreamBody};
use hyper::Request;
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::*;

const SPOOF_HEADERS: &[&str] = &[
    "Remote-User",
    "remote-user",
    "REMOTE_USER",
    "Remote-Email",
    "Remote-Groups",
    "Remote-Name",
    "remote_email",
    "X-Forwarded-User",
    "X-Forwarded-Email",
    "X-Forwarded-Groups",
    "X-Forwarded-Preferred-Username",
    "X-Auth-Request-User",
    "X-Auth-Request-Email",
    "X-Auth-Request-Groups",
    "x_auth_request_user",
    "X_Forwarded_User",
];

fn norm(name: &str) -> String {
    name.to_ascii_lowercase().replace('_', "-")
}

fn identity_like(name: &str, custom: &[&str]) -> bool {
    let n = norm(name);
    n.starts_with("remote-")
        || n.starts_with("x-auth-request-")
        || ["x-forwarded-user", "x-forwarded-email", "x-forwarded-groups", "x-forwarded-preferred-username"]
            .contains(&n.as_str())
        || custom.iter().any(|c| norm(c) == n)
}

fn spoof_list(custom: &[&str]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> =
        SPOOF_HEADERS.iter().map(|h| (h.to_string(), format!("spoofed-{}", h.to_ascii_lowercase()))).collect();
    for c in custom {
        v.push((c.to_string(), "spoofed-custom".into()));
        v.push((c.to_ascii_lowercase().replace('-', "_"), "spoofed-custom-underscore".into()));
        v.push((c.to_ascii_uppercase(), "spoofed-custom-upper".into()));
    }
    v
}

fn assert_no_spoofed(headers: &BTreeMap<String, Vec<String>>, ctx: &str) {
    for (k, vs) in headers {
        for v in vs {
            assert!(!v.contains("spoofed"), "{ctx}: upstream received spoofed header {k}: {v}");
        }
    }
}

async fn spoofing_case(custom_user_header: Option<&str>) {
    let up = start_upstream().await;
    let headers_section = match custom_user_header {
        Some(h) => format!("[headers]\nuser = \"{h}\"\n\n"),
        None => String::new(),
    };
    let (maddr, metrics) = metrics_section();
    let cfg = format!(
        "{metrics}{headers_section}{}{}",
        app("app.test", &up.url(), "one_factor"),
        app("open.test", &up.url(), "bypass")
    );
    let env = Env::password_only(&cfg);
    env.add_user("alice", "alice@example.com", "Alice", &["staff"], PW).await;
    let gw = env.start().await;
    let user_header = custom_user_header.unwrap_or("Remote-User");
    let custom: Vec<&str> = custom_user_header.into_iter().collect();
    let spoofs = spoof_list(&custom);
    let spoof_refs: Vec<(&str, &str)> = spoofs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();

    let mut c = gw.client("app.test");
    c.login_ok("alice", PW).await;
    assert_eq!(c.get("/warm").await.status, 200, "a first request caches the session");
    for lane in Lane::BOTH {
        let before = counts(maddr).await;
        let r = c.send("GET", "/auth", &lane.with(&spoof_refs), None).await;
        assert_eq!(r.status, 200, "{lane:?}: {}", r.text());
        lane.assert_served(maddr, before, 1, "authenticated route").await;
        let h = r.upstream_headers();
        let ctx = format!("authenticated route ({lane:?})");
        assert_no_spoofed(&h, &ctx);
        assert_eq!(h.get(&user_header.to_ascii_lowercase()), Some(&vec!["alice".to_string()]), "{ctx}: {h:?}");
        assert_eq!(h.get("remote-email"), Some(&vec!["alice@example.com".to_string()]), "{ctx}");
        assert_eq!(h.get("remote-groups"), Some(&vec!["staff".to_string()]), "{ctx}");
        for k in h.keys() {
            if identity_like(k, &custom) {
                let allowed = [
                    user_header.to_ascii_lowercase(),
                    "remote-email".into(),
                    "remote-name".into(),
                    "remote-groups".into(),
                ];
                assert!(allowed.contains(k), "{ctx}: unexpected identity header {k} reached upstream: {h:?}");
            }
        }
        if custom_user_header.is_some() {
            assert!(
                !h.contains_key("remote-user"),
                "{ctx}: custom user header configured, but remote-user reached upstream"
            );
        }

        // bypass route, with and without a session
        for with_session in [false, true] {
            let mut b = gw.client("open.test");
            if with_session {
                b.jar = c.jar.clone();
            }
            let before = counts(maddr).await;
            let r = b.send("GET", "/open", &lane.with(&spoof_refs), None).await;
            assert_eq!(r.status, 200);
            let ctx = format!("bypass route (session: {with_session}, {lane:?})");
            lane.assert_served(maddr, before, 1, &ctx).await;
            let h = r.upstream_headers();
            assert_no_spoofed(&h, &ctx);
            for k in h.keys() {
                assert!(!identity_like(k, &custom), "{ctx}: identity header {k} reached upstream: {h:?}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_header_spoofing_is_stripped_default_names() {
    spoofing_case(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_header_spoofing_is_stripped_custom_user_header() {
    spoofing_case(Some("X-Webauth-User")).await;
}

fn cookie_pairs(h: &BTreeMap<String, Vec<String>>) -> Vec<(String, String)> {
    h.get("cookie")
        .into_iter()
        .flatten()
        .flat_map(|v| v.split(';').map(|s| s.trim().to_string()).collect::<Vec<_>>())
        .filter(|s| !s.is_empty())
        .map(|s| match s.split_once('=') {
            Some((k, v)) => (k.trim().to_string(), v.trim().to_string()),
            None => (s, String::new()),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_cookies_are_not_forwarded_upstream_others_are() {
    let up = start_upstream().await;
    let cfg = format!("{}{}", app("app.test", &up.url(), "one_factor"), app("open.test", &up.url(), "bypass"));
    let (maddr, metrics) = metrics_section();
    let env = Env::password_only(&format!("{metrics}{cfg}"));
    env.add_user("alice", "alice@example.com", "Alice", &[], PW).await;
    let gw = env.start().await;
    let mut c = gw.client("app.test");
    c.login_ok("alice", PW).await;
    assert_eq!(c.get("/warm").await.status, 200, "a first request caches the session");
    let sess = c.jar.get(SESSION).unwrap().clone();
    let csrf = c.jar.get(CSRF).unwrap().clone();
    let cookie = format!("theme=dark; {SESSION}={sess}; {CSRF}={csrf}; other=1; {SESSION}_x=keep");

    for (host, lane) in ["app.test", "open.test"].into_iter().flat_map(|h| Lane::BOTH.map(|l| (h, l))) {
        let mut cc = gw.client(host);
        let before = counts(maddr).await;
        let r = cc.send("GET", "/cookies", &lane.with(&[("cookie", &cookie)]), None).await;
        assert_eq!(r.status, 200, "{host}");
        lane.assert_served(maddr, before, 1, host).await;
        let host = format!("{host} ({lane:?})");
        let h = r.upstream_headers();
        let pairs = cookie_pairs(&h);
        let names: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
        assert!(!names.contains(&SESSION), "{host}: session cookie forwarded: {:?}", h.get("cookie"));
        assert!(!names.contains(&CSRF), "{host}: csrf cookie forwarded: {:?}", h.get("cookie"));
        let joined = h.get("cookie").map(|v| v.join(";")).unwrap_or_default();
        assert!(!joined.contains(&sess), "{host}: session value leaked upstream");
        assert!(pairs.contains(&("theme".into(), "dark".into())), "{host}: {pairs:?}");
        assert!(pairs.contains(&("other".into(), "1".into())), "{host}: {pairs:?}");
        assert!(
            pairs.contains(&(format!("{SESSION}_x"), "keep".into())),
            "{host}: similar-named cookie dropped: {pairs:?}"
        );
        if host.starts_with("app.test") {
            assert_eq!(h.get("remote-user"), Some(&vec!["alice".to_string()]));
        }
    }
    // only gateway cookies: the upstream sees no (or an empty) Cookie header
    for lane in Lane::BOTH {
        let before = counts(maddr).await;
        let r = c.send("GET", "/only-ours", lane.headers(), None).await;
        assert_eq!(r.status, 200);
        lane.assert_served(maddr, before, 1, "only our cookies").await;
        assert!(cookie_pairs(&r.upstream_headers()).is_empty(), "{lane:?}: {:?}", r.upstream_header("cookie"));
    }
}

// ------------------------------------------------------------------------------------------
// Path tricks
// ------------------------------------------------------------------------------------------

/// Is `path` (as received by the upstream) a normalised path under /public/?
fn clean_public(path: &str) -> bool {
    let p = path.split('?').next().unwrap();
    if !p.starts_with("/public/") || p.contains('\\') || p.chars().any(|c| c.is_control()) {
        return false;
    }
    let l = p.to_ascii_lowercase();
    if l.contains("%2f") || l.contains("%5c") || l.contains("%2e") || l.contains("%00") {
        return false;
    }
    let segs: Vec<&str> = p[1..].split('/').collect();
    for (i, s) in segs.iter().enumerate() {
        let bare = s.split(';').next().unwrap();
        if bare == "." || bare == ".." || (s.is_empty() && i + 1 != segs.len()) {
            return false;
        }
    }
    true
}

/// Decode, collapse slashes, resolve dots (what a lenient upstream might do).
fn lenient_normalise(path: &str) -> String {
    let p = path.split('?').next().unwrap();
    let mut d = p.to_string();
    for _ in 0..2 {
        d = percent_encoding::percent_decode_str(&d).decode_utf8_lossy().to_string();
    }
    let d = d.replace('\\', "/");
    let mut out: Vec<String> = Vec::new();
    for seg in d.split('/') {
        let bare = seg.split(';').next().unwrap();
        match bare {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            _ => out.push(seg.to_string()),
        }
    }
    let mut s = format!("/{}", out.join("/"));
    if d.ends_with('/') && s.len() > 1 {
        s.push('/');
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_tricks_cannot_reach_protected_paths_or_dodge_deny_rules() {
    let up_app = start_upstream().await;
    let up_open = start_upstream().await;
    let (maddr, metrics) = metrics_section();
    let cfg = format!(
        "{metrics}[[app]]\nhost = \"app.test\"\nupstream = \"{}\"\npolicy = \"one_factor\"\n  [[app.rule]]\n  path = \"/public/\"\n  policy = \"bypass\"\n\n\
         [[app]]\nhost = \"open.test\"\nupstream = \"{}\"\npolicy = \"bypass\"\n  [[app.rule]]\n  path = \"/admin/\"\n  policy = \"deny\"\n",
        up_app.url(),
        up_open.url()
    );
    let env = Env::password_only(&cfg);
    let gw = env.start().await;
    for lane in Lane::BOTH {
        path_tricks_on(&gw, lane, maddr, &up_app, &up_open).await;
    }
}

/// The path tricks of [`path_tricks_cannot_reach_protected_paths_or_dodge_deny_rules`] on one lane; every answer
/// that reached an app was served on that lane.
async fn path_tricks_on(gw: &Gateway, lane: Lane, maddr: SocketAddr, up_app: &Upstream, up_open: &Upstream) {
    let steer: String = lane.headers().iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    let get = |host: &'static str, target: String| {
        let steer = steer.clone();
        async move {
            let before = counts(maddr).await;
            let r = raw_get(gw.addr, host, &target, &steer).await;
            if r.status == 200 {
                lane.assert_served(maddr, before, 1, &format!("{host} {target}")).await;
            }
            r
        }
    };
    let open_before = up_open.hit_count();

    // controls
    let r = get("app.test", "/public/ok".to_string()).await;
    assert_eq!(r.status, 200, "control /public/ok ({lane:?}): {r:?}");
    assert_eq!(up_app.last_hit().path, "/public/ok");
    let r = get("app.test", "/secret".to_string()).await;
    assert_eq!(r.status, 401, "control /secret");
    let r = get("app.test", "/public/%7Euser/%41".to_string()).await;
    assert_eq!(r.status, 200, "unreserved percent-encoding: {r:?}");
    assert_eq!(up_app.last_hit().path, "/public/~user/A", "unreserved chars must be decoded ({lane:?})");
    let r = get("app.test", "/public//a//b".to_string()).await;
    assert_eq!(r.status, 200);
    assert_eq!(up_app.last_hit().path, "/public/a/b", "duplicate slashes must be merged ({lane:?})");
    let r = get("open.test", "/admin/".to_string()).await;
    assert_eq!(r.status, 403, "control /admin/ deny");
    let r = get("open.test", "/other".to_string()).await;
    assert_eq!(r.status, 200, "control /other on bypass app");
    assert_eq!(up_open.hit_count(), open_before + 1, "{lane:?}");

    let app_tricks = [
        "/public/../secret",
        "/public/%2e%2e/secret",
        "/public/%2E%2E/secret",
        "/public/.%2e/secret",
        "/public/%2e./secret",
        "/public/..%2fsecret",
        "/public/..%2Fsecret",
        "/public/%2e%2e%2fsecret",
        "/public/%2fsecret",
        "/public/%2F..%2Fsecret",
        "//public/../secret",
        "/public/./../secret",
        "/public/..;/secret",
        "/public/;/../secret",
        "/public\\..\\secret",
        "/public/..\\secret",
        "/public/..%5csecret",
        "/public/..%5Csecret",
        "/public/x/../../secret",
        "/public/%252e%252e/secret",
        "/public/%00/../secret",
        "/public/..%00/secret",
        "/public/%c0%ae%c0%ae/secret",
        "/%70ublic/../secret",
        "/public/..",
        "/public/../",
        "/public/../../../etc/passwd",
        "/../public/",
        "http://app.test/public/../secret",
        "/public/..?x=/public/",
        "/public/%2e%2e?/public/",
        "/public/%2e%2e#/public/",
    ];
    for t in app_tricks {
        let before = up_app.hit_count();
        let r = get("app.test", t.to_string()).await;
        assert!(r.status < 500, "{t}: gateway error {}: {}", r.status, r.head);
        let new: Vec<Hit> = up_app.hits()[before..].to_vec();
        eprintln!(
            "{lane:?} app.test  {t:<40} -> {} {:?}",
            r.status,
            new.iter().map(|h| h.path.clone()).collect::<Vec<_>>()
        );
        for h in &new {
            assert!(
                clean_public(&h.path),
                "{t}: unauthenticated request reached upstream with non-public/unnormalised path {:?} (status {})",
                h.path,
                r.status
            );
        }
        if r.status == 200 {
            assert_eq!(new.len(), 1, "{t}: 200 without exactly one upstream hit");
        } else {
            assert!(
                [0, 302, 400, 401, 403, 404].contains(&r.status),
                "{t}: unexpected status {} ({})",
                r.status,
                r.head
            );
        }
    }

    let deny_tricks = [
        "//admin/",
        "///admin/",
        "/%61dmin/",
        "/%61%64%6d%69%6e/",
        "/./admin/",
        "/x/../admin/",
        "/admin/./",
        "/admin//",
        "/admin/x",
        "/admin/../admin/x",
        "/admin%2f",
        "/admin%2F",
        "/%2fadmin/",
        "/\\admin/",
        "/admin\\",
        "/ADMIN/",
        "/Admin/x",
        "/admin/%2e%2e/admin/",
        "http://open.test/admin/",
        "/.%2e/admin/",
    ];
    for t in deny_tricks {
        let before = up_open.hit_count();
        let r = get("open.test", t.to_string()).await;
        assert!(r.status < 500, "{t}: gateway error {}: {}", r.status, r.head);
        let new: Vec<Hit> = up_open.hits()[before..].to_vec();
        eprintln!(
            "{lane:?} open.test {t:<40} -> {} {:?}",
            r.status,
            new.iter().map(|h| h.path.clone()).collect::<Vec<_>>()
        );
        for h in &new {
            let got = h.path.split('?').next().unwrap();
            assert!(
                !lenient_normalise(got).starts_with("/admin/") && lenient_normalise(got) != "/admin",
                "{t}: deny rule dodged, upstream received {:?} (status {})",
                h.path,
                r.status
            );
            assert!(
                !got.to_ascii_lowercase().contains("%") && !got.contains('\\') && !got.contains("//"),
                "{t}: upstream received an unnormalised path {got:?}"
            );
        }
        if r.status == 200 {
            assert_eq!(new.len(), 1);
        }
    }
    // the one that must be denied outright, whatever the spelling that normalises to it
    for t in ["//admin/", "/%61dmin/", "/x/../admin/", "/./admin/", "/admin/x"] {
        let r = get("open.test", t.to_string()).await;
        assert!(r.status == 403 || r.status == 400, "{t}: expected 403 (or 400), got {}", r.status);
    }
}

// ------------------------------------------------------------------------------------------
// WebSocket
// ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_proxy_authenticated_and_bypass() {
    let up = start_upstream().await;
    let cfg = format!("{}{}", app("app.test", &up.url(), "one_factor"), app("open.test", &up.url(), "bypass"));
    let env = Env::password_only(&cfg);
    env.add_user("alice", "alice@example.com", "Alice", &[], PW).await;
    let gw = env.start().await;
    let mut c = gw.client("app.test");
    c.login_ok("alice", PW).await;

    // unauthenticated upgrade refused
    let tcp = within("connect", TcpStream::connect(gw.addr)).await.unwrap();
    let req = "ws://app.test/ws".into_client_request().unwrap();
    match within("ws handshake (no session)", tokio_tungstenite::client_async(req, tcp)).await {
        Ok(_) => panic!("websocket upgrade without a session was accepted"),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 401, "unauthenticated ws upgrade")
        }
        Err(e) => panic!("unexpected ws error without session: {e}"),
    }

    for (host, expect_user) in [("app.test", "alice"), ("open.test", "-")] {
        let tcp = within("connect", TcpStream::connect(gw.addr)).await.unwrap();
        let mut req = format!("ws://{host}/ws").into_client_request().unwrap();
        req.headers_mut().insert("cookie", c.cookie_header().parse().unwrap());
        req.headers_mut().insert("remote-user", "spoofed".parse().unwrap());
        let (mut ws, resp) = within("ws handshake", tokio_tungstenite::client_async(req, tcp))
            .await
            .unwrap_or_else(|e| panic!("{host}: ws handshake failed: {e}"));
        assert_eq!(resp.status().as_u16(), 101);
        let first = within("ws first message", ws.next()).await.expect("ws closed").expect("ws error");
        assert_eq!(first.to_text().unwrap(), expect_user, "{host}: identity seen by upstream ws handler");
        within("ws send", ws.send(Message::text("hello through the gate"))).await.unwrap();
        let m = within("ws echo", ws.next()).await.unwrap().unwrap();
        assert_eq!(m.to_text().unwrap(), "hello through the gate");
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        within("ws send binary", ws.send(Message::binary(big.clone()))).await.unwrap();
        let m = within("ws binary echo", ws.next()).await.unwrap().unwrap();
        assert_eq!(m.into_data().as_ref(), &big[..]);
        within("ws close", ws.close(None)).await.ok();
    }
}

// ------------------------------------------------------------------------------------------
// HTTP/2 over TLS
// ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_over_tls_health_and_proxied_request() {
    let up = start_upstream().await;
    let cfg = format!(
        "[server]\ntls_cert = \"{{DIR}}/cert.pem\"\ntls_key = \"{{DIR}}/key.pem\"\n\n{}",
        app("localhost", &up.url(), "bypass")
    );
    let env = Env::password_only(&cfg);
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(env.path().join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(env.path().join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
    let gw = env.start_unchecked().await;

    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tcp = within("tcp connect", TcpStream::connect(gw.addr)).await.unwrap();
    let tls = within("tls handshake", tls_connector(&ck.cert, b"h2").connect(name.clone(), tcp))
        .await
        .expect("TLS handshake with the gateway");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "ALPN h2 not negotiated");
    let (mut send, conn) =
        within("h2 handshake", hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);

    let req = Request::get("https://localhost/_portcullis/health").body(empty_body()).unwrap();
    let resp = within("h2 health", send.send_request(req)).await.unwrap();
    assert_eq!(resp.version(), hyper::Version::HTTP_2);
    assert_eq!(resp.status().as_u16(), 200);
    let body = within("h2 body", resp.into_body().collect()).await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ok");

    let req = Request::get("https://localhost/via/h2?q=1").body(empty_body()).unwrap();
    let resp = within("h2 proxied", send.send_request(req)).await.unwrap();
    assert_eq!(resp.version(), hyper::Version::HTTP_2);
    assert_eq!(resp.status().as_u16(), 200);
    let body = within("h2 body", resp.into_body().collect()).await.unwrap().to_bytes();
    let j: serde_json::Value = serde_json::from_slice(&body).expect("upstream JSON");
    assert_eq!(j["path"], "/via/h2?q=1");
    assert_eq!(j["headers"]["x-forwarded-proto"][0], "https");

    // http/1.1 over TLS still works
    let tcp = within("connect", TcpStream::connect(gw.addr)).await.unwrap();
    let tls = within("tls handshake h1", tls_connector(&ck.cert, b"http/1.1").connect(name, tcp)).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::get("/_portcullis/health").header("host", "localhost").body(empty_body()).unwrap();
    let resp = within("h1 over tls", send.send_request(req)).await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.version(), hyper::Version::HTTP_11);
    gw.stop().await;
}

// ------------------------------------------------------------------------------------------
// Streaming through a child process, RSS bounded
// ------------------------------------------------------------------------------------------

struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

fn sample_rss(pid: u32) -> RssSampler {
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(rss_kb(pid)));
    let (s, p) = (stop.clone(), peak.clone());
    let task = tokio::spawn(async move {
        while !s.load(Ordering::Relaxed) {
            p.fetch_max(rss_kb(pid), Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    });
    RssSampler { stop, peak, task }
}

impl RssSampler {
    async fn finish(self, pid: u32) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.peak.fetch_max(rss_kb(pid), Ordering::Relaxed);
        self.peak.load(Ordering::Relaxed)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_upload_and_download_stream_with_bounded_memory() {
    const TOTAL: u64 = 200 * 1024 * 1024;
    const LIMIT: Duration = Duration::from_secs(300);
    let up = start_upstream().await;
    let env =
        Env::password_only(&format!("[server]\nlisten = \"{{LISTEN}}\"\n\n{}", app("app.test", &up.url(), "bypass")));
    let gw = env.spawn_child().await;
    // warm up
    let mut c = Client::new(gw.addr, "app.test");
    assert_eq!(c.get("/warm").await.status, 200);
    let baseline = gw.rss_kb();
    assert!(baseline > 0, "could not read VmRSS of pid {}", gw.pid);

    // upload
    let sampler = sample_rss(gw.pid);
    let t = Instant::now();
    let tcp = within("connect", TcpStream::connect(gw.addr)).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let chunk = Bytes::from(vec![7u8; 65536]);
    let stream = futures_util::stream::unfold(TOTAL, move |left| {
        let chunk = chunk.clone();
        async move {
            if left == 0 {
                None
            } else {
                let k = left.min(65536);
                Some((Ok::<_, Infallible>(Frame::data(chunk.slice(0..k as usize))), left - k))
            }
        }
    });
    let req = Request::post("/upload").header("host", "app.test").body(StreamBody::new(stream)).unwrap();
    let resp = within_for(LIMIT, "200 MB upload", send.send_request(req)).await.expect("upload request");
    assert_eq!(resp.status().as_u16(), 200);
    let body = within("upload response", resp.into_body().collect()).await.unwrap().to_bytes();
    let up_secs = t.elapsed().as_secs_f64();
    let peak_up = sampler.finish(gw.pid).await;
    assert_eq!(String::from_utf8_lossy(&body), TOTAL.to_string(), "upstream byte count");

    // download
    let sampler = sample_rss(gw.pid);
    let t = Instant::now();
    let tcp = within("connect", TcpStream::connect(gw.addr)).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::get(format!("/download?bytes={TOTAL}")).header("host", "app.test").body(empty_body()).unwrap();
    let resp = within("download headers", send.send_request(req)).await.expect("download request");
    assert_eq!(resp.status().as_u16(), 200);
    let mut body = resp.into_body();
    let mut got: u64 = 0;
    within_for(LIMIT, "200 MB download", async {
        while let Some(fr) = body.frame().await {
            let fr = fr.expect("download body error");
            if let Some(d) = fr.data_ref() {
                got += d.len() as u64;
            }
        }
    })
    .await;
    let down_secs = t.elapsed().as_secs_f64();
    let peak_down = sampler.finish(gw.pid).await;
    assert_eq!(got, TOTAL, "downloaded byte count");

    eprintln!(
        "gateway RSS: baseline {} KiB, peak during upload {} KiB (+{} KiB, {:.1}s), peak during download {} KiB (+{} KiB, {:.1}s)",
        baseline,
        peak_up,
        peak_up.saturating_sub(baseline),
        up_secs,
        peak_down,
        peak_down.saturating_sub(baseline),
        down_secs
    );
    let limit = baseline + 60 * 1024;
    assert!(peak_up < limit, "upload peak RSS {peak_up} KiB >= baseline {baseline} + 60 MiB");
    assert!(peak_down < limit, "download peak RSS {peak_down} KiB >= baseline {baseline} + 60 MiB");
    assert_eq!(c.get("/_portcullis/health").await.status, 200);
}

// ------------------------------------------------------------------------------------------
// Upstream failures
// ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_502_and_slow_upstream_is_504() {
    // The relay has its own 502/504 pages (relay::upstream_down_is_502_and_slow_upstream_is_504_on_the_relay);
    // both lanes must give them.
    let up = start_upstream().await;
    let closed = free_addr();
    let (maddr, metrics) = metrics_section();
    let cfg = format!(
        "{metrics}{}[[app]]\nhost = \"slow.test\"\nupstream = \"{}\"\npolicy = \"bypass\"\nupstream_timeout = \"1s\"\n\n{}",
        app("down.test", &format!("http://{closed}"), "bypass"),
        up.url(),
        app("app.test", &up.url(), "bypass"),
    );
    let env = Env::password_only(&cfg);
    let gw = env.start().await;

    for lane in Lane::BOTH {
        let before = counts(maddr).await;
        let r = gw.client("down.test").send("GET", "/x", lane.headers(), None).await;
        assert_eq!(r.status, 502, "refused upstream ({lane:?})");
        let r = gw.client("down.test").send("GET", "/x", &lane.with(&[("accept", "text/html")]), None).await;
        assert_eq!(r.status, 502, "refused upstream (browser, {lane:?})");
        assert!(r.text().contains("Application unavailable"), "the 502 page ({lane:?}): {}", r.text());

        let t = Instant::now();
        let r = gw.client("slow.test").send("GET", "/hang", lane.headers(), None).await;
        let el = t.elapsed();
        assert_eq!(r.status, 504, "hanging upstream with upstream_timeout = 1s ({lane:?})");
        assert!(el >= Duration::from_millis(900), "504 came too early: {el:?} ({lane:?})");
        assert!(el < Duration::from_secs(20), "504 came too late: {el:?} ({lane:?})");
        // a fast request on the same app is fine
        assert_eq!(gw.client("slow.test").send("GET", "/fast", lane.headers(), None).await.status, 200);
        lane.assert_served(maddr, before, 4, "502, 502, 504, 200").await;
    }

    assert_eq!(gw.client("app.test").get("/_portcullis/health").await.text(), "ok");
    assert_eq!(gw.client("app.test").get("/still-ok").await.status, 200);
    assert!(gw.is_running());
}
