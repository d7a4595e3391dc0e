//! Faults survived, against real PostgreSQL servers and the pglb binary:
//!
//! - a backend that accepts TCP and then never answers: during checks (down, "timeout", never
//!   routed to) and during a session's connect (skipped within `connect_timeout`);
//! - a backend connection reset mid-session: only that client sees an error;
//! - a backend name that stops resolving: down with the DNS reason, the others keep serving;
//! - the config file deleted: the last good config keeps running and the refusal is reported;
//! - the stats port flooded while sessions flow: no failed query;
//! - secrets: no password or token in the log, the pages or the metrics;
//! - garbage first packets on the wire: an ErrorResponse and a close, every time.
//!
//! Faulty backends are a TCP relay in the test process ([`Relay`]) that forwards to a real
//! server, hangs (accepts, reads, never writes), or resets one session with SO_LINGER 0. It tells
//! sessions apart by the `application_name` in the startup packet pglb forwards (pglb's checks
//! say `pglb-check`).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// A faulty backend: TCP relay that forwards, hangs or resets
// ---------------------------------------------------------------------------------------------

/// Forward every connection to the target.
const FORWARD: u8 = 0;
/// Hang every connection except pglb's checks: accept, read, never write.
const HANG_SESSIONS: u8 = 1;
/// Hang every connection, checks included.
const HANG_ALL: u8 = 2;

struct RelayConn {
    /// `application_name` of the startup packet ("" when there was none).
    app: String,
    hung: bool,
    open: Arc<AtomicBool>,
    reset: CancellationToken,
}

/// A TCP relay on 127.0.0.1 in front of a real server (or of nothing: then it only hangs).
struct Relay {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    conns: Arc<Mutex<Vec<RelayConn>>>,
    stop: CancellationToken,
}

impl Relay {
    async fn start(target: Option<SocketAddr>, mode: u8) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let relay = Relay {
            addr: listener.local_addr().unwrap(),
            mode: Arc::new(AtomicU8::new(mode)),
            conns: Arc::new(Mutex::new(Vec::new())),
            stop: CancellationToken::new(),
        };
        let (mode, conns, stop) = (relay.mode.clone(), relay.conns.clone(), relay.stop.clone());
        tokio::spawn(async move {
            loop {
                let sock = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = listener.accept() => match r {
                        Ok((s, _)) => s,
                        Err(_) => continue,
                    },
                };
                tokio::spawn(relay_conn(
                    sock,
                    target,
                    mode.clone(),
                    conns.clone(),
                    stop.clone(),
                ));
            }
        });
        relay
    }

    /// A hang server: accepts, reads (refusing TLS), never answers the startup.
    async fn hang() -> Relay {
        Relay::start(None, HANG_ALL).await
    }

    fn set_mode(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    /// (application_name, hung) of every connection so far.
    fn seen(&self) -> Vec<(String, bool)> {
        self.conns
            .lock()
            .unwrap()
            .iter()
            .map(|c| (c.app.clone(), c.hung))
            .collect()
    }

    /// Connections still open right now.
    fn open_now(&self) -> usize {
        self.conns
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.open.load(Ordering::SeqCst))
            .count()
    }

    /// Resets (RST to pglb) every open forwarded connection whose application_name is `app`.
    fn reset(&self, app: &str) -> usize {
        let conns = self.conns.lock().unwrap();
        let mut n = 0;
        for c in conns.iter() {
            if c.app == app && !c.hung && c.open.load(Ordering::SeqCst) {
                c.reset.cancel();
                n += 1;
            }
        }
        n
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Reads one length-prefixed startup-phase packet.
async fn read_startup_packet(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut header = [0u8; 4];
    s.read_exact(&mut header).await?;
    let len = u32::from_be_bytes(header) as usize;
    if !(8..=10_000).contains(&len) {
        return Err(std::io::Error::other("bad startup length"));
    }
    let mut p = vec![0u8; len];
    p[..4].copy_from_slice(&header);
    s.read_exact(&mut p[4..]).await?;
    Ok(p)
}

/// The StartupMessage, after answering `N` to an SSLRequest in front of it (the servers behind
/// the relay speak plain text; pglb's checks ask for TLS first with the default `sslmode =
/// "prefer"`), so the relay knows whose connection it is before it forwards or hangs it.
async fn read_first_startup(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let p = read_startup_packet(s).await?;
    if p.len() == 8 && p[4..8] == [0x04, 0xd2, 0x16, 0x2f] {
        s.write_all(b"N").await?;
        return read_startup_packet(s).await;
    }
    Ok(p)
}

/// `application_name` of a protocol-3 StartupMessage.
fn app_name(packet: &[u8]) -> String {
    if packet.len() < 8 || packet[4..8] != [0, 3, 0, 0] {
        return String::new();
    }
    let mut fields = packet[8..].split(|&b| b == 0);
    while let (Some(k), Some(v)) = (fields.next(), fields.next()) {
        if k.is_empty() {
            break;
        }
        if k == b"application_name" {
            return String::from_utf8_lossy(v).into_owned();
        }
    }
    String::new()
}

async fn relay_conn(
    mut down: TcpStream,
    target: Option<SocketAddr>,
    mode: Arc<AtomicU8>,
    conns: Arc<Mutex<Vec<RelayConn>>>,
    stop: CancellationToken,
) {
    let first = tokio::time::timeout(Duration::from_secs(5), read_first_startup(&mut down)).await;
    let first = match first {
        Ok(Ok(p)) => Some(p),
        _ => None,
    };
    let app = first.as_deref().map(app_name).unwrap_or_default();
    let hung = match (target, mode.load(Ordering::SeqCst)) {
        (None, _) | (_, HANG_ALL) => true,
        (_, HANG_SESSIONS) => app != "pglb-check",
        _ => false,
    };
    let open = Arc::new(AtomicBool::new(true));
    let reset = CancellationToken::new();
    conns.lock().unwrap().push(RelayConn {
        app,
        hung,
        open: open.clone(),
        reset: reset.clone(),
    });
    if hung || first.is_none() {
        // Accepted; never a byte back. Read (and drop) whatever comes until the peer leaves.
        let mut buf = [0u8; 4096];
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                r = down.read(&mut buf) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                },
            }
        }
        open.store(false, Ordering::SeqCst);
        return;
    }
    let Ok(mut up) = TcpStream::connect(target.expect("forwarding relay has a target")).await
    else {
        open.store(false, Ordering::SeqCst);
        return;
    };
    let _ = up.set_nodelay(true);
    let _ = down.set_nodelay(true);
    if up.write_all(first.as_deref().unwrap()).await.is_err() {
        open.store(false, Ordering::SeqCst);
        return;
    }
    let reset_now = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => false,
        _ = reset.cancelled() => true,
        _ = stop.cancelled() => false,
    };
    if reset_now {
        // SO_LINGER 0: close() sends RST instead of FIN, like a crashed or cut-off server.
        let _ = socket2::SockRef::from(&down).set_linger(Some(Duration::ZERO));
    }
    drop(down);
    drop(up);
    open.store(false, Ordering::SeqCst);
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Login as `app` through `addr` with the given application_name, bounded by `within`:
/// Err(None) when it did not finish in time, Err(Some(e)) when it failed.
async fn connect_named(
    addr: SocketAddr,
    app_name: &str,
    within: Duration,
) -> Result<Client, Option<tokio_postgres::Error>> {
    let mut cfg = client_config(addr, APP_USER, APP_PASSWORD);
    cfg.application_name(app_name);
    match tokio::time::timeout(within, cfg.connect(NoTls)).await {
        Err(_) => Err(None),
        Ok(Err(e)) => Err(Some(e)),
        Ok(Ok((client, conn))) => {
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(client)
        }
    }
}

