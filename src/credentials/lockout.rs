//! Lockout: failures are counted per account and per client address within a window; reaching the limit locks
//! that step for a while (NIST SP 800-63B §5.2.2). Names that match no account are counted the same way, so a
//! lockout reveals nothing about which accounts exist.

use std::net::IpAddr;

use crate::config::Limits;
use crate::store::{FailureRule, Store, StoreError};

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
        let a = store.register_failure(account_key(step, account), now, self.account).await?;
        let b = store.register_failure(address_key(step, addr), now, self.address).await?;
        let until = a.locked_until.max(b.locked_until);
        Ok((until > now).then(|| until - now))
    }

    /// Resets the account's counter after a success.
    pub async fn succeed(&self, store: &Store, step: Step, account: &str) -> Result<(), StoreError> {
        store.clear_failures(account_key(step, account)).await
    }
}
