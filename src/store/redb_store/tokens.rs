//! Emailed single-use tokens: stored by hash, spent in the transaction that uses them.

use super::*;

impl RedbStore {
    pub(in crate::store) fn put_token(&self, hash: &str, record: &TokenRecord) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.open_table(TOKENS)?.insert(hash, encode(record)?.as_slice())?;
            Ok(())
        })
    }

    pub(in crate::store) fn token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        let tx = self.db()?.begin_read()?;
        let t = tx.open_table(TOKENS)?;
        t.get(hash)?.map(|v| decode(v.value())).transpose()
    }

    pub(in crate::store) fn reset_password(
        &self,
        hash: &str,
        new_hash: String,
        now: u64,
    ) -> Result<TokenUse, StoreError> {
        self.write(|tx| {
            let mut tokens = tx.open_table(TOKENS)?;
            let Some(rec) = live_token(&tokens, hash, TokenKind::PasswordReset, now)? else {
                return Ok(TokenUse::Invalid);
            };
            let mut users = tx.open_table(USERS)?;
            let user = users.get(rec.username.as_str())?.map(|v| decode::<User>(v.value())).transpose()?;
            let Some(mut user) = user.filter(|u| rec.usable(TokenKind::PasswordReset, now, Some(u.stamp))) else {
                return Ok(TokenUse::Invalid);
            };
            tokens.remove(hash)?;
            user.password_hash = new_hash;
            user.stamp += 1;
            users.insert(user.username.as_str(), encode(&user)?.as_slice())?;
            drop((tokens, users));
            revoke_in(tx, &rec.username, None)?;
            Ok(TokenUse::Done(rec.username))
        })
    }

    pub(in crate::store) fn accept_invitation(
        &self,
        hash: &str,
        mut user: User,
        now: u64,
    ) -> Result<TokenUse, StoreError> {
        self.write(|tx| {
            let mut tokens = tx.open_table(TOKENS)?;
            let Some(rec) = live_token(&tokens, hash, TokenKind::Invitation, now)? else {
                return Ok(TokenUse::Invalid);
            };
            user.email = rec.email.clone();
            user.groups = rec.groups.clone();
            let mut users = tx.open_table(USERS)?;
            let mut emails = tx.open_table(EMAILS)?;
            let clash = users.get(user.username.as_str())?.is_some()
                || emails.get(user.username.as_str())?.is_some()
                || users.get(user.email.as_str())?.is_some();
            if clash {
                return Ok(TokenUse::Conflict(format!("the username {:?} is taken", user.username)));
            }
            if emails.get(user.email.as_str())?.is_some() {
                return Ok(TokenUse::Conflict("an account with this email address already exists".into()));
            }
            users.insert(user.username.as_str(), encode(&user)?.as_slice())?;
            emails.insert(user.email.as_str(), user.username.as_str())?;
            tokens.remove(hash)?;
            Ok(TokenUse::Done(user.username))
        })
    }
}
