//! One request's walk through its plugin chain, and the glue the proxy phases call.
//!
//! Request headers run in chain order (a local response or a failure stops the chain; a
//! plugin that dispatched HTTP calls suspends it until their answers are delivered);
//! response headers run in reverse order (as Envoy's encoder filters do); a plugin without
//! body callbacks then parks its context and its instance goes back to the pool; at the end
//! every live context gets `proxy_on_done`, `proxy_on_log`, `proxy_on_delete` and the
//! instances still leased go back to their plugin's pool. A faulted instance is discarded
//! and the plugin's `on_error` decides: `deny` fails the request with 503 (request phase;
//! later phases only log, the response is already under way), `allow` skips the plugin.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use pingora_error::Result;
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;

use super::abi;
use super::callout::{self, Answer, Call};
use super::host::{Env, Phase};
use super::runtime::{Fault, Handle, Plugin};
use super::{LocalReply, Names, RequestInfo};
use crate::config::OnError;
use crate::metrics::now;

/// What the proxy does after the request-headers chain.
#[derive(Debug)]
pub enum Verdict {
    Continue,
    /// A plugin answered (`proxy_send_local_response`): send it, skip the origin.
    Reply(LocalReply),
    /// The request fails: status and a short message for the body.
    Fail(u16, String),
}

struct Slot {
    plugin: Arc<Plugin>,
    inst: Option<Handle>,
    /// Live HTTP context id (0: none).
    ctx: i32,
    /// Only the finishing callbacks are left (the context is parked in the instance).
    parked: bool,
    /// The instance went back to its plugin's pool while this request's context lives in it
    /// (parked, or shared while the request waited for HTTP calls): every callback locks it,
    /// and the request never gives it back.
    pooled: bool,
    /// Body bytes held while this plugin pauses (`[request, response]`).
    held: [Vec<u8>; 2],
    /// Body callbacks stopped for this request after `held` outgrew `limits.body`.
    body_off: [bool; 2],
}

/// Where a walk of the chain (request or response headers) stands.
#[must_use]
pub enum Step {
    Done(Verdict),
    /// Plugin `slot` dispatched HTTP calls: make them, then [`Exchange::deliver`] the answers.
    Calls {
        slot: usize,
        calls: Vec<Call>,
    },
}

/// The headers a walk of the chain works on: the request's in the request phase, the
/// response's (the request's read-only) in the response phase.
pub(super) enum Headers<'a> {
    Request(&'a mut RequestHeader),
    Response(&'a RequestHeader, &'a mut ResponseHeader),
}

/// The plugin state of one request.
pub struct Exchange {
    slots: Vec<Slot>,
    /// The first plugin whose request-headers callback has not run.
    next: usize,
    /// The plugin waiting for its HTTP calls paused the request (and has not resumed it).
    paused: bool,
    /// A response-headers walk suspended for HTTP calls: the plugins `0..n` are still to run
    /// (the walk goes in reverse order).
    resp_next: Option<usize>,
    /// [`on_response`] ran: a second response (an error answer after a failure that came
    /// once the walk was done) gets no second walk, so no plugin sees two responses.
    resp_walked: bool,
    names: Arc<Names>,
    pub info: RequestInfo,
    /// The request has a body (its headers did not end the stream).
    request_body: bool,
    /// The response body's length as the source sent it (Content-Length before the plugins),
    /// and the bytes seen so far: the end of the stream is known by count too, since some
    /// of Pingora's paths (a body served from the cache after a 304) never flag it.
    response_len: Option<u64>,
    response_seen: u64,
    /// The body callbacks of that direction have seen the end of the stream.
    ended: [bool; 2],
}

impl Exchange {
    pub(super) fn new(plugins: Vec<Arc<Plugin>>, names: Arc<Names>, info: RequestInfo) -> Exchange {
        Exchange {
            slots: plugins
                .into_iter()
                .map(|plugin| Slot {
                    plugin,
                    inst: None,
                    ctx: 0,
                    parked: false,
                    pooled: false,
                    held: [Vec::new(), Vec::new()],
                    body_off: [false; 2],
                })
                .collect(),
            next: 0,
            paused: false,
            resp_next: None,
            resp_walked: false,
            names,
            info,
            request_body: true,
            response_len: None,
            response_seen: 0,
            ended: [false; 2],
        }
    }

