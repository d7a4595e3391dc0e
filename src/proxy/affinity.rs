//! Where an encrypted connection to the read port goes when it may be a cancel.
//!
//! libpq 17+ (psycopg's `cancel_safe()`), asyncpg and tokio-postgres send a CancelRequest
//! *inside* TLS on a new connection: SSLRequest (or a direct-TLS ClientHello), the handshake,
//! then the CancelRequest, which pglb cannot read. The cancel key is only known to the server
//! that issued it, so the connection must reach the server of the session it cancels, before
//! pglb can know that it is a cancel at all.
//!
//! What pglb can see is the client's address and, per encrypted read session, whether its
//! client is waiting for an answer: the splice notes when the client spoke after the server's
//! last byte (a request in flight: a long query keeps the server silent) and when the server
//! last spoke (an answer being streamed back). A new encrypted read connection from an address
//! that has such a session goes to that session's backend:
//!
//! 1. `inflight`: the session whose request has waited longest (the query being cancelled is
//!    the slow one: a timeout or an impatient user fired after it ran a while, while short
//!    queries of the same pool come and go);
//! 2. `answering`: else the session streaming a long answer (its server has been sending for
//!    at least [`STREAMING`] since the request and sent within the last [`ANSWERING`]: a large
//!    result being read), the one whose server sent most recently;
//! 3. `none`: else the port's balance, as for any new session.
//!
//! Cost: a new encrypted session (not a cancel) from a host with a request in flight lands on
//! that request's backend instead of the balanced choice (docs/operations.md, "Cancel").

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::backend::Backend;

/// A session whose server sent bytes this recently may be streaming an answer (rule 2)...
pub const ANSWERING: Duration = Duration::from_secs(1);
/// ... if its answer has gone on this long: a short answer (a query's result, a login step)
/// makes no session a target, so a pool that opens its sessions one after another still has
/// them balanced.
pub const STREAMING: Duration = Duration::from_millis(100);

const SHARDS: usize = 16;

/// Nanoseconds since the first call, never 0 (0 means "none" in [`Inflight`]).
fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    epoch.elapsed().as_nanos() as u64 + 1
}

/// One session's request/answer state, written by its splice (both directions are polled by
/// one task, so the writes are ordered), read by new connections on any thread.
#[derive(Debug, Default)]
pub struct Inflight {
    /// When the client started its current request: its first byte after the server's last;
    /// 0 when the server spoke last.
    request: AtomicU64,
    /// When the server last sent bytes; 0 before it did.
    answer: AtomicU64,
    /// When the server's current answer started: its first byte after the client's last.
    answer_start: AtomicU64,
}

impl Inflight {
    /// The client sent bytes.
    #[inline]
    pub fn client_spoke(&self) {
        if self.request.load(Ordering::Relaxed) == 0 {
            self.request.store(now_ns(), Ordering::Relaxed);
        }
    }

    /// The server sent bytes.
    #[inline]
    pub fn server_spoke(&self) {
        let now = now_ns();
        if self.request.load(Ordering::Relaxed) != 0
            || self.answer_start.load(Ordering::Relaxed) == 0
        {
            self.request.store(0, Ordering::Relaxed);
            self.answer_start.store(now, Ordering::Relaxed);
        }
        self.answer.store(now, Ordering::Relaxed);
    }
}

/// How an encrypted read connection was routed (the `rule` label of `pglb_tls_affinity_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// To the backend of the address's longest-waiting request.
    Inflight,
    /// To the backend streaming a long answer to the address (the most recent one).
    Answering,
    /// The address had such a session, but its backend takes no connections now (down,
    /// disabled): balanced.
    Unavailable,
    /// No session of the address waits or is being answered: balanced.
    None,
}

impl Rule {
    pub const ALL: [Rule; 4] = [
        Rule::Inflight,
        Rule::Answering,
        Rule::Unavailable,
        Rule::None,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Inflight => "inflight",
            Rule::Answering => "answering",
            Rule::Unavailable => "unavailable",
            Rule::None => "none",
        }
    }
}

/// The backend a new encrypted connection should try first, and why.
#[derive(Debug, Clone)]
pub struct Pick {
    pub backend: Arc<Backend>,
    pub rule: Rule,
}

struct Entry {
    backend: Arc<Backend>,
    inflight: Inflight,
    /// Where it is registered, for its removal.
    table: Arc<Affinity>,
    ip: IpAddr,
}

/// Encrypted read sessions by client address, shared by every worker thread.
pub struct Affinity {
    shards: [Mutex<HashMap<IpAddr, Vec<Arc<Entry>>>>; SHARDS],
}

impl Default for Affinity {
    fn default() -> Self {
        Affinity {
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
        }
    }
}

