//! Reset and invitation tokens: reuse, expiry, tampering, foreign use and host poisoning.

use super::*;

// =============================================================================================
// Reset and invitation tokens
// =============================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_token_abuse_reuse_expiry_tampering_foreign_and_host_poisoning() {
    let w = world("").await;
    let env = &w.env;
    let gw = &w.gw;
    let mut seen = Default::default();
    let mut failures = Vec::new();

    // Host-header poisoning: the link always uses public_url
    let poisons: Vec<Vec<(&str, &str)>> = vec![
        vec![("host", "evil.com")],
        vec![("x-forwarded-host", "evil.com")],
        vec![("forwarded", "host=evil.com;proto=http")],
        vec![("x-forwarded-host", "evil.com"), ("x-forwarded-proto", "http"), ("x-forwarded-port", "8080")],
        vec![("host", "app.test:1@evil.com")],
    ];
    for (i, h) in poisons.iter().enumerate() {
        gw.clock.advance(16 * 60); // past the per-account rate limit window
        let mut c = Client::new(gw.addr, APP);
        let r = forgot(&mut c, "alice", h).await;
        eprintln!("forgot with {h:?}: {}", r.status);
        if r.status != 200 {
            // an unknown Host may be refused outright; that's fine too
            continue;
        }
        let mail = wait_mail(env, "alice@example.com", "/reset?token=", &mut seen).await;
        let (link, _) = link_in(&mail, "reset");
        if !link.starts_with(&format!("{PUBLIC_URL}{PREFIX}/reset?token=")) || mail.contains("evil.com") {
            failures.push(format!("poisoning {i} {h:?}: link {link:?}"));
        }
    }

    gw.clock.advance(16 * 60);
    forgot(&mut gw.client(APP), "alice", &[]).await;
    let mail = wait_mail(env, "alice@example.com", "/reset?token=", &mut seen).await;
    let (_, tok) = link_in(&mail, "reset");
    forgot(&mut gw.client(APP), "bob@example.com", &[]).await;
    let bob_mail = wait_mail(env, "bob@example.com", "/reset?token=", &mut seen).await;
    let (_, bob_tok) = link_in(&bob_mail, "reset");

    // tampered tokens: GET and POST both refuse them and nothing changes
    let mut bad: Vec<String> = vec![
        format!("{tok}0"),
        format!("{tok}%00"),
        format!("{tok}x"),
        format!("{tok}%26token%3D{tok}"),
        tok.to_ascii_uppercase(),
        tok[..63].to_string(),
        format!("0{}", &tok[1..]),
        format!("{tok}{tok}"),
        format!("{tok}\u{200b}"),
        // (surrounding whitespace is trimmed: that is still the genuine token, pasted, so not tried here)
        "0".repeat(64),
        String::new(),
    ];
    bad.retain(|t| t != &tok);
    for t in &bad {
        let r = gw
            .client(APP)
            .browse(&format!("{PREFIX}/reset?token={}", t.replace(' ', "%20").replace('\u{200b}', "%E2%80%8B")))
            .await;
        if r.status != 410 {
            failures.push(format!("GET /reset with tampered token {t:?}: {} (want 410)", r.status));
        }
        let get_status = r.status;
        let r = post_reset(&mut gw.client(APP), &tok, t, "Tampered-pass-123", &[]).await;
        eprintln!("tampered reset token {t:?}: GET {get_status}, POST {}", r.status);
        if r.status == 200 {
            failures.push(format!("POST /reset with tampered token {t:?} succeeded"));
        }
    }
    if password_works(gw, "alice", "Tampered-pass-123").await {
        failures.push("a tampered token changed alice's password".into());
    }
    // bob's token with alice's name in extra fields changes only bob
    let r = post_reset(
        &mut gw.client(APP),
        &bob_tok,
        &bob_tok,
        "Bobs-new-pass-123",
        &[("username", "alice"), ("user", "alice"), ("email", "alice@example.com")],
    )
    .await;
    assert_eq!(r.status, 200, "bob's reset: {}", r.text());
    if password_works(gw, "alice", "Bobs-new-pass-123").await {
        failures.push("bob's token changed alice's password".into());
    }
    assert!(password_works(gw, "bob", "Bobs-new-pass-123").await);
    // a reset token is not an invitation
    let r = gw.client(APP).browse(&format!("{PREFIX}/invite?token={tok}")).await;
    if r.status != 410 {
        failures.push(format!("reset token accepted at /invite: {}", r.status));
    }
    // use, then reuse
    let r = post_reset(&mut gw.client(APP), &tok, &tok, "Alices-new-pass-1", &[]).await;
    assert_eq!(r.status, 200, "genuine reset (after the tampering attempts: {failures:?}): {}", r.text());
    if r.set_cookies().iter().any(|c| c.starts_with(&format!("{SESSION}=")) && !c.starts_with(&format!("{SESSION}=;")))
    {
        failures.push("a reset set a session cookie".into());
    }
    let r = post_reset(&mut gw.client(APP), &tok, &tok, "Reused-pass-1234", &[]).await;
    if r.status != 410 {
        failures.push(format!("reused token: {} (want 410)", r.status));
    }
    if !password_works(gw, "alice", "Alices-new-pass-1").await {
        failures.push("reuse changed the password again".into());
    }
    // expiry via the gateway clock
    gw.clock.advance(16 * 60);
    forgot(&mut gw.client(APP), "alice", &[]).await;
    let mail = wait_mail(env, "alice@example.com", "/reset?token=", &mut seen).await;
    let (_, tok2) = link_in(&mail, "reset");
    assert_eq!(gw.client(APP).browse(&format!("{PREFIX}/reset?token={tok2}")).await.status, 200);
    gw.clock.advance(31 * 60);
    let r = gw.client(APP).browse(&format!("{PREFIX}/reset?token={tok2}")).await;
    if r.status != 410 {
        failures.push(format!("expired token GET: {}", r.status));
    }
    let r = post_reset(&mut gw.client(APP), &tok2, &tok2, "Expired-pass-123", &[]).await;
    if r.status == 200 || password_works(gw, "alice", "Expired-pass-123").await {
        failures.push("an expired token changed the password".into());
    }
    assert!(failures.is_empty(), "{} reset failure(s):\n{}", failures.len(), failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_does_not_bypass_two_factor() {
    let w = world("").await;
    let gw = &w.gw;
    let mut seen = Default::default();
    // a token issued BEFORE 2FA is turned on is void afterwards
    forgot(&mut gw.client(APP), "tina", &[]).await;
    let early = wait_mail(&w.env, "tina@example.com", "/reset?token=", &mut seen).await;
    let (_, early_tok) = link_in(&early, "reset");
    let mut t = gw.client(APP);
    t.login_ok("tina", PW).await;
    let e = enrol_signed_in(gw, &mut t, PW).await;
    let r = post_reset(&mut gw.client(APP), &early_tok, &early_tok, "Early-token-pass1", &[]).await;
    assert_ne!(r.status, 200, "a token issued before 2FA was enabled still works: {}", r.text());

    gw.clock.advance(16 * 60);
    forgot(&mut gw.client(APP), "tina", &[]).await;
    let mail = wait_mail(&w.env, "tina@example.com", "/reset?token=", &mut seen).await;
    let (_, tok) = link_in(&mail, "reset");
    let page = gw.client(APP).browse(&format!("{PREFIX}/reset?token={tok}")).await;
    assert_eq!(page.status, 200);
    // no second factor, empty, wrong, a code-shaped recovery code, method juggling
    let wc = wrong_code(&e.secret, gw.clock.now());
    let attempts: Vec<Vec<(&str, &str)>> = vec![
        vec![],
        vec![("code", "")],
        vec![("code", &wc)],
        vec![("recovery_code", "aaaaa-bbbbb-ccccc")],
        vec![("method", "none")],
        vec![("code", ""), ("recovery_code", "")],
    ];
    for a in &attempts {
        let r = post_reset(&mut gw.client(APP), &tok, &tok, "No-2fa-bypass-12", a).await;
        assert_eq!(r.status, 401, "reset of a 2FA account with {a:?}: {}", r.text());
    }
    assert!(!password_works(gw, "tina", "No-2fa-bypass-12").await);
    // the token is still good; with a right code it works, and 2FA stays on
    let code = totp_code(&e.secret, gw.clock.now());
    let r = post_reset(&mut gw.client(APP), &tok, &tok, "With-2fa-pass-123", &[("code", &code)]).await;
    assert_eq!(r.status, 200, "reset with the right code: {}", r.text());
    let u = show_user(&w.env, "tina").await;
    assert_eq!(u["two_factor"]["enabled"], true, "reset turned 2FA off");
    // the new password still leads to the challenge, not to a session
    gw.clock.advance(30);
    let r = gw.client(TF).login("tina", "With-2fa-pass-123", "/").await;
    assert_eq!(r.status, 303);
    assert!(
        r.location().starts_with(&format!("{PREFIX}/challenge")),
        "after a reset the login skipped the challenge: {}",
        r.location()
    );
    // the old session ended
    assert!(whoami(&mut t).await.is_none(), "a session from before the reset survived it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invitation_token_abuse_reuse_expiry_tampering_and_mass_assignment() {
    let w = world("").await;
    let env = &w.env;
    let gw = &w.gw;
    let mut seen = Default::default();
    let mut failures = Vec::new();
    let o = env.cli(&["user", "invite", "newbie@example.com", "--groups", "staff"], None).await;
    assert!(o.status.success(), "{}", out_text(&o));
    let mail = wait_mail(env, "newbie@example.com", "/invite?token=", &mut seen).await;
    let (link, tok) = link_in(&mail, "invite");
    assert!(link.starts_with(PUBLIC_URL), "{link}");

    async fn accept(gw: &Gateway, page_tok: &str, tok: &str, user: &str, extra: &[(&str, &str)]) -> (Resp, Client) {
        let mut c = gw.client(APP);
        let page = c.browse(&format!("{PREFIX}/invite?token={page_tok}")).await;
        let csrf = match extract_csrf(&page.text()) {
            Some(t) => t,
            // a spent/expired token shows no form: the anonymous binding's token from the login page is the same
            None => c.login_csrf("/").await,
        };
        let mut f: Vec<(&str, &str)> = vec![
            ("csrf", &csrf),
            ("token", tok),
            ("username", user),
            ("name", "New Bie"),
            ("password", "Invited-pass-123"),
            ("password2", "Invited-pass-123"),
        ];
        f.extend_from_slice(extra);
        let r = c.post_form(&format!("{PREFIX}/invite"), &f).await;
        (r, c)
    }
    // tampered tokens
    for t in [
        format!("{tok}0"),
        format!("{tok}x"),
        tok.to_ascii_uppercase(),
        tok[..63].to_string(),
        format!("f{}", &tok[1..]),
        "0".repeat(64),
    ] {
        if t == tok {
            continue;
        }
        let r = gw.client(APP).browse(&format!("{PREFIX}/invite?token={t}")).await;
        if r.status != 410 {
            failures.push(format!("GET /invite tampered {t:?}: {}", r.status));
        }
        let (r, _) = accept(gw, &tok, &t, "tampered", &[]).await;
        if r.status < 400 {
            failures.push(format!("POST /invite tampered {t:?}: {}", r.status));
        }
    }
    // an invitation token is not a reset token
    let r = gw.client(APP).browse(&format!("{PREFIX}/reset?token={tok}")).await;
    if r.status != 410 {
        failures.push(format!("invitation token accepted at /reset: {}", r.status));
    }
    // username taken -> 409, the invitation stays usable
    let (r, _) = accept(gw, &tok, &tok, "alice", &[]).await;
    assert_eq!(r.status, 409, "taken username: {}", r.text());
    let (r, _) = accept(gw, &tok, &tok, "ALICE", &[]).await;
    assert_eq!(r.status, 409, "taken username in another case: {}", r.text());
    // mass assignment: extra fields must not choose groups, email or admin rights
    let (r, _) = accept(
        gw,
        &tok,
        &tok,
        "newbie",
        &[("groups", "admins"), ("email", "mallory@evil.com"), ("admin", "true"), ("group", "admins")],
    )
    .await;
    assert!(r.status == 303, "accept: {} {}", r.status, r.text());
    let u = show_user(env, "newbie").await;
    assert_eq!(u["email"], "newbie@example.com", "POST /invite let the form choose the email: {u}");
    assert_eq!(u["groups"], serde_json::json!(["staff"]), "POST /invite let the form choose groups: {u}");
    // reuse
    let (r, _) = accept(gw, &tok, &tok, "newbie2", &[]).await;
    if r.status != 410 {
        failures.push(format!("reused invitation: {} (want 410)", r.status));
    }
    // expiry (7d) via the gateway clock
    let o = env.cli(&["user", "invite", "late@example.com"], None).await;
    assert!(o.status.success(), "{}", out_text(&o));
    let mail = wait_mail(env, "late@example.com", "/invite?token=", &mut seen).await;
    let (_, late) = link_in(&mail, "invite");
    gw.clock.advance(7 * 86400 + 60);
    let r = gw.client(APP).browse(&format!("{PREFIX}/invite?token={late}")).await;
    if r.status != 410 {
        failures.push(format!("expired invitation GET: {}", r.status));
    }
    let (r, _) = accept(gw, &late, &late, "late", &[]).await;
    if r.status != 410 {
        failures.push(format!("expired invitation POST: {}", r.status));
    }
    let o = env.cli(&["user", "show", "late", "--json"], None).await;
    if o.status.success() {
        failures.push("an expired invitation created an account".into());
    }
    assert!(failures.is_empty(), "{} invitation failure(s):\n{}", failures.len(), failures.join("\n"));
}
