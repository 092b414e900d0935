//! A client connection's write buffer, held only while a response is being written.
//!
//! Pingora gives every accepted connection a `BufWriter` of the listener's write-buffer size
//! and keeps it for the connection's whole life, so every idle keep-alive holds it (8 KiB of
//! cascade's ~14 KiB, benches/README.md); the buffer's size can only be set at accept
//! (`L4BufferSettings`). cascade's listeners now get none, and the connection loop
//! (`conn.rs`) wraps each client stream in a [`SendBuf`] of `server.write_buffer` bytes:
//!
//! - the buffer is allocated on a response's first small write and freed when the response
//!   is flushed, so an idle connection holds none;
//! - writes that fit are gathered, so a small response's header and body still go out in
//!   one send;
//! - a write that does not fit goes out together with what is gathered in one vectored
//!   write (`writev`): a 64 KiB hit's header and body in one call, where a `BufWriter`
//!   sends the header alone first;
//! - a write at least as large as the buffer, with nothing gathered, goes straight to the
//!   socket, uncopied.
//!
//! It also bounds how long a response waits for a client that stopped reading
//! (`server.send_timeout`, nginx's `send_timeout` semantics): a write (or flush) that the
//! client's socket has not taken a byte of for that long fails with `TimedOut`, and Pingora
//! ends the request and closes the connection. Pingora has no such bound (its
//! `write_timeout` applies to a whole body chunk, so it would cut off a slow but steady
//! client of a large hit); without one, a client that stops reading holds its connection,
//! its response's buffers (~0.5 MiB for a pass-through) and its upstream connection forever.
//! The timer restarts whenever a write makes progress, so slow but steady clients are
//! never cut off.
//!
//! And it tells the connection's `backpressure::Flow` whether a write waits for the client,
//! so that the request's upstream reads wait with it.
//!
//! Everything else a Pingora stream answers (its id, digests, TLS, peeking) is the wrapped
//! stream's.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::tls::{SslDigest, TlsRef};
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::backpressure::{Deadline, Flow};

/// The send timeout's clock: armed while a write waits on a client that takes nothing.
#[derive(Debug, Default)]
struct Stall {
    /// `server.send_timeout` (`None`: writes wait forever).
    limit: Option<Duration>,
    /// Armed at a stalled write; its timer is kept for the connection (Pingora flushes
    /// after every chunk of a chunked body: one allocation per stall otherwise).
    clock: Deadline,
    /// Told whether each write waits for the client (`backpressure`).
    flow: Option<Arc<Flow>>,
}

