//! `[[app]]`: one protected application, its rules and policies, host pattern and upstream.

use super::*;

/// `[[app]]`: one protected application.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct App {
    /// Host it answers for (`*` = any).
    pub host: HostPattern,
    /// Where allowed requests go.
    pub upstream: Upstream,
    /// Default policy for paths no rule matches.
    #[serde(default = "default_policy")]
    pub policy: Policy,
    /// Non-empty: only members of these groups pass.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Time allowed for the upstream's response head.
    #[serde(default = "default_upstream_timeout")]
    pub upstream_timeout: Dur,
    /// Extra CA certificates (PEM) for an https upstream.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Path rules; the longest matching prefix wins.
    #[serde(default, rename = "rule")]
    pub rules: Vec<Rule>,
    /// Let GET and HEAD requests with a body through (refused with 400 by default: an app that never reads a GET
    /// body would take it for the next request on the connection).
    #[serde(default)]
    pub allow_get_body: bool,
    /// Re-use an upstream connection for anyone's requests. Off by default: a connection only ever carries
    /// requests of the identity that last used it, so bytes an app sends past the end of an answer can't reach
    /// another user (see the proxy's pool module).
    #[serde(default)]
    pub shared_connections: bool,
    /// Re-use an upstream connection after a request with a body. Off by default: an app that answers before reading
    /// a body (or doesn't read it) takes the body for its next request, and that request's answer would reach
    /// whoever is sent over the connection next; so a connection that carried a body is closed after its answer.
    /// For an app known to read every body it is sent, this trades that guard for a connection saved per upload.
    #[serde(default)]
    pub reuse_after_body: bool,
    /// Most idle upstream connections kept for this app, whoever they belong to.
    #[serde(default = "default_max_idle")]
    pub max_idle_connections: usize,
}

fn default_max_idle() -> usize {
    1024
}

fn default_policy() -> Policy {
    Policy::TwoFactor
}

fn default_upstream_timeout() -> Dur {
    Dur(Duration::from_secs(30))
}

/// `[[app.rule]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Prefix of the normalised path.
    pub path: RulePath,
    /// Policy for matching paths.
    pub policy: Policy,
}

/// What a request needs to pass. Ordered from least to most restrictive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Forwarded without identity.
    Bypass,
    /// The password is enough.
    OneFactor,
    /// Password and second factor.
    TwoFactor,
    /// Never forwarded.
    Deny,
}

impl Policy {
    /// Whether a request under this rule is decided by its session (deny and bypass never read one).
    pub fn needs_session(self) -> bool {
        matches!(self, Policy::OneFactor | Policy::TwoFactor)
    }
}

/// The host an app answers for, normalised (lower case, no port, no trailing dot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// `*`: any host no other app claims.
    Any,
    /// One host name.
    Exact(String),
}

impl<'de> Deserialize<'de> for HostPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "*" {
            return Ok(HostPattern::Any);
        }
        match crate::normalize::normalize_host(&s) {
            Some(h) if !s.contains(':') || h.starts_with('[') => Ok(HostPattern::Exact(h)),
            _ => Err(serde::de::Error::custom(format!(
                "{s:?} is not a host name (write the name without scheme, port or path, or \"*\")"
            ))),
        }
    }
}

/// An upstream base URL: `http://` or `https://`, host and port, no path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `http` or `https`.
    pub scheme: http::uri::Scheme,
    /// host[:port]
    pub authority: http::uri::Authority,
}

impl<'de> Deserialize<'de> for Upstream {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let err = |why: &str| serde::de::Error::custom(format!("upstream {s:?}: {why}"));
        let uri: http::Uri = s.parse().map_err(|_| err("not a URL"))?;
        let scheme = uri.scheme().cloned().ok_or_else(|| err("needs http:// or https://"))?;
        if scheme != http::uri::Scheme::HTTP && scheme != http::uri::Scheme::HTTPS {
            return Err(err("only http:// and https:// are supported"));
        }
        let authority = uri.authority().cloned().ok_or_else(|| err("needs a host"))?;
        if authority.as_str().contains('@') {
            return Err(err("credentials in the URL are not supported"));
        }
        if uri.path() != "/" && !uri.path().is_empty() || uri.query().is_some() {
            return Err(err("a path is not supported; the request path is passed on as it is"));
        }
        Ok(Upstream { scheme, authority })
    }
}

/// A rule's path prefix: starts with `/`, already in normalised form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RulePath(pub String);

impl<'de> Deserialize<'de> for RulePath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match crate::normalize::normalize_path(&s) {
            Ok(n) if n == s => Ok(RulePath(s)),
            _ => Err(serde::de::Error::custom(format!(
                "rule path {s:?} must start with / and be in normal form (no //, . or .. segments, no %-escapes)"
            ))),
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Policy::Bypass => "bypass",
            Policy::OneFactor => "one_factor",
            Policy::TwoFactor => "two_factor",
            Policy::Deny => "deny",
        })
    }
}
