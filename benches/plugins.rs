//! Per-request cost of Wasm plugins, in process: request headers + response headers + log
//! for the shipped plugins (auth with an API key, tenant-router by host, headers setting
//! response headers), on warm pooled instances, the way a cache hit runs them.
//!
//! ```sh
//! scripts/build-plugins.sh
//! cargo bench --bench plugins                 # release profile
//! cargo bench --profile dev --bench plugins   # quicker to build; host code less optimized
//! ```
//!
//! Prints µs per request for each plugin alone, for the chain of three, and for a chain of
//! three `noop` plugins (SDK defaults, no host calls): what the ABI's six callbacks per
//! plugin cost before a plugin does anything.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use cascade::plugin::{Runtime, Step, Verdict};
use pingora_http::{RequestHeader, ResponseHeader};

/// Iterations per measurement (`BENCH_ITERS` overrides, e.g. for a longer `perf record`).
fn iters() -> u32 {
    std::env::var("BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

fn main() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dist = format!("{root}/plugins/dist");
    for p in ["auth", "tenant-router", "headers", "noop"] {
        let f = format!("{dist}/{p}.wasm");
        assert!(
            Path::new(&f).exists(),
            "{f} is missing: run scripts/build-plugins.sh first"
        );
    }
    let yaml = format!(
        "listen: [{{addr: 127.0.0.1:1}}]
origins: {{a: {{url: \"http://127.0.0.1:9/bucket-a\"}}, b: {{url: \"http://127.0.0.1:9/bucket-b\"}}}}
groups: {{ga: {{main: a}}, gb: {{main: b}}}}
plugins:
  auth: {{wasm: {dist}/auth.wasm, bodies: false, config: {{keys: [k-3f9a0c, k-77b1d2]}}}}
  tenant-router:
    wasm: {dist}/tenant-router.wasm
    bodies: false
    config: {{tenants: [{{name: one, host: one.example, group: gb, key_prefix: t1/}}]}}
  headers:
    wasm: {dist}/headers.wasm
    bodies: false
    config: {{response: {{set: {{x-frame-options: DENY, cache-control: \"public, max-age=60\"}}, remove: [x-amz-request-id]}}}}
  n1: {{wasm: {dist}/noop.wasm, bodies: false}}
  n2: {{wasm: {dist}/noop.wasm, bodies: false}}
  n3: {{wasm: {dist}/noop.wasm, bodies: false}}
routes:
  - {{name: three, path: /, group: ga, plugins: [auth, tenant-router, headers]}}
  - {{name: auth, path: /auth, group: ga, plugins: [auth]}}
  - {{name: tenant, path: /tenant, group: ga, plugins: [tenant-router]}}
  - {{name: headers, path: /headers, group: ga, plugins: [headers]}}
  - {{name: noop, path: /noop, group: ga, plugins: [n1, n2, n3]}}
"
    );
    let cfg = cascade::config::load_str(&yaml, Path::new("/tmp/bench.yaml"), &|_| None)
        .unwrap_or_else(|e| panic!("{e}"));
    let rt = Runtime::load(&cfg)
        .unwrap_or_else(|e| panic!("{e}"))
        .expect("plugins");
    let source: SocketAddr = "192.0.2.7:51234".parse().unwrap();

    let mut req = RequestHeader::build("GET", b"/img/photo-1234.jpg", None).unwrap();
    for (k, v) in [
        ("host", "one.example"),
        ("user-agent", "Mozilla/5.0 (X11; Linux x86_64) bench"),
        ("accept", "image/avif,image/webp,*/*"),
        ("accept-encoding", "gzip, deflate, br"),
        ("x-api-key", "k-77b1d2"),
    ] {
        req.insert_header(k, v).unwrap();
    }
    let mut resp = ResponseHeader::build(200, None).unwrap();
    for (k, v) in [
        ("content-type", "image/jpeg"),
        ("content-length", "48213"),
        ("etag", "\"5d41402abc4b2a76b9719d911017c592\""),
        ("last-modified", "Tue, 24 Nov 2026 10:00:00 GMT"),
        ("x-served-from", "a"),
        ("x-cache", "HIT"),
    ] {
        resp.insert_header(k, v).unwrap();
    }

    let iters = iters();
    let run = |route: usize| -> f64 {
        let once = || {
            let mut q = req.clone();
            let mut ex = rt
                .exchange(route, 0, "/img/photo-1234.jpg", Some(source))
                .expect("chain");
            match ex.request_headers(&mut q, true) {
                Step::Done(Verdict::Continue) => {}
                Step::Done(other) => panic!("unexpected verdict {other:?}"),
                Step::Calls { .. } => panic!("the bench plugins make no HTTP calls"),
            }
            let mut r = resp.clone();
            ex.info.cache_status = Some("HIT");
            assert!(matches!(
                ex.response_headers(&q, &mut r),
                Step::Done(Verdict::Continue)
            ));
            ex.log(&q, Some(&r));
            std::hint::black_box(&r);
        };
        for _ in 0..2_000 {
            once();
        }
        let t0 = Instant::now();
        for _ in 0..iters {
            once();
        }
        t0.elapsed().as_secs_f64() * 1e6 / iters as f64
    };
    // Baseline: the header clones the loop does anyway.
    let t0 = Instant::now();
    for _ in 0..iters {
        std::hint::black_box((req.clone(), resp.clone()));
    }
    let base = t0.elapsed().as_secs_f64() * 1e6 / iters as f64;

    println!("plugin overhead per request (request + response + log, warm instances, {iters} iterations)");
    for (route, name) in [
        (1, "auth"),
        (2, "tenant-router"),
        (3, "headers"),
        (0, "auth+tenant-router+headers"),
        (4, "noop x3 (the ABI's floor)"),
    ] {
        let us = run(route) - base;
        println!("  {name:<28} {us:>7.2} µs/request");
    }
}
