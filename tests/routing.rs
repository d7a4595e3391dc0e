//! Routing through the write and read ports: primary vs replicas, balancing, replicas going
//! down, fallback to the primary, no primary, and replicas excluded for lag.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_port_writes_and_read_port_reads_back() {
    let cluster = PgCluster::start(2);
    let lb = Pglb::start(&cluster).await;

    let w = connect_ok(lb.write).await;
    assert!(
        !in_recovery(&w).await,
        "write port session is on a server in recovery"
    );
    assert_eq!(
        backend_port(&w).await,
        cluster.primary().port(),
        "write port did not land on the primary"
    );
    w.batch_execute("CREATE TABLE items (id int PRIMARY KEY, note text); INSERT INTO items VALUES (1, 'through pglb')")
        .await
        .expect("write through the write port");

    let r = connect_ok(lb.read).await;
    assert!(
        in_recovery(&r).await,
        "read port session is not on a standby"
    );
    let replica_ports: Vec<u16> = cluster.replicas().iter().map(|n| n.port()).collect();
    let port = backend_port(&r).await;
    assert!(
        replica_ports.contains(&port),
        "read port landed on port {port}, not a replica ({replica_ports:?})"
    );

    // Replication is asynchronous: poll until the row has been replayed on that replica.
    wait_until_async(T, "the row written via the write port to be visible via the read port", || async {
        matches!(scalar(&r, "SELECT note FROM items WHERE id = 1").await, Ok(Some(n)) if n == "through pglb")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_port_rejects_writes_with_read_only_error() {
    let cluster = PgCluster::start(1);
    let lb = Pglb::start(&cluster).await;

    connect_ok(lb.write)
        .await
        .batch_execute("CREATE TABLE ro (id int)")
        .await
        .unwrap();
    cluster.wait_replayed(1, T);

    let r = connect_ok(lb.read).await;
    assert_eq!(backend_port(&r).await, cluster.node(1).port());
    let err = r
        .batch_execute("INSERT INTO ro VALUES (1)")
        .await
        .expect_err("INSERT through the read port succeeded");
    assert_eq!(
        sqlstate(&err),
        Some("25006"),
        "expected read_only_sql_transaction, got {err:?}"
    );
    // The session survives the error.
    assert_eq!(scalar_ok(&r, "SELECT 1").await, "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_sessions_spread_over_both_replicas() {
    let cluster = PgCluster::start(2);
    // Check latency does not matter here; slower checks leave the 2 cores to the 32 logins.
    let leastconn = Pglb::builder(&cluster)
        .set("check", "interval", "500ms")
        .start();
    let roundrobin = Pglb::builder(&cluster)
        .set("check", "interval", "500ms")
        .set("read", "balance", "roundrobin")
        .start();
    leastconn.wait_ready().await;
    roundrobin.wait_ready().await;
    for lb in [&leastconn, &roundrobin] {
        lb.wait_stats(T, "both replicas read-eligible", |s| {
            s.try_backend("pg-1").is_some_and(|b| b.read_eligible)
                && s.try_backend("pg-2").is_some_and(|b| b.read_eligible)
        })
        .await;
    }
    let (p1, p2) = (cluster.node(1).port(), cluster.node(2).port());

    // leastconn: 20 sessions held open at once split evenly (each new one goes to the replica
    // with fewer active sessions).
    let mut held = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..20 {
        let c = connect_ok(leastconn.read).await;
        ports.push(backend_port(&c).await);
        held.push(c);
    }
    let (n1, n2) = (count_ports(&ports, p1), count_ports(&ports, p2));
    assert_eq!(
        n1 + n2,
        20,
        "leastconn: some read sessions did not land on a replica: {}",
        describe_ports(&cluster, &ports)
    );
    assert!(
        n1.abs_diff(n2) <= 1,
        "leastconn: 20 concurrent sessions should split 10/10 (±1), got pg-1={n1} pg-2={n2}"
    );
    leastconn
        .wait_stats(
            Duration::from_secs(5),
            "sessions_active to count the 20 open read sessions",
            |s| {
                s.try_backend("pg-1")
                    .map(|b| b.sessions_active)
                    .unwrap_or(0)
                    + s.try_backend("pg-2")
                        .map(|b| b.sessions_active)
                        .unwrap_or(0)
                    == 20
            },
        )
        .await;
    drop(held);

    // roundrobin: 12 sequential sessions (each closed before the next) alternate.
    let mut ports = Vec::new();
    for _ in 0..12 {
        ports.push(landing_port(roundrobin.read).await);
    }
    let (n1, n2) = (count_ports(&ports, p1), count_ports(&ports, p2));
    assert_eq!(
        n1 + n2,
        12,
        "roundrobin: some read sessions did not land on a replica: {}",
        describe_ports(&cluster, &ports)
    );
    assert!(
        n1 >= 5 && n2 >= 5,
        "roundrobin: 12 sessions should alternate between the replicas, got pg-1={n1} pg-2={n2}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_down_then_fallback_to_primary() {
    let cluster = PgCluster::start(2);
    let lb = Pglb::start(&cluster).await;
    let strict = Pglb::builder(&cluster)
        .set("read", "fallback_to_primary", false)
        .start();
    strict.wait_ready().await;
    let (p0, p1) = (cluster.node(0).port(), cluster.node(1).port());

    // One replica down: reads keep working, all on the other replica. Even before a check has
    // noticed, a refused connect makes pglb try the next backend (lb.toml, proxy.connect_timeout).
    cluster.node(2).stop();
    for _ in 0..4 {
        assert_eq!(
            landing_port(lb.read).await,
            p1,
            "read right after pg-2 stopped did not land on pg-1"
        );
    }
    for l in [&lb, &strict] {
        let s = l.wait_backend_state("pg-2", "down", T).await;
        assert!(
            !s.backend("pg-2").read_eligible,
            "a down replica is read-eligible: {}",
            s.raw
        );
    }
    for l in [&lb, &strict] {
        let mut ports = Vec::new();
        for _ in 0..6 {
            let c = connect_ok(l.read).await;
            assert!(in_recovery(&c).await);
            ports.push(backend_port(&c).await);
        }
        assert_eq!(
            count_ports(&ports, p1),
            6,
            "reads with pg-2 down: {}",
            describe_ports(&cluster, &ports)
        );
    }

    // Both replicas down: with fallback the primary serves reads; without, pglb refuses.
    cluster.node(1).stop();
    for l in [&lb, &strict] {
        l.wait_backend_state("pg-1", "down", T).await;
    }
    for _ in 0..3 {
        let c = connect_ok(lb.read).await;
        assert!(
            !in_recovery(&c).await,
            "fallback read session should be on the primary"
        );
        assert_eq!(backend_port(&c).await, p0);
    }
    let msg = expect_pglb_fatal(strict.read).await;
    assert!(
        msg.contains("replica"),
        "read-port refusal should say no replica is available: {msg:?}"
    );

    // The write port is unaffected.
    let w = connect_ok(strict.write).await;
    assert_eq!(backend_port(&w).await, p0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn primary_down_write_port_refuses_read_port_serves() {
    let cluster = PgCluster::start(1);
    let lb = Pglb::start(&cluster).await;
    assert_eq!(landing_port(lb.write).await, cluster.primary().port());

    cluster.primary().stop();
    lb.wait_stats(T, "pg-0 down and no primary", |s| {
        s.primary.is_none() && s.try_backend("pg-0").is_some_and(|b| b.state == "down")
    })
    .await;

    let msg = expect_pglb_fatal(lb.write).await;
    assert!(
        msg.contains("primary"),
        "write-port refusal should say no primary is available: {msg:?}"
    );

    let r = connect_ok(lb.read).await;
    assert!(in_recovery(&r).await);
    assert_eq!(backend_port(&r).await, cluster.node(1).port());
    assert_eq!(scalar_ok(&r, "SELECT 1").await, "1");
}

/// Inserts about `mb` MiB of WAL on the primary.
fn generate_wal(cluster: &PgCluster, mb: usize) {
    cluster.primary().exec(&format!(
        "INSERT INTO lagfill SELECT g, repeat(md5(g::text), 32) FROM generate_series(1, {}) g",
        mb * 1024 * 1024 / 1100
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lagging_replica_gets_no_reads_until_it_catches_up() {
    let cluster = PgCluster::start(2);
    cluster
        .primary()
        .exec("CREATE TABLE lagfill (id int, pad text)");
    // Only the byte threshold matters here.
    let lb = Pglb::builder(&cluster)
        .set("read", "max_lag", "1MB")
        .set("read", "max_lag_time", "1h")
        .start();
    lb.wait_ready().await;
    lb.wait_stats(T, "both replicas read-eligible", |s| {
        s.try_backend("pg-1").is_some_and(|b| b.read_eligible)
            && s.try_backend("pg-2").is_some_and(|b| b.read_eligible)
    })
    .await;
    let (p1, p2) = (cluster.node(1).port(), cluster.node(2).port());

    cluster.node(1).pause_replay();
    generate_wal(&cluster, 4);
    // Right after the burst pg-2 is briefly behind too; it is eligible again once it replayed.
    cluster.wait_replayed(2, T);
    let s = lb
        .wait_stats(T, "pg-1 excluded for lag while pg-2 is eligible", |s| {
            s.try_backend("pg-1").is_some_and(|b| !b.read_eligible)
                && s.try_backend("pg-2").is_some_and(|b| b.read_eligible)
        })
        .await;
    let b1 = s.backend("pg-1");
    assert_eq!(b1.state, "up", "a lagging replica is still up: {}", s.raw);
    assert!(
        b1.lag_bytes.is_some_and(|l| l > 1024 * 1024),
        "pg-1 should report more than 1MB of lag: {}",
        s.raw
    );

    // Every new read session goes to pg-2, even though pg-1 has fewer sessions.
    let mut held = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..6 {
        let c = connect_ok(lb.read).await;
        ports.push(backend_port(&c).await);
        held.push(c);
    }
    assert_eq!(
        count_ports(&ports, p2),
        6,
        "reads while pg-1 lags: {}",
        describe_ports(&cluster, &ports)
    );

    // Resumed, pg-1 catches up and is eligible again; with pg-2 holding 6 sessions, leastconn
    // sends the next ones to pg-1.
    cluster.node(1).resume_replay();
    cluster.wait_replayed(1, T);
    lb.wait_stats(T, "pg-1 read-eligible again", |s| {
        s.try_backend("pg-1").is_some_and(|b| b.read_eligible)
    })
    .await;
    let mut ports = Vec::new();
    for _ in 0..6 {
        let c = connect_ok(lb.read).await;
        ports.push(backend_port(&c).await);
        held.push(c);
    }
    assert_eq!(
        count_ports(&ports, p1),
        6,
        "after catching up, leastconn should send new sessions to pg-1 (pg-2 holds 6): {}",
        describe_ports(&cluster, &ports)
    );
}
