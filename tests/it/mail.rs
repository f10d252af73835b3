//! Mail (outbox and SMTP), forgot password, invitations, security notifications, password change.
//! Links are parsed from the `.eml` files the gateway writes into `[mail] outbox_dir`; TOTP codes come from the
//! independent `oathtool` binary, computed for the gateway's ManualClock time (system time for a child process).

use std::time::{Duration, Instant};

use portcullis::clock::Clock;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::support::shown_secret_spaced as shown_secret;
use crate::support::*;

// ---------------------------------------------------------------------------------------------
// Constants and config
// ---------------------------------------------------------------------------------------------

const USER: &str = "alice";
const EMAIL: &str = "alice@example.com";
const PUBLIC: &str = "https://wiki.example.com";
/// Host of the `one_factor` app (also the public_url host).
const WIKI: &str = "wiki.example.com";
/// Host of the `two_factor` app.
const SECURE: &str = "secure.example.com";
const NEW_PW: &str = "N3w-passw0rd-for-alice";
/// Three failures within ten minutes lock a step for fifteen.
const THREE_FAILURES: &str = "[limits]\nmax_failures = 3\nfailure_window = \"10m\"\nlockout = \"15m\"\n";
const NEWER_PW: &str = "Ev3n-newer-passw0rd";

/// The outbox `[mail]` section body.
fn outbox_mail() -> String {
    format!("transport = \"outbox\"\noutbox_dir = \"{{DIR}}/outbox\"\npublic_url = \"{PUBLIC}\"\n")
}

/// A full config (after `[storage]`): `[two_factor] required`, `[mail]` body, `[accounts]`, extra sections, apps.
fn config(up: &Upstream, required: bool, mail: &str, extra: &str) -> String {
    format!(
        "[two_factor]\nrequired = {required}\n\n[mail]\n{mail}\n[accounts]\npassword_reset = true\ninvitations = true\n\
         reset_token_ttl = \"30m\"\ninvitation_ttl = \"7d\"\n\n{extra}\n\n{}{}",
        app(WIKI, &up.url(), "one_factor"),
        app(SECURE, &up.url(), "two_factor"),
    )
}

async fn env_with_alice(rest: &str) -> Env {
    let env = Env::new(rest);
    env.add_user(USER, EMAIL, "Alice Liddell", &["staff"], PW).await;
    env
}

async fn cli_ok(env: &Env, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let o = env.cli(args, stdin).await;
    assert!(o.status.success(), "portcullis {args:?}: {}", out_text(&o));
    o
}

/// `user show NAME --json`.
async fn show_user(env: &Env, name: &str) -> serde_json::Value {
    let o = cli_ok(env, &["user", "show", name, "--json"], None).await;
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("user show --json is not JSON ({e}): {}", out_text(&o)))
}

// ---------------------------------------------------------------------------------------------
// Outbox
// ---------------------------------------------------------------------------------------------

/// The whitespace-delimited URL in `body` that contains `needle`.
fn url_with(body: &str, needle: &str) -> Option<String> {
    let i = body.find(needle)?;
    let start = body[..i].rfind(|c: char| c.is_whitespace() || c == '<' || c == '"').map(|j| j + 1).unwrap_or(0);
    let end = body[i..].find(|c: char| c.is_whitespace() || c == '>' || c == '"').map(|j| i + j).unwrap_or(body.len());
    Some(body[start..end].to_string())
}

fn token_of(url: &str) -> String {
    let t = url
        .split_once("token=")
        .unwrap_or_else(|| panic!("no token= in {url}"))
        .1
        .split('&')
        .next()
        .unwrap()
        .to_string();
    assert!(t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()), "token in {url} is not 64 hex digits");
    t
}

/// The emailed link for `kind` ("reset" / "invite"), checked against public_url; returns (link, token).
fn link_in(m: &Mail, kind: &str) -> (String, String) {
    let needle = format!("{PREFIX}/{kind}?token=");
    let url = url_with(&m.body, &needle).unwrap_or_else(|| panic!("no {needle} link in the email body: {}", m.raw));
    assert!(
        url.starts_with(&format!("{PUBLIC}{needle}")),
        "the emailed link {url:?} is not built from public_url {PUBLIC}"
    );
    let token = token_of(&url);
    (url, token)
}

/// Path + query of an emailed link (for the test client, which connects to the gateway directly).
fn path_of(url: &str) -> String {
    url.strip_prefix(PUBLIC).unwrap_or_else(|| panic!("{url} does not start with {PUBLIC}")).to_string()
}

// ---------------------------------------------------------------------------------------------
// HTTP helpers
// ---------------------------------------------------------------------------------------------

/// GET /forgot (sets the csrf cookie when absent) and return the csrf token.
async fn forgot_csrf(c: &mut Client) -> String {
    let page = c.browse(&format!("{PREFIX}/forgot")).await;
    assert_eq!(page.status, 200, "GET /forgot: {}", page.text());
    assert!(c.jar.contains_key(CSRF), "GET /forgot did not set the {CSRF} cookie");
    csrf_of(&page)
}

async fn post_forgot(c: &mut Client, csrf: &str, login: &str) -> Resp {
    c.post_form(&format!("{PREFIX}/forgot"), &[("csrf", csrf), ("username", login)]).await
}

/// Ask for a reset link as `login`; asserts the 200 "If an account matches" answer.
async fn forgot(gw: &Gateway, login: &str) -> Resp {
    let mut c = gw.client(WIKI);
    let csrf = forgot_csrf(&mut c).await;
    let r = post_forgot(&mut c, &csrf, login).await;
    assert_eq!(r.status, 200, "POST /forgot: {}", r.text());
    assert!(r.text().contains("If an account matches"), "POST /forgot answer: {}", r.text());
    r
}

/// Open an emailed link in a fresh browser; returns the client and the page.
async fn open_link(gw: &Gateway, url: &str) -> (Client, Resp) {
    let mut c = gw.client(WIKI);
    let r = c.browse(&path_of(url)).await;
    (c, r)
}

/// POST /reset with the csrf from `page` and extra fields (code / recovery_code).
async fn post_reset(c: &mut Client, page: &Resp, token: &str, pw: &str, pw2: &str, extra: &[(&str, &str)]) -> Resp {
    let csrf = csrf_of(page);
    let mut fields: Vec<(&str, &str)> = vec![("csrf", &csrf), ("token", token), ("password", pw), ("password2", pw2)];
    fields.extend_from_slice(extra);
    c.post_form(&format!("{PREFIX}/reset"), &fields).await
}

fn assert_gone(r: &Resp, what: &str) {
    assert_eq!(r.status, 410, "{what}: expected 410, got {}: {}", r.status, r.text());
    assert!(r.text().contains("not valid"), "{what}: 410 page without \"not valid\": {}", r.text());
}

fn assert_password_changed_page(r: &Resp, what: &str) {
    assert_eq!(r.status, 200, "{what}: {}", r.text());
    assert!(r.text().contains("Password changed"), "{what}: no \"Password changed\" page: {}", r.text());
    assert!(
        session_set_cookie(r).is_none(),
        "{what}: a reset must not sign anyone in; set-cookie: {:?}",
        r.set_cookies()
    );
}

/// Password login status for a fresh client: 303 location or the status.
async fn login_result(gw: &Gateway, user: &str, pw: &str) -> (u16, String) {
    let mut c = gw.client(WIKI);
    let r = c.login(user, pw, "/").await;
    let loc = r.header("location").unwrap_or_default();
    (r.status, loc)
}

