//! The TOML configuration: parsed into typed values at the edge, so the rest of the gateway never sees raw strings.
//!
//! Every struct denies unknown keys, and values are validated while they are deserialized, so an error carries the
//! file, line and column of the offending key or value.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

/// A configuration error, with the position in the file when one is known.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: {source}")]
    Read {
        /// The config file.
        file: String,
        /// Why reading failed.
        source: std::io::Error,
    },
    /// The file does not parse, or a value is invalid; position known.
    #[error("{file}:{line}:{column}: {message}")]
    At {
        /// The config file.
        file: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// A rule that spans several keys is broken.
    #[error("{file}: {message}")]
    Invalid {
        /// The config file.
        file: String,
        /// What is wrong.
        message: String,
    },
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The file this was loaded from (for SIGHUP reloads); not a key.
    #[serde(skip)]
    pub source: Option<PathBuf>,
    /// Listener, TLS and portal location.
    #[serde(default)]
    pub server: Server,
    /// Where users and sessions live.
    #[serde(default)]
    pub storage: Storage,
    /// Session cookie and timeouts.
    #[serde(default)]
    pub session: SessionConfig,
    /// Brute-force limits.
    #[serde(default)]
    pub limits: Limits,
    /// Names of the identity headers sent upstream.
    #[serde(default)]
    pub headers: Headers,
    /// Look of the gateway's own pages.
    #[serde(default)]
    pub portal: Portal,
    /// Second-factor settings.
    #[serde(default)]
    pub two_factor: TwoFactor,
    /// Who administers.
    #[serde(default)]
    pub admin: Admin,
    /// Audit log retention.
    #[serde(default)]
    pub audit: Audit,
    /// Prometheus endpoint.
    #[serde(default)]
    pub metrics: Metrics,
    /// Log output.
    #[serde(default)]
    pub log: Log,
    /// Outgoing email.
    #[serde(default)]
    pub mail: Mail,
    /// Self-service account features.
    #[serde(default)]
    pub accounts: Accounts,
    /// The protected applications.
    #[serde(rename = "app")]
    pub apps: Vec<App>,
}

/// `[admin]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    /// Members of this group see the admin pages.
    pub group: String,
}

impl Default for Admin {
    fn default() -> Self {
        Admin { group: "admins".into() }
    }
}

/// `[audit]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Audit {
    /// Events older than this are deleted.
    pub retention: Dur,
}

impl Default for Audit {
    fn default() -> Self {
        Audit { retention: Dur(Duration::from_secs(90 * 86400)) }
    }
}

/// `[metrics]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Metrics {
    /// Address of the Prometheus endpoint; off when unset.
    pub listen: Option<SocketAddr>,
    /// Bearer token scrapers must send.
    pub token: Option<String>,
    /// File holding the token (instead of `token`).
    pub token_file: Option<PathBuf>,
}

/// `[mail]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Mail {
    /// How mail leaves.
    pub transport: MailTransport,
    /// Where the outbox transport writes `.eml` files.
    pub outbox_dir: PathBuf,
    /// The From header.
    pub from: String,
    /// Base of every link in emails (never taken from the Host header). Features that email links need it.
    pub public_url: Option<String>,
    /// SMTP server.
    pub smtp_host: Option<String>,
    /// SMTP port (default 587 for starttls, 465 for tls, 25 for none).
    pub smtp_port: Option<u16>,
    /// "starttls", "tls" or "none" (plain; only for a relay on loopback).
    pub smtp_tls: SmtpTls,
    /// SMTP user name.
    pub smtp_username: Option<String>,
    /// SMTP password (or `smtp_password_file`).
    pub smtp_password: Option<String>,
    /// File holding the SMTP password.
    pub smtp_password_file: Option<PathBuf>,
}

impl Default for Mail {
    fn default() -> Self {
        Mail {
            transport: MailTransport::Outbox,
            outbox_dir: PathBuf::from("data/outbox"),
            from: "Portcullis <no-reply@localhost>".into(),
            public_url: None,
            smtp_host: None,
            smtp_port: None,
            smtp_tls: SmtpTls::Starttls,
            smtp_username: None,
            smtp_password: None,
            smtp_password_file: None,
        }
    }
}

