//! Every Prometheus series cascade exports, in one place, and the tiny HTTP app that serves
//! them on the metrics listener.
//!
//! Label values come only from the config (route, group and origin names) or from small
//! fixed sets (method, status class, error kind), so cardinality is bounded by the config.

use std::sync::LazyLock;

mod requests;
mod sampled;
mod sharded;
pub use requests::{Finished, RequestMetrics};
pub use sampled::SampledGaugeVec;
pub use sharded::{
    now, start_clock, ShardedCounter, ShardedCounterVec, ShardedHistogram, ShardedHistogramVec,
};

use async_trait::async_trait;
use bytes::Bytes;
use http::Method;
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use prometheus::{
    exponential_buckets, register_gauge_vec_with_registry, register_histogram_vec_with_registry,
    register_int_counter_vec_with_registry, register_int_counter_with_registry,
    register_int_gauge_vec_with_registry, register_int_gauge_with_registry, Encoder, GaugeVec,
    HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub requests: ShardedCounterVec,
    pub fallback_replays: IntCounterVec,
    pub upstream_errors: IntCounterVec,
    pub request_duration: ShardedHistogramVec,
    pub upstream_duration: ShardedHistogramVec,
    pub cache_requests: ShardedCounterVec,
    pub cache_evictions: IntCounterVec,
    pub cache_bytes: GaugeVec,
    pub cache_objects: GaugeVec,
    pub cache_fill_errors: IntCounter,
    pub cache_fill_memory: IntGauge,
    pub cache_fills_discarded: IntCounter,
    pub cache_lock_waits: IntCounter,
    pub cache_served_bytes: ShardedCounterVec,
    pub cache_purges: IntCounterVec,
    pub plugin_counter: IntCounterVec,
    pub plugin_gauge: IntGaugeVec,
    pub plugin_histogram: HistogramVec,
    pub plugin_duration: ShardedHistogramVec,
    pub plugin_traps: IntCounterVec,
    pub plugin_instances: IntGaugeVec,
    pub plugin_pool_slots: IntGauge,
    pub plugin_pool_full: IntCounterVec,
    pub plugin_lost: IntCounterVec,
    pub plugin_failures: IntCounterVec,
    pub plugin_http_calls: IntCounterVec,
    pub plugin_http_call_duration: HistogramVec,
    pub plugin_queue_dropped: IntCounterVec,
    pub plugin_limit_hits: IntCounterVec,
    pub peer_up: IntGaugeVec,
    pub peer_requests: ShardedCounterVec,
    pub peer_ejections: IntCounterVec,
    pub peer_in_flight: SampledGaugeVec,
    pub health_checks: IntCounterVec,
    pub retries: IntCounterVec,
    pub failovers: IntCounterVec,
    pub bucket_used_bytes: IntGaugeVec,
    pub bucket_capacity_bytes: IntGaugeVec,
    pub bucket_objects: IntGaugeVec,
    pub bucket_reserved_bytes: IntGaugeVec,
    pub uploads: IntCounterVec,
    pub upload_bytes: IntCounterVec,
    pub bucket_cooldowns: IntCounterVec,
    pub redis_up: IntGauge,
    pub redis_errors: IntCounterVec,
    /// Connections of attempts (reads and writes, http and https origins) through cascade's
    /// pool (`origin::pool`), by event:
    /// `opened`, `reused` (taken from the pool), `kept` (an answer Pingora left, finished and
    /// kept: a replayed 404's connection).
    pub upstream_connections: [IntCounter; 3],
    /// The family of `upstream_connections`.
    pub upstream_connections_by_event: IntCounterVec,
    /// Responses cut off by `server.send_timeout` (`sendbuf`).
    pub client_send_timeouts: IntCounter,
    /// Client connections open now, all listeners (`capacity`).
    pub client_connections: IntGauge,
    /// `server.max_connections` (or what the open-files limit allows).
    pub client_connections_max: IntGauge,
    /// New connections over `max_connections`, by what was done: `evicted` (an idle one
    /// was closed to make room), `refused` (none was idle: 503 and closed).
    pub client_connections_over: [IntCounter; 2],
    /// The family of `client_connections_over`.
    pub client_connections_over_by_action: IntCounterVec,
    /// Blocks of streamed disk hits read, by where: `[page_cache, pool]`.
    pub cache_disk_block_reads: [IntCounter; 2],
    /// The family of `cache_disk_block_reads`.
    pub cache_disk_block_reads_by_via: IntCounterVec,
    pub cache_evicted_in_use: IntGauge,
    /// Memory hits whose body was let go of and not kept, by what followed: `[disk, cut]`.
    pub cache_evicted_hits: [IntCounter; 2],
    /// The family of `cache_evicted_hits`.
    pub cache_evicted_hits_by_then: IntCounterVec,
}

