//! Behaviours the README and SECURITY.md promise, one test each.

use portcullis::clock::Clock;

use crate::support::*;

const APP: &str = "app.test";

async fn env_with_alice(rest: &str) -> Env {
    let env = Env::password_only(rest);
    env.add_user("alice", "alice@example.com", "Alice Liddell", &["staff"], PW).await;
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_passwd_ends_live_sessions() {
    let up = start_upstream().await;
    let env = env_with_alice(&app(APP, &up.url(), "one_factor")).await;
    let gw = env.start().await;
    let mut c = gw.client(APP);
    c.login_ok("alice", PW).await;
    assert_eq!(c.get("/before").await.status, 200);
    let o = env.cli(&["user", "passwd", "alice", "--password-stdin"], Some("N3w-password-42")).await;
    assert!(o.status.success(), "user passwd: {}", out_text(&o));
    assert!(is_no_session(&c.get("/after").await), "a session from before `user passwd` still works");
    gw.client(APP).login_ok("alice", "N3w-password-42").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_true_sets_secure_on_cookies_without_tls_and_auto_does_not() {
    let up = start_upstream().await;
    for (secure, want) in [("true", true), ("\"auto\"", false)] {
        let env =
            env_with_alice(&format!("[session]\nsecure = {secure}\n\n{}", app(APP, &up.url(), "one_factor"))).await;
        let gw = env.start().await;
        let mut c = gw.client(APP);
        let r = c.login("alice", PW, "/").await;
        assert_eq!(r.status, 303, "{}", r.text());
        let cookies = r.set_cookies();
        let session = cookies.iter().find(|s| s.starts_with(&format!("{SESSION}="))).expect("a session cookie");
        assert_eq!(
            session.to_ascii_lowercase().split(';').any(|a| a.trim() == "secure"),
            want,
            "secure = {secure} over plain HTTP: {session}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_older_than_the_failure_window_stop_counting() {
    let up = start_upstream().await;
    let env = env_with_alice(&format!(
        "[limits]\nmax_failures = 3\nmax_failures_per_address = 1000\nfailure_window = \"10m\"\nlockout = \"15m\"\n\n{}",
        app(APP, &up.url(), "one_factor")
    ))
    .await;
    let gw = env.start().await;
    let wrong = |gw: &Gateway| {
        let mut c = gw.client(APP);
        async move { c.login("alice", "not-the-password", "/").await.status }
    };
    // two failures, then the window passes: two more are a new count of two, not four
    assert_eq!(wrong(&gw).await, 401);
    gw.clock.advance(60);
    assert_eq!(wrong(&gw).await, 401);
    gw.clock.advance(10 * 60);
    assert_eq!(wrong(&gw).await, 401);
    assert_eq!(wrong(&gw).await, 401);
    assert_eq!(gw.client(APP).login("alice", PW, "/").await.status, 303, "failures outside the window still counted");
    // control: three inside the window lock the account
    for _ in 0..3 {
        let s = wrong(&gw).await;
        assert!(s == 401 || s == 429, "{s}");
    }
    assert_eq!(gw.client(APP).login("alice", PW, "/").await.status, 429, "three failures in the window must lock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_set_cookie_for_our_cookie_names_is_dropped_on_both_lanes() {
    let up = start_upstream().await;
    let (maddr, metrics) = metrics_section();
    let env = env_with_alice(&format!("{metrics}{}", app(APP, &up.url(), "one_factor"))).await;
    let gw = env.start().await;
    let mut c = gw.client(APP);
    c.login_ok("alice", PW).await;
    assert_eq!(c.get("/warm").await.status, 200);
    let ours = c.session_cookie().unwrap();
    for lane in Lane::BOTH {
        let before = counts(maddr).await;
        let r = c.send("GET", "/set-cookie", lane.headers(), None).await;
        assert_eq!(r.status, 200, "{lane:?}: {}", r.text());
        lane.assert_served(maddr, before, 1, "the Set-Cookie answer").await;
        let set = r.set_cookies();
        assert!(set.iter().any(|s| s.starts_with("app_pref=1")), "{lane:?}: the app's own cookie was dropped: {set:?}");
        for name in [SESSION, CSRF] {
            assert!(
                // cookie names are case-sensitive (RFC 6265 §5.3): only the exact names are ours
                !set.iter().any(|s| s.split('=').next().is_some_and(|n| n.trim() == name)),
                "{lane:?}: the app set our cookie {name}: {set:?}"
            );
        }
        assert_eq!(c.session_cookie().as_deref(), Some(ours.as_str()), "{lane:?}: our session cookie was replaced");
        assert_eq!(c.get("/still").await.status, 200);
    }
}

/// The value of one exact series (`name{labels}`) on the metrics endpoint; 0 when it has not appeared yet.
async fn series(maddr: std::net::SocketAddr, series: &str) -> u64 {
    let r = Client::new(maddr, &maddr.to_string()).get("/metrics").await;
    assert_eq!(r.status, 200, "metrics: {}", r.text());
    r.text()
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .map(|v| v.trim().parse::<f64>().unwrap_or_else(|e| panic!("{series}: {v:?}: {e}")) as u64)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_factor_outcomes_and_lockouts_are_counted_in_metrics() {
    let up = start_upstream().await;
    let (maddr, metrics) = metrics_section();
    let env = env_with_alice(&format!(
        "{metrics}[limits]\nmax_failures = 3\nmax_failures_per_address = 1000\nfailure_window = \"10m\"\nlockout = \"15m\"\n\n{}",
        app(APP, &up.url(), "two_factor")
    ))
    .await;
    env.add_user("bob", "bob@example.com", "Bob", &[], PW).await;
    let gw = env.start().await;
    let mut a = gw.client(APP);
    a.login_ok("alice", PW).await;
    let page = signed_in_setup_page(&mut a, PW).await;
    let e = confirm_setup_page(&mut a, &page, "/", || gw.clock.now()).await;
    gw.clock.advance(30);
    let challenge = |gw: &Gateway| {
        let mut c = gw.client(APP);
        async move {
            let (_, csrf) = login_to_challenge_page(&mut c, "alice", PW, "/").await;
            (c, csrf)
        }
    };
    let code = totp_code(&e.secret, gw.clock.now());
    let (mut c, csrf) = challenge(&gw).await;
    assert_eq!(submit_totp(&mut c, &csrf, &code, "/").await.status, 303, "right code");
    let (mut c, csrf) = challenge(&gw).await;
    assert_eq!(submit_totp(&mut c, &csrf, &code, "/").await.status, 401, "the same code again (replay)");
    assert_eq!(submit_totp(&mut c, &csrf, "000000", "/").await.status, 401, "wrong code");
    let (mut c, csrf) = challenge(&gw).await;
    assert_eq!(submit_recovery(&mut c, &csrf, &e.codes[0], "/").await.status, 303, "recovery code");
    // a success clears the count: three wrong codes now lock, and the next attempt meets the lock
    let (mut c, csrf) = challenge(&gw).await;
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(submit_totp(&mut c, &csrf, "000000", "/").await.status);
        }
        v
    };
    assert_eq!(statuses, [401, 401, 429], "three wrong codes");
    let s = submit_totp(&mut c, &csrf, &totp_code(&e.secret, gw.clock.now() + 30), "/").await.status;
    assert_eq!(s, 429, "a code while locked");
    // three wrong passwords lock bob
    for _ in 0..3 {
        gw.client(APP).login("bob", "not-the-password", "/").await;
    }
    const F: &str = "portcullis_second_factor_checks_total";
    let got = [
        series(maddr, &format!("{F}{{method=\"totp\",outcome=\"success\"}}")).await,
        series(maddr, &format!("{F}{{method=\"totp\",outcome=\"replay\"}}")).await,
        series(maddr, &format!("{F}{{method=\"totp\",outcome=\"failure\"}}")).await,
        series(maddr, &format!("{F}{{method=\"totp\",outcome=\"locked\"}}")).await,
        series(maddr, &format!("{F}{{method=\"recovery_code\",outcome=\"success\"}}")).await,
        series(maddr, "portcullis_lockouts_total{step=\"second_factor\"}").await,
        series(maddr, "portcullis_lockouts_total{step=\"password\"}").await,
    ];
    assert_eq!(
        got,
        [1, 1, 4, 1, 1, 1, 1],
        "totp success, replay, failure, locked; recovery success; lockouts second_factor, password"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_shows_neither_the_recovery_codes_nor_a_new_secret() {
    let up = start_upstream().await;
    let env = env_with_alice(&app(APP, &up.url(), "one_factor")).await;
    env.add_user("bob", "bob@example.com", "Bob", &[], PW).await;
    let gw = env.start().await;
    // alice has 2FA: "show codes" with a wrong password
    let mut a = gw.client(APP);
    a.login_ok("alice", PW).await;
    let page = signed_in_setup_page(&mut a, PW).await;
    let e = confirm_setup_page(&mut a, &page, "/", || gw.clock.now()).await;
    let form = a.browse(&format!("{PREFIX}/settings/recovery")).await;
    assert_eq!(form.status, 200, "{}", form.text());
    let r = a
        .post_form(
            &format!("{PREFIX}/settings/recovery"),
            &[("csrf", &csrf_of(&form)), ("rd", "/"), ("password", "wrong")],
        )
        .await;
    assert_eq!(r.status, 401, "show codes with a wrong password: {}", r.text());
    assert!(shown_codes(&r.text()).is_empty() && !e.codes.iter().any(|c| r.text().contains(c.as_str())), "codes shown");
    // control: the right password shows them
    let r = a
        .post_form(&format!("{PREFIX}/settings/recovery"), &[("csrf", &csrf_of(&form)), ("rd", "/"), ("password", PW)])
        .await;
    assert_eq!(shown_codes(&r.text()).len(), 10, "control: {}", r.text());
    // bob has none: "enable" with a wrong password
    let mut b = gw.client(APP);
    b.login_ok("bob", PW).await;
    let form = b.browse(&format!("{PREFIX}/enroll?rd=%2F")).await;
    assert_eq!(form.status, 200, "{}", form.text());
    let r = b
        .post_form(&format!("{PREFIX}/enroll"), &[("csrf", &csrf_of(&form)), ("rd", "/"), ("password", "wrong")])
        .await;
    assert_eq!(r.status, 401, "enable with a wrong password: {}", r.text());
    assert!(shown_secret(&r.text()).is_none(), "a secret was shown after a wrong password: {}", r.text());
    assert!(signed_in_setup_page(&mut b, PW).await.status == 200, "control: the right password opens the setup page");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_are_dropped_from_identity_values_on_both_lanes() {
    let up = start_upstream().await;
    let (maddr, metrics) = metrics_section();
    let env = Env::password_only(&format!("{metrics}{}", app(APP, &up.url(), "one_factor")));
    env.add_user("dora", "dora@example.com", "Dora\tthe\u{7}Explorer\u{1b}[31m", &["ops", "dev"], PW).await;
    let gw = env.start().await;
    let mut c = gw.client(APP);
    c.login_ok("dora", PW).await;
    assert_eq!(c.get("/warm").await.status, 200);
    for lane in Lane::BOTH {
        let before = counts(maddr).await;
        let r = c.send("GET", "/who", lane.headers(), None).await;
        assert_eq!(r.status, 200, "{lane:?}: {}", r.text());
        lane.assert_served(maddr, before, 1, "an identity with control characters").await;
        assert_eq!(r.upstream_header("remote-name"), Some(vec!["DoratheExplorer[31m".to_string()]), "{lane:?}");
        assert_eq!(r.upstream_header("remote-user"), Some(vec!["dora".to_string()]), "{lane:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn line_breaks_in_a_typed_username_cannot_forge_log_lines() {
    let up = start_upstream().await;
    let env =
        env_with_alice(&format!("[server]\nlisten = \"{{LISTEN}}\"\n\n{}", app(APP, &up.url(), "one_factor"))).await;
    let mut gw = env.spawn_child().await;
    // (names are folded to lower case before they are logged)
    let forged = "forged-line event=login_succeeded user=admin";
    for typed in [format!("mallory\n{forged}"), format!("mallory\r\n{forged}"), format!("mallory\r{forged}")] {
        let r = Client::new(gw.addr, APP).login(&typed, "wrong-password", "/").await;
        assert_eq!(r.status, 401, "{typed:?}: {}", r.text());
    }
    // a successful login afterwards is logged, so the log has been written up to here
    Client::new(gw.addr, APP).login_ok("alice", PW).await;
    let _ = gw.child.kill().await;
    let log = gw.log();
    assert!(log.contains("forged-line"), "the typed name was not logged at all, so this proves nothing:\n{log}");
    for line in log.split(['\n', '\r']) {
        assert!(
            !line.trim_start().starts_with("forged-line"),
            "a typed username started a log line of its own:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_events_older_than_the_retention_are_deleted() {
    let up = start_upstream().await;
    let env = env_with_alice(&format!("[audit]\nretention = \"1d\"\n\n{}", app(APP, &up.url(), "one_factor"))).await;
    let gw = env.start().await;
    assert_eq!(gw.client(APP).login("alice", "not-the-password", "/").await.status, 401);
    gw.stop().await;
    let kinds = |v: &serde_json::Value| -> Vec<String> {
        v["recent_events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let before = kinds(&show_user(&env, "alice").await);
    assert!(before.iter().any(|k| k == "login_failed"), "control: the failure was recorded: {before:?}");
    // two days later a gateway starts (its sweep runs at start and then every 5 minutes); a new event is kept
    env.clock.advance(2 * 86400);
    let gw = env.start().await;
    assert_eq!(gw.client(APP).login("alice", "not-the-password-either", "/").await.status, 401);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let now = kinds(&show_user(&env, "alice").await);
        if now == ["login_failed"] {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "events older than the 1-day retention are still there: {now:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_within_the_grace_and_no_longer() {
    let up = start_upstream().await;
    let env = Env::password_only(&format!(
        "[server]\nlisten = \"{{LISTEN}}\"\nshutdown_grace = \"3s\"\n\n{}",
        app(APP, &up.url(), "bypass")
    ));
    let mut gw = env.spawn_child().await;
    let addr = gw.addr;
    // one request that finishes inside the grace, one that never would
    let slow = tokio::spawn(async move { Client::new(addr, APP).get("/sleep?ms=1000").await.status });
    let hang = tokio::spawn(async move { Client::new(addr, APP).try_send("GET", "/hang", &[], None).await.is_ok() });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !(up.hits().iter().any(|h| h.path.starts_with("/sleep")) && up.hits().iter().any(|h| h.path == "/hang")) {
        assert!(std::time::Instant::now() < deadline, "the requests never reached the app");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let t = std::time::Instant::now();
    kill(gw.pid, "-TERM");
    assert_eq!(slow.await.unwrap(), 200, "an in-flight request was cut by SIGTERM");
    let status = within("the gateway to exit after SIGTERM", gw.child.wait()).await.unwrap();
    let took = t.elapsed();
    assert!(status.success(), "exit status after SIGTERM: {status}\n{}", gw.log());
    assert!(!hang.await.unwrap(), "the hanging request got an answer");
    // it waited for the slow request (1 s) and gave up on the hanging one at the 3 s grace, not later
    assert!(took >= std::time::Duration::from_millis(900), "exited after {took:?}, before the slow request ended");
    assert!(took < std::time::Duration::from_secs(10), "exited after {took:?}: the 3 s grace was not applied");
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "still accepting connections after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxying_stays_alive_during_a_login_storm() {
    // A gateway with ONE runtime worker thread, two hashes at a time and 24 logins at once: the logins queue
    // for the hashing, which runs off the runtime (the blocking pool), so a signed-in user's proxied requests
    // (no hashing) are answered while most logins are still waiting. Were hashing done on the runtime thread,
    // every proxied request would wait behind the queued hashes.
    let up = start_upstream().await;
    let env = env_with_alice(&format!(
        "[server]\nlisten = \"{{LISTEN}}\"\nmax_concurrent_hashes = 2\n\n[limits]\nmax_failures = 1000\n\
         max_failures_per_address = 100000\n\n{}",
        app(APP, &up.url(), "one_factor")
    ))
    .await;
    let gw =
        env.spawn_child_with(&[("TOKIO_WORKER_THREADS", "1")], "serve.log", std::time::Duration::from_secs(90)).await;
    let mut c = Client::new(gw.addr, APP);
    c.login_ok("alice", PW).await;
    assert_eq!(c.get("/warm").await.status, 200);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut storm = tokio::task::JoinSet::new();
    for i in 0..24 {
        let mut l = Client::new(gw.addr, APP);
        let done = done.clone();
        storm.spawn(async move {
            let pw = if i % 2 == 0 { PW } else { "not-the-password" };
            let s = l.login("alice", pw, "/").await.status;
            done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            s
        });
    }
    // wait until the storm is under way (the first answers come back), then proxy
    while done.load(std::sync::atomic::Ordering::SeqCst) < 2 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    for i in 0..20 {
        assert_eq!(c.get(&format!("/during/{i}")).await.status, 200, "proxied request {i} during the login storm");
    }
    let finished = done.load(std::sync::atomic::Ordering::SeqCst);
    let mut statuses = Vec::new();
    while let Some(s) = storm.join_next().await {
        statuses.push(s.unwrap());
    }
    eprintln!("login storm: {finished} of 24 logins answered when 20 proxied requests were done");
    assert!(statuses.iter().all(|s| *s == 303 || *s == 401), "login statuses: {statuses:?}");
    assert!(finished < 10, "the 20 proxied requests waited for the hashing: {finished} of 24 logins were done first");
}
