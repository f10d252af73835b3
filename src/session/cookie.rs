//! The session and CSRF cookies: `sess1.<64 hex>` / `csrf1.<64 hex>` signed by the cookie crate (HMAC-SHA256).
//! The signature doesn't cover the cookie's name, so the purpose tag inside the value keeps a CSRF cookie from
//! passing as a session.

use cookie::{Cookie, CookieJar, SameSite};
use http::HeaderMap;

use super::SessionId;
use crate::headers::Headers;
use crate::keys::Keys;

/// Purpose tag of a session cookie value.
const SESSION_TAG: &str = "sess1.";
/// Purpose tag of the anonymous CSRF cookie value.
const CSRF_TAG: &str = "csrf1.";

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

/// The session id of the first session cookie value that verifies (the fuzz target's entry point; the session
/// service tries every value, [`crate::session::Sessions::authenticate`]). Malformed means "no session".
pub fn session_id(keys: &Keys, headers: &HeaderMap, name: &str) -> Option<SessionId> {
    cookie_values(headers, name).find_map(|raw| verify_session_value(keys, name, raw))
}

/// The session id in one raw session cookie value, if it verifies.
pub fn verify_session_value(keys: &Keys, name: &str, raw: &str) -> Option<SessionId> {
    let v = verify(keys, name, raw)?;
    decode_tagged::<32>(&v, SESSION_TAG).map(SessionId)
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
}
