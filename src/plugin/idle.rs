//! A plugin's idle instances, kept per thread.
//!
//! A request leases an instance for its plugin chain and gives it back when it ends. With one
//! pool every thread shares, the instance a request gets is whichever one any core gave back
//! last: its guest memory, its store and its lock move between cores' caches on almost every
//! request, and the pool's lock itself does too. Here every thread leases from and gives back
//! to its own shard (`crate::shard`), so an instance stays warm on one core; a shard with
//! nothing to lend takes from the others before a new instance is built, so the number of
//! instances still follows the requests in flight, not the number of threads.
//!
//! The choice among idle instances is the single pool's: one holding no other request's
//! context (parked, or waiting for HTTP calls) first, from any shard, the own shard first;
//! then one that does. The total stays under the plugin's bound.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

/// An instance as the pool holds it: shared with the contexts parked in it, `None` once
/// discarded.
pub(super) type Slot<T> = Arc<Mutex<Option<T>>>;

/// One thread's idle instances, on cache lines of their own.
#[repr(align(128))]
struct Shard<T>(Mutex<Vec<Slot<T>>>);

pub(super) struct Idle<T> {
    shards: Box<[Shard<T>]>,
    /// Instances in all shards, or a little more while one is being put in (raised before the
    /// push, lowered after the removal): 0 means every shard is empty, and no request locks
    /// them to find out. Relaxed: the shards' locks order the instances themselves; a stale
    /// read only makes a lease look in the shards for nothing, or build an instance.
    len: AtomicUsize,
    /// Where the next eviction starts looking, so that no one thread's instances go first.
    next_evict: AtomicUsize,
    /// Most instances kept.
    max: usize,
}

/// No other holder: no context parked in it, no request waiting on it.
fn unshared<T>(s: &Slot<T>) -> bool {
    Arc::strong_count(s) == 1
}

impl<T> Idle<T> {
    pub(super) fn new(max: usize) -> Idle<T> {
        Idle {
            shards: (0..crate::shard::count())
                .map(|_| Shard(Mutex::new(Vec::new())))
                .collect(),
            len: AtomicUsize::new(0),
            next_evict: AtomicUsize::new(0),
            max,
        }
    }

    /// The shards in the order shard `own`'s thread looks in them: its own, then the next.
    fn in_order_from(&self, own: usize) -> impl Iterator<Item = &Shard<T>> {
        let n = self.shards.len();
        (0..n).map(move |k| &self.shards[(own + k) & (n - 1)])
    }

    /// Takes the most recently put instance of one shard that `want` accepts.
    fn take_from(&self, shard: &Shard<T>, want: fn(&Slot<T>) -> bool) -> Option<Slot<T>> {
        self.take_locked(&mut shard.0.lock(), want)
    }

    /// The same, in a shard already locked.
    fn take_locked(&self, v: &mut Vec<Slot<T>>, want: fn(&Slot<T>) -> bool) -> Option<Slot<T>> {
        let i = v.iter().rposition(want)?;
        let s = v.swap_remove(i);
        self.len.fetch_sub(1, Ordering::Relaxed);
        Some(s)
    }

    /// An idle instance (possibly one discarded since it was put: the caller checks), or
    /// `None` when there is none.
    pub(super) fn take(&self) -> Option<Slot<T>> {
        self.take_in(crate::shard::of_thread())
    }

    fn take_in(&self, own: usize) -> Option<Slot<T>> {
        if self.len.load(Ordering::Relaxed) == 0 {
            return None;
        }
        // One pass for an instance no other request holds, noting the first shard with any.
        let mut some = None;
        for shard in self.in_order_from(own) {
            let mut v = shard.0.lock();
            if let Some(s) = self.take_locked(&mut v, unshared) {
                return Some(s);
            }
            if some.is_none() && !v.is_empty() {
                some = Some(shard);
            }
        }
        // Every idle instance holds other requests' contexts: one from the first shard that
        // had any (any other if that one was emptied meanwhile).
        some.and_then(|shard| self.take_from(shard, |_| true))
            .or_else(|| {
                self.in_order_from(own)
                    .find_map(|shard| self.take_from(shard, |_| true))
            })
    }

