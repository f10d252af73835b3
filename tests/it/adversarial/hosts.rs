//! Host tricks: no Host header form reaches a protected app unauthenticated.

use super::*;

// =============================================================================================
// Host tricks
// =============================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_header_tricks_never_reach_a_protected_app_unauthenticated() {
    let w = world("").await;
    let a = w.gw.addr;
    let mut failures = Vec::new();
    // (request head lines after the request line, request target): every one is unauthenticated
    let cases: Vec<(String, String)> = vec![
        (format!("Host: {OPEN}\r\nX-Forwarded-Host: {APP}\r\n"), "/xfh-open".into()),
        (format!("Host: {APP}\r\nX-Forwarded-Host: {OPEN}\r\n"), "/xfh-app".into()),
        (format!("Host: {APP}\r\nForwarded: host={OPEN}\r\n"), "/fwd-app".into()),
        (format!("Host: {APP}\r\nX-Original-Host: {OPEN}\r\nX-Host: {OPEN}\r\n"), "/xoh".into()),
        (format!("Host: {APP}\r\n"), format!("http://{OPEN}/absform-app-host")),
        (format!("Host: {OPEN}\r\n"), format!("http://{APP}/absform-open-host")),
        (format!("Host: {OPEN}\r\n"), format!("http://{APP}:80/absform-port")),
        (format!("Host: {OPEN}\r\n"), format!("https://{APP}/absform-https")),
        (format!("Host: {OPEN}\r\n"), format!("http://{OPEN}@{APP}/absform-userinfo")),
        (format!("Host: {APP}\r\nHost: {OPEN}\r\n"), "/two-hosts-app-first".into()),
        (format!("Host: {OPEN}\r\nHost: {APP}\r\n"), "/two-hosts-open-first".into()),
        (format!("Host: {OPEN}, {APP}\r\n"), "/host-list".into()),
        (format!("Host: {OPEN}@{APP}\r\n"), "/host-userinfo".into()),
        (format!("Host: {APP}@{OPEN}\r\n"), "/host-userinfo2".into()),
        (format!("Host: {OPEN}/x\r\n"), "/host-with-path".into()),
        (format!("Host: {OPEN}:80:80\r\n"), "/host-double-port".into()),
        (format!("Host: {OPEN}:99999\r\n"), "/host-bad-port".into()),
        (format!("Host: {OPEN}..\r\n"), "/host-two-dots".into()),
        (format!("Host: {OPEN}%2e\r\n"), "/host-encoded".into()),
        (format!("Host: {OPEN}\0.{APP}\r\n"), "/host-nul".into()),
        (format!("Host:  {OPEN} \r\n"), "/host-spaces".into()),
        ("Host: \r\n".into(), "/host-empty".into()),
        (String::new(), "/no-host-http11".into()),
        (format!("Host: {}\r\n", APP.to_ascii_uppercase()), "/upper-app".into()),
        (format!("Host: {APP}.\r\n"), "/trailing-dot-app".into()),
        (format!("Host: {APP}:1\r\n"), "/port-app".into()),
        ("Host: unknown.test\r\n".to_string(), "/unknown".into()),
        (format!("Host: {OPEN}\r\n"), "*".into()),
    ];
    for (headers, target) in &cases {
        let before = w.up.hit_count();
        let before_open = w.open.hit_count();
        let req = format!("GET {target} HTTP/1.1\r\n{headers}Connection: close\r\n\r\n");
        let r = raw_send(a, req.as_bytes()).await;
        let app_hits: Vec<Hit> = w.up.hits()[before..].to_vec();
        let open_hits = w.open.hit_count() - before_open;
        eprintln!("host {headers:?} {target} -> {} (app hits {}, open hits {open_hits})", r.status, app_hits.len());
        if r.status >= 500 {
            failures.push(format!("{headers:?} {target}: gateway error {}", r.status));
        }
        if !app_hits.is_empty() {
            failures.push(format!(
                "{headers:?} {target}: protected upstream reached without a session: {:?}",
                app_hits[0].path
            ));
        }
        if r.status == 200 && open_hits != 1 {
            failures.push(format!("{headers:?} {target}: 200 but not from the bypass app"));
        }
    }
    // The login redirect never names a host from X-Forwarded-Host / Forwarded sent by an untrusted peer.
    for h in [("x-forwarded-host", "evil.com"), ("forwarded", "host=evil.com;proto=https")] {
        let r = w.gw.client(APP).send("GET", "/page", &[("accept", "text/html"), h], None).await;
        assert_eq!(r.status, 302);
        if r.location().contains("evil") {
            failures.push(format!("{h:?} from an untrusted peer went into Location {}", r.location()));
        }
    }
    // Host matching variants still authenticate normally (positive controls).
    let mut alice = w.gw.client(APP);
    alice.login_ok("alice", PW).await;
    for host in ["APP.TEST", "app.test.", "app.test:8080"] {
        let mut c = Client::new(a, host);
        c.jar = alice.jar.clone();
        assert_eq!(c.get("/ok").await.status, 200, "host {host}");
        assert_eq!(Client::new(a, host).get("/ok").await.status, 401, "host {host} without session");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
