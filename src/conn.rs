//! Client connections: the HTTP/1 connection loop, and how long cascade waits for a
//! client's bytes at each point of it.
//!
//! Pingora's own loop (the `ServerApp` it implements for every `HttpServerApp`) builds a
//! session per request and reads its header, with waits it fixes: 60 s per read of a new
//! connection's first header, 60 s per read of a request body; between requests, the idle
//! timeout (`boundary::keepalive` sets it from `server.keepalive_timeout`). While a
//! keep-alive is idle it holds the next session (its header buffer is allocated before any
//! byte arrives) and, for the connection's whole life, the loop's own future, sized for its
//! HTTP/2 branch (8.6 KiB, benches/README.md).
//!
//! [`ClientTimeouts`] is cascade's loop for HTTP/1 connections (Pingora's public
//! `ServerApp`, `ServerSession` and `HttpPersistentSettings`; the proxy itself is
//! Pingora's `http_proxy`, called once per request):
//! - `server.client_header_timeout` (nginx's name; Pingora's fixed 60 s made a setting):
//!   the wait for a new connection's first bytes, and for each later read of a header
//!   (with `release_idle`, a keep-alive's too once its first bytes are in).
//! - `server.client_body_timeout` (nginx's name; Pingora's fixed 60 s made a setting):
//!   each read of a request body; over it the client gets 408.
//! - `server.release_idle` (on by default): before each request the loop waits for its
//!   first bytes itself (up to the header timeout on a new connection, `keepalive_timeout`
//!   on a keep-alive, or until shutdown), holding only the connection and a future of a few
//!   hundred bytes; only then is the session built. What that wait reads is handed to the
//!   session as the start of its header, which Pingora parses before it reads the stream
//!   again: no extra system call. Off: the session is built at once, as Pingora does.
//!
//! - `server.write_buffer`: each connection's stream is wrapped in a [`SendBuf`], a write
//!   buffer held only while a response is written (the listener gets none from Pingora,
//!   whose buffer would be held for the connection's life).
//! - `server.send_timeout` (nginx's name and semantics, default 60 s): the same
//!   [`SendBuf`] fails a write the client has taken no byte of for that long, and Pingora
//!   closes the connection.
//!
//! - `backpressure`: each request runs with its connection's `Flow`, which the `SendBuf`
//!   updates, so its upstream reads wait while a write to the client does.
//! - `server.max_connections` (`capacity`): a connection over it gets 503 and is closed;
//!   while a connection waits for a request (the `release_idle` waits), a new one at the
//!   cap may have it closed to make room.
//!
//! Connections that are not HTTP/1 (h2c, ALPN h2, custom protocols; cascade's listeners
//! offer none of them today) go to Pingora's own loop, with the body timeout.
//!
//! Pingora's own `write_timeout` stays unset: it applies to a whole `write_all` of a body
//! chunk, up to an object's size from the cache, so it would cut off slow but steady
//! clients; `send_timeout` restarts on every write that makes progress.

use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use pingora_core::apps::{
    HttpPersistentSettings, HttpServerApp, HttpServerOptions, ReusedHttpStream, ServerApp,
};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::{Stream, ALPN};
use pingora_core::server::ShutdownWatch;
use tokio::io::{AsyncRead, ReadBuf};

use crate::backpressure::Flow;
use crate::capacity::{self, Admission, Gate};
use crate::sendbuf::SendBuf;

/// What the connection loop gives each client connection (see the module doc).
#[derive(Debug, Clone, Copy)]
pub struct ClientSettings {
    /// `server.client_header_timeout`: a new connection's first bytes, and each read of a
    /// header (whole seconds, at least 1: Pingora's keep-alive timer is in seconds).
    pub header: Duration,
    /// `server.client_body_timeout`: each read of a request body.
    pub body: Duration,
    /// `server.keepalive_timeout`: the longest wait for a keep-alive's next request.
    pub idle: Duration,
    /// `server.release_idle`: wait for each request's first bytes before building its
    /// session.
    pub release_idle: bool,
    /// `server.write_buffer`: the most bytes of a response gathered before a send, in a
    /// buffer held only while a response is written (`sendbuf`); 0: none.
    pub write_buffer: usize,
    /// `server.send_timeout`: the longest a response's write waits for a client that takes
    /// none of its bytes (`sendbuf`).
    pub send: Duration,
}

/// The proxy app as Pingora's loop sees it: every session gets the body read timeout.
struct BodyTimeout<A> {
    inner: Arc<A>,
    read: Duration,
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> HttpServerApp for BodyTimeout<A> {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        session.set_read_timeout(Some(self.read));
        self.inner.process_new_http(session, shutdown).await
    }

    fn h2_options(&self) -> Option<pingora_core::protocols::http::v2::server::H2Options> {
        self.inner.h2_options()
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        self.inner.server_options()
    }

    async fn http_cleanup(&self) {
        self.inner.http_cleanup().await
    }

    // `process_custom_session` keeps Pingora's default: it serves only `force_custom` or a
    // custom ALPN, which cascade never configures.
}

/// A Pingora app (the proxy) behind cascade's HTTP/1 connection loop.
pub struct ClientTimeouts<A> {
    app: Arc<BodyTimeout<A>>,
    settings: ClientSettings,
    /// `server.max_connections` (`capacity`).
    gate: Gate,
}

