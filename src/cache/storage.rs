//! `TieredStorage`: cascade's pingora-cache `Storage` (memory tier over disk tier).
//!
//! Lookup: memory (inline: no I/O), then disk on the blocking pool; a disk hit small enough
//! for memory is read and checked whole and promoted, while the fill budget (below) can hold
//! it; any other disk hit streams one 64 KiB block at a time, read from the page cache on
//! the worker when it is there and on the blocking pool when it is not. So a slow client of
//! a disk hit holds one block; a body read whole is the memory tier's, or, declined by it,
//! counted in the budget until its response ends. A memory hit of a body over one segment
//! sends it a segment per chunk and holds it weakly after the first (`MemHit`): a body the
//! tier lets go of while slow responses still send it is kept for them within half the
//! budget (`TieredStorage::keep_let_go`), else freed, and those responses go on from the
//! disk tier's copy of the same bytes, or, with none, end early.
//!
//! Fill: the body streams to a disk temp file in batches written on the blocking pool (one
//! batch in flight while the next one fills), beside a memory copy while the object still
//! fits the memory tier; nothing is visible until `finish` commits it; a dropped miss
//! handler (client gone, origin failed) commits nothing. Purge removes an entry from both
//! tiers: the index at once, the files on the blocking pool. No disk I/O that can wait for
//! the disk runs on a proxy worker (see `disk.rs` for why).
//!
//! Bounds on fills: the bytes that fills hold in memory (memory copies and disk batches not
//! yet written) come out of one budget, `cache.fill_memory`; a fill that cannot get more
//! gives up its memory copy and writes its disk batches unbuffered (and with no disk tier
//! stores nothing). A disk hit read whole for promotion takes its size from the same budget
//! (only while the budget's use stays at most half of it: hits cannot starve fills) until
//! the memory tier has taken it, or, when the tier declines it, until its response ends;
//! so do bodies the memory tier let go of that are kept for their responses (the same half).
//! The client's response never waits on the budget. Temp files count against the disk
//! tier's size (`disk.rs`).
//!
//! Generations: every object with a fill in flight has a generation. `invalidate`,
//! `purge_prefix` and `purge` bump the generation of the objects they touch, and a fill
//! publishes (disk index insert, memory insert) only if the generation it started with is
//! still current, checked under the same lock as the bump; so a version fetched before a
//! write or a purge is never stored after it. Objects without a fill in flight have no entry.

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use pingora_cache::key::{CacheHashKey, CacheKey};
use pingora_cache::storage::{
    HandleHit, HandleMiss, HitHandler, MissFinishType, MissHandler, PurgeOutcome, PurgeTarget,
    PurgeType, Storage,
};
use pingora_cache::trace::SpanHandle;
use pingora_cache::CacheMeta;
use pingora_error::{Error, ErrorType, Result};
use tokio::task::JoinHandle;

use super::disk::{self, BodyReader, DiskTier, DiskWriter, LoadedBody};
use super::memory::{Body, MemEntry, MemoryTier, SEGMENT};
use super::Hash;
use crate::metrics::METRICS;

/// Disk hits up to this size that the memory tier may take are read whole (and checked) to
/// be promoted to it; larger ones stream, since reading one whole would delay its first byte.
pub const PROMOTE_UP_TO: u64 = 16 << 20;

/// A fill hands its disk writes to the blocking pool in batches of about this size.
pub const WRITE_BATCH: usize = 256 * 1024;

pub struct TieredStorage {
    pub memory: MemoryTier,
    pub disk: Option<DiskTier>,
    catalog: Mutex<Catalog>,
    /// Objects with fills in flight. Its lock also orders memory-tier writes by storage
    /// (fills, meta updates) against removals.
    fills: Mutex<Fills>,
    budget: FillBudget,
    /// Disk bodies up to this size are read whole on lookup even when they are not read for
    /// the memory tier (over the budget, too large for it): a streamed chunk is no smaller.
    small_whole: u64,
    /// Streamed disk hits read from the page cache on the worker when they can.
    cached_reads: bool,
    /// Segmented bodies the memory tier let go of while hits were sending them, kept whole
    /// for those hits (see [`TieredStorage::keep_let_go`]).
    kept: Mutex<Vec<Arc<Body>>>,
}

/// Object (`cache::object_key`: group and key) -> its stored entries (the whole object, its
/// slices). Lets a write invalidate every slice of an object and an operator purge by key prefix. Entries that both
/// tiers have since evicted are pruned in an amortised sweep, so the catalog stays
/// proportional to what is stored.
#[derive(Default)]
struct Catalog {
    objects: HashMap<Box<str>, HashSet<Hash>>,
    entries: usize,
}

impl Catalog {
    fn add(&mut self, primary: &str, h: Hash) {
        let object = super::object_of(primary);
        let set = match self.objects.get_mut(object) {
            Some(s) => s,
            None => self.objects.entry(object.into()).or_default(),
        };
        if set.insert(h) {
            self.entries += 1;
        }
    }
}

/// Fills in flight, by object: the object's generation and the entries being filled (one
/// per fill). An object's entry lives while it has fills in flight.
#[derive(Default)]
struct Fills {
    objects: HashMap<Box<str>, InFlight>,
}

impl Fills {
    /// The object's entry, made at generation 0 if it has none.
    fn entry(&mut self, object: &str) -> &mut InFlight {
        if !self.objects.contains_key(object) {
            let fresh = InFlight {
                gen: 0,
                hashes: Vec::new(),
                pending: 0,
            };
            self.objects.insert(object.into(), fresh);
        }
        self.objects.get_mut(object).expect("just made")
    }
}

struct InFlight {
    gen: u64,
    hashes: Vec<Hash>,
    /// Requests gone upstream for the object that have no fill yet ([`Ticket`]s).
    pending: usize,
}

/// A request's claim, taken when it goes upstream on a miss (or to revalidate), that what it
/// fetches is still the current version when it comes back: a write or a purge meanwhile bumps
/// the object's generation and the answer is not stored ([`Ticket::current`]). Closes the
/// window before a fill exists (the origin answered the request before the write, the answer
/// arrives after it). Dropped with the request.
pub struct Ticket {
    storage: &'static TieredStorage,
    object: Box<str>,
    gen: u64,
}

impl Ticket {
    /// No write or purge of the object since the ticket was taken.
    pub fn current(&self) -> bool {
        self.storage.is_current(&self.object, self.gen)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut f = self.storage.fills.lock();
        if let Some(e) = f.objects.get_mut(&*self.object) {
            e.pending = e.pending.saturating_sub(1);
            if e.pending == 0 && e.hashes.is_empty() {
                f.objects.remove(&*self.object);
            }
        }
    }
}

/// The bytes held in memory by fills in flight, bounded by `cache.fill_memory`.
pub struct FillBudget {
    limit: u64,
    used: AtomicU64,
}

impl FillBudget {
    pub fn new(limit: u64) -> Self {
        FillBudget {
            limit,
            used: AtomicU64::new(0),
        }
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes `n` if the use stays at most `ceiling` (at most the limit).
    fn try_take(&self, n: u64, ceiling: u64) -> bool {
        let ceiling = ceiling.min(self.limit);
        let taken = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                (u + n <= ceiling).then_some(u + n)
            });
        if taken.is_ok() {
            // Deltas, not the value: concurrent updates cannot leave a stale value behind.
            METRICS.cache_fill_memory.add(n as i64);
        }
        taken.is_ok()
    }

    fn give(&self, n: u64) {
        if n > 0 {
            self.used.fetch_sub(n, Ordering::Relaxed);
            METRICS.cache_fill_memory.sub(n as i64);
        }
    }
}

/// Bytes taken from the fill budget, given back on drop.
struct Held {
    budget: &'static FillBudget,
    n: u64,
}

impl Held {
    fn new(budget: &'static FillBudget) -> Self {
        Held { budget, n: 0 }
    }

    fn grow(&mut self, n: u64) -> bool {
        self.grow_below(n, self.budget.limit)
    }

    /// [`Held::grow`] only while the budget's use stays at most `ceiling`.
    fn grow_below(&mut self, n: u64, ceiling: u64) -> bool {
        let ok = self.budget.try_take(n, ceiling);
        if ok {
            self.n += n;
        }
        ok
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.give(self.n);
    }
}

fn io_err(e: std::io::Error) -> Box<Error> {
    Error::because(ErrorType::InternalError, "cache storage", e)
}

/// Runs blocking disk work on the blocking pool and waits for it.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::because(ErrorType::InternalError, "cache storage: blocking task", e))
}
/// A cache entry's meta as stored: pingora's internal part, and the response header as
/// pingora's header codec reads it (a zstd frame of HTTP/1 text), but written with stored
/// (uncompressed) blocks. Every hit decodes the header; entropy-decoding a zstd-compressed
/// one cost ~6% of the CPU of a 4 KiB hit, a stored block is a copy. Headers are a few
/// hundred bytes, so the space given up is small.
fn meta_bytes(meta: &CacheMeta) -> Result<(Bytes, Bytes)> {
    let (internal, _compressed) = meta.serialize()?;
    let mut text = Vec::with_capacity(512);
    let resp = meta.response_header();
    // The status line as pingora-header-serde writes it (h2 and others are stored as 1.1).
    text.extend_from_slice(if resp.version == http::Version::HTTP_10 {
        b"HTTP/1.0 "
    } else {
        b"HTTP/1.1 "
    });
    text.extend_from_slice(resp.status.as_str().as_bytes());
    text.push(b' ');
    text.extend_from_slice(resp.status.canonical_reason().unwrap_or("").as_bytes());
    text.extend_from_slice(b"\r\n");
    resp.header_to_h1_wire(&mut text);
    text.extend_from_slice(b"\r\n");
    Ok((Bytes::from(internal), Bytes::from(zstd_stored(&text))))
}

