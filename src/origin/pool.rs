//! cascade's connection pool for client requests' attempts (reads and writes) to HTTP and
//! HTTPS origins (`server.upstream_pool: cascade`): keeps the upstream connections Pingora
//! would close, foremost main's connection after a 404 that is replayed to a fallback, and
//! closes the ones Pingora would keep although the origin may be closing them (an upload it
//! refused).
//!
//! Why it exists: cascade replays an answer (a fallback's 404, a `retry_on` status) by failing
//! `upstream_response_filter`, Pingora's only public way to retry, and Pingora then drops the
//! upstream connection although only a small error body was left on it: every fallback
//! request paid a TCP connect and close to main (benches/README.md, "The fallback path").
//! Here the connection of an attempt is a Pingora *virtual socket*
//! (`PeerOptions::custom_l4`, set per attempt by `Peer::attempt_peer`) over a [`Link`] (a
//! `TcpStream`, or for an https origin a TLS session Pingora's own connector set up, so
//! Pingora sees plain HTTP) that follows the HTTP/1.1 framing of the plaintext going through
//! it ([`Tracker`], `framing.rs`). When Pingora
//! lets go of it (drops it, or is done with it after an answer), a connection whose exchange
//! ended cleanly, or can be ended by reading at most [`DRAIN_BUDGET`] more bytes, goes to
//! this pool, and the next attempt's connect to the same address takes it instead of dialling.
//! Pingora cannot reuse a virtual socket from its own pool (it matches pooled connections by
//! file descriptor), so the socket declines Pingora's pooling check and this pool holds them
//! all. Uploads go through it too: an origin that refuses an upload often answers before it
//! reads the body and closes the connection without saying so, after the answer, when
//! Pingora's pool may already have handed it to the next upload (whose body cannot be
//! replayed: a 503); the framing tracker sees the refusal and closes it. Health checks and
//! cascade's own fetches keep Pingora's connections and pool.
//! Since the socket sits under every read anyway, it also reads ahead of Pingora's small
//! first read of an answer ([`READ_AHEAD`]): a 4 KiB object costs one `recv`, not two. TLS
//! sessions get openssl's own read-ahead (one `recv` per record, not a header and a body).
//!
//! Invariants:
//! - A connection is kept only when the framing proves the exchange over: one request head
//!   went out with its body, if any, framed by `Content-Length` or chunked and written whole
//!   before a final answer came back; one HTTP/1.1 answer with a known end came back (after
//!   any interim `1xx` but `101`), a `2xx` if the request had a body; nothing was read past
//!   that end, nothing says `close`. Anything else (an answer before the body was out, a
//!   refused upload, `101`, read-to-close, both `Content-Length` and `Transfer-Encoding`,
//!   data on an idle connection, EOF, an IO error) closes it: a kept connection never hands
//!   one request's answer to the next, nor a connection its origin is closing to the next
//!   upload. Bytes read ahead count as read: past the answer's end they close the
//!   connection too.
//! - Draining is bounded: [`DRAIN_BUDGET`] bytes within [`DRAIN_TIME`], at most
//!   [`MAX_DRAINS`] at once; over any bound the connection is closed.
//! - The pool is bounded ([`POOL_CAP`] per address, the origin's idle timeout or its
//!   `Keep-Alive: timeout=`), checks with a real `recv(MSG_PEEK)` that a connection is open
//!   and silent before handing it out (for TLS also that openssl holds no unread bytes: a
//!   record after the answer, even a `close_notify` or a late session ticket, closes it),
//!   and a sweeper closes the ones an origin closed or that idled too long.
//! - TLS is Pingora's: the session is set up by Pingora's `TransportConnector` (built from
//!   the server's configuration, as the proxy's own: [`init_tls`]) for the origin's real
//!   (https) peer, with its certificate and host name checks and SNI, and a kept session is
//!   handed out only to the same target of the same origin config. Attempts' peers carry a
//!   `group_key` of their own, so Pingora never hands them a connection from its pool (one
//!   of cascade's own fetches, or a plain one to the same address).
//! - A connection handed out from the pool counts as *reused* for cascade's retry rule (a
//!   pooled connection the origin had closed is retried, not held against the peer): Pingora
//!   sees a new connection, so the attempt's [`Connector`] sets a flag the attempt holds.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use pingora_core::connectors::{ConnectorOptions, L4Connect, TransportConnector};
use pingora_core::protocols::l4::ext::{connect as tcp_connect, set_tcp_keepalive};
use pingora_core::protocols::l4::socket::SocketAddr;
use pingora_core::protocols::l4::stream::Stream;
use pingora_core::protocols::l4::virt::{VirtualSockOpt, VirtualSocket, VirtualSocketStream};
use pingora_core::protocols::Stream as TlsStream;
use pingora_core::server::configuration::ServerConf;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType, Result};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::framing::{Tracker, Verdict, DRAIN_BUDGET};
use crate::backpressure::Hold;

