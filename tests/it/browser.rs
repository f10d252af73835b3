//! Real-browser end-to-end test: a gateway in-process (real clock, outbox mail, 2FA required), users from
//! the CLI, then `node tests/browser/e2e.mjs` drives headless Debian Chromium through playwright-core:
//! login, forced enrolment, recovery codes, TOTP and recovery-code sign-in, forgot password through the
//! outbox, an invitation, the admin list, phone-width checks, and screenshots (target/screenshots, or
//! `$PORTCULLIS_SCREENSHOTS`; the committed set is docs/screenshots/).
//!
//! Needs /usr/bin/chromium (Debian package `chromium`) and `npm ci --prefix tests/browser`; .ci/run installs
//! both. When either is missing the test FAILS (it is never skipped).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::support::*;

const ADMIN: &str = "admin";
const ADMIN_PW: &str = "Admin-passw0rd!";
const USER: &str = "alice";
const USER_EMAIL: &str = "alice@example.com";
/// A protected path with a query, to check the round trip through login and enrolment.
const APP_PATH: &str = "/notes/today?view=full";

fn chromium_path() -> PathBuf {
    std::env::var_os("CHROMIUM").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// Fail (never skip) with instructions when the browser tooling is missing.
fn require_tools(root: &Path) {
    let chromium = chromium_path();
    assert!(
        chromium.exists(),
        "browser test needs Chromium at {} (install the Debian package: `apt-get install -y chromium`, \
         as .ci/run does; or set CHROMIUM=/path/to/chromium)",
        chromium.display()
    );
    let pw = root.join("tests/browser/node_modules/playwright-core/package.json");
    assert!(
        pw.exists(),
        "browser test needs playwright-core in tests/browser/node_modules (run `npm ci --prefix tests/browser`, \
         as .ci/run does); missing {}",
        pw.display()
    );
    let node = std::process::Command::new("node").arg("--version").output();
    assert!(matches!(node, Ok(ref o) if o.status.success()), "browser test needs Node.js (`node` on PATH): {node:?}");
    let oath = std::process::Command::new("oathtool").arg("--version").output();
    assert!(
        matches!(oath, Ok(ref o) if o.status.success()),
        "browser test needs oathtool on PATH (`apt-get install -y oathtool`): {oath:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_browser_login_enrolment_recovery_reset_invitation_admin() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    require_tools(&root);

    let up = start_upstream().await;
    // Bind first: public_url must be the gateway's own address so the emailed links work in the browser.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let env = Env::new(&format!(
        "[mail]\ntransport = \"outbox\"\noutbox_dir = \"{{DIR}}/outbox\"\npublic_url = \"{base}\"\n\n\
         [two_factor]\nrequired = true\n\n{}",
        app("*", &up.url(), "two_factor")
    ));
    let outbox = env.path().join("outbox");
    env.add_user(ADMIN, "admin@example.com", "Ada Admin", &["admins"], ADMIN_PW).await;
    env.add_user(USER, USER_EMAIL, "Alice Example", &["staff", "dev"], PW).await;

    // The real clock (`run`, not `run_with_clock`): the browser's codes come from oathtool at real time.
    let config =
        portcullis::config::Config::load(&env.config_path).unwrap_or_else(|e| panic!("Config::load failed: {e}"));
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let gateway = tokio::spawn(portcullis::run(listener, config, async move {
        let _ = stop_rx.await;
    }));
    let mut probe = Client::new(base.trim_start_matches("http://").parse().unwrap(), "127.0.0.1");
    let deadline = Instant::now() + TIMEOUT;
    loop {
        assert!(!gateway.is_finished(), "gateway ended before becoming healthy");
        if matches!(probe.try_send("GET", &format!("{PREFIX}/health"), &[], None).await, Ok(ref r) if r.status == 200) {
            break;
        }
        assert!(Instant::now() < deadline, "gateway not healthy within {TIMEOUT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Screenshots go to target/screenshots, so a test run leaves the tree clean; refresh the committed ones with
    // `PORTCULLIS_SCREENSHOTS=docs/screenshots cargo test --test it browser`.
    let shots = match std::env::var_os("PORTCULLIS_SCREENSHOTS") {
        Some(dir) => root.join(dir),
        None => root.join("target/screenshots"),
    };
    std::fs::create_dir_all(&shots).unwrap();
    let started = Instant::now();
    let child = tokio::process::Command::new("node")
        .arg(root.join("tests/browser/e2e.mjs"))
        .current_dir(root.join("tests/browser"))
        .env("PORTCULLIS_URL", &base)
        .env("PORTCULLIS_APP_PATH", APP_PATH)
        .env("PORTCULLIS_USER", USER)
        .env("PORTCULLIS_USER_PASSWORD", PW)
        .env("PORTCULLIS_USER_EMAIL", USER_EMAIL)
        .env("PORTCULLIS_ADMIN", ADMIN)
        .env("PORTCULLIS_ADMIN_PASSWORD", ADMIN_PW)
        .env("PORTCULLIS_OUTBOX", &outbox)
        .env("PORTCULLIS_CLI", env!("CARGO_BIN_EXE_portcullis"))
        .env("PORTCULLIS_CONFIG", &env.config_path)
        .env("PORTCULLIS_SCREENSHOTS", &shots)
        .env("CHROMIUM", chromium_path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn node tests/browser/e2e.mjs");
    let out = within_for(Duration::from_secs(600), "node tests/browser/e2e.mjs", child.wait_with_output())
        .await
        .expect("wait for node");
    let elapsed = started.elapsed();
    println!(
        "---- e2e.mjs stdout ----\n{}\n---- e2e.mjs stderr ----\n{}\n---- browser scenario took {:.1}s ----",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        elapsed.as_secs_f64()
    );
    assert!(out.status.success(), "browser end-to-end scenario failed ({}); see its output above", out.status);

    // The browser's actions are visible to the CLI too.
    let o = env.cli(&["user", "show", USER, "--json"], None).await;
    assert!(o.status.success(), "user show {USER} --json failed");
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).expect("user show --json is JSON");
    assert_eq!(j["two_factor"]["enabled"], true, "{j}");
    assert_eq!(j["two_factor"]["recovery_codes_left"], 8, "two codes used (login, reset): {j}");
    let o = env.cli(&["user", "show", "newbie", "--json"], None).await;
    assert!(o.status.success(), "the invited account exists");

    let _ = stop_tx.send(());
    let res = within("gateway shutdown", gateway).await.expect("gateway task panicked");
    res.unwrap_or_else(|e| panic!("portcullis::run returned an error: {e}"));
    drop(up);
}
