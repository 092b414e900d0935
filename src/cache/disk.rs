//! The disk tier: two files per entry under `<path>/<2 hex>/`, bounded in bytes, surviving
//! restarts.
//!
//! ```text
//!   <32 hex>        body file   head | key | body (64 KiB blocks) | block table
//!   <32 hex>.meta   meta file   head | meta0 | meta1          (replaced alone by a 304)
//!   tmp/            fills and meta replacements in progress (emptied at start)
//! ```
//!
//! Body file (little-endian), format 2:
//! ```text
//! "CASCADE\x02" | id u64 | key_len u32 | block_size u32 | body_len u64 | table_crc u32 | head_crc u32
//! key bytes | body | one CRC32 u32 per block of block_size bytes (the last one may be short)
//! ```
//! Meta file:
//! ```text
//! "CASCMET\x02" | id u64 | body_len u64 | table_crc u32 | meta0_len u32 | meta1_len u32 | crc u32
//! meta0 | meta1
//! ```
//! `head_crc` covers the body file's head fields and key, `table_crc` the block table, `crc`
//! the meta file's head and metas. The meta file repeats the body file's identity (`id`, a
//! random number drawn per fill, its length and table CRC), so a meta file paired with another
//! body file is detected and the entry dropped. A 304 revalidation writes a new meta file and
//! renames it over the old one: the body file is never rewritten.
//!
//! Integrity: every open checks both heads (magic, lengths against the file sizes, CRCs), the
//! pairing and the block table's CRC. Every body read checks the CRC of each block it reads,
//! also for a read starting in the middle of an entry (a Range served by `seek`). A lookup
//! reads either the whole body (the storage asks for that when it will offer the body to the
//! memory tier) or its first block, and checks what it read before anything is served, so a
//! corrupt small entry or a corrupt first block is a miss. Past the first block a streamed
//! body is checked block by block as it goes, and a bad block ends the response early (the
//! client sees a truncated transfer, never wrong bytes). Either way a bad entry is removed.
//! Files of another format (format 1's `CASCADE\x01`) are removed at start.
//!
//! Durability: a fill writes to `tmp/`; at finish the body and the meta temp files are
//! `sync_data`'d, renamed into the shard directory, and the directory is fsynced before the
//! entry is published in the index. A cancelled or failed fill leaves nothing that looks
//! complete (pingora #932), and a crash leaves either the old entry or the new one.
//!
//! Bounds: the index accounts for committed entries (both files) and for the bytes of temp
//! files, reserved as a fill grows; a reservation evicts LRU entries to make room, and a fill
//! that cannot get room (everything else is in flight too) is abandoned. So N concurrent fills
//! never push the directory above `size`. At start the index is rebuilt from the file heads.
//!
//! Threads: every function here that touches the file system blocks; the storage calls them
//! on tokio's blocking pool (`spawn_blocking`), never on a proxy worker, because a disk that
//! stalls (a cold page cache, a busy or failing device, an fsync) would stall every request
//! of that worker. One exception, which cannot block: [`BodyReader::next_chunk_cached`]
//! reads a streamed body's next block on the worker with `preadv2(RWF_NOWAIT)`, which the
//! kernel answers only from the page cache (`EAGAIN` otherwise, and the block is then read
//! on the pool), so a hot entry streams without a thread hand-off per block.
//!
//! The in-memory index is shared under a short lock; file mutations of one entry (commit,
//! meta replacement, removal) are serialised by one of 256 stripe locks, which only
//! blocking-pool threads take. Removals requested from a worker (purge, invalidate) update
//! the index at once and hand the unlinks to the blocking pool ([`offload`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use super::{hex, Hash};
use crate::metrics::METRICS;

pub const MAGIC: &[u8; 8] = b"CASCADE\x02";
pub const META_MAGIC: &[u8; 8] = b"CASCMET\x02";
/// Magic numbers of earlier formats: such files are removed at start.
const OLD_MAGICS: &[&[u8; 8]] = &[b"CASCADE\x01"];
pub const HEADER_LEN: u64 = 40;
pub const META_HEADER_LEN: u64 = 40;
/// Body block size: each block has its own CRC32 in the block table.
pub const BLOCK: u64 = 64 * 1024;
/// Blocks per chunk of a streamed body. A chunk is what a response holds while its client
/// takes it, so one block: a slow client of a large entry holds 64 KiB, not the entry (nginx
/// reads a file it cannot `sendfile` into two 32 KiB buffers). Larger chunks cost fewer
/// reads and sends per byte, but a client that stops holds the whole chunk, and a proxy
/// learns that a client is slow only once the socket's send buffer is full, by which time
/// any growing chunk size has grown (benches/README.md, "Disk hits").
pub const READ_BLOCKS: u64 = 1;
const STRIPES: usize = 256;

fn bad(m: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, m.into())
}

fn blocks(len: u64) -> u64 {
    len.div_ceil(BLOCK)
}

/// Runs `f` on the blocking pool of the current tokio runtime (inline without one: tests,
/// start-up). For file operations requested from code that may run on a proxy worker.
pub fn offload(f: impl FnOnce() + Send + 'static) {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => drop(h.spawn_blocking(f)),
        Err(_) => f(),
    }
}

/// What ties a meta file to its body file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub id: u64,
    pub body_len: u64,
    pub table_crc: u32,
}

fn random_id() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::getrandom(&mut b).is_err() {
        // Not cryptographic, only unique: time and a counter.
        static N: AtomicU64 = AtomicU64::new(0);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        return t ^ N.fetch_add(1, Ordering::Relaxed).rotate_left(40);
    }
    u64::from_le_bytes(b)
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().expect("4"))
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().expect("8"))
}

/// A body file's head: what it says once magic, lengths and CRC checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyHead {
    pub ident: Identity,
    pub key: String,
}

impl BodyHead {
    fn body_offset(&self) -> u64 {
        HEADER_LEN + self.key.len() as u64
    }
}

fn encode_body_head(ident: &Identity, key: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER_LEN as usize + key.len());
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&ident.id.to_le_bytes());
    b.extend_from_slice(&(key.len() as u32).to_le_bytes());
    b.extend_from_slice(&(BLOCK as u32).to_le_bytes());
    b.extend_from_slice(&ident.body_len.to_le_bytes());
    b.extend_from_slice(&ident.table_crc.to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&b);
    h.update(key.as_bytes());
    b.extend_from_slice(&h.finalize().to_le_bytes());
    b.extend_from_slice(key.as_bytes());
    b
}

/// Reads and checks a body file's head; `Err` means corrupt, truncated, another format or
/// not ours.
pub fn read_body_head(file: &File, file_len: u64) -> io::Result<BodyHead> {
    let mut b = [0u8; HEADER_LEN as usize];
    file.read_exact_at(&mut b, 0)?;
    if &b[..8] != MAGIC {
        if OLD_MAGICS.iter().any(|m| &b[..8] == *m) {
            return Err(bad("an earlier cache file format"));
        }
        return Err(bad("bad magic"));
    }
    let key_len = u32_at(&b, 16);
    if key_len > 64 * 1024 {
        return Err(bad("implausible key length"));
    }
    if u64::from(u32_at(&b, 20)) != BLOCK {
        return Err(bad("unexpected block size"));
    }
    let ident = Identity {
        id: u64_at(&b, 8),
        body_len: u64_at(&b, 24),
        table_crc: u32_at(&b, 32),
    };
    let expected = (HEADER_LEN + u64::from(key_len))
        .checked_add(ident.body_len)
        .and_then(|n| n.checked_add(4 * blocks(ident.body_len)));
    if expected != Some(file_len) {
        return Err(bad("length mismatch (truncated?)"));
    }
    let mut key = vec![0u8; key_len as usize];
    file.read_exact_at(&mut key, HEADER_LEN)?;
    let mut h = crc32fast::Hasher::new();
    h.update(&b[..36]);
    h.update(&key);
    if h.finalize() != u32_at(&b, 36) {
        return Err(bad("header checksum mismatch"));
    }
    let key = String::from_utf8(key).map_err(|_| bad("key is not UTF-8"))?;
    Ok(BodyHead { ident, key })
}

fn encode_meta(ident: &Identity, meta: &(Bytes, Bytes)) -> Vec<u8> {
    let mut b = Vec::with_capacity(META_HEADER_LEN as usize + meta.0.len() + meta.1.len());
    b.extend_from_slice(META_MAGIC);
    b.extend_from_slice(&ident.id.to_le_bytes());
    b.extend_from_slice(&ident.body_len.to_le_bytes());
    b.extend_from_slice(&ident.table_crc.to_le_bytes());
    b.extend_from_slice(&(meta.0.len() as u32).to_le_bytes());
    b.extend_from_slice(&(meta.1.len() as u32).to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&b);
    h.update(&meta.0);
    h.update(&meta.1);
    b.extend_from_slice(&h.finalize().to_le_bytes());
    b.extend_from_slice(&meta.0);
    b.extend_from_slice(&meta.1);
    b
}

