//! The routing decision, pure: `route` turns every backend's inputs (check results, admin state,
//! draining) and the decision memory (fencing timelines, primary WAL history, lag hysteresis) into
//! the next `View` and the transitions worth logging. No I/O, no clock but the `now` passed in:
//! the control task (`control`) owns the state and calls it after every event.
//!
//! Its parts: `decide_roles` fences stale primaries by timeline; `follow_record` applies the
//! primary recorded in the store (with `[store]`) on top of that; `LsnHistory` measures replica
//! time lag on pglb's own clock; `read_eligible` keeps replicas from flapping at the lag limits.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime};

use crate::backend::health::HealthState;
use crate::backend::probe::{ProbeError, ProbeReport};
use crate::backend::Role;
use crate::config::{BackendConfig, Config};
use crate::pg::Lsn;
use crate::store::{PrimaryRecord, PrimaryState};
use crate::view::{
    unix, AdminState, BackendView, Condition, FenceReason, Listen, RecordView, Status, StoreRule,
    StoreView, View, WriteBlock,
};
/// One backend's inputs to the role decision.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeView {
    pub up: bool,
    pub in_recovery: bool,
    pub timeline: Option<u32>,
    pub system_id: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RoleDecision {
    pub roles: Vec<Role>,
    /// Why each fenced server is fenced (`None` for every other role).
    pub fence: Vec<Option<FenceReason>>,
    pub primary: Option<usize>,
    /// Set when more than one server claims to be primary on the newest timeline.
    pub conflict: Option<String>,
}

/// Highest primary timeline seen per cluster (system identifier). Keyed by system identifier so
/// that a freshly initialised cluster starting again at timeline 1 is not fenced.
pub type FenceMemory = HashMap<u64, u32>;

/// Decides roles. An up server not in recovery is a primary candidate; a candidate whose
/// timeline is below the highest ever seen for its cluster is fenced; two candidates left on the
/// same newest timeline means no primary at all (fail closed) and both fenced.
pub fn decide_roles(nodes: &[NodeView], memory: &mut FenceMemory) -> RoleDecision {
    let mut roles = vec![Role::Unknown; nodes.len()];
    let mut fence = vec![None; nodes.len()];
    for n in nodes.iter().filter(|n| n.up && !n.in_recovery) {
        let tl = n.timeline.unwrap_or(0);
        let e = memory.entry(n.system_id.unwrap_or(0)).or_insert(tl);
        *e = (*e).max(tl);
    }
    let mut candidates = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        if !n.up {
            continue;
        }
        if n.in_recovery {
            roles[i] = Role::Replica;
            continue;
        }
        let newest = memory[&n.system_id.unwrap_or(0)];
        if n.timeline.unwrap_or(0) < newest {
            roles[i] = Role::Fenced;
            fence[i] = Some(FenceReason::StaleTimeline);
        } else {
            candidates.push(i);
        }
    }
    match candidates.as_slice() {
        [] => RoleDecision {
            roles,
            fence,
            primary: None,
            conflict: None,
        },
        [one] => {
            roles[*one] = Role::Primary;
            RoleDecision {
                roles,
                fence,
                primary: Some(*one),
                conflict: None,
            }
        }
        many => {
            for &i in many {
                roles[i] = Role::Fenced;
                fence[i] = Some(FenceReason::Conflict);
            }
            RoleDecision {
                roles,
                fence,
                primary: None,
                conflict: Some(format!("{} servers claim to be primary", many.len())),
            }
        }
    }
}

/// What the store's record made of pglb's own decision.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordDecision {
    pub rule: StoreRule,
    /// Why the write port has no primary because of the store.
    pub block: Option<WriteBlock>,
}

/// Applies the primary recorded in the store to pglb's own decision `own` (same order as
/// `nodes` and `names`).
///
/// - A record (read now, or the last one read while the store does not answer): writes go only
///   to the server it names, once that server is up and writable on the recorded timeline or
///   newer, whatever the other timelines say. Every other writable server is fenced
///   (`NotRecorded`), so two writable servers are no conflict: the record says which one.
/// - No record, store answering: `own` as it is (no promoter has recorded a primary yet).
/// - No record ever read, store not answering: no primary. Roles stay pglb's own, so open write
///   sessions keep what pglb alone would keep: the store being away is no evidence against them.
pub fn follow_record(
    own: &RoleDecision,
    nodes: &[NodeView],
    names: &[&str],
    store: &PrimaryState,
) -> (RoleDecision, RecordDecision) {
    let Some(record) = &store.record else {
        if store.reachable {
            let d = RecordDecision {
                rule: StoreRule::NoRecord,
                block: None,
            };
            return (own.clone(), d);
        }
        let decision = RoleDecision {
            primary: None,
            ..own.clone()
        };
        let d = RecordDecision {
            rule: StoreRule::Unreachable,
            block: Some(WriteBlock::StoreUnreachable),
        };
        return (decision, d);
    };
    let rule = if store.reachable {
        StoreRule::Record
    } else {
        StoreRule::LastRecord
    };
    let named = names.iter().position(|n| *n == record.name);
    let mut roles = own.roles.clone();
    let mut fence = own.fence.clone();
    for (i, n) in nodes.iter().enumerate() {
        if n.up && !n.in_recovery && Some(i) != named {
            roles[i] = Role::Fenced;
            fence[i] = Some(FenceReason::NotRecorded);
        }
    }
    let name = || record.name.clone();
    let (primary, block) = match named {
        None => (None, Some(WriteBlock::NotConfigured { name: name() })),
        Some(r) => {
            let n = &nodes[r];
            let timeline = n.timeline.unwrap_or(0);
            if !n.up {
                (None, Some(WriteBlock::RecordedDown { name: name() }))
            } else if n.in_recovery {
                (None, Some(WriteBlock::RecordedInRecovery { name: name() }))
            } else if timeline < record.timeline {
                roles[r] = Role::Fenced;
                fence[r] = Some(FenceReason::StaleTimeline);
                let block = WriteBlock::RecordedBehind {
                    name: name(),
                    timeline,
                    recorded_timeline: record.timeline,
                };
                (None, Some(block))
            } else {
                roles[r] = Role::Primary;
                fence[r] = None;
                (Some(r), None)
            }
        }
    };
    let decision = RoleDecision {
        roles,
        fence,
        primary,
        conflict: None,
    };
    (decision, RecordDecision { rule, block })
}

