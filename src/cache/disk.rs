//! The disk tier: one file per object under `<path>/<2 hex>/<32 hex>`, bounded in bytes,
//! surviving restarts.
//!
//! File layout (little-endian):
//! ```text
//! "CASCADE\x01" | key_len u32 | meta0_len u32 | meta1_len u32 | body_len u64 | body_crc u32 | head_crc u32
//! key bytes | meta0 | meta1 | body
//! ```
//! `head_crc` covers every header field before it plus key and meta; `body_crc` covers the
//! body. A fill writes to `<path>/tmp/` and is renamed into place only after `finish`, so a
//! cancelled or failed fill leaves nothing that looks complete (pingora #932). At start the
//! index is rebuilt from the file headers; a file whose magic, header CRC or length is wrong
//! (corrupt, truncated, foreign) is removed. Body CRCs are checked on read: whole for objects
//! up to [`VERIFY_WHOLE`], while streaming for larger ones (a mismatch aborts the response,
//! which the client sees as a truncated transfer, never as a complete one).
//!
//! Eviction is LRU by last access, byte-exact against the configured size.
//!
//! I/O is plain blocking `std::fs` on the worker thread, as nginx does: reads and writes hit
//! the page cache and are short. A fill writes in the chunks the origin delivers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use parking_lot::Mutex;

use super::{hex, Hash};
use crate::metrics::METRICS;

const MAGIC: &[u8; 8] = b"CASCADE\x01";
pub const HEADER_LEN: u64 = 8 + 4 + 4 + 4 + 8 + 4 + 4;
/// Bodies up to this size are read and CRC-checked whole before they are served.
pub const VERIFY_WHOLE: u64 = 16 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub key_len: u32,
    pub meta0_len: u32,
    pub meta1_len: u32,
    pub body_len: u64,
    pub body_crc: u32,
}

impl Header {
    fn encode(&self, key: &[u8], meta0: &[u8], meta1: &[u8]) -> [u8; HEADER_LEN as usize] {
        let mut b = [0u8; HEADER_LEN as usize];
        b[..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&self.key_len.to_le_bytes());
        b[12..16].copy_from_slice(&self.meta0_len.to_le_bytes());
        b[16..20].copy_from_slice(&self.meta1_len.to_le_bytes());
        b[20..28].copy_from_slice(&self.body_len.to_le_bytes());
        b[28..32].copy_from_slice(&self.body_crc.to_le_bytes());
        let mut h = crc32fast::Hasher::new();
        h.update(&b[..32]);
        h.update(key);
        h.update(meta0);
        h.update(meta1);
        b[32..36].copy_from_slice(&h.finalize().to_le_bytes());
        b
    }

    fn body_offset(&self) -> u64 {
        HEADER_LEN + self.key_len as u64 + self.meta0_len as u64 + self.meta1_len as u64
    }
}

/// What a file's head holds once its magic, lengths and header CRC checked out.
pub struct Head {
    pub header: Header,
    pub key: String,
    pub meta: (Bytes, Bytes),
}

/// Reads and checks a file's head; `Err` means corrupt, truncated or not ours.
pub fn read_head(file: &mut File, file_len: u64) -> io::Result<Head> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    let mut b = [0u8; HEADER_LEN as usize];
    file.read_exact(&mut b)?;
    if &b[..8] != MAGIC {
        return Err(bad("bad magic"));
    }
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4"));
    let header = Header {
        key_len: u32_at(8),
        meta0_len: u32_at(12),
        meta1_len: u32_at(16),
        body_len: u64::from_le_bytes(b[20..28].try_into().expect("8")),
        body_crc: u32_at(28),
    };
    let head_crc = u32_at(32);
    if header.key_len > 64 * 1024 || header.meta0_len > 16 << 20 || header.meta1_len > 16 << 20 {
        return Err(bad("implausible lengths"));
    }
    if header.body_offset().checked_add(header.body_len) != Some(file_len) {
        return Err(bad("length mismatch (truncated?)"));
    }
    let mut rest = vec![0u8; (header.body_offset() - HEADER_LEN) as usize];
    file.read_exact(&mut rest)?;
    let (key, metas) = rest.split_at(header.key_len as usize);
    let (m0, m1) = metas.split_at(header.meta0_len as usize);
    let mut h = crc32fast::Hasher::new();
    h.update(&b[..32]);
    h.update(key);
    h.update(m0);
    h.update(m1);
    if h.finalize() != head_crc {
        return Err(bad("header checksum mismatch"));
    }
    let key = String::from_utf8(key.to_vec()).map_err(|_| bad("key is not UTF-8"))?;
    let rest = Bytes::from(rest);
    let k = header.key_len as usize;
    let m = k + header.meta0_len as usize;
    Ok(Head {
        header,
        key,
        meta: (rest.slice(k..m), rest.slice(m..)),
    })
}

