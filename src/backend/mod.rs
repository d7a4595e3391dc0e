//! One configured PostgreSQL server as the data path sees it: a `Backend` handle with its
//! session counters and slot reservations (atomics, shared by every worker thread), and the
//! checker task that probes it and sends the result to the control task. Health, role and lag
//! are decided by `control`, not here.

pub mod health;
pub mod net;
pub mod probe;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::control::{Event, Events};
use crate::proxy::PortRole;
use crate::view::{PortView, View};
use probe::ProbeError;

/// What a backend is, as decided from all backends' checks together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Not checked successfully yet, or down.
    #[default]
    Unknown,
    Primary,
    Replica,
    /// Writable but not to be used: a stale primary from before a promotion, one of two
    /// primaries on the same timeline, or (with `[store]`) a server the store does not record.
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

fn idx(port: PortRole) -> usize {
    match port {
        PortRole::Write => 0,
        PortRole::Read => 1,
    }
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

/// The data path's handle on one backend: counters and slot reservations. Kept by name across
/// reloads, so counters and open sessions carry over.
pub struct Backend {
    pub name: String,
    counters: [PortCounters; 2],
    /// Wakes the checker early (a session connect was refused).
    recheck: Notify,
    /// Sessions over both ports, reserved before connecting (the maxconn count).
    reserved: AtomicU64,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Sessions waiting for a slot on a full backend. A session that ends wakes them, but only when
/// there are any: ending a session takes no shared lock otherwise.
#[derive(Debug, Default)]
pub struct SlotWaiters {
    waiting: AtomicUsize,
    notify: Notify,
}

impl SlotWaiters {
    /// Registers a waiter until the guard drops. Register before looking for a slot, so that a
    /// slot freed in between is not missed.
    pub fn register(&self) -> WaiterGuard<'_> {
        // SeqCst pairs with the load in `freed`: either the freeing session sees this waiter and
        // notifies, or this waiter's next look sees the freed slot.
        self.waiting.fetch_add(1, Ordering::SeqCst);
        WaiterGuard(self)
    }

    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }

    fn freed(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.notify.notify_waiters();
        }
    }
}

pub struct WaiterGuard<'a>(&'a SlotWaiters);

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A reserved session on a backend: counted in the backend's active sessions (and its maxconn)
/// from reservation until dropped, on every exit path.
pub struct SessionSlot {
    backend: Arc<Backend>,
    port: PortRole,
    waiters: Arc<SlotWaiters>,
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
        self.backend.reserved.fetch_sub(1, Ordering::SeqCst);
        if self.connected {
            crate::metrics::session_ended(self.port, &self.backend.name);
        }
        self.waiters.freed();
    }
}

impl Backend {
    pub fn new(name: &str) -> Arc<Self> {
        Arc::new(Backend {
            name: name.to_string(),
            counters: Default::default(),
            recheck: Notify::new(),
            reserved: AtomicU64::new(0),
        })
    }

