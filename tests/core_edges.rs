//! Edges of the core balancer that the other suites leave open:
//!
//! - health-check logins with md5 and with trust (the rest of the suite uses SCRAM);
//! - the command line: `pglb check` prints resolved defaults, `--help`, `./lb.toml` by default;
//! - an SSLRequest/GSSENCRequest on a port without a backend: `N`, then pglb's FATAL;
//! - `max_lag_time` against real replication, and read sessions that stay on a lagging replica;
//! - `close_on_writer_change = false`: a write session on a fenced old primary stays open;
//! - SIGINT, and `shutdown_timeout` cutting an idle session;
//! - `--log-format json`: every line is a JSON object.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::*;

const T: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Puts `line` in front of the node's pg_hba.conf (first match wins) and reloads the server.
fn hba_prepend(node: &PgNode, line: &str) {
    let path = node.data_dir().join("pg_hba.conf");
    let old = std::fs::read_to_string(&path).expect("read pg_hba.conf");
    // Overwriting keeps the file's owner (the postgres OS user).
    std::fs::write(&path, format!("{line}\n{old}")).expect("write pg_hba.conf");
    let errors = node.exec("SELECT count(*) FROM pg_hba_file_rules WHERE error IS NOT NULL");
    assert_eq!(errors, "0", "{}: pg_hba.conf has errors", node.name());
    node.exec("SELECT pg_reload_conf()");
}

/// Appends `setting` to the node's postgresql.conf (reload separately).
fn conf_append(node: &PgNode, setting: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(node.data_dir().join("postgresql.conf"))
        .expect("open postgresql.conf");
    writeln!(f, "\n{setting}").expect("append to postgresql.conf");
}

/// Waits for pg-0 primary/up and every other node replica/up.
async fn wait_roles(lb: &Pglb, cluster: &PgCluster, what: &str) -> Stats {
    let names: Vec<String> = cluster
        .nodes()
        .iter()
        .map(|n| n.name().to_string())
        .collect();
    lb.wait_stats(T, what, |s| {
        s.primary.as_deref() == Some("pg-0")
            && names.iter().all(|n| {
                s.try_backend(n).is_some_and(|b| {
                    b.state == "up" && b.role == if n == "pg-0" { "primary" } else { "replica" }
                })
            })
    })
    .await
}

/// A StartupMessage (protocol 3.0) for `user` on `database`.
fn startup_message(user: &str, database: &str) -> Vec<u8> {
    let mut body = Vec::from(196_608u32.to_be_bytes());
    for (k, v) in [("user", user), ("database", database)] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut p = Vec::from(((body.len() + 4) as u32).to_be_bytes());
    p.extend(body);
    p
}

/// An 8-byte request packet (SSLRequest 80877103, GSSENCRequest 80877104).
fn request_packet(code: u32) -> Vec<u8> {
    let mut p = Vec::from(8u32.to_be_bytes());
    p.extend_from_slice(&code.to_be_bytes());
    p
}

const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;

/// Reads one byte within 3 s.
async fn read_byte(s: &mut TcpStream) -> u8 {
    let mut b = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut b))
        .await
        .expect("no answer within 3 s")
        .expect("read one byte");
    b[0]
}

/// Reads one ErrorResponse, then expects EOF; returns its fields by type byte.
async fn read_error_then_eof(s: &mut TcpStream) -> HashMap<char, String> {
    let within = Duration::from_secs(3);
    let mut head = [0u8; 5];
    tokio::time::timeout(within, s.read_exact(&mut head))
        .await
        .expect("no ErrorResponse within 3 s")
        .expect("read message header");
    assert_eq!(
        head[0], b'E',
        "expected an ErrorResponse, got type {:?}",
        head[0] as char
    );
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    assert!((4..10_000).contains(&len), "ErrorResponse length {len}");
    let mut body = vec![0u8; len - 4];
    tokio::time::timeout(within, s.read_exact(&mut body))
        .await
        .expect("ErrorResponse body within 3 s")
        .expect("read ErrorResponse body");
    let mut rest = [0u8; 64];
    let n = tokio::time::timeout(within, s.read(&mut rest))
        .await
        .expect("pglb did not close the connection within 3 s of its ErrorResponse")
        .unwrap_or(0);
    assert_eq!(n, 0, "bytes after the ErrorResponse: {:?}", &rest[..n]);
    body.split(|&b| b == 0)
        .filter(|f| !f.is_empty())
        .map(|f| (f[0] as char, String::from_utf8_lossy(&f[1..]).into_owned()))
        .collect()
}

