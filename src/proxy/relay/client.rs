//! The relay's upstream client for requests hyper's server parsed — HTTP/2 streams, chunked or `Expect` bodies,
//! upgrades, anything the relay handed over — on the same pooled HTTP/1.1 connections (plain or TLS) the relay
//! uses: one client and one pool per app for every path. The request goes out with the one framing it allows
//! (RFC 9112 §6.1–§6.3): a `Content-Length` when its body's size is known, else chunked; the answer's head is read
//! with the relay's limits and framing rules, and its body streams back decoded, trailers included, returning the
//! connection to the pool when it ends.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;

use super::*;

/// What the app answered.
pub enum Sent {
    /// A final answer, its body (if any) streaming from the app, and how the app framed it.
    Answer(Response<AnswerBody>, Framing),
    /// `101 Switching Protocols` to an upgrade: the connection belongs to the tunnel now, with any bytes the app
    /// sent after the head in front of it.
    Upgraded(http::response::Parts, Prefixed<UpStream>),
}

/// Sending a request to the app failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The client's body failed (cut short, bad chunking): the client's fault, not the app's.
    #[error("the request body failed: {0}")]
    Body(BoxError),
    /// The client's body paused longer than `body_timeout`.
    #[error("the request body stalled")]
    BodyStalled,
    /// The app or the connection to it failed, or its answer can't be framed.
    #[error(transparent)]
    Upstream(#[from] io::Error),
    /// The app's answer head didn't come within `upstream_timeout` of the request's end.
    #[error("the app did not answer in time")]
    Timeout,
}

type BoxError = crate::BoxError;

impl Pool {
    /// Sends `req` (origin-form target, headers already rewritten for the app) on an idle connection of `who` or a
    /// new one, and reads the answer's head. A pooled connection the app had closed is replaced once, for a bodyless
    /// GET or HEAD only (RFC 9110 §9.2.2); `upgrade` allows a 101 answer. The body's pauses and the wait for the
    /// answer are bounded by `limits`.
    pub async fn send<B>(
        self: &Arc<Self>,
        who: Affinity,
        req: Request<B>,
        upgrade: bool,
        limits: Limits,
    ) -> Result<Sent, SendError>
    where
        B: HttpBody<Data = Bytes, Error = BoxError>,
    {
        let (parts, body) = req.into_parts();
        let mut body = std::pin::pin!(body);
        let head_request = parts.method == http::Method::HEAD;
        let mut out = Vec::with_capacity(512 + parts.headers.len() * 32);
        let sending = request_head(&parts, body.is_end_stream(), body.size_hint().exact(), &mut out);
        let retry = sending == RequestBody::None && matches!(parts.method, http::Method::GET | http::Method::HEAD);
        let mut pooled = self.checkout(&who, Instant::now());
        let (mut up, head) = loop {
            let reused = pooled.is_some();
            let mut up = match pooled.take() {
                Some(up) => up,
                None => self.connect().await?,
            };
            up.buf.clear();
            match exchange(&mut up, &out, body.as_mut(), sending, (head_request, upgrade), limits).await {
                Ok(head) => break (up, head),
                Err(SendError::Upstream(e))
                    if retry && reused && up.buf.is_empty() && e.kind() != io::ErrorKind::InvalidData =>
                {
                    tracing::debug!(error = %e, "pooled upstream connection was closed; reconnecting");
                }
                Err(e) => return Err(e),
            }
        };
        let Head { response, framing, reusable } = head;
        // A connection that carried a body is not used again unless the app opted in (as on the relay; an early
        // answer's connection is never reusable).
        let reusable = reusable && (sending == RequestBody::None || self.reuse_after_body);
        if response.status == http::StatusCode::SWITCHING_PROTOCOLS {
            let prefix = up.buf.split().freeze();
            return Ok(Sent::Upgraded(response, Prefixed { prefix, io: up.stream }));
        }
        let reading = match framing {
            Framing::Empty => Reading::Done(None),
            Framing::Length(n) => Reading::Length(n),
            Framing::Chunked => Reading::Chunked(Chunked::default(), None),
            Framing::UntilClose => Reading::UntilClose,
        };
        let mut body = AnswerBody { up: Some(up), pool: self.clone(), who, reading, reusable };
        if let Reading::Done(None) | Reading::Length(0) = body.reading {
            body.reading = Reading::Done(None);
            body.finish();
        }
        Ok(Sent::Answer(Response::from_parts(response, body), framing))
    }
}

