//! Leaks: error pages show no internals; nothing typed as a secret reaches the logs.

use super::*;

// =============================================================================================
// Error pages
// =============================================================================================

fn leaks(text: &str, extra: &[&str]) -> Vec<String> {
    let mut needles: Vec<String> = [
        "panicked",
        "thread '",
        "RUST_BACKTRACE",
        "backtrace",
        "stack backtrace",
        ".rs:",
        "/src/",
        "src/",
        "/home/",
        "/root/",
        "/tmp/",
        "/work/",
        "cargo",
        "hyper::",
        "tokio::",
        "redb",
        "std::",
        "io::Error",
        "Os {",
        "os error",
        "Error {",
        "kind:",
        "Connection refused",
        "connection refused",
        "Elapsed",
        "portcullis::",
        "unwrap",
        "StoreError",
        "Reject::",
        "127.0.0.1:",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    needles.extend(extra.iter().map(|s| s.to_string()));
    needles.into_iter().filter(|n| text.contains(n.as_str())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_pages_leak_no_internals() {
    let up = start_upstream().await;
    let closed = free_addr();
    let env = Env::new(&format!(
        "[two_factor]\nrequired = false\n\n[limits]\nmax_failures = 2\n\n{}{}[[app]]\nhost = \"slow.test\"\nupstream = \"{}\"\npolicy = \"bypass\"\nupstream_timeout = \"1s\"\n\n",
        apps(&up.url(), &up.url()),
        app("down.test", &format!("http://{closed}"), "bypass"),
        up.url()
    ));
    env.add_user("alice", "alice@example.com", "Alice", &[], PW).await;
    let gw = env.start().await;
    let dir = env.path().display().to_string();
    let up_addr = up.addr.to_string();
    let closed_s = closed.to_string();
    let extra = [dir.as_str(), up_addr.as_str(), closed_s.as_str(), "/tmp/."];
    let mut got: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut check = |what: &str, status: u16, want: u16, head: String, body: String| {
        got.entry(status).or_default().push(what.to_string());
        if status != want {
            failures.push(format!("{what}: status {status}, want {want}"));
        }
        let l = leaks(&format!("{head}\n{body}"), &extra);
        if !l.is_empty() {
            failures.push(format!("{what} ({status}) leaks {l:?}:\n{head}\n{body}"));
        }
    };
    let both = |r: &Resp| {
        let head: String =
            r.headers.iter().map(|(k, v)| format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes()))).collect();
        (head, r.text())
    };
    for (what, host, path, accept, want) in [
        ("bad path %2f", APP, "/a%2fb", true, 400),
        ("bad path backslash", APP, "/a%5cb", false, 400),
        ("deny", APP, "/admin/x", true, 403),
        ("unknown host", "nowhere.test", "/", true, 404),
        ("unknown portal page", APP, "/_portcullis/nope", true, 404),
        ("no session", APP, "/x", false, 401),
        ("refused upstream", "down.test", "/x", true, 502),
        ("slow upstream", "slow.test", "/hang", true, 504),
    ] {
        let mut c = gw.client(host);
        let r = if accept { c.browse(path).await } else { c.get(path).await };
        let (h, b) = both(&r);
        check(what, r.status, want, h, b);
    }
    let r = gw.client(APP).send("PUT", &format!("{PREFIX}/login"), &[("accept", "text/html")], None).await;
    let (h, b) = both(&r);
    check("PUT /login", r.status, 405, h, b);
    let r = gw.client(APP).send("DELETE", &format!("{PREFIX}/logout"), &[], None).await;
    let (h, b) = both(&r);
    check("DELETE /logout", r.status, 405, h, b);
    let mut c = gw.client(APP);
    let csrf = c.login_csrf("/").await;
    let big = format!("csrf={csrf}&username=alice&password={}", "x".repeat(100 * 1024));
    let r = c
        .send(
            "POST",
            &format!("{PREFIX}/login"),
            &[("accept", "text/html")],
            Some(("application/x-www-form-urlencoded", big.into_bytes())),
        )
        .await;
    let (h, b) = both(&r);
    check("100 KiB login form", r.status, 413, h, b);
    let r = c
        .send(
            "POST",
            &format!("{PREFIX}/login"),
            &[],
            Some(("application/x-www-form-urlencoded", b"%zz=%%%&&==\xff".to_vec())),
        )
        .await;
    let (h, b) = both(&r);
    check("garbage form", r.status, 403, h, b);
    let r = c.send("POST", &format!("{PREFIX}/login"), &[], Some(("application/json", b"{}".to_vec()))).await;
    let (h, b) = both(&r);
    check("json login", r.status, 400, h, b);
    for _ in 0..3 {
        c.login("alice", WRONG_PW, "/").await;
    }
    let r = c.login("alice", PW, "/").await;
    let (h, b) = both(&r);
    check("locked out", r.status, 429, h, b);
    // raw malformed requests: hyper's own 400s, and the gateway's
    for (what, raw) in [
        ("garbage request line", b"\x16\x03\x01\x00\xa5garbage\r\n\r\n".to_vec()),
        ("NUL path", b"GET /a\0b HTTP/1.1\r\nHost: app.test\r\n\r\n".to_vec()),
        (
            "huge header",
            [b"GET / HTTP/1.1\r\nHost: app.test\r\nX-Big: ".to_vec(), vec![b'a'; 200_000], b"\r\n\r\n".to_vec()]
                .concat(),
        ),
        ("bad version", b"GET / HTTP/9.9\r\nHost: app.test\r\n\r\n".to_vec()),
    ] {
        let (buf, _) = raw_exchange(gw.addr, &raw, Duration::from_millis(1500)).await;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let st = statuses(&buf);
        if st.iter().any(|s| *s >= 500) {
            failures.push(format!("{what}: {st:?}"));
        }
        let l = leaks(&text, &extra);
        if !l.is_empty() {
            failures.push(format!("{what} leaks {l:?}: {text}"));
        }
    }
    eprintln!("error statuses exercised: {got:?}");
    assert!(failures.is_empty(), "{} error-page failure(s):\n{}", failures.len(), failures.join("\n"));
}

// =============================================================================================
// Secrets in logs
// =============================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_typed_as_a_secret_reaches_the_logs() {
    let up = start_upstream().await;
    let env = Env::new(&format!(
        "[server]\nlisten = \"{{LISTEN}}\"\n\n[log]\nformat = \"text\"\nlevel = \"debug\"\n\n[two_factor]\nrequired = false\n\n[limits]\nmax_failures = 50\n\n{MAIL}{}",
        apps(&up.url(), &up.url())
    ));
    let user_pw = "Typed-Secret-Pw-4a7c";
    let wrong_pw = "Wrong-Secret-Pw-9d2e";
    env.add_user("alice", "alice@example.com", "Alice", &["admins"], user_pw).await;
    let gw = env.spawn_child().await;
    let mut secrets: Vec<(String, String)> =
        vec![("password".into(), user_pw.into()), ("wrong password".into(), wrong_pw.into())];
    let mut c = Client::new(gw.addr, APP);
    // wrong password, then right; a password typed into the username field by mistake
    assert_eq!(c.login("alice", wrong_pw, "/").await.status, 401);
    let mistake = "Mistyped-As-Username-77f1";
    c.login(mistake, mistake, "/").await;
    secrets.push(("password typed as username".into(), mistake.into()));
    assert_eq!(c.login("alice", user_pw, "/").await.status, 303);
    secrets.push(("password-session cookie".into(), c.session_cookie().unwrap()));
    secrets.push(("csrf cookie".into(), c.jar.get(CSRF).cloned().unwrap()));
    // enrolment: secret, confirming code, recovery codes
    let r = c.browse(&format!("{PREFIX}/enroll")).await;
    let r =
        c.post_form(&format!("{PREFIX}/enroll"), &[("csrf", &csrf_of(&r)), ("rd", "/"), ("password", user_pw)]).await;
    let secret = shown_secret(&r.text()).unwrap();
    secrets.push(("csrf token".into(), csrf_of(&r)));
    let wrong = wrong_code(&secret, now_unix());
    let r2 = c
        .post_form(&format!("{PREFIX}/enroll/confirm"), &[("csrf", &csrf_of(&r)), ("rd", "/"), ("code", &wrong)])
        .await;
    assert_eq!(r2.status, 422);
    let code = totp_code(&secret, now_unix());
    let r = c
        .post_form(&format!("{PREFIX}/enroll/confirm"), &[("csrf", &csrf_of(&r2)), ("rd", "/"), ("code", &code)])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let codes = shown_codes(&r.text());
    secrets.push(("TOTP secret".into(), secret.clone()));
    secrets.push(("full-session cookie".into(), c.session_cookie().unwrap()));
    for (i, rc) in codes.iter().enumerate() {
        secrets.push((format!("recovery code {i}"), rc.clone()));
        secrets.push((format!("recovery code {i} without dashes"), rc.replace('-', "")));
    }
    // recovery-code login, including a wrong recovery code
    let mut d = Client::new(gw.addr, TF);
    let r = d.login("alice", user_pw, "/").await;
    let page = d.browse(&r.location()).await;
    let bogus = "zzzzz-yyyyy-xxxxx";
    secrets.push(("bogus recovery code".into(), bogus.into()));
    d.post_form(
        &format!("{PREFIX}/challenge"),
        &[("csrf", &csrf_of(&page)), ("rd", "/"), ("method", "recovery"), ("recovery_code", bogus)],
    )
    .await;
    let r = d
        .post_form(
            &format!("{PREFIX}/challenge"),
            &[("csrf", &csrf_of(&page)), ("rd", "/"), ("method", "recovery"), ("recovery_code", &codes[0])],
        )
        .await;
    assert_eq!(r.status, 303, "{}", r.text());
    // proxied request with the cookie and an Authorization header for the app
    let app_token = "Bearer app-secret-token-5e1";
    secrets.push(("app Authorization".into(), app_token.into()));
    let r = d
        .send(
            "GET",
            "/x",
            &[
                ("authorization", app_token),
                ("cookie", &format!("{SESSION}={}; app_sid=appcookie-3b9f", d.session_cookie().unwrap())),
            ],
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    secrets.push(("app cookie".into(), "appcookie-3b9f".into()));
    // password reset (token, new password), password change, invitation (token, password)
    let mut seen = Default::default();
    forgot(&mut Client::new(gw.addr, APP), "alice", &[]).await;
    let mail = wait_mail(&env, "alice@example.com", "/reset?token=", &mut seen).await;
    let (_, tok) = link_in(&mail, "reset");
    secrets.push(("reset token".into(), tok.clone()));
    let new_pw = "Reset-New-Pw-c0ffee";
    secrets.push(("reset password".into(), new_pw.into()));
    let code = totp_code(&secret, now_unix() + 30);
    let r = post_reset(&mut Client::new(gw.addr, APP), &tok, &tok, new_pw, &[("code", &code)]).await;
    assert!(r.status == 200 || r.status == 401, "{}", r.text());
    let o = env.cli(&["user", "invite", "inv@example.com"], None).await;
    assert!(o.status.success());
    let mail = wait_mail(&env, "inv@example.com", "/invite?token=", &mut seen).await;
    let (_, itok) = link_in(&mail, "invite");
    secrets.push(("invitation token".into(), itok.clone()));
    let mut n = Client::new(gw.addr, APP);
    let page = n.browse(&format!("{PREFIX}/invite?token={itok}")).await;
    let inv_pw = "Invitee-Pw-Secret-88";
    secrets.push(("invitee password".into(), inv_pw.into()));
    let r = n
        .post_form(
            &format!("{PREFIX}/invite"),
            &[
                ("csrf", &csrf_of(&page)),
                ("token", &itok),
                ("username", "invitee"),
                ("name", "In Vitee"),
                ("password", inv_pw),
                ("password2", inv_pw),
            ],
        )
        .await;
    assert_eq!(r.status, 303, "{}", r.text());
    secrets.push(("invitee session".into(), n.session_cookie().unwrap_or_else(|| "none-none".into())));
    let chpw = "Changed-Pw-Secret-31";
    secrets.push(("changed password".into(), chpw.into()));
    let page = n.browse(&format!("{PREFIX}/settings/password")).await;
    let r = n
        .post_form(
            &format!("{PREFIX}/settings/password"),
            &[("csrf", &csrf_of(&page)), ("current", inv_pw), ("password", chpw), ("password2", chpw)],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = gw.log();
    assert!(log.lines().count() > 5, "suspiciously short log:\n{log}");
    let mut found = Vec::new();
    for (what, s) in &secrets {
        if s.len() >= 6 && log.contains(s.as_str()) {
            found.push(format!("{what} ({s:?})"));
        }
    }
    eprintln!("checked {} secrets against {} log lines at level debug", secrets.len(), log.lines().count());
    assert!(found.is_empty(), "secrets in the gateway log: {}\nlog:\n{log}", found.join(", "));
}
