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

impl From<crate::normalize::BadPath> for PolicyError {
    fn from(e: crate::normalize::BadPath) -> Self {
        PolicyError::BadPath(e.0)
    }
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

/// What a request for an app gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// It goes to the app; with the session's identity headers if `identity` (not on bypass paths).
    Pass {
        /// Whether the session's user is named to the app.
        identity: bool,
    },
    /// The path's rule is `deny`: never forwarded.
    Denied,
    /// No valid session, and the path needs one: the login page.
    NoSession,
    /// The session owes its second factor (or enrolment): nothing but the portal.
    Pending,
    /// Signed in with the password alone, and the path needs two factors: enrolment first.
    NeedsSecondFactor,
    /// The user's groups don't include one the app requires.
    NotInGroup,
}

/// What a request whose path matched `policy` in `app` gets, given its session's level and its user's groups
/// (`None`: no valid session). The one admission decision of both lanes, the relay and the handlers: each finds
/// the session its own way, and only when [`Policy::needs_session`] says so, and then asks this.
pub fn admit(app: &App, policy: Policy, session: Option<(Level, &[String])>) -> Admission {
    match (policy, session) {
        (Policy::Deny, _) => Admission::Denied,
        (Policy::Bypass, _) => Admission::Pass { identity: false },
        (_, None) => Admission::NoSession,
        (_, Some((Level::Pending, _))) => Admission::Pending,
        (Policy::TwoFactor, Some((Level::Password, _))) => Admission::NeedsSecondFactor,
        (_, Some((_, groups))) if !app.groups.is_empty() && !app.groups.iter().any(|g| groups.contains(g)) => {
            Admission::NotInGroup
        }
        _ => Admission::Pass { identity: true },
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

/// Finds the app for a Host value: exact name first, then `*`. A value that is not a host
/// ([`crate::normalize::valid_host`]) has none: callers answer it 400 before asking.
pub fn find_app(apps: &[App], host: Option<&str>) -> Option<usize> {
    if host.is_some_and(|h| !crate::normalize::valid_host(h.trim())) {
        return None;
    }
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

/// The path with every segment's `;params` removed.
fn strip_params(path: &str) -> String {
    if !path.contains(';') {
        return path.to_string();
    }
    path.split('/').map(|seg| seg.split(';').next().unwrap_or_default()).collect::<Vec<_>>().join("/")
}

pub use crate::normalize::{normalize_host, normalize_path};

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
        assert_eq!(normalize_host("[::1]"), Some("[::1]".into()));
        assert_eq!(normalize_host("127.0.0.1:8080"), Some("127.0.0.1".into()));
    }

    #[test]
    fn only_hosts_are_hosts() {
        use crate::normalize::valid_host;
        for ok in ["admin.test", "admin.test.", "admin.test:8080", "admin.test:", "a_b.test", "127.0.0.1", "[::1]:443"]
        {
            assert!(valid_host(ok), "{ok}");
        }
        for bad in [
            "admin.test..",
            ".admin.test",
            "admin .test",
            "admin.test:abc",
            "admin..test",
            "admin.test:123456",
            "",
            ".",
            "[::1",
            "[nothost]",
            "a:b:c",
            "admin.test/x",
            "user@admin.test",
        ] {
            assert!(!valid_host(bad), "{bad:?}");
        }
    }

    #[test]
    fn admission_is_decided_by_the_rule_then_the_session_level_then_the_groups() {
        let mut app = ruled().apps.remove(0);
        app.groups = vec!["ops".into()];
        let ops = ["ops".to_string()];
        let none: [String; 0] = [];
        use Admission::*;
        use Level::{Full, Password, Pending as P};
        for (policy, session, want) in [
            (Policy::Deny, Some((Full, &ops[..])), Denied),
            (Policy::Deny, None, Denied),
            (Policy::Bypass, None, Pass { identity: false }),
            (Policy::Bypass, Some((Full, &ops[..])), Pass { identity: false }),
            (Policy::OneFactor, None, NoSession),
            (Policy::TwoFactor, None, NoSession),
            (Policy::OneFactor, Some((P, &ops[..])), Pending),
            (Policy::TwoFactor, Some((P, &ops[..])), Pending),
            (Policy::TwoFactor, Some((Password, &ops[..])), NeedsSecondFactor),
            (Policy::OneFactor, Some((Password, &ops[..])), Pass { identity: true }),
            (Policy::OneFactor, Some((Password, &none[..])), NotInGroup),
            (Policy::TwoFactor, Some((Full, &none[..])), NotInGroup),
            (Policy::TwoFactor, Some((Full, &ops[..])), Pass { identity: true }),
        ] {
            assert_eq!(admit(&app, policy, session), want, "{policy:?} {session:?}");
            assert_eq!(policy.needs_session(), matches!(policy, Policy::OneFactor | Policy::TwoFactor));
        }
        app.groups.clear();
        assert_eq!(admit(&app, Policy::TwoFactor, Some((Full, &none[..]))), Pass { identity: true });
    }
}