    fn env(&mut self, phase: Phase, req: *const RequestHeader, resp: *const ResponseHeader) -> Env {
        Env {
            phase,
            req: req as *mut RequestHeader,
            resp: resp as *mut ResponseHeader,
            info: &mut self.info,
            names: Arc::as_ptr(&self.names),
            body: std::ptr::null_mut(),
        }
    }

    fn deny(plugin: &Plugin, why: &str) -> Verdict {
        plugin.info.state.failures_deny.inc();
        Verdict::Fail(
            503,
            format!("cascade: plugin `{}` {why}\n", plugin.info.name),
        )
    }

    /// A plugin failed (or is unavailable) in the request phase: its `on_error` decides.
    /// `Some`: the request fails; `None`: the chain goes on without it.
    fn on_error(plugin: &Plugin, why: &str) -> Option<Verdict> {
        match plugin.on_error {
            OnError::Deny => Some(Self::deny(plugin, why)),
            OnError::Allow => {
                plugin.info.state.failures_allow.inc();
                None
            }
        }
    }

    /// A request-phase callback of plugin `i` faulted: its instance is gone.
    fn fault(&mut self, i: usize, what: &str, f: &Fault) -> Option<Verdict> {
        let slot = &mut self.slots[i];
        slot.inst = None;
        slot.ctx = 0;
        slot.plugin.record_fault(what, f);
        self.info.local = None;
        self.info.route_error = None;
        self.info.calls.clear();
        Self::on_error(&slot.plugin, "failed")
    }

    /// After a request-phase callback of plugin `i` returned: did it end the request?
    fn ended(&mut self, i: usize) -> Option<Verdict> {
        if let Some(reply) = self.info.local.take() {
            self.info.calls.clear();
            return Some(Verdict::Reply(reply));
        }
        if let Some(e) = self.info.route_error.take() {
            log::error!(target: "plugin", "{e}");
            return Some(Verdict::Fail(500, format!("cascade: {e}\n")));
        }
        if self.info.closed {
            let name = &self.slots[i].plugin.info.name;
            return Some(Verdict::Fail(
                403,
                format!("cascade: plugin `{name}` closed the request\n"),
            ));
        }
        None
    }

    /// Runs `proxy_on_request_headers` of the chain, in order, on `req` (edits land in it),
    /// from the first plugin not yet run. Stops early when a plugin ends the request, or when
    /// it dispatched HTTP calls: the caller makes them and hands the answers to [`deliver`],
    /// which goes on with the chain.
    ///
    /// [`deliver`]: Exchange::deliver
    pub fn request_headers(&mut self, req: &mut RequestHeader, end_of_stream: bool) -> Step {
        let req_ptr: *mut RequestHeader = req;
        self.request_body = !end_of_stream;
        // One clock read per plugin: each plugin's time runs from the previous one's end.
        let mut t0 = now();
        while self.next < self.slots.len() {
            let i = self.next;
            self.next += 1;
            let env = self.env(Phase::Request, req_ptr, std::ptr::null());
            self.info.resumed = false;
            self.info.calls_left = callout::MAX_CALLS;
            let slot = &mut self.slots[i];
            if slot.inst.as_ref().is_none_or(|h| h.lock().is_none()) {
                // Not leased yet, or discarded since the lease by a fault in a context parked
                // there: lease (again).
                slot.inst = slot.plugin.lease();
                if slot.inst.is_none() {
                    match Self::on_error(&slot.plugin, "is unavailable") {
                        Some(v) => return Step::Done(v),
                        None => continue,
                    }
                }
            }
            let mut guard = slot.inst.as_ref().expect("leased").lock();
            let r = match guard.as_mut() {
                Some(inst) => {
                    // SAFETY: `req_ptr` comes from the `&mut` this method holds.
                    let n = count_request_headers(unsafe { &*req_ptr });
                    let r = inst.new_context(env).and_then(|ctx| {
                        inst.request_headers(ctx, n, end_of_stream, env)
                            .map(|action| (ctx, action))
                    });
                    if r.is_err() {
                        *guard = None;
                    }
                    r
                }
                // Discarded between lease and lock by a fault in a parked context's finish.
                None => Err(Fault::lost()),
            };
            drop(guard);
            let t1 = now();
            slot.plugin.info.state.durations[0].observe(t1.saturating_duration_since(t0));
            t0 = t1;
            match r {
                Ok((ctx, action)) => {
                    slot.ctx = ctx;
                    if let Some(v) = self.ended(i) {
                        return Step::Done(v);
                    }
                    if !self.info.calls.is_empty() {
                        self.paused = action == abi::ACTION_PAUSE && !self.info.resumed;
                        let calls = std::mem::take(&mut self.info.calls);
                        return Step::Calls { slot: i, calls };
                    }
                }
                Err(f) => {
                    if let Some(v) = self.fault(i, "request", &f) {
                        return Step::Done(v);
                    }
                }
            }
        }
        Step::Done(Verdict::Continue)
    }

