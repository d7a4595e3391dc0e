//! The stats listener: `GET /` (HTML page), `/stats.json`, `/metrics` (Prometheus), `/health`
//! and `/live`, plus the admin API. Handlers render from the control plane's newest `View` (an
//! `Arc`, no lock held while formatting). `server` is the HTTP serve loop both binaries use.

pub mod client;
pub mod server;
mod stats_page;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use metrics::{counter, gauge};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backend::Role;
use crate::control::Control;
use crate::metrics as m;
use crate::proxy::PortRole;
use crate::view::{AdminState, View};
use server::{json, prometheus, text, Resp};

/// What the HTTP handlers read.
pub struct StatsContext {
    pub control: Control,
    pub prometheus: Option<PrometheusHandle>,
    /// Cancelled on SIGTERM/SIGINT: `/live` answers 503 from then on, while the listeners drain.
    pub shutting_down: CancellationToken,
}

/// Compares without an early exit, so the token cannot be guessed byte by byte from timings.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether the request may read the stats pages: always when no read credentials are configured;
/// otherwise with the basic-auth user and password, the read token or the admin token.
fn may_read(req: &Request<Incoming>, ctx: &StatsContext) -> bool {
    use base64::Engine;
    let view = ctx.control.view();
    let st = &view.config().stats;
    if !st.read_protected() {
        return true;
    }
    let Some(auth) = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    if let Some(token) = auth.strip_prefix("Bearer ") {
        return [&st.read_token, &st.admin_token]
            .into_iter()
            .flatten()
            .any(|t| same_secret(token.as_bytes(), t.expose().as_bytes()));
    }
    if let (Some(b64), Some((user, pass))) = (auth.strip_prefix("Basic "), &st.read_basic) {
        let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64.trim()) else {
            return false;
        };
        let want = format!("{user}:{}", pass.expose());
        return same_secret(&raw, want.as_bytes());
    }
    false
}

/// `POST /api/backends/{name}/{drain|disable|enable}` with `Authorization: Bearer <token>`.
async fn admin(req: &Request<Incoming>, ctx: &StatsContext, name: &str, action: &str) -> Resp {
    let view = ctx.control.view();
    let Some(token) = &view.config().stats.admin_token else {
        return text(
            StatusCode::FORBIDDEN,
            "text/plain",
            "admin actions are off: set [stats] admin_token_env or admin_token_file\n",
        );
    };
    let given = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !same_secret(given.as_bytes(), token.expose().as_bytes()) {
        warn!(backend = %name, action, authorization = if given.is_empty() { "missing" } else { "wrong" }, "admin action refused: bad token");
        return Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header("www-authenticate", "Bearer")
            .header("content-type", "text/plain")
            .body(Full::new(Bytes::from_static(b"unauthorized\n")))
            .expect("static headers are valid");
    }
    let state = match action {
        "drain" => AdminState::Drain,
        "disable" => AdminState::Disabled,
        "enable" => AdminState::Enabled,
        _ => {
            return text(
                StatusCode::NOT_FOUND,
                "text/plain",
                "unknown action: use drain, disable or enable\n",
            )
        }
    };
    match ctx.control.admin(name, state).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            return text(
                StatusCode::NOT_FOUND,
                "text/plain",
                format!("no backend named {name:?}\n"),
            )
        }
        Err(e) => {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("{e}\n"),
            )
        }
    }
    text(
        StatusCode::OK,
        "application/json",
        format!(
            "{{\"backend\":{name:?},\"admin_state\":\"{}\"}}\n",
            state.as_str()
        ),
    )
}

async fn route(req: Request<Incoming>, ctx: Arc<StatsContext>) -> Result<Resp, Infallible> {
    let path = req.uri().path().to_string();
    if let Some(rest) = path.strip_prefix("/api/backends/") {
        if req.method() != Method::POST {
            return Ok(text(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "use POST\n",
            ));
        }
        let resp = match rest.split_once('/') {
            Some((name, action)) => admin(&req, &ctx, name, action).await,
            None => text(
                StatusCode::NOT_FOUND,
                "text/plain",
                "use /api/backends/{name}/{drain|disable|enable}\n",
            ),
        };
        return Ok(resp);
    }
    if path == "/live" {
        // Liveness for a VIP track script or a load balancer: this process accepts and serves
        // sessions, whether or not a primary is known. It turns 503 the moment a shutdown starts,
        // before the listeners stop, so traffic moves away first and then sessions drain.
        return Ok(if ctx.shutting_down.is_cancelled() {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "shutting down\n",
            )
        } else {
            text(StatusCode::OK, "text/plain", "live\n")
        });
    }
    if path != "/health" && !may_read(&req, &ctx) {
        warn!(path = %path, "stats read refused: missing or wrong credentials");
        return Ok(Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header("www-authenticate", "Basic realm=\"pglb\"")
            .header("content-type", "text/plain")
            .body(Full::new(Bytes::from_static(b"unauthorized\n")))
            .expect("static headers are valid"));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n",
        ));
    }
    let resp = match path.as_str() {
        "/" => {
            let view = ctx.control.view().live();
            let promoter = match &view.config().stats.promoter_status {
                Some(addr) => Some(promoter_panel(addr).await),
                None => None,
            };
            text(
                StatusCode::OK,
                "text/html; charset=utf-8",
                stats_page::render(&view, view.sessions_waiting, promoter),
            )
        }
        "/stats.json" => json(&ctx.control.view().live()),
        "/metrics" => {
            export_metrics(&ctx.control.view().live());
            prometheus(ctx.prometheus.as_ref())
        }
        "/health" => {
            let view = ctx.control.view();
            match &view.primary {
                Some(p) => text(
                    StatusCode::OK,
                    "text/plain",
                    format!("ok: primary is {p}\n"),
                ),
                None => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    match view.store.as_ref().and_then(|s| s.write_block.as_ref()) {
                        Some(why) => format!("unavailable: {why}\n"),
                        None => "unavailable: no primary is known\n".to_string(),
                    },
                ),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    };
    Ok(resp)
}

