//! `View`: the one shape of pglb's control-plane state. The control task (`control`) builds it
//! from every backend's check results and publishes it as an `Arc<View>` on one `watch` channel;
//! sessions route by it, the stats page, `/stats.json`, `/metrics` and `/health` render it, the
//! promoter reads it back from `/stats.json`, and so do the integration tests.
//!
//! Its serde form *is* the documented `/stats.json` schema: field names are stable. The few
//! runtime parts sessions need (backend handles with their live counters, the config the View was
//! decided under) are skipped by serde and present only in a published View.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, Role};
use crate::config::{Balance, Config};
use crate::proxy::PortRole;

/// Operator's say over a backend, set through the admin API; survives reloads that keep it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    #[default]
    Enabled,
    /// No new sessions; open ones stay.
    Drain,
    /// No new sessions; open ones are closed.
    Disabled,
}

impl AdminState {
    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Enabled => "enabled",
            AdminState::Drain => "drain",
            AdminState::Disabled => "disabled",
        }
    }
}

/// Whether a backend takes new sessions at all, apart from its role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Up,
    #[default]
    Down,
    /// Admin drain, or removed from the config with sessions still open.
    Draining,
    /// Admin disabled: its sessions are closed.
    Disabled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Up => "up",
            Status::Down => "down",
            Status::Draining => "draining",
            Status::Disabled => "disabled",
        }
    }
}

/// Why a backend does or does not take new sessions, apart from its role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    /// Checks pass.
    Ok,
    /// The kept check connection answers but new logins are refused with 53300: the server is
    /// at `max_connections`. Still the primary or a replica; new sessions get the server's own
    /// error.
    Full,
    /// The kept check connection answers but a fresh login is refused otherwise (password or
    /// `pg_hba.conf` changed, ...).
    LoginRefused,
    /// Up, but its last check failed (not yet `fall` failures in a row).
    Suspect,
    /// Failed `fall` checks in a row (or never checked successfully): no new sessions. Open
    /// sessions stay until the server ends them or routing has evidence it is not the primary.
    #[default]
    Down,
}

impl Condition {
    pub fn as_str(self) -> &'static str {
        match self {
            Condition::Ok => "ok",
            Condition::Full => "full",
            Condition::LoginRefused => "login_refused",
            Condition::Suspect => "suspect",
            Condition::Down => "down",
        }
    }
}

impl PartialEq<&str> for Status {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<&str> for Role {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

pub use crate::reload::{ReloadResult, ReloadStatus};

/// Session counters of one backend on one port (live values, filled in by `View::live`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, Default, PartialEq)]
pub struct PortView {
    pub sessions_active: u64,
    pub sessions_total: u64,
    pub sessions_max: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// One backend as pglb sees it.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct BackendView {
    pub name: String,
    pub address: String,
    pub weight: u32,
    /// Sessions this backend takes over both ports; 0 = no limit.
    #[serde(default)]
    pub maxconn: u64,
    /// primary, replica, fenced or unknown.
    pub role: Role,
    /// Why it is fenced (role "fenced" only).
    #[serde(default)]
    pub fence_reason: Option<FenceReason>,
    /// up, down, draining (admin drain or removed from the config) or disabled.
    pub state: Status,
    /// ok, full, login_refused, suspect or down: the checks' view, apart from role and admin.
    #[serde(default)]
    pub condition: Condition,
    /// Why the last fresh check login was refused while the kept connection answered.
    #[serde(default)]
    pub login_error: Option<String>,
    pub admin_state: AdminState,
    pub seconds_since_change: f64,
    pub in_recovery: Option<bool>,
    pub timeline: Option<u32>,
    pub system_id: Option<String>,
    /// Primary: current WAL position. Replica: replayed position.
    pub lsn: Option<String>,
    pub receive_lsn: Option<String>,
    pub lag_bytes: Option<u64>,
    pub lag_seconds: Option<f64>,
    pub read_eligible: bool,
    pub streaming: Option<bool>,
    /// Replica: the backend (by name, or `host:port` when it is none of ours) it streams from.
    #[serde(default)]
    pub upstream: Option<String>,
    pub check_latency_ms: Option<f64>,
    pub last_check_unix: Option<f64>,
    /// Seconds since a check last got an answer from it (none yet: null). A hung server's age
    /// grows from its last answer while its checks are still in flight: the promoter reads it
    /// to tell a pglb that still hears the primary from one that only has not marked it down.
    #[serde(default)]
    pub seconds_since_answer: Option<f64>,
    pub last_error: Option<String>,
    pub last_error_kind: Option<String>,
    /// Sessions on this backend, over both ports.
    pub sessions_active: u64,
    pub write: PortView,
    pub read: PortView,
    /// When up/down or the role last changed (for `seconds_since_change`).
    #[serde(skip)]
    pub since: Option<Instant>,
    /// When a check last got an answer (for `seconds_since_answer`).
    #[serde(skip)]
    pub answered: Option<Instant>,
}

impl BackendView {
    pub fn port(&self, port: PortRole) -> &PortView {
        match port {
            PortRole::Write => &self.write,
            PortRole::Read => &self.read,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct Listen {
    pub write: String,
    pub read: String,
    pub stats: String,
}

/// Why a writable server is fenced (takes no sessions; its write sessions are closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FenceReason {
    /// Its timeline is below the newest one seen for its cluster: a primary that was replaced.
    StaleTimeline,
    /// Another server is writable on the same newest timeline, and no store says which one is
    /// the primary: neither takes writes.
    Conflict,
    /// The store records another server as the primary (`[store]`).
    NotRecorded,
}

impl FenceReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FenceReason::StaleTimeline => "stale_timeline",
            FenceReason::Conflict => "conflict",
            FenceReason::NotRecorded => "not_recorded",
        }
    }

