//! When to seal a batch: after the root has been quiet for `idle`, or when
//! the oldest pending change is `max_delay` old, whichever comes first.

use std::time::{Duration, Instant};

/// Default quiet time before a batch is sealed: short, so a single write
/// ships at once, yet long enough to group the burst of events one save makes.
pub const DEFAULT_IDLE: Duration = Duration::from_millis(5);
/// Default upper bound on how long a change may wait while writes continue:
/// bounds lag under a steady stream of writes.
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_millis(50);

/// Sealing deadline tracker. Feed it [`BatchTimer::on_change`]; ask
/// [`BatchTimer::deadline`] when to wake and [`BatchTimer::due`] whether to seal.
#[derive(Debug, Clone)]
pub struct BatchTimer {
    idle: Duration,
    max_delay: Duration,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl BatchTimer {
    pub fn new(idle: Duration, max_delay: Duration) -> Self {
        BatchTimer {
            idle,
            max_delay: max_delay.max(idle),
            first: None,
            last: None,
        }
    }

    /// A change arrived at `now`.
    pub fn on_change(&mut self, now: Instant) {
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    /// When the pending batch should be sealed, if anything is pending.
    pub fn deadline(&self) -> Option<Instant> {
        match (self.first, self.last) {
            (Some(f), Some(l)) => Some((l + self.idle).min(f + self.max_delay)),
            _ => None,
        }
    }

    /// True when a batch is pending and its deadline has passed.
    pub fn due(&self, now: Instant) -> bool {
        self.deadline().is_some_and(|d| now >= d)
    }

    /// The batch was sealed.
    pub fn reset(&mut self) {
        self.first = None;
        self.last = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_then_max_delay() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut t = BatchTimer::new(ms(5), ms(50));
        assert_eq!(t.deadline(), None);
        assert!(!t.due(t0));
        t.on_change(t0);
        assert_eq!(t.deadline(), Some(t0 + ms(5)));
        assert!(!t.due(t0 + ms(4)));
        assert!(t.due(t0 + ms(5)));
        // a steady stream of changes every 2 ms: idle never elapses, max delay caps it
        for i in 1..40 {
            t.on_change(t0 + ms(2 * i));
        }
        assert_eq!(t.deadline(), Some(t0 + ms(50)));
        assert!(t.due(t0 + ms(50)));
        t.reset();
        assert_eq!(t.deadline(), None);
    }
}
