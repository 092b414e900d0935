//! The host side of the ABI: the store data of one instance ([`Host`]), what a callback may
//! touch while it runs ([`Env`]: raw pointers to the phase's request/response header and the
//! request's [`RequestInfo`], set only for the duration of one synchronous call), and the
//! [`linker`] that defines every `env.proxy_*` and `wasi_snapshot_preview1.*` import.
//!
//! Rules kept here: the host never unwraps UTF-8 from a guest or a client (bytes pass
//! through); a bad pointer from the guest is `INVALID_MEMORY_ACCESS`, never a panic; every
//! length, size and count a guest passes is checked against the guest's memory and against
//! its bound in [`super::limits`] before anything is copied or kept; calls the host does not
//! implement answer `UNIMPLEMENTED` (or WASI `ENOSYS`) so any SDK plugin links.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use pingora_http::{RequestHeader, ResponseHeader};
use prometheus::{Histogram, IntCounter, IntGauge};
use wasmtime::{Caller, Engine, Linker, Memory, Module, ResourceLimiter, TypedFunc, Val};

use super::abi::{self, errno, map, status};
use super::limits::{self, Hits, Limit, Limits};
use super::props;
use super::{LocalReply, Names, RequestInfo};
use crate::metrics::{ShardedHistogram, METRICS};

/// Shared data of a plugin: key → (value, cas), and the bytes of its keys and values
/// (bounded by `limits.shared_data`).
#[derive(Default)]
struct SharedData {
    map: HashMap<Vec<u8>, (Vec<u8>, u32)>,
    bytes: usize,
}

/// Serialization scratch kept between calls up to this capacity; a larger one (a big body or
/// shared value was returned) is freed, so an idle instance holds no large host buffer.
const SCRATCH_KEEP: usize = 64 << 10;

/// A plugin's state that outlives its instances and reloads: shared data, defined metrics,
/// the host's own series for it.
pub struct PluginState {
    pub name: String,
    shared: Mutex<SharedData>,
    metrics: RwLock<MetricTable>,
    /// Its hits of the limits on guest-driven allocations.
    pub hits: Hits,
    /// trap, timeout, memory
    pub traps: [IntCounter; 3],
    /// request, response, log, call (answers delivered to `proxy_on_http_call_response`)
    pub durations: [Arc<ShardedHistogram>; 4],
    pub instances: IntGauge,
    /// Requests that found the instance pool full.
    pub pool_full: IntCounter,
    /// Contexts lost with a shared instance another request's fault discarded.
    pub lost: IntCounter,
    pub failures_deny: IntCounter,
    pub failures_allow: IntCounter,
}

#[derive(Default)]
struct MetricTable {
    by_name: HashMap<(i32, String), u32>,
    defs: Vec<MetricDef>,
}

enum MetricDef {
    Counter(IntCounter),
    Gauge(IntGauge),
    Histogram(Histogram),
}

impl PluginState {
    pub fn new(name: &str) -> PluginState {
        let m = &*METRICS;
        let trap = |k: &str| m.plugin_traps.with_label_values(&[name, k]);
        let dur = |p: &str| m.plugin_duration.with_label_values(&[name, p]);
        PluginState {
            name: name.to_string(),
            shared: Mutex::new(SharedData::default()),
            metrics: RwLock::new(MetricTable::default()),
            hits: Hits::new(name),
            traps: [trap("trap"), trap("timeout"), trap("memory")],
            durations: [dur("request"), dur("response"), dur("log"), dur("call")],
            instances: m.plugin_instances.with_label_values(&[name]),
            pool_full: m.plugin_pool_full.with_label_values(&[name]),
            lost: m.plugin_lost.with_label_values(&[name]),
            failures_deny: m.plugin_failures.with_label_values(&[name, "deny"]),
            failures_allow: m.plugin_failures.with_label_values(&[name, "allow"]),
        }
    }

    /// The failure counter of policy `on_error`.
    pub fn failures(&self, on_error: crate::config::OnError) -> &IntCounter {
        match on_error {
            crate::config::OnError::Deny => &self.failures_deny,
            crate::config::OnError::Allow => &self.failures_allow,
        }
    }

    /// The id of metric `name` of `kind`, defined on first use; `None` for an unknown kind or
    /// past [`limits::MAX_METRICS`] (every definition is a Prometheus series for the life of
    /// the process).
    fn define_metric(&self, kind: i32, name: &[u8]) -> Option<u32> {
        let name = String::from_utf8_lossy(name).into_owned();
        let mut t = self.metrics.write();
        if let Some(id) = t.by_name.get(&(kind, name.clone())) {
            return Some(*id);
        }
        if t.defs.len() >= limits::MAX_METRICS {
            self.hits.hit(&self.name, Limit::Metrics, || {
                format!(
                    "more than {} metrics defined; refusing `{name}`",
                    limits::MAX_METRICS
                )
            });
            return None;
        }
        let labels = [self.name.as_str(), name.as_str()];
        let m = &*METRICS;
        let def = match kind {
            0 => MetricDef::Counter(m.plugin_counter.with_label_values(&labels)),
            1 => MetricDef::Gauge(m.plugin_gauge.with_label_values(&labels)),
            2 => MetricDef::Histogram(m.plugin_histogram.with_label_values(&labels)),
            _ => return None,
        };
        t.defs.push(def);
        let id = t.defs.len() as u32;
        t.by_name.insert((kind, name), id);
        Some(id)
    }

    /// `proxy_set_shared_data` of `key` (CAS as in the spec: a non-zero `cas` must match).
    /// What would grow the plugin's shared data past `limits.shared_data` or
    /// [`limits::MAX_SHARED_KEYS`] keys is refused with `BAD_ARGUMENT` (the sizes of one key
    /// and value are checked by the caller, before it copies them).
    fn set_shared(&self, key: Vec<u8>, value: Vec<u8>, cas: u32, lim: &Limits) -> i32 {
        let refused = {
            let mut shared = self.shared.lock();
            let SharedData { map, bytes } = &mut *shared;
            let full = map.len() >= limits::MAX_SHARED_KEYS;
            match map.get_mut(&key) {
                Some((_, cur)) if cas != 0 && *cur != cas => return status::CAS_MISMATCH,
                Some((v, cur)) => {
                    let after = *bytes - v.len() + value.len();
                    if value.len() > v.len() && after > lim.shared_data {
                        Some(after)
                    } else {
                        *bytes = after;
                        *v = value;
                        *cur = cur.wrapping_add(1).max(1);
                        None
                    }
                }
                None if full => Some(usize::MAX),
                None => {
                    let after = *bytes + key.len() + value.len();
                    if after > lim.shared_data {
                        Some(after)
                    } else {
                        *bytes = after;
                        map.insert(key, (value, 1));
                        None
                    }
                }
            }
        };
        match refused {
            None => status::OK,
            Some(after) => {
                self.hits.hit(&self.name, Limit::SharedData, || {
                    if after == usize::MAX {
                        format!(
                            "shared data: more than {} keys; refusing a new one",
                            limits::MAX_SHARED_KEYS
                        )
                    } else {
                        format!(
                            "shared data: a write would make it {after} bytes, over limits.shared_data ({} bytes)",
                            lim.shared_data
                        )
                    }
                });
                status::BAD_ARGUMENT
            }
        }
    }

    fn metric_op(&self, id: i32, op: MetricOp) -> Result<u64, i32> {
        let t = self.metrics.read();
        let Some(def) = (id as u32)
            .checked_sub(1)
            .and_then(|i| t.defs.get(i as usize))
        else {
            return Err(status::NOT_FOUND);
        };
        match (def, op) {
            (MetricDef::Counter(c), MetricOp::Increment(d)) if d >= 0 => c.inc_by(d as u64),
            (MetricDef::Counter(_), MetricOp::Increment(_)) => return Err(status::BAD_ARGUMENT),
            (MetricDef::Counter(c), MetricOp::Record(v)) => {
                let cur = c.get();
                if v < cur {
                    return Err(status::BAD_ARGUMENT);
                }
                c.inc_by(v - cur)
            }
            (MetricDef::Gauge(g), MetricOp::Increment(d)) => g.add(d),
            (MetricDef::Gauge(g), MetricOp::Record(v)) => g.set(v as i64),
            (MetricDef::Histogram(h), MetricOp::Record(v)) => h.observe(v as f64),
            (MetricDef::Histogram(_), MetricOp::Increment(_)) => return Err(status::BAD_ARGUMENT),
            (MetricDef::Counter(c), MetricOp::Get) => return Ok(c.get()),
            (MetricDef::Gauge(g), MetricOp::Get) => return Ok(g.get().max(0) as u64),
            (MetricDef::Histogram(h), MetricOp::Get) => return Ok(h.get_sample_count()),
        }
        Ok(0)
    }
}