/// A pglb spawned by hand (no `--config`), stopped by PID on drop.
struct RawPglb(Option<Child>);

impl RawPglb {
    fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = self.0.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                self.0 = None;
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RawPglb {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `pglb` with `args`, in `dir`, without the environment that could pick a config for it.
fn pglb_command(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(pglb_bin());
    cmd.args(args)
        .current_dir(dir)
        .env_remove("PGLB_CONFIG")
        .env_remove("PGLB_LOG_FORMAT")
        .env_remove("PGLB_LOG")
        .env_remove("RUST_LOG")
        .env("PGLB_CHECK_PASSWORD", "unused-check-pw")
        .stdin(Stdio::null());
    cmd
}

// ---------------------------------------------------------------------------------------------
// 1. Check logins: md5 and trust
// ---------------------------------------------------------------------------------------------

/// The check role's password stored as an md5 hash and an `md5` pg_hba line for it: pglb's
/// checks log in with the MD5 exchange (the server log says `method=md5`) and the backends come
/// up with their roles. Before the md5 line, the same pglb is refused (SCRAM line, md5 hash),
/// so the change of method is what brings them up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn check_logs_in_with_md5() {
    let cluster = PgCluster::start(1);
    cluster.primary().exec(&format!(
        "SET password_encryption = 'md5'; ALTER ROLE {CHECK_USER} PASSWORD '{CHECK_PASSWORD}'"
    ));
    cluster.wait_replayed(1, T);
    for n in cluster.nodes() {
        let hash = n.exec(&format!(
            "SELECT rolpassword FROM pg_authid WHERE rolname = '{CHECK_USER}'"
        ));
        assert!(
            hash.starts_with("md5"),
            "{}: stored hash is {hash:?}",
            n.name()
        );
    }

    let lb = Pglb::builder(&cluster).start();
    lb.wait_stats(T, "both backends down: SCRAM line, md5 hash", |s| {
        s.backends.iter().all(|b| {
            b.state == "down"
                && b.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("authentication failed"))
        })
    })
    .await;

    for n in cluster.nodes() {
        conf_append(n, "log_connections = on");
        hba_prepend(n, &format!("host all {CHECK_USER} 127.0.0.1/32 md5"));
    }
    let s = wait_roles(&lb, &cluster, "pg-0 primary and pg-1 replica, up over md5").await;
    assert!(
        s.backends.iter().all(|b| b.last_error.is_none()),
        "{}",
        s.raw
    );
    for n in cluster.nodes() {
        wait_until(
            T,
            &format!("{} to log an md5 login of the check user", n.name()),
            || {
                std::fs::read_to_string(n.log_path()).is_ok_and(|log| {
                    log.lines()
                        .any(|l| l.contains(&format!("identity=\"{CHECK_USER}\" method=md5")))
                })
            },
        )
        .await;
    }
    assert_eq!(landing_port(lb.write).await, cluster.node(0).port());
    assert_eq!(landing_port(lb.read).await, cluster.node(1).port());
}

