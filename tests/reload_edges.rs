//! Hot reload edge cases and the operator surfaces around them: a Kubernetes ConfigMap symlink
//! swap, a rebound read listener, draining a removed backend (until its sessions end, and until
//! `drain_timeout`), a broken file as seen in the log, `/stats.json` and `/metrics`, metrics after
//! real traffic, and an admin token read from a file.

mod common;

use std::collections::HashMap;
use std::fs;
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

fn metrics_text(stats: SocketAddr) -> String {
    let (code, body) = http_get(stats, "/metrics").expect("GET /metrics");
    assert_eq!(code, 200, "/metrics: {body}");
    body
}

/// Value of the sample `name` whose labels include every pair of `labels` (in any order).
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        if line.starts_with('#') {
            return None;
        }
        let (series, value) = line.rsplit_once(' ')?;
        let (n, have) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.strip_suffix('}')?),
            None => (series, ""),
        };
        if n != name {
            return None;
        }
        let have: HashMap<&str, &str> = have
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k, v.trim_matches('"')))
            .collect();
        labels
            .iter()
            .all(|(k, v)| have.get(k) == Some(v))
            .then(|| value.parse().ok())
            .flatten()
    })
}

fn reload_json(s: &Stats) -> serde_json::Value {
    serde_json::from_str::<serde_json::Value>(&s.raw).unwrap()["reload"].clone()
}

fn applied(s: &Stats) -> u64 {
    reload_json(s)["applied"].as_u64().unwrap_or(0)
}

/// Replaces `path` atomically (write a sibling, rename over), as editors do.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("next");
    fs::write(&tmp, text).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// Opens read sessions until one lands on `port`; returns it (the others are closed).
async fn read_session_on(read: SocketAddr, port: u16) -> tokio_postgres::Client {
    for _ in 0..30 {
        let c = connect_ok(read).await;
        if backend_port(&c).await == port {
            return c;
        }
    }
    panic!("no read session through {read} landed on backend port {port} in 30 tries");
}

// ---------------------------------------------------------------------------------------------
// 1. Kubernetes ConfigMap symlink swap
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn configmap_symlink_swap_is_applied() {
    use std::os::unix::fs::symlink;

    let cluster = PgCluster::start(1);
    let dir = tempfile::tempdir().unwrap();
    let volume = dir.path().join("config");
    fs::create_dir(&volume).unwrap();
    let (write, read, stats) = (free_addr(), free_addr(), free_addr());
    let render = |weight: u32, with_replica: bool| {
        let mut backends = cluster.backends();
        backends[1].weight = Some(weight);
        if !with_replica {
            backends.truncate(1);
        }
        Pglb::builder(&cluster)
            .backends(backends)
            .render(write, read, stats)
    };

    // The layout kubelet writes: ..<timestamp>/lb.toml, ..data -> ..<timestamp>,
    // lb.toml -> ..data/lb.toml.
    fs::create_dir(volume.join("..2026_a")).unwrap();
    fs::write(volume.join("..2026_a/lb.toml"), render(1, true)).unwrap();
    symlink("..2026_a", volume.join("..data")).unwrap();
    symlink("..data/lb.toml", volume.join("lb.toml")).unwrap();
    let link = volume.join("lb.toml");

    let lb = SpawnedPglb::spawn(&link, stats, dir.path().join("pglb.log"));
    lb.wait_stats(Duration::from_secs(30), "pg-1 up with weight 1", |s| {
        s.try_backend("pg-1").is_some_and(|b| b.state == "up")
    })
    .await;
    let s0 = lb.stats().unwrap();
    let v0: serde_json::Value = serde_json::from_str(&s0.raw).unwrap();
    assert_eq!(v0["backends"][1]["weight"], 1, "{}", s0.raw);
    assert_eq!(v0["config_file"], link.display().to_string());
    let gen0 = s0.generation;

    // kubelet's atomic update: a new timestamped dir, a `..data_tmp` symlink to it, renamed over
    // `..data`; then the old dir is removed.
    let swap = |ts: &str, text: String| {
        fs::create_dir(volume.join(ts)).unwrap();
        fs::write(volume.join(ts).join("lb.toml"), text).unwrap();
        symlink(ts, volume.join("..data_tmp")).unwrap();
        let old = fs::read_link(volume.join("..data")).unwrap();
        fs::rename(volume.join("..data_tmp"), volume.join("..data")).unwrap();
        fs::remove_dir_all(volume.join(old)).unwrap();
    };

    swap("..2026_b", render(7, true));
    let s1 = lb
        .wait_stats(Duration::from_secs(10), "weight 7 applied", |s| {
            let v: serde_json::Value = serde_json::from_str(&s.raw).unwrap();
            v["backends"][1]["weight"] == 7
        })
        .await;
    assert_eq!(Some(s1.generation), Some(gen0 + 1), "{}", s1.raw);
    assert_eq!(applied(&s1), 1, "{}", s1.raw);

    // A second swap (the first one's target dir is gone now) removes the replica.
    swap("..2026_c", render(7, false));
    let s2 = lb
        .wait_stats(Duration::from_secs(10), "pg-1 removed", |s| {
            s.try_backend("pg-1").is_none()
        })
        .await;
    assert_eq!(Some(s2.generation), Some(gen0 + 2), "{}", s2.raw);
    assert_eq!(applied(&s2), 2);
    assert!(lb.log_text().contains("config reloaded"));
}

