//! The admin API, on its own listener: cache purge (one object, or every object under a key
//! prefix), plugin reload, the state of every origin and peer, manual drain/enable of a peer,
//! and health probes. Every request but `/healthz` and `/readyz` needs
//! `Authorization: Bearer <token>`, the token read from the environment variable named in
//! `admin.token_env`, compared in constant time; without it the answer is 401.
//!
//! ```text
//! PURGE|DELETE /cache/<group>/<object key>     one object (all its slices)
//! PURGE|DELETE /cache/<group>/<key prefix>*    every object whose key starts with the prefix
//! PURGE|DELETE /cache/<group>/*                the whole group
//! POST /plugins/reload                         re-read the plugin files (as SIGHUP does)
//! GET  /status                                 groups, origins and peers (JSON), cache, plugins
//! POST /origins/<origin>/peers/<peer>/drain    no new requests to the peer (in-flight finish)
//! POST /origins/<origin>/peers/<peer>/enable   back in rotation
//! POST /buckets/<group>/reconcile              list the set's members, rebuild its books
//! GET  /readyz                                 200 once every monitored peer had a check
//! GET  /healthz                                200 while the process serves
//! ```
//! The object key is the one the route hands to the origin (after `strip_prefix`), the same
//! string the cache key is built from.

use async_trait::async_trait;
use http::{Method, Response};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use subtle::ConstantTimeEq;

use std::sync::Arc;

use crate::cache;
use crate::metrics::METRICS;
use crate::proxy::State;
use crate::upstream;

pub struct AdminApp {
    token: String,
    state: Arc<State>,
}

/// What a purge request asks for, after parsing (pure, for tests).
#[derive(Debug, PartialEq, Eq)]
pub enum PurgeReq {
    One { object: String },
    Prefix { group: String, prefix: String },
}

pub fn authorized(header: Option<&[u8]>, token: &str) -> bool {
    let Some(v) = header else { return false };
    let Some(given) = v.strip_prefix(b"Bearer ") else {
        return false;
    };
    // Constant time in the token's content; the length check leaks only the length.
    given.len() == token.len() && bool::from(given.ct_eq(token.as_bytes()))
}

/// `/cache/<group>/<key>` → the purge, or an error message. `groups` are the known names.
/// The key is made canonical as a request path is (`boundary::path`), so it names the entry
/// a request for it would have filled.
pub fn parse_purge(path: &str, groups: &[String]) -> Result<PurgeReq, (u16, String)> {
    let rest = path
        .strip_prefix("/cache/")
        .ok_or((404, "not found: PURGE /cache/<group>/<key>\n".to_string()))?;
    let (group, key) = rest.split_once('/').unwrap_or((rest, ""));
    let group = crate::boundary::path::decoded(group);
    if !groups.contains(&group) {
        return Err((404, format!("unknown group `{group}`\n")));
    }
    let key = format!("/{key}");
    let canonical = |k: &str| {
        crate::boundary::path::canonicalize(k.as_bytes())
            .map(|c| c.path)
            .map_err(|e| (400, format!("{e}\n")))
    };
    match key.strip_suffix('*') {
        Some(prefix) => Ok(PurgeReq::Prefix {
            group,
            prefix: canonical(prefix)?,
        }),
        None if key == "/" => Err((400, "name an object, or end a prefix with `*`\n".into())),
        None => Ok(PurgeReq::One {
            object: cache::object_key(&group, &canonical(&key)?),
        }),
    }
}

impl AdminApp {
    pub fn new(token: String, state: Arc<State>) -> Self {
        AdminApp { token, state }
    }

    fn group_names(&self) -> Vec<String> {
        self.state.groups.iter().map(|g| g.name.clone()).collect()
    }

    /// `POST /plugins/reload`: compiles and swaps changed plugin files off the async threads;
    /// 200 with what was swapped, 500 when a plugin failed (it keeps its loaded version).
    async fn reload_plugins(&self) -> (u16, String) {
        let Some(rt) = self.state.plugins.clone() else {
            return (404, "no plugins are configured\n".into());
        };
        let report = match tokio::task::spawn_blocking(move || rt.reload()).await {
            Ok(r) => r,
            Err(e) => return (500, format!("reload failed: {e}\n")),
        };
        let mut body = format!("swapped: {:?}\n", report.swapped);
        for f in &report.failed {
            body.push_str(f);
            body.push('\n');
        }
        (if report.failed.is_empty() { 200 } else { 500 }, body)
    }

