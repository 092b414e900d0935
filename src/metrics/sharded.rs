//! Series touched on every request, sharded per thread: histograms (request, upstream and
//! plugin callback durations) and counters (a request's counts, a peer's attempts).
//!
//! prometheus's `Histogram::observe` does four atomic operations on cache lines that every
//! thread observing the series shares: ~21 ns on one thread, ~100–200 ns each when two
//! threads observe the same series (`cargo bench --bench metrics` on the 2-vCPU development
//! VM), and a chain of three plugins observes nine times per request. Here an observation
//! touches only the observing thread's own shard: a relaxed atomic add to its bucket (found
//! by comparing integer nanoseconds) and a compare-and-swap of its sum that nothing else
//! contends. Shards are `crate::shard`'s (two per core, at most 64: a histogram series takes
//! 256 bytes per shard, 16 KiB at most), and stay correct when two threads share one. A
//! scrape adds the shards up. Counters are packed: a counter is a slot in every shard's own
//! blocks, 8 bytes per shard (their series' label values can come from a client's choices,
//! e.g. the method, so they must stay small).
//!
//! Exported as prometheus histograms and counters: same name, labels, buckets, `_sum` and
//! `_count`; the `+Inf` bucket and `_count` are the same read, so buckets are always
//! cumulative. A scrape racing an observation may count it in the buckets and not yet in
//! `_sum`, or the other way round (prometheus's own histogram waits for in-flight
//! observations instead); the next scrape has it in both.

use std::collections::HashMap;
use std::hash::Hasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
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
pub struct Bounds {
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
            shards: (0..crate::shard::count()).map(|_| Shard::new()).collect(),
        }
    }

    /// Counts one observation of `d`.
    #[inline]
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        // The first bound ≥ ns (prometheus's `le`); past the last one, `+Inf`.
        let bucket = self.bounds.ns.partition_point(|&b| b < ns);
        let shard = &self.shards[crate::shard::of_thread()];
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

/// A series type that families of sharded series are made of.
pub trait Series: Send + Sync + 'static {
    /// What every series of a family is made with (a histogram's bounds).
    type Params: Send + Sync + 'static;
    /// How the family is exported.
    const TYPE: proto::MetricType;
    fn new(params: &Self::Params) -> Self;
    /// Writes the series' current value into `m`.
    fn fill(&self, m: &mut proto::Metric);
}

impl Series for ShardedHistogram {
    type Params = Arc<Bounds>;
    const TYPE: proto::MetricType = proto::MetricType::HISTOGRAM;
    fn new(bounds: &Arc<Bounds>) -> ShardedHistogram {
        ShardedHistogram::new(bounds.clone())
    }
    fn fill(&self, m: &mut proto::Metric) {
        m.set_histogram(self.proto());
    }
}

/// Counter slots per block: 512 bytes, four 128-byte lines.
const BLOCK: usize = 64;
/// Counters the process can hold in slots (beyond them a counter is one shared atomic).
const MAX_SLOTS: usize = 1 << 16;

/// One thread shard's block of counter slots, on lines of its own.
#[repr(align(128))]
struct Block([AtomicU64; BLOCK]);

/// One shard's blocks by number (set when their first slot is handed out).
type BlockTable = Box<[OnceLock<Box<Block>>]>;

/// Every sharded counter's value, per thread shard: a counter is a slot number, the same in
/// every shard, and a thread adds to its shard's slot. Slots of one shard are packed (one
/// thread writes them all), so a counter costs 8 bytes per shard (0.5 KiB with 64 shards)
/// instead of a 128-byte line per shard; blocks are allocated in every shard at once, when
/// their first slot is handed out, and live as long as the process (so do the families'
/// series).
struct Slots {
    /// Per shard, the blocks by number.
    shards: Box<[BlockTable]>,
    /// The next free slot.
    next: Mutex<usize>,
}

static SLOTS: LazyLock<Slots> = LazyLock::new(|| Slots {
    shards: (0..crate::shard::count())
        .map(|_| (0..MAX_SLOTS / BLOCK).map(|_| OnceLock::new()).collect())
        .collect(),
    next: Mutex::new(0),
});

