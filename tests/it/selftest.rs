//! Sanity checks of the harness itself (upstream app, client, raw sender), no gateway involved.

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_upstream_echo_upload_download_ws() {
    let up = start_upstream().await;
    let mut c = Client::new(up.addr, "up.test");
    let r = c.send("GET", "/a/b?c=d", &[("X-Thing", "1"), ("x-thing", "2")], None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.upstream_path(), "/a/b?c=d");
    assert_eq!(r.upstream_header("x-thing"), Some(vec!["1".to_string(), "2".to_string()]));
    let r = c.send("POST", "/upload", &[], Some(("application/octet-stream", vec![1u8; 100_000]))).await;
    assert_eq!(r.text(), "100000");
    let r = c.get("/download?bytes=200000").await;
    assert_eq!(r.body.len(), 200_000);

    let raw = raw_get(up.addr, "up.test", "/public/../x%2f", "").await;
    assert_eq!(raw.status, 200);
    assert_eq!(up.last_hit().path, "/public/../x%2f");
    let raw = raw_get(up.addr, "up.test", "/download?bytes=70000", "").await;
    assert_eq!(raw.body.len(), 70000);

    let tcp = TcpStream::connect(up.addr).await.unwrap();
    let mut req = "ws://up.test/ws".into_client_request().unwrap();
    req.headers_mut().insert("remote-user", "zed".parse().unwrap());
    let (mut ws, _) = within("ws", tokio_tungstenite::client_async(req, tcp)).await.unwrap();
    assert_eq!(within("ws1", ws.next()).await.unwrap().unwrap().to_text().unwrap(), "zed");
    ws.send(Message::text("ping")).await.unwrap();
    assert_eq!(within("ws2", ws.next()).await.unwrap().unwrap().to_text().unwrap(), "ping");

    let mut jar = Client::new(up.addr, "x");
    let mut h = hyper::HeaderMap::new();
    h.append("set-cookie", "a=1; Path=/; HttpOnly".parse().unwrap());
    h.append("set-cookie", "b=2".parse().unwrap());
    jar.store_cookies(&h);
    let mut h = hyper::HeaderMap::new();
    h.append("set-cookie", "b=; Max-Age=0".parse().unwrap());
    jar.store_cookies(&h);
    assert_eq!(jar.cookie_header(), "a=1");
    assert_eq!(extract_csrf(r#"<input type="hidden" name="csrf" value="tok123">"#).as_deref(), Some("tok123"));
}