#[derive(Clone, Copy)]
enum MetricOp {
    Increment(i64),
    Record(u64),
    Get,
}

/// One loaded version of a plugin: its configuration bytes and its persistent state.
pub struct PluginInfo {
    pub name: Arc<str>,
    pub config: Vec<u8>,
    pub vm_config: Vec<u8>,
    pub state: Arc<PluginState>,
    /// The WASI environment: `NAME=value\0` entries, concatenated.
    pub environ: Vec<u8>,
    pub environ_count: usize,
    /// Origins (indices) `proxy_http_call` may reach (`calls:`).
    pub calls: Vec<usize>,
    /// `limits:` (`body` also bounds a call's request body).
    pub limits: Limits,
    /// The tick period the plugin asked for (`proxy_set_tick_period_milliseconds`; 0: none).
    pub tick_ms: std::sync::atomic::AtomicU32,
    /// A tick faulted: this plugin version ticks no more, whatever a new instance asks.
    pub ticks_stopped: std::sync::atomic::AtomicBool,
}

/// Which callback is running: decides what may be read and written.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Phase {
    Init,
    Request,
    /// `proxy_on_request_body`: headers read-only, the chunk in `Env::body`.
    RequestBody,
    Response,
    /// `proxy_on_response_body`: headers read-only, the chunk in `Env::body`.
    ResponseBody,
    Log,
    /// `proxy_on_tick` on the root context, and the answers to the calls it made.
    Tick,
}

/// What one callback may touch. Raw pointers because the store data must be `'static`;
/// they are set right before a synchronous call into the guest and cleared right after, and
/// point at values the caller holds borrowed for that whole call.
#[derive(Clone, Copy)]
pub struct Env {
    pub phase: Phase,
    pub req: *mut RequestHeader,
    pub resp: *mut ResponseHeader,
    pub info: *mut RequestInfo,
    pub names: *const Names,
    /// The body bytes a body callback sees and may replace (null outside body callbacks).
    pub body: *mut Bytes,
}

impl Env {
    pub fn req(&self) -> Option<&RequestHeader> {
        // SAFETY: see the type's doc; null when not bound.
        unsafe { self.req.as_ref() }
    }
    fn req_mut(&mut self) -> Option<&mut RequestHeader> {
        if self.phase != Phase::Request {
            return None;
        }
        // SAFETY: in the request phase the pointer comes from a `&mut` held for the call.
        unsafe { self.req.as_mut() }
    }
    /// The body buffer `kind` (`abi::buffer::REQUEST_BODY`/`RESPONSE_BODY`), if this
    /// callback is the body callback of that direction.
    fn body_mut(&mut self, kind: i32) -> Option<&mut Bytes> {
        let live = match self.phase {
            Phase::RequestBody => abi::buffer::REQUEST_BODY,
            Phase::ResponseBody => abi::buffer::RESPONSE_BODY,
            _ => return None,
        };
        if kind != live {
            return None;
        }
        // SAFETY: in a body phase the pointer comes from a `&mut` held for the call.
        unsafe { self.body.as_mut() }
    }
    pub fn resp(&self) -> Option<&ResponseHeader> {
        // SAFETY: see the type's doc.
        unsafe { self.resp.as_ref() }
    }
    fn resp_mut(&mut self) -> Option<&mut ResponseHeader> {
        if self.phase != Phase::Response {
            return None;
        }
        // SAFETY: in the response phase the pointer comes from a `&mut` held for the call.
        unsafe { self.resp.as_mut() }
    }
    pub fn info(&mut self) -> Option<&mut RequestInfo> {
        // SAFETY: see the type's doc.
        unsafe { self.info.as_mut() }
    }
    pub fn names(&self) -> Option<&Names> {
        // SAFETY: see the type's doc.
        unsafe { self.names.as_ref() }
    }
    /// The answer `proxy_on_http_call_response` is delivering, if any.
    fn answer(&self) -> Option<&super::callout::Answer> {
        // SAFETY: see the type's doc.
        unsafe { self.info.as_ref() }.and_then(|i| i.answer.as_ref())
    }
    pub fn split(&mut self) -> (Option<&mut RequestInfo>, Option<&Names>) {
        // SAFETY: see the type's doc; the two pointers never alias.
        unsafe { (self.info.as_mut(), self.names.as_ref()) }
    }
}

/// Memory cap of one instance. Growing past it traps (classified as `memory`).
pub struct Limiter {
    pub max_memory: usize,
    pub hit: bool,
}

#[derive(Debug)]
pub struct MemoryLimit(pub usize);

impl std::fmt::Display for MemoryLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "plugin memory limit of {} bytes reached", self.0)
    }
}

impl std::error::Error for MemoryLimit {}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_memory {
            self.hit = true;
            return Err(wasmtime::Error::new(MemoryLimit(self.max_memory)));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }
}

/// The store data of one instance.
pub struct Host {
    pub info: Arc<PluginInfo>,
    pub memory: Option<Memory>,
    pub alloc: Option<TypedFunc<i32, i32>>,
    pub limiter: Limiter,
    pub env: Option<Env>,
    /// Serialization scratch (reused: no allocation per call once warm).
    out: Vec<u8>,
    data: Vec<u8>,
    /// The last `proxy_http_call` token handed out (tokens are per instance, as the SDKs'
    /// callout tables are).
    last_token: u32,
}

// SAFETY: the raw pointers in `env` are only set for the duration of a synchronous call made
// by the thread that owns the borrowed values; between calls `env` is `None`. A `Host` is
// only ever reached through its `Store`, by one thread at a time (`&mut`).
unsafe impl Send for Host {}
// SAFETY: as above; no `&Host` is shared across threads.
unsafe impl Sync for Host {}

impl Host {
    pub fn new(info: Arc<PluginInfo>, max_memory: usize) -> Host {
        Host {
            info,
            memory: None,
            alloc: None,
            limiter: Limiter {
                max_memory,
                hit: false,
            },
            env: None,
            out: Vec::new(),
            data: Vec::new(),
            last_token: 0,
        }
    }
}

fn range(ptr: i32, len: i32) -> Option<std::ops::Range<usize>> {
    let p = ptr as u32 as usize;
    let l = len as u32 as usize;
    Some(p..p.checked_add(l)?)
}

fn put_u32(mem: &mut [u8], ptr: i32, v: u32) -> bool {
    match mem.get_mut(range(ptr, 4).unwrap_or(0..0)) {
        Some(s) if s.len() == 4 => {
            s.copy_from_slice(&v.to_le_bytes());
            true
        }
        _ => false,
    }
}

fn put_u64(mem: &mut [u8], ptr: i32, v: u64) -> bool {
    match mem.get_mut(range(ptr, 8).unwrap_or(0..0)) {
        Some(s) if s.len() == 8 => {
            s.copy_from_slice(&v.to_le_bytes());
            true
        }
        _ => false,
    }
}

type C<'a> = Caller<'a, Host>;

/// Writes each `(ptr, value)` into guest memory; `false` when a pointer is out of bounds.
/// The usual tail of a hostcall that returns numbers, with `status_of` / `errno_of`.
fn write_u32s(c: &mut C<'_>, words: &[(i32, u32)]) -> bool {
    parts(c).is_some_and(|(mem, _)| words.iter().all(|&(p, v)| put_u32(mem, p, v)))
}

/// `write_u32s` for one 64-bit value.
fn write_u64(c: &mut C<'_>, ptr: i32, v: u64) -> bool {
    parts(c).is_some_and(|(mem, _)| put_u64(mem, ptr, v))
}

/// proxy-wasm status of a write to guest memory.
fn status_of(written: bool) -> i32 {
    if written {
        status::OK
    } else {
        status::INVALID_MEMORY_ACCESS
    }
}

/// WASI errno of a write to guest memory.
fn errno_of(written: bool) -> i32 {
    if written {
        errno::SUCCESS
    } else {
        errno::FAULT
    }
}

fn parts<'a>(c: &'a mut C<'_>) -> Option<(&'a mut [u8], &'a mut Host)> {
    let m = c.data().memory?;
    Some(m.data_and_store_mut(c))
}

/// Reads guest bytes into an owned copy (the guest memory may move when we call back in).
fn read(c: &mut C<'_>, ptr: i32, len: i32) -> Option<Vec<u8>> {
    let (mem, _) = parts(c)?;
    mem.get(range(ptr, len)?).map(<[u8]>::to_vec)
}

/// Copies `host.out` into memory allocated by the guest, and writes its address and length
/// to `ret_ptr` / `ret_len`.
///
/// The scratch is taken out for the call: the guest's allocator is guest code and may call
/// back into the host (which then works on a scratch of its own) before we copy. A large
/// scratch is not kept (see [`SCRATCH_KEEP`]).
fn return_out(c: &mut C<'_>, ret_ptr: i32, ret_len: i32) -> wasmtime::Result<i32> {
    let mut out = std::mem::take(&mut c.data_mut().out);
    let r = return_bytes(c, &out, ret_ptr, ret_len);
    if out.capacity() <= SCRATCH_KEEP {
        out.clear();
        c.data_mut().out = out;
    }
    r
}

