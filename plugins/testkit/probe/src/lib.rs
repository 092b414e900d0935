//! cascade test fixture `probe`: a plugin written against the stock proxy-wasm SDK the way
//! third parties write them, touching many host calls (logging, properties, header maps,
//! metrics, shared data with CAS) and reporting what it saw in `x-probe-*` response headers.

use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType, Status};
use serde::Deserialize;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(ProbeRoot { context_id, config: None, metric: None, logs: None, dequeued: None, log_call_refused: None })
    });
}}

const COUNT_KEY: &str = "probe.count";

#[derive(Deserialize, Debug)]
struct Config {
    greeting: String,
    /// Refresh a value from an origin on a timer (`proxy_on_tick` + `dispatch_http_call`),
    /// kept in shared data and reported in `x-probe-refreshed`.
    refresh: Option<Refresh>,
    /// An origin to call from the response-headers callback: the response is paused until
    /// the answer, whose status goes in `x-probe-late-answer`.
    late_call: Option<String>,
}

#[derive(Deserialize, Debug)]
struct Refresh {
    upstream: String,
    path: String,
    every_ms: u64,
}

const REFRESHED_KEY: &str = "probe.refreshed";

struct ProbeRoot {
    context_id: u32,
    config: Option<Rc<Config>>,
    /// Id of the `probe_requests` counter (None if the host refused to define it).
    metric: Option<u32>,
    /// Id of the `probe_logs` counter: `on_log` calls, so a host that skips them shows.
    logs: Option<u32>,
    /// Id of the `probe_dequeued` counter: messages read from the `probe.paths` queue.
    dequeued: Option<u32>,
    /// Id of the `probe_log_call_refused` counter: HTTP calls `on_log` tried and the host
    /// refused with an error status (the SDK would panic on any other).
    log_call_refused: Option<u32>,
}

/// Every request's path is enqueued here; the root context counts what it dequeues.
const QUEUE: &str = "probe.paths";

impl Context for ProbeRoot {
    fn on_http_call_response(
        &mut self,
        _token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let status = self.get_http_call_response_header(":status");
        let body = self
            .get_http_call_response_body(0, body_size)
            .unwrap_or_default();
        log::info!("probe: refresh answered {status:?} ({body_size} bytes)");
        if status.as_deref() == Some("200") {
            if let Err(e) = self.set_shared_data(REFRESHED_KEY, Some(&body), None) {
                log::warn!("probe: set_shared_data failed: {e:?}");
            }
        }
    }
}

impl RootContext for ProbeRoot {
    fn on_queue_ready(&mut self, queue_id: u32) {
        let mut n = 0;
        while let Ok(Some(_path)) = self.dequeue_shared_queue(queue_id) {
            n += 1;
        }
        if let Some(id) = self.dequeued {
            let _ = hostcalls::increment_metric(id, n);
        }
    }

