//! The Pingora `ProxyHttp` implementation. Each phase is a few lines that delegate to the
//! pure modules: `admit` (route, limits, local answers), `fallback` (the attempt plan),
//! `origin` (peer, rewrite, signing) and `metrics`.
//!
//! Fallback replay rides on Pingora's retry loop: when the answer to attempt k is in the
//! group's `fallback_on`, `upstream_response_filter` returns a retryable error before a
//! single byte went downstream; Pingora then calls `upstream_peer` again, which hands out
//! attempt k+1. That mechanism is confined to [`replay_error`] and [`Cascade::error_while_proxy`]
//! so it can move to a dedicated upstream hook when Pingora grows one (pingora #872/#873).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use pingora_cache::key::{CacheHashKey, CacheKey, HashBinary};
use pingora_cache::{
    CacheMeta, CachePhase, ForcedFreshness, HitHandler, NoCacheReason, RespCacheable,
};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, RangeType, Session};

use crate::admit::{self, Admission, LocalResponse, RequestFacts};
use crate::attempt::{Attempts, Current, Failure, Rules};
use crate::boundary;
use crate::buckets;
use crate::cache::{self, slice, Cache};
use crate::config::{CacheFallback, GroupConfig};
use crate::fallback::{Plan, Role};
use crate::metrics::{self, METRICS};
use crate::origin::Origin;
use crate::plugin;
use crate::route::Router;

pub const SERVED_FROM: &str = "x-served-from";
pub const SERVED_ROLE: &str = "x-served-from-role";
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// Everything a request needs from the config, built once per config generation.
pub struct State {
    pub router: Router,
    pub groups: Vec<GroupConfig>,
    pub origins: Arc<[Origin]>,
    pub access_log: bool,
    /// Bounds on client request headers (431 over them).
    pub header_limits: crate::config::schema::HeaderLimits,
    /// `server.keepalive_timeout` in seconds (0: no keep-alive).
    pub keepalive_secs: u64,
    pub cache: Option<&'static Cache>,
    /// Wasm plugins (`None`: the config has none).
    pub plugins: Option<Arc<plugin::Runtime>>,
    /// Bucket sets, by group.
    pub sets: Arc<buckets::Sets>,
    /// What every finished request counts and times, by route and origin index (the series
    /// found without shared locks: metrics/requests.rs).
    pub request_metrics: metrics::RequestMetrics,
}

impl State {
    /// The most attempts any request can make: every origin of the longest plan, each with
    /// its retries on other peers.
    pub fn max_attempts(&self) -> usize {
        self.groups
            .iter()
            .map(|g| {
                let mains: Vec<usize> = match &g.set {
                    Some(s) => s.members.iter().map(|m| m.origin).collect(),
                    None => vec![g.main],
                };
                mains
                    .into_iter()
                    .chain(g.fallbacks.iter().copied())
                    .map(|o| 1 + self.origins[o].retries as usize)
                    .sum::<usize>()
            })
            .max()
            .unwrap_or(1)
    }
}

pub struct Cascade {
    pub state: Arc<State>,
}

/// Per-request state.
pub struct Ctx {
    start: Instant,
    req: Option<admit::Admitted>,
    /// The walk over the plan's origins and their peers (`attempt`).
    attempts: Attempts,
    /// No peer could answer: the 503's `Retry-After`.
    no_peer: Option<u64>,
    /// Set between a replay decision and Pingora's retry: the error is ours, retry it.
    replay_pending: bool,
    attempt_start: Option<Instant>,
    /// The attempt whose answer went to the client.
    served: Option<Current>,
    body_bytes: u64,
    /// The error kind already counted for this attempt (avoid double counting).
    error_counted: bool,
    replays: u8,
    /// The cache was enabled for this request (a lookup happened).
    cache_enabled: bool,
    /// The request is served from one slice of the object.
    slice: Option<slice::SliceReq>,
    /// The normal `Accept-Encoding` of a cacheable request (`cache::vary`): what the origin
    /// is asked with and what the variance is keyed by.
    accept_encoding: Option<&'static str>,
    /// The origin ignored a slice's Range (answered 200): do not store it.
    slice_refused: bool,
    /// The final `X-Cache` value, once the response header is known.
    pub cache_status: Option<&'static str>,
    /// Taken when the request goes upstream on a miss or to revalidate: its answer is stored
    /// only if no write or purge of the object came in between (`cache::storage::Ticket`).
    fill_ticket: Option<cache::storage::Ticket>,
    /// The request's plugin chain state (instances leased until `logging`).
    plugins: Option<plugin::Exchange>,
    /// The response header as the plugins left it, for their body callbacks' properties
    /// (kept only when a plugin of the chain takes bodies).
    plugin_resp: Option<ResponseHeader>,
    /// A request through a bucket set: its members and its write's bookkeeping.
    set: Option<buckets::SetCtx>,
    /// Set by the attempt's connector when cascade's pool (`origin::pool`) handed it a kept
    /// connection, which Pingora sees as new: an error on it may be the origin having closed
    /// it, as on one from Pingora's pool.
    conn_from_pool: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl Ctx {
    fn mains(&self) -> Option<crate::fallback::Mains> {
        self.set.as_ref().map(|s| s.order)
    }

    fn plan<'a>(&self, state: &'a State, method: &http::Method) -> Option<Plan<'a>> {
        self.req
            .as_ref()
            .map(|r| Plan::new(&state.groups[r.group], method, self.mains()))
    }
}

const REPLAY: ErrorType = ErrorType::Custom("FallbackReplay");
const TOTAL_TIMEOUT: ErrorType = ErrorType::Custom("TotalTimeout");

/// The error that makes Pingora replay the request to the next fallback.
fn replay_error(status: u16) -> Box<Error> {
    let mut e = Error::explain(
        REPLAY,
        format!("origin answered {status}; replaying to the next fallback"),
    );
    e.set_retry(true);
    e.esource = ErrorSource::Upstream;
    e
}

/// The error that makes Pingora try a `retry_on` status again, on another peer or origin.
fn retry_error(status: u16) -> Box<Error> {
    let mut e = Error::explain(
        REPLAY,
        format!("origin answered {status}; trying another peer"),
    );
    e.set_retry(true);
    e.esource = ErrorSource::Upstream;
    e
}

