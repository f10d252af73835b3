//! Fuzz properties for Portcullis, shared by the cargo-fuzz targets (fuzz/fuzz_targets/) and the CI corpus replay
//! (tests/it/fuzz_corpus.rs includes this file with `#[path]`). Each function takes raw fuzz input, calls the
//! function under test, and panics when a property fails.

use std::path::Path;

use http::{HeaderMap, HeaderValue, header::COOKIE};
use portcullis::keys::Keys;
use portcullis::session::{self, SessionId};

/// Session cookie name the targets use.
pub const SESSION_NAME: &str = "portcullis_session";
/// CSRF cookie name the targets use (the gateway's is `<session name>_csrf`).
pub const CSRF_NAME: &str = "portcullis_session_csrf";

/// The fixed keys every target uses, so a saved input replays the same way.
pub fn keys() -> Keys {
    Keys::from_master(&[7u8; 64])
}

/// The `name=value` pair of a `Set-Cookie` line, split into its value.
fn set_cookie_value(set_cookie: &str) -> String {
    let pair = set_cookie.split(';').next().unwrap_or_default();
    let (_, value) = pair.split_once('=').expect("Set-Cookie has name=value");
    value.to_string()
}

/// The signed value the gateway would set for session `id`.
pub fn session_value(keys: &Keys, id: &[u8; 32]) -> String {
    set_cookie_value(&session::session_cookie(keys, SESSION_NAME, &SessionId(*id), true))
}

/// The signed value the gateway would set for CSRF binding `binding`.
pub fn csrf_value(keys: &Keys, binding: &[u8; 32]) -> String {
    set_cookie_value(&session::csrf_cookie(keys, CSRF_NAME, binding, true))
}

fn cookie_headers(value: &[u8]) -> Option<HeaderMap> {
    let mut headers = HeaderMap::new();
    headers.append(COOKIE, HeaderValue::from_bytes(value).ok()?);
    Some(headers)
}

/// Decodes the header with both decoders; anything that verifies must be a value the gateway signed itself, present
/// verbatim in the header (no forgery, no malleable encodings), and of the right purpose.
fn check_decoders(keys: &Keys, headers: &HeaderMap, raw: &[u8]) {
    let contains = |needle: &str| raw.windows(needle.len()).any(|w| w == needle.as_bytes());
    if let Some(id) = session::session_id(keys, headers, SESSION_NAME) {
        let value = session_value(keys, &id.0);
        assert!(contains(&value), "session_id accepted a value the gateway never signed for that id");
    }
    if let Some(binding) = session::csrf_binding(keys, headers, CSRF_NAME) {
        let value = csrf_value(keys, &binding);
        assert!(contains(&value), "csrf_binding accepted a value the gateway never signed for that binding");
    }
    // A session cookie's value under the CSRF name (and the reverse) must never verify as the other purpose.
    assert!(session::csrf_binding(keys, headers, SESSION_NAME).is_none(), "csrf_binding accepted a session cookie");
    if let Some(id) = session::session_id(keys, headers, CSRF_NAME) {
        // Only possible if someone set a *session* value under the CSRF name; it must still be genuine.
        assert!(contains(&session_value(keys, &id.0)), "session_id under the CSRF name accepted a forged value");
    }
}