impl Slots {
    /// A fresh slot (zero in every shard), or `None` when all are taken.
    fn alloc(&self) -> Option<usize> {
        let mut next = self.next.lock();
        let slot = *next;
        if slot >= MAX_SLOTS {
            return None;
        }
        for shard in self.shards.iter() {
            shard[slot / BLOCK]
                .get_or_init(|| Box::new(Block(std::array::from_fn(|_| AtomicU64::new(0)))));
        }
        *next += 1;
        Some(slot)
    }

    fn slot(&self, shard: usize, slot: usize) -> &AtomicU64 {
        // Every shard's block was set before the slot was handed out.
        let block = self.shards[shard][slot / BLOCK]
            .get()
            .expect("a handed-out slot's block");
        &block.0[slot % BLOCK]
    }
}

/// A counter series, sharded per thread: an increment is one relaxed add to the thread's own
/// shard of slots (against a `lock`ed add to a line every thread shares for prometheus's
/// `IntCounter`), 8 bytes per thread shard.
pub struct ShardedCounter {
    /// `None` once the process's slots are all taken: then `shared` counts.
    slot: Option<usize>,
    shared: AtomicU64,
}

impl ShardedCounter {
    /// Adds `n`.
    #[inline]
    pub fn inc_by(&self, n: u64) {
        match self.slot {
            Some(slot) => SLOTS
                .slot(crate::shard::of_thread(), slot)
                .fetch_add(n, Ordering::Relaxed),
            None => self.shared.fetch_add(n, Ordering::Relaxed),
        };
    }

    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.inc_by(1);
    }

    /// The total so far.
    pub fn get(&self) -> u64 {
        let sharded = self.slot.map_or(0, |slot| {
            (0..SLOTS.shards.len())
                .map(|shard| SLOTS.slot(shard, slot).load(Ordering::Relaxed))
                .fold(0, u64::wrapping_add)
        });
        sharded.wrapping_add(self.shared.load(Ordering::Relaxed))
    }
}

impl Series for ShardedCounter {
    type Params = ();
    const TYPE: proto::MetricType = proto::MetricType::COUNTER;
    fn new(_: &()) -> ShardedCounter {
        ShardedCounter {
            slot: SLOTS.alloc(),
            shared: AtomicU64::new(0),
        }
    }
    fn fill(&self, m: &mut proto::Metric) {
        let mut c = proto::Counter::default();
        c.set_value(self.get() as f64);
        m.set_counter(c);
    }
}

/// A series and its label values.
type Child<S> = (Vec<String>, Arc<S>);

struct VecInner<S: Series> {
    desc: Desc,
    params: S::Params,
    /// Series by a hash of their label values (the values kept to tell collisions apart).
    children: RwLock<HashMap<u64, Vec<Child<S>>>>,
}

/// The hash a family files a series under.
fn hash_values(values: &[&str]) -> u64 {
    let mut h = rustc_hash::FxHasher::default();
    for v in values {
        h.write(v.as_bytes());
        h.write_u8(0xff);
    }
    h.finish()
}

/// A family of sharded series by label values, registered like prometheus's `*Vec`s.
/// Looking a series up hashes the values and takes a read lock every thread shares (as
/// prometheus's does): do it once (when a plugin or route is set up, or once per thread and
/// combination: `metrics::requests`) and keep the series.
pub struct ShardedVec<S: Series> {
    inner: Arc<VecInner<S>>,
}

impl<S: Series> Clone for ShardedVec<S> {
    fn clone(&self) -> Self {
        ShardedVec {
            inner: self.inner.clone(),
        }
    }
}

/// Histograms by label values.
pub type ShardedHistogramVec = ShardedVec<ShardedHistogram>;
/// Counters by label values.
pub type ShardedCounterVec = ShardedVec<ShardedCounter>;

impl ShardedVec<ShardedHistogram> {
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
        ShardedVec::with_params(
            super::desc(name, help, labels),
            Arc::new(Bounds {
                seconds: bounds,
                ns,
            }),
        )
    }
}

impl ShardedVec<ShardedCounter> {
    pub fn new(name: &str, help: &str, labels: &[&str]) -> ShardedCounterVec {
        ShardedVec::with_params(super::desc(name, help, labels), ())
    }
}

