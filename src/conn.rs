//! Client connections: how long cascade waits for the next bytes of a client's request
//! body, set on every HTTP/1 session before the proxy sees it.
//!
//! Pingora bounds the wait for a request header (60 s between reads on a new connection; on
//! a keep-alive, the idle timeout that `boundary::keepalive` sets from
//! `server.keepalive_timeout`) and reads a request body with a fixed 60 s timeout per read,
//! which its proxy offers no setting for. An upload that stalls holds its client connection,
//! its upstream connection and, in a bucket set, its reservation until then; an edge taking
//! uploads from slow uplinks may want more, one that wants reservations back sooner less.
//! [`ClientTimeouts`] wraps the proxy app (Pingora's public `http_proxy` + `HttpServerApp`)
//! and gives every session `server.client_body_timeout` (nginx's setting of that name): a
//! body read that waits longer fails and the client gets 408. HTTP/2 sessions ignore it
//! (Pingora's h2 has its own flow control); cascade does not offer h2c.
//!
//! Between two requests of a keep-alive the wrapper also holds the connection itself
//! (`server.release_idle`, on by default): it waits for the next request's first byte (up to
//! `server.keepalive_timeout`, or until shutdown) before Pingora builds the next session, so
//! an idle connection holds neither that session nor the proxy's request state: 18.4 KiB per
//! idle keep-alive instead of 35.7 (benches/README.md). What that wait reads is handed to
//! the next session as the start of its header, so it costs no extra system call: Pingora
//! parses it before reading the stream again.
//!
//! Responses are written with no timeout at all (Pingora's `write_timeout` is unset, and
//! the one it offers applies to a whole `write_all` of a body chunk, up to an object's size
//! from the cache, so it would cut off slow but steady clients): see benches/README.md.

use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use pingora_core::apps::{HttpServerApp, HttpServerOptions, ReusedHttpStream};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use tokio::io::{AsyncRead, ReadBuf};

/// A Pingora HTTP app (the proxy) whose client sessions get a read timeout.
pub struct ClientTimeouts<A> {
    inner: Arc<A>,
    read: Duration,
    /// `server.keepalive_timeout`: the longest wait for a keep-alive's next request.
    idle: Duration,
    /// `server.release_idle`: wait for a keep-alive's next request here, holding no session.
    release_idle: bool,
}

impl<A> ClientTimeouts<A> {
    pub fn new(inner: A, read: Duration, idle: Duration, release_idle: bool) -> Self {
        ClientTimeouts {
            inner: Arc::new(inner),
            read,
            idle,
            release_idle,
        }
    }
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> HttpServerApp for ClientTimeouts<A> {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        session.set_read_timeout(Some(self.read));
        let reused = self.inner.process_new_http(session, shutdown).await?;
        if !self.release_idle {
            return Some(reused);
        }
        // Keep-alive: wait for the next request here, holding only the connection. A client
        // that asked for a shorter idle time than ours is waited for up to ours; its
        // session's own header read then applies its value to what follows.
        let (mut stream, settings) = reused.consume();
        let Some(mut settings) = settings else {
            // Pingora's proxy always returns its settings; without them there is nowhere to
            // put what is read, so its own wait takes over.
            return Some(ReusedHttpStream::new(stream, None));
        };
        let mut shutdown = shutdown.clone();
        if *shutdown.borrow() {
            return None;
        }
        let next_request = tokio::select! {
            r = tokio::time::timeout(self.idle, first_bytes(&mut stream)) => r.ok().flatten(),
            _ = shutdown.changed() => None,
        };
        // What arrived goes to the next session as its first header read, which Pingora
        // parses before it reads the stream again (its pipelining entry point; cascade
        // never enables pipelining, so no earlier prefix is there to overwrite).
        settings.set_pipelined_prefix(next_request?);
        Some(ReusedHttpStream::new(stream, Some(settings)))
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

/// Pingora's first read of a request header: the size of the header buffer it allocates.
const FIRST_READ: usize = 4096;

/// Waits for a keep-alive's next request and returns what has arrived (up to [`FIRST_READ`]
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
