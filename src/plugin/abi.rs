//! The proxy-wasm ABI v0.2.1 as data: status codes, enum values, and the wire format of
//! header maps. Pure; no wasmtime here.
//!
//! Header maps travel as: u32 count, then count × (u32 key_len, u32 value_len), then every
//! key and value followed by a NUL byte, all little-endian.

/// `proxy_status_t`.
pub mod status {
    pub const OK: i32 = 0;
    pub const NOT_FOUND: i32 = 1;
    pub const BAD_ARGUMENT: i32 = 2;
    pub const SERIALIZATION_FAILURE: i32 = 3;
    pub const INVALID_MEMORY_ACCESS: i32 = 6;
    pub const EMPTY: i32 = 7;
    pub const CAS_MISMATCH: i32 = 8;
    pub const INTERNAL_FAILURE: i32 = 10;
    pub const UNIMPLEMENTED: i32 = 12;
}

/// WASI preview1 errno values used by the host.
pub mod errno {
    pub const SUCCESS: i32 = 0;
    pub const BADF: i32 = 8;
    pub const FAULT: i32 = 21;
    pub const INVAL: i32 = 28;
    pub const NOSYS: i32 = 52;
    pub const NOTSUP: i32 = 58;
}

/// `proxy_map_type_t`.
pub mod map {
    pub const REQUEST_HEADERS: i32 = 0;
    pub const REQUEST_TRAILERS: i32 = 1;
    pub const RESPONSE_HEADERS: i32 = 2;
    pub const RESPONSE_TRAILERS: i32 = 3;
    /// The answer to a plugin's `proxy_http_call` (in `proxy_on_http_call_response`).
    pub const HTTP_CALL_RESPONSE_HEADERS: i32 = 6;
    pub const HTTP_CALL_RESPONSE_TRAILERS: i32 = 7;
}

/// `proxy_buffer_type_t`.
pub mod buffer {
    pub const REQUEST_BODY: i32 = 0;
    pub const RESPONSE_BODY: i32 = 1;
    pub const HTTP_CALL_RESPONSE_BODY: i32 = 4;
    pub const VM_CONFIGURATION: i32 = 6;
    pub const PLUGIN_CONFIGURATION: i32 = 7;
}

/// `proxy_stream_type_t`.
pub mod stream {
    pub const HTTP_REQUEST: i32 = 0;
    pub const HTTP_RESPONSE: i32 = 1;
}

/// `proxy_action_t`.
pub const ACTION_CONTINUE: i32 = 0;
/// `Action::Pause` (Envoy's StopIterationAndBuffer in body callbacks).
pub const ACTION_PAUSE: i32 = 1;

/// `proxy_log_level_t` → `log::Level` (critical maps to error).
pub fn log_level(level: i32) -> Option<log::Level> {
    Some(match level {
        0 => log::Level::Trace,
        1 => log::Level::Debug,
        2 => log::Level::Info,
        3 => log::Level::Warn,
        4 | 5 => log::Level::Error,
        _ => return None,
    })
}

/// The host's current level as a `proxy_log_level_t` (5 = critical when logging is off).
pub fn current_log_level() -> i32 {
    match log::max_level() {
        log::LevelFilter::Trace => 0,
        log::LevelFilter::Debug => 1,
        log::LevelFilter::Info => 2,
        log::LevelFilter::Warn => 3,
        log::LevelFilter::Error => 4,
        log::LevelFilter::Off => 5,
    }
}

/// Serializes `pairs` into `out` in one pass; `data` is scratch space for the key/value
/// bytes. Both are cleared first; neither allocates once warm.
pub fn serialize_map<'a>(
    out: &mut Vec<u8>,
    data: &mut Vec<u8>,
    pairs: impl Iterator<Item = (&'a [u8], &'a [u8])>,
) {
    out.clear();
    data.clear();
    out.extend_from_slice(&[0; 4]);
    let mut n: u32 = 0;
    for (k, v) in pairs {
        n += 1;
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        data.extend_from_slice(k);
        data.push(0);
        data.extend_from_slice(v);
        data.push(0);
    }
    out[..4].copy_from_slice(&n.to_le_bytes());
    out.extend_from_slice(data);
}