    /// Keeps `s` in this thread's shard, unless `max` are kept already (then it is dropped,
    /// and with it the instance unless contexts parked in it still hold it).
    pub(super) fn put(&self, s: Slot<T>) {
        self.put_in(crate::shard::of_thread(), s);
    }

    fn put_in(&self, own: usize, s: Slot<T>) {
        if self.len.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.len.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        self.shards[own].0.lock().push(s);
    }

    /// Clones of every idle instance (they stay idle), for ticks.
    pub(super) fn snapshot(&self) -> Vec<Slot<T>> {
        self.shards
            .iter()
            .flat_map(|s| s.0.lock().clone())
            .collect()
    }

    /// Forgets the discarded instances (in every shard) and takes one that holds no parked
    /// context (so that dropping it frees its slot of the engine's pool), or `None`. Each
    /// eviction starts at the next shard.
    pub(super) fn evict_one(&self) -> Option<Slot<T>> {
        let start = self.next_evict.fetch_add(1, Ordering::Relaxed);
        let mut taken = None;
        for shard in self.in_order_from(start & (self.shards.len() - 1)) {
            let mut v = shard.0.lock();
            let before = v.len();
            v.retain(|s| s.lock().is_some());
            if taken.is_none() {
                taken = v.iter().rposition(unshared).map(|i| v.swap_remove(i));
            }
            self.len.fetch_sub(before - v.len(), Ordering::Relaxed);
        }
        taken
    }

