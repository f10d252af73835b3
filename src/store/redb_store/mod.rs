//! The embedded redb backend. Every public method is one transaction.
//!
//! Opened in redb's multi-writer mode so the `portcullis user …` commands can change the store while `serve` runs;
//! their commits are visible to the server's next read transaction.

use std::path::Path;

use super::{
    Dump, Factor, Failures, PendingEnrolment, RecoveryCode, Revoke, SessionRecord, StoreError, TokenKind, TokenRecord,
    TokenUse, User, UserFilter, decode, encode,
};
use crate::audit::AuditEvent;

use redb::{Database, MultimapTableDefinition, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

/// Schema version this build writes. Bump it and add a step to [`RedbStore::migrate`] when a stored shape changes.
/// 2: users in layout 2 (second factors as a list).
pub const SCHEMA_VERSION: u64 = 2;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("users");
const EMAILS: TableDefinition<&str, &str> = TableDefinition::new("emails");
const SESSIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("sessions");
const USER_SESSIONS: MultimapTableDefinition<&str, &[u8]> = MultimapTableDefinition::new("user_sessions");
const FAILURES: TableDefinition<&str, &[u8]> = TableDefinition::new("failures");
const PENDING: TableDefinition<&[u8], &[u8]> = TableDefinition::new("pending_enrolments");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
const THROTTLE: TableDefinition<&str, u64> = TableDefinition::new("throttle");
/// The revocation journal ([`super::revocations`]): revision → what that step ended.
const REVOKED: TableDefinition<u64, &[u8]> = TableDefinition::new("revocations");
/// Audit events by (user, at·10⁶ + random), so one user's events are one range scan.
const AUDIT: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("audit");

macro_rules! db_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.to_string())
            }
        }
    )*};
}

mod counters;
mod tokens;
db_errors!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// The redb-backed store.
pub struct RedbStore {
    /// The open database; `None` only while it is being reopened after an I/O error.
    db: std::sync::RwLock<Option<std::sync::Arc<Database>>>,
    /// Where it lives, for reopening.
    path: std::path::PathBuf,
    /// The revocation revision as last read: the hot path reads this, not the file.
    revision: std::sync::atomic::AtomicU64,
    /// When it was last read (milliseconds since `epoch`).
    refreshed: std::sync::atomic::AtomicU64,
    epoch: std::time::Instant,
    /// The journal steps read with the revision.
    pub(super) journal: super::Journal,
}

/// Re-read the revision at least this often even without a wake-up (a CLI that died before announcing).
const REVISION_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// The wake-up socket next to the database file.
pub fn wakeup_path(db: &Path) -> std::path::PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".wakeup");
    std::path::PathBuf::from(name)
}

/// Tells a running `serve` on this database that sessions may have been revoked (best effort: no server, no-op).
pub fn announce_revocation(db: &Path) {
    // Non-blocking: a full queue already holds a wake-up (unread because no request came), and a CLI must
    // never wait for the gateway.
    if let Ok(sock) = std::os::unix::net::UnixDatagram::unbound()
        && sock.set_nonblocking(true).is_ok()
    {
        let _ = sock.send_to(b"r", wakeup_path(db));
    }
}

fn open_file(path: &Path) -> Result<Database, StoreError> {
    Database::builder()
        .set_concurrency_mode(redb::ConcurrencyMode::MultiWriter)
        .create(path)
        .map_err(|e| StoreError::Db(format!("{}: {e}", path.display())))
}

/// Schema 1 → 2: every user rewritten in layout 2 (an older build then refuses the file as too new instead of
/// failing on each user it reads).
fn migrate_1_to_2(tx: &WriteTransaction) -> Result<(), StoreError> {
    let mut users = tx.open_table(USERS)?;
    let mut old = Vec::new();
    for row in users.iter()? {
        let (k, v) = row?;
        if let Some(new) = super::stored::rewritten_user(k.value(), v.value()) {
            old.push((k.value().to_string(), new));
        }
    }
    for (name, bytes) in &old {
        users.insert(name.as_str(), bytes.as_slice())?;
    }
    tracing::info!(users = old.len(), "storage migrated to schema 2: second factors as a list");
    Ok(())
}