/// `[mail] transport`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MailTransport {
    /// `.eml` files in `outbox_dir`.
    Outbox,
    /// An SMTP relay.
    Smtp,
    /// No mail: features that need it are off.
    None,
}

/// `[mail] smtp_tls`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS (required).
    Starttls,
    /// TLS from the first byte.
    Tls,
    /// No TLS at all.
    None,
}

/// `[accounts]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Accounts {
    /// "Forgot password" by email.
    pub password_reset: bool,
    /// Invitations by email.
    pub invitations: bool,
    /// Lifetime of a reset link.
    pub reset_token_ttl: Dur,
    /// Lifetime of an invitation.
    pub invitation_ttl: Dur,
}

impl Default for Accounts {
    fn default() -> Self {
        Accounts {
            password_reset: true,
            invitations: true,
            reset_token_ttl: Dur(Duration::from_secs(1800)),
            invitation_ttl: Dur(Duration::from_secs(7 * 86400)),
        }
    }
}

impl Config {
    /// Whether mail can be sent and linked back to us.
    pub fn mail_ready(&self) -> bool {
        self.mail.transport != MailTransport::None && self.mail.public_url.is_some()
    }

    /// Whether "forgot password" is offered.
    pub fn password_reset_enabled(&self) -> bool {
        self.accounts.password_reset && self.mail_ready()
    }

    /// Whether invitations can be sent and accepted.
    pub fn invitations_enabled(&self) -> bool {
        self.accounts.invitations && self.mail_ready()
    }
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// "text" or "json".
    pub format: LogFormat,
    /// A tracing filter: "info", "debug", "portcullis=debug,info"…
    pub level: String,
}

impl Default for Log {
    fn default() -> Self {
        Log { format: LogFormat::Text, level: "info".into() }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    /// Address `serve` binds.
    pub listen: SocketAddr,
    /// PEM certificate chain; TLS is on when set (with `tls_key`).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key.
    pub tls_key: Option<PathBuf>,
    /// Path prefix of the gateway's own pages, on every host.
    pub portal_prefix: Prefix,
    /// Peers whose X-Forwarded-* headers are believed.
    pub trusted_proxies: Vec<IpNet>,
    /// How long a client may take to send the request head.
    pub header_read_timeout: Dur,
    /// How long in-flight requests may run after a shutdown signal.
    pub shutdown_grace: Dur,
    /// Most simultaneous password hashes (each takes ~19 MiB). Default: half the cores (1 to 4), so logins can't
    /// take every core from proxying.
    pub max_concurrent_hashes: Option<usize>,
    /// Most client connections served at once; at the limit, idle kept-alive connections are closed first.
    /// Default: three quarters of the open-files limit (raised to its hard limit at start).
    pub max_connections: Option<usize>,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            tls_cert: None,
            tls_key: None,
            portal_prefix: Prefix("/_portcullis".into()),
            trusted_proxies: Vec::new(),
            header_read_timeout: Dur(Duration::from_secs(10)),
            shutdown_grace: Dur(Duration::from_secs(30)),
            max_concurrent_hashes: None,
            max_connections: None,
        }
    }
}

/// `[storage]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Storage {
    /// "redb" (embedded, default) or "postgres" (shared by several instances).
    pub backend: StorageBackend,
    /// The redb file.
    pub path: PathBuf,
    /// The master key file; created with mode 0600 when missing. Instances sharing a database share it.
    pub secret_key_file: PathBuf,
    /// PostgreSQL URL, e.g. "postgres://portcullis@db/portcullis?sslmode=require" (or `url_file`).
    pub url: Option<String>,
    /// File holding the URL.
    pub url_file: Option<PathBuf>,
    /// PostgreSQL connection pool size.
    pub max_connections: usize,
}

