//! Sign-in as one state machine, pure and with time passed in (modelled on `credentials/lockout.rs`): what a
//! browser's sign-in has proved so far, which factors it may still present, and where it goes next. The portal's
//! handlers do the I/O (forms, hashes, the store) and ask [`State::after`] what follows; nothing else decides it.
//!
//! ```text
//!              PasswordRefused                       FactorRefused (the lockout counts it)
//!             ┌──────────┐                          ┌──────────┐
//!             ▼          │                          ▼          │
//!         Anonymous ─────┴─ PasswordAccepted ─┬─▶ Challenge { may } ──── FactorAccepted ───▶ SignedIn(Full)
//!             ▲                                │  (a factor is enrolled)
//!             │                                ├─▶ Enrol ─────────────── Enrolled ─────────▶ SignedIn(Full)
//!             │                                │  (none enrolled, two-factor required)
//!             │                                └────────────────────────────────────────────▶ SignedIn(Password)
//!             │                                   (none enrolled, two-factor optional)
//!             └──── Expired: Challenge or Enrol older than the pending lifetime (5 minutes)
//! ```
//!
//! A `Challenge` or `Enrol` state is what a `Pending` session stands for: it reaches only the challenge,
//! enrolment and logout pages. A new kind of factor is a new [`Factor`] and a field of [`Enrolled`].

use crate::store::{Level, SecondFactor, User};

/// A second factor a user can present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Factor {
    /// A code from an authenticator app (RFC 6238).
    Totp,
    /// One of the user's single-use recovery codes.
    RecoveryCode,
}

impl From<SecondFactor> for Factor {
    fn from(f: SecondFactor) -> Factor {
        match f {
            SecondFactor::Totp => Factor::Totp,
            SecondFactor::RecoveryCode => Factor::RecoveryCode,
        }
    }
}

/// The second factors a user has enrolled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Enrolled {
    /// An authenticator app.
    pub totp: bool,
    /// Unused recovery codes left.
    pub recovery_codes: usize,
}

impl Enrolled {
    /// What `user` has enrolled.
    pub fn of(user: &User) -> Enrolled {
        Enrolled { totp: user.factors.totp().is_some(), recovery_codes: user.factors.recovery.len() }
    }

    /// The factors that may be presented, in the order a page offers them.
    fn factors(self) -> Vec<Factor> {
        let mut may = Vec::new();
        if self.totp {
            may.push(Factor::Totp);
        }
        if self.recovery_codes > 0 {
            may.push(Factor::RecoveryCode);
        }
        may
    }
}

/// What the configuration asks of a sign-in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// `[two_factor] required`: a user without a second factor must enrol one before signing in.
    pub required: bool,
    /// How long the password step stays good for the rest of the sign-in (seconds).
    pub pending_lifetime: u64,
}

/// Where a sign-in stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Nothing proved yet.
    Anonymous,
    /// The password is verified at `since`; one of `may` is still due.
    Challenge {
        /// When the password was verified (unix seconds).
        since: u64,
        /// The factors the user may present.
        may: Vec<Factor>,
    },
    /// The password is verified at `since`; two-factor is required and none is enrolled: enrolment is due.
    Enrol {
        /// When the password was verified (unix seconds).
        since: u64,
    },
    /// Signed in at this level.
    SignedIn(Level),
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The password was right.
    PasswordAccepted,
    /// The password was wrong (or the account unknown or locked).
    PasswordRefused,
    /// A second factor was right.
    FactorAccepted(Factor),
    /// A second factor was wrong.
    FactorRefused,
    /// A second factor was enrolled and confirmed.
    Enrolled,
    /// Time passed (a page was asked for at `now`).
    Tick,
}

/// Where the browser goes for a state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The login page.
    Login,
    /// The second-factor challenge.
    Challenge,
    /// Enrolment of a second factor.
    Enrol,
    /// Where it was going (`rd`).
    Done,
}

impl State {
    /// The state of a stored session at `level` of a user with `enrolled` factors, as of `since` (the session's
    /// start).
    pub fn of_session(level: Level, enrolled: Enrolled, since: u64) -> State {
        match level {
            Level::Pending if enrolled.totp || enrolled.recovery_codes > 0 => {
                State::Challenge { since, may: enrolled.factors() }
            }
            Level::Pending => State::Enrol { since },
            level => State::SignedIn(level),
        }
    }

    /// The state after `event` at `now`, for a user with `enrolled` factors under `rules`.
    pub fn after(self, event: Event, enrolled: Enrolled, rules: Rules, now: u64) -> State {
        let expired = |since: u64| now >= since.saturating_add(rules.pending_lifetime);
        match (self, event) {
            (_, Event::PasswordRefused) => State::Anonymous,
            (_, Event::PasswordAccepted) => {
                let may = enrolled.factors();
                if !may.is_empty() {
                    State::Challenge { since: now, may }
                } else if rules.required {
                    State::Enrol { since: now }
                } else {
                    State::SignedIn(Level::Password)
                }
            }
            (State::Challenge { since, .. } | State::Enrol { since }, _) if expired(since) => State::Anonymous,
            (State::Challenge { may, .. }, Event::FactorAccepted(f)) if may.contains(&f) => {
                State::SignedIn(Level::Full)
            }
            // Enrolling from a password-only sign-in (settings) makes it a full one too.
            (State::Enrol { .. } | State::SignedIn(Level::Password), Event::Enrolled) => State::SignedIn(Level::Full),
            (state, _) => state,
        }
    }

    /// The session level that stands for this state (`None`: no session).
    pub fn level(&self) -> Option<Level> {
        match self {
            State::Anonymous => None,
            State::Challenge { .. } | State::Enrol { .. } => Some(Level::Pending),
            State::SignedIn(level) => Some(*level),
        }
    }

