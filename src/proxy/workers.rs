//! The threads that carry sessions: one single-threaded tokio runtime per thread, each with its
//! own listening socket per port (`SO_REUSEPORT`, so the kernel spreads new connections over
//! them), and every session living its whole life on the thread that accepted it.
//!
//! Why not tokio's multi-thread runtime: on the data path, its cross-thread wake-ups and work
//! stealing cost measurable CPU per session and per byte (docs/performance.md, finding 6). With
//! one runtime per thread, a session's reads, writes and timers never leave its thread, and the
//! copy-buffer pool is per thread without contention. Health checks, the stats server and reloads
//! stay on the control runtime, so a check's SCRAM key derivation never delays a session.

use std::io;
use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// The session threads. Dropping it stops them (their runtimes drop whatever is still running).
pub struct Workers {
    handles: Vec<Handle>,
    stop: CancellationToken,
}

impl Workers {
    /// Starts `count` threads, each running its own runtime until dropped; 0 = one per CPU this
    /// process may run on (affinity and cgroup quota included).
    pub fn start(count: usize) -> io::Result<Workers> {
        let count = match count {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let stop = CancellationToken::new();
        // A failure half-way stops the threads already started.
        let started = stop.clone().drop_guard();
        let mut handles = Vec::with_capacity(count);
        for i in 0..count {
            // Sockets and timers only: signals and child processes are the control runtime's.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()?;
            handles.push(rt.handle().clone());
            let stop = stop.clone();
            // Not joined: a thread ends as soon as its runtime sees the token, and joining from
            // the async context that drops `Workers` would block it.
            std::thread::Builder::new()
                .name(format!("pglb-worker-{i}"))
                .spawn(move || rt.block_on(stop.cancelled()))?;
        }
        started.disarm();
        Ok(Workers { handles, stop })
    }

    /// Binds one listening socket per thread on `addr` (all on the same port: `SO_REUSEPORT`)
    /// and registers each with its thread's runtime. Fails if any bind fails, e.g. a port taken
    /// by another program.
    pub fn bind(&self, addr: SocketAddr) -> io::Result<PortGroup> {
        let mut listeners = Vec::with_capacity(self.handles.len());
        let mut local = addr;
        for h in &self.handles {
            let sock = super::listener::bind_socket(local, true)?;
            // Port 0 binds the first socket to a free port; the others join that one.
            local = sock.local_addr()?.as_socket().unwrap_or(local);
            let listener = {
                let _in_runtime = h.enter();
                TcpListener::from_std(sock.into())?
            };
            listeners.push((h.clone(), listener));
        }
        Ok(PortGroup { local, listeners })
    }
}

/// One port's listening sockets, one per worker thread, each registered with its thread.
pub struct PortGroup {
    /// The bound address (with the port the kernel chose, if port 0 was asked for).
    pub local: SocketAddr,
    pub listeners: Vec<(Handle, TcpListener)>,
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_thread_gets_a_listener_on_one_port_and_serves_it() {
        let w = Workers::start(2).unwrap();
        let group = w.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_eq!(group.listeners.len(), 2);
        let port = group.local.port();
        assert_ne!(port, 0);
        assert!(group
            .listeners
            .iter()
            .all(|(_, l)| l.local_addr().unwrap().port() == port));
        // Every listener accepts on its own thread; the kernel picks one per connection.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for (h, l) in group.listeners {
            let tx = tx.clone();
            h.spawn(async move {
                while let Ok((_s, _)) = l.accept().await {
                    let _ = tx.send(std::thread::current().name().map(str::to_string));
                }
            });
        }
        for _ in 0..20 {
            let _c = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            let name = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
                .await
                .expect("accepted in time")
                .unwrap();
            assert!(name.unwrap_or_default().starts_with("pglb-worker-"));
        }
    }

    #[tokio::test]
    async fn a_port_taken_by_another_program_fails_the_bind() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let w = Workers::start(2).unwrap();
        assert!(w.bind(taken.local_addr().unwrap()).is_err());
    }
}