impl Storage {
    /// How to name the storage in messages (never the database URL: it may hold a password).
    pub fn display_name(&self) -> String {
        match self.backend {
            StorageBackend::Redb => self.path.display().to_string(),
            StorageBackend::Postgres => "PostgreSQL".to_string(),
        }
    }
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            backend: StorageBackend::Redb,
            path: PathBuf::from("data/portcullis.redb"),
            secret_key_file: PathBuf::from("data/secret.key"),
            url: None,
            url_file: None,
            max_connections: 16,
        }
    }
}

/// `[storage] backend`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    /// The embedded redb file.
    Redb,
    /// PostgreSQL.
    Postgres,
}

/// `[session]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// Name of the session cookie; the CSRF cookie is this plus `_csrf`.
    pub cookie_name: CookieName,
    /// A session unused this long ends.
    pub idle_timeout: Dur,
    /// A session ends this long after login, however active.
    pub max_lifetime: Dur,
    /// Whether cookies carry `Secure`.
    pub secure: Secure,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            cookie_name: CookieName("portcullis_session".into()),
            idle_timeout: Dur(Duration::from_secs(3600)),
            max_lifetime: Dur(Duration::from_secs(12 * 3600)),
            secure: Secure::Auto,
        }
    }
}

/// `secure = "auto" | true | false`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secure {
    /// Secure when the listener speaks TLS or a trusted proxy says https.
    Auto,
    /// Always.
    Always,
    /// Never (plain-HTTP test set-ups).
    Never,
}

impl<'de> Deserialize<'de> for Secure {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(true) => Ok(Secure::Always),
            Raw::Bool(false) => Ok(Secure::Never),
            Raw::Str(s) if s == "auto" => Ok(Secure::Auto),
            Raw::Str(s) => Err(serde::de::Error::custom(format!("secure must be \"auto\", true or false, not {s:?}"))),
        }
    }
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Failures per account (and separately per second factor) before a lockout.
    pub max_failures: u32,
    /// Failures per client address before that address is locked out.
    pub max_failures_per_address: u32,
    /// The window failures are counted in.
    pub failure_window: Dur,
    /// How long a lockout lasts.
    pub lockout: Dur,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_failures: 5,
            max_failures_per_address: 50,
            failure_window: Dur(Duration::from_secs(600)),
            lockout: Dur(Duration::from_secs(900)),
        }
    }
}

/// `[headers]`: names of the identity headers sent upstream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Headers {
    /// Username.
    pub user: HeaderName,
    /// Email address.
    pub email: HeaderName,
    /// Display name.
    pub name: HeaderName,
    /// Groups, comma-separated.
    pub groups: HeaderName,
}

impl Default for Headers {
    fn default() -> Self {
        let h = |s: &'static str| HeaderName(http::HeaderName::from_static(s));
        Headers { user: h("remote-user"), email: h("remote-email"), name: h("remote-name"), groups: h("remote-groups") }
    }
}

/// `[portal]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Portal {
    /// Product name shown on every page.
    pub title: String,
    /// Directory of template overrides; missing files fall back to the embedded defaults.
    pub templates: Option<PathBuf>,
}

impl Default for Portal {
    fn default() -> Self {
        Portal { title: "Portcullis".into(), templates: None }
    }
}

/// `[two_factor]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TwoFactor {
    /// Every user must enrol.
    pub required: bool,
    /// Issuer shown in the authenticator app.
    pub issuer: String,
    /// Accepted neighbouring time steps, 0 or 1.
    pub skew: u8,
    /// Codes in a recovery set.
    pub recovery_codes: usize,
    /// Replace a used recovery code at once.
    pub replenish_recovery_codes: bool,
}

impl Default for TwoFactor {
    fn default() -> Self {
        TwoFactor {
            required: true,
            issuer: "Portcullis".into(),
            skew: 1,
            recovery_codes: 10,
            replenish_recovery_codes: false,
        }
    }
}

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
    /// Most idle upstream connections kept for this app, whoever they belong to.
    #[serde(default = "default_max_idle")]
    pub max_idle_connections: usize,
}

fn default_max_idle() -> usize {
    128
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

/// A duration written as `"90s"`, `"10m"`, `"1h"`, `"7d"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map(Dur).map_err(|e| {
            serde::de::Error::custom(format!("invalid duration {s:?}: {e} (use e.g. \"30s\", \"10m\", \"1h\")"))
        })
    }
}

