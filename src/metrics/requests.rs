//! What every finished request adds to the metrics: `cascade_requests_total`,
//! `cascade_cache_requests_total`, `cascade_cache_served_bytes_total` and
//! `cascade_request_duration_seconds`, found without a lock or a count that other threads
//! touch.
//!
//! prometheus's `with_label_values` hashes the label strings, takes a read lock every thread
//! shares and clones an `Arc` every thread shares; its counters add on a line every thread
//! shares. A request's three counters and its duration cost ~90 ns on one thread that way,
//! ~390 ns on each of two (`cargo bench --bench metrics`), growing with the cores; ~30 ns
//! here, on one thread or two. A request names its series by small numbers (its config's
//! route and origin indices, the method and status class, the cache status), one lookup in
//! its thread's memo finds all three counters, and the counters are sharded per thread
//! ([`ShardedCounter`]): the families' shared maps are asked once per thread and
//! combination.
//!
//! Memo keys carry the config's id, so another config's indices never reach this one's
//! series. A thread's memo holds at most `MEMO_MAX` combinations and drops one for each new
//! one past that: a client spraying methods, statuses and routes to fill it only makes its
//! requests look their series up in the families (a hash and a read lock, as every request
//! did before).

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use rustc_hash::FxHashMap;

use super::sharded::{ShardedCounter, ShardedHistogram};
use super::{method_ix, status_ix, METHODS, METRICS, STATUS_CLASSES};

/// Series kept in one thread's memo before it starts over.
const MEMO_MAX: usize = 4096;

/// Ids of configs' counters (0: none yet).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A finished request's series, as the request knows them: `None` for "no route" and
/// "served by cascade"; the cache status by its address (a `&'static str`: one address is
/// one label, and a second copy of a label at another address is only a second memo entry).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    config: u64,
    route: Option<usize>,
    served: Option<usize>,
    method: u8,
    status: u8,
    cache: Option<(usize, usize)>,
}

/// The counters a key names.
struct Counters {
    requests: Arc<ShardedCounter>,
    /// `cascade_cache_requests_total` and `cascade_cache_served_bytes_total`.
    cache: Option<(Arc<ShardedCounter>, Arc<ShardedCounter>)>,
}

thread_local! {
    static MEMO: RefCell<FxHashMap<Key, Counters>> = RefCell::new(FxHashMap::default());
}

/// A finished request, as its metrics see it.
pub struct Finished<'a> {
    /// The route's index in the config (`None`: no route took it).
    pub route: Option<usize>,
    pub method: &'a Method,
    /// The status sent (0: none, e.g. the client went away).
    pub status: u16,
    /// The index of the origin that served it (`None`: cascade answered itself).
    pub served: Option<usize>,
    /// The X-Cache value and the body bytes sent, when the route caches.
    pub cache: Option<(&'static str, u64)>,
    pub elapsed: Duration,
}

/// One config's per-request series: route and origin names by index, the request durations
/// by route (looked up once, here).
pub struct RequestMetrics {
    id: u64,
    routes: Vec<String>,
    origins: Vec<String>,
    /// `cascade_request_duration_seconds` by route index, then the one for no route.
    durations: Vec<Arc<ShardedHistogram>>,
}

impl Counters {
    fn add(&self, bytes: u64) {
        self.requests.inc();
        if let Some((requests, served)) = &self.cache {
            requests.inc();
            served.inc_by(bytes);
        }
    }
}

