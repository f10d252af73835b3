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
        factors: Default::default(),
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

/// A user as builds before the factor list stored it: layout 1, one TOTP field.
const ALICE_LAYOUT_1: &str = r#"{"username":"alice","email":"alice@example.com","display_name":"Alice","groups":[],"password_hash":"x","locked":false,"created":1,"last_login":null,"two_factor":{"enabled_at":2,"secret":[7,7],"last_step":3,"recovery":[{"hash":"h","sealed":[1]}]},"stamp":5}"#;

/// Turns a fresh file into one a schema-1 build wrote: version 1 in meta, alice in layout 1.
fn as_schema_1(s: &RedbStore) {
    s.write(|tx| {
        tx.open_table(META)?.insert("schema_version", 1)?;
        let mut bytes = vec![1u8];
        bytes.extend_from_slice(ALICE_LAYOUT_1.as_bytes());
        tx.open_table(USERS)?.insert("alice", bytes.as_slice())?;
        tx.open_table(EMAILS)?.insert("alice@example.com", "alice")?;
        Ok(())
    })
    .unwrap();
}

fn raw_user(s: &RedbStore, name: &str) -> Vec<u8> {
    let tx = s.db().unwrap().begin_read().unwrap();
    tx.open_table(USERS).unwrap().get(name).unwrap().unwrap().value().to_vec()
}

#[test]
fn opening_a_schema_1_file_rewrites_its_users_with_the_factor_list() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let s = RedbStore::open(&path).unwrap();
    as_schema_1(&s);
    assert_eq!((s.schema_version().unwrap(), raw_user(&s, "alice")[0]), (1, 1));
    drop(s);

    let s = RedbStore::open(&path).unwrap();
    assert_eq!(s.schema_version().unwrap(), 2);
    let raw = raw_user(&s, "alice");
    assert_eq!(raw[0], 2, "alice was not rewritten: {}", String::from_utf8_lossy(&raw));
    let u = s.user("alice").unwrap().unwrap();
    let totp = u.factors.totp().expect("the TOTP factor carried over");
    assert_eq!((totp.enabled_at, totp.secret.as_slice(), totp.last_step), (2, &[7u8, 7][..], 3));
    assert_eq!((u.factors.recovery.len(), u.stamp), (1, 5));
}

#[test]
fn a_file_from_a_newer_build_is_refused_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let s = RedbStore::open(&path).unwrap();
    s.write(|tx| Ok(tx.open_table(META)?.insert("schema_version", SCHEMA_VERSION + 1).map(|_| ())?)).unwrap();
    drop(s);
    assert!(matches!(RedbStore::open(&path), Err(StoreError::TooNew { .. })));
}

#[test]
fn an_unreadable_user_is_left_as_it_is_and_the_rest_are_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let s = RedbStore::open(&path).unwrap();
    as_schema_1(&s);
    s.write(|tx| {
        tx.open_table(USERS)?.insert("broken", [1u8, b'{', b'x'].as_slice())?;
        Ok(())
    })
    .unwrap();
    drop(s);
    let s = RedbStore::open(&path).expect("one unreadable user stopped the start");
    assert_eq!(s.schema_version().unwrap(), 2);
    assert_eq!(raw_user(&s, "alice")[0], 2, "the readable user was not migrated");
    assert_eq!(raw_user(&s, "broken"), vec![1u8, b'{', b'x'], "the unreadable user was changed");
    assert!(s.user("broken").is_err(), "the unreadable user still fails alone, as before");
}