    /// Reserves a session slot unless the backend is at `maxconn` (0 = no limit).
    pub fn try_reserve(
        self: &Arc<Self>,
        port: PortRole,
        maxconn: u64,
        waiters: &Arc<SlotWaiters>,
    ) -> Option<SessionSlot> {
        let mut cur = self.reserved.load(Ordering::SeqCst);
        loop {
            if maxconn > 0 && cur >= maxconn {
                return None;
            }
            match self.reserved.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        self.counters(port).active.fetch_add(1, Ordering::Relaxed);
        Some(SessionSlot {
            backend: self.clone(),
            port,
            waiters: waiters.clone(),
            connected: false,
        })
    }

    pub fn counters(&self, port: PortRole) -> &PortCounters {
        &self.counters[idx(port)]
    }

    /// Open sessions on `port`.
    pub fn port_active(&self, port: PortRole) -> u64 {
        self.counters(port).active.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    pub fn set_port_active(&self, port: PortRole, n: u64) {
        self.counters(port).active.store(n, Ordering::Relaxed);
    }

    pub fn port_view(&self, port: PortRole) -> PortView {
        let c = self.counters(port);
        PortView {
            sessions_active: c.active.load(Ordering::Relaxed),
            sessions_total: c.total.load(Ordering::Relaxed),
            sessions_max: c.max.load(Ordering::Relaxed),
            bytes_in: c.bytes_in.load(Ordering::Relaxed),
            bytes_out: c.bytes_out.load(Ordering::Relaxed),
        }
    }

    pub fn active_sessions(&self) -> u64 {
        self.counters
            .iter()
            .map(|c| c.active.load(Ordering::Relaxed))
            .sum()
    }

    /// Checks again now rather than at the next tick (a session connect was refused).
    pub fn recheck(&self) {
        self.recheck.notify_one();
    }
}

/// The checks' common clock. Every checker ticks on one grid, `epoch + k × period`, so a single
/// wake-up of the control thread starts the checks of all backends, and the View is decided from
/// answers taken at the same moment. Checkers started at different times (a reload adding a
/// backend) still land on it; only a first check and a recheck run off the grid, at once.
#[derive(Debug, Clone, Copy)]
pub struct CheckGrid {
    epoch: tokio::time::Instant,
}

impl CheckGrid {
    pub fn new(epoch: tokio::time::Instant) -> CheckGrid {
        CheckGrid { epoch }
    }

    /// The first point of the grid of `period` strictly after `now`.
    pub fn next_after(&self, now: tokio::time::Instant, period: Duration) -> tokio::time::Instant {
        let period_ns = period.as_nanos().max(1);
        let since = now.saturating_duration_since(self.epoch).as_nanos();
        let k = since / period_ns + 1;
        let offset = u64::try_from(k * period_ns).unwrap_or(u64::MAX);
        self.epoch + Duration::from_nanos(offset)
    }
}

/// Checks one backend every `check.interval` on the common `grid` (every `check.fast_interval`
/// while a port has no backend or the primary's last check failed, so a new primary is seen at
/// once), reading its settings from the newest View, until `token` is cancelled; sends every
/// result to the control task.
pub async fn run_checker(
    backend: Arc<Backend>,
    grid: CheckGrid,
    mut view: watch::Receiver<Arc<View>>,
    events: Events,
    token: CancellationToken,
) {
    let period_of = |v: &View| {
        let c = &v.config().check;
        if v.checks_hurry() {
            c.fast_interval.min(c.interval)
        } else {
            c.interval
        }
    };
    let mut period = period_of(&view.borrow_and_update());
    let local_warning = crate::ratelimit::LogEvery::new(Duration::from_secs(5));
    let mut session = probe::CheckSession::default();
    // The first check at once; then on the grid.
    let mut due = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep_until(due) => {}
            _ = backend.recheck.notified() => {}
            r = view.changed() => {
                if r.is_err() {
                    return;
                }
                // Routing changed: a port may have lost (or found) its backend.
                let p = period_of(&view.borrow_and_update());
                if p != period {
                    // Faster now: check at once; slower: at the slower grid's next point.
                    let now = tokio::time::Instant::now();
                    due = if p < period { now } else { grid.next_after(now, p) };
                    period = p;
                }
                continue;
            }
        }
        let (cfg, address) = {
            let v = view.borrow();
            let address = v.backend(&backend.name).map(|b| b.address.clone());
            (v.config().clone(), address)
        };
        period = period_of(&view.borrow());
        // Whatever ends this round (a check, a removed backend), the next one is on the grid.
        let Some(address) = address else {
            // Removed from the config: the control task cancels this checker.
            due = grid.next_after(tokio::time::Instant::now(), period);
            continue;
        };
        let started = Instant::now();
        let outcome = tokio::select! {
            _ = token.cancelled() => return,
            r = tokio::time::timeout(cfg.check.timeout, session.check(&address, &cfg.check)) => {
                r.unwrap_or(probe::CheckOutcome {
                    result: Err(ProbeError::Timeout(cfg.check.timeout)),
                    login_refused: None,
                })
            }
        };
        due = grid.next_after(tokio::time::Instant::now(), period);
        crate::metrics::check_result(
            &backend.name,
            match &outcome.result {
                Ok(_) => "ok",
                Err(e) => e.kind(),
            },
            started.elapsed().as_secs_f64(),
        );
        if let Some(e) = &outcome.login_refused {
            crate::metrics::check_login_refused(&backend.name, e.kind());
        }
        if let Err(ProbeError::Local(reason)) = &outcome.result {
            // pglb's own shortage (e.g. out of descriptors while full of sessions) says nothing
            // about the backend: counting it would mark a healthy primary down and cut every
            // session on it. The state stays as it is until a check can run again.
            if local_warning.due() {
                warn!(backend = %backend.name, %reason, "check could not run; backend state kept");
            }
            continue;
        }
        events.send(Event::Checked {
            name: backend.name.clone(),
            result: outcome.result,
            login_refused: outcome.login_refused,
            at: SystemTime::now(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn checkers_started_at_different_times_tick_together() {
        let grid = CheckGrid::new(Instant::now());
        let second = Duration::from_secs(1);
        // Started 130 ms and 870 ms into the first second: both next check at 1 s.
        tokio::time::advance(Duration::from_millis(130)).await;
        let a = grid.next_after(Instant::now(), second);
        tokio::time::advance(Duration::from_millis(740)).await;
        let b = grid.next_after(Instant::now(), second);
        assert_eq!(a, b);
        assert_eq!(a - grid.epoch, second);
        // A check that ends late (a 2.4 s timeout) skips the points it missed.
        tokio::time::advance(Duration::from_millis(2_400)).await;
        assert_eq!(
            grid.next_after(Instant::now(), second) - grid.epoch,
            Duration::from_secs(4)
        );
        // Exactly on a point: the next one, never the same instant again.
        tokio::time::advance(Duration::from_millis(730)).await;
        assert_eq!(Instant::now() - grid.epoch, Duration::from_secs(4));
        assert_eq!(
            grid.next_after(Instant::now(), second) - grid.epoch,
            Duration::from_secs(5)
        );
        // The fast grid's points include the slow grid's: hurrying keeps checks together.
        let fast = Duration::from_millis(200);
        tokio::time::advance(Duration::from_millis(50)).await;
        assert_eq!(
            grid.next_after(Instant::now(), fast) - grid.epoch,
            Duration::from_millis(4_200)
        );
    }
}
