//! The YAML schema, as serde types. Only shape lives here: every field that a
//! user can write, its default and its human-readable form. Cross-field rules
//! (dangling names, URL syntax, environment lookups) live in `validate.rs`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::units::{parse_duration, parse_size};

/// The whole file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: ServerSection,
    #[serde(default)]
    pub listen: Vec<Listener>,
    #[serde(default)]
    pub metrics: Option<MetricsSection>,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub origins: BTreeMap<String, serde_yaml::Value>,
    #[serde(default)]
    pub groups: BTreeMap<String, serde_yaml::Value>,
    #[serde(default)]
    pub routes: Vec<serde_yaml::Value>,
    #[serde(default)]
    pub cache: Option<CacheSection>,
    #[serde(default)]
    pub admin: Option<AdminSection>,
    #[serde(default)]
    pub plugins: BTreeMap<String, serde_yaml::Value>,
    #[serde(default)]
    pub redis: Option<RedisSection>,
}

/// `redis:` — where bucket sets keep their shared state (usage, reservations, locations).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSection {
    /// The environment variable holding the URL (`redis://host:6379/0`, `rediss://` for TLS):
    /// it may carry a password, so it is never written in the config.
    pub url_env: String,
    #[serde(default = "d_redis_prefix")]
    pub key_prefix: String,
    /// Every Redis call is abandoned after this long.
    #[serde(default = "d_redis_timeout", deserialize_with = "de_duration")]
    pub timeout: Duration,
    #[serde(default)]
    pub on_error: RedisOnError,
}

fn d_redis_prefix() -> String {
    "cascade:".into()
}
fn d_redis_timeout() -> Duration {
    Duration::from_millis(50)
}

/// What writes do while Redis is unreachable.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RedisOnError {
    /// Go on with this instance's view; the changes are replayed to Redis when it returns.
    #[default]
    Local,
    /// Refuse uploads with 503 until Redis answers again.
    Deny,
}

/// `groups.<name>.buckets`: a bucket set in place of `main:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBucketSet {
    #[serde(default)]
    pub strategy: Placement,
    pub members: Vec<RawMember>,
    #[serde(default)]
    pub cooldown: SetCooldown,
    /// Rebuild usage and the location index from the members' listings this often
    /// (default: only at start without state, and on the admin API's request).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub reconcile_every: Option<Duration>,
}

/// How a bucket set places a new object.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// The member with the lowest `priority` number that has room.
    #[default]
    Priority,
    /// The member with the lowest usage percentage.
    LeastUsed,
    /// Weighted round robin over the members with room.
    Weighted,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMember {
    pub origin: String,
    #[serde(deserialize_with = "de_size")]
    pub capacity: u64,
    #[serde(default = "d_one")]
    pub priority: u32,
    #[serde(default = "d_one")]
    pub weight: u32,
}

fn d_one() -> u32 {
    1
}

/// A bucket set member's cooldown: `failures` consecutive failed uploads take it out of
/// placement for `step × failures`, at most `max`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SetCooldown {
    #[serde(default = "d_set_failures")]
    pub failures: u32,
    #[serde(default = "d_set_step", deserialize_with = "de_duration")]
    pub step: Duration,
    #[serde(default = "d_set_max", deserialize_with = "de_duration")]
    pub max: Duration,
}

impl Default for SetCooldown {
    fn default() -> Self {
        SetCooldown {
            failures: d_set_failures(),
            step: d_set_step(),
            max: d_set_max(),
        }
    }
}

fn d_set_failures() -> u32 {
    3
}
fn d_set_step() -> Duration {
    Duration::from_secs(5 * 60)
}
fn d_set_max() -> Duration {
    Duration::from_secs(30 * 60)
}

