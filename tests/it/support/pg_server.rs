//! A throwaway PostgreSQL server from Debian's binaries (`/usr/lib/postgresql/*/bin`), for the PostgreSQL
//! backend tests: `initdb` into a temp dir as the postgres user, `pg_ctl start` on a loopback port, one database
//! per test.
//!
//! One shared server per test binary run ([`pg_shared`]), stopped at process exit (an `atexit` hook) and, should
//! the test binary be killed, by a detached watchdog that waits for this process to end. Tests that restart the
//! server get a private one ([`PgServer::start`]), stopped when dropped (also on panic).

use super::flows::out_text;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// `PORTCULLIS_TEST_BACKEND=postgres`: the harness's `Env` configures the PostgreSQL backend.
pub fn pg_backend() -> bool {
    std::env::var("PORTCULLIS_TEST_BACKEND").is_ok_and(|v| v.eq_ignore_ascii_case("postgres"))
}

/// `"postgres"` or `"redb"`, for messages.
pub fn backend_name() -> &'static str {
    if pg_backend() { "postgres" } else { "redb" }
}

pub struct PgServer {
    pub port: u16,
    /// The directory with initdb, pg_ctl, psql, pg_dump.
    pub bin: PathBuf,
    /// Temp dir holding data/, sock/ and the log (removed on stop).
    pub root: PathBuf,
    pub data: PathBuf,
    pub log: PathBuf,
    /// Running as root: run initdb/pg_ctl through `runuser -u postgres`.
    as_postgres: bool,
    next_db: AtomicU64,
    stopped: std::sync::atomic::AtomicBool,
}

static SHARED: OnceLock<PgServer> = OnceLock::new();
static SEQ: AtomicU64 = AtomicU64::new(0);

unsafe extern "C" {
    fn atexit(cb: extern "C" fn()) -> std::ffi::c_int;
}

extern "C" fn stop_shared_at_exit() {
    if let Some(s) = SHARED.get() {
        s.stop();
    }
}

/// The server shared by every test of this binary run (started on first use).
pub fn pg_shared() -> &'static PgServer {
    SHARED.get_or_init(|| {
        let s = PgServer::start();
        // SAFETY: registering a plain extern "C" fn with libc's atexit.
        unsafe {
            atexit(stop_shared_at_exit);
        }
        s
    })
}

/// A fresh, empty database on the shared server; returns its URL.
pub fn pg_fresh_url() -> String {
    pg_shared().fresh_url()
}

fn pg_bin_dir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b).unwrap_or_else(|| {
        panic!(
            "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb): install the Debian package \
             `postgresql` (.ci/run does) to run the PostgreSQL backend tests"
        )
    })
}

/// Whether the tests run as root (then the server runs as the postgres user).
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