    fn on_vm_start(&mut self, vm_configuration_size: usize) -> bool {
        let vm_config = self.get_vm_configuration().map_or(0, |c| c.len());
        log::info!(
            "probe: vm start (root context {}), vm configuration size {vm_configuration_size}, {vm_config} bytes read",
            self.context_id
        );
        true
    }

    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        let config = match serde_json::from_slice::<Config>(&bytes) {
            Ok(c) => c,
            Err(e) => {
                log::error!("probe: invalid configuration (want {{\"greeting\": string}}): {e}");
                return false;
            }
        };
        if self.metric.is_none() {
            match hostcalls::define_metric(MetricType::Counter, "probe_requests") {
                Ok(id) => self.metric = Some(id),
                Err(e) => log::warn!("probe: define_metric failed: {e:?}"),
            }
        }
        if self.logs.is_none() {
            self.logs = hostcalls::define_metric(MetricType::Counter, "probe_logs").ok();
        }
        if self.dequeued.is_none() {
            self.dequeued = hostcalls::define_metric(MetricType::Counter, "probe_dequeued").ok();
        }
        if self.log_call_refused.is_none() {
            self.log_call_refused =
                hostcalls::define_metric(MetricType::Counter, "probe_log_call_refused").ok();
        }
        // The consumer side of the queue the HTTP contexts feed (the same id in every
        // instance of this plugin).
        self.register_shared_queue(QUEUE);
        log::info!(
            "probe: configured ({plugin_configuration_size} bytes), greeting {:?}, metric {:?}",
            config.greeting,
            self.metric
        );
        if let Some(r) = &config.refresh {
            self.set_tick_period(std::time::Duration::from_millis(r.every_ms));
        }
        self.config = Some(Rc::new(config));
        true
    }

    fn on_tick(&mut self) {
        let Some(r) = self.config.as_ref().and_then(|c| c.refresh.as_ref()) else {
            return;
        };
        let headers = vec![
            (":method", "GET"),
            (":path", r.path.as_str()),
            (":authority", "x"),
        ];
        let timeout = std::time::Duration::from_secs(2);
        if let Err(e) = self.dispatch_http_call(&r.upstream, headers, None, vec![], timeout) {
            log::warn!("probe: refresh call refused: {e:?}");
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let config = self.config.clone()?;
        Some(Box::new(ProbeHttp {
            context_id,
            config,
            metric: self.metric,
            logs: self.logs,
            log_call_refused: self.log_call_refused,
            path: String::new(),
            method: String::new(),
            route: String::new(),
            client: "no",
            count: 0,
            code: String::new(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct ProbeHttp {
    context_id: u32,
    config: Rc<Config>,
    metric: Option<u32>,
    logs: Option<u32>,
    log_call_refused: Option<u32>,
    path: String,
    method: String,
    route: String,
    client: &'static str,
    count: u64,
    code: String,
}

impl Context for ProbeHttp {
    /// The answer to the response-phase call (`late_call`): its status on the response,
    /// which then goes on.
    fn on_http_call_response(
        &mut self,
        _token: u32,
        _headers: usize,
        _body: usize,
        _trailers: usize,
    ) {
        let status = self
            .get_http_call_response_header(":status")
            .unwrap_or_else(|| "none".to_string());
        self.set_http_response_header("x-probe-late-answer", Some(&status));
        self.resume_http_response();
    }
}

impl ProbeHttp {
    /// A property as text; "-" when the host doesn't have it.
    fn prop(&self, path: Vec<&str>) -> String {
        match self.get_property(path) {
            Some(v) => String::from_utf8_lossy(&v).into_owned(),
            None => "-".to_string(),
        }
    }

    /// Increments the shared counter with compare-and-swap; returns the new value.
    fn bump_shared_count(&self) -> u64 {
        for _ in 0..64 {
            let (value, cas) = self.get_shared_data(COUNT_KEY);
            let current = value
                .and_then(|v| std::str::from_utf8(&v).ok()?.trim().parse::<u64>().ok())
                .unwrap_or(0);
            let next = current + 1;
            match self.set_shared_data(COUNT_KEY, Some(next.to_string().as_bytes()), cas) {
                Ok(()) => return next,
                Err(Status::CasMismatch) => continue,
                Err(e) => {
                    log::warn!("probe: set_shared_data failed: {e:?}");
                    return current;
                }
            }
        }
        log::warn!("probe: shared counter still contended after 64 tries");
        0
    }
}

impl HttpContext for ProbeHttp {
    fn on_http_request_headers(&mut self, num_headers: usize, end_of_stream: bool) -> Action {
        self.path = self.prop(vec!["request", "path"]);
        self.method = self.prop(vec!["request", "method"]);
        self.route = self.prop(vec!["cascade", "route"]);
        let host = self.prop(vec!["request", "host"]);
        let ua = self.prop(vec!["request", "headers", "user-agent"]);
        let source = self.get_property(vec!["source", "address"]);
        self.client = if source.is_some() { "yes" } else { "no" };

        let headers = self.get_http_request_headers();
        let ua_from_map = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("user-agent"))
            .map_or("-", |(_, v)| v.as_str());
        if ua != "-" && ua != ua_from_map {
            log::warn!("probe: user-agent property {ua:?} != header {ua_from_map:?}");
        }

        if let Some(id) = self.metric {
            if let Err(e) = hostcalls::increment_metric(id, 1) {
                log::warn!("probe: increment_metric failed: {e:?}");
            }
        }
        self.count = self.bump_shared_count();
        // Producer side: the queue found by name ("" = this plugin's own vm_id).
        match self.resolve_shared_queue("", QUEUE) {
            Some(q) => {
                if let Err(e) = self.enqueue_shared_queue(q, Some(self.path.as_bytes())) {
                    log::warn!("probe: enqueue failed: {e:?}");
                }
            }
            None => log::warn!("probe: queue {QUEUE} not found"),
        }

        log::info!(
            "probe[{}]: {} {} host={host} route={} ua={ua} headers={num_headers}/{} eos={end_of_stream} count={}",
            self.context_id,
            self.method,
            self.path,
            self.route,
            headers.len(),
            self.count
        );
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _eos: bool) -> Action {
        let served_from = self.prop(vec!["cascade", "served_from"]);
        let cache = self.prop(vec!["cascade", "cache_status"]);
        self.code = self.prop(vec!["response", "code"]);
        log::debug!(
            "probe[{}]: response {} from {served_from} cache {cache}",
            self.context_id,
            self.code
        );
        let count = self.count.to_string();
        // An HTTP call from the response phase: the response waits for its answer.
        let late_call = match &self.config.late_call {
            None => "-".to_string(),
            Some(upstream) => match self.dispatch_http_call(
                upstream,
                vec![(":method", "GET"), (":path", "/late"), (":authority", "x")],
                None,
                vec![],
                std::time::Duration::from_secs(2),
            ) {
                Ok(_) => "dispatched".to_string(),
                Err(status) => format!("{status:?}"),
            },
        };
        let refreshed = match self.get_shared_data(REFRESHED_KEY).0 {
            Some(v) => String::from_utf8_lossy(&v).into_owned(),
            None => "-".to_string(),
        };
        let set = [
            ("x-probe-greeting", self.config.greeting.as_str()),
            ("x-probe-path", self.path.as_str()),
            ("x-probe-method", self.method.as_str()),
            ("x-probe-route", self.route.as_str()),
            ("x-probe-client", self.client),
            ("x-probe-served-from", served_from.as_str()),
            ("x-probe-cache", cache.as_str()),
            ("x-probe-count", count.as_str()),
            ("x-probe-late-call", late_call.as_str()),
            ("x-probe-refreshed", refreshed.as_str()),
        ];
        for (name, value) in set {
            self.set_http_response_header(name, Some(value));
        }
        if late_call == "dispatched" {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    fn on_log(&mut self) {
        if let Some(id) = self.logs {
            let _ = hostcalls::increment_metric(id, 1);
        }
        // Nobody could wait for an answer now: the host refuses the call with a status the
        // SDK hands back as an error.
        if let Some(upstream) = &self.config.late_call {
            let r = self.dispatch_http_call(
                upstream,
                vec![(":method", "GET"), (":path", "/log"), (":authority", "x")],
                None,
                vec![],
                std::time::Duration::from_secs(1),
            );
            if let (Err(Status::InternalFailure), Some(id)) = (r, self.log_call_refused) {
                let _ = hostcalls::increment_metric(id, 1);
            }
        }
        log::info!(
            "probe[{}]: done {} {} -> {}",
            self.context_id,
            self.method,
            self.path,
            if self.code.is_empty() {
                "-"
            } else {
                &self.code
            }
        );
    }
}
