//! TLS against real PostgreSQL servers: checks and the promoter with libpq's `sslmode`s on
//! servers whose `pg_hba.conf` has only `hostssl` lines (a test CA made with openssl at test
//! time), client certificates, protocol 3.2 startups and cancel keys, direct TLS through pglb,
//! and pglb's own FATAL to clients that require TLS, with and without `[listen] tls_cert`.
//!
//! Run: `cargo nextest run --test tls` (or `cargo test --test tls`).

mod common;

use std::time::Duration;

use common::tls::TlsCluster;
use common::*;

const T: Duration = Duration::from_secs(30);

fn path(p: &std::path::Path) -> String {
    p.display().to_string()
}

/// Waits until `name` is down with `kind` as its last error (a loaded machine may first time
/// out a check).
async fn wait_down_with(lb: &Pglb, name: &str, kind: &str) -> Stats {
    lb.wait_stats(T, &format!("{name} down with kind {kind}"), |s| {
        s.try_backend(name)
            .is_some_and(|b| b.state == "down" && b.last_error_kind.as_deref() == Some(kind))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_with_require_and_verify_full_bring_hostssl_only_backends_up() {
    let tc = TlsCluster::start(1, false);

    // Plaintext checks find no pg_hba.conf entry: down, as before this could be configured.
    let plain = Pglb::builder(&tc.cluster)
        .set("check", "sslmode", "disable")
        .start();
    wait_down_with(&plain, "pg-0", "auth").await;
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
    let s = wait_down_with(&lb, "pg-0", "tls").await;
    let b = s.backend("pg-0");
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
async fn checks_log_in_with_a_client_certificate() {
    let tc = TlsCluster::start(0, false);
    let (crt, key) = tc
        .ca
        .issue("client", common::tls::CERT_USER, "DNS:pglb-check");
    // The role has no password: without the certificate there is no way in.
    let lb = Pglb::builder(&tc.cluster)
        .backends(tc.backends_by_name())
        .set("check", "user", common::tls::CERT_USER)
        .unset("check", "password_env")
        .set("check", "sslmode", "verify-full")
        .set("check", "sslrootcert", path(&tc.ca.cert))
        .start();
    wait_down_with(&lb, "pg-0", "auth").await;
    drop(lb);
    let lb = Pglb::builder(&tc.cluster)
        .backends(tc.backends_by_name())
        .set("check", "user", common::tls::CERT_USER)
        .unset("check", "password_env")
        .set("check", "sslmode", "verify-full")
        .set("check", "sslrootcert", path(&tc.ca.cert))
        .set("check", "sslcert", path(&crt))
        .set("check", "sslkey", path(&key))
        .start();
    lb.wait_ready().await;
    let s = lb.wait_backend_state("pg-0", "up", T).await;
    assert_eq!(s.primary.as_deref(), Some("pg-0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_marks_backends_down_with_kind_tls() {
    let tc = TlsCluster::start(0, false);
    let lb = Pglb::builder(&tc.cluster)
        .backends(tc.backends_by_name())
        .set("check", "sslmode", "verify-full")
        .set("check", "sslrootcert", path(&tc.other_ca.cert))
        .start();
    let s = wait_down_with(&lb, "pg-0", "tls").await;
    let b = s.backend("pg-0");
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

// ---------------------------------------------------------------------------------------------
// Protocol 3.2, pglb's FATAL inside TLS, direct TLS
// ---------------------------------------------------------------------------------------------

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A StartupMessage for protocol 3.`minor` with `params`.
fn startup_packet(minor: u16, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = (3u32 << 16 | u32::from(minor)).to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut p = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    p.extend(body);
    p
}

/// Reads one backend message: (type, body).
async fn read_message(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 5];
    s.read_exact(&mut head).await.expect("message header");
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0u8; len - 4];
    s.read_exact(&mut body).await.expect("message body");
    (head[0], body)
}

/// PostgreSQL 15 answers a 3.2 StartupMessage with NegotiateProtocolVersion ('v': newest minor
/// it speaks, and the `_pq_.` options it does not know), then carries on with authentication:
/// both pass through pglb untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_3_2_startup_gets_the_servers_negotiate_protocol_version() {
    let cluster = PgCluster::start(0);
    let lb = Pglb::start(&cluster).await;
    let mut s = TcpStream::connect(lb.write).await.unwrap();
    s.write_all(&startup_packet(
        2,
        &[
            ("user", APP_USER),
            ("database", DATABASE),
            ("_pq_.pglb_test", "1"),
        ],
    ))
    .await
    .unwrap();
    let (kind, body) = read_message(&mut s).await;
    assert_eq!(kind, b'v', "expected NegotiateProtocolVersion");
    let newest = u32::from_be_bytes(body[0..4].try_into().unwrap());
    let unknown = u32::from_be_bytes(body[4..8].try_into().unwrap());
    // The newest version it speaks, as major << 16 | minor: 3.0.
    assert_eq!((newest, unknown), (3 << 16, 1));
    assert_eq!(&body[8..], b"_pq_.pglb_test\0");
    // Then SCRAM, as for any 3.0 client.
    let (kind, body) = read_message(&mut s).await;
    assert_eq!(kind, b'R');
    assert_eq!(u32::from_be_bytes(body[0..4].try_into().unwrap()), 10);
    assert_eq!(lb.stats().unwrap().backend("pg-0").write.sessions_total, 1);
}

/// A backend that only records what it is sent: PostgreSQL 15 refuses 3.2 cancel keys (it
/// takes exactly 4 bytes), so this is where pglb's forwarding of one is seen byte for byte.
async fn tap() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 512];
                while let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await
                {
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                let _ = tx.send(got);
            });
        }
    });
    (addr, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_3_2_cancel_request_with_a_long_key_is_forwarded() {
    let cluster = PgCluster::start(0);
    let (tap_addr, mut taps) = tap().await;
    let mut backends = cluster.backends();
    backends.push(BackendSpec {
        name: "tap".into(),
        address: tap_addr.to_string(),
        weight: Some(1),
    });
    let lb = Pglb::builder(&cluster).backends(backends).start();
    lb.wait_ready().await;
    for key_len in [32usize, 256] {
        let key: Vec<u8> = (0..key_len).map(|i| (i * 7) as u8).collect();
        let packet = pglb::pg::cancel_request(4242, &key);
        let mut s = TcpStream::connect(lb.read).await.unwrap();
        s.write_all(&packet).await.unwrap();
        // pglb closes after forwarding, without an ErrorResponse.
        let mut rest = Vec::new();
        tokio::time::timeout(T, s.read_to_end(&mut rest))
            .await
            .expect("pglb closes the cancel connection")
            .unwrap();
        assert!(rest.is_empty(), "pglb answered a cancel: {rest:?}");
        let got = tokio::time::timeout(T, async {
            loop {
                let g = taps.recv().await.expect("tap open");
                if g.get(4..8) == Some(&80_877_102u32.to_be_bytes()[..]) {
                    return g;
                }
            }
        })
        .await
        .expect("the cancel reaches every backend");
        assert_eq!(got, packet, "{key_len}-byte key forwarded byte for byte");
    }
}

/// A port whose only backend is gone: pglb has nothing to connect to.
fn dead_backend() -> Vec<BackendSpec> {
    vec![BackendSpec {
        name: "gone".into(),
        address: free_addr().to_string(),
        weight: Some(1),
    }]
}

fn psql_err(conninfo: &str) -> String {
    let mut cmd = std::process::Command::new(pg_bin_dir().join("psql"));
    cmd.env_clear()
        .env("LC_ALL", "C")
        .env("PGPASSWORD", APP_PASSWORD)
        .args(["-X", "-A", "-t", "-d", conninfo, "-c", "select 1"]);
    let (status, _, stderr) = output_of(&mut cmd);
    assert!(
        !status.success(),
        "psql connected through a port with no backend"
    );
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_require_tls_get_pglbs_fatal_only_with_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::tls::TestCa::new(dir.path(), "ca");
    let (crt, key) = ca.issue("pglb", "localhost", "DNS:localhost");
    let conninfo = |addr: SocketAddr, ssl: &str| {
        format!(
            "host=localhost hostaddr=127.0.0.1 port={} user={APP_USER} dbname={DATABASE} gssencmode=disable connect_timeout=10 {ssl}",
            addr.port()
        )
    };

    // Without one: pglb declines TLS as a server without SSL would, and psql says so.
    let lb = PglbBuilder::new(dead_backend())
        .set("proxy", "wait_for_backend", "0s")
        .start();
    let e = psql_err(&conninfo(lb.write, "sslmode=require"));
    assert!(
        e.contains("server does not support SSL, but SSL was required"),
        "{e}"
    );
    // A client that does not insist still gets the FATAL in clear.
    let e = psql_err(&conninfo(lb.write, "sslmode=prefer"));
    assert!(
        e.contains("pglb: no primary is available for writes"),
        "{e}"
    );
    drop(lb);

    // With one: TLS completes with pglb's certificate (verified by name) and the FATAL is
    // inside, on both ports.
    let lb = PglbBuilder::new(dead_backend())
        .set("proxy", "wait_for_backend", "0s")
        .set("listen", "tls_cert", path(&crt))
        .set("listen", "tls_key", path(&key))
        .start();
    let verify = format!("sslmode=verify-full sslrootcert={}", path(&ca.cert));
    let e = psql_err(&conninfo(lb.write, &verify));
    assert!(
        e.contains("pglb: no primary is available for writes"),
        "{e}"
    );
    let e = psql_err(&conninfo(lb.read, "sslmode=require"));
    assert!(e.contains("pglb: no replica is available for reads"), "{e}");

    // A direct-TLS client gets it too, as a real ErrorResponse with the SQLSTATE.
    let tls = direct_tls_client(lb.write, &ca.cert).await.unwrap();
    let err = login(tls).await.expect_err("no backend");
    assert_eq!(sqlstate(&err), Some("57P03"), "{err:?}");
}

/// Opens a TCP connection to `addr` and starts TLS at once (a ClientHello as the first packet,
/// ALPN "postgresql", as libpq 17+ with sslnegotiation=direct), verifying against `ca` as
/// "localhost".
async fn direct_tls_client(
    addr: SocketAddr,
    ca: &std::path::Path,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

/// Logs in as `app` on an already encrypted stream and returns the server's port.
async fn login(
    stream: tokio_rustls::client::TlsStream<TcpStream>,
) -> Result<String, tokio_postgres::Error> {
    let cfg = client_config(lb_dummy(), APP_USER, APP_PASSWORD);
    let (client, conn) = cfg.connect_raw(stream, tokio_postgres::NoTls).await?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    let port = scalar(&client, "SHOW port").await?.unwrap_or_default();
    drop(client);
    let _ = task.await;
    Ok(port)
}

/// `client_config` wants an address; connect_raw does not use it.
fn lb_dummy() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_tls_client_is_routed_by_port_and_completes_tls_with_the_server() {
    let cluster = PgCluster::start(0);
    let dir = tempfile::tempdir().unwrap();
    let ca = common::tls::TestCa::new(dir.path(), "ca");
    let (crt, key) = ca.issue("front", "localhost", "DNS:localhost");
    let front = common::tls::direct_tls_front(cluster.primary().addr(), &crt, &key).await;
    let lb = PglbBuilder::new(vec![BackendSpec {
        name: "pg-0".into(),
        address: front.to_string(),
        weight: Some(1),
    }])
    .start();
    lb.wait_ready().await;

    for addr in [lb.write, lb.read] {
        let tls = direct_tls_client(addr, &ca.cert)
            .await
            .expect("TLS handshake with the server behind pglb");
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            Some(&b"postgresql"[..]),
            "ALPN negotiated end to end"
        );
        let port = login(tls).await.expect("login inside direct TLS");
        assert_eq!(port, cluster.primary().port().to_string());
    }
    let s = lb.stats().unwrap();
    let b = s.backend("pg-0");
    assert_eq!((b.write.sessions_total, b.read.sessions_total), (1, 1));

    drop(lb);

    // PostgreSQL 15 itself closes a direct-TLS connection without a byte: the session is
    // refused like one with no backend (here with pglb's certificate: its FATAL inside TLS),
    // and the server stays up.
    let (pglb_crt, pglb_key) = ca.issue("pglb", "localhost", "DNS:localhost");
    let lb = Pglb::builder(&cluster)
        .set("listen", "tls_cert", path(&pglb_crt))
        .set("listen", "tls_key", path(&pglb_key))
        .start();
    lb.wait_ready().await;
    let tls = direct_tls_client(lb.write, &ca.cert).await.unwrap();
    let err = login(tls)
        .await
        .expect_err("PostgreSQL 15 takes no direct TLS");
    assert_eq!(sqlstate(&err), Some("57P03"), "{err:?}");
    assert_eq!(lb.stats().unwrap().backend("pg-0").state, "up");
}
