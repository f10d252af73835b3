//! Test harness: upstream test app, in-process and child-process gateway, CLI runner,
//! a tiny HTTP/1.1 client with a cookie jar, and a raw TCP sender.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{HeaderMap, Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis::clock::{Clock, ManualClock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

mod flows;
mod outbox;
mod pg_server;
pub use flows::*;
pub use outbox::*;
pub use pg_server::*;

pub const PREFIX: &str = "/_portcullis";
pub const SESSION: &str = "portcullis_session";
pub const CSRF: &str = "portcullis_session_csrf";
pub const PW: &str = "S3cret-passw0rd!";
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Await `f` with the standard timeout, panicking with `what` when it expires.
pub async fn within<F: Future>(what: &str, f: F) -> F::Output {
    within_for(TIMEOUT, what, f).await
}

pub async fn within_for<F: Future>(d: Duration, what: &str, f: F) -> F::Output {
    match tokio::time::timeout(d, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {d:?}: {what}"),
    }
}

pub fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

pub fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A port that was free a moment ago (bind to :0, read, drop).
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Upstream test app
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct Hit {
    pub method: String,
    /// raw request-target as received
    pub path: String,
    pub headers: BTreeMap<String, Vec<String>>,
}

impl Hit {
    pub fn header(&self, name: &str) -> Option<Vec<String>> {
        self.headers.get(&name.to_ascii_lowercase()).cloned()
    }
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub hits: Arc<Mutex<Vec<Hit>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }
    pub fn hit_count(&self) -> usize {
        self.hits.lock().unwrap().len()
    }
    pub fn last_hit(&self) -> Hit {
        self.hits.lock().unwrap().last().cloned().expect("upstream received no request")
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type UpBody = UnsyncBoxBody<Bytes, std::io::Error>;

fn full_body(s: impl Into<Bytes>) -> UpBody {
    Full::new(s.into()).map_err(|never: Infallible| match never {}).boxed_unsync()
}

fn up_resp(status: u16, ct: &str, body: impl Into<Bytes>) -> Response<UpBody> {
    Response::builder().status(status).header("content-type", ct).body(full_body(body)).unwrap()
}

pub async fn start_upstream() -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits: Arc<Mutex<Vec<Hit>>> = Arc::new(Mutex::new(Vec::new()));
    let h = hits.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let hits = h.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| upstream_handle(req, hits.clone()));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Upstream { addr, hits, task }
}