impl<S: Series> ShardedVec<S> {
    fn with_params(desc: Desc, params: S::Params) -> ShardedVec<S> {
        ShardedVec {
            inner: Arc::new(VecInner {
                desc,
                params,
                children: RwLock::new(HashMap::new()),
            }),
        }
    }

    /// The series of these label values (created on first use).
    pub fn with_label_values(&self, values: &[&str]) -> Arc<S> {
        assert_eq!(
            values.len(),
            self.inner.desc.variable_labels.len(),
            "{}: label values",
            self.inner.desc.fq_name
        );
        let hash = hash_values(values);
        let same = |(k, _): &&Child<S>| k.iter().zip(values).all(|(a, b)| a == b);
        let found = self
            .inner
            .children
            .read()
            .get(&hash)
            .and_then(|bucket| bucket.iter().find(same).map(|(_, s)| s.clone()));
        if let Some(series) = found {
            return series;
        }
        let mut children = self.inner.children.write();
        let bucket = children.entry(hash).or_default();
        if let Some((_, series)) = bucket.iter().find(same) {
            return series.clone();
        }
        let series = Arc::new(S::new(&self.inner.params));
        bucket.push((
            values.iter().map(|v| v.to_string()).collect(),
            series.clone(),
        ));
        series
    }
}

impl<S: Series> Collector for ShardedVec<S> {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.inner.desc]
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let desc = &self.inner.desc;
        let children: Vec<Child<S>> = self
            .inner
            .children
            .read()
            .values()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let metrics = children
            .iter()
            .map(|(values, series)| {
                let mut m = super::labeled_metric(desc, values);
                series.fill(&mut m);
                m
            })
            .collect();
        super::family(desc, S::TYPE, metrics)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{HistogramOpts, HistogramVec, Registry};

    use crate::metrics::text_of as text;

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
        let threads = crate::shard::count() * 2 + 1;
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

    /// Counters export what prometheus's own export for the same increments, and stay
    /// apart across block boundaries.
    #[test]
    fn counters_export_what_prometheus_counters_export() {
        let ours = Registry::new();
        let theirs = Registry::new();
        let v = ShardedCounterVec::new("c_total", "help", &["route", "status"]);
        ours.register(Box::new(v.clone())).unwrap();
        let p = prometheus::IntCounterVec::new(
            prometheus::Opts::new("c_total", "help"),
            &["route", "status"],
        )
        .unwrap();
        theirs.register(Box::new(p.clone())).unwrap();
        // More series than a block holds, each with its own count.
        for i in 0..(BLOCK as u64 * 2 + 3) {
            let labels = [format!("r{i}"), "2xx".to_string()];
            let labels = [labels[0].as_str(), labels[1].as_str()];
            v.with_label_values(&labels).inc_by(i * 7);
            v.with_label_values(&labels).inc();
            p.with_label_values(&labels).inc_by(i * 7);
            p.with_label_values(&labels).inc();
        }
        assert_eq!(text(&ours), text(&theirs));
    }

    /// Threads beyond the shards lose no increment; a counter made after the slots run out
    /// still counts (in its shared atomic).
    #[test]
    fn counters_count_every_increment_even_past_the_slots() {
        let v = ShardedCounterVec::new("t_total", "help", &["x"]);
        let c = v.with_label_values(&["a"]);
        let threads = crate::shard::count() * 2 + 1;
        std::thread::scope(|s| {
            for _ in 0..threads {
                let c = c.clone();
                s.spawn(move || {
                    for _ in 0..10_000 {
                        c.inc();
                    }
                });
            }
        });
        assert_eq!(c.get(), threads as u64 * 10_000);
        // Take every slot left.
        let mut last = None;
        let mut n = 0;
        let overflow = loop {
            let c = ShardedCounter::new(&());
            if c.slot.is_none() {
                break c;
            }
            n += 1;
            assert!(n <= MAX_SLOTS);
            last = Some(c);
        };
        overflow.inc_by(5);
        overflow.inc();
        assert_eq!(overflow.get(), 6);
        if let Some(last) = last {
            last.inc_by(3);
            assert_eq!(last.get(), 3);
        }
        c.inc();
        assert_eq!(c.get(), threads as u64 * 10_000 + 1);
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
