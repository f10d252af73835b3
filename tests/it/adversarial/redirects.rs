//! Open redirects: hostile `rd` targets on every page that redirects.

use super::*;

// ----- redirect safety -------------------------------------------------------------------------

/// Why `loc` would leave the host (or be a non-path) in a browser, if it would. Checks the raw value and up to
/// three layers of percent-decoding, after the stripping browsers do (tab/CR/LF anywhere, C0/space at the ends).
fn offhost(loc: &str) -> Option<String> {
    let mut layers = vec![loc.to_string()];
    let mut cur = loc.to_string();
    for _ in 0..3 {
        let d = percent_encoding::percent_decode_str(&cur).decode_utf8_lossy().into_owned();
        if d == cur {
            break;
        }
        layers.push(d.clone());
        cur = d;
    }
    for (i, l) in layers.iter().enumerate() {
        let stripped: String = l.chars().filter(|c| !matches!(c, '\t' | '\n' | '\r')).collect();
        let s = stripped.trim_matches(|c: char| c <= ' ');
        let why = if !s.starts_with('/') {
            "not a local path"
        } else if s[1..].starts_with(['/', '\\']) {
            "scheme-relative (//host or /\\host)"
        } else if l.chars().any(|c| c.is_control()) {
            "control characters"
        } else if i == 0 && (l.contains('\\') || l.contains(' ')) {
            "raw backslash or space"
        } else {
            continue;
        };
        return Some(format!("{why} in layer {i}: {l:?}"));
    }
    let path = loc.split(['?', '#']).next().unwrap_or_default();
    if path.contains("//") {
        return Some(format!("`//` in the path of {loc:?}"));
    }
    None
}

