//! The admin API, on its own listener: cache purge (one object, or every object under a key
//! prefix), plugin reload and a health probe. Every request but `/healthz` needs
//! `Authorization: Bearer <token>`, the token read from the environment variable named in
//! `admin.token_env`, compared in constant time; without it the answer is 401.
//!
//! ```text
//! PURGE|DELETE /cache/<group>/<object key>     one object (all its slices)
//! PURGE|DELETE /cache/<group>/<key prefix>*    every object whose key starts with the prefix
//! PURGE|DELETE /cache/<group>/*                the whole group
//! POST /plugins/reload                         re-read the plugin files (as SIGHUP does)
//! ```
//! The object key is the one the route hands to the origin (after `strip_prefix`), the same
//! string the cache key is built from.

use async_trait::async_trait;
use http::{Method, Response};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use subtle::ConstantTimeEq;

use crate::cache::{self, TieredStorage};
use crate::metrics::METRICS;
use crate::plugin;

pub struct AdminApp {
    token: String,
    groups: Vec<String>,
    storage: Option<&'static TieredStorage>,
    plugins: Option<std::sync::Arc<plugin::Runtime>>,
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
    pub fn new(
        token: String,
        groups: Vec<String>,
        storage: Option<&'static TieredStorage>,
        plugins: Option<std::sync::Arc<plugin::Runtime>>,
    ) -> Self {
        AdminApp {
            token,
            groups,
            storage,
            plugins,
        }
    }

    /// `POST /plugins/reload`: compiles and swaps changed plugin files off the async threads;
    /// 200 with what was swapped, 500 when a plugin failed (it keeps its loaded version).
    async fn reload_plugins(&self) -> (u16, String) {
        let Some(rt) = self.plugins.clone() else {
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
        if !authorized(auth, &self.token) {
            return (
                401,
                "unauthorized: send Authorization: Bearer <token>\n".into(),
            );
        }
        if path == "/plugins/reload" {
            return (405, "use POST /plugins/reload\n".into());
        }
        if method.as_str() != "PURGE" && method != Method::DELETE {
            return (405, "use PURGE (or DELETE)\n".into());
        }
        let Some(storage) = self.storage else {
            return (404, "no cache is configured\n".into());
        };
        match parse_purge(path, &self.groups) {
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

    #[test]
    fn handle_requires_token_before_anything() {
        let app = AdminApp::new("0123456789abcdef".into(), vec!["g".into()], None, None);
        assert_eq!(app.handle(&Method::GET, "/cache/g/x", None).0, 401);
        assert_eq!(app.handle(&Method::GET, "/healthz", None).0, 200);
        let ok = Some(&b"Bearer 0123456789abcdef"[..]);
        assert_eq!(app.handle(&Method::GET, "/cache/g/x", ok).0, 405);
        assert_eq!(app.handle(&Method::GET, "/plugins/reload", None).0, 401);
        assert_eq!(app.handle(&Method::GET, "/plugins/reload", ok).0, 405);
    }
}
