//! Decide: pure functions from what was observed (and a little memory) to what to do. No I/O,
//! no clock reads: time comes in with the `Observation` and as `now`. Every branch has a unit
//! test below.
//!
//! Two layers. `assess` judges one look: `Steady`, `Reconcile`, `Failover` or `Wait { reason }`.
//! `decide` wraps it with the loop's own policy and returns `Command`s: fences for stale
//! primaries (once until they report back), the pause after a failover that promoted nobody,
//! and the verification of re-pointed replicas. The loop executes the commands and hands what
//! came of them back through `State::record`, so that policy is tested on paused time too.
//!
//! The primary is derived from the servers, never from a local file: a writable server on the
//! newest timeline known for its cluster (newest seen by this process, or found on any server,
//! history files included). A writable server on an older timeline is stale and gets fenced. No
//! writable server on the newest timeline for `failover_after` (counted from the last answer of
//! a primary, or from the start when none ever answered), with the witnesses agreeing, is a
//! failure; anything short of that is a `Wait` with its reason. So a promoter restarted after a
//! promotion finds the promoted server as the primary and promotes nobody else.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

use super::observe::{NodeObservation, NodeStatus, Observation};
use super::settings::Member;

/// The settings `decide` depends on, and the loop's own timings.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub failover_after: Duration,
    pub synchronous: bool,
    /// After a failover that promoted nobody, no new attempt for this long (= `failover_after`).
    pub retry_after: Duration,
    /// A re-pointed replica not seen streaming from its primary after this long is reported
    /// (once) and no longer watched. 30 s.
    pub verify_within: Duration,
}

impl Policy {
    pub fn new(failover_after: Duration, synchronous: bool) -> Policy {
        Policy {
            failover_after,
            synchronous,
            retry_after: failover_after,
            verify_within: Duration::from_secs(30),
        }
    }
}

/// A primary that answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub name: String,
    pub at: Instant,
    pub timeline: u32,
}

/// A re-pointed replica not yet seen streaming from its primary.
#[derive(Debug, Clone, PartialEq)]
pub struct Awaiting {
    pub primary: String,
    pub since: Instant,
}

/// The promoter's memory between two looks. What the servers say is rebuilt from them after a
/// restart; the loop's own memory (fences in flight, retry pause, re-points to verify) is not
/// needed for safety and starts empty.
#[derive(Debug, Clone)]
pub struct State {
    pub policy: Policy,
    /// Stands in for "primary last seen" until some primary answers.
    pub started: Instant,
    pub primary_seen: Option<Seen>,
    /// Newest timeline seen per system identifier.
    pub timelines: BTreeMap<u64, u32>,
    /// Stale primaries a `Fence` was issued for that has not reported back: not issued again.
    pub fencing: BTreeSet<String>,
    /// The last failover promoted nobody: no new attempt before this.
    pub retry_at: Option<Instant>,
    /// Re-pointed replicas to verify, by name.
    pub awaiting: BTreeMap<String, Awaiting>,
    /// The assessment behind the last commands (for `/status`, logs and metrics).
    pub decision: Option<Decision>,
    /// Whether this promoter may change servers (with a store: it is the leader now). When
    /// false, `decide` still assesses every look but issues no command that changes a server.
    pub may_act: bool,
    /// With a store: the other promoters whose published view is fresh and names a primary,
    /// as `(id, primary)`. Witnesses like pglb: one that still sees a primary holds a
    /// failover back.
    pub peers: Vec<(String, String)>,
    /// With a store: the recorded primary's name. While it is writable it is the primary,
    /// and any other writable server is stale (fenced), even on a newer timeline: a server
    /// promoted outside the promoter is not followed.
    pub recorded: Option<String>,
}

impl State {
    pub fn new(policy: Policy, started: Instant) -> State {
        State {
            policy,
            started,
            primary_seen: None,
            timelines: BTreeMap::new(),
            fencing: BTreeSet::new(),
            retry_at: None,
            awaiting: BTreeMap::new(),
            decision: None,
            may_act: true,
            peers: Vec::new(),
            recorded: None,
        }
    }

    /// Folds one observation in: newest timelines, and when the primary last answered.
    pub fn note(&mut self, obs: &Observation) {
        for n in &obs.nodes {
            if let Some(st) = n.reachable() {
                let tl = self.timelines.entry(st.system_id.unwrap_or(0)).or_insert(0);
                *tl = (*tl).max(st.timeline);
            }
        }
        if let Primary::One(p) = topology(obs, self).primary {
            self.primary_seen = Some(Seen {
                name: p.name().to_string(),
                // When its answer arrived (within the look, or between two looks for an attempt
                // that outlived one); the look's start where that is not known.
                at: p.answered_at.unwrap_or(obs.at),
                timeline: p.reachable().map(|s| s.timeline).unwrap_or(0),
            });
        }
    }

    /// When no primary has answered since (the last answer, or the start).
    pub fn primary_last_seen(&self) -> Instant {
        self.primary_seen
            .as_ref()
            .map(|s| s.at)
            .unwrap_or(self.started)
    }
}

/// Who is writable, as derived from the servers.
#[derive(Debug)]
pub enum Primary<'a> {
    One(&'a NodeObservation),
    None,
    /// More than one writable server on the newest timeline.
    Many(Vec<&'a NodeObservation>),
}

#[derive(Debug)]
pub struct Topology<'a> {
    pub primary: Primary<'a>,
    /// Writable servers on an older timeline than their cluster's newest.
    pub stale: Vec<&'a NodeObservation>,
    /// Reachable servers in recovery.
    pub replicas: Vec<&'a NodeObservation>,
}

fn newest_timeline(obs: &Observation, state: &State, system_id: Option<u64>) -> u32 {
    let seen = obs
        .nodes
        .iter()
        .filter_map(|n| n.reachable())
        .filter(|s| s.system_id == system_id)
        .map(|s| s.timeline)
        .max()
        .unwrap_or(0);
    let remembered = state
        .timelines
        .get(&system_id.unwrap_or(0))
        .copied()
        .unwrap_or(0);
    seen.max(remembered)
}

/// Sorts the reachable servers into primary, stale primaries and replicas.
pub fn topology<'a>(obs: &'a Observation, state: &State) -> Topology<'a> {
    let mut current = Vec::new();
    let mut stale = Vec::new();
    let mut replicas = Vec::new();
    for n in &obs.nodes {
        let Some(st) = n.reachable() else { continue };
        if st.in_recovery {
            replicas.push(n);
        } else if st.timeline >= newest_timeline(obs, state, st.system_id) {
            current.push(n);
        } else {
            stale.push(n);
        }
    }
    if let Some(name) = state.recorded.as_deref() {
        let recorded = current.iter().chain(&stale).find(|n| n.name() == name);
        if let Some(&p) = recorded {
            let others = current
                .into_iter()
                .chain(stale)
                .filter(|n| n.name() != name)
                .collect();
            return Topology {
                primary: Primary::One(p),
                stale: others,
                replicas,
            };
        }
    }
    let primary = match current.len() {
        0 => Primary::None,
        1 => Primary::One(current[0]),
        _ => Primary::Many(current),
    };
    Topology {
        primary,
        stale,
        replicas,
    }
}

/// Stale primaries not fenced yet: each must be made read-only and its sessions ended. This
/// runs beside whatever `decide` says, so fencing never waits for, or delays, a promotion.
pub fn to_fence(obs: &Observation, state: &State) -> Vec<Member> {
    topology(obs, state)
        .stale
        .into_iter()
        .filter(|n| n.reachable().is_some_and(|s| !s.read_only))
        .map(|n| n.member.clone())
        .collect()
}

/// Stale primaries already read-only (for the status page).
pub fn fenced(obs: &Observation, state: &State) -> Vec<String> {
    topology(obs, state)
        .stale
        .into_iter()
        .filter(|n| n.reachable().is_some_and(|s| s.read_only))
        .map(|n| n.name().to_string())
        .collect()
}

