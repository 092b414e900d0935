//! The S3 policy: never panics, and never forwards a parameter it does not know to be safe.
#![no_main]
use cascade::boundary::s3::{check, Allow, SUBRESOURCES};
use http::{HeaderMap, Method};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u8, String, String)| {
    let (m, key, query) = input;
    let method = [Method::GET, Method::HEAD, Method::PUT, Method::POST, Method::DELETE][m as usize % 5].clone();
    let key = format!("/{key}");
    if let Ok(q) = check(&method, &key, Some(&query), &HeaderMap::new(), &Allow::default()) {
        for pair in q.forward.iter().flat_map(|f| f.split('&')) {
            let name = pair.split_once('=').map_or(pair, |(k, _)| k);
            let name = cascade::boundary::path::decode(name.as_bytes()).unwrap();
            let name = String::from_utf8(name).unwrap();
            assert!(["uploads", "uploadId", "partNumber"].contains(&name.as_str()), "{name}");
            assert!(!SUBRESOURCES.contains(&name.as_str()));
        }
    }
});