    /// For people (the stats page).
    pub fn describe(self) -> &'static str {
        match self {
            FenceReason::StaleTimeline => "writable on an older timeline than the newest primary",
            FenceReason::Conflict => "another server is writable on the same timeline",
            FenceReason::NotRecorded => "writable, but the store records another primary",
        }
    }
}

/// How the primary recorded in the store decides writes (with `[store]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StoreRule {
    /// The store answers and records a primary: writes go only to that server, once it is
    /// writable on the recorded timeline or newer.
    Record,
    /// The store does not answer: writes go only to the last primary it recorded, for as long as
    /// pglb's checks find it writable on the recorded timeline or newer.
    LastRecord,
    /// The store answers and records no primary (no promoter has recorded one yet): pglb's own
    /// rule (the newest timeline) decides.
    NoRecord,
    /// The store does not answer and pglb has never read a record from it: no writes.
    #[default]
    Unreachable,
}

impl StoreRule {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreRule::Record => "record",
            StoreRule::LastRecord => "last_record",
            StoreRule::NoRecord => "no_record",
            StoreRule::Unreachable => "unreachable",
        }
    }
}

/// Why the store's rule leaves the write port without a primary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WriteBlock {
    /// The store does not answer and no record was ever read from it: any writable server could
    /// be one the store does not record.
    StoreUnreachable,
    /// The recorded primary is not one of the configured backends.
    NotConfigured { name: String },
    /// The recorded primary fails its checks (or was never checked).
    RecordedDown { name: String },
    /// The recorded primary is still in recovery (a promotion under way).
    RecordedInRecovery { name: String },
    /// The recorded primary is writable on a timeline older than the record's.
    RecordedBehind {
        name: String,
        timeline: u32,
        recorded_timeline: u32,
    },
}

impl std::fmt::Display for WriteBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteBlock::StoreUnreachable => {
                f.write_str("the store does not answer and no primary was ever read from it")
            }
            WriteBlock::NotConfigured { name } => {
                write!(f, "the store records {name}, which is not a configured backend")
            }
            WriteBlock::RecordedDown { name } => write!(f, "the recorded primary {name} is down"),
            WriteBlock::RecordedInRecovery { name } => {
                write!(f, "the recorded primary {name} is still in recovery")
            }
            WriteBlock::RecordedBehind {
                name,
                timeline,
                recorded_timeline,
            } => write!(
                f,
                "the recorded primary {name} is on timeline {timeline}, the store records {recorded_timeline}"
            ),
        }
    }
}

/// The primary recorded in the store, as pglb last read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordView {
    pub name: String,
    pub timeline: u32,
    pub epoch: u64,
    /// The store's revision of the record.
    pub revision: i64,
}

