//! cascade's connection pool for reads from plain-HTTP origins (`server.upstream_pool:
//! cascade`): keeps the upstream connections Pingora would close, foremost main's
//! connection after a 404 that is replayed to a fallback.
//!
//! Why it exists: cascade replays an answer (a fallback's 404, a `retry_on` status) by failing
//! `upstream_response_filter`, Pingora's only public way to retry, and Pingora then drops the
//! upstream connection although only a small error body was left on it: every fallback
//! request paid a TCP connect and close to main (benches/README.md, "The fallback path").
//! Here the connection of a GET/HEAD attempt is a Pingora *virtual socket*
//! (`PeerOptions::custom_l4`, set per attempt by `Peer::http_peer_for`) over a `TcpStream`
//! that follows the HTTP/1.1 framing of what goes through it ([`Tracker`]). When Pingora
//! lets go of it (drops it, or is done with it after an answer), a connection whose exchange
//! ended cleanly, or can be ended by reading at most [`DRAIN_BUDGET`] more bytes, goes to
//! this pool, and the next read's connect to the same address takes it instead of dialling.
//! Pingora cannot reuse a virtual socket from its own pool (it matches pooled connections by
//! file descriptor), so the socket declines Pingora's pooling check and this pool holds them
//! all. Writes, TLS origins, health checks and cascade's own fetches keep Pingora's
//! connections and pool, as before.
//!
//! Invariants:
//! - A connection is kept only when the framing proves the exchange over: one `GET`/`HEAD`
//!   head with no body went out, one HTTP/1.1 answer with a known end came back, nothing was
//!   read past that end, nothing says `close`. Anything else (a body on the request, `1xx`,
//!   read-to-close, both `Content-Length` and `Transfer-Encoding`, data on an idle
//!   connection, EOF, an IO error) closes it: a kept connection never hands one request's
//!   answer to the next.
//! - Draining is bounded: [`DRAIN_BUDGET`] bytes within [`DRAIN_TIME`], at most
//!   [`MAX_DRAINS`] at once; over any bound the connection is closed.
//! - The pool is bounded ([`POOL_CAP`] per address, the origin's idle timeout or its
//!   `Keep-Alive: timeout=`), checks with a real `recv(MSG_PEEK)` that a connection is open
//!   and silent before handing it out, and a sweeper closes the ones an origin closed or that
//!   idled too long.
//! - A connection handed out from the pool counts as *reused* for cascade's retry rule (a
//!   pooled connection the origin had closed is retried, not held against the peer): Pingora
//!   sees a new connection, so the attempt's [`Connector`] sets a flag the attempt holds.

use std::collections::VecDeque;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use pingora_core::connectors::L4Connect;
use pingora_core::protocols::l4::ext::{connect as tcp_connect, set_tcp_keepalive};
use pingora_core::protocols::l4::socket::SocketAddr;
use pingora_core::protocols::l4::stream::Stream;
use pingora_core::protocols::l4::virt::{VirtualSockOpt, VirtualSocket, VirtualSocketStream};
use pingora_error::{Error, ErrorType, Result};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The most bytes read to finish an answer Pingora left unread (a 404's body is a few hundred).
pub const DRAIN_BUDGET: u64 = 64 * 1024;
/// The longest an answer is waited for to finish.
pub const DRAIN_TIME: Duration = Duration::from_secs(1);
/// Drains in flight at once (process-wide); over it a connection is closed instead.
pub const MAX_DRAINS: usize = 256;
/// Idle connections kept per address (Pingora's default pool size).
pub const POOL_CAP: usize = 128;
/// How often the sweeper closes idle connections an origin closed or that idled too long.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// A request head this long (or an answer head) is not followed: the connection is closed
/// after it.
const MAX_HEAD: usize = 64 * 1024;
/// Longest chunk-size line or trailer section followed.
const MAX_LINE: u32 = 4096;
/// Header fields a head may have to be followed (more: the connection is closed after it).
const MAX_FIELDS: usize = 128;
/// An origin's `Keep-Alive: timeout=N` is used as N less this (its clock starts first).
const KEEPALIVE_MARGIN: Duration = Duration::from_millis(500);

static DRAINS: AtomicUsize = AtomicUsize::new(0);

// ---------------------------------------------------------------------------------------
// The framing tracker: pure, no IO.

/// Where an HTTP/1.1 exchange on one connection stands, from the bytes written and read.
#[derive(Debug, Default)]
pub struct Tracker {
    state: State,
    /// A head (request or answer) split over several reads or writes.
    head: Vec<u8>,
    /// How long the origin said it keeps the connection open when idle (the last answer's
    /// `Keep-Alive: timeout=`), less a margin.
    idle_hint: Option<Duration>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between exchanges (a fresh connection, or one taken from the pool).
    #[default]
    Idle,
    /// A request head is being written (`true`: its method is HEAD).
    Request {
        head_method: bool,
        complete: bool,
    },
    /// The answer's head is being read.
    Answer {
        head_method: bool,
    },
    /// The answer's body: bytes left.
    Length(u64),
    Chunked(Chunk),
    /// The exchange is over; nothing read since.
    Done,
    /// Done, and Pingora was told it may not pool it (it is this pool's).
    Parked,
    /// Never kept.
    Unsafe,
}

/// Where a chunked body stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// In a chunk-size line: the size so far, digits seen, in the extension, line length.
    Size {
        size: u64,
        digits: u8,
        ext: bool,
        len: u32,
    },
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// In the trailer section: the current line's length, the section's length so far.
    Trailer {
        line: u32,
        total: u32,
    },
    TrailerLf {
        empty: bool,
        total: u32,
    },
}

