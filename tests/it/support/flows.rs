//! Helpers shared by the flow tests: CLI output, TOTP codes from `oathtool`, page scraping (csrf, the enrolment
//! secret, recovery codes, HTML entities), logout / password confirmation and signalling child gateways.

use portcullis::clock::Clock;

use super::*;

/// Status, stdout and stderr of a finished process, for failure messages.
pub fn out_text(o: &std::process::Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `user show NAME --json` (must succeed and print JSON).
pub async fn show_user(env: &Env, name: &str) -> serde_json::Value {
    let o = env.cli(&["user", "show", name, "--json"], None).await;
    assert!(o.status.success(), "user show {name} --json: {}", out_text(&o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("user show --json is not JSON ({e}): {}", out_text(&o)))
}

/// `Some(why)` when `program` can't be run (`program probe` is tried), naming the Debian package to install;
/// `None` when it runs. Tests that need an outside tool panic with this, not with a bare "No such file".
pub fn missing_tool(program: &str, probe: &str, package: &str) -> Option<String> {
    match std::process::Command::new(program).arg(probe).output() {
        Ok(_) => None,
        Err(e) => Some(format!(
            "{program} cannot be run ({e}): install Debian's {package} package (`apt-get install -y {package}`), \
             as .ci/run does"
        )),
    }
}

/// The TOTP code `oathtool` (Debian package oathtool) computes for `secret` (base32) at unix time `at`;
/// asserts it is 6 digits.
pub fn totp_code(secret: &str, at: u64) -> String {
    let out = std::process::Command::new("oathtool")
        .args(["--totp", "-b", "-N", &format!("@{at}"), secret])
        .output()
        .unwrap_or_else(|_| panic!("{}", missing_tool("oathtool", "--version", "oathtool").unwrap_or_default()));
    assert!(out.status.success(), "oathtool failed: {}", out_text(&out));
    let code = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(code.len() == 6 && code.bytes().all(|b| b.is_ascii_digit()), "oathtool printed {code:?}");
    code
}

/// The code for the gateway's current (manual) time.
pub fn code_now(gw: &Gateway, secret: &str) -> String {
    totp_code(secret, gw.clock.now())
}

/// The csrf token of a page's form (panics when there is none).
pub fn csrf_of(r: &Resp) -> String {
    extract_csrf(&r.text()).unwrap_or_else(|| panic!("no csrf field in page (status {}): {}", r.status, r.text()))
}

/// The base32 secret shown on the setup page (`<p class="secret code">ABCD EFGH ...</p>`), spaces removed.
pub fn shown_secret(html: &str) -> Option<String> {
    shown_secret_text(html).map(|s| s.chars().filter(|c| !c.is_whitespace()).collect())
}

/// The base32 secret shown on the setup page, spaces kept (only trimmed).
pub fn shown_secret_spaced(html: &str) -> Option<String> {
    shown_secret_text(html).map(|s| s.trim().to_string())
}

fn shown_secret_text(html: &str) -> Option<&str> {
    let marker = "<p class=\"secret code\">";
    let i = html.find(marker)? + marker.len();
    let rest = &html[i..];
    Some(&rest[..rest.find("</p>")?])
}

/// Recovery codes in the `<li>` items of the codes list.
pub fn shown_codes(html: &str) -> Vec<String> {
    let Some(start) = html.find("id=\"codes\"") else {
        return Vec::new();
    };
    let rest = &html[start..];
    let rest = &rest[..rest.find("</ul>").unwrap_or(rest.len())];
    rest.split("<li>").skip(1).filter_map(|s| s.find("</li>").map(|j| s[..j].trim().to_string())).collect()
}

/// Decodes the HTML entities minijinja produces (`&amp;`, `&#x2f;`, ...).
pub fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        if let Some(j) = rest.find(';').filter(|j| *j <= 10) {
            let ent = &rest[1..j];
            let ch = match ent {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                e if e.starts_with("#x") || e.starts_with("#X") => {
                    u32::from_str_radix(&e[2..], 16).ok().and_then(char::from_u32)
                }
                e if e.starts_with('#') => e[1..].parse().ok().and_then(char::from_u32),
                _ => None,
            };
            if let Some(ch) = ch {
                out.push(ch);
                rest = &rest[j + 1..];
                continue;
            }
        }
        out.push('&');
        rest = &rest[1..];
    }
    out.push_str(rest);
    out
}

/// GET the logout page and submit it (must answer 303).
pub async fn logout(c: &mut Client) {
    let page = c.browse(&format!("{PREFIX}/logout")).await;
    assert_eq!(page.status, 200, "logout page: {}", page.text());
    let csrf = csrf_of(&page);
    let r = c.post_form(&format!("{PREFIX}/logout"), &[("csrf", &csrf)]).await;
    assert_eq!(r.status, 303, "logout: {}", r.text());
}

