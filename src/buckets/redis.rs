//! A bucket set's books on Redis, shared by every instance: usage per member in a hash,
//! reservations and the location index in hashes, applied ids as keys with a TTL. Every
//! change is one Lua script (loaded once, run by SHA), so a reservation's room check and the
//! idempotency check are atomic.
//!
//! Redis away: every call is abandoned after `redis.timeout`, and from then on no request
//! waits on Redis at all; the background tick probes it once a second. Meanwhile the books
//! are this instance's mirror (`LocalLedger`), writes follow `on_error` (`local`: go on;
//! `deny`: 503), and the changes made alone are journalled. When Redis answers again, the
//! journal is replayed (each entry idempotent by its id), and a Redis that lost its data
//! (no completeness marker) asks for a reconcile.
//!
//! Amounts leave the scripts as `0 - x`, never `-x`: Lua's `-0` reaches Redis as "-0", which
//! `HINCRBY` refuses (a zero-byte upload or overwrite would fail every time).
//!
//! Keys (`P` = `key_prefix`, `{g}` = the group, a hash tag: one Cluster slot per set):
//! `P{g}:u:<member>` usage hash · `P{g}:res` reservations (`id → member|size|expires_ms`) ·
//! `P{g}:idx` index (`key → member|size`, or `member|-` when learnt from a read) ·
//! `P{g}:done:<id>` applied ids · `P{g}:complete` the index holds every key.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use redis::aio::ConnectionManager;
use redis::Script;

use super::ledger::{Commit, Ledger, LedgerError, Listing, Loc, LocalLedger, Reserve, Usage};
use crate::config::{RedisConfig, RedisOnError};
use crate::metrics::METRICS;

/// Journalled changes kept while Redis is away; beyond this the set is reconciled instead.
const MAX_JOURNAL: usize = 100_000;
/// Index entries this instance caches.
const MIRROR_KEYS: usize = 100_000;
/// How long an applied id is remembered.
const DONE_TTL_S: u64 = 3600;

static RESERVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local res, id, size, least, up = KEYS[1], ARGV[2], tonumber(ARGV[3]), ARGV[4] == '1', ARGV[5]
local ttl = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local all = redis.call('HGETALL', res)
for i = 1, #all, 2 do
  local m, s, e = string.match(all[i + 1], '^(.*)|(%d+)|(%d+)$')
  if m and tonumber(e) <= now then
    redis.call('HDEL', res, all[i])
    redis.call('HINCRBY', up .. m, 'reserved', 0 - tonumber(s))
  end
end
local function state(m)
  local u = redis.call('HMGET', up .. m, 'used', 'reserved')
  return (tonumber(u[1]) or 0) + (tonumber(u[2]) or 0)
end
local function hold(m, total)
  redis.call('HSET', res, id, m .. '|' .. string.format('%d', total) .. '|' .. string.format('%d', now + ttl))
  redis.call('HINCRBY', up .. m, 'reserved', size)
end
local held = redis.call('HGET', res, id)
if held then
  local m, s = string.match(held, '^(.*)|(%d+)|%d+$')
  for i = 6, #ARGV, 2 do
    if ARGV[i] == m then
      if state(m) + size <= tonumber(ARGV[i + 1]) then
        hold(m, tonumber(s) + size)
        return (i - 6) / 2
      end
      return -1
    end
  end
  return -1
end
local best, bestpct = -1, nil
for i = 6, #ARGV, 2 do
  local cap = tonumber(ARGV[i + 1])
  local taken = state(ARGV[i])
  if taken + size <= cap then
    if not least then best = (i - 6) / 2; break end
    local pct = taken / cap
    if bestpct == nil or pct < bestpct then best, bestpct = (i - 6) / 2, pct end
  end
end
if best >= 0 then hold(ARGV[6 + best * 2], size) end
return best
"#,
    )
});

static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local held = redis.call('HGET', KEYS[1], ARGV[1])
if not held then return 0 end
local m, s = string.match(held, '^(.*)|(%d+)|%d+$')
if m then redis.call('HINCRBY', ARGV[2] .. m, 'reserved', 0 - tonumber(s)) end
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"#,
    )
});

/// KEYS: res. ARGV: id, size, usage prefix. Gives `size` bytes of a reservation back.
static SHRINK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local held = redis.call('HGET', KEYS[1], ARGV[1])
if not held then return 0 end
local m, s, e = string.match(held, '^(.*)|(%d+)|(%d+)$')
if not m then return 0 end
local back = math.min(tonumber(ARGV[2]), tonumber(s))
redis.call('HINCRBY', ARGV[3] .. m, 'reserved', 0 - back)
if tonumber(s) - back <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], m .. '|' .. string.format('%d', tonumber(s) - back) .. '|' .. e)
end
return 1
"#,
    )
});

