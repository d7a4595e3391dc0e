//! Integration-test harness: real PostgreSQL 15 clusters and a spawned `pglb` binary.
//!
//! Owns: the process-wide port registry, `PgNode`/`PgCluster` (initdb, streaming replicas via
//! `pg_basebackup -R -C -S`, stop/kill/start/promote/freeze, superuser SQL over the unix socket),
//! `Pglb` (config file, spawn, stderr log file, `/stats.json`, SIGTERM by PID on drop), client
//! helpers over tokio-postgres and psql, and `wait_until` polling with deadlines.
//! Leaves to the test files: the scenarios and their assertions.
//!
//! Environment: `PGLB_BIN` (pglb binary to test; default: the one cargo built for this test,
//! `CARGO_BIN_EXE_pglb`), `PG_BIN` (directory with initdb, pg_ctl, postgres, pg_basebackup, psql; default
//! `/usr/lib/postgresql/15/bin`, then `pg_config --bindir`), `PGLB_TEST_RUST_LOG` (passed to pglb
//! as `RUST_LOG`; otherwise `RUST_LOG` is removed so pglb logs at its default level).
//!
//! When run as root, server binaries run as the `postgres` OS user through `runuser`, because
//! initdb and postgres refuse to run as root.
#![allow(dead_code)]

use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use pglb::view::{BackendView, View};
use tempfile::TempDir;
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

/// Password of the `pglb_check` role (LOGIN, member of pg_monitor).
pub const CHECK_USER: &str = "pglb_check";
pub const CHECK_PASSWORD: &str = "check-pw-7f3a";
/// Password of the `app` role (LOGIN, may create tables in `postgres`.`public`).
pub const APP_USER: &str = "app";
pub const APP_PASSWORD: &str = "app-pw-91c2";
/// Password of the `replicator` role (REPLICATION).
pub const REPL_USER: &str = "replicator";
pub const REPL_PASSWORD: &str = "repl-pw-5d0e";
/// Database every test connects to.
pub const DATABASE: &str = "postgres";

/// The pglb binary under test: `PGLB_BIN` if set, else the one cargo built with these tests.
pub fn pglb_bin() -> PathBuf {
    std::env::var_os("PGLB_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_pglb")))
}

/// Poll period of every `wait_*` helper.
pub const POLL: Duration = Duration::from_millis(75);

// ---------------------------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------------------------

/// Polls `cond` every [`POLL`] until it is true; panics naming `what` after `timeout`.
pub async fn wait_until<F: FnMut() -> bool>(timeout: Duration, what: &str, mut cond: F) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Like [`wait_until`] with an async condition.
pub async fn wait_until_async<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        // A condition that hangs (e.g. a connect that never completes) must not eat the deadline.
        let left = deadline.saturating_duration_since(Instant::now()).max(POLL);
        if let Ok(true) = tokio::time::timeout(left, cond()).await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `f` until it returns `Some`; panics naming `what` after `timeout`.
pub async fn wait_for<T, F: FnMut() -> Option<T>>(timeout: Duration, what: &str, mut f: F) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Blocking form of [`wait_until`] for synchronous code (the harness itself, `#[test]` fns).
pub fn wait_until_blocking<F: FnMut() -> bool>(timeout: Duration, what: &str, mut cond: F) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(POLL);
    }
}

// ---------------------------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------------------------

struct PortRegistry {
    handed_out: HashSet<u16>,
    rng: u64,
    lo: u16,
    hi: u16,
}

static PORTS: Mutex<Option<PortRegistry>> = Mutex::new(None);

fn ephemeral_low() -> u16 {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(32768)
}

/// Hands out a TCP port on 127.0.0.1 that was free when probed, below the kernel's ephemeral
/// range (so outgoing connections never take it), never the same one twice in this process.
/// Other test processes probe independently: a start that still loses the race retries with
/// another port (see `PgNode` and `Pglb`).
pub fn free_port() -> u16 {
    let mut guard = PORTS.lock().unwrap_or_else(|e| e.into_inner());
    let reg = guard.get_or_insert_with(|| {
        let eph = ephemeral_low();
        let hi = eph.min(32000);
        let lo = if hi >= 21000 {
            20000
        } else {
            hi.saturating_sub(8000).max(1024)
        };
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        PortRegistry {
            handed_out: HashSet::new(),
            rng: nanos ^ ((std::process::id() as u64) << 32) | 1,
            lo,
            hi,
        }
    });
    for _ in 0..10_000 {
        // xorshift64*
        reg.rng ^= reg.rng >> 12;
        reg.rng ^= reg.rng << 25;
        reg.rng ^= reg.rng >> 27;
        let r = reg.rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
        let port = reg.lo + (r % u64::from(reg.hi - reg.lo)) as u16;
        if reg.handed_out.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            reg.handed_out.insert(port);
            return port;
        }
    }
    panic!("no free TCP port found in {}..{}", reg.lo, reg.hi);
}

/// `127.0.0.1:<free_port()>`.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

// ---------------------------------------------------------------------------------------------
// OS user and commands
// ---------------------------------------------------------------------------------------------

struct RunAs {
    root: bool,
    uid: u32,
    gid: u32,
}

fn run_as() -> &'static RunAs {
    static RUN_AS: OnceLock<RunAs> = OnceLock::new();
    RUN_AS.get_or_init(|| {
        let root = fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
        if !root {
            return RunAs { root, uid: 0, gid: 0 };
        }
        let passwd = fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
        let line = passwd
            .lines()
            .find(|l| l.starts_with("postgres:"))
            .expect("running as root needs a `postgres` OS user to run initdb/postgres (apt-get install postgresql-15 creates it)");
        let f: Vec<&str> = line.split(':').collect();
        RunAs { root, uid: f[2].parse().expect("postgres uid"), gid: f[3].parse().expect("postgres gid") }
    })
}

/// Makes `path` belong to the OS user that runs the servers (no-op when not root).
fn give_to_postgres(path: &Path) {
    let ra = run_as();
    if ra.root {
        std::os::unix::fs::chown(path, Some(ra.uid), Some(ra.gid))
            .unwrap_or_else(|e| panic!("chown {} to postgres: {e}", path.display()));
    }
}

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {:o} {}: {e}", mode, path.display()));
}

