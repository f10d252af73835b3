//! Unit tests of the relay's parsing: chunked framing, response framing, request lengths, targets.

use super::*;

fn whole(body: &[u8]) -> Result<(usize, bool), ChunkError> {
    let mut c = Chunked::default();
    let n = c.feed(body)?;
    Ok((n, c.done()))
}

#[test]
fn chunked_framing_ends_where_the_body_ends_however_it_is_split() {
    let body = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-Trailer: 1\r\n\r\n";
    let mut input = body.to_vec();
    input.extend_from_slice(b"HTTP/1.1 200 OK\r\n"); // the next response must not be taken
    assert_eq!(whole(&input).unwrap(), (body.len(), true));
    for split in 0..=body.len() {
        let mut c = Chunked::default();
        let a = c.feed(&body[..split]).unwrap();
        assert_eq!(a, split);
        let b = c.feed(&input[split..]).unwrap();
        assert_eq!(a + b, body.len(), "split at {split}");
        assert!(c.done());
    }
    assert_eq!(whole(b"0\r\n\r\n").unwrap(), (5, true));
    assert_eq!(whole(b"10\r\n0123").unwrap(), (8, false));
}

#[test]
fn broken_chunked_framing_is_refused() {
    for bad in [
        &b"\r\n"[..],
        b"g\r\n",
        b"4\nWiki\r\n",
        b"4\r\nWikiX\r\n",
        b"4\r\nWiki\r\r",
        b"11111111111111111\r\n",
        b"0\r\n\n",
        b";\r\n",
        b"0\r\nTrailer\n",
    ] {
        assert!(whole(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
    }
}

fn head(raw: &str, head_request: bool) -> io::Result<Framing> {
    let mut slots = [httparse::EMPTY_HEADER; 16];
    let mut resp = httparse::Response::new(&mut slots);
    resp.parse(raw.as_bytes()).unwrap();
    let status = resp.code.unwrap();
    framing(resp.headers, status, head_request)
}

#[test]
fn response_framing_follows_rfc_9112_and_refuses_ambiguity() {
    assert_eq!(head("HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n", false).unwrap(), Framing::Length(12));
    assert_eq!(head("HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\n", false).unwrap(), Framing::Length(3));
    assert_eq!(head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", false).unwrap(), Framing::Chunked);
    assert_eq!(head("HTTP/1.1 200 OK\r\n\r\n", false).unwrap(), Framing::UntilClose);
    assert_eq!(head("HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n", true).unwrap(), Framing::Empty);
    assert_eq!(head("HTTP/1.1 304 Not Modified\r\nContent-Length: 12\r\n\r\n", false).unwrap(), Framing::Empty);
    assert_eq!(head("HTTP/1.1 204 No Content\r\n\r\n", false).unwrap(), Framing::Empty);
    for ambiguous in [
        "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: +3\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
    ] {
        assert!(head(ambiguous, false).is_err(), "{ambiguous:?}");
    }
}

#[test]
fn a_request_length_is_one_run_of_plain_digits() {
    let length = |values: &[&str]| {
        let hs: Vec<httparse::Header<'_>> =
            values.iter().map(|v| httparse::Header { name: "Content-Length", value: v.as_bytes() }).collect();
        request_length(&hs)
    };
    assert_eq!(length(&[]), Some(None));
    assert_eq!(length(&["0"]), Some(Some(0)));
    assert_eq!(length(&["0012"]), Some(Some(12)));
    assert_eq!(length(&["9999999999999999999"]), Some(Some(9_999_999_999_999_999_999)));
    // Everything a parser could read two ways is hyper's (RFC 9112 §6.3: several lengths, lists, signs).
    for odd in [
        &["1", "1"][..],
        &["1, 1"],
        &["+1"],
        &["-1"],
        &[" 1"],
        &["1 "],
        &[""],
        &["0x1"],
        &["1e3"],
        &["99999999999999999999"],
        &["١"],
    ] {
        assert_eq!(length(odd), None, "{odd:?}");
    }
}

#[test]
fn relay_targets_are_plain() {
    assert!("/wiki/Main_Page?action=edit&x=%20".bytes().all(plain_target_byte));
    for odd in ["/a b", "/a#b", "/a\\b", "/\"x", "/é", "/{x}", "/a|b", "/a^b", "/a`b", "/<x>"] {
        assert!(!odd.bytes().all(plain_target_byte), "{odd}");
    }
}

#[test]
fn the_upstream_client_writes_one_framing_for_the_request_body() {
    let head = |method: &str, empty: bool, exact: Option<u64>| {
        let mut req = http::Request::builder().method(method).uri("/p?q=1");
        req = req.header("content-length", "999").header("transfer-encoding", "gzip").header("x-a", "1");
        let (parts, ()) = req.body(()).unwrap().into_parts();
        let mut out = Vec::new();
        let framing = client::request_head(&parts, empty, exact, &mut out);
        (framing, String::from_utf8(out).unwrap())
    };
    let (f, text) = head("GET", true, Some(0));
    assert_eq!(f, client::RequestBody::None);
    assert_eq!(text, "GET /p?q=1 HTTP/1.1\r\nx-a: 1\r\n\r\n", "the client's framing headers never pass");
    let (f, text) = head("POST", true, Some(0));
    assert_eq!((f, text.ends_with("x-a: 1\r\ncontent-length: 0\r\n\r\n")), (client::RequestBody::None, true), "{text}");
    let (f, text) = head("PUT", false, Some(300));
    assert_eq!((f, text.ends_with("content-length: 300\r\n\r\n")), (client::RequestBody::Length(300), true), "{text}");
    let (f, text) = head("POST", false, None);
    assert_eq!(f, client::RequestBody::Chunked);
    assert!(text.ends_with("x-a: 1\r\ntransfer-encoding: chunked\r\n\r\n"), "{text}");
}

#[test]
fn the_upstream_client_reads_heads_under_the_relays_rules() {
    let parse = |raw: &str, upgrade: bool| {
        let mut buf = BytesMut::from(raw);
        client::parse_head(&mut buf, false, upgrade)
            .map(|h| h.map(|h| (h.response.status.as_u16(), h.framing, h.reusable, buf.len())))
    };
    // Interim answers are skipped; what follows the head stays in the buffer.
    assert_eq!(
        parse("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", false).unwrap(),
        Some((200, Framing::Length(3), true, 3))
    );
    assert_eq!(parse("HTTP/1.1 200 OK\r\nContent-Le", false).unwrap(), None, "partial");
    assert_eq!(
        parse("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false).unwrap(),
        Some((200, Framing::Length(1), false, 0))
    );
    assert_eq!(
        parse("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", false).unwrap(),
        Some((200, Framing::UntilClose, false, 0))
    );
    assert_eq!(
        parse("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\nxy", true).unwrap(),
        Some((101, Framing::Empty, true, 2))
    );
    assert!(parse("HTTP/1.1 101 Switching Protocols\r\n\r\n", false).is_err(), "101 to a request that asked for none");
    assert!(
        parse("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", false).is_err(),
        "ambiguous"
    );
    assert!(parse("HTTP/1.1 200 OK\r\nX: \x01\r\n\r\n", false).is_err(), "malformed");
}

#[test]
fn the_upstream_clients_trailers_keep_every_valid_field() {
    let map = client::parse_trailers(b"X-Checksum: abc\r\nbad line\r\nX-Two:  2 \r\n\r\n");
    assert_eq!(map.len(), 2);
    assert_eq!(map["x-checksum"], "abc");
    assert_eq!(map["x-two"], "2");
}

#[test]
fn one_pass_over_the_request_headers_finds_what_sends_a_request_to_hyper() {
    let hs = |pairs: &[(&'static str, &'static str)]| -> Vec<httparse::Header<'static>> {
        pairs.iter().map(|(n, v)| httparse::Header { name: n, value: v.as_bytes() }).collect()
    };
    assert!(Scan::of(&hs(&[("Transfer-Encoding", "chunked")])).is_none());
    assert!(Scan::of(&hs(&[("expect", "100-continue")])).is_none());
    let one = hs(&[("HOST", "a"), ("Upgrade", " WebSocket "), ("X-Long-Header-Name", "1")]);
    let s = Scan::of(&one).unwrap();
    assert_eq!((s.host, s.hosts, s.upgrades, s.websocket), (Some(&b"a"[..]), 1, 1, true));
    let two = hs(&[("upgrade", "websocket"), ("upgrade", "websocket"), ("host", "a"), ("host", "b")]);
    let s = Scan::of(&two).unwrap();
    assert_eq!((s.hosts, s.upgrades, s.websocket), (2, 2, false), "two upgrades are not one websocket");
    let other = hs(&[("upgrade", "h2c")]);
    let s = Scan::of(&other).unwrap();
    assert!(!s.websocket);
}