/// No check password configured: refused while pg_hba asks for SCRAM ("no password" reason),
/// up with the right roles once a `trust` line for the check user is in front.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn check_logs_in_with_trust_and_no_password() {
    let cluster = PgCluster::start(1);
    let lb = Pglb::builder(&cluster)
        .unset("check", "password_env")
        .start();
    let s = lb
        .wait_stats(T, "both backends down: a password is required", |s| {
            s.backends.iter().all(|b| {
                b.state == "down"
                    && b.last_error
                        .as_deref()
                        .is_some_and(|e| e.contains("asks for a password and none is configured"))
            })
        })
        .await;
    assert!(s.primary.is_none(), "{}", s.raw);

    for n in cluster.nodes() {
        hba_prepend(n, &format!("host all {CHECK_USER} 127.0.0.1/32 trust"));
    }
    wait_roles(
        &lb,
        &cluster,
        "pg-0 primary and pg-1 replica, up over trust",
    )
    .await;
    lb.wait_ready().await;
    assert_eq!(landing_port(lb.write).await, cluster.node(0).port());
    assert_eq!(landing_port(lb.read).await, cluster.node(1).port());
}

// ---------------------------------------------------------------------------------------------
// 2. Command line
// ---------------------------------------------------------------------------------------------

const CHECK_SECRET: &str = "s3cret-in-env-only-42";

/// A file that sets only what it must: every other value printed comes from pglb's defaults.
#[test]
fn check_prints_resolved_settings_with_defaults_and_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("min.toml");
    std::fs::write(
        &path,
        r#"[listen]
write = "127.0.0.1:15435"
read = "127.0.0.1:15436"
stats = "127.0.0.1:18404"

[check]
user = "pglb_check"
password_env = "PGLB_CHECK_PASSWORD"

[[backend]]
name = "alpha"
address = "db-a.example:5432"

[[backend]]
name = "beta"
address = "10.1.2.3:6543"
weight = 3
"#,
    )
    .unwrap();
    let (status, stdout, stderr) = output_of(
        pglb_command(dir.path(), &["check", "--config"])
            .arg(&path)
            .env("PGLB_CHECK_PASSWORD", CHECK_SECRET),
    );
    assert!(
        status.success(),
        "pglb check rejected a good file ({status}):\n{stdout}\n{stderr}"
    );
    let all = format!("{stdout}\n{stderr}");
    assert!(
        !all.contains(CHECK_SECRET),
        "pglb check printed the password:\n{all}"
    );
    for want in [
        // From the file.
        "write = \"127.0.0.1:15435\"",
        "name = \"alpha\"",
        "address = \"db-a.example:5432\"",
        "name = \"beta\"",
        "address = \"10.1.2.3:6543\"",
        "weight = 3",
        "env:PGLB_CHECK_PASSWORD",
        // Defaults, absent from the file.
        "interval = \"1s\"",
        "timeout = \"2s\"",
        "rise = 2",
        "fall = 2",
        "database = \"postgres\"",
        "balance = \"leastconn\"",
        "max_lag = 16777216",
        "max_lag_time = \"10s\"",
        "fallback_to_primary = true",
        "shutdown_timeout = \"30s\"",
        "close_on_writer_change = true",
        "weight = 1",
    ] {
        assert!(
            stdout.contains(want),
            "pglb check output lacks {want:?}:\n{stdout}"
        );
    }
}

#[test]
fn help_mentions_check_and_config() {
    let dir = tempfile::tempdir().unwrap();
    let (status, stdout, stderr) = output_of(&mut pglb_command(dir.path(), &["--help"]));
    assert!(status.success(), "pglb --help exited {status}: {stderr}");
    assert!(
        stdout.contains("check"),
        "--help does not mention `check`:\n{stdout}"
    );
    assert!(
        stdout.contains("--config"),
        "--help does not mention `--config`:\n{stdout}"
    );
    assert!(
        stdout.contains("lb.toml"),
        "--help does not show the default config path:\n{stdout}"
    );
}

