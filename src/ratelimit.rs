//! Rate limits for log lines, used by both binaries.
//! - `LogEvery`: at most one log line per period for a kind of trouble that comes in bursts
//!   (accept errors, a full listener, checks that cannot run). Shared across threads.
//! - `LastSaid`: one owner's running commentary (the promoter's decisions): something new is said
//!   at once, the same thing again only after a period.

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

/// Remembers the last thing said (a key) and when: a different key is due at once, the same key
/// again after `every`. On the caller's clock (tokio's, so paused-time tests drive it).
#[derive(Debug, Default)]
pub struct LastSaid {
    key: String,
    at: Option<tokio::time::Instant>,
}

impl LastSaid {
    /// True if `key` should be said now (and then counts as said at `now`).
    pub fn should(&mut self, key: &str, now: tokio::time::Instant, every: Duration) -> bool {
        if self.key != key || self.at.is_none_or(|t| now.duration_since(t) >= every) {
            self.key.clear();
            self.key.push_str(key);
            self.at = Some(now);
            true
        } else {
            false
        }
    }

    /// Forgets the last key: whatever comes next is said at once.
    pub fn forget(&mut self) {
        self.key.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_key_at_once_the_same_key_after_its_period() {
        let mut s = LastSaid::default();
        let t0 = tokio::time::Instant::now();
        let every = Duration::from_secs(5);
        assert!(s.should("a", t0, every));
        assert!(!s.should("a", t0 + Duration::from_secs(4), every));
        assert!(s.should("b", t0 + Duration::from_secs(4), every));
        assert!(s.should("a", t0 + Duration::from_secs(4), every));
        assert!(s.should("a", t0 + Duration::from_secs(9), every));
        s.forget();
        assert!(s.should("a", t0 + Duration::from_secs(10), every));
    }

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
