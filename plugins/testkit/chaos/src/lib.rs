//! cascade test fixture `chaos`: a plugin that misbehaves on purpose (trap, endless loop,
//! unbounded memory growth, an HTTP call it never resumes after) so the host's isolation can
//! be tested. Never deploy it.

use std::hint::black_box;
use std::rc::Rc;
use std::sync::Mutex;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(ChaosRoot { config: None }) });
}}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
enum Mode {
    Trap,
    Loop,
    Grow,
    Ok,
    /// Pauses the request (with `phase: response`, the response) for an HTTP call to
    /// `upstream` and never resumes it.
    Stall,
    /// Like `stall`, but dispatches another call from every answer, for ever.
    Flood,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug, Default)]
#[serde(rename_all = "lowercase")]
enum Phase {
    #[default]
    Request,
    Response,
    /// `proxy_on_log`, after the response.
    Log,
    /// `proxy_on_http_call_response` of a call to `upstream` made in the request phase (the
    /// request is resumed after it, if the mode returns).
    Callout,
    /// `proxy_on_tick`, every 50 ms.
    Tick,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Config {
    mode: Mode,
    #[serde(default)]
    phase: Phase,
    only_if_header: Option<String>,
    /// The origin `stall` and `callout` call.
    upstream: Option<String>,
}

/// Where `grow` keeps what it allocates, so nothing is ever freed.
static HOARD: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

fn misbehave(mode: Mode) {
    match mode {
        Mode::Trap => panic!("chaos: trap"),
        Mode::Loop => {
            log::warn!("chaos: looping forever");
            let mut n: u64 = 0;
            loop {
                n = black_box(black_box(n).wrapping_add(1));
            }
        }
        Mode::Grow => {
            log::warn!("chaos: growing memory forever");
            let mut hoard = HOARD.lock().unwrap_or_else(|e| e.into_inner());
            let mut i: u8 = 0;
            loop {
                i = i.wrapping_add(1);
                // Non-zero fill so every page is really touched.
                hoard.push(black_box(vec![i | 1; 1 << 20]));
            }
        }
        Mode::Ok | Mode::Stall | Mode::Flood => {}
    }
}

struct ChaosRoot {
    config: Option<Rc<Config>>,
}

impl Context for ChaosRoot {}

impl RootContext for ChaosRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match serde_json::from_slice::<Config>(&bytes) {
            Ok(mut c) => {
                if let Some(h) = &mut c.only_if_header {
                    h.make_ascii_lowercase();
                }
                log::info!("chaos: configured {c:?}");
                if c.phase == Phase::Tick {
                    self.set_tick_period(std::time::Duration::from_millis(50));
                }
                self.config = Some(Rc::new(c));
                true
            }
            Err(e) => {
                log::error!("chaos: invalid configuration: {e}");
                false
            }
        }
    }

    fn on_tick(&mut self) {
        if let Some(c) = &self.config {
            log::warn!("chaos: tick");
            misbehave(c.mode);
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let config = self.config.clone()?;
        Some(Box::new(ChaosHttp {
            config,
            armed: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct ChaosHttp {
    config: Rc<Config>,
    /// Whether `only_if_header` (if any) was on the request.
    armed: bool,
}

impl Context for ChaosHttp {
    fn on_http_call_response(
        &mut self,
        _token: u32,
        _headers: usize,
        _body: usize,
        _trailers: usize,
    ) {
        if self.config.mode == Mode::Stall {
            log::warn!("chaos: got the call's answer, not resuming the stream");
            return;
        }
        if self.config.mode == Mode::Flood {
            if let Err(e) = self.dispatch() {
                log::warn!("chaos: flood stopped by the host: {e:?}");
            }
            return;
        }
        misbehave(self.config.mode);
        self.resume_http_request();
    }
}

impl ChaosHttp {
    /// Dispatches a GET / to `upstream`.
    fn dispatch(&self) -> Result<u32, proxy_wasm::types::Status> {
        let upstream = self
            .config
            .upstream
            .as_deref()
            .unwrap_or("missing-upstream");
        let headers = vec![(":method", "GET"), (":path", "/"), (":authority", upstream)];
        let timeout = std::time::Duration::from_secs(2);
        self.dispatch_http_call(upstream, headers, None, vec![], timeout)
    }

    /// Dispatches a GET / to `upstream`; `Pause` when it went out.
    fn call(&self) -> Action {
        match self.dispatch() {
            Ok(_) => Action::Pause,
            Err(e) => panic!("chaos: dispatch_http_call failed: {e:?}"),
        }
    }
}

impl HttpContext for ChaosHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _eos: bool) -> Action {
        self.armed = match &self.config.only_if_header {
            Some(h) => self.get_http_request_header(h).is_some(),
            None => true,
        };
        let calls = matches!(self.config.mode, Mode::Stall | Mode::Flood)
            && self.config.phase != Phase::Response;
        if self.armed && (calls || self.config.phase == Phase::Callout) {
            return self.call();
        }
        if self.armed && self.config.phase == Phase::Request {
            misbehave(self.config.mode);
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _eos: bool) -> Action {
        if self.armed && self.config.phase == Phase::Response {
            if matches!(self.config.mode, Mode::Stall | Mode::Flood) {
                // An edit made before pausing stays on the response.
                self.set_http_response_header("x-chaos", Some("calling"));
                return self.call();
            }
            misbehave(self.config.mode);
        }
        self.set_http_response_header("x-chaos", Some("ok"));
        Action::Continue
    }

    fn on_log(&mut self) {
        if self.armed && self.config.phase == Phase::Log {
            misbehave(self.config.mode);
        }
    }
}
