//! Identity-header spoofing: client-sent identity headers never reach an app, in any spelling, on any lane.

use super::*;

// =============================================================================================
// Identity-header spoofing
// =============================================================================================

const SPOOF_NAMES: &[&str] = &[
    "Remote-User",
    "rEmOtE-uSeR",
    "REMOTE_USER",
    "remote_user",
    "Remote-Email",
    "REMOTE-EMAIL",
    "remote_email",
    "Remote-Name",
    "remote_NAME",
    "Remote-Groups",
    "REMOTE_GROUPS",
    "X-Forwarded-User",
    "x_forwarded_user",
    "X-FORWARDED-EMAIL",
    "x_forwarded_groups",
    "X-Forwarded-Preferred-Username",
    "X_Forwarded_Preferred_Username",
    "X-Auth-Request-User",
    "X-AUTH-REQUEST-EMAIL",
    "x_auth_request_groups",
    "X-Auth-Request-Preferred-Username",
    "x-auth-request-access-token",
];

/// Every name twice (duplicate header lines with different values).
fn spoof_headers() -> Vec<(String, String)> {
    let mut v = Vec::new();
    for n in SPOOF_NAMES {
        v.push((n.to_string(), "spoofed-admin".to_string()));
        v.push((n.to_string(), "spoofed-second,admins".to_string()));
    }
    v
}

fn spoofed_in(h: &BTreeMap<String, Vec<String>>) -> Vec<String> {
    h.iter().filter(|(_, vs)| vs.iter().any(|v| v.contains("spoofed"))).map(|(k, vs)| format!("{k}: {vs:?}")).collect()
}

