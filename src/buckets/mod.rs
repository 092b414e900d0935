//! Bucket sets: a group whose "main" is several buckets holding *different* objects. Writes
//! are placed on one member (by `priority`, `least_used` or `weighted`, among members with
//! room and not in cooldown); reads go to the member the location index names, or look the
//! key up in the members through the ordinary 404-replay plan.
//!
//! ```text
//!  request_filter ─► BucketSet::prepare ─► SetCtx { order (the plan's first steps), write }
//!                      read:  located member first, then the others by priority
//!                      write: located member (overwrite in place) or a reservation
//!                             (Ledger::reserve: atomic room check) → order = [member]
//!  upstream_response_filter ─► SetCtx::answered: 2xx → Ledger::commit / delete
//!                                                5xx → release, failure, cooldown, 503
//!  fail_to_proxy ─► SetCtx::failed (connect error, timeout): release, failure, 503
//!  logging ─► SetCtx::finish: an upload that never answered releases its reservation
//!  background (once a second) ─► Redis probe and journal replay, usage gauges, reconcile
//! ```
//!
//! The books (`ledger`) are one trait with a local and a Redis implementation; nothing here
//! knows which one a set has. The cache key never names a member: where an object lives never
//! changes its cache entry.

pub mod ledger;
pub mod member;
pub mod redis;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use prometheus::{IntCounter, IntGauge};

use crate::admit::LocalResponse;
use crate::config::{BucketSetConfig, Placement, RouteConfig};
use crate::fallback::Mains;
use crate::metrics::METRICS;
use crate::origin::Origin;
use crate::upstream::now_ms;
use ledger::{Candidate, Commit, Ledger, LedgerError, Listing, LocalLedger, Reserve};

/// How long a single upload's reservation holds without an answer.
const UPLOAD_TTL: Duration = Duration::from_secs(3600);
/// How long a multipart upload's reservation holds after its last part.
const MULTIPART_TTL: Duration = Duration::from_secs(24 * 3600);
/// A HEAD to a member while placing a write, or after a multipart completion.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// One ListObjectsV2 page during a reconcile.
const LIST_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest a new object's placement waits for the books (start-up reconcile).
const BOOKS_WAIT: Duration = Duration::from_secs(5);
/// A failed reconcile is tried again after this long.
const RECONCILE_RETRY: Duration = Duration::from_secs(10);

/// A member's runtime state: cooldown and its metric series.
pub struct MemberState {
    /// Consecutive failed uploads.
    failures: AtomicU32,
    /// In cooldown until this `now_ms` (0: not).
    until: AtomicU64,
    last_failure: Mutex<Option<(u64, String)>>,
    m_ok: IntCounter,
    m_failed: IntCounter,
    m_rejected: IntCounter,
    m_full: IntCounter,
    m_bytes: IntCounter,
    m_cooldowns: IntCounter,
    g_used: IntGauge,
    g_objects: IntGauge,
    g_reserved: IntGauge,
}

/// One group's bucket set at run time.
pub struct BucketSet {
    pub group: String,
    pub cfg: BucketSetConfig,
    pub ledger: Arc<dyn Ledger>,
    pub redis: Option<Arc<redis::RedisLedger>>,
    members: Vec<MemberState>,
    /// Smooth weighted round robin state (`weighted`).
    wrr: Mutex<Vec<i64>>,
    /// A reconcile is running (one at a time).
    reconciling: tokio::sync::Mutex<()>,
}

/// What a write does, for the books.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Read,
    Put,
    Initiate,
    Part(String),
    Complete(String),
    Abort(String),
    Delete,
}

