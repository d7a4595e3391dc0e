//! The PostgreSQL-aware check: open a fresh connection, log in as the check user (trust, md5 or
//! SCRAM-SHA-256, all handled by tokio-postgres), and learn in one simple-query round trip what the
//! server is: in recovery or not, its WAL positions, its timeline and its system identifier.

use std::time::{Duration, Instant};

use std::sync::Arc;

use tokio_postgres::error::{DbError, SqlState};
use tokio_postgres::{NoTls, SimpleQueryMessage};

use crate::tls::{ClientTls, NegotiateError};

use super::net::{connect_tcp, ConnectError};
use crate::config::CheckConfig;
use crate::pg::Lsn;

/// What one successful check learned.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeReport {
    pub in_recovery: bool,
    /// Primary only: `pg_current_wal_lsn()`.
    pub current_lsn: Option<Lsn>,
    /// Replica only: `pg_last_wal_receive_lsn()` (None before anything was streamed).
    pub receive_lsn: Option<Lsn>,
    /// Replica only: `pg_last_wal_replay_lsn()`.
    pub replay_lsn: Option<Lsn>,
    /// Replica only: seconds since the last replayed transaction committed on the primary.
    pub replay_age_seconds: Option<f64>,
    /// Primary: the timeline of the current WAL file (correct right after a promotion, unlike
    /// `pg_control_checkpoint()`). Replica: the timeline it receives, or its checkpoint's.
    pub timeline: Option<u32>,
    /// `pg_control_system().system_identifier`: which cluster this server belongs to.
    pub system_id: Option<u64>,
    /// Whether a replica's WAL receiver is streaming right now.
    pub streaming: Option<bool>,
    /// Replica: the `host:port` its WAL receiver streams from (`pg_stat_wal_receiver`).
    pub upstream: Option<String>,
    pub latency: Duration,
}

impl ProbeReport {
    /// The furthest WAL position this server has: current for a primary, replayed for a replica.
    pub fn position(&self) -> Option<Lsn> {
        if self.in_recovery {
            self.replay_lsn.or(self.receive_lsn)
        } else {
            self.current_lsn
        }
    }
}

