//! Where users and their passwords come from, and the password step written once over it.
//!
//! A [`UserSource`] finds the account a login names and checks a password for it. The local store with its argon2
//! hashes ([`LocalUsers`]) is the first source; a directory (LDAP: search, then bind as the user) is the next,
//! behind the same trait. [`Accounts::password_step`] wraps whichever source in the rest of the step, in one order
//! for every page that asks for a password (sign-in, re-authentication in the settings): the lockout check, the
//! source, then either the counter cleared, or one audit event, one count and, at the lock, the lockout event and
//! the account-locked notice.

use std::net::IpAddr;

use crate::audit::{AuditEvent, EventKind};
use crate::credentials::lockout::Step;
use crate::credentials::password::Hasher;
use crate::notify::{By, Notice};
use crate::store::{Store, User, normalize_login};

use super::{AccountError, Accounts};

/// Who a username and password belong to, in two steps as a directory works (search with the service account,
/// then bind as the user), so the lockout can be asked in between, under the account's own name.
pub trait UserSource: Send + Sync {
    /// The account `login` (a username or an email address, normalised) names, if any.
    fn find(&self, login: &str) -> impl Future<Output = Result<Option<User>, AccountError>> + Send;

    /// Whether `password` is `user`'s. `None` (an unknown name) is checked too, against nothing, so it takes
    /// as long as a known name: timing doesn't tell which names exist.
    fn verify(&self, user: Option<&User>, password: String) -> impl Future<Output = Result<bool, AccountError>> + Send;
}

/// The local accounts: users in the store, passwords as argon2id hashes.
pub struct LocalUsers<'a> {
    /// The store holding the accounts.
    pub store: &'a Store,
    /// The hasher (its pool bounds the memory of concurrent checks).
    pub hasher: &'a Hasher,
}

impl UserSource for LocalUsers<'_> {
    async fn find(&self, login: &str) -> Result<Option<User>, AccountError> {
        Ok(if login.is_empty() { None } else { self.store.find_login(login).await? })
    }

    async fn verify(&self, user: Option<&User>, password: String) -> Result<bool, AccountError> {
        // An unknown name costs a hash too (of a dummy).
        Ok(self.hasher.verify(password, user.map(|u| u.password_hash.clone())).await?)
    }
}

/// Which page asks for the password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    /// The login form: anyone may type any name.
    SignIn,
    /// Re-entry in the settings by a signed-in user, before a sensitive change.
    Reauthentication,
}

/// What the password step decided.
#[derive(Debug, Clone)]
pub enum PasswordStep {
    /// Right password, account usable: the counter is cleared.
    Accepted(Box<User>),
    /// Wrong password or unknown account: counted and audited.
    Refused,
    /// The step is locked for this many seconds (`now`: this very failure locked it).
    Locked {
        /// Seconds until it unlocks.
        retry_after: u64,
        /// Whether this attempt started the lockout (else it was locked already and the password not checked).
        now: bool,
    },
    /// Right password, but an administrator locked the account.
    AccountLocked,
}

impl Accounts {
    /// The password step, written once for every page that asks for a password: the account's (or typed
    /// name's) lockout first, then `source`, then the counter cleared, or the refusal counted, audited and, at the
    /// lock, the lockout audited and the account-locked notice sent. The caller records metrics and answers.
    pub async fn password_step(
        &self,
        source: &impl UserSource,
        addr: IpAddr,
        login: &str,
        password: String,
        asked: Asked,
    ) -> Result<PasswordStep, AccountError> {
        let now = self.now();
        // The counter is named before the password is checked: the account a known login names, else what was
        // typed (normalised), so unknown names lock like real ones.
        let typed = normalize_login(login);
        let known = source.find(&typed).await?;
        let account = known.as_ref().map_or(typed, |u| u.username.clone());
        if let Some(secs) = self.lockout.retry_after(&self.store, Step::Password, &account, addr, now).await? {
            if asked == Asked::SignIn {
                self.audit(AuditEvent::new(now, EventKind::LockedOut, &account).from_addr(addr).detail("password"))
                    .await;
            }
            return Ok(PasswordStep::Locked { retry_after: secs, now: false });
        }
        match (source.verify(known.as_ref(), password).await?, known) {
            (true, Some(user)) if user.locked => {
                let event = AuditEvent::new(now, EventKind::LoginFailed, &user.username).from_addr(addr);
                self.audit(event.detail("account locked")).await;
                Ok(PasswordStep::AccountLocked)
            }
            (true, Some(user)) => {
                self.lockout.succeed(&self.store, Step::Password, &user.username).await?;
                Ok(PasswordStep::Accepted(Box::new(user)))
            }
            (_, known) => self.refused(addr, &account, known.as_ref(), asked, now).await,
        }
    }

    /// A refused password: one audit event, one count and, at the lock, the lockout event and the account-locked
    /// notice (to a known account).
    async fn refused(
        &self,
        addr: IpAddr,
        account: &str,
        known: Option<&User>,
        asked: Asked,
        now: u64,
    ) -> Result<PasswordStep, AccountError> {
        let event = AuditEvent::new(now, EventKind::LoginFailed, account).from_addr(addr);
        self.audit(match asked {
            Asked::SignIn => event,
            Asked::Reauthentication => event.detail("password re-entry"),
        })
        .await;
        let Some(secs) = self.lockout.fail(&self.store, Step::Password, account, addr, now).await? else {
            return Ok(PasswordStep::Refused);
        };
        self.audit(AuditEvent::new(now, EventKind::Lockout, account).from_addr(addr).detail("password")).await;
        if let Some(u) = known {
            self.notifier.notify(u, Notice::AccountLocked, By::User, now).await;
        }
        Ok(PasswordStep::Locked { retry_after: secs, now: true })
    }

    /// The local accounts as a [`UserSource`].
    pub fn local_users(&self) -> LocalUsers<'_> {
        LocalUsers { store: &self.store, hasher: &self.hasher }
    }
}
