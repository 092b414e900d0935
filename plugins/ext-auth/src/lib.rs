//! cascade `ext-auth` plugin: asks an authorization service about every request, the way
//! nginx's `auth_request` and Envoy's `ext_authz` (HTTP mode) do, with `proxy_http_call`.
//!
//! See README.md for the configuration and the answers.

use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { config: None }) });
}}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug, Default)]
#[serde(rename_all = "lowercase")]
enum OnFailure {
    #[default]
    Deny,
    Allow,
}

fn default_path() -> String {
    "/".into()
}

fn default_timeout() -> u32 {
    1000
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Config {
    /// The origin (in cascade's `origins:`) that answers the checks.
    upstream: String,
    /// Path of the check on that origin.
    #[serde(default = "default_path")]
    path: String,
    #[serde(default = "default_timeout")]
    timeout_ms: u32,
    /// Request headers copied onto the check (lower-case names).
    #[serde(default)]
    forward: Vec<String>,
    /// Headers of an allowing answer copied onto the request (and removed from the client's
    /// request in any case, so a client cannot claim them).
    #[serde(default)]
    copy: Vec<String>,
    /// The service cannot be reached, times out or answers other than 2xx/401/403.
    #[serde(default)]
    on_failure: OnFailure,
}

struct Root {
    config: Option<Rc<Config>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match serde_json::from_slice::<Config>(&bytes) {
            Ok(mut c) if !c.upstream.is_empty() && c.path.starts_with('/') => {
                for h in c.forward.iter_mut().chain(c.copy.iter_mut()) {
                    h.make_ascii_lowercase();
                }
                self.config = Some(Rc::new(c));
                true
            }
            Ok(_) => {
                log::error!("ext-auth: `upstream` must be an origin name and `path` start with /");
                false
            }
            Err(e) => {
                log::error!("ext-auth: invalid configuration: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Check {
            config: self.config.clone()?,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Check {
    config: Rc<Config>,
}

impl Check {
    /// The check could not be made or answered nonsense: `on_failure` decides.
    fn failed(&self, status: u32, why: &str) {
        match self.config.on_failure {
            OnFailure::Allow => {
                log::warn!("ext-auth: {why}; on_failure: allow, request let through");
                self.resume_http_request();
            }
            OnFailure::Deny => {
                log::warn!("ext-auth: {why}; request refused with {status}");
                let body = format!("authorization service: {why}\n");
                self.send_http_response(status, vec![], Some(body.as_bytes()));
            }
        }
    }
}

impl Context for Check {
    fn on_http_call_response(
        &mut self,
        _token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        // Bytes, not strings, everywhere a value comes from outside: the SDK's string getters
        // panic on non-UTF-8 values, and a client or a service must not be able to crash this.
        let status = self
            .get_http_call_response_header_bytes(":status")
            .and_then(|s| std::str::from_utf8(&s).ok()?.parse::<u32>().ok());
        match status {
            Some(200..=299) => {
                for name in &self.config.copy {
                    let value = self.get_http_call_response_header_bytes(name);
                    self.set_http_request_header_bytes(name, value.as_deref());
                }
                self.resume_http_request();
            }
            Some(s @ (401 | 403)) => {
                // The service's refusal goes to the client as it is: its challenge, its body.
                let keep = ["www-authenticate", "content-type", "cache-control"];
                let answer: Vec<(String, String)> = self
                    .get_http_call_response_headers_bytes()
                    .into_iter()
                    .filter(|(k, _)| keep.contains(&k.to_ascii_lowercase().as_str()))
                    .filter_map(|(k, v)| Some((k, String::from_utf8(v).ok()?)))
                    .collect();
                let headers: Vec<(&str, &str)> = answer
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let body = self.get_http_call_response_body(0, body_size);
                self.send_http_response(s, headers, body.as_deref());
            }
            Some(s) => self.failed(502, &format!("answered {s}")),
            None => self.failed(503, "unavailable"),
        }
    }
}

/// The request target as the service sees it: bytes outside visible ASCII percent-encoded
/// (the client may send any byte; a header value may not carry them all).
fn visible(raw: &[u8]) -> String {
    let mut out = String::with_capacity(raw.len());
    for &b in raw {
        if b.is_ascii_graphic() {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl HttpContext for Check {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let c = self.config.clone();
        // Only the service may set these: removed first, whatever happens next.
        for name in &c.copy {
            self.set_http_request_header(name, None);
        }
        let method = self
            .get_http_request_header_bytes(":method")
            .map(|m| String::from_utf8_lossy(&m).into_owned())
            .unwrap_or_default();
        let uri = self
            .get_http_request_header_bytes(":path")
            .map(|p| visible(&p))
            .unwrap_or_default();
        let mut headers: Vec<(String, String)> = vec![
            (":method".into(), "GET".into()),
            (":path".into(), c.path.clone()),
            (":authority".into(), c.upstream.clone()),
            ("x-original-method".into(), method),
            ("x-original-uri".into(), uri),
        ];
        if let Some(addr) = self.get_property(vec!["source", "address"]) {
            headers.push((
                "x-original-remote-addr".into(),
                String::from_utf8_lossy(&addr).into_owned(),
            ));
        }
        for name in &c.forward {
            if let Some(v) = self.get_http_request_header_bytes(name) {
                match String::from_utf8(v) {
                    Ok(v) => headers.push((name.clone(), v)),
                    Err(_) => log::info!("ext-auth: {name} is not UTF-8; not forwarded"),
                }
            }
        }
        let pairs: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let timeout = Duration::from_millis(c.timeout_ms.into());
        match self.dispatch_http_call(&c.upstream, pairs, None, vec![], timeout) {
            Ok(_) => Action::Pause,
            Err(e) => {
                let why = format!("the check could not be dispatched ({e:?})");
                if c.on_failure == OnFailure::Allow {
                    log::warn!("ext-auth: {why}; on_failure: allow, request let through");
                    return Action::Continue;
                }
                self.failed(500, &why);
                Action::Pause
            }
        }
    }
}
