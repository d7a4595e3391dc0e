//! Observe: one look at every configured backend and at pglb. Each server gets a fresh login as
//! the promoter user (so a server that stopped accepting logins counts as gone) and two queries:
//! the balancer's own check query (`backend::probe`) and what failover needs on top of it: the
//! WAL receiver, the replication settings, the newest timeline history file, the streaming
//! standbys and slots. pglb is read from its `/stats.json`. Plain data out; no decisions here.

use std::time::Duration;

use futures_util::future::join_all;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_postgres::SimpleQueryMessage;

use super::settings::{Login, Member, Settings};
use crate::backend::probe::{self, ProbeError, ProbeReport};
use crate::config::Secret;
use crate::pg::Lsn;
use crate::view::{Status, View};

/// Everything seen in one look.
#[derive(Debug, Clone)]
pub struct Observation {
    /// When the look started.
    pub at: Instant,
    /// One entry per configured backend, in config order.
    pub nodes: Vec<NodeObservation>,
    pub pglb: Witnesses,
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
    /// What a failover saved of `primary_conninfo` when it stopped this standby's receiver
    /// (`pglb.saved_primary_conninfo`); empty otherwise. Non-empty with an empty
    /// `primary_conninfo`: a failover was interrupted here.
    pub saved_primary_conninfo: String,
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

/// One pglb as a witness.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum PglbView {
    /// No pglb to ask.
    NotConfigured,
    /// Its stats endpoint did not answer: it cannot confirm anything, so it abstains.
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

/// One configured pglb and what it said.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Witness {
    /// `host:port` of its stats endpoint.
    pub at: String,
    #[serde(flatten)]
    pub view: PglbView,
}

/// Every configured pglb, in config order. A reachable one that still sees the primary (or has
/// the last primary up) holds a failover back; an unreachable one abstains. So a second pglb can
/// only add a reason to wait, never remove one.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Witnesses(pub Vec<Witness>);

impl Witnesses {
    /// One pglb (the tests' and the single-pglb case).
    pub fn one(view: PglbView) -> Witnesses {
        match view {
            PglbView::NotConfigured => Witnesses::default(),
            view => Witnesses(vec![Witness {
                at: String::new(),
                view,
            }]),
        }
    }

    /// The primary some reachable pglb sends writes to (the first in config order).
    pub fn sees_primary(&self) -> Option<String> {
        self.0.iter().find_map(|w| w.view.sees_primary())
    }

    /// Whether some reachable pglb has backend `name` up.
    pub fn sees_up(&self, name: &str) -> bool {
        self.0.iter().any(|w| w.view.sees_up(name))
    }

    /// The first configured pglb's view (`/status`'s `pglb`).
    pub fn first(&self) -> PglbView {
        self.0
            .first()
            .map(|w| w.view.clone())
            .unwrap_or(PglbView::NotConfigured)
    }

