//! The sections of the file other than `[[app]]`, each with its defaults.

use super::*;

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
    /// The longest pause in a request body on its way to the app (reading it from the client, or the app taking
    /// it): a slow upload is bounded by this, not by the app's `upstream_timeout`, which starts once it is sent.
    pub body_timeout: Dur,
    /// The longest a write to a client may stall (nginx's `send_timeout`): a client that stops reading is then
    /// disconnected, and the app's connection behind it closed.
    pub send_timeout: Dur,
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
            body_timeout: Dur(Duration::from_secs(60)),
            send_timeout: Dur(Duration::from_secs(60)),
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