/// Parses a serialized map; `None` when the bytes are malformed. An empty map is either no
/// bytes or a single NUL byte (the spec allows both). Never panics, whatever the bytes; the
/// pairs vector it allocates is bounded by the input's length (8 bytes per pair at least).
pub fn deserialize_map(bytes: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    deserialize_map_max(bytes, usize::MAX)
}

/// The number of pairs a serialized map claims to hold (its first four bytes), unchecked.
pub fn map_count(bytes: &[u8]) -> Option<usize> {
    Some(u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize)
}

/// [`deserialize_map`] of a map of at most `max_pairs` pairs (`None` for more).
pub fn deserialize_map_max(bytes: &[u8], max_pairs: usize) -> Option<Vec<(&[u8], &[u8])>> {
    if bytes.is_empty() || bytes == [0] {
        return Some(Vec::new());
    }
    let u32_at = |at: usize| -> Option<usize> {
        Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize)
    };
    let n = u32_at(0)?;
    if n > bytes.len() / 8 + 1 || n > max_pairs {
        return None;
    }
    let mut pos = 4 + 8 * n;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let kl = u32_at(4 + 8 * i)?;
        let vl = u32_at(8 + 8 * i)?;
        let k = bytes.get(pos..pos.checked_add(kl)?)?;
        pos += kl + 1;
        let v = bytes.get(pos..pos.checked_add(vl)?)?;
        pos += vl + 1;
        if pos > bytes.len() {
            return None;
        }
        out.push((k, v));
    }
    Some(out)
}

