//! Every bound on what a guest can make the host allocate or grow, and how hitting one is
//! reported.
//!
//! A guest controls the sizes, counts, pointers and lengths it hands to hostcalls, and can
//! call them in a loop until its deadline. Without bounds, a plugin could grow a header map,
//! its shared data, a request's properties, the log or the process-wide metric and queue
//! registries without end, inside one callback that the epoch deadline does not interrupt
//! (host code runs to completion). So every hostcall that copies or keeps guest bytes checks
//! a length against its bound *before* copying (a length is also checked against the
//! guest's memory before anything is read: see `host::read`).
//!
//! Over a bound a call answers the ABI's error status (`BAD_ARGUMENT`; WASI `INVAL`, the
//! spec's errno for "too large" in `random_get`), or, where Envoy accepts the call and the
//! Rust SDK would trap on any error, does what Envoy would with less: a long log message is
//! cut, a header edit that would grow a map past its bound is dropped with a warning (as
//! invalid edits are). Each hit is counted in `cascade_plugin_limit_hits_total{plugin,
//! limit}` and logged at most every [`LOG_EVERY`] per plugin and limit.
//!
//! The ones an operator may need to raise are the plugin's `limits:` (see [`Limits`]); the
//! others are constants here.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus::IntCounter;

use crate::metrics::METRICS;

/// Bytes of one `fd_write` call (stdout/stderr → the log). Over it: `INVAL`.
pub const MAX_FD_WRITE: usize = 64 << 10;
/// iovecs of one `fd_write` call (Linux's `IOV_MAX`). Over it: `INVAL`.
pub const MAX_IOVECS: usize = 1024;
/// Bytes of a `proxy_log` message that reach the log; the rest is cut (the call returns OK:
/// the Rust SDK panics on any other status from `proxy_log`, and its panic hook logs with it).
pub const MAX_LOG: usize = 16 << 10;
/// Headers a plugin's edits may grow a request or response header map to (Pingora's own
/// limit when it parses one: an origin could not send more).
pub const MAX_HEADER_COUNT: usize = 256;
/// Bytes of a method a plugin may set with `:method` (an extension method is any token).
pub const MAX_METHOD: usize = 64;
/// Bytes of a serialized header map a guest may hand to `proxy_set_header_map_pairs`: what
/// Pingora accepts as a request header (1 MiB, a long `:path` included) and the framing of
/// [`MAX_MAP_PAIRS`] pairs.
pub const MAX_HEADER_BLOB: usize = (1 << 20) + 10 * MAX_MAP_PAIRS + 4;
/// Pairs of a serialized header map a guest may hand over: [`MAX_HEADER_COUNT`] headers and
/// the pseudo-headers.
pub const MAX_MAP_PAIRS: usize = MAX_HEADER_COUNT + 8;
/// Bytes of one shared-data key.
pub const MAX_SHARED_KEY: usize = 4 << 10;
/// Keys of a plugin's shared data.
pub const MAX_SHARED_KEYS: usize = 100_000;
/// Custom properties (`proxy_set_property` on a path cascade does not define) per request.
pub const MAX_PROPERTIES: usize = 64;
/// Bytes of one custom property's value.
pub const MAX_PROPERTY_VALUE: usize = 16 << 10;
/// Bytes of all custom properties of a request (paths and values).
pub const MAX_PROPERTY_BYTES: usize = 64 << 10;
/// Bytes of a property path (get or set). A longer path is not found (get) or refused (set).
pub const MAX_PROPERTY_PATH: usize = 4 << 10;
/// Shared queues one plugin may register (each holds up to `queue::MAX_BYTES`).
pub const MAX_QUEUES: usize = 16;
/// Bytes of a shared queue's name (and of a `vm_id` to resolve one in).
pub const MAX_QUEUE_NAME: usize = 256;
/// Metrics one plugin may define: each is a Prometheus series for the life of the process.
pub const MAX_METRICS: usize = 256;
/// Bytes of a metric's name.
pub const MAX_METRIC_NAME: usize = 256;
/// Bytes of a local response's details (only logged): the rest is cut.
pub const MAX_DETAILS: usize = 1 << 10;

/// Default of `limits.headers`: bytes (names + values) a plugin's edits may grow a header
/// map to; also bounds a local response's headers.
pub const DEFAULT_HEADERS: u64 = 64 << 10;
/// Default of `limits.shared_data`: bytes (keys + values) of a plugin's shared data.
pub const DEFAULT_SHARED_DATA: u64 = 16 << 20;
/// Default of `limits.shared_value`: bytes of one shared-data value.
pub const DEFAULT_SHARED_VALUE: u64 = 1 << 20;

