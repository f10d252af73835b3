//! SIGHUP reloads the TLS certificate without dropping the connections already open.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

fn connector(trusted: &rcgen::Certificate) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted.der().clone()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// A TLS connection to the gateway trusting only `trusted`, or the handshake error.
async fn tls(
    addr: std::net::SocketAddr,
    trusted: &rcgen::Certificate,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(Duration::from_secs(10), connector(trusted).connect(name, tcp))
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| e.to_string())
}

/// One keep-alive HTTP/1.1 health request on an open TLS connection; the status line.
async fn health(s: &mut tokio_rustls::client::TlsStream<TcpStream>) -> String {
    s.write_all(b"GET /_portcullis/health HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = within("health answer", s.read(&mut buf)).await.unwrap();
    String::from_utf8_lossy(&buf[..n]).lines().next().unwrap_or_default().to_string()
}

fn write_pair(dir: &std::path::Path, ck: &rcgen::CertifiedKey<rcgen::KeyPair>) {
    std::fs::write(dir.join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_tls_certificate_and_open_connections_survive() {
    let up = start_upstream().await;
    let cfg = format!(
        "[server]\nlisten = \"{{LISTEN}}\"\ntls_cert = \"{{DIR}}/cert.pem\"\ntls_key = \"{{DIR}}/key.pem\"\n\n{}",
        app("localhost", &up.url(), "bypass")
    );
    let env = Env::password_only(&cfg);
    let old = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let new = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    write_pair(env.path(), &old);
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("serve")
        .arg("-c")
        .arg(&env.config_path)
        .kill_on_drop(true)
        .spawn()
        .expect("start portcullis serve");
    let pid = child.id().expect("child pid");

    // Up once a handshake with the old certificate works.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let mut open = loop {
        if let Ok(s) = tls(env.listen, &old.cert).await {
            break s;
        }
        assert!(tokio::time::Instant::now() < deadline, "the TLS gateway never came up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(health(&mut open).await.contains("200"), "health over TLS");
    assert!(tls(env.listen, &new.cert).await.is_err(), "the new certificate is served before any reload");

    write_pair(env.path(), &new);
    let hup = std::process::Command::new("kill").arg("-HUP").arg(pid.to_string()).status().unwrap();
    assert!(hup.success());

    // New connections get the new certificate (bounded wait for the signal to be handled).
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if let Ok(mut s) = tls(env.listen, &new.cert).await {
            assert!(health(&mut s).await.contains("200"));
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the reloaded certificate was never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(tls(env.listen, &old.cert).await.is_err(), "the old certificate is still served after the reload");
    // The connection opened before the reload was not dropped.
    assert!(health(&mut open).await.contains("200"), "a connection from before the reload stopped working");

    let _ = child.kill().await;
}