    /// Delivers the answer to one HTTP call plugin `i` dispatched
    /// (`proxy_on_http_call_response`; the headers of the phase that made the call are still
    /// writable; `pending`: its calls still in flight), then says what comes next: more
    /// answers to wait for (with the calls this callback dispatched), or the rest of the
    /// chain's walk once none is in flight. A plugin that paused the stream for its calls
    /// must by then have resumed it (`proxy_continue_stream`) or, in the request phase,
    /// answered it; one that did neither fails with its `on_error` (in the response phase,
    /// which only logs, the response goes on), so a request never hangs on a plugin.
    pub(super) fn deliver(
        &mut self,
        i: usize,
        (token, answer): (u32, Answer),
        pending: usize,
        headers: &mut Headers<'_>,
    ) -> Step {
        let t0 = now();
        let (n_headers, body) = (answer.headers.len(), answer.body.len());
        self.info.answer = Some(answer);
        let env = match headers {
            Headers::Request(req) => {
                let req_ptr: *mut RequestHeader = &mut **req;
                self.env(Phase::Request, req_ptr, std::ptr::null())
            }
            Headers::Response(req, resp) => {
                let resp_ptr: *mut ResponseHeader = &mut **resp;
                self.env(Phase::Response, &**req, resp_ptr)
            }
        };
        let response = matches!(headers, Headers::Response(..));
        let slot = &mut self.slots[i];
        let r = match slot.inst.as_ref() {
            Some(h) => {
                let mut guard = h.lock();
                match guard.as_mut() {
                    Some(inst) => {
                        let r = inst.http_call_response(token, n_headers, body, env);
                        if r.is_err() {
                            *guard = None;
                        }
                        r
                    }
                    // Discarded meanwhile by a fault of a request sharing it.
                    None => Err(Fault::lost()),
                }
            }
            None => Err(Fault::lost()),
        };
        self.info.answer = None;
        slot.plugin.info.state.durations[3].observe(now().saturating_duration_since(t0));
        if let Err(f) = r {
            if response {
                self.response_fault(i, &f);
                return self.walk(headers);
            }
            return match self.fault(i, "http call response", &f) {
                Some(v) => Step::Done(v),
                None => self.walk(headers),
            };
        }
        if response {
            self.response_local_ignored();
        } else if let Some(v) = self.ended(i) {
            return Step::Done(v);
        }
        self.paused &= !self.info.resumed;
        let calls = std::mem::take(&mut self.info.calls);
        if pending > 0 || !calls.is_empty() {
            return Step::Calls { slot: i, calls };
        }
        if self.paused {
            let plugin = &self.slots[i].plugin;
            let why = "paused the stream for its HTTP calls and did not resume it";
            log::warn!(target: "plugin", "[{}] {why}", plugin.info.name);
            if response {
                plugin.info.state.failures(plugin.on_error).inc();
            } else if let Some(v) = Self::on_error(plugin, why) {
                return Step::Done(v);
            }
        }
        if response {
            self.park_after_response(i);
        }
        self.walk(headers)
    }

    /// Goes on with the walk of the phase `headers` belongs to.
    fn walk(&mut self, headers: &mut Headers<'_>) -> Step {
        match headers {
            Headers::Request(req) => self.request_headers(req, !self.request_body),
            Headers::Response(req, resp) => self.response_headers(req, resp),
        }
    }

    /// The request is about to wait for HTTP calls: every instance it holds goes back to its
    /// plugin's pool (contexts stay in them, as parked ones do), so that requests waiting on a
    /// slow service hold no instance slots. Each later callback locks the instance.
    fn share_while_waiting(&mut self) {
        for slot in &mut self.slots {
            if let (Some(h), false, true) = (slot.inst.as_ref(), slot.pooled, slot.ctx != 0) {
                slot.pooled = true;
                slot.plugin.park(h);
            }
        }
    }

