//! Cancels sent inside TLS through the read port, as libpq 17+ (psycopg's `cancel_safe()`),
//! asyncpg and tokio-postgres send them: a new connection, SSLRequest, the TLS handshake with
//! the server, then the CancelRequest, which pglb cannot read. Two SSL-only replicas behind
//! the read port; tokio-postgres's `CancelToken::cancel_query` with a rustls connector is the
//! client. Covered: `[read] tls_affinity` (default on) sends the cancel to the replica of the
//! session whose request is in flight; off, the balanced choice (the old behaviour);
//! `balance = "source"` keeps every connection from one address on one replica; plaintext
//! cancels, first packet or after a declined SSLRequest (sslmode=prefer against a server
//! without SSL), reach every backend.
//!
//! Run: `cargo nextest run --test cancel_tls`.

mod common;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use common::tls::TlsCluster;
use common::*;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_postgres::{Client, Socket};

const T: Duration = Duration::from_secs(30);
/// Long enough that only a cancel ends it within the test's deadlines.
const SLEEP_SQL: &str = "select pg_sleep(60)";

// ---------------------------------------------------------------------------------------------
// A rustls connector for tokio-postgres (SSLRequest, then TLS; the cancel token uses it too)
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct Rustls(Arc<rustls::ClientConfig>);

impl Rustls {
    /// Verifies the servers against `ca` (their certificates name `localhost`).
    fn new(ca: &std::path::Path) -> Rustls {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).expect("read CA") {
            roots.add(c.expect("CA certificate")).expect("add CA");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Rustls(Arc::new(config))
    }
}

struct RustlsConnect {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl MakeTlsConnect<Socket> for Rustls {
    type Stream = RustlsStream<Socket>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, io::Error> {
        let name = ServerName::try_from(domain.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(RustlsConnect {
            config: self.0.clone(),
            name,
        })
    }
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let connector = tokio_rustls::TlsConnector::from(self.config);
            Ok(RustlsStream(connector.connect(self.name, stream).await?))
        })
    }
}

struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A session as `app` through `addr` with `sslmode` (host name `localhost`, so `verify-full`
/// would pass; the connector verifies the chain and the name).
async fn session(addr: SocketAddr, tls: &Rustls, mode: SslMode) -> Client {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("localhost")
        .hostaddr([127, 0, 0, 1].into())
        .port(addr.port())
        .user(APP_USER)
        .password(APP_PASSWORD)
        .dbname(DATABASE)
        .ssl_mode(mode)
        .application_name("pglb-it")
        .connect_timeout(Duration::from_secs(10));
    let (client, connection) = tokio::time::timeout(T, cfg.connect(tls.clone()))
        .await
        .expect("login through pglb hung")
        .unwrap_or_else(|e| panic!("login through {addr} with {mode:?}: {e:?}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// The node a session is on, by the port its server listens on.
async fn node_of(cluster: &common::PgCluster, c: &Client) -> String {
    let port: u16 = scalar_ok(c, "select inet_server_port()")
        .await
        .parse()
        .unwrap();
    cluster
        .nodes()
        .iter()
        .find(|n| n.port() == port)
        .map(|n| n.name().to_string())
        .expect("a session on one of the nodes")
}

/// `pg_sleep(60)` on `c` in a task; returns once the server runs it (seen in
/// `pg_stat_activity` on `node`).
async fn start_sleep(
    cluster: &common::PgCluster,
    node: &str,
    c: Arc<Client>,
) -> tokio::task::JoinHandle<Result<Vec<tokio_postgres::SimpleQueryMessage>, tokio_postgres::Error>>
{
    let task = tokio::spawn(async move { c.simple_query(SLEEP_SQL).await });
    let n = cluster
        .nodes()
        .iter()
        .find(|n| n.name() == node)
        .expect("node");
    let q = format!(
        "select count(*) from pg_stat_activity where state = 'active' and query = '{SLEEP_SQL}'"
    );
    wait_until(T, "the sleep runs", || n.exec(&q) == "1").await;
    task
}

/// Ends a query that must be cancelled: 57014 within `T`.
async fn assert_cancelled(
    task: tokio::task::JoinHandle<
        Result<Vec<tokio_postgres::SimpleQueryMessage>, tokio_postgres::Error>,
    >,
    what: &str,
) {
    let r = tokio::time::timeout(T, task)
        .await
        .unwrap_or_else(|_| panic!("{what}: the query was not cancelled within {T:?}"))
        .expect("query task");
    let e = r.expect_err("the sleep ended without an error");
    assert_eq!(e.code(), Some(&SqlState::QUERY_CANCELED), "{what}: {e:?}");
}

/// `pglb_tls_affinity_total{port="read",rule}` from `/metrics`.
fn affinity_count(lb: &Pglb, rule: &str) -> u64 {
    let (_, body) = http_get(lb.stats, "/metrics").expect("metrics");
    let needle = format!("pglb_tls_affinity_total{{port=\"read\",rule=\"{rule}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .map(|v| v.trim().parse().expect("a count"))
        .unwrap_or(0)
}

/// Read-port sessions each replica has had.
fn read_totals(lb: &Pglb, names: &[&str]) -> Vec<u64> {
    let s = lb.stats().expect("stats");
    names
        .iter()
        .map(|n| s.backend(n).read.sessions_total)
        .collect()
}

fn tls_pglb(tc: &TlsCluster) -> PglbBuilder {
    Pglb::builder(&tc.cluster)
        .backends(tc.backends_by_name())
        .set("check", "sslmode", "require")
        // Reads only on the replicas.
        .set("read", "fallback_to_primary", false)
}

async fn wait_readers(lb: &Pglb) {
    lb.wait_stats(T, "both replicas read", |s| s.readers.len() == 2)
        .await;
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// A pool of sessions from 127.0.0.1 over TLS, spread over both replicas; one runs a long
/// query at a time; its cancel, sent inside TLS by tokio-postgres, ends it with 57014, for every
/// session of the pool in turn (so on both replicas), while the others stay idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_inside_tls_reaches_the_replica_of_the_request_in_flight() {
    let tc = TlsCluster::start(2, false);
    let lb = tls_pglb(&tc)
        .set("stats", "admin_token_env", "PGLB_CT_ADMIN_TOKEN")
        .env("PGLB_CT_ADMIN_TOKEN", ADMIN_TOKEN)
        .start();
    lb.wait_ready().await;
    wait_readers(&lb).await;
    let tls = Rustls::new(&tc.ca.cert);

    let mut pool = Vec::new();
    for _ in 0..4 {
        let c = Arc::new(session(lb.read, &tls, SslMode::Require).await);
        let node = node_of(&tc.cluster, &c).await;
        pool.push((c, node));
    }
    let on: std::collections::HashSet<_> = pool.iter().map(|(_, n)| n.clone()).collect();
    assert_eq!(on.len(), 2, "leastconn spreads the pool over both replicas");

    let before = affinity_count(&lb, "inflight");
    for round in 0..2 {
        for (i, (c, node)) in pool.iter().enumerate() {
            let task = start_sleep(&tc.cluster, node, c.clone()).await;
            c.cancel_token()
                .cancel_query(tls.clone())
                .await
                .expect("send the cancel over TLS");
            assert_cancelled(task, &format!("round {round}, session {i} on {node}")).await;
            // The session goes on.
            assert_eq!(scalar_ok(c, "select 1").await, "1");
        }
    }
    assert_eq!(affinity_count(&lb, "inflight") - before, 8);

    // A draining replica takes no new sessions, but the cancel of one it keeps still reaches it.
    let (c, node) = &pool[0];
    let (code, body) = http_request(
        lb.stats,
        "POST",
        &format!("/api/backends/{node}/drain"),
        Some(ADMIN_TOKEN),
    );
    assert_eq!(code, 200, "{body}");
    lb.wait_stats(T, "the replica draining", |s| {
        s.backend(node).state == "draining" && s.readers.len() == 1
    })
    .await;
    let task = start_sleep(&tc.cluster, node, c.clone()).await;
    c.cancel_token()
        .cancel_query(tls.clone())
        .await
        .expect("send the cancel over TLS");
    assert_cancelled(task, "a session on a draining replica").await;
}

const ADMIN_TOKEN: &str = "cancel-tls-admin-token-5b1e";

/// With `tls_affinity = false` an encrypted connection is balanced like any new session: the
/// old behaviour. One session on a replica; leastconn sends the cancel's connection to the other
/// replica, which ignores the key, and the query runs on. With the rule on, the same cancel goes
/// to the session's replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_rule_a_cancel_inside_tls_is_balanced_away() {
    let tc = TlsCluster::start(2, false);
    let lb = tls_pglb(&tc).set("read", "tls_affinity", false).start();
    lb.wait_ready().await;
    wait_readers(&lb).await;
    let tls = Rustls::new(&tc.ca.cert);
    let names = ["pg-1", "pg-2"];

    let c = Arc::new(session(lb.read, &tls, SslMode::Require).await);
    let node = node_of(&tc.cluster, &c).await;
    let other = names.iter().find(|n| **n != node).unwrap().to_string();
    let task = start_sleep(&tc.cluster, &node, c.clone()).await;
    let before = read_totals(&lb, &names);
    c.cancel_token()
        .cancel_query(tls.clone())
        .await
        .expect("send the cancel over TLS");
    let after = read_totals(&lb, &names);
    let went: Vec<_> = names
        .iter()
        .zip(before.iter().zip(&after))
        .filter(|(_, (b, a))| a > b)
        .map(|(n, _)| n.to_string())
        .collect();
    assert_eq!(
        went,
        [other],
        "the cancel was balanced to the other replica"
    );
    // The server the cancel reached has closed its connection (tokio-postgres waited for
    // that): the query on the session's replica is still running.
    let n = tc
        .cluster
        .nodes()
        .iter()
        .find(|n| n.name() == node)
        .unwrap();
    assert_eq!(
        n.exec(&format!(
            "select count(*) from pg_stat_activity where state = 'active' and query = '{SLEEP_SQL}'"
        )),
        "1"
    );
    assert_eq!(affinity_count(&lb, "inflight"), 0);
    // End it from the server side.
    n.exec(&format!(
        "select pg_cancel_backend(pid) from pg_stat_activity where query = '{SLEEP_SQL}'"
    ));
    assert_cancelled(task, "pg_cancel_backend").await;
}

/// `balance = "source"`: every connection from 127.0.0.1 reaches the same replica, so a cancel
/// inside TLS does too, with the affinity rule off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balance_source_keeps_an_address_on_one_replica_cancels_included() {
    let tc = TlsCluster::start(2, false);
    let lb = tls_pglb(&tc)
        .set("read", "balance", "source")
        .set("read", "tls_affinity", false)
        .start();
    lb.wait_ready().await;
    wait_readers(&lb).await;
    let tls = Rustls::new(&tc.ca.cert);

    let mut pool = Vec::new();
    for _ in 0..4 {
        let c = Arc::new(session(lb.read, &tls, SslMode::Require).await);
        let node = node_of(&tc.cluster, &c).await;
        pool.push((c, node));
    }
    let node = pool[0].1.clone();
    assert!(
        pool.iter().all(|(_, n)| *n == node),
        "every session of one address on one replica: {:?}",
        pool.iter().map(|(_, n)| n).collect::<Vec<_>>()
    );
    for (i, (c, _)) in pool.iter().enumerate() {
        let task = start_sleep(&tc.cluster, &node, c.clone()).await;
        c.cancel_token()
            .cancel_query(tls.clone())
            .await
            .expect("send the cancel over TLS");
        assert_cancelled(task, &format!("session {i}")).await;
    }
}

/// Direct TLS (a ClientHello as the first packet, libpq 17+ with `sslnegotiation=direct`) is
/// routed by the same rule. PostgreSQL 15 takes no direct TLS, so each replica is behind a
/// relay that does what PostgreSQL 17's postmaster does (accepts TLS with ALPN "postgresql" and
/// speaks to the server inside it); sessions and the cancel all come from 127.0.0.1 in direct
/// TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_in_direct_tls_reaches_the_replica_of_the_request_in_flight() {
    let cluster = PgCluster::start(2);
    let dir = tempfile::tempdir().unwrap();
    let ca = common::tls::TestCa::new(dir.path(), "ca");
    let (crt, key) = ca.issue("front", "localhost", "DNS:localhost");
    let mut backends = vec![BackendSpec {
        name: "pg-0".into(),
        address: cluster.primary().addr().to_string(),
        weight: Some(1),
    }];
    for r in cluster.replicas() {
        backends.push(BackendSpec {
            name: r.name().to_string(),
            address: common::tls::direct_tls_front(r.addr(), &crt, &key)
                .await
                .to_string(),
            weight: Some(1),
        });
    }
    let lb = PglbBuilder::new(backends)
        .set("read", "fallback_to_primary", false)
        .start();
    lb.wait_ready().await;
    wait_readers(&lb).await;

    let mut pool = Vec::new();
    for _ in 0..2 {
        let tls = direct_tls_client(lb.read, &ca.cert)
            .await
            .expect("direct TLS");
        let cfg = client_config(lb.read, APP_USER, APP_PASSWORD);
        let (c, conn) = cfg
            .connect_raw(tls, tokio_postgres::NoTls)
            .await
            .expect("login inside direct TLS");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let c = Arc::new(c);
        let node = node_of(&cluster, &c).await;
        pool.push((c, node));
    }
    assert_ne!(pool[0].1, pool[1].1, "one session per replica");

    let before = affinity_count(&lb, "inflight");
    for (c, node) in &pool {
        let task = start_sleep(&cluster, node, c.clone()).await;
        // The cancel: a new direct-TLS connection, the CancelRequest inside it.
        let tls = direct_tls_client(lb.read, &ca.cert)
            .await
            .expect("direct TLS");
        c.cancel_token()
            .cancel_query_raw(tls, tokio_postgres::NoTls)
            .await
            .expect("send the cancel inside direct TLS");
        assert_cancelled(task, &format!("session on {node}")).await;
    }
    assert_eq!(affinity_count(&lb, "inflight") - before, 2);
}

/// A TCP connection to `addr` that starts TLS at once (ALPN "postgresql"), verifying against
/// `ca` as "localhost".
async fn direct_tls_client(
    addr: SocketAddr,
    ca: &std::path::Path,
) -> io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut config = (*Rustls::new(ca).0).clone();
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

/// Plaintext cancels reach every backend, as before: a CancelRequest as the first packet, and
/// one sent after the server declined an SSLRequest (tokio-postgres, like libpq 17, tries TLS
/// first with sslmode=prefer and cancels on the same connection in plaintext after 'N'). The
/// servers here have SSL turned off; one session, so leastconn sends the cancel's connection to
/// the other replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_cancels_reach_the_session_first_packet_or_after_a_declined_ssl_request() {
    let cluster = PgCluster::start(2);
    for n in cluster.nodes() {
        n.exec("alter system set ssl = off");
        n.exec("select pg_reload_conf()");
    }
    for n in cluster.nodes() {
        wait_until(T, "ssl off", || n.exec("show ssl") == "off").await;
    }
    let lb = Pglb::builder(&cluster)
        .set("read", "fallback_to_primary", false)
        .start();
    lb.wait_ready().await;
    lb.wait_stats(T, "both replicas read", |s| s.readers.len() == 2)
        .await;
    // Any CA: the servers never start TLS.
    let dir = tempfile::tempdir().unwrap();
    let ca = common::tls::TestCa::new(dir.path(), "ca");
    let tls = Rustls::new(&ca.cert);

    for (mode, what) in [
        (SslMode::Disable, "a CancelRequest as the first packet"),
        (
            SslMode::Prefer,
            "a CancelRequest after a declined SSLRequest",
        ),
    ] {
        let c = Arc::new(session(lb.read, &tls, mode).await);
        let node = node_of(&cluster, &c).await;
        let task = start_sleep(&cluster, &node, c.clone()).await;
        c.cancel_token()
            .cancel_query(tls.clone())
            .await
            .expect("send the cancel");
        assert_cancelled(task, what).await;
    }
    // Both were read and forwarded by pglb (the second one only after the 'N').
    wait_until(T, "two cancels forwarded", || {
        lb.log_text().matches("cancel request forwarded").count() == 2
    })
    .await;
    // A plain session is no candidate for the TLS rule.
    assert_eq!(affinity_count(&lb, "inflight"), 0);
}
