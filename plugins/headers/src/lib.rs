//! cascade `headers` plugin: set/add/remove request and response headers, and CORS.
//!
//! See README.md for the configuration.

use std::collections::BTreeMap;
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(HeadersRoot { config: None }) });
}}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    request: RawEdits,
    #[serde(default)]
    response: RawEdits,
    cors: Option<RawCors>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawEdits {
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    add: BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
}

fn default_methods() -> Vec<String> {
    vec!["GET".into(), "HEAD".into()]
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCors {
    allow_origins: Vec<String>,
    #[serde(default = "default_methods")]
    allow_methods: Vec<String>,
    #[serde(default)]
    allow_headers: Vec<String>,
    #[serde(default)]
    expose_headers: Vec<String>,
    max_age: Option<u32>,
}

#[derive(Default, Debug)]
struct Edits {
    remove: Vec<String>,
    set: Vec<(String, String)>,
    add: Vec<(String, String)>,
}

impl Edits {
    fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }
}

#[derive(Debug)]
struct Cors {
    /// Lowercase; `any` when the list holds `*`.
    allow_origins: Vec<String>,
    any: bool,
    allow_methods: String,
    allow_headers: String,
    expose_headers: String,
    max_age: Option<String>,
}

#[derive(Debug)]
struct Config {
    request: Edits,
    response: Edits,
    cors: Option<Cors>,
}

fn header_name(what: &str, name: &str) -> Result<String, String> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b) || b == b':');
    if ok {
        Ok(name.to_ascii_lowercase())
    } else {
        Err(format!("{what}: invalid header name {name:?}"))
    }
}

fn edits(what: &str, raw: RawEdits) -> Result<Edits, String> {
    let pairs = |m: BTreeMap<String, String>| -> Result<Vec<(String, String)>, String> {
        m.into_iter()
            .map(|(k, v)| {
                if v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                    return Err(format!("{what}: header {k:?} has an invalid value"));
                }
                Ok((header_name(what, &k)?, v))
            })
            .collect()
    };
    Ok(Edits {
        remove: raw
            .remove
            .iter()
            .map(|n| header_name(what, n))
            .collect::<Result<_, _>>()?,
        set: pairs(raw.set)?,
        add: pairs(raw.add)?,
    })
}

impl Config {
    fn parse(bytes: &[u8]) -> Result<Config, String> {
        let raw: RawConfig = if bytes.iter().all(u8::is_ascii_whitespace) {
            RawConfig::default()
        } else {
            // `null` (an empty YAML value) means "no edits" too.
            serde_json::from_slice::<Option<RawConfig>>(bytes)
                .map_err(|e| e.to_string())?
                .unwrap_or_default()
        };
        let cors = match raw.cors {
            None => None,
            Some(c) => {
                if c.allow_origins.is_empty() {
                    return Err("cors.allow_origins must not be empty".into());
                }
                Some(Cors {
                    any: c.allow_origins.iter().any(|o| o == "*"),
                    allow_origins: c
                        .allow_origins
                        .iter()
                        .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                        .collect(),
                    allow_methods: c.allow_methods.join(", "),
                    allow_headers: c.allow_headers.join(", "),
                    expose_headers: c.expose_headers.join(", "),
                    max_age: c.max_age.map(|m| m.to_string()),
                })
            }
        };
        Ok(Config {
            request: edits("request", raw.request)?,
            response: edits("response", raw.response)?,
            cors,
        })
    }
}

impl Cors {
    /// The `access-control-allow-origin` value for `origin`, if it is allowed.
    fn allow<'a>(&'a self, origin: &'a str) -> Option<&'a str> {
        if self.any {
            return Some("*");
        }
        self.allow_origins
            .iter()
            .any(|o| o.eq_ignore_ascii_case(origin))
            .then_some(origin)
    }
}

struct HeadersRoot {
    config: Option<Rc<Config>>,
}

impl Context for HeadersRoot {}