/// Settings password change: GET the form, POST current + new twice.
async fn change_password(c: &mut Client, current: &str, new: &str) -> Resp {
    let page = c.browse(&format!("{PREFIX}/settings/password")).await;
    assert_eq!(page.status, 200, "GET /settings/password: {}", page.text());
    let csrf = csrf_of(&page);
    c.post_form(
        &format!("{PREFIX}/settings/password"),
        &[("csrf", &csrf), ("current", current), ("password", new), ("password2", new)],
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// TOTP helpers (copied from two_factor.rs)
// ---------------------------------------------------------------------------------------------

struct Setup {
    secret: String,
    csrf: String,
}

fn parse_setup(r: &Resp) -> Setup {
    let html = r.text();
    let shown = shown_secret(&html)
        .unwrap_or_else(|| panic!("no <p class=\"secret code\"> in setup page (status {}): {html}", r.status));
    let secret: String = shown.chars().filter(|c| !c.is_whitespace()).collect();
    assert!(html.contains("/enroll/confirm"), "setup page without the confirm form: {html}");
    Setup { secret, csrf: csrf_of(r) }
}

async fn confirm(c: &mut Client, s: &Setup, code: &str, rd: &str) -> Resp {
    c.post_form(&format!("{PREFIX}/enroll/confirm"), &[("csrf", &s.csrf), ("rd", rd), ("code", code)]).await
}

struct Enrolled {
    secret: String,
    codes: Vec<String>,
}

/// Confirm a setup page with a code at `at`; asserts the codes page.
async fn finish_enroll(c: &mut Client, s: Setup, at: u64, rd: &str) -> Enrolled {
    let r = confirm(c, &s, &totp_code(&s.secret, at), rd).await;
    assert_eq!(r.status, 200, "confirm with the right code: {}", r.text());
    assert!(r.text().contains("Two-factor authentication is on"), "codes page: {}", r.text());
    let codes = shown_codes(&r.text());
    assert_eq!(codes.len(), 10, "codes page: {}", r.text());
    assert!(session_set_cookie(&r).is_some(), "no Full session cookie on the codes page: {:?}", r.set_cookies());
    Enrolled { secret: s.secret, codes }
}

/// Forced enrolment right after a password login (required = true).
async fn forced_enroll(gw: &Gateway, c: &mut Client, user: &str, pw: &str) -> Enrolled {
    let r = c.login(user, pw, "/").await;
    assert_eq!(r.status, 303, "login: {}", r.text());
    let loc = r.location();
    assert!(loc.starts_with(&format!("{PREFIX}/enroll")), "login of a user without 2FA (required) went to {loc}");
    let page = c.browse(&loc).await;
    assert_eq!(page.status, 200, "setup page: {}", page.text());
    let s = parse_setup(&page);
    finish_enroll(c, s, gw.clock.now(), "/").await
}

/// From a Password/Full session: GET /enroll (password form), POST it, get the setup page.
async fn settings_setup(c: &mut Client, pw: &str) -> Setup {
    parse_setup(&signed_in_setup_page(c, pw).await)
}

/// Password login of an enrolled user up to the challenge; returns the challenge csrf.
async fn login_to_challenge(c: &mut Client, user: &str, pw: &str) -> String {
    login_to_challenge_page(c, user, pw, "/").await.1
}

async fn post_challenge(c: &mut Client, fields: &[(&str, &str)], ua: &str) -> Resp {
    let body = serde_urlencoded::to_string(fields).unwrap();
    c.send(
        "POST",
        &format!("{PREFIX}/challenge"),
        &[("accept", "text/html"), ("user-agent", ua)],
        Some(("application/x-www-form-urlencoded", body.into_bytes())),
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// SMTP sink
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct SmtpMessage {
    mail_from: String,
    rcpt_to: Vec<String>,
    data: String,
}

struct SmtpSink {
    port: u16,
    rx: mpsc::UnboundedReceiver<SmtpMessage>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start_smtp_sink() -> SmtpSink {
    start_smtp_sink_greeting_after(Duration::ZERO).await
}

/// A sink that waits `delay` before its 220 greeting (a slow or overloaded mail server).
async fn start_smtp_sink_greeting_after(delay: Duration) -> SmtpSink {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let tx = tx.clone();
            conns.spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = smtp_session(tcp, tx).await;
            });
        }
    });
    SmtpSink { port, rx, task }
}

