//! Operations: forward-auth through a real nginx (auth_request) and Caddy/Traefik-style verify requests,
//! trusted-proxy handling, the audit log and log hygiene of a `serve` child process, Prometheus metrics,
//! environment overrides and `*_file` secrets, SIGHUP reloads (good and bad).

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use portcullis::clock::Clock;
use tokio::sync::Notify;

use crate::support::*;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const NGINX: &str = "/usr/sbin/nginx";
/// The host the example nginx config serves.
const WIKI: &str = "wiki.example.com";
const APP: &str = "app.test";
const WRONG_PW: &str = "Wr0ng-passw0rd-typed!";

fn event_kinds(user: &serde_json::Value) -> Vec<String> {
    user["recent_events"]
        .as_array()
        .unwrap_or_else(|| panic!("no recent_events array: {user}"))
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// Password login + forced enrolment, at the in-process gateway's clock time.
async fn enrol(gw: &Gateway, c: &mut Client, user: &str) -> Enrolled {
    enrol_forced(c, user, PW, || gw.clock.now()).await
}

/// POST /login with extra request headers.
async fn post_login_with(c: &mut Client, user: &str, pass: &str, headers: &[(&str, &str)]) -> Resp {
    c.jar.remove(SESSION);
    let csrf = c.login_csrf("/").await;
    let body =
        serde_urlencoded::to_string([("csrf", csrf.as_str()), ("rd", "/"), ("username", user), ("password", pass)])
            .unwrap();
    let mut h = headers.to_vec();
    h.push(("accept", "text/html"));
    c.send("POST", &format!("{PREFIX}/login"), &h, Some(("application/x-www-form-urlencoded", body.into_bytes()))).await
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        .unwrap_or(false)
}

/// The CLI with extra environment variables.
async fn cli_env(config: &Path, args: &[&str], vars: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"));
    cmd.args(args).arg("-c").arg(config).stdin(std::process::Stdio::null()).kill_on_drop(true);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    within_for(Duration::from_secs(60), &format!("portcullis {args:?}"), cmd.output()).await.unwrap()
}

/// Polls `f` until it is true, at most `secs` seconds.
async fn eventually<F, Fut>(what: &str, secs: u64, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if f().await {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "not within {secs}s: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ----- a slow upstream ------------------------------------------------------------------------------

/// An upstream whose `.../slow` route answers only once released; everything else answers `ok PATH` at once.
struct SlowUpstream {
    addr: SocketAddr,
    arrived: Arc<Notify>,
    release: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SlowUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SlowUpstream {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

async fn start_slow_upstream() -> SlowUpstream {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let arrived = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let (a, r) = (arrived.clone(), release.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let (a, r) = (a.clone(), r.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (a, r) = (a.clone(), r.clone());
                    async move {
                        let path = req.uri().path().to_string();
                        let body = if path.ends_with("/slow") {
                            a.notify_one();
                            r.notified().await;
                            "slow done".to_string()
                        } else {
                            format!("ok {path}")
                        };
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
            });
        }
    });
    SlowUpstream { addr, arrived, release, task }
}

// ----- real nginx -----------------------------------------------------------------------------------

/// An nginx child process, killed by PID when dropped (also on panic).
struct Nginx {
    child: std::process::Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Nginx {
    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nginx.conf: the `server` block of examples/nginx-auth-request.conf with TLS dropped and the addresses replaced,
/// wrapped in a main/http context that keeps every file inside `dir`.
fn nginx_conf(dir: &Path, listen: SocketAddr, gateway: SocketAddr, upstream: SocketAddr) -> String {
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/nginx-auth-request.conf"))
        .expect("read examples/nginx-auth-request.conf");
    for needle in ["listen 443 ssl;", "127.0.0.1:8080", "127.0.0.1:9000", "auth_request /_portcullis/verify;"] {
        assert!(example.contains(needle), "examples/nginx-auth-request.conf no longer contains {needle:?}");
    }
    let server: String = example
        .lines()
        .filter(|l| !l.trim_start().starts_with("ssl_"))
        .map(|l| {
            l.replace("listen 443 ssl;", &format!("listen {listen};"))
                .replace("127.0.0.1:8080", &gateway.to_string())
                .replace("127.0.0.1:9000", &upstream.to_string())
                + "\n"
        })
        .collect();
    let d = dir.display();
    let user = if is_root() { "user root;\n" } else { "" };
    format!(
        "{user}master_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
         events {{ worker_connections 128; }}\n\
         http {{\n\
         access_log {d}/access.log;\n\
         client_body_temp_path {d}/client_body;\nproxy_temp_path {d}/proxy;\nfastcgi_temp_path {d}/fastcgi;\n\
         uwsgi_temp_path {d}/uwsgi;\nscgi_temp_path {d}/scgi;\n\
         {server}\n}}\n"
    )
}

async fn start_nginx(base: &Path, gateway: SocketAddr, upstream: SocketAddr) -> Nginx {
    let dir = base.join("nginx");
    std::fs::create_dir_all(&dir).unwrap();
    let listen = free_addr();
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, nginx_conf(&dir, listen, gateway, upstream)).unwrap();
    let errlog = dir.join("error.log");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        v.extend([
            "-p".into(),
            dir.display().to_string(),
            "-c".into(),
            conf.display().to_string(),
            "-e".into(),
            errlog.display().to_string(),
        ]);
        v
    };
    if let Some(why) = missing_tool(NGINX, "-v", "nginx") {
        panic!("{why}");
    }
    let t = std::process::Command::new(NGINX).args(args(&["-t"])).output().expect("run nginx -t");
    assert!(
        t.status.success(),
        "nginx -t rejected the config: {}\nconfig:\n{}",
        out_text(&t),
        std::fs::read_to_string(&conf).unwrap()
    );
    let child = std::process::Command::new(NGINX)
        .args(args(&["-g", "daemon off;"]))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn nginx");
    let mut n = Nginx { child, addr: listen, dir };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(st)) = n.child.try_wait() {
            panic!("nginx exited early ({st}); error.log:\n{}", n.error_log());
        }
        if tokio::net::TcpStream::connect(listen).await.is_ok() {
            return n;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nginx not listening within 20s; error.log:\n{}",
            n.error_log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ----- metrics text -----------------------------------------------------------------------------------

/// (name, labels, value) of every sample line of a Prometheus/OpenMetrics text exposition.
fn samples(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let value: f64 = value.trim().parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => {
                    let inner = rest.strip_suffix('}')?;
                    let mut m = BTreeMap::new();
                    for kv in inner.split(',').filter(|s| !s.is_empty()) {
                        let (k, v) = kv.split_once('=')?;
                        m.insert(k.trim().to_string(), v.trim().trim_matches('"').to_string());
                    }
                    (n.to_string(), m)
                }
                None => (series.to_string(), BTreeMap::new()),
            };
            Some((name, labels, value))
        })
        .collect()
}

/// The value of the sample `name` whose labels include `want` (None when absent).
fn sample(text: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    samples(text)
        .into_iter()
        .find(|(n, l, _)| n == name && want.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
        .map(|(_, _, v)| v)
}

async fn scrape(addr: SocketAddr, auth: Option<&str>) -> Resp {
    let mut c = Client::new(addr, &addr.to_string());
    let h: Vec<(&str, &str)> = auth.map(|a| vec![("authorization", a)]).unwrap_or_default();
    c.send("GET", "/metrics", &h, None).await
}

// ---------------------------------------------------------------------------------------------
// Forward-auth
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_auth_request_login_flow() {
    let up = start_upstream().await;
    let env =
        Env::new(&format!("[server]\ntrusted_proxies = [\"127.0.0.1/32\"]\n\n{}", app(WIKI, &up.url(), "two_factor")));
    env.add_user("alice", "alice@example.com", "Alice Liddell", &["staff"], PW).await;
    let gw = env.start().await;
    let ngx = start_nginx(env.path(), gw.addr, up.addr).await;
    let mut c = Client::new(ngx.addr, WIKI);

    // Not signed in: the gateway says 401 to the sub-request, nginx turns it into the login redirect.
    let r = c.browse("/docs/page?x=1").await;
    assert_eq!(
        r.status,
        302,
        "unauthenticated app request through nginx: {}\nerror.log:\n{}",
        r.text(),
        ngx.error_log()
    );
    let loc = r.location();
    let path = loc
        .strip_prefix(&format!("http://{WIKI}"))
        .unwrap_or_else(|| panic!("login redirect {loc} is not to http://{WIKI}/..."));
    assert!(path.starts_with(&format!("{PREFIX}/login?")), "redirect to {loc}");
    assert_eq!(query_param(path, "rd").as_deref(), Some("/docs/page?x=1"), "rd in {loc}");
    assert_eq!(up.hit_count(), 0, "the upstream was reached without a session");

    // Spoofed identity headers don't get an unauthenticated request through either.
    let r = c
        .send(
            "GET",
            "/docs/page",
            &[("accept", "text/html"), ("remote-user", "alice"), ("x-forwarded-user", "alice")],
            None,
        )
        .await;
    assert_eq!(r.status, 302, "spoofed Remote-User without a session: {}", r.text());
    assert_eq!(up.hit_count(), 0);

    // Log in through nginx: login page, password, forced enrolment — all portal pages proxied by nginx.
    let page = c.browse(path).await;
    assert_eq!(page.status, 200, "login page through nginx: {}", page.text());
    let csrf = csrf_of(&page);
    let r = c.post_login(&csrf, "alice", PW, "/docs/page?x=1").await;
    assert_eq!(r.status, 303, "login POST through nginx: {}", r.text());
    let enrolled = finish_forced_enrolment(&mut c, &r.location(), || gw.clock.now()).await;
    assert!(!enrolled.secret.is_empty());
    assert!(c.session_cookie().is_some(), "no session cookie after enrolment through nginx");

    // Signed in: nginx proxies to the upstream with the identity from the gateway's answer only.
    let r = c
        .send(
            "GET",
            "/docs/page?x=1",
            &[
                ("accept", "text/html"),
                ("remote-user", "mallory"),
                ("remote-groups", "admins"),
                ("remote-email", "mallory@evil.test"),
                ("x-forwarded-user", "mallory"),
                ("x-forwarded-email", "mallory@evil.test"),
                ("x-forwarded-groups", "admins-mallory"),
                ("x-auth-request-user", "mallory"),
                ("x-remote-user", "mallory"),
                ("remote_user", "mallory"),
            ],
            None,
        )
        .await;
    assert_eq!(r.status, 200, "signed-in request through nginx: {}\nerror.log:\n{}", r.text(), ngx.error_log());
    assert_eq!(r.upstream_path(), "/docs/page?x=1");
    assert_eq!(r.upstream_header("remote-user"), Some(vec!["alice".to_string()]), "Remote-User at the upstream");
    assert_eq!(r.upstream_header("remote-email"), Some(vec!["alice@example.com".to_string()]));
    assert_eq!(r.upstream_header("remote-groups"), Some(vec!["staff".to_string()]));
    let leaked: Vec<String> = r
        .upstream_headers()
        .iter()
        .filter(|(_, vs)| vs.iter().any(|v| v.contains("mallory")))
        .map(|(k, vs)| format!("{k}: {vs:?}"))
        .collect();
    assert_eq!(up.hit_count(), 1);

    // Signing out through nginx ends access through nginx.
    logout(&mut c).await;
    let r = c.browse("/docs/page").await;
    assert_eq!(r.status, 302, "after logout: {}", r.text());
    assert_eq!(up.hit_count(), 1);
    drop(ngx);

    // Checked last so the rest of the flow is verified either way.
    assert!(
        leaked.is_empty(),
        "spoofed identity headers sent by the client reached the upstream through nginx \
         (examples/nginx-auth-request.conf): {leaked:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caddy_style_forwarded_headers_get_verify_answers() {
    let up = start_upstream().await;
    let env = Env::new(&format!(
        "[server]\ntrusted_proxies = [\"127.0.0.1/32\"]\n\n{}  [[app.rule]]\n  path = \"/public/\"\n  policy = \"bypass\"\n\n  [[app.rule]]\n  path = \"/private/\"\n  policy = \"deny\"\n\n",
        app(APP, &up.url(), "two_factor")
    ));
    env.add_user("alice", "alice@example.com", "Alice Liddell", &["staff", "ops"], PW).await;
    let gw = env.start().await;
    let mut browser = gw.client(APP);
    enrol(&gw, &mut browser, "alice").await;
    let session = browser.session_cookie().unwrap();

    let verify = format!("{PREFIX}/verify");
    let fwd = |uri: &'static str, host: &'static str| -> Vec<(&'static str, &'static str)> {
        vec![
            ("x-forwarded-method", "GET"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", host),
            ("x-forwarded-uri", uri),
            ("x-forwarded-for", "198.51.100.7"),
        ]
    };
    // The proxy's own Host differs from the original request's.
    let mut proxy = Client::new(gw.addr, "portcullis.internal:8080");

    // No session: 302 to the login page on the original host and scheme, with rd.
    let r = proxy.send("GET", &verify, &fwd("/docs/a?b=1&c=2", APP), None).await;
    assert_eq!(r.status, 302, "verify without a session: {}", r.text());
    let loc = r.location();
    assert!(loc.starts_with(&format!("https://{APP}{PREFIX}/login?")), "Location {loc}");
    assert_eq!(query_param(&loc, "rd").as_deref(), Some("/docs/a?b=1&c=2"), "rd in {loc}");
    assert!(r.header("remote-user").is_none());
    // Spoofed identity in the verify request doesn't help.
    let mut h = fwd("/docs/a", APP);
    h.extend([("remote-user", "alice"), ("remote-groups", "admins"), ("x-forwarded-user", "alice")]);
    let r = proxy.send("GET", &verify, &h, None).await;
    assert_eq!(r.status, 302, "verify with spoofed identity headers, no session");
    assert!(r.header("remote-user").is_none());

    // With the session cookie: 200 and the identity in the response headers.
    let mut proxy = proxy.with_session(&session);
    let mut h = fwd("/docs/a?b=1", APP);
    h.push(("remote-user", "mallory"));
    let r = proxy.send("GET", &verify, &h, None).await;
    assert_eq!(r.status, 200, "verify with a session: {}", r.text());
    assert_eq!(r.header("remote-user").as_deref(), Some("alice"));
    assert_eq!(r.header("remote-email").as_deref(), Some("alice@example.com"));
    assert_eq!(r.header("remote-name").as_deref(), Some("Alice Liddell"));
    let groups: BTreeSet<String> =
        r.header("remote-groups").unwrap_or_default().split(',').map(|s| s.trim().to_string()).collect();
    assert_eq!(groups, ["ops", "staff"].iter().map(|s| s.to_string()).collect(), "Remote-Groups");

    // Deny path: 403 with or without the session; bypass: 200 without identity; unknown host: 403.
    let r = proxy.send("GET", &verify, &fwd("/private/x", APP), None).await;
    assert_eq!(r.status, 403, "deny path with a session");
    assert!(r.header("remote-user").is_none());
    let mut anon = Client::new(gw.addr, "portcullis.internal");
    let r = anon.send("GET", &verify, &fwd("/private/x", APP), None).await;
    assert_eq!(r.status, 403, "deny path without a session");
    let r = anon.send("GET", &verify, &fwd("/public/x", APP), None).await;
    assert_eq!(r.status, 200, "bypass path without a session");
    let r = proxy.send("GET", &verify, &fwd("/public/x", APP), None).await;
    assert_eq!(r.status, 200, "bypass path with a session");
    assert!(r.header("remote-user").is_none(), "bypass answered with identity headers");
    let r = proxy.send("GET", &verify, &fwd("/docs", "unknown.test"), None).await;
    assert_eq!(r.status, 403, "unknown host");
    let r = proxy.send("GET", &verify, &fwd("/docs/%2e%2e/%2e%2e/etc", APP), None).await;
    assert_eq!(r.status, 403, "escaping path");

    // nginx style for comparison: 401 when not signed in, 200 with the session.
    let r = anon
        .send("GET", &verify, &[("x-original-url", "https://app.test/docs/a"), ("x-original-method", "GET")], None)
        .await;
    assert_eq!(r.status, 401, "nginx-style verify without a session");
    let r = proxy
        .send("GET", &verify, &[("x-original-url", "https://app.test/docs/a"), ("x-original-method", "GET")], None)
        .await;
    assert_eq!(r.status, 200, "nginx-style verify with a session");
    assert_eq!(r.header("remote-user").as_deref(), Some("alice"));

    // The gateway never proxied anything for these.
    assert_eq!(up.hit_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_from_untrusted_peer_are_ignored() {
    // required = false and a one_factor app: a password session is enough, so the checks stay short.
    let cfg = |trusted: &str, up: &Upstream| {
        format!(
            "[server]\ntrusted_proxies = {trusted}\n\n[two_factor]\nrequired = false\n\n\
             [limits]\nmax_failures = 100\nmax_failures_per_address = 3\n\n{}",
            app(APP, &up.url(), "one_factor")
        )
    };
    let up = start_upstream().await;
    let env = Env::new(&cfg("[]", &up));
    env.add_user("alice", "alice@example.com", "Alice Liddell", &["staff"], PW).await;
    let gw = env.start().await;
    let mut alice = gw.client(APP);
    alice.login_ok("alice", PW).await;
    assert_eq!(alice.get("/x").await.status, 200, "control: the session works");

    // /verify from a peer that is not a trusted proxy: 403, even with a valid session.
    let caddy: &[(&str, &str)] = &[
        ("x-forwarded-method", "GET"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", APP),
        ("x-forwarded-uri", "/x"),
    ];
    let nginx: &[(&str, &str)] = &[("x-original-url", "http://app.test/x"), ("x-original-method", "GET")];
    for h in [caddy, nginx] {
        let r = alice.send("GET", &format!("{PREFIX}/verify"), h, None).await;
        assert_eq!(r.status, 403, "verify from an untrusted peer with a session ({h:?})");
        assert!(r.header("remote-user").is_none());
        let mut anon = gw.client(APP);
        let r = anon.send("GET", &format!("{PREFIX}/verify"), h, None).await;
        assert_eq!(r.status, 403, "verify from an untrusted peer without a session ({h:?})");
    }

    // X-Forwarded-Proto: https from an untrusted peer does not make the session cookie Secure (secure = auto).
    let mut b = gw.client(APP);
    let r = post_login_with(&mut b, "alice", PW, &[("x-forwarded-proto", "https")]).await;
    assert_eq!(r.status, 303);
    let sc = r.set_cookies().into_iter().find(|c| c.starts_with(&format!("{SESSION}="))).unwrap();
    assert!(!sc.to_ascii_lowercase().contains("secure"), "untrusted X-Forwarded-Proto made the cookie Secure: {sc}");

    // The proxied request's X-Forwarded-For is the real peer, not the client's claim.
    let r = alice.send("GET", "/x", &[("x-forwarded-for", "203.0.113.99")], None).await;
    let xff = r.upstream_header("x-forwarded-for").unwrap_or_default().join(",");
    assert!(xff.trim().ends_with("127.0.0.1"), "upstream X-Forwarded-For {xff:?}");

    // X-Forwarded-For rotation: every failure still counts against 127.0.0.1, so the per-address lockout hits.
    let mut b = gw.client(APP);
    for i in 1..=3 {
        let ip = format!("203.0.113.{i}");
        let r = post_login_with(&mut b, "alice", WRONG_PW, &[("x-forwarded-for", &ip)]).await;
        let want = if i < 3 { 401 } else { 429 };
        assert_eq!(r.status, want, "failure {i} with X-Forwarded-For {ip} from an untrusted peer: {}", r.text());
    }
    let r = post_login_with(&mut b, "alice", PW, &[("x-forwarded-for", "203.0.113.50")]).await;
    assert_eq!(r.status, 429, "the right password from a locked address with a fresh X-Forwarded-For");
    assert!(r.header("retry-after").is_some());
    let u = show_user(&env, "alice").await;
    let failed: Vec<&serde_json::Value> =
        u["recent_events"].as_array().unwrap().iter().filter(|e| e["kind"] == "login_failed").collect();
    assert_eq!(failed.len(), 3, "{u}");
    for e in &failed {
        assert_eq!(e["address"], "127.0.0.1", "audit address taken from an untrusted X-Forwarded-For: {e}");
    }
    gw.stop().await;

    // Control: the same rotation from a trusted proxy is believed (so the check above can fail).
    let up2 = start_upstream().await;
    let env2 = Env::new(&cfg("[\"127.0.0.1/32\"]", &up2));
    env2.add_user("alice", "alice@example.com", "Alice Liddell", &["staff"], PW).await;
    let gw2 = env2.start().await;
    let mut b = gw2.client(APP);
    for i in 1..=3 {
        let ip = format!("203.0.113.{i}");
        let r = post_login_with(&mut b, "alice", WRONG_PW, &[("x-forwarded-for", &ip)]).await;
        assert_eq!(r.status, 401, "trusted proxy, failure {i} from {ip}");
    }
    let r = post_login_with(&mut b, "alice", PW, &[("x-forwarded-for", "203.0.113.50")]).await;
    assert_eq!(r.status, 303, "trusted proxy: a different client address is not locked");
    let u = show_user(&env2, "alice").await;
    let addrs: BTreeSet<String> = u["recent_events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "login_failed")
        .map(|e| e["address"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        addrs,
        ["203.0.113.1", "203.0.113.2", "203.0.113.3"].iter().map(|s| s.to_string()).collect(),
        "trusted X-Forwarded-For in the audit log"
    );
}

// ---------------------------------------------------------------------------------------------
// Audit log and log hygiene
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_events_for_each_kind_and_no_secrets_in_logs() {
    let up = start_upstream().await;
    let env = Env::new(&format!(
        "[server]\nlisten = \"{{LISTEN}}\"\n\n[limits]\nmax_failures = 3\n\n[log]\nformat = \"json\"\nlevel = \"info\"\n\n{}",
        app(APP, &up.url(), "two_factor")
    ));
    env.add_user("alice", "alice@example.com", "Alice Liddell", &["staff"], PW).await;
    let mut gw = env.spawn_child_with(&[], "serve.log", Duration::from_secs(60)).await;
    let mut cli_logs = String::new();
    let mut cookies: Vec<String> = Vec::new();
    let mut codes_typed: Vec<String> = Vec::new();

    // Checks that each of `kinds` is among alice's recent events now.
    async fn expect(env: &Env, kinds: &[&str], step: &str) {
        let u = show_user(env, "alice").await;
        let got = event_kinds(&u);
        for k in kinds {
            assert!(got.iter().any(|g| g == k), "after {step}: no {k} event in user show --json: {got:?}");
        }
        for e in u["recent_events"].as_array().unwrap() {
            assert_eq!(e["user"], "alice");
            assert!(e["at"].as_u64().is_some_and(|at| at + 600 > now_unix() && at <= now_unix() + 5), "event time {e}");
        }
    }

    let mut c = gw.client(APP);
    // login_failed
    let r = c.login("alice", WRONG_PW, "/").await;
    assert_eq!(r.status, 401);
    expect(&env, &["login_failed"], "a wrong password").await;
    // login_succeeded + two_factor_enabled
    let r = c.login("alice", PW, "/").await;
    assert_eq!(r.status, 303);
    cookies.extend(c.session_cookie());
    let e = finish_forced_enrolment(&mut c, &r.location(), now_unix).await;
    cookies.extend(c.session_cookie());
    codes_typed.push(e.code.clone());
    expect(&env, &["login_succeeded", "two_factor_enabled"], "enrolment").await;
    // logout
    logout(&mut c).await;
    expect(&env, &["logout"], "logout").await;

    // second_factor_failed, then second_factor_succeeded with the next step's code.
    let r = c.login("alice", PW, "/").await;
    assert!(r.location().contains("/challenge"), "{}", r.location());
    cookies.extend(c.session_cookie());
    let page = c.browse(&r.location()).await;
    let csrf = csrf_of(&page);
    let bad = wrong_code_around(&e.secret, now_unix(), 3);
    codes_typed.push(bad.clone());
    let challenge = format!("{PREFIX}/challenge");
    let r = c.post_form(&challenge, &[("csrf", &csrf), ("rd", "/"), ("method", "totp"), ("code", &bad)]).await;
    assert_eq!(r.status, 401, "wrong TOTP code: {}", r.text());
    expect(&env, &["second_factor_failed"], "a wrong code").await;
    let good = totp_code(&e.secret, now_unix() + 30);
    codes_typed.push(good.clone());
    let r = c.post_form(&challenge, &[("csrf", &csrf), ("rd", "/"), ("method", "totp"), ("code", &good)]).await;
    assert_eq!(r.status, 303, "right TOTP code: {}", r.text());
    cookies.extend(c.session_cookie());
    expect(&env, &["second_factor_succeeded"], "a right code").await;
    logout(&mut c).await;

    // replay_rejected: the same code again in a new session; then recovery_code_used.
    let r = c.login("alice", PW, "/").await;
    cookies.extend(c.session_cookie());
    let page = c.browse(&r.location()).await;
    let csrf = csrf_of(&page);
    let r = c.post_form(&challenge, &[("csrf", &csrf), ("rd", "/"), ("method", "totp"), ("code", &good)]).await;
    assert_eq!(r.status, 401, "replayed code: {}", r.text());
    expect(&env, &["replay_rejected"], "a replayed code").await;
    let r = c
        .post_form(&challenge, &[("csrf", &csrf), ("rd", "/"), ("method", "recovery"), ("recovery_code", &e.codes[0])])
        .await;
    assert_eq!(r.status, 303, "recovery code: {}", r.text());
    cookies.extend(c.session_cookie());
    expect(&env, &["recovery_code_used"], "a recovery code").await;

    // recovery_codes_regenerated, two_factor_disabled, logout.
    let r = confirm_password(&mut c, "/settings/recovery/regenerate", PW).await;
    assert_eq!(r.status, 200, "regenerate: {}", r.text());
    let new_codes = shown_codes(&r.text());
    assert!(!new_codes.is_empty(), "no new codes shown: {}", r.text());
    expect(&env, &["recovery_codes_regenerated"], "regenerating codes").await;
    let r = confirm_password(&mut c, "/settings/disable", PW).await;
    assert_eq!(r.status, 303, "disable: {}", r.text());
    expect(&env, &["two_factor_disabled"], "disabling 2FA").await;
    cookies.extend(c.session_cookie());
    logout(&mut c).await;

    // account_locked / account_unlocked from the CLI while serving, by "cli".
    for cmd in ["lock", "unlock"] {
        let o = env.cli(&["user", cmd, "alice"], None).await;
        assert!(o.status.success(), "user {cmd}: {}", out_text(&o));
        cli_logs.push_str(&out_text(&o));
    }
    let u = show_user(&env, "alice").await;
    for kind in ["account_locked", "account_unlocked"] {
        let by_cli = u["recent_events"].as_array().unwrap().iter().any(|e| e["kind"] == kind && e["actor"] == "cli");
        assert!(by_cli, "CLI {kind} not audited with actor cli: {u}");
    }

    // lockout, then locked_out for the right password.
    for i in 1..=3 {
        let r = c.login("alice", WRONG_PW, "/").await;
        let want = if i < 3 { 401 } else { 429 };
        assert_eq!(r.status, want, "wrong password {i} of 3");
    }
    expect(&env, &["lockout"], "max_failures wrong passwords").await;
    let r = c.login("alice", PW, "/").await;
    assert_eq!(r.status, 429, "right password while locked out");
    expect(&env, &["locked_out"], "a login while locked out").await;

    // Every event kind of the contract (the operator kinds are covered per caller by the accounts tests).
    let all_kinds = [
        "login_succeeded",
        "login_failed",
        "locked_out",
        "lockout",
        "second_factor_succeeded",
        "second_factor_failed",
        "replay_rejected",
        "recovery_code_used",
        "two_factor_enabled",
        "two_factor_disabled",
        "recovery_codes_regenerated",
        "logout",
        "account_locked",
        "account_unlocked",
    ];
    // Text `user show` lists events too.
    let o = env.cli(&["user", "show", "alice"], None).await;
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(text.contains("locked_out") && text.contains("lockout"), "text user show lacks events: {text}");
    cli_logs.push_str(&out_text(&o));

    // The JSON log: one JSON object per line, one audit line per server-side event kind.
    gw.assert_running();
    let log = gw.log();
    let mut logged: BTreeSet<String> = BTreeSet::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        if v["target"] == "audit" {
            let f = &v["fields"];
            let ev = f["event"].as_str().or_else(|| v["event"].as_str()).unwrap_or("");
            logged.insert(ev.to_string());
        }
    }
    for k in all_kinds.iter().filter(|k| !k.starts_with("account_")) {
        assert!(logged.contains(*k), "no audit log line with event={k}; logged: {logged:?}\nlog:\n{log}");
    }

    // No secret anywhere in the captured logs (server stderr + CLI output).
    let captured = format!("{log}\n{cli_logs}");
    let mut secrets: Vec<(String, &str)> = vec![
        (PW.to_string(), "the password"),
        (WRONG_PW.to_string(), "a wrong password typed"),
        (e.secret.clone(), "the TOTP secret"),
        (e.secret.to_lowercase(), "the TOTP secret (lower case)"),
        (e.secret[..16].to_string(), "part of the TOTP secret"),
    ];
    for code in e.codes.iter().chain(new_codes.iter()) {
        secrets.push((code.clone(), "a recovery code"));
        secrets.push((code.replace('-', ""), "a recovery code without dashes"));
    }
    for ck in &cookies {
        secrets.push((ck.clone(), "a session cookie value"));
    }
    for (s, what) in &secrets {
        assert!(!captured.contains(s.as_str()), "the captured log contains {what}: {s}\n{captured}");
    }
    // TOTP codes: as a standalone 6-digit token (not part of a longer number or a timestamp's fraction).
    for code in &codes_typed {
        for (i, _) in captured.match_indices(code.as_str()) {
            let before = captured[..i].chars().last();
            let after = captured[i + code.len()..].chars().next();
            let standalone =
                !before.is_some_and(|c| c.is_ascii_digit() || c == '.') && !after.is_some_and(|c| c.is_ascii_digit());
            assert!(
                !standalone,
                "the captured log contains the TOTP code {code}: ...{}...",
                &captured[i.saturating_sub(80)..(i + 86).min(captured.len())]
            );
        }
    }
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_reports_traffic() {
    let up = start_upstream().await;
    let maddr = free_addr();
    let token = "metrics-T0ken-abc";
    let env = Env::new(&format!(
        "[metrics]\nlisten = \"{maddr}\"\ntoken = \"{token}\"\n\n[two_factor]\nrequired = false\n\n{}  [[app.rule]]\n  path = \"/private/\"\n  policy = \"deny\"\n\n",
        app(APP, &up.url(), "one_factor")
    ));
    env.add_user("alice", "alice@example.com", "Alice Liddell", &["staff"], PW).await;
    let gw = env.start().await;

    let r = scrape(maddr, None).await;
    assert_eq!(r.status, 401, "metrics without the token: {}", r.text());
    assert!(!r.text().contains("portcullis_"), "metrics leaked without the token");
    let r = scrape(maddr, Some("Bearer wrong-token")).await;
    assert_eq!(r.status, 401, "metrics with a wrong token");
    let r = scrape(maddr, Some(token)).await;
    assert_eq!(r.status, 401, "metrics with the token but without 'Bearer '");

    // Traffic: one failed and one good login, proxied requests, a deny, an unauthenticated request.
    let mut c = gw.client(APP);
    assert_eq!(c.login("alice", WRONG_PW, "/").await.status, 401);
    c.login_ok("alice", PW).await;
    for _ in 0..3 {
        assert_eq!(c.get("/page").await.status, 200);
    }
    assert_eq!(c.get("/private/x").await.status, 403);
    let mut anon = gw.client(APP);
    assert_eq!(anon.get("/page").await.status, 401);

    let auth = format!("Bearer {token}");
    let r = scrape(maddr, Some(&auth)).await;
    assert_eq!(r.status, 200, "metrics with the token: {}", r.text());
    let m = r.text();
    let get = |name: &str, labels: &[(&str, &str)]| {
        sample(&m, name, labels).unwrap_or_else(|| panic!("no {name}{labels:?} in metrics:\n{m}"))
    };
    assert!(get("portcullis_requests_total", &[("app", APP), ("status", "200")]) >= 3.0);
    assert!(get("portcullis_requests_total", &[("app", APP), ("status", "403")]) >= 1.0);
    assert!(get("portcullis_requests_total", &[("app", APP), ("status", "401")]) >= 1.0);
    assert_eq!(get("portcullis_logins_total", &[("outcome", "success")]), 1.0);
    assert_eq!(get("portcullis_logins_total", &[("outcome", "failure")]), 1.0);
    assert!(get("portcullis_active_sessions", &[]) >= 1.0, "active sessions after a login");
    assert_eq!(get("portcullis_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    assert!(get("portcullis_upstream_response_seconds_count", &[("app", APP)]) >= 3.0);
    assert!(m.contains("portcullis_upstream_response_seconds_bucket{"), "no histogram buckets:\n{m}");

    // Counters move with traffic.
    let before = get("portcullis_requests_total", &[("app", APP), ("status", "200")]);
    assert_eq!(c.get("/page").await.status, 200);
    let m2 = scrape(maddr, Some(&auth)).await.text();
    let after = sample(&m2, "portcullis_requests_total", &[("app", APP), ("status", "200")]).unwrap();
    assert_eq!(after, before + 1.0, "requests_total did not count one more request");
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Operator conventions
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_override_and_secret_file() {
    let up = start_upstream().await;
    let config = |maddr: SocketAddr| {
        format!(
            "[server]\nlisten = \"{{LISTEN}}\"\n\n[metrics]\nlisten = \"{maddr}\"\ntoken_file = \"{{DIR}}/metrics.token\"\n\n{}",
            app(APP, &up.url(), "bypass")
        )
    };
    let token = "t0ken-from-a-file";

    // Without overrides: the app passes, the metrics token comes from the file.
    let m1 = free_addr();
    let env = Env::new(&config(m1));
    std::fs::write(env.path().join("metrics.token"), format!("{token}\n")).unwrap();
    env.add_user("alice", "alice@example.com", "Alice Liddell", &[], PW).await;
    let s = env.spawn_child_with(&[], "serve.log", Duration::from_secs(60)).await;
    let mut c = s.client(APP);
    assert_eq!(c.get("/x").await.status, 200, "bypass app without overrides");
    assert_eq!(scrape(m1, None).await.status, 401, "metrics without a token (token_file set)");
    let r = scrape(m1, Some(&format!("Bearer {token}"))).await;
    assert_eq!(r.status, 200, "metrics with the token from token_file (trailing newline dropped)");
    assert!(r.text().contains("portcullis_build_info"));
    s.stop().await;

    // PORTCULLIS_APP__0__POLICY=deny turns the same file's app into a deny.
    let m2 = free_addr();
    let env2 = Env::new(&config(m2));
    std::fs::write(env2.path().join("metrics.token"), format!("{token}\n")).unwrap();
    let s = env2.spawn_child_with(&[("PORTCULLIS_APP__0__POLICY", "deny")], "serve.log", Duration::from_secs(60)).await;
    let mut c = s.client(APP);
    let r = c.get("/x").await;
    assert_eq!(r.status, 403, "PORTCULLIS_APP__0__POLICY=deny: {}", r.text());
    s.stop().await;

    // check-config sees overrides too.
    let cfg = &env.config_path;
    let ok = cli_env(cfg, &["check-config"], &[]).await;
    assert!(ok.status.success(), "check-config of the plain file: {}", out_text(&ok));
    let o = cli_env(cfg, &["check-config"], &[("PORTCULLIS_LIMITS__MAX_FAILURES", "0")]).await;
    assert!(!o.status.success(), "check-config accepted max_failures = 0 from the environment: {}", out_text(&o));
    let o = cli_env(cfg, &["check-config"], &[("PORTCULLIS_SESSION__NO_SUCH_KEY", "1")]).await;
    assert!(!o.status.success(), "check-config accepted an unknown key from the environment");
    let err = String::from_utf8_lossy(&o.stderr).to_ascii_lowercase();
    assert!(err.contains("no_such_key"), "the error does not name the bad variable/key: {}", out_text(&o));

    // token (from the environment) + token_file (in the file): "not both".
    let o = cli_env(cfg, &["check-config"], &[("PORTCULLIS_METRICS__TOKEN", "abc")]).await;
    assert!(!o.status.success(), "token + token_file accepted: {}", out_text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not both"), "{}", out_text(&o));
    // ... and both in the file.
    let text = std::fs::read_to_string(cfg).unwrap().replace("[metrics]\n", "[metrics]\ntoken = \"abc\"\n");
    let both = env.path().join("both.toml");
    std::fs::write(&both, text).unwrap();
    let o = cli_env(&both, &["check-config"], &[]).await;
    assert!(!o.status.success(), "token + token_file in one file accepted: {}", out_text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not both"), "{}", out_text(&o));
    // A token_file that doesn't exist is an error too.
    let o =
        cli_env(cfg, &["check-config"], &[("PORTCULLIS_METRICS__TOKEN_FILE", "/nonexistent/portcullis.token")]).await;
    assert!(!o.status.success(), "missing token_file accepted: {}", out_text(&o));

    // `user` commands read the environment as well: another storage path shows other users.
    let o = cli_env(cfg, &["user", "list", "--json"], &[]).await;
    assert!(o.status.success(), "{}", out_text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("alice"));
    // (on the PostgreSQL backend, another database URL)
    let other = env.path().join("other.redb");
    let (var, other) = match env.db_url {
        Some(_) => ("PORTCULLIS_STORAGE__URL", pg_fresh_url()),
        None => ("PORTCULLIS_STORAGE__PATH", other.to_str().unwrap().to_string()),
    };
    let o = cli_env(cfg, &["user", "list", "--json"], &[(var, other.as_str())]).await;
    assert!(o.status.success(), "{}", out_text(&o));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("alice"), "user list ignored {var}: {}", out_text(&o));

    // --version
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis")).arg("--version").output().unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains(env!("CARGO_PKG_VERSION")), "{}", out_text(&o));
}

/// A one_factor app on the slow upstream with a `/public/` rule of the given policy.
fn reload_config(slow: &SlowUpstream, public_policy: &str) -> String {
    format!(
        "[server]\nlisten = \"{{LISTEN}}\"\n\n[[app]]\nhost = \"{APP}\"\nupstream = \"{}\"\npolicy = \"one_factor\"\n\
         upstream_timeout = \"60s\"\n\n  [[app.rule]]\n  path = \"/public/\"\n  policy = \"{public_policy}\"\n",
        slow.url()
    )
}

/// Rewrites the config file (the text of `Env::new`: storage + `rest`, with {DIR}/{LISTEN} filled in).
fn rewrite_config(env: &Env, rest: &str) {
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    let storage_end = text.find("\n\n").expect("storage section") + 2;
    let rest = rest.replace("{DIR}", env.path().to_str().unwrap()).replace("{LISTEN}", &env.listen.to_string());
    // Write to a temp file and rename, as an editor or config manager would.
    let tmp = env.path().join("portcullis.toml.new");
    std::fs::write(&tmp, format!("{}{}", &text[..storage_end], rest)).unwrap();
    std::fs::rename(&tmp, &env.config_path).unwrap();
}

async fn status_of(addr: SocketAddr, path: &str) -> u16 {
    let mut c = Client::new(addr, APP);
    c.get(path).await.status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reload_changes_a_rule_while_a_long_request_completes() {
    let slow = start_slow_upstream().await;
    let env = Env::new(&reload_config(&slow, "bypass"));
    let mut s = env.spawn_child_with(&[], "serve.log", Duration::from_secs(60)).await;
    assert_eq!(status_of(s.addr, "/public/hello").await, 200, "bypass rule before the reload");
    assert_eq!(status_of(s.addr, "/other").await, 401, "one_factor app without a session");

    // A long request under the old rules.
    let addr = s.addr;
    let long = tokio::spawn(async move {
        let mut c = Client::new(addr, APP);
        c.send("GET", "/public/slow", &[], None).await
    });
    within("the slow request reaching the upstream", slow.arrived.notified()).await;

    rewrite_config(&env, &reload_config(&slow, "deny"));
    s.hup();
    let a = s.addr;
    eventually("the reloaded deny rule takes effect", 20, || async move { status_of(a, "/public/hello").await == 403 })
        .await;
    assert!(!long.is_finished(), "the in-flight request ended before it was released");
    assert_eq!(status_of(s.addr, "/other").await, 401, "the rest of the app after the reload");
    s.assert_running();

    slow.release.notify_one();
    let r = within("the in-flight request to complete", long).await.expect("slow request task");
    assert_eq!(r.status, 200, "the in-flight request across the reload: {}", r.text());
    assert_eq!(r.text(), "slow done");
    assert!(s.log().contains("reloaded"), "no reload message in the log:\n{}", s.log());
    assert!(!s.log().contains("reload failed"), "{}", s.log());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_reload_keeps_serving() {
    let slow = start_slow_upstream().await;
    let env = Env::new(&reload_config(&slow, "bypass"));
    let mut s = env.spawn_child_with(&[], "serve.log", Duration::from_secs(60)).await;
    assert_eq!(status_of(s.addr, "/public/hello").await, 200);

    // An invalid value, then a syntax error: each reload fails, the old rules keep serving.
    let broken =
        [reload_config(&slow, "sometimes"), reload_config(&slow, "deny").replace("[[app.rule]]", "[[app.rule]")];
    for (i, text) in broken.iter().enumerate() {
        rewrite_config(&env, text);
        s.hup();
        let want = i + 1;
        let lp = s.log_path.clone();
        eventually(&format!("\"reload failed\" number {want} in the log"), 20, || {
            let lp = lp.clone();
            async move { std::fs::read_to_string(&lp).unwrap_or_default().matches("reload failed").count() >= want }
        })
        .await;
        s.assert_running();
        assert_eq!(status_of(s.addr, "/public/hello").await, 200, "old bypass rule after bad reload {want}");
        assert_eq!(status_of(s.addr, "/other").await, 401, "old app policy after bad reload {want}");
        let mut c = s.client(APP);
        assert_eq!(c.get(&format!("{PREFIX}/health")).await.status, 200);
    }
    // It says why: the failure line names the file.
    let log = s.log();
    let line = log.lines().find(|l| l.contains("reload failed")).unwrap();
    assert!(line.contains("portcullis.toml"), "the reload failure does not say which file/where: {line}");

    // A good file afterwards still reloads.
    rewrite_config(&env, &reload_config(&slow, "deny"));
    s.hup();
    let a = s.addr;
    eventually("a good reload after bad ones", 20, || async move { status_of(a, "/public/hello").await == 403 }).await;
    s.stop().await;
}
