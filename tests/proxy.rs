//! End-to-end tests of `cascade run` against real S3 (s3s) and plain HTTP origins.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// YAML line of an origin pointing at a path-style bucket, signed with credentials read
/// from `{ENV}_AK` / `{ENV}_SK`.
fn signed_origin(name: &str, url: &str, env: &str) -> String {
    format!(
        "  {name}: {{url: \"{url}\", s3: {{region: us-east-1, access_key_env: {env}_AK, \
         secret_key_env: {env}_SK}}}}\n"
    )
}

/// YAML line of an unsigned URL origin.
fn plain_origin(name: &str, url: &str) -> String {
    format!("  {name}: {{url: \"{url}\"}}\n")
}

/// `origins:` + `groups: {media: ...}` + one catch-all route.
fn config(origins: &[String], group: &str) -> String {
    format!(
        "origins:\n{}groups:\n  media: {group}\nroutes:\n  - {{path: /, group: media}}\n",
        origins.concat()
    )
}

/// Main (signed) and fallback (signed) S3 servers behind one group.
struct TwoBuckets {
    main: S3Server,
    prod: S3Server,
    cascade: Cascade,
}

fn two_buckets(group_extra: &str) -> TwoBuckets {
    let main = S3Server::signed();
    let prod = S3Server::signed();
    main.create_bucket("staging");
    prod.create_bucket("production");
    let yaml = config(
        &[
            signed_origin("main", &main.bucket_url("staging"), "MAIN"),
            signed_origin("prod", &prod.bucket_url("production"), "PROD"),
        ],
        &format!("{{main: main, fallbacks: [prod]{group_extra}}}"),
    );
    let cascade = Cascade::builder(&yaml)
        .test_credentials("MAIN_AK", "MAIN_SK")
        .test_credentials("PROD_AK", "PROD_SK")
        .start();
    TwoBuckets {
        main,
        prod,
        cascade,
    }
}