struct Entry {
    size: u64,
    seq: u64,
    key: Box<str>,
}

#[derive(Default)]
struct Index {
    map: HashMap<Hash, Entry>,
    lru: BTreeMap<u64, Hash>,
    seq: u64,
    bytes: u64,
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

    fn insert(&mut self, h: Hash, size: u64, key: Box<str>) {
        self.remove(&h);
        self.seq += 1;
        self.lru.insert(self.seq, h);
        self.bytes += size;
        self.map.insert(
            h,
            Entry {
                size,
                seq: self.seq,
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
}

pub struct DiskTier {
    root: PathBuf,
    limit: u64,
    index: Mutex<Index>,
    tmp_seq: AtomicU64,
}

/// An open, checked object ready to be read.
pub struct DiskObject {
    pub file: File,
    pub head: Head,
    pub path: PathBuf,
}

impl DiskTier {
    /// Opens (creating if needed) the cache directory and rebuilds the index from the files
    /// in it. Bad files are removed; leftovers of interrupted fills are removed.
    pub fn open(root: &Path, limit: u64) -> io::Result<DiskTier> {
        fs::create_dir_all(root.join("tmp"))?;
        for e in fs::read_dir(root.join("tmp"))? {
            let _ = fs::remove_file(e?.path());
        }
        let tier = DiskTier {
            root: root.to_path_buf(),
            limit,
            index: Mutex::new(Index::default()),
            tmp_seq: AtomicU64::new(0),
        };
        let mut found: Vec<(std::time::SystemTime, Hash, u64, String)> = Vec::new();
        for shard in fs::read_dir(root)? {
            let shard = shard?;
            let name = shard.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.len() != 2 || !shard.file_type()?.is_dir() {
                continue;
            }
            for f in fs::read_dir(shard.path())? {
                let f = f?;
                let path = f.path();
                let parsed = f
                    .file_name()
                    .to_str()
                    .and_then(super::unhex)
                    .filter(|h| hex(h).starts_with(name));
                let Some(h) = parsed else {
                    log::warn!("cache: removing foreign file {}", path.display());
                    let _ = fs::remove_file(&path);
                    continue;
                };
                let checked = File::open(&path).and_then(|mut file| {
                    let md = file.metadata()?;
                    let head = read_head(&mut file, md.len())?;
                    Ok((md.accessed().or_else(|_| md.modified())?, md.len(), head))
                });
                match checked {
                    Ok((t, len, head)) => found.push((t, h, len, head.key)),
                    Err(e) => {
                        log::warn!("cache: removing bad file {}: {e}", path.display());
                        let _ = fs::remove_file(&path);
                    }
                }
            }
        }
        found.sort_by_key(|f| f.0);
        {
            let mut ix = tier.index.lock();
            for (_, h, len, key) in found {
                ix.insert(h, len, key.into_boxed_str());
            }
        }
        tier.evict_over_limit();
        tier.publish();
        Ok(tier)
    }

    fn path(&self, h: &Hash) -> PathBuf {
        let name = hex(h);
        self.root.join(&name[..2]).join(name)
    }

    /// Opens and checks an object. A bad file is removed and reported as absent.
    pub fn open_object(&self, h: &Hash) -> Option<DiskObject> {
        if !self.index.lock().map.contains_key(h) {
            return None;
        }
        let path = self.path(h);
        let res = File::open(&path).and_then(|mut file| {
            let len = file.metadata()?.len();
            let head = read_head(&mut file, len)?;
            Ok((file, head))
        });
        match res {
            Ok((file, head)) => {
                self.index.lock().touch(h);
                Some(DiskObject { file, head, path })
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    log::warn!("cache: removing bad file {}: {e}", path.display());
                }
                self.remove(h);
                None
            }
        }
    }

    pub fn remove(&self, h: &Hash) -> bool {
        let had = self.index.lock().remove(h);
        let _ = fs::remove_file(self.path(h));
        self.publish();
        had
    }

    /// Every entry's hash and cache key (to rebuild the storage catalog at start).
    pub fn entries(&self) -> Vec<(Hash, String)> {
        self.index
            .lock()
            .map
            .iter()
            .map(|(h, e)| (*h, e.key.to_string()))
            .collect()
    }

    pub fn contains(&self, h: &Hash) -> bool {
        self.index.lock().map.contains_key(h)
    }

    pub fn objects(&self) -> usize {
        self.index.lock().map.len()
    }

    pub fn bytes(&self) -> u64 {
        self.index.lock().bytes
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Starts a fill: a temp file with the head reserved.
    pub fn writer(&self, h: Hash, key: &str, meta: (Bytes, Bytes)) -> io::Result<DiskWriter> {
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .root
            .join("tmp")
            .join(format!("{}.{}.{seq}", hex(&h), std::process::id()));
        let mut file = File::create(&tmp)?;
        let header = Header {
            key_len: key.len() as u32,
            meta0_len: meta.0.len() as u32,
            meta1_len: meta.1.len() as u32,
            body_len: 0,
            body_crc: 0,
        };
        // A placeholder head (wrong CRC) until finish rewrites it.
        file.write_all(&[0u8; HEADER_LEN as usize])?;
        file.write_all(key.as_bytes())?;
        file.write_all(&meta.0)?;
        file.write_all(&meta.1)?;
        Ok(DiskWriter {
            file: Some(io::BufWriter::with_capacity(256 * 1024, file)),
            tmp,
            hash: h,
            key: key.to_string(),
            meta,
            header,
            crc: crc32fast::Hasher::new(),
        })
    }

    /// Moves a finished temp file into place and accounts for it (evicting LRU entries).
    fn commit(&self, w: &mut DiskWriter, size: u64) -> io::Result<()> {
        let dest = self.path(&w.hash);
        fs::create_dir_all(dest.parent().expect("sharded"))?;
        fs::rename(&w.tmp, &dest)?;
        self.index
            .lock()
            .insert(w.hash, size, w.key.clone().into_boxed_str());
        self.evict_over_limit();
        self.publish();
        Ok(())
    }

    /// Replaces an object's meta, keeping its body (a revalidation). Copies the body into a
    /// new file and renames it over the old one.
    pub fn update_meta(&self, h: &Hash, meta: (Bytes, Bytes)) -> io::Result<bool> {
        let Some(mut obj) = self.open_object(h) else {
            return Ok(false);
        };
        let mut w = self.writer(*h, &obj.head.key.clone(), meta)?;
        obj.file
            .seek(SeekFrom::Start(obj.head.header.body_offset()))?;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = obj.file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            w.write(&buf[..n])?;
        }
        if w.crc.clone().finalize() != obj.head.header.body_crc {
            drop(w);
            self.remove(h);
            return Ok(false);
        }
        self.finish(w)?;
        Ok(true)
    }

    pub fn finish(&self, mut w: DiskWriter) -> io::Result<u64> {
        let size = w.seal()?;
        let res = self.commit(&mut w, size);
        w.file = None;
        res.map(|_| size)
    }

    fn evict_over_limit(&self) {
        loop {
            let victim = {
                let mut ix = self.index.lock();
                if ix.bytes <= self.limit {
                    return;
                }
                let Some((_, h)) = ix.lru.pop_first() else {
                    return;
                };
                let e = ix.map.remove(&h).expect("lru and map agree");
                ix.bytes -= e.size;
                h
            };
            let _ = fs::remove_file(self.path(&victim));
            METRICS.cache_evictions.with_label_values(&["disk"]).inc();
        }
    }

    fn publish(&self) {
        let ix = self.index.lock();
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
        self.index.lock().map.keys().copied().collect()
    }
}

/// An in-progress fill. Dropping it without [`DiskTier::finish`] deletes the temp file.
pub struct DiskWriter {
    file: Option<io::BufWriter<File>>,
    tmp: PathBuf,
    hash: Hash,
    key: String,
    meta: (Bytes, Bytes),
    header: Header,
    crc: crc32fast::Hasher,
}

impl DiskWriter {
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("closed"))?;
        f.write_all(data)?;
        self.crc.update(data);
        self.header.body_len += data.len() as u64;
        Ok(())
    }

