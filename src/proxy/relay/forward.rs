//! Forwarding a planned request: the exchange with the app on a pooled connection (the body streamed within
//! `body_timeout`, the answer's head awaited within `upstream_timeout` of the request's end), the answer relayed
//! back, and the connection returned to the pool only when nothing can be confused with its next answer.

use super::*;

/// Sends one request and relays its answer; what the client connection does next.
pub(super) async fn forward_one<IO>(
    gw: &impl State,
    client: &mut IO,
    c: &mut Conn,
    f: &Forward,
    started: Instant,
    timer: Pin<&mut tokio::time::Sleep>,
) -> io::Result<Next>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    c.input.advance(f.len);
    gw.metrics().relayed.inc();
    let app = &gw.config().apps[f.app];
    let Some(pool) = gw.upstreams().relay(f.app) else {
        return answer(gw, client, c, f, &Reject::BadGateway).await;
    };
    let own = gw.own_cookies();
    // Two clock reads (`started`, the caller's, and `answered`) serve the deadlines, the pool's checkout, the
    // latency and the Date (the checkin and the caller's elapsed time read it again after the body).
    let limits = Limits { answer: app.upstream_timeout.0, body: gw.config().server.body_timeout.0 };
    let exchanged = exchange(pool, c, client, &own, f, started, timer, limits).await;
    let answered = Instant::now();
    c.upstream = Some(answered.saturating_duration_since(started));
    let (mut up, head, whole) = match exchanged {
        Ok(sent) => sent,
        // The client broke off its body: nobody is left to answer.
        Err(Failed::Client(e)) => return Err(e),
        Err(Failed::ClientStalled) => return answer(gw, client, c, f, &Reject::RequestTimeout).await,
        Err(Failed::App(e)) => {
            tracing::warn!(upstream = %pool.authority, error = %e, "upstream request failed");
            return answer(gw, client, c, f, &Reject::BadGateway).await;
        }
        Err(Failed::Timeout) => return answer(gw, client, c, f, &Reject::GatewayTimeout).await,
    };
    c.status = head.status;
    finish_head(&mut c.out, &head, answered);
    if head.status == 101 {
        client.write_all(&c.out).await?;
        client.flush().await?;
        return Ok(Next::Tunnel(up));
    }
    let complete = relay_body(&mut up, client, &mut c.out, head.framing, &own).await?;
    client.flush().await?;
    if !complete {
        // The app broke off mid-body: the client sees the answer cut short, as with hyper.
        return Ok(Next::Close);
    }
    // A connection that carried a body is not used again (unless the app opted in, and the body went whole): an
    // app that didn't read it (or read it as another request) would answer the next request with what the body
    // asked for (see SECURITY.md).
    if head.reusable && up.buf.is_empty() && (f.body == 0 || (pool.reuse_after_body && whole)) {
        pool.checkin(f.who.clone(), up);
    }
    // What is left of a body the app answered before taking can't be told from the next request: close.
    Ok(if head.close || !whole { Next::Close } else { Next::Continue })
}

/// How long the parts of an exchange with an app may take.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// `upstream_timeout`: from the moment the request is sent until the app's answer head is in.
    pub answer: Duration,
    /// `body_timeout`: the longest pause in a request body, reading it from the client or writing it to the app.
    pub body: Duration,
}

/// Why an exchange with the app ended without an answer.
enum Failed {
    /// The client broke off its body.
    Client(io::Error),
    /// The client's body paused longer than `body_timeout`.
    ClientStalled,
    /// The app or the connection to it failed.
    App(io::Error),
    /// The app's answer head didn't come within `upstream_timeout`.
    Timeout,
}

/// Writes the request in `c.out` (and its body, from the client) to the app and reads the answer's head, on a
/// pooled connection when there is one. `true` with the head: the whole body was sent.
#[allow(clippy::too_many_arguments)]
async fn exchange<IO>(
    pool: &Pool,
    c: &mut Conn,
    client: &mut IO,
    own: &[&str],
    f: &Forward,
    now: Instant,
    mut timer: Pin<&mut tokio::time::Sleep>,
    limits: Limits,
) -> Result<(Upstream, ResponseHead, bool), Failed>
where
    IO: AsyncRead + Unpin,
{
    let mut pooled = pool.checkout(&f.who, now);
    loop {
        let reused = pooled.is_some();
        let mut up = match pooled.take() {
            Some(s) => s,
            None => pool.connect().await.map_err(Failed::App)?,
        };
        up.buf.clear();
        match send(&mut up, c, client, (own, f), (now, timer.as_mut()), limits).await {
            Ok((head, whole)) => return Ok((up, head, whole)),
            // A pooled connection the app closed while it was idle fails before any answer: try once more on a
            // new one, for a request that may be sent twice (see `Forward::retry`). `c.out` still holds it.
            Err(Failed::App(e)) if f.retry && reused && up.buf.is_empty() && e.kind() != io::ErrorKind::InvalidData => {
                tracing::debug!(error = %e, "pooled upstream connection was closed; reconnecting");
            }
            Err(e) => return Err(e),
        }
    }
}

