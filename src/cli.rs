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
        /// HS256 secret to sign with [default: jwt_secret of --config]
        #[arg(long, env = "RINGGATE_JWT_SECRET")]
        jwt_secret: Option<String>,
        /// TOML config file to read jwt_secret (and jwt_audience, jwt_issuer) from
        #[arg(long, env = "RINGGATE_CONFIG")]
        config: Option<PathBuf>,
        /// `aud` claim [default: jwt_audience of --config, else none]
        #[arg(long, env = "RINGGATE_JWT_AUDIENCE")]
        jwt_audience: Option<String>,
        /// `iss` claim [default: jwt_issuer of --config, else none]
        #[arg(long, env = "RINGGATE_JWT_ISSUER")]
        jwt_issuer: Option<String>,
        /// User id (`sub` claim)
        #[arg(long)]
        user: String,
        /// Rooms the user may join (`*` = any), comma separated
        #[arg(long, value_delimiter = ',')]
        rooms: Option<Vec<String>>,
        /// Lifetime: seconds, or with a unit (90s, 30m, 1h, 7d)
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
    /// Live per-shard table from the admin /metrics endpoint
    Stats {
        /// Milliseconds between refreshes (rates are over this interval)
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// Tables to print, then exit (0 = until interrupted)
        #[arg(long, default_value_t = 0)]
        count: u64,
        /// The gateway's admin address [default: admin_listen of --config, else 127.0.0.1:9090]
        #[arg(long, env = "RINGGATE_ADMIN_LISTEN")]
        admin_listen: Option<String>,
        /// TOML config file to read admin_listen from
        #[arg(long, env = "RINGGATE_CONFIG")]
        config: Option<PathBuf>,
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

/// A bad value that came from an environment variable, named as that variable (clap names
/// the flag, which the user never typed): None when the value came from the command line.
pub fn env_value_error(e: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(
        e.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation
    ) {
        return None;
    }
    let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    let flag = arg.split_whitespace().next()?.trim_start_matches("--");
    let var = format!("RINGGATE_{}", flag.replace('-', "_").to_ascii_uppercase());
    let typed =
        std::env::args().any(|a| a == format!("--{flag}") || a.starts_with(&format!("--{flag}=")));
    let value = std::env::var(&var).ok().filter(|_| !typed)?;
    let rendered = e.to_string();
    let what = match e.get(ContextKind::ValidValue) {
        Some(ContextValue::Strings(valid)) => format!(" (one of: {})", valid.join(", ")),
        // A parse failure: clap's reason is after the flag's name.
        _ => rendered
            .lines()
            .next()
            .and_then(|l| l.rsplit_once("': "))
            .map(|(_, why)| format!(": {why}"))
            .unwrap_or_default(),
    };
    Some(format!(
        "invalid value {value:?} in the environment variable {var} (config key `{}`){what}",
        flag.replace('-', "_")
    ))
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
            jwt_secret,
            config,
            jwt_audience,
            jwt_issuer,
            user,
            rooms,
            ttl,
        } => (|| {
            let path = config.as_deref();
            let secret = one_key(jwt_secret, path, |f| f.jwt_secret)?;
            let aud = one_key(jwt_audience, path, |f| f.jwt_audience)?;
            let iss = one_key(jwt_issuer, path, |f| f.jwt_issuer)?;
            token(secret, &user, rooms, &ttl, (aud.as_deref(), iss.as_deref()))
        })(),
        Cmd::Stats {
            interval_ms,
            count,
            admin_listen,
            config,
        } => one_key(admin_listen, config.as_deref(), |f| f.admin_listen)
            .and_then(|addr| {
                let addr = addr.unwrap_or_else(|| "127.0.0.1:9090".into());
                crate::config::resolve_addr(&addr)
                    .map_err(|e| format!("invalid config key `admin_listen`: {e}"))
            })
            .and_then(|addr| {
                crate::stats::run(
                    addr,
                    std::time::Duration::from_millis(interval_ms.max(10)),
                    count,
                )
            }),
        Cmd::Config { print: _, common } => {
            // A node_id nobody set is made per serving process: say so, not this pid.
            let node_id_set = common.layer.node_id.is_some()
                || common
                    .config
                    .as_deref()
                    .and_then(|p| ConfigLayer::from_file(p).ok())
                    .is_some_and(|f| f.node_id.is_some());
            common
                .resolve()
                .map(|cfg| {
                    to_stdout(&cfg.to_toml_shown(node_id_set));
                })
                .map_err(|e| e.to_string())
        }
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

/// One key for a command that needs only it: the flag (or its env var), else the config
/// file's (`token` and `stats` do not take, or check, every server key).
fn one_key(
    flag: Option<String>,
    config: Option<&std::path::Path>,
    key: impl FnOnce(ConfigLayer) -> Option<String>,
) -> Result<Option<String>, String> {
    if flag.is_some() {
        return Ok(flag);
    }
    match config {
        Some(path) => Ok(key(ConfigLayer::from_file(path).map_err(|e| e.to_string())?)),
        None => Ok(None),
    }
}

fn token(
    secret: Option<String>,
    user: &str,
    rooms: Option<Vec<String>>,
    ttl: &str,
    (audience, issuer): (Option<&str>, Option<&str>),
) -> Result<(), String> {
    let secret = secret.filter(|s| !s.is_empty()).ok_or(
        "token: no jwt_secret configured (use --jwt-secret, RINGGATE_JWT_SECRET or jwt_secret in the config file)",
    )?;
    // The gateway's own checks: a token it would refuse is refused here, naming the rule.
    crate::config::check_jwt_secret(&secret).map_err(|m| format!("token: jwt_secret {m}"))?;
    auth::client_user(user).map_err(|e| match e {
        auth::AuthError::Reserved => format!("token: --user: {e}; the gateway refuses them"),
        _ => format!(
            "token: --user must be 1 to {} bytes without control characters",
            auth::MAX_ID_LEN
        ),
    })?;
    if let Some(bad) = rooms.iter().flatten().find(|r| auth::valid_id(r).is_err()) {
        return Err(format!(
            "token: --rooms: {bad:?} is not a room id a client can join (1 to {} bytes without control characters; `*` = any)",
            auth::MAX_ID_LEN
        ));
    }
    let ttl_s = auth::parse_ttl(ttl).map_err(|e| format!("token: --ttl: {e}"))?;
    let token = auth::mint_for(&secret, user, rooms, ttl_s, audience, issuer);
    to_stdout(&format!("{token}\n"));
    Ok(())
}

/// Write a command's output; a closed stdout (`ringgate stats | head`) ends the output
/// quietly: `print!` would panic on the broken pipe. False when it could not be written.
pub fn to_stdout(text: &str) -> bool {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .is_ok()
}