impl<A> ClientTimeouts<A> {
    /// `max_connections`: the most client connections held at once (`capacity`).
    pub fn new(inner: A, settings: ClientSettings, max_connections: u64) -> Self {
        ClientTimeouts {
            app: Arc::new(BodyTimeout {
                inner: Arc::new(inner),
                read: settings.body,
            }),
            settings,
            gate: Gate::new(max_connections),
        }
    }
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for ClientTimeouts<A> {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // Counted while this connection lives; over `max_connections`: 503 and closed.
        let _slot = match self.gate.admit() {
            Admission::Admitted(slot) => slot,
            Admission::Full => {
                // Boxed: its read buffer would otherwise be part of every connection's future.
                Box::pin(capacity::refuse(&self.gate, stream)).await;
                return None;
            }
        };
        let flow = Flow::new();
        stream = Box::new(
            SendBuf::new(stream, self.settings.write_buffer)
                .with_send_timeout(Some(self.settings.send))
                .with_flow(flow.clone()),
        );
        let opts = self.app.server_options();
        let not_h1 = opts.is_some_and(|o| o.h2c || o.force_custom)
            || stream
                .selected_alpn_proto()
                .is_some_and(|p| !matches!(p, ALPN::H1));
        if not_h1 {
            // Pingora's loop (its future is boxed by `async_trait`: this one stays small).
            return self.app.process_new(stream, shutdown).await;
        }
        self.serve_h1(stream, &flow, shutdown).await;
        // Pingora's accept task closes the connection: it is never handed back.
        None
    }

    async fn cleanup(&self) {
        self.app.http_cleanup().await
    }
}

impl<A: HttpServerApp + Send + Sync + 'static> ClientTimeouts<A> {
    /// One HTTP/1 connection, request after request, until it is not reusable, its client
    /// goes quiet or the server shuts down. Between requests it holds only the stream and
    /// the previous session's settings.
    async fn serve_h1(
        self: &Arc<Self>,
        mut stream: Stream,
        flow: &Arc<Flow>,
        shutdown: &ShutdownWatch,
    ) -> Option<()> {
        let w = self.settings;
        // Pingora's header timer is the session's keep-alive value, in whole seconds.
        let header_secs = w.header.as_secs().max(1);
        let mut watch = shutdown.clone();
        // `None` before the first request; then what the previous session left.
        let mut previous: Option<Option<HttpPersistentSettings>> = None;
        loop {
            let first = if w.release_idle {
                let reused = previous.is_some();
                if reused && *watch.borrow() {
                    return None;
                }
                let wait = if reused { w.idle } else { w.header };
                // While it waits, a new connection at `max_connections` may close it.
                let mut waiting = self.gate.waiting();
                let read = tokio::select! {
                    // A request that has arrived wins over an eviction asked at the same time
                    // (closing with it unread would reset the connection).
                    biased;
                    r = tokio::time::timeout(wait, first_bytes(&mut stream)) => r.ok().flatten(),
                    _ = watch.changed() => None,
                    _ = waiting.evicted() => None,
                };
                drop(waiting);
                Some(read?)
            } else {
                None
            };
            let mut session = ServerSession::new_http1(stream);
            match previous.take() {
                None => {
                    // A new connection: Pingora's per-read header timeout is its keep-alive
                    // timer, whole seconds (lowered by `boundary::keepalive` once the
                    // header is in); none once shutting down, so it is not reused.
                    let secs = (!*shutdown.borrow()).then_some(header_secs);
                    session.set_keepalive(secs);
                    session.set_keepalive_reuses_remaining(
                        self.app
                            .server_options()
                            .and_then(|o| o.keepalive_request_limit),
                    );
                }
                Some(Some(settings)) => settings.apply_to_session(&mut session),
                Some(None) => {}
            }
            if let Some(first) = first {
                // The request has begun: the rest of its header gets the header timeout, not
                // the idle one (`boundary::keepalive` sets that again once the header is in).
                if session.get_keepalive().is_some() {
                    session.set_keepalive(Some(header_secs));
                }
                // Parsed before the stream is read again (Pingora's pipelining entry point).
                // cascade never enables pipelining: with it, the previous session could carry
                // a prefix of its own, which this would replace (tests/hostile.rs checks that
                // pipelined requests still close the connection after the first response).
                session.set_pipelined_prefix(first);
            }
            // The request's upstream reads wait while its client stalls (`backpressure`).
            let (next, settings) = flow
                .scope(self.app.process_new_http(session, shutdown))
                .await?
                .consume();
            stream = next;
            previous = Some(settings);
        }
    }
}

/// Pingora's first read of a request header: the size of the header buffer it allocates.
const FIRST_READ: usize = 4096;

/// Waits for a request's first bytes and returns what has arrived (up to [`FIRST_READ`]
/// bytes, as Pingora's own first header read would), or `None` when the client closes or
/// the connection fails. The read buffer is on the stack for the length of one poll and
/// only what arrived is copied to the heap, so the wait itself holds no buffer, and reading
/// here costs no more system calls than Pingora's own read.
async fn first_bytes(stream: &mut Stream) -> Option<BytesMut> {
    std::future::poll_fn(|cx| {
        let mut space = [MaybeUninit::<u8>::uninit(); FIRST_READ];
        let mut buf = ReadBuf::uninit(&mut space);
        match Pin::new(&mut *stream).poll_read(cx, &mut buf) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) if buf.filled().is_empty() => Poll::Ready(None),
            Poll::Ready(Ok(())) => {
                let mut bytes = BytesMut::with_capacity(FIRST_READ);
                bytes.extend_from_slice(buf.filled());
                Poll::Ready(Some(bytes))
            }
            Poll::Ready(Err(_)) => Poll::Ready(None),
        }
    })
    .await
}
