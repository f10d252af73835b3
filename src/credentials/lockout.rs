//! Lockout: failures are counted per account and per client address within a window; reaching the limit locks
//! that step for a while (NIST SP 800-63B §5.2.2). Names that match no account are counted the same way, so a
//! lockout reveals nothing about which accounts exist.
//!
//! The rule is a pure state machine over one counter ([`FailureRule::next`]), time passed in; the store only keeps
//! the counter and applies the rule inside its transaction, the same on every backend:
//!
//! ```text
//!            fail (count < max)                 fail (count + 1 = max)
//!   Fresh ─────────────────────▶ Counting(n) ─────────────────────────▶ Locked(until = now + lockout)
//!     ▲                            │    ▲                                   │
//!     │  window passed (no lock)   │    └── fail: n + 1 ───┘                │ fail while locked: counted,
//!     └────────────────────────────┘                                        │ the lock is not extended
//!     ▲                                                                     │
//!     └──────── fail after `until` and the window: a new count from 1 ──────┘
//! ```
//! A success clears the account's counter ([`Lockout::succeed`]); an address counter only ages out.

use std::net::IpAddr;

use crate::config::Limits;
use crate::store::{Failures, Store, StoreError};

/// Parameters of a failure counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailureRule {
    /// Failures that trigger a lockout.
    pub max: u32,
    /// Counting window in seconds, from the first failure of a count.
    pub window: u64,
    /// Lockout length in seconds.
    pub lockout: u64,
}

impl FailureRule {
    /// The counter after one more failure at `now`.
    pub fn next(&self, prev: Option<Failures>, now: u64) -> Failures {
        let mut f = match prev {
            // Within the window, or still locked: the count goes on.
            Some(f) if now < f.window_start.saturating_add(self.window) || f.locked_until > now => f,
            _ => Failures { count: 0, window_start: now, locked_until: 0 },
        };
        f.count = f.count.saturating_add(1);
        if f.count >= self.max && f.locked_until <= now {
            f.locked_until = now.saturating_add(self.lockout);
        }
        f
    }

    /// Counts a failure under `key` in the store (one transaction) and returns the new counter.
    pub async fn count(&self, store: &Store, key: String, now: u64) -> Result<Failures, StoreError> {
        let rule = *self;
        store.update_failures(key, move |prev| rule.next(prev, now)).await
    }
}

/// Which step a counter guards; the second factor counts apart from the password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The password step.
    Password,
    /// The second-factor step.
    SecondFactor,
}

impl Step {
    fn tag(self) -> &'static str {
        match self {
            Step::Password => "pw",
            Step::SecondFactor => "2fa",
        }
    }
}

/// Counter key for an account (a normalised username, or the normalised name typed when none matched).
pub fn account_key(step: Step, account: &str) -> String {
    format!("{}:acct:{account}", step.tag())
}

/// Counter key for a client address.
pub fn address_key(step: Step, addr: IpAddr) -> String {
    format!("{}:addr:{addr}", step.tag())
}

/// The lockout rules from `[limits]`.
#[derive(Debug, Clone, Copy)]
pub struct Lockout {
    account: FailureRule,
    address: FailureRule,
}

impl Lockout {
    /// Rules from the config.
    pub fn new(limits: &Limits) -> Lockout {
        let rule = |max| FailureRule { max, window: limits.failure_window.secs(), lockout: limits.lockout.secs() };
        Lockout { account: rule(limits.max_failures), address: rule(limits.max_failures_per_address) }
    }

    /// Seconds until the step is unlocked for this account or address, if locked.
    pub async fn retry_after(
        &self,
        store: &Store,
        step: Step,
        account: &str,
        addr: IpAddr,
        now: u64,
    ) -> Result<Option<u64>, StoreError> {
        let keys = vec![account_key(step, account), address_key(step, addr)];
        Ok(store.locked_until(keys, now).await?.map(|until| until - now))
    }

    /// Counts a failure; returns the seconds of lockout if this failure (or an earlier one) locked the step.
    pub async fn fail(
        &self,
        store: &Store,
        step: Step,
        account: &str,
        addr: IpAddr,
        now: u64,
    ) -> Result<Option<u64>, StoreError> {
        let a = self.account.count(store, account_key(step, account), now).await?;
        let b = self.address.count(store, address_key(step, addr), now).await?;
        let until = a.locked_until.max(b.locked_until);
        Ok((until > now).then(|| until - now))
    }

    /// Resets the account's counter after a success.
    pub async fn succeed(&self, store: &Store, step: Step, account: &str) -> Result<(), StoreError> {
        store.clear_failures(account_key(step, account)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: FailureRule = FailureRule { max: 3, window: 60, lockout: 100 };

    /// Runs failures at the given times from a fresh counter; the counter after each.
    fn run(times: &[u64]) -> Vec<Failures> {
        let mut state = None;
        times
            .iter()
            .map(|&t| {
                let f = RULE.next(state, t);
                state = Some(f);
                f
            })
            .collect()
    }

    fn f(count: u32, window_start: u64, locked_until: u64) -> Failures {
        Failures { count, window_start, locked_until }
    }

    #[test]
    fn the_max_th_failure_in_the_window_locks() {
        assert_eq!(run(&[1000, 1001, 1002]), [f(1, 1000, 0), f(2, 1000, 0), f(3, 1000, 1102)]);
        assert_eq!(run(&[1000, 1001, 1059])[2].locked_until, 1159, "the last second of the window still counts");
    }

    #[test]
    fn failures_spread_past_the_window_start_a_new_count_and_never_lock() {
        let r = run(&[1000, 1001, 1060, 1061]);
        assert_eq!(r[2], f(1, 1060, 0), "the window (60 s from the first failure) had passed");
        assert_eq!(r[3], f(2, 1060, 0));
    }

    #[test]
    fn failures_while_locked_count_but_do_not_extend_the_lock() {
        let r = run(&[1000, 1001, 1002, 1090, 1101]);
        assert_eq!(r[3], f(4, 1000, 1102), "past the window but still locked: counted, same end");
        assert_eq!(r[4], f(5, 1000, 1102));
    }

    #[test]
    fn after_the_lock_and_the_window_counting_starts_again() {
        let r = run(&[1000, 1001, 1002, 1102, 1103, 1104]);
        assert_eq!(r[3], f(1, 1102, 0), "the lock ended at 1102: a fresh count");
        assert_eq!(r[5], f(3, 1102, 1204), "and a fresh lock at the max again");
    }

    #[test]
    fn a_max_of_one_locks_at_the_first_failure() {
        let rule = FailureRule { max: 1, ..RULE };
        assert_eq!(rule.next(None, 5), f(1, 5, 105));
    }
}
