//! Observe: one look at every configured backend and at pglb. Each server gets a fresh login as
//! the promoter user (so a server that stopped accepting logins counts as gone) and two queries:
//! the balancer's own check query (`backend::probe`) and what failover needs on top of it: the
//! WAL receiver, the replication settings, the newest timeline history file, the streaming
//! standbys and slots. pglb is read from its `/stats.json`. Plain data out; no decisions here.
//!
//! The loop looks through an [`Observer`], which keeps a login that got no answer in flight
//! between looks: a server that was silent in the previous look (frozen, SIGSTOPped, behind a
//! black hole) is still asked, but the next look does not wait for it again; its answer is taken
//! by whichever look it arrives in. So looks keep their pace (`interval`) while a server hangs,
//! and the time of its last answer is known to the look, not to the look bound.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
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
    /// When the server's answer (`status`, an error from it included) arrived; `None` when it
    /// gave none (the attempt is still in flight or ran out of time).
    pub answered_at: Option<Instant>,
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
        /// Per backend, seconds since pglb's checks last got an answer from it (a pglb that
        /// does not say is taken at its word).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        heard_ago: BTreeMap<String, f64>,
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

    /// Whether pglb's checks got an answer from `name` within `fresh` (or pglb does not say).
    /// A pglb that still routes to a server it has not heard from for that long only has not
    /// marked it down yet (its checks are in flight on a hung server): it vouches for nothing.
    pub fn heard_within(&self, name: &str, fresh: Duration) -> bool {
        match self {
            PglbView::Reachable { heard_ago, .. } => heard_ago
                .get(name)
                .is_none_or(|&age| age <= fresh.as_secs_f64()),
            _ => false,
        }
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

    /// The primary some reachable pglb sends writes to (the first in config order) and has
    /// heard from within `fresh`.
    pub fn sees_primary(&self, fresh: Duration) -> Option<String> {
        self.0.iter().find_map(|w| {
            w.view
                .sees_primary()
                .filter(|p| w.view.heard_within(p, fresh))
        })
    }

    /// Whether some reachable pglb has backend `name` up and has heard from it within `fresh`.
    pub fn sees_up(&self, name: &str, fresh: Duration) -> bool {
        self.0
            .iter()
            .any(|w| w.view.sees_up(name) && w.view.heard_within(name, fresh))
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

/// One server, bounded by the probe timeout (a one-off look: `rejoin`, `switchover`).
pub async fn observe_member(member: &Member, login: &Login) -> NodeObservation {
    let status =
        match tokio::time::timeout(login.timeout, node_status(&member.address, login)).await {
            Ok(r) => r,
            Err(_) => Err(ProbeError::Timeout(login.timeout)),
        };
    let answered_at = answered(&status, Instant::now());
    NodeObservation {
        member: member.clone(),
        status,
        answered_at,
    }
}

/// When an attempt's outcome counts as the server's answer: anything but silence.
fn answered(status: &Result<NodeStatus, ProbeError>, at: Instant) -> Option<Instant> {
    match status {
        Err(ProbeError::Timeout(_)) => None,
        _ => Some(at),
    }
}

/// One look at every member and then at every pglb (a one-off: `rejoin`, `switchover`).
pub async fn observe(settings: &Settings) -> Observation {
    Observer::default().look(settings).await
}

/// An attempt at one server that has not given its outcome to a look yet.
struct Attempt {
    address: String,
    /// When it started: the server has given no answer since (when it is silent).
    started: Instant,
    task: tokio::task::JoinHandle<Outcome>,
}

/// The looks of the promoter's loop, with the attempts that outlive a look (module doc).
#[derive(Default)]
pub struct Observer {
    /// Per member name: the attempt of a server that was silent at the end of a look.
    silent: Mutex<HashMap<String, Attempt>>,
}

impl Drop for Observer {
    fn drop(&mut self) {
        let silent = self.silent.get_mut().unwrap_or_else(|e| e.into_inner());
        for (_, a) in silent.drain() {
            a.task.abort();
        }
    }
}

/// An attempt that has had no answer for this many look bounds is given up and started again
/// (a server frozen for minutes is asked afresh, with a new connection, now and then).
const ATTEMPT_LIFE_IN_LOOKS: u32 = 10;

impl Observer {
    /// Looks at every member, then at every pglb. Members that answered last time get a new
    /// attempt and are waited for up to the look bound; members that were silent keep (or get)
    /// an attempt in the background that this look does not wait for: it takes their answer if
    /// it has arrived by the time the others are done, else reports them silent since the
    /// attempt started.
    pub async fn look(&self, settings: &Settings) -> Observation {
        let at = Instant::now();
        let login = &settings.login;
        let mut carried = {
            let mut silent = self.silent.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::take(&mut *silent)
        };
        let life = login.timeout * ATTEMPT_LIFE_IN_LOOKS;
        // (fresh, the attempt, its outcome once taken)
        let mut attempts: Vec<(bool, Attempt, Option<Outcome>)> =
            Vec::with_capacity(settings.members.len());
        for m in &settings.members {
            let kept = carried.remove(&m.name).filter(|a| {
                let keep = a.address == m.address && at.duration_since(a.started) < life;
                if !keep {
                    a.task.abort();
                }
                keep
            });
            attempts.push(match kept {
                Some(a) => (false, a, None),
                None => (true, start_attempt(m, login, life, at), None),
            });
        }
        // Members no longer configured.
        for a in carried.into_values() {
            a.task.abort();
        }
        // Wait for the fresh attempts only, each up to the look bound.
        let deadline = at + login.timeout;
        let _ = tokio::time::timeout_at(
            deadline,
            join_all(attempts.iter_mut().filter(|(fresh, _, _)| *fresh).map(
                |(_, a, outcome)| async move {
                    *outcome = Some(settle((&mut a.task).await));
                },
            )),
        )
        .await;
        let now = Instant::now();
        let mut still_silent = HashMap::new();
        let mut nodes = Vec::with_capacity(attempts.len());
        for (m, (_, mut a, outcome)) in settings.members.iter().zip(attempts) {
            let outcome = match outcome {
                Some(o) => Some(o),
                None if a.task.is_finished() => {
                    futures_util::FutureExt::now_or_never(&mut a.task).map(settle)
                }
                None => None,
            };
            let (status, answered_at) = match outcome {
                Some((status, when)) => {
                    let answered_at = answered(&status, when);
                    (status, answered_at)
                }
                None => {
                    let silent_for = now.saturating_duration_since(a.started);
                    still_silent.insert(m.name.clone(), a);
                    (Err(ProbeError::Timeout(silent_for)), None)
                }
            };
            nodes.push(NodeObservation {
                member: m.clone(),
                status,
                answered_at,
            });
        }
        // A member whose attempt ran out of time (a black-holed host: the TCP connect timed
        // out) is silent too: its next attempt starts now, in the background.
        for n in &nodes {
            if n.answered_at.is_none() && !still_silent.contains_key(n.name()) {
                still_silent.insert(
                    n.name().to_string(),
                    start_attempt(&n.member, login, life, now),
                );
            }
        }
        *self.silent.lock().unwrap_or_else(|e| e.into_inner()) = still_silent;
        // pglb is read once the servers have answered or timed out: a look that waited out a
        // hung server still carries the witnesses' view as of its end, not as of its start, so
        // a pglb that has just marked the primary down is heard in this look.
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
}

/// What an attempt ends with, and when.
type Outcome = (Result<NodeStatus, ProbeError>, Instant);

/// An attempt's task's result as an outcome (a task that failed to run is an error now).
fn settle(r: Result<Outcome, tokio::task::JoinError>) -> Outcome {
    r.unwrap_or_else(|e| {
        (
            Err(ProbeError::Protocol(format!("look task failed: {e}"))),
            Instant::now(),
        )
    })
}

/// Starts one attempt at `m` in its own task, bounded by `life`; the task gives the outcome and
/// when it came.
fn start_attempt(m: &Member, login: &Login, life: Duration, at: Instant) -> Attempt {
    let address = m.address.clone();
    let login = login.clone();
    let task = tokio::spawn({
        let address = address.clone();
        async move {
            let status = match tokio::time::timeout(life, node_status(&address, &login)).await {
                Ok(r) => r,
                Err(_) => Err(ProbeError::Timeout(life)),
            };
            (status, Instant::now())
        }
    });
    Attempt {
        address,
        started: at,
        task,
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
                .iter()
                .filter(|b| b.state == Status::Up)
                .map(|b| b.name.clone())
                .collect(),
            heard_ago: v
                .backends
                .into_iter()
                .filter_map(|b| Some((b.name, b.seconds_since_answer?)))
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
        let backend = |name: &str, state: Status, heard: Option<f64>| crate::view::BackendView {
            name: name.into(),
            state,
            seconds_since_answer: heard,
            ..Default::default()
        };
        // What pglb serves, read back through the same type.
        let view = View {
            primary: Some("pg-1".into()),
            backends: vec![
                backend("pg-0", Status::Down, None),
                backend("pg-1", Status::Up, Some(0.4)),
            ],
            ..Default::default()
        };
        let v = parse(&serde_json::to_string(&view).unwrap()).unwrap();
        assert_eq!(
            v,
            PglbView::Reachable {
                primary: Some("pg-1".into()),
                up: vec!["pg-1".into()],
                heard_ago: [("pg-1".to_string(), 0.4)].into(),
            }
        );
        assert_eq!(v.sees_primary().as_deref(), Some("pg-1"));
        assert!(!v.sees_up("pg-0"));
        // Heard from 0.4 s ago: within 3 s, not within 0.1 s; pg-0's age is not known.
        let s = Duration::from_secs_f64;
        assert!(v.heard_within("pg-1", s(3.0)));
        assert!(!v.heard_within("pg-1", s(0.1)));
        assert!(v.heard_within("pg-0", s(0.1)));
        let none = View::default();
        let none = parse(&serde_json::to_string(&none).unwrap()).unwrap();
        assert_eq!(none.sees_primary(), None);
        assert!(parse("<html>").is_err());
    }

    /// A server that accepts TCP and then says nothing (a SIGSTOPped postmaster: the kernel
    /// still completes the handshake), and one that refuses.
    #[tokio::test]
    async fn a_silent_server_is_waited_for_once_and_then_asked_in_the_background() {
        let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hung_addr = hung.local_addr().unwrap();
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed_addr = closed.local_addr().unwrap();
        drop(closed);
        // Keeps every accepted connection open, silent.
        let keep = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((c, _)) = hung.accept().await {
                held.push(c);
            }
        });
        let text = format!(
            "[check]\nuser = \"u\"\n[promoter]\nfailover_after = \"2s\"\n\
             [[backend]]\nname = \"hung\"\naddress = \"{hung_addr}\"\n\
             [[backend]]\nname = \"gone\"\naddress = \"{closed_addr}\"\n"
        );
        let c = crate::config::Config::parse(std::path::Path::new("lb.toml"), &text).unwrap();
        let settings = Settings::from_config(&c).unwrap();
        let bound = settings.login.timeout;
        let observer = Observer::default();

        // First look: the hung server was not known to be silent: waited for, the whole bound.
        let t = Instant::now();
        let first = observer.look(&settings).await;
        assert!(t.elapsed() >= bound, "{:?}", t.elapsed());
        let hung_node = first.node("hung").unwrap();
        assert!(matches!(hung_node.status, Err(ProbeError::Timeout(_))));
        assert_eq!(hung_node.answered_at, None);
        // A refusal is an answer.
        let gone = first.node("gone").unwrap();
        assert!(matches!(gone.status, Err(ProbeError::Refused)));
        assert!(gone.answered_at.is_some());

        // Next looks: not waited for again; its silence counts from the first attempt.
        for _ in 0..3 {
            let t = Instant::now();
            let next = observer.look(&settings).await;
            assert!(t.elapsed() < bound / 2, "{:?}", t.elapsed());
            match &next.node("hung").unwrap().status {
                Err(ProbeError::Timeout(silent_for)) => assert!(*silent_for >= bound),
                other => panic!("{other:?}"),
            }
        }
        keep.abort();
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
        let fresh = Duration::from_secs(3);
        let sees = PglbView::Reachable {
            primary: Some("pg-0".into()),
            up: vec!["pg-0".into()],
            heard_ago: [("pg-0".to_string(), 0.5)].into(),
        };
        let none = PglbView::Reachable {
            primary: None,
            up: vec![],
            heard_ago: BTreeMap::new(),
        };
        // One unreachable pglb and one that sees the primary: the one that sees it vetoes.
        let ws = Witnesses(vec![w("a:1", gone.clone()), w("b:2", sees)]);
        assert_eq!(ws.sees_primary(fresh).as_deref(), Some("pg-0"));
        assert!(ws.sees_up("pg-0", fresh));
        // ... unless it has not heard from it for `fresh`: its checks are only in flight.
        let stale = PglbView::Reachable {
            primary: Some("pg-0".into()),
            up: vec!["pg-0".into()],
            heard_ago: [("pg-0".to_string(), 3.4)].into(),
        };
        let ws2 = Witnesses(vec![w("b:2", stale)]);
        assert_eq!(ws2.sees_primary(fresh), None);
        assert!(!ws2.sees_up("pg-0", fresh));
        assert_eq!(
            ws.summary(),
            "a:1: unreachable (refused); b:2: primary pg-0"
        );
        // Unreachable ones abstain: they neither veto nor confirm.
        let ws = Witnesses(vec![w("a:1", gone.clone()), w("b:2", none.clone())]);
        assert_eq!(ws.sees_primary(fresh), None);
        assert!(!ws.sees_up("pg-0", fresh));
        // A single pglb reads as it always did.
        assert_eq!(Witnesses(vec![w("a:1", none)]).summary(), "no primary");
        assert_eq!(Witnesses::default().summary(), "not configured");
        assert_eq!(Witnesses::default().first(), PglbView::NotConfigured);
    }
}
