//! CSRF: forged posts on every form are refused and change nothing.

use super::*;

// =============================================================================================
// CSRF
// =============================================================================================

/// Extra request headers.
type Headers = Vec<(&'static str, &'static str)>;

/// (what, extra headers, use a foreign token) for each forged variant of a form post.
fn forgeries() -> Vec<(&'static str, Headers, bool, bool)> {
    // (what, headers, foreign token, omit token)
    vec![
        ("missing token", vec![], false, true),
        ("token of another session", vec![], true, false),
        ("cross-site Origin", vec![("origin", "https://evil.com")], false, false),
        ("look-alike Origin", vec![("origin", "http://app.test.evil.com")], false, false),
        ("Origin: null", vec![("origin", "null")], false, false),
        ("Sec-Fetch-Site: cross-site", vec![("sec-fetch-site", "cross-site")], false, false),
    ]
}

async fn forged_post(c: &mut Client, path: &str, fields: &[(&str, &str)], headers: &[(&str, &str)]) -> Resp {
    let body = serde_urlencoded::to_string(fields).unwrap();
    let mut h = vec![("accept", "text/html")];
    h.extend_from_slice(headers);
    c.send("POST", path, &h, Some(("application/x-www-form-urlencoded", body.into_bytes()))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csrf_forgeries_on_login_logout_settings_and_admin_are_refused() {
    let w = world("").await;
    let mut failures = Vec::new();
    // tina: admin with 2FA; bob: plain user whose account the admin actions target
    let mut tina = w.gw.client(APP);
    tina.login_ok("tina", PW).await;
    let e = enrol_signed_in(&w.gw, &mut tina, PW).await;
    login_full(&w.gw, &mut tina, "tina", &e.secret).await;
    let mut bob = w.gw.client(APP);
    bob.login_ok("bob", PW).await;
    let bob_page = bob.browse(&format!("{PREFIX}/logout")).await;
    let bob_token = csrf_of(&bob_page);

    // --- login (anonymous binding) ---
    let mut other = w.gw.client(APP);
    let foreign_login = other.login_csrf("/").await;
    for (what, headers, foreign, omit) in forgeries() {
        let mut c = w.gw.client(APP);
        let own = c.login_csrf("/").await;
        let token = if foreign { foreign_login.clone() } else { own };
        let mut f = vec![("rd", "/"), ("username", "alice"), ("password", PW)];
        if !omit {
            f.push(("csrf", &token));
        }
        let r = forged_post(&mut c, &format!("{PREFIX}/login"), &f, &headers).await;
        if r.status != 403 || c.jar.contains_key(SESSION) {
            failures.push(format!("login, {what}: {} (want 403, no session)", r.status));
        }
    }
    // login CSRF: the attacker's own token + cookie pair is no good in the victim's browser (victim's csrf cookie)
    let mut victim = w.gw.client(APP);
    victim.login_csrf("/").await;
    let r = forged_post(
        &mut victim,
        &format!("{PREFIX}/login"),
        &[("csrf", &foreign_login), ("rd", "/"), ("username", "bob"), ("password", PW)],
        &[],
    )
    .await;
    if r.status != 403 || victim.jar.contains_key(SESSION) {
        failures.push(format!("login CSRF with the attacker's token and the victim's cookie: {}", r.status));
    }
    // ... nor without any csrf cookie (a cross-site form post from a fresh browser)
    let mut fresh = w.gw.client(APP);
    let r = forged_post(
        &mut fresh,
        &format!("{PREFIX}/login"),
        &[("csrf", &foreign_login), ("rd", "/"), ("username", "bob"), ("password", PW)],
        &[],
    )
    .await;
    if r.status != 403 || fresh.jar.contains_key(SESSION) {
        failures.push(format!("login CSRF without the victim's csrf cookie: {}", r.status));
    }
    // control: same-origin Origin passes
    let mut c = w.gw.client(APP);
    let t = c.login_csrf("/").await;
    let r = forged_post(
        &mut c,
        &format!("{PREFIX}/login"),
        &[("csrf", &t), ("rd", "/"), ("username", "alice"), ("password", PW)],
        &[("origin", "http://app.test"), ("sec-fetch-site", "same-origin")],
    )
    .await;
    assert_eq!(r.status, 303, "control: same-origin login");

    // --- logout, settings and admin actions, from tina's Full session ---
    type Fields<'a> = Vec<(&'a str, &'a str)>;
    let actions: Vec<(&str, &str, Fields)> = vec![
        ("logout", "/logout", vec![]),
        ("settings/disable", "/settings/disable", vec![("rd", "/"), ("password", PW)]),
        ("settings/recovery/regenerate", "/settings/recovery/regenerate", vec![("rd", "/"), ("password", PW)]),
        (
            "settings/password",
            "/settings/password",
            vec![("current", PW), ("password", "Hijacked-pass-123"), ("password2", "Hijacked-pass-123")],
        ),
        ("enroll/cancel", "/enroll/cancel", vec![]),
        ("admin lock bob", "/admin/users/bob/lock", vec![]),
        ("admin end-sessions bob", "/admin/users/bob/end-sessions", vec![]),
        ("admin reset-2fa tina", "/admin/users/tina/reset-2fa", vec![]),
        ("admin invite", "/admin/invite", vec![("email", "mallory@evil.com"), ("groups", "admins")]),
    ];
    for (name, path, fields) in &actions {
        for (what, headers, foreign, omit) in forgeries() {
            let page = tina.browse(&format!("{PREFIX}/admin/users/bob")).await;
            let own = csrf_of(&page);
            let token = if foreign { bob_token.clone() } else { own };
            let mut f: Vec<(&str, &str)> = fields.clone();
            if !omit {
                f.push(("csrf", &token));
            }
            let r = forged_post(&mut tina, &format!("{PREFIX}{path}"), &f, &headers).await;
            if r.status != 403 {
                failures.push(format!("{name}, {what}: {} (want 403)", r.status));
            }
        }
    }
    // nothing happened
    assert_eq!(whoami(&mut tina.clone()).await.as_deref(), Some("tina"), "tina's session survived the forged logouts");
    let t = show_user(&w.env, "tina").await;
    if t["two_factor"]["enabled"] != true || t["two_factor"]["recovery_codes_left"] != e.codes.len() {
        failures.push(format!("forged settings posts changed tina's 2FA: {}", t["two_factor"]));
    }
    // A regenerate also leaves as many codes as before, so the count alone can't tell: one of the original codes
    // must still sign tina in.
    let mut c = w.gw.client(APP);
    let (_, csrf) = to_challenge(&mut c, "tina", "/").await;
    let r = submit_recovery(&mut c, &csrf, &e.codes[0], "/").await;
    if r.status != 303 {
        failures
            .push(format!("an original recovery code no longer works ({}): a forged regenerate took effect", r.status));
    }
    let b = show_user(&w.env, "bob").await;
    if b["locked"] != false {
        failures.push("forged admin lock locked bob".into());
    }
    if whoami(&mut bob.clone()).await.as_deref() != Some("bob") {
        failures.push("forged admin end-sessions ended bob's session".into());
    }
    if !password_works(&w.gw, "tina", PW).await {
        failures.push("forged password change took effect".into());
    }
    if mails(&outbox(&w.env)).values().any(|m| m.contains("mallory@evil.com")) {
        failures.push("forged admin invite sent an invitation".into());
    }
    // control: the genuine admin action works (so the 403s above mean something)
    let page = tina.browse(&format!("{PREFIX}/admin/users/bob")).await;
    let r = tina.post_form(&format!("{PREFIX}/admin/users/bob/lock"), &[("csrf", &csrf_of(&page))]).await;
    assert_eq!(r.status, 303, "control: genuine admin lock: {}", r.text());
    assert_eq!(show_user(&w.env, "bob").await["locked"], true);
    assert!(failures.is_empty(), "{} CSRF failure(s):\n{}", failures.len(), failures.join("\n"));
}
