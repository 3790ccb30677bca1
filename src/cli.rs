//! Command line: `ringgate [serve]`, `ringgate token`, `ringgate config --print`.
//! Every config key is a flag (and an env var) on every subcommand that reads config.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::auth;
use crate::config::{Config, ConfigError, ConfigLayer, LogFormat};

#[derive(Parser, Debug)]
#[command(
    name = "ringgate",
    version,
    about = "io_uring, thread-per-core WebSocket gateway",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Option<Cmd>,
    /// With no subcommand: `serve` with these options.
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug, Clone)]
pub struct Common {
    /// TOML config file (keys as in `ringgate config --print`)
    #[arg(long, env = "RINGGATE_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub layer: ConfigLayer,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run the gateway (the default)
    Serve(Common),
    /// Print a client JWT signed with the configured jwt_secret
    Token {
        /// User id (`sub` claim)
        #[arg(long)]
        user: String,
        /// Rooms the user may join (`*` = any), comma separated
        #[arg(long, value_delimiter = ',')]
        rooms: Option<Vec<String>>,
        /// Lifetime: seconds, or with a unit (90s, 30m, 1h, 7d)
        #[arg(long, default_value = "1h")]
        ttl: String,
        #[command(flatten)]
        common: Common,
    },
    /// Live per-shard table from the admin /metrics endpoint
    Stats {
        /// Milliseconds between refreshes (rates are over this interval)
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// Tables to print, then exit (0 = until interrupted)
        #[arg(long, default_value_t = 0)]
        count: u64,
        #[command(flatten)]
        common: Common,
    },
    /// Show the effective configuration (secrets redacted)
    Config {
        /// Print the effective config as TOML (the default action)
        #[arg(long)]
        print: bool,
        #[command(flatten)]
        common: Common,
    },
}

impl Common {
    /// Flags and env over the file over defaults, validated.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let file = match &self.config {
            Some(path) => ConfigLayer::from_file(path)?,
            None => ConfigLayer::default(),
        };
        self.layer.over(file).resolve()
    }
}

/// The one log channel: tracing events on stderr, as text (ANSI colour only when stderr is a
/// terminal and NO_COLOR is unset) or one JSON object per line. `RUST_LOG` filters
/// (default `ringgate=info`). stdout carries only what a command prints as its result (the
/// `serve` ready line, a token, the config).
pub fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "ringgate=info".into());
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    // A second call (tests call `run` more than once) keeps the first subscriber.
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .try_init(),
    };
}

/// Run the parsed command line; returns the process exit code: 0 done, 2 a refused config
/// or command line (as clap's usage errors), 3 and 4 from `serve` ([`StartError::exit_code`]).
pub fn run(cli: Cli) -> i32 {
    let cmd = match cli.cmd {
        None => return serve(cli.common),
        Some(Cmd::Serve(common)) => return serve(common),
        Some(cmd) => cmd,
    };
    init_logging(LogFormat::Text);
    let result = match cmd {
        Cmd::Serve(_) => unreachable!("served above"),
        Cmd::Token {
            user,
            rooms,
            ttl,
            common,
        } => token(common, &user, rooms, &ttl),
        Cmd::Stats {
            interval_ms,
            count,
            common,
        } => common.resolve().map_err(|e| e.to_string()).and_then(|cfg| {
            crate::stats::run(
                cfg.admin_listen,
                std::time::Duration::from_millis(interval_ms.max(10)),
                count,
            )
        }),
        Cmd::Config { print: _, common } => common
            .resolve()
            .map(|cfg| print!("{}", cfg.to_toml_redacted()))
            .map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => 0,
        Err(message) => {
            eprintln!("ringgate: {message}");
            2
        }
    }
}

/// `serve`: a refused config is one plain line on stderr (no logging yet: `log_format` is
/// part of it), everything after goes through the log.
fn serve(common: Common) -> i32 {
    let cfg = match common.resolve() {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("ringgate: {e}");
            return 2;
        }
    };
    init_logging(cfg.log_format);
    match crate::server::serve(cfg) {
        Ok(()) => 0,
        Err(e) => {
            let code = e.exit_code();
            tracing::error!(exit_code = code, "{e}");
            code
        }
    }
}

fn token(common: Common, user: &str, rooms: Option<Vec<String>>, ttl: &str) -> Result<(), String> {
    let cfg = common.resolve().map_err(|e| e.to_string())?;
    let secret = cfg.jwt_secret.as_deref().ok_or(
        "token: no jwt_secret configured (use --jwt-secret, RINGGATE_JWT_SECRET or jwt_secret in the config file)",
    )?;
    auth::valid_id(user).map_err(|_| {
        "token: --user must be 1 to 128 characters without control characters".to_string()
    })?;
    let ttl_s = auth::parse_ttl(ttl).map_err(|e| format!("token: --ttl: {e}"))?;
    println!("{}", auth::mint(secret, user, rooms, ttl_s));
    Ok(())
}
