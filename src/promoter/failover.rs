//! The failover driver: runs a `FailoverPlan` step by step through a `Promoter`, logging one
//! line per step with its evidence. Stop every reachable replica's WAL receiver, read their
//! positions once they hold still, check that no server became primary meanwhile, choose (pure:
//! highest received LSN, then priority, then name, never `no_failover`), wait (bounded) for the
//! replay, check again, promote, verify, give the others slots, CHECKPOINT, re-point the
//! others. Before the promotion any error puts the receivers back as they were; after it, errors
//! only leave work for the next look (re-pointing is idempotent).
//!
//! The "is anyone else writable?" checks keep asking every server the failover does not compare
//! (the old primary, an unreachable node) from the driver's start to the promotion, one attempt
//! always in flight, so a server that comes back is seen at once. One that stays silent (hung,
//! SIGSTOPped, black-holed) passes the last check once it has been silent for `Limits::silence`
//! in all, counting the looks' silence before the failover, and for at least
//! `Limits::silence_floor` within it (`judge`, pure): a bounded wait, never a skipped check.
//!
//! Also `promote_and_follow`, shared with the planned switchover.

use std::cmp::Reverse;
use std::time::Duration;

use futures_util::future::join_all;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::decide::{sync_names, FailoverPlan};
use super::promote::{ActError, Position, Promoter};
use super::settings::Member;
use crate::pg::Lsn;

/// Bounds of the waits inside a failover.
#[derive(Debug, Clone)]
pub struct Limits {
    /// For WAL receivers to stop after `primary_conninfo` was emptied.
    pub receiver_stop: Duration,
    /// For the chosen replica to replay what it received; then it is promoted anyway
    /// (promotion replays the rest first).
    pub replay: Duration,
    /// For the promoted server to leave recovery.
    pub promote: Duration,
    pub poll: Duration,
    /// Bound on one look at a server (`Settings::probe_timeout`): the old primary's last answer
    /// came at most this long after the start of the look that last saw it.
    pub look: Duration,
    /// A server that gives no answer at all passes the last "anyone writable?" check once it
    /// has been silent this long, its silence before the failover included (counted from its
    /// last answer): two look bounds, at least 3 s, the promoter's own measure of "gone"
    /// (`failover_after` is two look bounds).
    pub silence: Duration,
    /// ... and once an attempt of the failover itself has been unanswered this long: a third of
    /// `look`.
    pub silence_floor: Duration,
}

impl Default for Limits {
    /// The bounds for the default `failover_after` (3 s).
    fn default() -> Self {
        let look = Duration::from_millis(1500);
        Limits {
            receiver_stop: Duration::from_secs(3),
            replay: Duration::from_secs(30),
            promote: Duration::from_secs(60),
            poll: Duration::from_millis(100),
            look,
            silence: silence_bound(look),
            silence_floor: look / 3,
        }
    }
}

/// [`Limits::silence`] for a look bound of `look`.
fn silence_bound(look: Duration) -> Duration {
    (look * 2).max(Duration::from_secs(3))
}

impl Limits {
    /// These limits with the silence bounds of a look bound of `look` (`Settings::probe_timeout`;
    /// `run` takes it from its `Promoter`, so the bounds follow the running settings).
    pub fn with_look(&self, look: Duration) -> Limits {
        Limits {
            look,
            silence: silence_bound(look),
            silence_floor: look / 3,
            ..self.clone()
        }
    }
}

/// What the failover has heard from one server it does not compare, kept current by `ask` from
/// the driver's start to the promotion.
#[derive(Debug, Clone, PartialEq)]
pub struct Heard {
    /// When the asking started (the driver's start).
    pub since: Instant,
    /// The last answer: a position, or an error that is not silence (refused, an error from
    /// the server). `None` while every attempt timed out or none has finished.
    pub answer: Option<Answer>,
    /// The start of the first attempt after the last answer (or of the first of all), while
    /// one is in flight or has timed out: the server has been silent since.
    pub asking_since: Option<Instant>,
    /// The newest timeline any answer said it was writable on: once writable, a primary exists
    /// for this failover whatever it says later.
    pub writable_on: Option<u32>,
}

/// One answer heard.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Answer {
    /// When the attempt that got it started.
    pub asked_at: Instant,
    /// Writable (out of recovery) on this timeline; `None`: in recovery, or an error.
    pub writable_on: Option<u32>,
}

impl Heard {
    pub fn new(since: Instant) -> Heard {
        Heard {
            since,
            answer: None,
            asking_since: None,
            writable_on: None,
        }
    }
}

/// What the last check concludes about one server it does not compare.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// It said it is writable on a timeline at least the newest: a primary exists.
    Writable(u32),
    /// It answered not writable in an attempt started since the check began, or it has been
    /// silent long enough.
    NotWritable,
    /// Not yet: ask again by this time at the latest (an answer may come sooner).
    WaitUntil(Instant),
}

/// The last check's verdict on one server, at `now`, for a check that began at `fresh_from`.
/// An answer counts when its attempt started at or after `fresh_from` (it says how the server
/// is now). Silence counts once it lasted `limits.silence`, where the silence before the
/// failover (`silent_before`, the old primary's `down_for`, zero for others) is
/// included only while the server has not answered at all during the failover, and once an
/// attempt of the failover itself went unanswered for `limits.silence_floor`.
pub fn judge(
    h: &Heard,
    newest: u32,
    fresh_from: Instant,
    silent_before: Duration,
    limits: &Limits,
    now: Instant,
) -> Verdict {
    if let Some(tl) = h.writable_on.filter(|&tl| tl >= newest) {
        return Verdict::Writable(tl);
    }
    if h.answer.is_some_and(|a| a.asked_at >= fresh_from) {
        return Verdict::NotWritable;
    }
    let Some(asking_since) = h.asking_since else {
        // Between an answer and the next attempt: it starts within a poll.
        return Verdict::WaitUntil(now + limits.poll);
    };
    let before = if h.answer.is_none() {
        silent_before
    } else {
        Duration::ZERO
    };
    let start = if h.answer.is_none() {
        h.since.min(asking_since)
    } else {
        asking_since
    };
    let ready = start + silence_needed(limits.silence, before, limits.silence_floor);
    if now >= ready {
        Verdict::NotWritable
    } else {
        Verdict::WaitUntil(ready)
    }
}