/// The echo upstream of [`start_upstream`] over TLS (http/1.1), with a self-signed certificate for `localhost`:
/// the upstream, its certificate's PEM (for an app's `ca_file`), and a count of the TCP connections it accepted.
pub async fn start_tls_upstream() -> (Upstream, String, Arc<std::sync::atomic::AtomicUsize>) {
    let (acceptor, pem) = localhost_tls();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits: Arc<Mutex<Vec<Hit>>> = Arc::new(Mutex::new(Vec::new()));
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (h, n) = (hits.clone(), accepted.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (hits, acceptor) = (h.clone(), acceptor.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let svc = hyper::service::service_fn(move |req| upstream_handle(req, hits.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    (Upstream { addr, hits, task }, pem, accepted)
}

/// A TLS acceptor (http/1.1) with a fresh self-signed certificate for `localhost`, and that certificate's PEM (for
/// an app's `ca_file`).
pub fn localhost_tls() -> (tokio_rustls::TlsAcceptor, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![ck.cert.der().clone()], key)
        .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    (tokio_rustls::TlsAcceptor::from(Arc::new(cfg)), ck.cert.pem())
}

async fn upstream_handle(req: Request<Incoming>, hits: Arc<Mutex<Vec<Hit>>>) -> Result<Response<UpBody>, Infallible> {
    let method = req.method().to_string();
    let path = req.uri().to_string();
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in req.headers() {
        headers
            .entry(k.as_str().to_ascii_lowercase())
            .or_default()
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    let hit = Hit { method: method.clone(), path: path.clone(), headers: headers.clone() };
    hits.lock().unwrap().push(hit);

    let p = req.uri().path().to_string();
    let resp = match p.as_str() {
        "/upload" => {
            let mut n: u64 = 0;
            let mut body = req.into_body();
            while let Some(fr) = body.frame().await {
                match fr {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            n += d.len() as u64;
                        }
                    }
                    Err(e) => return Ok(up_resp(500, "text/plain", format!("body error: {e}"))),
                }
            }
            up_resp(200, "text/plain", n.to_string())
        }
        // The body's length and SHA-256, to check it arrived byte for byte.
        "/digest" => match req.into_body().collect().await {
            Ok(b) => {
                use sha2::Digest;
                let b = b.to_bytes();
                up_resp(200, "text/plain", format!("{} {}", b.len(), hex::encode(sha2::Sha256::digest(&b))))
            }
            Err(e) => up_resp(500, "text/plain", format!("body error: {e}")),
        },
        "/download" => {
            let q = req.uri().query().unwrap_or("");
            let pairs: Vec<(String, String)> = serde_urlencoded::from_str(q).unwrap_or_default();
            let n: u64 = pairs.iter().find(|(k, _)| k == "bytes").and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
            let chunk = Bytes::from(vec![b'x'; 65536]);
            let stream = futures_util::stream::unfold(n, move |left| {
                let chunk = chunk.clone();
                async move {
                    if left == 0 {
                        None
                    } else {
                        let k = left.min(65536);
                        Some((Ok::<_, std::io::Error>(Frame::data(chunk.slice(0..k as usize))), left - k))
                    }
                }
            });
            Response::builder()
                .status(200)
                .header("content-type", "application/octet-stream")
                .body(StreamBody::new(stream).boxed_unsync())
                .unwrap()
        }
        // Answers after `ms` milliseconds (a slow request that does finish).
        "/sleep" => {
            let q = req.uri().query().unwrap_or("");
            let pairs: Vec<(String, String)> = serde_urlencoded::from_str(q).unwrap_or_default();
            let ms: u64 = pairs.iter().find(|(k, _)| k == "ms").and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            up_resp(200, "text/plain", format!("slept {ms} ms"))
        }
        "/hang" => {
            futures_util::future::pending::<()>().await;
            unreachable!()
        }
        "/ws" => ws_upgrade(req),
        // An app that tries to set the gateway's cookies (and one of its own).
        "/set-cookie" => Response::builder()
            .status(200)
            .header("content-type", "text/plain")
            .header("set-cookie", format!("{SESSION}=from-the-app; Path=/"))
            .header("set-cookie", format!("{CSRF}=from-the-app; Path=/"))
            .header("set-cookie", "app_pref=1; Path=/")
            .body(full_body("cookies set"))
            .unwrap(),
        _ => {
            let j = serde_json::json!({ "method": method, "path": path, "headers": headers });
            up_resp(200, "application/json", j.to_string())
        }
    };
    Ok(resp)
}

/// WebSocket echo. The first message sent by the server is the `remote-user` header it
/// received on the upgrade request (or "-" when absent).
fn ws_upgrade(mut req: Request<Incoming>) -> Response<UpBody> {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return up_resp(400, "text/plain", "not a websocket request");
    };
    let user = req
        .headers()
        .get("remote-user")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_else(|| "-".to_string());
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let on = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(up) = on.await {
            let mut ws =
                tokio_tungstenite::WebSocketStream::from_raw_socket(TokioIo::new(up), Role::Server, None).await;
            if ws.send(Message::text(user)).await.is_err() {
                return;
            }
            while let Some(Ok(m)) = ws.next().await {
                if m.is_close() {
                    break;
                }
                if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                    break;
                }
            }
        }
    });
    Response::builder()
        .status(101)
        .header("upgrade", "websocket")
        .header("connection", "Upgrade")
        .header("sec-websocket-accept", accept)
        .body(full_body(Bytes::new()))
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Config / environment
// ---------------------------------------------------------------------------------------------

pub fn app(host: &str, upstream: &str, policy: &str) -> String {
    format!("[[app]]\nhost = \"{host}\"\nupstream = \"{upstream}\"\npolicy = \"{policy}\"\n\n")
}

