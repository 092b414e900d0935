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
//! The key is what was asked of the origin, not the client's URL: group, canonical object key
//! (`boundary::path`), the forwarded query (what went upstream, after the S3 policy and the
//! route's `cache.query`) and the slice, each length-prefixed ([`cache_key`]), so no request
//! can produce another object's or another slice's key, two hostnames routed to one object
//! share an entry and two groups (tenants, buckets) never do. Requests whose query addresses
//! an S3 operation or sub-resource (`versionId`, listings, multipart) bypass the cache.
//! `Vary` adds a variance (pingora-cache's secondary key; `Accept-Encoding` normalised,
//! see [`vary`]).

pub mod disk;
pub mod memory;
pub mod policy;
pub mod slice;
pub mod storage;
pub mod vary;

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
    /// Most variants (`Vary`) stored per object.
    pub max_variants: u32,
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
            max_variants: 8,
        }
    }
}

/// The process-wide cache: storage and lock live for the life of the process.
pub struct Cache {
    pub config: CacheConfig,
    pub storage: &'static TieredStorage,
    pub lock: &'static CacheKeyLockImpl,
    pub versions: SliceVersions,
    pub variants: vary::Variants,
}

/// The ETag each sliced object's slices were filled with, so slices of two versions are
/// never served as one: a fill that brings another ETag drops the object's other entries,
/// and a slice hit whose ETag is not the latest is refetched. Keyed by the slice-less cache
/// key and the normal `Accept-Encoding` (an encoding is a version of its own). Bounded: past
/// [`SliceVersions::CAP`] objects a shard starts over (a check missed, nothing mixed that
/// the origin did not mix itself).
#[derive(Default)]
pub struct SliceVersions {
    shards: [parking_lot::Mutex<std::collections::HashMap<Hash, Box<[u8]>>>; 16],
}

impl SliceVersions {
    /// Objects remembered per shard (16 shards, so slice hits rarely share a lock).
    pub const CAP: usize = 1 << 12;

    fn shard(
        &self,
        k: &Hash,
    ) -> parking_lot::MutexGuard<'_, std::collections::HashMap<Hash, Box<[u8]>>> {
        self.shards[usize::from(k[0] & 15)].lock()
    }

    /// The table key of a request's object.
    pub fn key(group: &str, key: &str, query: Option<&str>, accept_encoding: &str) -> Hash {
        use pingora_cache::key::CacheHashKey;
        let mut k = cache_key(group, key, query, None);
        let mut v = pingora_cache::VarianceBuilder::new();
        v.add_value("ae", accept_encoding);
        if let Some(h) = v.finalize() {
            k.set_variance_key(h);
        }
        k.combined_bin()
    }

    /// Records the ETag a fill brought; `true` when it replaces another one (the object
    /// changed at the origin: the caller drops the old entries).
    pub fn observe(&self, k: Hash, etag: &[u8]) -> bool {
        let mut map = self.shard(&k);
        match map.get(&k) {
            Some(old) if **old == *etag => false,
            Some(_) => {
                map.insert(k, etag.into());
                true
            }
            None => {
                if map.len() >= Self::CAP {
                    map.clear();
                }
                map.insert(k, etag.into());
                false
            }
        }
    }

    /// Is a stored slice with this ETag of an older version than the latest seen?
    pub fn outdated(&self, k: Hash, etag: Option<&[u8]>) -> bool {
        match (self.shard(&k).get(&k), etag) {
            (Some(latest), Some(e)) => **latest != *e,
            (Some(_), None) => true,
            _ => false,
        }
    }
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
            versions: SliceVersions::default(),
            variants: vary::Variants::default(),
        })
    }
}

/// The version of the key encoding; a change makes every stored entry unreachable.
const KEY_VERSION: &str = "k2|";

/// Appends `part` length-prefixed (`<decimal length>:<bytes>`): a concatenation of such parts
/// decodes one way only, whatever bytes the parts hold.
fn push_part(out: &mut String, part: &str) {
    use std::fmt::Write;
    let _ = write!(out, "{}:", part.len());
    out.push_str(part);
}

/// Reads one length-prefixed part off the front of `s`: (part, rest).
fn take_part(s: &str) -> Option<(&str, &str)> {
    let (len, rest) = s.split_once(':')?;
    let len: usize = len.parse().ok()?;
    Some((rest.get(..len)?, rest.get(len..)?))
}

/// The object part of a cache key: group and canonical object key. Every entry of the
/// object (query variants, slices, `Vary` variants) starts with it.
pub fn object_key(group: &str, key: &str) -> String {
    let mut s = String::with_capacity(KEY_VERSION.len() + group.len() + key.len() + 8);
    s.push_str(KEY_VERSION);
    push_part(&mut s, group);
    push_part(&mut s, key);
    s
}

/// (group, key) of an object key.
pub fn parse_object(object: &str) -> Option<(&str, &str)> {
    let rest = object.strip_prefix(KEY_VERSION)?;
    let (group, rest) = take_part(rest)?;
    let (key, _) = take_part(rest)?;
    Some((group, key))
}

/// The pingora cache key of a request: object, forwarded query, slice; injective over all
/// four parts.
pub fn cache_key(
    group: &str,
    key: &str,
    query: Option<&str>,
    slice: Option<&slice::SliceReq>,
) -> CacheKey {
    let mut primary = object_key(group, key);
    push_part(&mut primary, query.unwrap_or(""));
    match slice {
        Some(s) => push_part(&mut primary, &s.key_suffix()),
        None => push_part(&mut primary, ""),
    }
    CacheKey::new(primary, "")
}

