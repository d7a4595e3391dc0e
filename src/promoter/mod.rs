//! pglb-promoter: watches the primary and, when it is really gone, promotes the most advanced
//! replica, re-points the others and keeps the old primary fenced. Observe → decide → execute.
//!
//! Module map:
//! - `settings`: the `[promoter]` section and backends, secrets resolved (`Settings`, `Member`).
//! - `observe`: one look at every backend (fresh login, role, WAL, receiver) and at every pglb.
//! - `decide`: pure: primary from timelines, failure detection with witnesses (`assess` →
//!   `Decision`), and the loop's policy (`decide` → `Command`s; outcomes come back as `Event`s).
//! - `promote`: side effects behind the `Promoter` trait (`PgPromoter` over SQL, `DryRun`).
//! - `failover`: the failover driver (stop receivers, choose, replay, promote, re-point).
//! - `switchover`: the planned `switchover --to NAME`.
//! - `rejoin`: `rejoin`: pg_rewind an old primary and restart it as a standby (local data dir).
//! - `http`: `/status`, `/metrics`, `/health`; `metrics`: metric names.
//!
//! This file wires the daemon: config reload, signals, the status server and the loop, which
//! only looks, executes commands and feeds back their outcomes.

pub mod coordination;
pub mod decide;
pub mod failover;
pub mod failpoint;
pub mod http;
pub mod metrics;
pub mod observe;
pub mod promote;
pub mod rejoin;
pub mod settings;
pub mod switchover;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn, Instrument};

use crate::config::{Config, Secrets};
use crate::ratelimit::LogEvery;
use crate::reload;
use crate::store::MemberView;
use coordination::{Guarded, Link, Standing};
use decide::{Action, Command, Decision, Event, Policy, State};
use http::{FailoverRecord, NodeSummary, Shared, Status};
use observe::Observation;
use promote::{DryRun, PgPromoter, Promoter};
use settings::Settings;

/// How the daemon runs.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Observe and decide, log what would be done, change nothing.
    pub dry_run: bool,
    /// This promoter's identity (`--id`, default the host name): logs, `/status`, and with a
    /// store its leader and member keys.
    pub id: String,
}

/// The default identity: the host name (Linux: `/proc/sys/kernel/hostname`).
pub fn default_id() -> std::io::Result<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string())
}

/// Whether `id` can name a promoter: it becomes part of store keys and a metric label, so 1 to
/// 128 characters among ASCII letters, digits, '.', '_' and '-'.
pub fn valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn policy(s: &Settings) -> Policy {
    Policy::new(s.failover_after, s.synchronous)
}

