//! cascade: a plugin-scriptable edge proxy for object storage, on Pingora.
//!
//! ```text
//!  config ──load/validate──► Config ──build()──► Server
//!                                                 ├─ proxy service  (proxy::Cascade: admit → plugins → fallback plan → origin rewrite/sign)
//!                                                 ├─ dir origins    (origin::dir::DirOrigin on Unix sockets)
//!                                                 └─ metrics        (metrics::MetricsApp)
//! ```
//! See ARCHITECTURE.md for the request path and the invariants.

pub mod admin;
pub mod admit;
pub mod attempt;
pub mod background;
pub mod backpressure;
pub mod boundary;
pub mod buckets;
pub mod cache;
pub mod capacity;
pub mod config;
pub mod conn;
pub mod fallback;
pub mod metrics;
pub mod origin;
pub mod owned;
pub mod plugin;
pub mod proxy;
pub mod route;
pub mod sendbuf;
pub mod shard;
pub mod upstream;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use pingora_core::apps::http_app::HttpServer;
use pingora_core::listeners::ListenerConfig;
use pingora_core::protocols::l4::stream::L4BufferSettings;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::Server;
use pingora_core::services::listening::Service;

use config::{Config, OriginKind};
use origin::Origin;

/// Where the Unix sockets of directory origins live, ready for them: `server.runtime_dir`,
/// created 0700 when missing, refused when it is not ours or is writable by group or others
/// (another user could swap a socket); by default a fresh private directory under the system
/// temp dir, removed when cascade exits.
fn runtime_dir(cfg: &Config) -> Result<PathBuf, String> {
    match &cfg.server.runtime_dir {
        Some(d) => {
            let p = Path::new(d);
            let p = if p.is_absolute() {
                p.to_path_buf()
            } else {
                cfg.source.parent().unwrap_or(Path::new(".")).join(p)
            };
            owned::ensure_dir(&p).map_err(|e| format!("server.runtime_dir: {e}"))?;
            Ok(p)
        }
        None => {
            let p = owned::fresh_dir(&std::env::temp_dir(), "cascade")
                .map_err(|e| format!("runtime directory: {e}"))?;
            owned::remove_at_exit(p.clone());
            Ok(p)
        }
    }
}

/// Build the runtime state (origins resolved, router sorted) from a validated config.
pub fn build_state(cfg: &Config, rt_dir: &Path) -> Result<proxy::State, String> {
    let mut origins = Vec::with_capacity(cfg.origins.len());
    let own_pool = (cfg.server.upstream_pool == config::schema::UpstreamPool::Cascade).then_some(
        origin::pool::Settings {
            read_size: cfg.server.upstream_read_size as usize,
        },
    );
    for (i, o) in cfg.origins.iter().enumerate() {
        let sock = matches!(o.kind, OriginKind::Dir { .. }).then(|| dir_socket(rt_dir, i));
        origins.push(Origin::new(o, sock.as_deref(), own_pool)?);
    }
    let origins: Arc<[Origin]> = origins.into();
    origin::export_in_flight(&origins);
    Ok(proxy::State {
        router: route::Router::new(cfg.routes.clone()),
        groups: cfg.groups.clone(),
        origins,
        access_log: cfg.server.access_log,
        header_limits: cfg.server.header_limits,
        keepalive_secs: cfg.server.keepalive_timeout.as_secs(),
        cache: None,
        plugins: None,
        sets: Arc::new(buckets::Sets::build(cfg)),
        request_metrics: metrics::RequestMetrics::new(
            cfg.routes.iter().map(|r| r.name.as_str()),
            cfg.origins.iter().map(|o| o.name.as_str()),
        ),
    })
}

fn dir_socket(rt_dir: &Path, origin_ix: usize) -> PathBuf {
    rt_dir.join(format!("dir-origin-{origin_ix}.sock"))
}

/// The most client connections to hold (`server.max_connections`, or what the open-files
/// limit allows), after raising the soft open-files limit to the hard one (`capacity`).
fn max_connections(cfg: &Config) -> u64 {
    let nofile = match capacity::raise_open_files() {
        Ok((before, now)) => {
            if now > before {
                log::info!("open files limit raised from {before} to {now} (the hard limit)");
            }
            now
        }
        Err(e) => {
            log::warn!("open files limit: {e}; assuming 1024");
            1024
        }
    };
    let allowed = capacity::default_max_connections(nofile);
    match cfg.server.max_connections {
        Some(n) => {
            if n > allowed {
                log::warn!(
                    "server.max_connections {n} is more than the open files limit ({nofile}) \
                     allows with one upstream connection each ({allowed}): raise the hard \
                     limit (LimitNOFILE=, ulimit -Hn) or expect failed connects and accepts"
                );
            }
            n
        }
        None => {
            log::info!(
                "max_connections {allowed} (the open files limit, {nofile}, allows it; \
                 server.max_connections sets it)"
            );
            allowed
        }
    }
}