impl Stall {
    /// The inner stream's answer `r` to a write or flush: one that waits fails once the
    /// client has taken nothing for `limit`; any other answer (progress, or an error)
    /// stops the clock. The flow hears whether it waits (the request's upstream reads then
    /// wait too).
    fn watch<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        let r = self.clock(cx, r);
        if let Some(flow) = &self.flow {
            flow.on_write(r.is_pending());
        }
        r
    }

    /// [`Stall::watch`] without the flow: the send timeout's clock.
    fn clock<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if !r.is_pending() {
            self.clock.disarm();
            return r;
        }
        let Some(limit) = self.limit else {
            return Poll::Pending;
        };
        match self.clock.poll_after(cx, limit) {
            Poll::Ready(()) => {
                crate::metrics::METRICS.client_send_timeouts.inc();
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the client took no bytes of the response for {limit:?} (server.send_timeout)"),
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A stream whose writes are gathered in a buffer that exists only between a response's
/// first write and its flush.
#[derive(Debug)]
pub struct SendBuf<S: AsyncWrite + Unpin = Stream> {
    inner: S,
    /// Gathered bytes; no allocation while empty after a flush.
    buf: Vec<u8>,
    cap: usize,
    stall: Stall,
}

impl<S: AsyncWrite + Unpin> SendBuf<S> {
    /// `cap`: the most bytes gathered before they are written (0: none, every write goes
    /// straight to the stream).
    pub fn new(inner: S, cap: usize) -> Self {
        SendBuf {
            inner,
            buf: Vec::new(),
            cap,
            stall: Stall::default(),
        }
    }

    /// Fail a write or flush that the client has taken nothing of for `limit`
    /// (`server.send_timeout`); `None`: wait forever.
    pub fn with_send_timeout(mut self, limit: Option<Duration>) -> Self {
        self.stall.limit = limit;
        self
    }

    /// Tell `flow` whether each write waits for the client (`backpressure`: the request's
    /// upstream reads wait with it).
    pub fn with_flow(mut self, flow: Arc<Flow>) -> Self {
        self.stall.flow = Some(flow);
        self
    }

    /// Bytes of buffer held now (0 once a response has been flushed).
    #[cfg(test)]
    fn held(&self) -> usize {
        self.buf.capacity()
    }

    fn gather(&mut self, data: &[u8]) {
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(self.cap);
        }
        self.buf.extend_from_slice(data);
    }

    /// Writes out everything gathered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.buf.is_empty() {
            let r = Pin::new(&mut self.inner).poll_write(cx, &self.buf);
            let n = ready!(self.stall.watch(cx, r))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.buf.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SendBuf<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.buf.len() + data.len() <= this.cap {
            this.gather(data);
            return Poll::Ready(Ok(data.len()));
        }
        // It does not fit: what is gathered goes out first, with `data` in the same call.
        while !this.buf.is_empty() {
            let gathered = this.buf.len();
            let r = Pin::new(&mut this.inner)
                .poll_write_vectored(cx, &[IoSlice::new(&this.buf), IoSlice::new(data)]);
            let n = ready!(this.stall.watch(cx, r))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if n < gathered {
                this.buf.drain(..n);
                continue;
            }
            this.buf.clear();
            if n > gathered {
                return Poll::Ready(Ok(n - gathered));
            }
        }
        if data.len() < this.cap {
            this.gather(data);
            return Poll::Ready(Ok(data.len()));
        }
        let r = Pin::new(&mut this.inner).poll_write(cx, data);
        this.stall.watch(cx, r)
    }

    /// Without a buffer (`cap` 0) a vectored write (Pingora's chunk: size line, data, CRLF)
    /// goes to the stream as it is, one `writev`; with one, its pieces are gathered.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.cap > 0 || !this.buf.is_empty() {
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &**b);
            return Pin::new(this).poll_write(cx, first);
        }
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.stall.watch(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.cap == 0 && self.inner.is_write_vectored()
    }

    /// Writes out everything gathered, then gives the buffer back: the next response
    /// allocates its own.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        ready!(this.stall.watch(cx, r))?;
        this.buf = Vec::new();
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        let r = Pin::new(&mut this.inner).poll_shutdown(cx);
        ready!(this.stall.watch(cx, r))?;
        this.buf = Vec::new();
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for SendBuf<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> Drop for SendBuf<S> {
    fn drop(&mut self) {
        // Pingora's own stream tries one non-blocking flush when dropped; gathered bytes get
        // the same chance here. (The wrapped stream is dropped after this, flushing its own.)
        let mut cx = Context::from_waker(std::task::Waker::noop());
        // No clock: a drop may run outside the runtime.
        self.stall.limit = None;
        let _ = self.poll_drain(&mut cx);
    }
}

#[async_trait]
impl Shutdown for SendBuf<Stream> {
    async fn shutdown(&mut self) {
        let _ = AsyncWriteExt::flush(self).await;
        Shutdown::shutdown(&mut *self.inner).await
    }
}

impl UniqueID for SendBuf<Stream> {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for SendBuf<Stream> {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for SendBuf<Stream> {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for SendBuf<Stream> {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for SendBuf<Stream> {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for SendBuf<Stream> {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// What a [`Rec`] saw: each write call (vectored or not, bytes taken) and every byte.
    #[derive(Default)]
    struct Log {
        calls: Vec<(&'static str, usize)>,
        out: Vec<u8>,
        flushes: usize,
    }

