//! The stored layouts, and their conversion to and from the records the rest of the gateway sees (kanidm's
//! `DbTotpV1` → `Totp`). Every value both backends keep is one of these behind a version byte. A schema change
//! is a new layout type, a new arm in its `decode`, and nothing outside this file.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{
    Factor, Failures, LastLogin, PendingEnrolment, RecoveryCode, SecondFactor, SecondFactors, SessionRecord,
    StoreError, TokenRecord, TotpFactor, User,
};
use crate::audit::AuditEvent;

/// The first layout of every record; still written for those that never changed.
const V1: u8 = 1;
/// The user layout written today: second factors as a list ([`UserV2`]).
const V2: u8 = 2;

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

/// A user account, layout 1 (read only): one optional TOTP field. Field names and shapes are the stored JSON:
/// never rename one here.
#[derive(Deserialize)]
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

#[derive(Deserialize)]
struct TwoFactorV1 {
    enabled_at: u64,
    secret: Vec<u8>,
    last_step: u64,
    recovery: Vec<RecoveryCodeV1>,
}

/// A user account, layout 2: the second factors as a list of tagged entries, the recovery codes beside them.
#[derive(Serialize, Deserialize)]
struct UserV2 {
    username: String,
    email: String,
    display_name: String,
    groups: Vec<String>,
    password_hash: String,
    locked: bool,
    created: u64,
    last_login: Option<LastLoginV1>,
    factors: Vec<FactorV2>,
    recovery: Vec<RecoveryCodeV1>,
    stamp: u64,
}

/// One enrolled factor in layout 2; `kind` names the variant.
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum FactorV2 {
    Totp { enabled_at: u64, secret: Vec<u8>, last_step: u64 },
}

#[derive(Serialize, Deserialize)]
struct LastLoginV1 {
    at: u64,
    address: String,
    second_factor: Option<FactorKindV1>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum FactorKindV1 {
    Totp,
    RecoveryCode,
}

#[derive(Serialize, Deserialize)]
struct RecoveryCodeV1 {
    hash: String,
    sealed: Vec<u8>,
}

impl From<&RecoveryCode> for RecoveryCodeV1 {
    fn from(c: &RecoveryCode) -> Self {
        RecoveryCodeV1 { hash: c.hash.clone(), sealed: c.sealed.clone() }
    }
}

impl From<RecoveryCodeV1> for RecoveryCode {
    fn from(c: RecoveryCodeV1) -> Self {
        RecoveryCode { hash: c.hash, sealed: c.sealed }
    }
}

impl From<&LastLogin> for LastLoginV1 {
    fn from(l: &LastLogin) -> Self {
        LastLoginV1 {
            at: l.at,
            address: l.address.clone(),
            second_factor: l.second_factor.map(|f| match f {
                SecondFactor::Totp => FactorKindV1::Totp,
                SecondFactor::RecoveryCode => FactorKindV1::RecoveryCode,
            }),
        }
    }
}

impl From<LastLoginV1> for LastLogin {
    fn from(l: LastLoginV1) -> Self {
        LastLogin {
            at: l.at,
            address: l.address,
            second_factor: l.second_factor.map(|f| match f {
                FactorKindV1::Totp => SecondFactor::Totp,
                FactorKindV1::RecoveryCode => SecondFactor::RecoveryCode,
            }),
        }
    }
}

impl From<&User> for UserV2 {
    fn from(u: &User) -> Self {
        UserV2 {
            username: u.username.clone(),
            email: u.email.clone(),
            display_name: u.display_name.clone(),
            groups: u.groups.clone(),
            password_hash: u.password_hash.clone(),
            locked: u.locked,
            created: u.created,
            last_login: u.last_login.as_ref().map(LastLoginV1::from),
            factors: u
                .factors
                .enrolled
                .iter()
                .map(|f| match f {
                    Factor::Totp(t) => {
                        FactorV2::Totp { enabled_at: t.enabled_at, secret: t.secret.clone(), last_step: t.last_step }
                    }
                })
                .collect(),
            recovery: u.factors.recovery.iter().map(RecoveryCodeV1::from).collect(),
            stamp: u.stamp,
        }
    }
}

impl TryFrom<UserV2> for User {
    type Error = StoreError;

    fn try_from(u: UserV2) -> Result<Self, StoreError> {
        if u.username.is_empty() {
            return Err(StoreError::Corrupt("a stored user without a username".into()));
        }
        let enrolled = u
            .factors
            .into_iter()
            .map(|f| match f {
                FactorV2::Totp { enabled_at, secret, last_step } => {
                    Factor::Totp(TotpFactor { enabled_at, secret, last_step })
                }
            })
            .collect();
        Ok(User {
            username: u.username,
            email: u.email,
            display_name: u.display_name,
            groups: u.groups,
            password_hash: u.password_hash,
            locked: u.locked,
            created: u.created,
            last_login: u.last_login.map(LastLogin::from),
            factors: SecondFactors { enrolled, recovery: u.recovery.into_iter().map(RecoveryCode::from).collect() },
            stamp: u.stamp,
        })
    }
}

/// Layout 1 read as layout 2: its one TOTP secret becomes the list's only entry.
impl From<UserV1> for UserV2 {
    fn from(u: UserV1) -> Self {
        let (factors, recovery) = match u.two_factor {
            Some(t) => (
                vec![FactorV2::Totp { enabled_at: t.enabled_at, secret: t.secret, last_step: t.last_step }],
                t.recovery,
            ),
            None => (Vec::new(), Vec::new()),
        };
        UserV2 {
            username: u.username,
            email: u.email,
            display_name: u.display_name,
            groups: u.groups,
            password_hash: u.password_hash,
            locked: u.locked,
            created: u.created,
            last_login: u.last_login,
            factors,
            recovery,
            stamp: u.stamp,
        }
    }
}

impl Stored for User {
    fn encode(&self) -> Result<Vec<u8>, StoreError> {
        write(V2, &UserV2::from(self))
    }

    fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        match split(bytes)? {
            (V1, rest) => User::try_from(UserV2::from(read::<UserV1>(rest)?)),
            (V2, rest) => User::try_from(read::<UserV2>(rest)?),
            (v, _) => unknown(v),
        }
    }
}

/// Whether stored user bytes are in an older layout than [`User::encode`] writes.
pub(super) fn user_layout_is_old(bytes: &[u8]) -> bool {
    bytes.first().is_some_and(|&v| v < V2)
}

/// A stored user in today's layout, for the start-up migrations of both backends: `None` when it already is, or
/// when it can't be read — then it is logged and left as it is (that user fails as it did before, and the gateway
/// still starts for everyone else).
pub(super) fn rewritten_user(name: &str, bytes: &[u8]) -> Option<Vec<u8>> {
    if !user_layout_is_old(bytes) {
        return None;
    }
    match User::decode(bytes).and_then(|u| u.encode()) {
        Ok(new) => Some(new),
        Err(e) => {
            tracing::error!(user = name, error = %e, "a stored user can't be read: left as it is by the migration");
            None
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
            factors: SecondFactors {
                enrolled: vec![Factor::Totp(TotpFactor {
                    enabled_at: 1_700_000_050,
                    secret: vec![1, 2, 3],
                    last_step: 56_666_668,
                })],
                recovery: vec![RecoveryCode { hash: "ab".into(), sealed: vec![9] }],
            },
            stamp: 4,
        }
    }

    #[test]
    fn a_user_round_trips_through_layout_2() {
        let u = alice();
        let bytes = u.encode().unwrap();
        assert_eq!(bytes[0], V2);
        assert!(!user_layout_is_old(&bytes));
        assert_eq!(User::decode(&bytes).unwrap(), u);
        let none = User { factors: SecondFactors::default(), ..alice() };
        assert_eq!(User::decode(&none.encode().unwrap()).unwrap(), none);
    }

    #[test]
    fn layout_2_writes_the_factors_as_a_tagged_list_beside_the_recovery_codes() {
        let written = String::from_utf8(alice().encode().unwrap()[1..].to_vec()).unwrap();
        assert!(
            written.contains(
                r#""factors":[{"kind":"totp","enabled_at":1700000050,"secret":[1,2,3],"last_step":56666668}]"#
            ),
            "{written}"
        );
        assert!(written.contains(r#""recovery":[{"hash":"ab","sealed":[9]}]"#), "{written}");
        assert!(!written.contains("two_factor"), "{written}");
        assert!(written.contains(r#""second_factor":"recovery_code""#), "{written}");
    }

    #[test]
    fn layout_1_with_its_one_totp_field_reads_as_a_list_of_one() {
        // Written by builds before the factor list: the TOTP secret, its last step and the codes all carry over.
        let old = br#"{"username":"alice","email":"alice@example.com","display_name":"Alice","groups":["staff"],"password_hash":"$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA","locked":false,"created":1700000000,"last_login":{"at":1700000100,"address":"127.0.0.1","second_factor":"recovery_code"},"two_factor":{"enabled_at":1700000050,"secret":[1,2,3],"last_step":56666668,"recovery":[{"hash":"ab","sealed":[9]}]},"stamp":4}"#;
        let mut bytes = vec![1];
        bytes.extend_from_slice(old);
        assert!(user_layout_is_old(&bytes));
        assert_eq!(User::decode(&bytes).unwrap(), alice());
        // Rewritten, it is layout 2.
        assert_eq!(User::decode(&bytes).unwrap().encode().unwrap()[0], V2);
    }

    #[test]
    fn layout_1_without_two_factor_or_stamp_still_reads() {
        let old = br#"{"username":"bob","email":"bob@example.com","display_name":"Bob","groups":[],"password_hash":"x","locked":true,"created":5,"last_login":{"at":6,"address":"::1","second_factor":"totp"},"two_factor":null}"#;
        let mut bytes = vec![1];
        bytes.extend_from_slice(old);
        let u = User::decode(&bytes).unwrap();
        assert_eq!((u.username.as_str(), u.locked, u.stamp), ("bob", true, 0));
        assert!(!u.factors.on() && u.factors.recovery.is_empty());
        assert_eq!(u.last_login.unwrap().second_factor, Some(SecondFactor::Totp));
    }

    #[test]
    fn unknown_versions_and_empty_values_are_corrupt_not_a_panic() {
        assert!(matches!(User::decode(&[3, b'{', b'}']), Err(StoreError::Corrupt(_))));
        assert!(matches!(User::decode(&[2, b'{', b'}']), Err(StoreError::Corrupt(_))));
        assert!(matches!(User::decode(&[]), Err(StoreError::Corrupt(_))));
        assert!(matches!(SessionRecord::decode(&[7]), Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn the_first_factor_brings_the_recovery_codes_and_a_second_of_a_kind_is_refused() {
        let totp = || Factor::Totp(TotpFactor { enabled_at: 1, secret: vec![1], last_step: 0 });
        let code = |h: &str| RecoveryCode { hash: h.into(), sealed: vec![] };
        let mut f = SecondFactors::default();
        assert_eq!(f.add(totp(), vec![code("a")]), Some(true));
        assert_eq!(f.add(totp(), vec![code("b")]), None);
        assert_eq!((f.kinds(), f.recovery.len(), f.enabled_at()), (vec![SecondFactor::Totp], 1, Some(1)));
        assert!(f.clear());
        assert!(!f.clear());
        assert_eq!(f, SecondFactors::default());
    }
}