/// `[store]` as pglb follows it (present only with a store).
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct StoreView {
    /// "etcd".
    pub kind: String,
    /// Client URLs, without credentials.
    pub endpoints: Vec<String>,
    pub prefix: String,
    /// Whether the store answered pglb's last read.
    pub reachable: bool,
    /// The recorded primary (the last one read while the store does not answer); null: none.
    pub recorded: Option<RecordView>,
    /// How writes are decided now.
    pub rule: StoreRule,
    /// Why the write port has no primary because of the store; null when it does not.
    pub write_block: Option<WriteBlock>,
    /// Seconds since the store last answered; null: never since start.
    pub seconds_since_answer: Option<f64>,
    /// Failed reads since start.
    pub errors: u64,
    /// The last failed read (kept after the store answers again).
    pub last_error: Option<String>,
    /// `connect`, `etcd`, `timeout`, `decode`, ...: the last error's kind.
    pub last_error_kind: Option<String>,
    /// When the store last answered (for `seconds_since_answer`).
    #[serde(skip)]
    pub last_answer: Option<Instant>,
}

/// What sessions need beyond the serialised state; present only in a published View.
#[derive(Debug, Clone, Default)]
pub struct Routing {
    /// The config this View was decided under.
    pub config: Option<Arc<Config>>,
    /// One handle per entry of `View::backends`, same order: live counters and session slots.
    pub handles: Vec<Arc<Backend>>,
    /// Indexes into `backends` of the replicas taking new read sessions, in config order.
    pub readers: Vec<usize>,
    /// Index of the primary taking writes (enabled, not fenced).
    pub primary: Option<usize>,
    pub balance: Balance,
    pub close_on_writer_change: bool,
    /// Backends whose open sessions must be closed now (disabled, or removed and past
    /// `drain_timeout`).
    pub cut: Vec<String>,
    /// Backends whose open write-port sessions may go on: the primary, and a primary that stopped
    /// answering checks while nothing says it stopped being the primary.
    pub keep_writes: Vec<String>,
    /// When the process started (for `uptime_seconds`).
    pub started: Option<Instant>,
    /// New sessions waiting for a backend right now (live, for `sessions_waiting`).
    pub waiting: Arc<std::sync::atomic::AtomicU64>,
}

/// The control plane's state at one moment.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct View {
    pub version: String,
    pub uptime_seconds: f64,
    pub config_file: String,
    pub generation: u64,
    pub reload: ReloadStatus,
    /// Name of the backend that takes writes, or null.
    pub primary: Option<String>,
    /// Replicas taking new read sessions.
    pub readers: Vec<String>,
    /// Reads go to the primary when no replica qualifies.
    pub fallback_to_primary: bool,
    /// New sessions waiting for a backend on a port that has none (`wait_for_backend`).
    #[serde(default)]
    pub sessions_waiting: u64,
    pub listen: Listen,
    /// Configured backends in config order, then removed ones still draining.
    pub backends: Vec<BackendView>,
    /// The store pglb follows for writes; null without `[store]`.
    #[serde(default)]
    pub store: Option<StoreView>,
    #[serde(skip)]
    pub routing: Routing,
}

/// A backend a new session may go to: its handle and what the View says of it.
pub struct Target<'a> {
    pub handle: &'a Arc<Backend>,
    pub view: &'a BackendView,
}

impl View {
    /// The config this View was decided under.
    ///
    /// # Panics
    /// On a View that was not published by the control task (e.g. one read back from JSON).
    pub fn config(&self) -> &Arc<Config> {
        self.routing
            .config
            .as_ref()
            .expect("a published View carries its config")
    }

    pub fn backend(&self, name: &str) -> Option<&BackendView> {
        self.backends.iter().find(|b| b.name == name)
    }

    /// Whether this View and `other` route sessions the same way and pace the checks alike:
    /// when they do, publishing `other` wakes no session and no checker.
    pub fn routes_like(&self, other: &View) -> bool {
        self.primary == other.primary
            // The checkers' pace (`checks_hurry`) follows at once too.
            && self.checks_hurry() == other.checks_hurry()
            && self.readers == other.readers
            && self.fallback_to_primary == other.fallback_to_primary
            && self.routing.balance == other.routing.balance
            && self.routing.close_on_writer_change == other.routing.close_on_writer_change
            && self.routing.cut == other.routing.cut
            && self.routing.keep_writes == other.routing.keep_writes
            && self.backends.len() == other.backends.len()
            && self
                .backends
                .iter()
                .zip(&other.backends)
                .all(|(a, b)| a.name == b.name && a.address == b.address)
    }

