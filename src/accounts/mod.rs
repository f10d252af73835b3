//! Account operations, each written once and called alike by the portal (the user), the admin pages and the
//! command line. Every operation takes the [`Actor`] and does its work in one fixed order:
//!
//! 1. the change, in one store transaction, with the sessions it ends ended in that same transaction;
//! 2. one audit event of the operation's own kind, recording the actor and (from a request) the address;
//! 3. one notice to the user (throttled through the store, so the CLI can't flood a mailbox either).
//!
//! A failed audit write or notice never undoes the change: the change is what the actor asked for.

pub mod factors;
pub mod source;
pub mod validate;

use std::net::IpAddr;
use std::sync::Arc;

use crate::audit::{AuditEvent, EventKind};
use crate::clock::Clock;
use crate::config::Config;
use crate::credentials::lockout::Lockout;
use crate::credentials::password::{self, Hasher, PasswordError};
use crate::credentials::tokens;
use crate::keys::{KeyError, Keys};
use crate::mail::Email;
use crate::notify::{By, Notice, Notifier};
use crate::store::{Revoke, Store, StoreError, TokenKind, TokenRecord, TokenUse, User, normalize_login};

/// Who does an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// The account's own user, from a request.
    User {
        /// The client address.
        address: IpAddr,
    },
    /// An administrator on the admin pages.
    Admin {
        /// The administrator's username.
        name: String,
        /// The administrator's client address.
        address: IpAddr,
    },
    /// A `portcullis user …` command on the server.
    Cli,
}

impl Actor {
    /// The audit event of `kind` for `user`, with this actor and address.
    pub fn event(&self, now: u64, kind: EventKind, user: &str) -> AuditEvent {
        let event = AuditEvent::new(now, kind, user);
        match self {
            Actor::User { address } => event.from_addr(address),
            Actor::Admin { name, address } => event.from_addr(address).by(name),
            Actor::Cli => event.by("cli"),
        }
    }

    /// How a notice names the one who acted.
    pub fn by(&self) -> By {
        match self {
            Actor::User { .. } => By::User,
            Actor::Admin { .. } | Actor::Cli => By::Operator,
        }
    }

    /// The name recorded on what this actor issues (invitations).
    fn issuer(&self) -> &str {
        match self {
            Actor::User { .. } => "self-service",
            Actor::Admin { name, .. } => name,
            Actor::Cli => "cli",
        }
    }
}

/// Why an account operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Sealing, opening or randomness failed.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// Hashing failed, or the new password breaks the rules.
    #[error(transparent)]
    Password(#[from] PasswordError),
    /// A name, address or group was refused.
    #[error(transparent)]
    Invalid(#[from] validate::Invalid),
    /// No account has that name.
    #[error("no user {0:?}")]
    NoSuchUser(String),
    /// Invitations are off (no mail transport, no public_url, or `[accounts] invitations = false`).
    #[error("invitations need [mail] with a transport and public_url, and [accounts] invitations = true")]
    InvitationsOff,
}

/// A new account, as an operator describes it.
#[derive(Debug, Clone)]
pub struct NewAccount {
    /// Username as typed (normalised and checked here).
    pub username: String,
    /// Email address as typed (normalised and checked here).
    pub email: String,
    /// Display name; the username when empty.
    pub display_name: String,
    /// Groups as typed.
    pub groups: Vec<String>,
    /// The initial password.
    pub password: String,
}

/// What a password change keeps: the session it was made from, when the user made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// No session survives.
    Nothing,
    /// This session survives (the one the user is using).
    Session([u8; 32]),
}

impl Keep {
    fn revoke(self) -> Revoke {
        match self {
            Keep::Nothing => Revoke::All,
            Keep::Session(id) => Revoke::AllExcept(id),
        }
    }
}

/// The settings account operations read.
#[derive(Debug, Clone)]
struct Settings {
    skew: u8,
    recovery_codes: usize,
    replenish: bool,
    invitations: bool,
    invitation_ttl: u64,
    reset_ttl: u64,
    /// `public_url` + portal prefix: links in mail never come from a Host header.
    link_base: String,
}

/// The account operations, over the store, keys, clock, hasher and notifier the caller shares.
#[derive(Clone)]
pub struct Accounts {
    store: Store,
    keys: Keys,
    clock: Arc<dyn Clock>,
    hasher: Hasher,
    notifier: Notifier,
    lockout: Lockout,
    settings: Settings,
}

