//! How many client connections the proxy holds at once (`server.max_connections`), what
//! happens to a new one over that, and the open-files limit under both.
//!
//! Why a bound: every client connection holds a file descriptor and memory (~6 KiB idle,
//! up to ~0.4 MiB while a pass-through download streams to a slow client, less with a
//! smaller `server.upstream_read_size`), and each attempt
//! holds a second descriptor for its upstream connection. Pingora accepts without bound;
//! once the process is out of descriptors, `accept` fails (Pingora then sleeps a second per
//! failure) and so do connects to origins and cache files — for every client, not just the
//! new ones. A cap below the descriptor limit keeps origins reachable and memory bounded.
//!
//! - [`raise_open_files`] (at start) raises the soft `RLIMIT_NOFILE` to the hard limit, as
//!   Go's runtime does: a shell's default soft limit, 1024, would stop cascade near 500
//!   clients while the hard limit (systemd's default: 524,288) allows far more.
//! - [`default_max_connections`]: what the limit allows, two descriptors per connection
//!   after a reserve for listeners, kept upstream connections, cache files and plugins.
//! - [`Gate`] counts open client connections. Under the cap a new one is admitted. At the
//!   cap, a connection waiting for a request (a keep-alive between two requests, or a new
//!   one that has sent nothing yet: the waits of `conn.rs` with `release_idle`) is closed to
//!   make room, the one waiting longest first (a queue by order of arrival; the new
//!   connection takes it out of the queue itself, so no other can take its place), as nginx
//!   closes its reusable connections; the new one is admitted at once, so the count may
//!   pass the cap by the evictions still under way. When none is waiting, the
//!   new connection gets [`refuse`]: `503` with `Retry-After` and `Connection: close`. So a
//!   client that opens connections and leaves them idle cannot lock others out, and one that
//!   holds them mid-request is bounded by the client timeouts.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Poll, Waker};
use std::time::Duration;

use parking_lot::Mutex;

use pingora_core::protocols::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::metrics::METRICS;

/// Descriptors kept out of the connections' share of the limit: listeners, the metrics and
/// admin services, kept upstream connections beyond one per client (up to 128 per origin
/// address), answers being finished (up to 256), refusals lingering (up to
/// [`MAX_REFUSING`]), cache files, plugin modules, Redis, logs. A quarter of a small limit.
pub const RESERVE: u64 = 1024;

/// What an open-files limit of `nofile` allows: two descriptors per client connection (its
/// own and its attempt's upstream connection) after [`RESERVE`] (or a quarter of the limit
/// when that is less); at least 1.
pub fn default_max_connections(nofile: u64) -> u64 {
    let reserve = RESERVE.min(nofile / 4);
    (nofile.saturating_sub(reserve) / 2).max(1)
}

/// The open-files limit before and after raising the soft limit to the hard one (Linux's
/// `nr_open` when the hard limit is infinite).
pub fn raise_open_files() -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    let target = if lim.rlim_max == libc::RLIM_INFINITY {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1 << 20)
    } else {
        lim.rlim_max
    };
    if before >= target {
        return Ok((before, before));
    }
    lim.rlim_cur = target;
    // SAFETY: setrlimit reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((before, target))
}

/// The count of open client connections, and the queue of those waiting for a request,
/// which a new connection at the cap may have closed (see the module doc).
pub struct Gate {
    max: usize,
    open: AtomicUsize,
    /// Connections waiting for a request, oldest first.
    waiters: Mutex<Waiters>,
    /// Refusals still writing their 503 or waiting for the client to close.
    refusing: AtomicUsize,
}

/// The waiting connections by ticket (their order of arrival), each with the waker of its
/// [`Waiting::evicted`] once polled. A ticket taken out by [`Gate::admit`] is an eviction:
/// its connection finds it gone and closes. One lock, taken when a wait starts, when it
/// ends and at each poll of the wait (tokio's `Notify` locks as often); the queue holds no
/// more than the connections.
struct Waiters {
    next: u64,
    queue: BTreeMap<u64, Option<Waker>>,
}

/// The most refusals that linger at once (write the 503, let the client read it and close):
/// past it a refused connection is closed at once.
pub const MAX_REFUSING: usize = 256;
/// How long a refusal may take, its write and the wait for the client to close together.
const REFUSAL_TIME: Duration = Duration::from_secs(1);
/// The most bytes of a refused connection's request read (and dropped) before closing it.
const REFUSAL_DRAIN: usize = 64 * 1024;

const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
Content-Type: text/plain\r\nContent-Length: 55\r\nRetry-After: 1\r\nConnection: close\r\n\r\n\
cascade: too many connections (server.max_connections)\n";

/// What a new connection gets from [`Gate::admit`].
pub enum Admission<'a> {
    /// Counted until the slot is dropped.
    Admitted(Slot<'a>),
    /// At the cap with no connection waiting: [`refuse`] it.
    Full,
}

/// An open client connection, counted while it lives.
pub struct Slot<'a> {
    gate: &'a Gate,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.gate.open.fetch_sub(1, Ordering::Relaxed);
        METRICS.client_connections.dec();
    }
}