/// Runs the promoter until SIGTERM/SIGINT.
pub async fn run(config: Config, opts: RunOptions) -> anyhow::Result<()> {
    let settings = Arc::new(Settings::from_config(&config)?);
    let store_config = config.store.clone();
    let shared = Arc::new(Shared {
        status: Mutex::new(Status::new(
            config.path.display().to_string(),
            opts.dry_run,
            opts.id.clone(),
        )),
        prometheus: crate::metrics::prometheus(),
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

    let (requests, reload_tx) = reload::Requests::watch(&config.path);
    background.spawn({
        let shutdown = shutdown.clone();
        async move {
            if let Err(e) = crate::signals::run(shutdown.clone(), reload_tx).await {
                error!(error = %e, "signal handling failed; shutting down");
                shutdown.cancel();
            }
        }
    });
    let (settings_tx, settings_rx) = watch::channel(settings.clone());
    let (store_tx, store_rx) = watch::channel(store_config.clone());
    // The promoter's own reading of the file: pglb's check password is not its business.
    background.spawn(reload::run(
        config.path.clone(),
        Secrets::Optional,
        config,
        requests,
        shutdown.clone(),
        PromoterReload {
            settings: settings_tx,
            store: store_tx,
            shared: shared.clone(),
        },
    ));
    info!(
        id = %opts.id,
        backends = settings.members.len(),
        failover_after = ?settings.failover_after,
        interval = ?settings.interval,
        synchronous = settings.synchronous,
        pglb = %settings.pglb_stats.join(","),
        listen = %settings.listen,
        dry_run = opts.dry_run,
        "pglb-promoter started"
    );
    metrics::info(&opts.id);
    // At start a store that cannot be set up is an error; after a reload that changes
    // `[store]`, `on_reload` switches (and retries).
    let standing = Standing::start(&store_config, &opts.id)
        .await
        .context("connect to the store and campaign for the leader key ([store])")?;
    let (standing_tx, standing) = watch::channel(standing);
    background.spawn(coordination::on_reload(
        store_rx,
        standing_tx,
        opts.id.clone(),
        shared.clone(),
        settings.interval.max(Duration::from_secs(1)),
        shutdown.child_token(),
    ));
    // Looks keep a silent server's login in flight between them (`observe::Observer`).
    let observer = Arc::new(observe::Observer::default());
    let observe = move |s: Arc<Settings>| {
        let observer = observer.clone();
        async move { observer.look(&s).await }
    };
    // Every line the loop logs carries this promoter's id.
    let span = tracing::info_span!("promoter", id = %opts.id);
    if opts.dry_run {
        run_loop(
            |s, l| Guarded::new(DryRun(PgPromoter::new(s)), l),
            observe,
            settings_rx,
            shared,
            standing.clone(),
            shutdown.clone(),
        )
        .instrument(span)
        .await;
    } else {
        run_loop(
            |s, l| Guarded::new(PgPromoter::new(s), l),
            observe,
            settings_rx,
            shared,
            standing.clone(),
            shutdown.clone(),
        )
        .instrument(span)
        .await;
    }
    let link = standing.borrow().link();
    if let Some(l) = link {
        l.resign(Duration::from_secs(2)).await;
    }
    background.close();
    shutdown.cancel();
    background.wait().await;
    info!("pglb-promoter stopped");
    Ok(())
}

/// What a reload changes in the promoter: new `Settings` for the loop (`promoter.listen` needs a
/// restart), a changed `[store]` for `coordination::on_reload`.
struct PromoterReload {
    settings: watch::Sender<Arc<Settings>>,
    store: watch::Sender<crate::config::StoreConfig>,
    shared: Arc<Shared>,
}

impl reload::Target for PromoterReload {
    async fn apply(&mut self, new: Config) -> reload::Applied {
        match Settings::from_config(&new) {
            Ok(s) => {
                if s.listen != self.settings.borrow().listen {
                    warn!("promoter.listen changes need a restart; keeping the old address");
                }
                info!(backends = s.members.len(), failover_after = ?s.failover_after, synchronous = s.synchronous, "config reloaded");
                let _ = self.settings.send(Arc::new(s));
                self.store.send_if_modified(|s| {
                    let changed = *s != new.store;
                    if changed {
                        *s = new.store.clone();
                    }
                    changed
                });
                reload::Applied::Running {
                    config: Box::new(new),
                    note: None,
                }
            }
            Err(e) => reload::Applied::Refused(e.to_string()),
        }
    }

    fn report(&mut self, status: &reload::ReloadStatus) {
        metrics::config_reload(status.result.as_str());
        self.shared.update(|st| st.reload = status.clone());
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
                role: role.to_string(),
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

/// Fences a stale primary beside the loop; reports back on `done`.
fn spawn_fence<P: Promoter + Clone + 'static>(
    fences: &TaskTracker,
    actor: &P,
    node: settings::Member,
    primary: Option<String>,
    newest_timeline: u32,
    done: mpsc::UnboundedSender<Event>,
) {
    let actor = actor.clone();
    fences.spawn(async move {
        let r = actor.fence(&node).await;
        metrics::action("fence", r.is_ok());
        match r {
            Ok(n) => {
                warn!(step = "fence", node = %node.name, terminated_sessions = n, primary = %primary.unwrap_or_default(), newest_timeline, "stale primary fenced: read-only, client sessions ended")
            }
            Err(e) => {
                error!(step = "fence", node = %node.name, error = %e, "cannot fence a stale primary; retried on the next look")
            }
        }
        let _ = done.send(Event::FenceDone { node: node.name });
    });
}

/// Publishes one look on `/status` and in the gauges.
fn publish(shared: &Shared, obs: &Observation, state: &State, settings: &Settings) {
    let topo = decide::topology(obs, state);
    let primary_name = match topo.primary {
        decide::Primary::One(p) => Some(p.name().to_string()),
        _ => None,
    };
    let down = primary_name
        .is_none()
        .then(|| obs.at.saturating_duration_since(state.primary_last_seen()));
    metrics::primary(
        primary_name.is_some(),
        down.map(|d| d.as_secs_f64()).unwrap_or(0.0),
    );
    let fenced = decide::fenced(obs, state);
    let nodes = summaries(obs, state);
    let decision = state.decision.as_ref();
    shared.update(|st| {
        st.looks += 1;
        st.last_look_unix = Some(http::unix_now());
        st.primary = primary_name;
        st.decision = decision
            .map(Decision::kind)
            .unwrap_or("starting")
            .to_string();
        st.primary_down_seconds = down.map(|d| d.as_secs_f64());
        st.failover_after_seconds = settings.failover_after.as_secs_f64();
        st.synchronous = settings.synchronous;
        st.fenced = fenced;
        st.pglb = obs.pglb.first();
        st.witnesses = obs.pglb.clone();
        st.nodes = nodes;
        st.not_streaming = match decision {
            Some(Decision::Steady { not_streaming, .. }) => not_streaming.clone(),
            _ => vec![],
        };
        (st.reason_kind, st.reason) = match decision {
            Some(Decision::Wait { reason }) => {
                (Some(reason.kind().to_string()), Some(reason.to_string()))
            }
            _ => (None, None),
        };
    });
}

/// The primary derived from the servers (one writable server on the newest timeline), with its
/// timeline.
fn single_primary(obs: &Observation, state: &State) -> Option<(String, u32)> {
    match decide::topology(obs, state).primary {
        decide::Primary::One(p) => p.reachable().map(|s| (p.name().to_string(), s.timeline)),
        _ => None,
    }
}

/// What this promoter sees, for the other promoters and the status pages.
fn member_view(obs: &Observation, state: &State, looks: u64) -> MemberView {
    let primary = single_primary(obs, state);
    let (reachable, unreachable): (Vec<_>, Vec<_>) =
        obs.nodes.iter().partition(|n| n.reachable().is_some());
    MemberView {
        primary: primary.as_ref().map(|(p, _)| p.clone()),
        timeline: primary.map(|(_, tl)| tl),
        reachable: reachable.iter().map(|n| n.name().to_string()).collect(),
        unreachable: unreachable.iter().map(|n| n.name().to_string()).collect(),
        looks,
    }
}

/// Logs and counts the assessment of one look.
/// What the loop has said lately: a steady cluster is said again after 5 min, a wait after 5 s; a
/// change is said at once.
struct Said {
    steady: LogEvery,
    wait: LogEvery,
}

impl Said {
    fn new() -> Said {
        Said {
            steady: LogEvery::new(Duration::from_secs(300)),
            wait: LogEvery::new(Duration::from_secs(5)),
        }
    }
}

fn say_decision(decision: &Decision, said: &Said, now: Instant) {
    match decision {
        Decision::Steady {
            primary,
            not_streaming,
        } => {
            let key = format!("steady {primary} {not_streaming:?}");
            said.wait.forget();
            if said.steady.due_for(&key, now) {
                info!(decision = "steady", primary = %primary, not_streaming = ?not_streaming, "primary answers; replicas checked");
            }
            metrics::decision("steady", "none");
        }
        Decision::Reconcile { .. } => {
            metrics::decision("reconcile", "none");
            said.steady.forget();
            said.wait.forget();
        }
        Decision::Wait { reason } => {
            metrics::decision("wait", reason.kind());
            said.steady.forget();
            if said.wait.due_for(reason.kind(), now) {
                if reason.blocks_failover() {
                    warn!(decision = "wait", reason = reason.kind(), evidence = %reason, "failover on hold");
                } else {
                    warn!(decision = "wait", reason = reason.kind(), evidence = %reason, "primary not answering");
                }
            } else {
                debug!(decision = "wait", reason = reason.kind(), evidence = %reason, "waiting");
            }
        }
        Decision::Failover(_) => metrics::decision("failover", "none"),
    }
}

/// Runs a failover plan; logs, counts and records it. Returns the event for `State::record`.
async fn execute_failover<P: Promoter>(
    actor: &P,
    plan: &decide::FailoverPlan,
    limits: &failover::Limits,
    shared: &Shared,
) -> Event {
    let result = failover::run(actor, plan, limits).await;
    let reason = format!(
        "no primary for {:.1}s; replicas lost it: {}; pglb: {}",
        plan.down_for.as_secs_f64(),
        plan.lost.join(", "),
        plan.pglb
    );
    let (record, event) = match &result {
        Ok(p) => {
            metrics::failover("promoted");
            let total = plan.down_for + p.promoted_after;
            metrics::last_failover(total.as_secs_f64());
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
            (
                FailoverRecord {
                    at_unix: http::unix_now(),
                    outcome: "promoted".to_string(),
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
                },
                Event::FailoverDone {
                    to: Some(p.to.clone()),
                    repointed: p.repointed.clone(),
                },
            )
        }
        Err(e) => {
            metrics::failover(e.kind());
            if matches!(e, failover::FailoverError::Guard { .. }) {
                shared.update(|st| st.guard_refusals += 1);
            }
            error!(decision = "failover", outcome = e.kind(), error = %e, "failover did not promote anybody");
            (
                FailoverRecord {
                    at_unix: http::unix_now(),
                    outcome: e.kind().to_string(),
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
                },
                Event::FailoverDone {
                    to: None,
                    repointed: vec![],
                },
            )
        }
    };
    let promoted = result.is_ok();
    shared.update(|st| {
        if promoted {
            st.failovers += 1;
        }
        st.last_failover = Some(record);
    });
    event
}

/// The observe → decide → execute loop. `decide` holds the policy; this only looks, runs the
/// commands through the `Promoter` and feeds their outcomes back into the `State`. Fences run
/// beside the loop and are awaited before it returns.
/// The look interval while a failover's evidence is gathered (`Decision::gathering_evidence`).
const FAST_LOOK: Duration = Duration::from_millis(200);
/// The shortest gap between two looks that are brought forward.
const MIN_LOOK_GAP: Duration = Duration::from_millis(10);

async fn run_loop<P, F, O, Fut>(
    make: F,
    observe: O,
    mut settings_rx: watch::Receiver<Arc<Settings>>,
    shared: Arc<Shared>,
    standing: watch::Receiver<Standing>,
    shutdown: CancellationToken,
) where
    P: Promoter + Clone + 'static,
    F: Fn(Arc<Settings>, Option<Arc<Link>>) -> P,
    O: Fn(Arc<Settings>) -> Fut,
    Fut: Future<Output = Observation>,
{
    let mut settings = settings_rx.borrow_and_update().clone();
    let mut state = State::new(policy(&settings), Instant::now());
    let mut ticker = tokio::time::interval(settings.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let limits = failover::Limits::default();
    let said = Said::new();
    let mut warned = HashMap::new();
    let fences = TaskTracker::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let mut looks: u64 = 0;

    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
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
        while let Ok(event) = done_rx.try_recv() {
            state.record(event, Instant::now());
        }
        // Read once per look: a reload that switches the store takes effect at the next one.
        let now_standing = standing.borrow().clone();
        let link = now_standing.link();
        let actor = make(settings.clone(), link.clone());
        let obs = observe(settings.clone()).await;
        metrics::look();
        for n in &obs.nodes {
            metrics::reachable(n.name(), n.reachable().is_some());
        }
        warn_slow_timeouts(&obs, &settings, &mut warned);

        let now = Instant::now();
        // The gate where decisions become commands: only a leader (or a promoter without a
        // store) gets commands that change servers; `Guarded` checks again at each change.
        state.may_act = now_standing.may_act();
        // Other promoters as witnesses: a view that moved lately (within two of our looks
        // and two store reads) and still names a primary holds a failover back.
        state.peers = link.as_ref().map_or(vec![], |l| {
            l.witnesses(settings.interval * 2 + Duration::from_secs(2))
        });
        looks += 1;
        state.recorded = link
            .as_ref()
            .and_then(|l| l.current_record())
            .map(|r| r.name);
        let commands = decide::decide(&obs, &mut state, now);
        // While no primary answers, look every FAST_LOOK: the moment the evidence is complete
        // (the replicas' silence passing its bound) is seen within 0.2 s, not an interval.
        if state
            .decision
            .as_ref()
            .is_some_and(Decision::gathering_evidence)
            && settings.interval > FAST_LOOK
        {
            ticker.reset_after(FAST_LOOK);
        }
        // The primary's silence reaches failover_after before the next look: look right then
        // (a kill -9 is failed over at failover_after, not up to a fast look later).
        if let Some(at) = state
            .decision
            .as_ref()
            .and_then(|d| d.primary_silence_complete_at(&state))
        {
            let next = Instant::now() + settings.interval.min(FAST_LOOK);
            if at < next {
                ticker.reset_at(at.max(Instant::now() + MIN_LOOK_GAP));
            }
        }
        publish(&shared, &obs, &state, &settings);
        if let Some(l) = &link {
            l.publish(member_view(&obs, &state, looks));
            if let Some((p, tl)) = single_primary(&obs, &state) {
                l.keep_record(&obs, &p, tl).await;
                if matches!(&state.decision, Some(Decision::Steady { not_streaming, .. }) if not_streaming.is_empty())
                {
                    l.settled(&p, tl).await;
                }
            }
        }
        if let Some(d) = &state.decision {
            say_decision(d, &said, now);
        }
        for command in commands {
            match command {
                Command::Fence {
                    node,
                    primary,
                    newest_timeline,
                } => spawn_fence(
                    &fences,
                    &actor,
                    node,
                    primary,
                    newest_timeline,
                    done_tx.clone(),
                ),
                Command::Act(action) => {
                    let ok = apply(&actor, &action).await;
                    state.record(Event::ActionDone { action, ok }, Instant::now());
                }
                Command::Verified {
                    node,
                    primary,
                    after,
                } => {
                    info!(step = "verify", node = %node, primary = %primary, after_s = after.as_secs_f64(), "replica streams from the new primary");
                }
                Command::NotVerified {
                    node,
                    primary,
                    after,
                } => {
                    warn!(step = "verify", node = %node, primary = %primary, after_s = after.as_secs_f64(), "replica still not streaming from the new primary after 30s: check its log; it may need `pglb-promoter rejoin`");
                }
                Command::RetryLater { left, .. } => {
                    if said.wait.due_for("failover retry", now) {
                        warn!(
                            decision = "failover",
                            retry_in_s = left.as_secs_f64(),
                            "last failover attempt failed; waiting before the next"
                        );
                    }
                }
                Command::Failover(plan) => {
                    said.steady.forget();
                    said.wait.forget();
                    let event = execute_failover(&actor, &plan, &limits, &shared).await;
                    state.record(event, Instant::now());
                    // Look again at once: the new primary, the re-pointed replicas.
                    ticker.reset_immediately();
                }
            }
        }
        // With a store, a switchover asked through it is run by the leader, between looks and
        // only while steady.
        if let Some(l) = &link {
            if matches!(state.decision, Some(Decision::Steady { .. }))
                && l.serve_switchover(&actor, &settings).await
            {
                ticker.reset_immediately();
            }
        }
    }
    // A fence in flight finishes (its sessions are ended, or it fails) before the process
    // exits, so a stale primary is never left half-fenced by a shutdown.
    fences.close();
    fences.wait().await;
}

#[cfg(test)]
mod tests {
    //! The loop itself on paused time, with a fake `Promoter` and scripted observations: it
    //! executes what `decide` says, feeds the outcomes back, and awaits fences on shutdown.

    use super::*;
    use crate::promoter::decide::tests::{
        healthy, member, node, primary_dead, primary_status, replica_status,
    };
    use crate::promoter::observe::{NodeObservation, Witnesses};
    use crate::promoter::promote::{ActError, Position};
    use settings::Member;
    use std::path::Path;

    /// Records every call with its (virtual) time; positions never answer, so a failover
    /// finds no candidate after 100 ms (stopping receivers); a fence takes `fence_takes`.
    #[derive(Clone)]
    struct Fake {
        t0: Instant,
        calls: Arc<Mutex<Vec<(String, Duration)>>>,
        fence_takes: Duration,
    }

    impl Fake {
        fn new(fence_takes: Duration) -> Fake {
            Fake {
                t0: Instant::now(),
                calls: Arc::default(),
                fence_takes,
            }
        }
        fn note(&self, call: &str, node: &Member) {
            self.calls
                .lock()
                .unwrap()
                .push((format!("{call} {}", node.name), self.t0.elapsed()));
        }
        fn times(&self, call: &str) -> Vec<Duration> {
            self.calls
                .lock()
                .unwrap()
                .iter()
                .filter(|(c, _)| c == call)
                .map(|(_, t)| *t)
                .collect()
        }
    }

    impl Promoter for Fake {
        async fn position(&self, node: &Member) -> Result<Position, ActError> {
            self.note("position", node);
            Err(ActError::Timeout {
                node: node.name.clone(),
                what: "position",
                after: Duration::from_secs(1),
            })
        }
        async fn stop_receiver(&self, node: &Member) -> Result<String, ActError> {
            self.note("stop_receiver", node);
            // A failover takes time; without it a loop that retried at once would spin at
            // one instant of paused time instead of failing the test.
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok(String::new())
        }
        async fn restore_receiver(&self, node: &Member, _c: &str) -> Result<(), ActError> {
            self.note("restore_receiver", node);
            Ok(())
        }
        async fn prepare(&self, node: &Member, _s: Option<&str>) -> Result<(), ActError> {
            self.note("prepare", node);
            Ok(())
        }
        async fn promote(&self, node: &Member, _wait: Duration) -> Result<bool, ActError> {
            self.note("promote", node);
            Ok(false)
        }
        async fn checkpoint(&self, node: &Member) -> Result<(), ActError> {
            self.note("checkpoint", node);
            Ok(())
        }
        async fn ensure_slot(&self, primary: &Member, _slot: &str) -> Result<(), ActError> {
            self.note("ensure_slot", primary);
            Ok(())
        }
        async fn repoint(&self, replica: &Member, _primary: &Member) -> Result<(), ActError> {
            self.note("repoint", replica);
            Ok(())
        }
        async fn fence(&self, node: &Member) -> Result<u64, ActError> {
            self.note("fence start", node);
            tokio::time::sleep(self.fence_takes).await;
            self.note("fence done", node);
            Ok(0)
        }
        async fn unfence(&self, node: &Member) -> Result<(), ActError> {
            self.note("unfence", node);
            Ok(())
        }
        async fn set_sync_names(&self, primary: &Member, _v: &str) -> Result<(), ActError> {
            self.note("set_sync_names", primary);
            Ok(())
        }
    }

    fn settings() -> Arc<Settings> {
        let text = r#"
[check]
user = "pglb_check"
[promoter]
failover_after = "2s"
interval = "200ms"
[[backend]]
name = "pg-0"
address = "127.0.0.1:5000"
[[backend]]
name = "pg-1"
address = "127.0.0.1:5001"
[[backend]]
name = "pg-2"
address = "127.0.0.1:5002"
"#;
        let c = Config::parse(Path::new("lb.toml"), text).expect("test config");
        Arc::new(Settings::from_config(&c).expect("test settings"))
    }

    /// Runs the loop against `fake`, every look seeing `nodes()`, for `run_for` (virtual), then
    /// shuts it down; returns how long the shutdown took.
    async fn run_for(
        fake: &Fake,
        nodes: fn() -> Vec<NodeObservation>,
        run_for: Duration,
    ) -> Duration {
        run_timed(fake, Arc::new(move |_| nodes()), run_for).await
    }

    /// The same, each look seeing `nodes(time since the start)`.
    async fn run_timed(
        fake: &Fake,
        nodes: Arc<dyn Fn(Duration) -> Vec<NodeObservation> + Send + Sync>,
        run_for: Duration,
    ) -> Duration {
        let t0 = Instant::now();
        let (_tx, rx) = watch::channel(settings());
        let shared = Arc::new(Shared {
            status: Mutex::new(Status::new("lb.toml".into(), false, "test".into())),
            prometheus: None,
        });
        let shutdown = CancellationToken::new();
        let observe = move |_s: Arc<Settings>| {
            let nodes = nodes.clone();
            async move {
                Observation {
                    at: Instant::now(),
                    nodes: nodes(t0.elapsed()),
                    pglb: Witnesses::default(),
                }
            }
        };
        let fake2 = fake.clone();
        let task = tokio::spawn(run_loop(
            move |_s, _l| fake2.clone(),
            observe,
            rx,
            shared,
            watch::channel(Standing::Alone).1,
            shutdown.clone(),
        ));
        tokio::time::sleep(run_for).await;
        let cancelled = Instant::now();
        shutdown.cancel();
        task.await.expect("loop task");
        cancelled.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn failed_failovers_are_paced_by_failover_after() {
        let fake = Fake::new(Duration::ZERO);
        run_for(&fake, primary_dead, Duration::from_millis(9900)).await;
        let attempts = fake.times("stop_receiver pg-1");
        // Due at 2 s (failover_after from the start); each attempt fails 100 ms later and the
        // next one waits failover_after from then. Looks every 200 ms: without the pause it
        // would try ~40 times.
        assert_eq!(
            attempts,
            [2000, 4100, 6200, 8300].map(Duration::from_millis),
            "{:?}",
            fake.calls.lock().unwrap()
        );
        assert!(fake.times("promote pg-1").is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_failover_starts_when_the_primary_has_been_silent_for_failover_after() {
        let fake = Fake::new(Duration::ZERO);
        let t0 = Instant::now();
        // pg-0 answers each look (every 200 ms) 50 ms after it starts, the last time in the look
        // at 0.8 s; from the next look on it is gone.
        let nodes = move |since: Duration| {
            if since <= Duration::from_millis(800) {
                let mut nodes = healthy();
                nodes[0].answered_at = Some(t0 + since + Duration::from_millis(50));
                nodes
            } else {
                primary_dead()
            }
        };
        run_timed(&fake, Arc::new(nodes), Duration::from_secs(4)).await;
        // Its silence reaches failover_after (2 s) at 2.85 s, between the looks at 2.8 and 3.0:
        // the loop looks right then.
        assert_eq!(
            fake.times("stop_receiver pg-1").first(),
            Some(&Duration::from_millis(2850)),
            "{:?}",
            fake.calls.lock().unwrap()
        );
    }

    fn stale_pg0() -> Vec<NodeObservation> {
        vec![
            node(member("pg-0", 5000), primary_status(1, 300, &[])),
            node(member("pg-1", 5001), primary_status(2, 200, &["pg-2"])),
            node(member("pg-2", 5002), replica_status(2, 200, 5001, true)),
        ]
    }

    #[tokio::test(start_paused = true)]
    async fn a_fence_in_flight_is_issued_once_and_awaited_on_shutdown() {
        let fake = Fake::new(Duration::from_secs(5));
        let shutdown_took = run_for(&fake, stale_pg0, Duration::from_secs(1)).await;
        // Five looks saw pg-0 writable while its fence ran: one fence.
        assert_eq!(fake.times("fence start pg-0"), [Duration::ZERO]);
        assert_eq!(fake.times("fence done pg-0"), [Duration::from_secs(5)]);
        assert_eq!(shutdown_took, Duration::from_secs(4));
    }
}
