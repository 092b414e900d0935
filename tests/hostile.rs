//! The trust boundary, tried as a hostile client would: each attack of issue 12 through real
//! sockets (a SigV4-verifying s3s-fs bucket, plain HTTP origins, one that resolves paths as
//! nginx does, the shipped `auth` plugin), asserting the safe outcome and that the legitimate
//! request next to it still works.
//!
//! The classes whose attacks need their own machinery are tested beside it: bounded fills and
//! disk I/O off the workers in `tests/cache.rs` (`concurrent_large_misses_...`,
//! `a_write_during_a_slow_fill_...`, `a_write_while_the_origin_is_still_answering_...`) and
//! `cache::storage`/`cache::disk` unit tests; guest-driven allocations in `tests/plugins.rs`
//! (`guest_driven_allocations_are_bounded`, the `hog` plugin); local files in
//! `tests/proxy.rs` (`the_runtime_dir_is_private`) and `plugin::runtime` unit tests (the
//! precompiled cache). Property tests sit with the code (`boundary::path`, `admit`, `cache`,
//! `cache::slice`, `config::validate`, `plugin::abi`); `scripts/fuzz.sh` fuzzes the same.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

fn signed_origin(name: &str, url: &str, env: &str) -> String {
    format!(
        "  {name}: {{url: \"{url}\", s3: {{region: us-east-1, access_key_env: {env}_AK, \
         secret_key_env: {env}_SK}}}}\n"
    )
}

/// A signed bucket `data` behind cascade; `routes` is the YAML of the `routes:` list,
/// `extra` more top-level YAML (cache, plugins).
fn signed_bucket(routes: &str, extra: &str) -> (S3Server, Cascade) {
    let s3 = S3Server::signed();
    s3.create_bucket("data");
    let yaml = format!(
        "origins:\n{}groups:\n  data: {{main: data}}\n{extra}routes:\n{routes}",
        signed_origin("data", &s3.bucket_url("data"), "DATA")
    );
    let c = Cascade::builder(&yaml)
        .test_credentials("DATA_AK", "DATA_SK")
        .start();
    (s3, c)
}

fn requests_to(stats: &Stats, method: &str, path_part: &str) -> usize {
    stats
        .requests()
        .iter()
        .filter(|r| r.method == method && r.uri.contains(path_part))
        .count()
}

