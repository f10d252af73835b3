//! The in-memory session cache of the proxy hot path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use super::{Authenticated, SessionId};
use crate::store::{SessionRecord, User};

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
/// password or two-factor change, here or in another process), everything cached is dropped.
///
/// Entries are keyed by the exact signed cookie value, so a hit needs no signature check either: only a value that
/// verified once is ever stored.
#[derive(Default)]
pub struct SessionCache {
    map: RwLock<HashMap<Box<str>, Arc<Cached>>>,
    revision: AtomicU64,
}

/// What the cache knows about a session.
pub enum Lookup {
    /// Cached and current: the session, and whether last-seen is due a refresh (already marked done).
    Hit(Authenticated, bool),
    /// Not cached.
    Miss,
}

impl SessionCache {
    /// Looks up a raw cookie value, first dropping everything if the store's `revision` moved since it was filled.
    /// Last-seen is due a refresh every `touch_every` seconds.
    pub fn get(&self, raw: &str, revision: u64, now: u64, touch_every: u64) -> Lookup {
        if self.revision.load(Ordering::Acquire) != revision {
            let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
            map.clear();
            self.revision.store(revision, Ordering::Release);
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
        assert!(matches!(cache.get(raw, 7, 1000, 60), Lookup::Miss));
        cache.put(raw, &auth, 7);
        assert!(matches!(cache.get(raw, 7, 1010, 60), Lookup::Hit(_, false)));
        assert!(matches!(cache.get("signed-valuf", 7, 1010, 60), Lookup::Miss));
        // Last-seen refresh is due once per interval, and only to one caller.
        assert!(matches!(cache.get(raw, 7, 1000 + 60, 60), Lookup::Hit(_, true)));
        assert!(matches!(cache.get(raw, 7, 1000 + 60, 60), Lookup::Hit(_, false)));
        // A revocation anywhere (revision 8) empties the cache.
        assert!(matches!(cache.get(raw, 8, 1100, 60), Lookup::Miss));
        assert!(matches!(cache.get(raw, 8, 1100, 60), Lookup::Miss));
        // A value read under an old revision is not cached.
        cache.put(raw, &auth, 7);
        assert!(matches!(cache.get(raw, 8, 1100, 60), Lookup::Miss));
    }
}