/// How often hitting one limit is logged, per plugin (every hit is counted).
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// The bounds of one plugin that its config sets (`limits:`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `limits.body`: body bytes held while the plugin pauses, a body it grows with
    /// `proxy_set_buffer_bytes`, a local response's body, an HTTP call's bodies.
    pub body: usize,
    /// `limits.headers`: bytes of names and values a header map may grow to by the plugin's
    /// edits, and of a local response's headers.
    pub headers: usize,
    /// `limits.shared_data`: bytes of keys and values of the plugin's shared data.
    pub shared_data: usize,
    /// `limits.shared_value`: bytes of one shared-data value.
    pub shared_value: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            body: 1 << 20,
            headers: DEFAULT_HEADERS as usize,
            shared_data: DEFAULT_SHARED_DATA as usize,
            shared_value: DEFAULT_SHARED_VALUE as usize,
        }
    }
}

/// Which bound was hit (the `limit` label of `cascade_plugin_limit_hits_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    FdWrite,
    Log,
    Headers,
    SharedData,
    Properties,
    Queues,
    Metrics,
    Body,
    LocalResponse,
    HttpCall,
}

impl Limit {
    pub const ALL: [Limit; 10] = [
        Limit::FdWrite,
        Limit::Log,
        Limit::Headers,
        Limit::SharedData,
        Limit::Properties,
        Limit::Queues,
        Limit::Metrics,
        Limit::Body,
        Limit::LocalResponse,
        Limit::HttpCall,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Limit::FdWrite => "fd_write",
            Limit::Log => "log",
            Limit::Headers => "headers",
            Limit::SharedData => "shared_data",
            Limit::Properties => "properties",
            Limit::Queues => "queues",
            Limit::Metrics => "metrics",
            Limit::Body => "body",
            Limit::LocalResponse => "local_response",
            Limit::HttpCall => "http_call",
        }
    }
}

/// Per plugin: the hit counters of every limit, and when each was last logged.
pub struct Hits {
    counters: [IntCounter; Limit::ALL.len()],
    /// Milliseconds since [`epoch`] of the last log line, per limit (0: never).
    logged: [AtomicU64; Limit::ALL.len()],
}

fn epoch() -> Instant {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *START.get_or_init(Instant::now)
}

impl Hits {
    pub fn new(plugin: &str) -> Hits {
        Hits {
            counters: Limit::ALL.map(|l| {
                METRICS
                    .plugin_limit_hits
                    .with_label_values(&[plugin, l.as_str()])
            }),
            logged: Default::default(),
        }
    }

    /// Counts a hit of `limit` by `plugin`; logs `what` (built only when it is logged) at
    /// most every [`LOG_EVERY`] for this plugin and limit. `true` when this hit was the one
    /// logged.
    pub fn hit(&self, plugin: &str, limit: Limit, what: impl FnOnce() -> String) -> bool {
        let i = limit as usize;
        self.counters[i].inc();
        // +1: 0 means never logged.
        let now = epoch().elapsed().as_millis() as u64 + 1;
        let last = self.logged[i].load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < LOG_EVERY.as_millis() as u64 {
            return false;
        }
        let first = self.logged[i]
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok();
        if first {
            log::warn!(
                target: "plugin",
                "[{plugin}] {} (limit `{}`; hits are counted in cascade_plugin_limit_hits_total, logged at most every {}s)",
                what(),
                limit.as_str(),
                LOG_EVERY.as_secs()
            );
        }
        first
    }

    /// Hits of `limit` so far.
    pub fn count(&self, limit: Limit) -> u64 {
        self.counters[limit as usize].get()
    }
}

/// Bytes of a header map as the limits count them: names and values.
pub fn header_bytes(h: &http::HeaderMap) -> usize {
    h.iter().map(|(k, v)| k.as_str().len() + v.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hits_are_counted_every_time_and_logged_once_per_period() {
        let hits = Hits::new("limits-test");
        let logged = (0..5)
            .filter(|_| hits.hit("limits-test", Limit::Queues, || "too many queues".into()))
            .count();
        assert_eq!(hits.count(Limit::Queues), 5);
        assert_eq!(logged, 1, "one line per period");
        assert_eq!(hits.count(Limit::Body), 0);
    }
}
