//! `Vary` for real: which request headers select a stored variant, and the normalised
//! `Accept-Encoding` that makes that header cacheable.
//!
//! Clients spell `Accept-Encoding` a hundred ways; keyed by value it would split every object
//! into as many variants. A cacheable request is therefore sent upstream with, and keyed by,
//! one of eight normal values: the subset of `zstd`, `br`, `gzip` the client accepts, in that
//! order, or `identity`. What the origin answers for that value is right for every client
//! that maps to it. An answer with a `Content-Encoding` varies on `Accept-Encoding` even
//! when the origin forgot to say so (a gzip body must never reach a client that did not ask).
//! Other varied headers are keyed by their exact values; the number of variants stored per
//! object is capped by the storage (`cache.max_variants`).

use http::header::{ACCEPT_ENCODING, CONTENT_ENCODING, VARY};
use http::HeaderMap;
use pingora_cache::key::HashBinary;

const ZSTD: u8 = 1;
const BR: u8 = 2;
const GZIP: u8 = 4;

/// The variants stored per object (primary key), to cap them at `cache.max_variants`: past
/// the cap a new variant is served, not stored, so a header an attacker controls (`Vary:
/// X-Anything`) cannot fill the cache with copies of one object. An object's set is forgotten
/// when its entries are all gone; a shard of the table starts over past [`Variants::CAP`]
/// objects.
#[derive(Default)]
pub struct Variants {
    shards: [parking_lot::Mutex<std::collections::HashMap<HashBinary, Vec<HashBinary>>>; 16],
}

impl Variants {
    /// Objects remembered per shard (16 shards).
    pub const CAP: usize = 1 << 12;

    /// May the variant `variance` of `primary` be stored? Records it when it may.
    /// `stored(primary)`: whether any entry of the object is still stored.
    pub fn admit(
        &self,
        primary: HashBinary,
        variance: HashBinary,
        max: usize,
        stored: impl Fn(&HashBinary) -> bool,
    ) -> bool {
        let mut map = self.shards[usize::from(primary[0] & 15)].lock();
        if map.len() >= Self::CAP && !map.contains_key(&primary) {
            map.clear();
        }
        let set = map.entry(primary).or_default();
        if set.contains(&variance) {
            return true;
        }
        if set.len() >= max && !stored(&primary) {
            set.clear();
        }
        if set.len() >= max {
            return false;
        }
        set.push(variance);
        true
    }
}

/// The normal `Accept-Encoding` values, by accepted set.
const NORMAL: [&str; 8] = [
    "identity",
    "zstd",
    "br",
    "zstd, br",
    "gzip",
    "zstd, gzip",
    "br, gzip",
    "zstd, br, gzip",
];

/// Is a `q` parameter zero (`q=0`, `q=0.0`, `q=0.000`)?
fn q_is_zero(params: &str) -> bool {
    params.split(';').any(|p| {
        let p = p.trim();
        let Some(v) = p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")) else {
            return false;
        };
        let v = v.trim();
        v.strip_prefix('0').is_some_and(|r| {
            r.is_empty()
                || r.strip_prefix('.')
                    .is_some_and(|d| d.bytes().all(|b| b == b'0'))
        })
    })
}

/// The normal `Accept-Encoding` of a request (all its `Accept-Encoding` fields together).
pub fn normalize_accept_encoding(headers: &HeaderMap) -> &'static str {
    let mut accepted = 0u8;
    let mut refused = 0u8;
    let mut star = false;
    for v in headers.get_all(ACCEPT_ENCODING) {
        let Ok(v) = v.to_str() else { continue };
        for item in v.split(',') {
            let (coding, params) = item.split_once(';').unwrap_or((item, ""));
            let coding = coding.trim();
            let is = |name: &str| coding.eq_ignore_ascii_case(name);
            let bit = if is("zstd") {
                ZSTD
            } else if is("br") {
                BR
            } else if is("gzip") || is("x-gzip") {
                GZIP
            } else if coding == "*" {
                star = !q_is_zero(params);
                continue;
            } else {
                continue;
            };
            if q_is_zero(params) {
                refused |= bit;
            } else {
                accepted |= bit;
            }
        }
    }
    if star {
        accepted |= (ZSTD | BR | GZIP) & !refused;
    }
    NORMAL[(accepted & !refused) as usize]
}

