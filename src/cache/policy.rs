//! Cacheability and freshness of a response: pure, from its headers and the route's rules.
//!
//! - `Cache-Control: no-store` / `private` → not cached; `no-cache` → stored but stale at once
//!   (revalidated on every use); `s-maxage` > `max-age` > `Expires` > the route's default TTL.
//! - `404`/`410` (the final answer, after every fallback) → cached for `negative_ttl`, so a
//!   missing object costs no origin round-trips while it stays missing.
//! - Only 200, 203, 301, 308, 404 and 410 are stored; everything else passes through.
//! - Stale windows: the origin's `stale-while-revalidate` / `stale-if-error`, else the
//!   configured defaults; `no-cache`, `must-revalidate`, `proxy-revalidate` and `s-maxage`
//!   forbid serving stale (RFC 9111 §4.2.4, §5.2.2: a shared cache must revalidate them).
//! - `Set-Cookie` is a per-user answer: not stored, unless the route strips the header from
//!   the stored copy (`cache.set_cookie: strip`).
//! - `Vary: *` is never cached; a `Content-Length` above `max_object_size` is not either.

use std::time::{Duration, SystemTime};

use pingora_cache::cache_control::{CacheControl, InterpretCacheControl};
use pingora_cache::{CacheMeta, NoCacheReason, RespCacheable};
use pingora_http::ResponseHeader;

use super::CacheConfig;

/// The per-request inputs the decision needs besides the response.
pub struct Inputs<'a> {
    pub config: &'a CacheConfig,
    /// The route's default TTL, when it overrides the global one.
    pub route_ttl: Option<Duration>,
    pub set_cookie: crate::config::schema::SetCookie,
    pub now: SystemTime,
}

