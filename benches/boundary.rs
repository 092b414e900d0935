//! Per-request cost of the trust boundary, in process: what every request now pays before
//! routing (header limits, the canonical target), admission with its final checks (unsigned
//! and signed groups), the S3 header allowlist and the cache key. Pure functions, warm. Also
//! the attempt walk over an origin's peers (`attempt::Attempts`: pick, in-flight accounting,
//! outcome), for one peer and for two (the balancer's own cost). And the upstream pool's
//! framing tracker (`origin::pool::Tracker`) over one read's exchange.
//!
//! ```sh
//! cargo bench --bench boundary                 # release profile
//! cargo bench --profile dev --bench boundary   # quicker to build
//! ```
//!
//! Prints ns per operation (median of 5 runs of `BENCH_ITERS`, default 200,000).

use std::hint::black_box;
use std::time::Instant;

use cascade::admit::{self, Admission, RequestFacts};
use cascade::boundary;
use pingora_http::RequestHeader;

fn iters() -> u32 {
    std::env::var("BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000)
}

/// Median ns per call of `f` over 5 runs.
fn time(name: &str, mut f: impl FnMut()) {
    let n = iters();
    let mut runs: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..n {
                f();
            }
            t.elapsed().as_nanos() as f64 / f64::from(n)
        })
        .collect();
    runs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!("{name:<48} {:>8.0} ns", runs[2]);
}

/// A browser's GET: 12 fields.
fn browser_request(target: &str) -> RequestHeader {
    let mut r = RequestHeader::build("GET", target.as_bytes(), None).unwrap();
    for (k, v) in [
        ("host", "media.example.com"),
        ("user-agent", "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36"),
        ("accept", "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"),
        ("accept-encoding", "gzip, deflate, br, zstd"),
        ("accept-language", "en-US,en;q=0.9"),
        ("referer", "https://www.example.com/gallery/2026/12"),
        ("cookie", "session=8f14e45fceea167a5a36dedd4bea2543; theme=dark"),
        ("sec-fetch-dest", "image"),
        ("sec-fetch-mode", "no-cors"),
        ("sec-fetch-site", "same-site"),
        ("range", "bytes=0-1048575"),
        ("if-none-match", "\"5d41402abc4b2a76b9719d911017c592\""),
    ] {
        r.append_header(k, v).unwrap();
    }
    r
}

