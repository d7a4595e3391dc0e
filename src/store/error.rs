//! `StoreError`: every way a store request can fail, keeping etcd's own error as the source.

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The client could not be set up (bad endpoint, authentication refused, TLS set-up).
    #[error("connect to etcd at {endpoints}")]
    Connect {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    /// A TLS file could not be read.
    #[error("read etcd TLS file {path}")]
    TlsFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// etcd answered with an error, or the connection failed.
    #[error("etcd {op} on {key}")]
    Etcd {
        op: &'static str,
        key: String,
        #[source]
        source: etcd_client::Error,
    },
    /// No answer in time (etcd unreachable, partitioned or without quorum).
    #[error("etcd {op} on {key}: no answer within {timeout:?}")]
    Timeout {
        op: &'static str,
        key: String,
        timeout: Duration,
    },
    /// A guarded write was refused: the caller does not hold the leader key (any more) at the
    /// revision it won, or its lease has lapsed on its own clock. Nothing was written.
    #[error("not the leader (leader key held by {})", holder.as_deref().unwrap_or("nobody"))]
    NotLeader { holder: Option<String> },
    /// A value under our prefix is not what we write there.
    #[error("decode {key}")]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

impl StoreError {
    /// Stable label for metrics (`store_errors_total{kind=...}`).
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Connect { .. } => "connect",
            StoreError::TlsFile { .. } => "tls_file",
            StoreError::Etcd { .. } => "etcd",
            StoreError::Timeout { .. } => "timeout",
            StoreError::NotLeader { .. } => "not_leader",
            StoreError::Decode { .. } => "decode",
        }
    }

    /// Whether the store could not be reached (as opposed to refusing or a bad value).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Connect { .. } | StoreError::Etcd { .. } | StoreError::Timeout { .. }
        )
    }
}
