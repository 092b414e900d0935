//! One request's walk over its plan's origins and their peers: which peer the next attempt
//! goes to, and what a failed attempt leads to (another peer of the same origin, the next
//! origin of the plan, or the end). The proxy phases only report what happened; the
//! decisions are here, testable without a server.
//!
//! ```text
//!  next()  ─► plan.origin(step) ─► Origin::pick (skips peers tried by this request)
//!             none left: failover to step + 1 (reads, `failover: true`), else NoPeer (503)
//!  failed(f) ─► Origin::report (passive health) ─► retry here?  f in retry_on, retries left,
//!                                                  an untried peer, the retry budget allows
//!                                             └─► failover?    a read, `failover`, a next origin
//!  replay()  ─► the 404 (fallback_on) replay: step + 1, not a retry, not a failure
//! ```
//!
//! A write is retried on another peer only after a connect failure (no body byte sent) when
//! no earlier attempt of it had a connection (a reused one that broke may have taken the
//! body), and never reaches a fallback (`fallback::Plan` has one step for writes).

use crate::config::GroupConfig;
use crate::fallback::{Plan, Role};
use crate::metrics::METRICS;
use crate::origin::{Origin, Outcome};
use crate::upstream;

/// Why an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection (refused, unreachable, connect timeout, TLS).
    Connect,
    /// Connected, but no response header in time (or the total timeout).
    Timeout,
    /// A `retry_on` status (checked by the caller).
    Status,
    /// The connection broke before a response header (reset, protocol error).
    Error,
}

impl Failure {
    fn outcome(self) -> Outcome {
        match self {
            Failure::Connect => Outcome::Connect,
            Failure::Timeout => Outcome::Timeout,
            Failure::Status => Outcome::Status,
            Failure::Error => Outcome::Error,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Failure::Connect | Failure::Error => "connect",
            Failure::Timeout => "timeout",
            Failure::Status => "status",
        }
    }
}

/// Nothing in the plan can answer now: 503, try again after this many seconds.
#[derive(Debug, PartialEq, Eq)]
pub struct NoPeer {
    pub retry_after: u64,
}

/// The attempt in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Current {
    pub origin: usize,
    pub peer: usize,
    pub role: Role,
}

/// A request's attempts.
#[derive(Debug, Default)]
pub struct Attempts {
    /// The plan step (0 = main, then the fallbacks).
    pub step: usize,
    /// The attempt in flight, if any (its peer counts it as in flight).
    pub current: Option<Current>,
    /// Peers of the current step's origin this request has tried (bit i = peer i).
    tried: u64,
    /// Retries made on the current step's origin.
    retries: u32,
    /// The current step's origin has had its first attempt (for the retry budget).
    counted: bool,
    /// Steps moved on because main could not answer.
    pub failovers: u8,
    /// An attempt failed on a connection that was open (a reused one, see
    /// [`Attempts::stale_connection`]): a write's body may have been sent.
    sent: bool,
}

/// What the request allows: reads may fail over and retry on any `retry_on` failure; writes
/// retry only on connect failures and never fail over.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    pub plan: Plan<'a>,
    pub group: &'a GroupConfig,
    pub read: bool,
}

impl Attempts {
    /// Ends the attempt in flight (its peer is no longer busy with it).
    pub fn end(&mut self, origins: &[Origin]) {
        if let Some(c) = self.current.take() {
            origins[c.origin].peers[c.peer].leave();
        }
    }

    fn move_on(&mut self) {
        self.step += 1;
        self.tried = 0;
        self.retries = 0;
        self.counted = false;
    }

    /// The peer for the next attempt. When the current step's origin has no peer to offer,
    /// a read fails over to the next step (`failover`); when none can answer: [`NoPeer`].
    pub fn next(&mut self, origins: &[Origin], rules: Rules, key: &str) -> Result<Current, NoPeer> {
        self.end(origins);
        loop {
            let Some((origin_ix, role)) = rules.plan.origin(self.step) else {
                return Err(NoPeer { retry_after: 1 });
            };
            let origin = &origins[origin_ix];
            match origin.pick(key, self.tried) {
                Some(peer) => {
                    if !self.counted {
                        origin.budget.attempt(upstream::budget::second());
                        self.counted = true;
                    }
                    if peer < 64 {
                        self.tried |= 1 << peer;
                    }
                    origin.peers[peer].enter();
                    let c = Current {
                        origin: origin_ix,
                        peer,
                        role,
                    };
                    self.current = Some(c);
                    return Ok(c);
                }
                None if self.may_fail_over(rules) => {
                    self.failover(rules);
                }
                None => {
                    return Err(NoPeer {
                        retry_after: origin.retry_after(),
                    })
                }
            }
        }
    }

