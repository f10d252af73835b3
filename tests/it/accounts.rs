//! Each account operation, driven through every caller that offers it (the user's own pages, the admin pages, the
//! command line, the reset link), must leave the same trace: one audit event of the operation's kind with the
//! actor recorded, the same notice in the user's mailbox, and the same sessions ended.

use portcullis::clock::Clock;

use crate::support::*;

const APP: &str = "app.test";
const ADMIN: &str = "admin";
const ADMIN_PW: &str = "Adm1n-passw0rd!";
const PUBLIC: &str = "https://app.test";

/// Who drives an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    /// The user, on their own pages.
    Web,
    /// The admin, on the admin pages.
    Admin,
    /// `portcullis user …`.
    Cli,
}

impl Caller {
    /// The actor the audit event must name.
    fn actor(self) -> serde_json::Value {
        match self {
            Caller::Web => serde_json::Value::Null,
            Caller::Admin => ADMIN.into(),
            Caller::Cli => "cli".into(),
        }
    }
}

/// A gateway with outbox mail, invitations and a two_factor app; an enrolled admin signed in.
struct World {
    _up: Upstream,
    env: Env,
    gw: Gateway,
    admin: Client,
    outbox: Outbox,
}

async fn world() -> World {
    let up = start_upstream().await;
    let env = Env::new(&format!(
        "[mail]\ntransport = \"outbox\"\noutbox_dir = \"{{DIR}}/outbox\"\npublic_url = \"{PUBLIC}\"\n\n\
         [accounts]\npassword_reset = true\ninvitations = true\n\n[limits]\nmax_failures = 50\n\
         max_failures_per_address = 500\n\n{}",
        app(APP, &up.url(), "two_factor")
    ));
    env.add_user(ADMIN, "root@ops.test", "Ada Admin", &["admins"], ADMIN_PW).await;
    let gw = env.start().await;
    let mut admin = gw.client(APP);
    enrol(&gw, &mut admin, ADMIN, ADMIN_PW).await;
    let outbox = Outbox::new(&env);
    World { _up: up, env, gw, admin, outbox }
}

/// A fresh enrolled user with two live sessions (two devices); the first is the one the user acts from.
struct Member {
    email: String,
    secret: String,
    codes: Vec<String>,
    here: Client,
    other: String,
}

async fn member(w: &World, name: &str) -> Member {
    let email = format!("{name}@example.com");
    w.env.add_user(name, &email, name, &["staff"], PW).await;
    let mut here = w.gw.client(APP);
    let e = enrol(&w.gw, &mut here, name, PW).await;
    let mut second = w.gw.client(APP);
    login_full(&w.gw, &mut second, name, PW, &e.secret).await;
    let other = second.session_cookie().expect("second session");
    let m = Member { email, secret: e.secret, codes: e.codes, here, other };
    assert!(alive(w, &m.other).await, "{name}'s second session before the operation");
    m
}

/// Whether a session cookie still reaches the app.
async fn alive(w: &World, session: &str) -> bool {
    let r = w.gw.client(APP).with_session(session).get("/whoami").await;
    r.status == 200 && r.upstream_header("remote-user").is_some()
}

/// The newest audit event of `kind` about `user`, which must name `caller` as the actor.
async fn audited(w: &World, user: &str, kind: &str, caller: Caller) -> serde_json::Value {
    let events = audit_of(w, user).await;
    let Some(e) = events.iter().find(|e| e["kind"] == kind).cloned() else {
        panic!("{caller:?}: no {kind} event for {user}: {events:?}");
    };
    assert_eq!(e["actor"], caller.actor(), "{caller:?}: the {kind} event names the wrong actor: {e}");
    assert_eq!(e["user"], user, "{caller:?}: {e}");
    if caller != Caller::Cli {
        assert_eq!(e["address"], "127.0.0.1", "{caller:?}: a request's event has its address: {e}");
    }
    e
}

