//! Sessions: a signed cookie carrying a random id ([`cookie`]), a server-side record that is the truth (in the
//! store), an in-memory cache for the proxy hot path ([`cache`]), and [`Sessions`], the one service that creates,
//! rotates, authenticates, touches and ends them for the portal, the proxy paths, the admin pages and the CLI.

pub mod cache;
pub mod cookie;
mod service;

use std::sync::Arc;

pub use cache::{Lookup, SessionCache};
pub use cookie::{clear_cookie, cookie_values, csrf_binding, csrf_cookie, session_cookie, session_id};
pub use service::{CacheAnswer, MAX_SESSION_COOKIES, SessionError, Sessions};

use crate::keys::random_bytes;
use crate::store::{SessionRecord, User};

/// Lifetime of a password-only session from the password, in seconds (idle or not).
pub const PENDING_LIFETIME: u64 = 300;

/// How often last-seen is refreshed for a session with an idle limit of `idle` seconds: a tenth of it, between
/// 1 s and a minute, so a request with a valid session normally writes nothing and a busy session never looks
/// idle.
pub fn touch_interval(idle: u64) -> u64 {
    (idle / 10).clamp(1, 60)
}

/// A 256-bit session identifier.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SessionId(pub [u8; 32]);

impl std::fmt::Debug for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the id itself: it is a bearer credential.
        f.write_str("SessionId(..)")
    }
}

impl SessionId {
    /// A fresh id from the OS CSPRNG.
    pub fn random() -> Result<SessionId, crate::keys::KeyError> {
        random_bytes::<32>().map(SessionId)
    }
}

/// A request's verified session.
#[derive(Debug, Clone)]
pub struct Authenticated {
    /// Its id.
    pub id: SessionId,
    /// Its record.
    pub record: Arc<SessionRecord>,
    /// Its user, read in the same snapshot.
    pub user: Arc<User>,
}
