//! The command line: `serve`, `check-config`, `demo` and the `user` commands, which work while `serve` runs.

use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use crate::accounts::{Accounts, Actor, Keep, NewAccount, validate};
use crate::clock::{SystemClock, rfc3339};
use crate::config::Config;
use crate::credentials::password;
use crate::mail::Outbox;
use crate::notify::Notifier;
use crate::store::{Store, User, normalize_login};

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
    /// Show the audit events about an account (or an invited address), newest first.
    Audit {
        /// Username or address.
        subject: String,
        /// At most this many events.
        #[arg(long, default_value_t = 200)]
        limit: usize,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
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
    /// End every session of a user (they sign in again; nothing else changes).
    EndSessions {
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
            for warning in config.warnings() {
                eprintln!("warning: {warning}");
            }
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
        Command::Audit { subject, limit, json } => {
            init_logging(&quiet);
            let config = Config::load(&cli.config)?;
            let store = Store::from_config(&config.storage)
                .await
                .with_context(|| format!("opening {}", config.storage.display_name()))?;
            let events = store.audit_for_user(&normalize_login(&subject), limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&events)?);
            } else {
                print_events(&events);
            }
            Ok(())
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
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    tracing::info!(listen = %config.server.listen, "portcullis serving");
    crate::run(listener, config, crate::server::shutdown_signal()).await?;
    Ok(())
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

/// The account operations the `user` commands call: the same as the web's, mail delivered before exiting.
fn accounts(store: &Store, config: &Config) -> Result<Accounts> {
    let keys = crate::keys::Keys::load_or_create(&config.storage.secret_key_file)?;
    let outbox = Outbox::now(&config.mail).context("the [mail] settings")?;
    let notifier = Notifier::new(store.clone(), outbox, &config.portal.title, config.mail_ready());
    let hasher = password::Hasher::new(1)?;
    Ok(Accounts::new(config, store.clone(), keys, Arc::new(SystemClock), hasher, notifier))
}

async fn user(store: &Store, config: &Config, cmd: UserCommand) -> Result<()> {
    let accounts = accounts(store, config)?;
    let cli = &Actor::Cli;
    match cmd {
        UserCommand::Add { name, email, name_display, groups, password_stdin } => {
            // Checked before the password is asked for, so a typo costs no typing.
            validate::username(&name)?;
            validate::email(&email)?;
            validate::groups(&groups)?;
            let password = read_password(password_stdin)?;
            let new =
                NewAccount { username: name, email, display_name: name_display.unwrap_or_default(), groups, password };
            let user = accounts.create(cli, new).await?;
            println!("user {} added", user.username);
        }
        UserCommand::List { json, two_factor } => {
            let mut users = store.list_users().await?;
            if let Some(f) = two_factor {
                users.retain(|u| u.factors.on() == (f == TwoFactorFilter::Enabled));
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
                        if u.factors.on() { "on" } else { "off" },
                        if u.locked { "yes" } else { "no" },
                        u.last_login.as_ref().map_or("never".into(), |l| rfc3339(l.at))
                    );
                }
            }
        }
        UserCommand::Show { name, json } => show(store, &accounts.find(&name).await?, json).await?,
        UserCommand::Passwd { name, password_stdin } => {
            let user = accounts.find(&name).await?;
            let pw = read_password(password_stdin)?;
            accounts.set_password(cli, &user.username, &pw, Keep::Nothing).await?;
            println!("password of {} changed; their sessions ended", user.username);
        }
        UserCommand::Lock { name } => {
            let u = accounts.lock(cli, &name).await?;
            println!("user {} locked; their sessions ended", u.username);
        }
        UserCommand::Unlock { name } => {
            let u = accounts.unlock(cli, &name).await?;
            println!("user {} unlocked", u.username);
        }
        UserCommand::Delete { name } => {
            let u = accounts.delete(cli, &name).await?;
            println!("user {} deleted", u.username);
        }
        UserCommand::EndSessions { name } => {
            let (u, n) = accounts.end_sessions(cli, &name).await?;
            println!("{n} session{} of {} ended", if n == 1 { "" } else { "s" }, u.username);
        }
        UserCommand::Invite { email, groups } => {
            let email = accounts.invite(cli, &email, &groups).await?;
            println!("invitation sent to {email}");
        }
        UserCommand::Reset2fa { name } => {
            let (u, was_on) = accounts.reset_two_factor(cli, &name, Keep::Nothing).await?;
            if was_on {
                println!("two-factor authentication of {} removed; their sessions ended", u.username);
            } else {
                println!("{} had no two-factor authentication; their sessions ended", u.username);
            }
        }
    }
    Ok(())
}

async fn show(store: &Store, u: &User, json: bool) -> Result<()> {
    if json {
        let mut v = user_json(u);
        let events = store.audit_for_user(&u.username, 20).await?;
        v["recent_events"] = serde_json::to_value(events)?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("username:  {}", u.username);
    println!("email:     {}", u.email);
    println!("name:      {}", u.display_name);
    println!("groups:    {}", u.groups.join(","));
    println!("locked:    {}", if u.locked { "yes" } else { "no" });
    println!("created:   {}", rfc3339(u.created));
    match u.factors.enabled_at() {
        Some(since) => println!(
            "2FA:       on since {} ({}), {} recovery codes left",
            rfc3339(since),
            u.factors.kinds().iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", "),
            u.factors.recovery.len()
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
        print_events(&events);
    }
    Ok(())
}

fn print_events(events: &[crate::audit::AuditEvent]) {
    for e in events {
        println!(
            "  {}  {:<28} {:<16} {}{}",
            rfc3339(e.at),
            e.kind.as_str(),
            e.address.as_deref().unwrap_or("-"),
            e.actor.as_ref().map(|a| format!("by {a} ")).unwrap_or_default(),
            e.detail.as_deref().unwrap_or_default().escape_debug()
        );
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
            "enabled": u.factors.on(),
            "enabled_at": u.factors.enabled_at().map(rfc3339),
            "recovery_codes_left": u.factors.recovery.len(),
            "factors": u.factors.enrolled.iter().map(|f| serde_json::json!({
                "kind": f.kind(),
                "enabled_at": rfc3339(f.enabled_at()),
            })).collect::<Vec<_>>(),
        },
        "last_login": u.last_login.as_ref().map(|l| serde_json::json!({
            "at": rfc3339(l.at),
            "address": l.address,
            "second_factor": l.second_factor,
        })),
    })
}
