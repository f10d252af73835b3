//! Recovery codes: 75 random bits each, written `xxxxx-xxxxx-xxxxx` in Crockford's base32 alphabet (no i, l, o, u),
//! so they survive being read aloud or typed from paper. Entry ignores case, spaces and dashes.
//!
//! Each code is stored twice: sealed (AEAD, so the user can view it again) and as a keyed hash, so consuming a code
//! is one atomic "remove the entry with this hash" in the store.

use crate::keys::{KeyError, Keys, hmac, random_bytes};
use crate::store::RecoveryCode;

/// Lower-case Crockford base32.
const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";
/// Characters per code (5 bits each: 75 bits).
const LEN: usize = 15;

/// A fresh code in display form.
pub fn generate() -> Result<String, KeyError> {
    let bytes = random_bytes::<LEN>()?;
    let raw: String = bytes.iter().map(|b| ALPHABET[usize::from(b & 31)] as char).collect();
    Ok(format!("{}-{}-{}", &raw[..5], &raw[5..10], &raw[10..]))
}

/// Canonical form of a typed code, or `None` if it can't be one.
pub fn normalize(input: &str) -> Option<String> {
    let mut out = String::with_capacity(LEN);
    for c in input.chars() {
        let c = match c.to_ascii_lowercase() {
            ' ' | '-' | '\t' => continue,
            'o' => '0',
            'i' | 'l' => '1',
            c => c,
        };
        if !c.is_ascii() || !ALPHABET.contains(&(c as u8)) {
            return None;
        }
        out.push(c);
    }
    (out.len() == LEN).then_some(out)
}

/// The keyed hash a code is stored and looked up under; bound to the user.
pub fn hash(keys: &Keys, username: &str, normalized: &str) -> String {
    hex::encode(hmac(&keys.token_hash, &[b"recovery-code", username.as_bytes(), normalized.as_bytes()]))
}

/// Purpose label for sealing codes.
const PURPOSE: &str = "recovery-code";

/// Makes `n` new codes: the display forms and their stored entries.
pub fn new_set(keys: &Keys, username: &str, n: usize) -> Result<(Vec<String>, Vec<RecoveryCode>), KeyError> {
    let mut shown = Vec::with_capacity(n);
    let mut stored = Vec::with_capacity(n);
    for _ in 0..n {
        let code = generate()?;
        stored.push(entry(keys, username, &code)?);
        shown.push(code);
    }
    Ok((shown, stored))
}

/// The stored entry for one display-form code.
pub fn entry(keys: &Keys, username: &str, code: &str) -> Result<RecoveryCode, KeyError> {
    let normalized = normalize(code).ok_or(KeyError::Decrypt)?;
    Ok(RecoveryCode { hash: hash(keys, username, &normalized), sealed: keys.seal(username, PURPOSE, code.as_bytes())? })
}

/// Decrypts stored codes for display.
pub fn reveal(keys: &Keys, username: &str, codes: &[RecoveryCode]) -> Result<Vec<String>, KeyError> {
    codes
        .iter()
        .map(|c| keys.open(username, PURPOSE, &c.sealed).map(|b| String::from_utf8_lossy(&b).into_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_readable_and_normalise_back() {
        let c = generate().unwrap();
        assert_eq!(c.len(), 17);
        let n = normalize(&c).unwrap();
        assert_eq!(normalize(&c.to_uppercase()), Some(n.clone()));
        assert_eq!(normalize(&format!("  {} ", c.replace('-', " "))), Some(n));
        assert_eq!(normalize("abc"), None);
        assert_eq!(normalize("uuuuu-uuuuu-uuuuu"), None);
        assert_eq!(normalize("OOOOO-IIIII-LLLLL"), Some("000001111111111".into()));
    }

    #[test]
    fn sets_are_distinct_sealed_and_hashed_per_user() {
        let keys = Keys::from_master(&[3; 64]);
        let (shown, stored) = new_set(&keys, "alice", 10).unwrap();
        let unique: std::collections::HashSet<_> = shown.iter().collect();
        assert_eq!(unique.len(), 10);
        assert_eq!(reveal(&keys, "alice", &stored).unwrap(), shown);
        assert!(reveal(&keys, "bob", &stored).is_err());
        let n = normalize(&shown[0]).unwrap();
        assert_ne!(hash(&keys, "alice", &n), hash(&keys, "bob", &n));
        assert!(!String::from_utf8_lossy(&stored[0].sealed).contains(&shown[0]));
    }
}