/// A connection waiting for a request, queued while it waits: a new connection at the cap
/// may close it ([`Waiting::evicted`]).
pub struct Waiting<'a> {
    gate: &'a Gate,
    ticket: u64,
    /// [`Waiting::evicted`] has said so: this connection closes.
    closing: bool,
}

impl Gate {
    pub fn new(max: u64) -> Gate {
        let max = usize::try_from(max).unwrap_or(usize::MAX).max(1);
        METRICS.client_connections_max.set(max as i64);
        Gate {
            max,
            open: AtomicUsize::new(0),
            waiters: Mutex::new(Waiters {
                next: 0,
                queue: BTreeMap::new(),
            }),
            refusing: AtomicUsize::new(0),
        }
    }

    /// Counts a new connection in when under the cap, or when the connection waiting
    /// longest can be closed for it. The eviction is decided here, by ticket, so no other
    /// connection (the new one included, once it waits for its first request) can take it.
    pub fn admit(&self) -> Admission<'_> {
        let under = self
            .open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok();
        if !under {
            let Some((_, waker)) = self.waiters.lock().queue.pop_first() else {
                METRICS.client_connections_over[1].inc();
                return Admission::Full;
            };
            if let Some(w) = waker {
                w.wake();
            }
            METRICS.client_connections_over[0].inc();
            self.open.fetch_add(1, Ordering::Relaxed);
        }
        METRICS.client_connections.inc();
        Admission::Admitted(Slot { gate: self })
    }

    /// Queues the caller as waiting for a request until the guard is dropped.
    pub fn waiting(&self) -> Waiting<'_> {
        let mut w = self.waiters.lock();
        let ticket = w.next;
        w.next += 1;
        w.queue.insert(ticket, None);
        Waiting {
            gate: self,
            ticket,
            closing: false,
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections waiting for a request now.
    #[cfg(test)]
    fn waiting_count(&self) -> usize {
        self.waiters.lock().queue.len()
    }
}

impl Waiting<'_> {
    /// Resolves when this connection is asked to close to make room for a new one (never,
    /// unless the cap is reached while it waits and it is the one waiting longest).
    pub async fn evicted(&mut self) {
        std::future::poll_fn(|cx| {
            let mut w = self.gate.waiters.lock();
            match w.queue.get_mut(&self.ticket) {
                None => {
                    self.closing = true;
                    Poll::Ready(())
                }
                Some(slot) => {
                    if !slot.as_ref().is_some_and(|k| k.will_wake(cx.waker())) {
                        *slot = Some(cx.waker().clone());
                    }
                    Poll::Pending
                }
            }
        })
        .await
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        // No longer waiting. Its ticket gone although it was never told (a request arrived
        // as it was chosen, and wins: closing now would reset it): the eviction passes to the
        // connection waiting longest after it, so the count stays at the cap. With none
        // left, the count passes the cap by one until a connection closes. (When it ended
        // its wait for another reason at that moment, its idle timeout or shutdown, it
        // closes too: one connection more than needed is closed.)
        let mut w = self.gate.waiters.lock();
        if w.queue.remove(&self.ticket).is_some() || self.closing {
            return;
        }
        let next = w.queue.pop_first();
        drop(w);
        if let Some((_, Some(waker))) = next {
            waker.wake();
        }
    }
}

