//! Storage: users, sessions and counters, behind a narrow set of atomic domain operations.
//!
//! Each operation is one transaction (a redb write transaction, or one PostgreSQL transaction, mostly a single
//! conditional statement), so callers never read-modify-write records themselves and races can't split a check
//! from its update. [`Store`] dispatches to the backend chosen by `[storage] backend`.

mod postgres;
mod records;
mod redb_store;
pub mod revocations;
mod stored;

use std::sync::Arc;

pub use postgres::PgStore;
pub use records::*;
pub use redb_store::{RedbStore, announce_revocation, wakeup_path};
pub use revocations::{Journal, Revoked};
use stored::Stored;

/// A record as stored bytes (the layout and version byte are [`stored`]'s business).
fn encode<T: Stored>(v: &T) -> Result<Vec<u8>, StoreError> {
    v.encode()
}

/// A record from stored bytes of any known layout version.
fn decode<T: Stored>(bytes: &[u8]) -> Result<T, StoreError> {
    T::decode(bytes)
}

/// A whole store's contents, for moving from the embedded store to PostgreSQL.
#[derive(Debug, Default)]
pub struct Dump {
    /// Users, with their (still encrypted) second factors.
    pub users: Vec<User>,
    /// Sessions by id.
    pub sessions: Vec<([u8; 32], SessionRecord)>,
    /// Emailed tokens by hash.
    pub tokens: Vec<(String, TokenRecord)>,
    /// Audit events.
    pub audit: Vec<crate::audit::AuditEvent>,
}

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database itself failed (I/O, corruption, locking).
    #[error("database error: {0}")]
    Db(String),
    /// A uniqueness rule would be broken.
    #[error("{0}")]
    Conflict(String),
    /// A stored value can't be decoded.
    #[error("stored value is damaged: {0}")]
    Corrupt(String),
    /// The database was written by a newer Portcullis.
    #[error("the database has schema version {found}, newer than this build understands ({supported})")]
    TooNew {
        /// Version in the file.
        found: u64,
        /// Highest version this build knows.
        supported: u64,
    },
    /// The blocking task running the operation died.
    #[error("storage task failed")]
    Task,
}

/// Which database holds the data.
#[derive(Clone)]
enum Backend {
    /// The embedded file.
    Redb(Arc<RedbStore>),
    /// A shared PostgreSQL.
    Postgres(Arc<PgStore>),
}

/// The storage handle shared by the gateway and the CLI.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    /// Bound by `serve`: `portcullis user …` in another process sends a datagram here after each change, so the
    /// next request sees it at once (redb re-reads its revision; PostgreSQL flushes the cache ahead of NOTIFY).
    wakeups: Arc<std::sync::OnceLock<std::os::unix::net::UnixDatagram>>,
}

/// Runs an operation on whichever backend: redb's synchronous calls off the async runtime, PostgreSQL's directly.
macro_rules! dispatch {
    ($self:ident, |$r:ident| $redb:expr, |$p:ident| $pg:expr) => {
        match &$self.backend {
            Backend::Redb(inner) => {
                let inner = inner.clone();
                tokio::task::spawn_blocking(move || {
                    let $r = &*inner;
                    let result = $redb;
                    if let Err(e) = &result {
                        inner.recover(e);
                    }
                    result
                })
                .await
                .map_err(|_| StoreError::Task)?
            }
            Backend::Postgres($p) => $pg,
        }
    };
}

impl Store {
    /// Opens (creating and migrating as needed) the embedded store.
    pub fn open(path: &std::path::Path) -> Result<Store, StoreError> {
        Ok(Store { backend: Backend::Redb(Arc::new(RedbStore::open(path)?)), wakeups: Default::default() })
    }

    /// Connects to PostgreSQL (migrating under an advisory lock as needed).
    pub async fn open_postgres(url: &str, max_connections: usize) -> Result<Store, StoreError> {
        Ok(Store {
            backend: Backend::Postgres(PgStore::open(url, max_connections).await?),
            wakeups: Default::default(),
        })
    }

