//! The memory tier: whole objects (meta + body) in a TinyUFO cache bounded in bytes.
//!
//! TinyUFO gives scan-resistant admission (a one-off request does not push out the hot set)
//! and a hard weight bound. Its keys are `u64` and its weights `u16`, so entries are keyed by
//! the first 8 bytes of the 16-byte cache hash (the full hash is kept in the entry and checked
//! on read, so a truncated-hash collision is a miss, never a wrong object) and weighed in KiB.
//! An object above [`MAX_WEIGHT_KIB`] never enters memory; the disk tier holds it.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tinyufo::TinyUfo;

use super::Hash;
use crate::metrics::METRICS;

/// The largest object the memory tier holds (TinyUFO weights are u16 KiB units).
pub const MAX_WEIGHT_KIB: usize = u16::MAX as usize;

/// One cached object, immutable once built. Meta updates replace the entry.
pub struct MemEntry {
    pub hash: Hash,
    pub meta: (Bytes, Bytes),
    pub body: Bytes,
}

impl MemEntry {
    fn weight_kib(&self) -> usize {
        (self.body.len() + self.meta.0.len() + self.meta.1.len()).div_ceil(1024)
    }
}

pub struct MemoryTier {
    ufo: TinyUfo<u64, Arc<MemEntry>>,
    limit_kib: usize,
    max_object: usize,
    bytes: AtomicI64,
    objects: AtomicI64,
    #[cfg(test)]
    refuse: std::sync::atomic::AtomicBool,
}

fn short(h: &Hash) -> u64 {
    u64::from_le_bytes(h[..8].try_into().expect("8 bytes"))
}

impl MemoryTier {
    pub fn new(limit_bytes: u64) -> Self {
        let limit_kib = (limit_bytes / 1024).max(1) as usize;
        // TinyUFO sizes its internal tables from an estimate of the entry count.
        let estimated = (limit_kib / 16).clamp(64, 1 << 20);
        MemoryTier {
            ufo: TinyUfo::new(limit_kib, estimated),
            limit_kib,
            // One object may not take more than a quarter of the tier.
            max_object: (MAX_WEIGHT_KIB.min(limit_kib / 4) * 1024).max(1024),
            bytes: AtomicI64::new(0),
            objects: AtomicI64::new(0),
            #[cfg(test)]
            refuse: Default::default(),
        }
    }

    /// Objects larger than this (body bytes) are not admitted to memory.
    pub fn max_object(&self) -> usize {
        self.max_object
    }

    pub fn get(&self, h: &Hash) -> Option<Arc<MemEntry>> {
        self.ufo.get(&short(h)).filter(|e| &e.hash == h)
    }

    /// Inserts (or replaces) an entry. TinyUFO may refuse it (admission) or evict others;
    /// either way the byte bound holds. Returns whether the entry was taken (without counting
    /// an access to it, as a lookup would).
    pub fn put(&self, entry: MemEntry) -> bool {
        let weight = entry.weight_kib();
        if weight > MAX_WEIGHT_KIB || weight > self.limit_kib || entry.body.len() > self.max_object
        {
            return false;
        }
        #[cfg(test)]
        if self.refuse.load(Ordering::Relaxed) {
            return false;
        }
        let key = short(&entry.hash);
        self.remove(&entry.hash);
        let entry = Arc::new(entry);
        let size = entry_size(&entry);
        self.bytes.fetch_add(size, Ordering::Relaxed);
        self.objects.fetch_add(1, Ordering::Relaxed);
        let mut taken = true;
        for ev in self.ufo.put(key, entry.clone(), weight as u16) {
            taken &= !Arc::ptr_eq(&ev.data, &entry);
            self.bytes
                .fetch_sub(entry_size(&ev.data), Ordering::Relaxed);
            self.objects.fetch_sub(1, Ordering::Relaxed);
            METRICS.cache_evictions.with_label_values(&["memory"]).inc();
        }
        self.publish();
        taken
    }

    /// Makes every later `put` refuse its entry, as TinyUFO's admission may.
    #[cfg(test)]
    pub fn refuse_all(&self) {
        self.refuse.store(true, Ordering::Relaxed);
    }

    pub fn remove(&self, h: &Hash) -> bool {
        let key = short(h);
        match self.ufo.get(&key) {
            Some(e) if &e.hash == h => {
                if let Some(old) = self.ufo.remove(&key) {
                    self.bytes.fetch_sub(entry_size(&old), Ordering::Relaxed);
                    self.objects.fetch_sub(1, Ordering::Relaxed);
                    self.publish();
                }
                true
            }
            _ => false,
        }
    }

    pub fn contains(&self, h: &Hash) -> bool {
        self.get(h).is_some()
    }

    pub fn objects(&self) -> usize {
        self.objects.load(Ordering::Relaxed).max(0) as usize
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed).max(0) as u64
    }

    fn publish(&self) {
        METRICS
            .cache_bytes
            .with_label_values(&["memory"])
            .set(self.bytes() as f64);
        METRICS
            .cache_objects
            .with_label_values(&["memory"])
            .set(self.objects.load(Ordering::Relaxed).max(0) as f64);
    }
}

fn entry_size(e: &MemEntry) -> i64 {
    (e.body.len() + e.meta.0.len() + e.meta.1.len()) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u32, len: usize) -> MemEntry {
        let mut hash = [0u8; 16];
        hash[..4].copy_from_slice(&i.to_le_bytes());
        hash[15] = 1;
        MemEntry {
            hash,
            meta: (Bytes::from_static(b"m"), Bytes::new()),
            body: Bytes::from(vec![7u8; len]),
        }
    }

    #[test]
    fn bound_holds_after_writing_many_times_the_limit() {
        let tier = MemoryTier::new(1 << 20); // 1 MiB
        let mut refused = 0;
        for i in 0..3000 {
            let e = entry(i, 4096); // 3000 x 4 KiB = ~12 MiB written
            let h = e.hash;
            let taken = tier.put(e);
            assert_eq!(taken, tier.get(&h).is_some(), "put says what it did");
            refused += usize::from(!taken);
            assert!(tier.bytes() <= 1 << 20, "{} bytes after {i}", tier.bytes());
        }
        assert!(
            tier.bytes() > 512 * 1024,
            "the tier is used: {}",
            tier.bytes()
        );
        assert!(refused < 3000);
    }

    #[test]
    fn a_truncated_hash_collision_is_a_miss() {
        let tier = MemoryTier::new(1 << 20);
        let a = entry(1, 10);
        let mut other = a.hash;
        other[15] = 2; // same first 8 bytes, different full hash
        tier.put(a);
        assert!(tier.get(&other).is_none());
        assert!(!tier.remove(&other));
    }

    #[test]
    fn oversized_objects_stay_out() {
        let tier = MemoryTier::new(1 << 20);
        assert!(!tier.put(entry(1, 600 * 1024))); // more than a quarter of the tier
        assert_eq!(tier.bytes(), 0);
    }
}
