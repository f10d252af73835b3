//! Outgoing mail: a queue drained by one background task, so sending never blocks a request.
//!
//! Transports: SMTP (lettre over rustls/ring: STARTTLS, implicit TLS, or plain for a loopback relay; pooled),
//! an outbox directory (each message written atomically: 0600 temp file, fsync, rename), or none. Failures are
//! retried with backoff and logged by recipient and kind only: bodies carry tokens and are never logged.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::message::{Mailbox, Message};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use tokio::sync::mpsc;

use crate::config::{Mail as MailConfig, MailTransport, SmtpTls};

/// Queue length; past it, messages are dropped (and logged) rather than blocking requests.
const QUEUE: usize = 1024;
/// Attempts per message.
const ATTEMPTS: u32 = 5;

/// Mail set-up and sending failures.
#[derive(Debug, thiserror::Error)]
pub enum MailError {
    /// An address doesn't parse.
    #[error("invalid mail address {0:?}")]
    Address(String),
    /// The message can't be built.
    #[error("message: {0}")]
    Build(String),
    /// SMTP failed.
    #[error("smtp: {0}")]
    Smtp(String),
    /// Writing the outbox failed.
    #[error("outbox: {0}")]
    Outbox(String),
}

/// One email.
#[derive(Debug, Clone)]
pub struct Email {
    /// Recipient address.
    pub to: String,
    /// Subject line.
    pub subject: String,
    /// Plain-text body.
    pub body: String,
    /// What it is, for logs ("password_reset", "invitation", …).
    pub kind: &'static str,
}

enum Transport {
    Outbox(PathBuf),
    Smtp(Box<AsyncSmtpTransport<Tokio1Executor>>),
    None,
}

/// The handle requests use to queue mail.
#[derive(Clone)]
pub struct Mailer {
    queue: Option<mpsc::Sender<Email>>,
}

impl Mailer {
    /// Starts the sender task for this config (none for `transport = "none"`).
    pub fn start(config: &MailConfig) -> Result<Mailer, MailError> {
        let sender = Sender::new(config)?;
        if matches!(sender.transport, Transport::None) {
            return Ok(Mailer { queue: None });
        }
        let (tx, mut rx) = mpsc::channel::<Email>(QUEUE);
        tokio::spawn(async move {
            while let Some(email) = rx.recv().await {
                sender.deliver_with_retry(&email).await;
            }
        });
        Ok(Mailer { queue: Some(tx) })
    }

    /// A mailer that drops everything (mail is off).
    pub fn disabled() -> Mailer {
        Mailer { queue: None }
    }

    /// Queues a message without waiting.
    pub fn send(&self, email: Email) {
        let Some(q) = &self.queue else {
            return;
        };
        if let Err(e) = q.try_send(email) {
            tracing::error!(error = %e, "mail queue full or closed; message dropped");
        }
    }
}

/// Where mail goes: the gateway's background queue, or (for a short-lived command) delivered before returning.
#[derive(Clone)]
pub enum Outbox {
    /// Queued; never blocks (the server).
    Queue(Mailer),
    /// Delivered at once, one attempt (the CLI has no background task to outlive it).
    Now(std::sync::Arc<Sender>),
}

impl Outbox {
    /// An outbox that delivers at once through the configured transport.
    pub fn now(config: &MailConfig) -> Result<Outbox, MailError> {
        Ok(Outbox::Now(std::sync::Arc::new(Sender::new(config)?)))
    }

    /// Sends (or queues) one message. A failure is logged by recipient and kind, never with the body.
    pub async fn send(&self, email: Email) {
        match self {
            Outbox::Queue(mailer) => mailer.send(email),
            Outbox::Now(sender) => {
                if let Err(e) = sender.deliver(&email).await {
                    tracing::warn!(kind = email.kind, to = %email.to.escape_debug(), error = %e, "mail failed");
                }
            }
        }
    }
}

/// Builds and delivers messages; owned by the background task (and used directly by the CLI).
pub struct Sender {
    from: Mailbox,
    transport: Transport,
}

impl Sender {
    /// The transport described by the config.
    pub fn new(config: &MailConfig) -> Result<Sender, MailError> {
        let from: Mailbox = config.from.parse().map_err(|_| MailError::Address(config.from.clone()))?;
        let transport = match config.transport {
            MailTransport::None => Transport::None,
            MailTransport::Outbox => Transport::Outbox(config.outbox_dir.clone()),
            MailTransport::Smtp => Transport::Smtp(Box::new(smtp(config)?)),
        };
        Ok(Sender { from, transport })
    }

    fn message(&self, email: &Email) -> Result<Message, MailError> {
        let to: Mailbox = email.to.parse().map_err(|_| MailError::Address(email.to.clone()))?;
        // lettre picks the transfer encoding: lines over 76 characters (our links) go quoted-printable.
        Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(&email.subject)
            .header(ContentType::TEXT_PLAIN)
            .body(email.body.clone())
            .map_err(|e| MailError::Build(e.to_string()))
    }

