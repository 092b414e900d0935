//! Wasm plugins: a proxy-wasm ABI v0.2.1 host on wasmtime.
//!
//! ```text
//!  config ──► Runtime::load ──► Plugin (compiled Module + InstancePre, pool of configured
//!                                       instances, health/backoff, per-name PluginState)
//!  request ─► Runtime::exchange(route) ─► Exchange: one instance leased per plugin of the
//!             route's chain; request headers (chain order; HTTP calls → callout, answers
//!             delivered, the instances pooled meanwhile), response headers (reverse order;
//!             HTTP calls as in the request phase; then parking), log/done/delete; instances
//!             go back to the pool
//!  timer ──► tick thread ─► proxy_on_tick / proxy_on_queue_ready on idle instances
//! ```
//!
//! - `abi`      status codes, enums, header-map wire format, property paths (pure)
//! - `host`     store data, the per-callback `Env`, every hostcall (the `Linker`)
//! - `props`    readable/writable properties (`request.*`, `cascade.*`, …)
//! - `runtime`  engine + epoch ticker, compile (with the on-disk precompiled cache),
//!   instances, pool, traps/backoff, SIGHUP reload
//! - `idle`     a plugin's idle instances, per thread (an instance stays on one core)
//! - `exchange` one request's walk through its chain, and the glue the proxy phases call
//!
//! - `callout`  `proxy_http_call`: calls to configured origins, made while the request (or
//!   the response) waits
//! - `tick`     `proxy_on_tick` to idle instances on the plugin's period, and the ticks' calls;
//!   `proxy_on_queue_ready` to one idle instance of a queue's owner
//! - `queue`    shared queues: registry, bounded FIFOs, which are ready
//! - `limits`   every bound on what a guest can make the host allocate or grow, and how a
//!   hit is counted and logged
//!
//! Not implemented: gRPC callouts (they answer `UNIMPLEMENTED`).

pub mod abi;
mod callout;
mod exchange;
pub mod host;
mod idle;
pub mod limits;
mod props;
mod queue;
mod runtime;
mod tick;

pub use exchange::{on_request, on_response, write_reply, Exchange, Step, Verdict};
pub use runtime::{engine, Fault, FaultKind, ReloadReport, Runtime};
pub use tick::start as start_ticks;

use std::sync::Arc;

/// Names the properties hand out, by index (fixed for the life of a config).
#[derive(Debug, Default)]
pub struct Names {
    pub routes: Vec<String>,
    pub groups: Vec<String>,
    /// What `proxy_http_call` may reach: the config's origins, by index.
    pub origins: Vec<CallTarget>,
}

/// An origin as a plugin's HTTP call sees it.
#[derive(Debug)]
pub struct CallTarget {
    pub name: String,
    /// Only GET and HEAD calls.
    pub read_only: bool,
    /// The call's timeout when the plugin gives none (the origin's read timeout).
    pub timeout: std::time::Duration,
    /// Signed with cascade's credentials: calls follow the S3 policy (`boundary::s3`) as
    /// clients do, with no sub-resource allowed.
    pub signed: bool,
}

/// What the plugins of one request see and change besides the headers.
#[derive(Debug, Default)]
pub struct RequestInfo {
    pub route: usize,
    /// Origin group (writable through `cascade.origin_group`).
    pub group: usize,
    /// Object path sent upstream (writable through `cascade.upstream_path`).
    pub key: String,
    pub source: Option<std::net::SocketAddr>,
    /// The `X-Cache` value, for `cascade.cache_status` (response phase).
    pub cache_status: Option<&'static str>,
    pub(crate) routing_changed: bool,
    pub(crate) key_changed: bool,
    pub(crate) route_error: Option<String>,
    pub(crate) custom: Vec<(Vec<u8>, Vec<u8>)>,
    pub(crate) local: Option<LocalReply>,
    pub(crate) closed: bool,
    /// HTTP calls dispatched by the running callback, not yet made.
    pub(crate) calls: Vec<callout::Call>,
    /// The answer `proxy_on_http_call_response` is delivering.
    pub(crate) answer: Option<callout::Answer>,
    /// The running plugin called `proxy_continue_stream` on the request.
    pub(crate) resumed: bool,
    /// HTTP calls the running plugin may still dispatch for this request.
    pub(crate) calls_left: u32,
}

/// A response a plugin asked for with `proxy_send_local_response`.
#[derive(Debug, Clone)]
pub struct LocalReply {
    pub status: u16,
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    pub body: bytes::Bytes,
    pub details: String,
    pub plugin: Arc<str>,
}