impl RequestMetrics {
    /// For a config with these routes and origins (names, in config order).
    pub fn new<'a>(
        routes: impl Iterator<Item = &'a str>,
        origins: impl Iterator<Item = &'a str>,
    ) -> RequestMetrics {
        let routes: Vec<String> = routes.map(str::to_string).collect();
        let durations = routes
            .iter()
            .map(String::as_str)
            .chain(["none"])
            .map(|r| METRICS.request_duration.with_label_values(&[r]))
            .collect();
        RequestMetrics {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            routes,
            origins: origins.map(str::to_string).collect(),
            durations,
        }
    }

    /// Counts and times one finished request.
    pub fn finish(&self, r: &Finished<'_>) {
        let key = Key {
            config: self.id,
            route: r.route,
            served: r.served,
            method: method_ix(r.method),
            status: status_ix(r.status),
            cache: r
                .cache
                .map(|(label, _)| (label.as_ptr() as usize, label.len())),
        };
        let bytes = r.cache.map_or(0, |(_, n)| n);
        let counted = MEMO.try_with(|memo| {
            let mut memo = memo.borrow_mut();
            if let Some(c) = memo.get(&key) {
                c.add(bytes);
                return;
            }
            if memo.len() >= MEMO_MAX {
                // Room for this one: drop any other (a client spraying combinations makes its
                // thread look series up in the families, as every request did before).
                if let Some(old) = memo.keys().next().copied() {
                    memo.remove(&old);
                }
            }
            let c = self.lookup(&key, r.cache.map(|(label, _)| label));
            c.add(bytes);
            memo.insert(key, c);
        });
        if counted.is_err() {
            // The thread is exiting and its memo is gone.
            self.lookup(&key, r.cache.map(|(label, _)| label))
                .add(bytes);
        }
        let timing = r
            .route
            .filter(|&i| i < self.routes.len())
            .unwrap_or(self.routes.len());
        self.durations[timing].observe(r.elapsed);
    }

    /// The series in their families' shared maps (created on first use).
    fn lookup(&self, key: &Key, cache: Option<&'static str>) -> Counters {
        debug_assert!(key.route.is_none_or(|r| r < self.routes.len()));
        debug_assert!(key.served.is_none_or(|o| o < self.origins.len()));
        let route = key
            .route
            .and_then(|r| self.routes.get(r))
            .map_or("none", String::as_str);
        let served = key
            .served
            .and_then(|o| self.origins.get(o))
            .map_or("cascade", String::as_str);
        Counters {
            requests: METRICS.requests.with_label_values(&[
                route,
                METHODS[usize::from(key.method)],
                STATUS_CLASSES[usize::from(key.status)],
                served,
            ]),
            cache: cache.map(|status| {
                (
                    METRICS.cache_requests.with_label_values(&[route, status]),
                    METRICS.cache_served_bytes.with_label_values(&[status]),
                )
            }),
        }
    }

    /// Series in this thread's memo (for tests).
    #[cfg(test)]
    fn memo_len() -> usize {
        MEMO.with(|m| m.borrow().len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series))
            .map(|v| v.trim().parse().unwrap())
    }

    fn finished(route: Option<usize>, status: u16, served: Option<usize>) -> Finished<'static> {
        Finished {
            route,
            method: &Method::GET,
            status,
            served,
            cache: None,
            elapsed: Duration::from_millis(3),
        }
    }

    #[test]
    fn requests_land_in_the_series_their_names_say() {
        let m = RequestMetrics::new(
            ["rq-a", "rq-b"].into_iter(),
            ["rq-main", "rq-fb"].into_iter(),
        );
        m.finish(&finished(Some(0), 200, Some(0)));
        m.finish(&finished(Some(0), 200, Some(0)));
        m.finish(&finished(Some(1), 404, Some(1)));
        m.finish(&finished(None, 400, None));
        m.finish(&Finished {
            method: &Method::from_bytes(b"BREW").unwrap(),
            cache: Some(("HIT", 4096)),
            ..finished(Some(1), 206, Some(1))
        });
        m.finish(&Finished {
            cache: Some(("HIT", 100)),
            ..finished(Some(1), 0, Some(1))
        });
        let text = String::from_utf8(METRICS.render()).unwrap();
        let got = |s: &str| value(&text, s);
        assert_eq!(
            got(
                r#"cascade_requests_total{method="GET",route="rq-a",served_from="rq-main",status="2xx"}"#
            ),
            Some(2.0)
        );
        assert_eq!(
            got(
                r#"cascade_requests_total{method="GET",route="rq-b",served_from="rq-fb",status="4xx"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            got(
                r#"cascade_requests_total{method="GET",route="none",served_from="cascade",status="4xx"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            got(
                r#"cascade_requests_total{method="other",route="rq-b",served_from="rq-fb",status="2xx"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            got(
                r#"cascade_requests_total{method="GET",route="rq-b",served_from="rq-fb",status="none"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            got(r#"cascade_cache_requests_total{route="rq-b",status="HIT"}"#),
            Some(2.0)
        );
        assert!(got(r#"cascade_cache_served_bytes_total{status="HIT"}"#).unwrap() >= 4196.0);
        // A label no other test uses: exact.
        m.finish(&Finished {
            cache: Some(("RQ-TEST", 10)),
            ..finished(Some(0), 200, Some(0))
        });
        m.finish(&Finished {
            cache: Some(("RQ-TEST", 32)),
            ..finished(Some(1), 200, Some(1))
        });
        let text = String::from_utf8(METRICS.render()).unwrap();
        assert_eq!(
            value(
                &text,
                r#"cascade_cache_served_bytes_total{status="RQ-TEST"}"#
            ),
            Some(42.0)
        );
        assert_eq!(
            got(r#"cascade_request_duration_seconds_count{route="rq-a"}"#),
            Some(2.0)
        );
        assert_eq!(
            got(r#"cascade_request_duration_seconds_count{route="rq-b"}"#),
            Some(3.0)
        );
        // The family is exported as a counter, as prometheus's IntCounterVec was.
        assert!(text.contains("# TYPE cascade_requests_total counter"));
    }

    /// Two configs whose indices name different routes never share a memo entry.
    #[test]
    fn a_second_config_counts_under_its_own_names() {
        let old = RequestMetrics::new(["cf-old"].into_iter(), ["cf-o1"].into_iter());
        let new = RequestMetrics::new(["cf-new"].into_iter(), ["cf-o2"].into_iter());
        old.finish(&finished(Some(0), 200, Some(0)));
        new.finish(&finished(Some(0), 200, Some(0)));
        new.finish(&finished(Some(0), 200, Some(0)));
        let text = String::from_utf8(METRICS.render()).unwrap();
        assert_eq!(
            value(
                &text,
                r#"cascade_requests_total{method="GET",route="cf-old",served_from="cf-o1",status="2xx"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &text,
                r#"cascade_requests_total{method="GET",route="cf-new",served_from="cf-o2",status="2xx"}"#
            ),
            Some(2.0)
        );
    }

    /// A thread's memo stays under its bound however many combinations it meets, and counts
    /// stay exact across the restart.
    #[test]
    fn the_memo_is_bounded() {
        let names: Vec<String> = (0..MEMO_MAX / 6 + 10).map(|i| format!("mb-{i}")).collect();
        let m = RequestMetrics::new(names.iter().map(String::as_str), ["mb-o"].into_iter());
        for round in 0..2 {
            for i in 0..names.len() {
                for status in [200, 404, 500, 301, 101, 0] {
                    m.finish(&finished(Some(i), status, Some(0)));
                    assert!(RequestMetrics::memo_len() <= MEMO_MAX, "round {round}");
                }
            }
        }
        // Full, not started over: one entry dropped for each new one.
        assert_eq!(RequestMetrics::memo_len(), MEMO_MAX);
        let text = String::from_utf8(METRICS.render()).unwrap();
        assert_eq!(
            value(
                &text,
                r#"cascade_requests_total{method="GET",route="mb-7",served_from="mb-o",status="5xx"}"#
            ),
            Some(2.0)
        );
    }

    /// Threads counting the same series at once lose nothing.
    #[test]
    fn threads_counting_at_once_lose_nothing() {
        let m = RequestMetrics::new(["th-r"].into_iter(), ["th-o"].into_iter());
        let threads = crate::shard::count() + 3;
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    for _ in 0..5_000 {
                        m.finish(&Finished {
                            cache: Some(("MISS", 3)),
                            ..finished(Some(0), 200, Some(0))
                        });
                    }
                });
            }
        });
        let text = String::from_utf8(METRICS.render()).unwrap();
        let n = (threads * 5_000) as f64;
        assert_eq!(
            value(
                &text,
                r#"cascade_requests_total{method="GET",route="th-r",served_from="th-o",status="2xx"}"#
            ),
            Some(n)
        );
        assert_eq!(
            value(
                &text,
                r#"cascade_cache_requests_total{route="th-r",status="MISS"}"#
            ),
            Some(n)
        );
    }
}
