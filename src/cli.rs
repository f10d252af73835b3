//! The command line: `serve`, `check-config`, `demo` and the `user` commands, which work while `serve` runs.

use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use crate::audit::{AuditEvent, EventKind};
use crate::clock::{Clock, SystemClock, rfc3339};
use crate::config::Config;
use crate::credentials::password;
use crate::store::{Revoke, Store, User, normalize_login};

/// Command-line interface.
#[derive(Debug, Parser)]
#[command(name = "portcullis", version, about = "Two-factor authentication gateway for web applications")]
pub struct Cli {
    /// Config file.
    #[arg(short, long, global = true, env = "PORTCULLIS_CONFIG", default_value = "config/portcullis.toml")]
    pub config: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve,
    /// Validate the config file without starting.
    CheckConfig,
    /// Zero set-up demo: a whoami app behind the gateway, state in ./demo-data.
    Demo {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
    },
    /// Manage users.
    #[command(subcommand)]
    User(UserCommand),
    /// Manage storage.
    #[command(subcommand)]
    Storage(StorageCommand),
}

/// `storage` subcommands.
#[derive(Debug, Subcommand)]
pub enum StorageCommand {
    /// Copy an embedded redb store (users, second factors, sessions, tokens, audit) into the PostgreSQL database
    /// the config names. Use the same secret_key_file: secrets stay encrypted under it.
    MigrateFromRedb {
        /// The redb file to copy from.
        #[arg(long)]
        from: PathBuf,
    },
}

/// `user` subcommands.
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add a user.
    Add {
        /// Username.
        name: String,
        /// Email address.
        #[arg(long)]
        email: String,
        /// Display name (defaults to the username).
        #[arg(long = "name", id = "display_name")]
        name_display: Option<String>,
        /// Comma-separated groups.
        #[arg(long, value_delimiter = ',')]
        groups: Vec<String>,
        /// Read the password as one line from standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// List users.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Only users with two-factor enabled or disabled.
        #[arg(long, value_enum)]
        two_factor: Option<TwoFactorFilter>,
    },
    /// Show one user.
    Show {
        /// Username.
        name: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Set a user's password (ends their sessions).
    Passwd {
        /// Username.
        name: String,
        /// Read the password as one line from standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Lock a user (ends their sessions at once).
    Lock {
        /// Username.
        name: String,
    },
    /// Unlock a user.
    Unlock {
        /// Username.
        name: String,
    },
    /// Delete a user and their sessions.
    Delete {
        /// Username.
        name: String,
    },
    /// Invite someone by email to create an account.
    Invite {
        /// Their email address; the account will have it.
        email: String,
        /// Comma-separated groups the account gets.
        #[arg(long, value_delimiter = ',')]
        groups: Vec<String>,
    },
    /// Remove a user's two-factor authentication (lost phone) and end their sessions.
    #[command(name = "reset-2fa")]
    Reset2fa {
        /// Username.
        name: String,
    },
}

/// `--two-factor enabled|disabled`
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TwoFactorFilter {
    /// Users with two-factor on.
    Enabled,
    /// Users without.
    Disabled,
}

/// Installs the log subscriber: text or JSON lines on stderr. `PORTCULLIS_LOG` overrides the level.
pub fn init_logging(log: &crate::config::Log) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("PORTCULLIS_LOG")
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match log.format {
        crate::config::LogFormat::Json => builder.json().try_init(),
        crate::config::LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
    };
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<()> {
    let quiet = crate::config::Log { level: "warn".into(), ..Default::default() };
    match cli.command {
        Command::Serve => serve(&cli.config).await,
        Command::CheckConfig => {
            init_logging(&quiet);
            let config = Config::load(&cli.config)?;
            println!(
                "{}: OK ({} app{})",
                cli.config.display(),
                config.apps.len(),
                if config.apps.len() == 1 { "" } else { "s" }
            );
            Ok(())
        }
        Command::Demo { listen } => {
            init_logging(&crate::config::Log::default());
            crate::demo::run(listen).await
        }
        Command::User(cmd) => {
            init_logging(&quiet);
            let config = Config::load(&cli.config)?;
            let store = Store::from_config(&config.storage)
                .await
                .with_context(|| format!("opening {}", config.storage.display_name()))?;
            let result = user(&store, &config, cmd).await;
            store.announce(&config.storage);
            result
        }
        Command::Storage(StorageCommand::MigrateFromRedb { from }) => {
            init_logging(&quiet);
            let config = Config::load(&cli.config)?;
            if config.storage.backend != crate::config::StorageBackend::Postgres {
                bail!("the config's [storage] backend must be \"postgres\" (the destination)");
            }
            let source = Store::open(&from).with_context(|| format!("opening {}", from.display()))?;
            let dump = source.dump().await?;
            let counts = (dump.users.len(), dump.sessions.len(), dump.tokens.len(), dump.audit.len());
            let dest = Store::from_config(&config.storage).await.context("connecting to PostgreSQL")?;
            dest.import(dump).await?;
            println!(
                "copied {} users, {} sessions, {} tokens and {} audit events from {} to PostgreSQL",
                counts.0,
                counts.1,
                counts.2,
                counts.3,
                from.display()
            );
            Ok(())
        }
    }
}

async fn serve(path: &Path) -> Result<()> {
    let config = Config::load(path)?;
    init_logging(&config.log);
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("binding {}", config.server.listen))?;
    tracing::info!(listen = %config.server.listen, "portcullis serving");
    crate::run(listener, config, shutdown_signal()).await?;
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}

