//! Accept loop of one port (write or read): bind, accept until cancelled, spawn a tracked task per
//! connection. Transient accept errors (out of file descriptors, aborted connections) are logged
//! once per burst and backed off, never ending the loop.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use super::client::{handle, refuse_over_limit, SessionContext};
use crate::backend::net::SocketTuning;
use crate::proxy::PortRole;
use crate::ratelimit::LogEvery;

static CONN_ID: AtomicU64 = AtomicU64::new(1);

/// One open client connection of a port, counted until the session ends.
struct OpenGuard(Arc<PortLoad>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Binds the stats listener with SO_REUSEADDR (a restarted pglb binds at once) and
/// SO_REUSEPORT, so that a new pglb started with the same lb.toml during a binary upgrade binds
/// the stats port beside the old one (docs/operations.md), as it does the session ports.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::from_std(bind_socket(addr, true)?.into())
}

/// A bound, listening, non-blocking socket. With `reuseport`, other sockets of this process
/// (one per worker thread) can listen on the same port and the kernel spreads connections
/// over them; a port held by a program without `SO_REUSEPORT` still fails with "in use".
pub fn bind_socket(addr: SocketAddr, reuseport: bool) -> std::io::Result<socket2::Socket> {
    let domain = socket2::Domain::for_address(addr);
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    #[cfg(all(unix, not(target_os = "solaris"), not(target_os = "illumos")))]
    if reuseport {
        sock.set_reuse_port(true)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    Ok(sock)
}

/// What the listeners of one port (one per worker thread) share: the port's open-connection
/// count, checked against `maxconn`, how many over-limit clients are being answered, and when
/// the port last warned about each kind of trouble (so a burst is logged once per port, not once
/// per thread).
pub struct PortLoad {
    open: AtomicU64,
    refusing: AtomicU64,
    accept_error_warned: LogEvery,
    limit_warned: LogEvery,
}

impl Default for PortLoad {
    fn default() -> Self {
        PortLoad {
            open: AtomicU64::new(0),
            refusing: AtomicU64::new(0),
            accept_error_warned: LogEvery::new(Duration::from_secs(5)),
            limit_warned: LogEvery::new(Duration::from_secs(5)),
        }
    }
}

/// Accepts on `listener` until `stop` is cancelled; sessions go on `sessions`, on the runtime
/// this runs on.
pub async fn serve(
    listener: TcpListener,
    port: PortRole,
    ctx: SessionContext,
    stop: CancellationToken,
    sessions: TaskTracker,
    load: Arc<PortLoad>,
) {
    let local = listener.local_addr().ok();
    tracing::debug!(port = port.as_str(), addr = ?local, "accepting");
    let mut tuned: Option<SocketTuning> = None;
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let cfg = ctx.control.view().config().clone();
                let want = SocketTuning::from(&cfg.proxy);
                if tuned != Some(want) {
                    // First client, or the options changed in a reload: tune the listener, whose
                    // options Linux copies to the sockets it accepts, and this one by hand.
                    if let Err(e) = want.apply_listener(&listener) {
                        warn!(port = port.as_str(), error = %e, "cannot set socket options on the listener");
                    }
                    tuned = Some(want);
                    if let Err(e) = want.apply(&stream) {
                        tracing::debug!(error = %e, "cannot tune client socket");
                    }
                }
                let maxconn = cfg.proxy.maxconn;
                if load.open.load(Ordering::Relaxed) >= maxconn {
                    crate::metrics::client_rejected(port, "maxconn");
                    if load.limit_warned.due() {
                        warn!(port = port.as_str(), maxconn, %peer, "listener at maxconn: refusing clients");
                    }
                    // Over-limit clients get a proper error, but only so many at once: past
                    // this, a flood of them is just closed.
                    if load.refusing.load(Ordering::Relaxed) < 256 {
                        load.refusing.fetch_add(1, Ordering::Relaxed);
                        let load = load.clone();
                        let timeout = cfg.proxy.client_startup_timeout.min(Duration::from_secs(2));
                        let tls = cfg.listen.tls.clone();
                        tokio::spawn(async move {
                            refuse_over_limit(stream, port, maxconn, timeout, tls).await;
                            load.refusing.fetch_sub(1, Ordering::Relaxed);
                        });
                    }
                    continue;
                }
                load.open.fetch_add(1, Ordering::Relaxed);
                let guard = OpenGuard(load.clone());
                let id = CONN_ID.fetch_add(1, Ordering::Relaxed);
                let ctx = ctx.clone();
                sessions.spawn(async move {
                    let _guard = guard;
                    handle(stream, peer, port, ctx, id).await
                });
            }
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS and friends: log once per burst, back off, go on.
                if load.accept_error_warned.due() {
                    warn!(port = port.as_str(), error = %e, "accept failed; backing off");
                }
                crate::metrics::accept_error(port);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
    }
    tracing::debug!(port = port.as_str(), addr = ?local, "stopped accepting");
}