    /// Opens the backend the config names.
    pub async fn from_config(storage: &crate::config::Storage) -> Result<Store, StoreError> {
        match storage.backend {
            crate::config::StorageBackend::Redb => Store::open(&storage.path),
            crate::config::StorageBackend::Postgres => {
                let url = storage.url.as_deref().unwrap_or_default();
                Store::open_postgres(url, storage.max_connections).await
            }
        }
    }

    /// The revocation revision: it moves whenever a session may have ended or a user was locked, by this
    /// process or another. redb: one small inline read; PostgreSQL: the listener's last value, no round trip.
    pub fn revision(&self) -> Result<u64, StoreError> {
        // A pending wake-up is in the socket buffer before the announcing CLI exits, so a request that follows
        // the CLI always sees it here.
        let mut woken = false;
        if let Some(sock) = self.wakeups.get() {
            let mut buf = [0u8; 8];
            while sock.recv(&mut buf).is_ok() {
                woken = true;
            }
        }
        match &self.backend {
            Backend::Redb(r) => r.revision(woken, self.wakeups.get().is_some()).inspect_err(|e| r.recover(e)),
            Backend::Postgres(p) => Ok(p.revision(woken)),
        }
    }

    /// What the revision steps after `from` up to `to` ended, as this process has read them from the journal;
    /// `None` when any step is unknown (then anything may have ended).
    pub fn revoked_between(&self, from: u64, to: u64) -> Option<Vec<Revoked>> {
        match &self.backend {
            Backend::Redb(r) => r.journal.between(from, to),
            Backend::Postgres(p) => p.journal.between(from, to),
        }
    }

