//! Config hot reload, one loop for both binaries: a `notify` watcher on the config file's
//! *directory* (editors and ConfigMaps replace files by rename or symlink swap) and SIGHUP feed one
//! channel (`Requests`); bursts are debounced; the file is read and validated whole; a bad file
//! changes nothing and is reported until a good one arrives. `run` is that loop; what a good config
//! changes is the binary's business, behind `Target` (pglb: rebind listeners and hand it to the
//! control task; the promoter: new `Settings`). Both report the same `ReloadStatus`.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use notify::{RecursiveMode, Watcher};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{Config, Secrets};

/// Quiet time after the last file event before reloading.
pub const DEBOUNCE: Duration = Duration::from_millis(300);

/// The last reload attempt and the counts so far: in pglb's View (`/stats.json` `reload`) and the
/// promoter's `/status` `reload`, the same shape.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReloadStatus {
    pub result: ReloadResult,
    /// Unix time of the last reload attempt.
    pub at_unix: Option<f64>,
    /// Why the last reload was refused (file, line, key and reason), or what of an applied one
    /// could not take effect (a listener that could not be rebound); null otherwise.
    pub error: Option<String>,
    pub applied: u64,
    pub rejected: u64,
}

/// The outcome of the last reload attempt ("initial" before any).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ReloadResult {
    Initial,
    Applied,
    Rejected,
    Unchanged,
}

impl ReloadResult {
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadResult::Initial => "initial",
            ReloadResult::Applied => "applied",
            ReloadResult::Rejected => "rejected",
            ReloadResult::Unchanged => "unchanged",
        }
    }
}

impl Default for ReloadStatus {
    fn default() -> Self {
        ReloadStatus {
            result: ReloadResult::Initial,
            at_unix: None,
            error: None,
            applied: 0,
            rejected: 0,
        }
    }
}

/// What applying a validated, changed config came to.
pub enum Applied {
    /// It runs now. `config` is the config in effect (what the next reload compares the file
    /// with: a setting that needs a restart keeps its old value there); `note` says what of it
    /// could not take effect.
    Running {
        config: Box<Config>,
        note: Option<String>,
    },
    /// The binary refused it (valid TOML and keys, but not acceptable to it): nothing changed.
    Refused(String),
    /// The binary is shutting down: the loop ends.
    Stopped,
}

/// What a binary does with a new config: the one part of reloading that differs between pglb and
/// the promoter.
pub trait Target: Send {
    /// Applies `new`, read and validated from the file and different from the config in effect.
    fn apply(&mut self, new: Config) -> impl Future<Output = Applied> + Send;
    /// Publishes the status after every attempt (stats page, `/status`, metrics).
    fn report(&mut self, status: &ReloadStatus);
}

/// Where reload requests come from: the watcher on the config file's directory, and SIGHUP
/// through the sender `signals::run` is given.
pub struct Requests {
    rx: mpsc::Receiver<()>,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl Requests {
    /// Starts watching `path`'s directory. The sender is for SIGHUP. A directory that cannot be
    /// watched is logged: SIGHUP still reloads.
    pub fn watch(path: &Path) -> (Requests, mpsc::Sender<()>) {
        let (tx, rx) = mpsc::channel(16);
        let watcher = match watch(path, tx.clone()) {
            Ok(w) => Some(w),
            Err(e) => {
                warn!(error = %e, path = %path.display(), "cannot watch the config file; SIGHUP still reloads");
                None
            }
        };
        (
            Requests {
                rx,
                _watcher: watcher,
            },
            tx,
        )
    }
}

/// The reload loop: on each (debounced) request, reads `path` with `secrets`, compares it with
/// the config in effect, hands a changed one to `target`, and reports. Ends on `shutdown`.
pub async fn run(
    path: PathBuf,
    secrets: Secrets,
    mut current: Config,
    mut requests: Requests,
    shutdown: CancellationToken,
    mut target: impl Target,
) {
    let mut status = ReloadStatus::default();
    loop {
        let more = tokio::select! {
            _ = shutdown.cancelled() => return,
            more = next_request(&mut requests.rx) => more,
        };
        if !more {
            return;
        }
        status.at_unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs_f64());
        let refused = |status: &mut ReloadStatus, error: String| {
            status.result = ReloadResult::Rejected;
            status.error = Some(error);
            status.rejected += 1;
        };
        match Config::load_with(&path, secrets) {
            Ok(c) if c == current => {
                status.result = ReloadResult::Unchanged;
                status.error = None;
                info!(path = %path.display(), "config unchanged");
            }
            Err(e) => {
                warn!(error = %e, kind = e.kind(), "config reload refused; keeping the running config");
                refused(&mut status, e.to_string());
            }
            Ok(c) => match target.apply(c).await {
                Applied::Running { config, note } => {
                    current = *config;
                    status.result = ReloadResult::Applied;
                    status.error = note;
                    status.applied += 1;
                }
                Applied::Refused(reason) => {
                    warn!(error = %reason, "config reload refused; keeping the running config");
                    refused(&mut status, reason);
                }
                Applied::Stopped => return,
            },
        }
        target.report(&status);
    }
}

/// Watches the directory of `path`; every relevant event sends `()` on `tx`.
/// The returned watcher must be kept alive.
fn watch(path: &Path, tx: mpsc::Sender<()>) -> notify::Result<notify::RecommendedWatcher> {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let dir: PathBuf = abs
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let file_name = abs.file_name().map(|f| f.to_os_string());
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        match res {
            Ok(ev) => {
                // Our file itself, or anything that could be a symlink swap (`..data` in a
                // Kubernetes ConfigMap volume). Access events (reads) never matter.
                if matches!(ev.kind, notify::EventKind::Access(_)) {
                    return;
                }
                let ours = ev.paths.iter().any(|p| {
                    p.file_name().map(|f| f.to_os_string()) == file_name
                        || p.file_name()
                            .is_some_and(|f| f.to_string_lossy().starts_with(".."))
                });
                if ours {
                    let _ = tx.try_send(());
                }
            }
            Err(e) => warn!(error = %e, "config watcher error"),
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    debug!(dir = %dir.display(), "watching config directory");
    Ok(watcher)
}

/// Waits for a reload request, then for `DEBOUNCE` of quiet. Returns false when the channel is
/// closed.
async fn next_request(rx: &mut mpsc::Receiver<()>) -> bool {
    if rx.recv().await.is_none() {
        return false;
    }
    loop {
        match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
            Ok(Some(())) => continue,
            Ok(None) => return false,
            Err(_) => return true,
        }
    }
}
