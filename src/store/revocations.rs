//! The revocation journal: what each step of the revocation revision ended, so a session cache drops just that
//! instead of everything.
//!
//! Both backends write one journal row in the transaction that bumps the revision (the row's key is the new
//! revision), and read the rows past the revision they knew whenever they see it move: redb when it re-reads the
//! file's revision, PostgreSQL after its own writes and on every NOTIFY or poll. What they read lands in a
//! [`Journal`] in memory; the cache asks it for the steps between the revision it was filled at and the current
//! one. A step that is missing (written by an older binary, pruned, or not read yet) means "anything may have
//! ended": the cache empties as before. So a journal can only make the cache keep *fewer* entries than it may.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Journal rows kept in the store and in memory; a cache further behind than this empties.
pub const JOURNAL_KEEP: u64 = 1024;

/// Layout version of a journal row.
const V1: u8 = 1;

/// What one revision step ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoked {
    /// Unknown, or too much to name: every cached session goes.
    Everything,
    /// Every session of a user (lock, password or two-factor change, deletion): their entries go, whichever
    /// session they were.
    User(String),
    /// These sessions (sign-out, rotation, expiry).
    Sessions(Vec<[u8; 32]>),
}

impl Revoked {
    /// Whether a cached session `id` of `username` has to go.
    pub fn covers(&self, id: &[u8; 32], username: &str) -> bool {
        match self {
            Revoked::Everything => true,
            Revoked::User(u) => u == username,
            Revoked::Sessions(ids) => ids.contains(id),
        }
    }

    /// The stored form: version byte, kind, then the name or the ids.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![V1];
        match self {
            Revoked::Everything => out.push(0),
            Revoked::User(u) => {
                out.push(1);
                out.extend_from_slice(u.as_bytes());
            }
            Revoked::Sessions(ids) => {
                out.push(2);
                for id in ids {
                    out.extend_from_slice(id);
                }
            }
        }
        out
    }

    /// Reads a stored row; anything unreadable counts as [`Revoked::Everything`] (fail closed).
    pub fn decode(bytes: &[u8]) -> Revoked {
        match bytes {
            [V1, 1, name @ ..] => match std::str::from_utf8(name) {
                Ok(u) => Revoked::User(u.to_string()),
                Err(_) => Revoked::Everything,
            },
            [V1, 2, ids @ ..] if ids.len() % 32 == 0 => {
                Revoked::Sessions(ids.chunks_exact(32).filter_map(|c| <[u8; 32]>::try_from(c).ok()).collect())
            }
            _ => Revoked::Everything,
        }
    }
}

/// The journal steps a process has read, by the revision each one made.
#[derive(Default)]
pub struct Journal {
    steps: Mutex<BTreeMap<u64, Revoked>>,
}

impl Journal {
    /// Notes that the step to `revision` ended `what` (read again, it is the same step).
    pub fn record(&self, revision: u64, what: Revoked) {
        let mut steps = self.steps.lock().unwrap_or_else(|p| p.into_inner());
        steps.insert(revision, what);
        while steps.len() as u64 > JOURNAL_KEEP {
            steps.pop_first();
        }
    }

    /// What the steps after `from` up to and including `to` ended; `None` when any of them is unknown.
    pub fn between(&self, from: u64, to: u64) -> Option<Vec<Revoked>> {
        if to <= from || to - from > JOURNAL_KEEP {
            return None;
        }
        let steps = self.steps.lock().unwrap_or_else(|p| p.into_inner());
        (from + 1..=to).map(|r| steps.get(&r).cloned()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_read_back_as_written_and_unreadable_rows_revoke_everything() {
        for what in [Revoked::Everything, Revoked::User("alice".into()), Revoked::Sessions(vec![[1; 32], [2; 32]])] {
            assert_eq!(Revoked::decode(&what.encode()), what);
        }
        for bad in [&[][..], &[V1], &[9, 1, b'a'], &[V1, 2, 1, 2, 3], &[V1, 1, 0xff], &[V1, 7]] {
            assert_eq!(Revoked::decode(bad), Revoked::Everything, "{bad:?}");
        }
    }

    #[test]
    fn a_gap_or_a_long_way_behind_means_unknown() {
        let j = Journal::default();
        j.record(5, Revoked::User("a".into()));
        j.record(6, Revoked::Sessions(vec![[6; 32]]));
        j.record(8, Revoked::User("b".into()));
        assert_eq!(j.between(4, 6), Some(vec![Revoked::User("a".into()), Revoked::Sessions(vec![[6; 32]])]));
        assert_eq!(j.between(5, 8), None, "step 7 is unknown");
        assert_eq!(j.between(7, 8), Some(vec![Revoked::User("b".into())]));
        assert_eq!(j.between(8, 8), None, "no step");
        assert_eq!(j.between(0, JOURNAL_KEEP + 1), None);
        for r in 10..10 + JOURNAL_KEEP + 5 {
            j.record(r, Revoked::Everything);
        }
        assert_eq!(j.between(9, 11), None, "pruned: the oldest steps are gone");
        assert!(j.between(20, 30).is_some());
        assert!(Revoked::User("a".into()).covers(&[0; 32], "a"));
        assert!(!Revoked::User("a".into()).covers(&[0; 32], "b"));
        assert!(Revoked::Sessions(vec![[3; 32]]).covers(&[3; 32], "x"));
        assert!(!Revoked::Sessions(vec![[3; 32]]).covers(&[4; 32], "x"));
    }
}