/// Checks a username: 1..=64 of letters, digits and `._@+-` after normalisation.
pub fn valid_username(name: &str) -> Result<String> {
    let n = normalize_login(name);
    let ok = (1..=64).contains(&n.chars().count()) && n.chars().all(|c| c.is_alphanumeric() || "._@+-".contains(c));
    if !ok {
        bail!("a username is 1 to 64 letters, digits or . _ @ + -");
    }
    Ok(n)
}

/// Checks an email address loosely (one `@`, no spaces) and normalises it.
pub fn valid_email(email: &str) -> Result<String> {
    let e = normalize_login(email);
    let ok = e.len() <= 254
        && e.split('@').count() == 2
        && !e.starts_with('@')
        && !e.ends_with('@')
        && !e.chars().any(|c| c.is_whitespace() || c.is_control() || c == ',');
    if !ok {
        bail!("{email:?} is not an email address");
    }
    Ok(e)
}

fn valid_group(g: &str) -> Result<String> {
    let g = g.trim();
    if g.is_empty() || !g.chars().all(|c| c.is_alphanumeric() || "._-".contains(c)) {
        bail!("group {g:?} may hold only letters, digits and . _ -");
    }
    Ok(g.to_string())
}

/// Reads a new password: one line from stdin, or a prompt twice on a terminal.
fn read_password(from_stdin: bool) -> Result<String> {
    let pw = if from_stdin || !std::io::stdin().is_terminal() {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        line.strip_suffix('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)).unwrap_or(&line).to_string()
    } else {
        let a = rpassword::prompt_password("New password: ")?;
        let b = rpassword::prompt_password("Repeat password: ")?;
        if a != b {
            bail!("the passwords differ");
        }
        a
    };
    password::check_new(&pw)?;
    Ok(pw)
}

/// Sends one email at once (the CLI has no background queue).
async fn mail_now(config: &Config, email: crate::mail::Email) {
    if !config.mail_ready() {
        return;
    }
    let sent = match crate::mail::Sender::new(&config.mail) {
        Ok(sender) => sender.deliver(&email).await,
        Err(e) => Err(e),
    };
    if let Err(e) = sent {
        eprintln!("warning: could not send the {} email to {}: {e}", email.kind, email.to);
    }
}

/// Tells the user by email what an operator did.
async fn notice(config: &Config, u: &User, notice: crate::notify::Notice) {
    mail_now(config, crate::notify::compose(&config.portal.title, u, &notice, SystemClock.now())).await;
}

async fn user(store: &Store, config: &Config, cmd: UserCommand) -> Result<()> {
    let now = SystemClock.now();
    match cmd {
        UserCommand::Add { name, email, name_display, groups, password_stdin } => {
            let username = valid_username(&name)?;
            let email = valid_email(&email)?;
            let groups =
                groups.iter().filter(|g| !g.trim().is_empty()).map(|g| valid_group(g)).collect::<Result<Vec<_>>>()?;
            let pw = read_password(password_stdin)?;
            let hash = tokio::task::spawn_blocking(move || password::hash_blocking(&pw)).await??;
            let user = User {
                display_name: name_display.unwrap_or_else(|| name.trim().to_string()),
                username: username.clone(),
                email,
                groups,
                password_hash: hash,
                locked: false,
                created: now,
                last_login: None,
                two_factor: None,
                stamp: 0,
            };
            store.create_user(user).await?;
            audit(store, &username, "add").await;
            println!("user {username} added");
        }
        UserCommand::List { json, two_factor } => {
            let mut users = store.list_users().await?;
            if let Some(f) = two_factor {
                users.retain(|u| u.two_factor.is_some() == (f == TwoFactorFilter::Enabled));
            }
            if json {
                let list: Vec<_> = users.iter().map(user_json).collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!("{:<24} {:<32} {:<8} {:<6} LAST LOGIN", "USERNAME", "EMAIL", "2FA", "LOCKED");
                for u in &users {
                    println!(
                        "{:<24} {:<32} {:<8} {:<6} {}",
                        u.username,
                        u.email,
                        if u.two_factor.is_some() { "on" } else { "off" },
                        if u.locked { "yes" } else { "no" },
                        u.last_login.as_ref().map_or("never".into(), |l| rfc3339(l.at))
                    );
                }
            }
        }
        UserCommand::Show { name, json } => {
            let u = find(store, &name).await?;
            if json {
                let mut v = user_json(&u);
                let events = store.audit_for_user(&u.username, 20).await?;
                v["recent_events"] = serde_json::to_value(events)?;
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("username:  {}", u.username);
                println!("email:     {}", u.email);
                println!("name:      {}", u.display_name);
                println!("groups:    {}", u.groups.join(","));
                println!("locked:    {}", if u.locked { "yes" } else { "no" });
                println!("created:   {}", rfc3339(u.created));
                match &u.two_factor {
                    Some(t) => println!(
                        "2FA:       on since {}, {} recovery codes left",
                        rfc3339(t.enabled_at),
                        t.recovery.len()
                    ),
                    None => println!("2FA:       off"),
                }
                match &u.last_login {
                    Some(l) => println!(
                        "last login: {} from {} ({})",
                        rfc3339(l.at),
                        l.address,
                        match l.second_factor {
                            Some(crate::store::SecondFactor::Totp) => "with TOTP",
                            Some(crate::store::SecondFactor::RecoveryCode) => "with a recovery code",
                            None => "password only",
                        }
                    ),
                    None => println!("last login: never"),
                }
                let events = store.audit_for_user(&u.username, 20).await?;
                if !events.is_empty() {
                    println!("recent security events:");
                    for e in events {
                        println!(
                            "  {}  {:<28} {:<16} {}{}",
                            rfc3339(e.at),
                            e.kind.as_str(),
                            e.address.as_deref().unwrap_or("-"),
                            e.actor.map(|a| format!("by {a} ")).unwrap_or_default(),
                            e.detail.unwrap_or_default().escape_debug()
                        );
                    }
                }
            }
        }
        UserCommand::Passwd { name, password_stdin } => {
            let u = find(store, &name).await?;
            let pw = read_password(password_stdin)?;
            let hash = tokio::task::spawn_blocking(move || password::hash_blocking(&pw)).await??;
            store.set_password(&u.username, hash).await?;
            audit(store, &u.username, "passwd").await;
            notice(config, &u, crate::notify::Notice::PasswordChanged).await;
            println!("password of {} changed; their sessions ended", u.username);
        }
        UserCommand::Lock { name } => {
            let u = find(store, &name).await?;
            store.set_locked(&u.username, true).await?;
            audit(store, &u.username, "lock").await;
            notice(config, &u, crate::notify::Notice::AdminAction("your account was locked".into())).await;
            println!("user {} locked; their sessions ended", u.username);
        }
        UserCommand::Unlock { name } => {
            let u = find(store, &name).await?;
            store.set_locked(&u.username, false).await?;
            audit(store, &u.username, "unlock").await;
            println!("user {} unlocked", u.username);
        }
        UserCommand::Delete { name } => {
            let u = find(store, &name).await?;
            store.delete_user(&u.username).await?;
            audit(store, &u.username, "delete").await;
            println!("user {} deleted", u.username);
        }
        UserCommand::Invite { email, groups } => {
            if !config.invitations_enabled() {
                bail!("invitations need [mail] with a transport and public_url, and [accounts] invitations = true");
            }
            let email = valid_email(&email)?;
            let groups =
                groups.iter().filter(|g| !g.trim().is_empty()).map(|g| valid_group(g)).collect::<Result<Vec<_>>>()?;
            let keys = crate::keys::Keys::load_or_create(&config.storage.secret_key_file)?;
            let mail = crate::portal::invite::issue(store, &keys, config, &email, groups, "cli", now).await?;
            mail_now(config, mail).await;
            println!("invitation sent to {email}");
        }
        UserCommand::Reset2fa { name } => {
            let u = find(store, &name).await?;
            audit(store, &u.username, "reset-2fa").await;
            let what = "your two-factor authentication was removed".into();
            notice(config, &u, crate::notify::Notice::AdminAction(what)).await;
            if store.disable_two_factor(&u.username, Revoke::All).await? {
                println!("two-factor authentication of {} removed; their sessions ended", u.username);
            } else {
                store.revoke_sessions(&u.username).await?;
                println!("{} had no two-factor authentication; their sessions ended", u.username);
            }
        }
    }
    Ok(())
}

/// Records a CLI action in the audit log (and on stderr through tracing).
async fn audit(store: &Store, user: &str, what: &str) {
    let event = AuditEvent::new(SystemClock.now(), EventKind::CliAction, user).by("cli").detail(what);
    event.emit();
    if let Err(e) = store.append_audit(event).await {
        eprintln!("warning: could not record the action in the audit log: {e}");
    }
}

async fn find(store: &Store, name: &str) -> Result<User> {
    match store.user(&normalize_login(name)).await? {
        Some(u) => Ok(u),
        None => bail!("no user {name:?}"),
    }
}

/// The stable JSON shape of a user for scripts. Never includes hashes, secrets or codes.
pub fn user_json(u: &User) -> serde_json::Value {
    serde_json::json!({
        "username": u.username,
        "email": u.email,
        "name": u.display_name,
        "groups": u.groups,
        "locked": u.locked,
        "created": rfc3339(u.created),
        "two_factor": {
            "enabled": u.two_factor.is_some(),
            "enabled_at": u.two_factor.as_ref().map(|t| rfc3339(t.enabled_at)),
            "recovery_codes_left": u.two_factor.as_ref().map_or(0, |t| t.recovery.len()),
        },
        "last_login": u.last_login.as_ref().map(|l| serde_json::json!({
            "at": rfc3339(l.at),
            "address": l.address,
            "second_factor": l.second_factor,
        })),
    })
}