/// A store endpoint as shown: `scheme://host:port`, without any `user:password@`.
pub fn without_credentials(endpoint: &str) -> String {
    let (scheme, rest) = endpoint.split_once("://").unwrap_or(("", endpoint));
    let host_end = rest.find('/').unwrap_or(rest.len());
    let rest = match rest[..host_end].rfind('@') {
        Some(at) => &rest[at + 1..],
        None => rest,
    };
    if scheme.is_empty() {
        rest.to_string()
    } else {
        format!("{scheme}://{rest}")
    }
}

/// Recent primary WAL positions, so pglb can tell how long ago the primary was where a replica is
/// now: the replica's time lag, measured on pglb's clock, immune to clock skew and idle primaries.
#[derive(Debug, Default)]
pub struct LsnHistory {
    samples: VecDeque<(Instant, Lsn)>,
}

impl LsnHistory {
    const KEEP: Duration = Duration::from_secs(600);

    pub fn push(&mut self, at: Instant, lsn: Lsn) {
        if self.samples.back().is_some_and(|&(_, l)| l == lsn) {
            return;
        }
        self.samples.push_back((at, lsn));
        while self
            .samples
            .front()
            .is_some_and(|&(t, _)| at.duration_since(t) > Self::KEEP)
        {
            self.samples.pop_front();
        }
    }

    /// Seconds since the primary first went past `replayed`; zero when it has not.
    pub fn lag_seconds(&self, replayed: Lsn, now: Instant) -> f64 {
        match self.samples.iter().find(|&&(_, l)| l > replayed) {
            Some(&(t, _)) => now.saturating_duration_since(t).as_secs_f64(),
            None => 0.0,
        }
    }
}

/// Hysteresis: an eligible replica leaves when over a limit; an excluded one comes back only when
/// under half of both limits, so a replica hovering at the limit does not flap.
pub fn read_eligible(
    was_eligible: bool,
    lag_bytes: Option<u64>,
    lag_seconds: Option<f64>,
    max_lag: u64,
    max_lag_time: Duration,
) -> bool {
    let bytes = lag_bytes.unwrap_or(0);
    let secs = lag_seconds.unwrap_or(0.0);
    let max_secs = max_lag_time.as_secs_f64();
    if was_eligible {
        bytes <= max_lag && secs <= max_secs
    } else {
        bytes <= max_lag / 2 && secs <= max_secs / 2.0
    }
}

/// One backend's inputs to the routing decision, as the control task keeps them.
#[derive(Debug, Clone)]
pub struct BackendState {
    pub config: BackendConfig,
    pub health: HealthState,
    pub report: Option<ProbeReport>,
    pub last_error: Option<ProbeError>,
    /// A fresh login refused while the kept check connection answered (cleared by a login that
    /// works).
    pub login_error: Option<ProbeError>,
    pub last_check: Option<SystemTime>,
    /// When a check last got an answer.
    pub last_answer: Option<Instant>,
    /// When up/down last changed.
    pub since: Instant,
    pub admin: AdminState,
    /// Removed from the config: open sessions drain until this deadline, then are cut.
    pub drain_until: Option<Instant>,
}

impl BackendState {
    pub fn new(config: BackendConfig, now: Instant) -> Self {
        BackendState {
            config,
            health: HealthState::default(),
            report: None,
            last_error: None,
            login_error: None,
            last_check: None,
            last_answer: None,
            since: now,
            admin: AdminState::Enabled,
            drain_until: None,
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }
}

/// What `route` decided about one backend last time (role changes and lag hysteresis).
#[derive(Debug, Clone)]
struct Decided {
    role: Role,
    since: Instant,
    read_eligible: bool,
}

/// The decision memory, kept by the control task across calls to `route`.
#[derive(Debug, Default)]
pub struct Memory {
    fence: FenceMemory,
    history: LsnHistory,
    /// When the two-primaries error was last reported (repeated once per check interval).
    conflict_reported: Option<Instant>,
    last_primary: Option<String>,
    decided: HashMap<String, Decided>,
    /// The store's rule, record and block as last logged.
    store_seen: Option<(StoreRule, Option<PrimaryRecord>, Option<WriteBlock>)>,
}

/// A change worth a log line, as `route` saw it.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    /// Two writable servers on the newest timeline: no writes until one is gone. Repeated once
    /// per check interval while it lasts.
    Conflict {
        conflict: String,
        servers: Vec<String>,
    },
    ConflictResolved,
    Primary {
        now: Option<String>,
        previous: Option<String>,
    },
    Role {
        backend: String,
        from: Role,
        to: Role,
        timeline: Option<u32>,
        /// Set when `to` is `Fenced`.
        reason: Option<FenceReason>,
    },
    /// How the store decides writes changed: its rule, the record or why there is no primary.
    Store {
        rule: StoreRule,
        record: Option<PrimaryRecord>,
        block: Option<WriteBlock>,
    },
    Lag {
        backend: String,
        eligible: bool,
        lag_bytes: Option<u64>,
        lag_seconds: Option<f64>,
        max_lag: u64,
        max_lag_seconds: f64,
    },
}