/// Why a check failed. `kind()` is the stable label for logs and metrics; `Display` is the
/// reason shown on the stats page. Server errors keep the server's `DbError` (SQLSTATE, message)
/// and network errors their `io::Error`, so callers match on codes and kinds, never on text.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProbeError {
    #[error("connection refused")]
    Refused,
    #[error("timeout after {0:?}")]
    Timeout(Duration),
    #[error("cannot resolve host: {0}")]
    Dns(#[source] Arc<std::io::Error>),
    /// 28P01 / 28000: wrong password, no `pg_hba.conf` entry, unknown role.
    #[error("authentication failed: {}", .0.message())]
    Auth(#[source] Arc<DbError>),
    /// The server asked for a password and the config names none.
    #[error("authentication failed: the server asks for a password and none is configured")]
    PasswordMissing,
    /// 57P03: "the database system is starting up", "... is shutting down", "... in recovery mode".
    #[error("{}", .0.message())]
    CannotConnectNow(#[source] Arc<DbError>),
    /// 57P01 and friends: the server is shutting down.
    #[error("{}", .0.message())]
    Shutdown(#[source] Arc<DbError>),
    #[error("network error: {0}")]
    Io(#[source] Arc<std::io::Error>),
    /// The client library failed without a server error or an io error (connection closed,
    /// unexpected message).
    #[error("network error: {0}")]
    Client(#[source] Arc<tokio_postgres::Error>),
    #[error("server error: {} ({})", .0.message(), .0.code().code())]
    Server(#[source] Arc<DbError>),
    #[error("unexpected check result: {0}")]
    Protocol(String),
    /// TLS to the server failed: a certificate the verifier refused (its reason), a server
    /// that declines TLS under `sslmode=require`, no common protocol.
    #[error("{0}")]
    Tls(#[source] Arc<crate::tls::TlsError>),
    /// pglb could not open the check's connection (out of descriptors, ...): not the backend's
    /// fault, so it does not count as a failed check.
    #[error("pglb cannot open a connection: {0}")]
    Local(#[source] Arc<std::io::Error>),
}

impl ProbeError {
    pub fn kind(&self) -> &'static str {
        match self {
            ProbeError::Refused => "refused",
            ProbeError::Timeout(_) => "timeout",
            ProbeError::Dns(_) => "dns",
            ProbeError::Auth(_) | ProbeError::PasswordMissing => "auth",
            ProbeError::CannotConnectNow(_) => "cannot_connect_now",
            ProbeError::Shutdown(_) => "shutdown",
            ProbeError::Io(_) | ProbeError::Client(_) => "io",
            // 53300: at max_connections. Its own label: a full server is up, not failing.
            ProbeError::Server(e) if *e.code() == SqlState::TOO_MANY_CONNECTIONS => "full",
            ProbeError::Server(_) => "server",
            ProbeError::Protocol(_) => "protocol",
            ProbeError::Tls(_) => "tls",
            ProbeError::Local(_) => "local",
        }
    }

    /// The server's SQLSTATE, when the server answered with an error.
    pub fn code(&self) -> Option<&SqlState> {
        match self {
            ProbeError::Auth(e)
            | ProbeError::CannotConnectNow(e)
            | ProbeError::Shutdown(e)
            | ProbeError::Server(e) => Some(e.code()),
            _ => None,
        }
    }
}

/// Same kind and same reason (the sources are not comparable themselves).
impl PartialEq for ProbeError {
    fn eq(&self, other: &Self) -> bool {
        self.kind() == other.kind() && self.to_string() == other.to_string()
    }
}

impl From<ConnectError> for ProbeError {
    fn from(e: ConnectError) -> Self {
        match e {
            ConnectError::Refused => ProbeError::Refused,
            ConnectError::Timeout(d) => ProbeError::Timeout(d),
            ConnectError::Dns(e) => ProbeError::Dns(e),
            ConnectError::Io(e) => ProbeError::Io(e),
            ConnectError::Local(e) => ProbeError::Local(e),
        }
    }
}

/// Sorts a tokio-postgres error into a `ProbeError` (also used by the promoter's SQL steps).
/// `password_configured` tells a server's password request that found no password apart from
/// other client-side failures.
pub fn classify(e: tokio_postgres::Error, password_configured: bool) -> ProbeError {
    if let Some(db) = e.as_db_error() {
        let db = Arc::new(db.clone());
        let code = db.code();
        if *code == SqlState::INVALID_PASSWORD
            || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
        {
            return ProbeError::Auth(db);
        }
        if *code == SqlState::CANNOT_CONNECT_NOW {
            return ProbeError::CannotConnectNow(db);
        }
        if *code == SqlState::ADMIN_SHUTDOWN || *code == SqlState::CRASH_SHUTDOWN {
            return ProbeError::Shutdown(db);
        }
        return ProbeError::Server(db);
    }
    let io = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<std::io::Error>());
    if let Some(io) = io {
        return ProbeError::Io(Arc::new(std::io::Error::new(io.kind(), io.to_string())));
    }
    // Without a server error, an io error or a closed connection, a login fails client-side
    // only when the server asked for a password that tokio-postgres does not have.
    if !password_configured && !e.is_closed() {
        return ProbeError::PasswordMissing;
    }
    ProbeError::Client(Arc::new(e))
}

// One round trip, no prepared statement. CASE keeps primary-only functions away from replicas
// (they raise "recovery is in progress") and the other way round.
const CHECK_QUERY: &str = "SELECT pg_is_in_recovery(), \
 CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn() END, \
 pg_last_wal_receive_lsn(), \
 pg_last_wal_replay_lsn(), \
 CASE WHEN pg_is_in_recovery() THEN extract(epoch FROM now() - pg_last_xact_replay_timestamp()) END, \
 CASE WHEN pg_is_in_recovery() \
   THEN coalesce((SELECT received_tli FROM pg_stat_wal_receiver LIMIT 1), (pg_control_checkpoint()).timeline_id) \
   ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END, \
 (pg_control_system()).system_identifier, \
 CASE WHEN pg_is_in_recovery() THEN coalesce((SELECT status = 'streaming' FROM pg_stat_wal_receiver LIMIT 1), false) END, \
 (SELECT sender_host || ':' || sender_port FROM pg_stat_wal_receiver LIMIT 1)";

/// One backend's check connection, kept logged in between checks: a check is one query on it,
/// so checking needs no free connection slot on the server (a full server is still checked)
/// and costs no password hashing. It is replaced by a fresh login every `check.relogin` and
/// after any error, so a changed password, `pg_hba.conf` or DNS name is still noticed.
#[derive(Default)]
pub struct CheckSession {
    kept: Option<(tokio_postgres::Client, Instant)>,
    /// What the kept connection logged in to and as: a reload that changes any of it (a new
    /// address, user, password or database) means a fresh login at the next check.
    login: Option<LoginKey>,
}

/// Address, user, password, database and TLS settings of a login.
type LoginKey = (
    String,
    String,
    Option<crate::config::Secret>,
    String,
    ClientTls,
);

/// What one check found.
#[derive(Debug)]
pub struct CheckOutcome {
    pub result: Result<ProbeReport, ProbeError>,
    /// A fresh login was refused while the kept connection still answered: the server is up
    /// but takes no new sessions (full, or the login is no longer allowed).
    pub login_refused: Option<ProbeError>,
}

impl CheckSession {
    /// Runs one check against `address` (host:port). The caller bounds it with the check
    /// timeout; a check cut short keeps the connection (its answer is just late).
    pub async fn check(&mut self, address: &str, check: &CheckConfig) -> CheckOutcome {
        let started = Instant::now();
        let login_key = (
            address.to_string(),
            check.user.clone(),
            check.password.clone(),
            check.database.clone(),
            check.tls.clone(),
        );
        if self.login.as_ref() != Some(&login_key) {
            self.kept = None;
            self.login = Some(login_key);
        }
        let due = self
            .kept
            .as_ref()
            .is_none_or(|(_, at)| at.elapsed() >= check.relogin);
        let mut login_refused = None;
        if due {
            match login(address, check, "pglb-check").await {
                Ok(client) => self.kept = Some((client, Instant::now())),
                // pglb's own shortage says nothing about the server.
                Err(e @ ProbeError::Local(_)) => {
                    return CheckOutcome {
                        result: Err(e),
                        login_refused: None,
                    }
                }
                Err(e) if self.kept.is_some() => login_refused = Some(e),
                Err(e) => {
                    return CheckOutcome {
                        result: Err(e),
                        login_refused: None,
                    }
                }
            }
        }
        let Some((client, _)) = &self.kept else {
            unreachable!("a kept connection exists after a successful or skipped login")
        };
        match report(client, started).await {
            Ok(r) => CheckOutcome {
                result: Ok(r),
                login_refused,
            },
            Err(e) => {
                self.kept = None;
                if due {
                    return CheckOutcome {
                        result: Err(e),
                        login_refused: None,
                    };
                }
                // The kept connection broke (server restarted, connection terminated): one fresh
                // login now, so losing the check connection alone is not a failed check.
                let result = match login(address, check, "pglb-check").await {
                    Ok(client) => {
                        let r = report(&client, started).await;
                        if r.is_ok() {
                            self.kept = Some((client, Instant::now()));
                        }
                        r
                    }
                    Err(e) => Err(e),
                };
                CheckOutcome {
                    result,
                    login_refused: None,
                }
            }
        }
    }
}

/// Logs in to `address` as the check user and returns the open session (checks keep it; the
/// promoter runs more than the check query on it). The connection task ends when the client
/// is dropped.
pub async fn login(
    address: &str,
    check: &CheckConfig,
    application_name: &str,
) -> Result<tokio_postgres::Client, ProbeError> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.user(&check.user)
        .dbname(&check.database)
        .application_name(application_name);
    if let Some(pw) = &check.password {
        cfg.password(pw.expose());
    }
    connect(
        address,
        &cfg,
        &check.tls,
        check.timeout,
        check.password.is_some(),
    )
    .await
}

/// Connects to `address`, negotiates TLS as `tls` says and logs in with `cfg` (checks and the
/// promoter). The connection task ends when the client is dropped.
pub async fn connect(
    address: &str,
    cfg: &tokio_postgres::Config,
    tls: &ClientTls,
    timeout: std::time::Duration,
    password_configured: bool,
) -> Result<tokio_postgres::Client, ProbeError> {
    let stream = connect_tcp(address, timeout).await?;
    let host = address.rsplit_once(':').map(|(h, _)| h).unwrap_or(address);
    let stream = tls.negotiate(stream, host).await.map_err(|e| match e {
        NegotiateError::Io(e) => ProbeError::Io(Arc::new(e)),
        NegotiateError::Tls(e) => ProbeError::Tls(Arc::new(e)),
    })?;
    // TLS, if any, is already up: tokio-postgres speaks the protocol inside it.
    let (client, connection) = cfg
        .connect_raw(stream, NoTls)
        .await
        .map_err(|e| classify(e, password_configured))?;
    tokio::spawn(connection);
    Ok(client)
}

/// Runs the check query on an open session (see `login`); `started` is when the check began.
pub async fn report(
    client: &tokio_postgres::Client,
    started: Instant,
) -> Result<ProbeReport, ProbeError> {
    let rows = client
        .simple_query(CHECK_QUERY)
        .await
        .map_err(|e| classify(e, true))?;
    parse_report(&rows, started.elapsed())
}

fn parse_report(rows: &[SimpleQueryMessage], latency: Duration) -> Result<ProbeReport, ProbeError> {
    let row = rows
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .ok_or_else(|| ProbeError::Protocol("check query returned no row".into()))?;
    let col = |i: usize| row.get(i).map(str::to_string);
    let lsn = |i: usize| -> Result<Option<Lsn>, ProbeError> {
        col(i)
            .map(|s| s.parse::<Lsn>().map_err(ProbeError::Protocol))
            .transpose()
    };
    let num = |i: usize| col(i).and_then(|s| s.parse::<f64>().ok());
    Ok(ProbeReport {
        in_recovery: col(0).as_deref() == Some("t"),
        current_lsn: lsn(1)?,
        receive_lsn: lsn(2)?,
        replay_lsn: lsn(3)?,
        replay_age_seconds: num(4),
        timeline: col(5).and_then(|s| s.parse().ok()),
        system_id: col(6).and_then(|s| s.parse().ok()),
        streaming: col(7).map(|s| s == "t"),
        upstream: col(8),
        latency,
    })
}
