//! Session cookies and fixation: mutated, forged or planted cookies never authenticate.

use super::*;

// =============================================================================================
// Session cookies
// =============================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_session_cookies_never_authenticate() {
    let w = world("").await;
    let mut alice = w.gw.client(APP);
    alice.login_ok("alice", PW).await;
    let good = alice.session_cookie().unwrap();
    let csrf_cookie = alice.jar.get(CSRF).cloned().unwrap();
    let mut bob = w.gw.client(APP);
    bob.login_ok("bob", PW).await;
    let bob_cookie = bob.session_cookie().unwrap();
    assert_eq!(whoami(&mut alice.with_session(&good)).await.as_deref(), Some("alice"));

    let b64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut cases: Vec<(String, String)> = Vec::new();
    // every position, replaced by another character of the same alphabet (a "bit flip" that keeps it decodable)
    for i in 0..good.len() {
        let mut b = good.clone().into_bytes();
        let pos = b64.iter().position(|c| *c == b[i]).unwrap_or(0);
        b[i] = b64[(pos + 1) % b64.len()];
        cases.push((format!("char {i} changed"), String::from_utf8(b).unwrap()));
    }
    // single-bit flips of the last character (catches a decoder that ignores the low bits of the final symbol)
    for bit in 0..6 {
        let mut b = good.clone().into_bytes();
        let last = b.len() - 1;
        let pos = b64.iter().position(|c| *c == b[last]).unwrap_or(0);
        b[last] = b64[pos ^ (1 << bit)];
        cases.push((format!("last char bit {bit}"), String::from_utf8(b).unwrap()));
    }
    for n in [1, 2, 4, 8, 16, good.len() / 2, good.len() - 1] {
        cases.push((format!("truncated to {n}"), good[..n].to_string()));
        cases.push((format!("first {n} dropped"), good[n..].to_string()));
    }
    for (what, v) in [
        ("padding =", format!("{good}=")),
        ("padding ==", format!("{good}==")),
        ("appended char", format!("{good}A")),
        ("prepended char", format!("A{good}")),
        ("quoted", format!("\"{good}\"")),
        ("upper-cased", good.to_ascii_uppercase()),
        ("lower-cased", good.to_ascii_lowercase()),
        ("reversed", good.chars().rev().collect()),
        ("csrf cookie value", csrf_cookie.clone()),
        ("std base64 alphabet", good.replace('-', "+").replace('_', "/")),
        ("percent-encoded dash", good.replace('-', "%2D")),
        ("huge", "A".repeat(6000)),
        ("huge genuine prefix", format!("{good}{}", "B".repeat(6000))),
        ("alice+bob spliced", format!("{}{}", &good[..good.len() / 2], &bob_cookie[bob_cookie.len() / 2..])),
    ] {
        if v != good && v != bob_cookie {
            cases.push((what.to_string(), v));
        }
    }
    let mut failures = Vec::new();
    for (what, value) in &cases {
        let mut c = alice.with_session(value);
        let r = c.get("/mut").await;
        if r.status == 200 {
            failures.push(format!("{what}: {value:?} authenticated as {:?}", r.upstream_header("remote-user")));
        } else if r.status != 401 {
            failures.push(format!("{what}: status {} (want 401)", r.status));
        }
    }
    // Cookie-header shapes: duplicates, csrf-in-session, similar names, raw non-ASCII bytes.
    let header_cases: Vec<(String, Vec<u8>, Option<&str>)> = vec![
        ("bad then good".into(), format!("{SESSION}=AAAA; {SESSION}={good}").into_bytes(), Some("alice")),
        ("good then bad".into(), format!("{SESSION}={good}; {SESSION}=AAAA").into_bytes(), Some("alice")),
        ("alice then bob".into(), format!("{SESSION}={good}; {SESSION}={bob_cookie}").into_bytes(), Some("either")),
        ("csrf name carries session".into(), format!("{CSRF}={good}").into_bytes(), None),
        ("session carries csrf".into(), format!("{SESSION}={csrf_cookie}; {CSRF}={csrf_cookie}").into_bytes(), None),
        ("upper-cased name".into(), format!("{}={good}", SESSION.to_ascii_uppercase()).into_bytes(), None),
        ("name with space".into(), format!("{SESSION} ={good}").into_bytes(), Some("either")),
        ("prefixed name".into(), format!("x{SESSION}={good}").into_bytes(), None),
        (
            "non-ASCII bytes".into(),
            [format!("{SESSION}=").into_bytes(), b"\xff\xfe\xc3\xa9\x80abc".to_vec()].concat(),
            None,
        ),
        (
            "non-ASCII after genuine".into(),
            [format!("{SESSION}={good}").into_bytes(), b"\xc3\xa9".to_vec()].concat(),
            None,
        ),
        ("UTF-8 name".into(), format!("s\u{e9}ssion=1; {SESSION}=\u{2603}").into_bytes(), None),
        ("NUL in value".into(), format!("{SESSION}={}\0{}", &good[..4], &good[4..]).into_bytes(), None),
        ("32 KiB header".into(), format!("{SESSION}={}", "A".repeat(32 * 1024)).into_bytes(), None),
    ];
    for (what, cookie, allowed) in &header_cases {
        let before = w.up.hit_count();
        let mut req = b"GET /mut-raw HTTP/1.1\r\nHost: app.test\r\nCookie: ".to_vec();
        req.extend_from_slice(cookie);
        req.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
        let r = raw_send(w.gw.addr, &req).await;
        let hits: Vec<Hit> = w.up.hits()[before..].to_vec();
        eprintln!("cookie header {what}: {} ({} hits)", r.status, hits.len());
        if r.status >= 500 {
            failures.push(format!("{what}: gateway error {}", r.status));
        }
        for h in &hits {
            let user = h.header("remote-user").map(|v| v.join(","));
            let ok = match (allowed, user.as_deref()) {
                (Some("either"), Some("alice" | "bob")) => true,
                (Some(a), Some(u)) => *a == u,
                _ => false,
            };
            if !ok {
                failures.push(format!("{what}: upstream reached as {user:?}"));
            }
        }
    }
    // a logged-out session's cookie is dead (replay after logout)
    let mut gone = w.gw.client(APP);
    gone.login_ok("alice", PW).await;
    let old = gone.session_cookie().unwrap();
    let page = gone.browse(&format!("{PREFIX}/logout")).await;
    gone.post_form(&format!("{PREFIX}/logout"), &[("csrf", &csrf_of(&page))]).await;
    if whoami(&mut alice.with_session(&old)).await.is_some() {
        failures.push("cookie of a logged-out session still works".into());
    }
    eprintln!("{} cookie values and {} Cookie headers tried", cases.len(), header_cases.len());
    assert_eq!(whoami(&mut alice.with_session(&good)).await.as_deref(), Some("alice"), "genuine cookie still works");
    assert!(failures.is_empty(), "{} cookie failure(s):\n{}", failures.len(), failures.join("\n"));
}