impl Accounts {
    /// Account operations for this config.
    pub fn new(
        config: &Config,
        store: Store,
        keys: Keys,
        clock: Arc<dyn Clock>,
        hasher: Hasher,
        notifier: Notifier,
    ) -> Accounts {
        let settings = Settings {
            skew: config.two_factor.skew,
            recovery_codes: config.two_factor.recovery_codes,
            replenish: config.two_factor.replenish_recovery_codes,
            invitations: config.invitations_enabled(),
            invitation_ttl: config.accounts.invitation_ttl.secs(),
            reset_ttl: config.accounts.reset_token_ttl.secs(),
            link_base: format!(
                "{}{}",
                config.mail.public_url.as_deref().unwrap_or_default(),
                config.server.portal_prefix.0
            ),
        };
        Accounts { store, keys, clock, hasher, notifier, lockout: Lockout::new(&config.limits), settings }
    }

    /// The current time of the injected clock.
    pub fn now(&self) -> u64 {
        self.clock.now()
    }

    /// The notifier (for callers that queue other mail through the same outbox).
    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    /// Records a security event: tracing at once, then the store. A failed write is logged, not fatal.
    pub async fn audit(&self, event: AuditEvent) {
        event.emit();
        if let Err(e) = self.store.append_audit(event).await {
            tracing::error!(error = %e, "could not store an audit event");
        }
    }

    async fn finish(&self, actor: &Actor, user: &User, kind: EventKind, detail: Option<String>, notice: Notice) {
        let now = self.now();
        let event = actor.event(now, kind, &user.username);
        self.audit(match detail {
            Some(d) => event.detail(d),
            None => event,
        })
        .await;
        self.notifier.notify(user, notice, actor.by(), now).await;
    }

    /// The account named `name` (normalised), or [`AccountError::NoSuchUser`].
    pub async fn find(&self, name: &str) -> Result<User, AccountError> {
        self.store.user(&normalize_login(name)).await?.ok_or_else(|| AccountError::NoSuchUser(name.to_string()))
    }

    /// Creates an account (an operator's `user add`).
    pub async fn create(&self, actor: &Actor, new: NewAccount) -> Result<User, AccountError> {
        let username = validate::username(&new.username)?;
        let email = validate::email(&new.email)?;
        let groups = validate::groups(&new.groups)?;
        password::check_new(&new.password)?;
        let display_name = match new.display_name.trim() {
            "" => new.username.trim().to_string(),
            d => d.to_string(),
        };
        let hash = self.hasher.hash(new.password).await?;
        let user = User::new(&username, &email, &display_name, groups, hash, self.now());
        self.store.create_user(user.clone()).await?;
        let event = actor.event(self.now(), EventKind::AccountCreated, &user.username);
        self.audit(event).await;
        Ok(user)
    }

    /// Locks the account; every session of it ends.
    pub async fn lock(&self, actor: &Actor, name: &str) -> Result<User, AccountError> {
        let user = self.find(name).await?;
        self.store.set_locked(&user.username, true).await?;
        self.finish(actor, &user, EventKind::AccountLocked, None, Notice::AccountDisabled).await;
        Ok(user)
    }

    /// Unlocks the account.
    pub async fn unlock(&self, actor: &Actor, name: &str) -> Result<User, AccountError> {
        let user = self.find(name).await?;
        self.store.set_locked(&user.username, false).await?;
        self.finish(actor, &user, EventKind::AccountUnlocked, None, Notice::AccountEnabled).await;
        Ok(user)
    }

    /// Deletes the account and its sessions.
    pub async fn delete(&self, actor: &Actor, name: &str) -> Result<User, AccountError> {
        let user = self.find(name).await?;
        self.store.delete_user(&user.username).await?;
        self.finish(actor, &user, EventKind::AccountDeleted, None, Notice::AccountDeleted).await;
        Ok(user)
    }

    /// Ends every session of the account; returns the account and how many sessions there were.
    pub async fn end_sessions(&self, actor: &Actor, name: &str) -> Result<(User, usize), AccountError> {
        let user = self.find(name).await?;
        let ended = self.store.revoke_sessions(&user.username).await?;
        self.finish(actor, &user, EventKind::SessionsEnded, Some(format!("{ended} ended")), Notice::SessionsEnded)
            .await;
        Ok((user, ended))
    }

    /// Removes two-factor (secret and codes) and ends the sessions `keep` doesn't keep — the user turning it off,
    /// or an operator helping someone who lost a phone. Returns the account and whether two-factor was on;
    /// sessions end either way.
    pub async fn reset_two_factor(&self, actor: &Actor, name: &str, keep: Keep) -> Result<(User, bool), AccountError> {
        let user = self.find(name).await?;
        let was_on = self.store.disable_two_factor(&user.username, keep.revoke()).await?;
        if was_on {
            self.finish(actor, &user, EventKind::TwoFactorDisabled, None, Notice::TwoFactorDisabled).await;
        }
        Ok((user, was_on))
    }

