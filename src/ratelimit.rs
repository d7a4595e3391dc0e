//! `LogEvery`, the one rate limit for log lines in both binaries: a kind of trouble that comes in
//! bursts (accept errors, a full listener, checks that cannot run) is said at most once per period;
//! keyed, a running commentary (the promoter's decisions) says something new at once and the same
//! thing again only after the period. Shared across threads; on tokio's clock, so paused-time
//! tests drive it.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Says "due" at most once per `every` for the same key; a different key is due at once.
#[derive(Debug)]
pub struct LogEvery {
    every: Duration,
    last: Mutex<Option<(String, Instant)>>,
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
        self.due_for("", Instant::now())
    }

    /// `due` on a given clock reading.
    pub fn due_at(&self, now: Instant) -> bool {
        self.due_for("", now)
    }

    /// True if `key` should be said at `now`: it differs from the last key said, or that was
    /// said `every` ago or longer. Then `key` counts as said at `now`.
    pub fn due_for(&self, key: &str, now: Instant) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((k, t)) = last.as_mut() {
            if k == key && now.saturating_duration_since(*t) < self.every {
                return false;
            }
            k.clear();
            k.push_str(key);
            *t = now;
        } else {
            *last = Some((key.to_string(), now));
        }
        true
    }

    /// Forgets what was said: whatever comes next is due at once.
    pub fn forget(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = None;
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
        assert!(!l.due_at(t0 + Duration::from_millis(4999)));
        assert!(l.due_at(t0 + Duration::from_secs(5)));
    }

    #[test]
    fn a_new_key_at_once_the_same_key_after_its_period() {
        let l = LogEvery::new(Duration::from_secs(5));
        let t0 = Instant::now();
        assert!(l.due_for("a", t0));
        assert!(!l.due_for("a", t0 + Duration::from_secs(4)));
        assert!(l.due_for("b", t0 + Duration::from_secs(4)));
        assert!(l.due_for("a", t0 + Duration::from_secs(4)));
        assert!(l.due_for("a", t0 + Duration::from_secs(9)));
        l.forget();
        assert!(l.due_for("a", t0 + Duration::from_secs(10)));
    }
}
