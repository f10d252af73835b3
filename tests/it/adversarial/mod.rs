//! Adversarial suite: every test is named for the attack it mounts, and fails when the
//! attack works, one file per attack family; the shared world and helpers are here.
//! TOTP codes come from the independent `oathtool` binary at the gateway's ManualClock time.

mod csrf;
mod hosts;
mod leaks;
mod lockout;
mod paths;
mod redirects;
mod sessions;
mod smuggling;
mod spoofing;
mod tokens;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use portcullis::clock::Clock;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// one_factor app with a `/public/` bypass rule and an `/admin/` deny rule.
const APP: &str = "app.test";
/// two_factor app.
const TF: &str = "tf.test";
/// bypass app with an `/admin/` deny rule.
const OPEN: &str = "open.test";
/// one_factor app restricted to the `admins` group.
const GRP: &str = "grp.test";
const PUBLIC_URL: &str = "https://portal.example.com";
const WRONG_PW: &str = "not-the-password-1";

// ---------------------------------------------------------------------------------------------
// Helpers (copied from two_factor.rs / admin.rs so this file stands alone)
// ---------------------------------------------------------------------------------------------

fn apps(app_up: &str, open_up: &str) -> String {
    format!(
        "[[app]]\nhost = \"{APP}\"\nupstream = \"{app_up}\"\npolicy = \"one_factor\"\n  [[app.rule]]\n  path = \"/public/\"\n  policy = \"bypass\"\n  [[app.rule]]\n  path = \"/admin/\"\n  policy = \"deny\"\n\n\
         [[app]]\nhost = \"{TF}\"\nupstream = \"{app_up}\"\npolicy = \"two_factor\"\n\n\
         [[app]]\nhost = \"{GRP}\"\nupstream = \"{app_up}\"\npolicy = \"one_factor\"\ngroups = [\"admins\"]\n\n\
         [[app]]\nhost = \"{OPEN}\"\nupstream = \"{open_up}\"\npolicy = \"bypass\"\n  [[app.rule]]\n  path = \"/admin/\"\n  policy = \"deny\"\n\n"
    )
}

const MAIL: &str = "[mail]\ntransport = \"outbox\"\noutbox_dir = \"{DIR}/outbox\"\npublic_url = \"https://portal.example.com\"\n\n\
                    [accounts]\npassword_reset = true\ninvitations = true\nreset_token_ttl = \"30m\"\ninvitation_ttl = \"7d\"\n\n";

/// `[two_factor] required = false`, lenient limits, mail on, the four apps. `extra` goes first (e.g. `[server]`).
fn world_cfg(extra: &str, app_up: &str, open_up: &str) -> String {
    format!(
        "{extra}\n[two_factor]\nrequired = false\n\n[limits]\nmax_failures = 1000\nmax_failures_per_address = 100000\n\n{MAIL}{}",
        apps(app_up, open_up)
    )
}

struct World {
    up: Upstream,
    open: Upstream,
    env: Env,
    gw: Gateway,
}

async fn world(extra: &str) -> World {
    let up = start_upstream().await;
    let open = start_upstream().await;
    let env = Env::new(&world_cfg(extra, &up.url(), &open.url()));
    env.add_user("alice", "alice@example.com", "Alice Liddell", &["staff"], PW).await;
    env.add_user("bob", "bob@example.com", "Bob", &["staff"], PW).await;
    env.add_user("tina", "tina@example.com", "Tina Two", &["staff", "admins"], PW).await;
    let gw = env.start().await;
    World { up, open, env, gw }
}

/// The (unescaped) value of a hidden input `name="NAME" value="..."`.
fn field(html: &str, name: &str) -> Option<String> {
    let marker = format!("name=\"{name}\" value=\"");
    let i = html.find(&marker)? + marker.len();
    let rest = &html[i..];
    Some(unescape(&rest[..rest.find('"')?]))
}

/// The href of the last link that starts before `text`.
fn href_before(html: &str, text: &str) -> Option<String> {
    let end = html.find(text)?;
    let head = &html[..end];
    let i = head.rfind("href=\"")? + 6;
    let rest = &head[i..];
    Some(unescape(&rest[..rest.find('"')?]))
}

/// From a Password session: GET /enroll → password → setup page → confirm with oathtool at the clock's time.
/// Leaves `c` with a Full session and moves the clock one step on (so the confirming code is never reused).
async fn enrol_signed_in(gw: &Gateway, c: &mut Client, pw: &str) -> Enrolled {
    let page = signed_in_setup_page(c, pw).await;
    let e = confirm_setup_page(c, &page, "/", || gw.clock.now()).await;
    gw.clock.advance(30);
    e
}

/// Password login of an enrolled user: returns the challenge page's csrf (the Pending session is in `c`).
async fn to_challenge(c: &mut Client, user: &str, rd: &str) -> (Resp, String) {
    login_to_challenge_page(c, user, PW, rd).await
}

/// Full login (password + TOTP) with a fresh time step.
async fn login_full(gw: &Gateway, c: &mut Client, user: &str, secret: &str) {
    gw.clock.advance(30);
    let (_, csrf) = to_challenge(c, user, "/").await;
    let r = submit_totp(c, &csrf, &totp_code(secret, gw.clock.now()), "/").await;
    assert_eq!(r.status, 303, "challenge of {user}: {}", r.text());
}

