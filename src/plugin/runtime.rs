//! Plugins as loaded code: the process-wide engine (epoch interruption, one ticker thread),
//! compilation (once, optionally through an on-disk cache of precompiled modules keyed by
//! sha256(module) and the engine's compatibility hash), configured instances in a pool, fault
//! classification (trap / timeout / memory), backoff and a trap-rate limit, and reload.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use sha2::{Digest, Sha256};
use wasmtime::{Engine, InstancePre, Module, Store, Trap, TypedFunc, WasmParams, WasmResults};

use super::exchange::Exchange;
use super::host::{self, Env, Host, PluginInfo, PluginState};
use super::idle::Idle;
use super::{Names, RequestInfo};
use crate::config::{Config, OnError, PluginConfig};

/// Epoch tick period: the resolution of callback deadlines (a deadline D interrupts a
/// callback no sooner than D and at most two ticks later). 5 ms keeps the ticker thread to
/// 200 wakeups a second.
const TICK: Duration = Duration::from_millis(5);
/// The root context of every instance.
pub(super) const ROOT_CONTEXT: i32 = 1;
/// Idle configured instances kept per plugin.
const MAX_IDLE: usize = 256;
/// Contexts parked in one instance at most (see `Plugin::park`).
const MAX_PARKED: usize = 64;
/// Faults per second after which no new instance is built until the second is over.
const TRAP_RATE_LIMIT: u32 = 20;

static ENGINE: OnceLock<Engine> = OnceLock::new();

/// The process-wide engine. Its first use starts the epoch ticker thread and sizes the
/// instance pool (default size when no config asked first).
pub fn engine() -> &'static Engine {
    engine_with_slots(crate::config::DEFAULT_PLUGIN_INSTANCES)
}

/// The engine, created with a pool of `slots` instances when it does not exist yet. The pool
/// is fixed for the process: a later config's `server.plugin_instances` cannot resize it.
fn engine_with_slots(slots: u32) -> &'static Engine {
    ENGINE.get_or_init(|| {
        let mut c = wasmtime::Config::new();
        c.epoch_interruption(true);
        c.cranelift_opt_level(wasmtime::OptLevel::Speed);
        c.max_wasm_stack(512 * 1024);
        if std::env::var_os("CASCADE_WASM_PERFMAP").is_some() {
            // `perf` can then name plugin functions (/tmp/perf-<pid>.map).
            c.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        // The pooling allocator: every instance gets a slot of address space reserved at
        // start (4 GiB + guards each, so memory accesses need no bounds checks), a rebuilt
        // instance reuses a warm slot (copy-on-write data segments, no mmap per instance),
        // and `slots` bounds how many instances, hence how much plugin memory, can exist.
        let mut pool = wasmtime::PoolingAllocationConfig::new();
        pool.total_core_instances(slots)
            .total_memories(slots)
            .total_tables(slots)
            .max_memories_per_module(1)
            .max_tables_per_module(1)
            // Address space only until used; wasmtime's default of 20,000 would refuse modules
            // with larger function tables that load without the pool.
            .table_elements(65_536);
        let mut pooled = c.clone();
        pooled.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        let engine = match Engine::new(&pooled) {
            Ok(e) => {
                crate::metrics::METRICS.plugin_pool_slots.set(i64::from(slots));
                e
            }
            Err(e) => {
                // E.g. an address-space limit (`ulimit -v`) too small for the pool.
                log::warn!(
                    target: "plugin",
                    "cannot reserve a pool of {slots} plugin instances ({e:#}); instances are allocated on demand"
                );
                Engine::new(&c).expect("wasmtime engine")
            }
        };
        let ticker = engine.clone();
        std::thread::Builder::new()
            .name("plugin-epoch".into())
            .spawn(move || loop {
                std::thread::sleep(TICK);
                ticker.increment_epoch();
            })
            .expect("epoch thread");
        engine
    })
}

/// Every loaded plugin version, so that a plugin short of pool slots can take one from
/// another plugin's idle instances (idle instances are a cache; demand comes first).
static LOADED: Mutex<Vec<std::sync::Weak<Plugin>>> = Mutex::new(Vec::new());

/// Drops one idle instance that holds no parked context (of any plugin), freeing its pool
/// slot; forgets discarded ones on the way. `false` when there is none.
fn free_an_idle_slot() -> bool {
    let plugins: Vec<Arc<Plugin>> = {
        let mut loaded = LOADED.lock();
        loaded.retain(|w| w.strong_count() > 0);
        loaded.iter().filter_map(std::sync::Weak::upgrade).collect()
    };
    for p in plugins {
        let handle = p.pool.evict_one();
        if handle.is_some() {
            // Dropped here, outside every lock: the slot goes back to the engine's pool.
            return true;
        }
    }
    false
}

fn ticks(d: Duration) -> u64 {
    (d.as_micros() as u64)
        .div_ceil(TICK.as_micros() as u64)
        .max(1)
        + 1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    Trap,
    Timeout,
    Memory,
    /// Not this callback's fault: another request's fault discarded the shared instance.
    Lost,
}

impl FaultKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::Trap => "trap",
            FaultKind::Timeout => "timeout",
            FaultKind::Memory => "memory",
            FaultKind::Lost => "lost",
        }
    }
}

/// A callback that did not return normally; its instance is discarded.
#[derive(Debug)]
pub struct Fault {
    pub kind: FaultKind,
    pub message: String,
}

impl Fault {
    /// The instance holding this request's context was discarded by a fault of another
    /// request that shared it (a parked context's finishing callbacks).
    pub(super) fn lost() -> Fault {
        Fault {
            kind: FaultKind::Lost,
            message: "the instance was discarded after another request's fault".into(),
        }
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind.as_str(), self.message)
    }
}

fn classify(e: wasmtime::Error, host: &Host, deadline: Duration) -> Fault {
    if host.limiter.hit || e.downcast_ref::<host::MemoryLimit>().is_some() {
        return Fault {
            kind: FaultKind::Memory,
            message: format!("memory limit of {} bytes reached", host.limiter.max_memory),
        };
    }
    if let Some(Trap::Interrupt) = e.downcast_ref::<Trap>() {
        return Fault {
            kind: FaultKind::Timeout,
            message: format!("callback exceeded its deadline of {deadline:?}"),
        };
    }
    Fault {
        kind: FaultKind::Trap,
        message: format!("{e:#}")
            .lines()
            .next()
            .unwrap_or("trap")
            .to_string(),
    }
}

