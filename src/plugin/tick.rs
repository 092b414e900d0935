//! Timer ticks: `proxy_on_tick` for plugins that asked for a period
//! (`proxy_set_tick_period_milliseconds`), `proxy_on_queue_ready` for plugins whose shared
//! queues got messages, and the HTTP calls those callbacks make.
//!
//! Envoy ticks the root context of each VM (one per worker). cascade's instances are a pool,
//! so each tick goes to every *idle* instance of the plugin; an instance busy with a request
//! at that moment gets the next one. The common use, refreshing keys or a tenant map with a
//! `dispatch_http_call` and keeping it in shared data, works on any instance. A tick's calls
//! are made without holding the instance (requests lease it meanwhile); each answer is
//! delivered with `proxy_on_http_call_response` under its lock, and the instance takes no
//! further tick until they are all answered. Ticks run on their own thread, never on a proxy
//! worker; a tick that faults discards its instance like a request callback does.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};

use super::callout;
use super::host::{Env, Phase};
use super::runtime::Plugin;
use super::{Names, RequestInfo, Runtime};
use crate::origin::Origin;

/// An instance as a tick holds it (see [`tick_one`]).
type WeakHandle = std::sync::Weak<parking_lot::Mutex<Option<super::runtime::Instance>>>;

/// How often the ticker looks for due plugins (the finest period it honours).
const GRAIN: Duration = Duration::from_millis(20);

/// Starts the ticker thread for `rt` (it ends when the runtime is dropped).
pub fn start(rt: &Arc<Runtime>, origins: Arc<[Origin]>) {
    let weak = Arc::downgrade(rt);
    super::runtime::background("plugin-ticks", "ticks", move || run(weak, origins));
}

async fn run(rt: std::sync::Weak<Runtime>, origins: Arc<[Origin]>) {
    // When each plugin (by position in the config) is due next.
    let mut due: Vec<Option<Instant>> = Vec::new();
    loop {
        tokio::time::sleep(GRAIN).await;
        let Some(rt) = rt.upgrade() else { return };
        let plugins = rt.current();
        due.resize(plugins.len(), None);
        let now = Instant::now();
        for (plugin, due) in plugins.into_iter().zip(due.iter_mut()) {
            let ms = plugin
                .info
                .tick_ms
                .load(std::sync::atomic::Ordering::Relaxed);
            if ms == 0 {
                *due = None;
                continue;
            }
            let period = Duration::from_millis(ms.into()).max(GRAIN);
            match *due {
                None => *due = Some(now + period),
                Some(t) if now >= t => {
                    *due = Some(now + period);
                    for handle in plugin.idle() {
                        let (plugin, names, origins) =
                            (plugin.clone(), rt.names().clone(), origins.clone());
                        let handle = Arc::downgrade(&handle);
                        tokio::spawn(tick_one(plugin, handle, names, origins, None));
                    }
                }
                Some(_) => {}
            }
        }
        // Queues with news: one idle instance of the owner is told (batched).
        for (owner, id) in super::queue::take_ready() {
            let Some(plugin) = plugins_by_name(&rt, &owner) else {
                continue; // the owner is gone (removed by a reload)
            };
            match plugin.idle().into_iter().next() {
                Some(handle) => {
                    let (names, origins) = (rt.names().clone(), origins.clone());
                    let handle = Arc::downgrade(&handle);
                    tokio::spawn(tick_one(plugin, handle, names, origins, Some(id)));
                }
                None => super::queue::mark_ready(id),
            }
        }
    }
}

fn plugins_by_name(rt: &Runtime, name: &str) -> Option<Arc<Plugin>> {
    rt.current().into_iter().find(|p| &*p.info.name == name)
}

/// One tick of one instance (or, with `queue`, its `proxy_on_queue_ready`), and the calls it
/// makes (with their answers' calls, up to `callout::MAX_CALLS` in all), within
/// `callout::MAX_TIMEOUT`. The instance is held weakly: while the calls are in flight it may
/// give up its slot (`free_an_idle_slot`) or be dropped from the pool; the answers are then
/// dropped. A fault stops the plugin version's ticks (a deterministic trap in `on_tick` would
/// otherwise discard every idle instance each period); a reload starts them again.
async fn tick_one(
    plugin: Arc<Plugin>,
    handle: WeakHandle,
    names: Arc<Names>,
    origins: Arc<[Origin]>,
    queue: Option<u32>,
) {
    let mut info = RequestInfo {
        calls_left: callout::MAX_CALLS,
        ..Default::default()
    };
    let env = |info: &mut RequestInfo| Env {
        phase: Phase::Tick,
        req: std::ptr::null_mut(),
        resp: std::ptr::null_mut(),
        info,
        names: Arc::as_ptr(&names),
        body: std::ptr::null_mut(),
    };
    {
        // Busy with a request right now: this instance gets the next tick; a queue's news
        // waits for the next round.
        let busy = || {
            if let Some(q) = queue {
                super::queue::mark_ready(q);
            }
        };
        let Some(strong) = handle.upgrade() else {
            return busy();
        };
        let Some(mut guard) = strong.try_lock() else {
            return busy();
        };
        let Some(inst) = guard.as_mut().filter(|i| !i.tick_busy) else {
            return busy();
        };
        if let Err(f) = inst.tick(queue, env(&mut info)) {
            *guard = None;
            drop(guard);
            stop(&plugin, &f);
            return;
        }
        if info.calls.is_empty() {
            return;
        }
        inst.tick_busy = true;
    }
    let deadline = Instant::now() + callout::MAX_TIMEOUT;
    let (name, max_body) = (plugin.info.name.clone(), plugin.max_body);
    let perform = |call| {
        let name = name.clone();
        callout::perform(
            callout::Caller::Tick,
            &origins,
            call,
            max_body,
            name,
            deadline,
        )
    };
    let mut inflight: FuturesUnordered<_> = info.calls.drain(..).map(perform).collect();
    while let Some((token, answer)) = inflight.next().await {
        let Some(strong) = handle.upgrade() else {
            return; // gone from the pool meanwhile
        };
        let mut guard = strong.lock();
        let Some(inst) = guard.as_mut() else {
            return; // discarded meanwhile
        };
        let (headers, body) = (answer.headers.len(), answer.body.len());
        info.answer = Some(answer);
        let r = inst.http_call_response(token, headers, body, env(&mut info));
        info.answer = None;
        if let Err(f) = r {
            *guard = None;
            drop(guard);
            stop(&plugin, &f);
            return;
        }
        drop(guard);
        inflight.extend(info.calls.drain(..).map(perform));
    }
    if let Some(h) = handle.upgrade() {
        if let Some(inst) = h.lock().as_mut() {
            inst.tick_busy = false;
        }
    }
}

/// A tick faulted: counted like any fault, and this plugin version ticks no more.
fn stop(plugin: &Plugin, f: &super::Fault) {
    plugin.record_fault("tick", f);
    plugin
        .info
        .ticks_stopped
        .store(true, std::sync::atomic::Ordering::Relaxed);
    plugin
        .info
        .tick_ms
        .store(0, std::sync::atomic::Ordering::Relaxed);
    log::error!(
        target: "plugin",
        "[{}] a tick failed; ticks are stopped for this plugin until it is reloaded",
        plugin.info.name
    );
}