/// Cookie decoding. Input: a mode byte, then
/// - mode 0: the whole Cookie header;
/// - mode 1: a 32-byte id, then (position, byte) mutations applied to its genuine signed value;
/// - mode 2: a 32-byte id, then bytes split around its genuine `name=value` pair.
///
/// Properties: genuine cookies round-trip (`session_cookie` → `session_id`, `csrf_cookie` → `csrf_binding`), a
/// cookie never verifies as the other purpose, any mutation of a genuine value is refused, and whatever verifies
/// was signed by the gateway for exactly that id and appears verbatim in the header.
pub fn session_cookie(data: &[u8]) {
    let keys = keys();
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 3 {
        1 | 2 => {
            let mut id = [0u8; 32];
            let n = rest.len().min(32);
            id[..n].copy_from_slice(&rest[..n]);
            let tail = &rest[n..];
            let value = session_value(&keys, &id);
            let csrf = csrf_value(&keys, &id);

            // Round trips.
            let h = cookie_headers(format!("{SESSION_NAME}={value}").as_bytes()).expect("a signed value is a header");
            assert_eq!(session::session_id(&keys, &h, SESSION_NAME).map(|s| s.0), Some(id), "session round trip");
            assert_eq!(session::csrf_binding(&keys, &h, SESSION_NAME), None, "session value accepted as CSRF");
            let h = cookie_headers(format!("{CSRF_NAME}={csrf}").as_bytes()).expect("a signed value is a header");
            assert_eq!(session::csrf_binding(&keys, &h, CSRF_NAME), Some(id), "CSRF round trip");
            assert!(session::session_id(&keys, &h, CSRF_NAME).is_none(), "CSRF value accepted as a session");
            // The session value moved under the CSRF name still isn't a CSRF binding (the tag is signed).
            let h = cookie_headers(format!("{CSRF_NAME}={value}").as_bytes()).expect("a signed value is a header");
            assert_eq!(session::csrf_binding(&keys, &h, CSRF_NAME), None, "session value accepted as CSRF binding");

            if mode % 3 == 1 {
                let mut mutated = value.clone().into_bytes();
                for pair in tail.chunks_exact(2) {
                    let pos = pair[0] as usize % mutated.len();
                    mutated[pos] = pair[1];
                }
                if let Some(h) = cookie_headers(&[format!("{SESSION_NAME}=").as_bytes(), &mutated].concat()) {
                    if let Some(got) = session::session_id(&keys, &h, SESSION_NAME) {
                        let trimmed = std::str::from_utf8(&mutated).map(str::trim).unwrap_or_default();
                        assert_eq!(trimmed, value, "a mutated session cookie verified");
                        assert_eq!(got.0, id, "a mutated session cookie verified as another id");
                    }
                    check_decoders(&keys, &h, h.get(COOKIE).unwrap().as_bytes());
                }
            } else {
                let (before, after) = tail.split_at(tail.len() / 2);
                let raw = [before, format!("{SESSION_NAME}={value}").as_bytes(), after].concat();
                if let Some(h) = cookie_headers(&raw) {
                    check_decoders(&keys, &h, &raw);
                }
            }
        }
        _ => {
            if let Some(h) = cookie_headers(rest) {
                check_decoders(&keys, &h, rest);
            }
        }
    }
}

/// Form parsing: never panics, and a field sent first wins over any later repeat (the CSRF token can't be
/// overridden by appending a second `csrf=`).
pub fn form(data: &[u8]) {
    use portcullis::portal::form::Form;
    let Ok(form) = Form::parse(data) else { return };
    let _ = form.get("csrf");
    let prefixed = [b"csrf=first&".as_slice(), data].concat();
    let form = Form::parse(&prefixed).expect("a parseable body stays parseable behind another field");
    assert_eq!(form.get("csrf"), "first", "a later csrf field overrode the first");
}

/// Path normalisation: on `Ok(p)`, `p` starts with `/`, is a fixed point, has no `//`, no `.` or `..` segment, no
/// backslash, no control byte, and no encoded `/`, `\` or `%` (a second decode upstream must not change its meaning).
pub fn path(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let Ok(p) = portcullis::policy::normalize_path(s) else { return };
    assert!(p.starts_with('/'), "normalised path doesn't start with /: {p:?}");
    assert_eq!(portcullis::policy::normalize_path(&p).as_deref(), Ok(p.as_str()), "not idempotent: {s:?}");
    assert!(!p.contains("//"), "normalised path has //: {p:?}");
    assert!(!p[1..].split('/').any(|seg| seg == "." || seg == ".."), "normalised path has a dot segment: {p:?}");
    assert!(!p.contains('\\'), "normalised path has a backslash: {p:?}");
    assert!(!p.bytes().any(|b| b < 0x20 || b == 0x7f), "normalised path has a control byte: {p:?}");
    let lower = p.to_ascii_lowercase();
    for enc in ["%2f", "%5c", "%25"] {
        assert!(!lower.contains(enc), "normalised path keeps {enc}: {p:?}");
    }
}

