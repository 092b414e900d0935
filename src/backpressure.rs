//! Backpressure from a client that stops reading to the origin that feeds it.
//!
//! Pingora's HTTP/1 proxy reads an origin's body in 64 KiB chunks into a channel of four
//! tasks, and its client side takes a batch of up to four more to write: when a client
//! stops reading, the upstream side goes on reading until both are full, about ten chunks
//! (~0.5 MiB per slow pass-through download, benches/README.md). Neither size is public.
//!
//! Both ends of the pipe are cascade's, though: the client stream is a `SendBuf`, and every
//! attempt's upstream connection is a virtual socket of `origin::pool`. So while a write to
//! the client waits (its socket has taken nothing of it yet), the request's upstream reads
//! wait too: the pipe stops filling at what it held when the client stalled, and the origin
//! is held back by TCP instead of by cascade's memory. The first byte the client takes
//! wakes them.
//!
//! It cannot deadlock: a read is held only while a client write is waiting, and such a
//! write either makes progress (which wakes the read), fails, or times out
//! (`server.send_timeout`), which ends the request. Nor does it make the origin look slow:
//! Pingora times each upstream read, so a read is held for at most half the origin's read
//! timeout per stall ([`Hold`]); then the reads go on until Pingora's own pipe is full, as
//! before, and that wait has no timer. Reads that run outside the request's
//! task (the pool finishing a replayed 404, background fetches) are never held. The flag is
//! cleared at each request's start, so a write abandoned with its request holds nothing.
//!
//! The link between the two ends is a tokio task-local: Pingora proxies a request's two
//! halves in one task (`try_join!`), and its connector calls cascade's connect there too.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;
use tokio::time::{Instant, Sleep};

/// One client connection's write state, shared by its `SendBuf` and, through the task-local,
/// the upstream reads of its requests.
#[derive(Debug, Default)]
pub struct Flow {
    /// A write to the client is waiting for its socket.
    stalled: AtomicBool,
    /// The upstream read held until the client takes a byte.
    reader: AtomicWaker,
}

tokio::task_local! {
    static FLOW: Arc<Flow>;
}

impl Flow {
    pub fn new() -> Arc<Flow> {
        Arc::new(Flow::default())
    }

    /// A write (or flush) to the client returned: `pending` if it waits for the socket; any
    /// other answer (bytes taken, an error) lets held upstream reads go.
    pub fn on_write(&self, pending: bool) {
        if pending {
            self.stalled.store(true, Ordering::Release);
        } else if self.stalled.load(Ordering::Acquire) && self.stalled.swap(false, Ordering::AcqRel)
        {
            self.reader.wake();
        }
    }

    /// Is a write to the client waiting?
    #[cfg(test)]
    pub(crate) fn is_stalled(&self) -> bool {
        self.stalled.load(Ordering::Acquire)
    }

    /// A new request starts: nothing of the previous one holds its reads.
    pub fn reset(&self) {
        self.stalled.store(false, Ordering::Release);
    }

    fn poll_clear(&self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.stalled.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        self.reader.register(cx.waker());
        // Taken between the check and the registration: go on.
        if self.stalled.load(Ordering::Acquire) {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }

    /// Runs `f` (one request) with this connection's flow as its upstream reads' flow.
    pub fn scope<F: Future>(self: &Arc<Self>, f: F) -> impl Future<Output = F::Output> {
        self.reset();
        FLOW.scope(self.clone(), f)
    }
}

/// An upstream connection's side: how long its reads have been held in the current stall.
/// Pingora times each upstream read (`timeouts.read`), and a read held past it would fail
/// as an origin timeout (counted against the peer) although the client is the slow one; so
/// a read is held for at most `max` per stall (half the read timeout), then the reads go on
/// as Pingora's own pipe allows, which then waits without a timer.
#[derive(Debug)]
pub struct Hold {
    max: Duration,
    deadline: Deadline,
    /// This stall has held the reads for `max` already.
    spent: bool,
}

impl Hold {
    pub fn new(max: Duration) -> Hold {
        Hold {
            max,
            deadline: Deadline::default(),
            spent: false,
        }
    }