/// ≥ 30 hostile redirect targets (the classes behind oauth2-proxy CVE-2020-5233/2021-21291 and Authelia
/// CVE-2021-29456), none of them in auth.rs's list except where a variant is needed for the route.
fn hostile_targets() -> Vec<String> {
    [
        "//evil.com",
        "///evil.com",
        "////evil.com",
        "/\\evil.com",
        "\\/evil.com",
        "/\\/evil.com",
        "//\\evil.com",
        "/\\\\evil.com",
        "/\t/evil.com",
        "/\n/evil.com",
        "/\r/evil.com",
        "\t//evil.com",
        "\n//evil.com",
        " //evil.com",
        "/%09/evil.com",
        "/%0a/evil.com",
        "/%0D/evil.com",
        "/%0D%0A/evil.com",
        "/%0d%0aSet-Cookie:%20x=1",
        "//evil.com@app.test",
        "//user:pass@evil.com/",
        "https://app.test@evil.com/",
        "http://evil.com\\@app.test/",
        "//app.test.evil.com/",
        "https://app.test.evil.com/",
        "//evil.com/app.test",
        "//evil.com#app.test",
        "//evil.com?app.test",
        "//app.test%2eevil.com",
        "javascript:alert(1)",
        "java\tscript:alert(1)",
        "javascript://%0aalert(1)",
        " javascript:alert(1)",
        "JAVASCRIPT:alert(1)",
        "vbscript:msgbox(1)",
        "data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==",
        "http:/\\evil.com",
        "https:evil.com",
        "http:///evil.com",
        "HTTPS://EVIL.COM",
        "ftp://evil.com/",
        "//2130706433/",
        "//[::1]/",
        "/%2f%2fevil.com",
        "/%2F/evil.com",
        "%2f%2fevil.com",
        "/%5c%5cevil.com",
        "/%2f%5cevil.com",
        "/%252f%252fevil.com",
        "/%25252f%25252fevil.com",
        "%252f%252fevil.com",
        "/%5C/evil.com",
        "/\u{ff0f}evil.com",
        "\u{ff0f}\u{ff0f}evil.com",
        "/%EF%BC%8Fevil.com",
        "/\u{2044}evil.com",
        "/%E2%81%84evil.com",
        "/\u{2215}evil.com",
        "/\u{ff3c}evil.com",
        "/.//evil.com",
        "/./../..//evil.com",
        "/..//evil.com",
        "/x/..//evil.com",
        "/%2e/%2fevil.com",
        "/%2e%2e//evil.com",
        "#//evil.com",
        "?//evil.com",
        "/\0//evil.com",
        "/%00//evil.com",
        "\u{0}//evil.com",
        "evil.com",
        "",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn check_loc(violations: &mut Vec<String>, route: &str, rd: &str, r: &Resp) {
    if !(300..400).contains(&r.status) {
        return;
    }
    let loc = r.header("location").unwrap_or_default();
    if let Some(v) = offhost(&loc) {
        violations.push(format!("{route}: rd {rd:?} -> {} Location {loc:?}: {v}", r.status));
    }
}

fn check_field(violations: &mut Vec<String>, route: &str, rd: &str, r: &Resp) {
    if let Some(v) = field(&r.text(), "rd")
        && let Some(why) = offhost(&v)
    {
        violations.push(format!("{route}: rd {rd:?} -> hidden rd field {v:?}: {why}"));
    }
}

// =============================================================================================
// Open redirects
// =============================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_redirect_targets_on_login_and_logout() {
    let w = world("").await;
    let targets = hostile_targets();
    assert!(targets.len() >= 30);
    let mut v = Vec::new();
    for rd in &targets {
        let mut c = w.gw.client(APP);
        // the login page's hidden rd field
        let page = c.browse(&format!("{PREFIX}/login?rd={}", enc(rd))).await;
        assert_eq!(page.status, 200, "login page rd {rd:?}");
        check_field(&mut v, "GET /login", rd, &page);
        let r = c.post_login(&csrf_of(&page), "alice", PW, rd).await;
        if r.status != 303 {
            v.push(format!("POST /login rd {rd:?}: status {} (want 303 to a safe path)", r.status));
            continue;
        }
        check_loc(&mut v, "POST /login", rd, &r);
        // already signed in: GET /login?rd= redirects
        let r = c.browse(&format!("{PREFIX}/login?rd={}", enc(rd))).await;
        check_loc(&mut v, "GET /login (signed in)", rd, &r);
        check_field(&mut v, "GET /login (signed in)", rd, &r);
        // logout page and POST /logout with an rd (query and field)
        let page = c.browse(&format!("{PREFIX}/logout?rd={}", enc(rd))).await;
        check_loc(&mut v, "GET /logout", rd, &page);
        check_field(&mut v, "GET /logout", rd, &page);
        let csrf = csrf_of(&page);
        let r = c.post_form(&format!("{PREFIX}/logout?rd={}", enc(rd)), &[("csrf", &csrf), ("rd", rd)]).await;
        assert_eq!(r.status, 303, "logout rd {rd:?}");
        check_loc(&mut v, "POST /logout", rd, &r);
        if r.location() != format!("{PREFIX}/login") && !r.location().starts_with(&format!("{PREFIX}/login?")) {
            v.push(format!("POST /logout rd {rd:?}: Location {} (want {PREFIX}/login)", r.location()));
        }
    }
    assert!(v.is_empty(), "{} unsafe redirect(s) of {} targets:\n{}", v.len(), targets.len(), v.join("\n"));
    // positive control: a safe rd is honoured (so the checks above can tell)
    let mut c = w.gw.client(APP);
    let r = c.login("alice", PW, "/ok/page?q=1").await;
    assert_eq!(r.location(), "/ok/page?q=1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_redirect_targets_on_challenge_and_settings() {
    let w = world("").await;
    let mut tina = w.gw.client(TF);
    tina.login_ok("tina", PW).await;
    let e = enrol_signed_in(&w.gw, &mut tina, PW).await;
    let targets = hostile_targets();
    let mut v = Vec::new();
    for rd in &targets {
        w.gw.clock.advance(30);
        let mut c = w.gw.client(TF);
        let r = c.login("tina", PW, rd).await;
        assert_eq!(r.status, 303, "login rd {rd:?}");
        let loc = r.location();
        match query_param(&loc, "rd") {
            Some(inner) => {
                if let Some(why) = offhost(&inner) {
                    v.push(format!("login -> challenge: rd {rd:?} carried as {inner:?}: {why}"));
                }
            }
            None => check_loc(&mut v, "login -> challenge", rd, &r),
        }
        // the challenge page, reached with the hostile rd in its query
        let page = c.browse(&format!("{PREFIX}/challenge?rd={}", enc(rd))).await;
        assert_eq!(page.status, 200, "challenge page rd {rd:?}: {}", page.text());
        check_field(&mut v, "GET /challenge", rd, &page);
        let page2 = c.browse(&format!("{PREFIX}/challenge?method=recovery&rd={}", enc(rd))).await;
        assert_eq!(page2.status, 200, "recovery challenge page rd {rd:?}: {}", page2.text());
        check_field(&mut v, "GET /challenge?method=recovery", rd, &page2);
        // POST with the hostile rd in the hidden field (tampered) and in the query
        let code = totp_code(&e.secret, w.gw.clock.now());
        let r = c
            .post_form(
                &format!("{PREFIX}/challenge?rd={}", enc(rd)),
                &[("csrf", &csrf_of(&page)), ("rd", rd), ("method", "totp"), ("code", &code)],
            )
            .await;
        assert_eq!(r.status, 303, "challenge rd {rd:?}: {}", r.text());
        check_loc(&mut v, "POST /challenge", rd, &r);
        // Full session: GET /challenge?rd= and /enroll?rd= redirect away; settings forms carry rd
        let r = c.browse(&format!("{PREFIX}/challenge?rd={}", enc(rd))).await;
        check_loc(&mut v, "GET /challenge (full)", rd, &r);
        let r = c.browse(&format!("{PREFIX}/enroll?rd={}", enc(rd))).await;
        check_loc(&mut v, "GET /enroll (has 2FA)", rd, &r);
        check_field(&mut v, "GET /enroll (has 2FA)", rd, &r);
        for p in [
            "/settings/disable",
            "/settings/recovery",
            "/settings/recovery/regenerate",
            "/settings/password",
            "/settings",
        ] {
            let r = c.browse(&format!("{PREFIX}{p}?rd={}", enc(rd))).await;
            check_loc(&mut v, p, rd, &r);
            check_field(&mut v, p, rd, &r);
        }
        // POST /settings/recovery with a hostile rd: the page shown must not link off-host
        let page = c.browse(&format!("{PREFIX}/settings/recovery")).await;
        let r = c
            .post_form(
                &format!("{PREFIX}/settings/recovery"),
                &[("csrf", &csrf_of(&page)), ("rd", rd), ("password", PW)],
            )
            .await;
        // the scan below means something only on the codes page itself
        assert_eq!(page.status, 200, "GET /settings/recovery: {}", page.text());
        assert_eq!(r.status, 200, "POST /settings/recovery rd {rd:?}: {}", r.text());
        assert_eq!(shown_codes(&r.text()).len(), 10, "POST /settings/recovery shows the codes: {}", r.text());
        check_loc(&mut v, "POST /settings/recovery", rd, &r);
        for href in r.text().split("href=\"").skip(1).filter_map(|s| s.split('"').next()).map(unescape) {
            if href.contains("evil") || href.to_ascii_lowercase().starts_with("javascript") {
                v.push(format!("POST /settings/recovery rd {rd:?}: link {href:?}"));
            }
        }
    }
    assert!(v.is_empty(), "{} unsafe redirect(s):\n{}", v.len(), v.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_redirect_targets_on_enrolment_pages() {
    let w = world("").await;
    let targets = hostile_targets();
    let mut v = Vec::new();
    let mut alice = w.gw.client(APP);
    alice.login_ok("alice", PW).await;
    for (i, rd) in targets.iter().enumerate() {
        let r = alice.browse(&format!("{PREFIX}/enroll?rd={}", enc(rd))).await;
        assert_eq!(r.status, 200, "GET /enroll rd {rd:?}: {}", r.text());
        check_field(&mut v, "GET /enroll (password form)", rd, &r);
        let r = alice
            .post_form(
                &format!("{PREFIX}/enroll?rd={}", enc(rd)),
                &[("csrf", &csrf_of(&r)), ("rd", rd), ("password", PW)],
            )
            .await;
        assert_eq!(r.status, 200, "POST /enroll rd {rd:?}: {}", r.text());
        check_field(&mut v, "POST /enroll (setup page)", rd, &r);
        // for every 6th target go all the way: the codes page's "I have saved" link
        if i % 6 == 0 {
            let secret = shown_secret(&r.text()).unwrap();
            let code = totp_code(&secret, w.gw.clock.now());
            let r = alice
                .post_form(&format!("{PREFIX}/enroll/confirm"), &[("csrf", &csrf_of(&r)), ("rd", rd), ("code", &code)])
                .await;
            assert_eq!(r.status, 200, "confirm rd {rd:?}: {}", r.text());
            match href_before(&r.text(), "I have saved my recovery codes") {
                Some(href) => {
                    if let Some(why) = offhost(&href) {
                        v.push(format!("codes page rd {rd:?}: link {href:?}: {why}"));
                    }
                }
                None => v.push(format!("codes page rd {rd:?}: no 'I have saved' link")),
            }
            w.gw.clock.advance(30);
            let o = w.env.cli(&["user", "reset-2fa", "alice"], None).await;
            assert!(o.status.success(), "{}", out_text(&o));
            alice = w.gw.client(APP);
            alice.login_ok("alice", PW).await;
        }
    }
    assert!(v.is_empty(), "{} unsafe redirect(s):\n{}", v.len(), v.join("\n"));
}
