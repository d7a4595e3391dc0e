//! The promoter's own small HTTP endpoint: `GET /status` (and `/`) as JSON, `/metrics`
//! (Prometheus) and `/health`, on the serve loop both binaries share (`crate::http::server`).
//! Handlers copy the `Status` out of its lock before rendering.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::observe::{PglbView, Witnesses};
use crate::http::server::{json, prometheus, text, Resp};

/// The last failover this process ran (or tried).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailoverRecord {
    pub at_unix: f64,
    /// `promoted`, or why nobody was (`FailoverError::kind`).
    pub outcome: String,
    /// The evidence the decision was taken on.
    pub reason: String,
    pub from: Option<String>,
    pub to: Option<String>,
    pub lsn: Option<String>,
    pub timeline: Option<u32>,
    /// From the failed primary's last answer to the decision.
    pub detected_after_seconds: f64,
    /// From the decision to the verified promotion.
    pub promote_seconds: Option<f64>,
    /// From the failed primary's last answer to the verified promotion.
    pub total_seconds: Option<f64>,
    pub repointed: Vec<String>,
    pub error: Option<String>,
}

/// One backend on the status page.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeSummary {
    pub name: String,
    /// primary, replica, stale (writable on an older timeline) or unreachable.
    pub role: String,
    pub error: Option<String>,
    pub timeline: Option<u32>,
    pub lsn: Option<String>,
    pub streaming: Option<bool>,
    pub read_only: Option<bool>,
    pub priority: u32,
    pub no_failover: bool,
}

/// Everything `/status` shows. Field names are stable; pglb's stats page reads it back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    /// This promoter's identity (`--id`, default the host name).
    #[serde(default)]
    pub id: String,
    pub dry_run: bool,
    pub config_file: String,
    pub started_unix: f64,
    pub looks: u64,
    pub last_look_unix: Option<f64>,
    /// The primary as derived from the servers at the last look.
    pub primary: Option<String>,
    /// steady, reconcile, failover or wait.
    pub decision: String,
    /// For a wait: `WaitReason::kind` and its text with evidence.
    pub reason_kind: Option<String>,
    pub reason: Option<String>,
    /// How long no primary has answered (null while one does).
    pub primary_down_seconds: Option<f64>,
    pub failover_after_seconds: f64,
    pub synchronous: bool,
    /// Promotions made by this process.
    pub failovers: u64,
    pub last_failover: Option<FailoverRecord>,
    /// Stale primaries already read-only.
    pub fenced: Vec<String>,
    /// Replicas not streaming from the primary.
    pub not_streaming: Vec<String>,
    /// The first configured pglb as a witness (`state`: not_configured, unreachable, reachable).
    pub pglb: PglbView,
    /// Every configured pglb (`at`: its stats address) and what it said at the last look.
    pub witnesses: Witnesses,
    pub nodes: Vec<NodeSummary>,
    /// Last config reload, the same shape as pglb's (`result`, `error`, counts).
    pub reload: crate::reload::ReloadStatus,
    /// With `[store]`: leader, members with lease age, reachability, recorded primary (null
    /// without a store).
    #[serde(default)]
    pub store: Option<super::coordination::StoreStatus>,
    /// Server changes this process did not make because the store gate refused them.
    #[serde(default)]
    pub guard_refusals: u64,
}

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Status {
    pub fn new(config_file: String, dry_run: bool, id: String) -> Status {
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            id,
            dry_run,
            config_file,
            started_unix: unix_now(),
            looks: 0,
            last_look_unix: None,
            primary: None,
            decision: "starting".to_string(),
            reason_kind: None,
            reason: None,
            primary_down_seconds: None,
            failover_after_seconds: 0.0,
            synchronous: false,
            failovers: 0,
            last_failover: None,
            fenced: vec![],
            not_streaming: vec![],
            pglb: PglbView::NotConfigured,
            witnesses: Witnesses::default(),
            nodes: vec![],
            reload: Default::default(),
            store: None,
            guard_refusals: 0,
        }
    }
}

/// What the handlers read.
pub struct Shared {
    pub status: Mutex<Status>,
    pub prometheus: Option<PrometheusHandle>,
}

impl Shared {
    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()))
    }
    pub fn snapshot(&self) -> Status {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

async fn route(req: Request<Incoming>, shared: Arc<Shared>) -> Result<Resp, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n",
        ));
    }
    let resp = match req.uri().path() {
        "/" | "/status" | "/status.json" => json(&shared.snapshot()),
        "/metrics" => prometheus(shared.prometheus.as_ref()),
        "/health" => {
            let s = shared.snapshot();
            match s.primary {
                Some(p) => text(
                    StatusCode::OK,
                    "text/plain",
                    format!("ok: primary is {p}\n"),
                ),
                None => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!(
                        "no primary: {}\n",
                        s.reason.as_deref().unwrap_or(&s.decision)
                    ),
                ),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    };
    Ok(resp)
}

/// Serves `/status`, `/metrics` and `/health` on `listener` until `stop` is cancelled (the
/// serve loop pglb's stats listener uses).
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    info!(addr = ?listener.local_addr().ok(), "promoter status listening");
    crate::http::server::serve(listener, stop, move |req| route(req, shared.clone())).await
}