/// How the request's body goes to the app.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum RequestBody {
    None,
    Length(u64),
    Chunked,
}

/// Writes the request head into `out`, with the framing the body calls for: none for an empty body (a zero
/// length for the methods that expect one), its length when known, else chunked (RFC 9112 §7.1).
pub(super) fn request_head(
    parts: &http::request::Parts,
    empty: bool,
    exact: Option<u64>,
    out: &mut Vec<u8>,
) -> RequestBody {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.uri.path_and_query().map_or("/", |p| p.as_str()).as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        // The framing is ours to write; whatever came with the request was the client connection's.
        if name != http::header::CONTENT_LENGTH && name != http::header::TRANSFER_ENCODING {
            put_header(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    let framing = match (empty, exact) {
        (true, _) | (_, Some(0)) => {
            if matches!(parts.method, http::Method::POST | http::Method::PUT | http::Method::PATCH) {
                put_header(out, b"content-length", b"0");
            }
            RequestBody::None
        }
        (false, Some(n)) => {
            put_header(out, b"content-length", n.to_string().as_bytes());
            RequestBody::Length(n)
        }
        (false, None) => {
            put_header(out, b"transfer-encoding", b"chunked");
            RequestBody::Chunked
        }
    };
    out.extend_from_slice(b"\r\n");
    framing
}

/// An answer's head as read from the app.
pub(super) struct Head {
    pub(super) response: http::response::Parts,
    pub(super) framing: Framing,
    /// The connection can carry another request once the body has been read.
    pub(super) reusable: bool,
}

/// Writes the head in `out` and the body, then reads the answer's head (`kind`: a HEAD request, an upgrade). A
/// body is written as it comes, each piece within `limits.body`; when the app stops taking it (it answered early
/// and closed), the answer it sent is still read. The answer's head is awaited for `limits.answer` from then.
async fn exchange<B>(
    up: &mut Upstream,
    out: &[u8],
    mut body: Pin<&mut B>,
    framing: RequestBody,
    (head_request, upgrade): (bool, bool),
    limits: Limits,
) -> Result<Head, SendError>
where
    B: HttpBody<Data = Bytes, Error = BoxError>,
{
    let mut sent = put(&mut up.stream, out, limits.body).await.map_err(SendError::from);
    if sent.is_ok() && framing != RequestBody::None {
        sent = send_body(&mut up.stream, body.as_mut(), framing, limits.body).await;
    }
    if sent.is_ok() {
        sent = timed(limits.body, up.stream.flush_tls()).await.map_err(SendError::from);
    }
    match sent {
        Ok(()) => {}
        // Only a request with a body can be answered before it is sent whole; without one, a failed write is a
        // connection to retry, not one to read a stray answer from.
        Err(SendError::Upstream(e)) if framing != RequestBody::None => {
            // The app may have answered and closed before taking the whole body (a 413, say): its answer counts.
            tracing::debug!(error = %e, "the app stopped reading the request body");
            return match tokio::time::timeout(limits.answer, read_head(up, head_request, upgrade)).await {
                Ok(Ok(mut head)) => {
                    head.reusable = false;
                    Ok(head)
                }
                _ => Err(e.into()),
            };
        }
        Err(e) => return Err(e),
    }
    match tokio::time::timeout(limits.answer, read_head(up, head_request, upgrade)).await {
        Ok(head) => Ok(head?),
        Err(_) => Err(SendError::Timeout),
    }
}

/// `io` within `limit`: past it, the app has stopped taking the request.
async fn timed(limit: Duration, io: impl Future<Output = io::Result<()>>) -> io::Result<()> {
    tokio::time::timeout(limit, io)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "the app stopped taking the request body")))
}