    /// Body bytes written so far.
    pub fn written(&self) -> u64 {
        self.header.body_len
    }

    /// Writes the real head and flushes; returns the file size.
    fn seal(&mut self) -> io::Result<u64> {
        let mut f = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("closed"))?
            .into_inner()
            .map_err(|e| e.into_error())?;
        self.header.body_crc = self.crc.clone().finalize();
        let head = self
            .header
            .encode(self.key.as_bytes(), &self.meta.0, &self.meta.1);
        f.seek(SeekFrom::Start(0))?;
        f.write_all(&head)?;
        let size = self.header.body_offset() + self.header.body_len;
        f.flush()?;
        Ok(size)
    }
}

impl Drop for DiskWriter {
    fn drop(&mut self) {
        // Either finish renamed it away (then this fails harmlessly) or the fill was abandoned.
        let _ = fs::remove_file(&self.tmp);
    }
}

/// Streams a body from an open object, checking its CRC when read from the start to the end.
pub struct BodyReader {
    file: File,
    path: PathBuf,
    body_offset: u64,
    body_len: u64,
    pos: u64,
    end: u64,
    crc: Option<(crc32fast::Hasher, u32)>,
}

pub const READ_CHUNK: usize = 64 * 1024;

impl BodyReader {
    pub fn new(obj: DiskObject) -> Self {
        let h = obj.head.header;
        BodyReader {
            file: obj.file,
            path: obj.path,
            body_offset: h.body_offset(),
            body_len: h.body_len,
            pos: 0,
            end: h.body_len,
            crc: Some((crc32fast::Hasher::new(), h.body_crc)),
        }
    }

