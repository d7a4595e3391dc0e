//! pglb-promoter: watches the primary and, when it is really gone, promotes the most advanced
//! replica, re-points the others and keeps the old primary fenced. Observe → decide → act.
//!
//! Module map:
//! - `settings`: the `[promoter]` section and backends, secrets resolved (`Settings`, `Member`).
//! - `observe`: one look at every backend (fresh login, role, WAL, receiver) and at pglb.
//! - `decide`: pure: primary from timelines, failure detection with witnesses, `Decision`.
//! - `promote`: side effects behind the `Promoter` trait (`PgPromoter` over SQL, `DryRun`).
//! - `failover`: the failover driver (stop receivers, choose, replay, promote, re-point).
//! - `switchover`: the planned `switchover --to NAME`.
//! - `rejoin`: `rejoin`: pg_rewind an old primary and restart it as a standby (local data dir).
//! - `http`: `/status`, `/metrics`, `/health`; `metrics`: metric names.
//!
//! This file wires the daemon: config reload, signals, the status server and the loop.

pub mod decide;
pub mod failover;
pub mod http;
pub mod metrics;
pub mod observe;
pub mod promote;
pub mod rejoin;
pub mod settings;
pub mod switchover;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::reload::{self, Outcome};
use decide::{Action, Decision, Policy, State};
use http::{FailoverRecord, NodeSummary, Shared, Status};
use observe::Observation;
use promote::{DryRun, PgPromoter, Promoter};
use settings::Settings;

/// How the daemon runs.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Observe and decide, log what would be done, change nothing.
    pub dry_run: bool,
}

fn policy(s: &Settings) -> Policy {
    Policy {
        failover_after: s.failover_after,
        synchronous: s.synchronous,
    }
}

/// Runs the promoter until SIGTERM/SIGINT.
pub async fn run(config: Config, opts: RunOptions) -> anyhow::Result<()> {
    let settings = Arc::new(Settings::from_config(&config)?);
    let shared = Arc::new(Shared {
        status: Mutex::new(Status::new(config.path.display().to_string(), opts.dry_run)),
        prometheus: http::prometheus(),
    });
    let listener = tokio::net::TcpListener::bind(&settings.listen)
        .await
        .with_context(|| format!("bind promoter listen address {}", settings.listen))?;
    let shutdown = CancellationToken::new();
    let background = TaskTracker::new();
    background.spawn(http::serve(
        listener,
        shared.clone(),
        shutdown.child_token(),
    ));

    let (reload_tx, reload_rx) = mpsc::channel(16);
    background.spawn({
        let shutdown = shutdown.clone();
        let tx = reload_tx.clone();
        async move {
            if let Err(e) = crate::signals::run(shutdown.clone(), tx).await {
                error!(error = %e, "signal handling failed; shutting down");
                shutdown.cancel();
            }
        }
    });
    let watcher = match reload::watch(&config.path, reload_tx) {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(error = %e, path = %config.path.display(), "cannot watch the config file; SIGHUP still reloads");
            None
        }
    };
    let (settings_tx, settings_rx) = watch::channel(settings.clone());
    background.spawn(reload_loop(
        config.path.clone(),
        config,
        settings_tx,
        reload_rx,
        shared.clone(),
        shutdown.clone(),
        watcher,
    ));
    info!(
        backends = settings.members.len(),
        failover_after = ?settings.failover_after,
        interval = ?settings.interval,
        synchronous = settings.synchronous,
        pglb = settings.pglb_stats.as_deref().unwrap_or("none"),
        listen = %settings.listen,
        dry_run = opts.dry_run,
        "pglb-promoter started"
    );
    if opts.dry_run {
        run_loop(
            |s| DryRun(PgPromoter::new(s)),
            settings_rx,
            shared,
            shutdown.clone(),
        )
        .await;
    } else {
        run_loop(PgPromoter::new, settings_rx, shared, shutdown.clone()).await;
    }
    background.close();
    shutdown.cancel();
    background.wait().await;
    info!("pglb-promoter stopped");
    Ok(())
}