/// Writes `data` to the app within `limit`.
async fn put(stream: &mut UpStream, data: &[u8], limit: Duration) -> io::Result<()> {
    timed(limit, stream.write_all(data)).await
}

/// Streams the request body to the app in its framing, each piece within `limit`; a body that doesn't match its
/// stated length, or pauses longer than `limit`, is the client's failure.
async fn send_body<B>(
    stream: &mut UpStream,
    mut body: Pin<&mut B>,
    framing: RequestBody,
    limit: Duration,
) -> Result<(), SendError>
where
    B: HttpBody<Data = Bytes, Error = BoxError>,
{
    let mut sent = 0u64;
    loop {
        let Ok(frame) = tokio::time::timeout(limit, body.as_mut().frame()).await else {
            return Err(SendError::BodyStalled);
        };
        let Some(frame) = frame else { break };
        let frame = frame.map_err(SendError::Body)?;
        // Request trailers are dropped: an HTTP/1.1 app has no way to ask for them, and they could carry
        // names the header rules would have removed.
        let Ok(data) = frame.into_data() else { continue };
        if data.is_empty() {
            continue;
        }
        sent += data.len() as u64;
        match framing {
            RequestBody::Length(n) if sent > n => {
                return Err(SendError::Body("the request body is longer than its length".into()));
            }
            RequestBody::Chunked => {
                put(stream, format!("{:x}\r\n", data.len()).as_bytes(), limit).await?;
                put(stream, &data, limit).await?;
                put(stream, b"\r\n", limit).await?;
            }
            _ => put(stream, &data, limit).await?,
        }
    }
    match framing {
        RequestBody::Length(n) if sent != n => Err(SendError::Body("the request body ended before its length".into())),
        RequestBody::Chunked => Ok(put(stream, b"0\r\n\r\n", limit).await?),
        _ => Ok(()),
    }
}

/// Reads the answer's head from the app (interim 1xx answers skipped, as the relay skips them).
async fn read_head(up: &mut Upstream, head_request: bool, upgrade: bool) -> io::Result<Head> {
    loop {
        if !up.buf.is_empty()
            && let Some(head) = parse_head(&mut up.buf, head_request, upgrade)?
        {
            return Ok(head);
        }
        up.buf.reserve(CHUNK);
        if up.stream.read_buf(&mut up.buf).await? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the app closed the connection before answering"));
        }
    }
}

/// Parses an answer head from `buf` under the relay's limits and framing rules; `None`: more bytes are needed.
pub(super) fn parse_head(buf: &mut BytesMut, head_request: bool, upgrade: bool) -> io::Result<Option<Head>> {
    loop {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_RESPONSE_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut resp, buf, &mut slots)
        {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() <= MAX_RESPONSE_HEAD => return Ok(None),
            Ok(httparse::Status::Partial) => return Err(bad("the app's response head is too large")),
            Err(e) => return Err(bad(format!("malformed response head: {e}"))),
        };
        let (Some(version), Some(status)) = (resp.version, resp.code) else {
            return Err(bad("malformed response head"));
        };
        if status == 101 && !upgrade {
            return Err(bad("101 Switching Protocols without an upgrade"));
        }
        if status < 200 && status != 101 {
            buf.advance(len);
            continue;
        }
        let hs: &[httparse::Header<'_>] = resp.headers;
        let framing = if status == 101 { Framing::Empty } else { framing(hs, status, head_request)? };
        let listed = headers::Listed::of(hs);
        let reusable = version == 1 && !listed.has("close") && framing != Framing::UntilClose;
        let mut map = HeaderMap::with_capacity(hs.len());
        for h in hs {
            let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(bad)?;
            map.append(name, HeaderValue::from_bytes(h.value).map_err(bad)?);
        }
        let mut response = Response::new(());
        *response.status_mut() = http::StatusCode::from_u16(status).map_err(bad)?;
        *response.headers_mut() = map;
        let (response, ()) = response.into_parts();
        buf.advance(len);
        return Ok(Some(Head { response, framing, reusable }));
    }
}

