//! Requests the relay answers without forwarding them itself — portal pages, sign-in redirects, refusals, a session
//! it couldn't read — through the gateway's own handlers ([`State::handle`], the same code hyper's path calls), so
//! the connection stays on the relay for its next request instead of going to hyper for good. Only requests the
//! relay parsed in full qualify (HTTP/1.1, origin-form target, one Host, no `Transfer-Encoding` or `Expect`, a
//! plain `Content-Length` body of at most [`MAX_LOCAL_BODY`]); the answer is written with one framing (RFC 9112
//! §6.3): none for HEAD, 204 and 304, its length when known, else chunked with its trailers.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::Body as _;
use http_body_util::BodyExt;

use super::*;

/// The largest request body read in for a local answer (the portal's forms take at most 64 KiB); a longer one goes
/// to hyper, which streams it.
pub(super) const MAX_LOCAL_BODY: u64 = 64 * 1024 + 1024;

/// A request for the gateway's handlers.
pub(super) struct Local {
    parts: http::request::Parts,
    /// Length of the request head in the input.
    len: usize,
    /// The body's length.
    body: u64,
    /// A HEAD request.
    head: bool,
    /// The client asked to close after this answer.
    close: bool,
}

impl Local {
    /// The request as `http` parts; `None` when a part doesn't convert (hyper's parser then has the last word).
    pub(super) fn of(
        method: &str,
        target: &str,
        hs: &[httparse::Header<'_>],
        len: usize,
        body: u64,
        close: bool,
    ) -> Option<Local> {
        let mut req = http::Request::new(());
        *req.method_mut() = http::Method::from_bytes(method.as_bytes()).ok()?;
        *req.uri_mut() = target.parse().ok()?;
        let mut map = HeaderMap::with_capacity(hs.len());
        for h in hs {
            map.append(HeaderName::from_bytes(h.name.as_bytes()).ok()?, HeaderValue::from_bytes(h.value).ok()?);
        }
        *req.headers_mut() = map;
        let (parts, ()) = req.into_parts();
        Some(Local { head: parts.method == http::Method::HEAD, parts, len, body, close })
    }
}

/// Reads the body (by `deadline`), has the gateway answer, and writes the answer.
pub(super) async fn answer_local<IO, S: State>(
    gw: Arc<S>,
    io: &mut IO,
    c: &mut Conn,
    l: Local,
    deadline: Instant,
) -> io::Result<Next>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    c.input.advance(l.len);
    let want = usize::try_from(l.body).unwrap_or(usize::MAX);
    // The short body must come within the head's time too: a client that stalls mid-form holds nothing for long.
    let read = async {
        while c.input.len() < want {
            c.input.reserve(want - c.input.len());
            if io.read_buf(&mut c.input).await? == 0 {
                return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "the client ended its body early"));
            }
        }
        Ok(())
    };
    tokio::time::timeout_at(deadline.into(), read)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the request body took too long"))??;
    let body = c.input.split_to(want).freeze();
    gw.metrics().relay_local.inc();
    let req = http::Request::from_parts(l.parts, crate::body::full(body));
    let resp = gw.clone().handle(c.peer, req).await;
    let complete = write_response(io, &mut c.out, resp, l.head, l.close).await?;
    Ok(if complete && !l.close { Next::Continue } else { Next::Close })
}

/// Writes `resp` to the client; `Ok(false)` when its body failed midway (the connection must close).
pub(super) async fn write_response<IO>(
    io: &mut IO,
    out: &mut Vec<u8>,
    resp: http::Response<crate::Body>,
    head: bool,
    close: bool,
) -> io::Result<bool>
where
    IO: AsyncWrite + Unpin,
{
    let (parts, mut body) = resp.into_parts();
    let status = parts.status.as_u16();
    // No body after a HEAD, 1xx, 204 or 304 (RFC 9110 §6.4.1); a HEAD or 304 answer may state the length.
    let bodiless = head || status < 200 || status == 204 || status == 304;
    let exact = body.size_hint().exact();
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.status.canonical_reason().unwrap_or_default().as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        let framing = name == http::header::CONTENT_LENGTH || name == http::header::TRANSFER_ENCODING;
        if (!framing || bodiless && name == http::header::CONTENT_LENGTH && status != 204)
            && name != http::header::CONNECTION
        {
            put_header(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    let chunked = match (bodiless, exact) {
        (true, _) => false,
        (false, Some(n)) => {
            put_header(out, b"content-length", n.to_string().as_bytes());
            false
        }
        (false, None) => {
            put_header(out, b"transfer-encoding", b"chunked");
            true
        }
    };
    if !parts.headers.contains_key(http::header::DATE) {
        put_date(out, Instant::now());
    }
    if close {
        put_header(out, b"connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    if bodiless {
        io.write_all(out).await?;
        io.flush().await?;
        return Ok(true);
    }
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            // Cut short: what went out is all the client gets, and the connection closes.
            io.write_all(out).await?;
            io.flush().await?;
            return Ok(false);
        };
        match frame.into_data() {
            Ok(data) if chunked && !data.is_empty() => {
                out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                out.extend_from_slice(&data);
                out.extend_from_slice(b"\r\n");
            }
            Ok(data) => out.extend_from_slice(&data),
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
        if out.len() >= CHUNK {
            io.write_all(out).await?;
            out.clear();
        }
    }
    if chunked {
        out.extend_from_slice(b"0\r\n");
        for (name, value) in trailers.iter().flatten() {
            put_header(out, name.as_str().as_bytes(), value.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    }
    io.write_all(out).await?;
    io.flush().await?;
    Ok(true)
}