/// `data` as one zstd frame of raw blocks (RFC 8878 §3.1.1): magic, a single-segment frame
/// header with a 4-byte content size, then blocks of at most 128 KiB, the last one flagged.
fn zstd_stored(data: &[u8]) -> Vec<u8> {
    const MAX_BLOCK: usize = 128 * 1024;
    let mut out = Vec::with_capacity(data.len() + 16 + 3 * (data.len() / MAX_BLOCK));
    out.extend_from_slice(&0xFD2F_B528u32.to_le_bytes());
    out.push(0b1010_0000); // FCS_Field_Size flag 2 (4 bytes), Single_Segment, no checksum/dict
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    if data.is_empty() {
        out.extend_from_slice(&[1, 0, 0]); // last, raw, size 0
    }
    let n = data.len().div_ceil(MAX_BLOCK);
    for (i, block) in data.chunks(MAX_BLOCK).enumerate() {
        let last = u32::from(i + 1 == n);
        let head = last | ((block.len() as u32) << 3); // Block_Type 0 = raw
        out.extend_from_slice(&head.to_le_bytes()[..3]);
        out.extend_from_slice(block);
    }
    out
}

impl TieredStorage {
    /// `fill_memory`: the budget of bytes all fills in flight may hold in memory together.
    pub fn new(memory: MemoryTier, disk: Option<DiskTier>, fill_memory: u64) -> Self {
        let mut catalog = Catalog::default();
        if let Some(d) = &disk {
            for (h, key) in d.entries() {
                catalog.add(&key, h);
            }
        }
        TieredStorage {
            memory,
            disk,
            catalog: Mutex::new(catalog),
            fills: Mutex::new(Fills::default()),
            budget: FillBudget::new(fill_memory),
            small_whole: disk::BLOCK,
            cached_reads: true,
            kept: Mutex::new(Vec::new()),
        }
    }

    /// Bodies the memory tier let go of (evicted, replaced, purged): each one hits still hold
    /// weakly is kept whole, so its hits finish, if its size fits in the hits' half of the
    /// fill budget; one that does not fit is dropped here, and its hits go on from the disk
    /// tier's copy or end early (`cascade_cache_evicted_hits_total`), having pinned one
    /// segment each. (Before, a slow response pinned any body it had started, so slow
    /// clients of many large objects that the tier churned through held memory without
    /// bound.)
    ///
    /// Bodies no hit reads are freed here: call it once the tier's and the caller's locks
    /// are released.
    fn keep_let_go(&self, bodies: Vec<Arc<Body>>) {
        if bodies.is_empty() {
            return;
        }
        let mut freed = Vec::new();
        {
            let mut kept = self.kept.lock();
            self.sweep_locked(&mut kept, &mut freed);
            for b in bodies {
                if Arc::weak_count(&b) == 0 || kept.iter().any(|k| Arc::ptr_eq(k, &b)) {
                    freed.push(b);
                    continue;
                }
                let n = b.len() as u64;
                if self.budget.try_take(n, self.budget.limit / 2) {
                    METRICS.cache_evicted_in_use.add(n as i64);
                    kept.push(b);
                } else {
                    log::debug!(
                        "cache: an evicted body of {n} bytes is not kept for its hits (over the budget)"
                    );
                    freed.push(b);
                }
            }
        }
        drop(freed); // outside the lock
    }

    /// Lets go of kept bodies no hit reads any more.
    fn sweep_let_go(&self) {
        let mut freed = Vec::new();
        self.sweep_locked(&mut self.kept.lock(), &mut freed);
        drop(freed); // outside the lock
    }

    fn sweep_locked(&self, kept: &mut Vec<Arc<Body>>, freed: &mut Vec<Arc<Body>>) {
        let (read, gone) = std::mem::take(kept)
            .into_iter()
            .partition(|b| Arc::weak_count(b) > 0);
        *kept = read;
        for b in gone {
            let n = b.len() as u64;
            self.budget.give(n);
            METRICS.cache_evicted_in_use.sub(n as i64);
            freed.push(b);
        }
    }

    /// Bytes of let-go bodies kept for their hits.
    pub fn kept_bytes(&self) -> u64 {
        self.kept.lock().iter().map(|b| b.len() as u64).sum()
    }

    /// [`MemoryTier::remove`], keeping the body for hits that still send it.
    fn mem_remove(&self, h: &Hash) -> bool {
        let mut let_go = Vec::new();
        let removed = self.memory.remove(h, &mut let_go);
        self.keep_let_go(let_go);
        removed
    }

    /// Bytes fills in flight hold in memory now.
    pub fn fill_memory(&self) -> u64 {
        self.budget.used()
    }

    /// Objects with fills in flight (each has a generation entry).
    pub fn fills_in_flight(&self) -> usize {
        self.fills.lock().objects.len()
    }

    fn record(&self, primary: &str, combined: Hash) {
        let mut c = self.catalog.lock();
        c.add(primary, combined);
        let stored = self.memory.objects() + self.disk.as_ref().map_or(0, |d| d.objects());
        if c.entries > 2 * stored + 4096 {
            // Entries being filled are not stored yet but must stay findable.
            let filling: HashSet<Hash> = self
                .fills
                .lock()
                .objects
                .values()
                .flat_map(|f| f.hashes.iter().copied())
                .collect();
            let mut entries = 0;
            c.objects.retain(|_, set| {
                set.retain(|h| filling.contains(h) || self.has(h));
                entries += set.len();
                !set.is_empty()
            });
            c.entries = entries;
        }
    }

    /// A fill of `h` (an entry of `object`) starts: returns the object's generation.
    fn fill_begin(&self, object: &str, h: Hash) -> u64 {
        let mut f = self.fills.lock();
        let e = f.entry(object);
        e.hashes.push(h);
        e.gen
    }

    /// A [`Ticket`] for a request about to go upstream for `object`.
    pub fn ticket(&'static self, object: &str) -> Ticket {
        let mut f = self.fills.lock();
        let e = f.entry(object);
        e.pending += 1;
        Ticket {
            storage: self,
            object: object.into(),
            gen: e.gen,
        }
    }

    /// A fill of `h` ended (finished or dropped).
    fn fill_end(&self, object: &str, h: &Hash) {
        let mut f = self.fills.lock();
        if let Some(e) = f.objects.get_mut(object) {
            if let Some(i) = e.hashes.iter().position(|x| x == h) {
                e.hashes.swap_remove(i);
            }
            if e.hashes.is_empty() && e.pending == 0 {
                f.objects.remove(object);
            }
        }
    }

    /// Bumps the generation of every object with fills in flight that `hit` selects, so
    /// those fills are discarded at finish.
    fn bump(&self, hit: impl Fn(&str, &InFlight) -> bool) {
        for (object, e) in self.fills.lock().objects.iter_mut() {
            if hit(object, e) {
                e.gen += 1;
            }
        }
    }

    fn is_current(&self, object: &str, gen: u64) -> bool {
        self.fills
            .lock()
            .objects
            .get(object)
            .is_some_and(|e| e.gen == gen)
    }

    /// Runs `publish` if `object` is still at generation `gen`, atomically with respect to
    /// [`TieredStorage::bump`]; says whether it ran.
    fn publish_if(&self, object: &str, gen: u64, publish: &mut dyn FnMut()) -> bool {
        let f = self.fills.lock();
        let current = f.objects.get(object).is_some_and(|e| e.gen == gen);
        if current {
            publish();
        }
        current
    }

    /// Removes entries from both tiers (disk index first, so no lookup can promote one of
    /// them back into memory meanwhile); the disk files are unlinked on the blocking pool.
    /// Returns how many were stored in either tier.
    fn remove_all(&self, hs: &HashSet<Hash>) -> usize {
        if hs.is_empty() {
            return 0;
        }
        let on_disk: HashSet<Hash> = self
            .disk
            .as_ref()
            .map(|d| d.remove_many(hs).into_iter().collect())
            .unwrap_or_default();
        let mut let_go = Vec::new();
        let removed = {
            let _f = self.fills.lock();
            hs.iter()
                .filter(|h| self.memory.remove(h, &mut let_go) | on_disk.contains(*h))
                .count()
        };
        self.keep_let_go(let_go);
        removed
    }

    /// Removes every stored entry (the object and all its slices) of `object`
    /// (`cache::object_key(group, key)`), and makes fills of it in flight store nothing.
    /// Returns how many entries were removed. No I/O on the caller's thread.
    pub fn invalidate(&self, object: &str) -> usize {
        self.bump(|o, _| o == object);
        let mut all = self
            .catalog
            .lock()
            .objects
            .remove(object)
            .unwrap_or_default();
        all.insert(super::plain_entry(object).combined_bin());
        self.remove_all(&all)
    }