    /// Where the browser goes next.
    pub fn step(&self) -> Step {
        match self {
            State::Anonymous => Step::Login,
            State::Challenge { .. } => Step::Challenge,
            State::Enrol { .. } => Step::Enrol,
            State::SignedIn(_) => Step::Done,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: Rules = Rules { required: true, pending_lifetime: 300 };
    const OPTIONAL: Rules = Rules { required: false, pending_lifetime: 300 };
    const TOTP: Enrolled = Enrolled { totp: true, recovery_codes: 10 };
    const NONE: Enrolled = Enrolled { totp: false, recovery_codes: 0 };

    fn challenge(since: u64) -> State {
        State::Challenge { since, may: vec![Factor::Totp, Factor::RecoveryCode] }
    }

    #[test]
    fn a_password_for_an_enrolled_user_leads_to_the_challenge_with_every_enrolled_factor() {
        let s = State::Anonymous.after(Event::PasswordAccepted, TOTP, RULES, 100);
        assert_eq!(s, challenge(100));
        assert_eq!((s.level(), s.step()), (Some(Level::Pending), Step::Challenge));
        let codes_only = Enrolled { totp: false, recovery_codes: 3 };
        let s = State::Anonymous.after(Event::PasswordAccepted, codes_only, OPTIONAL, 100);
        assert_eq!(s, State::Challenge { since: 100, may: vec![Factor::RecoveryCode] });
    }

    #[test]
    fn a_password_without_a_factor_leads_to_enrolment_when_two_factor_is_required() {
        let s = State::Anonymous.after(Event::PasswordAccepted, NONE, RULES, 100);
        assert_eq!(s, State::Enrol { since: 100 });
        assert_eq!((s.level(), s.step()), (Some(Level::Pending), Step::Enrol));
    }

    #[test]
    fn a_password_without_a_factor_signs_in_when_two_factor_is_optional() {
        let s = State::Anonymous.after(Event::PasswordAccepted, NONE, OPTIONAL, 100);
        assert_eq!(s, State::SignedIn(Level::Password));
        assert_eq!((s.level(), s.step()), (Some(Level::Password), Step::Done));
    }

    #[test]
    fn a_refused_password_is_anonymous_from_any_state() {
        for s in [State::Anonymous, challenge(1), State::Enrol { since: 1 }, State::SignedIn(Level::Full)] {
            let after = s.after(Event::PasswordRefused, TOTP, RULES, 2);
            assert_eq!((after.level(), after.step()), (None, Step::Login));
        }
    }

    #[test]
    fn an_accepted_factor_completes_the_challenge() {
        for f in [Factor::Totp, Factor::RecoveryCode] {
            assert_eq!(challenge(100).after(Event::FactorAccepted(f), TOTP, RULES, 101), State::SignedIn(Level::Full));
        }
    }

    #[test]
    fn a_factor_the_challenge_did_not_offer_changes_nothing() {
        let s = State::Challenge { since: 100, may: vec![Factor::RecoveryCode] };
        assert_eq!(s.clone().after(Event::FactorAccepted(Factor::Totp), TOTP, RULES, 101), s);
    }

    #[test]
    fn a_refused_factor_keeps_the_challenge() {
        assert_eq!(challenge(100).after(Event::FactorRefused, TOTP, RULES, 101), challenge(100));
    }

    #[test]
    fn a_factor_or_an_enrolment_is_not_a_password() {
        // No state is skipped by a second factor or an enrolment without the password first.
        assert_eq!(State::Anonymous.after(Event::FactorAccepted(Factor::Totp), TOTP, RULES, 1), State::Anonymous);
        assert_eq!(State::Anonymous.after(Event::Enrolled, TOTP, RULES, 1), State::Anonymous);
    }

    #[test]
    fn enrolment_completes_a_pending_or_password_only_sign_in() {
        assert_eq!(State::Enrol { since: 100 }.after(Event::Enrolled, TOTP, RULES, 101), State::SignedIn(Level::Full));
        let s = State::SignedIn(Level::Password).after(Event::Enrolled, TOTP, OPTIONAL, 101);
        assert_eq!(s, State::SignedIn(Level::Full));
    }

    #[test]
    fn a_pending_step_expires_after_the_pending_lifetime() {
        assert_eq!(challenge(100).after(Event::Tick, TOTP, RULES, 399), challenge(100), "one second before");
        assert_eq!(challenge(100).after(Event::Tick, TOTP, RULES, 400), State::Anonymous);
        let late = challenge(100).after(Event::FactorAccepted(Factor::Totp), TOTP, RULES, 400);
        assert_eq!(late, State::Anonymous, "a right code after the lifetime doesn't sign in");
        assert_eq!(State::Enrol { since: 100 }.after(Event::Enrolled, NONE, RULES, 400), State::Anonymous);
    }

    #[test]
    fn a_signed_in_state_stays_on_ticks_and_factors() {
        let s = State::SignedIn(Level::Full);
        assert_eq!(s.clone().after(Event::Tick, TOTP, RULES, 10_000), s);
        assert_eq!(s.clone().after(Event::FactorRefused, TOTP, RULES, 10_000), s);
    }

    #[test]
    fn a_stored_session_maps_to_its_state() {
        assert_eq!(State::of_session(Level::Pending, TOTP, 5), challenge(5));
        assert_eq!(State::of_session(Level::Pending, NONE, 5), State::Enrol { since: 5 });
        assert_eq!(State::of_session(Level::Full, TOTP, 5), State::SignedIn(Level::Full));
    }
}
