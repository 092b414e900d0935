//! `proxy_http_call`: a plugin's HTTP call to one of the config's origins, made while the
//! request that the plugin is filtering waits.
//!
//! The hostcall only validates and records the call ([`Call::parse`], pure). The phase that
//! made them then makes the calls concurrently ([`perform`]), each bounded by its timeout, by
//! each phase's whole wait (request or response headers: [`MAX_TIMEOUT`]) and by the plugin's `limits.body`, and delivers
//! each answer as it arrives with `proxy_on_http_call_response`. A call that fails (connect
//! error, timeout, an answer too large) is delivered the way Envoy delivers it: no headers,
//! no body.
//!
//! Why origins and not URLs (Envoy names a cluster, too): a plugin reaches only upstreams the
//! operator configured, so a plugin cannot be turned into an open proxy, and a call gets the
//! origin's address, TLS, timeouts, connection pool, path prefix and SigV4 signing. The
//! call's `:path` is a path inside that origin, like a request's object key; `:authority`
//! and `:scheme` are the origin's. A plugin may call only the origins in its `calls:` list,
//! and a read-only origin (a fallback, or `read_only`) takes only GET and HEAD calls.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderName, HeaderValue, Method};
use pingora_core::connectors::http::Connector;
use pingora_http::RequestHeader;

use super::Names;
use crate::metrics::METRICS;
use crate::origin::Origin;

/// The longest a call may take, whatever timeout the plugin asks for; also the longest a
/// request waits for all the calls of its plugins together.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);
/// Calls one plugin may dispatch for one request (bounds the fan-out and the rounds of calls
/// made from calls' answers).
pub const MAX_CALLS: u32 = 16;
/// Most bytes of a call's serialized headers.
pub const MAX_HEADER_BYTES: usize = 64 << 10;

/// How long an idle connection of a call is kept for the next call.
const POOL_IDLE: Duration = Duration::from_secs(60);

/// One call a plugin dispatched, validated.
#[derive(Debug)]
pub struct Call {
    pub token: u32,
    /// Index into the config's origins, and its name (checked again when the call is made).
    pub origin: usize,
    pub origin_name: String,
    pub method: Method,
    /// Path and query as the plugin gave them (`/...`).
    pub path: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
    pub timeout: Duration,
}

/// What `proxy_on_http_call_response` gets: the answer's headers (`:status` first) and body;
/// both empty when the call failed.
#[derive(Debug, Default)]
pub struct Answer {
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    pub body: Bytes,
}

/// Headers a call never forwards: the connection's own, the length (cascade sets it), and
/// `Expect` (the body is sent at once).
fn hop_by_hop(name: &HeaderName) -> bool {
    use http::header::*;
    [
        CONNECTION,
        TRANSFER_ENCODING,
        CONTENT_LENGTH,
        TE,
        UPGRADE,
        PROXY_AUTHORIZATION,
        HOST,
        EXPECT,
    ]
    .contains(name)
        || matches!(name.as_str(), "keep-alive" | "proxy-connection")
}