/// One entry of `plugins:` — a proxy-wasm module and how to run it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlugin {
    /// The `.wasm` file (relative to the config file's directory).
    pub wasm: String,
    /// Handed to `proxy_on_configure`: a string as its raw bytes, anything else as JSON.
    #[serde(default)]
    pub config: serde_yaml::Value,
    /// Handed to `proxy_on_vm_start`, same encoding.
    #[serde(default)]
    pub vm_config: serde_yaml::Value,
    #[serde(default)]
    pub on_error: OnError,
    #[serde(default)]
    pub limits: PluginLimits,
    /// Environment variables (names) handed to the plugin's WASI environment, e.g. for the
    /// `auth` plugin's `*_env` secrets. Only these are visible to the plugin.
    #[serde(default)]
    pub env: Vec<String>,
    /// Call `proxy_on_request_body`/`proxy_on_response_body` (default true). `false` saves
    /// two Wasm calls per body chunk for plugins that never look at bodies.
    #[serde(default = "d_true")]
    pub bodies: bool,
    /// Origins (names) the plugin may call with `proxy_http_call`; none by default.
    #[serde(default)]
    pub calls: Vec<String>,
}

/// What a request gets when its plugin fails (trap, timeout, memory, unavailable).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Fail closed: 503 (the default; right for auth).
    #[default]
    Deny,
    /// Fail open: skip the plugin for this request.
    Allow,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginLimits {
    /// Linear memory cap of one instance.
    #[serde(default = "d_plugin_memory", deserialize_with = "de_size")]
    pub memory: u64,
    /// Deadline of one callback.
    #[serde(default = "d_plugin_time", deserialize_with = "de_duration")]
    pub time: Duration,
    /// Most body bytes held for a plugin that pauses a body (`Action::Pause`) to see more;
    /// also what a body may grow to by the plugin's `proxy_set_buffer_bytes`.
    #[serde(default = "d_plugin_body", deserialize_with = "de_size")]
    pub body: u64,
    /// Bytes (names + values) the plugin's edits may grow a header map to.
    #[serde(default = "d_plugin_headers", deserialize_with = "de_size")]
    pub headers: u64,
    /// Bytes (keys + values) of the plugin's shared data.
    #[serde(default = "d_plugin_shared_data", deserialize_with = "de_size")]
    pub shared_data: u64,
    /// Bytes of one shared-data value.
    #[serde(default = "d_plugin_shared_value", deserialize_with = "de_size")]
    pub shared_value: u64,
}

impl Default for PluginLimits {
    fn default() -> Self {
        PluginLimits {
            memory: d_plugin_memory(),
            time: d_plugin_time(),
            body: d_plugin_body(),
            headers: d_plugin_headers(),
            shared_data: d_plugin_shared_data(),
            shared_value: d_plugin_shared_value(),
        }
    }
}

fn d_plugin_memory() -> u64 {
    32 << 20
}
fn d_plugin_time() -> Duration {
    Duration::from_millis(100)
}
fn d_true() -> bool {
    true
}
fn d_plugin_body() -> u64 {
    1 << 20
}
fn d_plugin_headers() -> u64 {
    crate::plugin::limits::DEFAULT_HEADERS
}
fn d_plugin_shared_data() -> u64 {
    crate::plugin::limits::DEFAULT_SHARED_DATA
}
fn d_plugin_shared_value() -> u64 {
    crate::plugin::limits::DEFAULT_SHARED_VALUE
}

/// `cache:` — the edge cache. Absent: nothing is cached.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSection {
    #[serde(default = "d_cache_memory", deserialize_with = "de_size")]
    pub memory: u64,
    #[serde(default)]
    pub disk: Option<DiskSection>,
    /// Bytes all fills in flight (and disk hits read whole for the memory tier) may hold in
    /// memory together.
    #[serde(default = "d_fill_memory", deserialize_with = "de_size")]
    pub fill_memory: u64,
    #[serde(default = "d_max_object", deserialize_with = "de_size")]
    pub max_object_size: u64,
    #[serde(default = "d_default_ttl", deserialize_with = "de_duration")]
    pub default_ttl: Duration,
    #[serde(default = "d_negative_ttl", deserialize_with = "de_duration")]
    pub negative_ttl: Duration,
    #[serde(default = "d_lock_timeout", deserialize_with = "de_duration")]
    pub lock_timeout: Duration,
    #[serde(default = "d_stale_if_error", deserialize_with = "de_duration")]
    pub stale_if_error: Duration,
    #[serde(default = "d_zero", deserialize_with = "de_duration")]
    pub stale_while_revalidate: Duration,
    #[serde(default = "d_slice", deserialize_with = "de_size")]
    pub slice_size: u64,
    /// Most variants (`Vary`) stored per object; further ones are served, not stored.
    #[serde(default = "d_max_variants")]
    pub max_variants: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSection {
    pub path: String,
    #[serde(deserialize_with = "de_size")]
    pub size: u64,
}