    /// A socket stand-in: takes at most `limit` bytes per call and, when `stall` is set,
    /// answers every other call `Pending` (waking itself, as a socket that drains would).
    struct Rec {
        log: Arc<Mutex<Log>>,
        limit: usize,
        stall: bool,
        stalled: bool,
    }

    impl Rec {
        fn new(limit: usize, stall: bool) -> (Rec, Arc<Mutex<Log>>) {
            let log = Arc::new(Mutex::new(Log::default()));
            let rec = Rec {
                log: log.clone(),
                limit,
                stall,
                stalled: false,
            };
            (rec, log)
        }

        fn stall_now(&mut self, cx: &mut Context<'_>) -> bool {
            if self.stall && !self.stalled {
                self.stalled = true;
                cx.waker().wake_by_ref();
                return true;
            }
            self.stalled = false;
            false
        }
    }

    impl AsyncWrite for Rec {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            if this.stall_now(cx) {
                return Poll::Pending;
            }
            let n = data.len().min(this.limit);
            let mut log = this.log.lock().unwrap();
            log.out.extend_from_slice(&data[..n]);
            log.calls.push(("write", n));
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            if this.stall_now(cx) {
                return Poll::Pending;
            }
            let mut left = this.limit;
            let mut log = this.log.lock().unwrap();
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(left);
                log.out.extend_from_slice(&b[..take]);
                left -= take;
                n += take;
            }
            log.calls.push(("writev", n));
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.log.lock().unwrap().flushes += 1;
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A client socket that takes `per_call` bytes, then nothing for `gap` (waking the
    /// writer after it); `gap: None`: nothing ever again after the first call.
    struct Slow {
        per_call: usize,
        gap: Option<Duration>,
        ready: bool,
        taken: usize,
    }

    impl Slow {
        fn poll_take(&mut self, cx: &mut Context<'_>, n: usize) -> Poll<io::Result<usize>> {
            if !self.ready {
                if let Some(gap) = self.gap {
                    let w = cx.waker().clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(gap).await;
                        w.wake();
                    });
                    self.ready = true;
                }
                return Poll::Pending;
            }
            self.ready = false;
            let n = n.min(self.per_call);
            self.taken += n;
            Poll::Ready(Ok(n))
        }
    }

