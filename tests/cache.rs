//! End-to-end tests of the edge cache: real S3 (s3s) and HTTP origins, the real cascade
//! binary, origin request and byte counters as the proof of what was (not) fetched.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

const TOKEN: &str = "test-admin-token-0123456789";

fn signed_origin(name: &str, url: &str, env: &str) -> String {
    format!(
        "  {name}: {{url: \"{url}\", s3: {{region: us-east-1, access_key_env: {env}_AK, \
         secret_key_env: {env}_SK}}}}\n"
    )
}

/// One signed S3 bucket behind a cached catch-all route.
struct Bucket {
    s3: S3Server,
    cascade: Cascade,
    yaml: String,
}

fn bucket(cache: &str) -> Bucket {
    let s3 = S3Server::signed();
    s3.create_bucket("media");
    let yaml = format!(
        "origins:\n{}groups:\n  media: {{main: main}}\nroutes:\n  - {{path: /, group: media}}\n\
         cache:\n{cache}\n",
        signed_origin("main", &s3.bucket_url("media"), "MAIN")
    );
    let cascade = start(&yaml);
    Bucket { s3, cascade, yaml }
}

fn start(yaml: &str) -> Cascade {
    Cascade::builder(yaml)
        .test_credentials("MAIN_AK", "MAIN_SK")
        .test_credentials("PROD_AK", "PROD_SK")
        .env("CASCADE_ADMIN_TOKEN", TOKEN)
        .start()
}

/// One scriptable HTTP origin behind a cached catch-all route.
fn http_origin(cache: &str) -> (HttpOrigin, Cascade) {
    let o = HttpOrigin::start();
    let yaml = format!(
        "origins:\n  web: {{url: \"{}\"}}\ngroups:\n  media: {{main: web}}\nroutes:\n  - {{path: /, group: media}}\n\
         cache:\n{cache}\n",
        o.url("")
    );
    let c = start(&yaml);
    (o, c)
}

async fn get(c: &Cascade, path: &str) -> (u16, String, String) {
    let r = client().get(c.url(path)).send().await.unwrap();
    let status = r.status().as_u16();
    let xc = header(&r, "x-cache");
    (status, xc, r.text().await.unwrap())
}

fn files_under(p: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let path = e.path();
            if path.is_dir() {
                out.extend(files_under(&path));
            } else {
                out.push(path);
            }
        }
    }
    out
}

fn cache_files(dir: &Path) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|p| !p.starts_with(dir.join("tmp")))
        .collect()
}

/// The body files of the cache directory (each entry also has a `.meta` file beside it).
fn body_files(dir: &Path) -> Vec<PathBuf> {
    cache_files(dir)
        .into_iter()
        .filter(|p| p.extension().is_none_or(|e| e != "meta"))
        .collect()
}

/// Waits (at most 10 s) until `n` entries are committed on disk (an entry's `.meta` file is
/// renamed into place last). The disk tier commits a fill after its answer has gone out, so
/// a restart (a SIGKILL) right after a miss would race the commit.
async fn wait_committed(dir: &Path, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metas = cache_files(dir)
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "meta"))
            .count();
        if metas >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{metas} of {n} cache entries committed to disk"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Bytes of every file under `dir`, temp files included.
fn bytes_under(dir: &Path) -> u64 {
    files_under(dir)
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// Polls `/metrics` (bounded) until `name` satisfies `ok`; returns the last value.
async fn metric_until(c: &Cascade, name: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = metric_sum(&c.metrics().await, name, &[]).unwrap_or(f64::NAN);
        if ok(v) || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn hit_after_miss_is_not_fetched_again() {
    let b = bucket("  memory: 16MiB");
    b.s3.put_file("media", "a.txt", "hello cache");
    assert_eq!(
        get(&b.cascade, "/a.txt").await,
        (200, "MISS".into(), "hello cache".into())
    );
    assert_eq!(
        get(&b.cascade, "/a.txt").await,
        (200, "HIT".into(), "hello cache".into())
    );
    assert_eq!(
        b.s3.stats.count("GET"),
        1,
        "the hit never reached the origin"
    );
    // Another spelling of the same object shares the entry.
    assert_eq!(get(&b.cascade, "/a%2Etxt").await.1, "HIT");
    assert_eq!(b.s3.stats.count("GET"), 1);
    // Request metrics are counted after the response is out: wait (bounded) for the last one.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut m = b.cascade.metrics().await;
    while metric_sum(&m, "cascade_cache_requests_total", &[("status", "HIT")]).unwrap_or(0.0) < 2.0
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        m = b.cascade.metrics().await;
    }
    assert!(metric_sum(&m, "cascade_cache_requests_total", &[("status", "HIT")]).unwrap() >= 2.0);
    assert!(metric_sum(&m, "cascade_cache_bytes", &[("tier", "memory")]).unwrap() > 0.0);
    let _ = &b.yaml;
}

#[tokio::test]
async fn restart_serves_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let cache = format!(
        "  memory: 8MiB\n  disk: {{path: \"{}\", size: 64MiB}}",
        dir.path().display()
    );
    let mut b = bucket(&cache);
    b.s3.put_file("media", "v/clip.bin", vec![7u8; 300_000]);
    assert_eq!(get(&b.cascade, "/v/clip.bin").await.1, "MISS");
    wait_committed(dir.path(), 1).await;
    drop(std::mem::replace(&mut b.cascade, start(&b.yaml)));
    let r = client()
        .get(b.cascade.url("/v/clip.bin"))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "x-cache"), "HIT");
    assert_eq!(r.bytes().await.unwrap().to_vec(), vec![7u8; 300_000]);
    assert_eq!(
        b.s3.stats.count("GET"),
        1,
        "served from disk after the restart"
    );
}

