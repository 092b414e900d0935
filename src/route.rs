//! Request routing: (host, path) → route. Pure and table-driven.
//!
//! Precedence follows nginx's `server_name` then longest-prefix `location`: an exact host
//! beats a wildcard host, which beats a route without host; among routes of the same host
//! class the longest path prefix wins. Prefixes match on segment boundaries, so `/media`
//! matches `/media` and `/media/x` but not `/mediax`.

use crate::config::{HostMatch, RouteConfig};

/// The routing table, sorted once at load so that a lookup is a linear scan that stops at
/// the first match (route tables are small; this beats a trie in practice).
#[derive(Debug, Clone)]
pub struct Router {
    /// Indices into the config's routes, best candidate first.
    order: Vec<usize>,
    routes: Vec<RouteConfig>,
}

impl Router {
    pub fn new(routes: Vec<RouteConfig>) -> Router {
        let mut order: Vec<usize> = (0..routes.len()).collect();
        order.sort_by_key(|&i| {
            let r = &routes[i];
            let class = match &r.host {
                HostMatch::Exact(_) => 0,
                // longer suffixes are more specific
                HostMatch::Suffix(s) => 1_000_000 - s.len(),
                HostMatch::Any => 2_000_000,
            };
            (class, std::cmp::Reverse(r.path.len()))
        });
        Router { order, routes }
    }

    pub fn routes(&self) -> &[RouteConfig] {
        &self.routes
    }

    /// Find the route for a request. `host` may carry a port and any case; `path` is the
    /// canonical request path (`boundary::path`), without query. Route prefixes are
    /// canonical too, so a prefix match on the normal form is a match on the decoded path.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<(usize, &RouteConfig)> {
        let host = host.map(normalize_host);
        self.order
            .iter()
            .map(|&i| (i, &self.routes[i]))
            .find(|(_, r)| host_matches(&r.host, host.as_deref()) && prefix_matches(&r.path, path))
    }
}

/// Lower-case, without port and trailing dot.
pub fn normalize_host(h: &str) -> String {
    let h = h.trim();
    let no_port = if let Some(rest) = h.strip_prefix('[') {
        // IPv6 literal
        rest.split(']').next().unwrap_or(rest)
    } else {
        h.rsplit_once(':').map_or(h, |(name, port)| {
            if port.chars().all(|c| c.is_ascii_digit()) {
                name
            } else {
                h
            }
        })
    };
    no_port.trim_end_matches('.').to_ascii_lowercase()
}

fn host_matches(m: &HostMatch, host: Option<&str>) -> bool {
    match (m, host) {
        (HostMatch::Any, _) => true,
        (HostMatch::Exact(want), Some(h)) => want == h,
        (HostMatch::Suffix(suffix), Some(h)) => {
            h.len() > suffix.len() && h.ends_with(suffix.as_str())
        }
        _ => false,
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The path after the route's prefix is removed (always starts with `/`).
pub fn strip_prefix<'a>(route: &RouteConfig, path: &'a str) -> std::borrow::Cow<'a, str> {
    if !route.strip_prefix || route.path == "/" {
        return path.into();
    }
    match path.strip_prefix(route.path.as_str()) {
        Some("") => "/".into(),
        Some(rest) => rest.into(),
        None => path.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(name: &str, host: HostMatch, path: &str) -> RouteConfig {
        RouteConfig {
            name: name.into(),
            host,
            path: path.into(),
            strip_prefix: true,
            group: 0,
            ..Default::default()
        }
    }

    fn table() -> Router {
        Router::new(vec![
            r("any-root", HostMatch::Any, "/"),
            r("any-media", HostMatch::Any, "/media"),
            r("wild", HostMatch::Suffix(".example.com".into()), "/"),
            r(
                "wild-deeper",
                HostMatch::Suffix(".cdn.example.com".into()),
                "/",
            ),
            r("exact", HostMatch::Exact("media.example.com".into()), "/"),
            r(
                "exact-img",
                HostMatch::Exact("media.example.com".into()),
                "/img",
            ),
        ])
    }

    #[test]
    fn precedence() {
        let t = table();
        let name = |h: Option<&str>, p: &str| t.find(h, p).map(|(_, r)| r.name.clone());
        let cases: &[(Option<&str>, &str, &str)] = &[
            (Some("media.example.com"), "/a.jpg", "exact"),
            (Some("MEDIA.example.com:8080"), "/img/a.jpg", "exact-img"),
            (Some("media.example.com"), "/imgx", "exact"),
            (Some("a.example.com"), "/x", "wild"),
            (Some("a.cdn.example.com"), "/x", "wild-deeper"),
            (Some("example.com"), "/media/x", "any-media"),
            (Some("other.org"), "/media", "any-media"),
            (Some("other.org"), "/mediax", "any-root"),
            (None, "/x", "any-root"),
            (Some("[::1]:8080"), "/x", "any-root"),
        ];
        for (h, p, want) in cases {
            assert_eq!(name(*h, p).as_deref(), Some(*want), "{h:?} {p}");
        }
    }

    #[test]
    fn no_route() {
        let t = Router::new(vec![r("e", HostMatch::Exact("a.com".into()), "/x")]);
        assert!(t.find(Some("b.com"), "/x").is_none());
        assert!(t.find(Some("a.com"), "/y").is_none());
        assert!(t.find(None, "/x").is_none());
    }

    #[test]
    fn hosts_normalize() {
        assert_eq!(normalize_host("Media.Example.COM:443"), "media.example.com");
        assert_eq!(normalize_host("example.com."), "example.com");
        assert_eq!(normalize_host("[::1]:80"), "::1");
    }

    #[test]
    fn stripping() {
        let route = r("m", HostMatch::Any, "/media");
        assert_eq!(strip_prefix(&route, "/media/a/b.jpg"), "/a/b.jpg");
        assert_eq!(strip_prefix(&route, "/media"), "/");
        let keep = RouteConfig {
            strip_prefix: false,
            ..route
        };
        assert_eq!(strip_prefix(&keep, "/media/a"), "/media/a");
    }
}