fn d_cache_memory() -> u64 {
    256 << 20
}
fn d_fill_memory() -> u64 {
    256 << 20
}
fn d_max_object() -> u64 {
    1 << 30
}
fn d_default_ttl() -> Duration {
    Duration::from_secs(3600)
}
fn d_negative_ttl() -> Duration {
    Duration::from_secs(10)
}
fn d_lock_timeout() -> Duration {
    Duration::from_secs(10)
}
fn d_stale_if_error() -> Duration {
    Duration::from_secs(300)
}
fn d_zero() -> Duration {
    Duration::ZERO
}
fn d_slice() -> u64 {
    1 << 20
}
fn d_max_variants() -> u32 {
    8
}

/// `admin:` — the admin API (purge). The bearer token comes from the environment.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    pub addr: String,
    pub token_env: String,
}

/// A route's `cache:`: `true`/`false`, or a map.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawRouteCache {
    Switch(bool),
    Detailed(RouteCacheMap),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteCacheMap {
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub ttl: Option<Duration>,
    /// Cache answers to requests that carry `Authorization` (off by default).
    #[serde(default)]
    pub cache_authorized: bool,
    /// Cache answers to requests that carry `Cookie` when an origin of the group sees the
    /// cookie (off by default; behind signed or directory origins cookies never matter).
    #[serde(default)]
    pub cache_cookies: bool,
    /// What the query string does to caching.
    #[serde(default)]
    pub query: CacheQuery,
    /// What a response with `Set-Cookie` does to caching.
    #[serde(default)]
    pub set_cookie: SetCookie,
}

/// A route's `cache.query`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum CacheQuery {
    /// The query is part of the cache key (as in nginx and Varnish).
    #[default]
    Include,
    /// Reads go upstream without their query and share the query-less entry.
    Ignore,
    /// Reads with a query are not cached.
    Bypass,
}

/// A route's `cache.set_cookie`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum SetCookie {
    /// A response with `Set-Cookie` goes to its client and is not stored.
    #[default]
    Pass,
    /// The response is stored without its `Set-Cookie` (its own client still gets it).
    Strip,
}

