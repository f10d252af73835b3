//! The mail the gateway and the CLI write into `[mail] outbox_dir`: parsed `.eml` files, waited for one by one.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::Env;

/// How long a test waits for a message.
pub const MAIL_TIMEOUT: Duration = Duration::from_secs(30);

/// One message.
#[derive(Debug, Clone)]
pub struct Mail {
    pub file: String,
    /// (lower-case name, unfolded value)
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub raw: String,
}

impl Mail {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone())
    }
    pub fn subject(&self) -> String {
        self.header("subject").unwrap_or_default()
    }
    pub fn to(&self) -> String {
        self.header("to").unwrap_or_default()
    }
    pub fn is_to(&self, addr: &str) -> bool {
        self.to().to_ascii_lowercase().contains(&addr.to_ascii_lowercase())
    }
}

/// Decodes a quoted-printable body (soft line breaks and `=XX`).
pub fn qp_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'=' {
            if b.get(i + 1) == Some(&b'\r') && b.get(i + 2) == Some(&b'\n') {
                i += 3;
                continue;
            }
            if b.get(i + 1) == Some(&b'\n') {
                i += 2;
                continue;
            }
            if let Some(v) = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_mail(file: &str, raw: &str) -> Mail {
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .or_else(|| raw.split_once("\n\n"))
        .unwrap_or_else(|| panic!("{file}: no header/body separator: {raw}"));
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in head.lines() {
        if line.starts_with(' ') || line.starts_with('\t') {
            if let Some(last) = headers.last_mut() {
                last.1.push(' ');
                last.1.push_str(line.trim());
            }
            continue;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let cte = headers
        .iter()
        .find(|(k, _)| k == "content-transfer-encoding")
        .map(|(_, v)| v.to_ascii_lowercase())
        .unwrap_or_default();
    let body = match cte.as_str() {
        "quoted-printable" => qp_decode(body),
        "base64" => panic!("{file}: base64 body, expected 7bit text: {raw}"),
        _ => body.to_string(),
    }
    .replace("\r\n", "\n");
    Mail { file: file.to_string(), headers, body, raw: raw.to_string() }
}

pub struct Outbox {
    dir: PathBuf,
    pub taken: HashSet<String>,
}

impl Outbox {
    pub fn new(env: &Env) -> Outbox {
        Outbox { dir: env.path().join("outbox"), taken: HashSet::new() }
    }

    /// Every finished message (`*.eml`), oldest first.
    pub fn all(&self) -> Vec<Mail> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".eml"))
            .collect();
        names.sort();
        names
            .iter()
            .filter_map(|n| {
                let raw = std::fs::read_to_string(self.dir.join(n)).ok()?;
                Some(parse_mail(n, &raw))
            })
            .collect()
    }

    pub fn summary(&self) -> String {
        self.all()
            .iter()
            .map(|m| format!("  {} to={:?} subject={:?}", m.file, m.to(), m.subject()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits for a message not returned before that matches `pred`; marks it taken.
    pub async fn wait_new(&mut self, what: &str, pred: impl Fn(&Mail) -> bool) -> Mail {
        let deadline = Instant::now() + MAIL_TIMEOUT;
        loop {
            if let Some(m) = self.all().into_iter().find(|m| !self.taken.contains(&m.file) && pred(m)) {
                self.taken.insert(m.file.clone());
                return m;
            }
            if Instant::now() > deadline {
                panic!("no email \"{what}\" in the outbox within {MAIL_TIMEOUT:?}; outbox:\n{}", self.summary());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The next notification with this subject (after "Portcullis: ") to alice@example.com.
    pub async fn notice(&mut self, subject: &str) -> Mail {
        self.notice_to("alice@example.com", subject).await
    }

    /// The next notification with this subject (after "Portcullis: ") to `to`.
    pub async fn notice_to(&mut self, to: &str, subject: &str) -> Mail {
        let want = format!("Portcullis: {subject}");
        let m = self.wait_new(&want, |m| m.subject() == want && m.is_to(to)).await;
        assert!(
            m.body.contains("Alice Liddell") || m.body.contains("Hello"),
            "notification without a greeting: {}",
            m.raw
        );
        m
    }

    pub async fn reset_mail(&mut self, to: &str) -> Mail {
        self.wait_new(&format!("reset link to {to}"), |m| m.is_to(to) && m.body.contains("/reset?token=")).await
    }

    pub async fn invite_mail(&mut self, to: &str) -> Mail {
        self.wait_new(&format!("invitation to {to}"), |m| m.is_to(to) && m.body.contains("/invite?token=")).await
    }
}