async fn reload_loop(
    path: PathBuf,
    mut current: Config,
    tx: watch::Sender<Arc<Settings>>,
    mut rx: mpsc::Receiver<()>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    _watcher: Option<notify::RecommendedWatcher>,
) {
    loop {
        let more = tokio::select! {
            _ = shutdown.cancelled() => return,
            more = reload::next_request(&mut rx) => more,
        };
        if !more {
            return;
        }
        let result = match reload::attempt(&path, &current) {
            Outcome::Unchanged => {
                info!(path = %path.display(), "config unchanged");
                "unchanged".to_string()
            }
            Outcome::Rejected(e) => {
                warn!(error = %e, "config reload refused; keeping the running config");
                format!("rejected: {e}")
            }
            Outcome::Changed(c) => match Settings::from_config(&c) {
                Ok(s) => {
                    if s.listen != tx.borrow().listen {
                        warn!("promoter.listen changes need a restart; keeping the old address");
                    }
                    info!(backends = s.members.len(), failover_after = ?s.failover_after, synchronous = s.synchronous, "config reloaded");
                    let _ = tx.send(Arc::new(s));
                    current = *c;
                    "applied".to_string()
                }
                Err(e) => {
                    warn!(error = %e, "config reload refused; keeping the running config");
                    format!("rejected: {e}")
                }
            },
        };
        shared.update(|st| st.reload = Some(result));
    }
}

/// Rate limit for repeated log lines: a new key is said at once, the same key again after `every`.
struct Said {
    key: String,
    at: Option<Instant>,
}

impl Said {
    fn should(&mut self, key: &str, now: Instant, every: Duration) -> bool {
        if self.key != key || self.at.is_none_or(|t| now.duration_since(t) >= every) {
            self.key = key.to_string();
            self.at = Some(now);
            true
        } else {
            false
        }
    }
}

/// Warns once per server and setting value when replicas would notice a silent primary slowly.
fn warn_slow_timeouts(
    obs: &Observation,
    settings: &Settings,
    warned: &mut HashMap<String, (Duration, Duration)>,
) {
    let slow = |d: Duration| d.is_zero() || d > settings.failover_after * 4;
    for n in &obs.nodes {
        let Some(st) = n.reachable() else { continue };
        let key = (st.wal_receiver_timeout, st.wal_sender_timeout);
        if warned.get(n.name()) == Some(&key) {
            continue;
        }
        warned.insert(n.name().to_string(), key);
        if slow(st.wal_receiver_timeout) || slow(st.wal_sender_timeout) {
            warn!(
                node = %n.name(),
                wal_receiver_timeout = ?st.wal_receiver_timeout,
                wal_sender_timeout = ?st.wal_sender_timeout,
                failover_after = ?settings.failover_after,
                silence_noticed_after = ?decide::silence_bound(st, settings.failover_after),
                "replicas notice a silent (not crashed) primary only after this long: set \
                 wal_receiver_timeout and wal_sender_timeout to at most 4 x failover_after \
                 (see docs/failover.md)"
            );
        }
    }
}

fn summaries(obs: &Observation, state: &State) -> Vec<NodeSummary> {
    let topo = decide::topology(obs, state);
    obs.nodes
        .iter()
        .map(|n| {
            let role = match (&n.status, &topo.primary) {
                (Err(_), _) => "unreachable",
                (Ok(s), _) if s.in_recovery => "replica",
                (Ok(_), decide::Primary::One(p)) if p.name() == n.name() => "primary",
                (Ok(_), decide::Primary::Many(ps)) if ps.iter().any(|p| p.name() == n.name()) => {
                    "primary"
                }
                (Ok(_), _) => "stale",
            };
            let st = n.reachable();
            NodeSummary {
                name: n.name().to_string(),
                role,
                error: n.status.as_ref().err().map(|e| e.to_string()),
                timeline: st.map(|s| s.timeline),
                lsn: st.map(|s| s.position().to_string()),
                streaming: st
                    .filter(|s| s.in_recovery)
                    .map(|s| s.receiver.as_ref().is_some_and(|r| r.is_streaming())),
                read_only: st.map(|s| s.read_only),
                priority: n.member.priority,
                no_failover: n.member.no_failover,
            }
        })
        .collect()
}

async fn apply<P: Promoter>(actor: &P, action: &Action) -> bool {
    let r = match action {
        Action::Repoint { replica, primary } => actor.repoint(replica, primary).await,
        Action::SetSyncNames { primary, value } => actor.set_sync_names(primary, value).await,
    };
    metrics::action(action.kind(), r.is_ok());
    match (&r, action) {
        (Ok(()), Action::Repoint { replica, primary }) => {
            info!(step = "repoint", node = %replica.name, primary = %primary.name, slot = %replica.slot_name(), "replica re-pointed to the primary")
        }
        (Ok(()), Action::SetSyncNames { primary, value }) => {
            info!(step = "set_sync_names", node = %primary.name, synchronous_standby_names = %value, "synchronous standby list set")
        }
        (Err(e), a) => {
            warn!(step = a.kind(), error = %e, "action failed; retried on the next look")
        }
    }
    r.is_ok()
}

