//! Histograms for paths taken many times per request, sharded per thread.
//!
//! prometheus's `Histogram::observe` does four atomic operations on cache lines that every
//! thread observing the series shares: ~21 ns on one thread, ~100–200 ns each when two
//! threads observe the same series (`cargo bench --bench metrics` on the 2-vCPU development
//! VM), and a chain of three plugins observes nine times per request. Here an observation
//! touches only the observing thread's own shard: a relaxed atomic add to its bucket (found
//! by comparing integer nanoseconds) and a compare-and-swap of its sum that nothing else
//! contends. Threads take shards round-robin on their first observation, two per core, and
//! stay correct when two share one. A scrape adds the shards up.
//!
//! Exported as a prometheus histogram: same name, labels, buckets, `_sum` and `_count`; the
//! `+Inf` bucket and `_count` are the same read, so buckets are always cumulative. A scrape
//! racing an observation may count it in the buckets and not yet in `_sum`, or the other
//! way round (prometheus's own histogram waits for in-flight observations instead); the
//! next scrape has it in both.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use parking_lot::Mutex;
use prometheus::core::{Collector, Desc};
use prometheus::proto;

/// The clock for timings observed here on hot paths: the CPU's invariant TSC where it has one
/// (~9 ns a read on the development VM, against ~23 ns for `std::time::Instant::now`), the
/// OS's monotonic clock otherwise. Calibrated once, on first use ([`start_clock`]).
static CLOCK: LazyLock<quanta::Clock> = LazyLock::new(quanta::Clock::new);

/// Calibrates the clock now (a few milliseconds, at most 200), so that no request does.
pub fn start_clock() {
    LazyLock::force(&CLOCK);
}

/// Now, on the TSC clock above. Take differences with `saturating_duration_since` (two
/// cores' TSCs may disagree by a little; quanta does not promise to saturate `-` in later
/// versions).
#[inline]
pub fn now() -> quanta::Instant {
    CLOCK.now()
}

/// Most buckets a sharded histogram takes (the `+Inf` bucket not counted).
pub const MAX_BUCKETS: usize = 22;

/// Shards per histogram: a power of two, two per thread that can run at once (at least 4, at
/// most 64: 16 KiB per series at most). The worker threads observe on every request, so they
/// are the first to take shards and each has its own; threads that observe later rarely
/// share one.
static SHARDS: LazyLock<usize> = LazyLock::new(|| {
    let threads = std::thread::available_parallelism().map_or(8, |n| n.get());
    (threads * 2).next_power_of_two().clamp(4, 64)
});

/// The next shard a thread takes when it first observes.
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// This thread's shard number (not yet reduced to a histogram's shard count).
#[inline]
fn shard_of_thread() -> usize {
    SHARD.with(|s| match s.get() {
        usize::MAX => {
            let n = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % 4096;
            s.set(n);
            n
        }
        n => n,
    })
}

/// One thread's counts: the buckets, `+Inf`, the sum. Aligned so that two shards never
/// share a cache line (128 bytes: adjacent-line prefetch pairs lines on x86).
#[repr(align(128))]
struct Shard {
    counts: [AtomicU64; MAX_BUCKETS + 1],
    /// The sum in seconds, an `f64`'s bits (as prometheus keeps it: integer nanoseconds
    /// would wrap after 2^64 ns, days for a busy route's request durations).
    sum: AtomicU64,
}

impl Shard {
    fn new() -> Shard {
        Shard {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }
}

/// The bounds of a family, in seconds (as exported) and in nanoseconds (as compared).
struct Bounds {
    seconds: Vec<f64>,
    ns: Vec<u64>,
}

/// One series (one set of label values).
pub struct ShardedHistogram {
    bounds: Arc<Bounds>,
    shards: Box<[Shard]>,
}

impl ShardedHistogram {
    fn new(bounds: Arc<Bounds>) -> ShardedHistogram {
        ShardedHistogram {
            bounds,
            shards: (0..*SHARDS).map(|_| Shard::new()).collect(),
        }
    }

    /// Counts one observation of `d`.
    #[inline]
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        // The first bound ≥ ns (prometheus's `le`); past the last one, `+Inf`.
        let bucket = self.bounds.ns.partition_point(|&b| b < ns);
        // The shard count is a power of two.
        let shard = &self.shards[shard_of_thread() & (self.shards.len() - 1)];
        shard.counts[bucket].fetch_add(1, Ordering::Relaxed);
        // A compare-and-swap on this thread's own line: it retries only when a thread sharing
        // the shard added at the same moment (or spuriously, on load-linked machines).
        let secs = ns as f64 * 1e-9;
        let mut cur = shard.sum.load(Ordering::Relaxed);
        while let Err(now) = shard.sum.compare_exchange_weak(
            cur,
            (f64::from_bits(cur) + secs).to_bits(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        ) {
            cur = now;
        }
    }

