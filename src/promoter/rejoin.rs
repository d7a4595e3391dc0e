//! `pglb-promoter rejoin --name NAME --data-dir DIR`: turns a former primary (or any diverged
//! server) into a standby of the current primary. It needs the server's data directory, so it
//! runs where the server runs: stop it (fast), create its slot on the primary, `pg_rewind` from
//! the primary, write `standby.signal` and its `primary_conninfo`/`primary_slot_name` (dropping
//! the fence and any synchronous standby list) into `postgresql.auto.conf`, start it again with
//! its previous command line (`pg_ctl restart` reads `postmaster.opts`) and wait until the
//! primary lists it as streaming. Server programs run as the data directory's owner (through
//! `runuser` when called as root). pg_rewind copies `postgresql.conf` and `postgresql.auto.conf`
//! from the primary: a `port` kept there brings the server back on the primary's port, which is
//! checked (`postmaster.pid`) and reported.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::process::Command;
use tracing::{info, warn};

use super::decide::{self, Policy, Primary, State};
use super::observe;
use super::promote::{ActError, PgPromoter, Promoter};
use super::settings::{Member, Settings};

/// What `rejoin` was asked to do.
#[derive(Debug, Clone)]
pub struct RejoinOptions {
    /// The backend's name in the config.
    pub name: String,
    pub data_dir: PathBuf,
    /// Directory with pg_ctl and pg_rewind; None: `pg_config --bindir`, else `PATH`.
    pub pg_bin: Option<PathBuf>,
    /// Server log for `pg_ctl -l`; None: the server's output is discarded.
    pub log: Option<PathBuf>,
    /// Start the server after rewinding (off when something else starts it, e.g. a container
    /// entrypoint).
    pub start: bool,
    /// Bound on the wait for streaming after the start.
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RejoinError {
    #[error("no backend named {0:?} in the config")]
    UnknownBackend(String),
    #[error("no single primary answers ({0}); nothing to rejoin to")]
    NoPrimary(String),
    #[error("{0} is the primary; rejoin is for a server that is not")]
    IsPrimary(String),
    #[error("{0} is not a PostgreSQL data directory (no PG_VERSION)")]
    NotADataDir(PathBuf),
    #[error("{what} failed ({status}):\n{output}")]
    Command {
        what: &'static str,
        status: String,
        output: String,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the server still runs (postmaster.pid names a live process) after pg_ctl stop")]
    StillRunning,
    #[error(transparent)]
    Act(#[from] ActError),
    #[error(
        "{name} came back on port {actual}, not on its own port {expected} ({address}); it was \
         stopped again. pg_rewind copied postgresql.conf and postgresql.auto.conf from {primary}: \
         keep node-specific settings (port, listen_addresses, cluster_name) on the server's command \
         line (pg_ctl -o, kept in postmaster.opts) or in a file outside the data directory"
    )]
    WrongPort {
        name: String,
        address: String,
        expected: u16,
        actual: u16,
        primary: String,
    },
    #[error(
        "{name} is not streaming from {primary} {after:?} after its start; see its server log"
    )]
    NotStreaming {
        name: String,
        primary: String,
        after: Duration,
    },
}

/// What rejoin did, printed as JSON by the CLI.
#[derive(Debug, Clone, Serialize)]
pub struct RejoinReport {
    pub name: String,
    pub primary: String,
    pub rewind: String,
    pub started: bool,
    pub streaming_after_seconds: Option<f64>,
}

/// Settings `rejoin` removes from `postgresql.auto.conf` before writing its own.
const DROPPED: &[&str] = &[
    "primary_conninfo",
    "primary_slot_name",
    "default_transaction_read_only",
    "synchronous_standby_names",
];

fn conf_quote(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "''"))
}