    /// Sets a new password (checked against the rules, hashed off the runtime) and ends the sessions `keep`
    /// doesn't keep; emailed links made before stop working.
    pub async fn set_password(
        &self,
        actor: &Actor,
        name: &str,
        new_password: &str,
        keep: Keep,
    ) -> Result<User, AccountError> {
        password::check_new(new_password)?;
        let user = self.find(name).await?;
        let hash = self.hasher.hash(new_password.to_string()).await?;
        self.store.change_password(&user.username, hash, keep.revoke()).await?;
        self.finish(actor, &user, EventKind::PasswordChanged, None, Notice::PasswordChanged).await;
        Ok(user)
    }

    /// Sets a new password with a reset link's token, spending it in the same transaction; every session ends.
    /// False if the token is no longer usable.
    pub async fn reset_password(
        &self,
        actor: &Actor,
        user: &User,
        token: &str,
        new_password: &str,
    ) -> Result<bool, AccountError> {
        password::check_new(new_password)?;
        let hash = self.hasher.hash(new_password.to_string()).await?;
        match self.store.reset_password(tokens::hash(&self.keys, token), hash, self.now()).await? {
            TokenUse::Done(_) => {}
            _ => return Ok(false),
        }
        self.finish(actor, user, EventKind::PasswordChanged, Some("reset".into()), Notice::PasswordChanged).await;
        Ok(true)
    }

    /// Emails a single-use reset link to the account's address.
    pub async fn send_reset_link(&self, actor: &Actor, user: &User) -> Result<(), AccountError> {
        let now = self.now();
        let (token, hash) = tokens::new_token(&self.keys)?;
        let ttl = self.settings.reset_ttl;
        let record = TokenRecord {
            kind: TokenKind::PasswordReset,
            username: user.username.clone(),
            email: user.email.clone(),
            groups: Vec::new(),
            created: now,
            expires: now + ttl,
            stamp: user.stamp,
            issued_by: actor.issuer().to_string(),
        };
        self.store.put_token(hash, record).await?;
        let link = format!("{}/reset?token={token}", self.settings.link_base);
        let from = match actor {
            Actor::User { address } | Actor::Admin { address, .. } => format!(" from {address}"),
            Actor::Cli => String::new(),
        };
        let title = self.notifier.title();
        let body = format!(
            "Hello {},\n\nSomeone (hopefully you) asked to reset the password of your account{from}.\n\n\
             Choose a new password here (the link works once and expires in {} minutes):\n\n{link}\n\n\
             If you didn't ask for this, ignore this email: your password stays as it is.\n\n-- \n{title}\n",
            user.display_name,
            ttl / 60,
        );
        let email = Email {
            to: user.email.clone(),
            subject: format!("{title}: reset your password"),
            body,
            kind: "password_reset",
        };
        self.notifier.outbox().send(email).await;
        self.audit(actor.event(now, EventKind::PasswordResetRequested, &user.username)).await;
        Ok(())
    }

    /// Invites `email` to create an account with `groups`: a single-use link by mail.
    pub async fn invite<S: AsRef<str>>(
        &self,
        actor: &Actor,
        email: &str,
        groups: &[S],
    ) -> Result<String, AccountError> {
        if !self.settings.invitations {
            return Err(AccountError::InvitationsOff);
        }
        let email = validate::email(email)?;
        let groups = validate::groups(groups)?;
        let now = self.now();
        let (token, hash) = tokens::new_token(&self.keys)?;
        let ttl = self.settings.invitation_ttl;
        let record = TokenRecord {
            kind: TokenKind::Invitation,
            username: String::new(),
            email: email.clone(),
            groups,
            created: now,
            expires: now + ttl,
            stamp: 0,
            issued_by: actor.issuer().to_string(),
        };
        self.store.put_token(hash, record).await?;
        let link = format!("{}/invite?token={token}", self.settings.link_base);
        let title = self.notifier.title();
        let body = format!(
            "Hello,\n\nYou are invited to create an account on {title}.\n\nOpen this link to choose your username and \
             password (it works once and expires in {} days):\n\n{link}\n\nIf you weren't expecting this, ignore this \
             email.\n\n-- \n{title}\n",
            (ttl / 86400).max(1)
        );
        let mail = Email { to: email.clone(), subject: format!("{title}: your invitation"), body, kind: "invitation" };
        self.notifier.outbox().send(mail).await;
        self.audit(actor.event(now, EventKind::InvitationSent, &email)).await;
        Ok(email)
    }
}
