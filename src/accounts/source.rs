//! Where users and their passwords come from, and the password step written once over it.
//!
//! A [`UserSource`] takes what was typed (a username or email, and a password) and answers whose account it is,
//! or that it isn't. The local store with its argon2 hashes ([`LocalUsers`]) is the first source; a directory
//! (LDAP: search, then bind as the user) is the next, behind the same trait. [`Accounts::password_step`] wraps
//! whichever source in the rest of the step, in one order for every page that asks for a password (sign-in,
//! re-authentication in the settings): the lockout check, the source, then either the counter cleared, or one
//! audit event, one count and, at the lock, the lockout event and the account-locked notice.

use std::net::IpAddr;

use crate::audit::{AuditEvent, EventKind};
use crate::credentials::lockout::Step;
use crate::credentials::password::Hasher;
use crate::notify::{By, Notice};
use crate::store::{Store, User, normalize_login};

use super::{AccountError, Accounts};

/// A source's answer for a login and a password.
#[derive(Debug, Clone)]
pub enum Checked {
    /// The password is the account's.
    Accepted(User),
    /// Unknown account or wrong password (told apart only here, never to the client). `account` is the name the
    /// failure counts under: the account's for a known one, what was typed (normalised) otherwise, so unknown
    /// names lock like real ones.
    Refused {
        /// The failure counter's name.
        account: String,
        /// The account, if the login named one.
        known: Option<User>,
    },
}

/// Who a username and password belong to.
pub trait UserSource: Send + Sync {
    /// Checks `password` for the account `login` names (a username or an email address).
    fn check(&self, login: &str, password: String) -> impl Future<Output = Result<Checked, AccountError>> + Send;
}

/// The local accounts: users in the store, passwords as argon2id hashes.
pub struct LocalUsers<'a> {
    /// The store holding the accounts.
    pub store: &'a Store,
    /// The hasher (its pool bounds the memory of concurrent checks).
    pub hasher: &'a Hasher,
}

impl UserSource for LocalUsers<'_> {
    async fn check(&self, login: &str, password: String) -> Result<Checked, AccountError> {
        let login = normalize_login(login);
        let user = if login.is_empty() { None } else { self.store.find_login(&login).await? };
        // An unknown name costs a hash too (of a dummy), so timing doesn't tell which names exist.
        let ok = self.hasher.verify(password, user.as_ref().map(|u| u.password_hash.clone())).await?;
        Ok(match user {
            Some(u) if ok => Checked::Accepted(u),
            known => Checked::Refused { account: known.as_ref().map_or(login, |u| u.username.clone()), known },
        })
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
        // The counter is named before the password is checked: the account a known login names, else the login.
        let typed = normalize_login(login);
        let named = match asked {
            Asked::SignIn if !typed.is_empty() => self.store.find_login(&typed).await?.map(|u| u.username),
            _ => None,
        };
        let counter = named.unwrap_or(typed);
        if let Some(secs) = self.lockout.retry_after(&self.store, Step::Password, &counter, addr, now).await? {
            if asked == Asked::SignIn {
                self.audit(AuditEvent::new(now, EventKind::LockedOut, &counter).from_addr(addr).detail("password"))
                    .await;
            }
            return Ok(PasswordStep::Locked { retry_after: secs, now: false });
        }
        let (account, known) = match source.check(login, password).await? {
            Checked::Accepted(user) if user.locked => {
                let event = AuditEvent::new(now, EventKind::LoginFailed, &user.username).from_addr(addr);
                self.audit(event.detail("account locked")).await;
                return Ok(PasswordStep::AccountLocked);
            }
            Checked::Accepted(user) => {
                self.lockout.succeed(&self.store, Step::Password, &user.username).await?;
                return Ok(PasswordStep::Accepted(Box::new(user)));
            }
            Checked::Refused { account, known } => (account, known),
        };
        let event = AuditEvent::new(now, EventKind::LoginFailed, &account).from_addr(addr);
        self.audit(match asked {
            Asked::SignIn => event,
            Asked::Reauthentication => event.detail("password re-entry"),
        })
        .await;
        let Some(secs) = self.lockout.fail(&self.store, Step::Password, &account, addr, now).await? else {
            return Ok(PasswordStep::Refused);
        };
        self.audit(AuditEvent::new(now, EventKind::Lockout, &account).from_addr(addr).detail("password")).await;
        if let Some(u) = &known {
            self.notifier.notify(u, Notice::AccountLocked, By::User, now).await;
        }
        Ok(PasswordStep::Locked { retry_after: secs, now: true })
    }

    /// The local accounts as a [`UserSource`].
    pub fn local_users(&self) -> LocalUsers<'_> {
        LocalUsers { store: &self.store, hasher: &self.hasher }
    }
}
