//! The PostgreSQL-aware check: open a fresh connection, log in as the check user (trust, md5 or
//! SCRAM-SHA-256, all handled by tokio-postgres), and learn in one simple-query round trip what the
//! server is: in recovery or not, its WAL positions, its timeline and its system identifier.

use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
use tokio_postgres::{NoTls, SimpleQueryMessage};

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
/// reason shown on the stats page.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("connection refused")]
    Refused,
    #[error("timeout after {0:?}")]
    Timeout(Duration),
    #[error("cannot resolve host: {0}")]
    Dns(String),
    #[error("authentication failed: {0}")]
    Auth(String),
    /// 57P03: "the database system is starting up", "... is shutting down", "... in recovery mode".
    #[error("{0}")]
    CannotConnectNow(String),
    /// 57P01 and friends: the server is shutting down.
    #[error("{0}")]
    Shutdown(String),
    #[error("network error: {0}")]
    Io(String),
    #[error("server error: {0}")]
    Server(String),
    #[error("unexpected check result: {0}")]
    Protocol(String),
    /// pglb could not open the check's connection (out of descriptors, ...): not the backend's
    /// fault, so it does not count as a failed check.
    #[error("{0}")]
    Local(String),
}

impl ProbeError {
    pub fn kind(&self) -> &'static str {
        match self {
            ProbeError::Refused => "refused",
            ProbeError::Timeout(_) => "timeout",
            ProbeError::Dns(_) => "dns",
            ProbeError::Auth(_) => "auth",
            ProbeError::CannotConnectNow(_) => "cannot_connect_now",
            ProbeError::Shutdown(_) => "shutdown",
            ProbeError::Io(_) => "io",
            ProbeError::Server(_) => "server",
            ProbeError::Protocol(_) => "protocol",
            ProbeError::Local(_) => "local",
        }
    }
}

impl From<ConnectError> for ProbeError {
    fn from(e: ConnectError) -> Self {
        match e {
            ConnectError::Refused => ProbeError::Refused,
            ConnectError::Timeout(d) => ProbeError::Timeout(d),
            ConnectError::Dns(s) => ProbeError::Dns(s),
            ConnectError::Io(s) => ProbeError::Io(s),
            ConnectError::Local(s) => ProbeError::Local(ConnectError::Local(s).to_string()),
        }
    }
}

/// Sorts a tokio-postgres error into a `ProbeError` (also used by the promoter's SQL steps).
pub fn classify(e: tokio_postgres::Error) -> ProbeError {
    if let Some(db) = e.as_db_error() {
        let msg = db.message().to_string();
        let code = db.code();
        if *code == SqlState::INVALID_PASSWORD
            || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
        {
            return ProbeError::Auth(msg);
        }
        if *code == SqlState::CANNOT_CONNECT_NOW {
            return ProbeError::CannotConnectNow(msg);
        }
        if *code == SqlState::ADMIN_SHUTDOWN || *code == SqlState::CRASH_SHUTDOWN {
            return ProbeError::Shutdown(msg);
        }
        return ProbeError::Server(format!("{msg} ({})", code.code()));
    }
    let text = e.to_string();
    // tokio-postgres says "invalid configuration" and keeps the reason in the source.
    let cause = std::error::Error::source(&e)
        .map(|s| s.to_string())
        .unwrap_or_default();
    if text.contains("password missing") || cause.contains("password missing") {
        return ProbeError::Auth("the server asks for a password and none is configured".into());
    }
    ProbeError::Io(text)
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
 CASE WHEN pg_is_in_recovery() THEN coalesce((SELECT status = 'streaming' FROM pg_stat_wal_receiver LIMIT 1), false) END";

/// Runs one check against `address` (host:port). The caller bounds it with the check timeout.
pub async fn probe(address: &str, check: &CheckConfig) -> Result<ProbeReport, ProbeError> {
    let started = Instant::now();
    let stream = connect_tcp(address, check.timeout).await?;
    let mut cfg = tokio_postgres::Config::new();
    cfg.user(&check.user)
        .dbname(&check.database)
        .application_name("pglb-check");
    if let Some(pw) = &check.password {
        cfg.password(pw.expose());
    }
    let (client, connection) = cfg.connect_raw(stream, NoTls).await.map_err(classify)?;
    let conn_task = tokio::spawn(connection);
    let result = client.simple_query(CHECK_QUERY).await;
    drop(client);
    // The connection future ends once the client is dropped (it sends Terminate).
    let _ = conn_task.await;
    let rows = result.map_err(classify)?;
    parse_report(&rows, started.elapsed())
}

/// Logs in to `address` exactly as `probe` does and returns the open session, for callers that
/// run more than the check query on it (the promoter). The connection task ends when the client
/// is dropped.
pub async fn login(
    address: &str,
    check: &CheckConfig,
    application_name: &str,
) -> Result<tokio_postgres::Client, ProbeError> {
    let stream = connect_tcp(address, check.timeout).await?;
    let mut cfg = tokio_postgres::Config::new();
    cfg.user(&check.user)
        .dbname(&check.database)
        .application_name(application_name);
    if let Some(pw) = &check.password {
        cfg.password(pw.expose());
    }
    let (client, connection) = cfg.connect_raw(stream, NoTls).await.map_err(classify)?;
    tokio::spawn(connection);
    Ok(client)
}

/// Runs the check query on an open session (see `login`); `started` is when the check began.
pub async fn report(
    client: &tokio_postgres::Client,
    started: Instant,
) -> Result<ProbeReport, ProbeError> {
    let rows = client.simple_query(CHECK_QUERY).await.map_err(classify)?;
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
        latency,
    })
}
