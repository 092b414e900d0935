//! A bucket set's books: usage per member, reservations of uploads in progress, and the
//! location index (which member holds a key). [`Ledger`] is the one interface the request
//! path uses; [`LocalLedger`] keeps the books in this process, `redis::RedisLedger` keeps them
//! on Redis for a fleet (with a `LocalLedger` as its mirror while Redis is away).
//!
//! Invariants, for both:
//! - a reservation is atomic with the room check: `used + reserved + size ≤ capacity` holds
//!   for the member it lands on, however many uploads race;
//! - a commit or a delete is applied at most once per id (a retried recording never counts
//!   twice);
//! - a key is in the index at most once: a commit replaces the key's entry, moving its size
//!   off the member that held it.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;

use crate::upstream::now_ms;

/// One member's books.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    /// Bytes of committed objects.
    pub used: u64,
    pub objects: u64,
    /// Bytes reserved by uploads in progress.
    pub reserved: u64,
    /// Committed uploads.
    pub uploads: u64,
    /// Failed uploads.
    pub failures: u64,
}

/// Where a key is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loc {
    pub member: String,
    /// The object's size as counted in the member's usage; `None` when the location was
    /// learnt from a read (not counted: the next reconcile counts it).
    pub size: Option<u64>,
}

/// A member a new reservation may land on.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub member: &'a str,
    pub capacity: u64,
}

/// A reservation request: `size` bytes for upload `id` on the first candidate with room (or,
/// with `least_used`, the one with the lowest usage percentage). An `id` that already holds
/// a reservation grows it on its own member (the parts of a multipart upload).
#[derive(Debug, Clone, Copy)]
pub struct Reserve<'a> {
    pub id: &'a str,
    pub size: u64,
    pub candidates: &'a [Candidate<'a>],
    pub least_used: bool,
    /// The reservation lapses after this long (an instance that dies mid-upload does not hold
    /// room forever).
    pub ttl: Duration,
}

/// An upload landed: `key` is `size` bytes on `member`.
#[derive(Debug, Clone, Copy)]
pub struct Commit<'a> {
    pub id: &'a str,
    pub member: &'a str,
    pub key: &'a str,
    pub size: u64,
}

