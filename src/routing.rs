//! Who gets new sessions. `decide_roles` (pure) turns all backends' check reports into roles,
//! fencing stale primaries by timeline; `replica_lag` and `read_eligible` (pure) decide which
//! replicas may take reads. `Cluster` owns the backends and their checker tasks, applies configs
//! (start and reload), and publishes a `RoutingTable` snapshot through a `watch` channel that
//! listeners read per accept and sessions wake on.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::backend::{self, AdminState, Backend, PortRole, Role};
use crate::config::{Balance, Config};
use crate::pg::Lsn;

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
        } else {
            candidates.push(i);
        }
    }
    match candidates.as_slice() {
        [] => RoleDecision {
            roles,
            primary: None,
            conflict: None,
        },
        [one] => {
            roles[*one] = Role::Primary;
            RoleDecision {
                roles,
                primary: Some(*one),
                conflict: None,
            }
        }
        many => {
            for &i in many {
                roles[i] = Role::Fenced;
            }
            RoleDecision {
                roles,
                primary: None,
                conflict: Some(format!("{} servers claim to be primary", many.len())),
            }
        }
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

/// The routing decision as a snapshot. Compared by backend names so that sessions only wake up
/// when routing really changed.
#[derive(Debug, Clone, Default)]
pub struct RoutingTable {
    pub primary: Option<Arc<Backend>>,
    /// Replicas that may take new read sessions, in config order.
    pub readers: Vec<Arc<Backend>>,
    pub fallback_to_primary: bool,
    pub balance: Balance,
    pub close_on_writer_change: bool,
    /// Backends whose open sessions must be closed now (disabled, or removed and past
    /// `drain_timeout`).
    pub cut: Vec<String>,
    /// Every backend a CancelRequest may need to reach (configured plus draining).
    pub all: Vec<Arc<Backend>>,
}

fn names(v: &[Arc<Backend>]) -> Vec<&str> {
    v.iter().map(|b| b.name.as_str()).collect()
}

impl PartialEq for RoutingTable {
    fn eq(&self, o: &Self) -> bool {
        self.primary.as_ref().map(|b| &b.name) == o.primary.as_ref().map(|b| &b.name)
            && names(&self.readers) == names(&o.readers)
            && self.fallback_to_primary == o.fallback_to_primary
            && self.balance == o.balance
            && self.close_on_writer_change == o.close_on_writer_change
            && self.cut == o.cut
            && names(&self.all) == names(&o.all)
    }
}

impl RoutingTable {
    /// Backends to try for a new session on `port`, best first.
    pub fn candidates(&self, port: PortRole, rr: &AtomicUsize) -> Vec<Arc<Backend>> {
        match port {
            PortRole::Write => self.primary.iter().cloned().collect(),
            PortRole::Read => {
                let mut out = order_readers(&self.readers, self.balance, rr);
                if self.fallback_to_primary {
                    out.extend(self.primary.iter().cloned());
                }
                out
            }
        }
    }

    /// Whether an open session on `port` to `backend` may go on.
    pub fn keeps(&self, port: PortRole, backend: &str) -> bool {
        if self.cut.iter().any(|n| n == backend) {
            return false;
        }
        match port {
            PortRole::Write if self.close_on_writer_change => {
                self.primary.as_ref().is_some_and(|p| p.name == backend)
            }
            _ => true,
        }
    }
}

/// Orders readers by the balance algorithm, honouring weights. The first is the choice; the rest
/// are the fallbacks if it refuses the connection.
fn order_readers(
    readers: &[Arc<Backend>],
    balance: Balance,
    rr: &AtomicUsize,
) -> Vec<Arc<Backend>> {
    if readers.is_empty() {
        return Vec::new();
    }
    let tick = rr.fetch_add(1, Ordering::Relaxed);
    let n = readers.len();
    match balance {
        Balance::Leastconn => {
            // Rotate first so that ties (the common case with short sessions) spread evenly.
            let mut v: Vec<_> = (0..n).map(|i| readers[(i + tick) % n].clone()).collect();
            v.sort_by(|a, b| {
                let wa = a.config().weight.max(1) as u128;
                let wb = b.config().weight.max(1) as u128;
                // a.active / wa  vs  b.active / wb, without floats.
                (a.counters(PortRole::Read).active.load(Ordering::Relaxed) as u128 * wb)
                    .cmp(&(b.counters(PortRole::Read).active.load(Ordering::Relaxed) as u128 * wa))
            });
            v
        }
        Balance::Roundrobin => {
            let weights: Vec<u64> = readers
                .iter()
                .map(|b| b.config().weight.max(1) as u64)
                .collect();
            let total: u64 = weights.iter().sum();
            let mut slot = tick as u64 % total;
            let mut first = 0;
            for (i, w) in weights.iter().enumerate() {
                if slot < *w {
                    first = i;
                    break;
                }
                slot -= w;
            }
            (0..n).map(|i| readers[(first + i) % n].clone()).collect()
        }
    }
}

struct Retired {
    backend: Arc<Backend>,
    deadline: Instant,
}

#[derive(Default)]
struct DecisionState {
    fence: FenceMemory,
    history: LsnHistory,
    /// When the two-primaries error was last logged (repeated once per check interval).
    conflict_logged: Option<Instant>,
    last_primary: Option<String>,
}

/// Owns the backends, their checkers, and the routing table.
pub struct Cluster {
    config: ArcSwap<Config>,
    backends: ArcSwap<Vec<Arc<Backend>>>,
    retired: Mutex<Vec<Retired>>,
    checkers: Mutex<HashMap<String, CancellationToken>>,
    state: Mutex<DecisionState>,
    routing: watch::Sender<Arc<RoutingTable>>,
    generation: AtomicU64,
    pub rr: AtomicUsize,
    /// Notified whenever a session ends, so sessions queued for a full backend re-check.
    pub slot_freed: Arc<tokio::sync::Notify>,
    token: CancellationToken,
    tracker: TaskTracker,
}

/// What `apply` changed, for logs and the reload result.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ConfigDiff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

impl Cluster {
    /// Creates the cluster and starts checking every configured backend.
    pub fn start(config: Config, token: CancellationToken, tracker: TaskTracker) -> Arc<Self> {
        let (routing, _) = watch::channel(Arc::new(RoutingTable::default()));
        let c = Arc::new(Cluster {
            config: ArcSwap::from_pointee(config.clone()),
            backends: ArcSwap::from_pointee(Vec::new()),
            retired: Mutex::new(Vec::new()),
            checkers: Mutex::new(HashMap::new()),
            state: Mutex::new(DecisionState::default()),
            routing,
            generation: AtomicU64::new(0),
            rr: AtomicUsize::new(0),
            slot_freed: Arc::new(tokio::sync::Notify::new()),
            token,
            tracker,
        });
        c.apply(config);
        c
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    pub fn backends(&self) -> Arc<Vec<Arc<Backend>>> {
        self.backends.load_full()
    }

    /// Backends removed from the config whose sessions are still draining.
    pub fn draining(&self) -> Vec<Arc<Backend>> {
        lock(&self.retired)
            .iter()
            .map(|r| r.backend.clone())
            .collect()
    }

    pub fn find(&self, name: &str) -> Option<Arc<Backend>> {
        self.backends().iter().find(|b| b.name == name).cloned()
    }

    pub fn routing(&self) -> Arc<RoutingTable> {
        self.routing.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<RoutingTable>> {
        self.routing.subscribe()
    }

    /// Applies a validated config: new backends start checking, removed ones drain, changed
    /// ones take their new address and weight, settings apply to the next decision. Backend
    /// state (health, admin state, counters) carries over by name.
    pub fn apply(self: &Arc<Self>, config: Config) -> ConfigDiff {
        let mut diff = ConfigDiff::default();
        let old = self.backends();
        let drain_timeout = config.proxy.drain_timeout;
        let mut next = Vec::with_capacity(config.backends.len());
        {
            let mut retired = lock(&self.retired);
            for bc in &config.backends {
                let existing = old.iter().find(|b| b.name == bc.name).cloned().or_else(|| {
                    // Re-added while still draining: keep its sessions and counters.
                    let pos = retired.iter().position(|r| r.backend.name == bc.name)?;
                    let b = retired.remove(pos).backend;
                    b.set_retired(false);
                    Some(b)
                });
                match existing {
                    Some(b) => {
                        if *b.config() != *bc {
                            diff.changed.push(bc.name.clone());
                            b.set_config(bc.clone());
                        }
                        next.push(b);
                    }
                    None => {
                        diff.added.push(bc.name.clone());
                        next.push(Backend::new(bc.clone()));
                    }
                }
            }
            for b in old.iter() {
                if !config.backends.iter().any(|bc| bc.name == b.name) {
                    diff.removed.push(b.name.clone());
                    b.set_retired(true);
                    retired.push(Retired {
                        backend: b.clone(),
                        deadline: Instant::now() + drain_timeout,
                    });
                }
            }
        }
        self.config.store(Arc::new(config));
        // Order matters: checkers for new backends first, then one swap of the backend list and
        // the routing table, then stop checkers of removed ones.
        for b in &next {
            self.ensure_checker(b);
        }
        self.backends.store(Arc::new(next));
        self.generation.fetch_add(1, Ordering::Relaxed);
        self.recompute();
        {
            let mut checkers = lock(&self.checkers);
            for name in &diff.removed {
                if let Some(t) = checkers.remove(name) {
                    t.cancel();
                }
            }
        }
        diff
    }

    fn ensure_checker(self: &Arc<Self>, b: &Arc<Backend>) {
        let mut checkers = lock(&self.checkers);
        if checkers.contains_key(&b.name) {
            return;
        }
        let token = self.token.child_token();
        checkers.insert(b.name.clone(), token.clone());
        let weak = Arc::downgrade(self);
        let weak2 = weak.clone();
        let fallback = self.config();
        self.tracker.spawn(backend::run_checker(
            b.clone(),
            move || {
                weak.upgrade()
                    .map(|c| c.config())
                    .unwrap_or(fallback.clone())
            },
            move || {
                if let Some(c) = weak2.upgrade() {
                    c.recompute();
                }
            },
            token,
        ));
    }

    /// Recomputes roles, lag and eligibility from the latest check results and publishes the
    /// routing table if it changed. Cheap; called after every check and every config change.
    pub fn recompute(&self) {
        let cfg = self.config();
        let backends = self.backends();
        let now = Instant::now();
        let statuses: Vec<_> = backends.iter().map(|b| b.status()).collect();
        let views: Vec<NodeView> = statuses
            .iter()
            .map(|s| NodeView {
                up: s.health.is_up(),
                in_recovery: s.report.as_ref().is_some_and(|r| r.in_recovery),
                timeline: s.report.as_ref().and_then(|r| r.timeline),
                system_id: s.report.as_ref().and_then(|r| r.system_id),
            })
            .collect();

        let mut st = lock(&self.state);
        let decision = decide_roles(&views, &mut st.fence);
        match (&decision.conflict, st.conflict_logged) {
            (Some(c), last) if last.is_none_or(|t| now.duration_since(t) >= cfg.check.interval) => {
                let who: Vec<_> = decision
                    .roles
                    .iter()
                    .zip(backends.iter())
                    .zip(views.iter())
                    .filter(|((r, _), v)| **r == Role::Fenced && v.up && !v.in_recovery)
                    .map(|((_, b), v)| format!("{} (timeline {})", b.name, v.timeline.unwrap_or(0)))
                    .collect();
                error!(conflict = %c, servers = ?who, "two writable primaries on the same timeline: refusing writes until one is gone");
                st.conflict_logged = Some(now);
            }
            (None, Some(_)) => {
                info!("primary conflict resolved");
                st.conflict_logged = None;
            }
            _ => {}
        }
        let primary = decision.primary.map(|i| backends[i].clone());
        let primary_pos = decision
            .primary
            .and_then(|i| statuses[i].report.as_ref().and_then(|r| r.current_lsn));
        let primary_sysid = decision.primary.and_then(|i| views[i].system_id);
        if let Some(lsn) = primary_pos {
            st.history.push(now, lsn);
        }
        let reference = primary_pos.or_else(|| {
            statuses
                .iter()
                .filter(|s| s.health.is_up())
                .filter_map(|s| s.report.as_ref().and_then(|r| r.position()))
                .max()
        });
        let new_primary = primary.as_ref().map(|p| p.name.clone());
        if new_primary != st.last_primary {
            match &new_primary {
                Some(p) => info!(backend = %p, "primary is now {p}"),
                None => warn!(previous = ?st.last_primary, "no primary available"),
            }
            st.last_primary = new_primary;
        }

        let mut readers = Vec::new();
        for (i, b) in backends.iter().enumerate() {
            let role = decision.roles[i];
            let s = &statuses[i];
            let mut lag_bytes = None;
            let mut lag_seconds = None;
            let mut eligible = false;
            if role == Role::Replica {
                let replayed = s.report.as_ref().and_then(|r| r.position());
                if let (Some(reference), Some(replayed)) = (reference, replayed) {
                    lag_bytes = Some(replayed.bytes_until(reference));
                }
                if let (Some(_), Some(replayed)) = (primary_pos, replayed) {
                    lag_seconds = Some(st.history.lag_seconds(replayed, now));
                }
                let same_cluster = match (primary_sysid, views[i].system_id) {
                    (Some(p), Some(r)) => p == r,
                    _ => true,
                };
                eligible = same_cluster
                    && read_eligible(
                        s.read_eligible,
                        lag_bytes,
                        lag_seconds,
                        cfg.read.max_lag,
                        cfg.read.max_lag_time,
                    );
                if eligible != s.read_eligible {
                    if eligible {
                        info!(backend = %b.name, lag_bytes, lag_seconds, "replica back within lag limits: takes reads again");
                    } else {
                        warn!(backend = %b.name, lag_bytes, lag_seconds, max_lag = cfg.read.max_lag, max_lag_seconds = cfg.read.max_lag_time.as_secs_f64(), "replica over lag limits: no new read sessions");
                    }
                }
                if eligible && b.admin_state() == AdminState::Enabled {
                    readers.push(b.clone());
                }
            }
            b.with_status(|bs| {
                if bs.role != role {
                    if bs.health.is_up() {
                        if role == Role::Fenced {
                            warn!(backend = %b.name, from = bs.role.as_str(), timeline = ?views[i].timeline, "backend fenced: writable but not the newest primary");
                        } else {
                            info!(backend = %b.name, from = bs.role.as_str(), to = role.as_str(), "role changed");
                        }
                    }
                    bs.role = role;
                    bs.since = now;
                }
                // Keep the hysteresis memory only while it means something.
                bs.read_eligible = if role == Role::Replica { eligible } else { true };
                bs.lag_bytes = lag_bytes;
                bs.lag_seconds = lag_seconds;
            });
        }
        drop(st);

        let primary = primary.filter(|p| p.admin_state() == AdminState::Enabled);
        let mut cut: Vec<String> = backends
            .iter()
            .filter(|b| b.admin_state() == AdminState::Disabled)
            .map(|b| b.name.clone())
            .collect();
        let mut all: Vec<Arc<Backend>> = backends.iter().cloned().collect();
        {
            let mut retired = lock(&self.retired);
            // Forget a removed backend once its last session is gone.
            retired.retain(|r| r.backend.active_sessions() > 0);
            for r in retired.iter() {
                all.push(r.backend.clone());
                if now >= r.deadline {
                    cut.push(r.backend.name.clone());
                }
            }
        }
        let table = RoutingTable {
            primary,
            readers,
            fallback_to_primary: cfg.read.fallback_to_primary,
            balance: cfg.read.balance,
            close_on_writer_change: cfg.proxy.close_on_writer_change,
            cut,
            all,
        };
        self.routing.send_if_modified(|cur| {
            if **cur == table {
                false
            } else {
                *cur = Arc::new(table);
                true
            }
        });
    }

    /// Check settings of the current config, for sessions reporting connect failures.
    pub fn rise_fall(&self) -> (u32, u32) {
        let c = self.config();
        (c.check.rise, c.check.fall)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn backends(n: usize) -> Vec<Arc<Backend>> {
        (0..n)
            .map(|i| {
                Backend::new(crate::config::BackendConfig {
                    name: format!("b{i}"),
                    address: "127.0.0.1:1".into(),
                    weight: if i == 0 { 3 } else { 1 },
                    priority: 100,
                    no_failover: false,
                    maxconn: 0,
                })
            })
            .collect()
    }

    #[test]
    fn roundrobin_honours_weights() {
        let bs = backends(2);
        let rr = AtomicUsize::new(0);
        let mut counts = [0; 2];
        for _ in 0..400 {
            let first = &order_readers(&bs, Balance::Roundrobin, &rr)[0];
            counts[if first.name == "b0" { 0 } else { 1 }] += 1;
        }
        assert_eq!(counts, [300, 100]);
    }

    #[test]
    fn leastconn_prefers_fewer_sessions_per_weight() {
        let bs = backends(2);
        let rr = AtomicUsize::new(0);
        // b0 (weight 3) has 2 sessions, b1 (weight 1) has 1: 2/3 < 1/1, b0 first.
        bs[0]
            .counters(PortRole::Read)
            .active
            .store(2, Ordering::Relaxed);
        bs[1]
            .counters(PortRole::Read)
            .active
            .store(1, Ordering::Relaxed);
        for _ in 0..4 {
            assert_eq!(order_readers(&bs, Balance::Leastconn, &rr)[0].name, "b0");
        }
        bs[0]
            .counters(PortRole::Read)
            .active
            .store(4, Ordering::Relaxed);
        assert_eq!(order_readers(&bs, Balance::Leastconn, &rr)[0].name, "b1");
    }

    #[test]
    fn leastconn_ties_alternate() {
        let bs = backends(2);
        let rr = AtomicUsize::new(0);
        let a = order_readers(&bs, Balance::Leastconn, &rr)[0].name.clone();
        let b = order_readers(&bs, Balance::Leastconn, &rr)[0].name.clone();
        assert_ne!(a, b);
    }

    #[test]
    fn write_sessions_are_kept_only_on_the_primary() {
        let bs = backends(2);
        let t = RoutingTable {
            primary: Some(bs[0].clone()),
            close_on_writer_change: true,
            ..Default::default()
        };
        assert!(t.keeps(PortRole::Write, "b0"));
        assert!(!t.keeps(PortRole::Write, "b1"));
        assert!(t.keeps(PortRole::Read, "b1"));
        let t = RoutingTable {
            close_on_writer_change: false,
            cut: vec!["b1".into()],
            ..t
        };
        assert!(t.keeps(PortRole::Write, "b0"));
        assert!(!t.keeps(PortRole::Read, "b1"));
    }
}