    impl AsyncWrite for Slow {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().poll_take(cx, data.len())
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A socket that never takes a byte (and never wakes its writer).
    fn stuck() -> Slow {
        Slow {
            per_call: 0,
            gap: None,
            ready: false,
            taken: 0,
        }
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_fails_the_write_after_the_send_timeout() {
        let limit = Duration::from_millis(100);
        // Every way a write can wait: a large write straight through (no buffer, or nothing
        // gathered), the flush of gathered bytes, a write that does not fit next to gathered
        // ones (one `writev`), a vectored write without a buffer.
        let cases: [(&str, usize, &[usize], bool); 5] = [
            ("straight, no buffer", 0, &[20_000], false),
            ("straight, nothing gathered", 8192, &[20_000], false),
            ("flush of gathered bytes", 8192, &[100], true),
            ("gathered + a large write", 8192, &[100, 10_000], false),
            ("vectored, no buffer", 0, &[], false),
        ];
        for (what, cap, writes, flush) in cases {
            let mut s = SendBuf::new(stuck(), cap).with_send_timeout(Some(limit));
            let t0 = std::time::Instant::now();
            let run = async {
                if writes.is_empty() {
                    let (a, b) = (bytes(10, 1), bytes(10, 2));
                    let bufs = [IoSlice::new(&a), IoSlice::new(&b)];
                    std::future::poll_fn(|cx| Pin::new(&mut s).poll_write_vectored(cx, &bufs))
                        .await?;
                }
                for &n in writes {
                    s.write_all(&bytes(n, 3)).await?;
                }
                if flush {
                    s.flush().await?;
                }
                Ok::<_, io::Error>(())
            };
            let e = tokio::time::timeout(Duration::from_secs(5), run)
                .await
                .unwrap_or_else(|_| panic!("{what}: never timed out"))
                .unwrap_err();
            let waited = t0.elapsed();
            assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{what}: {e}");
            assert!(waited >= limit, "{what}: after {waited:?}");
        }
        // Without a send timeout, the write waits for as long as the client does.
        let mut s = SendBuf::new(stuck(), 0);
        let waited = tokio::time::timeout(Duration::from_millis(300), s.write_all(b"x")).await;
        assert!(waited.is_err(), "the write ended: {waited:?}");
    }

    #[tokio::test]
    async fn without_a_buffer_a_vectored_write_stays_one_call() {
        // Pingora writes a body chunk as its size line, data and CRLF in one vectored write.
        let (rec, log) = Rec::new(usize::MAX, false);
        let mut s = SendBuf::new(rec, 0);
        assert!(s.is_write_vectored());
        let parts = [bytes(6, 1), bytes(5000, 2), bytes(2, 3)];
        let bufs: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let n = std::future::poll_fn(|cx| Pin::new(&mut s).poll_write_vectored(cx, &bufs))
            .await
            .unwrap();
        assert_eq!(n, 5008);
        assert_eq!(log.lock().unwrap().calls, [("writev", 5008)]);
        assert_eq!(log.lock().unwrap().out, parts.concat());
        // With a buffer, the pieces are gathered (and sent as one at the flush).
        let (rec, log) = Rec::new(usize::MAX, false);
        let mut s = SendBuf::new(rec, 8192);
        assert!(!s.is_write_vectored());
        for p in &parts {
            s.write_all(p).await.unwrap();
        }
        s.flush().await.unwrap();
        assert_eq!(log.lock().unwrap().calls, [("write", 5008)]);
    }

    #[tokio::test]
    async fn a_slow_but_steady_client_is_never_cut_off() {
        // 100 bytes every 60 ms: 1.2 s for 2000 bytes, twelve times the 100 ms send timeout,
        // which restarts whenever the client takes some.
        let slow = Slow {
            per_call: 100,
            gap: Some(Duration::from_millis(60)),
            ready: false,
            taken: 0,
        };
        let mut s = SendBuf::new(slow, 0).with_send_timeout(Some(Duration::from_millis(100)));
        let t0 = std::time::Instant::now();
        s.write_all(&bytes(2000, 4)).await.unwrap();
        s.flush().await.unwrap();
        assert!(t0.elapsed() >= Duration::from_millis(1000));
        assert_eq!(s.inner.taken, 2000);
        assert!(
            !s.stall.clock.is_armed(),
            "the clock stops with the response"
        );
        // What a connection that ever stalled keeps: the timer.
        assert!(
            std::mem::size_of::<tokio::time::Sleep>() <= 128,
            "{}",
            std::mem::size_of::<tokio::time::Sleep>()
        );
    }

    #[tokio::test]
    async fn a_write_that_waits_for_the_client_says_so_to_the_flow() {
        let flow = Flow::new();
        let slow = Slow {
            per_call: 100,
            gap: Some(Duration::from_millis(30)),
            ready: false,
            taken: 0,
        };
        let mut s = SendBuf::new(slow, 0).with_flow(flow.clone());
        let data = bytes(300, 5);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(Pin::new(&mut s).poll_write(&mut cx, &data).is_pending());
        assert!(flow.is_stalled(), "a write waits for the socket");
        s.write_all(&data).await.unwrap();
        assert!(!flow.is_stalled(), "the client took bytes");
        // A flush that waits, too.
        let flow = Flow::new();
        let mut s = SendBuf::new(stuck(), 8192).with_flow(flow.clone());
        s.write_all(b"gathered").await.unwrap();
        assert!(!flow.is_stalled(), "gathered: the socket is not asked");
        assert!(Pin::new(&mut s).poll_flush(&mut cx).is_pending());
        assert!(flow.is_stalled());
        // A write that times out (the request then ends) lets the reads go too.
        let flow = Flow::new();
        let mut s = SendBuf::new(stuck(), 0)
            .with_send_timeout(Some(Duration::from_millis(50)))
            .with_flow(flow.clone());
        let e = s.write_all(b"never taken").await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(!flow.is_stalled(), "failed, not waiting");
    }

    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    }