    /// A configured or draining backend by name, as a target (whatever its state).
    pub fn target_by_name(&self, name: &str) -> Option<Target<'_>> {
        let i = self.backends.iter().position(|b| b.name == name)?;
        self.target(i)
    }

    fn target(&self, i: usize) -> Option<Target<'_>> {
        Some(Target {
            handle: self.routing.handles.get(i)?,
            view: self.backends.get(i)?,
        })
    }

    /// Backends to try for a new session on `port` from `client`, best first.
    pub fn candidates(&self, port: PortRole, rr: &AtomicUsize, client: IpAddr) -> Vec<Target<'_>> {
        let primary = self.routing.primary.and_then(|i| self.target(i));
        match port {
            PortRole::Write => primary.into_iter().collect(),
            PortRole::Read => {
                let readers: Vec<_> = self
                    .routing
                    .readers
                    .iter()
                    .filter_map(|&i| self.target(i))
                    .collect();
                let mut out = order_readers(readers, self.routing.balance, rr, client);
                if self.fallback_to_primary {
                    out.extend(primary);
                }
                out
            }
        }
    }

    /// Whether an open session on `port` to `backend` may go on.
    pub fn keeps(&self, port: PortRole, backend: &str) -> bool {
        if self.routing.cut.iter().any(|n| n == backend) {
            return false;
        }
        match port {
            PortRole::Write if self.routing.close_on_writer_change => {
                self.routing.keep_writes.iter().any(|n| n == backend)
            }
            _ => true,
        }
    }

    /// Whether a port has no backend for new sessions (no primary, or no reader and no
    /// fallback).
    pub fn lacks_a_backend(&self) -> bool {
        let primary = self.routing.primary.is_some();
        !primary || (self.routing.readers.is_empty() && !self.fallback_to_primary)
    }

    /// Whether checks run at `check.fast_interval`: a port has no backend, or the primary's
    /// last check failed (it may be hung or gone: a promotion elsewhere is then seen within
    /// `fast_interval`, not a whole `interval`).
    pub fn checks_hurry(&self) -> bool {
        self.lacks_a_backend()
            || self
                .primary
                .as_deref()
                .and_then(|p| self.backends.iter().find(|b| b.name == p))
                .is_some_and(|b| b.condition == Condition::Suspect)
    }

    /// Sessions open over every backend, configured or draining.
    pub fn active_sessions(&self) -> u64 {
        self.routing
            .handles
            .iter()
            .map(|h| h.active_sessions())
            .sum()
    }

    /// A copy with the live values filled in: session and byte counters, ages, uptime.
    pub fn live(&self) -> View {
        let mut v = self.clone();
        let now = Instant::now();
        v.sessions_waiting = self.routing.waiting.load(Ordering::Relaxed);
        if let Some(started) = self.routing.started {
            v.uptime_seconds = now.saturating_duration_since(started).as_secs_f64();
        }
        if let Some(st) = &mut v.store {
            st.seconds_since_answer = st
                .last_answer
                .map(|t| now.saturating_duration_since(t).as_secs_f64());
        }
        for (b, h) in v.backends.iter_mut().zip(&self.routing.handles) {
            b.write = h.port_view(PortRole::Write);
            b.read = h.port_view(PortRole::Read);
            b.sessions_active = h.active_sessions();
            if let Some(since) = b.since {
                b.seconds_since_change = now.saturating_duration_since(since).as_secs_f64();
            }
            b.seconds_since_answer = b
                .answered
                .map(|t| now.saturating_duration_since(t).as_secs_f64());
        }
        v
    }
}