    /// Removes every object of `group` whose key starts with `key_prefix` (fills in flight of
    /// such objects store nothing); returns entries removed. No I/O on the caller's thread.
    pub fn purge_prefix(&self, group: &str, key_prefix: &str) -> usize {
        let matches = |o: &str| {
            super::parse_object(o).is_some_and(|(g, key)| g == group && key.starts_with(key_prefix))
        };
        self.bump(|o, _| matches(o));
        let victims: HashSet<Hash> = {
            let mut c = self.catalog.lock();
            let keys: Vec<Box<str>> = c.objects.keys().filter(|k| matches(k)).cloned().collect();
            keys.iter()
                .filter_map(|k| c.objects.remove(k))
                .flatten()
                .collect()
        };
        self.remove_all(&victims)
    }

    /// Whether either tier holds this entry (an index probe: no I/O).
    pub fn has(&self, h: &Hash) -> bool {
        self.memory.contains(h) || self.disk.as_ref().is_some_and(|d| d.contains(h))
    }

    /// Removes one entry from both tiers (no I/O on the caller's thread).
    pub fn remove(&self, h: &Hash) -> bool {
        self.remove_all(&HashSet::from([*h])) > 0
    }

    async fn lookup_hash(&'static self, h: Hash) -> Result<Option<(CacheMeta, HitHandler)>> {
        if let Some(e) = self.memory.get(&h) {
            // An entry without its body was let go of since `get` found it: not in memory.
            if let Some(body) = e.body() {
                let meta = CacheMeta::deserialize(&e.meta.0, &e.meta.1)?;
                let hit = MemHit::new(self, &body, h, e.disk_id);
                return Ok(Some((meta, Box::new(hit))));
            }
        }
        let Some(disk) = &self.disk else {
            return Ok(None);
        };
        if !disk.contains(&h) {
            return Ok(None); // a miss costs no trip to the blocking pool
        }
        // Read whole: a small body, or one the memory tier may take (to promote it) while the
        // budget holds it (`entry_size` counts the files, a little more than the body). Else
        // streamed, so a slow client holds a block, not the body.
        let size = disk.entry_size(&h).unwrap_or(u64::MAX);
        let promote = (self.memory.max_object() as u64).min(PROMOTE_UP_TO);
        let mut held = Held::new(&self.budget);
        // Hits take at most half the budget, so slow clients of bodies the memory tier
        // declines cannot take the fills' memory copies from them.
        let whole = if size <= promote + 64 * 1024 && held.grow_below(size, self.budget.limit / 2) {
            promote.max(self.small_whole) // the body's own length decides, in `load_into`
        } else {
            self.small_whole
        };
        // The buffers come from this (the worker's) allocator: see `read_all_into`. A body
        // read whole is read a memory-tier segment per buffer.
        let seg = SEGMENT as u64;
        let bufs = if held.n > 0 {
            (0..size.div_ceil(seg))
                .map(|i| Vec::with_capacity(seg.min(size - i * seg) as usize))
                .collect()
        } else {
            vec![Vec::with_capacity(disk::BLOCK as usize)]
        };
        let d = disk.clone();
        let Some(found) = blocking(move || d.load_into(&h, whole, seg, bufs)).await? else {
            return Ok(None);
        };
        let meta = match CacheMeta::deserialize(&found.meta.0, &found.meta.1) {
            Ok(m) => m,
            Err(e) => {
                log::warn!("cache: removing entry with unreadable meta: {e}");
                disk.drop_entry_later(h, found.id);
                return Ok(None);
            }
        };
        match found.body {
            LoadedBody::Whole(segs) => {
                let body = Arc::new(Body::from_segments(segs));
                let mut taken = false;
                let mut let_go = Vec::new();
                if body.len() <= self.memory.max_object() {
                    // Only if it is still the indexed entry: a purge since the read wins.
                    let entry = MemEntry::new(h, found.meta, body.clone(), Some(found.id));
                    disk.if_current(&h, found.id, || taken = self.memory.put(entry, &mut let_go));
                }
                // Taken by the memory tier, the body is counted there (and held weakly by
                // this hit, as any memory hit; its budget share is free for what the put let
                // go of); declined, it is this response's alone and keeps its share of the
                // budget until the response ends.
                let hit = if taken {
                    drop(held);
                    MemHit::new(self, &body, h, Some(found.id))
                } else {
                    MemHit::owning(self, body, h, held)
                };
                self.keep_let_go(let_go);
                Ok(Some((meta, Box::new(hit))))
            }
            LoadedBody::Stream(mut r) => {
                r.set_cached_reads(self.cached_reads);
                Ok(Some((meta, Box::new(DiskHit(Some(r))))))
            }
        }
    }
}

#[async_trait]
impl Storage for TieredStorage {
    async fn lookup(
        &'static self,
        key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        self.lookup_hash(key.combined_bin()).await
    }

    async fn get_miss_handler(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<MissHandler> {
        let hash = key.combined_bin();
        let meta = meta_bytes(meta)?;
        let key_str = String::from_utf8_lossy(key.primary_key()).into_owned();
        // In the catalog from the start, so an invalidation of the object finds this entry.
        self.record(&key_str, hash);
        let gen = self.fill_begin(super::object_of(&key_str), hash);
        let disk = self.disk.as_ref().map(|d| {
            let writer = d.writer(hash, &key_str, meta.clone());
            DiskFill {
                id: writer.id(),
                writer: Some(writer),
                busy: None,
                batch: Vec::new(),
                batch_len: 0,
                held: Held::new(&self.budget),
            }
        });
        Ok(Box::new(Fill {
            storage: self,
            hash,
            key: key_str,
            gen,
            meta,
            mem: Some((Vec::new(), Held::new(&self.budget))),
            len: 0,
            disk,
            disk_lost: false,
            finished: false,
        }))
    }

    async fn purge(
        &'static self,
        target: PurgeTarget<'_>,
        _purge_type: PurgeType,
        _trace: &SpanHandle,
    ) -> Result<PurgeOutcome> {
        let h = target.key().combined_bin();
        self.bump(|_, e| e.hashes.contains(&h));
        Ok(if self.remove(&h) {
            PurgeOutcome::Purged(None)
        } else {
            PurgeOutcome::NotFound
        })
    }

    async fn update_meta(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<bool> {
        let h = key.combined_bin();
        let raw = meta_bytes(meta)?;
        let mut updated = false;
        let mut let_go = Vec::new();
        {
            let _f = self.fills.lock(); // ordered against removals (see `remove_all`)
            if let Some(e) = self.memory.get(&h) {
                if let Some(body) = e.body() {
                    // The disk entry's meta is replaced below; its id (its bytes) stays.
                    let entry = MemEntry::new(h, raw.clone(), body, e.disk_id);
                    updated = self.memory.put(entry, &mut let_go);
                }
            }
        }
        self.keep_let_go(let_go);
        if let Some(d) = &self.disk {
            if d.contains(&h) {
                let d = d.clone();
                updated |= blocking(move || d.update_meta(&h, raw))
                    .await?
                    .map_err(io_err)?;
            }
        }
        Ok(updated)
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync + 'static) {
        self
    }
}

/// A hit served from memory (or from a disk file read whole and checked).
///
/// A body of one segment is held for the whole response, as before: its one chunk holds it
/// while it is written anyway. A segmented body is held until its first chunk, then weakly:
/// each chunk (at most a segment) holds it only while it is sliced, so a response whose body
/// the tier lets go of pins the segment it is writing, no more, unless storage keeps the
/// body for it ([`TieredStorage::keep_let_go`]). When nothing holds the body any more, the
/// response goes on from the disk tier's copy of the same bytes (the entry's `disk_id`),
/// streamed as a disk hit; with no such copy it ends early.
struct MemHit {
    storage: &'static TieredStorage,
    /// Until the first chunk, or all along (`own`).
    strong: Option<Arc<Body>>,
    /// A segmented body from the memory tier (else empty).
    weak: Weak<Body>,
    /// `strong` is held all along: a body of one segment, or one this response owns.
    own: bool,
    len: usize,
    /// The rest of the range to send.
    pos: usize,
    end: usize,
    hash: Hash,
    /// The disk-tier entry with the same bytes, if any.
    disk_id: Option<u64>,
    /// Gone on from the disk tier's copy: its reader (`None` after a failed read).
    from_disk: Option<Option<BodyReader>>,
    /// A disk body read whole that the memory tier declined: its share of the fill budget,
    /// given back when the response ends.
    _held: Option<Held>,
}

impl MemHit {
    /// A hit of a body the memory tier holds (entry `hash`; `disk_id`: see [`MemEntry`]).
    fn new(
        storage: &'static TieredStorage,
        body: &Arc<Body>,
        hash: Hash,
        disk_id: Option<u64>,
    ) -> Self {
        let segmented = body.is_segmented();
        let weak = if segmented {
            let w = Arc::downgrade(body);
            // Pairs with the fence in `memory::let_go`: either the tier counted this hit's
            // reference when it let go of the body, or this sees its mark and asks for it to
            // be kept, as the tier would have.
            fence(Ordering::SeqCst);
            if body.is_let_go() {
                storage.keep_let_go(vec![body.clone()]);
            }
            w
        } else {
            Weak::new()
        };
        MemHit {
            storage,
            strong: Some(body.clone()),
            weak,
            own: !segmented,
            len: body.len(),
            pos: 0,
            end: body.len(),
            hash,
            disk_id,
            from_disk: None,
            _held: None,
        }
    }

    /// A hit of a body read whole from disk that the memory tier declined: this response's
    /// own, with its share of the fill budget.
    fn owning(storage: &'static TieredStorage, body: Arc<Body>, hash: Hash, held: Held) -> Self {
        let len = body.len();
        MemHit {
            storage,
            strong: Some(body),
            weak: Weak::new(),
            own: true,
            len,
            pos: 0,
            end: len,
            hash,
            disk_id: None,
            from_disk: None,
            _held: Some(held),
        }
    }

    /// The body is gone: a reader of the rest of the range from the disk tier's copy of the
    /// same bytes, if it still has it (opened on the blocking pool).
    async fn open_disk_copy(&self) -> Result<Option<BodyReader>> {
        let (Some(id), Some(disk)) = (self.disk_id, &self.storage.disk) else {
            return Ok(None);
        };
        let (d, h, from, to) = (disk.clone(), self.hash, self.pos as u64, self.end as u64);
        let mut r = blocking(move || d.reader_at(&h, id, from, to)).await?;
        if let Some(r) = r.as_mut() {
            r.set_cached_reads(self.storage.cached_reads);
        }
        Ok(r)
    }
}

#[async_trait]
impl HandleHit for MemHit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        if let Some(slot) = self.from_disk.as_mut() {
            return disk_chunk(slot).await;
        }
        if self.pos >= self.end {
            return Ok(None);
        }
        let chunk = match &self.strong {
            Some(b) if self.own => b.chunk(self.pos, self.end),
            _ => match self.strong.take().or_else(|| self.weak.upgrade()) {
                Some(b) => b.chunk(self.pos, self.end),
                None => {
                    let Some(r) = self.open_disk_copy().await? else {
                        METRICS.cache_evicted_hits[1].inc();
                        self.from_disk = Some(None); // no retry (and no second count) on a seek
                        return Error::e_explain(
                            ErrorType::InternalError,
                            "the memory tier let go of this body while it was being sent, keeping it would pass half of cache.fill_memory, and the disk tier has no copy of it",
                        );
                    };
                    METRICS.cache_evicted_hits[0].inc();
                    self.weak = Weak::new();
                    return disk_chunk(self.from_disk.insert(Some(r))).await;
                }
            },
        };
        self.pos += chunk.len();
        Ok(Some(chunk))
    }