/// The key of an object's query-less, slice-less entry, from its object key.
pub fn plain_entry(object: &str) -> CacheKey {
    let mut primary = String::with_capacity(object.len() + 4);
    primary.push_str(object);
    push_part(&mut primary, "");
    push_part(&mut primary, "");
    CacheKey::new(primary, "")
}

/// The object part of a stored primary key (drops query and slice).
pub fn object_of(primary: &str) -> &str {
    let end = (|| {
        let rest = primary.strip_prefix(KEY_VERSION)?;
        let (_, r) = take_part(rest)?;
        let (_, r) = take_part(r)?;
        Some(primary.len() - r.len())
    })();
    &primary[..end.unwrap_or(primary.len())]
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
        let a = cache_key("media", "/a/b.mp4", None, None);
        let b = cache_key("media", "/a/b.mp4", None, None);
        let other_group = cache_key("tenant2", "/a/b.mp4", None, None);
        assert_eq!(a.combined_bin(), b.combined_bin());
        assert_ne!(a.combined_bin(), other_group.combined_bin());
        // No ambiguity between part boundaries, whatever the parts hold.
        assert_ne!(
            cache_key("a", "bc", None, None).combined_bin(),
            cache_key("ab", "c", None, None).combined_bin()
        );
        assert_eq!(
            cache_key("g", "/v.mp4", None, None).combined_bin(),
            cache_key("g", "/v.mp4", Some(""), None).combined_bin(),
            "no query and an empty one are one request (admission forwards neither)"
        );
        let s = slice::plan(Some("bytes=0-0"), false, 1 << 20).unwrap();
        let sk = cache_key("media", "/v.mp4", None, Some(&s));
        assert_ne!(
            sk.combined_bin(),
            cache_key("media", "/v.mp4", None, None).combined_bin()
        );
        // The old attack: a key that spells a slice suffix.
        let forged = format!("/v.mp4\0{}", s.key_suffix());
        assert_ne!(
            cache_key("media", &forged, None, None).combined_bin(),
            sk.combined_bin()
        );
        assert_ne!(
            cache_key(
                "media",
                "/a.jpg",
                Some("response-content-type=text/html"),
                None
            )
            .combined_bin(),
            cache_key("media", "/a.jpg", None, None).combined_bin()
        );
        assert_eq!(
            object_of(sk.primary_key_str().unwrap()),
            object_key("media", "/v.mp4")
        );
        let q = cache_key("media", "/v.mp4", Some("a=1"), None);
        assert_eq!(
            object_of(q.primary_key_str().unwrap()),
            object_key("media", "/v.mp4")
        );
        assert_eq!(
            parse_object(&object_key("g:1", "/k:2")),
            Some(("g:1", "/k:2"))
        );
        assert_eq!(
            plain_entry(&object_key("g", "/k")).combined_bin(),
            cache_key("g", "/k", None, None).combined_bin()
        );
        assert_eq!(object_of("garbage"), "garbage");
    }

    #[test]
    fn slice_versions() {
        let v = SliceVersions::default();
        let k = SliceVersions::key("g", "/v.mp4", None, "identity");
        assert_ne!(k, SliceVersions::key("g", "/v.mp4", None, "gzip"));
        assert!(!v.outdated(k, Some(b"\"a\"")), "nothing known yet");
        assert!(!v.observe(k, b"\"a\""));
        assert!(!v.observe(k, b"\"a\""));
        assert!(!v.outdated(k, Some(b"\"a\"")));
        assert!(v.outdated(k, Some(b"\"b\"")));
        assert!(v.observe(k, b"\"b\""), "a new version replaces the old");
        assert!(v.outdated(k, Some(b"\"a\"")));
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

    mod prop {
        use super::super::*;
        use proptest::prelude::*;

        fn part() -> impl Strategy<Value = String> {
            // Separators, digits and colons are what a naive encoding would confuse.
            "[a-z0-9:/\\x00?&=%.-]{0,8}"
        }

        proptest! {
            /// Two requests share an entry only when group, key, query and slice are all equal.
            #[test]
            fn keys_are_injective(
                a in (part(), part(), proptest::option::of(part()), proptest::option::of(0u64..4)),
                b in (part(), part(), proptest::option::of(part()), proptest::option::of(0u64..4)),
            ) {
                let slice = |i: Option<u64>| i.map(|index| slice::SliceReq {
                    size: 1 << 20, index, first: index << 20, last: None, head: false,
                });
                let ka = cache_key(&a.0, &a.1, a.2.as_deref(), slice(a.3).as_ref());
                let kb = cache_key(&b.0, &b.1, b.2.as_deref(), slice(b.3).as_ref());
                let norm = |q: &Option<String>| q.clone().filter(|q| !q.is_empty());
                let same = a.0 == b.0 && a.1 == b.1 && norm(&a.2) == norm(&b.2) && a.3 == b.3;
                prop_assert_eq!(ka.primary_key() == kb.primary_key(), same);
                // The object part is recovered whatever the parts hold.
                let object = object_of(ka.primary_key_str().unwrap());
                prop_assert_eq!(object, object_key(&a.0, &a.1));
                prop_assert_eq!(parse_object(object), Some((a.0.as_str(), a.1.as_str())));
            }
        }
    }
}
