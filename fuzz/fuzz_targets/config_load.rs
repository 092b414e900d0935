//! The config loader answers a config or located errors for any text; it never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = cascade::config::load_str(text, std::path::Path::new("/fuzz.yaml"), &|_| None);
});