/// KEYS: res, idx, done. ARGV: id, member, key, size, usage prefix, done ttl.
static COMMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local up = ARGV[5]
local held = redis.call('HGET', KEYS[1], ARGV[1])
if held then
  local m, s = string.match(held, '^(.*)|(%d+)|%d+$')
  if m then redis.call('HINCRBY', up .. m, 'reserved', 0 - tonumber(s)) end
  redis.call('HDEL', KEYS[1], ARGV[1])
end
local old = redis.call('HGET', KEYS[2], ARGV[3])
if old then
  local m, s = string.match(old, '^(.*)|(%d+)$')
  if m then
    redis.call('HINCRBY', up .. m, 'used', 0 - tonumber(s))
    redis.call('HINCRBY', up .. m, 'objects', -1)
  end
end
local u = up .. ARGV[2]
redis.call('HINCRBY', u, 'used', ARGV[4])
redis.call('HINCRBY', u, 'objects', 1)
redis.call('HINCRBY', u, 'uploads', 1)
redis.call('HSET', KEYS[2], ARGV[3], ARGV[2] .. '|' .. ARGV[4])
redis.call('SET', KEYS[3], '1', 'EX', ARGV[6])
return 1
"#,
    )
});

/// KEYS: idx, done. ARGV: key, usage prefix, done ttl.
static DELETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local m, s = string.match(old, '^(.*)|(%d+)$')
  if m then
    redis.call('HINCRBY', ARGV[2] .. m, 'used', 0 - tonumber(s))
    redis.call('HINCRBY', ARGV[2] .. m, 'objects', -1)
  end
  redis.call('HDEL', KEYS[1], ARGV[1])
end
redis.call('SET', KEYS[2], '1', 'EX', ARGV[3])
return 1
"#,
    )
});

/// KEYS: idx. ARGV: key, member, usage prefix. A read found the key on `member`.
static REMEMBER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local m, s = string.match(old, '^(.*)|(%d+)$')
  if m == ARGV[2] or (not m and string.sub(old, 1, #ARGV[2] + 1) == ARGV[2] .. '|') then return 0 end
  if m then
    redis.call('HINCRBY', ARGV[3] .. m, 'used', 0 - tonumber(s))
    redis.call('HINCRBY', ARGV[3] .. m, 'objects', -1)
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '|-')
return 1
"#,
    )
});

/// KEYS: idx. ARGV: key, member. The first upload of a new key claims it for its member;
/// returns the member the index already names, if any.
static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then return string.match(old, '^(.*)|') end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '|-')
return false
"#,
    )
});

/// KEYS: idx. ARGV: key, member. A failed claiming upload: the claim goes if unchanged.
static UNCLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] .. '|-' then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"#,
    )
});

/// The connection to Redis, shared by every set.
pub struct RedisLink {
    pub cfg: RedisConfig,
    conn: RwLock<Option<ConnectionManager>>,
    up: AtomicBool,
    /// Set by the background tick when Redis has come back: the ledgers replay their
    /// journals.
    pub generation: AtomicU64,
}

