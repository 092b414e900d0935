//! The Wasm host's header-map decoding: whatever a guest hands over never panics, and what
//! decodes re-encodes to the same pairs.
#![no_main]
use cascade::plugin::abi::{deserialize_map, serialize_map};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(pairs) = deserialize_map(data) {
        let mut out = Vec::new();
        let mut scratch = Vec::new();
        serialize_map(&mut out, &mut scratch, pairs.iter().map(|(k, v)| (&k[..], &v[..])));
        assert_eq!(deserialize_map(&out), Some(pairs));
    }
});
