//! Process signals: SIGTERM/SIGINT cancel the root token (graceful shutdown), SIGHUP asks for a
//! config reload. Runs until cancelled; an error here (cannot install a handler) is fatal.

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub async fn run(shutdown: CancellationToken, reload: mpsc::Sender<()>) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("install SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = term.recv() => { info!(signal = "SIGTERM", "shutting down"); shutdown.cancel(); }
            _ = int.recv() => { info!(signal = "SIGINT", "shutting down"); shutdown.cancel(); }
            _ = hup.recv() => {
                info!(signal = "SIGHUP", "reload requested");
                let _ = reload.try_send(());
            }
        }
    }
}
