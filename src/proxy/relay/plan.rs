//! Planning a request on the relay: its head parsed once, checked (target, framing, Host, upgrade), the policy
//! and session decided, and the upstream head written — or the reason it goes to the handlers or to hyper.

use super::*;

/// Bytes a request target may hold on the relay: RFC 3986 path and query characters (`pchar`, `/`, `?`). Anything
/// else (`#`, `\`, quotes, non-ASCII…) is left to hyper and the policy's full handling.
pub(super) fn plain_target_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b)
}

/// Parses a request head from `c.input` and, when the relay can take it, writes the upstream head into `c.out`.
/// Nothing here has effects that matter if hyper then handles the request instead.
pub(super) fn plan(gw: &impl State, c: &mut Conn, looked_up: bool) -> Planned {
    let Conn { input, out, peer, peer_ip, .. } = c;
    // Uninitialised slots: zeroing them would cost more than parsing a short head.
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(&mut req, input, &mut slots) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Planned::Partial,
        // Malformed, too many headers, or HTTP/2's preface: hyper answers it.
        Err(_) => return Planned::Handover,
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Planned::Handover;
    };
    let (head, idempotent) = match method {
        "GET" => (false, true),
        "HEAD" => (true, true),
        "POST" | "PUT" | "PATCH" | "DELETE" | "OPTIONS" => (false, false),
        _ => return Planned::Handover,
    };
    let hs: &[httparse::Header<'_>] = req.headers;
    // Origin form only (RFC 9112 §3.2.1); chunked bodies, upgrades and expectations need hyper's handling.
    if !target.starts_with('/') || !target.bytes().all(plain_target_byte) {
        return Planned::Handover;
    }
    let listed = headers::Listed::of(hs);
    let Some(scan) = Scan::of(hs) else {
        return Planned::Handover;
    };
    // A WebSocket opening handshake (RFC 6455 §4.1) is relayed; any other upgrade is hyper's.
    let websocket = scan.websocket && method == "GET" && listed.has("upgrade");
    if !websocket && (scan.upgrades > 0 || listed.has("upgrade")) {
        return Planned::Handover;
    }
    // A GET or HEAD body has no defined meaning (RFC 9110 §9.3.1): such a request is hyper's, as before.
    let Some(body) = scan.length().filter(|b| !idempotent || b.is_none()) else {
        return Planned::Handover;
    };
    let (Some(host), 1) = (scan.host.and_then(headers::text), scan.hosts) else {
        return Planned::Handover;
    };
    // From here on, a request the relay doesn't forward is the handlers' to answer on this connection (an upgrade
    // or a long body still goes to hyper).
    let local = || {
        let n = body.unwrap_or(0);
        if websocket || n > MAX_LOCAL_BODY {
            return Planned::Handover;
        }
        Local::of(method, target, hs, len, n, listed.has("close"))
            .map_or(Planned::Handover, |l| Planned::Local(Box::new(l)))
    };
    let (path, query) = target.split_once('?').map_or((target, None), |(p, q)| (p, Some(q)));
    if crate::policy::owns(gw.prefix(), path) {
        return local();
    }
    // A Host that is not a host has no app: the handlers answer it 400 (RFC 9112 §3.2).
    let app_index = crate::policy::find_app(&gw.config().apps, Some(host));
    let Ok(decision) = crate::policy::decide_for(gw.config(), app_index, path) else {
        return local();
    };
    if gw.upstreams().relay(decision.app).is_none() {
        return local();
    }
    let app = &gw.config().apps[decision.app];
    // One pass over the cookies: the session's values for the cache, the app's for the upstream.
    let own = gw.own_cookies();
    let mut sessions = [""; crate::session::MAX_SESSION_COOKIES];
    let mut found = 0;
    let foreign = headers::split_cookies(hs, &own, |name, value| {
        if name == own[0] {
            if let Some(slot) = sessions.get_mut(found) {
                *slot = value;
            }
            found += 1;
        }
    });
    if found > sessions.len() {
        return local();
    }
    let session = match decision.policy.needs_session() {
        true => match gw.sessions().cached_of(sessions[..found].iter().copied()) {
            Ok(CacheAnswer::Hit(auth)) => Some(auth),
            Ok(CacheAnswer::Miss(_)) if looked_up => return local(),
            Ok(CacheAnswer::Miss(revision)) => {
                return Planned::Lookup(sessions[..found].iter().map(|s| s.to_string()).collect(), revision);
            }
            _ => return local(),
        },
        false => None,
    };
    let held = session.as_ref().map(|a| (a.record.level, a.user.groups.as_slice()));
    // Whatever isn't forwarded (a login page, a refusal) is the handlers' to answer: they ask the same question.
    let Admission::Pass { identity } = admit(app, decision.policy, held) else {
        return local();
    };
    let (id, user) = session.filter(|_| identity).map(|a| (a.id, a.user)).unzip();
    let client = gw.client(*peer, hs);

    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(decision.path.as_bytes());
    if let Some(q) = query {
        out.push(b'?');
        out.extend_from_slice(q.as_bytes());
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    put_header(out, b"host", host.as_bytes());
    for h in hs {
        if !(body.is_some() && h.name.eq_ignore_ascii_case("content-length"))
            && headers::passes_upstream(gw.config(), &listed, h.name.as_bytes(), client.trusted)
        {
            put_header(out, h.name.as_bytes(), h.value);
        }
    }
    // The length in its one canonical form (a Connection header naming it can't remove it).
    if let Some(n) = body {
        put_header(out, b"content-length", n.to_string().as_bytes());
    }
    if !foreign.is_empty() {
        put_header(out, b"cookie", foreign.as_bytes());
    }
    if websocket {
        out.extend_from_slice(b"connection: upgrade\r\nupgrade: websocket\r\n");
    }
    for (name, value) in ForwardedHeaders::new(hs, client.via(), peer_ip, Some(host)).pairs() {
        put_header(out, name.as_bytes(), value.as_bytes());
    }
    if let Some(user) = &user {
        for (name, value) in headers::identity(gw.config(), user) {
            put_header(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    out.extend_from_slice(b"\r\n");
    let who = Affinity::of(app.shared_connections, user.as_ref());
    let body = body.unwrap_or(0);
    let retry = idempotent && body == 0;
    let upgrade = websocket.then_some(id);
    let accept = if websocket { headers::websocket_accept(hs) } else { None };
    let close = listed.has("close");
    Planned::Forward(Forward { app: decision.app, len, head, body, retry, close, who, upgrade, accept, user })
}

/// The request headers that decide whether and how the relay takes a request, read in one pass.
pub(super) struct Scan<'h> {
    pub(super) host: Option<&'h [u8]>,
    pub(super) hosts: usize,
    pub(super) length: Option<&'h [u8]>,
    pub(super) lengths: usize,
    pub(super) upgrades: usize,
    /// The one Upgrade header is `websocket`.
    pub(super) websocket: bool,
}

impl<'h> Scan<'h> {
    /// `None` when a header sends the request to hyper whatever the rest says: a `Transfer-Encoding` (chunked
    /// bodies are hyper's to parse) or an `Expect`.
    pub(super) fn of(hs: &'h [httparse::Header<'_>]) -> Option<Scan<'h>> {
        let mut scan = Scan { host: None, hosts: 0, length: None, lengths: 0, upgrades: 0, websocket: false };
        for h in hs {
            let n = h.name.as_bytes();
            // The length first: most names are told apart without comparing a byte.
            match n.len() {
                4 if n.eq_ignore_ascii_case(b"host") => {
                    scan.hosts += 1;
                    scan.host = Some(h.value);
                }
                6 if n.eq_ignore_ascii_case(b"expect") => return None,
                7 if n.eq_ignore_ascii_case(b"upgrade") => {
                    scan.upgrades += 1;
                    scan.websocket = scan.upgrades == 1 && h.value.trim_ascii().eq_ignore_ascii_case(b"websocket");
                }
                14 if n.eq_ignore_ascii_case(b"content-length") => {
                    scan.lengths += 1;
                    scan.length = Some(h.value);
                }
                17 if n.eq_ignore_ascii_case(b"transfer-encoding") => return None,
                _ => {}
            }
        }
        Some(scan)
    }

    /// The body's length from the one `Content-Length` (RFC 9112 §6.2, §6.3): `Some(None)` without one, `None`
    /// when the relay leaves it to hyper — several, a list, or anything but 1 to 19 plain digits.
    pub(super) fn length(&self) -> Option<Option<u64>> {
        let Some(v) = self.length else {
            return Some(None);
        };
        if self.lengths > 1 || v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(v).ok()?.parse().ok().map(Some)
    }
}

/// A request's body length ([`Scan::length`]) as the relay reads it from `hs`.
#[cfg(test)]
pub(super) fn request_length(hs: &[httparse::Header<'_>]) -> Option<Option<u64>> {
    Scan::of(hs)?.length()
}
