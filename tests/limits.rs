//! Limits: listener maxconn, backend maxconn with a queue, idle timeouts, and read credentials on
//! the stats listener.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

fn sqlstate_of(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.code().code().to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn listener_maxconn_refuses_with_too_many_connections_then_recovers() {
    let cluster = PgCluster::start(0);
    let lb = Pglb::builder(&cluster).set("proxy", "maxconn", 2).start();
    lb.wait_ready().await;
    let a = connect_ok(lb.write).await;
    let _b = connect_ok(lb.write).await;

    let Err(e) = connect(lb.write).await else {
        panic!("third session was not refused")
    };
    assert_eq!(sqlstate_of(&e), "53300", "{e:?}");
    let msg = expect_pglb_fatal(lb.write).await;
    assert!(
        msg.contains("too many connections") && msg.contains("maxconn (2)"),
        "{msg}"
    );
    // The read port has its own limit.
    scalar_ok(&connect_ok(lb.read).await, "SELECT 1").await;

    drop(a);
    wait_until_async(Duration::from_secs(5), "a slot to free up", || async {
        connect(lb.write).await.is_ok()
    })
    .await;
    lb.wait_log(Duration::from_secs(2), "listener at maxconn")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backend_maxconn_queues_then_refuses_after_queue_timeout() {
    let cluster = PgCluster::start(0);
    let lb = Pglb::builder(&cluster)
        .set("proxy", "backend_maxconn", 1)
        .set("proxy", "queue_timeout", "1500ms")
        .start();
    lb.wait_ready().await;

    // A waits in the queue while the only slot is taken, and gets it when the holder leaves.
    let holder = connect_ok(lb.write).await;
    let write = lb.write;
    let queued = tokio::spawn(async move {
        let started = Instant::now();
        let c = connect(write).await;
        (c, started.elapsed())
    });
    lb.wait_log(Duration::from_secs(5), "session queued").await;
    drop(holder);
    let (c, waited) = queued.await.unwrap();
    let c = c.expect("queued session gets the freed slot");
    scalar_ok(&c, "SELECT 1").await;
    assert!(waited < Duration::from_millis(1500), "waited {waited:?}");

    // With the slot held for good, the next one is refused after queue_timeout.
    let started = Instant::now();
    let Err(e) = connect(lb.write).await else {
        panic!("not refused after the queue timeout")
    };
    let waited = started.elapsed();
    assert_eq!(sqlstate_of(&e), "53300", "{e:?}");
    let msg = e.as_db_error().unwrap().message().to_string();
    assert!(msg.contains("maxconn (1)") && msg.contains("pg-0"), "{msg}");
    assert!(
        waited >= Duration::from_millis(1400),
        "refused too early: {waited:?}"
    );
    scalar_ok(&c, "SELECT 1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_timeout_closes_only_quiet_sessions_on_its_port() {
    let cluster = PgCluster::start(0);
    let lb = Pglb::builder(&cluster)
        .set("proxy", "read_idle_timeout", "1s")
        .start();
    lb.wait_ready().await;
    let quiet_read = connect_ok(lb.read).await;
    let busy_read = connect_ok(lb.read).await;
    let quiet_write = connect_ok(lb.write).await;
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        scalar_ok(&busy_read, "SELECT 1").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        scalar(&quiet_read, "SELECT 1").await.is_err(),
        "idle read session survived"
    );
    scalar_ok(&busy_read, "SELECT 1").await;
    scalar_ok(&quiet_write, "SELECT 1").await;
    lb.wait_log(Duration::from_secs(2), "idle_timeout").await;
}

fn get(addr: std::net::SocketAddr, path: &str, auth: Option<&str>) -> u16 {
    let mut s = TcpStream::connect(addr).unwrap();
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stats_can_require_credentials_for_reading() {
    let cluster = PgCluster::start(0);
    let lb = Pglb::builder(&cluster)
        .set("stats", "read_user", "ops")
        .set("stats", "read_password_env", "PGLB_STATS_PASSWORD")
        .set("stats", "read_token_env", "PGLB_STATS_TOKEN")
        .env("PGLB_STATS_PASSWORD", "stats-pw-81")
        .env("PGLB_STATS_TOKEN", "stats-token-92")
        .start();
    // /health stays open for orchestrators.
    lb.wait_ready().await;
    for path in ["/", "/stats.json", "/metrics"] {
        assert_eq!(get(lb.stats, path, None), 401, "{path} without credentials");
        assert_eq!(
            get(lb.stats, path, Some("Basic b3BzOndyb25n")),
            401,
            "{path} wrong password"
        );
        // ops:stats-pw-81
        assert_eq!(
            get(lb.stats, path, Some("Basic b3BzOnN0YXRzLXB3LTgx")),
            200,
            "{path} basic"
        );
        assert_eq!(
            get(lb.stats, path, Some("Bearer stats-token-92")),
            200,
            "{path} bearer"
        );
    }
    assert_eq!(get(lb.stats, "/health", None), 200);
    let log = lb.log_text();
    assert!(!log.contains("stats-pw-81") && !log.contains("stats-token-92"));
}