async fn connect_named_ok(addr: SocketAddr, app_name: &str) -> Client {
    match connect_named(addr, app_name, T).await {
        Ok(c) => c,
        Err(None) => panic!("login through {addr} as {app_name} hung for {T:?}"),
        Err(Some(e)) => panic!("login through {addr} as {app_name}: {e:?}"),
    }
}

/// `SELECT 1` bounded by `within`: true when it answered 1.
async fn select_one(c: &Client, within: Duration) -> bool {
    matches!(
        tokio::time::timeout(within, c.simple_query("SELECT 1")).await,
        Ok(Ok(ref m)) if m.iter().any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
    )
}

/// A field of the backend `name` in `/stats.json` (untyped, for fields `Stats` lacks).
fn backend_field(stats: &Stats, name: &str, field: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&stats.raw).expect("stats.json");
    v["backends"]
        .as_array()
        .and_then(|bs| bs.iter().find(|b| b["name"] == name))
        .map(|b| b[field].clone())
        .unwrap_or(serde_json::Value::Null)
}

fn reload_field(stats: &Stats, field: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&stats.raw).expect("stats.json");
    v["reload"][field].clone()
}

fn spec(name: &str, address: impl Into<String>) -> BackendSpec {
    BackendSpec {
        name: name.into(),
        address: address.into(),
        weight: Some(1),
    }
}

/// Open file descriptors of process `pid`.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// A backend that accepts TCP and then hangs
// ---------------------------------------------------------------------------------------------

/// A backend that completes the TCP handshake and reads the startup packet but never answers:
/// its check fails with a timeout, it never becomes up, no client session is sent to it, the
/// checks do not pile up connections on it, and the other backends serve as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backend_that_accepts_and_never_answers_fails_its_check_with_a_timeout() {
    let cluster = PgCluster::start(1);
    let hang = Relay::hang().await;
    let mut backends = cluster.backends();
    backends.push(spec("hang", hang.addr.to_string()));
    let lb = Pglb::builder(&cluster)
        .backends(backends)
        .set("check", "timeout", "1s")
        .set("proxy", "connect_timeout", "1s")
        .start();
    lb.wait_ready().await;
    let s = lb
        .wait_stats(T, "hang down with a timeout reason, pg-1 readable", |s| {
            s.try_backend("hang").is_some_and(|b| {
                b.state == "down"
                    && b.last_error
                        .as_deref()
                        .is_some_and(|e| e.contains("timeout"))
            }) && s.try_backend("pg-1").is_some_and(|b| b.read_eligible)
        })
        .await;
    assert_eq!(
        backend_field(&s, "hang", "last_error_kind"),
        "timeout",
        "{}",
        s.raw
    );

    // Sessions keep flowing through the others: writes to pg-0, reads to pg-1 only.
    let (p0, p1) = (cluster.node(0).port(), cluster.node(1).port());
    for i in 0..8 {
        let c = connect_named_ok(lb.read, &format!("reader-{i}")).await;
        assert_eq!(backend_port(&c).await, p1, "read session {i} not on pg-1");
        let w = connect_named_ok(lb.write, &format!("writer-{i}")).await;
        assert_eq!(backend_port(&w).await, p0, "write session {i} not on pg-0");
    }

    // Only checks ever reached the hanging backend, and they did not accumulate: with checks
    // every 200 ms and a 1 s timeout, at most one or two are open at any moment.
    let started = Instant::now();
    let mut most_open = 0;
    while started.elapsed() < Duration::from_secs(3) {
        most_open = most_open.max(hang.open_now());
        tokio::time::sleep(POLL).await;
    }
    let seen = hang.seen();
    assert!(
        seen.len() >= 3,
        "the hang server saw only {} checks",
        seen.len()
    );
    let sessions: Vec<_> = seen.iter().filter(|(app, _)| app != "pglb-check").collect();
    assert!(
        sessions.is_empty(),
        "client sessions were sent to the hanging backend: {sessions:?}"
    );
    assert!(
        most_open <= 3,
        "{most_open} check connections open at once on the hanging backend: checks pile up"
    );
    let s = lb.stats().unwrap();
    assert_eq!(s.backend("hang").state, "down", "{}", s.raw);
    assert_eq!(s.primary.as_deref(), Some("pg-0"));
}

