//! Second factors: enrolment, the check at sign-in and at a password reset, and the recovery set. One code is
//! accepted once across every session and instance: a TOTP step is recorded atomically (RFC 6238 §5.2), a
//! recovery code is spent in the transaction that checks it.

use crate::audit::EventKind;
use crate::credentials::lockout::Step;
use crate::credentials::{recovery, totp};
use crate::notify::{By, Notice};
use crate::store::{Consumed, Factor as StoredFactor, PendingEnrolment, SecondFactor, TotpFactor, User};

use super::{AccountError, Accounts, Actor};

/// Purpose label the TOTP secret is sealed under.
pub const TOTP_PURPOSE: &str = "totp-secret";

/// A second factor as typed.
#[derive(Debug, Clone, Copy)]
pub enum Factor<'a> {
    /// A code from the authenticator app.
    Totp(&'a str),
    /// One of the recovery codes.
    RecoveryCode(&'a str),
}

impl Factor<'_> {
    /// The method's name in audit details and metrics.
    pub fn method(&self) -> &'static str {
        match self {
            Factor::Totp(_) => "totp",
            Factor::RecoveryCode(_) => "recovery_code",
        }
    }
}

/// What a second factor is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The challenge after the password.
    SignIn,
    /// Proving the account before a reset link sets a new password.
    PasswordReset,
}

/// Why a second factor was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// A TOTP code for a step already used.
    Replayed,
    /// Not a valid code; the message for the user.
    Invalid(&'static str),
}

impl Failure {
    /// What the user is told.
    pub fn message(self) -> &'static str {
        match self {
            Failure::Replayed => "That code was already used. Wait for the next code in your app.",
            Failure::Invalid(m) => m,
        }
    }
}

/// The result of a second-factor attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted, and spent.
    Accepted(SecondFactor),
    /// Refused; counted as a failure.
    Refused(Failure),
    /// The step is locked for this many seconds; `now` is true if this attempt locked it.
    Locked {
        /// Seconds until it unlocks.
        retry_after: u64,
        /// Whether this very failure started the lockout.
        now: bool,
    },
}

/// What confirming an enrolment did.
#[derive(Debug)]
pub enum Enrolment {
    /// Two-factor is on; the recovery codes to show once.
    Enabled(Vec<String>),
    /// The code was wrong; the (opened) secret, to show the setup again.
    WrongCode(Vec<u8>),
    /// The account changed under the setup (already enrolled, or gone).
    Stale,
}

impl Accounts {
    /// A second-factor attempt by the user, for sign-in or a reset: the lockout first,
    /// then the code, spent on success; a failure is audited, told to the user and counted, possibly locking.
    pub async fn second_factor(
        &self,
        actor: &Actor,
        user: &User,
        factor: Factor<'_>,
        browser: &str,
        purpose: Purpose,
    ) -> Result<Outcome, AccountError> {
        let now = self.now();
        let name = &user.username;
        let addr = match actor {
            Actor::User { address } | Actor::Admin { address, .. } => *address,
            Actor::Cli => std::net::IpAddr::from([127, 0, 0, 1]),
        };
        let detail = match purpose {
            Purpose::SignIn => factor.method().to_string(),
            Purpose::PasswordReset => format!("{}; password reset", factor.method()),
        };
        if let Some(secs) = self.lockout.retry_after(&self.store, Step::SecondFactor, name, addr, now).await? {
            self.audit(actor.event(now, EventKind::LockedOut, name).detail(detail)).await;
            return Ok(Outcome::Locked { retry_after: secs, now: false });
        }
        let checked = match factor {
            Factor::Totp(code) => self.verify_totp_and_spend(user, code).await?,
            Factor::RecoveryCode(code) => self.spend_recovery_code(actor, user, code).await?,
        };
        let failure = match checked {
            Ok(factor) => {
                self.lockout.succeed(&self.store, Step::SecondFactor, name).await?;
                self.audit(actor.event(now, EventKind::SecondFactorSucceeded, name).detail(detail)).await;
                return Ok(Outcome::Accepted(factor));
            }
            Err(failure) => failure,
        };
        let kind = match failure {
            Failure::Replayed => EventKind::ReplayRejected,
            Failure::Invalid(_) => EventKind::SecondFactorFailed,
        };
        self.audit(actor.event(now, kind, name).detail(detail.clone())).await;
        let notice =
            Notice::SecondFactorFailed { address: addr.to_string(), browser: browser.chars().take(200).collect() };
        self.notifier.notify(user, notice, By::User, now).await;
        if let Some(secs) = self.lockout.fail(&self.store, Step::SecondFactor, name, addr, now).await? {
            self.audit(actor.event(now, EventKind::Lockout, name).detail(detail)).await;
            self.notifier.notify(user, Notice::AccountLocked, By::User, now).await;
            return Ok(Outcome::Locked { retry_after: secs, now: true });
        }
        Ok(Outcome::Refused(failure))
    }