/// What to do with a connection Pingora lets go of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// Read at most this many more bytes to end the answer, then keep it.
    Drain,
    Close,
}

impl Tracker {
    pub fn verdict(&self) -> Verdict {
        match self.state {
            State::Done | State::Parked => Verdict::Keep,
            State::Length(n) if n <= DRAIN_BUDGET => Verdict::Drain,
            State::Chunked(_) => Verdict::Drain,
            _ => Verdict::Close,
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done | State::Parked)
    }

    pub fn is_unsafe(&self) -> bool {
        self.state == State::Unsafe
    }

    fn poison(&mut self) {
        self.state = State::Unsafe;
        self.head = Vec::new();
    }

    /// Bytes that went out on the connection.
    pub fn on_write(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        match self.state {
            State::Idle | State::Done | State::Parked => {
                self.head.clear();
                self.idle_hint = None;
                self.state = State::Request {
                    head_method: false,
                    complete: false,
                };
                self.request_bytes(bytes);
            }
            State::Request {
                complete: false, ..
            } => self.request_bytes(bytes),
            // A body after a GET/HEAD head, or a write while an answer is coming.
            _ => self.poison(),
        }
    }

    fn request_bytes(&mut self, bytes: &[u8]) {
        let copied = !self.head.is_empty();
        if copied {
            if self.head.len() + bytes.len() > MAX_HEAD {
                return self.poison();
            }
            self.head.extend_from_slice(bytes);
        }
        let head = std::mem::take(&mut self.head);
        let whole: &[u8] = if copied { &head } else { bytes };
        match parse_request(whole) {
            Parsed::Complete(head_method) => {
                self.state = State::Request {
                    head_method,
                    complete: true,
                };
            }
            Parsed::Partial if whole.len() <= MAX_HEAD => {
                self.head = if copied { head } else { bytes.to_vec() };
            }
            Parsed::Partial | Parsed::Refused => self.poison(),
        }
    }

