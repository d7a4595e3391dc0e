//! One client connection: read its first packet (the only one pglb reads, but for the packet
//! after a declined SSL/GSS request, which may be a cancel), route it, connect a backend (trying
//! the next candidate when one refuses), forward the first packet and splice. Write-port sessions
//! end when their backend stops being the primary.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::affinity::{Affinity, Pick, Registration, Rule};
use super::splice::{splice, Activity, SpliceError};
use super::PortRole;
use crate::backend::net::{connect_tcp, ConnectError, SocketTuning};
use crate::backend::probe::ProbeError;
use crate::backend::{SessionSlot, SlotWaiters};
use crate::config::Config;
use crate::control::Control;
use crate::metrics as m;
use crate::pg::{self, sqlstate, FirstPacket, PacketError};
use crate::tls::ServerTls;
use crate::view::{Condition, Status, Target, View};

/// Why reading the first packet failed.
#[derive(Debug, thiserror::Error)]
enum FirstPacketError {
    #[error("client closed the connection before sending a startup packet")]
    Closed,
    #[error("no startup packet within {0:?}")]
    Timeout(Duration),
    #[error("invalid startup packet: {0}")]
    Invalid(#[from] PacketError),
    #[error("read startup packet: {0}")]
    Io(std::io::Error),
}

async fn read_packet<S: AsyncRead + Unpin>(client: &mut S) -> Result<Vec<u8>, FirstPacketError> {
    let eof = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FirstPacketError::Closed,
        _ => FirstPacketError::Io(e),
    };
    let mut header = [0u8; 4];
    client.read_exact(&mut header).await.map_err(eof)?;
    if header[0] == pg::TLS_HANDSHAKE {
        // Direct TLS: a ClientHello record, whose length is in its fifth byte's pair.
        let mut fifth = [0u8; 1];
        client.read_exact(&mut fifth).await.map_err(eof)?;
        let len = pg::tls_record_length([header[0], header[1], header[2], header[3], fifth[0]])?;
        let mut record = vec![0u8; len];
        record[..4].copy_from_slice(&header);
        record[4] = fifth[0];
        client.read_exact(&mut record[5..]).await.map_err(eof)?;
        return Ok(record);
    }
    let len = pg::packet_length(header)?;
    let mut packet = vec![0u8; len];
    packet[..4].copy_from_slice(&header);
    client.read_exact(&mut packet[4..]).await.map_err(eof)?;
    Ok(packet)
}

async fn read_first<S: AsyncRead + Unpin>(
    client: &mut S,
    timeout: Duration,
) -> Result<(Vec<u8>, FirstPacket), FirstPacketError> {
    let packet = tokio::time::timeout(timeout, read_packet(client))
        .await
        .map_err(|_| FirstPacketError::Timeout(timeout))??;
    let parsed = pg::parse_first_packet(&packet)?;
    Ok((packet, parsed))
}

async fn send_fatal<S: AsyncWrite + Unpin>(client: &mut S, code: &str, message: &str) {
    let _ = client.write_all(&pg::error_response(code, message)).await;
    let _ = client.shutdown().await;
}

/// Everything a session needs from the process, behind one pointer: every session holds it for
/// its whole life, so its size counts per idle session.
pub type SessionContext = Arc<SessionShared>;

pub struct SessionShared {
    pub control: Control,
    /// Round-robin position and leastconn tie-breaker, shared by every worker thread.
    pub rr: AtomicUsize,
    /// Sessions waiting for a slot on a full backend.
    pub waiters: Arc<SlotWaiters>,
    /// Cancelled when the shutdown grace period is over: cut every session.
    pub hard_stop: CancellationToken,
    /// Cancelled on SIGTERM: sessions waiting for a backend get their FATAL at once.
    pub shutting_down: CancellationToken,
    /// Encrypted read sessions by client address, for `[read] tls_affinity`.
    pub affinity: Arc<Affinity>,
}

/// A client's whole life: the first exchange, then the session.
pub async fn handle(
    client: TcpStream,
    peer: SocketAddr,
    port: PortRole,
    ctx: SessionContext,
    id: u64,
) {
    let span = tracing::info_span!(
        "conn",
        id,
        %peer,
        port = port.as_str(),
        backend = tracing::field::Empty,
        sni = tracing::field::Empty
    );
    // The first exchange (reading the startup packet, connecting a backend, refusing) has the
    // biggest state a session passes through and the shortest-lived: it runs on the heap, so the
    // task that stays behind for the session's life is sized by the splice alone.
    let started = Box::pin(start(client, peer, port, ctx.clone()).instrument(span.clone())).await;
    if let Some(s) = started {
        session(s, port, ctx).instrument(span).await;
    }
}

