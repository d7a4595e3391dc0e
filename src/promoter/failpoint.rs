//! Fault injection for the crash-safety tests, off unless its environment variables are set:
//! `PGLB_PROMOTER_CRASH_AFTER=STEP` aborts the process right after that failover step
//! (`receivers_stopped`, `recorded`: the guarded record committed, `pg_promote` not sent;
//! `promoted`, `repointed`), as a kill -9 would; and
//! `PGLB_PROMOTER_PAUSE_BEFORE=STEP` stops the process (SIGSTOP, once) right before it
//! (`record_primary`), as a paused VM would, until something sends it SIGCONT.

use tracing::error;

fn matches(var: &str, step: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == step)
}

/// Aborts the process when `PGLB_PROMOTER_CRASH_AFTER` names `step`.
pub fn crash_after(step: &str) {
    if matches("PGLB_PROMOTER_CRASH_AFTER", step) {
        error!(step, "PGLB_PROMOTER_CRASH_AFTER: aborting the process now");
        std::process::abort();
    }
}

/// Stops this process (once) when `PGLB_PROMOTER_PAUSE_BEFORE` names `step`.
pub fn pause_before(step: &str) {
    static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if matches("PGLB_PROMOTER_PAUSE_BEFORE", step)
        && !DONE.swap(true, std::sync::atomic::Ordering::AcqRel)
    {
        error!(step, "PGLB_PROMOTER_PAUSE_BEFORE: stopping the process now");
        // By our own PID: the process freezes until SIGCONT.
        let _ = std::process::Command::new("kill")
            .args(["-STOP", &std::process::id().to_string()])
            .status();
    }
}
