//! [`Sessions`]: the one place sessions are created, rotated, authenticated, touched and ended. The portal, both
//! proxy paths, the tunnel watcher, the admin pages and the CLI call it; none of them builds a session record or
//! checks expiry itself.

use std::net::IpAddr;
use std::sync::Arc;

use http::HeaderMap;

use super::{Authenticated, Lookup, PENDING_LIFETIME, SessionCache, SessionId, cookie, touch_interval};
use crate::clock::Clock;
use crate::config::{Secure, SessionConfig};
use crate::headers::Headers;
use crate::keys::{KeyError, Keys};
use crate::store::{Level, SessionRecord, Store, StoreError};

/// Why a session couldn't be started.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No random id could be drawn.
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// What the session cache says about a request.
pub enum CacheAnswer {
    /// A cached, still valid session.
    Hit(Authenticated),
    /// No session cookie, or its session just expired.
    NoSession,
    /// Not cached; the store has to be asked (at this revocation revision).
    Miss(u64),
}

/// The most session cookie values of one request that are looked at: the relay hands a request with more to the
/// handlers, which look at this many.
pub const MAX_SESSION_COOKIES: usize = 4;

/// Sessions over the store, with the cookie keys, the cache and the clock.
#[derive(Clone)]
pub struct Sessions {
    store: Store,
    keys: Keys,
    clock: Arc<dyn Clock>,
    cache: Arc<SessionCache>,
    cookie_name: String,
    idle: u64,
    max_lifetime: u64,
    secure: Secure,
}

impl Sessions {
    /// Sessions under `config` (the cache outlives config reloads, so it is passed in).
    pub fn new(
        store: Store,
        keys: Keys,
        clock: Arc<dyn Clock>,
        cache: Arc<SessionCache>,
        config: &SessionConfig,
    ) -> Sessions {
        Sessions {
            store,
            keys,
            clock,
            cache,
            cookie_name: config.cookie_name.0.clone(),
            idle: config.idle_timeout.secs(),
            max_lifetime: config.max_lifetime.secs(),
            secure: config.secure,
        }
    }

    /// The session cookie's name.
    pub fn cookie_name(&self) -> &str {
        &self.cookie_name
    }

    /// Whether cookies set for a client (over https or not) carry `Secure`.
    pub fn secure_cookies(&self, https: bool) -> bool {
        match self.secure {
            Secure::Always => true,
            Secure::Never => false,
            Secure::Auto => https,
        }
    }

    /// The `Set-Cookie` value that ends the session cookie in the browser.
    pub fn clear_cookie(&self, https: bool) -> String {
        cookie::clear_cookie(&self.cookie_name, self.secure_cookies(https))
    }

    /// Starts a session for `username` at `level` from `address`, replacing `replacing` in the same transaction
    /// (a new id at every level change: session fixation). Returns the id and its `Set-Cookie` value.
    pub async fn start(
        &self,
        username: &str,
        level: Level,
        address: IpAddr,
        replacing: Option<SessionId>,
        https: bool,
    ) -> Result<(SessionId, String), SessionError> {
        let now = self.clock.now();
        self.insert(username, level, now, address, replacing, https).await
    }

    /// Replaces a session with a new id at `level`; the absolute lifetime still counts from the password step.
    pub async fn rotate(
        &self,
        auth: &Authenticated,
        level: Level,
        address: IpAddr,
        https: bool,
    ) -> Result<(SessionId, String), SessionError> {
        self.insert(&auth.user.username, level, auth.record.created, address, Some(auth.id), https).await
    }

    async fn insert(
        &self,
        username: &str,
        level: Level,
        created: u64,
        address: IpAddr,
        replacing: Option<SessionId>,
        https: bool,
    ) -> Result<(SessionId, String), SessionError> {
        let id = SessionId::random()?;
        let record = SessionRecord {
            username: username.to_string(),
            level,
            created,
            last_seen: self.clock.now(),
            address: address.to_string(),
        };
        self.store.insert_session(id.0, record, replacing.map(|o| o.0)).await?;
        let set = cookie::session_cookie(&self.keys, &self.cookie_name, &id, self.secure_cookies(https));
        Ok((id, set))
    }

    /// Ends one session (sign-out).
    pub async fn end(&self, id: SessionId) -> Result<(), StoreError> {
        self.store.delete_session(id.0).await
    }

