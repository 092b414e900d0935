//! One peer's health as every request and the monitor see it: lock-free counters, read on
//! every selection.
//!
//! A peer is *usable* when the active monitor has it up, no operator has drained it, and
//! passive detection has not ejected it. Peers start up (served at once, as nginx and
//! Pingora do; `/readyz` waits for the first round of checks instead).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use crate::config::Passive;

/// Milliseconds on a monotonic clock shared by the process (0 = the first call).
pub fn now_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The outcome of the last active check.
#[derive(Debug, Clone, Default)]
pub struct CheckResult {
    pub ok: bool,
    /// `200`, `connect: refused`, `timeout`, `body without "OK"`, ...
    pub detail: String,
    pub latency: Duration,
    /// Unix milliseconds.
    pub at: u64,
}

/// What passive detection decided about a failure.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Counted,
    /// Ejected for this long.
    Ejected(Duration),
}

#[derive(Debug)]
pub struct PeerState {
    /// The active monitor's view (true without a monitor).
    up: AtomicBool,
    /// Drained by an operator: no new requests.
    draining: AtomicBool,
    /// Passive: consecutive failures, ejections in a row, ejected until (`now_ms`).
    failures: AtomicU32,
    ejections: AtomicU32,
    ejected_until: AtomicU64,
    /// Consecutive active results towards `rise` / `fall`.
    streak: AtomicU32,
    in_flight: AtomicU32,
    pub requests: AtomicU64,
    pub failed: AtomicU64,
    pub ejected_total: AtomicU64,
    /// Unix ms of the last state change.
    since: AtomicU64,
    last_check: Mutex<Option<CheckResult>>,
}

impl Default for PeerState {
    fn default() -> Self {
        PeerState {
            up: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            streak: AtomicU32::new(0),
            in_flight: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            ejected_total: AtomicU64::new(0),
            since: AtomicU64::new(unix_ms()),
            last_check: Mutex::new(None),
        }
    }
}

/// A peer's state as the admin API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Up,
    Down,
    Ejected,
    Draining,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Up => "up",
            Status::Down => "down",
            Status::Ejected => "ejected",
            Status::Draining => "draining",
        }
    }
}

