//! `Snapshot`: everything the stats page, `/stats.json` and `/metrics` show, copied out of the
//! cluster at one moment. Its serde form is the documented `/stats.json` schema: names are stable.

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use metrics::{counter, gauge};
use serde::Serialize;

use super::StatsContext;
use crate::backend::{AdminState, Backend, PortRole, Role};
use crate::metrics as m;

/// Result of the last config (re)load, shown on the page and in `/stats.json`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ReloadStatus {
    /// "applied", "rejected" or "unchanged"; "initial" before any reload.
    pub result: String,
    /// Unix time of the last reload attempt.
    pub at_unix: Option<f64>,
    /// Why the last reload was refused (file, line, key and reason); null when it was not.
    pub error: Option<String>,
    pub applied: u64,
    pub rejected: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PortSnapshot {
    pub sessions_active: u64,
    pub sessions_total: u64,
    pub sessions_max: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackendSnapshot {
    pub name: String,
    pub address: String,
    pub weight: u32,
    /// primary, replica, fenced or unknown.
    pub role: Role,
    /// up, down, draining (admin drain or removed from the config) or disabled.
    pub state: &'static str,
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
    pub check_latency_ms: Option<f64>,
    pub last_check_unix: Option<f64>,
    pub last_error: Option<String>,
    pub last_error_kind: Option<&'static str>,
    /// Sessions on this backend, over both ports.
    pub sessions_active: u64,
    pub write: PortSnapshot,
    pub read: PortSnapshot,
}

#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub version: &'static str,
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
    pub listen: Listen,
    pub backends: Vec<BackendSnapshot>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Listen {
    pub write: String,
    pub read: String,
    pub stats: String,
}

fn unix(t: SystemTime) -> Option<f64> {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs_f64())
}

fn port(b: &Backend, p: PortRole) -> PortSnapshot {
    let c = b.counters(p);
    PortSnapshot {
        sessions_active: c.active.load(Ordering::Relaxed),
        sessions_total: c.total.load(Ordering::Relaxed),
        sessions_max: c.max.load(Ordering::Relaxed),
        bytes_in: c.bytes_in.load(Ordering::Relaxed),
        bytes_out: c.bytes_out.load(Ordering::Relaxed),
    }
}

fn backend(b: &Backend, draining: bool) -> BackendSnapshot {
    let st = b.status();
    let cfg = b.config();
    let admin = b.admin_state();
    let state = if draining || admin == AdminState::Drain {
        "draining"
    } else if admin == AdminState::Disabled {
        "disabled"
    } else if st.health.is_up() {
        "up"
    } else {
        "down"
    };
    let r = st.report.as_ref();
    BackendSnapshot {
        name: b.name.clone(),
        address: cfg.address.clone(),
        weight: cfg.weight,
        role: st.role,
        state,
        admin_state: admin,
        seconds_since_change: st.since.elapsed().as_secs_f64(),
        in_recovery: r.map(|r| r.in_recovery),
        timeline: r.and_then(|r| r.timeline),
        system_id: r.and_then(|r| r.system_id).map(|s| s.to_string()),
        lsn: r.and_then(|r| r.position()).map(|l| l.to_string()),
        receive_lsn: r.and_then(|r| r.receive_lsn).map(|l| l.to_string()),
        lag_bytes: st.lag_bytes,
        lag_seconds: st.lag_seconds,
        read_eligible: st.role == crate::backend::Role::Replica && st.read_eligible,
        streaming: r.and_then(|r| r.streaming),
        check_latency_ms: st.check_latency.map(|d| d.as_secs_f64() * 1000.0),
        last_check_unix: st.last_check.and_then(unix),
        last_error: st.last_error.as_ref().map(|e| e.to_string()),
        last_error_kind: st.last_error.as_ref().map(|e| e.kind()),
        sessions_active: b.active_sessions(),
        write: port(b, PortRole::Write),
        read: port(b, PortRole::Read),
    }
}

impl Snapshot {
    pub fn take(ctx: &StatsContext) -> Snapshot {
        let cluster = &ctx.cluster;
        let cfg = cluster.config();
        let table = cluster.routing();
        let mut backends: Vec<_> = cluster
            .backends()
            .iter()
            .map(|b| backend(b, false))
            .collect();
        backends.extend(cluster.draining().iter().map(|b| backend(b, true)));
        let reload = ctx.reload.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Snapshot {
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: ctx.started.elapsed().as_secs_f64(),
            config_file: cfg.path.display().to_string(),
            generation: cluster.generation(),
            reload,
            primary: table.primary.as_ref().map(|p| p.name.clone()),
            readers: table.readers.iter().map(|b| b.name.clone()).collect(),
            fallback_to_primary: cfg.read.fallback_to_primary,
            listen: Listen {
                write: cfg.listen.write.to_string(),
                read: cfg.listen.read.to_string(),
                stats: cfg.listen.stats.to_string(),
            },
            backends,
        }
    }

    /// Publishes the per-backend gauges and byte counters (kept as atomics on the hot path).
    pub fn export_metrics(&self) {
        gauge!(m::PRIMARY_KNOWN).set(if self.primary.is_some() { 1.0 } else { 0.0 });
        for b in &self.backends {
            let name = b.name.clone();
            gauge!(m::BACKEND_UP, "backend" => name.clone()).set(if b.state == "up" {
                1.0
            } else {
                0.0
            });
            for role in [Role::Primary, Role::Replica, Role::Fenced, Role::Unknown] {
                gauge!(m::BACKEND_ROLE, "backend" => name.clone(), "role" => role.as_str())
                    .set(if b.role == role { 1.0 } else { 0.0 });
            }
            if let Some(l) = b.lag_bytes {
                gauge!(m::REPLICA_LAG_BYTES, "backend" => name.clone()).set(l as f64);
            }
            if let Some(l) = b.lag_seconds {
                gauge!(m::REPLICA_LAG_SECONDS, "backend" => name.clone()).set(l);
            }
            for (p, s) in [(PortRole::Write, &b.write), (PortRole::Read, &b.read)] {
                counter!(m::BYTES_TOTAL, "backend" => name.clone(), "port" => p.as_str(), "direction" => "in")
                    .absolute(s.bytes_in);
                counter!(m::BYTES_TOTAL, "backend" => name.clone(), "port" => p.as_str(), "direction" => "out")
                    .absolute(s.bytes_out);
            }
        }
    }
}
