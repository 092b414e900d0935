//! Per-request cost of Wasm plugins, in process: request headers + response headers + log
//! for the shipped plugins (auth with an API key, tenant-router by host, headers setting
//! response headers), on warm pooled instances, the way a cache hit runs them.
//!
//! ```sh
//! scripts/build-plugins.sh
//! cargo bench --bench plugins                 # release profile
//! cargo bench --profile dev --bench plugins   # quicker to build; host code less optimized
//! BENCH_ONLY="noop x3 (" BENCH_ITERS=500000 perf record -g target/release/deps/plugins-…  # one chain
//! BENCH_THREADS=2 cargo bench --bench plugins  # two threads running the chains at once
//! ```
//!
//! Prints µs per request for each plugin alone, for the chain of three, and for a chain of
//! three `noop` plugins (SDK defaults, no host calls): what the ABI's six callbacks per
//! plugin cost before a plugin does anything.
//!
//! The same work done natively is the reference: [`native`] is a chain of Rust trait objects
//! taking the same hooks (request headers, response headers, log) and doing what the three
//! plugins do to the same headers (the key check and header removal, the tenant lookup and
//! path rewrite, the response header edits). Wasm minus native is what the proxy-wasm ABI and
//! the sandbox cost; the native no-op chain is the floor of a chain of three.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use cascade::plugin::{Runtime, Step, Verdict};
use pingora_http::{RequestHeader, ResponseHeader};

/// The number in environment variable `name`, or `default` when unset or not a number.
fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Iterations per measurement (`BENCH_ITERS` overrides, e.g. for a longer `perf record`).
fn iters() -> u32 {
    env_number("BENCH_ITERS", 20_000)
}

/// Threads running each measurement at once (`BENCH_THREADS`; 1 by default).
fn threads() -> usize {
    env_number("BENCH_THREADS", 1usize).max(1)
}

/// Only the measurements whose name contains this (`BENCH_ONLY`; the native chains' names
/// start with `native `, so `noop x3 (` is the Wasm no-op chain alone, `noop` both), so that
/// a `perf record` of the bench profiles one chain.
fn selected(name: &str) -> bool {
    std::env::var("BENCH_ONLY").map_or(true, |only| name.contains(only.as_str()))
}

/// Bytes walked between two requests (`BENCH_POLLUTE`; 0: none).
fn pollute_bytes() -> usize {
    env_number("BENCH_POLLUTE", 0)
}