impl Dur {
    /// Whole seconds, at least 1.
    pub fn secs(self) -> u64 {
        self.0.as_secs().max(1)
    }
}

/// A validated portal prefix: starts with `/`, no trailing `/`, plain characters only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefix(pub String);

impl<'de> Deserialize<'de> for Prefix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let ok = s.starts_with('/')
            && s.len() > 1
            && !s.ends_with('/')
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/_-.".contains(&b))
            && !s.contains("//")
            && !s.split('/').any(|seg| seg == "." || seg == "..");
        if ok {
            Ok(Prefix(s))
        } else {
            Err(serde::de::Error::custom(
                "portal_prefix must look like \"/_portcullis\": a leading /, no trailing /, letters, digits, _ - .",
            ))
        }
    }
}

/// A cookie name made of token characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CookieName(pub String);

impl<'de> Deserialize<'de> for CookieName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)) {
            Ok(CookieName(s))
        } else {
            Err(serde::de::Error::custom("cookie_name may hold only letters, digits, _ - ."))
        }
    }
}

/// An HTTP header name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderName(pub http::HeaderName);

impl<'de> Deserialize<'de> for HeaderName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        http::HeaderName::from_str(&s)
            .map(HeaderName)
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a valid header name")))
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

impl Config {
    /// Reads and validates a config file, applying `PORTCULLIS_SECTION__KEY` environment overrides.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { file: path.display().to_string(), source })?;
        let mut config = Config::parse_with_env(&text, path, std::env::vars())?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses and validates config text without environment overrides; `path` names the file in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        Config::parse_with_env(text, path, std::iter::empty())
    }

    /// Parses config text, then applies overrides from `env` pairs named `PORTCULLIS_SECTION__KEY` (for `[[app]]`,
    /// `PORTCULLIS_APP__0__UPSTREAM`). Values are TOML (`true`, `5`, `["a"]`) or else plain strings.
    pub fn parse_with_env(
        text: &str,
        path: &Path,
        env: impl Iterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let at = |e: toml::de::Error| {
            let (line, column) = e.span().map(|span| line_column(text, span.start)).unwrap_or((1, 1));
            ConfigError::At { file: file.clone(), line, column, message: e.message().trim().to_string() }
        };
        let overrides: Vec<(Vec<String>, String)> = env
            .filter_map(|(k, v)| {
                let rest = k.strip_prefix("PORTCULLIS_")?;
                rest.contains("__").then(|| (rest.split("__").map(str::to_ascii_lowercase).collect(), v))
            })
            .collect();
        let mut config: Config = if overrides.is_empty() {
            // Straight from the text, so every error has a line and column.
            toml::from_str(text).map_err(at)?
        } else {
            let mut table: toml::Table = toml::from_str(text).map_err(at)?;
            for (keys, value) in &overrides {
                apply_override(&mut table, keys, value)
                    .map_err(|message| ConfigError::Invalid { file: file.clone(), message })?;
            }
            toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| ConfigError::Invalid {
                file: file.clone(),
                message: format!("{} (after environment overrides)", e.message().trim()),
            })?
        };
        config.read_secret_files().map_err(|message| ConfigError::Invalid { file: file.clone(), message })?;
        config.validate().map_err(|message| ConfigError::Invalid { file, message })?;
        Ok(config)
    }

    /// Resolves `*_file` secrets: the file's contents (without a trailing newline) become the value.
    fn read_secret_files(&mut self) -> Result<(), String> {
        resolve_secret("[metrics] token", &mut self.metrics.token, &self.metrics.token_file)?;
        resolve_secret("[mail] smtp_password", &mut self.mail.smtp_password, &self.mail.smtp_password_file)?;
        resolve_secret("[storage] url", &mut self.storage.url, &self.storage.url_file)?;
        Ok(())
    }

    /// Rules that span several keys.
    fn validate(&self) -> Result<(), String> {
        let s = &self.server;
        if s.tls_cert.is_some() != s.tls_key.is_some() {
            return Err("[server] tls_cert and tls_key must be set together".into());
        }
        if self.apps.is_empty() {
            return Err("at least one [[app]] is needed".into());
        }
        let mut seen = std::collections::HashSet::new();
        for app in &self.apps {
            let key = match &app.host {
                HostPattern::Any => "*".to_string(),
                HostPattern::Exact(h) => h.clone(),
            };
            if !seen.insert(key.clone()) {
                return Err(format!("two [[app]] entries claim host {key:?}"));
            }
        }
        if self.limits.max_failures == 0 || self.limits.max_failures_per_address == 0 {
            return Err("[limits] max_failures must be at least 1".into());
        }
        if self.two_factor.issuer.is_empty() || self.two_factor.issuer.contains(':') {
            return Err("[two_factor] issuer must be non-empty and may not contain ':'".into());
        }
        if self.two_factor.skew > 1 {
            return Err("[two_factor] skew must be 0 or 1".into());
        }
        if !(1..=100).contains(&self.two_factor.recovery_codes) {
            return Err("[two_factor] recovery_codes must be between 1 and 100".into());
        }
        if let Some(url) = &self.mail.public_url {
            let ok = url.parse::<http::Uri>().is_ok_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https"))
                    && u.authority().is_some()
                    && matches!(u.path(), "" | "/")
                    && u.query().is_none()
            });
            if !ok || url.ends_with('/') {
                return Err(format!(
                    "[mail] public_url {url:?} must be a base URL like \"https://wiki.example.com\" (no path, no trailing /)"
                ));
            }
        }
        if self.storage.backend == StorageBackend::Postgres && self.storage.url.is_none() {
            return Err("[storage] backend = \"postgres\" needs url or url_file".into());
        }
        if self.mail.transport == MailTransport::Smtp && self.mail.smtp_host.is_none() {
            return Err("[mail] transport = \"smtp\" needs smtp_host".into());
        }
        if self.session.idle_timeout.secs() < 10 {
            return Err(format!(
                "[session] idle_timeout must be at least 10s (got {}s): last-seen is refreshed every tenth of it, \
                 and shared instances write it in 5-second batches",
                self.session.idle_timeout.secs()
            ));
        }
        if s.max_connections.is_some_and(|n| n < 2) {
            return Err("[server] max_connections must be at least 2".into());
        }
        if s.max_concurrent_hashes == Some(0) {
            return Err("[server] max_concurrent_hashes must be at least 1".into());
        }
        Ok(())
    }

    /// The CSRF cookie's name.
    pub fn csrf_cookie_name(&self) -> String {
        format!("{}_csrf", self.session.cookie_name.0)
    }
}