type Cb1 = TypedFunc<i32, ()>;
type CbHeaders = TypedFunc<(i32, i32, i32), i32>;
/// `proxy_on_http_call_response(root, token, headers, body, trailers)`.
type CbCallResponse = TypedFunc<(i32, i32, i32, i32, i32), ()>;

/// A configured instance as requests hold it. One request leases it from its request headers
/// on; a request left with only its finishing callbacks (`proxy_on_done`/`_log`/`_delete`)
/// parks its context there and hands the instance back, so that a long response body does not
/// hold an instance: later requests lease it meanwhile, and the parked request takes the lock
/// again for its finish. `None` once a fault discarded the instance (parked contexts die with
/// it; their finishing callbacks are skipped).
pub type Handle = Arc<Mutex<Option<Instance>>>;

/// One configured instance (its own `Store`).
pub struct Instance {
    store: Store<Host>,
    deadline: Duration,
    ticks: u64,
    on_context_create: Option<TypedFunc<(i32, i32), ()>>,
    on_request_headers: Option<CbHeaders>,
    on_response_headers: Option<CbHeaders>,
    on_request_body: Option<CbHeaders>,
    on_response_body: Option<CbHeaders>,
    on_done: Option<TypedFunc<i32, i32>>,
    on_log: Option<Cb1>,
    on_delete: Option<Cb1>,
    on_http_call_response: Option<CbCallResponse>,
    on_tick: Option<Cb1>,
    on_queue_ready: Option<TypedFunc<(i32, i32), ()>>,
    /// A tick's HTTP calls are in flight (the next tick skips this instance).
    pub(super) tick_busy: bool,
    next_ctx: i32,
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.store.data().info.state.instances.dec();
    }
}

fn call<P: WasmParams, R: WasmResults>(
    store: &mut Store<Host>,
    ticks: u64,
    deadline: Duration,
    f: &TypedFunc<P, R>,
    args: P,
    env: Option<Env>,
) -> Result<R, Fault> {
    store.set_epoch_deadline(ticks);
    store.data_mut().env = env;
    let r = f.call(&mut *store, args);
    store.data_mut().env = None;
    r.map_err(|e| classify(e, store.data(), deadline))
}

impl Instance {
    /// A fresh HTTP context id (never the root's).
    pub(super) fn new_context(&mut self, env: Env) -> Result<i32, Fault> {
        self.next_ctx = if self.next_ctx >= i32::MAX - 1 {
            2
        } else {
            self.next_ctx + 1
        };
        let id = self.next_ctx;
        if let Some(f) = &self.on_context_create {
            call(
                &mut self.store,
                self.ticks,
                self.deadline,
                f,
                (id, ROOT_CONTEXT),
                Some(env),
            )?;
        }
        Ok(id)
    }

    pub(super) fn request_headers(
        &mut self,
        ctx: i32,
        n: usize,
        eos: bool,
        env: Env,
    ) -> Result<i32, Fault> {
        match &self.on_request_headers {
            Some(f) => call(
                &mut self.store,
                self.ticks,
                self.deadline,
                f,
                (ctx, n as i32, eos as i32),
                Some(env),
            ),
            None => Ok(super::abi::ACTION_CONTINUE),
        }
    }

    /// `proxy_on_request_body` / `proxy_on_response_body` (`response`) for a chunk of `size`
    /// bytes; `Ok(None)` when the module has no such export.
    pub(super) fn body(
        &mut self,
        response: bool,
        ctx: i32,
        size: usize,
        eos: bool,
        env: Env,
    ) -> Result<Option<i32>, Fault> {
        let f = if response {
            &self.on_response_body
        } else {
            &self.on_request_body
        };
        match f {
            Some(f) => call(
                &mut self.store,
                self.ticks,
                self.deadline,
                f,
                (ctx, size as i32, eos as i32),
                Some(env),
            )
            .map(Some),
            None => Ok(None),
        }
    }

    pub(super) fn response_headers(&mut self, ctx: i32, n: usize, env: Env) -> Result<i32, Fault> {
        match &self.on_response_headers {
            Some(f) => call(
                &mut self.store,
                self.ticks,
                self.deadline,
                f,
                (ctx, n as i32, 0),
                Some(env),
            ),
            None => Ok(super::abi::ACTION_CONTINUE),
        }
    }

    /// `proxy_on_http_call_response` for call `token`: its answer has `headers` headers and
    /// `body` body bytes (both 0 when the call failed). As in Envoy, the root context's id goes
    /// first: the SDKs find the calling context by the token.
    pub(super) fn http_call_response(
        &mut self,
        token: u32,
        headers: usize,
        body: usize,
        env: Env,
    ) -> Result<(), Fault> {
        match &self.on_http_call_response {
            Some(f) => call(
                &mut self.store,
                self.ticks,
                self.deadline,
                f,
                (ROOT_CONTEXT, token as i32, headers as i32, body as i32, 0),
                Some(env),
            ),
            None => Ok(()),
        }
    }

    /// `proxy_on_tick`, or (`queue`) `proxy_on_queue_ready` for that queue, on the root
    /// context.
    pub(super) fn tick(&mut self, queue: Option<u32>, env: Env) -> Result<(), Fault> {
        let (t, d) = (self.ticks, self.deadline);
        match (queue, &self.on_tick, &self.on_queue_ready) {
            (None, Some(f), _) => call(&mut self.store, t, d, f, ROOT_CONTEXT, Some(env)),
            (Some(q), _, Some(f)) => call(
                &mut self.store,
                t,
                d,
                f,
                (ROOT_CONTEXT, q as i32),
                Some(env),
            ),
            _ => Ok(()),
        }
    }

    /// `proxy_on_done`, then (`log`) `proxy_on_log`, then `proxy_on_delete`.
    pub(super) fn finish(&mut self, ctx: i32, env: Option<Env>, log: bool) -> Result<(), Fault> {
        let (t, d) = (self.ticks, self.deadline);
        if let Some(f) = &self.on_done {
            call(&mut self.store, t, d, f, ctx, env)?;
        }
        if log {
            if let Some(f) = &self.on_log {
                call(&mut self.store, t, d, f, ctx, env)?;
            }
        }
        if let Some(f) = &self.on_delete {
            call(&mut self.store, t, d, f, ctx, env)?;
        }
        Ok(())
    }
}

/// Why an instance could not be built.
enum Build {
    /// Every slot of the engine's instance pool is taken: not the plugin's fault.
    PoolFull(String),
    Failed(String),
}