/// Splits a property path: segments separated by NUL (a trailing NUL is ignored). A single
/// dotted segment (`request.path`, as some SDKs send) is split on dots, except that
/// everything after `request.headers.` / `response.headers.` is one header name.
pub fn property_path(raw: &[u8]) -> Vec<&[u8]> {
    let raw = raw.strip_suffix(&[0]).unwrap_or(raw);
    let segs: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
    if segs.len() != 1 || !segs[0].contains(&b'.') {
        return segs;
    }
    let s = segs[0];
    for prefix in [&b"request.headers."[..], b"response.headers."] {
        if let Some(name) = s.strip_prefix(prefix) {
            let head = &prefix[..prefix.len() - 1];
            let dot = head.iter().position(|b| *b == b'.').unwrap_or(head.len());
            return vec![&head[..dot], &head[dot + 1..], name];
        }
    }
    s.split(|b| *b == b'.').collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_round_trip() {
        let pairs: Vec<(&[u8], &[u8])> =
            vec![(b":path", b"/a?b"), (b"x", b""), (b"k", b"\xff\x00v")];
        let (mut out, mut data) = (Vec::new(), Vec::new());
        serialize_map(&mut out, &mut data, pairs.iter().copied());
        assert_eq!(&out[..4], &3u32.to_le_bytes());
        assert_eq!(deserialize_map(&out).unwrap(), pairs);
        assert!(deserialize_map(&out[..out.len() - 3]).is_none());
        assert!(deserialize_map(&[1, 0, 0, 0, 9]).is_none());
        assert_eq!(deserialize_map(&[]).unwrap(), vec![]);
        assert_eq!(
            deserialize_map(&[0]).unwrap(),
            vec![],
            "the spec's other empty map"
        );
    }

    mod prop {
        use super::super::*;
        use proptest::collection::vec;
        use proptest::prelude::*;

        /// Serializes `pairs` the way the host does.
        fn serialized(pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
            let (mut out, mut data) = (Vec::new(), Vec::new());
            serialize_map(
                &mut out,
                &mut data,
                pairs.iter().map(|(k, v)| (&k[..], &v[..])),
            );
            out
        }

        proptest! {
            /// Whatever a guest hands over, decoding never panics, and what it decodes lies
            /// inside the input.
            #[test]
            fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..512)) {
                if let Some(pairs) = deserialize_map(&bytes) {
                    prop_assert!(pairs.len() <= bytes.len() / 8 + 1);
                    let total: usize = pairs.iter().map(|(k, v)| k.len() + v.len()).sum();
                    prop_assert!(total <= bytes.len());
                }
            }

            /// Lengths and counts that claim more than the input holds are refused, not
            /// trusted (a huge count must not make the host allocate).
            #[test]
            fn lying_headers_are_refused(
                n in any::<u32>(),
                lens in vec(any::<u32>(), 0..16),
                tail in vec(any::<u8>(), 0..64),
            ) {
                let mut bytes = n.to_le_bytes().to_vec();
                for l in &lens {
                    bytes.extend_from_slice(&l.to_le_bytes());
                }
                bytes.extend_from_slice(&tail);
                if let Some(pairs) = deserialize_map(&bytes) {
                    prop_assert_eq!(pairs.len(), n as usize);
                    prop_assert!(pairs.len() <= bytes.len() / 8 + 1);
                }
            }

            /// serialize → deserialize gives back the pairs, in order, byte for byte
            /// (NULs and non-UTF-8 included).
            #[test]
            fn pairs_round_trip(
                pairs in vec((vec(any::<u8>(), 0..40), vec(any::<u8>(), 0..80)), 0..24),
            ) {
                let bytes = serialized(&pairs);
                let back = deserialize_map(&bytes).expect("a serialized map decodes");
                let back: Vec<(Vec<u8>, Vec<u8>)> =
                    back.into_iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
                prop_assert_eq!(&back, &pairs);
                // Cutting the bytes short is caught, never read past.
                if !pairs.is_empty() {
                    prop_assert!(deserialize_map(&bytes[..bytes.len() - 1]).is_none());
                }
            }

            /// A valid map with one byte changed anywhere (a count, a length, a separator)
            /// decodes to something inside the input, or is refused.
            #[test]
            fn mutated_maps_never_panic(
                pairs in vec((vec(any::<u8>(), 0..16), vec(any::<u8>(), 0..16)), 1..8),
                at in any::<usize>(),
                to in any::<u8>(),
            ) {
                let mut bytes = serialized(&pairs);
                let i = at % bytes.len();
                bytes[i] = to;
                if let Some(decoded) = deserialize_map(&bytes) {
                    let total: usize = decoded.iter().map(|(k, v)| k.len() + v.len()).sum();
                    prop_assert!(total <= bytes.len());
                }
            }

            /// Whatever decodes re-encodes to bytes that decode to the same pairs.
            #[test]
            fn decoded_maps_re_encode(bytes in vec(any::<u8>(), 0..256)) {
                if let Some(pairs) = deserialize_map(&bytes) {
                    let owned: Vec<(Vec<u8>, Vec<u8>)> =
                        pairs.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
                    let again = serialized(&owned);
                    let twice = deserialize_map(&again).expect("re-encoded map decodes");
                    prop_assert_eq!(twice, pairs);
                }
            }
        }
    }

    #[test]
    fn property_paths() {
        assert_eq!(
            property_path(b"request\0path"),
            vec![&b"request"[..], b"path"]
        );
        assert_eq!(
            property_path(b"request\0path\0"),
            vec![&b"request"[..], b"path"]
        );
        assert_eq!(
            property_path(b"request.headers.x-a.b"),
            vec![&b"request"[..], b"headers", b"x-a.b"]
        );
        assert_eq!(
            property_path(b"cascade.route"),
            vec![&b"cascade"[..], b"route"]
        );
        assert_eq!(property_path(b"plugin_name"), vec![&b"plugin_name"[..]]);
    }
}
