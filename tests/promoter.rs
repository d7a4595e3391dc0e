//! pglb-promoter against real PostgreSQL: one primary, two replicas, pglb and the promoter
//! binary, each test with its own cluster. Tight timings: checks every 200 ms, failover after
//! 2-3 s, wal_receiver_timeout 5 s (the harness's).

mod common;

use std::time::{Duration, Instant};

use common::promoter::*;
use common::*;

const T: Duration = Duration::from_secs(30);

fn node_by_port(cluster: &PgCluster, port: u16) -> &PgNode {
    cluster
        .nodes()
        .iter()
        .find(|n| n.port() == port)
        .unwrap_or_else(|| panic!("no node on port {port}"))
}

/// Cluster of three, pglb, and a promoter built by `f`, steady on pg-0.
async fn setup(f: impl FnOnce(PromoterBuilder) -> PromoterBuilder) -> (PgCluster, Pglb, Promoter) {
    let cluster = failover_cluster(2);
    let lb = Pglb::start(&cluster).await;
    let promoter = f(PromoterBuilder::new()).start(&lb);
    promoter.wait_steady("pg-0", T).await;
    (cluster, lb, promoter)
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// `/status`'s `last_failover` after a kill -9 of pg-0 at `killed_unix`: when, why, from, to
/// and how long, consistent with each other and with the test's clock.
fn check_failover_record(s: &serde_json::Value, killed_unix: f64, to: &str) {
    let f = &s["last_failover"];
    assert_eq!(f["outcome"], "promoted", "{f}");
    assert_eq!(f["from"], "pg-0", "{f}");
    assert_eq!(f["to"], to, "{f}");
    let at = f["at_unix"].as_f64().expect("at_unix");
    assert!(
        killed_unix < at && at <= unix_now(),
        "at_unix {at} not between the kill ({killed_unix}) and now: {f}"
    );
    let reason = f["reason"].as_str().expect("reason");
    assert!(
        reason.contains("no primary for") && reason.contains("replicas lost it"),
        "{f}"
    );
    let failover_after = s["failover_after_seconds"].as_f64().unwrap();
    let detected = f["detected_after_seconds"]
        .as_f64()
        .expect("detected_after_seconds");
    let promote = f["promote_seconds"].as_f64().expect("promote_seconds");
    let total = f["total_seconds"].as_f64().expect("total_seconds");
    assert!(
        detected >= failover_after,
        "detected before failover_after: {f}"
    );
    assert!(promote > 0.0, "{f}");
    assert!((total - (detected + promote)).abs() < 1e-3, "{f}");
    // Counted from the primary's last answer, at most a look (200 ms) before the kill.
    assert!(
        total <= at - killed_unix + 1.0,
        "total_seconds {total} longer than kill -> record ({}s): {f}",
        at - killed_unix
    );
    assert!(f["timeline"].as_u64().is_some_and(|t| t >= 2), "{f}");
    assert!(f["error"].is_null(), "{f}");
}

/// The promoted node after a failover away from pg-0, from the promoter's status.
async fn wait_promoted(promoter: &Promoter) -> String {
    let s = promoter
        .wait_status(T, "a promotion", |s| {
            s["last_failover"]["outcome"] == "promoted"
        })
        .await;
    s["last_failover"]["to"]
        .as_str()
        .expect("promoted node name")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill9_of_the_primary_under_writes_fails_over() {
    let (cluster, lb, promoter) = setup(|b| b).await;
    let writer = Writer::start(lb.write, "w").await;
    writer.wait_count(20, T).await;

    let killed = Instant::now();
    let killed_unix = unix_now();
    kill9(cluster.node(0));
    let first = writer
        .wait_first_elsewhere(killed, cluster.node(0).port(), T)
        .await;
    let new = node_by_port(&cluster, first.port);
    eprintln!(
        "first write through pglb {:?} after kill -9, on {}",
        first.at - killed,
        new.name()
    );
    assert_eq!(wait_promoted(&promoter).await, new.name());
    assert!(!new.in_recovery());

    // The other replica follows the new primary and gets the new rows.
    let other = cluster
        .replicas()
        .iter()
        .find(|n| n.name() != new.name())
        .unwrap();
    wait_until(
        T,
        &format!("{} streaming from {}", other.name(), new.name()),
        || streams_to(new, other.name()),
    )
    .await;
    writer.wait_count(writer.count() + 20, T).await;
    let acks = writer.stop().await;
    let after: Vec<Ack> = acks.iter().filter(|a| a.at > first.at).copied().collect();
    assert!(
        after.iter().all(|a| a.port == new.port()),
        "after the failover every write goes to {}",
        new.name()
    );
    wait_until(
        T,
        "the other replica to have the rows written after the failover",
        || missing_rows(other, "w", &after).is_empty(),
    )
    .await;
    assert!(other.in_recovery());
    let s = promoter.wait_steady(new.name(), T).await;
    assert_eq!(s["failovers"], 1, "{s}");
    eprintln!("last failover: {}", s["last_failover"]);
    check_failover_record(&s, killed_unix, new.name());
    let m = promoter.metrics().expect("promoter /metrics");
    let failovers = |outcome| metric(&m, "pglb_promoter_failovers_total", &[("outcome", outcome)]);
    assert_eq!(failovers("promoted"), Some(1.0), "{m}");
    assert_eq!(
        m.lines()
            .filter(|l| l.starts_with("pglb_promoter_failovers_total{"))
            .count(),
        1,
        "only the promoted outcome: {m}"
    );
    let total = s["last_failover"]["total_seconds"].as_f64().unwrap();
    let gauge = metric(&m, "pglb_promoter_last_failover_seconds", &[]);
    assert!(
        gauge.is_some_and(|g| (g - total).abs() < 1e-3),
        "pglb_promoter_last_failover_seconds {gauge:?} vs total_seconds {total}: {m}"
    );
    for (decision, reason) in [("wait", "primary_gone"), ("failover", "none")] {
        assert!(
            metric(
                &m,
                "pglb_promoter_decisions_total",
                &[("decision", decision), ("reason", reason)]
            )
            .is_some_and(|n| n >= 1.0),
            "no {decision}/{reason} decision counted: {m}"
        );
    }
    assert_eq!(
        metric(&m, "pglb_promoter_primary_known", &[]),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "pglb_promoter_backend_reachable",
            &[("backend", "pg-0")]
        ),
        Some(0.0),
        "{m}"
    );
    let lost = missing_rows(new, "w", &acks).len();
    eprintln!(
        "async mode: {lost} acknowledged rows lost of {}",
        acks.len()
    );

    // pglb's stats page shows what the promoter did once it is told where the promoter is.
    std::fs::write(
        lb.config_path(),
        Pglb::builder(&cluster)
            .set(
                "stats",
                "promoter_url",
                format!("http://{}", promoter.status),
            )
            .render(lb.write, lb.read, lb.stats),
    )
    .unwrap();
    let want = format!("pg-0 → {} at ", new.name());
    wait_until(T, "pglb's page shows the promoter's last failover", || {
        http_get(lb.stats, "/").is_ok_and(|(code, page)| {
            code == 200 && page.contains("decision: steady") && page.contains(&want)
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_most_advanced_replica_is_promoted() {
    // pg-1 would win on priority; it is held back, so pg-2 must win on LSN.
    let (cluster, lb, promoter) = setup(|b| b.backend("pg-1", "priority", 200)).await;
    let (p0, p1, p2) = (cluster.node(0), cluster.node(1), cluster.node(2));
    p1.exec("ALTER SYSTEM SET primary_conninfo = ''");
    p1.exec("SELECT pg_reload_conf()");
    wait_until(T, "pg-1 detached", || !streams_to(p0, "pg-1")).await;
    let c = connect_ok(lb.write).await;
    c.batch_execute("CREATE TABLE held (id int); INSERT INTO held SELECT generate_series(1, 500)")
        .await
        .unwrap();
    drop(c);
    cluster.wait_replayed(2, T);
    // The promoter leaves an operator's detached replica alone while the primary lives.
    let s = promoter
        .wait_status(T, "pg-1 shown as not streaming", |s| {
            s["decision"] == "steady" && s["not_streaming"] == serde_json::json!(["pg-1"])
        })
        .await;
    assert_eq!(s["failovers"], 0);

    kill9(p0);
    assert_eq!(wait_promoted(&promoter).await, "pg-2");
    assert!(!p2.in_recovery());
    assert_eq!(p2.exec("SELECT count(*) FROM held"), "500");
    // pg-1 is re-pointed and catches up from pg-2.
    wait_until(T, "pg-1 streaming from pg-2", || streams_to(p2, "pg-1")).await;
    wait_until(T, "pg-1 to have the held-back rows", || {
        p1.try_exec("SELECT count(*) FROM held").as_deref() == Ok("500")
    })
    .await;
    let log = promoter.log_text();
    assert!(
        log.contains("most advanced eligible replica chosen"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn synchronous_mode_loses_no_acknowledged_commit() {
    let (cluster, lb, promoter) = setup(|b| b.set("synchronous", true)).await;
    let p0 = cluster.node(0);
    wait_until(T, "synchronous_standby_names on pg-0", || {
        p0.exec("SHOW synchronous_standby_names") == r#"ANY 1 ("pg-1", "pg-2")"#
    })
    .await;
    wait_until(T, "both standbys in the quorum", || {
        p0.exec("SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'quorum'") == "2"
    })
    .await;
    let writer = Writer::start(lb.write, "s").await;
    writer.wait_count(100, T).await;
    let killed = Instant::now();
    kill9(p0);
    let new_name = wait_promoted(&promoter).await;
    let new = cluster
        .nodes()
        .iter()
        .find(|n| n.name() == new_name)
        .unwrap();
    let first = writer.wait_first_elsewhere(killed, p0.port(), T).await;
    assert_eq!(first.port, new.port());
    eprintln!(
        "sync mode: first write {:?} after kill -9",
        first.at - killed
    );
    let acks = writer.stop().await;
    let before: Vec<Ack> = acks.iter().filter(|a| a.at <= killed).copied().collect();
    assert!(before.len() >= 100);
    let missing = missing_rows(new, "s", &acks);
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged commits lost: {missing:?}",
        missing.len(),
        acks.len()
    );
    assert_eq!(
        new.exec("SHOW synchronous_standby_names"),
        if new_name == "pg-1" {
            r#"ANY 1 ("pg-0", "pg-2")"#
        } else {
            r#"ANY 1 ("pg-0", "pg-1")"#
        }
    );
}

/// PIDs of the WAL senders on `primary`, from `pg_stat_replication`.
fn wal_sender_pids(primary: &PgNode) -> Vec<u32> {
    primary
        .exec("SELECT string_agg(pid::text, ',') FROM pg_stat_replication")
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| p.parse().expect("walsender pid"))
        .collect()
}

/// Freezes `primary` (every process of it) and checks that its WAL senders are stopped too, so
/// the replicas hear nothing from it. Returns when the freeze began.
fn freeze_whole_server(primary: &PgNode) -> Instant {
    let senders = wal_sender_pids(primary);
    assert_eq!(senders.len(), 2, "WAL senders on {}", primary.name());
    let at = Instant::now();
    primary.freeze();
    for pid in senders {
        assert_eq!(
            process_state(pid),
            Some('T'),
            "WAL sender {pid} of the frozen {} still runs",
            primary.name()
        );
    }
    at
}

/// The backend `name` in a promoter `/status` document.
fn status_node<'a>(s: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    s["nodes"]
        .as_array()
        .and_then(|ns| ns.iter().find(|n| n["name"] == name))
        .unwrap_or_else(|| panic!("no node {name} in {s}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_primary_frozen_shorter_than_failover_after_is_not_replaced() {
    let failover_after = Duration::from_secs(3);
    let (cluster, lb, promoter) = setup(|b| b.set("failover_after", "3s")).await;
    let p0 = cluster.node(0);
    let frozen_at = freeze_whole_server(p0);
    // The promoter must really see the primary gone (its probe times out) before the thaw.
    let seen = promoter
        .wait_status(
            failover_after,
            "the promoter to see the frozen primary not answering",
            |s| {
                s["decision"] == "wait"
                    && s["reason_kind"] == "primary_gone"
                    && s["primary"].is_null()
                    && s["primary_down_seconds"].as_f64().is_some_and(|d| d > 0.0)
                    && status_node(s, "pg-0")["role"] == "unreachable"
            },
        )
        .await;
    p0.thaw();
    let frozen_for = frozen_at.elapsed();
    eprintln!(
        "frozen for {frozen_for:?}; promoter saw: {} ({})",
        seen["reason"], seen["primary_down_seconds"]
    );
    assert!(
        frozen_for < failover_after,
        "the freeze ({frozen_for:?}) must be shorter than failover_after ({failover_after:?})"
    );

    // Past the point where a promoter ignoring failover_after would have promoted (freeze start
    // + failover_after + a look), nobody is promoted and the promoter is steady on pg-0 again.
    let window_end = frozen_at + failover_after + Duration::from_secs(3);
    let deadline = window_end + T;
    loop {
        let s = promoter.status().expect("promoter /status");
        assert_eq!(s["failovers"], 0, "{s}");
        assert!(s["last_failover"].is_null(), "{s}");
        assert_ne!(s["decision"], "failover", "{s}");
        let steady = s["decision"] == "steady" && s["primary"] == "pg-0";
        if steady && Instant::now() >= window_end {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "promoter not steady on pg-0 after the thaw: {s}"
        );
        tokio::time::sleep(POLL).await;
    }
    let m = promoter.metrics().expect("promoter /metrics");
    assert!(!m.contains("pglb_promoter_failovers_total"), "{m}");
    assert_eq!(
        metric(
            &m,
            "pglb_promoter_decisions_total",
            &[("decision", "failover"), ("reason", "none")]
        ),
        None,
        "a failover was decided: {m}"
    );
    assert!(
        metric(
            &m,
            "pglb_promoter_decisions_total",
            &[("decision", "wait"), ("reason", "primary_gone")]
        )
        .is_some_and(|n| n >= 1.0),
        "{m}"
    );
    let out_of_recovery: Vec<&str> = cluster
        .nodes()
        .iter()
        .filter(|n| !n.in_recovery())
        .map(|n| n.name())
        .collect();
    assert_eq!(out_of_recovery, ["pg-0"]);
    wait_until(T, "both replicas streaming from pg-0 again", || {
        streams_to(p0, "pg-1") && streams_to(p0, "pg-2")
    })
    .await;
    lb.wait_stats(T, "pglb primary pg-0", |s| {
        s.primary.as_deref() == Some("pg-0")
    })
    .await;
}

/// The counter-test of the one above: the same whole-server freeze held past failover_after
/// and the replicas' silence bound (wal_receiver_timeout / 2 + 1 s) does promote, so the test
/// above can fail. failover_after 2s (the harness default) keeps it short. The last "anyone
/// writable?" check waits for the hung old primary only what its silence still lacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_primary_frozen_longer_than_failover_after_is_replaced() {
    let failover_after = Duration::from_secs(2);
    let (cluster, _lb, promoter) = setup(|b| b).await;
    let p0 = cluster.node(0);
    let frozen_at = freeze_whole_server(p0);
    let new_name = wait_promoted(&promoter).await;
    let frozen_for = frozen_at.elapsed();
    p0.thaw();
    eprintln!("{new_name} promoted {frozen_for:?} into the freeze");
    assert!(frozen_for > failover_after, "promoted after {frozen_for:?}");
    let new = cluster
        .nodes()
        .iter()
        .find(|n| n.name() == new_name)
        .unwrap();
    assert!(!new.in_recovery());
    // The thawed old primary is writable on the old timeline: fenced.
    promoter
        .wait_status(T, "the thawed pg-0 fenced", |s| {
            s["fenced"] == serde_json::json!(["pg-0"]) && s["primary"] == new_name.as_str()
        })
        .await;
    assert_eq!(p0.exec("SHOW default_transaction_read_only"), "on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_promoter_cut_off_from_the_primary_alone_promotes_nobody() {
    let cluster = failover_cluster(2);
    let lb = Pglb::start(&cluster).await;
    let relay = Relay::start(cluster.node(0).addr()).await;
    let promoter = PromoterBuilder::new()
        .address("pg-0", relay.addr)
        .start(&lb);
    promoter.wait_steady("pg-0", T).await;

    relay.cut();
    // Well past failover_after, the promoter must still be holding back on the witnesses.
    let s = promoter
        .wait_status(T, "a wait on the witnesses past failover_after", |s| {
            s["decision"] == "wait"
                && s["reason_kind"] == "replicas_still_streaming"
                && s["primary_down_seconds"].as_f64().unwrap_or(0.0) > 4.0
        })
        .await;
    assert_eq!(s["failovers"], 0, "{s}");
    for r in cluster.replicas() {
        assert!(r.in_recovery(), "{} was promoted", r.name());
    }
    assert!(promoter.log_text().contains("failover on hold"));
    relay.heal();
    promoter.wait_steady("pg-0", T).await;
    assert_eq!(lb.stats().unwrap().primary.as_deref(), Some("pg-0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_old_primary_coming_back_is_fenced_and_rejoins() {
    let (cluster, lb, promoter) = setup(|b| b).await;
    let p0 = cluster.node(0);
    let c = connect_ok(lb.write).await;
    c.batch_execute("CREATE TABLE r (id int)").await.unwrap();
    drop(c);
    kill9(p0);
    let new_name = wait_promoted(&promoter).await;
    let new = cluster
        .nodes()
        .iter()
        .find(|n| n.name() == new_name)
        .unwrap();
    lb.wait_stats(T, "pglb routing writes to the new primary", |s| {
        s.primary.as_deref() == Some(new_name.as_str())
    })
    .await;

    restart_after_kill(p0);
    assert!(
        !p0.in_recovery(),
        "pg-0 restarts as a primary on the old timeline"
    );
    promoter
        .wait_status(T, "pg-0 fenced", |s| {
            s["fenced"] == serde_json::json!(["pg-0"])
        })
        .await;
    assert_eq!(p0.exec("SHOW default_transaction_read_only"), "on");
    lb.wait_stats(T, "pglb to fence pg-0", |s| {
        s.try_backend("pg-0").is_some_and(|b| b.role == "fenced")
    })
    .await;
    // Writes through pglb never reach it.
    for i in 0..20 {
        let c = connect_ok(lb.write).await;
        assert_eq!(backend_port(&c).await, new.port());
        c.batch_execute(&format!("INSERT INTO r VALUES ({i})"))
            .await
            .unwrap();
    }
    assert!(p0
        .try_exec("SELECT count(*) FROM r")
        .is_ok_and(|n| n == "0"));

    let out = rejoin(&promoter, p0).await;
    assert!(out.contains("\"started\":true"), "{out}");
    assert!(p0.in_recovery());
    assert!(streams_to(new, "pg-0"));
    wait_until(
        T,
        "pg-0 to have the rows written after the failover",
        || p0.try_exec("SELECT count(*) FROM r").as_deref() == Ok("20"),
    )
    .await;
    let s = promoter
        .wait_status(T, "steady, nothing fenced", |s| {
            s["decision"] == "steady" && s["fenced"] == serde_json::json!([])
        })
        .await;
    assert_eq!(s["primary"], new_name.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_promoter_restarted_right_after_promoting_promotes_nobody_else() {
    let (cluster, _lb, mut promoter) = setup(|b| b).await;
    kill9(cluster.node(0));
    promoter.wait_log(T, "promoted").await;
    promoter.kill9();
    promoter.restart();
    let promoted: Vec<&PgNode> = cluster
        .replicas()
        .iter()
        .filter(|n| !n.in_recovery())
        .collect();
    assert_eq!(promoted.len(), 1, "exactly one replica promoted");
    let new = promoted[0];
    let s = promoter.wait_steady(new.name(), T).await;
    assert_eq!(s["failovers"], 0, "the restarted promoter promoted: {s}");
    let other = cluster
        .replicas()
        .iter()
        .find(|n| n.name() != new.name())
        .unwrap();
    wait_until(T, "the other replica following the new primary", || {
        streams_to(new, other.name())
    })
    .await;
    assert!(other.in_recovery());
    assert!(!promoter.current_log().contains("failover done"));
    assert_eq!(
        cluster
            .replicas()
            .iter()
            .filter(|n| !n.in_recovery())
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn switchover_there_and_back_loses_no_row() {
    let (cluster, lb, promoter) = setup(|b| b).await;
    let (p0, p1, p2) = (cluster.node(0), cluster.node(1), cluster.node(2));
    let writer = Writer::start(lb.write, "sw").await;
    writer.wait_count(50, T).await;

    let r = switchover(&promoter, "pg-1").await;
    eprintln!("switchover to pg-1: {r}");
    assert_eq!(r["from"], "pg-0");
    assert!(r["pglb_switched_after_seconds"].as_f64().is_some(), "{r}");
    assert!(!p1.in_recovery());
    lb.wait_stats(T, "pglb primary pg-1", |s| {
        s.primary.as_deref() == Some("pg-1")
    })
    .await;
    wait_until(T, "pg-2 streaming from pg-1", || streams_to(p1, "pg-2")).await;
    rejoin(&promoter, p0).await;
    assert!(streams_to(p1, "pg-0"));
    writer.wait_count(writer.count() + 50, T).await;

    let r = switchover(&promoter, "pg-0").await;
    eprintln!("switchover back to pg-0: {r}");
    assert!(!p0.in_recovery());
    lb.wait_stats(T, "pglb primary pg-0", |s| {
        s.primary.as_deref() == Some("pg-0")
    })
    .await;
    rejoin(&promoter, p1).await;
    wait_until(T, "both replicas streaming from pg-0", || {
        streams_to(p0, "pg-1") && streams_to(p0, "pg-2")
    })
    .await;
    writer.wait_count(writer.count() + 50, T).await;
    let acks = writer.stop().await;
    let missing = missing_rows(p0, "sw", &acks);
    assert!(missing.is_empty(), "lost {missing:?} of {}", acks.len());
    for r in [p1, p2] {
        wait_until(T, &format!("{} to have every row", r.name()), || {
            r.try_exec("SELECT count(*) FROM sw").ok()
                == p0.try_exec("SELECT count(*) FROM sw").ok()
        })
        .await;
    }
    let s = promoter.wait_steady("pg-0", T).await;
    assert_eq!(s["failovers"], 0, "a switchover is not a failover: {s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_promoter_follows_config_reloads_and_refuses_bad_ones() {
    let (_cluster, _lb, promoter) = setup(|b| b).await;
    let path = promoter.config_path().to_path_buf();
    let good = std::fs::read_to_string(&path).unwrap();
    assert!(good.contains("failover_after = \"2s\""), "{good}");
    std::fs::write(
        &path,
        good.replace("failover_after = \"2s\"", "failover_after = \"7s\""),
    )
    .unwrap();
    promoter
        .wait_status(T, "failover_after 7s applied", |s| {
            s["failover_after_seconds"] == 7.0 && s["reload"]["result"] == "applied"
        })
        .await;
    std::fs::write(
        &path,
        good.replace("failover_after = \"2s\"", "failover_after = \"soon\""),
    )
    .unwrap();
    let s = promoter
        .wait_status(T, "the bad edit refused", |s| {
            s["reload"]["result"] == "rejected"
        })
        .await;
    let error = s["reload"]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("failover_after"),
        "the refusal names the key: {s}"
    );
    assert_eq!(s["reload"]["rejected"], 1, "{s}");
    assert_eq!(s["failover_after_seconds"], 7.0, "{s}");
    assert_eq!(s["decision"], "steady");
}