impl PgServer {
    /// initdb + pg_ctl start on a free loopback port (retried on a port clash).
    pub fn start() -> PgServer {
        let bin = pg_bin_dir();
        let as_postgres = is_root();
        let root = std::env::temp_dir().join(format!(
            "portcullis-pg-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("sock")).unwrap();
        if as_postgres {
            let st = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&root).status().expect("run chown");
            assert!(st.success(), "chown -R postgres {}", root.display());
        }
        let data = root.join("data");
        let log = root.join("postgres.log");
        let mut s = PgServer {
            port: 0,
            bin,
            root,
            data,
            log,
            as_postgres,
            next_db: AtomicU64::new(0),
            stopped: Default::default(),
        };
        let o = s
            .admin_cmd("initdb")
            .arg("-D")
            .arg(&s.data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C"])
            .output()
            .expect("run initdb");
        assert!(o.status.success(), "initdb failed: {}", out_text(&o));
        s.spawn_watchdog();
        let mut last = String::new();
        for _ in 0..5 {
            s.port = super::free_addr().port();
            let o = s
                .admin_cmd("pg_ctl")
                .arg("-D")
                .arg(&s.data)
                .arg("-o")
                .arg(format!(
                    "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c synchronous_commit=off \
                     -c full_page_writes=off -c max_connections=400",
                    s.port,
                    s.root.join("sock").display()
                ))
                .arg("-l")
                .arg(&s.log)
                .args(["-w", "-t", "60", "start"])
                .output()
                .expect("run pg_ctl start");
            if o.status.success() {
                return s;
            }
            last = format!("{}\nlog:\n{}", out_text(&o), std::fs::read_to_string(&s.log).unwrap_or_default());
        }
        panic!("pg_ctl start failed 5 times: {last}");
    }

    /// A command from the server's bin dir, run as the postgres user when we are root.
    fn admin_cmd(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        let mut c = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        c.stdin(Stdio::null()).current_dir(&self.root);
        c
    }

    /// Stops the server and removes its files even if this process is killed: a detached shell waits for our
    /// PID to end, then runs `pg_ctl stop -m immediate` and deletes the temp dir.
    fn spawn_watchdog(&self) {
        let script = r#"
            while kill -0 "$1" 2>/dev/null; do sleep 1; done
            if [ "$(id -u)" -eq 0 ]; then
              runuser -u postgres -- "$2/pg_ctl" -D "$3" stop -m immediate >/dev/null 2>&1
            else
              "$2/pg_ctl" -D "$3" stop -m immediate >/dev/null 2>&1
            fi
            rm -rf "$4"
        "#;
        let mut c = if Path::new("/usr/bin/setsid").exists() || Path::new("/bin/setsid").exists() {
            let mut c = Command::new("setsid");
            c.arg("sh");
            c
        } else {
            Command::new("sh")
        };
        let _ = c
            .arg("-c")
            .arg(script)
            .arg("watchdog")
            .arg(std::process::id().to_string())
            .arg(&self.bin)
            .arg(&self.data)
            .arg(&self.root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a new empty database; returns its name.
    pub fn create_db(&self) -> String {
        let name = format!("t{}_{}", std::process::id(), self.next_db.fetch_add(1, Ordering::Relaxed));
        let mut last = String::new();
        for _ in 0..5 {
            let o = self.psql_output("postgres", &format!("CREATE DATABASE {name}"));
            if o.status.success() {
                return name;
            }
            last = out_text(&o);
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        panic!("CREATE DATABASE {name} failed: {last}");
    }

    /// A new empty database's URL.
    pub fn fresh_url(&self) -> String {
        self.url(&self.create_db())
    }

    fn psql_output(&self, db: &str, sql: &str) -> std::process::Output {
        Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "-d", db])
            .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null())
            .output()
            .expect("run psql")
    }

    /// Runs SQL with psql; panics on failure; returns the unaligned tuples-only output.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let o = self.psql_output(db, sql);
        assert!(o.status.success(), "psql {sql:?} on {db}: {}", out_text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `pg_dump` of the database (plain SQL), plus every `\x...` bytea literal in it decoded, so a grep for
    /// clear text also sees inside binary columns.
    pub fn dump_bytes(&self, db: &str) -> Vec<u8> {
        let o = Command::new(self.bin.join("pg_dump"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", db])
            .stdin(Stdio::null())
            .output()
            .expect("run pg_dump");
        assert!(o.status.success(), "pg_dump {db}: {}", out_text(&o));
        let mut out = o.stdout.clone();
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let mut rest = text.as_str();
        while let Some(i) = rest.find("\\x") {
            let hex: String = rest[i + 2..].chars().take_while(|c| c.is_ascii_hexdigit()).collect();
            if hex.len() >= 2 && hex.len().is_multiple_of(2) {
                out.push(b'\n');
                out.extend(hex::decode(&hex).unwrap_or_default());
            }
            rest = &rest[i + 2 + hex.len()..];
        }
        out
    }

    /// `pg_ctl restart -m fast` (same port and options).
    pub fn restart(&self) {
        let o = self
            .admin_cmd("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", "60", "-m", "fast", "restart"])
            .output()
            .expect("run pg_ctl restart");
        assert!(
            o.status.success(),
            "pg_ctl restart failed: {}\nlog:\n{}",
            out_text(&o),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `pg_ctl stop -m fast` and remove the temp dir (idempotent).
    pub fn stop(&self) {
        if self.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        let _ = self
            .admin_cmd("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", "30", "-m", "fast", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}