    /// Runs `proxy_on_response_headers` of the chain in reverse order on `resp` (from where a
    /// walk suspended for HTTP calls stopped). A plugin without body callbacks is then left
    /// with only its finishing callbacks: its context is parked and its instance goes back to
    /// the pool, so a long body holds no instance. A plugin that dispatched HTTP calls stops
    /// the walk: the caller makes them and hands the answers to [`deliver`], as in the
    /// request phase. Always ends with [`Verdict::Continue`]: a failure here only logs.
    ///
    /// [`deliver`]: Exchange::deliver
    pub fn response_headers(&mut self, req: &RequestHeader, resp: &mut ResponseHeader) -> Step {
        let resp_ptr: *mut ResponseHeader = resp;
        let start = self.resp_next.take().unwrap_or(self.slots.len());
        let mut t0 = now();
        for i in (0..start).rev() {
            let env = self.env(Phase::Response, req, resp_ptr);
            self.info.resumed = false;
            self.info.calls.clear();
            self.info.calls_left = callout::MAX_CALLS;
            let slot = &mut self.slots[i];
            let (Some(handle), ctx) = (slot.inst.as_ref(), slot.ctx) else {
                continue;
            };
            if ctx == 0 || slot.parked {
                continue;
            }
            let mut guard = handle.lock();
            let r = match guard.as_mut() {
                Some(inst) => {
                    // SAFETY: `resp_ptr` comes from the `&mut` this method holds.
                    let n = 1 + unsafe { &*resp_ptr }.headers.len();
                    let r = inst.response_headers(ctx, n, env);
                    if r.is_err() {
                        *guard = None;
                    }
                    r
                }
                None => Err(Fault::lost()),
            };
            drop(guard);
            let t1 = now();
            slot.plugin.info.state.durations[1].observe(t1.saturating_duration_since(t0));
            t0 = t1;
            match r {
                Err(f) => self.response_fault(i, &f),
                Ok(action) => {
                    self.response_local_ignored();
                    if !self.info.calls.is_empty() {
                        self.paused = action == abi::ACTION_PAUSE && !self.info.resumed;
                        self.resp_next = Some(i);
                        let calls = std::mem::take(&mut self.info.calls);
                        return Step::Calls { slot: i, calls };
                    }
                    self.park_after_response(i);
                }
            }
        }
        Step::Done(Verdict::Continue)
    }

    /// A response-phase callback of plugin `i` faulted: its instance is gone; the response
    /// is under way, so `on_error` only decides what is counted.
    fn response_fault(&mut self, i: usize, f: &Fault) {
        let slot = &mut self.slots[i];
        slot.inst = None;
        slot.ctx = 0;
        slot.plugin.record_fault("response", f);
        slot.plugin.info.state.failures(slot.plugin.on_error).inc();
        self.info.calls.clear();
        self.info.local = None;
        self.info.closed = false;
    }

    /// A `proxy_send_local_response` or `proxy_close_stream` from the response phase is not
    /// supported: logged, ignored (a closed flag left set would cut the body later).
    fn response_local_ignored(&mut self) {
        if let Some(reply) = self.info.local.take() {
            log::warn!(
                target: "plugin",
                "[{}] send_local_response({}) in the response phase is not supported; ignored",
                reply.plugin,
                reply.status
            );
        }
        if std::mem::take(&mut self.info.closed) {
            log::warn!(target: "plugin", "close_stream in the response-headers phase is not supported; ignored");
        }
    }

    /// Plugin `i` is done with the response headers: without body callbacks its context is
    /// parked and its instance goes back to the pool.
    fn park_after_response(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        let Some(handle) = slot.inst.as_ref() else {
            return;
        };
        if !slot.plugin.bodies {
            slot.parked = true;
            if !slot.pooled {
                slot.pooled = true;
                slot.plugin.park(handle);
            }
        }
    }