/// The variance of a response (its headers) for a request: `None` when it does not vary.
/// `accept_encoding` is the request's normal value ([`normalize_accept_encoding`]).
pub fn variance(resp: &HeaderMap, req: &HeaderMap, accept_encoding: &str) -> Option<HashBinary> {
    let mut names: Vec<String> = resp
        .get_all(VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .collect();
    let encoded = resp
        .get(CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    if encoded {
        names.push("accept-encoding".into());
    }
    if names.is_empty() {
        return None;
    }
    names.sort();
    names.dedup();
    let mut v = pingora_cache::VarianceBuilder::new();
    for n in names {
        let value: Vec<u8> = if n == "accept-encoding" {
            accept_encoding.as_bytes().to_vec()
        } else {
            let mut all = Vec::new();
            for (i, x) in req.get_all(n.as_str()).iter().enumerate() {
                if i > 0 {
                    all.extend_from_slice(b", ");
                }
                all.extend_from_slice(x.as_bytes());
            }
            all
        };
        v.add_owned_name_value(n, value);
    }
    v.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora_http::ResponseHeader;

    fn ae(values: &[&str]) -> &'static str {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(ACCEPT_ENCODING, v.parse().unwrap());
        }
        normalize_accept_encoding(&h)
    }

    #[test]
    fn accept_encoding_normal_forms() {
        assert_eq!(ae(&[]), "identity");
        assert_eq!(ae(&["gzip"]), "gzip");
        assert_eq!(ae(&["gzip, deflate, br, zstd"]), "zstd, br, gzip");
        assert_eq!(ae(&["GZIP;q=0.8", "br"]), "br, gzip");
        assert_eq!(ae(&["gzip;q=0, br"]), "br");
        assert_eq!(ae(&["gzip;q=0.000"]), "identity");
        assert_eq!(ae(&["gzip;q=0.001"]), "gzip");
        assert_eq!(ae(&["*"]), "zstd, br, gzip");
        assert_eq!(ae(&["*, br;q=0"]), "zstd, gzip");
        assert_eq!(ae(&["*;q=0"]), "identity");
        assert_eq!(ae(&["x-gzip"]), "gzip");
        assert_eq!(ae(&["deflate, compress, identity"]), "identity");
    }

    fn meta(headers: &[(&str, &str)]) -> HeaderMap {
        let mut r = ResponseHeader::build(200, None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r.headers.clone()
    }

    #[test]
    fn variants_are_capped_per_object() {
        let v = Variants::default();
        let (p, q) = ([1u8; 16], [2u8; 16]);
        let yes = |_: &HashBinary| true;
        assert!(v.admit(p, [10; 16], 2, yes));
        assert!(v.admit(p, [11; 16], 2, yes));
        assert!(!v.admit(p, [12; 16], 2, yes), "third variant of p");
        assert!(v.admit(p, [10; 16], 2, yes), "a known variant is fine");
        assert!(
            v.admit(q, [12; 16], 2, yes),
            "another object has its own cap"
        );
        // Once the object is gone from storage its variants are forgotten.
        assert!(v.admit(p, [12; 16], 2, |_| false));
    }

    fn req(headers: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn variances() {
        let plain = meta(&[]);
        assert_eq!(variance(&plain, &req(&[]), "gzip"), None);
        let ae_vary = meta(&[("vary", "Accept-Encoding")]);
        let gz = variance(&ae_vary, &req(&[]), "gzip");
        let id = variance(&ae_vary, &req(&[]), "identity");
        assert!(gz.is_some() && id.is_some() && gz != id);
        // An encoded answer varies even when the origin did not say so.
        let sneaky = meta(&[("content-encoding", "gzip")]);
        assert_ne!(
            variance(&sneaky, &req(&[]), "gzip"),
            variance(&sneaky, &req(&[]), "identity")
        );
        // Other headers by exact value, names in any case and order.
        let lang = meta(&[("vary", "accept-language, Origin")]);
        let a = variance(
            &lang,
            &req(&[("accept-language", "fr"), ("origin", "a")]),
            "identity",
        );
        let b = variance(
            &lang,
            &req(&[("origin", "a"), ("accept-language", "fr")]),
            "identity",
        );
        let c = variance(
            &lang,
            &req(&[("accept-language", "de"), ("origin", "a")]),
            "identity",
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
