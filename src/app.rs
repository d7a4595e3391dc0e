//! Wires the balancer together: binds the three listeners, starts the control plane (checkers
//! and the control task), the stats server, signals and the reload loop; owns the root token and the task
//! trackers; runs the graceful shutdown. Also the entry point used by tests (`Balancer::start`).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::backend::SlotWaiters;
use crate::config::{Config, Secrets};
use crate::control::Control;
use crate::http::StatsContext;
use crate::proxy::client::{SessionContext, SessionShared};
use crate::proxy::listener::{self, PortLoad};
use crate::proxy::workers::{PortGroup, Workers};
use crate::proxy::PortRole;
use crate::reload::{self, ReloadStatus};

/// One port's listeners (one per worker thread) and the token that stops them alone (for
/// rebinding on reload).
struct PortListener {
    addr: SocketAddr,
    stop: CancellationToken,
    load: Arc<PortLoad>,
}

/// Starts accepting on a port's listeners, each on its own worker thread.
fn serve_port(
    group: PortGroup,
    role: PortRole,
    ctx: &SessionContext,
    stop: &CancellationToken,
    sessions: &TaskTracker,
    load: &Arc<PortLoad>,
) {
    let threads = group.listeners.len();
    let local = group.local;
    for (handle, l) in group.listeners {
        handle.spawn(listener::serve(
            l,
            role,
            ctx.clone(),
            stop.clone(),
            sessions.clone(),
            load.clone(),
        ));
    }
    info!(port = role.as_str(), addr = %local, threads, "listening");
}

/// A running balancer.
pub struct Balancer {
    pub control: Control,
    pub write_addr: SocketAddr,
    pub read_addr: SocketAddr,
    pub stats_addr: SocketAddr,
    shutdown: CancellationToken,
    done: tokio::task::JoinHandle<()>,
    /// Set when a background task ended or panicked before a shutdown was asked for.
    failed: Arc<AtomicBool>,
}

/// Runs the tasks that must live as long as the process: one ending or panicking before a
/// shutdown was asked for is logged and shuts pglb down with a failure exit.
struct Supervisor {
    tracker: TaskTracker,
    shutdown: CancellationToken,
    failed: Arc<AtomicBool>,
}

impl Supervisor {
    fn spawn(&self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task);
        let shutdown = self.shutdown.clone();
        let failed = self.failed.clone();
        self.tracker.spawn(async move {
            let result = handle.await;
            match result {
                Ok(()) if shutdown.is_cancelled() => return,
                Ok(()) => error!(
                    task = name,
                    "background task ended unexpectedly; shutting down"
                ),
                Err(e) => error!(task = name, error = %e, "background task failed; shutting down"),
            }
            failed.store(true, Ordering::SeqCst);
            shutdown.cancel();
        });
    }
}