// ---------------------------------------------------------------------------------------------
// 2. A changed listen.read rebinds only the read listener
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changed_read_address_rebinds_without_touching_open_sessions_or_the_write_port() {
    let cluster = PgCluster::start(1);
    let lb = Pglb::builder(&cluster).start();
    lb.wait_ready().await;
    lb.wait_stats(Duration::from_secs(20), "pg-1 takes reads", |s| {
        s.backend("pg-1").read_eligible
    })
    .await;
    let (p0, p1) = (cluster.node(0).port(), cluster.node(1).port());

    let w = connect_ok(lb.write).await;
    let r = connect_ok(lb.read).await;
    assert_eq!(backend_port(&w).await, p0);
    assert_eq!(backend_port(&r).await, p1);

    let old_read = lb.read;
    let new_read = free_addr();
    replace(
        lb.config_path(),
        &Pglb::builder(&cluster).render(lb.write, new_read, lb.stats),
    );
    lb.wait_stats(Duration::from_secs(10), "read listener moved", |s| {
        let v: serde_json::Value = serde_json::from_str(&s.raw).unwrap();
        v["listen"]["read"] == new_read.to_string() && applied(s) == 1
    })
    .await;

    // Both open sessions go on.
    assert!(!in_recovery(&w).await, "write session still on the primary");
    scalar(&w, "CREATE TEMP TABLE t AS SELECT 1 AS x")
        .await
        .expect("write session after the rebind");
    assert_eq!(backend_port(&r).await, p1);
    assert_eq!(scalar_ok(&r, "SELECT 40 + 2").await, "42");

    // New sessions: on the new read address, and on the untouched write address.
    assert_eq!(landing_port(new_read).await, p1);
    assert_eq!(landing_port(lb.write).await, p0);

    // The old read address refuses connections.
    wait_until(Duration::from_secs(5), "old read address refusing", || {
        matches!(
            TcpStream::connect_timeout(&old_read, Duration::from_secs(1)),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused
        )
    })
    .await;

    let log = lb.log_text();
    let rebound: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("listener rebound"))
        .collect();
    assert_eq!(rebound.len(), 1, "exactly one rebind: {rebound:?}");
    assert!(
        rebound[0].contains("read") && rebound[0].contains(&new_read.to_string()),
        "{}",
        rebound[0]
    );
    // The write listener was started once and never again.
    let write_starts = log
        .lines()
        .filter(|l| l.contains("listening") && l.contains(&lb.write.to_string()))
        .count();
    assert_eq!(write_starts, 1, "write listener restarted:\n{log}");

    // Still the same sessions after all that.
    assert_eq!(scalar_ok(&w, "SELECT x FROM t").await, "1");
    assert_eq!(backend_port(&r).await, p1);
}