/// `pglb` with no `--config`, started in a directory holding `lb.toml`, runs that file: its
/// stats listener answers with its backends; `pglb check` there validates the same file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_config_flag_runs_lb_toml_in_the_current_directory() {
    let dir = tempfile::tempdir().unwrap();
    let backends = vec![
        BackendSpec {
            name: "from-cwd-a".into(),
            address: free_addr().to_string(),
            weight: None,
        },
        BackendSpec {
            name: "from-cwd-b".into(),
            address: free_addr().to_string(),
            weight: Some(2),
        },
    ];
    let builder = PglbBuilder::new(backends);

    let (status, stdout, stderr) = output_of(&mut pglb_command(dir.path(), &["check"]));
    assert!(
        !status.success(),
        "pglb check without lb.toml succeeded: {stdout}"
    );
    assert!(
        stderr.contains("lb.toml"),
        "the error should name lb.toml:\n{stderr}"
    );

    let mut last = String::new();
    for _attempt in 0..3 {
        let (write, read, stats) = (free_addr(), free_addr(), free_addr());
        std::fs::write(
            dir.path().join("lb.toml"),
            builder.render(write, read, stats),
        )
        .unwrap();

        let (status, stdout, stderr) = output_of(&mut pglb_command(dir.path(), &["check"]));
        assert!(
            status.success(),
            "pglb check in the directory: {stdout}\n{stderr}"
        );
        assert!(stdout.contains("from-cwd-b"), "{stdout}");

        let log = std::fs::File::create(dir.path().join("pglb.log")).unwrap();
        let child = pglb_command(dir.path(), &[])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn pglb");
        let mut lb = RawPglb(Some(child));
        let pid = lb.0.as_ref().unwrap().id();
        let deadline = Instant::now() + T;
        let answered = loop {
            if let Ok((200, body)) = http_get(stats, "/stats.json") {
                break Some(body);
            }
            if lb.0.as_mut().unwrap().try_wait().ok().flatten().is_some()
                || Instant::now() > deadline
            {
                break None;
            }
            tokio::time::sleep(POLL).await;
        };
        let Some(body) = answered else {
            last = std::fs::read_to_string(dir.path().join("pglb.log")).unwrap_or_default();
            if last.contains("in use") {
                continue;
            }
            panic!("pglb without --config did not serve stats on {stats}:\n{last}");
        };
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
        let names: Vec<&str> = doc["backends"]
            .as_array()
            .expect("backends array")
            .iter()
            .filter_map(|b| b["name"].as_str())
            .collect();
        assert_eq!(names, ["from-cwd-a", "from-cwd-b"], "{body}");
        assert!(
            doc["config_file"]
                .as_str()
                .is_some_and(|f| f.ends_with("lb.toml")),
            "{body}"
        );
        assert!(
            TcpStream::connect(write).await.is_ok(),
            "write port {write} not listening"
        );
        assert!(
            TcpStream::connect(read).await.is_ok(),
            "read port {read} not listening"
        );

        // SAFETY: kill(2) on the pid of the child spawned above.
        assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) }, 0);
        let status = lb
            .wait_exit(Duration::from_secs(10))
            .expect("pglb did not exit within 10 s of SIGTERM");
        assert!(status.success(), "pglb exited with {status}");
        return;
    }
    panic!("pglb without --config: ports kept being taken:\n{last}");
}

// ---------------------------------------------------------------------------------------------
// 3. Encryption requests when no backend is available
// ---------------------------------------------------------------------------------------------

