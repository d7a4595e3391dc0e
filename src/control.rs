//! The control plane's one owner. A single task holds every backend's state (check results,
//! admin state, draining) and the decision memory; checkers, sessions, the admin API and reloads
//! only send it `Event`s. After each event (and on a ticker, for drain deadlines) it calls the
//! pure `routing::route`, logs the transitions and publishes the new `Arc<View>` on one `watch`
//! channel. Sessions are woken only when routing changed; every other reader (stats page,
//! metrics, checkers) sees the newest View whenever it looks. With `[store]`, what the store
//! records as the primary arrives as one more event (`Event::Store`, from `follow`).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::backend::health::Transition as Health;
use crate::backend::probe::{ProbeError, ProbeReport};
use crate::backend::{self, Backend};
use crate::config::{Config, StoreConfig, StoreKind};
use crate::routing::{route, BackendState, Memory, Transition};
use crate::store::PrimaryState;
use crate::view::{AdminState, ReloadStatus, StoreRule, View};

/// Something the control task must know.
#[derive(Debug)]
pub enum Event {
    /// A checker's result.
    Checked {
        name: String,
        result: Result<ProbeReport, ProbeError>,
        /// A fresh login refused while the kept check connection answered.
        login_refused: Option<ProbeError>,
        at: SystemTime,
    },
    /// A session could not connect: counts as a failed check.
    ConnectFailed { name: String, error: ProbeError },
    /// The admin API; the reply is the state before, or `None` for an unknown backend.
    Admin {
        name: String,
        state: AdminState,
        reply: oneshot::Sender<Option<AdminState>>,
    },
    /// A validated config to apply; the reply says what changed.
    Apply {
        config: Box<Config>,
        reply: oneshot::Sender<ConfigDiff>,
    },
    /// The outcome of the last reload attempt, shown in the View.
    Reloaded(ReloadStatus),
    /// What the store says of the primary now (`[store]` only): the record, whether the store
    /// answers, its failed reads; `settings` are the `[store]` the follower that says it runs
    /// with (a report of settings no longer in effect, sent before a reload took effect, is
    /// dropped).
    Store {
        settings: Arc<StoreConfig>,
        state: PrimaryState,
    },
}

/// The sending side of the control task's queue.
#[derive(Debug, Clone)]
pub struct Events(mpsc::UnboundedSender<Event>);

impl Events {
    /// Sends an event; after shutdown (the task is gone) it is dropped, which is harmless.
    pub fn send(&self, e: Event) {
        let _ = self.0.send(e);
    }
}

/// What `apply` changed, for logs and the reload result.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ConfigDiff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

/// Why a request to the control task got no answer.
#[derive(Debug, thiserror::Error)]
#[error("the control task has stopped (shutting down)")]
pub struct Stopped;

/// A handle on the control plane: send events, read the View.
#[derive(Debug, Clone)]
pub struct Control {
    events: Events,
    view: watch::Receiver<Arc<View>>,
}

impl Control {
    /// Applies `config`, starts the checkers (on `tracker`, until `token` is cancelled) and
    /// returns the handle and the control task to run (until `token` is cancelled). The first
    /// View is published before this returns.
    pub fn start(
        config: Config,
        token: CancellationToken,
        tracker: TaskTracker,
    ) -> (
        Control,
        impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let events = Events(tx);
        let (publish, view) = watch::channel(Arc::new(View::default()));
        // With a store, nothing is known of it until the follower reports: no writes until then.
        let store = (config.store.kind != StoreKind::None).then(PrimaryState::default);
        let mut owner = Owner {
            config: Arc::new(config.clone()),
            nodes: Vec::new(),
            memory: Memory::default(),
            store,
            generation: 0,
            reload: ReloadStatus::default(),
            started: Instant::now(),
            grid: backend::CheckGrid::new(tokio::time::Instant::now()),
            waiting: Arc::default(),
            publish,
            events: events.clone(),
            token: token.clone(),
            tracker: tracker.clone(),
        };
        owner.apply(config);
        (Control { events, view }, owner.run(rx))
    }