/// Sends the head in `c.out` with the body bytes already read, streams the rest of the body from the client as
/// it comes (each piece within `limits.body`), then reads the answer's head (within `limits.answer` of the
/// request's end; written to `c.out` for the client). When the app stops taking the body, the answer it may have
/// sent before (a 413, say) is still read and passed on (`false`: the body wasn't sent whole). A request without
/// a body is sent and answered under one deadline from `started`: one timer reset and no clock read of its own.
async fn send<IO>(
    up: &mut Upstream,
    c: &mut Conn,
    client: &mut IO,
    (own, f): (&[&str], &Forward),
    (started, mut timer): (Instant, Pin<&mut tokio::time::Sleep>),
    limits: Limits,
) -> Result<(ResponseHead, bool), Failed>
where
    IO: AsyncRead + Unpin,
{
    if f.body == 0 {
        let exchange = async {
            up.stream.write_all(&c.out).await?;
            up.stream.flush_tls().await?;
            answer_head(up, &mut c.out, own, f).await
        };
        return match within(timer, started + limits.answer, exchange).await {
            Some(Ok(head)) => Ok((head, true)),
            Some(Err(e)) => Err(Failed::App(e)),
            None => Err(Failed::Timeout),
        };
    }
    let mut left = f.body;
    let k = body_part(&c.input, left);
    c.out.extend_from_slice(&c.input[..k]);
    c.input.advance(k);
    left -= k as u64;
    let mut sent = put(timer.as_mut(), limits.body, &mut up.stream, &c.out).await;
    while sent.is_ok() && left > 0 {
        c.input.reserve(CHUNK);
        let deadline = Instant::now() + limits.body;
        match within(timer.as_mut(), deadline, client.read_buf(&mut c.input)).await {
            None => return Err(Failed::ClientStalled),
            Some(Ok(n)) if n > 0 => {}
            Some(_) => {
                let e = io::Error::new(io::ErrorKind::ConnectionAborted, "the client ended its body early");
                return Err(Failed::Client(e));
            }
        }
        let k = body_part(&c.input, left);
        sent = put(timer.as_mut(), limits.body, &mut up.stream, &c.input[..k]).await;
        c.input.advance(k);
        left -= k as u64;
    }
    let head = within(timer, Instant::now() + limits.answer, answer_head(up, &mut c.out, own, f));
    match (sent, head.await) {
        (Ok(()), Some(Ok(head))) => Ok((head, true)),
        // The app may have answered and closed before taking the whole body: its answer counts.
        (Err(_), Some(Ok(head))) => Ok((head, false)),
        (Err(e), _) => Err(Failed::App(e)),
        (Ok(()), Some(Err(e))) => Err(Failed::App(e)),
        (Ok(()), None) => Err(Failed::Timeout),
    }
}

/// Reads the app's answer head (written to `out` for the client).
async fn answer_head(up: &mut Upstream, out: &mut Vec<u8>, own: &[&str], f: &Forward) -> io::Result<ResponseHead> {
    loop {
        if let Some(head) = response_head(&mut up.buf, out, own, f)? {
            return Ok(head);
        }
        up.buf.reserve(CHUNK);
        if up.stream.read_buf(&mut up.buf).await? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the app closed the connection before answering"));
        }
    }
}

/// Writes `w` to the app within `limit`: an app that takes no more of a body for that long has stopped reading it.
async fn put(timer: Pin<&mut tokio::time::Sleep>, limit: Duration, stream: &mut UpStream, w: &[u8]) -> io::Result<()> {
    let write = async {
        stream.write_all(w).await?;
        stream.flush_tls().await
    };
    within(timer, Instant::now() + limit, write)
        .await
        .unwrap_or_else(|| Err(io::Error::new(io::ErrorKind::TimedOut, "the app stopped taking the request body")))
}

/// Writes one of our own pages (408, 502, 504) to the client.
pub(super) async fn answer<IO>(
    gw: &impl State,
    client: &mut IO,
    c: &mut Conn,
    f: &Forward,
    r: &Reject,
) -> io::Result<Next>
where
    IO: AsyncWrite + Unpin,
{
    let resp = crate::respond::reject(gw.pages(), r);
    c.status = resp.status().as_u16();
    // After a failure, what is left of a request body can't be told from the next request: close.
    let close = f.close || f.body > 0;
    write_response(client, &mut c.out, resp, f.head, close).await?;
    Ok(if close { Next::Close } else { Next::Continue })
}