#[derive(Default)]
struct Health {
    /// When the last "pool full" warning was logged.
    pool_full_logged: Option<Instant>,
    window_start: Option<Instant>,
    faults_in_window: u32,
    backoff: Duration,
    backoff_until: Option<Instant>,
}

/// One loaded version of a plugin.
pub struct Plugin {
    pub info: Arc<PluginInfo>,
    pub on_error: OnError,
    /// Body callbacks are made: `bodies:` is on and the module exports at least one (fixed
    /// per module, so the request path never asks an instance).
    pub bodies: bool,
    /// Most body bytes held while the plugin pauses a body.
    pub max_body: usize,
    pre: InstancePre<Host>,
    /// Idle instances (possibly holding parked contexts), per thread.
    pool: Idle<Instance>,
    health: Mutex<Health>,
    max_memory: usize,
    deadline: Duration,
    /// sha256 of the module bytes (reload compares it).
    digest: [u8; 32],
    /// The compiled module (shared with every plugin loaded from the same bytes).
    module: Module,
}

/// Compiled modules by sha256 of their bytes: plugins loaded from the same file (one module,
/// several configurations) share one compilation and one copy of machine code.
type Compiled = std::collections::HashMap<[u8; 32], Module>;

impl Plugin {
    fn load(
        cfg: &PluginConfig,
        state: Arc<PluginState>,
        cache_dir: Option<&Path>,
        compiled: &mut Compiled,
    ) -> Result<Arc<Plugin>, String> {
        let bytes = std::fs::read(&cfg.wasm)
            .map_err(|e| format!("cannot read {}: {e}", cfg.wasm.display()))?;
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        Plugin::from_bytes(cfg, state, cache_dir, &bytes, digest, compiled)
    }

    fn from_bytes(
        cfg: &PluginConfig,
        state: Arc<PluginState>,
        cache_dir: Option<&Path>,
        bytes: &[u8],
        digest: [u8; 32],
        compiled: &mut Compiled,
    ) -> Result<Arc<Plugin>, String> {
        let engine = engine();
        let module = match compiled.get(&digest) {
            Some(m) => m.clone(),
            None => {
                let m = compile(engine, bytes, &digest, cache_dir).map_err(|e| {
                    format!(
                        "{} is not a loadable Wasm module: {e:#}",
                        cfg.wasm.display()
                    )
                })?;
                compiled.insert(digest, m.clone());
                m
            }
        };
        if module.get_export("proxy_abi_version_0_2_1").is_none()
            && module.get_export("proxy_abi_version_0_2_0").is_none()
        {
            log::warn!(
                target: "plugin",
                "[{}] the module does not export proxy_abi_version_0_2_1; loading it anyway",
                cfg.name
            );
        }
        let linker = host::linker(engine, &module).map_err(|e| format!("linking: {e:#}"))?;
        let pre = linker
            .instantiate_pre(&module)
            .map_err(|e| format!("linking: {e:#}"))?;
        let plugin = Arc::new(Plugin {
            info: Arc::new(PluginInfo {
                name: Arc::from(cfg.name.as_str()),
                config: cfg.config.clone(),
                vm_config: cfg.vm_config.clone(),
                state,
                environ: cfg
                    .env
                    .iter()
                    .flat_map(|(k, v)| [k.as_bytes(), b"=", v.as_bytes(), b"\0"])
                    .flatten()
                    .copied()
                    .collect(),
                environ_count: cfg.env.len(),
                calls: cfg.calls.clone(),
                limits: super::limits::Limits {
                    body: usize::try_from(cfg.max_body).unwrap_or(usize::MAX),
                    headers: cfg.max_headers as usize,
                    shared_data: cfg.shared_data as usize,
                    shared_value: cfg.shared_value as usize,
                },
                tick_ms: Default::default(),
                ticks_stopped: Default::default(),
            }),
            on_error: cfg.on_error,
            bodies: cfg.bodies
                && ["proxy_on_request_body", "proxy_on_response_body"]
                    .iter()
                    .any(|name| module.get_export(name).is_some()),
            max_body: cfg.max_body as usize,
            pre,
            pool: Idle::new(MAX_IDLE),
            health: Mutex::new(Health::default()),
            max_memory: cfg.memory as usize,
            deadline: cfg.time,
            digest,
            module,
        });
        // Build one instance now: a plugin that cannot start is a load error.
        let mut first = plugin.build_instance();
        if matches!(first, Err(Build::PoolFull(_))) && free_an_idle_slot() {
            first = plugin.build_instance();
        }
        let first = first.map_err(|(Build::PoolFull(e) | Build::Failed(e))| e)?;
        plugin.pool.put(Arc::new(Mutex::new(Some(first))));
        LOADED.lock().push(Arc::downgrade(&plugin));
        Ok(plugin)
    }

