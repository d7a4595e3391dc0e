//! Hot reload under load: pgbench through both ports (persistent and new-connection-per-
//! transaction) while the config is rewritten 100 times. Zero failed transactions, every good file
//! applied, the broken one refused, and a removed backend ends with no sessions.

mod common;

use std::fs;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// Runs pgbench in a loop of short runs until `stop`; returns (transactions, failures, runs).
fn pgbench_loop(
    addr: std::net::SocketAddr,
    extra: &'static [&'static str],
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicU64>,
    log: Arc<std::sync::Mutex<Vec<String>>>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut txns = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let out = Command::new("pgbench")
                .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
                .args(["-U", APP_USER, "-n", "-T", "3", "-c", "2"])
                .args(extra)
                .arg(DATABASE)
                .env("PGPASSWORD", APP_PASSWORD)
                .output()
                .expect("run pgbench");
            let stdout = String::from_utf8_lossy(&out.stdout).to_string();
            let stderr = String::from_utf8_lossy(&out.stderr).to_string();
            let processed = stdout
                .lines()
                .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
                .and_then(|v| v.split('/').next())
                .and_then(|v| v.trim().parse::<u64>().ok());
            let failed = stdout
                .lines()
                .find_map(|l| l.strip_prefix("number of failed transactions: "))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            match (out.status.success(), processed) {
                (true, Some(n)) => {
                    txns += n;
                    failures.fetch_add(failed, Ordering::Relaxed);
                    if failed > 0 {
                        log.lock()
                            .unwrap()
                            .push(format!("{extra:?}: {stdout}{stderr}"));
                    }
                }
                _ => {
                    failures.fetch_add(1 + failed, Ordering::Relaxed);
                    log.lock()
                        .unwrap()
                        .push(format!("{extra:?} exit {}: {stdout}{stderr}", out.status));
                }
            }
        }
        txns
    })
}

fn reload_field(lb: &Pglb, key: &str) -> u64 {
    let s = lb.stats().expect("stats.json");
    let v: serde_json::Value = serde_json::from_str(&s.raw).unwrap();
    v["reload"][key].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_reloads_under_pgbench_lose_no_transaction() {
    let cluster = PgCluster::start(2);
    let base = || {
        Pglb::builder(&cluster)
            .set("check", "interval", "250ms")
            .set("proxy", "drain_timeout", "10m")
    };
    let lb = base().start();
    lb.wait_ready().await;
    lb.wait_stats(Duration::from_secs(20), "both replicas take reads", |s| {
        s.backend("pg-1").read_eligible && s.backend("pg-2").read_eligible
    })
    .await;

    pgbench_init(lb.write);
    cluster.wait_replayed(1, Duration::from_secs(30));
    cluster.wait_replayed(2, Duration::from_secs(30));

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let loads: Vec<(&str, std::thread::JoinHandle<u64>)> = vec![
        (
            "write persistent",
            pgbench_loop(
                lb.write,
                &[],
                stop.clone(),
                failures.clone(),
                errors.clone(),
            ),
        ),
        (
            "write -C",
            pgbench_loop(
                lb.write,
                &["-C"],
                stop.clone(),
                failures.clone(),
                errors.clone(),
            ),
        ),
        (
            "read -S persistent",
            pgbench_loop(
                lb.read,
                &["-S"],
                stop.clone(),
                failures.clone(),
                errors.clone(),
            ),
        ),
        (
            "read -S -C",
            pgbench_loop(
                lb.read,
                &["-S", "-C"],
                stop.clone(),
                failures.clone(),
                errors.clone(),
            ),
        ),
    ];

    // 100 rewrites: replicas removed and added back, weights changed, balance switched, one
    // broken file in the middle; written in place and replaced by rename, alternately.
    let all = cluster.backends();
    let path = lb.config_path().to_path_buf();
    let tmp = path.with_extension("tmp");
    let started = Instant::now();
    let (mut applied, mut refused) = (0u64, 0u64);
    for i in 0..100u32 {
        let broken = i == 50;
        let mut backends = all.clone();
        match i % 4 {
            0 => {
                backends.remove(2);
            }
            1 => backends[1].weight = Some(1 + i % 3),
            2 => {
                backends.remove(1);
            }
            _ => backends[2].weight = Some(2 + i % 5),
        }
        let mut text = base()
            .backends(backends)
            .set(
                "read",
                "balance",
                if i % 2 == 0 {
                    "leastconn"
                } else {
                    "roundrobin"
                },
            )
            .set("read", "max_lag", format!("{}MB", 16 + i))
            .render(lb.write, lb.read, lb.stats);
        if broken {
            text.push_str("\n[check]\nthis is not toml\n");
        }
        let before = (reload_field(&lb, "applied"), reload_field(&lb, "rejected"));
        if i % 2 == 0 {
            fs::write(&path, &text).unwrap();
        } else {
            fs::write(&tmp, &text).unwrap();
            fs::rename(&tmp, &path).unwrap();
        }
        let key = if broken { "rejected" } else { "applied" };
        let want = if broken { before.1 + 1 } else { before.0 + 1 };
        wait_until(
            Duration::from_secs(10),
            &format!("rewrite {i} to be {key}"),
            || reload_field(&lb, key) >= want,
        )
        .await;
        if broken {
            refused += 1;
        } else {
            applied += 1;
        }
    }
    let reload_time = started.elapsed();

    // Settle on a config without pg-2; its persistent read sessions may drain on their own.
    let mut final_backends = all.clone();
    final_backends.remove(2);
    let before = reload_field(&lb, "applied");
    fs::write(
        &path,
        base()
            .backends(final_backends)
            .render(lb.write, lb.read, lb.stats),
    )
    .unwrap();
    wait_until(Duration::from_secs(10), "final config applied", || {
        reload_field(&lb, "applied") > before
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for (name, h) in loads {
        let n = h.join().expect("pgbench thread");
        assert!(n > 0, "{name}: no transactions ran");
        eprintln!("{name}: {n} transactions");
        total += n;
    }
    let failed = failures.load(Ordering::Relaxed);
    eprintln!(
        "reload test: {total} transactions, {failed} failed, {applied} reloads applied, {refused} refused, in {reload_time:?}"
    );
    assert_eq!(
        failed,
        0,
        "failed pgbench runs or transactions:\n{}",
        errors.lock().unwrap().join("\n---\n")
    );
    assert_eq!((applied, refused), (99, 1));
    assert_eq!(reload_field(&lb, "rejected"), 1);

    // The removed backend ends with no sessions and leaves the stats page.
    lb.wait_stats(Duration::from_secs(20), "pg-2 gone from stats", |s| {
        s.try_backend("pg-2").is_none()
    })
    .await;
    // Every pgbench has exited: the last sessions end as pglb sees their clients' EOF.
    let drained = std::time::Instant::now();
    lb.wait_stats(Duration::from_secs(10), "no session left on pg-1", |s| {
        s.backend("pg-1").sessions_active == 0
    })
    .await;
    eprintln!(
        "pg-1 without sessions {:?} after the loads ended",
        drained.elapsed()
    );
    assert!(lb.log_contains("config reload refused"));
}