/// Build the Pingora server with every service of the config. Does not start it.
pub fn build_server(cfg: &Config) -> Result<Server, String> {
    let rt_dir = runtime_dir(cfg)?;

    let mut conf = ServerConf {
        threads: cfg
            .server
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        ..ServerConf::default()
    };
    let grace = cfg.server.grace_period.as_secs();
    conf.grace_period_seconds = Some(grace);
    conf.graceful_shutdown_timeout_seconds = Some(grace);
    conf.upgrade_sock = rt_dir.join("upgrade.sock").to_string_lossy().into_owned();
    conf.pid_file = rt_dir.join("cascade.pid").to_string_lossy().into_owned();
    let mut state = build_state(cfg, &rt_dir)?;
    if let Some(c) = &cfg.cache {
        let opened = cache::Cache::open(c.clone()).map_err(|e| match &c.disk {
            Some((p, _)) => format!("cache.disk.path {}: {e}", p.display()),
            None => format!("cache: {e}"),
        })?;
        state.cache = Some(Box::leak(Box::new(opened)));
    }
    state.plugins = plugin::Runtime::load(cfg)?;
    if let Some(rt) = &state.plugins {
        rt.watch_sighup();
        plugin::start_ticks(rt, state.origins.clone());
    }
    upstream::monitor::start(state.origins.clone());
    buckets::start(state.sets.clone(), state.origins.clone());
    let state = Arc::new(state);
    // Replays are retries: allow one per fallback, plus Pingora's reused-connection retries.
    conf.max_retries = state.max_attempts() + 2;
    // The TLS sessions of https attempts' kept connections: the same connector options as the
    // proxy's own (trust store, bind addresses, key log), built now rather than in a request.
    origin::pool::init_tls(&conf);

    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    // Directory origins, each on its own Unix socket, one thread each (file I/O is async).
    for (i, o) in cfg.origins.iter().enumerate() {
        if let OriginKind::Dir { root } = &o.kind {
            let app = origin::dir::DirOrigin::new(root, o.read_only)
                .map_err(|e| format!("origin `{}`: {e}", o.name))?;
            let sock = dir_socket(&rt_dir, i);
            let _ = std::fs::remove_file(&sock);
            let mut svc = Service::new(format!("dir origin {}", o.name), app);
            use std::os::unix::fs::PermissionsExt;
            svc.add_uds(
                &sock.to_string_lossy(),
                Some(std::fs::Permissions::from_mode(0o600)),
            );
            server.add_service(svc);
        }
    }

    let max_connections = max_connections(cfg);
    // The proxy app, behind cascade's HTTP/1 connection loop and its client timeouts (conn.rs).
    let app = pingora_proxy::http_proxy(
        &server.configuration,
        proxy::Cascade {
            state: state.clone(),
        },
    );
    let mut proxy = Service::new(
        "cascade proxy".to_string(),
        conn::ClientTimeouts::new(
            app,
            conn::ClientSettings {
                header: cfg.server.client_header_timeout,
                body: cfg.server.client_body_timeout,
                idle: cfg.server.keepalive_timeout,
                release_idle: cfg.server.release_idle,
                write_buffer: cfg.server.write_buffer as usize,
                send: cfg.server.send_timeout,
            },
            max_connections,
        ),
    );
    // No write buffer from Pingora: it would be held by every connection for its whole life,
    // idle keep-alives included; the connection loop gives each one `server.write_buffer`
    // held only while a response is written (sendbuf.rs). No read buffer by default either:
    // Pingora's 64 KiB one is held for the connection's life too (`server.read_buffer`).
    let buffers = L4BufferSettings::new(cfg.server.read_buffer as usize, 0);
    for addr in &cfg.listen {
        proxy.add_listener(ListenerConfig::tcp(addr.to_string()).l4_buffer(buffers));
    }
    server.add_service(proxy);

    if let Some(admin) = &cfg.admin {
        let app = admin::AdminApp::new(admin.token.clone(), state.clone());
        let mut svc = Service::new("admin".to_string(), HttpServer::new_app(app));
        svc.threads = Some(1);
        svc.add_tcp(&admin.addr.to_string());
        server.add_service(svc);
    }

    if let Some(addr) = cfg.metrics {
        let mut svc = Service::new(
            "metrics".to_string(),
            HttpServer::new_app(metrics::MetricsApp),
        );
        svc.threads = Some(1);
        svc.add_tcp(&addr.to_string());
        server.add_service(svc);
    }
    Ok(server)
}

#[cfg(test)]
mod tests {
    use crate::origin::pool;

    fn pool_of(server: &str) -> Option<pool::Settings> {
        let yaml = format!(
            "listen: [{{addr: 127.0.0.1:1}}]\nserver: {{{server}}}\n\
             origins: {{m: {{url: \"http://127.0.0.1:9/b\"}}}}\n\
             groups: {{g: {{main: m}}}}\nroutes: [{{group: g}}]\n"
        );
        let cfg = crate::config::load_str(&yaml, std::path::Path::new("/t.yaml"), &|_| None)
            .expect("valid");
        let state = crate::build_state(&cfg, std::path::Path::new("/tmp")).unwrap();
        state.origins[0].peers[0].pool_settings()
    }

    #[test]
    fn the_server_settings_reach_the_pool_of_every_origin() {
        assert_eq!(pool_of(""), Some(pool::Settings::default()));
        assert_eq!(pool_of("").unwrap().read_size, 64 * 1024);
        assert_eq!(
            pool_of("upstream_read_size: 8KiB"),
            Some(pool::Settings { read_size: 8192 })
        );
        assert_eq!(pool_of("upstream_pool: pingora"), None);
    }
}
