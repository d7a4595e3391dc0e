//! A real 3-member etcd cluster on loopback for store tests: free ports, data in a temp dir
//! (on /dev/shm when there is one, since etcd fsyncs every write), one log file per member.
//! Members can be stopped and started again (same data), or frozen and thawed (SIGSTOP/SIGCONT,
//! a hung host). Every process is stopped by its PID on drop.
//!
//! The binary is `$ETCD_BIN`, else `etcd` on PATH, else `/usr/bin/etcd` (Debian's `etcd-server`;
//! `.ci/run` installs it).
#![allow(dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pglb::config::{StoreConfig, StoreKind};
use tempfile::TempDir;

use super::free_port;

/// Finds the etcd server binary; panics with a clear message when there is none.
pub fn etcd_bin() -> PathBuf {
    if let Ok(p) = std::env::var("ETCD_BIN") {
        return PathBuf::from(p);
    }
    if let Ok(path) = std::env::var("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("etcd");
            if p.is_file() {
                return p;
            }
        }
    }
    let p = PathBuf::from("/usr/bin/etcd");
    assert!(
        p.is_file(),
        "etcd not found (set ETCD_BIN, or install Debian's etcd-server: .ci/run does)"
    );
    p
}

pub struct EtcdMember {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    frozen: bool,
}

impl EtcdMember {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    fn signal(&self, sig: libc::c_int) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on a child we spawned and have not reaped.
            unsafe { libc::kill(pid as libc::pid_t, sig) };
        }
    }

    /// `/health` answers `"health":"true"` (the member has a leader and quorum).
    fn is_healthy(&self) -> bool {
        http_get(self.client_port, "/health").is_some_and(|b| b.contains("\"true\""))
    }

    /// The member answers HTTP at all (healthy or not).
    fn answers(&self) -> bool {
        http_get(self.client_port, "/version").is_some()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A running 3-member cluster.
pub struct EtcdCluster {
    pub members: Vec<EtcdMember>,
    initial_cluster: String,
    token: String,
    _dir: TempDir,
}

fn temp_root() -> TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new()
            .prefix("pglb-etcd-")
            .tempdir_in(shm)
        {
            return d;
        }
    }
    tempfile::Builder::new()
        .prefix("pglb-etcd-")
        .tempdir()
        .expect("create temp dir")
}

impl EtcdCluster {
    /// Starts three members and waits until all are healthy. Retries with new ports when another
    /// process took one of ours in between.
    pub fn start() -> EtcdCluster {
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start(3) {
                Ok(c) => return c,
                Err(e) => last = e,
            }
        }
        panic!("etcd cluster did not start: {last}");
    }

    fn try_start(n: usize) -> Result<EtcdCluster, String> {
        let dir = temp_root();
        let token = format!(
            "pglb-test-{}-{}",
            std::process::id(),
            dir.path().file_name().unwrap().to_string_lossy()
        );
        let mut members: Vec<EtcdMember> = (0..n)
            .map(|i| {
                let name = format!("m{i}");
                EtcdMember {
                    data_dir: dir.path().join(&name),
                    log: dir.path().join(format!("{name}.log")),
                    name,
                    client_port: free_port(),
                    peer_port: free_port(),
                    child: None,
                    frozen: false,
                }
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            members: Vec::new(),
            initial_cluster,
            token,
            _dir: dir,
        };
        for m in &mut members {
            spawn_member(m, &cluster.initial_cluster, &cluster.token, "new");
        }
        cluster.members = members;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if cluster.members.iter().all(EtcdMember::is_healthy) {
                return Ok(cluster);
            }
            for m in &mut cluster.members {
                if let Some(Ok(Some(status))) = m.child.as_mut().map(|c| c.try_wait()) {
                    return Err(format!("{} exited ({status}): {}", m.name, m.log()));
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "not healthy within 30 s; logs:\n{}",
                    cluster
                        .members
                        .iter()
                        .map(|m| format!("--- {}\n{}", m.name, m.log()))
                        .collect::<String>()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Client URLs of all members.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdMember::endpoint).collect()
    }

    /// `[store]` for these members only (a client that talks to them alone), with `ttl`.
    pub fn store_config(&self, members: &[usize], prefix: &str, ttl: Duration) -> StoreConfig {
        StoreConfig {
            kind: StoreKind::Etcd,
            endpoints: members
                .iter()
                .map(|&i| self.members[i].endpoint())
                .collect(),
            prefix: prefix.to_string(),
            lease_ttl: ttl,
            ..StoreConfig::default()
        }
    }

    /// Stops member `i` (SIGKILL, as a crashed host) and reaps it.
    pub fn stop_member(&mut self, i: usize) {
        let m = &mut self.members[i];
        if m.frozen {
            m.signal(libc::SIGCONT);
            m.frozen = false;
        }
        if let Some(mut c) = m.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data dir and waits until it answers HTTP (it may still lack
    /// quorum: see `wait_healthy`).
    pub fn start_member(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} is running");
        let (ic, token) = (self.initial_cluster.clone(), self.token.clone());
        spawn_member(&mut self.members[i], &ic, &token, "existing");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.members[i].answers() {
            assert!(
                Instant::now() < deadline,
                "etcd member {i} did not come back: {}",
                self.members[i].log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every running, unfrozen member reports itself healthy.
    pub fn wait_healthy(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let ok = self
                .members
                .iter()
                .filter(|m| m.child.is_some() && !m.frozen)
                .all(EtcdMember::is_healthy);
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd not healthy within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGSTOP: member `i` hangs with its sockets open, like a paused VM.
    pub fn freeze(&mut self, i: usize) {
        self.members[i].signal(libc::SIGSTOP);
        self.members[i].frozen = true;
    }

    /// SIGCONT after `freeze`.
    pub fn thaw(&mut self, i: usize) {
        self.members[i].signal(libc::SIGCONT);
        self.members[i].frozen = false;
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.stop_member(i);
        }
    }
}

fn spawn_member(m: &mut EtcdMember, initial_cluster: &str, token: &str, state: &str) {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&m.log)
        .expect("open etcd log");
    let client = m.endpoint();
    let peer = format!("http://127.0.0.1:{}", m.peer_port);
    let child = Command::new(etcd_bin())
        .env_clear()
        .args(["--name", &m.name])
        .arg("--data-dir")
        .arg(&m.data_dir)
        .args(["--listen-client-urls", &client])
        .args(["--advertise-client-urls", &client])
        .args(["--listen-peer-urls", &peer])
        .args(["--initial-advertise-peer-urls", &peer])
        .args(["--initial-cluster", initial_cluster])
        .args(["--initial-cluster-token", token])
        .args(["--initial-cluster-state", state])
        .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
        .args([
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
            "--log-level",
            "warn",
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone log handle"))
        .stderr(log)
        .spawn()
        .expect("spawn etcd");
    m.child = Some(child);
    m.frozen = false;
}

/// A tiny HTTP/1.0 GET on 127.0.0.1:`port` with a short timeout; the body, or `None`.
fn http_get(port: u16, path: &str) -> Option<String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(1500))).ok()?;
    s.set_write_timeout(Some(Duration::from_millis(300))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.").then(|| body.to_string())
}
