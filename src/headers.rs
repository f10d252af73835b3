//! Header rules shared by both proxy paths (hyper's and the HTTP/1.1 relay in the proxy's relay module): reading
//! headers from either representation, which headers are connection-scoped, which client headers could claim an
//! identity, and which cookies are the gateway's own. One set of rules, so the two paths can't drift apart.

use std::borrow::Cow;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::Config;
use crate::store::User;

/// Read access to a message's headers: hyper's `HeaderMap` and the relay's parsed head alike.
pub trait Headers {
    /// Every value of the header `name` (given in lower case; matched case-insensitively), in order.
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a;

    /// The first value of `name`, when it is visible ASCII text.
    fn first_text<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        self.values(name).next().and_then(text)
    }
}

impl Headers for HeaderMap {
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.get_all(name).iter().map(http::HeaderValue::as_bytes)
    }
}

impl Headers for [httparse::Header<'_>] {
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.iter().filter(move |h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value)
    }
}

/// A header value as text, under the rule of `http::HeaderValue::to_str`: visible ASCII, space and tab only.
pub fn text(v: &[u8]) -> Option<&str> {
    // No early exit, so the check vectorises; the hot path reads long cookie values with it.
    let visible = v.iter().fold(true, |ok, &b| ok & ((b' '..=b'~').contains(&b) | (b == b'\t')));
    if visible { std::str::from_utf8(v).ok() } else { None }
}

/// Every cookie pair of the Cookie headers (RFC 6265 §5.4) as (name, pair), both trimmed; a header value that
/// isn't text is skipped whole, as `HeaderValue::to_str` would.
pub fn cookie_pairs<'a, H: Headers + ?Sized>(headers: &'a H) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
    headers.values("cookie").filter_map(text).flat_map(|rest| CookiePairs { rest })
}

/// Splits one Cookie value at `;` by bytes: it runs on every proxied request, over long signed values.
struct CookiePairs<'a> {
    rest: &'a str,
}

impl<'a> Iterator for CookiePairs<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        while !self.rest.is_empty() {
            // `;` and `=` are ASCII, so splitting at them stays on character boundaries.
            let (pair, tail) = match memchr::memchr(b';', self.rest.as_bytes()) {
                Some(i) => (&self.rest[..i], &self.rest[i + 1..]),
                None => (self.rest, ""),
            };
            self.rest = tail;
            let pair = pair.trim_ascii();
            if !pair.is_empty() {
                let name = memchr::memchr(b'=', pair.as_bytes()).map_or(pair, |i| pair[..i].trim_ascii());
                return Some((name, pair));
            }
        }
        None
    }
}

/// The comma-separated tokens of every value of `name` (RFC 9110 §5.6.1 lists), trimmed, empty ones skipped.
pub fn tokens<'a, H: Headers + ?Sized>(headers: &'a H, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
    headers.values(name).flat_map(|v| v.split(|&b| b == b',')).map(<[u8]>::trim_ascii).filter(|t| !t.is_empty())
}

/// Whether `token` is in the list header `name`, ignoring ASCII case.
pub fn has_token<H: Headers + ?Sized>(headers: &H, name: &str, token: &str) -> bool {
    tokens(headers, name).any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the legacy Keep-Alive and
/// Proxy-Connection. Headers named in Connection are hop-by-hop too.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "keep-alive",
    "proxy-connection",
];

/// The names a message's Connection header lists (RFC 9110 §7.6.1), gathered once per message.
pub struct Listed<'a>(Vec<&'a [u8]>);

