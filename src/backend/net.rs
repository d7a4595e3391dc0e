//! TCP plumbing shared by checks and sessions: connect to `host:port` (resolving at connect
//! time, bounded by a timeout, errors classified) and tune sockets (nodelay, keepalive,
//! `TCP_USER_TIMEOUT`) so a peer that vanishes is noticed in seconds, not minutes.

use std::io;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error("connection refused")]
    Refused,
    #[error("connect timeout after {0:?}")]
    Timeout(Duration),
    #[error("cannot resolve host: {0}")]
    Dns(String),
    #[error("{0}")]
    Io(String),
}

impl ConnectError {
    pub fn kind(&self) -> &'static str {
        match self {
            ConnectError::Refused => "refused",
            ConnectError::Timeout(_) => "timeout",
            ConnectError::Dns(_) => "dns",
            ConnectError::Io(_) => "io",
        }
    }
}

/// Connects to `address` (`host:port`), trying each resolved address in turn, all within
/// `timeout`.
pub async fn connect_tcp(address: &str, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let attempt = async {
        let addrs: Vec<_> = tokio::net::lookup_host(address)
            .await
            .map_err(|e| ConnectError::Dns(e.to_string()))?
            .collect();
        if addrs.is_empty() {
            return Err(ConnectError::Dns(format!("{address} has no addresses")));
        }
        let mut last = ConnectError::Refused;
        for a in addrs {
            match TcpStream::connect(a).await {
                Ok(s) => return Ok(s),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    last = ConnectError::Refused
                }
                Err(e) => last = ConnectError::Io(e.to_string()),
            }
        }
        Err(last)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout(timeout)),
    }
}

/// Socket options for both legs of a session.
#[derive(Debug, Clone, Copy)]
pub struct SocketTuning {
    pub keepalive: Duration,
    pub user_timeout: Duration,
}

impl SocketTuning {
    /// Sets `TCP_NODELAY` (PostgreSQL messages are small and latency-bound), keepalive probes
    /// and, on Linux, `TCP_USER_TIMEOUT`. Errors are returned but are never worth a session.
    pub fn apply(&self, stream: &TcpStream) -> io::Result<()> {
        stream.set_nodelay(true)?;
        let sock = SockRef::from(stream);
        if !self.keepalive.is_zero() {
            let interval = (self.keepalive / 3).max(Duration::from_secs(1));
            let ka = TcpKeepalive::new()
                .with_time(self.keepalive)
                .with_interval(interval)
                .with_retries(3);
            sock.set_tcp_keepalive(&ka)?;
        }
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if !self.user_timeout.is_zero() {
            sock.set_tcp_user_timeout(Some(self.user_timeout))?;
        }
        Ok(())
    }
}