/// No primary (its only backend is a closed port): an SSLRequest on the write port is declined
/// with `N`, and the StartupMessage that follows gets a FATAL ErrorResponse from pglb. The read
/// port (no fallback) does the same after libpq's GSSENCRequest-then-SSLRequest sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encryption_request_without_backend_gets_n_then_pglb_fatal() {
    let lb = PglbBuilder::new(vec![BackendSpec {
        name: "pg-gone".into(),
        address: free_addr().to_string(),
        weight: None,
    }])
    .set("read", "fallback_to_primary", false)
    // The refusal itself is under test, not the wait for a backend (tests/busy.rs).
    .set("proxy", "wait_for_backend", "0s")
    .start();
    lb.wait_stats(T, "pg-gone down and no primary", |s| {
        s.primary.is_none() && s.try_backend("pg-gone").is_some_and(|b| b.state == "down")
    })
    .await;

    let cases: [(SocketAddr, &[u32], &str); 2] = [
        (lb.write, &[SSL_REQUEST], "primary"),
        (lb.read, &[GSSENC_REQUEST, SSL_REQUEST], "replica"),
    ];
    for (addr, requests, names) in cases {
        let mut s = TcpStream::connect(addr).await.unwrap();
        for &code in requests {
            s.write_all(&request_packet(code)).await.unwrap();
            assert_eq!(
                read_byte(&mut s).await,
                b'N',
                "request {code} on {addr} was not declined with N"
            );
        }
        s.write_all(&startup_message(APP_USER, DATABASE))
            .await
            .unwrap();
        let fields = read_error_then_eof(&mut s).await;
        assert_eq!(
            fields.get(&'S').map(String::as_str),
            Some("FATAL"),
            "{fields:?}"
        );
        if let Some(v) = fields.get(&'V') {
            assert_eq!(v, "FATAL", "{fields:?}");
        }
        let msg = fields.get(&'M').cloned().unwrap_or_default();
        assert!(
            msg.starts_with("pglb: "),
            "message does not name pglb: {fields:?}"
        );
        assert!(
            msg.contains(names),
            "message should say no {names}: {msg:?}"
        );
        assert_eq!(
            fields.get(&'C').map(String::as_str),
            Some("57P03"),
            "{fields:?}"
        );
    }
    assert_ne!(
        lb.health_status(),
        Ok(200),
        "/health is 200 without a primary"
    );
}

// ---------------------------------------------------------------------------------------------
// 4, 5. Lag by time, and read sessions on a lagging replica
// ---------------------------------------------------------------------------------------------

