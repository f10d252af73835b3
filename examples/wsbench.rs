//! WebSocket load for `bench/run websocket` (not part of the gateway).
//!
//! `wsbench server PORT` answers WebSocket opening handshakes (RFC 6455 §4.2) and then echoes every byte it gets:
//! a proxy only tunnels bytes after the upgrade, so an echo of the client's frames as sent measures the tunnel.
//! `wsbench client URL CONNS SECS [COOKIE]` opens CONNS tunnels through URL (`http://host:port/path`), then on each
//! sends one 64-byte masked text frame and waits for its 70 bytes back, for SECS seconds, and prints
//! `round_trips_per_s p50_ms p99_ms`.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    match args.first().map(String::as_str) {
        Some("server") => rt.block_on(server(args.get(1).ok_or("server PORT")?.parse()?)),
        Some("client") if args.len() >= 4 => {
            let cookie = args.get(4).cloned().unwrap_or_default();
            rt.block_on(client(&args[1], args[2].parse()?, args[3].parse()?, cookie))
        }
        _ => Err("usage: wsbench server PORT | wsbench client URL CONNS SECS [COOKIE]".into()),
    }
}

/// Reads an HTTP head (up to the blank line) from `s`; returns it and any bytes after it.
async fn read_head(s: &mut TcpStream) -> Result<(String, Vec<u8>), Error> {
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 2048];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err("closed during the handshake".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        if buf.len() > 64 * 1024 {
            return Err("head too long".into());
        }
    }
}

async fn server(port: u16) -> Result<(), Error> {
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    loop {
        let (mut s, _) = listener.accept().await?;
        s.set_nodelay(true)?;
        tokio::spawn(async move {
            let Ok((head, rest)) = read_head(&mut s).await else { return };
            let key = head
                .lines()
                .find_map(|l| l.split_once(':').filter(|(n, _)| n.eq_ignore_ascii_case("sec-websocket-key")))
                .map(|(_, v)| v.trim().to_string())
                .unwrap_or_default();
            let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            let answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {accept}\r\n\r\n"
            );
            if s.write_all(answer.as_bytes()).await.is_err() || s.write_all(&rest).await.is_err() {
                return;
            }
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
    }
}

async fn client(url: &str, conns: usize, secs: u64, cookie: String) -> Result<(), Error> {
    let rest = url.strip_prefix("http://").ok_or("URL must be http://")?;
    let (authority, path) = rest.split_once('/').map_or((rest, "/".to_string()), |(a, p)| (a, format!("/{p}")));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (authority, path, cookie) = (authority.to_string(), path.clone(), cookie.clone());
        tasks.push(tokio::spawn(async move { tunnel(&authority, &path, &cookie, deadline).await }));
    }
    let mut latencies: Vec<u32> = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    latencies.sort_unstable();
    let pct =
        |p: f64| latencies.get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1))).copied();
    let ms = |v: Option<u32>| f64::from(v.unwrap_or(0)) / 1000.0;
    println!("{:.0} {:.3} {:.3}", latencies.len() as f64 / secs as f64, ms(pct(0.5)), ms(pct(0.99)));
    Ok(())
}

/// One tunnel: the upgrade, then round trips until `deadline`; the latency of each in microseconds.
async fn tunnel(authority: &str, path: &str, cookie: &str, deadline: Instant) -> Result<Vec<u32>, Error> {
    let mut s = TcpStream::connect(authority).await?;
    s.set_nodelay(true)?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nCookie: {cookie}\r\n\r\n"
    );
    s.write_all(request.as_bytes()).await?;
    let (head, rest) = read_head(&mut s).await?;
    if !head.starts_with("HTTP/1.1 101") {
        return Err(format!("no upgrade: {}", head.lines().next().unwrap_or_default()).into());
    }
    if !rest.is_empty() {
        return Err("bytes after the 101".into());
    }
    // FIN + text, masked, 64 bytes of payload (RFC 6455 §5.2).
    let mut frame = vec![0x81, 0x80 | 64, 1, 2, 3, 4];
    frame.extend((0..64u8).map(|i| (b'a' + i % 26) ^ [1, 2, 3, 4][usize::from(i % 4)]));
    let mut back = vec![0u8; frame.len()];
    let mut latencies = Vec::new();
    while Instant::now() < deadline {
        let t = Instant::now();
        s.write_all(&frame).await?;
        s.read_exact(&mut back).await?;
        if back != frame {
            return Err("the echo differs from what was sent".into());
        }
        latencies.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
    }
    Ok(latencies)
}
