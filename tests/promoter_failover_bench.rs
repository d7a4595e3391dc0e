//! The failover figure (a benchmark, not a timed test; ignored unless asked for, run by
//! `loadtest/failover`): N trials per fault and mode, each on a fresh primary + two replicas
//! with pglb and the promoter at their default timings (pglb checks every 1 s, timeout 2 s,
//! rise/fall 2, fast_interval 200 ms, wait_for_backend 10 s; promoter every 500 ms,
//! failover_after 3 s). The fault is a kill -9 of the primary's postmaster (`kill`) or a
//! SIGSTOP of every process of the primary server, like a paused VM (`stop`). Two clients
//! write through pglb's write port: one session as fast as it can (reconnecting after an
//! error), and one that opens a new connection for every insert (like `pgbench -C`) and counts
//! its failed connection attempts. Per trial: time from the fault to the first write
//! acknowledged by another server (each client), failed connection attempts (of those started
//! after the fault: the target is 0), attempts cut in flight (a login or insert the failed
//! server had already taken: lost for any layer-4 proxy), acknowledged rows missing on the new
//! primary, and the most backends pglb ever called primary at once (the old primary is restarted or thawed after the failover, so
//! its fencing is part of the trial).
//!
//! With a store (`etcd`), a trial starts a 3-member etcd on loopback, pglb follows the record
//! there and TWO promoters (`a`, `b`, default `lease_ttl`) coordinate through it; the trial
//! begins once one leads and the other follows, and also reports which one promoted and how
//! many promotions they made together (asserted: exactly one). The summary prints the RTO
//! difference with and without the store where both ran (trials alternate between them).
//!
//! Environment: FAILOVER_TRIALS (default 20), FAILOVER_FAULTS (default "kill,stop"),
//! FAILOVER_MODES (default "async,sync"), FAILOVER_STORES (default "none"; "none,etcd" for
//! both), FAILOVER_OUT (JSON file for the results; default none), FAILOVER_LOGS (set: print
//! the promoters' last log lines after each promotion).

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::etcd::EtcdCluster;
use common::promoter::*;
use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(60);

/// The promoter's default `failover_after`, the reference of the targets.
const FAILOVER_AFTER: f64 = 3.0;

/// How long the per-connection client allows one login (an application's connect timeout);
/// longer than pglb's `wait_for_backend`, so a session pglb holds through the failover counts
/// as served, and a FATAL from pglb as failed.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGKILL to the postmaster; its children notice and exit.
    Kill,
    /// SIGSTOP to every process of the server.
    Stop,
}

impl Fault {
    fn as_str(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Stop => "stop",
        }
    }
}

struct Trial {
    fault: Fault,
    store: Store,
    /// The promoter that promoted (`a` or `b`; `-` without a store).
    acted: String,
    /// Promotions made by all the promoters together, and replicas out of recovery at the
    /// end: exactly one each.
    promotions: u64,
    left_recovery: usize,
    mode: &'static str,
    /// Fault to the first write of the session client acknowledged by another server.
    first_write: Duration,
    /// The same for the client that connects for every write.
    first_write_conn: Duration,
    detected_after: f64,
    promote: f64,
    /// Connection attempts of the per-connection client started after the fault, and those
    /// of them that failed (the target: 0).
    conn_attempts: u64,
    conn_failed: usize,
    /// Attempts in flight at the fault that failed at login: the server had taken the session
    /// already, so no layer-4 proxy can save them.
    conn_cut: usize,
    /// Inserts that failed on a connected session (in flight on the failed server).
    write_failed: usize,
    conn_errors: Vec<String>,
    acked: usize,
    lost: usize,
    /// Lost rows acknowledged after the fault (a killed postmaster's backends answer until
    /// they notice it is gone, while its WAL sender already stopped).
    lost_after_fault: usize,
    promoted: String,
    max_primaries: usize,
}

/// Where the promoters coordinate: nowhere (one promoter), or a 3-member etcd (two
/// promoters, `a` and `b`, and pglb following the store's record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    None,
    Etcd,
}

impl Store {
    fn as_str(self) -> &'static str {
        match self {
            Store::None => "none",
            Store::Etcd => "etcd",
        }
    }
}

/// The store's key prefix in the trials.
const PREFIX: &str = "/pglb/bench";
/// `[store] lease_ttl`: its default.
const LEASE_TTL: Duration = Duration::from_secs(5);

