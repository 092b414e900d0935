//! Bucket sets (issue 14) against real servers: one s3s-fs server per member (objects are
//! plain files under `root/bkt/`), a real `redis-server` for the shared books, cascade as a
//! child process with its admin listener. The books (`/status`, metrics) are always compared
//! with the bytes on the members' disks.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use serde_json::Value;

const TOKEN: &str = "bucket-set-admin-token";
/// Every member's bucket (each member is its own server).
const BUCKET: &str = "bkt";
const GROUP: &str = "uploads";

/// One member: an s3s-fs server (SigV4 checked) with its bucket.
struct Member {
    name: &'static str,
    s3: S3Server,
}

fn members(names: &[&'static str]) -> Vec<Member> {
    names
        .iter()
        .map(|&name| {
            let s3 = S3Server::signed();
            s3.create_bucket(BUCKET);
            Member { name, s3 }
        })
        .collect()
}

impl Member {
    /// The object's bytes on this member's disk.
    fn file(&self, key: &str) -> Option<Vec<u8>> {
        self.s3.read_file(BUCKET, key.trim_start_matches('/'))
    }

    /// (bytes, objects) in the member's bucket directory.
    fn disk(&self) -> (u64, u64) {
        fn walk(p: &Path, acc: &mut (u64, u64)) {
            for e in std::fs::read_dir(p).unwrap().flatten() {
                let t = e.file_type().unwrap();
                if t.is_dir() {
                    walk(&e.path(), acc);
                } else if t.is_file() {
                    acc.0 += e.metadata().unwrap().len();
                    acc.1 += 1;
                }
            }
        }
        let mut acc = (0, 0);
        walk(&self.s3.root().join(BUCKET), &mut acc);
        acc
    }

    fn gets_of(&self, key: &str) -> usize {
        let path = format!("/{BUCKET}{key}");
        self.s3
            .stats
            .requests()
            .iter()
            .filter(|r| matches!(r.method.as_str(), "GET" | "HEAD") && r.uri == path)
            .count()
    }
}

fn s3_origin(name: &str, url: &str) -> String {
    format!(
        "  {name}: {{url: \"{url}\", s3: {{region: us-east-1, access_key_env: AK, secret_key_env: SK}}}}\n"
    )
}

/// `(origin, capacity, priority, weight)`
type Spec<'a> = (&'a str, u64, u32, u32);

/// The `buckets:` block of group `uploads`.
fn set_yaml(strategy: &str, specs: &[Spec]) -> String {
    let mut y = format!("    buckets:\n      strategy: {strategy}\n      members:\n");
    for (n, cap, p, w) in specs {
        y.push_str(&format!(
            "        - {{origin: {n}, capacity: {cap}, priority: {p}, weight: {w}}}\n"
        ));
    }
    y.push_str("      cooldown: {failures: 3, step: 500ms, max: 2s}\n");
    y
}

/// Origins for `members`, group `uploads` with their set, a catch-all route, and `extra`
/// top-level YAML.
fn config(ms: &[Member], strategy: &str, specs: &[Spec], extra: &str) -> String {
    let mut y = String::from("origins:\n");
    for m in ms {
        y.push_str(&s3_origin(m.name, &m.s3.bucket_url(BUCKET)));
    }
    y.push_str(&format!("groups:\n  {GROUP}:\n"));
    y.push_str(&set_yaml(strategy, specs));
    y.push_str(&format!(
        "routes:\n  - {{path: /, group: {GROUP}, max_upload_size: 64MiB}}\n{extra}"
    ));
    y
}

fn redis_yaml(on_error: &str) -> String {
    // Not 50ms: a loaded test machine must not make a healthy Redis look away.
    format!("redis:\n  url_env: CASCADE_REDIS_URL\n  timeout: 200ms\n  on_error: {on_error}\n")
}

/// A cascade with an admin listener.
struct Proxy {
    c: Cascade,
    admin: String,
}

fn start(yaml: &str, redis: Option<&Redis>) -> Proxy {
    let port = free_port();
    let yaml =
        format!("{yaml}admin: {{addr: \"127.0.0.1:{port}\", token_env: CASCADE_ADMIN_TOKEN}}\n");
    let mut b = Cascade::builder(&yaml)
        .test_credentials("AK", "SK")
        .env("CASCADE_ADMIN_TOKEN", TOKEN);
    if let Some(r) = redis {
        b = b.env("CASCADE_REDIS_URL", &r.url());
    }
    Proxy {
        c: b.start(),
        admin: format!("http://127.0.0.1:{port}"),
    }
}

/// Deterministic content of `len` bytes for `key`.
fn body(key: &str, len: usize) -> Vec<u8> {
    key.bytes()
        .chain(b"|".iter().copied())
        .cycle()
        .take(len)
        .collect()
}

impl Proxy {
    /// PUT `data` at `key`: (status, X-Served-From).
    async fn put(&self, key: &str, data: Vec<u8>) -> (u16, String) {
        let r = client()
            .put(self.c.url(key))
            .body(data)
            .send()
            .await
            .unwrap();
        let from = header(&r, "x-served-from");
        (r.status().as_u16(), from)
    }

    /// GET `key`: (status, X-Served-From, body).
    async fn get(&self, key: &str) -> (u16, String, Vec<u8>) {
        let r = client().get(self.c.url(key)).send().await.unwrap();
        let from = header(&r, "x-served-from");
        (r.status().as_u16(), from, r.bytes().await.unwrap().to_vec())
    }

    async fn status(&self) -> Value {
        admin_status(&self.admin, TOKEN).await
    }

    /// Times the start-up (or admin) reconcile logged its result.
    fn reconciles(&self) -> usize {
        self.c.stderr().matches("reconciled in").count()
    }