    async fn finish(
        self: Box<Self>,
        _storage: &'static (dyn Storage + Sync),
        _key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<()> {
        Ok(())
    }

    fn can_seek(&self) -> bool {
        true
    }

    fn seek(&mut self, start: usize, end: Option<usize>) -> Result<()> {
        if let Some(slot) = self.from_disk.as_mut() {
            let Some(r) = slot.as_mut() else {
                return Error::e_explain(ErrorType::InternalError, "cache read failed earlier");
            };
            return r.seek(start as u64, end.map(|e| e as u64)).map_err(io_err);
        }
        let end = end.unwrap_or(self.len).min(self.len);
        if start > end {
            return Error::e_explain(ErrorType::InternalError, "seek out of range");
        }
        self.pos = start;
        self.end = end;
        Ok(())
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
}

impl Drop for MemHit {
    fn drop(&mut self) {
        if let Some(Some(r)) = self.from_disk.take() {
            disk::offload(move || drop(r)); // closes the file off the worker
        }
        if self.own {
            return;
        }
        self.strong = None;
        if let Some(b) = self.weak.upgrade() {
            self.weak = Weak::new();
            // Pairs with the fence in `memory::let_go`: either the tier's keeping sees this
            // reference gone, or this sees the mark and sweeps after it.
            fence(Ordering::SeqCst);
            let let_go = b.is_let_go();
            drop(b);
            if let_go {
                // This may have been the body's last hit: give back what keeping it held.
                self.storage.sweep_let_go();
            }
        }
    }
}

/// The next chunk of the disk body `slot` streams: from the page cache on the worker when it
/// is there ([`BodyReader::next_chunk_cached`]), else by a trip to the blocking pool. `slot`
/// is `None` only after a failed trip (the reader was lost with it).
async fn disk_chunk(slot: &mut Option<BodyReader>) -> Result<Option<Bytes>> {
    let Some(r) = slot.as_mut() else {
        return Error::e_explain(ErrorType::InternalError, "cache read failed earlier");
    };
    // Allocated when a read is tried, on this (the worker's) allocator, which frees it:
    // see `read_all_into`.
    let mut buf = Vec::new();
    if let Some(chunk) = r.next_chunk_cached(&mut buf) {
        return chunk.map_err(io_err);
    }
    buf.reserve_exact((disk::READ_BLOCKS * disk::BLOCK) as usize);
    let mut r = slot.take().expect("checked above");
    let (r, chunk) = blocking(move || {
        let chunk = r.next_chunk_into(buf);
        (r, chunk)
    })
    .await?;
    *slot = Some(r);
    chunk.map_err(io_err)
}

/// An object streamed from its disk file, a block at a time ([`disk::READ_BLOCKS`]): from
/// the page cache on the worker when it is there ([`BodyReader::next_chunk_cached`]), else
/// by a trip to the blocking pool. `None` only after a failed trip (the reader was lost
/// with it).
struct DiskHit(Option<BodyReader>);

#[async_trait]
impl HandleHit for DiskHit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        disk_chunk(&mut self.0).await
    }

