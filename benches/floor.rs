//! The Pingora floor: the least a `ProxyHttp` can do for `benches/load.sh`'s `pass` and
//! `fallback` scenarios, on the same Pingora settings as cascade (listener buffers, threads,
//! retries), so the load report can split cascade's cost per request into Pingora's share and
//! cascade's own.
//!
//! What it does per request, and nothing more (on cascade's allocator, mimalloc): pick main (or, after main's 404, the
//! fallback) as the upstream, replay a GET/HEAD that main answers 404 through Pingora's retry
//! loop (the same mechanism cascade uses), and add `X-Served-From`. No config, no routing, no
//! metrics, no logging, no cache, no plugins, no trust boundary.
//!
//! ```text
//! cargo build --release --example floor
//! floor LISTEN_PORT THREADS MAIN_ADDR FALLBACK_ADDR [READ_BUFFER WRITE_BUFFER]
//! ```
//!
//! `benches/load.sh` starts it with `PROXIES="cascade nginx floor"`. It is built as an example
//! (a bench target would be run by `cargo bench`) and is not part of cascade.

use async_trait::async_trait;
use pingora_core::listeners::ListenerConfig;
use pingora_core::protocols::l4::stream::L4BufferSettings;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::Server;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType, Result};
use pingora_http::ResponseHeader;
use pingora_proxy::{ProxyHttp, Session};

// cascade's allocator (src/main.rs), so the floor differs from cascade only in what it does.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const REPLAY: ErrorType = ErrorType::Custom("FloorReplay");

struct Floor {
    main: String,
    fallback: String,
}

#[derive(Default)]
struct Ctx {
    fallback: bool,
    replay: bool,
}

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx::default()
    }

    async fn upstream_peer(&self, _s: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        ctx.replay = false;
        let addr = if ctx.fallback {
            &self.fallback
        } else {
            &self.main
        };
        Ok(Box::new(HttpPeer::new(addr.as_str(), false, String::new())))
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let read = matches!(
            session.req_header().method,
            http::Method::GET | http::Method::HEAD
        );
        if resp.status.as_u16() == 404 && !ctx.fallback && read {
            ctx.fallback = true;
            ctx.replay = true;
            let mut e = Error::new(REPLAY);
            e.set_retry(true);
            return Err(e);
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _s: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let from = if ctx.fallback { "fallback" } else { "main" };
        resp.insert_header("X-Served-From", from)
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        if ctx.replay {
            return e;
        }
        // Pingora's default: retry a request that broke on a reused connection.
        let mut e = e.more_context(format!("Peer: {peer}"));
        e.retry
            .decide_reuse(client_reused && !session.as_ref().retry_buffer_truncated());
        e
    }
}

fn arg(args: &[String], i: usize, what: &str) -> String {
    args.get(i).cloned().unwrap_or_else(|| {
        eprintln!("floor: missing {what}\nusage: floor LISTEN_PORT THREADS MAIN_ADDR FALLBACK_ADDR [READ_BUFFER WRITE_BUFFER]");
        std::process::exit(2)
    })
}

fn num(s: &str, what: &str) -> usize {
    s.parse().unwrap_or_else(|_| {
        eprintln!("floor: {what} `{s}` is not a number");
        std::process::exit(2)
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let port = num(&arg(&args, 0, "LISTEN_PORT"), "LISTEN_PORT");
    let threads = num(&arg(&args, 1, "THREADS"), "THREADS");
    let floor = Floor {
        main: arg(&args, 2, "MAIN_ADDR"),
        fallback: arg(&args, 3, "FALLBACK_ADDR"),
    };
    // cascade's defaults: no read buffer, an 8 KiB write buffer (src/config/schema.rs).
    let read = args.get(4).map_or(0, |s| num(s, "READ_BUFFER"));
    let write = args.get(5).map_or(8 * 1024, |s| num(s, "WRITE_BUFFER"));

    let conf = ServerConf {
        threads,
        max_retries: 3,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy =
        pingora_proxy::http_proxy_service_with_name(&server.configuration, floor, "floor proxy");
    proxy.add_listener(
        ListenerConfig::tcp(format!("127.0.0.1:{port}"))
            .l4_buffer(L4BufferSettings::new(read, write)),
    );
    server.add_service(proxy);
    server.run_forever();
}
