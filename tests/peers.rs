//! Origins of several peers, end to end: the real binary, real sockets, real peers that die
//! and come back. What is asserted is where requests went (the peers' own request logs,
//! `X-Served-From`, the peer metrics and `/status`), never how fast; every load loop is
//! bounded both in count and in time, and states are waited for with generous bounds.
//!
//! - a peer killed under load: no failed request, no attempt on it once it is out, back
//!   after `rise` checks when restarted on its address;
//! - the active monitor (body, signed checks, one log line per change);
//! - balancing (weighted round robin, least outstanding, consistent hashing);
//! - retries (never the same peer twice, the retry budget, writes);
//! - failover to the fallbacks, the fast 503 when nothing can answer, stale-if-error;
//! - the admin API (drain/enable, `/status`, `/readyz`);
//! - DNS refresh (a private mount namespace with its own `/etc/hosts`);
//! - config errors of `peers:` located by `cascade check`.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::*;

const TOKEN: &str = "test-admin-token-0123456789";

/// One line of a `peers:` list.
fn peer(name: &str, url: &str, extra: &str) -> String {
    format!("      - {{url: \"{url}\", name: {name}{extra}}}\n")
}

/// An origin `name` of `peers` lines with further origin keys (`settings`, each line
/// indented by four spaces).
fn origin(name: &str, peers: &[String], settings: &str) -> String {
    format!("  {name}:\n    peers:\n{}{settings}", peers.concat())
}

/// `origins:` + one group `g` (`group` is its flow mapping) + a catch-all route.
fn config(origins: &[String], group: &str) -> String {
    format!(
        "origins:\n{}groups:\n  g: {group}\nroutes:\n  - {{path: /, group: g}}\n",
        origins.concat()
    )
}

/// A cascade with an admin listener (token [`TOKEN`]); returns it with the admin base URL.
fn start_with_admin(yaml: &str) -> (Cascade, String) {
    let port = free_port();
    let yaml =
        format!("{yaml}admin: {{addr: \"127.0.0.1:{port}\", token_env: CASCADE_ADMIN_TOKEN}}\n");
    let c = Cascade::builder(&yaml)
        .env("CASCADE_ADMIN_TOKEN", TOKEN)
        .start();
    (c, format!("http://127.0.0.1:{port}"))
}

/// `GET /status` with the token, waiting (bounded) for the admin listener.
async fn status(admin: &str) -> Value {
    admin_status(admin, TOKEN).await
}