/// Decides the next View: roles (fencing), the primary, each replica's lag and read eligibility,
/// and which backends' sessions are cut. `states` are the configured backends in config order,
/// then the removed ones still draining; the View's `backends` are in the same order. `store`
/// is what the store last said of the primary, `None` without `[store]`. The runtime parts of
/// the View (handles, config, generation) are the caller's to fill in.
pub fn route(
    cfg: &Config,
    states: &[&BackendState],
    store: Option<&PrimaryState>,
    memory: &mut Memory,
    now: Instant,
) -> (View, Vec<Transition>) {
    let mut transitions = Vec::new();
    let configured: Vec<&BackendState> = states
        .iter()
        .copied()
        .filter(|s| s.drain_until.is_none())
        .collect();
    let views: Vec<NodeView> = configured
        .iter()
        .map(|s| NodeView {
            up: s.health.is_up(),
            in_recovery: s.report.as_ref().is_some_and(|r| r.in_recovery),
            timeline: s.report.as_ref().and_then(|r| r.timeline),
            system_id: s.report.as_ref().and_then(|r| r.system_id),
        })
        .collect();

    let own = decide_roles(&views, &mut memory.fence);
    let names: Vec<&str> = configured.iter().map(|s| s.name()).collect();
    let (decision, by_record) = match store {
        Some(st) => {
            let (d, r) = follow_record(&own, &views, &names, st);
            (d, Some(r))
        }
        None => (own.clone(), None),
    };
    // With a record, writes (open ones too) follow it; otherwise open write sessions keep what
    // pglb's own rule keeps.
    let recorded = store
        .and_then(|st| st.record.as_ref())
        .filter(|_| by_record.is_some());
    match (&decision.conflict, memory.conflict_reported) {
        (Some(c), last) if last.is_none_or(|t| now.duration_since(t) >= cfg.check.interval) => {
            let servers = decision
                .roles
                .iter()
                .zip(&configured)
                .zip(&views)
                .filter(|((r, _), v)| **r == Role::Fenced && v.up && !v.in_recovery)
                .map(|((_, s), v)| format!("{} (timeline {})", s.name(), v.timeline.unwrap_or(0)))
                .collect();
            transitions.push(Transition::Conflict {
                conflict: c.clone(),
                servers,
            });
            memory.conflict_reported = Some(now);
        }
        (None, Some(_)) => {
            transitions.push(Transition::ConflictResolved);
            memory.conflict_reported = None;
        }
        _ => {}
    }

    let primary_pos = decision
        .primary
        .and_then(|i| configured[i].report.as_ref().and_then(|r| r.current_lsn));
    let primary_sysid = decision.primary.and_then(|i| views[i].system_id);
    if let Some(lsn) = primary_pos {
        memory.history.push(now, lsn);
    }
    // Without a primary, replica byte lag is measured against the most advanced server.
    let reference = primary_pos.or_else(|| {
        configured
            .iter()
            .filter(|s| s.health.is_up())
            .filter_map(|s| s.report.as_ref().and_then(|r| r.position()))
            .max()
    });
    let new_primary = decision.primary.map(|i| configured[i].name().to_string());
    if new_primary != memory.last_primary {
        transitions.push(Transition::Primary {
            now: new_primary.clone(),
            previous: memory.last_primary.take(),
        });
        memory.last_primary = new_primary;
    }

    let mut view = View {
        version: env!("CARGO_PKG_VERSION").to_string(),
        config_file: cfg.path.display().to_string(),
        fallback_to_primary: cfg.read.fallback_to_primary,
        listen: Listen {
            write: cfg.listen.write.to_string(),
            read: cfg.listen.read.to_string(),
            stats: cfg.listen.stats.to_string(),
        },
        ..Default::default()
    };
    view.routing.balance = cfg.read.balance;
    view.routing.close_on_writer_change = cfg.proxy.close_on_writer_change;

    let mut ci = 0;
    for (i, s) in states.iter().enumerate() {
        let draining = s.drain_until.is_some();
        let role = if draining {
            memory
                .decided
                .get(s.name())
                .map_or(Role::Unknown, |d| d.role)
        } else {
            decision.roles[ci]
        };
        let sysid = if draining { None } else { views[ci].system_id };
        let is_primary = !draining && decision.primary == Some(ci);
        let pos = (!draining).then_some(ci);
        if !draining {
            ci += 1;
        }
        let decided = memory
            .decided
            .entry(s.name().to_string())
            .or_insert(Decided {
                role: Role::Unknown,
                since: s.since,
                read_eligible: true,
            });
        let fence_reason = pos
            .and_then(|p| decision.fence[p])
            .filter(|_| role == Role::Fenced);
        if decided.role != role && !draining {
            if s.health.is_up() {
                transitions.push(Transition::Role {
                    backend: s.name().to_string(),
                    from: decided.role,
                    to: role,
                    timeline: s.report.as_ref().and_then(|r| r.timeline),
                    reason: fence_reason,
                });
            }
            decided.role = role;
            decided.since = now;
        }

        let mut lag_bytes = None;
        let mut lag_seconds = None;
        let mut eligible = false;
        if role == Role::Replica && !draining {
            let replayed = s.report.as_ref().and_then(|r| r.position());
            if let (Some(reference), Some(replayed)) = (reference, replayed) {
                lag_bytes = Some(replayed.bytes_until(reference));
            }
            if let (Some(_), Some(replayed)) = (primary_pos, replayed) {
                lag_seconds = Some(memory.history.lag_seconds(replayed, now));
            }
            let same_cluster = match (primary_sysid, sysid) {
                (Some(p), Some(r)) => p == r,
                _ => true,
            };
            eligible = same_cluster
                && read_eligible(
                    decided.read_eligible,
                    lag_bytes,
                    lag_seconds,
                    cfg.read.max_lag,
                    cfg.read.max_lag_time,
                );
            if eligible != decided.read_eligible {
                transitions.push(Transition::Lag {
                    backend: s.name().to_string(),
                    eligible,
                    lag_bytes,
                    lag_seconds,
                    max_lag: cfg.read.max_lag,
                    max_lag_seconds: cfg.read.max_lag_time.as_secs_f64(),
                });
            }
            if eligible && s.admin == AdminState::Enabled {
                view.routing.readers.push(i);
                view.readers.push(s.name().to_string());
            }
        }
        if !draining {
            // Keep the hysteresis memory only while it means something.
            decided.read_eligible = if role == Role::Replica {
                eligible
            } else {
                true
            };
        }
        if is_primary && s.admin == AdminState::Enabled {
            view.routing.primary = Some(i);
            view.primary = Some(s.name().to_string());
        }
        // Open write sessions end only on evidence that their server stopped being the primary
        // (it reports recovery, is fenced, another server is the primary, it is disabled or
        // removed): failed checks alone (a busy or full server) are no evidence, and a server
        // that really died ends its sessions through TCP.
        let last_known_primary = || {
            let Some(r) = &s.report else { return false };
            let newest = memory
                .fence
                .get(&r.system_id.unwrap_or(0))
                .copied()
                .unwrap_or(0);
            !r.in_recovery && r.timeline.unwrap_or(0) >= newest
        };
        let keeps_open_writes = match recorded {
            // The record is the evidence: only the server it names keeps its write sessions,
            // also while its checks fail, as long as its last report said writable on the
            // recorded timeline or newer.
            Some(rec) => {
                is_primary
                    || (!s.health.is_up()
                        && decision.primary.is_none()
                        && s.name() == rec.name
                        && s.report.as_ref().is_some_and(|r| {
                            !r.in_recovery && r.timeline.unwrap_or(0) >= rec.timeline
                        }))
            }
            None => {
                pos.is_some_and(|p| own.primary == Some(p))
                    || (!s.health.is_up()
                        && own.primary.is_none()
                        && own.conflict.is_none()
                        && last_known_primary())
            }
        };
        let keep_writes = !draining && s.admin != AdminState::Disabled && keeps_open_writes;
        if keep_writes {
            view.routing.keep_writes.push(s.name().to_string());
        }
        let cut = match s.drain_until {
            Some(deadline) => now >= deadline,
            None => s.admin == AdminState::Disabled,
        };
        if cut {
            view.routing.cut.push(s.name().to_string());
        }
        let mut b = backend_view(
            s,
            role,
            eligible,
            lag_bytes,
            lag_seconds,
            s.since.max(decided.since),
        );
        b.fence_reason = fence_reason;
        view.backends.push(b);
    }
    if let (Some(st), Some(d)) = (store, by_record) {
        let seen = (d.rule, st.record.clone(), d.block.clone());
        // Before the follower's first report there is nothing to tell.
        let heard = st.last_contact.is_some() || st.errors > 0;
        if heard && memory.store_seen.as_ref() != Some(&seen) {
            transitions.push(Transition::Store {
                rule: d.rule,
                record: st.record.clone(),
                block: d.block.clone(),
            });
            memory.store_seen = Some(seen);
        }
        view.store = Some(store_view(cfg, st, d, now));
    }
    // A replica's upstream as the backend's name when it is one of ours (same address as
    // configured), else the address its receiver reports.
    let names: Vec<(String, String)> = view
        .backends
        .iter()
        .map(|b| (b.address.clone(), b.name.clone()))
        .collect();
    for b in &mut view.backends {
        if let Some(up) = &b.upstream {
            if let Some((_, name)) = names.iter().find(|(addr, _)| addr == up) {
                b.upstream = Some(name.clone());
            }
        }
    }
    // Forget what was decided about backends that are gone for good.
    memory
        .decided
        .retain(|name, _| states.iter().any(|s| s.name() == name));
    (view, transitions)
}

