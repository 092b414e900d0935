//! The edge cache: cascade's pingora-cache storage and the decisions around it.
//!
//! ```text
//!   proxy.rs phases ──► cache::Cache (this module: what to cache, under which key)
//!                         ├─ policy   response → cacheable? for how long? stale windows
//!                         ├─ slice    client Range → one fixed-size slice entry
//!                         └─ storage  TieredStorage: pingora_cache::Storage
//!                               ├─ memory  TinyUFO, bounded in bytes
//!                               └─ disk    files + index, bounded in bytes, survives restarts
//! ```
//!
//! The key is the object, not the URL: `group \0 upstream object key` (plus the slice for
//! slice entries), so two hostnames routed to one object share an entry and two groups
//! (tenants, buckets) never do. Query strings are not part of the key; requests whose query
//! addresses an S3 sub-resource (`versionId`, `acl`, listings, ...) bypass the cache.

pub mod disk;
pub mod memory;
pub mod policy;
pub mod slice;
pub mod storage;

use std::path::PathBuf;
use std::time::Duration;

use pingora_cache::key::CacheKey;
use pingora_cache::lock::{CacheKeyLockImpl, CacheLock};
use pingora_cache::CachePhase;

pub use storage::TieredStorage;

/// A 16-byte cache hash (pingora-cache's `HashBinary`).
pub type Hash = [u8; 16];

