//! Turns YAML text into a validated [`Config`]: names resolved to indices, URLs parsed,
//! credentials read from the environment, directories checked. Every problem becomes a
//! [`ConfigError`] located through the [`Locator`]; loading goes on after an error so that
//! all of them are reported together.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde_yaml::Value;

use super::locate::{self, Locator};
use super::schema::*;
use super::{ConfigError, ConfigErrors};

/// A validated configuration. Origins, groups and routes refer to each other by index.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: PathBuf,
    pub server: ServerSection,
    pub listen: Vec<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    pub origins: Vec<OriginConfig>,
    pub groups: Vec<GroupConfig>,
    pub routes: Vec<RouteConfig>,
    pub cache: Option<crate::cache::CacheConfig>,
    pub admin: Option<AdminConfig>,
    /// Plugins by index (routes refer to them by index).
    pub plugins: Vec<super::plugins::PluginConfig>,
    /// `server.plugin_cache`, resolved against the config's directory.
    pub plugin_cache: Option<PathBuf>,
    /// Where bucket sets share their state (`None`: each instance keeps its own).
    pub redis: Option<RedisConfig>,
}

/// `redis:` with the URL read from the environment (redacted in Debug: it may hold a
/// password).
#[derive(Clone)]
pub struct RedisConfig {
    pub url: String,
    pub key_prefix: String,
    pub timeout: std::time::Duration,
    pub on_error: RedisOnError,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &"<redacted>")
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("on_error", &self.on_error)
            .finish()
    }
}

/// A bucket set: the members hold different objects; writes are placed by `strategy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketSetConfig {
    pub strategy: Placement,
    pub members: Vec<MemberConfig>,
    pub cooldown: SetCooldown,
    pub reconcile_every: Option<std::time::Duration>,
}

/// Most members of one bucket set (a request's plan holds them inline).
pub const MAX_MEMBERS: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberConfig {
    /// The origin's index and name (the member's name in metrics, `/status` and
    /// `X-Served-From`).
    pub origin: usize,
    pub name: String,
    pub capacity: u64,
    pub priority: u32,
    pub weight: u32,
}

/// The admin API: its address and the bearer token (from the environment; redacted in Debug).
#[derive(Clone)]
pub struct AdminConfig {
    pub addr: SocketAddr,
    pub token: String,
}

impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("addr", &self.addr)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// A route's cache rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RouteCache {
    pub enabled: bool,
    pub ttl: Option<std::time::Duration>,
    pub cache_authorized: bool,
    pub cache_cookies: bool,
    pub query: CacheQuery,
    pub set_cookie: SetCookie,
}

#[derive(Debug, Clone)]
pub struct OriginConfig {
    pub name: String,
    pub kind: OriginKind,
    pub read_only: bool,
    pub timeouts: Timeouts,
    pub balance: Balance,
    pub health: Option<HealthConfig>,
    pub passive: Passive,
    /// Other peers a request may try after a failed attempt.
    pub retries: u32,
    pub retry_on: RetryOn,
    pub dns_refresh: std::time::Duration,
}

impl OriginConfig {
    /// Its peers (none for a directory origin).
    pub fn peers(&self) -> &[PeerConfig] {
        match &self.kind {
            OriginKind::Http { peers } => peers,
            OriginKind::Dir { .. } => &[],
        }
    }

    /// Some peer signs with cascade's credentials.
    pub fn is_signed(&self) -> bool {
        self.peers().iter().any(|p| p.s3.is_some())
    }

    /// Some peer is a plain (unsigned) HTTP origin, which sees what the client sends.
    pub fn is_plain_http(&self) -> bool {
        self.peers().iter().any(|p| p.s3.is_none())
    }

    /// The extra forwarded headers of its signed peers.
    pub fn forward_headers(&self) -> impl Iterator<Item = &String> {
        self.peers()
            .iter()
            .filter_map(|p| p.s3.as_ref())
            .flat_map(|s| s.forward_headers.iter())
    }
}

#[derive(Debug, Clone)]
pub enum OriginKind {
    /// Any HTTP(S) origin (a bucket when a peer has `s3` or a bucket path): one or more peers.
    Http { peers: Vec<PeerConfig> },
    /// A local directory, served by cascade itself on a Unix socket.
    Dir { root: PathBuf },
}

/// One peer of an HTTP origin.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub name: String,
    pub weight: u32,
    pub priority: u32,
    pub tls: bool,
    pub tls_verify: bool,
    /// Host name or IP literal (no brackets), for connecting and SNI.
    pub host: String,
    pub port: u16,
    /// The Host header to send (`host` or `host:port` as written in the URL).
    pub host_header: String,
    /// Path prefix prepended to every key (`/bucket` for path-style), no trailing `/`.
    pub prefix: String,
    pub s3: Option<S3Signing>,
}

/// What makes an attempt fail over to another peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryOn {
    pub connect: bool,
    pub timeout: bool,
    /// Sorted.
    pub statuses: Vec<u16>,
}

impl RetryOn {
    pub fn status(&self, s: u16) -> bool {
        self.statuses.binary_search(&s).is_ok()
    }
}

/// A validated active health monitor.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    pub method: http::Method,
    /// Canonical path and query in the peer (the peer's prefix is added).
    pub target: String,
    /// Inclusive status ranges that mean up.
    pub expected: Vec<(u16, u16)>,
    pub expected_body: Option<String>,
    pub interval: std::time::Duration,
    pub timeout: std::time::Duration,
    pub rise: u32,
    pub fall: u32,
}

/// SigV4 settings with credentials already read from the environment. `Credentials`' Debug
/// output redacts the secret, so this type may be logged.
#[derive(Debug, Clone)]
pub struct S3Signing {
    pub region: String,
    pub service: String,
    pub credentials: aws_credential_types::Credentials,
    /// Extra client headers forwarded (and signed): lower-case names, or prefixes ending in `*`.
    pub forward_headers: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct GroupConfig {
    pub name: String,
    pub main: usize,
    pub fallbacks: Vec<usize>,
    pub fallback_on: Vec<u16>,
    pub skip_fallback: bool,
    pub cache_fallback: CacheFallback,
    pub read_only: bool,
    /// The client's `Authorization` and `Cookie` reach the fallbacks too.
    pub forward_credentials: bool,
    /// Some origin of the group signs with cascade's credentials: requests through it follow
    /// the S3 policy (`boundary::s3`).
    pub signed: bool,
    /// The `s3.forward_headers` of the group's signed origins: a request carrying one is not
    /// cached (what it changes, an SSE-C key say, is not in the cache key).
    pub forward_headers: Vec<String>,
    /// Reads go on to the fallbacks when main cannot answer.
    pub failover: bool,
    /// A bucket set in place of one main origin (`main` is then its first member by
    /// priority, for what needs one origin).
    pub set: Option<BucketSetConfig>,
    /// A client's `Cookie` reaches an origin that may answer by it (an unsigned HTTP main, or
    /// fallback with `forward_credentials`): requests with cookies are not cached unless the
    /// route says `cache_cookies` (signed origins never get the cookie; dir origins ignore it).
    pub cookies_reach_origin: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum HostMatch {
    #[default]
    Any,
    /// Lower-case host without port.
    Exact(String),
    /// `*.example.com` stored as `.example.com`: matches any name that ends with it.
    Suffix(String),
}

#[derive(Debug, Clone, Default)]
pub struct RouteConfig {
    pub name: String,
    pub host: HostMatch,
    /// Normalised prefix: starts with `/`, no trailing `/` except for the root itself.
    pub path: String,
    pub strip_prefix: bool,
    pub group: usize,
    pub max_upload_size: Option<u64>,
    pub require_content_length: bool,
    pub cache: RouteCache,
    /// The ordered plugin chain (indices into `Config::plugins`).
    pub plugins: Vec<usize>,
    /// Whether paths refused by the canonical check are taken as raw object keys.
    pub keys: KeyMode,
    /// The S3 sub-resources this route forwards to signed origins.
    pub s3_allow: crate::boundary::s3::Allow,
}

const TOP_LEVEL: &[&str] = &[
    "server", "listen", "metrics", "timeouts", "origins", "groups", "routes", "cache", "admin",
    "plugins", "redis",
];

pub(super) struct Ctx<'a> {
    file: &'a Path,
    loc: Locator,
    errors: Vec<ConfigError>,
}

impl Ctx<'_> {
    pub(super) fn err(&mut self, field: &str, message: impl Into<String>) {
        let pos = self.loc.find(field);
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line: pos.line,
            col: pos.col,
            field: field.to_string(),
            message: message.into(),
        });
    }

    /// Deserialize one node, reporting a failure at the innermost field serde names.
    pub(super) fn de<T: DeserializeOwned>(&mut self, path: &str, v: &Value) -> Option<T> {
        match serde_path_to_error::deserialize::<_, T>(v.clone()) {
            Ok(t) => Some(t),
            Err(e) => {
                let inner = e.path().to_string();
                let field = if inner == "." || inner.is_empty() {
                    path.to_string()
                } else if path.is_empty() {
                    inner
                } else {
                    format!("{path}.{inner}")
                };
                self.err(&field, e.inner().to_string());
                None
            }
        }
    }
}

