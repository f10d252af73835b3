//! The PostgreSQL backend, for several gateway instances sharing one database.
//!
//! Every operation is one statement or one transaction. Read-modify-write of a user runs under `SELECT … FOR
//! UPDATE`, so two instances can't both spend one recovery code or accept one TOTP step; failure counters are one
//! upsert. Values are stored as the same versioned encoding the embedded store uses.
//!
//! Revocation reaches every instance through the `meta.revision` counter: bumped in the transaction that ends a
//! session, announced with `NOTIFY portcullis` (a wake-up only), and re-read after each notification and every
//! [`POLL`], so a lost notification delays a revocation by at most [`POLL`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::{Client, Transaction};

use super::{
    Factor, Failures, PendingEnrolment, RecoveryCode, Revoke, SessionRecord, StoreError, TokenKind, TokenRecord,
    TokenUse, User, UserFilter, decode, encode,
};
use crate::audit::AuditEvent;

/// Schema version this build writes. 2: users in layout 2 (second factors as a list).
pub const SCHEMA_VERSION: i64 = 2;
/// How often the revision is re-read even without a notification. Half the stated worst-case revocation delay
/// (1 s, README "Scaling out"), leaving the other half for the read itself and a busy machine.
pub const POLL: Duration = Duration::from_millis(500);
/// The revision's high bits: a local epoch, moved to flush caches without a database round trip.
const EPOCH: u64 = 1 << 40;
/// Runs a block in one transaction: committed if the block returns `Ok`, rolled back on `Err` (and on drop).
macro_rules! pg_tx {
    ($self:ident, |$tx:ident| $body:block) => {{
        let mut client = $self.client().await?;
        let transaction = client.transaction().await.map_err(db)?;
        let out: Result<_, StoreError> = {
            let $tx = &transaction;
            async move { $body }.await
        };
        let value = out?;
        transaction.commit().await.map_err(db)?;
        // This instance's own revocations reach its own cache at once, not when its NOTIFY comes back.
        $self.catch_up_after_write(&client).await;
        Ok(value)
    }};
}

mod counters;
mod listen;
mod migrate;
mod tokens;
use listen::*;