/// How long the failover itself must hear nothing from a server before the last check counts
/// it as not writable: `silence` in all, less what was already silent before (`before`), but at
/// least `floor`.
pub fn silence_needed(silence: Duration, before: Duration, floor: Duration) -> Duration {
    silence.saturating_sub(before).max(floor)
}

/// Asks `m` for its position over and over, one attempt in flight at a time, and records what
/// it hears in `heard`. After an answer the next attempt waits `poll` (or a `kick`); after a
/// silent attempt (a timeout, which took its whole bound) the next starts 10 ms later. Runs
/// until dropped.
async fn ask<P: Promoter>(
    p: &P,
    m: &Member,
    heard: &watch::Sender<Heard>,
    kick: &Notify,
    poll: Duration,
) {
    loop {
        let asked_at = Instant::now();
        heard.send_modify(|h| {
            h.asking_since.get_or_insert(asked_at);
        });
        match p.position(m).await {
            Err(e) if e.is_silence() => {
                debug!(step = "anyone_writable", node = %m.name, error = %e, "no answer yet");
                // Not at once: a scripted fake times out without taking any time.
                tokio::time::sleep(poll.min(Duration::from_millis(10))).await;
            }
            r => {
                let writable_on = r
                    .as_ref()
                    .ok()
                    .filter(|q| !q.in_recovery)
                    .map(|q| q.timeline);
                heard.send_modify(|h| {
                    h.answer = Some(Answer {
                        asked_at,
                        writable_on,
                    });
                    h.asking_since = None;
                    if let Some(tl) = writable_on {
                        h.writable_on = Some(h.writable_on.map_or(tl, |w| w.max(tl)));
                    }
                });
                tokio::select! {
                    _ = tokio::time::sleep(poll) => {}
                    _ = kick.notified() => {}
                }
            }
        }
    }
}

/// The servers the failover does not compare, asked from its start (see `ask`).
struct Asked {
    nodes: Vec<AskedNode>,
    /// The failed primary and how long it was silent before the failover (its `down_for`: since
    /// its last answer arrived).
    silent_before: Option<(String, Duration)>,
}

struct AskedNode {
    member: Member,
    heard: watch::Receiver<Heard>,
    kick: std::sync::Arc<Notify>,
}

impl Asked {
    fn is_asked(&self, name: &str) -> bool {
        self.nodes.iter().any(|n| n.member.name == name)
    }

    /// Early check, no waiting: did any of them say it is writable on `newest` or later?
    fn writable_now(&self, newest: u32) -> Option<String> {
        self.nodes
            .iter()
            .find(|n| n.heard.borrow().writable_on.is_some_and(|tl| tl >= newest))
            .map(|n| n.member.name.clone())
    }