/// Redirect validation: a target that passes is a local path (`/`, not `//` or `/\`), has no control byte or space,
/// and stays one after one, two and three percent-decodings.
pub fn redirect(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let Some(t) = portcullis::portal::redirect::safe_target(s) else { return };
    assert_eq!(t, s, "safe_target returned something other than its input");
    let local = |b: &[u8]| b.first() == Some(&b'/') && !matches!(b.get(1), Some(b'/') | Some(b'\\'));
    assert!(local(t.as_bytes()), "redirect target isn't a local path: {t:?}");
    assert!(
        !t.bytes().any(|b| b.is_ascii_control() || b == b' '),
        "redirect target has a control byte or space: {t:?}"
    );
    let mut layer = t.as_bytes().to_vec();
    for depth in 1..=3 {
        layer = percent_encoding::percent_decode(&layer).collect();
        assert!(local(&layer), "redirect target isn't local after {depth} decoding(s): {t:?} -> {layer:?}");
        assert!(!layer.contains(&b'\\'), "redirect target has a backslash after {depth} decoding(s): {t:?}");
    }
}

/// Config parsing never panics, and its error messages format.
pub fn config(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else { return };
    match portcullis::config::Config::parse(s, Path::new("fuzz.toml")) {
        Ok(c) => drop(format!("{c:?}")),
        Err(e) => drop(e.to_string()),
    }
}

/// relay_chunked: the relay's chunked-framing tracker (src/proxy/relay.rs) never panics; splitting the input
/// anywhere (the first byte picks where) gives the same answer as feeding it whole; it never claims more bytes than
/// it was given; and a body it calls complete ends exactly where a plain reference decoder of RFC 9112 §7.1 (same
/// strictness: CRLF only, at most 16 hex digits) says it ends.
pub fn relay_chunked(data: &[u8]) {
    use portcullis::proxy::relay::fuzzing;
    let Some((&pick, input)) = data.split_first() else {
        return;
    };
    let cut = usize::from(pick) * input.len() / 255;
    let whole = fuzzing::chunked(input, input.len());
    assert_eq!(fuzzing::chunked(input, cut), whole, "splitting at {cut} changed the answer");
    let reference = reference_chunked_len(input);
    // The decoding the upstream client does gives the reference decoder's data, however the input is split.
    let decoded = fuzzing::chunked_data(input, cut);
    match &reference {
        Ok(_) => assert_eq!(decoded, Some(reference_chunked_data(input)), "decoded data differs"),
        Err(_) => assert_eq!(decoded, None, "decoded a body the reference decoder doesn't end"),
    }
    match whole {
        (Some(n), true) => assert_eq!(reference, Ok(n), "the tracker ended the body at {n}"),
        (Some(n), false) => {
            assert_eq!(n, input.len(), "an unfinished body must take every byte");
            assert_eq!(reference, Err(true), "the reference decoder disagrees about an unfinished body");
        }
        (None, _) => assert_eq!(reference, Err(false), "the tracker refused framing the reference decoder accepts"),
    }
}

/// The length of the chunked body at the start of `b` (RFC 9112 §7.1): `Ok(len)`, `Err(true)` when it is a valid
/// but unfinished prefix, `Err(false)` when it is malformed.
fn reference_chunked_len(b: &[u8]) -> Result<usize, bool> {
    reference_chunked(b, &mut Vec::new())
}

/// The data of the complete chunked body at the start of `b`.
fn reference_chunked_data(b: &[u8]) -> Vec<u8> {
    let mut data = Vec::new();
    let _ = reference_chunked(b, &mut data);
    data
}

