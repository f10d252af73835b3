//! The schema, and the migrations that bring an older database to it at start, under an advisory lock so
//! instances may start together.

use super::*;

/// Advisory lock key held while migrating, so instances can start together.
const MIGRATION_LOCK: i64 = 0x706f_7274_6375;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key text PRIMARY KEY, value bigint NOT NULL);
CREATE TABLE IF NOT EXISTS users (username text PRIMARY KEY, email text NOT NULL UNIQUE, data bytea NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    id bytea PRIMARY KEY,
    username text NOT NULL REFERENCES users(username) ON DELETE CASCADE,
    data bytea NOT NULL,
    last_seen bigint NOT NULL);
CREATE INDEX IF NOT EXISTS sessions_username ON sessions(username);
CREATE TABLE IF NOT EXISTS pending_enrolments (
    session bytea PRIMARY KEY REFERENCES sessions(id) ON DELETE CASCADE,
    data bytea NOT NULL);
CREATE TABLE IF NOT EXISTS failures (
    key text PRIMARY KEY, count integer NOT NULL, window_start bigint NOT NULL, locked_until bigint NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (hash text PRIMARY KEY, data bytea NOT NULL);
CREATE TABLE IF NOT EXISTS throttle (key text PRIMARY KEY, last bigint NOT NULL);
CREATE TABLE IF NOT EXISTS audit (
    id bigserial PRIMARY KEY, username text NOT NULL, at bigint NOT NULL, data bytea NOT NULL);
CREATE INDEX IF NOT EXISTS audit_username_at ON audit(username, at);
CREATE TABLE IF NOT EXISTS revocations (revision bigint PRIMARY KEY, data bytea NOT NULL);
INSERT INTO meta (key, value) VALUES ('revision', 0) ON CONFLICT DO NOTHING;
";

/// Schema 1 → 2: every user rewritten in layout 2 (an older build then refuses the database as too new instead
/// of failing on each user it reads).
async fn migrate_1_to_2(tx: &Transaction<'_>) -> Result<(), StoreError> {
    let rows = tx.query("SELECT username, data FROM users FOR UPDATE", &[]).await.map_err(db)?;
    let mut moved = 0usize;
    for row in rows {
        let (name, data): (String, Vec<u8>) = (row.get(0), row.get(1));
        if let Some(new) = crate::store::stored::rewritten_user(&name, &data) {
            tx.execute("UPDATE users SET data = $2 WHERE username = $1", &[&name, &new]).await.map_err(db)?;
            moved += 1;
        }
    }
    tracing::info!(users = moved, "storage migrated to schema 2: second factors as a list");
    Ok(())
}

impl PgStore {
    /// Creates the tables, refuses a newer schema, and runs each step from the recorded version, in one
    /// transaction with the new version.
    pub(super) async fn migrate(&self) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        c.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await.map_err(db)?;
        let result = async {
            c.batch_execute(SCHEMA).await.map_err(db)?;
            let found: Option<i64> = c
                .query_opt("SELECT value FROM meta WHERE key = 'schema_version'", &[])
                .await
                .map_err(db)?
                .map(|r| r.get(0));
            if let Some(v) = found
                && v > SCHEMA_VERSION
            {
                return Err(StoreError::TooNew { found: u(v), supported: u(SCHEMA_VERSION) });
            }
            // Each step and the new version in one transaction: a migration is complete or absent.
            let tx = c.transaction().await.map_err(db)?;
            if found == Some(1) {
                migrate_1_to_2(&tx).await?;
            }
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', $1) ON CONFLICT (key) DO UPDATE SET value = $1",
                &[&SCHEMA_VERSION],
            )
            .await
            .map_err(db)?;
            tx.commit().await.map_err(db)
        }
        .await;
        c.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await.map_err(db)?;
        result
    }
}