impl Op {
    fn of(method: &http::Method, query: Option<&str>) -> Op {
        let mut upload_id = None;
        let mut uploads = false;
        for pair in query.unwrap_or("").split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "uploadId" => upload_id = Some(v.to_string()),
                "uploads" => uploads = true,
                _ => {}
            }
        }
        match (method.as_str(), upload_id) {
            ("GET" | "HEAD", _) => Op::Read,
            ("POST", None) if uploads => Op::Initiate,
            ("PUT", Some(id)) => Op::Part(id),
            ("POST", Some(id)) => Op::Complete(id),
            ("DELETE", Some(id)) => Op::Abort(id),
            ("DELETE", None) => Op::Delete,
            _ => Op::Put,
        }
    }
}

/// A write's bookkeeping, carried from placement to its answer.
#[derive(Debug)]
struct Write {
    member: usize,
    op: Op,
    /// The reservation (and idempotency) id.
    id: String,
    /// Declared size (`Content-Length`), if any.
    size: Option<u64>,
    /// The object's size when it is not the body's: an `aws-chunked` body's
    /// `x-amz-decoded-content-length` (the body has chunk framing and trailers).
    object: Option<u64>,
    /// A reservation is held and not yet settled.
    holding: bool,
    settled: bool,
    /// This upload put the key in the index (a new object): a failure takes it out again.
    claim: Option<String>,
}

/// A request's bucket-set state (one field of the proxy's `Ctx`).
#[derive(Debug)]
pub struct SetCtx {
    /// The members the plan tries first, in order (origin indices).
    pub order: Mains,
    /// Member index of the location the books gave (reads).
    located: Option<usize>,
    write: Option<Write>,
    /// A write failed at its member: the 503's `Retry-After`.
    pub failed: Option<u64>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn request_id() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

impl BucketSet {
    pub fn new(group: &str, cfg: BucketSetConfig, ledger: Arc<dyn Ledger>) -> BucketSet {
        let members = cfg
            .members
            .iter()
            .map(|m| {
                let l = [group, m.name.as_str()];
                let up = |o: &str| {
                    METRICS
                        .uploads
                        .with_label_values(&[group, m.name.as_str(), o])
                };
                METRICS
                    .bucket_capacity_bytes
                    .with_label_values(&l)
                    .set(m.capacity as i64);
                MemberState {
                    failures: AtomicU32::new(0),
                    until: AtomicU64::new(0),
                    last_failure: Mutex::new(None),
                    m_ok: up("ok"),
                    m_failed: up("failed"),
                    m_rejected: up("rejected"),
                    m_full: up("full"),
                    m_bytes: METRICS.upload_bytes.with_label_values(&l),
                    m_cooldowns: METRICS.bucket_cooldowns.with_label_values(&l),
                    g_used: METRICS.bucket_used_bytes.with_label_values(&l),
                    g_objects: METRICS.bucket_objects.with_label_values(&l),
                    g_reserved: METRICS.bucket_reserved_bytes.with_label_values(&l),
                }
            })
            .collect();
        BucketSet {
            group: group.to_string(),
            wrr: Mutex::new(vec![0; cfg.members.len()]),
            cfg,
            ledger,
            redis: None,
            members,
            reconciling: tokio::sync::Mutex::new(()),
        }
    }

    fn member_ix(&self, name: &str) -> Option<usize> {
        self.cfg.members.iter().position(|m| m.name == name)
    }

    /// The member takes new uploads: not in cooldown, and its origin has a usable peer
    /// (health, drain).
    fn takes_uploads(&self, i: usize, origins: &[Origin]) -> bool {
        self.members[i].until.load(Relaxed) <= now_ms()
            && origins[self.cfg.members[i].origin].can_pick(0)
    }

    /// Seconds until the first member leaves cooldown (at least 1).
    fn retry_after(&self) -> u64 {
        let now = now_ms();
        self.members
            .iter()
            .map(|m| m.until.load(Relaxed))
            .filter(|&u| u > now)
            .min()
            .map_or(1, |u| (u - now).div_ceil(1000).clamp(1, 3600))
    }