/// Raw header blocks a client library wouldn't send: obs-fold continuations, no space, tabs, space before ':'.
const RAW_SPOOFS: &[&str] = &[
    "Remote-User: spoofed-fold\r\n spoofed-continued\r\n",
    "X-Other: x\r\n Remote-User: spoofed-in-fold\r\n",
    "Remote-User:spoofed-nospace\r\n",
    "Remote-User:\tspoofed-tab\r\n",
    "Remote-User : spoofed-space-before-colon\r\n",
    "Remote-User: \r\nRemote-User: spoofed-after-empty\r\n",
    "Remote_User: spoofed-underscore\r\nREMOTE-GROUPS: spoofed-admins\r\n",
    "Remote-User: spoofed-nul\0x\r\n",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_header_spoofing_every_variant_on_every_route() {
    let w = world("").await;
    let spoofs = spoof_headers();
    let refs: Vec<(&str, &str)> = spoofs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut alice = w.gw.client(APP);
    alice.login_ok("alice", PW).await;
    let cookie = format!("{SESSION}={}", alice.session_cookie().unwrap());
    let mut failures = Vec::new();

    // authenticated route, bypass rule inside a protected app, bypass app (with and without a session)
    for (what, host, path, with_session) in [
        ("authenticated", APP, "/auth", true),
        ("bypass rule, no session", APP, "/public/p", false),
        ("bypass rule, session", APP, "/public/p", true),
        ("bypass app, no session", OPEN, "/o", false),
        ("bypass app, session", OPEN, "/o", true),
    ] {
        let mut c = w.gw.client(host);
        if with_session {
            c.jar = alice.jar.clone();
        }
        let r = c.send("GET", path, &refs, None).await;
        assert_eq!(r.status, 200, "{what}: {}", r.text());
        let h = r.upstream_headers();
        for s in spoofed_in(&h) {
            failures.push(format!("{what}: upstream got {s}"));
        }
        let ru = h.get("remote-user").cloned().unwrap_or_default();
        if what == "authenticated" {
            if ru != vec!["alice".to_string()] {
                failures.push(format!("{what}: Remote-User {ru:?}, want exactly [\"alice\"]"));
            }
            if h.get("remote-groups") != Some(&vec!["staff".to_string()]) {
                failures.push(format!("{what}: Remote-Groups {:?}", h.get("remote-groups")));
            }
        } else if !ru.is_empty() {
            failures.push(format!("{what}: a bypass route sent identity Remote-User {ru:?}"));
        }
    }

    // raw header blocks: either a 400 or the request arrives without the spoofed values
    for extra in RAW_SPOOFS {
        for (host, path, with_cookie) in
            [(APP, "/raw-auth", true), (OPEN, "/raw-open", false), (APP, "/public/raw", false)]
        {
            let before_app = w.up.hit_count();
            let before_open = w.open.hit_count();
            let ck = if with_cookie { format!("Cookie: {cookie}\r\n") } else { String::new() };
            let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{ck}{extra}Connection: close\r\n\r\n");
            let r = raw_send(w.gw.addr, req.as_bytes()).await;
            assert!(r.status < 500, "{extra:?} on {host}{path}: {}", r.head);
            let hits: Vec<Hit> =
                w.up.hits()[before_app..].iter().chain(w.open.hits()[before_open..].iter()).cloned().collect();
            for h in &hits {
                for s in spoofed_in(&h.headers) {
                    failures.push(format!("raw {extra:?} on {host}{path}: upstream got {s} (status {})", r.status));
                }
                if with_cookie && h.header("remote-user") != Some(vec!["alice".into()]) {
                    failures.push(format!("raw {extra:?}: Remote-User {:?}", h.header("remote-user")));
                }
            }
            eprintln!("raw spoof {extra:?} {host}{path} -> {} ({} upstream hits)", r.status, hits.len());
        }
    }

    // Spoofed groups don't open a group-restricted app.
    let mut g = w.gw.client(GRP);
    g.jar = alice.jar.clone();
    let r = g.send("GET", "/grp", &[("Remote-Groups", "admins"), ("X-Forwarded-Groups", "admins")], None).await;
    if r.status != 403 {
        failures.push(format!("spoofed Remote-Groups: admins opened a groups=[admins] app: {}", r.status));
    }
    assert!(failures.is_empty(), "{} spoofing failure(s):\n{}", failures.len(), failures.join("\n"));
}

/// Every spoof name in the letter case written in [`SPOOF_NAMES`], twice, as raw header lines: a client library
/// would lower-case them on the wire, and the case-folding is what is under test.
fn raw_spoof_block() -> String {
    spoof_headers().iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_header_spoofing_in_any_letter_case_sent_raw_on_both_paths() {
    let (maddr, metrics) = metrics_section();
    let w = world(&metrics).await;
    let mut alice = w.gw.client(APP);
    alice.login_ok("alice", PW).await;
    // a first proxied request puts the session in the cache, so the relay can serve the next ones
    assert_eq!(alice.get("/warm").await.status, 200);
    let cookie = format!("Cookie: {SESSION}={}\r\n", alice.session_cookie().unwrap());
    let block = raw_spoof_block();
    let mut failures = Vec::new();
    // the relay takes a bodyless GET; `Content-Length: 0` sends the same request through hyper's path
    for (lane, framing, relayed, handovers) in [("relay", "", 1, 0), ("hyper", "Content-Length: 0\r\n", 0, 1)] {
        for (route, host, path, ck) in [
            ("authenticated", APP, "/auth", cookie.as_str()),
            ("bypass rule", APP, "/public/p", ""),
            ("bypass app", OPEN, "/o", ""),
        ] {
            let what = format!("{lane}, {route}");
            let (app_before, open_before) = (w.up.hit_count(), w.open.hit_count());
            let before = counts(maddr).await;
            let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{ck}{framing}{block}Connection: close\r\n\r\n");
            let r = raw_send(w.gw.addr, req.as_bytes()).await;
            assert_eq!(r.status, 200, "{what}: {}", r.head);
            let delta = counts(maddr).await - before;
            assert_eq!(delta, Counts { relayed, handovers }, "{what}: served by the wrong path ({delta:?})");
            let hits: Vec<Hit> =
                w.up.hits()[app_before..].iter().chain(w.open.hits()[open_before..].iter()).cloned().collect();
            assert_eq!(hits.len(), 1, "{what}: want exactly one upstream request, got {}", hits.len());
            for s in spoofed_in(&hits[0].headers) {
                failures.push(format!("{what}: upstream got {s}"));
            }
            let ru = hits[0].header("remote-user");
            let want = (route == "authenticated").then(|| vec!["alice".to_string()]);
            if ru != want {
                failures.push(format!("{what}: Remote-User {ru:?}, want {want:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{} spoofing failure(s):\n{}", failures.len(), failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_header_spoofing_on_verify_responses() {
    let w = world("[server]\ntrusted_proxies = [\"127.0.0.1/32\"]\n").await;
    let spoofs = spoof_headers();
    let mut alice = w.gw.client(APP);
    alice.login_ok("alice", PW).await;
    let mut failures = Vec::new();
    for (style, host, uri) in [
        ("caddy", APP, "/x"),
        ("caddy", OPEN, "/x"),
        ("caddy", APP, "/public/x"),
        ("nginx", APP, "/x"),
        ("nginx", OPEN, "/x"),
    ] {
        let url = format!("http://{host}{uri}");
        let mut h: Vec<(&str, &str)> = spoofs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        if style == "caddy" {
            h.extend([
                ("x-forwarded-method", "GET"),
                ("x-forwarded-proto", "http"),
                ("x-forwarded-host", host),
                ("x-forwarded-uri", uri),
            ]);
        } else {
            h.extend([("x-original-url", url.as_str()), ("x-original-method", "GET")]);
        }
        for with_session in [false, true] {
            let mut c = w.gw.client(APP);
            if with_session {
                c.jar = alice.jar.clone();
            }
            let r = c.send("GET", &format!("{PREFIX}/verify"), &h, None).await;
            let ctx = format!("verify {style} {url} session={with_session} -> {}", r.status);
            for (k, v) in r.headers.iter() {
                let v = String::from_utf8_lossy(v.as_bytes());
                if v.contains("spoofed") {
                    failures.push(format!("{ctx}: response header {k}: {v}"));
                }
            }
            let users: Vec<String> = r
                .headers
                .get_all("remote-user")
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect();
            let protected = host == APP && !uri.starts_with("/public/");
            match (protected, with_session) {
                (true, true) => {
                    if r.status != 200 || users != vec!["alice".to_string()] {
                        failures.push(format!("{ctx}: want 200 with Remote-User exactly [alice], got {users:?}"));
                    }
                }
                (true, false) => {
                    if r.status == 200 || !users.is_empty() {
                        failures.push(format!("{ctx}: no session but allowed / identity {users:?}"));
                    }
                }
                (false, _) => {
                    if r.status != 200 || !users.is_empty() {
                        failures.push(format!("{ctx}: bypass should be 200 without identity, got {users:?}"));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
