//! pglb following the primary recorded in etcd (`[store] kind = "etcd"`), against a real
//! 3-member etcd and real PostgreSQL: writes go to the recorded server, a server promoted by
//! hand is fenced, writes move with the record, an etcd without quorum leaves writes on the last
//! recorded primary (and none once it dies, reads going on), and a pglb that never read the store
//! takes no writes until it answers; a reloaded `[store]` is followed with its new settings.
//! The record is written as a promoter does: `EtcdStore::record_primary` under a campaign's
//! leadership.

mod common;

use std::time::Duration;

use common::etcd::EtcdCluster;
use common::*;
use pglb::backend::Role;
use pglb::store::{Campaign, EtcdStore, PrimaryRecord, Store};
use pglb::view::{FenceReason, StoreRule, StoreView, WriteBlock};

const T: Duration = Duration::from_secs(20);
const PREFIX: &str = "/pglb/routing-test";
/// pglb reads the record every third of it (1 s).
const TTL: Duration = Duration::from_secs(3);

/// Writes the record the way the leading promoter does.
struct Recorder {
    store: EtcdStore,
    campaign: Campaign,
}

impl Recorder {
    async fn start(etcd: &EtcdCluster) -> Recorder {
        let store = EtcdStore::connect(&etcd.store_config(&[0, 1, 2], PREFIX, TTL))
            .await
            .expect("connect to etcd");
        let campaign = store.campaign("test-recorder").await.expect("campaign");
        let rx = campaign.leadership();
        wait_until(T, "the recorder to lead", || rx.borrow().is_leader()).await;
        Recorder { store, campaign }
    }

    async fn record(&self, name: &str, timeline: u32, epoch: u64) {
        let record = PrimaryRecord {
            name: name.into(),
            timeline,
            epoch,
        };
        self.store
            .record_primary(&self.campaign.current(), &record)
            .await
            .expect("record the primary");
    }
}

/// pglb in front of `cluster`, following the store of `etcd` (all three members).
fn with_store(b: PglbBuilder, etcd: &EtcdCluster) -> PglbBuilder {
    let endpoints: Vec<toml::Value> = etcd.endpoints().into_iter().map(Into::into).collect();
    b.set("store", "kind", "etcd")
        .set("store", "endpoints", endpoints)
        .set("store", "prefix", PREFIX)
        .set("store", "lease_ttl", "3s")
}

fn store_of(s: &Stats) -> &StoreView {
    s.store
        .as_ref()
        .unwrap_or_else(|| panic!("no store section in stats.json: {}", s.raw))
}

fn recorded_name(s: &Stats) -> Option<&str> {
    s.store.as_ref()?.recorded.as_ref().map(|r| r.name.as_str())
}