/// A session past its first exchange: sockets, slot, and its entry in the TLS affinity table
/// (encrypted read sessions only).
struct Started {
    client: TcpStream,
    backend: TcpStream,
    slot: SessionSlot,
    affinity: Option<Registration>,
}

/// Reads the first packet, routes it and connects a backend that answered. `None` when the
/// client was answered here (cancel forwarded, refused, gone).
async fn start(
    mut client: TcpStream,
    peer: SocketAddr,
    port: PortRole,
    ctx: SessionContext,
) -> Option<Started> {
    let view = ctx.control.view();
    let cfg = view.config().clone();
    drop(view);
    // The client socket has its options from the listener (proxy::listener).
    let tuning = SocketTuning::from(&cfg.proxy);
    let startup_timeout = cfg.proxy.client_startup_timeout;
    let (first, parsed) = match read_first(&mut client, startup_timeout).await {
        Ok(p) => p,
        Err(FirstPacketError::Closed) => {
            // A TCP health probe or a port scan: expected noise.
            debug!("client closed before sending a startup packet");
            return None;
        }
        Err(e @ FirstPacketError::Timeout(_)) => {
            m::client_rejected(port, "startup_timeout");
            warn!(reason = %e, "closing client: startup timeout");
            return None;
        }
        Err(FirstPacketError::Invalid(e)) => {
            m::client_rejected(port, e.kind());
            warn!(reason = %e, "closing client: invalid startup packet");
            let code = match e {
                PacketError::UnsupportedProtocol { .. } => sqlstate::FEATURE_NOT_SUPPORTED,
                _ => sqlstate::PROTOCOL_VIOLATION,
            };
            send_fatal(&mut client, code, &format!("pglb: {e}")).await;
            return None;
        }
        Err(e @ FirstPacketError::Io(_)) => {
            debug!(reason = %e, "client error before startup");
            return None;
        }
    };

    if let FirstPacket::CancelRequest { pid, key } = &parsed {
        forward_cancel(&ctx.control.view(), *pid, key, cfg.proxy.connect_timeout).await;
        return None;
    }
    if let FirstPacket::DirectTls { sni } = &parsed {
        // The name the client asked for, on every line of this session (its TLS is its own).
        tracing::Span::current().record("sni", sni.as_deref().unwrap_or(""));
        debug!(
            sni = sni.as_deref(),
            "direct TLS: ClientHello passed through by port"
        );
    }

    // An encrypted read connection may be a cancel for a session of the same address, which
    // pglb cannot read: it follows that session's request (proxy::affinity).
    let encrypted = matches!(
        parsed,
        FirstPacket::SslRequest | FirstPacket::GssEncRequest | FirstPacket::DirectTls { .. }
    );
    let affinity_on = port == PortRole::Read && cfg.read.tls_affinity;
    let follow = if affinity_on && encrypted {
        Some(ctx.affinity.pick(peer.ip()))
    } else {
        None
    };
    let route = Route {
        client: peer.ip(),
        follow,
    };

    let (slot, mut backend_stream, mut answer) = match choose(&ctx, port, &cfg, &first, &route)
        .await
    {
        Choice::Connected(slot, stream, answer) => (slot, stream, answer),
        Choice::NoBackend => {
            let message = match port {
                PortRole::Write => "pglb: no primary is available for writes",
                PortRole::Read => "pglb: no replica is available for reads",
            };
            m::client_rejected(port, "no_backend");
            warn!(
                first_packet = parsed.kind(),
                "no backend for this port: {message}"
            );
            refuse(
                &mut client,
                (&first, &parsed),
                sqlstate::CANNOT_CONNECT_NOW,
                message,
                startup_timeout,
                cfg.listen.tls.as_ref(),
            )
            .await;
            return None;
        }
        Choice::Full { backend, maxconn } => {
            let message = format!(
                "pglb: too many connections: backend {backend} is at its maxconn ({maxconn}) and no session ended within queue_timeout ({:?})",
                cfg.proxy.queue_timeout
            );
            m::client_rejected(port, "queue_timeout");
            warn!(%backend, maxconn, "queue timeout: refusing client");
            refuse(
                &mut client,
                (&first, &parsed),
                sqlstate::TOO_MANY_CONNECTIONS,
                &message,
                startup_timeout,
                cfg.listen.tls.as_ref(),
            )
            .await;
            return None;
        }
    };
    let backend = slot.backend().clone();
    tracing::Span::current().record("backend", backend.name.as_str());
    if let Err(e) = tuning.apply(&backend_stream) {
        debug!(error = %e, "cannot tune backend socket");
    }
    // The request the backend answered last (an SSL/GSS request it declined is followed by
    // the client's next packet, read here too).
    let mut asked = parsed.clone();
    loop {
        // The backend's answer, read while connecting, goes out first.
        if let Err(e) = client.write_all(&answer).await {
            debug!(error = %e, "session ended by client error");
            return None;
        }
        backend
            .counters(port)
            .bytes_out
            .fetch_add(answer.len() as u64, Ordering::Relaxed);
        let declined = matches!(asked, FirstPacket::SslRequest | FirstPacket::GssEncRequest)
            && answer.as_slice() == b"N";
        if !declined {
            break;
        }
        // Encryption declined: the client's next packet is plaintext, and may be a
        // CancelRequest (libpq 17's cancel with sslmode=prefer against a server without SSL),
        // which goes wherever a first-packet cancel goes.
        let (next, next_parsed) = match read_first(&mut client, startup_timeout).await {
            Ok(p) => p,
            Err(e) => {
                debug!(reason = %e, "client gone after encryption was declined");
                return None;
            }
        };
        if let FirstPacket::CancelRequest { pid, key } = &next_parsed {
            drop(backend_stream);
            drop(slot);
            forward_cancel(&ctx.control.view(), *pid, key, cfg.proxy.connect_timeout).await;
            return None;
        }
        let exchange = async {
            backend_stream.write_all(&next).await?;
            backend
                .counters(port)
                .bytes_in
                .fetch_add(next.len() as u64, Ordering::Relaxed);
            match next_parsed {
                // libpq asks for GSS, then SSL: the server answers that too.
                FirstPacket::SslRequest | FirstPacket::GssEncRequest => {
                    read_answer(&backend_stream).await
                }
                _ => Ok(Vec::new()),
            }
        };
        answer = match tokio::time::timeout(cfg.proxy.connect_timeout, exchange).await {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                warn!(error = %e, "session ended by backend error after encryption was declined");
                return None;
            }
            Err(_) => {
                warn!(timeout = ?cfg.proxy.connect_timeout, "backend did not answer the client's second encryption request");
                return None;
            }
        };
        asked = next_parsed;
    }
    // Encrypted read sessions are the ones a cancel inside TLS may be for.
    let encrypted_session = match asked {
        FirstPacket::DirectTls { .. } => true,
        FirstPacket::SslRequest => answer.first() == Some(&b'S'),
        FirstPacket::GssEncRequest => answer.first() == Some(&b'G'),
        _ => false,
    };
    let affinity = (affinity_on && encrypted_session)
        .then(|| ctx.affinity.register(peer.ip(), backend.clone()));
    debug!(first_packet = parsed.kind(), "session started");
    // Nothing of the first exchange is needed from here on: free it before the session idles
    // for hours (the startup packet and its parsed names are a few hundred bytes a session).
    drop((answer, first, parsed, asked, backend));
    Some(Started {
        client,
        backend: backend_stream,
        slot,
        affinity,
    })
}

