//! TLS against real PostgreSQL servers whose `pg_hba.conf` has only `hostssl` lines: pglb's
//! checks and the promoter with libpq's `sslmode`s (a test CA made with openssl at test time).

mod common;

use std::time::Duration;

use common::tls::TlsCluster;
use common::*;

const T: Duration = Duration::from_secs(30);

fn path(p: &std::path::Path) -> String {
    p.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_with_require_and_verify_full_bring_hostssl_only_backends_up() {
    let tc = TlsCluster::start(1, false);

    // Plaintext checks find no pg_hba.conf entry: down, as before this could be configured.
    let plain = Pglb::builder(&tc.cluster)
        .set("check", "sslmode", "disable")
        .start();
    let s = plain.wait_backend_state("pg-0", "down", T).await;
    assert_eq!(
        s.backend("pg-0").last_error_kind.as_deref(),
        Some("auth"),
        "{}",
        s.raw
    );
    drop(plain);

    // require: encrypted, not verified.
    let lb = Pglb::builder(&tc.cluster)
        .set("check", "sslmode", "require")
        .start();
    lb.wait_ready().await;
    let s = lb.wait_backend_state("pg-1", "up", T).await;
    assert_eq!(s.primary.as_deref(), Some("pg-0"));
    assert_eq!(s.backend("pg-1").role.as_str(), "replica");
    // Sessions still pass through with the client's own TLS.
    assert_eq!(
        psql_tcp(lb.write, "require", "select pg_is_in_recovery()").unwrap(),
        "f"
    );
    drop(lb);

    // verify-full against the CA, by the name in the certificate.
    let lb = Pglb::builder(&tc.cluster)
        .backends(tc.backends_by_name())
        .set("check", "sslmode", "verify-full")
        .set("check", "sslrootcert", path(&tc.ca.cert))
        .start();
    lb.wait_ready().await;
    let s = lb.wait_backend_state("pg-1", "up", T).await;
    assert_eq!(s.primary.as_deref(), Some("pg-0"));
    drop(lb);

    // By IP address the name does not match: verify-full refuses with the verifier's reason,
    // verify-ca (the chain only) accepts.
    let lb = Pglb::builder(&tc.cluster)
        .set("check", "sslmode", "verify-full")
        .set("check", "sslrootcert", path(&tc.ca.cert))
        .start();
    let s = lb.wait_backend_state("pg-0", "down", T).await;
    let b = s.backend("pg-0");
    assert_eq!(b.last_error_kind.as_deref(), Some("tls"), "{}", s.raw);
    assert!(
        b.last_error
            .as_deref()
            .unwrap_or("")
            .contains("not valid for name"),
        "{}",
        s.raw
    );
    drop(lb);
    let lb = Pglb::builder(&tc.cluster)
        .set("check", "sslmode", "verify-ca")
        .set("check", "sslrootcert", path(&tc.ca.cert))
        .start();
    lb.wait_ready().await;
    lb.wait_backend_state("pg-1", "up", T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_marks_backends_down_with_kind_tls() {
    let tc = TlsCluster::start(0, false);
    let lb = Pglb::builder(&tc.cluster)
        .backends(tc.backends_by_name())
        .set("check", "sslmode", "verify-full")
        .set("check", "sslrootcert", path(&tc.other_ca.cert))
        .start();
    let s = lb.wait_backend_state("pg-0", "down", T).await;
    let b = s.backend("pg-0");
    assert_eq!(b.last_error_kind.as_deref(), Some("tls"), "{}", s.raw);
    // The verifier's reason, on the stats page as in /stats.json.
    let reason = b.last_error.clone().unwrap_or_default();
    assert!(reason.contains("UnknownIssuer"), "{reason}");
    let (_, page) = http_get(lb.stats, "/").unwrap();
    assert!(
        page.contains("UnknownIssuer"),
        "stats page lacks the reason"
    );
    let (_, metrics) = http_get(lb.stats, "/metrics").unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("pglb_checks_total") && l.contains("result=\"tls\"")),
        "no pglb_checks_total{{result=\"tls\"}}"
    );
    assert!(s.primary.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_promoter_fails_over_a_hostssl_only_cluster_and_rejoins_the_old_primary() {
    use common::promoter::*;
    let tc = TlsCluster::start(2, true);
    let cluster = &tc.cluster;
    let ca = path(&tc.ca.cert);
    let lb = Pglb::builder(cluster)
        .backends(tc.backends_by_name())
        .set("check", "sslmode", "verify-full")
        .set("check", "sslrootcert", ca.as_str())
        .start();
    lb.wait_ready().await;
    let promoter = PromoterBuilder::new()
        .set("sslmode", "verify-full")
        .set("sslrootcert", ca.as_str())
        .start(&lb);
    promoter.wait_steady("pg-0", T).await;
    psql_tcp(lb.write, "require", "create table t (id int)").unwrap();

    kill9(cluster.node(0));
    let s = promoter
        .wait_status(T, "a promotion", |s| {
            s["last_failover"]["outcome"] == "promoted"
        })
        .await;
    let new_name = s["last_failover"]["to"].as_str().unwrap().to_string();
    let new = cluster
        .nodes()
        .iter()
        .find(|n| n.name() == new_name)
        .unwrap();
    let other = cluster
        .replicas()
        .iter()
        .find(|n| n.name() != new_name)
        .unwrap();
    // Re-pointed with the promoter's TLS settings; hostssl-only, so it streams over TLS.
    wait_until(
        T,
        &format!("{} streaming from {new_name}", other.name()),
        || streams_to(new, other.name()),
    )
    .await;
    let conninfo = other.exec("SHOW primary_conninfo");
    assert!(
        conninfo.contains("sslmode=verify-full") && conninfo.contains(&format!("sslrootcert={ca}")),
        "{conninfo}"
    );
    assert_eq!(
        new.exec(&format!(
            "SELECT ssl FROM pg_stat_ssl JOIN pg_stat_replication USING (pid) WHERE application_name = '{}'",
            other.name()
        )),
        "t"
    );
    lb.wait_stats(T, "pglb routing writes to the new primary", |s| {
        s.primary.as_deref() == Some(new_name.as_str())
    })
    .await;
    psql_tcp(lb.write, "require", "insert into t values (1)").unwrap();

    // The old primary comes back and is rewound over TLS from the new one.
    let p0 = cluster.node(0);
    restart_after_kill(p0);
    promoter
        .wait_status(T, "pg-0 fenced", |s| {
            s["fenced"] == serde_json::json!(["pg-0"])
        })
        .await;
    let out = rejoin(&promoter, p0).await;
    assert!(out.contains("\"started\":true"), "{out}");
    assert!(p0.in_recovery());
    assert!(streams_to(new, "pg-0"));
    wait_until(T, "pg-0 to have the row written after the failover", || {
        p0.try_exec("SELECT count(*) FROM t").as_deref() == Ok("1")
    })
    .await;
}
