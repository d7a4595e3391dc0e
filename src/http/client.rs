//! The HTTP/1 client both binaries use (hyper's): one `GET` of a JSON document over one
//! connection, the whole exchange bounded by a timeout. The promoter reads pglb's `/stats.json`
//! with it, pglb's stats page the promoter's `/status`.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use crate::backend::net::{connect_tcp, ConnectError};
use crate::config::Secret;

/// Why a `GET` of a JSON document failed.
#[derive(Debug, thiserror::Error)]
pub enum GetError {
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: ConnectError,
    },
    #[error("http exchange with {addr}: {source}")]
    Http {
        addr: String,
        #[source]
        source: hyper::Error,
    },
    #[error("request to {addr}: {source}")]
    Request {
        addr: String,
        #[source]
        source: hyper::http::Error,
    },
    #[error("{addr} answered HTTP {status}")]
    Status {
        addr: String,
        status: hyper::StatusCode,
    },
    #[error("unreadable {path} from {addr}: {source}")]
    Body {
        addr: String,
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("no answer from {addr} within {after:?}")]
    Timeout { addr: String, after: Duration },
}

/// `GET path` at `addr` (`host:port`), with `authorization` as the header's value when given,
/// parsed as `T`; the whole exchange bounded by `timeout`.
pub async fn get_json<T: DeserializeOwned>(
    addr: &str,
    path: &str,
    authorization: Option<&Secret>,
    timeout: Duration,
) -> Result<T, GetError> {
    let exchange = async {
        let stream = connect_tcp(addr, timeout)
            .await
            .map_err(|source| GetError::Connect {
                addr: addr.to_string(),
                source,
            })?;
        let http = |source| GetError::Http {
            addr: addr.to_string(),
            source,
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        let conn = tokio::spawn(conn);
        let mut req = hyper::Request::get(path).header(hyper::header::HOST, addr);
        if let Some(a) = authorization {
            req = req.header(hyper::header::AUTHORIZATION, a.expose());
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|source| GetError::Request {
                addr: addr.to_string(),
                source,
            })?;
        let resp = sender.send_request(req).await.map_err(http)?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(http)?.to_bytes();
        conn.abort();
        if status != hyper::StatusCode::OK {
            return Err(GetError::Status {
                addr: addr.to_string(),
                status,
            });
        }
        serde_json::from_slice(&body).map_err(|source| GetError::Body {
            addr: addr.to_string(),
            path: path.to_string(),
            source,
        })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(GetError::Timeout {
                addr: addr.to_string(),
                after: timeout,
            })
        })
}
