//! Limits: listener maxconn, backend maxconn with a queue, idle timeouts, and read credentials on
//! the stats listener.

mod common;

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
    http(addr, "GET", path, auth)
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
        .0
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

/// pglb's CPU time (user + system, all threads) in seconds, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc stat");
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// Out of file descriptors: `accept` fails (EMFILE); pglb logs it once per burst, counts it, backs
/// off instead of spinning, and serves again by itself once descriptors are free.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn running_out_of_descriptors_backs_off_and_recovers() {
    let cluster = PgCluster::start(0);
    let mut lb = Pglb::builder(&cluster).nofile(48).start();
    lb.wait_ready().await;

    // Each session holds two descriptors in pglb: open sessions until one cannot be had.
    let mut held = Vec::new();
    let exhausted = loop {
        assert!(
            held.len() < 40,
            "48 descriptors held 40 sessions: the limit did not apply"
        );
        match tokio::time::timeout(Duration::from_secs(3), connect(lb.write)).await {
            Ok(Ok(c)) => held.push(c),
            Ok(Err(e)) => break format!("{e}"),
            Err(_) => break "no answer within 3 s".to_string(),
        }
    };
    assert!(
        held.len() >= 5,
        "only {} sessions before: {exhausted}",
        held.len()
    );
    lb.wait_log(Duration::from_secs(10), "accept failed; backing off")
        .await;
    // While descriptors stay exhausted: no busy loop, and the error logged once per burst.
    let cpu0 = cpu_seconds(lb.pid());
    let wall = Instant::now();
    let mut waiting = Vec::new();
    for _ in 0..4 {
        // clients queued in the kernel's backlog keep accept failing
        waiting.push(TcpStream::connect(lb.write).expect("tcp connect to the write port"));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu = cpu_seconds(lb.pid()) - cpu0;
    let secs = wall.elapsed().as_secs_f64();
    assert!(
        cpu < 0.25 * secs,
        "pglb used {cpu:.2} s of CPU in {secs:.1} s while out of descriptors: a busy loop"
    );
    let logged = lb.log_text().matches("accept failed; backing off").count();
    eprintln!(
        "{} sessions held, then: {exhausted}; {cpu:.2} s CPU in {secs:.1} s; logged {logged}x",
        held.len()
    );
    assert!(
        logged <= 2,
        "the accept error was logged {logged} times in one burst"
    );
    // A health check that cannot open its socket is pglb's shortage, not the primary's failure:
    // the primary stays up and no held session is cut.
    let text = lb.log_text();
    assert!(
        !text.contains("backend down") && !text.contains("closing session"),
        "the primary was marked down or sessions cut while pglb was out of descriptors:\n{text}"
    );

    // Descriptors back: new sessions work again without any help.
    drop(waiting);
    drop(held);
    wait_until_async(
        Duration::from_secs(15),
        "a session through the write port",
        || async {
            match tokio::time::timeout(Duration::from_secs(2), connect(lb.write)).await {
                Ok(Ok(c)) => scalar(&c, "SELECT 1").await.is_ok(),
                _ => false,
            }
        },
    )
    .await;
    assert!(lb.try_exit_status().is_none(), "pglb exited");
    let (_, text) = http_get(lb.stats, "/metrics").expect("metrics");
    let errors: f64 = text
        .lines()
        .filter(|l| l.starts_with("pglb_accept_errors_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(errors > 0.0, "no pglb_accept_errors_total:\n{text}");
}
