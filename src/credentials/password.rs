//! Password hashing with argon2id (OWASP parameters: m=19456 KiB, t=2, p=1), run off the async runtime.
//!
//! Each hash needs `m_cost` KiB of working memory. Allocated per hash, glibc keeps the freed 19 MiB blocks in its
//! arenas and RSS grows with every login; so the [`Hasher`] owns at most `limit` block buffers, made on first
//! need and reused for every hash after (argon2's `hash_password_into_with_memory`). Peak hashing memory is
//! `limit × m_cost`, whatever the number of logins, failures or unknown names.
//!
//! Hashes run on `limit` threads of their own, each with its buffer, at the default priority. A lower one (nice
//! 10) was measured and dropped: it took the proxied p99 during 20 logins/s from 1.47 x to 1.64 x of the quiet
//! figure, no better, while the logins themselves, starved on a saturated machine, went from a p50 of 28 ms to
//! 1–2.8 s and fell behind the offered rate (bench/RESULTS.md, item 15).

use std::sync::{Arc, Mutex};

use argon2::password_hash::phc::{Output, ParamsString, PasswordHash, Salt};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use subtle::ConstantTimeEq;

/// Shortest accepted password (NIST SP 800-63B §3.1.1.2).
pub const MIN_LEN: usize = 8;
/// Longest accepted password, in characters; long enough for passphrases, short enough to bound hashing cost.
pub const MAX_LEN: usize = 1024;

/// The hash unknown names are verified against: the same parameters as real hashes, so the same cost, of a random
/// password nobody knows (and a match would still not count). Fixed, so starting up computes no hash.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$7ukQu870ht6MadjTSUNHZQ$epdN/o3gJN/uT9zn49FoP3kFaf7eXgAp74sqcNnLc6k";

/// Salt length for new hashes (the PHC recommendation).
const SALT_LEN: usize = 16;

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

/// Working memory for one hash of the shipped parameters.
fn new_blocks() -> Box<[Block]> {
    vec![Block::default(); Params::DEFAULT.block_count()].into_boxed_slice()
}

/// Hashes a password with the shipped parameters, in `blocks`.
fn hash_with(password: &str, blocks: &mut [Block]) -> Result<String, PasswordError> {
    check_new(password)?;
    let salt_bytes = crate::keys::random_bytes::<SALT_LEN>().map_err(|_| PasswordError::Hash)?;
    let salt = Salt::new(&salt_bytes).map_err(|_| PasswordError::Hash)?;
    let params = Params::DEFAULT;
    let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
        .hash_password_into_with_memory(password.as_bytes(), &salt, &mut out, &mut *blocks)
        .map_err(|_| PasswordError::Hash)?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(&params).map_err(|_| PasswordError::Hash)?,
        salt: Some(salt),
        hash: Some(Output::new(&out).map_err(|_| PasswordError::Hash)?),
    };
    Ok(phc.to_string())
}

/// Verifies a password against a PHC string in `blocks` (a hash of larger parameters than the shipped ones gets
/// memory of its own). A malformed hash never verifies.
fn verify_with(password: &str, phc: &str, blocks: &mut [Block]) -> bool {
    if password.chars().count() > MAX_LEN {
        return false;
    }
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (&parsed.salt, &parsed.hash) else {
        return false;
    };
    let (Ok(algorithm), Ok(params)) = (Algorithm::try_from(parsed.algorithm.as_str()), Params::try_from(&parsed))
    else {
        return false;
    };
    let version = match parsed.version.map(Version::try_from) {
        None => Version::default(),
        Some(Ok(v)) => v,
        Some(Err(_)) => return false,
    };
    let mut out = vec![0u8; expected.len()];
    let mut own;
    let memory = if params.block_count() <= blocks.len() {
        blocks
    } else {
        own = vec![Block::default(); params.block_count()];
        &mut own[..]
    };
    let hashed = Argon2::new(algorithm, version, params).hash_password_into_with_memory(
        password.as_bytes(),
        salt,
        &mut out,
        memory,
    );
    // Constant-time: the comparison must not tell how much of a guess was right.
    hashed.is_ok() && bool::from(out.ct_eq(expected.as_bytes()))
}

/// Hashes a password synchronously (for the CLI: one hash per process, so its memory is simply its own).
pub fn hash_blocking(password: &str) -> Result<String, PasswordError> {
    hash_with(password, &mut new_blocks())
}

/// Verifies a password against a PHC string synchronously. A malformed hash never verifies.
pub fn verify_blocking(password: &str, phc: &str) -> bool {
    verify_with(password, phc, &mut new_blocks())
}