impl<'a> Listed<'a> {
    /// The Connection tokens of a message (no allocation when it has none).
    pub fn of<H: Headers + ?Sized>(headers: &'a H) -> Listed<'a> {
        Listed(tokens(headers, "connection").collect())
    }

    /// Whether Connection lists `token` (`close`, `upgrade`…), ignoring ASCII case.
    pub fn has(&self, token: &str) -> bool {
        self.0.iter().any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
    }
}

/// Whether a header is connection-scoped: a fixed hop-by-hop name or one the message's Connection header lists.
pub fn is_hop_by_hop(listed: &Listed<'_>, name: &[u8]) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
        || listed.0.iter().any(|t| t.eq_ignore_ascii_case(name))
}

/// Identity header families always removed from client requests (`_` variants are folded to `-` first).
const SPOOFABLE_PREFIXES: &[&str] = &["remote-", "x-auth-request-"];
const SPOOFABLE_NAMES: &[&str] = &[
    "x-forwarded-user",
    "x-forwarded-email",
    "x-forwarded-groups",
    "x-forwarded-preferred-username",
    "x-remote-user",
    "x-user",
    "x-email",
];

/// A header-name byte as PHP, CGI and WSGI backends read it: case folded, `_` and `.` as `-` (they turn
/// `Remote.User`, `Remote_User` and `Remote-User` alike into `HTTP_REMOTE_USER`).
fn fold(b: u8) -> u8 {
    if b == b'_' || b == b'.' { b'-' } else { b.to_ascii_lowercase() }
}

/// Whether `name` reads as `canonical` (lower case, `-`) once folded ([`fold`]).
fn folds_to(name: &[u8], canonical: &str) -> bool {
    name.len() == canonical.len() && name.iter().zip(canonical.bytes()).all(|(&a, b)| fold(a) == b)
}

/// Whether a client-sent header could claim an identity: the configured identity names and the usual families,
/// in any case, with `_` and `.` read as `-` (oauth2-proxy CVE-2025-64484, Traefik CVE-2026-88011). Such
/// headers never reach an app.
pub fn is_identity_header(config: &Config, name: &[u8]) -> bool {
    let same = |a: &[u8], b: &[u8]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| fold(*x) == fold(*y));
    let h = &config.headers;
    let configured = [&h.user.0, &h.email.0, &h.name.0, &h.groups.0];
    // Most names (host, accept, cookie…) start with a letter no identity name starts with.
    let first = name.first().map_or(0, |b| fold(*b));
    if first != b'r' && first != b'x' && !configured.iter().any(|c| c.as_str().bytes().next().map(fold) == Some(first))
    {
        return false;
    }
    SPOOFABLE_PREFIXES.iter().any(|p| name.len() >= p.len() && same(&name[..p.len()], p.as_bytes()))
        || SPOOFABLE_NAMES.iter().any(|s| same(name, s.as_bytes()))
        || configured.iter().any(|c| same(name, c.as_str().as_bytes()))
}

/// Headers the gateway sets itself; a client's copy never passes (X-Forwarded-For is extended). Content-Length
/// is written from the body's framing, in its canonical form.
const SET_BY_US: &[&str] = &["cookie", "host", "x-forwarded-for", "x-forwarded-proto", "x-real-ip", "content-length"];
/// Forwarding headers believed only from a trusted proxy (with every other `X-Forwarded-*`).
const TRUSTED_ONLY: &[&str] = &["forwarded"];

/// Whether a client request header goes upstream as it came. The rest are connection-scoped, could claim an
/// identity, are rebuilt by [`ForwardedHeaders`] and the identity headers, or are believed from trusted proxies
/// only (RFC 7239 `Forwarded`, `X-Forwarded-Host`, `X-Forwarded-Prefix`…). A name that reads as one of those
/// once `_` and `.` are folded to `-` (`X_Forwarded_For`, `Content_Length`, `X.Real.IP`) never passes: a backend
/// that folds names would take it for the real one.
pub fn passes_upstream(config: &Config, listed: &Listed<'_>, name: &[u8], trusted: bool) -> bool {
    let named = |list: &[&str]| list.iter().any(|h| folds_to(name, h));
    let forwarding = name.len() > 12 && name[..12].iter().zip(b"x-forwarded-").all(|(&a, &b)| fold(a) == b);
    let variant = name.iter().any(|&b| b == b'_' || b == b'.');
    let guarded = HOP_BY_HOP.iter().any(|h| folds_to(name, h)) || named(TRUSTED_ONLY) || forwarding;
    !(is_hop_by_hop(listed, name)
        || is_identity_header(config, name)
        || named(SET_BY_US)
        || (guarded && (variant || !trusted)))
}

