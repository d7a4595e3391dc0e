//! Wires the balancer together: binds the three listeners, starts the cluster (checkers and
//! routing), the stats server, signals and the reload loop; owns the root token and the task
//! trackers; runs the graceful shutdown. Also the entry point used by tests (`Balancer::start`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::backend::PortRole;
use crate::config::Config;
use crate::http::{ReloadStatus, StatsContext};
use crate::proxy::client::SessionContext;
use crate::proxy::listener::{self, PortLoad};
use crate::proxy::workers::{PortGroup, Workers};
use crate::reload::{self, Outcome};
use crate::routing::Cluster;

/// Installs the Prometheus recorder once per process; later calls get the same handle.
fn prometheus() -> Option<PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<PrometheusHandle>> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new().set_buckets_for_metric(
                Matcher::Full(crate::metrics::CHECK_DURATION_SECONDS.to_string()),
                &[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ],
            );
            match builder.and_then(|b| b.install_recorder()) {
                Ok(h) => {
                    crate::metrics::describe();
                    Some(h)
                }
                Err(e) => {
                    warn!(error = %e, "metrics recorder not installed");
                    None
                }
            }
        })
        .clone()
}

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
    pub cluster: Arc<Cluster>,
    pub write_addr: SocketAddr,
    pub read_addr: SocketAddr,
    pub stats_addr: SocketAddr,
    shutdown: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

impl Balancer {
    /// Binds every listener (failing fast on a taken port) and starts serving.
    pub async fn start(config: Config) -> anyhow::Result<Balancer> {
        let shutdown = CancellationToken::new();
        let background = TaskTracker::new();
        let sessions = TaskTracker::new();
        let hard_stop = CancellationToken::new();
        let prometheus = prometheus();
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

        let cluster = Cluster::start(config.clone(), shutdown.clone(), background.clone());
        let ctx = SessionContext {
            cluster: cluster.clone(),
            hard_stop: hard_stop.clone(),
        };
        let mut ports = Vec::new();
        for (group, role, addr) in [
            (write, PortRole::Write, config.listen.write),
            (read, PortRole::Read, config.listen.read),
        ] {
            let stop = shutdown.child_token();
            let load = Arc::new(PortLoad::default());
            serve_port(group, role, &ctx, &stop, &sessions, &load);
            ports.push(PortListener { addr, stop, load });
        }

        let reload_status = Arc::new(Mutex::new(ReloadStatus {
            result: "initial".into(),
            ..Default::default()
        }));
        let stats_ctx = Arc::new(StatsContext {
            cluster: cluster.clone(),
            started: Instant::now(),
            prometheus,
            reload: reload_status.clone(),
            shutting_down: shutdown.clone(),
        });
        // The stats listener outlives the session listeners: during the drain it still answers
        // (`/live` with 503), and it stops once the drain is over.
        let stats_stop = CancellationToken::new();
        background.spawn(crate::http::serve(stats, stats_ctx, stats_stop.clone()));

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
        let watcher = match reload::watch(&path, reload_tx) {
            Ok(w) => Some(w),
            Err(e) => {
                warn!(error = %e, path = %path.display(), "cannot watch the config file; SIGHUP still reloads");
                None
            }
        };
        background.spawn(reload_loop(
            path,
            cluster.clone(),
            reload_rx,
            reload_status,
            ports,
            ctx.clone(),
            sessions.clone(),
            shutdown.clone(),
            watcher,
            workers.clone(),
        ));

        let done = tokio::spawn(drain(
            cluster.clone(),
            shutdown.clone(),
            hard_stop,
            sessions,
            background,
            workers,
            stats_stop,
        ));
        info!(
            write = %write_addr,
            read = %read_addr,
            stats = %stats_addr,
            backends = config.backends.len(),
            "pglb started"
        );
        Ok(Balancer {
            cluster,
            write_addr,
            read_addr,
            stats_addr,
            shutdown,
            done,
        })
    }

    /// Starts a graceful shutdown (as SIGTERM does).
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits until the balancer has stopped (after a signal or `shutdown`).
    pub async fn wait(self) {
        let _ = self.done.await;
    }
}

/// After the root token is cancelled: listeners have stopped accepting; give open sessions up to
/// `shutdown_timeout`, then cut the rest.
async fn drain(
    cluster: Arc<Cluster>,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
    sessions: TaskTracker,
    background: TaskTracker,
    workers: Arc<Workers>,
    stats_stop: CancellationToken,
) {
    shutdown.cancelled().await;
    sessions.close();
    background.close();
    let timeout = cluster.config().proxy.shutdown_timeout;
    let open: u64 = cluster.backends().iter().map(|b| b.active_sessions()).sum();
    info!(open_sessions = open, timeout = ?timeout, "draining sessions");
    if tokio::time::timeout(timeout, sessions.wait())
        .await
        .is_err()
    {
        let left: u64 = cluster
            .backends()
            .iter()
            .chain(cluster.draining().iter())
            .map(|b| b.active_sessions())
            .sum();
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

#[allow(clippy::too_many_arguments)]
async fn reload_loop(
    path: PathBuf,
    cluster: Arc<Cluster>,
    mut rx: mpsc::Receiver<()>,
    status: Arc<Mutex<ReloadStatus>>,
    mut ports: Vec<PortListener>,
    ctx: SessionContext,
    sessions: TaskTracker,
    shutdown: CancellationToken,
    _watcher: Option<notify::RecommendedWatcher>,
    workers: Arc<Workers>,
) {
    loop {
        let more = tokio::select! {
            _ = shutdown.cancelled() => return,
            more = reload::next_request(&mut rx) => more,
        };
        if !more {
            return;
        }
        let current = cluster.config();
        let outcome = reload::attempt(&path, &current);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs_f64());
        let mut st = status.lock().unwrap_or_else(|e| e.into_inner());
        st.at_unix = now;
        match outcome {
            Outcome::Unchanged => {
                st.result = "unchanged".into();
                st.error = None;
                crate::metrics::config_reload("unchanged");
                info!(path = %path.display(), "config unchanged");
            }
            Outcome::Rejected(e) => {
                st.result = "rejected".into();
                st.error = Some(e.to_string());
                st.rejected += 1;
                crate::metrics::config_reload("rejected");
                warn!(error = %e, kind = e.kind(), "config reload refused; keeping the running config");
            }
            Outcome::Changed(new) => {
                drop(st);
                let mut new = *new;
                // Rebind listeners whose address changed; a failed bind keeps the old address.
                let mut bind_error = None;
                for (p, role) in ports.iter_mut().zip([PortRole::Write, PortRole::Read]) {
                    let want = match role {
                        PortRole::Write => new.listen.write,
                        PortRole::Read => new.listen.read,
                    };
                    if want == p.addr {
                        continue;
                    }
                    match workers.bind(want) {
                        Ok(group) => {
                            let stop = shutdown.child_token();
                            serve_port(group, role, &ctx, &stop, &sessions, &p.load);
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
                let diff = cluster.apply(new);
                info!(
                    added = ?diff.added,
                    removed = ?diff.removed,
                    changed = ?diff.changed,
                    generation = cluster.generation(),
                    "config reloaded"
                );
                let mut st = status.lock().unwrap_or_else(|e| e.into_inner());
                st.result = "applied".into();
                st.error = bind_error;
                st.applied += 1;
                crate::metrics::config_reload("applied");
            }
        }
    }
}

/// Runs the balancer until SIGTERM/SIGINT and the drain are done.
pub async fn run_balancer(config: Config) -> anyhow::Result<()> {
    let b = Balancer::start(config).await?;
    b.wait().await;
    Ok(())
}