/// A replica whose checks pass but whose new sessions hang after the TCP handshake (the relay
/// in front of it answers pglb's checks and swallows everything else). A read session sent
/// there must not hang with it: pglb gives up on that backend within `connect_timeout` and
/// the session lands on the next candidate (the primary, by fallback) or gets pglb's error.
/// Sessions already open through the same relay go on working.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backend_that_hangs_during_session_connect_is_skipped_within_connect_timeout() {
    let cluster = PgCluster::start(1);
    let relay = Relay::start(Some(cluster.node(1).addr()), FORWARD).await;
    let connect_timeout = Duration::from_secs(1);
    let lb = Pglb::builder(&cluster)
        .backends(vec![
            spec("pg-0", cluster.node(0).addr().to_string()),
            spec("pg-1", relay.addr.to_string()),
        ])
        .set("proxy", "connect_timeout", "1s")
        .set("check", "timeout", "2s")
        .start();
    lb.wait_ready().await;
    lb.wait_stats(T, "pg-1 readable", |s| {
        s.try_backend("pg-1").is_some_and(|b| b.read_eligible)
    })
    .await;
    let (p0, p1) = (cluster.node(0).port(), cluster.node(1).port());
    let before = connect_named_ok(lb.read, "opened-before").await;
    assert_eq!(
        backend_port(&before).await,
        p1,
        "first read session not through the relay"
    );

    relay.set_mode(HANG_SESSIONS);
    let bound = connect_timeout + Duration::from_secs(3);
    for i in 0..3 {
        let name = format!("during-hang-{i}");
        let started = Instant::now();
        // Give the attempt far longer than the bound, to tell "slow" from "hangs for ever".
        let r = connect_named(lb.read, &name, bound + Duration::from_secs(10)).await;
        let took = started.elapsed();
        match r {
            Ok(c) => {
                let port = backend_port(&c).await;
                assert_ne!(port, p1, "session {name} landed on the hanging backend");
                assert_eq!(port, p0, "session {name} should fall back to the primary");
            }
            Err(Some(e)) => {
                let msg = e.as_db_error().map(|d| d.message().to_string());
                assert!(
                    msg.as_deref().is_some_and(|m| m.starts_with("pglb: ")),
                    "session {name} failed without pglb's own error: {e:?}"
                );
            }
            Err(None) => panic!(
                "read session {name} still hanging after {took:?}: pglb forwarded it to a backend \
                 that accepted TCP and then said nothing, and waited without bound \
                 (connect_timeout is {connect_timeout:?})"
            ),
        }
        eprintln!("read session {name} during the hang finished in {took:?}");
        assert!(
            took <= bound,
            "read session {name} took {took:?} (connect_timeout {connect_timeout:?})"
        );
    }
    assert!(
        relay
            .seen()
            .iter()
            .any(|(app, hung)| *hung && app.starts_with("during-hang")),
        "no session reached the hanging relay: the scenario did not happen ({:?})",
        relay.seen()
    );
    // The session opened before the hang is untouched; checks through the relay still pass.
    assert!(
        select_one(&before, Duration::from_secs(5)).await,
        "open session through the relay broke"
    );
    assert_eq!(backend_port(&before).await, p1);

    // The relay recovers: new reads reach pg-1 through it again.
    relay.set_mode(FORWARD);
    wait_until_async(T, "a read session on pg-1 again", || async {
        match connect_named(lb.read, "after-hang", Duration::from_secs(5)).await {
            Ok(c) => backend_port(&c).await == p1,
            Err(_) => false,
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Connection reset mid-session
// ---------------------------------------------------------------------------------------------

/// A relay in front of pg-1 resets one session (RST) while it runs a query: that client gets
/// an error at once, not after its query would have ended; sessions through the same relay,
/// on the other replica and on the write port go on; new sessions work; pg-1 stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backend_reset_mid_session_fails_only_that_session() {
    let cluster = PgCluster::start(2);
    let relay = Relay::start(Some(cluster.node(1).addr()), FORWARD).await;
    let lb = Pglb::builder(&cluster)
        .backends(vec![
            spec("pg-0", cluster.node(0).addr().to_string()),
            spec("pg-1", relay.addr.to_string()),
            spec("pg-2", cluster.node(2).addr().to_string()),
        ])
        .start();
    lb.wait_ready().await;
    lb.wait_stats(T, "both replicas readable", |s| {
        ["pg-1", "pg-2"]
            .iter()
            .all(|n| s.try_backend(n).is_some_and(|b| b.read_eligible))
    })
    .await;
    let (p0, p1, p2) = (
        cluster.node(0).port(),
        cluster.node(1).port(),
        cluster.node(2).port(),
    );

    // victim and relay-bystander on pg-1 (through the relay), direct-bystander on pg-2.
    let mut spare = Vec::new();
    async fn session_on(
        addr: SocketAddr,
        want: u16,
        name: &str,
        spare: &mut Vec<Client>,
    ) -> Client {
        for _ in 0..20 {
            let c = connect_named_ok(addr, name).await;
            if backend_port(&c).await == want {
                return c;
            }
            spare.push(c); // held open, so leastconn prefers the other replica next time
        }
        panic!("no read session landed on port {want} in 20 tries");
    }
    let victim = session_on(lb.read, p1, "victim", &mut spare).await;
    let relay_bystander = session_on(lb.read, p1, "relay-bystander", &mut spare).await;
    let direct_bystander = session_on(lb.read, p2, "direct-bystander", &mut spare).await;
    let writer = connect_named_ok(lb.write, "writer").await;
    assert_eq!(backend_port(&writer).await, p0);
    let writer = Arc::new(writer);

    // The victim runs a long query; once pg-1 shows it running, the relay resets it.
    let victim = Arc::new(victim);
    let v = victim.clone();
    let query = tokio::spawn(async move {
        let started = Instant::now();
        let r = v.simple_query("SELECT pg_sleep(30)").await;
        (r.map(|_| ()), started.elapsed())
    });
    wait_until(T, "the victim's query running on pg-1", || {
        cluster
            .node(1)
            .try_exec("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'victim' AND state = 'active'")
            .is_ok_and(|n| n == "1")
    })
    .await;
    let reset_at = Instant::now();
    assert_eq!(
        relay.reset("victim"),
        1,
        "relay sessions: {:?}",
        relay.seen()
    );
    let (result, _) = tokio::time::timeout(Duration::from_secs(10), query)
        .await
        .expect("the victim's query did not fail within 10 s of the reset")
        .unwrap();
    let noticed = reset_at.elapsed();
    eprintln!("the victim's query failed {noticed:?} after the reset");
    let err = result.expect_err("the victim's query succeeded through a reset connection");
    assert!(
        noticed < Duration::from_secs(5),
        "the victim learned of the reset only after {noticed:?}"
    );
    wait_until(Duration::from_secs(5), "victim client closed", || {
        victim.is_closed()
    })
    .await;
    assert!(
        scalar(&victim, "SELECT 1").await.is_err(),
        "the victim session still answers after {err:?}"
    );

    // Everyone else is unaffected.
    assert!(
        select_one(&relay_bystander, Duration::from_secs(5)).await,
        "session through the same relay broke"
    );
    assert_eq!(backend_port(&relay_bystander).await, p1);
    assert!(
        select_one(&direct_bystander, Duration::from_secs(5)).await,
        "session on pg-2 broke"
    );
    assert!(
        select_one(&writer, Duration::from_secs(5)).await,
        "write session broke"
    );
    for c in &spare {
        assert!(
            select_one(c, Duration::from_secs(5)).await,
            "a spare read session broke"
        );
    }
    let mut seen = std::collections::HashSet::new();
    for i in 0..8 {
        let c = connect_named_ok(lb.read, &format!("after-reset-{i}")).await;
        seen.insert(backend_port(&c).await);
    }
    assert!(
        seen.contains(&p1),
        "no new read session reached pg-1 after the reset: {seen:?}"
    );
    let s = lb.stats().unwrap();
    assert_eq!(
        s.backend("pg-1").state,
        "up",
        "one reset session took pg-1 down: {}",
        s.raw
    );
    assert!(pglb_alive(&lb));
}

fn pglb_alive(lb: &Pglb) -> bool {
    lb.health_status() == Ok(200)
}

// ---------------------------------------------------------------------------------------------
// DNS
// ---------------------------------------------------------------------------------------------

/// A backend named by a host name. One that never resolves is down with the DNS reason from
/// the start; one switched (by a hot reload) from `localhost` to a name that does not resolve
/// goes down with that reason while the others keep serving, and comes back when switched back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backend_name_that_stops_resolving_goes_down_and_the_others_serve() {
    let cluster = PgCluster::start(2);
    let (p0, p1, p2) = (
        cluster.node(0).port(),
        cluster.node(1).port(),
        cluster.node(2).port(),
    );
    let with_pg1_at = |addr: String| {
        vec![
            spec("pg-0", format!("127.0.0.1:{p0}")),
            spec("pg-1", addr),
            spec("pg-2", format!("127.0.0.1:{p2}")),
            spec("ghost", "pglb-test-nonexistent.invalid:5432"),
        ]
    };
    let builder = |addr: String| Pglb::builder(&cluster).backends(with_pg1_at(addr));
    let lb = builder(format!("localhost:{p1}")).start();
    lb.wait_ready().await;
    let is_dns = |b: &BackendStats| {
        b.state == "down"
            && b.last_error
                .as_deref()
                .is_some_and(|e| e.contains("cannot resolve host"))
    };
    let s = lb
        .wait_stats(T, "ghost down (dns), both replicas readable", |s| {
            s.try_backend("ghost").is_some_and(is_dns)
                && ["pg-1", "pg-2"]
                    .iter()
                    .all(|n| s.try_backend(n).is_some_and(|b| b.read_eligible))
        })
        .await;
    assert_eq!(
        backend_field(&s, "ghost", "last_error_kind"),
        "dns",
        "{}",
        s.raw
    );

    let mut seen = std::collections::HashSet::new();
    for _ in 0..10 {
        seen.insert(landing_port(lb.read).await);
    }
    assert_eq!(
        seen,
        [p1, p2].into_iter().collect(),
        "reads over localhost and 127.0.0.1"
    );
    let on_pg2 = {
        let mut spare = Vec::new();
        loop {
            let c = connect_ok(lb.read).await;
            if backend_port(&c).await == p2 {
                break c;
            }
            spare.push(c);
            assert!(spare.len() < 20, "no session on pg-2");
        }
    };
    let writer = connect_ok(lb.write).await;

    // pg-1's name stops resolving.
    std::fs::write(
        lb.config_path(),
        builder(format!("pglb-fault-gone.invalid:{p1}")).render(lb.write, lb.read, lb.stats),
    )
    .unwrap();
    let s = lb
        .wait_stats(T, "pg-1 down with the dns reason", |s| {
            s.try_backend("pg-1").is_some_and(is_dns)
        })
        .await;
    assert_eq!(
        backend_field(&s, "pg-1", "address"),
        format!("pglb-fault-gone.invalid:{p1}")
    );
    assert!(s.backend("pg-2").read_eligible, "{}", s.raw);
    assert_eq!(s.primary.as_deref(), Some("pg-0"));
    for _ in 0..6 {
        assert_eq!(
            landing_port(lb.read).await,
            p2,
            "a read went to the unresolvable pg-1"
        );
    }
    assert_eq!(landing_port(lb.write).await, p0);
    assert!(
        select_one(&on_pg2, Duration::from_secs(5)).await,
        "session on pg-2 broke"
    );
    assert!(
        select_one(&writer, Duration::from_secs(5)).await,
        "write session broke"
    );

    // It resolves again.
    std::fs::write(
        lb.config_path(),
        builder(format!("localhost:{p1}")).render(lb.write, lb.read, lb.stats),
    )
    .unwrap();
    lb.wait_stats(T, "pg-1 readable again", |s| {
        s.try_backend("pg-1").is_some_and(|b| b.read_eligible)
    })
    .await;
    wait_until_async(T, "a read on pg-1 again", || async {
        landing_port(lb.read).await == p1
    })
    .await;
    let s = lb.stats().unwrap();
    assert!(is_dns(s.backend("ghost")), "{}", s.raw);
}

// ---------------------------------------------------------------------------------------------
// Config file deleted
// ---------------------------------------------------------------------------------------------

/// The config file is deleted under a running pglb: it keeps serving on the last good config,
/// `/stats.json` says the reload was refused and why (the file), the log says so; SIGHUP while
/// it is missing changes nothing; writing a file back restores normal reloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_config_file_keeps_the_last_good_config_and_is_reported() {
    let cluster = PgCluster::start(1);
    let builder = || Pglb::builder(&cluster);
    let mut lb = builder().start();
    lb.wait_ready().await;
    lb.wait_stats(T, "pg-1 readable", |s| {
        s.try_backend("pg-1").is_some_and(|b| b.read_eligible)
    })
    .await;
    let (p0, p1) = (cluster.node(0).port(), cluster.node(1).port());
    let writer = connect_ok(lb.write).await;
    let reader = connect_ok(lb.read).await;
    let path = lb.config_path().to_path_buf();
    let path_text = path.display().to_string();

    std::fs::remove_file(&path).unwrap();
    let s = lb
        .wait_stats(
            Duration::from_secs(10),
            "reload refused after the delete",
            |s| reload_field(s, "result") == "rejected",
        )
        .await;
    let error = reload_field(&s, "error").as_str().unwrap_or("").to_string();
    assert!(
        error.contains(&path_text),
        "the refusal does not name the file: {error:?}"
    );
    assert!(
        error.contains("No such file") || error.contains("not found"),
        "the refusal does not say the file is missing: {error:?}"
    );
    lb.wait_log(Duration::from_secs(5), "config reload refused")
        .await;
    assert!(
        lb.log_text().contains(&path_text),
        "the log does not name the missing file"
    );

    // Still serving on the last good config, old and new sessions on both ports.
    assert!(select_one(&writer, Duration::from_secs(5)).await);
    assert!(select_one(&reader, Duration::from_secs(5)).await);
    assert_eq!(landing_port(lb.write).await, p0);
    assert_eq!(landing_port(lb.read).await, p1);
    let rejected = reload_field(&lb.stats().unwrap(), "rejected")
        .as_u64()
        .unwrap();

    // SIGHUP while the file is missing: refused again, nothing else changes, still running.
    lb.signal(libc::SIGHUP);
    lb.wait_stats(Duration::from_secs(10), "SIGHUP refused too", |s| {
        reload_field(s, "rejected").as_u64() == Some(rejected + 1)
    })
    .await;
    assert!(
        lb.try_exit_status().is_none(),
        "pglb exited without its config file"
    );
    assert_eq!(landing_port(lb.write).await, p0);
    assert_eq!(landing_port(lb.read).await, p1);
    let s = lb.stats().unwrap();
    assert_eq!(s.primary.as_deref(), Some("pg-0"));
    assert_eq!(reload_field(&s, "applied"), 0);

    // The file comes back (with a change): applied, the refusal cleared; the next edit too.
    let applied = |s: &Stats| reload_field(s, "applied").as_u64().unwrap_or(0);
    std::fs::write(
        &path,
        builder()
            .set("read", "max_lag", "32MB")
            .render(lb.write, lb.read, lb.stats),
    )
    .unwrap();
    let s = lb
        .wait_stats(T, "the restored file applied", |s| applied(s) == 1)
        .await;
    assert_eq!(reload_field(&s, "result"), "applied", "{}", s.raw);
    assert!(reload_field(&s, "error").is_null(), "{}", s.raw);
    std::fs::write(
        &path,
        builder()
            .set("read", "max_lag", "8MB")
            .render(lb.write, lb.read, lb.stats),
    )
    .unwrap();
    lb.wait_stats(T, "the next edit applied", |s| applied(s) == 2)
        .await;
    assert!(select_one(&writer, Duration::from_secs(5)).await);
    assert!(select_one(&reader, Duration::from_secs(5)).await);
}