/// Inserts a row on the primary every 150 ms until stopped; counts the writes.
fn start_writer(
    cluster: &PgCluster,
) -> (Arc<AtomicBool>, Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let addr = cluster.primary().addr();
    let handle = tokio::spawn({
        let (stop, done) = (stop.clone(), done.clone());
        async move {
            let c = connect_ok(addr).await;
            c.batch_execute("CREATE TABLE IF NOT EXISTS ticks (at timestamptz DEFAULT now())")
                .await
                .expect("create ticks");
            while !stop.load(Ordering::SeqCst) {
                c.batch_execute("INSERT INTO ticks DEFAULT VALUES")
                    .await
                    .expect("write on the primary");
                done.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        }
    });
    (stop, done, handle)
}

fn lag_seconds(lb: &Pglb, name: &str) -> Option<f64> {
    lb.stats().ok()?.try_backend(name)?.lag_seconds
}

/// `max_lag` out of reach, `max_lag_time = 1s`: a replica whose replay is paused while the
/// primary keeps writing leaves the read pool on time alone, gets no new sessions even though it
/// has the fewest, and comes back once resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replica_behind_max_lag_time_leaves_the_read_pool_and_comes_back() {
    let cluster = PgCluster::start(2);
    let lb = Pglb::builder(&cluster)
        .set("read", "max_lag", "1GB")
        .set("read", "max_lag_time", "1s")
        .start();
    lb.wait_ready().await;
    lb.wait_stats(T, "both replicas read-eligible", |s| {
        s.try_backend("pg-1").is_some_and(|b| b.read_eligible)
            && s.try_backend("pg-2").is_some_and(|b| b.read_eligible)
    })
    .await;
    let (p1, p2) = (cluster.node(1).port(), cluster.node(2).port());
    let (stop, writes, writer) = start_writer(&cluster);
    wait_until(T, "the writer to start", || {
        writes.load(Ordering::SeqCst) > 2
    })
    .await;

    cluster.node(1).pause_replay();
    let paused_at = Instant::now();
    let s = lb
        .wait_stats(T, "pg-1 out of the read pool on lag time, pg-2 in", |s| {
            s.try_backend("pg-1").is_some_and(|b| !b.read_eligible)
                && s.try_backend("pg-2").is_some_and(|b| b.read_eligible)
        })
        .await;
    let left_after = paused_at.elapsed();
    let b1 = s.backend("pg-1");
    assert_eq!(
        (b1.state.as_str(), b1.role.as_str()),
        ("up", "replica"),
        "{}",
        s.raw
    );
    assert!(
        b1.lag_bytes.is_some_and(|l| l < 64 * 1024 * 1024),
        "pg-1's byte lag should be far under max_lag (1GB): {}",
        s.raw
    );
    assert!(
        left_after >= Duration::from_millis(500),
        "pg-1 left after {left_after:?}, before max_lag_time (1s) could have passed"
    );
    assert!(
        lag_seconds(&lb, "pg-1").is_some_and(|t| t > 1.0),
        "pg-1's lag_seconds should be over 1s: {:?}",
        lb.stats().map(|s| s.raw)
    );
    lb.wait_log(T, "replica over lag limits").await;

    // New read sessions avoid pg-1, though leastconn would prefer it (it holds none of them).
    let mut held = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..6 {
        let c = connect_ok(lb.read).await;
        ports.push(backend_port(&c).await);
        held.push(c);
    }
    assert_eq!(
        count_ports(&ports, p1),
        0,
        "read sessions landed on pg-1 while it lagged: {}",
        describe_ports(&cluster, &ports)
    );
    assert!(
        count_ports(&ports, p2) >= 1,
        "no read session on pg-2: {}",
        describe_ports(&cluster, &ports)
    );

    cluster.node(1).resume_replay();
    lb.wait_stats(T, "pg-1 back in the read pool", |s| {
        s.try_backend("pg-1").is_some_and(|b| b.read_eligible)
    })
    .await;
    // The others hold every open session, so leastconn picks pg-1 now.
    let deadline = Instant::now() + T;
    loop {
        let c = connect_ok(lb.read).await;
        if backend_port(&c).await == p1 {
            break;
        }
        held.push(c);
        assert!(
            Instant::now() < deadline,
            "no new read session landed on pg-1 within {T:?} after it came back"
        );
        tokio::time::sleep(POLL).await;
    }

    stop.store(true, Ordering::SeqCst);
    writer.await.unwrap();
}

/// A read session open on a replica that goes over `max_lag` stays open and keeps answering
/// (from that replica) after the replica has left the read pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_session_stays_on_a_replica_that_goes_over_lag() {
    let cluster = PgCluster::start(1);
    cluster.primary().exec(&format!(
        "CREATE TABLE lagfill (id int, pad text); GRANT SELECT ON lagfill TO {APP_USER}"
    ));
    let lb = Pglb::builder(&cluster)
        .set("read", "max_lag", "1MB")
        .set("read", "max_lag_time", "1h")
        .start();
    lb.wait_ready().await;
    lb.wait_stats(T, "pg-1 read-eligible", |s| {
        s.try_backend("pg-1").is_some_and(|b| b.read_eligible)
    })
    .await;
    let (p0, p1) = (cluster.node(0).port(), cluster.node(1).port());

    let open = connect_ok(lb.read).await;
    assert_eq!(backend_port(&open).await, p1);

    cluster.node(1).pause_replay();
    cluster.primary().exec(
        "INSERT INTO lagfill SELECT g, repeat(md5(g::text), 32) FROM generate_series(1, 4000) g",
    );
    let s = lb
        .wait_stats(T, "pg-1 out of the read pool for lag", |s| {
            s.try_backend("pg-1")
                .is_some_and(|b| !b.read_eligible && b.lag_bytes.is_some_and(|l| l > 1 << 20))
        })
        .await;
    assert_eq!(s.backend("pg-1").state, "up", "{}", s.raw);
    assert_eq!(s.backend("pg-1").sessions_active, 1, "{}", s.raw);
    // Routing has changed: a new read session goes to the primary (fallback).
    assert_eq!(landing_port(lb.read).await, p0);

    // The open session keeps working, on pg-1, across many checks.
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        assert!(
            !open.is_closed(),
            "pglb closed the read session on the lagging replica"
        );
        assert_eq!(
            scalar(&open, "SHOW port")
                .await
                .expect("query on the read session after its replica left the pool"),
            Some(p1.to_string())
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // It still sees the replica's (paused) snapshot: the table exists, the rows do not yet.
    assert_eq!(scalar_ok(&open, "SELECT count(*) FROM lagfill").await, "0");
    lb.wait_stats(T, "pg-1 still counting the open session", |s| {
        s.try_backend("pg-1")
            .is_some_and(|b| b.sessions_active == 1 && !b.read_eligible)
    })
    .await;
    cluster.node(1).resume_replay();
}

