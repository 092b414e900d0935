//! The canonical path: never panics; the normal form is a fixed point and clean when nothing
//! was flagged.
#![no_main]
use cascade::boundary::path::{canonicalize, decode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(once) = canonicalize(data) {
        let twice = canonicalize(once.path.as_bytes()).expect("a normal form is valid");
        assert_eq!(twice.path, once.path);
        assert_eq!(decode(once.path.as_bytes()), decode(data));
        if once.violations.is_empty() {
            assert!(!once.path.contains("//") && !once.path.contains("/./"));
            assert!(!once.path.contains("/../") && !once.path.ends_with("/.."));
        }
    }
});
