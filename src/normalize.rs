//! Normal forms of request paths and hosts, so a rule, the policy and the app all see one spelling
//! (RFC 3986 §6.2.2). Used by the policy on every request and by the config to check rule paths.

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadPath(pub &'static str);

/// A path already in normal form: only unreserved and sub-delim characters, no empty, dot or trailing-dot segments.
fn is_plain(raw: &str) -> bool {
    if !raw.bytes().all(|c| c.is_ascii_alphanumeric() || b"/-_~!$&'()*+,=:@.".contains(&c)) {
        return false;
    }
    let mut segments = raw[1..].split('/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        if (seg.is_empty() && !last) || seg.ends_with('.') {
            return false;
        }
    }
    true
}

/// Whether a Host value is a host (RFC 9112 §3.2, RFC 3986 §3.2.2-§3.2.3): a name of non-empty labels (letters,
/// digits, `-`, `_`) with at most one trailing dot, or a bracketed IPv6 literal; then an optional `:` and a port
/// of digits. A near-miss of a configured name (`admin.test..`, `.admin.test`, `admin .test`, `admin.test:abc`)
/// must be refused (400), not matched to a `*` app.
pub fn valid_host(raw: &str) -> bool {
    let port_ok = |p: &str| p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = raw.strip_prefix('[') {
        let Some((literal, after)) = rest.split_once(']') else { return false };
        return literal.parse::<std::net::Ipv6Addr>().is_ok()
            && (after.is_empty() || after.strip_prefix(':').is_some_and(port_ok));
    }
    let (name, port) = raw.split_once(':').map_or((raw, None), |(n, p)| (n, Some(p)));
    let name = name.strip_suffix('.').unwrap_or(name);
    port.is_none_or(port_ok)
        && !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
        })
}

/// Lower-cases a Host value and drops the port and a trailing dot. `None` if it isn't a host ([`valid_host`]).
pub fn normalize_host(raw: &str) -> Option<String> {
    let raw = raw.trim();
    if !valid_host(raw) {
        return None;
    }
    let name = match raw.strip_prefix('[') {
        // IPv6 literal: keep the brackets, drop a port after them.
        Some(rest) => &raw[..rest.find(']')? + 2],
        None => raw.split_once(':').map_or(raw, |(h, _)| h),
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    Some(name.to_ascii_lowercase())
}

/// Characters kept literally when a path segment is re-encoded (RFC 3986 §3.3 pchar minus `%`).
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'!')
    .remove(b'$')
    .remove(b'&')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')')
    .remove(b'*')
    .remove(b'+')
    .remove(b',')
    .remove(b';')
    .remove(b'=')
    .remove(b':')
    .remove(b'@');

/// Normalises a request path (RFC 3986 §6.2.2): decodes percent-escapes, removes dot segments (§5.2.4) and
/// duplicate slashes, and re-encodes. Rejects what could mean different things to us and to the upstream:
/// encoded `/` or `\`, backslashes, control bytes, `..` above the root, and `..;` path parameters.
pub fn normalize_path(raw: &str) -> Result<String, BadPath> {
    if !raw.starts_with('/') {
        return Err(BadPath("the path must start with /"));
    }
    if is_plain(raw) {
        // The common case: nothing to decode, collapse or check further.
        return Ok(raw.to_string());
    }
    if raw.contains('\\') {
        return Err(BadPath("backslashes are not allowed"));
    }
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut trailing_slash = false;
    for seg in raw[1..].split('/') {
        let decoded: Vec<u8> = percent_encoding::percent_decode_str(seg).collect();
        if decoded.iter().any(|&b| b == b'/' || b == b'\\' || b < 0x20 || b == 0x7f) {
            return Err(BadPath("encoded slashes or control characters"));
        }
        if std::str::from_utf8(&decoded).is_err() {
            // Overlong or broken UTF-8 (`%c0%ae` for `.`) can decode to dots in a lenient upstream.
            return Err(BadPath("invalid UTF-8 in the path"));
        }
        if decoded.contains(&b'%') {
            // A `%` left after decoding ("%252e", stray "%") means a second decode upstream could see dots or slashes.
            return Err(BadPath("double or broken percent-encoding"));
        }
        let bare = decoded.split(|&b| b == b';').next().unwrap_or(&[]);
        // Windows servers ignore trailing dots and spaces (`/admin./`, `/..%20/`): refuse them outright.
        let is_dots = bare == b"." || bare == b"..";
        if !is_dots && (bare.ends_with(b".") || bare.ends_with(b" ")) {
            return Err(BadPath("a path segment ends with a dot or a space"));
        }
        trailing_slash = false;
        match bare {
            b"" if decoded.is_empty() => trailing_slash = true,
            b"." | b".." if decoded.len() != bare.len() => {
                return Err(BadPath("path parameters on a dot segment"));
            }
            b"." => trailing_slash = true,
            b".." => {
                if out.pop().is_none() {
                    return Err(BadPath("the path climbs above the root"));
                }
                trailing_slash = true;
            }
            _ => out.push(decoded),
        }
    }
    let mut path = String::with_capacity(raw.len());
    for seg in &out {
        path.push('/');
        path.extend(percent_encoding::percent_encode(seg, SEGMENT));
    }
    if trailing_slash || out.is_empty() {
        path.push('/');
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_paths_take_the_fast_path_unchanged() {
        for p in ["/", "/a", "/a/b/", "/wiki/Main_Page", "/x~y/(1)/a.b"] {
            assert!(is_plain(p), "{p}");
            assert_eq!(normalize_path(p).as_deref(), Ok(p));
        }
        for p in ["//a", "/a/./b", "/a.", "/a%20b", "/a;b", "/a//"] {
            assert!(!is_plain(p), "{p}");
        }
    }
}
