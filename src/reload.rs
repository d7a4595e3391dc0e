//! Config hot reload: a `notify` watcher on the config file's *directory* (editors and ConfigMaps
//! replace files by rename or symlink swap) and SIGHUP feed one channel; bursts are debounced; the
//! file is read and validated whole; a bad file changes nothing and is reported until a good one
//! arrives. Applying a good config is the caller's job (`app`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::config::{Config, ConfigError};

/// Quiet time after the last file event before reloading.
pub const DEBOUNCE: Duration = Duration::from_millis(300);

/// What a reload attempt found.
pub enum Outcome {
    Changed(Box<Config>),
    Unchanged,
    Rejected(ConfigError),
}

/// Reads and validates `path`, comparing with `current`.
pub fn attempt(path: &Path, current: &Config) -> Outcome {
    match Config::load(path) {
        Ok(c) if c == *current => Outcome::Unchanged,
        Ok(c) => Outcome::Changed(Box::new(c)),
        Err(e) => Outcome::Rejected(e),
    }
}

/// Starts watching the directory of `path`; every relevant event sends `()` on `tx`.
/// The returned watcher must be kept alive.
pub fn watch(path: &Path, tx: mpsc::Sender<()>) -> notify::Result<notify::RecommendedWatcher> {
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
pub async fn next_request(rx: &mut mpsc::Receiver<()>) -> bool {
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