    /// Runs the body callbacks on one chunk (`None`: no bytes, e.g. only end of stream):
    /// request bodies in chain order, response bodies in reverse, each plugin seeing what the
    /// previous one let through. A plugin that answers `Pause` before the end has the bytes
    /// held (up to its `limits.body`) and sees them again, with the next chunk appended, on
    /// its next call, as in Envoy; at the end of the stream everything held goes on.
    /// `Err`: a failed plugin with `on_error: deny` (the body must not go on unfiltered).
    pub fn body(
        &mut self,
        response: bool,
        req: &RequestHeader,
        resp: Option<&ResponseHeader>,
        chunk: &mut Option<Bytes>,
        eos: bool,
    ) -> Result<(), (u16, String)> {
        let dir = usize::from(response);
        if self.ended[dir] || (!response && !self.request_body) {
            return Ok(());
        }
        let mut eos = eos;
        if response {
            self.response_seen += chunk.as_ref().map_or(0, |c| c.len() as u64);
            eos |= self.response_len.is_some_and(|n| self.response_seen >= n);
        }
        self.ended[dir] = eos;
        let (phase, kind) = if response {
            (Phase::ResponseBody, "response body")
        } else {
            (Phase::RequestBody, "request body")
        };
        let resp_ptr = resp.map_or(std::ptr::null(), |r| r as *const ResponseHeader);
        let n = self.slots.len();
        let mut t0 = now();
        for step in 0..n {
            let i = if response { n - 1 - step } else { step };
            let slot = &self.slots[i];
            if !slot.plugin.bodies
                || slot.body_off[dir]
                || slot.ctx == 0
                || slot.parked
                || slot.inst.is_none()
            {
                continue;
            }
            let mut data = chunk.take().unwrap_or_default();
            if data.is_empty() && !eos {
                *chunk = Some(data);
                continue;
            }
            let slot = &mut self.slots[i];
            if !slot.held[dir].is_empty() {
                let mut v = std::mem::take(&mut slot.held[dir]);
                v.extend_from_slice(&data);
                data = Bytes::from(v);
            }
            let mut env = self.env(phase, req, resp_ptr);
            env.body = &mut data;
            let slot = &mut self.slots[i];
            let r = {
                let mut guard = slot.inst.as_ref().expect("checked").lock();
                match guard.as_mut() {
                    Some(inst) => {
                        let r = inst.body(response, slot.ctx, data.len(), eos, env);
                        if r.is_err() {
                            *guard = None;
                        }
                        r
                    }
                    None => Ok(None),
                }
            };
            let t1 = now();
            slot.plugin.info.state.durations[dir].observe(t1.saturating_duration_since(t0));
            t0 = t1;
            match r {
                Ok(Some(abi::ACTION_PAUSE)) if !eos => {
                    if data.len() <= slot.plugin.max_body {
                        slot.held[dir] = Vec::from(data);
                        // Nothing goes further down the chain until this plugin continues.
                        // An empty chunk, not `None`: Pingora reads `None` as the end.
                        *chunk = Some(Bytes::new());
                        return self.body_verdict(response);
                    }
                    slot.body_off[dir] = true;
                    let why = format!(
                        "paused on more than its limits.body ({} bytes) of {kind}",
                        slot.plugin.max_body
                    );
                    Self::body_failure(slot, &why)?;
                    *chunk = Some(data);
                }
                Ok(_) => *chunk = Some(data),
                Err(f) => {
                    slot.inst = None;
                    slot.ctx = 0;
                    slot.plugin.record_fault(kind, &f);
                    Self::body_failure(slot, "failed")?;
                    *chunk = Some(data);
                }
            }
            self.body_verdict(response)?;
        }
        Ok(())
    }

    /// After a body callback: a local response or a closed stream stops the body. On a
    /// request body that is the plugin's answer (its status); on a response body, whose
    /// headers are already out, the response is cut.
    fn body_verdict(&mut self, response: bool) -> Result<(), (u16, String)> {
        if let Some(reply) = self.info.local.take() {
            let status = if response { 500 } else { reply.status };
            return Err((
                status,
                format!(
                    "plugin `{}` answered {} from a body callback",
                    reply.plugin, reply.status
                ),
            ));
        }
        if self.info.closed {
            return Err((
                403,
                "a plugin closed the stream from a body callback".into(),
            ));
        }
        Ok(())
    }

    /// Records what the body callbacks need from the response headers: the response body's
    /// length (before the plugins edit it).
    pub fn set_response_length(&mut self, len: Option<u64>) {
        self.response_len = len;
    }

