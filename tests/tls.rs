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
