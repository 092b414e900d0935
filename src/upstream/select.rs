//! Picking a peer: within the best priority tier that has an eligible peer, by the origin's
//! `balance`.
//!
//! - `round_robin`: smooth weighted round robin (nginx's), precomputed per tier as a schedule
//!   of peer indices; a shared counter walks it, skipping ineligible peers. Lock-free.
//! - `least_outstanding`: the fewest attempts in flight per unit of weight.
//! - `hash`: consistent hashing on the object key with `pingora_ketama` (the ketama ring of
//!   nginx and memcached clients). A peer's ring identity is derived from its *name*, so
//!   reordering peers moves no key and adding one moves about 1/N of them; an ineligible
//!   peer hands its keys to the next ones on the ring.
//! - `random`: weighted random.
//!
//! Eligibility (usable, not tried yet by this request) is the caller's predicate, so
//! retries and the panic rule (`Origin::pick`) reuse the same walk.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use pingora_ketama::{Bucket, Continuum};
use sha2::{Digest, Sha256};

use crate::config::Balance;

/// What selection needs to know of a peer.
#[derive(Debug, Clone)]
pub struct Member {
    pub name: String,
    pub weight: u32,
    pub priority: u32,
}

struct Tier {
    /// Peer indices of weight > 0.
    peers: Vec<usize>,
    /// Smooth weighted round-robin schedule.
    schedule: Vec<usize>,
    ring: Option<(Continuum, HashMap<SocketAddr, usize>)>,
}

pub struct Selector {
    balance: Balance,
    tiers: Vec<Tier>,
    weights: Vec<u32>,
    counter: AtomicUsize,
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// nginx's smooth weighted round robin, unrolled into one period.
fn schedule(peers: &[usize], weights: &[u32]) -> Vec<usize> {
    let g = peers.iter().fold(0, |g, &p| gcd(g, weights[p]));
    let mut w: Vec<u64> = peers
        .iter()
        .map(|&p| u64::from(weights[p] / g.max(1)))
        .collect();
    let total: u64 = w.iter().sum();
    const MAX: u64 = 10_000;
    if total > MAX {
        for x in &mut w {
            *x = (*x * MAX / total).max(1);
        }
    }
    let total: i64 = w.iter().sum::<u64>() as i64;
    let mut current = vec![0i64; peers.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, x) in current.iter_mut().zip(&w) {
            *c += *x as i64;
        }
        let best = (0..peers.len())
            .max_by_key(|&i| (current[i], std::cmp::Reverse(i)))
            .expect("a tier has peers");
        current[best] -= total;
        out.push(peers[best]);
    }
    out
}