    #[tokio::test]
    async fn a_small_response_is_one_send_and_the_buffer_is_freed_after_it() {
        let (rec, log) = Rec::new(usize::MAX, false);
        let mut s = SendBuf::new(rec, 8192);
        assert_eq!(s.held(), 0, "nothing held before a response");
        let (head, body) = (bytes(300, 1), bytes(3000, 2));
        s.write_all(&head).await.unwrap();
        s.write_all(&body).await.unwrap();
        assert!(log.lock().unwrap().calls.is_empty(), "gathered, not sent");
        assert_eq!(s.held(), 8192);
        s.flush().await.unwrap();
        let log = log.lock().unwrap();
        assert_eq!(log.calls, [("write", 3300)]);
        assert_eq!(log.out, [head, body].concat());
        assert_eq!(log.flushes, 1);
        assert_eq!(
            s.held(),
            0,
            "the buffer is given back once the response is out"
        );
    }

    #[tokio::test]
    async fn a_head_and_a_body_larger_than_the_buffer_go_out_in_one_vectored_write() {
        let (rec, log) = Rec::new(usize::MAX, false);
        let mut s = SendBuf::new(rec, 8192);
        let (head, body) = (bytes(300, 3), bytes(65536, 4));
        s.write_all(&head).await.unwrap();
        s.write_all(&body).await.unwrap();
        s.flush().await.unwrap();
        let log = log.lock().unwrap();
        assert_eq!(log.calls, [("writev", 65836)]);
        assert_eq!(log.out, [head, body].concat());
    }

    #[tokio::test]
    async fn a_large_write_with_nothing_gathered_goes_straight_through() {
        let (rec, log) = Rec::new(usize::MAX, false);
        let mut s = SendBuf::new(rec, 8192);
        let body = bytes(1 << 20, 5);
        s.write_all(&body).await.unwrap();
        assert_eq!(s.held(), 0, "never copied into the buffer");
        s.flush().await.unwrap();
        assert_eq!(log.lock().unwrap().calls, [("write", 1 << 20)]);
    }

    #[tokio::test]
    async fn short_and_stalled_writes_lose_and_repeat_nothing() {
        // Every mix of sizes around the buffer's, against a socket that takes 1000 bytes at a
        // time and stalls every other call: the bytes out are the bytes in, in order.
        let mut seed = 0x2545_f491_u64;
        let mut next = |m: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % m
        };
        for round in 0..50 {
            let (rec, log) = Rec::new(1000, round % 2 == 0);
            let mut s = SendBuf::new(rec, 4096);
            let mut want = Vec::new();
            for i in 0..40 {
                let data = bytes(next(10_000) as usize, i);
                s.write_all(&data).await.unwrap();
                want.extend_from_slice(&data);
                if next(4) == 0 {
                    s.flush().await.unwrap();
                }
            }
            s.flush().await.unwrap();
            let log = log.lock().unwrap();
            assert!(log.calls.iter().all(|(_, n)| *n > 0 && *n <= 1000));
            assert!(log.out == want, "round {round}: the bytes out differ");
        }
    }

    #[tokio::test]
    async fn gathered_bytes_get_one_try_when_the_stream_is_dropped() {
        let (rec, log) = Rec::new(usize::MAX, false);
        let mut s = SendBuf::new(rec, 8192);
        s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            .await
            .unwrap();
        drop(s);
        assert_eq!(log.lock().unwrap().out, b"HTTP/1.1 400 Bad Request\r\n\r\n");
    }
}
