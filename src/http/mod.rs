//! The stats listener: `GET /` (HTML page), `/stats.json`, `/metrics` (Prometheus) and `/health`.
//! Handlers render from a `Snapshot` taken without holding any lock while formatting.

mod snapshot;
mod stats_page;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backend::AdminState;

pub use snapshot::{BackendSnapshot, ReloadStatus, Snapshot};

use crate::routing::Cluster;

/// What the HTTP handlers read.
pub struct StatsContext {
    pub cluster: Arc<Cluster>,
    pub started: Instant,
    pub prometheus: Option<PrometheusHandle>,
    pub reload: Arc<std::sync::Mutex<ReloadStatus>>,
    /// Cancelled on SIGTERM/SIGINT: `/live` answers 503 from then on, while the listeners drain.
    pub shutting_down: CancellationToken,
}

type Resp = Response<Full<Bytes>>;

fn text(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Resp {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("cache-control", "no-store")
        .body(Full::new(body.into()))
        .expect("static headers are valid")
}

/// Compares without an early exit, so the token cannot be guessed byte by byte from timings.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether the request may read the stats pages: always when no read credentials are configured;
/// otherwise with the basic-auth user and password, the read token or the admin token.
fn may_read(req: &Request<Incoming>, ctx: &StatsContext) -> bool {
    use base64::Engine;
    let cfg = ctx.cluster.config();
    let st = &cfg.stats;
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
fn admin(req: &Request<Incoming>, ctx: &StatsContext, name: &str, action: &str) -> Resp {
    let cfg = ctx.cluster.config();
    let Some(token) = &cfg.stats.admin_token else {
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
    let Some(backend) = ctx.cluster.find(name) else {
        return text(
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("no backend named {name:?}\n"),
        );
    };
    let before = backend.admin_state();
    backend.set_admin_state(state);
    ctx.cluster.recompute();
    info!(backend = %name, from = ?before, to = ?state, "admin action");
    text(
        StatusCode::OK,
        "application/json",
        format!(
            "{{\"backend\":{name:?},\"admin_state\":\"{}\"}}\n",
            action_state(state)
        ),
    )
}

fn action_state(s: AdminState) -> &'static str {
    match s {
        AdminState::Enabled => "enabled",
        AdminState::Drain => "drain",
        AdminState::Disabled => "disabled",
    }
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
            Some((name, action)) => admin(&req, &ctx, name, action),
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
            let snap = Snapshot::take(&ctx);
            text(
                StatusCode::OK,
                "text/html; charset=utf-8",
                stats_page::render(&snap),
            )
        }
        "/stats.json" => {
            let snap = Snapshot::take(&ctx);
            let body = serde_json::to_vec_pretty(&snap).unwrap_or_default();
            text(StatusCode::OK, "application/json", body)
        }
        "/metrics" => {
            let snap = Snapshot::take(&ctx);
            snap.export_metrics();
            let body = ctx
                .prometheus
                .as_ref()
                .map(|h| h.render())
                .unwrap_or_default();
            text(StatusCode::OK, "text/plain; version=0.0.4", body)
        }
        "/health" => {
            let table = ctx.cluster.routing();
            match &table.primary {
                Some(p) => text(
                    StatusCode::OK,
                    "text/plain",
                    format!("ok: primary is {}\n", p.name),
                ),
                None => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "unavailable: no primary is known\n",
                ),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    };
    Ok(resp)
}

/// Serves HTTP on `listener` until `stop` is cancelled.
pub async fn serve(listener: TcpListener, ctx: Arc<StatsContext>, stop: CancellationToken) {
    info!(addr = ?listener.local_addr().ok(), "stats listening");
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    debug!(error = %e, "stats accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let ctx = ctx.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let io = TokioIo::new(stream);
            let svc = service_fn(move |req| route(req, ctx.clone()));
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(io, svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => { if let Err(e) = r { debug!(error = %e, "stats connection error"); } }
                _ = stop.cancelled() => {}
            }
        });
    }
}