fn main() {
    let yaml = "listen: [{addr: 127.0.0.1:1}]
origins:
  web: {url: \"http://127.0.0.1:9/prefix\"}
  s3: {url: \"http://127.0.0.1:9/bucket\", s3: {access_key_env: AK, secret_key_env: SK}}
  two:
    peers:
      - {url: \"http://127.0.0.1:9/a\", name: a}
      - {url: \"http://127.0.0.1:10/a\", name: b}
groups: {plain: {main: web}, signed: {main: s3}, two: {main: two}}
routes:
  - {name: media, host: media.example.com, path: /img, strip_prefix: true, group: plain}
  - {name: up, path: /up, strip_prefix: true, group: signed}
  - {name: root, path: /, group: plain}
";
    let env = |n: &str| matches!(n, "AK" | "SK").then(|| "bench-credential".to_string());
    let cfg = cascade::config::load_str(yaml, std::path::Path::new("/bench.yaml"), &env)
        .expect("bench config");
    let state = cascade::build_state(&cfg, std::path::Path::new("/tmp")).expect("state");
    let limits = cascade::config::schema::HeaderLimits::default();

    let plain = browser_request("/img/2026/12/holiday-photo.jpg");
    let encoded = browser_request("/img/caf%C3%A9/a%20b(1);v.jpg?w=100&h=80");
    let upload = browser_request("/up/video/part.bin?partNumber=3&uploadId=abc123&v=2");

    time("header limits (12 fields)", || {
        black_box(boundary::check_header_limits(black_box(&plain), &limits)).unwrap();
    });
    time("canonical target, plain path", || {
        black_box(boundary::target(black_box(&plain))).unwrap();
    });
    time("canonical target, encoded path + query", || {
        black_box(boundary::target(black_box(&encoded))).unwrap();
    });
    let admit_and_finalize = |req: &RequestHeader| {
        let target = boundary::target(req).unwrap();
        let facts = RequestFacts {
            method: &req.method,
            host: Some("media.example.com"),
            target: &target,
            content_length: None,
        };
        let Admission::Proxy(mut a) = admit::admit(&state.router, &state.groups, &facts) else {
            panic!("admitted")
        };
        admit::finalize(
            &mut a,
            state.router.routes(),
            &state.groups,
            &req.method,
            &req.headers,
        )
        .unwrap();
        a
    };
    time("target + admit + finalize, unsigned group", || {
        black_box(admit_and_finalize(black_box(&plain)));
    });
    let mut put = upload.clone();
    put.set_method(http::Method::PUT);
    time("target + admit + finalize, signed group + query", || {
        black_box(admit_and_finalize(black_box(&put)));
    });
    time("S3 header allowlist over 12 fields", || {
        let kept = plain
            .headers
            .keys()
            .filter(|n| boundary::s3::forward_header(n.as_str(), &[]))
            .count();
        black_box(kept);
    });
    let a = admit_and_finalize(&encoded);
    time("cache key (group, key, query)", || {
        black_box(cascade::cache::cache_key(
            "plain",
            &a.key,
            a.query.as_deref(),
            None,
        ));
    });
    for (name, group) in [
        ("attempt walk, one peer", "plain"),
        ("attempt walk, two peers (round robin)", "two"),
    ] {
        let g = state.groups.iter().find(|g| g.name == group).unwrap();
        let rules = cascade::attempt::Rules {
            plan: cascade::fallback::Plan::new(g, &http::Method::GET, None),
            group: g,
            read: true,
        };
        time(name, || {
            let mut a = cascade::attempt::Attempts::default();
            black_box(a.next(&state.origins, rules, "/img/a.jpg")).unwrap();
            a.answered(&state.origins);
            a.end(&state.origins);
        });
    }
    let origin = &state.origins.iter().find(|o| o.name == "s3").unwrap().peers[0];
    assert!(origin.is_signed());
    let fwd = cascade::origin::Forward { credentials: true };
    time("signed rewrite (allowlist + SigV4), for scale", || {
        let mut r = put.clone();
        origin
            .rewrite(
                &mut r,
                "/video/part.bin",
                Some("partNumber=3&uploadId=abc123"),
                fwd,
            )
            .unwrap();
        black_box(r);
    });

    // The upstream pool follows every read's exchange: the request head as Pingora writes it,
    // the answer as Pingora reads it (nginx's head; a 4 KiB body over two reads).
    let get = b"GET /bucket/video/seg-00042.ts HTTP/1.1\r\nhost: media.example.com\r\nuser-agent: Mozilla/5.0\r\naccept: */*\r\naccept-encoding: gzip\r\n\r\n";
    let head_404 = b"HTTP/1.1 404 Not Found\r\nServer: nginx/1.22.1\r\nDate: Sat, 05 Dec 2026 22:00:00 GMT\r\nContent-Type: text/html\r\nContent-Length: 153\r\nConnection: keep-alive\r\n\r\n";
    let mut answer_404 = head_404.to_vec();
    answer_404.extend_from_slice(&[b'x'; 153]);
    time("upstream pool tracker: GET + 404 (one read)", || {
        let mut t = cascade::origin::framing::Tracker::default();
        t.on_write(black_box(get));
        t.on_read(black_box(&answer_404));
        assert!(t.is_done());
    });
    let head_200 = b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sat, 05 Dec 2026 22:00:00 GMT\r\nContent-Type: video/mp2t\r\nContent-Length: 4096\r\nLast-Modified: Sat, 05 Dec 2026 21:00:00 GMT\r\nConnection: keep-alive\r\nETag: \"6751f1a0-1000\"\r\nAccept-Ranges: bytes\r\n\r\n";
    let mut answer_200 = head_200.to_vec();
    answer_200.extend_from_slice(&[b'y'; 4096]);
    let (first, rest) = answer_200.split_at(4096);
    time("upstream pool tracker: GET + 200 4 KiB (two reads)", || {
        let mut t = cascade::origin::framing::Tracker::default();
        t.on_write(black_box(get));
        t.on_read(black_box(first));
        t.on_read(black_box(rest));
        assert!(t.is_done());
    });
}