impl RedisLink {
    pub fn new(cfg: RedisConfig) -> Arc<RedisLink> {
        METRICS.redis_up.set(0);
        Arc::new(RedisLink {
            cfg,
            conn: RwLock::new(None),
            up: AtomicBool::new(false),
            generation: AtomicU64::new(0),
        })
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    fn set_up(&self, up: bool) {
        if self.up.swap(up, Relaxed) != up {
            if up && self.generation.load(Relaxed) == 0 {
                log::info!("redis: connected");
            } else if up {
                log::warn!("redis: reachable again");
            } else {
                log::warn!("redis: unreachable; bucket sets go on with this instance's books");
            }
        }
        METRICS.redis_up.set(i64::from(up));
    }

    /// Runs `f` on the connection within the timeout; an error marks Redis down.
    async fn call<T, F, Fut>(&self, op: &str, f: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        if !self.is_up() {
            return None;
        }
        let conn = self.conn.read().clone()?;
        match tokio::time::timeout(self.cfg.timeout, f(conn)).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                log::debug!("redis {op}: {e}");
                METRICS.redis_errors.with_label_values(&[op]).inc();
                // Redis answered with an error (a script refused its arguments): it is up.
                let refused = matches!(
                    e.kind(),
                    redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError)
                        | redis::ErrorKind::UnexpectedReturnType
                        | redis::ErrorKind::Parse
                );
                if refused {
                    log::warn!("redis {op}: refused: {e}");
                } else {
                    self.set_up(false);
                }
                None
            }
            Err(_) => {
                METRICS.redis_errors.with_label_values(&[op]).inc();
                self.set_up(false);
                None
            }
        }
    }

    /// The background tick (once a second): connect or probe. `true` when Redis has just
    /// come back.
    pub async fn tick(&self) -> bool {
        let existing = self.conn.read().clone();
        let conn = match existing {
            Some(c) => c,
            None => {
                let client = match redis::Client::open(self.cfg.url.as_str()) {
                    Ok(c) => c,
                    Err(e) => {
                        log::error!("redis: bad URL: {e}");
                        return false;
                    }
                };
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.cfg.timeout.max(Duration::from_millis(500))))
                    .set_response_timeout(Some(self.cfg.timeout))
                    .set_number_of_retries(1);
                match tokio::time::timeout(
                    Duration::from_secs(2),
                    client.get_connection_manager_with_config(config),
                )
                .await
                {
                    Ok(Ok(c)) => {
                        *self.conn.write() = Some(c.clone());
                        c
                    }
                    _ => {
                        METRICS.redis_errors.with_label_values(&["connect"]).inc();
                        self.set_up(false);
                        return false;
                    }
                }
            }
        };
        let mut c = conn;
        let ping = tokio::time::timeout(
            self.cfg.timeout.max(Duration::from_millis(200)),
            redis::cmd("PING").query_async::<String>(&mut c),
        )
        .await;
        let ok = matches!(ping, Ok(Ok(_)));
        if !ok {
            METRICS.redis_errors.with_label_values(&["ping"]).inc();
        }
        let was = self.is_up();
        self.set_up(ok);
        if ok && !was {
            self.generation.fetch_add(1, Relaxed);
            return true;
        }
        false
    }
}

/// A change made while Redis was away, replayed when it returns.
#[derive(Debug, Clone)]
enum Change {
    Commit {
        id: String,
        member: String,
        key: String,
        size: u64,
    },
    Delete {
        id: String,
        key: String,
    },
    Release {
        id: String,
    },
    Shrink {
        id: String,
        size: u64,
    },
    Failure {
        member: String,
    },
}

/// One set's books on Redis.
pub struct RedisLedger {
    link: Arc<RedisLink>,
    members: Vec<String>,
    res: String,
    idx: String,
    usage_prefix: String,
    done_prefix: String,
    complete_key: String,
    mirror: LocalLedger,
    journal: Mutex<VecDeque<Change>>,
    /// The journal overflowed: only a reconcile can make the books right.
    pub lost: AtomicBool,
    /// The mirror holds the usage read from Redis at least once.
    snapshot: AtomicBool,
}

impl RedisLedger {
    pub fn new(link: Arc<RedisLink>, group: &str, members: Vec<String>) -> RedisLedger {
        let base = format!("{}{{{group}}}:", link.cfg.key_prefix);
        RedisLedger {
            members,
            res: format!("{base}res"),
            idx: format!("{base}idx"),
            usage_prefix: format!("{base}u:"),
            done_prefix: format!("{base}done:"),
            complete_key: format!("{base}complete"),
            link,
            mirror: LocalLedger::mirror(MIRROR_KEYS),
            journal: Mutex::new(VecDeque::new()),
            lost: AtomicBool::new(false),
            snapshot: AtomicBool::new(false),
        }
    }

    /// Changes wait behind the journal until it is replayed: applied in the order they
    /// happened, a commit made while Redis was away cannot revive a key deleted since.
    fn backlog(&self) -> bool {
        !self.journal.lock().is_empty()
    }

    fn journal(&self, c: Change) {
        let mut j = self.journal.lock();
        if j.len() >= MAX_JOURNAL {
            j.clear();
            self.lost.store(true, Relaxed);
        }
        j.push_back(c);
    }

    async fn apply(&self, c: &Change) -> bool {
        match c {
            Change::Commit {
                id,
                member,
                key,
                size,
            } => self.commit_shared(id, member, key, *size).await.is_some(),
            Change::Delete { id, key } => self.delete_shared(id, key).await.is_some(),
            Change::Release { id } => self.release_shared(id).await.is_some(),
            Change::Shrink { id, size } => self.shrink_shared(id, *size).await.is_some(),
            Change::Failure { member } => self.failure_shared(member).await.is_some(),
        }
    }

