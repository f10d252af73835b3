//! Behaviours the README and SECURITY.md promise, one test each (issue 14's "promised, untested" list).

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
        let env = env_with_alice(&format!("[session]\nsecure = {secure}\n\n{}", app(APP, &up.url(), "one_factor"))).await;
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
