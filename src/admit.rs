//! Admission: the decisions taken on a request header before any upstream work. Given
//! the method, host, target and body length, either the request proceeds (with its route,
//! upstream key and upload limit) or cascade answers it locally (404 no route, 405, 413,
//! 400). Pure, so every rule has a table test.

use http::Method;

use crate::config::GroupConfig;
use crate::route::{self, Router};

/// What a request is allowed to do.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    Proxy(Admitted),
    Local(LocalResponse),
}

#[derive(Debug, PartialEq, Eq)]
pub struct Admitted {
    pub route: usize,
    pub group: usize,
    /// The object path sent upstream (after the route's prefix strip), starts with `/`.
    pub key: String,
    pub query: Option<String>,
    /// The body limit still to enforce while streaming (chunked uploads).
    pub upload_limit: Option<u64>,
}

/// A response cascade writes itself.
#[derive(Debug, PartialEq, Eq)]
pub struct LocalResponse {
    pub status: u16,
    pub body: String,
    pub allow: Option<&'static str>,
}

impl LocalResponse {
    fn new(status: u16, body: impl Into<String>) -> Self {
        LocalResponse {
            status,
            body: body.into(),
            allow: None,
        }
    }
}

/// The request facts admission looks at.
pub struct RequestFacts<'a> {
    pub method: &'a Method,
    pub host: Option<&'a str>,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub content_length: Option<&'a [u8]>,
}

pub fn is_write(m: &Method) -> bool {
    !(m == Method::GET || m == Method::HEAD || m == Method::OPTIONS)
}

const READ_METHODS: &str = "GET, HEAD, OPTIONS";
const ALL_METHODS: &str = "GET, HEAD, OPTIONS, PUT, POST, DELETE";

pub fn admit(router: &Router, groups: &[GroupConfig], req: &RequestFacts) -> Admission {
    let known = matches!(
        *req.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::POST | Method::DELETE
    );
    if !known {
        return Admission::Local(LocalResponse {
            allow: Some(ALL_METHODS),
            ..LocalResponse::new(405, format!("method {} is not supported\n", req.method))
        });
    }
    if !req.path.starts_with('/') {
        return Admission::Local(LocalResponse::new(
            400,
            "request target must be an absolute path\n",
        ));
    }
    let Some((route_ix, route)) = router.find(req.host, req.path) else {
        return Admission::Local(LocalResponse::new(
            404,
            format!(
                "cascade: no route for host `{}` and path `{}`\n",
                req.host.unwrap_or("-"),
                req.path
            ),
        ));
    };
    let group = &groups[route.group];
    if is_write(req.method) && group.read_only {
        return Admission::Local(LocalResponse {
            allow: Some(READ_METHODS),
            ..LocalResponse::new(405, format!("route `{}` is read-only\n", route.name))
        });
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
        key: route::strip_prefix(route, req.path).into_owned(),
        query: req.query.map(str::to_string),
        upload_limit: route.max_upload_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CacheFallback, HostMatch, RouteConfig};

    fn setup() -> (Router, Vec<GroupConfig>) {
        let group = |read_only| GroupConfig {
            name: "g".into(),
            main: 0,
            fallbacks: vec![1],
            fallback_on: vec![404],
            skip_fallback: false,
            cache_fallback: CacheFallback::None,
            read_only,
        };
        let router = Router::new(vec![
            RouteConfig {
                name: "media".into(),
                host: HostMatch::Exact("media.example.com".into()),
                path: "/m".into(),
                strip_prefix: true,
                group: 0,
                max_upload_size: Some(1024),
                cache: Default::default(),
                plugins: Vec::new(),
            },
            RouteConfig {
                name: "archive".into(),
                host: HostMatch::Any,
                path: "/archive".into(),
                strip_prefix: false,
                group: 1,
                max_upload_size: None,
                cache: Default::default(),
                plugins: Vec::new(),
            },
        ]);
        (router, vec![group(false), group(true)])
    }

    fn run(method: &str, host: Option<&str>, path: &str, len: Option<&str>) -> Admission {
        let (router, groups) = setup();
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        admit(
            &router,
            &groups,
            &RequestFacts {
                method: &m,
                host,
                path,
                query: Some("x=1"),
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
}