    /// Instantiates and configures an instance: `_initialize`/`_start`, root context,
    /// `proxy_on_vm_start`, `proxy_on_configure`. A full instance pool is told apart from a
    /// plugin that fails.
    fn build_instance(&self) -> Result<Instance, Build> {
        let engine = engine();
        let mut store = Store::new(engine, Host::new(self.info.clone(), self.max_memory));
        store.limiter(|h| &mut h.limiter);
        // Start-up may do more work than a request callback (parsing config): 10× the budget.
        let init_deadline = (self.deadline * 10).max(Duration::from_millis(500));
        store.set_epoch_deadline(ticks(init_deadline));
        let fail = |store: &Store<Host>, what: &str, e: wasmtime::Error| {
            Build::Failed(format!(
                "{what}: {}",
                classify(e, store.data(), init_deadline)
            ))
        };
        let inst = match self.pre.instantiate(&mut store) {
            Ok(i) => i,
            Err(e) if e.is::<wasmtime::PoolConcurrencyLimitError>() => {
                return Err(Build::PoolFull(format!(
                    "the plugin instance pool is full ({e}); raise server.plugin_instances"
                )))
            }
            Err(e) => return Err(fail(&store, "instantiation failed", e)),
        };
        let memory = inst.get_memory(&mut store, "memory");
        let alloc = inst
            .get_typed_func::<i32, i32>(&mut store, "proxy_on_memory_allocate")
            .or_else(|_| inst.get_typed_func::<i32, i32>(&mut store, "malloc"))
            .ok();
        store.data_mut().memory = memory;
        let has_alloc = alloc.is_some();
        store.data_mut().alloc = alloc;
        if memory.is_none() {
            return Err(Build::Failed("the module exports no memory".into()));
        }
        if !has_alloc {
            return Err(Build::Failed(
                "the module exports neither proxy_on_memory_allocate nor malloc".into(),
            ));
        }
        if let Ok(init) = inst.get_typed_func::<(), ()>(&mut store, "_initialize") {
            if let Err(e) = init.call(&mut store, ()) {
                return Err(fail(&store, "_initialize failed", e));
            }
            if let Ok(main) = inst.get_typed_func::<(i32, i32), i32>(&mut store, "main") {
                if let Err(e) = main.call(&mut store, (0, 0)) {
                    return Err(fail(&store, "main failed", e));
                }
            }
        } else if let Ok(start) = inst.get_typed_func::<(), ()>(&mut store, "_start") {
            if let Err(e) = start.call(&mut store, ()) {
                return Err(fail(&store, "_start failed", e));
            }
        }
        let typed2 =
            |store: &mut Store<Host>, n: &str| inst.get_typed_func::<(i32, i32), ()>(store, n).ok();
        let on_context_create = typed2(&mut store, "proxy_on_context_create");
        if let Some(f) = &on_context_create {
            if let Err(e) = f.call(&mut store, (ROOT_CONTEXT, 0)) {
                return Err(fail(&store, "proxy_on_context_create (root) failed", e));
            }
        }
        let env = Env {
            phase: host::Phase::Init,
            req: std::ptr::null_mut(),
            resp: std::ptr::null_mut(),
            info: std::ptr::null_mut(),
            names: std::ptr::null(),
            body: std::ptr::null_mut(),
        };
        store.data_mut().env = Some(env);
        for (export, size) in [
            ("proxy_on_vm_start", self.info.vm_config.len()),
            ("proxy_on_configure", self.info.config.len()),
        ] {
            if let Ok(f) = inst.get_typed_func::<(i32, i32), i32>(&mut store, export) {
                match f.call(&mut store, (ROOT_CONTEXT, size as i32)) {
                    Ok(0) => {
                        return Err(Build::Failed(format!(
                            "{export} returned false (see the plugin's log above)"
                        )))
                    }
                    Ok(_) => {}
                    Err(e) => return Err(fail(&store, &format!("{export} failed"), e)),
                }
            }
        }
        store.data_mut().env = None;
        let headers = |store: &mut Store<Host>, n: &str| {
            inst.get_typed_func::<(i32, i32, i32), i32>(store, n).ok()
        };
        let one = |store: &mut Store<Host>, n: &str| inst.get_typed_func::<i32, ()>(store, n).ok();
        let on_request_headers = headers(&mut store, "proxy_on_request_headers");
        let on_response_headers = headers(&mut store, "proxy_on_response_headers");
        let on_request_body = headers(&mut store, "proxy_on_request_body");
        let on_response_body = headers(&mut store, "proxy_on_response_body");
        let on_done = inst
            .get_typed_func::<i32, i32>(&mut store, "proxy_on_done")
            .ok();
        let on_log = one(&mut store, "proxy_on_log");
        let on_delete = one(&mut store, "proxy_on_delete");
        let on_tick = one(&mut store, "proxy_on_tick");
        let on_queue_ready = typed2(&mut store, "proxy_on_queue_ready");
        let on_http_call_response = inst
            .get_typed_func::<(i32, i32, i32, i32, i32), ()>(
                &mut store,
                "proxy_on_http_call_response",
            )
            .ok();
        self.info.state.instances.inc();
        Ok(Instance {
            store,
            deadline: self.deadline,
            ticks: ticks(self.deadline),
            on_context_create,
            on_request_headers,
            on_response_headers,
            on_request_body,
            on_response_body,
            on_done,
            on_log,
            on_delete,
            on_http_call_response,
            on_tick,
            on_queue_ready,
            tick_busy: false,
            next_ctx: ROOT_CONTEXT,
        })
    }

    /// An idle configured instance, or a new one. `None` while backing off after failures,
    /// or when the instance pool is full even after taking a slot from another plugin's idle
    /// instances.
    pub(super) fn lease(&self) -> Option<Handle> {
        loop {
            // An instance no other request has a context in (parked, or waiting for HTTP
            // calls) first: a fault there then costs only this request, and shared contexts
            // do not pile into one instance. This thread's own idle instances first (idle.rs).
            let Some(h) = self.pool.take() else {
                break;
            };
            if h.lock().is_some() {
                return Some(h);
            }
            // Discarded by a fault while parked contexts held it: forget it.
        }
        let now = Instant::now();
        {
            let h = self.health.lock();
            if h.backoff_until.is_some_and(|t| now < t) {
                return None;
            }
        }
        let mut built = self.build_instance();
        if matches!(built, Err(Build::PoolFull(_))) && free_an_idle_slot() {
            built = self.build_instance();
        }
        match built {
            Ok(i) => {
                self.health.lock().backoff = Duration::ZERO;
                Some(Arc::new(Mutex::new(Some(i))))
            }
            Err(Build::PoolFull(e)) => {
                // No backoff: a slot frees up as soon as any request ends. One warning a second.
                self.info.state.pool_full.inc();
                let mut h = self.health.lock();
                if h.pool_full_logged
                    .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
                {
                    h.pool_full_logged = Some(now);
                    log::warn!(target: "plugin", "[{}] no instance for a request: {e}", self.info.name);
                }
                None
            }
            Err(Build::Failed(e)) => {
                let mut h = self.health.lock();
                h.backoff =
                    (h.backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(5));
                h.backoff_until = Some(now + h.backoff);
                log::error!(
                    target: "plugin",
                    "[{}] cannot build a new instance ({e}); retrying in {:?}",
                    self.info.name,
                    h.backoff
                );
                None
            }
        }
    }

    /// The idle instances, for ticks (clones of the handles; they stay in the pool).
    pub(super) fn idle(&self) -> Vec<Handle> {
        self.pool.snapshot()
    }

    /// A request parks its context in `h` and hands the instance back, unless `MAX_PARKED`
    /// contexts are parked there already: then the instance leaves the pool and lives until
    /// its parked contexts finish, and new requests get other instances (bounded guest memory
    /// per instance, and a bounded number of contexts a fault there can take with it).
    pub(super) fn park(&self, h: &Handle) {
        // Holders: this request, and one per other parked context.
        if Arc::strong_count(h) <= MAX_PARKED {
            self.give_back(Arc::clone(h));
        }
    }