    /// Bytes that came in on the connection; empty: EOF.
    pub fn on_read(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return self.poison();
        }
        match self.state {
            State::Request {
                head_method,
                complete: true,
            } => {
                self.head.clear();
                self.state = State::Answer { head_method };
                self.answer_bytes(bytes);
            }
            State::Answer { .. } => self.answer_bytes(bytes),
            State::Length(_) | State::Chunked(_) => self.body_bytes(bytes),
            // An answer before the request was out, or data on an idle connection.
            _ => self.poison(),
        }
    }

    fn answer_bytes(&mut self, bytes: &[u8]) {
        let State::Answer { head_method } = self.state else {
            return self.poison();
        };
        let copied = !self.head.is_empty();
        if copied {
            if self.head.len() + bytes.len() > MAX_HEAD {
                return self.poison();
            }
            self.head.extend_from_slice(bytes);
        }
        let head = std::mem::take(&mut self.head);
        let whole: &[u8] = if copied { &head } else { bytes };
        // Uninitialised: a head's parse must not start with a 4 KiB memset.
        let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
        let mut resp = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut resp,
            whole,
            &mut fields,
        );
        match parsed {
            Ok(httparse::Status::Complete(n)) => {
                let Some(state) = body_state(&resp, head_method, &mut self.idle_hint) else {
                    return self.poison();
                };
                self.state = state;
                let rest = &whole[n..];
                if !rest.is_empty() {
                    self.body_bytes(rest);
                }
            }
            Ok(httparse::Status::Partial) => {
                if whole.len() > MAX_HEAD {
                    return self.poison();
                }
                self.head = if copied { head } else { bytes.to_vec() };
            }
            Err(_) => self.poison(),
        }
    }

    fn body_bytes(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match self.state {
                State::Length(left) => {
                    let n = bytes.len() as u64;
                    if n > left {
                        // Read past the answer's end.
                        return self.poison();
                    }
                    self.state = if n == left {
                        State::Done
                    } else {
                        State::Length(left - n)
                    };
                    return;
                }
                State::Chunked(c) => match chunk_step(c, bytes) {
                    Some((next, used)) => {
                        bytes = &bytes[used..];
                        self.state = next;
                    }
                    None => return self.poison(),
                },
                // Bytes after the end.
                _ => return self.poison(),
            }
        }
    }
}

enum Parsed {
    /// One whole bodiless GET/HEAD head (`true`: HEAD), nothing after it.
    Complete(bool),
    Partial,
    /// Anything else: the connection is not followed.
    Refused,
}

/// Is `whole` one bodiless HTTP/1.1 GET/HEAD head that leaves the connection open?
fn parse_request(whole: &[u8]) -> Parsed {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(whole, &mut fields) {
        // Bytes after the head: a request body, or a second request.
        Ok(httparse::Status::Complete(n)) if n == whole.len() => {}
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        _ => return Parsed::Refused,
    }
    let head_method = match req.method {
        Some("GET") => false,
        Some("HEAD") => true,
        _ => return Parsed::Refused,
    };
    let ok = req.version == Some(1)
        && req.headers.iter().all(|f| {
            let v = f.value;
            if f.name.eq_ignore_ascii_case("content-length") {
                let v = v.trim_ascii();
                !v.is_empty() && v.iter().all(|b| *b == b'0')
            } else if f.name.eq_ignore_ascii_case("transfer-encoding")
                || f.name.eq_ignore_ascii_case("upgrade")
            {
                false
            } else if f.name.eq_ignore_ascii_case("connection") {
                !has_token(v, b"close") && !has_token(v, b"upgrade")
            } else {
                true
            }
        });
    if ok {
        Parsed::Complete(head_method)
    } else {
        Parsed::Refused
    }
}

/// The body that follows an answer head (RFC 9112 §6.3), or `None` when its end cannot be
/// known or the connection will not outlive it.
fn body_state(
    resp: &httparse::Response<'_, '_>,
    head_method: bool,
    idle_hint: &mut Option<Duration>,
) -> Option<State> {
    let code = resp.code?;
    if resp.version != Some(1) || code < 200 {
        return None;
    }
    let mut length: Option<u64> = None;
    let mut chunked = false;
    for f in resp.headers.iter() {
        if f.name.eq_ignore_ascii_case("connection") {
            if has_token(f.value, b"close") {
                return None;
            }
        } else if f.name.eq_ignore_ascii_case("transfer-encoding") {
            // Only a lone `chunked`; any other coding ends at close.
            if chunked || !f.value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return None;
            }
            chunked = true;
        } else if f.name.eq_ignore_ascii_case("keep-alive") {
            // `timeout=N`: the origin closes after N idle seconds; stop using it a bit before.
            let secs = f.value.split(|b| *b == b',').find_map(|p| {
                let (k, v) = std::str::from_utf8(p).ok()?.split_once('=')?;
                k.trim()
                    .eq_ignore_ascii_case("timeout")
                    .then(|| v.trim().parse::<u64>().ok())?
            });
            if let Some(secs) = secs {
                let d = Duration::from_secs(secs).saturating_sub(KEEPALIVE_MARGIN);
                if d.is_zero() {
                    return None;
                }
                *idle_hint = Some(d);
            }
        } else if f.name.eq_ignore_ascii_case("content-length") {
            let v = f.value.trim_ascii();
            if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let n: u64 = std::str::from_utf8(v).ok()?.parse().ok()?;
            if length.is_some_and(|l| l != n) {
                return None;
            }
            length = Some(n);
        }
    }
    if head_method || code == 204 || code == 304 {
        return Some(State::Done);
    }
    match (length, chunked) {
        (Some(_), true) => None,
        (Some(0), false) => Some(State::Done),
        (Some(n), false) => Some(State::Length(n)),
        (None, true) => Some(State::Chunked(Chunk::Size {
            size: 0,
            digits: 0,
            ext: false,
            len: 0,
        })),
        // Read to close.
        (None, false) => None,
    }
}