impl PeerState {
    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Relaxed)
    }

    pub fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Relaxed) > now
    }

    /// Up, not drained, not ejected.
    pub fn usable(&self, now: u64) -> bool {
        self.is_up() && !self.is_draining() && !self.is_ejected(now)
    }

    pub fn status(&self, now: u64) -> Status {
        if self.is_draining() {
            Status::Draining
        } else if !self.is_up() {
            Status::Down
        } else if self.is_ejected(now) {
            Status::Ejected
        } else {
            Status::Up
        }
    }

    /// When passive ejection ends (`now_ms` clock), if ejected.
    pub fn ejected_until(&self, now: u64) -> Option<u64> {
        let u = self.ejected_until.load(Relaxed);
        (u > now).then_some(u)
    }

    pub fn since_unix_ms(&self) -> u64 {
        self.since.load(Relaxed)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Relaxed)
    }

    pub fn last_check(&self) -> Option<CheckResult> {
        self.last_check.lock().clone()
    }

    /// An attempt starts on this peer; it is in flight until [`PeerState::leave`].
    pub fn enter(&self) {
        self.in_flight.fetch_add(1, Relaxed);
        self.requests.fetch_add(1, Relaxed);
    }

    /// The attempt that [`PeerState::enter`]ed ended.
    pub fn leave(&self) {
        self.in_flight.fetch_sub(1, Relaxed);
    }

    /// Sets draining; `true` when it changed.
    pub fn set_draining(&self, on: bool) -> bool {
        let changed = self.draining.swap(on, Relaxed) != on;
        if changed {
            self.since.store(unix_ms(), Relaxed);
        }
        changed
    }

    /// An answer came: passive failures reset.
    pub fn success(&self) {
        if self.failures.load(Relaxed) != 0 {
            self.failures.store(0, Relaxed);
        }
        if self.ejections.load(Relaxed) != 0 {
            self.ejections.store(0, Relaxed);
        }
    }

    /// A failed attempt (connect error, timeout, a `retry_on` status). Ejects after
    /// `passive.failures` in a row, for `cooldown` doubled per ejection in a row (capped),
    /// unless `may_eject` says this is the last usable peer (never ejected by passive
    /// detection alone).
    pub fn failure(
        &self,
        passive: &Passive,
        now: u64,
        may_eject: impl FnOnce() -> bool,
    ) -> Verdict {
        self.failed.fetch_add(1, Relaxed);
        if passive.failures == 0 {
            return Verdict::Counted;
        }
        let n = self.failures.fetch_add(1, Relaxed) + 1;
        if n < passive.failures || self.is_ejected(now) || !may_eject() {
            return Verdict::Counted;
        }
        let k = self.ejections.fetch_add(1, Relaxed).min(20);
        let cooldown = passive
            .cooldown
            .saturating_mul(1u32 << k)
            .min(passive.max_cooldown);
        self.ejected_until
            .store(now + cooldown.as_millis() as u64, Relaxed);
        self.failures.store(0, Relaxed);
        self.ejected_total.fetch_add(1, Relaxed);
        self.since.store(unix_ms(), Relaxed);
        Verdict::Ejected(cooldown)
    }

    /// An active check's result; `Some(up)` when the peer changed state (`rise`/`fall` in a
    /// row).
    pub fn checked(&self, r: CheckResult, rise: u32, fall: u32) -> Option<bool> {
        let ok = r.ok;
        *self.last_check.lock() = Some(r);
        let up = self.is_up();
        if ok == up {
            self.streak.store(0, Relaxed);
            return None;
        }
        let n = self.streak.fetch_add(1, Relaxed) + 1;
        if n < if ok { rise } else { fall } {
            return None;
        }
        self.streak.store(0, Relaxed);
        self.up.store(ok, Relaxed);
        self.since.store(unix_ms(), Relaxed);
        if ok {
            // Back from down: a clean slate for passive detection too.
            self.failures.store(0, Relaxed);
            self.ejected_until.store(0, Relaxed);
        }
        Some(ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passive() -> Passive {
        Passive {
            failures: 3,
            cooldown: Duration::from_secs(30),
            max_cooldown: Duration::from_secs(100),
        }
    }

    #[test]
    fn consecutive_failures_eject_with_a_growing_cooldown() {
        let s = PeerState::default();
        let p = passive();
        let t = 1000;
        assert_eq!(s.failure(&p, t, || true), Verdict::Counted);
        s.success();
        assert_eq!(s.failure(&p, t, || true), Verdict::Counted);
        assert_eq!(s.failure(&p, t, || true), Verdict::Counted);
        assert_eq!(
            s.failure(&p, t, || true),
            Verdict::Ejected(Duration::from_secs(30))
        );
        assert!(s.is_ejected(t + 29_999) && !s.is_ejected(t + 30_000));
        assert_eq!(s.status(t), Status::Ejected);
        let t2 = t + 31_000;
        for _ in 0..2 {
            s.failure(&p, t2, || true);
        }
        assert_eq!(
            s.failure(&p, t2, || true),
            Verdict::Ejected(Duration::from_secs(60)),
            "doubles"
        );
        let t3 = t2 + 61_000;
        for _ in 0..2 {
            s.failure(&p, t3, || true);
        }
        assert_eq!(
            s.failure(&p, t3, || true),
            Verdict::Ejected(Duration::from_secs(100)),
            "capped"
        );
        // A success resets the doubling.
        s.success();
        let t4 = t3 + 101_000;
        for _ in 0..2 {
            s.failure(&p, t4, || true);
        }
        assert_eq!(
            s.failure(&p, t4, || true),
            Verdict::Ejected(Duration::from_secs(30))
        );
    }

    #[test]
    fn the_last_usable_peer_is_never_ejected() {
        let s = PeerState::default();
        for _ in 0..10 {
            assert_eq!(s.failure(&passive(), 5, || false), Verdict::Counted);
        }
        assert!(s.usable(5));
        assert_eq!(s.failed.load(Relaxed), 10);
    }

    #[test]
    fn rise_and_fall() {
        let s = PeerState::default();
        let r = |ok| CheckResult {
            ok,
            ..Default::default()
        };
        assert_eq!(s.checked(r(false), 2, 3), None);
        assert_eq!(s.checked(r(false), 2, 3), None);
        assert_eq!(s.checked(r(false), 2, 3), Some(false));
        assert!(!s.usable(1));
        assert_eq!(s.checked(r(true), 2, 3), None);
        assert_eq!(
            s.checked(r(false), 2, 3),
            None,
            "a failure breaks the streak"
        );
        assert_eq!(s.checked(r(true), 2, 3), None);
        assert_eq!(s.checked(r(true), 2, 3), Some(true));
        assert!(s.usable(1));
        assert!(s.last_check().unwrap().ok);
    }

    #[test]
    fn draining_and_in_flight() {
        let s = PeerState::default();
        assert!(s.set_draining(true));
        assert!(!s.set_draining(true));
        assert_eq!(s.status(1), Status::Draining);
        assert!(!s.usable(1));
        s.enter();
        assert_eq!(s.in_flight(), 1);
        s.leave();
        assert_eq!(s.in_flight(), 0);
    }
}
