//! The etcd store against a real 3-member etcd cluster on loopback: one leader among
//! campaigners, takeover after a leader's death, a frozen leader that stops acting before anyone
//! else can lead and whose guarded write then fails, no leader and no record without quorum,
//! and a failover journal that outlives its writer.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::etcd::EtcdCluster;
use common::{wait_for, wait_until_async};
use pglb::config::{StoreConfig, StoreKind};
use pglb::store::{
    Campaign, EtcdStore, FailoverStep, Leadership, MemberView, PrimaryRecord, StepAction, Store,
    StoreError,
};

/// Short enough for quick tests, long enough for a busy 2-core machine: renewals every 1 s,
/// a leader stops acting 2.4 s after its last confirmed renewal was sent.
const TTL: Duration = Duration::from_secs(3);
const RENEW_EVERY: Duration = Duration::from_secs(1);

async fn store(cluster: &EtcdCluster, members: &[usize]) -> EtcdStore {
    EtcdStore::connect(&cluster.store_config(members, "/pglb/test", TTL))
        .await
        .expect("connect to etcd")
}

fn is_leader(c: &Campaign) -> bool {
    c.current().is_leader()
}

async fn wait_leader(c: &Campaign, timeout: Duration, what: &str) -> Leadership {
    let rx = c.leadership();
    wait_for(timeout, what, || {
        let l = rx.borrow().clone();
        l.is_leader().then_some(l)
    })
    .await
}