/// The promoter's state for the page, read from its `/status` (bounded: the page never waits
/// long for it).
async fn promoter_panel(addr: &str) -> stats_page::PromoterPanel {
    use crate::promoter::http::Status;
    let source = format!("http://{addr}/status");
    match client::get_json::<Status>(addr, "/status", None, std::time::Duration::from_millis(700))
        .await
    {
        Ok(s) => {
            let mut summary = format!("decision: {}", s.decision);
            if let Some(r) = &s.reason {
                summary.push_str(&format!(" ({r})"));
            }
            summary.push_str(&format!(
                " · primary: {} · failovers: {}",
                s.primary.as_deref().unwrap_or("none"),
                s.failovers
            ));
            if !s.fenced.is_empty() {
                summary.push_str(&format!(" · fenced: {}", s.fenced.join(", ")));
            }
            if s.dry_run {
                summary.push_str(" · dry run");
            }
            if let Some(st) = &s.store {
                // Several promoters: who leads, whether the store answers, what it records.
                summary.push_str(&format!(
                    " · promoter {} ({}) · store leader: {}{}",
                    s.id,
                    if st.is_leader { "leader" } else { "follower" },
                    st.leader.as_deref().unwrap_or("none"),
                    if st.reachable {
                        ""
                    } else {
                        " (store unreachable)"
                    }
                ));
                if let Some(r) = &st.record {
                    summary.push_str(&format!(
                        " · recorded primary: {} (timeline {}, epoch {})",
                        r.name, r.timeline, r.epoch
                    ));
                }
                let members: Vec<String> = st
                    .members
                    .iter()
                    .map(|m| match m.lease_age_seconds {
                        Some(age) => format!("{} ({age:.0} s)", m.id),
                        None => m.id.clone(),
                    })
                    .collect();
                if !members.is_empty() {
                    summary.push_str(&format!(" · promoters: {}", members.join(", ")));
                }
            }
            let last_failover = s.last_failover.map(|f| {
                let at =
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(f.at_unix.max(0.0));
                let mut t = format!(
                    "{} → {} at {}: {}",
                    f.from.as_deref().unwrap_or("?"),
                    f.to.as_deref().unwrap_or("nobody"),
                    humantime::format_rfc3339_seconds(at),
                    f.outcome
                );
                if let Some(total) = f.total_seconds {
                    t.push_str(&format!(" in {total:.1} s"));
                }
                if let Some(e) = f.error {
                    t.push_str(&format!(" ({e})"));
                }
                t
            });
            stats_page::PromoterPanel {
                source,
                summary,
                last_failover,
            }
        }
        Err(e) => stats_page::PromoterPanel {
            source,
            summary: format!("unreachable: {e}"),
            last_failover: None,
        },
    }
}

/// Serves the stats listener until `stop` is cancelled.
pub async fn serve(listener: TcpListener, ctx: Arc<StatsContext>, stop: CancellationToken) {
    info!(addr = ?listener.local_addr().ok(), "stats listening");
    server::serve(listener, stop, move |req| route(req, ctx.clone())).await
}

/// Publishes the per-backend gauges and byte counters (kept as atomics on the hot path).
fn export_metrics(v: &View) {
    gauge!(m::PRIMARY_KNOWN).set(if v.primary.is_some() { 1.0 } else { 0.0 });
    if let Some(st) = &v.store {
        gauge!(m::STORE_UP).set(if st.reachable { 1.0 } else { 0.0 });
        if let Some(age) = st.seconds_since_answer {
            gauge!(m::STORE_ANSWER_AGE_SECONDS).set(age);
        }
        use crate::view::StoreRule;
        for rule in [
            StoreRule::Record,
            StoreRule::LastRecord,
            StoreRule::NoRecord,
            StoreRule::Unreachable,
        ] {
            gauge!(m::STORE_RULE, "rule" => rule.as_str()).set(if st.rule == rule {
                1.0
            } else {
                0.0
            });
        }
        if let Some(r) = &st.recorded {
            gauge!(m::STORE_RECORDED_EPOCH).set(r.epoch as f64);
        }
    }
    for b in &v.backends {
        let name = b.name.clone();
        m::backend_zeros(&name);
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
        for p in [PortRole::Write, PortRole::Read] {
            let s = b.port(p);
            counter!(m::BYTES_TOTAL, "backend" => name.clone(), "port" => p.as_str(), "direction" => "in")
                .absolute(s.bytes_in);
            counter!(m::BYTES_TOTAL, "backend" => name.clone(), "port" => p.as_str(), "direction" => "out")
                .absolute(s.bytes_out);
        }
    }
}