fn buckets() -> Vec<f64> {
    // 0.5 ms .. ~33 s
    exponential_buckets(0.0005, 2.0, 17).expect("static buckets")
}

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new();
        // Counted on every request: sharded per thread, found through a per-thread memo
        // (metrics/requests.rs).
        let requests = ShardedCounterVec::new(
            "cascade_requests_total",
            "Requests answered, by route, method, status class and the origin that served them.",
            &["route", "method", "status", "served_from"],
        );
        registry
            .register(Box::new(requests.clone()))
            .expect("metric");
        let fallback_replays = register_int_counter_vec_with_registry!(
            "cascade_fallback_replays_total",
            "Requests replayed to the next fallback, by group and the origin that answered `missing`.",
            &["group", "origin"],
            registry
        )
        .expect("metric");
        let upstream_errors = register_int_counter_vec_with_registry!(
            "cascade_upstream_errors_total",
            "Failed upstream attempts by origin and kind (connect_refused, connect_timeout, timeout, tls, reset, protocol, other).",
            &["origin", "kind"],
            registry
        )
        .expect("metric");
        // Observed on every request and every upstream attempt: sharded per thread.
        let request_duration = ShardedHistogramVec::new(
            "cascade_request_duration_seconds",
            "Time from request header to the end of the response, by route.",
            &["route"],
            buckets(),
        );
        registry
            .register(Box::new(request_duration.clone()))
            .expect("metric");
        let upstream_duration = ShardedHistogramVec::new(
            "cascade_upstream_duration_seconds",
            "Time from the start of an upstream attempt to its response header, by origin.",
            &["origin"],
            buckets(),
        );
        registry
            .register(Box::new(upstream_duration.clone()))
            .expect("metric");
        let cache_requests = ShardedCounterVec::new(
            "cascade_cache_requests_total",
            "Requests by cache outcome (the X-Cache value: HIT, MISS, EXPIRED, STALE, REVALIDATED, BYPASS) and route.",
            &["route", "status"],
        );
        registry
            .register(Box::new(cache_requests.clone()))
            .expect("metric");
        let cache_evictions = register_int_counter_vec_with_registry!(
            "cascade_cache_evictions_total",
            "Entries evicted to keep a tier within its size, by tier (memory, disk).",
            &["tier"],
            registry
        )
        .expect("metric");
        let cache_bytes = register_gauge_vec_with_registry!(
            "cascade_cache_bytes",
            "Bytes stored, by tier.",
            &["tier"],
            registry
        )
        .expect("metric");
        let cache_objects = register_gauge_vec_with_registry!(
            "cascade_cache_objects",
            "Entries stored, by tier.",
            &["tier"],
            registry
        )
        .expect("metric");
        let cache_fill_errors = register_int_counter_with_registry!(
            "cascade_cache_fill_errors_total",
            "Cache fills abandoned, whole or their disk part (client or origin failed mid-body, disk write failed, no room on disk, over cache.fill_memory without a disk tier).",
            registry
        )
        .expect("metric");
        let cache_fill_memory = register_int_gauge_with_registry!(
            "cascade_cache_fill_memory_bytes",
            "Bytes held in memory by cache fills in flight (memory copies, disk writes not yet done), by disk hits read whole that the memory tier has not taken, and by bodies the memory tier let go of while responses still send them, bounded by cache.fill_memory.",
            registry
        )
        .expect("metric");
        let cache_fills_discarded = register_int_counter_with_registry!(
            "cascade_cache_fills_discarded_total",
            "Cache fills that stored nothing because their object was written or purged while they were in flight.",
            registry
        )
        .expect("metric");
        let cache_lock_waits = register_int_counter_with_registry!(
            "cascade_cache_lock_waits_total",
            "Requests that waited on another request's fill of the same key (collapsed misses).",
            registry
        )
        .expect("metric");
        let cache_served_bytes = ShardedCounterVec::new(
            "cascade_cache_served_bytes_total",
            "Response body bytes sent, by cache outcome.",
            &["status"],
        );
        registry
            .register(Box::new(cache_served_bytes.clone()))
            .expect("metric");
        let cache_purges = register_int_counter_vec_with_registry!(
            "cascade_cache_purges_total",
            "Cache entries removed by purge (admin) or by a write through cascade (invalidate).",
            &["reason"],
            registry
        )
        .expect("metric");
        let plugin_counter = register_int_counter_vec_with_registry!(
            "cascade_plugin_counter",
            "Counters defined by plugins (proxy_define_metric), by plugin and metric name.",
            &["plugin", "name"],
            registry
        )
        .expect("metric");
        let plugin_gauge = register_int_gauge_vec_with_registry!(
            "cascade_plugin_gauge",
            "Gauges defined by plugins, by plugin and metric name.",
            &["plugin", "name"],
            registry
        )
        .expect("metric");
        let plugin_histogram = register_histogram_vec_with_registry!(
            "cascade_plugin_histogram",
            "Histograms defined by plugins (values as recorded), by plugin and metric name.",
            &["plugin", "name"],
            exponential_buckets(1.0, 4.0, 12).expect("static buckets"),
            registry
        )
        .expect("metric");
        // Observed up to three times per plugin per request: sharded per thread.
        let plugin_duration = ShardedHistogramVec::new(
            "cascade_plugin_duration_seconds",
            "Time spent in plugin callbacks, by plugin and phase (request, response, log, call: proxy_on_http_call_response).",
            &["plugin", "phase"],
            exponential_buckets(0.000_002, 2.0, 16).expect("static buckets"),
        );
        registry
            .register(Box::new(plugin_duration.clone()))
            .expect("metric");
        let plugin_traps = register_int_counter_vec_with_registry!(
            "cascade_plugin_traps_total",
            "Plugin callbacks that failed, by plugin and kind (trap, timeout, memory); the instance is discarded.",
            &["plugin", "kind"],
            registry
        )
        .expect("metric");
        let plugin_instances = register_int_gauge_vec_with_registry!(
            "cascade_plugin_instances",
            "Live configured plugin instances (pooled or leased), by plugin.",
            &["plugin"],
            registry
        )
        .expect("metric");
        let plugin_pool_slots = register_int_gauge_with_registry!(
            "cascade_plugin_pool_slots",
            "Slots of the plugin instance pool (server.plugin_instances), shared by all plugins; 0 when instances are allocated on demand.",
            registry
        )
        .expect("metric");
        let plugin_pool_full = register_int_counter_vec_with_registry!(
            "cascade_plugin_pool_full_total",
            "Requests that found no free slot in the plugin instance pool (their plugin's on_error applies), by plugin.",
            &["plugin"],
            registry
        )
        .expect("metric");
        let plugin_lost = register_int_counter_vec_with_registry!(
            "cascade_plugin_lost_contexts_total",
            "Request contexts lost because another request's fault discarded the instance they shared (their remaining callbacks of that plugin are skipped), by plugin.",
            &["plugin"],
            registry
        )
        .expect("metric");
        let plugin_failures = register_int_counter_vec_with_registry!(
            "cascade_plugin_failures_total",
            "Requests whose plugin failed or was unavailable, by plugin and the on_error action taken (deny, allow).",
            &["plugin", "action"],
            registry
        )
        .expect("metric");
        let plugin_http_calls = register_int_counter_vec_with_registry!(
            "cascade_plugin_http_calls_total",
            "HTTP calls made by plugins (proxy_http_call), by plugin and outcome (ok: an answer of any status, error, timeout).",
            &["plugin", "outcome"],
            registry
        )
        .expect("metric");
        let plugin_http_call_duration = register_histogram_vec_with_registry!(
            "cascade_plugin_http_call_duration_seconds",
            "Duration of plugins' HTTP calls (the request waits for them), by plugin.",
            &["plugin"],
            exponential_buckets(0.000_25, 2.0, 16).expect("static buckets"),
            registry
        )
        .expect("metric");
        let plugin_queue_dropped = register_int_counter_vec_with_registry!(
            "cascade_plugin_queue_dropped_total",
            "Messages dropped from a full shared queue (oldest first), by the plugin owning the queue.",
            &["plugin"],
            registry
        )
        .expect("metric");
        let plugin_limit_hits = register_int_counter_vec_with_registry!(
            "cascade_plugin_limit_hits_total",
            "Hostcalls refused or cut because a plugin hit one of its bounds (fd_write, log, headers, shared_data, properties, queues, metrics, body, local_response, http_call), by plugin and limit.",
            &["plugin", "limit"],
            registry
        )
        .expect("metric");
        let peer_up = register_int_gauge_vec_with_registry!(
            "cascade_peer_up",
            "1 when a peer is usable (up, not drained, not ejected), else 0, by origin and peer.",
            &["origin", "peer"],
            registry
        )
        .expect("metric");
        let peer_requests = ShardedCounterVec::new(
            "cascade_peer_requests_total",
            "Attempts on a peer by outcome: ok (an answer), status (a retry_on status), connect (connect error), timeout, error (reset, protocol).",
            &["origin", "peer", "outcome"],
        );
        registry
            .register(Box::new(peer_requests.clone()))
            .expect("metric");
        let peer_ejections = register_int_counter_vec_with_registry!(
            "cascade_peer_ejections_total",
            "Passive ejections (consecutive failures) of a peer.",
            &["origin", "peer"],
            registry
        )
        .expect("metric");
        // The peers' own counts, read at scrape (metrics/sampled.rs).
        let peer_in_flight = SampledGaugeVec::new(
            "cascade_peer_in_flight",
            "Attempts in flight on a peer.",
            &["origin", "peer"],
        );
        registry
            .register(Box::new(peer_in_flight.clone()))
            .expect("metric");
        let health_checks = register_int_counter_vec_with_registry!(
            "cascade_health_checks_total",
            "Active health checks of a peer, by result (ok, fail).",
            &["origin", "peer", "result"],
            registry
        )
        .expect("metric");
        let retries = register_int_counter_vec_with_registry!(
            "cascade_retries_total",
            "Attempts retried on another peer of the same origin, by origin and reason (connect, timeout, status).",
            &["origin", "reason"],
            registry
        )
        .expect("metric");
        let failovers = register_int_counter_vec_with_registry!(
            "cascade_failovers_total",
            "Reads sent on to the fallbacks because main could not answer, by group.",
            &["group"],
            registry
        )
        .expect("metric");
        let upstream_connections = register_int_counter_vec_with_registry!(
            "cascade_upstream_connections_total",
            "Connections of client requests' attempts (reads and writes, http and https origins) through cascade's pool, by event: opened, reused (from the pool), kept (an answer Pingora let go of was finished and the connection kept, e.g. after a 404 replayed to a fallback).",
            &["event"],
            registry
        )
        .expect("metric");
        let upstream_connections_by_event = upstream_connections;
        let client_connections_over_by_action = register_int_counter_vec_with_registry!(
            "cascade_client_connections_over_limit_total",
            "New client connections that found server.max_connections reached, by action: evicted (a connection waiting for its next request was closed to make room), refused (none was waiting: 503 with Retry-After, closed).",
            &["action"],
            registry
        )
        .expect("metric");
        let client_connections_over = ["evicted", "refused"]
            .map(|a| client_connections_over_by_action.with_label_values(&[a]));
        let cache_disk_block_reads_by_via = register_int_counter_vec_with_registry!(
            "cascade_cache_disk_block_reads_total",
            "64 KiB blocks of streamed disk-tier hits read, by where: page_cache (on the worker, the page cache held them), pool (on the blocking pool: not in the page cache, or a check failed). A rising pool share means disk hits wait for the disk.",
            &["via"],
            registry
        )
        .expect("metric");
        let cache_disk_block_reads =
            ["page_cache", "pool"].map(|v| cache_disk_block_reads_by_via.with_label_values(&[v]));
        let cache_evicted_hits_by_then = register_int_counter_vec_with_registry!(
            "cascade_cache_evicted_hits_total",
            "Memory-tier hits whose body the tier let go of (evicted, replaced, purged) while they sent it, and that keeping whole would have taken past half of cache.fill_memory, by what followed: disk (went on from the disk tier's copy of the same bytes) or cut (no such copy: ended early, the client gets a short body and a closed connection).",
            &["then"],
            registry
        )
        .expect("metric");
        let cache_evicted_hits =
            ["disk", "cut"].map(|t| cache_evicted_hits_by_then.with_label_values(&[t]));
        let upstream_connections = ["opened", "reused", "kept"]
            .map(|e| upstream_connections_by_event.with_label_values(&[e]));
        for tier in ["memory", "disk"] {
            cache_evictions.with_label_values(&[tier]);
            cache_bytes.with_label_values(&[tier]);
            cache_objects.with_label_values(&[tier]);
        }
        Metrics {
            requests,
            fallback_replays,
            upstream_errors,
            request_duration,
            upstream_duration,
            cache_requests,
            cache_evictions,
            cache_bytes,
            cache_objects,
            cache_fill_errors,
            cache_fill_memory,
            cache_fills_discarded,
            cache_lock_waits,
            cache_served_bytes,
            cache_purges,
            plugin_counter,
            plugin_gauge,
            plugin_histogram,
            plugin_duration,
            plugin_traps,
            plugin_instances,
            plugin_pool_slots,
            plugin_pool_full,
            plugin_lost,
            plugin_failures,
            plugin_http_calls,
            plugin_http_call_duration,
            plugin_queue_dropped,
            plugin_limit_hits,
            peer_up,
            peer_requests,
            peer_ejections,
            peer_in_flight,
            health_checks,
            retries,
            failovers,
            upstream_connections,
            upstream_connections_by_event,
            client_send_timeouts: register_int_counter_with_registry!(
                "cascade_client_send_timeouts_total",
                "Responses cut off because the client took none of their bytes for server.send_timeout (the connection is closed): clients that stopped reading, or networks slower than the timeout allows.",
                registry
            )
            .expect("metric"),
            client_connections: register_int_gauge_with_registry!(
                "cascade_client_connections",
                "Client connections open now (all proxy listeners), idle keep-alives included.",
                registry
            )
            .expect("metric"),
            client_connections_max: register_int_gauge_with_registry!(
                "cascade_client_connections_max",
                "The most client connections cascade holds at once: server.max_connections, or what the open-files limit allows.",
                registry
            )
            .expect("metric"),
            client_connections_over,
            client_connections_over_by_action,
            cache_disk_block_reads,
            cache_disk_block_reads_by_via,
            cache_evicted_in_use: register_int_gauge_with_registry!(
                "cascade_cache_evicted_in_use_bytes",
                "Bytes of bodies the memory tier let go of (evicted, replaced or purged) while responses were still sending them, kept whole until those responses end. Also counted in cascade_cache_fill_memory_bytes: they may take at most half of cache.fill_memory.",
                registry
            )
            .expect("metric"),
            cache_evicted_hits,
            cache_evicted_hits_by_then,
            bucket_used_bytes: register_int_gauge_vec_with_registry!(
                "cascade_bucket_used_bytes",
                "Bytes stored in a bucket set's member (committed uploads), by group and bucket.",
                &["group", "bucket"],
                registry
            )
            .expect("metric"),
            bucket_capacity_bytes: register_int_gauge_vec_with_registry!(
                "cascade_bucket_capacity_bytes",
                "A bucket set member's configured capacity, by group and bucket.",
                &["group", "bucket"],
                registry
            )
            .expect("metric"),
            bucket_objects: register_int_gauge_vec_with_registry!(
                "cascade_bucket_objects",
                "Objects stored in a bucket set's member, by group and bucket.",
                &["group", "bucket"],
                registry
            )
            .expect("metric"),
            bucket_reserved_bytes: register_int_gauge_vec_with_registry!(
                "cascade_bucket_reserved_bytes",
                "Bytes reserved by uploads in progress on a bucket set's member, by group and bucket.",
                &["group", "bucket"],
                registry
            )
            .expect("metric"),
            uploads: register_int_counter_vec_with_registry!(
                "cascade_uploads_total",
                "Writes through a bucket set by group, bucket and outcome (ok, failed, rejected, full).",
                &["group", "bucket", "outcome"],
                registry
            )
            .expect("metric"),
            upload_bytes: register_int_counter_vec_with_registry!(
                "cascade_upload_bytes_total",
                "Bytes of completed uploads through a bucket set, by group and bucket.",
                &["group", "bucket"],
                registry
            )
            .expect("metric"),
            bucket_cooldowns: register_int_counter_vec_with_registry!(
                "cascade_bucket_cooldowns_total",
                "Times a bucket set's member was put in cooldown after consecutive upload failures.",
                &["group", "bucket"],
                registry
            )
            .expect("metric"),
            redis_up: register_int_gauge_with_registry!(
                "cascade_redis_up",
                "1 when the last Redis call succeeded, 0 when Redis is unreachable (absent without `redis:`).",
                registry
            )
            .expect("metric"),
            redis_errors: register_int_counter_vec_with_registry!(
                "cascade_redis_errors_total",
                "Redis calls that failed or timed out, by operation.",
                &["op"],
                registry
            )
            .expect("metric"),
            registry,
        }
    }

    /// The name of every metric family cascade exports, with or without samples yet (the
    /// alert rules and the dashboard may refer to these only).
    pub fn family_names(&self) -> Vec<String> {
        use prometheus::core::Collector;
        let all: [&dyn Collector; 53] = [
            &self.requests,
            &self.fallback_replays,
            &self.upstream_errors,
            &self.request_duration,
            &self.upstream_duration,
            &self.cache_requests,
            &self.cache_evictions,
            &self.cache_bytes,
            &self.cache_objects,
            &self.cache_fill_errors,
            &self.cache_fill_memory,
            &self.cache_fills_discarded,
            &self.cache_lock_waits,
            &self.cache_served_bytes,
            &self.cache_purges,
            &self.plugin_counter,
            &self.plugin_gauge,
            &self.plugin_histogram,
            &self.plugin_duration,
            &self.plugin_traps,
            &self.plugin_instances,
            &self.plugin_pool_slots,
            &self.plugin_pool_full,
            &self.plugin_lost,
            &self.plugin_failures,
            &self.plugin_http_calls,
            &self.plugin_http_call_duration,
            &self.plugin_queue_dropped,
            &self.plugin_limit_hits,
            &self.peer_up,
            &self.peer_requests,
            &self.peer_ejections,
            &self.peer_in_flight,
            &self.health_checks,
            &self.retries,
            &self.failovers,
            &self.bucket_used_bytes,
            &self.bucket_capacity_bytes,
            &self.bucket_objects,
            &self.bucket_reserved_bytes,
            &self.uploads,
            &self.upload_bytes,
            &self.bucket_cooldowns,
            &self.redis_up,
            &self.redis_errors,
            &self.upstream_connections_by_event,
            &self.client_send_timeouts,
            &self.client_connections,
            &self.client_connections_max,
            &self.client_connections_over_by_action,
            &self.cache_disk_block_reads_by_via,
            &self.cache_evicted_in_use,
            &self.cache_evicted_hits_by_then,
        ];
        let mut names: Vec<String> = all
            .iter()
            .flat_map(|c| c.desc().into_iter().map(|d| d.fq_name.clone()))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(16 * 1024);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }
}