// ---------------------------------------------------------------------------------------------
// 6. close_on_writer_change = false
// ---------------------------------------------------------------------------------------------

/// Two pglbs in front of the same cluster, one with the default and one with
/// `close_on_writer_change = false`, each with a write session on pg-0. pg-1 is promoted while
/// pg-0 keeps running: both see pg-1 as the primary and pg-0 fenced; the default one closes its
/// session, the other keeps it open and working, on pg-0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_session_survives_promotion_with_close_on_writer_change_off() {
    let cluster = PgCluster::start(1);
    let keep = Pglb::builder(&cluster)
        .set("proxy", "close_on_writer_change", false)
        .start();
    let close = Pglb::start(&cluster).await;
    keep.wait_ready().await;
    let (old, new) = (cluster.node(0), cluster.node(1));
    for lb in [&keep, &close] {
        wait_roles(lb, &cluster, "pg-0 primary, pg-1 replica").await;
    }
    let kept = connect_ok(keep.write).await;
    let closed = connect_ok(close.write).await;
    assert_eq!(backend_port(&kept).await, old.port());
    assert_eq!(backend_port(&closed).await, old.port());

    new.promote();
    assert!(old.is_running() && !old.in_recovery());
    for lb in [&keep, &close] {
        lb.wait_stats(T, "pg-1 primary and pg-0 fenced", |s| {
            s.primary.as_deref() == Some("pg-1")
                && s.try_backend("pg-0").is_some_and(|b| b.role == "fenced")
        })
        .await;
    }
    // The reference: with the default, pglb cuts the session on pg-0.
    wait_until_async(
        Duration::from_secs(5),
        "the default pglb to close its session",
        || async { closed.is_closed() || scalar(&closed, "SELECT 1").await.is_err() },
    )
    .await;

    // With the option off, the session on pg-0 is still open and still on pg-0, for a while.
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        assert!(
            !kept.is_closed(),
            "pglb closed the write session despite close_on_writer_change = false"
        );
        assert_eq!(
            scalar(&kept, "SHOW port")
                .await
                .expect("query on the kept write session"),
            Some(old.port().to_string())
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(scalar_ok(&kept, "SELECT pg_is_in_recovery()").await, "f");
    keep.wait_stats(T, "pg-0 still counting the kept session", |s| {
        s.try_backend("pg-0")
            .is_some_and(|b| b.sessions_active == 1)
    })
    .await;
    // New write sessions still go to the promoted server.
    assert_eq!(landing_port(keep.write).await, new.port());
}

// ---------------------------------------------------------------------------------------------
// 7. Signals and shutdown_timeout
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_exits_zero() {
    let mut lb = PglbBuilder::new(vec![BackendSpec {
        name: "pg-0".into(),
        address: free_addr().to_string(),
        weight: None,
    }])
    .set("proxy", "shutdown_timeout", "60s")
    .start();
    lb.signal(libc::SIGINT);
    let status = lb
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("pglb did not exit within 5 s of SIGINT");
    assert!(status.success(), "pglb exited with {status} after SIGINT");
    assert!(
        lb.log_contains("SIGINT"),
        "no SIGINT in the log:\n{}",
        lb.log_text()
    );
}

