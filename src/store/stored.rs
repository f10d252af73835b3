//! The stored layouts, and their conversion to and from the records the rest of the gateway sees (kanidm's
//! `DbTotpV1` → `Totp`). Every value both backends keep is one of these behind a version byte. A schema change
//! is a new layout type, a new arm in its `decode`, and nothing outside this file.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{
    Failures, LastLogin, PendingEnrolment, RecoveryCode, SecondFactor, SessionRecord, StoreError, TokenRecord,
    TwoFactorState, User,
};
use crate::audit::AuditEvent;

/// The layout version written today.
const V1: u8 = 1;

/// A record with a stored form.
pub(super) trait Stored: Sized {
    /// The bytes to store.
    fn encode(&self) -> Result<Vec<u8>, StoreError>;
    /// The record from stored bytes of any known version.
    fn decode(bytes: &[u8]) -> Result<Self, StoreError>;
}

/// `layout` as version `version` bytes.
fn write<T: Serialize>(version: u8, layout: &T) -> Result<Vec<u8>, StoreError> {
    let mut out = vec![version];
    serde_json::to_writer(&mut out, layout).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(out)
}

/// The version byte and the layout bytes after it.
fn split(bytes: &[u8]) -> Result<(u8, &[u8]), StoreError> {
    match bytes.split_first() {
        Some((&v, rest)) => Ok((v, rest)),
        None => Err(StoreError::Corrupt("empty value".into())),
    }
}

fn read<T: DeserializeOwned>(rest: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(rest).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn unknown<T>(v: u8) -> Result<T, StoreError> {
    Err(StoreError::Corrupt(format!("unknown value version {v}")))
}

/// Records whose stored form is still their own serde form (version 1): when one changes, it gets a layout type
/// here like [`UserV1`].
macro_rules! same_layout {
    ($($t:ty),* $(,)?) => {$(
        impl Stored for $t {
            fn encode(&self) -> Result<Vec<u8>, StoreError> {
                write(V1, self)
            }
            fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
                match split(bytes)? {
                    (V1, rest) => read(rest),
                    (v, _) => unknown(v),
                }
            }
        }
    )*};
}

same_layout!(SessionRecord, TokenRecord, PendingEnrolment, Failures, AuditEvent);

/// A user account, layout 1. Field names and shapes are the stored JSON: never rename one here.
#[derive(Serialize, Deserialize)]
struct UserV1 {
    username: String,
    email: String,
    display_name: String,
    groups: Vec<String>,
    password_hash: String,
    locked: bool,
    created: u64,
    last_login: Option<LastLoginV1>,
    two_factor: Option<TwoFactorV1>,
    #[serde(default)]
    stamp: u64,
}

#[derive(Serialize, Deserialize)]
struct LastLoginV1 {
    at: u64,
    address: String,
    second_factor: Option<FactorV1>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum FactorV1 {
    Totp,
    RecoveryCode,
}

#[derive(Serialize, Deserialize)]
struct TwoFactorV1 {
    enabled_at: u64,
    secret: Vec<u8>,
    last_step: u64,
    recovery: Vec<RecoveryCodeV1>,
}

#[derive(Serialize, Deserialize)]
struct RecoveryCodeV1 {
    hash: String,
    sealed: Vec<u8>,
}

impl From<&User> for UserV1 {
    fn from(u: &User) -> Self {
        UserV1 {
            username: u.username.clone(),
            email: u.email.clone(),
            display_name: u.display_name.clone(),
            groups: u.groups.clone(),
            password_hash: u.password_hash.clone(),
            locked: u.locked,
            created: u.created,
            last_login: u.last_login.as_ref().map(|l| LastLoginV1 {
                at: l.at,
                address: l.address.clone(),
                second_factor: l.second_factor.map(|f| match f {
                    SecondFactor::Totp => FactorV1::Totp,
                    SecondFactor::RecoveryCode => FactorV1::RecoveryCode,
                }),
            }),
            two_factor: u.two_factor.as_ref().map(|t| TwoFactorV1 {
                enabled_at: t.enabled_at,
                secret: t.secret.clone(),
                last_step: t.last_step,
                recovery: t
                    .recovery
                    .iter()
                    .map(|c| RecoveryCodeV1 { hash: c.hash.clone(), sealed: c.sealed.clone() })
                    .collect(),
            }),
            stamp: u.stamp,
        }
    }
}

impl TryFrom<UserV1> for User {
    type Error = StoreError;

