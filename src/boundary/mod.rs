//! The trust boundary: the one place where what a client sent becomes what cascade acts on.
//!
//! ```text
//!  client request ──► keep-alive  bounded by server.keepalive_timeout, whatever the client asks
//!                 ──► limits   header size/count bounds           (431)
//!                 ──► target   canonical path (path.rs) + query    (400)
//!                 ──► admit    route on the canonical path, route's key mode, methods, sizes
//!                 ──► plugins  see the canonical `:path`; their edits are re-checked here
//!                 ──► finalize method rules again, the S3 policy (s3.rs) for signed groups,
//!                              the route's cache-query mode → the forwarded query
//!  upstream       ◄── rewrite  canonical key, forwarded query, header allowlist (signed),
//!                              no client credentials to fallbacks
//! ```
//!
//! Everything after `finalize` (cache key, upstream path, signature, fallback plan) reads the
//! admitted request only, never the client's raw target: what the route saw is what the
//! origin gets.

pub mod path;
pub mod s3;

use pingora_http::RequestHeader;

use crate::config::schema::HeaderLimits;

/// The keep-alive a client connection gets after this request, in Pingora's terms (`None`:
/// close after the response; `Some(0)`: no idle limit; `Some(s)`: close after `s` idle
/// seconds): what the client's request allows (`client`, from its HTTP version, `Connection`
/// and `Keep-Alive` headers), bounded by `server.keepalive_timeout` (`limit_secs`; 0 = off).
/// A client cannot ask for a longer idle wait than the limit, nor for an unlimited one.
pub fn keepalive(client: Option<u64>, limit_secs: u64) -> Option<u64> {
    match (client, limit_secs) {
        (None, _) | (_, 0) => None,
        (Some(0), l) => Some(l),
        (Some(c), l) => Some(c.min(l)),
    }
}

/// Why a request header is over the limits (431).
pub fn check_header_limits(req: &RequestHeader, l: &HeaderLimits) -> Result<(), String> {
    let target = req.raw_path().len() as u64;
    if target > l.max_line {
        return Err(format!(
            "the request target is {target} bytes; the limit is {}",
            l.max_line
        ));
    }
    if req.headers.len() as u64 > u64::from(l.max_fields) {
        return Err(format!(
            "the request has {} header fields; the limit is {}",
            req.headers.len(),
            l.max_fields
        ));
    }
    let mut total = target;
    for (name, value) in req.headers.iter() {
        let line = (name.as_str().len() + value.len() + 4) as u64;
        if line > l.max_line {
            return Err(format!(
                "header `{name}` is {line} bytes; the limit is {}",
                l.max_line
            ));
        }
        total += line;
    }
    if total > l.max_total {
        return Err(format!(
            "the request header is {total} bytes; the limit is {}",
            l.max_total
        ));
    }
    Ok(())
}

/// Does a client header go to a fallback (when the group does not `forward_credentials`)?
/// Only what a read needs: content negotiation, ranges, conditionals, CORS. Anything else may
/// be a credential (`Authorization`, `Cookie`, `X-Api-Key`, a session token, ...).
pub fn fallback_header(name: &str) -> bool {
    matches!(
        name,
        "accept"
            | "accept-encoding"
            | "accept-language"
            | "user-agent"
            | "range"
            | "cache-control"
            | "pragma"
            | "origin"
            | "access-control-request-method"
            | "access-control-request-headers"
            | "content-length"
            | "transfer-encoding"
    ) || name.starts_with("if-")
}

/// A query without the parameters that carry credentials (presigned-URL `X-Amz-*`,
/// OAuth's `access_token`), for a fallback.
pub fn without_credentials(query: &str) -> std::borrow::Cow<'_, str> {
    let credential = |pair: &str| {
        let name = pair.split_once('=').map_or(pair, |(k, _)| k);
        name.len() >= 6 && name[..6].eq_ignore_ascii_case("x-amz-")
            || name.eq_ignore_ascii_case("access_token")
    };
    if !query.split('&').any(credential) {
        return query.into();
    }
    let kept: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty() && !credential(p))
        .collect();
    kept.join("&").into()
}

/// A request target made canonical: the path in normal form, the query as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub path: path::CanonPath,
    pub query: Option<String>,
}

impl Target {
    /// Is `raw` (a request header's target) this target, byte for byte? No allocation.
    pub fn is(&self, raw: &[u8]) -> bool {
        let p = self.path.path.as_bytes();
        match (raw.strip_prefix(p), &self.query) {
            (Some(rest), Some(q)) => rest.first() == Some(&b'?') && &rest[1..] == q.as_bytes(),
            (Some(rest), None) => rest.is_empty(),
            (None, _) => false,
        }
    }
}