    /// The newest View.
    pub fn view(&self) -> Arc<View> {
        self.view.borrow().clone()
    }

    /// A receiver that wakes when routing changes.
    pub fn subscribe(&self) -> watch::Receiver<Arc<View>> {
        self.view.clone()
    }

    pub fn events(&self) -> &Events {
        &self.events
    }

    /// Applies a validated config and waits until it is in the View.
    pub async fn apply(&self, config: Config) -> Result<ConfigDiff, Stopped> {
        let (reply, rx) = oneshot::channel();
        self.events.send(Event::Apply {
            config: Box::new(config),
            reply,
        });
        rx.await.map_err(|_| Stopped)
    }

    /// Sets a backend's admin state; `Ok(None)` when no backend has that name.
    pub async fn admin(
        &self,
        name: &str,
        state: AdminState,
    ) -> Result<Option<AdminState>, Stopped> {
        let (reply, rx) = oneshot::channel();
        self.events.send(Event::Admin {
            name: name.to_string(),
            state,
            reply,
        });
        rx.await.map_err(|_| Stopped)
    }

    /// A session could not connect to `backend`: count a failed check and check again now.
    pub fn connect_failed(&self, backend: &Backend, error: ProbeError) {
        self.events.send(Event::ConnectFailed {
            name: backend.name.clone(),
            error,
        });
        backend.recheck();
    }

    pub fn reloaded(&self, status: ReloadStatus) {
        self.events.send(Event::Reloaded(status));
    }
}

/// A backend the control task knows: its handle, its checker, its state.
struct Node {
    handle: Arc<Backend>,
    checker: Option<CancellationToken>,
    state: BackendState,
}

/// The state the control task owns. Nothing else touches it.
struct Owner {
    config: Arc<Config>,
    /// Configured backends in config order, then removed ones still draining.
    nodes: Vec<Node>,
    memory: Memory,
    /// The store's latest word on the primary; `None` without `[store]`.
    store: Option<PrimaryState>,
    generation: u64,
    reload: ReloadStatus,
    started: Instant,
    /// Every checker and this task's tick share it: one wake-up of the thread per round.
    grid: backend::CheckGrid,
    waiting: Arc<std::sync::atomic::AtomicU64>,
    publish: watch::Sender<Arc<View>>,
    events: Events,
    token: CancellationToken,
    tracker: TaskTracker,
}

/// How often the View is recomputed without any event: drain deadlines and forgetting removed
/// backends whose last session ended.
const TICK: Duration = Duration::from_secs(1);

