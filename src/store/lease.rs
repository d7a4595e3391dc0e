//! The time logic of a held lease, pure (no I/O): when to send the next renewal, how long to wait
//! for its answer, and until when leadership is valid. Tested on paused tokio time.
//!
//! The rule: a renewal counts from the moment it was *sent*, on our own monotonic clock. etcd
//! extends the lease to (its receipt time + ttl), which is never earlier than (our send time +
//! ttl) as measured by a clock running at the same rate; so while we act only before
//! `sent + ttl - margin`, the lease cannot yet have expired for the others. The margin absorbs
//! clock-rate drift and the time an action already under way needs to finish. Once that instant
//! has passed, the lease is lapsed for good: a late answer does not revive it.

use std::time::Duration;

use tokio::time::Instant;

/// Renewal schedule and validity of one lease.
#[derive(Debug, Clone)]
pub struct LeaseClock {
    ttl: Duration,
    /// Send time of the last renewal that etcd confirmed.
    confirmed_sent: Option<Instant>,
    /// Send time of the last renewal attempt, answered or not.
    last_attempt: Option<Instant>,
    /// Validity end; `None` before the first confirmed renewal.
    valid_until: Option<Instant>,
    lapsed: bool,
}

impl LeaseClock {
    /// A clock for a lease of `ttl` (whole seconds, at least 2 s: `[store] lease_ttl`).
    pub fn new(ttl: Duration) -> Self {
        LeaseClock {
            ttl,
            confirmed_sent: None,
            last_attempt: None,
            valid_until: None,
            lapsed: false,
        }
    }

    /// The lease's time to live.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Time between two renewals: a third of the TTL, so two may fail before the lease lapses.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    /// How long before the lease could expire for the others we stop acting: a fifth of the TTL.
    pub fn margin(&self) -> Duration {
        self.ttl / 5
    }

    /// How long to wait for the answer to one renewal (or one store request) before giving up on
    /// it and trying again: one renewal interval.
    pub fn request_timeout(&self) -> Duration {
        self.renew_every()
    }

    /// The lease was granted or renewed by a request sent at `sent_at`, for `granted` (etcd's
    /// answer; the shorter of it and our TTL counts). Returns false, and changes nothing, when the
    /// answer comes too late: at `now` the lease had already lapsed.
    pub fn confirmed(&mut self, sent_at: Instant, granted: Duration, now: Instant) -> bool {
        if !self.is_valid_at(now) && self.valid_until.is_some() {
            self.lapsed = true;
            return false;
        }
        if self.lapsed {
            return false;
        }
        let until = sent_at + granted.min(self.ttl).saturating_sub(self.margin());
        if until <= now {
            // Took so long that it buys nothing: do not start (or extend) on it.
            if self.valid_until.is_some() {
                self.lapsed = true;
            }
            return false;
        }
        self.valid_until = Some(self.valid_until.map_or(until, |u| u.max(until)));
        self.confirmed_sent = Some(self.confirmed_sent.map_or(sent_at, |s| s.max(sent_at)));
        true
    }

    /// A renewal is being sent now.
    pub fn attempt(&mut self, sent_at: Instant) {
        self.last_attempt = Some(sent_at);
    }

    /// When to send the next renewal: one interval after the last attempt (or the last confirmed
    /// one, before any attempt).
    pub fn next_renewal(&self) -> Option<Instant> {
        let base = match (self.last_attempt, self.confirmed_sent) {
            (Some(a), Some(c)) => a.max(c),
            (a, c) => a.or(c)?,
        };
        Some(base + self.renew_every())
    }

    /// Until when the holder may act; `None` before the lease was ever confirmed.
    pub fn valid_until(&self) -> Option<Instant> {
        self.valid_until
    }

    /// Whether the holder may still act at `now`. False forever once it has lapsed.
    pub fn is_valid_at(&self, now: Instant) -> bool {
        !self.lapsed && self.valid_until.is_some_and(|u| now < u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(3);

    #[tokio::test(start_paused = true)]
    async fn schedule_follows_the_ttl() {
        let c = LeaseClock::new(TTL);
        assert_eq!(c.renew_every(), Duration::from_secs(1));
        assert_eq!(c.margin(), Duration::from_millis(600));
        assert_eq!(c.request_timeout(), Duration::from_secs(1));
        assert_eq!(c.next_renewal(), None);
        assert!(!c.is_valid_at(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn validity_counts_from_the_send_time_not_the_answer() {
        let mut c = LeaseClock::new(TTL);
        let sent = Instant::now();
        tokio::time::advance(Duration::from_millis(900)).await;
        assert!(c.confirmed(sent, TTL, Instant::now()));
        // sent + 3 s - 0.6 s, although the answer came 0.9 s after the send.
        assert_eq!(c.valid_until(), Some(sent + Duration::from_millis(2400)));
        assert_eq!(c.next_renewal(), Some(sent + Duration::from_secs(1)));
        tokio::time::advance(Duration::from_millis(1499)).await;
        assert!(c.is_valid_at(Instant::now()));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!c.is_valid_at(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn renewals_extend_and_failed_attempts_do_not() {
        let mut c = LeaseClock::new(TTL);
        let t0 = Instant::now();
        assert!(c.confirmed(t0, TTL, t0));
        tokio::time::advance(Duration::from_secs(1)).await;
        let t1 = Instant::now();
        assert_eq!(c.next_renewal(), Some(t1));
        c.attempt(t1);
        // Unanswered: the next one goes out one interval after this attempt.
        assert_eq!(c.next_renewal(), Some(t1 + Duration::from_secs(1)));
        assert_eq!(c.valid_until(), Some(t0 + Duration::from_millis(2400)));
        tokio::time::advance(Duration::from_secs(1)).await;
        let t2 = Instant::now();
        c.attempt(t2);
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(c.confirmed(t2, TTL, Instant::now()));
        assert_eq!(c.valid_until(), Some(t2 + Duration::from_millis(2400)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lapsed_lease_stays_lapsed_whatever_answers_later() {
        let mut c = LeaseClock::new(TTL);
        let t0 = Instant::now();
        assert!(c.confirmed(t0, TTL, t0));
        // Paused (or partitioned) for longer than the validity window.
        tokio::time::advance(Duration::from_secs(5)).await;
        let now = Instant::now();
        assert!(!c.is_valid_at(now));
        // An answer to a renewal sent just now arrives: too late, the others may lead already.
        assert!(!c.confirmed(now, TTL, now));
        assert!(!c.is_valid_at(now));
        tokio::time::advance(Duration::from_millis(10)).await;
        assert!(!c.is_valid_at(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_grant_counts_and_a_useless_first_answer_starts_nothing() {
        let mut c = LeaseClock::new(TTL);
        let t0 = Instant::now();
        // etcd granted less than asked: the shorter TTL counts.
        assert!(c.confirmed(t0, Duration::from_secs(2), t0));
        assert_eq!(c.valid_until(), Some(t0 + Duration::from_millis(1400)));

        let mut late = LeaseClock::new(TTL);
        let sent = Instant::now();
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(!late.confirmed(sent, TTL, Instant::now()));
        assert_eq!(late.valid_until(), None);
    }
}