impl Call {
    /// Validates a `proxy_http_call`: `upstream` must name an origin the plugin may call
    /// (`allowed`: its `calls:` list), the headers must hold a valid `:method` and a `:path`
    /// starting with `/`, every other header must be valid. A timeout of 0 means the origin's
    /// read timeout; longer than [`MAX_TIMEOUT`] is cut to it. `Err`: why the call is a bad
    /// argument (the plugin gets `BAD_ARGUMENT`).
    pub fn parse(
        names: &Names,
        allowed: &[usize],
        token: u32,
        upstream: &[u8],
        headers: &[(&[u8], &[u8])],
        body: Vec<u8>,
        timeout_ms: u32,
    ) -> Result<Call, String> {
        let upstream_name = String::from_utf8_lossy(upstream);
        let origin = names
            .origins
            .iter()
            .position(|o| o.name.as_bytes() == upstream)
            .ok_or_else(|| format!("no origin named `{upstream_name}`"))?;
        if !allowed.contains(&origin) {
            return Err(format!(
                "origin `{upstream_name}` is not in the plugin's `calls:` list"
            ));
        }
        let (mut method, mut path) = (None, None);
        let mut regular = Vec::with_capacity(headers.len());
        for &(k, v) in headers {
            match k {
                b":method" => {
                    method = Some(
                        Method::from_bytes(v)
                            .map_err(|_| format!("invalid :method {:?}", lossy(v)))?,
                    )
                }
                b":path" => path = Some(v),
                _ if k.starts_with(b":") => {}
                _ => {
                    let name = HeaderName::from_bytes(k)
                        .map_err(|_| format!("invalid header name {:?}", lossy(k)))?;
                    let value = HeaderValue::from_bytes(v)
                        .map_err(|_| format!("invalid value of header {name}"))?;
                    if !hop_by_hop(&name) {
                        regular.push((name, value));
                    }
                }
            }
        }
        let method = method.ok_or("no :method header")?;
        let path = path.ok_or("no :path header")?;
        let path = std::str::from_utf8(path)
            .ok()
            .filter(|p| p.starts_with('/') && http::uri::PathAndQuery::try_from(*p).is_ok())
            .ok_or_else(|| format!(":path {:?} is not a path", lossy(path)))?;
        // The same canonical check as a client's path: a call cannot climb out of the
        // origin's path prefix (`/../other-bucket`) or confuse a resolving origin.
        let (p, q) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        let canon = crate::boundary::path::canonicalize(p.as_bytes())
            .map_err(|e| format!(":path {:?}: {e}", lossy(p.as_bytes())))?;
        if let Some(v) = canon.violations.first() {
            return Err(format!(
                ":path {:?} has {}",
                lossy(p.as_bytes()),
                v.describe()
            ));
        }
        let o = &names.origins[origin];
        let path = if o.signed {
            // cascade's credentials sign only what a client could have made them sign.
            let headers: http::HeaderMap = regular.iter().cloned().collect();
            let allowed = crate::boundary::s3::Allow::default();
            let q = crate::boundary::s3::check(&method, &canon.path, q, &headers, &allowed)
                .map_err(|r| format!(":path {:?}: {}", lossy(path.as_bytes()), r.message))?;
            crate::boundary::target_string(&canon.path, q.forward.as_deref())
        } else {
            crate::boundary::target_string(&canon.path, q)
        };
        if o.read_only && method != Method::GET && method != Method::HEAD {
            return Err(format!(
                "origin `{}` is read-only (a fallback, or read_only): {method} is not allowed",
                o.name
            ));
        }
        let timeout = match timeout_ms {
            0 => o.timeout,
            ms => Duration::from_millis(ms.into()),
        }
        .min(MAX_TIMEOUT);
        Ok(Call {
            token,
            origin,
            origin_name: o.name.clone(),
            method,
            path,
            headers: regular,
            body: Bytes::from(body),
            timeout,
        })
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Who makes a call: each has its own connector (and so its own connection pool), because a
/// pooled connection keeps being driven by the runtime that opened it, and the tick thread's
/// runtime must not carry the I/O of the proxy workers' calls.
#[derive(Clone, Copy)]
pub enum Caller {
    Request,
    Tick,
}

static REQUESTS: LazyLock<Connector> = LazyLock::new(|| Connector::new(None));
static TICKS: LazyLock<Connector> = LazyLock::new(|| Connector::new(None));

impl Caller {
    fn connector(self) -> &'static Connector {
        match self {
            Caller::Request => &REQUESTS,
            Caller::Tick => &TICKS,
        }
    }
}

/// Makes one call, bounded by its timeout and by `deadline` (the whole wait of the phase);
/// `max_body` bounds the answer's body; `plugin` names the caller in logs and metrics. A
/// failure is logged and answered as Envoy does: no headers, no body.
pub async fn perform(
    caller: Caller,
    origins: &[Origin],
    call: Call,
    max_body: usize,
    plugin: Arc<str>,
    deadline: Instant,
) -> (u32, Answer) {
    let token = call.token;
    let t0 = Instant::now();
    let Some(origin) = origins
        .get(call.origin)
        .filter(|o| o.name == call.origin_name)
    else {
        log::error!(target: "plugin", "[{plugin}] http call: origin `{}` is gone", call.origin_name);
        return (token, Answer::default());
    };
    let timeout = call.timeout.min(deadline.saturating_duration_since(t0));
    let connector = caller.connector();
    let r = tokio::time::timeout(
        timeout,
        perform_retrying(connector, origin, &call, max_body),
    )
    .await;
    let outcome = match &r {
        Ok(Ok(_)) => "ok",
        Ok(Err(_)) => "error",
        Err(_) => "timeout",
    };
    METRICS
        .plugin_http_calls
        .with_label_values(&[&plugin, outcome])
        .inc();
    METRICS
        .plugin_http_call_duration
        .with_label_values(&[&plugin])
        .observe(t0.elapsed().as_secs_f64());
    let answer = match r {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            log::warn!(target: "plugin", "[{plugin}] http call to origin `{}` failed: {e}", origin.name);
            Answer::default()
        }
        Err(_) => {
            log::warn!(
                target: "plugin",
                "[{plugin}] http call to origin `{}` timed out after {timeout:?}",
                origin.name
            );
            Answer::default()
        }
    };
    (token, answer)
}