// ---------------------------------------------------------------------------------------------
// 3. Draining a removed backend
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removed_backend_drains_until_its_last_session_ends() {
    let cluster = PgCluster::start(2);
    let lb = Pglb::builder(&cluster).start();
    lb.wait_ready().await;
    lb.wait_stats(Duration::from_secs(20), "both replicas take reads", |s| {
        s.backend("pg-1").read_eligible && s.backend("pg-2").read_eligible
    })
    .await;
    let (p1, p2) = (cluster.node(1).port(), cluster.node(2).port());
    let held = read_session_on(lb.read, p1).await;
    lb.wait_stats(Duration::from_secs(5), "one session on pg-1", |s| {
        s.backend("pg-1").sessions_active == 1
    })
    .await;

    let mut without = cluster.backends();
    without.remove(1);
    replace(
        lb.config_path(),
        &Pglb::builder(&cluster)
            .backends(without)
            .render(lb.write, lb.read, lb.stats),
    );
    let s = lb
        .wait_stats(Duration::from_secs(10), "pg-1 draining", |s| {
            applied(s) == 1 && s.try_backend("pg-1").is_some_and(|b| b.state == "draining")
        })
        .await;
    assert_eq!(s.backend("pg-1").sessions_active, 1, "{}", s.raw);
    let v: serde_json::Value = serde_json::from_str(&s.raw).unwrap();
    assert_eq!(v["readers"], serde_json::json!(["pg-2"]), "{}", s.raw);

    // The held session keeps working on pg-1; new read sessions never land there.
    assert_eq!(scalar_ok(&held, "SELECT 'still here'").await, "still here");
    assert_eq!(backend_port(&held).await, p1);
    for i in 0..8 {
        assert_eq!(
            landing_port(lb.read).await,
            p2,
            "new read session {i} landed on the removed backend"
        );
    }
    // Checks of the others keep running (the routing table is recomputed), and pg-1 stays.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(lb.stats().unwrap().backend("pg-1").state, "draining");
    assert_eq!(scalar_ok(&held, "SELECT 1").await, "1");

    // When the session ends, pg-1 leaves the stats.
    drop(held);
    lb.wait_stats(Duration::from_secs(10), "pg-1 gone", |s| {
        s.try_backend("pg-1").is_none()
    })
    .await;
    let m = metrics_text(lb.stats);
    assert_eq!(
        metric(
            &m,
            "pglb_sessions_cut_total",
            &[("port", "read"), ("reason", "backend_cut")]
        )
        .unwrap_or(0.0),
        0.0,
        "the held session was cut instead of drained"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removed_backend_session_is_closed_after_drain_timeout() {
    const DRAIN: Duration = Duration::from_secs(3);
    let cluster = PgCluster::start(2);
    let builder = || Pglb::builder(&cluster).set("proxy", "drain_timeout", "3s");
    let lb = builder().start();
    lb.wait_ready().await;
    lb.wait_stats(Duration::from_secs(20), "both replicas take reads", |s| {
        s.backend("pg-1").read_eligible && s.backend("pg-2").read_eligible
    })
    .await;
    let p1 = cluster.node(1).port();
    let held = read_session_on(lb.read, p1).await;

    let mut without = cluster.backends();
    without.remove(1);
    let written = Instant::now();
    replace(
        lb.config_path(),
        &builder()
            .backends(without)
            .render(lb.write, lb.read, lb.stats),
    );
    lb.wait_stats(Duration::from_secs(10), "pg-1 draining", |s| {
        applied(s) == 1 && s.try_backend("pg-1").is_some_and(|b| b.state == "draining")
    })
    .await;
    // Within the drain period the session still answers (reload takes ~0.3 s of debounce).
    if written.elapsed() < DRAIN - Duration::from_millis(500) {
        assert_eq!(scalar_ok(&held, "SELECT 1").await, "1");
    }

    wait_until_async(
        Duration::from_secs(15),
        "held session closed by drain_timeout",
        || async { scalar(&held, "SELECT 1").await.is_err() },
    )
    .await;
    let closed_after = written.elapsed();
    assert!(
        closed_after >= DRAIN,
        "session closed {closed_after:?} after the rewrite, before drain_timeout {DRAIN:?}"
    );
    lb.wait_stats(Duration::from_secs(10), "pg-1 gone", |s| {
        s.try_backend("pg-1").is_none()
    })
    .await;
    let m = metrics_text(lb.stats);
    assert_eq!(
        metric(
            &m,
            "pglb_sessions_cut_total",
            &[("port", "read"), ("reason", "backend_cut")]
        ),
        Some(1.0),
        "{m}"
    );
    // Reads go on through pg-2.
    assert_eq!(landing_port(lb.read).await, cluster.node(2).port());
}

// ---------------------------------------------------------------------------------------------
// 4. A broken file: log, stats.json, metrics; then a good one
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broken_file_is_reported_with_file_and_line_until_a_good_one() {
    let cluster = PgCluster::start(0);
    let lb = Pglb::start(&cluster).await;
    let path = lb.config_path().to_path_buf();
    let gen0 = lb.stats().unwrap().generation;

    let good = Pglb::builder(&cluster).render(lb.write, lb.read, lb.stats);
    let mut lines: Vec<String> = good.lines().map(str::to_string).collect();
    let idx = lines
        .iter()
        .position(|l| l.trim() == "interval = \"200ms\"")
        .unwrap_or_else(|| panic!("no check interval line in:\n{good}"));
    lines[idx] = "interval = \"soon\"".into();
    let line = idx + 1;
    replace(&path, &(lines.join("\n") + "\n"));

    let s = lb
        .wait_stats(Duration::from_secs(10), "reload rejected", |s| {
            reload_json(s)["result"] == "rejected"
        })
        .await;
    let reload = reload_json(&s);
    let err = reload["error"].as_str().expect("reload.error is set");
    let at = format!("{}:{line}:", path.display());
    assert!(err.contains(&at), "error lacks {at:?}: {err}");
    assert!(err.contains("check.interval"), "{err}");
    assert_eq!(reload["rejected"], 1);
    assert_eq!(Some(s.generation), Some(gen0), "a bad file changed nothing");

    lb.wait_log(Duration::from_secs(5), "config reload refused")
        .await;
    let log = lb.log_text();
    let logged = log
        .lines()
        .find(|l| l.contains("config reload refused"))
        .unwrap();
    assert!(logged.contains(&at), "log line lacks {at:?}: {logged}");
    assert!(logged.contains("check.interval"), "{logged}");

    let (code, page) = http_request(lb.stats, "GET", "/", None);
    assert_eq!(code, 200);
    assert!(page.contains("rejected") && page.contains("check.interval"));

    let m = metrics_text(lb.stats);
    assert_eq!(
        metric(&m, "pglb_config_last_reload_successful", &[]),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "pglb_config_reloads_total", &[("result", "rejected")]),
        Some(1.0),
        "{m}"
    );
    // The running config still serves.
    assert!(!in_recovery(&connect_ok(lb.write).await).await);

    // A good file (with a real change) clears it.
    replace(
        &path,
        &Pglb::builder(&cluster)
            .set("read", "max_lag", "32MB")
            .render(lb.write, lb.read, lb.stats),
    );
    let s = lb
        .wait_stats(Duration::from_secs(10), "reload applied", |s| {
            reload_json(s)["result"] == "applied"
        })
        .await;
    assert!(reload_json(&s)["error"].is_null(), "{}", s.raw);
    assert_eq!(Some(s.generation), Some(gen0 + 1));
    let m = metrics_text(lb.stats);
    assert_eq!(
        metric(&m, "pglb_config_last_reload_successful", &[]),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "pglb_config_reloads_total", &[("result", "applied")]),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "pglb_config_reloads_total", &[("result", "rejected")]),
        Some(1.0)
    );
}