/// Exactly one `kind` event about `user` (the operation is audited once, not per caller step).
async fn audited_once(w: &World, user: &str, kind: &str, caller: Caller) {
    audited(w, user, kind, caller).await;
    let events = audit_of(w, user).await;
    let n = events.iter().filter(|e| e["kind"] == kind).count();
    assert_eq!(n, 1, "{caller:?}: {kind} recorded {n} times for {user}: {events:?}");
}

async fn cli(w: &World, args: &[&str], stdin: Option<&str>) {
    let o = w.env.cli(args, stdin).await;
    assert!(o.status.success(), "portcullis {args:?}: {}", out_text(&o));
}

/// GET /forgot, POST it for `user`, and the reset link mailed to `email`.
async fn reset_link(w: &mut World, user: &str, email: &str) -> String {
    let mut c = w.gw.client(APP);
    let page = c.browse(&format!("{PREFIX}/forgot")).await;
    let csrf = csrf_of(&page);
    let r = c.post_form(&format!("{PREFIX}/forgot"), &[("csrf", &csrf), ("username", user)]).await;
    assert_eq!(r.status, 200, "forgot: {}", r.text());
    let m = w.outbox.reset_mail(email).await;
    let url = m.body.split_whitespace().find(|t| t.contains("/reset?token=")).expect("a reset link").to_string();
    url.strip_prefix(PUBLIC).expect("link under public_url").to_string()
}