    fn try_from(u: UserV1) -> Result<Self, StoreError> {
        if u.username.is_empty() {
            return Err(StoreError::Corrupt("a stored user without a username".into()));
        }
        Ok(User {
            username: u.username,
            email: u.email,
            display_name: u.display_name,
            groups: u.groups,
            password_hash: u.password_hash,
            locked: u.locked,
            created: u.created,
            last_login: u.last_login.map(|l| LastLogin {
                at: l.at,
                address: l.address,
                second_factor: l.second_factor.map(|f| match f {
                    FactorV1::Totp => SecondFactor::Totp,
                    FactorV1::RecoveryCode => SecondFactor::RecoveryCode,
                }),
            }),
            two_factor: u.two_factor.map(|t| TwoFactorState {
                enabled_at: t.enabled_at,
                secret: t.secret,
                last_step: t.last_step,
                recovery: t.recovery.into_iter().map(|c| RecoveryCode { hash: c.hash, sealed: c.sealed }).collect(),
            }),
            stamp: u.stamp,
        })
    }
}

impl Stored for User {
    fn encode(&self) -> Result<Vec<u8>, StoreError> {
        write(V1, &UserV1::from(self))
    }

    fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        match split(bytes)? {
            (V1, rest) => User::try_from(read::<UserV1>(rest)?),
            (v, _) => unknown(v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> User {
        User {
            username: "alice".into(),
            email: "alice@example.com".into(),
            display_name: "Alice".into(),
            groups: vec!["staff".into()],
            password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
            locked: false,
            created: 1_700_000_000,
            last_login: Some(LastLogin {
                at: 1_700_000_100,
                address: "127.0.0.1".into(),
                second_factor: Some(SecondFactor::RecoveryCode),
            }),
            two_factor: Some(TwoFactorState {
                enabled_at: 1_700_000_050,
                secret: vec![1, 2, 3],
                last_step: 56_666_668,
                recovery: vec![RecoveryCode { hash: "ab".into(), sealed: vec![9] }],
            }),
            stamp: 4,
        }
    }

    #[test]
    fn a_user_round_trips_through_layout_1() {
        let u = alice();
        assert_eq!(User::decode(&u.encode().unwrap()).unwrap(), u);
    }

    #[test]
    fn layout_1_is_the_json_stores_already_hold() {
        // Written by the version before layouts were their own types: it must still read.
        let old = br#"{"username":"bob","email":"bob@example.com","display_name":"Bob","groups":[],"password_hash":"x","locked":true,"created":5,"last_login":{"at":6,"address":"::1","second_factor":"totp"},"two_factor":null}"#;
        let mut bytes = vec![1];
        bytes.extend_from_slice(old);
        let u = User::decode(&bytes).unwrap();
        assert_eq!((u.username.as_str(), u.locked, u.stamp), ("bob", true, 0));
        assert_eq!(u.last_login.unwrap().second_factor, Some(SecondFactor::Totp));
        let written = String::from_utf8(alice().encode().unwrap()[1..].to_vec()).unwrap();
        assert!(written.contains(r#""second_factor":"recovery_code""#), "{written}");
    }

    #[test]
    fn unknown_versions_and_empty_values_are_corrupt_not_a_panic() {
        assert!(matches!(User::decode(&[2, b'{', b'}']), Err(StoreError::Corrupt(_))));
        assert!(matches!(User::decode(&[]), Err(StoreError::Corrupt(_))));
        assert!(matches!(SessionRecord::decode(&[7]), Err(StoreError::Corrupt(_))));
    }
}