/// A cache hit's request and response headers, as templates each request clones. Every bench
/// thread builds its own: clones share the header values' storage, and threads cloning one
/// template would contend on its reference counts (a bench artifact: a server's requests
/// parse their own headers).
fn headers() -> (RequestHeader, ResponseHeader) {
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
    (req, resp)
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

    let iters = iters();
    // BENCH_POLLUTE=BYTES: between two requests, walk a buffer of that many bytes (the
    // baseline does too, so it is subtracted), as a server's network stack and other
    // connections do between two requests' plugin calls: the chain then runs with cold caches.
    let pollute_buf = vec![1u8; pollute_bytes()];
    let pollute = || {
        let mut x = 0u8;
        for line in pollute_buf.chunks(64) {
            x = x.wrapping_add(line[0]);
        }
        std::hint::black_box(x);
    };
    // µs per call of `once` (after a warm-up), with the pollution between calls; with
    // `BENCH_THREADS=N`, the mean over N threads calling it at once (as a server's worker
    // threads run one plugin chain concurrently: shared state is then contended).
    let threads = threads();
    let time = |once: &(dyn Fn(&RequestHeader, &ResponseHeader) + Sync)| -> f64 {
        let one = || {
            let (req, resp) = headers();
            for _ in 0..2_000 {
                once(&req, &resp);
            }
            let t0 = Instant::now();
            for _ in 0..iters {
                once(&req, &resp);
                pollute();
            }
            t0.elapsed().as_secs_f64() * 1e6 / iters as f64
        };
        std::thread::scope(|s| {
            let all: Vec<_> = (0..threads).map(|_| s.spawn(one)).collect();
            all.into_iter()
                .map(|t| t.join().expect("bench thread"))
                .sum::<f64>()
                / threads as f64
        })
    };
    let run = |route: usize| -> f64 {
        let once = |req: &RequestHeader, resp: &ResponseHeader| {
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
        time(&once)
    };
    // Baseline: the header clones the loop does anyway.
    let base = time(&|req, resp| {
        std::hint::black_box((req.clone(), resp.clone()));
    });

    let native_run = |chain: fn() -> Vec<Box<dyn native::Hooks>>| -> f64 {
        let once = |req: &RequestHeader, resp: &ResponseHeader| {
            let mut q = req.clone();
            let mut plugins = chain();
            for p in plugins.iter_mut() {
                assert!(p.request_headers(&mut q), "native chain denied the request");
            }
            let mut r = resp.clone();
            for p in plugins.iter_mut() {
                p.response_headers(&q, &mut r);
            }
            for p in plugins.iter_mut() {
                p.log(&q, &r);
            }
            std::hint::black_box(&r);
        };
        time(&once)
    };

    println!(
        "plugin overhead per request (request + response + log, warm instances, {iters} iterations{}{})",
        match pollute_bytes() {
            0 => String::new(),
            n => format!(", {} KiB walked between requests", n / 1024),
        },
        match threads {
            1 => String::new(),
            n => format!(", {n} threads at once"),
        }
    );
    for (route, name) in [
        (1, "auth"),
        (2, "tenant-router"),
        (3, "headers"),
        (0, "auth+tenant-router+headers"),
        (4, "noop x3 (the ABI's floor)"),
    ] {
        if !selected(name) {
            continue;
        }
        let us = run(route) - base;
        println!("  {name:<28} {us:>7.2} µs/request");
    }
    println!("the same hooks natively (Rust trait objects, same work, same headers)");
    for (chain, name) in [
        (
            native::three as fn() -> Vec<Box<dyn native::Hooks>>,
            "auth+tenant-router+headers",
        ),
        (native::noops, "noop x3"),
    ] {
        if !selected(&format!("native {name}")) {
            continue;
        }
        let us = native_run(chain) - base;
        println!("  {name:<28} {us:>7.2} µs/request");
    }
}

/// The reference chain: what the shipped plugins do, as native code behind the same hooks.
mod native {
    use pingora_http::{RequestHeader, ResponseHeader};

    pub trait Hooks {
        /// false: the request is answered locally (denied).
        fn request_headers(&mut self, _req: &mut RequestHeader) -> bool {
            true
        }
        fn response_headers(&mut self, _req: &RequestHeader, _resp: &mut ResponseHeader) {}
        fn log(&mut self, _req: &RequestHeader, _resp: &ResponseHeader) {}
    }

    struct Noop;
    impl Hooks for Noop {}

    struct Auth {
        keys: &'static [&'static str],
    }
    impl Hooks for Auth {
        fn request_headers(&mut self, req: &mut RequestHeader) -> bool {
            let Some(key) = req.headers.get("x-api-key").and_then(|v| v.to_str().ok()) else {
                return false;
            };
            // The plugin compares in constant time, as this does.
            let ok = self.keys.iter().any(|k| {
                k.len() == key.len()
                    && k.bytes()
                        .zip(key.bytes())
                        .fold(0, |acc, (a, b)| acc | (a ^ b))
                        == 0
            });
            if !ok {
                return false;
            }
            req.remove_header("x-api-key");
            req.remove_header("authorization");
            std::hint::black_box(req.uri.path().to_string());
            true
        }
    }

    struct Tenant {
        tenants: &'static [(&'static str, &'static str, &'static str)], // host, name, prefix
        upstream_path: Option<String>,
    }
    impl Hooks for Tenant {
        fn request_headers(&mut self, req: &mut RequestHeader) -> bool {
            let host = req
                .headers
                .get("host")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let Some(&(_, name, prefix)) = self.tenants.iter().find(|t| t.0 == host) else {
                return false;
            };
            let path = req.uri.path();
            self.upstream_path = Some(format!("/{prefix}{}", path.trim_start_matches('/')));
            req.insert_header("x-tenant", name).unwrap();
            true
        }
    }

    struct Headers;
    impl Hooks for Headers {
        fn response_headers(&mut self, _req: &RequestHeader, resp: &mut ResponseHeader) {
            resp.insert_header("x-frame-options", "DENY").unwrap();
            resp.insert_header("cache-control", "public, max-age=60")
                .unwrap();
            resp.remove_header("x-amz-request-id");
        }
    }

    pub fn three() -> Vec<Box<dyn Hooks>> {
        vec![
            Box::new(Auth {
                keys: &["k-3f9a0c", "k-77b1d2"],
            }),
            Box::new(Tenant {
                tenants: &[("one.example", "one", "t1/")],
                upstream_path: None,
            }),
            Box::new(Headers),
        ]
    }

    pub fn noops() -> Vec<Box<dyn Hooks>> {
        vec![Box::new(Noop), Box::new(Noop), Box::new(Noop)]
    }
}
