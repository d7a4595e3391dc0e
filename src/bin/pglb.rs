//! `pglb`: parse arguments, set up logging, load the config, run the balancer.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pglb::config::{Config, Secrets};
use pglb::telemetry::{init_logging, LogFormat};

/// Layer-4 load balancer for PostgreSQL: the write port reaches the primary, the read port a
/// healthy replica within lag limits; health checks log in to every backend to learn its role.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// Config file (TOML); reloaded on change and on SIGHUP.
    #[arg(
        short,
        long,
        global = true,
        default_value = "lb.toml",
        env = "PGLB_CONFIG"
    )]
    config: PathBuf,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "PGLB_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate the config, print every resolved setting (secrets only as where they come from)
    /// and exit. A secret that cannot be read here is a warning naming it, unless --strict.
    Check {
        /// A secret that cannot be read (env var unset, file missing) is an error.
        #[arg(long)]
        strict: bool,
    },
    /// Run the balancer (the default).
    Run,
}

/// EX_USAGE: the config is wrong.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let args = Args::parse();
    // `check` validates a file where its secrets may not be present (a laptop, CI); running
    // needs every secret pglb uses.
    let secrets = match args.command {
        Some(Command::Check { strict: false }) => Secrets::Optional,
        _ => Secrets::Required,
    };
    let config = match Config::load_with(&args.config, secrets) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pglb: invalid config: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(Command::Check { .. }) = args.command {
        print!("{}", config.describe());
        for e in &config.missing_secrets {
            eprintln!("pglb: warning: {e} (needed to run; `check --strict` makes this an error)");
        }
        eprintln!("pglb: {} is valid", args.config.display());
        return ExitCode::SUCCESS;
    }
    init_logging(args.log_format);
    // The control runtime: health checks, the stats server, reloads, signals. Sessions run on
    // their own threads (pglb::proxy::workers), so this one needs a single thread.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pglb: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(pglb::app::run_balancer(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "pglb failed");
            ExitCode::FAILURE
        }
    }
}