// ---------------------------------------------------------------------------------------------
// Our credentials sign only what we chose to send
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn copy_source_cannot_read_another_tenants_object() {
    let (s3, c) = signed_bucket("  - {name: acme, path: /acme, group: data}\n", "");
    s3.put_file("data", "globex/secret.txt", "globex's secret");
    let http = client();
    // The attack: an empty PUT whose x-amz-copy-source names another tenant's key.
    let r = http
        .put(c.url("/acme/stolen.txt"))
        .header("x-amz-copy-source", "data/globex/secret.txt")
        .body("")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("<Code>AccessDenied</Code>"));
    assert_eq!(requests_to(&s3.stats, "PUT", "stolen"), 0, "never signed");
    assert!(s3.read_file("data", "acme/stolen.txt").is_none());
    let r = http.get(c.url("/acme/stolen.txt")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // The legitimate upload next to it works.
    let r = http
        .put(c.url("/acme/ok.txt"))
        .body("acme's own")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let r = http.get(c.url("/acme/ok.txt")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "acme's own");
    // Outside the route there is nothing to reach.
    let r = http.get(c.url("/globex/secret.txt")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(!r.text().await.unwrap().contains("globex's secret"));
}

#[tokio::test]
async fn s3_control_headers_are_dropped_before_signing() {
    let (s3, c) = signed_bucket("  - {name: acme, path: /acme, group: data}\n", "");
    let r = client()
        .put(c.url("/acme/a.txt"))
        .header("x-amz-acl", "public-read-write")
        .header("x-amz-grant-full-control", "id=attacker")
        .header("x-amz-object-lock-mode", "COMPLIANCE")
        .header(
            "x-amz-object-lock-retain-until-date",
            "2099-01-01T00:00:00Z",
        )
        .header("x-amz-website-redirect-location", "https://evil.example/")
        .header("x-amz-tagging", "owner=attacker")
        .header("x-amz-meta-owner", "acme")
        .header("cookie", "session=abc")
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .unwrap();
    // SigV4 verified by s3s: what was forwarded was signed and intact.
    assert!(r.status().is_success(), "{}", r.status());
    let seen = s3.stats.last().unwrap();
    for gone in [
        "x-amz-acl",
        "x-amz-grant-full-control",
        "x-amz-object-lock-mode",
        "x-amz-object-lock-retain-until-date",
        "x-amz-website-redirect-location",
        "x-amz-tagging",
        "cookie",
    ] {
        assert!(
            !seen.headers.contains_key(gone),
            "{gone} reached the bucket"
        );
    }
    assert_eq!(seen.header("x-amz-meta-owner"), "acme");
    assert_eq!(seen.header("content-type"), "text/plain");
    assert!(seen.header("authorization").contains("x-amz-meta-owner"));
    assert_eq!(
        s3.read_file("data", "acme/a.txt").as_deref(),
        Some(&b"hello"[..])
    );
}

#[tokio::test]
async fn s3_subresources_listings_and_the_bucket_are_refused() {
    let (s3, c) = signed_bucket(
        "  - {name: acme, path: /acme, group: data}\n  - {name: root, path: /, group: data}\n",
        "",
    );
    s3.put_file("data", "acme/a.txt", "a");
    s3.put_file("data", "globex/b.txt", "b");
    let before = s3.stats.total();
    for (method, target) in [
        ("GET", "/?list-type=2"),
        ("GET", "/"),
        ("PUT", "/"),
        ("DELETE", "/"),
        ("POST", "/?delete"),
        ("POST", "/acme/?delete"),
        ("GET", "/acme?list-type=2&prefix=globex/"),
        ("GET", "/acme/a.txt?acl"),
        ("PUT", "/acme/a.txt?acl"),
        ("GET", "/acme/a.txt?tagging"),
        ("DELETE", "/acme/a.txt?versionId=1"),
        ("GET", "/acme/a.txt?version%49d=1"),
        ("GET", "/acme/a.txt?versions"),
        ("PUT", "/acme/a.txt?retention"),
        ("PUT", "/acme/a.txt?legal-hold"),
        ("GET", "/acme/a.txt?uploads"),
        ("POST", "/acme/a.txt?restore"),
    ] {
        let req = format!(
            "{method} {target} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            c.addr
        );
        let r = raw_request(c.addr, req.as_bytes(), Duration::from_secs(10));
        assert_eq!(r.status, 403, "{method} {target}: {}", r.text());
        assert!(r.head.to_ascii_lowercase().contains("application/xml"));
        assert!(r.text().contains("AccessDenied"), "{method} {target}");
    }
    assert_eq!(s3.stats.total(), before, "nothing was signed");
    assert!(s3.read_file("data", "acme/a.txt").is_some());
    assert!(s3.root().join("data").is_dir());
    // Cache busters and leftovers are dropped, not signed; the object is served.
    let r = client()
        .get(c.url("/acme/a.txt?v=2&x-id=GetObject&X-Amz-Signature=abc"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(s3.stats.last().unwrap().uri, "/data/acme/a.txt");
}

#[tokio::test]
async fn a_route_can_allow_listing_explicitly() {
    let (s3, c) = signed_bucket(
        "  - {name: root, path: /, group: data, s3_allow: [list, versionId]}\n",
        "",
    );
    s3.put_file("data", "a.txt", "a");
    let r = client().get(c.url("/?list-type=2")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("<Key>a.txt</Key>"));
    // Allowed on a bucket, not a listing parameter on an object.
    let r = client().get(c.url("/a.txt?prefix=x")).send().await.unwrap();
    assert_eq!(r.status(), 403);
    // Writes to the bucket itself stay refused.
    let r = client().put(c.url("/")).body("").send().await.unwrap();
    assert_eq!(r.status(), 403);
}

#[tokio::test]
async fn chunk_signed_payloads_are_refused_with_a_clear_error() {
    let (s3, c) = signed_bucket("  - {path: /, group: data}\n", "");
    let r = client()
        .put(c.url("/k.txt"))
        .header("x-amz-content-sha256", "STREAMING-AWS4-HMAC-SHA256-PAYLOAD")
        .header("content-encoding", "aws-chunked")
        .body("5;chunk-signature=00\r\nhello\r\n0;chunk-signature=00\r\n\r\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("re-signed"));
    assert!(s3.read_file("data", "k.txt").is_none());
}

/// boto3's own flows (checksums, multipart) work; its hostile calls are refused with errors
/// boto3 understands.
#[tokio::test]
async fn boto3_flows_work_and_hostile_calls_are_denied() {
    let (s3, c) = signed_bucket(
        "  - {name: media, path: /media, strip_prefix: true, group: data}\n",
        "",
    );
    s3.put_file("data", "other-tenant/secret.txt", "no");
    let script = format!(
        r#"
import io, json, boto3
from botocore.config import Config
from botocore.exceptions import ClientError
s3 = boto3.client("s3", endpoint_url="{url}", aws_access_key_id="client",
    aws_secret_access_key="client-secret", region_name="us-east-1",
    config=Config(s3={{"addressing_style": "path"}}, retries={{"max_attempts": 1}}))
out = {{}}
def code(f):
    try:
        f(); return "ok"
    except ClientError as e:
        return e.response["Error"]["Code"]
s3.put_object(Bucket="media", Key="small.txt", Body=b"hello", ChecksumAlgorithm="CRC32")
out["small"] = s3.get_object(Bucket="media", Key="small.txt")["Body"].read().decode()
big = bytes(range(256)) * (9 * 4096)
cfg = boto3.s3.transfer.TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
s3.upload_fileobj(io.BytesIO(big), "media", "big.bin", Config=cfg)
out["big_ok"] = s3.get_object(Bucket="media", Key="big.bin")["Body"].read() == big
out["head"] = s3.head_object(Bucket="media", Key="big.bin")["ContentLength"]
out["copy"] = code(lambda: s3.copy_object(Bucket="media", Key="stolen.txt",
    CopySource={{"Bucket": "media", "Key": "../other-tenant/secret.txt"}}))
out["acl"] = code(lambda: s3.put_object_acl(Bucket="media", Key="small.txt", ACL="public-read"))
out["list"] = code(lambda: s3.list_objects_v2(Bucket="media"))
out["batch_delete"] = code(lambda: s3.delete_objects(Bucket="media",
    Delete={{"Objects": [{{"Key": "small.txt"}}]}}))
out["delete"] = code(lambda: s3.delete_object(Bucket="media", Key="small.txt"))
print(json.dumps(out))
"#,
        url = c.url("")
    );
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .output()
            .expect("python3")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "boto3 script failed (is boto3 installed? scripts/deps.sh installs it):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["small"], "hello");
    assert_eq!(
        v["big_ok"], true,
        "multipart upload with checksums round-trips"
    );
    assert_eq!(v["head"], 9 * 4096 * 256);
    for denied in ["copy", "acl", "list", "batch_delete"] {
        assert_eq!(v[denied], "AccessDenied", "{denied}: {v}");
    }
    assert_eq!(v["delete"], "ok");
    assert!(s3.read_file("data", "small.txt").is_none(), "deleted");
    assert!(s3.read_file("data", "stolen.txt").is_none());
    assert_eq!(
        s3.read_file("data", "other-tenant/secret.txt").as_deref(),
        Some(&b"no"[..])
    );
}

// ---------------------------------------------------------------------------------------------
// The cache key covers what changed the answer
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn override_queries_never_poison_the_cached_object() {
    let (s3, c) = signed_bucket(
        "  - {name: main, path: /, group: data}\n  - {name: ov, path: /ov, strip_prefix: true, group: data, s3_allow: [response-content-type]}\n",
        "cache: {memory: 16MiB}\n",
    );
    let http = client();
    let r = http
        .put(c.url("/img/a.jpg"))
        .header("content-type", "image/jpeg")
        .body("jpeg bytes")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    // Refused where the route does not allow it.
    let r = http
        .get(c.url("/img/a.jpg?response-content-type=text/html"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // Allowed: served as asked (signed, s3s verifies), never stored.
    let r = http
        .get(c.url("/ov/img/a.jpg?response-content-type=text/html"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), "text/html");
    assert_eq!(header(&r, "x-cache"), "BYPASS");
    assert_eq!(
        s3.stats.last().unwrap().uri,
        "/data/img/a.jpg?response-content-type=text/html"
    );
    // Everyone else gets the object's own type, from the cache on the second request.
    let mut types = Vec::new();
    for _ in 0..2 {
        let r = http.get(c.url("/img/a.jpg")).send().await.unwrap();
        types.push((header(&r, "content-type"), header(&r, "x-cache")));
    }
    assert_eq!(types[0].0, "image/jpeg");
    assert_eq!(types[1], ("image/jpeg".to_string(), "HIT".to_string()));
}

#[tokio::test]
async fn the_query_is_part_of_the_key_unless_the_route_says_otherwise() {
    let origin = HttpOrigin::start();
    origin.route_fn("/q.jpg", |_, target, _| {
        Reply::new(200, format!("asked {target}")).header("cache-control", "max-age=60")
    });
    let yaml = format!(
        "origins:\n  web: {{url: \"{}\"}}\ngroups:\n  g: {{main: web}}\ncache: {{memory: 16MiB}}\n\
         routes:\n  - {{path: /, group: g}}\n\
         \x20 - {{path: /ig, strip_prefix: true, group: g, cache: {{query: ignore}}}}\n\
         \x20 - {{path: /by, strip_prefix: true, group: g, cache: {{query: bypass}}}}\n",
        origin.url("")
    );
    let c = Cascade::start(&yaml);
    let get = |p: &str| {
        let u = c.url(p);
        async move {
            let r = client().get(u).send().await.unwrap();
            let xc = header(&r, "x-cache");
            (r.text().await.unwrap(), xc)
        }
    };
    assert_eq!(
        get("/q.jpg?v=1").await,
        ("asked /q.jpg?v=1".into(), "MISS".into())
    );
    assert_eq!(
        get("/q.jpg?v=2").await,
        ("asked /q.jpg?v=2".into(), "MISS".into())
    );
    assert_eq!(
        get("/q.jpg?v=1").await,
        ("asked /q.jpg?v=1".into(), "HIT".into())
    );
    assert_eq!(get("/q.jpg").await, ("asked /q.jpg".into(), "MISS".into()));
    // ignore: the query does not go upstream, so what is stored and served is exactly the
    // query-less answer (the entry `/q.jpg` filled just above).
    assert_eq!(
        get("/ig/q.jpg?v=1").await,
        ("asked /q.jpg".into(), "HIT".into())
    );
    assert_eq!(
        get("/ig/q.jpg?v=2").await,
        ("asked /q.jpg".into(), "HIT".into())
    );
    assert_eq!(requests_to(&origin.stats, "GET", "/q.jpg"), 3);
    // bypass: a query means no caching.
    assert_eq!(get("/by/q.jpg?v=9").await.1, "BYPASS");
    assert_eq!(get("/by/q.jpg?v=9").await.1, "BYPASS");
    assert_eq!(requests_to(&origin.stats, "GET", "v=9"), 2);
}

#[tokio::test]
async fn a_nul_in_the_path_cannot_forge_a_slice_key() {
    let origin = HttpOrigin::start();
    let body: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
    let body = bytes::Bytes::from(body);
    origin.route_fn("/v.mp4", move |_, _, h| range_reply(&body, h, "\"v1\""));
    let yaml = format!(
        "origins:\n  web: {{url: \"{}\"}}\ngroups:\n  g: {{main: web}}\n\
         cache: {{memory: 64MiB, slice_size: 1MiB, negative_ttl: 60s}}\nroutes:\n  - {{path: /, group: g}}\n",
        origin.url("")
    );
    let c = Cascade::start(&yaml);
    for forged in ["/v.mp4%00slice:1048576:0", "/v.mp4%00", "/v.mp4\0x"] {
        let r = raw_get(c.addr, forged);
        assert_eq!(r.status, 400, "{forged}");
    }
    assert_eq!(origin.stats.total(), 0);
    let r = client()
        .get(c.url("/v.mp4"))
        .header("range", "bytes=0-9")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.bytes().await.unwrap().as_ref(),
        &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    );
}

/// An origin's answer to a (possibly ranged) GET of `body`.
fn range_reply(body: &bytes::Bytes, h: &http::HeaderMap, etag: &str) -> Reply {
    let total = body.len();
    let range = h
        .get("range")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split_once('-'))
        .map(|(a, b)| {
            let a: usize = a.parse().unwrap_or(usize::MAX);
            let b: usize = b.parse().unwrap_or(total - 1).min(total - 1);
            (a, b)
        });
    match range {
        Some((a, b)) if a > b => {
            Reply::new(416, "").header("content-range", &format!("bytes */{total}"))
        }
        Some((a, b)) => Reply::new(206, body.slice(a..=b))
            .header("content-range", &format!("bytes {a}-{b}/{total}"))
            .header("etag", etag),
        None => Reply::new(200, body.clone()).header("etag", etag),
    }
}

#[tokio::test]
async fn set_cookie_answers_are_not_replayed_to_others() {
    let origin = HttpOrigin::start();
    origin.route(
        "/me.jpg",
        Reply::new(200, "alice's avatar").header("set-cookie", "session=alice"),
    );
    let yaml = format!(
        "origins:\n  web: {{url: \"{}\"}}\ngroups:\n  g: {{main: web}}\ncache: {{memory: 16MiB}}\n\
         routes:\n  - {{path: /, group: g}}\n\
         \x20 - {{path: /strip, strip_prefix: true, group: g, cache: {{set_cookie: strip}}}}\n",
        origin.url("")
    );
    let c = Cascade::start(&yaml);
    for _ in 0..2 {
        let r = client().get(c.url("/me.jpg")).send().await.unwrap();
        assert_eq!(header(&r, "x-cache"), "MISS", "never stored");
    }
    assert_eq!(origin.stats.total(), 2);
    // strip: stored without the cookie; its own client still got it.
    let r = client().get(c.url("/strip/me.jpg")).send().await.unwrap();
    assert_eq!(header(&r, "set-cookie"), "session=alice");
    let r = client().get(c.url("/strip/me.jpg")).send().await.unwrap();
    assert_eq!(header(&r, "x-cache"), "HIT");
    assert_eq!(
        header(&r, "set-cookie"),
        "",
        "the next client gets no one's cookie"
    );
}

#[tokio::test]
async fn vary_accept_encoding_is_honoured_and_normalised() {
    let origin = HttpOrigin::start();
    let vary = |_: &str, _: &str, h: &http::HeaderMap| {
        let ae = h
            .get("accept-encoding")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if ae.contains("gzip") {
            Reply::new(200, "GZIPPED")
                .header("content-encoding", "gzip")
                .header("vary", "Accept-Encoding")
        } else {
            Reply::new(200, "plain").header("vary", "Accept-Encoding")
        }
    };
    origin.route_fn("/v.txt", vary);
    // An origin that compresses but forgets to say Vary.
    origin.route_fn("/sneaky.txt", move |m, t, h| {
        let mut r = vary(m, t, h);
        r.headers.retain(|(k, _)| k != "vary");
        r
    });
    let yaml = format!(
        "origins:\n  web: {{url: \"{}\"}}\ngroups:\n  g: {{main: web}}\ncache: {{memory: 16MiB}}\n\
         routes:\n  - {{path: /, group: g}}\n",
        origin.url("")
    );
    let c = Cascade::start(&yaml);
    let get = |path: &'static str, ae: Option<&'static str>| {
        let u = c.url(path);
        async move {
            let mut rq = client().get(u);
            if let Some(ae) = ae {
                rq = rq.header("accept-encoding", ae);
            }
            let r = rq.send().await.unwrap();
            (header(&r, "x-cache"), r.text().await.unwrap())
        }
    };
    let v = "/v.txt";
    assert_eq!(
        get(v, Some("gzip")).await,
        ("MISS".into(), "GZIPPED".into())
    );
    assert_eq!(get(v, None).await, ("MISS".into(), "plain".into()));
    assert_eq!(
        get(v, Some("GZIP;q=1.0")).await,
        ("HIT".into(), "GZIPPED".into())
    );
    assert_eq!(
        get(v, Some("identity")).await,
        ("HIT".into(), "plain".into())
    );
    assert_eq!(
        get(v, Some("gzip;q=0")).await,
        ("HIT".into(), "plain".into())
    );
    // Without Vary the encoded answer still never reaches a client that did not ask for it.
    let s = "/sneaky.txt";
    assert_eq!(
        get(s, Some("gzip")).await,
        ("MISS".into(), "GZIPPED".into())
    );
    for ae in [None, Some("identity"), Some("gzip;q=0"), Some("br")] {
        assert_eq!(get(s, ae).await.1, "plain", "{ae:?}");
    }
    // The origin was asked with the normal values only.
    let seen: Vec<String> = origin
        .stats
        .requests()
        .iter()
        .map(|r| r.header("accept-encoding"))
        .collect();
    assert_eq!(seen[..4], ["gzip", "identity", "gzip", "identity"]);
    assert!(seen
        .iter()
        .all(|v| ["gzip", "identity", "br"].contains(&v.as_str())));
}

#[tokio::test]
async fn variants_per_object_are_capped() {
    let origin = HttpOrigin::start();
    origin.route_fn("/t.txt", |_, _, h| {
        let who = h
            .get("x-tenant")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        Reply::new(200, format!("for {who}")).header("vary", "X-Tenant")
    });
    let yaml = format!(
        "origins:\n  web: {{url: \"{}\"}}\ngroups:\n  g: {{main: web}}\n\
         cache: {{memory: 16MiB, max_variants: 3}}\nroutes:\n  - {{path: /, group: g}}\n",
        origin.url("")
    );
    let c = Cascade::start(&yaml);
    let get = |t: usize| {
        let u = c.url("/t.txt");
        async move {
            let r = client()
                .get(u)
                .header("x-tenant", t.to_string())
                .send()
                .await
                .unwrap();
            (header(&r, "x-cache"), r.text().await.unwrap())
        }
    };
    for t in 0..5 {
        assert_eq!(get(t).await, ("MISS".into(), format!("for {t}")));
    }
    for t in 0..3 {
        assert_eq!(
            get(t).await,
            ("HIT".into(), format!("for {t}")),
            "stored: {t}"
        );
    }
    for t in 3..5 {
        assert_eq!(
            get(t).await,
            ("MISS".into(), format!("for {t}")),
            "over the cap: {t}"
        );
    }
}

#[tokio::test]
async fn revalidate_only_answers_are_never_served_stale() {
    let origin = HttpOrigin::start();
    for (p, cc) in [
        ("/plain.txt", "max-age=1"),
        ("/smax.txt", "s-maxage=1"),
        ("/must.txt", "max-age=1, must-revalidate"),
        ("/proxy.txt", "max-age=1, proxy-revalidate"),
    ] {
        origin.route(p, Reply::new(200, "fresh").header("cache-control", cc));
    }
    origin.route(
        "/nocache.txt",
        Reply::new(200, "fresh").header("cache-control", "no-cache"),
    );
    let yaml = format!(
        "origins:\n  web: {{url: \"{}\"}}\ngroups:\n  g: {{main: web}}\n\
         cache: {{memory: 16MiB, stale_if_error: 5m}}\nroutes:\n  - {{path: /, group: g}}\n",
        origin.url("")
    );
    let c = Cascade::start(&yaml);
    let paths = [
        "/plain.txt",
        "/smax.txt",
        "/must.txt",
        "/proxy.txt",
        "/nocache.txt",
    ];
    for p in paths {
        assert_eq!(client().get(c.url(p)).send().await.unwrap().status(), 200);
    }
    for p in paths {
        origin.route(p, Reply::new(503, "origin down"));
    }
    // Past max-age=1 (a wait for expiry, not a speed assertion).
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = client().get(c.url("/plain.txt")).send().await.unwrap();
    assert_eq!(
        (r.status().as_u16(), header(&r, "x-cache")),
        (200, "STALE".into())
    );
    for p in &paths[1..] {
        let r = client().get(c.url(p)).send().await.unwrap();
        assert_eq!(r.status(), 503, "{p} must not be served stale");
    }
}

#[tokio::test]
async fn slices_that_do_not_cover_their_range_are_not_stored() {
    let origin = HttpOrigin::start();
    // An origin that caps every range at 100 bytes.
    let body: bytes::Bytes = (0..1_000_000u32)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<_>>()
        .into();
    origin.route_fn("/short.mp4", move |_, _, _| {
        Reply::new(206, body.slice(0..100))
            .header("content-range", "bytes 0-99/1000000")
            .header("etag", "\"s\"")
    });
    let yaml = format!(
        "origins:\n  web: {{url: \"{}\"}}\ngroups:\n  g: {{main: web}}\n\
         cache: {{memory: 64MiB, slice_size: 256KiB}}\nroutes:\n  - {{path: /, group: g}}\n",
        origin.url("")
    );
    let c = Cascade::start(&yaml);
    for _ in 0..2 {
        let r = client()
            .get(c.url("/short.mp4"))
            .header("range", "bytes=0-9")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 206);
        assert_eq!(header(&r, "content-range"), "bytes 0-9/1000000");
        assert_eq!(r.bytes().await.unwrap().len(), 10);
    }
    assert_eq!(origin.stats.total(), 2, "the short slice was never stored");
    // A client range the short answer does not hold is an origin error, not wrong bytes.
    let r = client()
        .get(c.url("/short.mp4"))
        .header("range", "bytes=1000-1009")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
}

#[tokio::test]
async fn slices_of_two_versions_are_never_mixed() {
    let origin = HttpOrigin::start();
    let v1: bytes::Bytes = vec![1u8; 1 << 20].into();
    let v2: bytes::Bytes = vec![2u8; 1 << 20].into();
    let current = Arc::new(Mutex::new((v1, "\"v1\"")));
    let cur = current.clone();
    origin.route_fn("/m.mp4", move |_, _, h| {
        let (body, etag) = cur.lock().unwrap().clone();
        range_reply(&body, h, etag)
    });
    let yaml = format!(
        "origins:\n  web: {{url: \"{}\"}}\ngroups:\n  g: {{main: web}}\n\
         cache: {{memory: 64MiB, slice_size: 256KiB}}\nroutes:\n  - {{path: /, group: g}}\n",
        origin.url("")
    );
    let c = Cascade::start(&yaml);
    let get = |range: &'static str| {
        let u = c.url("/m.mp4");
        async move {
            let r = client().get(u).header("range", range).send().await.unwrap();
            let xc = header(&r, "x-cache");
            (xc, r.bytes().await.unwrap()[0])
        }
    };
    assert_eq!(get("bytes=0-9").await, ("MISS".into(), 1));
    assert_eq!(get("bytes=0-9").await, ("HIT".into(), 1));
    // The object changes at the origin; the next slice fill brings the new ETag.
    *current.lock().unwrap() = (v2, "\"v2\"");
    assert_eq!(get("bytes=300000-300009").await, ("MISS".into(), 2));
    // Slice 0 of the old version is refetched, not mixed in.
    assert_eq!(get("bytes=0-9").await, ("MISS".into(), 2));
    assert_eq!(get("bytes=0-9").await, ("HIT".into(), 2));
}

// ---------------------------------------------------------------------------------------------
// One canonical path: no route around a route's plugins
// ---------------------------------------------------------------------------------------------

fn private_and_public() -> (HttpOrigin, Cascade) {
    let origin = HttpOrigin::start_normalizing();
    origin.route("/private/secret.txt", Reply::new(200, "the secret"));
    origin.route("/public.txt", Reply::new(200, "public"));
    let yaml = format!(
        "origins:\n  web: {{url: \"{}\"}}\ngroups:\n  g: {{main: web}}\n\
         plugins:\n  auth: {{wasm: {}, config: {{keys: [k-123]}}, bodies: false}}\n\
         routes:\n  - {{name: private, path: /private, group: g, plugins: [auth]}}\n\
         \x20 - {{name: public, path: /, group: g}}\n",
        origin.url(""),
        wasm("auth")
    );
    (origin, Cascade::start(&yaml))
}

#[tokio::test]
async fn dot_and_empty_segments_never_route_around_auth() {
    let (origin, c) = private_and_public();
    for target in [
        "/public/../private/secret.txt",
        "/public/%2e%2e/private/secret.txt",
        "/public/%2E%2e/private/secret.txt",
        "/public/.%2e/private/secret.txt",
        "/public/..;/private/secret.txt",
        "/./private/secret.txt",
        "//private/secret.txt",
        "/public//../private/secret.txt",
        "/private%2fsecret.txt",
        "/public/..%2fprivate%2fsecret.txt",
        "/public/..%5cprivate%5csecret.txt",
        "/public/%252e%252e/private/secret.txt",
        "/public/%c0%ae%c0%ae/private/secret.txt",
        "/private/secret.txt%00.jpg",
    ] {
        let r = raw_get(c.addr, target);
        assert_eq!(r.status, 400, "{target}: {}", r.text());
        assert!(!r.text().contains("the secret"), "{target}");
    }
    assert_eq!(origin.stats.total(), 0, "none reached the origin");
    // Encodings of the prefix itself still route to the private route: its plugin runs.
    assert_eq!(raw_get(c.addr, "/%70rivate/secret.txt").status, 401);
    assert_eq!(raw_get(c.addr, "/PRIVATE/secret.txt").status, 404);
    // `;` is sent encoded: an origin that strips `;params` cannot see `/private/...`.
    let r = raw_get(c.addr, "/private;x/secret.txt");
    assert_ne!(r.status, 200);
    assert!(!r.text().contains("the secret"));
    assert_eq!(origin.stats.last().unwrap().uri, "/private%3Bx/secret.txt");
    // The legitimate requests.
    assert_eq!(raw_get(c.addr, "/private/secret.txt").status, 401);
    let r = client()
        .get(c.url("/private/secret.txt"))
        .header("x-api-key", "k-123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "the secret");
    assert_eq!(raw_get(c.addr, "/public.txt").status, 200);
}

#[tokio::test]
async fn raw_key_routes_take_odd_keys_to_opaque_buckets() {
    let (s3, c) = signed_bucket(
        "  - {name: raw, path: /raw, strip_prefix: true, group: data, keys: raw}\n  - {name: strict, path: /, group: data}\n",
        "",
    );
    s3.put_file("data", "a/b/c.txt", "odd");
    // S3 keys are opaque: `a//b` and `a/./b` are keys of their own, never resolved.
    let r = raw_get(c.addr, "/raw/a/./b/c.txt");
    assert_ne!(r.status, 400, "{}", r.text());
    assert_eq!(
        s3.stats.last().unwrap().uri,
        "/data/a/./b/c.txt",
        "sent as the route saw it"
    );
    assert_eq!(raw_get(c.addr, "/raw/a/b/c.txt").status, 200);
    // NUL and invalid UTF-8 are refused even there; strict routes refuse dot segments.
    assert_eq!(raw_get(c.addr, "/raw/a%00").status, 400);
    assert_eq!(raw_get(c.addr, "/raw/%ff").status, 400);
    assert_eq!(raw_get(c.addr, "/x/../a/b/c.txt").status, 400);
}

#[tokio::test]
async fn plugin_method_and_path_edits_are_checked_again() {
    let origin = HttpOrigin::start();
    origin.set_default(Reply::new(200, "ok"));
    let yaml = format!(
        "origins:\n  web: {{url: \"{}\"}}\n  ro: {{url: \"{}\", read_only: true}}\n\
         groups:\n  g: {{main: web}}\n  archive: {{main: ro}}\n\
         plugins:\n\
         \x20 to-put: {{wasm: {h}, config: {{request: {{set: {{':method': PUT}}}}}}}}\n\
         \x20 escape: {{wasm: {h}, config: {{request: {{set: {{':path': /other/x}}}}}}}}\n\
         \x20 dots: {{wasm: {h}, config: {{request: {{set: {{':path': /edit/../other/x}}}}}}}}\n\
         \x20 stay: {{wasm: {h}, config: {{request: {{set: {{':path': '/stay/y?z=1'}}}}}}}}\n\
         routes:\n\
         \x20 - {{path: /ro, group: archive, plugins: [to-put]}}\n\
         \x20 - {{path: /esc, group: g, plugins: [escape]}}\n\
         \x20 - {{path: /edit, group: g, plugins: [dots]}}\n\
         \x20 - {{path: /stay, group: g, plugins: [stay]}}\n\
         \x20 - {{path: /other, group: g}}\n",
        origin.url(""),
        origin.url(""),
        h = wasm("headers")
    );
    let c = Cascade::start(&yaml);
    let r = client().get(c.url("/ro/x")).send().await.unwrap();
    assert_eq!(
        r.status(),
        405,
        "a GET turned into a write on a read-only group"
    );
    let r = client().get(c.url("/esc/x")).send().await.unwrap();
    assert_eq!(
        r.status(),
        500,
        "a plugin may not move a request to another route"
    );
    let r = client().get(c.url("/edit/x")).send().await.unwrap();
    assert_eq!(r.status(), 500);
    assert_eq!(origin.stats.total(), 0);
    // Within its route a plugin's path edit is what goes upstream.
    let r = client().get(c.url("/stay/q")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(origin.stats.last().unwrap().uri, "/stay/y?z=1");
}

// ---------------------------------------------------------------------------------------------
// Other trust domains and limits
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn fallbacks_never_see_the_clients_credentials() {
    let main = HttpOrigin::start();
    let fallback = HttpOrigin::start();
    fallback.set_default(Reply::new(200, "from fallback"));
    for (extra, forwarded) in [("", false), (", forward_credentials: true", true)] {
        let yaml = format!(
            "origins:\n  m: {{url: \"{}\"}}\n  f: {{url: \"{}\"}}\n\
             groups:\n  g: {{main: m, fallbacks: [f]{extra}}}\nroutes:\n  - {{path: /, group: g}}\n",
            main.url(""),
            fallback.url("")
        );
        let c = Cascade::start(&yaml);
        let r = client()
            .get(c.url("/x.jpg?w=1&X-Amz-Credential=AKID&X-Amz-Signature=s&access_token=t"))
            .header("authorization", "Bearer user-token")
            .header("cookie", "session=abc")
            .header("x-api-key", "k-123")
            .header("x-auth-token", "tok")
            .header("range", "bytes=0-3")
            .send()
            .await
            .unwrap();
        assert_eq!(r.text().await.unwrap(), "from fallback");
        let m = main.stats.last().unwrap();
        assert_eq!(
            m.header("authorization"),
            "Bearer user-token",
            "main is trusted"
        );
        assert!(m.uri.contains("X-Amz-Credential"));
        let f = fallback.stats.last().unwrap();
        for h in ["authorization", "cookie", "x-api-key", "x-auth-token"] {
            assert_eq!(f.headers.contains_key(h), forwarded, "{h} {extra}");
        }
        assert_eq!(
            f.header("range"),
            "bytes=0-3",
            "what a read needs still goes"
        );
        if !forwarded {
            assert_eq!(f.uri, "/x.jpg?w=1", "presign and token parameters dropped");
        }
    }
}

#[tokio::test]
async fn signed_url_parameters_reach_no_origin_and_share_one_entry() {
    let origin = HttpOrigin::start();
    origin.route_fn("/a.jpg", |_, target, _| {
        Reply::new(200, format!("asked {target}"))
    });
    let s3 = S3Server::signed();
    s3.put_file("data", "a.jpg", "from the bucket");
    let yaml = format!(
        "origins:\n  web: {{url: \"{}\"}}\n{}groups:\n  g: {{main: web}}\n  b: {{main: data}}\n\
         cache: {{memory: 16MiB}}\n\
         plugins:\n  auth: {{wasm: {}, config: {{hmac_secret: s3cr3t}}, bodies: false}}\n\
         routes:\n  - {{path: /, group: g, plugins: [auth]}}\n\
         \x20 - {{path: /b, strip_prefix: true, group: b, plugins: [auth]}}\n",
        origin.url(""),
        signed_origin("data", &s3.bucket_url("data"), "DATA"),
        wasm("auth")
    );
    let c = Cascade::builder(&yaml)
        .test_credentials("DATA_AK", "DATA_SK")
        .start();
    let signed = |path: &str, exp: u64| {
        let sig = hex(&hmac_sha256(b"s3cr3t", format!("{path}\n{exp}").as_bytes()));
        format!("expires={exp}&signature={sig}")
    };
    let exp = unix_now() + 300;
    let r = client()
        .get(c.url(&format!("/a.jpg?w=100&{}", signed("/a.jpg", exp))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "asked /a.jpg?w=100");
    // Another signature of the same URL is the same entry.
    let r = client()
        .get(c.url(&format!("/a.jpg?w=100&{}", signed("/a.jpg", exp + 1))))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "x-cache"), "HIT");
    assert_eq!(origin.stats.total(), 1);
    // Signed bucket: nothing of the query is signed.
    let r = client()
        .get(c.url(&format!("/b/a.jpg?{}", signed("/b/a.jpg", exp))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "from the bucket");
    assert_eq!(s3.stats.last().unwrap().uri, "/data/a.jpg");
}

#[tokio::test]
async fn oversized_request_headers_get_431() {
    let (origin, c) = ok_behind_cascade(&[]);
    let big = "a".repeat(200 * 1024);
    let many: String = (0..150).map(|i| format!("x-h{i}: v\r\n")).collect();
    let long_target = format!("/{}", "p".repeat(20 * 1024));
    for (what, req) in [
        (
            "a 200 KiB header",
            format!("GET /x HTTP/1.1\r\nHost: h\r\nx-big: {big}\r\n\r\n"),
        ),
        (
            "150 fields",
            format!("GET /x HTTP/1.1\r\nHost: h\r\n{many}\r\n"),
        ),
        (
            "a 20 KiB target",
            format!("GET {long_target} HTTP/1.1\r\nHost: h\r\n\r\n"),
        ),
    ] {
        let r = raw_request(c.addr, req.as_bytes(), Duration::from_secs(10));
        assert_eq!(r.status, 431, "{what}: {}", r.head);
        assert!(r.text().contains("limit"), "{what}");
    }
    assert_eq!(origin.stats.total(), 0);
    // A large but reasonable cookie passes.
    let cookie = format!("c={}", "v".repeat(10 * 1024));
    let r = client()
        .get(c.url("/x"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn requests_with_cookies_are_cached_only_where_cookies_cannot_matter() {
    let origin = HttpOrigin::start();
    origin.set_default(Reply::new(200, "page").header("cache-control", "max-age=60"));
    let s3 = S3Server::signed();
    s3.put_file("data", "a.jpg", "jpeg");
    let yaml = format!(
        "origins:\n  web: {{url: \"{}\"}}\n{}groups:\n  g: {{main: web}}\n  b: {{main: data}}\n\
         cache: {{memory: 16MiB}}\nroutes:\n  - {{path: /, group: g}}\n\
         \x20 - {{path: /ok, strip_prefix: true, group: g, cache: {{cache_cookies: true}}}}\n\
         \x20 - {{path: /b, strip_prefix: true, group: b}}\n",
        origin.url(""),
        signed_origin("data", &s3.bucket_url("data"), "DATA")
    );
    let c = Cascade::builder(&yaml)
        .test_credentials("DATA_AK", "DATA_SK")
        .start();
    let get = |p: &'static str, cookie: bool| {
        let u = c.url(p);
        async move {
            let mut rq = client().get(u);
            if cookie {
                rq = rq.header("cookie", "session=alice");
            }
            header(&rq.send().await.unwrap(), "x-cache")
        }
    };
    // The unsigned origin sees the cookie and may answer by it: not cached.
    assert_eq!(get("/p.html", true).await, "BYPASS");
    assert_eq!(get("/p.html", true).await, "BYPASS");
    assert_eq!(get("/p.html", false).await, "MISS");
    assert_eq!(get("/p.html", false).await, "HIT");
    // The route says cookies do not matter there.
    assert_eq!(get("/ok/q.html", true).await, "MISS");
    assert_eq!(get("/ok/q.html", true).await, "HIT");
    // A signed bucket never gets the cookie: cached.
    assert_eq!(get("/b/a.jpg", true).await, "MISS");
    assert_eq!(get("/b/a.jpg", true).await, "HIT");
    assert!(!s3.stats.last().unwrap().headers.contains_key("cookie"));
}

#[tokio::test]
async fn extra_forwarded_headers_are_never_cached() {
    let s3 = S3Server::signed();
    s3.put_file("data", "a.txt", "secret");
    let yaml = format!(
        "origins:\n  data: {{url: \"{}\", s3: {{region: us-east-1, access_key_env: DATA_AK, secret_key_env: DATA_SK, \
         forward_headers: [x-amz-server-side-encryption-customer-key, x-amz-server-side-encryption-customer-key-md5]}}}}\n\
         groups:\n  b: {{main: data}}\ncache: {{memory: 16MiB}}\nroutes:\n  - {{path: /, group: b}}\n",
        s3.bucket_url("data")
    );
    let c = Cascade::builder(&yaml)
        .test_credentials("DATA_AK", "DATA_SK")
        .start();
    // A request with a customer key (SSE-C) is forwarded and signed, but never stored: the
    // next client without the key must not get the decrypted answer from the cache.
    let r = client()
        .get(c.url("/a.txt"))
        .header("x-amz-server-side-encryption-customer-key", "a2V5")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "x-cache"), "BYPASS");
    assert_eq!(
        s3.stats
            .last()
            .unwrap()
            .header("x-amz-server-side-encryption-customer-key"),
        "a2V5"
    );
    let r = client().get(c.url("/a.txt")).send().await.unwrap();
    assert_eq!(header(&r, "x-cache"), "MISS");
}

#[tokio::test]
async fn hostile_ranges_and_origin_headers_cannot_break_slices() {
    let origin = HttpOrigin::start();
    let body: bytes::Bytes = (0..3_000_000u32)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<_>>()
        .into();
    let b = body.clone();
    origin.route_fn("/v.mp4", move |_, _, h| range_reply(&b, h, "\"v\""));
    // An origin that sends cascade's internal slice header itself.
    origin.route(
        "/evil.mp4",
        Reply::new(200, "tiny").header("x-cascade-slice-total", "5000000"),
    );
    let yaml = format!(
        "origins:\n  web: {{url: \"{}\"}}\ngroups:\n  g: {{main: web}}\n\
         cache: {{memory: 64MiB, slice_size: 1MB}}\nroutes:\n  - {{path: /, group: g}}\n",
        origin.url("")
    );
    let mut c = Cascade::start(&yaml);
    for range in [
        "bytes=18446744073709551615-",
        "bytes=18446744073709551000-18446744073709551615",
    ] {
        let r = client()
            .get(c.url("/v.mp4"))
            .header("range", range)
            .send()
            .await
            .unwrap();
        assert!(!r.status().is_server_error(), "{range}: {}", r.status());
    }
    let r = client()
        .get(c.url("/evil.mp4"))
        .header("range", "bytes=1000-1009")
        .send()
        .await
        .unwrap();
    assert!(!r.status().is_server_error(), "{}", r.status());
    let got = r.bytes().await.unwrap();
    assert!(got.len() <= 4, "no bytes invented: {got:?}");
    assert!(c.is_running());
    let r = client()
        .get(c.url("/v.mp4"))
        .header("range", "bytes=1000000-1000009")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap(), body.slice(1_000_000..1_000_010));
}

/// Reads one response (head + `Content-Length` body) from `s`; then whether the server closed
/// the connection within `wait` (read returns 0) or kept it open (read times out).
fn one_response_then_closed(s: &mut std::net::TcpStream, wait: Duration) -> (String, bool) {
    use std::io::Read;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head_end = loop {
        let n = s.read(&mut chunk).expect("response");
        assert!(n > 0, "closed before a response");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed mid-body");
        buf.extend_from_slice(&chunk[..n]);
    }
    s.set_read_timeout(Some(wait)).unwrap();
    let closed = match s.read(&mut chunk) {
        Ok(0) => true,
        Ok(n) => panic!("{n} unexpected bytes after the response"),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => true,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            false
        }
        Err(e) => panic!("read: {e}"),
    };
    (head, closed)
}

#[tokio::test]
async fn idle_keepalives_are_closed_after_keepalive_timeout_whatever_the_client_asks() {
    // cascade's own wait between requests (`release_idle`, the default) and Pingora's.
    for release in ["true", "false"] {
        idle_keepalives_closed(release);
    }
}

fn idle_keepalives_closed(release: &str) {
    use std::io::Write;
    let (origin, c) = ok_behind_cascade(&[("keepalive_timeout", "1s"), ("release_idle", release)]);
    for (what, req) in [
        ("an HTTP/1.1 client", "GET /a HTTP/1.1\r\nHost: h\r\n\r\n"),
        // Pingora alone would keep this one for an hour.
        (
            "a client asking for an hour",
            "GET /a HTTP/1.1\r\nHost: h\r\nConnection: keep-alive\r\nKeep-Alive: timeout=3600\r\n\r\n",
        ),
    ] {
        let mut s = std::net::TcpStream::connect(c.addr).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        // Still open well within the timeout: a second request on it is served.
        let (head, closed) = one_response_then_closed(&mut s, Duration::from_millis(300));
        let what = format!("{what}, release_idle {release}");
        assert!(head.starts_with("HTTP/1.1 200"), "{what}: {head}");
        assert!(!closed, "{what}: closed before keepalive_timeout");
        // The next request arrives in two pieces after a pause: the byte cascade waited
        // for and the rest (nothing of it may be lost or waited for twice).
        s.write_all(b"G").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        s.write_all(b"ET /b HTTP/1.1\r\nHost: h\r\n\r\n").unwrap();
        // Then idle: closed after ~1 s (bounded wait: 10 s).
        let t0 = std::time::Instant::now();
        let (head, closed) = one_response_then_closed(&mut s, Duration::from_secs(10));
        assert!(head.starts_with("HTTP/1.1 200"), "{what}: {head}");
        assert!(closed, "{what}: an idle keep-alive outlived keepalive_timeout by 10 s");
        let idle = t0.elapsed();
        assert!(
            idle >= Duration::from_millis(900),
            "{what}: closed after {idle:?}, before the 1 s timeout"
        );
    }
    // Keep-alive stays off for a client that did not ask for it (the bound only lowers it).
    let mut s = std::net::TcpStream::connect(c.addr).unwrap();
    s.write_all(b"GET /a HTTP/1.0\r\nHost: h\r\n\r\n").unwrap();
    let (_, closed) = one_response_then_closed(&mut s, Duration::from_secs(5));
    assert!(
        closed,
        "HTTP/1.0 without keep-alive: closed after the response"
    );
    assert_eq!(origin.stats.total(), 5);
}

#[tokio::test]
async fn keepalive_requests_after_the_idle_wait_arrive_whole() {
    // `release_idle` reads the next request's first bytes itself and hands them to Pingora
    // as the start of its header: nothing of them may be lost, repeated or taken for more.
    for release in ["true", "false"] {
        keepalive_requests_whole(release);
    }
}

fn keepalive_requests_whole(release: &str) {
    use std::io::Write;
    let (origin, c) = ok_behind_cascade(&[("release_idle", release)]);
    let mut s = std::net::TcpStream::connect(c.addr).unwrap();
    let mut expect_bytes = 0;
    let mut served = |s: &mut std::net::TcpStream, what: &str, uri: &str, body: usize| {
        let (head, closed) = one_response_then_closed(s, Duration::from_millis(50));
        assert!(
            head.starts_with("HTTP/1.1 200"),
            "{what}, release_idle {release}: {head}"
        );
        assert!(!closed, "{what}, release_idle {release}: closed");
        expect_bytes += body as u64;
        assert_eq!(origin.stats.last().unwrap().uri, uri, "{what}");
        assert_eq!(
            origin.stats.request_bytes(),
            expect_bytes,
            "{what}, release_idle {release}: the origin got another body"
        );
    };
    s.write_all(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n").unwrap();
    served(&mut s, "first request", "/a", 0);
    // Header and a body larger than one first read, in one write.
    let body = "b".repeat(5000);
    s.write_all(
        format!("PUT /up HTTP/1.1\r\nHost: h\r\nContent-Length: 5000\r\n\r\n{body}").as_bytes(),
    )
    .unwrap();
    served(&mut s, "header and body in one write", "/up", 5000);
    // A header longer than one first read: its end comes from the stream.
    let long = "l".repeat(6000);
    s.write_all(
        format!("GET /long HTTP/1.1\r\nHost: h\r\nx-long: {long}\r\nx-after: tail\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    served(&mut s, "a 6 KB header", "/long", 0);
    let seen = origin.stats.last().unwrap();
    assert_eq!(seen.header("x-long").len(), 6000);
    assert_eq!(seen.header("x-after"), "tail");
    // Header with half the body, then the rest after a pause.
    s.write_all(b"PUT /half HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n12345")
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    s.write_all(b"67890").unwrap();
    served(&mut s, "a body finished after a pause", "/half", 10);
    assert_eq!(origin.stats.total(), 4);
}

#[tokio::test]
async fn keepalive_timeout_zero_closes_every_connection_after_its_response() {
    use std::io::Write;
    let (_origin, c) = ok_behind_cascade(&[("keepalive_timeout", "0")]);
    let mut s = std::net::TcpStream::connect(c.addr).unwrap();
    s.write_all(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n").unwrap();
    let (head, closed) = one_response_then_closed(&mut s, Duration::from_secs(5));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "the response says it: {head}"
    );
    assert!(closed);
}

#[tokio::test]
async fn a_silent_or_stalled_new_connection_is_closed_after_client_header_timeout() {
    use std::io::Write;
    // Pingora alone waits 60 s per read (past this test's 10 s bound).
    for release in ["true", "false"] {
        let (origin, c) =
            ok_behind_cascade(&[("client_header_timeout", "1s"), ("release_idle", release)]);
        for (what, sent) in [
            ("a connection that sends nothing", ""),
            ("half a header", "GET /a HTTP/1.1\r\nHost: h\r\n"),
        ] {
            let what = format!("{what}, release_idle {release}");
            let mut s = std::net::TcpStream::connect(c.addr).unwrap();
            s.write_all(sent.as_bytes()).unwrap();
            let (got, after) = read_until_closed(&mut s, Duration::from_secs(10));
            assert!(
                after >= Duration::from_millis(900),
                "{what}: closed after {after:?}, before the 1 s timeout"
            );
            assert!(!got.contains(" 200 "), "{what}: {got}");
        }
        // A client that takes a while (under the timeout) to send its request is served.
        let mut s = std::net::TcpStream::connect(c.addr).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        s.write_all(b"GET /late HTTP/1.1\r\nHost: h\r\n\r\n")
            .unwrap();
        let (head, _) = one_response_then_closed(&mut s, Duration::from_millis(50));
        assert!(
            head.starts_with("HTTP/1.1 200"),
            "release_idle {release}: {head}"
        );
        assert_eq!(origin.stats.total(), 1, "release_idle {release}");
        if release == "true" {
            // On a keep-alive (idle timeout 75 s), a header begun and then stalled gets the
            // header timeout too once its first bytes are in.
            s.write_all(b"GET /b HTTP/1.1\r\nHost: h\r\n").unwrap();
            let (got, after) = read_until_closed(&mut s, Duration::from_secs(10));
            assert!(
                after >= Duration::from_millis(900),
                "closed after {after:?}"
            );
            assert!(!got.contains(" 200 "), "{got}");
            assert_eq!(origin.stats.total(), 1);
        }
    }
}

#[tokio::test]
async fn pipelined_requests_get_the_first_response_and_a_close() {
    // cascade does not enable HTTP/1.1 pipelining (its connection loop relies on that):
    // requests sent back to back without waiting get the first one answered, then the
    // connection closed (the client retries the rest), never a hang or a mixed-up answer.
    use std::io::Write;
    for release in ["true", "false"] {
        let (origin, c) = ok_behind_cascade(&[("release_idle", release)]);
        let mut s = std::net::TcpStream::connect(c.addr).unwrap();
        s.write_all(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n").unwrap();
        let (head, closed) = one_response_then_closed(&mut s, Duration::from_millis(50));
        assert!(head.starts_with("HTTP/1.1 200") && !closed, "{head}");
        s.write_all(b"GET /one HTTP/1.1\r\nHost: h\r\n\r\nGET /two HTTP/1.1\r\nHost: h\r\n\r\n")
            .unwrap();
        let (head, closed) = one_response_then_closed(&mut s, Duration::from_secs(5));
        assert!(
            head.starts_with("HTTP/1.1 200"),
            "release_idle {release}: {head}"
        );
        assert!(
            closed,
            "release_idle {release}: still open after the first of two pipelined requests"
        );
        let uris: Vec<String> = origin.stats.requests().into_iter().map(|r| r.uri).collect();
        assert_eq!(uris, ["/a", "/one"], "release_idle {release}");
    }
}

#[test]
fn client_header_timeout_must_be_whole_seconds_and_more_than_0() {
    for value in ["1500ms", "0"] {
        assert_located(
            &format!("listen: [{{addr: 127.0.0.1:1}}]\nserver:\n  client_header_timeout: {value} # <-\norigins:\n  a: {{url: \"http://127.0.0.1:9\"}}\ngroups:\n  g: {{main: a}}\nroutes:\n  - {{path: /, group: g}}\n"),
            "server.client_header_timeout",
            &["whole seconds", "at least 1"],
        );
    }
}

#[test]
fn keepalive_timeout_must_be_whole_seconds() {
    assert_located(
        "listen: [{addr: 127.0.0.1:1}]\nserver:\n  keepalive_timeout: 1500ms # <-\norigins:\n  a: {url: \"http://127.0.0.1:9\"}\ngroups:\n  g: {main: a}\nroutes:\n  - {path: /, group: g}\n",
        "server.keepalive_timeout",
        &["whole seconds"],
    );
}

/// Everything `s` receives until the server closes it (bounded: `limit`), and when.
fn read_until_closed(s: &mut std::net::TcpStream, limit: Duration) -> (String, Duration) {
    use std::io::Read;
    let t0 = std::time::Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("not closed within {limit:?} ({e}); got {got:?}"),
        }
    }
    (String::from_utf8_lossy(&got).to_string(), t0.elapsed())
}

#[tokio::test]
async fn an_upload_that_stalls_gets_408_after_client_body_timeout() {
    use std::io::Write;
    let (origin, c) = ok_behind_cascade(&[("client_body_timeout", "2s")]);
    // Half the body, then silence: 408 after ~2 s (Pingora's fixed default: 60 s, past this
    // test's 10 s bound), and the origin never gets a whole body.
    let mut s = std::net::TcpStream::connect(c.addr).unwrap();
    s.write_all(b"PUT /up HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n12345")
        .unwrap();
    let (got, after) = read_until_closed(&mut s, Duration::from_secs(10));
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    assert!(
        after >= Duration::from_millis(1900),
        "cut off after {after:?}"
    );
    assert!(
        origin.stats.request_bytes() < 10,
        "a stalled upload reached the origin whole"
    );
    // A slow but steady upload is served: each piece comes within the timeout.
    let mut s = std::net::TcpStream::connect(c.addr).unwrap();
    s.write_all(
        b"PUT /steady HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    for b in b"0123456789".chunks(2) {
        std::thread::sleep(Duration::from_millis(400));
        s.write_all(b).unwrap();
    }
    let (got, _) = read_until_closed(&mut s, Duration::from_secs(10));
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
}

/// Reads until the peer closes (or resets) within `limit`: how many bytes came.
fn count_until_closed(s: &mut std::net::TcpStream, limit: Duration) -> usize {
    use std::io::Read;
    s.set_read_timeout(Some(limit)).unwrap();
    let deadline = std::time::Instant::now() + limit;
    let mut n = 0;
    let mut chunk = vec![0u8; 256 << 10];
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "not closed within {limit:?} ({n} bytes)"
        );
        match s.read(&mut chunk) {
            Ok(0) => return n,
            Ok(got) => n += got,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return n,
            Err(e) => panic!("not closed within {limit:?} ({e}; {n} bytes)"),
        }
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_after_send_timeout() {
    use std::io::{Read, Write};
    // 48 MiB: far more than the kernel's socket buffers on loopback and Pingora's pipe hold.
    const BIG: usize = 48 << 20;
    let (origin, c) = ok_behind_cascade(&[("send_timeout", "1s")]);
    origin.route("/big", Reply::new(200, vec![b'b'; BIG]));
    // The head and a little of the body, then no more reads: cascade's writes wait, and
    // after 1 s without progress (Pingora alone: forever) cascade closes the connection.
    let mut s = std::net::TcpStream::connect(c.addr).unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n")
        .unwrap();
    let mut first = [0u8; 4096];
    let n = s.read(&mut first).unwrap();
    assert!(first[..n].starts_with(b"HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_secs(4)).await;
    // What the buffers held comes, then the close: never the whole body.
    let rest = count_until_closed(&mut s, Duration::from_secs(20));
    assert!(n + rest < BIG, "the whole body came ({})", n + rest);
    let m = c.metrics().await;
    assert_eq!(
        metric_sum(&m, "cascade_client_send_timeouts_total", &[]),
        Some(1.0),
        "counted once"
    );

    // A slow but steady reader (1 MiB every 100 ms, 3.2 s for 32 MiB, three times the
    // timeout once the buffers are full) gets everything: the clock restarts on progress.
    const MID: usize = 32 << 20;
    origin.route("/mid", Reply::new(200, vec![b'm'; MID]));
    let mut s = std::net::TcpStream::connect(c.addr).unwrap();
    s.write_all(b"GET /mid HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = 0usize;
    let mut chunk = vec![0u8; 1 << 20];
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        assert!(std::time::Instant::now() < deadline, "{got} bytes in 30 s");
        let mut block = 0;
        while block < chunk.len() {
            match s.read(&mut chunk[block..]).unwrap() {
                0 => break,
                k => block += k,
            }
        }
        got += block;
        if block < chunk.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(got > MID, "a steady reader was cut off after {got} bytes");
}

#[tokio::test]
async fn a_client_that_pauses_longer_than_the_origins_read_timeout_still_gets_its_download() {
    use std::io::{Read, Write};
    // While the client takes nothing, cascade stops reading from the origin (backpressure),
    // but Pingora times each upstream read: a read held past the origin's read timeout would
    // end the download as an origin timeout, charged to a healthy origin.
    const BIG: usize = 48 << 20;
    let origin = HttpOrigin::start();
    origin.route("/big", Reply::new(200, vec![b'p'; BIG]));
    let c = Cascade::start(&format!("{}timeouts:\n  read: 2s\n", ok_config(&origin)));
    let mut s = std::net::TcpStream::connect(c.addr).unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut first = [0u8; 4096];
    let n = s.read(&mut first).unwrap();
    assert!(first[..n].starts_with(b"HTTP/1.1 200"));
    // A pause well past the 2 s read timeout (and within the 60 s send timeout).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rest = count_until_closed(&mut s, Duration::from_secs(30));
    let head = first[..n]
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap()
        + 4;
    assert_eq!(n - head + rest, BIG, "the whole body");
    let m = c.metrics().await;
    assert_eq!(
        metric_sum(&m, "cascade_upstream_errors_total", &[]).unwrap_or(0.0),
        0.0,
        "no origin error"
    );
}

#[test]
fn send_timeout_must_not_be_zero() {
    assert_located(
        "listen: [{addr: 127.0.0.1:1}]\nserver:\n  send_timeout: 0s # <-\norigins:\n  a: {url: \"http://127.0.0.1:9\"}\ngroups:\n  g: {main: a}\nroutes:\n  - {path: /, group: g}\n",
        "server.send_timeout",
        &["more than 0"],
    );
}

#[test]
fn client_body_timeout_must_not_be_zero() {
    assert_located(
        "listen: [{addr: 127.0.0.1:1}]\nserver:\n  client_body_timeout: 0s # <-\norigins:\n  a: {url: \"http://127.0.0.1:9\"}\ngroups:\n  g: {main: a}\nroutes:\n  - {path: /, group: g}\n",
        "server.client_body_timeout",
        &["more than 0"],
    );
}
