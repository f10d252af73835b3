//! The records the store keeps, as the rest of the gateway sees them. How each is laid out on disk, and in which
//! version, is [`super::stored`]'s business alone.

use serde::{Deserialize, Serialize};

/// The user's authentication strength in a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// Password verified, but a second factor (or its enrolment) is still due: reaches only the portal's
    /// challenge, enrolment and logout pages.
    Pending,
    /// Signed in with the password alone (no second factor enrolled or required): enough for `one_factor` apps.
    Password,
    /// Every required factor verified.
    Full,
}

/// Which second factor completed a login.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecondFactor {
    /// A TOTP code.
    Totp,
    /// A recovery code.
    RecoveryCode,
}

impl SecondFactor {
    /// Its name in JSON, the admin pages and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            SecondFactor::Totp => "totp",
            SecondFactor::RecoveryCode => "recovery_code",
        }
    }
}

/// The last successful login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastLogin {
    /// Unix seconds.
    pub at: u64,
    /// Client address.
    pub address: String,
    /// The second factor used, if any.
    pub second_factor: Option<SecondFactor>,
}

/// A user's second factors: the ones enrolled, and the recovery codes that stand in for any of them. Recovery
/// codes are issued with the first factor and go with the last. A new kind of factor is a new [`Factor`] variant
/// (and its layout in [`super::stored`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SecondFactors {
    /// Enrolled factors, oldest first; at most one of each kind.
    pub enrolled: Vec<Factor>,
    /// Unused recovery codes.
    pub recovery: Vec<RecoveryCode>,
}

/// One enrolled second factor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Factor {
    /// An authenticator app (RFC 6238).
    Totp(TotpFactor),
}

impl Factor {
    /// Which kind it is.
    pub fn kind(&self) -> SecondFactor {
        match self {
            Factor::Totp(_) => SecondFactor::Totp,
        }
    }

    /// When its enrolment was confirmed.
    pub fn enabled_at(&self) -> u64 {
        match self {
            Factor::Totp(t) => t.enabled_at,
        }
    }
}

/// An enrolled authenticator app; the secret sealed with [`crate::keys::Keys::seal`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TotpFactor {
    /// When enrolment was confirmed.
    pub enabled_at: u64,
    /// Sealed raw TOTP secret.
    pub secret: Vec<u8>,
    /// Last accepted TOTP time step (RFC 6238 §5.2: never accept it or an older one again).
    pub last_step: u64,
}

impl SecondFactors {
    /// Whether any second factor is enrolled (recovery codes alone don't count: they stand in for one).
    pub fn on(&self) -> bool {
        !self.enrolled.is_empty()
    }

    /// When the first factor still enrolled was confirmed.
    pub fn enabled_at(&self) -> Option<u64> {
        self.enrolled.iter().map(Factor::enabled_at).min()
    }

    /// The enrolled authenticator app.
    #[allow(clippy::unnecessary_find_map, reason = "one kind today; the match grows with the next")]
    pub fn totp(&self) -> Option<&TotpFactor> {
        self.enrolled.iter().find_map(|f| match f {
            Factor::Totp(t) => Some(t),
        })
    }

    /// The enrolled authenticator app, to change.
    #[allow(clippy::unnecessary_find_map, reason = "one kind today; the match grows with the next")]
    pub fn totp_mut(&mut self) -> Option<&mut TotpFactor> {
        self.enrolled.iter_mut().find_map(|f| match f {
            Factor::Totp(t) => Some(t),
        })
    }

    /// The kinds enrolled, oldest first.
    pub fn kinds(&self) -> Vec<SecondFactor> {
        self.enrolled.iter().map(Factor::kind).collect()
    }

    /// Adds `factor` unless one of its kind is enrolled; the first factor brings `recovery` with it. The one
    /// enrolment rule: both backends decide with it inside their transaction. `Some(first)` if added.
    pub fn add(&mut self, factor: Factor, recovery: Vec<RecoveryCode>) -> Option<bool> {
        if self.enrolled.iter().any(|f| f.kind() == factor.kind()) {
            return None;
        }
        let first = self.enrolled.is_empty();
        if first {
            self.recovery = recovery;
        }
        self.enrolled.push(factor);
        Some(first)
    }

    /// Removes every factor and recovery code; whether there was one.
    pub fn clear(&mut self) -> bool {
        let was = self.on();
        *self = SecondFactors::default();
        was
    }
}

/// One unused recovery code: a keyed hash to find it by, and a sealed copy to show it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryCode {
    /// Hex HMAC of the normalised code, bound to the user.
    pub hash: String,
    /// The display form, sealed.
    pub sealed: Vec<u8>,
}

/// A TOTP secret shown on the setup page but not yet confirmed with a code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingEnrolment {
    /// Whose.
    pub username: String,
    /// The sealed secret.
    pub secret: Vec<u8>,
    /// When the setup page was shown; it expires after [`ENROLMENT_TTL`].
    pub created: u64,
}