/// A route's `keys`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum KeyMode {
    /// Paths with dot or empty segments, encoded separators, control characters are 400.
    #[default]
    Strict,
    /// Such paths are object keys as they are (for S3-style origins that never resolve them).
    Raw,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Worker threads of the proxy service (default: the number of CPUs).
    #[serde(default)]
    pub threads: Option<usize>,
    /// How long a shutdown waits for in-flight requests (Pingora's default is 5 minutes;
    /// ours is container friendly).
    #[serde(default = "default_grace", deserialize_with = "de_duration")]
    pub grace_period: Duration,
    /// Where the Unix sockets of directory origins are created: made 0700 when missing,
    /// refused when not ours or writable by group or others (default: a fresh private
    /// directory under the system temp dir, removed at exit).
    #[serde(default)]
    pub runtime_dir: Option<String>,
    /// Access log on stderr (one line per request).
    #[serde(default = "default_true")]
    pub access_log: bool,
    /// Directory of precompiled plugin modules (keyed by module hash and engine); optional.
    /// Used only when ours and not writable by group or others; entries are checksummed.
    #[serde(default)]
    pub plugin_cache: Option<String>,
    /// Slots of the plugin instance pool (wasmtime's pooling allocator), shared by every
    /// plugin: the most configured instances alive at once, idle or leased. Fixed at start.
    #[serde(default = "default_plugin_instances")]
    pub plugin_instances: u32,
    /// Write buffer of each client connection: a response whose header and body fit goes
    /// out in one send (Pingora's default, 1460 bytes, sends a 4 KiB hit in two); a write
    /// that does not fit goes out with what is gathered in one vectored send, and a large
    /// one with nothing gathered bypasses it. A body of known length that trickles in is
    /// held until this many bytes or its end (chunked bodies are flushed per chunk).
    /// Memory: up to this much per connection while a response is written, none while idle
    /// (`sendbuf.rs`). 0 turns buffering off.
    #[serde(default = "default_write_buffer", deserialize_with = "de_size")]
    pub write_buffer: u64,
    /// Read buffer of each client connection, held for the connection's whole life, idle
    /// or not. 0 (the default): none — Pingora reads a request header straight into its
    /// own header buffer and a body into per-read buffers, so an idle keep-alive costs a
    /// few KiB instead of Pingora's default 64 KiB. A buffer only helps clients that
    /// pipeline many small requests.
    #[serde(default, deserialize_with = "de_size")]
    pub read_buffer: u64,
    /// Bounds on a client's request header (over them: 431).
    #[serde(default)]
    pub header_limits: HeaderLimits,
    /// How long a client connection may sit idle between two requests before cascade closes
    /// it (nginx's `keepalive_timeout`, default 75 s). Pingora's own default keeps an idle
    /// HTTP/1.1 connection forever, or as long as the client's `Keep-Alive: timeout=` asks;
    /// an idle keep-alive holds ~6 KiB (`release_idle`). Whole seconds; 0 = no keep-alive.
    #[serde(default = "default_keepalive", deserialize_with = "de_duration")]
    pub keepalive_timeout: Duration,
    /// The longest cascade waits for a client's next bytes of a request body (nginx's
    /// `client_body_timeout`; Pingora's fixed default, 60 s, made a setting). Over it: 408
    /// and the connection is closed; until then a stalled upload holds its connection, its
    /// upstream connection and (in a bucket set) its reservation.
    #[serde(default = "default_client_body", deserialize_with = "de_duration")]
    pub client_body_timeout: Duration,
    /// The longest cascade waits for a new connection's first bytes, and for each later
    /// read of a request header (nginx's `client_header_timeout`, default 60 s; Pingora's
    /// fixed 60 s made a setting). Over it the connection is closed. Whole seconds, at
    /// least one. (Between two requests of a keep-alive: `keepalive_timeout`; with
    /// `release_idle` off, a keep-alive's header reads wait up to `keepalive_timeout` too.)
    #[serde(default = "default_client_header", deserialize_with = "de_duration")]
    pub client_header_timeout: Duration,
    /// The longest a response waits for a client that takes none of its bytes (nginx's
    /// `send_timeout`, default 60 s; Pingora has none): the clock restarts whenever the
    /// client takes some, so a slow but steady download is never cut off, while one that
    /// stops reading gives back its connection, its buffers and its upstream connection
    /// after it.
    #[serde(default = "default_send_timeout", deserialize_with = "de_duration")]
    pub send_timeout: Duration,
    /// The most client connections cascade holds at once, all listeners together (nginx's
    /// `worker_connections`, for the whole process). At the cap, a connection waiting for
    /// its next request (or a new one that has sent nothing yet; needs `release_idle`) is
    /// closed to make room, the one waiting longest first, as nginx does; when none is
    /// waiting, the new connection gets `503` with `Retry-After` and is closed. Default:
    /// what the open-files limit allows, each connection counting two descriptors (its own
    /// and an upstream one) after a reserve (`capacity.rs`); cascade raises its soft limit
    /// to the hard one at start.
    #[serde(default)]
    pub max_connections: Option<u64>,
    /// Until a request's first bytes arrive (on a new connection and between two requests
    /// of a keep-alive), hold only the connection, no session (`conn.rs`): ~6 KiB per idle
    /// keep-alive instead of ~24; what that wait reads starts the request's header, so it
    /// costs no extra system call. Off: the session is built at once, as Pingora does.
    #[serde(default = "default_true")]
    pub release_idle: bool,
    /// Whose pool holds the connections of client requests (reads and writes) to HTTP and
    /// HTTPS origins.
    /// `cascade` (the default, `origin::pool`): also keeps a connection whose answer was left
    /// unfinished or replayed (main's 404 before a fallback, a `retry_on` status, a client
    /// gone mid-way) once its end is read (at most 64 KiB within 1 s), so a fallback request
    /// does not cost a new connection (and for https a TLS handshake) to main. `pingora`:
    /// Pingora's pool, which closes those. cascade's also closes an upload's connection
    /// that the origin refused (it may be closing it unread), where Pingora's hands it to
    /// the next upload.
    #[serde(default)]
    pub upstream_pool: UpstreamPool,
    /// The most one read of an origin's answer body takes (`upstream_pool: cascade` only;
    /// nginx's `proxy_buffer_size`). Pingora reads a body in chunks of up to 64 KiB (the
    /// default) and, for every client that has fallen behind a pass-through download, holds
    /// a few of them (in its pipe, and copied into its write buffer when it writes a batch),
    /// plus its read buffer; 8 KiB halves that memory (~400 →
    /// ~180 KiB per slow 1 MiB download) and costs CPU per byte on fast downloads (every
    /// chunk crosses Pingora's pipe: ~+60% per 1 MiB pass-through, still under nginx's).
    /// Hits are not affected, nor https origins at 16 KiB or more (openssl returns at most
    /// one ≤ 16 KiB record per read anyway). The first read of an answer (its head) is capped
    /// too.
    #[serde(default = "default_upstream_read_size", deserialize_with = "de_size")]
    pub upstream_read_size: u64,
}