    fn handle(&self, method: &Method, path: &str, auth: Option<&[u8]>) -> (u16, String) {
        if path == "/healthz" {
            return (200, "ok\n".into());
        }
        if path == "/readyz" {
            return if upstream::monitor::ready() {
                (200, "ready\n".into())
            } else {
                (
                    503,
                    "not ready: waiting for the first health checks\n".into(),
                )
            };
        }
        if !authorized(auth, &self.token) {
            return (
                401,
                "unauthorized: send Authorization: Bearer <token>\n".into(),
            );
        }
        if path == "/plugins/reload" {
            return (405, "use POST /plugins/reload\n".into());
        }
        if path == "/status" {
            return if method == Method::GET {
                (200, self.status())
            } else {
                (405, "use GET /status\n".into())
            };
        }
        if let Some(rest) = path.strip_prefix("/origins/") {
            return self.peer_action(method, rest);
        }
        if method.as_str() != "PURGE" && method != Method::DELETE {
            return (405, "use PURGE (or DELETE)\n".into());
        }
        let Some(storage) = self.state.cache.map(|c| c.storage) else {
            return (404, "no cache is configured\n".into());
        };
        match parse_purge(path, &self.group_names()) {
            Ok(PurgeReq::One { object }) => {
                let n = storage.invalidate(&object);
                METRICS
                    .cache_purges
                    .with_label_values(&["admin"])
                    .inc_by(n as u64);
                (
                    if n > 0 { 200 } else { 404 },
                    format!("{{\"purged\":{n}}}\n"),
                )
            }
            Ok(PurgeReq::Prefix { group, prefix }) => {
                let n = storage.purge_prefix(&group, &prefix);
                METRICS
                    .cache_purges
                    .with_label_values(&["admin"])
                    .inc_by(n as u64);
                (200, format!("{{\"purged\":{n}}}\n"))
            }
            Err(e) => e,
        }
    }
}

impl AdminApp {
    /// `POST /buckets/<group>/reconcile`: lists every member of the group's bucket set and
    /// rebuilds its usage and location index; answers with what it found.
    async fn bucket_action(&self, method: &Method, path: &str) -> (u16, String) {
        let rest = path.trim_start_matches("/buckets/");
        let Some((group, "reconcile")) = rest.split_once('/') else {
            return (404, "try POST /buckets/<group>/reconcile\n".into());
        };
        if method != Method::POST {
            return (405, "use POST /buckets/<group>/reconcile\n".into());
        }
        let Some(ix) = self.state.groups.iter().position(|g| g.name == group) else {
            return (404, format!("no group `{group}`\n"));
        };
        let Some(set) = self.state.sets.get(ix) else {
            return (404, format!("group `{group}` has no bucket set\n"));
        };
        match set.reconcile(&self.state.origins).await {
            Ok(v) => (200, format!("{v}\n")),
            Err(e) => (502, format!("reconcile failed: {e}\n")),
        }
    }

    /// `POST /origins/<origin>/peers/<peer>/drain|enable`: the runbook's manual failover.
    fn peer_action(&self, method: &Method, rest: &str) -> (u16, String) {
        let parts: Vec<&str> = rest.split('/').collect();
        let [origin, "peers", peer, action] = parts[..] else {
            return (
                404,
                "not found: POST /origins/<origin>/peers/<peer>/drain|enable\n".into(),
            );
        };
        if method != Method::POST {
            return (
                405,
                format!("use POST /origins/{origin}/peers/{peer}/{action}\n"),
            );
        }
        let Some(o) = self.state.origins.iter().find(|o| o.name == origin) else {
            return (404, format!("unknown origin `{origin}`\n"));
        };
        let Some(p) = o.peers.iter().find(|p| p.name == peer) else {
            return (404, format!("origin `{origin}` has no peer `{peer}`\n"));
        };
        let drain = match action {
            "drain" => true,
            "enable" => false,
            _ => return (404, format!("unknown action `{action}`: drain or enable\n")),
        };
        if p.state.set_draining(drain) {
            log::warn!(
                "origin `{origin}`: peer `{peer}` {} by the admin API",
                if drain { "drained" } else { "enabled" }
            );
        }
        p.metrics
            .up
            .set(i64::from(p.state.usable(upstream::now_ms())));
        (
            200,
            format!(
                "{{\"origin\":{},\"peer\":{},\"state\":\"{}\"}}\n",
                serde_json::Value::from(origin),
                serde_json::Value::from(peer),
                p.state.status(upstream::now_ms()).as_str()
            ),
        )
    }

