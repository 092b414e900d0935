//! `TieredStorage`: cascade's pingora-cache `Storage` (memory tier over disk tier).
//!
//! Lookup: memory, then disk; a disk hit small enough for memory is verified whole and
//! promoted. Fill: the body streams into a disk temp file as it arrives (never held whole
//! unless small enough for memory) and is committed only by `finish`; a dropped miss handler
//! (client gone, origin failed) commits nothing. Purge removes an entry from both tiers.

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

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

use super::disk::{BodyReader, DiskTier, DiskWriter, VERIFY_WHOLE};
use super::memory::{MemEntry, MemoryTier};
use super::Hash;
use crate::metrics::METRICS;

pub struct TieredStorage {
    pub memory: MemoryTier,
    pub disk: Option<DiskTier>,
    catalog: Mutex<Catalog>,
}

/// Object (`group \0 key`) -> its stored entries (the whole object, its slices). Lets a write
/// invalidate every slice of an object and an operator purge by key prefix. Entries that both
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

fn io_err(e: std::io::Error) -> Box<Error> {
    Error::because(ErrorType::InternalError, "cache storage", e)
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
    pub fn new(memory: MemoryTier, disk: Option<DiskTier>) -> Self {
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
        }
    }

    fn record(&self, primary: &str, combined: Hash) {
        let mut c = self.catalog.lock();
        c.add(primary, combined);
        let stored = self.memory.objects() + self.disk.as_ref().map_or(0, |d| d.objects());
        if c.entries > 2 * stored + 4096 {
            let mut entries = 0;
            c.objects.retain(|_, set| {
                set.retain(|h| {
                    self.memory.contains(h) || self.disk.as_ref().is_some_and(|d| d.contains(h))
                });
                entries += set.len();
                !set.is_empty()
            });
            c.entries = entries;
        }
    }

    /// Removes every stored entry (the object and all its slices) of `object`
    /// (`cache::object_key(group, key)`). Returns how many entries were removed.
    pub fn invalidate(&self, object: &str) -> usize {
        let mut all = self
            .catalog
            .lock()
            .objects
            .remove(object)
            .unwrap_or_default();
        all.insert(super::plain_entry(object).combined_bin());
        all.iter().map(|h| usize::from(self.remove(h))).sum()
    }

    /// Removes every object of `group` whose key starts with `key_prefix`; returns entries
    /// removed.
    pub fn purge_prefix(&self, group: &str, key_prefix: &str) -> usize {
        let victims: Vec<HashSet<Hash>> = {
            let mut c = self.catalog.lock();
            let keys: Vec<Box<str>> = c
                .objects
                .keys()
                .filter(|k| {
                    super::parse_object(k)
                        .is_some_and(|(g, key)| g == group && key.starts_with(key_prefix))
                })
                .cloned()
                .collect();
            keys.iter().filter_map(|k| c.objects.remove(k)).collect()
        };
        victims
            .into_iter()
            .flatten()
            .map(|h| usize::from(self.remove(&h)))
            .sum()
    }

    /// Whether either tier holds this entry (an index probe: no I/O).
    pub fn has(&self, h: &Hash) -> bool {
        self.memory.contains(h) || self.disk.as_ref().is_some_and(|d| d.contains(h))
    }

    /// Removes one entry from both tiers.
    pub fn remove(&self, h: &Hash) -> bool {
        let m = self.memory.remove(h);
        let d = self.disk.as_ref().is_some_and(|d| d.remove(h));
        m || d
    }

    fn lookup_hash(&self, h: &Hash) -> Result<Option<(CacheMeta, HitHandler)>> {
        if let Some(e) = self.memory.get(h) {
            let meta = CacheMeta::deserialize(&e.meta.0, &e.meta.1)?;
            return Ok(Some((meta, Box::new(MemHit::new(e.body.clone())))));
        }
        let Some(disk) = &self.disk else {
            return Ok(None);
        };
        let Some(obj) = disk.open_object(h) else {
            return Ok(None);
        };
        let meta = match CacheMeta::deserialize(&obj.head.meta.0, &obj.head.meta.1) {
            Ok(m) => m,
            Err(e) => {
                log::warn!("cache: removing entry with unreadable meta: {e}");
                disk.remove(h);
                return Ok(None);
            }
        };
        let len = obj.head.header.body_len;
        if len <= VERIFY_WHOLE {
            let meta_raw = obj.head.meta.clone();
            match BodyReader::new(obj).read_all() {
                Ok(body) => {
                    if (len as usize) <= self.memory.max_object() {
                        self.memory.put(MemEntry {
                            hash: *h,
                            meta: meta_raw,
                            body: body.clone(),
                        });
                    }
                    Ok(Some((meta, Box::new(MemHit::new(body)))))
                }
                Err(e) => {
                    log::warn!("cache: {e}; treated as a miss");
                    disk.remove(h);
                    Ok(None)
                }
            }
        } else {
            Ok(Some((meta, Box::new(DiskHit(BodyReader::new(obj))))))
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
        self.lookup_hash(&key.combined_bin())
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
        let disk = match &self.disk {
            Some(d) => Some(d.writer(hash, &key_str, meta.clone()).map_err(io_err)?),
            None => None,
        };
        Ok(Box::new(Fill {
            storage: self,
            hash,
            key: key_str,
            meta,
            mem: Some(Vec::new()),
            mem_len: 0,
            disk,
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
        if let Some(e) = self.memory.get(&h) {
            self.memory.put(MemEntry {
                hash: h,
                meta: raw.clone(),
                body: e.body.clone(),
            });
            updated = true;
        }
        if let Some(d) = &self.disk {
            updated |= d.update_meta(&h, raw).map_err(io_err)?;
        }
        Ok(updated)
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync + 'static) {
        self
    }
}

/// A hit served from memory (or from a disk file read whole and verified).
struct MemHit {
    body: Bytes,
    range: (usize, usize),
    done: bool,
}

impl MemHit {
    fn new(body: Bytes) -> Self {
        let len = body.len();
        MemHit {
            body,
            range: (0, len),
            done: false,
        }
    }
}

#[async_trait]
impl HandleHit for MemHit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        if self.done {
            return Ok(None);
        }
        self.done = true;
        Ok(Some(self.body.slice(self.range.0..self.range.1)))
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
        let len = self.body.len();
        let end = end.unwrap_or(len).min(len);
        if start > end {
            return Error::e_explain(ErrorType::InternalError, "seek out of range");
        }
        self.range = (start, end);
        self.done = false;
        Ok(())
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
}

/// A large object streamed from its disk file.
struct DiskHit(BodyReader);

#[async_trait]
impl HandleHit for DiskHit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        self.0.next_chunk().map_err(io_err)
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
        self.0
            .seek(start as u64, end.map(|e| e as u64))
            .map_err(io_err)
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
}

/// One fill in progress. Nothing is visible to readers until `finish`.
struct Fill {
    storage: &'static TieredStorage,
    hash: Hash,
    key: String,
    meta: (Bytes, Bytes),
    /// Body chunks while the object still fits the memory tier; dropped once it does not.
    mem: Option<Vec<Bytes>>,
    mem_len: usize,
    disk: Option<DiskWriter>,
    finished: bool,
}

#[async_trait]
impl HandleMiss for Fill {
    async fn write_body(&mut self, data: Bytes, _eof: bool) -> Result<()> {
        if let Some(w) = self.disk.as_mut() {
            if let Err(e) = w.write(&data) {
                // Disk full or failing: keep serving the client, cache nothing on disk.
                log::warn!("cache: disk write failed, object not cached on disk: {e}");
                METRICS.cache_fill_errors.inc();
                self.disk = None;
            }
        }
        self.mem_len += data.len();
        if self.mem_len > self.storage.memory.max_object() {
            self.mem = None;
        } else if let Some(chunks) = self.mem.as_mut() {
            chunks.push(data);
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<MissFinishType> {
        self.finished = true;
        if let Some(chunks) = self.mem.take() {
            let body = if chunks.len() == 1 {
                chunks.into_iter().next().expect("one")
            } else {
                let mut v = Vec::with_capacity(self.mem_len);
                for c in chunks {
                    v.extend_from_slice(&c);
                }
                Bytes::from(v)
            };
            self.storage.memory.put(MemEntry {
                hash: self.hash,
                meta: self.meta.clone(),
                body,
            });
        } else {
            // Stale copies of a key must not outlive its replacement in the other tier.
            self.storage.memory.remove(&self.hash);
        }
        if let (Some(w), Some(disk)) = (self.disk.take(), self.storage.disk.as_ref()) {
            if let Err(e) = disk.finish(w) {
                log::warn!("cache: cannot commit object to disk: {e}");
                METRICS.cache_fill_errors.inc();
            }
        }
        self.storage.record(&self.key, self.hash);
        Ok(MissFinishType::Created(self.mem_len))
    }
}

impl Drop for Fill {
    fn drop(&mut self) {
        if !self.finished {
            // The DiskWriter's own Drop removes the temp file.
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
}
