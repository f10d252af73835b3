//! Security notifications by email: what happened, when, from where, and what to do if it wasn't you.
//! Throttled and deduplicated per user and kind, so an attack can't become a mail flood.

use crate::clock::rfc3339;
use crate::gateway::Gateway;
use crate::mail::Email;
use crate::store::User;

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
    /// An administrator did something to the account.
    AdminAction(String),
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
            Notice::AdminAction(_) => "admin_action",
        }
    }

    /// Dedup key: the same notice within the throttle window is sent once. Counts and actions are part of it, and
    /// so is the account's stamp for a change of state (on after off is news; the same "on" twice is not).
    fn dedup(&self, user: &User) -> String {
        match self {
            Notice::RecoveryCodeUsed(left) => format!("recovery_code_used:{left}"),
            Notice::AdminAction(what) => format!("admin_action:{what}"),
            Notice::TwoFactorEnabled | Notice::TwoFactorDisabled => format!("{}:{}", self.kind(), user.stamp),
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
            Notice::AdminAction(what) => (
                "An administrator changed your account".into(),
                format!(
                    "An administrator acted on your account: {what}.\n\nIf you didn't expect this, contact your administrator."
                ),
            ),
        }
    }
}

/// Sends a notice (queued; never blocks), unless the same one went out recently.
pub async fn notify(gw: &Gateway, user: &User, notice: Notice) {
    if !gw.config.mail_ready() {
        return;
    }
    let now = gw.clock.now();
    let key = format!("notice:{}:{}", notice.dedup(user), user.username);
    match gw.store.claim_interval(key, now, THROTTLE).await {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            tracing::warn!(error = %e, "notification throttle unavailable; not sending");
            return;
        }
    }
    gw.mailer.send(compose(&gw.config.portal.title, user, &notice, now));
}

/// The email for a notice.
pub fn compose(title: &str, user: &User, notice: &Notice, now: u64) -> Email {
    let (subject, body) = notice.text();
    Email {
        to: user.email.clone(),
        subject: format!("{title}: {subject}"),
        body: format!("Hello {},\n\n{body}\n\nTime: {}\n\n-- \n{title}\n", user.display_name, rfc3339(now)),
        kind: notice.kind(),
    }
}