    /// Members for a new object, in the strategy's order (the ledger takes the first with
    /// room; for `least_used` it compares their usage itself).
    fn candidates(&self, origins: &[Origin]) -> Vec<usize> {
        let usable: Vec<usize> = (0..self.cfg.members.len())
            .filter(|&i| self.takes_uploads(i, origins))
            .collect();
        match self.cfg.strategy {
            Placement::Priority | Placement::LeastUsed => usable,
            Placement::Weighted => {
                // Smooth weighted round robin (nginx's) over the members that take uploads;
                // the rest follow by priority in case the chosen one is full.
                let mut w = self.wrr.lock();
                let total: i64 = usable
                    .iter()
                    .map(|&i| i64::from(self.cfg.members[i].weight))
                    .sum();
                let mut best: Option<usize> = None;
                for &i in &usable {
                    let weight = i64::from(self.cfg.members[i].weight);
                    if weight == 0 {
                        continue;
                    }
                    w[i] += weight;
                    if best.is_none_or(|b| w[i] > w[b]) {
                        best = Some(i);
                    }
                }
                let Some(b) = best else { return usable };
                w[b] -= total;
                std::iter::once(b)
                    .chain(usable.into_iter().filter(|&i| i != b))
                    .collect()
            }
        }
    }

    fn order_from(&self, first: Option<usize>) -> Mains {
        let mut order = Mains::default();
        if let Some(f) = first {
            order.push(self.cfg.members[f].origin);
        }
        for (i, m) in self.cfg.members.iter().enumerate() {
            if Some(i) != first {
                order.push(m.origin);
            }
        }
        order
    }

    fn one(&self, i: usize) -> Mains {
        let mut order = Mains::default();
        order.push(self.cfg.members[i].origin);
        order
    }

    /// Where `key` is, for a write: the shared books, else (when they cannot say) the
    /// members themselves, asked at once.
    /// `Err`: a member could not say whether it holds the key (placing the write anyway
    /// could make a second copy, a DELETE could miss the object).
    async fn find(
        &self,
        key: &str,
        origins: &[Origin],
    ) -> Result<Option<(usize, Option<u64>)>, LocalResponse> {
        if let Some(loc) = self.ledger.locate(key, true).await {
            if let Some(i) = self.member_ix(&loc.member) {
                return Ok(Some((i, loc.size)));
            }
        }
        if self.ledger.complete().await {
            return Ok(None);
        }
        let heads = self
            .cfg
            .members
            .iter()
            .map(|m| member::head(&origins[m.origin], key, HEAD_TIMEOUT));
        let found = futures::future::join_all(heads).await;
        let mut unknown = None;
        for (i, r) in found.into_iter().enumerate() {
            match r {
                Ok(Some(_)) => {
                    // Not counted in the books (they did not know it): the commit counts it.
                    self.ledger.remember(key, &self.cfg.members[i].name).await;
                    return Ok(Some((i, None)));
                }
                Ok(None) => {}
                Err(e) => {
                    log::debug!(
                        "bucket set `{}`: member `{}` cannot say whether it holds a key: {e}",
                        self.group,
                        self.cfg.members[i].name
                    );
                    unknown = Some(i);
                }
            }
        }
        match unknown {
            Some(i) => Err(LocalResponse {
                retry_after: Some(1),
                ..LocalResponse::new(
                    503,
                    format!(
                        "cascade: bucket `{}` cannot say now whether it holds this key; retry later\n",
                        self.cfg.members[i].name
                    ),
                )
            }),
            None => Ok(None),
        }
    }

    /// The size an upload reserves: its `Content-Length`, else the route's
    /// `max_upload_size`, else (or when the route requires a length) 411.
    fn upload_size(size: Option<u64>, route: &RouteConfig) -> Result<u64, LocalResponse> {
        match size {
            Some(s) => Ok(s),
            None if route.require_content_length => Err(LocalResponse::new(
                411,
                "cascade: uploads through this route must say their Content-Length\n",
            )),
            None => route.max_upload_size.ok_or_else(|| {
                LocalResponse::new(
                    411,
                    "cascade: an upload to a bucket set needs a Content-Length (or the route's max_upload_size to reserve)\n",
                )
            }),
        }
    }

