//! Observe: one look at every configured backend and at pglb. Each server gets a fresh login as
//! the promoter user (so a server that stopped accepting logins counts as gone) and two queries:
//! the balancer's own check query (`backend::probe`) and what failover needs on top of it: the
//! WAL receiver, the replication settings, the newest timeline history file, the streaming
//! standbys and slots. pglb is read from its `/stats.json`. Plain data out; no decisions here.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::SimpleQueryMessage;

use super::settings::{Member, Settings};
use crate::backend::net::connect_tcp;
use crate::backend::probe::{self, ProbeError, ProbeReport};
use crate::config::{CheckConfig, Secret};
use crate::pg::Lsn;

/// Everything seen in one look.
#[derive(Debug, Clone)]
pub struct Observation {
    /// When the look started.
    pub at: Instant,
    /// One entry per configured backend, in config order.
    pub nodes: Vec<NodeObservation>,
    pub pglb: PglbView,
}

impl Observation {
    pub fn node(&self, name: &str) -> Option<&NodeObservation> {
        self.nodes.iter().find(|n| n.member.name == name)
    }
}

#[derive(Debug, Clone)]
pub struct NodeObservation {
    pub member: Member,
    pub status: Result<NodeStatus, ProbeError>,
}

impl NodeObservation {
    pub fn name(&self) -> &str {
        &self.member.name
    }
    pub fn reachable(&self) -> Option<&NodeStatus> {
        self.status.as_ref().ok()
    }
}

/// The WAL receiver of a standby (a row of `pg_stat_wal_receiver`).
#[derive(Debug, Clone, PartialEq)]
pub struct Receiver {
    /// `streaming`, `starting`, `waiting`, `restarting`, `stopping`.
    pub status: String,
    /// Time since the last message from the upstream server, on the standby's own clock.
    pub last_msg_age: Option<Duration>,
    /// `sender_host:sender_port`.
    pub sender: Option<String>,
}

impl Receiver {
    pub fn is_streaming(&self) -> bool {
        self.status == "streaming"
    }
}

/// What one reachable server reported.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeStatus {
    pub in_recovery: bool,
    /// The newest timeline this server knows: the one it writes or receives, or the newest
    /// history file in its `pg_wal` when higher (a standby whose receiver is stopped).
    pub timeline: u32,
    pub system_id: Option<u64>,
    /// Primary: current WAL position.
    pub current_lsn: Option<Lsn>,
    /// Standby: last WAL received and flushed (None before anything was streamed).
    pub receive_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
    /// Standby: None when no WAL receiver runs.
    pub receiver: Option<Receiver>,
    pub primary_conninfo: String,
    pub primary_slot_name: String,
    /// `default_transaction_read_only`: how the promoter fences a stale primary.
    pub read_only: bool,
    pub synchronous_standby_names: String,
    /// `application_name`s in `pg_stat_replication` with state `streaming`.
    pub streaming_standbys: Vec<String>,
    /// Physical replication slots on this server.
    pub slots: Vec<String>,
    pub wal_receiver_timeout: Duration,
    pub wal_sender_timeout: Duration,
}

impl NodeStatus {
    /// Furthest WAL this server holds: current for a primary; received or replayed for a standby.
    pub fn position(&self) -> Lsn {
        if self.in_recovery {
            self.receive_lsn
                .unwrap_or_default()
                .max(self.replay_lsn.unwrap_or_default())
        } else {
            self.current_lsn.unwrap_or_default()
        }
    }
}

/// pglb as a witness.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum PglbView {
    /// No pglb to ask.
    NotConfigured,
    /// Its stats endpoint did not answer: it abstains.
    Unreachable { error: String },
    Reachable {
        /// Backend pglb sends writes to.
        primary: Option<String>,
        /// Backends pglb has up.
        up: Vec<String>,
    },
}

impl PglbView {
    /// The backend pglb sends writes to, when it can be asked and has one.
    pub fn sees_primary(&self) -> Option<String> {
        match self {
            PglbView::Reachable {
                primary: Some(p), ..
            } => Some(p.clone()),
            _ => None,
        }
    }

    /// Whether pglb, when it can be asked, has backend `name` up.
    pub fn sees_up(&self, name: &str) -> bool {
        matches!(self, PglbView::Reachable { up, .. } if up.iter().any(|u| u == name))
    }