fn db(e: impl std::fmt::Debug + std::fmt::Display) -> StoreError {
    // tokio-postgres's Display is just "db error"; the Debug form carries the server's message.
    let shown = e.to_string();
    StoreError::Db(if shown == "db error" { format!("{e:?}") } else { shown })
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The PostgreSQL store.
pub struct PgStore {
    pool: Pool,
    /// The last revision read, plus an epoch bumped at every listener reconnect (which may have missed news).
    revision: Arc<AtomicU64>,
    /// Last-seen refreshes waiting for the next batch write.
    touches: std::sync::Mutex<std::collections::HashMap<[u8; 32], u64>>,
    /// The journal steps read with the revision.
    pub(super) journal: super::Journal,
}

impl PgStore {
    /// Connects, migrates under an advisory lock, and starts the revision listener.
    pub async fn open(url: &str, max_connections: usize) -> Result<Arc<PgStore>, StoreError> {
        let pg: tokio_postgres::Config = url.parse().map_err(|e| db(format!("database URL: {e}")))?;
        let tls = tls()?;
        let manager =
            Manager::from_config(pg.clone(), tls.clone(), ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager).max_size(max_connections.max(1)).build().map_err(db)?;
        let store = Arc::new(PgStore {
            pool,
            revision: Arc::new(AtomicU64::new(0)),
            touches: std::sync::Mutex::new(Default::default()),
            journal: super::Journal::default(),
        });
        store.migrate().await?;
        store.catch_up(&*store.client().await?).await?;
        tokio::spawn(listen(pg, tls, Arc::downgrade(&store)));
        tokio::spawn(flush_touches(Arc::downgrade(&store)));
        Ok(store)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(db)
    }

    /// Reads the revision and the journal steps past the one this instance knew, on `c`; the steps are noted
    /// before the revision moves, so a cache that sees the new revision finds them.
    pub(super) async fn catch_up(&self, c: &Client) -> Result<(), StoreError> {
        let known = self.revision.load(Ordering::Acquire);
        let (epoch, low) = (known & !(EPOCH - 1), known & (EPOCH - 1));
        // The table holds the last JOURNAL_KEEP steps only, so this is never many rows.
        let rows = c
            .query(
                "SELECT m.value, r.revision, r.data FROM meta m LEFT JOIN revocations r ON r.revision > $1 \
                 WHERE m.key = 'revision' ORDER BY r.revision",
                &[&i(low)],
            )
            .await
            .map_err(db)?;
        let mut top = low;
        for row in &rows {
            top = u(row.get(0));
            if let (Some(r), Some(data)) = (row.get::<_, Option<i64>>(1), row.get::<_, Option<&[u8]>>(2)) {
                self.journal.record(epoch | u(r), super::Revoked::decode(data));
            }
        }
        // Never back: the listener and writers catch up concurrently; a reconnect's new epoch wins.
        self.revision.fetch_max(epoch | (top & (EPOCH - 1)), Ordering::AcqRel);
        Ok(())
    }

    /// After a committed write: catch up, so this instance's own revocations apply to its next request. If that
    /// read fails, empty the caches instead (fail closed).
    async fn catch_up_after_write(&self, c: &Client) {
        if let Err(e) = self.catch_up(c).await {
            tracing::warn!(error = %e, "cannot read the revocation journal after a write; emptying the session cache");
            self.flush_cache();
        }
    }

    /// The revision as last seen by the listener (no database round trip). `woken`: a local CLI announced a
    /// change, so flush now rather than wait for its NOTIFY.
    pub fn revision(&self, woken: bool) -> u64 {
        if woken {
            self.flush_cache();
        }
        self.revision.load(Ordering::Acquire)
    }

    /// Moves the epoch bits of the revision, which empties every session cache of this instance (the listener
    /// keeps the epoch when it stores the database's value).
    fn flush_cache(&self) {
        self.revision.fetch_add(EPOCH, Ordering::AcqRel);
    }

    pub(super) async fn create_user(&self, user: &User) -> Result<(), StoreError> {
        let data = encode(user)?;
        pg_tx!(self, |tx| {
            let clash = tx
                    .query_opt(
                        "SELECT username, email FROM users WHERE username = $1 OR email = $2 OR email = $1 OR username = $2",
                        &[&user.username, &user.email],
                    )
                    .await
                    .map_err(db)?;
            if let Some(row) = clash {
                let (name, email): (String, String) = (row.get(0), row.get(1));
                return Err(StoreError::Conflict(if name == user.username {
                    format!("the username {:?} is taken", user.username)
                } else if email == user.email {
                    format!("the email {:?} is taken", user.email)
                } else {
                    format!("{:?} is already another account's username or email", user.username)
                }));
            }
            tx.execute(
                "INSERT INTO users (username, email, data) VALUES ($1, $2, $3)",
                &[&user.username, &user.email, &data],
            )
            .await
            .map_err(db)?;
            Ok(())
        })
    }

    pub(super) async fn user(&self, username: &str) -> Result<Option<User>, StoreError> {
        let c = self.client().await?;
        let row = c.query_opt("SELECT data FROM users WHERE username = $1", &[&username]).await.map_err(db)?;
        row.map(|r| decode(r.get::<_, &[u8]>(0))).transpose()
    }

    pub(super) async fn find_login(&self, login: &str) -> Result<Option<User>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                "SELECT data FROM users WHERE username = $1 OR email = $1 ORDER BY (username = $1) DESC LIMIT 1",
                &[&login],
            )
            .await
            .map_err(db)?;
        row.map(|r| decode(r.get::<_, &[u8]>(0))).transpose()
    }

    pub(super) async fn list_users(&self) -> Result<Vec<User>, StoreError> {
        let c = self.client().await?;
        let rows = c.query("SELECT data FROM users ORDER BY username", &[]).await.map_err(db)?;
        rows.iter().map(|r| decode(r.get::<_, &[u8]>(0))).collect()
    }

    pub(super) async fn users_page(
        &self,
        after: &str,
        limit: usize,
        filter: &UserFilter,
    ) -> Result<(Vec<User>, bool), StoreError> {
        // Pages are read in chunks in username order and filtered here, like the embedded store.
        let c = self.client().await?;
        let mut out = Vec::new();
        let mut cursor = after.to_string();
        loop {
            let rows = c
                .query("SELECT username, data FROM users WHERE username > $1 ORDER BY username LIMIT 500", &[&cursor])
                .await
                .map_err(db)?;
            if rows.is_empty() {
                return Ok((out, false));
            }
            for r in &rows {
                cursor = r.get(0);
                let user: User = decode(r.get::<_, &[u8]>(1))?;
                if !filter.matches(&user) {
                    continue;
                }
                if out.len() == limit {
                    return Ok((out, true));
                }
                out.push(user);
            }
        }
    }

    pub(super) async fn modify_user<T: Send + 'static>(
        &self,
        username: &str,
        revoke: Revoke,
        change: impl FnOnce(&mut User) -> T + Send,
    ) -> Result<Option<T>, StoreError> {
        pg_tx!(self, |tx| {
            let Some(mut user) = lock_user(tx, username).await? else {
                return Ok(None);
            };
            let out = change(&mut user);
            save_user(tx, &user).await?;
            match revoke {
                Revoke::None => {}
                Revoke::All => revoke_in(tx, username, None).await?,
                Revoke::AllExcept(keep) => revoke_in(tx, username, Some(&keep)).await?,
            }
            Ok(Some(out))
        })
    }

    pub(super) async fn delete_user(&self, username: &str) -> Result<bool, StoreError> {
        pg_tx!(self, |tx| {
            let n = tx.execute("DELETE FROM users WHERE username = $1", &[&username]).await.map_err(db)?;
            if n > 0 {
                bump(tx, &super::Revoked::User(username.to_string())).await?;
            }
            Ok(n > 0)
        })
    }

    pub(super) async fn insert_session(
        &self,
        id: &[u8; 32],
        record: &SessionRecord,
        replacing: Option<&[u8; 32]>,
    ) -> Result<(), StoreError> {
        let data = encode(record)?;
        pg_tx!(self, |tx| {
            if let Some(old) = replacing {
                delete_session_in(tx, old).await?;
            }
            tx.execute(
                "INSERT INTO sessions (id, username, data, last_seen) VALUES ($1, $2, $3, $4)",
                &[&id.as_slice(), &record.username, &data, &i(record.last_seen)],
            )
            .await
            .map_err(db)?;
            Ok(())
        })
    }

    pub(super) async fn session_with_user(&self, id: &[u8; 32]) -> Result<Option<(SessionRecord, User)>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                "SELECT s.data, s.last_seen, u.data FROM sessions s JOIN users u ON u.username = s.username WHERE s.id = $1",
                &[&id.as_slice()],
            )
            .await
            .map_err(db)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let mut rec: SessionRecord = decode(row.get::<_, &[u8]>(0))?;
        // A touch not yet flushed is part of this instance's view: without it, a session kept alive by use this
        // instance saw (a tunnel's traffic) would read as idle until the next flush.
        let pending = self.touches.lock().unwrap_or_else(|p| p.into_inner()).get(id).copied().unwrap_or(0);
        rec.last_seen = rec.last_seen.max(u(row.get(1))).max(pending);
        Ok(Some((rec, decode(row.get::<_, &[u8]>(2))?)))
    }

    /// Last-seen is batched: remembered here and written by [`flush_touches`], not one write per request.
    pub(super) fn touch_session(&self, id: &[u8; 32], now: u64) {
        let mut t = self.touches.lock().unwrap_or_else(|p| p.into_inner());
        let e = t.entry(*id).or_insert(now);
        *e = (*e).max(now);
    }

    async fn flush(&self) -> Result<(), StoreError> {
        let batch: Vec<([u8; 32], u64)> =
            std::mem::take(&mut *self.touches.lock().unwrap_or_else(|p| p.into_inner())).into_iter().collect();
        if batch.is_empty() {
            return Ok(());
        }
        let ids: Vec<&[u8]> = batch.iter().map(|(id, _)| id.as_slice()).collect();
        let times: Vec<i64> = batch.iter().map(|(_, t)| i(*t)).collect();
        let c = self.client().await?;
        c.execute(
            "UPDATE sessions s SET last_seen = greatest(s.last_seen, b.t)
             FROM unnest($1::bytea[], $2::bigint[]) AS b(id, t) WHERE s.id = b.id",
            &[&ids, &times],
        )
        .await
        .map_err(db)?;
        Ok(())
    }

    pub(super) async fn delete_session(&self, id: &[u8; 32]) -> Result<(), StoreError> {
        pg_tx!(self, |tx| { delete_session_in(tx, id).await })
    }

    pub(super) async fn revoke_sessions(&self, username: &str) -> Result<usize, StoreError> {
        pg_tx!(self, |tx| { revoke_count(tx, username, None).await })
    }

    pub(super) async fn purge_sessions(&self, now: u64, idle: u64, max_lifetime: u64) -> Result<usize, StoreError> {
        let c = self.client().await?;
        let rows = c.query("SELECT id, data, last_seen FROM sessions", &[]).await.map_err(db)?;
        let mut expired: Vec<Vec<u8>> = Vec::new();
        for r in &rows {
            let mut rec: SessionRecord = decode(r.get::<_, &[u8]>(1))?;
            rec.last_seen = rec.last_seen.max(u(r.get(2)));
            if rec.expired(now, idle, max_lifetime) {
                expired.push(r.get::<_, Vec<u8>>(0));
            }
        }
        if expired.is_empty() {
            return Ok(0);
        }
        let n = expired.len();
        let done: Result<(), StoreError> = pg_tx!(self, |tx| {
            tx.execute("DELETE FROM sessions WHERE id = ANY($1)", &[&expired]).await.map_err(db)?;
            let ids = expired.iter().filter_map(|id| <[u8; 32]>::try_from(id.as_slice()).ok()).collect();
            bump(tx, &super::Revoked::Sessions(ids)).await
        });
        done?;
        Ok(n)
    }

    pub(super) async fn put_pending(&self, session: &[u8; 32], p: &PendingEnrolment) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.execute(
            "INSERT INTO pending_enrolments (session, data) VALUES ($1, $2)
             ON CONFLICT (session) DO UPDATE SET data = EXCLUDED.data",
            &[&session.as_slice(), &encode(p)?],
        )
        .await
        .map_err(db)?;
        Ok(())
    }

    pub(super) async fn pending(&self, session: &[u8; 32]) -> Result<Option<PendingEnrolment>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_opt("SELECT data FROM pending_enrolments WHERE session = $1", &[&session.as_slice()])
            .await
            .map_err(db)?;
        row.map(|r| decode(r.get::<_, &[u8]>(0))).transpose()
    }

    pub(super) async fn delete_pending(&self, session: &[u8; 32]) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.execute("DELETE FROM pending_enrolments WHERE session = $1", &[&session.as_slice()]).await.map_err(db)?;
        Ok(())
    }

    pub(super) async fn enrol_factor(
        &self,
        username: &str,
        factor: Factor,
        recovery: Vec<RecoveryCode>,
        session: &[u8; 32],
    ) -> Result<Option<bool>, StoreError> {
        pg_tx!(self, |tx| {
            let Some(mut user) = lock_user(tx, username).await? else {
                return Ok(None);
            };
            let Some(first) = user.factors.add(factor, recovery) else {
                return Ok(None);
            };
            user.stamp += 1;
            save_user(tx, &user).await?;
            tx.execute("DELETE FROM pending_enrolments WHERE session = $1", &[&session.as_slice()])
                .await
                .map_err(db)?;
            Ok(Some(first))
        })
    }

    pub(super) async fn append_audit(&self, event: &AuditEvent) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.execute(
            "INSERT INTO audit (username, at, data) VALUES ($1, $2, $3)",
            &[&event.user, &i(event.at), &encode(event)?],
        )
        .await
        .map_err(db)?;
        Ok(())
    }

    pub(super) async fn audit_for_user(&self, user: &str, limit: usize) -> Result<Vec<AuditEvent>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT data FROM audit WHERE username = $1 ORDER BY at DESC, id DESC LIMIT $2",
                &[&user, &i64::try_from(limit).unwrap_or(i64::MAX)],
            )
            .await
            .map_err(db)?;
        rows.iter().map(|r| decode(r.get::<_, &[u8]>(0))).collect()
    }

    pub(super) async fn purge_audit(&self, before: u64) -> Result<usize, StoreError> {
        let c = self.client().await?;
        let n = c.execute("DELETE FROM audit WHERE at < $1", &[&i(before)]).await.map_err(db)?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    pub(super) async fn count_sessions(&self) -> Result<u64, StoreError> {
        let c = self.client().await?;
        let row = c.query_one("SELECT count(*) FROM sessions", &[]).await.map_err(db)?;
        Ok(u(row.get(0)))
    }

    /// Every row of every table, for `storage migrate-from-redb` (the reverse isn't needed).
    pub(super) async fn import(&self, dump: super::Dump) -> Result<(), StoreError> {
        pg_tx!(self, |tx| {
            for user in &dump.users {
                tx.execute(
                    "INSERT INTO users (username, email, data) VALUES ($1, $2, $3)
                         ON CONFLICT (username) DO UPDATE SET email = EXCLUDED.email, data = EXCLUDED.data",
                    &[&user.username, &user.email, &encode(user)?],
                )
                .await
                .map_err(db)?;
            }
            for (id, rec) in &dump.sessions {
                tx.execute(
                    "INSERT INTO sessions (id, username, data, last_seen) VALUES ($1, $2, $3, $4)
                         ON CONFLICT (id) DO NOTHING",
                    &[&id.as_slice(), &rec.username, &encode(rec)?, &i(rec.last_seen)],
                )
                .await
                .map_err(db)?;
            }
            for (hash, rec) in &dump.tokens {
                tx.execute(
                    "INSERT INTO tokens (hash, data) VALUES ($1, $2) ON CONFLICT (hash) DO NOTHING",
                    &[hash, &encode(rec)?],
                )
                .await
                .map_err(db)?;
            }
            for e in &dump.audit {
                tx.execute(
                    "INSERT INTO audit (username, at, data) VALUES ($1, $2, $3)",
                    &[&e.user, &i(e.at), &encode(e)?],
                )
                .await
                .map_err(db)?;
            }
            bump(tx, &super::Revoked::Everything).await
        })
    }
}