/// `postgresql.auto.conf` for a standby: the old text without the fence, the synchronous
/// standby list and any previous upstream, plus the new upstream.
pub fn standby_auto_conf(existing: &str, conninfo: &str, slot: &str) -> String {
    let mut out = String::new();
    for line in existing.lines() {
        let key = line
            .split('=')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if DROPPED.contains(&key.as_str()) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out.push_str(&format!("primary_conninfo = {}\n", conf_quote(conninfo)));
    out.push_str(&format!("primary_slot_name = {}\n", conf_quote(slot)));
    out
}

/// pg_rewind's `--source-server`: the promoter's own login (the password goes by environment)
/// with its TLS settings, so a primary that takes only `hostssl` logins can be the source.
pub fn rewind_source(host: &str, port: u16, login: &super::settings::Login) -> String {
    use super::promote::conninfo_value as q;
    let mut s = format!(
        "host={} port={port} user={} dbname={} connect_timeout=10 application_name=pglb-promoter-rejoin sslmode={}",
        q(host),
        q(&login.user),
        q(&login.database),
        login.tls.sslmode.as_str()
    );
    for (key, path) in [
        ("sslrootcert", &login.tls.sslrootcert),
        ("sslcert", &login.tls.sslcert),
        ("sslkey", &login.tls.sslkey),
    ] {
        if let Some(p) = path {
            s.push_str(&format!(" {key}={}", q(&p.display().to_string())));
        }
    }
    s
}

/// Where the server programs are.
fn bin_dir(opt: &Option<PathBuf>) -> Option<PathBuf> {
    if let Some(d) = opt {
        return Some(d.clone());
    }
    let out = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The OS user owning `dir`, when we are root and it is not.
fn owner_name(dir: &Path) -> Option<String> {
    let me = fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX);
    let owner = fs::metadata(dir).ok()?.uid();
    if me != 0 || owner == 0 {
        return None;
    }
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 2 && f[2].parse() == Ok(owner)).then(|| f[0].to_string())
    })
}

struct Tools {
    bin: Option<PathBuf>,
    runas: Option<String>,
}

impl Tools {
    fn command(&self, program: &str) -> Command {
        let path = match &self.bin {
            Some(d) => d.join(program),
            None => PathBuf::from(program),
        };
        let mut cmd = match &self.runas {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(path);
                c
            }
            None => Command::new(path),
        };
        cmd.stdin(Stdio::null()).kill_on_drop(true);
        cmd
    }

    async fn run(
        &self,
        what: &'static str,
        mut cmd: Command,
        timeout: Duration,
        capture: bool,
    ) -> Result<String, RejoinError> {
        if capture {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        } else {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
        let child = cmd.spawn().map_err(|source| RejoinError::Io {
            what,
            path: PathBuf::from(what),
            source,
        })?;
        let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(Ok(out)) => out,
            Ok(Err(source)) => {
                return Err(RejoinError::Io {
                    what,
                    path: PathBuf::from(what),
                    source,
                })
            }
            Err(_) => {
                return Err(RejoinError::Command {
                    what,
                    status: format!("no exit within {timeout:?}"),
                    output: String::new(),
                })
            }
        };
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            Ok(text)
        } else {
            Err(RejoinError::Command {
                what,
                status: out.status.to_string(),
                output: text,
            })
        }
    }
}

/// The port a running server listens on: line 4 of `postmaster.pid`.
fn postmaster_port(data: &Path) -> Option<u16> {
    fs::read_to_string(data.join("postmaster.pid"))
        .ok()?
        .lines()
        .nth(3)?
        .trim()
        .parse()
        .ok()
}

fn postmaster_alive(data: &Path) -> bool {
    fs::read_to_string(data.join("postmaster.pid"))
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
        .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
}

fn write_owned(path: &Path, text: &str, like: &Path) -> Result<(), RejoinError> {
    let io = |what| {
        move |source| RejoinError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    };
    fs::write(path, text).map_err(io("write"))?;
    let meta = fs::metadata(like).map_err(io("stat"))?;
    std::os::unix::fs::chown(path, Some(meta.uid()), Some(meta.gid())).map_err(io("chown"))?;
    fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(io("chmod"))?;
    Ok(())
}

