//! Byte copy between client and backend, both directions, half-close respected. Buffers are taken
//! from a small per-thread pool only while a direction has data to move, so an idle session holds
//! no copy buffer at all (memory per idle session is what a balancer holding thousands of
//! PostgreSQL sessions pays for).

use std::cell::RefCell;
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};

use socket2::SockRef;
use tokio::net::TcpStream;

const BUF_SIZE: usize = 32 * 1024;
const POOL_MAX: usize = 64;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

fn take_buf() -> Box<[u8]> {
    POOL.with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice())
}

fn give_buf(b: Box<[u8]>) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_MAX {
            p.push(b);
        }
    });
}

/// Last time a session moved bytes, for idle timeouts. Updated only when a timeout is set.
pub struct Activity {
    start: std::time::Instant,
    last_ms: AtomicU64,
}

impl Activity {
    pub fn new() -> Self {
        Activity {
            start: std::time::Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long the session has moved no bytes.
    pub fn quiet_for(&self) -> std::time::Duration {
        let now = self.start.elapsed().as_millis() as u64;
        std::time::Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// Which side of the session failed.
#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    #[error("client: {0}")]
    Client(#[source] io::Error),
    #[error("backend: {0}")]
    Backend(#[source] io::Error),
}

#[derive(Clone, Copy)]
enum Side {
    Client,
    Backend,
}

fn err(side: Side, e: io::Error) -> SpliceError {
    match side {
        Side::Client => SpliceError::Client(e),
        Side::Backend => SpliceError::Backend(e),
    }
}

/// Copies `from` to `to` until `from` reaches EOF, then shuts down `to`'s write half.
/// `counter` is advanced as bytes are written, so it is right even when the session is cut.
async fn pump(
    from: &TcpStream,
    from_side: Side,
    to: &TcpStream,
    to_side: Side,
    counter: &AtomicU64,
    activity: Option<&Activity>,
) -> Result<(), SpliceError> {
    loop {
        from.readable().await.map_err(|e| err(from_side, e))?;
        if let Some(a) = activity {
            a.touch();
        }
        let mut buf = take_buf();
        let r = move_available(from, from_side, to, to_side, &mut buf, counter).await;
        give_buf(buf);
        match r {
            Ok(true) => {
                // EOF: pass the half-close on; the other direction goes on.
                let _ = SockRef::from(to).shutdown(Shutdown::Write);
                return Ok(());
            }
            Ok(false) => {}
            Err(e) => return Err(e),
        }
    }
}

/// Reads and forwards until the source would block. Returns true on EOF.
async fn move_available(
    from: &TcpStream,
    from_side: Side,
    to: &TcpStream,
    to_side: Side,
    buf: &mut [u8],
    counter: &AtomicU64,
) -> Result<bool, SpliceError> {
    use std::io::Read;
    loop {
        // A read shorter than the buffer drained the socket: report it to tokio as WouldBlock
        // inside try_io, so readiness is cleared now (an edge that arrived since carries a newer
        // tick and is kept) and the recv() that would only return EAGAIN is never made. Half
        // the receive system calls per forwarded message (tokio's own poll_read does the same).
        let mut got = 0usize;
        let cap = buf.len();
        let r = from.try_io(tokio::io::Interest::READABLE, || {
            let n = (&*SockRef::from(from)).read(&mut buf[..])?;
            got = n;
            if n > 0 && n < cap {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(n)
            }
        });
        let (n, drained) = match r {
            Ok(0) => return Ok(true),
            Ok(n) => (n, false),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if got == 0 {
                    return Ok(false);
                }
                (got, true)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(err(from_side, e)),
        };
        let mut off = 0;
        while off < n {
            match to.try_write(&buf[off..n]) {
                Ok(w) => off += w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    to.writable().await.map_err(|e| err(to_side, e))?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(err(to_side, e)),
            }
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
        if drained {
            return Ok(false);
        }
    }
}

/// Splices a session until it is over: the backend finished (EOF or error), or the client
/// failed. A client half-close is passed on and the backend's answer still flows back.
pub async fn splice(
    client: &TcpStream,
    backend: &TcpStream,
    bytes_in: &AtomicU64,
    bytes_out: &AtomicU64,
    activity: Option<&Activity>,
) -> Result<(), SpliceError> {
    let c2b = pump(
        client,
        Side::Client,
        backend,
        Side::Backend,
        bytes_in,
        activity,
    );
    let b2c = pump(
        backend,
        Side::Backend,
        client,
        Side::Client,
        bytes_out,
        activity,
    );
    tokio::pin!(c2b, b2c);
    tokio::select! {
        r = &mut b2c => r,
        r = &mut c2b => match r {
            Ok(()) => b2c.await,
            Err(e) => Err(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn copies_both_ways_and_respects_half_close() {
        let (mut client_app, client) = pair().await;
        let (backend, mut backend_app) = pair().await;
        let bin = AtomicU64::new(0);
        let bout = AtomicU64::new(0);
        let big = vec![7u8; 1 << 20];
        let big2 = big.clone();
        let server = tokio::spawn(async move {
            let mut got = Vec::new();
            backend_app.read_to_end(&mut got).await.unwrap();
            // The client half-closed; the backend still answers.
            backend_app.write_all(&got[..1000]).await.unwrap();
            backend_app.shutdown().await.unwrap();
            got.len()
        });
        let cl = tokio::spawn(async move {
            client_app.write_all(&big2).await.unwrap();
            client_app.shutdown().await.unwrap();
            let mut back = Vec::new();
            client_app.read_to_end(&mut back).await.unwrap();
            back.len()
        });
        splice(&client, &backend, &bin, &bout, None).await.unwrap();
        assert_eq!(server.await.unwrap(), big.len());
        assert_eq!(cl.await.unwrap(), 1000);
        assert_eq!(bin.load(Ordering::Relaxed), big.len() as u64);
        assert_eq!(bout.load(Ordering::Relaxed), 1000);
    }

    #[tokio::test]
    async fn backend_eof_ends_the_session() {
        let (_client_app, client) = pair().await;
        let (backend, backend_app) = pair().await;
        drop(backend_app);
        let bin = AtomicU64::new(0);
        let bout = AtomicU64::new(0);
        splice(&client, &backend, &bin, &bout, None).await.unwrap();
    }
}
