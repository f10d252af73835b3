//! Lockout evasion: name variants, fresh clients, forwarded headers and the reset form can't dodge the limits.

use super::*;

// =============================================================================================
// Lockout evasion
// =============================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockout_evasion_by_name_variants_fresh_clients_and_forwarded_headers() {
    let up = start_upstream().await;
    let env = Env::new(&format!(
        "[two_factor]\nrequired = false\n\n[limits]\nmax_failures = 6\nmax_failures_per_address = 1000\nfailure_window = \"10m\"\nlockout = \"15m\"\n\n{}",
        apps(&up.url(), &up.url())
    ));
    env.add_user("carol", "carol@example.com", "Carol", &[], PW).await;
    let gw = env.start().await;
    // six failures, each from a fresh client (new csrf cookie), a different spelling of the account, a different
    // claimed client address (untrusted peer) and User-Agent
    let variants = ["CAROL", " carol", "carol\t", "Carol@Example.com", " CAROL@EXAMPLE.COM ", "cArOl"];
    for (i, name) in variants.iter().enumerate() {
        let mut c = gw.client(APP);
        let csrf = c.login_csrf("/").await;
        let ip = format!("198.51.100.{}", i + 1);
        let ua = format!("evader/{i}");
        let body = serde_urlencoded::to_string([
            ("csrf", csrf.as_str()),
            ("rd", "/"),
            ("username", name),
            ("password", WRONG_PW),
        ])
        .unwrap();
        let r = c
            .send(
                "POST",
                &format!("{PREFIX}/login"),
                &[
                    ("accept", "text/html"),
                    ("x-forwarded-for", &ip),
                    ("x-real-ip", &ip),
                    ("forwarded", &format!("for={ip}")),
                    ("user-agent", &ua),
                    ("true-client-ip", &ip),
                ],
                Some(("application/x-www-form-urlencoded", body.into_bytes())),
            )
            .await;
        assert!(r.status == 401 || r.status == 429, "failure {i} ({name:?}): {}", r.status);
    }
    let mut c = gw.client(APP);
    let csrf = c.login_csrf("/").await;
    let body =
        serde_urlencoded::to_string([("csrf", csrf.as_str()), ("rd", "/"), ("username", "carol"), ("password", PW)])
            .unwrap();
    let r = c
        .send(
            "POST",
            &format!("{PREFIX}/login"),
            &[("accept", "text/html"), ("x-forwarded-for", "203.0.113.77")],
            Some(("application/x-www-form-urlencoded", body.into_bytes())),
        )
        .await;
    assert_eq!(
        r.status, 429,
        "6 failures spread over name variants / fresh clients / spoofed addresses must lock carol"
    );
    assert!(r.header("retry-after").is_some());
    // the email spelling is locked as well
    let r = gw.client(APP).login(" Carol@example.COM", PW, "/").await;
    assert_eq!(r.status, 429, "email spelling while locked");
    // a name that only looks like carol (Unicode) is another (unknown) account, and can't unlock or log in as her
    let r = gw.client(APP).login("\u{ff43}arol", PW, "/").await;
    assert_eq!(r.status, 401, "fullwidth look-alike must not be carol");
    // after the lockout period, the right password works again (so the 429 was the lockout)
    gw.clock.advance(16 * 60);
    assert_eq!(gw.client(APP).login("carol", PW, "/").await.status, 303);
}

