//! Failover-test harness: clusters ready for `pg_rewind`, the `pglb-promoter` binary (config
//! derived from a running pglb's, status endpoint, log, kill -9 and restart, one-shot CLI
//! commands), kill -9 of a postmaster and its restart, a TCP relay that can be cut, a
//! background writer that counts acknowledged rows, and one that connects anew for every
//! write and counts failed connection attempts.
//!
//! Environment: `PGLB_PROMOTER_BIN` (binary to test; default: the one cargo built,
//! `CARGO_BIN_EXE_pglb-promoter`).

use std::collections::HashMap;
use std::fs;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::{
    connect_as, free_addr, http_get, pg_bin_dir, table, tail, wait_until_blocking, PgCluster,
    PgNode, Pglb, APP_PASSWORD, APP_USER, CHECK_PASSWORD, POLL, REPL_PASSWORD,
};

/// Password of the `postgres` role over TCP (the promoter's login in tests).
pub const PROMOTER_PASSWORD: &str = "promoter-pw-2c8e";

/// The promoter binary under test.
pub fn promoter_bin() -> PathBuf {
    std::env::var_os("PGLB_PROMOTER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_pglb-promoter")))
}

/// Settings appended to every server's postgresql.conf for failover tests: what `pg_rewind`
/// needs (the harness turns full_page_writes off for speed; WAL kept back to the last common
/// checkpoint).
pub const REWIND_CONF: &str = "full_page_writes = on\nwal_log_hints = on\nwal_keep_size = 128MB\n";