    /// For logs and the failover record: one pglb as before (`no primary`), several each
    /// with their address.
    pub fn summary(&self) -> String {
        match &self.0[..] {
            [] => PglbView::NotConfigured.summary(),
            [one] => one.view.summary(),
            many => many
                .iter()
                .map(|w| format!("{}: {}", w.at, w.view.summary()))
                .collect::<Vec<_>>()
                .join("; "),
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
   WHERE name ~ '^[0-9A-F]{8}\\.history$'), \
 current_setting('pglb.saved_primary_conninfo', true) \
 FROM (SELECT 1) AS one LEFT JOIN pg_stat_wal_receiver r ON true";

/// Logs in to one server and reads its status.
pub async fn node_status(address: &str, login: &Login) -> Result<NodeStatus, ProbeError> {
    let started = std::time::Instant::now();
    let client = login.connect(address, APPLICATION_NAME).await?;
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
            saved_primary_conninfo: col(12),
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
    saved_primary_conninfo: String,
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
        saved_primary_conninfo: x.saved_primary_conninfo,
        read_only: x.read_only,
        synchronous_standby_names: x.synchronous_standby_names,
        streaming_standbys: x.streaming_standbys,
        slots: x.slots,
        wal_receiver_timeout: x.wal_receiver_timeout,
        wal_sender_timeout: x.wal_sender_timeout,
    }
}

/// One server, bounded by the probe timeout.
pub async fn observe_member(member: &Member, login: &Login) -> NodeObservation {
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

/// Looks at every member (all at once), then at every pglb (all at once).
pub async fn observe(settings: &Settings) -> Observation {
    let at = Instant::now();
    let nodes = join_all(
        settings
            .members
            .iter()
            .map(|m| observe_member(m, &settings.login)),
    )
    .await;
    // pglb is read once the servers have answered or timed out: a look that waited out a hung
    // server (the whole probe timeout) still carries the witnesses' view as of its end, not as
    // of its start, so a pglb that has just marked the primary down is heard in this look.
    let pglb = join_all(settings.pglb_stats.iter().map(|addr| async move {
        Witness {
            at: addr.clone(),
            view: pglb_view(
                addr,
                settings.pglb_authorization.as_ref(),
                settings.probe_timeout(),
            )
            .await,
        }
    }))
    .await;
    Observation {
        at,
        nodes,
        pglb: Witnesses(pglb),
    }
}

/// Why pglb's `/stats.json` could not be read.
pub type PglbReadError = crate::http::client::GetError;

impl From<View> for PglbView {
    /// What a witness says: where pglb sends writes and which backends it has up.
    fn from(v: View) -> PglbView {
        PglbView::Reachable {
            primary: v.primary,
            up: v
                .backends
                .into_iter()
                .filter(|b| b.state == Status::Up)
                .map(|b| b.name)
                .collect(),
        }
    }
}

/// Reads pglb's `/stats.json` at `addr` (`host:port`), with `authorization` when pglb wants it.
pub async fn pglb_view(addr: &str, authorization: Option<&Secret>, timeout: Duration) -> PglbView {
    match read_pglb_stats(addr, authorization, timeout).await {
        Ok(stats) => stats.into(),
        Err(e) => PglbView::Unreachable {
            error: e.to_string(),
        },
    }
}

/// `GET /stats.json` (the shared hyper client) into pglb's own `View`, the whole exchange bounded
/// by `timeout`.
pub async fn read_pglb_stats(
    addr: &str,
    authorization: Option<&Secret>,
    timeout: Duration,
) -> Result<View, PglbReadError> {
    crate::http::client::get_json(addr, "/stats.json", authorization, timeout).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<PglbView, serde_json::Error> {
        serde_json::from_str::<View>(body).map(PglbView::from)
    }

    #[test]
    fn pglb_stats_fields() {
        let backend = |name: &str, state: Status| crate::view::BackendView {
            name: name.into(),
            state,
            ..Default::default()
        };
        // What pglb serves, read back through the same type.
        let view = View {
            primary: Some("pg-1".into()),
            backends: vec![backend("pg-0", Status::Down), backend("pg-1", Status::Up)],
            ..Default::default()
        };
        let v = parse(&serde_json::to_string(&view).unwrap()).unwrap();
        assert_eq!(
            v,
            PglbView::Reachable {
                primary: Some("pg-1".into()),
                up: vec!["pg-1".into()]
            }
        );
        assert_eq!(v.sees_primary().as_deref(), Some("pg-1"));
        assert!(!v.sees_up("pg-0"));
        let none = View::default();
        let none = parse(&serde_json::to_string(&none).unwrap()).unwrap();
        assert_eq!(none.sees_primary(), None);
        assert!(parse("<html>").is_err());
    }

    #[test]
    fn witnesses_veto_and_abstain() {
        let w = |at: &str, view: PglbView| Witness {
            at: at.into(),
            view,
        };
        let gone = PglbView::Unreachable {
            error: "refused".into(),
        };
        let sees = PglbView::Reachable {
            primary: Some("pg-0".into()),
            up: vec!["pg-0".into()],
        };
        let none = PglbView::Reachable {
            primary: None,
            up: vec![],
        };
        // One unreachable pglb and one that sees the primary: the one that sees it vetoes.
        let ws = Witnesses(vec![w("a:1", gone.clone()), w("b:2", sees)]);
        assert_eq!(ws.sees_primary().as_deref(), Some("pg-0"));
        assert!(ws.sees_up("pg-0"));
        assert_eq!(
            ws.summary(),
            "a:1: unreachable (refused); b:2: primary pg-0"
        );
        // Unreachable ones abstain: they neither veto nor confirm.
        let ws = Witnesses(vec![w("a:1", gone.clone()), w("b:2", none.clone())]);
        assert_eq!(ws.sees_primary(), None);
        assert!(!ws.sees_up("pg-0"));
        // A single pglb reads as it always did.
        assert_eq!(Witnesses(vec![w("a:1", none)]).summary(), "no primary");
        assert_eq!(Witnesses::default().summary(), "not configured");
        assert_eq!(Witnesses::default().first(), PglbView::NotConfigured);
    }
}
