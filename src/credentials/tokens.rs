//! Emailed single-use tokens (password reset, invitation): 256 bits from the CSPRNG, shown once in a link, and
//! stored only as a keyed hash so the database alone can't be turned into working links.

use crate::keys::{KeyError, Keys, hmac, random_bytes};

/// A fresh token: (the text for the link, the hash to store).
pub fn new_token(keys: &Keys) -> Result<(String, String), KeyError> {
    let token = hex::encode(random_bytes::<32>()?);
    let h = hash(keys, &token);
    Ok((token, h))
}

/// The stored form of a token. Anything that isn't 64 hex digits hashes to something never stored.
pub fn hash(keys: &Keys, token: &str) -> String {
    hex::encode(hmac(&keys.token_hash, &[b"email-token", token.trim().as_bytes()]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_hashed() {
        let keys = Keys::from_master(&[5; 64]);
        let (a, ha) = new_token(&keys).unwrap();
        let (b, _) = new_token(&keys).unwrap();
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert_eq!(hash(&keys, &a), ha);
        assert_ne!(ha, a);
    }

    #[test]
    fn the_hash_is_keyed_and_ignores_surrounding_whitespace() {
        let keys = Keys::from_master(&[5; 64]);
        let other = Keys::from_master(&[6; 64]);
        let (token, stored) = new_token(&keys).unwrap();
        // Another gateway's key (or the database without the key) can't recompute the stored hash.
        assert_ne!(hash(&other, &token), stored);
        // Mail clients and copy-paste add spaces and line breaks around a link's token.
        assert_eq!(hash(&keys, &format!("  {token}\r\n")), stored);
        assert_eq!(hash(&keys, &format!("\t{token} ")), stored);
        // ... but inner changes are another token.
        assert_ne!(hash(&keys, &token[1..]), stored);
        assert_ne!(hash(&keys, &format!("{token}0")), stored);
    }
}