impl Balancer {
    /// Binds every listener (failing fast on a taken port) and starts serving.
    pub async fn start(config: Config) -> anyhow::Result<Balancer> {
        let shutdown = CancellationToken::new();
        let background = TaskTracker::new();
        let sessions = TaskTracker::new();
        let hard_stop = CancellationToken::new();
        // The session listeners stop here: at SIGTERM, or `shutdown_delay` after it.
        let accepting = CancellationToken::new();
        let prometheus = crate::metrics::prometheus();
        let path = config.path.clone();

        let workers =
            Arc::new(Workers::start(config.proxy.threads).context("start worker threads")?);
        let write = workers
            .bind(config.listen.write)
            .with_context(|| format!("bind write port {}", config.listen.write))?;
        let read = workers
            .bind(config.listen.read)
            .with_context(|| format!("bind read port {}", config.listen.read))?;
        let stats = listener::bind(config.listen.stats)
            .with_context(|| format!("bind stats port {}", config.listen.stats))?;
        let (write_addr, read_addr) = (write.local, read.local);
        let stats_addr = stats.local_addr()?;

        let supervisor = Supervisor {
            tracker: background.clone(),
            shutdown: shutdown.clone(),
            failed: Arc::new(AtomicBool::new(false)),
        };
        let (control, control_task) =
            Control::start(config.clone(), shutdown.clone(), background.clone());
        supervisor.spawn("control", control_task);
        // The store follower runs for the `[store]` in effect (none: it waits), restarted by a
        // reload that changes it.
        let (store_settings, store_rx) = tokio::sync::watch::channel(config.store.clone());
        supervisor.spawn(
            "store follower",
            crate::follow::run_config(store_rx, control.events().clone(), shutdown.clone()),
        );
        let ctx: SessionContext = Arc::new(SessionShared {
            control: control.clone(),
            rr: AtomicUsize::new(0),
            waiters: Arc::new(SlotWaiters::default()),
            hard_stop: hard_stop.clone(),
            shutting_down: shutdown.clone(),
            affinity: Default::default(),
        });
        let mut ports = Vec::new();
        for (group, role, addr) in [
            (write, PortRole::Write, config.listen.write),
            (read, PortRole::Read, config.listen.read),
        ] {
            let stop = accepting.child_token();
            let load = Arc::new(PortLoad::default());
            serve_port(group, role, &ctx, &stop, &sessions, &load);
            ports.push(PortListener { addr, stop, load });
        }

        let stats_ctx = Arc::new(StatsContext {
            control: control.clone(),
            prometheus,
            shutting_down: shutdown.clone(),
        });
        // The stats listener outlives the session listeners: during the drain it still answers
        // (`/live` with 503), and it stops once the drain is over.
        let stats_stop = CancellationToken::new();
        supervisor.spawn(
            "stats server",
            crate::http::serve(stats, stats_ctx, stats_stop.clone()),
        );

        let (requests, reload_tx) = reload::Requests::watch(&path);
        supervisor.spawn("signals", {
            let shutdown = shutdown.clone();
            async move {
                if let Err(e) = crate::signals::run(shutdown.clone(), reload_tx).await {
                    error!(error = %e, "signal handling failed; shutting down");
                }
            }
        });
        supervisor.spawn(
            "reload",
            reload::run(
                path,
                Secrets::Required,
                control.view().config().as_ref().clone(),
                requests,
                shutdown.clone(),
                BalancerReload {
                    control: control.clone(),
                    ports,
                    ctx: ctx.clone(),
                    sessions: sessions.clone(),
                    accepting: accepting.clone(),
                    workers: workers.clone(),
                    store_settings,
                },
            ),
        );

        let done = tokio::spawn(drain(
            control.clone(),
            Stops {
                shutdown: shutdown.clone(),
                accepting,
                hard_stop,
                stats: stats_stop,
            },
            sessions,
            background,
            workers,
        ));
        info!(
            write = %write_addr,
            read = %read_addr,
            stats = %stats_addr,
            backends = config.backends.len(),
            "pglb started"
        );
        Ok(Balancer {
            control,
            write_addr,
            read_addr,
            stats_addr,
            shutdown,
            done,
            failed: supervisor.failed,
        })
    }

    /// Starts a graceful shutdown (as SIGTERM does).
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits until the balancer has stopped (after a signal or `shutdown`). An error when a
    /// background task failed or the drain itself panicked: the exit must not say success.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.done.await.context("shutdown drain failed")?;
        if self.failed.load(Ordering::SeqCst) {
            anyhow::bail!("a background task failed (see the log above)");
        }
        Ok(())
    }
}

/// After the root token is cancelled: listeners have stopped accepting; give open sessions up to
/// `shutdown_timeout`, then cut the rest.
/// The tokens of a shutdown, in the order the drain cancels them.
struct Stops {
    /// SIGTERM/SIGINT (or `Balancer::shutdown`): `/live` turns 503.
    shutdown: CancellationToken,
    /// The session listeners: `shutdown_delay` after `shutdown`.
    accepting: CancellationToken,
    /// Open sessions: when `shutdown_timeout` is over.
    hard_stop: CancellationToken,
    /// The stats listener: last.
    stats: CancellationToken,
}