/// A hash to run, given a thread's working memory.
type Job = Box<dyn FnOnce(&mut [Block]) + Send>;

/// Hashes and verifies on `limit` threads of its own (so a login storm can't take more than `limit` cores from
/// proxying), each thread with its own working memory (so logins can't grow memory). Jobs queue in arrival
/// order. The threads end when the last clone of the hasher is dropped.
#[derive(Clone)]
pub struct Hasher {
    jobs: std::sync::mpsc::Sender<Job>,
    /// Verified when the user doesn't exist, so unknown names cost the same time as wrong passwords.
    dummy: Arc<String>,
}

impl Hasher {
    /// A hasher with `limit` threads.
    pub fn new(limit: usize) -> Result<Hasher, PasswordError> {
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..limit.max(1) {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("portcullis-hash-{i}"))
                .spawn(move || hash_thread(&queue))
                .map_err(|_| PasswordError::Task)?;
        }
        Ok(Hasher { jobs, dummy: Arc::new(DUMMY_HASH.to_string()) })
    }

    /// Runs `work` on a hash thread with that thread's buffer, and waits for it without blocking the runtime.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut [Block]) -> T + Send + 'static,
    ) -> Result<T, PasswordError> {
        let (done, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |blocks| {
            let _ = done.send(work(blocks));
        });
        self.jobs.send(job).map_err(|_| PasswordError::Task)?;
        result.await.map_err(|_| PasswordError::Task)
    }

    /// Verifies `password` against `phc`, or against the dummy hash when there is no user.
    pub async fn verify(&self, password: String, phc: Option<String>) -> Result<bool, PasswordError> {
        let known = phc.is_some();
        let phc = phc.unwrap_or_else(|| (*self.dummy).clone());
        let ok = self.run(move |blocks| verify_with(&password, &phc, blocks)).await?;
        Ok(ok && known)
    }

    /// Hashes a new password.
    pub async fn hash(&self, password: String) -> Result<String, PasswordError> {
        self.run(move |blocks| hash_with(&password, blocks)).await?
    }
}

/// A hash thread: runs jobs until the hasher is gone. Its buffer is made at the first job and kept.
fn hash_thread(queue: &Mutex<std::sync::mpsc::Receiver<Job>>) {
    let mut blocks: Option<Box<[Block]>> = None;
    loop {
        // The lock is held only while waiting for the next job, not while hashing.
        let job = match queue.lock().unwrap_or_else(|p| p.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        job(blocks.get_or_insert_with(new_blocks));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_run_on_threads_of_their_own() {
        let hasher = Hasher::new(1).unwrap();
        let name = hasher.run(|_| std::thread::current().name().map(str::to_string)).await.unwrap();
        assert_eq!(name.as_deref(), Some("portcullis-hash-0"));
        let h = hasher.hash("correct horse battery".into()).await.unwrap();
        assert!(hasher.verify("correct horse battery".into(), Some(h)).await.unwrap());
    }

    #[test]
    fn hashes_are_argon2id_with_owasp_parameters() {
        let h = hash_blocking("correct horse battery").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(verify_blocking("correct horse battery", &h));
        assert!(!verify_blocking("correct horse batterz", &h));
        assert!(!verify_blocking("x", "not a hash"));
    }

    #[test]
    fn pooled_hashes_agree_with_the_argon2_crates_own_hasher_and_verifier() {
        use argon2::password_hash::{PasswordHasher as _, PasswordVerifier as _};
        let mut blocks = new_blocks();
        let ours = hash_with("correct horse battery", &mut blocks).unwrap();
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(Argon2::default().verify_password(b"correct horse battery", &parsed).is_ok());
        assert!(Argon2::default().verify_password(b"correct horse batterz", &parsed).is_err());
        let theirs = Argon2::default().hash_password(b"another password").unwrap().to_string();
        // The same buffer serves hash after hash; what it held before doesn't matter.
        assert!(verify_with("another password", &theirs, &mut blocks));
        assert!(!verify_with("another passwore", &theirs, &mut blocks));
        // Larger parameters than the shipped ones (an imported hash) still verify, in memory of their own.
        let big = Argon2::new(Algorithm::Argon2id, Version::V0x13, Params::new(32 * 1024, 2, 1, None).unwrap());
        let big_hash = big.hash_password(b"imported password").unwrap().to_string();
        assert!(verify_with("imported password", &big_hash, &mut blocks));
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