/// `server.upstream_pool`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamPool {
    #[default]
    Cascade,
    Pingora,
}

/// `server.header_limits`: what a client's request header may hold. nginx allows 8 KiB per
/// line and 32 KiB in all by default; Cloudflare 32 KiB per header and 128 KiB in all. Over a
/// limit the request gets 431 and never reaches a plugin or an origin.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HeaderLimits {
    /// Longest request target or header field (name + value).
    #[serde(default = "d_header_line", deserialize_with = "de_size")]
    pub max_line: u64,
    /// The whole header: request target and every field.
    #[serde(default = "d_header_total", deserialize_with = "de_size")]
    pub max_total: u64,
    /// Number of header fields.
    #[serde(default = "d_header_fields")]
    pub max_fields: u32,
}

impl Default for HeaderLimits {
    fn default() -> Self {
        HeaderLimits {
            max_line: d_header_line(),
            max_total: d_header_total(),
            max_fields: d_header_fields(),
        }
    }
}

fn d_header_line() -> u64 {
    16 << 10
}
fn d_header_total() -> u64 {
    64 << 10
}
fn d_header_fields() -> u32 {
    100
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            threads: None,
            grace_period: default_grace(),
            runtime_dir: None,
            access_log: true,
            plugin_cache: None,
            plugin_instances: default_plugin_instances(),
            write_buffer: default_write_buffer(),
            read_buffer: 0,
            header_limits: HeaderLimits::default(),
            keepalive_timeout: default_keepalive(),
            client_body_timeout: default_client_body(),
            client_header_timeout: default_client_header(),
            send_timeout: default_send_timeout(),
            max_connections: None,
            release_idle: true,
            upstream_pool: UpstreamPool::Cascade,
            upstream_read_size: default_upstream_read_size(),
        }
    }
}

/// Covers the header of a response and a body of up to ~7.5 KiB (playlists, small images)
/// while holding back at most 8 KiB of a body that trickles in with a known length.
pub const DEFAULT_WRITE_BUFFER: u64 = 8 * 1024;
/// The most `server.write_buffer` may be.
pub const MAX_WRITE_BUFFER: u64 = 1024 * 1024;

/// Pingora's body read buffer: its reads never ask for more.
pub const MAX_UPSTREAM_READ_SIZE: u64 = 64 * 1024;
/// Below this a read costs more in Pingora's pipe than the memory it saves.
pub const MIN_UPSTREAM_READ_SIZE: u64 = 1024;

fn default_upstream_read_size() -> u64 {
    MAX_UPSTREAM_READ_SIZE
}