/// The longest an answer is waited for to finish.
pub const DRAIN_TIME: Duration = Duration::from_secs(1);
/// Drains in flight at once (process-wide); over it a connection is closed instead.
pub const MAX_DRAINS: usize = 256;
/// Idle connections kept per address (Pingora's default pool size).
pub const POOL_CAP: usize = 128;
/// How often the sweeper closes idle connections an origin closed or that idled too long.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

static DRAINS: AtomicUsize = AtomicUsize::new(0);

// ---------------------------------------------------------------------------------------
// The pool.

/// Idle connections to one address.
#[derive(Debug)]
struct Pool {
    /// Oldest first, each with the instant it stops being handed out.
    idle: Mutex<VecDeque<(Instant, Link)>>,
    /// The longest a connection idles here (the origin's pool idle timeout).
    max_idle: Duration,
    sweeping: AtomicBool,
}

/// An origin connection under the framing: plain TCP, or a TLS session over TCP (Pingora's
/// stream from its `TransportConnector`: no read buffer below openssl, so what openssl has
/// not read is still in the kernel).
pub(crate) enum Link {
    Tcp(TcpStream),
    Tls(TlsStream),
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Link::Tcp(t) => t.fmt(f),
            Link::Tls(t) => t.fmt(f),
        }
    }
}

impl Link {
    /// Is an idle connection still open with nothing to read? Data on an idle connection
    /// (an answer nobody asked for) or EOF both mean it cannot be used. For TLS, any record
    /// at all (data, an alert, a late ticket) closes it too, and so does plaintext openssl
    /// decrypted that nobody read.
    fn still_open(&self) -> bool {
        match self {
            Link::Tcp(tcp) => tcp_silent(tcp),
            Link::Tls(s) => {
                if s.get_ssl().is_some_and(holds_bytes) {
                    return false;
                }
                let raw = s.id();
                if raw < 0 {
                    return false; // not a socket (cannot happen: the session is over TCP)
                }
                // SAFETY: `raw` is the session's TCP socket (Pingora's L4 stream under the
                // TLS stream), open while `s` lives, borrowed for this call only.
                let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(raw) };
                let mut b = [std::mem::MaybeUninit::<u8>::uninit(); 1];
                let r = socket2::SockRef::from(&fd).peek(&mut b);
                matches!(r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            }
        }
    }
}

// Two OpenSSL (≥ 1.1.0) calls openssl-sys does not bind.
unsafe extern "C" {
    /// Whether `ssl` holds bytes nobody has read, decrypted or not yet processed (records
    /// read ahead).
    fn SSL_has_pending(ssl: *const pingora_core::tls::ssl_sys::SSL) -> std::ffi::c_int;
    /// Let `ssl` read whatever the kernel has (up to its record buffer) instead of each
    /// record's 5-byte header and then its body: half the `recv`s per record.
    fn SSL_set_read_ahead(ssl: *mut pingora_core::tls::ssl_sys::SSL, yes: std::ffi::c_int);
}

/// Read-ahead on for a session cascade's pool owns: one `recv` per TLS record (or fewer),
/// not two. What it reads past an answer stays inside openssl, where [`holds_bytes`] sees it.
fn read_ahead_on(ssl: &pingora_core::tls::ssl::SslRef) {
    use foreign_types::ForeignTypeRef;
    // SAFETY: a valid `SSL` (an opaque, interior-mutable type behind `SslRef`) of a session
    // no one else uses yet; the call sets one flag of it.
    unsafe { SSL_set_read_ahead(ssl.as_ptr(), 1) }
}

/// Does openssl hold bytes of the connection nobody has read? `pending` counts decrypted
/// plaintext of the current record; `SSL_has_pending` also records read ahead but not yet
/// processed (the pool turns read-ahead on: [`read_ahead_on`]).
fn holds_bytes(ssl: &pingora_core::tls::ssl::SslRef) -> bool {
    use foreign_types::ForeignTypeRef;
    // SAFETY: `ssl.as_ptr()` is a valid `SSL` for the duration of the call, which only reads
    // the state of its buffers.
    ssl.pending() > 0 || unsafe { SSL_has_pending(ssl.as_ptr()) } != 0
}