impl Owner {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Event>) {
        // On the checks' grid: the tick wakes the thread together with them, not on its own.
        let mut tick = tokio::time::interval_at(
            self.grid.next_after(tokio::time::Instant::now(), TICK),
            TICK,
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = self.token.cancelled() => return,
                e = rx.recv() => match e {
                    Some(e) => self.handle(e),
                    None => return,
                },
                _ = tick.tick() => {}
            }
            // Several events may be queued (a burst of refused connects): take them all before
            // deciding once.
            while let Ok(e) = rx.try_recv() {
                self.handle(e);
            }
            self.publish();
        }
    }

    fn node(&mut self, name: &str) -> Option<&mut Node> {
        self.nodes
            .iter_mut()
            .find(|n| n.state.name() == name && n.state.drain_until.is_none())
    }

    fn handle(&mut self, e: Event) {
        let (rise, fall) = (self.config.check.rise, self.config.check.fall);
        match e {
            Event::Checked {
                name,
                result,
                login_refused,
                at,
            } => {
                let Some(n) = self.node(&name) else { return };
                let s = &mut n.state;
                s.last_check = Some(at);
                if result.is_ok() {
                    match (&s.login_error, &login_refused) {
                        (None, Some(e)) => {
                            warn!(backend = %name, reason = %e, kind = e.kind(), "new logins refused while the check connection answers: still up")
                        }
                        (Some(_), None) => info!(backend = %name, "logins accepted again"),
                        _ => {}
                    }
                    s.login_error = login_refused;
                }
                let (t, err) = match result {
                    Ok(report) => {
                        s.report = Some(report);
                        s.last_answer = Some(Instant::now());
                        s.last_error = None;
                        (s.health.record(true, rise, fall), None)
                    }
                    Err(e) => {
                        let t = s.health.record(false, rise, fall);
                        s.last_error = Some(e.clone());
                        (t, Some(e))
                    }
                };
                if t.is_some() {
                    s.since = Instant::now();
                }
                let streak = s.health.streak();
                let address = &s.config.address;
                match (t, err) {
                    (Some(Health::Up), _) => {
                        info!(backend = %name, %address, successes = streak, "backend up")
                    }
                    (Some(Health::Down), Some(e)) => {
                        warn!(backend = %name, %address, reason = %e, kind = e.kind(), failures = streak, "backend down")
                    }
                    (None, Some(e)) => {
                        debug!(backend = %name, reason = %e, kind = e.kind(), failures = streak, "check failed")
                    }
                    _ => {}
                }
            }
            Event::ConnectFailed { name, error } => {
                let Some(n) = self.node(&name) else { return };
                let s = &mut n.state;
                let t = s.health.record(false, rise, fall);
                if t.is_some() {
                    s.since = Instant::now();
                }
                if t == Some(Health::Down) {
                    warn!(backend = %name, reason = %error, kind = error.kind(), "backend down (session connect failed)");
                }
                s.last_error = Some(error);
            }
            Event::Admin { name, state, reply } => {
                let before = self.node(&name).map(|n| {
                    let before = n.state.admin;
                    n.state.admin = state;
                    before
                });
                if let Some(before) = before {
                    info!(backend = %name, from = ?before, to = ?state, "admin action");
                }
                let _ = reply.send(before);
            }
            Event::Apply { config, reply } => {
                let diff = self.apply(*config);
                let _ = reply.send(diff);
            }
            Event::Reloaded(status) => self.reload = status,
            Event::Store { settings, state } => {
                if let Some(s) = &mut self.store {
                    if *settings == self.config.store {
                        *s = state;
                    }
                }
            }
        }
    }

    /// Applies a validated config: new backends start checking, removed ones drain, changed ones
    /// take their new address and weight, settings apply to the next decision. Backend state
    /// (health, admin state, counters) carries over by name. Order matters: checkers for new
    /// backends, one publish of the View, then checkers of removed backends stop.
    fn apply(&mut self, config: Config) -> ConfigDiff {
        // A changed `[store]`: the follower is started anew with it (follow::run_config).
        // Another store or prefix may record another primary: nothing is known of it until the
        // new follower reports, so no writes until then, as at start. Only the lease or the
        // credentials changed: the record read so far stays until the next report.
        if self.generation > 0 && config.store != self.config.store {
            let (old, new) = (&self.config.store, &config.store);
            self.store = match new.kind {
                StoreKind::None => None,
                _ if old.kind != new.kind
                    || old.endpoints != new.endpoints
                    || old.prefix != new.prefix =>
                {
                    Some(PrimaryState::default())
                }
                _ => self.store.take().or_else(|| Some(PrimaryState::default())),
            };
            info!(kind = ?new.kind, endpoints = %new.endpoints.iter().map(|e| crate::routing::without_credentials(e)).collect::<Vec<_>>().join(","), prefix = %new.prefix, "[store] changed: following the store with the new settings");
        }
        let mut diff = ConfigDiff::default();
        let now = Instant::now();
        let mut old = std::mem::take(&mut self.nodes);
        let mut next = Vec::with_capacity(config.backends.len());
        for bc in &config.backends {
            match old.iter().position(|n| n.state.name() == bc.name) {
                Some(pos) => {
                    let mut n = old.remove(pos);
                    // Re-added while still draining: keep its sessions and counters.
                    n.state.drain_until = None;
                    if n.state.config != *bc {
                        diff.changed.push(bc.name.clone());
                        n.state.config = bc.clone();
                    }
                    next.push(n);
                }
                None => {
                    diff.added.push(bc.name.clone());
                    next.push(Node {
                        handle: Backend::new(&bc.name),
                        checker: None,
                        state: BackendState::new(bc.clone(), now),
                    });
                }
            }
        }
        let mut stop = Vec::new();
        for mut n in old {
            if n.state.drain_until.is_none() {
                diff.removed.push(n.state.name().to_string());
                n.state.drain_until = Some(now + config.proxy.drain_timeout);
            }
            stop.extend(n.checker.take());
            next.push(n);
        }
        self.nodes = next;
        self.config = Arc::new(config);
        self.generation += 1;
        self.publish();
        for n in self
            .nodes
            .iter_mut()
            .filter(|n| n.state.drain_until.is_none())
        {
            if n.checker.is_none() {
                let token = self.token.child_token();
                self.tracker.spawn(backend::run_checker(
                    n.handle.clone(),
                    self.grid,
                    self.publish.subscribe(),
                    self.events.clone(),
                    token.clone(),
                ));
                n.checker = Some(token);
            }
        }
        for t in stop {
            t.cancel();
        }
        diff
    }

    /// Decides and publishes the next View; wakes sessions only if routing changed.
    fn publish(&mut self) {
        // Forget a removed backend once its last session is gone.
        self.nodes
            .retain(|n| n.state.drain_until.is_none() || n.handle.active_sessions() > 0);
        let now = Instant::now();
        let states: Vec<&BackendState> = self.nodes.iter().map(|n| &n.state).collect();
        let (mut view, transitions) = route(
            &self.config,
            &states,
            self.store.as_ref(),
            &mut self.memory,
            now,
        );
        for t in &transitions {
            log(t);
        }
        view.generation = self.generation;
        view.reload = self.reload.clone();
        view.routing.config = Some(self.config.clone());
        view.routing.handles = self.nodes.iter().map(|n| n.handle.clone()).collect();
        view.routing.started = Some(self.started);
        view.routing.waiting = self.waiting.clone();
        self.publish.send_if_modified(|cur| {
            let wake = !cur.routes_like(&view);
            *cur = Arc::new(view);
            wake
        });
    }
}

