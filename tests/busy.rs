//! A busy or full primary is still the primary: failed checks alone cut no session, a full server
//! is checked through the kept check connection and shown "full", new sessions wait for a
//! backend during a failover instead of failing, and a changed password or `pg_hba.conf` is
//! still noticed at the next re-login.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::promoter::metric;
use common::*;
use pglb::view::Condition;
use tokio_postgres::error::SqlState;

const T: Duration = Duration::from_secs(20);

fn metrics(lb: &Pglb) -> String {
    http_get(lb.stats, "/metrics").expect("GET /metrics").1
}

/// Every write session pglb closed, for any reason.
fn sessions_cut(lb: &Pglb) -> f64 {
    let text = metrics(lb);
    pglb::metrics::CUT_REASONS
        .iter()
        .map(|r| {
            metric(
                &text,
                "pglb_sessions_cut_total",
                &[("port", "write"), ("reason", r)],
            )
            .unwrap_or(0.0)
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_primary_keeps_every_session_and_new_logins_get_its_own_53300() {
    let cluster = PgCluster::start(0);
    let primary = cluster.primary();
    // 20 slots, 3 of them reserved for superusers: 17 for pglb's check and the app.
    primary.exec("ALTER SYSTEM SET max_connections = 20");
    primary.stop();
    primary.start();
    let lb = Pglb::builder(&cluster)
        .set("check", "interval", "200ms")
        .set("check", "relogin", "1s")
        .start();
    lb.wait_ready().await;

    let mut held = Vec::new();
    let refused = loop {
        match connect(lb.write).await {
            Ok(c) => {
                assert_eq!(scalar_ok(&c, "SELECT 1").await, "1");
                held.push(c);
                assert!(held.len() < 40, "the server never got full");
            }
            Err(e) => break e,
        }
    };
    assert!(
        held.len() >= 10,
        "only {} sessions before the server was full",
        held.len()
    );
    assert_eq!(
        refused.code(),
        Some(&SqlState::TOO_MANY_CONNECTIONS),
        "a new login on a full primary should get PostgreSQL's own 53300: {refused:?}"
    );

    // The check's re-login is refused, its kept connection still answers: full, not down.
    let s = lb
        .wait_stats(T, "pg-0 shown full", |s| {
            s.try_backend("pg-0")
                .is_some_and(|b| b.condition == Condition::Full)
        })
        .await;
    assert_eq!(s.primary.as_deref(), Some("pg-0"), "{}", s.raw);
    assert_eq!(s.backend("pg-0").state, "up", "{}", s.raw);

    // Over many check intervals every session that got in keeps working; pglb cuts none.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        for c in &held {
            assert_eq!(scalar_ok(c, "SELECT 1").await, "1", "a held session broke");
        }
        let s = lb.stats().expect("stats");
        assert_eq!(
            s.primary.as_deref(),
            Some("pg-0"),
            "primary lost while full: {}",
            s.raw
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        sessions_cut(&lb),
        0.0,
        "pglb cut sessions of a full primary"
    );
    let refused_logins = metric(
        &metrics(&lb),
        "pglb_check_logins_refused_total",
        &[("backend", "pg-0"), ("reason", "full")],
    );
    assert!(
        refused_logins.is_some_and(|n| n >= 1.0),
        "refused check logins not counted"
    );

    // Room again: the next re-login works and the condition clears.
    held.truncate(held.len() - 5);
    lb.wait_stats(T, "pg-0 ok again", |s| {
        s.try_backend("pg-0")
            .is_some_and(|b| b.condition == Condition::Ok)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_primary_frozen_past_its_check_timeouts_loses_no_session() {
    let cluster = PgCluster::start(1);
    let lb = Pglb::builder(&cluster)
        .set("check", "interval", "200ms")
        .set("check", "timeout", "300ms")
        .set("check", "fall", 2)
        .start();
    lb.wait_ready().await;
    pgbench_init(lb.write);
    let held = connect_ok(lb.write).await;

    let bench = Command::new("pgbench")
        .args(["-h", "127.0.0.1", "-p", &lb.write.port().to_string()])
        .args(["-U", APP_USER, "-n", "-c", "4", "-T", "8", DATABASE])
        .env("PGPASSWORD", APP_PASSWORD)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start pgbench");
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Frozen long enough for its checks to time out `fall` times: pglb marks it down...
    cluster.primary().freeze();
    lb.wait_stats(T, "pg-0 down while frozen", |s| {
        s.try_backend("pg-0").is_some_and(|b| b.state == "down")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    cluster.primary().thaw();

    // ... and every session, pgbench's four and ours, survives it.
    let out = tokio::task::spawn_blocking(move || bench.wait_with_output())
        .await
        .expect("join")
        .expect("pgbench output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("aborted") && !stdout.contains("aborted in"),
        "pgbench clients were aborted across the freeze:\n{stdout}\n{stderr}"
    );
    assert_eq!(
        scalar_ok(&held, "SELECT 1").await,
        "1",
        "the held session broke"
    );
    assert_eq!(
        sessions_cut(&lb),
        0.0,
        "pglb cut sessions of a frozen primary"
    );
    lb.wait_stats(T, "pg-0 primary again", |s| {
        s.primary.as_deref() == Some("pg-0")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_connecting_during_a_failover_waits_for_the_new_primary() {
    let cluster = PgCluster::start(1);
    let lb = Pglb::builder(&cluster)
        .set("check", "interval", "200ms")
        .set("check", "timeout", "500ms")
        .set("proxy", "wait_for_backend", "30s")
        .start();
    lb.wait_ready().await;
    cluster.primary().kill();
    lb.wait_stats(T, "no primary", |s| s.primary.is_none())
        .await;

    // A new client now waits instead of getting a FATAL.
    let write = lb.write;
    let pending = tokio::spawn(async move { connect(write).await });
    wait_until(T, "the client counted as waiting", || {
        metric(&metrics(&lb), "pglb_sessions_waiting", &[("port", "write")]) == Some(1.0)
    })
    .await;
    assert!(
        !pending.is_finished(),
        "the client did not wait for a primary"
    );

    cluster.node(1).promote();
    let client = tokio::time::timeout(T, pending)
        .await
        .expect("the waiting client was not connected after the promotion")
        .expect("join")
        .expect("the waiting client got an error instead of the new primary");
    assert_eq!(backend_port(&client).await, cluster.node(1).port());
    client
        .batch_execute("CREATE TABLE after_failover (id int)")
        .await
        .expect("a write on the new primary");
    assert_eq!(
        metric(&metrics(&lb), "pglb_sessions_waiting", &[("port", "write")]),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_connecting_to_a_hung_primary_is_routed_to_the_one_that_replaces_it() {
    let cluster = PgCluster::start(1);
    // Slow checks keep the frozen pg-0 the primary for a while, and a long connect_timeout
    // would keep the client waiting on it far beyond this test's deadline.
    let lb = Pglb::builder(&cluster)
        .set("check", "interval", "200ms")
        .set("check", "timeout", "20s")
        .set("proxy", "connect_timeout", "60s")
        .set("proxy", "wait_for_backend", "30s")
        .start();
    lb.wait_ready().await;
    cluster.primary().freeze();

    // The client's connection goes to the hung primary, which never answers its startup.
    let write = lb.write;
    let pending = tokio::spawn(async move { connect(write).await });
    lb.wait_stats(T, "a write session connecting to pg-0", |s| {
        s.try_backend("pg-0")
            .is_some_and(|b| b.write.sessions_active == 1)
    })
    .await;
    assert!(!pending.is_finished(), "the hung primary answered");

    // Replaced: the client is routed again at once, not after connect_timeout.
    cluster.node(1).promote();
    let client = tokio::time::timeout(T, pending)
        .await
        .expect("the client was still waiting on the hung primary after the promotion")
        .expect("join")
        .expect("the client got an error instead of the new primary");
    assert_eq!(backend_port(&client).await, cluster.node(1).port());
    client
        .batch_execute("CREATE TABLE after_the_hung_primary (id int)")
        .await
        .expect("a write on the new primary");
    cluster.primary().thaw();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_gets_the_fatal_after_wait_for_backend() {
    let cluster = PgCluster::start(1);
    let lb = Pglb::builder(&cluster)
        .set("check", "interval", "200ms")
        .set("proxy", "wait_for_backend", "1s")
        .start();
    lb.wait_ready().await;
    cluster.primary().kill();
    lb.wait_stats(T, "no primary", |s| s.primary.is_none())
        .await;
    let started = Instant::now();
    let err = connect(lb.write)
        .await
        .expect_err("a write session without a primary succeeded");
    let waited = started.elapsed();
    let msg = err
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert!(msg.contains("no primary is available"), "{err:?}");
    assert!(
        waited >= Duration::from_millis(900),
        "refused after {waited:?}, before wait_for_backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_check_password_and_pg_hba_are_noticed_at_the_next_relogin() {
    let cluster = PgCluster::start(0);
    let lb = Pglb::builder(&cluster)
        .set("check", "interval", "200ms")
        .set("check", "relogin", "1s")
        .start();
    lb.wait_ready().await;
    let held = connect_ok(lb.write).await;

    cluster
        .primary()
        .exec("ALTER ROLE pglb_check PASSWORD 'not-what-pglb-has'");
    let s = lb
        .wait_stats(T, "the refused login shown", |s| {
            s.try_backend("pg-0").is_some_and(|b| {
                b.condition == Condition::LoginRefused
                    && b.login_error
                        .as_deref()
                        .is_some_and(|e| e.contains("authentication failed"))
            })
        })
        .await;
    // Still up and primary through the kept connection; the session goes on.
    assert_eq!(s.primary.as_deref(), Some("pg-0"), "{}", s.raw);
    assert_eq!(scalar_ok(&held, "SELECT 1").await, "1");

    cluster.primary().exec(&format!(
        "ALTER ROLE pglb_check PASSWORD '{CHECK_PASSWORD}'"
    ));
    lb.wait_stats(T, "logins work again", |s| {
        s.try_backend("pg-0")
            .is_some_and(|b| b.condition == Condition::Ok)
    })
    .await;

    // pg_hba.conf stops allowing the check user.
    let hba = cluster.primary().data_dir().join("pg_hba.conf");
    let text = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
    std::fs::write(
        &hba,
        format!("host all pglb_check 127.0.0.1/32 reject\n{text}"),
    )
    .expect("write pg_hba.conf");
    cluster.primary().exec("SELECT pg_reload_conf()");
    lb.wait_stats(T, "the pg_hba refusal shown", |s| {
        s.try_backend("pg-0")
            .is_some_and(|b| b.condition == Condition::LoginRefused)
    })
    .await;
    assert_eq!(scalar_ok(&held, "SELECT 1").await, "1");
}