/// A family's description for cascade's own collectors (the names are static: a bad one is
/// a programming error).
fn desc(name: &str, help: &str, labels: &[&str]) -> prometheus::core::Desc {
    prometheus::core::Desc::new(
        name.to_string(),
        help.to_string(),
        labels.iter().map(|l| l.to_string()).collect(),
        Default::default(),
    )
    .expect("static metric description")
}

/// A series of `desc`'s family with these label values (in the family's label order), its
/// label pairs sorted as prometheus's own collectors sort them; the value is set by the caller.
fn labeled_metric(desc: &prometheus::core::Desc, values: &[String]) -> prometheus::proto::Metric {
    let mut labels: Vec<prometheus::proto::LabelPair> = desc
        .variable_labels
        .iter()
        .zip(values)
        .map(|(name, value)| {
            let mut p = prometheus::proto::LabelPair::default();
            p.set_name(name.clone());
            p.set_value(value.clone());
            p
        })
        .collect();
    labels.sort();
    let mut m = prometheus::proto::Metric::default();
    m.set_label(labels);
    m
}

/// What a collector of one family returns.
fn family(
    desc: &prometheus::core::Desc,
    kind: prometheus::proto::MetricType,
    metrics: Vec<prometheus::proto::Metric>,
) -> Vec<prometheus::proto::MetricFamily> {
    let mut family = prometheus::proto::MetricFamily::default();
    family.set_name(desc.fq_name.clone());
    family.set_help(desc.help.clone());
    family.set_field_type(kind);
    family.set_metric(metrics);
    vec![family]
}