    pub fn summary(&self) -> String {
        match self {
            PglbView::NotConfigured => "not configured".into(),
            PglbView::Unreachable { error } => format!("unreachable ({error})"),
            PglbView::Reachable { primary, .. } => match primary {
                Some(p) => format!("primary {p}"),
                None => "no primary".into(),
            },
        }
    }
}

/// Application name of every session the promoter opens.
pub const APPLICATION_NAME: &str = "pglb-promoter";

// One round trip after the check query. pg_stat_wal_receiver has a row only while a receiver
// runs; the LEFT JOIN keeps the settings when it does not.
const NODE_QUERY: &str = "SELECT current_setting('primary_conninfo'), \
 current_setting('primary_slot_name'), \
 current_setting('default_transaction_read_only'), \
 current_setting('synchronous_standby_names'), \
 (SELECT setting FROM pg_settings WHERE name = 'wal_receiver_timeout'), \
 (SELECT setting FROM pg_settings WHERE name = 'wal_sender_timeout'), \
 r.status, \
 extract(epoch FROM clock_timestamp() - r.last_msg_receipt_time), \
 r.sender_host || ':' || r.sender_port, \
 (SELECT string_agg(application_name, ',') FROM pg_stat_replication WHERE state = 'streaming'), \
 (SELECT string_agg(slot_name, ',') FROM pg_replication_slots WHERE slot_type = 'physical'), \
 (SELECT max(('x' || substr(name, 1, 8))::bit(32)::int) FROM pg_ls_waldir() \
   WHERE name ~ '^[0-9A-F]{8}\\.history$') \
 FROM (SELECT 1) AS one LEFT JOIN pg_stat_wal_receiver r ON true";

/// Logs in to one server and reads its status.
pub async fn node_status(address: &str, login: &CheckConfig) -> Result<NodeStatus, ProbeError> {
    let started = Instant::now();
    let client = probe::login(address, login, APPLICATION_NAME).await?;
    let report = probe::report(&client, started).await?;
    let rows = client
        .simple_query(NODE_QUERY)
        .await
        .map_err(|e| probe::classify(e, true))?;
    let row = rows
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .ok_or_else(|| ProbeError::Protocol("promoter query returned no row".into()))?;
    let col = |i: usize| row.get(i).unwrap_or("").to_string();
    let opt = |i: usize| row.get(i).map(str::to_string);
    let millis = |i: usize| Duration::from_millis(col(i).parse().unwrap_or(0));
    let list = |i: usize| -> Vec<String> {
        opt(i)
            .map(|s| s.split(',').map(str::to_string).collect())
            .unwrap_or_default()
    };
    let receiver = opt(6).map(|status| Receiver {
        status,
        last_msg_age: opt(7)
            .and_then(|s| s.parse::<f64>().ok())
            .map(|s| Duration::from_secs_f64(s.max(0.0))),
        sender: opt(8),
    });
    let history_tli: u32 = opt(11).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok(from_parts(
        &report,
        receiver,
        Extras {
            primary_conninfo: col(0),
            primary_slot_name: col(1),
            read_only: col(2) == "on",
            synchronous_standby_names: col(3),
            wal_receiver_timeout: millis(4),
            wal_sender_timeout: millis(5),
            streaming_standbys: list(9),
            slots: list(10),
            history_tli,
        },
    ))
}

struct Extras {
    primary_conninfo: String,
    primary_slot_name: String,
    read_only: bool,
    synchronous_standby_names: String,
    wal_receiver_timeout: Duration,
    wal_sender_timeout: Duration,
    streaming_standbys: Vec<String>,
    slots: Vec<String>,
    history_tli: u32,
}

fn from_parts(report: &ProbeReport, receiver: Option<Receiver>, x: Extras) -> NodeStatus {
    NodeStatus {
        in_recovery: report.in_recovery,
        timeline: report.timeline.unwrap_or(0).max(x.history_tli),
        system_id: report.system_id,
        current_lsn: report.current_lsn,
        receive_lsn: report.receive_lsn,
        replay_lsn: report.replay_lsn,
        receiver,
        primary_conninfo: x.primary_conninfo,
        primary_slot_name: x.primary_slot_name,
        read_only: x.read_only,
        synchronous_standby_names: x.synchronous_standby_names,
        streaming_standbys: x.streaming_standbys,
        slots: x.slots,
        wal_receiver_timeout: x.wal_receiver_timeout,
        wal_sender_timeout: x.wal_sender_timeout,
    }
}