impl RedbStore {
    /// Opens or creates the file, creates every table, and runs migrations.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        // Password hashes, emails and the audit log: readable by the gateway's user only.
        crate::files::private_file(path).map_err(|e| StoreError::Db(format!("{}: {e}", path.display())))?;
        let db = open_file(path)?;
        let store = RedbStore {
            db: std::sync::RwLock::new(Some(std::sync::Arc::new(db))),
            path: path.to_path_buf(),
            revision: std::sync::atomic::AtomicU64::new(0),
            refreshed: std::sync::atomic::AtomicU64::new(0),
            epoch: std::time::Instant::now(),
            journal: super::Journal::default(),
        };
        store.migrate()?;
        store.refresh_revision()?;
        Ok(store)
    }

    fn db(&self) -> Result<std::sync::Arc<Database>, StoreError> {
        let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
        guard.clone().ok_or_else(|| StoreError::Db("storage is being reopened after an I/O error".into()))
    }

    /// After an I/O error (disk full, say) redb refuses every call until the database is reopened. Reopens it once
    /// no operation holds it; until then calls fail cleanly (and the gateway answers 503).
    pub fn recover(&self, err: &StoreError) {
        let StoreError::Db(msg) = err else { return };
        if !(msg.contains("re-open") || msg.contains("being reopened")) {
            return;
        }
        let mut guard = self.db.write().unwrap_or_else(|p| p.into_inner());
        if guard.as_ref().is_some_and(|db| std::sync::Arc::strong_count(db) > 1) {
            return;
        }
        *guard = None;
        match open_file(&self.path) {
            Ok(db) => {
                tracing::warn!(path = %self.path.display(), "storage reopened after an I/O error");
                *guard = Some(std::sync::Arc::new(db));
            }
            Err(e) => tracing::error!(error = %e, "storage still unavailable"),
        }
    }

    /// Creates tables (readers can't open a table that was never created) and upgrades old schemas.
    fn migrate(&self) -> Result<(), StoreError> {
        let tx = self.db()?.begin_write()?;
        {
            let mut meta = tx.open_table(META)?;
            let found = meta.get("schema_version")?.map(|v| v.value());
            match found {
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(StoreError::TooNew { found: v, supported: SCHEMA_VERSION });
                }
                // Each step in this same transaction: a migration is complete or absent.
                Some(1) => migrate_1_to_2(&tx)?,
                _ => {}
            }
            meta.insert("schema_version", SCHEMA_VERSION)?;
            tx.open_table(USERS)?;
            tx.open_table(EMAILS)?;
            tx.open_table(SESSIONS)?;
            tx.open_multimap_table(USER_SESSIONS)?;
            tx.open_table(FAILURES)?;
            tx.open_table(PENDING)?;
            tx.open_table(AUDIT)?;
            tx.open_table(TOKENS)?;
            tx.open_table(THROTTLE)?;
            tx.open_table(REVOKED)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The revocation revision: it changes whenever a session may have been ended or a user locked, by this
    /// process or another (the CLI). A cheap read, done inline on the request path.
    pub fn revision(&self, woken: bool, listening: bool) -> Result<u64, StoreError> {
        use std::sync::atomic::Ordering;
        let now = self.millis();
        let stale = now.saturating_sub(self.refreshed.load(Ordering::Relaxed)) >= REVISION_POLL.as_millis() as u64;
        // Without a wake-up socket, another process's change is only seen by reading the file every time.
        if woken || stale || !listening {
            return self.refresh_revision();
        }
        Ok(self.revision.load(Ordering::Acquire))
    }

    fn millis(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Reads the revision from the file, and the journal steps up to it that this process hasn't read (in the
    /// same read transaction, so they are noted before anyone sees the revision they lead to).
    pub fn refresh_revision(&self) -> Result<u64, StoreError> {
        use std::sync::atomic::Ordering;
        let tx = self.db()?.begin_read()?;
        let meta = tx.open_table(META)?;
        let r = meta.get("revision")?.map_or(0, |v| v.value());
        let known = self.revision.load(Ordering::Acquire);
        if r > known {
            let from = known.max(r.saturating_sub(super::revocations::JOURNAL_KEEP)) + 1;
            for row in tx.open_table(REVOKED)?.range(from..=r)? {
                let (k, v) = row?;
                self.journal.record(k.value(), super::Revoked::decode(v.value()));
            }
        }
        // Never back: two refreshes may finish out of order.
        let r = self.revision.fetch_max(r, Ordering::AcqRel).max(r);
        self.refreshed.store(self.millis(), Ordering::Relaxed);
        Ok(r)
    }

    /// The schema version recorded in the file.
    pub fn schema_version(&self) -> Result<u64, StoreError> {
        let tx = self.db()?.begin_read()?;
        let meta = tx.open_table(META)?;
        Ok(meta.get("schema_version")?.map_or(0, |v| v.value()))
    }

    fn write<T>(&self, f: impl FnOnce(&WriteTransaction) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let tx = self.db()?.begin_write()?;
        let out = f(&tx)?;
        tx.commit()?;
        // This process's own revocations are visible to its next request at once.
        self.refresh_revision()?;
        Ok(out)
    }

    pub(super) fn create_user(&self, user: &User) -> Result<(), StoreError> {
        self.write(|tx| {
            let mut users = tx.open_table(USERS)?;
            let mut emails = tx.open_table(EMAILS)?;
            if users.get(user.username.as_str())?.is_some() {
                return Err(StoreError::Conflict(format!("the username {:?} is taken", user.username)));
            }
            // A name that is someone's email (or the reverse) would make logins ambiguous.
            if emails.get(user.username.as_str())?.is_some() || users.get(user.email.as_str())?.is_some() {
                return Err(StoreError::Conflict(format!(
                    "{:?} is already another account's username or email",
                    user.username
                )));
            }
            if emails.get(user.email.as_str())?.is_some() {
                return Err(StoreError::Conflict(format!("the email {:?} is taken", user.email)));
            }
            users.insert(user.username.as_str(), encode(user)?.as_slice())?;
            emails.insert(user.email.as_str(), user.username.as_str())?;
            Ok(())
        })
    }

    pub(super) fn user(&self, username: &str) -> Result<Option<User>, StoreError> {
        let tx = self.db()?.begin_read()?;
        let users = tx.open_table(USERS)?;
        users.get(username)?.map(|v| decode(v.value())).transpose()
    }

    pub(super) fn find_login(&self, login: &str) -> Result<Option<User>, StoreError> {
        let tx = self.db()?.begin_read()?;
        let users = tx.open_table(USERS)?;
        if let Some(v) = users.get(login)? {
            return decode(v.value()).map(Some);
        }
        let emails = tx.open_table(EMAILS)?;
        let Some(name) = emails.get(login)? else {
            return Ok(None);
        };
        users.get(name.value())?.map(|v| decode(v.value())).transpose()
    }

    pub(super) fn list_users(&self) -> Result<Vec<User>, StoreError> {
        let tx = self.db()?.begin_read()?;
        let users = tx.open_table(USERS)?;
        users.iter()?.map(|row| decode(row?.1.value())).collect()
    }

    /// Applies `change` to a user and ends sessions as `revoke` says, in one transaction.
    /// `None` if there is no such user.
    pub(super) fn modify_user<T>(
        &self,
        username: &str,
        revoke: Revoke,
        change: impl FnOnce(&mut User) -> T,
    ) -> Result<Option<T>, StoreError> {
        self.write(|tx| {
            let mut users = tx.open_table(USERS)?;
            let Some(mut user) = users.get(username)?.map(|v| decode::<User>(v.value())).transpose()? else {
                return Ok(None);
            };
            let out = change(&mut user);
            users.insert(username, encode(&user)?.as_slice())?;
            drop(users);
            match revoke {
                Revoke::None => {}
                Revoke::All => {
                    revoke_in(tx, username, None)?;
                }
                Revoke::AllExcept(keep) => {
                    revoke_in(tx, username, Some(&keep))?;
                }
            }
            Ok(Some(out))
        })
    }

    pub(super) fn append_audit(&self, event: &AuditEvent) -> Result<(), StoreError> {
        // Random low bits keep two events of one user in the same second (even from two processes) apart.
        let jitter = u64::from(u32::from_be_bytes(crate::keys::random_bytes::<4>().unwrap_or_default()) % 1_000_000);
        let seq = event.at.saturating_mul(1_000_000).saturating_add(jitter);
        self.write(|tx| {
            tx.open_table(AUDIT)?.insert((event.user.as_str(), seq), encode(event)?.as_slice())?;
            Ok(())
        })
    }

    pub(super) fn audit_for_user(&self, user: &str, limit: usize) -> Result<Vec<AuditEvent>, StoreError> {
        let tx = self.db()?.begin_read()?;
        let t = tx.open_table(AUDIT)?;
        let mut out = Vec::new();
        for row in t.range((user, 0)..=(user, u64::MAX))?.rev() {
            out.push(decode(row?.1.value())?);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    pub(super) fn purge_audit(&self, before: u64) -> Result<usize, StoreError> {
        use redb::ReadableTableMetadata;
        self.write(|tx| {
            let mut t = tx.open_table(AUDIT)?;
            let cutoff = before.saturating_mul(1_000_000);
            let before_len = t.len()?;
            t.retain(|(_, seq), _| seq >= cutoff)?;
            Ok(usize::try_from(before_len - t.len()?).unwrap_or(usize::MAX))
        })
    }

    pub(super) fn count_sessions(&self) -> Result<u64, StoreError> {
        use redb::ReadableTableMetadata;
        let tx = self.db()?.begin_read()?;
        Ok(tx.open_table(SESSIONS)?.len()?)
    }

    /// Up to `limit` users after `after` (by username) that match `filter`, and whether more follow.
    pub(super) fn users_page(
        &self,
        after: &str,
        limit: usize,
        filter: &UserFilter,
    ) -> Result<(Vec<User>, bool), StoreError> {
        let tx = self.db()?.begin_read()?;
        let users = tx.open_table(USERS)?;
        let mut out = Vec::new();
        let range = users.range::<&str>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))?;
        for row in range {
            let user: User = decode(row?.1.value())?;
            if !filter.matches(&user) {
                continue;
            }
            if out.len() == limit {
                return Ok((out, true));
            }
            out.push(user);
        }
        Ok((out, false))
    }

    /// Everything in the store, for copying into another backend.
    pub(super) fn dump(&self) -> Result<Dump, StoreError> {
        let tx = self.db()?.begin_read()?;
        let users = tx.open_table(USERS)?.iter()?.map(|r| decode(r?.1.value())).collect::<Result<_, _>>()?;
        let mut sessions = Vec::new();
        for row in tx.open_table(SESSIONS)?.iter()? {
            let (k, v) = row?;
            if let Ok(id) = <[u8; 32]>::try_from(k.value()) {
                sessions.push((id, decode(v.value())?));
            }
        }
        let mut tokens = Vec::new();
        for row in tx.open_table(TOKENS)?.iter()? {
            let (k, v) = row?;
            tokens.push((k.value().to_string(), decode(v.value())?));
        }
        let audit = tx.open_table(AUDIT)?.iter()?.map(|r| decode(r?.1.value())).collect::<Result<_, _>>()?;
        Ok(Dump { users, sessions, tokens, audit })
    }

    pub(super) fn put_pending(&self, session: &[u8; 32], p: &PendingEnrolment) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.open_table(PENDING)?.insert(session.as_slice(), encode(p)?.as_slice())?;
            Ok(())
        })
    }

    pub(super) fn pending(&self, session: &[u8; 32]) -> Result<Option<PendingEnrolment>, StoreError> {
        let tx = self.db()?.begin_read()?;
        let t = tx.open_table(PENDING)?;
        t.get(session.as_slice())?.map(|v| decode(v.value())).transpose()
    }

    pub(super) fn delete_pending(&self, session: &[u8; 32]) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.open_table(PENDING)?.remove(session.as_slice())?;
            Ok(())
        })
    }

    pub(super) fn enrol_factor(
        &self,
        username: &str,
        factor: Factor,
        recovery: Vec<RecoveryCode>,
        session: &[u8; 32],
    ) -> Result<Option<bool>, StoreError> {
        self.write(|tx| {
            let mut users = tx.open_table(USERS)?;
            let Some(mut user) = users.get(username)?.map(|v| decode::<User>(v.value())).transpose()? else {
                return Ok(None);
            };
            let Some(first) = user.factors.add(factor, recovery) else {
                return Ok(None);
            };
            user.stamp += 1;
            users.insert(username, encode(&user)?.as_slice())?;
            tx.open_table(PENDING)?.remove(session.as_slice())?;
            Ok(Some(first))
        })
    }

    pub(super) fn delete_user(&self, username: &str) -> Result<bool, StoreError> {
        self.write(|tx| {
            let mut users = tx.open_table(USERS)?;
            let Some(user) = users.remove(username)?.map(|v| decode::<User>(v.value())).transpose()? else {
                return Ok(false);
            };
            tx.open_table(EMAILS)?.remove(user.email.as_str())?;
            revoke_in(tx, username, None)?;
            Ok(true)
        })
    }

    pub(super) fn insert_session(
        &self,
        id: &[u8; 32],
        record: &SessionRecord,
        replacing: Option<&[u8; 32]>,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            if let Some(old) = replacing {
                delete_session_in(tx, old)?;
            }
            tx.open_table(SESSIONS)?.insert(id.as_slice(), encode(record)?.as_slice())?;
            tx.open_multimap_table(USER_SESSIONS)?.insert(record.username.as_str(), id.as_slice())?;
            Ok(())
        })
    }

    pub(super) fn session_with_user(&self, id: &[u8; 32]) -> Result<Option<(SessionRecord, User)>, StoreError> {
        let tx = self.db()?.begin_read()?;
        let sessions = tx.open_table(SESSIONS)?;
        let Some(rec) = sessions.get(id.as_slice())?.map(|v| decode::<SessionRecord>(v.value())).transpose()? else {
            return Ok(None);
        };
        let users = tx.open_table(USERS)?;
        let Some(user) = users.get(rec.username.as_str())?.map(|v| decode::<User>(v.value())).transpose()? else {
            return Ok(None);
        };
        Ok(Some((rec, user)))
    }

    pub(super) fn touch_session(&self, id: &[u8; 32], now: u64) -> Result<(), StoreError> {
        self.write(|tx| {
            let mut sessions = tx.open_table(SESSIONS)?;
            let rec = sessions.get(id.as_slice())?.map(|v| decode::<SessionRecord>(v.value())).transpose()?;
            if let Some(mut rec) = rec {
                rec.last_seen = rec.last_seen.max(now);
                sessions.insert(id.as_slice(), encode(&rec)?.as_slice())?;
            }
            Ok(())
        })
    }

    pub(super) fn delete_session(&self, id: &[u8; 32]) -> Result<(), StoreError> {
        self.write(|tx| delete_session_in(tx, id))
    }

    pub(super) fn revoke_sessions(&self, username: &str) -> Result<usize, StoreError> {
        self.write(|tx| revoke_in(tx, username, None))
    }

    pub(super) fn purge_sessions(&self, now: u64, idle: u64, max_lifetime: u64) -> Result<usize, StoreError> {
        self.write(|tx| {
            let expired: Vec<Vec<u8>> = {
                let sessions = tx.open_table(SESSIONS)?;
                let mut ids = Vec::new();
                for row in sessions.iter()? {
                    let (k, v) = row?;
                    let rec: SessionRecord = decode(v.value())?;
                    if rec.expired(now, idle, max_lifetime) {
                        ids.push(k.value().to_vec());
                    }
                }
                ids
            };
            for id in &expired {
                if let Ok(id) = <[u8; 32]>::try_from(id.as_slice()) {
                    delete_session_in(tx, &id)?;
                }
            }
            Ok(expired.len())
        })
    }
}

