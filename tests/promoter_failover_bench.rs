//! The failover figure (a benchmark, not a timed test; ignored unless asked for, run by
//! `loadtest/failover`): N kill -9 trials per mode, each on a fresh primary + two replicas with
//! pglb and the promoter at their default timings (pglb checks every 1 s, rise/fall 2; promoter
//! every 500 ms, failover_after 3 s). A client writes through pglb's write port as fast as one
//! session can; per trial: time from the kill to the first write acknowledged by another
//! server, acknowledged rows missing on the new primary, and the most backends pglb ever
//! called primary at once (the old primary is restarted after the failover, so its fencing is
//! part of the trial).
//!
//! Environment: FAILOVER_TRIALS (default 5), FAILOVER_MODES (default "async,sync"),
//! FAILOVER_OUT (JSON file for the results; default none).

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::promoter::*;
use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(60);

struct Trial {
    mode: &'static str,
    first_write: Duration,
    detected_after: f64,
    promote: f64,
    acked: usize,
    lost: usize,
    /// Lost rows acknowledged after the SIGKILL: the postmaster's backends answer until they
    /// notice it is gone, while its WAL sender already stopped.
    lost_after_kill: usize,
    promoted: String,
    max_primaries: usize,
}

async fn trial(sync: bool) -> Trial {
    let cluster = failover_cluster(2);
    let lb = Pglb::builder(&cluster)
        .unset("check", "interval")
        .unset("check", "timeout")
        .unset("check", "rise")
        .unset("check", "fall")
        .start();
    lb.wait_ready().await;
    let promoter = PromoterBuilder::new()
        .unset("failover_after")
        .unset("interval")
        .set("synchronous", sync)
        .start(&lb);
    promoter.wait_steady("pg-0", T).await;
    let p0 = cluster.node(0);
    if sync {
        wait_until(T, "both standbys in the quorum", || {
            p0.exec("SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'quorum'") == "2"
        })
        .await;
    }
    let writer = Writer::start(lb.write, "bench").await;
    writer.wait_count(200, T).await;

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

    let killed = Instant::now();
    kill9(p0);
    let first = writer.wait_first_elsewhere(killed, p0.port(), T).await;
    let s = promoter
        .wait_status(T, "a promotion", |s| {
            s["last_failover"]["outcome"] == "promoted"
        })
        .await;
    let promoted = s["last_failover"]["to"].as_str().unwrap_or("?").to_string();
    let new = cluster
        .nodes()
        .iter()
        .find(|n| n.name() == promoted)
        .expect("promoted node");
    writer.wait_count(writer.count() + 50, T).await;
    // The old primary comes back: fenced by pglb and the promoter, never a second primary.
    restart_after_kill(p0);
    promoter
        .wait_status(T, "the old primary fenced", |s| {
            s["fenced"] == serde_json::json!(["pg-0"])
        })
        .await;
    writer.wait_count(writer.count() + 50, T).await;
    stop.store(true, Ordering::Relaxed);
    let _ = monitor.join();
    let acks = writer.stop().await;
    let missing = missing_rows(new, "bench", &acks);
    let lost = missing.len();
    let lost_after_kill = acks
        .iter()
        .filter(|a| a.at > killed && missing.contains(&a.id))
        .count();
    Trial {
        mode: if sync { "sync" } else { "async" },
        first_write: first.at - killed,
        detected_after: s["last_failover"]["detected_after_seconds"]
            .as_f64()
            .unwrap_or(0.0),
        promote: s["last_failover"]["promote_seconds"]
            .as_f64()
            .unwrap_or(0.0),
        acked: acks.len(),
        lost,
        lost_after_kill,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark: run loadtest/failover"]
async fn failover_trials() {
    let trials: usize = std::env::var("FAILOVER_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let modes = std::env::var("FAILOVER_MODES").unwrap_or_else(|_| "async,sync".into());
    let mut all = Vec::new();
    println!(
        "{:<6} {:>5} {:>10} {:>9} {:>9} {:>7} {:>5} {:>10} {:>9} {:>9}",
        "mode",
        "trial",
        "first_wr_s",
        "detect_s",
        "promote_s",
        "acked",
        "lost",
        "after_kill",
        "promoted",
        "primaries"
    );
    for mode in modes.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        let sync = match mode {
            "sync" => true,
            "async" => false,
            other => panic!("FAILOVER_MODES: unknown mode {other:?} (async, sync)"),
        };
        for i in 1..=trials {
            let t = trial(sync).await;
            println!(
                "{:<6} {:>5} {:>10.3} {:>9.3} {:>9.3} {:>7} {:>5} {:>10} {:>9} {:>9}",
                t.mode,
                i,
                t.first_write.as_secs_f64(),
                t.detected_after,
                t.promote,
                t.acked,
                t.lost,
                t.lost_after_kill,
                t.promoted,
                t.max_primaries
            );
            all.push(t);
        }
    }
    let mut summary = Vec::new();
    println!();
    println!(
        "{:<6} {:>6} {:>8} {:>8} {:>8} {:>10} {:>13}",
        "mode", "trials", "p50_s", "p99_s", "max_s", "rows_lost", "max_primaries"
    );
    for mode in ["async", "sync"] {
        let ts: Vec<&Trial> = all.iter().filter(|t| t.mode == mode).collect();
        if ts.is_empty() {
            continue;
        }
        let mut secs: Vec<f64> = ts.iter().map(|t| t.first_write.as_secs_f64()).collect();
        secs.sort_by(f64::total_cmp);
        let lost: usize = ts.iter().map(|t| t.lost).sum();
        let primaries = ts.iter().map(|t| t.max_primaries).max().unwrap_or(0);
        println!(
            "{:<6} {:>6} {:>8.3} {:>8.3} {:>8.3} {:>10} {:>13}",
            mode,
            ts.len(),
            percentile(&secs, 50.0),
            percentile(&secs, 99.0),
            secs[secs.len() - 1],
            lost,
            primaries
        );
        summary.push(json!({
            "mode": mode,
            "trials": ts.len(),
            "first_write_p50_seconds": percentile(&secs, 50.0),
            "first_write_p99_seconds": percentile(&secs, 99.0),
            "first_write_max_seconds": secs[secs.len() - 1],
            "rows_lost_total": lost,
            "rows_lost_per_trial": ts.iter().map(|t| t.lost).collect::<Vec<_>>(),
            "max_pglb_primaries": primaries,
        }));
    }
    if let Ok(path) = std::env::var("FAILOVER_OUT") {
        let doc = json!({
            "summary": summary,
            "trials": all.iter().map(|t| json!({
                "mode": t.mode,
                "first_write_seconds": t.first_write.as_secs_f64(),
                "detected_after_seconds": t.detected_after,
                "promote_seconds": t.promote,
                "acked": t.acked,
                "lost": t.lost,
                "lost_acknowledged_after_kill": t.lost_after_kill,
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
        if t.mode == "sync" {
            assert_eq!(t.lost, 0, "sync mode lost acknowledged rows");
        }
    }
}
