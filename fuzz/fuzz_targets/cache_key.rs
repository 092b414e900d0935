//! Cache keys: injective over their parts, and the object part is always recovered.
#![no_main]
use cascade::cache::{cache_key, object_key, object_of, parse_object};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|parts: (String, String, Option<String>, String, String, Option<String>)| {
    let (g1, k1, q1, g2, k2, q2) = parts;
    let a = cache_key(&g1, &k1, q1.as_deref(), None);
    let b = cache_key(&g2, &k2, q2.as_deref(), None);
    let norm = |q: &Option<String>| q.clone().filter(|q| !q.is_empty());
    let same = g1 == g2 && k1 == k2 && norm(&q1) == norm(&q2);
    assert_eq!(a.primary_key() == b.primary_key(), same);
    let object = object_of(a.primary_key_str().unwrap());
    assert_eq!(object, object_key(&g1, &k1));
    assert_eq!(parse_object(object), Some((g1.as_str(), k1.as_str())));
});