fn record(name: &str, epoch: u64) -> PrimaryRecord {
    PrimaryRecord {
        name: name.into(),
        timeline: 2,
        epoch,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_campaigners_exactly_one_leads_and_only_it_records() {
    let cluster = EtcdCluster::start();
    let s = store(&cluster, &[0, 1, 2]).await;
    let a = s.campaign("promoter-a").await.unwrap();
    let b = s.campaign("promoter-b").await.unwrap();
    wait_until_async(Duration::from_secs(10), "a leader", || async {
        is_leader(&a) || is_leader(&b)
    })
    .await;
    // Both have settled: the other one sees the winner.
    let (winner, loser, win_id, lose_id) = if is_leader(&a) {
        (&a, &b, "promoter-a", "promoter-b")
    } else {
        (&b, &a, "promoter-b", "promoter-a")
    };
    let lrx = loser.leadership();
    wait_for(
        Duration::from_secs(5),
        "the follower to see the leader",
        || (lrx.borrow().leader_id() == Some(win_id)).then_some(()),
    )
    .await;
    for _ in 0..20 {
        assert!(is_leader(winner) && !is_leader(loser), "exactly one leads");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let key = s.leader().await.unwrap().expect("leader key");
    assert_eq!(key.id, win_id);
    let Leadership::Leader(term) = winner.current() else {
        panic!("winner not leader")
    };
    assert_eq!(term.revision, key.revision);
    assert_eq!(term.lease, key.lease);

    // Only the leader's guarded write commits.
    let mut primary = s.watch_primary();
    s.record_primary(&winner.current(), &record("pg-1", 1))
        .await
        .expect("leader records the primary");
    match s.record_primary(&loser.current(), &record("pg-2", 2)).await {
        Err(StoreError::NotLeader { holder }) => assert_eq!(holder.as_deref(), Some(win_id)),
        other => panic!("follower's record must fail with NotLeader: {other:?}"),
    }
    assert_eq!(s.primary().await.unwrap(), Some(record("pg-1", 1)));
    tokio::time::timeout(
        Duration::from_secs(5),
        primary.wait_for(|p| p.record == Some(record("pg-1", 1)) && p.reachable),
    )
    .await
    .expect("watch_primary follows the record")
    .unwrap();

    // Members publish their views under their own leases.
    let view = MemberView {
        primary: Some("pg-1".into()),
        timeline: Some(2),
        reachable: vec!["pg-1".into(), "pg-2".into()],
        unreachable: vec![],
        looks: 7,
    };
    s.publish_member(lose_id, &view).await.unwrap();
    s.publish_member(win_id, &MemberView::default())
        .await
        .unwrap();
    let members = s.members().await.unwrap();
    let ids: Vec<&str> = members.iter().map(|m| m.id.as_str()).collect();
    let mut want = vec![win_id, lose_id];
    want.sort();
    assert_eq!(ids, want);
    let m = members.iter().find(|m| m.id == lose_id).unwrap();
    assert_eq!(m.view, view);
    assert!(m.lease_age.is_some_and(|a| a <= TTL), "{m:?}");

    // Resigning hands over at once (no waiting out the TTL).
    let start = Instant::now();
    let (winner, loser) = if win_id == "promoter-a" {
        (a, b)
    } else {
        (b, a)
    };
    winner.resign(Duration::from_secs(2)).await;
    wait_leader(
        &loser,
        Duration::from_secs(3),
        "the other to lead after a resign",
    )
    .await;
    assert!(start.elapsed() < TTL, "took {:?}", start.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_leader_is_replaced_within_the_ttl_and_one_interval() {
    let cluster = EtcdCluster::start();
    let sa = store(&cluster, &[0, 1, 2]).await;
    let sb = store(&cluster, &[0, 1, 2]).await;
    let a = sa.campaign("a").await.unwrap();
    let old = wait_leader(&a, Duration::from_secs(10), "a to lead").await;
    let b = sb.campaign("b").await.unwrap();
    let brx = b.leadership();
    wait_for(Duration::from_secs(5), "b to see a", || {
        (brx.borrow().leader_id() == Some("a")).then_some(())
    })
    .await;
    // Let a renew a few times, then kill it mid-term: no resign, no revoke, its client gone.
    tokio::time::sleep(RENEW_EVERY * 2 + Duration::from_millis(300)).await;
    let killed = Instant::now();
    drop(a);
    drop(sa);
    wait_leader(&b, TTL * 3, "b to lead after a died").await;
    let took = killed.elapsed();
    eprintln!("takeover after the leader's death: {took:?}");
    assert!(
        took <= TTL + RENEW_EVERY,
        "b led {took:?} after a died (limit: lease_ttl + one renewal interval)"
    );
    // The dead leader's term is refused by the store.
    assert!(matches!(
        sb.record_primary(&old, &record("pg-1", 1)).await,
        Err(StoreError::NotLeader { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_stops_acting_before_another_leads_and_then_steps_down() {
    let mut cluster = EtcdCluster::start();
    // a talks to member 0 only, b to members 1 and 2: freezing member 0 cuts a off alone.
    let sa = store(&cluster, &[0]).await;
    let sb = store(&cluster, &[1, 2]).await;
    let a = sa.campaign("a").await.unwrap();
    let a_term = wait_leader(&a, Duration::from_secs(10), "a to lead").await;
    let b = sb.campaign("b").await.unwrap();
    let brx = b.leadership();
    wait_for(Duration::from_secs(5), "b to see a", || {
        (brx.borrow().leader_id() == Some("a")).then_some(())
    })
    .await;
    tokio::time::sleep(RENEW_EVERY + Duration::from_millis(500)).await;

    let frozen = Instant::now();
    cluster.freeze(0);
    // Watch both sides: when did a stop acting, when did b start.
    let arx = a.leadership();
    let mut a_stopped: Option<Instant> = None;
    let b_led = loop {
        let now = Instant::now();
        if a_stopped.is_none() && !arx.borrow().is_leader() {
            a_stopped = Some(now);
        }
        if brx.borrow().is_leader() {
            break now;
        }
        assert!(
            frozen.elapsed() < Duration::from_secs(30),
            "b never led while a's etcd member was frozen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let a_stopped = a_stopped.expect("a still acted when b started leading");
    let term = match &a_term {
        Leadership::Leader(t) => t.clone(),
        _ => unreachable!(),
    };
    eprintln!(
        "a stopped acting {:?} after the freeze (valid until +{:?}); b led after {:?}",
        a_stopped - frozen,
        term.valid_until()
            .into_std()
            .saturating_duration_since(frozen),
        b_led - frozen
    );
    assert!(a_stopped < b_led, "a must stop before b leads");
    assert!(
        a_stopped - frozen < TTL,
        "a cut off from etcd must stop acting within lease_ttl"
    );
    assert!(
        term.valid_until().into_std() < b_led,
        "a's validity must end before b leads"
    );
    assert!(!a_term.is_leader());

    // a comes back: its term is refused, and it follows b.
    cluster.thaw(0);
    cluster.wait_healthy(Duration::from_secs(20));
    match sa.record_primary(&a_term, &record("pg-1", 7)).await {
        Err(StoreError::NotLeader { .. }) => {}
        other => panic!("a's stale record must fail with NotLeader: {other:?}"),
    }
    wait_for(Duration::from_secs(10), "a to follow b", || {
        (arx.borrow().leader_id() == Some("b") && !arx.borrow().is_leader()).then_some(())
    })
    .await;
    assert_eq!(sa.primary().await.unwrap(), None, "nothing was recorded");
    sb.record_primary(&b.current(), &record("pg-2", 8))
        .await
        .expect("b records");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guarded_write_fails_when_the_key_changed_even_before_the_lease_lapses() {
    let cluster = EtcdCluster::start();
    let s = store(&cluster, &[0, 1, 2]).await;
    let a = s.campaign("a").await.unwrap();
    let term = wait_leader(&a, Duration::from_secs(10), "a to lead").await;
    // Someone (an operator, a bug) deletes the leader key and another takes it.
    let mut raw = etcd_client::Client::connect(cluster.endpoints(), None)
        .await
        .unwrap();
    raw.delete("/pglb/test/leader", None).await.unwrap();
    raw.put("/pglb/test/leader", "intruder", None)
        .await
        .unwrap();
    assert!(term.is_leader(), "still valid on a's own clock");
    match s.record_primary(&term, &record("pg-1", 1)).await {
        Err(StoreError::NotLeader { holder }) => assert_eq!(holder.as_deref(), Some("intruder")),
        other => panic!("must fail with NotLeader: {other:?}"),
    }
    // The campaign notices at its next renewal and steps down.
    let arx = a.leadership();
    wait_for(TTL, "a to step down", || {
        (arx.borrow().leader_id() == Some("intruder")).then_some(())
    })
    .await;
    assert!(!term.is_leader(), "the lost term stops acting at once");
    assert_eq!(s.primary().await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_quorum_nobody_leads_or_records_and_with_it_back_it_works() {
    let mut cluster = EtcdCluster::start();
    let sa = store(&cluster, &[0, 1, 2]).await;
    let a = sa.campaign("a").await.unwrap();
    let a_term = wait_leader(&a, Duration::from_secs(10), "a to lead").await;
    let sb = store(&cluster, &[0]).await;
    let b = sb.campaign("b").await.unwrap();

    cluster.stop_member(1);
    cluster.stop_member(2);
    let lost = Instant::now();
    let arx = a.leadership();
    wait_for(TTL, "a to stop acting without quorum", || {
        (!arx.borrow().is_leader()).then_some(())
    })
    .await;
    eprintln!(
        "a stopped acting {:?} after quorum was lost",
        lost.elapsed()
    );
    // For two more TTLs: nobody leads, nothing can be recorded.
    let until = Instant::now() + TTL * 2;
    while Instant::now() < until {
        assert!(!a.current().is_leader() && !b.current().is_leader());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let err = sa
        .record_primary(&a_term, &record("pg-1", 1))
        .await
        .expect_err("no record without quorum");
    assert!(matches!(err, StoreError::NotLeader { .. }), "{err:?}");
    assert!(sb.primary().await.is_err(), "no linearizable read either");

    cluster.start_member(1);
    cluster.start_member(2);
    cluster.wait_healthy(Duration::from_secs(30));
    let back = Instant::now();
    wait_until_async(TTL * 4, "a leader once quorum is back", || async {
        a.current().is_leader() || b.current().is_leader()
    })
    .await;
    eprintln!("a leader again {:?} after quorum came back", back.elapsed());
    let (leader, s) = if a.current().is_leader() {
        (&a, &sa)
    } else {
        (&b, &sb)
    };
    s.record_primary(&leader.current(), &record("pg-2", 2))
        .await
        .expect("record once quorum is back");
    assert_eq!(sa.primary().await.unwrap(), Some(record("pg-2", 2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_step_journal_outlives_its_leader_and_guides_the_next() {
    let cluster = EtcdCluster::start();
    let sa = store(&cluster, &[0, 1, 2]).await;
    let sb = store(&cluster, &[0, 1, 2]).await;
    let a = sa.campaign("a").await.unwrap();
    let a_term = wait_leader(&a, Duration::from_secs(10), "a to lead").await;
    let b = sb.campaign("b").await.unwrap();

    let steps = vec![
        FailoverStep {
            epoch: 4,
            seq: 0,
            by: "a".into(),
            action: StepAction::ReceiversStopped {
                server: "pg-1".into(),
                old_primary_conninfo: "host=pg-0 port=5432 user=replicator".into(),
            },
        },
        FailoverStep {
            epoch: 4,
            seq: 1,
            by: "a".into(),
            action: StepAction::ReceiversStopped {
                server: "pg-2".into(),
                old_primary_conninfo: "host=pg-0 port=5432 user=replicator".into(),
            },
        },
        FailoverStep {
            epoch: 4,
            seq: 2,
            by: "a".into(),
            action: StepAction::Promoted {
                server: "pg-1".into(),
                from_timeline: 3,
            },
        },
    ];
    // Recorded out of order on purpose: the journal reads back in (epoch, seq) order.
    for i in [1usize, 0, 2] {
        sa.record_step(&a_term, &steps[i]).await.unwrap();
    }
    // a dies mid-failover.
    drop(a);
    drop(sa);
    let b_term = wait_leader(&b, TTL * 3, "b to lead after a died").await;
    assert_eq!(
        sb.steps().await.unwrap(),
        steps,
        "the next leader reads the journal"
    );

    let next = FailoverStep {
        epoch: 4,
        seq: 3,
        by: "b".into(),
        action: StepAction::Repointed {
            server: "pg-2".into(),
            to: "pg-1".into(),
        },
    };
    sb.record_step(&b_term, &next).await.unwrap();
    assert!(matches!(
        sb.record_step(&a_term, &next).await,
        Err(StoreError::NotLeader { .. })
    ));
    assert_eq!(sb.steps().await.unwrap().len(), 4);
    // Converged: b forgets the failover; a stale term cannot.
    assert!(matches!(
        sb.clear_steps(&a_term, 4).await,
        Err(StoreError::NotLeader { .. })
    ));
    sb.clear_steps(&b_term, 4).await.unwrap();
    assert!(sb.steps().await.unwrap().is_empty());
}

/// The leader process of the SIGKILL test below: campaigns as "child", prints a line once it
/// leads, then keeps leading until it is killed. Does nothing unless that test starts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of a_leader_killed_with_sigkill_is_replaced_within_the_ttl_and_one_interval"]
async fn child_campaigner() {
    let Ok(endpoints) = std::env::var("PGLB_STORE_CHILD_ENDPOINTS") else {
        return;
    };
    let cfg = StoreConfig {
        kind: StoreKind::Etcd,
        endpoints: endpoints.split(',').map(str::to_string).collect(),
        prefix: "/pglb/test".into(),
        lease_ttl: TTL,
        ..StoreConfig::default()
    };
    let s = EtcdStore::connect(&cfg).await.unwrap();
    let c = s.campaign("child").await.unwrap();
    wait_leader(&c, Duration::from_secs(10), "the child to lead").await;
    println!("pglb-child-leads");
    std::io::stdout().flush().unwrap();
    tokio::time::sleep(Duration::from_secs(300)).await;
}

/// Kills the child by PID when the test ends, whatever happened.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_with_sigkill_is_replaced_within_the_ttl_and_one_interval() {
    let cluster = EtcdCluster::start();
    let mut child = ChildGuard(
        Command::new(std::env::current_exe().unwrap())
            .args(["child_campaigner", "--exact", "--ignored", "--nocapture"])
            .args(["--test-threads", "1"])
            .env("PGLB_STORE_CHILD_ENDPOINTS", cluster.endpoints().join(","))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the leader process"),
    );
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // libtest's "test child_campaigner ... " precedes it on the same line.
            if line.contains("pglb-child-leads") {
                let _ = tx.send(());
            }
        }
    });
    tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
        .await
        .unwrap()
        .expect("the child process leads");

    let sb = store(&cluster, &[0, 1, 2]).await;
    assert_eq!(
        sb.leader().await.unwrap().map(|k| k.id).as_deref(),
        Some("child")
    );
    let b = sb.campaign("b").await.unwrap();
    let brx = b.leadership();
    wait_for(Duration::from_secs(5), "b to see the child lead", || {
        (brx.borrow().leader_id() == Some("child")).then_some(())
    })
    .await;
    tokio::time::sleep(RENEW_EVERY * 2 + Duration::from_millis(400)).await;
    assert!(!b.current().is_leader());

    let killed = Instant::now();
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGKILL) };
    let _ = child.0.wait();
    wait_leader(&b, TTL * 3, "b to lead after the leader was killed").await;
    let took = killed.elapsed();
    eprintln!("takeover after kill -9 of the leader process: {took:?}");
    assert!(
        took <= TTL + RENEW_EVERY,
        "b led {took:?} after the kill (limit: lease_ttl + one renewal interval)"
    );
}