impl RootContext for HeadersRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match Config::parse(&bytes) {
            Ok(c) => {
                self.config = Some(Rc::new(c));
                true
            }
            Err(e) => {
                log::error!("headers: invalid configuration: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let config = self.config.clone()?;
        Some(Box::new(HeadersHttp {
            config,
            origin: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct HeadersHttp {
    config: Rc<Config>,
    /// The request's `Origin`, when CORS is configured and the origin is allowed.
    origin: Option<String>,
}

impl Context for HeadersHttp {}

impl HttpContext for HeadersHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _eos: bool) -> Action {
        let config = Rc::clone(&self.config);
        if let Some(cors) = &config.cors {
            if let Some(origin) = self.get_http_request_header("origin") {
                if let Some(allowed) = cors.allow(&origin) {
                    let allowed = allowed.to_string();
                    let preflight = self.get_http_request_header(":method").as_deref()
                        == Some("OPTIONS")
                        && self
                            .get_http_request_header("access-control-request-method")
                            .is_some();
                    if preflight {
                        self.answer_preflight(cors, &allowed);
                        return Action::Pause;
                    }
                    self.origin = Some(allowed);
                }
            }
        }
        let e = &config.request;
        if !e.is_empty() {
            for name in &e.remove {
                self.set_http_request_header(name, None);
            }
            for (name, value) in &e.set {
                self.set_http_request_header(name, Some(value));
            }
            for (name, value) in &e.add {
                self.add_http_request_header(name, value);
            }
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _eos: bool) -> Action {
        let config = Rc::clone(&self.config);
        let e = &config.response;
        if !e.is_empty() {
            for name in &e.remove {
                self.set_http_response_header(name, None);
            }
            for (name, value) in &e.set {
                self.set_http_response_header(name, Some(value));
            }
            for (name, value) in &e.add {
                self.add_http_response_header(name, value);
            }
        }
        if let (Some(cors), Some(origin)) = (&config.cors, self.origin.take()) {
            self.set_http_response_header("access-control-allow-origin", Some(&origin));
            if origin != "*" {
                self.add_http_response_header("vary", "Origin");
            }
            if !cors.expose_headers.is_empty() {
                self.set_http_response_header(
                    "access-control-expose-headers",
                    Some(&cors.expose_headers),
                );
            }
        }
        Action::Continue
    }
}

impl HeadersHttp {
    /// Answers a CORS preflight (`OPTIONS` + `Origin` + `Access-Control-Request-Method`)
    /// locally with 204: buckets rarely answer them usefully.
    fn answer_preflight(&self, cors: &Cors, origin: &str) {
        let mut headers = vec![
            ("access-control-allow-origin", origin),
            ("access-control-allow-methods", cors.allow_methods.as_str()),
        ];
        if origin != "*" {
            headers.push(("vary", "Origin"));
        }
        if !cors.allow_headers.is_empty() {
            headers.push(("access-control-allow-headers", cors.allow_headers.as_str()));
        }
        if let Some(max_age) = &cors.max_age {
            headers.push(("access-control-max-age", max_age.as_str()));
        }
        self.send_http_response(204, headers, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_is_fine() {
        let c = Config::parse(b"").unwrap();
        assert!(c.request.is_empty() && c.response.is_empty() && c.cors.is_none());
        assert!(Config::parse(b"null").unwrap().cors.is_none());
        let c = Config::parse(b"{}").unwrap();
        assert!(c.request.is_empty());
    }

    #[test]
    fn parse_full() {
        let c = Config::parse(
            br#"{"request":{"set":{"X-A":"1"},"add":{"x-b":"2"},"remove":["Cookie"]},
                "response":{"remove":["x-amz-request-id"]},
                "cors":{"allow_origins":["https://App.example.com/"],"expose_headers":["etag","content-length"],"max_age":600}}"#,
        )
        .unwrap();
        assert_eq!(c.request.set, vec![("x-a".into(), "1".into())]);
        assert_eq!(c.request.remove, vec!["cookie".to_string()]);
        let cors = c.cors.unwrap();
        assert_eq!(cors.allow_methods, "GET, HEAD");
        assert_eq!(cors.expose_headers, "etag, content-length");
        assert_eq!(cors.max_age.as_deref(), Some("600"));
        assert_eq!(
            cors.allow("https://app.example.com"),
            Some("https://app.example.com")
        );
        assert_eq!(cors.allow("https://evil.example.com"), None);
    }

    #[test]
    fn parse_errors() {
        assert!(Config::parse(br#"{"request":{"set":{"bad name":"1"}}}"#).is_err());
        assert!(Config::parse(br#"{"request":{"set":{"x":"a\r\nb"}}}"#).is_err());
        assert!(Config::parse(br#"{"cors":{"allow_origins":[]}}"#).is_err());
        assert!(Config::parse(br#"{"requests":{}}"#).is_err());
        let c = Config::parse(br#"{"cors":{"allow_origins":["*"]}}"#).unwrap();
        assert_eq!(c.cors.unwrap().allow("https://x"), Some("*"));
    }
}