fn default_write_buffer() -> u64 {
    DEFAULT_WRITE_BUFFER
}

/// Wasmtime's own default pool size.
pub const DEFAULT_PLUGIN_INSTANCES: u32 = 1000;
/// Each slot reserves 4 GiB + guards of address space (not memory): 10,000 slots are
/// ~40 TiB of the 128 TiB a Linux x86-64 process has.
pub const MAX_PLUGIN_INSTANCES: u32 = 10_000;

fn default_plugin_instances() -> u32 {
    DEFAULT_PLUGIN_INSTANCES
}

fn default_client_header() -> Duration {
    Duration::from_secs(60)
}

fn default_client_body() -> Duration {
    Duration::from_secs(60)
}

fn default_send_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_keepalive() -> Duration {
    Duration::from_secs(75)
}

fn default_grace() -> Duration {
    Duration::from_secs(5)
}
fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub addr: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    pub addr: String,
}

/// Upstream timeouts. Top-level values are the defaults; an origin may override each.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// TCP connect (and TLS handshake) to the origin.
    #[serde(default = "d_connect", deserialize_with = "de_duration")]
    pub connect: Duration,
    /// Longest wait for any read from the origin (response header or a body chunk).
    #[serde(default = "d_read", deserialize_with = "de_duration")]
    pub read: Duration,
    /// Longest wait for any write to the origin (request body streaming).
    #[serde(default = "d_read", deserialize_with = "de_duration")]
    pub write: Duration,
    /// Longest time one upstream attempt may take, from connect to the last body byte.
    #[serde(default = "d_total", deserialize_with = "de_duration")]
    pub total: Duration,
}

fn d_connect() -> Duration {
    Duration::from_secs(3)
}
fn d_read() -> Duration {
    Duration::from_secs(30)
}
fn d_total() -> Duration {
    Duration::from_secs(300)
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: d_connect(),
            read: d_read(),
            write: d_read(),
            total: d_total(),
        }
    }
}

/// Per-origin overrides of [`Timeouts`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutOverrides {
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub connect: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub read: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub write: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub total: Option<Duration>,
}

impl TimeoutOverrides {
    pub fn apply(&self, base: Timeouts) -> Timeouts {
        Timeouts {
            connect: self.connect.unwrap_or(base.connect),
            read: self.read.unwrap_or(base.read),
            write: self.write.unwrap_or(base.write),
            total: self.total.unwrap_or(base.total),
        }
    }
}

/// One origin: exactly one of `url` (any HTTP(S) origin or bucket) or `dir`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOrigin {
    /// One peer: the shorthand for `peers: [{url: ...}]`.
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub dir: Option<String>,
    /// Several peers holding the same content (replicas, mirrors, regions).
    #[serde(default)]
    pub peers: Option<Vec<RawPeer>>,
    /// Refuse writes to this origin (405).
    #[serde(default)]
    pub read_only: bool,
    /// SigV4 signing; the default of peers without their own `s3`.
    #[serde(default)]
    pub s3: Option<RawS3>,
    /// Verify the origin's TLS certificate (https only).
    #[serde(default = "default_true")]
    pub tls_verify: bool,
    #[serde(default)]
    pub timeouts: TimeoutOverrides,
    /// How a request picks a peer of the best usable priority tier.
    #[serde(default)]
    pub balance: Balance,
    /// Active health monitor (none by default).
    #[serde(default)]
    pub health: Option<RawHealth>,
    /// Passive health: outlier ejection.
    #[serde(default)]
    pub passive: Passive,
    /// Other peers of this origin a request may try after a failed attempt.
    #[serde(default = "d_retries")]
    pub retries: u32,
    /// What makes an attempt fail over to another peer: `connect`, `timeout`, or a status.
    #[serde(default = "d_retry_on")]
    pub retry_on: Vec<serde_yaml::Value>,
    /// How often host names are resolved again.
    #[serde(default = "d_dns_refresh", deserialize_with = "de_duration")]
    pub dns_refresh: Duration,
}