/// Sum of every sample of metric `name` (with any labels) on pglb's `/metrics`.
fn metric(lb: &Pglb, name: &str) -> Option<f64> {
    let (code, body) = http_get(lb.stats, "/metrics").ok()?;
    assert_eq!(code, 200, "/metrics: {body}");
    let values: Vec<f64> = body
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_follow_the_record_and_a_server_promoted_by_hand_is_fenced() {
    let etcd = EtcdCluster::start();
    let cluster = PgCluster::start(1);
    let (pg0, pg1) = (cluster.node(0), cluster.node(1));
    let recorder = Recorder::start(&etcd).await;
    recorder.record("pg-0", pg0.timeline(), 1).await;
    let lb = with_store(Pglb::builder(&cluster), &etcd).start();

    let s = lb
        .wait_stats(T, "pg-0 primary by the record, pg-1 replica", |s| {
            s.primary.as_deref() == Some("pg-0")
                && recorded_name(s) == Some("pg-0")
                && s.try_backend("pg-1")
                    .is_some_and(|b| b.role == Role::Replica)
        })
        .await;
    let st = store_of(&s);
    assert_eq!(st.rule, StoreRule::Record, "{}", s.raw);
    assert!(st.reachable, "{}", s.raw);
    assert_eq!(st.kind, "etcd");
    assert_eq!(st.endpoints, etcd.endpoints());
    assert_eq!(st.recorded.as_ref().map(|r| r.epoch), Some(1));
    assert!(st.seconds_since_answer.is_some(), "{}", s.raw);

    let held = connect_ok(lb.write).await;
    assert_eq!(backend_port(&held).await, pg0.port());
    held.batch_execute("CREATE TABLE by_record (id int); INSERT INTO by_record VALUES (1)")
        .await
        .expect("write on the recorded primary");

    // A replica promoted outside any promoter: writable on a newer timeline, but not recorded.
    pg1.exec("SELECT pg_promote()");
    assert!(!pg1.in_recovery(), "pg-1 must be writable now");
    assert!(pg1.timeline() > pg0.timeline());
    let s = lb
        .wait_stats(T, "pg-1 fenced as not recorded", |s| {
            s.try_backend("pg-1").is_some_and(|b| {
                b.role == Role::Fenced && b.fence_reason == Some(FenceReason::NotRecorded)
            })
        })
        .await;
    assert_eq!(s.primary.as_deref(), Some("pg-0"), "{}", s.raw);
    assert_eq!(
        s.backend("pg-0").role,
        Role::Primary,
        "the record keeps pg-0 whatever the timelines say: {}",
        s.raw
    );
    for _ in 0..5 {
        assert_eq!(
            landing_port(lb.write).await,
            pg0.port(),
            "a write session left pg-0"
        );
        assert_ne!(
            landing_port(lb.read).await,
            pg1.port(),
            "a session reached the fenced pg-1"
        );
    }
    assert_eq!(
        scalar_ok(&held, "SELECT count(*) FROM by_record").await,
        "1",
        "the write session on the recorded primary goes on"
    );

    // The record moves to pg-1 (as a promoter records a failover): writes move there, the write
    // session still on pg-0 is closed.
    recorder.record("pg-1", pg1.timeline(), 2).await;
    let recorded_at = std::time::Instant::now();
    let s = lb
        .wait_stats(T, "pg-1 primary by the record, pg-0 fenced", |s| {
            s.primary.as_deref() == Some("pg-1")
                && s.try_backend("pg-0").is_some_and(|b| {
                    b.role == Role::Fenced && b.fence_reason == Some(FenceReason::NotRecorded)
                })
        })
        .await;
    eprintln!(
        "figure: writes moved to the newly recorded primary {:?} after the record was committed",
        recorded_at.elapsed()
    );
    assert_eq!(
        store_of(&s)
            .recorded
            .as_ref()
            .map(|r| (r.name.as_str(), r.epoch)),
        Some(("pg-1", 2)),
        "{}",
        s.raw
    );
    wait_until_async(
        T,
        "the write session on pg-0 to be closed by pglb",
        || async { held.is_closed() || scalar(&held, "SELECT 1").await.is_err() },
    )
    .await;
    let w = connect_ok(lb.write).await;
    assert_eq!(backend_port(&w).await, pg1.port());
    w.batch_execute("CREATE TABLE after_record (id int); INSERT INTO after_record VALUES (2)")
        .await
        .expect("write on the newly recorded primary");
    assert!(
        pg0.try_exec("SELECT 1 FROM after_record").is_err(),
        "the write reached pg-0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_an_etcd_majority_writes_stay_on_the_last_recorded_primary_only() {
    let mut etcd = EtcdCluster::start();
    let cluster = PgCluster::start(1);
    let (pg0, pg1) = (cluster.node(0), cluster.node(1));
    let recorder = Recorder::start(&etcd).await;
    recorder.record("pg-0", pg0.timeline(), 1).await;
    let lb = with_store(Pglb::builder(&cluster), &etcd).start();
    lb.wait_stats(T, "pg-0 primary by the record", |s| {
        s.primary.as_deref() == Some("pg-0")
            && s.store
                .as_ref()
                .is_some_and(|st| st.rule == StoreRule::Record)
    })
    .await;
    assert_eq!(metric(&lb, "pglb_store_up"), Some(1.0));
    drop(recorder);

    // Two of three members gone: no quorum, nothing can be read or recorded.
    etcd.stop_member(1);
    etcd.stop_member(2);
    let stopped_at = std::time::Instant::now();
    let s = lb
        .wait_stats(T, "the store unreachable, writes still on pg-0", |s| {
            s.store
                .as_ref()
                .is_some_and(|st| !st.reachable && st.rule == StoreRule::LastRecord)
        })
        .await;
    eprintln!(
        "figure: the store shown unreachable {:?} after two of three etcd members stopped",
        stopped_at.elapsed()
    );
    assert_eq!(s.primary.as_deref(), Some("pg-0"), "{}", s.raw);
    let st = store_of(&s);
    assert_eq!(st.recorded.as_ref().map(|r| r.name.as_str()), Some("pg-0"));
    assert!(st.errors > 0, "{}", s.raw);
    assert!(
        st.last_error.is_some() && st.last_error_kind.is_some(),
        "{}",
        s.raw
    );
    assert_eq!(metric(&lb, "pglb_store_up"), Some(0.0));
    assert!(metric(&lb, "pglb_store_errors_total").is_some_and(|n| n > 0.0));
    let w = connect_ok(lb.write).await;
    assert_eq!(backend_port(&w).await, pg0.port());
    w.batch_execute("CREATE TABLE no_quorum (id int); INSERT INTO no_quorum VALUES (1)")
        .await
        .expect("write on the last recorded primary while etcd has no quorum");

    // Never to an unrecorded server: one promoted by hand now is fenced too.
    pg1.exec("SELECT pg_promote()");
    let s = lb
        .wait_stats(T, "pg-1 fenced while the store is unreachable", |s| {
            s.try_backend("pg-1").is_some_and(|b| {
                b.role == Role::Fenced && b.fence_reason == Some(FenceReason::NotRecorded)
            })
        })
        .await;
    assert_eq!(s.primary.as_deref(), Some("pg-0"), "{}", s.raw);
    assert_eq!(landing_port(lb.write).await, pg0.port());
    assert!(
        scalar(&w, "SELECT 1").await.is_ok(),
        "the open write session goes on"
    );

    // Quorum back: the store answers again.
    etcd.start_member(1);
    etcd.start_member(2);
    etcd.wait_healthy(T);
    lb.wait_stats(T, "the store reachable again", |s| {
        s.store
            .as_ref()
            .is_some_and(|st| st.reachable && st.rule == StoreRule::Record)
    })
    .await;
    assert_eq!(metric(&lb, "pglb_store_up"), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn started_with_the_store_unreachable_no_writes_until_it_answers() {
    let mut etcd = EtcdCluster::start();
    let cluster = PgCluster::start(1);
    let (pg0, pg1) = (cluster.node(0), cluster.node(1));
    etcd.stop_member(1);
    etcd.stop_member(2);
    let lb = with_store(Pglb::builder(&cluster), &etcd)
        .set("proxy", "wait_for_backend", "0s")
        .start();

    // pg-0 is up and writable (pglb's own rule would make it the primary), yet nothing was ever
    // read from the store: no writes, and the reason shown.
    let s = lb
        .wait_stats(T, "pg-0 and pg-1 up, the store never read", |s| {
            s.try_backend("pg-0").is_some_and(|b| b.state == "up")
                && s.try_backend("pg-1").is_some_and(|b| b.state == "up")
                && s.store.as_ref().is_some_and(|st| st.errors > 0)
        })
        .await;
    assert_eq!(s.primary, None, "{}", s.raw);
    let st = store_of(&s);
    assert!(!st.reachable);
    assert_eq!(st.rule, StoreRule::Unreachable, "{}", s.raw);
    assert_eq!(
        st.write_block,
        Some(WriteBlock::StoreUnreachable),
        "{}",
        s.raw
    );
    assert!(st.recorded.is_none() && st.seconds_since_answer.is_none());
    expect_pglb_fatal(lb.write).await;
    assert_eq!(lb.health_status(), Ok(503));
    assert_eq!(landing_port(lb.read).await, pg1.port(), "reads go on");
    assert_eq!(metric(&lb, "pglb_store_up"), Some(0.0));
    assert_eq!(
        metric(&lb, "pglb_store_rule{rule=\"unreachable\"}"),
        Some(1.0)
    );

    // The store answers, with no record in it (no promoter yet): pglb's own rule, and it says so.
    etcd.start_member(1);
    etcd.start_member(2);
    etcd.wait_healthy(T);
    let s = lb
        .wait_stats(T, "the store reachable without a record", |s| {
            s.store.as_ref().is_some_and(|st| st.reachable) && s.primary.is_some()
        })
        .await;
    let st = store_of(&s);
    assert_eq!(st.rule, StoreRule::NoRecord, "{}", s.raw);
    assert!(
        st.recorded.is_none() && st.write_block.is_none(),
        "{}",
        s.raw
    );
    assert_eq!(s.primary.as_deref(), Some("pg-0"));
    assert_eq!(landing_port(lb.write).await, pg0.port());

    // A promoter records pg-0: the record decides from now on.
    let recorder = Recorder::start(&etcd).await;
    recorder.record("pg-0", pg0.timeline(), 1).await;
    let s = lb
        .wait_stats(T, "the record read", |s| recorded_name(s) == Some("pg-0"))
        .await;
    assert_eq!(store_of(&s).rule, StoreRule::Record, "{}", s.raw);
    assert_eq!(s.primary.as_deref(), Some("pg-0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_an_etcd_majority_a_dead_recorded_primary_leaves_reads_and_says_why_no_writes() {
    let mut etcd = EtcdCluster::start();
    let cluster = PgCluster::start(1);
    let (pg0, pg1) = (cluster.node(0), cluster.node(1));
    let recorder = Recorder::start(&etcd).await;
    recorder.record("pg-0", pg0.timeline(), 1).await;
    drop(recorder);
    let lb = with_store(Pglb::builder(&cluster), &etcd)
        .set("proxy", "wait_for_backend", "0s")
        .start();
    lb.wait_stats(T, "pg-0 primary by the record", |s| {
        s.primary.as_deref() == Some("pg-0") && recorded_name(s) == Some("pg-0")
    })
    .await;
    etcd.stop_member(1);
    etcd.stop_member(2);
    lb.wait_stats(T, "the store unreachable", |s| {
        s.store.as_ref().is_some_and(|st| !st.reachable)
    })
    .await;

    // The recorded primary dies while nothing can be recorded: no writes anywhere, reads go on.
    pg0.kill();
    let s = lb
        .wait_stats(T, "no primary, the recorded one down", |s| {
            s.primary.is_none() && s.try_backend("pg-0").is_some_and(|b| b.state == "down")
        })
        .await;
    let st = store_of(&s);
    assert_eq!(st.rule, StoreRule::LastRecord, "{}", s.raw);
    assert_eq!(
        st.write_block,
        Some(WriteBlock::RecordedDown {
            name: "pg-0".into()
        }),
        "{}",
        s.raw
    );
    expect_pglb_fatal(lb.write).await;
    assert_eq!(lb.health_status(), Ok(503));
    assert_eq!(landing_port(lb.read).await, pg1.port(), "reads go on");
}

/// `[store]` reloads: pglb started with endpoints where no etcd answers takes no writes; the
/// file rewritten with the real ones, it follows the store (reachable, the record applied,
/// writes on the recorded server); `[store]` removed, its own rule again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reloaded_store_section_is_followed_with_its_new_settings() {
    let etcd = EtcdCluster::start();
    let cluster = PgCluster::start(1);
    let (pg0, pg1) = (cluster.node(0), cluster.node(1));
    let recorder = Recorder::start(&etcd).await;
    recorder.record("pg-0", pg0.timeline(), 1).await;
    let nowhere: Vec<toml::Value> = vec![format!("http://127.0.0.1:{}", free_port()).into()];
    let config = |b: PglbBuilder, endpoints: Vec<toml::Value>| {
        b.set("store", "kind", "etcd")
            .set("store", "endpoints", endpoints)
            .set("store", "prefix", PREFIX)
            .set("store", "lease_ttl", "3s")
    };
    let lb = config(Pglb::builder(&cluster), nowhere).start();
    let s = lb
        .wait_stats(T, "the store unreachable, no primary", |s| {
            s.store
                .as_ref()
                .is_some_and(|st| !st.reachable && st.errors > 0)
        })
        .await;
    assert_eq!(s.primary, None, "{}", s.raw);
    assert_eq!(store_of(&s).rule, StoreRule::Unreachable, "{}", s.raw);

    let endpoints: Vec<toml::Value> = etcd.endpoints().into_iter().map(Into::into).collect();
    std::fs::write(
        lb.config_path(),
        config(Pglb::builder(&cluster), endpoints).render(lb.write, lb.read, lb.stats),
    )
    .unwrap();
    let s = lb
        .wait_stats(T, "the store reachable, pg-0 primary by the record", |s| {
            s.store.as_ref().is_some_and(|st| st.reachable)
                && recorded_name(s) == Some("pg-0")
                && s.primary.as_deref() == Some("pg-0")
        })
        .await;
    let st = store_of(&s);
    assert_eq!(st.rule, StoreRule::Record, "{}", s.raw);
    assert_eq!(st.endpoints, etcd.endpoints(), "{}", s.raw);
    let w = connect_ok(lb.write).await;
    assert_eq!(backend_port(&w).await, pg0.port());
    w.batch_execute("CREATE TABLE after_reload (id int); INSERT INTO after_reload VALUES (1)")
        .await
        .expect("write on the recorded primary");
    // The record moves: writes follow it, so this really is the store being followed.
    pg1.exec("SELECT pg_promote()");
    recorder.record("pg-1", pg1.timeline(), 2).await;
    lb.wait_stats(T, "pg-1 primary by the new record", |s| {
        s.primary.as_deref() == Some("pg-1") && recorded_name(s) == Some("pg-1")
    })
    .await;
    assert_eq!(landing_port(lb.write).await, pg1.port());

    // No store any more: no store section; pg-1, on the newest timeline, by pglb's own rule.
    std::fs::write(
        lb.config_path(),
        Pglb::builder(&cluster).render(lb.write, lb.read, lb.stats),
    )
    .unwrap();
    let s = lb
        .wait_stats(T, "no store section", |s| s.store.is_none())
        .await;
    assert_eq!(s.primary.as_deref(), Some("pg-1"), "{}", s.raw);
    assert_eq!(
        s.reload.result,
        pglb::reload::ReloadResult::Applied,
        "{}",
        s.raw
    );
}
