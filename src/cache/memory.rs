//! The memory tier: whole objects (meta + body) in a TinyUFO cache bounded in bytes.
//!
//! TinyUFO gives scan-resistant admission (a one-off request does not push out the hot set)
//! and a hard weight bound. Its keys are `u64` and its weights `u16`, so entries are keyed by
//! the first 8 bytes of the 16-byte cache hash (the full hash is kept in the entry and checked
//! on read, so a truncated-hash collision is a miss, never a wrong object) and weighed in KiB.
//! An object above [`MAX_WEIGHT_KIB`] never enters memory; the disk tier holds it.
//!
//! Bodies larger than one [`SEGMENT`] are stored as segments, each its own allocation, and
//! their hits hold them weakly between chunks (`storage::MemHit`): so when the tier lets go
//! of a body (evicts, replaces or removes it) while slow responses are still sending it, what
//! those responses pin is the segment each is writing, unless storage keeps the body for them
//! within its budget ([`MemoryTier::put`] and [`MemoryTier::remove`] hand over the bodies they
//! let go of). Without segments one slow client per evicted object pinned the whole object,
//! at will.

use std::sync::atomic::{fence, AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tinyufo::TinyUfo;

use super::Hash;
use crate::metrics::METRICS;

/// The largest object the memory tier holds (TinyUFO weights are u16 KiB units).
pub const MAX_WEIGHT_KIB: usize = u16::MAX as usize;

/// Bodies above this size are stored in segments of this size, one allocation each (a
/// multiple of the disk tier's block, so a promoted body is read and checked a segment at a
/// time). It is what one slow response can pin of a body the tier let go of and storage did
/// not keep, and the largest piece of a memory hit handed to the socket in one write.
pub const SEGMENT: usize = 256 * 1024;

/// A cached body, immutable: one buffer up to [`SEGMENT`] bytes, else segments of
/// [`SEGMENT`] bytes (the last one shorter), each its own allocation.
pub struct Body {
    segs: Box<[Bytes]>,
    len: usize,
    /// The tier has let go of it (set once, before hits' weak references are counted).
    let_go: AtomicBool,
}

impl Body {
    /// A body from its segments (each [`SEGMENT`] bytes but the last; one segment of any
    /// size up to it).
    pub fn from_segments(segs: Vec<Bytes>) -> Body {
        let len = segs.iter().map(Bytes::len).sum();
        debug_assert!(
            segs.len() <= 1 && len <= SEGMENT
                || segs.iter().rev().skip(1).all(|s| s.len() == SEGMENT),
            "segments of {SEGMENT} bytes"
        );
        let segs = segs.into_iter().filter(|s| !s.is_empty()).collect();
        Body {
            segs,
            len,
            let_go: AtomicBool::new(false),
        }
    }

    /// A body from the chunks a fill received (`len` bytes in all): a lone chunk that fits
    /// one segment is kept as it is, anything else is copied into segments.
    pub fn from_chunks(chunks: Vec<Bytes>, len: usize) -> Body {
        if chunks.len() <= 1 && len <= SEGMENT {
            return Body::from_segments(chunks);
        }
        let mut segs = Vec::with_capacity(len.div_ceil(SEGMENT));
        let mut seg: Vec<u8> = Vec::new();
        let mut left = len;
        for c in &chunks {
            let mut c = &c[..];
            while !c.is_empty() {
                if seg.capacity() == 0 {
                    seg = Vec::with_capacity(left.min(SEGMENT));
                }
                let n = c.len().min(seg.capacity() - seg.len());
                seg.extend_from_slice(&c[..n]);
                c = &c[n..];
                left -= n;
                if seg.len() == seg.capacity() {
                    segs.push(Bytes::from(std::mem::take(&mut seg)));
                }
            }
        }
        debug_assert!(seg.is_empty() && left == 0, "chunks add up to len");
        Body::from_segments(segs)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// More than one segment: its hits hold it weakly between chunks.
    pub fn is_segmented(&self) -> bool {
        self.segs.len() > 1
    }

    /// Bytes `from..to`, cut at the end of `from`'s segment (no copy). Empty when
    /// `from >= to`.
    pub fn chunk(&self, from: usize, to: usize) -> Bytes {
        let to = to.min(self.len);
        if from >= to {
            return Bytes::new();
        }
        let i = if self.segs.len() == 1 {
            0
        } else {
            from / SEGMENT
        };
        let base = i * SEGMENT;
        let seg = &self.segs[i];
        seg.slice(from - base..(to - base).min(seg.len()))
    }

    /// Whether the tier has let go of this body.
    pub fn is_let_go(&self) -> bool {
        self.let_go.load(Ordering::SeqCst)
    }

    /// The whole body, copied (tests).
    #[cfg(test)]
    pub fn to_vec(&self) -> Vec<u8> {
        self.segs.iter().flat_map(|s| s.iter().copied()).collect()
    }
}

/// The tier lets go of `entry`: its body is taken out of it (TinyUFO frees what it evicts or
/// removes late, see [`MemEntry`]), marked, and handed to `out`, unless `kept` (the entry
/// replacing it) holds it still. The caller keeps it for the hits that still read it (they
/// hold it weakly) or drops it, after its own locks (a large free is not quick). The fence
/// pairs with the one in a hit's making and ending (`storage::MemHit`): a hit's weak
/// reference is either counted after the mark or sees it.
fn let_go(entry: &MemEntry, kept: Option<&Arc<Body>>, out: &mut Vec<Arc<Body>>) {
    let Some(body) = entry.body.lock().take() else {
        return;
    };
    if kept.is_some_and(|k| Arc::ptr_eq(k, &body)) {
        return;
    }
    body.let_go.store(true, Ordering::SeqCst);
    fence(Ordering::SeqCst);
    out.push(body);
}

/// One cached object. Meta updates replace the entry (sharing its body).
///
/// The body is taken out when the tier lets go of the entry. TinyUFO's map (flurry) frees
/// the values it evicts or removes late, a batch of about a hundred per thread at a time
/// (seize's reclamation); holding bodies there, a tier of 8 objects of 512 KiB kept up to
/// 61 of them alive (`bodies_are_freed_when_the_tier_lets_go_of_them`). So what lingers is
/// the entry's shell and meta, not the body.
pub struct MemEntry {
    pub hash: Hash,
    pub meta: (Bytes, Bytes),
    /// The id of the disk-tier entry with the same bytes (the same fill, or the entry this
    /// one was promoted from), if there is one: where a hit whose body is let go of and not
    /// kept goes on from.
    pub disk_id: Option<u64>,
    body: Mutex<Option<Arc<Body>>>,
    len: usize,
}

impl MemEntry {
    pub fn new(hash: Hash, meta: (Bytes, Bytes), body: Arc<Body>, disk_id: Option<u64>) -> Self {
        MemEntry {
            hash,
            meta,
            disk_id,
            len: body.len(),
            body: Mutex::new(Some(body)),
        }
    }

    /// The body; `None` once the tier has let go of the entry (a lookup that raced its
    /// eviction: a miss).
    pub fn body(&self) -> Option<Arc<Body>> {
        self.body.lock().clone()
    }

    fn weight_kib(&self) -> usize {
        (self.len + self.meta.0.len() + self.meta.1.len()).div_ceil(1024)
    }
}

pub struct MemoryTier {
    ufo: TinyUfo<u64, Arc<MemEntry>>,
    limit_kib: usize,
    max_object: usize,
    bytes: AtomicI64,
    objects: AtomicI64,
    /// Puts and removals of a key are serialised, a stripe per key: TinyUFO replaces the
    /// value of a key it holds without reporting it, so the old entry is taken out first
    /// (and let go of) under the same lock.
    stripes: Box<[Mutex<()>]>,
    #[cfg(test)]
    refuse: std::sync::atomic::AtomicBool,
}

const STRIPES: usize = 64;

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
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            #[cfg(test)]
            refuse: Default::default(),
        }
    }

    fn stripe(&self, key: u64) -> &Mutex<()> {
        &self.stripes[(key % STRIPES as u64) as usize]
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
    /// an access to it, as a lookup would). Bodies it lets go of (replaced, evicted, or this
    /// one refused) are pushed to `let_go_of`. A body the tier has let go of already (a meta
    /// update that raced an eviction) is not put back.
    pub fn put(&self, entry: MemEntry, let_go_of: &mut Vec<Arc<Body>>) -> bool {
        let weight = entry.weight_kib();
        if weight > MAX_WEIGHT_KIB || weight > self.limit_kib || entry.len > self.max_object {
            return false;
        }
        #[cfg(test)]
        if self.refuse.load(Ordering::Relaxed) {
            return false;
        }
        let key = short(&entry.hash);
        let _k = self.stripe(key).lock();
        let Some(body) = entry.body().filter(|b| !b.is_let_go()) else {
            return false;
        };
        // Whatever holds the key goes: this object's older entry, or another object's
        // whose hash shares its first 8 bytes.
        self.displace(key, Some(&body), let_go_of);
        drop(body);
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
            let_go(&ev.data, None, let_go_of);
        }
        self.publish();
        taken
    }

    /// Makes every later `put` refuse its entry, as TinyUFO's admission may.
    #[cfg(test)]
    pub fn refuse_all(&self) {
        self.refuse.store(true, Ordering::Relaxed);
    }

    /// Removes an entry; its body is pushed to `let_go_of`.
    pub fn remove(&self, h: &Hash, let_go_of: &mut Vec<Arc<Body>>) -> bool {
        let key = short(h);
        let _k = self.stripe(key).lock();
        match self.ufo.get(&key) {
            Some(e) if &e.hash == h => {
                self.displace(key, None, let_go_of);
                true
            }
            _ => false,
        }
    }

    /// Takes out the entry holding `key`, if any, and lets go of it (its body to
    /// `let_go_of`, unless it is `kept`). Under the key's stripe.
    fn displace(&self, key: u64, kept: Option<&Arc<Body>>, let_go_of: &mut Vec<Arc<Body>>) {
        if let Some(old) = self.ufo.remove(&key) {
            self.bytes.fetch_sub(entry_size(&old), Ordering::Relaxed);
            self.objects.fetch_sub(1, Ordering::Relaxed);
            self.publish();
            let_go(&old, kept, let_go_of);
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
    (e.len + e.meta.0.len() + e.meta.1.len()) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u32, len: usize) -> MemEntry {
        let mut hash = [0u8; 16];
        hash[..4].copy_from_slice(&i.to_le_bytes());
        hash[15] = 1;
        let body = Arc::new(Body::from_chunks(vec![Bytes::from(vec![7u8; len])], len));
        MemEntry::new(hash, (Bytes::from_static(b"m"), Bytes::new()), body, None)
    }

    fn put(tier: &MemoryTier, e: MemEntry) -> bool {
        let mut let_go = Vec::new();
        let taken = tier.put(e, &mut let_go);
        // What the tier lets go of is marked, and, no hit reading it, freed with `let_go`.
        assert!(let_go
            .iter()
            .all(|b| b.is_let_go() && Arc::weak_count(b) == 0));
        taken
    }

    #[test]
    fn bound_holds_after_writing_many_times_the_limit() {
        let tier = MemoryTier::new(1 << 20); // 1 MiB
        let mut refused = 0;
        for i in 0..3000 {
            let e = entry(i, 4096); // 3000 x 4 KiB = ~12 MiB written
            let h = e.hash;
            let taken = put(&tier, e);
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
        let a_hash = a.hash;
        let mut other = a.hash;
        other[15] = 2; // same first 8 bytes, different full hash
        put(&tier, a);
        assert!(tier.get(&other).is_none());
        assert!(!tier.remove(&other, &mut Vec::new()));
        // The other object's entry takes the slot: the first is let go of, not lost silently
        // (TinyUFO would replace it without a word), and the accounting holds.
        let a_body = tier.get(&a_hash).unwrap().body().unwrap();
        let mut b = entry(1, 20);
        b.hash = other;
        let mut out = Vec::new();
        assert!(tier.put(b, &mut out));
        assert!(out.len() == 1 && Arc::ptr_eq(&out[0], &a_body) && a_body.is_let_go());
        assert!(tier.get(&a_hash).is_none() && tier.get(&other).is_some());
        assert_eq!((tier.objects(), tier.bytes()), (1, 21));
    }

    #[test]
    fn oversized_objects_stay_out() {
        let tier = MemoryTier::new(1 << 20);
        assert!(!put(&tier, entry(1, 600 * 1024))); // more than a quarter of the tier
        assert_eq!(tier.bytes(), 0);
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn bodies_are_cut_into_separate_segments_and_read_back_intact() {
        for len in [
            0,
            1,
            1000,
            SEGMENT,
            SEGMENT + 1,
            3 * SEGMENT - 5,
            4 * SEGMENT,
        ] {
            let data = pattern(len);
            // As a fill receives it: chunks of odd sizes, and as one chunk.
            for step in [1000, 65_536, 300_001, len.max(1)] {
                let chunks: Vec<Bytes> = data.chunks(step).map(Bytes::copy_from_slice).collect();
                let body = Body::from_chunks(chunks, len);
                assert_eq!(body.len(), len);
                assert_eq!(body.to_vec(), data, "len {len} step {step}");
                assert_eq!(body.is_segmented(), len > SEGMENT);
                assert_eq!(body.segs.len(), len.div_ceil(SEGMENT));
                for (i, s) in body.segs.iter().enumerate() {
                    if i + 1 < body.segs.len() {
                        assert_eq!(s.len(), SEGMENT);
                    }
                    // Each its own allocation, not a slice of a shared one: a chunk of one
                    // pins no other.
                    assert!(s.is_unique(), "segment {i} of {len} (step {step})");
                    for t in &body.segs[..i] {
                        // Separate allocations: a slice of one pins no other.
                        let (a, b) = (s.as_ptr() as usize, t.as_ptr() as usize);
                        assert!(a >= b + t.len() || b >= a + s.len());
                    }
                }
                // Chunks stop at segment ends and cover any range.
                for (from, to) in [(0, len), (1.min(len), len), (len / 2, len), (0, len / 3)] {
                    let mut got = Vec::new();
                    let mut pos = from;
                    while pos < to {
                        let c = body.chunk(pos, to);
                        assert!(!c.is_empty() && c.len() <= SEGMENT);
                        assert!(
                            pos / SEGMENT == (pos + c.len() - 1) / SEGMENT,
                            "within one segment"
                        );
                        pos += c.len();
                        got.extend_from_slice(&c);
                    }
                    assert_eq!(got, &data[from..to]);
                    assert!(body.chunk(to, to).is_empty());
                }
            }
        }
    }

    #[test]
    fn a_body_let_go_while_a_hit_holds_it_weakly_is_reported() {
        let tier = MemoryTier::new(1 << 30);
        let len = 3 * SEGMENT;
        let e = entry(1, len);
        let h = e.hash;
        let body = e.body().unwrap();
        assert!(put(&tier, e));
        let reader = Arc::downgrade(&body);
        // A meta update replaces the entry with the same body: not let go.
        let mut out = Vec::new();
        let meta = (Bytes::from_static(b"m2"), Bytes::new());
        let same = MemEntry::new(h, meta, body.clone(), None);
        assert!(tier.put(same, &mut out));
        assert!(out.is_empty() && !body.is_let_go());
        // Removed while a hit reads it: reported, and marked.
        assert!(tier.remove(&h, &mut out));
        assert_eq!(out.len(), 1);
        assert!(Arc::ptr_eq(&out[0], &body) && body.is_let_go());
        drop(reader);
        // Replaced by a new body: the old one is handed over, marked.
        let e = entry(2, len);
        let (h2, old) = (e.hash, e.body().unwrap());
        assert!(put(&tier, e));
        let mut out = Vec::new();
        assert!(tier.put(entry(2, len), &mut out));
        assert!(out.len() == 1 && Arc::ptr_eq(&out[0], &old) && old.is_let_go());
        assert!(!tier.get(&h2).unwrap().body().unwrap().is_let_go());
        // A body let go of is not put back (a meta update that raced its eviction).
        let again = MemEntry::new(h2, (Bytes::new(), Bytes::new()), old.clone(), None);
        assert!(!tier.put(again, &mut out));
        assert!(!Arc::ptr_eq(&tier.get(&h2).unwrap().body().unwrap(), &old));
    }

    #[test]
    fn bodies_evicted_under_readers_are_reported() {
        let tier = MemoryTier::new(4 << 20); // objects up to 1 MiB
        let mut readers = Vec::new();
        let mut out = Vec::new();
        for i in 0..64 {
            let e = entry(i, 512 * 1024);
            readers.push(Arc::downgrade(&e.body().unwrap()));
            tier.put(e, &mut out);
            let _ = tier.get(&entry(i, 0).hash); // a hit: worth keeping for TinyUFO
        }
        assert!(tier.bytes() <= 4 << 20);
        // Every body the tier no longer holds is reported once (TinyUFO refuses or evicts).
        let held: usize = (0..64)
            .filter(|i| tier.get(&entry(*i, 0).hash).is_some())
            .count();
        assert_eq!(out.len() + held, 64, "{} reported, {held} held", out.len());
        assert!(out.iter().all(|b| b.is_let_go()));
    }

    #[test]
    fn bodies_are_freed_when_the_tier_lets_go_of_them() {
        // TinyUFO frees evicted values in batches; the bodies must not wait for that.
        let tier = MemoryTier::new(4 << 20);
        let mut probes = Vec::new();
        let mut most = 0;
        for i in 0..400u32 {
            let e = entry(i, 512 * 1024);
            let h = e.hash;
            probes.push(Arc::downgrade(&e.body().unwrap()));
            // (The probes count as hits: what the tier reports is dropped.)
            tier.put(e, &mut Vec::new());
            let _ = tier.get(&h);
            let alive = probes.iter().filter(|p| p.strong_count() > 0).count();
            assert_eq!(
                alive,
                tier.objects(),
                "after {i}: bodies alive = objects held"
            );
            most = most.max(alive);
        }
        assert!(most <= 8, "{most}");
    }
}