    /// Wait (bounded) until at least `n` reconciles are logged.
    async fn wait_reconciles(&self, n: usize) {
        let ok = eventually(Duration::from_secs(10), || self.reconciles() >= n).await;
        assert!(
            ok,
            "want {n} reconciles logged; stderr:\n{}",
            self.c.stderr_tail(40)
        );
    }

    /// Wait (bounded) until `/status` says Redis is `up`.
    async fn wait_redis(&self, up: bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let doc = self.status().await;
            if doc["redis"]["up"] == up {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis never {} in /status: {:#}",
                if up { "up" } else { "down" },
                doc["redis"]
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait (bounded) until `/status` and the metrics show, for every member, the bytes and
    /// objects on its disk and nothing reserved; returns the last `/status`.
    async fn assert_books_match_disk(&self, ms: &[Member]) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let doc = self.status().await;
            let metrics = self.c.metrics().await;
            let mut wrong = Vec::new();
            for m in ms {
                let (bytes, objects) = m.disk();
                let b = book(&doc, m.name);
                let l = [("group", GROUP), ("bucket", m.name)];
                let gauge = |name| metric_sum(&metrics, name, &l).unwrap_or(-1.0) as i64;
                let got = (
                    b["used"].as_u64(),
                    b["objects"].as_u64(),
                    b["reserved"].as_u64(),
                    gauge("cascade_bucket_used_bytes"),
                    gauge("cascade_bucket_objects"),
                    gauge("cascade_bucket_reserved_bytes"),
                );
                let want = (
                    Some(bytes),
                    Some(objects),
                    Some(0),
                    bytes as i64,
                    objects as i64,
                    0,
                );
                if got != want {
                    wrong.push(format!(
                        "{}: (status used, objects, reserved; gauges) {got:?} != disk {want:?}",
                        m.name
                    ));
                }
            }
            if wrong.is_empty() {
                return doc;
            }
            assert!(
                Instant::now() < deadline,
                "books never matched the disks:\n{}\n{:#}\n--- stderr ---\n{}",
                wrong.join("\n"),
                doc["groups"],
                self.c.stderr_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A member's books in a `/status` document.
fn book<'a>(doc: &'a Value, bucket: &str) -> &'a Value {
    let g = doc["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == GROUP)
        .unwrap_or_else(|| panic!("no group {GROUP} in {doc:#}"));
    g["bucket_set"]["members"]
        .as_array()
        .unwrap_or_else(|| panic!("group {GROUP} has no bucket_set: {g:#}"))
        .iter()
        .find(|m| m["bucket"] == bucket)
        .unwrap_or_else(|| panic!("no member {bucket} in {g:#}"))
}

fn member<'a>(ms: &'a [Member], name: &str) -> &'a Member {
    ms.iter().find(|m| m.name == name).unwrap()
}

/// The single member holding `key` on disk (panics if several do).
fn holder(ms: &[Member], key: &str) -> Option<&'static str> {
    let on: Vec<&str> = ms
        .iter()
        .filter(|m| m.file(key).is_some())
        .map(|m| m.name)
        .collect();
    assert!(on.len() <= 1, "{key} is on several members: {on:?}");
    on.first().copied()
}

// ---------------------------------------------------------------------------------------------
// Placement
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn priority_fills_the_first_member_then_spills_to_the_next() {
    let ms = members(&["a", "b"]);
    let p = start(
        &config(
            &ms,
            "priority",
            &[("a", 1000, 1, 1), ("b", 10_000, 2, 1)],
            "",
        ),
        None,
    );
    p.wait_reconciles(1).await;
    for i in 0..15 {
        let key = format!("/p{i}");
        let (status, from) = p.put(&key, body(&key, 100)).await;
        let want = if i < 10 { "a" } else { "b" };
        assert_eq!((status, from.as_str()), (200, want), "{key}");
        assert_eq!(holder(&ms, &key), Some(want), "{key}");
        assert_eq!(member(&ms, want).file(&key), Some(body(&key, 100)));
    }
    // Room for it nowhere: 507, and nothing reaches a member.
    let puts = ms[0].s3.stats.count("PUT") + ms[1].s3.stats.count("PUT");
    let (status, _) = p.put("/huge", body("/huge", 20_000)).await;
    assert_eq!(status, 507);
    assert_eq!(holder(&ms, "/huge"), None);
    assert_eq!(
        ms[0].s3.stats.count("PUT") + ms[1].s3.stats.count("PUT"),
        puts
    );

    let doc = p.assert_books_match_disk(&ms).await;
    let (a, b) = (book(&doc, "a"), book(&doc, "b"));
    assert_eq!(
        (a["used"].as_u64(), a["percent"].as_f64()),
        (Some(1000), Some(100.0))
    );
    assert_eq!(
        (b["used"].as_u64(), b["percent"].as_f64()),
        (Some(500), Some(5.0))
    );
    assert_eq!(
        (a["capacity"].as_u64(), a["uploads"].as_u64()),
        (Some(1000), Some(10))
    );
    let m = p.c.metrics().await;
    let up = |bucket, outcome| {
        metric_sum(
            &m,
            "cascade_uploads_total",
            &[("group", GROUP), ("bucket", bucket), ("outcome", outcome)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!((up("a", "ok"), up("b", "ok")), (10.0, 5.0));
    assert_eq!(up("a", "full") + up("b", "full"), 1.0);
    assert_eq!(
        metric_sum(&m, "cascade_upload_bytes_total", &[("bucket", "a")]),
        Some(1000.0)
    );
    assert_eq!(
        metric_sum(&m, "cascade_bucket_capacity_bytes", &[("bucket", "b")]),
        Some(10_000.0)
    );
}

#[tokio::test]
async fn least_used_keeps_the_members_percentages_level() {
    let ms = members(&["a", "b", "c"]);
    let p = start(
        &config(
            &ms,
            "least_used",
            &[("a", 2000, 1, 1), ("b", 4000, 2, 1), ("c", 8000, 3, 1)],
            "",
        ),
        None,
    );
    p.wait_reconciles(1).await;
    // 56 × 100 bytes of 14,000: 40% each (one object is 5% of `a`).
    for i in 0..56 {
        let key = format!("/l{i}");
        let (status, _) = p.put(&key, body(&key, 100)).await;
        assert_eq!(status, 200, "{key}");
    }
    let doc = p.assert_books_match_disk(&ms).await;
    for m in &ms {
        let pct = book(&doc, m.name)["percent"].as_f64().unwrap();
        assert!(
            (35.0..=45.0).contains(&pct),
            "{}: {pct}% (want 40 ± 5): {:#}",
            m.name,
            doc["groups"]
        );
    }
}

#[tokio::test]
async fn weighted_placement_follows_the_weights() {
    let ms = members(&["a", "b", "c"]);
    let p = start(
        &config(
            &ms,
            "weighted",
            &[
                ("a", 1 << 20, 1, 3),
                ("b", 1 << 20, 2, 2),
                ("c", 1 << 20, 3, 1),
            ],
            "",
        ),
        None,
    );
    p.wait_reconciles(1).await;
    let n = 300;
    let statuses: Vec<u16> = futures::stream::iter(0..n)
        .map(|i| {
            let p = &p;
            async move {
                let key = format!("/w{i}");
                p.put(&key, body(&key, 10)).await.0
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    let counts: Vec<u64> = ms.iter().map(|m| m.disk().1).collect();
    assert_eq!(counts.iter().sum::<u64>(), n);
    for (got, want) in counts.iter().zip([150.0, 100.0, 50.0]) {
        assert!(
            (*got as f64 - want).abs() <= want * 0.1,
            "objects per member {counts:?}, want 150/100/50 ± 10%"
        );
    }
    p.assert_books_match_disk(&ms).await;
}

// ---------------------------------------------------------------------------------------------
// Reservations under concurrency
// ---------------------------------------------------------------------------------------------

/// Uploads of one new key that race (an SDK's retry, two writers) never make two copies:
/// the first to claim the key decides its member, with local books and with Redis's.
#[tokio::test]
async fn racing_uploads_of_one_new_key_land_on_one_member() {
    let redis = Redis::start();
    for shared in [false, true] {
        let ms = members(&["a", "b", "c"]);
        let p = start(
            &config(
                &ms,
                "weighted",
                &[
                    ("a", 1 << 20, 1, 1),
                    ("b", 1 << 20, 2, 1),
                    ("c", 1 << 20, 3, 1),
                ],
                "",
            ),
            shared.then_some(&redis),
        );
        p.wait_reconciles(1).await;
        for k in 0..10 {
            let key = format!("/same-{shared}-{k}");
            let statuses: Vec<u16> = futures::future::join_all(
                (0..6).map(|_| async { p.put(&key, body(&key, 100)).await.0 }),
            )
            .await;
            assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
            // `holder` panics when several members hold the key.
            assert!(holder(&ms, &key).is_some(), "{key} stored nowhere");
        }
        p.assert_books_match_disk(&ms).await;
    }
}

/// 50 uploads at once against `a` with room for 10 and `b` with room for 30.
async fn fifty_racing_uploads(with_redis: bool) {
    let redis = with_redis.then(Redis::start);
    let ms = members(&["a", "b"]);
    let extra = if with_redis {
        redis_yaml("local")
    } else {
        String::new()
    };
    let p = start(
        &config(
            &ms,
            "priority",
            &[("a", 1000, 1, 1), ("b", 3000, 2, 1)],
            &extra,
        ),
        redis.as_ref(),
    );
    p.wait_reconciles(1).await;
    if with_redis {
        p.wait_redis(true).await;
    }
    let answers = futures::future::join_all((0..50).map(|i| {
        let p = &p;
        async move {
            let key = format!("/race{i}");
            p.put(&key, body(&key, 100)).await
        }
    }))
    .await;
    let count = |s: u16, from: &str| {
        answers
            .iter()
            .filter(|(st, f)| *st == s && (from.is_empty() || f == from))
            .count()
    };
    assert_eq!(
        (count(200, "a"), count(200, "b"), count(507, "")),
        (10, 30, 10),
        "{answers:?}"
    );
    assert_eq!((ms[0].disk(), ms[1].disk()), ((1000, 10), (3000, 30)));
    p.assert_books_match_disk(&ms).await;
    if let Some(r) = &redis {
        // The shared books themselves.
        assert_eq!(
            r.cmd(&["HGET", "cascade:{uploads}:u:a", "used"]),
            "$4\r\n1000"
        );
        assert_eq!(
            r.cmd(&["HGET", "cascade:{uploads}:u:b", "reserved"]),
            "$1\r\n0"
        );
    }
}

#[tokio::test]
async fn racing_uploads_never_overfill_a_member_with_local_books() {
    fifty_racing_uploads(false).await;
}

#[tokio::test]
async fn racing_uploads_never_overfill_a_member_with_redis_books() {
    fifty_racing_uploads(true).await;
}

// ---------------------------------------------------------------------------------------------
// Overwrites, deletes, other instances
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn overwrites_stay_in_place_deletes_lower_usage_and_other_instances_find_every_key() {
    let redis = Redis::start();
    let ms = members(&["a", "b"]);
    let specs = [("a", 1000, 1, 1), ("b", 10_000, 2, 1)];
    let shared = config(&ms, "priority", &specs, &redis_yaml("local"));
    let p1 = start(&shared, Some(&redis));
    p1.wait_reconciles(1).await;
    p1.wait_redis(true).await;

    for i in 0..10 {
        let key = format!("/k{i}");
        assert_eq!(p1.put(&key, body(&key, 90)).await, (200, "a".into()));
    }
    // 900 on a: 200 more do not fit.
    assert_eq!(p1.put("/k10", body("/k10", 200)).await, (200, "b".into()));
    // Overwrites stay where the key is: k0 grows by 60 on a, k10 shrinks to 30 on b (which
    // would fit on a, first by priority).
    assert_eq!(p1.put("/k0", body("/k0-v2", 150)).await, (200, "a".into()));
    assert_eq!(p1.put("/k10", body("/k10-v2", 30)).await, (200, "b".into()));
    assert_eq!(ms[0].file("/k0"), Some(body("/k0-v2", 150)));
    assert_eq!(holder(&ms, "/k10"), Some("b"));
    // An empty object: zero bytes reserved and counted.
    let r = raw_request(
        p1.c.addr,
        b"PUT /empty HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.head.to_ascii_lowercase().contains("x-served-from: a\r\n"),
        "{}",
        r.head
    );
    // Neither Content-Length nor a chunked body: empty too, not of unknown size.
    let r = raw_request(
        p1.c.addr,
        b"PUT /empty2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(holder(&ms, "/empty2"), Some("a"));
    let doc = p1.assert_books_match_disk(&ms).await;
    assert_eq!(book(&doc, "a")["used"], 960);
    assert_eq!(book(&doc, "b")["used"], 30);
    // An overwrite that would overflow its member is refused, and the old object stays.
    assert_eq!(p1.put("/k0", body("/k0-v3", 200)).await.0, 507);
    assert_eq!(ms[0].file("/k0"), Some(body("/k0-v2", 150)));
    // DELETE goes to the holder and lowers its usage.
    let r = client().delete(p1.c.url("/k1")).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(holder(&ms, "/k1"), None);
    let doc = p1.assert_books_match_disk(&ms).await;
    assert_eq!(
        (
            book(&doc, "a")["used"].as_u64(),
            book(&doc, "a")["objects"].as_u64()
        ),
        (Some(870), Some(11))
    );

    let expect: Vec<(String, &str, Vec<u8>)> = (0..=10)
        .filter(|&i| i != 1)
        .map(|i| format!("/k{i}"))
        .chain(["/empty".to_string(), "/empty2".to_string()])
        .map(|key| {
            let m = holder(&ms, &key).expect("on a member");
            let data = member(&ms, m).file(&key).unwrap();
            (key, m, data)
        })
        .collect();
    // Reads go straight to the holder (the other member is not asked).
    let reads_hit_the_holder = |p: &Proxy, label: &'static str| {
        let expect = &expect;
        let ms = &ms;
        let p_url = p.c.addr;
        async move {
            for m in ms {
                m.s3.stats.reset();
            }
            for (key, m, data) in expect {
                let r = client()
                    .get(format!("http://{p_url}{key}"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200, "{label}: {key}");
                assert_eq!(header(&r, "x-served-from"), *m, "{label}: {key}");
                assert_eq!(&r.bytes().await.unwrap()[..], &data[..], "{label}: {key}");
                let other = ms.iter().find(|o| o.name != *m).unwrap();
                assert_eq!(
                    other.gets_of(key),
                    0,
                    "{label}: {key} is indexed on {m}; {} was asked",
                    other.name
                );
            }
        }
    };

    // A second instance sharing the Redis knows every key and the usage.
    let p2 = start(&shared, Some(&redis));
    p2.wait_redis(true).await;
    p2.assert_books_match_disk(&ms).await;
    reads_hit_the_holder(&p2, "second instance").await;
    assert_eq!(p2.get("/k1").await.0, 404);

    // A fresh instance without Redis builds its books from the members' listings.
    let alone = config(&ms, "priority", &specs, "");
    let p3 = start(&alone, None);
    p3.wait_reconciles(1).await;
    p3.assert_books_match_disk(&ms).await;
    reads_hit_the_holder(&p3, "instance without redis").await;

    // An object written around cascade is counted by the next reconcile (admin API).
    ms[1]
        .s3
        .put_file(BUCKET, "around.txt", body("/around.txt", 77));
    let url = format!("{}/buckets/{GROUP}/reconcile", p3.admin);
    let r = client().post(&url).send().await.unwrap();
    assert_eq!(r.status(), 401, "no token");
    let r = client()
        .post(&url)
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "wrong token");
    let r = client().post(&url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(v["group"], GROUP, "{v}");
    let doc = p3.status().await;
    assert_eq!(book(&doc, "b")["used"], 107, "{:#}", doc["groups"]);
    p3.assert_books_match_disk(&ms).await;
    let r = client()
        .post(format!("{}/buckets/nope/reconcile", p3.admin))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

// ---------------------------------------------------------------------------------------------
// Cooldown
// ---------------------------------------------------------------------------------------------

/// `a` (an HTTP origin answering 503 to writes) fails three uploads: it is in cooldown (no
/// uploads, still read from), then takes uploads again.
#[tokio::test]
async fn a_failing_member_cools_down_keeps_serving_reads_and_recovers() {
    let a = HttpOrigin::start();
    // An empty listing for the start-up reconcile; one object to read.
    a.route_fn("/bkt/", |_, target, _| {
        if target.contains("list-type=2") {
            Reply::new(
                200,
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?><ListBucketResult><Name>bkt</Name><IsTruncated>false</IsTruncated></ListBucketResult>",
            )
            .header("content-type", "application/xml")
        } else {
            Reply::new(404, "")
        }
    });
    a.route_method(
        "GET",
        "/bkt/old.txt",
        Reply::new(200, "old object").header("x-served-from", "evil"),
    );
    for i in 0..4 {
        a.route_method("PUT", &format!("/bkt/new{i}"), Reply::new(503, "busy"));
    }
    let ms = members(&["b"]);
    let yaml = format!(
        "origins:\n  a: {{url: \"{}\"}}\n{}groups:\n  {GROUP}:\n{}routes:\n  - {{path: /, group: {GROUP}}}\n",
        a.url("/bkt"),
        s3_origin("b", &ms[0].s3.bucket_url(BUCKET)),
        // 3 × 1s, at most 3s: long enough for the checks made during the cooldown.
        set_yaml("priority", &[("a", 1 << 20, 1, 1), ("b", 1 << 20, 2, 1)])
            .replace("step: 500ms, max: 2s", "step: 1s, max: 3s"),
    );
    let p = start(&yaml, None);
    p.wait_reconciles(1).await;

    for i in 0..3 {
        let key = format!("/new{i}");
        let r = client()
            .put(p.c.url(&key))
            .body(body(&key, 10))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503, "{key}");
        let retry: u64 = header(&r, "retry-after")
            .parse()
            .unwrap_or_else(|_| panic!("{key}: Retry-After {:?}", header(&r, "retry-after")));
        assert!((1..=3).contains(&retry), "{key}: Retry-After {retry}");
    }
    assert_eq!(a.stats.count("PUT"), 3);
    assert_eq!(
        ms[0].s3.stats.count("PUT"),
        0,
        "a failed upload is not retried elsewhere"
    );
    let doc = p.status().await;
    let ab = book(&doc, "a");
    assert_eq!(ab["state"], "cooldown", "{ab:#}");
    assert!(ab["cooldown_until_unix_ms"].as_u64().unwrap() > unix_now() * 1000 - 1000);
    assert_eq!(ab["consecutive_failures"], 3);
    assert!(
        ab["last_failure"]["why"].as_str().unwrap().contains("503"),
        "{ab:#}"
    );
    let m = p.c.metrics().await;
    assert_eq!(
        metric_sum(&m, "cascade_bucket_cooldowns_total", &[("bucket", "a")]),
        Some(1.0)
    );
    assert_eq!(
        metric_sum(
            &m,
            "cascade_uploads_total",
            &[("bucket", "a"), ("outcome", "failed")]
        ),
        Some(3.0)
    );

    // In cooldown: new uploads go to b; a's object is still read from a (and the origin
    // cannot name itself in X-Served-From).
    assert_eq!(p.put("/new3", body("/new3", 10)).await, (200, "b".into()));
    assert_eq!(
        a.stats.count("PUT"),
        3,
        "no upload reaches a member in cooldown"
    );
    let r = client().get(p.c.url("/old.txt")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let from: Vec<_> = r.headers().get_all("x-served-from").iter().collect();
    assert_eq!(
        from,
        ["a"],
        "X-Served-From names the member, never the origin's word"
    );
    assert_eq!(r.text().await.unwrap(), "old object");

    assert_eq!(book(&p.status().await, "a")["state"], "cooldown", "still");

    // After the cooldown a takes uploads again.
    a.route_method("PUT", "/bkt/after", Reply::new(200, ""));
    let deadline = Instant::now() + Duration::from_secs(5);
    while book(&p.status().await, "a")["state"] != "ok" {
        assert!(Instant::now() < deadline, "a never left its cooldown");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(p.put("/after", body("/after", 10)).await, (200, "a".into()));
    let doc = p.status().await;
    assert_eq!(book(&doc, "a")["consecutive_failures"], 0);
    assert_eq!(book(&doc, "a")["used"], 10);
}

// ---------------------------------------------------------------------------------------------
// Redis away
// ---------------------------------------------------------------------------------------------

/// Time one request; none may wait on an unreachable Redis.
async fn timed<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    let t0 = Instant::now();
    let v = f.await;
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "{what} took {:?} while Redis was away",
        t0.elapsed()
    );
    v
}

/// Uploads, reads and a delete while Redis is unreachable: `local` keeps going, nothing
/// waits; then Redis returns and the books (this instance's and Redis's) match the disks.
async fn redis_away(freeze: bool) {
    let mut redis = Redis::start();
    let ms = members(&["a", "b"]);
    let p = start(
        &config(
            &ms,
            "priority",
            &[("a", 2000, 1, 1), ("b", 100_000, 2, 1)],
            &redis_yaml("local"),
        ),
        Some(&redis),
    );
    p.wait_reconciles(1).await;
    p.wait_redis(true).await;
    for i in 0..5 {
        let key = format!("/before{i}");
        assert_eq!(p.put(&key, body(&key, 300)).await.0, 200);
    }
    if freeze {
        redis.pause();
    } else {
        redis.kill();
    }
    for i in 0..10 {
        let key = format!("/during{i}");
        let (status, _) = timed(&key, p.put(&key, body(&key, 300))).await;
        assert_eq!(status, 200, "{key}: on_error local keeps uploading");
        let (status, _, data) = timed(&key, p.get(&key)).await;
        assert_eq!((status, data), (200, body(&key, 300)), "{key}");
        let k = format!("/before{}", i % 5);
        assert_eq!(timed(&k, p.get(&k)).await.0, 200, "{k}");
    }
    let r = timed("delete", client().delete(p.c.url("/before0")).send())
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    // An overwrite while away, of a key placed before.
    assert_eq!(
        timed("overwrite", p.put("/before1", body("/before1", 50))).await,
        (200, "a".into())
    );
    p.wait_redis(false).await;
    let m = p.c.metrics().await;
    assert_eq!(metric_sum(&m, "cascade_redis_up", &[]), Some(0.0));
    assert!(metric_sum(&m, "cascade_redis_errors_total", &[]).unwrap_or(0.0) >= 1.0);
    // The instance's own books are right while alone, and a was never overfilled (the
    // books it had when Redis went away included its last uploads).
    p.assert_books_match_disk(&ms).await;
    assert!(ms[0].disk().0 <= 2000, "a overfilled: {:?}", ms[0].disk());
    let reconciles = p.reconciles();

    if freeze {
        redis.resume();
    } else {
        redis.restart();
    }
    p.wait_redis(true).await;
    p.assert_books_match_disk(&ms).await;
    // Redis's books converge too: a fresh Redis by a reconcile, a frozen one by the journal.
    let deadline = Instant::now() + Duration::from_secs(10);
    for m in &ms {
        let want = format!("${}\r\n{}", m.disk().0.to_string().len(), m.disk().0);
        loop {
            let got = redis.cmd(&["HGET", &format!("cascade:{{uploads}}:u:{}", m.name), "used"]);
            if got == want {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "redis books of {}: {got:?}, disk {want:?}",
                m.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    if freeze {
        assert_eq!(
            p.reconciles(),
            reconciles,
            "Redis kept its data: the journal, not a reconcile, brings it up to date"
        );
    } else {
        assert!(
            p.reconciles() > reconciles,
            "a Redis that lost its data is rebuilt"
        );
    }
    // Uploads go on through Redis.
    assert_eq!(p.put("/after", body("/after", 10)).await.0, 200);
    p.assert_books_match_disk(&ms).await;
}

#[tokio::test]
async fn redis_killed_uploads_go_on_locally_and_counts_converge_after_restart() {
    redis_away(false).await;
}

#[tokio::test]
async fn redis_frozen_uploads_go_on_locally_and_the_journal_catches_up() {
    redis_away(true).await;
}

/// Redis is up but refuses a change (its books were damaged): Redis is not taken for down,
/// the journal is not blocked by the change, and a reconcile repairs the books.
#[tokio::test]
async fn a_change_redis_refuses_does_not_take_the_shared_books_down() {
    let redis = Redis::start();
    let ms = members(&["a", "b"]);
    let p = start(
        &config(
            &ms,
            "priority",
            &[("a", 10_000, 1, 1), ("b", 10_000, 2, 1)],
            &redis_yaml("local"),
        ),
        Some(&redis),
    );
    p.wait_reconciles(1).await;
    p.wait_redis(true).await;
    assert_eq!(p.put("/r0", body("/r0", 100)).await, (200, "a".into()));
    assert_eq!(
        redis.cmd(&["HSET", "cascade:{uploads}:u:a", "used", "garbage"]),
        ":0"
    );
    assert_eq!(p.put("/r1", body("/r1", 100)).await, (200, "a".into()));
    let reconciles = p.reconciles();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let doc = p.status().await;
        assert_eq!(doc["redis"]["up"], true, "Redis answered: it is up");
        let used = redis.cmd(&["HGET", "cascade:{uploads}:u:a", "used"]);
        if used == "$3\r\n200" && p.reconciles() > reconciles {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Redis's books never repaired: used {used:?}\n{}",
            p.c.stderr_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    p.assert_books_match_disk(&ms).await;
}

#[tokio::test]
async fn redis_away_with_on_error_deny_refuses_uploads_and_serves_reads() {
    let mut redis = Redis::start();
    let ms = members(&["a", "b"]);
    let p = start(
        &config(
            &ms,
            "priority",
            &[("a", 2000, 1, 1), ("b", 100_000, 2, 1)],
            &redis_yaml("deny"),
        ),
        Some(&redis),
    );
    p.wait_reconciles(1).await;
    p.wait_redis(true).await;
    assert_eq!(p.put("/x", body("/x", 100)).await, (200, "a".into()));
    redis.kill();
    for i in 0..5 {
        let key = format!("/denied{i}");
        let r = timed(
            &key,
            client().put(p.c.url(&key)).body(body(&key, 10)).send(),
        )
        .await
        .unwrap();
        assert_eq!(r.status(), 503, "{key}");
        assert!(!header(&r, "retry-after").is_empty(), "{key}: Retry-After");
        assert_eq!(holder(&ms, &key), None);
        let (status, from, _) = timed("read", p.get("/x")).await;
        assert_eq!((status, from.as_str()), (200, "a"));
    }
    redis.restart();
    p.wait_redis(true).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = p.put("/y", body("/y", 100)).await;
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "uploads still {status} after Redis returned"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    p.assert_books_match_disk(&ms).await;
}

// ---------------------------------------------------------------------------------------------
// boto3 multipart
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn boto3_multipart_upload_lands_whole_in_one_member_and_counts_once() {
    let redis = Redis::start();
    let ms = members(&["a", "b"]);
    let p = start(
        &config(
            &ms,
            "priority",
            &[("a", 64 << 20, 1, 1), ("b", 64 << 20, 2, 1)],
            &redis_yaml("local"),
        ),
        Some(&redis),
    );
    p.wait_reconciles(1).await;
    p.wait_redis(true).await;
    const SIZE: u64 = 20 << 20;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big.bin");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&file).unwrap();
        let mut off = 0;
        while off < SIZE {
            f.write_all(&pattern_chunk(off, 1 << 20)).unwrap();
            off += 1 << 20;
        }
    }
    let script = format!(
        r#"
import json, boto3
from botocore.config import Config
s3 = boto3.client("s3", endpoint_url="{url}", aws_access_key_id="client",
    aws_secret_access_key="client-secret", region_name="us-east-1",
    config=Config(s3={{"addressing_style": "path"}}, retries={{"max_attempts": 1}}))
s3.upload_file("{file}", "media", "big.bin")
s3.put_object(Bucket="media", Key="small.txt", Body=b"hello set")
print(json.dumps({{"head": s3.head_object(Bucket="media", Key="big.bin")["ContentLength"]}}))
"#,
        url = p.c.url(""),
        file = file.display()
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .output()
            .expect("python3")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "boto3 script failed (is boto3 installed? scripts/deps.sh installs it):\n{}\n--- cascade ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        p.c.stderr_tail(30)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["head"], SIZE);
    // The route has no prefix: the key is `/media/big.bin`.
    let key = "/media/big.bin";
    assert_eq!(holder(&ms, key), Some("a"));
    let on_disk = ms[0].s3.object_path(BUCKET, "media/big.bin");
    assert_eq!(file_checksum(&on_disk).unwrap(), pattern_checksum(SIZE));
    assert_eq!(ms[1].disk(), (0, 0), "nothing on b");
    assert!(
        ms[1].s3.stats.writes() == 0,
        "no part went to b: {:?}",
        ms[1].s3.stats.by_method()
    );
    let doc = p.assert_books_match_disk(&ms).await;
    let a = book(&doc, "a");
    assert_eq!(
        (a["objects"].as_u64(), a["uploads"].as_u64()),
        (Some(2), Some(2))
    );
    let m = p.c.metrics().await;
    assert_eq!(
        metric_sum(
            &m,
            "cascade_uploads_total",
            &[("bucket", "a"), ("outcome", "ok")]
        ),
        Some(2.0),
        "the multipart upload counts once (and the small one once)"
    );
    assert_eq!(
        metric_sum(&m, "cascade_upload_bytes_total", &[("bucket", "a")]),
        Some((SIZE + 9) as f64)
    );
}

// ---------------------------------------------------------------------------------------------
// Hostile clients
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn clients_cannot_choose_a_member_or_hold_room_and_must_say_their_size() {
    let ms = members(&["a", "b"]);
    let mut yaml = String::from("origins:\n");
    for m in &ms {
        yaml.push_str(&s3_origin(m.name, &m.s3.bucket_url(BUCKET)));
    }
    yaml.push_str(&format!(
        "groups:\n  {GROUP}:\n{}routes:\n  - {{path: /strict/, group: {GROUP}, require_content_length: true}}\n  - {{path: /, group: {GROUP}, max_upload_size: 1MiB}}\n",
        set_yaml("priority", &[("a", 2 << 20, 1, 1), ("b", 4 << 20, 2, 1)])
    ));
    let p = start(&yaml, None);
    p.wait_reconciles(1).await;

    // Nothing a client sends names a member: everything lands on a (first by priority).
    let http = client();
    let attempts = [
        ("/h0", "x-served-from", "b"),
        ("/h1", "x-cascade-member", "b"),
        ("/h2", "x-cascade-bucket", "b"),
        ("/h3", "x-served-from-role", "b"),
        ("/h4", "x-amz-bucket", "b"),
    ];
    for (key, name, value) in attempts {
        let r = http
            .put(p.c.url(key))
            .header(name, value)
            .body(body(key, 10))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{key}");
        assert_eq!(holder(&ms, key), Some("a"), "{name}: {value}");
    }
    for (i, q) in ["member=b", "bucket=b", "origin=b", "x-id=b"]
        .iter()
        .enumerate()
    {
        let key = format!("/q{i}");
        let r = http
            .put(p.c.url(&format!("{key}?{q}")))
            .body(body(&key, 10))
            .send()
            .await
            .unwrap();
        assert!(
            holder(&ms, &key) != Some("b"),
            "?{q} placed a key on b ({})",
            r.status()
        );
    }
    assert_eq!(ms[1].disk(), (0, 0));

    // Parts of uploads that do not exist hold no room (3 × 900 KiB would fill a's 2 MiB
    // for a day), nor do parts whose client goes away.
    for i in 0..3 {
        let r = http
            .put(p.c.url(&format!("/h0?partNumber=1&uploadId=bogus-{i}")))
            .body(vec![b'x'; 900 << 10])
            .send()
            .await;
        // Refused by the member (or by cascade before the body was read: the send fails).
        if let Ok(r) = r {
            assert!(r.status().is_client_error(), "bogus part: {}", r.status());
        }
    }
    let mut s = std::net::TcpStream::connect(p.c.addr).unwrap();
    std::io::Write::write_all(
        &mut s,
        format!(
            "PUT /h0?partNumber=1&uploadId=gone HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\npartial",
            900 << 10
        )
        .as_bytes(),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let doc = p.status().await;
        let held = (
            book(&doc, "a")["reserved"].as_u64(),
            book(&doc, "b")["reserved"].as_u64(),
        );
        if held == (Some(0), Some(0)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "room still held after refused parts: {held:?}\n{:#}",
            doc["groups"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        p.put("/after-bogus", body("/after-bogus", 10)).await,
        (200, "a".into())
    );

    // Without Content-Length: 411 from cascade where the route requires it (no member is
    // asked); elsewhere a reservation of max_upload_size, and the member's own answer (S3
    // wants a Content-Length too), after which nothing stays reserved.
    let chunked = |key: &str| {
        let data = body(key, 3000);
        reqwest::Body::wrap_stream(futures::stream::iter(
            data.chunks(1000)
                .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
                .collect::<Vec<_>>(),
        ))
    };
    let puts = || ms[0].s3.stats.count("PUT") + ms[1].s3.stats.count("PUT");
    let before = puts();
    let r = http
        .put(p.c.url("/strict/x"))
        .body(chunked("/strict/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 411);
    assert!(r.text().await.unwrap().starts_with("cascade:"));
    assert_eq!(puts(), before, "refused before any member");
    // A multipart part is an upload too: no Content-Length on a strict route is 411, not a
    // part that reserves nothing (and so fits any full member).
    let r = http
        .put(p.c.url("/strict/x?partNumber=1&uploadId=u1"))
        .body(chunked("/strict/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 411, "a chunked part on a strict route");
    assert_eq!(puts(), before, "refused before any member");
    let r = http
        .put(p.c.url("/strict/y"))
        .body(body("/strict/y", 10))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "with Content-Length");
    let before = puts();
    let r = http
        .put(p.c.url("/loose"))
        .body(chunked("/loose"))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "x-served-from"), "a");
    assert!(
        r.text().await.unwrap().contains("MissingContentLength"),
        "the member's answer"
    );
    assert_eq!(puts(), before + 1);
    p.assert_books_match_disk(&ms).await;
}

/// SDKs that send `aws-chunked` bodies with trailing checksums (STREAMING-UNSIGNED-PAYLOAD-
/// TRAILER): the object counts its decoded size, not the framed body's.
#[tokio::test]
async fn aws_chunked_uploads_count_the_object_not_its_framing() {
    let ms = members(&["a", "b"]);
    let p = start(
        &config(
            &ms,
            "priority",
            &[("a", 1000, 1, 1), ("b", 10_000, 2, 1)],
            "",
        ),
        None,
    );
    p.wait_reconciles(1).await;
    let framed = "5\r\nhello\r\n0\r\nx-amz-checksum-crc32:NhCmhg==\r\n\r\n";
    let req = format!(
        "PUT /chunky HTTP/1.1\r\nHost: x\r\nx-amz-content-sha256: STREAMING-UNSIGNED-PAYLOAD-TRAILER\r\n\
         content-encoding: aws-chunked\r\nx-amz-decoded-content-length: 5\r\n\
         x-amz-trailer: x-amz-checksum-crc32\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{framed}",
        framed.len()
    );
    let r = raw_request(p.c.addr, req.as_bytes(), Duration::from_secs(5));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(ms[0].file("/chunky").as_deref(), Some(&b"hello"[..]));
    let doc = p.assert_books_match_disk(&ms).await;
    assert_eq!(book(&doc, "a")["used"], 5);
}

// ---------------------------------------------------------------------------------------------
// Config errors
// ---------------------------------------------------------------------------------------------

const SET_BASE: &str = "\
listen:
  - addr: 127.0.0.1:18080
origins:
  a: {url: \"http://127.0.0.1:9/a\"}
  b: {url: \"http://127.0.0.1:10/b\"}
  legacy: {url: \"http://127.0.0.1:11/l\"}
groups:
  uploads:
    buckets:
      strategy: weighted
      members:
        - {origin: a, capacity: 10KB, priority: 1, weight: 3}
        - {origin: b, capacity: 1MB, priority: 2, weight: 2}
      cooldown: {failures: 3, step: 5m, max: 30m}
    fallbacks: [legacy]
routes:
  - {path: /, group: uploads, max_upload_size: 100MB, require_content_length: true}
";

#[test]
fn the_base_bucket_set_config_is_valid() {
    let (code, stderr, _, _dir) = check(SET_BASE);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn config_errors_of_bucket_sets_are_located() {
    let swap = |from: &str, to: &str| {
        assert!(SET_BASE.contains(from), "{from}");
        SET_BASE.replacen(from, to, 1)
    };
    let a = "        - {origin: a, capacity: 10KB, priority: 1, weight: 3}\n";
    let b = "        - {origin: b, capacity: 1MB, priority: 2, weight: 2}\n";
    assert_located(
        &swap("    buckets:\n", "    main: legacy\n    buckets:  # <-\n"),
        "groups.uploads.buckets",
        &["main", "buckets"],
    );
    let neither = SET_BASE
        .split_once("  uploads:\n")
        .map(|(head, _)| {
            format!("{head}  uploads:  # <-\n    fallbacks: [legacy]\nroutes:\n  - {{path: /, group: uploads}}\n")
        })
        .unwrap();
    assert_located(&neither, "groups.uploads", &["main", "buckets"]);
    assert_located(
        &swap(
            b,
            "        - {origin: nowhere, capacity: 1MB, priority: 2}  # <-\n",
        ),
        "groups.uploads.buckets.members[1].origin",
        &["nowhere"],
    );
    assert_located(
        &swap(
            b,
            "        - {origin: a, capacity: 1MB, priority: 2}  # <-\n",
        ),
        "groups.uploads.buckets.members[1].origin",
        &["`a`", "twice"],
    );
    assert_located(
        &swap(a, "        - {origin: a, capacity: 0, priority: 1}  # <-\n"),
        "groups.uploads.buckets.members[0].capacity",
        &["greater than zero"],
    );
    assert_located(
        &swap(
            "      strategy: weighted\n      members:\n",
            "      strategy: weighted  # <-\n      members:\n",
        )
        .replace("weight: 3}", "weight: 0}")
        .replace("weight: 2}", "weight: 0}"),
        "groups.uploads.buckets.strategy",
        &["weight"],
    );
    assert_located(
        &swap(
            "    fallbacks: [legacy]\n",
            "    fallbacks: [legacy, b]  # <-\n",
        ),
        "groups.uploads.fallbacks[1]",
        &["`b`", "member"],
    );
    assert_located(
        &format!("{SET_BASE}redis:\n  url_env: CASCADE_TEST_UNSET_REDIS_URL  # <-\n"),
        "redis.url_env",
        &["CASCADE_TEST_UNSET_REDIS_URL"],
    );
}