/// A real `recv(MSG_PEEK)`, not tokio's cached readiness, which may not have seen bytes the
/// kernel already holds: `true` when the connection is open and nothing is waiting.
fn tcp_silent(tcp: &TcpStream) -> bool {
    let peek = || {
        let mut b = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        socket2::SockRef::from(tcp).peek(&mut b)
    };
    let mut peeked = false;
    // Through tokio when it believes the socket readable (as it does after the last answer's
    // read): the peek's `WouldBlock` then clears that readiness, so the next answer's read
    // waits for the poller instead of costing a `recv` that finds nothing.
    let r = tcp.try_io(tokio::io::Interest::READABLE, || {
        peeked = true;
        peek()
    });
    let r = if peeked { r } else { peek() };
    matches!(r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

impl AsyncRead for Link {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Link::Tcp(t) => Pin::new(t).poll_read(cx, buf),
            Link::Tls(t) => Pin::new(t).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Link {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Link::Tcp(t) => Pin::new(t).poll_write(cx, buf),
            Link::Tls(t) => Pin::new(t).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Link::Tcp(t) => Pin::new(t).poll_flush(cx),
            Link::Tls(t) => Pin::new(t).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Link::Tcp(t) => Pin::new(t).poll_shutdown(cx),
            Link::Tls(t) => Pin::new(t).poll_shutdown(cx),
        }
    }
}

impl Pool {
    /// The most recently kept connection that is still usable (a warm one; older ones
    /// expire).
    fn checkout(&self) -> Option<Link> {
        loop {
            let (until, link) = self.idle.lock().pop_back()?;
            if Instant::now() < until && link.still_open() {
                return Some(link);
            }
        }
    }

    /// `hint`: how long the origin said it keeps it (`Keep-Alive: timeout=`).
    fn put(self: &Arc<Self>, link: Link, hint: Option<Duration>) {
        let keep = hint.map_or(self.max_idle, |h| h.min(self.max_idle));
        {
            let mut idle = self.idle.lock();
            if idle.len() >= POOL_CAP {
                idle.pop_front();
            }
            idle.push_back((Instant::now() + keep, link));
        }
        if !self.sweeping.swap(true, Ordering::AcqRel) {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(sweep(Arc::downgrade(self)));
                }
                Err(_) => self.sweeping.store(false, Ordering::Release),
            }
        }
    }

    /// Close what an origin closed, sent data on, or that idled too long; `false` when
    /// nothing is left to watch.
    fn sweep(&self) -> bool {
        let mut idle = self.idle.lock();
        let now = Instant::now();
        idle.retain(|(until, link)| now < *until && link.still_open());
        !idle.is_empty()
    }

    fn len(&self) -> usize {
        self.idle.lock().len()
    }
}

async fn sweep(pool: Weak<Pool>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(p) = pool.upgrade() else { return };
        if !p.sweep() {
            p.sweeping.store(false, Ordering::Release);
            // A put between the sweep and the store found `sweeping` set: look again.
            if p.len() == 0 || p.sweeping.swap(true, Ordering::AcqRel) {
                return;
            }
        }
    }
}

/// The connect of one origin address's connections (`PeerOptions::custom_l4`): a kept
/// connection when the pool has one, a new one otherwise. One per address holds the pool;
/// each attempt gets its own ([`Connector::for_attempt`]), which says whether the connection
/// it handed out came from the pool.
#[derive(Debug, Clone)]
pub struct Connector {
    pool: Arc<Pool>,
    /// An https origin: the real peer (TLS, SNI, certificate checks) Pingora's connector sets
    /// new sessions up for; the attempt's peer says plain HTTP, so Pingora adds no TLS.
    tls: Option<Arc<HttpPeer>>,
    /// Set when the attempt's connection came from the pool.
    reused: Option<Arc<AtomicBool>>,
    /// The longest a read waits for a stalled client (`backpressure::Hold`).
    hold: Duration,
    /// The most one read of an answer's body takes ([`Settings::read_size`]).
    read_size: usize,
}

/// The server's settings for the connections of this pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// The most one read of Pingora's takes from the origin (`server.upstream_read_size`):
    /// Pingora asks for 64 KiB at a time into a body, and each read becomes a chunk that
    /// waits in its pipe when the client is behind; a smaller read is a smaller chunk.
    pub read_size: usize,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            read_size: crate::config::schema::MAX_UPSTREAM_READ_SIZE as usize,
        }
    }
}

/// Pingora's connector for the TLS sessions of https origins' kept connections, used only
/// through `new_stream` (its own pool stays empty).
static TLS: std::sync::OnceLock<TransportConnector> = std::sync::OnceLock::new();

/// Build the TLS connector from the server's configuration, as Pingora builds the proxy's
/// own (`ConnectorOptions::from_server_conf`: trust store, bind addresses, key log), so
/// reads and writes see the same TLS settings; and at start, since loading a trust store
/// blocks.
pub fn init_tls(conf: &ServerConf) {
    TLS.get_or_init(|| TransportConnector::new(Some(ConnectorOptions::from_server_conf(conf))));
}

fn tls_connector() -> &'static TransportConnector {
    TLS.get_or_init(|| TransportConnector::new(None))
}