/// Opens a reset link and posts a new password with `factor` fields (code / recovery_code).
async fn post_reset(w: &World, path: &str, new_pw: &str, factor: &[(&str, &str)]) -> Resp {
    let mut c = w.gw.client(APP);
    let page = c.browse(path).await;
    assert_eq!(page.status, 200, "reset page: {}", page.text());
    let token = query_param(path, "token").expect("token");
    let csrf = csrf_of(&page);
    let mut fields =
        vec![("csrf", csrf.as_str()), ("token", token.as_str()), ("password", new_pw), ("password2", new_pw)];
    fields.extend_from_slice(factor);
    c.post_form(&format!("{PREFIX}/reset"), &fields).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_two_factor_leaves_one_trace_from_the_user_the_admin_and_the_cli() {
    let mut w = world().await;
    for caller in [Caller::Web, Caller::Admin, Caller::Cli] {
        let name = format!("rtf{caller:?}").to_lowercase();
        let mut m = member(&w, &name).await;
        match caller {
            Caller::Web => {
                let r = confirm_password(&mut m.here, "/settings/disable", PW).await;
                assert_eq!(r.status, 303, "disable: {}", r.text());
            }
            Caller::Admin => admin_act(&mut w.admin, &name, "reset-2fa").await,
            Caller::Cli => cli(&w, &["user", "reset-2fa", &name], None).await,
        }
        audited_once(&w, &name, "two_factor_disabled", caller).await;
        let mail = w.outbox.notice_to(&m.email, "Two-factor authentication turned off").await;
        assert_eq!(mail.body.contains("made by an administrator"), caller != Caller::Web, "{caller:?}: {}", mail.body);
        assert!(!alive(&w, &m.other).await, "{caller:?}: the other device's session survived");
        assert_eq!(show_user(&w.env, &name).await["two_factor"]["enabled"], false, "{caller:?}");
        if caller == Caller::Web {
            let here = m.here.session_cookie().unwrap();
            assert!(alive(&w, &here).await, "the session the user disabled it from was ended");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_unlock_and_end_sessions_leave_one_trace_from_the_admin_and_the_cli() {
    let mut w = world().await;
    for caller in [Caller::Admin, Caller::Cli] {
        let name = format!("lock{caller:?}").to_lowercase();
        let m = member(&w, &name).await;
        let here = m.here.session_cookie().unwrap();
        for (action, cmd, kind, subject, ends) in [
            ("end-sessions", "end-sessions", "sessions_ended", "You were signed out everywhere", true),
            ("lock", "lock", "account_locked", "Your account was locked", true),
            ("unlock", "unlock", "account_unlocked", "Your account was unlocked", false),
        ] {
            // A fresh session to see whether this operation ends it.
            let mut c = w.gw.client(APP);
            let probe = if action == "unlock" {
                None
            } else {
                w.gw.clock.advance(60);
                login_full(&w.gw, &mut c, &name, PW, &m.secret).await;
                c.session_cookie()
            };
            match caller {
                Caller::Admin => admin_act(&mut w.admin, &name, action).await,
                _ => cli(&w, &["user", cmd, &name], None).await,
            }
            audited_once(&w, &name, kind, caller).await;
            let mail = w.outbox.notice_to(&m.email, subject).await;
            assert!(mail.body.contains("made by an administrator"), "{caller:?} {action}: {}", mail.body);
            if let Some(s) = probe {
                assert_eq!(!alive(&w, &s).await, ends, "{caller:?} {action}: session ended?");
            }
        }
        assert!(!alive(&w, &here).await, "{caller:?}: the first session survived");
        // Unlocked: the user signs in again.
        let mut c = w.gw.client(APP);
        login_full(&w.gw, &mut c, &name, PW, &m.secret).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_password_leaves_one_trace_from_settings_the_cli_and_a_reset_link() {
    let mut w = world().await;
    for (caller, how) in [(Caller::Web, "settings"), (Caller::Cli, "cli"), (Caller::Web, "reset")] {
        let name = format!("pw{how}");
        let mut m = member(&w, &name).await;
        let new_pw = "Br4nd-new-passw0rd";
        let keeps_here = match how {
            "settings" => {
                let page = m.here.browse(&format!("{PREFIX}/settings/password")).await;
                let csrf = csrf_of(&page);
                let fields = [("csrf", csrf.as_str()), ("current", PW), ("password", new_pw), ("password2", new_pw)];
                let r = m.here.post_form(&format!("{PREFIX}/settings/password"), &fields).await;
                assert_eq!(r.status, 200, "settings password: {}", r.text());
                true
            }
            "cli" => {
                cli(&w, &["user", "passwd", &name, "--password-stdin"], Some(new_pw)).await;
                false
            }
            _ => {
                let link = reset_link(&mut w, &name, &m.email).await;
                w.gw.clock.advance(60);
                let code = totp_code(&m.secret, w.gw.clock.now());
                let r = post_reset(&w, &link, new_pw, &[("code", &code)]).await;
                assert_eq!(r.status, 200, "reset: {}", r.text());
                false
            }
        };
        audited_once(&w, &name, "password_changed", caller).await;
        w.outbox.notice_to(&m.email, "Your password was changed").await;
        assert!(!alive(&w, &m.other).await, "{how}: the other device's session survived");
        let here = m.here.session_cookie().unwrap();
        assert_eq!(alive(&w, &here).await, keeps_here, "{how}: the acting session kept?");
        let mut c = w.gw.client(APP);
        login_full(&w.gw, &mut c, &name, new_pw, &m.secret).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invitations_leave_one_trace_from_the_admin_and_the_cli() {
    let mut w = world().await;
    for caller in [Caller::Admin, Caller::Cli] {
        let email = format!("new-{caller:?}@example.com").to_lowercase();
        match caller {
            Caller::Admin => {
                let page = admin_get(&mut w.admin, &format!("{PREFIX}/admin/users")).await;
                let csrf = csrf_of(&page);
                let fields = [("csrf", csrf.as_str()), ("email", email.as_str()), ("groups", "staff, wiki")];
                let r = w.admin.post_form(&format!("{PREFIX}/admin/invite"), &fields).await;
                assert_eq!(r.status, 303, "admin invite: {}", r.text());
            }
            _ => cli(&w, &["user", "invite", &email, "--groups", "staff,wiki"], None).await,
        }
        let m = w.outbox.invite_mail(&email).await;
        assert!(m.body.contains(&format!("{PUBLIC}{PREFIX}/invite?token=")), "{caller:?}: {}", m.body);
        // The invitation event is about the address (there is no account yet).
        let log = audit_of(&w, &email).await;
        let sent: Vec<_> = log.iter().filter(|e| e["kind"] == "invitation_sent").collect();
        assert_eq!(sent.len(), 1, "{caller:?}: {log:?}");
        assert_eq!(sent[0]["actor"], caller.actor(), "{caller:?}: {}", sent[0]);
    }
}

/// The audit events about `subject` (a username, or an address for invitations), newest first.
async fn audit_of(w: &World, subject: &str) -> Vec<serde_json::Value> {
    let o = w.env.cli(&["audit", subject, "--json"], None).await;
    assert!(o.status.success(), "portcullis audit: {}", out_text(&o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("audit --json is not JSON ({e}): {}", out_text(&o)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_code_spent_at_sign_in_or_in_a_reset_leaves_one_trace() {
    let mut w = world().await;
    for how in ["challenge", "reset"] {
        let name = format!("rc{how}");
        let m = member(&w, &name).await;
        let code = m.codes[0].clone();
        match how {
            "challenge" => {
                let mut c = w.gw.client(APP);
                let (_, csrf) = login_to_challenge_page(&mut c, &name, PW, "/").await;
                let r = submit_recovery(&mut c, &csrf, &code, "/").await;
                assert_eq!(r.status, 303, "recovery code at the challenge: {}", r.text());
            }
            _ => {
                let link = reset_link(&mut w, &name, &m.email).await;
                let r = post_reset(&w, &link, "Br4nd-new-passw0rd", &[("recovery_code", &code)]).await;
                assert_eq!(r.status, 200, "reset with a recovery code: {}", r.text());
            }
        }
        let e = audited(&w, &name, "recovery_code_used", Caller::Web).await;
        assert_eq!(e["detail"], "9 left", "{how}: {e}");
        let mail = w.outbox.notice_to(&m.email, "A recovery code was used").await;
        assert!(mail.body.contains("9 recovery codes are left"), "{how}: {}", mail.body);
        assert_eq!(show_user(&w.env, &name).await["two_factor"]["recovery_codes_left"], 9, "{how}");
        // Spent: the same code works nowhere again.
        let mut c = w.gw.client(APP);
        let pw = if how == "reset" { "Br4nd-new-passw0rd" } else { PW };
        let (_, csrf) = login_to_challenge_page(&mut c, &name, pw, "/").await;
        let r = submit_recovery(&mut c, &csrf, &code, "/").await;
        assert_eq!(r.status, 401, "{how}: a spent recovery code worked again: {}", r.text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_account_leaves_one_trace_from_the_admin_and_the_cli() {
    let mut w = world().await;
    for caller in [Caller::Admin, Caller::Cli] {
        let name = format!("del{caller:?}").to_lowercase();
        let m = member(&w, &name).await;
        match caller {
            Caller::Admin => {
                let page = admin_get(&mut w.admin, &format!("{PREFIX}/admin/users/{name}")).await;
                let csrf = csrf_of(&page);
                let r = w.admin.post_form(&format!("{PREFIX}/admin/users/{name}/delete"), &[("csrf", &csrf)]).await;
                assert_eq!(r.status, 303, "admin delete: {}", r.text());
                assert_eq!(r.location(), format!("{PREFIX}/admin/users?deleted={name}"));
            }
            _ => cli(&w, &["user", "delete", &name], None).await,
        }
        // The events outlive the account (they are keyed by its name).
        audited_once(&w, &name, "account_deleted", caller).await;
        w.outbox.notice_to(&m.email, "Your account was deleted").await;
        assert!(!alive(&w, &m.other).await, "{caller:?}: a deleted account's session survived");
        let r = w.gw.client(APP).login(&name, PW, "/").await;
        assert_eq!(r.status, 401, "{caller:?}: a deleted account signed in");
    }
    // An admin can't delete their own account from the admin pages (the CLI can).
    let page = admin_get(&mut w.admin, &format!("{PREFIX}/admin/users/{ADMIN}")).await;
    let csrf = csrf_of(&page);
    let r = w.admin.post_form(&format!("{PREFIX}/admin/users/{ADMIN}/delete"), &[("csrf", &csrf)]).await;
    assert_eq!(r.status, 400, "an admin deleting themselves: {}", r.text());
    admin_get(&mut w.admin, &format!("{PREFIX}/admin/users")).await;
}