/// Whether an upstream response header goes back to the client: not connection-scoped, and no Set-Cookie that
/// would replace one of the gateway's cookies.
pub fn passes_downstream(listed: &Listed<'_>, name: &[u8], value: &[u8], own: &[&str]) -> bool {
    if is_hop_by_hop(listed, name) {
        return false;
    }
    if name.eq_ignore_ascii_case(b"set-cookie") {
        let cookie = value.split(|&b| b == b'=').next().unwrap_or_default().trim_ascii();
        return !own.iter().any(|o| o.as_bytes() == cookie);
    }
    true
}

/// The client's cookies minus the gateway's own, as one Cookie value (`None` when nothing is left).
pub fn foreign_cookies<H: Headers + ?Sized>(request: &H, own: &[&str]) -> Option<String> {
    Some(split_cookies(request, own, |_, _| {})).filter(|kept| !kept.is_empty())
}

/// One pass over the Cookie headers: `ours(name, value)` sees each of the gateway's own cookies, and the others
/// come back joined as one Cookie value for the app (empty when there are none).
pub fn split_cookies<'a, H: Headers + ?Sized>(
    request: &'a H,
    own: &[&str],
    mut ours: impl FnMut(&'a str, &'a str),
) -> String {
    let mut kept = String::new();
    for (name, pair) in cookie_pairs(request) {
        if own.contains(&name) {
            if let Some(value) = cookie_value(pair) {
                ours(name, value);
            }
        } else {
            if !kept.is_empty() {
                kept.push_str("; ");
            }
            kept.push_str(pair);
        }
    }
    kept
}

/// The value of a `name=value` cookie pair, trimmed (`None` without `=`).
pub fn cookie_value(pair: &str) -> Option<&str> {
    pair.split_once('=').map(|(_, v)| v.trim())
}

/// The Content-Length of a message (RFC 9110 §8.6): `Ok(None)` when there is none; one number however it was
/// written (`056`, `3, 3`, repeated headers that agree); an error for anything else (a sign, a non-digit, values
/// that disagree), which no side may guess at.
pub fn content_length<H: Headers + ?Sized>(headers: &H) -> Result<Option<u64>, &'static str> {
    let mut length = None;
    for t in tokens(headers, "content-length") {
        let n = std::str::from_utf8(t)
            .ok()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or("malformed Content-Length")?;
        if length.is_some_and(|l| l != n) {
            return Err("conflicting Content-Length values");
        }
        length = Some(n);
    }
    if length.is_none() && headers.values("content-length").next().is_some() {
        return Err("empty Content-Length");
    }
    Ok(length)
}

/// How a response body ends (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: HEAD, 204, 304.
    Empty,
    /// Content-Length.
    Length(u64),
    /// Transfer-Encoding: chunked.
    Chunked,
    /// Neither: the body ends when the app closes the connection.
    UntilClose,
}

/// The body's framing from a response head (RFC 9112 §6.3), the one rule both proxy paths apply. Ambiguous
/// framing — Content-Length beside Transfer-Encoding, lengths that disagree, a transfer coding other than chunked
/// last — is an error: it is how response splitting starts, and the client would have to guess (§6.3 allows
/// treating it as one; hyper's client would accept the first and the third).
pub fn response_framing<H: Headers + ?Sized>(hs: &H, status: u16, head_request: bool) -> Result<Framing, &'static str> {
    if head_request || status == 204 || status == 304 {
        return Ok(Framing::Empty);
    }
    let has_length = hs.values("content-length").next().is_some();
    if hs.values("transfer-encoding").next().is_some() {
        if has_length {
            return Err("both Transfer-Encoding and Content-Length");
        }
        return match tokens(hs, "transfer-encoding").last() {
            Some(t) if t.eq_ignore_ascii_case(b"chunked") => Ok(Framing::Chunked),
            _ => Err("a transfer coding other than chunked"),
        };
    }
    if !has_length {
        return Ok(Framing::UntilClose);
    }
    match content_length(hs)? {
        Some(n) => Ok(Framing::Length(n)),
        None => Err("empty Content-Length"),
    }
}

