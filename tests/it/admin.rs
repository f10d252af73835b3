//! Admin pages: the user list (two-factor filter, search, pagination), the user detail page with its actions
//! (lock / unlock / reset-2fa / end-sessions, each audited), 403 for everyone who is not a fully signed-in admin,
//! and no hashes, secrets or recovery codes on any admin page.
//! The admin signs in through the real flow: password, forced enrolment, TOTP codes from `oathtool` computed for the
//! gateway's ManualClock time.

use std::collections::BTreeSet;

use crate::support::*;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Host of the `two_factor` app.
const APP: &str = "app.test";
/// The admin account (member of the default admin group "admins").
const ADMIN: &str = "admin";
const ADMIN_PW: &str = "Adm1n-passw0rd!";

/// The rows of the users table: (username from the row's link, row HTML, unescaped).
fn rows(html: &str) -> Vec<(String, String)> {
    let html = unescape(html);
    let marker = format!("href=\"{PREFIX}/admin/users/");
    html.split("<tr")
        .skip(1)
        .filter_map(|row| {
            let row = &row[..row.find("</tr>").unwrap_or(row.len())];
            let i = row.find(&marker)? + marker.len();
            let name = &row[i..];
            let name = &name[..name.find('"')?];
            let name = percent_encoding::percent_decode_str(name).decode_utf8_lossy().into_owned();
            Some((name, row.to_string()))
        })
        .collect()
}

fn names(html: &str) -> Vec<String> {
    rows(html).into_iter().map(|(n, _)| n).collect()
}

/// "enabled" or "disabled": what the row says about two-factor.
fn row_state(row: &str) -> &'static str {
    let text = strip_tags(row);
    let words: Vec<&str> = text.split(|c: char| !c.is_alphanumeric()).collect();
    match (words.contains(&"enabled"), words.contains(&"disabled")) {
        (true, false) => "enabled",
        (false, true) => "disabled",
        _ => panic!("row does not say exactly one of enabled/disabled: {row}"),
    }
}

/// The href of the "Next page" link (one containing `after=`), unescaped.
fn next_link(html: &str) -> Option<String> {
    let html = unescape(html);
    html.split("href=\"").skip(1).filter_map(|s| s.split('"').next()).find(|h| h.contains("after=")).map(str::to_string)
}

/// A gateway with one two_factor app and an enrolled admin signed in at the Full level.
struct World {
    up: Upstream,
    env: Env,
    gw: Gateway,
    admin: Client,
    admin_2fa: Enrolled,
}

async fn world() -> World {
    let up = start_upstream().await;
    let env = Env::new(&app(APP, &up.url(), "two_factor"));
    env.add_user(ADMIN, "root@ops.test", "Ada Admin", &["admins"], ADMIN_PW).await;
    let gw = env.start().await;
    let mut admin = gw.client(APP);
    let admin_2fa = enrol(&gw, &mut admin, ADMIN, ADMIN_PW).await;
    World { up, env, gw, admin, admin_2fa }
}

fn users_url(query: &str) -> String {
    if query.is_empty() { format!("{PREFIX}/admin/users") } else { format!("{PREFIX}/admin/users?{query}") }
}