/// Copies `bytes` into memory the guest allocates (`proxy_on_memory_allocate`) and writes its
/// address and length to `ret_ptr` / `ret_len`. The guest's answer is hostile too: a null or
/// out-of-bounds address, or one whose `bytes.len()` bytes do not fit in its memory, is an
/// error status, never a write out of bounds.
fn return_bytes(c: &mut C<'_>, bytes: &[u8], ret_ptr: i32, ret_len: i32) -> wasmtime::Result<i32> {
    let Ok(len) = i32::try_from(bytes.len()) else {
        return Ok(status::INTERNAL_FAILURE);
    };
    // Taken out and put back: cloning a `TypedFunc` costs a type-registry round trip. A
    // hostcall made by the allocator itself finds none and fails.
    let Some(alloc) = c.data_mut().alloc.take() else {
        return Ok(status::INTERNAL_FAILURE);
    };
    let r = alloc.call(&mut *c, len);
    c.data_mut().alloc = Some(alloc);
    let addr = r?;
    if addr == 0 && len > 0 {
        return Ok(status::INTERNAL_FAILURE);
    }
    let Some((mem, _)) = parts(c) else {
        return Ok(status::INTERNAL_FAILURE);
    };
    let Some(dst) = range(addr, len).and_then(|r| mem.get_mut(r)) else {
        return Ok(status::INVALID_MEMORY_ACCESS);
    };
    dst.copy_from_slice(bytes);
    if !put_u32(mem, ret_ptr, addr as u32) || !put_u32(mem, ret_len, len as u32) {
        return Ok(status::INVALID_MEMORY_ACCESS);
    }
    Ok(status::OK)
}