    async fn finish(
        self: Box<Self>,
        _storage: &'static (dyn Storage + Sync),
        _key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<()> {
        Ok(())
    }

    fn can_seek(&self) -> bool {
        true
    }

    fn seek(&mut self, start: usize, end: Option<usize>) -> Result<()> {
        let Some(r) = self.0.as_mut() else {
            return Error::e_explain(ErrorType::InternalError, "cache read failed earlier");
        };
        r.seek(start as u64, end.map(|e| e as u64)).map_err(io_err)
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
}

impl Drop for DiskHit {
    fn drop(&mut self) {
        if let Some(r) = self.0.take() {
            disk::offload(move || drop(r)); // closes the file off the worker
        }
    }
}

/// The disk part of a fill: a writer, at most one batch being written on the blocking pool,
/// and the next batch filling up.
struct DiskFill {
    /// `None` while a batch is being written (`busy`).
    writer: Option<DiskWriter>,
    busy: Option<JoinHandle<(DiskWriter, io::Result<()>)>>,
    batch: Vec<Bytes>,
    batch_len: usize,
    /// The budget the batch holds.
    held: Held,
    /// The entry's id once committed ([`DiskWriter::id`]).
    id: u64,
}

impl DiskFill {
    async fn push(&mut self, data: Bytes) -> io::Result<()> {
        let n = data.len();
        let buffered = self.held.grow(n as u64);
        self.batch.push(data);
        self.batch_len += n;
        if !buffered {
            // The fills' budget is spent: hold nothing past this call.
            self.flush().await?;
            return self.wait().await;
        }
        if self.batch_len >= WRITE_BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    /// Hands the batch to the blocking pool, once the previous one is written.
    async fn flush(&mut self) -> io::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        self.wait().await?;
        let mut w = self.writer.take().expect("idle after wait");
        let batch = std::mem::take(&mut self.batch);
        let budget = self.held.budget;
        let held = std::mem::replace(&mut self.held, Held::new(budget));
        self.batch_len = 0;
        self.busy = Some(tokio::task::spawn_blocking(move || {
            let written = w.write_batch(&batch);
            drop((batch, held)); // the budget comes back with the memory
            (w, written)
        }));
        Ok(())
    }

    async fn wait(&mut self) -> io::Result<()> {
        if let Some(job) = self.busy.take() {
            let (w, written) = job.await.map_err(io::Error::other)?;
            self.writer = Some(w);
            written?;
        }
        Ok(())
    }

    /// Writes what is left; returns the writer, ready to commit.
    async fn close(mut self) -> io::Result<DiskWriter> {
        self.flush().await?;
        self.wait().await?;
        Ok(self.writer.take().expect("idle after wait"))
    }
}

/// One fill in progress. Nothing is visible to readers until `finish`.
struct Fill {
    storage: &'static TieredStorage,
    hash: Hash,
    key: String,
    /// The object's generation when the fill began.
    gen: u64,
    meta: (Bytes, Bytes),
    /// Body chunks while the object still fits the memory tier and the fill budget.
    mem: Option<(Vec<Bytes>, Held)>,
    /// Body bytes received.
    len: usize,
    disk: Option<DiskFill>,
    /// The disk part failed or was abandoned.
    disk_lost: bool,
    finished: bool,
}

impl Fill {
    fn lose_disk(&mut self, e: io::Error) {
        // Disk full or failing: keep serving the client, cache nothing on disk.
        if e.kind() == io::ErrorKind::StorageFull {
            log::debug!("cache: fill not cached on disk: {e}");
        } else {
            log::warn!("cache: disk write failed, object not cached on disk: {e}");
        }
        METRICS.cache_fill_errors.inc();
        self.disk = None; // the writer's Drop removes the temp file, off the worker
        self.disk_lost = true;
        if self.mem.is_none() {
            log::debug!("cache: fill of {} stores nothing", super::hex(&self.hash));
        }
    }
}

#[async_trait]
impl HandleMiss for Fill {
    async fn write_body(&mut self, data: Bytes, _eof: bool) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let n = data.len();
        self.len += n;
        if let Some((chunks, held)) = self.mem.as_mut() {
            if self.len > self.storage.memory.max_object() {
                self.mem = None;
            } else if held.grow(n as u64) {
                chunks.push(data.clone());
            } else {
                // The fills' shared budget is spent: no memory copy for this one.
                self.mem = None;
                if self.disk.is_none() && !self.disk_lost {
                    // Nothing will be stored (no disk tier).
                    METRICS.cache_fill_errors.inc();
                }
            }
        }
        if let Some(d) = self.disk.as_mut() {
            if let Err(e) = d.push(data).await {
                self.lose_disk(e);
            }
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<MissFinishType> {
        self.finished = true;
        let st = self.storage;
        let (hash, gen) = (self.hash, self.gen);
        let object: Box<str> = super::object_of(&self.key).into();
        let mut refused = !st.is_current(&object, gen);
        if refused {
            // Written or purged since the fill began: store nothing.
            self.mem = None;
            self.disk = None;
        }
        let mut disk_id = None;
        if let Some(d) = self.disk.take() {
            let id = d.id;
            let tier = st.disk.clone().expect("a disk part needs a disk tier");
            let obj = object.clone();
            let committed = match d.close().await {
                Ok(w) => blocking(move || tier.finish(w, &|p| st.publish_if(&obj, gen, p)))
                    .await
                    .unwrap_or_else(|e| Err(io::Error::other(e))),
                Err(e) => Err(e),
            };
            match committed {
                Ok(Some(_)) => disk_id = Some(id),
                Ok(None) => refused = true,
                Err(e) => {
                    if e.kind() == io::ErrorKind::StorageFull {
                        log::debug!("cache: object not cached on disk: {e}");
                    } else {
                        log::warn!("cache: cannot commit object to disk: {e}");
                    }
                    METRICS.cache_fill_errors.inc();
                    self.disk_lost = true;
                }
            }
        }
        if self.disk_lost {
            // The old version must not outlive the new one in the other tier.
            if let Some(d) = &st.disk {
                d.remove(&hash);
            }
        }
        if let Some((chunks, held)) = self.mem.take() {
            let body = Arc::new(Body::from_chunks(chunks, self.len));
            // The copy is the body now, the tier's (or gone) once put: its share of the budget
            // is free for what the put lets go of.
            drop(held);
            let mut entry = Some(MemEntry::new(hash, self.meta.clone(), body, disk_id));
            let mut let_go = Vec::new();
            let put = &mut || {
                st.memory
                    .put(entry.take().expect("published once"), &mut let_go);
            };
            if !st.publish_if(&object, gen, put) {
                refused = true;
            }
            st.keep_let_go(let_go); // after publish_if's lock
        } else if !refused {
            // Stale copies of a key must not outlive its replacement in the other tier.
            st.mem_remove(&hash);
        }
        if refused {
            log::debug!(
                "cache: fill of {} discarded: the object was written or purged meanwhile",
                super::hex(&hash)
            );
            METRICS.cache_fills_discarded.inc();
            return Ok(MissFinishType::Created(0));
        }
        Ok(MissFinishType::Created(self.len))
    }
}

impl Drop for Fill {
    fn drop(&mut self) {
        self.storage
            .fill_end(super::object_of(&self.key), &self.hash);
        if !self.finished {
            // The DiskWriter's own Drop removes the temp file (off the worker).
            METRICS.cache_fill_errors.inc();
        }
    }
}

/// Builds the process-wide storage. Leaked: pingora-cache wants `&'static`.
pub fn leak(storage: TieredStorage) -> &'static TieredStorage {
    Box::leak(Box::new(storage))
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn f<T: Send + Sync>() {}
    f::<Arc<TieredStorage>>();
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora_http::ResponseHeader;
    use std::time::{Duration, SystemTime};

    #[test]
    fn stored_meta_round_trips_through_pingoras_decoder() {
        let mut h = ResponseHeader::build(206, None).unwrap();
        h.append_header("Content-Type", "video/mp4").unwrap();
        h.append_header("x-served-from", "prod").unwrap();
        h.append_header("set-cookie", "a=1").unwrap();
        h.append_header("set-cookie", "b=2").unwrap();
        h.append_header("etag", "\"abc\"").unwrap();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let meta = CacheMeta::new(now + Duration::from_secs(60), now, 5, 7, h);
        let (internal, header) = meta_bytes(&meta).unwrap();
        assert_eq!(&header[..4], &0xFD2F_B528u32.to_le_bytes());
        let back = CacheMeta::deserialize(&internal, &header).unwrap();
        let r = back.response_header();
        assert_eq!(r.status.as_u16(), 206);
        assert_eq!(r.headers.get("content-type").unwrap(), "video/mp4");
        assert_eq!(r.headers.get_all("set-cookie").iter().count(), 2);
        assert_eq!(back.fresh_until(), meta.fresh_until());
        assert_eq!(back.stale_if_error_sec(), 7);
        // pingora's own (compressed) encoding still reads: old disk entries stay valid.
        let (i2, h2) = meta.serialize().unwrap();
        let old = CacheMeta::deserialize(&i2, &h2).unwrap();
        assert_eq!(old.response_header().headers.len(), r.headers.len());
    }

    #[test]
    fn stored_frames_are_split_into_blocks() {
        let data = vec![b'x'; 300 * 1024];
        let f = zstd_stored(&data);
        assert_eq!(f.len(), data.len() + 4 + 1 + 4 + 3 * 3);
        assert_eq!(zstd_stored(&[]), {
            let mut v = 0xFD2F_B528u32.to_le_bytes().to_vec();
            v.extend_from_slice(&[0xA0, 0, 0, 0, 0, 1, 0, 0]);
            v
        });
    }

    // ---- fills, budget, generations, disk hits through the Storage API ----

    use crate::cache::{cache_key, object_key};
    use pingora_cache::trace::Span;
    use std::path::Path;

    fn span() -> SpanHandle {
        Span::inactive().handle()
    }

    fn new_storage(memory: u64, disk: Option<(&Path, u64)>, fill_memory: u64) -> TieredStorage {
        TieredStorage::new(
            MemoryTier::new(memory),
            disk.map(|(p, size)| DiskTier::open(p, size).unwrap()),
            fill_memory,
        )
    }

    fn meta() -> CacheMeta {
        let now = SystemTime::now();
        let h = ResponseHeader::build(200, None).unwrap();
        CacheMeta::new(now + Duration::from_secs(600), now, 0, 0, h)
    }

    fn body(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    async fn fill_all(st: &'static TieredStorage, key: &CacheKey, data: &[u8]) -> MissFinishType {
        let mut m = st.get_miss_handler(key, &meta(), &span()).await.unwrap();
        for c in data.chunks(64 * 1024) {
            m.write_body(Bytes::copy_from_slice(c), false)
                .await
                .unwrap();
        }
        m.finish().await.unwrap()
    }

    async fn read(st: &'static TieredStorage, key: &CacheKey) -> Option<Vec<u8>> {
        let (_, mut hit) = st.lookup(key, &span()).await.unwrap()?;
        let mut out = Vec::new();
        while let Some(b) = hit.read_body().await.unwrap() {
            out.extend_from_slice(&b);
        }
        Some(out)
    }

    fn files(p: &Path) -> usize {
        std::fs::read_dir(p)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                if e.file_type().unwrap().is_dir() {
                    files(&e.path())
                } else {
                    1
                }
            })
            .sum()
    }

    /// Waits (bounded) for the unlinks handed to the blocking pool.
    async fn settle(dir: &Path, want_files: usize) -> usize {
        for _ in 0..1000 {
            if files(dir) == want_files {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        files(dir)
    }

    fn created(t: MissFinishType) -> usize {
        match t {
            MissFinishType::Created(n) => n,
            MissFinishType::Appended(..) => panic!("appended"),
        }
    }

    #[tokio::test]
    async fn fills_share_one_memory_budget() {
        // No disk tier: a fill that cannot keep its memory copy stores nothing.
        let st = leak(new_storage(64 << 20, None, 1 << 20));
        let keys: Vec<CacheKey> = (0..4)
            .map(|i| cache_key("g", &format!("o{i}"), None, None))
            .collect();
        let bodies: Vec<Vec<u8>> = (0..4).map(|i| body(i, 512 * 1024)).collect();
        let mut fills = Vec::new();
        for k in &keys {
            fills.push(st.get_miss_handler(k, &meta(), &span()).await.unwrap());
        }
        let errors = METRICS.cache_fill_errors.get();
        // 4 x 512 KiB arriving together: twice the 1 MiB budget.
        for off in (0..512 * 1024).step_by(64 * 1024) {
            for (f, b) in fills.iter_mut().zip(&bodies) {
                f.write_body(Bytes::copy_from_slice(&b[off..off + 64 * 1024]), false)
                    .await
                    .unwrap();
                assert!(st.fill_memory() <= 1 << 20, "{}", st.fill_memory());
            }
        }
        assert!(st.fill_memory() > 0);
        for f in fills {
            assert_eq!(created(f.finish().await.unwrap()), 512 * 1024);
        }
        assert_eq!(st.fill_memory(), 0, "every byte given back");
        let mut stored = 0;
        for (k, b) in keys.iter().zip(&bodies) {
            if let Some(got) = read(st, k).await {
                assert_eq!(&got, b);
                stored += 1;
            }
        }
        assert!((1..4).contains(&stored), "{stored} of 4 stored");
        assert!(METRICS.cache_fill_errors.get() >= errors + (4 - stored) as u64);
    }

    #[tokio::test]
    async fn over_budget_fills_still_complete_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let st = leak(new_storage(1 << 20, Some((dir.path(), 64 << 20)), 1 << 20));
        let keys: Vec<CacheKey> = (0..4)
            .map(|i| cache_key("g", &format!("d{i}"), None, None))
            .collect();
        let bodies: Vec<Vec<u8>> = (0..4).map(|i| body(i, 2 << 20)).collect();
        let mut fills = Vec::new();
        for k in &keys {
            fills.push(st.get_miss_handler(k, &meta(), &span()).await.unwrap());
        }
        for off in (0..2 << 20).step_by(64 * 1024) {
            for (f, b) in fills.iter_mut().zip(&bodies) {
                f.write_body(Bytes::copy_from_slice(&b[off..off + 64 * 1024]), false)
                    .await
                    .unwrap();
                assert!(st.fill_memory() <= 1 << 20, "{}", st.fill_memory());
            }
        }
        for f in fills {
            f.finish().await.unwrap();
        }
        assert_eq!(st.fill_memory(), 0);
        for (k, b) in keys.iter().zip(&bodies) {
            assert!(
                !st.memory.contains(&k.combined_bin()),
                "too large for memory"
            );
            assert_eq!(read(st, k).await.as_ref(), Some(b), "complete on disk");
        }
    }

    #[tokio::test]
    async fn a_fill_begun_before_an_invalidation_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let st = leak(new_storage(
            16 << 20,
            Some((dir.path(), 64 << 20)),
            16 << 20,
        ));
        let discarded = METRICS.cache_fills_discarded.get();
        let k = cache_key("g", "a.bin", None, None);
        let old = body(1, 300 * 1024);
        // The first fill of an object (nothing stored yet), then a write invalidates it.
        let mut m = st.get_miss_handler(&k, &meta(), &span()).await.unwrap();
        m.write_body(Bytes::copy_from_slice(&old[..100_000]), false)
            .await
            .unwrap();
        assert_eq!(
            st.invalidate(&object_key("g", "a.bin")),
            0,
            "nothing stored"
        );
        m.write_body(Bytes::copy_from_slice(&old[100_000..]), false)
            .await
            .unwrap();
        assert_eq!(created(m.finish().await.unwrap()), 0);
        assert_eq!(read(st, &k).await, None, "the old version is not stored");
        assert!(!st.has(&k.combined_bin()));
        assert_eq!(settle(dir.path(), 0).await, 0, "no file left");
        assert_eq!(METRICS.cache_fills_discarded.get(), discarded + 1);
        assert_eq!(st.fills_in_flight(), 0, "no generation kept without fills");
        // A fill begun after the invalidation is stored.
        let new = body(2, 300 * 1024);
        assert_eq!(created(fill_all(st, &k, &new).await), new.len());
        assert_eq!(read(st, &k).await, Some(new.clone()));

        // An expired entry being refreshed while a purge by prefix removes it: the refresh
        // stores nothing either, and the old copy is gone from both tiers.
        let mut m = st.get_miss_handler(&k, &meta(), &span()).await.unwrap();
        m.write_body(Bytes::from(body(3, 1000)), false)
            .await
            .unwrap();
        // A fill of another object in flight at the same time is not affected.
        let other = cache_key("h", "a.bin", None, None);
        let mut o = st.get_miss_handler(&other, &meta(), &span()).await.unwrap();
        o.write_body(Bytes::from_static(b"other"), false)
            .await
            .unwrap();
        assert_eq!(st.purge_prefix("g", "a"), 1);
        assert_eq!(created(m.finish().await.unwrap()), 0);
        assert_eq!(created(o.finish().await.unwrap()), 5);
        assert_eq!(read(st, &k).await, None);
        assert_eq!(read(st, &other).await, Some(b"other".to_vec()));

        // pingora's purge of the entry's key does the same.
        let s = crate::cache::slice::plan(Some("bytes=0-0"), false, 1 << 20).unwrap();
        let sk = cache_key("g", "v.mp4", None, Some(&s));
        let mut m = st.get_miss_handler(&sk, &meta(), &span()).await.unwrap();
        m.write_body(Bytes::from_static(b"slice"), false)
            .await
            .unwrap();
        let outcome = st
            .purge(
                PurgeTarget::Active(&sk.to_compact()),
                PurgeType::Invalidation,
                &span(),
            )
            .await
            .unwrap();
        assert_eq!(outcome, PurgeOutcome::NotFound);
        assert_eq!(created(m.finish().await.unwrap()), 0);
        assert_eq!(read(st, &sk).await, None);
        assert_eq!(METRICS.cache_fills_discarded.get(), discarded + 3);
        assert_eq!(st.fills_in_flight(), 0);
    }

    #[tokio::test]
    async fn an_invalidation_reaches_a_slice_being_filled() {
        let st = leak(new_storage(16 << 20, None, 16 << 20));
        let s = crate::cache::slice::plan(Some("bytes=0-0"), false, 1 << 20).unwrap();
        let sk = cache_key("g", "v.mp4", None, Some(&s));
        let mut m = st.get_miss_handler(&sk, &meta(), &span()).await.unwrap();
        m.write_body(Bytes::from_static(b"old slice"), false)
            .await
            .unwrap();
        st.invalidate(&object_key("g", "v.mp4"));
        assert_eq!(created(m.finish().await.unwrap()), 0);
        assert_eq!(read(st, &sk).await, None);
    }

    /// Every chunk of a hit's body, in order.
    async fn chunks(hit: &mut HitHandler) -> Vec<Bytes> {
        let mut out = Vec::new();
        while let Some(b) = hit.read_body().await.unwrap() {
            out.push(b);
        }
        out
    }

    /// A weak probe of the body the memory tier holds for `k` (to see when it is freed).
    fn probe(st: &TieredStorage, k: &CacheKey) -> Weak<Body> {
        let e = st.memory.get(&k.combined_bin()).expect("in memory");
        Arc::downgrade(&e.body().expect("held"))
    }

    #[tokio::test]
    async fn a_large_memory_hit_goes_out_a_segment_at_a_time_and_finishes_on_a_kept_body() {
        // Memory-only: nothing else to go on from.
        let st = leak(new_storage(64 << 20, None, 16 << 20));
        let k = cache_key("g", "big.bin", None, None);
        let b = body(1, 4 * SEGMENT + 1234);
        fill_all(st, &k, &b).await;
        assert_eq!(st.fill_memory(), 0);
        let (_, mut hit) = st.lookup(&k, &span()).await.unwrap().unwrap();
        let first = hit.read_body().await.unwrap().unwrap();
        assert_eq!(first.len(), SEGMENT, "one segment per chunk");
        // Purged (or evicted) while the response is under way: the body is kept for it,
        // counted in the budget, and the response ends with the version it began with.
        assert!(st.remove(&k.combined_bin()));
        assert_eq!(st.kept_bytes(), b.len() as u64);
        assert_eq!(st.fill_memory(), b.len() as u64);
        let rest = chunks(&mut hit).await;
        assert!(rest.iter().all(|c| c.len() <= SEGMENT));
        assert_eq!([vec![first], rest].concat().concat(), b);
        // Seeks back and forth still read it (multipart ranges).
        for (from, to) in [
            (SEGMENT - 3, 2 * SEGMENT + 5),
            (10, 20),
            (4 * SEGMENT, b.len()),
        ] {
            hit.seek(from, Some(to)).unwrap();
            assert_eq!(chunks(&mut hit).await.concat(), &b[from..to]);
        }
        drop(hit);
        assert_eq!(st.kept_bytes(), 0, "let go with its last hit");
        assert_eq!(st.fill_memory(), 0);

        // A meta update shares the body: a hit under way goes on, nothing is kept.
        fill_all(st, &k, &b).await;
        let (_, mut hit) = st.lookup(&k, &span()).await.unwrap().unwrap();
        let first = hit.read_body().await.unwrap().unwrap();
        assert!(st.update_meta(&k, &meta(), &span()).await.unwrap());
        assert_eq!(st.kept_bytes(), 0);
        let rest = chunks(&mut hit).await;
        assert_eq!([vec![first], rest].concat().concat(), b);
    }

    #[tokio::test]
    async fn a_body_evicted_under_slow_hits_is_kept_within_half_the_budget_and_else_cut() {
        // Objects up to 1 MiB in memory; hits may keep 1.5 MiB of let-go bodies.
        let st = leak(new_storage(4 << 20, None, 3 << 20));
        let len = 4 * SEGMENT; // 1 MiB
        let mut hits = Vec::new();
        for i in 0..3u8 {
            let k = cache_key("g", &format!("o{i}"), None, None);
            fill_all(st, &k, &body(i, len)).await;
            let (_, mut hit) = st.lookup(&k, &span()).await.unwrap().unwrap();
            let first = hit.read_body().await.unwrap().unwrap();
            hits.push((k, hit, first));
        }
        let cut_before = METRICS.cache_evicted_hits[1].get();
        let probes: Vec<Weak<Body>> = hits.iter().map(|(k, ..)| probe(st, k)).collect();
        for (k, ..) in &hits {
            st.remove(&k.combined_bin());
        }
        // The first fits in half the budget and is kept; the next two do not.
        assert_eq!(st.kept_bytes(), len as u64);
        assert!(probes[0].upgrade().is_some());
        for p in &probes[1..] {
            assert!(
                p.upgrade().is_none(),
                "freed: a slow hit pins no more than its chunk"
            );
        }
        drop(probes); // weak references, as hits hold
        let mut hits = hits.into_iter();
        let (_, mut kept, first) = hits.next().unwrap();
        let rest = chunks(&mut kept).await;
        assert_eq!([vec![first], rest].concat().concat(), body(0, len));
        for (i, (_, mut hit, first)) in hits.enumerate() {
            // The chunk the client was being sent is intact; the response then ends early.
            assert_eq!(first, &body(i as u8 + 1, len)[..SEGMENT]);
            let err = hit.read_body().await.unwrap_err();
            assert!(err.to_string().contains("let go"), "{err}");
        }
        assert!(METRICS.cache_evicted_hits[1].get() >= cut_before + 2);
        drop(kept);
        assert_eq!(st.kept_bytes(), 0);
        assert_eq!(st.fill_memory(), 0);

        // Bodies evicted by TinyUFO (not removed) take the same way.
        let mut hits = Vec::new();
        for i in 0..24u8 {
            let k = cache_key("g", &format!("churn{i}"), None, None);
            // Each fill counts for TinyUFO's admission: the third beats what it evicts.
            for _ in 0..3 {
                fill_all(st, &k, &body(i, len)).await;
            }
            if let Ok(Some((_, mut hit))) = st.lookup(&k, &span()).await {
                let _ = hit.read_body().await.unwrap();
                hits.push(hit);
            }
        }
        assert!(st.memory.bytes() <= 4 << 20);
        assert!(
            st.kept_bytes() <= 3 << 19,
            "at most half the budget: {}",
            st.kept_bytes()
        );
        assert!(st.kept_bytes() > 0, "evictions under hits were kept");
        drop(hits);
        assert_eq!(st.kept_bytes(), 0);
        assert_eq!(st.fill_memory(), 0);
    }

    #[tokio::test]
    async fn a_hit_whose_body_is_let_go_and_not_kept_goes_on_from_the_disk_copy() {
        // Objects up to 2 MiB in memory; hits may keep 1 MiB of let-go bodies: a 1.5 MiB
        // body is not kept.
        let dir = tempfile::tempdir().unwrap();
        let st = leak(new_storage(8 << 20, Some((dir.path(), 64 << 20)), 2 << 20));
        let k = cache_key("g", "d.bin", None, None);
        let h = k.combined_bin();
        let b = body(7, 6 * SEGMENT);
        fill_all(st, &k, &b).await;
        let disk = st.disk.as_ref().unwrap();
        let id = st
            .memory
            .get(&h)
            .unwrap()
            .disk_id
            .expect("the fill's disk entry");
        assert!(disk.if_current(&h, id, || ()), "the same fill's");
        let from_disk = METRICS.cache_evicted_hits[0].get();
        let (_, mut hit) = st.lookup(&k, &span()).await.unwrap().unwrap();
        let first = hit.read_body().await.unwrap().unwrap();
        let probe = probe(st, &k);
        // Evicted from memory (the disk tier keeps its copy); not kept: over the budget.
        assert!(st.mem_remove(&h));
        assert_eq!(st.kept_bytes(), 0);
        assert!(probe.upgrade().is_none(), "freed");
        drop(probe);
        let rest = chunks(&mut hit).await;
        assert!(
            rest.iter().all(|c| c.len() <= disk::BLOCK as usize),
            "streamed from disk"
        );
        assert_eq!([vec![first], rest].concat().concat(), b);
        assert_eq!(METRICS.cache_evicted_hits[0].get(), from_disk + 1);
        // Multipart ranges seek the disk reader now.
        for (from, to) in [(3 * SEGMENT + 1, 6 * SEGMENT), (5, 70_000)] {
            hit.seek(from, Some(to)).unwrap();
            assert_eq!(chunks(&mut hit).await.concat(), &b[from..to]);
        }
        drop(hit);

        // A body promoted from disk carries the id of the entry it came from.
        let small = cache_key("g", "s.bin", None, None);
        fill_all(st, &small, &body(8, 300_000)).await;
        let hs = small.combined_bin();
        let sid = st.memory.get(&hs).unwrap().disk_id.unwrap();
        assert!(st.mem_remove(&hs));
        assert_eq!(read(st, &small).await.unwrap(), body(8, 300_000));
        assert_eq!(st.memory.get(&hs).expect("promoted").disk_id, Some(sid));

        // A newer version on disk is not this response's: it ends early, never mixing bytes.
        fill_all(st, &k, &b).await;
        let (_, mut hit) = st.lookup(&k, &span()).await.unwrap().unwrap();
        let first = hit.read_body().await.unwrap().unwrap();
        let cut = METRICS.cache_evicted_hits[1].get();
        fill_all(st, &k, &body(9, 6 * SEGMENT)).await; // replaces both tiers' entries
        assert_eq!(st.kept_bytes(), 0);
        let err = hit.read_body().await.unwrap_err();
        assert!(err.to_string().contains("no copy"), "{err}");
        assert_eq!(first, &b[..SEGMENT]);
        // (Other tests in this process may cut too.)
        assert!(METRICS.cache_evicted_hits[1].get() > cut);
    }

    #[tokio::test]
    async fn a_hit_made_as_its_body_is_let_go_keeps_it() {
        // The lookup took the body; the tier let go of it before the hit was made, when no
        // hit held it yet. The hit sees the mark and has it kept.
        let st = leak(new_storage(64 << 20, None, 16 << 20));
        let k = cache_key("g", "race.bin", None, None);
        let b = body(9, 2 * SEGMENT + 7);
        fill_all(st, &k, &b).await;
        let e = st.memory.get(&k.combined_bin()).unwrap();
        let taken = e.body().unwrap();
        assert!(st.remove(&k.combined_bin()));
        assert!(e.body().is_none(), "a lookup now finds no body: a miss");
        assert_eq!(st.kept_bytes(), 0, "nothing read it then");
        let mut hit: HitHandler = Box::new(MemHit::new(st, &taken, k.combined_bin(), None));
        drop(taken);
        assert_eq!(st.kept_bytes(), b.len() as u64);
        assert_eq!(chunks(&mut hit).await.concat(), b);
        drop(hit);
        assert_eq!(st.kept_bytes(), 0);
        // A body of one segment is held by its hit all along: nothing to keep.
        let b = body(3, 1000);
        fill_all(st, &k, &b).await;
        let (_, mut hit) = st.lookup(&k, &span()).await.unwrap().unwrap();
        assert!(st.remove(&k.combined_bin()));
        assert_eq!(st.kept_bytes(), 0);
        assert_eq!(chunks(&mut hit).await.concat(), b);
    }

    #[tokio::test]
    async fn a_disk_hit_is_read_whole_for_the_memory_tier_only_while_the_budget_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        // Memory takes objects up to 2 MiB; the fill budget is 4 MiB, of which hits may
        // take what keeps its use at most 2 MiB.
        let st = leak(new_storage(8 << 20, Some((dir.path(), 64 << 20)), 4 << 20));
        let k = cache_key("g", "a.bin", None, None);
        let h = k.combined_bin();
        let b = body(3, 600_000);
        fill_all(st, &k, &b).await;
        // On disk only, as after a restart.
        st.mem_remove(&h);
        // Fills in flight hold 1.5 MiB: the hit would take the use past half the budget, so
        // it streams a block at a time and is not promoted.
        let mut fills = Held::new(&st.budget);
        assert!(fills.grow(1_500_000));
        let (_, mut hit) = st.lookup(&k, &span()).await.unwrap().unwrap();
        let got = chunks(&mut hit).await;
        assert_eq!(got.concat(), b);
        assert!(got.iter().all(|c| c.len() <= disk::BLOCK as usize));
        assert_eq!(got.len(), b.len().div_ceil(disk::BLOCK as usize));
        assert!(!st.memory.contains(&h), "not promoted");
        assert_eq!(
            st.fill_memory(),
            1_500_000,
            "a streamed hit takes nothing from the budget"
        );
        drop((hit, fills));
        assert_eq!(st.fill_memory(), 0);
        // With the budget free: read whole, promoted, and counted by the memory tier alone.
        let (_, mut hit) = st.lookup(&k, &span()).await.unwrap().unwrap();
        assert!(st.memory.contains(&h), "promoted");
        assert_eq!(st.fill_memory(), 0);
        assert_eq!(chunks(&mut hit).await.concat(), b);
        // Any size the memory tier takes is promoted, one block and a bit included; a body
        // of one block is read whole (and promoted) even when the budget is spent.
        for (i, len) in [100_000, 65_536, 10].into_iter().enumerate() {
            let k = cache_key("g", &format!("s{i}"), None, None);
            let b = body(i as u8, len);
            fill_all(st, &k, &b).await;
            st.mem_remove(&k.combined_bin());
            let (_, mut hit) = st.lookup(&k, &span()).await.unwrap().unwrap();
            assert!(st.memory.contains(&k.combined_bin()), "{len} promoted");
            assert_eq!(chunks(&mut hit).await.concat(), b);
            st.mem_remove(&k.combined_bin());
            let mut fills = Held::new(&st.budget);
            assert!(fills.grow(2 << 20));
            let (_, mut hit) = st.lookup(&k, &span()).await.unwrap().unwrap();
            let got = chunks(&mut hit).await;
            assert_eq!(got.concat(), b);
            assert_eq!(got.len(), len.div_ceil(disk::BLOCK as usize), "{len}");
            // Past one block, no budget means no whole read and no promotion; a body read
            // whole anyway is offered to the memory tier too.
            assert_eq!(
                st.memory.contains(&k.combined_bin()),
                len as u64 <= disk::BLOCK,
                "{len}"
            );
        }
        assert_eq!(st.fill_memory(), 0);
    }