    async fn commit_shared(&self, id: &str, member: &str, key: &str, size: u64) -> Option<i64> {
        let done = format!("{}{id}", self.done_prefix);
        self.link
            .call("commit", |mut c| async move {
                COMMIT
                    .key(&self.res)
                    .key(&self.idx)
                    .key(&done)
                    .arg(id)
                    .arg(member)
                    .arg(key)
                    .arg(size)
                    .arg(&self.usage_prefix)
                    .arg(DONE_TTL_S)
                    .invoke_async(&mut c)
                    .await
            })
            .await
    }

    async fn delete_shared(&self, id: &str, key: &str) -> Option<i64> {
        let done = format!("{}{id}", self.done_prefix);
        self.link
            .call("delete", |mut c| async move {
                DELETE
                    .key(&self.idx)
                    .key(&done)
                    .arg(key)
                    .arg(&self.usage_prefix)
                    .arg(DONE_TTL_S)
                    .invoke_async(&mut c)
                    .await
            })
            .await
    }

    async fn release_shared(&self, id: &str) -> Option<i64> {
        self.link
            .call("release", |mut c| async move {
                RELEASE
                    .key(&self.res)
                    .arg(id)
                    .arg(&self.usage_prefix)
                    .invoke_async(&mut c)
                    .await
            })
            .await
    }

    async fn shrink_shared(&self, id: &str, size: u64) -> Option<i64> {
        self.link
            .call("shrink", |mut c| async move {
                SHRINK
                    .key(&self.res)
                    .arg(id)
                    .arg(size)
                    .arg(&self.usage_prefix)
                    .invoke_async(&mut c)
                    .await
            })
            .await
    }

    async fn remember_shared(&self, key: &str, member: &str) -> Option<i64> {
        self.link
            .call("remember", |mut c| async move {
                REMEMBER
                    .key(&self.idx)
                    .arg(key)
                    .arg(member)
                    .arg(&self.usage_prefix)
                    .invoke_async(&mut c)
                    .await
            })
            .await
    }

    async fn failure_shared(&self, member: &str) -> Option<i64> {
        let k = format!("{}{member}", self.usage_prefix);
        self.link
            .call("failure", |mut c| async move {
                redis::cmd("HINCRBY")
                    .arg(&k)
                    .arg("failures")
                    .arg(1)
                    .query_async(&mut c)
                    .await
            })
            .await
    }

    /// The background tick: replay the journal when Redis is back, then refresh this
    /// instance's view of the usage. Returns `true` when the set needs a reconcile (Redis
    /// has no books for it, or the journal overflowed).
    pub async fn tick(&self) -> bool {
        if !self.link.is_up() {
            return false;
        }
        loop {
            let Some(c) = self.journal.lock().front().cloned() else {
                break;
            };
            if !self.apply(&c).await {
                if !self.link.is_up() {
                    return false; // down again: the rest waits for the next tick
                }
                // Redis is up and refuses this change: replaying it again would block the
                // journal for good. It goes, and a reconcile makes the books right.
                log::warn!("redis: a journalled change was refused ({c:?}); the set is reconciled");
                self.lost.store(true, Relaxed);
            }
            self.journal.lock().pop_front();
        }
        let members = self.members.clone();
        let prefix = self.usage_prefix.clone();
        let complete_key = self.complete_key.clone();
        let got = self
            .link
            .call("usage", |mut c| async move {
                let mut p = redis::pipe();
                for m in &members {
                    p.cmd("HMGET")
                        .arg(format!("{prefix}{m}"))
                        .arg("used")
                        .arg("objects")
                        .arg("reserved")
                        .arg("uploads")
                        .arg("failures");
                }
                p.cmd("EXISTS").arg(&complete_key);
                p.query_async::<Vec<redis::Value>>(&mut c).await
            })
            .await;
        let Some(mut values) = got else {
            return false;
        };
        let complete = values
            .pop()
            .and_then(|v| redis::from_redis_value::<bool>(v).ok())
            .unwrap_or(false);
        let rows: Vec<Vec<Option<i64>>> = values
            .into_iter()
            .map(|v| redis::from_redis_value(v).unwrap_or_default())
            .collect();
        for (m, row) in self.members.iter().zip(rows) {
            let v = |i: usize| row.get(i).copied().flatten().unwrap_or(0).max(0) as u64;
            self.mirror.set_usage(
                m,
                Usage {
                    used: v(0),
                    objects: v(1),
                    reserved: v(2),
                    uploads: v(3),
                    failures: v(4),
                },
            );
        }
        self.mirror.set_complete(complete);
        self.snapshot.store(true, Relaxed);
        !complete || self.lost.swap(false, Relaxed)
    }
}

