//! How many client connections the proxy holds at once (`server.max_connections`), what
//! happens to a new one over that, and the open-files limit under both.
//!
//! Why a bound: every client connection holds a file descriptor and memory (~6 KiB idle,
//! up to ~0.5 MiB while a pass-through download streams to a slow client), and each attempt
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
//!   make room, the one waiting longest first (tokio's `Notify` wakes waiters in FIFO
//!   order; approximately, when asks and waits race), as nginx closes its reusable
//!   connections; the new one is admitted at once, so the count may pass the cap by the
//!   evictions still under way. When none is waiting, the
//!   new connection gets [`refuse`]: `503` with `Retry-After` and `Connection: close`. So a
//!   client that opens connections and leaves them idle cannot lock others out, and one that
//!   holds them mid-request is bounded by the client timeouts.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use pingora_core::protocols::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

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

/// The count of open client connections, and of those waiting for a request, which a new
/// connection at the cap may have closed (see the module doc).
pub struct Gate {
    max: usize,
    open: AtomicUsize,
    /// Connections waiting for a request (high 32 bits) and evictions asked of them but
    /// not yet taken (low 32 bits), in one word so that `asked ≤ waiting` always holds.
    waiting: AtomicU64,
    /// Wakes the longest waiting connection when an eviction is asked.
    wake: Notify,
    /// Refusals still writing their 503 or waiting for the client to close.
    refusing: AtomicUsize,
}

const ONE_WAITING: u64 = 1 << 32;
const ASKED: u64 = ONE_WAITING - 1;

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

/// A connection waiting for a request, counted while it waits: a new connection at the cap
/// may ask it to close ([`Waiting::evicted`]).
pub struct Waiting<'a> {
    gate: &'a Gate,
    /// It took an eviction: the count was settled then.
    evicted: bool,
}

impl Gate {
    pub fn new(max: u64) -> Gate {
        let max = usize::try_from(max).unwrap_or(usize::MAX).max(1);
        METRICS.client_connections_max.set(max as i64);
        Gate {
            max,
            open: AtomicUsize::new(0),
            waiting: AtomicU64::new(0),
            wake: Notify::new(),
            refusing: AtomicUsize::new(0),
        }
    }

    /// Counts a new connection in when under the cap, or when a waiting connection can be
    /// asked to close for it.
    pub fn admit(&self) -> Admission<'_> {
        let under = self
            .open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok();
        if !under {
            // One more eviction asked, if more connections wait than are already asked.
            let asked = self
                .waiting
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                    ((w & ASKED) < (w >> 32)).then_some(w + 1)
                })
                .is_ok();
            if !asked {
                METRICS.client_connections_over[1].inc();
                return Admission::Full;
            }
            self.wake.notify_one();
            METRICS.client_connections_over[0].inc();
            self.open.fetch_add(1, Ordering::Relaxed);
        }
        METRICS.client_connections.inc();
        Admission::Admitted(Slot { gate: self })
    }

    /// Counts the caller as waiting for a request until the guard is dropped.
    pub fn waiting(&self) -> Waiting<'_> {
        self.waiting.fetch_add(ONE_WAITING, Ordering::AcqRel);
        Waiting {
            gate: self,
            evicted: false,
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

impl Waiting<'_> {
    /// Resolves when this connection is asked to close to make room for a new one (never,
    /// unless the cap is reached while it waits).
    pub async fn evicted(&mut self) {
        let gate = self.gate;
        loop {
            let wake = gate.wake.notified();
            tokio::pin!(wake);
            // Registered first, then an ask made before (two asks while no waiter was
            // registered leave one wake-up, not two) is taken at once.
            wake.as_mut().enable();
            if self.take() {
                return;
            }
            wake.await;
            if self.take() {
                return;
            }
            // Taken by another (or a wake-up left from before this one waited): wait again.
        }
    }

    /// Takes an eviction asked, if any: this connection stops waiting and closes.
    fn take(&mut self) -> bool {
        let took = self
            .gate
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (w & ASKED > 0).then(|| w - 1 - ONE_WAITING)
            })
            .is_ok();
        self.evicted |= took;
        took
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.evicted {
            return;
        }
        // No longer waiting. If every waiting connection was already asked to close, one
        // ask is now without a connection to take it: withdrawn (the connection admitted for
        // it stays; the count passes the cap by one until a connection closes).
        let _ = self
            .gate
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                let w = w - ONE_WAITING;
                Some(if (w & ASKED) > (w >> 32) { w - 1 } else { w })
            });
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

    fn counts(g: &Gate) -> (u64, u64) {
        let w = g.waiting.load(Ordering::Acquire);
        (w >> 32, w & ASKED)
    }

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
        // Both register (FIFO: `first` registered first).
        let mut f1 = Box::pin(first.evicted());
        let mut f2 = Box::pin(second.evicted());
        assert!(futures::poll!(f1.as_mut()).is_pending());
        assert!(futures::poll!(f2.as_mut()).is_pending());
        let c = g.admit();
        assert!(matches!(c, Admission::Admitted(_)));
        assert_eq!(g.open(), 3, "admitted while the evicted one closes");
        assert_eq!(counts(&g), (2, 1));
        assert!(
            futures::poll!(f1.as_mut()).is_ready(),
            "the longest waiting"
        );
        assert!(futures::poll!(f2.as_mut()).is_pending());
        drop(f1);
        drop(f2);
        assert_eq!(counts(&g), (1, 0));
        drop(first);
        assert_eq!(counts(&g), (1, 0), "an evicted one is not counted twice");
        // One waiting, none asked: the next new connection may ask it; then none can.
        assert!(matches!(g.admit(), Admission::Admitted(_)));
        assert!(matches!(g.admit(), Admission::Full));
        drop(second);
        assert_eq!(
            counts(&g),
            (0, 0),
            "its ask withdrawn as it stopped waiting"
        );
    }

    #[tokio::test]
    async fn asks_never_outnumber_waiting_connections() {
        let g = Gate::new(1);
        let _a = g.admit();
        assert!(matches!(g.admit(), Admission::Full), "nobody waiting");
        let w = g.waiting();
        assert!(matches!(g.admit(), Admission::Admitted(_)));
        assert!(matches!(g.admit(), Admission::Full), "its one ask is taken");
        assert_eq!(counts(&g), (1, 1));
        drop(w);
        assert_eq!(counts(&g), (0, 0));
        // A permit left by the withdrawn ask wakes the next waiter, which waits on.
        let mut next = g.waiting();
        let mut f = Box::pin(next.evicted());
        assert!(futures::poll!(f.as_mut()).is_pending());
        drop(f);
        drop(next);
        assert_eq!(counts(&g), (0, 0));
    }
}
