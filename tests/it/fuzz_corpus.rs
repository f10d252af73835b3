//! Fuzz corpus replay: every input in fuzz/seeds/TARGET/ (hand-written seeds, saved crashes and the minimised corpus
//! of the recorded fuzz runs) goes through the same property checks as the cargo-fuzz target, so CI keeps what the
//! fuzzers found without running them. See fuzz/README.md.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;

#[path = "../../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod checks;

/// Floors on the accepted shares, set a little below what the recorded corpus gives (see the test output).
const MIN_PATH_SHARE: f64 = 0.7; // 158 of 200 on 2026-12-03
const MIN_REDIRECT_SHARE: f64 = 0.6; // 135 of 200 on 2026-12-03

/// Runs `check` on every file in fuzz/seeds/`target`/ and fails naming each input that panics.
fn replay(target: &str, check: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds").join(target);
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    entries.sort();
    assert!(!entries.is_empty(), "no inputs in {}", dir.display());
    let mut failures = Vec::new();
    for path in &entries {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| check(&data))) {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!("{}: {message}", path.display()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} {target} inputs fail:\n{}",
        failures.len(),
        entries.len(),
        failures.join("\n")
    );
}

#[test]
fn fuzz_corpus_session_cookie() {
    replay("session_cookie", checks::session_cookie);
}

#[test]
fn fuzz_corpus_form() {
    replay("form", checks::form);
}

/// The share of `target`'s inputs that `accepts`: the path and redirect properties hold vacuously for a rejected
/// input, so a validator that rejects everything would pass [`replay`]; a floor on the accepted share catches it.
fn accepted_share(target: &str, accepts: fn(&str) -> bool) -> f64 {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds").join(target);
    let (mut n, mut ok) = (0usize, 0usize);
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = e.expect("directory entry").path();
        n += 1;
        if std::str::from_utf8(&std::fs::read(&path).unwrap()).is_ok_and(accepts) {
            ok += 1;
        }
    }
    let share = ok as f64 / n as f64;
    eprintln!("{target}: {ok} of {n} inputs accepted ({:.0}%)", share * 100.0);
    share
}

#[test]
fn fuzz_corpus_path() {
    replay("path", checks::path);
    let share = accepted_share("path", |s| portcullis::policy::normalize_path(s).is_ok());
    assert!(share >= MIN_PATH_SHARE, "only {:.0}% of the path corpus normalises", share * 100.0);
}

#[test]
fn fuzz_corpus_redirect() {
    replay("redirect", checks::redirect);
    let share = accepted_share("redirect", |s| portcullis::portal::redirect::safe_target(s).is_some());
    assert!(share >= MIN_REDIRECT_SHARE, "only {:.0}% of the redirect corpus is a safe target", share * 100.0);
}

#[test]
fn fuzz_corpus_config() {
    replay("config", checks::config);
}

#[test]
fn fuzz_corpus_relay_chunked() {
    replay("relay_chunked", checks::relay_chunked);
}

#[test]
fn fuzz_corpus_relay_response() {
    replay("relay_response", checks::relay_response);
}