/// Password confirmation of a sensitive settings action (`/settings/disable`, `/settings/recovery`, ...): GET the
/// page (200), then POST the password; returns the answer. With `check_form`, also asserts the page shows a
/// password field.
pub async fn confirm_password_with(c: &mut Client, path: &str, password: &str, check_form: bool) -> Resp {
    let page = c.browse(&format!("{PREFIX}{path}")).await;
    assert_eq!(page.status, 200, "GET {path}: {}", page.text());
    if check_form {
        assert!(page.text().contains("name=\"password\""), "GET {path} must show a password form: {}", page.text());
    }
    let csrf = csrf_of(&page);
    c.post_form(&format!("{PREFIX}{path}"), &[("csrf", &csrf), ("rd", "/"), ("password", password)]).await
}

/// [`confirm_password_with`] without the password-field check.
pub async fn confirm_password(c: &mut Client, path: &str, password: &str) -> Resp {
    confirm_password_with(c, path, password, false).await
}

/// `kill SIG PID` (e.g. `"-9"` for SIGKILL), ignoring failures.
pub fn kill(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill").args([sig, &pid.to_string()]).status();
}

/// SIGKILL.
pub fn kill9(pid: u32) {
    kill(pid, "-9");
}

/// The last 30 lines of a log.
pub fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// The (decoded) value of query parameter `name` in `url`.
pub fn query_param(url: &str, name: &str) -> Option<String> {
    let q = url.split_once('?')?.1;
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(q).ok()?;
    pairs.into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

/// A 6-digit code valid for none of the `steps` time steps either side of `at` (nor `at`'s own).
pub fn wrong_code_around(secret: &str, at: u64, steps: u64) -> String {
    let near: Vec<String> = (0..2 * steps + 1).map(|i| totp_code(secret, at + i * 30 - steps * 30)).collect();
    ["000000", "111111", "222222", "333333", "444444", "555555", "987654", "123456"]
        .iter()
        .find(|c| !near.iter().any(|n| n == *c))
        .unwrap()
        .to_string()
}

/// A 6-digit code that is valid for none of the steps around `at` (skew up to 2).
pub fn wrong_code(secret: &str, at: u64) -> String {
    wrong_code_around(secret, at, 2)
}

// ---------------------------------------------------------------------------------------------
// Enrolment
// ---------------------------------------------------------------------------------------------

/// The outcome of a confirmed enrolment.
pub struct Enrolled {
    /// The base32 secret from the setup page (spaces removed).
    pub secret: String,
    /// The recovery codes shown after confirming.
    pub codes: Vec<String>,
    /// The code that confirmed the enrolment.
    pub code: String,
}

/// On a setup page (200, with the secret and the confirm form): confirm it with the `oathtool` code for unix time
/// `at()`, sending `rd`. Asserts the 200 codes page with a non-empty list of recovery codes.
pub async fn confirm_setup_page(c: &mut Client, page: &Resp, rd: &str, at: impl FnOnce() -> u64) -> Enrolled {
    let secret = shown_secret(&page.text()).unwrap_or_else(|| panic!("no secret on the setup page: {}", page.text()));
    let csrf = csrf_of(page);
    let code = totp_code(&secret, at());
    let r = c.post_form(&format!("{PREFIX}/enroll/confirm"), &[("csrf", &csrf), ("rd", rd), ("code", &code)]).await;
    assert_eq!(r.status, 200, "confirm enrolment: {}", r.text());
    let codes = shown_codes(&r.text());
    assert!(!codes.is_empty(), "no recovery codes on the confirmation page: {}", r.text());
    Enrolled { secret, codes, code }
}

/// After a password login that answered 303 to `loc` (the forced enrolment page): show the setup page and confirm
/// it (with the `rd` of `loc`) with the code for unix time `at()`.
pub async fn finish_forced_enrolment(c: &mut Client, loc: &str, at: impl FnOnce() -> u64) -> Enrolled {
    assert!(loc.starts_with(&format!("{PREFIX}/enroll")), "password login went to {loc}, not to enrolment");
    let page = c.browse(loc).await;
    assert_eq!(page.status, 200, "setup page: {}", page.text());
    let rd = query_param(loc, "rd").unwrap_or_else(|| "/".into());
    confirm_setup_page(c, &page, &rd, at).await
}

/// First login with `[two_factor] required`: password (303) -> forced enrolment -> confirm with the code for unix
/// time `at()`. Leaves `c` with the session the codes page set.
pub async fn enrol_forced(c: &mut Client, user: &str, pw: &str, at: impl FnOnce() -> u64) -> Enrolled {
    let r = c.login(user, pw, "/").await;
    assert_eq!(r.status, 303, "login of {user}: {}", r.text());
    finish_forced_enrolment(c, &r.location(), at).await
}

/// From a Password/Full session: GET /enroll (password form), POST it with `pw`; returns the setup page (200).
pub async fn signed_in_setup_page(c: &mut Client, pw: &str) -> Resp {
    let r = c.browse(&format!("{PREFIX}/enroll?rd=%2F")).await;
    assert_eq!(r.status, 200, "GET /enroll: {}", r.text());
    let r = c.post_form(&format!("{PREFIX}/enroll"), &[("csrf", &csrf_of(&r)), ("rd", "/"), ("password", pw)]).await;
    assert_eq!(r.status, 200, "POST /enroll with the password: {}", r.text());
    r
}

// ---------------------------------------------------------------------------------------------
// Challenge
// ---------------------------------------------------------------------------------------------

/// Password login of an enrolled user that must answer 303 to the challenge; returns the login response and the
/// challenge location.
pub async fn login_to_challenge_loc(c: &mut Client, user: &str, pw: &str, rd: &str) -> (Resp, String) {
    let r = c.login(user, pw, rd).await;
    assert_eq!(r.status, 303, "login of {user}: {}", r.text());
    let loc = r.location();
    assert!(loc.starts_with(&format!("{PREFIX}/challenge")), "login of enrolled {user} went to {loc}");
    (r, loc)
}

/// GET the challenge page at `loc` (200); returns its csrf.
pub async fn challenge_csrf(c: &mut Client, loc: &str) -> String {
    let page = c.browse(loc).await;
    assert_eq!(page.status, 200, "challenge page: {}", page.text());
    csrf_of(&page)
}

/// [`login_to_challenge_loc`], then the challenge page. Returns the login response and the challenge page's csrf
/// (the Pending session is in `c`).
pub async fn login_to_challenge_page(c: &mut Client, user: &str, pw: &str, rd: &str) -> (Resp, String) {
    let (r, loc) = login_to_challenge_loc(c, user, pw, rd).await;
    let csrf = challenge_csrf(c, &loc).await;
    (r, csrf)
}

/// POST the challenge form with a TOTP code.
pub async fn submit_totp(c: &mut Client, csrf: &str, code: &str, rd: &str) -> Resp {
    c.post_form(&format!("{PREFIX}/challenge"), &[("csrf", csrf), ("rd", rd), ("method", "totp"), ("code", code)]).await
}

/// POST the challenge form with a recovery code.
pub async fn submit_recovery(c: &mut Client, csrf: &str, code: &str, rd: &str) -> Resp {
    c.post_form(
        &format!("{PREFIX}/challenge"),
        &[("csrf", csrf), ("rd", rd), ("method", "recovery"), ("recovery_code", code)],
    )
    .await
}

/// The `Set-Cookie` that sets (not clears) the session cookie, if any.
pub fn session_set_cookie(r: &Resp) -> Option<String> {
    r.set_cookies()
        .into_iter()
        .find(|s| s.starts_with(&format!("{SESSION}=")) && !s.starts_with(&format!("{SESSION}=;")))
}

#[test]
fn a_missing_tool_says_which_package_to_install() {
    let why = missing_tool("/nonexistent/bin/nginx", "-v", "nginx").expect("a missing program is reported");
    assert!(why.contains("apt-get install -y nginx") && why.contains("/nonexistent/bin/nginx"), "{why}");
    // control: the tools CI installs are found
    assert_eq!(missing_tool("/usr/sbin/nginx", "-v", "nginx"), None);
    assert_eq!(missing_tool("oathtool", "--version", "oathtool"), None);
}

/// Text of an HTML fragment without its tags.
pub fn strip_tags(html: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for ch in html.chars() {
        match ch {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                out.push(' ');
            }
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out
}

/// First login with `[two_factor] required` (default): password -> forced enrolment -> confirm with the code for
/// the gateway's clock. Leaves `c` with a Full session.
pub async fn enrol(gw: &Gateway, c: &mut Client, user: &str, pw: &str) -> Enrolled {
    let e = enrol_forced(c, user, pw, || gw.clock.now()).await;
    assert!(c.session_cookie().is_some(), "no session after enrolment");
    e
}

/// Password + TOTP login of an enrolled user to a Full session. Moves the clock two steps on first, so the code is
/// never one already used.
pub async fn login_full(gw: &Gateway, c: &mut Client, user: &str, pw: &str, secret: &str) {
    gw.clock.advance(60);
    let (_, csrf) = login_to_challenge_page(c, user, pw, "/").await;
    let r = submit_totp(c, &csrf, &totp_code(secret, gw.clock.now()), "/").await;
    assert_eq!(r.status, 303, "challenge of {user} with the right code: {}", r.text());
}

/// GET an admin page as the admin; must be 200.
pub async fn admin_get(c: &mut Client, path: &str) -> Resp {
    let r = c.browse(path).await;
    assert_eq!(r.status, 200, "admin GET {path}: {}", r.text());
    r
}

/// POST an action from the detail page of `user`: csrf from the page, 303 back with ?done=ACTION.
pub async fn admin_act(c: &mut Client, user: &str, action: &str) {
    let page = admin_get(c, &format!("{PREFIX}/admin/users/{user}")).await;
    let csrf = csrf_of(&page);
    let r = c.post_form(&format!("{PREFIX}/admin/users/{user}/{action}"), &[("csrf", &csrf)]).await;
    assert_eq!(r.status, 303, "POST {action} on {user}: {}", r.text());
    let loc = r.location();
    assert!(
        loc.starts_with(&format!("{PREFIX}/admin/users/{user}")) && loc.contains(&format!("done={action}")),
        "POST {action} redirected to {loc}"
    );
}