/// Why the promoter does not act. Said on every look, with its evidence.
#[derive(Debug, Clone, PartialEq)]
pub enum WaitReason {
    /// No primary answers, but not for `failover_after` yet.
    PrimaryGone {
        last: Option<String>,
        down_for: Duration,
        failover_after: Duration,
    },
    /// The promoter reaches no replica: it may be the one cut off, and has no candidate.
    NoReplicaReachable { unreachable: Vec<String> },
    /// Most reachable replicas still receive WAL: the primary lives; the promoter is cut off.
    ReplicasStillStreaming {
        streaming: Vec<String>,
        lost: Vec<String>,
    },
    /// pglb still sees a primary.
    PglbSeesPrimary { primary: String },
    /// Another promoter (with a store) still sees a primary.
    PromoterSeesPrimary { promoter: String, primary: String },
    /// Synchronous mode: a replica that may hold acknowledged commits cannot be compared.
    SyncReplicaUnreachable { unreachable: Vec<String> },
    /// Nobody may be promoted.
    NoCandidate {
        excluded: Vec<(String, &'static str)>,
    },
    /// More than one writable server on the newest timeline: not ours to pick.
    SplitBrain { primaries: Vec<String> },
}

impl WaitReason {
    /// Stable label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            WaitReason::PrimaryGone { .. } => "primary_gone",
            WaitReason::NoReplicaReachable { .. } => "no_replica_reachable",
            WaitReason::ReplicasStillStreaming { .. } => "replicas_still_streaming",
            WaitReason::PglbSeesPrimary { .. } => "pglb_sees_primary",
            WaitReason::PromoterSeesPrimary { .. } => "promoter_sees_primary",
            WaitReason::SyncReplicaUnreachable { .. } => "sync_replica_unreachable",
            WaitReason::NoCandidate { .. } => "no_candidate",
            WaitReason::SplitBrain { .. } => "split_brain",
        }
    }

    /// Whether this wait blocks a failover that would otherwise be due (said at `warn`).
    pub fn blocks_failover(&self) -> bool {
        !matches!(self, WaitReason::PrimaryGone { .. })
    }
}

impl fmt::Display for WaitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitReason::PrimaryGone {
                last,
                down_for,
                failover_after,
            } => write!(
                f,
                "no primary answers ({}) for {:.1}s; failover after {:.1}s",
                last.as_deref().unwrap_or("none seen yet"),
                down_for.as_secs_f64(),
                failover_after.as_secs_f64()
            ),
            WaitReason::NoReplicaReachable { unreachable } => write!(
                f,
                "no replica is reachable ({}): the promoter may be the one cut off",
                unreachable.join(", ")
            ),
            WaitReason::ReplicasStillStreaming { streaming, lost } => write!(
                f,
                "witnesses disagree: replicas still streaming from a primary: {}; lost it: {}",
                streaming.join(", "),
                if lost.is_empty() {
                    "none".to_string()
                } else {
                    lost.join(", ")
                }
            ),
            WaitReason::PglbSeesPrimary { primary } => {
                write!(
                    f,
                    "witnesses disagree: pglb still sees {primary} as primary"
                )
            }
            WaitReason::PromoterSeesPrimary { promoter, primary } => write!(
                f,
                "witnesses disagree: promoter {promoter} still sees {primary} as primary"
            ),
            WaitReason::SyncReplicaUnreachable { unreachable } => write!(
                f,
                "synchronous mode: {} unreachable and may hold acknowledged commits",
                unreachable.join(", ")
            ),
            WaitReason::NoCandidate { excluded } => {
                write!(f, "no replica may be promoted:")?;
                for (n, why) in excluded {
                    write!(f, " {n} ({why})")?;
                }
                Ok(())
            }
            WaitReason::SplitBrain { primaries } => write!(
                f,
                "several writable servers on the newest timeline: {}; fix by hand",
                primaries.join(", ")
            ),
        }
    }
}

/// Housekeeping while a primary is known.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Slot on the primary, `primary_conninfo`/`primary_slot_name` on the replica, reload.
    Repoint { replica: Member, primary: Member },
    /// `synchronous_standby_names` on the primary (synchronous mode).
    SetSyncNames { primary: Member, value: String },
}

impl Action {
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Repoint { .. } => "repoint",
            Action::SetSyncNames { .. } => "set_sync_names",
        }
    }
}

/// What the failover driver needs: who may be compared and promoted, and the evidence.
#[derive(Debug, Clone, PartialEq)]
pub struct FailoverPlan {
    /// The primary that failed, when this process saw it.
    pub from: Option<String>,
    /// How long no primary has answered.
    pub down_for: Duration,
    /// Every reachable replica: their receivers are stopped and they are compared; the
    /// eligible ones are candidates, the rest are re-pointed afterwards.
    pub replicas: Vec<Member>,
    /// Every configured backend (for the last check that no primary exists, and the
    /// synchronous standby list).
    pub members: Vec<Member>,
    /// Evidence: replicas whose WAL receiver lost the primary, and pglb's view.
    pub lost: Vec<String>,
    pub pglb: String,
    pub synchronous: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// A primary is known and everyone follows it (or is left alone on purpose).
    Steady {
        primary: String,
        /// Replicas not streaming from it (detached by an operator, catching up, or in need
        /// of a rejoin).
        not_streaming: Vec<String>,
    },
    /// A primary is known; these bring the others in line.
    Reconcile {
        primary: String,
        actions: Vec<Action>,
    },
    /// The primary failed, the witnesses agree: compare, promote, re-point.
    Failover(FailoverPlan),
    Wait {
        reason: WaitReason,
    },
}

impl Decision {
    pub fn kind(&self) -> &'static str {
        match self {
            Decision::Steady { .. } => "steady",
            Decision::Reconcile { .. } => "reconcile",
            Decision::Failover(_) => "failover",
            Decision::Wait { .. } => "wait",
        }
    }

    /// While the primary's silence is what a failover waits for: when it reaches
    /// `failover_after` (its last answer plus `failover_after`), so the loop looks right then
    /// rather than up to a fast look later.
    pub fn primary_silence_complete_at(&self, state: &State) -> Option<Instant> {
        match self {
            Decision::Wait {
                reason: WaitReason::PrimaryGone { failover_after, .. },
            } => Some(state.primary_last_seen() + *failover_after),
            _ => None,
        }
    }

    /// Waiting while no primary answers, for the evidence of a failover to be complete (the
    /// primary's silence, the replicas', the witnesses'): the loop looks faster meanwhile.
    pub fn gathering_evidence(&self) -> bool {
        matches!(
            self,
            Decision::Wait {
                reason: WaitReason::PrimaryGone { .. }
                    | WaitReason::ReplicasStillStreaming { .. }
                    | WaitReason::PglbSeesPrimary { .. }
                    | WaitReason::PromoterSeesPrimary { .. }
            }
        )
    }
}

/// `synchronous_standby_names` for `primary`: `ANY 1 ("a", "b")` over every other configured
/// backend that may be promoted (a commit acknowledged only by a `no_failover` replica could not
/// be saved by a failover). Empty when there is none.
pub fn sync_names(members: &[Member], primary: &str) -> String {
    let names: Vec<String> = members
        .iter()
        .filter(|m| m.name != primary && !m.no_failover)
        .map(|m| format!("\"{}\"", m.name.replace('"', "")))
        .collect();
    if names.is_empty() {
        String::new()
    } else {
        format!("ANY 1 ({})", names.join(", "))
    }
}

/// How long a standby may hear nothing from its upstream before it counts as having lost it.
/// A healthy idle link carries a message at least every `wal_receiver_timeout / 2` (the
/// standby asks for one then), so silence beyond that, plus a second, is real.
pub fn silence_bound(st: &NodeStatus, failover_after: Duration) -> Duration {
    let half = if st.wal_receiver_timeout.is_zero() {
        Duration::from_secs(60)
    } else {
        st.wal_receiver_timeout / 2
    };
    failover_after.max(half + Duration::from_secs(1))
}

/// Whether this replica's WAL receiver has lost its upstream: not running, not streaming, or
/// silent for longer than [`silence_bound`].
pub fn receiver_lost(st: &NodeStatus, failover_after: Duration) -> bool {
    match &st.receiver {
        None => true,
        Some(r) if !r.is_streaming() => true,
        Some(r) => r
            .last_msg_age
            .is_some_and(|age| age > silence_bound(st, failover_after)),
    }
}