    /// For `serve`: listen for the CLI's wake-ups on a socket next to `[storage] path`.
    pub fn listen_for_wakeups(&self, storage: &crate::config::Storage) {
        let path = wakeup_path(&storage.path);
        // A socket file left by a gateway that died is stale: nobody listens on it.
        let _ = std::fs::remove_file(&path);
        match std::os::unix::net::UnixDatagram::bind(&path).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
            Ok(sock) => {
                // Only the gateway's user (its CLI) may wake it.
                if let Err(e) = crate::files::tighten(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot restrict the wake-up socket");
                }
                let _ = self.wakeups.set(sock);
            }
            Err(e) => tracing::warn!(path = %path.display(), error = %e,
                "no wake-up socket: CLI changes are seen within the revision poll instead of at once"),
        }
    }

    /// After a CLI change: wake a running gateway on the same host and storage.
    pub fn announce(&self, storage: &crate::config::Storage) {
        announce_revocation(&storage.path);
    }

    /// Applies `change` to a user under a lock (one transaction), ending sessions as `revoke` says.
    async fn modify<T: Send + 'static>(
        &self,
        username: &str,
        revoke: Revoke,
        change: impl FnOnce(&mut User) -> T + Send + 'static,
    ) -> Result<Option<T>, StoreError> {
        let u = username.to_string();
        dispatch!(self, |s| s.modify_user(&u, revoke, change), |p| p.modify_user(&u, revoke, change).await)
    }

    /// Everything in an embedded store (for `storage migrate-from-redb`).
    pub async fn dump(&self) -> Result<Dump, StoreError> {
        match &self.backend {
            Backend::Redb(r) => {
                let r = r.clone();
                tokio::task::spawn_blocking(move || r.dump()).await.map_err(|_| StoreError::Task)?
            }
            Backend::Postgres(_) => Err(StoreError::Db("dump is only supported from the embedded store".into())),
        }
    }

    /// Copies a dump into this (PostgreSQL) store, in one transaction.
    pub async fn import(&self, dump: Dump) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Postgres(p) => p.import(dump).await,
            Backend::Redb(_) => Err(StoreError::Db("import is only supported into PostgreSQL".into())),
        }
    }

    /// Adds a user; fails if the username or email is taken.
    pub async fn create_user(&self, user: User) -> Result<(), StoreError> {
        dispatch!(self, |s| s.create_user(&user), |p| p.create_user(&user).await)
    }

    /// A user by normalised username.
    pub async fn user(&self, username: &str) -> Result<Option<User>, StoreError> {
        let u = username.to_string();
        dispatch!(self, |s| s.user(&u), |p| p.user(&u).await)
    }

    /// A user by username or email (normalised).
    pub async fn find_login(&self, login: &str) -> Result<Option<User>, StoreError> {
        let l = normalize_login(login);
        dispatch!(self, |s| s.find_login(&l), |p| p.find_login(&l).await)
    }

    /// All users, by username.
    pub async fn list_users(&self) -> Result<Vec<User>, StoreError> {
        dispatch!(self, |s| s.list_users(), |p| p.list_users().await)
    }

    /// Changes the password hash and ends the user's sessions. False if no such user.
    pub async fn set_password(&self, username: &str, hash: String) -> Result<bool, StoreError> {
        self.change_password(username, hash, Revoke::All).await
    }

    /// Changes the password hash, voids emailed tokens and ends sessions as `revoke` says.
    pub async fn change_password(&self, username: &str, hash: String, revoke: Revoke) -> Result<bool, StoreError> {
        let u = username.to_string();
        let r = self
            .modify(&u, revoke, move |user| {
                user.password_hash = hash;
                user.stamp += 1;
            })
            .await?;
        Ok(r.is_some())
    }

    /// Locks (ending every session) or unlocks a user. False if no such user.
    pub async fn set_locked(&self, username: &str, locked: bool) -> Result<bool, StoreError> {
        let u = username.to_string();
        let revoke = if locked { Revoke::All } else { Revoke::None };
        let r = self.modify(&u, revoke, move |user| user.locked = locked).await?;
        Ok(r.is_some())
    }

    /// Deletes a user and their sessions. False if no such user.
    pub async fn delete_user(&self, username: &str) -> Result<bool, StoreError> {
        let u = username.to_string();
        dispatch!(self, |s| s.delete_user(&u), |p| p.delete_user(&u).await)
    }

    /// Records a successful login.
    pub async fn record_login(&self, username: &str, login: LastLogin) -> Result<(), StoreError> {
        let u = username.to_string();
        self.modify(&u, Revoke::None, move |user| user.last_login = Some(login)).await.map(|_| ())
    }

    /// Replaces the counter under `key` by `next(current)` in one transaction (the row locked meanwhile), and
    /// returns the new counter. The rule lives with its caller; the store only keeps the state.
    pub async fn update_failures(
        &self,
        key: String,
        next: impl FnOnce(Option<Failures>) -> Failures + Send + 'static,
    ) -> Result<Failures, StoreError> {
        dispatch!(self, |s| s.update_failures(&key, next), |p| p.update_failures(&key, next).await)
    }

    /// The latest lockout end among `keys` still in force at `now`.
    pub async fn locked_until(&self, keys: Vec<String>, now: u64) -> Result<Option<u64>, StoreError> {
        dispatch!(self, |s| s.locked_until(&keys, now), |p| p.locked_until(&keys, now).await)
    }

    /// Forgets a failure counter (after a success).
    pub async fn clear_failures(&self, key: String) -> Result<(), StoreError> {
        dispatch!(self, |s| s.clear_failures(&key), |p| p.clear_failures(&key).await)
    }

    /// Stores a new session, deleting `replacing` in the same transaction (id rotation).
    pub async fn insert_session(
        &self,
        id: [u8; 32],
        record: SessionRecord,
        replacing: Option<[u8; 32]>,
    ) -> Result<(), StoreError> {
        dispatch!(self, |s| s.insert_session(&id, &record, replacing.as_ref()), |p| p
            .insert_session(&id, &record, replacing.as_ref())
            .await)
    }

    /// A session and its user, read in one snapshot.
    pub async fn session_with_user(&self, id: [u8; 32]) -> Result<Option<(SessionRecord, User)>, StoreError> {
        dispatch!(self, |s| s.session_with_user(&id), |p| p.session_with_user(&id).await)
    }

    /// Refreshes a session's last-seen time.
    pub async fn touch_session(&self, id: [u8; 32], now: u64) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Postgres(p) => {
                p.touch_session(&id, now);
                Ok(())
            }
            Backend::Redb(_) => dispatch!(self, |s| s.touch_session(&id, now), |_p| Ok(())),
        }
    }

    /// Deletes one session.
    pub async fn delete_session(&self, id: [u8; 32]) -> Result<(), StoreError> {
        dispatch!(self, |s| s.delete_session(&id), |p| p.delete_session(&id).await)
    }

    /// Ends every session of a user; returns how many.
    pub async fn revoke_sessions(&self, username: &str) -> Result<usize, StoreError> {
        let u = username.to_string();
        dispatch!(self, |s| s.revoke_sessions(&u), |p| p.revoke_sessions(&u).await)
    }

    /// Deletes sessions past their idle or absolute limit; returns how many.
    pub async fn purge_sessions(&self, now: u64, idle: u64, max_lifetime: u64) -> Result<usize, StoreError> {
        dispatch!(self, |s| s.purge_sessions(now, idle, max_lifetime), |p| p
            .purge_sessions(now, idle, max_lifetime)
            .await)
    }

    /// Remembers the secret of a setup page, replacing any earlier one of this session.
    pub async fn put_pending_enrolment(&self, session: [u8; 32], p: PendingEnrolment) -> Result<(), StoreError> {
        dispatch!(self, |s| s.put_pending(&session, &p), |pg| pg.put_pending(&session, &p).await)
    }

    /// The unconfirmed secret of this session's setup page.
    pub async fn pending_enrolment(&self, session: [u8; 32]) -> Result<Option<PendingEnrolment>, StoreError> {
        dispatch!(self, |s| s.pending(&session), |p| p.pending(&session).await)
    }

    /// Forgets this session's unconfirmed secret.
    pub async fn delete_pending_enrolment(&self, session: [u8; 32]) -> Result<(), StoreError> {
        dispatch!(self, |s| s.delete_pending(&session), |p| p.delete_pending(&session).await)
    }

    /// Enrols `factor`, consuming the session's pending secret, in one transaction: an enrolment is complete or
    /// absent. The first factor brings `recovery` with it ([`SecondFactors::add`]). `Some(first)` if enrolled;
    /// `None` if the user doesn't exist or already has a factor of that kind.
    pub async fn enrol_factor(
        &self,
        username: &str,
        factor: Factor,
        recovery: Vec<RecoveryCode>,
        session: [u8; 32],
    ) -> Result<Option<bool>, StoreError> {
        let u = username.to_string();
        dispatch!(self, |s| s.enrol_factor(&u, factor, recovery, &session), |p| p
            .enrol_factor(&u, factor, recovery, &session)
            .await)
    }

    /// Records `step` as used if it is newer than the last accepted step (RFC 6238 §5.2). True if accepted.
    pub async fn accept_totp_step(&self, username: &str, step: u64) -> Result<bool, StoreError> {
        let u = username.to_string();
        let r = self
            .modify(&u, Revoke::None, move |user| match user.factors.totp_mut() {
                Some(tf) if tf.last_step < step => {
                    tf.last_step = step;
                    true
                }
                _ => false,
            })
            .await?;
        Ok(r.unwrap_or(false))
    }

    /// Spends the unused code with this hash, if any, putting `replacement` in its place (replenishing sets).
    pub async fn consume_recovery_code(
        &self,
        username: &str,
        hash: String,
        replacement: Option<RecoveryCode>,
    ) -> Result<Consumed, StoreError> {
        let u = username.to_string();
        let r = self
            .modify(&u, Revoke::None, move |user| {
                let tf = &mut user.factors;
                if !tf.on() {
                    return Consumed::NoMatch;
                }
                let Some(i) = tf.recovery.iter().position(|c| c.hash == hash) else {
                    return Consumed::NoMatch;
                };
                match replacement {
                    Some(fresh) => tf.recovery[i] = fresh,
                    None => {
                        tf.recovery.remove(i);
                    }
                }
                Consumed::Ok(tf.recovery.len())
            })
            .await?;
        Ok(r.unwrap_or(Consumed::NoMatch))
    }

    /// Replaces the whole recovery set at once (every old code stops working). False without two-factor.
    pub async fn replace_recovery_codes(&self, username: &str, codes: Vec<RecoveryCode>) -> Result<bool, StoreError> {
        let u = username.to_string();
        let r = self
            .modify(&u, Revoke::None, move |user| {
                let on = user.factors.on();
                if on {
                    user.factors.recovery = codes;
                }
                on
            })
            .await?;
        Ok(r.unwrap_or(false))
    }

    /// Removes every second factor and recovery code and ends sessions as `revoke` says. False if none was on.
    pub async fn disable_two_factor(&self, username: &str, revoke: Revoke) -> Result<bool, StoreError> {
        let u = username.to_string();
        let r = self
            .modify(&u, revoke, |user| {
                user.stamp += 1;
                user.factors.clear()
            })
            .await?;
        Ok(r.unwrap_or(false))
    }

    /// Appends an audit event.
    pub async fn append_audit(&self, event: crate::audit::AuditEvent) -> Result<(), StoreError> {
        dispatch!(self, |s| s.append_audit(&event), |p| p.append_audit(&event).await)
    }

    /// A user's most recent audit events, newest first.
    pub async fn audit_for_user(&self, user: &str, limit: usize) -> Result<Vec<crate::audit::AuditEvent>, StoreError> {
        let u = user.to_string();
        dispatch!(self, |s| s.audit_for_user(&u, limit), |p| p.audit_for_user(&u, limit).await)
    }

    /// Deletes audit events older than `before`; returns how many.
    pub async fn purge_audit(&self, before: u64) -> Result<usize, StoreError> {
        dispatch!(self, |s| s.purge_audit(before), |p| p.purge_audit(before).await)
    }

    /// How many sessions exist.
    pub async fn count_sessions(&self) -> Result<u64, StoreError> {
        dispatch!(self, |s| s.count_sessions(), |p| p.count_sessions().await)
    }

    /// One page of users after `after` (by username) matching `filter`; true if more follow.
    pub async fn users_page(
        &self,
        after: String,
        limit: usize,
        filter: UserFilter,
    ) -> Result<(Vec<User>, bool), StoreError> {
        dispatch!(self, |s| s.users_page(&after, limit, &filter), |p| p.users_page(&after, limit, &filter).await)
    }

    /// Stores an emailed token under its hash.
    pub async fn put_token(&self, hash: String, record: TokenRecord) -> Result<(), StoreError> {
        dispatch!(self, |s| s.put_token(&hash, &record), |p| p.put_token(&hash, &record).await)
    }

    /// Looks at a token without using it (mail scanners prefetch links).
    pub async fn token(&self, hash: String) -> Result<Option<TokenRecord>, StoreError> {
        dispatch!(self, |s| s.token(&hash), |p| p.token(&hash).await)
    }

    /// In one transaction: checks a reset token (kind, expiry, stamp), spends it, sets the new password,
    /// voids other tokens and ends every session of the user.
    pub async fn reset_password(&self, hash: String, new_hash: String, now: u64) -> Result<TokenUse, StoreError> {
        dispatch!(self, |s| s.reset_password(&hash, new_hash, now), |p| p.reset_password(&hash, new_hash, now).await)
    }

    /// In one transaction: checks an invitation, creates the account (bound to the invited address, with its
    /// groups) and spends the invitation. A clash leaves the invitation unused.
    pub async fn accept_invitation(&self, hash: String, user: User, now: u64) -> Result<TokenUse, StoreError> {
        dispatch!(self, |s| s.accept_invitation(&hash, user, now), |p| p.accept_invitation(&hash, user, now).await)
    }

    /// True at most once per `interval` seconds for `key` (throttles notifications).
    pub async fn claim_interval(&self, key: String, now: u64, interval: u64) -> Result<bool, StoreError> {
        dispatch!(self, |s| s.claim_interval(&key, now, interval), |p| p.claim_interval(&key, now, interval).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_is_idle_or_absolute() {
        let rec = SessionRecord {
            username: "a".into(),
            level: Level::Full,
            created: 1000,
            last_seen: 1500,
            address: String::new(),
        };
        assert!(!rec.expired(1599, 100, 1000));
        assert!(rec.expired(1600, 100, 1000));
        assert!(rec.expired(2000, 10_000, 1000));
    }
}
