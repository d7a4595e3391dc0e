//! The HTTP/1 serve loop both binaries use (pglb's stats listener, the promoter's `/status`):
//! accept until cancelled, one task per connection with a header-read timeout, each connection
//! ended when `stop` is cancelled. And the responses both build: text, JSON, Prometheus.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// A response with its whole body.
pub type Resp = Response<Full<Bytes>>;

/// A response of `content_type`, never cached (the state it shows changes every second).
pub fn text(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Resp {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("cache-control", "no-store")
        .body(Full::new(body.into()))
        .expect("static headers are valid")
}

/// `value` as pretty JSON, 200.
pub fn json(value: &impl Serialize) -> Resp {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    text(StatusCode::OK, "application/json", body)
}

/// The process's metrics in Prometheus' text format, 200 (empty without a recorder).
pub fn prometheus(handle: Option<&PrometheusHandle>) -> Resp {
    let body = handle.map(|h| h.render()).unwrap_or_default();
    text(StatusCode::OK, "text/plain; version=0.0.4", body)
}

/// Serves `handler` on `listener` until `stop` is cancelled. Accept errors (out of descriptors)
/// back off briefly and never end the loop.
pub async fn serve<H, F>(listener: TcpListener, stop: CancellationToken, handler: H)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    debug!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let handler = handler.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let io = TokioIo::new(stream);
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(io, service_fn(handler));
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => { if let Err(e) = r { debug!(error = %e, "http connection error"); } }
                _ = stop.cancelled() => {}
            }
        });
    }
}