/// `host` and `port` of a libpq `primary_conninfo` (keyword/value form; port 5432 when absent).
pub fn conninfo_target(conninfo: &str) -> Option<(String, u16)> {
    let pairs = parse_conninfo(conninfo);
    let get = |k: &str| {
        pairs
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    let host = get("host").or_else(|| get("hostaddr"))?;
    let port = get("port").and_then(|p| p.parse().ok()).unwrap_or(5432);
    Some((host, port))
}

/// Splits libpq keyword/value pairs, honouring single quotes and backslash escapes.
///
/// Not `tokio_postgres::Config`: it refuses every keyword it does not implement, and real
/// `primary_conninfo` values are full of libpq-only ones (`pg_basebackup -R` writes `passfile`,
/// `sslcompression`, `gssencmode`, ...; the promoter itself writes `keepalives_count`), so
/// the target of every real conninfo would be unknown (see the `conninfo_parsing` test).
pub fn parse_conninfo(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            return out;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return out;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n);
                        }
                    }
                    '\'' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    if let Some(n) = chars.next() {
                        value.push(n);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
}

/// `host:port` of a config address (`[v6]:port` too).
pub fn split_address(address: &str) -> Option<(String, u16)> {
    let (h, p) = address.rsplit_once(':')?;
    let h = h.trim_start_matches('[').trim_end_matches(']');
    Some((h.to_string(), p.parse().ok()?))
}

/// Whether replica `r` streams from `primary` now: the primary lists it (by application name)
/// or its receiver streams from the primary's address.
pub fn streams_from(r: &NodeObservation, primary: &NodeObservation) -> bool {
    let by_name = primary
        .reachable()
        .is_some_and(|p| p.streaming_standbys.iter().any(|a| a == r.name()));
    let by_sender = r.reachable().is_some_and(|st| {
        st.receiver.as_ref().is_some_and(|rcv| {
            rcv.is_streaming()
                && rcv.sender.as_deref().and_then(split_address)
                    == split_address(&primary.member.address)
        })
    });
    by_name || by_sender
}

/// Whether replica `r` is configured to follow `primary` (conninfo target and slot).
pub fn follows(r: &NodeStatus, replica: &Member, primary: &Member) -> bool {
    conninfo_target(&r.primary_conninfo).is_some()
        && conninfo_target(&r.primary_conninfo) == split_address(&primary.address)
        && r.primary_slot_name == replica.slot_name()
}

/// The assessment of one look: what the servers and witnesses say should happen.
pub fn assess(obs: &Observation, state: &State) -> Decision {
    let topo = topology(obs, state);
    match topo.primary {
        Primary::Many(ps) => Decision::Wait {
            reason: WaitReason::SplitBrain {
                primaries: ps.iter().map(|p| p.name().to_string()).collect(),
            },
        },
        Primary::One(p) => maintain(obs, state, p, &topo.replicas),
        Primary::None => failure(obs, state, &topo.replicas),
    }
}

fn maintain(
    obs: &Observation,
    state: &State,
    p: &NodeObservation,
    replicas: &[&NodeObservation],
) -> Decision {
    let pst = p.reachable().expect("the primary was reachable");
    let mut actions = Vec::new();
    let mut not_streaming = Vec::new();
    for r in replicas {
        if streams_from(r, p) {
            continue;
        }
        let rst = r.reachable().expect("replicas are reachable");
        // A replica on an older timeline has not followed a promotion: point it at the
        // primary. So is one whose receiver a failover stopped (its conninfo saved aside and
        // emptied) and that nobody put back: the promoter that did it died. One on the
        // primary's timeline that streams from elsewhere (or nowhere) was set up so by
        // someone: leave it alone and show it.
        let held_by_failover =
            rst.primary_conninfo.is_empty() && !rst.saved_primary_conninfo.is_empty();
        if (rst.timeline < pst.timeline && !follows(rst, &r.member, &p.member)) || held_by_failover
        {
            actions.push(Action::Repoint {
                replica: r.member.clone(),
                primary: p.member.clone(),
            });
        } else {
            not_streaming.push(r.name().to_string());
        }
    }
    if state.policy.synchronous {
        let members: Vec<Member> = obs.nodes.iter().map(|n| n.member.clone()).collect();
        let want = sync_names(&members, p.name());
        if pst.synchronous_standby_names != want {
            actions.push(Action::SetSyncNames {
                primary: p.member.clone(),
                value: want,
            });
        }
    }
    if actions.is_empty() {
        Decision::Steady {
            primary: p.name().to_string(),
            not_streaming,
        }
    } else {
        Decision::Reconcile {
            primary: p.name().to_string(),
            actions,
        }
    }
}

fn failure(obs: &Observation, state: &State, replicas: &[&NodeObservation]) -> Decision {
    let policy = &state.policy;
    let down_for = obs.at.saturating_duration_since(state.primary_last_seen());
    let last = state.primary_seen.as_ref().map(|s| s.name.clone());
    if down_for < policy.failover_after {
        return Decision::Wait {
            reason: WaitReason::PrimaryGone {
                last,
                down_for,
                failover_after: policy.failover_after,
            },
        };
    }
    if replicas.is_empty() {
        return Decision::Wait {
            reason: WaitReason::NoReplicaReachable {
                unreachable: obs
                    .nodes
                    .iter()
                    .filter(|n| n.reachable().is_none())
                    .map(|n| n.name().to_string())
                    .collect(),
            },
        };
    }
    let (lost, streaming): (Vec<&NodeObservation>, Vec<&NodeObservation>) =
        replicas.iter().partition(|r| {
            r.reachable()
                .is_some_and(|st| receiver_lost(st, policy.failover_after))
        });
    let names = |v: &[&NodeObservation]| -> Vec<String> {
        v.iter().map(|n| n.name().to_string()).collect()
    };
    if lost.len() * 2 <= replicas.len() {
        return Decision::Wait {
            reason: WaitReason::ReplicasStillStreaming {
                streaming: names(&streaming),
                lost: names(&lost),
            },
        };
    }
    // A pglb is a witness for a server it has heard from within `failover_after`, the
    // promoter's own measure of gone: one whose checks are only still in flight on a hung
    // primary has not marked it down yet, but does not vouch for it.
    let fresh = policy.failover_after;
    if let Some(primary) = obs.pglb.sees_primary(fresh) {
        return Decision::Wait {
            reason: WaitReason::PglbSeesPrimary { primary },
        };
    }
    if let Some(last) = &last {
        if obs.pglb.sees_up(last, fresh) && obs.node(last).is_some_and(|n| n.reachable().is_none())
        {
            return Decision::Wait {
                reason: WaitReason::PglbSeesPrimary {
                    primary: last.clone(),
                },
            };
        }
    }
    if let Some((promoter, primary)) = state.peers.first() {
        return Decision::Wait {
            reason: WaitReason::PromoterSeesPrimary {
                promoter: promoter.clone(),
                primary: primary.clone(),
            },
        };
    }
    if policy.synchronous {
        // The failed primary is unreachable too: the one this process saw, or the one the
        // replicas name as their upstream (after a restart of the promoter), in their
        // primary_conninfo or, when a failover interrupted after stopping their receivers
        // emptied it, in the one it saved on them.
        let upstreams: Vec<(String, u16)> = replicas
            .iter()
            .filter_map(|r| r.reachable())
            .flat_map(|st| {
                let sender = st
                    .receiver
                    .as_ref()
                    .and_then(|r| r.sender.as_deref())
                    .and_then(split_address);
                [
                    conninfo_target(&st.primary_conninfo),
                    conninfo_target(&st.saved_primary_conninfo),
                    sender,
                ]
            })
            .flatten()
            .collect();
        let unreachable: Vec<String> = obs
            .nodes
            .iter()
            .filter(|n| !n.member.no_failover && n.reachable().is_none())
            .filter(|n| last.as_deref() != Some(n.name()))
            .filter(|n| split_address(&n.member.address).is_none_or(|a| !upstreams.contains(&a)))
            .map(|n| n.name().to_string())
            .collect();
        if !unreachable.is_empty() {
            return Decision::Wait {
                reason: WaitReason::SyncReplicaUnreachable { unreachable },
            };
        }
    }
    let newest = replicas
        .iter()
        .filter_map(|r| r.reachable())
        .map(|s| s.timeline)
        .max()
        .unwrap_or(0);
    let candidates = replicas
        .iter()
        .filter(|r| !r.member.no_failover && r.reachable().is_some_and(|s| s.timeline == newest));
    if candidates.count() == 0 {
        let excluded = obs
            .nodes
            .iter()
            .map(|n| {
                let why = match n.reachable() {
                    None => "unreachable",
                    Some(s) if !s.in_recovery => "writable on an older timeline",
                    Some(_) if n.member.no_failover => "no_failover",
                    Some(s) if s.timeline < newest => "older timeline",
                    Some(_) => "eligible",
                };
                (n.name().to_string(), why)
            })
            .collect();
        return Decision::Wait {
            reason: WaitReason::NoCandidate { excluded },
        };
    }
    Decision::Failover(FailoverPlan {
        from: last,
        down_for,
        replicas: replicas.iter().map(|r| r.member.clone()).collect(),
        members: obs.nodes.iter().map(|n| n.member.clone()).collect(),
        lost: names(&lost),
        pglb: obs.pglb.summary(),
        synchronous: policy.synchronous,
    })
}