/// The observe → decide → act loop.
async fn run_loop<P, F>(
    make: F,
    mut settings_rx: watch::Receiver<Arc<Settings>>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) where
    P: Promoter + Clone + 'static,
    F: Fn(Arc<Settings>) -> P,
{
    let mut settings = settings_rx.borrow_and_update().clone();
    let mut state = State::new(policy(&settings), Instant::now());
    let mut ticker = tokio::time::interval(settings.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let limits = failover::Limits::default();
    let mut said = Said {
        key: String::new(),
        at: None,
    };
    let mut warned = HashMap::new();
    let fencing: Arc<Mutex<HashSet<String>>> = Arc::default();
    // Replicas re-pointed and not yet seen streaming from that primary.
    let mut awaiting: HashMap<String, (String, Instant)> = HashMap::new();
    let mut retry_after: Option<Instant> = None;
    let mut failovers = 0u64;

    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if settings_rx.has_changed().unwrap_or(false) {
            let new = settings_rx.borrow_and_update().clone();
            if new.interval != settings.interval {
                ticker = tokio::time::interval(new.interval);
                ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
            }
            settings = new;
            state.policy = policy(&settings);
        }
        let actor = make(settings.clone());
        let obs = observe::observe(&settings).await;
        let now = obs.at;
        state.note(&obs);
        metrics::look();
        for n in &obs.nodes {
            metrics::reachable(n.name(), n.reachable().is_some());
        }
        warn_slow_timeouts(&obs, &settings, &mut warned);

        // Fencing runs beside the decision, never before it.
        let primary_name = match decide::topology(&obs, &state).primary {
            decide::Primary::One(p) => Some(p.name().to_string()),
            _ => None,
        };
        for m in decide::to_fence(&obs, &state) {
            let in_flight = fencing.clone();
            if !in_flight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(m.name.clone())
            {
                continue;
            }
            let actor = actor.clone();
            let primary = primary_name.clone().unwrap_or_default();
            let timeline = state.timelines.values().max().copied().unwrap_or(0);
            tokio::spawn(async move {
                let r = actor.fence(&m).await;
                metrics::action("fence", r.is_ok());
                match r {
                    Ok(n) => {
                        warn!(step = "fence", node = %m.name, terminated_sessions = n, primary = %primary, newest_timeline = timeline, "stale primary fenced: read-only, client sessions ended")
                    }
                    Err(e) => {
                        error!(step = "fence", node = %m.name, error = %e, "cannot fence a stale primary; retried on the next look")
                    }
                }
                in_flight
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&m.name);
            });
        }

        let decision = decide::decide(&obs, &state);
        let down = primary_name
            .is_none()
            .then(|| now.saturating_duration_since(state.primary_last_seen()));
        metrics::primary(
            primary_name.is_some(),
            down.map(|d| d.as_secs_f64()).unwrap_or(0.0),
        );
        let fenced = decide::fenced(&obs, &state);
        let nodes = summaries(&obs, &state);
        shared.update(|st| {
            st.looks += 1;
            st.last_look_unix = Some(http::unix_now());
            st.primary = primary_name.clone();
            st.decision = decision.kind();
            st.primary_down_seconds = down.map(|d| d.as_secs_f64());
            st.failover_after_seconds = settings.failover_after.as_secs_f64();
            st.synchronous = settings.synchronous;
            st.fenced = fenced;
            st.pglb = obs.pglb.clone();
            st.nodes = nodes;
            st.not_streaming = match &decision {
                Decision::Steady { not_streaming, .. } => not_streaming.clone(),
                _ => vec![],
            };
            (st.reason_kind, st.reason) = match &decision {
                Decision::Wait { reason } => (Some(reason.kind()), Some(reason.to_string())),
                _ => (None, None),
            };
        });

        // Re-pointed replicas: verified once the primary lists them as streaming.
        if let Some(p) = primary_name.as_deref().and_then(|p| obs.node(p)) {
            awaiting.retain(|r, (primary, since)| {
                if primary != p.name() {
                    return false;
                }
                if let Some(rn) = obs.node(r) {
                    if decide::streams_from(rn, p) {
                        info!(step = "verify", node = %r, primary = %primary, after_s = since.elapsed().as_secs_f64(), "replica streams from the new primary");
                        return false;
                    }
                }
                if since.elapsed() > Duration::from_secs(30) {
                    warn!(step = "verify", node = %r, primary = %primary, "replica still not streaming from the new primary after 30s: check its log; it may need `pglb-promoter rejoin`");
                    return false;
                }
                true
            });
        }

        match decision {
            Decision::Steady {
                primary,
                not_streaming,
            } => {
                let key = format!("steady {primary} {not_streaming:?}");
                if said.should(&key, now, Duration::from_secs(300)) {
                    info!(decision = "steady", primary = %primary, not_streaming = ?not_streaming, "primary answers; replicas checked");
                }
                metrics::decision("steady", "none");
            }
            Decision::Reconcile { primary, actions } => {
                metrics::decision("reconcile", "none");
                said.key.clear();
                for a in &actions {
                    if apply(&actor, a).await {
                        if let Action::Repoint { replica, .. } = a {
                            awaiting
                                .insert(replica.name.clone(), (primary.clone(), Instant::now()));
                        }
                    }
                }
            }
            Decision::Wait { reason } => {
                metrics::decision("wait", reason.kind());
                if said.should(reason.kind(), now, Duration::from_secs(5)) {
                    if reason.blocks_failover() {
                        warn!(decision = "wait", reason = reason.kind(), evidence = %reason, "failover on hold");
                    } else {
                        warn!(decision = "wait", reason = reason.kind(), evidence = %reason, "primary not answering");
                    }
                } else {
                    debug!(decision = "wait", reason = reason.kind(), evidence = %reason, "waiting");
                }
            }
            Decision::Failover(plan) => {
                metrics::decision("failover", "none");
                if let Some(t) = retry_after {
                    if now < t {
                        if said.should("failover retry", now, Duration::from_secs(5)) {
                            warn!(
                                decision = "failover",
                                retry_in_s = (t - now).as_secs_f64(),
                                "last failover attempt failed; waiting before the next"
                            );
                        }
                        continue;
                    }
                }
                said.key.clear();
                let result = failover::run(&actor, &plan, &limits).await;
                let reason = format!(
                    "no primary for {:.1}s; replicas lost it: {}; pglb: {}",
                    plan.down_for.as_secs_f64(),
                    plan.lost.join(", "),
                    plan.pglb
                );
                let record = match &result {
                    Ok(p) => {
                        failovers += 1;
                        retry_after = None;
                        metrics::failover("promoted");
                        let total = plan.down_for + p.promoted_after;
                        metrics::last_failover(total.as_secs_f64());
                        for r in &p.repointed {
                            awaiting.insert(r.clone(), (p.to.clone(), Instant::now()));
                        }
                        info!(
                            decision = "failover",
                            from = plan.from.as_deref().unwrap_or("unknown"),
                            to = %p.to,
                            lsn = %p.lsn,
                            timeline = p.timeline,
                            detected_after_s = plan.down_for.as_secs_f64(),
                            total_s = total.as_secs_f64(),
                            repointed = ?p.repointed,
                            "failover done"
                        );
                        FailoverRecord {
                            at_unix: http::unix_now(),
                            outcome: "promoted",
                            reason,
                            from: plan.from.clone(),
                            to: Some(p.to.clone()),
                            lsn: Some(p.lsn.to_string()),
                            timeline: Some(p.timeline),
                            detected_after_seconds: plan.down_for.as_secs_f64(),
                            promote_seconds: Some(p.promoted_after.as_secs_f64()),
                            total_seconds: Some(total.as_secs_f64()),
                            repointed: p.repointed.clone(),
                            error: None,
                        }
                    }
                    Err(e) => {
                        metrics::failover(e.kind());
                        retry_after = Some(Instant::now() + settings.failover_after);
                        error!(decision = "failover", outcome = e.kind(), error = %e, "failover did not promote anybody");
                        FailoverRecord {
                            at_unix: http::unix_now(),
                            outcome: e.kind(),
                            reason,
                            from: plan.from.clone(),
                            to: None,
                            lsn: None,
                            timeline: None,
                            detected_after_seconds: plan.down_for.as_secs_f64(),
                            promote_seconds: None,
                            total_seconds: None,
                            repointed: vec![],
                            error: Some(e.to_string()),
                        }
                    }
                };
                shared.update(|st| {
                    st.failovers = failovers;
                    st.last_failover = Some(record);
                });
                // Look again at once: the new primary, the re-pointed replicas.
                ticker.reset_immediately();
            }
        }
    }
}
