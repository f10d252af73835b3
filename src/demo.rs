//! `portcullis demo`: a whoami app behind the gateway, a `demo` user, state in ./demo-data. No set-up.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::credentials::password;
use crate::store::{Store, User};

/// Escapes text for HTML.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The whoami page: who the gateway says you are, and every header received.
async fn whoami(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let user = req.headers().get("remote-user").and_then(|v| v.to_str().ok()).unwrap_or("(nobody)");
    let mut rows = String::new();
    for (k, v) in req.headers() {
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td></tr>",
            escape(k.as_str()),
            escape(&String::from_utf8_lossy(v.as_bytes()))
        ));
    }
    let html = format!(
        "<!doctype html><meta charset=utf-8><meta name=viewport content='width=device-width'>\
         <title>whoami</title><body style='font-family:system-ui;max-width:50rem;margin:2rem auto;padding:0 1rem'>\
         <h1>Hello, {}</h1><p>This is the demo app behind Portcullis. It received <code>{} {}</code> with these headers:</p>\
         <table border=1 cellpadding=4 style='border-collapse:collapse'>{rows}</table>\
         <p><a href='/_portcullis/logout'>Sign out</a></p>",
        escape(user),
        escape(req.method().as_str()),
        escape(&req.uri().to_string()),
    );
    Ok(Response::builder()
        .header("content-type", "text/html; charset=utf-8")
        .body(Full::new(Bytes::from(html)))
        .unwrap_or_default())
}

/// Serves the whoami app on a loopback port and returns its address.
pub async fn start_whoami() -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service_fn(whoami))
                    .await;
            });
        }
    });
    Ok(addr)
}

fn demo_config(dir: &Path, listen: SocketAddr, upstream: SocketAddr) -> Result<Config> {
    let text = format!(
        r#"
[server]
listen = "{listen}"
[storage]
path = "{db}"
secret_key_file = "{key}"
[session]
secure = false
[portal]
title = "Portcullis demo"
[mail]
transport = "outbox"
outbox_dir = "{outbox}"
from = "Portcullis demo <no-reply@example.com>"
public_url = "http://{listen}"
[two_factor]
required = true
issuer = "Portcullis demo"
[[app]]
host = "*"
upstream = "http://{upstream}"
policy = "two_factor"
  [[app.rule]]
  path = "/public/"
  policy = "bypass"
"#,
        db = dir.join("portcullis.redb").display(),
        key = dir.join("secret.key").display(),
        outbox = dir.join("outbox").display(),
    );
    Ok(Config::parse(&text, Path::new("(demo)"))?)
}

fn random_password() -> Result<String> {
    // 16 characters from an unambiguous alphabet: ~80 bits.
    const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyz23456789";
    let bytes = crate::keys::random_bytes::<16>()?;
    Ok(bytes.iter().map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char).collect())
}

/// Runs the demo until Ctrl-C.
pub async fn run(listen: SocketAddr) -> Result<()> {
    let dir = Path::new("demo-data");
    std::fs::create_dir_all(dir).context("creating ./demo-data")?;
    let upstream = start_whoami().await?;
    let config = demo_config(dir, listen, upstream)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen} (pass --listen to use another address)"))?;

    let pw = random_password()?;
    let hash = {
        let pw = pw.clone();
        tokio::task::spawn_blocking(move || password::hash_blocking(&pw)).await??
    };
    {
        let store = Store::open(&config.storage.path)?;
        if store.user("demo").await?.is_some() {
            store.set_password("demo", hash).await?;
        } else {
            store
                .create_user(User {
                    username: "demo".into(),
                    email: "demo@example.com".into(),
                    display_name: "Demo User".into(),
                    groups: vec!["admins".into(), "staff".into()],
                    password_hash: hash,
                    locked: false,
                    created: SystemClock.now(),
                    last_login: None,
                    factors: Default::default(),
                    stamp: 0,
                })
                .await?;
        }
    }
    println!();
    println!("  Portcullis demo is running.");
    println!("  Open      http://{listen}/");
    println!("  Username  demo");
    println!("  Password  {pw}");
    println!("  State     ./demo-data   (emails in ./demo-data/outbox; Ctrl-C to stop)");
    println!();
    crate::run(listener, config, crate::server::shutdown_signal()).await?;
    Ok(())
}
