//! Security notifications by email: what happened, when, from where, and what to do if it wasn't you.
//! Throttled and deduplicated per user and kind, so an attack can't become a mail flood — for the gateway and the
//! CLI alike (the throttle lives in the store both share).

use crate::clock::rfc3339;
use crate::mail::{Email, Outbox};
use crate::store::{Store, User};

/// At most one notice of a kind per user in this many seconds.
const THROTTLE: u64 = 600;

/// What to tell the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Two-factor turned on.
    TwoFactorEnabled,
    /// Two-factor turned off.
    TwoFactorDisabled,
    /// A recovery code was used; this many are left.
    RecoveryCodeUsed(usize),
    /// A new set of recovery codes was made.
    RecoveryCodesRegenerated,
    /// The password was right but the second factor wrong.
    SecondFactorFailed {
        /// Client address.
        address: String,
        /// User-Agent.
        browser: String,
    },
    /// Too many failed attempts locked sign-in for a while.
    AccountLocked,
    /// The password changed.
    PasswordChanged,
    /// An operator locked the account.
    AccountDisabled,
    /// An operator unlocked the account.
    AccountEnabled,
    /// An operator deleted the account.
    AccountDeleted,
    /// An operator signed every session of the account out.
    SessionsEnded,
}

impl Notice {
    fn kind(&self) -> &'static str {
        match self {
            Notice::TwoFactorEnabled => "two_factor_enabled",
            Notice::TwoFactorDisabled => "two_factor_disabled",
            Notice::RecoveryCodeUsed(_) => "recovery_code_used",
            Notice::RecoveryCodesRegenerated => "recovery_codes_regenerated",
            Notice::SecondFactorFailed { .. } => "second_factor_failed",
            Notice::AccountLocked => "account_locked",
            Notice::PasswordChanged => "password_changed",
            Notice::AccountDisabled => "account_disabled",
            Notice::AccountEnabled => "account_enabled",
            Notice::AccountDeleted => "account_deleted",
            Notice::SessionsEnded => "sessions_ended",
        }
    }

    /// Dedup key: the same notice within the throttle window is sent once. Counts and actions are part of it, and
    /// so is the account's stamp for a change of state (on after off is news; the same "on" twice is not).
    fn dedup(&self, user: &User) -> String {
        match self {
            Notice::RecoveryCodeUsed(left) => format!("recovery_code_used:{left}"),
            Notice::TwoFactorEnabled | Notice::TwoFactorDisabled => format!("{}:{}", self.kind(), user.stamp),
            // A lock after an unlock is news: the pair alternates, so each is keyed by the state it leaves.
            Notice::AccountDisabled | Notice::AccountEnabled => format!("{}:{}", self.kind(), user.locked),
            other => other.kind().to_string(),
        }
    }

    fn text(&self) -> (String, String) {
        const NOT_YOU: &str = "If this wasn't you, change your password at once and contact your administrator.";
        match self {
            Notice::TwoFactorEnabled => (
                "Two-factor authentication turned on".into(),
                format!("Two-factor authentication was turned on for your account.\n\n{NOT_YOU}"),
            ),
            Notice::TwoFactorDisabled => (
                "Two-factor authentication turned off".into(),
                format!(
                    "Two-factor authentication was turned off for your account. Your account is now protected by your \
                     password alone.\n\n{NOT_YOU}"
                ),
            ),
            Notice::RecoveryCodeUsed(left) => {
                let warn = if *left <= 2 {
                    "\n\nYou are running out of recovery codes: sign in and regenerate them in your account settings."
                } else {
                    ""
                };
                (
                    "A recovery code was used".into(),
                    format!(
                        "A recovery code was used to sign in to your account. {left} recovery code{} left.{warn}\n\n{NOT_YOU}",
                        if *left == 1 { " is" } else { "s are" }
                    ),
                )
            }
            Notice::RecoveryCodesRegenerated => (
                "New recovery codes".into(),
                format!(
                    "A new set of recovery codes was made for your account; the old codes no longer work.\n\n{NOT_YOU}"
                ),
            ),
            Notice::SecondFactorFailed { address, browser } => (
                "Failed sign-in attempt".into(),
                format!(
                    "Someone entered your password correctly but failed the two-factor check.\n\nAddress: {address}\n\
                     Browser: {browser}\n\nIf this wasn't you, your password is known to someone else: change it now."
                ),
            ),
            Notice::AccountLocked => (
                "Sign-in temporarily locked".into(),
                format!(
                    "After too many failed attempts, signing in to your account is locked for a while.\n\n{NOT_YOU}"
                ),
            ),
            Notice::PasswordChanged => (
                "Your password was changed".into(),
                format!(
                    "The password of your account was changed and your other sessions were signed out.\n\n{NOT_YOU}"
                ),
            ),
            Notice::AccountDisabled => (
                "Your account was locked".into(),
                "Your account was locked and every session of it was signed out. You can't sign in until it is \
                 unlocked.\n\nIf you didn't expect this, contact your administrator."
                    .into(),
            ),
            Notice::AccountEnabled => (
                "Your account was unlocked".into(),
                format!("Your account was unlocked: you can sign in again.\n\n{NOT_YOU}"),
            ),
            Notice::AccountDeleted => (
                "Your account was deleted".into(),
                "Your account was deleted and every session of it was signed out.\n\nIf you didn't expect this, \
                 contact your administrator."
                    .into(),
            ),
            Notice::SessionsEnded => (
                "You were signed out everywhere".into(),
                "Every session of your account was signed out. Sign in again to continue.\n\nIf you didn't expect \
                 this, contact your administrator."
                    .into(),
            ),
        }
    }
}

/// Who changed the account, as the email says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum By {
    /// The user (or an event on their own sign-in).
    User,
    /// An administrator, on the admin pages or the command line.
    Operator,
}

/// Sends security notices: throttled through the store, delivered through the outbox.
#[derive(Clone)]
pub struct Notifier {
    store: Store,
    outbox: Outbox,
    title: String,
    enabled: bool,
}

impl Notifier {
    /// A notifier sending through `outbox` as `title`; `enabled` is false when mail is not configured.
    pub fn new(store: Store, outbox: Outbox, title: &str, enabled: bool) -> Notifier {
        Notifier { store, outbox, title: title.to_string(), enabled }
    }

    /// The outbox, for mail that is not a notice (reset links, invitations).
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// The portal title mails are signed with.
    pub fn title(&self) -> &str {
        &self.title
    }

    /// Sends a notice unless the same one went out recently. Never fails the caller's operation: a throttle that
    /// can't be read sends nothing (a notice is a courtesy; a mail flood is an attack).
    pub async fn notify(&self, user: &User, notice: Notice, by: By, now: u64) {
        if !self.enabled {
            return;
        }
        let key = format!("notice:{}:{}", notice.dedup(user), user.username);
        match self.store.claim_interval(key, now, THROTTLE).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::warn!(error = %e, "notification throttle unavailable; not sending");
                return;
            }
        }
        self.outbox.send(compose(&self.title, user, &notice, by, now)).await;
    }
}

/// The email for a notice.
fn compose(title: &str, user: &User, notice: &Notice, by: By, now: u64) -> Email {
    let (subject, body) = notice.text();
    let who = match by {
        By::User => "",
        By::Operator => "\n\nThis change was made by an administrator.",
    };
    Email {
        to: user.email.clone(),
        subject: format!("{title}: {subject}"),
        body: format!("Hello {},\n\n{body}{who}\n\nTime: {}\n\n-- \n{title}\n", user.display_name, rfc3339(now)),
        kind: notice.kind(),
    }
}
