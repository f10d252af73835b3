//! TOTP (RFC 6238) for the second factor: SHA1, 6 digits, 30-second steps, as every authenticator app expects.
//!
//! The crate computes codes; this module adds what RFC 6238 §5.2 leaves to the verifier: a code is accepted only if
//! its time step is newer than the last accepted one, so a code can't be replayed within its window.

use subtle::ConstantTimeEq;
use totp_rs::{Algorithm, Builder, Totp};

use crate::keys::{KeyError, random_bytes};

/// Secret length: 160 bits (RFC 4226 §4 recommends 160).
pub const SECRET_LEN: usize = 20;
/// Time step in seconds (RFC 6238 §4.1 default X = 30).
pub const STEP: u64 = 30;
/// Code length.
pub const DIGITS: usize = 6;

/// TOTP set-up problems.
#[derive(Debug, thiserror::Error)]
pub enum TotpError {
    /// The crate refused the parameters (e.g. a `:` in issuer or account).
    #[error("TOTP parameters rejected: {0}")]
    Params(String),
}

/// The outcome of checking a code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Valid and newer than the last accepted step; the step to record.
    Accepted(u64),
    /// Valid, but for a step already used (replay).
    Replayed,
    /// Not a valid code in the window.
    Invalid,
}

/// A fresh secret from the OS CSPRNG.
pub fn new_secret() -> Result<[u8; SECRET_LEN], KeyError> {
    random_bytes::<SECRET_LEN>()
}

fn totp(secret: &[u8], issuer: &str, account: &str) -> Result<Totp, TotpError> {
    Builder::new()
        .with_algorithm(Algorithm::SHA1)
        .with_digits(DIGITS as u8)
        .with_step_duration(STEP)
        .with_skew(0)
        .with_secret(secret.to_vec())
        .with_issuer(Some(issuer))
        .with_account_name(account)
        .build()
        .map_err(|e| TotpError::Params(e.to_string()))
}

/// The `otpauth://totp/…` URI authenticator apps scan.
pub fn otpauth_uri(secret: &[u8], issuer: &str, account: &str) -> Result<String, TotpError> {
    totp(secret, issuer, account)?.to_url().map_err(|e| TotpError::Params(e.to_string()))
}

/// The secret in base32 (RFC 4648, no padding) in groups of four, for typing by hand.
pub fn grouped_base32(secret: &[u8]) -> String {
    let b32 = base32::encode(base32::Alphabet::Rfc4648 { padding: false }, secret);
    b32.as_bytes().chunks(4).map(|c| String::from_utf8_lossy(c).into_owned()).collect::<Vec<_>>().join(" ")
}

/// The code for a time (for tests and the demo).
pub fn code_at(secret: &[u8], now: u64) -> Result<String, TotpError> {
    Ok(totp(secret, "x", "x")?.generate(now).to_string())
}

/// Checks `code` at `now` with ±`skew` steps, refusing any step ≤ `last_step` (RFC 6238 §5.2).
pub fn check(secret: &[u8], code: &str, now: u64, skew: u8, last_step: Option<u64>) -> Check {
    let code: String = code.chars().filter(|c| !c.is_whitespace()).collect();
    if code.len() != DIGITS || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Check::Invalid;
    }
    let Ok(t) = totp(secret, "x", "x") else {
        return Check::Invalid;
    };
    let current = now / STEP;
    let window = current.saturating_sub(u64::from(skew))..=current + u64::from(skew);
    // Try every step in the window (no early exit) and keep the newest match.
    let mut newest = None;
    for step in window {
        let expected = t.generate(step * STEP).to_string();
        if bool::from(expected.as_bytes().ct_eq(code.as_bytes())) {
            newest = Some(step);
        }
    }
    match (newest, last_step) {
        (None, _) => Check::Invalid,
        (Some(step), Some(last)) if step <= last => Check::Replayed,
        (Some(step), _) => Check::Accepted(step),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 Appendix B, SHA1 seed; our 6-digit codes are the low 6 digits of its 8-digit values.
    const SEED: &[u8] = b"12345678901234567890";

    #[test]
    fn rfc6238_test_vectors() {
        for (t, code) in [
            (59, "287082"),
            (1111111109, "081804"),
            (1111111111, "050471"),
            (1234567890, "005924"),
            (2000000000, "279037"),
            (20000000000, "353130"),
        ] {
            assert_eq!(code_at(SEED, t).unwrap(), code, "T={t}");
            assert_eq!(check(SEED, code, t, 0, None), Check::Accepted(t / STEP), "T={t}");
        }
    }

    #[test]
    fn window_edges_with_skew_zero() {
        // 1111111109 is in step 37037036, which spans 1111111080..=1111111109.
        assert_eq!(check(SEED, "081804", 1111111080, 0, None), Check::Accepted(37037036));
        assert_eq!(check(SEED, "081804", 1111111110, 0, None), Check::Invalid);
        assert_eq!(check(SEED, "081804", 1111111079, 0, None), Check::Invalid);
    }

    #[test]
    fn skew_one_accepts_neighbours_only() {
        assert_eq!(check(SEED, "081804", 1111111110, 1, None), Check::Accepted(37037036));
        assert_eq!(check(SEED, "081804", 1111111079, 1, None), Check::Accepted(37037036));
        assert_eq!(check(SEED, "081804", 1111111140, 1, None), Check::Invalid);
        assert_eq!(check(SEED, "081804", 1111111049, 1, None), Check::Invalid);
    }

    #[test]
    fn replay_of_same_or_older_step_is_rejected() {
        let step = 1111111109 / STEP;
        assert_eq!(check(SEED, "081804", 1111111109, 1, Some(step)), Check::Replayed);
        assert_eq!(check(SEED, "081804", 1111111109, 1, Some(step + 1)), Check::Replayed);
        assert_eq!(check(SEED, "081804", 1111111109, 1, Some(step - 1)), Check::Accepted(step));
    }

    #[test]
    fn malformed_codes_are_invalid() {
        for code in ["", "12345", "1234567", "abcdef", "08180４"] {
            assert_eq!(check(SEED, code, 1111111109, 1, None), Check::Invalid, "{code}");
        }
        assert_eq!(check(SEED, "081 804", 1111111109, 0, None), Check::Accepted(37037036));
    }

    #[test]
    fn otpauth_uri_has_issuer_account_and_secret() {
        let uri = otpauth_uri(SEED, "Acme Wiki", "alice").unwrap();
        assert!(uri.starts_with("otpauth://totp/Acme%20Wiki:alice?"), "{uri}");
        assert!(uri.contains("secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"), "{uri}");
        assert!(uri.contains("issuer=Acme%20Wiki"), "{uri}");
        assert_eq!(grouped_base32(SEED), "GEZD GNBV GY3T QOJQ GEZD GNBV GY3T QOJQ");
    }
}