    /// `GET /status`: every group, origin and peer as the proxy sees them now.
    fn status(&self) -> String {
        use serde_json::{json, Value};
        let now = upstream::now_ms();
        let unix_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let st = &self.state;
        let groups: Vec<Value> = st
            .groups
            .iter()
            .enumerate()
            .map(|(gi, g)| {
                json!({
                    "name": g.name,
                    "main": st.origins[g.main].name,
                    "bucket_set": st.sets.get(gi).map(|s| s.status()),
                    "fallbacks": g.fallbacks.iter().map(|&f| st.origins[f].name.clone()).collect::<Vec<_>>(),
                    "failover": g.failover,
                    "read_only": g.read_only,
                })
            })
            .collect();
        let origins: Vec<Value> = st
            .origins
            .iter()
            .map(|o| {
                let peers: Vec<Value> = o
                    .peers
                    .iter()
                    .map(|p| {
                        let s = &p.state;
                        let check = s.last_check().map(|c| {
                            json!({
                                "ok": c.ok,
                                "detail": c.detail,
                                "latency_ms": c.latency.as_secs_f64() * 1000.0,
                                "at": c.at,
                            })
                        });
                        json!({
                            "name": p.name,
                            "served_from": p.label,
                            "addresses": p.addrs(),
                            "weight": p.weight,
                            "priority": p.priority,
                            "state": s.status(now).as_str(),
                            "since": s.since_unix_ms(),
                            "in_flight": s.in_flight(),
                            "requests": s.requests.load(std::sync::atomic::Ordering::Relaxed),
                            "failures": s.failed.load(std::sync::atomic::Ordering::Relaxed),
                            "ejections": s.ejected_total.load(std::sync::atomic::Ordering::Relaxed),
                            "ejected_until": s.ejected_until(now).map(|u| unix_now + (u - now)),
                            "last_check": check,
                        })
                    })
                    .collect();
                json!({
                    "name": o.name,
                    "balance": o.selector.balance().as_str(),
                    "monitored": o.health.is_some(),
                    "retries": o.retries,
                    "peers": peers,
                })
            })
            .collect();
        let cache = st.cache.map(|c| {
            json!({
                "memory": {"bytes": c.storage.memory.bytes(), "objects": c.storage.memory.objects()},
                "disk": c.storage.disk.as_ref().map(|d| json!({"bytes": d.bytes(), "objects": d.objects(), "limit": d.limit()})),
            })
        });
        let plugins = st.plugins.as_ref().map(|rt| rt.plugin_names());
        let doc = json!({
            "ready": upstream::monitor::ready(),
            "redis": st.sets.link.as_ref().map(|l| json!({"up": l.is_up()})),
            "groups": groups,
            "origins": origins,
            "cache": cache,
            "plugins": plugins,
        });
        let mut out = serde_json::to_string_pretty(&doc).unwrap_or_default();
        out.push('\n');
        out
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let auth = req
            .headers
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        let (status, body) = if req.uri.path() == "/plugins/reload"
            && req.method == Method::POST
            && authorized(auth, &self.token)
        {
            self.reload_plugins().await
        } else if req.uri.path().starts_with("/buckets/") && authorized(auth, &self.token) {
            let path = req.uri.path().to_string();
            let method = req.method.clone();
            self.bucket_action(&method, &path).await
        } else {
            self.handle(&req.method, req.uri.path(), auth)
        };
        let mut b = Response::builder()
            .status(status)
            .header(http::header::CONTENT_LENGTH, body.len());
        b = if status == 401 {
            b.header(
                http::header::WWW_AUTHENTICATE,
                "Bearer realm=\"cascade admin\"",
            )
            .header(http::header::CONTENT_TYPE, "text/plain")
        } else if body.starts_with('{') {
            b.header(http::header::CONTENT_TYPE, "application/json")
        } else {
            b.header(http::header::CONTENT_TYPE, "text/plain")
        };
        b.body(body.into_bytes()).expect("static response")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens() {
        let t = "0123456789abcdef";
        assert!(authorized(Some(b"Bearer 0123456789abcdef"), t));
        assert!(!authorized(Some(b"Bearer 0123456789abcdeX"), t));
        assert!(!authorized(Some(b"Bearer 0123456789abcde"), t));
        assert!(!authorized(Some(b"Basic 0123456789abcdef"), t));
        assert!(!authorized(None, t));
    }

    #[test]
    fn purge_paths() {
        let groups = vec!["media".to_string()];
        assert_eq!(
            parse_purge("/cache/media/a/b.mp4", &groups),
            Ok(PurgeReq::One {
                object: cache::object_key("media", "/a/b.mp4")
            })
        );
        assert_eq!(
            parse_purge("/cache/media/a/*", &groups),
            Ok(PurgeReq::Prefix {
                group: "media".into(),
                prefix: "/a/".into()
            })
        );
        assert_eq!(
            parse_purge("/cache/media/*", &groups),
            Ok(PurgeReq::Prefix {
                group: "media".into(),
                prefix: "/".into()
            })
        );
        // Keys are canonical like request paths: `%61` is `a`, `;` is `%3B`.
        assert_eq!(
            parse_purge("/cache/media/%61;1.jpg", &groups),
            Ok(PurgeReq::One {
                object: cache::object_key("media", "/a%3B1.jpg")
            })
        );
        assert_eq!(
            parse_purge("/cache/media/a%00", &groups).unwrap_err().0,
            400
        );
        assert_eq!(parse_purge("/cache/other/x", &groups).unwrap_err().0, 404);
        assert_eq!(parse_purge("/cache/media/", &groups).unwrap_err().0, 400);
        assert_eq!(parse_purge("/nope", &groups).unwrap_err().0, 404);
    }

    fn app() -> AdminApp {
        let yaml = "listen: [{addr: 127.0.0.1:1}]
origins:
  m:
    peers:
      - {url: \"http://127.0.0.1:9/b\", name: a}
      - {url: \"http://127.0.0.1:10/b\", name: b, priority: 2}
groups: {g: {main: m}}
routes: [{group: g}]
";
        let cfg =
            crate::config::load_str(yaml, std::path::Path::new("/t.yaml"), &|_| None).unwrap();
        let state = crate::build_state(&cfg, std::path::Path::new("/tmp")).unwrap();
        AdminApp::new("0123456789abcdef".into(), Arc::new(state))
    }

    #[test]
    fn status_and_drain() {
        let app = app();
        let ok = Some(&b"Bearer 0123456789abcdef"[..]);
        let (code, body) = app.handle(&Method::GET, "/status", ok);
        assert_eq!(code, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["groups"][0]["main"], "m");
        let peers = &v["origins"][0]["peers"];
        assert_eq!(peers[0]["name"], "a");
        assert_eq!(peers[0]["served_from"], "m/a");
        assert_eq!(peers[0]["state"], "up");
        assert_eq!(peers[1]["priority"], 2);
        assert_eq!(v["origins"][0]["balance"], "round_robin");
        // Drain, then enable, by name; unknown names are 404; GET is 405.
        let (code, body) = app.handle(&Method::POST, "/origins/m/peers/a/drain", ok);
        assert_eq!((code, body.contains("draining")), (200, true), "{body}");
        let v: serde_json::Value =
            serde_json::from_str(&app.handle(&Method::GET, "/status", ok).1).unwrap();
        assert_eq!(v["origins"][0]["peers"][0]["state"], "draining");
        assert_eq!(
            app.state.origins[0].pick("/k", 0),
            Some(1),
            "the drained peer gets none"
        );
        assert_eq!(
            app.handle(&Method::POST, "/origins/m/peers/a/enable", ok).0,
            200
        );
        assert_eq!(app.state.origins[0].pick("/k", 0), Some(0));
        assert_eq!(
            app.handle(&Method::POST, "/origins/m/peers/zz/drain", ok).0,
            404
        );
        assert_eq!(
            app.handle(&Method::POST, "/origins/zz/peers/a/drain", ok).0,
            404
        );
        assert_eq!(
            app.handle(&Method::POST, "/origins/m/peers/a/boom", ok).0,
            404
        );
        assert_eq!(
            app.handle(&Method::GET, "/origins/m/peers/a/drain", ok).0,
            405
        );
        assert_eq!(
            app.handle(&Method::POST, "/origins/m/peers/a/drain", None)
                .0,
            401
        );
        assert_eq!(app.handle(&Method::GET, "/status", None).0, 401);
        assert_eq!(app.handle(&Method::GET, "/readyz", None).0, 200);
    }

    #[test]
    fn handle_requires_token_before_anything() {
        let app = app();
        assert_eq!(app.handle(&Method::GET, "/cache/g/x", None).0, 401);
        assert_eq!(app.handle(&Method::GET, "/healthz", None).0, 200);
        let ok = Some(&b"Bearer 0123456789abcdef"[..]);
        assert_eq!(app.handle(&Method::GET, "/cache/g/x", ok).0, 405);
        assert_eq!(app.handle(&Method::GET, "/plugins/reload", None).0, 401);
        assert_eq!(app.handle(&Method::GET, "/plugins/reload", ok).0, 405);
    }
}
