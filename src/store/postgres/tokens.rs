//! Emailed single-use tokens: stored by hash, spent in the transaction that uses them.

use super::*;

impl PgStore {
    pub(in crate::store) async fn put_token(&self, hash: &str, record: &TokenRecord) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.execute("INSERT INTO tokens (hash, data) VALUES ($1, $2)", &[&hash, &encode(record)?]).await.map_err(db)?;
        Ok(())
    }

    pub(in crate::store) async fn token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        let c = self.client().await?;
        let row = c.query_opt("SELECT data FROM tokens WHERE hash = $1", &[&hash]).await.map_err(db)?;
        row.map(|r| decode(r.get::<_, &[u8]>(0))).transpose()
    }

    pub(in crate::store) async fn reset_password(
        &self,
        hash: &str,
        new_hash: String,
        now: u64,
    ) -> Result<TokenUse, StoreError> {
        pg_tx!(self, |tx| {
            let Some(rec) = locked_token(tx, hash, TokenKind::PasswordReset, now).await? else {
                return Ok(TokenUse::Invalid);
            };
            let Some(mut user) = lock_user(tx, &rec.username).await? else {
                return Ok(TokenUse::Invalid);
            };
            if !rec.usable(TokenKind::PasswordReset, now, Some(user.stamp)) {
                return Ok(TokenUse::Invalid);
            }
            tx.execute("DELETE FROM tokens WHERE hash = $1", &[&hash]).await.map_err(db)?;
            user.password_hash = new_hash;
            user.stamp += 1;
            save_user(tx, &user).await?;
            revoke_in(tx, &rec.username, None).await?;
            Ok(TokenUse::Done(rec.username))
        })
    }

    pub(in crate::store) async fn accept_invitation(
        &self,
        hash: &str,
        mut user: User,
        now: u64,
    ) -> Result<TokenUse, StoreError> {
        pg_tx!(self, |tx| {
            let Some(rec) = locked_token(tx, hash, TokenKind::Invitation, now).await? else {
                return Ok(TokenUse::Invalid);
            };
            user.email = rec.email.clone();
            user.groups = rec.groups.clone();
            let clash = tx
                    .query_opt(
                        "SELECT username = $1 OR email = $1 FROM users WHERE username = $1 OR email = $1 OR username = $2 OR email = $2 LIMIT 1",
                        &[&user.username, &user.email],
                    )
                    .await
                    .map_err(db)?;
            if let Some(row) = clash {
                let name_taken: bool = row.get(0);
                return Ok(TokenUse::Conflict(if name_taken {
                    format!("the username {:?} is taken", user.username)
                } else {
                    "an account with this email address already exists".into()
                }));
            }
            tx.execute(
                "INSERT INTO users (username, email, data) VALUES ($1, $2, $3)",
                &[&user.username, &user.email, &encode(&user)?],
            )
            .await
            .map_err(db)?;
            tx.execute("DELETE FROM tokens WHERE hash = $1", &[&hash]).await.map_err(db)?;
            Ok(TokenUse::Done(user.username.clone()))
        })
    }
}

/// The token under `hash`, row-locked, if it is still usable for `kind` at `now`. The lock makes the check and the
/// spend one step: a second request waits, then finds it gone.
async fn locked_token(
    tx: &Transaction<'_>,
    hash: &str,
    kind: TokenKind,
    now: u64,
) -> Result<Option<TokenRecord>, StoreError> {
    let row = tx.query_opt("SELECT data FROM tokens WHERE hash = $1 FOR UPDATE", &[&hash]).await.map_err(db)?;
    let Some(row) = row else {
        return Ok(None);
    };
    let rec: TokenRecord = decode(row.get::<_, &[u8]>(0))?;
    Ok(rec.usable(kind, now, None).then_some(rec))
}
