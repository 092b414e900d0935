//! Origins at run time: an origin is one or more *peers* holding the same content; each peer
//! knows where an attempt connects (Pingora `HttpPeer`s, one per resolved address) and how the
//! request is rewritten for it (Host, bucket prefix + key, header allowlist, SigV4 signature).
//! Which peer an attempt uses, and their health, is `upstream`'s business. `dir` holds the
//! local-directory origin that cascade serves itself on a Unix socket (one peer).
//!
//! Invariant: `rewrite` starts from the client's request every time (Pingora re-clones the
//! downstream header per attempt), so a retry on another peer or a fallback replay never
//! inherits the previous peer's Host or signature.

pub mod dir;
pub mod fetch;
pub mod framing;
pub mod pool;
pub mod sign;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::RwLock;
use pingora_core::upstreams::peer::{HttpPeer, Scheme};
use pingora_http::RequestHeader;

use crate::config::{
    HealthConfig, OriginConfig, OriginKind, Passive, PeerConfig, RetryOn, Timeouts,
};
use crate::metrics::ShardedCounter;
use crate::upstream::{self, Budget, PeerState, Selector};
use sign::{s3_canonical_path, Signer};

/// How long an idle pooled upstream connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(60);

/// What of the client's request an attempt may carry besides the allowlist.
#[derive(Debug, Clone, Copy)]
pub struct Forward {
    /// The client's credentials (`Authorization`, `Cookie`): main only, unless the group
    /// says `forward_credentials`.
    pub credentials: bool,
}

pub struct Origin {
    pub name: String,
    pub read_only: bool,
    pub timeouts: Timeouts,
    pub peers: Vec<Peer>,
    pub selector: Selector,
    pub passive: Passive,
    pub retries: u32,
    pub retry_on: RetryOn,
    pub health: Option<HealthConfig>,
    pub dns_refresh: Duration,
    pub budget: Budget,
    /// `cascade_upstream_duration_seconds` of this origin (looked up once, not per attempt).
    pub upstream_duration: Arc<crate::metrics::ShardedHistogram>,
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origin")
            .field("name", &self.name)
            .field("peers", &self.peers)
            .finish_non_exhaustive()
    }
}

/// One peer of an origin.
pub struct Peer {
    pub name: String,
    /// `X-Served-From`: the origin's name for a one-peer origin, `origin/peer` otherwise.
    pub label: String,
    pub weight: u32,
    pub priority: u32,
    /// Host name or IP literal to resolve (`None`: a Unix socket).
    pub host: Option<String>,
    port: u16,
    tls: bool,
    tls_verify: bool,
    sni: String,
    timeouts: Timeouts,
    /// Attempts' connections (http and https) go through cascade's pool, with these
    /// settings (`server.upstream_pool`; `None`: Pingora's).
    own_pool: Option<pool::Settings>,
    host_header: String,
    prefix: String,
    /// `scheme://authority`, what the signature covers besides the path.
    url_base: String,
    signer: Option<Signer>,
    /// One connection target per resolved address (DNS refresh replaces them).
    targets: RwLock<Arc<[Target]>>,
    next_target: AtomicUsize,
    pub state: PeerState,
    pub metrics: PeerMetrics,
}

/// A peer's metric series, resolved once (no label lookup per request). Its attempts in
/// flight are exported from `PeerState`'s own count, read at scrape ([`export_in_flight`]).
pub struct PeerMetrics {
    /// The series' `origin` and `peer` label values.
    labels: [String; 2],
    pub up: prometheus::IntGauge,
    pub ejections: prometheus::IntCounter,
    /// By outcome: ok, status, connect, timeout, error (sharded per thread: counted on every
    /// attempt).
    pub outcomes: [Arc<ShardedCounter>; 5],
}

/// How an attempt on a peer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An answer (any status but a `retry_on` one).
    Ok,
    /// A `retry_on` status.
    Status,
    Connect,
    Timeout,
    /// A reset or protocol error after connecting.
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        ["ok", "status", "connect", "timeout", "error"][self as usize]
    }
}