impl Connector {
    /// `max_idle`: the longest a connection is kept idle; `tls`: the origin's https peer for
    /// this address (`None`: plain HTTP); `read_timeout`: the origin's (a read waits for a
    /// stalled client for at most half of it, `backpressure::Hold`).
    pub fn new(
        max_idle: Duration,
        tls: Option<HttpPeer>,
        read_timeout: Duration,
        settings: Settings,
    ) -> Connector {
        Connector {
            pool: Arc::new(Pool {
                idle: Mutex::new(VecDeque::new()),
                max_idle,
                sweeping: AtomicBool::new(false),
            }),
            tls: tls.map(Arc::new),
            reused: None,
            hold: read_timeout / 2,
            read_size: settings.read_size.max(1),
        }
    }

    /// Does it set TLS sessions up (the attempt's peer must then say plain HTTP)?
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The connector of one attempt: this pool; `reused` tells the attempt whether its
    /// connection was a kept one (Pingora sees every one as new).
    pub fn for_attempt(&self, reused: Arc<AtomicBool>) -> Connector {
        Connector {
            pool: self.pool.clone(),
            tls: self.tls.clone(),
            reused: Some(reused),
            hold: self.hold,
            read_size: self.read_size,
        }
    }

    fn set_reused(&self, v: bool) {
        if let Some(r) = &self.reused {
            r.store(v, Ordering::Relaxed);
        }
    }

    /// The settings it was made with.
    pub fn settings(&self) -> Settings {
        Settings {
            read_size: self.read_size,
        }
    }

    /// Idle connections held now.
    pub fn idle(&self) -> usize {
        self.pool.len()
    }

    fn stream(&self, link: Link, nodelay: bool) -> Stream {
        let conn = Conn {
            link: Some(link),
            http: Tracker::default(),
            ahead: Ahead::default(),
            pool: Arc::downgrade(&self.pool),
            nodelay: AtomicBool::new(nodelay),
            hold: Hold::new(self.hold),
            read_size: self.read_size,
        };
        Stream::from(VirtualSocketStream::new(Box::new(conn)))
    }
}

#[async_trait]
impl L4Connect for Connector {
    async fn connect(&self, addr: &SocketAddr) -> Result<Stream> {
        if let Some(link) = self.pool.checkout() {
            self.set_reused(true);
            crate::metrics::METRICS.upstream_connections[1].inc();
            return Ok(self.stream(link, true));
        }
        self.set_reused(false);
        let link = match &self.tls {
            // Pingora's TCP connect and TLS handshake for the real peer (same address), with
            // its timeouts, TCP options and certificate checks; errors keep their type.
            Some(peer) => {
                let tls = tls_connector().new_stream(&**peer).await?;
                if let Some(ssl) = tls.get_ssl() {
                    read_ahead_on(ssl);
                }
                Link::Tls(tls)
            }
            None => {
                let SocketAddr::Inet(inet) = addr else {
                    return Error::e_explain(
                        ErrorType::InternalError,
                        "cascade's pool connects TCP only",
                    );
                };
                Link::Tcp(tcp_connect(inet, None).await?)
            }
        };
        crate::metrics::METRICS.upstream_connections[0].inc();
        // Pingora's TLS connect has set its TCP options already.
        let nodelay = matches!(link, Link::Tls(_));
        Ok(self.stream(link, nodelay))
    }
}

// ---------------------------------------------------------------------------------------
// The connection Pingora holds.

/// An origin connection as Pingora sees it (a virtual socket, plain HTTP), following its
/// exchanges; when Pingora lets go of it, it goes back to its pool if it can.
struct Conn {
    link: Option<Link>,
    http: Tracker,
    /// Bytes read ahead of a small read of Pingora's ([`READ_AHEAD`]) that it has not been
    /// handed yet; empty (and unallocated) almost always.
    ahead: Ahead,
    pool: Weak<Pool>,
    nodelay: AtomicBool,
    /// How long its reads have waited for a stalled client (`backpressure`).
    hold: Hold,
    /// The most one read from the link takes ([`Settings::read_size`]).
    read_size: usize,
}

/// A read of Pingora's into less room than this (its first read of an answer's head has
/// 4 KiB) reads up to this much from the socket and keeps the rest for its next read: a
/// 4 KiB object's answer (head and body, ~4.3 KiB) then costs one `recv` instead of two.
/// Plain TCP only (openssl reads a TLS record whole anyway).
pub const READ_AHEAD: usize = 16 * 1024;

/// Bytes read from the origin, not yet handed to Pingora.
#[derive(Debug, Default)]
struct Ahead {
    bytes: Vec<u8>,
    at: usize,
}

impl Ahead {
    fn is_empty(&self) -> bool {
        self.at == self.bytes.len()
    }

    /// Up to `room` of the bytes, in order; the buffer is freed once all are taken.
    fn take(&mut self, room: usize) -> &[u8] {
        let n = (self.bytes.len() - self.at).min(room);
        let start = self.at;
        self.at += n;
        &self.bytes[start..start + n]
    }