    /// Before a read from the socket: `Pending` while the request's client is stalled
    /// ([`poll_upstream_read`]), for at most `max` per stall.
    pub fn poll_turn(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if poll_upstream_read(cx).is_ready() {
            self.deadline.disarm();
            self.spent = false;
            return Poll::Ready(());
        }
        if self.spent {
            return Poll::Ready(());
        }
        let passed = self.deadline.poll_after(cx, self.max);
        self.spent = passed.is_ready();
        passed
    }
}

/// A clock armed by the first wait of a stretch and kept armed until disarmed: ready once
/// the stretch has lasted a limit. Its timer is allocated on a connection's first wait and
/// kept (one allocation per connection that ever waits, not one per wait). Used by the
/// send timeout (`sendbuf`) and by [`Hold`].
#[derive(Debug, Default)]
pub struct Deadline {
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl Deadline {
    /// Arms the clock for `limit` if it is not armed, and polls it: `Ready` (and disarmed)
    /// once `limit` has passed since it was armed. A limit past the clock's range never
    /// passes.
    pub fn poll_after(&mut self, cx: &mut Context<'_>, limit: Duration) -> Poll<()> {
        if !self.armed {
            let Some(deadline) = Instant::now().checked_add(limit) else {
                return Poll::Pending;
            };
            match &mut self.timer {
                Some(t) => t.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            self.armed = true;
        }
        let Some(timer) = self.timer.as_mut() else {
            return Poll::Pending;
        };
        let r = timer.as_mut().poll(cx);
        if r.is_ready() {
            self.armed = false;
        }
        r
    }

    /// The stretch is over: the next wait starts a new one.
    pub fn disarm(&mut self) {
        self.armed = false;
    }

    /// Is a stretch being timed?
    #[cfg(test)]
    pub fn is_armed(&self) -> bool {
        self.armed
    }
}

/// For an upstream read about to read from its socket: `Pending` (woken when the client
/// takes a byte) while the current request's client is stalled; `Ready` otherwise, and
/// always outside a request's task.
fn poll_upstream_read(cx: &mut Context<'_>) -> Poll<()> {
    FLOW.try_with(|f| f.poll_clear(cx))
        .unwrap_or(Poll::Ready(()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn outside_a_request_reads_are_never_held() {
        let flow = Flow::new();
        flow.on_write(true);
        let w = Arc::new(Count(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(w);
        let mut cx = Context::from_waker(&waker);
        assert!(poll_upstream_read(&mut cx).is_ready());
    }

    #[tokio::test]
    async fn a_stalled_client_holds_its_requests_reads_until_it_takes_a_byte() {
        let flow = Flow::new();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(count.clone());
        let f = flow.clone();
        flow.scope(async move {
            let mut cx = Context::from_waker(&waker);
            assert!(poll_upstream_read(&mut cx).is_ready(), "not stalled");
            f.on_write(true);
            assert!(poll_upstream_read(&mut cx).is_pending(), "stalled");
            assert_eq!(count.0.load(Ordering::SeqCst), 0);
            f.on_write(true);
            assert_eq!(count.0.load(Ordering::SeqCst), 0, "still nothing taken");
            f.on_write(false);
            assert_eq!(count.0.load(Ordering::SeqCst), 1, "woken by the progress");
            assert!(poll_upstream_read(&mut cx).is_ready());
            // A write that fails lets reads go too (the request then ends).
            f.on_write(true);
            assert!(poll_upstream_read(&mut cx).is_pending());
            f.on_write(false);
            assert!(poll_upstream_read(&mut cx).is_ready());
            // Stalled when the request ends: the next request's scope starts clear.
            f.on_write(true);
        })
        .await;
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(count);
        flow.scope(async move {
            let mut cx = Context::from_waker(&waker);
            assert!(poll_upstream_read(&mut cx).is_ready());
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_is_held_at_most_max_per_stall() {
        let flow = Flow::new();
        let f = flow.clone();
        flow.scope(async move {
            let mut hold = Hold::new(Duration::from_secs(2));
            f.on_write(true);
            let held = std::future::poll_fn(|cx| match hold.poll_turn(cx) {
                Poll::Ready(()) => Poll::Ready(Instant::now()),
                Poll::Pending => Poll::Pending,
            });
            let t0 = Instant::now();
            let at = held.await;
            assert_eq!(at - t0, Duration::from_secs(2), "released after max");
            // The rest of this stall: reads go on.
            let mut cx = Context::from_waker(std::task::Waker::noop());
            assert!(hold.poll_turn(&mut cx).is_ready());
            // The client takes bytes, then stalls again: a new hold.
            f.on_write(false);
            assert!(hold.poll_turn(&mut cx).is_ready());
            f.on_write(true);
            assert!(hold.poll_turn(&mut cx).is_pending());
        })
        .await;
    }
}