/// What a reconcile found on one member.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub member: String,
    pub objects: Vec<(String, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerError {
    /// The shared books cannot be reached and `on_error: deny` says not to go on alone.
    Unavailable,
}

#[async_trait]
pub trait Ledger: Send + Sync {
    /// The index of the candidate that got the reservation; `None`: no candidate has room.
    async fn reserve(&self, r: Reserve<'_>) -> Result<Option<usize>, LedgerError>;
    /// Gives a reservation's room back (an upload failed or was abandoned).
    async fn release(&self, id: &str);
    /// Gives `size` bytes of a grown reservation back (a multipart part that did not land:
    /// refused, failed or abandoned); a reservation left with nothing goes.
    async fn shrink(&self, id: &str, size: u64);
    /// An upload landed (idempotent per `id`); its reservation, if any, becomes usage.
    async fn commit(&self, c: Commit<'_>);
    /// `key` was deleted (idempotent per `id`).
    async fn delete(&self, id: &str, key: &str);
    /// Where `key` is. `shared`: the answer must come from the shared books (a write
    /// placing a key); otherwise this instance's view may answer (a read, which can
    /// recover from a stale answer).
    async fn locate(&self, key: &str, shared: bool) -> Option<Loc>;
    /// A read found `key` on `member`: remember where it is (not counted in usage).
    async fn remember(&self, key: &str, member: &str);
    /// A new object's upload is placed on `member`: puts the key in the index (not
    /// counted) unless the index already names a member, which it returns (atomic: of
    /// racing uploads of one new key, the first decides where it goes).
    async fn claim(&self, key: &str, member: &str) -> Option<String>;
    /// The claiming upload failed: the key leaves the index if it is still that claim.
    async fn unclaim(&self, key: &str, member: &str);
    /// An upload failed on `member`.
    async fn failure(&self, member: &str);
    /// Every member's books as this instance knows them (never waits).
    fn usage(&self) -> HashMap<String, Usage>;
    /// A reconcile's findings replace the books of the members listed.
    async fn replace(&self, listings: Vec<Listing>);
    /// The index knows every key of the set: a key it lacks is in no member (no need to
    /// ask the members before placing a write).
    async fn complete(&self) -> bool;
    /// The books are shared by a fleet (Redis).
    fn shared(&self) -> bool {
        false
    }
    /// The books know the members' usage: a new object may be placed.
    fn ready(&self) -> bool;
    /// A reconcile starts listing the members (changes from now on are applied again on
    /// its findings).
    fn begin_reconcile(&self) {}
    /// The reconcile failed before its findings.
    fn abort_reconcile(&self) {}
}

#[derive(Debug, Clone)]
struct Held {
    member: String,
    size: u64,
    expires: u64,
}

#[derive(Debug, Default)]
struct Books {
    usage: HashMap<String, Usage>,
    reservations: HashMap<String, Held>,
    index: HashMap<String, Loc>,
    /// Ids already applied, and the same in the order they may be forgotten (one TTL for
    /// all: insertion order is expiry order), so forgetting costs O(1) per id.
    done: std::collections::HashSet<String>,
    done_order: std::collections::VecDeque<(u64, String)>,
    /// A reconcile has filled the index.
    complete: bool,
    /// While a reconcile lists the members: the commits and deletes made meanwhile (key,
    /// `Some((member, size))` or `None` for a delete), applied again on its findings.
    during: Option<Vec<Landed>>,
}

/// A change made while a reconcile lists: the key, and its member and size (`None`: deleted).
type Landed = (String, Option<(String, u64)>);

/// How long an applied id is remembered (a retried recording arrives within this; the
/// process's own recordings are never retried later than the request's end).
const DONE_TTL_MS: u64 = 3600 * 1000;
/// At most this many applied ids are kept (the oldest go first beyond it).
const DONE_MAX: usize = 1_000_000;

/// The books in this process: exact for one instance; a fleet without Redis has one set of
/// books per instance.
#[derive(Debug, Default)]
pub struct LocalLedger {
    books: Mutex<Books>,
    /// Bound on the index when it is only a cache of shared books (`None`: unbounded, the
    /// index is the truth).
    cache_limit: Option<usize>,
}

impl LocalLedger {
    pub fn new() -> LocalLedger {
        LocalLedger::default()
    }

    /// A mirror of shared books: the index holds at most `limit` keys.
    pub fn mirror(limit: usize) -> LocalLedger {
        LocalLedger {
            books: Mutex::default(),
            cache_limit: Some(limit),
        }
    }

    pub fn reserve_now(&self, r: Reserve<'_>) -> Option<usize> {
        let now = now_ms();
        let mut b = self.books.lock();
        sweep_reservations(&mut b, now);
        let room = |b: &Books, member: &str, capacity: u64, size: u64| {
            let u = b.usage.get(member).copied().unwrap_or_default();
            u.used.saturating_add(u.reserved).saturating_add(size) <= capacity
        };
        if let Some(held) = b.reservations.get(r.id).cloned() {
            let ix = r.candidates.iter().position(|c| c.member == held.member)?;
            if !room(&b, &held.member, r.candidates[ix].capacity, r.size) {
                return None;
            }
            let h = b.reservations.get_mut(r.id).expect("held");
            h.size += r.size;
            h.expires = now + r.ttl.as_millis() as u64;
            b.usage.entry(held.member).or_default().reserved += r.size;
            return Some(ix);
        }
        let mut best: Option<(usize, f64)> = None;
        for (i, c) in r.candidates.iter().enumerate() {
            if !room(&b, c.member, c.capacity, r.size) {
                continue;
            }
            if !r.least_used {
                best = Some((i, 0.0));
                break;
            }
            let u = b.usage.get(c.member).copied().unwrap_or_default();
            let pct = (u.used + u.reserved) as f64 / c.capacity as f64;
            if best.is_none_or(|(_, p)| pct < p) {
                best = Some((i, pct));
            }
        }
        let (ix, _) = best?;
        let member = r.candidates[ix].member.to_string();
        b.usage.entry(member.clone()).or_default().reserved += r.size;
        b.reservations.insert(
            r.id.to_string(),
            Held {
                member,
                size: r.size,
                expires: now + r.ttl.as_millis() as u64,
            },
        );
        Some(ix)
    }

    pub fn release_now(&self, id: &str) {
        let mut b = self.books.lock();
        if let Some(h) = b.reservations.remove(id) {
            let u = b.usage.entry(h.member).or_default();
            u.reserved = u.reserved.saturating_sub(h.size);
        }
    }

    pub fn shrink_now(&self, id: &str, size: u64) {
        let mut b = self.books.lock();
        let Some(h) = b.reservations.get_mut(id) else {
            return;
        };
        let back = size.min(h.size);
        h.size -= back;
        let (member, empty) = (h.member.clone(), h.size == 0);
        if empty {
            b.reservations.remove(id);
        }
        let u = b.usage.entry(member).or_default();
        u.reserved = u.reserved.saturating_sub(back);
    }

    /// `false`: the id was applied before.
    pub fn commit_now(&self, c: Commit<'_>) -> bool {
        let mut b = self.books.lock();
        if !first_time(&mut b, c.id) {
            return false;
        }
        if let Some(h) = b.reservations.remove(c.id) {
            let u = b.usage.entry(h.member).or_default();
            u.reserved = u.reserved.saturating_sub(h.size);
        }
        if let Some(old) = b.index.remove(c.key) {
            uncount(&mut b, &old);
        }
        let u = b.usage.entry(c.member.to_string()).or_default();
        u.used += c.size;
        u.objects += 1;
        u.uploads += 1;
        if let Some(d) = b.during.as_mut() {
            d.push((c.key.to_string(), Some((c.member.to_string(), c.size))));
        }
        self.insert(
            &mut b,
            c.key,
            Loc {
                member: c.member.to_string(),
                size: Some(c.size),
            },
        );
        true
    }

    pub fn delete_now(&self, id: &str, key: &str) -> bool {
        let mut b = self.books.lock();
        if !first_time(&mut b, id) {
            return false;
        }
        if let Some(old) = b.index.remove(key) {
            uncount(&mut b, &old);
        }
        if let Some(d) = b.during.as_mut() {
            d.push((key.to_string(), None));
        }
        true
    }

    /// A reconcile starts listing: changes from now on are kept to be applied again on
    /// its findings (a listing may have missed them).
    pub fn begin_reconcile_now(&self) {
        self.books.lock().during = Some(Vec::new());
    }

    /// The reconcile failed: nothing to apply again.
    pub fn abort_reconcile_now(&self) {
        self.books.lock().during = None;
    }

    pub fn locate_now(&self, key: &str) -> Option<Loc> {
        self.books.lock().index.get(key).cloned()
    }

    /// Sets a location (a read found the key; or the shared books said where it is).
    pub fn remember_now(&self, key: &str, loc: Loc) {
        let mut b = self.books.lock();
        match b.index.get(key) {
            Some(old) if old.member == loc.member && old.size.is_some() => {}
            Some(old) if self.cache_limit.is_none() && old.size.is_some() => {
                // The truth moved (a read found it elsewhere): the old count goes.
                let old = old.clone();
                uncount(&mut b, &old);
                self.insert(&mut b, key, loc);
            }
            _ => self.insert(&mut b, key, loc),
        }
    }

    pub fn claim_now(&self, key: &str, member: &str) -> Option<String> {
        let mut b = self.books.lock();
        if let Some(l) = b.index.get(key) {
            return Some(l.member.clone());
        }
        self.insert(
            &mut b,
            key,
            Loc {
                member: member.to_string(),
                size: None,
            },
        );
        None
    }

    pub fn unclaim_now(&self, key: &str, member: &str) {
        let mut b = self.books.lock();
        if b.index
            .get(key)
            .is_some_and(|l| l.member == member && l.size.is_none())
        {
            b.index.remove(key);
        }
    }

    pub fn failure_now(&self, member: &str) {
        self.books
            .lock()
            .usage
            .entry(member.to_string())
            .or_default()
            .failures += 1;
    }

    /// The shared books' figures for `member` (a mirror keeps this instance's counters of
    /// reservations it holds).
    pub fn set_usage(&self, member: &str, u: Usage) {
        self.books.lock().usage.insert(member.to_string(), u);
    }

    pub fn usage_now(&self) -> HashMap<String, Usage> {
        let now = now_ms();
        let mut b = self.books.lock();
        sweep_reservations(&mut b, now);
        b.usage.clone()
    }

    pub fn replace_now(&self, listings: &[Listing]) {
        let mut b = self.books.lock();
        for l in listings {
            b.index.retain(|_, loc| loc.member != l.member);
            let reserved = b.usage.get(&l.member).map_or(0, |u| u.reserved);
            let prev = b.usage.get(&l.member).copied().unwrap_or_default();
            let mut u = Usage {
                reserved,
                uploads: prev.uploads,
                failures: prev.failures,
                ..Usage::default()
            };
            for (key, size) in &l.objects {
                u.used += size;
                u.objects += 1;
                if let Some(old) = b.index.insert(
                    key.clone(),
                    Loc {
                        member: l.member.clone(),
                        size: Some(*size),
                    },
                ) {
                    // Two members hold the key (written around cascade): the later listed
                    // member's copy is where reads and writes go; both are counted.
                    let _ = old;
                }
            }
            b.usage.insert(l.member.clone(), u);
        }
        // What landed while the members were listed: the listing may predate it.
        for (key, change) in b.during.take().unwrap_or_default() {
            if let Some(old) = b.index.remove(&key) {
                uncount(&mut b, &old);
            }
            if let Some((member, size)) = change {
                let u = b.usage.entry(member.clone()).or_default();
                u.used += size;
                u.objects += 1;
                b.index.insert(
                    key,
                    Loc {
                        member,
                        size: Some(size),
                    },
                );
            }
        }
        b.complete = true;
    }

    pub fn complete_now(&self) -> bool {
        self.books.lock().complete
    }

    pub fn set_complete(&self, v: bool) {
        self.books.lock().complete = v;
    }

    fn insert(&self, b: &mut Books, key: &str, loc: Loc) {
        if let Some(limit) = self.cache_limit {
            if b.index.len() >= limit && !b.index.contains_key(key) {
                // A cache of the shared index: start over rather than track recency.
                b.index.clear();
            }
        }
        b.index.insert(key.to_string(), loc);
    }
}

fn first_time(b: &mut Books, id: &str) -> bool {
    let now = now_ms();
    while let Some((until, _)) = b.done_order.front() {
        if *until > now && b.done_order.len() < DONE_MAX {
            break;
        }
        let (_, old) = b.done_order.pop_front().expect("front");
        b.done.remove(&old);
    }
    if !b.done.insert(id.to_string()) {
        return false;
    }
    b.done_order.push_back((now + DONE_TTL_MS, id.to_string()));
    true
}

fn uncount(b: &mut Books, old: &Loc) {
    if let Some(size) = old.size {
        let u = b.usage.entry(old.member.clone()).or_default();
        u.used = u.used.saturating_sub(size);
        u.objects = u.objects.saturating_sub(1);
    }
}

fn sweep_reservations(b: &mut Books, now: u64) {
    let expired: Vec<String> = b
        .reservations
        .iter()
        .filter(|(_, h)| h.expires <= now)
        .map(|(id, _)| id.clone())
        .collect();
    for id in expired {
        if let Some(h) = b.reservations.remove(&id) {
            let u = b.usage.entry(h.member).or_default();
            u.reserved = u.reserved.saturating_sub(h.size);
        }
    }
}

#[async_trait]
impl Ledger for LocalLedger {
    async fn reserve(&self, r: Reserve<'_>) -> Result<Option<usize>, LedgerError> {
        Ok(self.reserve_now(r))
    }
    async fn release(&self, id: &str) {
        self.release_now(id)
    }
    async fn shrink(&self, id: &str, size: u64) {
        self.shrink_now(id, size)
    }
    async fn commit(&self, c: Commit<'_>) {
        self.commit_now(c);
    }
    async fn delete(&self, id: &str, key: &str) {
        self.delete_now(id, key);
    }
    async fn locate(&self, key: &str, _shared: bool) -> Option<Loc> {
        self.locate_now(key)
    }
    async fn remember(&self, key: &str, member: &str) {
        self.remember_now(
            key,
            Loc {
                member: member.to_string(),
                size: None,
            },
        )
    }
    async fn failure(&self, member: &str) {
        self.failure_now(member)
    }
    async fn claim(&self, key: &str, member: &str) -> Option<String> {
        self.claim_now(key, member)
    }
    async fn unclaim(&self, key: &str, member: &str) {
        self.unclaim_now(key, member)
    }
    fn usage(&self) -> HashMap<String, Usage> {
        self.usage_now()
    }
    async fn replace(&self, listings: Vec<Listing>) {
        self.replace_now(&listings)
    }
    async fn complete(&self) -> bool {
        self.complete_now()
    }
    fn ready(&self) -> bool {
        // Local books start empty: the start-up reconcile fills them.
        self.complete_now()
    }
    fn begin_reconcile(&self) {
        self.begin_reconcile_now()
    }
    fn abort_reconcile(&self) {
        self.abort_reconcile_now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands() -> [Candidate<'static>; 2] {
        [
            Candidate {
                member: "a",
                capacity: 100,
            },
            Candidate {
                member: "b",
                capacity: 1000,
            },
        ]
    }

    fn reserve<'a>(id: &'a str, size: u64, c: &'a [Candidate<'a>], least: bool) -> Reserve<'a> {
        Reserve {
            id,
            size,
            candidates: c,
            least_used: least,
            ttl: Duration::from_secs(60),
        }
    }

    #[test]
    fn reservations_never_overshoot_and_spill_in_order() {
        let l = LocalLedger::new();
        let c = cands();
        let mut on_a = 0;
        for i in 0..30 {
            let id = format!("u{i}");
            match l.reserve_now(reserve(&id, 10, &c, false)) {
                Some(0) => on_a += 1,
                Some(1) => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(on_a, 10, "a holds 100 bytes: ten uploads of 10");
        let u = l.usage_now();
        assert_eq!((u["a"].reserved, u["b"].reserved), (100, 200));
        // Releasing one makes room for exactly one more.
        l.release_now("u0");
        assert_eq!(l.reserve_now(reserve("x", 10, &c, false)), Some(0));
        assert_eq!(l.reserve_now(reserve("y", 10, &c, false)), Some(1));
        // Too big for everyone.
        assert_eq!(l.reserve_now(reserve("z", 10_000, &c, false)), None);
    }

    #[test]
    fn least_used_levels_percentages() {
        let l = LocalLedger::new();
        let c = cands();
        let mut n = [0; 2];
        for i in 0..110 {
            let id = format!("u{i}");
            n[l.reserve_now(reserve(&id, 1, &c, true)).unwrap()] += 1;
        }
        // 110 bytes over 100 + 1000: about 10 and 100.
        assert!((9..=11).contains(&n[0]), "{n:?}");
    }

    #[test]
    fn commits_are_idempotent_and_overwrites_move_the_size() {
        let l = LocalLedger::new();
        let c = cands();
        l.reserve_now(reserve("u1", 40, &c, false)).unwrap();
        let commit = Commit {
            id: "u1",
            member: "a",
            key: "/k",
            size: 40,
        };
        assert!(l.commit_now(commit));
        assert!(!l.commit_now(commit), "a retried recording counts once");
        let u = l.usage_now();
        assert_eq!((u["a"].used, u["a"].objects, u["a"].reserved), (40, 1, 0));
        // Overwrite with 25 bytes: usage changes by the difference.
        assert!(l.commit_now(Commit {
            id: "u2",
            size: 25,
            ..commit
        }));
        let u = l.usage_now();
        assert_eq!((u["a"].used, u["a"].objects), (25, 1));
        assert!(l.delete_now("d1", "/k"));
        assert!(!l.delete_now("d1", "/k"));
        let u = l.usage_now();
        assert_eq!((u["a"].used, u["a"].objects), (0, 0));
        assert_eq!(l.locate_now("/k"), None);
    }

    #[test]
    fn a_grown_reservation_stays_on_its_member_and_respects_capacity() {
        let l = LocalLedger::new();
        let c = cands();
        assert_eq!(l.reserve_now(reserve("mpu", 60, &c, false)), Some(0));
        assert_eq!(l.reserve_now(reserve("mpu", 40, &c, false)), Some(0));
        assert_eq!(
            l.reserve_now(reserve("mpu", 1, &c, false)),
            None,
            "a is full; a part does not move to b"
        );
        assert_eq!(l.usage_now()["a"].reserved, 100);
        // A part that did not land gives its bytes back; an empty reservation goes.
        l.shrink_now("mpu", 40);
        assert_eq!(l.usage_now()["a"].reserved, 60);
        l.shrink_now("mpu", 60);
        assert_eq!(l.usage_now()["a"].reserved, 0);
        assert_eq!(l.reserve_now(reserve("mpu", 1, &c, false)), Some(0));
        assert_eq!(l.usage_now()["a"].reserved, 1);
    }

    #[test]
    fn applied_ids_are_bounded_and_forgetting_them_is_cheap() {
        let mut b = Books::default();
        assert!(first_time(&mut b, "x"));
        assert!(!first_time(&mut b, "x"), "applied once");
        for i in 0..DONE_MAX {
            assert!(first_time(&mut b, &i.to_string()));
        }
        assert_eq!(b.done.len(), DONE_MAX);
        assert_eq!(b.done_order.len(), DONE_MAX);
        assert!(first_time(&mut b, "x"), "the oldest id went first");
    }

    #[test]
    fn changes_made_while_a_reconcile_lists_are_not_lost() {
        let l = LocalLedger::new();
        l.begin_reconcile_now();
        // Landed after the listing of `a` was taken: the listing does not have them.
        l.commit_now(Commit {
            id: "c1",
            member: "a",
            key: "/new",
            size: 5,
        });
        l.commit_now(Commit {
            id: "c0",
            member: "a",
            key: "/old",
            size: 1,
        });
        l.delete_now("d1", "/old");
        l.replace_now(&[Listing {
            member: "a".into(),
            objects: vec![("/old".into(), 7), ("/x".into(), 3)],
        }]);
        let u = l.usage_now();
        assert_eq!((u["a"].used, u["a"].objects), (8, 2), "/x and /new");
        assert_eq!(l.locate_now("/new").unwrap().size, Some(5));
        assert_eq!(l.locate_now("/old"), None, "deleted meanwhile");
        // The next reconcile starts clean.
        l.replace_now(&[Listing {
            member: "a".into(),
            objects: vec![("/x".into(), 3)],
        }]);
        assert_eq!(l.usage_now()["a"].used, 3);
    }

    #[test]
    fn the_first_claim_of_a_new_key_decides_its_member() {
        let l = LocalLedger::new();
        assert_eq!(l.claim_now("/k", "a"), None);
        assert_eq!(l.claim_now("/k", "b").as_deref(), Some("a"));
        l.unclaim_now("/k", "b");
        assert_eq!(l.locate_now("/k").unwrap().member, "a", "not b's claim");
        l.unclaim_now("/k", "a");
        assert_eq!(l.locate_now("/k"), None);
        // A committed object is never unclaimed.
        l.commit_now(Commit {
            id: "c",
            member: "a",
            key: "/k",
            size: 3,
        });
        l.unclaim_now("/k", "a");
        assert_eq!(l.locate_now("/k").unwrap().size, Some(3));
    }

    #[test]
    fn expired_reservations_give_their_room_back() {
        let l = LocalLedger::new();
        let c = cands();
        let mut r = reserve("u", 100, &c, false);
        r.ttl = Duration::ZERO;
        assert_eq!(l.reserve_now(r), Some(0));
        assert_eq!(l.usage_now()["a"].reserved, 0);
    }

    #[test]
    fn replace_rebuilds_usage_and_index() {
        let l = LocalLedger::new();
        l.remember_now(
            "/gone",
            Loc {
                member: "a".into(),
                size: Some(5),
            },
        );
        l.replace_now(&[Listing {
            member: "a".into(),
            objects: vec![("/x".into(), 3), ("/y".into(), 4)],
        }]);
        let u = l.usage_now();
        assert_eq!((u["a"].used, u["a"].objects), (7, 2));
        assert_eq!(l.locate_now("/gone"), None);
        assert_eq!(l.locate_now("/y").unwrap().size, Some(4));
        assert!(l.complete_now());
    }
}