    fn free_if_empty(&mut self) {
        if self.is_empty() && self.bytes.capacity() > 0 {
            *self = Ahead::default();
        }
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("link", &self.link)
            .field("http", &self.http)
            .finish()
    }
}

fn gone() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::NotConnected, "connection released")
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let Some(link) = this.link.as_mut() else {
            return Poll::Ready(Err(gone()));
        };
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if this.http.is_done() {
            // The exchange is over and Pingora is checking whether the connection can go to
            // its own pool (`test_reusable_stream`, its only read after an answer): it cannot
            // reuse a virtual socket (it matches pooled connections by file descriptor), so
            // say no; the drop that follows keeps it here. No read: whatever the origin sends
            // from now on is seen by the `recv(MSG_PEEK)` before the connection is handed out.
            // Bytes read ahead past the answer's end are an answer nobody asked for.
            if this.ahead.is_empty() {
                this.http.park();
            } else {
                this.http.poison();
            }
            return Poll::Ready(Err(std::io::Error::other(
                "kept by cascade's upstream pool",
            )));
        }
        if !this.ahead.is_empty() {
            let bytes = this.ahead.take(buf.remaining().min(this.read_size));
            buf.put_slice(bytes);
            this.http.on_read(bytes);
            this.ahead.free_if_empty();
            return Poll::Ready(Ok(()));
        }
        // The client this answer goes to has stopped taking bytes: read nothing more for
        // now (`backpressure`; woken by its next byte taken, or after half the read timeout).
        if this.hold.poll_turn(cx).is_pending() {
            return Poll::Pending;
        }
        if buf.remaining() < READ_AHEAD {
            if let Link::Tcp(tcp) = link {
                let max = this.read_size;
                return read_ahead(tcp, cx, buf, max, &mut this.http, &mut this.ahead);
            }
        }
        read_at_most(link, cx, buf, this.read_size, &mut this.http)
    }
}

/// Pingora's read into `buf` with at most `max` bytes (`server.upstream_read_size`; all
/// of `buf`'s room when that is less).
fn read_at_most(
    link: &mut Link,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
    max: usize,
    http: &mut Tracker,
) -> Poll<std::io::Result<()>> {
    let mut part = buf.take(max);
    let start = part.filled().as_ptr();
    match Pin::new(link).poll_read(cx, &mut part) {
        Poll::Ready(Ok(())) => {
            // A reader may swap the `ReadBuf` it was given for another (safe code can): then
            // what it filled is not `buf`'s (tokio's `Take` makes the same check).
            assert_eq!(
                start,
                part.filled().as_ptr(),
                "the read replaced its buffer"
            );
            let n = part.filled().len();
            let before = buf.filled().len();
            // SAFETY: `part` is the start of `buf`'s unfilled room (`ReadBuf::take`), still
            // the buffer read into (checked above), and the read initialized and filled its
            // first `n` bytes.
            unsafe { buf.assume_init(n) };
            buf.advance(n);
            http.on_read(&buf.filled()[before..]);
            Poll::Ready(Ok(()))
        }
        Poll::Ready(Err(e)) => {
            http.poison();
            Poll::Ready(Err(e))
        }
        Poll::Pending => Poll::Pending,
    }
}