    fn may_fail_over(&self, rules: Rules) -> bool {
        rules.read && rules.group.failover && rules.plan.origin(self.step + 1).is_some()
    }

    fn failover(&mut self, rules: Rules) {
        self.move_on();
        self.failovers += 1;
        METRICS
            .failovers
            .with_label_values(&[rules.group.name.as_str()])
            .inc();
    }

    /// The attempt in flight failed with `f`. `true`: try again (another peer of the same
    /// origin, or the next step), `false`: this failure is the answer.
    pub fn failed(&mut self, f: Failure, origins: &[Origin], rules: Rules) -> bool {
        let Some(c) = self.current else { return false };
        let origin = &origins[c.origin];
        origin.report(c.peer, f.outcome());
        let retryable = match f {
            Failure::Connect | Failure::Error => origin.retry_on.connect,
            Failure::Timeout => origin.retry_on.timeout,
            Failure::Status => true,
        };
        // A write's body may have been sent unless the connection never opened, this attempt's
        // or an earlier one's (a stale connection retried on the same peer).
        let allowed = rules.read || (f == Failure::Connect && !self.sent);
        if retryable
            && allowed
            && self.retries < origin.retries
            && origin.can_pick(self.tried)
            && origin.budget.try_retry(upstream::budget::second())
        {
            self.retries += 1;
            METRICS
                .retries
                .with_label_values(&[origin.name.as_str(), f.reason()])
                .inc();
            return true;
        }
        if self.may_fail_over(rules) {
            self.failover(rules);
            return true;
        }
        false
    }

    /// A pooled connection turned out dead before any answer: the same peer again (it is
    /// not the peer's failure; Pingora's own rule for reused connections).
    pub fn stale_connection(&mut self, origins: &[Origin]) {
        self.sent = true;
        if let Some(c) = self.current {
            // Counted (outcome `error`), but not held against the peer.
            origins[c.origin].peers[c.peer].metrics.outcomes[Outcome::Error as usize].inc();
            if c.peer < 64 {
                self.tried &= !(1 << c.peer);
            }
        }
    }

    /// The attempt answered (any status that is not a failure): passive health resets.
    pub fn answered(&self, origins: &[Origin]) {
        if let Some(c) = self.current {
            origins[c.origin].report(c.peer, Outcome::Ok);
        }
    }