fn store_view(cfg: &Config, st: &PrimaryState, d: RecordDecision, now: Instant) -> StoreView {
    let last_answer = st.last_contact.map(|t| t.into_std());
    StoreView {
        kind: cfg.store.kind.as_str().to_string(),
        endpoints: cfg
            .store
            .endpoints
            .iter()
            .map(|e| without_credentials(e))
            .collect(),
        prefix: cfg.store.prefix.clone(),
        reachable: st.reachable,
        recorded: st.record.as_ref().map(|r| RecordView {
            name: r.name.clone(),
            timeline: r.timeline,
            epoch: r.epoch,
            revision: st.revision,
        }),
        rule: d.rule,
        write_block: d.block,
        seconds_since_answer: last_answer.map(|t| now.saturating_duration_since(t).as_secs_f64()),
        errors: st.errors,
        last_error: st.last_error.as_ref().map(|e| e.message.clone()),
        last_error_kind: st.last_error.as_ref().map(|e| e.kind.to_string()),
        last_answer,
    }
}

fn backend_view(
    s: &BackendState,
    role: Role,
    read_eligible: bool,
    lag_bytes: Option<u64>,
    lag_seconds: Option<f64>,
    since: Instant,
) -> BackendView {
    let state = if s.drain_until.is_some() || s.admin == AdminState::Drain {
        Status::Draining
    } else if s.admin == AdminState::Disabled {
        Status::Disabled
    } else if s.health.is_up() {
        Status::Up
    } else {
        Status::Down
    };
    let r = s.report.as_ref();
    BackendView {
        name: s.name().to_string(),
        address: s.config.address.clone(),
        weight: s.config.weight,
        maxconn: s.config.maxconn,
        role,
        state,
        condition: if !s.health.is_up() {
            Condition::Down
        } else if let Some(e) = &s.login_error {
            if e.code() == Some(&tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS) {
                Condition::Full
            } else {
                Condition::LoginRefused
            }
        } else if s.last_error.is_some() {
            Condition::Suspect
        } else {
            Condition::Ok
        },
        login_error: s.login_error.as_ref().map(|e| e.to_string()),
        admin_state: s.admin,
        seconds_since_change: 0.0,
        in_recovery: r.map(|r| r.in_recovery),
        timeline: r.and_then(|r| r.timeline),
        system_id: r.and_then(|r| r.system_id).map(|s| s.to_string()),
        lsn: r.and_then(|r| r.position()).map(|l| l.to_string()),
        receive_lsn: r.and_then(|r| r.receive_lsn).map(|l| l.to_string()),
        lag_bytes,
        lag_seconds,
        read_eligible: role == Role::Replica && read_eligible,
        streaming: r.and_then(|r| r.streaming),
        upstream: r.and_then(|r| r.upstream.clone()),
        check_latency_ms: r.map(|r| r.latency.as_secs_f64() * 1000.0),
        last_check_unix: s.last_check.and_then(unix),
        last_error: s.last_error.as_ref().map(|e| e.to_string()),
        last_error_kind: s.last_error.as_ref().map(|e| e.kind().to_string()),
        since: Some(since),
        answered: s.last_answer,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::PortRole;

    fn primary(tl: u32, sysid: u64) -> NodeView {
        NodeView {
            up: true,
            in_recovery: false,
            timeline: Some(tl),
            system_id: Some(sysid),
        }
    }
    fn replica() -> NodeView {
        NodeView {
            up: true,
            in_recovery: true,
            timeline: Some(1),
            system_id: Some(7),
        }
    }
    fn down() -> NodeView {
        NodeView::default()
    }

    #[test]
    fn one_primary_and_replicas() {
        let mut m = FenceMemory::new();
        let d = decide_roles(&[primary(1, 7), replica(), replica()], &mut m);
        assert_eq!(d.primary, Some(0));
        assert_eq!(d.roles, vec![Role::Primary, Role::Replica, Role::Replica]);
        assert!(d.conflict.is_none());
    }

    #[test]
    fn higher_timeline_wins_and_the_other_is_fenced() {
        let mut m = FenceMemory::new();
        let d = decide_roles(&[primary(1, 7), primary(2, 7), replica()], &mut m);
        assert_eq!(d.primary, Some(1));
        assert_eq!(d.roles[0], Role::Fenced);
    }

    #[test]
    fn equal_timelines_fail_closed() {
        let mut m = FenceMemory::new();
        let d = decide_roles(&[primary(3, 7), primary(3, 7)], &mut m);
        assert_eq!(d.primary, None);
        assert_eq!(d.roles, vec![Role::Fenced, Role::Fenced]);
        assert!(d.conflict.is_some());
    }

    #[test]
    fn old_primary_returning_while_new_one_is_unreachable_stays_fenced() {
        let mut m = FenceMemory::new();
        decide_roles(&[primary(1, 7), primary(2, 7)], &mut m);
        // The new primary (timeline 2) is briefly down; the old one comes back writable.
        let d = decide_roles(&[primary(1, 7), down()], &mut m);
        assert_eq!(d.primary, None);
        assert_eq!(d.roles[0], Role::Fenced);
    }

    #[test]
    fn a_fresh_cluster_is_not_fenced_by_an_old_ones_timeline() {
        let mut m = FenceMemory::new();
        decide_roles(&[primary(5, 7)], &mut m);
        let d = decide_roles(&[primary(1, 99)], &mut m);
        assert_eq!(d.primary, Some(0));
    }

    #[test]
    fn down_backends_have_no_role() {
        let mut m = FenceMemory::new();
        let d = decide_roles(&[down(), replica()], &mut m);
        assert_eq!(d.primary, None);
        assert_eq!(d.roles, vec![Role::Unknown, Role::Replica]);
    }

    #[test]
    fn lag_hysteresis() {
        let t = Duration::from_secs(10);
        assert!(read_eligible(true, Some(100), Some(1.0), 100, t));
        assert!(!read_eligible(true, Some(101), Some(1.0), 100, t));
        assert!(!read_eligible(true, Some(0), Some(10.5), 100, t));
        // Coming back needs half of both limits.
        assert!(!read_eligible(false, Some(80), Some(1.0), 100, t));
        assert!(!read_eligible(false, Some(10), Some(6.0), 100, t));
        assert!(read_eligible(false, Some(50), Some(5.0), 100, t));
        // Unknown lag (no primary to compare with) does not exclude.
        assert!(read_eligible(true, None, None, 100, t));
    }

    #[test]
    fn time_lag_is_measured_from_when_the_primary_passed_the_replica() {
        let mut h = LsnHistory::default();
        let t0 = Instant::now();
        h.push(t0, Lsn(100));
        h.push(t0 + Duration::from_secs(1), Lsn(200));
        h.push(t0 + Duration::from_secs(2), Lsn(300));
        let now = t0 + Duration::from_secs(5);
        assert_eq!(h.lag_seconds(Lsn(300), now), 0.0);
        assert_eq!(h.lag_seconds(Lsn(250), now), 3.0);
        assert_eq!(h.lag_seconds(Lsn(150), now), 4.0);
        // An idle primary: the replica is caught up however old its last transaction is.
        assert_eq!(
            h.lag_seconds(Lsn(300), now + Duration::from_secs(3600)),
            0.0
        );
    }

    fn cfg() -> Config {
        Config::parse(
            std::path::Path::new("lb.toml"),
            "[check]\nuser = \"c\"\n[[backend]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n",
        )
        .expect("a minimal config parses")
    }

    fn state(name: &str, up: bool, report: Option<ProbeReport>, t0: Instant) -> BackendState {
        let mut s = BackendState::new(
            BackendConfig {
                name: name.into(),
                address: "127.0.0.1:1".into(),
                weight: 1,
                priority: 100,
                no_failover: false,
                maxconn: 0,
            },
            t0,
        );
        if up {
            s.health.record(true, 1, 1);
        }
        s.report = report;
        s
    }

    fn report(in_recovery: bool, tl: u32, lsn: u64) -> ProbeReport {
        ProbeReport {
            in_recovery,
            current_lsn: (!in_recovery).then_some(Lsn(lsn)),
            receive_lsn: in_recovery.then_some(Lsn(lsn)),
            replay_lsn: in_recovery.then_some(Lsn(lsn)),
            replay_age_seconds: None,
            timeline: Some(tl),
            system_id: Some(7),
            streaming: Some(in_recovery),
            upstream: None,
            latency: Duration::from_millis(1),
        }
    }

    #[test]
    fn route_names_the_primary_and_the_readers() {
        let t0 = Instant::now();
        let states = [
            state("p", true, Some(report(false, 1, 1000)), t0),
            state("r1", true, Some(report(true, 1, 1000)), t0),
            state("r2", false, None, t0),
        ];
        let refs: Vec<_> = states.iter().collect();
        let mut m = Memory::default();
        let (v, t) = route(&cfg(), &refs, None, &mut m, t0);
        assert_eq!(v.primary.as_deref(), Some("p"));
        assert_eq!(v.readers, ["r1"]);
        assert_eq!(v.routing.primary, Some(0));
        assert_eq!(v.routing.readers, [1]);
        assert_eq!(v.backends[2].state, Status::Down);
        assert_eq!(v.backends[1].lag_bytes, Some(0));
        assert!(t.contains(&Transition::Primary {
            now: Some("p".into()),
            previous: None
        }));
        // Nothing changed: nothing to log.
        let (_, t) = route(&cfg(), &refs, None, &mut m, t0 + Duration::from_secs(1));
        assert!(t.is_empty(), "{t:?}");
    }

    #[test]
    fn a_disabled_backend_is_cut_and_a_drained_primary_takes_no_writes() {
        let t0 = Instant::now();
        let mut states = [
            state("p", true, Some(report(false, 1, 1000)), t0),
            state("r1", true, Some(report(true, 1, 1000)), t0),
        ];
        states[0].admin = AdminState::Drain;
        states[1].admin = AdminState::Disabled;
        let refs: Vec<_> = states.iter().collect();
        let (v, _) = route(&cfg(), &refs, None, &mut Memory::default(), t0);
        assert_eq!(v.primary, None);
        assert!(v.readers.is_empty());
        assert_eq!(v.routing.cut, ["r1"]);
        assert_eq!(v.backends[0].state, Status::Draining);
        assert_eq!(v.backends[1].state, Status::Disabled);
    }

    #[test]
    fn a_removed_backend_drains_then_is_cut() {
        let t0 = Instant::now();
        let mut states = [
            state("p", true, Some(report(false, 1, 1000)), t0),
            state("gone", true, Some(report(true, 1, 1000)), t0),
        ];
        states[1].drain_until = Some(t0 + Duration::from_secs(5));
        let refs: Vec<_> = states.iter().collect();
        let mut m = Memory::default();
        let (v, _) = route(&cfg(), &refs, None, &mut m, t0);
        assert_eq!(v.backends[1].state, Status::Draining);
        assert!(v.readers.is_empty());
        assert!(v.routing.cut.is_empty());
        let (v, _) = route(&cfg(), &refs, None, &mut m, t0 + Duration::from_secs(5));
        assert_eq!(v.routing.cut, ["gone"]);
    }

    #[test]
    fn a_lagging_replica_leaves_and_comes_back_with_hysteresis() {
        let t0 = Instant::now();
        let c = cfg();
        let max = c.read.max_lag;
        let mut m = Memory::default();
        let at = |lag: u64| {
            [
                state("p", true, Some(report(false, 1, 10 * max)), t0),
                state("r", true, Some(report(true, 1, 10 * max - lag)), t0),
            ]
        };
        let run = |m: &mut Memory, lag: u64| {
            let s = at(lag);
            let refs: Vec<_> = s.iter().collect();
            route(&c, &refs, None, m, t0)
        };
        assert_eq!(run(&mut m, 0).0.readers, ["r"]);
        let (v, t) = run(&mut m, max + 1);
        assert!(v.readers.is_empty());
        assert!(
            matches!(
                t[0],
                Transition::Lag {
                    eligible: false,
                    ..
                }
            ),
            "{t:?}"
        );
        // Under the limit but not under half of it: still out.
        assert!(run(&mut m, max - 1).0.readers.is_empty());
        assert_eq!(run(&mut m, max / 2).0.readers, ["r"]);
    }

    #[test]
    fn two_primaries_are_reported_once_per_interval() {
        let t0 = Instant::now();
        let states = [
            state("a", true, Some(report(false, 3, 1000)), t0),
            state("b", true, Some(report(false, 3, 1000)), t0),
        ];
        let refs: Vec<_> = states.iter().collect();
        let c = cfg();
        let mut m = Memory::default();
        let (v, t) = route(&c, &refs, None, &mut m, t0);
        assert_eq!(v.primary, None);
        assert!(t.iter().any(|t| matches!(t, Transition::Conflict { .. })));
        let (_, t) = route(&c, &refs, None, &mut m, t0 + c.check.interval / 2);
        assert!(!t.iter().any(|t| matches!(t, Transition::Conflict { .. })));
        let (_, t) = route(&c, &refs, None, &mut m, t0 + c.check.interval);
        assert!(t.iter().any(|t| matches!(t, Transition::Conflict { .. })));
    }

    #[test]
    fn a_primary_that_stops_answering_keeps_its_write_sessions_until_evidence() {
        let t0 = Instant::now();
        let c = cfg();
        let mut m = Memory::default();
        let mut states = [
            state("p", true, Some(report(false, 1, 1000)), t0),
            state("r", true, Some(report(true, 1, 1000)), t0),
        ];
        let run = |m: &mut Memory, states: &[BackendState]| {
            let refs: Vec<_> = states.iter().collect();
            route(&c, &refs, None, m, t0).0
        };
        let v = run(&mut m, &states);
        assert!(v.keeps(PortRole::Write, "p"));
        // Checks fail (timeouts, a full server): no primary for new sessions, open ones stay.
        states[0].health.record(false, 1, 1);
        states[0].last_error = Some(ProbeError::Timeout(Duration::from_secs(1)));
        let v = run(&mut m, &states);
        assert_eq!(v.primary, None);
        assert_eq!(v.backends[0].condition, Condition::Down);
        assert!(
            v.keeps(PortRole::Write, "p"),
            "failed checks alone cut nothing"
        );
        // Evidence: the replica was promoted (newer timeline).
        states[1].report = Some(report(false, 2, 2000));
        let v = run(&mut m, &states);
        assert_eq!(v.primary.as_deref(), Some("r"));
        assert!(!v.keeps(PortRole::Write, "p"));
        assert!(v.keeps(PortRole::Write, "r"));
    }

    #[test]
    fn a_primary_back_in_recovery_or_disabled_loses_its_write_sessions() {
        let t0 = Instant::now();
        let c = cfg();
        let mut states = [state("p", true, Some(report(false, 1, 1000)), t0)];
        states[0].health.record(false, 1, 1);
        // Its last report says recovery: it is a replica now.
        states[0].report = Some(report(true, 1, 1000));
        let refs: Vec<_> = states.iter().collect();
        let (v, _) = route(&c, &refs, None, &mut Memory::default(), t0);
        assert!(!v.keeps(PortRole::Write, "p"));
        let mut states = [state("p", true, Some(report(false, 1, 1000)), t0)];
        states[0].admin = AdminState::Disabled;
        let refs: Vec<_> = states.iter().collect();
        let (v, _) = route(&c, &refs, None, &mut Memory::default(), t0);
        assert!(!v.keeps(PortRole::Write, "p"));
        // Drain: no new sessions, open ones stay.
        states[0].admin = AdminState::Drain;
        let refs: Vec<_> = states.iter().collect();
        let (v, _) = route(&c, &refs, None, &mut Memory::default(), t0);
        assert_eq!(v.primary, None);
        assert!(v.keeps(PortRole::Write, "p"));
    }

    #[test]
    fn a_refused_login_on_a_live_connection_is_full_or_refused_not_down() {
        let t0 = Instant::now();
        let mut states = [state("p", true, Some(report(false, 1, 1000)), t0)];
        states[0].login_error = Some(ProbeError::Timeout(Duration::from_secs(1)));
        let refs: Vec<_> = states.iter().collect();
        let (v, _) = route(&cfg(), &refs, None, &mut Memory::default(), t0);
        assert_eq!(v.backends[0].condition, Condition::LoginRefused);
        assert_eq!(v.primary.as_deref(), Some("p"));
    }

    fn named(nodes: &[NodeView]) -> Vec<String> {
        (0..nodes.len()).map(|i| format!("pg-{i}")).collect()
    }

    fn store(record: Option<(&str, u32, u64)>, reachable: bool) -> PrimaryState {
        PrimaryState {
            record: record.map(|(name, timeline, epoch)| PrimaryRecord {
                name: name.into(),
                timeline,
                epoch,
            }),
            revision: 7,
            reachable,
            // The follower has reported: an answer, or a failed read.
            last_contact: reachable.then(tokio::time::Instant::now),
            errors: u64::from(!reachable),
            ..Default::default()
        }
    }

    /// `decide_roles`, then `follow_record`, as `route` does.
    fn by_record(nodes: &[NodeView], st: &PrimaryState) -> (RoleDecision, RecordDecision) {
        let own = decide_roles(nodes, &mut FenceMemory::new());
        let names = named(nodes);
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        follow_record(&own, nodes, &names, st)
    }

    #[test]
    fn the_recorded_primary_takes_writes() {
        let nodes = [primary(1, 7), replica(), replica()];
        let (d, r) = by_record(&nodes, &store(Some(("pg-0", 1, 1)), true));
        assert_eq!(d.primary, Some(0));
        assert_eq!(d.roles, vec![Role::Primary, Role::Replica, Role::Replica]);
        assert_eq!(r.rule, StoreRule::Record);
        assert_eq!(r.block, None);
    }

    #[test]
    fn a_server_promoted_outside_the_record_is_fenced_even_on_a_newer_timeline() {
        // pg-1 promoted by hand (timeline 2) while the store records pg-0 (timeline 1): pglb's own
        // rule would pick pg-1; the record keeps pg-0 and fences pg-1.
        let nodes = [primary(1, 7), primary(2, 7), replica()];
        let own = decide_roles(&nodes, &mut FenceMemory::new());
        assert_eq!(own.primary, Some(1), "own rule: the newest timeline");
        let (d, r) = by_record(&nodes, &store(Some(("pg-0", 1, 1)), true));
        assert_eq!(d.primary, Some(0));
        assert_eq!(d.roles[1], Role::Fenced);
        assert_eq!(d.fence[1], Some(FenceReason::NotRecorded));
        assert_eq!(d.fence[0], None);
        assert_eq!(r.block, None);
        // The record moves to pg-1: now pg-0 is the one fenced.
        let (d, _) = by_record(&nodes, &store(Some(("pg-1", 2, 2)), true));
        assert_eq!(d.primary, Some(1));
        assert_eq!(d.fence[0], Some(FenceReason::NotRecorded));
    }

    #[test]
    fn two_writable_on_one_timeline_are_no_conflict_when_the_record_names_one() {
        let nodes = [primary(3, 7), primary(3, 7)];
        assert!(decide_roles(&nodes, &mut FenceMemory::new())
            .conflict
            .is_some());
        let (d, _) = by_record(&nodes, &store(Some(("pg-1", 3, 4)), true));
        assert_eq!(d.primary, Some(1));
        assert_eq!(d.conflict, None);
        assert_eq!(d.fence, vec![Some(FenceReason::NotRecorded), None]);
    }

    #[test]
    fn no_writes_until_the_recorded_server_is_writable_on_the_recorded_timeline() {
        // Recorded before its promotion: still a replica; the old primary still writable.
        let nodes = [primary(1, 7), replica()];
        let (d, r) = by_record(&nodes, &store(Some(("pg-1", 1, 2)), true));
        assert_eq!(d.primary, None);
        assert_eq!(
            r.block,
            Some(WriteBlock::RecordedInRecovery {
                name: "pg-1".into()
            })
        );
        assert_eq!(d.fence[0], Some(FenceReason::NotRecorded));
        // Writable, but on a timeline older than the record's.
        let (d, r) = by_record(&[primary(2, 7)], &store(Some(("pg-0", 3, 2)), true));
        assert_eq!(d.primary, None);
        assert_eq!(d.fence[0], Some(FenceReason::StaleTimeline));
        assert_eq!(
            r.block,
            Some(WriteBlock::RecordedBehind {
                name: "pg-0".into(),
                timeline: 2,
                recorded_timeline: 3
            })
        );
        // Down.
        let (d, r) = by_record(&[down(), replica()], &store(Some(("pg-0", 1, 1)), true));
        assert_eq!(d.primary, None);
        assert_eq!(
            r.block,
            Some(WriteBlock::RecordedDown {
                name: "pg-0".into()
            })
        );
        // Not one of ours.
        let (d, r) = by_record(&[primary(1, 7)], &store(Some(("elsewhere", 1, 1)), true));
        assert_eq!(d.primary, None);
        assert_eq!(d.fence[0], Some(FenceReason::NotRecorded));
        assert_eq!(
            r.block,
            Some(WriteBlock::NotConfigured {
                name: "elsewhere".into()
            })
        );
        // Writable on a newer timeline than recorded (the record is written before promotion
        // with the timeline to exceed): takes writes.
        let (d, _) = by_record(&[primary(4, 7)], &store(Some(("pg-0", 3, 2)), true));
        assert_eq!(d.primary, Some(0));
    }

    #[test]
    fn an_unreachable_store_keeps_the_last_record_and_never_an_unrecorded_server() {
        let nodes = [primary(1, 7), primary(2, 7)];
        let (d, r) = by_record(&nodes, &store(Some(("pg-0", 1, 1)), false));
        assert_eq!(r.rule, StoreRule::LastRecord);
        assert_eq!(d.primary, Some(0));
        assert_eq!(d.fence[1], Some(FenceReason::NotRecorded));
        // The recorded one fails its checks: nobody takes writes.
        let (d, r) = by_record(
            &[down(), primary(2, 7)],
            &store(Some(("pg-0", 1, 1)), false),
        );
        assert_eq!(d.primary, None);
        assert_eq!(
            r.block,
            Some(WriteBlock::RecordedDown {
                name: "pg-0".into()
            })
        );
    }

    #[test]
    fn no_record_in_a_reachable_store_is_pglbs_own_rule_and_an_unreachable_one_no_writes() {
        let nodes = [primary(1, 7), primary(2, 7), replica()];
        let own = decide_roles(&nodes, &mut FenceMemory::new());
        let (d, r) = by_record(&nodes, &store(None, true));
        assert_eq!(d, own);
        assert_eq!(r.rule, StoreRule::NoRecord);
        assert_eq!(r.block, None);
        let (d, r) = by_record(&nodes, &store(None, false));
        assert_eq!(d.primary, None);
        assert_eq!(d.roles, own.roles, "roles stay pglb's own");
        assert_eq!(r.rule, StoreRule::Unreachable);
        assert_eq!(r.block, Some(WriteBlock::StoreUnreachable));
        // Never answered since start (the default state) is the same.
        let (d, r) = by_record(&nodes, &PrimaryState::default());
        assert_eq!((d.primary, r.rule), (None, StoreRule::Unreachable));
    }

    #[test]
    fn endpoints_are_shown_without_credentials() {
        assert_eq!(
            without_credentials("http://pglb:s3cret@etcd-1:2379"),
            "http://etcd-1:2379"
        );
        assert_eq!(
            without_credentials("https://etcd-1:2379"),
            "https://etcd-1:2379"
        );
        assert_eq!(without_credentials("etcd-1:2379"), "etcd-1:2379");
    }

    fn store_cfg() -> Config {
        Config::parse(
            std::path::Path::new("lb.toml"),
            "[check]\nuser = \"c\"\n[store]\nkind = \"etcd\"\nendpoints = [\"http://u:pw@127.0.0.1:2379\"]\n[[backend]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n",
        )
        .expect("a config with a store parses")
    }

    #[test]
    fn route_follows_the_record_and_closes_write_sessions_of_an_unrecorded_server() {
        let t0 = Instant::now();
        let c = store_cfg();
        let mut m = Memory::default();
        let mut states = [
            state("p", true, Some(report(false, 1, 1000)), t0),
            state("r", true, Some(report(true, 1, 1000)), t0),
        ];
        let run = |m: &mut Memory, states: &[BackendState], st: &PrimaryState| {
            let refs: Vec<_> = states.iter().collect();
            route(&c, &refs, Some(st), m, t0)
        };
        let rec_p = store(Some(("p", 1, 1)), true);
        let (v, t) = run(&mut m, &states, &rec_p);
        assert_eq!(v.primary.as_deref(), Some("p"));
        assert!(v.keeps(PortRole::Write, "p"));
        let sv = v.store.as_ref().expect("a store section");
        assert_eq!(sv.rule, StoreRule::Record);
        assert_eq!(sv.recorded.as_ref().map(|r| r.name.as_str()), Some("p"));
        assert_eq!(sv.endpoints, ["http://127.0.0.1:2379"]);
        assert!(t.iter().any(|t| matches!(
            t,
            Transition::Store {
                rule: StoreRule::Record,
                ..
            }
        )));
        // "r" promoted by hand: fenced, no sessions; "p" keeps writes.
        states[1].report = Some(report(false, 2, 2000));
        let (v, t) = run(&mut m, &states, &rec_p);
        assert_eq!(v.primary.as_deref(), Some("p"));
        assert_eq!(v.backends[1].role, Role::Fenced);
        assert_eq!(v.backends[1].fence_reason, Some(FenceReason::NotRecorded));
        assert!(!v.keeps(PortRole::Write, "r"));
        assert!(v.readers.is_empty());
        assert!(
            !t.iter().any(|t| matches!(t, Transition::Store { .. })),
            "{t:?}"
        );
        // "p"'s checks fail: no primary, its open write sessions stay (no evidence), "r"'s do not.
        states[0].health.record(false, 1, 1);
        let (v, _) = run(&mut m, &states, &rec_p);
        assert_eq!(v.primary, None);
        assert!(v.keeps(PortRole::Write, "p"));
        assert!(!v.keeps(PortRole::Write, "r"));
        // The record moves to "r": writes and open sessions move.
        states[0].health.record(true, 1, 1);
        let (v, t) = run(&mut m, &states, &store(Some(("r", 2, 2)), true));
        assert_eq!(v.primary.as_deref(), Some("r"));
        assert!(!v.keeps(PortRole::Write, "p"));
        assert_eq!(v.backends[0].fence_reason, Some(FenceReason::NotRecorded));
        assert!(t.iter().any(|t| matches!(t, Transition::Store { .. })));
    }

    #[test]
    fn route_with_a_store_never_read_takes_no_writes_but_keeps_open_ones() {
        let t0 = Instant::now();
        let c = store_cfg();
        let states = [
            state("p", true, Some(report(false, 1, 1000)), t0),
            state("r", true, Some(report(true, 1, 1000)), t0),
        ];
        let refs: Vec<_> = states.iter().collect();
        let mut m = Memory::default();
        let (v, t) = route(&c, &refs, Some(&PrimaryState::default()), &mut m, t0);
        let told = |t: &[Transition]| t.iter().any(|t| matches!(t, Transition::Store { .. }));
        assert!(
            !told(&t),
            "nothing to tell before the follower reports: {t:?}"
        );
        assert_eq!(v.primary, None);
        assert_eq!(v.readers, ["r"], "reads go on");
        assert!(
            v.keeps(PortRole::Write, "p"),
            "no evidence against open sessions"
        );
        let sv = v.store.as_ref().expect("a store section");
        assert_eq!(sv.rule, StoreRule::Unreachable);
        assert_eq!(sv.write_block, Some(WriteBlock::StoreUnreachable));
        assert_eq!(sv.seconds_since_answer, None);
        assert!(sv.recorded.is_none());
        // The follower's first failed read: now it is worth a log line.
        let (_, t) = route(&c, &refs, Some(&store(None, false)), &mut m, t0);
        assert!(told(&t), "{t:?}");
        // The store answers, without a record: pglb's own rule.
        let (v, _) = route(&c, &refs, Some(&store(None, true)), &mut m, t0);
        assert_eq!(v.primary.as_deref(), Some("p"));
        assert_eq!(v.store.as_ref().map(|s| s.rule), Some(StoreRule::NoRecord));
        // Without [store], no store section.
        let (v, _) = route(&cfg(), &refs, None, &mut m, t0);
        assert!(v.store.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_age_of_the_last_answer_and_the_last_error_show_in_the_store_section() {
        let c = store_cfg();
        let t0 = tokio::time::Instant::now();
        let states = [state(
            "p",
            true,
            Some(report(false, 1, 1000)),
            t0.into_std(),
        )];
        let refs: Vec<_> = states.iter().collect();
        let mut st = store(Some(("p", 1, 1)), false);
        st.last_contact = Some(t0);
        st.errors = 3;
        st.last_error = Some(crate::store::StoreFailure {
            kind: "timeout",
            message: "etcd get on /pglb/main/primary: no answer within 1s".into(),
        });
        tokio::time::advance(Duration::from_secs(4)).await;
        let now = tokio::time::Instant::now().into_std();
        let (v, _) = route(&c, &refs, Some(&st), &mut Memory::default(), now);
        let sv = v.store.as_ref().expect("a store section");
        assert_eq!(sv.rule, StoreRule::LastRecord);
        assert!(!sv.reachable);
        assert_eq!(
            v.primary.as_deref(),
            Some("p"),
            "the last record still holds"
        );
        assert_eq!(sv.seconds_since_answer, Some(4.0));
        assert_eq!(sv.errors, 3);
        assert_eq!(sv.last_error_kind.as_deref(), Some("timeout"));
        assert!(sv.last_error.is_some());
    }
}