/// One peer of an origin.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPeer {
    pub url: String,
    /// Its name in metrics, `X-Served-From` and the admin API (default: host[:port]).
    #[serde(default)]
    pub name: Option<String>,
    /// Share of requests within its tier (0: never chosen while a weighted peer is usable).
    #[serde(default = "d_weight")]
    pub weight: u32,
    /// Tier: lower is preferred; a tier is used only when no better tier has a usable peer.
    #[serde(default = "d_priority")]
    pub priority: u32,
    #[serde(default)]
    pub s3: Option<RawS3>,
    #[serde(default)]
    pub tls_verify: Option<bool>,
}

fn d_weight() -> u32 {
    1
}
fn d_priority() -> u32 {
    1
}
fn d_retries() -> u32 {
    2
}
fn d_retry_on() -> Vec<serde_yaml::Value> {
    ["connect", "timeout"]
        .into_iter()
        .map(|s| serde_yaml::Value::String(s.into()))
        .chain(
            [502u64, 503, 504]
                .into_iter()
                .map(|n| serde_yaml::Value::Number(n.into())),
        )
        .collect()
}
fn d_dns_refresh() -> Duration {
    Duration::from_secs(60)
}

/// An origin's `balance`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Weighted round robin (smooth, as nginx's).
    #[default]
    RoundRobin,
    /// The peer with the fewest requests in flight (weighted).
    LeastOutstanding,
    /// Consistent hashing on the object key: each key on one peer; a new peer takes ~1/N.
    Hash,
    /// Weighted random.
    Random,
}

impl Balance {
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::LeastOutstanding => "least_outstanding",
            Balance::Hash => "hash",
            Balance::Random => "random",
        }
    }
}

/// An origin's `health`: an active monitor like a Cloudflare LB monitor.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    /// The object asked for (signed like any request on an S3 peer).
    pub path: String,
    #[serde(default)]
    pub method: Option<String>,
    /// Statuses that mean up: numbers, or classes such as "2xx" (default [200]).
    #[serde(default)]
    pub expected_codes: Option<Vec<serde_yaml::Value>>,
    /// A substring the body must contain (implies GET).
    #[serde(default)]
    pub expected_body: Option<String>,
    #[serde(default = "d_health_interval", deserialize_with = "de_duration")]
    pub interval: Duration,
    #[serde(default = "d_health_timeout", deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// Consecutive successes that mark a down peer up.
    #[serde(default = "d_two")]
    pub rise: u32,
    /// Consecutive failures that mark an up peer down.
    #[serde(default = "d_two")]
    pub fall: u32,
}

fn d_health_interval() -> Duration {
    Duration::from_secs(10)
}
fn d_health_timeout() -> Duration {
    Duration::from_secs(2)
}
fn d_two() -> u32 {
    2
}

/// An origin's `passive`: consecutive failures eject a peer for a cooldown that doubles per
/// consecutive ejection.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Passive {
    /// Consecutive failures that eject a peer (0: never eject).
    #[serde(default = "d_passive_failures")]
    pub failures: u32,
    #[serde(default = "d_cooldown", deserialize_with = "de_duration")]
    pub cooldown: Duration,
    #[serde(default = "d_max_cooldown", deserialize_with = "de_duration")]
    pub max_cooldown: Duration,
}

impl Default for Passive {
    fn default() -> Self {
        Passive {
            failures: d_passive_failures(),
            cooldown: d_cooldown(),
            max_cooldown: d_max_cooldown(),
        }
    }
}

fn d_passive_failures() -> u32 {
    3
}
fn d_cooldown() -> Duration {
    Duration::from_secs(30)
}
fn d_max_cooldown() -> Duration {
    Duration::from_secs(30 * 60)
}

/// SigV4 signing for an origin. Credentials are only ever named, never written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawS3 {
    #[serde(default = "default_region")]
    pub region: String,
    #[serde(default = "default_service")]
    pub service: String,
    pub access_key_env: String,
    pub secret_key_env: String,
    #[serde(default)]
    pub session_token_env: Option<String>,
    /// More client headers to forward and sign (`x-amz-server-side-encryption`, or a prefix
    /// ending in `*`), beyond the built-in allowlist.
    #[serde(default)]
    pub forward_headers: Vec<String>,
    /// The URL's host names the bucket (`bucket.s3.region.amazonaws.com`). Detected for AWS,
    /// GCS, R2, Spaces, B2 and Wasabi host names; other providers say it here. A signed URL
    /// that names no bucket at all (a service root) is refused.
    #[serde(default)]
    pub virtual_hosted: Option<bool>,
}