/// Whether a GET or HEAD request carries a body: a non-zero Content-Length, any Transfer-Encoding, or (HTTP/2)
/// data after the head. Such a body means nothing (RFC 9110 §9.3.1), and an app that never reads it would parse it
/// as the next request on the connection, with whatever identity headers it claims.
pub fn bodyless_method_with_body<B: http_body::Body>(req: &http::Request<B>) -> bool {
    if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
        return false;
    }
    let h = req.headers();
    let zero = |v: &[u8]| !v.is_empty() && v.iter().all(|&b| b == b'0');
    h.contains_key(http::header::TRANSFER_ENCODING)
        || h.get_all(http::header::CONTENT_LENGTH).iter().any(|v| !zero(v.as_bytes()))
        || !req.body().is_end_stream()
}

/// How a request reached us: what the forwarding headers are made from.
#[derive(Debug, Clone, Copy)]
pub struct Via {
    /// The client's address (the peer, or what a trusted proxy says).
    pub client: std::net::IpAddr,
    /// The TCP peer's address.
    pub peer: std::net::IpAddr,
    /// Whether the peer is a trusted proxy.
    pub trusted: bool,
    /// Whether the client used https.
    pub https: bool,
}

/// The forwarding headers sent upstream, worked out once for both proxy paths.
pub struct ForwardedHeaders<'a> {
    /// X-Forwarded-For: a trusted proxy's chain extended with the peer, or just the peer.
    pub forwarded_for: Cow<'a, str>,
    /// X-Forwarded-Proto.
    pub proto: &'static str,
    /// X-Forwarded-Host, when the request doesn't carry a trusted one.
    pub host: Option<&'a str>,
    /// X-Real-IP: the client's address.
    pub real_ip: Cow<'a, str>,
}

impl<'a> ForwardedHeaders<'a> {
    /// The forwarding headers for a request from the client at `client_addr` (over https or not) through the
    /// peer whose address reads `peer_ip`; `trusted`: the peer is one of our trusted proxies.
    pub fn new<H: Headers + ?Sized>(
        request: &'a H,
        via: Via,
        peer_ip: &'a str,
        host: Option<&'a str>,
    ) -> ForwardedHeaders<'a> {
        let forwarded_for = match request.first_text("x-forwarded-for") {
            Some(prior) if via.trusted => Cow::Owned(format!("{prior}, {peer_ip}")),
            _ => Cow::Borrowed(peer_ip),
        };
        let keeps_host = via.trusted && request.values("x-forwarded-host").next().is_some();
        let real_ip = if via.client == via.peer { Cow::Borrowed(peer_ip) } else { Cow::Owned(via.client.to_string()) };
        ForwardedHeaders {
            forwarded_for,
            proto: if via.https { "https" } else { "http" },
            host: if keeps_host { None } else { host },
            real_ip,
        }
    }

    /// The headers as name/value pairs.
    pub fn pairs(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            Some(("x-forwarded-for", &*self.forwarded_for)),
            Some(("x-forwarded-proto", self.proto)),
            self.host.map(|h| ("x-forwarded-host", h)),
            Some(("x-real-ip", &*self.real_ip)),
        ]
        .into_iter()
        .flatten()
    }
}

/// The identity headers for a user, from the session only; control characters (which can't appear in headers)
/// are dropped from the values.
pub fn identity<'u>(config: &'u Config, user: &'u User) -> [(&'u HeaderName, Cow<'u, str>); 4] {
    let clean = |s: Cow<'u, str>| {
        if s.chars().any(char::is_control) { Cow::Owned(s.chars().filter(|c| !c.is_control()).collect()) } else { s }
    };
    let h = &config.headers;
    [
        (&h.user.0, clean(Cow::Borrowed(&user.username))),
        (&h.email.0, clean(Cow::Borrowed(&user.email))),
        (&h.name.0, clean(Cow::Borrowed(&user.display_name))),
        (&h.groups.0, clean(Cow::Owned(user.groups.join(",")))),
    ]
}