/// Orders readers by the balance algorithm, honouring weights. The first is the choice; the rest
/// are the fallbacks if it refuses the connection.
fn order_readers<'a>(
    mut readers: Vec<Target<'a>>,
    balance: Balance,
    rr: &AtomicUsize,
    client: IpAddr,
) -> Vec<Target<'a>> {
    if readers.is_empty() {
        return readers;
    }
    if balance == Balance::Source {
        // Weighted rendezvous hashing: each reader scores the address, highest first. The
        // order depends only on the address, the readers' names and weights: the same on every
        // thread and every pglb, and when a reader leaves only its own clients move.
        let mut keyed: Vec<_> = readers
            .into_iter()
            .map(|t| (source_score(client, &t.view.name, t.view.weight), t))
            .collect();
        keyed.sort_by(|(a, _), (b, _)| b.total_cmp(a));
        return keyed.into_iter().map(|(_, t)| t).collect();
    }
    let tick = rr.fetch_add(1, Ordering::Relaxed);
    let n = readers.len();
    match balance {
        Balance::Source => unreachable!("ordered above"),
        Balance::Leastconn => {
            // Rotate first so that ties (the common case with short sessions) spread evenly.
            readers.rotate_left(tick % n);
            // Read each backend's count once, so the sort sees one consistent set of numbers.
            let mut keyed: Vec<_> = readers
                .into_iter()
                .map(|t| (t.handle.port_active(PortRole::Read), t))
                .collect();
            keyed.sort_by(|(ca, a), (cb, b)| {
                let wa = a.view.weight.max(1) as u128;
                let wb = b.view.weight.max(1) as u128;
                // ca / wa  vs  cb / wb, without floats.
                (*ca as u128 * wb).cmp(&(*cb as u128 * wa))
            });
            keyed.into_iter().map(|(_, t)| t).collect()
        }
        Balance::Roundrobin => {
            let total: u64 = readers.iter().map(|t| t.view.weight.max(1) as u64).sum();
            let mut slot = tick as u64 % total;
            let mut first = 0;
            for (i, t) in readers.iter().enumerate() {
                let w = t.view.weight.max(1) as u64;
                if slot < w {
                    first = i;
                    break;
                }
                slot -= w;
            }
            readers.rotate_left(first);
            readers
        }
    }
}

/// A reader's score for a client address under `balance = "source"`: `weight / -ln(u)` with `u`
/// uniform in (0, 1) from a fixed hash of the address and the reader's name, so the reader with
/// the highest score is chosen with probability proportional to its weight.
fn source_score(client: IpAddr, name: &str, weight: u32) -> f64 {
    // FNV-1a over the canonical address and the name, then a 64-bit finaliser (splitmix64):
    // fixed, so the choice survives restarts and agrees between pglb instances.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    match client.to_canonical() {
        IpAddr::V4(a) => eat(&a.octets()),
        IpAddr::V6(a) => eat(&a.octets()),
    }
    eat(&[0xff]);
    eat(name.as_bytes());
    let mut z = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    // 53 random bits, never 0 nor 1.
    let u = ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    f64::from(weight.max(1)) / -u.ln()
}

