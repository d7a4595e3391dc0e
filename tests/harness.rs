//! Checks of the test harness itself (no pglb involved): ports, cluster start, streaming,
//! logins, TLS, stop/start on the same port, replay pause, promote.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;

/// Ports handed out concurrently by many threads are distinct, below the kernel's ephemeral
/// range, and really free: every one of them can be bound, all at the same time.
#[test]
fn harness_ports_are_unique_free_and_below_ephemeral_range() {
    let eph_low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let threads: Vec<_> = (0..8)
        .map(|_| std::thread::spawn(|| (0..25).map(|_| free_port()).collect::<Vec<u16>>()))
        .collect();
    let ports: Vec<u16> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let mut seen = HashSet::new();
    for &p in &ports {
        assert!(
            p < eph_low,
            "port {p} is inside the ephemeral range starting at {eph_low}"
        );
        assert!(seen.insert(p), "port {p} handed out twice");
    }
    // Held together: 200 listeners on 200 distinct free ports.
    let listeners: Vec<std::net::TcpListener> = ports
        .iter()
        .map(|&p| {
            std::net::TcpListener::bind(("127.0.0.1", p))
                .unwrap_or_else(|e| panic!("port {p} handed out but not free: {e}"))
        })
        .collect();
    assert_eq!(listeners.len(), 200);
}

#[test]
fn harness_cluster_streams() {
    let cluster = PgCluster::start(2);
    let primary = cluster.primary();

    assert_eq!(
        primary.exec("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"),
        "2"
    );
    assert_eq!(
        primary.exec("SELECT string_agg(application_name, ',' ORDER BY application_name) FROM pg_stat_replication"),
        "pg-1,pg-2"
    );
    assert_eq!(
        primary.exec("SELECT string_agg(slot_name, ',' ORDER BY slot_name) FROM pg_replication_slots WHERE active"),
        "pg_1,pg_2"
    );
    assert!(!primary.in_recovery());
    for r in cluster.replicas() {
        assert!(r.in_recovery(), "{} should be a standby", r.name());
        assert_eq!(r.exec("SHOW ssl"), "on");
    }

    // Roles and SCRAM logins over TCP, with and without TLS.
    assert_eq!(
        primary.exec("SELECT pg_has_role('pglb_check', 'pg_monitor', 'member')"),
        "t"
    );
    assert_eq!(
        psql_tcp(primary.addr(), "disable", "SELECT current_user").unwrap(),
        "app"
    );
    assert_eq!(
        psql_tcp(
            primary.addr(),
            "require",
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
        .unwrap(),
        "t"
    );
    psql_tcp(primary.addr(), "disable", "CREATE TABLE harness_t (id int)").unwrap();
    primary.exec("INSERT INTO harness_t VALUES (42)");
    cluster.wait_replayed(1, Duration::from_secs(10));
    assert_eq!(cluster.node(1).exec("SELECT id FROM harness_t"), "42");

    // Paused replay: WAL arrives, the row does not show up; resumed, it does.
    let r2 = cluster.node(2);
    cluster.wait_replayed(2, Duration::from_secs(10));
    r2.pause_replay();
    wait_until_blocking(Duration::from_secs(10), "replay on pg-2 paused", || {
        r2.exec("SELECT pg_get_wal_replay_pause_state()") == "paused"
    });
    primary.exec("INSERT INTO harness_t VALUES (43)");
    let target = primary.current_lsn_bytes();
    wait_until_blocking(
        Duration::from_secs(10),
        "pg-2 to receive the insert",
        || {
            r2.exec("SELECT pg_wal_lsn_diff(pg_last_wal_receive_lsn(), '0/0')::bigint")
                .parse::<i64>()
                .unwrap()
                >= target
        },
    );
    assert!(
        r2.replay_lsn_bytes() < target,
        "replay advanced while paused"
    );
    assert_eq!(r2.exec("SELECT count(*) FROM harness_t"), "1");
    r2.resume_replay();
    cluster.wait_replayed(2, Duration::from_secs(10));
    assert_eq!(r2.exec("SELECT count(*) FROM harness_t"), "2");

    // Stop and start again on the same port; it streams again.
    let port = r2.port();
    r2.stop();
    assert!(!r2.is_running());
    cluster.wait_streaming(1, Duration::from_secs(10));
    r2.start();
    assert!(r2.is_running());
    assert_eq!(r2.exec("SHOW port"), port.to_string());
    cluster.wait_streaming(2, Duration::from_secs(20));

    // Frozen: the kernel still accepts, the server answers nothing; thawed, it answers.
    let ssl_request = |timeout: Duration| -> Option<u8> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(r2.addr()).unwrap();
        s.set_read_timeout(Some(timeout)).unwrap();
        s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).ok().map(|_| b[0])
    };
    // Every process of the server is stopped, not only the postmaster.
    let pids = r2.instance_pids();
    assert!(
        pids.len() >= 5,
        "postmaster, startup, WAL receiver, checkpointer, ...: {pids:?}"
    );
    let receiver: u32 = r2
        .exec("SELECT pid FROM pg_stat_wal_receiver")
        .parse()
        .unwrap();
    assert!(pids.contains(&receiver), "{receiver} not in {pids:?}");
    r2.freeze();
    assert_eq!(process_state(pids[0]), Some('T'), "the postmaster");
    assert_eq!(process_state(receiver), Some('T'), "the WAL receiver");
    for &p in &pids {
        // Stopped, or a backend that was already exiting (a zombie, or gone).
        let state = process_state(p);
        assert!(
            matches!(state, None | Some('T' | 'Z')),
            "process {p} of a frozen server is {state:?}"
        );
    }
    assert_eq!(
        ssl_request(Duration::from_millis(800)),
        None,
        "a frozen postmaster answered"
    );
    r2.thaw();
    wait_until_blocking(Duration::from_secs(5), "every process thawed", || {
        pids.iter().all(|&p| process_state(p) != Some('T'))
    });
    assert_eq!(
        ssl_request(Duration::from_secs(5)),
        Some(b'S'),
        "SSLRequest to a thawed server (ssl=on)"
    );

    // Promote pg-1 while pg-0 runs: two primaries, pg-1 on a higher timeline.
    let r1 = cluster.node(1);
    assert_eq!(primary.timeline(), 1);
    r1.promote();
    assert!(!r1.in_recovery());
    assert!(!primary.in_recovery());
    assert_eq!(r1.timeline(), 2);

    // Immediate stop.
    primary.kill();
    assert!(!primary.is_running());
}
