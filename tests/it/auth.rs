//! Login, sessions, policies, host matching, lockout, redirects.

use std::time::Instant;

use crate::support::*;

fn one_factor(up: &Upstream) -> String {
    app("app.test", &up.url(), "one_factor")
}

async fn env_with_alice(rest: &str) -> Env {
    let env = Env::password_only(rest);
    env.add_user("alice", "alice@example.com", "Alice Liddell", &["staff", "dev"], PW).await;
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_browser_get_redirects_to_login_non_browser_gets_401() {
    let up = start_upstream().await;
    let env = Env::password_only(&one_factor(&up));
    let gw = env.start().await;
    let mut c = gw.client("app.test");

    let target = "/some/path?x=1&y=two";
    let r = c.browse(target).await;
    assert_eq!(r.status, 302, "browser GET without session: {}", r.text());
    let loc = r.location();
    assert!(loc.starts_with(&format!("{PREFIX}/login?")), "Location = {loc}");
    assert_eq!(query_param(&loc, "rd").as_deref(), Some(target), "rd in Location {loc} must round-trip");

    let r = c.send("HEAD", "/x", &[("accept", "text/html")], None).await;
    assert_eq!(r.status, 302, "browser HEAD without session");

    for (what, headers) in [
        ("no Accept", vec![]),
        ("Accept: application/json", vec![("accept", "application/json")]),
        ("Accept: */*", vec![("accept", "*/*")]),
    ] {
        let r = c.send("GET", target, &headers, None).await;
        assert_eq!(r.status, 401, "GET with {what} without session");
    }
    let r = c.send("POST", "/form", &[("accept", "text/html")], Some(("text/plain", b"x".to_vec()))).await;
    assert_eq!(r.status, 401, "POST (even from a browser) without session must be 401");

    assert_eq!(up.hit_count(), 0, "unauthenticated requests reached the upstream: {:?}", up.hits());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_success_redirects_to_rd_and_upstream_sees_identity_headers() {
    let up = start_upstream().await;
    let env = env_with_alice(&one_factor(&up)).await;
    let gw = env.start().await;
    let mut c = gw.client("app.test");

    let r = c.login("alice", PW, "/dash/board?a=1&b=2").await;
    assert_eq!(r.status, 303, "login: {}", r.text());
    assert_eq!(r.location(), "/dash/board?a=1&b=2");
    let sc = r.set_cookies().into_iter().find(|s| s.starts_with(&format!("{SESSION}="))).expect("session Set-Cookie");
    let lc = sc.to_ascii_lowercase();
    assert!(lc.contains("httponly"), "{sc}");
    assert!(lc.contains("samesite=lax"), "{sc}");
    assert!(lc.contains("path=/"), "{sc}");

    let r = c.get("/dash/board?a=1&b=2").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.upstream_path(), "/dash/board?a=1&b=2");
    assert_eq!(r.upstream_header("remote-user"), Some(vec!["alice".to_string()]));
    assert_eq!(r.upstream_header("remote-email"), Some(vec!["alice@example.com".to_string()]));
    assert_eq!(r.upstream_header("remote-name"), Some(vec!["Alice Liddell".to_string()]));
    let groups = r.upstream_header("remote-groups").expect("remote-groups header");
    assert_eq!(groups.len(), 1, "{groups:?}");
    let mut g: Vec<&str> = groups[0].split(',').map(str::trim).collect();
    g.sort();
    assert_eq!(g, vec!["dev", "staff"]);
    assert!(r.upstream_header("x-forwarded-for").is_some(), "X-Forwarded-For must be set");
    assert_eq!(r.upstream_header("x-forwarded-proto"), Some(vec!["http".to_string()]));
    assert_eq!(r.upstream_header("x-forwarded-host"), Some(vec!["app.test".to_string()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_deny_is_403_and_group_restriction_enforced() {
    let up = start_upstream().await;
    let cfg = format!(
        "{}{}[[app]]\nhost = \"staff.test\"\nupstream = \"{}\"\npolicy = \"one_factor\"\ngroups = [\"staff\"]\n",
        app("deny.test", &up.url(), "deny"),
        app("app.test", &up.url(), "one_factor"),
        up.url()
    );
    let env = env_with_alice(&cfg).await;
    env.add_user("bob", "bob@example.com", "Bob", &["dev"], PW).await;
    let gw = env.start().await;

    // deny: unauthenticated and authenticated
    let r = gw.client("deny.test").get("/anything").await;
    assert_eq!(r.status, 403, "deny app, no session");
    let r = gw.client("deny.test").browse("/anything").await;
    assert_eq!(r.status, 403, "deny app, no session, browser");

    let mut bob = gw.client("staff.test");
    bob.login_ok("bob", PW).await;
    let r = bob.get("/secret").await;
    assert_eq!(r.status, 403, "bob (not in staff) on staff-only app");
    bob.host = "deny.test".into();
    let r = bob.get("/anything").await;
    assert_eq!(r.status, 403, "deny app with session");
    bob.host = "app.test".into();
    let r = bob.get("/fine").await;
    assert_eq!(r.status, 200, "bob on an app without group restriction");
    let before = up.hit_count();

    let mut alice = gw.client("staff.test");
    alice.login_ok("alice", PW).await;
    let r = alice.get("/secret").await;
    assert_eq!(r.status, 200, "alice (in staff) on staff-only app: {}", r.text());
    assert_eq!(r.upstream_header("remote-user"), Some(vec!["alice".to_string()]));
    assert_eq!(up.hit_count(), before + 1);
    assert!(
        !up.hits().iter().any(|h| h.path.starts_with("/anything")
            || (h.path == "/secret" && h.header("remote-user") == Some(vec!["bob".into()]))),
        "denied requests reached upstream: {:?}",
        up.hits()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_host_is_404_and_host_matching_ignores_case_port_and_trailing_dot() {
    let up = start_upstream().await;
    let env = Env::password_only(&app("app.test", &up.url(), "bypass"));
    let gw = env.start().await;

    for host in ["other.test", "evilapp.test", "app.test.evil.com", "app.testx", "test"] {
        let r = gw.client(host).get("/x").await;
        assert_eq!(r.status, 404, "unknown host {host}");
        let r = gw.client(host).browse("/x").await;
        assert_eq!(r.status, 404, "unknown host {host} (browser)");
    }
    assert_eq!(up.hit_count(), 0, "unknown hosts were proxied: {:?}", up.hits());

    for host in ["app.test", "APP.TEST", "App.Test", "app.test:8443", "app.test.", "App.Test.:80"] {
        let r = gw.client(host).get("/matched").await;
        assert_eq!(r.status, 200, "host {host} should match app.test");
        assert_eq!(r.upstream_path(), "/matched");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_app_catches_unknown_hosts() {
    let up = start_upstream().await;
    let env = Env::password_only(&format!(
        "{}{}",
        app("app.test", "http://127.0.0.1:9", "deny"),
        app("*", &up.url(), "bypass")
    ));
    let gw = env.start().await;
    let r = gw.client("whatever.example").get("/w").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.upstream_path(), "/w");
    let r = gw.client("APP.test").get("/w").await;
    assert_eq!(r.status, 403, "specific app must win over *");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_deletes_session_server_side() {
    let up = start_upstream().await;
    let env = env_with_alice(&one_factor(&up)).await;
    let gw = env.start().await;
    let mut c = gw.client("app.test");
    c.login_ok("alice", PW).await;
    let old = c.session_cookie().unwrap();
    assert_eq!(c.get("/before").await.status, 200);

    let page = c.browse(&format!("{PREFIX}/logout")).await;
    assert_eq!(page.status, 200, "logout page");
    let csrf = extract_csrf(&page.text()).expect("csrf token on logout page");
    let r = c.post_form(&format!("{PREFIX}/logout"), &[("csrf", &csrf)]).await;
    assert_eq!(r.status, 303, "logout: {}", r.text());
    assert!(r.location().contains(&format!("{PREFIX}/login")), "logout Location {}", r.location());

    let mut replay = c.with_session(&old);
    let r = replay.get("/after").await;
    assert_eq!(r.status, 401, "old cookie replayed after logout (API)");
    let r = replay.browse("/after").await;
    assert_eq!(r.status, 302, "old cookie replayed after logout (browser)");
    assert!(up.hits().iter().all(|h| h.path != "/after"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_without_csrf_does_not_end_session() {
    let up = start_upstream().await;
    let env = env_with_alice(&one_factor(&up)).await;
    let gw = env.start().await;
    let mut c = gw.client("app.test");
    c.login_ok("alice", PW).await;
    for fields in [vec![], vec![("csrf", "forged-token")]] {
        let r = c.post_form(&format!("{PREFIX}/logout"), &fields).await;
        assert!(r.status < 500, "logout with bad csrf gave {}", r.status);
        assert_ne!(r.status, 303, "logout accepted without a valid csrf token");
    }
    assert_eq!(c.get("/still").await.status, 200, "session must survive a forged logout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_with_missing_or_bad_csrf_is_403() {
    let up = start_upstream().await;
    let env = env_with_alice(&one_factor(&up)).await;
    let gw = env.start().await;
    let mut c = gw.client("app.test");
    let csrf = c.login_csrf("/").await;
    let r = c.post_login("wrong-token", "alice", PW, "/").await;
    assert_eq!(r.status, 403, "bad csrf");
    let r = c.post_form(&format!("{PREFIX}/login"), &[("rd", "/"), ("username", "alice"), ("password", PW)]).await;
    assert_eq!(r.status, 403, "missing csrf field");
    // right token but no csrf cookie
    let mut nocookie = gw.client("app.test");
    let r = nocookie.post_login(&csrf, "alice", PW, "/").await;
    assert_eq!(r.status, 403, "csrf field without csrf cookie");
    assert!(!nocookie.jar.contains_key(SESSION));
    // and the real thing works
    let r = c.post_login(&csrf, "alice", PW, "/").await;
    assert_eq!(r.status, 303);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_session_cookies_are_no_session_never_500() {
    let up = start_upstream().await;
    let env = env_with_alice(&one_factor(&up)).await;
    let gw = env.start().await;
    let mut c = gw.client("app.test");
    c.login_ok("alice", PW).await;
    let good = c.session_cookie().unwrap();
    assert_eq!(c.with_session(&good).get("/ok").await.status, 200, "control: the real cookie works");

    let mid = good.len() / 2;
    let mut tampered: Vec<u8> = good.clone().into_bytes();
    tampered[mid] = if tampered[mid] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let mut tampered2: Vec<u8> = good.clone().into_bytes();
    tampered2[1] = if tampered2[1] == b'x' { b'y' } else { b'x' };
    let tampered2 = String::from_utf8(tampered2).unwrap();
    let cases: Vec<(&str, String)> = vec![
        ("tampered middle", tampered),
        ("tampered start", tampered2),
        ("truncated", good[..good.len() - 5].to_string()),
        ("half", good[..mid].to_string()),
        ("doubled", format!("{good}{good}")),
        ("empty", String::new()),
        ("garbage", "!!!not-a-cookie@@@".to_string()),
        ("base64 junk", "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB".to_string()),
        ("base64url zeros", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".to_string()),
        ("long", "A".repeat(3000)),
        ("percent junk", "%00%ff%2F..".to_string()),
    ];
    for (what, value) in cases {
        let mut bad = c.with_session(&value);
        let r = bad.get(&format!("/probe-{}", what.replace(' ', "-"))).await;
        assert_eq!(r.status, 401, "{what} cookie (API)");
        let r = bad.browse("/probe").await;
        assert_eq!(r.status, 302, "{what} cookie (browser)");
    }
    assert!(up.hits().iter().all(|h| !h.path.starts_with("/probe")), "bad cookies reached upstream");
    assert_eq!(c.with_session(&good).get("/ok").await.status, 200, "the real cookie still works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_signed_by_another_gateway_is_rejected() {
    let up = start_upstream().await;
    let env = env_with_alice(&one_factor(&up)).await;
    let gw = env.start().await;
    let mut c = gw.client("app.test");
    c.login_ok("alice", PW).await;
    let genuine = c.session_cookie().unwrap();
    assert_eq!(c.get("/home").await.status, 200, "control: the genuine cookie works");

    // The same session id, live in this gateway's store, signed with a key this gateway does not hold (another
    // gateway's master secret): only the signature differs, so only the signature check can refuse it.
    // cookie 0.18 signs as base64(HMAC-SHA256) (44 chars) followed by the value.
    let id = &genuine[44..];
    let sign = |master: &[u8]| {
        let keys = portcullis::keys::Keys::from_master(master);
        let mut jar = cookie::CookieJar::new();
        jar.signed_mut(&keys.cookie).add(cookie::Cookie::new(SESSION, id.to_string()));
        jar.get(SESSION).unwrap().value().to_string()
    };
    let master = std::fs::read(env.path().join("secret.key")).expect("secret key file created");
    assert_eq!(sign(&master), genuine, "the test's signing must reproduce the gateway's cookie");
    let forged = sign(&[0x5a; 64]);
    assert_ne!(forged, genuine);
    assert_eq!(&forged[44..], id, "same id, other signature");

    let r = c.with_session(&forged).get("/foreign").await;
    assert_eq!(r.status, 401, "a live session id signed with a foreign key was accepted");
    let r = c.with_session(&forged).browse("/foreign").await;
    assert_eq!(r.status, 302);
    assert_eq!(c.get("/still").await.status, 200, "the genuine cookie still works afterwards");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expires_after_idle_timeout() {
    let up = start_upstream().await;
    let env =
        env_with_alice(&format!("[session]\nidle_timeout = \"1h\"\nmax_lifetime = \"12h\"\n\n{}", one_factor(&up)))
            .await;
    let gw = env.start().await;
    let mut c = gw.client("app.test");
    c.login_ok("alice", PW).await;
    assert_eq!(c.get("/t0").await.status, 200);
    gw.clock.advance(59 * 60);
    assert_eq!(c.get("/t59m").await.status, 200, "still valid 59 min after last use");
    gw.clock.advance(61 * 60);
    let r = c.get("/t2h").await;
    assert_eq!(r.status, 401, "session idle for 61 min must be expired");
    // and it stays dead even if used again
    assert_eq!(c.get("/again").await.status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expires_after_max_lifetime_even_when_active() {
    let up = start_upstream().await;
    let env =
        env_with_alice(&format!("[session]\nidle_timeout = \"1h\"\nmax_lifetime = \"2h\"\n\n{}", one_factor(&up)))
            .await;
    let gw = env.start().await;
    let mut c = gw.client("app.test");
    c.login_ok("alice", PW).await;
    // Stay active in 2-minute steps up to 118 minutes. The gateway refreshes last-seen in the
    // background, so a refresh may land a few requests late; small steps make that harmless
    // (only a refresh from within the last 30 steps is needed), without sleeping.
    for i in 1..=59 {
        gw.clock.advance(2 * 60);
        let r = c.get(&format!("/active-{i}")).await;
        assert_eq!(r.status, 200, "active session after {} min (idle timeout 1h, max lifetime 2h)", i * 2);
    }
    gw.clock.advance(4 * 60); // 122 min since login, 4 min since last use
    let r = c.get("/too-old").await;
    assert_eq!(r.status, 401, "session older than max_lifetime must be expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_users_and_sessions() {
    let up = start_upstream().await;
    let env = env_with_alice(&one_factor(&up)).await;
    let gw = env.start().await;
    let mut c = gw.client("app.test");
    c.login_ok("alice", PW).await;
    assert_eq!(c.get("/before").await.status, 200);
    gw.stop().await;

    let gw = env.start().await;
    c.addr = gw.addr;
    let r = c.get("/after-restart").await;
    assert_eq!(r.status, 200, "session lost across restart");
    assert_eq!(r.upstream_header("remote-user"), Some(vec!["alice".to_string()]));
    let mut fresh = gw.client("app.test");
    fresh.login_ok("alice", PW).await;
    gw.stop().await;
}

// ------------------------------------------------------------------------------------------
// Lockout
// ------------------------------------------------------------------------------------------

fn lockout_cfg(up: &Upstream) -> String {
    format!("[limits]\nmax_failures = 3\nfailure_window = \"10m\"\nlockout = \"15m\"\n\n{}", one_factor(up))
}

fn retry_after(r: &Resp) -> u64 {
    let v = r.header("retry-after").expect("429 without Retry-After");
    v.trim().parse().unwrap_or_else(|_| panic!("Retry-After not integer seconds: {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockout_after_max_failures_then_unlocks_after_lockout_period() {
    let up = start_upstream().await;
    let env = env_with_alice(&lockout_cfg(&up)).await;
    let gw = env.start().await;
    let mut c = gw.client("app.test");
    for i in 1..=2 {
        let r = c.login("alice", "wrong", "/").await;
        assert_eq!(r.status, 401, "wrong password #{i}");
    }
    let r = c.login("alice", "wrong", "/").await;
    assert!(r.status == 401 || r.status == 429, "wrong password #3: {}", r.status);
    let r = c.login("alice", PW, "/").await;
    assert_eq!(r.status, 429, "after 3 failures even the right password must be refused");
    assert!(!c.jar.contains_key(SESSION), "a session was issued while locked");
    let ra = retry_after(&r);
    assert!(ra > 0 && ra <= 15 * 60 + 1, "Retry-After = {ra}");

    gw.clock.advance(10 * 60);
    let r = c.login("alice", PW, "/").await;
    assert_eq!(r.status, 429, "still locked after 10 of 15 minutes");
    gw.clock.advance(5 * 60 + 2);
    let r = c.login("alice", PW, "/").await;
    assert_eq!(r.status, 303, "lockout expired, correct password must work: {}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn successful_login_resets_failure_counter() {
    let up = start_upstream().await;
    let env = env_with_alice(&lockout_cfg(&up)).await;
    let gw = env.start().await;
    let mut c = gw.client("app.test");
    for _ in 0..2 {
        assert_eq!(c.login("alice", "wrong", "/").await.status, 401);
    }
    assert_eq!(c.login("alice", PW, "/").await.status, 303);
    for i in 0..2 {
        assert_eq!(c.login("alice", "wrong", "/").await.status, 401, "wrong after reset #{i}");
    }
    let r = c.login("alice", PW, "/").await;
    assert_eq!(r.status, 303, "2+2 failures separated by a success must not lock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockout_counts_email_and_name_variants_against_same_account() {
    let up = start_upstream().await;
    let env = Env::password_only(&lockout_cfg(&up));
    env.add_user("carol", "carol@example.com", "Carol", &[], PW).await;
    let gw = env.start().await;
    let mut c = gw.client("app.test");
    for name in ["carol@example.com", "  CAROL ", "Carol@Example.COM"] {
        let r = c.login(name, "wrong", "/").await;
        assert!(r.status == 401 || r.status == 429, "{name}: {}", r.status);
    }
    let r = c.login("carol", PW, "/").await;
    assert_eq!(r.status, 429, "failures via email/case variants must lock the same account");
    retry_after(&r);
    // login via e-mail works for a different user, to show the variants are real identifiers
    env.add_user("dan", "dan@example.com", "Dan", &[], PW).await;
    let r = gw.client("app.test").login(" DAN@example.com ", PW, "/").await;
    assert_eq!(r.status, 303, "login by e-mail, other case, surrounding spaces");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_usernames_are_locked_the_same_way() {
    let up = start_upstream().await;
    let env = env_with_alice(&lockout_cfg(&up)).await;
    let gw = env.start().await;
    let mut c = gw.client("app.test");
    for i in 0..3 {
        let r = c.login("nobody", "whatever", "/").await;
        assert!(r.status == 401 || (i == 2 && r.status == 429), "unknown user try {i}: {}", r.status);
    }
    let r = c.login("nobody", "whatever", "/").await;
    assert_eq!(r.status, 429, "unknown name must be locked after max_failures");
    retry_after(&r);
    // other accounts unaffected
    assert_eq!(c.login("alice", PW, "/").await.status, 303);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_user_and_wrong_password_are_indistinguishable() {
    let up = start_upstream().await;
    let env = env_with_alice(&format!("[limits]\nmax_failures = 1000\n\n{}", one_factor(&up))).await;
    let gw = env.start().await;
    let mut c = gw.client("app.test");
    let csrf = c.login_csrf("/").await;

    let a = c.post_login(&csrf, "alice", "wrong-password", "/").await;
    let b = c.post_login(&csrf, "mallory", "wrong-password", "/").await;
    assert_eq!(a.status, 401);
    assert_eq!(b.status, 401);
    assert!(a.text().contains("Invalid username or password"), "{}", a.text());
    // The page may echo the submitted username back into the form; neutralise that.
    let na = a.text().replace("alice", "USER");
    let nb = b.text().replace("mallory", "USER");
    assert_eq!(na, nb, "wrong-password and unknown-user pages differ");
    assert_eq!(a.set_cookies(), b.set_cookies(), "different Set-Cookie");

    // timing: interleave, take medians
    let mut ta = Vec::new();
    let mut tb = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        assert_eq!(c.post_login(&csrf, "alice", "wrong-password", "/").await.status, 401);
        ta.push(t.elapsed());
        let t = Instant::now();
        assert_eq!(c.post_login(&csrf, "mallory", "wrong-password", "/").await.status, 401);
        tb.push(t.elapsed());
    }
    ta.sort();
    tb.sort();
    let (ma, mb) = (ta[3].as_secs_f64(), tb[3].as_secs_f64());
    let ratio = mb / ma;
    eprintln!("login timing: wrong password median {ma:.4}s, unknown user median {mb:.4}s, ratio {ratio:.2}");
    assert!((0.33..=3.0).contains(&ratio), "timing differs: wrong-password {ma:.4}s vs unknown-user {mb:.4}s");
}

/// Why `loc` (the Location after logging in with `rd`) is not a same-host path, if it isn't.
fn safe_location_violation(rd: &str, loc: &str) -> Option<String> {
    let lower = loc.to_ascii_lowercase();
    let decoded = percent_encoding::percent_decode_str(loc).decode_utf8_lossy().to_string();
    let why = if !loc.starts_with('/') {
        "not a path"
    } else if loc.contains("//") {
        "contains //"
    } else if loc.contains('\\') {
        "contains a backslash"
    } else if loc.chars().any(|c| c.is_control() || c == ' ') {
        "contains control characters or spaces"
    } else if lower.starts_with("/%2f") || lower.starts_with("/%5c") {
        "starts with an encoded slash"
    } else if decoded.starts_with("//") || decoded.starts_with("/\\") || decoded.chars().take(3).any(|c| c.is_control())
    {
        "escapes the host once percent-decoded"
    } else {
        return None;
    };
    Some(format!("{why}: rd {rd:?} -> Location {loc:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_rd_values_never_redirect_off_host() {
    let up = start_upstream().await;
    let env = env_with_alice(&format!("[limits]\nmax_failures = 1000\n\n{}", one_factor(&up))).await;
    let gw = env.start().await;
    let port = gw.addr.port();
    let same_host_other_port = format!("http://app.test:{}/x", port + 1);
    let same_host = format!("http://app.test:{port}/x");
    let hostile: Vec<&str> = vec![
        "//evil.com",
        "/\\evil.com",
        "https://evil.com",
        "http://evil.com/path",
        "javascript:alert(1)",
        "JaVaScRiPt:alert(1)",
        "/%2F%2Fevil.com",
        "/%2f%2fevil.com",
        "/\t/evil.com",
        "%0d%0aLocation: x",
        "/\r\nLocation: http://evil.com",
        "/x\r\nSet-Cookie: pwn=1",
        "http:evil.com",
        "//evil.com@good",
        "\\\\evil.com",
        "/%5Cevil.com",
        "/%5cevil.com",
        "data:text/html,x",
        "  //evil.com",
        "///evil.com",
        "/.//evil.com",
        "https:/evil.com",
        "//evil.com/%2F..",
        "/\\/evil.com",
        "\t//evil.com",
        "evil.com",
        "http://app.test/x",
        &same_host,
        &same_host_other_port,
        "https://app.test/x",
        "//app.test/x",
    ];
    let mut violations = Vec::new();
    for rd in &hostile {
        let mut c = gw.client("app.test");
        let r = c.login("alice", PW, rd).await;
        if r.status != 303 {
            violations.push(format!("rd {rd:?}: login status {} (expected 303)", r.status));
            continue;
        }
        if let Some(v) = safe_location_violation(rd, &r.location()) {
            violations.push(v);
        }
    }
    assert!(violations.is_empty(), "{} unsafe redirect(s):\n{}", violations.len(), violations.join("\n"));
    // positive controls
    for rd in ["/ok/path?q=1", "/", "/a/b/c"] {
        let mut c = gw.client("app.test");
        let r = c.login("alice", PW, rd).await;
        assert_eq!(r.status, 303);
        assert_eq!(r.location(), rd, "safe rd must be honoured");
    }
}
