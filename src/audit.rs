//! The audit log: every security event is one structured record, stored with bounded retention and emitted through
//! tracing (target `audit`). Records hold names, addresses and outcomes, never a password, code, secret or cookie.

use serde::{Deserialize, Serialize};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// Password accepted.
    LoginSucceeded,
    /// Wrong password or unknown user.
    LoginFailed,
    /// A login or second factor refused because of a lockout.
    LockedOut,
    /// A lockout started.
    Lockout,
    /// Second factor accepted.
    SecondFactorSucceeded,
    /// Wrong second factor.
    SecondFactorFailed,
    /// A TOTP code was reused.
    ReplayRejected,
    /// A recovery code was spent.
    RecoveryCodeUsed,
    /// Two-factor enrolment confirmed.
    TwoFactorEnabled,
    /// Two-factor removed by the user.
    TwoFactorDisabled,
    /// Recovery codes regenerated.
    RecoveryCodesRegenerated,
    /// Sign-out.
    Logout,
    /// Password changed.
    PasswordChanged,
    /// A password reset link was sent.
    PasswordResetRequested,
    /// An invitation was sent.
    InvitationSent,
    /// An invitation was accepted and the account created.
    InvitationAccepted,
    /// An account was created by an operator (invitations record [`EventKind::InvitationAccepted`]).
    AccountCreated,
    /// An operator locked the account (its sessions ended).
    AccountLocked,
    /// An operator unlocked the account.
    AccountUnlocked,
    /// An operator deleted the account.
    AccountDeleted,
    /// Every session of the account was ended on purpose.
    SessionsEnded,
    /// Read from older stores only: an admin page action, before each operation had its own kind.
    AdminAction,
    /// Read from older stores only: a `portcullis user …` action, before each operation had its own kind.
    CliAction,
}

impl EventKind {
    /// The stable snake_case name.
    pub fn as_str(self) -> &'static str {
        use EventKind::*;
        match self {
            LoginSucceeded => "login_succeeded",
            LoginFailed => "login_failed",
            LockedOut => "locked_out",
            Lockout => "lockout",
            SecondFactorSucceeded => "second_factor_succeeded",
            SecondFactorFailed => "second_factor_failed",
            ReplayRejected => "replay_rejected",
            RecoveryCodeUsed => "recovery_code_used",
            TwoFactorEnabled => "two_factor_enabled",
            TwoFactorDisabled => "two_factor_disabled",
            RecoveryCodesRegenerated => "recovery_codes_regenerated",
            Logout => "logout",
            PasswordChanged => "password_changed",
            PasswordResetRequested => "password_reset_requested",
            InvitationSent => "invitation_sent",
            InvitationAccepted => "invitation_accepted",
            AccountCreated => "account_created",
            AccountLocked => "account_locked",
            AccountUnlocked => "account_unlocked",
            AccountDeleted => "account_deleted",
            SessionsEnded => "sessions_ended",
            AdminAction => "admin_action",
            CliAction => "cli_action",
        }
    }
}

/// One stored event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Unix seconds.
    pub at: u64,
    /// What happened.
    pub kind: EventKind,
    /// The account concerned (or the name typed, for unknown accounts), at most 64 characters.
    pub user: String,
    /// The client address, if from a request.
    pub address: Option<String>,
    /// Who acted, when not the user (an admin's name, or "cli").
    pub actor: Option<String>,
    /// A short free-text detail (never a secret).
    pub detail: Option<String>,
}

impl AuditEvent {
    /// A new event; `user` is cut to 64 characters so junk input can't bloat the log.
    pub fn new(at: u64, kind: EventKind, user: &str) -> AuditEvent {
        AuditEvent { at, kind, user: user.chars().take(64).collect(), address: None, actor: None, detail: None }
    }

    /// With a client address.
    pub fn from_addr(mut self, addr: impl ToString) -> Self {
        self.address = Some(addr.to_string());
        self
    }

    /// With an actor.
    pub fn by(mut self, actor: &str) -> Self {
        self.actor = Some(actor.to_string());
        self
    }

    /// With a detail.
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Emits the event through tracing. User-supplied text is escaped, so it can't forge log lines.
    pub fn emit(&self) {
        tracing::info!(
            target: "audit",
            event = self.kind.as_str(),
            user = %self.user.escape_debug(),
            addr = self.address.as_deref().unwrap_or("-"),
            actor = %self.actor.as_deref().unwrap_or("-").escape_debug(),
            detail = %self.detail.as_deref().unwrap_or("").escape_debug(),
            "security event"
        );
    }
}