#[tokio::test]
async fn corrupted_or_truncated_cache_files_are_misses() {
    let dir = tempfile::tempdir().unwrap();
    let cache = format!(
        "  memory: 8MiB\n  disk: {{path: \"{}\", size: 64MiB}}",
        dir.path().display()
    );
    let Bucket { s3, cascade, yaml } = bucket(&cache);
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    s3.put_file("media", "x.bin", &body);
    s3.put_file("media", "y.bin", &body);
    assert_eq!(get(&cascade, "/x.bin").await.1, "MISS");
    assert_eq!(get(&cascade, "/y.bin").await.1, "MISS");
    wait_committed(dir.path(), 2).await;
    drop(cascade); // memory tier gone; only the files remain
    let files = body_files(dir.path());
    assert_eq!(files.len(), 2, "{files:?}");
    // Flip one body byte in the first, truncate the second.
    let mut bytes = std::fs::read(&files[0]).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 0x55;
    std::fs::write(&files[0], bytes).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&files[1])
        .unwrap();
    f.set_len(1000).unwrap();
    drop(f);
    let cascade = start(&yaml);
    for path in ["/x.bin", "/y.bin"] {
        let r = client().get(cascade.url(path)).send().await.unwrap();
        assert_eq!(header(&r, "x-cache"), "MISS", "{path}");
        assert_eq!(r.bytes().await.unwrap().to_vec(), body, "{path}");
    }
    assert_eq!(s3.stats.count("GET"), 4);
}