#[async_trait]
impl Ledger for RedisLedger {
    async fn reserve(&self, r: Reserve<'_>) -> Result<Option<usize>, LedgerError> {
        let ttl = r.ttl.as_millis() as u64;
        let got = self
            .link
            .call("reserve", |mut c| async move {
                let mut inv = RESERVE.key(&self.res);
                inv.arg(ttl)
                    .arg(r.id)
                    .arg(r.size)
                    .arg(if r.least_used { "1" } else { "0" })
                    .arg(&self.usage_prefix);
                for cand in r.candidates {
                    inv.arg(cand.member).arg(cand.capacity);
                }
                inv.invoke_async::<i64>(&mut c).await
            })
            .await;
        match got {
            Some(ix) => Ok((ix >= 0).then_some(ix as usize)),
            None if self.link.cfg.on_error == RedisOnError::Deny => Err(LedgerError::Unavailable),
            None => Ok(self.mirror.reserve_now(r)),
        }
    }

    async fn release(&self, id: &str) {
        self.mirror.release_now(id);
        if self.backlog() || self.release_shared(id).await.is_none() {
            self.journal(Change::Release { id: id.into() });
        }
    }

    async fn shrink(&self, id: &str, size: u64) {
        self.mirror.shrink_now(id, size);
        if self.backlog() || self.shrink_shared(id, size).await.is_none() {
            self.journal(Change::Shrink {
                id: id.into(),
                size,
            });
        }
    }

    async fn commit(&self, c: Commit<'_>) {
        // The mirror keeps the location (a cache) and counts every commit of this instance:
        // its figures are Redis's as of the last tick plus what landed since, so a Redis
        // that goes away leaves no blind spot (a member filled in the last second would
        // otherwise look emptier than it is, and be overfilled).
        self.mirror.commit_now(c);
        if self.backlog()
            || self
                .commit_shared(c.id, c.member, c.key, c.size)
                .await
                .is_none()
        {
            self.journal(Change::Commit {
                id: c.id.into(),
                member: c.member.into(),
                key: c.key.into(),
                size: c.size,
            });
        }
    }

    async fn delete(&self, id: &str, key: &str) {
        self.mirror.delete_now(id, key);
        if self.backlog() || self.delete_shared(id, key).await.is_none() {
            self.journal(Change::Delete {
                id: id.into(),
                key: key.into(),
            });
        }
    }

    async fn locate(&self, key: &str, shared: bool) -> Option<Loc> {
        if !shared {
            if let Some(l) = self.mirror.locate_now(key) {
                return Some(l);
            }
        }
        let idx = self.idx.clone();
        let found = self
            .link
            .call("locate", |mut c| async move {
                redis::cmd("HGET")
                    .arg(&idx)
                    .arg(key)
                    .query_async::<Option<String>>(&mut c)
                    .await
            })
            .await;
        match found {
            Some(Some(v)) => {
                let (member, size) = v.rsplit_once('|')?;
                let loc = Loc {
                    member: member.to_string(),
                    size: size.parse().ok(),
                };
                self.mirror.remember_now(key, loc.clone());
                Some(loc)
            }
            Some(None) => None,
            None => self.mirror.locate_now(key),
        }
    }

    async fn remember(&self, key: &str, member: &str) {
        self.mirror.remember_now(
            key,
            Loc {
                member: member.into(),
                size: None,
            },
        );
        // A hint, not journalled: replayed after a newer commit it would undo it, and the
        // next read (or reconcile) learns the location again.
        let _ = self.remember_shared(key, member).await;
    }

    async fn claim(&self, key: &str, member: &str) -> Option<String> {
        let got = self
            .link
            .call("claim", |mut c| async move {
                CLAIM
                    .key(&self.idx)
                    .arg(key)
                    .arg(member)
                    .invoke_async::<Option<String>>(&mut c)
                    .await
            })
            .await;
        match got {
            Some(holder) => {
                if holder.is_none() {
                    self.mirror.remember_now(
                        key,
                        Loc {
                            member: member.into(),
                            size: None,
                        },
                    );
                }
                holder
            }
            // Redis away: this instance's view decides (the commit is journalled).
            None => self.mirror.claim_now(key, member),
        }
    }