// =============================================================================================
// Session fixation
// =============================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_fixation_planted_cookies_never_become_the_victims_session() {
    let w = world("").await;
    // tina has 2FA (password -> Pending -> Full)
    let mut t0 = w.gw.client(APP);
    t0.login_ok("tina", PW).await;
    let e = enrol_signed_in(&w.gw, &mut t0, PW).await;

    // 1. the attacker's own Password session planted in the victim's browser; victim logs in as alice
    let mut mallory = w.gw.client(APP);
    mallory.login_ok("bob", PW).await;
    let planted = mallory.session_cookie().unwrap();
    let mut victim = w.gw.client(APP);
    let csrf = victim.login_csrf("/").await;
    victim.jar.insert(SESSION.into(), planted.clone());
    let r = victim.post_login(&csrf, "alice", PW, "/").await;
    assert_eq!(r.status, 303, "{}", r.text());
    let after = victim.session_cookie().unwrap();
    assert_ne!(after, planted, "login kept the planted session cookie");
    assert_eq!(whoami(&mut victim).await.as_deref(), Some("alice"));
    let planted_now = whoami(&mut mallory.with_session(&planted)).await;
    assert_ne!(planted_now.as_deref(), Some("alice"), "the planted cookie became alice's session");

    // 2. a genuinely signed cookie whose session the attacker ended (logged out): it verifies, so only the
    //    gateway's choice of a fresh id keeps it from becoming the victim's session
    let mut mallory = w.gw.client(APP);
    mallory.login_ok("bob", PW).await;
    let dead = mallory.session_cookie().unwrap();
    logout(&mut mallory).await;
    assert!(whoami(&mut mallory.with_session(&dead)).await.is_none(), "control: the logged-out cookie is dead");
    let mut victim = w.gw.client(APP);
    let csrf = victim.login_csrf("/").await;
    victim.jar.insert(SESSION.into(), dead.clone());
    let r = victim.post_login(&csrf, "alice", PW, "/").await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert_ne!(victim.session_cookie().unwrap(), dead, "login adopted the planted (logged-out) session id");
    assert_eq!(
        whoami(&mut mallory.with_session(&dead)).await,
        None,
        "the attacker's logged-out cookie became alice's session"
    );

    // 3. the attacker's Pending session (attacker knows tina's password, not her second factor): the victim
    //    finishes the challenge; the cookie the attacker holds must not become Full.
    w.gw.clock.advance(30);
    let mut victim = w.gw.client(TF);
    let (_, csrf) = to_challenge(&mut victim, "tina", "/").await;
    let pending = victim.session_cookie().unwrap();
    let r = submit_totp(&mut victim, &csrf, &totp_code(&e.secret, w.gw.clock.now()), "/").await;
    assert_eq!(r.status, 303, "{}", r.text());
    let full = victim.session_cookie().unwrap();
    assert_ne!(full, pending, "the challenge kept the pending session id");
    assert_eq!(whoami(&mut victim).await.as_deref(), Some("tina"));
    let mut attacker = w.gw.client(TF);
    attacker.jar.insert(SESSION.into(), pending.clone());
    let r = attacker.get("/fixation").await;
    assert_ne!(
        r.status, 200,
        "the pre-challenge (pending) cookie reached a two_factor app after the victim finished the challenge"
    );
    let r = attacker.with_session(&pending).get("/x").await;
    assert!(r.status == 401 || r.status == 303 || r.status == 302, "pending cookie: {}", r.status);

    // 4. forced enrolment: the Pending cookie from before the enrolment is not the Full one after it
    let o = w.env.cli(&["user", "reset-2fa", "tina"], None).await;
    assert!(o.status.success());
    let mut v = w.gw.client(TF);
    v.login_ok("tina", PW).await; // Password level (required = false)
    let before = v.session_cookie().unwrap();
    let e2 = enrol_signed_in(&w.gw, &mut v, PW).await;
    assert!(!e2.codes.is_empty());
    let after = v.session_cookie().unwrap();
    assert_ne!(before, after, "enrolment kept the pre-enrolment session id");
    let r = w.gw.client(TF).with_session(&before).get("/x").await;
    assert_ne!(r.status, 200, "the pre-enrolment (password-level) cookie reached a two_factor app");
}