/// `body` with bytes `[start, start + len)` (both clamped to its end) replaced by `data`: a
/// `start` at or past the end appends (the spec's "may be set to the maximum `size_t`").
fn splice(body: &Bytes, start: usize, len: usize, data: &[u8]) -> Bytes {
    let start = start.min(body.len());
    let end = start.saturating_add(len).min(body.len());
    if start == 0 && end == body.len() {
        return Bytes::copy_from_slice(data);
    }
    let mut v = Vec::with_capacity(body.len() - (end - start) + data.len());
    v.extend_from_slice(&body[..start]);
    v.extend_from_slice(data);
    v.extend_from_slice(&body[end..]);
    Bytes::from(v)
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn monotonic_nanos() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

// ---------------------------------------------------------------------------------------------
// Header maps
// ---------------------------------------------------------------------------------------------

/// The `:authority` of a request: the Host header, else the URI's authority.
pub fn authority(req: &RequestHeader) -> &[u8] {
    req.headers
        .get(http::header::HOST)
        .map(|v| v.as_bytes())
        .or_else(|| req.uri.authority().map(|a| a.as_str().as_bytes()))
        .unwrap_or_default()
}

fn serialize_headers(host: &mut Host, map_type: i32) {
    let env = host.env;
    let (out, data) = (&mut host.out, &mut host.data);
    match (map_type, env) {
        (map::REQUEST_HEADERS, Some(e)) if e.req().is_some() => {
            let req = e.req().expect("checked");
            let pseudo: [(&[u8], &[u8]); 4] = [
                (b":authority", authority(req)),
                (b":path", req.raw_path()),
                (b":method", req.method.as_str().as_bytes()),
                (b":scheme", b"http"),
            ];
            let regular = req
                .headers
                .iter()
                .filter(|(k, _)| *k != http::header::HOST)
                .map(|(k, v)| (k.as_str().as_bytes(), v.as_bytes()));
            abi::serialize_map(out, data, pseudo.into_iter().chain(regular));
        }
        (map::RESPONSE_HEADERS, Some(e)) if e.resp().is_some() => {
            let resp = e.resp().expect("checked");
            let pseudo: [(&[u8], &[u8]); 1] = [(b":status", resp.status.as_str().as_bytes())];
            let regular = resp
                .headers
                .iter()
                .map(|(k, v)| (k.as_str().as_bytes(), v.as_bytes()));
            abi::serialize_map(out, data, pseudo.into_iter().chain(regular));
        }
        (map::HTTP_CALL_RESPONSE_HEADERS, Some(e)) if e.answer().is_some() => {
            let pairs = e.answer().expect("checked").headers.iter();
            abi::serialize_map(out, data, pairs.map(|(k, v)| (&k[..], &v[..])));
        }
        _ => abi::serialize_map(out, data, std::iter::empty()),
    }
    if host.data.capacity() > SCRATCH_KEEP {
        host.data = Vec::new();
    }
}

fn get_header(env: &Env, map_type: i32, key: &[u8], out: &mut Vec<u8>) -> bool {
    out.clear();
    let lookup = |h: &http::HeaderMap, out: &mut Vec<u8>| -> bool {
        let Ok(name) = std::str::from_utf8(key) else {
            return false;
        };
        match h.get(name) {
            Some(v) => {
                out.extend_from_slice(v.as_bytes());
                true
            }
            None => false,
        }
    };
    match map_type {
        map::REQUEST_HEADERS => {
            let Some(req) = env.req() else { return false };
            match key {
                b":path" => out.extend_from_slice(req.raw_path()),
                b":method" => out.extend_from_slice(req.method.as_str().as_bytes()),
                b":authority" => out.extend_from_slice(authority(req)),
                b":scheme" => out.extend_from_slice(b"http"),
                _ => return lookup(&req.headers, out),
            }
            true
        }
        map::RESPONSE_HEADERS => {
            let Some(resp) = env.resp() else { return false };
            if key == b":status" {
                out.extend_from_slice(resp.status.as_str().as_bytes());
                return true;
            }
            lookup(&resp.headers, out)
        }
        map::HTTP_CALL_RESPONSE_HEADERS => {
            let Some(answer) = env.answer() else {
                return false;
            };
            // Names arrive lower-case from the wire; the guest may ask in any case.
            match answer
                .headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
            {
                Some((_, v)) => {
                    out.extend_from_slice(v);
                    true
                }
                None => false,
            }
        }
        _ => false,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Edit {
    Replace,
    Add,
    Remove,
}

fn plugin_name(host: &Host) -> &str {
    &host.info.name
}

/// Applies one header edit. Invalid names/values are dropped with a warning (the SDK would
/// trap on an error status); edits outside their phase are ignored. So is an edit that would
/// grow the map past [`limits::MAX_HEADER_COUNT`] headers or `limits.headers` bytes (counted
/// and logged as a limit hit): a plugin looping `add_header` cannot grow a header without
/// bound. An edit that does not grow the map is always applied.
fn edit_header(host: &mut Host, map_type: i32, key: &[u8], value: &[u8], edit: Edit) {
    let Host { info, env, .. } = host;
    let Some(env) = env.as_mut() else { return };
    let over = || {
        info.state.hits.hit(&info.name, Limit::Headers, || {
            format!(
                "ignored a header edit ({:?}) that would grow the header past {} headers or limits.headers ({} bytes)",
                String::from_utf8_lossy(&key[..key.len().min(64)]),
                limits::MAX_HEADER_COUNT,
                info.limits.headers
            )
        });
    };
    let bad = |what: &str| {
        log::warn!(
            target: "plugin",
            "[{}] ignored an invalid header {what}: {:?}",
            info.name,
            String::from_utf8_lossy(key)
        );
    };
    let bounds = (info.limits.headers, over);
    match map_type {
        map::REQUEST_HEADERS => {
            let Some(req) = env.req_mut() else { return };
            match key {
                b":path" => {
                    if edit != Edit::Remove && req.set_raw_path(value).is_err() {
                        bad(":path value");
                    }
                    return;
                }
                b":method" => {
                    if edit != Edit::Remove && value.len() > limits::MAX_METHOD {
                        over();
                    } else if edit != Edit::Remove {
                        match http::Method::from_bytes(value) {
                            Ok(m) => req.set_method(m),
                            Err(_) => bad(":method value"),
                        }
                    }
                    return;
                }
                b":scheme" => return,
                _ => {}
            }
            let key = if key == b":authority" { b"host" } else { key };
            apply_edit(req, key, value, edit, bounds, bad);
        }
        map::RESPONSE_HEADERS => {
            let Some(resp) = env.resp_mut() else { return };
            if key == b":status" {
                if edit != Edit::Remove {
                    let code = std::str::from_utf8(value)
                        .ok()
                        .and_then(|s| s.parse::<u16>().ok());
                    if code.is_none_or(|c| resp.set_status(c).is_err()) {
                        bad(":status value");
                    }
                }
                return;
            }
            apply_edit(resp, key, value, edit, bounds, bad);
        }
        _ => {}
    }
}

/// The header operations Pingora's request and response headers both offer.
trait HeaderOps {
    fn map(&self) -> &http::HeaderMap;
    fn remove(&mut self, name: &http::HeaderName);
    fn set(&mut self, name: http::HeaderName, value: http::HeaderValue) -> bool;
    fn append(&mut self, name: http::HeaderName, value: http::HeaderValue) -> bool;
}

macro_rules! header_ops {
    ($t:ty) => {
        impl HeaderOps for $t {
            fn map(&self) -> &http::HeaderMap {
                &self.headers
            }
            fn remove(&mut self, name: &http::HeaderName) {
                self.remove_header(name);
            }
            fn set(&mut self, name: http::HeaderName, value: http::HeaderValue) -> bool {
                self.insert_header(name, value).is_ok()
            }
            fn append(&mut self, name: http::HeaderName, value: http::HeaderValue) -> bool {
                self.append_header(name, value).is_ok()
            }
        }
    };
}
header_ops!(RequestHeader);
header_ops!(ResponseHeader);

/// One edit of a regular (non-pseudo) header; `bad` reports what was invalid. `bounds`: the
/// most bytes of names and values the edit may grow the map to, and what reports an edit
/// refused for growing it past that or [`limits::MAX_HEADER_COUNT`].
fn apply_edit(
    h: &mut impl HeaderOps,
    key: &[u8],
    value: &[u8],
    edit: Edit,
    (max_bytes, over): (usize, impl Fn()),
    bad: impl Fn(&str),
) {
    let Ok(name) = http::HeaderName::from_bytes(key) else {
        return bad("name");
    };
    if edit == Edit::Remove {
        return h.remove(&name);
    }
    let Ok(v) = http::HeaderValue::from_bytes(value) else {
        return bad("value");
    };
    if grows_past(h.map(), &name, v.len(), edit == Edit::Replace, max_bytes) {
        return over();
    }
    let ok = match edit {
        Edit::Replace => h.set(name, v),
        _ => h.append(name, v),
    };
    if !ok {
        bad("edit");
    }
}

/// Whether adding (`replace`: replacing every value of) `name` with a value of `value_len`
/// bytes makes `map` larger than it is and than its bounds: [`limits::MAX_HEADER_COUNT`]
/// headers, `max_bytes` bytes of names and values.
fn grows_past(
    map: &http::HeaderMap,
    name: &http::HeaderName,
    value_len: usize,
    replace: bool,
    max_bytes: usize,
) -> bool {
    let (count, bytes) = (map.len(), limits::header_bytes(map));
    let (gone_count, gone_bytes) = if replace {
        map.get_all(name).iter().fold((0, 0), |(n, b), v| {
            (n + 1, b + name.as_str().len() + v.len())
        })
    } else {
        (0, 0)
    };
    let new_count = count - gone_count + 1;
    let new_bytes = bytes - gone_bytes + name.as_str().len() + value_len;
    (new_count > count && new_count > limits::MAX_HEADER_COUNT)
        || (new_bytes > bytes && new_bytes > max_bytes)
}

/// A serialized header map from the guest, decoded: `None` when it is malformed or has more
/// than [`limits::MAX_MAP_PAIRS`] pairs (a hit of `limit`).
fn header_pairs<'b>(c: &C<'_>, bytes: &'b [u8], limit: Limit) -> Option<Vec<(&'b [u8], &'b [u8])>> {
    let pairs = abi::deserialize_map_max(bytes, limits::MAX_MAP_PAIRS);
    if pairs.is_none() && abi::map_count(bytes).is_some_and(|n| n > limits::MAX_MAP_PAIRS) {
        let info = &c.data().info;
        info.state.hits.hit(&info.name, limit, || {
            format!(
                "refused a header map of more than {} pairs",
                limits::MAX_MAP_PAIRS
            )
        });
    }
    pairs
}

fn set_header_pairs(host: &mut Host, map_type: i32, pairs: &[(&[u8], &[u8])]) {
    {
        let Some(env) = host.env.as_mut() else { return };
        let names: Vec<http::HeaderName> = match map_type {
            map::REQUEST_HEADERS => match env.req_mut() {
                Some(r) => r.headers.keys().cloned().collect(),
                None => return,
            },
            map::RESPONSE_HEADERS => match env.resp_mut() {
                Some(r) => r.headers.keys().cloned().collect(),
                None => return,
            },
            _ => return,
        };
        for n in names {
            if map_type == map::REQUEST_HEADERS {
                if let Some(r) = env.req_mut() {
                    r.remove_header(&n);
                }
            } else if let Some(r) = env.resp_mut() {
                r.remove_header(&n);
            }
        }
    }
    for (k, v) in pairs {
        let edit = if k.starts_with(b":") {
            Edit::Replace
        } else {
            Edit::Add
        };
        edit_header(host, map_type, k, v, edit);
    }
}

// ---------------------------------------------------------------------------------------------
// The linker
// ---------------------------------------------------------------------------------------------

macro_rules! unimplemented_calls {
    ($linker:expr, $def:ident, $( $name:literal => ($($arg:ty),*) ),* $(,)?) => {
        $(
            $linker.func_wrap("env", $name, |$(_: $arg),*| -> i32 { status::UNIMPLEMENTED })?;
            $def("env", $name);
        )*
    };
}

/// Every import of `module`, defined. Imports the host does not know are defined too:
/// returning `UNIMPLEMENTED` (`env`) / `ENOSYS` (WASI) when they return an `i32`, trapping
/// otherwise.
pub fn linker(engine: &Engine, module: &Module) -> wasmtime::Result<Linker<Host>> {
    let mut l: Linker<Host> = Linker::new(engine);
    let mut defined: Vec<(&str, &str)> = Vec::new();
    let mut def = |m: &'static str, n: &'static str| defined.push((m, n));

    // --- logging, time -------------------------------------------------------------------
    l.func_wrap("env", "proxy_log", |mut c: C<'_>, level: i32, ptr: i32, len: i32| -> i32 {
        let Some(lvl) = abi::log_level(level) else {
            return status::BAD_ARGUMENT;
        };
        if !log::log_enabled!(target: "plugin", lvl) {
            return status::OK;
        }
        let Some((mem, host)) = parts(&mut c) else {
            return status::INVALID_MEMORY_ACCESS;
        };
        let Some(msg) = range(ptr, len).and_then(|r| mem.get(r)) else {
            return status::INVALID_MEMORY_ACCESS;
        };
        if msg.len() > limits::MAX_LOG {
            // Cut, not refused: the Rust SDK panics on any status but OK here.
            let state = &host.info.state;
            state.hits.hit(&state.name, Limit::Log, || {
                format!("proxy_log: a message of {} bytes was cut to {}", msg.len(), limits::MAX_LOG)
            });
            log::log!(target: "plugin", lvl, "[{}] {} [... {} more bytes cut]", plugin_name(host), String::from_utf8_lossy(&msg[..limits::MAX_LOG]), msg.len() - limits::MAX_LOG);
            return status::OK;
        }
        log::log!(target: "plugin", lvl, "[{}] {}", plugin_name(host), String::from_utf8_lossy(msg));
        status::OK
    })?;
    def("env", "proxy_log");
    l.func_wrap(
        "env",
        "proxy_get_log_level",
        |mut c: C<'_>, ret: i32| -> i32 {
            status_of(write_u32s(
                &mut c,
                &[(ret, abi::current_log_level() as u32)],
            ))
        },
    )?;
    def("env", "proxy_get_log_level");
    l.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut c: C<'_>, ret: i32| -> i32 { status_of(write_u64(&mut c, ret, now_nanos())) },
    )?;
    def("env", "proxy_get_current_time_nanoseconds");
    // The period is the plugin's (every instance configures the same way); `tick` delivers.
    l.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |c: C<'_>, ms: i32| -> i32 {
            let info = &c.data().info;
            // A new instance (configured after a faulted tick) must not start them again.
            if !info
                .ticks_stopped
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                info.tick_ms
                    .store(ms as u32, std::sync::atomic::Ordering::Relaxed);
            }
            status::OK
        },
    )?;
    def("env", "proxy_set_tick_period_milliseconds");

    // --- buffers ---------------------------------------------------------------------------
    l.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut c: C<'_>,
         kind: i32,
         start: i32,
         max: i32,
         ret_ptr: i32,
         ret_len: i32|
         -> wasmtime::Result<i32> {
            let info = c.data().info.clone();
            let body: Bytes;
            let buf: &[u8] = match kind {
                abi::buffer::PLUGIN_CONFIGURATION => &info.config,
                abi::buffer::VM_CONFIGURATION => &info.vm_config,
                abi::buffer::REQUEST_BODY | abi::buffer::RESPONSE_BODY => {
                    let mut env = c.data().env;
                    match env.as_mut().and_then(|e| e.body_mut(kind)) {
                        Some(b) => {
                            body = b.clone();
                            &body
                        }
                        None => return Ok(status::NOT_FOUND),
                    }
                }
                abi::buffer::HTTP_CALL_RESPONSE_BODY => match c
                    .data()
                    .env
                    .and_then(|e| e.answer().map(|a| a.body.clone()))
                {
                    Some(b) => {
                        body = b;
                        &body
                    }
                    None => return Ok(status::NOT_FOUND),
                },
                _ => return Ok(status::BAD_ARGUMENT),
            };
            let start = start as u32 as usize;
            if start > buf.len() {
                return Ok(status::BAD_ARGUMENT);
            }
            let end = start.saturating_add(max as u32 as usize).min(buf.len());
            return_bytes(&mut c, &buf[start..end], ret_ptr, ret_len)
        },
    )?;
    def("env", "proxy_get_buffer_bytes");
    l.func_wrap(
        "env",
        "proxy_get_buffer_status",
        |mut c: C<'_>, kind: i32, ret_len: i32, ret_flags: i32| -> i32 {
            let n = match kind {
                abi::buffer::PLUGIN_CONFIGURATION => c.data().info.config.len(),
                abi::buffer::VM_CONFIGURATION => c.data().info.vm_config.len(),
                abi::buffer::REQUEST_BODY | abi::buffer::RESPONSE_BODY => {
                    let mut env = c.data().env;
                    match env.as_mut().and_then(|e| e.body_mut(kind)) {
                        Some(b) => b.len(),
                        None => return status::NOT_FOUND,
                    }
                }
                abi::buffer::HTTP_CALL_RESPONSE_BODY => {
                    match c.data().env.and_then(|e| e.answer().map(|a| a.body.len())) {
                        Some(n) => n,
                        None => return status::NOT_FOUND,
                    }
                }
                _ => return status::BAD_ARGUMENT,
            };
            status_of(write_u32s(&mut c, &[(ret_len, n as u32), (ret_flags, 0)]))
        },
    )?;
    def("env", "proxy_get_buffer_status");
    // Replaces bytes [start, start + len) of the live body chunk with the given data (Envoy's
    // semantics: start 0 + len >= size replaces it all, start == size appends).
    l.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut c: C<'_>, kind: i32, start: i32, len: i32, ptr: i32, size: i32| -> i32 {
            let mut env = match c.data().env {
                Some(e) => e,
                None => return status::NOT_FOUND,
            };
            if !matches!(kind, abi::buffer::REQUEST_BODY | abi::buffer::RESPONSE_BODY) {
                return if kind == abi::buffer::PLUGIN_CONFIGURATION
                    || kind == abi::buffer::VM_CONFIGURATION
                {
                    status::BAD_ARGUMENT
                } else {
                    status::NOT_FOUND
                };
            }
            let Some(body) = env.body_mut(kind) else {
                return status::NOT_FOUND;
            };
            // A body grows by the plugin's hand up to `limits.body` (or what it already was):
            // checked before the bytes are copied, and again once the result's size is known.
            let max = c.data().info.limits.body.max(body.len());
            let over = |c: &C<'_>, grown: usize| {
                let info = &c.data().info;
                info.state.hits.hit(&info.name, Limit::Body, || {
                    format!(
                        "proxy_set_buffer_bytes: refused to grow a body of {} bytes to {grown}, over limits.body ({} bytes)",
                        body.len(),
                        info.limits.body
                    )
                });
                status::BAD_ARGUMENT
            };
            if size as u32 as usize > max {
                return over(&c, size as u32 as usize);
            }
            let Some(data) = read(&mut c, ptr, size) else {
                return status::INVALID_MEMORY_ACCESS;
            };
            let (start, len) = (start as u32 as usize, len as u32 as usize);
            let start = start.min(body.len());
            let cut = start.saturating_add(len).min(body.len()) - start;
            let grown = body.len() - cut + data.len();
            if grown > max {
                return over(&c, grown);
            }
            *body = splice(body, start, len, &data);
            status::OK
        },
    )?;
    def("env", "proxy_set_buffer_bytes");

    // --- header maps -----------------------------------------------------------------------
    l.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut c: C<'_>, mt: i32, ret_ptr: i32, ret_len: i32| -> wasmtime::Result<i32> {
            serialize_headers(c.data_mut(), mt);
            return_out(&mut c, ret_ptr, ret_len)
        },
    )?;
    def("env", "proxy_get_header_map_pairs");
    l.func_wrap(
        "env",
        "proxy_get_header_map_size",
        |mut c: C<'_>, mt: i32, ret_len: i32| -> i32 {
            serialize_headers(c.data_mut(), mt);
            let host = c.data_mut();
            let n = host.out.len() as u32;
            if host.out.capacity() > SCRATCH_KEEP {
                host.out = Vec::new();
            }
            status_of(write_u32s(&mut c, &[(ret_len, n)]))
        },
    )?;
    def("env", "proxy_get_header_map_size");
    l.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut c: C<'_>, mt: i32, ptr: i32, len: i32| -> i32 {
            // A map no header could hold is refused before it is copied, like a malformed
            // one; the pairs are then applied one by one under the header bounds.
            if len as u32 as usize > limits::MAX_HEADER_BLOB {
                let info = &c.data().info;
                info.state.hits.hit(&info.name, Limit::Headers, || {
                    format!(
                        "proxy_set_header_map_pairs: refused a map of {} bytes (at most {})",
                        len as u32,
                        limits::MAX_HEADER_BLOB
                    )
                });
                return status::BAD_ARGUMENT;
            }
            let Some(bytes) = read(&mut c, ptr, len) else {
                return status::INVALID_MEMORY_ACCESS;
            };
            let Some(pairs) = header_pairs(&c, &bytes, Limit::Headers) else {
                return status::BAD_ARGUMENT;
            };
            set_header_pairs(c.data_mut(), mt, &pairs);
            status::OK
        },
    )?;
    def("env", "proxy_set_header_map_pairs");
    l.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut c: C<'_>,
         mt: i32,
         kp: i32,
         kl: i32,
         ret_ptr: i32,
         ret_len: i32|
         -> wasmtime::Result<i32> {
            // Zero-copy: the key is read in place (guest memory and host state are disjoint).
            let Some((mem, host)) = parts(&mut c) else {
                return Ok(status::INVALID_MEMORY_ACCESS);
            };
            let Some(key) = range(kp, kl).and_then(|r| mem.get(r)) else {
                return Ok(status::INVALID_MEMORY_ACCESS);
            };
            let Some(env) = host.env else {
                return Ok(status::NOT_FOUND);
            };
            if !get_header(&env, mt, key, &mut host.out) {
                return Ok(status::NOT_FOUND);
            }
            return_out(&mut c, ret_ptr, ret_len)
        },
    )?;
    def("env", "proxy_get_header_map_value");
    for (name, edit) in [
        ("proxy_replace_header_map_value", Edit::Replace),
        ("proxy_add_header_map_value", Edit::Add),
    ] {
        l.func_wrap(
            "env",
            name,
            move |mut c: C<'_>, mt: i32, kp: i32, kl: i32, vp: i32, vl: i32| -> i32 {
                let Some((mem, host)) = parts(&mut c) else {
                    return status::INVALID_MEMORY_ACCESS;
                };
                let (Some(k), Some(v)) = (
                    range(kp, kl).and_then(|r| mem.get(r)),
                    range(vp, vl).and_then(|r| mem.get(r)),
                ) else {
                    return status::INVALID_MEMORY_ACCESS;
                };
                edit_header(host, mt, k, v, edit);
                status::OK
            },
        )?;
    }
    def("env", "proxy_replace_header_map_value");
    def("env", "proxy_add_header_map_value");
    l.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut c: C<'_>, mt: i32, kp: i32, kl: i32| -> i32 {
            let Some((mem, host)) = parts(&mut c) else {
                return status::INVALID_MEMORY_ACCESS;
            };
            let Some(k) = range(kp, kl).and_then(|r| mem.get(r)) else {
                return status::INVALID_MEMORY_ACCESS;
            };
            edit_header(host, mt, k, b"", Edit::Remove);
            status::OK
        },
    )?;
    def("env", "proxy_remove_header_map_value");

    // --- properties ------------------------------------------------------------------------
    l.func_wrap(
        "env",
        "proxy_get_property",
        |mut c: C<'_>, pp: i32, pl: i32, ret_ptr: i32, ret_len: i32| -> wasmtime::Result<i32> {
            let Some((mem, host)) = parts(&mut c) else {
                return Ok(status::INVALID_MEMORY_ACCESS);
            };
            let Some(path) = range(pp, pl).and_then(|r| mem.get(r)) else {
                return Ok(status::INVALID_MEMORY_ACCESS);
            };
            if path.len() > limits::MAX_PROPERTY_PATH {
                // Splitting it would allocate a slice per NUL byte.
                return Ok(status::NOT_FOUND);
            }
            let Host { info, env, out, .. } = host;
            let found = props::get(&abi::property_path(path), env.as_mut(), info, out);
            if !found {
                return Ok(status::NOT_FOUND);
            }
            return_out(&mut c, ret_ptr, ret_len)
        },
    )?;
    def("env", "proxy_get_property");
    l.func_wrap(
        "env",
        "proxy_set_property",
        |mut c: C<'_>, pp: i32, pl: i32, vp: i32, vl: i32| -> i32 {
            // As Envoy, an unusable value is `BAD_ARGUMENT` (the Rust SDK traps on it: the
            // plugin's on_error applies). Custom values are bounded before they are copied.
            let refuse = |c: &C<'_>, why: String| {
                let info = &c.data().info;
                info.state.hits.hit(&info.name, Limit::Properties, || {
                    format!("proxy_set_property: {why}")
                });
                status::BAD_ARGUMENT
            };
            if pl as u32 as usize > limits::MAX_PROPERTY_PATH {
                return refuse(
                    &c,
                    format!(
                        "a path of {} bytes (at most {})",
                        pl as u32,
                        limits::MAX_PROPERTY_PATH
                    ),
                );
            }
            let Some(path) = read(&mut c, pp, pl) else {
                return status::INVALID_MEMORY_ACCESS;
            };
            let path = abi::property_path(&path);
            if props::is_custom(&path) && vl as u32 as usize > limits::MAX_PROPERTY_VALUE {
                return refuse(
                    &c,
                    format!(
                        "a value of {} bytes (at most {})",
                        vl as u32,
                        limits::MAX_PROPERTY_VALUE
                    ),
                );
            }
            let Some(value) = read(&mut c, vp, vl) else {
                return status::INVALID_MEMORY_ACCESS;
            };
            let host = c.data_mut();
            let name = host.info.name.clone();
            let mut refused = None;
            if let Some(env) = host.env.as_mut() {
                let phase = env.phase;
                if let (Some(info), Some(names)) = env.split() {
                    refused = props::set(&path, &value, phase, info, names, &name).err();
                }
            }
            match refused {
                Some(why) => refuse(&c, why),
                None => status::OK,
            }
        },
    )?;
    def("env", "proxy_set_property");

    // --- shared data -----------------------------------------------------------------------
    l.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut c: C<'_>,
         kp: i32,
         kl: i32,
         ret_ptr: i32,
         ret_len: i32,
         ret_cas: i32|
         -> wasmtime::Result<i32> {
            if kl as u32 as usize > limits::MAX_SHARED_KEY {
                return Ok(status::NOT_FOUND); // never stored
            }
            let Some(key) = read(&mut c, kp, kl) else {
                return Ok(status::INVALID_MEMORY_ACCESS);
            };
            let state = c.data().info.state.clone();
            let cas = {
                let shared = state.shared.lock();
                let Some((v, cas)) = shared.map.get(&key) else {
                    return Ok(status::NOT_FOUND);
                };
                let out = &mut c.data_mut().out;
                out.clear();
                out.extend_from_slice(v);
                *cas
            };
            let st = return_out(&mut c, ret_ptr, ret_len)?;
            if st != status::OK {
                return Ok(st);
            }
            Ok(status_of(write_u32s(&mut c, &[(ret_cas, cas)])))
        },
    )?;
    def("env", "proxy_get_shared_data");
    l.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut c: C<'_>, kp: i32, kl: i32, vp: i32, vl: i32, cas: i32| -> i32 {
            // Sizes first, before anything is copied. Over a bound: `BAD_ARGUMENT`, which the
            // Rust SDK traps on (it expects only OK or CAS_MISMATCH), so the plugin's
            // on_error applies; Envoy has no bound to follow here.
            let (info, lim) = (c.data().info.clone(), c.data().info.limits);
            let (kl_u, vl_u) = (kl as u32 as usize, vl as u32 as usize);
            if kl_u > limits::MAX_SHARED_KEY || vl_u > lim.shared_value {
                info.state.hits.hit(&info.name, Limit::SharedData, || {
                    format!(
                        "proxy_set_shared_data: refused a key of {kl_u} bytes (at most {}) or a value of {vl_u} bytes (limits.shared_value: {})",
                        limits::MAX_SHARED_KEY,
                        lim.shared_value
                    )
                });
                return status::BAD_ARGUMENT;
            }
            let (Some(key), Some(value)) = (read(&mut c, kp, kl), read(&mut c, vp, vl)) else {
                return status::INVALID_MEMORY_ACCESS;
            };
            info.state.set_shared(key, value, cas as u32, &lim)
        },
    )?;
    def("env", "proxy_set_shared_data");

    // --- streams, local responses ------------------------------------------------------------
    // Resuming the stream matters after an HTTP call: a plugin that paused the request (or
    // the response) for its calls and never resumes it fails (its on_error applies) rather
    // than hanging the request.
    l.func_wrap(
        "env",
        "proxy_continue_stream",
        |mut c: C<'_>, stream: i32| -> i32 {
            if let Some(env) = c.data_mut().env.as_mut() {
                let live = match env.phase {
                    Phase::Request => abi::stream::HTTP_REQUEST,
                    Phase::Response => abi::stream::HTTP_RESPONSE,
                    _ => return status::OK,
                };
                if stream == live {
                    if let Some(info) = env.info() {
                        info.resumed = true;
                    }
                }
            }
            status::OK
        },
    )?;
    def("env", "proxy_continue_stream");
    l.func_wrap(
        "env",
        "proxy_close_stream",
        |mut c: C<'_>, _stream: i32| -> i32 {
            if let Some(info) = c.data_mut().env.as_mut().and_then(|e| e.info()) {
                info.closed = true;
            }
            status::OK
        },
    )?;
    def("env", "proxy_close_stream");
    l.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut c: C<'_>,
         code: i32,
         dp: i32,
         dl: i32,
         bp: i32,
         bl: i32,
         hp: i32,
         hl: i32,
         _grpc: i32|
         -> i32 {
            // The reply is held until it is sent: its body is bounded by `limits.body`, its
            // headers by `limits.headers` (checked before anything is copied); the details
            // (only logged) are cut.
            let lim = c.data().info.limits;
            let refuse = |c: &C<'_>, why: String| {
                let info = &c.data().info;
                info.state.hits.hit(&info.name, Limit::LocalResponse, || {
                    format!("proxy_send_local_response: refused {why}")
                });
                status::BAD_ARGUMENT
            };
            let max_headers = lim.headers + 10 * limits::MAX_MAP_PAIRS + 4;
            if bl as u32 as usize > lim.body {
                return refuse(
                    &c,
                    format!(
                        "a body of {} bytes, over limits.body ({} bytes)",
                        bl as u32, lim.body
                    ),
                );
            }
            if hl as u32 as usize > max_headers {
                return refuse(
                    &c,
                    format!(
                        "headers of {} bytes, over limits.headers ({} bytes)",
                        hl as u32, lim.headers
                    ),
                );
            }
            let dl_kept = (dl as u32).min(limits::MAX_DETAILS as u32) as i32;
            let details_ok = parts(&mut c)
                .is_some_and(|(mem, _)| range(dp, dl).is_some_and(|r| r.end <= mem.len()));
            let (true, Some(details), Some(body), Some(headers)) = (
                details_ok,
                read(&mut c, dp, dl_kept),
                read(&mut c, bp, bl),
                read(&mut c, hp, hl),
            ) else {
                return status::INVALID_MEMORY_ACCESS;
            };
            let Some(pairs) = header_pairs(&c, &headers, Limit::LocalResponse) else {
                return status::BAD_ARGUMENT;
            };
            let header_bytes: usize = pairs.iter().map(|(k, v)| k.len() + v.len()).sum();
            if header_bytes > lim.headers {
                return refuse(
                    &c,
                    format!(
                        "headers of {header_bytes} bytes, over limits.headers ({} bytes)",
                        lim.headers
                    ),
                );
            }
            let code = code as u32;
            if !(100..=999).contains(&code) {
                return status::BAD_ARGUMENT;
            }
            let reply = LocalReply {
                status: code as u16,
                headers: pairs
                    .iter()
                    .map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .collect(),
                body: bytes::Bytes::from(body),
                details: String::from_utf8_lossy(&details).into_owned(),
                plugin: c.data().info.name.clone(),
            };
            match c.data_mut().env.as_mut().and_then(|e| e.info()) {
                Some(info) => {
                    info.local = Some(reply);
                    status::OK
                }
                None => status::BAD_ARGUMENT,
            }
        },
    )?;
    def("env", "proxy_send_local_response");
    l.func_wrap("env", "proxy_set_effective_context", |_: i32| -> i32 {
        status::OK
    })?;
    def("env", "proxy_set_effective_context");
    l.func_wrap("env", "proxy_done", || -> i32 { status::OK })?;
    def("env", "proxy_done");
    l.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |_: i32, _: i32, _: i32, _: i32, _: i32, _: i32| -> i32 { status::NOT_FOUND },
    )?;
    def("env", "proxy_call_foreign_function");

    // --- metrics ---------------------------------------------------------------------------
    l.func_wrap(
        "env",
        "proxy_define_metric",
        |mut c: C<'_>, kind: i32, np: i32, nl: i32, ret: i32| -> i32 {
            if nl as u32 as usize > limits::MAX_METRIC_NAME {
                let info = &c.data().info;
                info.state.hits.hit(&info.name, Limit::Metrics, || {
                    format!(
                        "proxy_define_metric: refused a name of {} bytes (at most {})",
                        nl as u32,
                        limits::MAX_METRIC_NAME
                    )
                });
                return status::BAD_ARGUMENT;
            }
            let Some(name) = read(&mut c, np, nl) else {
                return status::INVALID_MEMORY_ACCESS;
            };
            let Some(id) = c.data().info.state.define_metric(kind, &name) else {
                return status::BAD_ARGUMENT;
            };
            status_of(write_u32s(&mut c, &[(ret, id)]))
        },
    )?;
    def("env", "proxy_define_metric");
    l.func_wrap(
        "env",
        "proxy_increment_metric",
        |c: C<'_>, id: i32, delta: i64| -> i32 {
            match c
                .data()
                .info
                .state
                .metric_op(id, MetricOp::Increment(delta))
            {
                Ok(_) => status::OK,
                Err(s) => s,
            }
        },
    )?;
    def("env", "proxy_increment_metric");
    l.func_wrap(
        "env",
        "proxy_record_metric",
        |c: C<'_>, id: i32, value: i64| -> i32 {
            match c
                .data()
                .info
                .state
                .metric_op(id, MetricOp::Record(value as u64))
            {
                Ok(_) => status::OK,
                Err(s) => s,
            }
        },
    )?;
    def("env", "proxy_record_metric");
    l.func_wrap(
        "env",
        "proxy_get_metric",
        |mut c: C<'_>, id: i32, ret: i32| -> i32 {
            let v = match c.data().info.state.metric_op(id, MetricOp::Get) {
                Ok(v) => v,
                Err(s) => return s,
            };
            status_of(write_u64(&mut c, ret, v))
        },
    )?;
    def("env", "proxy_get_metric");

    // --- HTTP calls ---------------------------------------------------------------------------
    l.func_wrap(
        "env",
        "proxy_http_call",
        |mut c: C<'_>,
         up_p: i32,
         up_l: i32,
         h_p: i32,
         h_l: i32,
         b_p: i32,
         b_l: i32,
         _trailers_p: i32,
         _trailers_l: i32,
         timeout_ms: i32,
         ret_token: i32|
         -> i32 {
            let max_body = c.data().info.limits.body;
            if b_l as u32 as usize > max_body
                || h_l as u32 as usize > super::callout::MAX_HEADER_BYTES
                || up_l as u32 > 1024
            {
                let info = &c.data().info;
                info.state.hits.hit(&info.name, Limit::HttpCall, || {
                    format!("proxy_http_call: upstream name over 1 KiB, headers over {} bytes or body over limits.body ({max_body} bytes)", super::callout::MAX_HEADER_BYTES)
                });
                return status::BAD_ARGUMENT;
            }
            let (Some(upstream), Some(headers), Some(body)) =
                (read(&mut c, up_p, up_l), read(&mut c, h_p, h_l), read(&mut c, b_p, b_l))
            else {
                return status::INVALID_MEMORY_ACCESS;
            };
            let Some(pairs) = header_pairs(&c, &headers, Limit::HttpCall) else {
                return status::BAD_ARGUMENT;
            };
            let host = c.data_mut();
            let name = host.info.name.clone();
            // Only where someone can wait for the answer: a request's request- and
            // response-headers callbacks, a tick, and the delivery of an earlier call's answer.
            // The SDKs treat INTERNAL_FAILURE as an error they hand to the plugin (any other
            // status makes the Rust SDK panic).
            let Some(mut env) = host
                .env
                .filter(|e| matches!(e.phase, Phase::Request | Phase::Response | Phase::Tick))
            else {
                // Debug: a plugin that tries on every body chunk would flood the log.
                log::debug!(target: "plugin", "[{name}] proxy_http_call is only available in the request- and response-headers phases and in ticks");
                return status::INTERNAL_FAILURE;
            };
            let (Some(info), Some(names)) = env.split() else {
                return status::INTERNAL_FAILURE;
            };
            if info.calls_left == 0 {
                log::warn!(target: "plugin", "[{name}] proxy_http_call: more than {} calls for one request", super::callout::MAX_CALLS);
                return status::INTERNAL_FAILURE;
            }
            let token = host.last_token.wrapping_add(1).max(1);
            let call = match super::callout::Call::parse(
                names,
                &host.info.calls,
                token,
                &upstream,
                &pairs,
                body,
                timeout_ms as u32,
            ) {
                Ok(call) => call,
                Err(why) => {
                    log::warn!(target: "plugin", "[{name}] proxy_http_call: {why}");
                    return status::BAD_ARGUMENT;
                }
            };
            // The token first: a call recorded without the guest knowing its token would be
            // answered to a token the SDK never registered (it traps on that).
            if !write_u32s(&mut c, &[(ret_token, token)]) {
                return status::INVALID_MEMORY_ACCESS;
            }
            c.data_mut().last_token = token;
            info.calls_left -= 1;
            info.calls.push(call);
            status::OK
        },
    )?;
    def("env", "proxy_http_call");

    // --- shared queues ---------------------------------------------------------------------------
    l.func_wrap(
        "env",
        "proxy_register_shared_queue",
        |mut c: C<'_>, np: i32, nl: i32, ret: i32| -> i32 {
            // Queues live as long as the process: a plugin has at most MAX_QUEUES, with short
            // names. Past that, `BAD_ARGUMENT` (the Rust SDK traps on it; Envoy sets no bound).
            let refuse = |c: &C<'_>, why: String| {
                let info = &c.data().info;
                info.state.hits.hit(&info.name, Limit::Queues, || {
                    format!("proxy_register_shared_queue: refused {why}")
                });
                status::BAD_ARGUMENT
            };
            if nl as u32 as usize > limits::MAX_QUEUE_NAME {
                return refuse(
                    &c,
                    format!(
                        "a name of {} bytes (at most {})",
                        nl as u32,
                        limits::MAX_QUEUE_NAME
                    ),
                );
            }
            let Some(name) = read(&mut c, np, nl) else {
                return status::INVALID_MEMORY_ACCESS;
            };
            let Some(id) = super::queue::register(&c.data().info.name, &name, limits::MAX_QUEUES)
            else {
                return refuse(
                    &c,
                    format!("a queue past the plugin's {}", limits::MAX_QUEUES),
                );
            };
            status_of(write_u32s(&mut c, &[(ret, id)]))
        },
    )?;
    def("env", "proxy_register_shared_queue");
    l.func_wrap(
        "env",
        "proxy_resolve_shared_queue",
        |mut c: C<'_>, vp: i32, vl: i32, np: i32, nl: i32, ret: i32| -> i32 {
            if vl as u32 as usize > limits::MAX_QUEUE_NAME
                || nl as u32 as usize > limits::MAX_QUEUE_NAME
            {
                return status::NOT_FOUND; // no queue has such a name
            }
            let (Some(vm_id), Some(name)) = (read(&mut c, vp, vl), read(&mut c, np, nl)) else {
                return status::INVALID_MEMORY_ACCESS;
            };
            match super::queue::resolve(&c.data().info.name, &vm_id, &name) {
                Some(id) => status_of(write_u32s(&mut c, &[(ret, id)])),
                None => status::NOT_FOUND,
            }
        },
    )?;
    def("env", "proxy_resolve_shared_queue");
    l.func_wrap(
        "env",
        "proxy_enqueue_shared_queue",
        |mut c: C<'_>, id: i32, vp: i32, vl: i32| -> i32 {
            if vl as u32 as usize > super::queue::MAX_BYTES {
                // Never copied: dropped as a full queue drops (the SDKs panic on errors here).
                return if super::queue::drop_one(id as u32) {
                    status::OK
                } else {
                    status::NOT_FOUND
                };
            }
            let Some(value) = read(&mut c, vp, vl) else {
                return status::INVALID_MEMORY_ACCESS;
            };
            if super::queue::enqueue(id as u32, value) {
                status::OK
            } else {
                status::NOT_FOUND
            }
        },
    )?;
    def("env", "proxy_enqueue_shared_queue");
    l.func_wrap(
        "env",
        "proxy_dequeue_shared_queue",
        |mut c: C<'_>, id: i32, ret_ptr: i32, ret_len: i32| -> wasmtime::Result<i32> {
            match super::queue::dequeue(id as u32) {
                Ok(Some(v)) => return_bytes(&mut c, &v, ret_ptr, ret_len),
                Ok(None) => Ok(status::EMPTY),
                Err(()) => Ok(status::NOT_FOUND),
            }
        },
    )?;
    def("env", "proxy_dequeue_shared_queue");

    // --- not implemented: gRPC callouts, status ----------------------------------------------
    unimplemented_calls!(l, def,
        "proxy_grpc_call" => (i32, i32, i32, i32, i32, i32, i32, i32, i32, i32, i32, i32),
        "proxy_grpc_stream" => (i32, i32, i32, i32, i32, i32, i32, i32, i32),
        "proxy_grpc_send" => (i32, i32, i32, i32),
        "proxy_grpc_cancel" => (i32),
        "proxy_grpc_close" => (i32),
        "proxy_get_status" => (i32, i32, i32),
    );

    // --- WASI preview1 -----------------------------------------------------------------------
    const W: &str = "wasi_snapshot_preview1";
    l.func_wrap(
        W,
        "fd_write",
        |mut c: C<'_>, fd: i32, iovs: i32, n: i32, ret: i32| -> i32 {
            if fd != 1 && fd != 2 {
                return errno::BADF;
            }
            let Some((mem, host)) = parts(&mut c) else {
                return errno::FAULT;
            };
            // One call writes at most MAX_FD_WRITE bytes from at most MAX_IOVECS iovecs:
            // `INVAL` past that (the spec's errno for "too large", as in `random_get`); every
            // iovec is checked, and the total counted, before anything is copied (the same
            // bytes named by many iovecs would otherwise copy the memory many times over).
            let n = n as u32 as usize;
            let refuse = |host: &Host, what: String| {
                let state = &host.info.state;
                state.hits.hit(&state.name, Limit::FdWrite, || {
                    format!("fd_write: refused {what}")
                });
                errno::INVAL
            };
            if n > limits::MAX_IOVECS {
                return refuse(host, format!("{n} iovecs (at most {})", limits::MAX_IOVECS));
            }
            let iov = |i: usize| -> Option<std::ops::Range<usize>> {
                let at = (iovs as u32 as usize).checked_add(i * 8)?;
                let iov = mem.get(at..at.checked_add(8)?)?;
                let p = i32::from_le_bytes(iov[..4].try_into().ok()?);
                let l = i32::from_le_bytes(iov[4..].try_into().ok()?);
                range(p, l).filter(|r| r.end <= mem.len())
            };
            let mut total = 0usize;
            for i in 0..n {
                let Some(r) = iov(i) else {
                    return errno::FAULT;
                };
                total += r.len();
            }
            if total > limits::MAX_FD_WRITE {
                return refuse(
                    host,
                    format!(
                        "{total} bytes in one call (at most {})",
                        limits::MAX_FD_WRITE
                    ),
                );
            }
            let mut msg = Vec::with_capacity(total);
            for r in (0..n).filter_map(iov) {
                msg.extend_from_slice(&mem[r]);
            }
            let text = String::from_utf8_lossy(&msg);
            let text = text.trim_end_matches('\n');
            if !text.is_empty() {
                let lvl = if fd == 1 {
                    log::Level::Info
                } else {
                    log::Level::Error
                };
                log::log!(target: "plugin", lvl, "[{}] {}", host.info.name, text);
            }
            errno_of(put_u32(mem, ret, msg.len() as u32))
        },
    )?;
    def(W, "fd_write");
    l.func_wrap(
        W,
        "clock_time_get",
        |mut c: C<'_>, id: i32, _precision: i64, ret: i32| -> i32 {
            let v = match id {
                0 => now_nanos(),
                1..=3 => monotonic_nanos(),
                _ => return errno::NOTSUP,
            };
            errno_of(write_u64(&mut c, ret, v))
        },
    )?;
    def(W, "clock_time_get");
    l.func_wrap(
        W,
        "clock_res_get",
        |mut c: C<'_>, _id: i32, ret: i32| -> i32 { errno_of(write_u64(&mut c, ret, 1_000)) },
    )?;
    def(W, "clock_res_get");
    l.func_wrap(W, "random_get", |mut c: C<'_>, ptr: i32, len: i32| -> i32 {
        if len as u32 > 1 << 20 {
            return errno::INVAL;
        }
        let Some((mem, _)) = parts(&mut c) else {
            return errno::FAULT;
        };
        match range(ptr, len).and_then(|r| mem.get_mut(r)) {
            Some(buf) => {
                if getrandom::getrandom(buf).is_err() {
                    return errno::NOSYS;
                }
                errno::SUCCESS
            }
            None => errno::FAULT,
        }
    })?;
    def(W, "random_get");
    l.func_wrap(
        W,
        "environ_sizes_get",
        |mut c: C<'_>, count: i32, size: i32| -> i32 {
            let Some((mem, host)) = parts(&mut c) else {
                return errno::FAULT;
            };
            let (n, len) = (
                host.info.environ_count as u32,
                host.info.environ.len() as u32,
            );
            errno_of(put_u32(mem, count, n) && put_u32(mem, size, len))
        },
    )?;
    def(W, "environ_sizes_get");
    l.func_wrap(
        W,
        "environ_get",
        |mut c: C<'_>, array: i32, buf: i32| -> i32 {
            let Some((mem, host)) = parts(&mut c) else {
                return errno::FAULT;
            };
            let env = &host.info.environ;
            let Some(dst) = range(buf, env.len() as i32).and_then(|r| mem.get_mut(r)) else {
                return errno::FAULT;
            };
            dst.copy_from_slice(env);
            let mut at = 0usize;
            for (i, entry) in env.split_inclusive(|b| *b == 0).enumerate() {
                let ptr = (buf as u32).wrapping_add(at as u32);
                if !put_u32(mem, array.wrapping_add(4 * i as i32), ptr) {
                    return errno::FAULT;
                }
                at += entry.len();
            }
            errno::SUCCESS
        },
    )?;
    def(W, "environ_get");
    l.func_wrap(
        W,
        "args_sizes_get",
        |mut c: C<'_>, count: i32, size: i32| -> i32 {
            errno_of(write_u32s(&mut c, &[(count, 0), (size, 0)]))
        },
    )?;
    def(W, "args_sizes_get");
    l.func_wrap(W, "args_get", |_: i32, _: i32| -> i32 { errno::SUCCESS })?;
    def(W, "args_get");
    l.func_wrap(
        W,
        "proc_exit",
        |c: C<'_>, code: i32| -> wasmtime::Result<()> {
            Err(wasmtime::Error::msg(format!(
                "plugin `{}` called proc_exit({code})",
                c.data().info.name
            )))
        },
    )?;
    def(W, "proc_exit");
    l.func_wrap(W, "sched_yield", || -> i32 { errno::SUCCESS })?;
    def(W, "sched_yield");

    // Anything else the module imports: defined so it links.
    for imp in module.imports() {
        let (m, n) = (imp.module(), imp.name());
        if defined.iter().any(|(dm, dn)| *dm == m && *dn == n) {
            continue;
        }
        let wasmtime::ExternType::Func(ft) = imp.ty() else {
            continue; // memories/tables/globals: instantiation reports them
        };
        let code = if m == W {
            errno::NOSYS
        } else {
            status::UNIMPLEMENTED
        };
        let returns_i32 =
            ft.results().len() == 1 && matches!(ft.results().next(), Some(wasmtime::ValType::I32));
        let what = format!("{m}.{n}");
        l.func_new(m, n, ft.clone(), move |_c, _params, results| {
            if returns_i32 {
                results[0] = Val::I32(code);
                Ok(())
            } else {
                Err(wasmtime::Error::msg(format!(
                    "unsupported host call {what}"
                )))
            }
        })?;
    }
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_replaces_prepends_appends_and_cuts() {
        let b = Bytes::from_static(b"hello world");
        assert_eq!(splice(&b, 0, 11, b"bye"), "bye");
        assert_eq!(splice(&b, 0, 999, b"all"), "all");
        assert_eq!(splice(&b, 0, 0, b">> "), ">> hello world");
        assert_eq!(splice(&b, 11, 0, b"!"), "hello world!");
        assert_eq!(splice(&b, 6, 5, b"there"), "hello there");
        assert_eq!(splice(&b, 5, 6, b""), "hello");
        assert_eq!(
            splice(&b, u32::MAX as usize, 0, b"!"),
            "hello world!",
            "past the end appends"
        );
    }
}
