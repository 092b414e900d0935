//! Client connections: the bound on how long cascade waits for a client's request body,
//! which Pingora's proxy leaves open.
//!
//! Pingora bounds the wait for a request header (60 s between reads on a new connection; on
//! a keep-alive, the idle timeout that `boundary::keepalive` sets from
//! `server.keepalive_timeout`), but reads a request body with no timeout: an upload that
//! stalls would hold its client connection, its upstream connection and, in a bucket set,
//! its reservation for as long as the client likes. [`ClientTimeouts`] wraps the proxy app
//! and gives every HTTP/1 session a read timeout (`server.client_body_timeout`) before the
//! proxy sees it: a body read that waits longer fails, and the client gets 408.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::apps::{HttpServerApp, HttpServerOptions, ReusedHttpStream};
use pingora_core::protocols::http::ServerSession;
use pingora_core::server::ShutdownWatch;

/// A Pingora HTTP app (the proxy) whose client sessions get a read timeout.
pub struct ClientTimeouts<A> {
    inner: Arc<A>,
    read: Duration,
}

impl<A> ClientTimeouts<A> {
    pub fn new(inner: A, read: Duration) -> Self {
        ClientTimeouts {
            inner: Arc::new(inner),
            read,
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
}
