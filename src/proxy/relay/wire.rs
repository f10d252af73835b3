//! HTTP/1.1 heads on the wire (RFC 9112 §2-§6): parsing the upstream response head, deciding its framing, writing heads, and replaying bytes already read.

use super::*;

pub(super) fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A parsed response head; its rewritten form is in `Conn::out`.
pub(super) struct ResponseHead {
    pub(super) status: u16,
    pub(super) framing: Framing,
    /// The upstream connection can carry another request afterwards.
    pub(super) reusable: bool,
    /// The client connection closes after this answer.
    pub(super) close: bool,
    /// The app sent no Date: the head in `Conn::out` still needs one (RFC 9110 §6.6.1).
    pub(super) needs_date: bool,
}

pub(super) fn bad(why: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// Parses the app's response head from `input` (skipping interim 1xx answers, which the hyper path doesn't
/// pass on either) and writes the head for the client into `out`. `None`: more bytes are needed.
pub(super) fn response_head(
    input: &mut BytesMut,
    out: &mut Vec<u8>,
    own: &[&str],
    f: &Forward,
) -> io::Result<Option<ResponseHead>> {
    loop {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_RESPONSE_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let len =
            match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut resp, input, &mut slots) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) if input.len() <= MAX_RESPONSE_HEAD => return Ok(None),
                Ok(httparse::Status::Partial) => return Err(bad("the app's response head is too large")),
                Err(e) => return Err(bad(format!("malformed response head: {e}"))),
            };
        let (Some(version), Some(status)) = (resp.version, resp.code) else {
            return Err(bad("malformed response head"));
        };
        let hs: &[httparse::Header<'_>] = resp.headers;
        if status == 101 {
            if f.upgrade.is_none() {
                return Err(bad("101 Switching Protocols without an upgrade"));
            }
            if !headers::websocket_accepted(f.accept.as_deref(), hs) {
                return Err(bad("101 Switching Protocols without the handshake's Sec-WebSocket-Accept"));
            }
            // The tunnel's head: the app's fields under the response rules, the upgrade named by us.
            let listed = headers::Listed::of(hs);
            out.clear();
            out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\n");
            for h in hs {
                if headers::passes_downstream(&listed, h.name.as_bytes(), h.value, own) {
                    put_header(out, h.name.as_bytes(), h.value);
                }
            }
            out.extend_from_slice(b"connection: upgrade\r\nupgrade: websocket\r\n\r\n");
            input.advance(len);
            let (framing, reusable, close, needs_date) = (Framing::Empty, false, false, false);
            return Ok(Some(ResponseHead { status, framing, reusable, close, needs_date }));
        }
        if status < 200 {
            input.advance(len);
            continue;
        }
        let framing = framing(hs, status, f.head)?;
        let close = f.close || framing == Framing::UntilClose;
        let listed = headers::Listed::of(hs);
        let reusable = version == 1 && !listed.has("close") && framing != Framing::UntilClose;
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        // httparse gives a three-digit code.
        out.extend_from_slice(&[
            b'0' + (status / 100 % 10) as u8,
            b'0' + (status / 10 % 10) as u8,
            b'0' + (status % 10) as u8,
        ]);
        out.push(b' ');
        out.extend_from_slice(resp.reason.unwrap_or_default().as_bytes());
        out.extend_from_slice(b"\r\n");
        for h in hs {
            // The length is written below from the framing: as the app sent it, a Connection header naming it
            // would drop it, and the answer would go out unframed on a kept-alive connection.
            if !h.name.eq_ignore_ascii_case("content-length")
                && headers::passes_downstream(&listed, h.name.as_bytes(), h.value, own)
            {
                put_header(out, h.name.as_bytes(), h.value);
            }
        }
        match framing {
            Framing::Length(n) => put_header(out, b"content-length", n.to_string().as_bytes()),
            Framing::Chunked => put_header(out, b"transfer-encoding", b"chunked"),
            // A HEAD or 304 answer may state the length of the body it doesn't carry (RFC 9110 §8.6).
            Framing::Empty if status != 204 => {
                if let Ok(Some(n)) = headers::content_length(hs) {
                    put_header(out, b"content-length", n.to_string().as_bytes());
                }
            }
            Framing::Empty | Framing::UntilClose => {}
        }
        if close {
            put_header(out, b"connection", b"close");
        }
        out.extend_from_slice(b"\r\n");
        let needs_date = hs.values("date").next().is_none();
        input.advance(len);
        return Ok(Some(ResponseHead { status, framing, reusable, close, needs_date }));
    }
}

/// Adds the Date the app didn't send (RFC 9110 §6.6.1) before the blank line that ends the head in `out`.
pub(super) fn finish_head(out: &mut Vec<u8>, head: &ResponseHead, now: Instant) {
    if head.needs_date && out.ends_with(b"\r\n\r\n") {
        out.truncate(out.len() - 2);
        put_date(out, now);
        out.extend_from_slice(b"\r\n");
    }
}

/// The body's framing from the response head ([`headers::response_framing`]); ambiguous framing is an error (502).
pub(super) fn framing(hs: &[httparse::Header<'_>], status: u16, head_request: bool) -> io::Result<Framing> {
    headers::response_framing(hs, status, head_request).map_err(bad)
}

/// Writes a Date header (RFC 9110 §6.6.1) for the moment `now`. Its value is formatted once a second per thread,
/// and the wall clock is read only then: until the next second starts, `now` alone tells the text is current.
pub(super) fn put_date(out: &mut Vec<u8>, now: Instant) {
    thread_local! {
        static CACHED: std::cell::RefCell<(Option<Instant>, String)> =
            const { std::cell::RefCell::new((None, String::new())) };
    }
    CACHED.with_borrow_mut(|(until, text)| {
        if until.is_none_or(|u| now >= u) {
            let wall = std::time::SystemTime::now();
            let into_second = wall.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
            *until = Some(Instant::now() + Duration::from_nanos(u64::from(1_000_000_000 - into_second)));
            *text = httpdate::fmt_http_date(wall);
        }
        put_header(out, b"date", text.as_bytes());
    });
}

/// A connection with bytes already read in front of it, so hyper sees the stream exactly as the client sent it.
pub struct Prefixed<IO> {
    pub(super) prefix: Bytes,
    pub(super) io: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