    pub fn seek(&mut self, start: u64, end: Option<u64>) -> io::Result<()> {
        let end = end.unwrap_or(self.body_len).min(self.body_len);
        if start > end {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad range"));
        }
        if start != 0 || end != self.body_len {
            self.crc = None; // a partial read cannot check the whole-body CRC
        }
        self.pos = start;
        self.end = end;
        Ok(())
    }

    /// The next chunk, `None` at the end. `Err` on I/O error or CRC mismatch (the file is
    /// removed so the next request is a miss).
    pub fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        if self.pos >= self.end {
            if let Some((h, want)) = self.crc.take() {
                if h.finalize() != want {
                    let _ = fs::remove_file(&self.path);
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("cache file {} body checksum mismatch", self.path.display()),
                    ));
                }
            }
            return Ok(None);
        }
        let n = ((self.end - self.pos) as usize).min(READ_CHUNK);
        let mut buf = vec![0u8; n];
        self.file
            .seek(SeekFrom::Start(self.body_offset + self.pos))?;
        self.file.read_exact(&mut buf)?;
        self.pos += n as u64;
        if let Some((h, _)) = self.crc.as_mut() {
            h.update(&buf);
        }
        Ok(Some(Bytes::from(buf)))
    }

    /// Reads the whole body and checks its CRC.
    pub fn read_all(mut self) -> io::Result<Bytes> {
        let mut out = Vec::with_capacity(self.body_len as usize);
        while let Some(c) = self.next_chunk()? {
            out.extend_from_slice(&c);
        }
        Ok(Bytes::from(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u8) -> Hash {
        [i; 16]
    }

    fn put(t: &DiskTier, i: u8, body: &[u8]) {
        let mut w = t
            .writer(
                h(i),
                &format!("g\0key{i}"),
                (Bytes::from_static(b"meta0"), Bytes::new()),
            )
            .unwrap();
        w.write(body).unwrap();
        t.finish(w).unwrap();
    }

    fn read(t: &DiskTier, i: u8) -> Option<Vec<u8>> {
        let obj = t.open_object(&h(i))?;
        BodyReader::new(obj).read_all().ok().map(|b| b.to_vec())
    }

    #[test]
    fn round_trip_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        {
            let t = DiskTier::open(dir.path(), 1 << 20).unwrap();
            put(&t, 1, b"hello");
            assert_eq!(read(&t, 1).unwrap(), b"hello");
        }
        let t = DiskTier::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(read(&t, 1).unwrap(), b"hello");
        let obj = t.open_object(&h(1)).unwrap();
        assert_eq!(obj.head.key, "g\0key1");
        assert_eq!(&obj.head.meta.0[..], b"meta0");
    }

    #[test]
    fn abandoned_fill_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let t = DiskTier::open(dir.path(), 1 << 20).unwrap();
        let mut w = t.writer(h(2), "k", (Bytes::new(), Bytes::new())).unwrap();
        w.write(b"partial").unwrap();
        drop(w);
        assert!(t.open_object(&h(2)).is_none());
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn corrupt_truncated_and_foreign_files_are_misses_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let t = DiskTier::open(dir.path(), 1 << 20).unwrap();
        put(&t, 3, &vec![1u8; 5000]);
        put(&t, 4, &vec![2u8; 5000]);
        put(&t, 5, &vec![3u8; 5000]);
        // Flip a body byte: the CRC catches it on read.
        let p3 = t.path(&h(3));
        let mut bytes = fs::read(&p3).unwrap();
        let n = bytes.len();
        bytes[n - 10] ^= 0xff;
        fs::write(&p3, bytes).unwrap();
        assert!(read(&t, 3).is_none());
        assert!(!p3.exists(), "corrupt file removed");
        // Truncate: the length check catches it.
        let p4 = t.path(&h(4));
        let f = fs::OpenOptions::new().write(true).open(&p4).unwrap();
        f.set_len(100).unwrap();
        assert!(t.open_object(&h(4)).is_none());
        assert!(!p4.exists());
        // A foreign file in a shard directory is removed on reload.
        let foreign = p3.parent().unwrap().join("not-a-cache-file");
        fs::write(&foreign, b"x").unwrap();
        // Garbage with a valid name is removed on reload too.
        let p5 = t.path(&h(5));
        fs::write(&p5, b"garbage garbage garbage garbage garbage garbage").unwrap();
        drop(t);
        let t = DiskTier::open(dir.path(), 1 << 20).unwrap();
        assert!(!foreign.exists());
        assert!(!p5.exists());
        assert!(t.all().is_empty());
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
    fn update_meta_keeps_body() {
        let dir = tempfile::tempdir().unwrap();
        let t = DiskTier::open(dir.path(), 1 << 20).unwrap();
        put(&t, 6, b"body!");
        assert!(t
            .update_meta(&h(6), (Bytes::from_static(b"new meta"), Bytes::new()))
            .unwrap());
        let obj = t.open_object(&h(6)).unwrap();
        assert_eq!(&obj.head.meta.0[..], b"new meta");
        assert_eq!(BodyReader::new(obj).read_all().unwrap(), &b"body!"[..]);
    }
}
