//! The access decision: which app a request is for, and what it needs to pass.
//!
//! Decided on the same normalised path the upstream will receive, so what we check is what the app serves.

use crate::config::{App, Config, HostPattern, Policy};
use crate::store::Level;

/// Why a request cannot be matched to a decision.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// No app claims this host and there is no `*` app.
    #[error("no application is configured for this host")]
    UnknownHost,
    /// The path can't be normalised safely.
    #[error("the request path is malformed: {0}")]
    BadPath(&'static str),
}

/// The outcome for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Index into `Config::apps`.
    pub app: usize,
    /// What the request needs.
    pub policy: Policy,
    /// The normalised path (percent-encoded) to send upstream.
    pub path: String,
}

/// What a signed-in session may do with an app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// It may use the app.
    Pass,
    /// It owes its second factor (or enrolment): nothing but the portal.
    Pending,
    /// Signed in with the password alone, and the app needs two factors: enrolment first.
    NeedsSecondFactor,
    /// The user's groups don't include one the app requires.
    NotInGroup,
}

/// Whether a session at `level` of a user in `groups` may use `app`, whose path needs `needed` (an
/// authenticating policy, not deny or bypass). The one admission rule of both proxy paths.
pub fn admission(app: &App, needed: Policy, level: Level, groups: &[String]) -> Admission {
    match (level, needed) {
        (Level::Pending, _) => Admission::Pending,
        (Level::Password, Policy::TwoFactor) => Admission::NeedsSecondFactor,
        _ if !app.groups.is_empty() && !app.groups.iter().any(|g| groups.contains(g)) => Admission::NotInGroup,
        _ => Admission::Pass,
    }
}

