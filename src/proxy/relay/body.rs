//! Relaying message bodies (RFC 9112 §6-§7): by length, chunked (re-validated chunk by chunk, trailers filtered) or until close.

use super::*;

/// Relays the body after the head in `c.out`. `Ok(false)`: the app ended it early (or sent something invalid);
/// the client has what came before.
pub(super) async fn relay_body<IO>(
    up: &mut Upstream,
    client: &mut IO,
    out: &mut Vec<u8>,
    framing: Framing,
    own: &[&str],
) -> io::Result<bool>
where
    IO: AsyncWrite + Unpin,
{
    let Upstream { stream: up, buf: upstream } = up;
    // The head goes out with whatever body came with it, in one write; the rest is written as it arrives.
    match framing {
        Framing::Empty => {
            client.write_all(out).await?;
            Ok(true)
        }
        Framing::Length(n) => {
            let mut left = n;
            let k = body_part(upstream, left);
            out.extend_from_slice(&upstream[..k]);
            upstream.advance(k);
            left -= k as u64;
            client.write_all(out).await?;
            while left > 0 {
                if !refill(up, upstream).await {
                    return Ok(false);
                }
                let k = body_part(upstream, left);
                client.write_all(&upstream[..k]).await?;
                upstream.advance(k);
                left -= k as u64;
            }
            Ok(true)
        }
        Framing::Chunked => {
            // The body goes through as it came; its trailer section (RFC 9112 §7.1.2) is gathered and filtered
            // under the rules for headers (no Set-Cookie for our cookies, nothing connection-scoped).
            let mut chunks = Chunked::default();
            let used = chunks.feed(upstream);
            let k = *used.as_ref().unwrap_or(&0);
            let mut section: Option<Vec<u8>> = None;
            let cut = chunks.trailers_at.unwrap_or(k).min(k);
            out.extend_from_slice(&upstream[..cut]);
            if chunks.trailers_at.is_some() {
                section = Some(upstream[cut..k].to_vec());
            }
            if chunks.done() {
                filter_trailers(section.as_deref().unwrap_or_default(), own, out);
            }
            upstream.advance(k);
            client.write_all(out).await?;
            if used.is_err() {
                return Ok(false);
            }
            while !chunks.done() {
                if !refill(up, upstream).await {
                    return Ok(false);
                }
                let Ok(k) = chunks.feed(upstream) else {
                    return Ok(false);
                };
                match &mut section {
                    Some(t) => t.extend_from_slice(&upstream[..k]),
                    None => {
                        let cut = chunks.trailers_at.unwrap_or(k).min(k);
                        client.write_all(&upstream[..cut]).await?;
                        if chunks.trailers_at.is_some() {
                            section = Some(upstream[cut..k].to_vec());
                        }
                    }
                }
                if section.as_ref().is_some_and(|t| t.len() > MAX_TRAILERS) {
                    return Ok(false);
                }
                if chunks.done() {
                    let mut tail = Vec::new();
                    filter_trailers(section.as_deref().unwrap_or_default(), own, &mut tail);
                    client.write_all(&tail).await?;
                }
                upstream.advance(k);
            }
            Ok(true)
        }
        Framing::UntilClose => {
            out.extend_from_slice(upstream);
            upstream.clear();
            client.write_all(out).await?;
            while refill(up, upstream).await {
                client.write_all(upstream).await?;
            }
            Ok(true)
        }
    }
}

/// The longest trailer section relayed; a longer one ends the answer early.
pub(super) const MAX_TRAILERS: usize = 16 * 1024;

/// Writes the trailer fields of `section` (the bytes after the last chunk, ending with the empty line) that pass
/// the rules for response headers, then the empty line.
pub(super) fn filter_trailers(section: &[u8], own: &[&str], out: &mut Vec<u8>) {
    let none: [httparse::Header<'_>; 0] = [];
    let listed = headers::Listed::of(&none[..]);
    for line in section.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l)) {
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if !name.is_empty() && headers::passes_downstream(&listed, name, value, own) {
            put_header(out, name, value);
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// How many of the buffered bytes belong to a body with `left` bytes to go.
pub(super) fn body_part(buf: &BytesMut, left: u64) -> usize {
    buf.len().min(usize::try_from(left).unwrap_or(usize::MAX))
}

/// Reads more of the body into an emptied buffer; `false` at end of stream or on an error.
pub(super) async fn refill(up: &mut UpStream, buf: &mut BytesMut) -> bool {
    buf.clear();
    buf.reserve(CHUNK);
    matches!(up.read_buf(buf).await, Ok(n) if n > 0)
}

/// Follows chunked framing (RFC 9112 §7.1) over bytes relayed as they are, to find where the body ends.
/// Strict: CRLF line ends, at most 16 hex digits of size, no bare LF.
#[derive(Default)]
pub(super) struct Chunked {
    pub(super) state: ChunkState,
    pub(super) size: u64,
    pub(super) digits: u8,
    /// Where, in the input of the last `feed`, the trailer section began (after the last chunk's `0\r\n`).
    pub(super) trailers_at: Option<usize>,
}

#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum ChunkState {
    #[default]
    Size,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

/// The chunked framing is broken.
#[derive(Debug)]
pub(super) struct ChunkError;

impl Chunked {
    pub(super) fn done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Takes bytes of the body; returns how many belong to it (all, unless it ends within `input`).
    pub(super) fn feed(&mut self, input: &[u8]) -> Result<usize, ChunkError> {
        self.feed_with(input, |_| {})
    }

    /// [`Chunked::feed`], handing `data` the range of `input` each piece of chunk data takes (for a client that
    /// needs the body decoded, not relayed as it came).
    pub(super) fn feed_with(
        &mut self,
        input: &[u8],
        mut data: impl FnMut(std::ops::Range<usize>),
    ) -> Result<usize, ChunkError> {
        use ChunkState::*;
        self.trailers_at = None;
        let mut i = 0;
        while i < input.len() && self.state != Done {
            if self.state == Data {
                let k = (input.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                self.size -= k as u64;
                if k > 0 {
                    data(i..i + k);
                }
                i += k;
                if self.size == 0 {
                    self.state = DataCr;
                }
                continue;
            }
            let b = input[i];
            i += 1;
            self.state = match (self.state, b) {
                (Size, b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F') if self.digits < 16 => {
                    let d = (b as char).to_digit(16).ok_or(ChunkError)?;
                    self.size = self.size * 16 + u64::from(d);
                    self.digits += 1;
                    Size
                }
                (Size, b';' | b' ' | b'\t') if self.digits > 0 => Extension,
                (Size, b'\r') if self.digits > 0 => SizeLf,
                (Extension, b'\r') => SizeLf,
                (Extension, b) if b != b'\n' => Extension,
                (SizeLf, b'\n') if self.size == 0 => {
                    self.trailers_at = Some(i);
                    TrailerStart
                }
                (SizeLf, b'\n') => Data,
                (DataCr, b'\r') => DataLf,
                (DataLf, b'\n') => {
                    self.digits = 0;
                    Size
                }
                (TrailerStart, b'\r') => EndLf,
                (TrailerStart | Trailer, b) if b != b'\r' && b != b'\n' => Trailer,
                (Trailer, b'\r') => TrailerLf,
                (TrailerLf, b'\n') => TrailerStart,
                (EndLf, b'\n') => Done,
                _ => return Err(ChunkError),
            };
        }
        Ok(i)
    }
}