/// A short, fixed name for an upstream failure, for metrics and logs.
pub fn error_kind(e: &Error) -> &'static str {
    use ErrorType::*;
    match e.etype() {
        ConnectTimedout => "connect_timeout",
        ConnectRefused => "connect_refused",
        ConnectNoRoute | BindError | SocketError | ConnectError => "connect_error",
        TLSHandshakeFailure | TLSHandshakeTimedout | InvalidCert | HandshakeError => "tls",
        ReadTimedout | WriteTimedout => "timeout",
        ConnectionClosed | ReadError | WriteError => "reset",
        InvalidHTTPHeader | H1Error | H2Error | InvalidH2 | H2Downgrade => "protocol",
        e if *e == TOTAL_TIMEOUT => "timeout",
        HTTPStatus(503) => "no_peer",
        _ => "other",
    }
}

/// The status a failed request gets: 504 for timeouts, 502 for other upstream failures,
/// 400 for a malformed request, 500 for our own faults.
pub fn error_status(e: &Error) -> u16 {
    if let ErrorType::HTTPStatus(code) = e.etype() {
        return *code;
    }
    match e.esource() {
        ErrorSource::Upstream => match error_kind(e) {
            "connect_timeout" | "timeout" => 504,
            _ => 502,
        },
        ErrorSource::Downstream => match e.etype() {
            ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
            ErrorType::ReadTimedout => 408,
            _ => 400,
        },
        _ => match e.etype() {
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout => 504,
            ErrorType::ConnectRefused | ErrorType::ConnectNoRoute | ErrorType::ConnectError => 502,
            _ => 500,
        },
    }
}

/// The error is the origin's doing (it could not be reached, timed out, broke the
/// connection), not the client's or cascade's.
fn member_failure(e: &Error) -> bool {
    !matches!(e.etype(), ErrorType::HTTPStatus(_))
        && (e.esource() == &ErrorSource::Upstream
            || matches!(
                e.etype(),
                ErrorType::ConnectTimedout
                    | ErrorType::ConnectRefused
                    | ErrorType::ConnectNoRoute
                    | ErrorType::ConnectError
                    | ErrorType::TLSHandshakeFailure
            ))
}

fn group_name<'a>(state: &'a State, req: &admit::Admitted) -> &'a str {
    &state.groups[req.group].name
}

/// The host a request is routed on: `Host`, else the authority of an absolute-form target.
fn request_host(req: &RequestHeader) -> Option<&str> {
    req.headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri.host())
}

/// A local answer to a request whose body was not read (an upload refused before its body):
/// the connection is closed, not drained. Draining would wait for a body that an
/// `Expect: 100-continue` client never sends, and read its next request as this one's body.
pub(crate) fn close_unless_body_read(
    session: &mut Session,
    resp: &mut ResponseHeader,
) -> Result<()> {
    if !session.is_body_done() {
        session.set_keepalive(None);
        resp.insert_header(http::header::CONNECTION, "close")?;
    }
    Ok(())
}

async fn respond_local(session: &mut Session, r: &LocalResponse) -> Result<()> {
    respond_local_with(session, r, None, &[]).await
}

/// [`respond_local`], with the request's response-phase plugins run on the answer (their
/// HTTP calls go to `origins`).
async fn respond_local_with(
    session: &mut Session,
    r: &LocalResponse,
    plugins: Option<&mut plugin::Exchange>,
    origins: &[Origin],
) -> Result<()> {
    let mut resp = ResponseHeader::build(r.status, Some(4))?;
    resp.insert_header(
        http::header::CONTENT_TYPE,
        r.content_type.unwrap_or("text/plain; charset=utf-8"),
    )?;
    resp.insert_header(http::header::CONTENT_LENGTH, r.body.len())?;
    if let Some(allow) = r.allow {
        resp.insert_header(http::header::ALLOW, allow)?;
    }
    if let Some(secs) = r.retry_after {
        resp.insert_header(http::header::RETRY_AFTER, secs)?;
    }
    if matches!(r.status, 400 | 413 | 431) || session.get_keepalive().is_none() {
        // A malformed or oversized request, or an error Pingora will not reuse the
        // connection after: never read another on this connection, and say so.
        session.set_keepalive(None);
        resp.insert_header(http::header::CONNECTION, "close")?;
    } else {
        close_unless_body_read(session, &mut resp)?;
    }
    if let Some(ex) = plugins {
        plugin::on_response(ex, session.req_header(), &mut resp, origins).await;
    }
    let head_only = session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(resp), head_only)
        .await?;
    if !head_only {
        session
            .write_response_body(Some(Bytes::from(r.body.clone())), true)
            .await?;
    }
    Ok(())
}

/// How `request_filter` ends when the request does not go on.
enum Answer {
    Local(LocalResponse),
    Plugin(plugin::LocalReply),
}