pub(super) fn load(
    src: &str,
    file: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    let one = |line, col, message: String| {
        ConfigErrors(vec![ConfigError {
            file: file.to_path_buf(),
            line,
            col,
            field: String::new(),
            message,
        }])
    };
    let loc = Locator::build(src).map_err(|e| one(e.pos.line, e.pos.col, e.message))?;
    let root: Value = serde_yaml::from_str(src).map_err(|e| {
        let (line, col) = e
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((0, 0));
        one(line, col, e.to_string())
    })?;
    let mut cx = Ctx {
        file,
        loc,
        errors: Vec::new(),
    };
    let map = match root {
        Value::Mapping(m) => m,
        Value::Null => Default::default(),
        _ => return Err(one(1, 1, "the config must be a mapping of sections".into())),
    };

    let mut sections: HashMap<String, Value> = HashMap::new();
    for (k, v) in map {
        let Some(key) = k.as_str().map(str::to_string) else {
            cx.err("", "section names must be strings");
            continue;
        };
        if TOP_LEVEL.contains(&key.as_str()) {
            sections.insert(key, v);
        } else {
            cx.err(
                &key,
                format!(
                    "unknown field `{key}`, expected one of {}",
                    TOP_LEVEL
                        .iter()
                        .map(|s| format!("`{s}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
    }
    let section = |name: &str| sections.get(name).filter(|v| !v.is_null()).cloned();

    let server: ServerSection = section("server")
        .and_then(|v| cx.de("server", &v))
        .unwrap_or_default();
    let timeouts: Timeouts = section("timeouts")
        .and_then(|v| cx.de("timeouts", &v))
        .unwrap_or_default();
    let listeners: Vec<Listener> = section("listen")
        .and_then(|v| cx.de("listen", &v))
        .unwrap_or_default();
    let metrics: Option<MetricsSection> = section("metrics").and_then(|v| cx.de("metrics", &v));

    if !(1..=super::schema::MAX_PLUGIN_INSTANCES).contains(&server.plugin_instances) {
        cx.err(
            "server.plugin_instances",
            format!(
                "must be between 1 and {}",
                super::schema::MAX_PLUGIN_INSTANCES
            ),
        );
    }
    if server.send_timeout.is_zero() {
        cx.err(
            "server.send_timeout",
            "must be more than 0: every response would fail".to_string(),
        );
    }
    if server.client_body_timeout.is_zero() {
        cx.err(
            "server.client_body_timeout",
            "must be more than 0: a client would be waited for forever".to_string(),
        );
    }
    if server.client_header_timeout.subsec_nanos() != 0 || server.client_header_timeout.is_zero() {
        cx.err(
            "server.client_header_timeout",
            format!(
                "{:?}: must be whole seconds (the header timer's resolution), at least 1",
                server.client_header_timeout
            ),
        );
    }
    if server.keepalive_timeout.subsec_nanos() != 0 {
        cx.err(
            "server.keepalive_timeout",
            format!(
                "{:?} is not whole seconds (the idle timeout's resolution); 0 turns keep-alive off",
                server.keepalive_timeout
            ),
        );
    }
    if server.read_buffer > super::schema::MAX_WRITE_BUFFER {
        cx.err(
            "server.read_buffer",
            format!(
                "{} bytes; at most {} (it is held per connection)",
                server.read_buffer,
                super::schema::MAX_WRITE_BUFFER
            ),
        );
    }
    if server.write_buffer > super::schema::MAX_WRITE_BUFFER {
        cx.err(
            "server.write_buffer",
            format!(
                "must be at most {} bytes (1 MiB)",
                super::schema::MAX_WRITE_BUFFER
            ),
        );
    }
    let read = server.upstream_read_size;
    if !(super::schema::MIN_UPSTREAM_READ_SIZE..=super::schema::MAX_UPSTREAM_READ_SIZE)
        .contains(&read)
    {
        cx.err(
            "server.upstream_read_size",
            format!("{read} bytes; must be between 1 KiB and 64 KiB (Pingora's body buffer)"),
        );
    } else if read != super::schema::MAX_UPSTREAM_READ_SIZE
        && server.upstream_pool != super::schema::UpstreamPool::Cascade
    {
        cx.err(
            "server.upstream_read_size",
            "needs `upstream_pool: cascade` (Pingora's pool reads 64 KiB at a time)".to_string(),
        );
    }
    if server.max_connections == Some(0) {
        cx.err(
            "server.max_connections",
            "must be at least 1: no client could connect".to_string(),
        );
    }
    if server.threads == Some(0) {
        cx.err("server.threads", "must be at least 1");
    }
    if sections.get("listen").is_none_or(|v| v.is_null()) {
        cx.err(
            "listen",
            "at least one listener is required, e.g. `listen: [{addr: 0.0.0.0:8080}]`",
        );
    }
    let mut listen = Vec::new();
    let mut seen_addrs = HashSet::new();
    for (i, l) in listeners.iter().enumerate() {
        let field = format!("listen[{i}].addr");
        match parse_addr(&l.addr) {
            Ok(a) if !seen_addrs.insert(a) => cx.err(&field, format!("{a} is listed twice")),
            Ok(a) => listen.push(a),
            Err(m) => cx.err(&field, m),
        }
    }
    let metrics_addr = metrics.and_then(|m| match parse_addr(&m.addr) {
        Ok(a) if seen_addrs.contains(&a) => {
            cx.err("metrics.addr", format!("{a} is already a proxy listener"));
            None
        }
        Ok(a) => Some(a),
        Err(m) => {
            cx.err("metrics.addr", m);
            None
        }
    });
    let base_dir = file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));

    // Cache and admin.
    let cache_section: Option<CacheSection> = section("cache").and_then(|v| cx.de("cache", &v));
    let cache = cache_section.and_then(|c| cache_config(&mut cx, c, &base_dir));
    let admin_section: Option<AdminSection> = section("admin").and_then(|v| cx.de("admin", &v));
    let admin = admin_section.and_then(|a| {
        let addr = match parse_addr(&a.addr) {
            Ok(x) if seen_addrs.contains(&x) || Some(x) == metrics_addr => {
                cx.err(
                    "admin.addr",
                    format!("{x} is already used by another listener"),
                );
                return None;
            }
            Ok(x) => x,
            Err(m) => {
                cx.err("admin.addr", m);
                return None;
            }
        };
        match env(&a.token_env) {
            Some(t) if t.len() >= 16 => Some(AdminConfig { addr, token: t }),
            Some(_) => {
                cx.err(
                    "admin.token_env",
                    format!(
                        "the token in ${} is shorter than 16 characters",
                        a.token_env
                    ),
                );
                None
            }
            None => {
                cx.err(
                    "admin.token_env",
                    format!("environment variable ${} is not set", a.token_env),
                );
                None
            }
        }
    });
    let cache_declared = sections.get("cache").is_some_and(|v| !v.is_null());
    let redis_section: Option<RedisSection> = section("redis").and_then(|v| cx.de("redis", &v));
    let redis = redis_section.and_then(|r| redis_config(&mut cx, r, env));

    // Origins.
    let raw_origins: BTreeMap<String, Value> = section("origins")
        .and_then(|v| cx.de("origins", &v))
        .unwrap_or_default();
    let mut origins = Vec::new();
    // name -> index; an origin that failed validation still gets a name entry (None) so
    // that groups naming it do not report a second, misleading "unknown origin".
    let mut origin_ix: HashMap<String, Option<usize>> = HashMap::new();
    for (name, v) in &raw_origins {
        let path = locate::join("origins", name);
        let parsed = cx
            .de::<RawOrigin>(&path, v)
            .and_then(|raw| origin(&mut cx, &path, name, raw, timeouts, &base_dir, env));
        origin_ix.insert(name.clone(), parsed.as_ref().map(|_| origins.len()));
        origins.extend(parsed);
    }

    // Groups.
    let raw_groups: BTreeMap<String, Value> = section("groups")
        .and_then(|v| cx.de("groups", &v))
        .unwrap_or_default();
    let mut groups = Vec::new();
    let mut group_ix: HashMap<String, Option<usize>> = HashMap::new();
    for (name, v) in &raw_groups {
        let path = locate::join("groups", name);
        let parsed = cx
            .de::<RawGroup>(&path, v)
            .and_then(|raw| group(&mut cx, &path, name, raw, &origin_ix, &origins));
        group_ix.insert(name.clone(), parsed.as_ref().map(|_| groups.len()));
        groups.extend(parsed);
    }

    // Plugins.
    let raw_plugins: BTreeMap<String, Value> = section("plugins")
        .and_then(|v| cx.de("plugins", &v))
        .unwrap_or_default();
    let (plugins, plugin_ix) =
        super::plugins::plugins(&mut cx, &raw_plugins, &base_dir, env, &origin_ix);
    let plugin_cache = server.plugin_cache.as_ref().map(|d| base_dir.join(d));
    if raw_plugins.len() > server.plugin_instances as usize {
        cx.err(
            "server.plugin_instances",
            format!(
                "{} slots cannot hold one instance of each of the {} plugins",
                server.plugin_instances,
                raw_plugins.len()
            ),
        );
    }

    // Routes.
    let raw_routes: Vec<Value> = section("routes")
        .and_then(|v| cx.de("routes", &v))
        .unwrap_or_default();
    if raw_routes.is_empty() && sections.contains_key("routes") {
        cx.err("routes", "no routes: every request would get 404");
    }
    let mut routes: Vec<RouteConfig> = Vec::new();
    let mut seen_routes: HashMap<(HostMatch, String), usize> = HashMap::new();
    let mut seen_names: HashSet<String> = HashSet::new();
    for (i, v) in raw_routes.iter().enumerate() {
        let path = locate::index("routes", i);
        let Some(raw) = cx.de::<RawRoute>(&path, v) else {
            continue;
        };
        let chain = super::plugins::chain(&mut cx, &path, &raw.plugins, &plugin_ix);
        let Some(mut r) = route(&mut cx, &path, i, raw, &group_ix, cache_declared) else {
            continue;
        };
        let Some(chain) = chain else {
            continue;
        };
        r.plugins = chain;
        if let Some(prev) = seen_routes.insert((r.host.clone(), r.path.clone()), i) {
            cx.err(
                &path,
                format!("same host and path as routes[{prev}]; it would never match"),
            );
            continue;
        }
        if !seen_names.insert(r.name.clone()) {
            cx.err(
                &format!("{path}.name"),
                format!("route name `{}` is used twice", r.name),
            );
            continue;
        }
        routes.push(r);
    }

    if !cx.errors.is_empty() {
        cx.errors.sort_by_key(|e| (e.line, e.col));
        return Err(ConfigErrors(cx.errors));
    }
    Ok(Config {
        source: file.to_path_buf(),
        server,
        listen,
        metrics: metrics_addr,
        origins,
        groups,
        routes,
        cache,
        admin,
        plugins,
        plugin_cache,
        redis,
    })
}

fn cache_config(
    cx: &mut Ctx,
    c: CacheSection,
    base_dir: &Path,
) -> Option<crate::cache::CacheConfig> {
    let mut ok = true;
    if c.memory < 1 << 20 {
        cx.err("cache.memory", "must be at least 1MiB");
        ok = false;
    }
    if c.fill_memory < 1 << 20 {
        cx.err("cache.fill_memory", "must be at least 1MiB");
        ok = false;
    }
    if c.slice_size != 0 && c.slice_size < 64 * 1024 {
        cx.err("cache.slice_size", "must be 0 (off) or at least 64KiB");
        ok = false;
    }
    if c.max_object_size == 0 {
        cx.err("cache.max_object_size", "must be greater than zero");
        ok = false;
    }
    if c.lock_timeout.is_zero() {
        cx.err("cache.lock_timeout", "must be greater than zero");
        ok = false;
    }
    if !(1..=64).contains(&c.max_variants) {
        cx.err("cache.max_variants", "must be between 1 and 64");
        ok = false;
    }
    let disk = match c.disk {
        Some(d) => {
            if d.size < 1 << 20 {
                cx.err("cache.disk.size", "must be at least 1MiB");
                ok = false;
            }
            let p = PathBuf::from(&d.path);
            let p = if p.is_absolute() { p } else { base_dir.join(p) };
            if p.exists() && !p.is_dir() {
                cx.err(
                    "cache.disk.path",
                    format!("{} exists and is not a directory", p.display()),
                );
                ok = false;
            }
            Some((p, d.size))
        }
        None => None,
    };
    ok.then_some(crate::cache::CacheConfig {
        memory: c.memory,
        disk,
        fill_memory: c.fill_memory,
        max_object_size: c.max_object_size,
        default_ttl: c.default_ttl,
        negative_ttl: c.negative_ttl,
        lock_timeout: c.lock_timeout,
        stale_if_error: c.stale_if_error,
        stale_while_revalidate: c.stale_while_revalidate,
        slice_size: c.slice_size,
        max_variants: c.max_variants,
    })
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    SocketAddr::from_str(s.trim()).map_err(|_| {
        format!("invalid address `{s}`; write IP:PORT, e.g. `0.0.0.0:8080` or `[::1]:8080`")
    })
}

fn origin(
    cx: &mut Ctx,
    path: &str,
    name: &str,
    raw: RawOrigin,
    defaults: Timeouts,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<OriginConfig> {
    let timeouts = raw.timeouts.apply(defaults);
    let set = [raw.url.is_some(), raw.dir.is_some(), raw.peers.is_some()];
    if set.iter().filter(|x| **x).count() > 1 {
        cx.err(path, "set one of `url`, `peers` or `dir`");
        return None;
    }
    let kind = if let Some(dir) = &raw.dir {
        if raw.s3.is_some() {
            cx.err(
                &locate::join(path, "s3"),
                "a `dir` origin is not signed; remove `s3`",
            );
            return None;
        }
        let p = base_dir.join(dir);
        match std::fs::metadata(&p) {
            Ok(m) if m.is_dir() => OriginKind::Dir {
                root: p.canonicalize().unwrap_or(p),
            },
            Ok(_) => {
                cx.err(
                    &locate::join(path, "dir"),
                    format!("{} is not a directory", p.display()),
                );
                return None;
            }
            Err(e) => {
                cx.err(&locate::join(path, "dir"), format!("{}: {e}", p.display()));
                return None;
            }
        }
    } else if let Some(url) = &raw.url {
        let one = RawPeer {
            url: url.clone(),
            name: None,
            weight: 1,
            priority: 1,
            s3: None,
            tls_verify: None,
        };
        let peer = peer(cx, path, &locate::join(path, "url"), one, &raw, env)?;
        OriginKind::Http { peers: vec![peer] }
    } else if let Some(list) = &raw.peers {
        if list.is_empty() || list.len() > 64 {
            cx.err(&locate::join(path, "peers"), "an origin has 1 to 64 peers");
            return None;
        }
        let mut peers = Vec::with_capacity(list.len());
        let mut names = HashSet::new();
        let mut ok = true;
        for (i, p) in list.iter().enumerate() {
            let ppath = locate::index(&locate::join(path, "peers"), i);
            let Some(parsed) = peer(
                cx,
                &ppath,
                &locate::join(&ppath, "url"),
                p.clone(),
                &raw,
                env,
            ) else {
                ok = false;
                continue;
            };
            if !names.insert(parsed.name.clone()) {
                cx.err(
                    &locate::join(&ppath, "name"),
                    format!("peer name `{}` is used twice in this origin", parsed.name),
                );
                ok = false;
                continue;
            }
            peers.push(parsed);
        }
        if !ok {
            return None;
        }
        if peers.iter().all(|p| p.weight == 0) {
            cx.err(
                &locate::join(path, "peers"),
                "every peer has weight 0: none would ever be chosen",
            );
            return None;
        }
        OriginKind::Http { peers }
    } else {
        cx.err(
            path,
            "an origin needs `url` (an HTTP(S) origin or bucket), `peers` (several) or `dir` (a local directory)",
        );
        return None;
    };
    if timeouts.connect.is_zero() || timeouts.read.is_zero() || timeouts.total.is_zero() {
        cx.err(
            &locate::join(path, "timeouts"),
            "timeouts must be greater than zero",
        );
        return None;
    }
    let retry_on = retry_on(cx, &locate::join(path, "retry_on"), &raw.retry_on)?;
    let health = match &raw.health {
        Some(h) => Some(health(cx, &locate::join(path, "health"), h)?),
        None => None,
    };
    if matches!(kind, OriginKind::Dir { .. }) && (raw.health.is_some() || raw.peers.is_some()) {
        cx.err(path, "a `dir` origin has no peers to monitor or balance");
        return None;
    }
    if raw.dns_refresh.is_zero() {
        cx.err(
            &locate::join(path, "dns_refresh"),
            "must be greater than zero",
        );
        return None;
    }
    if raw.passive.failures > 0 && raw.passive.cooldown.is_zero() {
        cx.err(
            &locate::join(path, "passive.cooldown"),
            "must be greater than zero",
        );
        return None;
    }
    if raw.passive.max_cooldown < raw.passive.cooldown {
        cx.err(
            &locate::join(path, "passive.max_cooldown"),
            "must be at least `cooldown`",
        );
        return None;
    }
    if raw.retries > 16 {
        cx.err(&locate::join(path, "retries"), "at most 16");
        return None;
    }
    Some(OriginConfig {
        name: name.to_string(),
        kind,
        read_only: raw.read_only,
        timeouts,
        balance: raw.balance,
        health,
        passive: raw.passive,
        retries: raw.retries,
        retry_on,
        dns_refresh: raw.dns_refresh,
    })
}

/// One peer: its URL (`field` locates it), its own or the origin's `s3`, name and weights.
fn peer(
    cx: &mut Ctx,
    path: &str,
    field: &str,
    raw: RawPeer,
    origin: &RawOrigin,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<PeerConfig> {
    let parsed = match parse_origin_url(&raw.url) {
        Ok(u) => u,
        Err(m) => {
            cx.err(field, m);
            return None;
        }
    };
    let (s3, s3_path) = match (raw.s3, &origin.s3) {
        (Some(own), _) => (Some(own), locate::join(path, "s3")),
        (None, Some(shared)) => (Some(shared.clone()), "s3".to_string()),
        (None, None) => (None, String::new()),
    };
    let s3_field = if s3_path == "s3" {
        // The origin's shared `s3:` (its location is the origin's).
        locate::join(path.split(".peers[").next().unwrap_or(path), "s3")
    } else {
        s3_path
    };
    if let Some(s3) = &s3 {
        let virtual_hosted = s3
            .virtual_hosted
            .unwrap_or_else(|| virtual_hosted_bucket(&parsed.host));
        if parsed.prefix.is_empty() && !virtual_hosted {
            cx.err(
                field,
                format!(
                    "a signed origin must name its bucket: `{}/BUCKET` (path-style), or a bucket host such as `https://BUCKET.s3.REGION.amazonaws.com` (set `s3.virtual_hosted: true` when the host names the bucket at another provider); at a service root, a client could list, create or delete buckets with cascade's credentials",
                    raw.url.trim_end_matches('/')
                ),
            );
            return None;
        }
    }
    let s3 = match s3 {
        None => None,
        Some(s3) => Some(signing(cx, &s3_field, s3, env)?),
    };
    let name = raw
        .name
        .clone()
        .unwrap_or_else(|| parsed.host_header.clone());
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
    {
        cx.err(
            &locate::join(path, "name"),
            format!("peer name `{name}`: use letters, digits, `-`, `_`, `.` or `:`"),
        );
        return None;
    }
    Some(PeerConfig {
        name,
        weight: raw.weight,
        priority: raw.priority,
        tls: parsed.tls,
        tls_verify: raw.tls_verify.unwrap_or(origin.tls_verify),
        host: parsed.host,
        port: parsed.port,
        host_header: parsed.host_header,
        prefix: parsed.prefix,
        s3,
    })
}

/// `retry_on`: `connect`, `timeout`, statuses (500-599) or `5xx`.
fn retry_on(cx: &mut Ctx, path: &str, raw: &[Value]) -> Option<RetryOn> {
    let mut r = RetryOn::default();
    for (i, v) in raw.iter().enumerate() {
        let field = locate::index(path, i);
        match v {
            Value::String(s) if s == "connect" => r.connect = true,
            Value::String(s) if s == "timeout" => r.timeout = true,
            Value::String(s) if s == "5xx" => r.statuses.extend(500..=599),
            Value::Number(n) if n.as_u64().is_some_and(|n| (500..=599).contains(&n)) => {
                r.statuses.push(n.as_u64().expect("checked") as u16)
            }
            other => {
                cx.err(
                    &field,
                    format!(
                        "`{}` is not `connect`, `timeout`, `5xx` or a status 500-599",
                        serde_yaml::to_string(other).unwrap_or_default().trim()
                    ),
                );
                return None;
            }
        }
    }
    r.statuses.sort_unstable();
    r.statuses.dedup();
    Some(r)
}

fn health(cx: &mut Ctx, path: &str, h: &RawHealth) -> Option<HealthConfig> {
    let method = match h.method.as_deref().map(str::to_ascii_uppercase).as_deref() {
        None | Some("GET") => http::Method::GET,
        Some("HEAD") => {
            if h.expected_body.is_some() {
                cx.err(
                    &locate::join(path, "method"),
                    "HEAD has no body to check `expected_body` against: use GET",
                );
                return None;
            }
            http::Method::HEAD
        }
        Some(m) => {
            cx.err(
                &locate::join(path, "method"),
                format!("`{m}` is not GET or HEAD"),
            );
            return None;
        }
    };
    let target = match crate::boundary::path::canonicalize(
        h.path.split('?').next().unwrap_or("").as_bytes(),
    ) {
        Ok(c) if c.violations.is_empty() => {
            crate::boundary::target_string(&c.path, h.path.split_once('?').map(|(_, q)| q))
        }
        _ => {
            cx.err(
                &locate::join(path, "path"),
                format!("`{}` is not a clean path starting with `/`", h.path),
            );
            return None;
        }
    };
    let mut expected = Vec::new();
    match &h.expected_codes {
        None => expected.push((200, 200)),
        Some(list) if list.is_empty() => {
            cx.err(&locate::join(path, "expected_codes"), "must not be empty");
            return None;
        }
        Some(list) => {
            for (i, v) in list.iter().enumerate() {
                let range = match v {
                    Value::Number(n) => n
                        .as_u64()
                        .filter(|n| (100..=599).contains(n))
                        .map(|n| (n as u16, n as u16)),
                    Value::String(s) => {
                        let b = s.as_bytes();
                        (b.len() == 3 && (b'1'..=b'5').contains(&b[0]) && &b[1..] == b"xx").then(
                            || {
                                let c = u16::from(b[0] - b'0') * 100;
                                (c, c + 99)
                            },
                        )
                    }
                    _ => None,
                };
                match range {
                    Some(r) => expected.push(r),
                    None => {
                        cx.err(
                            &locate::index(&locate::join(path, "expected_codes"), i),
                            "a status (200) or a class (\"2xx\")",
                        );
                        return None;
                    }
                }
            }
        }
    }
    if h.rise == 0 || h.fall == 0 {
        cx.err(path, "`rise` and `fall` must be at least 1");
        return None;
    }
    if h.interval.is_zero() || h.timeout.is_zero() {
        cx.err(path, "`interval` and `timeout` must be greater than zero");
        return None;
    }
    if h.timeout > h.interval {
        cx.err(
            &locate::join(path, "timeout"),
            "must not be longer than `interval`",
        );
        return None;
    }
    Some(HealthConfig {
        method,
        target,
        expected,
        expected_body: h.expected_body.clone(),
        interval: h.interval,
        timeout: h.timeout,
        rise: h.rise,
        fall: h.fall,
    })
}

fn signing(
    cx: &mut Ctx,
    path: &str,
    s3: RawS3,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<S3Signing> {
    let mut read = |field: &str, var: &str| -> Option<String> {
        match env(var).filter(|v| !v.is_empty()) {
            Some(v) => Some(v),
            None => {
                cx.err(
                    &locate::join(path, field),
                    format!("environment variable `{var}` is not set (credentials are read from the environment only)"),
                );
                None
            }
        }
    };
    let ak = read("access_key_env", &s3.access_key_env);
    let sk = read("secret_key_env", &s3.secret_key_env);
    let token = match &s3.session_token_env {
        Some(var) => Some(read("session_token_env", var)?),
        None => None,
    };
    if s3.region.trim().is_empty() {
        cx.err(&locate::join(path, "region"), "region must not be empty");
        return None;
    }
    let mut forward_headers = Vec::new();
    for (i, h) in s3.forward_headers.iter().enumerate() {
        let name = h.trim().to_ascii_lowercase();
        let base = name.strip_suffix('*').unwrap_or(&name);
        if base.is_empty() || http::HeaderName::from_bytes(base.as_bytes()).is_err() {
            cx.err(
                &locate::index(&locate::join(path, "forward_headers"), i),
                format!("`{h}` is not a header name (or a prefix ending in `*`)"),
            );
            return None;
        }
        if crate::boundary::s3::signer_owned(base) {
            cx.err(
                &locate::index(&locate::join(path, "forward_headers"), i),
                format!("`{h}` is set by the signer; it cannot be forwarded from the client"),
            );
            return None;
        }
        forward_headers.push(name);
    }
    Some(S3Signing {
        forward_headers,
        region: s3.region,
        service: s3.service,
        credentials: aws_credential_types::Credentials::new(
            ak?,
            sk?,
            token,
            None,
            "cascade-config",
        ),
    })
}

/// Does a host name a bucket at a provider whose host names are known (AWS S3, GCS, R2,
/// DigitalOcean Spaces, Backblaze B2, Wasabi)? A service endpoint (`s3.us-east-1.amazonaws.com`,
/// `storage.googleapis.com`, `ACCOUNT.r2.cloudflarestorage.com`) does not.
fn virtual_hosted_bucket(host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    let labels: Vec<&str> = host.split('.').collect();
    let first = labels[0];
    let ends = |suffix: &str| host.ends_with(suffix);
    if ends(".amazonaws.com") || ends(".backblazeb2.com") || ends(".wasabisys.com") {
        // `BUCKET.s3.REGION.amazonaws.com`, `BUCKET.s3-REGION...`; the endpoint starts `s3`.
        return labels.len() >= 4 && !first.starts_with("s3") && labels[1].starts_with("s3");
    }
    if ends(".storage.googleapis.com") {
        return labels.len() >= 4;
    }
    if ends(".r2.cloudflarestorage.com") {
        return labels.len() >= 5; // BUCKET.ACCOUNT.r2.cloudflarestorage.com
    }
    if ends(".digitaloceanspaces.com") {
        return labels.len() >= 4; // BUCKET.REGION.digitaloceanspaces.com
    }
    false
}

struct ParsedUrl {
    tls: bool,
    host: String,
    port: u16,
    host_header: String,
    prefix: String,
}

fn parse_origin_url(url: &str) -> Result<ParsedUrl, String> {
    let bad = |why: &str| format!("invalid origin URL `{url}`: {why}");
    let uri = http::Uri::from_str(url.trim()).map_err(|e| bad(&e.to_string()))?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        Some(other) => return Err(bad(&format!("scheme `{other}` is not http or https"))),
        None => {
            return Err(bad(
                "it needs a scheme, e.g. `https://bucket.s3.us-east-1.amazonaws.com`",
            ))
        }
    };
    let auth = uri.authority().ok_or_else(|| bad("it has no host"))?;
    if auth.as_str().contains('@') {
        return Err(bad(
            "credentials do not belong in the URL; use `s3: {access_key_env, secret_key_env}`",
        ));
    }
    if uri.query().is_some() {
        return Err(bad("a query string is not allowed"));
    }
    let host = auth
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if host.is_empty() {
        return Err(bad("it has no host"));
    }
    let port = auth.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let prefix = uri.path().trim_end_matches('/').to_string();
    Ok(ParsedUrl {
        tls,
        host,
        port,
        host_header: auth.as_str().to_string(),
        prefix,
    })
}

fn group(
    cx: &mut Ctx,
    path: &str,
    name: &str,
    raw: RawGroup,
    origin_ix: &HashMap<String, Option<usize>>,
    origins: &[OriginConfig],
) -> Option<GroupConfig> {
    let ok = std::cell::Cell::new(true);
    let resolve = |cx: &mut Ctx, field: &str, origin: &str| -> Option<usize> {
        match origin_ix.get(origin) {
            Some(ix) => {
                if ix.is_none() {
                    ok.set(false); // already reported at the origin itself
                }
                *ix
            }
            None => {
                let mut known: Vec<&str> = origin_ix.keys().map(String::as_str).collect();
                known.sort_unstable();
                cx.err(
                    field,
                    format!("unknown origin `{origin}` (defined: {})", known.join(", ")),
                );
                ok.set(false);
                None
            }
        }
    };
    let (main, set) = match (&raw.main, &raw.buckets) {
        (Some(m), None) => (resolve(cx, &locate::join(path, "main"), m), None),
        (None, Some(b)) => {
            match bucket_set(cx, &locate::join(path, "buckets"), b, &resolve, origins) {
                Some(set) => (Some(set.members[0].origin), Some(set)),
                None => {
                    ok.set(false);
                    (None, None)
                }
            }
        }
        (Some(_), Some(_)) => {
            cx.err(
                &locate::join(path, "buckets"),
                "a group has either `main:` or `buckets:`, not both",
            );
            return None;
        }
        (None, None) => {
            cx.err(
                path,
                "missing field `main` (or `buckets:` for a bucket set)",
            );
            return None;
        }
    };
    let mains: Vec<usize> = match &set {
        Some(s) => s.members.iter().map(|m| m.origin).collect(),
        None => main.into_iter().collect(),
    };
    let mut fallbacks = Vec::new();
    let mut seen = HashSet::new();
    for (i, f) in raw.fallbacks.iter().enumerate() {
        let field = locate::index(&locate::join(path, "fallbacks"), i);
        if raw.main.as_ref() == Some(f) {
            cx.err(
                &field,
                format!("`{f}` is the main origin; a fallback must be another origin"),
            );
            ok.set(false);
            continue;
        }
        if !seen.insert(f.clone()) {
            cx.err(&field, format!("`{f}` is listed twice"));
            ok.set(false);
            continue;
        }
        if let Some(ix) = resolve(cx, &field, f) {
            if set.is_some() && mains.contains(&ix) {
                cx.err(
                    &field,
                    format!(
                        "`{f}` is a member of the bucket set; a fallback must be another origin"
                    ),
                );
                ok.set(false);
                continue;
            }
            fallbacks.push(ix);
        }
    }
    for (i, code) in raw.fallback_on.iter().enumerate() {
        if !(400..=599).contains(code) {
            cx.err(
                &locate::index(&locate::join(path, "fallback_on"), i),
                format!("{code} is not an error status (400-599); only errors can be replayed to a fallback"),
            );
            ok.set(false);
        }
    }
    if raw.fallback_on.is_empty() && !raw.fallbacks.is_empty() {
        cx.err(
            &locate::join(path, "fallback_on"),
            "empty: the fallbacks would never be used",
        );
        ok.set(false);
    }
    let main = main?;
    let write_origins = || mains.iter().copied();
    ok.get().then(|| GroupConfig {
        name: name.to_string(),
        main,
        fallback_on: raw.fallback_on,
        skip_fallback: raw.skip_fallback,
        cache_fallback: raw.cache_fallback,
        read_only: raw.read_only || write_origins().any(|o| origins[o].read_only),
        forward_credentials: raw.forward_credentials,
        signed: write_origins()
            .chain(fallbacks.iter().copied())
            .any(|o| origins[o].is_signed()),
        cookies_reach_origin: {
            let plain = |o: usize| origins[o].is_plain_http();
            write_origins().any(plain)
                || (raw.forward_credentials && fallbacks.iter().any(|&f| plain(f)))
        },
        forward_headers: write_origins()
            .chain(fallbacks.iter().copied())
            .flat_map(|o| origins[o].forward_headers().cloned())
            .collect(),
        failover: raw.failover,
        set,
        fallbacks,
    })
}

/// `groups.<g>.buckets`: members name distinct, writable origins with a capacity.
fn bucket_set(
    cx: &mut Ctx,
    path: &str,
    raw: &RawBucketSet,
    resolve: &dyn Fn(&mut Ctx, &str, &str) -> Option<usize>,
    origins: &[OriginConfig],
) -> Option<BucketSetConfig> {
    let mut ok = true;
    let members_path = locate::join(path, "members");
    if raw.members.is_empty() {
        cx.err(&members_path, "a bucket set needs at least one member");
        return None;
    }
    if raw.members.len() > MAX_MEMBERS {
        cx.err(
            &members_path,
            format!(
                "{} members; a bucket set has at most {MAX_MEMBERS}",
                raw.members.len()
            ),
        );
        return None;
    }
    let mut members = Vec::new();
    let mut seen = HashSet::new();
    for (i, m) in raw.members.iter().enumerate() {
        let field = locate::index(&members_path, i);
        if !seen.insert(m.origin.clone()) {
            cx.err(
                &locate::join(&field, "origin"),
                format!("`{}` is a member twice", m.origin),
            );
            ok = false;
            continue;
        }
        let Some(ix) = resolve(cx, &locate::join(&field, "origin"), &m.origin) else {
            ok = false;
            continue;
        };
        if origins[ix].read_only {
            cx.err(
                &locate::join(&field, "origin"),
                format!(
                    "origin `{}` is read-only; a bucket set's members take uploads",
                    m.origin
                ),
            );
            ok = false;
        }
        if m.capacity == 0 {
            cx.err(
                &locate::join(&field, "capacity"),
                "must be greater than zero",
            );
            ok = false;
        }
        members.push(MemberConfig {
            origin: ix,
            name: m.origin.clone(),
            capacity: m.capacity,
            priority: m.priority,
            weight: m.weight,
        });
    }
    if raw.strategy == Placement::Weighted && raw.members.iter().all(|m| m.weight == 0) {
        cx.err(
            &locate::join(path, "strategy"),
            "`weighted` with every member's weight 0: no upload could be placed",
        );
        ok = false;
    }
    let c = raw.cooldown;
    if c.failures == 0 {
        cx.err(
            &locate::join(&locate::join(path, "cooldown"), "failures"),
            "must be at least 1",
        );
        ok = false;
    }
    if c.max < c.step {
        cx.err(
            &locate::join(&locate::join(path, "cooldown"), "max"),
            format!("{:?} is shorter than `step` ({:?})", c.max, c.step),
        );
        ok = false;
    }
    if raw
        .reconcile_every
        .is_some_and(|d| d < std::time::Duration::from_secs(1))
    {
        cx.err(
            &locate::join(path, "reconcile_every"),
            "must be at least 1s",
        );
        ok = false;
    }
    if !ok {
        return None;
    }
    // Stable by priority: `main` (and the order of `priority`) is the first by priority.
    members.sort_by_key(|m| m.priority);
    Some(BucketSetConfig {
        strategy: raw.strategy,
        members,
        cooldown: c,
        reconcile_every: raw.reconcile_every,
    })
}

fn redis_config(
    cx: &mut Ctx,
    r: RedisSection,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<RedisConfig> {
    let mut ok = true;
    if r.timeout.is_zero() || r.timeout > std::time::Duration::from_secs(10) {
        cx.err("redis.timeout", "must be between 1ms and 10s");
        ok = false;
    }
    let url = match env(&r.url_env) {
        Some(u) if u.starts_with("redis://") || u.starts_with("rediss://") => Some(u),
        Some(_) => {
            cx.err(
                "redis.url_env",
                format!("${} must hold a redis:// or rediss:// URL", r.url_env),
            );
            None
        }
        None => {
            cx.err(
                "redis.url_env",
                format!("environment variable ${} is not set", r.url_env),
            );
            None
        }
    };
    let url = url?;
    ok.then_some(RedisConfig {
        url,
        key_prefix: r.key_prefix,
        timeout: r.timeout,
        on_error: r.on_error,
    })
}

fn route(
    cx: &mut Ctx,
    path: &str,
    i: usize,
    raw: RawRoute,
    group_ix: &HashMap<String, Option<usize>>,
    cache_declared: bool,
) -> Option<RouteConfig> {
    let group = match group_ix.get(&raw.group) {
        Some(ix) => (*ix)?,
        None => {
            let mut known: Vec<&str> = group_ix.keys().map(String::as_str).collect();
            known.sort_unstable();
            cx.err(
                &locate::join(path, "group"),
                format!(
                    "unknown group `{}` (defined: {})",
                    raw.group,
                    known.join(", ")
                ),
            );
            return None;
        }
    };
    let host = match raw.host.as_deref().map(str::trim) {
        None | Some("") | Some("*") => HostMatch::Any,
        Some(h) => {
            let h = h.to_ascii_lowercase();
            let (wild, name) = match h.strip_prefix("*.") {
                Some(rest) => (true, rest.to_string()),
                None => (false, h.clone()),
            };
            let valid = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_');
            if !valid {
                cx.err(
                    &locate::join(path, "host"),
                    format!("invalid host `{h}`: write a name (`media.example.com`) or a wildcard (`*.example.com`), without port or scheme"),
                );
                return None;
            }
            if wild {
                HostMatch::Suffix(format!(".{name}"))
            } else {
                HostMatch::Exact(name)
            }
        }
    };
    if !raw.path.starts_with('/') {
        cx.err(
            &locate::join(path, "path"),
            format!("path prefix `{}` must start with `/`", raw.path),
        );
        return None;
    }
    let trimmed = if raw.path.len() > 1 {
        raw.path.trim_end_matches('/')
    } else {
        raw.path.as_str()
    };
    // The prefix is compared with canonical request paths: it must be one itself.
    let prefix = match crate::boundary::path::canonicalize(trimmed.as_bytes()) {
        Ok(c) if c.violations.is_empty() => c.path,
        Ok(c) => {
            let v = c.violations.first().map_or("", |v| v.describe());
            cx.err(
                &locate::join(path, "path"),
                format!("path prefix `{}` has {v}", raw.path),
            );
            return None;
        }
        Err(e) => {
            cx.err(
                &locate::join(path, "path"),
                format!("path prefix `{}`: {e}", raw.path),
            );
            return None;
        }
    };
    let s3_allow = match crate::boundary::s3::Allow::parse(&raw.s3_allow) {
        Ok(a) => a,
        Err((i, m)) => {
            cx.err(&locate::index(&locate::join(path, "s3_allow"), i), m);
            return None;
        }
    };
    let name = raw.name.clone().unwrap_or_else(|| format!("route{i}"));
    if raw.max_upload_size == Some(0) {
        cx.err(
            &locate::join(path, "max_upload_size"),
            "must be greater than zero",
        );
        return None;
    }
    let cache = match raw.cache {
        None => RouteCache {
            enabled: cache_declared,
            ..Default::default()
        },
        Some(RawRouteCache::Switch(on)) => RouteCache {
            enabled: on,
            ..Default::default()
        },
        Some(RawRouteCache::Detailed(m)) => RouteCache {
            enabled: m.enabled,
            ttl: m.ttl,
            cache_authorized: m.cache_authorized,
            cache_cookies: m.cache_cookies,
            query: m.query,
            set_cookie: m.set_cookie,
        },
    };
    if cache.enabled && !cache_declared {
        cx.err(
            &locate::join(path, "cache"),
            "caching is on for this route but there is no top-level `cache:` section",
        );
        return None;
    }
    Some(RouteConfig {
        cache,
        name,
        host,
        path: if prefix.is_empty() {
            "/".into()
        } else {
            prefix
        },
        strip_prefix: raw.strip_prefix,
        group,
        max_upload_size: raw.max_upload_size,
        require_content_length: raw.require_content_length,
        plugins: Vec::new(),
        keys: raw.keys,
        s3_allow,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "AK" => Some("AKIDEXAMPLE".into()),
            "SK" => Some("wJalrSUPERSECRETVALUE".into()),
            _ => None,
        }
    }

    fn load_ok(src: &str) -> Config {
        match load(src, Path::new("/tmp/t.yaml"), &env) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        }
    }

    fn load_err(src: &str) -> Vec<ConfigError> {
        load(src, Path::new("/tmp/t.yaml"), &env).unwrap_err().0
    }

    const GOOD: &str = "\
listen: [{addr: 127.0.0.1:8080}]
origins:
  a: {url: \"https://bucket.s3.eu-west-1.amazonaws.com\", s3: {region: eu-west-1, access_key_env: AK, secret_key_env: SK}}
  b: {url: \"http://127.0.0.1:9000/prod-bucket/\"}
groups:
  g: {main: a, fallbacks: [b]}
routes:
  - {host: \"*.example.com\", path: /media/, strip_prefix: true, group: g, max_upload_size: 5GiB}
";

    #[test]
    fn good_config_resolves_everything() {
        let c = load_ok(GOOD);
        assert_eq!(c.listen, vec!["127.0.0.1:8080".parse().unwrap()]);
        let a = &c.origins[0].peers()[0];
        assert!(a.tls);
        assert_eq!(a.host, "bucket.s3.eu-west-1.amazonaws.com");
        assert_eq!(a.port, 443);
        assert_eq!(a.prefix, "");
        assert_eq!(a.s3.as_ref().unwrap().region, "eu-west-1");
        let b = &c.origins[1].peers()[0];
        assert_eq!(b.prefix, "/prod-bucket");
        assert_eq!(b.host_header, "127.0.0.1:9000");
        assert_eq!(
            b.name, "127.0.0.1:9000",
            "a one-peer origin's peer is named by its host"
        );
        let g = &c.groups[0];
        assert_eq!(
            (g.main, g.fallbacks.clone(), g.fallback_on.clone()),
            (0, vec![1], vec![404])
        );
        let r = &c.routes[0];
        assert_eq!(r.host, HostMatch::Suffix(".example.com".into()));
        assert_eq!(r.path, "/media");
        assert_eq!(r.max_upload_size, Some(5 << 30));
    }

    #[test]
    fn secrets_do_not_appear_in_debug_output() {
        let c = load_ok(GOOD);
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("SUPERSECRET"), "{dbg}");
    }

    #[test]
    fn every_error_is_reported_with_its_line() {
        let src = "\
listen: [{addr: 127.0.0.1:8080}]
bogus: 1
origins:
  a: {url: \"ftp://x\"}
  b: {url: \"http://x/bucket\", s3: {access_key_env: NOPE, secret_key_env: SK}}
  c: {dir: /definitely/not/here}
  d: {urll: \"http://x\"}
groups:
  g: {main: zz, fallbacks: [a], fallback_on: [200]}
routes:
  - {path: /, group: nothere}
  - {path: media, group: g}
";
        let errs = load_err(src);
        let got: Vec<(usize, &str)> = errs.iter().map(|e| (e.line, e.field.as_str())).collect();
        for want in [
            (2, "bogus"),
            (4, "origins.a.url"),
            (5, "origins.b.s3.access_key_env"),
            (6, "origins.c.dir"),
            (7, "origins.d.urll"),
            (9, "groups.g.main"),
            (9, "groups.g.fallback_on[0]"),
            (11, "routes[0].group"),
        ] {
            assert!(got.contains(&want), "missing {want:?} in {got:?}");
        }
        let text = ConfigErrors(errs).to_string();
        assert!(text.contains("/tmp/t.yaml:4:"), "{text}");
        assert!(text.contains("NOPE"), "{text}");
    }

    #[test]
    fn bad_units_and_types() {
        let errs =
            load_err("listen: [{addr: 127.0.0.1:1}]\ntimeouts:\n  connect: soon\nroutes: []\n");
        assert_eq!(errs[0].field, "timeouts.connect");
        assert_eq!(errs[0].line, 3);
        let errs = load_err("listen: [{addr: nope}]\n");
        assert_eq!(errs[0].field, "listen[0].addr");
    }

    #[test]
    fn cache_fill_memory_has_a_default_and_a_floor() {
        let base = format!("{GOOD}cache:\n  memory: 16MiB\n");
        assert_eq!(load_ok(&base).cache.unwrap().fill_memory, 256 << 20);
        let c = load_ok(&format!("{base}  fill_memory: 64MiB\n"));
        assert_eq!(c.cache.unwrap().fill_memory, 64 << 20);
        let errs = load_err(&format!("{base}  fill_memory: 100KiB\n"));
        assert_eq!(errs[0].field, "cache.fill_memory");
        assert_eq!(errs[0].line, 11);
    }

    #[test]
    fn syntax_error_is_located() {
        let errs = load_err("listen: [\norigins: {a: 1\n");
        assert_eq!(errs.len(), 1);
        assert!(errs[0].line >= 1);
    }

    #[test]
    fn peers_are_validated_with_their_line() {
        let errs = load_err(
            "listen: [{addr: 127.0.0.1:1}]
origins:
  a:
    url: \"http://h/b\"
    peers: [{url: \"http://h/b\"}]
  b:
    peers:
      - {url: \"http://h:1/b\", name: x, weight: 0}
      - {url: \"http://h:2/b\", name: y, weight: 0}
  c:
    peers:
      - {url: \"http://h:1/b\", name: x}
      - {url: \"http://h:2/b\", name: x}
  d:
    url: \"http://h/b\"
    balance: fastest
  e:
    url: \"http://h/b\"
    health: {path: /hc, method: HEAD, expected_body: OK}
  f:
    url: \"http://h/b\"
    retry_on: [connect, 404]
  g:
    url: \"http://h/b\"
    health: {path: /hc, expected_codes: [\"2xy\"]}
groups: {}
",
        );
        let got: Vec<(usize, &str)> = errs.iter().map(|e| (e.line, e.field.as_str())).collect();
        for want in [
            (3, "origins.a"),
            (7, "origins.b.peers"),
            (13, "origins.c.peers[1].name"),
            (16, "origins.d.balance"),
            (19, "origins.e.health.method"),
            (22, "origins.f.retry_on[1]"),
            (25, "origins.g.health.expected_codes[0]"),
        ] {
            assert!(got.contains(&want), "missing {want:?} in {got:?}");
        }
        let c = load_ok(
            "listen: [{addr: 127.0.0.1:1}]
origins:
  m:
    peers:
      - {url: \"http://127.0.0.1:1/b\", name: a, weight: 3}
      - {url: \"http://127.0.0.1:2/b\", priority: 2, s3: {access_key_env: AK, secret_key_env: SK}}
    balance: hash
    health: {path: \"/hc?x=1\", expected_codes: [\"2xx\", 304], expected_body: ok}
    retry_on: [timeout, 5xx]
groups: {g: {main: m, failover: false}}
routes: [{group: g}]
",
        );
        let m = &c.origins[0];
        assert_eq!(m.peers().len(), 2);
        assert_eq!(
            m.peers()[1].name,
            "127.0.0.1:2",
            "named by host:port by default"
        );
        assert!(m.peers()[1].s3.is_some() && m.peers()[0].s3.is_none());
        let h = m.health.as_ref().unwrap();
        assert_eq!(
            (h.target.as_str(), h.expected.clone()),
            ("/hc?x=1", vec![(200, 299), (304, 304)])
        );
        assert!(!m.retry_on.connect && m.retry_on.timeout && m.retry_on.status(599));
        assert!(!c.groups[0].failover);
        assert!(c.groups[0].signed, "one signed peer makes the group signed");
    }

    #[test]
    fn signed_origins_must_name_their_bucket() {
        for (host, virt) in [
            ("media.s3.us-east-1.amazonaws.com", true),
            ("media.s3.amazonaws.com", true),
            ("media.s3-eu-west-1.amazonaws.com", true),
            ("s3.us-east-1.amazonaws.com", false),
            ("s3.amazonaws.com", false),
            ("media.storage.googleapis.com", true),
            ("storage.googleapis.com", false),
            ("media.acct.r2.cloudflarestorage.com", true),
            ("acct.r2.cloudflarestorage.com", false),
            ("media.nyc3.digitaloceanspaces.com", true),
            ("nyc3.digitaloceanspaces.com", false),
            ("minio.internal", false),
        ] {
            assert_eq!(virtual_hosted_bucket(host), virt, "{host}");
        }
        let signed = |url: &str, extra: &str| {
            format!(
                "listen: [{{addr: 127.0.0.1:1}}]\norigins:\n  a: {{url: \"{url}\", s3: {{access_key_env: AK, secret_key_env: SK{extra}}}}}\ngroups: {{g: {{main: a}}}}\nroutes: [{{group: g}}]\n"
            )
        };
        let e = load_err(&signed("http://minio:9000", ""));
        assert_eq!((e[0].line, e[0].field.as_str()), (3, "origins.a.url"));
        assert!(
            e[0].message.contains("must name its bucket"),
            "{}",
            e[0].message
        );
        load_err(&signed("https://s3.us-east-1.amazonaws.com/", ""));
        load_ok(&signed("http://minio:9000/media", ""));
        load_ok(&signed("https://media.s3.us-east-1.amazonaws.com", ""));
        load_ok(&signed("https://cdn.example.net", ", virtual_hosted: true"));
        // Unsigned origins are not ours to sign: any URL.
        load_ok("listen: [{addr: 127.0.0.1:1}]\norigins: {a: {url: \"http://web:8000\"}}\ngroups: {g: {main: a}}\nroutes: [{group: g}]\n");
    }

    #[test]
    fn new_trust_boundary_fields_are_validated_with_their_line() {
        let errs = load_err(
            "listen: [{addr: 127.0.0.1:1}]\norigins:\n  a: {url: \"http://h\"}\n  b: {url: \"http://h/b\", s3: {access_key_env: AK, secret_key_env: SK, forward_headers: [x-amz-date]}}\n\
             groups:\n  g: {main: a}\nroutes:\n  - {path: /a/../b, group: g}\n  - {path: /c, group: g, s3_allow: [acl, nope]}\n\
             \x20 - {path: /d, group: g, keys: loose}\n",
        );
        let fields: Vec<(usize, &str)> = errs.iter().map(|e| (e.line, e.field.as_str())).collect();
        for want in [
            (4, "origins.b.s3.forward_headers[0]"),
            (8, "routes[0].path"),
            (9, "routes[1].s3_allow[1]"),
            (10, "routes[2].keys"),
        ] {
            assert!(fields.contains(&want), "missing {want:?} in {fields:?}");
        }
        let c = load_ok(&format!(
            "{GOOD}  - {{path: \"/caf%C3%A9\", group: g, keys: raw, s3_allow: [list]}}\n"
        ));
        let r = &c.routes[1];
        assert_eq!(r.path, "/caf%C3%A9");
        assert_eq!(r.keys, KeyMode::Raw);
        assert!(c.groups[0].signed, "a signed main makes a signed group");
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        /// YAML values built from the schema's own words, so that generated files reach deep
        /// into validation rather than stop at the first unknown field.
        fn value() -> impl Strategy<Value = serde_yaml::Value> {
            let word = prop_oneof![
                Just("listen"),
                Just("addr"),
                Just("origins"),
                Just("groups"),
                Just("routes"),
                Just("url"),
                Just("dir"),
                Just("s3"),
                Just("main"),
                Just("fallbacks"),
                Just("path"),
                Just("group"),
                Just("cache"),
                Just("memory"),
                Just("disk"),
                Just("size"),
                Just("keys"),
                Just("raw"),
                Just("s3_allow"),
                Just("query"),
                Just("ignore"),
                Just("set_cookie"),
                Just("plugins"),
                Just("server"),
                Just("header_limits"),
                Just("max_line"),
                Just("timeouts"),
                Just("admin"),
                Just("a"),
                Just("g"),
                Just("/"),
                Just("http://127.0.0.1:1/b"),
                Just("10s"),
                Just("1MiB"),
                Just("127.0.0.1:0"),
                Just("access_key_env"),
                Just("AK"),
            ]
            .prop_map(|w| serde_yaml::Value::String(w.to_string()));
            let leaf = prop_oneof![
                word.clone(),
                any::<i64>().prop_map(|n| serde_yaml::Value::Number(n.into())),
                any::<bool>().prop_map(serde_yaml::Value::Bool),
                Just(serde_yaml::Value::Null),
                ".{0,12}".prop_map(serde_yaml::Value::String),
            ];
            leaf.prop_recursive(4, 48, 6, move |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..4)
                        .prop_map(serde_yaml::Value::Sequence),
                    proptest::collection::vec((word.clone(), inner), 0..5)
                        .prop_map(|kv| { serde_yaml::Value::Mapping(kv.into_iter().collect()) }),
                ]
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Whatever the file holds, loading answers a config or located errors; it never
            /// panics.
            #[test]
            fn loading_never_panics(v in value()) {
                let text = serde_yaml::to_string(&v).unwrap();
                match load(&text, Path::new("/tmp/p.yaml"), &env) {
                    Ok(_) => {}
                    Err(e) => prop_assert!(!e.0.is_empty()),
                }
            }

            #[test]
            fn arbitrary_text_never_panics(text in ".{0,200}") {
                let _ = load(&text, Path::new("/tmp/p.yaml"), &env);
            }
        }
    }
}