/// Who the upstream says it served (Remote-User), or None when the gateway answered itself.
async fn whoami(c: &mut Client) -> Option<String> {
    let r = c.get("/whoami").await;
    assert!(r.status < 500, "GET /whoami: {} {}", r.status, r.text());
    if r.status != 200 {
        return None;
    }
    r.upstream_header("remote-user").map(|v| v.join(","))
}

// ----- mail outbox -----------------------------------------------------------------------------

fn outbox(env: &Env) -> PathBuf {
    env.path().join("outbox")
}

fn mails(dir: &Path) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".eml") && !name.starts_with(".tmp") {
                m.insert(name, std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
    }
    m
}

/// Waits for a new message to `to` whose body contains `needle`; returns the body.
async fn wait_mail(env: &Env, to: &str, needle: &str, seen: &mut std::collections::BTreeSet<String>) -> String {
    let dir = outbox(env);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        for (name, text) in mails(&dir) {
            if seen.contains(&name) {
                continue;
            }
            let text = if text.to_ascii_lowercase().contains("content-transfer-encoding: quoted-printable") {
                qp_decode(&text)
            } else {
                text
            };
            if text.lines().any(|l| l.to_ascii_lowercase().starts_with("to:") && l.contains(to))
                && text.contains(needle)
            {
                seen.insert(name);
                return text;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no mail to {to} containing {needle:?} within 15s; outbox: {:?}",
            mails(&dir)
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

/// The first `URL/_portcullis/{kind}?token=<64 hex>` link in a mail: (full link, token).
fn link_in(mail: &str, kind: &str) -> (String, String) {
    // (wait_mail already decoded a quoted-printable body)
    let marker = format!("{PREFIX}/{kind}?token=");
    let i = mail.find(&marker).unwrap_or_else(|| panic!("no {marker} link in mail:\n{mail}"));
    let start = mail[..i].rfind(|c: char| c.is_whitespace()).map_or(0, |j| j + 1);
    let tok: String = mail[i + marker.len()..].chars().take_while(|c| c.is_ascii_hexdigit()).collect();
    assert_eq!(tok.len(), 64, "token is not 64 hex: {tok:?} in\n{mail}");
    (mail[start..i + marker.len() + 64].to_string(), tok)
}

async fn forgot(c: &mut Client, who: &str, headers: &[(&str, &str)]) -> Resp {
    let page = c.browse(&format!("{PREFIX}/forgot")).await;
    assert_eq!(page.status, 200, "GET /forgot: {}", page.text());
    let body = serde_urlencoded::to_string([("csrf", csrf_of(&page).as_str()), ("username", who)]).unwrap();
    let mut h = vec![("accept", "text/html")];
    h.extend_from_slice(headers);
    c.send("POST", &format!("{PREFIX}/forgot"), &h, Some(("application/x-www-form-urlencoded", body.into_bytes())))
        .await
}

/// GET /reset?token=T for the csrf, then POST with `fields` (token, password, password2 added).
async fn post_reset(c: &mut Client, page_token: &str, token: &str, pw: &str, extra: &[(&str, &str)]) -> Resp {
    let page = c.browse(&format!("{PREFIX}/reset?token={page_token}")).await;
    let csrf = extract_csrf(&page.text()).unwrap_or_default();
    let csrf = if csrf.is_empty() {
        // the page for a good token may be unavailable (410): take a csrf from /forgot, same anonymous binding
        csrf_of(&c.browse(&format!("{PREFIX}/forgot")).await)
    } else {
        csrf
    };
    let mut f: Vec<(&str, &str)> = vec![("csrf", &csrf), ("token", token), ("password", pw), ("password2", pw)];
    f.extend_from_slice(extra);
    c.post_form(&format!("{PREFIX}/reset"), &f).await
}

async fn password_works(gw: &Gateway, user: &str, pw: &str) -> bool {
    let r = gw.client(APP).login(user, pw, "/").await;
    assert!(r.status == 303 || r.status == 401, "login {user}: {} {}", r.status, r.text());
    r.status == 303
}

// ----- raw TCP ---------------------------------------------------------------------------------

/// Writes `data`, reads until EOF or `quiet` without a byte (at most 10 s). Returns (bytes, closed by peer).
async fn raw_exchange(addr: std::net::SocketAddr, data: &[u8], quiet: Duration) -> (Vec<u8>, bool) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(data).await;
    let mut buf = Vec::new();
    let mut tmp = [0u8; 16384];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return (buf, false);
        }
        match tokio::time::timeout(quiet.min(left), s.read(&mut tmp)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (buf, true),
            Ok(Ok(n)) => buf.extend_from_slice(&tmp[..n]),
            Err(_) => return (buf, false),
        }
    }
}

/// Status codes of every response in a raw byte stream.
fn statuses(buf: &[u8]) -> Vec<u16> {
    let text = String::from_utf8_lossy(buf);
    let mut v = Vec::new();
    for (i, _) in text.match_indices("HTTP/1.") {
        if (i == 0 || text[..i].ends_with('\n'))
            && let Some(code) = text[i..].split_whitespace().nth(1).and_then(|s| s.parse().ok())
        {
            v.push(code);
        }
    }
    v
}