    /// The answer is replayed to the next fallback (`fallback_on`): not a failure, not a
    /// retry.
    pub fn replay(&mut self, origins: &[Origin]) {
        self.answered(origins);
        self.move_on();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{
        Balance, CacheFallback, OriginConfig, OriginKind, Passive, PeerConfig, RetryOn, Timeouts,
    };
    use std::time::Duration;

    fn origin(name: &str, peers: usize, retries: u32) -> Origin {
        let peers = (0..peers)
            .map(|i| PeerConfig {
                name: format!("p{i}"),
                weight: 1,
                priority: 1,
                tls: false,
                tls_verify: true,
                host: "127.0.0.1".into(),
                port: 9000 + i as u16,
                host_header: format!("127.0.0.1:{}", 9000 + i),
                prefix: String::new(),
                s3: None,
            })
            .collect();
        Origin::new(
            &OriginConfig {
                name: name.into(),
                kind: OriginKind::Http { peers },
                read_only: false,
                timeouts: Timeouts::default(),
                balance: Balance::RoundRobin,
                health: None,
                passive: Passive {
                    failures: 2,
                    cooldown: Duration::from_secs(30),
                    max_cooldown: Duration::from_secs(60),
                },
                retries,
                retry_on: RetryOn {
                    connect: true,
                    timeout: true,
                    statuses: vec![502, 503, 504],
                },
                dns_refresh: Duration::from_secs(60),
            },
            None,
            Some(crate::origin::pool::Settings::default()),
        )
        .unwrap()
    }

    fn group(failover: bool) -> GroupConfig {
        GroupConfig {
            name: "g".into(),
            main: 0,
            fallbacks: vec![1],
            fallback_on: vec![404],
            cache_fallback: CacheFallback::None,
            failover,
            ..Default::default()
        }
    }

    fn rules<'a>(g: &'a GroupConfig, read: bool) -> Rules<'a> {
        let m = if read {
            http::Method::GET
        } else {
            http::Method::PUT
        };
        Rules {
            plan: Plan::new(g, &m, None),
            group: g,
            read,
        }
    }

    #[test]
    fn retries_never_repeat_a_peer_and_then_fail_over() {
        let origins = [origin("main", 3, 2), origin("fb", 1, 0)];
        let g = group(true);
        let r = rules(&g, true);
        let mut a = Attempts::default();
        let mut seen = Vec::new();
        loop {
            let c = a.next(&origins, r, "/k").unwrap();
            if c.origin != 0 {
                assert_eq!(c.role, Role::Fallback);
                break;
            }
            assert!(!seen.contains(&c.peer), "peer {} twice", c.peer);
            seen.push(c.peer);
            assert!(a.failed(Failure::Connect, &origins, r));
        }
        assert_eq!(
            seen.len(),
            3,
            "the first attempt and two retries, then failover"
        );
        assert_eq!(a.failovers, 1);
        // The fallback fails too: the end.
        assert!(!a.failed(Failure::Connect, &origins, r));
        a.end(&origins);
        assert!(origins
            .iter()
            .all(|o| o.peers.iter().all(|p| p.state.in_flight() == 0)));
    }

    #[test]
    fn writes_retry_only_after_connect_failures_and_never_fail_over() {
        let origins = [origin("main", 2, 2), origin("fb", 1, 0)];
        let g = group(true);
        let w = rules(&g, false);
        let mut a = Attempts::default();
        a.next(&origins, w, "/k").unwrap();
        assert!(
            !a.failed(Failure::Timeout, &origins, w),
            "the body may be sent"
        );
        let mut a = Attempts::default();
        let first = a.next(&origins, w, "/k").unwrap();
        assert!(a.failed(Failure::Connect, &origins, w));
        let second = a.next(&origins, w, "/k").unwrap();
        assert_ne!(first.peer, second.peer);
        assert!(
            !a.failed(Failure::Connect, &origins, w),
            "no fallback for writes"
        );
        // A reused connection broke (the body may be sent) and the next attempt cannot
        // connect: the write stops there; a read goes on.
        let origins = [origin("main", 3, 2), origin("fb", 1, 0)];
        for (r, again) in [(w, false), (rules(&g, true), true)] {
            let mut a = Attempts::default();
            a.next(&origins, r, "/k").unwrap();
            a.stale_connection(&origins);
            a.next(&origins, r, "/k").unwrap();
            assert_eq!(a.failed(Failure::Connect, &origins, r), again);
        }
    }

    #[test]
    fn every_peer_down_is_a_fast_no_peer_or_a_failover() {
        let origins = [origin("main", 2, 2), origin("fb", 1, 0)];
        for p in &origins[0].peers {
            p.state.set_draining(true);
        }
        let g = group(false);
        let mut a = Attempts::default();
        let e = a.next(&origins, rules(&g, true), "/k").unwrap_err();
        assert!(e.retry_after >= 1);
        let g = group(true);
        let mut a = Attempts::default();
        let c = a.next(&origins, rules(&g, true), "/k").unwrap();
        assert_eq!((c.origin, a.failovers), (1, 1));
    }

    #[test]
    fn a_replay_is_not_a_retry() {
        let origins = [origin("main", 1, 2), origin("fb", 1, 0)];
        let g = group(true);
        let r = rules(&g, true);
        let mut a = Attempts::default();
        a.next(&origins, r, "/k").unwrap();
        a.replay(&origins);
        let c = a.next(&origins, r, "/k").unwrap();
        assert_eq!((c.origin, a.failovers), (1, 0));
        assert_eq!(
            origins[0].peers[0]
                .state
                .failed
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }
}