    #[tokio::test]
    async fn a_disk_body_read_whole_that_memory_declines_holds_the_budget_until_its_hit_ends() {
        let dir = tempfile::tempdir().unwrap();
        let st = leak(new_storage(8 << 20, Some((dir.path(), 64 << 20)), 4 << 20));
        let k = cache_key("g", "b.bin", None, None);
        let h = k.combined_bin();
        let b = body(4, 300_000);
        fill_all(st, &k, &b).await;
        st.mem_remove(&h);
        st.memory.refuse_all(); // as TinyUFO's admission may
        let (_, mut hit) = st.lookup(&k, &span()).await.unwrap().unwrap();
        assert!(!st.memory.contains(&h), "declined");
        let size = st.disk.as_ref().unwrap().entry_size(&h).unwrap();
        assert_eq!(
            st.fill_memory(),
            size,
            "the body is this hit's: it holds the budget"
        );
        let got = chunks(&mut hit).await;
        assert_eq!(
            got.len(),
            b.len().div_ceil(SEGMENT),
            "read whole, sent a segment a chunk"
        );
        assert_eq!(got.concat(), b);
        drop(hit);
        assert_eq!(st.fill_memory(), 0, "given back when the hit ends");

        // A body a little larger than the memory tier takes (within the files' allowance)
        // is not read whole for it: it streams and holds nothing of the budget.
        let dir = tempfile::tempdir().unwrap();
        let st = leak(new_storage(1 << 20, Some((dir.path(), 64 << 20)), 4 << 20));
        let k = cache_key("g", "c.bin", None, None);
        let b = body(5, 256 * 1024 + 1000);
        fill_all(st, &k, &b).await;
        let (_, mut hit) = st.lookup(&k, &span()).await.unwrap().unwrap();
        assert_eq!(st.fill_memory(), 0);
        let got = chunks(&mut hit).await;
        assert_eq!(got.len(), b.len().div_ceil(disk::BLOCK as usize));
        assert_eq!(got.concat(), b);

        // A bad entry found by a whole read is a miss and gives its share back.
        let dir = tempfile::tempdir().unwrap();
        let st = leak(new_storage(8 << 20, Some((dir.path(), 64 << 20)), 4 << 20));
        let k = cache_key("g", "d.bin", None, None);
        let h = k.combined_bin();
        fill_all(st, &k, &body(6, 200_000)).await;
        st.mem_remove(&h);
        let name = crate::cache::hex(&h);
        let path = dir.path().join(&name[..2]).join(&name);
        let mut raw = std::fs::read(&path).unwrap();
        let n = raw.len();
        raw[n - 4 * 4 - 10] ^= 1; // in the last block, before the table of 4 blocks
        std::fs::write(&path, raw).unwrap();
        assert!(st.lookup(&k, &span()).await.unwrap().is_none());
        assert_eq!(st.fill_memory(), 0);
    }