/// Where an answer body is.
enum Reading {
    /// This many bytes to go.
    Length(u64),
    /// Chunked: the decoder, and the trailer section once it has begun.
    Chunked(Chunked, Option<Vec<u8>>),
    /// Until the app closes.
    UntilClose,
    /// Ended; the trailers still to hand out.
    Done(Option<HeaderMap>),
}

/// An answer's body, decoded from its framing. At its end the connection goes back to the pool (when reusable
/// with nothing left over); dropped earlier, it is closed.
pub struct AnswerBody {
    up: Option<Upstream>,
    pool: Arc<Pool>,
    who: Affinity,
    reading: Reading,
    reusable: bool,
}

impl AnswerBody {
    fn finish(&mut self) {
        if let Some(up) = self.up.take()
            && self.reusable
            && up.buf.is_empty()
        {
            self.pool.checkin(self.who.clone(), up);
        }
    }

    /// Decodes what is buffered: a data frame, or `None` when more bytes are needed (or the body just ended).
    fn decode(&mut self) -> io::Result<Option<Bytes>> {
        let Some(up) = self.up.as_mut() else { return Ok(None) };
        if up.buf.is_empty() {
            return Ok(None);
        }
        match &mut self.reading {
            Reading::Length(left) => {
                let k = body_part(&up.buf, *left);
                *left -= k as u64;
                if *left == 0 {
                    self.reading = Reading::Done(None);
                }
                Ok(Some(up.buf.split_to(k).freeze()))
            }
            Reading::UntilClose => Ok(Some(up.buf.split().freeze())),
            Reading::Chunked(chunks, section) => {
                let mut data = BytesMut::new();
                let buf = &up.buf;
                let used =
                    chunks.feed_with(buf, |r| data.extend_from_slice(&buf[r])).map_err(|_| bad("bad chunking"))?;
                match (chunks.trailers_at, section.as_mut()) {
                    (Some(at), _) => *section = Some(buf[at.min(used)..used].to_vec()),
                    (None, Some(t)) => t.extend_from_slice(&buf[..used]),
                    (None, None) => {}
                }
                if section.as_ref().is_some_and(|t| t.len() > MAX_TRAILERS) {
                    return Err(bad("the app's trailer section is too large"));
                }
                if chunks.done() {
                    let trailers = parse_trailers(section.as_deref().unwrap_or_default());
                    self.reading = Reading::Done(Some(trailers).filter(|t| !t.is_empty()));
                }
                up.buf.advance(used);
                Ok(Some(data.freeze()).filter(|d| !d.is_empty()))
            }
            Reading::Done(_) => Ok(None),
        }
    }
}

/// The fields of a chunked body's trailer section (the bytes after the last chunk); the proxy filters them as it
/// filters headers.
pub(super) fn parse_trailers(section: &[u8]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for line in section.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l)) {
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            map.append(n, v);
        }
    }
    map
}

impl HttpBody for AnswerBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        let this = self.get_mut();
        loop {
            match this.decode() {
                Ok(Some(data)) => {
                    // Back to the pool now: once the body says it has ended, hyper needn't poll it again.
                    if let Reading::Done(None) = this.reading {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(None) => {}
                Err(e) => {
                    this.up = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            if let Reading::Done(trailers) = &mut this.reading {
                let trailers = trailers.take();
                this.finish();
                return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
            }
            let Some(up) = this.up.as_mut() else { return Poll::Ready(None) };
            up.buf.reserve(CHUNK);
            match std::task::ready!(tokio_util::io::poll_read_buf(Pin::new(&mut up.stream), cx, &mut up.buf)) {
                Ok(0) if matches!(this.reading, Reading::UntilClose) => {
                    this.reusable = false;
                    this.reading = Reading::Done(None);
                }
                Ok(0) => {
                    this.up = None;
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the app closed the connection mid-body",
                    ))));
                }
                Ok(_) => {}
                Err(e) => {
                    this.up = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.reading, Reading::Done(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self.reading {
            Reading::Length(n) => SizeHint::with_exact(n),
            Reading::Done(_) => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}