    /// Ends every session of a user (lock, password or two-factor change, deletion); returns how many.
    pub async fn revoke_user(&self, username: &str) -> Result<usize, StoreError> {
        self.store.revoke_sessions(username).await
    }

    /// The verified session of a request, if any. Expired or orphaned sessions count as none.
    /// Refreshes last-seen at most once per [`touch_interval`], off the request path.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Option<Authenticated>, StoreError> {
        for raw in cookie::cookie_values(headers, &self.cookie_name).take(MAX_SESSION_COOKIES) {
            if let Some(id) = cookie::verify_session_value(&self.keys, &self.cookie_name, raw)
                && let Some(auth) = self.load(id).await?
            {
                return Ok(Some(auth));
            }
        }
        Ok(None)
    }

    /// Reads a verified session id's record and user from the store and checks them.
    async fn load(&self, id: SessionId) -> Result<Option<Authenticated>, StoreError> {
        let Some((record, user)) = self.store.session_with_user(id.0).await? else {
            return Ok(None);
        };
        let auth = Authenticated { id, record: Arc::new(record), user: Arc::new(user) };
        let now = self.clock.now();
        if !self.still_valid(&auth, now) {
            return Ok(None);
        }
        if now >= auth.record.last_seen + self.touch_every() {
            self.touch(id, now);
        }
        Ok(Some(auth))
    }

    /// [`Sessions::authenticate`] through the in-memory cache: the proxy hot path. A hit costs a map lookup of
    /// the signed cookie value and a check of the in-memory revocation revision: no signature check, no store read.
    pub async fn authenticate_cached<H: Headers + ?Sized>(
        &self,
        headers: &H,
    ) -> Result<Option<Authenticated>, StoreError> {
        let revision = match self.cached(headers)? {
            CacheAnswer::Hit(auth) => return Ok(Some(auth)),
            CacheAnswer::NoSession => return Ok(None),
            CacheAnswer::Miss(revision) => revision,
        };
        self.first_valid(cookie::cookie_values(headers, &self.cookie_name), revision).await
    }

    /// The session of the first of `raws` (session cookie values as sent, at most [`MAX_SESSION_COOKIES`]) that
    /// verifies and is valid in the store, cached under that value at `revision`. Every value is tried, as a
    /// browser may send a stale cookie (a logged-out session of a parent path or domain) before the live one.
    async fn first_valid<'a>(
        &self,
        raws: impl Iterator<Item = &'a str>,
        revision: u64,
    ) -> Result<Option<Authenticated>, StoreError> {
        for raw in raws.take(MAX_SESSION_COOKIES) {
            if let Some(id) = cookie::verify_session_value(&self.keys, &self.cookie_name, raw)
                && let Some(auth) = self.load_into_cache(id, raw, revision).await?
            {
                return Ok(Some(auth));
            }
        }
        Ok(None)
    }

    /// Reads a session whose cookie value `raw` verified, and caches it under that value at `revision`.
    async fn load_into_cache(
        &self,
        id: SessionId,
        raw: &str,
        revision: u64,
    ) -> Result<Option<Authenticated>, StoreError> {
        // Verified once by the caller; the store read doesn't check the signature again.
        let found = self.load(id).await?;
        if let Some(auth) = &found {
            self.cache.put(raw, auth, revision);
        }
        Ok(found)
    }

    /// After a cache miss ([`CacheAnswer::Miss`] at `revision`), reads the session of the first of `raws` (session
    /// cookie values as sent) that verifies and caches it: the store read the hyper path would make, so the relay
    /// can answer the request itself instead of handing its connection away. True if a session was cached.
    pub async fn warm(&self, raws: &[String], revision: u64) -> Result<bool, StoreError> {
        Ok(self.first_valid(raws.iter().map(String::as_str), revision).await?.is_some())
    }

    /// The cache's part of [`Sessions::authenticate_cached`]: synchronous, so the relay can ask it in passing.
    pub fn cached<H: Headers + ?Sized>(&self, headers: &H) -> Result<CacheAnswer, StoreError> {
        self.cached_of(cookie::cookie_values(headers, &self.cookie_name))
    }

    /// [`Sessions::cached`] for the session cookie values already picked from the request.
    pub fn cached_of<'a>(&self, raws: impl Iterator<Item = &'a str>) -> Result<CacheAnswer, StoreError> {
        let mut raws = raws.peekable();
        if raws.peek().is_none() {
            return Ok(CacheAnswer::NoSession);
        }
        let revision = self.store.revision()?;
        self.cache.advance(revision, |from, to| self.store.revoked_between(from, to));
        let now = self.clock.now();
        for raw in raws {
            if let Lookup::Hit(auth, touch_due) = self.cache.get(raw, revision, now, self.touch_every()) {
                let (idle, max_lifetime) = self.limits(auth.record.level);
                if auth.record.expired(now, idle, max_lifetime) && !auth.user.locked {
                    // The cached last-seen knows only this process's requests; a tunnel's traffic or another
                    // instance may have refreshed it since: the store decides.
                    self.cache.remove(raw);
                    return Ok(CacheAnswer::Miss(revision));
                }
                if !self.still_valid(&auth, now) {
                    // A later cookie value may still be a valid session (every value is tried, as in the store).
                    self.cache.remove(raw);
                    continue;
                }
                if touch_due {
                    self.touch(auth.id, now);
                }
                return Ok(CacheAnswer::Hit(auth));
            }
        }
        Ok(CacheAnswer::Miss(revision))
    }

    /// A tunnel's session, looked at again (see [`crate::proxy::tunnels`]): `Ok(when to look next)` while it is
    /// valid; `Err(why not)` when it ended, expired, or can't be read (fail closed).
    pub async fn recheck(&self, id: SessionId, now: u64) -> Result<u64, &'static str> {
        let (record, user) = match self.store.session_with_user(id.0).await {
            Ok(Some(found)) => found,
            Ok(None) => return Err("revoked"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot check a tunnel's session; closing the tunnel");
                return Err("its session could not be read");
            }
        };
        let auth = Authenticated { id, record: Arc::new(record), user: Arc::new(user) };
        let (_, max_lifetime) = self.limits(auth.record.level);
        let why = if auth.user.locked {
            "account locked"
        } else if now >= auth.record.created.saturating_add(max_lifetime) {
            "absolute limit"
        } else {
            "idle limit"
        };
        if self.still_valid(&auth, now) { Ok(self.due(&auth.record)) } else { Err(why) }
    }

    /// Refreshes a session's last-seen to `at` for use that isn't a request (a tunnel's traffic), now.
    pub async fn refresh(&self, id: SessionId, at: u64) {
        if let Err(e) = self.store.touch_session(id.0, at).await {
            tracing::warn!(error = %e, "could not refresh session last-seen");
        }
    }

    /// When a session reaches its idle or absolute limit, as its record stands (unix seconds).
    pub fn due(&self, record: &SessionRecord) -> u64 {
        let (idle, max_lifetime) = self.limits(record.level);
        record.created.saturating_add(max_lifetime).min(record.last_seen.saturating_add(idle))
    }

    /// The idle and absolute limits of a session at `level` (seconds). A password-only (pending) session exists
    /// just to finish the login: it ends [`PENDING_LIFETIME`] after the password, however it is used.
    fn limits(&self, level: Level) -> (u64, u64) {
        match level {
            Level::Pending => (self.idle.min(PENDING_LIFETIME), self.max_lifetime.min(PENDING_LIFETIME)),
            _ => (self.idle, self.max_lifetime),
        }
    }

    /// Checks idle and absolute expiry and the lock flag; an invalid session is deleted.
    fn still_valid(&self, auth: &Authenticated, now: u64) -> bool {
        let (idle, max_lifetime) = self.limits(auth.record.level);
        if auth.record.expired(now, idle, max_lifetime) || auth.user.locked {
            self.forget(auth.id);
            return false;
        }
        true
    }

    /// The sessions' clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// How often a session's last-seen is refreshed (from the idle limit).
    pub fn touch_every(&self) -> u64 {
        touch_interval(self.idle)
    }

    /// Refreshes last-seen in the background.
    fn touch(&self, id: SessionId, now: u64) {
        let store = self.store.clone();
        tokio::spawn(async move {
            if let Err(e) = store.touch_session(id.0, now).await {
                tracing::warn!(error = %e, "could not refresh session last-seen");
            }
        });
    }

    /// Deletes a session in the background (it is already treated as gone).
    pub fn forget(&self, id: SessionId) {
        let store = self.store.clone();
        tokio::spawn(async move {
            if let Err(e) = store.delete_session(id.0).await {
                tracing::warn!(error = %e, "could not delete an expired session");
            }
        });
    }
}
