//! Idle upstream connections, kept private to the identity that last used them.
//!
//! An app can send bytes past the end of an answer: a body on a HEAD answer or on a 204/304, a second answer
//! after the first, or such bytes arriving late. On a connection re-used for someone else's request, those bytes
//! would be read as *their* answer, so one user would get a page made for another. So a connection is only ever
//! re-used for the same identity ([`Affinity`]): the same user, or anonymous (bypass) traffic among itself. An app
//! known to frame its answers correctly may opt into shared re-use (`[[app]] shared_connections = true`).
//!
//! The pool of an app holds at most `max_idle` connections in all, whoever they belong to; the oldest goes first
//! (legacy apps often take few connections).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::store::User;

/// How long an idle upstream connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Whose requests an upstream connection may carry.
#[derive(Debug, Clone)]
pub enum Affinity {
    /// Anyone's: the app opted into shared re-use.
    Shared,
    /// Requests without an identity (bypass paths).
    Anonymous,
    /// One user's requests (any of their sessions).
    User(Arc<User>),
}

impl Affinity {
    /// The affinity of a request to `app` from `user` (none: a bypass path).
    pub fn of(shared: bool, user: Option<&Arc<User>>) -> Affinity {
        match (shared, user) {
            (true, _) => Affinity::Shared,
            (false, None) => Affinity::Anonymous,
            (false, Some(u)) => Affinity::User(u.clone()),
        }
    }

    fn same(&self, other: &Affinity) -> bool {
        match (self, other) {
            (Affinity::Shared, Affinity::Shared) | (Affinity::Anonymous, Affinity::Anonymous) => true,
            (Affinity::User(a), Affinity::User(b)) => Arc::ptr_eq(a, b) || a.username == b.username,
            _ => false,
        }
    }
}

/// The idle connections of one app, newest last.
pub struct IdlePool<T> {
    idle: Mutex<VecDeque<Idle<T>>>,
    max: usize,
}

struct Idle<T> {
    who: Affinity,
    conn: T,
    since: Instant,
}

impl<T> IdlePool<T> {
    /// A pool of at most `max` idle connections.
    pub fn new(max: usize) -> IdlePool<T> {
        IdlePool { idle: Mutex::new(VecDeque::new()), max }
    }

    /// The most recently used idle connection of `who` that is not too old and that `usable` accepts (it is
    /// dropped otherwise).
    pub fn checkout(&self, who: &Affinity, now: Instant, mut usable: impl FnMut(&mut T) -> bool) -> Option<T> {
        loop {
            let mut conn = {
                let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                while idle.front().is_some_and(|i| now.saturating_duration_since(i.since) >= IDLE_TIMEOUT) {
                    idle.pop_front();
                }
                let at = idle.iter().rposition(|i| i.who.same(who))?;
                idle.remove(at)?.conn
            };
            if usable(&mut conn) {
                return Some(conn);
            }
        }
    }

    /// Keeps an idle connection of `who`, dropping the oldest when the pool is full.
    pub fn checkin(&self, who: Affinity, conn: T) {
        if self.max == 0 {
            return;
        }
        // Read now, not taken from the request: after a long body, an earlier time would break the newest-last
        // order `checkout` relies on.
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while idle.front().is_some_and(|i| now.saturating_duration_since(i.since) >= IDLE_TIMEOUT)
            || idle.len() >= self.max
        {
            idle.pop_front();
        }
        idle.push_back(Idle { who, conn, since: now });
    }

    /// How many connections are idle.
    pub fn len(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether none is idle.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> Arc<User> {
        Arc::new(User::new(name, &format!("{name}@x"), name, Vec::new(), String::new(), 0))
    }

    #[test]
    fn a_connection_goes_back_only_to_the_identity_that_used_it() {
        let pool = IdlePool::new(8);
        let (alice, bob) = (Affinity::User(user("alice")), Affinity::User(user("bob")));
        pool.checkin(alice.clone(), 1);
        pool.checkin(Affinity::Anonymous, 2);
        let now = Instant::now();
        assert_eq!(pool.checkout(&bob, now, |_| true), None);
        assert_eq!(pool.checkout(&Affinity::Shared, now, |_| true), None);
        // Another session of the same user (another Arc) is the same identity.
        assert_eq!(pool.checkout(&Affinity::User(user("alice")), now, |_| true), Some(1));
        assert_eq!(pool.checkout(&alice, now, |_| true), None);
        assert_eq!(pool.checkout(&Affinity::Anonymous, now, |_| true), Some(2));
        pool.checkin(Affinity::Shared, 3);
        assert_eq!(pool.checkout(&Affinity::Shared, now, |_| true), Some(3));
    }

    #[test]
    fn the_pool_is_bounded_in_all_and_old_or_unusable_connections_are_dropped() {
        let pool = IdlePool::new(3);
        for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
            pool.checkin(Affinity::User(user(name)), i);
        }
        assert_eq!(pool.len(), 3);
        let now = Instant::now();
        assert_eq!(pool.checkout(&Affinity::User(user("a")), now, |_| true), None, "the oldest went first");
        assert_eq!(pool.checkout(&Affinity::User(user("b")), now, |_| false), None, "unusable: dropped");
        assert_eq!(pool.len(), 2);
        let later = now + IDLE_TIMEOUT + Duration::from_secs(1);
        assert_eq!(pool.checkout(&Affinity::User(user("c")), later, |_| true), None, "too old");
        assert!(pool.is_empty());
    }
}