/// [`reference_chunked_len`], appending the chunks' data to `data`.
fn reference_chunked(b: &[u8], data: &mut Vec<u8>) -> Result<usize, bool> {
    // Whether `b[i..]` starts with `want`; Err(true) when `b` ends first on a matching prefix.
    let expect = |i: usize, want: &[u8]| -> Result<(), bool> {
        let have = b.get(i..).unwrap_or_default();
        let n = have.len().min(want.len());
        if have[..n] != want[..n] {
            return Err(false);
        }
        if n < want.len() { Err(true) } else { Ok(()) }
    };
    let mut i = 0;
    loop {
        let start = i;
        while i < b.len() && b[i].is_ascii_hexdigit() {
            i += 1;
        }
        let digits = &b[start..i];
        if digits.len() > 16 {
            return Err(false);
        }
        if i == b.len() {
            return Err(true);
        }
        if digits.is_empty() {
            return Err(false);
        }
        let size = u64::from_str_radix(std::str::from_utf8(digits).map_err(|_| false)?, 16).map_err(|_| false)?;
        if matches!(b[i], b';' | b' ' | b'\t') {
            while i < b.len() && b[i] != b'\r' && b[i] != b'\n' {
                i += 1;
            }
        }
        expect(i, b"\r\n")?;
        i += 2;
        if size == 0 {
            break;
        }
        let left = (b.len() - i) as u64;
        if size > left {
            return Err(true);
        }
        data.extend_from_slice(&b[i..i + size as usize]);
        i += size as usize;
        expect(i, b"\r\n")?;
        i += 2;
    }
    loop {
        if i == b.len() {
            return Err(true);
        }
        if b[i] == b'\r' {
            expect(i, b"\r\n")?;
            return Ok(i + 2);
        }
        while i < b.len() && b[i] != b'\r' && b[i] != b'\n' {
            i += 1;
        }
        expect(i, b"\r\n")?;
        i += 2;
    }
}

/// relay_response: the relay's reading of an app's response head never panics, and a head it accepts goes to the
/// client as one that httparse reads back whole, with the same status, no connection-scoped header but the framing
/// it chose itself, no Set-Cookie for the gateway's cookies, and the app's Date headers or else one of its own. (The
/// first byte's low bit makes it the answer to a HEAD.)
pub fn relay_response(data: &[u8]) {
    use portcullis::proxy::relay::fuzzing;
    let Some((&flags, input)) = data.split_first() else {
        return;
    };
    let own = [SESSION_NAME, CSRF_NAME];
    let Ok(Some((head, framing))) = fuzzing::response(input, flags & 1 == 1, &own) else {
        return;
    };
    let mut slots = [httparse::EMPTY_HEADER; 256];
    let mut parsed = httparse::Response::new(&mut slots);
    let n = match parsed.parse(&head) {
        Ok(httparse::Status::Complete(n)) => n,
        other => panic!("the client head doesn't parse ({other:?}): {:?}", String::from_utf8_lossy(&head)),
    };
    assert_eq!(n, head.len(), "bytes after the client head");
    // The app's final answer: interim 1xx heads before it are skipped, as the relay skips them.
    let mut rest = input;
    let (code, sent_dates) = loop {
        let mut slots = [httparse::EMPTY_HEADER; 256];
        let mut original = httparse::Response::new(&mut slots);
        let Ok(httparse::Status::Complete(n)) = original.parse(rest) else {
            panic!("the relay accepted a head httparse doesn't: {:?}", String::from_utf8_lossy(input));
        };
        if original.code.is_some_and(|c| c < 200) {
            rest = &rest[n..];
            continue;
        }
        let dates = original.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("date")).count();
        break (original.code, dates);
    };
    assert_eq!(parsed.code, code, "status changed");
    let count = |name: &str| parsed.headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name)).count();
    for h in parsed.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        match name.as_str() {
            "transfer-encoding" => assert!(framing == "chunked" && h.value == b"chunked", "{name} with {framing}"),
            "connection" => assert_eq!(h.value, b"close", "a Connection header other than ours"),
            "te"
            | "trailer"
            | "upgrade"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization" => panic!("connection-scoped {name} passed"),
            "set-cookie" => {
                let cookie = h.value.split(|&b| b == b'=').next().unwrap_or_default().trim_ascii();
                assert!(!own.iter().any(|o| o.as_bytes() == cookie), "the app set the gateway's cookie");
            }
            _ => {}
        }
    }
    assert_eq!(count("transfer-encoding"), usize::from(framing == "chunked"));
    // The app's Dates pass as sent; one is added only when it sent none.
    assert_eq!(count("date"), sent_dates.max(1), "Date headers: {} (the app sent {sent_dates})", count("date"));
    if framing == "close" {
        assert_eq!(count("connection"), 1, "a close-delimited answer must say connection: close");
    }
}