fn log(t: &Transition) {
    match t {
        Transition::Conflict { conflict, servers } => {
            error!(conflict = %conflict, servers = ?servers, "two writable primaries on the same timeline: refusing writes until one is gone")
        }
        Transition::ConflictResolved => info!("primary conflict resolved"),
        Transition::Primary { now: Some(p), .. } => info!(backend = %p, "primary is now {p}"),
        Transition::Primary {
            now: None,
            previous,
        } => {
            warn!(previous = ?previous, "no primary available")
        }
        Transition::Role {
            backend,
            from,
            to: crate::backend::Role::Fenced,
            timeline,
            reason,
        } => {
            let reason = reason.map(|r| r.as_str());
            warn!(backend = %backend, from = from.as_str(), timeline = ?timeline, reason = ?reason, "backend fenced: writable but not to take writes")
        }
        Transition::Store {
            rule,
            record,
            block,
        } => {
            let (name, timeline, epoch) = match record {
                Some(r) => (Some(r.name.as_str()), Some(r.timeline), Some(r.epoch)),
                None => (None, None, None),
            };
            let block = block.as_ref().map(|b| b.to_string());
            match rule {
                StoreRule::Record => {
                    info!(recorded = ?name, timeline = ?timeline, epoch = ?epoch, no_writes = ?block, "store: writes go only to the recorded primary")
                }
                StoreRule::NoRecord => {
                    info!("store: no primary recorded yet; pglb's own rule decides writes")
                }
                StoreRule::LastRecord => {
                    warn!(recorded = ?name, timeline = ?timeline, epoch = ?epoch, no_writes = ?block, "store unreachable: writes go only to the last recorded primary while its checks confirm it")
                }
                StoreRule::Unreachable => {
                    warn!("store unreachable and no primary ever read from it: no writes")
                }
            }
        }
        Transition::Role {
            backend, from, to, ..
        } => info!(backend = %backend, from = from.as_str(), to = to.as_str(), "role changed"),
        Transition::Lag {
            backend,
            eligible: true,
            lag_bytes,
            lag_seconds,
            ..
        } => {
            info!(backend = %backend, lag_bytes, lag_seconds, "replica back within lag limits: takes reads again")
        }
        Transition::Lag {
            backend,
            eligible: false,
            lag_bytes,
            lag_seconds,
            max_lag,
            max_lag_seconds,
        } => {
            warn!(backend = %backend, lag_bytes, lag_seconds, max_lag, max_lag_seconds, "replica over lag limits: no new read sessions")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::PrimaryRecord;

    fn with_store() -> Config {
        Config::parse(
            std::path::Path::new("lb.toml"),
            "[check]\nuser = \"c\"\n[store]\nkind = \"etcd\"\nendpoints = [\"http://127.0.0.1:1\"]\n[[backend]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n",
        )
        .expect("a config with a store parses")
    }

    /// Polls the View until `f` holds (the store event is applied by the control task).
    async fn view_until(control: &Control, what: &str, f: impl Fn(&View) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f(&control.view()) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn the_store_event_reaches_the_view_and_a_changed_store_section_starts_afresh() {
        let token = CancellationToken::new();
        let tracker = TaskTracker::new();
        let cfg = with_store();
        let (control, task) = Control::start(cfg.clone(), token.clone(), tracker.clone());
        let task = tokio::spawn(task);
        // Nothing heard from the store yet: no writes.
        let st = control.view().store.clone().expect("a store section");
        assert_eq!(st.rule, StoreRule::Unreachable);

        let record = |settings: &StoreConfig, name: &str| Event::Store {
            settings: Arc::new(settings.clone()),
            state: PrimaryState {
                record: Some(PrimaryRecord {
                    name: name.into(),
                    timeline: 1,
                    epoch: 1,
                }),
                revision: 5,
                reachable: true,
                last_contact: Some(tokio::time::Instant::now()),
                ..Default::default()
            },
        };
        control.events().send(record(&cfg.store, "a"));
        view_until(&control, "the record in the View", |v| {
            v.store
                .as_ref()
                .is_some_and(|s| s.rule == StoreRule::Record && s.recorded.is_some())
        })
        .await;

        // Another prefix: what the old one recorded is forgotten, no writes until the new
        // follower reports; a late report of the old follower changes nothing.
        let mut changed = cfg.clone();
        changed.store.prefix = "/pglb/other".into();
        changed.read.max_lag = 1;
        control
            .apply(changed.clone())
            .await
            .expect("control task runs");
        control.events().send(record(&cfg.store, "a"));
        // One more round trip through the queue: the late report has been handled.
        control
            .apply(changed.clone())
            .await
            .expect("control task runs");
        let v = control.view();
        assert_eq!(v.config().read.max_lag, 1, "the rest of the reload applies");
        assert_eq!(v.config().store.prefix, "/pglb/other");
        let st = v.store.clone().expect("a store section");
        assert_eq!(st.prefix, "/pglb/other");
        assert_eq!(st.rule, StoreRule::Unreachable);
        assert!(st.recorded.is_none());
        control.events().send(record(&changed.store, "b"));
        view_until(&control, "the new store's record in the View", |v| {
            v.store.as_ref().is_some_and(|s| {
                s.rule == StoreRule::Record && s.recorded.as_ref().is_some_and(|r| r.name == "b")
            })
        })
        .await;

        // No store any more: no store section, pglb's own rule.
        let mut none = changed.clone();
        none.store = StoreConfig::default();
        control.apply(none).await.expect("control task runs");
        assert!(control.view().store.is_none());

        token.cancel();
        task.await.expect("control task ends");
        tracker.close();
        tracker.wait().await;
    }
}