/// A user's record, row-locked until the transaction ends (so two instances can't both change it).
async fn lock_user(tx: &Transaction<'_>, username: &str) -> Result<Option<User>, StoreError> {
    let row = tx.query_opt("SELECT data FROM users WHERE username = $1 FOR UPDATE", &[&username]).await.map_err(db)?;
    row.map(|r| decode(r.get::<_, &[u8]>(0))).transpose()
}

/// Writes back a user locked with [`lock_user`].
async fn save_user(tx: &Transaction<'_>, user: &User) -> Result<(), StoreError> {
    tx.execute("UPDATE users SET data = $2 WHERE username = $1", &[&user.username, &encode(user)?])
        .await
        .map_err(db)?;
    Ok(())
}

/// Bumps the revision, journals what the step ended (dropping the row that falls out of the kept window), and
/// wakes every instance (NOTIFY is delivered at commit). One round trip.
async fn bump(tx: &Transaction<'_>, what: &super::Revoked) -> Result<(), StoreError> {
    tx.execute(
        "WITH r AS (UPDATE meta SET value = value + 1 WHERE key = 'revision' RETURNING value), \
              j AS (INSERT INTO revocations (revision, data) SELECT value, $1 FROM r), \
              d AS (DELETE FROM revocations WHERE revision <= (SELECT value FROM r) - $2) \
         SELECT pg_notify('portcullis', 'revision')",
        &[&what.encode(), &i(super::revocations::JOURNAL_KEEP)],
    )
    .await
    .map_err(db)?;
    Ok(())
}

async fn delete_session_in(tx: &Transaction<'_>, id: &[u8; 32]) -> Result<(), StoreError> {
    let n = tx.execute("DELETE FROM sessions WHERE id = $1", &[&id.as_slice()]).await.map_err(db)?;
    if n > 0 {
        bump(tx, &super::Revoked::Sessions(vec![*id])).await?;
    }
    Ok(())
}

async fn revoke_in(tx: &Transaction<'_>, username: &str, keep: Option<&[u8; 32]>) -> Result<(), StoreError> {
    revoke_count(tx, username, keep).await.map(|_| ())
}

async fn revoke_count(tx: &Transaction<'_>, username: &str, keep: Option<&[u8; 32]>) -> Result<usize, StoreError> {
    let keep: &[u8] = keep.map_or(&[], |k| k.as_slice());
    let n =
        tx.execute("DELETE FROM sessions WHERE username = $1 AND id <> $2", &[&username, &keep]).await.map_err(db)?;
    bump(tx, &super::Revoked::User(username.to_string())).await?;
    Ok(usize::try_from(n).unwrap_or(usize::MAX))
}