/// Runs the rejoin.
pub async fn run(settings: &Settings, opts: &RejoinOptions) -> Result<RejoinReport, RejoinError> {
    let me: Member = settings
        .member(&opts.name)
        .cloned()
        .ok_or_else(|| RejoinError::UnknownBackend(opts.name.clone()))?;
    let data = &opts.data_dir;
    if !data.join("PG_VERSION").exists() {
        return Err(RejoinError::NotADataDir(data.clone()));
    }
    let obs = observe::observe(settings).await;
    let mut state = State::new(
        Policy::new(settings.failover_after, settings.synchronous),
        obs.at,
    );
    state.note(&obs);
    let primary = match decide::topology(&obs, &state).primary {
        Primary::One(p) if p.name() == me.name => return Err(RejoinError::IsPrimary(me.name)),
        Primary::One(p) => p.member.clone(),
        Primary::None => return Err(RejoinError::NoPrimary("none answers".into())),
        Primary::Many(ps) => {
            return Err(RejoinError::NoPrimary(format!(
                "several: {}",
                ps.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
            )))
        }
    };
    info!(step = "start", node = %me.name, primary = %primary.name, data_dir = %data.display(), "rejoin");
    let tools = Tools {
        bin: bin_dir(&opts.pg_bin),
        runas: owner_name(data),
    };

    // 1. Stop it (a rewind needs a stopped server).
    if postmaster_alive(data) {
        let mut cmd = tools.command("pg_ctl");
        cmd.arg("-D")
            .arg(data)
            .args(["-m", "fast", "-w", "-t", "60", "stop"]);
        tools
            .run("pg_ctl stop", cmd, Duration::from_secs(90), true)
            .await?;
        if postmaster_alive(data) {
            return Err(RejoinError::StillRunning);
        }
        info!(step = "stop", node = %me.name, "rejoin: server stopped");
    }

    // 2. Its slot on the primary first, so the WAL it needs is kept. Then a CHECKPOINT there:
    // pg_rewind reads the source's timeline from its control file, which a freshly promoted
    // server updates only at its first checkpoint (its promoter may have died before taking
    // it); rewinding against the old timeline breaks the target for good.
    let pg = PgPromoter::new(std::sync::Arc::new(settings.clone()));
    pg.ensure_slot(&primary, &me.slot_name()).await?;
    pg.checkpoint(&primary).await?;
    info!(step = "checkpoint", node = %primary.name, "rejoin: checkpoint on the primary");

    // A standby.signal left by an earlier attempt would make pg_rewind's crash recovery
    // (single-user mode, which refuses standby mode) fail at every retry: it is written again
    // after the rewind.
    for signal in ["standby.signal", "recovery.signal"] {
        let path = data.join(signal);
        match fs::remove_file(&path) {
            Ok(()) => {
                info!(step = "clean", file = %path.display(), "rejoin: leftover signal file removed before the rewind")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(RejoinError::Io {
                    what: "remove",
                    path,
                    source,
                })
            }
        }
    }

    // 3. pg_rewind from the primary (it runs crash recovery first when needed). It removes
    // postmaster.opts, which `pg_ctl restart` reads to start the server as it was started.
    let opts_file = data.join("postmaster.opts");
    let postmaster_opts = fs::read_to_string(&opts_file).ok();
    let (host, port) =
        decide::split_address(&primary.address).unwrap_or_else(|| (primary.address.clone(), 5432));
    let source = rewind_source(&host, port, &settings.login);
    let mut cmd = tools.command("pg_rewind");
    cmd.arg("-D")
        .arg(data)
        .arg(format!("--source-server={source}"));
    if let Some(pw) = &settings.login.password {
        cmd.env("PGPASSWORD", pw.expose());
    }
    let rewind = tools
        .run("pg_rewind", cmd, Duration::from_secs(600), true)
        .await?;
    let rewind_summary = rewind
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string();
    info!(step = "rewind", node = %me.name, result = %rewind_summary, "rejoin: pg_rewind done");

    if let Some(o) = &postmaster_opts {
        if !opts_file.exists() {
            write_owned(&opts_file, o, &data.join("PG_VERSION"))?;
        }
    }

    // 4. Standby configuration.
    let auto = data.join("postgresql.auto.conf");
    let existing = fs::read_to_string(&auto).unwrap_or_default();
    let conninfo = pg.conninfo_for(&me, &primary);
    write_owned(
        &auto,
        &standby_auto_conf(&existing, &conninfo, &me.slot_name()),
        &data.join("PG_VERSION"),
    )?;
    write_owned(&data.join("standby.signal"), "", &data.join("PG_VERSION"))?;
    let _ = fs::remove_file(data.join("recovery.signal"));
    info!(step = "configure", node = %me.name, primary = %primary.name, slot = %me.slot_name(), "rejoin: standby.signal and primary_conninfo written");

    if !opts.start {
        return Ok(RejoinReport {
            name: me.name,
            primary: primary.name,
            rewind: rewind_summary,
            started: false,
            streaming_after_seconds: None,
        });
    }

    // 5. Start with its previous command line, then wait for streaming.
    let started = Instant::now();
    let mut cmd = tools.command("pg_ctl");
    cmd.arg("-D").arg(data).args(["-w", "-t", "60"]);
    if let Some(log) = &opts.log {
        cmd.arg("-l").arg(log);
    }
    cmd.arg("restart");
    // Without -l the postmaster inherits pg_ctl's output: never capture it then.
    tools
        .run(
            "pg_ctl restart",
            cmd,
            Duration::from_secs(90),
            opts.log.is_some(),
        )
        .await?;
    info!(step = "restart", node = %me.name, "rejoin: server started as a standby");
    // pg_rewind replaced postgresql.conf with the primary's: a port set there is the primary's.
    let expected = decide::split_address(&me.address).map(|(_, p)| p);
    if let (Some(expected), Some(actual)) = (expected, postmaster_port(data)) {
        if expected != actual {
            warn!(step = "verify", node = %me.name, expected, actual, "rejoin: the server came back on another port; stopping it");
            let mut cmd = tools.command("pg_ctl");
            cmd.arg("-D")
                .arg(data)
                .args(["-m", "fast", "-w", "-t", "60", "stop"]);
            if let Err(e) = tools
                .run("pg_ctl stop", cmd, Duration::from_secs(90), true)
                .await
            {
                warn!(step = "verify", node = %me.name, error = %e, "rejoin: could not stop the server on the wrong port");
            }
            return Err(RejoinError::WrongPort {
                name: me.name,
                address: me.address,
                expected,
                actual,
                primary: primary.name,
            });
        }
    }
    let deadline = started + opts.timeout;
    // Streaming for real: the primary lists it as streaming AND its own WAL receiver streams
    // on the primary's timeline, on two looks a second apart (a standby whose timeline forked
    // off before its recovery point connects, is listed for a moment, and fails in a loop).
    let mut first_seen: Option<Instant> = None;
    loop {
        let primary_st = pg.status(&primary).await.ok();
        let me_st = pg.status(&me).await.ok();
        let ok = match (&primary_st, &me_st) {
            (Some(p), Some(m)) => {
                p.streaming_standbys.iter().any(|a| a == &me.name)
                    && m.in_recovery
                    && m.receiver.as_ref().is_some_and(|r| r.is_streaming())
                    && m.timeline >= p.timeline
            }
            _ => false,
        };
        if !ok {
            first_seen = None;
        } else if first_seen.is_none() {
            first_seen = Some(Instant::now());
        }
        if first_seen.is_some_and(|t| t.elapsed() >= Duration::from_secs(1)) {
            let after = started.elapsed();
            info!(step = "verify", node = %me.name, primary = %primary.name, after_s = after.as_secs_f64(), "rejoin: streaming from the primary");
            return Ok(RejoinReport {
                name: me.name,
                primary: primary.name,
                rewind: rewind_summary,
                started: true,
                streaming_after_seconds: Some(after.as_secs_f64()),
            });
        }
        if Instant::now() >= deadline {
            warn!(step = "verify", node = %me.name, "rejoin: not streaming yet");
            return Err(RejoinError::NotStreaming {
                name: me.name,
                primary: primary.name,
                after: opts.timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_conf_keeps_others_and_replaces_ours() {
        let old = "# Do not edit this file manually!\n\
                   # It will be overwritten by the ALTER SYSTEM command.\n\
                   primary_conninfo = ''\n\
                   default_transaction_read_only = 'on'\n\
                   synchronous_standby_names = 'ANY 1 (\"pg-1\")'\n\
                   wal_log_hints = 'on'\n";
        let new = standby_auto_conf(old, "host=h port=1 password='x'", "pg_0");
        assert!(new.starts_with("# Do not edit"));
        assert!(new.contains("wal_log_hints = 'on'\n"));
        assert!(!new.contains("default_transaction_read_only"));
        assert!(!new.contains("synchronous_standby_names"));
        assert!(new.contains("primary_conninfo = 'host=h port=1 password=''x'''\n"));
        assert!(new.ends_with("primary_slot_name = 'pg_0'\n"));
        assert_eq!(new.matches("primary_conninfo").count(), 1);
    }
}