/// Whether a session cookie still gets through to the app.
async fn app_status(gw: &Gateway, session: &str) -> Resp {
    let mut c = gw.client(APP).with_session(session);
    c.get("/whoami").await
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_list_shows_both_two_factor_states_and_filters() {
    let mut w = world().await;
    w.env.add_user("bob", "bob@example.com", "Bob Builder", &["staff"], PW).await;
    w.env.add_user("carol", "carol@example.com", "Carol Danvers", &["staff"], PW).await;
    let mut bob = w.gw.client(APP);
    enrol(&w.gw, &mut bob, "bob", PW).await;

    let all = admin_get(&mut w.admin, &users_url("")).await;
    let listed: BTreeSet<String> = names(&all.text()).into_iter().collect();
    let want: BTreeSet<String> = ["admin", "bob", "carol"].iter().map(|s| s.to_string()).collect();
    assert_eq!(listed, want, "unfiltered list: {}", all.text());
    for (name, row) in rows(&all.text()) {
        let expect = if name == "carol" { "disabled" } else { "enabled" };
        assert_eq!(row_state(&row), expect, "2FA state of {name} in the list; row: {row}");
        if name == "bob" {
            // Last login: time, address and how.
            assert!(row.contains("127.0.0.1"), "bob's row lacks the last-login address: {row}");
            assert!(row.contains("with 2FA"), "bob's row does not say the login was with 2FA: {row}");
        }
        if name == "carol" {
            assert!(row.contains("never"), "carol never logged in fully; row: {row}");
        }
    }

    let enabled = admin_get(&mut w.admin, &users_url("two_factor=enabled")).await;
    let en: BTreeSet<String> = names(&enabled.text()).into_iter().collect();
    assert_eq!(
        en,
        ["admin", "bob"].iter().map(|s| s.to_string()).collect::<BTreeSet<_>>(),
        "?two_factor=enabled: {}",
        enabled.text()
    );
    for (name, row) in rows(&enabled.text()) {
        assert_eq!(row_state(&row), "enabled", "{name} in the enabled list");
    }

    let disabled = admin_get(&mut w.admin, &users_url("two_factor=disabled")).await;
    assert_eq!(names(&disabled.text()), vec!["carol".to_string()], "?two_factor=disabled: {}", disabled.text());
    assert_eq!(row_state(&rows(&disabled.text())[0].1), "disabled");

    // Carol enrols: she moves from one list to the other.
    let mut carol = w.gw.client(APP);
    enrol(&w.gw, &mut carol, "carol", PW).await;
    let disabled = admin_get(&mut w.admin, &users_url("two_factor=disabled")).await;
    assert!(names(&disabled.text()).is_empty(), "after carol enrolled, ?two_factor=disabled: {}", disabled.text());
    let enabled = admin_get(&mut w.admin, &users_url("two_factor=enabled")).await;
    assert!(names(&enabled.text()).contains(&"carol".to_string()), "{}", enabled.text());
    drop(w.up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_search_by_name_and_email_and_pagination() {
    let mut w = world().await;
    w.env.add_user("dave", "darth.vader@example.com", "Dave Prowse", &[], PW).await;
    w.env.add_user("carol", "carol@example.com", "Carol Danvers", &[], PW).await;

    // 120 more users through the CLI, a dozen at a time.
    let bulk: Vec<String> = (0..120).map(|i| format!("u{i:03}")).collect();
    for chunk in bulk.chunks(12) {
        let adds = chunk.iter().map(|n| {
            let email = format!("{n}@bulk.test");
            let env = &w.env;
            async move { env.add_user(n, &email, &format!("Bulk {n}"), &[], PW).await }
        });
        futures_util::future::join_all(adds).await;
    }

    // Search: email, display name (any case), username.
    let r = admin_get(&mut w.admin, &users_url("q=Vader")).await;
    assert_eq!(names(&r.text()), vec!["dave".to_string()], "search by email part 'Vader': {}", r.text());
    let r = admin_get(&mut w.admin, &users_url("q=danvers")).await;
    assert_eq!(names(&r.text()), vec!["carol".to_string()], "search by name 'danvers': {}", r.text());
    let r = admin_get(&mut w.admin, &users_url("q=CAROL")).await;
    assert_eq!(names(&r.text()), vec!["carol".to_string()], "search 'CAROL': {}", r.text());
    let r = admin_get(&mut w.admin, &users_url("q=u11")).await;
    let want: Vec<String> = (110..120).map(|i| format!("u{i}")).collect();
    assert_eq!(names(&r.text()), want, "search 'u11': {}", r.text());
    assert!(next_link(&r.text()).is_none(), "a 10-row result has a next page link");
    let r = admin_get(&mut w.admin, &users_url("q=nobody-matches-this")).await;
    assert!(names(&r.text()).is_empty(), "{}", r.text());

    // Pagination over everyone: 123 users, 50 per page, Next links, no overlap, nothing missing.
    let mut everyone: BTreeSet<String> = bulk.iter().cloned().collect();
    everyone.extend(["admin", "carol", "dave"].iter().map(|s| s.to_string()));
    let mut seen: Vec<String> = Vec::new();
    let mut url = users_url("");
    let mut pages = 0;
    loop {
        pages += 1;
        assert!(pages <= 5, "pagination does not end");
        let r = admin_get(&mut w.admin, &url).await;
        let page = names(&r.text());
        assert!(page.len() <= 50, "page {pages} has {} rows", page.len());
        seen.extend(page.iter().cloned());
        match next_link(&r.text()) {
            Some(next) => {
                assert_eq!(page.len(), 50, "page {pages} has a Next link but only {} rows", page.len());
                assert!(next.starts_with(&format!("{PREFIX}/admin/users")), "Next link {next}");
                url = next;
            }
            None => break,
        }
    }
    assert_eq!(pages, 3, "123 users at 50 per page");
    let unique: BTreeSet<String> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "pages overlap: {seen:?}");
    assert_eq!(unique, everyone, "pages do not cover every user exactly");

    // The Next link keeps the search: paging through "bulk.test" shows only bulk users.
    let mut url = users_url("q=bulk.test");
    let mut seen = Vec::new();
    for _ in 0..5 {
        let r = admin_get(&mut w.admin, &url).await;
        seen.extend(names(&r.text()));
        match next_link(&r.text()) {
            Some(n) => url = n,
            None => break,
        }
    }
    assert_eq!(seen, bulk, "paged search for bulk.test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_admins_get_403_on_every_admin_route() {
    let mut w = world().await;
    w.env.add_user("alice", "alice@example.com", "Alice Liddell", &["staff"], PW).await;
    let mut alice = w.gw.client(APP);
    enrol(&w.gw, &mut alice, "alice", PW).await;
    let alice_session = alice.session_cookie().unwrap();
    // Alice's own csrf token (bound to her session), from her logout page.
    let p = alice.browse(&format!("{PREFIX}/logout")).await;
    let alice_csrf = csrf_of(&p);

    // The admin with only the password step done (Pending): a second browser.
    let mut pending = w.gw.client(APP);
    let r = pending.login(ADMIN, ADMIN_PW, "/").await;
    assert_eq!(r.status, 303);
    assert!(r.location().starts_with(&format!("{PREFIX}/challenge")), "{}", r.location());
    let p = pending.browse(&r.location()).await;
    let pending_csrf = csrf_of(&p);

    // Control: the real admin gets in.
    admin_get(&mut w.admin, &users_url("")).await;
    admin_get(&mut w.admin, &format!("{PREFIX}/admin/users/alice")).await;

    let spoof: &[(&str, &str)] = &[
        ("remote-user", "admin"),
        ("remote-groups", "admins"),
        ("remote-email", "root@ops.test"),
        ("x-forwarded-user", "admin"),
        ("x-forwarded-groups", "admins"),
        ("x-auth-request-user", "admin"),
        ("x-auth-request-groups", "admins"),
    ];
    struct Who<'a> {
        what: &'a str,
        client: Client,
        headers: Vec<(&'a str, &'a str)>,
        csrf: String,
    }
    let nobody = w.gw.client(APP);
    let whos = vec![
        Who { what: "no cookie", client: nobody.clone(), headers: vec![], csrf: String::new() },
        Who {
            what: "no cookie + spoofed identity headers",
            client: nobody.clone(),
            headers: spoof.to_vec(),
            csrf: String::new(),
        },
        Who { what: "non-admin Full session", client: alice.clone(), headers: vec![], csrf: alice_csrf.clone() },
        Who {
            what: "non-admin Full session + spoofed identity headers",
            client: alice.clone(),
            headers: spoof.to_vec(),
            csrf: alice_csrf.clone(),
        },
        Who { what: "admin Pending session", client: pending.clone(), headers: vec![], csrf: pending_csrf.clone() },
        Who {
            what: "admin Pending session + spoofed headers",
            client: pending.clone(),
            headers: spoof.to_vec(),
            csrf: pending_csrf,
        },
    ];
    let gets = [
        users_url(""),
        users_url("two_factor=enabled"),
        users_url("q=alice"),
        users_url("after=a"),
        format!("{PREFIX}/admin/users/alice"),
        format!("{PREFIX}/admin/users/admin"),
        format!("{PREFIX}/admin/users/no-such-user"),
        format!("{PREFIX}/admin/users/alice/lock"),
        format!("{PREFIX}/admin"),
        format!("{PREFIX}/admin/"),
    ];
    let actions = ["lock", "unlock", "reset-2fa", "end-sessions", "delete"];
    for who in whos {
        let mut c = who.client.clone();
        for path in &gets {
            let mut h = who.headers.clone();
            h.push(("accept", "text/html"));
            let r = c.send("GET", path, &h, None).await;
            assert_eq!(r.status, 403, "{}: GET {path} -> {}: {}", who.what, r.status, r.text());
            assert!(!r.text().contains("alice@example.com"), "{}: GET {path} leaked user data", who.what);
        }
        for target in ["alice", "admin"] {
            for action in actions {
                let path = format!("{PREFIX}/admin/users/{target}/{action}");
                let body = serde_urlencoded::to_string([("csrf", who.csrf.as_str())]).unwrap();
                let mut h = who.headers.clone();
                h.push(("accept", "text/html"));
                let r = c.send("POST", &path, &h, Some(("application/x-www-form-urlencoded", body.into_bytes()))).await;
                assert_eq!(r.status, 403, "{}: POST {path} -> {}: {}", who.what, r.status, r.text());
            }
        }
        for method in ["PUT", "DELETE", "PATCH"] {
            let path = format!("{PREFIX}/admin/users/alice");
            let r = c.send(method, &path, &who.headers, None).await;
            assert_eq!(r.status, 403, "{}: {method} {path} -> {}", who.what, r.status);
        }
    }

    // Nothing happened to anyone.
    let a = show_user(&w.env, "alice").await;
    assert_eq!(a["locked"], false, "alice was locked by a refused request: {a}");
    assert_eq!(a["two_factor"]["enabled"], true, "alice's 2FA was reset by a refused request: {a}");
    let kinds: Vec<&str> = a["recent_events"].as_array().unwrap().iter().filter_map(|e| e["kind"].as_str()).collect();
    for k in ["account_locked", "account_unlocked", "sessions_ended", "two_factor_disabled", "account_deleted"] {
        assert!(!kinds.contains(&k), "a refused request was audited as {k}: {kinds:?}");
    }
    let r = app_status(&w.gw, &alice_session).await;
    assert_eq!(r.status, 200, "alice's session was ended by a refused request: {}", r.text());
    let ad = show_user(&w.env, ADMIN).await;
    assert_eq!(ad["locked"], false);
    assert_eq!(ad["two_factor"]["enabled"], true);
    admin_get(&mut w.admin, &users_url("")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_actions_take_effect_on_live_sessions() {
    let mut w = world().await;
    w.env.add_user("alice", "alice@example.com", "Alice Liddell", &["staff"], PW).await;
    let mut alice = w.gw.client(APP);
    let a2fa = enrol(&w.gw, &mut alice, "alice", PW).await;
    // A second live session of alice's (another device).
    let mut alice2 = w.gw.client(APP);
    login_full(&w.gw, &mut alice2, "alice", PW, &a2fa.secret).await;
    let s1 = alice.session_cookie().unwrap();
    let s2 = alice2.session_cookie().unwrap();
    for s in [&s1, &s2] {
        let r = app_status(&w.gw, s).await;
        assert_eq!(r.status, 200, "alice's session before any action: {}", r.text());
        assert_eq!(r.upstream_header("remote-user"), Some(vec!["alice".to_string()]));
    }

    // lock: both live sessions stop at their next request.
    admin_act(&mut w.admin, "alice", "lock").await;
    for s in [&s1, &s2] {
        let r = app_status(&w.gw, s).await;
        assert!(is_no_session(&r), "locked user's session still works: {} {}", r.status, r.text());
    }
    assert_eq!(show_user(&w.env, "alice").await["locked"], true);
    let page = admin_get(&mut w.admin, &format!("{PREFIX}/admin/users/alice")).await;
    assert!(page.text().contains("/unlock"), "detail page of a locked user offers no unlock: {}", page.text());
    assert!(page.text().contains("(authenticator app)"), "the enrolled factors are not named: {}", page.text());

    // unlock: alice can sign in again.
    admin_act(&mut w.admin, "alice", "unlock").await;
    assert_eq!(show_user(&w.env, "alice").await["locked"], false);
    let mut alice = w.gw.client(APP);
    login_full(&w.gw, &mut alice, "alice", PW, &a2fa.secret).await;
    let s3 = alice.session_cookie().unwrap();
    assert_eq!(app_status(&w.gw, &s3).await.status, 200, "session after unlock");

    // end-sessions: the live session is refused at once.
    admin_act(&mut w.admin, "alice", "end-sessions").await;
    let r = app_status(&w.gw, &s3).await;
    assert!(is_no_session(&r), "session survived end-sessions: {} {}", r.status, r.text());
    assert_eq!(show_user(&w.env, "alice").await["locked"], false, "end-sessions must not lock");

    // reset-2fa: session ends, 2FA gone, next login goes to enrolment again.
    let mut alice = w.gw.client(APP);
    login_full(&w.gw, &mut alice, "alice", PW, &a2fa.secret).await;
    let s4 = alice.session_cookie().unwrap();
    assert_eq!(app_status(&w.gw, &s4).await.status, 200);
    admin_act(&mut w.admin, "alice", "reset-2fa").await;
    let r = app_status(&w.gw, &s4).await;
    assert!(is_no_session(&r), "session survived reset-2fa: {} {}", r.status, r.text());
    let shown = show_user(&w.env, "alice").await;
    assert_eq!(shown["two_factor"]["enabled"], false, "2FA still on after reset-2fa: {shown}");
    let r = alice.login("alice", PW, "/").await;
    assert_eq!(r.status, 303);
    assert!(r.location().starts_with(&format!("{PREFIX}/enroll")), "login after reset-2fa went to {}", r.location());

    // Audited: the detail page lists the four admin actions, by the admin.
    let page = admin_get(&mut w.admin, &format!("{PREFIX}/admin/users/alice")).await;
    let html = unescape(&page.text());
    assert!(html.contains("Recent security events"), "{html}");
    // Each action has its own event kind, with the admin as the actor.
    const KINDS: [&str; 4] = ["account_locked", "account_unlocked", "sessions_ended", "two_factor_disabled"];
    let rows: Vec<String> = html.split("<tr").map(strip_tags).collect();
    for kind in KINDS {
        assert!(
            rows.iter().any(|r| r.split_whitespace().any(|w| w == kind) && r.contains(ADMIN)),
            "no {kind} row by {ADMIN}: {rows:?}"
        );
    }
    // ... and so does `user show --json`.
    let events = shown["recent_events"].as_array().unwrap().clone();
    for kind in KINDS {
        assert!(
            events.iter().any(|e| e["kind"] == kind && e["actor"] == ADMIN && e["user"] == "alice"),
            "user show has no {kind} by {ADMIN}: {events:?}"
        );
    }
    // The admin's own session is untouched by all this.
    admin_get(&mut w.admin, &users_url("")).await;
    drop(w.up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_pages_never_show_hashes_or_secrets() {
    let mut w = world().await;
    w.env.add_user("alice", "alice@example.com", "Alice Liddell", &["staff"], PW).await;
    let mut alice = w.gw.client(APP);
    let a2fa = enrol(&w.gw, &mut alice, "alice", PW).await;
    w.env.add_user("bob", "bob@example.com", "Bob Builder", &["staff"], PW).await;
    let alice_cookie = alice.session_cookie().unwrap();
    let admin_cookie = w.admin.session_cookie().unwrap();

    let mut forbidden: Vec<(String, String)> = vec![
        ("$argon2".into(), "a password hash".into()),
        (PW.into(), "alice's password".into()),
        (ADMIN_PW.into(), "the admin's password".into()),
        (alice_cookie.clone(), "alice's session cookie".into()),
        (admin_cookie.clone(), "the admin's session cookie".into()),
    ];
    for secret in [&a2fa.secret, &w.admin_2fa.secret] {
        forbidden.push((secret.clone(), "a TOTP secret".into()));
        forbidden.push((secret.to_lowercase(), "a TOTP secret (lower case)".into()));
        forbidden.push((secret[..16].to_string(), "part of a TOTP secret".into()));
        let spaced: Vec<String> =
            secret.as_bytes().chunks(4).map(|c| String::from_utf8_lossy(c).into_owned()).collect();
        forbidden.push((spaced[..4].join(" "), "a TOTP secret (grouped)".into()));
    }
    for code in a2fa.codes.iter().chain(w.admin_2fa.codes.iter()) {
        forbidden.push((code.clone(), "a recovery code".into()));
        forbidden.push((code.replace('-', ""), "a recovery code without dashes".into()));
        forbidden.push((code.to_uppercase(), "a recovery code (upper case)".into()));
    }

    let pages = [
        users_url(""),
        users_url("two_factor=enabled"),
        users_url("two_factor=disabled"),
        users_url("q=alice"),
        format!("{PREFIX}/admin/users/alice"),
        format!("{PREFIX}/admin/users/admin"),
        format!("{PREFIX}/admin/users/bob"),
    ];
    for path in &pages {
        let r = admin_get(&mut w.admin, path).await;
        let raw = r.text();
        let plain = unescape(&raw);
        for (needle, what) in &forbidden {
            assert!(
                !raw.contains(needle.as_str()) && !plain.contains(needle.as_str()),
                "admin page {path} shows {what} ({needle})"
            );
        }
        for (k, v) in r.headers.iter() {
            let v = String::from_utf8_lossy(v.as_bytes());
            for (needle, what) in &forbidden {
                if k == "set-cookie" && needle == &admin_cookie {
                    continue;
                }
                assert!(!v.contains(needle.as_str()), "admin page {path} header {k} shows {what}");
            }
        }
    }
    // The detail page does show the facts the admin needs.
    let r = admin_get(&mut w.admin, &format!("{PREFIX}/admin/users/alice")).await;
    let t = unescape(&r.text());
    assert!(t.contains("alice@example.com") && t.contains("Alice Liddell"), "{t}");
    assert!(t.contains(&format!("{} recovery codes left", a2fa.codes.len())), "codes-left count missing: {t}");
}
