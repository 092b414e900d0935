//! cascade `tenant-router` plugin: picks the origin group and the object key prefix per
//! tenant, by host, path prefix and/or header.
//!
//! See README.md for the configuration.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(RouterRoot { config: None }) });
}}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    tenants: Vec<RawTenant>,
    #[serde(default)]
    default: Fallback,
    tenant_header: Option<String>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug, Default)]
#[serde(rename_all = "lowercase")]
enum Fallback {
    #[default]
    Pass,
    Deny,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    name: String,
    host: Option<String>,
    path_prefix: Option<String>,
    header: Option<RawHeader>,
    group: String,
    #[serde(default)]
    key_prefix: String,
    #[serde(default)]
    strip_prefix: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeader {
    name: String,
    value: String,
}

#[derive(Debug)]
struct Tenant {
    name: String,
    /// Lowercase, no port.
    host: Option<String>,
    /// Starts with `/`, no trailing `/` (the root prefix is stored as "").
    path_prefix: Option<String>,
    /// (lowercase name, exact value).
    header: Option<(String, String)>,
    group: String,
    /// No leading `/`.
    key_prefix: String,
    strip_prefix: bool,
}

#[derive(Debug)]
struct Config {
    tenants: Vec<Tenant>,
    default: Fallback,
    tenant_header: Option<String>,
}

impl Config {
    fn parse(bytes: &[u8]) -> Result<Config, String> {
        let raw: RawConfig = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let mut tenants = Vec::with_capacity(raw.tenants.len());
        for t in raw.tenants {
            if t.name.is_empty() {
                return Err("a tenant has an empty name".into());
            }
            let ctx = |msg: &str| format!("tenant {:?}: {msg}", t.name);
            if t.group.is_empty() {
                return Err(ctx("group must not be empty"));
            }
            let host = match t.host {
                Some(h) if h.is_empty() => return Err(ctx("host must not be empty")),
                Some(h) => Some(strip_port(&h).to_ascii_lowercase()),
                None => None,
            };
            let path_prefix = match t.path_prefix {
                Some(p) if !p.starts_with('/') => {
                    return Err(ctx("path_prefix must start with '/'"))
                }
                Some(p) => Some(p.trim_end_matches('/').to_string()),
                None => None,
            };
            if t.strip_prefix && path_prefix.is_none() {
                return Err(ctx("strip_prefix needs path_prefix"));
            }
            let header = match t.header {
                Some(h) if h.name.is_empty() => return Err(ctx("header.name must not be empty")),
                Some(h) => Some((h.name.to_ascii_lowercase(), h.value)),
                None => None,
            };
            tenants.push(Tenant {
                host,
                path_prefix,
                header,
                group: t.group,
                key_prefix: t.key_prefix.trim_start_matches('/').to_string(),
                strip_prefix: t.strip_prefix,
                name: t.name,
            });
        }
        let tenant_header = match raw.tenant_header {
            Some(h) if h.is_empty() || h.starts_with(':') => {
                return Err(format!("invalid tenant_header {h:?}"))
            }
            h => h.map(|h| h.to_ascii_lowercase()),
        };
        Ok(Config {
            tenants,
            default: raw.default,
            tenant_header,
        })
    }
}

/// `example.com:8080` → `example.com`; `[::1]:8080` → `[::1]`.
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(i) => &host[..=i],
            None => host,
        };
    }
    match host.rfind(':') {
        Some(i) if host[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &host[..i],
        _ => host,
    }
}