    /// Delivers once.
    pub async fn deliver(&self, email: &Email) -> Result<(), MailError> {
        let msg = self.message(email)?;
        match &self.transport {
            Transport::None => Ok(()),
            Transport::Outbox(dir) => {
                let dir = dir.clone();
                let bytes = msg.formatted();
                tokio::task::spawn_blocking(move || write_outbox(&dir, &bytes))
                    .await
                    .map_err(|e| MailError::Outbox(e.to_string()))?
            }
            Transport::Smtp(t) => t.send(msg).await.map(|_| ()).map_err(|e| MailError::Smtp(e.to_string())),
        }
    }

    async fn deliver_with_retry(&self, email: &Email) {
        let mut wait = Duration::from_secs(1);
        for attempt in 1..=ATTEMPTS {
            match self.deliver(email).await {
                Ok(()) => {
                    tracing::info!(kind = email.kind, to = %email.to.escape_debug(), "mail sent");
                    return;
                }
                Err(e) => {
                    tracing::warn!(kind = email.kind, to = %email.to.escape_debug(), attempt, error = %e, "mail failed");
                    if attempt < ATTEMPTS {
                        tokio::time::sleep(wait).await;
                        wait *= 4;
                    }
                }
            }
        }
        tracing::error!(kind = email.kind, to = %email.to.escape_debug(), "mail given up after retries");
    }
}

fn smtp(config: &MailConfig) -> Result<AsyncSmtpTransport<Tokio1Executor>, MailError> {
    let host = config.smtp_host.clone().unwrap_or_default();
    let err = |e: lettre::transport::smtp::Error| MailError::Smtp(e.to_string());
    let mut builder = match config.smtp_tls {
        SmtpTls::Starttls => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&host).map_err(err)?,
        SmtpTls::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&host).map_err(err)?,
        SmtpTls::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&host).tls(Tls::None),
    };
    if config.smtp_tls == SmtpTls::Starttls {
        let params = TlsParameters::new(host.clone()).map_err(err)?;
        builder = builder.tls(Tls::Required(params));
    }
    let port = config.smtp_port.unwrap_or(match config.smtp_tls {
        SmtpTls::Starttls => 587,
        SmtpTls::Tls => 465,
        SmtpTls::None => 25,
    });
    builder = builder.port(port).timeout(Some(Duration::from_secs(30)));
    if let (Some(user), Some(pass)) = (&config.smtp_username, &config.smtp_password) {
        builder = builder.credentials(Credentials::new(user.clone(), pass.clone()));
    }
    Ok(builder.build())
}

/// Writes one message into the outbox atomically: a private temp file, fsync, then rename.
fn write_outbox(dir: &Path, bytes: &[u8]) -> Result<(), MailError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |e: std::io::Error| MailError::Outbox(format!("{}: {e}", dir.display()));
    crate::files::private_dir(dir).map_err(io)?;
    let id = hex::encode(crate::keys::random_bytes::<8>().map_err(|e| MailError::Outbox(e.to_string()))?);
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    let tmp = dir.join(format!(".tmp-{stamp}-{id}"));
    let dest = dir.join(format!("{stamp}-{id}.eml"));
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, &dest).map_err(io)?;
    // The rename is durable once the directory entry is.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn outbox_messages_are_private_complete_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let config = MailConfig {
            outbox_dir: dir.path().join("out"),
            from: "Portcullis <no-reply@example.com>".into(),
            ..MailConfig::default()
        };
        let sender = Sender::new(&config).unwrap();
        let email = Email {
            to: "alice@example.com".into(),
            subject: "Hello".into(),
            body: format!("Line one\nhttps://wiki.example.com/_portcullis/reset?token={}\n", "a".repeat(64)),
            kind: "test",
        };
        sender.deliver(&email).await.unwrap();
        let files: Vec<_> = std::fs::read_dir(dir.path().join("out")).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(files.len(), 1);
        assert!(files[0].extension().is_some_and(|e| e == "eml"));
        let mode = std::fs::metadata(&files[0]).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&files[0]).unwrap();
        assert!(text.contains("To: alice@example.com"), "{text}");
        assert!(text.contains("Subject: Hello"), "{text}");
        // The long link line is quoted-printable: `=` as `=3D` and soft line breaks (`=` CRLF).
        assert!(text.contains("Content-Transfer-Encoding: quoted-printable"), "{text}");
        let decoded = text.replace("=\r\n", "").replace("=3D", "=");
        assert!(decoded.contains(&format!("/_portcullis/reset?token={}", "a".repeat(64))), "{text}");
    }
}