/// Fills `value` from `file` when only the file is set; both set is an error.
fn resolve_secret(name: &str, value: &mut Option<String>, file: &Option<PathBuf>) -> Result<(), String> {
    match (&value, file) {
        (Some(_), Some(_)) => Err(format!("{name}: set {name} or its _file, not both")),
        (None, Some(f)) => {
            *value = Some(read_secret(f)?);
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Reads a secret file, dropping one trailing newline.
fn read_secret(path: &Path) -> Result<String, String> {
    use std::io::Read;
    const LIMIT: u64 = 64 * 1024;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(LIMIT + 1).read_to_string(&mut text))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if text.len() as u64 > LIMIT {
        return Err(format!("{}: a secret file must be under 64 KiB", path.display()));
    }
    let text = text.strip_suffix('\n').unwrap_or(&text);
    Ok(text.strip_suffix('\r').unwrap_or(text).to_string())
}

/// Sets `keys` (section, [index,] key) in a parsed config table.
fn apply_override(table: &mut toml::Table, keys: &[String], raw: &str) -> Result<(), String> {
    let name = format!("PORTCULLIS_{}", keys.join("__").to_ascii_uppercase());
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let (last, parents) = keys.split_last().ok_or_else(|| format!("{name}: empty key"))?;
    let mut cur = table;
    let mut i = 0;
    while i < parents.len() {
        let k = &parents[i];
        let slot = cur.entry(k.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = match slot {
            toml::Value::Table(t) => t,
            toml::Value::Array(items) => {
                // `[[app]]` entries are addressed by index: APP__0__UPSTREAM.
                i += 1;
                let idx = parents
                    .get(i)
                    .and_then(|x| x.parse::<usize>().ok())
                    .ok_or_else(|| format!("{name}: [[{k}]] needs an index, e.g. {k}__0__key"))?;
                match items.get_mut(idx) {
                    Some(toml::Value::Table(t)) => t,
                    _ => return Err(format!("{name}: there is no [[{k}]] number {idx}")),
                }
            }
            _ => return Err(format!("{name}: {k} is not a section")),
        };
        i += 1;
    }
    cur.insert(last.clone(), value);
    Ok(())
}

/// 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[storage]
path = "data/p.redb"
secret_key_file = "data/secret.key"

[[app]]
host = "wiki.example.com"
upstream = "http://127.0.0.1:9000"
"#;

    #[test]
    fn minimal_file_parses_with_defaults() {
        let c = Config::parse(MINIMAL, Path::new("p.toml")).unwrap();
        assert_eq!(c.apps[0].policy, Policy::TwoFactor);
        assert_eq!(c.session.idle_timeout.0, Duration::from_secs(3600));
        assert_eq!(c.server.portal_prefix.0, "/_portcullis");
    }

    #[test]
    fn unknown_key_names_line_and_column() {
        let text = format!("{MINIMAL}\n[session]\ncookie_nam = \"x\"\n");
        let err = Config::parse(&text, Path::new("p.toml")).unwrap_err().to_string();
        assert!(err.starts_with("p.toml:11:1:"), "{err}");
        assert!(err.contains("cookie_nam"), "{err}");
    }

    #[test]
    fn bad_duration_points_at_value() {
        let text = format!("{MINIMAL}\n[session]\nidle_timeout = \"soon\"\n");
        let err = Config::parse(&text, Path::new("p.toml")).unwrap_err().to_string();
        assert!(err.starts_with("p.toml:11:16:"), "{err}");
    }

    #[test]
    fn upstream_with_path_is_rejected() {
        let text = MINIMAL.replace("9000\"", "9000/app\"");
        assert!(Config::parse(&text, Path::new("p.toml")).is_err());
    }

    #[test]
    fn environment_overrides_keys_and_app_entries() {
        let env = vec![
            ("PORTCULLIS_SESSION__IDLE_TIMEOUT".to_string(), "5m".to_string()),
            ("PORTCULLIS_LIMITS__MAX_FAILURES".to_string(), "9".to_string()),
            ("PORTCULLIS_APP__0__POLICY".to_string(), "deny".to_string()),
            ("PORTCULLIS_CONFIG".to_string(), "ignored".to_string()),
        ];
        let c = Config::parse_with_env(MINIMAL, Path::new("p.toml"), env.into_iter()).unwrap();
        assert_eq!(c.session.idle_timeout.0, Duration::from_secs(300));
        assert_eq!(c.limits.max_failures, 9);
        assert_eq!(c.apps[0].policy, Policy::Deny);
        let bad = vec![("PORTCULLIS_SESSION__NOPE".to_string(), "1".to_string())];
        let err = Config::parse_with_env(MINIMAL, Path::new("p.toml"), bad.into_iter()).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn secret_file_and_value_together_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "s3cret\n").unwrap();
        let text = format!("{MINIMAL}\n[metrics]\ntoken_file = {:?}\n", f.display().to_string());
        let c = Config::parse(&text, Path::new("p.toml")).unwrap();
        assert_eq!(c.metrics.token.as_deref(), Some("s3cret"));
        let both = format!("{text}token = \"x\"\n");
        assert!(Config::parse(&both, Path::new("p.toml")).unwrap_err().to_string().contains("not both"));
    }

    #[test]
    fn tls_needs_both_files() {
        let text = format!("[server]\ntls_cert = \"c.pem\"\n{MINIMAL}");
        let err = Config::parse(&text, Path::new("p.toml")).unwrap_err().to_string();
        assert!(err.contains("tls_key"), "{err}");
    }
}