/// One server, bounded by the probe timeout.
pub async fn observe_member(member: &Member, login: &CheckConfig) -> NodeObservation {
    let status =
        match tokio::time::timeout(login.timeout, node_status(&member.address, login)).await {
            Ok(r) => r,
            Err(_) => Err(ProbeError::Timeout(login.timeout)),
        };
    NodeObservation {
        member: member.clone(),
        status,
    }
}

/// Looks at every member and at pglb, all at once.
pub async fn observe(settings: &Settings) -> Observation {
    let at = Instant::now();
    let nodes = join_all(
        settings
            .members
            .iter()
            .map(|m| observe_member(m, &settings.login)),
    );
    let pglb = async {
        match &settings.pglb_stats {
            None => PglbView::NotConfigured,
            Some(addr) => {
                pglb_view(
                    addr,
                    settings.pglb_authorization.as_ref(),
                    settings.probe_timeout(),
                )
                .await
            }
        }
    };
    let (nodes, pglb) = tokio::join!(nodes, pglb);
    Observation { at, nodes, pglb }
}

/// Reads pglb's `/stats.json` at `addr` (`host:port`), with `authorization` when pglb wants it.
pub async fn pglb_view(addr: &str, authorization: Option<&Secret>, timeout: Duration) -> PglbView {
    let get = http_get(addr, "/stats.json", authorization, timeout);
    match tokio::time::timeout(timeout, get).await {
        Err(_) => PglbView::Unreachable {
            error: format!("timeout after {timeout:?}"),
        },
        Ok(Err(error)) => PglbView::Unreachable { error },
        Ok(Ok(body)) => parse_pglb_stats(&body),
    }
}

/// The fields of pglb's `/stats.json` the promoter reads: `primary`, and per backend `name`,
/// `state` and `role`.
pub fn parse_pglb_stats(body: &str) -> PglbView {
    let v: serde_json::Value = match serde_json::from_str(body) {
        Ok(v) => v,
        Err(e) => {
            return PglbView::Unreachable {
                error: format!("unreadable /stats.json: {e}"),
            }
        }
    };
    let primary = v
        .get("primary")
        .and_then(|p| p.as_str())
        .map(str::to_string);
    let up = v
        .get("backends")
        .and_then(|b| b.as_array())
        .map(|bs| {
            bs.iter()
                .filter(|b| b.get("state").and_then(|s| s.as_str()) == Some("up"))
                .filter_map(|b| b.get("name").and_then(|n| n.as_str()).map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    PglbView::Reachable { primary, up }
}

/// Minimal HTTP/1.1 GET with `Connection: close`: the body of a 200 answer.
async fn http_get(
    addr: &str,
    path: &str,
    authorization: Option<&Secret>,
    timeout: Duration,
) -> Result<String, String> {
    let mut s = connect_tcp(addr, timeout)
        .await
        .map_err(|e| e.to_string())?;
    let auth = authorization
        .map(|a| format!("Authorization: {}\r\n", a.expose()))
        .unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| "no HTTP header end".to_string())?;
    let code = head.split_whitespace().nth(1).unwrap_or("");
    if code != "200" {
        return Err(format!("HTTP status {code}"));
    }
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if chunked {
        dechunk(body)
    } else {
        Ok(body.to_string())
    }
}

fn dechunk(mut s: &str) -> Result<String, String> {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").ok_or("truncated chunk")?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("bad chunk size: {e}"))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..size).ok_or("truncated chunk")?;
        out.push_str(chunk);
        s = rest[size..]
            .strip_prefix("\r\n")
            .ok_or("missing chunk end")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pglb_stats_fields() {
        let v = parse_pglb_stats(
            r#"{"primary":"pg-1","backends":[{"name":"pg-0","state":"down","role":"unknown"},
            {"name":"pg-1","state":"up","role":"primary"}]}"#,
        );
        assert_eq!(
            v,
            PglbView::Reachable {
                primary: Some("pg-1".into()),
                up: vec!["pg-1".into()]
            }
        );
        assert_eq!(v.sees_primary().as_deref(), Some("pg-1"));
        assert!(!v.sees_up("pg-0"));
        let none = parse_pglb_stats(r#"{"primary":null,"backends":[]}"#);
        assert_eq!(none.sees_primary(), None);
        assert!(matches!(
            parse_pglb_stats("<html>"),
            PglbView::Unreachable { .. }
        ));
    }

    #[test]
    fn chunked_bodies() {
        assert_eq!(
            dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap(),
            "abcde"
        );
        assert!(dechunk("5\r\nab").is_err());
    }
}