    #[tokio::test]
    async fn large_disk_hits_stream_and_check_every_block_they_read() {
        large_disk_hits_stream_and_check(true).await;
    }

    /// The same with every block read on the blocking pool (the page cache not tried).
    #[tokio::test]
    async fn large_disk_hits_stream_and_check_every_block_they_read_on_the_pool() {
        large_disk_hits_stream_and_check(false).await;
    }

    async fn large_disk_hits_stream_and_check(cached_reads: bool) {
        let dir = tempfile::tempdir().unwrap();
        let mut st = new_storage(1 << 20, Some((dir.path(), 64 << 20)), 16 << 20);
        st.small_whole = 0; // stream everything above 0 bytes
        st.cached_reads = cached_reads;
        let st = leak(st);
        let k = cache_key("g", "big.bin", None, None);
        let b = body(7, 20 * disk::BLOCK as usize + 5);
        fill_all(st, &k, &b).await;
        assert_eq!(read(st, &k).await.as_ref(), Some(&b));
        // A range in the middle (the Range path seeks before reading).
        let (_, mut hit) = st.lookup(&k, &span()).await.unwrap().unwrap();
        let (s, e) = (5 * 65536 + 17, 12 * 65536 + 3);
        hit.seek(s, Some(e)).unwrap();
        let mut got = Vec::new();
        while let Some(c) = hit.read_body().await.unwrap() {
            got.extend_from_slice(&c);
        }
        assert_eq!(got, &b[s..e]);
        // Corrupt block 9: a range through it fails (a truncated response), the entry goes.
        let name = crate::cache::hex(&k.combined_bin());
        let path = dir.path().join(&name[..2]).join(&name);
        let mut raw = std::fs::read(&path).unwrap();
        let key_len = String::from_utf8_lossy(k.primary_key()).len();
        raw[disk::HEADER_LEN as usize + key_len + 9 * 65536 + 3] ^= 0x10;
        std::fs::write(&path, raw).unwrap();
        let (_, mut hit) = st.lookup(&k, &span()).await.unwrap().unwrap();
        hit.seek(s, Some(e)).unwrap();
        let mut served = 0;
        let err = loop {
            match hit.read_body().await {
                Ok(Some(c)) => served += c.len(),
                Ok(None) => panic!("a corrupt block read as a complete body"),
                Err(e) => break e,
            }
        };
        assert!(served < e - s, "{err}");
        assert!(!st.has(&k.combined_bin()));
        assert!(
            st.lookup(&k, &span()).await.unwrap().is_none(),
            "a miss next"
        );
    }