    /// New objects are placed only on books that know the members' usage (local books:
    /// after the start-up reconcile; Redis: once read): waits for them a little, else 503.
    async fn books_ready(&self) -> Result<(), LocalResponse> {
        let deadline = Instant::now() + BOOKS_WAIT;
        while !self.ledger.ready() {
            if Instant::now() >= deadline {
                return Err(LocalResponse {
                    retry_after: Some(5),
                    ..LocalResponse::new(
                        503,
                        format!(
                            "cascade: bucket set `{}` does not know its buckets' usage yet (reconcile running, or Redis unreachable since start); retry later\n",
                            self.group
                        ),
                    )
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Plans a request through the set: the members its attempts go to, and for a write the
    /// reservation. `Err`: answered here (411, 503, 507).
    pub async fn prepare(
        &self,
        origins: &[Origin],
        method: &http::Method,
        key: &str,
        query: Option<&str>,
        content_length: Option<u64>,
        route: &RouteConfig,
    ) -> Result<SetCtx, LocalResponse> {
        let op = Op::of(method, query);
        if op == Op::Read {
            // Reads never wait on an unreachable Redis (the ledger answers from this
            // instance's view then); an unknown key is looked up member by member.
            let located = self
                .ledger
                .locate(key, false)
                .await
                .and_then(|l| self.member_ix(&l.member));
            return Ok(SetCtx {
                order: self.order_from(located),
                located,
                write: None,
                failed: None,
            });
        }
        let found = self.find(key, origins).await?;
        let size = content_length;
        let (member, id, reserve): (Option<usize>, String, Option<u64>) = match &op {
            Op::Put => {
                let size = Self::upload_size(size, route)?;
                // An overwrite needs room only for what it adds.
                let counted = found.and_then(|(_, s)| s).unwrap_or(0);
                (
                    found.map(|(i, _)| i),
                    request_id(),
                    Some(size.saturating_sub(counted)),
                )
            }
            // The initiation itself needs one byte of room; its parts reserve their own.
            Op::Initiate => (found.map(|(i, _)| i), request_id(), Some(1)),
            Op::Part(upload) => (
                Some(found.map_or(0, |(i, _)| i)),
                format!("mpu:{upload}"),
                Some(Self::upload_size(size, route)?),
            ),
            Op::Complete(upload) | Op::Abort(upload) => (
                Some(found.map_or(0, |(i, _)| i)),
                format!("mpu:{upload}"),
                None,
            ),
            Op::Delete => (Some(found.map_or(0, |(i, _)| i)), request_id(), None),
            Op::Read => unreachable!(),
        };
        let Some(reserve) = reserve else {
            let member = member.expect("set");
            return Ok(SetCtx {
                order: self.one(member),
                located: Some(member),
                write: Some(Write {
                    member,
                    op,
                    id,
                    size,
                    object: None,
                    holding: false,
                    settled: false,
                    claim: None,
                }),
                failed: None,
            });
        };
        // Candidates: the key's own member (an overwrite stays in place), else the strategy.
        let candidates: Vec<usize> = match member {
            Some(i) => {
                if !self.takes_uploads(i, origins) && matches!(op, Op::Put | Op::Initiate) {
                    return Err(LocalResponse {
                        retry_after: Some(self.retry_after()),
                        ..LocalResponse::new(
                            503,
                            format!(
                                "cascade: bucket `{}`, which holds this key, takes no uploads now (cooldown or down); retry later\n",
                                self.cfg.members[i].name
                            ),
                        )
                    });
                }
                vec![i]
            }
            None => {
                self.books_ready().await?;
                self.candidates(origins)
            }
        };
        if candidates.is_empty() {
            return Err(LocalResponse {
                retry_after: Some(self.retry_after()),
                ..LocalResponse::new(
                    503,
                    format!(
                        "cascade: no bucket of set `{}` takes uploads now (cooldown or down); retry later\n",
                        self.group
                    ),
                )
            });
        }
        let cands: Vec<Candidate> = candidates
            .iter()
            .map(|&i| Candidate {
                member: &self.cfg.members[i].name,
                capacity: self.cfg.members[i].capacity,
            })
            .collect();
        let ttl = if matches!(op, Op::Part(_)) {
            MULTIPART_TTL
        } else {
            UPLOAD_TTL
        };
        let got = self
            .ledger
            .reserve(Reserve {
                id: &id,
                size: reserve,
                candidates: &cands,
                least_used: self.cfg.strategy == Placement::LeastUsed && member.is_none(),
                ttl,
            })
            .await;
        match got {
            Ok(Some(ix)) => {
                let m = candidates[ix];
                let mut claim = None;
                if member.is_none() && matches!(op, Op::Put | Op::Initiate) {
                    // One copy per key, even for uploads of a new key that race: the first
                    // to claim the key in the index decides its member; the others follow.
                    match self.ledger.claim(key, &self.cfg.members[m].name).await {
                        None => claim = Some(key.to_string()),
                        Some(holder) if holder == self.cfg.members[m].name => {}
                        Some(_) => {
                            self.ledger.release(&id).await;
                            // The key is in the index now: placed as an overwrite there.
                            return Box::pin(
                                self.prepare(origins, method, key, query, content_length, route),
                            )
                            .await;
                        }
                    }
                }
                Ok(SetCtx {
                    order: self.one(m),
                    located: Some(m),
                    write: Some(Write {
                        member: m,
                        op,
                        id,
                        size,
                        object: None,
                        holding: true,
                        settled: false,
                        claim,
                    }),
                    failed: None,
                })
            }
            Ok(None) => {
                let m = candidates[0];
                self.members[m].m_full.inc();
                Err(LocalResponse::new(
                    507,
                    format!(
                        "cascade: no bucket of set `{}` has room for {reserve} more bytes\n",
                        self.group
                    ),
                ))
            }
            Err(LedgerError::Unavailable) => Err(LocalResponse {
                retry_after: Some(1),
                ..LocalResponse::new(
                    503,
                    "cascade: the bucket set's shared books (Redis) are unreachable and `redis.on_error: deny` holds uploads; retry later\n",
                )
            }),
        }
    }

    /// A write's member answered `status`. `Some(retry_after)`: the client gets 503 instead
    /// (a 5xx from the member: the retry goes to another member).
    pub async fn answered(
        &self,
        sc: &mut SetCtx,
        status: u16,
        key: &str,
        body_bytes: u64,
        origins: &[Origin],
    ) -> Option<u64> {
        let w = sc.write.as_mut()?;
        if w.settled || (100..200).contains(&status) {
            // A `100 Continue` (the upload's `Expect`) is not the answer.
            return None;
        }
        w.settled = true;
        let m = &self.members[w.member];
        let name = self.cfg.members[w.member].name.as_str();
        match status {
            200..=299 => {
                m.failures.store(0, Relaxed);
                match &w.op {
                    Op::Put => {
                        let size = w.object.or(w.size).unwrap_or(body_bytes);
                        self.landed(w, key, size).await;
                    }
                    Op::Initiate => {
                        self.ledger.release(&w.id).await;
                        self.ledger.remember(key, name).await;
                    }
                    Op::Part(_) => {} // held until the upload completes or is aborted
                    Op::Complete(_) => {
                        // S3 may answer 200 and fail in the body: the object's size says.
                        let origin = &origins[self.cfg.members[w.member].origin];
                        match member::head(origin, key, HEAD_TIMEOUT).await {
                            Ok(Some(size)) => self.landed(w, key, size).await,
                            other => log::warn!(
                                "bucket set `{}`: a completed multipart upload is not on `{name}` ({other:?}); its reservation lapses, a reconcile counts it",
                                self.group
                            ),
                        }
                    }
                    Op::Abort(_) => self.ledger.release(&w.id).await,
                    Op::Delete => self.ledger.delete(&w.id, key).await,
                    Op::Read => {}
                }
                None
            }
            500..=599 => Some(self.upload_failed(w, &format!("status {status}")).await),
            _ => {
                // The member refused (4xx): not the member's failure.
                self.give_back(w).await;
                if matches!(w.op, Op::Put | Op::Complete(_)) {
                    m.m_rejected.inc();
                }
                None
            }
        }
    }

    /// An upload landed: `size` bytes of `key` on the write's member, in the books and the
    /// member's metrics.
    async fn landed(&self, w: &Write, key: &str, size: u64) {
        self.ledger
            .commit(Commit {
                id: &w.id,
                member: &self.cfg.members[w.member].name,
                key,
                size,
            })
            .await;
        let m = &self.members[w.member];
        m.m_ok.inc();
        m.m_bytes.inc_by(size);
    }

    async fn upload_failed(&self, w: &mut Write, why: &str) -> u64 {
        w.settled = true;
        let m = &self.members[w.member];
        let name = self.cfg.members[w.member].name.as_str();
        self.give_back(w).await;
        if matches!(w.op, Op::Read) {
            return 1;
        }
        m.m_failed.inc();
        self.ledger.failure(name).await;
        *m.last_failure.lock() = Some((unix_ms(), why.to_string()));
        let n = m.failures.fetch_add(1, Relaxed) + 1;
        let c = self.cfg.cooldown;
        if n >= c.failures {
            let d = (c.step * n).min(c.max);
            let until = now_ms() + d.as_millis() as u64;
            if m.until.swap(until, Relaxed) <= now_ms() {
                m.m_cooldowns.inc();
                log::warn!(
                    "bucket set `{}`: member `{name}` in cooldown for {:?} after {n} failed uploads (last: {why}); it still serves reads",
                    self.group,
                    d
                );
            }
        }
        self.retry_after()
    }

    /// The write's attempt failed without an answer (connect error, timeout): 503 with this
    /// `Retry-After`.
    pub async fn failed(&self, sc: &mut SetCtx, why: &str) -> Option<u64> {
        let w = sc.write.as_mut().filter(|w| !w.settled)?;
        let r = self.upload_failed(w, why).await;
        sc.failed = Some(r);
        Some(r)
    }

    /// The request is over: a reservation nobody settled (the client went away, the body
    /// was refused) is given back.
    pub async fn finish(&self, sc: &mut SetCtx) {
        if let Some(w) = sc.write.as_mut().filter(|w| !w.settled) {
            w.settled = true;
            self.give_back(w).await;
        }
    }

    /// A write that did not land gives its room back: the whole reservation, or for a
    /// multipart part the part's own bytes (the parts that landed stay reserved until the
    /// upload completes or is aborted). Without this, parts of uploads that do not exist
    /// (refused by the member) or abandoned mid-body would hold room for a day.
    async fn give_back(&self, w: &Write) {
        if let Some(key) = &w.claim {
            self.ledger
                .unclaim(key, &self.cfg.members[w.member].name)
                .await;
        }
        if !w.holding {
            return;
        }
        match w.op {
            Op::Part(_) => self.ledger.shrink(&w.id, w.size.unwrap_or(0)).await,
            _ => self.ledger.release(&w.id).await,
        }
    }

    /// A read was answered by the member at origin index `origin`: a key the books did not
    /// place there is remembered (in the background: the answer does not wait).
    pub fn read_served(self: &Arc<Self>, sc: &SetCtx, origin: usize, key: &str) {
        let Some(i) = self.cfg.members.iter().position(|m| m.origin == origin) else {
            return;
        };
        if sc.located == Some(i) || sc.write.is_some() {
            return;
        }
        let set = self.clone();
        let key = key.to_string();
        tokio::spawn(async move {
            let name = set.cfg.members[i].name.clone();
            set.ledger.remember(&key, &name).await;
        });
    }

    /// Lists every member and rebuilds usage and the location index.
    pub async fn reconcile(&self, origins: &[Origin]) -> Result<serde_json::Value, String> {
        let _one = self.reconciling.lock().await;
        let t0 = Instant::now();
        self.ledger.begin_reconcile();
        let mut listings = Vec::new();
        for m in &self.cfg.members {
            let objects = match member::list(&origins[m.origin], LIST_TIMEOUT).await {
                Ok(o) => o,
                Err(e) => {
                    self.ledger.abort_reconcile();
                    return Err(format!("member `{}`: {e}", m.name));
                }
            };
            listings.push(Listing {
                member: m.name.clone(),
                objects,
            });
        }
        let summary: Vec<serde_json::Value> = listings
            .iter()
            .map(|l| {
                serde_json::json!({
                    "member": l.member,
                    "objects": l.objects.len(),
                    "bytes": l.objects.iter().map(|(_, s)| s).sum::<u64>(),
                })
            })
            .collect();
        let listed = t0.elapsed().as_millis() as u64;
        self.ledger.replace(listings).await;
        self.refresh_gauges();
        let ms = t0.elapsed().as_millis() as u64;
        let found: Vec<String> = summary
            .iter()
            .map(|m| {
                format!(
                    "{}: {} objects, {} bytes",
                    m["member"], m["objects"], m["bytes"]
                )
            })
            .collect();
        log::info!(
            "bucket set `{}`: reconciled in {ms} ms ({}); listing {listed} ms, books {} ms",
            self.group,
            found.join("; "),
            ms - listed
        );
        Ok(serde_json::json!({
            "group": self.group,
            "members": summary,
            "ms": ms,
            "listing_ms": listed,
            "books_ms": ms - listed,
        }))
    }

    pub fn refresh_gauges(&self) {
        let usage = self.ledger.usage();
        for (i, m) in self.cfg.members.iter().enumerate() {
            let u = usage.get(&m.name).copied().unwrap_or_default();
            self.members[i].g_used.set(u.used as i64);
            self.members[i].g_objects.set(u.objects as i64);
            self.members[i].g_reserved.set(u.reserved as i64);
        }
    }

    /// `/status`: each member's books and state.
    pub fn status(&self) -> serde_json::Value {
        let usage = self.ledger.usage();
        let now = now_ms();
        let wall = unix_ms();
        let members: Vec<serde_json::Value> = self
            .cfg
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let u = usage.get(&m.name).copied().unwrap_or_default();
                let st = &self.members[i];
                let until = st.until.load(Relaxed);
                let last = st.last_failure.lock().clone();
                serde_json::json!({
                    "bucket": m.name,
                    "state": if until > now { "cooldown" } else { "ok" },
                    "cooldown_until_unix_ms": (until > now).then(|| wall + (until - now)),
                    "capacity": m.capacity,
                    "used": u.used,
                    "percent": (u.used as f64 * 100.0 / m.capacity as f64 * 100.0).round() / 100.0,
                    "reserved": u.reserved,
                    "objects": u.objects,
                    "uploads": u.uploads,
                    "failures": u.failures,
                    "consecutive_failures": st.failures.load(Relaxed),
                    "last_failure": last.map(|(at, why)| serde_json::json!({"at_unix_ms": at, "why": why})),
                    "priority": m.priority,
                    "weight": m.weight,
                })
            })
            .collect();
        serde_json::json!({
            "strategy": format!("{:?}", self.cfg.strategy).to_lowercase(),
            "books": if self.ledger.shared() { "redis" } else { "local" },
            "members": members,
        })
    }
}

impl SetCtx {
    /// The request is a write through the set.
    pub fn is_write(&self) -> bool {
        self.write.is_some()
    }

    /// An `aws-chunked` upload's object is `decoded` bytes (its body, which reserved the
    /// room, is larger): that is what the books count when it lands. Never more than the
    /// body: a client cannot make an object count for more than it sent.
    pub fn object_size(&mut self, decoded: u64) {
        if let Some(w) = self.write.as_mut() {
            w.object = Some(w.size.map_or(decoded, |s| s.min(decoded)));
        }
    }
}

/// Every group's bucket set (indexed by group; `None` for ordinary groups), and the Redis
/// link they share.
#[derive(Default)]
pub struct Sets {
    pub by_group: Vec<Option<Arc<BucketSet>>>,
    pub link: Option<Arc<redis::RedisLink>>,
}

impl Sets {
    pub fn build(cfg: &crate::config::Config) -> Sets {
        let link = cfg
            .redis
            .clone()
            .filter(|_| cfg.groups.iter().any(|g| g.set.is_some()))
            .map(redis::RedisLink::new);
        let by_group = cfg
            .groups
            .iter()
            .map(|g| {
                let set = g.set.clone()?;
                let names: Vec<String> = set.members.iter().map(|m| m.name.clone()).collect();
                let (ledger, shared): (Arc<dyn Ledger>, _) = match &link {
                    Some(l) => {
                        let r = Arc::new(redis::RedisLedger::new(l.clone(), &g.name, names));
                        (r.clone(), Some(r))
                    }
                    None => (Arc::new(LocalLedger::new()), None),
                };
                let mut s = BucketSet::new(&g.name, set, ledger);
                s.redis = shared;
                Some(Arc::new(s))
            })
            .collect();
        Sets { by_group, link }
    }

    pub fn get(&self, group: usize) -> Option<&Arc<BucketSet>> {
        self.by_group.get(group).and_then(Option::as_ref)
    }

    pub fn is_empty(&self) -> bool {
        self.by_group.iter().all(Option::is_none)
    }
}

/// The background work of the bucket sets, on a thread of its own: Redis probing and
/// journal replay, the usage gauges, reconciles (at start without books, on schedule, and
/// after Redis lost its data).
pub fn start(sets: Arc<Sets>, origins: Arc<[Origin]>) {
    if sets.is_empty() {
        return;
    }
    crate::background::spawn("bucket-sets", "bucket sets' books", move || async move {
        // When each set last tried a reconcile, and whether it has books yet (local books
        // start empty: a reconcile fills them; Redis says itself whether it has them).
        // A reconcile runs as a task of its own (a listing takes minutes on a big bucket):
        // the probe, the journal's replay and the gauges go on every second meanwhile.
        let mut tried: HashMap<usize, Instant> = HashMap::new();
        let done: Arc<Mutex<HashMap<usize, Instant>>> = Arc::default();
        let mut running: HashMap<usize, tokio::task::JoinHandle<()>> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Some(link) = &sets.link {
                link.tick().await;
            }
            for (g, set) in sets.by_group.iter().enumerate() {
                let Some(set) = set else { continue };
                let last = done.lock().get(&g).copied();
                let mut due = match &set.redis {
                    Some(r) => r.tick().await && sets.link.as_ref().is_some_and(|l| l.is_up()),
                    None => last.is_none(),
                };
                if let (Some(every), Some(at)) = (set.cfg.reconcile_every, last) {
                    due |= at.elapsed() >= every;
                }
                // A failed reconcile is tried again after a while, not every second.
                let throttled = tried
                    .get(&g)
                    .is_some_and(|t| t.elapsed() < RECONCILE_RETRY && last.is_none_or(|d| d < *t));
                let busy = running.get(&g).is_some_and(|h| !h.is_finished());
                if due && !throttled && !busy {
                    tried.insert(g, Instant::now());
                    let (set, origins, done) = (set.clone(), origins.clone(), done.clone());
                    running.insert(
                        g,
                        tokio::spawn(async move {
                            match set.reconcile(&origins).await {
                                Ok(_) => {
                                    done.lock().insert(g, Instant::now());
                                }
                                Err(e) => {
                                    log::warn!("bucket set `{}`: reconcile failed: {e}", set.group)
                                }
                            }
                        }),
                    );
                }
                set.refresh_gauges();
            }
        }
    });
}