    /// A plugin's body processing failed: `deny` → the error, `allow` → go on without it.
    fn body_failure(slot: &mut Slot, why: &str) -> Result<(), (u16, String)> {
        match slot.plugin.on_error {
            OnError::Deny => {
                slot.plugin.info.state.failures_deny.inc();
                Err((503, format!("plugin `{}` {why}", slot.plugin.info.name)))
            }
            OnError::Allow => {
                slot.plugin.info.state.failures_allow.inc();
                log::warn!(target: "plugin", "[{}] {why}; on_error: allow, body passed on", slot.plugin.info.name);
                Ok(())
            }
        }
    }

    /// Whether any plugin of the chain takes body callbacks.
    pub fn wants_bodies(&self) -> bool {
        self.slots.iter().any(|s| s.plugin.bodies)
    }

    /// `proxy_on_done`/`proxy_on_log`/`proxy_on_delete` for every live context, then the
    /// instances go back to their pools (a parked one is there already).
    pub fn log(&mut self, req: &RequestHeader, resp: Option<&ResponseHeader>) {
        let resp_ptr = resp.map_or(std::ptr::null(), |r| r as *const ResponseHeader);
        let mut t0 = now();
        for i in 0..self.slots.len() {
            let env = self.env(Phase::Log, req, resp_ptr);
            let slot = &mut self.slots[i];
            let Some(handle) = slot.inst.take() else {
                continue;
            };
            let ctx = std::mem::take(&mut slot.ctx);
            slot.parked = false;
            let pooled = std::mem::take(&mut slot.pooled);
            let r = if ctx == 0 {
                Ok(())
            } else {
                let r = finish(&slot.plugin, &handle, ctx, Some(env), true);
                let t1 = now();
                slot.plugin.info.state.durations[2].observe(t1.saturating_duration_since(t0));
                t0 = t1;
                r
            };
            match r {
                Ok(()) if !pooled => slot.plugin.give_back(handle),
                Ok(()) => {}
                Err(f) => slot.plugin.record_fault("log", &f),
            }
        }
    }

    /// Which routing the plugins chose: `(group, key)` when they changed it.
    pub fn routing(&self) -> Option<(usize, &str)> {
        self.info
            .routing_changed
            .then_some((self.info.group, self.info.key.as_str()))
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        // `log` not reached (e.g. the request was dropped): free the contexts, keep instances.
        for slot in &mut self.slots {
            let Some(handle) = slot.inst.take() else {
                continue;
            };
            let ctx = std::mem::take(&mut slot.ctx);
            let ok = ctx == 0 || finish(&slot.plugin, &handle, ctx, None, false).is_ok();
            if ok && !std::mem::take(&mut slot.pooled) {
                slot.plugin.give_back(handle);
            }
        }
    }
}

/// The finishing callbacks of context `ctx` in the instance behind `handle` (which may be
/// parked, so it is locked for the call). A discarded instance took the context with it
/// (counted as lost). On a fault the instance is discarded.
fn finish(
    plugin: &Plugin,
    handle: &Handle,
    ctx: i32,
    env: Option<Env>,
    log: bool,
) -> std::result::Result<(), Fault> {
    let mut guard = handle.lock();
    let Some(inst) = guard.as_mut() else {
        plugin.info.state.lost.inc();
        return Ok(());
    };
    let r = inst.finish(ctx, env, log);
    if r.is_err() {
        *guard = None;
    }
    r
}

fn count_request_headers(req: &RequestHeader) -> usize {
    4 + req.headers.len() - usize::from(req.headers.contains_key(http::header::HOST))
}

/// Writes a plugin's local response (its status, headers and body; Content-Length set).
pub async fn write_reply(session: &mut Session, r: &LocalReply) -> Result<()> {
    let mut resp = ResponseHeader::build(r.status, Some(r.headers.len() + 2))?;
    let mut has_type = false;
    for (k, v) in &r.headers {
        if k.starts_with(b":") {
            continue;
        }
        let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(k),
            http::HeaderValue::from_bytes(v),
        ) else {
            log::warn!(target: "plugin", "[{}] dropped an invalid local-response header", r.plugin);
            continue;
        };
        if name == http::header::CONTENT_LENGTH || name == http::header::TRANSFER_ENCODING {
            continue;
        }
        has_type |= name == http::header::CONTENT_TYPE;
        resp.append_header(name, value)?;
    }
    if !has_type && !r.body.is_empty() {
        resp.insert_header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
    }
    resp.insert_header(http::header::CONTENT_LENGTH, r.body.len())?;
    crate::proxy::close_unless_body_read(session, &mut resp)?;
    let head_only = session.req_header().method == http::Method::HEAD || r.body.is_empty();
    session
        .write_response_header(Box::new(resp), head_only)
        .await?;
    if !head_only {
        session
            .write_response_body(Some(Bytes::clone(&r.body)), true)
            .await?;
    }
    Ok(())
}