/// Reads and checks a meta file.
pub fn read_meta(file: &File, file_len: u64) -> io::Result<(Identity, (Bytes, Bytes))> {
    if !(META_HEADER_LEN..=META_HEADER_LEN + (32 << 20)).contains(&file_len) {
        return Err(bad("implausible meta file length"));
    }
    let mut b = vec![0u8; file_len as usize];
    file.read_exact_at(&mut b, 0)?;
    if &b[..8] != META_MAGIC {
        return Err(bad("bad meta magic"));
    }
    let (m0, m1) = (u32_at(&b, 28) as u64, u32_at(&b, 32) as u64);
    if META_HEADER_LEN + m0 + m1 != file_len {
        return Err(bad("meta length mismatch (truncated?)"));
    }
    let mut h = crc32fast::Hasher::new();
    h.update(&b[..36]);
    h.update(&b[META_HEADER_LEN as usize..]);
    if h.finalize() != u32_at(&b, 36) {
        return Err(bad("meta checksum mismatch"));
    }
    let ident = Identity {
        id: u64_at(&b, 8),
        body_len: u64_at(&b, 16),
        table_crc: u32_at(&b, 24),
    };
    let all = Bytes::from(b);
    let s = META_HEADER_LEN as usize;
    let m = s + m0 as usize;
    Ok((ident, (all.slice(s..m), all.slice(m..))))
}

