//! `LogEvery`: at most one log line per period for a kind of trouble that comes in bursts
//! (accept errors, a full listener, checks that cannot run). Shared across threads.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Says "due" at most once per `every`.
#[derive(Debug)]
pub struct LogEvery {
    every: Duration,
    last: Mutex<Option<Instant>>,
}

impl LogEvery {
    pub const fn new(every: Duration) -> Self {
        LogEvery {
            every,
            last: Mutex::new(None),
        }
    }

    /// True if the caller should log now (and the next `every` stays quiet).
    pub fn due(&self) -> bool {
        self.due_at(Instant::now())
    }

    /// `due` on a given clock reading, for tests.
    pub fn due_at(&self, now: Instant) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| now.saturating_duration_since(t) <= self.every) {
            return false;
        }
        *last = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_per_period() {
        let l = LogEvery::new(Duration::from_secs(5));
        let t0 = Instant::now();
        assert!(l.due_at(t0));
        assert!(!l.due_at(t0 + Duration::from_secs(1)));
        assert!(!l.due_at(t0 + Duration::from_secs(5)));
        assert!(l.due_at(t0 + Duration::from_millis(5001)));
    }
}
