//! Sessions: a signed cookie carrying a random id, and a server-side record that is the truth.
//!
//! The cookie value is `sess1.<64 hex>` signed by the cookie crate (HMAC-SHA256). The signature doesn't cover the
//! cookie's name, so the purpose tag inside the value keeps a CSRF cookie from passing as a session.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use cookie::{Cookie, CookieJar, SameSite};
use http::HeaderMap;

use crate::headers::Headers;
use crate::keys::{Keys, random_bytes};
use crate::store::{SessionRecord, User};

/// Purpose tag of a session cookie value.
const SESSION_TAG: &str = "sess1.";
/// Purpose tag of the anonymous CSRF cookie value.
const CSRF_TAG: &str = "csrf1.";
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

/// Whether a record has passed its idle or absolute limit at `now`.
pub fn expired(rec: &SessionRecord, now: u64, idle: u64, max_lifetime: u64) -> bool {
    now >= rec.created.saturating_add(max_lifetime) || now >= rec.last_seen.saturating_add(idle)
}

/// Signs `value` as the cookie `name` and returns the signed value.
fn sign(keys: &Keys, name: &str, value: String) -> String {
    let mut jar = CookieJar::new();
    jar.signed_mut(&keys.cookie).add(Cookie::new(name.to_string(), value));
    jar.get(name).map(|c| c.value().to_string()).unwrap_or_default()
}

/// Verifies a signed cookie value; `None` if the signature is wrong.
fn verify(keys: &Keys, name: &str, raw: &str) -> Option<String> {
    let mut jar = CookieJar::new();
    jar.add_original(Cookie::new(name.to_string(), raw.to_string()));
    jar.signed(&keys.cookie).get(name).map(|c| c.value().to_string())
}

/// All values of the cookie `name` in the request's Cookie headers.
pub fn cookie_values<'a, H: Headers + ?Sized>(headers: &'a H, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    crate::headers::cookie_pairs(headers)
        .filter(move |(k, _)| *k == name)
        .filter_map(|(_, pair)| crate::headers::cookie_value(pair))
}

fn decode_tagged<const N: usize>(value: &str, tag: &str) -> Option<[u8; N]> {
    let hex_part = value.strip_prefix(tag)?;
    let bytes = hex::decode(hex_part).ok()?;
    bytes.try_into().ok()
}

/// The session id from the request's session cookie, if one verifies. Malformed means "no session".
pub fn session_id(keys: &Keys, headers: &HeaderMap, name: &str) -> Option<SessionId> {
    session_id_raw(keys, headers, name).map(|(id, _)| id)
}

/// [`session_id`], with the raw cookie value that verified.
pub fn session_id_raw<'h, H: Headers + ?Sized>(
    keys: &Keys,
    headers: &'h H,
    name: &'h str,
) -> Option<(SessionId, &'h str)> {
    cookie_values(headers, name).find_map(|raw| {
        let v = verify(keys, name, raw)?;
        decode_tagged::<32>(&v, SESSION_TAG).map(|id| (SessionId(id), raw))
    })
}

/// The anonymous CSRF binding from the request's CSRF cookie, if one verifies.
pub fn csrf_binding(keys: &Keys, headers: &HeaderMap, name: &str) -> Option<[u8; 32]> {
    cookie_values(headers, name)
        .filter_map(|raw| verify(keys, name, raw))
        .find_map(|v| decode_tagged::<32>(&v, CSRF_TAG))
}

/// Attributes shared by every cookie the gateway sets.
fn build(name: &str, value: String, secure: bool) -> Cookie<'static> {
    Cookie::build((name.to_string(), value)).http_only(true).same_site(SameSite::Lax).path("/").secure(secure).build()
}

/// `Set-Cookie` value for a session id.
pub fn session_cookie(keys: &Keys, name: &str, id: &SessionId, secure: bool) -> String {
    let value = sign(keys, name, format!("{SESSION_TAG}{}", hex::encode(id.0)));
    build(name, value, secure).to_string()
}

/// `Set-Cookie` value for an anonymous CSRF binding.
pub fn csrf_cookie(keys: &Keys, name: &str, binding: &[u8; 32], secure: bool) -> String {
    let value = sign(keys, name, format!("{CSRF_TAG}{}", hex::encode(binding)));
    build(name, value, secure).to_string()
}

/// `Set-Cookie` value that deletes a cookie.
pub fn clear_cookie(name: &str, secure: bool) -> String {
    let mut c = build(name, String::new(), secure);
    c.make_removal();
    c.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(cookie: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::COOKIE, HeaderValue::from_str(cookie).unwrap());
        h
    }

    fn value_of(set_cookie: &str) -> String {
        let c = Cookie::parse(set_cookie.to_string()).unwrap();
        c.value().to_string()
    }

    #[test]
    fn session_cookie_round_trips() {
        let keys = Keys::from_master(&[1; 64]);
        let id = SessionId([9; 32]);
        let v = value_of(&session_cookie(&keys, "s", &id, false));
        assert_eq!(session_id(&keys, &headers(&format!("other=1; s={v}")), "s"), Some(id));
    }

    #[test]
    fn mutated_cookies_are_no_session() {
        let keys = Keys::from_master(&[1; 64]);
        let v = value_of(&session_cookie(&keys, "s", &SessionId([9; 32]), false));
        let mut flipped = v.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
        let other = Keys::from_master(&[2; 64]);
        let foreign = value_of(&session_cookie(&other, "s", &SessionId([9; 32]), false));
        let csrf = value_of(&csrf_cookie(&keys, "s", &[9; 32], false));
        for bad in [
            String::from_utf8(flipped).unwrap(),
            v[..v.len() - 2].to_string(),
            v[10..].to_string(),
            String::new(),
            "garbage".into(),
            foreign,
            csrf,
        ] {
            assert_eq!(session_id(&keys, &headers(&format!("s={bad}")), "s"), None, "{bad}");
        }
    }

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
        let user: User = serde_json::from_value(serde_json::json!({
            "username": "a", "email": "a@x", "display_name": "A", "groups": [], "password_hash": "",
            "locked": false, "created": 0, "last_login": null, "two_factor": null
        }))
        .unwrap();
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

    #[test]
    fn expiry_is_idle_or_absolute() {
        let rec = SessionRecord {
            username: "a".into(),
            level: crate::store::Level::Full,
            created: 1000,
            last_seen: 1500,
            address: String::new(),
        };
        assert!(!expired(&rec, 1599, 100, 1000));
        assert!(expired(&rec, 1600, 100, 1000));
        assert!(expired(&rec, 2000, 10_000, 1000));
    }
}
