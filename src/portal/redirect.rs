//! Post-login redirect targets: a path on this host, or nothing.
//!
//! Parse, then check, on the raw value and on every decoding of it, because browsers treat `/\host`, `//host`,
//! tabs and newlines inside URLs leniently (oauth2-proxy CVE-2020-5233 and follow-ups; Authelia CVE-2021-29456).

/// Longest accepted target.
const MAX_LEN: usize = 2048;

/// Returns `rd` if it is safe to redirect to, else `None`.
pub fn safe_target(rd: &str) -> Option<&str> {
    if rd.len() > MAX_LEN || !is_local_path(rd.as_bytes(), false) {
        return None;
    }
    // Every layer of percent-decoding must still be a local path (a later hop may decode again).
    let mut layer = rd.as_bytes().to_vec();
    let mut settled = false;
    for _ in 0..8 {
        let decoded: Vec<u8> = percent_encoding::percent_decode(&layer).collect();
        if decoded == layer {
            settled = true;
            break;
        }
        if !is_local_path(&decoded, true) {
            return None;
        }
        layer = decoded;
    }
    // Still decoding after eight layers: nobody writes that by accident. Fail closed.
    if !settled {
        return None;
    }
    rd.parse::<http::uri::PathAndQuery>().ok()?;
    Some(rd)
}

/// A single leading `/`, then no `/` or `\` straight after, no control character or backslash anywhere, and a
/// path without `//` or dot segments (`/.//evil.com` collapses to `//evil.com` in a later normaliser).
/// Spaces are refused in the raw value (browsers strip or mangle them) but allowed once decoded (`%20`).
fn is_local_path(b: &[u8], decoded: bool) -> bool {
    let bad = |c: u8| c < b' ' || c == 0x7f || c == b'\\' || (c == b' ' && !decoded);
    let path = b.split(|&c| c == b'?' || c == b'#').next().unwrap_or_default();
    let tricky_path =
        path.windows(2).any(|w| w == b"//") || path.split(|&c| c == b'/').any(|seg| seg == b"." || seg == b"..");
    b.first() == Some(&b'/')
        && !matches!(b.get(1), Some(b'/') | Some(b'\\'))
        && !b.iter().any(|&c| bad(c))
        && !tricky_path
}

/// A safe target or `/`.
pub fn target_or_root(rd: &str) -> String {
    safe_target(rd).unwrap_or("/").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_paths_pass() {
        for rd in ["/", "/wiki/Main_Page", "/a?b=c&d=%2F", "/search?q=a%20b"] {
            assert_eq!(safe_target(rd), Some(rd), "{rd}");
        }
    }

    #[test]
    fn hostile_targets_are_refused() {
        for rd in [
            "//evil.com",
            "/\\evil.com",
            "\\\\evil.com",
            "https://evil.com",
            "http:evil.com",
            "javascript:alert(1)",
            "data:text/html,x",
            "/%2F%2Fevil.com",
            "/%2f/evil.com",
            "/%5Cevil.com",
            "/%252F%252Fevil.com",
            "/\t/evil.com",
            "/\n/evil.com",
            " //evil.com",
            "///evil.com",
            "/%09/evil.com",
            "/%0d%0aLocation:%20x",
            "evil.com",
            "",
            "/a b",
            "/.//evil.com",
            "/./evil",
            "/a/../..//evil.com",
            "/%2e//evil.com",
            "/%2525252F%2525252Fevil.com",
        ] {
            assert_eq!(safe_target(rd), None, "{rd:?}");
        }
    }
}