    /// Returns a leased instance to the idle pool (unless it was discarded or the pool is
    /// full; parked contexts keep a dropped instance alive until they finish).
    pub(super) fn give_back(&self, h: Handle) {
        if h.lock().is_none() {
            return;
        }
        self.pool.put(h);
    }

    /// Counts a fault (the instance is already discarded) and applies the trap-rate limit.
    /// A lost instance was counted where it faulted; it is only logged here.
    pub(super) fn record_fault(&self, phase: &str, f: &Fault) {
        let ix = match f.kind {
            FaultKind::Trap => 0,
            FaultKind::Timeout => 1,
            FaultKind::Memory => 2,
            FaultKind::Lost => {
                self.info.state.lost.inc();
                log::warn!(target: "plugin", "[{}] {phase}: {f}", self.info.name);
                return;
            }
        };
        self.info.state.traps[ix].inc();
        let now = Instant::now();
        let mut h = self.health.lock();
        if h.window_start
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            h.window_start = Some(now);
            h.faults_in_window = 0;
        }
        h.faults_in_window += 1;
        if h.faults_in_window == TRAP_RATE_LIMIT {
            let until = h.window_start.expect("set") + Duration::from_secs(1);
            h.backoff_until = Some(h.backoff_until.map_or(until, |t| t.max(until)));
            log::warn!(
                target: "plugin",
                "[{}] {TRAP_RATE_LIMIT} faults within a second: no new instances until {:?} from now",
                self.info.name,
                until.saturating_duration_since(now)
            );
        }
        drop(h);
        log::error!(
            target: "plugin",
            "[{}] {phase} callback failed, instance discarded ({f}); on_error: {}",
            self.info.name,
            match self.on_error {
                OnError::Deny => "deny",
                OnError::Allow => "allow",
            }
        );
    }
}

/// What begins a precompiled-cache entry: this magic, then sha256 of the serialized module,
/// then the module as `Engine::precompile_module` made it.
const CACHE_MAGIC: &[u8; 8] = b"cscwasm1";
const CACHE_HEADER: usize = CACHE_MAGIC.len() + 32;

/// Compiles `bytes`, through the precompiled cache in `cache_dir` when given.
///
/// `Module::deserialize` runs whatever machine code it is handed, so a cache entry is used
/// only when both the directory and the file are ours and writable by nobody else, the file
/// is not a symbolic link, and the checksum in its header matches its bytes. A directory that
/// fails this is not used at all (the module is compiled, with a warning); a file that fails
/// it, a truncated or altered one, is recompiled and replaced. Entries are written 0600 to a
/// temp file and renamed into place; a missing directory is created 0700.
fn compile(
    engine: &Engine,
    bytes: &[u8],
    digest: &[u8; 32],
    cache_dir: Option<&Path>,
) -> wasmtime::Result<Module> {
    let Some(dir) = cache_dir else {
        return Module::new(engine, bytes);
    };
    if let Err(e) = crate::owned::ensure_dir(dir) {
        log::warn!("plugin cache not used ({e}); compiling");
        return Module::new(engine, bytes);
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let path = dir.join(format!("{hex}-{:016x}.cwasm", h.finish()));
    match read_cached(&path) {
        Ok(Some(data)) => {
            // SAFETY: the entry is ours and unaltered (owner, mode and checksum checked by
            // `read_cached`), and was written by `precompile_module` of an engine with the same
            // compatibility hash (it is in the name).
            match unsafe { Module::deserialize(engine, &data) } {
                Ok(m) => return Ok(m),
                Err(e) => log::warn!(
                    "plugin cache: {} unusable ({e}); recompiling",
                    path.display()
                ),
            }
        }
        Ok(None) => {}
        Err(why) => log::warn!("plugin cache: {why}; recompiling and replacing it"),
    }
    let data = engine.precompile_module(bytes)?;
    if let Err(e) = write_cached(dir, &path, &data) {
        log::warn!("plugin cache: cannot store {}: {e}", path.display());
    }
    // SAFETY: `data` was produced by this engine just now.
    unsafe { Module::deserialize(engine, &data) }
}

/// The serialized module in cache entry `path`: `Ok(None)` when there is none, `Err(why)`
/// when the entry cannot be trusted (not ours, writable by others, a link, not an entry of
/// this format, or its checksum does not match: truncated or altered).
fn read_cached(path: &Path) -> Result<Option<Vec<u8>>, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path);
    let mut file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    // The checks are on the file opened, not on a name that could change meanwhile.
    let meta = file
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if let Some(why) = crate::owned::untrusted(&meta, false) {
        return Err(format!("{} {why}", path.display()));
    }
    let mut data = Vec::with_capacity(meta.len() as usize);
    file.read_to_end(&mut data)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if data.len() < CACHE_HEADER || &data[..CACHE_MAGIC.len()] != CACHE_MAGIC {
        return Err(format!("{} is not a cache entry", path.display()));
    }
    let body = data.split_off(CACHE_HEADER);
    if Sha256::digest(&body)[..] != data[CACHE_MAGIC.len()..] {
        return Err(format!(
            "{} does not match its checksum (truncated or altered)",
            path.display()
        ));
    }
    Ok(Some(body))
}

