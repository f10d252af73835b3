//! The master secret and the keys derived from it: cookie signing, CSRF tokens, and encryption at rest.

use std::io::Write;
use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Length of the master secret in bytes.
const MASTER_LEN: usize = 64;

/// Key material problems.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file can't be read or created.
    #[error("secret key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The key file has the wrong size.
    #[error("secret key file {0} is damaged: expected {MASTER_LEN} bytes")]
    BadLength(String),
    /// The OS random source failed.
    #[error("the operating system's random source failed")]
    Random,
    /// Ciphertext failed authentication (wrong key, owner or purpose, or tampering).
    #[error("encrypted value failed to authenticate")]
    Decrypt,
}

/// Keys derived from the master secret, one per purpose.
#[derive(Clone)]
pub struct Keys {
    /// Signs session and CSRF cookies.
    pub cookie: cookie::Key,
    csrf: [u8; 32],
    aead: [u8; 32],
    /// Hashes tokens and codes before they are stored.
    pub token_hash: [u8; 32],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

/// Fills a buffer from the OS CSPRNG.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], KeyError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|_| KeyError::Random)?;
    Ok(b)
}

/// HMAC-SHA256 of `parts`, each length-prefixed so no two inputs collide.
pub fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length; `new_from_slice` can't fail for it.
    let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    for p in parts {
        mac.update(&(p.len() as u64).to_be_bytes());
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

impl Keys {
    /// Loads the master secret, creating it (mode 0600) if the file is missing.
    pub fn load_or_create(path: &Path) -> Result<Keys, KeyError> {
        let io = |source| KeyError::Io { path: path.display().to_string(), source };
        let master = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    crate::files::private_dir(dir).map_err(io)?;
                }
                let fresh = random_bytes::<MASTER_LEN>()?;
                write_new_secret(path, &fresh).map_err(io)?;
                fresh.to_vec()
            }
            Err(e) => return Err(io(e)),
        };
        if master.len() != MASTER_LEN {
            return Err(KeyError::BadLength(path.display().to_string()));
        }
        Ok(Keys::from_master(&master))
    }

    /// Derives every purpose key from a master secret (HMAC as a PRF, one label per purpose).
    pub fn from_master(master: &[u8]) -> Keys {
        let derive = |label: &str| hmac(master, &[b"portcullis-v1", label.as_bytes()]);
        let mut cookie_key = [0u8; 64];
        cookie_key[..32].copy_from_slice(&derive("cookie-sign"));
        cookie_key[32..].copy_from_slice(&derive("cookie-encrypt"));
        Keys {
            cookie: cookie::Key::from(&cookie_key),
            csrf: derive("csrf"),
            aead: derive("aead"),
            token_hash: derive("token-hash"),
        }
    }

    /// The CSRF token bound to `binding` (a session id or the anonymous CSRF cookie).
    pub fn csrf_token(&self, binding: &[u8]) -> String {
        hex::encode(hmac(&self.csrf, &[b"csrf", binding]))
    }

    /// A short-lived capability for `purpose`, bound to `binding` (a session id): `expiry.mac`.
    pub fn grant(&self, purpose: &str, binding: &[u8], expiry: u64) -> String {
        let mac = hmac(&self.csrf, &[b"grant", purpose.as_bytes(), binding, &expiry.to_be_bytes()]);
        format!("{expiry}.{}", hex::encode(mac))
    }

    /// Whether `token` is a grant for `purpose` and `binding` that hasn't expired at `now`.
    pub fn check_grant(&self, token: &str, purpose: &str, binding: &[u8], now: u64) -> bool {
        use subtle::ConstantTimeEq;
        let Some((expiry, _)) = token.split_once('.') else {
            return false;
        };
        let Ok(expiry) = expiry.parse::<u64>() else {
            return false;
        };
        let expected = self.grant(purpose, binding, expiry);
        now < expiry && expected.len() == token.len() && bool::from(expected.as_bytes().ct_eq(token.as_bytes()))
    }

    /// Encrypts `plain` for `owner` and `purpose` (both bound as AAD): nonce ‖ ciphertext.
    pub fn seal(&self, owner: &str, purpose: &str, plain: &[u8]) -> Result<Vec<u8>, KeyError> {
        let cipher = XChaCha20Poly1305::new((&self.aead).into());
        let nonce_bytes = random_bytes::<24>()?;
        let aad = aad(owner, purpose);
        let ct = cipher
            .encrypt(&XNonce::from(nonce_bytes), Payload { msg: plain, aad: &aad })
            .map_err(|_| KeyError::Decrypt)?;
        let mut out = nonce_bytes.to_vec();
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Reverses [`Keys::seal`]; fails if the owner, purpose or bytes differ.
    pub fn open(&self, owner: &str, purpose: &str, sealed: &[u8]) -> Result<Vec<u8>, KeyError> {
        if sealed.len() < 24 {
            return Err(KeyError::Decrypt);
        }
        let (nonce, ct) = sealed.split_at(24);
        let cipher = XChaCha20Poly1305::new((&self.aead).into());
        let aad = aad(owner, purpose);
        let nonce = XNonce::try_from(nonce).map_err(|_| KeyError::Decrypt)?;
        cipher.decrypt(&nonce, Payload { msg: ct, aad: &aad }).map_err(|_| KeyError::Decrypt)
    }
}

fn aad(owner: &str, purpose: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(owner.len() + purpose.len() + 1);
    v.extend_from_slice(purpose.as_bytes());
    v.push(0);
    v.extend_from_slice(owner.as_bytes());
    v
}

fn write_new_secret(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_are_bound_to_owner_and_purpose() {
        let k = Keys::from_master(&[7u8; 64]);
        let sealed = k.seal("alice", "totp", b"secret").unwrap();
        assert_eq!(k.open("alice", "totp", &sealed).unwrap(), b"secret");
        assert!(k.open("bob", "totp", &sealed).is_err());
        assert!(k.open("alice", "recovery", &sealed).is_err());
        let other = Keys::from_master(&[8u8; 64]);
        assert!(other.open("alice", "totp", &sealed).is_err());
    }

    #[test]
    fn key_file_is_created_private_and_reloaded() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/secret.key");
        let a = Keys::load_or_create(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = Keys::load_or_create(&p).unwrap();
        assert_eq!(a.csrf_token(b"x"), b.csrf_token(b"x"));
    }
}