/// One thing for the loop to do. The loop executes commands in order (fences are spawned and
/// run beside the rest), and reports what came of the server-changing ones as [`Event`]s.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Make a stale primary read-only and end its client sessions.
    Fence {
        node: Member,
        /// The current primary, for the log.
        primary: Option<String>,
        newest_timeline: u32,
    },
    /// Bring a replica or the primary's settings in line.
    Act(Action),
    /// Stop receivers, compare, promote, re-point.
    Failover(FailoverPlan),
    /// A failover is due, but the last attempt promoted nobody: wait until `at`.
    RetryLater { at: Instant, left: Duration },
    /// A re-pointed replica now streams from its primary.
    Verified {
        node: String,
        primary: String,
        after: Duration,
    },
    /// A re-pointed replica still does not stream after `verify_within`: say so, stop watching.
    NotVerified {
        node: String,
        primary: String,
        after: Duration,
    },
}

impl Command {
    /// Whether executing it changes a server. These are the steps a leader lease would gate,
    /// and that would be recorded before they are taken.
    pub fn changes_server(&self) -> bool {
        matches!(
            self,
            Command::Fence { .. } | Command::Act(_) | Command::Failover(_)
        )
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Command::Fence { .. } => "fence",
            Command::Act(a) => a.kind(),
            Command::Failover(_) => "failover",
            Command::RetryLater { .. } => "retry_later",
            Command::Verified { .. } => "verified",
            Command::NotVerified { .. } => "not_verified",
        }
    }
}

/// What came of a server-changing command, fed back into [`State::record`].
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A fence finished (either way: a failed one is issued again at the next look).
    FenceDone {
        node: String,
    },
    ActionDone {
        action: Action,
        ok: bool,
    },
    /// A failover ended: `to` is the promoted server, `None` when nobody was.
    FailoverDone {
        to: Option<String>,
        repointed: Vec<String>,
    },
}

impl State {
    /// Folds the outcome of a command in, at `now`.
    pub fn record(&mut self, event: Event, now: Instant) {
        match event {
            Event::FenceDone { node } => {
                self.fencing.remove(&node);
            }
            Event::ActionDone {
                action: Action::Repoint { replica, primary },
                ok: true,
            } => {
                self.awaiting.insert(
                    replica.name,
                    Awaiting {
                        primary: primary.name,
                        since: now,
                    },
                );
            }
            Event::ActionDone { .. } => {}
            Event::FailoverDone {
                to: Some(to),
                repointed,
            } => {
                self.retry_at = None;
                for r in repointed {
                    self.awaiting.insert(
                        r,
                        Awaiting {
                            primary: to.clone(),
                            since: now,
                        },
                    );
                }
            }
            Event::FailoverDone { to: None, .. } => {
                self.retry_at = Some(now + self.policy.retry_after);
            }
        }
    }
}

