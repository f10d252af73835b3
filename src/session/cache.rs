//! The in-memory session cache of the proxy hot path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use prometheus_client::metrics::counter::Counter;

use super::{Authenticated, SessionId};
use crate::store::{Revoked, SessionRecord, User};

/// Most sessions the cache holds before it starts over (bounds memory under a flood of distinct cookies).
const CACHE_LIMIT: usize = 100_000;

/// One cached session.
struct Cached {
    id: SessionId,
    record: Arc<SessionRecord>,
    user: Arc<User>,
    /// Last-seen as this process last wrote it (the record's copy may be older).
    last_seen: AtomicU64,
}

/// In-memory session lookups for the proxy hot path, so a request with a valid session touches no database
/// table but one small revision counter. Whenever the store's revocation revision moves (logout, lock,
/// password or two-factor change, here or in another process), the cache drops what the journal says those steps
/// ended ([`crate::store::revocations`]): one session, or one user's; everything when a step is unknown.
///
/// Entries are keyed by the exact signed cookie value, so a hit needs no signature check either: only a value that
/// verified once is ever stored.
#[derive(Default)]
pub struct SessionCache {
    map: RwLock<HashMap<Box<str>, Arc<Cached>>>,
    revision: AtomicU64,
    /// Counts sessions stored after a store read.
    fills: Counter,
    /// Counts full empties.
    flushes: Counter,
}

/// What the cache knows about a session.
pub enum Lookup {
    /// Cached and current: the session, and whether last-seen is due a refresh (already marked done).
    Hit(Authenticated, bool),
    /// Not cached.
    Miss,
}

impl SessionCache {
    /// An empty cache that counts its fills and full empties on these metrics.
    pub fn new(fills: Counter, flushes: Counter) -> SessionCache {
        SessionCache { fills, flushes, ..SessionCache::default() }
    }

    /// Brings the cache to the store's `revision`: drops the entries that the steps since the one it holds
    /// ended, as `steps(from, to)` names them, or everything when it can't (`None`). A revision older than the
    /// one held (read by a slower thread) changes nothing.
    pub fn advance(&self, revision: u64, steps: impl FnOnce(u64, u64) -> Option<Vec<Revoked>>) {
        if self.revision.load(Ordering::Acquire) == revision {
            return;
        }
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        let from = self.revision.load(Ordering::Acquire);
        if revision <= from {
            return;
        }
        match steps(from, revision) {
            Some(ended) => map.retain(|_, c| !ended.iter().any(|e| e.covers(&c.id.0, &c.user.username))),
            None => {
                map.clear();
                self.flushes.inc();
            }
        }
        self.revision.store(revision, Ordering::Release);
    }

    /// Looks up a raw cookie value at the store's `revision` (a miss unless the cache was [`advance`d] to it).
    /// Last-seen is due a refresh every `touch_every` seconds.
    ///
    /// [`advance`d]: SessionCache::advance
    pub fn get(&self, raw: &str, revision: u64, now: u64, touch_every: u64) -> Lookup {
        if self.revision.load(Ordering::Acquire) != revision {
            return Lookup::Miss;
        }
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        let Some(c) = map.get(raw) else {
            return Lookup::Miss;
        };
        let seen = c.last_seen.load(Ordering::Relaxed);
        let due = now >= seen + touch_every
            && c.last_seen.compare_exchange(seen, now, Ordering::Relaxed, Ordering::Relaxed).is_ok();
        let mut record = c.record.clone();
        if seen > record.last_seen {
            Arc::make_mut(&mut record).last_seen = seen;
        }
        Lookup::Hit(Authenticated { id: c.id, record, user: c.user.clone() }, due)
    }

    /// Remembers a session, read from the store while it was at `revision`, under the cookie value that verified.
    pub fn put(&self, raw: &str, auth: &Authenticated, revision: u64) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if self.revision.load(Ordering::Acquire) != revision {
            return;
        }
        if map.len() >= CACHE_LIMIT {
            map.clear();
        }
        let cached = Cached {
            id: auth.id,
            record: auth.record.clone(),
            user: auth.user.clone(),
            last_seen: AtomicU64::new(auth.record.last_seen),
        };
        map.insert(raw.into(), Arc::new(cached));
        self.fills.inc();
    }

    /// Forgets one cookie value (its session expired).
    pub fn remove(&self, raw: &str) {
        self.map.write().unwrap_or_else(|p| p.into_inner()).remove(raw);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_drops_everything_when_the_revision_moves() {
        let cache = SessionCache::default();
        let id = SessionId([4; 32]);
        let record = SessionRecord {
            username: "a".into(),
            level: crate::store::Level::Full,
            created: 1000,
            last_seen: 1000,
            address: String::new(),
        };
        let user = User::new("a", "a@x", "A", Vec::new(), String::new(), 0);
        let auth = Authenticated { id, record: Arc::new(record), user: Arc::new(user) };
        let raw = "signed-value";
        cache.advance(7, |_, _| None);
        assert!(matches!(cache.get(raw, 7, 1000, 60), Lookup::Miss));
        cache.put(raw, &auth, 7);
        assert!(matches!(cache.get(raw, 7, 1010, 60), Lookup::Hit(_, false)));
        assert!(matches!(cache.get("signed-valuf", 7, 1010, 60), Lookup::Miss));
        // Last-seen refresh is due once per interval, and only to one caller.
        assert!(matches!(cache.get(raw, 7, 1000 + 60, 60), Lookup::Hit(_, true)));
        assert!(matches!(cache.get(raw, 7, 1000 + 60, 60), Lookup::Hit(_, false)));
        // A revocation step the journal doesn't name (revision 8) empties the cache.
        cache.advance(8, |_, _| None);
        assert!(matches!(cache.get(raw, 8, 1100, 60), Lookup::Miss));
        // A value read under an old revision is not cached.
        cache.put(raw, &auth, 7);
        assert!(matches!(cache.get(raw, 8, 1100, 60), Lookup::Miss));
    }

    fn entry(name: &str, id: u8) -> Authenticated {
        let record = SessionRecord {
            username: name.into(),
            level: crate::store::Level::Full,
            created: 1000,
            last_seen: 1000,
            address: String::new(),
        };
        let user = User::new(name, &format!("{name}@x"), name, Vec::new(), String::new(), 0);
        Authenticated { id: SessionId([id; 32]), record: Arc::new(record), user: Arc::new(user) }
    }

    #[test]
    fn named_revocations_drop_only_what_they_name() {
        let cache = SessionCache::default();
        cache.advance(1, |_, _| None);
        for (raw, name, id) in [("a1", "alice", 1), ("a2", "alice", 2), ("b1", "bob", 3), ("c1", "carol", 4)] {
            cache.put(raw, &entry(name, id), 1);
        }
        let hit = |raw: &str, revision| matches!(cache.get(raw, revision, 1000, 60), Lookup::Hit(..));
        // Steps 2 and 3: bob's session 3 signed out, then all of alice's sessions ended.
        let mut asked = None;
        cache.advance(3, |from, to| {
            asked = Some((from, to));
            Some(vec![Revoked::Sessions(vec![[3; 32]]), Revoked::User("alice".into())])
        });
        assert_eq!(asked, Some((1, 3)), "the steps since the revision the cache holds");
        assert!(!hit("a1", 3) && !hit("a2", 3) && !hit("b1", 3));
        assert!(hit("c1", 3), "carol's session is untouched");
        // An older revision (a slower reader's) changes nothing; the same one asks nothing.
        cache.advance(2, |_, _| panic!("not asked"));
        cache.advance(3, |_, _| panic!("not asked"));
        assert!(hit("c1", 3));
    }
}
