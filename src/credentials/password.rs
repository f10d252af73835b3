//! Password hashing with argon2id (OWASP parameters: m=19456 KiB, t=2, p=1), run off the async runtime.

use std::sync::Arc;

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher as _, PasswordVerifier as _};
use tokio::sync::Semaphore;

/// Shortest accepted password (NIST SP 800-63B §3.1.1.2).
pub const MIN_LEN: usize = 8;
/// Longest accepted password, in characters; long enough for passphrases, short enough to bound hashing cost.
pub const MAX_LEN: usize = 1024;

/// The hash unknown names are verified against: the same parameters as real hashes, so the same cost, of a random
/// password nobody knows (and a match would still not count). Fixed, so starting up computes no hash.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$7ukQu870ht6MadjTSUNHZQ$epdN/o3gJN/uT9zn49FoP3kFaf7eXgAp74sqcNnLc6k";

/// Password problems.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    /// Too short or too long.
    #[error("a password must be {MIN_LEN} to {MAX_LEN} characters long")]
    Length,
    /// The hashing library failed.
    #[error("password hashing failed")]
    Hash,
    /// The hashing task died.
    #[error("password hashing task failed")]
    Task,
}

/// Checks length rules (any characters, no composition rules, no truncation).
pub fn check_new(password: &str) -> Result<(), PasswordError> {
    let n = password.chars().count();
    if (MIN_LEN..=MAX_LEN).contains(&n) { Ok(()) } else { Err(PasswordError::Length) }
}

/// Hashes a password synchronously (for the CLI).
pub fn hash_blocking(password: &str) -> Result<String, PasswordError> {
    check_new(password)?;
    Argon2::default().hash_password(password.as_bytes()).map(|h| h.to_string()).map_err(|_| PasswordError::Hash)
}

/// Verifies a password against a PHC string synchronously. A malformed hash never verifies.
pub fn verify_blocking(password: &str, phc: &str) -> bool {
    if password.chars().count() > MAX_LEN {
        return false;
    }
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok(),
        Err(_) => false,
    }
}

/// Hashes and verifies on the blocking pool, at most `limit` at a time, so a login storm can't starve proxying.
#[derive(Clone)]
pub struct Hasher {
    permits: Arc<Semaphore>,
    /// Verified when the user doesn't exist, so unknown names cost the same time as wrong passwords.
    dummy: Arc<String>,
}

impl Hasher {
    /// A hasher allowing `limit` concurrent hashes.
    pub fn new(limit: usize) -> Result<Hasher, PasswordError> {
        Ok(Hasher { permits: Arc::new(Semaphore::new(limit.max(1))), dummy: Arc::new(DUMMY_HASH.to_string()) })
    }

    /// Verifies `password` against `phc`, or against the dummy hash when there is no user.
    pub async fn verify(&self, password: String, phc: Option<String>) -> Result<bool, PasswordError> {
        let _permit = self.permits.acquire().await.map_err(|_| PasswordError::Task)?;
        let known = phc.is_some();
        let phc = phc.unwrap_or_else(|| (*self.dummy).clone());
        let ok = tokio::task::spawn_blocking(move || verify_blocking(&password, &phc))
            .await
            .map_err(|_| PasswordError::Task)?;
        Ok(ok && known)
    }

    /// Hashes a new password.
    pub async fn hash(&self, password: String) -> Result<String, PasswordError> {
        let _permit = self.permits.acquire().await.map_err(|_| PasswordError::Task)?;
        tokio::task::spawn_blocking(move || hash_blocking(&password)).await.map_err(|_| PasswordError::Task)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_argon2id_with_owasp_parameters() {
        let h = hash_blocking("correct horse battery").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(verify_blocking("correct horse battery", &h));
        assert!(!verify_blocking("correct horse batterz", &h));
        assert!(!verify_blocking("x", "not a hash"));
    }

    #[test]
    fn the_dummy_hash_has_the_shipped_parameters() {
        let fresh = hash_blocking("some password").unwrap();
        let params = |h: &str| h.split('$').nth(3).unwrap().to_string();
        assert_eq!(params(DUMMY_HASH), params(&fresh));
        assert!(PasswordHash::new(DUMMY_HASH).is_ok());
        assert!(!verify_blocking("portcullis", DUMMY_HASH));
    }

    #[test]
    fn length_rules_count_characters_not_bytes() {
        assert!(check_new("short").is_err());
        assert!(check_new("ünïcödé!").is_ok());
        assert!(check_new(&"a".repeat(MAX_LEN + 1)).is_err());
    }
}