    /// Observations so far.
    pub fn sample_count(&self) -> u64 {
        self.totals().0.iter().sum()
    }

    /// The counts of every bucket (`+Inf` last, not cumulative) and the sum in seconds.
    fn totals(&self) -> (Vec<u64>, f64) {
        let mut counts = vec![0u64; self.bounds.ns.len() + 1];
        let mut sum = 0f64;
        for shard in self.shards.iter() {
            for (total, c) in counts.iter_mut().zip(&shard.counts) {
                *total += c.load(Ordering::Relaxed);
            }
            sum += f64::from_bits(shard.sum.load(Ordering::Relaxed));
        }
        (counts, sum)
    }

    fn proto(&self) -> proto::Histogram {
        let (counts, sum) = self.totals();
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(self.bounds.seconds.len());
        for (count, bound) in counts.iter().zip(&self.bounds.seconds) {
            cumulative += count;
            let mut b = proto::Bucket::default();
            b.set_cumulative_count(cumulative);
            b.set_upper_bound(*bound);
            buckets.push(b);
        }
        let mut h = proto::Histogram::default();
        // The text encoder writes `+Inf` from the count: every observation, the last
        // bucket's included, so it is never below a finite bucket.
        h.set_sample_count(counts.iter().sum());
        h.set_sample_sum(sum);
        h.set_bucket(buckets);
        h
    }
}

struct VecInner {
    desc: Desc,
    bounds: Arc<Bounds>,
    children: Mutex<BTreeMap<Vec<String>, Arc<ShardedHistogram>>>,
}

/// A family of [`ShardedHistogram`]s by label values, registered like a `HistogramVec`.
/// Looking a series up takes a lock: do it once (when a plugin or route is set up) and keep
/// the series, never per observation.
#[derive(Clone)]
pub struct ShardedHistogramVec {
    inner: Arc<VecInner>,
}

impl ShardedHistogramVec {
    /// Bounds in seconds, positive and increasing, at most `MAX_BUCKETS` (22) of them (a
    /// programming error otherwise: the families are static).
    pub fn new(name: &str, help: &str, labels: &[&str], bounds: Vec<f64>) -> ShardedHistogramVec {
        assert!(
            !bounds.is_empty() && bounds.len() <= MAX_BUCKETS,
            "{name}: 1 to {MAX_BUCKETS} buckets"
        );
        assert!(
            bounds.windows(2).all(|w| w[0] < w[1])
                && bounds.iter().all(|b| b.is_finite() && *b > 0.0),
            "{name}: bounds must be positive and increase"
        );
        let ns = bounds.iter().map(|s| (s * 1e9).round() as u64).collect();
        let desc = Desc::new(
            name.to_string(),
            help.to_string(),
            labels.iter().map(|l| l.to_string()).collect(),
            Default::default(),
        )
        .expect("static metric description");
        ShardedHistogramVec {
            inner: Arc::new(VecInner {
                desc,
                bounds: Arc::new(Bounds {
                    seconds: bounds,
                    ns,
                }),
                children: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    /// The series of these label values (created on first use).
    pub fn with_label_values(&self, values: &[&str]) -> Arc<ShardedHistogram> {
        assert_eq!(
            values.len(),
            self.inner.desc.variable_labels.len(),
            "{}: label values",
            self.inner.desc.fq_name
        );
        let key: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        self.inner
            .children
            .lock()
            .entry(key)
            .or_insert_with(|| Arc::new(ShardedHistogram::new(self.inner.bounds.clone())))
            .clone()
    }
}

impl Collector for ShardedHistogramVec {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.inner.desc]
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let desc = &self.inner.desc;
        let children: Vec<(Vec<String>, Arc<ShardedHistogram>)> = self
            .inner
            .children
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let metrics = children
            .iter()
            .map(|(values, h)| {
                let mut labels: Vec<proto::LabelPair> = desc
                    .variable_labels
                    .iter()
                    .zip(values)
                    .map(|(name, value)| {
                        let mut p = proto::LabelPair::default();
                        p.set_name(name.clone());
                        p.set_value(value.clone());
                        p
                    })
                    .collect();
                labels.sort();
                let mut m = proto::Metric::default();
                m.set_label(labels);
                m.set_histogram(h.proto());
                m
            })
            .collect();
        let mut family = proto::MetricFamily::default();
        family.set_name(desc.fq_name.clone());
        family.set_help(desc.help.clone());
        family.set_field_type(proto::MetricType::HISTOGRAM);
        family.set_metric(metrics);
        vec![family]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{Encoder, HistogramOpts, HistogramVec, Registry, TextEncoder};

    fn text(r: &Registry) -> String {
        let mut out = Vec::new();
        TextEncoder::new().encode(&r.gather(), &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    /// The same observations give the same exposition as prometheus's own histogram: bucket
    /// edges (`le` inclusive), `+Inf`, `_count` and `_sum`, labels sorted.
    #[test]
    fn exports_what_a_prometheus_histogram_exports() {
        let bounds = prometheus::exponential_buckets(0.000_002, 2.0, 16).unwrap();
        let ours = Registry::new();
        let theirs = Registry::new();
        let v = ShardedHistogramVec::new("t_seconds", "help", &["plugin", "phase"], bounds.clone());
        ours.register(Box::new(v.clone())).unwrap();
        let p = HistogramVec::new(
            HistogramOpts::new("t_seconds", "help").buckets(bounds.clone()),
            &["plugin", "phase"],
        )
        .unwrap();
        theirs.register(Box::new(p.clone())).unwrap();
        // Every bound exactly, a nanosecond either side, zero, and far past the last.
        let mut values = vec![Duration::ZERO, Duration::from_secs(3600)];
        for b in &bounds {
            let ns = (b * 1e9).round() as u64;
            values.extend([ns - 1, ns, ns + 1].map(Duration::from_nanos));
        }
        for (labels, n) in [(["b", "request"], 1), (["a", "log"], 3)] {
            let (ours, theirs) = (v.with_label_values(&labels), p.with_label_values(&labels));
            for _ in 0..n {
                for d in &values {
                    ours.observe(*d);
                    theirs.observe(d.as_secs_f64());
                }
            }
            assert_eq!(ours.sample_count(), theirs.get_sample_count());
        }
        // `_sum`s differ in the last digits (f64 seconds added up against integer ns).
        let strip = |s: String| -> String {
            s.lines()
                .filter(|l| !l.contains("_sum"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(strip(text(&ours)), strip(text(&theirs)));
        let sum = |s: &str| -> Vec<f64> {
            s.lines()
                .filter(|l| l.contains("_sum"))
                .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
                .collect()
        };
        for (a, b) in sum(&text(&ours)).iter().zip(sum(&text(&theirs))) {
            assert!((a - b).abs() < 1e-9 * b.max(1.0), "{a} vs {b}");
        }
        assert!(
            text(&ours).contains("t_seconds_bucket{phase=\"log\",plugin=\"a\",le=\"+Inf\"} 150")
        );
    }

    /// Threads beyond the shards share them and lose nothing; a scrape during the
    /// observations always reads cumulative buckets.
    #[test]
    fn concurrent_observations_are_all_counted() {
        let v = ShardedHistogramVec::new("c_seconds", "help", &["x"], vec![0.000_001, 0.001]);
        let h = v.with_label_values(&["y"]);
        let threads = *SHARDS * 2 + 1;
        let per = 20_000u64;
        std::thread::scope(|s| {
            for t in 0..threads {
                let h = h.clone();
                s.spawn(move || {
                    for i in 0..per {
                        h.observe(Duration::from_nanos((i + t as u64) % 3 * 500_000));
                    }
                });
            }
            let v = v.clone();
            s.spawn(move || {
                for _ in 0..200 {
                    let family = v.collect().remove(0);
                    let hist = family.get_metric()[0].get_histogram();
                    let mut last = 0;
                    for b in hist.get_bucket() {
                        assert!(b.cumulative_count() >= last);
                        last = b.cumulative_count();
                    }
                    assert!(hist.get_sample_count() >= last);
                }
            });
        });
        assert_eq!(h.sample_count(), threads as u64 * per);
        let family = v.collect().remove(0);
        let hist = family.get_metric()[0].get_histogram();
        // 0 ns ≤ 1 µs; 500 µs ≤ 1 ms; 1 ms ≤ 1 ms: a third, then all.
        let buckets: Vec<u64> = hist
            .get_bucket()
            .iter()
            .map(|b| b.cumulative_count())
            .collect();
        let zeros: u64 = (0..threads as u64)
            .map(|t| (0..per).filter(|i| (i + t) % 3 == 0).count() as u64)
            .sum();
        assert_eq!(buckets, vec![zeros, threads as u64 * per]);
        let expected_ns: u64 = (0..threads as u64)
            .map(|t| (0..per).map(|i| (i + t) % 3 * 500_000).sum::<u64>())
            .sum();
        assert!((hist.get_sample_sum() - expected_ns as f64 / 1e9).abs() < 1e-6);
    }

    /// A lookup gives the same series for the same values, another for others.
    #[test]
    fn series_are_shared_by_label_values() {
        let v = ShardedHistogramVec::new("s_seconds", "help", &["x"], vec![1.0]);
        let a = v.with_label_values(&["a"]);
        assert!(Arc::ptr_eq(&a, &v.with_label_values(&["a"])));
        assert!(!Arc::ptr_eq(&a, &v.with_label_values(&["b"])));
        a.observe(Duration::from_secs(2));
        assert_eq!(v.with_label_values(&["a"]).sample_count(), 1);
        assert_eq!(v.with_label_values(&["b"]).sample_count(), 0);
    }
}