/// Like `PgCluster::start`, with [`REWIND_CONF`] and a password for `postgres` (the promoter
/// logs in over TCP, where every login needs SCRAM).
pub fn failover_cluster(n_replicas: usize) -> PgCluster {
    let dir = tempfile::Builder::new()
        .prefix("pglb-fo-")
        .tempdir()
        .expect("create temp dir");
    super::set_mode(dir.path(), 0o755);
    super::give_to_postgres(dir.path());
    let (crt, key) = super::make_certificate(dir.path());
    let mut primary = PgNode::init("pg-0", dir.path(), &crt, &key);
    let mut conf = fs::OpenOptions::new()
        .append(true)
        .open(primary.data.join("postgresql.conf"))
        .expect("open postgresql.conf");
    conf.write_all(REWIND_CONF.as_bytes())
        .expect("write postgresql.conf");
    drop(conf);
    primary.start_on_new_port();
    primary.exec(&format!(
        "CREATE ROLE {} LOGIN PASSWORD '{}' IN ROLE pg_monitor; \
         CREATE ROLE {APP_USER} LOGIN PASSWORD '{APP_PASSWORD}'; \
         CREATE ROLE {} LOGIN REPLICATION PASSWORD '{REPL_PASSWORD}'; \
         GRANT CREATE ON SCHEMA public TO {APP_USER}; \
         ALTER ROLE postgres PASSWORD '{PROMOTER_PASSWORD}';",
        super::CHECK_USER,
        CHECK_PASSWORD,
        super::REPL_USER
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
    cluster
}

/// SIGKILL to the postmaster (its children notice and exit); waits until the port refuses.
pub fn kill9(node: &PgNode) {
    node.thaw();
    let pid = node.postmaster_pid().expect("kill9: server not running");
    assert!(super::signal(pid, libc::SIGKILL), "SIGKILL {pid}");
    wait_until_blocking(
        Duration::from_secs(10),
        &format!("{} to stop accepting connections", node.name()),
        || std::net::TcpStream::connect_timeout(&node.addr(), Duration::from_millis(200)).is_err(),
    );
}

/// Starts a server again after [`kill9`], retrying while its orphaned children still hold the
/// shared memory.
pub fn restart_after_kill(node: &PgNode) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match node.try_start() {
            Ok(()) => return,
            Err(e) if Instant::now() >= deadline => {
                panic!("restart {} after kill -9: {e:?}", node.name())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// `pg_stat_replication` on `primary` lists `standby` as streaming.
pub fn streams_to(primary: &PgNode, standby: &str) -> bool {
    primary
        .try_exec(&format!(
            "SELECT count(*) FROM pg_stat_replication WHERE application_name = '{standby}' AND state = 'streaming'"
        ))
        .is_ok_and(|c| c == "1")
}

// ---------------------------------------------------------------------------------------------
// The promoter process
// ---------------------------------------------------------------------------------------------

/// Builds a promoter config from a running pglb's and starts the binary.
pub struct PromoterBuilder {
    promoter: toml::Table,
    backend_keys: HashMap<String, toml::Table>,
    addresses: HashMap<String, String>,
    args: Vec<String>,
    store: Option<toml::Table>,
    envs: Vec<(String, String)>,
}

impl Default for PromoterBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl PromoterBuilder {
    /// Defaults: failover_after 2s, interval 200ms, user postgres, replicator credentials.
    pub fn new() -> PromoterBuilder {
        PromoterBuilder {
            promoter: table(&[
                ("user", "postgres".into()),
                ("password_env", "PGLB_PROMOTER_PASSWORD".into()),
                ("replication_user", super::REPL_USER.into()),
                (
                    "replication_password_env",
                    "PGLB_REPLICATION_PASSWORD".into(),
                ),
                ("failover_after", "2s".into()),
                ("interval", "200ms".into()),
            ]),
            backend_keys: HashMap::new(),
            addresses: HashMap::new(),
            args: Vec::new(),
            store: None,
            envs: Vec::new(),
        }
    }

    /// `--id NAME`.
    pub fn id(self, id: &str) -> Self {
        self.arg("--id").arg(id)
    }

    /// `[store] kind = "etcd"` with these client URLs, `prefix` and `lease_ttl`.
    pub fn store(mut self, endpoints: &[String], prefix: &str, lease_ttl: Duration) -> Self {
        let eps: Vec<toml::Value> = endpoints.iter().map(|e| e.clone().into()).collect();
        self.store = Some(table(&[
            ("kind", "etcd".into()),
            ("endpoints", toml::Value::Array(eps)),
            ("prefix", prefix.into()),
            ("lease_ttl", format!("{}s", lease_ttl.as_secs()).into()),
        ]));
        self
    }

    /// An environment variable for the sidecar (e.g. a failpoint), kept across restarts until
    /// [`Promoter::remove_env`].
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.to_string(), value.to_string()));
        self
    }

    /// An extra argument for the sidecar's command line (e.g. `--dry-run`).
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_string());
        self
    }

    /// `pglb_url` as a list: every pglb in `stats` is a witness (default: the one given to
    /// [`PromoterBuilder::start`]).
    pub fn pglb_urls(self, stats: &[SocketAddr]) -> Self {
        let urls: Vec<toml::Value> = stats
            .iter()
            .map(|a| toml::Value::from(format!("http://{a}")))
            .collect();
        self.set("pglb_url", toml::Value::Array(urls))
    }

    /// `[promoter] key = value`.
    pub fn set(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        self.promoter.insert(key.to_string(), value.into());
        self
    }

    /// Removes `[promoter] key` so the promoter's default applies.
    pub fn unset(mut self, key: &str) -> Self {
        self.promoter.remove(key);
        self
    }

    /// `key = value` in the `[[backend]]` called `name` (priority, no_failover).
    pub fn backend(mut self, name: &str, key: &str, value: impl Into<toml::Value>) -> Self {
        self.backend_keys
            .entry(name.to_string())
            .or_default()
            .insert(key.to_string(), value.into());
        self
    }

    /// The promoter reaches backend `name` at `address` (e.g. through a [`Relay`]).
    pub fn address(mut self, name: &str, address: SocketAddr) -> Self {
        self.addresses.insert(name.to_string(), address.to_string());
        self
    }

    /// Writes the config next to pglb's (same backends, plus `[promoter]`) and starts.
    pub fn start(self, lb: &Pglb) -> Promoter {
        let dir = tempfile::Builder::new()
            .prefix("pglb-promoter-")
            .tempdir()
            .expect("create promoter temp dir");
        let src = fs::read_to_string(lb.config_path()).expect("read pglb config");
        let mut root: toml::Table = toml::from_str(&src).expect("parse pglb config");
        if let Some(toml::Value::Array(backends)) = root.get_mut("backend") {
            for b in backends.iter_mut() {
                let toml::Value::Table(t) = b else { continue };
                let name = t
                    .get("name")
                    .and_then(|n| n.as_str())
                    .unwrap_or("")
                    .to_string();
                if let Some(extra) = self.backend_keys.get(&name) {
                    for (k, v) in extra {
                        t.insert(k.clone(), v.clone());
                    }
                }
                if let Some(a) = self.addresses.get(&name) {
                    t.insert("address".into(), a.clone().into());
                }
            }
        }
        let status = free_addr();
        let mut promoter = self.promoter.clone();
        promoter.insert("listen".into(), status.to_string().into());
        if !promoter.contains_key("pglb_url") {
            promoter.insert("pglb_url".into(), format!("http://{}", lb.stats).into());
        }
        root.insert("promoter".into(), toml::Value::Table(promoter));
        if let Some(store) = self.store {
            root.insert("store".into(), toml::Value::Table(store));
        }
        let config = dir.path().join("lb.toml");
        fs::write(
            &config,
            toml::to_string(&root).expect("render promoter config"),
        )
        .expect("write promoter config");
        let mut p = Promoter {
            child: None,
            config,
            log: dir.path().join("promoter.log"),
            status,
            runs: 0,
            args: self.args,
            envs: self.envs,
            _dir: dir,
        };
        p.spawn();
        p
    }
}

