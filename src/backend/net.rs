//! TCP plumbing shared by checks and sessions: connect to `host:port` (resolving at connect
//! time, bounded by a timeout, errors classified) and tune sockets (nodelay, keepalive,
//! `TCP_USER_TIMEOUT`) so a peer that vanishes is noticed in seconds, not minutes.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectError {
    #[error("connection refused")]
    Refused,
    #[error("connect timeout after {0:?}")]
    Timeout(Duration),
    #[error("cannot resolve host: {0}")]
    Dns(#[source] Arc<io::Error>),
    #[error("{0}")]
    Io(#[source] Arc<io::Error>),
    /// pglb itself could not open a socket (out of descriptors, buffers or memory): says
    /// nothing about the backend.
    #[error("pglb cannot open a connection: {0}")]
    Local(#[source] Arc<io::Error>),
}

impl ConnectError {
    pub fn kind(&self) -> &'static str {
        match self {
            ConnectError::Refused => "refused",
            ConnectError::Timeout(_) => "timeout",
            ConnectError::Dns(_) => "dns",
            ConnectError::Io(_) => "io",
            ConnectError::Local(_) => "local",
        }
    }

    pub fn io(e: io::Error) -> Self {
        ConnectError::Io(Arc::new(e))
    }
}

/// Connects to `address` (`host:port`), trying each resolved address in turn, all within
/// `timeout`.
pub async fn connect_tcp(address: &str, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let attempt = async {
        let addrs: Vec<_> = tokio::net::lookup_host(address)
            .await
            .map_err(|e| ConnectError::Dns(Arc::new(e)))?
            .collect();
        if addrs.is_empty() {
            return Err(ConnectError::Dns(Arc::new(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{address} has no addresses"),
            ))));
        }
        let mut last = ConnectError::Refused;
        for a in addrs {
            match TcpStream::connect(a).await {
                Ok(s) => return Ok(s),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    last = ConnectError::Refused
                }
                Err(e) if is_local_exhaustion(&e) => return Err(ConnectError::Local(Arc::new(e))),
                Err(e) => last = ConnectError::io(e),
            }
        }
        Err(last)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout(timeout)),
    }
}

/// Out of file descriptors (process or system), kernel buffers or memory: the local side failed.
fn is_local_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Socket options for both legs of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketTuning {
    pub keepalive: Duration,
    pub user_timeout: Duration,
}

impl SocketTuning {
    /// Sets `TCP_NODELAY` (PostgreSQL messages are small and latency-bound), keepalive probes
    /// and, on Linux, `TCP_USER_TIMEOUT`. Errors are returned but are never worth a session.
    pub fn apply(&self, stream: &TcpStream) -> io::Result<()> {
        self.apply_to(SockRef::from(stream))
    }

    /// The same options on a listening socket: Linux copies them to every socket it accepts,
    /// which saves six system calls per client session.
    pub fn apply_listener(&self, listener: &TcpListener) -> io::Result<()> {
        self.apply_to(SockRef::from(listener))
    }

    fn apply_to(&self, sock: SockRef<'_>) -> io::Result<()> {
        sock.set_tcp_nodelay(true)?;
        if !self.keepalive.is_zero() {
            let interval = (self.keepalive / 3).max(Duration::from_secs(1));
            let ka = TcpKeepalive::new()
                .with_time(self.keepalive)
                .with_interval(interval)
                .with_retries(3);
            sock.set_tcp_keepalive(&ka)?;
        } else {
            sock.set_keepalive(false)?;
        }
        #[cfg(any(target_os = "linux", target_os = "android"))]
        sock.set_tcp_user_timeout((!self.user_timeout.is_zero()).then_some(self.user_timeout))?;
        Ok(())
    }
}

impl From<&crate::config::ProxyConfig> for SocketTuning {
    fn from(p: &crate::config::ProxyConfig) -> Self {
        SocketTuning {
            keepalive: p.tcp_keepalive,
            user_timeout: p.tcp_user_timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The listener's options reach the sockets it accepts (what proxy::listener relies on).
    #[tokio::test]
    async fn accepted_sockets_inherit_the_listeners_options() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tuning = SocketTuning {
            keepalive: Duration::from_secs(17),
            user_timeout: Duration::from_secs(23),
        };
        tuning.apply_listener(&listener).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let sock = SockRef::from(&accepted);
        assert!(sock.tcp_nodelay().unwrap());
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(17));
        #[cfg(any(target_os = "linux", target_os = "android"))]
        assert_eq!(
            sock.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(23))
        );
    }
}