/// No backend: answer like a PostgreSQL server would, so psql prints the reason. A client that
/// asked for TLS gets it when pglb has a certificate (`[listen] tls_cert`), and the FATAL inside
/// it; without one, encryption is declined ('N') and a client that insists on TLS hangs up
/// with its own message (docs/operations.md). A direct-TLS client without one is just closed.
async fn refuse(
    client: &mut TcpStream,
    (first_bytes, first): (&[u8], &FirstPacket),
    code: &str,
    message: &str,
    timeout: Duration,
    tls: Option<&ServerTls>,
) {
    let mut first = first.clone();
    // libpq may try GSS then SSL: answer up to two requests.
    for _ in 0..2 {
        match (&first, tls) {
            (FirstPacket::SslRequest, Some(tls)) => {
                if client.write_all(b"S").await.is_err() {
                    return;
                }
                refuse_in_tls(client, tls, &[], code, message, timeout).await;
                return;
            }
            (FirstPacket::DirectTls { .. }, Some(tls)) => {
                refuse_in_tls(client, tls, first_bytes, code, message, timeout).await;
                return;
            }
            (FirstPacket::DirectTls { .. }, None) => return,
            (FirstPacket::SslRequest | FirstPacket::GssEncRequest, _) => {
                // Decline encryption, then the client sends its next packet in clear.
                if client.write_all(b"N").await.is_err() {
                    return;
                }
                match read_first(client, timeout).await {
                    Ok((_, next)) => first = next,
                    Err(_) => return,
                }
            }
            _ => break,
        }
    }
    if matches!(first, FirstPacket::Startup { .. }) {
        send_fatal(client, code, message).await;
    }
}