/// Does a comma-separated header value hold `token` (case-insensitive)?
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// One step of a chunked body over `bytes`: the next state and the bytes used, or `None` when
/// the framing is broken or over a bound.
fn chunk_step(c: Chunk, bytes: &[u8]) -> Option<(State, usize)> {
    let b = bytes[0];
    let next = |c| State::Chunked(c);
    Some(match c {
        Chunk::Data(left) => {
            let n = (bytes.len() as u64).min(left);
            let c = if n == left {
                Chunk::DataCr
            } else {
                Chunk::Data(left - n)
            };
            (next(c), n as usize)
        }
        Chunk::Size {
            size,
            digits,
            ext,
            len,
        } => {
            if len >= MAX_LINE {
                return None;
            }
            let len = len + 1;
            let c = match b {
                b'\r' if digits > 0 => Chunk::SizeLf(size),
                b'\r' | b'\n' => return None,
                _ if ext => Chunk::Size {
                    size,
                    digits,
                    ext,
                    len,
                },
                b';' | b' ' | b'\t' if digits > 0 => Chunk::Size {
                    size,
                    digits,
                    ext: true,
                    len,
                },
                _ => {
                    let d = (b as char).to_digit(16)?;
                    if digits >= 15 {
                        return None;
                    }
                    Chunk::Size {
                        size: size * 16 + u64::from(d),
                        digits: digits + 1,
                        ext,
                        len,
                    }
                }
            };
            (next(c), 1)
        }
        Chunk::SizeLf(size) => match (b, size) {
            (b'\n', 0) => (next(Chunk::Trailer { line: 0, total: 0 }), 1),
            (b'\n', n) => (next(Chunk::Data(n)), 1),
            _ => return None,
        },
        Chunk::DataCr if b == b'\r' => (next(Chunk::DataLf), 1),
        Chunk::DataLf if b == b'\n' => (
            next(Chunk::Size {
                size: 0,
                digits: 0,
                ext: false,
                len: 0,
            }),
            1,
        ),
        Chunk::DataCr | Chunk::DataLf => return None,
        Chunk::Trailer { line, total } => {
            if total >= MAX_LINE {
                return None;
            }
            match b {
                b'\r' => (
                    next(Chunk::TrailerLf {
                        empty: line == 0,
                        total: total + 1,
                    }),
                    1,
                ),
                b'\n' => return None,
                _ => (
                    next(Chunk::Trailer {
                        line: line + 1,
                        total: total + 1,
                    }),
                    1,
                ),
            }
        }
        Chunk::TrailerLf { empty, total } => match b {
            b'\n' if empty => (State::Done, 1),
            b'\n' => (next(Chunk::Trailer { line: 0, total }), 1),
            _ => return None,
        },
    })
}

// ---------------------------------------------------------------------------------------
// The pool.

/// Idle connections to one address.
#[derive(Debug)]
struct Pool {
    /// Oldest first, each with the instant it stops being handed out.
    idle: Mutex<VecDeque<(Instant, TcpStream)>>,
    /// The longest a connection idles here (the origin's pool idle timeout).
    max_idle: Duration,
    sweeping: AtomicBool,
}