/// Writes cache entry `path` (magic, checksum, `data`): a 0600 temp file in `dir`, renamed.
fn write_cached(dir: &Path, path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut r = [0u8; 8];
    let _ = getrandom::getrandom(&mut r);
    let tmp = dir.join(format!(
        ".{}.{}.{:016x}.tmp",
        path.file_name()
            .map_or("entry".into(), |n| n.to_string_lossy()),
        std::process::id(),
        u64::from_le_bytes(r)
    ));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(CACHE_MAGIC)?;
        f.write_all(&Sha256::digest(data))?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// What a reload did: plugins swapped (by name), and why others kept their version.
#[derive(Debug, Default)]
pub struct ReloadReport {
    pub swapped: Vec<String>,
    pub failed: Vec<String>,
}

struct Slot {
    cfg: PluginConfig,
    state: Arc<PluginState>,
    current: RwLock<Arc<Plugin>>,
}

/// Every plugin of a config and the chain of each route.
pub struct Runtime {
    slots: Vec<Slot>,
    chains: Vec<Vec<usize>>,
    names: Arc<Names>,
    cache_dir: Option<PathBuf>,
    /// One reload at a time (SIGHUP and the admin API may ask together).
    reloading: Mutex<()>,
}

impl Runtime {
    /// Loads every plugin of `cfg`. `None` when the config has no plugins. An error names the
    /// plugin and the config file.
    pub fn load(cfg: &Config) -> Result<Option<Arc<Runtime>>, String> {
        if cfg.plugins.is_empty() {
            return Ok(None);
        }
        engine_with_slots(cfg.server.plugin_instances);
        // The callbacks' timings use it: calibrate it now, not on the first request.
        crate::metrics::start_clock();
        let cache_dir = cfg.plugin_cache.clone();
        let mut slots = Vec::with_capacity(cfg.plugins.len());
        let mut compiled = Compiled::new();
        for p in &cfg.plugins {
            let state = Arc::new(PluginState::new(&p.name));
            let t0 = Instant::now();
            let plugin = Plugin::load(p, state.clone(), cache_dir.as_deref(), &mut compiled)
                .map_err(|e| {
                    format!(
                        "plugin `{}` (plugins.{}.wasm in {}) failed to load: {e}",
                        p.name,
                        p.name,
                        cfg.source.display()
                    )
                })?;
            log::info!(
                "plugin `{}` loaded from {} in {:.1}ms",
                p.name,
                p.wasm.display(),
                t0.elapsed().as_secs_f64() * 1000.0
            );
            slots.push(Slot {
                cfg: p.clone(),
                state,
                current: RwLock::new(plugin),
            });
        }
        Ok(Some(Arc::new(Runtime {
            slots,
            chains: cfg.routes.iter().map(|r| r.plugins.clone()).collect(),
            names: Arc::new(Names {
                routes: cfg.routes.iter().map(|r| r.name.clone()).collect(),
                groups: cfg.groups.iter().map(|g| g.name.clone()).collect(),
                origins: cfg
                    .origins
                    .iter()
                    .enumerate()
                    .map(|(i, o)| super::CallTarget {
                        name: o.name.clone(),
                        // A write never reaches a fallback, from a client or from a plugin.
                        read_only: o.read_only
                            || cfg
                                .groups
                                .iter()
                                .any(|g| g.fallbacks.contains(&i) || (g.main == i && g.read_only)),
                        timeout: o.timeouts.read,
                        signed: o.is_signed(),
                    })
                    .collect(),
            }),
            cache_dir,
            reloading: Mutex::new(()),
        })))
    }

    /// The plugin exchange of one request on `route`, or `None` when the route has no chain.
    pub fn exchange(
        &self,
        route: usize,
        group: usize,
        key: &str,
        source: Option<std::net::SocketAddr>,
    ) -> Option<Exchange> {
        let chain = self.chains.get(route)?;
        if chain.is_empty() {
            return None;
        }
        let plugins = chain
            .iter()
            .map(|&i| self.slots[i].current.read().clone())
            .collect();
        Some(Exchange::new(
            plugins,
            self.names.clone(),
            RequestInfo {
                route,
                group,
                key: key.to_string(),
                source,
                ..Default::default()
            },
        ))
    }

    /// The current version of every plugin, in config order.
    pub(super) fn current(&self) -> Vec<Arc<Plugin>> {
        self.slots
            .iter()
            .map(|s| s.current.read().clone())
            .collect()
    }

    pub(super) fn names(&self) -> &Arc<Names> {
        &self.names
    }

    /// Re-reads every plugin file; changed ones are compiled, started and swapped in. New
    /// requests use the new instances; requests in flight keep the ones they leased. A plugin
    /// that fails to load keeps its previous version.
    /// The configured plugins' names, in config order.
    pub fn plugin_names(&self) -> Vec<String> {
        self.slots.iter().map(|s| s.cfg.name.clone()).collect()
    }

    pub fn reload(&self) -> ReloadReport {
        let _one_at_a_time = self.reloading.lock();
        let mut report = ReloadReport::default();
        let mut compiled: Compiled = self
            .slots
            .iter()
            .map(|s| {
                let p = s.current.read();
                (p.digest, p.module.clone())
            })
            .collect();
        for s in &self.slots {
            let bytes = match std::fs::read(&s.cfg.wasm) {
                Ok(b) => b,
                Err(e) => {
                    let msg = format!(
                        "plugin `{}`: reload: cannot read {}: {e}",
                        s.cfg.name,
                        s.cfg.wasm.display()
                    );
                    log::error!("{msg}");
                    report.failed.push(msg);
                    continue;
                }
            };
            let digest: [u8; 32] = Sha256::digest(&bytes).into();
            if s.current.read().digest == digest {
                continue;
            }
            match Plugin::from_bytes(
                &s.cfg,
                s.state.clone(),
                self.cache_dir.as_deref(),
                &bytes,
                digest,
                &mut compiled,
            ) {
                Ok(p) => {
                    *s.current.write() = p;
                    report.swapped.push(s.cfg.name.clone());
                    log::info!(
                        "plugin `{}` reloaded from {}",
                        s.cfg.name,
                        s.cfg.wasm.display()
                    );
                }
                Err(e) => {
                    let msg = format!(
                        "plugin `{}`: reload failed, keeping the loaded version: {e}",
                        s.cfg.name
                    );
                    log::error!("{msg}");
                    report.failed.push(msg);
                }
            }
        }
        report
    }

    /// Reloads changed plugins on SIGHUP (a small watcher thread; cascade has no other reload
    /// machinery yet).
    pub fn watch_sighup(self: &Arc<Self>) {
        let rt = Arc::downgrade(self);
        background("plugin-reload", "reload on SIGHUP", || async move {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                log::error!("plugins: cannot listen for SIGHUP; reload disabled");
                return;
            };
            while hup.recv().await.is_some() {
                let Some(rt) = rt.upgrade() else { return };
                log::info!("SIGHUP: reloading changed plugins");
                let n = tokio::task::spawn_blocking(move || rt.reload().swapped.len())
                    .await
                    .unwrap_or(0);
                log::info!("SIGHUP: {n} plugin(s) swapped");
            }
        });
    }
}

pub(super) use crate::background::spawn as background;

#[cfg(test)]
mod tests {
    use super::*;

    /// `plugins/dist/<name>.wasm`, or `None` (saying so) when it is not built.
    fn dist(name: &str) -> Option<String> {
        let wasm = format!("{}/plugins/dist/{name}.wasm", env!("CARGO_MANIFEST_DIR"));
        if !Path::new(&wasm).exists() {
            eprintln!("skipped: {wasm} not built (scripts/build-plugins.sh)");
            return None;
        }
        Some(wasm)
    }