pub fn hex(h: &Hash) -> String {
    let mut s = String::with_capacity(32);
    for b in h {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

pub fn unhex(s: &str) -> Option<Hash> {
    if s.len() != 32 {
        return None;
    }
    let mut h = [0u8; 16];
    for (i, b) in h.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(h)
}

/// The validated `cache:` section.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub memory: u64,
    pub disk: Option<(PathBuf, u64)>,
    /// Bytes all fills in flight may hold in memory together.
    pub fill_memory: u64,
    pub max_object_size: u64,
    pub default_ttl: Duration,
    pub negative_ttl: Duration,
    pub lock_timeout: Duration,
    pub stale_if_error: Duration,
    pub stale_while_revalidate: Duration,
    pub slice_size: u64,
}

impl CacheConfig {
    #[cfg(test)]
    pub fn for_tests() -> Self {
        CacheConfig {
            memory: 1 << 20,
            disk: None,
            fill_memory: 256 << 20,
            max_object_size: 1 << 30,
            default_ttl: Duration::from_secs(3600),
            negative_ttl: Duration::from_secs(10),
            lock_timeout: Duration::from_secs(10),
            stale_if_error: Duration::from_secs(300),
            stale_while_revalidate: Duration::ZERO,
            slice_size: 1 << 20,
        }
    }
}

/// The process-wide cache: storage and lock live for the life of the process.
pub struct Cache {
    pub config: CacheConfig,
    pub storage: &'static TieredStorage,
    pub lock: &'static CacheKeyLockImpl,
}

impl Cache {
    pub fn open(config: CacheConfig) -> std::io::Result<Cache> {
        let memory = memory::MemoryTier::new(config.memory);
        let disk = match &config.disk {
            Some((path, size)) => Some(disk::DiskTier::open(path, *size)?),
            None => None,
        };
        let storage = storage::leak(TieredStorage::new(memory, disk, config.fill_memory));
        let lock: &'static CacheKeyLockImpl = Box::leak(CacheLock::new_boxed(config.lock_timeout));
        Ok(Cache {
            config,
            storage,
            lock,
        })
    }
}

/// A request path as a cache key component: percent-decoded, so `a%20b` and `a b` name one
/// object (lossy for invalid UTF-8, which cannot collide with valid keys).
pub fn decode_key(raw: &str) -> String {
    percent_encoding::percent_decode_str(raw)
        .decode_utf8_lossy()
        .into_owned()
}

/// The object part of a cache key: group and upstream object key.
pub fn object_key(group: &str, key: &str) -> String {
    format!("{group}\0{key}")
}

/// The pingora cache key for an object, or for one slice of it.
pub fn cache_key(group: &str, key: &str, slice: Option<&slice::SliceReq>) -> CacheKey {
    let mut primary = object_key(group, key);
    if let Some(s) = slice {
        primary.push('\0');
        primary.push_str(&s.key_suffix());
    }
    CacheKey::new(primary, "")
}

/// The object part of a stored primary key (drops a slice suffix).
pub fn object_of(primary: &str) -> &str {
    match primary.match_indices('\0').nth(1) {
        Some((i, _)) => &primary[..i],
        None => primary,
    }
}

/// S3 sub-resources and listings: never cached (their answers are not the object).
pub fn query_bypasses(query: Option<&str>) -> bool {
    const SUB: &[&str] = &[
        "versionId",
        "acl",
        "tagging",
        "uploads",
        "uploadId",
        "list-type",
        "delimiter",
        "prefix",
        "attributes",
        "torrent",
        "legal-hold",
        "retention",
        "policy",
        "location",
        "versions",
    ];
    query.is_some_and(|q| {
        q.split('&').any(|kv| {
            let k = kv.split('=').next().unwrap_or("");
            SUB.contains(&k)
        })
    })
}

/// `X-Cache` for a request whose cache phase ended in `phase`; `looked_up` says whether a
/// lookup happened (a miss whose response turned out uncacheable is still a MISS).
pub fn status_label(phase: &CachePhase, looked_up: bool) -> &'static str {
    match phase {
        CachePhase::Hit => "HIT",
        CachePhase::Miss => "MISS",
        CachePhase::Expired => "EXPIRED",
        CachePhase::Stale | CachePhase::StaleUpdating => "STALE",
        CachePhase::Revalidated | CachePhase::RevalidatedNoCache(_) => "REVALIDATED",
        _ if looked_up => "MISS",
        _ => "BYPASS",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora_cache::key::CacheHashKey;

    #[test]
    fn keys_name_the_object_not_the_url() {
        let a = cache_key("media", "a/b.mp4", None);
        let b = cache_key("media", "a/b.mp4", None);
        let other_group = cache_key("tenant2", "a/b.mp4", None);
        assert_eq!(a.combined_bin(), b.combined_bin());
        assert_ne!(a.combined_bin(), other_group.combined_bin());
        // No ambiguity between group and key boundaries.
        assert_ne!(
            cache_key("a", "bc", None).combined_bin(),
            cache_key("ab", "c", None).combined_bin()
        );
        let s = slice::plan(Some("bytes=0-0"), false, 1 << 20).unwrap();
        let sk = cache_key("media", "a/b.mp4", Some(&s));
        assert_ne!(sk.combined_bin(), a.combined_bin());
        assert_eq!(
            object_of(sk.primary_key_str().unwrap()),
            object_key("media", "a/b.mp4")
        );
        assert_eq!(object_of(&object_key("g", "k")), "g\0k");
    }

    #[test]
    fn hex_round_trip() {
        let h: Hash = *b"0123456789abcdef";
        assert_eq!(unhex(&hex(&h)), Some(h));
        assert_eq!(unhex("zz"), None);
    }

    #[test]
    fn subresource_queries_bypass() {
        assert!(query_bypasses(Some("versionId=3")));
        assert!(query_bypasses(Some("list-type=2&prefix=a")));
        assert!(!query_bypasses(Some("token=abc&expires=1")));
        assert!(!query_bypasses(None));
    }

    #[test]
    fn labels() {
        assert_eq!(status_label(&CachePhase::Hit, true), "HIT");
        assert_eq!(
            status_label(
                &CachePhase::Disabled(pingora_cache::NoCacheReason::NeverEnabled),
                false
            ),
            "BYPASS"
        );
        assert_eq!(
            status_label(
                &CachePhase::Disabled(pingora_cache::NoCacheReason::OriginNotCache),
                true
            ),
            "MISS"
        );
    }
}