fn default_region() -> String {
    "us-east-1".into()
}
fn default_service() -> String {
    "s3".into()
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum CacheFallback {
    /// Pass the fallback's own caching headers through.
    #[default]
    None,
    /// Mark fallback content `Cache-Control: public, max-age=31536000, immutable`.
    Immutable,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGroup {
    /// The main origin; or `buckets:` for a bucket set.
    #[serde(default)]
    pub main: Option<String>,
    #[serde(default)]
    pub buckets: Option<RawBucketSet>,
    #[serde(default)]
    pub fallbacks: Vec<String>,
    #[serde(default = "default_fallback_on")]
    pub fallback_on: Vec<u16>,
    /// Bypass mode: never consult the fallbacks (zero overhead).
    #[serde(default)]
    pub skip_fallback: bool,
    #[serde(default)]
    pub cache_fallback: CacheFallback,
    /// Refuse every write through this group (405).
    #[serde(default)]
    pub read_only: bool,
    /// Reads go on to the fallbacks when main cannot answer (every peer down, or its
    /// attempts exhausted on connect errors, timeouts or `retry_on` statuses).
    #[serde(default = "default_true")]
    pub failover: bool,
    /// Send the client's `Authorization` and `Cookie` to the fallbacks too (default: main only).
    #[serde(default)]
    pub forward_credentials: bool,
}

fn default_fallback_on() -> Vec<u16> {
    vec![404]
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    #[serde(default)]
    pub name: Option<String>,
    /// Exact host (`media.example.com`), wildcard (`*.example.com`) or absent for any host.
    #[serde(default)]
    pub host: Option<String>,
    /// Path prefix, matched on segment boundaries (`/media` matches `/media/x`, not `/mediax`).
    #[serde(default = "default_path")]
    pub path: String,
    /// Remove the matched prefix before the path goes upstream.
    #[serde(default)]
    pub strip_prefix: bool,
    pub group: String,
    /// Largest accepted request body (PUT/POST); larger ones get 413 before any byte is read.
    #[serde(default, deserialize_with = "de_opt_size")]
    pub max_upload_size: Option<u64>,
    /// Uploads through a bucket set must say their size (411 without `Content-Length`);
    /// otherwise one without it reserves `max_upload_size`.
    #[serde(default)]
    pub require_content_length: bool,
    #[serde(default)]
    pub cache: Option<RawRouteCache>,
    /// Ordered plugin chain (names from `plugins:`).
    #[serde(default)]
    pub plugins: Vec<String>,
    /// Which paths make keys: `strict` (default) or `raw`.
    #[serde(default)]
    pub keys: KeyMode,
    /// S3 sub-resources a signed group forwards on this route (`versionId`, `list`, ...).
    #[serde(default)]
    pub s3_allow: Vec<String>,
}

fn default_path() -> String {
    "/".into()
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let v = HumanValue::deserialize(d)?;
    parse_duration(&v.0).map_err(serde::de::Error::custom)
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let v = HumanValue::deserialize(d)?;
    parse_duration(&v.0)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = HumanValue::deserialize(d)?;
    parse_size(&v.0).map_err(serde::de::Error::custom)
}

fn de_opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let v = HumanValue::deserialize(d)?;
    parse_size(&v.0).map(Some).map_err(serde::de::Error::custom)
}

/// A scalar written either as a string (`10s`, `512MiB`) or a bare number.
struct HumanValue(String);

impl<'de> Deserialize<'de> for HumanValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = HumanValue;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number or a string such as `10s` or `512MiB`")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<HumanValue, E> {
                Ok(HumanValue(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<HumanValue, E> {
                Ok(HumanValue(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<HumanValue, E> {
                Ok(HumanValue(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<HumanValue, E> {
                Ok(HumanValue(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}
