//! `HealthState`: the pure rise/fall state machine of one backend. No I/O, no clocks.
//!
//! Starting state (a written-down decision): a backend starts *down and unchecked*. Its very
//! first successful check brings it up at once, so a freshly started pglb serves after one
//! check instead of `rise` checks; after that, `rise` consecutive successes are needed to go up
//! and `fall` consecutive failures to go down.

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthState {
    up: bool,
    checked: bool,
    successes: u32,
    failures: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Up,
    Down,
}

impl HealthState {
    pub fn is_up(&self) -> bool {
        self.up
    }

    pub fn is_checked(&self) -> bool {
        self.checked
    }

    /// Consecutive successes (when the last result was a success) or failures.
    pub fn streak(&self) -> u32 {
        self.successes.max(self.failures)
    }

    /// Records one check result; returns the transition it caused, if any. The first result
    /// ever recorded always returns a transition, so the initial state gets logged.
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> Option<Transition> {
        let first = !self.checked;
        self.checked = true;
        if ok {
            self.successes = self.successes.saturating_add(1);
            self.failures = 0;
            if !self.up && (first || self.successes >= rise) {
                self.up = true;
                return Some(Transition::Up);
            }
        } else {
            self.failures = self.failures.saturating_add(1);
            self.successes = 0;
            if first {
                return Some(Transition::Down);
            }
            if self.up && self.failures >= fall {
                self.up = false;
                return Some(Transition::Down);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_success_is_up_at_once() {
        let mut h = HealthState::default();
        assert!(!h.is_up());
        assert_eq!(h.record(true, 3, 3), Some(Transition::Up));
        assert!(h.is_up());
    }

    #[test]
    fn first_failure_reports_down_once() {
        let mut h = HealthState::default();
        assert_eq!(h.record(false, 2, 2), Some(Transition::Down));
        assert_eq!(h.record(false, 2, 2), None);
        assert!(!h.is_up());
    }

    #[test]
    fn fall_needs_consecutive_failures() {
        let mut h = HealthState::default();
        h.record(true, 2, 3);
        assert_eq!(h.record(false, 2, 3), None);
        assert_eq!(h.record(false, 2, 3), None);
        assert_eq!(
            h.record(true, 2, 3),
            None,
            "a success resets the failure streak"
        );
        assert_eq!(h.record(false, 2, 3), None);
        assert_eq!(h.record(false, 2, 3), None);
        assert_eq!(h.record(false, 2, 3), Some(Transition::Down));
        assert!(!h.is_up());
    }

    #[test]
    fn rise_needs_consecutive_successes_after_a_fall() {
        let mut h = HealthState::default();
        h.record(true, 2, 1);
        assert_eq!(h.record(false, 2, 1), Some(Transition::Down));
        assert_eq!(h.record(true, 2, 1), None);
        assert_eq!(h.record(false, 2, 1), None);
        assert_eq!(h.record(true, 2, 1), None);
        assert_eq!(h.record(true, 2, 1), Some(Transition::Up));
        assert_eq!(h.streak(), 2);
    }

    #[test]
    fn rise_and_fall_of_one_flip_every_time() {
        let mut h = HealthState::default();
        assert_eq!(h.record(true, 1, 1), Some(Transition::Up));
        assert_eq!(h.record(false, 1, 1), Some(Transition::Down));
        assert_eq!(h.record(true, 1, 1), Some(Transition::Up));
    }
}
