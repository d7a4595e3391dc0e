//! A replica promoted while the old primary still runs, and health checks that cannot log in.

mod common;

use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn promoted_replica_takes_writes_and_old_primary_is_fenced() {
    let cluster = PgCluster::start(1);
    let lb = Pglb::start(&cluster).await;
    let (old, new) = (cluster.node(0), cluster.node(1));
    let s = lb
        .wait_stats(T, "pg-0 primary, pg-1 replica", |s| {
            s.primary.as_deref() == Some("pg-0")
                && s.try_backend("pg-1").is_some_and(|b| b.role == "replica")
        })
        .await;
    assert_eq!(s.backend("pg-0").role, "primary", "{}", s.raw);

    // An open write session on the old primary.
    let open = connect_ok(lb.write).await;
    assert_eq!(backend_port(&open).await, old.port());

    new.promote();
    let promoted_at = Instant::now();
    assert!(
        old.is_running() && !old.in_recovery(),
        "the old primary must still run as a primary"
    );

    let s = lb
        .wait_stats(T, "pg-1 primary and pg-0 fenced", |s| {
            s.primary.as_deref() == Some("pg-1")
                && s.try_backend("pg-0").is_some_and(|b| b.role == "fenced")
                && s.try_backend("pg-1").is_some_and(|b| b.role == "primary")
        })
        .await;
    if let (Some(t_old), Some(t_new)) = (s.backend("pg-0").timeline, s.backend("pg-1").timeline) {
        assert!(
            t_new > t_old,
            "the promoted backend should be on the higher timeline: {}",
            s.raw
        );
    }
    assert_eq!(
        s.backend("pg-1").timeline,
        Some(new.timeline()),
        "{}",
        s.raw
    );

    // pglb closes the write session that is still attached to the old primary.
    wait_until_async(
        Duration::from_secs(5),
        "the write session on the old primary to be closed by pglb",
        || async { open.is_closed() || scalar(&open, "SELECT 1").await.is_err() },
    )
    .await;
    eprintln!(
        "old write session closed {:?} after promotion",
        promoted_at.elapsed()
    );

    // New write sessions go to the promoted server and can write.
    for _ in 0..3 {
        let w = connect_ok(lb.write).await;
        assert_eq!(
            backend_port(&w).await,
            new.port(),
            "new write session not on the promoted pg-1"
        );
        assert!(!in_recovery(&w).await);
    }
    let w = connect_ok(lb.write).await;
    w.batch_execute(
        "CREATE TABLE after_promotion (id int); INSERT INTO after_promotion VALUES (1)",
    )
    .await
    .expect("write on the promoted primary");
    assert!(
        old.try_exec("SELECT 1 FROM after_promotion").is_err(),
        "the write reached the old primary"
    );

    // The fenced server gets no sessions through either port.
    for addr in [lb.write, lb.read] {
        if let Ok(c) = connect(addr).await {
            assert_ne!(
                backend_port(&c).await,
                old.port(),
                "a session landed on the fenced pg-0 via {addr}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_check_password_marks_backends_down() {
    let cluster = PgCluster::start(1);
    let lb = Pglb::builder(&cluster)
        .check_password("definitely-not-the-password")
        .start();

    let s = lb
        .wait_stats(T, "every backend down with an authentication error", |s| {
            s.backends.len() == 2
                && s.backends.iter().all(|b| {
                    b.state == "down"
                        && b.last_error
                            .as_deref()
                            .is_some_and(|e| e.contains("authentication failed"))
                })
        })
        .await;
    assert!(
        s.primary.is_none(),
        "no primary can be known without a successful check: {}",
        s.raw
    );
    lb.wait_log(T, "authentication failed").await;
    assert!(
        !lb.log_contains("definitely-not-the-password"),
        "pglb logged the check password"
    );
    assert_ne!(
        lb.health_status(),
        Ok(200),
        "/health must not be 200 without a known primary"
    );

    expect_pglb_fatal(lb.write).await;
}