    /// Instances kept (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards.iter().map(|s| s.0.lock().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(v: u32) -> Slot<u32> {
        Arc::new(Mutex::new(Some(v)))
    }

    fn value(s: &Slot<u32>) -> Option<u32> {
        *s.lock()
    }

    fn counted(idle: &Idle<u32>) -> usize {
        let n = idle.len();
        assert_eq!(
            idle.len.load(Ordering::Relaxed),
            n,
            "the count matches the shards"
        );
        n
    }

    #[test]
    fn a_thread_gets_back_what_it_put_and_lends_to_others_only_when_it_has_nothing() {
        let idle = Idle::new(8);
        assert!(idle.take_in(0).is_none());
        idle.put_in(0, slot(1));
        idle.put_in(0, slot(2));
        // Last in, first out in a shard.
        assert_eq!(value(&idle.take_in(0).unwrap()), Some(2));
        idle.put_in(0, slot(2));
        // Another shard's thread gets its own back, not shard 0's.
        idle.put_in(1, slot(10));
        assert_eq!(value(&idle.take_in(1).unwrap()), Some(10));
        // With nothing of its own, it takes shard 0's rather than none (and gives it back to
        // its own shard).
        let lent = idle.take_in(1).unwrap();
        assert_eq!(value(&lent), Some(2));
        idle.put_in(1, lent);
        assert_eq!(counted(&idle), 2);
        assert_eq!(value(&idle.take_in(1).unwrap()), Some(2));
        assert_eq!(value(&idle.take_in(1).unwrap()), Some(1));
        assert!(idle.take_in(1).is_none());
        assert_eq!(counted(&idle), 0);
    }

    #[test]
    fn an_instance_with_no_parked_context_comes_first_from_any_shard() {
        let idle = Idle::new(8);
        idle.put_in(1, slot(1));
        // Shard 0's own instance has a context parked in it (a second holder).
        let shared = slot(2);
        idle.put_in(0, Arc::clone(&shared));
        assert_eq!(
            value(&idle.take_in(0).unwrap()),
            Some(1),
            "the unshared one first"
        );
        assert_eq!(
            value(&idle.take_in(0).unwrap()),
            Some(2),
            "then the shared one"
        );
        assert!(idle.take_in(0).is_none());
        drop(shared);
    }

    #[test]
    fn at_most_max_are_kept_across_shards() {
        let idle = Idle::new(5);
        for v in 0..12 {
            idle.put_in(v as usize % 3, slot(v));
        }
        assert_eq!(counted(&idle), 5);
        assert_eq!(idle.snapshot().len(), 5, "a snapshot sees every shard");
        assert_eq!(idle.snapshot().len(), 5, "and leaves them idle");
        assert_eq!(counted(&idle), 5);
        // Room again after a lease.
        let s = idle.take_in(2).unwrap();
        idle.put_in(2, slot(99));
        idle.put_in(2, s);
        assert_eq!(counted(&idle), 5);
    }

    #[test]
    fn eviction_forgets_discarded_instances_and_spares_shared_ones() {
        let idle = Idle::new(8);
        let discarded = slot(1);
        *discarded.lock() = None;
        idle.put_in(0, discarded);
        let shared = slot(2);
        idle.put_in(0, Arc::clone(&shared));
        idle.put_in(3, slot(3));
        assert_eq!(value(&idle.evict_one().unwrap()), Some(3));
        // The discarded one is forgotten on the way; the shared one stays.
        assert!(idle.evict_one().is_none());
        assert_eq!(counted(&idle), 1);
        assert_eq!(value(&idle.take_in(0).unwrap()), Some(2));
        drop(shared);
    }

    #[test]
    fn evictions_forget_discarded_instances_in_every_shard_and_take_turns() {
        let idle = Idle::new(16);
        for shard in 0..4 {
            idle.put_in(shard, slot(shard as u32));
            let discarded = slot(100 + shard as u32);
            *discarded.lock() = None;
            idle.put_in(shard, discarded);
        }
        idle.put_in(0, slot(10));
        // The first eviction starts at shard 0 and takes its newest.
        assert_eq!(value(&idle.evict_one().unwrap()), Some(10));
        // Every discarded one is gone after it, not only shard 0's.
        assert_eq!(counted(&idle), 4);
        // The next starts at shard 1, although shard 0 still has one.
        assert_eq!(value(&idle.evict_one().unwrap()), Some(1));
        assert_eq!(counted(&idle), 3);
    }

    #[test]
    fn many_threads_leasing_at_once_lose_and_duplicate_nothing() {
        let idle = Idle::new(64);
        for v in 0..16 {
            idle.put_in(v as usize % 2, slot(v));
        }
        std::thread::scope(|sc| {
            for _ in 0..8 {
                sc.spawn(|| {
                    for _ in 0..2_000 {
                        // A lease, as a request holds one, then given back in this thread's
                        // shard.
                        if let Some(s) = idle.take() {
                            idle.put(s);
                        }
                    }
                });
            }
        });
        let mut all: Vec<u32> = idle.snapshot().iter().filter_map(value).collect();
        all.sort_unstable();
        assert_eq!(all, (0..16).collect::<Vec<_>>());
        assert_eq!(counted(&idle), 16);
    }

    /// Evictions, snapshots and puts of new instances racing the leases keep the count
    /// exact: every instance put is leased, evicted or still idle, once.
    #[test]
    fn evictions_and_snapshots_racing_leases_keep_the_count() {
        let idle = Idle::new(1_000_000);
        let evicted = AtomicUsize::new(0);
        std::thread::scope(|sc| {
            for t in 0..4u32 {
                let idle = &idle;
                sc.spawn(move || {
                    for i in 0..2_000 {
                        idle.put(slot(t * 10_000 + i));
                        if let Some(s) = idle.take() {
                            idle.put(s);
                        }
                    }
                });
            }
            sc.spawn(|| {
                for _ in 0..2_000 {
                    if idle.evict_one().is_some() {
                        evicted.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = idle.snapshot().len();
                }
            });
        });
        let mut left: Vec<u32> = idle.snapshot().iter().filter_map(value).collect();
        let n = left.len();
        left.sort_unstable();
        left.dedup();
        assert_eq!(left.len(), n, "no instance twice");
        assert_eq!(n + evicted.load(Ordering::Relaxed), 8_000);
        assert_eq!(counted(&idle), n);
    }
}
