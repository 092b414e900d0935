//! What a timed step costs on a hot path: a clock read and a histogram observation, as the
//! plugin host does after every plugin callback (three per plugin per request); and what a
//! finished request's counters and duration cost (`RequestMetrics::finish`).
//!
//! ```sh
//! cargo bench --bench metrics
//! ```
//!
//! Prints ns per operation, on one thread and on two threads observing the same series at
//! once (a server's worker threads running the same route): `std::time::Instant::now`
//! against [`cascade::metrics::now`] (the TSC), prometheus's `Histogram::observe` against
//! cascade's [`ShardedHistogram`], and the two together as the plugin host uses them; a
//! request's three counters and its duration as prometheus's `with_label_values` found them
//! on every request against [`RequestMetrics`]; an attempt's peer counts with and without
//! the in-flight gauge kept beside the peer's own count.

use std::time::{Duration, Instant};

use cascade::metrics::{
    now, start_clock, Finished, RequestMetrics, ShardedHistogram, ShardedHistogramVec,
};
use prometheus::{exponential_buckets, Histogram, HistogramOpts};

/// Operations per measurement and thread (`BENCH_ITERS` overrides).
fn iters() -> u64 {
    std::env::var("BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000_000)
}

/// ns per call of `op` (given the iteration number), the mean over `threads` threads
/// calling it at once.
fn per_op(threads: usize, op: &(dyn Fn(u64) + Sync)) -> f64 {
    let n = iters();
    std::thread::scope(|s| {
        let all: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(move || {
                    let t0 = Instant::now();
                    for i in 0..n {
                        op(std::hint::black_box(i));
                    }
                    t0.elapsed().as_nanos() as f64 / n as f64
                })
            })
            .collect();
        all.into_iter()
            .map(|t| t.join().expect("bench thread"))
            .sum::<f64>()
            / threads as f64
    })
}

fn main() {
    start_clock();
    // The plugin callbacks' buckets.
    let bounds = exponential_buckets(0.000_002, 2.0, 16).expect("buckets");
    let theirs = Histogram::with_opts(HistogramOpts::new("t", "t").buckets(bounds.clone()))
        .expect("histogram");
    let ours: std::sync::Arc<ShardedHistogram> =
        ShardedHistogramVec::new("t", "t", &["x"], bounds).with_label_values(&["x"]);
    // Durations spread over the first buckets, as callbacks' are.
    let d = |i: u64| Duration::from_nanos(1_000 + (i % 7) * 1_500);

    println!(
        "ns per operation ({} per thread; 1 thread | 2 threads on one series)",
        iters()
    );
    // A request's metrics as cascade counted them before (prometheus counters found by
    // `with_label_values` on every request) and now (`RequestMetrics`: per-thread memo, sharded
    // counters); both observe the request's duration in the route's sharded histogram.
    let reqs = prometheus::IntCounterVec::new(
        prometheus::Opts::new("r", "r"),
        &["route", "method", "status", "served_from"],
    )
    .expect("counter");
    let cache =
        prometheus::IntCounterVec::new(prometheus::Opts::new("c", "c"), &["route", "status"])
            .expect("counter");
    let bytes = prometheus::IntCounterVec::new(prometheus::Opts::new("b", "b"), &["status"])
        .expect("counter");
    let request = RequestMetrics::new(["images", "video"].into_iter(), ["main", "fb"].into_iter());
    let finished = Finished {
        route: Some(0),
        method: &http::Method::GET,
        status: 200,
        served: Some(0),
        cache: Some(("HIT", 4096)),
        elapsed: Duration::from_micros(300),
    };
    // An attempt on a peer: the peer's own counts (in flight, which the balancer reads, and
    // requests) and its metrics: before, an in-flight gauge kept beside them and a
    // prometheus outcome counter; now, the gauge read from the peer's count at scrape and a
    // sharded outcome counter.
    let peer = cascade::upstream::PeerState::default();
    let in_flight = prometheus::IntGauge::new("f", "f").expect("gauge");
    let outcome = prometheus::IntCounter::new("o", "o").expect("counter");
    let sharded_outcome =
        cascade::metrics::ShardedCounterVec::new("o", "o", &["outcome"]).with_label_values(&["ok"]);
    let rows: [(&str, &(dyn Fn(u64) + Sync)); 10] = [
        ("an attempt's peer counts before", &|_| {
            peer.enter();
            in_flight.inc();
            peer.leave();
            in_flight.dec();
            outcome.inc();
        }),
        ("an attempt's peer counts now", &|_| {
            peer.enter();
            peer.leave();
            sharded_outcome.inc();
        }),
        ("a request's metrics before", &|_| {
            reqs.with_label_values(&["images", "GET", "2xx", "main"])
                .inc();
            cache.with_label_values(&["images", "HIT"]).inc();
            bytes.with_label_values(&["HIT"]).inc_by(4096);
            ours.observe(finished.elapsed);
        }),
        ("a request's metrics now", &|_| request.finish(&finished)),
        ("std Instant::now", &|_| {
            std::hint::black_box(Instant::now());
        }),
        ("metrics::now (TSC)", &|_| {
            std::hint::black_box(now());
        }),
        ("prometheus Histogram::observe", &|i| {
            theirs.observe(d(i).as_secs_f64())
        }),
        ("ShardedHistogram::observe", &|i| ours.observe(d(i))),
        ("step before: Instant + prometheus", &|_| {
            let t0 = Instant::now();
            theirs.observe(t0.elapsed().as_secs_f64());
        }),
        ("step now: TSC + sharded", &|_| {
            let t0 = now();
            ours.observe(now().saturating_duration_since(t0));
        }),
    ];
    for (name, op) in rows {
        let one = per_op(1, op);
        let two = per_op(2, op);
        println!("  {name:<36} {one:>6.1} | {two:>6.1}");
    }
}
