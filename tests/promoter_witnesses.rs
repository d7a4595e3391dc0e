//! Several pglb as witnesses (`pglb_url` as a list) against real PostgreSQL and two real pglb:
//! a pglb that still sees the primary holds a failover back even when the other one does not,
//! and a pglb that cannot be reached abstains, exactly as a single unreachable pglb always did.

mod common;

use std::time::Duration;

use common::promoter::*;
use common::*;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_pglb_seeing_the_primary_holds_back_and_an_unreachable_one_abstains() {
    let cluster = failover_cluster(2);
    // pglb A and the promoter reach pg-0 through a relay that can be cut; pglb B reaches it
    // directly.
    let relay = Relay::start(cluster.node(0).addr()).await;
    let mut via_relay = cluster.backends();
    via_relay[0].address = relay.addr.to_string();
    let lb_a = Pglb::builder(&cluster).backends(via_relay).start();
    lb_a.wait_ready().await;
    let mut lb_b = Pglb::start(&cluster).await;
    let promoter = PromoterBuilder::new()
        .pglb_urls(&[lb_a.stats, lb_b.stats])
        .address("pg-0", relay.addr)
        .start(&lb_a);
    let s = promoter.wait_steady("pg-0", T).await;
    let witnesses = s["witnesses"].as_array().expect("witnesses");
    assert_eq!(witnesses.len(), 2, "{s}");
    for (w, lb) in witnesses.iter().zip([&lb_a, &lb_b]) {
        assert_eq!(w["at"], lb.stats.to_string(), "{s}");
        assert_eq!(w["state"], "reachable", "{s}");
        assert_eq!(w["primary"], "pg-0", "{s}");
    }

    // The replicas lose the primary (receivers stopped) and the promoter and pglb A lose it
    // too (relay cut): everything but pglb B says the primary is gone.
    for r in cluster.replicas() {
        r.exec("ALTER SYSTEM SET primary_conninfo = ''");
        r.exec("SELECT pg_reload_conf()");
    }
    relay.cut();
    lb_a.wait_stats(T, "pglb A to lose pg-0", |st| st.primary.is_none())
        .await;
    let s = promoter
        .wait_status(T, "a wait on pglb B past failover_after", |s| {
            s["decision"] == "wait"
                && s["reason_kind"] == "pglb_sees_primary"
                && s["primary_down_seconds"].as_f64().unwrap_or(0.0) > 4.0
        })
        .await;
    assert!(
        s["reason"].as_str().unwrap_or("").contains("pg-0"),
        "the evidence names the primary pglb B sees: {s}"
    );
    assert_eq!(s["witnesses"][0]["primary"], serde_json::Value::Null, "{s}");
    assert_eq!(s["witnesses"][1]["primary"], "pg-0", "{s}");
    assert_eq!(s["failovers"], 0, "{s}");
    for r in cluster.replicas() {
        assert!(r.in_recovery(), "{} was promoted", r.name());
    }

    // pg-0 really dies and pglb B goes away: B cannot confirm anything and abstains, A sees no
    // primary, the replicas lost it: the failover goes ahead.
    kill9(cluster.node(0));
    lb_b.terminate(Duration::from_secs(10));
    let s = promoter
        .wait_status(T, "a promotion with pglb B unreachable", |s| {
            s["last_failover"]["outcome"] == "promoted"
        })
        .await;
    let reason = s["last_failover"]["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains(&format!("{}: no primary", lb_a.stats))
            && reason.contains(&format!("{}: unreachable", lb_b.stats)),
        "the failover record names each witness: {s}"
    );
    let to = s["last_failover"]["to"].as_str().expect("promoted node");
    assert!(to == "pg-1" || to == "pg-2", "{s}");
    lb_a.wait_stats(T, "pglb A to route writes to the promoted node", |st| {
        st.primary.as_deref() == Some(to)
    })
    .await;
    drop(relay);
}
