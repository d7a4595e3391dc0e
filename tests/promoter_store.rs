//! Several pglb-promoter processes coordinated through a real 3-member etcd (`[store]`), against
//! real PostgreSQL (a primary, two replicas) and pglb: only the leader acts, a dead leader is
//! replaced within the lease, one failure makes one promotion, a paused leader is outrun and
//! its guarded record refused, no quorum means no promotion; and a promoter killed after any
//! failover step, with or without a store, leaves a cluster that converges without losing a
//! commit acknowledged in synchronous mode; a reloaded `[store]` is switched to cleanly.

mod common;

use std::time::{Duration, Instant};

use common::etcd::EtcdCluster;
use common::promoter::*;
use common::*;
use pglb::store::{EtcdStore, Store};

const T: Duration = Duration::from_secs(30);
/// The lease: whole seconds, at least 2 (`[store] lease_ttl`).
const TTL: Duration = Duration::from_secs(2);
/// `[promoter] interval` of the harness's promoters.
const INTERVAL: Duration = Duration::from_millis(200);
const PREFIX: &str = "/pglb/test";

fn with_store(etcd: &EtcdCluster, id: &str) -> PromoterBuilder {
    PromoterBuilder::new()
        .id(id)
        .store(&etcd.endpoints(), PREFIX, TTL)
}

async fn wait_leading(p: &Promoter, id: &str) -> serde_json::Value {
    p.wait_status(T, &format!("{id} to lead"), |s| {
        s["id"] == id && s["store"]["is_leader"] == true
    })
    .await
}

/// Waits until `p` follows `leader` and is steady on `primary`.
async fn wait_following(p: &Promoter, leader: &str, primary: &str) -> serde_json::Value {
    p.wait_status(
        T,
        &format!("following {leader}, steady on {primary}"),
        |s| {
            s["store"]["is_leader"] == false
                && s["store"]["leader"] == leader
                && s["decision"] == "steady"
                && s["primary"] == primary
        },
    )
    .await
}

fn failovers(s: &serde_json::Value) -> u64 {
    s["failovers"].as_u64().unwrap_or(0)
}