    /// A config with `plugins` and `routes` (YAML flow collections) over one origin, group `g`.
    fn config(extra_server: &str, plugins: &str, routes: &str) -> Config {
        let yaml = format!(
            "listen: [{{addr: 127.0.0.1:1}}]\n{extra_server}\
             origins: {{a: {{url: \"http://127.0.0.1:9\"}}}}\ngroups: {{g: {{main: a}}}}\n\
             plugins: {plugins}\nroutes: {routes}\n"
        );
        crate::config::load_str(&yaml, Path::new("/tmp/t.yaml"), &|_| None).unwrap()
    }

    /// A config with the probe plugin from `plugins/dist` (None when it is not built).
    fn probe_config(name: &str, extra_server: &str) -> Option<Config> {
        probe_config_with(name, extra_server, "")
    }

    /// As `probe_config`, with `extra_plugin` (`key: value, `) in the plugin's definition.
    fn probe_config_with(name: &str, extra_server: &str, extra_plugin: &str) -> Option<Config> {
        let wasm = dist("probe")?;
        Some(config(
            extra_server,
            &format!("{{{name}: {{{extra_plugin}wasm: {wasm}, config: {{greeting: hi}}}}}}"),
            &format!("[{{path: /, group: g, plugins: [{name}]}}, {{path: /none, group: g}}]"),
        ))
    }

    fn one_request(rt: &Runtime) {
        let (mut ex, req, resp) = until_response(rt);
        ex.log(&req, Some(&resp));
    }

    #[test]
    fn configured_instances_are_reused_and_routes_without_chain_cost_nothing() {
        let Some(cfg) = probe_config("probe-reuse", "") else {
            return;
        };
        let rt = Runtime::load(&cfg).unwrap().unwrap();
        let before = rt.slots[0].state.instances.get();
        for _ in 0..5 {
            one_request(&rt);
        }
        assert_eq!(
            rt.slots[0].state.instances.get(),
            before,
            "no new instance per request"
        );
        assert!(rt.exchange(1, 0, "/none/x", None).is_none());
    }

    /// Runs the request and response headers of one request; the exchange is left to `log`.
    fn until_response(
        rt: &Runtime,
    ) -> (
        Exchange,
        pingora_http::RequestHeader,
        pingora_http::ResponseHeader,
    ) {
        let mut req = pingora_http::RequestHeader::build("GET", b"/x", None).unwrap();
        req.insert_header("host", "h").unwrap();
        let mut ex = rt.exchange(0, 0, "/x", None).unwrap();
        assert!(matches!(
            ex.request_headers(&mut req, true),
            super::super::Step::Done(super::super::Verdict::Continue)
        ));
        let mut resp = pingora_http::ResponseHeader::build(200, None).unwrap();
        assert!(matches!(
            ex.response_headers(&req, &mut resp),
            super::super::Step::Done(super::super::Verdict::Continue)
        ));
        assert_eq!(resp.headers.get("x-probe-greeting").unwrap(), "hi");
        (ex, req, resp)
    }

    #[test]
    fn without_body_callbacks_a_streaming_response_holds_no_instance() {
        for (bodies, instances) in [("bodies: false, ", 1), ("", 2)] {
            let name = format!("probe-park-{}", bodies.len());
            let Some(cfg) = probe_config_with(&name, "", bodies) else {
                return;
            };
            let rt = Runtime::load(&cfg).unwrap().unwrap();
            let state = &rt.slots[0].state;
            // Two responses under way at once (bodies still streaming, logs not reached).
            let (mut a, req_a, _) = until_response(&rt);
            let (mut b, req_b, _) = until_response(&rt);
            assert_eq!(
                state.instances.get(),
                instances,
                "{bodies:?}: contexts parked after their response headers share an instance"
            );
            a.log(&req_a, None);
            b.log(&req_b, None);
            drop((a, b));
            one_request(&rt);
            assert_eq!(state.instances.get(), instances);
            let faults: u64 = state.traps.iter().map(|c| c.get()).sum();
            assert_eq!(
                faults, 0,
                "{bodies:?}: finishing parked contexts never faults"
            );
            // Every context got its on_log, parked or not (the probe counts them).
            let logs = crate::metrics::METRICS
                .plugin_counter
                .with_label_values(&[name.as_str(), "probe_logs"])
                .get();
            assert_eq!(logs, 3, "{bodies:?}");
            assert_eq!(state.lost.get(), 0);
        }
    }

    /// A config with the probe plugin cached in `dir`, and that cache's entries.
    fn cached_probe(dir: &Path, name: &str) -> Option<(Config, impl Fn() -> Vec<PathBuf>)> {
        let server = format!("server: {{plugin_cache: \"{}\"}}\n", dir.display());
        let cfg = probe_config(name, &server)?;
        let dir = dir.to_path_buf();
        let entries = move || -> Vec<PathBuf> {
            let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map(|d| d.map(|e| e.unwrap().path()).collect())
                .unwrap_or_default();
            v.sort();
            v
        };
        Some((cfg, entries))
    }

    fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn precompiled_modules_are_cached_on_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cache");
        let Some((cfg, entries)) = cached_probe(&dir, "probe-cached") else {
            return;
        };
        let rt = Runtime::load(&cfg).unwrap().unwrap();
        let files = entries();
        assert_eq!(files.len(), 1, "one entry, no temp file left: {files:?}");
        assert!(files[0].to_string_lossy().ends_with(".cwasm"));
        assert_eq!(
            mode(&dir),
            0o700,
            "a missing cache directory is made private"
        );
        assert_eq!(mode(&files[0]), 0o600);
        assert!(read_cached(&files[0]).unwrap().is_some());
        drop(rt);
        // Second start: loaded from the cache.
        let before = std::fs::read(&files[0]).unwrap();
        let rt = Runtime::load(&cfg).unwrap().unwrap();
        one_request(&rt);
        assert_eq!(
            std::fs::read(&files[0]).unwrap(),
            before,
            "used, not rewritten"
        );
    }

    /// Item 8: `Module::deserialize` runs the machine code it is given, so an entry that was
    /// altered, cut short, is not ours, is writable by others or is a link is never
    /// deserialized: it is recompiled and replaced.
    #[test]
    fn an_untrusted_cache_entry_is_never_deserialized() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let Some((cfg, entries)) = cached_probe(tmp.path(), "probe-untrusted-cache") else {
            return;
        };
        drop(Runtime::load(&cfg).unwrap().unwrap());
        let entry = entries().pop().unwrap();
        let good = std::fs::read(&entry).unwrap();
        let set_mode = |m| std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(m));
        let flipped = {
            let mut b = good.clone();
            let i = CACHE_HEADER + (b.len() - CACHE_HEADER) / 2;
            b[i] ^= 0x40;
            b
        };
        let root = std::os::unix::fs::chown(&entry, Some(crate::owned::uid()), None).is_ok()
            && crate::owned::uid() == 0;
        type Spoil<'a> = Box<dyn Fn() + 'a>;
        let mut cases: Vec<(&str, Spoil<'_>, &str)> = vec![
            (
                "a flipped byte",
                Box::new(|| std::fs::write(&entry, &flipped).unwrap()),
                "checksum",
            ),
            (
                "cut short",
                Box::new(|| std::fs::write(&entry, &good[..good.len() / 3]).unwrap()),
                "checksum",
            ),
            (
                "a header cut",
                Box::new(|| std::fs::write(&entry, &good[..20]).unwrap()),
                "not a cache entry",
            ),
            (
                "writable by others",
                Box::new(|| set_mode(0o666).unwrap()),
                "writable by its group or by others",
            ),
            (
                "a symbolic link",
                Box::new(|| {
                    let real = entry.with_extension("real");
                    std::fs::write(&real, &good).unwrap();
                    std::fs::remove_file(&entry).unwrap();
                    std::os::unix::fs::symlink(&real, &entry).unwrap();
                }),
                "",
            ),
        ];
        if root {
            cases.push((
                "owned by another user",
                Box::new(|| std::os::unix::fs::chown(&entry, Some(65534), None).unwrap()),
                "owned by uid 65534",
            ));
        }
        for (what, spoil, why) in cases {
            spoil();
            let e = read_cached(&entry).expect_err(what);
            assert!(e.contains(why), "{what}: {e}");
            // Loading recompiles, works, and leaves a good private entry in its place.
            let rt = Runtime::load(&cfg).unwrap().unwrap();
            one_request(&rt);
            drop(rt);
            assert_eq!(std::fs::read(&entry).unwrap(), good, "{what}: replaced");
            assert_eq!(mode(&entry), 0o600, "{what}");
            assert!(read_cached(&entry).unwrap().is_some(), "{what}");
        }
    }

    #[test]
    fn a_cache_directory_writable_by_others_is_not_used() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("shared");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let Some((cfg, entries)) = cached_probe(&dir, "probe-shared-cache") else {
            return;
        };
        let rt = Runtime::load(&cfg).unwrap().unwrap();
        one_request(&rt);
        assert!(entries().is_empty(), "nothing read or written there");
        // Not ours either: a planted entry is never read.
        let e = crate::owned::check(&dir, true).unwrap_err();
        assert!(e.contains("writable"), "{e}");
    }

    #[test]
    fn a_fault_in_a_parked_context_costs_the_sharing_request_only_its_plugin() {
        let Some(wasm) = dist("chaos") else {
            return;
        };
        let cfg = config(
            "",
            &format!("{{c: {{wasm: {wasm}, bodies: false, on_error: allow, config: {{mode: trap, phase: log, only_if_header: x-chaos}}}}}}"),
            "[{path: /, group: g, plugins: [c]}]",
        );
        let rt = Runtime::load(&cfg).unwrap().unwrap();
        let state = &rt.slots[0].state;
        let start = |armed: bool| {
            let mut req = pingora_http::RequestHeader::build("GET", b"/x", None).unwrap();
            if armed {
                req.insert_header("x-chaos", "1").unwrap();
            }
            let mut ex = rt.exchange(0, 0, "/x", None).unwrap();
            assert!(matches!(
                ex.request_headers(&mut req, true),
                super::super::Step::Done(super::super::Verdict::Continue)
            ));
            (ex, req)
        };
        // A parks its context in the only instance; B leases that instance.
        let (mut a, req_a) = start(true);
        let mut resp = pingora_http::ResponseHeader::build(200, None).unwrap();
        assert!(matches!(
            a.response_headers(&req_a, &mut resp),
            super::super::Step::Done(super::super::Verdict::Continue)
        ));
        let (mut b, req_b) = start(false);
        assert_eq!(state.instances.get(), 1);
        // A's on_log traps: the instance is discarded, with B's context in it.
        a.log(&req_a, None);
        assert_eq!(state.traps[0].get(), 1);
        assert_eq!(state.instances.get(), 0);
        // B loses only this plugin (on_error: allow); the fault is not counted twice.
        let mut resp = pingora_http::ResponseHeader::build(200, None).unwrap();
        assert!(matches!(
            b.response_headers(&req_b, &mut resp),
            super::super::Step::Done(super::super::Verdict::Continue)
        ));
        assert!(resp.headers.get("x-chaos").is_none());
        assert_eq!(state.failures_allow.get(), 1);
        b.log(&req_b, None);
        assert_eq!(state.traps.iter().map(|c| c.get()).sum::<u64>(), 1);
        assert_eq!(state.lost.get(), 1, "B's context went with the instance");
        // The next request gets a fresh instance.
        let (mut c, req_c) = start(false);
        let mut resp = pingora_http::ResponseHeader::build(200, None).unwrap();
        assert!(matches!(
            c.response_headers(&req_c, &mut resp),
            super::super::Step::Done(super::super::Verdict::Continue)
        ));
        assert_eq!(resp.headers.get("x-chaos").unwrap(), "ok");
        c.log(&req_c, None);
    }

    #[test]
    fn plugins_loaded_from_one_file_share_one_compiled_module() {
        let Some(wasm) = dist("probe") else {
            return;
        };
        let cfg = config(
            "",
            &format!("{{p1: {{wasm: {wasm}, config: {{greeting: one}}}}, p2: {{wasm: {wasm}, config: {{greeting: two}}}}}}"),
            "[{path: /, group: g, plugins: [p1, p2]}]",
        );
        let rt = Runtime::load(&cfg).unwrap().unwrap();
        let (a, b) = (rt.slots[0].current.read(), rt.slots[1].current.read());
        assert!(Module::same(&a.module, &b.module));
        // Each keeps its own configuration.
        assert_ne!(a.info.config, b.info.config);
        drop((a, b));
        // A reload that changes nothing keeps them as they are.
        assert!(rt.reload().swapped.is_empty());
    }

    #[test]
    fn deadlines_round_up_to_ticks() {
        assert_eq!(
            ticks(Duration::from_millis(100)),
            100 / TICK.as_millis() as u64 + 1
        );
        assert_eq!(ticks(Duration::from_micros(10)), 2);
    }
}