    /// The last check: waits (bounded, see `judge`) until every one of them has a verdict.
    async fn check(&self, newest: u32, limits: &Limits) -> Result<(), FailoverError> {
        let fresh_from = Instant::now();
        for n in &self.nodes {
            n.kick.notify_one();
        }
        for n in &self.nodes {
            let before = match &self.silent_before {
                Some((name, d)) if *name == n.member.name => *d,
                _ => Duration::ZERO,
            };
            let mut rx = n.heard.clone();
            loop {
                let verdict = judge(
                    &rx.borrow_and_update(),
                    newest,
                    fresh_from,
                    before,
                    limits,
                    Instant::now(),
                );
                match verdict {
                    Verdict::Writable(_) => {
                        return Err(FailoverError::PrimaryExists(n.member.name.clone()))
                    }
                    Verdict::NotWritable => {
                        let h = rx.borrow().clone();
                        info!(
                            step = "anyone_writable",
                            node = %n.member.name,
                            answered = h.answer.is_some_and(|a| a.asked_at >= fresh_from),
                            silent_for_s = h.asking_since.map(|t| t.elapsed().as_secs_f64()),
                            waited_s = fresh_from.elapsed().as_secs_f64(),
                            "failover: not writable"
                        );
                        break;
                    }
                    Verdict::WaitUntil(t) => {
                        tokio::select! {
                            _ = tokio::time::sleep_until(t) => {}
                            _ = rx.changed() => {}
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// The choice among compared replicas.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub member: Member,
    pub lsn: Lsn,
    pub timeline: u32,
    /// Ineligible replicas (no_failover) ahead of the choice: they will need a rejoin.
    pub ahead: Vec<(String, u64)>,
}

/// Picks the replica to promote: highest received LSN on the newest timeline, then higher
/// priority, then name; never `no_failover`, never a server out of recovery.
pub fn choose(positions: &[(Member, Position)]) -> Result<Choice, Vec<(String, &'static str)>> {
    let newest = positions
        .iter()
        .filter(|(_, p)| p.in_recovery)
        .map(|(_, p)| p.timeline)
        .max()
        .unwrap_or(0);
    let eligible = |m: &Member, p: &Position| -> Result<(), &'static str> {
        if !p.in_recovery {
            Err("not in recovery")
        } else if m.no_failover {
            Err("no_failover")
        } else if p.timeline < newest {
            Err("older timeline")
        } else {
            Ok(())
        }
    };
    let best = positions
        .iter()
        .filter(|(m, p)| eligible(m, p).is_ok())
        .min_by_key(|(m, p)| (Reverse(p.received()), Reverse(m.priority), m.name.clone()));
    let Some((m, p)) = best else {
        return Err(positions
            .iter()
            .map(|(m, p)| (m.name.clone(), eligible(m, p).err().unwrap_or("eligible")))
            .collect());
    };
    let ahead = positions
        .iter()
        .filter(|(o, q)| o.name != m.name && q.in_recovery && q.received() > p.received())
        .map(|(o, q)| (o.name.clone(), p.received().bytes_until(q.received())))
        .collect();
    Ok(Choice {
        member: m.clone(),
        lsn: p.received(),
        timeline: p.timeline,
        ahead,
    })
}

/// Why a failover did not promote anybody.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FailoverError {
    #[error("{0} is writable on the newest timeline: a primary exists, nothing to do")]
    PrimaryExists(String),
    #[error("no replica may be promoted: {0:?}")]
    NoCandidate(Vec<(String, &'static str)>),
    #[error("promote {node}: {source}")]
    Promote {
        node: String,
        #[source]
        source: ActError,
    },
    #[error("{node} did not leave recovery after pg_promote")]
    NotPromoted { node: String },
    /// The store gate refused: not the leader, or the guarded record did not commit. Nobody
    /// was promoted by this attempt.
    #[error("not promoted without the store's record: {source}")]
    Guard {
        #[source]
        source: ActError,
    },
}

impl FailoverError {
    pub fn kind(&self) -> &'static str {
        match self {
            FailoverError::PrimaryExists(_) => "primary_exists",
            FailoverError::NoCandidate(_) => "no_candidate",
            FailoverError::Promote { .. } => "promote_failed",
            FailoverError::NotPromoted { .. } => "not_promoted",
            FailoverError::Guard {
                source: ActError::NotLeader { .. },
            } => "not_leader",
            FailoverError::Guard { .. } => "store_unavailable",
        }
    }
}

/// A promotion that happened.
#[derive(Debug, Clone, PartialEq)]
pub struct Promotion {
    pub to: String,
    /// WAL the promoted replica had received when chosen.
    pub lsn: Lsn,
    /// Its timeline after the promotion.
    pub timeline: u32,
    pub repointed: Vec<String>,
    pub repoint_failed: Vec<(String, String)>,
    /// From the start of the driver to the verified promotion.
    pub promoted_after: Duration,
}

/// Fails when a server other than those in `compared` is writable on a timeline at least
/// `newest` (the old primary came back, or someone promoted meanwhile). The servers `asked`
/// are judged by what was heard from them so far, without waiting: the last check waits.
async fn no_primary_exists<P: Promoter>(
    p: &P,
    members: &[Member],
    compared: &[(Member, Position)],
    asked: &Asked,
) -> Result<(), FailoverError> {
    let newest = compared.iter().map(|(_, q)| q.timeline).max().unwrap_or(0);
    for (m, q) in compared {
        if !q.in_recovery && q.timeline >= newest {
            return Err(FailoverError::PrimaryExists(m.name.clone()));
        }
    }
    if let Some(name) = asked.writable_now(newest) {
        return Err(FailoverError::PrimaryExists(name));
    }
    let others: Vec<&Member> = members
        .iter()
        .filter(|m| !compared.iter().any(|(c, _)| c.name == m.name) && !asked.is_asked(&m.name))
        .collect();
    let seen = join_all(others.iter().map(|m| p.position(m))).await;
    for (m, q) in others.iter().zip(seen) {
        if let Ok(q) = q {
            if !q.in_recovery && q.timeline >= newest {
                return Err(FailoverError::PrimaryExists(m.name.clone()));
            }
        }
    }
    Ok(())
}

async fn positions<P: Promoter>(p: &P, members: &[Member]) -> Vec<(Member, Position)> {
    let results = join_all(members.iter().map(|m| p.position(m))).await;
    let mut out = Vec::new();
    for (m, r) in members.iter().zip(results) {
        match r {
            Ok(q) => out.push((m.clone(), q)),
            Err(e) => {
                warn!(step = "positions", node = %m.name, error = %e, "replica left out of the comparison")
            }
        }
    }
    out
}

/// Runs a failover. Never promotes when a primary exists; promotes at most one replica.
pub async fn run<P: Promoter>(
    p: &P,
    plan: &FailoverPlan,
    limits: &Limits,
) -> Result<Promotion, FailoverError> {
    let started = Instant::now();
    let limits = &match p.look_bound() {
        Some(look) => limits.with_look(look),
        None => limits.clone(),
    };
    info!(
        step = "start",
        from = plan.from.as_deref().unwrap_or("unknown"),
        down_for_s = plan.down_for.as_secs_f64(),
        lost = ?plan.lost,
        pglb = %plan.pglb,
        replicas = ?plan.replicas.iter().map(|m| &m.name).collect::<Vec<_>>(),
        "failover: primary failed, witnesses agree"
    );

    // With a store: the journal of this failover opens (and only a leader gets further).
    p.begin_failover()
        .await
        .map_err(|source| FailoverError::Guard { source })?;

    // Ask every server the failover does not compare (the old primary, unreachable ones) from
    // now on, so the last check knows how long each has been silent.
    let started_asking = Instant::now();
    let mut senders = Vec::new();
    let mut nodes = Vec::new();
    for m in plan
        .members
        .iter()
        .filter(|m| !plan.replicas.iter().any(|r| r.name == m.name))
    {
        let (tx, rx) = watch::channel(Heard::new(started_asking));
        let kick = std::sync::Arc::new(Notify::new());
        senders.push((m.clone(), tx, kick.clone()));
        nodes.push(AskedNode {
            member: m.clone(),
            heard: rx,
            kick,
        });
    }
    let asked = Asked {
        nodes,
        silent_before: plan.from.clone().map(|f| (f, plan.down_for)),
    };
    let asking = async {
        join_all(
            senders
                .iter()
                .map(|(m, tx, kick)| ask(p, m, tx, kick, limits.poll)),
        )
        .await;
        // Nobody to ask (every member is a reachable replica).
        std::future::pending::<()>().await
    };
    tokio::select! {
        r = steps(p, plan, limits, &asked, started) => r,
        () = asking => unreachable!("asking never ends"),
    }
}

async fn steps<P: Promoter>(
    p: &P,
    plan: &FailoverPlan,
    limits: &Limits,
    asked: &Asked,
    started: Instant,
) -> Result<Promotion, FailoverError> {
    // 1. Hold every replica still (all at once: each step is a fresh login).
    let results = join_all(plan.replicas.iter().map(|r| p.stop_receiver(r))).await;
    let mut stopped: Vec<(Member, String)> = Vec::new();
    let mut refused = None;
    for (r, res) in plan.replicas.iter().zip(results) {
        match res {
            Ok(prev) => {
                info!(step = "stop_receiver", node = %r.name, "failover: WAL receiver stopped");
                stopped.push((r.clone(), prev));
            }
            Err(e) if e.is_guard() => {
                warn!(step = "stop_receiver", node = %r.name, error = %e, "failover: refused by the store gate");
                refused = Some(e);
            }
            Err(e) => {
                warn!(step = "stop_receiver", node = %r.name, error = %e, "failover: cannot stop WAL receiver; replica left out")
            }
        }
    }
    if let Some(source) = refused {
        restore(p, &stopped).await;
        return Err(FailoverError::Guard { source });
    }
    super::failpoint::crash_after("receivers_stopped");
    let members: Vec<Member> = stopped.iter().map(|(m, _)| m.clone()).collect();
    let deadline = Instant::now() + limits.receiver_stop;
    let compared = loop {
        let seen = positions(p, &members).await;
        if seen.iter().all(|(_, q)| !q.receiver_running) || Instant::now() >= deadline {
            break seen;
        }
        tokio::time::sleep(limits.poll).await;
    };
    for (m, q) in &compared {
        info!(
            step = "positions",
            node = %m.name,
            received = %q.received(),
            replayed = %q.replay_lsn.unwrap_or_default(),
            timeline = q.timeline,
            receiver_running = q.receiver_running,
            priority = m.priority,
            no_failover = m.no_failover,
            "failover: position"
        );
    }

    let result = choose_and_promote(p, plan, limits, &compared, asked, started).await;
    if result.is_err() {
        // Nobody was promoted: put the receivers back as they were.
        restore(p, &stopped).await;
    }
    result
}

/// Puts back the receivers a failover stopped (one that promoted nobody).
pub(super) async fn restore<P: Promoter>(p: &P, stopped: &[(Member, String)]) {
    for (m, prev) in stopped {
        if prev.is_empty() {
            continue;
        }
        match p.restore_receiver(m, prev).await {
            Ok(()) => {
                info!(step = "restore_receiver", node = %m.name, "failover abandoned: WAL receiver restored")
            }
            Err(e) => {
                warn!(step = "restore_receiver", node = %m.name, error = %e, "failover abandoned: cannot restore WAL receiver")
            }
        }
    }
}

async fn choose_and_promote<P: Promoter>(
    p: &P,
    plan: &FailoverPlan,
    limits: &Limits,
    compared: &[(Member, Position)],
    asked: &Asked,
    started: Instant,
) -> Result<Promotion, FailoverError> {
    no_primary_exists(p, &plan.members, compared, asked).await?;
    let choice = choose(compared).map_err(FailoverError::NoCandidate)?;
    info!(
        step = "choose",
        candidate = %choice.member.name,
        lsn = %choice.lsn,
        timeline = choice.timeline,
        priority = choice.member.priority,
        "failover: most advanced eligible replica chosen"
    );
    for (name, bytes) in &choice.ahead {
        warn!(step = "choose", node = %name, ahead_bytes = bytes, candidate = %choice.member.name, "failover: a no_failover replica is ahead of the candidate; it will need a rejoin");
    }

    // 2. Let it replay what it received (bounded; promotion replays the rest anyway).
    let deadline = Instant::now() + limits.replay;
    loop {
        match p.position(&choice.member).await {
            Ok(q) if q.caught_up() => {
                info!(step = "wait_replay", node = %choice.member.name, replayed = %q.replay_lsn.unwrap_or_default(), "failover: candidate replayed everything it received");
                break;
            }
            Ok(q) if Instant::now() >= deadline => {
                warn!(step = "wait_replay", node = %choice.member.name, behind_bytes = q.replay_lsn.unwrap_or_default().bytes_until(q.received()), "failover: replay still behind after the bound; promoting anyway");
                break;
            }
            Err(e) if Instant::now() >= deadline => {
                return Err(FailoverError::Promote {
                    node: choice.member.name.clone(),
                    source: e,
                })
            }
            _ => tokio::time::sleep(limits.poll).await,
        }
    }
    // 3. Last look before the irreversible step. Only a writable server on a timeline at
    // least the candidate's is a primary; a fenced old primary on an older one is not. The
    // servers asked since the start get a bounded wait on their silence (`judge`); the others
    // answered moments ago and are asked afresh.
    let others: Vec<Member> = plan
        .members
        .iter()
        .filter(|m| m.name != choice.member.name && !asked.is_asked(&m.name))
        .cloned()
        .collect();
    let (seen, heard) = tokio::join!(
        join_all(others.iter().map(|m| p.position(m))),
        asked.check(choice.timeline, limits)
    );
    for (m, q) in others.iter().zip(seen) {
        if let Ok(q) = q {
            if !q.in_recovery && q.timeline >= choice.timeline {
                return Err(FailoverError::PrimaryExists(m.name.clone()));
            }
        }
    }
    heard?;

    let followers: Vec<Member> = plan
        .replicas
        .iter()
        .filter(|m| m.name != choice.member.name)
        .cloned()
        .collect();
    promote_and_follow(
        p,
        &choice.member,
        &followers,
        &plan.members,
        plan.synchronous,
        limits,
        started,
        choice.lsn,
        choice.timeline,
    )
    .await
}

/// Promotes `candidate` and makes `followers` replicate from it: prepare (not read-only; in
/// synchronous mode the standby list it will need, before it can take a single commit), promote,
/// verify, slots, CHECKPOINT, re-point. Shared by failover and switchover.
#[allow(clippy::too_many_arguments)]
pub async fn promote_and_follow<P: Promoter>(
    p: &P,
    candidate: &Member,
    followers: &[Member],
    members: &[Member],
    synchronous: bool,
    limits: &Limits,
    started: Instant,
    lsn: Lsn,
    from_timeline: u32,
) -> Result<Promotion, FailoverError> {
    let node = candidate.name.clone();
    let promote_err = |source| FailoverError::Promote {
        node: node.clone(),
        source,
    };
    // No committed record, no promotion (with a store; without one this passes).
    super::failpoint::pause_before("record_primary");
    p.guard_promotion(candidate, from_timeline)
        .await
        .map_err(|source| FailoverError::Guard { source })?;
    super::failpoint::crash_after("recorded");
    let sync = synchronous.then(|| sync_names(members, &candidate.name));
    p.prepare(candidate, sync.as_deref())
        .await
        .map_err(promote_err)?;
    info!(step = "prepare", node = %candidate.name, synchronous_standby_names = sync.as_deref().unwrap_or("(unchanged)"), "promote: candidate prepared");
    let promoted = p
        .promote(candidate, limits.promote)
        .await
        .map_err(promote_err)?;
    let pos = p.position(candidate).await.map_err(promote_err)?;
    if pos.in_recovery {
        error!(step = "verify", node = %candidate.name, pg_promote = promoted, "promote: still in recovery");
        return Err(FailoverError::NotPromoted { node });
    }
    let promoted_after = started.elapsed();
    info!(
        step = "promote",
        node = %candidate.name,
        timeline = pos.timeline,
        lsn = %lsn,
        after_s = promoted_after.as_secs_f64(),
        "promoted"
    );
    super::failpoint::crash_after("promoted");
    if let Err(e) = p.promoted(candidate, pos.timeline).await {
        warn!(step = "record", node = %candidate.name, error = %e, "promoted, but the new timeline is not recorded yet; the leader's next look does it");
    }
    let slots: Vec<String> = followers.iter().map(|f| f.slot_name()).collect();
    let results = join_all(slots.iter().map(|s| p.ensure_slot(candidate, s))).await;
    for (f, r) in followers.iter().zip(results) {
        if let Err(e) = r {
            warn!(step = "slot", node = %candidate.name, slot = %f.slot_name(), error = %e, "promote: cannot create slot");
        }
    }
    // The CHECKPOINT (so the control file, and a later pg_rewind from it, carry the new
    // timeline) and the re-pointing run together: in synchronous mode the first commit waits
    // for a re-pointed replica to stream, and nothing in re-pointing needs the checkpoint.
    let (checkpoint, results) = tokio::join!(
        p.checkpoint(candidate),
        join_all(followers.iter().map(|f| p.repoint(f, candidate)))
    );
    match checkpoint {
        Ok(()) => info!(step = "checkpoint", node = %candidate.name, "promote: checkpoint done"),
        Err(e) => {
            warn!(step = "checkpoint", node = %candidate.name, error = %e, "promote: checkpoint failed; pg_rewind from it may need one")
        }
    }
    let mut repointed = Vec::new();
    let mut repoint_failed = Vec::new();
    for (f, r) in followers.iter().zip(results) {
        match r {
            Ok(()) => {
                info!(step = "repoint", node = %f.name, primary = %candidate.name, "re-pointed to the new primary");
                repointed.push(f.name.clone());
            }
            Err(e) => {
                warn!(step = "repoint", node = %f.name, primary = %candidate.name, error = %e, "cannot re-point yet; retried on the next look");
                repoint_failed.push((f.name.clone(), e.to_string()));
            }
        }
    }
    if !repointed.is_empty() {
        super::failpoint::crash_after("repointed");
    }
    Ok(Promotion {
        to: candidate.name.clone(),
        lsn,
        timeline: pos.timeline,
        repointed,
        repoint_failed,
        promoted_after,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::backend::probe::ProbeError;
    use std::collections::{HashMap, VecDeque};
    use std::sync::Mutex;

    fn m(name: &str, priority: u32, no_failover: bool) -> Member {
        Member {
            name: name.into(),
            address: format!("{name}:5432"),
            priority,
            no_failover,
        }
    }

    fn standby(received: u64, tl: u32) -> Position {
        Position {
            in_recovery: true,
            timeline: tl,
            receive_lsn: Some(Lsn(received)),
            replay_lsn: Some(Lsn(received)),
            current_lsn: None,
            receiver_running: false,
        }
    }

    #[test]
    fn highest_lsn_wins_over_priority() {
        let c = choose(&[
            (m("pg-1", 200, false), standby(100, 1)),
            (m("pg-2", 100, false), standby(150, 1)),
        ])
        .unwrap();
        assert_eq!(c.member.name, "pg-2");
        assert_eq!(c.lsn, Lsn(150));
        assert!(c.ahead.is_empty());
    }

    #[test]
    fn ties_go_to_priority_then_name() {
        let c = choose(&[
            (m("pg-2", 100, false), standby(100, 1)),
            (m("pg-1", 100, false), standby(100, 1)),
            (m("pg-3", 150, false), standby(100, 1)),
        ])
        .unwrap();
        assert_eq!(c.member.name, "pg-3");
        let c = choose(&[
            (m("pg-2", 100, false), standby(100, 1)),
            (m("pg-1", 100, false), standby(100, 1)),
        ])
        .unwrap();
        assert_eq!(c.member.name, "pg-1");
    }

    #[test]
    fn no_failover_is_skipped_and_reported_when_ahead() {
        let c = choose(&[
            (m("pg-1", 100, true), standby(200, 1)),
            (m("pg-2", 100, false), standby(150, 1)),
        ])
        .unwrap();
        assert_eq!(c.member.name, "pg-2");
        assert_eq!(c.ahead, vec![("pg-1".to_string(), 50)]);
    }

    #[test]
    fn older_timeline_and_writable_servers_are_not_chosen() {
        let mut writable = standby(500, 2);
        writable.in_recovery = false;
        let e = choose(&[
            (m("pg-0", 100, false), writable),
            (m("pg-1", 100, false), standby(900, 1)),
            (m("pg-2", 100, true), standby(100, 2)),
        ])
        .unwrap_err();
        assert_eq!(
            e,
            vec![
                ("pg-0".to_string(), "not in recovery"),
                ("pg-1".to_string(), "older timeline"),
                ("pg-2".to_string(), "no_failover"),
            ]
        );
    }

    /// A scripted fake: positions per node are queues (the last one repeats), every call is
    /// recorded, and `promote` flips the node out of recovery on a new timeline.
    #[derive(Default)]
    pub struct Script {
        pub positions: Mutex<HashMap<String, VecDeque<Result<Position, ActError>>>>,
        pub calls: Mutex<Vec<String>>,
        pub fail: Mutex<HashMap<String, ActError>>,
        /// Nodes that answer nothing until a time (SIGSTOPped), each attempt giving up after
        /// a bound: (until, bound).
        pub hang: Mutex<HashMap<String, (Instant, Duration)>>,
    }

    impl Script {
        /// `node` answers nothing until `until`; each attempt times out after `bound`.
        pub fn freeze(&self, node: &str, until: Instant, bound: Duration) {
            self.hang
                .lock()
                .unwrap()
                .insert(node.to_string(), (until, bound));
        }
        pub fn set(&self, node: &str, seq: Vec<Result<Position, ActError>>) {
            self.positions
                .lock()
                .unwrap()
                .insert(node.to_string(), seq.into());
        }
        pub fn fail(&self, call: &str, node: &str) {
            self.fail.lock().unwrap().insert(
                format!("{call} {node}"),
                ActError::Server {
                    node: node.into(),
                    what: "scripted",
                    source: ProbeError::Refused,
                },
            );
        }
        pub fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
        fn record(&self, call: &str, node: &str) -> Result<(), ActError> {
            self.calls.lock().unwrap().push(format!("{call} {node}"));
            match self.fail.lock().unwrap().get(&format!("{call} {node}")) {
                Some(e) => Err(e.clone()),
                None => Ok(()),
            }
        }
        fn next(&self, node: &str) -> Result<Position, ActError> {
            let mut all = self.positions.lock().unwrap();
            let q = all.entry(node.to_string()).or_default();
            let v = if q.len() > 1 {
                q.pop_front()
            } else {
                q.front().cloned()
            };
            v.unwrap_or_else(|| {
                Err(ActError::Server {
                    node: node.into(),
                    what: "position",
                    source: ProbeError::Refused,
                })
            })
        }
    }

    impl Promoter for Script {
        async fn position(&self, node: &Member) -> Result<Position, ActError> {
            let hang = self.hang.lock().unwrap().get(&node.name).copied();
            if let Some((until, bound)) = hang {
                let now = Instant::now();
                if now < until {
                    tokio::time::sleep_until(until.min(now + bound)).await;
                    if Instant::now() < until {
                        return Err(ActError::Timeout {
                            node: node.name.clone(),
                            what: "read status",
                            after: bound,
                        });
                    }
                }
            }
            self.next(&node.name)
        }
        async fn stop_receiver(&self, node: &Member) -> Result<String, ActError> {
            self.record("stop_receiver", &node.name)
                .map(|_| format!("host={} port=5432", node.name))
        }
        async fn restore_receiver(&self, node: &Member, _c: &str) -> Result<(), ActError> {
            self.record("restore_receiver", &node.name)
        }
        async fn prepare(&self, node: &Member, sync: Option<&str>) -> Result<(), ActError> {
            self.record(&format!("prepare[{}]", sync.unwrap_or("-")), &node.name)
        }
        async fn promote(&self, node: &Member, _wait: Duration) -> Result<bool, ActError> {
            self.record("promote", &node.name)?;
            let mut all = self.positions.lock().unwrap();
            let q = all.entry(node.name.clone()).or_default();
            let tl = q
                .back()
                .and_then(|p| p.as_ref().ok())
                .map(|p| p.timeline)
                .unwrap_or(1);
            q.clear();
            q.push_back(Ok(Position {
                in_recovery: false,
                timeline: tl + 1,
                ..Default::default()
            }));
            Ok(true)
        }
        async fn checkpoint(&self, node: &Member) -> Result<(), ActError> {
            self.record("checkpoint", &node.name)
        }
        async fn ensure_slot(&self, primary: &Member, slot: &str) -> Result<(), ActError> {
            self.record(&format!("slot[{slot}]"), &primary.name)
        }
        async fn repoint(&self, replica: &Member, primary: &Member) -> Result<(), ActError> {
            self.record(&format!("repoint[{}]", primary.name), &replica.name)
        }
        async fn fence(&self, node: &Member) -> Result<u64, ActError> {
            self.record("fence", &node.name).map(|_| 0)
        }
        async fn unfence(&self, node: &Member) -> Result<(), ActError> {
            self.record("unfence", &node.name)
        }
        async fn set_sync_names(&self, primary: &Member, v: &str) -> Result<(), ActError> {
            self.record(&format!("sync[{v}]"), &primary.name)
        }
    }

    fn limits() -> Limits {
        Limits {
            receiver_stop: Duration::from_millis(50),
            replay: Duration::from_millis(50),
            promote: Duration::from_secs(1),
            poll: Duration::from_millis(1),
            ..Limits::default()
        }
    }

    fn plan(synchronous: bool) -> FailoverPlan {
        FailoverPlan {
            from: Some("pg-0".into()),
            down_for: Duration::from_secs(3),
            replicas: vec![m("pg-1", 100, false), m("pg-2", 100, false)],
            members: vec![
                m("pg-0", 100, false),
                m("pg-1", 100, false),
                m("pg-2", 100, false),
            ],
            lost: vec!["pg-1".into(), "pg-2".into()],
            pglb: "no primary".into(),
            synchronous,
        }
    }

    fn dead() -> Result<Position, ActError> {
        Err(ActError::Server {
            node: "pg-0".into(),
            what: "position",
            source: ProbeError::Refused,
        })
    }

    #[tokio::test]
    async fn promotes_the_most_advanced_after_its_replay_and_repoints_the_other() {
        let s = Script::default();
        s.set("pg-0", vec![dead()]);
        // pg-1's receiver still runs at the first look; pg-2 is ahead but replaying.
        s.set(
            "pg-1",
            vec![
                Ok(Position {
                    receiver_running: true,
                    ..standby(100, 1)
                }),
                Ok(standby(100, 1)),
            ],
        );
        let replaying = Position {
            replay_lsn: Some(Lsn(150)),
            ..standby(200, 1)
        };
        s.set(
            "pg-2",
            vec![
                Ok(replaying.clone()),
                Ok(replaying.clone()),
                Ok(replaying),
                Ok(standby(200, 1)),
            ],
        );
        let r = run(&s, &plan(false), &limits()).await.unwrap();
        assert_eq!(r.to, "pg-2");
        assert_eq!(r.lsn, Lsn(200));
        assert_eq!(r.timeline, 2);
        assert_eq!(r.repointed, vec!["pg-1"]);
        assert_eq!(
            s.calls(),
            vec![
                "stop_receiver pg-1",
                "stop_receiver pg-2",
                "prepare[-] pg-2",
                "promote pg-2",
                "slot[pg_1] pg-2",
                "checkpoint pg-2",
                "repoint[pg-2] pg-1",
            ]
        );
    }

    #[tokio::test]
    async fn an_old_primary_back_before_the_promotion_aborts_and_restores_receivers() {
        let s = Script::default();
        let mut back = standby(300, 1);
        back.in_recovery = false;
        s.set("pg-0", vec![Ok(back)]);
        s.set("pg-1", vec![Ok(standby(100, 1))]);
        s.set("pg-2", vec![Ok(standby(100, 1))]);
        let e = run(&s, &plan(false), &limits()).await.unwrap_err();
        assert_eq!(e, FailoverError::PrimaryExists("pg-0".into()));
        assert_eq!(
            s.calls(),
            vec![
                "stop_receiver pg-1",
                "stop_receiver pg-2",
                "restore_receiver pg-1",
                "restore_receiver pg-2",
            ]
        );
    }

    #[tokio::test]
    async fn a_replica_already_promoted_means_no_second_promotion() {
        let s = Script::default();
        s.set("pg-0", vec![dead()]);
        let mut promoted = standby(100, 2);
        promoted.in_recovery = false;
        s.set("pg-1", vec![Ok(promoted)]);
        s.set("pg-2", vec![Ok(standby(100, 1))]);
        let e = run(&s, &plan(false), &limits()).await.unwrap_err();
        assert_eq!(e, FailoverError::PrimaryExists("pg-1".into()));
        assert!(!s.calls().iter().any(|c| c.starts_with("promote")));
    }

    #[tokio::test]
    async fn synchronous_mode_sets_the_standby_list_before_promoting() {
        let s = Script::default();
        s.set("pg-0", vec![dead()]);
        s.set("pg-1", vec![Ok(standby(100, 1))]);
        s.set("pg-2", vec![Ok(standby(90, 1))]);
        let r = run(&s, &plan(true), &limits()).await.unwrap();
        assert_eq!(r.to, "pg-1");
        let calls = s.calls();
        let prep = calls.iter().position(|c| c.starts_with("prepare")).unwrap();
        let promote = calls.iter().position(|c| c.starts_with("promote")).unwrap();
        assert!(prep < promote);
        assert_eq!(calls[prep], "prepare[ANY 1 (\"pg-0\", \"pg-2\")] pg-1");
    }

    #[tokio::test]
    async fn unreachable_replicas_are_left_out_and_failed_repoints_reported() {
        let s = Script::default();
        s.set("pg-0", vec![dead()]);
        s.set("pg-1", vec![Ok(standby(100, 1))]);
        s.set("pg-2", vec![Ok(standby(50, 1))]);
        s.fail("stop_receiver", "pg-2");
        s.fail("repoint[pg-1]", "pg-2");
        let r = run(&s, &plan(false), &limits()).await.unwrap();
        assert_eq!(r.to, "pg-1");
        assert_eq!(r.repointed, Vec::<String>::new());
        assert_eq!(r.repoint_failed.len(), 1);
    }

    #[tokio::test]
    async fn a_failed_promotion_restores_receivers() {
        let s = Script::default();
        s.set("pg-0", vec![dead()]);
        s.set("pg-1", vec![Ok(standby(100, 1))]);
        s.set("pg-2", vec![Ok(standby(50, 1))]);
        s.fail("promote", "pg-1");
        let e = run(&s, &plan(false), &limits()).await.unwrap_err();
        assert_eq!(e.kind(), "promote_failed");
        assert!(s.calls().contains(&"restore_receiver pg-2".to_string()));
    }

    #[tokio::test]
    async fn only_no_failover_replicas_means_no_candidate() {
        let s = Script::default();
        s.set("pg-0", vec![dead()]);
        s.set("pg-1", vec![Ok(standby(100, 1))]);
        let mut p = plan(false);
        p.replicas = vec![m("pg-1", 100, true)];
        p.members = vec![m("pg-0", 100, false), m("pg-1", 100, true)];
        let e = run(&s, &p, &limits()).await.unwrap_err();
        assert_eq!(e.kind(), "no_candidate");
    }

    fn heard(since: Instant) -> Heard {
        Heard::new(since)
    }

    #[test]
    fn silence_needed_counts_the_silence_before_and_keeps_a_floor() {
        let s = |x: u64| Duration::from_millis(x);
        assert_eq!(silence_needed(s(4500), s(0), s(500)), s(4500));
        assert_eq!(silence_needed(s(4500), s(2500), s(500)), s(2000));
        assert_eq!(silence_needed(s(4500), s(4200), s(500)), s(500));
        assert_eq!(silence_needed(s(4500), s(60_000), s(500)), s(500));
    }

    #[test]
    fn silence_bounds_follow_the_look_bound() {
        let l = Limits::default();
        assert_eq!(l.silence, Duration::from_secs(3));
        assert_eq!(l.silence_floor, Duration::from_millis(500));
        let l = l.with_look(Duration::from_secs(5));
        assert_eq!(l.silence, Duration::from_secs(10));
        assert_eq!(l.silence_floor, Duration::from_secs(5) / 3);
        assert_eq!(l.poll, Limits::default().poll);
        // Never under 3 s.
        assert_eq!(
            Limits::default().with_look(Duration::from_secs(1)).silence,
            Duration::from_secs(3)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn judge_waits_out_silence_and_takes_fresh_answers() {
        let l = Limits::default(); // look 1.5 s: silence 3 s, floor 0.5 s
        let t0 = Instant::now();
        let sec = |x: f64| Duration::from_secs_f64(x);
        // Silent from the driver's start, 1.5 s already before it: 1.5 s to wait.
        let mut h = heard(t0);
        h.asking_since = Some(t0);
        assert_eq!(
            judge(&h, 1, t0, sec(1.5), &l, t0 + sec(1.0)),
            Verdict::WaitUntil(t0 + sec(1.5))
        );
        assert_eq!(
            judge(&h, 1, t0, sec(1.5), &l, t0 + sec(1.5)),
            Verdict::NotWritable
        );
        // Long silent before: the floor.
        assert_eq!(
            judge(&h, 1, t0, sec(30.0), &l, t0 + sec(0.4)),
            Verdict::WaitUntil(t0 + sec(0.5))
        );
        // Not the failed primary (nothing before): the whole silence.
        assert_eq!(
            judge(&h, 1, t0, Duration::ZERO, &l, t0 + sec(2.0)),
            Verdict::WaitUntil(t0 + sec(3.0))
        );
        // An answer during the failover ends the silence before: counted from the next attempt.
        h.answer = Some(Answer {
            asked_at: t0,
            writable_on: None,
        });
        h.asking_since = Some(t0 + sec(1.0));
        assert_eq!(
            judge(&h, 1, t0 + sec(0.5), sec(30.0), &l, t0 + sec(2.0)),
            Verdict::WaitUntil(t0 + sec(4.0))
        );
        // A fresh answer (its attempt started since the check began) decides at once.
        assert_eq!(
            judge(&h, 1, t0, sec(30.0), &l, t0 + sec(2.0)),
            Verdict::NotWritable
        );
        // Between an answer and the next attempt: a poll.
        h.asking_since = None;
        assert_eq!(
            judge(&h, 1, t0 + sec(0.5), sec(30.0), &l, t0 + sec(2.0)),
            Verdict::WaitUntil(t0 + sec(2.0) + l.poll)
        );
        // Writable once on the newest timeline: a primary exists, whatever came after.
        h.writable_on = Some(1);
        assert_eq!(
            judge(&h, 1, t0, sec(30.0), &l, t0 + sec(9.0)),
            Verdict::Writable(1)
        );
        // ... but not on an older timeline (a stale old primary).
        assert_eq!(
            judge(&h, 2, t0, sec(30.0), &l, t0 + sec(2.0)),
            Verdict::NotWritable
        );
    }

    fn replicas_ok(s: &Script) {
        s.set("pg-1", vec![Ok(standby(100, 1))]);
        s.set("pg-2", vec![Ok(standby(90, 1))]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_frozen_old_primary_is_waited_for_only_what_its_silence_lacks() {
        let l = Limits::default();
        let bound = l.silence; // each attempt on the hung server gives up after a step
        for (down_for, waited) in [(2.0, 1.0), (2.4, 0.6), (10.0, 0.5)] {
            let s = Script::default();
            s.freeze("pg-0", Instant::now() + Duration::from_secs(3600), bound);
            replicas_ok(&s);
            let mut p = plan(false);
            p.down_for = Duration::from_secs_f64(down_for);
            let r = run(&s, &p, &l).await.unwrap();
            assert_eq!(r.to, "pg-1");
            // Promoted once silent for 3 s in all (down_for, then within the failover), at
            // least 0.5 s of it within: not after two whole step bounds.
            assert_eq!(
                r.promoted_after,
                Duration::from_secs_f64(waited),
                "down_for {down_for}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_frozen_old_primary_that_comes_back_writable_stops_the_promotion() {
        let l = Limits::default();
        let s = Script::default();
        let mut back = standby(300, 1);
        back.in_recovery = false;
        s.set("pg-0", vec![Ok(back)]);
        // Thawed 1 s into the failover, before its 3 s of silence were complete.
        s.freeze("pg-0", Instant::now() + Duration::from_secs(1), l.silence);
        replicas_ok(&s);
        let mut p = plan(false);
        p.down_for = Duration::from_secs(1);
        let t0 = Instant::now();
        let e = run(&s, &p, &l).await.unwrap_err();
        assert_eq!(e, FailoverError::PrimaryExists("pg-0".into()));
        assert_eq!(t0.elapsed(), Duration::from_secs(1), "seen as it answered");
        assert!(!s.calls().iter().any(|c| c.starts_with("promote")));
        assert!(s.calls().contains(&"restore_receiver pg-1".to_string()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_old_primary_costs_the_last_check_no_wait() {
        let l = Limits::default();
        let s = Script::default();
        s.set("pg-0", vec![dead()]);
        replicas_ok(&s);
        let mut p = plan(false);
        p.down_for = Duration::from_secs(3);
        let r = run(&s, &p, &l).await.unwrap();
        assert_eq!(r.to, "pg-1");
        // Refused is an answer: asked again at once when the last check begins.
        assert_eq!(r.promoted_after, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_hung_without_history_gets_the_whole_silence() {
        // pg-3 is not the failed primary: nothing was heard from it before, so the last check
        // waits the whole 3 s of silence for it.
        let l = Limits::default();
        let s = Script::default();
        s.set("pg-0", vec![dead()]);
        s.freeze(
            "pg-3",
            Instant::now() + Duration::from_secs(3600),
            l.silence,
        );
        replicas_ok(&s);
        let mut p = plan(false);
        p.down_for = Duration::from_secs(10);
        p.members.push(m("pg-3", 100, false));
        let r = run(&s, &p, &l).await.unwrap();
        assert_eq!(r.promoted_after, l.silence);
    }
}
