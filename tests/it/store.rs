//! The store's rules hold alike on both backends (run with `PORTCULLIS_TEST_BACKEND=postgres` for PostgreSQL):
//! driven through the library's `Store`, on the environment's real redb file or PostgreSQL database.

use portcullis::store::{Store, TokenKind, TokenRecord, TokenUse};

use crate::support::*;

async fn open(env: &Env) -> Store {
    let config = portcullis::config::Config::load(&env.config_path).expect("config");
    Store::from_config(&config.storage).await.expect("open the store")
}

fn token(kind: TokenKind, username: &str, expires: u64, stamp: u64) -> TokenRecord {
    TokenRecord {
        kind,
        username: username.into(),
        email: "new@example.com".into(),
        groups: vec![],
        created: 1,
        expires,
        stamp,
        issued_by: "admin".into(),
    }
}

/// A token the reset can't use — another kind, expired, or issued before the account's last change — is refused
/// and left as it was (the check is decided before anything is spent): an invitation sent to the reset form still
/// works as an invitation afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_refused_by_a_reset_is_not_spent() {
    let env = Env::password_only(&app("app.test", "http://127.0.0.1:9", "one_factor"));
    env.add_user("alice", "alice@example.com", "Alice", &[], PW).await;
    let store = open(&env).await;
    let now = now_unix();
    let stamp = store.user("alice").await.unwrap().expect("alice").stamp;
    let cases = [
        ("an invitation", token(TokenKind::Invitation, "", now + 600, 0)),
        ("an expired reset token", token(TokenKind::PasswordReset, "alice", now - 1, stamp)),
        ("a reset token of an older stamp", token(TokenKind::PasswordReset, "alice", now + 600, stamp + 7)),
    ];
    for (i, (what, rec)) in cases.iter().enumerate() {
        let hash = format!("refused-{i}");
        store.put_token(hash.clone(), rec.clone()).await.unwrap();
        let used = store.reset_password(hash.clone(), "x".into(), now).await.unwrap();
        assert_eq!(used, TokenUse::Invalid, "{what}");
        assert_eq!(store.token(hash).await.unwrap().as_ref(), Some(rec), "{what} was spent by a refused reset");
    }
    // The invitation still opens an account; a good reset token works once.
    let invited = portcullis::store::User {
        username: "newbie".into(),
        email: String::new(),
        display_name: "New".into(),
        groups: vec![],
        password_hash: "hash".into(),
        locked: false,
        created: now,
        last_login: None,
        factors: Default::default(),
        stamp: 0,
    };
    assert_eq!(
        store.accept_invitation("refused-0".into(), invited, now).await.unwrap(),
        TokenUse::Done("newbie".into())
    );
    store.put_token("good".into(), token(TokenKind::PasswordReset, "alice", now + 600, stamp)).await.unwrap();
    assert_eq!(store.reset_password("good".into(), "x".into(), now).await.unwrap(), TokenUse::Done("alice".into()));
    assert_eq!(store.token("good".into()).await.unwrap(), None, "a used reset token is gone");
    assert_eq!(store.reset_password("good".into(), "y".into(), now).await.unwrap(), TokenUse::Invalid);
}

/// Failures counted concurrently on one counter while successes clear it: no attempt errors (a refused store
/// call would be a 503 at the login form), and with no clear in between every failure is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_failures_and_clears_on_one_counter_never_fail_or_lose_a_count() {
    use portcullis::credentials::lockout::FailureRule;
    let env = Env::password_only(&app("app.test", "http://127.0.0.1:9", "one_factor"));
    let store = open(&env).await;
    let rule = FailureRule { max: 1000, window: 3600, lockout: 60 };
    let now = now_unix();
    // Phase 1: 40 concurrent failures on a fresh key, nothing clears: all 40 counted.
    let tasks: Vec<_> = (0..40)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { rule.count(&store, "race:count".into(), now).await })
        })
        .collect();
    let mut counts = Vec::new();
    for t in tasks {
        counts.push(t.await.unwrap().expect("a counted failure failed").count);
    }
    counts.sort();
    assert_eq!(counts, (1..=40).collect::<Vec<u32>>(), "failures lost or counted twice under concurrency");
    // Phase 2: failures and clears interleaved on one key: every call succeeds.
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                if i % 3 == 0 {
                    store.clear_failures("race:clear".into()).await.map(|_| 0)
                } else {
                    rule.count(&store, "race:clear".into(), now).await.map(|f| f.count)
                }
            })
        })
        .collect();
    let mut errors = Vec::new();
    for t in tasks {
        if let Err(e) = t.await.unwrap() {
            errors.push(e.to_string());
        }
    }
    assert!(errors.is_empty(), "store calls failed while a counter was cleared concurrently: {errors:?}");
}