// ---------------------------------------------------------------------------------------------
// Stats port flood
// ---------------------------------------------------------------------------------------------

/// How long the flood lasts: `PGLB_FLOOD_SECS`, default 10.
fn flood_duration() -> Duration {
    Duration::from_secs(
        std::env::var("PGLB_FLOOD_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10),
    )
}

/// 8 threads hammer `/`, `/stats.json` and `/metrics` and 300 idle connections sit on the
/// stats port while sessions keep flowing through both ports (persistent sessions querying,
/// and a new session per query): no query fails, `/health` still answers afterwards and the
/// stats port's descriptors are given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flooded_stats_port_does_not_disturb_sessions() {
    let cluster = PgCluster::start(1);
    let lb = Pglb::start(&cluster).await;
    lb.wait_stats(T, "pg-1 readable", |s| {
        s.try_backend("pg-1").is_some_and(|b| b.read_eligible)
    })
    .await;
    let fds_before = fd_count(lb.pid());
    let stop = Arc::new(AtomicBool::new(false));

    // Idle connections: connected, never a byte.
    let mut idle = Vec::new();
    for _ in 0..300 {
        match std::net::TcpStream::connect_timeout(&lb.stats, Duration::from_secs(3)) {
            Ok(s) => idle.push(s),
            Err(e) => panic!("idle connection {} to the stats port: {e}", idle.len()),
        }
    }

    let fds_idle = wait_for(
        Duration::from_secs(10),
        "the idle connections accepted",
        || {
            let n = fd_count(lb.pid());
            (n >= fds_before + 250).then_some(n)
        },
    )
    .await;

    // Hammering threads.
    let http_ok = Arc::new(AtomicU64::new(0));
    let http_err = Arc::new(AtomicU64::new(0));
    let hammers: Vec<_> = (0..8)
        .map(|i| {
            let (stop, ok, err, addr) = (stop.clone(), http_ok.clone(), http_err.clone(), lb.stats);
            std::thread::spawn(move || {
                let paths = ["/", "/stats.json", "/metrics"];
                let mut n = i;
                while !stop.load(Ordering::Relaxed) {
                    match http(addr, "GET", paths[n % paths.len()], None) {
                        Ok((200, _)) => ok.fetch_add(1, Ordering::Relaxed),
                        _ => err.fetch_add(1, Ordering::Relaxed),
                    };
                    n += 1;
                }
            })
        })
        .collect();

    // Sessions: one persistent and one connect-per-query loop on each port.
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let queries = Arc::new(AtomicU64::new(0));
    let mut loops = Vec::new();
    for (port_name, addr) in [("write", lb.write), ("read", lb.read)] {
        let (stop1, failures1, queries1) = (stop.clone(), failures.clone(), queries.clone());
        loops.push(tokio::spawn(async move {
            let (stop, failures, queries) = (stop1, failures1, queries1);
            let c = connect_named_ok(addr, &format!("flood-persistent-{port_name}")).await;
            while !stop.load(Ordering::Relaxed) {
                if select_one(&c, Duration::from_secs(10)).await {
                    queries.fetch_add(1, Ordering::Relaxed);
                } else {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("{port_name}: persistent query failed"));
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
        let (stop2, failures2, queries2) = (stop.clone(), failures.clone(), queries.clone());
        loops.push(tokio::spawn(async move {
            let (stop, failures, queries) = (stop2, failures2, queries2);
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                match connect_named(
                    addr,
                    &format!("flood-new-{port_name}"),
                    Duration::from_secs(10),
                )
                .await
                {
                    Ok(c) if select_one(&c, Duration::from_secs(10)).await => {
                        queries.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => failures
                        .lock()
                        .unwrap()
                        .push(format!("{port_name}: query {i} on a new session failed")),
                    Err(e) => failures
                        .lock()
                        .unwrap()
                        .push(format!("{port_name}: login {i} failed: {e:?}")),
                }
            }
        }));
    }

    let flood = flood_duration();
    tokio::time::sleep(flood).await;
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.unwrap();
    }
    for h in hammers {
        h.join().unwrap();
    }
    let (ok, err) = (
        http_ok.load(Ordering::Relaxed),
        http_err.load(Ordering::Relaxed),
    );
    let q = queries.load(Ordering::Relaxed);
    eprintln!(
        "stats flood for {flood:?}: {ok} HTTP 200s, {err} HTTP failures, {q} queries through pglb, \
         pglb fds: {fds_before} before, {fds_idle} with the idle connections, {} at the end",
        fd_count(lb.pid())
    );
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "queries failed during the stats flood: {failures:?}"
    );
    assert!(q >= 20, "only {q} queries went through during the flood");
    assert!(
        ok >= 100,
        "pglb answered only {ok} stats requests during the flood ({err} failed)"
    );

    drop(idle);
    assert_eq!(lb.health_status(), Ok(200), "/health after the flood");
    wait_until(
        Duration::from_secs(15),
        "the stats connections' descriptors given back",
        || fd_count(lb.pid()) <= fds_before + 10,
    )
    .await;
    assert_eq!(landing_port(lb.write).await, cluster.node(0).port());
    assert_eq!(landing_port(lb.read).await, cluster.node(1).port());
}

// ---------------------------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------------------------

/// pglb runs with a distinctive check password (from a file), admin token, read password and
/// read token, at debug log level; the check password is switched to a wrong one and back,
/// admin and read calls are made with right and wrong credentials, a client logs in with a
/// wrong password through pglb. None of these secrets (nor the base64 form of the basic-auth
/// pairs) appears in the log, `/stats.json`, the HTML page, `/metrics` or `pglb check`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_secret_appears_in_the_log_pages_or_metrics() {
    use base64::Engine;
    const CHECK_PW: &str = "Chk-S3cret-q7Zx9-pglb";
    const WRONG_CHECK_PW: &str = "Wr0ng-Chk-k3Lm8-pglb";
    const ADMIN_TOKEN: &str = "Adm-T0ken-w4Kp2-pglb";
    const WRONG_ADMIN_TOKEN: &str = "Wr0ng-Adm-h8Jd5-pglb";
    const READ_USER: &str = "viewer";
    const READ_PW: &str = "Rd-Passw0rd-m2Qs7-pglb";
    const WRONG_READ_PW: &str = "Wr0ng-Rd-p9Vn3-pglb";
    const READ_TOKEN: &str = "Rd-T0ken-c6Yt1-pglb";
    const WRONG_READ_TOKEN: &str = "Wr0ng-RdTok-b5Xe4-pglb";
    const CLIENT_WRONG_PW: &str = "Cl1ent-Wr0ng-f3Gu6-pglb";
    let b64 = |s: String| base64::engine::general_purpose::STANDARD.encode(s);
    let basic_ok = format!("Basic {}", b64(format!("{READ_USER}:{READ_PW}")));
    let basic_wrong = format!("Basic {}", b64(format!("{READ_USER}:{WRONG_READ_PW}")));

    let cluster = PgCluster::start(1);
    cluster
        .primary()
        .exec(&format!("ALTER ROLE {CHECK_USER} PASSWORD '{CHECK_PW}'"));
    cluster.wait_replayed(1, T);
    let secrets_dir = tempfile::tempdir().unwrap();
    let pw_file = secrets_dir.path().join("check-password");
    std::fs::write(&pw_file, format!("{CHECK_PW}\n")).unwrap();

    let lb = Pglb::builder(&cluster)
        .unset("check", "password_env")
        .set("check", "password_file", pw_file.display().to_string())
        .set("stats", "admin_token_env", "PGLB_FT_ADMIN_TOKEN")
        .set("stats", "read_user", READ_USER)
        .set("stats", "read_password_env", "PGLB_FT_READ_PW")
        .set("stats", "read_token_env", "PGLB_FT_READ_TOKEN")
        .env("PGLB_FT_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("PGLB_FT_READ_PW", READ_PW)
        .env("PGLB_FT_READ_TOKEN", READ_TOKEN)
        .env("PGLB_LOG", "debug")
        .start();
    lb.wait_ready().await;
    let bearer = |t: &str| format!("Bearer {t}");
    let stats = |auth: &str| -> serde_json::Value {
        let (code, body) = http(lb.stats, "GET", "/stats.json", Some(auth)).expect("stats.json");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    };
    let backend_state = |v: &serde_json::Value, name: &str| -> (String, String) {
        let b = v["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name)
            .cloned()
            .unwrap_or_default();
        (
            b["state"].as_str().unwrap_or("").to_string(),
            b["last_error"].as_str().unwrap_or("").to_string(),
        )
    };
    wait_until(T, "pg-1 up", || {
        backend_state(&stats(&basic_ok), "pg-1").0 == "up"
    })
    .await;
    assert_eq!(landing_port(lb.write).await, cluster.node(0).port());
    assert_eq!(landing_port(lb.read).await, cluster.node(1).port());

    // Wrong check password (file rewritten, SIGHUP): both backends down with an auth error.
    std::fs::write(&pw_file, format!("{WRONG_CHECK_PW}\n")).unwrap();
    lb.signal(libc::SIGHUP);
    wait_until(T, "backends down with an authentication error", || {
        let v = stats(&bearer(READ_TOKEN));
        ["pg-0", "pg-1"].iter().all(|n| {
            let (state, err) = backend_state(&v, n);
            state == "down" && err.contains("authentication failed")
        })
    })
    .await;
    // Right one back.
    std::fs::write(&pw_file, format!("{CHECK_PW}\n")).unwrap();
    lb.signal(libc::SIGHUP);
    lb.wait_ready().await;

    // Reads: right credentials work, wrong ones are refused.
    for (auth, want) in [
        (None, 401),
        (Some(basic_wrong.as_str()), 401),
        (Some(&*bearer(WRONG_READ_TOKEN)), 401),
        (Some(&*bearer(WRONG_ADMIN_TOKEN)), 401),
        (Some(basic_ok.as_str()), 200),
        (Some(&*bearer(READ_TOKEN)), 200),
        (Some(&*bearer(ADMIN_TOKEN)), 200),
    ] {
        for path in ["/", "/stats.json", "/metrics"] {
            let (code, _) = http(lb.stats, "GET", path, auth).unwrap();
            assert_eq!(code, want, "GET {path} with {auth:?}");
        }
    }
    // Admin: only the admin token.
    for (auth, want) in [
        (None, 401),
        (Some(bearer(WRONG_ADMIN_TOKEN)), 401),
        (Some(bearer(READ_TOKEN)), 401),
        (Some(basic_ok.clone()), 401),
        (Some(bearer(ADMIN_TOKEN)), 200),
    ] {
        let (code, body) = http(
            lb.stats,
            "POST",
            "/api/backends/pg-1/drain",
            auth.as_deref(),
        )
        .unwrap();
        assert_eq!(code, want, "drain with {auth:?}: {body}");
    }
    let (code, body) = http(
        lb.stats,
        "POST",
        "/api/backends/pg-1/enable",
        Some(&bearer(ADMIN_TOKEN)),
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    // A client with a wrong password through pglb (pglb never reads it, but must not log it).
    let mut cfg = client_config(lb.read, APP_USER, CLIENT_WRONG_PW);
    cfg.application_name("wrong-password-client");
    let r = tokio::time::timeout(T, cfg.connect(NoTls))
        .await
        .expect("login hung");
    assert!(r.is_err(), "login with a wrong password succeeded");

    // Everything pglb shows or writes.
    let mut outputs = Vec::new();
    for path in ["/", "/stats.json", "/metrics", "/health"] {
        let (code, body) = http(lb.stats, "GET", path, Some(&bearer(READ_TOKEN))).unwrap();
        assert_eq!(code, 200, "GET {path}");
        outputs.push((format!("GET {path}"), body));
    }
    let check = std::process::Command::new(pglb_bin())
        .arg("--config")
        .arg(lb.config_path())
        .arg("check")
        .env("PGLB_FT_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("PGLB_FT_READ_PW", READ_PW)
        .env("PGLB_FT_READ_TOKEN", READ_TOKEN)
        .output()
        .expect("run pglb check");
    assert!(check.status.success(), "pglb check: {check:?}");
    outputs.push((
        "pglb check".into(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        ),
    ));
    let log = lb.log_text();
    assert!(
        log.contains("admin action refused"),
        "the wrong admin token left no log line"
    );
    assert!(
        log.contains("authentication failed"),
        "the wrong check password left no log line"
    );
    outputs.push(("the log".into(), log));

    let secrets = [
        ("check password", CHECK_PW.to_string()),
        ("wrong check password", WRONG_CHECK_PW.to_string()),
        ("admin token", ADMIN_TOKEN.to_string()),
        ("wrong admin token", WRONG_ADMIN_TOKEN.to_string()),
        ("read password", READ_PW.to_string()),
        ("wrong read password", WRONG_READ_PW.to_string()),
        ("read token", READ_TOKEN.to_string()),
        ("wrong read token", WRONG_READ_TOKEN.to_string()),
        ("client's wrong password", CLIENT_WRONG_PW.to_string()),
        (
            "basic auth (base64)",
            basic_ok["Basic ".len()..].to_string(),
        ),
        (
            "wrong basic auth (base64)",
            basic_wrong["Basic ".len()..].to_string(),
        ),
    ];
    let mut leaks = Vec::new();
    for (where_, text) in &outputs {
        for (what, secret) in &secrets {
            if let Some(at) = text.find(secret.as_str()) {
                let from = text[..at].rfind('\n').map_or(0, |i| i + 1);
                let to = text[at..].find('\n').map_or(text.len(), |i| at + i);
                leaks.push(format!("{what} in {where_}: {}", &text[from..to]));
            }
        }
    }
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Garbage first packets on the wire
// ---------------------------------------------------------------------------------------------

/// How many garbage packets: `PGLB_WIRE_CASES`, default 300.
fn wire_cases() -> usize {
    std::env::var("PGLB_WIRE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

/// The first packet pglb must refuse, and the SQLSTATE its ErrorResponse must carry
/// (decided by the same parser pglb uses, so this checks the wiring, not the parser).
fn garbage_packet() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    use proptest::collection::vec;
    use proptest::prelude::*;
    let packet = |code: u32, body: Vec<u8>| {
        let mut p = ((body.len() + 8) as u32).to_be_bytes().to_vec();
        p.extend_from_slice(&code.to_be_bytes());
        p.extend(body);
        p
    };
    prop_oneof![
        // A length prefix alone, out of 8..=10000: zero, short, negative, oversized.
        prop_oneof![
            Just(0i32),
            1i32..8,
            i32::MIN..0,
            10_001i32..=i32::MAX,
            10_001i32..10_100
        ]
        .prop_map(|l| l.to_be_bytes().to_vec()),
        // Unknown protocol versions, complete packets.
        (any::<u32>(), vec(any::<u8>(), 0..64))
            .prop_filter("not 3.x nor a request code", |(c, _)| {
                (c >> 16) != 3 && !(80_877_102..=80_877_104).contains(c)
            })
            .prop_map(move |(c, b)| packet(c, b)),
        // Protocol 3 with a broken parameter list, and request codes with bad bodies.
        (
            prop_oneof![
                Just(3u32 << 16),
                Just(80_877_102u32),
                Just(80_877_103u32),
                Just(80_877_104u32)
            ],
            vec(any::<u8>(), 0..128)
        )
            .prop_map(move |(c, b)| packet(c, b)),
    ]
}

/// Reads an ErrorResponse and then EOF; returns (SQLSTATE, message).
async fn read_error_then_close(s: &mut TcpStream) -> Result<(String, String), String> {
    let mut all = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return Err(format!("no close within 3 s (got {all:?})")),
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => all.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => return Err(format!("read error {e} after {all:?}")),
        }
    }
    if all.first() != Some(&b'E') || all.len() < 5 {
        return Err(format!("not an ErrorResponse: {all:?}"));
    }
    let len = u32::from_be_bytes([all[1], all[2], all[3], all[4]]) as usize;
    if len + 1 != all.len() {
        return Err(format!(
            "ErrorResponse length {len} but {} bytes then EOF",
            all.len()
        ));
    }
    let mut code = String::new();
    let mut message = String::new();
    for field in all[5..].split(|&b| b == 0).filter(|f| !f.is_empty()) {
        let v = String::from_utf8_lossy(&field[1..]).into_owned();
        match field[0] {
            b'C' => code = v,
            b'M' => message = v,
            _ => {}
        }
    }
    Ok((code, message))
}

/// Hundreds of invalid first packets (bad lengths alone, unknown protocol versions, broken
/// parameter lists, request codes with wrong bodies) on both ports: each gets a FATAL
/// ErrorResponse with the right SQLSTATE and a clean close, at once; pglb serves throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_first_packets_get_an_error_response_and_a_close() {
    use pglb::pg::{packet_length, parse_first_packet, PacketError};
    use proptest::strategy::{Strategy, ValueTree};
    let cluster = PgCluster::start(0);
    let lb = Pglb::start(&cluster).await;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = garbage_packet();
    let n = wire_cases();
    let mut sent = 0;
    let started = Instant::now();
    while sent < n {
        let p = strategy.new_tree(&mut runner).unwrap().current();
        let header = [p[0], p[1], p[2], p[3]];
        let want = match packet_length(header).and_then(|_| parse_first_packet(&p)) {
            Ok(_) => continue, // happened to be valid
            Err(PacketError::UnsupportedProtocol { .. }) => "0A000",
            Err(_) => "08P01",
        };
        let addr = if sent % 2 == 0 { lb.write } else { lb.read };
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&p).await.unwrap();
        match read_error_then_close(&mut s).await {
            Ok((code, message)) => {
                assert_eq!(code, want, "packet {p:?}: {message}");
                assert!(message.starts_with("pglb: "), "packet {p:?}: {message}");
            }
            Err(e) => panic!("packet {p:?} on {addr}: {e}"),
        }
        sent += 1;
        if sent % 100 == 0 {
            assert_eq!(landing_port(lb.write).await, cluster.node(0).port());
        }
    }
    eprintln!(
        "{sent} garbage first packets refused in {:?}",
        started.elapsed()
    );
    assert_eq!(landing_port(lb.write).await, cluster.node(0).port());
    assert_eq!(landing_port(lb.read).await, cluster.node(0).port());
    assert_eq!(lb.health_status(), Ok(200));
}