/// Exports `cascade_peer_in_flight` for these origins' peers from their own counts of
/// attempts in flight (the ones the least-outstanding balancer reads), read at each scrape
/// until the origins are dropped.
pub fn export_in_flight(origins: &Arc<[Origin]>) {
    let origins = Arc::downgrade(origins);
    crate::metrics::METRICS
        .peer_in_flight
        .add_source(move |out| {
            let Some(origins) = origins.upgrade() else {
                return false;
            };
            for peer in origins.iter().flat_map(|o| o.peers.iter()) {
                let [origin, name] = &peer.metrics.labels;
                out(&[origin, name], i64::from(peer.state.in_flight()));
            }
            true
        });
}

impl PeerMetrics {
    fn new(origin: &str, peer: &str) -> PeerMetrics {
        let m = &crate::metrics::METRICS;
        let l = [origin, peer];
        let outcome = |o: Outcome| {
            m.peer_requests
                .with_label_values(&[origin, peer, o.as_str()])
        };
        let up = m.peer_up.with_label_values(&l);
        up.set(1);
        PeerMetrics {
            labels: l.map(str::to_string),
            up,
            ejections: m.peer_ejections.with_label_values(&l),
            outcomes: [
                outcome(Outcome::Ok),
                outcome(Outcome::Status),
                outcome(Outcome::Connect),
                outcome(Outcome::Timeout),
                outcome(Outcome::Error),
            ],
        }
    }
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("name", &self.name)
            .field("host_header", &self.host_header)
            .field("prefix", &self.prefix)
            .field("signer", &self.signer)
            .finish_non_exhaustive()
    }
}

fn template(addr: SocketAddr, tls: bool, sni: &str, verify: bool, t: &Timeouts) -> HttpPeer {
    let mut peer = HttpPeer::new(addr, tls, sni.to_string());
    peer.options.verify_cert = verify;
    peer.options.verify_hostname = verify;
    options(&mut peer, t);
    peer
}

/// One connection target of a peer: a resolved address.
struct Target {
    /// What Pingora connects with (cascade's own fetches and writes use it as it is).
    peer: HttpPeer,
    /// Client requests' attempts: cascade's pool for this address (`pool.rs`).
    pool: Option<pool::Connector>,
}

fn options(peer: &mut HttpPeer, t: &Timeouts) {
    peer.options.connection_timeout = Some(t.connect);
    peer.options.total_connection_timeout = Some(t.connect);
    peer.options.read_timeout = Some(t.read);
    peer.options.write_timeout = Some(t.write);
    peer.options.idle_timeout = Some(POOL_IDLE);
}

/// The `group_key` of attempts' peers (cascade's pool): never matches a pooled connection of
/// Pingora's.
const POOL_GROUP: u64 = u64::from_be_bytes(*b"cascpool");

impl Peer {
    fn http(
        cfg: &PeerConfig,
        label: String,
        t: Timeouts,
        origin: &str,
        own_pool: Option<pool::Settings>,
    ) -> Result<Peer, String> {
        let addrs: Vec<SocketAddr> = (cfg.host.as_str(), cfg.port)
            .to_socket_addrs()
            .map_err(|e| format!("origin `{origin}`: cannot resolve {}: {e}", cfg.host))?
            .collect();
        if addrs.is_empty() {
            return Err(format!("origin `{origin}`: {} has no address", cfg.host));
        }
        let scheme = if cfg.tls { "https" } else { "http" };
        let peer = Peer {
            name: cfg.name.clone(),
            label,
            weight: cfg.weight,
            priority: cfg.priority,
            host: Some(cfg.host.clone()),
            port: cfg.port,
            tls: cfg.tls,
            tls_verify: cfg.tls_verify,
            sni: cfg.host.clone(),
            timeouts: t,
            own_pool,
            host_header: cfg.host_header.clone(),
            prefix: cfg.prefix.clone(),
            url_base: format!("{scheme}://{}", cfg.host_header),
            signer: cfg.s3.as_ref().map(Signer::new),
            targets: RwLock::new(Arc::from(Vec::new())),
            next_target: AtomicUsize::new(0),
            state: PeerState::default(),
            metrics: PeerMetrics::new(origin, &cfg.name),
        };
        peer.set_addrs(&addrs);
        Ok(peer)
    }