/// Waits until the cluster has converged after pg-0's death: one replica promoted (timeline 2,
/// so promoted once), the other streaming from it, a write through pglb taken by it. Returns
/// the promoted one's index.
async fn converged(cluster: &PgCluster, lb: &Pglb, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    let promoted = wait_for(within, "one replica out of recovery", || {
        let out: Vec<usize> = (1..=2)
            .filter(|&i| !cluster.node(i).in_recovery())
            .collect();
        (out.len() == 1).then(|| out[0])
    })
    .await;
    let new = cluster.node(promoted);
    let other = cluster.node(3 - promoted);
    let left = deadline.saturating_duration_since(Instant::now());
    wait_until(
        left,
        &format!("{} streaming from {}", other.name(), new.name()),
        || streams_to(new, other.name()),
    )
    .await;
    let left = deadline.saturating_duration_since(Instant::now());
    wait_until_async(left, "a write through pglb on the new primary", || async {
        let Ok(c) = connect(lb.write).await else {
            return false;
        };
        c.simple_query(
            "CREATE TABLE IF NOT EXISTS conv (x int); INSERT INTO conv VALUES (1); SELECT 1",
        )
        .await
        .is_ok()
    })
    .await;
    assert!(other.in_recovery());
    assert_eq!(new.timeline(), 2, "{} promoted more than once", new.name());
    promoted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_leader_is_replaced_within_the_lease_and_nobody_is_promoted() {
    let etcd = EtcdCluster::start();
    let cluster = failover_cluster(2);
    let lb = Pglb::start(&cluster).await;
    let mut a = with_store(&etcd, "a").start(&lb);
    let s = wait_leading(&a, "a").await;
    // The first leader finds no record and records the primary there is.
    let s = if s["store"]["record"]["name"] == "pg-0" {
        s
    } else {
        a.wait_status(T, "the first leader to record pg-0", |s| {
            s["store"]["record"]["name"] == "pg-0"
        })
        .await
    };
    assert_eq!(s["store"]["record"]["timeline"], 1, "{s}");
    let b = with_store(&etcd, "b").start(&lb);
    let s = wait_following(&b, "a", "pg-0").await;
    // Both publish their view; the follower sees them with their lease age.
    let s = if s["store"]["members"].as_array().map(Vec::len) == Some(2) {
        s
    } else {
        b.wait_status(T, "two members published", |s| {
            s["store"]["members"].as_array().map(Vec::len) == Some(2)
        })
        .await
    };
    assert_eq!(s["store"]["members"][0]["id"], "a", "{s}");
    assert_eq!(s["store"]["members"][0]["view"]["primary"], "pg-0", "{s}");

    let killed = Instant::now();
    a.kill9();
    wait_leading(&b, "b").await;
    let took = killed.elapsed();
    eprintln!("b leads {took:?} after the kill -9 of the leader a (lease_ttl {TTL:?})");
    // etcd expires leases on a 500 ms tick; the rest is slack for a busy machine.
    assert!(
        took <= TTL + INTERVAL + Duration::from_secs(2),
        "takeover took {took:?}"
    );
    let m = b.metrics().expect("metrics");
    assert_eq!(metric(&m, "pglb_promoter_is_leader", &[]), Some(1.0), "{m}");
    assert_eq!(
        metric(
            &m,
            "pglb_promoter_leadership_changes_total",
            &[("to", "leader")]
        ),
        Some(1.0),
        "{m}"
    );

    // The new leader looks a few times at a healthy cluster: nothing to do.
    let looks = b.status().expect("status")["looks"].as_u64().unwrap();
    let s = b
        .wait_status(T, "ten more looks, steady on pg-0", |s| {
            s["looks"].as_u64().unwrap() >= looks + 10 && s["decision"] == "steady"
        })
        .await;
    assert_eq!(s["primary"], "pg-0", "{s}");
    assert_eq!(failovers(&s), 0, "{s}");
    assert_eq!(s["store"]["record"]["name"], "pg-0", "{s}");
    assert_eq!(s["store"]["record"]["epoch"], 1, "{s}");
    assert!(!cluster.node(0).in_recovery());
    assert!(cluster.node(1).in_recovery() && cluster.node(2).in_recovery());
    assert_eq!(cluster.node(0).timeline(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_promoters_and_a_dead_primary_make_exactly_one_promotion() {
    let etcd = EtcdCluster::start();
    let cluster = failover_cluster(2);
    let lb = Pglb::start(&cluster).await;
    let a = with_store(&etcd, "a").start(&lb);
    wait_leading(&a, "a").await;
    let b = with_store(&etcd, "b").start(&lb);
    wait_following(&b, "a", "pg-0").await;

    kill9(cluster.node(0));
    let promoted = converged(&cluster, &lb, Duration::from_secs(60)).await;
    let name = cluster.node(promoted).name().to_string();
    let sa = a.wait_steady(&name, T).await;
    let sb = b.wait_steady(&name, T).await;
    assert_eq!(failovers(&sa) + failovers(&sb), 1, "a: {sa}\nb: {sb}");
    assert_eq!(failovers(&sa), 1, "the leader a promoted: {sa}");
    assert_eq!(sa["last_failover"]["to"], name.as_str(), "{sa}");
    // The store names the promoted server on its new timeline, under the next epoch.
    let s = a
        .wait_status(T, "the record of the new primary", |s| {
            s["store"]["record"]["name"] == name.as_str() && s["store"]["record"]["timeline"] == 2
        })
        .await;
    assert_eq!(s["store"]["record"]["epoch"], 2, "{s}");
    // Settled: the failover's journal is cleared.
    let store = EtcdStore::connect(&etcd.store_config(&[0, 1, 2], PREFIX, TTL))
        .await
        .expect("connect to etcd");
    wait_until_async(T, "the journal to be cleared", || async {
        store.steps().await.is_ok_and(|s| s.is_empty())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_switchover_through_the_store_is_run_by_the_leader_and_recorded() {
    let etcd = EtcdCluster::start();
    let cluster = failover_cluster(2);
    let lb = Pglb::start(&cluster).await;
    let a = with_store(&etcd, "a").start(&lb);
    wait_leading(&a, "a").await;
    let b = with_store(&etcd, "b").start(&lb);
    wait_following(&b, "a", "pg-0").await;

    // Asked from b's host: the leader a runs it.
    let report = switchover(&b, "pg-1").await;
    assert_eq!(report["from"], "pg-0", "{report}");
    assert_eq!(report["to"], "pg-1", "{report}");
    assert_eq!(report["timeline"], 2, "{report}");
    let s = a
        .wait_status(T, "the record of pg-1", |s| {
            s["store"]["record"]["name"] == "pg-1" && s["store"]["record"]["timeline"] == 2
        })
        .await;
    assert_eq!(s["store"]["record"]["epoch"], 2, "{s}");
    b.wait_steady("pg-1", T).await;
    wait_until(T, "pg-2 streaming from pg-1", || {
        streams_to(cluster.node(1), "pg-2")
    })
    .await;
    assert!(!cluster.node(1).in_recovery());
    assert_eq!(
        cluster
            .node(0)
            .exec("SELECT current_setting('default_transaction_read_only')"),
        "on"
    );

    // pglb's stats page, told where a promoter is, shows the leadership and the record.
    std::fs::write(
        lb.config_path(),
        Pglb::builder(&cluster)
            .set("stats", "promoter_url", format!("http://{}", b.status))
            .render(lb.write, lb.read, lb.stats),
    )
    .unwrap();
    wait_until(T, "pglb's page shows the store's leader and record", || {
        http_get(lb.stats, "/").is_ok_and(|(code, page)| {
            code == 200
                && page.contains("promoter b (follower) · store leader: a")
                && page.contains("recorded primary: pg-1 (timeline 2, epoch 2)")
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_paused_before_its_guarded_record_is_outrun_and_then_refused() {
    let etcd = EtcdCluster::start();
    let cluster = failover_cluster(2);
    let lb = Pglb::start(&cluster).await;
    // a stops itself (SIGSTOP) right before the guarded record of the replica it chose: a VM
    // paused at the worst moment, with the receivers already stopped.
    let a = with_store(&etcd, "a")
        .env("PGLB_PROMOTER_PAUSE_BEFORE", "record_primary")
        .start(&lb);
    wait_leading(&a, "a").await;
    let b = with_store(&etcd, "b").start(&lb);
    wait_following(&b, "a", "pg-0").await;

    kill9(cluster.node(0));
    wait_until(T, "a to pause before its record", || a.is_stopped()).await;
    // b takes over once a's lease has run out, and fails over itself.
    let s = b
        .wait_status(Duration::from_secs(60), "b to promote", |s| {
            s["last_failover"]["outcome"] == "promoted"
        })
        .await;
    let name = s["last_failover"]["to"].as_str().unwrap().to_string();
    assert_eq!(s["store"]["leader"], "b", "{s}");

    // a resumes where it stopped: its lease has lapsed, the guarded record is refused and it
    // promotes nobody.
    a.signal(libc::SIGCONT);
    let s = a
        .wait_status(T, "a's failover refused by the store gate", |s| {
            s["last_failover"]["outcome"] == "not_leader"
        })
        .await;
    assert!(s["guard_refusals"].as_u64().unwrap() >= 1, "{s}");
    assert_eq!(failovers(&s), 0, "{s}");
    let s = a
        .wait_status(T, "a following b", |s| {
            s["store"]["leader"] == "b" && s["store"]["is_leader"] == false
        })
        .await;
    assert_eq!(failovers(&s), 0, "{s}");
    let m = a.metrics().expect("metrics");
    assert!(
        metric(
            &m,
            "pglb_promoter_guard_refused_total",
            &[("reason", "not_leader")]
        )
        .is_some_and(|v| v >= 1.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "pglb_promoter_failovers_total",
            &[("outcome", "not_leader")]
        ),
        Some(1.0),
        "{m}"
    );
    let promoted = converged(&cluster, &lb, Duration::from_secs(60)).await;
    assert_eq!(cluster.node(promoted).name(), name);
    let sb = b.wait_steady(&name, T).await;
    assert_eq!(failovers(&sb), 1, "{sb}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_etcd_quorum_nobody_promotes_and_with_it_back_the_failover_completes() {
    let mut etcd = EtcdCluster::start();
    let cluster = failover_cluster(2);
    let lb = Pglb::start(&cluster).await;
    let a = with_store(&etcd, "a").start(&lb);
    wait_leading(&a, "a").await;
    let b = with_store(&etcd, "b").start(&lb);
    wait_following(&b, "a", "pg-0").await;

    etcd.stop_member(1);
    etcd.stop_member(2);
    a.wait_status(T, "a to stop leading without quorum", |s| {
        s["store"]["is_leader"] == false
    })
    .await;
    kill9(cluster.node(0));
    // Well past failover_after (2 s) for both: with the replicas and pglb agreeing that the
    // primary is gone, only the missing leadership holds them back.
    for p in [&a, &b] {
        let s = p
            .wait_status(T, "the primary down for 3 x failover_after", |s| {
                s["primary_down_seconds"].as_f64().unwrap_or(0.0) >= 6.0
            })
            .await;
        assert_eq!(failovers(&s), 0, "{s}");
        assert_eq!(s["store"]["is_leader"], false, "{s}");
        assert_eq!(s["store"]["reachable"], false, "{s}");
    }
    assert!(cluster.node(1).in_recovery() && cluster.node(2).in_recovery());

    etcd.start_member(1);
    etcd.start_member(2);
    etcd.wait_healthy(T);
    let promoted = converged(&cluster, &lb, Duration::from_secs(60)).await;
    let name = cluster.node(promoted).name().to_string();
    let sa = a.wait_steady(&name, T).await;
    let sb = b.wait_steady(&name, T).await;
    assert_eq!(failovers(&sa) + failovers(&sb), 1, "a: {sa}\nb: {sb}");
}

/// The leader alone loses etcd (its connections to every member cut, PostgreSQL still in
/// reach): it stops acting within the lease and steps down; the other promoter leads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_cut_off_from_etcd_alone_stops_acting_within_the_lease() {
    let etcd = EtcdCluster::start();
    let cluster = failover_cluster(2);
    let lb = Pglb::start(&cluster).await;
    let mut relays = Vec::new();
    for m in &etcd.members {
        relays.push(Relay::start(([127, 0, 0, 1], m.client_port).into()).await);
    }
    let through: Vec<String> = relays
        .iter()
        .map(|r| format!("http://{}", r.addr))
        .collect();
    let a = PromoterBuilder::new()
        .id("a")
        .store(&through, PREFIX, TTL)
        .start(&lb);
    wait_leading(&a, "a").await;
    let b = with_store(&etcd, "b").start(&lb);
    wait_following(&b, "a", "pg-0").await;

    let cut = Instant::now();
    for r in &relays {
        r.cut();
    }
    let s = a
        .wait_status(T, "a to stop leading", |s| s["store"]["is_leader"] == false)
        .await;
    let stopped = cut.elapsed();
    eprintln!("a stopped acting {stopped:?} after losing etcd (lease_ttl {TTL:?})");
    // Its validity ends a fifth of the TTL before the lease can expire in etcd; the rest is
    // the status page's own polling.
    assert!(
        stopped <= TTL + Duration::from_millis(500),
        "{stopped:?}: {s}"
    );
    wait_leading(&b, "b").await;
    let took = cut.elapsed();
    eprintln!("b leads {took:?} after the cut");
    assert!(
        stopped < took,
        "a stopped at {stopped:?}, b led at {took:?}"
    );
    // Nothing to do for either: the primary is fine.
    let s = a.wait_steady("pg-0", T).await;
    assert_eq!(failovers(&s), 0, "{s}");
    assert_eq!(s["store"]["reachable"], false, "{s}");
    let m = a.metrics().expect("metrics");
    assert_eq!(
        metric(
            &m,
            "pglb_promoter_leadership_changes_total",
            &[("to", "follower")]
        ),
        Some(1.0),
        "{m}"
    );
    assert!(cluster.node(1).in_recovery() && cluster.node(2).in_recovery());
}

/// A replica promoted by hand (outside the promoters) while the store names pg-0: the leader
/// keeps pg-0 as the primary and fences the other, newer timeline or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_promoted_by_hand_is_fenced_while_the_store_names_another() {
    let etcd = EtcdCluster::start();
    let cluster = failover_cluster(2);
    let lb = Pglb::start(&cluster).await;
    let a = with_store(&etcd, "a").start(&lb);
    wait_leading(&a, "a").await;
    a.wait_status(T, "the record of pg-0", |s| {
        s["store"]["record"]["name"] == "pg-0"
    })
    .await;
    cluster.node(1).promote();
    let s = a
        .wait_status(T, "pg-1 fenced, pg-0 still the primary", |s| {
            s["primary"] == "pg-0"
                && s["fenced"]
                    .as_array()
                    .is_some_and(|f| f.iter().any(|n| n == "pg-1"))
        })
        .await;
    assert_eq!(s["store"]["record"]["name"], "pg-0", "{s}");
    assert_eq!(failovers(&s), 0, "{s}");
    assert_eq!(
        cluster
            .node(1)
            .exec("SELECT current_setting('default_transaction_read_only')"),
        "on"
    );
    assert!(!cluster.node(0).in_recovery());
    assert_eq!(
        cluster
            .node(0)
            .exec("SELECT current_setting('default_transaction_read_only')"),
        "off"
    );
}

/// The leader dies between its guarded record (naming the replica it chose) and `pg_promote`,
/// and the old primary comes straight back. Whichever comes first (the other promoter finishing
/// the failover, or the old primary back), the store ends naming the one writable server.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_between_the_record_and_the_promotion_the_record_follows_the_servers() {
    let etcd = EtcdCluster::start();
    let cluster = failover_cluster(2);
    let lb = Pglb::start(&cluster).await;
    let mut a = with_store(&etcd, "a")
        .env("PGLB_PROMOTER_CRASH_AFTER", "recorded")
        .start(&lb);
    wait_leading(&a, "a").await;
    let b = with_store(&etcd, "b").start(&lb);
    wait_following(&b, "a", "pg-0").await;

    kill9(cluster.node(0));
    wait_until(T, "a to abort after its record", || a.exited()).await;
    restart_after_kill(cluster.node(0));
    let s = b
        .wait_status(
            Duration::from_secs(60),
            "b steady on the recorded primary",
            |s| {
                s["store"]["is_leader"] == true
                    && s["decision"] == "steady"
                    && s["store"]["record"]["name"] == s["primary"]
                    && s["store"]["record"]["timeline"]
                        == s["nodes"]
                            .as_array()
                            .and_then(|ns| ns.iter().find(|n| n["role"] == "primary"))
                            .map(|n| n["timeline"].clone())
                            .unwrap_or_default()
            },
        )
        .await;
    eprintln!(
        "after a leader died between record and promotion: primary {}, record {}",
        s["primary"], s["store"]["record"]
    );
    assert!(s["store"]["record"]["epoch"].as_u64().unwrap() >= 3, "{s}");
    let primary = s["primary"].as_str().unwrap();
    let writable: Vec<&str> = cluster
        .nodes()
        .iter()
        .filter(|n| !n.in_recovery())
        .map(|n| n.name())
        .collect();
    // The old primary, if another was promoted, is writable but fenced (read-only).
    let fenced_or_primary = writable.iter().all(|&n| {
        n == primary
            || cluster
                .nodes()
                .iter()
                .find(|x| x.name() == n)
                .is_some_and(|x| {
                    x.exec("SELECT current_setting('default_transaction_read_only')") == "on"
                })
    });
    assert!(
        fenced_or_primary,
        "writable: {writable:?}, primary {primary}"
    );
    let p = cluster
        .nodes()
        .iter()
        .find(|n| n.name() == primary)
        .unwrap();
    for r in cluster.nodes().iter().filter(|n| n.in_recovery()) {
        let name = r.name().to_string();
        wait_until(T, &format!("{name} streaming from {primary}"), || {
            streams_to(p, &name)
        })
        .await;
    }
}

/// The acting promoter aborts right after `step` of a failover (a kill -9 at that point). It
/// is started again; with a store another promoter runs too, and pglb follows the store's
/// record. Replication is synchronous (`ANY 1`) and a client writes through pglb all along: the
/// cluster converges within 60 s and every commit acknowledged to the client is on the new
/// primary.
async fn killed_after(step: &str, store: bool) {
    let etcd = store.then(EtcdCluster::start);
    let cluster = failover_cluster(2);
    let lb = match &etcd {
        Some(e) => {
            let endpoints: Vec<toml::Value> = e.endpoints().into_iter().map(Into::into).collect();
            Pglb::builder(&cluster)
                .set("store", "kind", "etcd")
                .set("store", "endpoints", endpoints)
                .set("store", "prefix", PREFIX)
                .set("store", "lease_ttl", format!("{}s", TTL.as_secs()))
                .start()
        }
        None => Pglb::builder(&cluster).start(),
    };
    lb.wait_ready().await;
    let builder = match &etcd {
        Some(e) => with_store(e, "a"),
        None => PromoterBuilder::new(),
    };
    let mut a = builder
        .set("synchronous", true)
        .env("PGLB_PROMOTER_CRASH_AFTER", step)
        .start(&lb);
    let b = match &etcd {
        Some(e) => {
            wait_leading(&a, "a").await;
            let b = with_store(e, "b").set("synchronous", true).start(&lb);
            wait_following(&b, "a", "pg-0").await;
            Some(b)
        }
        None => {
            a.wait_steady("pg-0", T).await;
            None
        }
    };
    wait_until(T, "both standbys in the synchronous quorum", || {
        cluster
            .node(0)
            .exec("SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'quorum'")
            == "2"
    })
    .await;
    let writer = Writer::start(lb.write, "acked").await;
    writer.wait_count(100, T).await;

    kill9(cluster.node(0));
    wait_until(T, &format!("the promoter to abort after {step}"), || {
        a.exited()
    })
    .await;
    let died = Instant::now();
    a.remove_env("PGLB_PROMOTER_CRASH_AFTER");
    a.start_again();
    let promoted = converged(&cluster, &lb, Duration::from_secs(60)).await;
    eprintln!(
        "killed after {step} ({}): converged {:?} after the death",
        if store { "etcd" } else { "no store" },
        died.elapsed()
    );
    let name = cluster.node(promoted).name().to_string();
    // The writer goes on through pglb on the new primary; nothing it was told is committed is
    // missing there.
    writer.wait_count(writer.count() + 50, T).await;
    let acks = writer.stop().await;
    let after = acks.iter().filter(|a| a.at > died).count();
    let missing = missing_rows(cluster.node(promoted), "acked", &acks);
    assert!(
        missing.is_empty(),
        "acknowledged commits missing on {name}: {missing:?} ({} acknowledged)",
        acks.len()
    );
    eprintln!(
        "{} commits acknowledged ({after} after the promoter died), none lost",
        acks.len()
    );
    a.wait_steady(&name, T).await;
    if let Some(b) = &b {
        b.wait_steady(&name, T).await;
        let s = b
            .wait_status(T, "the record naming the new primary", |s| {
                s["store"]["record"]["name"] == name.as_str()
                    && s["store"]["record"]["timeline"] == 2
            })
            .await;
        eprintln!("record: {}", s["store"]["record"]);
    }
    if step == "promoted" {
        // Killed before the promoted server's first CHECKPOINT: the old primary, back (and
        // fenced), still rejoins as a replica of it and really streams.
        restart_after_kill(cluster.node(0));
        rejoin(&a, cluster.node(0)).await;
        assert!(cluster.node(0).in_recovery());
        wait_until(T, "pg-0 streaming from the new primary", || {
            streams_to(cluster.node(promoted), "pg-0")
        })
        .await;
    }
    // Nothing is left held by the failover: no saved upstream on either replica.
    for i in 1..=2 {
        let saved = cluster
            .node(i)
            .exec("SELECT coalesce(current_setting('pglb.saved_primary_conninfo', true), '')");
        let conninfo = cluster
            .node(i)
            .exec("SELECT current_setting('primary_conninfo')");
        assert!(
            saved.is_empty() || !conninfo.is_empty() || i == promoted,
            "{} still held: primary_conninfo {conninfo:?}, saved {saved:?}",
            cluster.node(i).name()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_after_stopping_the_receivers_without_a_store_converges() {
    killed_after("receivers_stopped", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_after_promoting_without_a_store_converges() {
    killed_after("promoted", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_after_repointing_without_a_store_converges() {
    killed_after("repointed", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_after_stopping_the_receivers_with_a_store_converges() {
    killed_after("receivers_stopped", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_after_promoting_with_a_store_converges() {
    killed_after("promoted", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_after_repointing_with_a_store_converges() {
    killed_after("repointed", true).await;
}

/// Rewrites the `[store]` of a running promoter's config (none: removed); it reloads.
fn reload_store(p: &Promoter, store: Option<(&EtcdCluster, &str)>) {
    let text = std::fs::read_to_string(p.config_path()).expect("read promoter config");
    let mut root: toml::Table = toml::from_str(&text).expect("parse promoter config");
    root.remove("store");
    if let Some((etcd, prefix)) = store {
        let endpoints: Vec<toml::Value> = etcd.endpoints().into_iter().map(Into::into).collect();
        let mut t = toml::Table::new();
        t.insert("kind".into(), "etcd".into());
        t.insert("endpoints".into(), toml::Value::Array(endpoints));
        t.insert("prefix".into(), prefix.into());
        t.insert("lease_ttl".into(), format!("{}s", TTL.as_secs()).into());
        root.insert("store".into(), toml::Value::Table(t));
    }
    std::fs::write(p.config_path(), toml::to_string(&root).unwrap()).expect("write config");
}

/// `[store]` reloads in the promoter: moved from no store to etcd, it campaigns, leads and
/// records the primary; moved to another prefix, it gives the old leader key up at once (the
/// other promoter there leads) before it leads under the new one; store removed, it acts alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_promoter_follows_its_reloaded_store_section() {
    let etcd = EtcdCluster::start();
    let cluster = failover_cluster(2);
    let lb = Pglb::start(&cluster).await;
    let a = PromoterBuilder::new().id("a").start(&lb);
    let s = a.wait_steady("pg-0", T).await;
    assert!(s["store"].is_null(), "{s}");

    reload_store(&a, Some((&etcd, PREFIX)));
    a.wait_status(T, "a to lead and record pg-0", |s| {
        s["store"]["is_leader"] == true && s["store"]["record"]["name"] == "pg-0"
    })
    .await;
    let old = EtcdStore::connect(&etcd.store_config(&[0, 1, 2], PREFIX, TTL))
        .await
        .expect("connect to etcd");
    assert_eq!(
        old.primary()
            .await
            .expect("read the record")
            .map(|r| r.name),
        Some("pg-0".to_string())
    );
    let b = with_store(&etcd, "b").start(&lb);
    wait_following(&b, "a", "pg-0").await;

    // Another prefix: a resigns there (b takes over), then leads alone under the new one.
    let other = "/pglb/test-other";
    reload_store(&a, Some((&etcd, other)));
    wait_leading(&b, "b").await;
    a.wait_status(T, "a to lead under the new prefix", |s| {
        s["store"]["is_leader"] == true && s["store"]["record"]["name"] == "pg-0"
    })
    .await;
    let new = EtcdStore::connect(&etcd.store_config(&[0, 1, 2], other, TTL))
        .await
        .expect("connect to etcd");
    assert_eq!(
        new.leader().await.expect("read the leader").map(|l| l.id),
        Some("a".to_string())
    );
    assert_eq!(
        old.leader().await.expect("read the leader").map(|l| l.id),
        Some("b".to_string())
    );
    assert!(a
        .log_text()
        .contains("giving up the leadership under the old settings"));

    // No store: a acts alone again (b is stopped first: two promoters acting is what the store
    // is for).
    drop(b);
    reload_store(&a, None);
    let s = a
        .wait_status(T, "a without a store", |s| s["store"].is_null())
        .await;
    assert_eq!(s["reload"]["result"], "applied", "{s}");
    // It acts: a replica promoted by hand is on the newest timeline, and a alone (no record
    // to say otherwise) fences pg-0 for it.
    cluster.node(1).promote();
    a.wait_status(T, "pg-1 the primary, pg-0 fenced by a", |s| {
        s["primary"] == "pg-1"
            && s["fenced"]
                .as_array()
                .is_some_and(|f| f.iter().any(|n| n == "pg-0"))
    })
    .await;
    assert_eq!(
        cluster
            .node(0)
            .exec("SELECT current_setting('default_transaction_read_only')"),
        "on"
    );
}
