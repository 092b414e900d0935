//! cascade test fixture `rewrite`: body callbacks written against the stock proxy-wasm SDK.
//!
//! - `response: upper` buffers the whole response body (answering `Action::Pause` until the
//!   end of the stream, as Envoy plugins do), then replaces it with its upper-case version
//!   and a trailer line; it drops `Content-Length` in the headers phase since the length
//!   changes.
//! - `redact: WORD` rewrites every occurrence of WORD in request body chunks, as they stream,
//!   to as many `X` (same length, so the upload's `Content-Length` stays right). With
//!   `redact_whole: true` it pauses until the whole request body is there first, so a WORD
//!   split across chunks is caught too.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { config: Config::default() })
    });
}}

#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    response: Option<String>,
    #[serde(default)]
    redact: Option<String>,
    #[serde(default)]
    redact_whole: bool,
}

struct Root {
    config: Config,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        if bytes.is_empty() {
            return true;
        }
        match serde_json::from_slice::<Config>(&bytes) {
            Ok(c) if c.response.as_deref().is_none_or(|r| r == "upper") => {
                self.config = c;
                true
            }
            Ok(c) => {
                log::error!("rewrite: unknown response mode {:?}", c.response);
                false
            }
            Err(e) => {
                log::error!("rewrite: invalid configuration: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Rewrite {
            config: self.config.clone(),
            chunks: 0,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Rewrite {
    config: Config,
    /// Response body callbacks seen.
    chunks: u32,
}

impl Context for Rewrite {}

impl HttpContext for Rewrite {
    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(word) = self.config.redact.as_deref().filter(|w| !w.is_empty()) else {
            return Action::Continue;
        };
        if self.config.redact_whole && !end_of_stream {
            return Action::Pause;
        }
        let Some(body) = self.get_http_request_body(0, body_size) else {
            return Action::Continue;
        };
        let w = word.as_bytes();
        let mut out = body.clone();
        let mut i = 0;
        while i + w.len() <= out.len() {
            if &out[i..i + w.len()] == w {
                out[i..i + w.len()].fill(b'X');
                i += w.len();
            } else {
                i += 1;
            }
        }
        if out != body {
            self.set_http_request_body(0, body_size, &out);
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _end_of_stream: bool) -> Action {
        if self.config.response.is_some() {
            self.set_http_response_header("content-length", None);
            self.set_http_response_header("x-rewrite", Some("upper"));
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.config.response.is_none() {
            return Action::Continue;
        }
        self.chunks += 1;
        if !end_of_stream {
            return Action::Pause;
        }
        let body = self
            .get_http_response_body(0, body_size)
            .unwrap_or_default();
        let mut out = body.to_ascii_uppercase();
        out.extend_from_slice(
            format!("\n-- {} bytes, {} callbacks\n", body.len(), self.chunks).as_bytes(),
        );
        self.set_http_response_body(0, body_size, &out);
        Action::Continue
    }
}