/// An idle session holds shutdown for `shutdown_timeout` (1 s), then pglb cuts it and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_cuts_an_idle_session_after_shutdown_timeout_and_exits_zero() {
    let cluster = PgCluster::start(0);
    let mut lb = Pglb::builder(&cluster)
        .set("proxy", "shutdown_timeout", "1s")
        .start();
    lb.wait_ready().await;
    let idle = connect_ok(lb.write).await;
    assert_eq!(backend_port(&idle).await, cluster.primary().port());

    let signalled = Instant::now();
    lb.signal(libc::SIGTERM);
    let status = lb
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("pglb did not exit within 10 s of SIGTERM with a 1 s shutdown_timeout");
    let took = signalled.elapsed();
    assert!(status.success(), "pglb exited with {status}");
    assert!(
        took >= Duration::from_millis(900),
        "pglb exited after {took:?}, without waiting shutdown_timeout (1 s) for the open session"
    );
    assert!(
        took <= Duration::from_secs(5),
        "pglb took {took:?} to exit with a 1 s shutdown_timeout"
    );
    assert!(
        lb.log_contains("shutdown timeout reached"),
        "log does not say the timeout cut sessions:\n{}",
        lb.log_text()
    );
    wait_until_async(T, "the idle session to be closed", || async {
        idle.is_closed() || scalar(&idle, "SELECT 1").await.is_err()
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 8. JSON logs
// ---------------------------------------------------------------------------------------------

/// With `--log-format json`, through start, state changes, a session, a refusal and shutdown,
/// every line pglb writes is one JSON object, and the backend up/down lines carry their fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn json_log_format_writes_only_json_objects() {
    let cluster = PgCluster::start(0);
    let mut backends = cluster.backends();
    backends.push(BackendSpec {
        name: "pg-gone".into(),
        address: free_addr().to_string(),
        weight: None,
    });
    let mut lb = PglbBuilder::new(backends)
        .arg("--log-format")
        .arg("json")
        .set("read", "fallback_to_primary", false)
        .start();
    lb.wait_ready().await;
    lb.wait_backend_state("pg-gone", "down", T).await;
    lb.wait_log(T, "\"backend down\"").await;
    let c = connect_ok(lb.write).await;
    assert_eq!(scalar_ok(&c, "SELECT 1").await, "1");
    drop(c);
    expect_pglb_fatal(lb.read).await;
    lb.wait_log(T, "no backend for this port").await;
    let status = lb.terminate(Duration::from_secs(10)).expect("pglb exited");
    assert!(status.success(), "pglb exited with {status}");

    let text = lb.log_text();
    let mut events = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line {} is not JSON ({e}): {line:?}", i + 1));
        assert!(v.is_object(), "log line {} is not an object: {line}", i + 1);
        assert!(
            v.get("level").is_some(),
            "log line {} has no level: {line}",
            i + 1
        );
        events.push(v);
    }
    assert!(events.len() >= 4, "too few log lines:\n{text}");
    let find = |message: &str, backend: &str| {
        events
            .iter()
            .find(|e| e["message"] == message && e["backend"] == backend)
            .cloned()
    };
    let up =
        find("backend up", "pg-0").unwrap_or_else(|| panic!("no `backend up` for pg-0:\n{text}"));
    assert_eq!(up["level"], "INFO", "{up}");
    let down = find("backend down", "pg-gone")
        .unwrap_or_else(|| panic!("no `backend down` for pg-gone:\n{text}"));
    assert_eq!(down["level"], "WARN", "{down}");
    assert!(
        down["reason"]
            .as_str()
            .is_some_and(|r| r.contains("refused")),
        "backend down line without its reason: {down}"
    );
    assert!(
        events.iter().any(|e| e["message"] == "pglb stopped"),
        "no `pglb stopped` line:\n{text}"
    );
}