impl Cascade {
    /// The trust boundary and admission (see `boundary`): header limits, the canonical
    /// target, the route, the plugin chain, the final checks. `Ok`: `ctx.req` is set and the
    /// request goes on.
    async fn admit(&self, session: &mut Session, ctx: &mut Ctx) -> std::result::Result<(), Answer> {
        let req = session.req_header();
        boundary::check_header_limits(req, &self.state.header_limits)
            .map_err(|m| Answer::Local(LocalResponse::new(431, format!("cascade: {m}\n"))))?;
        let target = boundary::target(req)
            .map_err(|m| Answer::Local(LocalResponse::new(400, format!("cascade: {m}\n"))))?;
        if !req.headers.contains_key(http::header::HOST) {
            // An absolute-form target without Host (HTTP/1.0): its authority is the host
            // (RFC 9112 §3.2.2); Pingora has checked a Host against it when there is one.
            if let Some(authority) = boundary::target_authority(req.raw_path()) {
                let authority = authority.to_string();
                session
                    .req_header_mut()
                    .insert_header(http::header::HOST, authority)
                    .map_err(|_| {
                        Answer::Local(LocalResponse::new(400, "cascade: bad authority\n"))
                    })?;
            }
        }
        let req = session.req_header();
        // Plugins, Pingora's logs and the access log see the canonical target from here on.
        if !target.is(req.raw_path()) {
            let canonical = boundary::target_string(&target.path.path, target.query.as_deref());
            let uri = http::Uri::try_from(canonical).map_err(|e| {
                Answer::Local(LocalResponse::new(
                    400,
                    format!("cascade: bad target: {e}\n"),
                ))
            })?;
            session.req_header_mut().set_uri(uri);
        }
        let req = session.req_header();
        let facts = RequestFacts {
            method: &req.method,
            host: request_host(req),
            target: &target,
            content_length: req
                .headers
                .get(http::header::CONTENT_LENGTH)
                .map(|v| v.as_bytes()),
        };
        let mut a = match admit::admit(&self.state.router, &self.state.groups, &facts) {
            Admission::Proxy(a) => a,
            Admission::Local(r) => return Err(Answer::Local(r)),
        };
        if let Some(rt) = self.state.plugins.as_deref() {
            let (exchange, verdict) =
                plugin::on_request(rt, session, &mut a, &self.state.origins).await;
            ctx.plugins = exchange;
            let stop = match verdict {
                plugin::Verdict::Continue => None,
                plugin::Verdict::Reply(r) => Some(Answer::Plugin(r)),
                plugin::Verdict::Fail(status, body) => {
                    Some(Answer::Local(LocalResponse::new(status, body)))
                }
            };
            if let Some(answer) = stop {
                ctx.req = Some(a); // for the route's metrics
                return Err(answer);
            }
            let req = session.req_header();
            if !target.is(req.raw_path()) {
                // A plugin rewrote `:path` (e.g. auth dropping its signed-URL parameters).
                if req.raw_path().len() as u64 > self.state.header_limits.max_line {
                    ctx.req = Some(a);
                    return Err(Answer::Local(LocalResponse::new(
                        500,
                        "cascade: a plugin set a `:path` longer than server.header_limits.max_line\n",
                    )));
                }
                let key_set = a.key_from_plugin;
                if let Err(m) = admit::readmit_path(
                    &self.state.router,
                    &mut a,
                    request_host(req),
                    boundary::target(req),
                    key_set,
                ) {
                    log::warn!("{m}");
                    return Err(Answer::Local(LocalResponse::new(
                        500,
                        format!("cascade: {m}\n"),
                    )));
                }
            }
        }
        let req = session.req_header();
        let done = admit::finalize(
            &mut a,
            self.state.router.routes(),
            &self.state.groups,
            &req.method,
            &req.headers,
        );
        ctx.req = Some(a);
        done.map_err(Answer::Local)
    }

    /// A request through a bucket set: which members it goes to and, for a write, its
    /// reservation (`buckets`). `Err`: answered here.
    async fn plan_set(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
    ) -> std::result::Result<(), LocalResponse> {
        let Some(req) = ctx.req.as_ref() else {
            return Ok(());
        };
        let Some(set) = self.state.sets.get(req.group) else {
            return Ok(());
        };
        // Neither Content-Length nor chunked (HTTP/1.1), or END_STREAM on the headers (h2):
        // the body is empty, its size known.
        let empty = session.is_body_empty();
        let h = session.req_header();
        let length = h
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok())
            .or(empty.then_some(0));
        // An aws-chunked body (the only streaming payload cascade forwards) is larger than
        // its object: the object's size is declared apart.
        let decoded = h
            .headers
            .get("x-amz-content-sha256")
            .is_some_and(|v| v.as_bytes().starts_with(b"STREAMING-"))
            .then(|| h.headers.get("x-amz-decoded-content-length"))
            .flatten()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let route = &self.state.router.routes()[req.route];
        let mut sc = set
            .prepare(
                &self.state.origins,
                &h.method,
                &req.key,
                req.query.as_deref(),
                length,
                route,
            )
            .await?;
        if let Some(d) = decoded {
            sc.object_size(d);
        }
        ctx.set = Some(sc);
        Ok(())
    }

    /// The origin of the attempt in flight (else of the plan's current step).
    fn origin_for(&self, ctx: &Ctx, method: &http::Method) -> Option<(&Origin, Role)> {
        if let Some(c) = ctx.attempts.current {
            return Some((&self.state.origins[c.origin], c.role));
        }
        let (ix, role) = ctx.plan(&self.state, method)?.origin(ctx.attempts.step)?;
        Some((&self.state.origins[ix], role))
    }

    /// What the request allows its attempts (`attempt::Rules`).
    fn rules<'a>(&'a self, ctx: &Ctx, method: &http::Method) -> Option<Rules<'a>> {
        let req = ctx.req.as_ref()?;
        let group = &self.state.groups[req.group];
        Some(Rules {
            plan: Plan::new(group, method, ctx.mains()),
            group,
            read: matches!(*method, http::Method::GET | http::Method::HEAD),
        })
    }

    /// The attempt in flight failed with `f`: `true` when Pingora should try again (the
    /// attempt walk has moved to another peer or origin).
    fn attempt_failed(&self, ctx: &mut Ctx, method: &http::Method, f: Failure) -> bool {
        let Some(rules) = self.rules(ctx, method) else {
            return false;
        };
        ctx.attempts.failed(f, &self.state.origins, rules)
    }

    fn take_fill_ticket(&self, ctx: &mut Ctx) {
        if let (Some(cache), Some(req), None) =
            (self.state.cache, ctx.req.as_ref(), ctx.fill_ticket.as_ref())
        {
            let object = cache::object_key(group_name(&self.state, req), &req.key);
            ctx.fill_ticket = Some(cache.storage.ticket(&object));
        }
    }

    /// The `cache::SliceVersions` key of a slice request.
    fn slice_version_key(&self, ctx: &Ctx) -> Option<cache::Hash> {
        ctx.slice.filter(|s| !s.head)?;
        let req = ctx.req.as_ref()?;
        Some(cache::SliceVersions::key(
            group_name(&self.state, req),
            &req.key,
            req.query.as_deref(),
            ctx.accept_encoding.unwrap_or("identity"),
        ))
    }

    fn count_error(&self, ctx: &mut Ctx, method: &http::Method, e: &Error) {
        if ctx.error_counted || *e.etype() == REPLAY {
            return;
        }
        if let Some((origin, _)) = self.origin_for(ctx, method) {
            ctx.error_counted = true;
            METRICS
                .upstream_errors
                .with_label_values(&[origin.name.as_str(), error_kind(e)])
                .inc();
        }
    }
}