/// One look, decided: folds the observation into `state`, assesses it, and returns what to do
/// at `now`: fences for stale primaries not already being fenced (beside the decision, never
/// before it), verdicts on re-pointed replicas, then the assessment's own steps, a failover
/// held back while the pause after a failed attempt lasts. Pure: no I/O, no clock.
pub fn decide(obs: &Observation, state: &mut State, now: Instant) -> Vec<Command> {
    state.note(obs);
    let mut commands = Vec::new();
    let primary = match topology(obs, state).primary {
        Primary::One(p) => Some(p),
        _ => None,
    };
    let newest_timeline = state.timelines.values().max().copied().unwrap_or(0);
    // A promoter that may not act (not the leader) issues no fence; it would not report back.
    let fence = if state.may_act {
        to_fence(obs, state)
    } else {
        vec![]
    };
    for node in fence {
        if state.fencing.insert(node.name.clone()) {
            commands.push(Command::Fence {
                node,
                primary: primary.map(|p| p.name().to_string()),
                newest_timeline,
            });
        }
    }
    // Re-pointed replicas are verified once the primary lists them as streaming.
    if let Some(p) = primary {
        let within = state.policy.verify_within;
        state.awaiting.retain(|r, a| {
            if a.primary != p.name() {
                return false;
            }
            let after = now.saturating_duration_since(a.since);
            if obs.node(r).is_some_and(|rn| streams_from(rn, p)) {
                commands.push(Command::Verified {
                    node: r.clone(),
                    primary: a.primary.clone(),
                    after,
                });
                return false;
            }
            if after > within {
                commands.push(Command::NotVerified {
                    node: r.clone(),
                    primary: a.primary.clone(),
                    after,
                });
                return false;
            }
            true
        });
    }
    let decision = assess(obs, state);
    match &decision {
        Decision::Steady { .. } | Decision::Wait { .. } => {}
        // The gate: a promoter that may not act only assesses.
        Decision::Reconcile { .. } | Decision::Failover(_) if !state.may_act => {}
        Decision::Reconcile { actions, .. } => {
            commands.extend(actions.iter().cloned().map(Command::Act));
        }
        Decision::Failover(plan) => match state.retry_at {
            Some(at) if now < at => commands.push(Command::RetryLater { at, left: at - now }),
            _ => commands.push(Command::Failover(plan.clone())),
        },
    }
    state.decision = Some(decision);
    commands
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::backend::probe::ProbeError;
    use crate::pg::Lsn;
    use crate::promoter::observe::{PglbView, Receiver, Witnesses};

    pub fn member(name: &str, port: u16) -> Member {
        Member {
            name: name.into(),
            address: format!("127.0.0.1:{port}"),
            priority: 100,
            no_failover: false,
        }
    }

    fn base_status() -> NodeStatus {
        NodeStatus {
            in_recovery: false,
            timeline: 1,
            system_id: Some(7),
            current_lsn: None,
            receive_lsn: None,
            replay_lsn: None,
            receiver: None,
            primary_conninfo: String::new(),
            primary_slot_name: String::new(),
            saved_primary_conninfo: String::new(),
            read_only: false,
            synchronous_standby_names: String::new(),
            streaming_standbys: vec![],
            slots: vec![],
            wal_receiver_timeout: Duration::from_secs(5),
            wal_sender_timeout: Duration::from_secs(5),
        }
    }

    pub fn primary_status(tl: u32, lsn: u64, standbys: &[&str]) -> NodeStatus {
        NodeStatus {
            timeline: tl,
            current_lsn: Some(Lsn(lsn)),
            streaming_standbys: standbys.iter().map(|s| s.to_string()).collect(),
            ..base_status()
        }
    }

    /// A standby of the server on `upstream_port`; `streaming` false means its receiver lost it.
    pub fn replica_status(tl: u32, lsn: u64, upstream_port: u16, streaming: bool) -> NodeStatus {
        NodeStatus {
            in_recovery: true,
            timeline: tl,
            receive_lsn: Some(Lsn(lsn)),
            replay_lsn: Some(Lsn(lsn)),
            receiver: streaming.then(|| Receiver {
                status: "streaming".into(),
                last_msg_age: Some(Duration::from_millis(200)),
                sender: Some(format!("127.0.0.1:{upstream_port}")),
            }),
            primary_conninfo: format!("host=127.0.0.1 port={upstream_port} user=replicator"),
            ..base_status()
        }
    }

    pub fn node(m: Member, st: NodeStatus) -> NodeObservation {
        NodeObservation {
            member: m,
            status: Ok(st),
            answered_at: None,
        }
    }

    pub fn down(m: Member) -> NodeObservation {
        NodeObservation {
            member: m,
            status: Err(ProbeError::Refused),
            answered_at: None,
        }
    }

    fn policy() -> Policy {
        Policy::new(Duration::from_secs(3), false)
    }

    struct World {
        t0: Instant,
        state: State,
    }

    impl World {
        fn new() -> World {
            let t0 = Instant::now();
            World {
                t0,
                state: State::new(policy(), t0),
            }
        }
        fn look(&mut self, secs: f64, nodes: Vec<NodeObservation>, pglb: PglbView) -> Decision {
            let obs = Observation {
                at: self.t0 + Duration::from_secs_f64(secs),
                nodes,
                pglb: Witnesses::one(pglb),
            };
            self.state.note(&obs);
            assess(&obs, &self.state)
        }
    }

    fn no_pglb() -> PglbView {
        PglbView::NotConfigured
    }

    fn pglb(primary: Option<&str>, up: &[&str]) -> PglbView {
        PglbView::Reachable {
            primary: primary.map(str::to_string),
            up: up.iter().map(|s| s.to_string()).collect(),
            heard_ago: Default::default(),
        }
    }

    pub fn healthy() -> Vec<NodeObservation> {
        vec![
            node(
                member("pg-0", 5000),
                primary_status(1, 100, &["pg-1", "pg-2"]),
            ),
            node(member("pg-1", 5001), replica_status(1, 100, 5000, true)),
            node(member("pg-2", 5002), replica_status(1, 100, 5000, true)),
        ]
    }

    /// pg-0 gone; the replicas' receivers lost it.
    pub fn primary_dead() -> Vec<NodeObservation> {
        vec![
            down(member("pg-0", 5000)),
            node(member("pg-1", 5001), replica_status(1, 100, 5000, false)),
            node(member("pg-2", 5002), replica_status(1, 90, 5000, false)),
        ]
    }

    fn wait_kind(d: &Decision) -> &'static str {
        match d {
            Decision::Wait { reason } => reason.kind(),
            other => panic!("expected a wait, got {other:?}"),
        }
    }

    #[test]
    fn healthy_cluster_is_steady() {
        let mut w = World::new();
        let d = w.look(
            0.0,
            healthy(),
            pglb(Some("pg-0"), &["pg-0", "pg-1", "pg-2"]),
        );
        assert_eq!(
            d,
            Decision::Steady {
                primary: "pg-0".into(),
                not_streaming: vec![]
            }
        );
        assert_eq!(w.state.primary_seen.as_ref().unwrap().name, "pg-0");
    }

    #[test]
    fn primary_gone_waits_until_failover_after() {
        let mut w = World::new();
        w.look(0.0, healthy(), no_pglb());
        let d = w.look(2.9, primary_dead(), no_pglb());
        match d {
            Decision::Wait {
                reason: WaitReason::PrimaryGone { last, down_for, .. },
            } => {
                assert_eq!(last.as_deref(), Some("pg-0"));
                assert_eq!(down_for, Duration::from_secs_f64(2.9));
            }
            other => panic!("{other:?}"),
        }
        // Counted from the last answer, not the first miss.
        let d = w.look(3.0, primary_dead(), no_pglb());
        assert_eq!(d.kind(), "failover");
    }

    #[test]
    fn primary_back_within_failover_after_resets_the_clock() {
        let mut w = World::new();
        w.look(0.0, healthy(), no_pglb());
        assert_eq!(
            wait_kind(&w.look(2.0, primary_dead(), no_pglb())),
            "primary_gone"
        );
        assert_eq!(w.look(2.5, healthy(), no_pglb()).kind(), "steady");
        assert_eq!(
            wait_kind(&w.look(5.0, primary_dead(), no_pglb())),
            "primary_gone"
        );
    }

    #[test]
    fn failover_plan_carries_evidence_and_all_reachable_replicas() {
        let mut w = World::new();
        w.look(0.0, healthy(), no_pglb());
        let d = w.look(4.0, primary_dead(), pglb(None, &["pg-1", "pg-2"]));
        let Decision::Failover(plan) = d else {
            panic!("{d:?}")
        };
        assert_eq!(plan.from.as_deref(), Some("pg-0"));
        assert_eq!(plan.lost, vec!["pg-1", "pg-2"]);
        assert_eq!(
            plan.replicas
                .iter()
                .map(|m| &m.name[..])
                .collect::<Vec<_>>(),
            ["pg-1", "pg-2"]
        );
        assert_eq!(plan.members.len(), 3);
        assert_eq!(plan.pglb, "no primary");
    }

    #[test]
    fn replicas_still_streaming_means_the_promoter_is_cut_off() {
        let mut w = World::new();
        w.look(0.0, healthy(), no_pglb());
        let mut nodes = healthy();
        nodes[0] = down(member("pg-0", 5000));
        let d = w.look(10.0, nodes, no_pglb());
        assert_eq!(
            d,
            Decision::Wait {
                reason: WaitReason::ReplicasStillStreaming {
                    streaming: vec!["pg-1".into(), "pg-2".into()],
                    lost: vec![]
                }
            }
        );
    }

    #[test]
    fn half_the_replicas_is_not_a_majority() {
        let mut w = World::new();
        w.look(0.0, healthy(), no_pglb());
        let mut nodes = primary_dead();
        nodes[1] = node(member("pg-1", 5001), replica_status(1, 100, 5000, true));
        assert_eq!(
            wait_kind(&w.look(10.0, nodes, no_pglb())),
            "replicas_still_streaming"
        );
    }

    #[test]
    fn a_silent_receiver_counts_as_lost_after_the_bound() {
        let mut st = replica_status(1, 100, 5000, true);
        let fa = Duration::from_secs(3);
        // wal_receiver_timeout 5s: a healthy link speaks at least every 2.5s; bound 3.5s.
        assert_eq!(silence_bound(&st, fa), Duration::from_millis(3500));
        st.receiver.as_mut().unwrap().last_msg_age = Some(Duration::from_secs(3));
        assert!(!receiver_lost(&st, fa));
        st.receiver.as_mut().unwrap().last_msg_age = Some(Duration::from_secs(4));
        assert!(receiver_lost(&st, fa));
        st.receiver.as_mut().unwrap().status = "waiting".into();
        st.receiver.as_mut().unwrap().last_msg_age = None;
        assert!(receiver_lost(&st, fa));
        st.wal_receiver_timeout = Duration::ZERO;
        assert_eq!(silence_bound(&st, fa), Duration::from_secs(61));
    }

    #[test]
    fn pglb_seeing_the_primary_blocks() {
        let mut w = World::new();
        w.look(0.0, healthy(), no_pglb());
        let d = w.look(10.0, primary_dead(), pglb(Some("pg-0"), &["pg-0"]));
        assert_eq!(
            d,
            Decision::Wait {
                reason: WaitReason::PglbSeesPrimary {
                    primary: "pg-0".into()
                }
            }
        );
        // pglb up on it without calling it primary (e.g. fenced as a twin) also blocks.
        let d = w.look(10.5, primary_dead(), pglb(None, &["pg-0", "pg-1"]));
        assert_eq!(wait_kind(&d), "pglb_sees_primary");
        // An unreachable pglb abstains.
        let d = w.look(
            11.0,
            primary_dead(),
            PglbView::Unreachable {
                error: "refused".into(),
            },
        );
        assert_eq!(d.kind(), "failover");
    }

    #[test]
    fn a_pglb_that_has_not_heard_from_the_primary_lately_vouches_for_nothing() {
        // pglb still routes to pg-0 (its checks are in flight on a hung server, `fall` not
        // reached), but its last answer is older than failover_after: no veto.
        let heard = |age: f64| PglbView::Reachable {
            primary: Some("pg-0".into()),
            up: vec!["pg-0".into(), "pg-1".into()],
            heard_ago: [("pg-0".to_string(), age)].into(),
        };
        let mut w = World::new();
        w.look(0.0, healthy(), no_pglb());
        let d = w.look(10.0, primary_dead(), heard(0.8));
        assert_eq!(wait_kind(&d), "pglb_sees_primary");
        let d = w.look(10.5, primary_dead(), heard(3.2));
        assert_eq!(d.kind(), "failover");
    }

    #[test]
    fn promoter_alone_sees_nothing() {
        let mut w = World::new();
        let nodes = vec![
            down(member("pg-0", 5000)),
            down(member("pg-1", 5001)),
            down(member("pg-2", 5002)),
        ];
        let d = w.look(10.0, nodes, no_pglb());
        assert_eq!(wait_kind(&d), "no_replica_reachable");
    }

    #[test]
    fn no_failover_replicas_are_never_candidates() {
        let mut w = World::new();
        w.look(0.0, healthy(), no_pglb());
        let mut nodes = primary_dead();
        for n in &mut nodes[1..] {
            n.member.no_failover = true;
        }
        let d = w.look(10.0, nodes, no_pglb());
        match d {
            Decision::Wait {
                reason: WaitReason::NoCandidate { excluded },
            } => assert_eq!(
                excluded,
                vec![
                    ("pg-0".to_string(), "unreachable"),
                    ("pg-1".to_string(), "no_failover"),
                    ("pg-2".to_string(), "no_failover")
                ]
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn replicas_on_an_older_timeline_are_not_candidates() {
        let mut w = World::new();
        let nodes = vec![
            down(member("pg-1", 5001)),
            NodeObservation {
                member: Member {
                    no_failover: true,
                    ..member("pg-0", 5000)
                },
                status: Ok(replica_status(2, 100, 5001, false)),
                answered_at: None,
            },
            node(member("pg-3", 5003), replica_status(1, 300, 5001, false)),
        ];
        let d = w.look(10.0, nodes, no_pglb());
        assert_eq!(
            d,
            Decision::Wait {
                reason: WaitReason::NoCandidate {
                    excluded: vec![
                        ("pg-1".to_string(), "unreachable"),
                        ("pg-0".to_string(), "no_failover"),
                        ("pg-3".to_string(), "older timeline"),
                    ]
                }
            }
        );
    }

    #[test]
    fn restarted_promoter_after_a_promotion_promotes_nobody() {
        // Fresh state (a restart); pg-1 already promoted (timeline 2), pg-0 dead, pg-2 still
        // detached from the failover on timeline 1.
        let mut w = World::new();
        let nodes = vec![
            down(member("pg-0", 5000)),
            node(member("pg-1", 5001), primary_status(2, 200, &[])),
            node(member("pg-2", 5002), {
                let mut s = replica_status(1, 100, 5000, false);
                s.primary_conninfo = String::new();
                s
            }),
        ];
        let d = w.look(60.0, nodes, no_pglb());
        assert_eq!(
            d,
            Decision::Reconcile {
                primary: "pg-1".into(),
                actions: vec![Action::Repoint {
                    replica: member("pg-2", 5002),
                    primary: member("pg-1", 5001)
                }]
            }
        );
    }

    #[test]
    fn promoter_restarted_mid_failover_continues_it_after_failover_after() {
        // Receivers already stopped, nobody promoted yet: the failure is still unresolved.
        let mut w = World::new();
        let mut nodes = primary_dead();
        for n in &mut nodes[1..] {
            if let Ok(s) = &mut n.status {
                s.primary_conninfo.clear();
            }
        }
        assert_eq!(
            wait_kind(&w.look(1.0, nodes.clone(), no_pglb())),
            "primary_gone"
        );
        assert_eq!(w.look(3.0, nodes, no_pglb()).kind(), "failover");
    }

    #[test]
    fn old_primary_back_on_an_older_timeline_is_stale_and_fenced() {
        let mut w = World::new();
        let nodes = vec![
            node(member("pg-0", 5000), primary_status(1, 300, &[])),
            node(member("pg-1", 5001), primary_status(2, 200, &["pg-2"])),
            node(member("pg-2", 5002), replica_status(2, 200, 5001, true)),
        ];
        let obs = Observation {
            at: w.t0,
            nodes,
            pglb: Witnesses::one(no_pglb()),
        };
        w.state.note(&obs);
        assert_eq!(
            assess(&obs, &w.state),
            Decision::Steady {
                primary: "pg-1".into(),
                not_streaming: vec![]
            }
        );
        assert_eq!(to_fence(&obs, &w.state), vec![member("pg-0", 5000)]);
        assert!(fenced(&obs, &w.state).is_empty());
        let mut fenced_obs = obs.clone();
        if let Ok(s) = &mut fenced_obs.nodes[0].status {
            s.read_only = true;
        }
        assert!(to_fence(&fenced_obs, &w.state).is_empty());
        assert_eq!(fenced(&fenced_obs, &w.state), vec!["pg-0"]);
    }

    #[test]
    fn old_primary_alone_after_the_new_one_died_is_still_stale() {
        // The promoter saw timeline 2; the new primary died; the old one came back on 1.
        let mut w = World::new();
        w.look(
            0.0,
            vec![
                down(member("pg-0", 5000)),
                node(member("pg-1", 5001), primary_status(2, 200, &["pg-2"])),
                node(member("pg-2", 5002), replica_status(2, 200, 5001, true)),
            ],
            no_pglb(),
        );
        let nodes = vec![
            node(member("pg-0", 5000), primary_status(1, 300, &[])),
            down(member("pg-1", 5001)),
            node(member("pg-2", 5002), replica_status(2, 200, 5001, false)),
        ];
        let d = w.look(5.0, nodes.clone(), no_pglb());
        let Decision::Failover(plan) = d else {
            panic!("{d:?}")
        };
        assert_eq!(plan.from.as_deref(), Some("pg-1"));
        // Even a fresh promoter knows it from pg-2's timeline (history file).
        let fresh = State::new(policy(), w.t0);
        let obs = Observation {
            at: w.t0,
            nodes,
            pglb: Witnesses::one(no_pglb()),
        };
        assert_eq!(to_fence(&obs, &fresh), vec![member("pg-0", 5000)]);
    }

    #[test]
    fn two_writable_servers_on_the_newest_timeline_is_split_brain() {
        let mut w = World::new();
        let nodes = vec![
            node(member("pg-0", 5000), primary_status(2, 300, &[])),
            node(member("pg-1", 5001), primary_status(2, 200, &[])),
        ];
        assert_eq!(wait_kind(&w.look(0.0, nodes, no_pglb())), "split_brain");
    }

    #[test]
    fn replicas_left_on_the_old_timeline_are_repointed_once() {
        let mut w = World::new();
        let mut pg2 = replica_status(1, 100, 5000, false);
        let nodes = |pg2: NodeStatus| {
            vec![
                down(member("pg-0", 5000)),
                node(member("pg-1", 5001), primary_status(2, 200, &[])),
                node(member("pg-2", 5002), pg2),
            ]
        };
        assert_eq!(
            w.look(0.0, nodes(pg2.clone()), no_pglb()).kind(),
            "reconcile"
        );
        // Once its conninfo and slot point at pg-1 it is left to connect.
        pg2.primary_conninfo = "host='127.0.0.1' port='5001' user='replicator'".into();
        pg2.primary_slot_name = "pg_2".into();
        assert_eq!(
            w.look(1.0, nodes(pg2), no_pglb()),
            Decision::Steady {
                primary: "pg-1".into(),
                not_streaming: vec!["pg-2".into()]
            }
        );
    }

    #[test]
    fn a_detached_replica_on_the_current_timeline_is_left_alone() {
        let mut w = World::new();
        let mut nodes = healthy();
        nodes[0] = node(member("pg-0", 5000), primary_status(1, 100, &["pg-2"]));
        if let Ok(s) = &mut nodes[1].status {
            s.receiver = None;
            s.primary_conninfo.clear();
        }
        assert_eq!(
            w.look(0.0, nodes, no_pglb()),
            Decision::Steady {
                primary: "pg-0".into(),
                not_streaming: vec!["pg-1".into()]
            }
        );
    }

    #[test]
    fn synchronous_mode_keeps_the_standby_list_on_the_primary() {
        let mut w = World::new();
        w.state.policy.synchronous = true;
        let mut nodes = healthy();
        nodes[2].member.no_failover = true;
        let d = w.look(0.0, nodes.clone(), no_pglb());
        assert_eq!(
            d,
            Decision::Reconcile {
                primary: "pg-0".into(),
                actions: vec![Action::SetSyncNames {
                    primary: nodes[0].member.clone(),
                    value: "ANY 1 (\"pg-1\")".into()
                }]
            }
        );
        if let Ok(s) = &mut nodes[0].status {
            s.synchronous_standby_names = "ANY 1 (\"pg-1\")".into();
        }
        assert_eq!(w.look(1.0, nodes, no_pglb()).kind(), "steady");
    }

    #[test]
    fn synchronous_mode_waits_for_every_replica_that_may_hold_commits() {
        let mut w = World::new();
        w.state.policy.synchronous = true;
        w.look(0.0, healthy(), no_pglb());
        let mut nodes = primary_dead();
        nodes.push(down(member("pg-3", 5003)));
        let d = w.look(10.0, nodes.clone(), no_pglb());
        assert_eq!(
            d,
            Decision::Wait {
                reason: WaitReason::SyncReplicaUnreachable {
                    unreachable: vec!["pg-3".into()]
                }
            }
        );
        // A no_failover replica never acknowledges for the list, so it may be away.
        nodes[3].member.no_failover = true;
        assert_eq!(w.look(10.5, nodes, no_pglb()).kind(), "failover");
    }

    #[test]
    fn synchronous_mode_after_a_restart_knows_the_failed_primary_from_the_replicas() {
        // Fresh state: pg-0 never seen, but both replicas name it as their upstream.
        let mut w = World::new();
        w.state.policy.synchronous = true;
        let d = w.look(10.0, primary_dead(), no_pglb());
        assert_eq!(d.kind(), "failover");
        // Receivers emptied by an interrupted failover, which saved their upstream on them:
        // that still names it.
        let mut nodes = primary_dead();
        for n in &mut nodes[1..] {
            if let Ok(s) = &mut n.status {
                s.saved_primary_conninfo = std::mem::take(&mut s.primary_conninfo);
            }
        }
        let mut w = World::new();
        w.state.policy.synchronous = true;
        assert_eq!(w.look(10.0, nodes.clone(), no_pglb()).kind(), "failover");
        // Nothing names it any more: it may be a replica holding acknowledged commits.
        for n in &mut nodes[1..] {
            if let Ok(s) = &mut n.status {
                s.saved_primary_conninfo.clear();
            }
        }
        let mut w = World::new();
        w.state.policy.synchronous = true;
        assert_eq!(
            wait_kind(&w.look(10.0, nodes, no_pglb())),
            "sync_replica_unreachable"
        );
    }

    #[test]
    fn sync_names_skip_primary_and_no_failover() {
        let mut ms = vec![member("pg-0", 1), member("pg-1", 2), member("pg-2", 3)];
        assert_eq!(sync_names(&ms, "pg-0"), "ANY 1 (\"pg-1\", \"pg-2\")");
        ms[1].no_failover = true;
        ms[2].no_failover = true;
        assert_eq!(sync_names(&ms, "pg-0"), "");
    }

    #[test]
    fn conninfo_parsing() {
        assert_eq!(
            conninfo_target("host=127.0.0.1 port=5433 user=replicator password=x"),
            Some(("127.0.0.1".into(), 5433))
        );
        assert_eq!(
            conninfo_target("user='rep l' host = 'db\\'1' password='a b'"),
            Some(("db'1".into(), 5432))
        );
        assert_eq!(conninfo_target(""), None);
        // What pg_basebackup -R writes: libpq keywords tokio-postgres does not take.
        let basebackup = "user=replicator passfile='/var/lib/postgresql/.pgpass' \
            channel_binding=prefer host=pg-0 port=5432 sslmode=prefer sslcompression=0 \
            sslcertmode=allow sslsni=1 ssl_min_protocol_version=TLSv1.2 gssencmode=prefer \
            krbsrvname=postgres gssdelegation=0 target_session_attrs=any \
            load_balance_hosts=disable";
        assert_eq!(conninfo_target(basebackup), Some(("pg-0".into(), 5432)));
        assert!(basebackup.parse::<tokio_postgres::Config>().is_err());
        assert_eq!(split_address("[::1]:5432"), Some(("::1".into(), 5432)));
    }

    #[test]
    fn streaming_is_seen_by_name_or_by_sender() {
        let p = node(member("pg-0", 5000), primary_status(1, 1, &[]));
        let r = node(member("pg-1", 5001), replica_status(1, 1, 5000, true));
        assert!(streams_from(&r, &p));
        let elsewhere = node(member("pg-1", 5001), replica_status(1, 1, 6000, true));
        assert!(!streams_from(&elsewhere, &p));
        let p_lists = node(member("pg-0", 5000), primary_status(1, 1, &["pg-1"]));
        assert!(streams_from(&elsewhere, &p_lists));
    }

    // ---- the loop's policy: commands over (paused) time ----

    fn obs_at(nodes: Vec<NodeObservation>) -> Observation {
        Observation {
            at: Instant::now(),
            nodes,
            pglb: Witnesses::default(),
        }
    }

    fn kinds(cs: &[Command]) -> Vec<&'static str> {
        cs.iter().map(Command::kind).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_failover_is_retried_only_after_retry_after() {
        let mut state = State::new(policy(), Instant::now());
        assert!(decide(&obs_at(healthy()), &mut state, Instant::now()).is_empty());
        tokio::time::advance(Duration::from_secs(3)).await;
        let cs = decide(&obs_at(primary_dead()), &mut state, Instant::now());
        assert_eq!(kinds(&cs), ["failover"]);
        // The attempt took 1 s and promoted nobody.
        tokio::time::advance(Duration::from_secs(1)).await;
        let failed_at = Instant::now();
        state.record(
            Event::FailoverDone {
                to: None,
                repointed: vec![],
            },
            failed_at,
        );
        assert_eq!(state.retry_at, Some(failed_at + Duration::from_secs(3)));
        tokio::time::advance(Duration::from_millis(2900)).await;
        let cs = decide(&obs_at(primary_dead()), &mut state, Instant::now());
        assert_eq!(
            cs,
            [Command::RetryLater {
                at: failed_at + Duration::from_secs(3),
                left: Duration::from_millis(100)
            }]
        );
        assert!(!cs[0].changes_server());
        tokio::time::advance(Duration::from_millis(100)).await;
        let cs = decide(&obs_at(primary_dead()), &mut state, Instant::now());
        assert_eq!(kinds(&cs), ["failover"]);
        assert!(cs[0].changes_server());
        // A success clears the pause and watches the re-pointed replicas.
        state.record(
            Event::FailoverDone {
                to: Some("pg-1".into()),
                repointed: vec!["pg-2".into()],
            },
            Instant::now(),
        );
        assert_eq!(state.retry_at, None);
        assert_eq!(state.awaiting["pg-2"].primary, "pg-1");
    }

    #[tokio::test(start_paused = true)]
    async fn a_promoter_that_may_not_act_assesses_but_changes_nothing() {
        let mut state = State::new(policy(), Instant::now());
        state.may_act = false;
        assert!(decide(&obs_at(healthy()), &mut state, Instant::now()).is_empty());
        tokio::time::advance(Duration::from_secs(3)).await;
        // A failover is due: assessed, not issued.
        let cs = decide(&obs_at(primary_dead()), &mut state, Instant::now());
        assert!(cs.is_empty(), "{cs:?}");
        assert_eq!(
            state.decision.as_ref().map(Decision::kind),
            Some("failover")
        );
        // A stale primary: no fence, and none remembered as in flight.
        let cs = decide(&obs_at(stale_pg0()), &mut state, Instant::now());
        assert!(cs.is_empty(), "{cs:?}");
        assert!(state.fencing.is_empty());
        // Leading now: the same look gives the commands at once (the failover clock ran on).
        state.may_act = true;
        let cs = decide(&obs_at(stale_pg0()), &mut state, Instant::now());
        assert_eq!(kinds(&cs), ["fence"]);
        let mut state = State::new(policy(), Instant::now() - Duration::from_secs(3));
        let cs = decide(&obs_at(primary_dead()), &mut state, Instant::now());
        assert_eq!(kinds(&cs), ["failover"]);
    }

    #[tokio::test(start_paused = true)]
    async fn with_a_record_a_server_promoted_by_hand_is_fenced_not_followed() {
        // pg-1 promoted outside the promoter (timeline 2) while the store names pg-0.
        let by_hand = || {
            vec![
                node(member("pg-0", 5000), primary_status(1, 300, &["pg-2"])),
                node(member("pg-1", 5001), primary_status(2, 200, &[])),
                node(member("pg-2", 5002), replica_status(1, 300, 5000, true)),
            ]
        };
        let mut state = State::new(policy(), Instant::now());
        state.recorded = Some("pg-0".into());
        let cs = decide(&obs_at(by_hand()), &mut state, Instant::now());
        assert_eq!(
            cs,
            [Command::Fence {
                node: member("pg-1", 5001),
                primary: Some("pg-0".into()),
                newest_timeline: 2
            }]
        );
        assert_eq!(
            state.decision,
            Some(Decision::Steady {
                primary: "pg-0".into(),
                not_streaming: vec![]
            })
        );
        // Without a record (no store) the newest timeline wins, as before.
        let mut state = State::new(policy(), Instant::now());
        let cs = decide(&obs_at(by_hand()), &mut state, Instant::now());
        assert_eq!(kinds(&cs), ["fence", "repoint"]);
        // A recorded server that is not writable does not make a primary.
        let mut state = State::new(policy(), Instant::now());
        state.recorded = Some("pg-2".into());
        decide(&obs_at(by_hand()), &mut state, Instant::now());
        assert_eq!(
            state.decision.as_ref().map(Decision::kind),
            Some("reconcile")
        );
    }

    #[test]
    fn another_promoter_seeing_the_primary_blocks() {
        let mut w = World::new();
        w.look(0.0, healthy(), no_pglb());
        w.state.peers = vec![("b".into(), "pg-0".into())];
        let d = w.look(3.5, primary_dead(), no_pglb());
        assert_eq!(wait_kind(&d), "promoter_sees_primary");
        // Its view no longer names a primary (or went stale): the failover goes ahead.
        w.state.peers.clear();
        let d = w.look(3.7, primary_dead(), no_pglb());
        assert_eq!(d.kind(), "failover");
    }

    #[test]
    fn a_replica_left_held_by_an_interrupted_failover_is_repointed() {
        // pg-0 came back (or never died); pg-1's receiver was stopped by a failover whose
        // promoter died: conninfo emptied, the old one saved aside.
        let mut held = replica_status(1, 100, 5000, false);
        held.primary_conninfo = String::new();
        held.saved_primary_conninfo = "host=127.0.0.1 port=5000 user=replicator".into();
        let mut w = World::new();
        let d = w.look(
            0.0,
            vec![
                node(member("pg-0", 5000), primary_status(1, 100, &["pg-2"])),
                node(member("pg-1", 5001), held),
                node(member("pg-2", 5002), replica_status(1, 100, 5000, true)),
            ],
            no_pglb(),
        );
        assert_eq!(
            d,
            Decision::Reconcile {
                primary: "pg-0".into(),
                actions: vec![Action::Repoint {
                    replica: member("pg-1", 5001),
                    primary: member("pg-0", 5000),
                }],
            }
        );
    }

    /// pg-1 promoted (timeline 2), pg-0 back writable on timeline 1, pg-2 on timeline 2.
    fn stale_pg0() -> Vec<NodeObservation> {
        vec![
            node(member("pg-0", 5000), primary_status(1, 300, &[])),
            node(member("pg-1", 5001), primary_status(2, 200, &["pg-2"])),
            node(member("pg-2", 5002), replica_status(2, 200, 5001, true)),
        ]
    }

    #[tokio::test(start_paused = true)]
    async fn a_fence_is_issued_once_until_it_reports_back() {
        let mut state = State::new(policy(), Instant::now());
        let cs = decide(&obs_at(stale_pg0()), &mut state, Instant::now());
        assert_eq!(
            cs,
            [Command::Fence {
                node: member("pg-0", 5000),
                primary: Some("pg-1".into()),
                newest_timeline: 2
            }]
        );
        assert!(cs[0].changes_server());
        // Still writable while the fence runs: not issued again.
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(decide(&obs_at(stale_pg0()), &mut state, Instant::now()).is_empty());
        assert_eq!(state.decision.as_ref().map(Decision::kind), Some("steady"));
        // It failed and reported back: issued again at the next look.
        state.record(
            Event::FenceDone {
                node: "pg-0".into(),
            },
            Instant::now(),
        );
        let cs = decide(&obs_at(stale_pg0()), &mut state, Instant::now());
        assert_eq!(kinds(&cs), ["fence"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_repointed_replica_is_verified_or_reported_after_verify_within() {
        // pg-2 left on timeline 1 after pg-1's promotion: re-pointed.
        let lagging = |streaming: bool| {
            let mut pg2 = replica_status(1, 100, 5000, false);
            if streaming {
                pg2 = replica_status(2, 200, 5001, true);
            } else {
                pg2.primary_conninfo = "host=127.0.0.1 port=5001".into();
                pg2.primary_slot_name = "pg_2".into();
            }
            vec![
                down(member("pg-0", 5000)),
                node(member("pg-1", 5001), primary_status(2, 200, &[])),
                node(member("pg-2", 5002), pg2),
            ]
        };
        let mut state = State::new(policy(), Instant::now());
        let mut first = lagging(false);
        if let Ok(s) = &mut first[2].status {
            s.primary_conninfo = "host=127.0.0.1 port=5000".into();
        }
        let cs = decide(&obs_at(first), &mut state, Instant::now());
        let [Command::Act(action)] = &cs[..] else {
            panic!("{cs:?}")
        };
        assert_eq!(action.kind(), "repoint");
        state.record(
            Event::ActionDone {
                action: action.clone(),
                ok: true,
            },
            Instant::now(),
        );
        // Not streaming yet: watched quietly.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(decide(&obs_at(lagging(false)), &mut state, Instant::now()).is_empty());
        // Streaming: verified with the time it took.
        tokio::time::advance(Duration::from_secs(2)).await;
        let cs = decide(&obs_at(lagging(true)), &mut state, Instant::now());
        assert_eq!(
            cs,
            [Command::Verified {
                node: "pg-2".into(),
                primary: "pg-1".into(),
                after: Duration::from_secs(12)
            }]
        );
        assert!(state.awaiting.is_empty());

        // Never streaming: reported once after 30 s, then no longer watched.
        state.record(
            Event::ActionDone {
                action: action.clone(),
                ok: true,
            },
            Instant::now(),
        );
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(decide(&obs_at(lagging(false)), &mut state, Instant::now()).is_empty());
        tokio::time::advance(Duration::from_millis(1)).await;
        let cs = decide(&obs_at(lagging(false)), &mut state, Instant::now());
        assert_eq!(kinds(&cs), ["not_verified"]);
        assert!(decide(&obs_at(lagging(false)), &mut state, Instant::now()).is_empty());
        // A failed re-point is not watched.
        state.record(
            Event::ActionDone {
                action: action.clone(),
                ok: false,
            },
            Instant::now(),
        );
        assert!(state.awaiting.is_empty());
    }
}