    fn uds(sock: &Path, label: String, t: Timeouts, origin: &str) -> Result<Peer, String> {
        let mut http = HttpPeer::new_uds(&sock.to_string_lossy(), false, String::new())
            .map_err(|e| format!("origin `{origin}`: {e}"))?;
        options(&mut http, &t);
        Ok(Peer {
            name: origin.to_string(),
            label,
            weight: 1,
            priority: 1,
            host: None,
            port: 0,
            tls: false,
            tls_verify: false,
            sni: String::new(),
            timeouts: t,
            own_pool: None,
            host_header: "localhost".into(),
            prefix: String::new(),
            url_base: "http://localhost".into(),
            signer: None,
            targets: RwLock::new(Arc::from(vec![Target {
                peer: http,
                pool: None,
            }])),
            next_target: AtomicUsize::new(0),
            state: PeerState::default(),
            metrics: PeerMetrics::new(origin, origin),
        })
    }

    /// The addresses connections go to (a DNS refresh replaces them).
    pub fn set_addrs(&self, addrs: &[SocketAddr]) {
        let targets: Vec<Target> = addrs
            .iter()
            .map(|a| {
                let peer = template(*a, self.tls, &self.sni, self.tls_verify, &self.timeouts);
                // Attempts go through cascade's pool, which keeps the connections Pingora would
                // close after a replayed answer (and closes an upload's that was answered
                // before its body was out); for https it sets TLS up with this peer.
                let pool = self.own_pool.map(|settings| {
                    pool::Connector::new(
                        POOL_IDLE,
                        self.tls.then(|| peer.clone()),
                        self.timeouts.read,
                        settings,
                    )
                });
                Target { peer, pool }
            })
            .collect();
        *self.targets.write() = Arc::from(targets);
    }

    /// The settings of cascade's pool for its attempts (`None`: Pingora's pool).
    pub fn pool_settings(&self) -> Option<pool::Settings> {
        let targets = self.targets.read();
        targets.first()?.pool.as_ref().map(|c| c.settings())
    }

    /// Set the addresses when they differ from the current ones; `true` when they did.
    pub fn replace_addrs(&self, addrs: &[SocketAddr]) -> bool {
        let mut now: Vec<SocketAddr> = self
            .targets
            .read()
            .iter()
            .filter_map(|t| t.peer._address.as_inet().copied())
            .collect();
        now.sort();
        if now == addrs {
            return false;
        }
        self.set_addrs(addrs);
        true
    }

    /// A host name (not an IP literal) to re-resolve, with its port.
    pub fn dns_name(&self) -> Option<(&str, u16)> {
        let host = self.host.as_deref()?;
        host.parse::<std::net::IpAddr>()
            .is_err()
            .then_some((host, self.port))
    }

    pub fn needs_dns(&self) -> bool {
        self.dns_name().is_some()
    }

    /// The addresses it connects to now (`None` for a Unix socket).
    pub fn addrs(&self) -> Vec<String> {
        self.targets
            .read()
            .iter()
            .map(|t| t.peer._address.to_string())
            .collect()
    }

    /// A connection target for one of cascade's own requests (round robin over the resolved
    /// addresses): Pingora's connections and pool.
    pub fn http_peer(&self) -> Box<HttpPeer> {
        self.peer_for(false).0
    }

