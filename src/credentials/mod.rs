//! Credentials: passwords, lockout counters (and, with two-factor, TOTP and recovery codes).

pub mod lockout;
pub mod password;
pub mod recovery;
pub mod tokens;
pub mod totp;