/// A registry's exposition, as `/metrics` serves it (for tests).
#[cfg(test)]
fn text_of(r: &Registry) -> String {
    let mut out = Vec::new();
    TextEncoder::new().encode(&r.gather(), &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

/// The process-wide metrics. One registry per process: a config reload keeps counters.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// Status class labels, by [`status_ix`].
const STATUS_CLASSES: [&str; 6] = ["none", "1xx", "2xx", "3xx", "4xx", "5xx"];

fn status_ix(status: u16) -> u8 {
    match status / 100 {
        c @ 1..=5 => c as u8,
        _ => 0,
    }
}

/// `2xx`, `4xx`, … (`none` when no response was sent, e.g. the client went away).
pub fn status_class(status: u16) -> &'static str {
    STATUS_CLASSES[usize::from(status_ix(status))]
}

/// Method labels, by [`method_ix`]: a fixed set, so a client cannot mint series with
/// invented methods.
const METHODS: [&str; 8] = [
    "GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS", "PATCH", "other",
];

fn method_ix(m: &Method) -> u8 {
    match *m {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::PUT => 2,
        Method::POST => 3,
        Method::DELETE => 4,
        Method::OPTIONS => 5,
        Method::PATCH => 6,
        _ => 7,
    }
}

/// A fixed label for the method, so a client cannot mint series with invented methods.
pub fn method_label(m: &Method) -> &'static str {
    METHODS[usize::from(method_ix(m))]
}

