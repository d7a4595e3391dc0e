//! Worker threads and the listening sockets they share:
//!
//! - `[proxy] threads` starts that many worker threads, sessions run on them on both ports, and a
//!   reload that changes the count is reported and leaves the running threads alone;
//! - two pglb processes on the same ports (`SO_REUSEPORT`, the binary-upgrade procedure in
//!   docs/operations.md) both serve, and when the first one is stopped the port goes on serving.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(20);

/// Names of the process's threads that carry sessions.
fn worker_threads(pid: u32) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
                .map(|c| c.trim().to_string())
                .filter(|c| c.starts_with("pglb-worker-"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Opens `n` sessions at once through `addr`, runs a few queries on each, returns the sessions.
async fn sessions_through(addr: SocketAddr, n: usize) -> Vec<tokio_postgres::Client> {
    let opened = futures_util::future::join_all((0..n).map(|_| async move {
        let c = connect_ok(addr).await;
        for i in 0..5 {
            assert_eq!(scalar_ok(&c, &format!("SELECT {i}")).await, i.to_string());
        }
        c
    }))
    .await;
    assert_eq!(opened.len(), n);
    opened
}

fn sessions_active(stats: &Stats) -> i64 {
    stats
        .backends
        .iter()
        .map(|b| b.sessions_active as i64)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_run_on_the_configured_threads_and_a_reload_keeps_the_count() {
    let cluster = PgCluster::start(1);
    let lb = Pglb::builder(&cluster).set("proxy", "threads", 3).start();
    lb.wait_ready().await;
    assert_eq!(
        worker_threads(lb.pid()),
        ["pglb-worker-0", "pglb-worker-1", "pglb-worker-2"]
    );

    let writers = sessions_through(lb.write, 12).await;
    let readers = sessions_through(lb.read, 12).await;
    lb.wait_stats(T, "24 sessions active", |s| sessions_active(s) == 24)
        .await;

    // Fewer threads asked for in a reload: reported, and the running three stay.
    let text = std::fs::read_to_string(lb.config_path()).unwrap();
    assert!(text.contains("threads = 3"), "{text}");
    let rewritten = text.replace("threads = 3", "threads = 1");
    let tmp = lb.config_path().with_extension("tmp");
    std::fs::write(&tmp, rewritten).unwrap();
    std::fs::rename(&tmp, lb.config_path()).unwrap();
    lb.wait_log(T, "proxy.threads changes need a restart").await;
    assert_eq!(worker_threads(lb.pid()).len(), 3);

    // Every session opened before the reload still answers, and new ones open.
    for c in writers.iter().chain(readers.iter()) {
        assert_eq!(scalar_ok(c, "SELECT 'still'").await, "still");
    }
    let more = sessions_through(lb.write, 4).await;
    drop((writers, readers, more));
    lb.wait_stats(T, "no session left", |s| sessions_active(s) == 0)
        .await;
}

/// A second pglb on `write` and `read` (ports another pglb listens on), its own stats port.
fn second_pglb(
    cluster: &PgCluster,
    dir: &tempfile::TempDir,
    write: SocketAddr,
    read: SocketAddr,
) -> SpawnedPglb {
    let stats = free_addr();
    let config = dir.path().join("lb.toml");
    std::fs::write(&config, Pglb::builder(cluster).render(write, read, stats)).unwrap();
    SpawnedPglb::spawn(&config, stats, dir.path().join("pglb.log"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_pglb_on_the_same_ports_shares_them_and_serves_alone_once_the_first_stops() {
    let cluster = PgCluster::start(1);
    let mut first = Pglb::start(&cluster).await;
    let dir = tempfile::tempdir().unwrap();
    let second = second_pglb(&cluster, &dir, first.write, first.read);
    wait_until(T, "second pglb knows the primary", || {
        second.stats().is_some_and(|s| s.primary.is_some())
    })
    .await;

    // The kernel spreads new connections over all four listening sockets of the write port.
    let held = sessions_through(first.write, 16).await;
    let mut split = (0, 0);
    wait_until(T, "16 sessions over both processes", || {
        let a = first.stats().map(|s| sessions_active(&s)).unwrap_or(-1);
        let b = second.stats().map(|s| sessions_active(&s)).unwrap_or(-1);
        split = (a, b);
        a + b == 16
    })
    .await;
    assert!(
        split.0 > 0 && split.1 > 0,
        "both processes serve the shared port: {split:?}"
    );
    drop(held);
    wait_until(T, "sessions closed", || {
        first.stats().is_ok_and(|s| sessions_active(&s) == 0)
            && second.stats().is_some_and(|s| sessions_active(&s) == 0)
    })
    .await;

    // The first one stops; the port keeps serving through the second.
    first.signal(libc::SIGTERM);
    let status = first.wait_exit(T).await.expect("first pglb exits");
    assert!(status.success(), "{status:?}");
    let after = sessions_through(first.write, 8).await;
    let reads = sessions_through(first.read, 8).await;
    let s = second.stats().expect("second pglb's stats");
    assert_eq!(sessions_active(&s), 16, "{}", s.raw);
    drop((after, reads));
}

/// docs/operations.md's binary upgrade exactly as written: a new pglb started with the *same*
/// lb.toml (the same stats port too) joins the running one, the old one gets SIGTERM, and the
/// session ports and the stats page go on through the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_documented_upgrade_with_the_same_lb_toml_works() {
    let cluster = PgCluster::start(1);
    let mut old = Pglb::start(&cluster).await;
    let dir = tempfile::tempdir().unwrap();
    let new = SpawnedPglb::spawn(old.config_path(), old.stats, dir.path().join("pglb.log"));
    wait_until(T, "the new pglb bound every port and started", || {
        new.log_text().contains("pglb started")
    })
    .await;

    old.signal(libc::SIGTERM);
    let status = old.wait_exit(T).await.expect("the old pglb exits");
    assert!(status.success(), "{status:?}");

    // The stats address now answers from the new process alone, and so do both session ports.
    let s = new
        .wait_stats(T, "the stats port served by the new pglb", |s| {
            s.primary.is_some()
        })
        .await;
    assert_eq!(s.primary.as_deref(), Some("pg-0"), "{}", s.raw);
    let writes = sessions_through(old.write, 4).await;
    let reads = sessions_through(old.read, 4).await;
    assert_eq!(writes.len() + reads.len(), 8);
    assert!(
        !new.log_text().contains("Address already in use"),
        "{}",
        new.log_text()
    );
}
