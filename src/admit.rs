//! Admission: the decisions taken on a request header before any upstream work. Given
//! the method, host, canonical target (see `boundary`) and body length, either the request
//! proceeds (with its route, upstream key and upload limit) or cascade answers it locally
//! (404 no route, 405, 413, 400, 403). Pure, so every rule has a table test.
//!
//! Two steps: [`admit`] before the plugins (route, key mode, methods, sizes) and [`finalize`]
//! after them (the same method rules again, since a plugin may change the method, path or
//! group; the S3 policy of signed groups; the route's cache-query mode). A plugin's edit of
//! `:path` is taken back through [`readmit_path`].

use http::{HeaderMap, Method};

use crate::boundary::{self, path::Violations, s3};
use crate::config::schema::{CacheQuery, KeyMode};
use crate::config::{GroupConfig, RouteConfig};
use crate::route::{self, Router};

/// What a request is allowed to do.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    Proxy(Admitted),
    Local(LocalResponse),
}

#[derive(Debug, PartialEq, Eq, Default)]
pub struct Admitted {
    pub route: usize,
    pub group: usize,
    /// The object path sent upstream (after the route's prefix strip): canonical normal form
    /// (`boundary::path`), starts with `/`.
    pub key: String,
    /// Before [`finalize`]: the client's query. After: what goes upstream and into the cache
    /// key (`None`: nothing).
    pub query: Option<String>,
    /// The body limit still to enforce while streaming (chunked uploads).
    pub upload_limit: Option<u64>,
    /// The forwarded query names an S3 operation or sub-resource: the answer is not the
    /// object's, so it is never cached.
    pub not_object: bool,
    /// A plugin set the key (`cascade.upstream_path`): [`finalize`] checks it against the
    /// route's key mode.
    pub key_from_plugin: bool,
}

/// A response cascade writes itself.
#[derive(Debug, PartialEq, Eq)]
pub struct LocalResponse {
    pub status: u16,
    pub body: String,
    pub allow: Option<&'static str>,
    /// `None`: `text/plain; charset=utf-8`.
    pub content_type: Option<&'static str>,
    /// `Retry-After`, in seconds.
    pub retry_after: Option<u64>,
}

impl LocalResponse {
    pub fn new(status: u16, body: impl Into<String>) -> Self {
        LocalResponse {
            status,
            body: body.into(),
            allow: None,
            content_type: None,
            retry_after: None,
        }
    }

    /// An S3-style XML error (what SDKs parse into a code and message).
    pub fn s3(r: &s3::Refusal, resource: &str) -> Self {
        LocalResponse {
            content_type: Some("application/xml"),
            ..LocalResponse::new(r.status, r.xml(resource))
        }
    }
}

/// The request facts admission looks at.
pub struct RequestFacts<'a> {
    pub method: &'a Method,
    pub host: Option<&'a str>,
    pub target: &'a boundary::Target,
    pub content_length: Option<&'a [u8]>,
}

pub fn is_write(m: &Method) -> bool {
    !(m == Method::GET || m == Method::HEAD || m == Method::OPTIONS)
}

const READ_METHODS: &str = "GET, HEAD, OPTIONS";
const ALL_METHODS: &str = "GET, HEAD, OPTIONS, PUT, POST, DELETE";

/// The method rules: known methods, read-only groups. The 405 names the route when the
/// group is the route's own, else the group a plugin chose.
fn check_method(
    method: &Method,
    route: &RouteConfig,
    group_ix: usize,
    group: &GroupConfig,
) -> Result<(), LocalResponse> {
    if !known_method(method) {
        return Err(LocalResponse {
            allow: Some(ALL_METHODS),
            ..LocalResponse::new(405, format!("method {method} is not supported\n"))
        });
    }
    if is_write(method) && group.read_only {
        let body = if group_ix == route.group {
            format!("route `{}` is read-only\n", route.name)
        } else {
            format!("cascade: group `{}` is read-only\n", group.name)
        };
        return Err(LocalResponse {
            allow: Some(READ_METHODS),
            ..LocalResponse::new(405, body)
        });
    }
    Ok(())
}

/// The route's key mode against what the canonical check found.
fn check_key_mode(v: Violations, route: &RouteConfig) -> Result<(), LocalResponse> {
    match v.first() {
        Some(v) if route.keys == KeyMode::Strict => Err(LocalResponse::new(
            400,
            format!(
                "cascade: the path has {}; such paths are refused (a route may take them as raw keys with `keys: raw`)\n",
                v.describe()
            ),
        )),
        _ => Ok(()),
    }
}