/// A running `pglb-promoter`. Dropping it sends SIGTERM (SIGKILL after 5 s).
pub struct Promoter {
    child: Option<Child>,
    config: PathBuf,
    log: PathBuf,
    /// Its `/status` address.
    pub status: SocketAddr,
    runs: u32,
    /// Extra arguments of the sidecar (not of one-shot commands).
    args: Vec<String>,
    /// Extra environment of the sidecar.
    envs: Vec<(String, String)>,
    _dir: TempDir,
}

impl Promoter {
    fn command(&self) -> Command {
        let mut cmd = Command::new(promoter_bin());
        cmd.arg("--config")
            .arg(&self.config)
            // Only its own secrets: pglb's check password is not the promoter's business.
            .env_remove("PGLB_CHECK_PASSWORD")
            .env("PGLB_PROMOTER_PASSWORD", PROMOTER_PASSWORD)
            .env("PGLB_REPLICATION_PASSWORD", REPL_PASSWORD)
            .env_remove("RUST_LOG")
            .env_remove("PGLB_LOG")
            .stdin(Stdio::null());
        if let Some(level) = std::env::var_os("PGLB_TEST_RUST_LOG") {
            cmd.env("PGLB_LOG", level);
        }
        cmd
    }

    fn spawn(&mut self) {
        self.runs += 1;
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open promoter log");
        let _ = writeln!(log, "=== pglb-promoter run {}", self.runs);
        let child = self
            .command()
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().expect("clone log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn pglb-promoter");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "pglb-promoter exited early with {st}\n{}",
                    tail(&self.log_text(), 40)
                );
            }
            if http_get(self.status, "/status").is_ok() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "pglb-promoter /status not answering within 20s\n{}",
                    tail(&self.log_text(), 40)
                );
            }
            std::thread::sleep(POLL);
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("promoter running").id()
    }

    /// Drops an environment variable given with [`PromoterBuilder::env`] for the next start.
    pub fn remove_env(&mut self, key: &str) {
        self.envs.retain(|(k, _)| k != key);
    }

    /// Sends `sig` to the sidecar (SIGSTOP, SIGCONT).
    pub fn signal(&self, sig: libc::c_int) {
        assert!(
            super::signal(self.pid(), sig),
            "signal {sig} to the promoter"
        );
    }

    /// Whether the process has exited (e.g. a failpoint aborted it); reaps it then.
    pub fn exited(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(_))) => {
                self.child = None;
                true
            }
            Some(_) => false,
            None => true,
        }
    }

    /// Whether the process is stopped (SIGSTOP): state `T` in `/proc/PID/stat`.
    pub fn is_stopped(&self) -> bool {
        let Some(c) = &self.child else { return false };
        fs::read_to_string(format!("/proc/{}/stat", c.id()))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().starts_with('T'))
            })
            .unwrap_or(false)
    }

    /// Starts it again after it exited on its own (a failpoint's abort).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "promoter still running");
        self.spawn();
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// SIGKILL, no goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again with the same config and status address (after [`Promoter::kill9`]).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Everything every run wrote.
    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log).unwrap_or_default()).to_string()
    }

    /// The log of the current run only.
    pub fn current_log(&self) -> String {
        let all = self.log_text();
        let marker = format!("=== pglb-promoter run {}", self.runs);
        all.split_once(&marker)
            .map(|(_, rest)| rest.to_string())
            .unwrap_or(all)
    }

    pub async fn wait_log(&self, timeout: Duration, pattern: &str) {
        let deadline = Instant::now() + timeout;
        while !self.current_log().contains(pattern) {
            if Instant::now() >= deadline {
                panic!(
                    "promoter log did not contain {pattern:?} within {timeout:?}; tail:\n{}",
                    tail(&self.log_text(), 50)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `GET /status`.
    pub fn status(&self) -> Result<serde_json::Value, String> {
        let (code, body) = http_get(self.status, "/status")?;
        if code != 200 {
            return Err(format!("/status answered {code}"));
        }
        serde_json::from_str(&body).map_err(|e| format!("/status: {e}: {body}"))
    }

    /// `GET /metrics` (Prometheus text format).
    pub fn metrics(&self) -> Result<String, String> {
        let (code, body) = http_get(self.status, "/metrics")?;
        if code != 200 {
            return Err(format!("/metrics answered {code}"));
        }
        Ok(body)
    }

    /// Polls `/status` until `pred` holds; panics with the last document and the log tail.
    pub async fn wait_status<F: FnMut(&serde_json::Value) -> bool>(
        &self,
        timeout: Duration,
        what: &str,
        mut pred: F,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let last = self.status();
            if let Ok(s) = &last {
                if pred(s) {
                    return s.clone();
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "promoter status: timed out after {timeout:?} waiting for {what}; last: {}\n--- promoter log tail\n{}",
                    match last {
                        Ok(s) => serde_json::to_string_pretty(&s).unwrap_or_default(),
                        Err(e) => e,
                    },
                    tail(&self.log_text(), 50)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until the promoter is steady with `primary`.
    pub async fn wait_steady(&self, primary: &str, timeout: Duration) -> serde_json::Value {
        self.wait_status(timeout, &format!("steady with primary {primary}"), |s| {
            s["decision"] == "steady" && s["primary"] == primary
        })
        .await
    }

    /// Runs a one-shot command (`switchover ...`, `rejoin ...`) with this config; returns its
    /// output. Blocking: call from `spawn_blocking` when the test runtime must keep running.
    pub fn cli(&self, args: &[&str], timeout: Duration) -> Output {
        let mut cmd = self.command();
        cmd.args(args);
        super::run_with_timeout(&mut cmd, timeout)
            .unwrap_or_else(|e| panic!("pglb-promoter {args:?}: {e}"))
    }
}

impl Drop for Promoter {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            super::signal(c.id(), libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- promoter log tail ({})\n{}",
                self.log.display(),
                tail(&self.log_text(), 80)
            );
        }
    }
}

/// Runs `pglb-promoter rejoin` for `node` (data dir, binaries and log from the harness) and
/// panics with its output unless it succeeds.
pub async fn rejoin(promoter: &Promoter, node: &PgNode) -> String {
    let args = vec![
        "rejoin".to_string(),
        "--name".into(),
        node.name().to_string(),
        "--data-dir".into(),
        node.data_dir().display().to_string(),
        "--pg-bin".into(),
        pg_bin_dir().display().to_string(),
        "--log".into(),
        node.log_path().display().to_string(),
        "--timeout".into(),
        "60s".into(),
    ];
    let mut cmd = promoter.command();
    cmd.args(&args);
    let out = tokio::task::spawn_blocking(move || {
        super::run_with_timeout(&mut cmd, Duration::from_secs(180))
    })
    .await
    .expect("join rejoin")
    .unwrap_or_else(|e| panic!("pglb-promoter rejoin: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "rejoin {} failed ({}):\n{text}",
        node.name(),
        out.status
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Runs `pglb-promoter rejoin` for `node` like [`rejoin`], success or not: (success, stdout +
/// stderr).
pub async fn try_rejoin(promoter: &Promoter, node: &PgNode) -> (bool, String) {
    let mut cmd = promoter.command();
    cmd.arg("rejoin")
        .args(["--name", node.name(), "--data-dir"])
        .arg(node.data_dir())
        .arg("--pg-bin")
        .arg(pg_bin_dir())
        .arg("--log")
        .arg(node.log_path())
        .args(["--timeout", "30s"]);
    let out = tokio::task::spawn_blocking(move || {
        super::run_with_timeout(&mut cmd, Duration::from_secs(180))
    })
    .await
    .expect("join rejoin")
    .unwrap_or_else(|e| panic!("pglb-promoter rejoin: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Runs `pglb-promoter switchover --to NAME`; returns the JSON report.
pub async fn switchover(promoter: &Promoter, to: &str) -> serde_json::Value {
    let mut cmd = promoter.command();
    cmd.args(["switchover", "--to", to]);
    let out = tokio::task::spawn_blocking(move || {
        super::run_with_timeout(&mut cmd, Duration::from_secs(120))
    })
    .await
    .expect("join switchover")
    .unwrap_or_else(|e| panic!("pglb-promoter switchover: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "switchover to {to} failed ({}):\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("switchover report: {e}: {stdout}"))
}

// ---------------------------------------------------------------------------------------------
// A relay that can be cut
// ---------------------------------------------------------------------------------------------

/// TCP relay on 127.0.0.1 to `target`. `cut()` ends every relayed connection and makes new
/// ones hang (accepted, never answered), like a network partition; `heal()` undoes it.
pub struct Relay {
    pub addr: SocketAddr,
    cut: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay addr");
        let (cut, cut_rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let mut cut_rx = cut_rx.clone();
                tokio::spawn(async move {
                    if *cut_rx.borrow_and_update() {
                        // Partitioned: hold the socket silently until healed.
                        let _ = cut_rx.wait_for(|c| !*c).await;
                        return;
                    }
                    let Ok(mut backend) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut backend) => {}
                        _ = cut_rx.wait_for(|c| *c) => {}
                    }
                });
            }
        });
        Relay { addr, cut, task }
    }

    pub fn cut(&self) {
        let _ = self.cut.send(true);
    }

    pub fn heal(&self) {
        let _ = self.cut.send(false);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// A writer through pglb
// ---------------------------------------------------------------------------------------------

/// One acknowledged insert.
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    pub id: i64,
    pub at: Instant,
    /// `inet_server_port()` of the server that took it.
    pub port: u16,
}

/// Inserts rows with increasing ids into `table` through `addr` as fast as one session can,
/// reconnecting after every error; records what was acknowledged.
pub struct Writer {
    pub table: String,
    acks: Arc<Mutex<Vec<Ack>>>,
    pub errors: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Writer {
    /// Creates `table` through `addr`, then starts writing.
    pub async fn start(addr: SocketAddr, table: &str) -> Writer {
        let c = connect_as(addr, APP_USER, APP_PASSWORD)
            .await
            .expect("writer: connect to create the table");
        c.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (id bigint PRIMARY KEY, at timestamptz DEFAULT now())"
        ))
        .await
        .expect("writer: create table");
        drop(c);
        let acks: Arc<Mutex<Vec<Ack>>> = Arc::default();
        let errors = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let (acks, errors, stop, table) = (
                acks.clone(),
                errors.clone(),
                stop.clone(),
                table.to_string(),
            );
            async move {
                let mut id = 1i64;
                while !stop.load(Ordering::Relaxed) {
                    let cfg = super::client_config(addr, APP_USER, APP_PASSWORD);
                    let conn = tokio::time::timeout(
                        Duration::from_secs(3),
                        cfg.connect(tokio_postgres::NoTls),
                    )
                    .await;
                    let client = match conn {
                        Ok(Ok((client, connection))) => {
                            tokio::spawn(async move {
                                let _ = connection.await;
                            });
                            client
                        }
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    };
                    while !stop.load(Ordering::Relaxed) {
                        let sql = format!(
                            "INSERT INTO {table} (id) VALUES ({id}) RETURNING inet_server_port()"
                        );
                        match tokio::time::timeout(
                            Duration::from_secs(3),
                            client.simple_query(&sql),
                        )
                        .await
                        {
                            Ok(Ok(msgs)) => {
                                let port = msgs
                                    .iter()
                                    .find_map(|m| match m {
                                        tokio_postgres::SimpleQueryMessage::Row(r) => {
                                            r.get(0).and_then(|p| p.parse().ok())
                                        }
                                        _ => None,
                                    })
                                    .unwrap_or(0);
                                acks.lock().unwrap().push(Ack {
                                    id,
                                    at: Instant::now(),
                                    port,
                                });
                                id += 1;
                            }
                            _ => {
                                // Unknown outcome for this id: never reuse it.
                                id += 1;
                                errors.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                        }
                    }
                }
            }
        });
        Writer {
            table: table.to_string(),
            acks,
            errors,
            stop,
            task: Some(task),
        }
    }

    pub fn acks(&self) -> Vec<Ack> {
        self.acks.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.acks.lock().unwrap().len()
    }

    /// The first acknowledged insert after `t`.
    pub fn first_after(&self, t: Instant) -> Option<Ack> {
        self.acks.lock().unwrap().iter().find(|a| a.at > t).copied()
    }

    /// The first insert acknowledged after `t` by a server other than the one on `port` (an
    /// answer from a killed server may still arrive just after the kill).
    pub fn first_elsewhere(&self, t: Instant, port: u16) -> Option<Ack> {
        first_elsewhere(&self.acks, t, port)
    }

    /// Waits for [`Writer::first_elsewhere`].
    pub async fn wait_first_elsewhere(&self, t: Instant, port: u16, timeout: Duration) -> Ack {
        wait_first_elsewhere(&self.acks, t, port, timeout, || {
            format!(
                "no write acknowledged by another server within {timeout:?} ({} acks, {} errors)",
                self.count(),
                self.errors.load(Ordering::Relaxed)
            )
        })
        .await
    }

    pub async fn wait_count(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.count() < n {
            if Instant::now() >= deadline {
                panic!(
                    "writer: {} of {n} rows acknowledged after {timeout:?} ({} errors)",
                    self.count(),
                    self.errors.load(Ordering::Relaxed)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops writing; returns every acknowledged row.
    pub async fn stop(mut self) -> Vec<Ack> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        self.acks()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// The server's SQLSTATE and message, or the client's error and its cause.
fn error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

/// Where a [`ConnWriter`] attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailedAt {
    /// The login through the proxy failed (an error such as pglb's FATAL, a reset) or did not
    /// finish within the login timeout: what a connecting client counts as a failed connection.
    Connect,
    /// Logged in, then the insert failed: it was in flight on a server that went away.
    Write,
}

/// One failed [`ConnWriter`] attempt.
#[derive(Debug, Clone)]
pub struct Failure {
    /// When the attempt started.
    pub at: Instant,
    pub took: Duration,
    pub stage: FailedAt,
    pub error: String,
}

/// Like `pgbench -C`: a new connection for every insert into `table` through `addr`, one
/// attempt after the other (connect, insert, disconnect); records what was acknowledged and
/// every attempt that failed, with the stage where it failed.
pub struct ConnWriter {
    pub table: String,
    acks: Arc<Mutex<Vec<Ack>>>,
    failures: Arc<Mutex<Vec<Failure>>>,
    attempts: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ConnWriter {
    /// Creates `table` through `addr`, then starts. A login that takes longer than
    /// `login_timeout` (what an application would allow) is a failed connection attempt.
    pub async fn start(addr: SocketAddr, table: &str, login_timeout: Duration) -> ConnWriter {
        let c = connect_as(addr, APP_USER, APP_PASSWORD)
            .await
            .expect("conn writer: connect to create the table");
        c.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (id bigint PRIMARY KEY, at timestamptz DEFAULT now())"
        ))
        .await
        .expect("conn writer: create table");
        drop(c);
        let acks: Arc<Mutex<Vec<Ack>>> = Arc::default();
        let failures: Arc<Mutex<Vec<Failure>>> = Arc::default();
        let attempts = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let (acks, failures, attempts, stop, table) = (
                acks.clone(),
                failures.clone(),
                attempts.clone(),
                stop.clone(),
                table.to_string(),
            );
            async move {
                let mut id = 1i64;
                while !stop.load(Ordering::Relaxed) {
                    attempts.fetch_add(1, Ordering::Relaxed);
                    let started = Instant::now();
                    let fail = |stage, error: String| Failure {
                        at: started,
                        took: started.elapsed(),
                        stage,
                        error,
                    };
                    let cfg = super::client_config(addr, APP_USER, APP_PASSWORD);
                    let client = match tokio::time::timeout(
                        login_timeout,
                        cfg.connect(tokio_postgres::NoTls),
                    )
                    .await
                    {
                        Ok(Ok((client, connection))) => {
                            tokio::spawn(async move {
                                let _ = connection.await;
                            });
                            client
                        }
                        Ok(Err(e)) => {
                            failures
                                .lock()
                                .unwrap()
                                .push(fail(FailedAt::Connect, error_text(&e)));
                            // pgbench -C goes on at once; a short pause keeps a refusing
                            // proxy from being counted thousands of times.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                        Err(_) => {
                            failures.lock().unwrap().push(fail(
                                FailedAt::Connect,
                                format!("no login within {login_timeout:?}"),
                            ));
                            continue;
                        }
                    };
                    let sql = format!(
                        "INSERT INTO {table} (id) VALUES ({id}) RETURNING inet_server_port()"
                    );
                    // Unknown outcome on failure: an id is never reused.
                    let this = id;
                    id += 1;
                    match tokio::time::timeout(Duration::from_secs(30), client.simple_query(&sql))
                        .await
                    {
                        Ok(Ok(msgs)) => {
                            let port = msgs
                                .iter()
                                .find_map(|m| match m {
                                    tokio_postgres::SimpleQueryMessage::Row(r) => {
                                        r.get(0).and_then(|p| p.parse().ok())
                                    }
                                    _ => None,
                                })
                                .unwrap_or(0);
                            acks.lock().unwrap().push(Ack {
                                id: this,
                                at: Instant::now(),
                                port,
                            });
                        }
                        Ok(Err(e)) => failures
                            .lock()
                            .unwrap()
                            .push(fail(FailedAt::Write, error_text(&e))),
                        Err(_) => failures
                            .lock()
                            .unwrap()
                            .push(fail(FailedAt::Write, "no answer within 30s".into())),
                    }
                }
            }
        });
        ConnWriter {
            table: table.to_string(),
            acks,
            failures,
            attempts,
            stop,
            task: Some(task),
        }
    }

    pub fn count(&self) -> usize {
        self.acks.lock().unwrap().len()
    }

    /// Attempts started so far.
    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::Relaxed)
    }

    pub fn failures(&self) -> Vec<Failure> {
        self.failures.lock().unwrap().clone()
    }

    /// The first insert acknowledged after `t` by a server other than the one on `port`.
    pub fn first_elsewhere(&self, t: Instant, port: u16) -> Option<Ack> {
        first_elsewhere(&self.acks, t, port)
    }

    /// Waits for [`ConnWriter::first_elsewhere`].
    pub async fn wait_first_elsewhere(&self, t: Instant, port: u16, timeout: Duration) -> Ack {
        wait_first_elsewhere(&self.acks, t, port, timeout, || {
            format!(
                "no new-connection write acknowledged by another server within {timeout:?} ({} acks, failures: {:?})",
                self.count(),
                self.failures()
            )
        })
        .await
    }

    pub async fn wait_count(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.count() < n {
            if Instant::now() >= deadline {
                panic!(
                    "conn writer: {} of {n} rows acknowledged after {timeout:?} (failures: {:?})",
                    self.count(),
                    self.failures()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops after the attempt in progress; returns every acknowledged row.
    pub async fn stop(mut self) -> Vec<Ack> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(40), t).await;
        }
        self.acks.lock().unwrap().clone()
    }
}

impl Drop for ConnWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// The first insert in `acks` acknowledged after `t` by a server other than the one on `port`.
fn first_elsewhere(acks: &Mutex<Vec<Ack>>, t: Instant, port: u16) -> Option<Ack> {
    acks.lock()
        .unwrap()
        .iter()
        .find(|a| a.at > t && a.port != port)
        .copied()
}

/// Polls [`first_elsewhere`] until `timeout`, then panics with `why()`.
async fn wait_first_elsewhere(
    acks: &Mutex<Vec<Ack>>,
    t: Instant,
    port: u16,
    timeout: Duration,
    why: impl Fn() -> String,
) -> Ack {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(a) = first_elsewhere(acks, t, port) {
            return a;
        }
        if Instant::now() >= deadline {
            panic!("{}", why());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Acknowledged ids missing from `table` on `node`.
pub fn missing_rows(node: &PgNode, table: &str, acks: &[Ack]) -> Vec<i64> {
    let (Some(lo), Some(hi)) = (
        acks.iter().map(|a| a.id).min(),
        acks.iter().map(|a| a.id).max(),
    ) else {
        return vec![];
    };
    // The server lists the absent ids of the range (few); the client keeps the acknowledged ones.
    let out = node.exec(&format!(
        "SELECT coalesce(string_agg(x::text, ','), '') FROM generate_series({lo}::bigint, {hi}) AS x \
         WHERE NOT EXISTS (SELECT 1 FROM {table} WHERE id = x)"
    ));
    let acked: std::collections::HashSet<i64> = acks.iter().map(|a| a.id).collect();
    out.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().expect("id"))
        .filter(|id| acked.contains(id))
        .collect()
}

/// Value of the sample `name{labels}` in Prometheus text `metrics`: the series called `name`
/// whose labels are exactly `labels` (any order). `None` when there is no such series.
pub fn metric(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut want: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    want.sort();
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.trim().rsplit_once(' ')?;
            let (n, mut got) = match series.split_once('{') {
                Some((n, rest)) => {
                    let inner = rest.strip_suffix('}')?;
                    let got: Option<Vec<(String, String)>> = inner
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            let (k, v) = p.split_once('=')?;
                            Some((k.to_string(), v.trim_matches('"').to_string()))
                        })
                        .collect();
                    (n, got?)
                }
                None => (series, vec![]),
            };
            got.sort();
            (n == name && got == want).then(|| value.parse().ok())?
        })
}