/// Does `path` start with `prefix` (normalised, see [`Tenant::path_prefix`]) on a segment
/// boundary? `/a` matches `/a`, `/a/` and `/a/x`, not `/ab`.
fn has_prefix(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The path sent upstream for `tenant`, from the path that would go upstream without it.
fn rewrite_path(tenant: &Tenant, upstream: &str) -> String {
    let mut path = upstream;
    if tenant.strip_prefix {
        if let Some(prefix) = &tenant.path_prefix {
            if has_prefix(path, prefix) {
                path = &path[prefix.len()..];
            }
        }
    }
    let rest = path.strip_prefix('/').unwrap_or(path);
    let mut out = String::with_capacity(1 + tenant.key_prefix.len() + rest.len());
    out.push('/');
    out.push_str(&tenant.key_prefix);
    out.push_str(rest);
    out
}

struct RouterRoot {
    config: Option<Rc<Config>>,
}

impl Context for RouterRoot {}

impl RootContext for RouterRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match Config::parse(&bytes) {
            Ok(c) => {
                if c.tenants.is_empty() {
                    log::warn!("tenant-router: no tenants configured");
                }
                self.config = Some(Rc::new(c));
                true
            }
            Err(e) => {
                log::error!("tenant-router: invalid configuration: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let config = self.config.clone()?;
        Some(Box::new(RouterHttp { config }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct RouterHttp {
    config: Rc<Config>,
}

impl Context for RouterHttp {}

impl RouterHttp {
    fn matches(&self, t: &Tenant, host: &mut Option<String>, path: &mut Option<String>) -> bool {
        if let Some(want) = &t.host {
            let h = host.get_or_insert_with(|| {
                self.get_http_request_header(":authority")
                    .or_else(|| self.get_http_request_header("host"))
                    .unwrap_or_default()
            });
            if !strip_port(h).eq_ignore_ascii_case(want) {
                return false;
            }
        }
        if let Some(prefix) = &t.path_prefix {
            let p = path.get_or_insert_with(|| {
                let mut p = self.get_http_request_header(":path").unwrap_or_default();
                if let Some(i) = p.find('?') {
                    p.truncate(i);
                }
                p
            });
            if !has_prefix(p, prefix) {
                return false;
            }
        }
        if let Some((name, value)) = &t.header {
            if self.get_http_request_header(name).as_deref() != Some(value.as_str()) {
                return false;
            }
        }
        true
    }
}

impl HttpContext for RouterHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _eos: bool) -> Action {
        let config = Rc::clone(&self.config);
        // Fetched lazily, at most once each.
        let (mut host, mut path) = (None, None);
        let tenant = config
            .tenants
            .iter()
            .find(|t| self.matches(t, &mut host, &mut path));
        let Some(tenant) = tenant else {
            if let Some(h) = &config.tenant_header {
                // Never let a client pick its tenant by sending the header itself.
                self.set_http_request_header(h, None);
            }
            if config.default == Fallback::Deny {
                self.send_http_response(
                    404,
                    vec![("content-type", "text/plain")],
                    Some(b"no tenant for this request\n"),
                );
                return Action::Pause;
            }
            return Action::Continue;
        };

        self.set_property(
            vec!["cascade", "origin_group"],
            Some(tenant.group.as_bytes()),
        );
        if tenant.strip_prefix || !tenant.key_prefix.is_empty() {
            let upstream = match self.get_property(vec!["cascade", "upstream_path"]) {
                Some(p) => String::from_utf8_lossy(&p).into_owned(),
                // Host without the property: fall back to the request path.
                None => path.unwrap_or_else(|| {
                    let p = self.get_http_request_header(":path").unwrap_or_default();
                    p.split('?').next().unwrap_or("").to_string()
                }),
            };
            let new_path = rewrite_path(tenant, &upstream);
            if new_path != upstream {
                self.set_property(vec!["cascade", "upstream_path"], Some(new_path.as_bytes()));
            }
        }
        if let Some(h) = &config.tenant_header {
            self.set_http_request_header(h, Some(&tenant.name));
        }
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_prefixes() {
        assert_eq!(strip_port("Example.com:8080"), "Example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
        assert!(has_prefix("/a", "/a"));
        assert!(has_prefix("/a/", "/a"));
        assert!(has_prefix("/a/x", "/a"));
        assert!(!has_prefix("/ab", "/a"));
        assert!(has_prefix("/anything", ""));
    }

    #[test]
    fn config_and_rewrite() {
        let c = Config::parse(
            br#"{"tenants":[
                {"name":"a","host":"A.example.com:443","group":"g1","key_prefix":"tenant-a/"},
                {"name":"b","path_prefix":"/b/","strip_prefix":true,"group":"g2","key_prefix":"/tb/"},
                {"name":"c","header":{"name":"X-Tenant","value":"c"},"group":"g3"}
            ],"default":"deny","tenant_header":"X-Cascade-Tenant"}"#,
        )
        .unwrap();
        assert_eq!(c.default, Fallback::Deny);
        assert_eq!(c.tenant_header.as_deref(), Some("x-cascade-tenant"));
        let [a, b, cc] = &c.tenants[..] else { panic!() };
        assert_eq!(a.host.as_deref(), Some("a.example.com"));
        assert_eq!(b.path_prefix.as_deref(), Some("/b"));
        assert_eq!(b.key_prefix, "tb/");
        assert_eq!(cc.header, Some(("x-tenant".into(), "c".into())));
        assert_eq!(rewrite_path(a, "/x.jpg"), "/tenant-a/x.jpg");
        assert_eq!(rewrite_path(b, "/b/x.jpg"), "/tb/x.jpg");
        assert_eq!(rewrite_path(b, "/b"), "/tb/");
        assert_eq!(rewrite_path(b, "/bb/x"), "/tb/bb/x");
        assert_eq!(rewrite_path(cc, "/x"), "/x");
    }

    #[test]
    fn config_errors() {
        assert!(Config::parse(b"").is_err());
        assert!(Config::parse(br#"{"tenants":[{"name":"a"}]}"#).is_err());
        assert!(Config::parse(br#"{"tenants":[],"default":"maybe"}"#).is_err());
        assert!(
            Config::parse(br#"{"tenants":[{"name":"a","group":"g","path_prefix":"x"}]}"#).is_err()
        );
        assert!(
            Config::parse(br#"{"tenants":[{"name":"a","group":"g","strip_prefix":true}]}"#)
                .is_err()
        );
        assert_eq!(
            Config::parse(br#"{"tenants":[]}"#).unwrap().default,
            Fallback::Pass
        );
    }
}