/// A temp directory with a config file. `rest` is appended after the `[storage]` section;
/// `{DIR}` is replaced by the temp dir, `{LISTEN}` by a free 127.0.0.1 port.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub clock: Arc<ManualClock>,
    pub listen: SocketAddr,
    /// With `PORTCULLIS_TEST_BACKEND=postgres`: the URL of this environment's own database on the shared
    /// throwaway server (the config then says `backend = "postgres"`); `None` on redb.
    pub db_url: Option<String>,
}

impl Env {
    pub fn new(rest: &str) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let listen = free_addr();
        let d = dir.path();
        let rest = rest.replace("{DIR}", d.to_str().unwrap()).replace("{LISTEN}", &listen.to_string());
        let db_url = pg_backend().then(pg_fresh_url);
        let pg_lines = match &db_url {
            Some(url) => format!("backend = \"postgres\"\nurl = \"{url}\"\n"),
            None => String::new(),
        };
        let text = format!(
            "[storage]\n{pg_lines}path = \"{}\"\nsecret_key_file = \"{}\"\n\n{}",
            d.join("portcullis.redb").display(),
            d.join("secret.key").display(),
            rest
        );
        let config_path = d.join("portcullis.toml");
        std::fs::write(&config_path, text).unwrap();
        Env { dir, config_path, clock: Arc::new(ManualClock::new(now_unix())), listen, db_url }
    }

    /// The stored bytes to grep for secrets: the redb file, or on PostgreSQL a `pg_dump` of the database
    /// (with bytea values decoded).
    pub fn store_bytes(&self) -> Vec<u8> {
        match &self.db_url {
            Some(url) => pg_shared().dump_bytes(url.rsplit('/').next().unwrap()),
            None => std::fs::read(self.path().join("portcullis.redb")).expect("read the redb file"),
        }
    }

    /// [`Env::new`] with `[two_factor] required = false`: logins without 2FA get a plain
    /// password-level session (what the issue-2 tests exercise with `one_factor` apps).
    pub fn password_only(rest: &str) -> Env {
        Env::new(&format!("[two_factor]\nrequired = false\n\n{rest}"))
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Run the CLI with `args` followed by `-c CONFIG`.
    pub async fn cli(&self, args: &[&str], stdin: Option<&str>) -> std::process::Output {
        run_cli(args, &self.config_path, stdin).await
    }

    pub async fn add_user(&self, name: &str, email: &str, full_name: &str, groups: &[&str], password: &str) {
        let groups = groups.join(",");
        let mut args = vec!["user", "add", name, "--email", email, "--name", full_name];
        if !groups.is_empty() {
            args.push("--groups");
            args.push(&groups);
        }
        args.push("--password-stdin");
        let out = self.cli(&args, Some(password)).await;
        assert!(
            out.status.success(),
            "user add {name} failed: {:?}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Start the gateway in-process and wait until /health answers.
    pub async fn start(&self) -> Gateway {
        let gw = self.start_unchecked().await;
        gw.wait_healthy().await;
        gw
    }

    /// Start the gateway in-process without probing it (e.g. TLS listeners).
    pub async fn start_unchecked(&self) -> Gateway {
        let config =
            portcullis::config::Config::load(&self.config_path).unwrap_or_else(|e| panic!("Config::load failed: {e}"));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let clock: Arc<dyn Clock> = self.clock.clone();
        let task = tokio::spawn(portcullis::run_with_clock(listener, config, clock, async move {
            let _ = rx.await;
        }));
        Gateway { addr, clock: self.clock.clone(), shutdown: Some(tx), task: Some(task) }
    }

    /// Start `portcullis serve -c CONFIG` as a child process (config must set listen = "{LISTEN}").
    pub async fn spawn_child(&self) -> ChildGateway {
        self.spawn_child_with(&[], "serve.log", Duration::from_secs(90)).await
    }

    /// `portcullis serve -c CONFIG` with `vars` in its environment, stdout+stderr captured to `log_name` in the
    /// temp dir; waits (at most `limit`) for /health to answer 200, panicking with the log if the child exits.
    pub async fn spawn_child_with(&self, vars: &[(&str, &str)], log_name: &str, limit: Duration) -> ChildGateway {
        let log_path = self.path().join(log_name);
        let log = std::fs::File::create(&log_path).unwrap();
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"));
        cmd.arg("serve")
            .arg("-c")
            .arg(&self.config_path)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true);
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn portcullis serve");
        let pid = child.id().unwrap();
        let mut cg = ChildGateway { child, addr: self.listen, pid, log_path };
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Ok(Some(st)) = cg.child.try_wait() {
                panic!("portcullis serve exited early ({st}); log:\n{}", cg.log());
            }
            let probe = tokio::time::timeout(Duration::from_secs(5), try_get(cg.addr, "/_portcullis/health")).await;
            if matches!(probe, Ok(Ok(ref r)) if r.status == 200) {
                return cg;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("portcullis serve not healthy within {limit:?}; log:\n{}", cg.log());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

pub async fn run_cli(args: &[&str], config: &Path, stdin: Option<&str>) -> std::process::Output {
    use std::process::Stdio;
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"));
    cmd.args(args)
        .arg("-c")
        .arg(config)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn portcullis cli");
    if let Some(s) = stdin {
        let mut si = child.stdin.take().unwrap();
        si.write_all(s.as_bytes()).await.unwrap();
        si.write_all(b"\n").await.unwrap();
        drop(si);
    }
    within_for(Duration::from_secs(60), &format!("portcullis {args:?}"), child.wait_with_output()).await.unwrap()
}

async fn try_get(addr: SocketAddr, path: &str) -> Result<Resp, String> {
    let mut c = Client::new(addr, "localhost");
    c.try_send("GET", path, &[], None).await
}

pub struct Gateway {
    pub addr: SocketAddr,
    pub clock: Arc<ManualClock>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), portcullis::Error>>>,
}

impl Gateway {
    pub fn client(&self, host: &str) -> Client {
        Client::new(self.addr, host)
    }

    pub async fn wait_healthy(&self) {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            if self.task.as_ref().unwrap().is_finished() {
                panic!("gateway task ended before becoming healthy");
            }
            let probe = tokio::time::timeout(Duration::from_secs(5), try_get(self.addr, "/_portcullis/health")).await;
            if matches!(probe, Ok(Ok(ref r)) if r.status == 200) {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("gateway not healthy within {TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Trigger shutdown and wait for `run` to return.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let task = self.task.take().unwrap();
        let res = within("gateway shutdown", task).await.expect("gateway task panicked");
        if let Err(e) = res {
            panic!("run_with_clock returned an error: {e}");
        }
    }

    pub fn is_running(&self) -> bool {
        self.task.as_ref().map(|t| !t.is_finished()).unwrap_or(false)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub struct ChildGateway {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
    pub pid: u32,
    pub log_path: PathBuf,
}

impl ChildGateway {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
    pub fn rss_kb(&self) -> u64 {
        rss_kb(self.pid)
    }
    pub fn client(&self, host: &str) -> Client {
        Client::new(self.addr, host)
    }
    /// `kill -HUP` (must succeed).
    pub fn hup(&self) {
        let st =
            std::process::Command::new("kill").args(["-HUP", &self.pid.to_string()]).status().expect("run kill -HUP");
        assert!(st.success(), "kill -HUP {} failed", self.pid);
    }
    /// Panics with the log if the child has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!("portcullis serve exited ({st}); log:\n{}", self.log());
        }
    }
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

pub fn rss_kb(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// The relay's counters (which proxy path served a request)
// ---------------------------------------------------------------------------------------------

/// A `[metrics]` section on a free port (no token), and that port.
pub fn metrics_section() -> (SocketAddr, String) {
    let addr = free_addr();
    (addr, format!("[metrics]\nlisten = \"{addr}\"\n\n"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub relayed: u64,
    pub handovers: u64,
}

impl std::ops::Sub for Counts {
    type Output = Counts;
    fn sub(self, o: Counts) -> Counts {
        Counts { relayed: self.relayed - o.relayed, handovers: self.handovers - o.handovers }
    }
}

/// The counters and gauges of one scrape of the metrics endpoint at `maddr`, by full name (`_total` included).
pub struct Scrape(String);

impl Scrape {
    pub async fn of(maddr: SocketAddr) -> Scrape {
        let r = Client::new(maddr, &maddr.to_string()).get("/metrics").await;
        assert_eq!(r.status, 200, "metrics: {}", r.text());
        Scrape(r.text())
    }

    pub fn value(&self, name: &str) -> u64 {
        self.0
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
            .unwrap_or_else(|| panic!("no {name} in metrics:\n{}", self.0))
    }

    /// The sum of the series of `name` whose labels include every `key="value"` of `labels`.
    pub fn labelled(&self, name: &str, labels: &[&str]) -> u64 {
        self.0
            .lines()
            .filter_map(|l| l.strip_prefix(name)?.strip_prefix('{')?.rsplit_once(' '))
            .filter(|(set, _)| labels.iter().all(|l| set.contains(l)))
            .filter_map(|(_, v)| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    }

    /// The sum of every series of `name` (all label values).
    pub fn sum(&self, name: &str) -> u64 {
        self.0
            .lines()
            .filter_map(|l| l.strip_prefix(name)?.strip_prefix('{')?.rsplit_once(' '))
            .filter_map(|(_, v)| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    }
}

/// The relay's two counters, scraped from the metrics endpoint at `maddr`. Both are incremented before the
/// request is answered, so after a response has been read they already count it: no polling needed.
pub async fn counts(maddr: SocketAddr) -> Counts {
    let s = Scrape::of(maddr).await;
    Counts {
        relayed: s.value("portcullis_relayed_requests_total"),
        handovers: s.value("portcullis_relay_handovers_total"),
    }
}

/// One counter or gauge from the metrics endpoint at `maddr` (its full name, `_total` included).
pub async fn metric(maddr: SocketAddr, name: &str) -> u64 {
    Scrape::of(maddr).await.value(name)
}

/// Which proxy path serves a request: the relay takes a bodyless GET or HEAD (of a cached session, or for a bypass
/// path); the same request with `Content-Length: 0` is handed to hyper's. Tests of proxy behaviour run on both and
/// pin the path with [`Lane::assert_served`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Lane {
    Relay,
    Hyper,
}

impl Lane {
    pub const BOTH: [Lane; 2] = [Lane::Relay, Lane::Hyper];

    /// The header lines that steer a request to this lane.
    pub fn headers(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Lane::Relay => &[],
            Lane::Hyper => &[("content-length", "0")],
        }
    }

    /// `headers` plus this lane's steering headers.
    pub fn with<'a>(self, headers: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        headers.iter().copied().chain(self.headers().iter().copied()).collect()
    }

    /// Asserts the relay counters moved from `before` by exactly `n` requests served on this lane.
    pub async fn assert_served(self, maddr: SocketAddr, before: Counts, n: u64, what: &str) {
        let want = match self {
            Lane::Relay => Counts { relayed: n, handovers: 0 },
            Lane::Hyper => Counts { relayed: 0, handovers: n },
        };
        let delta = counts(maddr).await - before;
        assert_eq!(delta, want, "{what} on the {self:?} lane: relay counters moved by {delta:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP client with a cookie jar (never follows redirects)
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub version: Version,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }
    pub fn location(&self) -> String {
        self.header("location").unwrap_or_else(|| panic!("no Location header; status {}", self.status))
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}); status {}: {}", self.status, self.text()))
    }
    /// For responses from the upstream echo: the header values it received.
    pub fn upstream_header(&self, name: &str) -> Option<Vec<String>> {
        let j = self.json();
        j["headers"]
            .get(name.to_ascii_lowercase())
            .map(|v| v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect())
    }
    pub fn upstream_headers(&self) -> BTreeMap<String, Vec<String>> {
        serde_json::from_value(self.json()["headers"].clone()).unwrap()
    }
    pub fn upstream_path(&self) -> String {
        self.json()["path"].as_str().unwrap().to_string()
    }
    pub fn set_cookies(&self) -> Vec<String> {
        self.headers.get_all("set-cookie").iter().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).collect()
    }
}

pub fn extract_csrf(html: &str) -> Option<String> {
    let marker = "name=\"csrf\" value=\"";
    let i = html.find(marker)? + marker.len();
    let rest = &html[i..];
    let j = rest.find('"')?;
    Some(rest[..j].to_string())
}

#[derive(Clone)]
pub struct Client {
    pub addr: SocketAddr,
    pub host: String,
    pub jar: BTreeMap<String, String>,
}

impl Client {
    pub fn new(addr: SocketAddr, host: &str) -> Client {
        Client { addr, host: host.to_string(), jar: BTreeMap::new() }
    }

    pub fn cookie_header(&self) -> String {
        self.jar.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("; ")
    }

    pub fn session_cookie(&self) -> Option<String> {
        self.jar.get(SESSION).cloned()
    }

    pub fn store_cookies(&mut self, headers: &HeaderMap) {
        for v in headers.get_all("set-cookie") {
            let s = String::from_utf8_lossy(v.as_bytes()).into_owned();
            let mut parts = s.split(';');
            let Some((name, value)) = parts.next().and_then(|nv| nv.split_once('=')) else {
                continue;
            };
            let (name, value) = (name.trim().to_string(), value.trim().to_string());
            let mut delete = value.is_empty();
            for attr in parts {
                let a = attr.trim().to_ascii_lowercase();
                if a == "max-age=0" || a.starts_with("max-age=-") || (a.starts_with("expires=") && a.contains("1970")) {
                    delete = true;
                }
            }
            if delete {
                self.jar.remove(&name);
            } else {
                self.jar.insert(name, value);
            }
        }
    }

    pub async fn try_send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<Resp, String> {
        let tcp = TcpStream::connect(self.addr).await.map_err(|e| format!("connect: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        let mut b = Request::builder().method(method).uri(path);
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            b = b.header("host", &self.host);
        }
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("cookie")) && !self.jar.is_empty() {
            b = b.header("cookie", self.cookie_header());
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let data = match body {
            Some((ct, data)) => {
                b = b.header("content-type", ct);
                data
            }
            None => Vec::new(),
        };
        let req = b.body(Full::new(Bytes::from(data))).map_err(|e| format!("build request: {e}"))?;
        let resp = sender.send_request(req).await.map_err(|e| format!("send: {e}"))?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
        self.store_cookies(&parts.headers);
        Ok(Resp { status: parts.status.as_u16(), headers: parts.headers, body, version: parts.version })
    }

    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<(&str, Vec<u8>)>,
    ) -> Resp {
        let what = format!("{method} {path} (host {})", self.host);
        within(&what, self.try_send(method, path, headers, body)).await.unwrap_or_else(|e| panic!("{what}: {e}"))
    }

    /// GET without an Accept header (API-like client).
    pub async fn get(&mut self, path: &str) -> Resp {
        self.send("GET", path, &[], None).await
    }

    /// GET as a browser (Accept: text/html).
    pub async fn browse(&mut self, path: &str) -> Resp {
        self.send("GET", path, &[("accept", "text/html,application/xhtml+xml,*/*;q=0.8")], None).await
    }

    pub async fn post_form(&mut self, path: &str, fields: &[(&str, &str)]) -> Resp {
        let body = serde_urlencoded::to_string(fields).unwrap();
        self.send(
            "POST",
            path,
            &[("accept", "text/html")],
            Some(("application/x-www-form-urlencoded", body.into_bytes())),
        )
        .await
    }

    /// GET the login page and return the csrf token from the form.
    pub async fn login_csrf(&mut self, rd: &str) -> String {
        let page = self.browse(&format!("{PREFIX}/login?rd={}", enc(rd))).await;
        assert_eq!(page.status, 200, "login page: {}", page.text());
        assert!(self.jar.contains_key(CSRF), "login page did not set the {CSRF} cookie; jar: {:?}", self.jar);
        extract_csrf(&page.text()).unwrap_or_else(|| panic!("no csrf field in login page: {}", page.text()))
    }

    /// Full login flow: GET the login page, POST the form. Returns the POST response.
    /// Any session cookie already in the jar is dropped first (a logged-in browser would not
    /// be shown the login form).
    pub async fn login(&mut self, user: &str, pass: &str, rd: &str) -> Resp {
        self.jar.remove(SESSION);
        let csrf = self.login_csrf(rd).await;
        self.post_login(&csrf, user, pass, rd).await
    }

    pub async fn post_login(&mut self, csrf: &str, user: &str, pass: &str, rd: &str) -> Resp {
        self.post_form(
            &format!("{PREFIX}/login"),
            &[("csrf", csrf), ("rd", rd), ("username", user), ("password", pass)],
        )
        .await
    }

    /// Login that must succeed (303 + session cookie).
    pub async fn login_ok(&mut self, user: &str, pass: &str) {
        let r = self.login(user, pass, "/").await;
        assert_eq!(r.status, 303, "login as {user} failed: {}", r.text());
        assert!(self.jar.contains_key(SESSION), "no session cookie after login; set-cookie: {:?}", r.set_cookies());
    }

    /// A fresh client carrying only the given session cookie.
    pub fn with_session(&self, value: &str) -> Client {
        let mut c = Client::new(self.addr, &self.host);
        c.jar.insert(SESSION.to_string(), value.to_string());
        c
    }
}

/// True when the status means "no session": 401 for API clients, 302 to login for browsers.
pub fn is_no_session(r: &Resp) -> bool {
    r.status == 401 || (r.status == 302 && r.header("location").is_some_and(|l| l.contains("/login")))
}

// ---------------------------------------------------------------------------------------------
// Raw TCP sender
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
pub struct RawResp {
    /// 0 when the connection closed without a response
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

fn header_value(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let e = find(b, b"\r\n")?;
        let line = std::str::from_utf8(&b[..e]).ok()?;
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        b = &b[e + 2..];
        if size == 0 {
            return Some(out);
        }
        if b.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

fn parse_raw(buf: &[u8], complete: bool) -> Option<RawResp> {
    let pos = find(buf, b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..pos]).into_owned();
    let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let rest = &buf[pos + 4..];
    if let Some(cl) = header_value(&head, "content-length").and_then(|v| v.parse::<usize>().ok()) {
        if rest.len() >= cl {
            return Some(RawResp { status, head, body: rest[..cl].to_vec() });
        }
    } else if header_value(&head, "transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        if let Some(body) = dechunk(rest) {
            return Some(RawResp { status, head, body });
        }
    } else if status == 204 || status == 304 || (100..200).contains(&status) {
        return Some(RawResp { status, head, body: Vec::new() });
    }
    if complete {
        return Some(RawResp { status, head, body: rest.to_vec() });
    }
    None
}

/// Send raw bytes, read one response.
pub async fn raw_send(addr: SocketAddr, data: &[u8]) -> RawResp {
    within("raw request", async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(data).await.unwrap();
        let mut buf = Vec::new();
        let mut tmp = [0u8; 16384];
        loop {
            if let Some(r) = parse_raw(&buf, false) {
                return r;
            }
            let n = s.read(&mut tmp).await.unwrap_or(0);
            if n == 0 {
                return parse_raw(&buf, true).unwrap_or(RawResp {
                    status: 0,
                    head: String::from_utf8_lossy(&buf).into_owned(),
                    body: Vec::new(),
                });
            }
            buf.extend_from_slice(&tmp[..n]);
        }
    })
    .await
}

/// `GET {target} HTTP/1.1` with the given Host and extra header lines.
pub async fn raw_get(addr: SocketAddr, host: &str, target: &str, extra: &str) -> RawResp {
    let req = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n");
    raw_send(addr, req.as_bytes()).await
}

pub fn empty_body() -> Empty<Bytes> {
    Empty::new()
}

/// A TLS client that trusts only `cert` and offers only the ALPN protocol `alpn`.
pub fn tls_connector(cert: &rcgen::Certificate, alpn: &[u8]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}