/// A GET or HEAD that failed on a pooled connection before any answer came (the origin
/// closed it as it was reused) is made once more, as Pingora's proxy does.
async fn perform_retrying(
    connector: &Connector,
    origin: &Origin,
    call: &Call,
    max_body: usize,
) -> Result<Answer, String> {
    match perform_once(connector, origin, call, max_body).await {
        Err(Failure { retry: true, .. }) => perform_once(connector, origin, call, max_body).await,
        r => r,
    }
    .map_err(|f| f.why)
}

struct Failure {
    why: String,
    retry: bool,
}

impl Failure {
    fn at(why: impl std::fmt::Display) -> Failure {
        Failure {
            why: why.to_string(),
            retry: false,
        }
    }
}

/// One call over the shared connector: request written (origin rewrite and signing applied),
/// answer read whole (bounded), connection back to the pool when the answer was complete.
async fn perform_once(
    connector: &Connector,
    origin: &Origin,
    call: &Call,
    max_body: usize,
) -> Result<Answer, Failure> {
    let mut req = RequestHeader::build(call.method.clone(), b"/", Some(call.headers.len() + 3))
        .map_err(Failure::at)?;
    for (k, v) in &call.headers {
        req.append_header(k.clone(), v.clone())
            .map_err(Failure::at)?;
    }
    let (key, query) = match call.path.split_once('?') {
        Some((k, q)) => (k, Some(q)),
        None => (call.path.as_str(), None),
    };
    // A usable peer of the origin, as a request's first attempt would get (no retries on
    // other peers: the plugin sees the failure and decides).
    let peer_ix = origin
        .pick(key, 0)
        .ok_or_else(|| Failure::at(format!("origin `{}` has no usable peer", origin.name)))?;
    let target = &origin.peers[peer_ix];
    // The plugin chose these headers: it may send credentials, also to a fallback.
    let forward = crate::origin::Forward { credentials: true };
    target
        .rewrite(&mut req, key, query, forward)
        .map_err(Failure::at)?;
    let has_body = !call.body.is_empty();
    if has_body || !matches!(req.method, Method::GET | Method::HEAD | Method::DELETE) {
        req.insert_header(http::header::CONTENT_LENGTH, call.body.len())
            .map_err(Failure::at)?;
    }
    let peer = target.http_peer();
    let (mut s, reused) = connector
        .get_http_session(&*peer)
        .await
        .map_err(|e| Failure::at(format!("connect: {e}")))?;
    let idempotent = matches!(call.method, Method::GET | Method::HEAD);
    let before_answer = |e: pingora_error::BError| Failure {
        why: e.to_string(),
        retry: reused && idempotent,
    };
    s.write_request_header(Box::new(req))
        .await
        .map_err(before_answer)?;
    if has_body {
        s.write_request_body(call.body.clone(), true)
            .await
            .map_err(before_answer)?;
    }
    s.finish_request_body().await.map_err(before_answer)?;
    // Informational answers (100 Continue, 103 Early Hints) come before the real one.
    loop {
        s.read_response_header().await.map_err(before_answer)?;
        let status = s
            .response_header()
            .ok_or_else(|| Failure::at("no answer"))?
            .status;
        if status == http::StatusCode::SWITCHING_PROTOCOLS {
            return Err(Failure::at("the origin switched protocols"));
        }
        if !status.is_informational() {
            break;
        }
    }
    let resp = s
        .response_header()
        .ok_or_else(|| Failure::at("no answer"))?;
    let mut headers = Vec::with_capacity(resp.headers.len() + 1);
    headers.push((
        b":status".to_vec(),
        resp.status.as_str().as_bytes().to_vec(),
    ));
    headers.extend(
        resp.headers
            .iter()
            .map(|(k, v)| (k.as_str().as_bytes().to_vec(), v.as_bytes().to_vec())),
    );
    let mut body = BytesMut::new();
    while let Some(chunk) = s.read_response_body().await.map_err(Failure::at)? {
        if body.len() + chunk.len() > max_body {
            return Err(Failure::at(format!(
                "the answer's body is larger than the plugin's limits.body ({max_body} bytes)"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    if s.response_done() {
        connector
            .release_http_session(s, &*peer, Some(POOL_IDLE))
            .await;
    }
    Ok(Answer {
        headers,
        body: body.freeze(),
    })
}

#[cfg(test)]
mod tests {
    use super::super::CallTarget;
    use super::*;

    fn names() -> Names {
        Names {
            origins: vec![
                CallTarget {
                    name: "authsvc".into(),
                    read_only: false,
                    timeout: Duration::from_secs(5),
                    signed: false,
                },
                CallTarget {
                    name: "archive".into(),
                    read_only: true,
                    timeout: Duration::from_secs(5),
                    signed: false,
                },
                CallTarget {
                    name: "bucket".into(),
                    read_only: false,
                    timeout: Duration::from_secs(5),
                    signed: true,
                },
            ],
            ..Default::default()
        }
    }

    fn parse(up: &str, h: &[(&str, &str)], ms: u32) -> Result<Call, String> {
        let pairs: Vec<(&[u8], &[u8])> = h
            .iter()
            .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
            .collect();
        Call::parse(
            &names(),
            &[0, 1, 2],
            7,
            up.as_bytes(),
            &pairs,
            Vec::new(),
            ms,
        )
    }

    #[test]
    fn calls_are_held_to_the_clients_rules() {
        let call = |p: &str| parse("authsvc", &[(":method", "GET"), (":path", p)], 0);
        // A call cannot climb out of the origin's path prefix.
        for bad in ["/a/../other/x", "//x", "/a%2fb", "/a%00"] {
            assert!(call(bad).is_err(), "{bad}");
        }
        assert_eq!(call("/a%20b?x=1").unwrap().path, "/a%20b?x=1");
        // A signed origin: no sub-resource, no bucket, other parameters dropped.
        let signed = |m: &str, p: &str| parse("bucket", &[(":method", m), (":path", p)], 0);
        assert!(signed("GET", "/k?acl").unwrap_err().contains("acl"));
        assert!(signed("GET", "/").is_err());
        assert!(signed("PUT", "/k").unwrap().path == "/k");
        assert_eq!(signed("GET", "/k?v=1").unwrap().path, "/k");
        let h = [
            (":method", "PUT"),
            (":path", "/k"),
            ("x-amz-copy-source", "b/o"),
        ];
        assert!(parse("bucket", &h, 0).is_err());
    }

    #[test]
    fn a_call_names_an_origin_a_method_and_a_path() {
        let c = parse(
            "authsvc",
            &[
                (":method", "POST"),
                (":path", "/check?x=1"),
                (":authority", "ignored"),
                ("x-token", "abc"),
                ("connection", "close"),
                ("content-length", "99"),
                ("expect", "100-continue"),
            ],
            250,
        )
        .unwrap();
        assert_eq!((c.token, c.origin, c.method.as_str()), (7, 0, "POST"));
        assert_eq!(c.path, "/check?x=1");
        assert_eq!(c.timeout, Duration::from_millis(250));
        let names: Vec<&str> = c.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            ["x-token"],
            "pseudo and hop-by-hop headers are not forwarded"
        );
    }

    #[test]
    fn bad_calls_say_why() {
        let ok = [(":method", "GET"), (":path", "/")];
        let e = |r: Result<Call, String>| r.unwrap_err();
        assert!(e(parse("nope", &ok, 0)).contains("no origin named `nope`"));
        assert!(e(parse("authsvc", &[(":path", "/")], 0)).contains(":method"));
        assert!(e(parse("authsvc", &[(":method", "GET")], 0)).contains(":path"));
        assert!(
            e(parse("authsvc", &[(":method", "GET"), (":path", "x")], 0)).contains("not a path")
        );
        assert!(e(parse("authsvc", &[(":method", "G T"), (":path", "/")], 0)).contains(":method"));
        assert!(e(parse(
            "authsvc",
            &[(":method", "GET"), (":path", "/"), ("bad name", "v")],
            0
        ))
        .contains("header name"));
        assert!(
            e(parse("archive", &[(":method", "PUT"), (":path", "/")], 0)).contains("read-only")
        );
        assert!(
            parse("archive", &ok, 0).is_ok(),
            "GET on a read-only origin is fine"
        );
    }

    #[test]
    fn timeouts_default_to_the_origin_and_are_capped() {
        let ok = [(":method", "GET"), (":path", "/")];
        assert_eq!(
            parse("authsvc", &ok, 0).unwrap().timeout,
            Duration::from_secs(5)
        );
        assert_eq!(
            parse("authsvc", &ok, u32::MAX).unwrap().timeout,
            MAX_TIMEOUT
        );
    }
}
