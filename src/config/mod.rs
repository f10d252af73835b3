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

mod app;
mod sections;
mod values;

pub use app::*;
pub use sections::*;
pub use values::*;

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

    /// Whether every request reaches the gateway over plain HTTP while its cookies are `Secure`: no TLS of its
    /// own, no trusted proxy to say a request came over https, and `[session] secure = true`. Browsers then drop
    /// the gateway's cookies, and every form fails.
    pub fn secure_cookies_over_plain_http(&self) -> bool {
        self.session.secure == Secure::Always
            && self.server.tls_cert.is_none()
            && self.server.trusted_proxies.is_empty()
    }

    /// What `check-config` and `serve` warn about: settings that parse but can't work as written.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.secure_cookies_over_plain_http() {
            warnings.push(
                "[session] secure = true, but the gateway has no TLS ([server] tls_cert) and trusts no proxy \
                 ([server] trusted_proxies): browsers keep Secure cookies only over https, so over plain HTTP every \
                 sign-in form fails as \"expired\". Serve it over https (tls_cert/tls_key, or a TLS proxy listed \
                 in trusted_proxies), or set secure = \"auto\"."
                    .to_string(),
            );
        }
        warnings
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
        // Zero would cut every upload that pauses, or every client whose socket is full for an instant.
        for (key, d) in [("body_timeout", s.body_timeout.0), ("send_timeout", s.send_timeout.0)] {
            if d < Duration::from_secs(1) {
                return Err(format!("[server] {key} must be at least 1s"));
            }
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

    /// The keys the parser accepts in `section` ("" for the sections themselves), read from the unknown-field error
    /// (`expected one of ...`).
    fn accepted_keys(section: &str) -> std::collections::BTreeSet<String> {
        let app = "[[app]]\nhost = \"w.example\"\nupstream = \"http://127.0.0.1:9\"\n";
        let probe = match section {
            "" => format!("not_a_key_zz = 1\n{app}"),
            "app" => format!("{app}not_a_key_zz = 1\n"),
            "app.rule" => format!("{app}[[app.rule]]\npath = \"/x\"\npolicy = \"deny\"\nnot_a_key_zz = 1\n"),
            s => format!("[{s}]\nnot_a_key_zz = 1\n\n{app}"),
        };
        let err = Config::parse(&probe, Path::new("p.toml")).unwrap_err().to_string();
        let list = err.split_once("expected").unwrap_or_else(|| panic!("{section}: {err}")).1;
        list.split('`').skip(1).step_by(2).map(str::to_string).collect()
    }

    /// The README calls config/portcullis.toml the reference: every key the parser accepts is in it (set or
    /// commented out), and nothing else.
    #[test]
    fn the_reference_file_names_every_key_the_parser_accepts() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/portcullis.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        Config::parse(&text, &path).unwrap();
        let mut documented: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> = Default::default();
        let mut section = String::new();
        for line in text.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix('[') {
                section = name.trim_matches(|c| c == '[' || c == ']').to_string();
                // `[[app.rule]]` documents the key `rule` of `[app]`.
                let (parent, key) = section.rsplit_once('.').unwrap_or(("", &section));
                documented.entry(parent.to_string()).or_default().insert(key.to_string());
                continue;
            }
            let line = line.trim_start_matches('#').trim_start();
            if let Some((key, _)) = line.split_once('=')
                && !key.trim().is_empty()
                && key.trim().bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
            {
                documented.entry(section.clone()).or_default().insert(key.trim().to_string());
            }
        }
        let mut sections: Vec<String> = accepted_keys("").into_iter().collect();
        sections.push("app.rule".into());
        for s in sections.iter().map(String::as_str).chain([""]) {
            let want = accepted_keys(s);
            let have = documented.get(s).cloned().unwrap_or_default();
            assert_eq!(have, want, "keys of [{s}] in config/portcullis.toml (left) vs the parser (right)");
        }
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