pub fn decide(resp: &ResponseHeader, i: &Inputs) -> RespCacheable {
    use RespCacheable::*;
    let status = resp.status.as_u16();
    if !matches!(status, 200 | 203 | 301 | 308 | 404 | 410) {
        return Uncacheable(NoCacheReason::Custom("status"));
    }
    if resp.headers.get_all(http::header::VARY).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|p| p.trim_ascii() == b"*")
    }) {
        return Uncacheable(NoCacheReason::Custom("vary *"));
    }
    if let Some(len) = resp
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > i.config.max_object_size {
            return Uncacheable(NoCacheReason::ResponseTooLarge);
        }
    }
    let cc = CacheControl::from_resp_headers(resp);
    if let Some(cc) = &cc {
        if cc.no_store() || cc.private() {
            return Uncacheable(NoCacheReason::OriginNotCache);
        }
    }
    let cookie = resp.headers.contains_key(http::header::SET_COOKIE);
    if cookie && i.set_cookie == crate::config::schema::SetCookie::Pass {
        return Uncacheable(NoCacheReason::Custom("set-cookie"));
    }
    let negative = matches!(status, 404 | 410);
    let ttl = if negative {
        // The negative TTL bounds how long a miss is remembered; it never makes an answer
        // fresher than the origin said (`no-cache`, `max-age=0`: not stored).
        let origin = if cc.as_ref().is_some_and(|c| c.no_cache()) {
            Some(Duration::ZERO)
        } else if let Some(d) = cc.as_ref().and_then(|c| c.fresh_duration()) {
            Some(d)
        } else {
            pingora_cache::filters::calculate_expires_header_time(resp)
                .map(|t| t.duration_since(i.now).unwrap_or(Duration::ZERO))
        };
        origin.map_or(i.config.negative_ttl, |d| d.min(i.config.negative_ttl))
    } else if cc.as_ref().is_some_and(|c| c.no_cache()) {
        Duration::ZERO
    } else if let Some(d) = cc.as_ref().and_then(|c| c.fresh_duration()) {
        d
    } else if let Some(t) = pingora_cache::filters::calculate_expires_header_time(resp) {
        t.duration_since(i.now).unwrap_or(Duration::ZERO)
    } else {
        i.route_ttl.unwrap_or(i.config.default_ttl)
    };
    if ttl.is_zero() && negative {
        return Uncacheable(NoCacheReason::Custom("negative caching off"));
    }
    let fresh_until = if ttl.is_zero() {
        // Stored but already stale: every use revalidates.
        i.now - Duration::from_secs(1)
    } else {
        i.now + ttl
    };
    let no_stale = cc.as_ref().is_some_and(|c| {
        c.has_key("must-revalidate")
            || c.has_key("proxy-revalidate")
            || c.has_key("no-cache")
            || c.has_key("s-maxage")
    });
    let secs = |d: Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
    let (swr, sie) = if no_stale || negative {
        (0, 0)
    } else {
        (
            cc.as_ref()
                .and_then(|c| c.serve_stale_while_revalidate_duration())
                .map_or(secs(i.config.stale_while_revalidate), secs),
            cc.as_ref()
                .and_then(|c| c.serve_stale_if_error_duration())
                .map_or(secs(i.config.stale_if_error), secs),
        )
    };
    let mut header = resp.clone();
    if let Some(cc) = &cc {
        cc.strip_private_headers(&mut header);
    }
    if cookie {
        header.remove_header(&http::header::SET_COOKIE);
    }
    Cacheable(CacheMeta::new(fresh_until, i.now, swr, sie, header))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> CacheConfig {
        CacheConfig {
            default_ttl: Duration::from_secs(3600),
            negative_ttl: Duration::from_secs(10),
            stale_if_error: Duration::from_secs(300),
            stale_while_revalidate: Duration::from_secs(0),
            max_object_size: 1000,
            ..CacheConfig::for_tests()
        }
    }

    fn resp(status: u16, headers: &[(&str, &str)]) -> ResponseHeader {
        let mut r = ResponseHeader::build(status, None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    fn ttl(r: &ResponseHeader) -> Option<i64> {
        let c = cfg();
        let now = SystemTime::now();
        match decide(
            r,
            &Inputs {
                config: &c,
                route_ttl: None,
                set_cookie: Default::default(),
                now,
            },
        ) {
            RespCacheable::Cacheable(m) => Some(
                m.fresh_until()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_secs() as i64
                    - now
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap()
                        .as_secs() as i64,
            ),
            RespCacheable::Uncacheable(_) => None,
        }
    }

    #[test]
    fn cache_control_rules() {
        assert_eq!(ttl(&resp(200, &[])), Some(3600), "default ttl");
        assert_eq!(
            ttl(&resp(200, &[("cache-control", "max-age=60")])),
            Some(60)
        );
        assert_eq!(
            ttl(&resp(200, &[("cache-control", "max-age=60, s-maxage=120")])),
            Some(120)
        );
        assert_eq!(ttl(&resp(200, &[("cache-control", "no-store")])), None);
        assert_eq!(ttl(&resp(200, &[("cache-control", "private")])), None);
        assert!(ttl(&resp(200, &[("cache-control", "no-cache")])).unwrap() <= 0);
        assert_eq!(ttl(&resp(404, &[])), Some(10), "negative ttl");
        assert_eq!(
            ttl(&resp(404, &[("cache-control", "max-age=3")])),
            Some(3),
            "never fresher than the origin says"
        );
        assert_eq!(
            ttl(&resp(404, &[("cache-control", "max-age=600")])),
            Some(10)
        );
        assert_eq!(ttl(&resp(404, &[("cache-control", "no-cache")])), None);
        assert_eq!(
            ttl(&resp(
                410,
                &[("cache-control", "max-age=0, must-revalidate")]
            )),
            None
        );
        assert_eq!(ttl(&resp(500, &[])), None);
        assert_eq!(ttl(&resp(206, &[])), None);
        assert_eq!(ttl(&resp(200, &[("vary", "*")])), None);
        assert_eq!(ttl(&resp(200, &[("content-length", "1001")])), None);
        let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(60));
        assert!(ttl(&resp(200, &[("expires", past.as_str())])).unwrap() <= 0);
    }

    #[test]
    fn stale_windows() {
        let c = cfg();
        let now = SystemTime::now();
        let i = Inputs {
            config: &c,
            route_ttl: None,
            set_cookie: Default::default(),
            now,
        };
        let RespCacheable::Cacheable(m) = decide(
            &resp(
                200,
                &[("cache-control", "max-age=1, stale-while-revalidate=30")],
            ),
            &i,
        ) else {
            panic!()
        };
        let after = |s: u64| m.fresh_until() + Duration::from_secs(s);
        assert!(m.serve_stale_while_revalidate(after(29)));
        assert!(!m.serve_stale_while_revalidate(after(31)));
        assert!(m.serve_stale_if_error(after(299)));
        assert!(!m.serve_stale_if_error(after(301)));
        let RespCacheable::Cacheable(m) = decide(
            &resp(200, &[("cache-control", "max-age=1, must-revalidate")]),
            &i,
        ) else {
            panic!()
        };
        assert!(!m.serve_stale_if_error(m.fresh_until() + Duration::from_secs(1)));
        // RFC 9111: a shared cache never serves these stale, whatever the defaults say.
        for cc in ["no-cache", "s-maxage=1", "proxy-revalidate, max-age=1"] {
            let RespCacheable::Cacheable(m) = decide(&resp(200, &[("cache-control", cc)]), &i)
            else {
                panic!("{cc}")
            };
            let later = m.fresh_until() + Duration::from_secs(1);
            assert!(!m.serve_stale_if_error(later), "{cc}");
            assert!(!m.serve_stale_while_revalidate(later), "{cc}");
        }
    }

    #[test]
    fn set_cookie_is_never_stored_for_others() {
        let c = cfg();
        let r = resp(
            200,
            &[("set-cookie", "session=abc"), ("content-type", "image/png")],
        );
        let mut i = Inputs {
            config: &c,
            route_ttl: None,
            set_cookie: crate::config::schema::SetCookie::Pass,
            now: SystemTime::now(),
        };
        assert!(matches!(decide(&r, &i), RespCacheable::Uncacheable(_)));
        i.set_cookie = crate::config::schema::SetCookie::Strip;
        let RespCacheable::Cacheable(m) = decide(&r, &i) else {
            panic!()
        };
        assert!(!m.response_header().headers.contains_key("set-cookie"));
        assert!(m.response_header().headers.contains_key("content-type"));
    }
}