/// A stable ring identity for a peer name.
fn ring_node(name: &str) -> SocketAddr {
    let h = Sha256::digest(name.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    SocketAddr::new(IpAddr::V6(Ipv6Addr::from(b)), 0)
}

impl Selector {
    pub fn new(balance: Balance, members: &[Member]) -> Selector {
        let weights: Vec<u32> = members.iter().map(|m| m.weight).collect();
        let mut priorities: Vec<u32> = members.iter().map(|m| m.priority).collect();
        priorities.sort_unstable();
        priorities.dedup();
        let tiers = priorities
            .into_iter()
            .filter_map(|prio| {
                let peers: Vec<usize> = (0..members.len())
                    .filter(|&i| members[i].priority == prio && members[i].weight > 0)
                    .collect();
                if peers.is_empty() {
                    return None;
                }
                let ring = (balance == Balance::Hash).then(|| {
                    let buckets: Vec<Bucket> = peers
                        .iter()
                        .map(|&i| Bucket::new(ring_node(&members[i].name), members[i].weight))
                        .collect();
                    let index = peers
                        .iter()
                        .map(|&i| (ring_node(&members[i].name), i))
                        .collect();
                    (Continuum::new(&buckets), index)
                });
                Some(Tier {
                    schedule: schedule(&peers, &weights),
                    peers,
                    ring,
                })
            })
            .collect();
        Selector {
            balance,
            tiers,
            weights,
            counter: AtomicUsize::new(0),
        }
    }

    pub fn balance(&self) -> Balance {
        self.balance
    }

    /// The first eligible peer of the best tier that has one. `key` feeds `hash`;
    /// `in_flight(i)` feeds `least_outstanding`.
    pub fn pick(
        &self,
        key: &[u8],
        eligible: impl Fn(usize) -> bool,
        in_flight: impl Fn(usize) -> u32,
    ) -> Option<usize> {
        self.tiers
            .iter()
            .find_map(|t| self.pick_in(t, key, &eligible, &in_flight))
    }

    fn pick_in(
        &self,
        t: &Tier,
        key: &[u8],
        eligible: &impl Fn(usize) -> bool,
        in_flight: &impl Fn(usize) -> u32,
    ) -> Option<usize> {
        match self.balance {
            Balance::RoundRobin => {
                let n = t.schedule.len();
                let start = self.counter.fetch_add(1, Relaxed);
                (0..n)
                    .map(|j| t.schedule[(start + j) % n])
                    .find(|&p| eligible(p))
            }
            Balance::LeastOutstanding => {
                let start = self.counter.fetch_add(1, Relaxed);
                let n = t.peers.len();
                // (in_flight + 1) / weight, compared without division.
                (0..n)
                    .map(|j| t.peers[(start + j) % n])
                    .filter(|&p| eligible(p))
                    .min_by(|&a, &b| {
                        let la = u64::from(in_flight(a) + 1) * u64::from(self.weights[b]);
                        let lb = u64::from(in_flight(b) + 1) * u64::from(self.weights[a]);
                        la.cmp(&lb)
                    })
            }
            Balance::Random => {
                let total: u64 = t
                    .peers
                    .iter()
                    .filter(|&&p| eligible(p))
                    .map(|&p| u64::from(self.weights[p]))
                    .sum();
                if total == 0 {
                    return None;
                }
                let mut r = fastrand::u64(0..total);
                t.peers.iter().copied().filter(|&p| eligible(p)).find(|&p| {
                    let w = u64::from(self.weights[p]);
                    if r < w {
                        true
                    } else {
                        r -= w;
                        false
                    }
                })
            }
            Balance::Hash => {
                let (ring, index) = t.ring.as_ref()?;
                // Walk the ring from the key's point; every peer appears within a lap.
                ring.node_iter(key)
                    .take(ring_len_bound(t))
                    .filter_map(|a| index.get(a).copied())
                    .find(|&p| eligible(p))
                    .or_else(|| t.peers.iter().copied().find(|&p| eligible(p)))
            }
        }
    }
}

/// How far to walk a ring before giving up on finding an eligible peer by it (then the
/// tier's first eligible peer is taken).
fn ring_len_bound(t: &Tier) -> usize {
    t.peers.len() * 160 * 4
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(spec: &[(u32, u32)]) -> Vec<Member> {
        spec.iter()
            .enumerate()
            .map(|(i, &(weight, priority))| Member {
                name: format!("p{i}"),
                weight,
                priority,
            })
            .collect()
    }

    fn counts(s: &Selector, n: usize, runs: usize, eligible: impl Fn(usize) -> bool) -> Vec<usize> {
        let mut c = vec![0; n];
        for i in 0..runs {
            let p = s
                .pick(format!("/k{i}").as_bytes(), &eligible, |_| 0)
                .unwrap();
            c[p] += 1;
        }
        c
    }

    #[test]
    fn weighted_round_robin_is_smooth_and_exact() {
        let s = Selector::new(Balance::RoundRobin, &members(&[(3, 1), (1, 1), (2, 1)]));
        assert_eq!(counts(&s, 3, 600, |_| true), [300, 100, 200]);
        // Smooth: no peer gets its whole share in a row.
        let seq: Vec<usize> = (0..6)
            .map(|_| s.pick(b"", |_| true, |_| 0).unwrap())
            .collect();
        assert!(
            seq.windows(3).all(|w| !(w[0] == w[1] && w[1] == w[2])),
            "{seq:?}"
        );
        // An ineligible peer's turns go to the others.
        let c = counts(&s, 3, 600, |p| p != 0);
        assert_eq!(c[0], 0);
        assert_eq!(c[1] + c[2], 600);
    }

    #[test]
    fn tiers_are_used_in_priority_order() {
        let s = Selector::new(Balance::RoundRobin, &members(&[(1, 2), (1, 1), (1, 1)]));
        let c = counts(&s, 3, 100, |_| true);
        assert_eq!(c[0], 0, "backup tier unused while tier 1 has a peer");
        let c = counts(&s, 3, 100, |p| p == 0);
        assert_eq!(c[0], 100);
        assert_eq!(s.pick(b"", |_| false, |_| 0), None);
        // Weight 0: never chosen.
        let z = Selector::new(Balance::RoundRobin, &members(&[(0, 1), (1, 1)]));
        assert_eq!(counts(&z, 2, 10, |_| true), [0, 10]);
    }

    #[test]
    fn least_outstanding_prefers_the_idle_peer() {
        let s = Selector::new(Balance::LeastOutstanding, &members(&[(1, 1), (1, 1)]));
        for _ in 0..10 {
            assert_eq!(
                s.pick(b"", |_| true, |p| if p == 0 { 5 } else { 1 }),
                Some(1)
            );
        }
        // Weights scale the load: 2 in flight on a weight-4 peer beat 1 on a weight-1 peer.
        let w = Selector::new(Balance::LeastOutstanding, &members(&[(4, 1), (1, 1)]));
        assert_eq!(
            w.pick(b"", |_| true, |p| if p == 0 { 2 } else { 1 }),
            Some(0)
        );
    }

    #[test]
    fn hashing_is_sticky_and_moves_few_keys() {
        let three = Selector::new(Balance::Hash, &members(&[(1, 1), (1, 1), (1, 1)]));
        let keys: Vec<String> = (0..3000).map(|i| format!("/video/{i}.mp4")).collect();
        let before: Vec<usize> = keys
            .iter()
            .map(|k| three.pick(k.as_bytes(), |_| true, |_| 0).unwrap())
            .collect();
        let again: Vec<usize> = keys
            .iter()
            .map(|k| three.pick(k.as_bytes(), |_| true, |_| 0).unwrap())
            .collect();
        assert_eq!(before, again);
        let four = Selector::new(Balance::Hash, &members(&[(1, 1), (1, 1), (1, 1), (1, 1)]));
        let moved = keys
            .iter()
            .zip(&before)
            .filter(|(k, b)| four.pick(k.as_bytes(), |_| true, |_| 0).unwrap() != **b)
            .count();
        // About 1/4 move to the new peer; none move between the old ones.
        assert!((450..=1050).contains(&moved), "{moved} of 3000 moved");
        // An ineligible peer's keys go elsewhere; the others' stay.
        let stay = keys
            .iter()
            .zip(&before)
            .filter(|(_, b)| **b != 0)
            .all(|(k, b)| three.pick(k.as_bytes(), |p| p != 0, |_| 0).unwrap() == *b);
        assert!(stay);
    }

    #[test]
    fn random_follows_the_weights() {
        let s = Selector::new(Balance::Random, &members(&[(3, 1), (1, 1)]));
        let c = counts(&s, 2, 8000, |_| true);
        assert!((5600..6400).contains(&c[0]), "{c:?}");
    }

    #[test]
    fn schedules_stay_bounded() {
        let s = schedule(&[0, 1], &[1_000_000, 1]);
        assert!(s.len() <= 10_001);
        assert!(s.contains(&1));
        assert_eq!(schedule(&[0, 1], &[4, 2]), [0, 1, 0]);
    }
}