/// An IPv4 client seen through an IPv6 socket is the same address.
fn key(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

impl Affinity {
    fn shard(&self, ip: &IpAddr) -> &Mutex<HashMap<IpAddr, Vec<Arc<Entry>>>> {
        let h = match ip {
            IpAddr::V4(a) => u32::from(*a) as u64,
            IpAddr::V6(a) => {
                let o = a.octets();
                u64::from_le_bytes(o[8..].try_into().expect("8 bytes"))
            }
        };
        &self.shards[(h as usize) % SHARDS]
    }

    /// Registers an encrypted session of `ip` on `backend`; it counts until the guard drops.
    pub fn register(self: &Arc<Self>, ip: IpAddr, backend: Arc<Backend>) -> Registration {
        let ip = key(ip);
        let entry = Arc::new(Entry {
            backend,
            inflight: Inflight::default(),
            table: self.clone(),
            ip,
        });
        self.shard(&ip)
            .lock()
            .expect("affinity lock")
            .entry(ip)
            .or_default()
            .push(entry.clone());
        Registration(entry)
    }

    /// The backend of `ip`'s session a new encrypted connection from it may be a cancel for.
    /// `None`: no session of that address waits or is being answered (rule `none`).
    pub fn pick(&self, ip: IpAddr) -> Option<Pick> {
        let ip = key(ip);
        let now = now_ns();
        let answering_since = now.saturating_sub(ANSWERING.as_nanos() as u64);
        let map = self.shard(&ip).lock().expect("affinity lock");
        let sessions = map.get(&ip)?;
        // Oldest waiting request first; else the most recent answer within ANSWERING.
        let mut waiting: Option<(u64, &Entry)> = None;
        let mut answering: Option<(u64, &Entry)> = None;
        for e in sessions {
            let request = e.inflight.request.load(Ordering::Relaxed);
            if request != 0 {
                if waiting.is_none_or(|(t, _)| request < t) {
                    waiting = Some((request, e));
                }
                continue;
            }
            let answer = e.inflight.answer.load(Ordering::Relaxed);
            let start = e.inflight.answer_start.load(Ordering::Relaxed);
            if answer != 0
                && answer >= answering_since
                && answer.saturating_sub(start) >= STREAMING.as_nanos() as u64
                && answering.is_none_or(|(t, _)| answer > t)
            {
                answering = Some((answer, e));
            }
        }
        match (waiting, answering) {
            (Some((_, e)), _) => Some(Pick {
                backend: e.backend.clone(),
                rule: Rule::Inflight,
            }),
            (None, Some((_, e))) => Some(Pick {
                backend: e.backend.clone(),
                rule: Rule::Answering,
            }),
            (None, None) => None,
        }
    }

    /// Sessions registered for `ip` (tests, diagnostics).
    pub fn sessions(&self, ip: IpAddr) -> usize {
        let ip = key(ip);
        self.shard(&ip)
            .lock()
            .expect("affinity lock")
            .get(&ip)
            .map_or(0, Vec::len)
    }
}

/// An encrypted read session in the [`Affinity`] table; removed when dropped. One pointer, so
/// a session without one pays 8 bytes.
pub struct Registration(Arc<Entry>);

impl Registration {
    /// What the splice updates.
    pub fn inflight(&self) -> &Inflight {
        &self.0.inflight
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let e = &self.0;
        let mut map = e.table.shard(&e.ip).lock().expect("affinity lock");
        if let Some(v) = map.get_mut(&e.ip) {
            v.retain(|x| !Arc::ptr_eq(x, e));
            if v.is_empty() {
                map.remove(&e.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_longest_waiting_request_wins_then_the_latest_answer() {
        let a = Arc::new(Affinity::default());
        let b0 = Backend::new("b0");
        let b1 = Backend::new("b1");
        let client = ip("10.0.0.1");
        let s0 = a.register(client, b0.clone());
        let s1 = a.register(client, b1.clone());
        // Nobody spoke: nothing to follow.
        assert!(a.pick(client).is_none());

        // Short answers make no target.
        s0.inflight().server_spoke();
        s1.inflight().server_spoke();
        assert!(a.pick(client).is_none());
        // b1's answer goes on past STREAMING (and stays recent): it is streaming.
        std::thread::sleep(STREAMING);
        s1.inflight().server_spoke();
        let p = a.pick(client).unwrap();
        assert_eq!((p.backend.name.as_str(), p.rule), ("b1", Rule::Answering));

        // A request on b0, then one on b1: b0's has waited longer.
        s0.inflight().client_spoke();
        s1.inflight().client_spoke();
        let p = a.pick(client).unwrap();
        assert_eq!((p.backend.name.as_str(), p.rule), ("b0", Rule::Inflight));
        // More bytes of the same request do not make it younger.
        s0.inflight().client_spoke();
        assert_eq!(a.pick(client).unwrap().backend.name, "b0");
        // b0 answered: b1's request is the one in flight.
        s0.inflight().server_spoke();
        let p = a.pick(client).unwrap();
        assert_eq!((p.backend.name.as_str(), p.rule), ("b1", Rule::Inflight));

        // Another address sees none of it; the IPv4-mapped form is the same address.
        assert!(a.pick(ip("10.0.0.2")).is_none());
        assert_eq!(a.pick(ip("::ffff:10.0.0.1")).unwrap().backend.name, "b1");

        drop(s1);
        assert_eq!(a.sessions(client), 1);
        drop(s0);
        assert_eq!(a.sessions(client), 0);
        assert!(a.pick(client).is_none());
    }
}