/// Completes TLS with pglb's own certificate (after `S`, or on a ClientHello already read:
/// `replay`), reads the StartupMessage inside and answers it with the FATAL.
async fn refuse_in_tls(
    client: &mut TcpStream,
    tls: &ServerTls,
    replay: &[u8],
    code: &str,
    message: &str,
    timeout: Duration,
) {
    let (r, w) = client.split();
    let io = tokio::io::join(replay.chain(r), w);
    let accepted = tokio::time::timeout(timeout, tls.acceptor().accept(io)).await;
    let mut stream = match accepted {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(error = %e, "TLS with pglb's certificate failed; closing");
            return;
        }
        Err(_) => return,
    };
    if let Ok((_, FirstPacket::Startup { .. })) = read_first(&mut stream, timeout).await {
        send_fatal(&mut stream, code, message).await;
    }
}

enum Choice {
    /// The slot, the connected backend and its first answer, not yet sent to the client.
    Connected(SessionSlot, TcpStream, Vec<u8>),
    NoBackend,
    Full {
        backend: String,
        maxconn: u64,
    },
}

/// Picks and connects a backend: candidates in order, skipping any at its maxconn and any that
/// refuses (which also counts as a failed check). When every candidate is full, waits for a
/// session to end, up to `queue_timeout`.
async fn choose(
    ctx: &SessionContext,
    port: PortRole,
    cfg: &Config,
    first: &[u8],
    route: &Route,
) -> Choice {
    let deadline = tokio::time::Instant::now() + cfg.proxy.queue_timeout;
    let mut counted = false;
    let mut queued = false;
    // Registered as a waiter only once every candidate was found full; a session that ends
    // wakes waiters only when there are some, so the common path takes no shared lock.
    let mut waiting = None;
    let mut backend_wait: Option<BackendWait> = None;
    loop {
        // Enabled before looking, so a slot freed in between is not missed.
        let freed = ctx.waiters.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();
        let view = ctx.control.view();
        let mut full: Option<(String, u64)> = None;
        // A server closed a direct-TLS connection without a byte: before PostgreSQL 17 servers
        // do not accept direct TLS, and waiting for another answer would not change that.
        let mut no_direct_tls = false;
        // A write connection waiting for its primary's first answer is routed again when the
        // primary changes meanwhile (a hung primary replaced: its connect would otherwise wait
        // out connect_timeout before trying the new one).
        let mut rerouted = false;
        let mut candidates = view.candidates(port, &ctx.rr, route.client);
        if let Some(pick) = &route.follow {
            let rule = follow(&view, &mut candidates, pick.as_ref());
            if !counted {
                counted = true;
                m::tls_affinity(port, rule.as_str());
                if let Some(p) = pick {
                    debug!(
                        rule = rule.as_str(),
                        follows = %p.backend.name,
                        "encrypted connection from an address with a busy session"
                    );
                }
            }
        }
        for t in candidates {
            let Some(mut slot) = t.handle.try_reserve(port, t.view.maxconn, &ctx.waiters) else {
                full.get_or_insert((t.view.name.clone(), t.view.maxconn));
                continue;
            };
            let b = t.handle;
            let address = &t.view.address;
            let opened = match port {
                PortRole::Write => {
                    let mut routing = ctx.control.subscribe();
                    routing.borrow_and_update();
                    let attempt = open_backend(address, cfg.proxy.connect_timeout, first);
                    tokio::pin!(attempt);
                    // Routing is no longer published once the control task has stopped
                    // (shutdown): the attempt then just runs its course.
                    let mut watching = true;
                    loop {
                        tokio::select! {
                            r = &mut attempt => break Some(r),
                            c = routing.changed(), if watching => match c {
                                Err(_) => watching = false,
                                Ok(()) => {
                                    let primary = routing.borrow_and_update().primary.clone();
                                    if primary.as_deref() != Some(b.name.as_str()) {
                                        break None;
                                    }
                                }
                            },
                        }
                    }
                }
                PortRole::Read => {
                    Some(open_backend(address, cfg.proxy.connect_timeout, first).await)
                }
            };
            let Some(opened) = opened else {
                info!(backend = %b.name, "primary changed while connecting: routing the session again");
                rerouted = true;
                break;
            };
            match opened {
                Ok((s, answer)) => {
                    slot.connected();
                    slot.backend()
                        .counters(port)
                        .bytes_in
                        .fetch_add(first.len() as u64, Ordering::Relaxed);
                    return Choice::Connected(slot, s, answer);
                }
                Err(ConnectError::Io(e))
                    if first.first() == Some(&pg::TLS_HANDSHAKE)
                        && e.kind() == std::io::ErrorKind::UnexpectedEof =>
                {
                    warn!(backend = %b.name, %address, "backend closed a direct-TLS connection without answering (PostgreSQL before 17 does not accept direct TLS)");
                    m::backend_connect_failed(&b.name, "io");
                    no_direct_tls = true;
                }
                Err(e) => {
                    warn!(backend = %b.name, %address, reason = %e, "backend connect failed, trying the next candidate");
                    m::backend_connect_failed(&b.name, e.kind());
                    if matches!(
                        e,
                        ConnectError::Refused | ConnectError::Timeout(_) | ConnectError::Dns(_)
                    ) {
                        ctx.control.connect_failed(b, ProbeError::from(e));
                    }
                }
            }
        }
        drop(view);
        if rerouted {
            continue;
        }
        if no_direct_tls && full.is_none() {
            return Choice::NoBackend;
        }
        let Some((backend, maxconn)) = full else {
            // No backend for this port right now (a failover in progress, every candidate
            // refusing): wait for one, up to wait_for_backend, instead of failing the client.
            let wait = cfg.proxy.wait_for_backend;
            if wait.is_zero() || ctx.shutting_down.is_cancelled() {
                return Choice::NoBackend;
            }
            let w = match &mut backend_wait {
                Some(w) => w,
                None => {
                    let mut rx = ctx.control.subscribe();
                    rx.borrow_and_update();
                    m::sessions_waiting(port, 1.0);
                    let count = ctx.control.view().routing.waiting.clone();
                    count.fetch_add(1, Ordering::Relaxed);
                    debug!(wait = ?wait, "no backend for this port: waiting for one");
                    // Look once more now that changes are watched, so none is missed.
                    backend_wait = Some(BackendWait {
                        rx,
                        until: tokio::time::Instant::now() + wait,
                        port,
                        count,
                    });
                    continue;
                }
            };
            if tokio::time::Instant::now() >= w.until {
                return Choice::NoBackend;
            }
            tokio::select! {
                r = w.rx.changed() => {
                    if r.is_err() {
                        return Choice::NoBackend;
                    }
                }
                _ = tokio::time::sleep_until(w.until) => {}
                // A refusing backend may come back without any routing change.
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = ctx.shutting_down.cancelled() => return Choice::NoBackend,
            }
            continue;
        };
        if waiting.is_none() {
            // Look once more as a registered waiter before sleeping.
            waiting = Some(ctx.waiters.register());
            continue;
        }
        if !queued {
            queued = true;
            m::session_queued(port);
            info!(%backend, maxconn, "backend at maxconn: session queued");
        }
        if tokio::time::Instant::now() >= deadline {
            return Choice::Full { backend, maxconn };
        }
        tokio::select! {
            _ = &mut freed => {}
            _ = tokio::time::sleep_until(deadline) => {}
            // Routing may change (a new replica comes up) without any session ending.
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

/// How a new session is routed beyond its port: the client's address (`balance = "source"`)
/// and, for an encrypted read connection with `tls_affinity`, the session it may be a cancel
/// for (`Some(None)`: the address has none busy).
struct Route {
    client: std::net::IpAddr,
    follow: Option<Option<Pick>>,
}

/// Puts the followed session's backend first: a candidate, or a draining backend that is still
/// up (a cancel must still reach the sessions it keeps). A backend that takes no connections
/// (down, disabled, gone) leaves the balanced order.
fn follow<'a>(view: &'a View, candidates: &mut Vec<Target<'a>>, pick: Option<&Pick>) -> Rule {
    let Some(pick) = pick else {
        return Rule::None;
    };
    let name = pick.backend.name.as_str();
    if let Some(i) = candidates.iter().position(|t| t.view.name == name) {
        let t = candidates.remove(i);
        candidates.insert(0, t);
        return pick.rule;
    }
    match view.target_by_name(name) {
        Some(t)
            if t.view.state == Status::Draining
                && t.view.condition != Condition::Down
                && view.keeps(PortRole::Read, name) =>
        {
            candidates.insert(0, t);
            pick.rule
        }
        _ => Rule::Unavailable,
    }
}

/// A session waiting for its port to have a backend: counted in `pglb_sessions_waiting` until
/// dropped.
struct BackendWait {
    rx: tokio::sync::watch::Receiver<Arc<View>>,
    until: tokio::time::Instant,
    port: PortRole,
    count: Arc<std::sync::atomic::AtomicU64>,
}

impl Drop for BackendWait {
    fn drop(&mut self) {
        m::sessions_waiting(self.port, -1.0);
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Connects, forwards the client's first packet and waits until the backend answers, all within
/// `timeout`: a backend that accepts TCP but never speaks (hung, SIGSTOPped) is a failed connect
/// and the next candidate gets the same first packet; the client has seen nothing yet.
async fn open_backend(
    address: &str,
    timeout: Duration,
    first: &[u8],
) -> Result<(TcpStream, Vec<u8>), ConnectError> {
    let started = tokio::time::Instant::now();
    let mut s = connect_tcp(address, timeout).await?;
    let exchange = async {
        s.write_all(first).await?;
        // Read the server's first answer ('S'/'N' to an SSLRequest, an authentication request
        // to a StartupMessage). A server that accepted and then died (a postmaster killed with
        // the connection in its accept queue) closes or resets without a byte: a failed
        // connect, and the next candidate gets the packet, instead of the client seeing "server
        // closed the connection". The bytes are the ones the splice would read next anyway.
        read_answer(&s).await
    };
    match tokio::time::timeout_at(started + timeout, exchange).await {
        Ok(Ok(answer)) => Ok((s, answer)),
        Ok(Err(e)) => Err(ConnectError::io(e)),
        Err(_) => Err(ConnectError::Timeout(timeout)),
    }
}

/// Reads what the backend has sent (at least a byte, up to `FIRST_ANSWER_MAX`); EOF before a
/// byte is an `UnexpectedEof` error.
async fn read_answer(s: &TcpStream) -> std::io::Result<Vec<u8>> {
    let mut answer = vec![0u8; FIRST_ANSWER_MAX];
    loop {
        s.readable().await?;
        match s.try_read(&mut answer) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "backend closed the connection before answering",
                ))
            }
            Ok(n) => {
                answer.truncate(n);
                return Ok(answer);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// Most a backend's first answer is read into before splicing takes over (an authentication
/// request is a few dozen bytes; the rest, if any, is spliced).
const FIRST_ANSWER_MAX: usize = 1024;

/// A client over the listener's maxconn: answer like PostgreSQL does (53300) and close.
pub async fn refuse_over_limit(
    mut client: TcpStream,
    port: PortRole,
    maxconn: u64,
    timeout: Duration,
    tls: Option<ServerTls>,
) {
    let message = format!(
        "pglb: too many connections: the {} port is at its maxconn ({maxconn})",
        port.as_str()
    );
    if let Ok((bytes, first)) = read_first(&mut client, timeout).await {
        refuse(
            &mut client,
            (&bytes, &first),
            sqlstate::TOO_MANY_CONNECTIONS,
            &message,
            timeout,
            tls.as_ref(),
        )
        .await;
    }
}

async fn session(started: Started, port: PortRole, ctx: SessionContext) {
    let Started {
        client,
        backend: backend_stream,
        slot,
        affinity,
    } = started;
    let backend = slot.backend().clone();
    let counters = backend.counters(port);

    let mut routing = ctx.control.subscribe();
    let idle_timeout = {
        let view = routing.borrow();
        let cfg = view.config();
        match port {
            PortRole::Write => cfg.proxy.write_idle_timeout,
            PortRole::Read => cfg.proxy.read_idle_timeout,
        }
    };
    let name = backend.name.clone();
    let still_allowed = async {
        loop {
            if !routing.borrow_and_update().keeps(port, &name) {
                return;
            }
            if routing.changed().await.is_err() {
                // The cluster is gone: the process is ending; let the hard stop decide.
                std::future::pending::<()>().await;
            }
        }
    };

    let activity = Activity::new();
    // The idle timer lives on the heap, and only where a timeout is set: inline, its state would
    // cost every session ~150 bytes for a future that never runs on ports without one.
    let mut idle = (!idle_timeout.is_zero()).then(|| Box::pin(idle_timer(&activity, idle_timeout)));
    let idle_fired = async {
        match idle.as_mut() {
            Some(timer) => timer.await,
            None => std::future::pending().await,
        }
    };
    let result = tokio::select! {
        r = splice(&client, &backend_stream, &counters.bytes_in, &counters.bytes_out, (!idle_timeout.is_zero()).then_some(&activity), affinity.as_ref().map(Registration::inflight)) => r,
        quiet = idle_fired => {
            m::session_cut(port, "idle_timeout");
            info!(reason = "idle_timeout", quiet = ?quiet, "closing session: idle");
            return;
        }
        _ = still_allowed => {
            let reason = if port == PortRole::Write && ctx.control.view().primary.as_deref() != Some(backend.name.as_str()) {
                "writer_changed"
            } else {
                "backend_cut"
            };
            m::session_cut(port, reason);
            info!(reason, "closing session: its backend may no longer serve this port");
            return;
        }
        _ = ctx.hard_stop.cancelled() => {
            m::session_cut(port, "shutdown");
            info!(reason = "shutdown", "closing session: shutdown grace period over");
            return;
        }
    };
    match result {
        Ok(()) => debug!("session ended"),
        Err(SpliceError::Client(e)) => debug!(error = %e, "session ended by client error"),
        Err(SpliceError::Backend(e)) => warn!(error = %e, "session ended by backend error"),
    }
}

/// Resolves once the session has moved no byte for `timeout`, with how long it was quiet.
async fn idle_timer(activity: &Activity, timeout: Duration) -> Duration {
    loop {
        let quiet = activity.quiet_for();
        if quiet >= timeout {
            return quiet;
        }
        tokio::time::sleep(timeout - quiet).await;
    }
}

/// Sends a CancelRequest to every backend the port could have used: pglb does not track which
/// backend a cancel key belongs to, and a key is meaningless (ignored) on any other server.
async fn forward_cancel(view: &View, pid: u32, key: &[u8], timeout: Duration) {
    let packet = pg::cancel_request(pid, key);
    // Every backend it may belong to: configured and draining.
    let sends = view.backends.iter().map(|b| {
        let address = b.address.clone();
        let name = b.name.clone();
        let packet = &packet;
        async move {
            match connect_tcp(&address, timeout).await {
                Ok(mut s) => {
                    if let Err(e) = s.write_all(packet).await {
                        debug!(backend = %name, error = %e, "cancel forward failed");
                    }
                    // PostgreSQL closes after reading it; wait for that so it is delivered.
                    let mut sink = [0u8; 1];
                    let _ = tokio::time::timeout(timeout, s.read(&mut sink)).await;
                }
                Err(e) => debug!(backend = %name, reason = %e, "cancel forward: connect failed"),
            }
        }
    });
    futures_util::future::join_all(sends).await;
    info!(pid, key_bytes = key.len(), "cancel request forwarded");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an `async fn` returns, without calling it.
    fn future_size<F, A, B, C, D, E, Fut>(_: &F) -> usize
    where
        F: FnOnce(A, B, C, D, E) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    fn future_size3<F, A, B, C, Fut>(_: &F) -> usize
    where
        F: FnOnce(A, B, C) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// An idle session's memory is mostly its task: keep the states that last (the splice) small
    /// and the ones that do not (connecting a backend) on the heap.
    #[test]
    fn the_session_task_stays_small() {
        let size = future_size(&handle);
        eprintln!(
            "handle future: {size} bytes, session: {}",
            future_size3(&session)
        );
        assert!(size <= 1200, "the session task grew to {size} bytes");
    }
}
