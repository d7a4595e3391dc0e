//! One configured PostgreSQL server as pglb sees it: its config, its check status (health, last
//! report, last error, role and lag as decided by `routing`), its admin state and its session
//! counters. The checker task that feeds it lives here; deciding roles across backends does not.

pub mod health;
pub mod net;
pub mod probe;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::Notify;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::BackendConfig;
use health::{HealthState, Transition};
use probe::{ProbeError, ProbeReport};

/// What a backend is, as decided from all backends' checks together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Not checked successfully yet, or down.
    #[default]
    Unknown,
    Primary,
    Replica,
    /// Writable but not to be used: a stale primary from before a promotion, or one of two
    /// primaries on the same timeline.
    Fenced,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Unknown => "unknown",
            Role::Primary => "primary",
            Role::Replica => "replica",
            Role::Fenced => "fenced",
        }
    }
}

/// Which listener a session came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PortRole {
    Write,
    Read,
}

impl PortRole {
    pub fn as_str(self) -> &'static str {
        match self {
            PortRole::Write => "write",
            PortRole::Read => "read",
        }
    }
    fn idx(self) -> usize {
        match self {
            PortRole::Write => 0,
            PortRole::Read => 1,
        }
    }
}

/// Operator's say over a backend, set through the admin API; survives reloads that keep it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    Enabled,
    /// No new sessions; open ones stay.
    Drain,
    /// No new sessions; open ones are closed.
    Disabled,
}

/// Session counters of one backend on one port.
#[derive(Debug, Default)]
pub struct PortCounters {
    pub active: AtomicU64,
    pub total: AtomicU64,
    pub max: AtomicU64,
    /// Client to backend.
    pub bytes_in: AtomicU64,
    /// Backend to client.
    pub bytes_out: AtomicU64,
}

/// Check results and what `routing` decided from them.
#[derive(Debug, Clone)]
pub struct BackendStatus {
    pub health: HealthState,
    pub report: Option<ProbeReport>,
    pub last_error: Option<ProbeError>,
    pub last_check: Option<SystemTime>,
    pub check_latency: Option<Duration>,
    /// When up/down or the role last changed.
    pub since: Instant,
    pub role: Role,
    pub read_eligible: bool,
    pub lag_bytes: Option<u64>,
    pub lag_seconds: Option<f64>,
}

impl Default for BackendStatus {
    fn default() -> Self {
        Self {
            health: HealthState::default(),
            report: None,
            last_error: None,
            last_check: None,
            check_latency: None,
            since: Instant::now(),
            role: Role::Unknown,
            read_eligible: true,
            lag_bytes: None,
            lag_seconds: None,
        }
    }
}

pub struct Backend {
    pub name: String,
    config: ArcSwap<BackendConfig>,
    status: Mutex<BackendStatus>,
    counters: [PortCounters; 2],
    admin: AtomicU8,
    /// Removed from the config; open sessions drain.
    retired: AtomicBool,
    /// Wakes the checker early (a session connect was refused).
    recheck: Notify,
    /// Sessions over both ports, reserved before connecting (the maxconn count).
    reserved: AtomicU64,
}

/// A reserved session on a backend: counted in the backend's active sessions (and its maxconn)
/// from reservation until dropped, on every exit path.
pub struct SessionSlot {
    backend: Arc<Backend>,
    port: PortRole,
    freed: Arc<Notify>,
    connected: bool,
}