/// Removes every client-sent identity header ([`is_identity_header`]).
pub fn strip_identity_headers(config: &Config, headers: &mut HeaderMap) {
    let spoofable = |name: &HeaderName| is_identity_header(config, name.as_str().as_bytes());
    if !headers.keys().any(spoofable) {
        return;
    }
    let doomed: Vec<HeaderName> = headers.keys().filter(|n| spoofable(n)).cloned().collect();
    for name in doomed {
        headers.remove(&name);
    }
}

/// Adds the identity headers from the session's user.
pub fn set_identity(headers: &mut HeaderMap, config: &Config, user: &User) {
    for (name, value) in identity(config, user) {
        if let Ok(v) = HeaderValue::from_str(&value).or_else(|_| HeaderValue::from_bytes(value.as_bytes())) {
            headers.insert(name.clone(), v);
        }
    }
}

/// The `Sec-WebSocket-Accept` an app must answer a WebSocket handshake with (RFC 6455 §4.2.2 item 5.4): the base64
/// SHA-1 of the client's one `Sec-WebSocket-Key` and the protocol's GUID; `None` without exactly one key.
pub fn websocket_accept<Q: Headers + ?Sized>(request: &Q) -> Option<String> {
    use base64::Engine;
    use sha1::Digest;
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut keys = request.values("sec-websocket-key");
    let (Some(key), None) = (keys.next(), keys.next()) else { return None };
    let mut sha = sha1::Sha1::new();
    sha.update(key.trim_ascii());
    sha.update(GUID);
    Some(base64::engine::general_purpose::STANDARD.encode(sha.finalize()))
}

/// Whether an app's `101` answer completes the handshake whose expected accept value is `want`, checked as a client
/// must (RFC 6455 §4.1): one `Sec-WebSocket-Accept`, equal to it. Anything else is an app that didn't take the
/// upgrade (it may go on speaking HTTP), so no tunnel may open: what the client sent next would reach the app
/// unfiltered.
pub fn websocket_accepted<R: Headers + ?Sized>(want: Option<&str>, response: &R) -> bool {
    let mut accepts = response.values("sec-websocket-accept");
    match (want, accepts.next(), accepts.next()) {
        (Some(want), Some(accept), None) => accept.trim_ascii() == want.as_bytes(),
        _ => false,
    }
}

/// The request's host: the URI authority (HTTP/2) or the Host header.
pub fn request_host<B>(req: &http::Request<B>) -> Option<String> {
    host_of(req.uri(), req.headers())
}