fn table_crc(table: &[u32]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for c in table {
        h.update(&c.to_le_bytes());
    }
    h.finalize()
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

struct Entry {
    /// Both files' bytes.
    size: u64,
    seq: u64,
    id: u64,
    key: Box<str>,
}

#[derive(Default)]
struct Index {
    map: HashMap<Hash, Entry>,
    lru: BTreeMap<u64, Hash>,
    seq: u64,
    /// Bytes of committed entries.
    bytes: u64,
    /// Bytes of temp files being written (fills, meta replacements).
    reserved: u64,
}

impl Index {
    fn touch(&mut self, h: &Hash) {
        self.seq += 1;
        let seq = self.seq;
        if let Some(e) = self.map.get_mut(h) {
            self.lru.remove(&e.seq);
            e.seq = seq;
            self.lru.insert(seq, *h);
        }
    }

    fn insert(&mut self, h: Hash, size: u64, id: u64, key: Box<str>) {
        self.remove(&h);
        self.seq += 1;
        self.lru.insert(self.seq, h);
        self.bytes += size;
        self.map.insert(
            h,
            Entry {
                size,
                seq: self.seq,
                id,
                key,
            },
        );
    }

    fn remove(&mut self, h: &Hash) -> bool {
        match self.map.remove(h) {
            Some(e) => {
                self.lru.remove(&e.seq);
                self.bytes -= e.size;
                true
            }
            None => false,
        }
    }

    fn pop_lru(&mut self) -> Option<Hash> {
        let (_, h) = self.lru.pop_first()?;
        let e = self.map.remove(&h).expect("lru and map agree");
        self.bytes -= e.size;
        Some(h)
    }
}

struct Inner {
    root: PathBuf,
    limit: u64,
    index: Mutex<Index>,
    /// Serialise file mutations of one entry; taken only on blocking-pool threads, one at a
    /// time, before `index` when both are held.
    stripes: Vec<Mutex<()>>,
    tmp_seq: AtomicU64,
    /// The kernel or file system refused `RWF_NOWAIT` once: streamed blocks all go to the
    /// pool from then on ([`BodyReader::next_chunk_cached`]).
    no_nowait: AtomicBool,
}

/// The disk tier (a cheap handle: clones share one index).
#[derive(Clone)]
pub struct DiskTier(Arc<Inner>);

/// An open, checked entry ready to be read.
pub struct DiskObject {
    pub file: File,
    pub head: BodyHead,
    pub meta: (Bytes, Bytes),
    table: Vec<u32>,
}

/// What a lookup found on disk.
pub struct Loaded {
    pub id: u64,
    pub meta: (Bytes, Bytes),
    pub body: LoadedBody,
}

pub enum LoadedBody {
    /// Read and checked whole, in pieces (see [`DiskTier::load_into`]).
    Whole(Vec<Bytes>),
    /// Streamed, block by block; its first block is read and checked already.
    Stream(BodyReader),
}

impl DiskTier {
    /// Opens (creating if needed) the cache directory and rebuilds the index from the files
    /// in it. Bad files, files of an earlier format, unpaired body or meta files and leftovers
    /// of interrupted fills are removed. Blocking (start-up).
    pub fn open(root: &Path, limit: u64) -> io::Result<DiskTier> {
        fs::create_dir_all(root.join("tmp"))?;
        sync_dir(root)?;
        for e in fs::read_dir(root.join("tmp"))? {
            let _ = fs::remove_file(e?.path());
        }
        let tier = DiskTier(Arc::new(Inner {
            root: root.to_path_buf(),
            limit,
            index: Mutex::new(Index::default()),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            tmp_seq: AtomicU64::new(0),
            no_nowait: AtomicBool::new(false),
        }));
        let mut found: Vec<(std::time::SystemTime, Hash, u64, u64, String)> = Vec::new();
        for shard in fs::read_dir(root)? {
            let shard = shard?;
            let name = shard.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.len() != 2 || !shard.file_type()?.is_dir() {
                continue;
            }
            let mut bodies = Vec::new();
            let mut metas = HashSet::new();
            for f in fs::read_dir(shard.path())? {
                let f = f?;
                let path = f.path();
                let file_name = f.file_name();
                let file_name = file_name.to_str().unwrap_or("");
                let (stem, is_meta) = match file_name.strip_suffix(".meta") {
                    Some(s) => (s, true),
                    None => (file_name, false),
                };
                let parsed = super::unhex(stem).filter(|h| hex(h).starts_with(name));
                match parsed {
                    Some(h) if is_meta => {
                        metas.insert(h);
                    }
                    Some(h) => bodies.push(h),
                    None => {
                        log::warn!("cache: removing foreign file {}", path.display());
                        let _ = fs::remove_file(&path);
                    }
                }
            }
            for h in bodies {
                let had_meta = metas.remove(&h);
                match tier.check_files(&h, had_meta) {
                    Ok((t, size, id, key)) => found.push((t, h, size, id, key)),
                    Err(e) => {
                        log::warn!("cache: removing bad entry {}: {e}", tier.path(&h).display());
                        tier.unlink_files(&h);
                    }
                }
            }
            for h in metas {
                log::warn!("cache: removing meta file without a body {}", hex(&h));
                let _ = fs::remove_file(tier.meta_path(&h));
            }
        }
        found.sort_by_key(|f| f.0);
        {
            let mut ix = tier.0.index.lock();
            for (_, h, size, id, key) in found {
                ix.insert(h, size, id, key.into_boxed_str());
            }
        }
        tier.evict_over_limit();
        tier.publish();
        Ok(tier)
    }

    /// Checks an entry's heads and pairing at start (not its block table): last use, size,
    /// id, key.
    fn check_files(
        &self,
        h: &Hash,
        had_meta: bool,
    ) -> io::Result<(std::time::SystemTime, u64, u64, String)> {
        let file = File::open(self.path(h))?;
        let md = file.metadata()?;
        let head = read_body_head(&file, md.len())?;
        if !had_meta {
            return Err(bad("no meta file"));
        }
        let mfile = File::open(self.meta_path(h))?;
        let mlen = mfile.metadata()?.len();
        let (ident, _) = read_meta(&mfile, mlen)?;
        if ident != head.ident {
            return Err(bad("meta file belongs to another body"));
        }
        let t = md.accessed().or_else(|_| md.modified())?;
        Ok((t, md.len() + mlen, head.ident.id, head.key))
    }

    fn path(&self, h: &Hash) -> PathBuf {
        let name = hex(h);
        self.0.root.join(&name[..2]).join(name)
    }

    fn meta_path(&self, h: &Hash) -> PathBuf {
        let name = hex(h);
        self.0.root.join(&name[..2]).join(format!("{name}.meta"))
    }

    fn stripe(&self, h: &Hash) -> &Mutex<()> {
        &self.0.stripes[h[0] as usize % STRIPES]
    }

    fn unlink_files(&self, h: &Hash) {
        let _ = fs::remove_file(self.path(h));
        let _ = fs::remove_file(self.meta_path(h));
    }

    /// Unlinks the files of entries already taken out of the index, unless a newer entry of
    /// the same hash has been published since. Blocking.
    fn unlink_removed(&self, hs: &[Hash]) {
        for h in hs {
            let _s = self.stripe(h).lock();
            if !self.0.index.lock().map.contains_key(h) {
                self.unlink_files(h);
            }
        }
    }

    /// Removes entry `h` if it is still the one with this id. Blocking: call it while holding
    /// `h`'s stripe lock.
    fn drop_locked(&self, h: &Hash, id: Option<u64>) {
        let removed = {
            let mut ix = self.0.index.lock();
            if id.is_none() || ix.map.get(h).map(|e| e.id) == id {
                ix.remove(h);
                true
            } else {
                false
            }
        };
        if removed {
            self.unlink_files(h);
            self.publish();
        }
    }

    /// Removes entry `h` if it is still the one with this id (a corrupt entry found by a
    /// reader). Blocking.
    pub fn drop_entry(&self, h: &Hash, id: u64) {
        let _s = self.stripe(h).lock();
        self.drop_locked(h, Some(id));
    }

    /// As [`DiskTier::drop_entry`], from a worker: the unlinks are handed to the blocking pool.
    pub fn drop_entry_later(&self, h: Hash, id: u64) {
        let removed = {
            let mut ix = self.0.index.lock();
            ix.map.get(&h).is_some_and(|e| e.id == id) && ix.remove(&h)
        };
        if removed {
            self.publish();
            let t = self.clone();
            offload(move || t.unlink_removed(&[h]));
        }
    }

    /// Opens and checks an entry's files (heads, pairing, block table).
    fn open_checked(&self, h: &Hash) -> io::Result<DiskObject> {
        let mfile = File::open(self.meta_path(h))?;
        let (mident, meta) = read_meta(&mfile, mfile.metadata()?.len())?;
        drop(mfile);
        let file = File::open(self.path(h))?;
        let head = read_body_head(&file, file.metadata()?.len())?;
        if head.ident != mident {
            return Err(bad("meta file belongs to another body"));
        }
        let n = blocks(head.ident.body_len) as usize;
        let mut raw = vec![0u8; 4 * n];
        file.read_exact_at(&mut raw, head.body_offset() + head.ident.body_len)?;
        let table: Vec<u32> = raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4")))
            .collect();
        if table_crc(&table) != head.ident.table_crc {
            return Err(bad("block table checksum mismatch"));
        }
        Ok(DiskObject {
            file,
            head,
            meta,
            table,
        })
    }

    /// Opens and checks entry `h` as the index knows it. A bad entry is removed and reported
    /// as absent. Blocking.
    pub fn open_object(&self, h: &Hash) -> Option<DiskObject> {
        let want = self.0.index.lock().map.get(h).map(|e| e.id)?;
        if let Ok(obj) = self.open_checked(h) {
            if obj.head.ident.id == want {
                self.0.index.lock().touch(h);
                return Some(obj);
            }
        }
        // A commit or a meta replacement may have been half-way: look again while no
        // mutation of this entry can run. What is wrong then is wrong for good.
        let _s = self.stripe(h).lock();
        let want = self.0.index.lock().map.get(h).map(|e| e.id)?;
        match self.open_checked(h) {
            Ok(obj) if obj.head.ident.id == want => {
                self.0.index.lock().touch(h);
                Some(obj)
            }
            Ok(_) => {
                log::warn!(
                    "cache: removing entry {}: its files are not the indexed ones",
                    hex(h)
                );
                self.drop_locked(h, Some(want));
                None
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    log::warn!("cache: removing bad entry {}: {e}", hex(h));
                }
                self.drop_locked(h, Some(want));
                None
            }
        }
    }

    /// A lookup: opens entry `h` and reads its body whole when it is at most `whole_up_to`
    /// bytes, else returns a reader with the first block read. What it reads is checked block
    /// by block: a bad block removes the entry, a miss. Blocking.
    pub fn load(&self, h: &Hash, whole_up_to: u64) -> Option<Loaded> {
        self.load_into(h, whole_up_to, u64::MAX, Vec::new())
    }

    /// [`DiskTier::load`], a whole body read in pieces of `piece` bytes (a multiple of
    /// [`BLOCK`]; the memory tier's segments), into `bufs` (see
    /// [`BodyReader::read_all_into`]); a streamed body's first block into the first of them.
    pub fn load_into(
        &self,
        h: &Hash,
        whole_up_to: u64,
        piece: u64,
        mut bufs: Vec<Vec<u8>>,
    ) -> Option<Loaded> {
        let obj = self.open_object(h)?;
        let id = obj.head.ident.id;
        let meta = obj.meta.clone();
        let mut reader = BodyReader::new(self.clone(), *h, obj);
        let body = if reader.body_len <= whole_up_to {
            reader.read_all_into(piece, bufs).map(LoadedBody::Whole)
        } else {
            let buf = if bufs.is_empty() {
                Vec::new()
            } else {
                bufs.swap_remove(0)
            };
            reader
                .read_first_block(buf)
                .map(|()| LoadedBody::Stream(reader))
        };
        match body {
            Ok(body) => Some(Loaded { id, meta, body }),
            Err(e) => {
                log::warn!("cache: {e}; treated as a miss");
                None
            }
        }
    }

    /// A reader of `from..to` of entry `h`, if the index's entry is still the one with this
    /// id (the same bytes: a memory entry's fill, or the entry it was promoted from); `None`
    /// if not, or if it is bad (then removed). Nothing is read yet. Blocking.
    pub fn reader_at(&self, h: &Hash, id: u64, from: u64, to: u64) -> Option<BodyReader> {
        // `open_object` opens what the index holds (checked against its files): another
        // version has another id.
        let obj = self.open_object(h)?;
        if obj.head.ident.id != id {
            return None;
        }
        let mut r = BodyReader::new(self.clone(), *h, obj);
        r.seek(from, Some(to)).ok()?;
        Some(r)
    }

    /// Runs `f` (e.g. a promotion to memory) only if entry `h` is still the one with this id,
    /// under the index lock, so a removal cannot slip in between.
    pub fn if_current(&self, h: &Hash, id: u64, f: impl FnOnce()) -> bool {
        let ix = self.0.index.lock();
        let current = ix.map.get(h).is_some_and(|e| e.id == id);
        if current {
            f();
        }
        current
    }

    /// Removes one entry: out of the index now, its files unlinked on the blocking pool.
    pub fn remove(&self, h: &Hash) -> bool {
        !self.remove_many(std::slice::from_ref(h)).is_empty()
    }

    /// Removes entries: out of the index now (so no lookup finds them), their files unlinked
    /// by one job on the blocking pool. Returns those that were indexed.
    pub fn remove_many<'a>(&self, hs: impl IntoIterator<Item = &'a Hash>) -> Vec<Hash> {
        let removed: Vec<Hash> = {
            let mut ix = self.0.index.lock();
            hs.into_iter().filter(|h| ix.remove(h)).copied().collect()
        };
        if !removed.is_empty() {
            self.publish();
            let (t, hs) = (self.clone(), removed.clone());
            offload(move || t.unlink_removed(&hs));
        }
        removed
    }

    /// Every entry's hash and cache key (to rebuild the storage catalog at start).
    pub fn entries(&self) -> Vec<(Hash, String)> {
        self.0
            .index
            .lock()
            .map
            .iter()
            .map(|(h, e)| (*h, e.key.to_string()))
            .collect()
    }

    pub fn contains(&self, h: &Hash) -> bool {
        self.0.index.lock().map.contains_key(h)
    }

    /// Both files' bytes of entry `h` (at least its body's length), if indexed.
    pub fn entry_size(&self, h: &Hash) -> Option<u64> {
        self.0.index.lock().map.get(h).map(|e| e.size)
    }

    pub fn objects(&self) -> usize {
        self.0.index.lock().map.len()
    }

    /// Bytes of committed entries.
    pub fn bytes(&self) -> u64 {
        self.0.index.lock().bytes
    }

    /// Bytes reserved by temp files in progress.
    pub fn reserved(&self) -> u64 {
        self.0.index.lock().reserved
    }

    pub fn limit(&self) -> u64 {
        self.0.limit
    }

    /// Reserves `n` bytes for a temp file, evicting LRU entries to make room. Fails (nothing
    /// evicted) when even an empty tier could not hold it beside the other reservations.
    /// Blocking (the evictions unlink).
    fn reserve(&self, n: u64) -> io::Result<()> {
        let victims: Vec<Hash> = {
            let mut ix = self.0.index.lock();
            if ix.reserved + n > self.0.limit {
                return Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    "no room in the disk tier (the rest is being filled)",
                ));
            }
            let mut v = Vec::new();
            while ix.bytes + ix.reserved + n > self.0.limit {
                match ix.pop_lru() {
                    Some(h) => v.push(h),
                    None => break,
                }
            }
            ix.reserved += n;
            v
        };
        if !victims.is_empty() {
            METRICS
                .cache_evictions
                .with_label_values(&["disk"])
                .inc_by(victims.len() as u64);
            self.unlink_removed(&victims);
            self.publish();
        }
        Ok(())
    }

    fn release(&self, n: u64) {
        if n > 0 {
            self.0.index.lock().reserved -= n;
        }
    }

    /// Starts a fill. No I/O: the temp file is created by the first write.
    pub fn writer(&self, h: Hash, key: &str, meta: (Bytes, Bytes)) -> DiskWriter {
        let seq = self.0.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .0
            .root
            .join("tmp")
            .join(format!("{}.{}.{seq}", hex(&h), std::process::id()));
        DiskWriter {
            tier: self.clone(),
            file: None,
            tmp_meta: tmp.with_extension(format!("{seq}.meta")),
            tmp,
            hash: h,
            key: key.to_string(),
            meta,
            id: random_id(),
            body_len: 0,
            block_crc: crc32fast::Hasher::new(),
            block_fill: 0,
            table: Vec::new(),
            reserved: 0,
        }
    }

    /// Commits a fill: seals and syncs the temp files, renames them into place, fsyncs the
    /// shard directory, then publishes the entry in the index through `gate` (which runs the
    /// insertion it is given only if the fill is still wanted, and says whether it did; not
    /// wanted: the files are removed). Returns the entry's size, `None` if the gate refused.
    /// Blocking.
    pub fn finish(
        &self,
        mut w: DiskWriter,
        gate: &dyn Fn(&mut dyn FnMut()) -> bool,
    ) -> io::Result<Option<u64>> {
        let size = w.seal()?;
        let h = w.hash;
        let _s = self.stripe(&h).lock();
        let dest = self.path(&h);
        let shard = dest.parent().expect("sharded");
        if !shard.is_dir() {
            fs::create_dir_all(shard)?;
            sync_dir(&self.0.root)?;
        }
        let placed = fs::rename(&w.tmp, &dest)
            .and_then(|_| fs::rename(&w.tmp_meta, self.meta_path(&h)))
            .and_then(|_| sync_dir(shard));
        w.file = None; // renamed (or removed below): the writer's Drop leaves the files alone
        if let Err(e) = placed {
            // The old entry's files may be half replaced: drop it, and what is left in tmp/.
            self.drop_locked(&h, None);
            let _ = fs::remove_file(&w.tmp);
            let _ = fs::remove_file(&w.tmp_meta);
            return Err(e);
        }
        let reserved = std::mem::take(&mut w.reserved);
        let (id, key) = (w.id, std::mem::take(&mut w.key).into_boxed_str());
        let mut key = Some(key);
        let published = gate(&mut || {
            let mut ix = self.0.index.lock();
            ix.reserved -= reserved;
            ix.insert(h, size, id, key.take().expect("published once"));
        });
        if !published {
            self.release(reserved);
            // No other commit of `h` can run meanwhile: whatever the index holds for `h` is
            // the entry these files replaced (its removal is under way): drop both.
            self.drop_locked(&h, None);
        }
        drop(_s);
        self.publish();
        Ok(published.then_some(size))
    }

    /// Replaces an entry's meta (a revalidation): a new meta file with the body file's
    /// identity, synced and renamed over the old one. The body file is not touched. Blocking.
    pub fn update_meta(&self, h: &Hash, meta: (Bytes, Bytes)) -> io::Result<bool> {
        let new_len = META_HEADER_LEN + meta.0.len() as u64 + meta.1.len() as u64;
        {
            // Most recently used: the reservation below must not evict this very entry.
            let mut ix = self.0.index.lock();
            if !ix.map.contains_key(h) {
                return Ok(false);
            }
            ix.touch(h);
        }
        // Reserved before the stripe lock: a reservation may evict (and lock other stripes).
        self.reserve(new_len)?;
        let mut reservation = new_len;
        let res = self.replace_meta(h, &meta, &mut reservation);
        self.release(reservation);
        res
    }

    /// Writes the new meta file; `reservation` is zeroed once it has become the entry's.
    fn replace_meta(
        &self,
        h: &Hash,
        meta: &(Bytes, Bytes),
        reservation: &mut u64,
    ) -> io::Result<bool> {
        let new_len = *reservation;
        let _s = self.stripe(h).lock();
        let Some(want) = self.0.index.lock().map.get(h).map(|e| e.id) else {
            return Ok(false);
        };
        let path = self.meta_path(h);
        let current = File::open(&path).and_then(|f| {
            let len = f.metadata()?.len();
            Ok((read_meta(&f, len)?.0, len))
        });
        let (ident, old_len) = match current {
            Ok((ident, len)) if ident.id == want => (ident, len),
            Ok(_) | Err(_) => {
                log::warn!("cache: removing entry {} with a bad meta file", hex(h));
                self.drop_locked(h, Some(want));
                return Ok(false);
            }
        };
        let seq = self.0.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp =
            self.0
                .root
                .join("tmp")
                .join(format!("{}.{}.{seq}.meta", hex(h), std::process::id()));
        let written = (|| {
            let f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all_at(&encode_meta(&ident, meta), 0)?;
            f.sync_data()?;
            drop(f);
            fs::rename(&tmp, &path)
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        {
            let mut guard = self.0.index.lock();
            let ix = &mut *guard;
            ix.reserved -= new_len;
            *reservation = 0;
            if let Some(e) = ix.map.get_mut(h) {
                e.size = e.size - old_len + new_len;
                ix.bytes = ix.bytes - old_len + new_len;
            }
        }
        sync_dir(path.parent().expect("sharded"))?;
        Ok(true)
    }

    fn evict_over_limit(&self) {
        let victims: Vec<Hash> = {
            let mut ix = self.0.index.lock();
            let mut v = Vec::new();
            while ix.bytes + ix.reserved > self.0.limit {
                match ix.pop_lru() {
                    Some(h) => v.push(h),
                    None => break,
                }
            }
            v
        };
        METRICS
            .cache_evictions
            .with_label_values(&["disk"])
            .inc_by(victims.len() as u64);
        self.unlink_removed(&victims);
    }

    fn publish(&self) {
        let ix = self.0.index.lock();
        METRICS
            .cache_bytes
            .with_label_values(&["disk"])
            .set(ix.bytes as f64);
        METRICS
            .cache_objects
            .with_label_values(&["disk"])
            .set(ix.map.len() as f64);
    }

    /// Every hash in the index (tests and purge-all).
    pub fn all(&self) -> HashSet<Hash> {
        self.0.index.lock().map.keys().copied().collect()
    }
}

/// An in-progress fill. Its temp file's bytes are reserved in the tier as they are written.
/// Dropping it without [`DiskTier::finish`] releases the reservation and removes the temp
/// file (on the blocking pool when there is a runtime).
pub struct DiskWriter {
    tier: DiskTier,
    file: Option<File>,
    tmp: PathBuf,
    tmp_meta: PathBuf,
    hash: Hash,
    key: String,
    meta: (Bytes, Bytes),
    id: u64,
    body_len: u64,
    block_crc: crc32fast::Hasher,
    block_fill: u64,
    table: Vec<u32>,
    reserved: u64,
}

impl DiskWriter {
    /// The entry's identity once committed (a fresh random id per writer): an entry with
    /// this id holds exactly these bytes.
    pub fn id(&self) -> u64 {
        self.id
    }

    fn body_offset(&self) -> u64 {
        HEADER_LEN + self.key.len() as u64
    }

    fn grow(&mut self, n: u64) -> io::Result<()> {
        self.tier.reserve(n)?;
        self.reserved += n;
        Ok(())
    }

    /// Creates the temp file (head placeholder and key) and reserves both files' fixed parts.
    fn open(&mut self) -> io::Result<&File> {
        if self.file.is_none() {
            let fixed = self.body_offset()
                + META_HEADER_LEN
                + self.meta.0.len() as u64
                + self.meta.1.len() as u64;
            self.grow(fixed)?;
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&self.tmp)?;
            // A placeholder head (no magic) until seal writes the real one.
            let mut head = vec![0u8; HEADER_LEN as usize];
            head.extend_from_slice(self.key.as_bytes());
            f.write_all_at(&head, 0)?;
            self.file = Some(f);
        }
        Ok(self.file.as_ref().expect("just opened"))
    }

    /// Appends body chunks, reserving their room first. Blocking.
    pub fn write_batch(&mut self, chunks: &[Bytes]) -> io::Result<()> {
        self.open()?;
        let n: u64 = chunks.iter().map(|c| c.len() as u64).sum();
        self.grow(n + 4 * (blocks(self.body_len + n) - blocks(self.body_len)))?;
        for c in chunks {
            self.append(c)?;
        }
        Ok(())
    }

    /// Appends one chunk. Blocking.
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.write_batch(&[Bytes::copy_from_slice(data)])
    }

    fn append(&mut self, mut data: &[u8]) -> io::Result<()> {
        let at = self.body_offset() + self.body_len;
        self.file
            .as_ref()
            .ok_or_else(|| io::Error::other("closed"))?
            .write_all_at(data, at)?;
        self.body_len += data.len() as u64;
        while !data.is_empty() {
            let take = ((BLOCK - self.block_fill) as usize).min(data.len());
            self.block_crc.update(&data[..take]);
            self.block_fill += take as u64;
            data = &data[take..];
            if self.block_fill == BLOCK {
                let full = std::mem::replace(&mut self.block_crc, crc32fast::Hasher::new());
                self.table.push(full.finalize());
                self.block_fill = 0;
            }
        }
        Ok(())
    }

    /// Body bytes written so far.
    pub fn written(&self) -> u64 {
        self.body_len
    }

    /// Writes the block table and the real head, syncs; writes and syncs the meta temp file.
    /// Returns both files' size.
    fn seal(&mut self) -> io::Result<u64> {
        self.open()?;
        if self.block_fill > 0 {
            let last = std::mem::replace(&mut self.block_crc, crc32fast::Hasher::new());
            self.table.push(last.finalize());
            self.block_fill = 0;
        }
        let ident = Identity {
            id: self.id,
            body_len: self.body_len,
            table_crc: table_crc(&self.table),
        };
        let mut table = Vec::with_capacity(4 * self.table.len());
        for c in &self.table {
            table.extend_from_slice(&c.to_le_bytes());
        }
        let f = self.file.as_ref().expect("open");
        f.write_all_at(&table, self.body_offset() + self.body_len)?;
        f.write_all_at(&encode_body_head(&ident, &self.key), 0)?;
        f.sync_data()?;
        let meta = encode_meta(&ident, &self.meta);
        let m = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&self.tmp_meta)?;
        m.write_all_at(&meta, 0)?;
        m.sync_data()?;
        let size = self.body_offset() + self.body_len + table.len() as u64 + meta.len() as u64;
        debug_assert_eq!(size, self.reserved);
        Ok(size)
    }
}