// ---------------------------------------------------------------------------------------------
// 5. /metrics after traffic
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_show_bytes_open_sessions_and_replica_lag() {
    let cluster = PgCluster::start(1);
    let lb = Pglb::start(&cluster).await;
    lb.wait_stats(Duration::from_secs(20), "pg-1 takes reads", |s| {
        s.backend("pg-1").read_eligible
    })
    .await;
    let p1 = cluster.node(1).port();

    let w = connect_ok(lb.write).await;
    let r = connect_ok(lb.read).await;
    assert_eq!(backend_port(&r).await, p1);
    // 100 kB back from each backend; a few hundred bytes to it.
    for c in [&w, &r] {
        assert_eq!(
            scalar_ok(c, "SELECT length(repeat('x', 100000))").await,
            "100000"
        );
        assert_eq!(
            scalar_ok(c, "SELECT repeat('x', 100000)").await.len(),
            100_000
        );
    }

    let mut m = String::new();
    wait_until(Duration::from_secs(5), "byte counters in /metrics", || {
        m = metrics_text(lb.stats);
        [("write", "pg-0"), ("read", "pg-1")].iter().all(|(p, b)| {
            let out = metric(
                &m,
                "pglb_bytes_total",
                &[("port", p), ("backend", b), ("direction", "out")],
            )
            .unwrap_or(0.0);
            let inn = metric(
                &m,
                "pglb_bytes_total",
                &[("port", p), ("backend", b), ("direction", "in")],
            )
            .unwrap_or(0.0);
            out >= 100_000.0 && inn > 0.0 && inn < out
        })
    })
    .await;
    for (p, b) in [("write", "pg-0"), ("read", "pg-1")] {
        assert_eq!(
            metric(&m, "pglb_sessions_active", &[("port", p), ("backend", b)]),
            Some(1.0),
            "{p}/{b}:\n{m}"
        );
    }
    let lag = metric(&m, "pglb_replica_lag_seconds", &[("backend", "pg-1")])
        .unwrap_or_else(|| panic!("no pglb_replica_lag_seconds for pg-1:\n{m}"));
    assert!(lag >= 0.0);
    assert!(
        metric(&m, "pglb_replica_lag_bytes", &[("backend", "pg-1")]).is_some(),
        "{m}"
    );
    assert_eq!(
        metric(&m, "pglb_replica_lag_seconds", &[("backend", "pg-0")]),
        None,
        "the primary has no replica lag"
    );

    // Closing the sessions brings the gauges back to 0.
    drop(w);
    drop(r);
    wait_until(Duration::from_secs(5), "sessions_active back to 0", || {
        let m = metrics_text(lb.stats);
        metric(
            &m,
            "pglb_sessions_active",
            &[("port", "write"), ("backend", "pg-0")],
        ) == Some(0.0)
            && metric(
                &m,
                "pglb_sessions_active",
                &[("port", "read"), ("backend", "pg-1")],
            ) == Some(0.0)
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 6. Admin token from a file
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_token_from_file() {
    const TOKEN: &str = "file-token-c41d";
    let cluster = PgCluster::start(1);
    let secrets = tempfile::tempdir().unwrap();
    let token_file = secrets.path().join("admin-token");
    fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let lb = Pglb::builder(&cluster)
        .set(
            "stats",
            "admin_token_file",
            token_file.display().to_string(),
        )
        .start();
    lb.wait_ready().await;
    lb.wait_stats(Duration::from_secs(20), "pg-1 takes reads", |s| {
        s.backend("pg-1").read_eligible
    })
    .await;

    for token in [None, Some("wrong-token"), Some("file-token-c41")] {
        let (code, body) = http_request(lb.stats, "POST", "/api/backends/pg-1/drain", token);
        assert_eq!(code, 401, "token {token:?}: {body}");
    }
    lb.wait_log(Duration::from_secs(5), "admin action refused")
        .await;
    assert_eq!(lb.stats().unwrap().backend("pg-1").state, "up");
    assert_eq!(landing_port(lb.read).await, cluster.node(1).port());

    let (code, body) = http_request(lb.stats, "POST", "/api/backends/pg-1/drain", Some(TOKEN));
    assert_eq!(code, 200, "{body}");
    assert_eq!(lb.stats().unwrap().backend("pg-1").state, "draining");
    // Reads fall back to the primary while pg-1 drains.
    assert_eq!(landing_port(lb.read).await, cluster.node(0).port());
    assert!(
        !lb.log_text().contains(TOKEN),
        "the token leaked into the log"
    );
}