async fn drain(
    control: Control,
    stops: Stops,
    sessions: TaskTracker,
    background: TaskTracker,
    workers: Arc<Workers>,
) {
    let Stops {
        shutdown,
        accepting,
        hard_stop,
        stats: stats_stop,
    } = stops;
    shutdown.cancelled().await;
    // `/live` answers 503 from now on; listeners go on accepting for shutdown_delay so that a
    // VIP or a load balancer moves new clients away before they would be refused.
    let delay = control.view().config().proxy.shutdown_delay;
    if !delay.is_zero() {
        info!(delay = ?delay, "shutting down: /live is 503, still accepting new sessions for shutdown_delay");
        tokio::time::sleep(delay).await;
    }
    accepting.cancel();
    sessions.close();
    background.close();
    let view = control.view();
    let timeout = view.config().proxy.shutdown_timeout;
    let open = view.active_sessions();
    info!(open_sessions = open, timeout = ?timeout, "draining sessions");
    if tokio::time::timeout(timeout, sessions.wait())
        .await
        .is_err()
    {
        let left = control.view().active_sessions();
        warn!(
            cut = left,
            "shutdown timeout reached: closing remaining sessions"
        );
        hard_stop.cancel();
        sessions.wait().await;
    }
    stats_stop.cancel();
    background.wait().await;
    // Every session has ended: the worker threads can go.
    drop(workers);
    info!("pglb stopped");
}

/// What a reload changes in pglb: listeners whose address changed are rebound (a failed bind keeps
/// the old address, and says so), then the control task takes the config, then a changed
/// `[store]` restarts the store follower.
struct BalancerReload {
    control: Control,
    ports: Vec<PortListener>,
    ctx: SessionContext,
    sessions: TaskTracker,
    accepting: CancellationToken,
    workers: Arc<Workers>,
    /// The `[store]` the follower runs with.
    store_settings: tokio::sync::watch::Sender<crate::config::StoreConfig>,
}

impl reload::Target for BalancerReload {
    async fn apply(&mut self, mut new: Config) -> reload::Applied {
        let current = self.control.view().config().clone();
        let mut bind_error = None;
        for (p, role) in self.ports.iter_mut().zip([PortRole::Write, PortRole::Read]) {
            let want = match role {
                PortRole::Write => new.listen.write,
                PortRole::Read => new.listen.read,
            };
            if want == p.addr {
                continue;
            }
            match self.workers.bind(want) {
                Ok(group) => {
                    let stop = self.accepting.child_token();
                    serve_port(group, role, &self.ctx, &stop, &self.sessions, &p.load);
                    p.stop.cancel();
                    info!(port = role.as_str(), from = %p.addr, to = %want, "listener rebound");
                    p.addr = want;
                    p.stop = stop;
                }
                Err(e) => {
                    error!(port = role.as_str(), addr = %want, error = %e, "cannot bind new listen address; keeping the old one");
                    bind_error = Some(format!("bind {} port {want}: {e}", role.as_str()));
                    match role {
                        PortRole::Write => new.listen.write = p.addr,
                        PortRole::Read => new.listen.read = p.addr,
                    }
                }
            }
        }
        if new.listen.stats != current.listen.stats {
            warn!("listen.stats changes need a restart; keeping the old stats address");
            new.listen.stats = current.listen.stats;
        }
        if new.proxy.threads != current.proxy.threads {
            warn!(
                running = current.proxy.threads,
                asked = new.proxy.threads,
                "proxy.threads changes need a restart; keeping the running threads"
            );
            new.proxy.threads = current.proxy.threads;
        }
        let Ok(diff) = self.control.apply(new).await else {
            // The control task has stopped: the process is shutting down.
            return reload::Applied::Stopped;
        };
        let view = self.control.view();
        // After the control task took it: the new follower's reports match its settings.
        self.store_settings.send_if_modified(|s| {
            let changed = *s != view.config().store;
            if changed {
                *s = view.config().store.clone();
            }
            changed
        });
        info!(
            added = ?diff.added,
            removed = ?diff.removed,
            changed = ?diff.changed,
            generation = view.generation,
            "config reloaded"
        );
        reload::Applied::Running {
            config: Box::new(view.config().as_ref().clone()),
            note: bind_error,
        }
    }

    fn report(&mut self, status: &ReloadStatus) {
        crate::metrics::config_reload(status.result.as_str());
        self.control.reloaded(status.clone());
    }
}

/// Runs the balancer until SIGTERM/SIGINT and the drain are done.
pub async fn run_balancer(config: Config) -> anyhow::Result<()> {
    let b = Balancer::start(config).await?;
    b.wait().await
}