/// Is an idle connection still open with nothing to read? Data on an idle connection (an
/// answer nobody asked for) or EOF both mean it cannot be used. A real `recv(MSG_PEEK)`, not
/// tokio's cached readiness, which may not have seen bytes the kernel already holds.
fn still_open(tcp: &TcpStream) -> bool {
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

impl Pool {
    /// The most recently kept connection that is still usable (a warm one; older ones
    /// expire).
    fn checkout(&self) -> Option<TcpStream> {
        loop {
            let (until, tcp) = self.idle.lock().pop_back()?;
            if Instant::now() < until && still_open(&tcp) {
                return Some(tcp);
            }
        }
    }

    /// `hint`: how long the origin said it keeps it (`Keep-Alive: timeout=`).
    fn put(self: &Arc<Self>, tcp: TcpStream, hint: Option<Duration>) {
        let keep = hint.map_or(self.max_idle, |h| h.min(self.max_idle));
        {
            let mut idle = self.idle.lock();
            if idle.len() >= POOL_CAP {
                idle.pop_front();
            }
            idle.push_back((Instant::now() + keep, tcp));
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
        idle.retain(|(until, tcp)| now < *until && still_open(tcp));
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
    /// Set when the attempt's connection came from the pool.
    reused: Option<Arc<AtomicBool>>,
}

impl Connector {
    /// `max_idle`: the longest a connection is kept idle.
    pub fn new(max_idle: Duration) -> Connector {
        Connector {
            pool: Arc::new(Pool {
                idle: Mutex::new(VecDeque::new()),
                max_idle,
                sweeping: AtomicBool::new(false),
            }),
            reused: None,
        }
    }

    /// The connector of one attempt: this pool; `reused` tells the attempt whether its
    /// connection was a kept one (Pingora sees every one as new).
    pub fn for_attempt(&self, reused: Arc<AtomicBool>) -> Connector {
        Connector {
            pool: self.pool.clone(),
            reused: Some(reused),
        }
    }

    fn set_reused(&self, v: bool) {
        if let Some(r) = &self.reused {
            r.store(v, Ordering::Relaxed);
        }
    }

    /// Idle connections held now.
    pub fn idle(&self) -> usize {
        self.pool.len()
    }

    fn stream(&self, tcp: TcpStream, nodelay: bool) -> Stream {
        let conn = Conn {
            tcp: Some(tcp),
            http: Tracker::default(),
            pool: Arc::downgrade(&self.pool),
            nodelay: AtomicBool::new(nodelay),
        };
        Stream::from(VirtualSocketStream::new(Box::new(conn)))
    }
}

#[async_trait]
impl L4Connect for Connector {
    async fn connect(&self, addr: &SocketAddr) -> Result<Stream> {
        if let Some(tcp) = self.pool.checkout() {
            self.set_reused(true);
            crate::metrics::METRICS.upstream_connections[1].inc();
            return Ok(self.stream(tcp, true));
        }
        self.set_reused(false);
        let SocketAddr::Inet(inet) = addr else {
            return Error::e_explain(ErrorType::InternalError, "cascade's pool connects TCP only");
        };
        let tcp = tcp_connect(inet, None).await?;
        crate::metrics::METRICS.upstream_connections[0].inc();
        Ok(self.stream(tcp, false))
    }
}

// ---------------------------------------------------------------------------------------
// The connection Pingora holds.

/// A TCP connection to an origin as Pingora sees it (a virtual socket), following its
/// exchanges; when Pingora lets go of it, it goes back to its pool if it can.
struct Conn {
    tcp: Option<TcpStream>,
    http: Tracker,
    pool: Weak<Pool>,
    nodelay: AtomicBool,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("tcp", &self.tcp)
            .field("http", &self.http.state)
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
        let Some(tcp) = this.tcp.as_mut() else {
            return Poll::Ready(Err(gone()));
        };
        if buf.remaining() == 0 {
            return Pin::new(tcp).poll_read(cx, buf);
        }
        if this.http.is_done() {
            // The exchange is over and Pingora is checking whether the connection can go to
            // its own pool (`test_reusable_stream`, its only read after an answer): it cannot
            // reuse a virtual socket (it matches pooled connections by file descriptor), so
            // say no; the drop that follows keeps it here. No read: whatever the origin sends
            // from now on is seen by the `recv(MSG_PEEK)` before the connection is handed out.
            this.http.state = State::Parked;
            return Poll::Ready(Err(std::io::Error::other(
                "kept by cascade's upstream pool",
            )));
        }
        let before = buf.filled().len();
        match Pin::new(tcp).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.http.on_read(&buf.filled()[before..]);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                this.http.poison();
                Poll::Ready(Err(e))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let Some(tcp) = this.tcp.as_mut() else {
            return Poll::Ready(Err(gone()));
        };
        let r = Pin::new(tcp).poll_write(cx, buf);
        match &r {
            Poll::Ready(Ok(n)) => this.http.on_write(&buf[..*n]),
            Poll::Ready(Err(_)) => this.http.poison(),
            Poll::Pending => {}
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut().tcp.as_mut() {
            Some(tcp) => Pin::new(tcp).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.http.poison();
        match this.tcp.as_mut() {
            Some(tcp) => Pin::new(tcp).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

impl VirtualSocket for Conn {
    fn set_socket_option(&self, opt: VirtualSockOpt) -> std::io::Result<()> {
        let Some(tcp) = self.tcp.as_ref() else {
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
        let Some(tcp) = self.tcp.take() else { return };
        let Some(pool) = self.pool.upgrade() else {
            return;
        };
        let m = &crate::metrics::METRICS;
        match self.http.verdict() {
            Verdict::Keep => {
                if self.http.state == State::Done {
                    // Pingora dropped a connection whose answer was over (a replayed 404).
                    m.upstream_connections[2].inc();
                }
                pool.put(tcp, self.http.idle_hint);
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
                    let kept = tokio::time::timeout(DRAIN_TIME, drain(tcp, http))
                        .await
                        .ok()
                        .flatten();
                    DRAINS.fetch_sub(1, Ordering::AcqRel);
                    log::debug!(
                        "upstream answer drained: connection kept: {}",
                        kept.is_some()
                    );
                    if let Some((tcp, hint)) = kept {
                        crate::metrics::METRICS.upstream_connections[2].inc();
                        pool.put(tcp, hint);
                    }
                });
            }
            Verdict::Close => {}
        }
    }
}

/// Reads the rest of an answer (at most [`DRAIN_BUDGET`] bytes); the connection when the
/// answer ended cleanly.
async fn drain(mut tcp: TcpStream, mut http: Tracker) -> Option<(TcpStream, Option<Duration>)> {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 8192];
    let mut read = 0u64;
    while !http.is_done() {
        let n = tcp.read(&mut buf).await.ok()?;
        read += n as u64;
        http.on_read(&buf[..n]);
        if http.is_unsafe() || read > DRAIN_BUDGET {
            return None;
        }
    }
    Some((tcp, http.idle_hint))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(req: &[u8], answer: &[&[u8]]) -> Tracker {
        let mut t = Tracker::default();
        t.on_write(req);
        for a in answer {
            t.on_read(a);
        }
        t
    }

    const GET: &[u8] = b"GET /a HTTP/1.1\r\nHost: o\r\n\r\n";
    const HEAD: &[u8] = b"HEAD /a HTTP/1.1\r\nHost: o\r\n\r\n";

    #[test]
    fn a_404_with_its_body_read_is_kept() {
        let t = exchange(
            GET,
            &[b"HTTP/1.1 404 Not Found\r\nContent-Length: 5\r\n\r\nnope\n"],
        );
        assert_eq!(t.verdict(), Verdict::Keep);
    }

    #[test]
    fn a_404_split_anywhere_is_kept() {
        let whole: &[u8] =
            b"HTTP/1.1 404 Not Found\r\nServer: x\r\nContent-Length: 12\r\n\r\nhello world\n";
        for cut in 1..whole.len() {
            let t = exchange(GET, &[&whole[..cut], &whole[cut..]]);
            assert_eq!(t.verdict(), Verdict::Keep, "cut at {cut}");
        }
        let req_cut = exchange(&GET[..7], &[]);
        let mut t = req_cut;
        t.on_write(&GET[7..]);
        t.on_read(whole);
        assert_eq!(t.verdict(), Verdict::Keep);
    }

    #[test]
    fn an_unread_body_is_drained_within_the_budget_only() {
        let t = exchange(
            GET,
            &[b"HTTP/1.1 404 Not Found\r\nContent-Length: 500\r\n\r\nab"],
        );
        assert_eq!(t.verdict(), Verdict::Drain);
        let big = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            DRAIN_BUDGET + 1
        );
        let t = exchange(GET, &[big.as_bytes()]);
        assert_eq!(t.verdict(), Verdict::Close);
    }

    #[test]
    fn chunked_answers_end_at_their_last_chunk_and_trailers() {
        let whole: &[u8] =
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\na\r\n0123456789\r\n0\r\nX-T: 1\r\n\r\n";
        for cut in 1..whole.len() {
            let t = exchange(GET, &[&whole[..cut], &whole[cut..]]);
            assert_eq!(t.verdict(), Verdict::Keep, "cut at {cut}");
            let t = exchange(GET, &[&whole[..cut]]);
            assert_ne!(t.verdict(), Verdict::Keep, "cut at {cut}");
        }
        let t = exchange(
            GET,
            &[b"HTTP/1.1 404 X\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"],
        );
        assert_eq!(t.verdict(), Verdict::Keep);
    }

    #[test]
    fn bodiless_answers_are_over_at_their_head() {
        let t = exchange(
            HEAD,
            &[b"HTTP/1.1 404 Not Found\r\nContent-Length: 500\r\n\r\n"],
        );
        assert_eq!(t.verdict(), Verdict::Keep);
        for code in ["204", "304"] {
            let a = format!("HTTP/1.1 {code} X\r\nContent-Length: 9\r\n\r\n");
            assert_eq!(exchange(GET, &[a.as_bytes()]).verdict(), Verdict::Keep);
        }
    }

    #[test]
    fn the_same_connection_carries_exchange_after_exchange() {
        let mut t = Tracker::default();
        for _ in 0..3 {
            t.on_write(GET);
            t.on_read(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
            assert_eq!(t.verdict(), Verdict::Keep);
        }
    }

    #[test]
    fn hostile_or_ambiguous_exchanges_are_never_kept() {
        let cases: &[(&[u8], &[&[u8]])] = &[
            // bytes past the answer's end: a smuggled second answer
            (
                GET,
                &[b"HTTP/1.1 404 X\r\nContent-Length: 2\r\n\r\nabHTTP/1.1 200 OK\r\n"],
            ),
            (
                GET,
                &[b"HTTP/1.1 404 X\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nHTTP/1.1"],
            ),
            // both framings
            (
                GET,
                &[b"HTTP/1.1 404 X\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"],
            ),
            // conflicting lengths
            (
                GET,
                &[b"HTTP/1.1 404 X\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nab"],
            ),
            (GET, &[b"HTTP/1.1 404 X\r\nContent-Length: +2\r\n\r\nab"]),
            // read to close, close, HTTP/1.0, informational, other codings
            (GET, &[b"HTTP/1.1 404 X\r\n\r\nab"]),
            (
                GET,
                &[b"HTTP/1.1 404 X\r\nConnection: keep-alive, Close\r\nContent-Length: 0\r\n\r\n"],
            ),
            (GET, &[b"HTTP/1.0 404 X\r\nContent-Length: 0\r\n\r\n"]),
            (GET, &[b"HTTP/1.1 100 Continue\r\n\r\n"]),
            (
                GET,
                &[b"HTTP/1.1 404 X\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"],
            ),
            // broken chunk framing
            (
                GET,
                &[b"HTTP/1.1 404 X\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"],
            ),
            (
                GET,
                &[b"HTTP/1.1 404 X\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n"],
            ),
            (
                GET,
                &[b"HTTP/1.1 404 X\r\nTransfer-Encoding: chunked\r\n\r\n1ffffffffffffffff\r\n"],
            ),
            // garbage, EOF
            (GET, &[b"SSH-2.0-x\r\n\r\n"]),
            (
                GET,
                &[b"HTTP/1.1 404 X\r\nContent-Length: 4\r\n\r\nab", b""],
            ),
            // requests that are not one bodiless GET/HEAD
            (
                b"PUT /a HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
                &[b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
            ),
            (
                b"GET /a HTTP/1.1\r\nContent-Length: 2\r\n\r\nab",
                &[b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
            ),
            (
                b"GET /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                &[b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
            ),
            (
                b"GET /a HTTP/1.1\r\nConnection: close\r\n\r\n",
                &[b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
            ),
            (
                b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n",
                &[b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
            ),
            (
                b"GET /a HTTP/1.0\r\n\r\n",
                &[b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
            ),
        ];
        for (i, (req, answer)) in cases.iter().enumerate() {
            let t = exchange(req, answer);
            assert_eq!(t.verdict(), Verdict::Close, "case {i}");
            assert!(!t.is_done(), "case {i}");
        }
    }

    #[test]
    fn data_on_an_idle_connection_or_an_early_answer_poisons_it_for_good() {
        let mut t = exchange(GET, &[b"HTTP/1.1 404 X\r\nContent-Length: 0\r\n\r\n"]);
        t.on_read(b"H");
        assert_eq!(t.verdict(), Verdict::Close);
        t.on_write(GET);
        t.on_read(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(t.verdict(), Verdict::Close);
        let mut t = Tracker::default();
        t.on_read(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(t.verdict(), Verdict::Close);
        // An answer while the request head is still going out.
        let mut t = Tracker::default();
        t.on_write(&GET[..5]);
        t.on_read(b"HTTP/1.1 400 X\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(t.verdict(), Verdict::Close);
    }

    #[test]
    fn the_origins_keep_alive_timeout_bounds_the_idle_time() {
        let t = exchange(
            GET,
            &[b"HTTP/1.1 404 X\r\nKeep-Alive: max=100, timeout=5\r\nContent-Length: 0\r\n\r\n"],
        );
        assert_eq!(t.verdict(), Verdict::Keep);
        assert_eq!(t.idle_hint, Some(Duration::from_millis(4500)));
        // timeout=0: the origin closes at once.
        let t = exchange(
            GET,
            &[b"HTTP/1.1 404 X\r\nKeep-Alive: timeout=0\r\nContent-Length: 0\r\n\r\n"],
        );
        assert_eq!(t.verdict(), Verdict::Close);
        // The hint is the last answer's.
        let mut t = exchange(
            GET,
            &[b"HTTP/1.1 404 X\r\nKeep-Alive: timeout=5\r\nContent-Length: 0\r\n\r\n"],
        );
        t.on_write(GET);
        t.on_read(b"HTTP/1.1 404 X\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(t.idle_hint, None);
    }

    #[test]
    fn heads_over_the_bound_are_not_followed() {
        let mut t = Tracker::default();
        t.on_write(GET);
        t.on_read(b"HTTP/1.1 404 X\r\n");
        let filler = vec![b'a'; MAX_HEAD];
        t.on_read(&filler);
        assert_eq!(t.verdict(), Verdict::Close);
        let mut t = Tracker::default();
        t.on_write(b"GET /");
        t.on_write(&filler);
        assert_eq!(t.verdict(), Verdict::Close);
    }

    #[tokio::test]
    async fn the_pool_hands_out_only_open_connections_and_forgets_old_ones() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let c = Connector::new(Duration::from_secs(60));
        let a = TcpStream::connect(addr).await.unwrap();
        let (sa, _) = l.accept().await.unwrap();
        let b = TcpStream::connect(addr).await.unwrap();
        let (_sb, _) = l.accept().await.unwrap();
        c.pool.put(a, None);
        c.pool.put(b, None);
        // The origin closes `a`: only `b` may come back.
        drop(sa);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(c.pool.checkout().is_some());
        assert!(c.pool.checkout().is_none());
        // An idle timeout of 0, or an origin's shorter one: nothing is handed out.
        let c = Connector::new(Duration::ZERO);
        c.pool.put(TcpStream::connect(addr).await.unwrap(), None);
        assert!(c.pool.checkout().is_none());
        assert_eq!(c.idle(), 0);
        let c = Connector::new(Duration::from_secs(60));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let _server_side = l.accept().await.unwrap();
        c.pool.put(tcp, Some(Duration::from_millis(20)));
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(c.pool.checkout().is_none());
    }

    #[tokio::test]
    async fn an_answer_nobody_asked_for_is_seen_before_the_runtime_sees_it() {
        use std::io::Write;
        // A std listener: the origin side writes without any runtime involved.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = Connector::new(Duration::from_secs(60));
        let tcp = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (mut origin, _) = l.accept().unwrap();
        c.pool.put(tcp, None);
        // Bytes in the kernel's buffer, no await since: tokio's readiness has not seen them.
        origin.write_all(b"HTTP/1.1 200 OK\r\n").unwrap();
        assert!(c.pool.checkout().is_none());
    }

    #[tokio::test]
    async fn the_pool_is_bounded() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let c = Connector::new(Duration::from_secs(60));
        let mut keep = Vec::new();
        for _ in 0..POOL_CAP + 5 {
            c.pool.put(TcpStream::connect(addr).await.unwrap(), None);
            keep.push(l.accept().await.unwrap());
        }
        assert_eq!(c.idle(), POOL_CAP);
    }
}