/// Serves `/metrics` (and `/healthz`) on the metrics listener.
pub struct MetricsApp;

#[async_trait]
impl ServeHttp for MetricsApp {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        let path = session.req_header().uri.path();
        let (status, ctype, body) = match path {
            "/metrics" => (
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                METRICS.render(),
            ),
            "/healthz" => (200, "text/plain", b"ok\n".to_vec()),
            _ => (404, "text/plain", b"not found: try /metrics\n".to_vec()),
        };
        http::Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, ctype)
            .header(http::header::CONTENT_LENGTH, body.len())
            .body(body)
            .expect("static response")
    }
}

/// Convenience for tests and the admin side: the rendered text.
pub fn render_text() -> Bytes {
    Bytes::from(METRICS.render())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_exported_with_conventional_names() {
        METRICS
            .requests
            .with_label_values(&["r", "GET", "2xx", "main"])
            .inc();
        METRICS
            .fallback_replays
            .with_label_values(&["g", "main"])
            .inc();
        METRICS
            .upstream_errors
            .with_label_values(&["o", "timeout"])
            .inc();
        METRICS
            .request_duration
            .with_label_values(&["r"])
            .observe(std::time::Duration::from_millis(10));
        METRICS
            .upstream_duration
            .with_label_values(&["o"])
            .observe(std::time::Duration::from_millis(10));
        let text = String::from_utf8(render_text().to_vec()).unwrap();
        for name in [
            "cascade_requests_total{method=\"GET\",route=\"r\",served_from=\"main\",status=\"2xx\"} 1",
            "cascade_fallback_replays_total{group=\"g\",origin=\"main\"} 1",
            "cascade_upstream_errors_total{kind=\"timeout\",origin=\"o\"} 1",
            "cascade_request_duration_seconds_bucket",
            "cascade_upstream_duration_seconds_count{origin=\"o\"} 1",
        ] {
            assert!(text.contains(name), "missing {name}");
        }
    }

    #[test]
    fn labels_are_bounded() {
        assert_eq!(method_label(&Method::from_bytes(b"BREW").unwrap()), "other");
        assert_eq!(status_class(404), "4xx");
        assert_eq!(status_class(0), "none");
    }
}