/// How long a setup page's secret may be confirmed.
pub const ENROLMENT_TTL: u64 = 600;

/// Which sessions an account change ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoke {
    /// None.
    None,
    /// Every session of the user.
    All,
    /// Every session but this one (the one making the change).
    AllExcept([u8; 32]),
}

/// Result of trying to consume a recovery code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consumed {
    /// The code was unused and is now spent; this many remain.
    Ok(usize),
    /// No unused code matches.
    NoMatch,
}

/// A user account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Unique, normalised (trimmed, case-folded).
    pub username: String,
    /// Unique, normalised.
    pub email: String,
    /// Shown to people and sent as the name header.
    pub display_name: String,
    /// Group names.
    pub groups: Vec<String>,
    /// argon2id PHC string.
    pub password_hash: String,
    /// Locked accounts can't log in and have no sessions.
    pub locked: bool,
    /// Unix seconds.
    pub created: u64,
    /// Most recent successful login.
    pub last_login: Option<LastLogin>,
    /// Enrolled second factors and recovery codes.
    pub factors: SecondFactors,
    /// Bumped by every password or two-factor change; emailed tokens issued before a change are void.
    pub stamp: u64,
}

impl User {
    /// A new account: unlocked, no login yet, no second factor.
    pub fn new(
        username: &str,
        email: &str,
        display_name: &str,
        groups: Vec<String>,
        password_hash: String,
        created: u64,
    ) -> User {
        User {
            username: username.to_string(),
            email: email.to_string(),
            display_name: display_name.to_string(),
            groups,
            password_hash,
            locked: false,
            created,
            last_login: None,
            factors: SecondFactors::default(),
            stamp: 0,
        }
    }
}

/// What an emailed token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    /// A password reset link.
    PasswordReset,
    /// An invitation to create an account.
    Invitation,
}

/// An emailed single-use token, stored under its keyed hash only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// What it is for.
    pub kind: TokenKind,
    /// The account (reset) — empty for invitations.
    pub username: String,
    /// The address it was sent to; an invitation is bound to it.
    pub email: String,
    /// Groups an invitation grants.
    pub groups: Vec<String>,
    /// Unix seconds.
    pub created: u64,
    /// Unix seconds after which it is void.
    pub expires: u64,
    /// The user's stamp when issued (reset): a later password or 2FA change voids the token.
    pub stamp: u64,
    /// Who issued it (invitations).
    pub issued_by: String,
}

impl TokenRecord {
    /// Whether this token may be spent for `kind` at `now` by an account whose stamp is `stamp` (`None`: an
    /// invitation, which has no account yet). The one token rule: both backends decide with it before they spend
    /// anything, so a refused token is left as it was.
    pub fn usable(&self, kind: TokenKind, now: u64, stamp: Option<u64>) -> bool {
        self.kind == kind && now < self.expires && stamp.is_none_or(|s| s == self.stamp)
    }
}

/// Outcome of using a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenUse {
    /// Done; for resets, the account.
    Done(String),
    /// Unknown, used, expired, or void.
    Invalid,
    /// The account to create clashes with an existing one.
    Conflict(String),
}

/// A server-side session record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Normalised username.
    pub username: String,
    /// Authentication level reached.
    pub level: Level,
    /// Unix seconds at login.
    pub created: u64,
    /// Unix seconds of the last request (refreshed at most once a minute).
    pub last_seen: u64,
    /// Client address at login.
    pub address: String,
}

impl SessionRecord {
    /// Whether the record has passed its idle or absolute limit at `now`.
    pub fn expired(&self, now: u64, idle: u64, max_lifetime: u64) -> bool {
        now >= self.created.saturating_add(max_lifetime) || now >= self.last_seen.saturating_add(idle)
    }
}

/// A failure counter's state after an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failures {
    /// Failures in the current window.
    pub count: u32,
    /// Start of the current window.
    pub window_start: u64,
    /// Locked until this time (0 = not locked).
    pub locked_until: u64,
}

/// Which users an admin listing shows.
#[derive(Debug, Clone, Default)]
pub struct UserFilter {
    /// Some(true): only with two-factor; Some(false): only without.
    pub two_factor: Option<bool>,
    /// Case-insensitive substring of username, email or name.
    pub search: Option<String>,
}

impl UserFilter {
    /// Whether a user passes the filter.
    pub fn matches(&self, u: &User) -> bool {
        if self.two_factor.is_some_and(|want| want != u.factors.on()) {
            return false;
        }
        match &self.search {
            Some(q) if !q.is_empty() => {
                let q = q.to_lowercase();
                u.username.contains(&q) || u.email.contains(&q) || u.display_name.to_lowercase().contains(&q)
            }
            _ => true,
        }
    }
}

/// Normalises a username or email for lookup and uniqueness: trim, then case-fold.
pub fn normalize_login(s: &str) -> String {
    s.trim().to_lowercase()
}