pub fn admit(router: &Router, groups: &[GroupConfig], req: &RequestFacts) -> Admission {
    let path = &req.target.path;
    let Some((route_ix, route)) = router.find(req.host, &path.path) else {
        if !known_method(req.method) {
            return Admission::Local(LocalResponse {
                allow: Some(ALL_METHODS),
                ..LocalResponse::new(405, format!("method {} is not supported\n", req.method))
            });
        }
        return Admission::Local(LocalResponse::new(
            404,
            format!(
                "cascade: no route for host `{}` and path `{}`\n",
                req.host.unwrap_or("-"),
                path.path
            ),
        ));
    };
    if let Err(r) = check_key_mode(path.violations, route) {
        return Admission::Local(r);
    }
    if let Err(r) = check_method(req.method, route, route.group, &groups[route.group]) {
        return Admission::Local(r);
    }
    let content_length = match req.content_length {
        None => None,
        Some(v) => match std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
        {
            Some(n) => Some(n),
            None => return Admission::Local(LocalResponse::new(400, "invalid Content-Length\n")),
        },
    };
    if let (Some(limit), Some(len)) = (route.max_upload_size, content_length) {
        if len > limit {
            return Admission::Local(LocalResponse::new(
                413,
                format!(
                    "request body of {len} bytes exceeds this route's limit of {limit} bytes\n"
                ),
            ));
        }
    }
    Admission::Proxy(Admitted {
        route: route_ix,
        group: route.group,
        key: route::strip_prefix(route, &path.path).into_owned(),
        query: req.target.query.clone(),
        upload_limit: route.max_upload_size,
        ..Default::default()
    })
}

fn known_method(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::POST | Method::DELETE
    )
}

/// A plugin changed `:path`: the new target is checked like the client's and must stay in
/// the request's route (whose chain ran); the key and query follow it unless the plugin also
/// set `cascade.upstream_path`.
pub fn readmit_path(
    router: &Router,
    a: &mut Admitted,
    host: Option<&str>,
    target: Result<boundary::Target, String>,
    plugin_set_key: bool,
) -> Result<(), String> {
    let target = target?;
    let route = &router.routes()[a.route];
    match router.find(host, &target.path.path) {
        Some((ix, _)) if ix == a.route => {}
        _ => {
            return Err(format!(
                "a plugin moved `:path` to `{}`, outside route `{}`",
                target.path.path, route.name
            ))
        }
    }
    if let Some(v) = target.path.violations.first() {
        if route.keys == KeyMode::Strict {
            return Err(format!(
                "a plugin set `:path` to a path with {}",
                v.describe()
            ));
        }
    }
    if !plugin_set_key {
        a.key = route::strip_prefix(route, &target.path.path).into_owned();
    }
    a.query = target.query;
    Ok(())
}

