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
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::admit::{self, Admission, LocalResponse, RequestFacts};
use crate::config::{CacheFallback, GroupConfig};
use crate::fallback::{Plan, Role};
use crate::metrics::{self, METRICS};
use crate::origin::Origin;
use crate::route::Router;

pub const SERVED_FROM: &str = "x-served-from";
pub const SERVED_ROLE: &str = "x-served-from-role";
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// Everything a request needs from the config, built once per config generation.
pub struct State {
    pub router: Router,
    pub groups: Vec<GroupConfig>,
    pub origins: Vec<Origin>,
    pub access_log: bool,
}

impl State {
    /// The most attempts any request can make (main + the longest fallback list).
    pub fn max_attempts(&self) -> usize {
        1 + self
            .groups
            .iter()
            .map(|g| g.fallbacks.len())
            .max()
            .unwrap_or(0)
    }
}

pub struct Cascade {
    pub state: Arc<State>,
}

/// Per-request state.
pub struct Ctx {
    start: Instant,
    req: Option<admit::Admitted>,
    /// Index of the current attempt in the plan (0 = main).
    attempt: usize,
    /// Set between a replay decision and Pingora's retry: the error is ours, retry it.
    replay_pending: bool,
    attempt_start: Option<Instant>,
    served: Option<(usize, Role)>,
    body_bytes: u64,
    /// The error kind already counted for this attempt (avoid double counting).
    error_counted: bool,
    replays: u8,
}

impl Ctx {
    fn plan<'a>(&self, state: &'a State, method: &http::Method) -> Option<Plan<'a>> {
        self.req
            .as_ref()
            .map(|r| Plan::new(&state.groups[r.group], method))
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

async fn respond_local(session: &mut Session, r: &LocalResponse) -> Result<()> {
    let mut resp = ResponseHeader::build(r.status, Some(4))?;
    resp.insert_header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
    resp.insert_header(http::header::CONTENT_LENGTH, r.body.len())?;
    if let Some(allow) = r.allow {
        resp.insert_header(http::header::ALLOW, allow)?;
    }
    if r.status == 413 || r.status == 400 {
        // The body was not read: the connection cannot carry another request.
        session.set_keepalive(None);
        resp.insert_header(http::header::CONNECTION, "close")?;
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

impl Cascade {
    fn origin_for(&self, ctx: &Ctx, method: &http::Method) -> Option<(&Origin, Role)> {
        let (ix, role) = ctx.plan(&self.state, method)?.origin(ctx.attempt)?;
        Some((&self.state.origins[ix], role))
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
            attempt: 0,
            replay_pending: false,
            attempt_start: None,
            served: None,
            body_bytes: 0,
            error_counted: false,
            replays: 0,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let req = session.req_header();
        let host = req
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri.host());
        let facts = RequestFacts {
            method: &req.method,
            host,
            path: req.uri.path(),
            query: req.uri.query(),
            content_length: req
                .headers
                .get(http::header::CONTENT_LENGTH)
                .map(|v| v.as_bytes()),
        };
        match admit::admit(&self.state.router, &self.state.groups, &facts) {
            Admission::Proxy(a) => {
                ctx.req = Some(a);
                Ok(false)
            }
            Admission::Local(r) => {
                respond_local(session, &r).await?;
                Ok(true)
            }
        }
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
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
        ctx.attempt_start = Some(Instant::now());
        match self.origin_for(ctx, &session.req_header().method) {
            Some((origin, _)) => Ok(origin.peer()),
            None => Error::e_explain(ErrorType::InternalError, "no origin for this attempt"),
        }
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let Some((origin, _)) = self.origin_for(ctx, &session.req_header().method) else {
            return Error::e_explain(ErrorType::InternalError, "no origin for this attempt");
        };
        let req = ctx.req.as_ref().expect("admitted");
        origin
            .rewrite(upstream, &req.key, req.query.as_deref())
            .map_err(|m| Error::explain(ErrorType::InternalError, m))
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let method = &session.req_header().method;
        let Some(plan) = ctx.plan(&self.state, method) else {
            return Ok(());
        };
        let Some((origin_ix, role)) = plan.origin(ctx.attempt) else {
            return Ok(());
        };
        let origin = &self.state.origins[origin_ix];
        let elapsed = ctx.attempt_start.map_or(Duration::ZERO, |t| t.elapsed());
        METRICS
            .upstream_duration
            .with_label_values(&[origin.name.as_str()])
            .observe(elapsed.as_secs_f64());
        if elapsed > origin.timeouts.total {
            return Err(total_timeout(origin));
        }
        let status = resp.status.as_u16();
        if plan.should_replay(ctx.attempt, status) {
            let group = &self.state.groups[ctx.req.as_ref().expect("admitted").group];
            METRICS
                .fallback_replays
                .with_label_values(&[group.name.as_str(), origin.name.as_str()])
                .inc();
            ctx.attempt += 1;
            ctx.replays += 1;
            ctx.replay_pending = true;
            return Err(replay_error(status));
        }
        ctx.served = Some((origin_ix, role));
        resp.insert_header(SERVED_FROM, origin.name.as_str())?;
        resp.insert_header(SERVED_ROLE, role.as_str())?;
        let group = &self.state.groups[ctx.req.as_ref().expect("admitted").group];
        if role == Role::Fallback
            && group.cache_fallback == CacheFallback::Immutable
            && resp.status.is_success()
        {
            resp.insert_header(http::header::CACHE_CONTROL, IMMUTABLE)?;
        }
        Ok(())
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
        self.count_error(ctx, &session.req_header().method.clone(), &e);
        // A dead origin is not a missing object: no replay, no hammering the same peer.
        e.set_retry(false);
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
        if e.esource() == &ErrorSource::Upstream {
            // A client that went away is not an origin failure.
            self.count_error(ctx, &session.req_header().method.clone(), &e);
        }
        let mut e = e.more_context(format!("Peer: {peer}"));
        // Pingora's default: retry only idempotent requests whose body can be replayed,
        // and only when a reused pooled connection turned out to be dead.
        if !session.req_header().method.is_idempotent() || session.as_ref().retry_buffer_truncated()
        {
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
        }
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
        let code = error_status(e);
        if code > 0 && session.response_written().is_none() {
            let origin = self
                .origin_for(ctx, &session.req_header().method)
                .map_or("-".to_string(), |(o, _)| o.name.clone());
            let body = match code {
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
                status: code,
                body,
                allow: None,
            };
            if let Err(err) = respond_local(session, &r).await {
                log::debug!("cannot send error response: {err}");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let req = session.req_header();
        let route = ctx.req.as_ref().map_or("none", |r| {
            self.state.router.routes()[r.route].name.as_str()
        });
        let served = ctx
            .served
            .map_or("cascade", |(o, _)| self.state.origins[o].name.as_str());
        METRICS
            .requests
            .with_label_values(&[
                route,
                metrics::method_label(&req.method),
                metrics::status_class(status),
                served,
            ])
            .inc();
        let elapsed = ctx.start.elapsed();
        METRICS
            .request_duration
            .with_label_values(&[route])
            .observe(elapsed.as_secs_f64());
        if self.state.access_log {
            let client = session
                .client_addr()
                .map_or_else(|| "-".to_string(), |a| a.to_string());
            // The query is never logged: presigned URLs carry signatures there.
            log::info!(
                "{client} \"{} {}\" {status} {} route={route} served_from={served} replays={} {:.1}ms{}",
                req.method,
                req.uri.path(),
                session.body_bytes_sent(),
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