#[async_trait]
impl ProxyHttp for Cascade {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            start: Instant::now(),
            req: None,
            attempts: Attempts::default(),
            no_peer: None,
            replay_pending: false,
            attempt_start: None,
            served: None,
            body_bytes: 0,
            error_counted: false,
            replays: 0,
            cache_enabled: false,
            slice: None,
            accept_encoding: None,
            slice_refused: false,
            cache_status: None,
            fill_ticket: None,
            plugins: None,
            plugin_resp: None,
            set: None,
            conn_from_pool: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        // Pingora sets the client's own keep-alive wish when it reads the header: bound it.
        let keepalive = boundary::keepalive(session.get_keepalive(), self.state.keepalive_secs);
        session.set_keepalive(keepalive);
        let admitted = match self.admit(session, ctx).await {
            Ok(()) => self.plan_set(session, ctx).await.map_err(Answer::Local),
            Err(a) => Err(a),
        };
        match admitted {
            Ok(()) => Ok(false),
            Err(Answer::Local(r)) => {
                respond_local(session, &r).await?;
                Ok(true)
            }
            Err(Answer::Plugin(r)) => {
                plugin::write_reply(session, &r).await?;
                Ok(true)
            }
        }
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(ex) = ctx.plugins.as_mut().filter(|ex| ex.wants_bodies()) {
            ex.body(false, session.req_header(), None, body, end_of_stream)
                .map_err(|(status, m)| Error::explain(ErrorType::HTTPStatus(status), m))?;
        }
        if let (Some(b), true) = (body.as_ref(), ctx.set.is_some()) {
            if ctx.req.as_ref().is_some_and(|r| r.upload_limit.is_none()) {
                // A set's write counts its body for the books.
                ctx.body_bytes += b.len() as u64;
            }
        }
        if let (Some(b), Some(limit)) =
            (body.as_ref(), ctx.req.as_ref().and_then(|r| r.upload_limit))
        {
            ctx.body_bytes += b.len() as u64;
            if ctx.body_bytes > limit {
                return Error::e_explain(
                    ErrorType::HTTPStatus(413),
                    format!("request body exceeds the route's limit of {limit} bytes"),
                );
            }
        }
        Ok(())
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        ctx.replay_pending = false;
        ctx.error_counted = false;
        ctx.conn_from_pool = None;
        ctx.attempt_start = Some(Instant::now());
        let Some(rules) = self.rules(ctx, &session.req_header().method) else {
            return Error::e_explain(ErrorType::InternalError, "no origin for this attempt");
        };
        let key = &ctx.req.as_ref().expect("admitted").key;
        match ctx.attempts.next(&self.state.origins, rules, key) {
            Ok(c) => {
                let (peer, from_pool) = self.state.origins[c.origin].peers[c.peer].attempt_peer();
                ctx.conn_from_pool = from_pool;
                Ok(peer)
            }
            Err(no) => {
                // Every peer known down (or drained): answer at once, no connect attempts.
                ctx.no_peer = Some(no.retry_after);
                let mut e = Error::explain(
                    ErrorType::HTTPStatus(503),
                    "no usable peer: every peer of the request's origins is down, drained or ejected",
                );
                e.esource = ErrorSource::Upstream;
                Err(e)
            }
        }
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let Some(c) = ctx.attempts.current else {
            return Error::e_explain(ErrorType::InternalError, "no attempt in flight");
        };
        let role = c.role;
        let peer = &self.state.origins[c.origin].peers[c.peer];
        let req = ctx.req.as_ref().expect("admitted");
        if let Some(s) = &ctx.slice {
            // Before the rewrite: a signed origin signs the Range too.
            upstream.insert_header(http::header::RANGE, s.upstream_range())?;
        }
        if let Some(ae) = ctx.accept_encoding {
            // A cached answer is keyed by the normal value: ask the origin with exactly it.
            upstream.insert_header(http::header::ACCEPT_ENCODING, ae)?;
        }
        let group = &self.state.groups[req.group];
        let policy = crate::origin::Forward {
            credentials: role == Role::Main || group.forward_credentials,
        };
        peer.rewrite(upstream, &req.key, req.query.as_deref(), policy)
            .map_err(|m| Error::explain(ErrorType::InternalError, m))
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // cascade's own internal header: never taken from an origin.
        resp.remove_header(slice::TOTAL_HEADER);
        let method = &session.req_header().method.clone();
        let (Some(plan), Some(c)) = (ctx.plan(&self.state, method), ctx.attempts.current) else {
            return Ok(());
        };
        let role = c.role;
        let origin = &self.state.origins[c.origin];
        let elapsed = ctx.attempt_start.map_or(Duration::ZERO, |t| t.elapsed());
        origin.upstream_duration.observe(elapsed);
        if elapsed > origin.timeouts.total {
            return Err(total_timeout(origin));
        }
        let status = resp.status.as_u16();
        if plan.should_replay(ctx.attempts.step, status) {
            let group = &self.state.groups[ctx.req.as_ref().expect("admitted").group];
            METRICS
                .fallback_replays
                .with_label_values(&[group.name.as_str(), origin.name.as_str()])
                .inc();
            ctx.attempts.replay(&self.state.origins);
            ctx.replays += 1;
            ctx.replay_pending = true;
            return Err(replay_error(status));
        }
        if origin.retry_on.status(status) {
            // Nothing has reached the client: another peer, or the fallbacks, may answer.
            if self.attempt_failed(ctx, method, Failure::Status) {
                ctx.replay_pending = true;
                return Err(retry_error(status));
            }
        } else {
            ctx.attempts.answered(&self.state.origins);
        }
        if let (Some(sc), Some(req)) = (ctx.set.as_mut(), ctx.req.as_ref()) {
            let set = self.state.sets.get(req.group).expect("a set's request");
            if sc.is_write() {
                if let Some(retry_after) = set
                    .answered(sc, status, &req.key, ctx.body_bytes, &self.state.origins)
                    .await
                {
                    // The member failed the upload: the client retries, and the retry is
                    // placed on another member.
                    resp.set_status(503)?;
                    resp.insert_header(http::header::RETRY_AFTER, retry_after.to_string())?;
                }
            } else if role == Role::Main && (resp.status.is_success() || status == 304) {
                set.read_served(sc, c.origin, &req.key);
            }
        }
        ctx.served = Some(c);
        resp.insert_header(SERVED_FROM, origin.peers[c.peer].label.as_str())?;
        resp.insert_header(SERVED_ROLE, role.as_str())?;
        let group = &self.state.groups[ctx.req.as_ref().expect("admitted").group];
        if role == Role::Fallback
            && group.cache_fallback == CacheFallback::Immutable
            && resp.status.is_success()
        {
            resp.insert_header(http::header::CACHE_CONTROL, IMMUTABLE)?;
        }
        if let Some(s) = &ctx.slice {
            if !cache_glue::slice_from_origin(resp, s)? {
                ctx.slice_refused = true;
            }
            if let (Some(cache), Some(k)) = (self.state.cache, self.slice_version_key(ctx)) {
                if let Some(etag) = resp.headers.get(http::header::ETAG) {
                    if cache.versions.observe(k, etag.as_bytes()) {
                        // Another version than the stored slices: they go, this one stays.
                        let req = ctx.req.as_ref().expect("admitted");
                        let object = cache::object_key(group_name(&self.state, req), &req.key);
                        cache.storage.invalidate(&object);
                    }
                }
            }
        }
        Ok(())
    }

    fn request_cache_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        let (Some(cache), Some(req)) = (self.state.cache, ctx.req.as_ref()) else {
            return Ok(());
        };
        let route = &self.state.router.routes()[req.route];
        let Some(slice) = cache_glue::cacheable_request(
            session.req_header(),
            req,
            &self.state.groups[req.group],
            route,
            cache,
        ) else {
            return Ok(());
        };
        ctx.slice = slice;
        ctx.accept_encoding = Some(cache::vary::normalize_accept_encoding(
            &session.req_header().headers,
        ));
        session
            .cache
            .enable(cache.storage, None, None, Some(cache.lock), None);
        session
            .cache
            .set_max_file_size_bytes(cache.config.max_object_size as usize);
        ctx.cache_enabled = true;
        Ok(())
    }

    fn cache_key_callback(&self, _session: &Session, ctx: &mut Ctx) -> Result<CacheKey> {
        let req = ctx
            .req
            .as_ref()
            .expect("cache is only enabled for admitted requests");
        Ok(cache::cache_key(
            &self.state.groups[req.group].name,
            &req.key,
            req.query.as_deref(),
            ctx.slice.as_ref(),
        ))
    }

    async fn cache_hit_filter(
        &self,
        _session: &mut Session,
        meta: &CacheMeta,
        _hit_handler: &mut HitHandler,
        is_fresh: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<ForcedFreshness>> {
        if !is_fresh {
            // Going upstream to refresh it: an invalidation meanwhile must win.
            self.take_fill_ticket(ctx);
        }
        // An expired slice 0 cannot be refreshed by a HEAD (see `cache_miss`): a miss, which
        // `cache_miss` turns into a HEAD to the origin.
        if !is_fresh && ctx.slice.is_some_and(|s| s.head) {
            return Ok(Some(ForcedFreshness::ForceMiss));
        }
        // A slice of an older version than the latest slice fill: refetch, never mix.
        if let (Some(cache), Some(k)) = (self.state.cache, self.slice_version_key(ctx)) {
            if meta.headers().contains_key(slice::TOTAL_HEADER)
                && cache.versions.outdated(
                    k,
                    meta.headers().get(http::header::ETAG).map(|v| v.as_bytes()),
                )
            {
                return Ok(Some(ForcedFreshness::ForceMiss));
            }
        }
        Ok(None)
    }

    fn cache_miss(&self, session: &mut Session, ctx: &mut Ctx) {
        if ctx.slice.is_some_and(|s| s.head) {
            // A HEAD has no body to hold the request open while slice 0 fills (Pingora would
            // abandon that fill when the headers are out): ask the origin with a HEAD instead.
            ctx.slice = None;
            // DeclinedToUpstream: a GET waiting on the lock takes the fill over.
            session.cache.disable(NoCacheReason::DeclinedToUpstream);
            return;
        }
        self.take_fill_ticket(ctx);
        session.cache.cache_miss();
    }

    fn response_cache_filter(
        &self,
        session: &Session,
        resp: &ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<RespCacheable> {
        let (Some(cache), Some(req)) = (self.state.cache, ctx.req.as_ref()) else {
            return Ok(RespCacheable::Uncacheable(NoCacheReason::NeverEnabled));
        };
        if ctx.slice_refused {
            return Ok(RespCacheable::Uncacheable(NoCacheReason::Custom(
                "origin ignored the slice range",
            )));
        }
        if ctx.fill_ticket.as_ref().is_some_and(|t| !t.current()) {
            // A write or a purge came in while this answer was on its way: it may be the old
            // version.
            return Ok(RespCacheable::Uncacheable(NoCacheReason::Custom(
                "invalidated while fetched",
            )));
        }
        let route = &self.state.router.routes()[req.route];
        let decided = cache::policy::decide(
            resp,
            &cache::policy::Inputs {
                config: &cache.config,
                route_ttl: route.cache.ttl,
                set_cookie: route.cache.set_cookie,
                now: std::time::SystemTime::now(),
            },
        );
        if matches!(decided, RespCacheable::Cacheable(_)) {
            let ae = ctx.accept_encoding.unwrap_or("identity");
            if let Some(v) = cache::vary::variance(&resp.headers, &session.req_header().headers, ae)
            {
                let primary = cache::cache_key(
                    group_name(&self.state, req),
                    &req.key,
                    req.query.as_deref(),
                    ctx.slice.as_ref(),
                )
                .primary_bin();
                let max = cache.config.max_variants as usize;
                if !cache
                    .variants
                    .admit(primary, v, max, |p| cache.storage.has(p))
                {
                    return Ok(RespCacheable::Uncacheable(NoCacheReason::Custom(
                        "too many variants",
                    )));
                }
            }
        }
        Ok(decided)
    }

    fn cache_vary_filter(
        &self,
        meta: &CacheMeta,
        _ctx: &mut Ctx,
        req: &RequestHeader,
    ) -> Option<HashBinary> {
        let ae = cache::vary::normalize_accept_encoding(&req.headers);
        cache::vary::variance(meta.headers(), &req.headers, ae)
    }

    fn range_header_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> RangeType {
        match ctx.slice {
            Some(s) if resp.headers.contains_key(slice::TOTAL_HEADER) => {
                let range = cache_glue::answer_from_slice(resp, &s);
                if matches!(
                    session.cache.phase(),
                    CachePhase::Miss | CachePhase::Expired
                ) && matches!(range, RangeType::Single(_))
                    && session.req_header().version >= http::Version::HTTP_11
                {
                    // A fill: the client's range ends before the slice does, and Pingora ends
                    // the request (abandoning the fill) once the response is complete. Without
                    // a length the response ends with the upstream body (chunked), so the
                    // whole slice is stored, as with nginx's slice subrequests. (HTTP/1.0
                    // clients cannot take chunked: they keep the length, and the fill ends
                    // with their range.)
                    resp.remove_header(&http::header::CONTENT_LENGTH);
                }
                range
            }
            _ => {
                resp.remove_header(slice::TOTAL_HEADER);
                pingora_proxy::range_header_filter(session.req_header(), resp, Some(200))
            }
        }
    }

    fn should_serve_stale(
        &self,
        _session: &mut Session,
        _ctx: &mut Ctx,
        error: Option<&Error>,
    ) -> bool {
        // None: stale-while-revalidate (pingora already checked the entry's window).
        // Some: the origin failed (refused, timed out, 5xx); a client error never qualifies.
        error.is_none_or(|e| e.esource() != &ErrorSource::Downstream)
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        resp.remove_header(slice::TOTAL_HEADER);
        if let Some(cache) = self.state.cache {
            let status = cache::status_label(&session.cache.phase(), ctx.cache_enabled);
            ctx.cache_status = Some(status);
            resp.insert_header("x-cache", status)?;
            let method = &session.req_header().method;
            if admit::is_write(method) && resp.status.is_success() {
                if let Some(req) = ctx.req.as_ref() {
                    let object = cache::object_key(&self.state.groups[req.group].name, &req.key);
                    let n = cache.storage.invalidate(&object);
                    METRICS
                        .cache_purges
                        .with_label_values(&["write"])
                        .inc_by(n as u64);
                }
            }
        }
        // Interim (1xx) headers pass through here too: plugins see only the final response.
        if let Some(ex) = ctx
            .plugins
            .as_mut()
            .filter(|_| !resp.status.is_informational())
        {
            // Last: plugins see the final headers (X-Cache included), hit or miss.
            ex.info.cache_status = ctx.cache_status;
            if ex.wants_bodies() {
                let len = resp
                    .headers
                    .get(http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse().ok());
                let no_body = session.req_header().method == http::Method::HEAD
                    || matches!(resp.status.as_u16(), 204 | 304);
                ex.set_response_length(if no_body { Some(0) } else { len });
            }
            let waited = Instant::now();
            plugin::on_response(ex, session.req_header(), resp, &self.state.origins).await;
            // Time spent on the plugins' HTTP calls is not the origin's: it does not count
            // against the origin's total timeout, checked as the body arrives.
            if let Some(t) = ctx.attempt_start.as_mut() {
                *t += waited.elapsed();
            }
            if ex.wants_bodies() {
                ctx.plugin_resp = Some(resp.clone());
            }
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        if let Some(ex) = ctx.plugins.as_mut().filter(|ex| ex.wants_bodies()) {
            // A failed `deny` plugin aborts the response: its body must not go out unfiltered.
            ex.body(
                true,
                session.req_header(),
                ctx.plugin_resp.as_ref(),
                body,
                end_of_stream,
            )
            .map_err(|(_, m)| Error::explain(ErrorType::InternalError, m))?;
        }
        Ok(None)
    }

    fn upstream_response_body_filter(
        &self,
        session: &mut Session,
        _body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        // The read timeout bounds a stall; this bounds a trickle.
        if let (Some(t0), Some((origin, _))) = (
            ctx.attempt_start,
            self.origin_for(ctx, &session.req_header().method),
        ) {
            if t0.elapsed() > origin.timeouts.total {
                return Err(total_timeout(origin));
            }
        }
        Ok(None)
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let method = session.req_header().method.clone();
        self.count_error(ctx, &method, &e);
        // Another peer, or (a read) the fallbacks when main cannot answer; never the same
        // peer again. No body byte was sent: writes may move to another peer too.
        let again = self.attempt_failed(ctx, &method, Failure::Connect);
        e.set_retry(again);
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        if ctx.replay_pending {
            return e; // ours, already marked retryable
        }
        let method = session.req_header().method.clone();
        let upstream = e.esource() == &ErrorSource::Upstream;
        if upstream {
            // A client that went away is not an origin failure.
            self.count_error(ctx, &method, &e);
        }
        let at = match ctx.attempts.current {
            Some(c) => self.state.origins[c.origin].peers[c.peer].describe(peer),
            None => format!("Peer: {peer}"),
        };
        let mut e = e.more_context(at);
        let replayable = method.is_idempotent() && !session.as_ref().retry_buffer_truncated();
        let before_answer = session.response_written().is_none();
        let from_pool = ctx
            .conn_from_pool
            .as_ref()
            .is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed));
        let stale = (client_reused || from_pool)
            && matches!(
                e.etype(),
                ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
            );
        let again = if !before_answer || !replayable || !upstream {
            false
        } else if stale {
            // Pingora's rule: a pooled connection the peer had closed; the same peer again,
            // not the peer's failure.
            ctx.attempts.stale_connection(&self.state.origins);
            true
        } else {
            let f = match e.etype() {
                ErrorType::ReadTimedout | ErrorType::WriteTimedout => Failure::Timeout,
                t if *t == TOTAL_TIMEOUT => Failure::Timeout,
                _ => Failure::Error,
            };
            self.attempt_failed(ctx, &method, f)
        };
        e.set_retry(again);
        e
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &Ctx, error: &Error) -> bool {
        // A client that hangs up mid-response is routine at an edge, not an error to page on.
        error.esource() == &ErrorSource::Downstream
            && matches!(
                error.etype(),
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed
            )
    }

    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        _ctx: &Ctx,
        error: &Error,
        _context: pingora_proxy::ProxyWarnLogContext,
    ) -> bool {
        *error.etype() == REPLAY
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        if e.esource() == &ErrorSource::Upstream {
            self.count_error(ctx, &session.req_header().method.clone(), e);
        }
        let mut code = error_status(e);
        if let (Some(sc), Some(req), true) = (
            ctx.set.as_mut(),
            ctx.req.as_ref(),
            // Only the member's failures count against it (not a 413, not a client that
            // went away): the rest give the reservation back in `logging`.
            member_failure(e),
        ) {
            if let Some(set) = self.state.sets.get(req.group) {
                if let Some(r) = set.failed(sc, e.etype().as_str()).await {
                    // A write the member failed (connect error, timeout): 503, retry.
                    if session.response_written().is_none() && code != 413 {
                        code = 503;
                        ctx.no_peer = Some(r);
                    }
                }
            }
        }
        if code > 0 && session.response_written().is_none() {
            // Pingora does not reuse a client connection after a proxy error: say so, or a
            // client would send its next request on a connection about to close.
            session.set_keepalive(None);
            let origin = self
                .origin_for(ctx, &session.req_header().method)
                .map_or("-".to_string(), |(o, _)| o.name.clone());
            let body = match code {
                503 if ctx.set.as_ref().is_some_and(|s| s.failed.is_some()) => format!(
                    "cascade: bucket `{origin}` failed the upload; retry (it goes to another bucket of the set)\n"
                ),
                503 if ctx.no_peer.is_some() => format!(
                    "cascade: no peer of origin `{origin}` can answer now (down, drained or ejected)\n"
                ),
                502 => format!(
                    "cascade: origin `{origin}` is unreachable or sent an invalid response\n"
                ),
                504 => format!("cascade: origin `{origin}` timed out\n"),
                413 => "cascade: request body too large\n".to_string(),
                _ => format!(
                    "cascade: {}\n",
                    http::StatusCode::from_u16(code)
                        .map_or("error", |s| s.canonical_reason().unwrap_or("error"))
                ),
            };
            let r = LocalResponse {
                retry_after: ctx.no_peer.filter(|_| code == 503),
                ..LocalResponse::new(code, body)
            };
            if let Err(err) =
                respond_local_with(session, &r, ctx.plugins.as_mut(), &self.state.origins).await
            {
                log::debug!("cannot send error response: {err}");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        if let (Some(sc), Some(req)) = (ctx.set.as_mut(), ctx.req.as_ref()) {
            if let Some(set) = self.state.sets.get(req.group) {
                set.finish(sc).await;
            }
        }
        if let Some(mut ex) = ctx.plugins.take() {
            ex.log(session.req_header(), session.response_written());
        }
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let req = session.req_header();
        ctx.attempts.end(&self.state.origins);
        let elapsed = ctx.start.elapsed();
        self.state.request_metrics.finish(&metrics::Finished {
            route: ctx.req.as_ref().map(|r| r.route),
            method: &req.method,
            status,
            served: ctx.served.map(|c| c.origin),
            cache: ctx
                .cache_status
                .map(|cs| (cs, session.body_bytes_sent() as u64)),
            elapsed,
        });
        if ctx.cache_status.is_some() && session.cache.lock_duration().is_some() {
            METRICS.cache_lock_waits.inc();
        }
        if self.state.access_log {
            let route = ctx.req.as_ref().map_or("none", |r| {
                self.state.router.routes()[r.route].name.as_str()
            });
            let served = ctx
                .served
                .map_or("cascade", |c| self.state.origins[c.origin].name.as_str());
            let client = session
                .client_addr()
                .map_or_else(|| "-".to_string(), |a| a.to_string());
            // The query is never logged: presigned URLs carry signatures there.
            log::info!(
                "{client} \"{} {}\" {status} {} route={route} served_from={served} cache={} replays={} {:.1}ms{}",
                req.method,
                req.uri.path(),
                session.body_bytes_sent(),
                ctx.cache_status.unwrap_or("-"),
                ctx.replays,
                elapsed.as_secs_f64() * 1000.0,
                e.map_or(String::new(), |e| format!(" error=\"{}\"", e.etype().as_str())),
            );
        }
    }

    fn request_summary(&self, session: &Session, _ctx: &Ctx) -> String {
        // Pingora's default includes the query string, which may hold credentials.
        let req = session.req_header();
        format!("{} {}", req.method, req.uri.path())
    }
}

/// The cache decisions that need request or response headers, kept out of the phase methods.
mod cache_glue {
    use super::*;
    use crate::admit::Admitted;
    use crate::config::RouteConfig;

    /// Whether this request uses the cache, and on which slice. `None`: bypass.
    pub fn cacheable_request(
        req: &RequestHeader,
        admitted: &Admitted,
        group: &GroupConfig,
        route: &RouteConfig,
        cache: &Cache,
    ) -> Option<Option<slice::SliceReq>> {
        if !route.cache.enabled || !matches!(req.method, http::Method::GET | http::Method::HEAD) {
            return None;
        }
        // Not the object's answer (an S3 operation or sub-resource), or a query the route
        // does not cache.
        if admitted.not_object
            || (route.cache.query == crate::config::schema::CacheQuery::Bypass
                && admitted.query.is_some())
        {
            return None;
        }
        if req.headers.contains_key(http::header::AUTHORIZATION) && !route.cache.cache_authorized {
            return None;
        }
        // A per-user answer the origin may give by the cookie it sees (Varnish's rule; only
        // where the cookie reaches such an origin).
        if group.cookies_reach_origin
            && !route.cache.cache_cookies
            && req.headers.contains_key(http::header::COOKIE)
        {
            return None;
        }
        // A header forwarded only because an origin's `s3.forward_headers` names it can change
        // the answer (an SSE-C key decrypts) and is not in the key: not cached.
        if !group.forward_headers.is_empty()
            && req.headers.keys().any(|n| {
                !boundary::s3::forward_header(n.as_str(), &[])
                    && boundary::s3::forward_header(n.as_str(), &group.forward_headers)
            })
        {
            return None;
        }
        let range = req.headers.get(http::header::RANGE);
        let range_str = match range {
            Some(v) => Some(v.to_str().ok()?),
            None => None,
        };
        let is_head = req.method == http::Method::HEAD;
        let s = slice::plan(range_str, is_head, cache.config.slice_size);
        if s.is_some() {
            // The whole object is already stored: answer the Range or HEAD from it.
            let whole =
                cache::cache_key(&group.name, &admitted.key, admitted.query.as_deref(), None);
            if cache.storage.has(&whole.combined_bin()) {
                return Some(None);
            }
        }
        if range.is_some() && s.is_none() && cache.config.slice_size > 0 {
            // A suffix or multi-range on a sliced route: pass it to the origin untouched
            // rather than pull the whole object.
            return None;
        }
        Some(s)
    }

    /// Turns the origin's 206 for a slice into a cacheable 200 of the slice's bytes that
    /// records the object's total length. `false`: not to be stored (the origin ignored the
    /// Range, or its 206 does not cover exactly the slice).
    pub fn slice_from_origin(resp: &mut ResponseHeader, s: &slice::SliceReq) -> Result<bool> {
        if resp.status.as_u16() != 206 {
            return Ok(resp.status.as_u16() != 200);
        }
        let parsed = resp
            .headers
            .get(http::header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(slice::parse_content_range);
        let invalid = |m: &'static str| {
            let mut e = Error::explain(ErrorType::InvalidHTTPHeader, m);
            e.esource = ErrorSource::Upstream; // the origin's fault: 502
            Err(e)
        };
        let Some((first, last, total)) = parsed else {
            return invalid("origin answered a slice request without a valid Content-Range");
        };
        let length = resp
            .headers
            .get(http::header::CONTENT_LENGTH)
            .map(|v| v.to_str().ok().and_then(|v| v.parse::<u64>().ok()));
        if length.is_some_and(|l| l != Some(last - first + 1)) {
            return invalid("origin answered a slice request with a Content-Length that is not its Content-Range's");
        }
        let storable = match slice::coverage(s, first, last, total) {
            slice::Coverage::Exact => true,
            slice::Coverage::Partial => false,
            slice::Coverage::Unusable => {
                return invalid("origin answered a slice request with a mismatched Content-Range")
            }
        };
        resp.set_status(200)?;
        resp.remove_header(&http::header::CONTENT_RANGE);
        resp.insert_header(http::header::CONTENT_LENGTH, last - first + 1)?;
        resp.insert_header(slice::TOTAL_HEADER, total)?;
        Ok(storable)
    }

    /// Cuts the client's answer out of a slice entry (hit or fresh fill).
    pub fn answer_from_slice(resp: &mut ResponseHeader, s: &slice::SliceReq) -> RangeType {
        let total: u64 = resp
            .headers
            .get(slice::TOTAL_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let body_len: u64 = resp
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        resp.remove_header(slice::TOTAL_HEADER);
        let set = |resp: &mut ResponseHeader, k: http::HeaderName, v: String| {
            let _ = resp.insert_header(k, v);
        };
        match slice::answer(s, total, body_len) {
            slice::Answer::Head { total } => {
                set(resp, http::header::CONTENT_LENGTH, total.to_string());
                set(resp, http::header::ACCEPT_RANGES, "bytes".into());
                RangeType::None
            }
            slice::Answer::Unsatisfiable { total } => {
                let _ = resp.set_status(416);
                set(
                    resp,
                    http::header::CONTENT_RANGE,
                    format!("bytes */{total}"),
                );
                set(resp, http::header::CONTENT_LENGTH, "0".into());
                RangeType::Invalid
            }
            slice::Answer::Partial { lo, hi, total } => {
                let _ = resp.set_status(206);
                set(
                    resp,
                    http::header::CONTENT_RANGE,
                    format!("bytes {lo}-{hi}/{total}"),
                );
                set(
                    resp,
                    http::header::CONTENT_LENGTH,
                    (hi - lo + 1).to_string(),
                );
                set(resp, http::header::ACCEPT_RANGES, "bytes".into());
                let start = s.start();
                RangeType::Single((lo - start) as usize..(hi - start + 1) as usize)
            }
        }
    }
}

fn total_timeout(origin: &Origin) -> Box<Error> {
    let mut e = Error::explain(
        TOTAL_TIMEOUT,
        format!(
            "origin `{}` exceeded the total timeout of {:?}",
            origin.name, origin.timeouts.total
        ),
    );
    e.esource = ErrorSource::Upstream;
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_statuses() {
        let up = |t: ErrorType| {
            let mut e = Error::new(t);
            e.esource = ErrorSource::Upstream;
            error_status(&e)
        };
        assert_eq!(up(ErrorType::ConnectRefused), 502);
        assert_eq!(up(ErrorType::ConnectTimedout), 504);
        assert_eq!(up(ErrorType::ReadTimedout), 504);
        assert_eq!(up(TOTAL_TIMEOUT), 504);
        assert_eq!(up(ErrorType::InvalidHTTPHeader), 502);
        assert_eq!(up(ErrorType::ConnectionClosed), 502);
        assert_eq!(error_status(&Error::new(ErrorType::HTTPStatus(413))), 413);
        let mut down = Error::new(ErrorType::InvalidHTTPHeader);
        down.esource = ErrorSource::Downstream;
        assert_eq!(error_status(&down), 400);
    }

    #[test]
    fn replay_errors_are_retryable_and_never_counted_as_failures() {
        let e = replay_error(404);
        assert!(e.retry());
        assert_eq!(*e.etype(), REPLAY);
    }
}