/// Whether a path belongs to the portal (under `prefix`, e.g. `/_portcullis`).
pub fn owns(prefix: &str, path: &str) -> bool {
    path.strip_prefix(prefix).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Picks the app and policy for a host and raw path.
pub fn decide(config: &Config, host: Option<&str>, raw_path: &str) -> Result<Decision, PolicyError> {
    decide_for(config, find_app(&config.apps, host), raw_path)
}

/// [`decide`] with the app already found (`None`: no app for the host).
pub fn decide_for(config: &Config, app: Option<usize>, raw_path: &str) -> Result<Decision, PolicyError> {
    let app = app.ok_or(PolicyError::UnknownHost)?;
    let path = normalize_path(raw_path)?;
    // Servlet containers drop `;params` from segments (`/admin;x/` is `/admin/` to Tomcat): decide on both forms
    // and keep the more restrictive answer.
    let policy = path_policy(&config.apps[app], &path).max(path_policy(&config.apps[app], &strip_params(&path)));
    Ok(Decision { app, policy, path })
}

/// Finds the app for a Host value: exact name first, then `*`.
pub fn find_app(apps: &[App], host: Option<&str>) -> Option<usize> {
    // Only `*` apps: the host can't change the answer, so it needn't be normalised (an allocation).
    if apps.iter().all(|a| a.host == HostPattern::Any) {
        return apps.iter().position(|a| a.host == HostPattern::Any);
    }
    let host = host.and_then(normalize_host);
    if let Some(h) = &host
        && let Some(i) = apps.iter().position(|a| matches!(&a.host, HostPattern::Exact(x) if x == h))
    {
        return Some(i);
    }
    apps.iter().position(|a| a.host == HostPattern::Any)
}

/// The policy for a normalised path within an app.
///
/// Rules are prefixes; the longest wins. Some upstreams treat paths case-insensitively, so the longest match is
/// taken both exactly and ignoring ASCII case, and the more restrictive result applies: `/ADMIN/` can't dodge a
/// deny rule on `/admin/`, and `/PUBLIC/` doesn't inherit a bypass meant for `/public/`.
pub fn path_policy(app: &App, path: &str) -> Policy {
    let exact = longest(app, |prefix| path.starts_with(prefix));
    let folded = longest(app, |prefix| {
        path.len() >= prefix.len() && path.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
    });
    exact.unwrap_or(app.policy).max(folded.unwrap_or(app.policy))
}

fn longest(app: &App, matches: impl Fn(&str) -> bool) -> Option<Policy> {
    app.rules.iter().filter(|r| matches(&r.path.0)).max_by_key(|r| r.path.0.len()).map(|r| r.policy)
}

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

/// The path with every segment's `;params` removed.
fn strip_params(path: &str) -> String {
    if !path.contains(';') {
        return path.to_string();
    }
    path.split('/').map(|seg| seg.split(';').next().unwrap_or_default()).collect::<Vec<_>>().join("/")
}

/// Lower-cases a Host value and drops the port and a trailing dot. `None` if it isn't a plausible host.
pub fn normalize_host(raw: &str) -> Option<String> {
    let raw = raw.trim();
    let name = if raw.starts_with('[') {
        // IPv6 literal: keep the brackets, drop a port after them.
        let end = raw.find(']')?;
        &raw[..=end]
    } else {
        match raw.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            Some(_) => return None,
            None => raw,
        }
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    let ok = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._[]:".contains(&b));
    ok.then(|| name.to_ascii_lowercase())
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
pub fn normalize_path(raw: &str) -> Result<String, PolicyError> {
    if !raw.starts_with('/') {
        return Err(PolicyError::BadPath("the path must start with /"));
    }
    if is_plain(raw) {
        // The common case: nothing to decode, collapse or check further.
        return Ok(raw.to_string());
    }
    if raw.contains('\\') {
        return Err(PolicyError::BadPath("backslashes are not allowed"));
    }
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut trailing_slash = false;
    for seg in raw[1..].split('/') {
        let decoded: Vec<u8> = percent_encoding::percent_decode_str(seg).collect();
        if decoded.iter().any(|&b| b == b'/' || b == b'\\' || b < 0x20 || b == 0x7f) {
            return Err(PolicyError::BadPath("encoded slashes or control characters"));
        }
        if std::str::from_utf8(&decoded).is_err() {
            // Overlong or broken UTF-8 (`%c0%ae` for `.`) can decode to dots in a lenient upstream.
            return Err(PolicyError::BadPath("invalid UTF-8 in the path"));
        }
        if decoded.contains(&b'%') {
            // A `%` left after decoding ("%252e", stray "%") means a second decode upstream could see dots or slashes.
            return Err(PolicyError::BadPath("double or broken percent-encoding"));
        }
        let bare = decoded.split(|&b| b == b';').next().unwrap_or(&[]);
        // Windows servers ignore trailing dots and spaces (`/admin./`, `/..%20/`): refuse them outright.
        let is_dots = bare == b"." || bare == b"..";
        if !is_dots && (bare.ends_with(b".") || bare.ends_with(b" ")) {
            return Err(PolicyError::BadPath("a path segment ends with a dot or a space"));
        }
        trailing_slash = false;
        match bare {
            b"" if decoded.is_empty() => trailing_slash = true,
            b"." | b".." if decoded.len() != bare.len() => {
                return Err(PolicyError::BadPath("path parameters on a dot segment"));
            }
            b"." => trailing_slash = true,
            b".." => {
                if out.pop().is_none() {
                    return Err(PolicyError::BadPath("the path climbs above the root"));
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
    fn normalises_dots_and_slashes() {
        for (raw, want) in [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/b/", "/a/b/"),
            ("//a///b", "/a/b"),
            ("/a/./b", "/a/b"),
            ("/a/../b", "/b"),
            ("/public/../secret", "/secret"),
            ("/public/%2e%2e/secret", "/secret"),
            ("/public/%2E%2E/secret", "/secret"),
            ("/public/x/../../secret", "/secret"),
            ("/%61dmin/", "/admin/"),
            ("/a/..", "/"),
            ("/a%20b", "/a%20b"),
            ("/a/.", "/a/"),
        ] {
            assert_eq!(normalize_path(raw).as_deref(), Ok(want), "{raw}");
        }
    }

    #[test]
    fn rejects_ambiguous_paths() {
        for raw in [
            "/public/..%2fsecret",
            "/public/%2fsecret",
            "/public\\..\\secret",
            "/public/%5c..",
            "/..",
            "/a/../..",
            "/public/..;/secret",
            "/public/.;x/secret",
            "/a%00b",
            "/a%0d%0ab",
            "/a/%252e%252e/b",
            "/public/%c0%ae%c0%ae/secret",
            "/admin./",
            "/admin%20/",
            "/admin../",
            "/public/..%20/secret",
            "/public/...%20/secret",
            "/public/.../x",
            "/%ff",
            "relative",
        ] {
            assert!(normalize_path(raw).is_err(), "{raw} should be rejected");
        }
    }

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

    /// An app with overlapping rules: a deny, a bypass, and a longer rule inside each.
    fn ruled() -> Config {
        Config::parse(
            r#"
[storage]
path = "data/p.redb"
secret_key_file = "data/secret.key"

[[app]]
host = "*"
upstream = "http://127.0.0.1:9000"
policy = "one_factor"

[[app.rule]]
path = "/admin/"
policy = "deny"

[[app.rule]]
path = "/admin/status/"
policy = "bypass"

[[app.rule]]
path = "/public/"
policy = "bypass"

[[app.rule]]
path = "/public/private/"
policy = "two_factor"
"#,
            std::path::Path::new("p.toml"),
        )
        .unwrap()
    }

    fn policy_of(config: &Config, raw: &str) -> Policy {
        decide_for(config, Some(0), raw).unwrap().policy
    }

    #[test]
    fn path_parameters_cannot_dodge_a_rule() {
        let c = ruled();
        assert_eq!(policy_of(&c, "/admin/"), Policy::Deny, "control");
        assert_eq!(policy_of(&c, "/admin;x=1/"), Policy::Deny);
        assert_eq!(policy_of(&c, "/admin;x=1/users"), Policy::Deny);
        // Stripping parameters never loosens: a bypass path with a parameter in a segment is still a bypass only
        // if both forms say so.
        assert_eq!(policy_of(&c, "/public;x=1/private/a"), Policy::TwoFactor);
        assert_eq!(policy_of(&c, "/elsewhere;x=/"), Policy::OneFactor);
    }

    #[test]
    fn letter_case_cannot_dodge_a_rule_nor_inherit_a_bypass() {
        let c = ruled();
        assert_eq!(policy_of(&c, "/ADMIN/"), Policy::Deny);
        assert_eq!(policy_of(&c, "/Admin/users"), Policy::Deny);
        assert_eq!(policy_of(&c, "/public/x"), Policy::Bypass, "control");
        assert_eq!(policy_of(&c, "/PUBLIC/x"), Policy::OneFactor, "a case-folded bypass must not be inherited");
    }

    #[test]
    fn the_longest_matching_rule_wins() {
        let c = ruled();
        assert_eq!(policy_of(&c, "/admin/status/"), Policy::Bypass, "longer bypass inside a deny");
        assert_eq!(policy_of(&c, "/admin/statusx"), Policy::Deny);
        assert_eq!(policy_of(&c, "/public/private/doc"), Policy::TwoFactor, "longer two_factor inside a bypass");
        assert_eq!(policy_of(&c, "/public/privatex"), Policy::Bypass);
        assert_eq!(policy_of(&c, "/"), Policy::OneFactor, "no rule: the app's policy");
    }

    #[test]
    fn normalises_hosts() {
        assert_eq!(normalize_host("Wiki.Example.COM."), Some("wiki.example.com".into()));
        assert_eq!(normalize_host("wiki.example.com:8443"), Some("wiki.example.com".into()));
        assert_eq!(normalize_host("[::1]:80"), Some("[::1]".into()));
        assert_eq!(normalize_host("bad host"), None);
        assert_eq!(normalize_host("a:b"), None);
    }
}