/// The request phase as the proxy runs it, right after admission: starts the route's
/// exchange (`None` without a chain), runs the chain on the session's request header (header
/// edits reach the origin), makes the HTTP calls plugins dispatch and delivers their answers
/// (the request waits), and applies the plugins' routing to the admitted request so that
/// fallback planning, origin rewrite/signing and the cache key follow it.
pub async fn on_request(
    rt: &super::Runtime,
    session: &mut Session,
    a: &mut crate::admit::Admitted,
    origins: &[crate::origin::Origin],
) -> (Option<Exchange>, Verdict) {
    let source = session.client_addr().and_then(|s| s.as_inet()).copied();
    let Some(mut ex) = rt.exchange(a.route, a.group, &a.key, source) else {
        return (None, Verdict::Continue);
    };
    let req = session.req_header_mut();
    let has_body = req
        .headers
        .get(http::header::CONTENT_LENGTH)
        .is_some_and(|v| v.as_bytes() != b"0")
        || req.headers.contains_key(http::header::TRANSFER_ENCODING);
    let step = ex.request_headers(req, !has_body);
    let verdict = drive(&mut ex, step, Headers::Request(req), origins).await;
    if !matches!(verdict, Verdict::Continue) {
        return (Some(ex), verdict);
    }
    if let Some((group, key)) = ex.routing() {
        // The method and read-only rules are applied again to the new group by
        // `admit::finalize`; a plugin-set key is checked there against the route's key mode.
        a.group = group;
        if key != a.key {
            a.key = key.to_string();
            a.key_from_plugin = true;
        }
    }
    (Some(ex), verdict)
}

/// The response-headers phase as the proxy runs it: the chain in reverse order on `resp`,
/// making the HTTP calls plugins dispatch and delivering their answers (the response waits,
/// as in Envoy when a filter pauses the encoder).
pub async fn on_response(
    ex: &mut Exchange,
    req: &RequestHeader,
    resp: &mut ResponseHeader,
    origins: &[crate::origin::Origin],
) {
    if std::mem::replace(&mut ex.resp_walked, true) {
        return;
    }
    let step = ex.response_headers(req, resp);
    drive(ex, step, Headers::Response(req, resp), origins).await;
}

/// Runs a walk of the chain to its end: while a plugin waits for HTTP calls, makes them
/// (concurrently, each answer delivered as it arrives) and hands the answers back to the
/// walk, which goes on with the rest of the chain once the plugin has all of them.
async fn drive(
    ex: &mut Exchange,
    mut step: Step,
    mut headers: Headers<'_>,
    origins: &[crate::origin::Origin],
) -> Verdict {
    if let Step::Done(v) = step {
        // The common case: no plugin dispatched a call; nothing to set up.
        return v;
    }
    // The calls in flight, all of one plugin (`waiting`); answers are delivered as they come.
    let mut inflight = futures::stream::FuturesUnordered::new();
    let mut waiting = None;
    let deadline = std::time::Instant::now() + callout::MAX_TIMEOUT;
    loop {
        match step {
            Step::Done(v) => return v,
            Step::Calls { slot, calls } => {
                if waiting != Some(slot) {
                    // A new plugin's calls: the previous plugin's (if it failed with
                    // `on_error: allow`, say) are abandoned.
                    inflight.clear();
                    waiting = Some(slot);
                    ex.share_while_waiting();
                }
                let plugin = &ex.slots[slot].plugin;
                for call in calls {
                    let name = plugin.info.name.clone();
                    inflight.push(callout::perform(
                        callout::Caller::Request,
                        origins,
                        call,
                        plugin.max_body,
                        name,
                        deadline,
                    ));
                }
                let Some(answer) = inflight.next().await else {
                    // Not reached: a plugin waits only with calls in flight.
                    return Verdict::Fail(500, "cascade: no HTTP call to wait for\n".into());
                };
                step = ex.deliver(slot, answer, inflight.len(), &mut headers);
            }
        }
    }
}