    #[tokio::test]
    async fn a_revalidation_replaces_the_meta_of_both_tiers() {
        let dir = tempfile::tempdir().unwrap();
        let st = leak(new_storage(
            16 << 20,
            Some((dir.path(), 64 << 20)),
            16 << 20,
        ));
        let k = cache_key("g", "r.txt", None, None);
        fill_all(st, &k, b"same body").await;
        let mut h = ResponseHeader::build(200, None).unwrap();
        h.append_header("etag", "\"v2\"").unwrap();
        let now = SystemTime::now();
        let m2 = CacheMeta::new(now + Duration::from_secs(60), now, 0, 0, h);
        assert!(st.update_meta(&k, &m2, &span()).await.unwrap());
        st.mem_remove(&k.combined_bin()); // read the disk copy
        let (meta, _) = st.lookup(&k, &span()).await.unwrap().unwrap();
        assert_eq!(
            meta.response_header().headers.get("etag").unwrap(),
            "\"v2\""
        );
        assert_eq!(read(st, &k).await, Some(b"same body".to_vec()));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_stalled_disk_read_does_not_stall_the_worker() {
        use std::sync::atomic::AtomicBool;
        let dir = tempfile::tempdir().unwrap();
        let st = leak(new_storage(1 << 20, Some((dir.path(), 64 << 20)), 16 << 20));
        let k = cache_key("g", "stuck.bin", None, None);
        fill_all(st, &k, &body(1, 300_000)).await;
        // The entry's meta file becomes a FIFO: opening it blocks until a writer comes,
        // like a read from a stalled disk.
        let name = crate::cache::hex(&k.combined_bin());
        let meta_path = dir.path().join(&name[..2]).join(format!("{name}.meta"));
        std::fs::remove_file(&meta_path).unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(&meta_path)
            .status()
            .unwrap();
        assert!(made.success());
        // The writer comes when this test says so, or after 10 s (if the read had stalled
        // the runtime's only thread, the test could not say so).
        let released = Arc::new(AtomicBool::new(false));
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let unblocker = std::thread::spawn({
            let (released, meta_path) = (released.clone(), meta_path.clone());
            move || {
                let _ = wait.recv_timeout(Duration::from_secs(10));
                released.store(true, Ordering::SeqCst);
                let w = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&meta_path)
                    .unwrap();
                std::fs::write(meta_path.with_extension("junk"), b"junk").unwrap();
                std::fs::rename(meta_path.with_extension("junk"), &meta_path).unwrap();
                drop(w);
            }
        });
        let lookup = tokio::spawn(async move { st.lookup(&k, &span()).await.map(|h| h.is_some()) });
        // The lookup is under way (the worker polled it) and this runtime's one thread still
        // runs other tasks.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !released.load(Ordering::SeqCst),
            "the worker was blocked until the disk read was released"
        );
        go.send(()).unwrap();
        assert!(!lookup.await.unwrap().unwrap(), "a bad meta file is a miss");
        unblocker.join().unwrap();
    }
}