/// The canonical target of a request header. `Err`: 400 with this message.
pub fn target(req: &RequestHeader) -> Result<Target, String> {
    if !req.raw_path_is_utf8() {
        return Err(path::PathError::InvalidUtf8.to_string());
    }
    // Pingora keeps only the path component in the URI of an absolute-form target (after
    // checking its authority against Host), so this is the path in every form.
    let path = path::canonicalize(req.uri.path().as_bytes()).map_err(|e| e.to_string())?;
    Ok(Target {
        path,
        query: req.uri.query().map(str::to_string),
    })
}

/// The authority of an absolute-form target (`http://host:port/path` → `host:port`).
pub fn target_authority(raw: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(raw).ok()?;
    let (scheme, rest) = s.split_once("://")?;
    if scheme.is_empty()
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    {
        return None;
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    (!authority.is_empty() && !authority.contains('@')).then_some(authority)
}

/// The target string a canonical request carries (`path[?query]`).
pub fn target_string(path: &str, query: Option<&str>) -> String {
    match query {
        Some(q) => {
            let mut s = String::with_capacity(path.len() + 1 + q.len());
            s.push_str(path);
            s.push('?');
            s.push_str(q);
            s
        }
        None => path.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn keepalive_is_bounded_by_the_limit() {
        use super::keepalive;
        // HTTP/1.1 default (Pingora: no idle limit) gets the configured one.
        assert_eq!(keepalive(Some(0), 75), Some(75));
        // A client asking for more gets the limit; for less, what it asked.
        assert_eq!(keepalive(Some(1_000_000), 75), Some(75));
        assert_eq!(keepalive(Some(5), 75), Some(5));
        // `Connection: close` / HTTP/1.0 without keep-alive stays closed.
        assert_eq!(keepalive(None, 75), None);
        // 0 turns keep-alive off for everyone.
        assert_eq!(keepalive(Some(0), 0), None);
        assert_eq!(keepalive(Some(30), 0), None);
    }

    use super::*;

    fn req(target: &str, headers: &[(&str, String)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", target.as_bytes(), None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), v.as_str()).unwrap();
        }
        r
    }

    #[test]
    fn header_limits() {
        let l = HeaderLimits {
            max_line: 100,
            max_total: 250,
            max_fields: 3,
        };
        assert!(check_header_limits(&req("/a", &[("x", "y".into())]), &l).is_ok());
        let long = "v".repeat(100);
        assert!(check_header_limits(&req("/a", &[("x", long)]), &l)
            .unwrap_err()
            .contains("header `x`"));
        let many: Vec<(&str, String)> = (0..4).map(|_| ("x", "y".to_string())).collect();
        assert!(check_header_limits(&req("/a", &many), &l)
            .unwrap_err()
            .contains("fields"));
        let total: Vec<(&str, String)> = ["a", "b", "c"]
            .iter()
            .map(|n| (*n, "v".repeat(90)))
            .collect();
        assert!(check_header_limits(&req("/a", &total), &l)
            .unwrap_err()
            .contains("request header is"));
        assert!(check_header_limits(&req(&format!("/{}", "a".repeat(100)), &[]), &l).is_err());
    }

    #[test]
    fn targets() {
        let t = target(&req("/a%20b/c?x=1&y", &[])).unwrap();
        assert_eq!(t.path.path, "/a%20b/c");
        assert_eq!(t.query.as_deref(), Some("x=1&y"));
        assert_eq!(target(&req("/a", &[])).unwrap().query, None);
        assert_eq!(target(&req("/a?", &[])).unwrap().query.as_deref(), Some(""));
        assert!(target(&req("/a/../b", &[]))
            .unwrap()
            .path
            .violations
            .first()
            .is_some());
        assert!(target(&req("/a%00", &[])).is_err());
        assert!(t.is(b"/a%20b/c?x=1&y"));
        assert!(!t.is(b"/a%20b/c?x=1"));
        assert!(!t.is(b"/a%20b/c"));
        let bare = target(&req("/a", &[])).unwrap();
        assert!(bare.is(b"/a") && !bare.is(b"/a?") && !bare.is(b"/ab"));
        assert_eq!(
            target_authority(b"http://h.example:8080/x?q"),
            Some("h.example:8080")
        );
        assert_eq!(target_authority(b"http://h.example?q"), Some("h.example"));
        assert_eq!(target_authority(b"/x"), None);
        assert_eq!(target_authority(b"http://u@h/x"), None);
        let abs = target(&req("http://h.example/x%20y?q", &[])).unwrap();
        assert_eq!(
            (abs.path.path.as_str(), abs.query.as_deref()),
            ("/x%20y", Some("q"))
        );
    }
}
