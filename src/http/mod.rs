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
use tracing::{debug, info};

pub use snapshot::{BackendSnapshot, ReloadStatus, Snapshot};

use crate::routing::Cluster;

/// What the HTTP handlers read.
pub struct StatsContext {
    pub cluster: Arc<Cluster>,
    pub started: Instant,
    pub prometheus: Option<PrometheusHandle>,
    pub reload: Arc<std::sync::Mutex<ReloadStatus>>,
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

async fn route(req: Request<Incoming>, ctx: Arc<StatsContext>) -> Result<Resp, Infallible> {
    let path = req.uri().path();
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n",
        ));
    }
    let resp = match path {
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
