//! The CLI: user management (also against a live gateway) and check-config.

use std::path::Path;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_lock_unlock_delete_affect_live_sessions() {
    let up = start_upstream().await;
    let env = Env::password_only(&app("app.test", &up.url(), "one_factor"));
    let gw = env.start().await;
    // users created while the gateway has the database open
    env.add_user("alice", "alice@example.com", "Alice", &[], PW).await;
    let mut c = gw.client("app.test");
    c.login_ok("alice", PW).await;
    assert_eq!(c.get("/one").await.status, 200);

    let o = env.cli(&["user", "lock", "alice"], None).await;
    assert!(o.status.success(), "user lock: {}", out_text(&o));
    let r = c.get("/after-lock").await;
    assert_eq!(r.status, 401, "session of a locked user must stop working");
    let mut again = gw.client("app.test");
    let r = again.login("alice", PW, "/").await;
    assert_ne!(r.status, 303, "a locked user could log in");
    assert!(r.status < 500);
    assert!(up.hits().iter().all(|h| h.path != "/after-lock"));

    let o = env.cli(&["user", "unlock", "alice"], None).await;
    assert!(o.status.success(), "user unlock: {}", out_text(&o));
    let mut c = gw.client("app.test");
    c.login_ok("alice", PW).await;
    assert_eq!(c.get("/after-unlock").await.status, 200);

    let o = env.cli(&["user", "delete", "alice"], None).await;
    assert!(o.status.success(), "user delete: {}", out_text(&o));
    assert_eq!(c.get("/after-delete").await.status, 401, "session of a deleted user must stop working");
    let r = gw.client("app.test").login("alice", PW, "/").await;
    assert_eq!(r.status, 401, "deleted user login");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_passwd_changes_password() {
    let up = start_upstream().await;
    let env = Env::password_only(&app("app.test", &up.url(), "one_factor"));
    env.add_user("alice", "alice@example.com", "Alice", &[], PW).await;
    let o = env.cli(&["user", "passwd", "alice", "--password-stdin"], Some("N3w-password-42")).await;
    assert!(o.status.success(), "user passwd: {}", out_text(&o));
    let gw = env.start().await;
    assert_eq!(gw.client("app.test").login("alice", PW, "/").await.status, 401, "old password");
    assert_eq!(gw.client("app.test").login("alice", "N3w-password-42", "/").await.status, 303, "new password");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_user_add_duplicate_and_json_output() {
    let env = Env::password_only(&app("app.test", "http://127.0.0.1:9", "one_factor"));
    env.add_user("dave", "dave@example.com", "Dave Davies", &["a", "b"], PW).await;
    let o = env.cli(&["user", "add", "DAVE", "--email", "dave2@example.com", "--password-stdin"], Some(PW)).await;
    assert!(!o.status.success(), "user add with the same name in another case must fail: {}", out_text(&o));
    let o = env.cli(&["user", "add", "dave", "--email", "dave3@example.com", "--password-stdin"], Some(PW)).await;
    assert!(!o.status.success(), "user add with the same name must fail: {}", out_text(&o));
    env.add_user("erin", "erin@example.com", "Erin", &[], PW).await;

    let o = env.cli(&["user", "list", "--json"], None).await;
    assert!(o.status.success(), "{}", out_text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("user list --json is not JSON ({e}): {}", out_text(&o)));
    let list = match &v {
        serde_json::Value::Array(a) => a.clone(),
        serde_json::Value::Object(m) if m.get("users").is_some_and(|u| u.is_array()) => {
            m["users"].as_array().unwrap().clone()
        }
        _ => panic!("user list --json: expected an array of users, got {v}"),
    };
    assert_eq!(list.len(), 2, "{v}");
    for u in &list {
        for f in ["username", "email", "name", "groups", "locked"] {
            assert!(u.get(f).is_some(), "user list entry lacks {f}: {u}");
        }
    }
    let dave = list.iter().find(|u| u["username"] == "dave").expect("dave in list");
    assert_eq!(dave["email"], "dave@example.com");
    assert_eq!(dave["name"], "Dave Davies");
    assert_eq!(dave["groups"], serde_json::json!(["a", "b"]));
    assert_eq!(dave["locked"], false);

    let o = env.cli(&["user", "lock", "dave"], None).await;
    assert!(o.status.success(), "{}", out_text(&o));
    let o = env.cli(&["user", "show", "dave", "--json"], None).await;
    assert!(o.status.success(), "{}", out_text(&o));
    let u: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("user show --json is not JSON ({e}): {}", out_text(&o)));
    assert_eq!(u["username"], "dave");
    assert_eq!(u["email"], "dave@example.com");
    assert_eq!(u["name"], "Dave Davies");
    assert_eq!(u["groups"], serde_json::json!(["a", "b"]));
    assert_eq!(u["locked"], true);

    let o = env.cli(&["user", "show", "nobody", "--json"], None).await;
    assert!(!o.status.success(), "user show of an unknown user must fail: {}", out_text(&o));
    let o = env.cli(&["user", "delete", "erin"], None).await;
    assert!(o.status.success(), "{}", out_text(&o));
    let o = env.cli(&["user", "list", "--json"], None).await;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(!v.to_string().contains("erin@example.com"), "deleted user still listed: {v}");
}

const VALID: &str = r#"[storage]
path = "/tmp/portcullis-it-nonexistent/db.redb"
secret_key_file = "/tmp/portcullis-it-nonexistent/secret.key"

[[app]]
host = "a.test"
upstream = "http://127.0.0.1:9"
policy = "bypass"
"#;

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Asserts `s` contains `{path}:{line}:{column}` with a numeric column.
fn assert_position(s: &str, path: &Path, line: usize) {
    let needle = format!("{}:{line}:", path.display());
    let i = s.find(&needle).unwrap_or_else(|| panic!("expected `{needle}<column>` in: {s}"));
    let rest = &s[i + needle.len()..];
    assert!(rest.starts_with(|c: char| c.is_ascii_digit()), "no column after `{needle}` in: {s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_reports_file_line_column() {
    let dir = tempfile::tempdir().unwrap();
    let valid = write(dir.path(), "valid.toml", VALID);
    let o = run_cli(&["check-config"], &valid, None).await;
    assert!(o.status.success(), "valid config rejected: {}", out_text(&o));

    let unknown = write(dir.path(), "unknown.toml", &format!("{VALID}colour = \"blue\"\n"));
    let o = run_cli(&["check-config"], &unknown, None).await;
    assert!(!o.status.success(), "unknown key accepted: {}", out_text(&o));
    assert_position(&String::from_utf8_lossy(&o.stderr), &unknown, 9);

    let type_err = write(dir.path(), "type.toml", &format!("{VALID}\n[limits]\nmax_failures = \"five\"\n"));
    let o = run_cli(&["check-config"], &type_err, None).await;
    assert!(!o.status.success(), "type error accepted: {}", out_text(&o));
    assert_position(&String::from_utf8_lossy(&o.stderr), &type_err, 11);

    let unknown_section = write(dir.path(), "section.toml", &format!("{VALID}\n[bogus]\nx = 1\n"));
    let o = run_cli(&["check-config"], &unknown_section, None).await;
    assert!(!o.status.success(), "unknown section accepted: {}", out_text(&o));
    assert_position(&String::from_utf8_lossy(&o.stderr), &unknown_section, 10);

    let no_app =
        write(dir.path(), "noapp.toml", "[storage]\npath = \"/tmp/x.redb\"\nsecret_key_file = \"/tmp/x.key\"\n");
    let o = run_cli(&["check-config"], &no_app, None).await;
    assert!(!o.status.success(), "config without [[app]] accepted: {}", out_text(&o));
}

#[test]
fn config_parse_error_display_has_position() {
    let path = Path::new("/fake/dir/portcullis.toml");
    assert!(portcullis::config::Config::parse(VALID, path).is_ok(), "valid config must parse");
    let text = format!("{VALID}colour = \"blue\"\n");
    let Err(e) = portcullis::config::Config::parse(&text, path) else { panic!("unknown key must be an error") };
    assert_position(&e.to_string(), path, 9);
    assert!(e.to_string().starts_with("/fake/dir/portcullis.toml:9:"), "{e}");
    let text = format!("{VALID}\n[session]\nidle_timeout = true\n");
    let Err(e) = portcullis::config::Config::parse(&text, path) else { panic!("type error must be an error") };
    assert!(e.to_string().starts_with("/fake/dir/portcullis.toml:11:"), "{e}");
}