#[tokio::test]
async fn main_hit_is_served_from_main() {
    let t = two_buckets("");
    t.main.put_file("staging", "img/a.jpg", "from-main");
    t.prod.put_file("production", "img/a.jpg", "from-prod");
    let r = client()
        .get(t.cascade.url("/img/a.jpg"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-served-from"), "main");
    assert_eq!(header(&r, "x-served-from-role"), "main");
    assert_eq!(r.text().await.unwrap(), "from-main");
    assert_eq!(t.main.stats.count("GET"), 1);
    assert_eq!(
        t.prod.stats.total(),
        0,
        "a main hit must not touch the fallback"
    );
}

#[tokio::test]
async fn main_miss_falls_back() {
    let t = two_buckets("");
    t.prod
        .put_file("production", "only-in-prod.txt", "from-prod");
    let r = client()
        .get(t.cascade.url("/only-in-prod.txt"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-served-from"), "prod");
    assert_eq!(header(&r, "x-served-from-role"), "fallback");
    assert_eq!(r.text().await.unwrap(), "from-prod");
    assert_eq!(t.main.stats.count("GET"), 1);
    assert_eq!(t.prod.stats.count("GET"), 1);
}

#[tokio::test]
async fn all_miss_returns_the_last_origins_404() {
    let main = HttpOrigin::start();
    let prod = HttpOrigin::start();
    main.set_default(Reply::new(404, "main-missing"));
    prod.set_default(Reply::new(404, "prod-missing"));
    let cascade = Cascade::start(&config(
        &[
            plain_origin("main", &main.url("/b")),
            plain_origin("prod", &prod.url("/b")),
        ],
        "{main: main, fallbacks: [prod]}",
    ));
    let r = client()
        .get(cascade.url("/nowhere.txt"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(header(&r, "x-served-from"), "prod");
    assert_eq!(header(&r, "x-served-from-role"), "fallback");
    assert_eq!(r.text().await.unwrap(), "prod-missing");
    assert_eq!(main.stats.total(), 1);
    assert_eq!(prod.stats.total(), 1);
}

#[tokio::test]
async fn head_requests_follow_the_same_path() {
    let t = two_buckets("");
    t.main.put_file("staging", "m.bin", vec![7u8; 1234]);
    t.prod.put_file("production", "p.bin", vec![9u8; 4321]);
    let c = client();

    let r = c.head(t.cascade.url("/m.bin")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-length"), "1234");
    assert_eq!(header(&r, "x-served-from"), "main");
    assert!(r.bytes().await.unwrap().is_empty());

    let r = c.head(t.cascade.url("/p.bin")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-length"), "4321");
    assert_eq!(header(&r, "x-served-from"), "prod");
    assert_eq!(header(&r, "x-served-from-role"), "fallback");

    let r = c.head(t.cascade.url("/none.bin")).send().await.unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn range_requests_pass_through() {
    let t = two_buckets("");
    t.main.put_file("staging", "m.txt", "0123456789abcdef");
    t.prod
        .put_file("production", "p.txt", "ABCDEFGHIJKLMNOPQRSTUVWXYZ");
    let c = client();

    let r = c
        .get(t.cascade.url("/m.txt"))
        .header("range", "bytes=2-5")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(header(&r, "content-range"), "bytes 2-5/16");
    assert_eq!(r.text().await.unwrap(), "2345");

    let r = c
        .get(t.cascade.url("/p.txt"))
        .header("range", "bytes=20-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(header(&r, "content-range"), "bytes 20-25/26");
    assert_eq!(header(&r, "x-served-from"), "prod");
    assert_eq!(r.text().await.unwrap(), "UVWXYZ");
}

#[tokio::test]
async fn fallback_on_403_treats_access_denied_as_missing() {
    // Main verifies SigV4 but cascade does not sign for it: every request gets 403.
    let main = S3Server::signed();
    let prod = S3Server::anonymous();
    main.put_file("staging", "x.txt", "from-main");
    prod.put_file("production", "x.txt", "from-prod");
    let cascade = Cascade::start(&config(
        &[
            plain_origin("main", &main.bucket_url("staging")),
            plain_origin("prod", &prod.bucket_url("production")),
        ],
        "{main: main, fallbacks: [prod], fallback_on: [403, 404]}",
    ));
    let r = client().get(cascade.url("/x.txt")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-served-from"), "prod");
    assert_eq!(r.text().await.unwrap(), "from-prod");
    assert_eq!(main.stats.count("GET"), 1);
    assert_eq!(prod.stats.count("GET"), 1);
}

#[tokio::test]
async fn fallbacks_are_tried_in_order() {
    let origins: Vec<HttpOrigin> = (0..4).map(|_| HttpOrigin::start()).collect();
    origins[2].route("/b/obj", Reply::new(200, "from-f2"));
    origins[3].route("/b/obj", Reply::new(200, "from-f3"));
    let names = ["m", "f1", "f2", "f3"];
    let yaml = config(
        &names
            .iter()
            .zip(&origins)
            .map(|(n, o)| plain_origin(n, &o.url("/b")))
            .collect::<Vec<_>>(),
        "{main: m, fallbacks: [f1, f2, f3]}",
    );
    let cascade = Cascade::start(&yaml);
    let r = client().get(cascade.url("/obj")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-served-from"), "f2");
    assert_eq!(header(&r, "x-served-from-role"), "fallback");
    assert_eq!(r.text().await.unwrap(), "from-f2");
    let counts: Vec<u64> = origins.iter().map(|o| o.stats.total()).collect();
    assert_eq!(counts, vec![1, 1, 1, 0], "requests per origin m,f1,f2,f3");
    let seqs: Vec<u64> = origins[..3]
        .iter()
        .map(|o| o.stats.first_seq().unwrap())
        .collect();
    assert!(
        seqs[0] < seqs[1] && seqs[1] < seqs[2],
        "order m,f1,f2: {seqs:?}"
    );
}

#[tokio::test]
async fn skip_fallback_never_asks_the_fallback() {
    let t = two_buckets(", skip_fallback: true");
    t.prod.put_file("production", "p.txt", "from-prod");
    t.main.put_file("staging", "m.txt", "from-main");
    let c = client();
    let r = c.get(t.cascade.url("/p.txt")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(header(&r, "x-served-from"), "main");
    let r = c.head(t.cascade.url("/p.txt")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = c.get(t.cascade.url("/m.txt")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(t.main.stats.total(), 3);
    assert_eq!(t.prod.stats.total(), 0, "bypass made a fallback request");
}

#[tokio::test]
async fn put_lands_in_main_only() {
    let t = two_buckets("");
    let c = client();
    let r = c
        .put(t.cascade.url("/uploads/new.txt"))
        .body("hello upload")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "PUT status {}", r.status());
    assert_eq!(
        t.main.read_file("staging", "uploads/new.txt").as_deref(),
        Some(&b"hello upload"[..])
    );
    assert!(t.prod.read_file("production", "uploads/new.txt").is_none());

    let r = c
        .get(t.cascade.url("/uploads/new.txt"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-served-from"), "main");
    assert_eq!(r.text().await.unwrap(), "hello upload");

    let r = c
        .delete(t.cascade.url("/uploads/new.txt"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "DELETE status {}", r.status());
    assert!(t.main.read_file("staging", "uploads/new.txt").is_none());

    assert_eq!(t.main.stats.count("PUT"), 1);
    assert_eq!(t.main.stats.count("DELETE"), 1);
    assert_eq!(t.prod.stats.writes(), 0, "the fallback received writes");
    assert_eq!(t.prod.stats.total(), 0);
}

#[tokio::test]
async fn failed_write_is_not_replayed_to_fallback() {
    let main = HttpOrigin::start();
    let prod = HttpOrigin::start();
    main.set_default(Reply::new(404, "main-404"));
    prod.set_default(Reply::new(200, "prod-ok"));
    let cascade = Cascade::start(&config(
        &[
            plain_origin("main", &main.url("/b")),
            plain_origin("prod", &prod.url("/b")),
        ],
        "{main: main, fallbacks: [prod]}",
    ));
    let c = client();
    for method in ["PUT", "POST", "DELETE"] {
        let r = c
            .request(method.parse().unwrap(), cascade.url("/k.txt"))
            .body("data")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{method}");
        assert_eq!(r.text().await.unwrap(), "main-404", "{method}");
    }
    assert_eq!(main.stats.writes(), 3);
    assert_eq!(
        prod.stats.total(),
        0,
        "a write was replayed to the fallback"
    );
}

#[tokio::test]
async fn large_streamed_put_is_intact_and_memory_bounded() {
    const SIZE: u64 = 256 << 20;
    let main = S3Server::signed();
    let prod = S3Server::signed();
    main.create_bucket("staging");
    prod.create_bucket("production");
    let yaml = format!(
        "origins:\n{}{}groups:\n  media: {{main: main, fallbacks: [prod]}}\n\
         routes:\n  - {{path: /, group: media, max_upload_size: 1GiB}}\n",
        signed_origin("main", &main.bucket_url("staging"), "MAIN"),
        signed_origin("prod", &prod.bucket_url("production"), "PROD"),
    );
    let cascade = Cascade::builder(&yaml)
        .test_credentials("MAIN_AK", "MAIN_SK")
        .test_credentials("PROD_AK", "PROD_SK")
        .start();
    let c = client_with_timeout(Duration::from_secs(300));

    // Warm up (small PUT and GET) so the baseline includes the steady-state buffers.
    let r = c
        .put(cascade.url("/warm.bin"))
        .body(vec![1u8; 64 << 10])
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "warm-up PUT: {}", r.status());
    let r = c.get(cascade.url("/warm.bin")).send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap().len(), 64 << 10);
    let baseline = cascade.vm_hwm_kib();

    let expected = pattern_checksum(SIZE);
    let r = c
        .put(cascade.url("/big.bin"))
        .header("content-length", SIZE.to_string())
        .body(reqwest::Body::wrap_stream(pattern_stream(SIZE, 256 << 10)))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body = r.text().await.unwrap_or_default();
    assert!(status.is_success(), "big PUT: {status} {body}");

    let stored = file_checksum(&main.object_path("staging", "big.bin")).unwrap();
    assert_eq!(stored.len, SIZE, "stored size");
    assert_eq!(stored, expected, "stored content differs");
    let peak = cascade.vm_hwm_kib();
    let growth_mib = peak.saturating_sub(baseline) as f64 / 1024.0;
    eprintln!("VmHWM baseline {baseline} KiB, after upload {peak} KiB (+{growth_mib:.1} MiB)");
    assert!(
        growth_mib < 64.0,
        "cascade buffered the upload: VmHWM grew by {growth_mib:.1} MiB (baseline {baseline} KiB)"
    );
    assert_eq!(prod.stats.total(), 0);
}

#[tokio::test]
async fn private_bucket_is_reachable_only_through_cascade() {
    let t = two_buckets("");
    t.main.put_file("staging", "private.txt", "private-data");
    let c = client();
    let direct = c
        .get(format!("{}/private.txt", t.main.bucket_url("staging")))
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), 403, "unsigned direct GET must be refused");
    assert!(!direct.text().await.unwrap().contains("private-data"));

    let r = c.get(t.cascade.url("/private.txt")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "private-data");
}

#[tokio::test]
async fn wrong_credentials_403_reaches_the_client() {
    let main = S3Server::signed();
    let prod = S3Server::signed();
    main.put_file("staging", "x.txt", "from-main");
    prod.put_file("production", "x.txt", "from-prod");
    let yaml = config(
        &[
            signed_origin("main", &main.bucket_url("staging"), "MAIN"),
            signed_origin("prod", &prod.bucket_url("production"), "PROD"),
        ],
        "{main: main, fallbacks: [prod]}",
    );
    let cascade = Cascade::builder(&yaml)
        .env("MAIN_AK", ACCESS_KEY)
        .env("MAIN_SK", "definitely-the-wrong-secret")
        .test_credentials("PROD_AK", "PROD_SK")
        .start();
    let r = client().get(cascade.url("/x.txt")).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(header(&r, "x-served-from"), "main");
    let body = r.text().await.unwrap();
    assert!(!body.contains("from-"), "{body}");
    assert!(
        body.contains("SignatureDoesNotMatch"),
        "origin error body: {body}"
    );
    assert_eq!(main.stats.count("GET"), 1);
    assert_eq!(prod.stats.total(), 0, "403 must not be replayed by default");
}

#[tokio::test]
async fn client_authorization_is_replaced_by_sigv4() {
    let o = HttpOrigin::start();
    o.route("/bucket/obj.txt", Reply::new(200, "ok"));
    let cascade = Cascade::builder(&config(
        &[signed_origin("main", &o.url("/bucket"), "MAIN")],
        "{main: main}",
    ))
    .test_credentials("MAIN_AK", "MAIN_SK")
    .start();
    let r = client()
        .get(cascade.url("/obj.txt"))
        .header("authorization", "Bearer client-token-XYZZY")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rec = o.stats.last().unwrap();
    let auths: Vec<_> = rec.headers.get_all("authorization").iter().collect();
    assert_eq!(
        auths.len(),
        1,
        "exactly one Authorization upstream: {auths:?}"
    );
    let auth = rec.header("authorization");
    assert!(
        auth.starts_with("AWS4-HMAC-SHA256 ")
            && auth.contains(&format!("Credential={ACCESS_KEY}/"))
            && auth.contains("/us-east-1/s3/aws4_request"),
        "not a SigV4 Authorization: {auth}"
    );
    assert!(!auth.contains("XYZZY"));
    for (name, value) in rec.headers.iter() {
        assert!(
            !value.as_bytes().windows(5).any(|w| w == b"XYZZY"),
            "client token leaked upstream in {name}"
        );
    }
    assert!(!rec.header("x-amz-date").is_empty(), "x-amz-date missing");
    assert!(
        !rec.header("x-amz-content-sha256").is_empty(),
        "x-amz-content-sha256 missing"
    );
    assert_eq!(rec.header("host"), o.authority());
}

#[tokio::test]
async fn upstream_path_and_host_are_rewritten() {
    let o = HttpOrigin::start();
    o.route("/prefix/a/b.txt", Reply::new(200, "ab"));
    o.route("/prefix/c.txt", Reply::new(200, "c"));
    let yaml = format!(
        "origins:\n{}groups:\n  media: {{main: main}}\nroutes:\n\
         - {{path: /media, strip_prefix: true, group: media}}\n\
         - {{path: /, group: media}}\n",
        plain_origin("main", &o.url("/prefix")),
    );
    let cascade = Cascade::start(&yaml);
    let c = client();
    let r = c
        .get(cascade.url("/a/b.txt?x=1&y=two"))
        .header("host", "media.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ab");
    let rec = o.stats.last().unwrap();
    assert_eq!(rec.uri, "/prefix/a/b.txt?x=1&y=two");
    assert_eq!(
        rec.header("host"),
        o.authority(),
        "Host must name the origin"
    );

    let r = c.get(cascade.url("/media/c.txt")).send().await.unwrap();
    assert_eq!(r.status(), 200, "strip_prefix route");
    assert_eq!(o.stats.last().unwrap().uri, "/prefix/c.txt");
}

#[tokio::test]
async fn origin_down_is_502() {
    let closed = free_port();
    let cascade = Cascade::start(&config(
        &[plain_origin(
            "down",
            &format!("http://127.0.0.1:{closed}/bucket"),
        )],
        "{main: down}",
    ));
    let t = Instant::now();
    let r = client().get(cascade.url("/x.txt")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert!(t.elapsed() < Duration::from_secs(10));
}

#[test]
fn an_error_answer_says_the_connection_closes() {
    // Pingora never reuses a client connection after a proxy error: the answer must say so,
    // or a keep-alive client would send its next request into a closing socket.
    let closed = free_port();
    let cascade = Cascade::start(&config(
        &[plain_origin(
            "down",
            &format!("http://127.0.0.1:{closed}/bucket"),
        )],
        "{main: down}",
    ));
    let r = raw_request(
        cascade.addr,
        b"GET /x.txt HTTP/1.1\r\nHost: h\r\n\r\n",
        Duration::from_secs(10),
    );
    assert_eq!(r.status, 502);
    let head = r.head.to_ascii_lowercase();
    assert!(head.contains("connection: close"), "{head}");
    assert!(!head.contains("keep-alive"), "{head}");
}

#[tokio::test]
async fn slow_origin_is_504_with_origin_timeouts() {
    let o = HttpOrigin::start();
    o.route("/b/slow.txt", Reply::new(200, "late"));
    o.set_delay(Duration::from_secs(8));
    let cascade = Cascade::start(&format!(
        "origins:\n  slow: {{url: \"{}\", timeouts: {{read: 500ms, total: 2s}}}}\n\
         groups:\n  media: {{main: slow}}\nroutes:\n  - {{path: /, group: media}}\n",
        o.url("/b")
    ));
    let t = Instant::now();
    let r = client().get(cascade.url("/slow.txt")).send().await.unwrap();
    let took = t.elapsed();
    assert_eq!(r.status(), 504);
    assert!(took < Duration::from_secs(5), "504 only after {took:?}");
    assert_eq!(o.stats.total(), 1);
}

#[tokio::test]
async fn slow_origin_is_504_with_global_timeouts() {
    let o = HttpOrigin::start();
    o.route("/b/slow.txt", Reply::new(200, "late"));
    o.set_delay(Duration::from_secs(8));
    let cascade = Cascade::start(&format!(
        "timeouts: {{connect: 1s, read: 500ms, total: 2s}}\n{}",
        config(&[plain_origin("slow", &o.url("/b"))], "{main: slow}")
    ));
    let t = Instant::now();
    let r = client().get(cascade.url("/slow.txt")).send().await.unwrap();
    let took = t.elapsed();
    assert_eq!(r.status(), 504);
    assert!(took < Duration::from_secs(5), "504 only after {took:?}");
}

#[tokio::test]
async fn dir_origin_refuses_path_traversal() {
    let top = tempfile::tempdir().unwrap();
    let root = top.path().join("root");
    let outside = top.path().join("outside");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(root.join("public.txt"), "public-content").unwrap();
    std::fs::write(root.join("sub/inner.txt"), "inner-content").unwrap();
    const SECRET: &str = "TOP-SECRET-7f3a9c";
    std::fs::write(top.path().join("secret.txt"), SECRET).unwrap();
    std::fs::write(outside.join("secret.txt"), SECRET).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
    std::os::unix::fs::symlink(top.path().join("secret.txt"), root.join("leak.txt")).unwrap();

    let mut cascade = Cascade::start(&format!(
        "origins:\n  local: {{dir: \"{}\"}}\ngroups:\n  media: {{main: local}}\n\
         routes:\n  - {{path: /, group: media}}\n",
        root.display()
    ));

    // Positive controls: the origin serves files inside its root.
    let ok = raw_get(cascade.addr, "/public.txt");
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert!(ok.text().contains("public-content"));
    let ok = raw_get(cascade.addr, "/sub/inner.txt");
    assert_eq!(ok.status, 200, "{}", ok.text());

    let attacks = [
        "/../secret.txt",
        "/sub/../../secret.txt",
        "/%2e%2e/secret.txt",
        "/%2E%2E/secret.txt",
        "/sub/%2e%2e/%2e%2e/secret.txt",
        "/..%2fsecret.txt",
        "/%2e%2e%2fsecret.txt",
        "/sub%2f..%2f..%2fsecret.txt",
        "/..%5csecret.txt",
        "/link/secret.txt",
        "/leak.txt",
        "//../secret.txt",
    ];
    for target in attacks {
        let r = raw_get(cascade.addr, target);
        let text = r.text();
        assert!(
            !text.contains(SECRET),
            "{target}: file content leaked: {text}"
        );
        assert!(
            [400, 403, 404].contains(&r.status),
            "{target}: expected 400/403/404, got {}",
            r.status
        );
    }
    assert!(
        cascade.is_running(),
        "cascade died during the traversal attempts"
    );
}

#[tokio::test]
async fn no_route_is_404() {
    let o = HttpOrigin::start();
    o.set_default(Reply::new(200, "origin"));
    let yaml = format!(
        "origins:\n{}groups:\n  media: {{main: main}}\nroutes:\n\
         - {{host: only.example.com, path: /, group: media}}\n\
         - {{path: /media, group: media}}\n",
        plain_origin("main", &o.url("/b"))
    );
    let cascade = Cascade::start(&yaml);
    let c = client();
    for path in ["/", "/other.txt", "/mediax/a.txt", "/medi"] {
        let r = c.get(cascade.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
    assert_eq!(o.stats.total(), 0, "an unrouted request reached the origin");

    let r = c.get(cascade.url("/media/a.txt")).send().await.unwrap();
    assert_eq!(r.status(), 200, "positive control /media/a.txt");
    let r = c
        .get(cascade.url("/x.txt"))
        .header("host", "only.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "positive control host route");
    assert_eq!(o.stats.total(), 2);
}

#[tokio::test]
async fn read_only_group_refuses_writes() {
    let o = HttpOrigin::start();
    o.set_default(Reply::new(200, "ok"));
    let cascade = Cascade::start(&config(
        &[plain_origin("main", &o.url("/b"))],
        "{main: main, read_only: true}",
    ));
    let c = client();
    for method in ["PUT", "DELETE", "POST"] {
        let r = c
            .request(method.parse().unwrap(), cascade.url("/x.txt"))
            .body("data")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405, "{method}");
    }
    assert_eq!(o.stats.total(), 0, "a refused write reached the origin");
    let r = c.get(cascade.url("/x.txt")).send().await.unwrap();
    assert_eq!(r.status(), 200, "reads still work");
}

#[tokio::test]
async fn oversized_upload_is_413_before_the_body() {
    let o = HttpOrigin::start();
    o.set_default(Reply::new(200, "ok"));
    let yaml = format!(
        "origins:\n{}groups:\n  media: {{main: main}}\nroutes:\n\
         - {{path: /, group: media, max_upload_size: 1MiB}}\n",
        plain_origin("main", &o.url("/b"))
    );
    let cascade = Cascade::start(&yaml);

    // Only the head is sent: the answer must come without the body being read.
    let head = format!(
        "PUT /big.bin HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n\r\n",
        cascade.addr,
        2 << 20
    );
    let r = raw_request(cascade.addr, head.as_bytes(), Duration::from_secs(5));
    assert_eq!(r.status, 413, "{}", r.head);
    assert_eq!(
        o.stats.total(),
        0,
        "the oversized upload reached the origin"
    );

    let c = client();
    let r = c
        .put(cascade.url("/small.bin"))
        .body(vec![0u8; 1 << 20])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "an upload of exactly 1 MiB is allowed");
    assert_eq!(o.stats.request_bytes(), 1 << 20);
}

#[tokio::test]
async fn metrics_count_traffic() {
    let main = HttpOrigin::start();
    let prod = HttpOrigin::start();
    main.route("/b/m.txt", Reply::new(200, "m"));
    prod.route("/b/p.txt", Reply::new(200, "p"));
    let closed = free_port();
    let yaml = format!(
        "origins:\n{}{}{}groups:\n  media: {{main: main, fallbacks: [prod]}}\n  \
         broken: {{main: down}}\nroutes:\n  - {{path: /down, group: broken}}\n  \
         - {{path: /, group: media}}\n",
        plain_origin("main", &main.url("/b")),
        plain_origin("prod", &prod.url("/b")),
        plain_origin("down", &format!("http://127.0.0.1:{closed}/b")),
    );
    let cascade = Cascade::start(&yaml);
    let before = cascade.metrics().await;
    let req_before = metric_sum(&before, "cascade_requests_total", &[]).unwrap_or(0.0);

    let c = client();
    assert_eq!(
        c.get(cascade.url("/m.txt")).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        c.get(cascade.url("/p.txt")).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        c.get(cascade.url("/none.txt"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        c.get(cascade.url("/down/x.txt"))
            .send()
            .await
            .unwrap()
            .status(),
        502
    );

    // Metrics are recorded in the logging phase, possibly just after the response: poll.
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = cascade.metrics().await;
        let reqs = metric_sum(&text, "cascade_requests_total", &[]).unwrap_or(0.0);
        let replays = metric_sum(
            &text,
            "cascade_fallback_replays_total",
            &[("group", "media")],
        )
        .unwrap_or(0.0);
        let errors = metric_sum(
            &text,
            "cascade_upstream_errors_total",
            &[("origin", "down")],
        )
        .unwrap_or(0.0);
        // The duration is observed a moment after the request is counted.
        let timed = metric_sum(&text, "cascade_request_duration_seconds_count", &[]).unwrap_or(0.0);
        if (reqs - req_before >= 4.0 && replays >= 2.0 && errors >= 1.0 && timed >= 4.0)
            || Instant::now() > deadline
        {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let reqs = metric_sum(&text, "cascade_requests_total", &[]);
    assert!(
        reqs.unwrap_or(0.0) - req_before >= 4.0,
        "cascade_requests_total: {reqs:?} (before {req_before})\n{text}"
    );
    let replays = metric_sum(
        &text,
        "cascade_fallback_replays_total",
        &[("group", "media")],
    );
    assert!(
        replays.unwrap_or(0.0) >= 2.0,
        "cascade_fallback_replays_total{{group=media}} = {replays:?} after 2 replays\n{text}"
    );
    let errors = metric_sum(
        &text,
        "cascade_upstream_errors_total",
        &[("origin", "down")],
    );
    assert!(
        errors.unwrap_or(0.0) >= 1.0,
        "cascade_upstream_errors_total{{origin=down}} = {errors:?}\n{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("cascade_upstream_errors_total{")
                && l.contains("origin=\"down\"")
                && l.contains("kind=\"")),
        "upstream errors carry a kind label\n{text}"
    );
    let req_hist = metric_sum(&text, "cascade_request_duration_seconds_count", &[]);
    assert!(
        req_hist.unwrap_or(0.0) >= 4.0,
        "cascade_request_duration_seconds_count = {req_hist:?}\n{text}"
    );
    let up_hist = metric_sum(&text, "cascade_upstream_duration_seconds_count", &[]);
    assert!(
        up_hist.unwrap_or(0.0) >= 3.0,
        "cascade_upstream_duration_seconds_count = {up_hist:?}\n{text}"
    );
    // Each request is timed under the route it is counted under (the series are looked up
    // by route index, once per config): per route, as many timings as requests; requests
    // that took no route have their series from the start, at zero here.
    let timed_routes: Vec<(String, f64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("cascade_request_duration_seconds_count{route=\""))
        .filter_map(|l| l.split_once("\"} "))
        .map(|(route, n)| (route.to_string(), n.parse().unwrap()))
        .collect();
    assert_eq!(timed_routes.len(), 3, "two routes and none\n{text}");
    for (route, timed) in &timed_routes {
        let counted = metric_sum(&text, "cascade_requests_total", &[("route", route)]);
        assert_eq!(Some(*timed), counted.or(Some(0.0)), "route {route}\n{text}");
    }
    let none = timed_routes.iter().find(|(r, _)| r == "none");
    assert_eq!(none.map(|(_, n)| *n), Some(0.0), "{text}");
    assert!(
        timed_routes.iter().filter(|(_, n)| *n > 0.0).count() == 2,
        "both routes were timed\n{text}"
    );
}

#[tokio::test]
async fn signed_requests_with_special_characters_in_keys() {
    let t = two_buckets("");
    let keys = [
        ("dir/with space.txt", "/dir/with%20space.txt"),
        ("plus+sign.txt", "/plus%2Bsign.txt"),
        ("café/ünï.txt", "/caf%C3%A9/%C3%BCn%C3%AF.txt"),
        ("paren(1)!'*.txt", "/paren%281%29%21%27%2A.txt"),
        ("tilde~_-.txt", "/tilde~_-.txt"),
    ];
    for (i, (key, _)) in keys.iter().enumerate() {
        t.main.put_file("staging", key, format!("main-{i}"));
        t.prod
            .put_file("production", &format!("fb/{key}"), format!("prod-{i}"));
    }
    let c = client();
    for (i, (key, path)) in keys.iter().enumerate() {
        let r = c.get(t.cascade.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "main GET {key:?} via {path}");
        assert_eq!(r.text().await.unwrap(), format!("main-{i}"));
        let r = c
            .get(t.cascade.url(&format!("/fb{path}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "fallback GET {key:?} via /fb{path}");
        assert_eq!(header(&r, "x-served-from"), "prod");
        assert_eq!(r.text().await.unwrap(), format!("prod-{i}"));
    }
    // S3 response overrides are refused unless the route allows them (tests/hostile.rs has
    // the allowed case, signed and verified).
    let r = c
        .get(
            t.cascade
                .url("/dir/with%20space.txt?response-content-type=text%2Fx-test"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "GET with an override query");
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("<Code>AccessDenied</Code>"));
    // And a signed PUT with a special key.
    let r = c
        .put(t.cascade.url("/up%20load/%C3%A9t%C3%A9.txt"))
        .body("summer")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "PUT status {}", r.status());
    assert_eq!(
        t.main.read_file("staging", "up load/été.txt").as_deref(),
        Some(&b"summer"[..])
    );
}

#[tokio::test]
async fn repeated_requests_on_keepalive_connections_stay_correct() {
    let t = two_buckets("");
    for i in 0..5 {
        t.main
            .put_file("staging", &format!("m{i}.txt"), format!("main-{i}"));
        t.prod
            .put_file("production", &format!("p{i}.txt"), format!("prod-{i}"));
    }
    let c = client();
    for round in 0..10 {
        for i in 0..5 {
            let r = c
                .get(t.cascade.url(&format!("/m{i}.txt")))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "round {round} m{i}");
            assert_eq!(r.text().await.unwrap(), format!("main-{i}"));
            let r = c
                .get(t.cascade.url(&format!("/p{i}.txt")))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "round {round} p{i}");
            assert_eq!(header(&r, "x-served-from"), "prod");
            assert_eq!(r.text().await.unwrap(), format!("prod-{i}"));
            let r = c.get(t.cascade.url("/nope.txt")).send().await.unwrap();
            assert_eq!(r.status(), 404, "round {round} miss");
            let _ = r.bytes().await.unwrap();
        }
    }
}

#[tokio::test]
async fn oversized_chunked_upload_does_not_get_through() {
    const LIMIT: u64 = 1 << 20;
    let o = HttpOrigin::start();
    o.set_default(Reply::new(200, "ok"));
    let yaml = format!(
        "origins:\n{}groups:\n  media: {{main: main}}\nroutes:\n\
         - {{path: /, group: media, max_upload_size: 1MiB}}\n",
        plain_origin("main", &o.url("/b"))
    );
    let cascade = Cascade::start(&yaml);
    // No Content-Length: the limit can only be enforced while streaming.
    let r = client()
        .put(cascade.url("/chunked.bin"))
        .body(reqwest::Body::wrap_stream(pattern_stream(
            4 * LIMIT,
            64 << 10,
        )))
        .send()
        .await;
    match r {
        Ok(r) => assert_eq!(r.status(), 413, "4 MiB chunked upload over a 1 MiB limit"),
        Err(e) => eprintln!("upload aborted by cascade: {e}"),
    }
    assert!(
        o.stats.request_bytes() <= LIMIT + (256 << 10),
        "origin received {} bytes past a 1 MiB limit",
        o.stats.request_bytes()
    );
}

#[tokio::test]
async fn large_get_via_fallback_streams() {
    const SIZE: u64 = 128 << 20;
    let main = S3Server::signed();
    let prod = S3Server::signed();
    main.create_bucket("staging");
    let data_path = prod.object_path("production", "big.bin");
    std::fs::create_dir_all(data_path.parent().unwrap()).unwrap();
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&data_path).unwrap());
        let mut off = 0;
        while off < SIZE {
            std::io::Write::write_all(&mut f, &pattern_chunk(off, 1 << 20)).unwrap();
            off += 1 << 20;
        }
    }
    let yaml = config(
        &[
            signed_origin("main", &main.bucket_url("staging"), "MAIN"),
            signed_origin("prod", &prod.bucket_url("production"), "PROD"),
        ],
        "{main: main, fallbacks: [prod]}",
    );
    let cascade = Cascade::builder(&yaml)
        .test_credentials("MAIN_AK", "MAIN_SK")
        .test_credentials("PROD_AK", "PROD_SK")
        .start();
    prod.put_file("production", "warm.bin", vec![3u8; 64 << 10]);
    let c = client_with_timeout(Duration::from_secs(300));
    let r = c.get(cascade.url("/warm.bin")).send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap().len(), 64 << 10);
    let baseline = cascade.vm_hwm_kib();

    let mut r = c.get(cascade.url("/big.bin")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-served-from"), "prod");
    let mut sum = Checksum::default();
    while let Some(chunk) = r.chunk().await.unwrap() {
        sum.update(&chunk);
    }
    assert_eq!(sum.len, SIZE, "body length");
    assert_eq!(sum, pattern_checksum(SIZE), "body content");
    let peak = cascade.vm_hwm_kib();
    let growth_mib = peak.saturating_sub(baseline) as f64 / 1024.0;
    eprintln!("VmHWM baseline {baseline} KiB, after download {peak} KiB (+{growth_mib:.1} MiB)");
    assert!(
        growth_mib < 64.0,
        "cascade buffered the download: VmHWM grew by {growth_mib:.1} MiB"
    );
}

#[tokio::test]
async fn malformed_requests_get_400_and_never_reach_the_origin() {
    let o = HttpOrigin::start();
    o.set_default(Reply::new(200, "origin"));
    let yaml = format!(
        "origins:\n{}groups:\n  media: {{main: main}}\nroutes:\n  - {{group: media}}\n",
        plain_origin("main", &o.url("/b"))
    );
    let cascade = Cascade::start(&yaml);
    let bad: [&[u8]; 3] = [
        b"NOT A REQUEST\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: a\r\nBroken Header\r\n\r\n",
    ];
    for req in bad {
        let r = raw_request(cascade.addr, req, Duration::from_secs(5));
        assert_eq!(r.status, 400, "{:?}", String::from_utf8_lossy(req));
    }
    assert_eq!(o.stats.total(), 0, "a malformed request reached the origin");
    // positive control: a well-formed request on the same proxy goes through
    let r = raw_get(cascade.addr, "/a");
    assert_eq!(r.status, 200);
}

/// `server.write_buffer` changes only how responses are sent, never what: bodies below, at
/// and above the buffer arrive whole, unbuffered (0), with the default and with the largest.
#[tokio::test]
async fn responses_are_intact_whatever_the_write_buffer() {
    let o = HttpOrigin::start();
    let sizes = [0usize, 100, 7_000, 8_192, 20_000, 300_000];
    for n in sizes {
        let body: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        o.route(&format!("/b/{n}.bin"), Reply::new(200, body));
    }
    for server in ["0", "8KiB", "1MiB"] {
        let yaml = config(&[plain_origin("web", &o.url("/b"))], "{main: web}");
        let cascade = Cascade::builder(&yaml)
            .server("write_buffer", server)
            .start();
        let client = client();
        for n in sizes {
            let url = cascade.url(&format!("/{n}.bin"));
            let r = client.get(&url).send().await.unwrap();
            assert_eq!(r.status(), 200, "{server} {n}");
            let got = r.bytes().await.unwrap();
            assert_eq!(got.len(), n, "{server} {n}");
            assert!(
                got.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8),
                "{server} {n}"
            );
            let r = client.head(&url).send().await.unwrap();
            assert_eq!(r.status(), 200, "{server} HEAD {n}");
            if n > 0 {
                // (The test origin sends no length on a HEAD of an empty body.)
                assert_eq!(
                    header(&r, "content-length"),
                    n.to_string(),
                    "{server} HEAD {n}"
                );
            }
        }
    }
}

/// `server.upstream_read_size` changes only how an origin's answer is read, never what:
/// bodies of every framing (a length; chunked, with chunk heads split across reads; until
/// close), and a connection whose answer was read in small pieces is still kept.
#[tokio::test]
async fn responses_are_intact_whatever_the_upstream_read_size() {
    let n = 300_000usize;
    let body: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    let b = body.clone();
    let origin = RawOrigin::start(move |head| {
        let mut out = Vec::new();
        if head.starts_with("GET /b/len ") {
            out.extend(format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n").bytes());
            out.extend_from_slice(&b);
        } else if head.starts_with("GET /b/chunked ") {
            out.extend(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
            for c in b.chunks(7_777) {
                out.extend(format!("{:x}\r\n", c.len()).bytes());
                out.extend_from_slice(c);
                out.extend(b"\r\n");
            }
            out.extend(b"0\r\n\r\n");
        } else {
            out.extend(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
            out.extend_from_slice(&b);
            return vec![RawPart::Bytes(out), RawPart::Close];
        }
        vec![RawPart::Bytes(out)]
    });
    for read_size in ["1KiB", "5000", "64KiB"] {
        let yaml = config(&[plain_origin("raw", &origin.url("/b"))], "{main: raw}");
        let cascade = Cascade::builder(&yaml)
            .server("upstream_read_size", read_size)
            .start();
        let before = origin.connections();
        let client = client();
        for path in ["/len", "/chunked", "/close", "/len", "/chunked"] {
            let r = client.get(cascade.url(path)).send().await.unwrap();
            assert_eq!(r.status(), 200, "{read_size} {path}");
            let got = r.bytes().await.unwrap();
            assert!(
                got[..] == body[..],
                "{read_size} {path}: {} bytes",
                got.len()
            );
        }
        // One connection up to the answer read until close, one after it.
        assert_eq!(
            origin.connections() - before,
            2,
            "{read_size}: kept between answers"
        );
    }
}

/// Starts `cascade run -c <dir>/cascade.yaml` with `yaml` (and `TMPDIR=tmpdir`).
fn spawn_cascade(
    dir: &std::path::Path,
    yaml: &str,
    tmpdir: &std::path::Path,
) -> std::process::Child {
    let cfg = dir.join("cascade.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    std::process::Command::new(cascade_bin())
        .args(["run", "-c"])
        .arg(&cfg)
        .env("TMPDIR", tmpdir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits (bounded) until `port` accepts connections, or `child` exits.
fn wait_listening(child: &mut std::process::Child, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "cascade exited early");
        assert!(Instant::now() < deadline, "cascade did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn mode(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Item 8: `server.runtime_dir` holds the directory origins' Unix sockets. One writable by
/// group or others (another user could swap a socket) stops cascade at start with an error
/// naming it and what is wrong; a missing one is created 0700; without the setting a fresh
/// private directory is used and removed when cascade exits.
#[test]
fn the_runtime_dir_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let www = tmp.path().join("www");
    std::fs::create_dir(&www).unwrap();
    let sys_tmp = tmp.path().join("tmp");
    std::fs::create_dir(&sys_tmp).unwrap();
    let yaml = |port: u16, rt: Option<&std::path::Path>| {
        let rt = rt.map_or(String::new(), |p| {
            format!(", runtime_dir: \"{}\"", p.display())
        });
        format!(
            "listen: [{{addr: \"127.0.0.1:{port}\"}}]\nserver: {{threads: 1, grace_period: 1s{rt}}}\n\
             origins: {{www: {{dir: \"{}\"}}}}\ngroups: {{g: {{main: www}}}}\nroutes: [{{path: /, group: g}}]\n",
            www.display()
        )
    };

    // World- or group-writable: refused, with the path and the reason.
    let shared = tmp.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    for m in [0o777, 0o775] {
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(m)).unwrap();
        let out = spawn_cascade(tmp.path(), &yaml(free_port(), Some(&shared)), &sys_tmp)
            .wait_with_output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains("server.runtime_dir")
                && err.contains(&shared.display().to_string())
                && err.contains("writable by its group or by others"),
            "{err}"
        );
        assert!(!shared.join("dir-origin-0.sock").exists());
    }

    // Missing: created 0700, and the origin's socket is in it.
    let fresh = tmp.path().join("run/cascade");
    let port = free_port();
    let mut child = spawn_cascade(tmp.path(), &yaml(port, Some(&fresh)), &sys_tmp);
    wait_listening(&mut child, port);
    // The directory origin's service binds its socket on a thread of its own (and a port
    // another test process also drew can answer before cascade does): wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fresh.join("dir-origin-0.sock").exists() {
        assert!(Instant::now() < deadline, "no socket in the runtime dir");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(mode(&fresh), 0o700);
    child.kill().unwrap();
    child.wait().unwrap();

    // Default: a new private directory under TMPDIR, gone after exit.
    let port = free_port();
    let mut child = spawn_cascade(tmp.path(), &yaml(port, None), &sys_tmp);
    wait_listening(&mut child, port);
    let deadline = Instant::now() + Duration::from_secs(10);
    let dirs: Vec<_> = loop {
        let dirs: Vec<_> = std::fs::read_dir(&sys_tmp)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        if dirs.len() == 1 && dirs[0].join("dir-origin-0.sock").exists() {
            break dirs;
        }
        assert!(
            Instant::now() < deadline,
            "no runtime dir with a socket: {dirs:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let name = dirs[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with(&format!("cascade-{}-", child.id())),
        "{name}"
    );
    assert_eq!(mode(&dirs[0]), 0o700);
    assert!(dirs[0].join("dir-origin-0.sock").exists());
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "cascade did not exit on SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!dirs[0].exists(), "removed at exit");
}

// ---------------------------------------------------------------------------------------------
// cascade's upstream pool (`origin::pool`): main's connection outlives a replayed 404
// ---------------------------------------------------------------------------------------------

/// One group: origin `main` at `main_url`, its fallback `fb` at `fb_url`.
fn main_and_fallback(main_url: &str, fb_url: &str) -> String {
    config(
        &[plain_origin("main", main_url), plain_origin("fb", fb_url)],
        "{main: main, fallbacks: [fb]}",
    )
}

/// `n` sequential GETs of `path`: each must be the fallback's 200 `body`.
async fn fallback_gets(cascade: &Cascade, path: &str, body: &str, n: usize) {
    let c = client();
    for i in 0..n {
        let r = c.get(cascade.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(header(&r, "x-served-from-role"), "fallback", "request {i}");
        assert_eq!(r.text().await.unwrap(), body, "request {i}");
    }
}

/// Connections cascade's pool has kept so far (`cascade_upstream_connections_total`).
async fn kept(cascade: &Cascade) -> f64 {
    let m = cascade.metrics().await;
    metric_sum(
        &m,
        "cascade_upstream_connections_total",
        &[("event", "kept")],
    )
    .unwrap_or(0.0)
}

/// Wait (bounded) until cascade's pool has kept `n` connections: a 404 body that arrives in
/// a later read is finished in the background.
async fn wait_kept(cascade: &Cascade, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while kept(cascade).await < n {
        assert!(Instant::now() < deadline, "the pool kept fewer than {n}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `n` fallback reads of `/obj` (the fallback's `from-fallback`); with cascade's pool
/// (`pool`), each waited for until main's connection is kept.
async fn kept_fallback_reads(cascade: &Cascade, pool: &str, n: u32) {
    for i in 0..n {
        fallback_gets(cascade, "/obj", "from-fallback", 1).await;
        if pool == "cascade" {
            wait_kept(cascade, f64::from(i + 1)).await;
        }
    }
}

#[tokio::test]
async fn a_replayed_404_keeps_mains_connection() {
    for (pool, expected_conns) in [("cascade", 1), ("pingora", 20)] {
        let main = HttpOrigin::start();
        let fb = HttpOrigin::start();
        main.set_default(Reply::new(404, "no such key, try elsewhere"));
        fb.route("/b/obj", Reply::new(200, "from-fallback"));
        let cascade = Cascade::builder(&main_and_fallback(&main.url("/b"), &fb.url("/b")))
            .server("upstream_pool", pool)
            .start();
        kept_fallback_reads(&cascade, pool, 20).await;
        assert_eq!(main.stats.count("GET"), 20, "{pool}");
        // cascade's pool: one connection to main for all 20; Pingora's: one per request.
        assert_eq!(main.connections(), expected_conns, "upstream_pool: {pool}");
        assert_eq!(fb.connections(), 1, "{pool}");
        let m = cascade.metrics().await;
        let kept = metric_sum(
            &m,
            "cascade_upstream_connections_total",
            &[("event", "kept")],
        );
        if pool == "cascade" {
            assert_eq!(kept, Some(20.0));
        } else {
            assert_eq!(kept.unwrap_or(0.0), 0.0);
        }
    }
}

#[tokio::test]
async fn a_404_left_half_read_is_finished_then_kept() {
    // Content-Length, the body's second half 50 ms later: Pingora has dropped the connection
    // by then; the pool reads the rest and keeps it.
    let main = HttpOrigin::start();
    let fb = HttpOrigin::start();
    main.set_default(Reply::new(404, "x".repeat(2000)).trickle(Duration::from_millis(50)));
    fb.route("/b/obj", Reply::new(200, "from-fallback"));
    let cascade = Cascade::start(&main_and_fallback(&main.url("/b"), &fb.url("/b")));
    for i in 0..3 {
        fallback_gets(&cascade, "/obj", "from-fallback", 1).await;
        wait_kept(&cascade, f64::from(i + 1)).await;
    }
    assert_eq!(main.connections(), 1);

    // Chunked, its last chunk and a trailer arriving in later reads.
    let chunked = RawOrigin::start(|_| {
        vec![
            RawPart::Bytes(
                b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nno".to_vec(),
            ),
            RawPart::Pause(Duration::from_millis(30)),
            RawPart::Bytes(b"pe\r\n0\r\nX-Trailer: 1\r\n".to_vec()),
            RawPart::Pause(Duration::from_millis(30)),
            RawPart::Bytes(b"\r\n".to_vec()),
        ]
    });
    let cascade = Cascade::start(&main_and_fallback(&chunked.url("/b"), &fb.url("/b")));
    for i in 0..3 {
        fallback_gets(&cascade, "/obj", "from-fallback", 1).await;
        wait_kept(&cascade, f64::from(i + 1)).await;
    }
    assert_eq!(chunked.heads().len(), 3);
    assert_eq!(chunked.connections(), 1);
}

#[tokio::test]
async fn a_404_read_ahead_past_pingoras_first_read_is_ended_and_kept() {
    // A 404 of 6000 bytes in one write: cascade's pool reads it whole, hands Pingora 4 KiB
    // (its first read) and the rest from what it read ahead; the answer ends, the connection
    // is kept (it fails when read-ahead bytes are lost).
    let mut answer = b"HTTP/1.1 404 Not Found\r\nContent-Length: 6000\r\n\r\n".to_vec();
    answer.resize(answer.len() + 6000, b'x');
    let main = raw_main(vec![RawPart::Bytes(answer)]);
    let fb = HttpOrigin::start();
    fb.route("/b/missing", Reply::new(200, "from-fallback"));
    let cascade = Cascade::start(&main_and_fallback(&main.url("/b"), &fb.url("/b")));
    for i in 0..3 {
        fallback_gets(&cascade, "/missing", "from-fallback", 1).await;
        wait_kept(&cascade, f64::from(i + 1)).await;
    }
    let r = client().get(cascade.url("/real")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "real");
    assert_eq!(main.connections(), 1, "{:?}", main.heads());
}

/// A raw main origin: `/b/real` answers 200 `real`; anything else gets `missing`.
fn raw_main(missing: Vec<RawPart>) -> RawOrigin {
    RawOrigin::start(move |head| {
        if head.starts_with("GET /b/real ") {
            vec![RawPart::Bytes(
                b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nreal".to_vec(),
            )]
        } else {
            missing.clone()
        }
    })
}

/// After a replayed 404 from `main`, `/real` must get main's own answer to it.
async fn real_after_replay(main: &RawOrigin, pause: Duration) {
    let fb = HttpOrigin::start();
    fb.route("/b/missing", Reply::new(200, "from-fallback"));
    let cascade = Cascade::start(&main_and_fallback(&main.url("/b"), &fb.url("/b")));
    fallback_gets(&cascade, "/missing", "from-fallback", 1).await;
    tokio::time::sleep(pause).await;
    for _ in 0..2 {
        let r = client().get(cascade.url("/real")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-served-from"), "main");
        assert_eq!(r.text().await.unwrap(), "real");
    }
}

/// A second answer nobody asked for, sent after a 404.
const SMUGGLED: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON";

/// A 404 of exactly 4096 bytes (Pingora's first read of an answer) with [`SMUGGLED`] in the
/// same write: Pingora is handed exactly the 404 and the rest waits below it (read ahead by
/// cascade's pool, or inside openssl).
fn exact_404_then_smuggled() -> Vec<u8> {
    let head = |n: usize| format!("HTTP/1.1 404 Not Found\r\nContent-Length: {n:04}\r\n\r\n");
    let mut both = head(4096 - head(0).len()).into_bytes();
    both.resize(4096, b'x');
    both.extend_from_slice(SMUGGLED);
    both
}

#[tokio::test]
async fn bytes_after_a_404_never_answer_the_next_request() {
    let smuggled = SMUGGLED.to_vec();
    let clean_404 = b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno".to_vec();
    // A second answer in the same write as the 404: read with it, the connection is closed.
    let mut both = clean_404.clone();
    both.extend_from_slice(&smuggled);
    let main = raw_main(vec![RawPart::Bytes(both)]);
    real_after_replay(&main, Duration::from_millis(100)).await;
    assert_eq!(
        main.connections(),
        2,
        "the poisoned connection was not reused"
    );
    // The same past Pingora's first read: the second answer is read ahead, never handed on.
    let main = raw_main(vec![RawPart::Bytes(exact_404_then_smuggled())]);
    real_after_replay(&main, Duration::from_millis(100)).await;
    assert_eq!(
        main.connections(),
        2,
        "the poisoned connection was not reused"
    );

    // The second answer 100 ms later, while the connection idles in the pool.
    let main = raw_main(vec![
        RawPart::Bytes(clean_404.clone()),
        RawPart::Pause(Duration::from_millis(100)),
        RawPart::Bytes(smuggled),
    ]);
    real_after_replay(&main, Duration::from_millis(400)).await;
    assert_eq!(
        main.connections(),
        2,
        "the poisoned connection was not reused"
    );

    // A close with no `Connection: close`: the next request gets a new connection, no 502.
    let main = raw_main(vec![RawPart::Bytes(clean_404), RawPart::Close]);
    real_after_replay(&main, Duration::from_millis(100)).await;
    assert_eq!(main.connections(), 2);
}

#[tokio::test]
async fn a_404_whose_body_stalls_costs_its_connection_not_the_answer() {
    // 10 of 100 body bytes, then nothing for 3 s (past the pool's 1 s drain bound).
    let main = raw_main(vec![
        RawPart::Bytes(b"HTTP/1.1 404 Not Found\r\nContent-Length: 100\r\n\r\n0123456789".to_vec()),
        RawPart::Pause(Duration::from_secs(3)),
        RawPart::Bytes(vec![b'x'; 90]),
    ]);
    let fb = HttpOrigin::start();
    fb.route("/b/missing", Reply::new(200, "from-fallback"));
    let cascade = Cascade::start(&main_and_fallback(&main.url("/b"), &fb.url("/b")));
    let t0 = Instant::now();
    fallback_gets(&cascade, "/missing", "from-fallback", 1).await;
    // While the pool waits for the rest, and after it gave up (1 s): a new connection, once.
    for at in [0, 1500] {
        tokio::time::sleep(Duration::from_millis(at).saturating_sub(t0.elapsed())).await;
        let r = client().get(cascade.url("/real")).send().await.unwrap();
        assert_eq!(r.text().await.unwrap(), "real");
    }
    assert_eq!(main.connections(), 2, "{:?}", main.heads());
    // After the rest arrived (3 s): the stalled connection was closed at 1 s, not kept.
    tokio::time::sleep(Duration::from_millis(3500).saturating_sub(t0.elapsed())).await;
    let r = client().get(cascade.url("/real")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "real");
    let heads = main.heads();
    assert_eq!(heads.len(), 4);
    assert_eq!(
        heads[3].0, 1,
        "the last request went over the second connection: {heads:?}"
    );
}

#[tokio::test]
async fn a_kept_connection_the_origin_closed_is_retried_not_failed() {
    // Main closes its kept connection when the next request arrives on it (as an origin whose
    // idle timeout fires at that moment): that is a stale pooled connection, retried on the
    // same peer, not main failing (which would send the read on to the fallback).
    let n = std::sync::atomic::AtomicU64::new(0);
    let main =
        RawOrigin::start(
            move |head| match n.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
                0 => vec![RawPart::Bytes(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno".to_vec(),
                )],
                1 => vec![RawPart::Close],
                _ if head.starts_with("GET /b/real ") => vec![RawPart::Bytes(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nreal".to_vec(),
                )],
                _ => vec![RawPart::Bytes(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
                )],
            },
        );
    let fb = HttpOrigin::start();
    fb.route("/b/missing", Reply::new(200, "from-fallback"));
    let cascade = Cascade::start(&main_and_fallback(&main.url("/b"), &fb.url("/b")));
    fallback_gets(&cascade, "/missing", "from-fallback", 1).await;
    let r = client().get(cascade.url("/real")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-served-from"), "main");
    assert_eq!(r.text().await.unwrap(), "real");
    let heads = main.heads();
    assert_eq!(
        heads.iter().map(|(c, _)| *c).collect::<Vec<_>>(),
        [0, 0, 1],
        "{heads:?}"
    );
    assert_eq!(
        fb.stats.total(),
        1,
        "the read did not go on to the fallback"
    );
}

/// cascade with an https main (`main.test`, behind `front`, checked against a trust store
/// holding only `front`'s certificate) and a plain fallback at `fb_url`; `pool`:
/// `server.upstream_pool`. The directory holds the trust store and the hosts file.
fn tls_main(front: &TlsFront, fb_url: &str, pool: &str) -> (Cascade, tempfile::TempDir) {
    tls_main_trusting(front, &front.cert_pem, fb_url, pool)
}

/// [`tls_main`] with a trust store holding only `trust` (PEM).
fn tls_main_trusting(
    front: &TlsFront,
    trust: &[u8],
    fb_url: &str,
    pool: &str,
) -> (Cascade, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost\n127.0.0.1 main.test\n").unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, trust).unwrap();
    let main_url = front.url("main.test", "/b");
    let yaml = if fb_url.is_empty() {
        config(&[plain_origin("main", &main_url)], "{main: main}")
    } else {
        main_and_fallback(&main_url, fb_url)
    };
    let cascade = Cascade::builder(&yaml)
        .hosts_file(&hosts)
        .env("SSL_CERT_FILE", &ca.to_string_lossy())
        .server("upstream_pool", pool)
        .start();
    (cascade, dir)
}

#[tokio::test]
async fn an_https_main_keeps_its_tls_session_through_replayed_404s() {
    // S3, R2 and GCS are https: a replayed 404 must not cost a TLS handshake to main.
    for (pool, expected) in [("cascade", 1), ("pingora", 20)] {
        let main = HttpOrigin::start();
        main.set_default(Reply::new(404, "no such key, try elsewhere"));
        main.route("/b/real", Reply::new(200, "real"));
        let front = TlsFront::start(main.addr, "main.test");
        let fb = HttpOrigin::start();
        fb.route("/b/obj", Reply::new(200, "from-fallback"));
        let (cascade, _dir) = tls_main(&front, &fb.url("/b"), pool);
        kept_fallback_reads(&cascade, pool, 20).await;
        assert_eq!(main.stats.count("GET"), 20, "{pool}");
        assert_eq!(front.handshakes(), expected, "upstream_pool: {pool}");
        // Main's own answers still come over the same session.
        let r = client().get(cascade.url("/real")).send().await.unwrap();
        assert_eq!(header(&r, "x-served-from"), "main");
        assert_eq!(r.text().await.unwrap(), "real");
        if pool == "cascade" {
            assert_eq!(front.handshakes(), 1);
        }
    }
}

/// One client keep-alive connection, raw: requests in turn, each one's final answer.
struct RawConn {
    s: std::net::TcpStream,
    buf: Vec<u8>,
}

impl RawConn {
    fn open(addr: std::net::SocketAddr) -> RawConn {
        let s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        RawConn { s, buf: Vec::new() }
    }

    /// Writes `request` whole; the first final (non-`1xx`) answer to it.
    fn send(&mut self, request: &[u8]) -> RawResponse {
        use std::io::{Read, Write};
        self.s.write_all(request).unwrap();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end + 4]).to_string();
                let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
                if (100..200).contains(&status) {
                    self.buf.drain(..end + 4);
                    continue;
                }
                let len = content_length(&head).unwrap_or(0);
                while self.buf.len() < end + 4 + len {
                    let n = self.s.read(&mut chunk).unwrap();
                    assert!(n > 0, "closed mid-answer: {head}");
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                let body = self.buf[end + 4..end + 4 + len].to_vec();
                self.buf.drain(..end + 4 + len);
                return RawResponse { status, head, body };
            }
            let n = self.s.read(&mut chunk).unwrap();
            assert!(
                n > 0,
                "closed before an answer: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

#[tokio::test]
async fn uploads_keep_their_connection_whatever_their_body_framing() {
    // Content-Length bodies, chunked bodies (length unknown, with a trailer) and
    // `Expect: 100-continue`: each upload's connection carries the next, with either pool.
    // One client connection, so each upload starts after the last one's connection is back.
    for pool in ["cascade", "pingora"] {
        let main = HttpOrigin::start();
        main.route_method("PUT", "/b/up", Reply::new(200, ""));
        let yaml = config(&[plain_origin("main", &main.url("/b"))], "{main: main}");
        let cascade = Cascade::builder(&yaml)
            .server("upstream_pool", pool)
            .start();
        let mut c = RawConn::open(cascade.addr);
        let mut sent = 0u64;
        for i in 0..8u8 {
            let body = vec![i; 100 << 10];
            let mut req = format!(
                "PUT /up HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            req.extend_from_slice(&body);
            sent += body.len() as u64;
            let r = c.send(&req);
            assert_eq!(r.status, 200, "{pool}: length {i}: {}", r.head);
        }
        for i in 0..4 {
            let mut req =
                b"PUT /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            for part in [70_000usize, 5, 30_000] {
                req.extend_from_slice(format!("{part:x};ext=1\r\n").as_bytes());
                req.extend_from_slice(&vec![b'c'; part]);
                req.extend_from_slice(b"\r\n");
                sent += part as u64;
            }
            req.extend_from_slice(b"0\r\nX-Trailer: 1\r\n\r\n");
            let r = c.send(&req);
            assert_eq!(r.status, 200, "{pool}: chunked {i}: {}", r.head);
        }
        for i in 0..3 {
            let body = vec![b'e'; 4096];
            let mut req = format!(
                "PUT /up HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            req.extend_from_slice(&body);
            sent += body.len() as u64;
            let r = c.send(&req);
            assert_eq!(r.status, 200, "{pool}: expect {i}: {}", r.head);
        }
        assert_eq!(main.stats.count("PUT"), 15, "{pool}");
        assert_eq!(main.stats.request_bytes(), sent, "{pool}");
        assert_eq!(main.connections(), 1, "upstream_pool: {pool}");
        if pool == "cascade" {
            let m = cascade.metrics().await;
            let reused = metric_sum(
                &m,
                "cascade_upstream_connections_total",
                &[("event", "reused")],
            );
            assert_eq!(reused, Some(14.0));
        }
    }
}

#[tokio::test]
async fn an_upload_refused_never_lends_its_connection_to_the_next() {
    // S3 refuses a part of an unknown upload (or a denied PUT) with an answer before it reads
    // the body, then closes the connection, with no `Connection: close`: the close comes
    // after the answer, when the next upload may already be on the connection, and a body
    // over Pingora's retry buffer cannot be replayed. Here the close comes 300 ms after the
    // answer; "early" answers before reading the body, "late" after reading it.
    let origin = RawOrigin::start(|head| {
        let len = content_length(head).unwrap_or(0);
        let refusal = |code: &str| {
            format!("HTTP/1.1 {code} Refused\r\nContent-Length: 7\r\n\r\nrefused").into_bytes()
        };
        if head.contains("/early") {
            vec![
                RawPart::Bytes(refusal("404")),
                RawPart::Pause(Duration::from_millis(300)),
                RawPart::Close,
            ]
        } else if head.contains("/late") {
            vec![
                RawPart::Drain(len),
                RawPart::Bytes(refusal("403")),
                RawPart::Pause(Duration::from_millis(300)),
                RawPart::Close,
            ]
        } else {
            vec![
                RawPart::Drain(len),
                RawPart::Bytes(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec()),
            ]
        }
    });
    let yaml = config(&[plain_origin("main", &origin.url(""))], "{main: main}");
    let cascade = Cascade::start(&yaml);
    let c = client();
    for refused in ["/early", "/late"] {
        for i in 0..3 {
            // The refused upload's body fits the kernel's buffers: from cascade's side it
            // is all sent before (early) or after (late) the answer.
            let r = c
                .put(cascade.url(refused))
                .body(vec![b'r'; 32 << 10])
                .send()
                .await
                .unwrap();
            assert!(
                r.status().is_client_error(),
                "{refused} {i}: {}",
                r.status()
            );
            // At once: the next upload (256 KiB, past what Pingora can replay) must get a
            // connection of its own.
            let r = c
                .put(cascade.url("/ok"))
                .body(vec![b'o'; 256 << 10])
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "the upload after {refused} {i}");
            assert_eq!(r.text().await.unwrap(), "ok");
        }
    }
    // No request followed a refusal on its connection; the good uploads' are kept (a
    // refused upload may take one).
    let heads = origin.heads();
    for (i, (conn, head)) in heads.iter().enumerate() {
        if head.contains("/early") || head.contains("/late") {
            assert!(
                heads[i + 1..].iter().all(|(c, _)| c != conn),
                "connection {conn} carried a request after a refusal: {heads:?}"
            );
        }
    }
    assert_eq!(heads.len(), 12);
    assert!(origin.connections() <= 7, "{}", origin.connections());
}

#[tokio::test]
async fn an_https_origin_whose_certificate_is_wrong_is_refused() {
    // The kept sessions are set up by Pingora's connector with the origin's checks: a
    // certificate for another name, or one nobody trusts, never gets a request, with either
    // pool, and counts as a TLS failure.
    let stranger = TlsFront::start(HttpOrigin::start().addr, "main.test");
    for pool in ["cascade", "pingora"] {
        for (what, name, trust_stranger) in [
            ("another host's", "other.test", false),
            ("an untrusted", "main.test", true),
        ] {
            let main = HttpOrigin::start();
            main.set_default(Reply::new(200, "must not be served"));
            let front = TlsFront::start(main.addr, name);
            let trust = if trust_stranger {
                &stranger.cert_pem
            } else {
                &front.cert_pem
            };
            let (cascade, _dir) = tls_main_trusting(&front, trust, "", pool);
            let r = client().get(cascade.url("/obj")).send().await.unwrap();
            let ctx = format!("{what} certificate, upstream_pool: {pool}");
            assert_eq!(r.status(), 502, "{ctx}");
            assert_ne!(r.text().await.unwrap(), "must not be served", "{ctx}");
            assert_eq!(main.stats.total(), 0, "{ctx}");
            assert_eq!(front.handshakes(), 0, "{ctx}");
            let m = cascade.metrics().await;
            let tls = metric_sum(&m, "cascade_upstream_errors_total", &[("kind", "tls")]);
            assert!(tls.unwrap_or(0.0) >= 1.0, "{ctx}: counted as a TLS failure");
        }
    }
}

#[tokio::test]
async fn bytes_after_a_404_over_tls_never_answer_the_next_request() {
    let smuggled = SMUGGLED.to_vec();
    // In the same TLS record as a 4096-byte 404: Pingora reads exactly the 404 and the rest
    // waits inside openssl, where no `recv(MSG_PEEK)` sees it.
    let both = exact_404_then_smuggled();
    let clean_404 = b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno".to_vec();
    for (what, missing) in [
        ("same record", vec![RawPart::Bytes(both)]),
        (
            "a record 100 ms later",
            vec![
                RawPart::Bytes(clean_404.clone()),
                RawPart::Pause(Duration::from_millis(100)),
                RawPart::Bytes(smuggled.clone()),
            ],
        ),
        (
            "close_notify",
            vec![RawPart::Bytes(clean_404), RawPart::Close],
        ),
    ] {
        let main = raw_main(missing);
        let front = TlsFront::start(main.addr, "main.test");
        let fb = HttpOrigin::start();
        fb.route("/b/missing", Reply::new(200, "from-fallback"));
        let (cascade, _dir) = tls_main(&front, &fb.url("/b"), "cascade");
        fallback_gets(&cascade, "/missing", "from-fallback", 1).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        for _ in 0..2 {
            let r = client().get(cascade.url("/real")).send().await.unwrap();
            assert_eq!(r.status(), 200, "{what}");
            assert_eq!(header(&r, "x-served-from"), "main", "{what}");
            assert_eq!(r.text().await.unwrap(), "real", "{what}");
        }
        assert_eq!(front.handshakes(), 2, "{what}: the session was not reused");
    }
}

#[tokio::test]
async fn concurrent_reads_over_kept_connections_get_their_own_answers() {
    // Main holds m0..m19 and answers 404 (its body in two parts, 5 ms apart: some are finished
    // by the pool in the background) for f0..f19, which only the fallback holds. 8 clients
    // read a mix at once; every answer must be the one for its own key.
    let main = HttpOrigin::start();
    let fb = HttpOrigin::start();
    main.set_default(Reply::new(404, "x".repeat(300)).trickle(Duration::from_millis(5)));
    for i in 0..20 {
        main.route(&format!("/b/m{i}"), Reply::new(200, format!("main-{i}")));
        fb.route(
            &format!("/b/f{i}"),
            Reply::new(200, format!("fallback-{i}")),
        );
    }
    let cascade = Cascade::start(&main_and_fallback(&main.url("/b"), &fb.url("/b")));
    let mut tasks = Vec::new();
    for t in 0..8u32 {
        let base = cascade.url("");
        tasks.push(tokio::spawn(async move {
            let c = client();
            for n in 0..40u32 {
                let i = (t * 7 + n * 3) % 20;
                let (path, want) = if (t + n) % 3 == 0 {
                    (format!("m{i}"), format!("main-{i}"))
                } else {
                    (format!("f{i}"), format!("fallback-{i}"))
                };
                let r = c.get(format!("{base}/{path}")).send().await.unwrap();
                assert_eq!(r.status(), 200, "/{path}");
                assert_eq!(r.text().await.unwrap(), want, "/{path}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // The connections were kept and reused, not one per fallback read.
    let m = cascade.metrics().await;
    let reused = metric_sum(
        &m,
        "cascade_upstream_connections_total",
        &[("event", "reused")],
    );
    assert!(reused.unwrap_or(0.0) > 100.0, "{reused:?}");
    assert!(
        main.connections() < 100,
        "{} connections to main",
        main.connections()
    );
}