/// A disk hit the memory tier cannot take (a 1 MiB tier takes objects up to 256 KiB) streams
/// block by block: every byte intact, whole or by range; a bad first block is a miss (checked
/// before anything is served); a bad block further in cuts the response short, never a wrong
/// byte, and the next request is a miss.
#[tokio::test]
async fn a_large_disk_hit_streams_intact_and_its_bad_blocks_never_reach_a_client() {
    let dir = tempfile::tempdir().unwrap();
    let cache = format!(
        "  memory: 1MiB
  slice_size: 0
  disk: {{path: \"{}\", size: 64MiB}}",
        dir.path().display()
    );
    let b = bucket(&cache);
    let body: Vec<u8> = (0..1_000_003u32).map(|i| (i % 253) as u8).collect();
    b.s3.put_file("media", "big.bin", &body);
    let fetch = |range: Option<&'static str>| {
        let req = client().get(b.cascade.url("/big.bin"));
        let req = match range {
            Some(r) => req.header("range", r),
            None => req,
        };
        async move {
            let r = req.send().await.unwrap();
            let (status, xc) = (r.status().as_u16(), header(&r, "x-cache"));
            (status, xc, r.bytes().await.map(|b| b.to_vec()))
        }
    };
    let (status, xc, got) = fetch(None).await;
    assert_eq!((status, xc.as_str()), (200, "MISS"));
    assert_eq!(got.unwrap(), body);
    wait_committed(dir.path(), 1).await;
    for _ in 0..2 {
        let (status, xc, got) = fetch(None).await;
        assert_eq!((status, xc.as_str()), (200, "HIT"));
        assert_eq!(got.unwrap(), body);
    }
    // Ranges: inside the first block, across blocks, the last bytes.
    for (range, from, to) in [
        ("bytes=10-99", 10, 100),
        ("bytes=65000-300000", 65_000, 300_001),
        ("bytes=-5", 999_998, 1_000_003),
    ] {
        let (status, xc, got) = fetch(Some(range)).await;
        assert_eq!((status, xc.as_str()), (206, "HIT"), "{range}");
        assert_eq!(got.unwrap(), &body[from..to], "{range}");
    }
    assert_eq!(
        b.s3.stats.count("GET"),
        1,
        "every hit came from the disk tier"
    );
    // Streamed: the two whole hits read 15 blocks each past the first (the page cache's or
    // the pool's way), the ranges a few more.
    let m = b.cascade.metrics().await;
    let reads = metric_sum(&m, "cascade_cache_disk_block_reads_total", &[]).unwrap();
    assert!((30.0..=40.0).contains(&reads), "{reads} block reads");

    let files = body_files(dir.path());
    assert_eq!(files.len(), 1, "{files:?}");
    let key_len = std::fs::read(&files[0]).unwrap().len() - body.len() - 40 - 4 * 16;
    let flip = |at: usize| {
        let mut raw = std::fs::read(&files[0]).unwrap();
        raw[40 + key_len + at] ^= 0x20;
        std::fs::write(&files[0], raw).unwrap();
    };
    // A bad first block: a miss, fetched again, served whole.
    flip(1_000);
    let (status, xc, got) = fetch(None).await;
    assert_eq!((status, xc.as_str()), (200, "MISS"));
    assert_eq!(got.unwrap(), body);
    assert_eq!(b.s3.stats.count("GET"), 2);
    wait_committed(dir.path(), 1).await;
    let files = body_files(dir.path());
    assert_eq!(files.len(), 1, "{files:?}");
    // A bad block further in: the response stops short of it; the entry is gone.
    let mut raw = std::fs::read(&files[0]).unwrap();
    raw[40 + key_len + 9 * 65_536 + 7] ^= 0x20;
    std::fs::write(&files[0], raw).unwrap();
    // Read chunk by chunk: whatever arrives before the cut is the body's own bytes.
    let mut r = client()
        .get(b.cascade.url("/big.bin"))
        .send()
        .await
        .unwrap();
    let head = (r.status().as_u16(), header(&r, "x-cache"));
    assert_eq!((head.0, head.1.as_str()), (200, "HIT"));
    let mut got = Vec::new();
    let cut = loop {
        match r.chunk().await {
            Ok(Some(c)) => got.extend_from_slice(&c),
            Ok(None) => panic!("a corrupt entry was served whole ({} bytes)", got.len()),
            Err(e) => break e,
        }
    };
    assert!(
        got.len() <= 9 * 65_536,
        "{} bytes before the cut ({cut})",
        got.len()
    );
    assert_eq!(
        got,
        &body[..got.len()],
        "the bytes before the cut are the body's"
    );
    let (status, xc, got) = fetch(None).await;
    assert_eq!((status, xc.as_str()), (200, "MISS"));
    assert_eq!(got.unwrap(), body);
}

#[tokio::test]
async fn memory_and_disk_bounds_hold_after_writing_three_times_their_size() {
    let dir = tempfile::tempdir().unwrap();
    let cache = format!(
        "  memory: 2MiB\n  disk: {{path: \"{}\", size: 4MiB}}",
        dir.path().display()
    );
    let b = bucket(&cache);
    let body = vec![3u8; 100 * 1024];
    for i in 0..123 {
        // 123 x 100 KiB = 12 MiB: 3x the disk tier, 6x the memory tier.
        b.s3.put_file("media", &format!("o/{i}"), &body);
        let r = client()
            .get(b.cascade.url(&format!("/o/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.bytes().await.unwrap().len(), body.len());
    }
    let m = b.cascade.metrics().await;
    let mem = metric_sum(&m, "cascade_cache_bytes", &[("tier", "memory")]).unwrap();
    let disk = metric_sum(&m, "cascade_cache_bytes", &[("tier", "disk")]).unwrap();
    assert!(mem <= 2.0 * 1024.0 * 1024.0, "memory tier {mem}");
    assert!(mem > 0.0);
    assert!(disk <= 4.0 * 1024.0 * 1024.0, "disk tier {disk}");
    assert!(disk > 2.0 * 1024.0 * 1024.0, "disk tier is used: {disk}");
    let on_disk: u64 = cache_files(dir.path())
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(on_disk <= 4 * 1024 * 1024, "{on_disk} bytes on disk");
    assert!(metric_sum(&m, "cascade_cache_evictions_total", &[("tier", "disk")]).unwrap() > 0.0);
}

#[tokio::test]
async fn fifty_concurrent_cold_requests_make_one_origin_fetch() {
    let (o, c) = http_origin("  memory: 16MiB");
    o.route(
        "/hot.bin",
        Reply::new(200, vec![9u8; 50_000]).delay(Duration::from_millis(400)),
    );
    let cl = client();
    let reqs = (0..50).map(|_| {
        let cl = cl.clone();
        let url = c.url("/hot.bin");
        async move {
            let r = cl.get(url).send().await.unwrap();
            (r.status().as_u16(), r.bytes().await.unwrap().len())
        }
    });
    let results = futures::future::join_all(reqs).await;
    assert!(results.iter().all(|r| *r == (200, 50_000)), "{results:?}");
    assert_eq!(o.stats.count("GET"), 1, "collapsed into one origin fetch");
    let m = c.metrics().await;
    assert!(metric_sum(&m, "cascade_cache_lock_waits_total", &[]).unwrap() >= 1.0);
}

#[tokio::test]
async fn range_head_and_conditional_requests_are_served_from_cache() {
    let b = bucket("  memory: 16MiB");
    b.s3.put_file("media", "doc.txt", "0123456789abcdef");
    let first = client()
        .get(b.cascade.url("/doc.txt"))
        .send()
        .await
        .unwrap();
    let etag = header(&first, "etag");
    let last_modified = header(&first, "last-modified");
    assert!(!etag.is_empty());
    assert_eq!(first.text().await.unwrap(), "0123456789abcdef");

    let r = client()
        .get(b.cascade.url("/doc.txt"))
        .header("range", "bytes=2-5")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(header(&r, "content-range"), "bytes 2-5/16");
    assert_eq!(header(&r, "x-cache"), "HIT");
    assert_eq!(r.text().await.unwrap(), "2345");

    let r = client()
        .get(b.cascade.url("/doc.txt"))
        .header("range", "bytes=100-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);

    let r = client()
        .head(b.cascade.url("/doc.txt"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-length"), "16");
    assert_eq!(header(&r, "x-cache"), "HIT");

    let r = client()
        .get(b.cascade.url("/doc.txt"))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    let r = client()
        .get(b.cascade.url("/doc.txt"))
        .header("if-modified-since", &last_modified)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    assert_eq!(b.s3.stats.count("GET"), 1, "all answered from the cache");
    assert_eq!(b.s3.stats.count("HEAD"), 0);
}

#[tokio::test]
async fn a_one_byte_range_on_a_large_object_fetches_one_slice() {
    let dir = tempfile::tempdir().unwrap();
    let cache = format!(
        "  memory: 16MiB\n  slice_size: 1MiB\n  disk: {{path: \"{}\", size: 256MiB}}",
        dir.path().display()
    );
    let b = bucket(&cache);
    let size: usize = 64 << 20;
    let body: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
    b.s3.put_file("media", "movie.mp4", &body);
    let at = 40_000_000usize;
    let r = client()
        .get(b.cascade.url("/movie.mp4"))
        .header("range", format!("bytes={at}-{at}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(
        header(&r, "content-range"),
        format!("bytes {at}-{at}/{size}")
    );
    assert_eq!(header(&r, "x-cache"), "MISS");
    assert_eq!(r.bytes().await.unwrap().to_vec(), vec![body[at]]);
    // The response ends with the slice's fill; the origin's byte counter may trail it a little.
    eventually(std::time::Duration::from_secs(20), || {
        b.s3.stats.response_bytes() >= 1 << 20
    })
    .await;
    let fetched = b.s3.stats.response_bytes();
    assert!(
        fetched <= (1 << 20) + 64 * 1024,
        "fetched {fetched} bytes from the origin for one byte"
    );
    assert!(fetched >= 1 << 20, "one whole slice was fetched: {fetched}");

    // Same slice again: a hit, nothing from the origin. A neighbouring range in it too.
    let r = client()
        .get(b.cascade.url("/movie.mp4"))
        .header("range", format!("bytes={}-{}", at + 10, at + 19))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(header(&r, "x-cache"), "HIT");
    assert_eq!(
        r.bytes().await.unwrap().to_vec(),
        body[at + 10..at + 20].to_vec()
    );
    assert_eq!(b.s3.stats.response_bytes(), fetched);

    // An open-ended range is answered up to the end of its slice.
    let r = client()
        .get(b.cascade.url("/movie.mp4"))
        .header("range", format!("bytes={at}-"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    let slice_end = (at / (1 << 20) + 1) * (1 << 20) - 1;
    assert_eq!(
        header(&r, "content-range"),
        format!("bytes {at}-{slice_end}/{size}")
    );
    assert_eq!(
        r.bytes().await.unwrap().to_vec(),
        body[at..=slice_end].to_vec()
    );

    // HEAD learns the size from slice 0, not from the whole object.
    let r = client()
        .head(b.cascade.url("/movie.mp4"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-length"), size.to_string());
    assert!(b.s3.stats.response_bytes() <= fetched + (1 << 20) + 64 * 1024);

    // Past the end.
    let r = client()
        .get(b.cascade.url("/movie.mp4"))
        .header("range", format!("bytes={}-", size + 5))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
}

#[tokio::test]
async fn fallback_answers_are_cached_under_the_original_key() {
    let main = S3Server::signed();
    let prod = S3Server::signed();
    main.create_bucket("staging");
    prod.create_bucket("production");
    prod.put_file("production", "img/old.jpg", "from-prod");
    let yaml = format!(
        "origins:\n{}{}groups:\n  media: {{main: main, fallbacks: [prod]}}\n\
         routes:\n  - {{path: /, group: media}}\ncache:\n  memory: 16MiB\n",
        signed_origin("main", &main.bucket_url("staging"), "MAIN"),
        signed_origin("prod", &prod.bucket_url("production"), "PROD"),
    );
    let c = start(&yaml);
    let r = client().get(c.url("/img/old.jpg")).send().await.unwrap();
    assert_eq!(header(&r, "x-served-from"), "prod");
    assert_eq!(header(&r, "x-cache"), "MISS");
    let r = client().get(c.url("/img/old.jpg")).send().await.unwrap();
    assert_eq!(header(&r, "x-served-from"), "prod");
    assert_eq!(header(&r, "x-cache"), "HIT");
    assert_eq!(r.text().await.unwrap(), "from-prod");
    assert_eq!(main.stats.count("GET"), 1);
    assert_eq!(prod.stats.count("GET"), 1);
}

#[tokio::test]
async fn negative_cache_then_put_makes_the_object_visible() {
    let main = S3Server::signed();
    let prod = S3Server::signed();
    main.create_bucket("staging");
    prod.create_bucket("production");
    let yaml = format!(
        "origins:\n{}{}groups:\n  media: {{main: main, fallbacks: [prod]}}\n\
         routes:\n  - {{path: /, group: media}}\ncache:\n  memory: 16MiB\n  negative_ttl: 60s\n",
        signed_origin("main", &main.bucket_url("staging"), "MAIN"),
        signed_origin("prod", &prod.bucket_url("production"), "PROD"),
    );
    let c = start(&yaml);
    assert_eq!(get(&c, "/new.txt").await.0, 404);
    let (status, xc, _) = get(&c, "/new.txt").await;
    assert_eq!((status, xc.as_str()), (404, "HIT"), "the 404 is cached");
    assert_eq!(main.stats.count("GET"), 1);
    assert_eq!(
        prod.stats.count("GET"),
        1,
        "no origin round-trips while cached"
    );

    let r = client()
        .put(c.url("/new.txt"))
        .body("now it exists")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        get(&c, "/new.txt").await,
        (200, "MISS".into(), "now it exists".into())
    );
    assert_eq!(get(&c, "/new.txt").await.1, "HIT");

    // DELETE invalidates too.
    let r = client().delete(c.url("/new.txt")).send().await.unwrap();
    assert!(r.status().is_success());
    assert_eq!(get(&c, "/new.txt").await.0, 404);
}

#[tokio::test]
async fn stale_if_error_serves_the_stale_copy_when_the_origin_is_down() {
    let (o, c) = http_origin("  memory: 16MiB\n  stale_if_error: 1h");
    o.route(
        "/s.txt",
        Reply::new(200, "stale but safe").header("cache-control", "max-age=1"),
    );
    o.route(
        "/e.txt",
        Reply::new(200, "v1").header("cache-control", "max-age=1"),
    );
    assert_eq!(get(&c, "/s.txt").await.1, "MISS");
    assert_eq!(get(&c, "/e.txt").await.1, "MISS");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    // The origin answers 503 for one object: stale copy.
    o.route("/e.txt", Reply::new(503, "down"));
    assert_eq!(get(&c, "/e.txt").await, (200, "STALE".into(), "v1".into()));
    // The origin is gone entirely.
    drop(o);
    assert_eq!(
        get(&c, "/s.txt").await,
        (200, "STALE".into(), "stale but safe".into())
    );
}

#[tokio::test]
async fn stale_while_revalidate_refreshes_once_in_the_background() {
    let (o, c) = http_origin("  memory: 16MiB");
    o.route(
        "/swr.txt",
        Reply::new(200, "v1").header("cache-control", "max-age=1, stale-while-revalidate=60"),
    );
    assert_eq!(get(&c, "/swr.txt").await.1, "MISS");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    o.route(
        "/swr.txt",
        Reply::new(200, "v2")
            .header("cache-control", "max-age=60")
            .delay(Duration::from_millis(300)),
    );
    let cl = client();
    let results = futures::future::join_all((0..5).map(|_| {
        let cl = cl.clone();
        let url = c.url("/swr.txt");
        async move {
            let r = cl.get(url).send().await.unwrap();
            (header(&r, "x-cache"), r.text().await.unwrap())
        }
    }))
    .await;
    for (xc, body) in &results {
        assert_eq!((xc.as_str(), body.as_str()), ("STALE", "v1"), "{results:?}");
    }
    let refreshed = eventually(Duration::from_secs(5), || o.stats.count("GET") == 2).await;
    assert!(
        refreshed,
        "one background refresh: {}",
        o.stats.count("GET")
    );
    // The refresh reached the origin, which answers 300 ms later; until it is stored the
    // stale copy is still served (without starting another refresh).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = get(&c, "/swr.txt").await;
        if r == (200, "HIT".into(), "v2".into()) {
            break;
        }
        assert_eq!(r, (200, "STALE".into(), "v1".into()));
        assert!(Instant::now() < deadline, "the refresh was never stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(o.stats.count("GET"), 2, "exactly one refresh");
}

#[tokio::test]
async fn purge_needs_the_token() {
    let admin_port = free_port();
    let o = HttpOrigin::start();
    o.route("/p/a.txt", Reply::new(200, "a"));
    o.route("/p/b.txt", Reply::new(200, "b"));
    let yaml = format!(
        "origins:\n  web: {{url: \"{}\"}}\ngroups:\n  media: {{main: web}}\nroutes:\n  - {{path: /, group: media}}\n\
         cache:\n  memory: 16MiB\nadmin: {{addr: \"127.0.0.1:{admin_port}\", token_env: CASCADE_ADMIN_TOKEN}}\n",
        o.url("")
    );
    let c = start(&yaml);
    let admin = format!("http://127.0.0.1:{admin_port}");
    for p in ["/p/a.txt", "/p/b.txt"] {
        assert_eq!(get(&c, p).await.1, "MISS");
        assert_eq!(get(&c, p).await.1, "HIT");
    }
    let purge = |url: String, token: Option<&str>| {
        let mut rb = client().request(reqwest::Method::from_bytes(b"PURGE").unwrap(), url);
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        rb.send()
    };
    let r = purge(format!("{admin}/cache/media/p/a.txt"), None)
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(header(&r, "www-authenticate").starts_with("Bearer"));
    let r = purge(
        format!("{admin}/cache/media/p/a.txt"),
        Some("wrong-token-wrong-token"),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        get(&c, "/p/a.txt").await.1,
        "HIT",
        "nothing purged without the token"
    );
    let r = purge(format!("{admin}/cache/media/p/a.txt"), Some(TOKEN))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(get(&c, "/p/a.txt").await.1, "MISS");
    assert_eq!(get(&c, "/p/b.txt").await.1, "HIT", "only that key");
    // Prefix purge.
    let r = purge(format!("{admin}/cache/media/p/*"), Some(TOKEN))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(get(&c, "/p/a.txt").await.1, "MISS");
    assert_eq!(get(&c, "/p/b.txt").await.1, "MISS");
}

#[tokio::test]
async fn no_store_private_and_authorization_are_not_cached() {
    let (o, c) = http_origin("  memory: 16MiB");
    o.route(
        "/ns",
        Reply::new(200, "x").header("cache-control", "no-store"),
    );
    o.route(
        "/pv",
        Reply::new(200, "x").header("cache-control", "private, max-age=600"),
    );
    o.route(
        "/pub",
        Reply::new(200, "x").header("cache-control", "max-age=600"),
    );
    for p in ["/ns", "/pv"] {
        assert_eq!(get(&c, p).await.1, "MISS");
        assert_eq!(get(&c, p).await.1, "MISS", "{p} is never stored");
    }
    assert_eq!(o.stats.count("GET"), 4);
    for _ in 0..2 {
        let r = client()
            .get(c.url("/pub"))
            .header("authorization", "Bearer abc")
            .send()
            .await
            .unwrap();
        assert_eq!(header(&r, "x-cache"), "BYPASS");
    }
    assert_eq!(
        o.stats.count("GET"),
        6,
        "requests with Authorization bypass the cache"
    );
    assert_eq!(get(&c, "/pub").await.1, "MISS");
    assert_eq!(get(&c, "/pub").await.1, "HIT");
}

#[tokio::test]
async fn a_client_that_disconnects_mid_fill_leaves_no_complete_looking_entry() {
    let dir = tempfile::tempdir().unwrap();
    let cache = format!(
        "  memory: 16MiB\n  slice_size: 0\n  disk: {{path: \"{}\", size: 256MiB}}",
        dir.path().display()
    );
    let b = bucket(&cache);
    let size = 48 << 20;
    let body: Vec<u8> = (0..size).map(|i| (i % 241) as u8).collect();
    b.s3.put_file("media", "big.bin", &body);
    // Read the header and a little of the body, then hang up. (Waiting for them as long as
    // a loaded machine needs: a fixed 300 ms window failed under CI-like load.)
    let head = read_some_then_hang_up(
        b.cascade.addr,
        b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n",
        64 * 1024,
    );
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Whatever the proxy did with the rest, the next reader gets the whole, correct object.
    let r = client()
        .get(b.cascade.url("/big.bin"))
        .send()
        .await
        .unwrap();
    let xc = header(&r, "x-cache");
    assert_eq!(r.bytes().await.unwrap().len(), size);
    assert!(xc == "MISS" || xc == "HIT", "{xc}");
    // Every body file in the cache dir is a complete entry (the temp dir holds no finished
    // file).
    for f in body_files(dir.path()) {
        let len = std::fs::metadata(&f).unwrap().len();
        assert!(len > size as u64, "{} is {len} bytes", f.display());
    }
}

#[tokio::test]
async fn routes_can_turn_caching_off_and_set_their_ttl() {
    let o = HttpOrigin::start();
    o.route("/a", Reply::new(200, "a"));
    o.route("/nc/a", Reply::new(200, "a"));
    let yaml = format!(
        "origins:\n  web: {{url: \"{}\"}}\ngroups:\n  media: {{main: web}}\nroutes:\n  \
         - {{path: /, group: media, cache: {{ttl: 3s}}}}\n  - {{path: /nc, group: media, cache: false}}\n\
         cache:\n  memory: 16MiB\n  stale_if_error: 0s\n",
        o.url("")
    );
    let c = start(&yaml);
    assert_eq!(get(&c, "/nc/a").await.1, "BYPASS");
    assert_eq!(get(&c, "/nc/a").await.1, "BYPASS");
    assert_eq!(get(&c, "/a").await.1, "MISS");
    // (A 3 s TTL: the HIT must come within it even on a loaded machine.)
    assert_eq!(get(&c, "/a").await.1, "HIT");
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert_eq!(get(&c, "/a").await.1, "EXPIRED");
    assert_eq!(o.stats.count("GET"), 4);
}

/// PUTs `v2` to `path` while the `slow` GET of the old version is still on its way, and
/// makes the origin answer `v2` from then on.
async fn write_v2_before<T>(
    c: &Cascade,
    o: &HttpOrigin,
    path: &str,
    slow: &tokio::task::JoinHandle<T>,
) {
    let r = client().put(c.url(path)).body("v2").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        !slow.is_finished(),
        "the write must land while the old version is in flight"
    );
    o.route_method("GET", path, Reply::new(200, "v2"));
}

#[tokio::test]
async fn a_write_during_a_slow_fill_keeps_the_old_version_out_of_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let (o, c) = http_origin(&format!(
        "  memory: 16MiB\n  disk: {{path: \"{}\", size: 64MiB}}",
        dir.path().display()
    ));
    let v1 = vec![1u8; 200_000];
    // The origin sends the header and half the body, then the rest 2 s later.
    o.route_method(
        "GET",
        "/doc.bin",
        Reply::new(200, v1.clone()).trickle(Duration::from_secs(2)),
    );
    o.route_method("PUT", "/doc.bin", Reply::new(200, ""));
    let slow = tokio::spawn({
        let url = c.url("/doc.bin");
        async move {
            let r = client().get(url).send().await.unwrap();
            (header(&r, "x-cache"), r.bytes().await.unwrap().to_vec())
        }
    });
    assert!(
        eventually(Duration::from_secs(10), || o.stats.response_bytes()
            >= 100_000)
        .await,
        "the fill never started"
    );
    write_v2_before(&c, &o, "/doc.bin", &slow).await;
    // The client of the slow fill is served in full, as a miss.
    let (xc, got) = slow.await.unwrap();
    assert_eq!(xc, "MISS");
    assert!(got == v1, "the slow client got {} bytes", got.len());
    let discarded = metric_until(&c, "cascade_cache_fills_discarded_total", |v| v >= 1.0).await;
    assert_eq!(
        discarded, 1.0,
        "the fill begun before the write was discarded"
    );
    // The version fetched before the write was not stored: the next reader gets the new one.
    assert_eq!(get(&c, "/doc.bin").await, (200, "MISS".into(), "v2".into()));
    assert_eq!(get(&c, "/doc.bin").await, (200, "HIT".into(), "v2".into()));
    assert_eq!(o.stats.count("GET"), 2);
}

#[tokio::test]
async fn a_write_while_the_origin_is_still_answering_keeps_the_old_version_out() {
    let (o, c) = http_origin("  memory: 16MiB");
    // The origin takes 1.5 s to send even the header of the old version: the write lands
    // before any fill exists.
    o.route_method(
        "GET",
        "/late.bin",
        Reply::new(200, "v1").delay(Duration::from_millis(1500)),
    );
    o.route_method("PUT", "/late.bin", Reply::new(200, ""));
    let slow = tokio::spawn({
        let url = c.url("/late.bin");
        async move {
            let r = client().get(url).send().await.unwrap();
            (header(&r, "x-cache"), r.text().await.unwrap())
        }
    });
    assert!(
        eventually(Duration::from_secs(10), || o.stats.count("GET") >= 1).await,
        "the miss never went upstream"
    );
    write_v2_before(&c, &o, "/late.bin", &slow).await;
    assert_eq!(slow.await.unwrap(), ("MISS".into(), "v1".into()));
    assert_eq!(
        get(&c, "/late.bin").await,
        (200, "MISS".into(), "v2".into())
    );
    assert_eq!(get(&c, "/late.bin").await, (200, "HIT".into(), "v2".into()));
}

#[tokio::test]
async fn concurrent_large_misses_stay_within_the_disk_size_and_the_fill_budget() {
    let dir = tempfile::tempdir().unwrap();
    let disk_size: u64 = 4 << 20;
    let fill_memory = 1u64 << 20;
    let (o, c) = http_origin(&format!(
        "  memory: 64MiB\n  fill_memory: 1MiB\n  disk: {{path: \"{}\", size: 4MiB}}",
        dir.path().display()
    ));
    // Eight 2 MiB objects whose first halves arrive together: 8 MiB of fills in flight
    // against a 4 MiB disk tier and a 1 MiB fill budget.
    let (n, size) = (8usize, 2 << 20);
    let bodies: Vec<Vec<u8>> = (0..n)
        .map(|i| (0..size).map(|j| (j % 251) as u8 ^ i as u8).collect())
        .collect();
    for (i, b) in bodies.iter().enumerate() {
        o.route(
            &format!("/big/{i}"),
            Reply::new(200, b.clone()).trickle(Duration::from_secs(2)),
        );
    }
    let gets: Vec<_> = (0..n)
        .map(|i| {
            let url = c.url(&format!("/big/{i}"));
            tokio::spawn(async move {
                let r = client().get(url).send().await.unwrap();
                (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
            })
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(10), || {
            o.stats.response_bytes() >= (n * size / 2) as u64
        })
        .await,
        "the first halves never went out"
    );
    // While the second halves wait: the directory (temp files included) and the fills'
    // memory stay within their bounds. Ten samples, 100 ms apart.
    for _ in 0..10 {
        let on_disk = bytes_under(dir.path());
        assert!(on_disk <= disk_size, "{on_disk} bytes under the cache dir");
        let m = c.metrics().await;
        let held = metric_sum(&m, "cascade_cache_fill_memory_bytes", &[]).unwrap();
        assert!(held <= fill_memory as f64, "fills hold {held} bytes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (g, b) in gets.into_iter().zip(&bodies) {
        let (status, got) = g.await.unwrap();
        assert_eq!(status, 200);
        assert!(&got == b, "a client got {} bytes", got.len());
    }
    let held = metric_until(&c, "cascade_cache_fill_memory_bytes", |v| v == 0.0).await;
    assert_eq!(held, 0.0, "every fill gave its memory back");
    let m = c.metrics().await;
    assert!(
        metric_sum(&m, "cascade_cache_fill_errors_total", &[]).unwrap() >= 1.0,
        "some fills could not get room on disk"
    );
    assert!(
        metric_sum(&m, "cascade_cache_bytes", &[("tier", "disk")]).unwrap() <= disk_size as f64
    );
    assert!(bytes_under(dir.path()) <= disk_size);
}

/// A client that reads slowly: a 4 KiB receive buffer, its GET sent, the response's head and
/// first `first` bytes of body read; then it reads nothing until told to. Returns the stream,
/// the Content-Length and the body bytes read so far.
async fn slow_get(
    addr: std::net::SocketAddr,
    path: &str,
    first: usize,
) -> (tokio::net::TcpStream, usize, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock.connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed before the head");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("x-cache: hit"), "{head}");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .expect("a content-length")
        .trim()
        .parse()
        .unwrap();
    let mut body = buf.split_off(end);
    while body.len() < first {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0);
        body.extend_from_slice(&chunk[..n]);
    }
    (s, len, body)
}

/// Reads `s` to its end (or `want` bytes) onto `body`.
async fn read_rest(s: &mut tokio::net::TcpStream, body: &mut Vec<u8>, want: usize) {
    use tokio::io::AsyncReadExt;
    let mut chunk = vec![0u8; 1 << 16];
    while body.len() < want {
        match tokio::time::timeout(Duration::from_secs(20), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => body.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("the response stalled at {} of {want} bytes", body.len()),
        }
    }
}

/// A large memory hit whose body the memory tier lets go of (here a purge; an eviction takes
/// the same way) while a slow client is still downloading it: the body is kept whole for that
/// response within half of `fill_memory`, so the client gets every byte of the version it
/// began with; past that half the body is freed (the slow response pinned the segment it
/// was writing, no more), and with no disk copy to go on from (memory only here; the storage
/// tests cover the disk tier's) the response ends early: short, never a wrong byte.
#[tokio::test]
async fn a_large_memory_hit_let_go_under_a_slow_client_is_kept_within_the_budget_or_cut_short() {
    let admin_port = free_port();
    let o = HttpOrigin::start();
    let len = 12 << 20; // well past what the sockets' buffers take in (4 MiB + 4 KiB here)
    let a: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let b: Vec<u8> = (0..len).map(|i| (i % 241) as u8 ^ 0x5a).collect();
    o.route(
        "/a.bin",
        Reply::new(200, a.clone()).header("cache-control", "max-age=600"),
    );
    o.route(
        "/b.bin",
        Reply::new(200, b.clone()).header("cache-control", "max-age=600"),
    );
    // Objects up to 16 MiB in memory; evicted bodies may be kept up to 16 MiB: a's, not b's
    // beside it.
    let yaml = format!(
        "origins:\n  web: {{url: \"{}\"}}\ngroups:\n  media: {{main: web}}\nroutes:\n  - {{path: /, group: media}}\n\
         cache:\n  memory: 64MiB\n  fill_memory: 32MiB\n\
         admin: {{addr: \"127.0.0.1:{admin_port}\", token_env: CASCADE_ADMIN_TOKEN}}\n",
        o.url("")
    );
    let c = start(&yaml);
    for p in ["/a.bin", "/b.bin"] {
        assert_eq!(get(&c, p).await.1, "MISS");
        assert_eq!(get(&c, p).await.1, "HIT");
    }
    let (mut sa, len_a, mut got_a) = slow_get(c.addr, "/a.bin", 100_000).await;
    let (mut sb, len_b, mut got_b) = slow_get(c.addr, "/b.bin", 100_000).await;
    assert_eq!((len_a, len_b), (len, len));
    // Both responses are now stuck in a write the clients do not take.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let purge = |p: &str| {
        client()
            .request(
                reqwest::Method::from_bytes(b"PURGE").unwrap(),
                format!("http://127.0.0.1:{admin_port}/cache/media{p}"),
            )
            .bearer_auth(TOKEN)
            .send()
    };
    assert_eq!(purge("/a.bin").await.unwrap().status(), 200);
    assert_eq!(purge("/b.bin").await.unwrap().status(), 200);
    let m = c.metrics().await;
    assert_eq!(
        metric_sum(&m, "cascade_cache_evicted_in_use_bytes", &[]),
        Some(len as f64),
        "a's body is kept for its response; b's does not fit beside it"
    );
    // A finishes with every byte of what it began.
    read_rest(&mut sa, &mut got_a, len).await;
    assert_eq!(got_a.len(), len);
    assert!(got_a == a, "a's bytes");
    // B ends early: what it got is b's own bytes, and less than all of them.
    read_rest(&mut sb, &mut got_b, len).await;
    assert!(got_b.len() < len, "b was cut short ({} bytes)", got_b.len());
    assert!(got_b[..] == b[..got_b.len()], "b's bytes up to the cut");
    // The kept body goes with its response; the cut is counted.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = c.metrics().await;
        let kept = metric_sum(&m, "cascade_cache_evicted_in_use_bytes", &[]);
        if kept == Some(0.0) {
            let cut = metric_sum(&m, "cascade_cache_evicted_hits_total", &[("then", "cut")]);
            assert_eq!(cut, Some(1.0));
            assert_eq!(
                metric_sum(&m, "cascade_cache_fill_memory_bytes", &[]),
                Some(0.0)
            );
            break;
        }
        assert!(Instant::now() < deadline, "still kept: {kept:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Purged means purged: the next requests are misses, served whole.
    for (p, body) in [("/a.bin", &a), ("/b.bin", &b)] {
        let r = client().get(c.url(p)).send().await.unwrap();
        assert_eq!(header(&r, "x-cache"), "MISS");
        assert!(r.bytes().await.unwrap() == body[..]);
    }
}