/// The host from a URI authority or, failing that, a Host header.
pub fn host_of(uri: &http::Uri, headers: &HeaderMap) -> Option<String> {
    uri.authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| headers.get(http::header::HOST).and_then(|v| v.to_str().ok()).map(str::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn parsed<'b>(raw: &'b [u8], store: &'b mut [httparse::Header<'b>]) -> &'b [httparse::Header<'b>] {
        let mut req = httparse::Request::new(store);
        assert!(req.parse(raw).unwrap().is_complete());
        req.headers
    }

    #[test]
    fn websocket_accept_follows_rfc_6455_and_nothing_else() {
        // RFC 6455 §1.3's example.
        let mut req = HeaderMap::new();
        req.insert("sec-websocket-key", HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="));
        let answer = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("sec-websocket-accept", HeaderValue::from_static(v));
            h
        };
        let want = websocket_accept(&req);
        assert_eq!(want.as_deref(), Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
        assert!(websocket_accepted(want.as_deref(), &answer("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")));
        assert!(!websocket_accepted(want.as_deref(), &answer("s3pPLMBiTxaQ9kYGzzhZRbK+xOO=")));
        assert!(!websocket_accepted(want.as_deref(), &HeaderMap::new()), "no accept");
        assert_eq!(websocket_accept(&HeaderMap::new()), None, "no key");
        assert!(!websocket_accepted(None, &answer("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")), "no key");
        let mut two = answer("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        two.append("sec-websocket-accept", HeaderValue::from_static("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
        assert!(!websocket_accepted(want.as_deref(), &two), "two accepts");
        let mut keys = req.clone();
        keys.append("sec-websocket-key", HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="));
        assert_eq!(websocket_accept(&keys), None, "two keys");
    }

    #[test]
    fn hop_by_hop_includes_connection_listed_names_in_both_representations() {
        let raw =
            b"GET / HTTP/1.1\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nTE: trailers\r\nX-Kept: 1\r\n\r\n";
        let mut store = [httparse::EMPTY_HEADER; 8];
        let parsed = parsed(raw, &mut store);
        let h = &Listed::of(parsed);
        let mut map = HeaderMap::new();
        map.insert("connection", HeaderValue::from_static("keep-alive, x-secret"));
        let map = &Listed::of(&map);
        for name in [&b"x-secret"[..], b"X-SECRET", b"te", b"Keep-Alive", b"connection", b"proxy-connection"] {
            assert!(is_hop_by_hop(h, name), "{}", String::from_utf8_lossy(name));
            assert!(is_hop_by_hop(map, name));
        }
        assert!(!is_hop_by_hop(h, b"x-kept"));
        assert!(!is_hop_by_hop(map, b"x-kept"));
    }

    #[test]
    fn own_cookies_are_not_forwarded_and_upstream_cannot_set_them() {
        let mut map = HeaderMap::new();
        map.append("cookie", HeaderValue::from_static("a=1; portcullis_session=x"));
        map.append("cookie", HeaderValue::from_static("portcullis_session_csrf=y; b=2"));
        let own = ["portcullis_session", "portcullis_session_csrf"];
        assert_eq!(foreign_cookies(&map, &own).as_deref(), Some("a=1; b=2"));
        let only_ours =
            HeaderMap::from_iter([(http::header::COOKIE, HeaderValue::from_static("portcullis_session=x"))]);
        assert_eq!(foreign_cookies(&only_ours, &own), None);
        let empty = HeaderMap::new();
        let none = Listed::of(&empty);
        assert!(!passes_downstream(&none, b"Set-Cookie", b"portcullis_session=evil; Path=/", &own));
        assert!(passes_downstream(&none, b"set-cookie", b"app=1", &own));
        assert!(!passes_downstream(&none, b"Transfer-Encoding", b"chunked", &own));
    }

    #[test]
    fn identity_headers_are_caught_in_any_case_and_with_underscores() {
        let config: Config =
            toml::from_str("[[app]]\nhost = \"*\"\nupstream = \"http://127.0.0.1:1\"\n\n[headers]\nuser = \"_who\"\n")
                .unwrap();
        for spoof in
            ["Remote-User", "REMOTE_EMAIL", "x-auth-request-user", "X_Forwarded_User", "x-email", "-WHO", "_who"]
        {
            assert!(is_identity_header(&config, spoof.as_bytes()), "{spoof}");
        }
        for fine in ["host", "accept", "x-forwarded-for", "x-request-id", "referer", "who"] {
            assert!(!is_identity_header(&config, fine.as_bytes()), "{fine}");
        }
    }

    #[test]
    fn cookie_pairs_split_like_the_rfc_says() {
        let mut map = HeaderMap::new();
        map.append("cookie", HeaderValue::from_static(" a=1;b = 2 ;; flag ; =x;c=d=e"));
        map.append("cookie", HeaderValue::from_bytes(b"bad=\xff").unwrap());
        map.append("cookie", HeaderValue::from_static("z=9"));
        let pairs: Vec<_> = cookie_pairs(&map).collect();
        assert_eq!(pairs, [("a", "a=1"), ("b", "b = 2"), ("flag", "flag"), ("", "=x"), ("c", "c=d=e"), ("z", "z=9")]);
    }

    #[test]
    fn text_follows_header_value_to_str() {
        for v in [&b"plain"[..], b"tab\there", b"", b"caf\xc3\xa9", b"nul\0", b"del\x7f"] {
            let expected = HeaderValue::from_bytes(v).ok().and_then(|h| h.to_str().ok().map(str::to_string));
            assert_eq!(text(v).map(str::to_string), expected, "{v:?}");
        }
    }
}