/// Unix time in seconds, for the JSON.
pub fn unix(t: SystemTime) -> Option<f64> {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn view(weights: &[u32]) -> View {
        let mut v = View::default();
        for (i, w) in weights.iter().enumerate() {
            let name = format!("b{i}");
            v.backends.push(BackendView {
                name: name.clone(),
                weight: *w,
                ..Default::default()
            });
            v.routing.handles.push(Backend::new(&name));
            v.routing.readers.push(i);
        }
        v
    }

    #[test]
    fn roundrobin_honours_weights() {
        let mut v = view(&[3, 1]);
        v.routing.balance = Balance::Roundrobin;
        let rr = AtomicUsize::new(0);
        let mut counts = [0; 2];
        for _ in 0..400 {
            let first = &v.candidates(PortRole::Read, &rr, LOCAL)[0];
            counts[if first.view.name == "b0" { 0 } else { 1 }] += 1;
        }
        assert_eq!(counts, [300, 100]);
    }

    #[test]
    fn leastconn_prefers_fewer_sessions_per_weight() {
        let v = view(&[3, 1]);
        let rr = AtomicUsize::new(0);
        // b0 (weight 3) has 2 sessions, b1 (weight 1) has 1: 2/3 < 1/1, b0 first.
        v.routing.handles[0].set_port_active(PortRole::Read, 2);
        v.routing.handles[1].set_port_active(PortRole::Read, 1);
        for _ in 0..4 {
            assert_eq!(v.candidates(PortRole::Read, &rr, LOCAL)[0].view.name, "b0");
        }
        v.routing.handles[0].set_port_active(PortRole::Read, 4);
        assert_eq!(v.candidates(PortRole::Read, &rr, LOCAL)[0].view.name, "b1");
    }

    #[test]
    fn leastconn_ties_alternate() {
        let v = view(&[1, 1]);
        let rr = AtomicUsize::new(0);
        let a = v.candidates(PortRole::Read, &rr, LOCAL)[0]
            .view
            .name
            .clone();
        let b = v.candidates(PortRole::Read, &rr, LOCAL)[0]
            .view
            .name
            .clone();
        assert_ne!(a, b);
    }

    #[test]
    fn source_is_stable_per_address_and_honours_weights() {
        let mut v = view(&[3, 1, 1]);
        v.routing.balance = Balance::Source;
        let rr = AtomicUsize::new(0);
        let first =
            |v: &View, ip: IpAddr| v.candidates(PortRole::Read, &rr, ip)[0].view.name.clone();
        let mut counts = std::collections::HashMap::<String, u32>::new();
        let mut before = Vec::new();
        for i in 0..5000u32 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            let a = first(&v, ip);
            // The same address, asked again (any thread, any tick): the same reader.
            assert_eq!(first(&v, ip), a);
            *counts.entry(a.clone()).or_default() += 1;
            before.push((ip, a));
        }
        // Weight 3 of 5: about 3000; weight 1: about 1000 each.
        assert!((2700..3300).contains(&counts["b0"]), "{counts:?}");
        assert!((800..1200).contains(&counts["b1"]), "{counts:?}");
        // b2 leaves the readers: only its clients move.
        v.routing.readers = vec![0, 1];
        for (ip, was) in &before {
            let now = first(&v, *ip);
            if was != "b2" {
                assert_eq!(&now, was);
            }
        }
        // The IPv4-mapped form of an address is the address.
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.7".parse().unwrap();
        assert_eq!(first(&v, ip), first(&v, mapped));
    }

    #[test]
    fn fallback_puts_the_primary_last() {
        let mut v = view(&[1, 1]);
        v.routing.readers = vec![1];
        v.routing.primary = Some(0);
        v.primary = Some("b0".into());
        v.fallback_to_primary = true;
        let rr = AtomicUsize::new(0);
        let names: Vec<_> = v
            .candidates(PortRole::Read, &rr, LOCAL)
            .iter()
            .map(|t| t.view.name.clone())
            .collect();
        assert_eq!(names, ["b1", "b0"]);
        let w: Vec<_> = v
            .candidates(PortRole::Write, &rr, LOCAL)
            .iter()
            .map(|t| t.view.name.clone())
            .collect();
        assert_eq!(w, ["b0"]);
    }

    #[test]
    fn write_sessions_are_kept_only_on_the_primary() {
        let mut v = view(&[1, 1]);
        v.primary = Some("b0".into());
        v.routing.keep_writes = vec!["b0".into()];
        v.routing.close_on_writer_change = true;
        assert!(v.keeps(PortRole::Write, "b0"));
        assert!(!v.keeps(PortRole::Write, "b1"));
        assert!(v.keeps(PortRole::Read, "b1"));
        v.routing.close_on_writer_change = false;
        v.routing.cut = vec!["b1".into()];
        assert!(v.keeps(PortRole::Write, "b0"));
        assert!(!v.keeps(PortRole::Read, "b1"));
    }

    #[test]
    fn checks_hurry_without_a_primary_or_while_the_primarys_checks_fail() {
        let mut v = view(&[1, 1]);
        v.fallback_to_primary = true;
        assert!(v.checks_hurry(), "no primary");
        v.primary = Some("b0".into());
        v.routing.primary = Some(0);
        assert!(!v.checks_hurry());
        // Its last check failed (a timeout on a hung server): a promotion elsewhere is looked
        // for at fast_interval.
        v.backends[0].condition = Condition::Suspect;
        assert!(v.checks_hurry());
        // Full (a refused fresh login while the kept connection answers) is no reason.
        v.backends[0].condition = Condition::Full;
        assert!(!v.checks_hurry());
        // A replica's failed check is none either.
        v.backends[0].condition = Condition::Ok;
        v.backends[1].condition = Condition::Suspect;
        assert!(!v.checks_hurry());
    }

    #[test]
    fn the_json_round_trips_with_the_documented_names() {
        let mut v = view(&[1]);
        v.primary = Some("b0".into());
        v.backends[0].role = Role::Primary;
        v.backends[0].state = Status::Up;
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["primary"], "b0");
        assert_eq!(json["backends"][0]["role"], "primary");
        assert_eq!(json["backends"][0]["state"], "up");
        assert_eq!(json["backends"][0]["admin_state"], "enabled");
        let back: View = serde_json::from_value(json).unwrap();
        assert_eq!(
            back.backends,
            v.backends
                .iter()
                .cloned()
                .map(|mut b| {
                    b.since = None;
                    b
                })
                .collect::<Vec<_>>()
        );
        assert_eq!(back.primary, v.primary);
    }
}