/// A peer's object in a `/status` document.
fn peer_status<'a>(doc: &'a Value, origin: &str, peer: &str) -> &'a Value {
    doc["origins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == origin)
        .unwrap_or_else(|| panic!("no origin `{origin}` in {doc:#}"))["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == peer)
        .unwrap_or_else(|| panic!("no peer `{origin}/{peer}` in {doc:#}"))
}

/// Wait (bounded) until `/status` shows each `(origin, peer)` in `state`.
async fn wait_states(admin: &str, want: &[(&str, &str, &str)], within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let doc = status(admin).await;
        if want
            .iter()
            .all(|(o, p, s)| peer_status(&doc, o, p)["state"] == *s)
        {
            return doc;
        }
        assert!(
            Instant::now() < deadline,
            "peers not in states {want:?} within {within:?}: {doc:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `/status` once no peer has a request in flight (an attempt ends in the logging phase,
/// a moment after the client has its answer), or after 5 s as it is then.
async fn settled(admin: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let doc = status(admin).await;
        let busy = doc["origins"].as_array().is_some_and(|os| {
            os.iter().any(|o| {
                o["peers"]
                    .as_array()
                    .is_some_and(|ps| ps.iter().any(|p| p["in_flight"] != 0))
            })
        });
        if !busy || Instant::now() > deadline {
            return doc;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A metric's value (0 when the series does not exist yet).
async fn metric(c: &Cascade, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_sum(&c.metrics().await, name, labels).unwrap_or(0.0)
}

/// Attempts on one peer that ended with `outcome`.
async fn peer_outcomes(c: &Cascade, origin: &str, peer: &str, outcome: &str) -> u64 {
    metric(
        c,
        "cascade_peer_requests_total",
        &[("origin", origin), ("peer", peer), ("outcome", outcome)],
    )
    .await as u64
}

/// GET `path`: status, `X-Served-From`, body.
async fn get(c: &Cascade, path: &str) -> (u16, String, String) {
    let r = client().get(c.url(path)).send().await.unwrap();
    let from = header(&r, "x-served-from");
    (r.status().as_u16(), from, r.text().await.unwrap())
}

/// Requests a server saw other than its health checks.
fn served(o: &HttpOrigin) -> usize {
    o.stats
        .requests()
        .iter()
        .filter(|r| !r.uri.starts_with("/hc"))
        .count()
}

/// Lines of the child's stderr containing `needle`.
fn log_lines(c: &Cascade, needle: &str) -> usize {
    c.stderr().lines().filter(|l| l.contains(needle)).count()
}

/// An HTTP peer answering `body` for any object and `OK` on `/hc`.
fn live_peer(body: &str) -> HttpOrigin {
    let o = HttpOrigin::start();
    o.set_default(Reply::new(200, body.to_string()));
    o.route("/hc", Reply::new(200, "OK"));
    o
}

/// A loopback address nothing listens on: connections are refused.
fn closed_url() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

// ---------------------------------------------------------------------------------------------
// 1. A peer killed under steady load
// ---------------------------------------------------------------------------------------------

const CLIENTS: usize = 20;
const PASSIVE_FAILURES: u64 = 3;

/// A peer answering after 20 ms: under load, each has requests in flight at any moment.
fn busy_peer_on(addr: SocketAddr, body: &str) -> HttpOrigin {
    let o = HttpOrigin::start_on(addr);
    o.set_default(Reply::new(200, body.to_string()).delay(Duration::from_millis(20)));
    o.route("/hc", Reply::new(200, "OK"));
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_killed_under_load_costs_no_request_and_rejoins_after_rise_checks() {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let a = busy_peer_on(any, "a");
    let mut b = Some(busy_peer_on(any, "b"));
    let c3 = busy_peer_on(any, "c");
    let b_addr = b.as_ref().unwrap().addr;
    let yaml = config(
        &[origin(
            "media",
            &[
                peer("a", &a.url(""), ""),
                peer("b", &b.as_ref().unwrap().url(""), ""),
                peer("c", &c3.url(""), ""),
            ],
            &format!(
                "    health: {{path: /hc, expected_body: OK, interval: 200ms, timeout: 150ms, rise: 2, fall: 2}}\n\
                 \x20   passive: {{failures: {PASSIVE_FAILURES}, cooldown: 30s}}\n\
                 \x20   retries: 2\n"
            ),
        )],
        "{main: media}",
    );
    let c = Cascade::start(&yaml);

    // Steady load: CLIENTS loops, each bounded by a stop flag, a deadline and a count.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let deadline = Instant::now() + Duration::from_secs(30);
    let cl = client_with_timeout(Duration::from_secs(10));
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (stop, ok, failures, cl) = (stop.clone(), ok.clone(), failures.clone(), cl.clone());
            let url = c.url(&format!("/obj/{i}"));
            tokio::spawn(async move {
                for _ in 0..100_000 {
                    if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                        break;
                    }
                    match cl.get(&url).send().await {
                        Ok(r) if r.status() == 200 => {
                            let body = r.bytes().await;
                            match body {
                                Ok(b) if matches!(&b[..], b"a" | b"b" | b"c") => {
                                    ok.fetch_add(1, Ordering::Relaxed);
                                }
                                other => failures.lock().unwrap().push(format!("body {other:?}")),
                            }
                        }
                        Ok(r) => {
                            let m = format!("{} {:?}", r.status(), r.text().await);
                            failures.lock().unwrap().push(m);
                        }
                        Err(e) => failures.lock().unwrap().push(e.to_string()),
                    }
                }
            })
        })
        .collect();
    // At least `n` more answers and `t` more time under load.
    let load_on = |n: u64, t: Duration| {
        let ok = ok.clone();
        async move {
            let before = ok.load(Ordering::Relaxed);
            tokio::time::sleep(t).await;
            assert!(
                eventually(Duration::from_secs(10), || ok.load(Ordering::Relaxed)
                    >= before + n)
                .await,
                "the load is not flowing"
            );
        }
    };
    load_on(300, Duration::from_secs(1)).await;
    assert!(
        served(b.as_ref().unwrap()) > 0,
        "b is in rotation before it dies"
    );

    // Kill b mid-run: its listener and every connection close.
    let dying = b.take().unwrap();
    tokio::task::spawn_blocking(move || drop(dying))
        .await
        .unwrap();
    // Out of rotation: the monitor has it down after `fall` failed checks.
    assert!(
        eventually(Duration::from_secs(10), || log_lines(
            &c,
            "peer `b` is down"
        ) == 1)
        .await,
        "b never went down"
    );
    const OUTCOMES: [&str; 5] = ["ok", "status", "connect", "timeout", "error"];
    let mut at_down = BTreeMap::new();
    for o in OUTCOMES {
        at_down.insert(o, peer_outcomes(&c, "media", "b", o).await);
    }
    // Attempts on the dead peer: the ones in flight when it died (reset, or retried on it
    // once by Pingora's rule for reused connections, then refused) and the ones that picked
    // it before passive detection (3 failures) or the monitor took it out; each client has
    // one attempt at a time.
    assert!(
        at_down["connect"] <= CLIENTS as u64 + PASSIVE_FAILURES,
        "connect failures on the dead peer: {at_down:?}"
    );
    assert!(
        at_down["error"] + at_down["timeout"] <= CLIENTS as u64,
        "resets and timeouts on the dead peer: {at_down:?}"
    );
    // Once it is down, no attempt goes to it while the load goes on.
    load_on(300, Duration::from_secs(1)).await;
    for o in OUTCOMES {
        assert_eq!(
            peer_outcomes(&c, "media", "b", o).await,
            at_down[o],
            "attempts on the down peer ({o})"
        );
    }

    // Restarted on its address: up again after `rise` good checks, then served.
    let back = busy_peer_on(b_addr, "b");
    assert!(
        eventually(Duration::from_secs(10), || log_lines(&c, "peer `b` is up")
            == 1)
        .await,
        "b never came back up"
    );
    assert!(
        back.stats.count("GET") - served(&back) as u64 >= 2,
        "up only after `rise` (2) checks"
    );
    assert!(
        eventually(Duration::from_secs(10), || served(&back) >= 20).await,
        "b back in rotation"
    );

    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failed client requests (of {}): {:?}",
        failures.len(),
        failures.len() as u64 + ok.load(Ordering::Relaxed),
        &failures[..failures.len().min(10)]
    );
    assert_eq!(log_lines(&c, "is down"), 1, "only b went down");
    // Every attempt ended (an attempt ends in the logging phase, just after its answer).
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&c, "cascade_peer_in_flight", &[("origin", "media")]).await != 0.0 {
        assert!(Instant::now() < deadline, "an attempt never ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// 2. The active monitor
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_peer_whose_check_body_lacks_the_expected_text_is_down_until_fixed() {
    let a = live_peer("a");
    let b = live_peer("b");
    let c3 = live_peer("c");
    b.route("/hc", Reply::new(200, "maintenance"));
    let yaml = config(
        &[origin(
            "media",
            &[
                peer("a", &a.url(""), ""),
                peer("b", &b.url(""), ""),
                peer("c", &c3.url(""), ""),
            ],
            "    health: {path: /hc, expected_body: ok, interval: 200ms, timeout: 150ms, rise: 2, fall: 2}\n",
        )],
        "{main: media}",
    );
    let (c, admin) = start_with_admin(&yaml);
    let doc = wait_states(
        &admin,
        &[
            ("media", "a", "up"),
            ("media", "b", "down"),
            ("media", "c", "up"),
        ],
        Duration::from_secs(10),
    )
    .await;
    let check = &peer_status(&doc, "media", "b")["last_check"];
    assert_eq!(check["ok"], false, "{doc:#}");
    assert!(
        check["detail"].as_str().unwrap().contains("body without"),
        "{check}"
    );
    assert_eq!(peer_status(&doc, "media", "a")["last_check"]["ok"], true);
    assert_eq!(
        metric(&c, "cascade_peer_up", &[("origin", "media"), ("peer", "b")]).await,
        0.0
    );
    assert!(
        metric(
            &c,
            "cascade_health_checks_total",
            &[("origin", "media"), ("peer", "b"), ("result", "fail")]
        )
        .await
            >= 2.0
    );

    // Traffic goes to the others only.
    let before = served(&b);
    let mut by_peer = BTreeMap::new();
    for i in 0..30 {
        let (st, from, _) = get(&c, &format!("/x/{i}")).await;
        assert_eq!(st, 200);
        *by_peer.entry(from).or_insert(0) += 1;
    }
    assert_eq!(served(&b), before, "the down peer gets nothing");
    assert_eq!(
        by_peer.keys().cloned().collect::<Vec<_>>(),
        ["media/a", "media/c"],
        "{by_peer:?}"
    );

    // Fixed (the check is case-insensitive): up again, and served.
    b.route("/hc", Reply::new(200, "all OK"));
    wait_states(&admin, &[("media", "b", "up")], Duration::from_secs(10)).await;
    let before = served(&b);
    for i in 0..30 {
        assert_eq!(get(&c, &format!("/y/{i}")).await.0, 200);
    }
    assert!(served(&b) >= before + 5, "b is back in rotation");

    // One log line per state change, none for the steady states in between.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(log_lines(&c, "peer `b` is down"), 1, "{}", c.stderr());
    assert_eq!(log_lines(&c, "peer `b` is up"), 1, "{}", c.stderr());
    assert_eq!(log_lines(&c, "peer `a` is"), 0);
    assert_eq!(log_lines(&c, "peer `c` is"), 0);
}

#[tokio::test]
async fn signed_checks_pass_and_a_peer_with_wrong_credentials_is_down() {
    let good = S3Server::signed();
    let bad = S3Server::signed();
    for s in [&good, &bad] {
        s.put_file("bucket", "health.txt", "OK\n");
        s.put_file("bucket", "obj.txt", "object");
    }
    let s3 = |env: &str| {
        format!(", s3: {{region: us-east-1, access_key_env: {env}_AK, secret_key_env: {env}_SK}}")
    };
    let yaml = config(
        &[origin(
            "media",
            &[
                peer("good", &good.bucket_url("bucket"), &s3("GOOD")),
                peer("bad", &bad.bucket_url("bucket"), &s3("BAD")),
            ],
            "    health: {path: /health.txt, expected_body: OK, interval: 200ms, timeout: 150ms, rise: 1, fall: 1}\n",
        )],
        "{main: media}",
    );
    let port = free_port();
    let yaml =
        format!("{yaml}admin: {{addr: \"127.0.0.1:{port}\", token_env: CASCADE_ADMIN_TOKEN}}\n");
    let admin = format!("http://127.0.0.1:{port}");
    let c = Cascade::builder(&yaml)
        .env("CASCADE_ADMIN_TOKEN", TOKEN)
        .test_credentials("GOOD_AK", "GOOD_SK")
        .env("BAD_AK", ACCESS_KEY)
        .env("BAD_SK", "not-the-secret-key")
        .start();
    wait_states(&admin, &[("media", "bad", "down")], Duration::from_secs(10)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let doc = loop {
        // Peers start up: wait for the good one's check to have passed.
        let doc = status(&admin).await;
        if peer_status(&doc, "media", "good")["last_check"]["ok"] == true {
            break doc;
        }
        assert!(Instant::now() < deadline, "{doc:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(peer_status(&doc, "media", "good")["state"], "up");
    assert_eq!(peer_status(&doc, "media", "bad")["state"], "down");
    let bad_check = &peer_status(&doc, "media", "bad")["last_check"];
    assert_eq!(bad_check["detail"], "status 403", "{bad_check}");
    // The checks were signed GETs of the bucket's object.
    let checks = good.stats.requests();
    let check = checks
        .iter()
        .find(|r| r.uri == "/bucket/health.txt")
        .expect("a check reached the good peer");
    assert!(check
        .header("authorization")
        .starts_with("AWS4-HMAC-SHA256 "));
    // Requests go to the good peer only.
    for _ in 0..10 {
        let (st, from, body) = get(&c, "/obj.txt").await;
        assert_eq!(
            (st, from.as_str(), body.as_str()),
            (200, "media/good", "object")
        );
    }
    assert!(bad
        .stats
        .requests()
        .iter()
        .all(|r| r.uri == "/bucket/health.txt"));
}

// ---------------------------------------------------------------------------------------------
// 3. Balancing
// ---------------------------------------------------------------------------------------------

/// `n` GETs of distinct keys over `workers` concurrent loops; counts by `X-Served-From`.
async fn spread(c: &Cascade, n: usize, workers: usize) -> HashMap<String, usize> {
    let cl = client();
    let counts = Arc::new(Mutex::new(HashMap::new()));
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let (cl, counts) = (cl.clone(), counts.clone());
            let base = c.url("/k/");
            tokio::spawn(async move {
                for i in (w..n).step_by(workers) {
                    let r = cl.get(format!("{base}{i}")).send().await.unwrap();
                    assert_eq!(r.status(), 200);
                    *counts
                        .lock()
                        .unwrap()
                        .entry(header(&r, "x-served-from"))
                        .or_insert(0) += 1;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    Arc::try_unwrap(counts).unwrap().into_inner().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_round_robin_follows_the_weights() {
    let peers: Vec<HttpOrigin> = ["a", "b", "c"].iter().map(|n| live_peer(n)).collect();
    let weights = [3, 1, 2];
    let lines: Vec<String> = ["a", "b", "c"]
        .iter()
        .zip(&peers)
        .zip(weights)
        .map(|((n, o), w)| peer(n, &o.url(""), &format!(", weight: {w}")))
        .collect();
    let c = Cascade::start(&config(
        &[origin("media", &lines, "    balance: round_robin\n")],
        "{main: media}",
    ));
    let n = 3000;
    let counts = spread(&c, n, 4).await;
    for (name, w) in ["a", "b", "c"].iter().zip(weights) {
        let want = n * w / 6;
        let got = counts.get(&format!("media/{name}")).copied().unwrap_or(0);
        assert!(
            got.abs_diff(want) * 10 <= want,
            "{name}: {got} of {n}, want {want} ±10%: {counts:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_outstanding_sends_most_requests_to_the_fast_peer() {
    let fast = live_peer("fast");
    let slow = HttpOrigin::start();
    slow.set_default(Reply::new(200, "slow").delay(Duration::from_millis(300)));
    let c = Cascade::start(&config(
        &[origin(
            "media",
            &[
                peer("fast", &fast.url(""), ""),
                peer("slow", &slow.url(""), ""),
            ],
            "    balance: least_outstanding\n",
        )],
        "{main: media}",
    ));
    // 8 concurrent clients for about two seconds (at most 400 requests each).
    let cl = client();
    let deadline = Instant::now() + Duration::from_secs(2);
    let counts = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
    let tasks: Vec<_> = (0..8)
        .map(|w| {
            let (cl, counts) = (cl.clone(), counts.clone());
            let base = c.url("/lo/");
            tokio::spawn(async move {
                for i in 0..400 {
                    if Instant::now() > deadline {
                        break;
                    }
                    let r = cl.get(format!("{base}{w}-{i}")).send().await.unwrap();
                    assert_eq!(r.status(), 200);
                    *counts
                        .lock()
                        .unwrap()
                        .entry(header(&r, "x-served-from"))
                        .or_insert(0) += 1;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let counts = counts.lock().unwrap();
    let f = counts.get("media/fast").copied().unwrap_or(0);
    let s = counts.get("media/slow").copied().unwrap_or(0);
    // Round robin would give each half; the slow peer holds its requests 300 ms.
    assert!(s > 0, "the slow peer is still used: {counts:?}");
    assert!(f >= 4 * s, "fast {f}, slow {s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashing_keeps_each_key_on_one_peer_and_a_new_peer_takes_about_a_quarter() {
    let names = ["a", "b", "c", "d"];
    let peers: Vec<HttpOrigin> = names.iter().map(|n| live_peer(n)).collect();
    let lines: Vec<String> = names
        .iter()
        .zip(&peers)
        .map(|(n, o)| peer(n, &o.url(""), ""))
        .collect();
    let three = Cascade::start(&config(
        &[origin("media", &lines[..3], "    balance: hash\n")],
        "{main: media}",
    ));
    // The fourth peer listed first: order does not matter, names do.
    let reordered = [
        lines[3].clone(),
        lines[2].clone(),
        lines[0].clone(),
        lines[1].clone(),
    ];
    let four = Cascade::start(&config(
        &[origin("media", &reordered, "    balance: hash\n")],
        "{main: media}",
    ));
    let keys = 400;
    let owner = |c: &Cascade| {
        let urls: Vec<String> = (0..keys).map(|i| c.url(&format!("/v/{i}.mp4"))).collect();
        async move {
            let cl = client();
            let mut out = Vec::with_capacity(keys);
            for u in &urls {
                let r = cl.get(u).send().await.unwrap();
                assert_eq!(r.status(), 200);
                out.push(header(&r, "x-served-from"));
            }
            out
        }
    };
    let first = owner(&three).await;
    let again = owner(&three).await;
    assert_eq!(first, again, "a key goes to the same peer every time");
    let per_peer = |v: &[String]| {
        let mut m = BTreeMap::new();
        for p in v {
            *m.entry(p.clone()).or_insert(0) += 1;
        }
        m
    };
    let spread3 = per_peer(&first);
    assert_eq!(spread3.len(), 3, "{spread3:?}");
    assert!(spread3.values().all(|&n| n >= keys / 6), "{spread3:?}");

    let after = owner(&four).await;
    let mut moved = 0;
    for (i, (was, now)) in first.iter().zip(&after).enumerate() {
        if was != now {
            assert_eq!(
                now, "media/d",
                "key {i} moved from {was} to {now}, not to the new peer"
            );
            moved += 1;
        }
    }
    assert!(
        (keys * 12 / 100..=keys * 40 / 100).contains(&moved),
        "{moved} of {keys} keys moved (about a quarter expected): {:?}",
        per_peer(&after)
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Retries
// ---------------------------------------------------------------------------------------------

/// A peer answering every request `status` with the body `from NAME`.
fn failing_peer(name: &str, status: u16) -> HttpOrigin {
    let o = HttpOrigin::start();
    o.set_default(Reply::new(status, format!("from {name}")));
    o
}

#[tokio::test]
async fn a_retry_never_goes_to_a_peer_already_tried() {
    let names = ["a", "b", "c"];
    let peers: Vec<HttpOrigin> = names.iter().map(|n| failing_peer(n, 503)).collect();
    let lines: Vec<String> = names
        .iter()
        .zip(&peers)
        .map(|(n, o)| peer(n, &o.url(""), ""))
        .collect();
    let c = Cascade::start(&config(
        &[origin("media", &lines, "    retries: 5\n")],
        "{main: media}",
    ));
    // Two requests: four retries, within the budget's floor of five per window.
    for round in 1..=2u64 {
        let (st, from, body) = get(&c, &format!("/r/{round}")).await;
        assert_eq!(st, 503);
        // Exactly one attempt per peer, even with retries to spare.
        for (n, o) in names.iter().zip(&peers) {
            assert_eq!(
                o.stats.total(),
                round,
                "attempts on {n} after {round} requests"
            );
        }
        // The client gets the last peer's answer.
        let last = names
            .iter()
            .zip(&peers)
            .max_by_key(|(_, o)| o.stats.last().unwrap().seq)
            .unwrap()
            .0;
        assert_eq!(from, format!("media/{last}"));
        assert_eq!(body, format!("from {last}"));
    }
    assert_eq!(
        metric(
            &c,
            "cascade_retries_total",
            &[("origin", "media"), ("reason", "status")]
        )
        .await,
        4.0
    );
}

#[tokio::test]
async fn the_retry_budget_caps_extra_attempts() {
    let names = ["a", "b", "c"];
    let peers: Vec<HttpOrigin> = names.iter().map(|n| failing_peer(n, 503)).collect();
    let lines: Vec<String> = names
        .iter()
        .zip(&peers)
        .map(|(n, o)| peer(n, &o.url(""), ""))
        .collect();
    // No passive ejection: every peer stays usable, only the budget limits retries.
    let c = Cascade::start(&config(
        &[origin(
            "media",
            &lines,
            "    retries: 2\n    passive: {failures: 0}\n",
        )],
        "{main: media}",
    ));
    let requests = 100u64;
    let t0 = Instant::now();
    for i in 0..requests {
        assert_eq!(get(&c, &format!("/b/{i}")).await.0, 503);
    }
    let attempts: u64 = peers.iter().map(|o| o.stats.total()).sum();
    // The window is 10 s; this ran within one (else a second floor could apply).
    let windows = 1 + t0.elapsed().as_secs() / 10;
    assert!(
        attempts <= requests + requests / 5 + 5 * windows,
        "{attempts} attempts for {requests} requests"
    );
    assert!(
        attempts >= requests + 5,
        "retries were made up to the budget: {attempts}"
    );
    let retries = metric(&c, "cascade_retries_total", &[("origin", "media")]).await as u64;
    assert_eq!(retries, attempts - requests);
}

#[tokio::test]
async fn a_write_moves_to_another_peer_only_when_its_connection_failed() {
    // g1: the preferred peer's port is closed, the backup tier takes the PUT.
    let backup = HttpOrigin::start();
    backup.set_default(Reply::new(200, "stored"));
    // g2: the preferred peer answers 503 (after reading the body): the PUT ends there.
    let busy = failing_peer("busy", 503);
    let spare = HttpOrigin::start();
    spare.set_default(Reply::new(200, "stored"));
    let yaml = format!(
        "origins:\n{}{}groups:\n  g1: {{main: m1}}\n  g2: {{main: m2}}\n\
         routes:\n  - {{path: /one, group: g1}}\n  - {{path: /two, group: g2}}\n",
        origin(
            "m1",
            &[
                peer("closed", &closed_url(), ""),
                peer("backup", &backup.url(""), ", priority: 2"),
            ],
            "",
        ),
        origin(
            "m2",
            &[
                peer("busy", &busy.url(""), ""),
                peer("spare", &spare.url(""), ", priority: 2"),
            ],
            "",
        ),
    );
    let c = Cascade::start(&yaml);
    let body = "x".repeat(10_000);
    let r = client()
        .put(c.url("/one/w.bin"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-served-from"), "m1/backup");
    assert_eq!(backup.stats.count("PUT"), 1);
    assert_eq!(backup.stats.request_bytes(), body.len() as u64);
    assert_eq!(peer_outcomes(&c, "m1", "closed", "connect").await, 1);

    let r = client()
        .put(c.url("/two/w.bin"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.text().await.unwrap(), "from busy");
    assert_eq!(busy.stats.count("PUT"), 1);
    assert_eq!(busy.stats.request_bytes(), body.len() as u64);
    assert_eq!(
        spare.stats.total(),
        0,
        "a write that reached a peer is not retried"
    );
    // A GET on the same peers is retried on the spare.
    let (st, from, _) = get(&c, "/two/r.bin").await;
    assert_eq!((st, from.as_str()), (200, "m2/spare"));
}

#[tokio::test]
async fn a_write_whose_peer_died_after_taking_its_body_is_not_sent_elsewhere() {
    // The preferred peer takes the PUT's body and dies before answering, on a connection
    // cascade reused (Pingora's rule tries the same peer again on a reused connection: it
    // is refused now). The body was sent: the write must not move to the backup peer.
    let mut first = Some(HttpOrigin::start());
    let backup = HttpOrigin::start();
    backup.set_default(Reply::new(200, "stored"));
    let p = first.as_ref().unwrap();
    p.set_default(Reply::new(200, "warm"));
    p.route_method(
        "PUT",
        "/w.bin",
        Reply::new(200, "stored").delay(Duration::from_secs(5)),
    );
    let c = Cascade::start(&config(
        &[origin(
            "media",
            &[
                peer("first", &p.url(""), ""),
                peer("backup", &backup.url(""), ", priority: 2"),
            ],
            "",
        )],
        "{main: media}",
    ));
    // A pooled connection to `first`, which the PUT then reuses (a write's: reads have
    // cascade's own pool, writes Pingora's).
    let cl = client();
    let r = cl.put(c.url("/warm")).body("").send().await.unwrap();
    assert_eq!(
        (r.status().as_u16(), r.text().await.unwrap()),
        (200, "warm".into())
    );
    let body = "w".repeat(10_000);
    let put = tokio::spawn({
        let (cl, url, body) = (cl.clone(), c.url("/w.bin"), body.clone());
        async move {
            let r = cl.put(url).body(body).send().await.unwrap();
            (r.status().as_u16(), header(&r, "x-served-from"))
        }
    });
    let p = first.as_ref().unwrap();
    let len = body.len() as u64;
    assert!(
        eventually(Duration::from_secs(10), || p.stats.request_bytes() == len).await,
        "the PUT's body never reached the first peer"
    );
    assert_eq!(p.stats.total(), 2, "the warm-up PUT, then the PUT");
    let dying = first.take().unwrap();
    tokio::task::spawn_blocking(move || drop(dying))
        .await
        .unwrap();
    let (status, from) = put.await.unwrap();
    assert_eq!(
        backup.stats.writes(),
        0,
        "the PUT went to the backup after its body reached the first peer (answered {status} from {from:?})"
    );
    assert_eq!(status, 502);
    // The PUT went over the reused connection: Pingora's rule tried the same peer again.
    assert_eq!(peer_outcomes(&c, "media", "first", "connect").await, 1);
}

// ---------------------------------------------------------------------------------------------
// 5. Failover
// ---------------------------------------------------------------------------------------------

const FAST_HEALTH: &str =
    "    health: {path: /hc, interval: 200ms, timeout: 150ms, rise: 1, fall: 1}\n";

#[tokio::test]
async fn reads_fail_over_when_main_is_down_and_writes_get_503() {
    let archive = live_peer("archived");
    let yaml = format!(
        "origins:\n{}{}  archive: {{url: \"{}\"}}\ngroups:\n  \
         g: {{main: media, fallbacks: [archive], failover: true}}\n  \
         cold: {{main: unmonitored, fallbacks: [archive], failover: true}}\n\
         routes:\n  - {{path: /, group: g}}\n  - {{path: /cold, group: cold}}\n",
        origin(
            "media",
            &[peer("a", &closed_url(), ""), peer("b", &closed_url(), "")],
            FAST_HEALTH,
        ),
        origin(
            "unmonitored",
            &[peer("a", &closed_url(), ""), peer("b", &closed_url(), "")],
            "",
        ),
        archive.url(""),
    );
    let (c, admin) = start_with_admin(&yaml);
    wait_states(
        &admin,
        &[("media", "a", "down"), ("media", "b", "down")],
        Duration::from_secs(10),
    )
    .await;
    let attempts_before = metric(&c, "cascade_peer_requests_total", &[("origin", "media")]).await;
    for i in 0..5 {
        let r = client()
            .get(c.url(&format!("/f/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-served-from"), "archive");
        assert_eq!(header(&r, "x-served-from-role"), "fallback");
        assert_eq!(r.text().await.unwrap(), "archived");
    }
    assert_eq!(
        metric(&c, "cascade_failovers_total", &[("group", "g")]).await,
        5.0
    );
    assert_eq!(
        metric(&c, "cascade_peer_requests_total", &[("origin", "media")]).await,
        attempts_before,
        "no attempt on the down peers"
    );

    // A write cannot fail over: 503 at once, with Retry-After.
    let r = client()
        .put(c.url("/f/w.bin"))
        .body("data")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let retry_after: u64 = header(&r, "retry-after").parse().expect("Retry-After");
    assert!(retry_after >= 1, "{retry_after}");
    assert_eq!(archive.stats.writes(), 0);

    // Without a monitor: the closed ports are tried, then the fallback answers.
    let r = client().get(c.url("/cold/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-served-from"), "archive");
    assert_eq!(
        metric(&c, "cascade_failovers_total", &[("group", "cold")]).await,
        1.0
    );
    assert_eq!(
        metric(
            &c,
            "cascade_peer_requests_total",
            &[("origin", "unmonitored"), ("outcome", "connect")]
        )
        .await,
        2.0,
        "each peer tried once"
    );
}

#[tokio::test]
async fn with_every_peer_down_a_request_is_a_fast_503_without_connecting() {
    let a = live_peer("a");
    let b = live_peer("b");
    let archive = live_peer("archived");
    for o in [&a, &b, &archive] {
        o.route("/hc", Reply::new(500, "sick"));
    }
    let yaml = format!(
        "origins:\n{}  archive:\n    url: \"{}\"\n{FAST_HEALTH}groups:\n  \
         g: {{main: media, fallbacks: [archive], failover: true}}\nroutes:\n  - {{path: /, group: g}}\n",
        origin(
            "media",
            &[peer("a", &a.url(""), ""), peer("b", &b.url(""), "")],
            FAST_HEALTH,
        ),
        archive.url(""),
    );
    let (c, admin) = start_with_admin(&yaml);
    // A `url:` origin's one peer is named by its host and port.
    let archive_peer = archive.authority();
    wait_states(
        &admin,
        &[
            ("media", "a", "down"),
            ("media", "b", "down"),
            ("archive", &archive_peer, "down"),
        ],
        Duration::from_secs(10),
    )
    .await;
    let attempts_before = metric(&c, "cascade_peer_requests_total", &[]).await;
    for m in ["GET", "HEAD", "PUT"] {
        let r = client()
            .request(
                reqwest::Method::from_bytes(m.as_bytes()).unwrap(),
                c.url("/x"),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503, "{m}");
        let retry_after: u64 = header(&r, "retry-after")
            .parse()
            .unwrap_or_else(|_| panic!("{m}: no Retry-After"));
        assert!((1..=3600).contains(&retry_after));
    }
    assert_eq!(
        served(&a) + served(&b) + served(&archive),
        0,
        "no connection"
    );
    assert_eq!(
        metric(&c, "cascade_peer_requests_total", &[]).await,
        attempts_before
    );
}

#[tokio::test]
async fn stale_if_error_serves_the_cached_copy_while_every_peer_is_down() {
    let a = live_peer("a");
    let b = live_peer("b");
    for o in [&a, &b] {
        o.route(
            "/s.txt",
            Reply::new(200, "cached copy").header("cache-control", "max-age=1"),
        );
    }
    let yaml = format!(
        "{}cache: {{memory: 16MiB, stale_if_error: 1h}}\n",
        config(
            &[origin(
                "media",
                &[peer("a", &a.url(""), ""), peer("b", &b.url(""), "")],
                FAST_HEALTH,
            )],
            "{main: media}",
        )
    );
    let (c, admin) = start_with_admin(&yaml);
    let r = client().get(c.url("/s.txt")).send().await.unwrap();
    assert_eq!(header(&r, "x-cache"), "MISS");
    assert_eq!(r.text().await.unwrap(), "cached copy");
    for o in [&a, &b] {
        o.route("/hc", Reply::new(500, "sick"));
    }
    wait_states(
        &admin,
        &[("media", "a", "down"), ("media", "b", "down")],
        Duration::from_secs(10),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1100)).await; // expired
    let before = served(&a) + served(&b);
    let r = client().get(c.url("/s.txt")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-cache"), "STALE");
    assert_eq!(r.text().await.unwrap(), "cached copy");
    // Not cached: the fast 503.
    let r = client().get(c.url("/other.txt")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(!header(&r, "retry-after").is_empty());
    assert_eq!(served(&a) + served(&b), before, "no connection");
}

// ---------------------------------------------------------------------------------------------
// 6. The admin API
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn drain_enable_and_status_match_what_the_peers_saw() {
    let names = ["a", "b", "c"];
    let peers: Vec<HttpOrigin> = names.iter().map(|n| live_peer(n)).collect();
    for o in &peers {
        o.route(
            "/slow",
            Reply::new(200, "slow").delay(Duration::from_millis(1500)),
        );
    }
    let lines: Vec<String> = names
        .iter()
        .zip(&peers)
        .map(|(n, o)| peer(n, &o.url(""), ""))
        .collect();
    let (c, admin) = start_with_admin(&config(
        &[origin(
            "media",
            &lines,
            "    passive: {failures: 3, cooldown: 60s}\n",
        )],
        "{main: media}",
    ));
    let consistent = |doc: &Value, peers: &[HttpOrigin]| {
        for (n, o) in names.iter().zip(peers) {
            let p = peer_status(doc, "media", n);
            assert_eq!(p["requests"], o.stats.total(), "{n}: {p}");
        }
    };
    for i in 0..30 {
        assert_eq!(get(&c, &format!("/s/{i}")).await.0, 200);
    }
    let doc = settled(&admin).await;
    consistent(&doc, &peers);
    for (n, o) in names.iter().zip(&peers) {
        let p = peer_status(&doc, "media", n);
        assert_eq!(p["state"], "up");
        assert_eq!(p["in_flight"], 0);
        assert_eq!(p["served_from"], format!("media/{n}"));
        assert_eq!(o.stats.total(), 10, "round robin");
    }
    assert_eq!(doc["ready"], true, "nothing monitored: ready at once");

    // The token is required.
    let cl = client();
    let r = cl.get(format!("{admin}/status")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = cl
        .post(format!("{admin}/origins/media/peers/a/drain"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = cl
        .post(format!("{admin}/origins/media/peers/a/drain"))
        .bearer_auth("wrong-token-wrong-token-00")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        peer_status(&status(&admin).await, "media", "a")["state"],
        "up"
    );

    // Drain: no new requests.
    let r = cl
        .post(format!("{admin}/origins/media/peers/a/drain"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(v["state"], "draining");
    assert_eq!(
        peer_status(&status(&admin).await, "media", "a")["state"],
        "draining"
    );
    assert_eq!(
        metric(&c, "cascade_peer_up", &[("origin", "media"), ("peer", "a")]).await,
        0.0
    );
    let a_before = peers[0].stats.total();
    for i in 0..20 {
        let (st, from, _) = get(&c, &format!("/d/{i}")).await;
        assert_eq!(st, 200);
        assert_ne!(from, "media/a");
    }
    assert_eq!(
        peers[0].stats.total(),
        a_before,
        "a drained peer gets nothing"
    );
    // Enable: back in rotation.
    let r = cl
        .post(format!("{admin}/origins/media/peers/a/enable"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        peer_status(&status(&admin).await, "media", "a")["state"],
        "up"
    );
    for i in 0..30 {
        assert_eq!(get(&c, &format!("/e/{i}")).await.0, 200);
    }
    assert_eq!(peers[0].stats.total(), a_before + 10);
    // Settled first: a request's in-flight count ends a moment after its answer.
    consistent(&settled(&admin).await, &peers);

    // In flight: one slow request shows on exactly one peer while it runs.
    let slow = tokio::spawn({
        let url = c.url("/slow");
        async move { client().get(url).send().await.unwrap().status() }
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    let busy = loop {
        let doc = status(&admin).await;
        let flying: Vec<(&str, u64)> = names
            .iter()
            .map(|n| {
                (
                    *n,
                    peer_status(&doc, "media", n)["in_flight"].as_u64().unwrap(),
                )
            })
            .filter(|(_, f)| *f > 0)
            .collect();
        if let [(n, 1)] = flying[..] {
            break n;
        }
        assert!(flying.is_empty(), "{flying:?}");
        assert!(Instant::now() < deadline, "the slow request never showed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let ix = names.iter().position(|n| *n == busy).unwrap();
    // The metric is read from the same count the balancer reads: 1 on the busy peer, every
    // other peer's series there at 0.
    let text = c.metrics().await;
    for n in names {
        assert_eq!(
            metric_sum(
                &text,
                "cascade_peer_in_flight",
                &[("origin", "media"), ("peer", n)]
            ),
            Some(if n == busy { 1.0 } else { 0.0 }),
            "{n}"
        );
    }
    // In flight from the moment the peer is chosen; the request reaches it a moment later.
    assert!(
        eventually(Duration::from_secs(5), || peers[ix]
            .stats
            .last()
            .is_some_and(|r| r.uri == "/slow"))
        .await,
        "the slow request went to another peer than the one it was in flight on"
    );
    assert_eq!(
        metric(
            &c,
            "cascade_peer_in_flight",
            &[("origin", "media"), ("peer", busy)]
        )
        .await,
        1.0
    );
    assert_eq!(slow.await.unwrap(), 200);
    let doc = settled(&admin).await;
    for n in names {
        assert_eq!(peer_status(&doc, "media", n)["in_flight"], 0);
    }

    // Passive ejection: c fails three times in a row; clients never see it.
    peers[2].set_default(Reply::new(503, "sick"));
    let deadline = Instant::now() + Duration::from_secs(10);
    for i in 0.. {
        assert_eq!(get(&c, &format!("/j/{i}")).await.0, 200);
        if peer_status(&status(&admin).await, "media", "c")["state"] == "ejected" {
            break;
        }
        assert!(i < 100 && Instant::now() < deadline, "c never ejected");
    }
    let doc = status(&admin).await;
    let pc = peer_status(&doc, "media", "c");
    assert_eq!(pc["ejections"], 1, "{pc}");
    assert_eq!(pc["failures"], 3, "{pc}");
    assert!(pc["ejected_until"].as_u64().unwrap() > unix_now() * 1000);
    consistent(&doc, &peers);
    assert_eq!(
        metric(
            &c,
            "cascade_peer_ejections_total",
            &[("origin", "media"), ("peer", "c")]
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            &c,
            "cascade_peer_requests_total",
            &[("origin", "media"), ("peer", "c"), ("outcome", "status")]
        )
        .await,
        3.0
    );
    let c_before = peers[2].stats.total();
    for i in 0..10 {
        assert_eq!(get(&c, &format!("/k/{i}")).await.0, 200);
    }
    assert_eq!(
        peers[2].stats.total(),
        c_before,
        "an ejected peer gets nothing"
    );
}

#[tokio::test]
async fn readyz_waits_for_the_first_round_of_checks() {
    let a = live_peer("a");
    let b = live_peer("b");
    // The first check takes 2 s: /readyz must say 503 meanwhile.
    for o in [&a, &b] {
        o.route("/hc", Reply::new(200, "OK").delay(Duration::from_secs(2)));
    }
    let (_c, admin) = start_with_admin(&config(
        &[origin(
            "media",
            &[peer("a", &a.url(""), ""), peer("b", &b.url(""), "")],
            "    health: {path: /hc, interval: 10s, timeout: 5s}\n",
        )],
        "{main: media}",
    ));
    let cl = client();
    let readyz = || async {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match cl.get(format!("{admin}/readyz")).send().await {
                Ok(r) => return r.status().as_u16(),
                Err(e) => assert!(Instant::now() < deadline, "admin not answering: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    assert_eq!(readyz().await, 503, "not ready before the first checks");
    assert_eq!(status(&admin).await["ready"], false);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if readyz().await == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(a.stats.count("GET") >= 1 && b.stats.count("GET") >= 1);
    let doc = status(&admin).await;
    assert_eq!(doc["ready"], true);
    assert_eq!(peer_status(&doc, "media", "a")["last_check"]["ok"], true);
}

// ---------------------------------------------------------------------------------------------
// 7. DNS refresh
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn dns_refresh_follows_a_moved_peer_and_keeps_the_last_good_address() {
    let port = free_port();
    let first = HttpOrigin::start_on(SocketAddr::from(([127, 0, 0, 2], port)));
    let second = HttpOrigin::start_on(SocketAddr::from(([127, 0, 0, 3], port)));
    first.set_default(Reply::new(200, "first"));
    second.set_default(Reply::new(200, "second"));
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost\n127.0.0.2 peer.test\n").unwrap();
    let yaml = format!(
        "origins:\n  media:\n    peers:\n{}{}    dns_refresh: 200ms\n\
         groups:\n  g: {{main: media}}\nroutes:\n  - {{path: /, group: g}}\n",
        peer("moving", &format!("http://peer.test:{port}"), ""),
        "",
    );
    let c = Cascade::builder(&yaml).hosts_file(&hosts).start();
    let body = |c: &Cascade| {
        let url = c.url("/o.txt");
        async move {
            client()
                .get(url)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    assert_eq!(body(&c).await, "first");
    assert_eq!(
        first.stats.last().unwrap().header("host"),
        format!("peer.test:{port}")
    );

    rewrite_in_place(&hosts, "127.0.0.1 localhost\n127.0.0.3 peer.test\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    while body(&c).await != "second" {
        assert!(Instant::now() < deadline, "never followed the new address");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let n = first.stats.total();
    for _ in 0..5 {
        assert_eq!(body(&c).await, "second");
    }
    assert_eq!(first.stats.total(), n, "nothing goes to the old address");
    assert!(log_lines(&c, "now resolves to [127.0.0.3:") >= 1);

    // The name stops resolving: the last good address stays.
    rewrite_in_place(&hosts, "127.0.0.1 localhost\n");
    assert!(
        eventually(Duration::from_secs(10), || log_lines(
            &c,
            "cannot resolve peer.test"
        ) + log_lines(
            &c,
            "peer.test resolved to nothing"
        ) >= 2)
        .await,
        "{}",
        c.stderr_tail(20)
    );
    for _ in 0..5 {
        assert_eq!(body(&c).await, "second");
    }
    assert_eq!(first.stats.total(), n);
}

// ---------------------------------------------------------------------------------------------
// 8. Config errors
// ---------------------------------------------------------------------------------------------

const PEERS_BASE: &str = "\
listen:
  - addr: 127.0.0.1:18080
origins:
  media:
    peers:
      - {url: \"http://127.0.0.1:9/b\", name: a}
      - {url: \"http://127.0.0.1:10/b\", name: b}
    balance: round_robin
    health: {path: /hc, expected_body: OK}
groups:
  g: {main: media}
routes:
  - {path: /, group: g}
";

#[test]
fn the_base_peers_config_is_valid() {
    let (code, stderr, _, _dir) = check(PEERS_BASE);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn config_errors_of_peers_are_located() {
    let swap = |from: &str, to: &str| {
        assert!(PEERS_BASE.contains(from), "{from}");
        PEERS_BASE.replace(from, to)
    };
    assert_located(
        &swap("    balance: round_robin\n", "    balance: fastest  # <-\n"),
        "origins.media.balance",
        &["fastest"],
    );
    assert_located(
        &swap(
            "    peers:\n      - {url: \"http://127.0.0.1:9/b\", name: a}\n      - {url: \"http://127.0.0.1:10/b\", name: b}\n",
            "    peers:  # <-\n      - {url: \"http://127.0.0.1:9/b\", name: a, weight: 0}\n      - {url: \"http://127.0.0.1:10/b\", name: b, weight: 0}\n",
        ),
        "origins.media.peers",
        &["weight 0"],
    );
    assert_located(
        &swap(
            "      - {url: \"http://127.0.0.1:10/b\", name: b}\n",
            "      - {url: \"http://127.0.0.1:10/b\", name: a}  # <-\n",
        ),
        "origins.media.peers",
        &["`a`", "twice"],
    );
    assert_located(
        &swap(
            "    health: {path: /hc, expected_body: OK}\n",
            "    health:\n      path: /hc\n      method: HEAD  # <-\n      expected_body: OK\n",
        ),
        "origins.media.health.method",
        &["HEAD"],
    );
    assert_located(
        &swap(
            "  media:\n    peers:\n",
            "  media:  # <-\n    url: \"http://127.0.0.1:9/b\"\n    peers:\n",
        ),
        "origins.media",
        &["`url`", "`peers`"],
    );
}