/// An unexpired token of `kind` stored under `hash`.
fn live_token(
    tokens: &redb::Table<'_, &str, &[u8]>,
    hash: &str,
    kind: TokenKind,
    now: u64,
) -> Result<Option<TokenRecord>, StoreError> {
    let rec = tokens.get(hash)?.map(|v| decode::<TokenRecord>(v.value())).transpose()?;
    Ok(rec.filter(|r| r.usable(kind, now, None)))
}

/// Bumps the revocation revision and journals what the step ended, so every process's session cache drops that.
fn bump_revision(tx: &WriteTransaction, what: &super::Revoked) -> Result<(), StoreError> {
    let mut meta = tx.open_table(META)?;
    let r = meta.get("revision")?.map_or(0, |v| v.value()).wrapping_add(1);
    meta.insert("revision", r)?;
    let mut journal = tx.open_table(REVOKED)?;
    journal.insert(r, what.encode().as_slice())?;
    // One in, one out: the journal stays at its length.
    journal.remove(r.wrapping_sub(super::revocations::JOURNAL_KEEP))?;
    Ok(())
}

fn delete_session_in(tx: &WriteTransaction, id: &[u8; 32]) -> Result<(), StoreError> {
    bump_revision(tx, &super::Revoked::Sessions(vec![*id]))?;
    tx.open_table(PENDING)?.remove(id.as_slice())?;
    let mut sessions = tx.open_table(SESSIONS)?;
    let removed = sessions.remove(id.as_slice())?.map(|v| decode::<SessionRecord>(v.value())).transpose()?;
    if let Some(rec) = removed {
        tx.open_multimap_table(USER_SESSIONS)?.remove(rec.username.as_str(), id.as_slice())?;
    }
    Ok(())
}

/// Ends a user's sessions, except `keep`.
fn revoke_in(tx: &WriteTransaction, username: &str, keep: Option<&[u8; 32]>) -> Result<usize, StoreError> {
    bump_revision(tx, &super::Revoked::User(username.to_string()))?;
    let mut index = tx.open_multimap_table(USER_SESSIONS)?;
    let ids: Vec<Vec<u8>> =
        index.remove_all(username)?.map(|v| v.map(|g| g.value().to_vec())).collect::<Result<_, _>>()?;
    let mut sessions = tx.open_table(SESSIONS)?;
    let mut pending = tx.open_table(PENDING)?;
    let mut ended = 0;
    for id in &ids {
        if keep.is_some_and(|k| k.as_slice() == id.as_slice()) {
            index.insert(username, id.as_slice())?;
            continue;
        }
        sessions.remove(id.as_slice())?;
        pending.remove(id.as_slice())?;
        ended += 1;
    }
    Ok(ended)
}

#[cfg(test)]
mod tests;