/// A wrong-password login for `name` from this peer, claiming `ip` in every forwarded-address header.
async fn failed_login_claiming(gw: &Gateway, name: &str, ip: &str) -> u16 {
    let mut c = gw.client(APP);
    let csrf = c.login_csrf("/").await;
    let body =
        serde_urlencoded::to_string([("csrf", csrf.as_str()), ("rd", "/"), ("username", name), ("password", WRONG_PW)])
            .unwrap();
    let headers = [
        ("accept", "text/html"),
        ("x-forwarded-for", ip),
        ("x-real-ip", ip),
        ("forwarded", &format!("for={ip}")),
        ("true-client-ip", ip),
    ];
    c.send("POST", &format!("{PREFIX}/login"), &headers, Some(("application/x-www-form-urlencoded", body.into_bytes())))
        .await
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_address_limit_is_not_dodged_by_forwarded_headers_from_an_untrusted_peer() {
    // The account limit is out of reach (a new account name each time); only the per-address limit (3) can
    // answer 429 (from the failure that reaches it on). From an untrusted peer every claimed address is ignored, so the peer's own address is limited;
    // behind a trusted proxy the claimed addresses are the clients' and each has its own count (the control that
    // shows the headers are read at all).
    let up = start_upstream().await;
    for trusted in [false, true] {
        let server = if trusted { "[server]\ntrusted_proxies = [\"127.0.0.1/32\"]\n\n" } else { "" };
        let env = Env::new(&format!(
            "{server}[two_factor]\nrequired = false\n\n[limits]\nmax_failures = 1000\nmax_failures_per_address = 3\nfailure_window = \"10m\"\nlockout = \"15m\"\n\n{}",
            apps(&up.url(), &up.url())
        ));
        let gw = env.start().await;
        let mut statuses = Vec::new();
        for i in 0..5 {
            statuses.push(failed_login_claiming(&gw, &format!("nobody{i}"), &format!("198.51.100.{}", i + 1)).await);
        }
        if trusted {
            assert_eq!(
                statuses, [401; 5],
                "behind a trusted proxy, five clients with one failure each are not limited"
            );
            // ... and one forwarded client is limited on its own address
            let same: Vec<u16> = {
                let mut v = Vec::new();
                for i in 0..4 {
                    v.push(failed_login_claiming(&gw, &format!("other{i}"), "203.0.113.9").await);
                }
                v
            };
            assert_eq!(same, [401, 401, 429, 429], "the forwarded client address must be limited");
        } else {
            assert_eq!(
                statuses,
                [401, 401, 429, 429, 429],
                "spoofed forwarded addresses from an untrusted peer must not spread the per-address count"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockout_evasion_of_the_second_factor_through_the_reset_form() {
    let up = start_upstream().await;
    let env = Env::new(&format!(
        "[two_factor]\nrequired = false\n\n[limits]\nmax_failures = 3\nmax_failures_per_address = 1000\n\n{MAIL}{}",
        apps(&up.url(), &up.url())
    ));
    env.add_user("tina", "tina@example.com", "Tina", &[], PW).await;
    let gw = env.start().await;
    let mut t = gw.client(APP);
    t.login_ok("tina", PW).await;
    let e = enrol_signed_in(&gw, &mut t, PW).await;
    let mut seen = Default::default();
    let mut c = gw.client(APP);
    forgot(&mut c, "tina", &[]).await;
    let mail = wait_mail(&env, "tina@example.com", "/reset?token=", &mut seen).await;
    let (_, tok) = link_in(&mail, "reset");
    // wrong second factor on the reset form, from fresh clients with rotating X-Forwarded-For
    for i in 0..3 {
        let mut c = gw.client(APP);
        let wc = wrong_code(&e.secret, gw.clock.now());
        let ip = format!("198.51.100.{i}");
        let page = c.browse(&format!("{PREFIX}/reset?token={tok}")).await;
        assert_eq!(page.status, 200);
        let body = serde_urlencoded::to_string([
            ("csrf", csrf_of(&page).as_str()),
            ("token", &tok),
            ("password", "New-passw0rd-xyz"),
            ("password2", "New-passw0rd-xyz"),
            ("code", &wc),
        ])
        .unwrap();
        let r = c
            .send(
                "POST",
                &format!("{PREFIX}/reset"),
                &[("accept", "text/html"), ("x-forwarded-for", &ip)],
                Some(("application/x-www-form-urlencoded", body.into_bytes())),
            )
            .await;
        assert!(r.status == 401 || r.status == 429, "reset with a wrong code {i}: {}", r.status);
    }
    // now even the right code is refused, on the reset form and on the challenge
    gw.clock.advance(30);
    let code = totp_code(&e.secret, gw.clock.now());
    let r = post_reset(&mut gw.client(APP), &tok, &tok, "New-passw0rd-xyz", &[("code", &code)]).await;
    assert_eq!(r.status, 429, "reset with the right code after 3 second-factor failures: {}", r.text());
    let mut c = gw.client(TF);
    let (_, csrf) = to_challenge(&mut c, "tina", "/").await;
    let r = submit_totp(&mut c, &csrf, &code, "/").await;
    assert_eq!(r.status, 429, "challenge after second-factor failures on the reset form");
    assert!(password_works(&gw, "tina", PW).await, "password unchanged");
}