/// A command running `bin` as the server OS user, with a cleared environment.
fn server_command(bin: &Path) -> Command {
    let mut cmd = if run_as().root {
        let runuser = ["/usr/sbin/runuser", "/sbin/runuser", "/usr/bin/runuser"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("runuser");
        let mut c = Command::new(runuser);
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    };
    cmd.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("LC_ALL", "C")
        .env("LANG", "C")
        .stdin(Stdio::null());
    cmd
}

/// Runs `cmd` to completion; kills it after `timeout`.
fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn {cmd:?}: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{cmd:?} did not finish within {timeout:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("wait for {cmd:?}: {e}")),
        }
    }
    child
        .wait_with_output()
        .map_err(|e| format!("collect output of {cmd:?}: {e}"))
}

/// Runs `cmd`, panicking with its output unless it exits 0.
fn run_ok(cmd: &mut Command, what: &str, timeout: Duration) -> Output {
    let out = run_with_timeout(cmd, timeout).unwrap_or_else(|e| panic!("{what}: {e}"));
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn signal(pid: u32, sig: libc::c_int) -> bool {
    // SAFETY: kill(2) with a pid we spawned (or read from a postmaster.pid we own); no memory involved.
    unsafe { libc::kill(pid as libc::pid_t, sig) == 0 }
}

/// State letter and parent PID from `/proc/<pid>/stat` (`R`, `S`, `T` for stopped, ...).
fn proc_stat(pid: u32) -> Option<(char, u32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
    let mut rest = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((state, ppid))
}

/// State letter of `pid` from `/proc/<pid>/stat`; `None` when it is gone.
pub fn process_state(pid: u32) -> Option<char> {
    proc_stat(pid).map(|(s, _)| s)
}

/// `root` and every descendant of it, by parent PID, `root` first.
fn descendants_of(root: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(|pid| proc_stat(pid).map(|(_, ppid)| (pid, ppid)))
                .collect()
        })
        .unwrap_or_default();
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        out.extend(
            parents
                .iter()
                .filter(|&&(pid, ppid)| ppid == parent && !out.contains(&pid))
                .map(|&(pid, _)| pid)
                .collect::<Vec<_>>(),
        );
        i += 1;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------------------------

/// Directory with initdb, pg_ctl, postgres, pg_basebackup and psql.
pub fn pg_bin_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let has_all = |d: &Path| {
            ["initdb", "pg_ctl", "postgres", "pg_basebackup", "psql"].iter().all(|b| d.join(b).exists())
        };
        if let Some(d) = std::env::var_os("PG_BIN") {
            let d = PathBuf::from(d);
            assert!(
                has_all(&d),
                "PG_BIN={} does not hold initdb, pg_ctl, postgres, pg_basebackup and psql",
                d.display()
            );
            return d;
        }
        let default = PathBuf::from("/usr/lib/postgresql/15/bin");
        if has_all(&default) {
            return default;
        }
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
            let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if out.status.success() && has_all(&d) {
                return d;
            }
        }
        panic!(
            "PostgreSQL server binaries not found: set PG_BIN to the directory holding initdb, pg_ctl, \
             postgres, pg_basebackup and psql (Debian: apt-get install postgresql-15, then \
             /usr/lib/postgresql/15/bin)"
        )
    })
    .clone()
}

/// Self-signed certificate and key for `ssl = on`, made with the openssl CLI.
fn make_certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let crt = dir.join("server.crt");
    let key = dir.join("server.key");
    let mut cmd = Command::new("openssl");
    cmd.args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ])
    .args(["-days", "30", "-subj", "/CN=localhost", "-keyout"])
    .arg(&key)
    .arg("-out")
    .arg(&crt);
    run_ok(
        &mut cmd,
        "openssl req (is the openssl CLI installed?)",
        Duration::from_secs(30),
    );
    give_to_postgres(&crt);
    give_to_postgres(&key);
    set_mode(&key, 0o600);
    set_mode(&crt, 0o644);
    (crt, key)
}

/// Why a server start failed.
#[derive(Debug)]
enum StartError {
    PortInUse,
    Other(String),
}

/// One PostgreSQL server: a data dir, a port on 127.0.0.1 and a unix socket dir in the test's temp dir.
pub struct PgNode {
    name: String,
    port: u16,
    dir: PathBuf,
    data: PathBuf,
    sock: PathBuf,
    log: PathBuf,
    bins: PathBuf,
    /// PIDs stopped by [`PgNode::freeze`], postmaster first; empty when not frozen.
    frozen: Mutex<Vec<u32>>,
}

impl PgNode {
    fn new(name: &str, root: &Path) -> PgNode {
        let dir = root.join(name);
        let sock = dir.join("sock");
        fs::create_dir_all(&sock).expect("create node dir");
        set_mode(&dir, 0o755);
        give_to_postgres(&dir);
        give_to_postgres(&sock);
        PgNode {
            name: name.to_string(),
            port: 0,
            data: dir.join("data"),
            log: dir.join("postgres.log"),
            sock,
            dir,
            bins: pg_bin_dir(),
            frozen: Mutex::new(Vec::new()),
        }
    }

    fn bin(&self, name: &str) -> PathBuf {
        self.bins.join(name)
    }

