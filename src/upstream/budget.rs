//! The retry budget of an origin: retries may add at most 20% to its attempts over a sliding
//! window of 10 s (plus a floor of 5, so a quiet origin still retries), like Envoy's retry
//! budget: when a whole fleet is sick, retries must not multiply the load on it.
//!
//! Ten one-second buckets of atomic counters; a bucket is reset when its second comes round
//! again. (pingora-limits estimates rates per key with a sketch, more than one origin's two
//! counters need.)

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

const SLOTS: usize = 10;
/// Retries allowed per window whatever the traffic.
const FLOOR: u64 = 5;
/// Retries allowed per 100 first attempts.
const PERCENT: u64 = 20;

#[derive(Default)]
struct Slot {
    second: AtomicU64,
    attempts: AtomicU64,
    retries: AtomicU64,
}

#[derive(Default)]
pub struct Budget {
    slots: [Slot; SLOTS],
}

impl Budget {
    fn slot(&self, second: u64) -> &Slot {
        let s = &self.slots[(second % SLOTS as u64) as usize];
        let seen = s.second.load(Relaxed);
        if seen != second
            && s.second
                .compare_exchange(seen, second, Relaxed, Relaxed)
                .is_ok()
        {
            s.attempts.store(0, Relaxed);
            s.retries.store(0, Relaxed);
        }
        s
    }

    fn totals(&self, second: u64) -> (u64, u64) {
        self.slots
            .iter()
            .filter(|s| second.saturating_sub(s.second.load(Relaxed)) < SLOTS as u64)
            .fold((0, 0), |(a, r), s| {
                (a + s.attempts.load(Relaxed), r + s.retries.load(Relaxed))
            })
    }

    /// A request's first attempt on the origin.
    pub fn attempt(&self, second: u64) {
        self.slot(second).attempts.fetch_add(1, Relaxed);
    }

    /// May one more retry be made? Counts it when it may.
    pub fn try_retry(&self, second: u64) -> bool {
        let (attempts, retries) = self.totals(second);
        if retries >= FLOOR.max(attempts * PERCENT / 100) {
            return false;
        }
        self.slot(second).retries.fetch_add(1, Relaxed);
        true
    }
}

/// Seconds on the process's monotonic clock.
pub fn second() -> u64 {
    super::state::now_ms() / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_capped_at_a_fifth_of_the_attempts() {
        let b = Budget::default();
        for _ in 0..100 {
            b.attempt(1000);
        }
        let allowed = (0..100).filter(|_| b.try_retry(1000)).count();
        assert_eq!(allowed, 20);
        // The window slides: ten seconds later the old attempts no longer count.
        assert_eq!(
            (0..100).filter(|_| b.try_retry(1010)).count(),
            5,
            "the floor"
        );
    }

    #[test]
    fn a_quiet_origin_still_retries() {
        let b = Budget::default();
        b.attempt(7);
        assert_eq!((0..10).filter(|_| b.try_retry(7)).count(), 5);
    }
}