impl SessionSlot {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    /// The backend connection is up: count the session.
    pub fn connected(&mut self) {
        let c = self.backend.counters(self.port);
        c.total.fetch_add(1, Ordering::Relaxed);
        c.max
            .fetch_max(c.active.load(Ordering::Relaxed), Ordering::Relaxed);
        crate::metrics::session_started(self.port, &self.backend.name);
        self.connected = true;
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        let c = self.backend.counters(self.port);
        c.active.fetch_sub(1, Ordering::Relaxed);
        self.backend.reserved.fetch_sub(1, Ordering::Relaxed);
        if self.connected {
            crate::metrics::session_ended(self.port, &self.backend.name);
        }
        // Queued sessions waiting for a slot re-check.
        self.freed.notify_waiters();
    }
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Backend {
    pub fn new(config: BackendConfig) -> Arc<Self> {
        Arc::new(Backend {
            name: config.name.clone(),
            config: ArcSwap::from_pointee(config),
            status: Mutex::new(BackendStatus::default()),
            counters: Default::default(),
            admin: AtomicU8::new(0),
            retired: AtomicBool::new(false),
            recheck: Notify::new(),
            reserved: AtomicU64::new(0),
        })
    }

    /// Reserves a session slot unless the backend is at its maxconn (0 = no limit).
    pub fn try_reserve(
        self: &Arc<Self>,
        port: PortRole,
        freed: &Arc<Notify>,
    ) -> Option<SessionSlot> {
        let max = self.config().maxconn;
        let mut cur = self.reserved.load(Ordering::Relaxed);
        loop {
            if max > 0 && cur >= max {
                return None;
            }
            match self.reserved.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        self.counters(port).active.fetch_add(1, Ordering::Relaxed);
        Some(SessionSlot {
            backend: self.clone(),
            port,
            freed: freed.clone(),
            connected: false,
        })
    }

    pub fn config(&self) -> Arc<BackendConfig> {
        self.config.load_full()
    }

    pub fn set_config(&self, config: BackendConfig) {
        self.config.store(Arc::new(config));
    }

    pub fn status(&self) -> BackendStatus {
        self.lock().clone()
    }

    /// Runs `f` with the status locked. Never held across an await.
    pub fn with_status<R>(&self, f: impl FnOnce(&mut BackendStatus) -> R) -> R {
        f(&mut self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BackendStatus> {
        // A panic while holding this lock leaves plain data behind; keep serving with it.
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn counters(&self, port: PortRole) -> &PortCounters {
        &self.counters[port.idx()]
    }

    pub fn active_sessions(&self) -> u64 {
        self.counters
            .iter()
            .map(|c| c.active.load(Ordering::Relaxed))
            .sum()
    }

    pub fn admin_state(&self) -> AdminState {
        match self.admin.load(Ordering::Relaxed) {
            1 => AdminState::Drain,
            2 => AdminState::Disabled,
            _ => AdminState::Enabled,
        }
    }

    pub fn set_admin_state(&self, s: AdminState) {
        let v = match s {
            AdminState::Enabled => 0,
            AdminState::Drain => 1,
            AdminState::Disabled => 2,
        };
        self.admin.store(v, Ordering::Relaxed);
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    pub fn set_retired(&self, r: bool) {
        self.retired.store(r, Ordering::Relaxed);
    }

    /// A session could not connect: count it as a failed check right away, and check again
    /// now rather than at the next tick.
    pub fn report_connect_failure(&self, err: ProbeError, rise: u32, fall: u32) {
        let t = {
            let mut st = self.lock();
            let t = st.health.record(false, rise, fall);
            st.last_error = Some(err.clone());
            if t.is_some() {
                st.since = Instant::now();
            }
            t
        };
        if t == Some(Transition::Down) {
            warn!(backend = %self.name, reason = %err, kind = err.kind(), "backend down (session connect failed)");
        }
        self.recheck.notify_one();
    }

    /// Records a check result; logs transitions. Returns whether up/down changed.
    fn record(&self, result: Result<ProbeReport, ProbeError>, rise: u32, fall: u32) -> bool {
        let mut st = self.lock();
        st.last_check = Some(SystemTime::now());
        let (t, err) = match result {
            Ok(report) => {
                st.check_latency = Some(report.latency);
                st.report = Some(report);
                st.last_error = None;
                (st.health.record(true, rise, fall), None)
            }
            Err(e) => {
                let t = st.health.record(false, rise, fall);
                st.last_error = Some(e.clone());
                (t, Some(e))
            }
        };
        let streak = st.health.streak();
        if t.is_some() {
            st.since = Instant::now();
        }
        drop(st);
        let address = self.config().address.clone();
        match (t, err) {
            (Some(Transition::Up), _) => {
                info!(backend = %self.name, %address, successes = streak, "backend up")
            }
            (Some(Transition::Down), Some(e)) => {
                warn!(backend = %self.name, %address, reason = %e, kind = e.kind(), failures = streak, "backend down")
            }
            (Some(Transition::Down), None) => {}
            (None, Some(e)) => {
                debug!(backend = %self.name, reason = %e, kind = e.kind(), failures = streak, "check failed")
            }
            (None, None) => {}
        }
        t.is_some()
    }
}

/// Checks one backend every `check.interval` until `token` is cancelled, and tells `on_result`
/// after each check so roles can be recomputed.
pub async fn run_checker(
    backend: Arc<Backend>,
    check: impl Fn() -> Arc<crate::config::Config>,
    on_result: impl Fn(),
    token: CancellationToken,
) {
    let mut period = check().check.interval;
    let mut last_local_warning: Option<std::time::Instant> = None;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tick.tick() => {}
            _ = backend.recheck.notified() => {}
        }
        let cfg = check();
        if cfg.check.interval != period {
            period = cfg.check.interval;
            tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        }
        let address = backend.config().address.clone();
        let started = std::time::Instant::now();
        let result = tokio::select! {
            _ = token.cancelled() => return,
            r = tokio::time::timeout(cfg.check.timeout, probe::probe(&address, &cfg.check)) => {
                r.unwrap_or(Err(ProbeError::Timeout(cfg.check.timeout)))
            }
        };
        crate::metrics::check_result(
            &backend.name,
            match &result {
                Ok(_) => "ok",
                Err(e) => e.kind(),
            },
            started.elapsed().as_secs_f64(),
        );
        if let Err(ProbeError::Local(reason)) = &result {
            // pglb's own shortage (e.g. out of descriptors while full of sessions) says nothing
            // about the backend: counting it would mark a healthy primary down and cut every
            // session on it. The state stays as it is until a check can run again.
            if last_local_warning.is_none_or(|t| t.elapsed() > std::time::Duration::from_secs(5)) {
                warn!(backend = %backend.name, %reason, "check could not run; backend state kept");
                last_local_warning = Some(std::time::Instant::now());
            }
            continue;
        }
        backend.record(result, cfg.check.rise, cfg.check.fall);
        on_result();
    }
}