/// Pingora's read into `buf` (less than [`READ_AHEAD`] of room) through a [`READ_AHEAD`]
/// read of the socket; what does not fit (or passes `max`, the read size) goes to `ahead`.
/// Not inlined: the 16 KiB frame (and its stack probes) is paid only by the reads that use
/// it.
#[inline(never)]
fn read_ahead(
    tcp: &mut TcpStream,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
    max: usize,
    http: &mut Tracker,
    ahead: &mut Ahead,
) -> Poll<std::io::Result<()>> {
    let mut room = [std::mem::MaybeUninit::<u8>::uninit(); READ_AHEAD];
    let mut got = ReadBuf::uninit(&mut room);
    match Pin::new(tcp).poll_read(cx, &mut got) {
        Poll::Ready(Ok(())) => {
            let got = got.filled();
            let n = got.len().min(buf.remaining()).min(max);
            buf.put_slice(&got[..n]);
            http.on_read(&got[..n]);
            if n < got.len() {
                *ahead = Ahead {
                    bytes: got[n..].to_vec(),
                    at: 0,
                };
            }
            Poll::Ready(Ok(()))
        }
        Poll::Ready(Err(e)) => {
            http.poison();
            Poll::Ready(Err(e))
        }
        Poll::Pending => Poll::Pending,
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let Some(link) = this.link.as_mut() else {
            return Poll::Ready(Err(gone()));
        };
        if !this.ahead.is_empty() && !this.http.request_open() {
            // A request while bytes of the last answer wait unread: they would become this
            // one's answer. Pingora never does this (it does not reuse a virtual socket).
            // (More of an upload's body while its early answer waits is let through: that
            // connection is never kept.)
            this.http.poison();
            return Poll::Ready(Err(std::io::Error::other(
                "an answer is still unread on this connection",
            )));
        }
        let r = Pin::new(link).poll_write(cx, buf);
        match &r {
            Poll::Ready(Ok(n)) => this.http.on_write(&buf[..*n]),
            Poll::Ready(Err(_)) => this.http.poison(),
            Poll::Pending => {}
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut().link.as_mut() {
            Some(link) => Pin::new(link).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.http.poison();
        match this.link.as_mut() {
            Some(link) => Pin::new(link).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

impl VirtualSocket for Conn {
    fn set_socket_option(&self, opt: VirtualSockOpt) -> std::io::Result<()> {
        // TLS sessions come with the peer's TCP options set by Pingora's connector.
        let Some(Link::Tcp(tcp)) = self.link.as_ref() else {
            return Ok(());
        };
        match opt {
            VirtualSockOpt::NoDelay => {
                if !self.nodelay.swap(true, Ordering::Relaxed) {
                    tcp.set_nodelay(true)?;
                }
                Ok(())
            }
            VirtualSockOpt::KeepAlive(ka) => {
                set_tcp_keepalive(tcp, &ka).map_err(|e| std::io::Error::other(e.to_string()))
            }
            _ => Ok(()),
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let Some(link) = self.link.take() else { return };
        let Some(pool) = self.pool.upgrade() else {
            return;
        };
        // What was read ahead belongs to the answer (it may end it) or is past its end (the
        // framing then says close).
        if !self.ahead.is_empty() {
            let rest = std::mem::take(&mut self.ahead);
            self.http.on_read(&rest.bytes[rest.at..]);
        }
        let m = &crate::metrics::METRICS;
        match self.http.verdict() {
            Verdict::Keep => {
                if self.http.is_abandoned_done() {
                    // Pingora dropped a connection whose answer was over (a replayed 404).
                    m.upstream_connections[2].inc();
                }
                pool.put(link, self.http.idle_hint());
            }
            Verdict::Drain => {
                let Ok(rt) = tokio::runtime::Handle::try_current() else {
                    return;
                };
                if DRAINS.fetch_add(1, Ordering::AcqRel) >= MAX_DRAINS {
                    DRAINS.fetch_sub(1, Ordering::AcqRel);
                    return;
                }
                let http = std::mem::take(&mut self.http);
                rt.spawn(async move {
                    let kept = tokio::time::timeout(DRAIN_TIME, drain(link, http))
                        .await
                        .ok()
                        .flatten();
                    DRAINS.fetch_sub(1, Ordering::AcqRel);
                    log::debug!(
                        "upstream answer drained: connection kept: {}",
                        kept.is_some()
                    );
                    if let Some((link, hint)) = kept {
                        crate::metrics::METRICS.upstream_connections[2].inc();
                        pool.put(link, hint);
                    }
                });
            }
            Verdict::Close => {}
        }
    }
}

/// Reads the rest of an answer (at most [`DRAIN_BUDGET`] bytes); the connection when the
/// answer ended cleanly.
async fn drain(mut link: Link, mut http: Tracker) -> Option<(Link, Option<Duration>)> {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 8192];
    let mut read = 0u64;
    while !http.is_done() {
        let n = link.read(&mut buf).await.ok()?;
        read += n as u64;
        http.on_read(&buf[..n]);
        if http.is_unsafe() || read > DRAIN_BUDGET {
            return None;
        }
    }
    Some((link, http.idle_hint()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_pool_hands_out_only_open_connections_and_forgets_old_ones() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let c = Connector::new(
            Duration::from_secs(60),
            None,
            Duration::from_secs(60),
            Settings::default(),
        );
        let a = TcpStream::connect(addr).await.unwrap();
        let (sa, _) = l.accept().await.unwrap();
        let b = TcpStream::connect(addr).await.unwrap();
        let (_sb, _) = l.accept().await.unwrap();
        c.pool.put(Link::Tcp(a), None);
        c.pool.put(Link::Tcp(b), None);
        // The origin closes `a`: only `b` may come back.
        drop(sa);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(c.pool.checkout().is_some());
        assert!(c.pool.checkout().is_none());
        // An idle timeout of 0, or an origin's shorter one: nothing is handed out.
        let c = Connector::new(
            Duration::ZERO,
            None,
            Duration::from_secs(60),
            Settings::default(),
        );
        c.pool
            .put(Link::Tcp(TcpStream::connect(addr).await.unwrap()), None);
        assert!(c.pool.checkout().is_none());
        assert_eq!(c.idle(), 0);
        let c = Connector::new(
            Duration::from_secs(60),
            None,
            Duration::from_secs(60),
            Settings::default(),
        );
        let tcp = TcpStream::connect(addr).await.unwrap();
        let _server_side = l.accept().await.unwrap();
        c.pool.put(Link::Tcp(tcp), Some(Duration::from_millis(20)));
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(c.pool.checkout().is_none());
    }

    #[tokio::test]
    async fn an_answer_nobody_asked_for_is_seen_before_the_runtime_sees_it() {
        use std::io::Write;
        // A std listener: the origin side writes without any runtime involved.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = Connector::new(
            Duration::from_secs(60),
            None,
            Duration::from_secs(60),
            Settings::default(),
        );
        let tcp = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (mut origin, _) = l.accept().unwrap();
        c.pool.put(Link::Tcp(tcp), None);
        // Bytes in the kernel's buffer, no await since: tokio's readiness has not seen them.
        origin.write_all(b"HTTP/1.1 200 OK\r\n").unwrap();
        assert!(c.pool.checkout().is_none());
    }

    /// A TLS server on 127.0.0.1 (a throwaway self-signed certificate) that sends each of
    /// `first` as one record, then `later` when told to.
    async fn tls_server(
        first: &'static [&'static [u8]],
        later: &'static [u8],
    ) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
        use openssl::{asn1::Asn1Time, ec, hash::MessageDigest, nid::Nid, pkey::PKey, ssl, x509};
        use tokio::io::AsyncWriteExt;
        let group = ec::EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
        let key = PKey::from_ec_key(ec::EcKey::generate(&group).unwrap()).unwrap();
        let mut cert = x509::X509Builder::new().unwrap();
        cert.set_pubkey(&key).unwrap();
        cert.set_not_before(&Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        cert.set_not_after(&Asn1Time::days_from_now(1).unwrap())
            .unwrap();
        cert.sign(&key, MessageDigest::sha256()).unwrap();
        let mut acceptor =
            ssl::SslAcceptor::mozilla_intermediate_v5(ssl::SslMethod::tls()).unwrap();
        acceptor.set_private_key(&key).unwrap();
        acceptor.set_certificate(&cert.build()).unwrap();
        let acceptor = acceptor.build();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            let ssl = ssl::Ssl::new(acceptor.context()).unwrap();
            let mut tls = tokio_openssl::SslStream::new(ssl, tcp).unwrap();
            Pin::new(&mut tls).accept().await.unwrap();
            for record in first {
                tls.write_all(record).await.unwrap();
            }
            let _ = wait.await;
            tls.write_all(later).await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        (addr, go)
    }

    /// A session to `addr` as the pool makes them (certificate unchecked: a throwaway one).
    async fn tls_link(addr: std::net::SocketAddr) -> Link {
        let mut peer = HttpPeer::new(addr, true, "localhost".into());
        peer.options.verify_cert = false;
        peer.options.verify_hostname = false;
        let tls = tls_connector().new_stream(&peer).await.unwrap();
        read_ahead_on(tls.get_ssl().unwrap());
        Link::Tls(tls)
    }

    #[tokio::test]
    async fn a_tls_session_is_open_only_with_nothing_left_in_openssl_or_the_kernel() {
        use tokio::io::AsyncReadExt;
        let (addr, go) = tls_server(&[b"AAAABBBB"], b"C").await;
        let mut link = tls_link(addr).await;
        let mut b = [0u8; 4];
        // Half of one record read: the other half is decrypted, inside openssl.
        link.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"AAAA");
        assert!(!link.still_open(), "plaintext left inside openssl");
        link.read_exact(&mut b).await.unwrap();
        assert!(link.still_open(), "all read, nothing in the kernel");
        // A record nobody asked for, in the kernel only.
        go.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while link.still_open() {
            assert!(Instant::now() < deadline, "the record never showed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        // Two records in the kernel at once: reading the first reads both (read-ahead), so
        // the second waits inside openssl, undecrypted, where neither `pending` nor a peek
        // sees it.
        let (addr, _go) = tls_server(&[b"AAAA", b"BBBB"], b"").await;
        let mut link = tls_link(addr).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        link.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"AAAA");
        assert!(!link.still_open(), "a record read ahead, inside openssl");
        link.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"BBBB");
        assert!(link.still_open());
    }

    /// A connection of a new pool to a new origin, as Pingora holds it, with a GET written
    /// and the origin's answer `len` pattern bytes long; the origin side of the connection.
    async fn plain_conn_answering(len: u32) -> (Connector, Conn, TcpStream, Vec<u8>) {
        plain_conn_with(len, Settings::default()).await
    }

    async fn plain_conn_with(
        len: u32,
        settings: Settings,
    ) -> (Connector, Conn, TcpStream, Vec<u8>) {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = Connector::new(
            Duration::from_secs(60),
            None,
            Duration::from_secs(60),
            settings,
        );
        let tcp = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (origin, _) = l.accept().await.unwrap();
        let mut conn = Conn {
            link: Some(Link::Tcp(tcp)),
            http: Tracker::default(),
            ahead: Ahead::default(),
            pool: Arc::downgrade(&c.pool),
            nodelay: AtomicBool::new(false),
            hold: Hold::new(Duration::from_secs(60)),
            read_size: c.read_size,
        };
        conn.write_all(b"GET /a HTTP/1.1\r\nHost: o\r\n\r\n")
            .await
            .unwrap();
        let mut answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n").into_bytes();
        answer.extend((0..len).map(|i| (i % 251) as u8));
        (c, conn, origin, answer)
    }

    #[tokio::test]
    async fn a_small_read_reads_ahead_and_hands_the_rest_on_in_order() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (c, mut conn, mut origin, answer) = plain_conn_answering(5000).await;
        origin.write_all(&answer).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Pingora's first read: 4 KiB of room; the rest is read with it and kept.
        let mut first = vec![0u8; 4096];
        conn.read_exact(&mut first).await.unwrap();
        assert!(!conn.ahead.is_empty(), "read ahead");
        // A request now would get the rest as its answer: refused, the connection poisoned.
        assert!(conn.write_all(b"GET /b HTTP/1.1\r\n\r\n").await.is_err());
        let mut rest = vec![0u8; answer.len() - 4096];
        conn.read_exact(&mut rest).await.unwrap();
        first.extend_from_slice(&rest);
        assert_eq!(first, answer, "every byte, in order");
        assert!(conn.ahead.is_empty() && conn.ahead.bytes.capacity() == 0);
        drop(conn);
        assert_eq!(c.idle(), 0, "poisoned by the early request: not kept");
    }

    /// Reads a whole answer as Pingora reads a body (64 KiB of room each time, after a
    /// first 4 KiB for the head): every byte in order, and the largest single read.
    async fn read_as_pingora(conn: &mut Conn, len: usize) -> (Vec<u8>, usize) {
        use tokio::io::AsyncReadExt;
        let mut got = vec![0u8; 4096];
        let mut largest = 0;
        let mut head = 0;
        while head < got.len() {
            let n = conn.read(&mut got[head..]).await.unwrap();
            assert!(n > 0, "EOF in the head");
            largest = largest.max(n);
            head += n;
        }
        let mut room = vec![0u8; 64 * 1024];
        while got.len() < len {
            let n = conn.read(&mut room).await.unwrap();
            assert!(n > 0, "EOF after {} of {len}", got.len());
            largest = largest.max(n);
            got.extend_from_slice(&room[..n]);
        }
        (got, largest)
    }

    #[tokio::test]
    async fn a_body_is_read_at_most_read_size_at_a_time() {
        use tokio::io::AsyncWriteExt;
        for (read_size, bounded) in [
            (1024, true),
            (4096, true),
            (Settings::default().read_size, false),
        ] {
            let (_c, mut conn, mut origin, answer) =
                plain_conn_with(300_000, Settings { read_size }).await;
            let sent = answer.clone();
            let writer = tokio::spawn(async move {
                origin.write_all(&sent).await.unwrap();
                origin
            });
            tokio::time::sleep(Duration::from_millis(20)).await;
            let (got, largest) = read_as_pingora(&mut conn, answer.len()).await;
            drop(writer);
            assert_eq!(got, answer, "every byte, in order ({read_size})");
            if bounded {
                assert!(largest <= read_size, "a read of {largest} > {read_size}");
            } else {
                assert!(largest > 4096, "the default reads as much as Pingora asks");
            }
        }
    }

    #[tokio::test]
    async fn reads_wait_while_the_requests_client_takes_nothing() {
        use crate::backpressure::Flow;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (_c, mut conn, mut origin, answer) = plain_conn_answering(200_000).await;
        let writer = tokio::spawn(async move {
            origin.write_all(&answer).await.unwrap();
            origin
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let flow = Flow::new();
        let f = flow.clone();
        flow.scope(async move {
            let mut got = vec![0u8; 65536];
            assert!(conn.read(&mut got).await.unwrap() > 0, "not stalled: read");
            f.on_write(true);
            let held = tokio::time::timeout(Duration::from_millis(150), conn.read(&mut got)).await;
            assert!(
                held.is_err(),
                "the answer is there, but the client is stalled"
            );
            // The client takes a byte: the read goes on.
            let (read, ()) = tokio::join!(conn.read(&mut got), async {
                tokio::time::sleep(Duration::from_millis(30)).await;
                f.on_write(false);
            });
            assert!(read.unwrap() > 0);
        })
        .await;
        drop(writer);
    }

    #[tokio::test]
    async fn the_pool_is_bounded() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let c = Connector::new(
            Duration::from_secs(60),
            None,
            Duration::from_secs(60),
            Settings::default(),
        );
        let mut keep = Vec::new();
        for _ in 0..POOL_CAP + 5 {
            c.pool
                .put(Link::Tcp(TcpStream::connect(addr).await.unwrap()), None);
            keep.push(l.accept().await.unwrap());
        }
        assert_eq!(c.idle(), POOL_CAP);
    }
}