    async fn unclaim(&self, key: &str, member: &str) {
        self.mirror.unclaim_now(key, member);
        // Not journalled: a stale claim only sends the key's next write to that member.
        let _ = self
            .link
            .call("unclaim", |mut c| async move {
                UNCLAIM
                    .key(&self.idx)
                    .arg(key)
                    .arg(member)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await;
    }

    async fn failure(&self, member: &str) {
        self.mirror.failure_now(member);
        if self.failure_shared(member).await.is_none() {
            self.journal(Change::Failure {
                member: member.into(),
            });
        }
    }

    fn usage(&self) -> HashMap<String, Usage> {
        self.mirror.usage_now()
    }

    async fn replace(&self, listings: Vec<Listing>) {
        self.mirror.replace_now(&listings);
        let slow = self.link.cfg.timeout.max(Duration::from_secs(2));
        let Some(conn) = self.link.conn.read().clone() else {
            return;
        };
        if !self.link.is_up() {
            return;
        }
        let res = async {
            let mut c = conn;
            // Drop the listed members' index entries, then write the listing, 1,000 at a time.
            let listed: std::collections::HashSet<&str> =
                listings.iter().map(|l| l.member.as_str()).collect();
            let mut cursor: u64 = 0;
            loop {
                let (next, page): (u64, Vec<(String, String)>) = tokio::time::timeout(
                    slow,
                    redis::cmd("HSCAN")
                        .arg(&self.idx)
                        .arg(cursor)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut c),
                )
                .await
                .map_err(|_| "timeout")?
                .map_err(|_| "hscan")?;
                let stale: Vec<&String> = page
                    .iter()
                    .filter(|(_, v)| v.rsplit_once('|').is_some_and(|(m, _)| listed.contains(m)))
                    .map(|(k, _)| k)
                    .collect();
                if !stale.is_empty() {
                    tokio::time::timeout(
                        slow,
                        redis::cmd("HDEL")
                            .arg(&self.idx)
                            .arg(stale)
                            .query_async::<i64>(&mut c),
                    )
                    .await
                    .map_err(|_| "timeout")?
                    .map_err(|_| "hdel")?;
                }
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
            for l in &listings {
                for chunk in l.objects.chunks(1000) {
                    let mut cmd = redis::cmd("HSET");
                    cmd.arg(&self.idx);
                    for (k, s) in chunk {
                        cmd.arg(k).arg(format!("{}|{s}", l.member));
                    }
                    tokio::time::timeout(slow, cmd.query_async::<i64>(&mut c))
                        .await
                        .map_err(|_| "timeout")?
                        .map_err(|_| "hset")?;
                }
                let used: u64 = l.objects.iter().map(|(_, s)| s).sum();
                tokio::time::timeout(
                    slow,
                    redis::cmd("HSET")
                        .arg(format!("{}{}", self.usage_prefix, l.member))
                        .arg("used")
                        .arg(used)
                        .arg("objects")
                        .arg(l.objects.len())
                        .query_async::<i64>(&mut c),
                )
                .await
                .map_err(|_| "timeout")?
                .map_err(|_| "hset")?;
            }
            tokio::time::timeout(
                slow,
                redis::cmd("SET")
                    .arg(&self.complete_key)
                    .arg("1")
                    .query_async::<()>(&mut c),
            )
            .await
            .map_err(|_| "timeout")?
            .map_err(|_| "set")?;
            Ok::<(), &str>(())
        }
        .await;
        if let Err(op) = res {
            METRICS.redis_errors.with_label_values(&["reconcile"]).inc();
            log::warn!("redis: reconcile could not write the books ({op}); it runs again later");
            self.lost.store(true, Relaxed);
        }
    }

    async fn complete(&self) -> bool {
        self.link.is_up() && self.mirror.complete_now()
    }

    fn shared(&self) -> bool {
        true
    }

    fn begin_reconcile(&self) {
        // This instance's view keeps what lands meanwhile; Redis's own rebuild does not
        // (see README: a change during a reconcile may wait for the next one there).
        self.mirror.begin_reconcile_now()
    }

    fn abort_reconcile(&self) {
        self.mirror.abort_reconcile_now()
    }

    fn ready(&self) -> bool {
        // Usage read from Redis once (then kept up by the mirror while Redis is away), or
        // books this instance rebuilt itself.
        self.snapshot.load(Relaxed) || self.mirror.complete_now()
    }
}