    /// Where an attempt went, for error messages: the peer's label and its real scheme (an
    /// https attempt through cascade's pool has a peer that says `HTTP` to Pingora, which
    /// speaks plain HTTP over the pool's TLS session).
    pub fn describe(&self, attempt: &HttpPeer) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        let sni = if self.tls {
            format!(", sni {}", self.sni)
        } else {
            String::new()
        };
        format!("peer {}: {scheme}://{}{sni}", self.label, attempt._address)
    }

    /// A connection target for a client request's attempt, read or write: it connects
    /// through cascade's pool (`pool.rs`) unless `server.upstream_pool: pingora` (or the
    /// peer is a Unix socket); the flag returned is set when the connection it gets is a
    /// kept one.
    pub fn attempt_peer(&self) -> (Box<HttpPeer>, Option<Arc<AtomicBool>>) {
        self.peer_for(true)
    }

    fn peer_for(&self, pooled: bool) -> (Box<HttpPeer>, Option<Arc<AtomicBool>>) {
        let targets = self.targets.read();
        let i = self.next_target.fetch_add(1, Relaxed) % targets.len().max(1);
        let t = &targets[i];
        let mut peer = Box::new(t.peer.clone());
        let Some(pool) = t.pool.as_ref().filter(|_| pooled) else {
            return (peer, None);
        };
        let reused = Arc::new(AtomicBool::new(false));
        peer.options.custom_l4 = Some(Arc::new(pool.for_attempt(reused.clone())));
        // Pingora looks in its own pool before it connects, by a hash that does not cover
        // `custom_l4`: a group of its own keeps an attempt from taking a connection Pingora
        // pooled for cascade's own fetches (or, for https below, a plain one to the same
        // address).
        peer.group_key = POOL_GROUP;
        if pool.is_tls() {
            // The pool's connection is already a TLS session (Pingora's, for the https
            // peer): Pingora speaks plain HTTP over it.
            peer.scheme = Scheme::HTTP;
        }
        // Pingora pools a virtual socket only when cascade's pool could not follow its
        // exchange (and could never reuse it): let it go at once.
        peer.options.idle_timeout = Some(Duration::ZERO);
        (peer, Some(reused))
    }

    pub fn is_signed(&self) -> bool {
        self.signer.is_some()
    }

    /// An attempt starts on this peer.
    pub fn enter(&self) {
        self.state.enter();
    }

    /// The attempt [`Peer::enter`]ed ended.
    pub fn leave(&self) {
        self.state.leave();
    }

    /// Rewrite the upstream request for this peer: `key` is the canonical object path
    /// (`boundary::path` normal form, starts with `/`), `query` the forwarded query (after the
    /// S3 policy). A signed peer gets only the allowlisted client headers
    /// (`boundary::s3::forward_header`), then the signature; `forward.credentials` false (a
    /// fallback) drops the client's `Authorization`, `Cookie` and `Proxy-Authorization`.
    pub fn rewrite(
        &self,
        req: &mut RequestHeader,
        key: &str,
        query: Option<&str>,
        forward: Forward,
    ) -> Result<(), String> {
        // Which client headers go: a signed origin gets the S3 allowlist; a fallback (another
        // trust domain) gets only what a read needs, nothing that could be a credential.
        let extra = self.signer.as_ref().map(|s| s.forward_headers());
        if extra.is_some() || !forward.credentials {
            let drop: Vec<http::HeaderName> = req
                .headers
                .keys()
                .filter(|n| {
                    let n = n.as_str();
                    extra.is_some_and(|e| !crate::boundary::s3::forward_header(n, e))
                        || (!forward.credentials && !crate::boundary::fallback_header(n))
                })
                .cloned()
                .collect();
            for n in &drop {
                req.remove_header(n);
            }
        }
        let query = match query {
            Some(q) if !forward.credentials => Some(crate::boundary::without_credentials(q)),
            q => q.map(std::borrow::Cow::Borrowed),
        };
        let query = query.as_deref().filter(|q| !q.is_empty());
        let mut target =
            String::with_capacity(self.prefix.len() + key.len() + 1 + query.map_or(0, str::len));
        target.push_str(&self.prefix);
        if self.signer.is_some() {
            target.push_str(&s3_canonical_path(key));
        } else {
            target.push_str(key);
        }
        if let Some(q) = query {
            target.push('?');
            target.push_str(q);
        }
        let uri = http::Uri::try_from(target).map_err(|e| format!("bad upstream path: {e}"))?;
        req.set_uri(uri);
        req.insert_header(http::header::HOST, &self.host_header)
            .map_err(|e| e.to_string())?;
        if let Some(signer) = &self.signer {
            // `sign` drops the client's Authorization before adding its own.
            signer.sign(req, &self.url_base, SystemTime::now())?;
        }
        Ok(())
    }
}