async fn smtp_session(tcp: tokio::net::TcpStream, tx: mpsc::UnboundedSender<SmtpMessage>) -> std::io::Result<()> {
    let (r, mut w) = tcp.into_split();
    let mut r = BufReader::new(r);
    w.write_all(b"220 localhost ESMTP portcullis-test-sink\r\n").await?;
    let (mut from, mut rcpt) = (String::new(), Vec::new());
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let cmd = line.trim_end().to_string();
        let upper = cmd.to_ascii_uppercase();
        if upper.starts_with("EHLO") {
            w.write_all(b"250-localhost\r\n250 8BITMIME\r\n").await?;
        } else if upper.starts_with("HELO") {
            w.write_all(b"250 localhost\r\n").await?;
        } else if upper.starts_with("MAIL FROM:") {
            from = cmd[10..].trim().to_string();
            rcpt.clear();
            w.write_all(b"250 2.1.0 OK\r\n").await?;
        } else if upper.starts_with("RCPT TO:") {
            rcpt.push(cmd[8..].trim().to_string());
            w.write_all(b"250 2.1.5 OK\r\n").await?;
        } else if upper == "DATA" {
            w.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n").await?;
            let mut data = String::new();
            loop {
                let mut l = String::new();
                if r.read_line(&mut l).await? == 0 {
                    return Ok(());
                }
                if l == ".\r\n" || l == ".\n" {
                    break;
                }
                // dot-unstuffing
                if let Some(rest) = l.strip_prefix("..") {
                    data.push('.');
                    data.push_str(rest);
                } else {
                    data.push_str(&l);
                }
            }
            let _ =
                tx.send(SmtpMessage { mail_from: std::mem::take(&mut from), rcpt_to: std::mem::take(&mut rcpt), data });
            w.write_all(b"250 2.0.0 OK queued\r\n").await?;
        } else if upper == "RSET" {
            from.clear();
            rcpt.clear();
            w.write_all(b"250 2.0.0 OK\r\n").await?;
        } else if upper == "NOOP" {
            w.write_all(b"250 2.0.0 OK\r\n").await?;
        } else if upper == "QUIT" {
            w.write_all(b"221 2.0.0 Bye\r\n").await?;
            return Ok(());
        } else {
            w.write_all(b"502 5.5.2 Command not recognized\r\n").await?;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Forgot password / reset
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_journey_for_a_user_without_2fa() {
    let up = start_upstream().await;
    let env = env_with_alice(&config(&up, false, &outbox_mail(), "")).await;
    let gw = env.start().await;
    let mut outbox = Outbox::new(&env);

    // A session from before the reset.
    let mut old = gw.client(WIKI);
    old.login_ok(USER, PW).await;
    let r = old.get("/before").await;
    assert_eq!(r.status, 200, "password session reaches the one_factor app");

    // The login page offers the link.
    let mut lc = gw.client(WIKI);
    let page = lc.browse(&format!("{PREFIX}/login")).await;
    assert!(page.text().contains("Forgot password?"), "login page without \"Forgot password?\": {}", page.text());

    forgot(&gw, USER).await;
    let m = outbox.reset_mail(EMAIL).await;
    assert!(m.subject().starts_with("Portcullis: "), "subject {:?}", m.subject());
    let (link, token) = link_in(&m, "reset");

    // GET the link twice (mail scanners prefetch): neither consumes the token.
    let (mut c, first) = open_link(&gw, &link).await;
    assert_eq!(first.status, 200, "first GET of the link: {}", first.text());
    let page = c.browse(&path_of(&link)).await;
    assert_eq!(page.status, 200, "second GET of the link: {}", page.text());
    assert!(page.text().contains("name=\"password2\""), "reset form: {}", page.text());
    assert!(!page.text().contains("name=\"code\""), "a user without 2FA must not be asked for a code: {}", page.text());

    // Mismatched passwords: 422, token still usable.
    let r = post_reset(&mut c, &page, &token, NEW_PW, "something-else-1", &[]).await;
    assert_eq!(r.status, 422, "mismatched passwords: {}", r.text());

    let r = post_reset(&mut c, &page, &token, NEW_PW, NEW_PW, &[]).await;
    assert_password_changed_page(&r, "reset of a user without 2FA");
    assert!(!c.jar.contains_key(SESSION), "the resetting browser has a session: {:?}", c.jar);

    // Old password fails, new works.
    let (st, _) = login_result(&gw, USER, PW).await;
    assert_eq!(st, 401, "the old password still works after the reset");
    let (st, loc) = login_result(&gw, USER, NEW_PW).await;
    assert_eq!(st, 303, "the new password doesn't work");
    assert_eq!(loc, "/");

    // The session from before ended.
    let r = old.get("/after").await;
    assert!(is_no_session(&r), "a session from before the reset still works: {} {}", r.status, r.text());

    let n = outbox.notice("Your password was changed").await;
    assert!(n.is_to(EMAIL));
}

/// The reset email is a plain-text part whose transfer encoding a mail client decodes (7bit, or quoted-printable
/// when the link line is longer than 76 characters), and the decoded body holds the whole link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emailed_links_survive_the_transfer_encoding_of_a_text_plain_body() {
    let up = start_upstream().await;
    let env = env_with_alice(&config(&up, false, &outbox_mail(), "")).await;
    let gw = env.start().await;
    let mut outbox = Outbox::new(&env);
    forgot(&gw, USER).await;
    let m = outbox.reset_mail(EMAIL).await;
    let (link, _) = link_in(&m, "reset");
    let ct = m.header("content-type").unwrap_or_default().to_ascii_lowercase();
    assert!(ct.starts_with("text/plain"), "Content-Type {ct:?}");
    let cte = m.header("content-transfer-encoding").unwrap_or_else(|| "7bit".into()).to_ascii_lowercase();
    assert!(
        cte == "7bit" || cte == "quoted-printable",
        "Content-Transfer-Encoding of the reset email: {cte}\n{}",
        m.raw
    );
    let token = link.rsplit("token=").next().unwrap_or_default();
    assert_eq!(token.len(), 64, "the decoded link lost part of its token: {link}");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "{link}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_journey_with_2fa_asks_for_a_code_first() {
    let up = start_upstream().await;
    let env = env_with_alice(&config(&up, true, &outbox_mail(), "")).await;
    let gw = env.start().await;
    let mut outbox = Outbox::new(&env);
    let mut c0 = gw.client(SECURE);
    let en = forced_enroll(&gw, &mut c0, USER, PW).await;

    forgot(&gw, EMAIL).await; // by email address this time
    let m = outbox.reset_mail(EMAIL).await;
    let (link, token) = link_in(&m, "reset");
    let (mut c, page) = open_link(&gw, &link).await;
    assert_eq!(page.status, 200, "reset form: {}", page.text());
    assert!(
        page.text().contains("name=\"code\"") && page.text().contains("name=\"recovery_code\""),
        "the reset form of an enrolled user must ask for a code or a recovery code: {}",
        page.text()
    );

    // No second factor: 401 and nothing changes.
    let r = post_reset(&mut c, &page, &token, NEW_PW, NEW_PW, &[]).await;
    assert_eq!(r.status, 401, "reset without a code: {}", r.text());
    let wrong = wrong_code(&en.secret, gw.clock.now());
    let r = post_reset(&mut c, &page, &token, NEW_PW, NEW_PW, &[("code", &wrong)]).await;
    assert_eq!(r.status, 401, "reset with a wrong code: {}", r.text());
    let r = post_reset(&mut c, &page, &token, NEW_PW, NEW_PW, &[("recovery_code", "aaaaa-bbbbb-ccccc")]).await;
    assert_eq!(r.status, 401, "reset with a wrong recovery code: {}", r.text());
    let (st, _) = login_result(&gw, USER, NEW_PW).await;
    assert_eq!(st, 401, "the password changed without the second factor");
    let (st, loc) = login_result(&gw, USER, PW).await;
    assert_eq!(st, 303, "the old password stopped working after a refused reset");
    assert!(loc.starts_with(&format!("{PREFIX}/challenge")), "{loc}");

    // A valid recovery code with passwords that can't be set: refused before the code is spent.
    for (pw, pw2) in [(NEW_PW, "a-different-password"), ("short", "short")] {
        let r = post_reset(&mut c, &page, &token, pw, pw2, &[("recovery_code", &en.codes[0])]).await;
        assert_eq!(r.status, 422, "reset with passwords {pw:?}/{pw2:?}: {}", r.text());
    }
    assert_eq!(show_user(&env, USER).await["two_factor"]["recovery_codes_left"], 10, "a refused reset spent a code");

    // With a recovery code (the same token and code: refusals don't spend them).
    let r = post_reset(&mut c, &page, &token, NEW_PW, NEW_PW, &[("recovery_code", &en.codes[0])]).await;
    assert_password_changed_page(&r, "reset with a recovery code");
    let (st, _) = login_result(&gw, USER, PW).await;
    assert_eq!(st, 401, "the old password still works");
    let (st, loc) = login_result(&gw, USER, NEW_PW).await;
    assert_eq!(st, 303, "the new password doesn't work");
    assert!(
        loc.starts_with(&format!("{PREFIX}/challenge")),
        "after a reset, login must still go to the challenge (2FA kept), went to {loc}"
    );
    let j = show_user(&env, USER).await;
    assert_eq!(j["two_factor"]["enabled"], true, "2FA removed by a reset: {j}");
    assert_eq!(j["two_factor"]["recovery_codes_left"], 9, "{j}");

    // With a TOTP code (a later step than the enrolment's).
    forgot(&gw, USER).await;
    let m = outbox.reset_mail(EMAIL).await;
    let (link, token2) = link_in(&m, "reset");
    assert_ne!(token, token2);
    let (mut c, page) = open_link(&gw, &link).await;
    assert_eq!(page.status, 200, "second reset form: {}", page.text());
    gw.clock.advance(30);
    let code = code_now(&gw, &en.secret);
    let r = post_reset(&mut c, &page, &token2, NEWER_PW, NEWER_PW, &[("code", &code)]).await;
    assert_password_changed_page(&r, "reset with a TOTP code");
    let (st, _) = login_result(&gw, USER, NEW_PW).await;
    assert_eq!(st, 401, "the previous password still works");
    let (st, loc) = login_result(&gw, USER, NEWER_PW).await;
    assert_eq!(st, 303);
    assert!(loc.starts_with(&format!("{PREFIX}/challenge")), "{loc}");
    let j = show_user(&env, USER).await;
    assert_eq!(j["two_factor"]["enabled"], true, "2FA removed by a reset: {j}");
    // The reset's TOTP code is spent (its step counts as used).
    let mut c2 = gw.client(SECURE);
    let csrf = login_to_challenge(&mut c2, USER, NEWER_PW).await;
    let r = post_challenge(&mut c2, &[("csrf", &csrf), ("rd", "/"), ("method", "totp"), ("code", &code)], "test").await;
    assert_eq!(r.status, 401, "the TOTP code used for the reset was accepted again: {}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_token_is_single_use_and_expires() {
    let up = start_upstream().await;
    let env = env_with_alice(&config(&up, false, &outbox_mail(), "")).await;
    let gw = env.start().await;
    let mut outbox = Outbox::new(&env);

    forgot(&gw, USER).await;
    let (link, token) = link_in(&outbox.reset_mail(EMAIL).await, "reset");
    let (mut c, page) = open_link(&gw, &link).await;
    assert_eq!(page.status, 200);
    let r = post_reset(&mut c, &page, &token, NEW_PW, NEW_PW, &[]).await;
    assert_password_changed_page(&r, "first use");
    // Reuse: the form and the POST are refused.
    let (_, again) = open_link(&gw, &link).await;
    assert_gone(&again, "GET of a used reset link");
    let r = post_reset(&mut c, &page, &token, NEWER_PW, NEWER_PW, &[]).await;
    assert_gone(&r, "POST with a used reset token");
    let (st, _) = login_result(&gw, USER, NEWER_PW).await;
    assert_eq!(st, 401, "a reused token changed the password");

    // Expiry by the gateway clock (reset_token_ttl = 30m).
    forgot(&gw, USER).await;
    let (link, token) = link_in(&outbox.reset_mail(EMAIL).await, "reset");
    gw.clock.advance(30 * 60 - 60);
    let (mut c, page) = open_link(&gw, &link).await;
    assert_eq!(page.status, 200, "a token one minute before expiry: {}", page.text());
    gw.clock.advance(61);
    let (_, late) = open_link(&gw, &link).await;
    assert_gone(&late, "GET of an expired reset link");
    let r = post_reset(&mut c, &page, &token, NEWER_PW, NEWER_PW, &[]).await;
    assert_gone(&r, "POST with an expired reset token");
    let (st, _) = login_result(&gw, USER, NEW_PW).await;
    assert_eq!(st, 303, "an expired token changed the password");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_token_is_void_after_a_password_change() {
    let up = start_upstream().await;
    let env = env_with_alice(&config(&up, false, &outbox_mail(), "")).await;
    let gw = env.start().await;
    let mut outbox = Outbox::new(&env);

    // CLI passwd after the email.
    forgot(&gw, USER).await;
    let (link, token) = link_in(&outbox.reset_mail(EMAIL).await, "reset");
    let (mut c, page) = open_link(&gw, &link).await;
    assert_eq!(page.status, 200);
    cli_ok(&env, &["user", "passwd", USER, "--password-stdin"], Some(NEW_PW)).await;
    let (_, r) = open_link(&gw, &link).await;
    assert_gone(&r, "GET of a link issued before `user passwd`");
    let r = post_reset(&mut c, &page, &token, NEWER_PW, NEWER_PW, &[]).await;
    assert_gone(&r, "POST with a token issued before `user passwd`");
    let (st, _) = login_result(&gw, USER, NEW_PW).await;
    assert_eq!(st, 303, "the CLI password doesn't work");

    // Settings password change after the email.
    forgot(&gw, USER).await;
    let (link, token) = link_in(&outbox.reset_mail(EMAIL).await, "reset");
    let (mut c, page) = open_link(&gw, &link).await;
    assert_eq!(page.status, 200, "fresh link: {}", page.text());
    let mut s = gw.client(WIKI);
    s.login_ok(USER, NEW_PW).await;
    let r = change_password(&mut s, NEW_PW, NEWER_PW).await;
    assert_eq!(r.status, 200, "settings password change: {}", r.text());
    let (_, r) = open_link(&gw, &link).await;
    assert_gone(&r, "GET of a link issued before a settings password change");
    let r = post_reset(&mut c, &page, &token, PW, PW, &[]).await;
    assert_gone(&r, "POST with a token issued before a settings password change");
    let (st, _) = login_result(&gw, USER, NEWER_PW).await;
    assert_eq!(st, 303);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_tokens_are_void_after_two_factor_is_turned_on_or_off() {
    let up = start_upstream().await;
    let env = env_with_alice(&config(&up, false, &outbox_mail(), "")).await;
    let gw = env.start().await;
    let mut outbox = Outbox::new(&env);
    // A link issued while 2FA is off asks for no code: once 2FA is on it must not work (it would bypass it).
    forgot(&gw, USER).await;
    let (link, token) = link_in(&outbox.reset_mail(EMAIL).await, "reset");
    let (mut c, page) = open_link(&gw, &link).await;
    assert_eq!(page.status, 200, "fresh link: {}", page.text());
    let mut s = gw.client(WIKI);
    s.login_ok(USER, PW).await;
    let setup = settings_setup(&mut s, PW).await;
    finish_enroll(&mut s, setup, gw.clock.now(), "/").await;
    let (_, r) = open_link(&gw, &link).await;
    assert_gone(&r, "GET of a link issued before 2FA was turned on");
    let r = post_reset(&mut c, &page, &token, NEW_PW, NEW_PW, &[]).await;
    assert_gone(&r, "POST with a token issued before 2FA was turned on");
    // ... and a link issued while it is on is void once it is turned off
    forgot(&gw, USER).await;
    let (link, _) = link_in(&outbox.reset_mail(EMAIL).await, "reset");
    let (_, page) = open_link(&gw, &link).await;
    assert_eq!(page.status, 200, "fresh link with 2FA on: {}", page.text());
    let r = confirm_password(&mut s, "/settings/disable", PW).await;
    assert_eq!(r.status, 303, "disable 2FA: {}", r.text());
    let (_, r) = open_link(&gw, &link).await;
    assert_gone(&r, "GET of a link issued before 2FA was turned off");
    let (st, _) = login_result(&gw, USER, PW).await;
    assert_eq!(st, 303, "the password is unchanged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgot_answers_identically_for_known_and_unknown_accounts() {
    let up = start_upstream().await;
    let env = env_with_alice(&config(&up, false, &outbox_mail(), "")).await;
    let gw = env.start().await;
    let mut outbox = Outbox::new(&env);
    let unknown = "mallory@example.com";

    // One browser, one csrf cookie for both.
    let mut c = gw.client(WIKI);
    let csrf = forgot_csrf(&mut c).await;
    let ru = post_forgot(&mut c, &csrf, unknown).await;
    let rk = post_forgot(&mut c, &csrf, EMAIL).await;
    assert_eq!(rk.status, 200, "known: {}", rk.text());
    assert_eq!(ru.status, rk.status, "status differs for known and unknown accounts");
    assert_eq!(ru.text(), rk.text(), "the answer differs for known and unknown accounts");
    assert_eq!(ru.header("content-type"), rk.header("content-type"));
    assert_eq!(ru.set_cookies(), rk.set_cookies(), "Set-Cookie differs");

    // Only the known account gets an email (the queue is FIFO: the unknown request went first).
    outbox.reset_mail(EMAIL).await;
    let all = outbox.all();
    assert_eq!(all.len(), 1, "expected exactly one email:\n{}", outbox.summary());
    assert!(!all.iter().any(|m| m.is_to(unknown)), "an email went to an unknown address");

    // Timing: medians of known and unknown within a loose factor. Limits: 3 per account and 10 per address
    // in 15 min, so each round stays below them and the clock moves past the window between rounds.
    let (mut tk, mut tu) = (Vec::new(), Vec::new());
    for round in 0..5 {
        // The recipient's counter is counted by the mail task after the answer, at the request's time: let the
        // previous round's mails go out before the clock jumps past their window.
        let sent = 1 + 3 * round;
        let deadline = Instant::now() + MAIL_TIMEOUT;
        while outbox.all().iter().filter(|m| m.is_to(EMAIL)).count() < sent {
            assert!(Instant::now() < deadline, "round {round}: fewer than {sent} reset emails:\n{}", outbox.summary());
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        gw.clock.advance(901);
        for _ in 0..3 {
            let t = Instant::now();
            let r = post_forgot(&mut c, &csrf, USER).await;
            tk.push(t.elapsed().as_secs_f64());
            assert_eq!(r.status, 200, "known (timing round): {}", r.text());
            let t = Instant::now();
            let r = post_forgot(&mut c, &csrf, "mallory").await;
            tu.push(t.elapsed().as_secs_f64());
            assert_eq!(r.status, 200, "unknown (timing round): {}", r.text());
            assert_eq!(r.text(), rk.text(), "answer changed in a timing round");
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (mk, mu) = (median(&mut tk), median(&mut tu));
    let ratio = mk / mu;
    eprintln!("forgot timing: median known {mk:.6}s, unknown {mu:.6}s, ratio {ratio:.2}");
    assert!(
        (0.33..=3.0).contains(&ratio),
        "timing differs: median known {mk:.6}s, unknown {mu:.6}s (ratio {ratio:.2})"
    );
    // Every known request of the rounds mailed alice (3 per window), none to anyone else.
    let deadline = Instant::now() + MAIL_TIMEOUT;
    loop {
        let n = outbox.all().iter().filter(|m| m.is_to(EMAIL)).count();
        if n >= 16 {
            break;
        }
        assert!(Instant::now() < deadline, "expected 16 reset emails to alice, have {n}:\n{}", outbox.summary());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(outbox.all().iter().all(|m| m.is_to(EMAIL)), "an email went to someone else:\n{}", outbox.summary());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgot_is_limited_per_recipient_and_per_address() {
    // Limits (src/portal/recover.rs): 3 per account name and 3 per recipient address, 10 per client address, in
    // 15 minutes. The answer never changes for the first two; the client-address limit answers 429.
    let up = start_upstream().await;
    let env = env_with_alice(&config(&up, false, &outbox_mail(), "")).await;
    env.add_user("carol", "carol@example.com", "Carol", &[], PW).await;
    let gw = env.start().await;
    let mut outbox = Outbox::new(&env);
    let mut c = gw.client(WIKI);
    let csrf = forgot_csrf(&mut c).await;
    let first = post_forgot(&mut c, &csrf, USER).await;
    assert_eq!(first.status, 200);
    // three more by name and one by email: the email spelling is a new account key, but alice is the same
    // recipient, so 3 emails in all
    for who in [USER, USER, USER, EMAIL] {
        let r = post_forgot(&mut c, &csrf, who).await;
        assert_eq!((r.status, r.text()), (200, first.text()), "forgot {who}: the answer must not change");
    }
    // markers: carol's emails, asked for after all of alice's, arrive after alice's tasks ran
    for _ in 0..2 {
        assert_eq!(post_forgot(&mut c, &csrf, "carol").await.status, 200);
        outbox.wait_new("carol's reset email", |m| m.is_to("carol@example.com")).await;
    }
    let to_alice = outbox.all().iter().filter(|m| m.is_to(EMAIL)).count();
    assert_eq!(to_alice, 3, "reset emails to alice after 5 requests:\n{}", outbox.summary());
    // 7 requests from this address so far: 3 more pass, the 11th is refused
    for i in 0..3 {
        assert_eq!(post_forgot(&mut c, &csrf, &format!("nobody{i}")).await.status, 200, "request {}", 8 + i);
    }
    let r = post_forgot(&mut c, &csrf, "nobody-else").await;
    assert_eq!(r.status, 429, "the 11th request from one address in 15 minutes: {}", r.text());
    // the window passes: allowed again, and alice gets an email again
    gw.clock.advance(901);
    let seen: Vec<String> = outbox.all().into_iter().map(|m| m.file).collect();
    outbox.taken.extend(seen);
    assert_eq!(post_forgot(&mut c, &csrf, USER).await.status, 200);
    outbox.wait_new("alice's reset email after the window", |m| m.is_to(EMAIL) && m.subject().contains("reset")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_header_poisoning_does_not_change_the_emailed_link() {
    let up = start_upstream().await;
    // Trust the test client as a proxy too, so X-Forwarded-Host would be honoured if anything used it.
    let extra = "[server]\ntrusted_proxies = [\"127.0.0.1/32\"]\n";
    let env = env_with_alice(&config(&up, false, &outbox_mail(), extra)).await;
    let gw = env.start().await;
    let mut outbox = Outbox::new(&env);

    let mut c = gw.client("evil.example");
    let hdrs = [("accept", "text/html"), ("x-forwarded-host", "evil.example"), ("x-forwarded-proto", "http")];
    let page = c.send("GET", &format!("{PREFIX}/forgot"), &hdrs, None).await;
    assert_eq!(page.status, 200, "GET /forgot on Host evil.example: {}", page.text());
    let csrf = csrf_of(&page);
    let body = serde_urlencoded::to_string([("csrf", csrf.as_str()), ("username", USER)]).unwrap();
    let r = c
        .send(
            "POST",
            &format!("{PREFIX}/forgot"),
            &hdrs,
            Some(("application/x-www-form-urlencoded", body.into_bytes())),
        )
        .await;
    assert_eq!(r.status, 200, "POST /forgot on Host evil.example: {}", r.text());

    let m = outbox.reset_mail(EMAIL).await;
    assert!(!m.body.contains("evil.example"), "the email mentions the attacker's host: {}", m.raw);
    let url = url_with(&m.body, "?token=").expect("no link in the email");
    assert!(
        url.starts_with(&format!("{PUBLIC}{PREFIX}/reset?token=")),
        "the emailed link follows the Host header: {url}"
    );
}

// ---------------------------------------------------------------------------------------------
// Invitations
// ---------------------------------------------------------------------------------------------

async fn post_invite(c: &mut Client, page: &Resp, token: &str, username: &str, name: &str, pw: &str) -> Resp {
    post_invite_csrf(c, &csrf_of(page), token, username, name, pw).await
}

async fn post_invite_csrf(c: &mut Client, csrf: &str, token: &str, username: &str, name: &str, pw: &str) -> Resp {
    c.post_form(
        &format!("{PREFIX}/invite"),
        &[
            ("csrf", csrf),
            ("token", token),
            ("username", username),
            ("name", name),
            ("password", pw),
            ("password2", pw),
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invitation_journey_into_forced_enrolment() {
    let up = start_upstream().await;
    let env = Env::new(&config(&up, true, &outbox_mail(), ""));
    let gw = env.start().await;
    let mut outbox = Outbox::new(&env);
    let invited = "newcomer@example.com";

    // "Create new account" leads to the paste-your-invitation form.
    let mut c = gw.client(SECURE);
    let r = c.browse(&format!("{PREFIX}/invite")).await;
    assert_eq!(r.status, 200, "GET /invite without token: {}", r.text());
    assert!(
        r.text().contains("name=\"token\"") && !r.text().contains("name=\"password\""),
        "without a token /invite must ask for the invitation, not offer registration: {}",
        r.text()
    );

    cli_ok(&env, &["user", "invite", invited, "--groups", "staff"], None).await;
    let m = outbox.invite_mail(invited).await;
    assert!(m.subject().starts_with("Portcullis: "), "{}", m.subject());
    let (link, token) = link_in(&m, "invite");

    let r = c.browse(&path_of(&link)).await;
    assert_eq!(r.status, 200, "invitation form: {}", r.text());
    assert!(r.text().contains(invited), "the invitation form doesn't show the email: {}", r.text());
    let r2 = post_invite(&mut c, &r, &token, "newcomer", "New Comer", NEW_PW).await;
    assert_eq!(r2.status, 303, "accepting the invitation: {}", r2.text());
    let loc = r2.location();
    assert!(
        loc.starts_with(&format!("{PREFIX}/enroll")),
        "with 2FA required an accepted invitation must lead into enrolment, went to {loc}"
    );
    assert!(c.jar.contains_key(SESSION), "no pending session after accepting");

    // The pending session reaches no app yet.
    let r = c.get("/app").await;
    assert_eq!(r.status, 401, "a pending session reached the app");
    let r = gw.client(WIKI).with_session(&c.session_cookie().unwrap()).get("/app").await;
    assert_eq!(r.status, 401, "a pending session reached a one_factor app");
    assert_eq!(up.hit_count(), 0, "the upstream was reached before enrolment");

    let page = c.browse(&loc).await;
    assert_eq!(page.status, 200, "setup page after the invitation: {}", page.text());
    let s = parse_setup(&page);
    let _en = finish_enroll(&mut c, s, gw.clock.now(), "/").await;

    let r = c.get("/app").await;
    assert_eq!(r.status, 200, "two_factor app after enrolment: {}", r.text());
    assert_eq!(r.upstream_header("remote-user"), Some(vec!["newcomer".to_string()]));
    assert_eq!(r.upstream_header("remote-email"), Some(vec![invited.to_string()]));
    assert_eq!(r.upstream_header("remote-name"), Some(vec!["New Comer".to_string()]));
    let groups = r.upstream_header("remote-groups").unwrap_or_default().join(",");
    assert!(groups.split(',').any(|g| g.trim() == "staff"), "Remote-Groups {groups:?} lacks the invitation's group");
    let j = show_user(&env, "newcomer").await;
    assert_eq!(j["two_factor"]["enabled"], true, "{j}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_reused_invitations_are_refused() {
    let up = start_upstream().await;
    let env = env_with_alice(&config(&up, false, &outbox_mail(), "")).await;
    let gw = env.start().await;
    let mut outbox = Outbox::new(&env);

    cli_ok(&env, &["user", "invite", "bob@example.com"], None).await;
    let (link, token) = link_in(&outbox.invite_mail("bob@example.com").await, "invite");
    let mut c = gw.client(WIKI);
    let page = c.browse(&path_of(&link)).await;
    assert_eq!(page.status, 200, "{}", page.text());

    // A taken username: 409, the invitation stays usable.
    let r = post_invite(&mut c, &page, &token, USER, "", NEW_PW).await;
    assert_eq!(r.status, 409, "a taken username: {}", r.text());
    let (st, _) = login_result(&gw, USER, PW).await;
    assert_eq!(st, 303, "the existing account was changed by the invitation");
    let page = c.browse(&path_of(&link)).await;
    assert_eq!(page.status, 200, "the invitation is unusable after a 409: {}", page.text());
    let r = post_invite(&mut c, &page, &token, "bob", "Bob", NEW_PW).await;
    assert_eq!(r.status, 303, "accepting with a free username after a 409: {}", r.text());
    assert_eq!(r.location(), "/", "required = false: straight to /");
    let r = c.get("/x").await;
    assert_eq!(r.status, 200, "the new account's session: {}", r.text());
    assert_eq!(r.upstream_header("remote-email"), Some(vec!["bob@example.com".to_string()]));

    // Reuse.
    let mut c2 = gw.client(WIKI);
    let r = c2.browse(&path_of(&link)).await;
    assert_gone(&r, "GET of a used invitation");
    // Another browser's anonymous csrf (the forgot form shares the anonymous binding).
    let csrf2 = forgot_csrf(&mut c2).await;
    let r = post_invite_csrf(&mut c2, &csrf2, &token, "bob2", "", NEW_PW).await;
    assert_gone(&r, "POST with a used invitation");
    let (st, _) = login_result(&gw, "bob2", NEW_PW).await;
    assert_eq!(st, 401, "a reused invitation created an account");

    // Expiry by the gateway clock (invitation_ttl = 7d).
    cli_ok(&env, &["user", "invite", "carol@example.com"], None).await;
    let (link, token) = link_in(&outbox.invite_mail("carol@example.com").await, "invite");
    let mut c3 = gw.client(WIKI);
    let page = c3.browse(&path_of(&link)).await;
    assert_eq!(page.status, 200, "fresh invitation: {}", page.text());
    gw.clock.advance(7 * 86400 + 120);
    let r = c3.browse(&path_of(&link)).await;
    assert_gone(&r, "GET of an expired invitation");
    let r = post_invite(&mut c3, &page, &token, "carol", "", NEW_PW).await;
    assert_gone(&r, "POST with an expired invitation");
    let (st, _) = login_result(&gw, "carol", NEW_PW).await;
    assert_eq!(st, 401, "an expired invitation created an account");
}

// ---------------------------------------------------------------------------------------------
// Notifications and password change
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_notification_kind_is_written() {
    let up = start_upstream().await;
    let env = env_with_alice(&config(&up, false, &outbox_mail(), THREE_FAILURES)).await;
    let gw = env.start().await;
    let mut outbox = Outbox::new(&env);

    // Enable.
    let mut c1 = gw.client(SECURE);
    c1.login_ok(USER, PW).await;
    let s = settings_setup(&mut c1, PW).await;
    let en = finish_enroll(&mut c1, s, gw.clock.now(), "/").await;
    outbox.notice("Two-factor authentication turned on").await;

    // Recovery code used (with the count left).
    let mut c2 = gw.client(SECURE);
    let csrf = login_to_challenge(&mut c2, USER, PW).await;
    let r = post_challenge(
        &mut c2,
        &[("csrf", &csrf), ("rd", "/"), ("method", "recovery"), ("recovery_code", &en.codes[0])],
        "test",
    )
    .await;
    assert_eq!(r.status, 303, "challenge with a recovery code: {}", r.text());
    let m = outbox.notice("A recovery code was used").await;
    assert!(m.body.contains("9 recovery codes"), "the count left is missing: {}", m.body);
    logout(&mut c2).await;

    // Regenerate.
    let r = confirm_password(&mut c1, "/settings/recovery/regenerate", PW).await;
    assert_eq!(r.status, 200, "regenerate: {}", r.text());
    outbox.notice("New recovery codes").await;

    // Wrong TOTP after the right password.
    let ua = "MailTest-Browser/1.0";
    let mut c3 = gw.client(SECURE);
    let csrf = login_to_challenge(&mut c3, USER, PW).await;
    let wrong = wrong_code(&en.secret, gw.clock.now());
    let fields = [("csrf", csrf.as_str()), ("rd", "/"), ("method", "totp"), ("code", wrong.as_str())];
    let r = post_challenge(&mut c3, &fields, ua).await;
    assert_eq!(r.status, 401, "wrong code: {}", r.text());
    let m = outbox.notice("Failed sign-in attempt").await;
    assert!(m.body.contains("127.0.0.1"), "no address in the failed sign-in email: {}", m.body);
    assert!(m.body.contains(ua), "no browser in the failed sign-in email: {}", m.body);

    // Lockout.
    let mut locked = false;
    for _ in 0..8 {
        let r = post_challenge(&mut c3, &fields, ua).await;
        if r.status == 429 {
            locked = true;
            break;
        }
        assert_eq!(r.status, 401, "wrong code: {}", r.text());
    }
    assert!(locked, "no 429 after repeated wrong codes (max_failures = 3)");
    outbox.notice("Sign-in temporarily locked").await;

    // Password change in settings.
    let r = change_password(&mut c1, PW, NEW_PW).await;
    assert_eq!(r.status, 200, "settings password change: {}", r.text());
    outbox.notice("Your password was changed").await;

    // Disable.
    let r = confirm_password(&mut c1, "/settings/disable", NEW_PW).await;
    assert_eq!(r.status, 303, "disable: {}", r.text());
    outbox.notice("Two-factor authentication turned off").await;

    // An administrator (CLI) action.
    cli_ok(&env, &["user", "lock", USER], None).await;
    let m = outbox.notice("Your account was locked").await;
    assert!(m.body.contains("made by an administrator"), "{}", m.body);

    // Nothing but these went to alice (each kind once).
    let subjects: Vec<String> = outbox.all().iter().map(|m| m.subject()).collect();
    let mut uniq = subjects.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), subjects.len(), "a notification was sent twice: {subjects:?}");
    assert_eq!(subjects.len(), 8, "{subjects:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_change_in_settings_ends_other_sessions() {
    let up = start_upstream().await;
    let env = env_with_alice(&config(&up, false, &outbox_mail(), "")).await;
    let gw = env.start().await;
    let mut outbox = Outbox::new(&env);

    let mut a = gw.client(WIKI);
    a.login_ok(USER, PW).await;
    let mut b = gw.client(WIKI);
    b.login_ok(USER, PW).await;
    assert_eq!(b.get("/b").await.status, 200);

    let r = change_password(&mut a, "not-the-password", NEW_PW).await;
    assert_eq!(r.status, 401, "wrong current password: {}", r.text());
    assert_eq!(b.get("/b").await.status, 200, "a refused change ended another session");
    let (st, _) = login_result(&gw, USER, NEW_PW).await;
    assert_eq!(st, 401, "a refused change set the password");

    let r = change_password(&mut a, PW, NEW_PW).await;
    assert_eq!(r.status, 200, "password change: {}", r.text());
    assert!(r.text().contains("Your password was changed"), "{}", r.text());
    let r = a.get("/a").await;
    assert_eq!(r.status, 200, "the changing session must stay: {}", r.text());
    let r = b.get("/b").await;
    assert!(is_no_session(&r), "the other session survived the password change: {}", r.status);
    let (st, _) = login_result(&gw, USER, PW).await;
    assert_eq!(st, 401, "the old password still works");
    let (st, _) = login_result(&gw, USER, NEW_PW).await;
    assert_eq!(st, 303, "the new password doesn't work");
    outbox.notice("Your password was changed").await;
}

// ---------------------------------------------------------------------------------------------
// SMTP
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_delivery_reaches_a_real_smtp_conversation() {
    let up = start_upstream().await;
    let mut sink = start_smtp_sink().await;
    let mail = format!(
        "transport = \"smtp\"\nsmtp_host = \"127.0.0.1\"\nsmtp_port = {}\nsmtp_tls = \"none\"\n\
         from = \"Portcullis <no-reply@example.com>\"\npublic_url = \"{PUBLIC}\"\n",
        sink.port
    );
    let env = env_with_alice(&config(&up, false, &mail, "")).await;
    let gw = env.start().await;

    forgot(&gw, USER).await;
    let msg = within("a message at the SMTP sink", sink.rx.recv()).await.expect("SMTP sink channel closed");
    assert!(msg.mail_from.contains("no-reply@example.com"), "MAIL FROM {:?}", msg.mail_from);
    assert!(msg.rcpt_to.iter().any(|r| r.contains(EMAIL)), "RCPT TO {:?}", msg.rcpt_to);
    let m = parse_mail("smtp", &msg.data);
    assert!(m.is_to(EMAIL), "To: {:?}", m.to());
    let (link, _token) = link_in(&m, "reset");
    // The delivered link works.
    let (_, page) = open_link(&gw, &link).await;
    assert_eq!(page.status, 200, "the link delivered over SMTP: {}", page.text());
    assert!(!env.path().join("outbox").exists(), "the SMTP transport wrote to the outbox");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgot_answers_fast_for_a_real_account_while_the_mail_server_is_slow() {
    // The work only a real account causes (a token, an email) must not be on the answer's path: with a mail
    // server that takes GREET to say hello, a known account's answer still comes well before it, like an
    // unknown account's.
    const GREET: Duration = Duration::from_secs(3);
    let up = start_upstream().await;
    let mut sink = start_smtp_sink_greeting_after(GREET).await;
    let mail = format!(
        "transport = \"smtp\"\nsmtp_host = \"127.0.0.1\"\nsmtp_port = {}\nsmtp_tls = \"none\"\n\
         from = \"Portcullis <no-reply@example.com>\"\npublic_url = \"{PUBLIC}\"\n",
        sink.port
    );
    let env = env_with_alice(&config(&up, false, &mail, "")).await;
    let gw = env.start().await;
    let mut c = gw.client(WIKI);
    let csrf = forgot_csrf(&mut c).await;
    let t = Instant::now();
    let ru = post_forgot(&mut c, &csrf, "mallory").await;
    let unknown = t.elapsed();
    let t = Instant::now();
    let rk = post_forgot(&mut c, &csrf, USER).await;
    let known = t.elapsed();
    let sent = Instant::now();
    assert_eq!((rk.status, ru.status), (200, 200), "{}", rk.text());
    assert_eq!(rk.text(), ru.text(), "the answers differ");
    eprintln!("forgot with a {GREET:?} SMTP greeting: known {known:?}, unknown {unknown:?}");
    assert!(known < GREET / 2, "the known account's answer waited for the mail server: {known:?}");
    // the mail does go out, once the server has greeted: the slow part was real and only delayed the email
    let msg = within("the reset email at the slow SMTP sink", sink.rx.recv()).await.expect("SMTP sink closed");
    assert!(msg.rcpt_to.iter().any(|r| r.contains(EMAIL)), "RCPT TO {:?}", msg.rcpt_to);
    assert!(sent.elapsed() + known >= GREET, "the sink answered before its delay: the test proves nothing");
}

// ---------------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_or_code_in_the_logs() {
    let up = start_upstream().await;
    let extra = "[server]\nlisten = \"{LISTEN}\"\n\n[log]\nlevel = \"debug\"\n";
    let env = env_with_alice(&config(&up, true, &outbox_mail(), extra)).await;
    let gw = env.spawn_child().await;
    let mut outbox = Outbox::new(&env);
    let host = WIKI;
    let mut cli_logs = String::new();
    let mut secrets: Vec<(String, String)> = vec![("alice's password".into(), PW.into())];

    // Invitation -> account -> forced enrolment (TOTP at system time).
    let invited = "dave@example.com";
    let o = cli_ok(&env, &["user", "invite", invited], None).await;
    cli_logs.push_str(&out_text(&o));
    let (link, inv_token) = link_in(&outbox.invite_mail(invited).await, "invite");
    secrets.push(("invitation token".into(), inv_token.clone()));
    let dave_pw = "Dav3s-own-passphrase";
    secrets.push(("dave's password".into(), dave_pw.into()));
    let mut c = Client::new(gw.addr, host);
    let page = c.browse(&path_of(&link)).await;
    assert_eq!(page.status, 200, "{}", page.text());
    let r = post_invite(&mut c, &page, &inv_token, "dave", "Dave", dave_pw).await;
    assert_eq!(r.status, 303, "accept: {}", r.text());
    let page = c.browse(&r.location()).await;
    assert_eq!(page.status, 200, "setup page: {}", page.text());
    let s = parse_setup(&page);
    secrets.push(("TOTP secret".into(), s.secret.clone()));
    let code = totp_code(&s.secret, now_unix());
    secrets.push(("enrolment TOTP code".into(), code.clone()));
    let r = confirm(&mut c, &s, &code, "/").await;
    assert_eq!(r.status, 200, "confirm: {}", r.text());
    let codes = shown_codes(&r.text());
    assert_eq!(codes.len(), 10);

    // A wrong password attempt.
    let wrong_pw = "Wr0ng-guess-for-dave";
    secrets.push(("wrong password".into(), wrong_pw.into()));
    let mut w = Client::new(gw.addr, host);
    assert_eq!(w.login("dave", wrong_pw, "/").await.status, 401);

    // Reset with a recovery code.
    let mut f = Client::new(gw.addr, host);
    let csrf = forgot_csrf(&mut f).await;
    assert_eq!(post_forgot(&mut f, &csrf, "dave").await.status, 200);
    let (link, reset_token) = link_in(&outbox.reset_mail(invited).await, "reset");
    secrets.push(("reset token".into(), reset_token.clone()));
    secrets.push(("recovery code".into(), codes[0].clone()));
    secrets.push(("recovery code (no dashes)".into(), codes[0].replace('-', "")));
    let new_pw = "Dav3s-new-passphrase";
    secrets.push(("new password".into(), new_pw.into()));
    let mut rc = Client::new(gw.addr, host);
    let page = rc.browse(&path_of(&link)).await;
    assert_eq!(page.status, 200, "{}", page.text());
    let r = post_reset(&mut rc, &page, &reset_token, new_pw, new_pw, &[("recovery_code", &codes[0])]).await;
    assert_password_changed_page(&r, "reset in the child");
    // A refused reuse.
    let r = post_reset(&mut rc, &page, &reset_token, dave_pw, dave_pw, &[("recovery_code", &codes[1])]).await;
    assert_eq!(r.status, 410);
    let mut l = Client::new(gw.addr, host);
    assert_eq!(l.login("dave", new_pw, "/").await.status, 303, "login with the new password");
    // Let the mail task log the last deliveries.
    outbox.wait_new("password changed", |m| m.subject().contains("Your password was changed")).await;

    let mut gw = gw;
    let _ = gw.child.kill().await;
    let log = gw.log();
    assert!(
        log.contains("event=") || log.contains("\"event\""),
        "the captured log has no audit lines, so the check below would prove nothing:\n{log}"
    );
    assert!(log.contains("mail sent"), "no mail log line:\n{log}");
    // A 6-digit code could match a timestamp's fraction of a second by chance: check the log without them.
    let log = without_timestamps(&log);
    for (what, value) in &secrets {
        assert!(!log.contains(value.as_str()), "the serve log contains the {what} ({value}):\n{log}");
        assert!(!cli_logs.contains(value.as_str()), "the CLI output contains the {what} ({value}):\n{cli_logs}");
    }
}

/// `text` with every RFC 3339 timestamp (`2026-12-03T09:10:17.123456Z`) replaced by `<ts>`.
fn without_timestamps(text: &str) -> String {
    let is_ts_char = |c: char| c.is_ascii_digit() || matches!(c, '-' | ':' | '.' | 'T' | 'Z' | '+');
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(|c: char| c.is_ascii_digit()) {
        out.push_str(&rest[..i]);
        let run_len = rest[i..].find(|c: char| !is_ts_char(c)).unwrap_or(rest.len() - i);
        let run = &rest[i..i + run_len];
        let b = run.as_bytes();
        let looks_like_ts = run.len() >= 19 && b[4] == b'-' && b[7] == b'-' && b[10] == b'T' && b[13] == b':';
        out.push_str(if looks_like_ts { "<ts>" } else { run });
        rest = &rest[i + run_len..];
    }
    out.push_str(rest);
    out
}

#[test]
fn timestamps_are_masked_but_other_digits_kept() {
    let t = without_timestamps("2026-12-03T09:10:17.123456Z INFO code=123456 at 2026-12-03T09:10:17Z; n=42");
    assert_eq!(t, "<ts> INFO code=123456 at <ts>; n=42");
}

/// The notice throttle is per kind per change of state: "on" after "off" is news even within the window, while
/// the same failed sign-in twice in the window is sent once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_factor_on_after_off_is_notified_again_within_the_throttle_window() {
    let up = start_upstream().await;
    let env = env_with_alice(&config(&up, false, &outbox_mail(), "")).await;
    let gw = env.start().await;
    let mut outbox = Outbox::new(&env);
    let mut c = gw.client(SECURE);
    c.login_ok(USER, PW).await;

    let s = settings_setup(&mut c, PW).await;
    let en = finish_enroll(&mut c, s, gw.clock.now(), "/").await;
    outbox.notice("Two-factor authentication turned on").await;

    // Two wrong codes in the window: one notice.
    let ua = "Throttle-Test/1.0";
    for _ in 0..2 {
        let mut other = gw.client(SECURE);
        let csrf = login_to_challenge(&mut other, USER, PW).await;
        let wrong = wrong_code(&en.secret, gw.clock.now());
        let fields = [("csrf", csrf.as_str()), ("rd", "/"), ("method", "totp"), ("code", wrong.as_str())];
        let r = post_challenge(&mut other, &fields, ua).await;
        assert_eq!(r.status, 401, "wrong code: {}", r.text());
    }
    outbox.notice("Failed sign-in attempt").await;

    gw.clock.advance(30);
    let r = confirm_password(&mut c, "/settings/disable", PW).await;
    assert_eq!(r.status, 303, "disable: {}", r.text());
    outbox.notice("Two-factor authentication turned off").await;

    gw.clock.advance(30);
    let s = settings_setup(&mut c, PW).await;
    finish_enroll(&mut c, s, gw.clock.now(), "/").await;
    outbox.notice("Two-factor authentication turned on").await;

    let subjects: Vec<String> = outbox.all().iter().map(|m| m.subject()).collect();
    let count = |s: &str| subjects.iter().filter(|x| x.ends_with(s)).count();
    assert_eq!(count("turned on"), 2, "{subjects:?}");
    assert_eq!(count("turned off"), 1, "{subjects:?}");
    assert_eq!(count("Failed sign-in attempt"), 1, "the throttle let a repeat through: {subjects:?}");
}

/// The password step is written once: refused `max_failures` times at sign-in or at the settings'
/// re-authentication, it locks the same way, audits the same events (three failed logins, one lockout) and sends
/// the same notice. Re-authentication used to send none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_refused_at_sign_in_or_at_re_authentication_locks_audits_and_notifies_alike() {
    for place in ["sign-in", "re-authentication"] {
        let up = start_upstream().await;
        let env = env_with_alice(&config(&up, false, &outbox_mail(), THREE_FAILURES)).await;
        let gw = env.start().await;
        let mut outbox = Outbox::new(&env);
        let mut c = gw.client(SECURE);
        if place == "re-authentication" {
            c.login_ok(USER, PW).await;
        }
        let mut statuses = Vec::new();
        for _ in 0..3 {
            let r = match place {
                "sign-in" => gw.client(SECURE).login(USER, "not-the-password", "/").await,
                _ => change_password(&mut c, "not-the-password", NEW_PW).await,
            };
            statuses.push(r.status);
        }
        assert_eq!(statuses.last(), Some(&429), "{place}: the third refusal locks ({statuses:?})");
        let m = outbox.notice("Sign-in temporarily locked").await;
        assert!(m.body.contains("too many failed attempts"), "{place}: {}", m.body);
        let o = env.cli(&["audit", USER, "--json"], None).await;
        let events: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
        let count = |kind: &str| events.iter().filter(|e| e["kind"] == kind).count();
        assert_eq!((count("login_failed"), count("lockout")), (3, 1), "{place}: {events:#?}");
        gw.stop().await;
    }
}
