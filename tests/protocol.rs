//! Wire-protocol paths through pglb: CancelRequest, SSLRequest pass-through, and bad first packets.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::NoTls;

use common::*;

const T: Duration = Duration::from_secs(10);

/// Runs `SELECT pg_sleep(30)` through `addr`, cancels it from the client side once the
/// backend `node` shows it running, and checks it ends with 57014 within 2 s.
async fn cancel_through(addr: SocketAddr, node: &PgNode) {
    let client = connect_ok(addr).await;
    assert_eq!(
        backend_port(&client).await,
        node.port(),
        "session through {addr} on the wrong backend"
    );
    let token = client.cancel_token();
    let pid: i32 = scalar_ok(&client, "SELECT pg_backend_pid()")
        .await
        .parse()
        .unwrap();

    let query = tokio::spawn(async move {
        let r = client.simple_query("SELECT pg_sleep(30)").await.map(|_| ());
        (client, r)
    });
    wait_until(T, "pg_sleep(30) to be running on the backend", || {
        node.try_exec(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = {pid} AND state = 'active' AND query = 'SELECT pg_sleep(30)'"
        ))
        .is_ok_and(|n| n == "1")
    })
    .await;

    let started = Instant::now();
    token
        .cancel_query(NoTls)
        .await
        .expect("send CancelRequest through pglb");
    let (client, result) = tokio::time::timeout(Duration::from_secs(2), query)
        .await
        .expect("the query was not cancelled within 2 s")
        .unwrap();
    let err = result.expect_err("pg_sleep(30) finished without error");
    assert_eq!(
        sqlstate(&err),
        Some("57014"),
        "expected query_canceled, got {err:?}"
    );
    eprintln!("cancel through {addr} took {:?}", started.elapsed());
    // The session stays usable.
    assert_eq!(scalar_ok(&client, "SELECT 1").await, "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_cancel_works_through_both_ports() {
    let cluster = PgCluster::start(1);
    let lb = Pglb::start(&cluster).await;
    lb.wait_stats(T, "pg-1 read-eligible", |s| {
        s.try_backend("pg-1").is_some_and(|b| b.read_eligible)
    })
    .await;
    cancel_through(lb.read, cluster.node(1)).await;
    cancel_through(lb.write, cluster.node(0)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_sessions_pass_through_to_backends() {
    let cluster = PgCluster::start(1);
    let lb = Pglb::start(&cluster).await;
    lb.wait_stats(T, "pg-1 read-eligible", |s| {
        s.try_backend("pg-1").is_some_and(|b| b.read_eligible)
    })
    .await;
    let sql = "SELECT ssl, pg_is_in_recovery(), current_setting('port') FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

    let (write, read) = tokio::task::spawn_blocking({
        let (w, r) = (lb.write, lb.read);
        move || (psql_tcp(w, "require", sql), psql_tcp(r, "require", sql))
    })
    .await
    .unwrap();
    assert_eq!(
        write.expect("psql sslmode=require through the write port"),
        format!("t|f|{}", cluster.node(0).port())
    );
    assert_eq!(
        read.expect("psql sslmode=require through the read port"),
        format!("t|t|{}", cluster.node(1).port())
    );
}

/// Deterministic pseudo-random bytes.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as u8
        })
        .collect()
}

/// Bytes of a first packet whose length is plausible but whose protocol code is garbage.
fn random_packet() -> Vec<u8> {
    let mut p = Vec::from(64u32.to_be_bytes());
    // Not 196608 (v3), 80877102 (cancel), 80877103 (SSL) or 80877104 (GSSENC).
    p.extend_from_slice(&0x1234_abcdu32.to_be_bytes());
    p.extend(noise(56, 7));
    p
}

/// A startup packet announcing 0x7fffffff bytes.
fn oversized_packet() -> Vec<u8> {
    let mut p = Vec::from(0x7fff_ffffu32.to_be_bytes());
    p.extend_from_slice(&196608u32.to_be_bytes());
    p.extend(noise(248, 11));
    p
}

/// Waits for the peer to close (EOF or reset), discarding anything it sends; returns how long it took.
async fn closed_within(stream: &mut TcpStream, timeout: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let deadline = started + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => continue, // e.g. an ErrorResponse before the close
        }
    }
}

async fn normal_queries_work(lb: &Pglb, cluster: &PgCluster) {
    assert_eq!(landing_port(lb.write).await, cluster.node(0).port());
    assert_eq!(landing_port(lb.read).await, cluster.node(1).port());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_first_packets_are_closed_and_logged_while_others_are_served() {
    let cluster = PgCluster::start(1);
    let startup_timeout = Duration::from_secs(3);
    let lb = Pglb::builder(&cluster)
        .set("proxy", "client_startup_timeout", "3s")
        .start();
    lb.wait_ready().await;
    lb.wait_stats(T, "pg-1 read-eligible", |s| {
        s.try_backend("pg-1").is_some_and(|b| b.read_eligible)
    })
    .await;

    // Silent clients on both ports, connected first so the rest happens while they wait.
    // Each task reports (peer, time from connect to close).
    let mut silent = Vec::new();
    for addr in [lb.write, lb.read] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let connected = Instant::now();
        let peer = s.local_addr().unwrap().to_string();
        silent.push((
            addr,
            peer,
            tokio::spawn(async move {
                closed_within(&mut s, startup_timeout + Duration::from_secs(10))
                    .await
                    .map(|_| connected.elapsed())
            }),
        ));
    }
    // Served while both silent clients are still waiting (well inside the 3 s).
    normal_queries_work(&lb, &cluster).await;

    for addr in [lb.write, lb.read] {
        for (kind, bytes) in [
            ("random", random_packet()),
            ("oversized", oversized_packet()),
        ] {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let peer = s.local_addr().unwrap().to_string();
            // The server may close while we are still writing; that is fine.
            let _ = s.write_all(&bytes).await;
            let took = closed_within(&mut s, Duration::from_secs(2)).await;
            assert!(
                took.is_some(),
                "{kind} first packet on {addr}: pglb did not close the connection within 2 s \
                 (it must not wait for the startup timeout)"
            );
            lb.wait_log(Duration::from_secs(3), &peer).await;
        }
        normal_queries_work(&lb, &cluster).await;
    }

    for (addr, peer, task) in silent {
        let waited = task
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("silent client on {addr} not closed 10 s after the startup timeout of {startup_timeout:?}"));
        assert!(
            waited >= startup_timeout - Duration::from_millis(300),
            "silent client on {addr} closed after {waited:?}, before the startup timeout of {startup_timeout:?}"
        );
        assert!(
            waited <= startup_timeout + Duration::from_secs(3),
            "silent client on {addr} closed only after {waited:?} (startup timeout {startup_timeout:?})"
        );
        lb.wait_log(Duration::from_secs(3), &peer).await;
    }
    normal_queries_work(&lb, &cluster).await;
}