impl Drop for DiskWriter {
    fn drop(&mut self) {
        self.tier.release(std::mem::take(&mut self.reserved));
        if let Some(f) = self.file.take() {
            let (tmp, tmp_meta) = (self.tmp.clone(), self.tmp_meta.clone());
            offload(move || {
                drop(f);
                let _ = fs::remove_file(tmp);
                let _ = fs::remove_file(tmp_meta);
            });
        }
    }
}

/// One `preadv2` at `offset` into `buf`'s spare capacity, up to `buf.len() == len`; the bytes
/// read are appended (`buf.len()` grows by the count returned). Not zeroed first: for a
/// 1 MiB hit, zeroing cost as much as the CRCs. `flags`: `RWF_NOWAIT` or 0.
fn pread_spare(
    file: &File,
    buf: &mut Vec<u8>,
    len: usize,
    offset: u64,
    flags: libc::c_int,
) -> io::Result<usize> {
    let want = len
        .saturating_sub(buf.len())
        .min(buf.capacity() - buf.len());
    let offset = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset out of range"))?;
    let iov = libc::iovec {
        iov_base: buf.spare_capacity_mut().as_mut_ptr().cast(),
        iov_len: want,
    };
    // SAFETY: the iovec covers `want` bytes of `buf`'s spare capacity, which nothing else
    // aliases while the kernel writes it; `set_len` counts only the bytes it wrote.
    let n = unsafe {
        libc::preadv2(
            std::os::fd::AsRawFd::as_raw_fd(file),
            &iov,
            1,
            offset,
            flags,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    debug_assert!(n <= want);
    // SAFETY: the kernel initialised `n <= want` bytes past the old length.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// Reads a body from an open entry, checking the CRC of every block it reads.
pub struct BodyReader {
    tier: DiskTier,
    hash: Hash,
    id: u64,
    file: File,
    body_offset: u64,
    body_len: u64,
    table: Vec<u32>,
    pos: u64,
    end: u64,
    /// The first block, read and checked by the lookup; served from while `pos` is in it
    /// (whatever range `seek` sets), dropped once past it.
    first: Option<Bytes>,
    /// Try the page cache from the caller's thread first ([`BodyReader::next_chunk_cached`]).
    cached_reads: bool,
}

impl BodyReader {
    pub fn new(tier: DiskTier, hash: Hash, obj: DiskObject) -> Self {
        BodyReader {
            tier,
            hash,
            id: obj.head.ident.id,
            body_offset: obj.head.body_offset(),
            body_len: obj.head.ident.body_len,
            file: obj.file,
            table: obj.table,
            pos: 0,
            end: obj.head.ident.body_len,
            first: None,
            cached_reads: true,
        }
    }

    /// Turns the page-cache reads of [`BodyReader::next_chunk_cached`] off (every block then
    /// goes through [`BodyReader::next_chunk_into`]): for tests of that path.
    pub fn set_cached_reads(&mut self, on: bool) {
        self.cached_reads = on;
    }

    /// Reads and checks the first block and keeps it for the first chunk. Blocking.
    fn read_first_block(&mut self, buf: Vec<u8>) -> io::Result<()> {
        if self.body_len > 0 {
            self.first = Some(self.read_checked(0, BLOCK.min(self.body_len), buf)?);
        }
        Ok(())
    }

    /// The next chunk if it needs no I/O (from the first block).
    fn chunk_from_first(&mut self) -> Option<Bytes> {
        let first = self.first.as_ref()?;
        let len = first.len() as u64;
        if self.pos >= len {
            self.first = None;
            return None;
        }
        let to = self.end.min(len);
        let chunk = first.slice(self.pos as usize..to as usize);
        self.pos = to;
        if to >= len {
            self.first = None;
        }
        Some(chunk)
    }

    /// The blocks the next chunk reads: `(first block's offset in the body, the chunk's end)`.
    fn next_span(&self) -> (u64, u64) {
        let block_start = self.pos / BLOCK * BLOCK;
        (block_start, self.end.min(block_start + READ_BLOCKS * BLOCK))
    }

    /// Cuts the next chunk out of `buf` (the blocks from `block_start` on, checked).
    fn take(&mut self, block_start: u64, to: u64, buf: Vec<u8>) -> Bytes {
        let chunk =
            Bytes::from(buf).slice((self.pos - block_start) as usize..(to - block_start) as usize);
        self.pos = to;
        chunk
    }

    /// Without blocking: the next chunk when it needs no read or when the page cache holds
    /// all of its blocks, read on the calling thread with `preadv2(RWF_NOWAIT)` and checked.
    /// `None` when it would block (the kernel answers `EAGAIN` for a block not in memory),
    /// when the read is short or fails, when the kernel or file system has no `RWF_NOWAIT`,
    /// or when a block is bad: the caller then reads the chunk on the blocking pool
    /// ([`BodyReader::next_chunk_into`]), which reports the error and removes a bad entry
    /// (that takes a lock a commit holds through its fsync, so never on this thread). `buf`:
    /// the chunk's buffer, given capacity here only when a read is tried.
    pub fn next_chunk_cached(&mut self, buf: &mut Vec<u8>) -> Option<io::Result<Option<Bytes>>> {
        if self.pos >= self.end {
            return Some(Ok(None));
        }
        if let Some(chunk) = self.chunk_from_first() {
            return Some(Ok(Some(chunk)));
        }
        if !self.cached_reads || self.tier.0.no_nowait.load(Ordering::Relaxed) {
            return None;
        }
        let (block_start, to) = self.next_span();
        let len = ((to.div_ceil(BLOCK) * BLOCK).min(self.body_len) - block_start) as usize;
        buf.clear();
        buf.reserve_exact(len);
        let offset = self.body_offset + block_start;
        match pread_spare(&self.file, buf, len, offset, libc::RWF_NOWAIT) {
            Ok(n) if n == len => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS)) => {
                self.tier.0.no_nowait.store(true, Ordering::Relaxed);
                return None;
            }
            _ => return None,
        }
        if self.first_bad(block_start / BLOCK, buf).is_some() {
            return None;
        }
        METRICS.cache_disk_block_reads[0].inc();
        Some(Ok(Some(self.take(block_start, to, std::mem::take(buf)))))
    }

    pub fn body_len(&self) -> u64 {
        self.body_len
    }

    /// Restricts the reads to `start..end` (no I/O).
    pub fn seek(&mut self, start: u64, end: Option<u64>) -> io::Result<()> {
        let end = end.unwrap_or(self.body_len).min(self.body_len);
        if start > end {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad range"));
        }
        self.pos = start;
        self.end = end;
        Ok(())
    }

    /// The index of the first block of `buf` (blocks from `first` on) that does not match
    /// the block table.
    fn first_bad(&self, first: u64, buf: &[u8]) -> Option<usize> {
        buf.chunks(BLOCK as usize)
            .enumerate()
            .map(|(i, block)| (first as usize + i, block))
            .find(|(ix, block)| crc32fast::hash(block) != self.table[*ix])
            .map(|(ix, _)| ix)
    }

    /// Checks the blocks of `buf` (from `first` on); a bad one removes the entry. Blocking.
    fn check_blocks(&self, first: u64, buf: &[u8]) -> io::Result<()> {
        if let Some(ix) = self.first_bad(first, buf) {
            self.tier.drop_entry(&self.hash, self.id);
            return Err(bad(format!(
                "cache entry {} block {ix} checksum mismatch",
                hex(&self.hash)
            )));
        }
        Ok(())
    }

    /// Reads the blocks covering `from..to` and checks each; returns them from `from`'s block
    /// on. A bad block removes the entry.
    fn read_checked(&self, from: u64, to: u64, buf: Vec<u8>) -> io::Result<Bytes> {
        let first = from / BLOCK;
        let buf = self.read_blocks(first * BLOCK, to, buf)?;
        self.check_blocks(first, &buf)?;
        Ok(Bytes::from(buf))
    }

    /// Reads the blocks from `start` (a block's offset in the body) up to the one holding
    /// `to`'s last byte into `buf`, unchecked. Blocking.
    fn read_blocks(&self, start: u64, to: u64, mut buf: Vec<u8>) -> io::Result<Vec<u8>> {
        let stop = (to.div_ceil(BLOCK) * BLOCK).min(self.body_len);
        let len = (stop - start) as usize;
        buf.clear();
        buf.reserve_exact(len);
        while buf.len() < len {
            let offset = self.body_offset + start + buf.len() as u64;
            match pread_spare(&self.file, &mut buf, len, offset, 0) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "cache file shorter than its head says",
                    ))
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(buf)
    }

    /// The next chunk (up to [`READ_BLOCKS`] blocks), `None` at the end. `Err` on I/O error
    /// or a bad block (the entry is removed, so the next request is a miss). Blocking.
    pub fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        self.next_chunk_into(Vec::new())
    }

    /// [`BodyReader::next_chunk`] into `buf` (a buffer of [`READ_BLOCKS`] blocks).
    pub fn next_chunk_into(&mut self, buf: Vec<u8>) -> io::Result<Option<Bytes>> {
        if self.pos >= self.end {
            return Ok(None);
        }
        if let Some(chunk) = self.chunk_from_first() {
            return Ok(Some(chunk));
        }
        let (block_start, to) = self.next_span();
        METRICS.cache_disk_block_reads[1].inc();
        let buf = self.read_blocks(block_start, to, buf)?;
        self.check_blocks(block_start / BLOCK, &buf)?;
        Ok(Some(self.take(block_start, to, buf)))
    }

    /// Reads the whole body in pieces of `piece` bytes (a multiple of [`BLOCK`]), each into
    /// its own buffer, the next of `bufs` (allocated here when they run out), checking every
    /// block. Buffers allocated by the thread that will send and free the body (a proxy
    /// worker) keep the allocator's memory hot there: a buffer allocated on one of the many
    /// blocking-pool threads and freed on the worker came back cold, and a 1 MiB disk hit
    /// cost twice the CPU. Blocking.
    pub fn read_all_into(self, piece: u64, bufs: Vec<Vec<u8>>) -> io::Result<Vec<Bytes>> {
        debug_assert!(piece > 0 && (piece % BLOCK == 0 || piece >= self.body_len));
        let mut bufs = bufs.into_iter();
        let mut out = Vec::with_capacity(self.body_len.div_ceil(piece) as usize);
        let mut start = 0;
        while start < self.body_len {
            let to = start.saturating_add(piece).min(self.body_len);
            let buf = self.read_blocks(start, to, bufs.next().unwrap_or_default())?;
            self.check_blocks(start / BLOCK, &buf)?;
            out.push(Bytes::from(buf));
            start = to;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn h(i: u8) -> Hash {
        [i; 16]
    }

    fn put(t: &DiskTier, i: u8, body: &[u8]) {
        let mut w = t.writer(
            h(i),
            &format!("g\0key{i}"),
            (Bytes::from_static(b"meta0"), Bytes::new()),
        );
        w.write(body).unwrap();
        assert!(t
            .finish(w, &|p| {
                p();
                true
            })
            .unwrap()
            .is_some());
    }

    fn read(t: &DiskTier, i: u8) -> Option<Vec<u8>> {
        match t.load(&h(i), u64::MAX)?.body {
            LoadedBody::Whole(b) => Some(b.concat()),
            LoadedBody::Stream(_) => unreachable!(),
        }
    }

    fn reader(t: &DiskTier, i: u8) -> BodyReader {
        match t.load(&h(i), 0).unwrap().body {
            LoadedBody::Stream(r) => r,
            LoadedBody::Whole(b) => {
                assert!(b.is_empty());
                BodyReader::new(t.clone(), h(i), t.open_object(&h(i)).unwrap())
            }
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn round_trip_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        {
            let t = DiskTier::open(dir.path(), 1 << 20).unwrap();
            put(&t, 1, b"hello");
            put(&t, 2, b"");
            assert_eq!(read(&t, 1).unwrap(), b"hello");
            assert_eq!(read(&t, 2).unwrap(), b"");
        }
        let t = DiskTier::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(read(&t, 1).unwrap(), b"hello");
        assert_eq!(read(&t, 2).unwrap(), b"");
        let obj = t.open_object(&h(1)).unwrap();
        assert_eq!(obj.head.key, "g\0key1");
        assert_eq!(&obj.meta.0[..], b"meta0");
        // The index accounts for both files of every entry, and nothing else.
        assert_eq!(t.bytes(), walk(dir.path()));
        assert_eq!(t.reserved(), 0);
    }

    #[test]
    fn ranged_reads_cross_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let t = DiskTier::open(dir.path(), 8 << 20).unwrap();
        let body = pattern(5 * BLOCK as usize + 123);
        put(&t, 1, &body);
        for (s, e) in [
            (0, 1),
            (BLOCK - 1, BLOCK + 1),
            (100, 4 * BLOCK + 7),
            (5 * BLOCK, 5 * BLOCK + 123),
        ] {
            let mut r = reader(&t, 1);
            r.seek(s, Some(e)).unwrap();
            let mut got = Vec::new();
            while let Some(c) = r.next_chunk().unwrap() {
                got.extend_from_slice(&c);
            }
            assert_eq!(got, &body[s as usize..e as usize], "{s}..{e}");
        }
    }

    #[test]
    fn a_corrupt_middle_block_fails_a_ranged_read_and_removes_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let t = DiskTier::open(dir.path(), 8 << 20).unwrap();
        let body = pattern(16 * BLOCK as usize);
        put(&t, 1, &body);
        // Flip one byte in block 9 (of 16).
        let p = t.path(&h(1));
        flip_body_byte(&t, 1, 9 * BLOCK + 1000);
        // A range that does not touch block 9 is served (its blocks check out).
        let mut r = reader(&t, 1);
        r.seek(2 * BLOCK + 5, Some(3 * BLOCK)).unwrap();
        assert_eq!(
            r.next_chunk().unwrap().unwrap(),
            &body[2 * BLOCK as usize + 5..3 * BLOCK as usize]
        );
        // A range starting in block 8 and running through block 9 serves block 8's part
        // (checked), and the read of block 9 fails.
        let mut r = reader(&t, 1);
        r.seek(8 * BLOCK + 10, Some(9 * BLOCK + 20)).unwrap();
        assert_eq!(
            r.next_chunk().unwrap().unwrap(),
            &body[8 * BLOCK as usize + 10..9 * BLOCK as usize]
        );
        let err = r.next_chunk().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(!t.contains(&h(1)), "the entry is out of the index");
        assert!(!p.exists(), "and its files are gone");
        assert!(!t.meta_path(&h(1)).exists());
        assert!(t.open_object(&h(1)).is_none());
    }

    #[test]
    fn a_corrupt_block_makes_a_whole_read_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let t = DiskTier::open(dir.path(), 8 << 20).unwrap();
        put(&t, 3, &pattern(3 * BLOCK as usize));
        let p = t.path(&h(3));
        let mut bytes = fs::read(&p).unwrap();
        let n = bytes.len();
        bytes[n - 12 - 100] ^= 0xff; // in the last block, before the 3-entry table
        fs::write(&p, bytes).unwrap();
        assert!(read(&t, 3).is_none());
        assert!(!p.exists());
    }

    #[test]
    fn a_whole_read_comes_in_pieces_each_in_its_own_buffer_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let t = DiskTier::open(dir.path(), 8 << 20).unwrap();
        let len = 10 * BLOCK as usize + 77;
        let body = pattern(len);
        put(&t, 1, &body);
        let piece = 4 * BLOCK;
        // Buffers handed in are used (no reallocation); missing ones are made.
        let given = Vec::with_capacity(piece as usize);
        let given_ptr = given.as_ptr();
        let found = t.load_into(&h(1), u64::MAX, piece, vec![given]).unwrap();
        let LoadedBody::Whole(pieces) = found.body else {
            panic!("read whole")
        };
        let sizes: Vec<usize> = pieces.iter().map(Bytes::len).collect();
        assert_eq!(
            sizes,
            [piece as usize, piece as usize, 2 * BLOCK as usize + 77]
        );
        assert_eq!(pieces[0].as_ptr(), given_ptr);
        assert_eq!(pieces.concat(), body);
        // A streamed load reads its first block into the first buffer.
        let given = Vec::with_capacity(BLOCK as usize);
        let given_ptr = given.as_ptr();
        let found = t.load_into(&h(1), 0, piece, vec![given]).unwrap();
        let LoadedBody::Stream(mut r) = found.body else {
            panic!("streamed")
        };
        let first = r.next_chunk().unwrap().unwrap();
        assert_eq!(first.as_ptr(), given_ptr);
        assert_eq!(first, &body[..BLOCK as usize]);
        // A bad block in the last piece fails the whole read, and removes the entry.
        flip_body_byte(&t, 1, 9 * BLOCK + 3);
        assert!(t.load_into(&h(1), u64::MAX, piece, Vec::new()).is_none());
        assert!(!t.contains(&h(1)));
    }

    /// Whether this kernel and file system answer `preadv2(RWF_NOWAIT)` for a file just
    /// written (in the page cache): where they do not, the cached path must give way to the
    /// pool, which the tests below check either way.
    fn nowait_works(path: &Path) -> bool {
        let f = File::open(path).unwrap();
        let mut b = Vec::with_capacity(16);
        pread_spare(&f, &mut b, 16, 0, libc::RWF_NOWAIT).is_ok_and(|n| n == 16)
    }

    /// Flips one bit of body byte `at` of entry `i` (written with `put`), in place.
    fn flip_body_byte(t: &DiskTier, i: u8, at: u64) {
        let offset = HEADER_LEN + format!("g\0key{i}").len() as u64 + at;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(t.path(&h(i)))
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, offset).unwrap();
        f.write_all_at(&[b[0] ^ 0x40], offset).unwrap();
    }

    /// Reads the rest of `r`'s range as the storage does: the cached path, the pool's when
    /// that gives way. Returns the bytes, the chunks' sizes and how many came from the cache.
    fn stream(r: &mut BodyReader) -> io::Result<(Vec<u8>, Vec<usize>, usize)> {
        let (mut got, mut sizes, mut cached) = (Vec::new(), Vec::new(), 0);
        loop {
            let mut buf = Vec::with_capacity(BLOCK as usize);
            let chunk = match r.next_chunk_cached(&mut buf) {
                Some(c) => {
                    cached += 1;
                    c?
                }
                None => r.next_chunk_into(buf)?,
            };
            let Some(c) = chunk else {
                return Ok((got, sizes, cached));
            };
            sizes.push(c.len());
            got.extend_from_slice(&c);
        }
    }

    #[test]
    fn a_streamed_body_comes_a_block_at_a_time_from_the_page_cache_or_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let t = DiskTier::open(dir.path(), 8 << 20).unwrap();
        let body = pattern(5 * BLOCK as usize + 123);
        put(&t, 1, &body);
        let nowait = nowait_works(&t.path(&h(1)));
        eprintln!("preadv2(RWF_NOWAIT) serves the page cache here: {nowait}");
        for cached_reads in [true, false] {
            for (s, e) in [
                (0, body.len() as u64),
                (0, 1),
                (BLOCK - 1, BLOCK + 1),
                (100, 4 * BLOCK + 7),
                (3 * BLOCK + 1, 5 * BLOCK + 123),
            ] {
                let mut r = reader(&t, 1);
                r.set_cached_reads(cached_reads);
                r.seek(s, Some(e)).unwrap();
                let (got, sizes, cached) = stream(&mut r).unwrap();
                let what = format!("{s}..{e}, cached reads {cached_reads}");
                assert_eq!(got, &body[s as usize..e as usize], "{what}");
                assert!(
                    sizes.iter().all(|&n| n as u64 <= BLOCK),
                    "{what}: {sizes:?}"
                );
                // One chunk per block touched, and the end reported once.
                assert_eq!(
                    sizes.len() as u64,
                    (e - 1) / BLOCK - s / BLOCK + 1,
                    "{what}"
                );
                // The first block came with the lookup; past it, the page cache (a file just
                // written is in it) unless turned off or unsupported.
                let from_first = usize::from(s < BLOCK);
                let expect = if cached_reads && nowait {
                    sizes.len() + 1
                } else {
                    from_first + 1
                };
                assert_eq!(cached, expect, "{what}: {sizes:?}");
            }
        }
    }

    /// Pingora serves a multipart range by seeking the same hit handler once per part.
    #[test]
    fn seeks_back_and_forth_on_one_reader_serve_the_right_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let t = DiskTier::open(dir.path(), 8 << 20).unwrap();
        let body = pattern(5 * BLOCK as usize + 9);
        put(&t, 1, &body);
        let mut r = reader(&t, 1);
        for (s, e) in [
            (0, 10),
            (3 * BLOCK + 5, 4 * BLOCK + 1),
            (7, BLOCK + 3), // block 0 again, after its preloaded copy was dropped
            (BLOCK - 2, BLOCK),
            (5 * BLOCK, 5 * BLOCK + 9),
        ] {
            r.seek(s, Some(e)).unwrap();
            let (got, _, _) = stream(&mut r).unwrap();
            assert_eq!(got, &body[s as usize..e as usize], "{s}..{e}");
        }
        // Part of a range read, then a seek: the new range from its start.
        r.seek(BLOCK, None).unwrap();
        let mut buf = Vec::new();
        let c = match r.next_chunk_cached(&mut buf) {
            Some(c) => c.unwrap().unwrap(),
            None => r.next_chunk_into(buf).unwrap().unwrap(),
        };
        assert_eq!(c, &body[BLOCK as usize..2 * BLOCK as usize]);
        r.seek(4, Some(8)).unwrap();
        assert_eq!(stream(&mut r).unwrap().0, &body[4..8]);
    }

    #[test]
    fn a_corrupt_block_read_from_the_page_cache_fails_and_removes_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let t = DiskTier::open(dir.path(), 8 << 20).unwrap();
        let body = pattern(6 * BLOCK as usize);
        put(&t, 1, &body);
        let p = t.path(&h(1));
        flip_body_byte(&t, 1, 4 * BLOCK + 99);
        let nowait = nowait_works(&p);
        let mut r = reader(&t, 1);
        r.seek(2 * BLOCK, None).unwrap();
        let mut buf = Vec::new();
        for i in 2..4 {
            let c = match r.next_chunk_cached(&mut buf) {
                Some(c) => c.unwrap().unwrap(),
                None => {
                    assert!(!nowait, "a cached block went to the pool");
                    r.next_chunk_into(Vec::new()).unwrap().unwrap()
                }
            };
            assert_eq!(c, &body[i * BLOCK as usize..(i + 1) * BLOCK as usize]);
        }
        // The bad block is not served and the entry not removed on the calling thread (a
        // worker: the removal takes a lock a commit holds through its fsync); the pool's
        // read reports it and removes the entry.
        assert!(r.next_chunk_cached(&mut buf).is_none());
        assert!(t.contains(&h(1)));
        let err = r.next_chunk_into(buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(!t.contains(&h(1)));
        assert!(!p.exists());
        // Asked again (Pingora would not, after an error): the same error, no bytes.
        assert!(r.next_chunk_cached(&mut Vec::new()).is_none());
        assert!(r.next_chunk_into(Vec::new()).is_err());
    }

    #[test]
    fn a_lookup_checks_a_streamed_body_s_first_block() {
        let dir = tempfile::tempdir().unwrap();
        let t = DiskTier::open(dir.path(), 8 << 20).unwrap();
        let body = pattern(3 * BLOCK as usize);
        put(&t, 1, &body);
        let p = t.path(&h(1));
        flip_body_byte(&t, 1, 5);
        assert!(t.load(&h(1), 0).is_none(), "a miss");
        assert!(!t.contains(&h(1)));
        assert!(!p.exists());
    }

    #[test]
    fn a_body_cut_short_on_disk_is_an_error_from_either_path() {
        let dir = tempfile::tempdir().unwrap();
        let t = DiskTier::open(dir.path(), 8 << 20).unwrap();
        put(&t, 1, &pattern(4 * BLOCK as usize));
        let mut r = reader(&t, 1);
        // Truncated under an open reader (an operator, a failing disk): the cached read is
        // short and gives way; the pool's read says what is wrong.
        let f = OpenOptions::new().write(true).open(t.path(&h(1))).unwrap();
        f.set_len(HEADER_LEN + 6 + 2 * BLOCK).unwrap();
        drop(f);
        r.seek(2 * BLOCK, None).unwrap();
        let mut buf = Vec::new();
        assert!(r.next_chunk_cached(&mut buf).is_none());
        let err = r.next_chunk_into(buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    }

    #[test]
    fn abandoned_fill_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let t = DiskTier::open(dir.path(), 1 << 20).unwrap();
        let mut w = t.writer(h(2), "k", (Bytes::new(), Bytes::new()));
        w.write(b"partial").unwrap();
        assert!(t.reserved() > 0);
        drop(w);
        assert!(t.open_object(&h(2)).is_none());
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert_eq!(t.reserved(), 0);
    }

    #[test]
    fn a_refused_gate_publishes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let t = DiskTier::open(dir.path(), 1 << 20).unwrap();
        let mut w = t.writer(h(2), "k", (Bytes::new(), Bytes::new()));
        w.write(b"old version").unwrap();
        assert_eq!(t.finish(w, &|_| false).unwrap(), None);
        assert!(!t.contains(&h(2)));
        assert_eq!(walk(dir.path()), 0, "no file left");
        assert_eq!((t.bytes(), t.reserved()), (0, 0));
    }

    #[test]
    fn corrupt_truncated_unpaired_and_foreign_files_are_misses_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let t = DiskTier::open(dir.path(), 1 << 20).unwrap();
        for i in 3..=8 {
            put(&t, i, &vec![i; 5000]);
        }
        // Truncate: the length check catches it.
        let p4 = t.path(&h(4));
        let f = OpenOptions::new().write(true).open(&p4).unwrap();
        f.set_len(100).unwrap();
        assert!(t.open_object(&h(4)).is_none());
        assert!(!p4.exists());
        // A meta file paired with another body: dropped.
        fs::copy(t.meta_path(&h(6)), t.meta_path(&h(5))).unwrap();
        assert!(t.open_object(&h(5)).is_none());
        assert!(!t.path(&h(5)).exists() && !t.meta_path(&h(5)).exists());
        assert!(t.open_object(&h(6)).is_some(), "the other entry is fine");
        // A corrupt meta file.
        let m7 = t.meta_path(&h(7));
        let mut bytes = fs::read(&m7).unwrap();
        bytes[META_HEADER_LEN as usize] ^= 1;
        fs::write(&m7, bytes).unwrap();
        assert!(t.open_object(&h(7)).is_none());
        // A foreign file in a shard directory is removed on reload; so are garbage with a
        // valid name, a body without its meta file, and a meta file without its body.
        let foreign = p4.parent().unwrap().join("not-a-cache-file");
        fs::write(&foreign, b"x").unwrap();
        let p3 = t.path(&h(3));
        fs::write(&p3, b"garbage garbage garbage garbage garbage garbage").unwrap();
        fs::remove_file(t.meta_path(&h(8))).unwrap();
        fs::remove_file(t.path(&h(6))).unwrap();
        drop(t);
        let t = DiskTier::open(dir.path(), 1 << 20).unwrap();
        assert!(!foreign.exists());
        assert!(t.all().is_empty(), "{:?}", t.all());
        assert_eq!(walk(dir.path()), 0, "every file removed");
    }

    #[test]
    fn format_1_files_are_removed_at_start() {
        let dir = tempfile::tempdir().unwrap();
        // A valid format-1 file, as the previous release wrote it: 36-byte head, key, metas,
        // body, with the whole-body CRC.
        let (key, m0, body) = (
            b"g\0old".as_slice(),
            b"meta".as_slice(),
            b"old body".as_slice(),
        );
        let mut head = Vec::new();
        head.extend_from_slice(b"CASCADE\x01");
        head.extend_from_slice(&(key.len() as u32).to_le_bytes());
        head.extend_from_slice(&(m0.len() as u32).to_le_bytes());
        head.extend_from_slice(&0u32.to_le_bytes());
        head.extend_from_slice(&(body.len() as u64).to_le_bytes());
        head.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
        let mut c = crc32fast::Hasher::new();
        c.update(&head);
        c.update(key);
        c.update(m0);
        head.extend_from_slice(&c.finalize().to_le_bytes());
        let file = [head.as_slice(), key, m0, body].concat();
        let name = hex(&h(0xab));
        fs::create_dir_all(dir.path().join(&name[..2])).unwrap();
        let old = dir.path().join(&name[..2]).join(&name);
        fs::write(&old, file).unwrap();
        let t = DiskTier::open(dir.path(), 1 << 20).unwrap();
        assert!(!old.exists(), "the format-1 file is removed");
        assert!(t.all().is_empty());
        assert_eq!(t.bytes(), 0);
    }

    #[test]
    fn bound_holds_and_lru_evicts() {
        let dir = tempfile::tempdir().unwrap();
        let t = DiskTier::open(dir.path(), 100_000).unwrap();
        for i in 0..30u8 {
            put(&t, i, &vec![i; 10_000]); // 300 KB written into a 100 KB tier
            assert!(t.bytes() <= 100_000);
        }
        let on_disk: u64 = walk(dir.path());
        assert!(on_disk <= 100_000, "{on_disk} bytes on disk");
        assert!(read(&t, 29).is_some(), "the newest survives");
        assert!(read(&t, 0).is_none(), "the oldest is gone");
    }

    #[test]
    fn temp_bytes_are_reserved_and_make_room_by_evicting() {
        let dir = tempfile::tempdir().unwrap();
        let limit = 1 << 20;
        let t = DiskTier::open(dir.path(), limit).unwrap();
        for i in 0..4u8 {
            put(&t, i, &vec![i; 200_000]);
        }
        let before = t.bytes();
        assert!(before > 800_000);
        // Two fills in flight at once: their temp files count against the limit as they grow.
        let mut a = t.writer(h(10), "a", (Bytes::new(), Bytes::new()));
        let mut b = t.writer(h(11), "b", (Bytes::new(), Bytes::new()));
        for _ in 0..5 {
            a.write(&[1u8; 50_000]).unwrap();
            b.write(&[2u8; 50_000]).unwrap();
            assert!(t.bytes() + t.reserved() <= limit);
            assert!(walk(dir.path()) <= limit, "{} on disk", walk(dir.path()));
        }
        assert!(t.reserved() >= 500_000);
        assert!(t.bytes() < before, "LRU entries were evicted to make room");
        assert!(!t.contains(&h(0)), "the oldest first");
        // A third fill that cannot get room while the others hold theirs is refused.
        let mut c = t.writer(h(12), "c", (Bytes::new(), Bytes::new()));
        let err = c.write(&vec![3u8; 600_000]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::StorageFull);
        drop(c);
        // Committing turns a reservation into the entry's size; dropping releases it.
        let held = t.reserved();
        assert!(t
            .finish(a, &|p| {
                p();
                true
            })
            .unwrap()
            .is_some());
        drop(b);
        assert_eq!(t.reserved(), 0);
        assert!(t.bytes() <= limit && t.bytes() >= held / 2);
        assert_eq!(t.bytes(), walk(dir.path()));
    }

    fn walk(p: &Path) -> u64 {
        let mut n = 0;
        for e in fs::read_dir(p).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                n += walk(&e.path());
            } else {
                n += e.metadata().unwrap().len();
            }
        }
        n
    }

    #[test]
    fn update_meta_rewrites_the_meta_file_only() {
        let dir = tempfile::tempdir().unwrap();
        let t = DiskTier::open(dir.path(), 1 << 20).unwrap();
        put(&t, 6, &pattern(200_000));
        let body_path = t.path(&h(6));
        let before = fs::metadata(&body_path).unwrap();
        let meta_before = fs::metadata(t.meta_path(&h(6))).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(t
            .update_meta(
                &h(6),
                (Bytes::from_static(b"a longer new meta"), Bytes::new())
            )
            .unwrap());
        let after = fs::metadata(&body_path).unwrap();
        assert_eq!(after.ino(), before.ino(), "the body file is the same file");
        assert_eq!(
            after.mtime_nsec(),
            before.mtime_nsec(),
            "and was not written"
        );
        assert_eq!(after.mtime(), before.mtime());
        assert_ne!(
            fs::metadata(t.meta_path(&h(6))).unwrap().ino(),
            meta_before.ino(),
            "the meta file was replaced"
        );
        let obj = t.open_object(&h(6)).unwrap();
        assert_eq!(&obj.meta.0[..], b"a longer new meta");
        assert_eq!(read(&t, 6).unwrap(), pattern(200_000));
        assert_eq!(t.bytes(), walk(dir.path()), "the size follows the new meta");
        assert_eq!(t.reserved(), 0);
        // And after a restart.
        drop(t);
        let t = DiskTier::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(
            &t.open_object(&h(6)).unwrap().meta.0[..],
            b"a longer new meta"
        );
        assert!(!t.update_meta(&h(7), (Bytes::new(), Bytes::new())).unwrap());
    }

    #[test]
    fn removals_unlink_both_files_unless_a_newer_entry_was_published() {
        let dir = tempfile::tempdir().unwrap();
        let t = DiskTier::open(dir.path(), 1 << 20).unwrap();
        put(&t, 1, b"one");
        assert!(t.remove(&h(1)));
        assert!(!t.path(&h(1)).exists() && !t.meta_path(&h(1)).exists());
        assert!(!t.remove(&h(1)));
        // An unlink that runs after a newer entry was published leaves it alone.
        put(&t, 2, b"old");
        t.0.index.lock().remove(&h(2));
        put(&t, 2, b"new");
        t.unlink_removed(&[h(2)]);
        assert_eq!(read(&t, 2).unwrap(), b"new");
    }

    #[test]
    fn concurrent_fills_removals_reads_and_meta_updates_stay_consistent() {
        let dir = tempfile::tempdir().unwrap();
        let limit = 1 << 20;
        let t = DiskTier::open(dir.path(), limit).unwrap();
        let versions = AtomicU64::new(1);
        std::thread::scope(|sc| {
            for seed in 0..4u64 {
                let (t, versions) = (&t, &versions);
                sc.spawn(move || {
                    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                    for _ in 0..150 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let i = (x % 5) as u8;
                        match (x >> 8) % 4 {
                            0 => {
                                // A body that names its version in every 8 bytes, and a
                                // meta that names it too.
                                let v = versions.fetch_add(1, Ordering::Relaxed);
                                let len = 8 * (1000 + (x >> 16) % 20_000) as usize;
                                let body: Vec<u8> =
                                    (0..len / 8).flat_map(|_| v.to_le_bytes()).collect();
                                let meta = (Bytes::from(format!("v{v}")), Bytes::new());
                                let mut w = t.writer(h(i), "k", meta);
                                if w.write(&body).is_ok() {
                                    let _ = t.finish(w, &|p| {
                                        p();
                                        true
                                    });
                                }
                            }
                            1 => {
                                t.remove(&h(i));
                            }
                            2 => {
                                let _ = t.update_meta(&h(i), (Bytes::from("u"), Bytes::new()));
                            }
                            _ => {
                                let Some(found) = t.load(&h(i), u64::MAX) else {
                                    continue;
                                };
                                let LoadedBody::Whole(body) = found.body else {
                                    unreachable!()
                                };
                                let body = body.concat();
                                let v = &body[..8];
                                assert!(body.chunks(8).all(|c| c == v), "a torn body");
                                let meta = String::from_utf8_lossy(&found.meta.0).to_string();
                                if let Some(mv) = meta.strip_prefix('v') {
                                    let bv = u64::from_le_bytes(v.try_into().unwrap());
                                    assert_eq!(mv, bv.to_string(), "meta of another body");
                                }
                            }
                        }
                        assert!(t.bytes() + t.reserved() <= limit);
                    }
                });
            }
        });
        assert_eq!(t.reserved(), 0);
        assert_eq!(
            t.bytes(),
            walk(dir.path()),
            "the index accounts for every file"
        );
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        // And what is left reloads as it is.
        let n = t.objects();
        drop(t);
        assert_eq!(DiskTier::open(dir.path(), limit).unwrap().objects(), n);
    }
}
