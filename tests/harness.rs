//! Sanity tests of the test harness itself (no cascade involved).

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test]
async fn s3_signed_server_rejects_unsigned_requests() {
    let s3 = S3Server::signed();
    s3.put_file("bucket", "a.txt", "secret");
    let c = client();
    let r = c
        .get(format!("{}/a.txt", s3.bucket_url("bucket")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body = r.text().await.unwrap();
    assert!(body.contains("AccessDenied"), "{body}");
    assert!(!body.contains("secret"));
    let r = c
        .put(format!("{}/b.txt", s3.bucket_url("bucket")))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(s3.read_file("bucket", "b.txt").is_none());
    assert_eq!(s3.stats.count("GET"), 1);
    assert_eq!(s3.stats.count("PUT"), 1);
    assert_eq!(s3.stats.writes(), 1);
}

#[tokio::test]
async fn s3_signed_server_rejects_a_forged_signature() {
    let s3 = S3Server::signed();
    s3.put_file("bucket", "a.txt", "secret");
    let r = client()
        .get(format!("{}/a.txt", s3.bucket_url("bucket")))
        .header(
            "authorization",
            format!(
                "AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/20250101/us-east-1/s3/aws4_request, \
                 SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature={}",
                "0".repeat(64)
            ),
        )
        .header("x-amz-date", "20250101T000000Z")
        .header("x-amz-content-sha256", "UNSIGNED-PAYLOAD")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}

#[tokio::test]
async fn s3_anonymous_server_serves_fixtures() {
    let s3 = S3Server::anonymous();
    s3.put_file("bucket", "dir/a.txt", "0123456789");
    let c = client();
    let url = format!("{}/dir/a.txt", s3.bucket_url("bucket"));

    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "0123456789");
    assert!(eventually(Duration::from_secs(2), || s3.stats.response_bytes() >= 10).await);

    let r = c
        .get(&url)
        .header("range", "bytes=2-5")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(header(&r, "content-range"), "bytes 2-5/10");
    assert_eq!(r.text().await.unwrap(), "2345");

    let r = c.head(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-length"), "10");

    let r = c
        .get(format!("{}/missing", s3.bucket_url("bucket")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    let r = c
        .put(format!("{}/new.txt", s3.bucket_url("bucket")))
        .body("fresh")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    assert_eq!(s3.read_file("bucket", "new.txt").unwrap(), b"fresh");

    let m = s3.stats.by_method();
    assert_eq!(m.get("GET"), Some(&3));
    assert_eq!(m.get("HEAD"), Some(&1));
    assert_eq!(m.get("PUT"), Some(&1));
    assert_eq!(s3.stats.writes(), 1);
    s3.stats.reset();
    assert_eq!(s3.stats.total(), 0);
}

#[tokio::test]
async fn http_origin_scripts_records_and_slows_down() {
    let o = HttpOrigin::start();
    o.route("/p/x", Reply::new(200, "hello").header("x-test", "1"));
    o.route_method("PUT", "/p/x", Reply::new(201, ""));
    let c = client();

    let r = c
        .get(o.url("/p/x?q=1"))
        .header("authorization", "Bearer abc")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-test"), "1");
    assert_eq!(r.text().await.unwrap(), "hello");
    let last = o.stats.last().unwrap();
    assert_eq!(last.method, "GET");
    assert_eq!(last.uri, "/p/x?q=1");
    assert_eq!(last.header("authorization"), "Bearer abc");
    assert_eq!(last.header("host"), o.authority());

    let r = c.put(o.url("/p/x")).body("12345").send().await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(o.stats.request_bytes(), 5);

    let r = c.get(o.url("/other")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(o.stats.total(), 3);
    assert_eq!(o.stats.writes(), 1);

    o.set_delay(Duration::from_millis(300));
    let t = Instant::now();
    let r = c.get(o.url("/p/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(t.elapsed() >= Duration::from_millis(300));

    let raw = raw_get(o.addr, "/p/../p/x");
    assert_eq!(raw.status, 404, "raw request must not be normalised");
    assert_eq!(o.stats.last().unwrap().uri, "/p/../p/x");
}

#[test]
fn pattern_checksum_matches_a_written_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    let total = 3 * (1 << 20) + 4096;
    let mut data = Vec::new();
    for chunk in futures::executor::block_on_stream(Box::pin(pattern_stream(total, 65536))) {
        data.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(data.len() as u64, total);
    std::fs::write(&p, &data).unwrap();
    assert_eq!(file_checksum(&p).unwrap(), pattern_checksum(total));
    let mut odd = Checksum::default();
    for piece in data.chunks(4093) {
        odd.update(piece);
    }
    assert_eq!(
        odd,
        pattern_checksum(total),
        "chunk boundaries must not matter"
    );
    data[12345] ^= 1;
    std::fs::write(&p, &data).unwrap();
    assert_ne!(file_checksum(&p).unwrap(), pattern_checksum(total));
}

#[test]
fn metric_parser_sums_matching_series() {
    let text = "# HELP x\n# TYPE cascade_requests_total counter\n\
                cascade_requests_total{group=\"media\",status=\"200\"} 3\n\
                cascade_requests_total{group=\"media\",status=\"404\"} 2\n\
                cascade_requests_total{group=\"other\",status=\"200\"} 7\n\
                cascade_x 1\n";
    assert_eq!(metric_sum(text, "cascade_requests_total", &[]), Some(12.0));
    assert_eq!(
        metric_sum(text, "cascade_requests_total", &[("group", "media")]),
        Some(5.0)
    );
    assert_eq!(metric_sum(text, "cascade_x", &[]), Some(1.0));
    assert_eq!(metric_sum(text, "cascade_y", &[]), None);
}

#[test]
fn rss_probe_reads_proc_status() {
    let pid = std::process::id();
    // RSS first: the high-water mark read after it can only be as large or larger.
    let rss = proc_status_kib(pid, "VmRSS").unwrap();
    let hwm = proc_status_kib(pid, "VmHWM").unwrap();
    assert!(hwm >= rss && rss > 0);
}

#[test]
fn free_ports_are_distinct() {
    let a = free_port();
    let b = free_port();
    assert_ne!(a, b);
}