/// The last admission step, on the request as the plugins left it: method rules (a plugin
/// may have changed the method or the group), the key mode of a plugin-set key, the S3
/// policy of signed groups, and the route's cache-query mode. Sets the forwarded query.
pub fn finalize(
    a: &mut Admitted,
    routes: &[RouteConfig],
    groups: &[GroupConfig],
    method: &Method,
    headers: &HeaderMap,
) -> Result<(), LocalResponse> {
    let route = &routes[a.route];
    let group = &groups[a.group];
    check_method(method, route, a.group, group)?;
    if a.key_from_plugin {
        match boundary::path::canonicalize(a.key.as_bytes()) {
            Ok(c) => {
                check_key_mode(c.violations, route)?;
                a.key = c.path;
            }
            Err(e) => {
                return Err(LocalResponse::new(
                    500,
                    format!("cascade: a plugin set an invalid upstream path: {e}\n"),
                ))
            }
        }
    }
    let read = matches!(*method, Method::GET | Method::HEAD);
    if group.signed {
        let q = s3::check(method, &a.key, a.query.as_deref(), headers, &route.s3_allow)
            .map_err(|r| LocalResponse::s3(&r, &a.key))?;
        a.query = q.forward;
        a.not_object = q.not_object;
    } else {
        if (read && route.cache.query == CacheQuery::Ignore) || a.query.as_deref() == Some("") {
            a.query = None;
        }
        a.not_object = crate::cache::query_bypasses(a.query.as_deref());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HostMatch, RouteConfig};

    fn setup() -> (Router, Vec<GroupConfig>) {
        let group = |read_only, signed| GroupConfig {
            name: "g".into(),
            fallbacks: vec![1],
            fallback_on: vec![404],
            read_only,
            signed,
            ..Default::default()
        };
        let router = Router::new(vec![
            RouteConfig {
                name: "media".into(),
                host: HostMatch::Exact("media.example.com".into()),
                path: "/m".into(),
                strip_prefix: true,
                group: 0,
                max_upload_size: Some(1024),
                ..Default::default()
            },
            RouteConfig {
                name: "archive".into(),
                path: "/archive".into(),
                group: 1,
                ..Default::default()
            },
            RouteConfig {
                name: "raw".into(),
                path: "/raw".into(),
                group: 2,
                keys: KeyMode::Raw,
                ..Default::default()
            },
            RouteConfig {
                name: "s3".into(),
                path: "/s3".into(),
                strip_prefix: true,
                group: 2,
                ..Default::default()
            },
        ]);
        (
            router,
            vec![group(false, false), group(true, false), group(false, true)],
        )
    }

    fn run(method: &str, host: Option<&str>, path: &str, len: Option<&str>) -> Admission {
        let (router, groups) = setup();
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        let Ok(path) = boundary::path::canonicalize(path.as_bytes()) else {
            return Admission::Local(LocalResponse::new(400, "bad path"));
        };
        let target = boundary::Target {
            path,
            query: Some("x=1".into()),
        };
        admit(
            &router,
            &groups,
            &RequestFacts {
                method: &m,
                host,
                target: &target,
                content_length: len.map(str::as_bytes),
            },
        )
    }

    fn status(a: Admission) -> u16 {
        match a {
            Admission::Local(r) => r.status,
            Admission::Proxy(_) => 0,
        }
    }

    #[test]
    fn proxies_with_stripped_key() {
        match run("GET", Some("media.example.com:8080"), "/m/a/b.jpg", None) {
            Admission::Proxy(a) => {
                assert_eq!(a.key, "/a/b.jpg");
                assert_eq!(a.query.as_deref(), Some("x=1"));
                assert_eq!((a.route, a.group), (0, 0));
            }
            other => panic!("{other:?}"),
        }
        // The route matches the decoded path: an encoded prefix is the same prefix.
        match run("GET", Some("media.example.com"), "/%6d/a%20b", None) {
            Admission::Proxy(a) => assert_eq!(a.key, "/a%20b"),
            other => panic!("{other:?}"),
        }
    }

    type Case<'a> = (&'a str, Option<&'a str>, &'a str, Option<&'a str>, u16);

    #[test]
    fn local_answers() {
        let cases: &[Case] = &[
            ("GET", Some("other.org"), "/m/x", None, 404),
            ("PUT", Some("media.example.com"), "/m/x", Some("2048"), 413),
            ("PUT", Some("media.example.com"), "/m/x", Some("1024"), 0),
            ("PUT", Some("media.example.com"), "/m/x", Some("12abc"), 400),
            ("PUT", None, "/archive/x", Some("1"), 405),
            ("DELETE", None, "/archive/x", None, 405),
            ("POST", None, "/archive/x", None, 405),
            ("GET", None, "/archive/x", None, 0),
            ("OPTIONS", None, "/archive/x", None, 0),
            ("BREW", None, "/archive/x", None, 405),
            ("GET", None, "*", None, 400),
            // strict keys: dot, empty and encoded-separator segments are refused...
            ("GET", None, "/archive/../m/x", None, 400),
            ("GET", None, "/archive/%2e%2e/x", None, 400),
            ("GET", None, "/archive//x", None, 400),
            ("GET", None, "/archive/a%2fb", None, 400),
            // ...but a raw-keys route takes them as keys
            ("GET", None, "/raw/a//b/../c", None, 0),
            ("GET", None, "/raw/a%00", None, 400),
        ];
        for (m, h, p, len, want) in cases {
            assert_eq!(status(run(m, *h, p, *len)), *want, "{m} {h:?} {p} {len:?}");
        }
        match run("GET", Some("nope.org"), "/zz", None) {
            Admission::Local(r) => {
                assert!(r.body.contains("no route") && r.body.contains("nope.org"))
            }
            _ => panic!(),
        }
    }

    fn admitted(path: &str, query: Option<&str>) -> Admitted {
        let (router, groups) = setup();
        let target = boundary::Target {
            path: boundary::path::canonicalize(path.as_bytes()).unwrap(),
            query: query.map(str::to_string),
        };
        match admit(
            &router,
            &groups,
            &RequestFacts {
                method: &Method::GET,
                host: None,
                target: &target,
                content_length: None,
            },
        ) {
            Admission::Proxy(a) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn finalize_rechecks_what_plugins_changed() {
        let (router, groups) = setup();
        let h = HeaderMap::new();
        // A plugin turned a GET into a PUT on a read-only group.
        let mut a = admitted("/archive/x", None);
        let e = finalize(&mut a, router.routes(), &groups, &Method::PUT, &h).unwrap_err();
        assert_eq!(e.status, 405);
        // A plugin moved a write to a read-only group.
        let mut a = admitted("/s3/x", None);
        a.group = 1;
        let e = finalize(&mut a, router.routes(), &groups, &Method::PUT, &h).unwrap_err();
        assert!(e.body.contains("group `g` is read-only"), "{}", e.body);
        // A plugin-set key with a dot segment on a strict route.
        let mut a = admitted("/s3/x", None);
        a.key = "/a/../b".into();
        a.key_from_plugin = true;
        let e = finalize(&mut a, router.routes(), &groups, &Method::GET, &h).unwrap_err();
        assert_eq!(e.status, 400);
        // Signed group: sub-resources refused in S3's XML, other parameters dropped.
        let mut a = admitted("/s3/x", Some("acl"));
        let e = finalize(&mut a, router.routes(), &groups, &Method::GET, &h).unwrap_err();
        assert_eq!((e.status, e.content_type), (403, Some("application/xml")));
        let mut a = admitted("/s3/x", Some("v=2"));
        finalize(&mut a, router.routes(), &groups, &Method::GET, &h).unwrap();
        assert_eq!(a.query, None);
        // Unsigned group: the query goes through (and into the cache key).
        let mut a = admitted("/archive/x", Some("w=200"));
        finalize(&mut a, router.routes(), &groups, &Method::GET, &h).unwrap();
        assert_eq!(a.query.as_deref(), Some("w=200"));
    }

    #[test]
    fn plugin_path_edits_stay_in_their_route() {
        let (router, _) = setup();
        let t = |p: &str| {
            let (path, q) = p.split_once('?').map_or((p, None), |(a, b)| (a, Some(b)));
            Ok(boundary::Target {
                path: boundary::path::canonicalize(path.as_bytes()).unwrap(),
                query: q.map(str::to_string),
            })
        };
        let mut a = admitted("/s3/x", Some("sig=1"));
        readmit_path(&router, &mut a, None, t("/s3/y?keep=1"), false).unwrap();
        assert_eq!((a.key.as_str(), a.query.as_deref()), ("/y", Some("keep=1")));
        assert!(readmit_path(&router, &mut a, None, t("/archive/y"), false)
            .unwrap_err()
            .contains("outside route"));
        assert!(readmit_path(&router, &mut a, None, t("/s3/a//b"), false).is_err());
        // A key the plugin set explicitly wins over the path's.
        let mut a = admitted("/s3/x", None);
        a.key = "/tenant/x".into();
        readmit_path(&router, &mut a, None, t("/s3/x"), true).unwrap();
        assert_eq!(a.key, "/tenant/x");
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// What the route saw is what goes upstream: an admitted key is canonical, and the
            /// path it came from (prefix + key) routes to the same route again.
            #[test]
            fn routes_exactly_what_it_forwards(raw in "(/(m|archive|raw|s3|\\.|\\.\\.|%2e|%2f|%25|x|;|%00|)){1,6}") {
                let (router, groups) = setup();
                let Ok(path) = boundary::path::canonicalize(raw.as_bytes()) else { return Ok(()) };
                let target = boundary::Target { path, query: None };
                let facts = RequestFacts {
                    method: &Method::GET,
                    host: Some("media.example.com"),
                    target: &target,
                    content_length: None,
                };
                if let Admission::Proxy(a) = admit(&router, &groups, &facts) {
                    let route = &router.routes()[a.route];
                    let again = boundary::path::canonicalize(a.key.as_bytes()).unwrap();
                    prop_assert_eq!(&again.path, &a.key);
                    if route.keys == KeyMode::Strict {
                        prop_assert!(again.violations.is_empty(), "{} -> {}", raw, a.key);
                    }
                    let full = if route.strip_prefix && route.path != "/" {
                        // `/m` and `/m/` both strip to the key `/`.
                        let p = &target.path.path;
                        if a.key == "/" && p.strip_suffix('/') == Some(route.path.as_str()) {
                            p.clone()
                        } else if a.key == "/" {
                            route.path.clone()
                        } else {
                            format!("{}{}", route.path, a.key)
                        }
                    } else {
                        a.key.clone()
                    };
                    prop_assert_eq!(&full, &target.path.path);
                    let (ix, _) = router.find(Some("media.example.com"), &full).unwrap();
                    prop_assert_eq!(ix, a.route);
                }
            }
        }
    }
}