/// Polls every promoter's `/status` until one of them reports a promotion; returns its index
/// and status.
async fn wait_promoted(promoters: &[Promoter], timeout: Duration) -> (usize, serde_json::Value) {
    let deadline = Instant::now() + timeout;
    loop {
        for (i, p) in promoters.iter().enumerate() {
            if let Ok(s) = p.status() {
                if s["last_failover"]["outcome"] == "promoted" {
                    return (i, s);
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no promoter reported a promotion within {timeout:?}; logs:\n{}",
            promoters
                .iter()
                .map(|p| {
                    let log = p.log_text();
                    let lines: Vec<&str> = log.lines().collect();
                    lines[lines.len().saturating_sub(30)..].join("\n")
                })
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn trial(fault: Fault, sync: bool, store: Store) -> Trial {
    let etcd = (store == Store::Etcd).then(EtcdCluster::start);
    let cluster = failover_cluster(2);
    let mut builder = Pglb::builder(&cluster)
        .unset("check", "interval")
        .unset("check", "timeout")
        .unset("check", "rise")
        .unset("check", "fall")
        .unset("proxy", "connect_timeout");
    if let Some(e) = &etcd {
        let endpoints: Vec<toml::Value> = e.endpoints().into_iter().map(Into::into).collect();
        builder = builder
            .set("store", "kind", "etcd")
            .set("store", "endpoints", endpoints)
            .set("store", "prefix", PREFIX);
    }
    let lb = builder.start();
    lb.wait_ready().await;
    let promoter = |id: &str| {
        let b = PromoterBuilder::new()
            .unset("failover_after")
            .unset("interval")
            .set("synchronous", sync);
        match &etcd {
            Some(e) => b.id(id).store(&e.endpoints(), PREFIX, LEASE_TTL),
            None => b,
        }
    };
    let promoters = match &etcd {
        None => {
            let p = promoter("a").start(&lb);
            p.wait_steady("pg-0", T).await;
            vec![p]
        }
        Some(_) => {
            // One leads (and records pg-0), the other follows it, both steady on pg-0.
            let a = promoter("a").start(&lb);
            a.wait_status(T, "a to lead, pg-0 recorded", |s| {
                s["store"]["is_leader"] == true
                    && s["store"]["record"]["name"] == "pg-0"
                    && s["decision"] == "steady"
            })
            .await;
            let b = promoter("b").start(&lb);
            b.wait_status(T, "b following a, steady on pg-0", |s| {
                s["store"]["is_leader"] == false
                    && s["store"]["leader"] == "a"
                    && s["decision"] == "steady"
                    && s["primary"] == "pg-0"
            })
            .await;
            vec![a, b]
        }
    };
    let p0 = cluster.node(0);
    if sync {
        wait_until(T, "both standbys in the quorum", || {
            p0.exec("SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'quorum'") == "2"
        })
        .await;
    }
    let writer = Writer::start(lb.write, "bench").await;
    let conn_writer = ConnWriter::start(lb.write, "bench_conn", LOGIN_TIMEOUT).await;
    writer.wait_count(200, T).await;
    conn_writer.wait_count(20, T).await;

    // pglb's view, every 50 ms, until the end of the trial.
    let max_primaries = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let monitor = std::thread::spawn({
        let (max, stop, stats) = (max_primaries.clone(), stop.clone(), lb.stats);
        move || {
            while !stop.load(Ordering::Relaxed) {
                if let Ok((200, body)) = http_get(stats, "/stats.json") {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) {
                        let n = v["backends"]
                            .as_array()
                            .map(|bs| bs.iter().filter(|b| b["role"] == "primary").count())
                            .unwrap_or(0);
                        max.fetch_max(n, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    });

    let attempts_before = conn_writer.attempts();
    let at = Instant::now();
    match fault {
        Fault::Kill => kill9(p0),
        Fault::Stop => p0.freeze(),
    }
    let first = writer.wait_first_elsewhere(at, p0.port(), T).await;
    let first_conn = conn_writer.wait_first_elsewhere(at, p0.port(), T).await;
    let (acting, s) = wait_promoted(&promoters, T).await;
    let promoter = &promoters[acting];
    if std::env::var_os("FAILOVER_LOGS").is_some() {
        // What each promoter said from the fault on (decisions, failover steps, store).
        for p in &promoters {
            let log = p.log_text();
            let lines: Vec<&str> = log.lines().collect();
            println!("--- promoter log (last lines)");
            for line in &lines[lines.len().saturating_sub(60)..] {
                println!("    {line}");
            }
        }
    }
    let promoted = s["last_failover"]["to"].as_str().unwrap_or("?").to_string();
    let new = cluster
        .nodes()
        .iter()
        .find(|n| n.name() == promoted)
        .expect("promoted node");
    writer.wait_count(writer.count() + 50, T).await;
    conn_writer.wait_count(conn_writer.count() + 10, T).await;
    // The old primary comes back: fenced by pglb and the promoter, never a second primary.
    match fault {
        Fault::Kill => restart_after_kill(p0),
        Fault::Stop => p0.thaw(),
    }
    promoter
        .wait_status(T, "the old primary fenced", |s| {
            s["fenced"] == serde_json::json!(["pg-0"])
        })
        .await;
    writer.wait_count(writer.count() + 50, T).await;
    // Settled: every promoter steady on the new primary; count the promotions they made and
    // the replicas that left recovery (exactly one of each).
    let mut promotions = 0;
    for p in &promoters {
        let s = p.wait_steady(&promoted, T).await;
        promotions += s["failovers"].as_u64().unwrap_or(0);
    }
    let left_recovery = cluster.nodes()[1..]
        .iter()
        .filter(|n| !n.in_recovery())
        .count();
    stop.store(true, Ordering::Relaxed);
    let _ = monitor.join();
    let conn_attempts = conn_writer.attempts() - attempts_before;
    let failures: Vec<Failure> = conn_writer
        .failures()
        .into_iter()
        .filter(|f| f.at + f.took > at)
        .collect();
    let conn_acks = conn_writer.stop().await;
    let acks = writer.stop().await;
    let mut missing = missing_rows(new, "bench", &acks);
    let mut lost_after_fault = acks
        .iter()
        .filter(|a| a.at > at && missing.contains(&a.id))
        .count();
    let conn_missing = missing_rows(new, "bench_conn", &conn_acks);
    lost_after_fault += conn_acks
        .iter()
        .filter(|a| a.at > at && conn_missing.contains(&a.id))
        .count();
    missing.extend(conn_missing);
    Trial {
        fault,
        store,
        acted: match store {
            Store::None => "-".into(),
            Store::Etcd => s["id"].as_str().unwrap_or("?").to_string(),
        },
        promotions,
        left_recovery,
        mode: if sync { "sync" } else { "async" },
        first_write: first.at - at,
        first_write_conn: first_conn.at - at,
        detected_after: s["last_failover"]["detected_after_seconds"]
            .as_f64()
            .unwrap_or(0.0),
        promote: s["last_failover"]["promote_seconds"]
            .as_f64()
            .unwrap_or(0.0),
        conn_attempts,
        conn_failed: failures
            .iter()
            .filter(|f| f.stage == FailedAt::Connect && f.at >= at)
            .count(),
        conn_cut: failures
            .iter()
            .filter(|f| f.stage == FailedAt::Connect && f.at < at)
            .count(),
        write_failed: failures
            .iter()
            .filter(|f| f.stage == FailedAt::Write)
            .count(),
        conn_errors: failures
            .iter()
            .filter(|f| f.stage == FailedAt::Connect)
            .map(|f| {
                let started = if f.at >= at {
                    format!("{:.3}s", (f.at - at).as_secs_f64())
                } else {
                    format!("-{:.3}s", (at - f.at).as_secs_f64())
                };
                format!("{started} (took {:.3}s): {}", f.took.as_secs_f64(), f.error)
            })
            .collect(),
        acked: acks.len() + conn_acks.len(),
        lost: missing.len(),
        lost_after_fault,
        promoted,
        max_primaries: max_primaries.load(Ordering::Relaxed),
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn list(var: &str, default: &str) -> Vec<String> {
    std::env::var(var)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark: run loadtest/failover"]
async fn failover_trials() {
    let trials: usize = std::env::var("FAILOVER_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let faults: Vec<Fault> = list("FAILOVER_FAULTS", "kill,stop")
        .iter()
        .map(|f| match f.as_str() {
            "kill" => Fault::Kill,
            "stop" => Fault::Stop,
            other => panic!("FAILOVER_FAULTS: unknown fault {other:?} (kill, stop)"),
        })
        .collect();
    let modes: Vec<bool> = list("FAILOVER_MODES", "async,sync")
        .iter()
        .map(|m| match m.as_str() {
            "sync" => true,
            "async" => false,
            other => panic!("FAILOVER_MODES: unknown mode {other:?} (async, sync)"),
        })
        .collect();
    let stores: Vec<Store> = list("FAILOVER_STORES", "none")
        .iter()
        .map(|m| match m.as_str() {
            "none" => Store::None,
            "etcd" => Store::Etcd,
            other => panic!("FAILOVER_STORES: unknown store {other:?} (none, etcd)"),
        })
        .collect();
    let mut all = Vec::new();
    println!(
        "{:<5} {:<6} {:<5} {:>5} {:>7} {:>8} {:>8} {:>9} {:>8} {:>9} {:>8} {:>7} {:>5} {:>11} {:>8} {:>9} {:>5} {:>6}",
        "fault",
        "mode",
        "store",
        "trial",
        "rto_s",
        "rto_new_s",
        "detect_s",
        "promote_s",
        "conns",
        "conn_fail",
        "in_flight",
        "acked",
        "lost",
        "after_fault",
        "promoted",
        "primaries",
        "acted",
        "promos"
    );
    // The stores alternate trial by trial, so that a slower spell of a shared machine weighs
    // on both alike.
    for &fault in &faults {
        for &sync in &modes {
            for i in 1..=trials {
                for &store in &stores {
                    let t = trial(fault, sync, store).await;
                    println!(
                    "{:<5} {:<6} {:<5} {:>5} {:>7.3} {:>8.3} {:>8.3} {:>9.3} {:>8} {:>9} {:>8} {:>7} {:>5} {:>11} {:>8} {:>9} {:>5} {:>6}",
                    t.fault.as_str(),
                    t.mode,
                    t.store.as_str(),
                    i,
                    t.first_write.as_secs_f64(),
                    t.first_write_conn.as_secs_f64(),
                    t.detected_after,
                    t.promote,
                    t.conn_attempts,
                    t.conn_failed,
                    t.write_failed + t.conn_cut,
                    t.acked,
                    t.lost,
                    t.lost_after_fault,
                    t.promoted,
                    t.max_primaries,
                    t.acted,
                    t.promotions
                );
                    for e in &t.conn_errors {
                        println!("      connection attempt started at {e}");
                    }
                    all.push(t);
                }
            }
        }
    }
    let mut summary = Vec::new();
    println!();
    println!(
        "targets: failed connection attempts 0; after kill -9 RTO p50 <= {:.1} s, p99 <= {:.1} s; after SIGSTOP RTO <= {:.1} s (failover_after {FAILOVER_AFTER} s)",
        FAILOVER_AFTER + 0.6,
        FAILOVER_AFTER + 1.5,
        FAILOVER_AFTER + 2.0
    );
    println!(
        "{:<5} {:<6} {:<5} {:>6} {:>7} {:>7} {:>7} {:>11} {:>11} {:>9} {:>13} {:>9} {:>10} {:>9}",
        "fault",
        "mode",
        "store",
        "trials",
        "p50_s",
        "p99_s",
        "max_s",
        "new_p50_s",
        "new_p99_s",
        "conn_fail",
        "per_trial",
        "in_flight",
        "rows_lost",
        "primaries"
    );
    // RTO p50 and p99 per fault, mode and store, for the comparison below.
    let mut rto: Vec<(Fault, &str, Store, f64, f64)> = Vec::new();
    for fault in [Fault::Kill, Fault::Stop] {
        for mode in ["async", "sync"] {
            for store in [Store::None, Store::Etcd] {
                let ts: Vec<&Trial> = all
                    .iter()
                    .filter(|t| t.fault == fault && t.mode == mode && t.store == store)
                    .collect();
                if ts.is_empty() {
                    continue;
                }
                let sorted = |f: fn(&Trial) -> Duration| {
                    let mut v: Vec<f64> = ts.iter().map(|t| f(t).as_secs_f64()).collect();
                    v.sort_by(f64::total_cmp);
                    v
                };
                let secs = sorted(|t| t.first_write);
                let secs_conn = sorted(|t| t.first_write_conn);
                let failed: usize = ts.iter().map(|t| t.conn_failed).sum();
                let in_flight: usize = ts.iter().map(|t| t.write_failed + t.conn_cut).sum();
                let lost: usize = ts.iter().map(|t| t.lost).sum();
                let acked: usize = ts.iter().map(|t| t.acked).sum();
                let primaries = ts.iter().map(|t| t.max_primaries).max().unwrap_or(0);
                println!(
                "{:<5} {:<6} {:<5} {:>6} {:>7.3} {:>7.3} {:>7.3} {:>11.3} {:>11.3} {:>9} {:>13.2} {:>9} {:>10} {:>9}",
                fault.as_str(),
                mode,
                store.as_str(),
                ts.len(),
                percentile(&secs, 50.0),
                percentile(&secs, 99.0),
                secs[secs.len() - 1],
                percentile(&secs_conn, 50.0),
                percentile(&secs_conn, 99.0),
                failed,
                failed as f64 / ts.len() as f64,
                in_flight,
                format!("{lost}/{acked}"),
                primaries
            );
                rto.push((
                    fault,
                    mode,
                    store,
                    percentile(&secs, 50.0),
                    percentile(&secs, 99.0),
                ));
                summary.push(json!({
                "fault": fault.as_str(),
                "mode": mode,
                "store": store.as_str(),
                "trials": ts.len(),
                "first_write_p50_seconds": percentile(&secs, 50.0),
                "first_write_p99_seconds": percentile(&secs, 99.0),
                "first_write_max_seconds": secs[secs.len() - 1],
                "first_write_new_connection_p50_seconds": percentile(&secs_conn, 50.0),
                "first_write_new_connection_p99_seconds": percentile(&secs_conn, 99.0),
                "failed_connection_attempts_total": failed,
                "failed_connection_attempts_per_trial": ts.iter().map(|t| t.conn_failed).collect::<Vec<_>>(),
                "connection_attempts_total": ts.iter().map(|t| t.conn_attempts).sum::<u64>(),
                "attempts_cut_in_flight_total": in_flight,
                "rows_acknowledged_total": acked,
                "rows_lost_total": lost,
                "rows_lost_per_trial": ts.iter().map(|t| t.lost).collect::<Vec<_>>(),
                "max_pglb_primaries": primaries,
            }));
            }
        }
    }
    // With and without the store, where both ran: the target is within 0.5 s.
    let mut compared = Vec::new();
    for &(fault, mode, store, p50, p99) in &rto {
        if store != Store::Etcd {
            continue;
        }
        let Some(&(.., base50, base99)) = rto
            .iter()
            .find(|r| r.0 == fault && r.1 == mode && r.2 == Store::None)
        else {
            continue;
        };
        if compared.is_empty() {
            println!();
            println!("RTO with etcd minus without (target: within 0.5 s)");
            println!(
                "{:<5} {:<6} {:>12} {:>12}",
                "fault", "mode", "d_p50_s", "d_p99_s"
            );
        }
        println!(
            "{:<5} {:<6} {:>+12.3} {:>+12.3}",
            fault.as_str(),
            mode,
            p50 - base50,
            p99 - base99
        );
        compared.push(json!({
            "fault": fault.as_str(),
            "mode": mode,
            "p50_difference_seconds": p50 - base50,
            "p99_difference_seconds": p99 - base99,
        }));
    }
    if let Ok(path) = std::env::var("FAILOVER_OUT") {
        let doc = json!({
            "failover_after_seconds": FAILOVER_AFTER,
            "summary": summary,
            "etcd_minus_none": compared,
            "trials": all.iter().map(|t| json!({
                "fault": t.fault.as_str(),
                "mode": t.mode,
                "store": t.store.as_str(),
                "acted": t.acted,
                "promotions": t.promotions,
                "first_write_seconds": t.first_write.as_secs_f64(),
                "first_write_new_connection_seconds": t.first_write_conn.as_secs_f64(),
                "detected_after_seconds": t.detected_after,
                "promote_seconds": t.promote,
                "connection_attempts": t.conn_attempts,
                "failed_connection_attempts": t.conn_failed,
                "failed_connection_errors": t.conn_errors,
                "writes_failed_in_flight": t.write_failed,
                "logins_cut_in_flight": t.conn_cut,
                "acked": t.acked,
                "lost": t.lost,
                "lost_acknowledged_after_fault": t.lost_after_fault,
                "promoted": t.promoted,
                "max_pglb_primaries": t.max_primaries,
            })).collect::<Vec<_>>(),
        });
        std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap())
            .unwrap_or_else(|e| panic!("write {path}: {e}"));
        println!("\nresults written to {path}");
    }
    for t in &all {
        assert!(t.max_primaries <= 1, "pglb saw two primaries at once");
        assert_eq!(
            t.promotions, 1,
            "promotions made by the promoters in one trial"
        );
        assert_eq!(
            t.left_recovery, 1,
            "replicas out of recovery after one trial"
        );
        if t.mode == "sync" {
            assert_eq!(t.lost, 0, "sync mode lost acknowledged rows");
        }
    }
}
