//! Unit tests of the embedded backend's primitives.

use super::*;
use crate::store::Level;

fn user(name: &str) -> User {
    User {
        username: name.into(),
        email: format!("{name}@example.com"),
        display_name: name.into(),
        groups: vec![],
        password_hash: "x".into(),
        locked: false,
        created: 0,
        last_login: None,
        two_factor: None,
        stamp: 0,
    }
}

fn session(name: &str) -> SessionRecord {
    SessionRecord {
        username: name.into(),
        level: Level::Full,
        created: 100,
        last_seen: 100,
        address: "127.0.0.1".into(),
    }
}

#[test]
fn usernames_and_emails_are_unique_across_both() {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open(&dir.path().join("db")).unwrap();
    s.create_user(&user("alice")).unwrap();
    assert!(s.create_user(&user("alice")).is_err());
    let mut u = user("bob");
    u.email = "alice@example.com".into();
    assert!(s.create_user(&u).is_err());
    let mut u = user("alice@example.com");
    u.email = "x@example.com".into();
    assert!(s.create_user(&u).is_err());
    assert_eq!(s.find_login("alice@example.com").unwrap().unwrap().username, "alice");
}

#[test]
fn failure_counters_keep_what_the_rule_returns_and_report_lockouts() {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open(&dir.path().join("db")).unwrap();
    let seen = std::cell::Cell::new(None);
    let f = Failures { count: 2, window_start: 1000, locked_until: 1102 };
    assert_eq!(
        s.update_failures("k", |old| {
            seen.set(Some(old));
            f
        })
        .unwrap(),
        f
    );
    assert_eq!(seen.get(), Some(None), "a new key starts from nothing");
    s.update_failures("k", |old| {
        seen.set(Some(old));
        f
    })
    .unwrap();
    assert_eq!(seen.get(), Some(Some(f)), "the rule sees the stored counter");
    assert_eq!(s.locked_until(&["k".into(), "j".into()], 1050).unwrap(), Some(1102));
    assert_eq!(s.locked_until(&["k".into()], 1102).unwrap(), None);
    s.clear_failures("k").unwrap();
    assert_eq!(s.locked_until(&["k".into()], 1050).unwrap(), None);
}

#[test]
fn revoking_and_deleting_end_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open(&dir.path().join("db")).unwrap();
    s.create_user(&user("alice")).unwrap();
    s.insert_session(&[1; 32], &session("alice"), None).unwrap();
    s.insert_session(&[2; 32], &session("alice"), Some(&[1; 32])).unwrap();
    assert!(s.session_with_user(&[1; 32]).unwrap().is_none());
    assert!(s.session_with_user(&[2; 32]).unwrap().is_some());
    assert_eq!(s.revoke_sessions("alice").unwrap(), 1);
    assert!(s.session_with_user(&[2; 32]).unwrap().is_none());
    s.insert_session(&[3; 32], &session("alice"), None).unwrap();
    assert!(s.delete_user("alice").unwrap());
    assert!(s.session_with_user(&[3; 32]).unwrap().is_none());
}

#[test]
fn schema_version_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open(&dir.path().join("db")).unwrap();
    assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
}