    /// Checks a TOTP code and atomically records its step, so one code works once across all sessions.
    pub async fn verify_totp_and_spend(
        &self,
        user: &User,
        code: &str,
    ) -> Result<Result<SecondFactor, Failure>, AccountError> {
        let Some(tf) = user.factors.totp() else {
            return Ok(Err(Failure::Invalid("Two-factor authentication is not set up.")));
        };
        let secret = self.keys.open(&user.username, TOTP_PURPOSE, &tf.secret)?;
        match totp::check(&secret, code, self.now(), self.settings.skew, Some(tf.last_step)) {
            // The snapshot may be stale: the store accepts the step only if it is still newer than the last.
            totp::Check::Accepted(step) => match self.store.accept_totp_step(&user.username, step).await? {
                true => Ok(Ok(SecondFactor::Totp)),
                false => Ok(Err(Failure::Replayed)),
            },
            totp::Check::Replayed => Ok(Err(Failure::Replayed)),
            totp::Check::Invalid => Ok(Err(Failure::Invalid("That code is not valid. Check your app and try again."))),
        }
    }

    /// Spends a recovery code atomically (replacing it when the set replenishes); audited and told to the user.
    pub async fn spend_recovery_code(
        &self,
        actor: &Actor,
        user: &User,
        typed: &str,
    ) -> Result<Result<SecondFactor, Failure>, AccountError> {
        const BAD: Failure = Failure::Invalid("That recovery code is not valid or was already used.");
        let Some(code) = recovery::normalize(typed) else {
            return Ok(Err(BAD));
        };
        let name = &user.username;
        let replacement = if self.settings.replenish {
            Some(recovery::entry(&self.keys, name, &recovery::generate()?)?)
        } else {
            None
        };
        match self.store.consume_recovery_code(name, recovery::hash(&self.keys, name, &code), replacement).await? {
            Consumed::Ok(left) => {
                let now = self.now();
                self.audit(actor.event(now, EventKind::RecoveryCodeUsed, name).detail(format!("{left} left"))).await;
                self.notifier.notify(user, Notice::RecoveryCodeUsed(left), By::User, now).await;
                Ok(Ok(SecondFactor::RecoveryCode))
            }
            Consumed::NoMatch => Ok(Err(BAD)),
        }
    }

    /// Starts an enrolment for `session`: a fresh secret, sealed, remembered for that session only.
    pub async fn start_enrolment(&self, user: &User, session: [u8; 32]) -> Result<Vec<u8>, AccountError> {
        let secret = totp::new_secret()?;
        let pending = PendingEnrolment {
            username: user.username.clone(),
            secret: self.keys.seal(&user.username, TOTP_PURPOSE, &secret)?,
            created: self.now(),
        };
        self.store.put_pending_enrolment(session, pending).await?;
        Ok(secret.to_vec())
    }

    /// Opens a pending enrolment's secret.
    fn enrolment_secret(&self, pending: &PendingEnrolment) -> Result<Vec<u8>, AccountError> {
        Ok(self.keys.open(&pending.username, TOTP_PURPOSE, &pending.secret)?)
    }

    /// Confirms an enrolment with a code: two-factor goes on (the code's step counts as used), with a new
    /// recovery set, and the pending setup of `session` is spent.
    pub async fn confirm_enrolment(
        &self,
        actor: &Actor,
        user: &User,
        session: [u8; 32],
        pending: PendingEnrolment,
        code: &str,
    ) -> Result<Enrolment, AccountError> {
        let now = self.now();
        let secret = self.enrolment_secret(&pending)?;
        let totp::Check::Accepted(step) = totp::check(&secret, code, now, self.settings.skew, None) else {
            return Ok(Enrolment::WrongCode(secret));
        };
        let name = &user.username;
        let (shown, stored) = recovery::new_set(&self.keys, name, self.settings.recovery_codes)?;
        let factor = StoredFactor::Totp(TotpFactor { enabled_at: now, secret: pending.secret, last_step: step });
        let Some(first) = self.store.enrol_factor(name, factor, stored, session).await? else {
            return Ok(Enrolment::Stale);
        };
        self.finish(actor, user, EventKind::TwoFactorEnabled, None, Notice::TwoFactorEnabled).await;
        // The first factor brings the recovery set; a later one keeps the set the user already saved.
        Ok(Enrolment::Enabled(if first { shown } else { Vec::new() }))
    }

    /// Replaces the recovery set (every old code stops working); the new codes, to show once.
    pub async fn regenerate_recovery_codes(&self, actor: &Actor, user: &User) -> Result<Vec<String>, AccountError> {
        let (shown, stored) = recovery::new_set(&self.keys, &user.username, self.settings.recovery_codes)?;
        self.store.replace_recovery_codes(&user.username, stored).await?;
        self.finish(actor, user, EventKind::RecoveryCodesRegenerated, None, Notice::RecoveryCodesRegenerated).await;
        Ok(shown)
    }
}