    /// initdb + our settings + hba; not started.
    fn init(name: &str, root: &Path, crt: &Path, key: &Path) -> PgNode {
        let node = PgNode::new(name, root);
        let mut cmd = server_command(&node.bin("initdb"));
        cmd.arg("-D")
            .arg(&node.data)
            .args([
                "--no-sync",
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .current_dir(&node.dir);
        run_ok(&mut cmd, "initdb", Duration::from_secs(120));

        let mut conf = fs::OpenOptions::new()
            .append(true)
            .open(node.data.join("postgresql.conf"))
            .expect("open postgresql.conf");
        write!(
            conf,
            "\n# pglb test harness\n\
             listen_addresses = '127.0.0.1'\n\
             fsync = off\n\
             full_page_writes = off\n\
             shared_buffers = 16MB\n\
             max_connections = 80\n\
             wal_level = replica\n\
             max_wal_senders = 10\n\
             max_replication_slots = 10\n\
             hot_standby = on\n\
             wal_sender_timeout = 5s\n\
             wal_receiver_timeout = 5s\n\
             wal_receiver_status_interval = 1s\n\
             wal_retrieve_retry_interval = 500ms\n\
             max_wal_size = 512MB\n\
             password_encryption = 'scram-sha-256'\n\
             ssl = on\n\
             ssl_cert_file = '{}'\n\
             ssl_key_file = '{}'\n\
             log_line_prefix = '%m [%p] %q%a '\n\
             log_min_messages = warning\n",
            crt.display(),
            key.display()
        )
        .expect("write postgresql.conf");
        // Local socket (the harness's superuser) is trusted; every TCP login needs SCRAM.
        fs::write(
            node.data.join("pg_hba.conf"),
            "local all all trust\n\
             local replication all trust\n\
             host replication replicator 127.0.0.1/32 scram-sha-256\n\
             host all pglb_check 127.0.0.1/32 scram-sha-256\n\
             host all app 127.0.0.1/32 scram-sha-256\n\
             host all all 127.0.0.1/32 scram-sha-256\n",
        )
        .expect("write pg_hba.conf");
        node
    }

    /// `pg_basebackup -R -C -S <slot>` from `primary`; not started.
    fn basebackup(name: &str, root: &Path, primary: &PgNode) -> PgNode {
        let conninfo = format!(
            "host=127.0.0.1 port={} user={REPL_USER} password={REPL_PASSWORD} application_name={name} sslmode=disable",
            primary.port
        );
        PgNode::basebackup_with(name, root, &conninfo)
    }

    /// `pg_basebackup -R -C -S <slot>` over `conninfo` (which names the primary, the replication
    /// user and the TLS settings); not started.
    pub fn basebackup_with(name: &str, root: &Path, conninfo: &str) -> PgNode {
        let node = PgNode::new(name, root);
        let slot = name.replace('-', "_");
        let mut cmd = server_command(&node.bin("pg_basebackup"));
        cmd.arg("-d")
            .arg(conninfo)
            .arg("-D")
            .arg(&node.data)
            .args([
                "-R",
                "-C",
                "-S",
                &slot,
                "-c",
                "fast",
                "-X",
                "stream",
                "--no-sync",
            ])
            .current_dir(&node.dir);
        run_ok(
            &mut cmd,
            &format!("pg_basebackup for {name}"),
            Duration::from_secs(120),
        );
        node
    }

    fn pg_ctl(&self) -> Command {
        let mut cmd = server_command(&self.bin("pg_ctl"));
        cmd.arg("-D").arg(&self.data).current_dir(&self.dir);
        cmd
    }

    fn try_start(&self) -> Result<(), StartError> {
        let log_before = fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        let opts = format!(
            "-p {} -k '{}' -c cluster_name={}",
            self.port,
            self.sock.display(),
            self.name
        );
        let mut cmd = self.pg_ctl();
        cmd.arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", "60", "-o", &opts, "start"]);
        let out = run_with_timeout(&mut cmd, Duration::from_secs(90)).map_err(StartError::Other)?;
        if out.status.success() {
            return Ok(());
        }
        let log = fs::read(&self.log).unwrap_or_default();
        let new_log =
            String::from_utf8_lossy(&log[(log_before as usize).min(log.len())..]).to_string();
        if new_log.contains("Address already in use")
            || new_log.contains("could not create any TCP/IP sockets")
        {
            return Err(StartError::PortInUse);
        }
        Err(StartError::Other(format!(
            "pg_ctl start for {} on port {} failed ({}):\n{}{}\n--- server log\n{}",
            self.name,
            self.port,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&new_log, 30)
        )))
    }

    /// First start: picks a port, and picks another when a concurrent test process took it.
    fn start_on_new_port(&mut self) {
        for _ in 0..8 {
            self.port = free_port();
            match self.try_start() {
                Ok(()) => return,
                Err(StartError::PortInUse) => continue,
                Err(StartError::Other(e)) => panic!("{e}"),
            }
        }
        panic!("{}: every port tried was in use", self.name);
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Starts the server again on the same port; waits until it accepts connections.
    pub fn start(&self) {
        if let Err(e) = self.try_start() {
            panic!("restart {} on port {}: {e:?}", self.name, self.port);
        }
    }

    /// Fast shutdown (`pg_ctl -m fast stop`), waiting until the server is gone.
    pub fn stop(&self) {
        self.thaw();
        let mut cmd = self.pg_ctl();
        cmd.args(["-m", "fast", "-w", "-t", "60", "stop"]);
        run_ok(
            &mut cmd,
            &format!("stop {}", self.name),
            Duration::from_secs(90),
        );
    }

    /// Immediate shutdown (`pg_ctl -m immediate stop`): no checkpoint, like a crash.
    pub fn kill(&self) {
        self.thaw();
        let mut cmd = self.pg_ctl();
        cmd.args(["-m", "immediate", "-w", "-t", "60", "stop"]);
        run_ok(
            &mut cmd,
            &format!("kill {}", self.name),
            Duration::from_secs(90),
        );
    }

    /// `pg_ctl promote`, waiting until the server has left recovery.
    pub fn promote(&self) {
        let mut cmd = self.pg_ctl();
        cmd.args(["-w", "-t", "60", "promote"]);
        run_ok(
            &mut cmd,
            &format!("promote {}", self.name),
            Duration::from_secs(90),
        );
    }

    /// PID of the postmaster, from postmaster.pid.
    pub fn postmaster_pid(&self) -> Option<u32> {
        fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    pub fn is_running(&self) -> bool {
        self.postmaster_pid().is_some_and(|pid| signal(pid, 0))
    }

    /// PIDs of this running instance: the postmaster (first) and all its descendants (backends,
    /// WAL senders and receivers, checkpointer, ...), found by parent PID in `/proc/*/stat`,
    /// never by name. Empty when the server is not running.
    pub fn instance_pids(&self) -> Vec<u32> {
        match self.postmaster_pid() {
            Some(pid) if signal(pid, 0) => descendants_of(pid),
            _ => Vec::new(),
        }
    }

    /// Freezes the whole server like a hung host: SIGSTOP to the postmaster, then to every
    /// descendant (repeated until no new one shows up); returns once all of them are stopped.
    /// New connections hang (the kernel still completes the TCP handshake), open sessions hang,
    /// WAL senders and receivers send nothing.
    pub fn freeze(&self) {
        let mut frozen = self.frozen.lock().unwrap_or_else(|e| e.into_inner());
        assert!(frozen.is_empty(), "freeze: {} is already frozen", self.name);
        let pm = self.postmaster_pid().expect("freeze: server not running");
        assert!(signal(pm, libc::SIGSTOP), "SIGSTOP {pm}");
        frozen.push(pm);
        // A stopped postmaster forks no new child; a child forking right now may add one.
        loop {
            let new: Vec<u32> = descendants_of(pm)
                .into_iter()
                .filter(|p| !frozen.contains(p))
                .collect();
            if new.is_empty() {
                break;
            }
            for p in new {
                // A child may have exited meanwhile: nothing to stop then.
                if signal(p, libc::SIGSTOP) {
                    frozen.push(p);
                }
            }
        }
        let pids = frozen.clone();
        drop(frozen);
        // Stopped, or gone (exited, or a zombie its stopped postmaster cannot reap).
        let running = || -> Vec<(u32, char)> {
            pids.iter()
                .filter_map(|&p| process_state(p).map(|s| (p, s)))
                .filter(|&(_, s)| !matches!(s, 'T' | 'Z' | 'X'))
                .collect()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !running().is_empty() {
            assert!(
                Instant::now() < deadline,
                "freeze {}: processes still running after 10s (pid, state): {:?}",
                self.name,
                running()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGCONT to every process [`PgNode::freeze`] stopped (no-op when not frozen).
    pub fn thaw(&self) {
        let pids = std::mem::take(&mut *self.frozen.lock().unwrap_or_else(|e| e.into_inner()));
        // Children first, the postmaster last.
        for &p in pids.iter().rev() {
            signal(p, libc::SIGCONT);
        }
    }

    /// Runs SQL as the superuser over the unix socket; `Err` carries psql's stderr.
    /// Returns unaligned, tuples-only output (`a|b` per row), trimmed.
    pub fn try_exec(&self, sql: &str) -> Result<String, String> {
        let mut cmd = Command::new(self.bin("psql"));
        cmd.env_clear()
            .env("LC_ALL", "C")
            .env("PGCONNECT_TIMEOUT", "10")
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.sock)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                DATABASE,
                "-c",
                sql,
            ]);
        let out = run_with_timeout(&mut cmd, Duration::from_secs(120))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    /// [`PgNode::try_exec`], panicking on error.
    pub fn exec(&self, sql: &str) -> String {
        self.try_exec(sql)
            .unwrap_or_else(|e| panic!("{}: `{sql}` failed: {e}", self.name))
    }

    pub fn in_recovery(&self) -> bool {
        self.exec("SELECT pg_is_in_recovery()") == "t"
    }

    /// Timeline of the WAL this server writes (primary) or receives (streaming standby).
    pub fn timeline(&self) -> u32 {
        if self.in_recovery() {
            self.exec("SELECT received_tli FROM pg_stat_wal_receiver")
                .parse()
                .expect("received_tli")
        } else {
            let file = self.exec("SELECT pg_walfile_name(pg_current_wal_lsn())");
            u32::from_str_radix(&file[..8], 16).expect("timeline from wal file name")
        }
    }

    /// `pg_wal_replay_pause()` on this standby: WAL keeps arriving, none is replayed.
    pub fn pause_replay(&self) {
        self.exec("SELECT pg_wal_replay_pause()");
    }

    /// `pg_wal_replay_resume()` on this standby.
    pub fn resume_replay(&self) {
        self.exec("SELECT pg_wal_replay_resume()");
    }

    /// Replay LSN of this standby as bytes since 0/0.
    pub fn replay_lsn_bytes(&self) -> i64 {
        self.exec("SELECT pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::bigint")
            .parse()
            .expect("replay lsn")
    }

    /// Current WAL insert LSN of this primary as bytes since 0/0.
    pub fn current_lsn_bytes(&self) -> i64 {
        self.exec("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint")
            .parse()
            .expect("current lsn")
    }
}

impl Drop for PgNode {
    fn drop(&mut self) {
        self.thaw();
        if self.data.join("postmaster.pid").exists() {
            let mut cmd = self.pg_ctl();
            cmd.args(["-m", "immediate", "-w", "-t", "30", "stop"]);
            let _ = run_with_timeout(&mut cmd, Duration::from_secs(40));
        }
    }
}

/// A primary (`pg-0`) and streaming replicas (`pg-1`, `pg-2`, ...), each with a physical slot.
/// Roles: `pglb_check`, `app`, `replicator` with the passwords in this module; `ssl = on`.
/// Dropping the cluster stops every server in immediate mode and removes all files.
pub struct PgCluster {
    // Dropped first: servers stop before their directories go.
    nodes: Vec<PgNode>,
    dir: TempDir,
}

impl PgCluster {
    /// Starts a primary and `n_replicas` streaming replicas; returns when all stream.
    pub fn start(n_replicas: usize) -> PgCluster {
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("pglb-it-")
            .tempdir()
            .expect("create temp dir");
        set_mode(dir.path(), 0o755);
        give_to_postgres(dir.path());
        let (crt, key) = make_certificate(dir.path());

        let mut primary = PgNode::init("pg-0", dir.path(), &crt, &key);
        primary.start_on_new_port();
        primary.exec(&format!(
            "CREATE ROLE {CHECK_USER} LOGIN PASSWORD '{CHECK_PASSWORD}' IN ROLE pg_monitor; \
             CREATE ROLE {APP_USER} LOGIN PASSWORD '{APP_PASSWORD}'; \
             CREATE ROLE {REPL_USER} LOGIN REPLICATION PASSWORD '{REPL_PASSWORD}'; \
             GRANT CREATE ON SCHEMA public TO {APP_USER};"
        ));
        let mut cluster = PgCluster {
            nodes: vec![primary],
            dir,
        };
        for i in 1..=n_replicas {
            let mut replica =
                PgNode::basebackup(&format!("pg-{i}"), cluster.dir.path(), &cluster.nodes[0]);
            replica.start_on_new_port();
            cluster.nodes.push(replica);
        }
        cluster.wait_streaming(n_replicas, Duration::from_secs(30));
        if std::env::var_os("PGLB_TEST_VERBOSE").is_some() {
            eprintln!(
                "cluster with {n_replicas} replicas up in {:?}",
                started.elapsed()
            );
        }
        cluster
    }

    pub fn primary(&self) -> &PgNode {
        &self.nodes[0]
    }

    /// Node `i`: 0 is the initial primary, 1.. the replicas.
    pub fn node(&self, i: usize) -> &PgNode {
        &self.nodes[i]
    }

    pub fn nodes(&self) -> &[PgNode] {
        &self.nodes
    }

    pub fn replicas(&self) -> &[PgNode] {
        &self.nodes[1..]
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Backend list for pglb: every node, named as the node, weight 1.
    pub fn backends(&self) -> Vec<BackendSpec> {
        self.nodes
            .iter()
            .map(|n| BackendSpec {
                name: n.name.clone(),
                address: n.addr().to_string(),
                weight: Some(1),
            })
            .collect()
    }

    /// Waits until the primary's pg_stat_replication shows `n` streaming standbys.
    pub fn wait_streaming(&self, n: usize, timeout: Duration) {
        let primary = self.primary();
        let deadline = Instant::now() + timeout;
        loop {
            let last = primary
                .try_exec("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")
                .unwrap_or_else(|e| e);
            if last == n.to_string() {
                return;
            }
            if Instant::now() >= deadline {
                panic!("{n} streaming replicas not reached within {timeout:?}; last count: {last}");
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits until replica `i` has replayed everything the primary had written when called.
    pub fn wait_replayed(&self, i: usize, timeout: Duration) {
        let target = self.primary().current_lsn_bytes();
        let replica = self.node(i);
        wait_until_blocking(
            timeout,
            &format!("{} to replay up to the primary's LSN", replica.name),
            || replica.replay_lsn_bytes() >= target,
        );
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for n in &self.nodes {
                let log = fs::read_to_string(&n.log).unwrap_or_default();
                eprintln!(
                    "--- {} (port {}) server log tail\n{}",
                    n.name,
                    n.port,
                    tail(&log, 15)
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// pglb
// ---------------------------------------------------------------------------------------------

/// One `[[backend]]` entry.
#[derive(Debug, Clone)]
pub struct BackendSpec {
    pub name: String,
    pub address: String,
    pub weight: Option<u32>,
}

/// Builds a pglb config (fast checks, short timeouts) and starts the binary.
pub struct PglbBuilder {
    /// `[listen]` keys beside the three addresses (tls_cert, tls_key).
    listen: toml::Table,
    check: toml::Table,
    read: toml::Table,
    proxy: toml::Table,
    stats: toml::Table,
    /// `[store]`, also set with `set("store", key, value)`.
    store: toml::Table,
    backends: Vec<BackendSpec>,
    check_password: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    nofile: Option<u64>,
}

fn table(entries: &[(&str, toml::Value)]) -> toml::Table {
    entries
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

impl PglbBuilder {
    /// Defaults: check every 200ms, rise/fall 1, leastconn, max_lag 16MB, fallback on,
    /// shutdown_timeout 5s, close_on_writer_change on.
    pub fn new(backends: Vec<BackendSpec>) -> PglbBuilder {
        PglbBuilder {
            listen: toml::Table::new(),
            check: table(&[
                ("interval", "200ms".into()),
                ("timeout", "2s".into()),
                ("rise", 1.into()),
                ("fall", 1.into()),
                ("user", CHECK_USER.into()),
                ("password_env", "PGLB_CHECK_PASSWORD".into()),
                ("database", DATABASE.into()),
            ]),
            read: table(&[
                ("balance", "leastconn".into()),
                ("max_lag", "16MB".into()),
                ("max_lag_time", "10s".into()),
                ("fallback_to_primary", true.into()),
            ]),
            proxy: table(&[
                ("connect_timeout", "2s".into()),
                ("client_startup_timeout", "10s".into()),
                ("shutdown_timeout", "5s".into()),
                ("close_on_writer_change", true.into()),
            ]),
            stats: toml::Table::new(),
            store: toml::Table::new(),
            backends,
            check_password: CHECK_PASSWORD.to_string(),
            args: Vec::new(),
            env: Vec::new(),
            nofile: None,
        }
    }

    fn section(&mut self, section: &str) -> &mut toml::Table {
        match section {
            "listen" => &mut self.listen,
            "check" => &mut self.check,
            "read" => &mut self.read,
            "proxy" => &mut self.proxy,
            "stats" => &mut self.stats,
            "store" => &mut self.store,
            other => panic!("unknown config section [{other}] in test"),
        }
    }

    /// Sets `[section] key = value` (section: listen (not the addresses), check, read, proxy
    /// or stats).
    pub fn set(mut self, section: &str, key: &str, value: impl Into<toml::Value>) -> Self {
        self.section(section).insert(key.to_string(), value.into());
        self
    }

    /// Removes `[section] key` so pglb's default applies.
    pub fn unset(mut self, section: &str, key: &str) -> Self {
        self.section(section).remove(key);
        self
    }

    pub fn backends(mut self, backends: Vec<BackendSpec>) -> Self {
        self.backends = backends;
        self
    }

    /// Value of `PGLB_CHECK_PASSWORD` in pglb's environment.
    pub fn check_password(mut self, password: &str) -> Self {
        self.check_password = password.to_string();
        self
    }

    /// Extra command-line arguments after `--config FILE`.
    /// Starts pglb with this `RLIMIT_NOFILE` (soft and hard), to run it out of descriptors.
    pub fn nofile(mut self, limit: u64) -> Self {
        self.nofile = Some(limit);
        self
    }

    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_string());
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// The config file text for the given listen addresses.
    pub fn render(&self, write: SocketAddr, read: SocketAddr, stats: SocketAddr) -> String {
        let mut root = toml::Table::new();
        let mut listen = self.listen.clone();
        listen.insert("write".into(), write.to_string().into());
        listen.insert("read".into(), read.to_string().into());
        listen.insert("stats".into(), stats.to_string().into());
        root.insert("listen".into(), toml::Value::Table(listen));
        root.insert("check".into(), toml::Value::Table(self.check.clone()));
        root.insert("read".into(), toml::Value::Table(self.read.clone()));
        root.insert("proxy".into(), toml::Value::Table(self.proxy.clone()));
        if !self.stats.is_empty() {
            root.insert("stats".into(), toml::Value::Table(self.stats.clone()));
        }
        if !self.store.is_empty() {
            root.insert("store".into(), toml::Value::Table(self.store.clone()));
        }
        let backends = self
            .backends
            .iter()
            .map(|b| {
                let mut t = table(&[
                    ("name", b.name.as_str().into()),
                    ("address", b.address.as_str().into()),
                ]);
                if let Some(w) = b.weight {
                    t.insert("weight".into(), w.into());
                }
                toml::Value::Table(t)
            })
            .collect::<Vec<_>>();
        root.insert("backend".into(), toml::Value::Array(backends));
        toml::to_string(&root).expect("render pglb config")
    }

    /// Writes the config, spawns pglb and waits until its three listeners accept connections
    /// (not until a primary is known: see [`Pglb::wait_ready`]). Retries with new ports when a
    /// concurrent test process took one of them.
    pub fn start(self) -> Pglb {
        let dir = tempfile::Builder::new()
            .prefix("pglb-lb-")
            .tempdir()
            .expect("create pglb temp dir");
        let config = dir.path().join("pglb.toml");
        let log = dir.path().join("pglb.log");
        let mut last_failure = String::new();
        for attempt in 0..4 {
            let (write, read, stats) = (free_addr(), free_addr(), free_addr());
            fs::write(&config, self.render(write, read, stats)).expect("write pglb config");
            let log_file = fs::File::create(&log).expect("create pglb log");
            let mut cmd = Command::new(pglb_bin());
            cmd.arg("--config")
                .arg(&config)
                .args(&self.args)
                .env("PGLB_CHECK_PASSWORD", &self.check_password)
                .env_remove("RUST_LOG")
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().expect("clone log fd"))
                .stderr(log_file);
            if let Some(level) = std::env::var_os("PGLB_TEST_RUST_LOG") {
                cmd.env("RUST_LOG", level);
            }
            for (k, v) in &self.env {
                cmd.env(k, v);
            }
            if let Some(limit) = self.nofile {
                use std::os::unix::process::CommandExt;
                let lim = libc::rlimit {
                    rlim_cur: limit as libc::rlim_t,
                    rlim_max: limit as libc::rlim_t,
                };
                // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child.
                unsafe {
                    cmd.pre_exec(move || {
                        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
            }
            let child = cmd.spawn().expect("spawn pglb");
            let mut lb = Pglb {
                child: Some(child),
                write,
                read,
                stats,
                log: log.clone(),
                config: config.clone(),
                dir: None,
            };
            match lb.wait_listening(Duration::from_secs(20)) {
                Ok(()) => {
                    lb.dir = Some(dir);
                    return lb;
                }
                Err(e) => {
                    let text = lb.log_text();
                    lb.terminate(Duration::from_secs(2));
                    if text.contains("in use") && attempt < 3 {
                        last_failure = e;
                        continue;
                    }
                    panic!(
                        "pglb did not start: {e}\n--- config\n{}\n--- pglb log\n{}",
                        self.render(write, read, stats),
                        tail(&text, 60)
                    );
                }
            }
        }
        panic!("pglb did not start (ports kept being taken): {last_failure}");
    }
}

/// pglb spawned directly on a config file the test wrote, for what [`PglbBuilder::start`] cannot
/// do: run on a ConfigMap-style symlink, or on ports another pglb already listens on. Stopped by
/// PID on drop (SIGTERM, then SIGKILL after 10 s).
pub struct SpawnedPglb {
    child: Option<Child>,
    stats: SocketAddr,
    log: PathBuf,
}

impl SpawnedPglb {
    pub fn spawn(config: &Path, stats: SocketAddr, log: PathBuf) -> SpawnedPglb {
        let log_file = std::fs::File::create(&log).expect("create pglb log");
        let child = Command::new(pglb_bin())
            .arg("--config")
            .arg(config)
            .env("PGLB_CHECK_PASSWORD", CHECK_PASSWORD)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("spawn pglb");
        SpawnedPglb {
            child: Some(child),
            stats,
            log,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn stats(&self) -> Option<Stats> {
        let (code, body) = http_get(self.stats, "/stats.json").ok()?;
        if code != 200 {
            return None;
        }
        Stats::parse(body)
    }

    pub async fn wait_stats<F: FnMut(&Stats) -> bool>(
        &self,
        timeout: Duration,
        what: &str,
        mut pred: F,
    ) -> Stats {
        wait_for(timeout, what, || self.stats().filter(|s| pred(s))).await
    }
}

impl Drop for SpawnedPglb {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: kill(2) on the PID of the child this test spawned.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if std::thread::panicking() {
            eprintln!("--- pglb log\n{}", self.log_text());
        }
    }
}

/// `/stats.json` read as pglb's own `View`, with the raw document kept for failure messages.
#[derive(Debug, Clone)]
pub struct Stats {
    pub view: View,
    pub raw: String,
}

pub type BackendStats = BackendView;

impl std::ops::Deref for Stats {
    type Target = View;
    fn deref(&self) -> &View {
        &self.view
    }
}

impl Stats {
    /// Parses a `/stats.json` body.
    pub fn parse(body: String) -> Option<Stats> {
        let view = serde_json::from_str(&body).ok()?;
        Some(Stats { view, raw: body })
    }

    /// The backend called `name`; panics (with the whole document) when it is missing.
    pub fn backend(&self, name: &str) -> &BackendStats {
        self.view
            .backend(name)
            .unwrap_or_else(|| panic!("backend {name} not in stats.json: {}", self.raw))
    }

    pub fn try_backend(&self, name: &str) -> Option<&BackendStats> {
        self.view.backend(name)
    }
}

/// A running pglb process. Dropping it sends SIGTERM, then SIGKILL after 10 s.
pub struct Pglb {
    child: Option<Child>,
    pub write: SocketAddr,
    pub read: SocketAddr,
    pub stats: SocketAddr,
    log: PathBuf,
    config: PathBuf,
    dir: Option<TempDir>,
}

impl Pglb {
    /// Builder with the cluster's nodes as backends.
    pub fn builder(cluster: &PgCluster) -> PglbBuilder {
        PglbBuilder::new(cluster.backends())
    }

    /// pglb with default test settings in front of `cluster`, ready (a primary is known).
    pub async fn start(cluster: &PgCluster) -> Pglb {
        let lb = Pglb::builder(cluster).start();
        lb.wait_ready().await;
        lb
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("pglb running").id()
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything pglb wrote to stdout and stderr so far.
    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log).unwrap_or_default()).to_string()
    }

    pub fn log_contains(&self, pattern: &str) -> bool {
        self.log_text().contains(pattern)
    }

    /// Waits until the log contains `pattern`.
    pub async fn wait_log(&self, timeout: Duration, pattern: &str) {
        let deadline = Instant::now() + timeout;
        while !self.log_contains(pattern) {
            if Instant::now() >= deadline {
                panic!(
                    "pglb log did not contain {pattern:?} within {timeout:?}; log tail:\n{}",
                    tail(&self.log_text(), 40)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Exit status if pglb has exited.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    fn wait_listening(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status() {
                return Err(format!("pglb exited early with {status}"));
            }
            let stats_up = http_get(self.stats, "/stats.json").is_ok();
            let ports_up = [self.write, self.read]
                .iter()
                .all(|a| TcpStream::connect_timeout(a, Duration::from_millis(500)).is_ok());
            if stats_up && ports_up {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "listeners not up within {timeout:?} (stats answering: {stats_up}, write+read accepting: {ports_up})"
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Status code of `GET /health`.
    pub fn health_status(&self) -> Result<u16, String> {
        http_get(self.stats, "/health").map(|(code, _)| code)
    }

    /// Waits until `/health` answers 200 (a primary is known).
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let last = self.health_status();
            if last == Ok(200) {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "pglb /health not 200 within 20s (last: {last:?}); stats: {:?}\n--- pglb log tail\n{}",
                    self.stats().map(|s| s.raw),
                    tail(&self.log_text(), 40)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// `GET /stats.json`, parsed.
    pub fn stats(&self) -> Result<Stats, String> {
        let (code, body) = http_get(self.stats, "/stats.json")?;
        if code != 200 {
            return Err(format!("/stats.json answered {code}: {body}"));
        }
        let view = serde_json::from_str(&body).map_err(|e| format!("/stats.json: {e}: {body}"))?;
        Ok(Stats { view, raw: body })
    }

    /// Polls `/stats.json` until `pred` holds; returns that document. Panics with the last
    /// document (or error) and the log tail after `timeout`.
    pub async fn wait_stats<F: FnMut(&Stats) -> bool>(
        &self,
        timeout: Duration,
        what: &str,
        mut pred: F,
    ) -> Stats {
        let deadline = Instant::now() + timeout;
        loop {
            let last = self.stats();
            if let Ok(s) = &last {
                if pred(s) {
                    return s.clone();
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "stats.json: timed out after {timeout:?} waiting for {what}; last: {}\n--- pglb log tail\n{}",
                    match last {
                        Ok(s) => s.raw,
                        Err(e) => e,
                    },
                    tail(&self.log_text(), 40)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until backend `name` has `state` (e.g. "up", "down").
    pub async fn wait_backend_state(&self, name: &str, state: &str, timeout: Duration) -> Stats {
        self.wait_stats(timeout, &format!("backend {name} state {state}"), |s| {
            s.try_backend(name).is_some_and(|b| b.state == state)
        })
        .await
    }

    /// Sends `sig` to pglb.
    pub fn signal(&self, sig: libc::c_int) {
        assert!(signal(self.pid(), sig), "signal {sig} to pglb");
    }

    /// SIGTERM, then SIGKILL if pglb has not exited after `timeout`. Returns the exit status
    /// when pglb exited on its own (None when it had to be killed).
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        signal(child.id(), libc::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return None;
                }
            }
        }
    }

    /// Async wait for exit after a signal the test sent itself; None on timeout (still running).
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Pglb {
    fn drop(&mut self) {
        self.terminate(Duration::from_secs(10));
        if std::thread::panicking() {
            eprintln!(
                "--- pglb log tail ({})\n{}",
                self.log.display(),
                tail(&self.log_text(), 60)
            );
        }
    }
}

/// HTTP/1.1 request with an optional bearer token: (status code, body); panics when the stats
/// server cannot be reached or answers garbage.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, String) {
    let auth = token.map(|t| format!("Bearer {t}"));
    http(addr, method, path, auth.as_deref())
        .unwrap_or_else(|e| panic!("{method} {path} on {addr}: {e}"))
}

/// Minimal HTTP/1.1 GET: (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    http(addr, "GET", path, None)
}

/// HTTP/1.1 request with an optional `Authorization` header value (`Bearer ...`, `Basic ...`):
/// (status code, body). Handles Content-Length, chunked and close-delimited bodies.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    authorization: Option<&str>,
) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.set_write_timeout(Some(Duration::from_secs(5))).ok();
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("send: {e}"))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .map_err(|e| format!("read {path}: {e}"))?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no header end in {text:?}"))?;
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok((code, body))
}

fn dechunk(mut s: &str) -> Result<String, String> {
    let mut out = String::new();
    loop {
        let (size_line, rest) = s.split_once("\r\n").ok_or("truncated chunk size")?;
        let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("chunk size {size_line:?}: {e}"))?;
        if size == 0 {
            return Ok(out);
        }
        if rest.len() < size {
            return Err("truncated chunk".into());
        }
        out.push_str(&rest[..size]);
        s = rest[size..]
            .strip_prefix("\r\n")
            .ok_or("missing chunk CRLF")?;
    }
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// tokio-postgres config for `user`@`addr`, NoTls, no SSLRequest.
pub fn client_config(addr: SocketAddr, user: &str, password: &str) -> tokio_postgres::Config {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(addr.port())
        .user(user)
        .password(password)
        .dbname(DATABASE)
        .ssl_mode(SslMode::Disable)
        .application_name("pglb-it")
        .connect_timeout(Duration::from_secs(10));
    cfg
}

/// Connects as `app` (SCRAM) to `addr`; the connection task runs on the test runtime.
/// Panics if the login neither succeeds nor fails within 20 s.
pub async fn connect(addr: SocketAddr) -> Result<Client, tokio_postgres::Error> {
    connect_as(addr, APP_USER, APP_PASSWORD).await
}

pub async fn connect_as(
    addr: SocketAddr,
    user: &str,
    password: &str,
) -> Result<Client, tokio_postgres::Error> {
    let cfg = client_config(addr, user, password);
    let (client, connection) = tokio::time::timeout(Duration::from_secs(20), cfg.connect(NoTls))
        .await
        .unwrap_or_else(|_| panic!("login to {addr} as {user} hung for 20s"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// [`connect`], panicking with the error.
pub async fn connect_ok(addr: SocketAddr) -> Client {
    connect(addr)
        .await
        .unwrap_or_else(|e| panic!("login as app through {addr}: {e:?}"))
}

/// First column of the first row of `sql` (simple query protocol), or `None` for no rows.
pub async fn scalar(client: &Client, sql: &str) -> Result<Option<String>, tokio_postgres::Error> {
    let msgs = tokio::time::timeout(Duration::from_secs(30), client.simple_query(sql))
        .await
        .unwrap_or_else(|_| panic!("`{sql}` hung for 30s"))?;
    Ok(msgs.into_iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_string).unwrap_or_default()),
        _ => None,
    }))
}

/// Runs a command to its end: exit status, stdout and stderr as text.
pub fn output_of(cmd: &mut Command) -> (ExitStatus, String, String) {
    let out = cmd.output().expect("run the command");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `pgbench -i -s 1` through `addr` as the app user; panics when it fails.
pub fn pgbench_init(addr: SocketAddr) {
    let (status, stdout, stderr) = output_of(
        Command::new("pgbench")
            .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
            .args(["-U", APP_USER, "-i", "-s", "1", "-q", DATABASE])
            .env("PGPASSWORD", APP_PASSWORD),
    );
    assert!(
        status.success(),
        "pgbench -i ({status}):\n{stdout}\n{stderr}"
    );
}

/// [`scalar`], panicking on error or no row.
pub async fn scalar_ok(client: &Client, sql: &str) -> String {
    scalar(client, sql)
        .await
        .unwrap_or_else(|e| panic!("`{sql}`: {e:?}"))
        .unwrap_or_else(|| panic!("`{sql}` returned no row"))
}

/// `SHOW port` of the backend behind this session.
pub async fn backend_port(client: &Client) -> u16 {
    scalar_ok(client, "SHOW port")
        .await
        .parse()
        .expect("SHOW port is a number")
}

/// `pg_is_in_recovery()` of the backend behind this session.
pub async fn in_recovery(client: &Client) -> bool {
    scalar_ok(client, "SELECT pg_is_in_recovery()").await == "t"
}

/// Opens a session through `addr` and returns the port of the backend it landed on.
pub async fn landing_port(addr: SocketAddr) -> u16 {
    let c = connect_ok(addr).await;
    backend_port(&c).await
}

/// Asserts that a login through `addr` fails with pglb's own FATAL ErrorResponse and returns
/// its message (which starts with `pglb: `).
pub async fn expect_pglb_fatal(addr: SocketAddr) -> String {
    match connect(addr).await {
        Ok(c) => {
            let port = backend_port(&c).await;
            panic!("login through {addr} succeeded (backend port {port}); expected a pglb FATAL")
        }
        Err(e) => {
            let db = e.as_db_error().unwrap_or_else(|| {
                panic!("login through {addr} failed without an ErrorResponse: {e:?}")
            });
            assert_eq!(db.severity(), "FATAL", "severity of pglb's error: {db:?}");
            assert!(
                db.message().starts_with("pglb: "),
                "message does not start with `pglb: `: {db:?}"
            );
            db.message().to_string()
        }
    }
}

/// SQLSTATE of a failed query/login, if the server sent one.
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<&str> {
    e.code().map(|c| c.code())
}

/// Runs `sql` with psql over TCP with `sslmode` (e.g. "require") as `app`; returns unaligned
/// tuples-only output. GSS encryption is disabled so the first packet is an SSLRequest.
pub fn psql_tcp(addr: SocketAddr, sslmode: &str, sql: &str) -> Result<String, String> {
    let conninfo = format!(
        "host=127.0.0.1 port={} user={APP_USER} dbname={DATABASE} sslmode={sslmode} gssencmode=disable connect_timeout=10",
        addr.port()
    );
    let mut cmd = Command::new(pg_bin_dir().join("psql"));
    cmd.env_clear()
        .env("LC_ALL", "C")
        .env("PGPASSWORD", APP_PASSWORD)
        .args([
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            &conninfo,
            "-c",
            sql,
        ]);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(30))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "psql exited {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Counts how many of `ports` equal each of `of`.
pub fn count_ports(ports: &[u16], of: u16) -> usize {
    ports.iter().filter(|p| **p == of).count()
}

/// Human-readable list of the ports sessions landed on, with node names.
pub fn describe_ports(cluster: &PgCluster, ports: &[u16]) -> String {
    let mut s = String::new();
    for p in ports {
        let name = cluster
            .nodes()
            .iter()
            .find(|n| n.port() == *p)
            .map(|n| n.name())
            .unwrap_or("?");
        let _ = write!(s, "{name}:{p} ");
    }
    s
}

// Failover (promoter) helpers: see promoter.rs.
pub mod promoter;

// A real 3-member etcd cluster for store tests: see etcd.rs.
pub mod etcd;

// TLS-only clusters and a test CA: see tls.rs.
pub mod tls;