impl Origin {
    /// Build the runtime origin. `dir_socket` is where the directory origin of this name
    /// listens (only for `dir` origins). Host names are resolved here (and again every
    /// `dns_refresh` by `upstream::monitor`).
    /// `own_pool`: attempts' connections go through cascade's pool (`pool.rs`), with
    /// these settings.
    pub fn new(
        cfg: &OriginConfig,
        dir_socket: Option<&Path>,
        own_pool: Option<pool::Settings>,
    ) -> Result<Origin, String> {
        let t = cfg.timeouts;
        let peers = match &cfg.kind {
            OriginKind::Http { peers } => {
                let multi = peers.len() > 1;
                peers
                    .iter()
                    .map(|p| {
                        let label = if multi {
                            format!("{}/{}", cfg.name, p.name)
                        } else {
                            cfg.name.clone()
                        };
                        Peer::http(p, label, t, &cfg.name, own_pool)
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
            OriginKind::Dir { .. } => {
                let sock = dir_socket.ok_or_else(|| format!("origin `{}`: no socket", cfg.name))?;
                vec![Peer::uds(sock, cfg.name.clone(), t, &cfg.name)?]
            }
        };
        let members: Vec<upstream::Member> = peers
            .iter()
            .map(|p| upstream::Member {
                name: p.name.clone(),
                weight: p.weight,
                priority: p.priority,
            })
            .collect();
        Ok(Origin {
            name: cfg.name.clone(),
            read_only: cfg.read_only,
            timeouts: t,
            selector: Selector::new(cfg.balance, &members),
            peers,
            passive: cfg.passive,
            retries: cfg.retries,
            retry_on: cfg.retry_on.clone(),
            health: cfg.health.clone(),
            dns_refresh: cfg.dns_refresh,
            budget: Budget::default(),
            upstream_duration: crate::metrics::METRICS
                .upstream_duration
                .with_label_values(&[cfg.name.as_str()]),
        })
    }

    /// Some peer signs with cascade's credentials.
    pub fn is_signed(&self) -> bool {
        self.peers.iter().any(Peer::is_signed)
    }

    /// A peer for an attempt on `key`, not among `tried` (a bit set of peer indices): a usable one by the origin's
    /// balance, else (every usable one tried or none usable) `None`. When no peer at all is
    /// usable because of passive ejections only, the panic rule applies: ejected peers are
    /// tried rather than failing without trying (Envoy); peers the active monitor has down,
    /// or an operator drained, are never chosen.
    pub fn pick(&self, key: &str, tried: u64) -> Option<usize> {
        let now = upstream::now_ms();
        // `tried`: bit i = peer i (origins have at most 64 peers).
        let fresh = |i: usize| i >= 64 || tried & (1 << i) == 0;
        let in_flight = |i: usize| self.peers[i].state.in_flight();
        if let Some(i) = self.selector.pick(
            key.as_bytes(),
            |i| fresh(i) && self.peers[i].state.usable(now),
            in_flight,
        ) {
            return Some(i);
        }
        if self.peers.iter().any(|p| p.state.usable(now)) {
            return None; // usable peers exist; this request has tried them all
        }
        self.selector.pick(
            key.as_bytes(),
            |i| fresh(i) && self.peers[i].state.is_up() && !self.peers[i].state.is_draining(),
            in_flight,
        )
    }

    /// Would [`Origin::pick`] find a peer outside `tried`? (Without moving the balancer.)
    pub fn can_pick(&self, tried: u64) -> bool {
        let now = upstream::now_ms();
        let fresh = |i: usize| i >= 64 || tried & (1 << i) == 0;
        let usable = |p: &Peer| p.weight > 0 && p.state.usable(now);
        if self.peers.iter().any(usable) {
            return self
                .peers
                .iter()
                .enumerate()
                .any(|(i, p)| fresh(i) && usable(p));
        }
        self.peers
            .iter()
            .enumerate()
            .any(|(i, p)| fresh(i) && p.weight > 0 && p.state.is_up() && !p.state.is_draining())
    }

    /// Usable peers other than `except`: may passive detection eject `except`?
    pub fn others_usable(&self, except: usize) -> bool {
        let now = upstream::now_ms();
        self.peers
            .iter()
            .enumerate()
            .any(|(i, p)| i != except && p.state.usable(now))
    }

    /// A peer by name.
    pub fn peer_index(&self, name: &str) -> Option<usize> {
        self.peers.iter().position(|p| p.name == name)
    }

    /// How an attempt on peer `i` ended: counted, and passive detection updated (a
    /// connect error, a reset, a timeout or a `retry_on` status is a failure; an answer a
    /// success).
    /// Returns the ejection's cooldown when this failure ejected the peer.
    pub fn report(&self, i: usize, outcome: Outcome) -> Option<Duration> {
        let peer = &self.peers[i];
        peer.metrics.outcomes[outcome as usize].inc();
        match outcome {
            Outcome::Ok => {
                peer.state.success();
                None
            }
            // A reset after connecting counts too (Envoy's gateway failures): a peer that
            // accepts and drops connections is as sick as one that refuses them.
            Outcome::Status | Outcome::Connect | Outcome::Timeout | Outcome::Error => {
                let now = upstream::now_ms();
                match peer
                    .state
                    .failure(&self.passive, now, || self.others_usable(i))
                {
                    upstream::Verdict::Ejected(d) => {
                        peer.metrics.ejections.inc();
                        peer.metrics.up.set(0);
                        log::warn!(
                            "origin `{}`: peer `{}` ejected for {d:?} after {} consecutive failures",
                            self.name,
                            peer.name,
                            self.passive.failures
                        );
                        Some(d)
                    }
                    upstream::Verdict::Counted => None,
                }
            }
        }
    }

    /// Seconds a client should wait before trying again when no peer can answer: until the
    /// first ejection ends, or one monitor interval.
    pub fn retry_after(&self) -> u64 {
        let now = upstream::now_ms();
        let ejection = self
            .peers
            .iter()
            .filter_map(|p| p.state.ejected_until(now))
            .min()
            .map(|u| (u - now).div_ceil(1000));
        let monitor = self.health.as_ref().map(|h| h.interval.as_secs().max(1));
        ejection.or(monitor).unwrap_or(1).clamp(1, 3600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::S3Signing;

    fn http_origin(prefix: &str, s3: bool) -> Origin {
        let peer = PeerConfig {
            name: "p".into(),
            weight: 1,
            priority: 1,
            tls: false,
            tls_verify: true,
            host: "127.0.0.1".into(),
            port: 9000,
            host_header: "127.0.0.1:9000".into(),
            prefix: prefix.into(),
            s3: s3.then(|| S3Signing {
                region: "us-east-1".into(),
                service: "s3".into(),
                credentials: aws_credential_types::Credentials::new("AK", "SK", None, None, "t"),
                forward_headers: Vec::new(),
            }),
        };
        let cfg = OriginConfig {
            name: "o".into(),
            kind: OriginKind::Http { peers: vec![peer] },
            read_only: false,
            timeouts: Timeouts::default(),
            balance: Default::default(),
            health: None,
            passive: Default::default(),
            retries: 2,
            retry_on: Default::default(),
            dns_refresh: Duration::from_secs(60),
        };
        Origin::new(&cfg, None, Some(pool::Settings::default())).unwrap()
    }

    #[test]
    fn an_attempt_is_described_with_its_real_scheme() {
        let mut o = http_origin("", false);
        let (attempt, _) = o.peers[0].attempt_peer();
        assert_eq!(
            o.peers[0].describe(&attempt),
            "peer o: http://127.0.0.1:9000"
        );
        o.peers[0].tls = true;
        o.peers[0].sni = "bucket.example".into();
        let d = o.peers[0].describe(&attempt);
        assert_eq!(d, "peer o: https://127.0.0.1:9000, sni bucket.example");
    }

    #[test]
    fn path_style_rewrite() {
        let o = http_origin("/bucket", false);
        let mut req = RequestHeader::build("GET", b"/ignored", None).unwrap();
        req.insert_header("host", "media.example.com").unwrap();
        req.insert_header("authorization", "Bearer x").unwrap();
        req.insert_header("cookie", "s=1").unwrap();
        let main = Forward { credentials: true };
        o.peers[0]
            .rewrite(&mut req, "/a/b%20c.jpg", Some("v=1"), main)
            .unwrap();
        assert_eq!(req.uri.to_string(), "/bucket/a/b%20c.jpg?v=1");
        assert_eq!(req.headers.get("host").unwrap(), "127.0.0.1:9000");
        // unsigned origins see the client's credentials (they may be the origin's own scheme)
        assert_eq!(req.headers.get("authorization").unwrap(), "Bearer x");
        // ... but not as a fallback: another trust domain
        req.insert_header("x-api-key", "k").unwrap();
        req.insert_header("range", "bytes=0-1").unwrap();
        let q = Some("w=1&X-Amz-Credential=c&access_token=t&X-Amz-Signature=s");
        o.peers[0]
            .rewrite(&mut req, "/a", q, Forward { credentials: false })
            .unwrap();
        for gone in ["authorization", "cookie", "x-api-key"] {
            assert!(req.headers.get(gone).is_none(), "{gone}");
        }
        assert_eq!(req.headers.get("range").unwrap(), "bytes=0-1");
        assert_eq!(req.uri.to_string(), "/bucket/a?w=1");
    }

    #[test]
    fn signed_origins_get_the_allowlist_only() {
        let o = http_origin("/bucket", true);
        let mut req = RequestHeader::build("PUT", b"/x", None).unwrap();
        for (k, v) in [
            ("x-amz-copy-source", "bucket/other/secret"),
            ("x-amz-acl", "public-read"),
            ("x-amz-grant-read", "id=1"),
            ("x-amz-meta-owner", "me"),
            ("x-amz-checksum-crc32", "AAAAAA=="),
            ("content-type", "image/png"),
            ("cookie", "s=1"),
            ("if-none-match", "*"),
        ] {
            req.insert_header(k, v).unwrap();
        }
        o.peers[0]
            .rewrite(&mut req, "/k", None, Forward { credentials: true })
            .unwrap();
        for gone in [
            "x-amz-copy-source",
            "x-amz-acl",
            "x-amz-grant-read",
            "cookie",
        ] {
            assert!(req.headers.get(gone).is_none(), "{gone}");
        }
        for kept in [
            "x-amz-meta-owner",
            "x-amz-checksum-crc32",
            "content-type",
            "if-none-match",
        ] {
            assert!(req.headers.get(kept).is_some(), "{kept}");
        }
        let auth = req.headers.get("authorization").unwrap().to_str().unwrap();
        assert!(
            !auth.contains("x-amz-acl") && auth.contains("x-amz-meta-owner"),
            "{auth}"
        );
    }

    #[test]
    fn signed_rewrite_replaces_authorization_each_time() {
        let o = http_origin("/bucket", true);
        let mut req = RequestHeader::build("GET", b"/x", None).unwrap();
        req.insert_header("authorization", "Bearer client").unwrap();
        o.peers[0]
            .rewrite(&mut req, "/k(1).jpg", None, Forward { credentials: true })
            .unwrap();
        assert_eq!(req.uri.to_string(), "/bucket/k%281%29.jpg");
        let auth = req.headers.get("authorization").unwrap().to_str().unwrap();
        assert!(auth.starts_with("AWS4-HMAC-SHA256 "), "{auth}");
        assert_eq!(req.headers.get_all("authorization").iter().count(), 1);
    }
}
