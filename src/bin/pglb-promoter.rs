//! `pglb-promoter`: parse arguments, set up logging, load the config, run the failover sidecar
//! or one of its one-shot commands (check, switchover, rejoin).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser, Subcommand};
use pglb::config::{Config, Secrets, StoreKind};
use pglb::promoter::{self, promote::PgPromoter, settings::Settings};
use pglb::telemetry::{init_logging, LogFormat};

/// pglb-promoter: the failover sidecar of pglb.
///
/// Promotes the most advanced replica when the primary is really gone (its own checks for
/// failover_after, the replicas and every reachable pglb agreeing), re-points the other
/// replicas and fences an old primary that comes back. Reads the same lb.toml as pglb, with a
/// [promoter] section (see docs/failover.md).
#[derive(Parser, Debug)]
#[command(name = "pglb-promoter", version)]
struct Args {
    /// Config file (TOML, the one pglb reads, with a [promoter] section); reloaded on change
    /// and on SIGHUP.
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
    /// Same as `run --dry-run`: observe and decide, log what would be done, change nothing.
    #[arg(long)]
    dry_run: bool,
    /// This promoter's identity: in its logs, `/status`, and with `[store]` the leader key and
    /// its member key. Unique among the promoters of one cluster. Default: the host name.
    #[arg(long, global = true, env = "PGLB_PROMOTER_ID")]
    id: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the sidecar (the default).
    Run {
        /// Observe and decide, log what would be done, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Validate the config and the [promoter] section (secrets resolved) and exit.
    Check,
    /// Planned switchover: old primary read-only, NAME catches up exactly, NAME promoted,
    /// others re-pointed. Prints a JSON report.
    Switchover {
        /// Backend to promote.
        #[arg(long)]
        to: String,
        /// Bound on the wait for NAME to replay the old primary's final WAL.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Turn a former primary into a standby of the current primary: stop, pg_rewind, standby
    /// config, start, wait for streaming. Runs where the server's data directory is.
    Rejoin {
        /// The backend's name in the config.
        #[arg(long)]
        name: String,
        /// Its data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// Directory holding pg_ctl and pg_rewind (default: pg_config --bindir, else PATH).
        #[arg(long, env = "PGLB_PG_BIN")]
        pg_bin: Option<PathBuf>,
        /// Server log file for pg_ctl -l.
        #[arg(long)]
        log: Option<PathBuf>,
        /// Rewind and configure only; something else starts the server.
        #[arg(long)]
        no_start: bool,
        /// Bound on the wait for streaming after the start.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

/// EX_USAGE: the config is wrong.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let args = Args::parse();
    let command = match (args.command, args.dry_run) {
        (None, dry_run) => Command::Run { dry_run },
        (Some(Command::Run { dry_run }), top) => Command::Run {
            dry_run: dry_run || top,
        },
        (Some(_), true) => Args::command()
            .error(
                ErrorKind::ArgumentConflict,
                "--dry-run applies to the sidecar itself (`pglb-promoter --dry-run` or `run --dry-run`)",
            )
            .exit(),
        (Some(c), false) => c,
    };
    // The promoter reads only its own secrets: pglb's check password is not needed here.
    let config = match Config::load_with(&args.config, Secrets::Optional) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pglb-promoter: invalid config: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let settings = match Settings::from_config(&config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("pglb-promoter: invalid config: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Command::Check = command {
        eprintln!(
            "pglb-promoter: {} is valid: {} backends, failover_after {:?}, synchronous {}",
            args.config.display(),
            settings.members.len(),
            settings.failover_after,
            settings.synchronous
        );
        return ExitCode::SUCCESS;
    }
    let id = match args.id.clone().map(Ok).unwrap_or_else(promoter::default_id) {
        Ok(id) if promoter::valid_id(&id) => id,
        Ok(id) => {
            eprintln!(
                "pglb-promoter: --id {id:?}: use 1 to 128 characters among letters, digits, '.', '_' and '-'"
            );
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(e) => {
            eprintln!("pglb-promoter: no --id given and the host name is unreadable: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_logging(args.log_format);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pglb-promoter: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = rt.block_on(async move {
        match command {
            Command::Run { dry_run } => {
                promoter::run(config, promoter::RunOptions { dry_run, id }).await
            }
            Command::Check => Ok(()),
            Command::Switchover { to, timeout } if config.store.kind == StoreKind::Etcd => {
                // With a store the leader switches over (through its guarded record).
                let report = promoter::switchover::request(&config.store, &to, timeout).await?;
                println!("{}", serde_json::to_string(&report)?);
                Ok(())
            }
            Command::Switchover { to, timeout } => {
                let pg = PgPromoter::new(std::sync::Arc::new(settings.clone()));
                let report = promoter::switchover::run(&pg, &settings, &to, timeout).await?;
                println!("{}", serde_json::to_string(&report)?);
                Ok(())
            }
            Command::Rejoin {
                name,
                data_dir,
                pg_bin,
                log,
                no_start,
                timeout,
            } => {
                let opts = promoter::rejoin::RejoinOptions {
                    name,
                    data_dir,
                    pg_bin,
                    log,
                    start: !no_start,
                    timeout,
                };
                let report = promoter::rejoin::run(&settings, &opts).await?;
                println!("{}", serde_json::to_string(&report)?);
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "pglb-promoter failed");
            ExitCode::FAILURE
        }
    }
}