/// Answers a connection over the cap: `503`, `Retry-After: 1`, `Connection: close`, then
/// lets the client read it (its request is read and dropped until it closes, within
/// [`REFUSAL_TIME`] and [`REFUSAL_DRAIN`]: closing with its request unread would reset the
/// connection, and the client might lose the answer). Past [`MAX_REFUSING`] refusals at
/// once, the connection is closed at once.
pub async fn refuse(gate: &Gate, mut stream: Stream) {
    if gate.refusing.fetch_add(1, Ordering::Relaxed) >= MAX_REFUSING {
        gate.refusing.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    let _ = tokio::time::timeout(REFUSAL_TIME, async {
        stream.write_all(REFUSAL).await?;
        stream.flush().await?;
        stream.shutdown().await?;
        let mut buf = [0u8; 4096];
        let mut read = 0;
        while read < REFUSAL_DRAIN {
            match stream.read(&mut buf).await? {
                0 => break,
                n => read += n,
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    gate.refusing.fetch_sub(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_leaves_a_reserve_and_two_descriptors_per_connection() {
        assert_eq!(default_max_connections(1024), 384);
        assert_eq!(default_max_connections(4096), 1536);
        assert_eq!(default_max_connections(524_288), 261_632);
        assert_eq!(default_max_connections(1), 1);
    }

    #[test]
    fn the_refusal_says_its_length() {
        let text = std::str::from_utf8(REFUSAL).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(len, body.len());
    }

    #[test]
    fn under_the_cap_connections_are_admitted_and_counted_until_dropped() {
        let g = Gate::new(2);
        let a = g.admit();
        let b = g.admit();
        assert!(matches!(a, Admission::Admitted(_)));
        assert!(matches!(b, Admission::Admitted(_)));
        assert_eq!(g.open(), 2);
        assert!(matches!(g.admit(), Admission::Full));
        drop(a);
        assert_eq!(g.open(), 1);
        assert!(matches!(g.admit(), Admission::Admitted(_)));
        drop(b);
    }

    #[tokio::test]
    async fn at_the_cap_the_longest_waiting_connection_is_asked_to_close() {
        let g = Gate::new(2);
        let _a = g.admit();
        let _b = g.admit();
        let mut first = g.waiting();
        let mut second = g.waiting();
        let mut f1 = Box::pin(first.evicted());
        let mut f2 = Box::pin(second.evicted());
        assert!(futures::poll!(f1.as_mut()).is_pending());
        assert!(futures::poll!(f2.as_mut()).is_pending());
        let c = g.admit();
        assert!(matches!(c, Admission::Admitted(_)));
        assert_eq!(g.open(), 3, "admitted while the evicted one closes");
        assert_eq!(g.waiting_count(), 1);
        assert!(
            futures::poll!(f1.as_mut()).is_ready(),
            "the longest waiting"
        );
        assert!(futures::poll!(f2.as_mut()).is_pending());
        drop(f1);
        drop(f2);
        drop(first);
        assert_eq!(g.waiting_count(), 1, "an evicted one is not counted twice");
        // One waiting: the next new connection may close it; then none can.
        assert!(matches!(g.admit(), Admission::Admitted(_)));
        assert!(matches!(g.admit(), Admission::Full));
        drop(second);
        assert_eq!(g.waiting_count(), 0);
    }

    #[tokio::test]
    async fn the_new_connection_cannot_take_the_eviction_made_for_it() {
        // The race CI once lost: the evicted keep-alive had not run yet when the new
        // connection began waiting for its first request, and the new one took the eviction
        // (and was closed) instead.
        let g = Gate::new(1);
        let _a = g.admit();
        let mut old = g.waiting();
        let new = g.admit();
        assert!(matches!(new, Admission::Admitted(_)));
        let mut newcomer = g.waiting();
        assert!(
            futures::poll!(Box::pin(newcomer.evicted())).is_pending(),
            "the new connection waits for its request"
        );
        assert!(
            futures::poll!(Box::pin(old.evicted())).is_ready(),
            "the old one, even polled only now, is the one closed"
        );
    }

    #[tokio::test]
    async fn a_connection_evicted_before_it_first_polls_still_sees_it() {
        // Waiting counted before its wait is polled (no waker yet): the eviction is kept.
        let g = Gate::new(1);
        let _a = g.admit();
        let mut w1 = g.waiting();
        let mut w2 = g.waiting();
        let _b = g.admit();
        let _c = g.admit();
        assert!(matches!(g.admit(), Admission::Full), "none left to close");
        assert!(futures::poll!(Box::pin(w1.evicted())).is_ready());
        assert!(futures::poll!(Box::pin(w2.evicted())).is_ready());
        assert_eq!(g.open(), 3);
    }

    #[tokio::test]
    async fn a_waiter_that_leaves_is_never_chosen() {
        let g = Gate::new(1);
        let _a = g.admit();
        assert!(matches!(g.admit(), Admission::Full), "nobody waiting");
        let gone = g.waiting();
        let mut stays = g.waiting();
        drop(gone);
        assert!(matches!(g.admit(), Admission::Admitted(_)));
        assert!(futures::poll!(Box::pin(stays.evicted())).is_ready());
        assert!(matches!(g.admit(), Admission::Full));
        drop(stays);
        assert_eq!(g.waiting_count(), 0);
    }

    #[tokio::test]
    async fn an_eviction_its_connection_never_saw_passes_to_the_next() {
        // Chosen while its request arrived (the request wins; it never saw the eviction):
        // the next waiting connection closes instead, and the count comes back to the cap.
        let g = Gate::new(1);
        let _a = g.admit();
        let chosen = g.waiting();
        let mut next = g.waiting();
        let _new = g.admit();
        assert!(futures::poll!(Box::pin(next.evicted())).is_pending());
        drop(chosen);
        assert!(futures::poll!(Box::pin(next.evicted())).is_ready());
        assert_eq!(g.waiting_count(), 0);
        // One that saw it passes nothing on.
        let mut seen = g.waiting();
        let mut other = g.waiting();
        let _newer = g.admit();
        assert!(futures::poll!(Box::pin(seen.evicted())).is_ready());
        drop(seen);
        assert!(futures::poll!(Box::pin(other.evicted())).is_pending());
        assert_eq!(g.waiting_count(), 1);
    }

    #[tokio::test]
    async fn an_evicted_connection_is_woken() {
        let g = std::sync::Arc::new(Gate::new(1));
        let _a = g.admit();
        let g2 = g.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut w = g2.waiting();
            tx.send(()).unwrap();
            w.evicted().await;
        });
        rx.await.unwrap();
        tokio::task::yield_now().await;
        assert!(matches!(g.admit(), Admission::Admitted(_)));
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("woken")
            .unwrap();
    }
}
