//! Integration test harness: real parts only.
//!
//! ```text
//!  test ──reqwest/raw TCP──► Cascade (child process, real binary)
//!                               │            │
//!                               ▼            ▼
//!                          S3Server      HttpOrigin        (in-process, own tokio runtime each)
//!                       (s3s + s3s-fs,   (hyper, scripted
//!                        SigV4 checked)   replies, slow mode)
//! ```
//!
//! Every server counts requests per method and records each request (with a process-wide
//! sequence number, so tests can assert the order in which origins were asked).

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

/// Access key of every signed test server.
pub const ACCESS_KEY: &str = "AKIDCASCADETEST";
/// Secret key of every signed test server.
pub const SECRET_KEY: &str = "cascade-test-secret-key";

/// Process-wide request sequence: lets tests compare the order of requests across servers.
static SEQ: AtomicU64 = AtomicU64::new(1);

// ---------------------------------------------------------------------------------------------
// Request statistics
// ---------------------------------------------------------------------------------------------

/// One request as a server saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Process-wide arrival order.
    pub seq: u64,
    pub method: String,
    /// Path and query exactly as received.
    pub uri: String,
    pub headers: HeaderMap,
}

impl Recorded {
    /// A header as a string ("" if absent or not UTF-8).
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    }
}

/// Request counters of one server.
#[derive(Debug, Default)]
pub struct Stats {
    log: Mutex<Vec<Recorded>>,
    response_bytes: AtomicU64,
    request_bytes: AtomicU64,
}

impl Stats {
    fn record<B>(&self, req: &Request<B>) {
        let rec = Recorded {
            seq: SEQ.fetch_add(1, Ordering::SeqCst),
            method: req.method().as_str().to_string(),
            uri: req
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_default(),
            headers: req.headers().clone(),
        };
        self.log.lock().unwrap().push(rec);
    }

    /// Requests with this method (case-sensitive, e.g. "GET").
    pub fn count(&self, method: &str) -> u64 {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.method == method)
            .count() as u64
    }

    /// All requests.
    pub fn total(&self) -> u64 {
        self.log.lock().unwrap().len() as u64
    }

    /// PUT, POST, DELETE and PATCH requests.
    pub fn writes(&self) -> u64 {
        ["PUT", "POST", "DELETE", "PATCH"]
            .iter()
            .map(|m| self.count(m))
            .sum()
    }

    /// Requests per method.
    pub fn by_method(&self) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for r in self.log.lock().unwrap().iter() {
            *m.entry(r.method.clone()).or_insert(0) += 1;
        }
        m
    }

    /// Every request seen, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.log.lock().unwrap().clone()
    }

    /// The most recent request.
    pub fn last(&self) -> Option<Recorded> {
        self.log.lock().unwrap().last().cloned()
    }

    /// Sequence number of the first request, if any.
    pub fn first_seq(&self) -> Option<u64> {
        self.log.lock().unwrap().first().map(|r| r.seq)
    }

    /// Response body bytes sent so far.
    pub fn response_bytes(&self) -> u64 {
        self.response_bytes.load(Ordering::SeqCst)
    }

    /// Request body bytes received so far (HTTP origin only).
    pub fn request_bytes(&self) -> u64 {
        self.request_bytes.load(Ordering::SeqCst)
    }

    /// Forget everything counted so far.
    pub fn reset(&self) {
        self.log.lock().unwrap().clear();
        self.response_bytes.store(0, Ordering::SeqCst);
        self.request_bytes.store(0, Ordering::SeqCst);
    }
}

/// A response body that adds every data frame's length to [`Stats::response_bytes`].
struct CountingBody<B> {
    inner: Pin<Box<B>>,
    stats: Arc<Stats>,
}

impl<B: Body<Data = Bytes>> Body for CountingBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = this.inner.as_mut().poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                this.stats
                    .response_bytes
                    .fetch_add(data.len() as u64, Ordering::SeqCst);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

// ---------------------------------------------------------------------------------------------
// Background server plumbing
// ---------------------------------------------------------------------------------------------

/// A hyper HTTP/1 server on its own thread and tokio runtime; stopped on drop.
struct ServerHandle {
    addr: SocketAddr,
    /// Connections accepted.
    accepted: Arc<AtomicU64>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ServerHandle {
    fn spawn<S, B>(name: &str, svc: S) -> ServerHandle
    where
        S: hyper::service::Service<Request<Incoming>, Response = Response<B>>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        ServerHandle::spawn_on(name, SocketAddr::from(([127, 0, 0, 1], 0)), svc)
    }

    /// A server listening on `addr` (port 0: any free port). Binding the address of a server
    /// that was just dropped works: std sets `SO_REUSEADDR`, so its connections in TIME_WAIT
    /// do not hold the port.
    fn spawn_on<S, B>(name: &str, addr: SocketAddr, svc: S) -> ServerHandle
    where
        S: hyper::service::Service<Request<Incoming>, Response = Response<B>>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let listener =
            TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind test server on {addr}: {e}"));
        ServerHandle::accept_loop(name, listener, move |stream| {
            let svc = svc.clone();
            async move {
                // More headers than hyper's 100: plugin header floods reach the origin up to
                // cascade's bound (256).
                let _ = hyper::server::conn::http1::Builder::new()
                    .max_headers(512)
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            }
        })
    }

    /// Accept on `listener` in a tokio runtime on its own thread until dropped; each
    /// connection (NODELAY set) is served by `serve` in a task of its own.
    fn accept_loop<F, Fut>(name: &str, listener: TcpListener, serve: F) -> ServerHandle
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        let thread = std::thread::Builder::new()
            .name(format!("test-{name}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                    loop {
                        tokio::select! {
                            _ = &mut rx => break,
                            accepted = listener.accept() => {
                                let Ok((stream, _)) = accepted else { continue };
                                count.fetch_add(1, Ordering::SeqCst);
                                // hyper writes a header and a body in two sends: without
                                // NODELAY, Nagle and delayed ACKs hold the body ~40 ms.
                                let _ = stream.set_nodelay(true);
                                tokio::spawn(serve(stream));
                            }
                        }
                    }
                });
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .unwrap();
        ServerHandle {
            addr,
            accepted,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// S3 server (s3s + s3s-fs)
// ---------------------------------------------------------------------------------------------

/// A real S3 server: buckets are directories under `root`, objects are plain files.
pub struct S3Server {
    pub addr: SocketAddr,
    pub stats: Arc<Stats>,
    /// `Some((access, secret))` when SigV4 is verified.
    pub credentials: Option<(String, String)>,
    root: tempfile::TempDir,
    _server: ServerHandle,
}

impl S3Server {
    /// A server verifying SigV4 with [`ACCESS_KEY`] / [`SECRET_KEY`]; unsigned requests get 403.
    pub fn signed() -> S3Server {
        S3Server::start(Some((ACCESS_KEY, SECRET_KEY)))
    }

    /// A server without authentication: unsigned requests are served (signed ones are refused
    /// by s3s with NotImplemented).
    pub fn anonymous() -> S3Server {
        S3Server::start(None)
    }

    /// Start a server; `credentials` enables SigV4 verification.
    pub fn start(credentials: Option<(&str, &str)>) -> S3Server {
        let root = tempfile::tempdir().unwrap();
        let fs = s3s_fs::FileSystem::new(root.path()).expect("s3s-fs root");
        let mut builder = s3s::service::S3ServiceBuilder::new(fs);
        if let Some((ak, sk)) = credentials {
            builder.set_auth(s3s::auth::SimpleAuth::from_single(ak, sk));
        }
        let s3 = builder.build();
        let stats = Arc::new(Stats::default());
        let st = stats.clone();
        let svc = service_fn(move |req: Request<Incoming>| {
            let s3 = s3.clone();
            let stats = st.clone();
            async move {
                stats.record(&req);
                let resp = hyper::service::Service::call(&s3, req).await?;
                Ok::<_, s3s::HttpError>(resp.map(|b| CountingBody {
                    inner: Box::pin(b),
                    stats,
                }))
            }
        });
        let server = ServerHandle::spawn("s3", svc);
        S3Server {
            addr: server.addr,
            stats,
            credentials: credentials.map(|(a, s)| (a.to_string(), s.to_string())),
            root,
            _server: server,
        }
    }

    /// Root directory (buckets are its subdirectories).
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Create an empty bucket.
    pub fn create_bucket(&self, bucket: &str) {
        std::fs::create_dir_all(self.root().join(bucket)).unwrap();
    }

    /// Where object `key` of `bucket` lives on disk.
    pub fn object_path(&self, bucket: &str, key: &str) -> PathBuf {
        self.root().join(bucket).join(key)
    }

    /// Seed an object (creating the bucket and parent directories).
    pub fn put_file(&self, bucket: &str, key: &str, data: impl AsRef<[u8]>) {
        let p = self.object_path(bucket, key);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }

    /// Read an object from disk, if present.
    pub fn read_file(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        std::fs::read(self.object_path(bucket, key)).ok()
    }

    /// `http://127.0.0.1:PORT`
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Path-style bucket URL: `http://127.0.0.1:PORT/bucket`.
    pub fn bucket_url(&self, bucket: &str) -> String {
        format!("http://{}/{bucket}", self.addr)
    }
}

// ---------------------------------------------------------------------------------------------
// Scriptable plain HTTP origin
// ---------------------------------------------------------------------------------------------

/// A scripted response.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
    pub headers: Vec<(String, String)>,
    /// Sleep this long before answering.
    pub delay: Duration,
    /// Send the body in two halves this far apart (zero: all at once).
    pub gap: Duration,
}

impl Reply {
    /// A reply with a status and body.
    pub fn new(status: u16, body: impl Into<Bytes>) -> Reply {
        Reply {
            status,
            body: body.into(),
            headers: Vec::new(),
            delay: Duration::ZERO,
            gap: Duration::ZERO,
        }
    }

    /// Add a response header.
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Answer only after `d`.
    pub fn delay(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }

    /// Send the headers and the first half of the body at once, the rest `d` later: a
    /// response that is still streaming.
    pub fn trickle(mut self, d: Duration) -> Reply {
        self.gap = d;
        self
    }
}

/// A body sent in parts, `gap` apart.
struct Trickle {
    parts: std::collections::VecDeque<Bytes>,
    gap: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Trickle {
    fn new(body: &Bytes, gap: Duration) -> Trickle {
        let mid = body.len() / 2;
        let parts = if gap.is_zero() || mid == 0 {
            vec![body.clone()]
        } else {
            vec![body.slice(..mid), body.slice(mid..)]
        };
        Trickle {
            parts: parts.into(),
            gap,
            sleep: None,
        }
    }
}

impl Body for Trickle {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(sleep) = this.sleep.as_mut() {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.sleep = None;
        }
        match this.parts.pop_front() {
            Some(part) => {
                if !this.parts.is_empty() {
                    this.sleep = Some(Box::pin(tokio::time::sleep(this.gap)));
                }
                Poll::Ready(Some(Ok(Frame::data(part))))
            }
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.parts.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.parts.iter().map(|p| p.len() as u64).sum())
    }
}

/// A reply computed from the request (method, path and query, headers).
pub type ReplyFn = Arc<dyn Fn(&str, &str, &HeaderMap) -> Reply + Send + Sync>;

struct Script {
    /// Keyed by (method or "*", path without query).
    replies: HashMap<(String, String), Reply>,
    /// Keyed by path without query; consulted before `replies`.
    dynamic: HashMap<String, ReplyFn>,
    default: Reply,
    delay: Duration,
    /// Resolve the path as nginx does before matching: percent-decode, merge `//`, resolve
    /// `.` and `..` (so `/a/../private/x` is `/private/x`).
    normalize: bool,
}

/// nginx's view of a request path: decoded once, slashes merged, dot segments resolved.
pub fn nginx_normalize(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz");
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                decoded.push(b);
                i += 3;
                continue;
            }
        }
        decoded.push(bytes[i]);
        i += 1;
    }
    let decoded = String::from_utf8_lossy(&decoded).into_owned();
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut p = format!("/{}", out.join("/"));
    if decoded.ends_with('/') && p.len() > 1 {
        p.push('/');
    }
    p
}

/// A plain HTTP origin answering scripted replies per path; records every request.
pub struct HttpOrigin {
    pub addr: SocketAddr,
    pub stats: Arc<Stats>,
    script: Arc<Mutex<Script>>,
    _server: ServerHandle,
}

impl HttpOrigin {
    /// Start an origin whose default reply is `404 not found`.
    pub fn start() -> HttpOrigin {
        HttpOrigin::start_with(false)
    }

    /// An origin that resolves paths as nginx does ([`nginx_normalize`]) before matching.
    pub fn start_normalizing() -> HttpOrigin {
        HttpOrigin::start_with(true)
    }

    /// An origin listening on `addr`: a peer restarted where it was (after its
    /// [`HttpOrigin`] was dropped), or on another loopback address (`127.0.0.2:PORT`; all of
    /// 127/8 is loopback).
    pub fn start_on(addr: SocketAddr) -> HttpOrigin {
        HttpOrigin::start_at(false, addr)
    }

    fn start_with(normalize: bool) -> HttpOrigin {
        HttpOrigin::start_at(normalize, SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    fn start_at(normalize: bool, addr: SocketAddr) -> HttpOrigin {
        let stats = Arc::new(Stats::default());
        let script = Arc::new(Mutex::new(Script {
            replies: HashMap::new(),
            dynamic: HashMap::new(),
            default: Reply::new(404, "not found"),
            delay: Duration::ZERO,
            normalize,
        }));
        let (st, sc) = (stats.clone(), script.clone());
        let svc = service_fn(move |req: Request<Incoming>| {
            let stats = st.clone();
            let script = sc.clone();
            async move {
                stats.record(&req);
                let (reply, global_delay) = {
                    let s = script.lock().unwrap();
                    let path = if s.normalize {
                        nginx_normalize(req.uri().path())
                    } else {
                        req.uri().path().to_string()
                    };
                    let method = req.method().as_str().to_string();
                    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
                    let r = match s.dynamic.get(&path) {
                        Some(f) => f(&method, target, req.headers()),
                        None => s
                            .replies
                            .get(&(method, path.clone()))
                            .or_else(|| s.replies.get(&("*".to_string(), path)))
                            .unwrap_or(&s.default)
                            .clone(),
                    };
                    (r, s.delay)
                };
                let mut body = req.into_body();
                while let Some(frame) = body.frame().await {
                    match frame {
                        Ok(f) => {
                            if let Some(d) = f.data_ref() {
                                stats
                                    .request_bytes
                                    .fetch_add(d.len() as u64, Ordering::SeqCst);
                            }
                        }
                        Err(_) => break,
                    }
                }
                let delay = reply.delay.max(global_delay);
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let mut resp = Response::builder().status(reply.status);
                for (k, v) in &reply.headers {
                    resp = resp.header(k.as_str(), v.as_str());
                }
                let resp = resp
                    .body(CountingBody {
                        inner: Box::pin(Trickle::new(&reply.body, reply.gap)),
                        stats,
                    })
                    .unwrap();
                Ok::<_, std::convert::Infallible>(resp)
            }
        });
        let server = ServerHandle::spawn_on("http-origin", addr, svc);
        HttpOrigin {
            addr: server.addr,
            stats,
            script,
            _server: server,
        }
    }

    /// TCP connections it has accepted.
    pub fn connections(&self) -> u64 {
        self._server.accepted.load(Ordering::SeqCst)
    }

    /// Answer `path` (any method) with `reply`.
    pub fn route(&self, path: &str, reply: Reply) -> &Self {
        self.route_method("*", path, reply)
    }

    /// Answer `method path` with `reply` (takes precedence over [`HttpOrigin::route`]).
    pub fn route_method(&self, method: &str, path: &str, reply: Reply) -> &Self {
        self.script
            .lock()
            .unwrap()
            .replies
            .insert((method.to_string(), path.to_string()), reply);
        self
    }

    /// Answer `path` (any method) with what `f` makes of the request.
    pub fn route_fn(
        &self,
        path: &str,
        f: impl Fn(&str, &str, &HeaderMap) -> Reply + Send + Sync + 'static,
    ) -> &Self {
        self.script
            .lock()
            .unwrap()
            .dynamic
            .insert(path.to_string(), Arc::new(f));
        self
    }

    /// Reply for paths without a scripted reply.
    pub fn set_default(&self, reply: Reply) {
        self.script.lock().unwrap().default = reply;
    }

    /// Slow mode: every reply waits at least `d`.
    pub fn set_delay(&self, d: Duration) {
        self.script.lock().unwrap().delay = d;
    }

    /// `127.0.0.1:PORT`
    pub fn authority(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:PORT{prefix}` (prefix "" or starting with '/').
    pub fn url(&self, prefix: &str) -> String {
        format!("http://{}{prefix}", self.addr)
    }
}

// ---------------------------------------------------------------------------------------------
// Ports, clients, raw HTTP
// ---------------------------------------------------------------------------------------------

/// What a [`RawOrigin`] does in answer to a request head.
#[derive(Debug, Clone)]
pub enum RawPart {
    /// Write these bytes as they are.
    Bytes(Vec<u8>),
    Pause(Duration),
    /// Read (and throw away) this many bytes of the request's body.
    Drain(usize),
    /// Close the connection (with a reset if the request's body was left unread).
    Close,
}

/// A TCP origin that answers each request head with scripted raw bytes: framing no HTTP
/// library would send (a smuggled second answer, a stalled body, a close without notice, an
/// answer before the request's body is read).
/// One thread per connection; stopped on drop.
pub struct RawOrigin {
    pub addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    heads: Arc<Mutex<Vec<(u64, String)>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

type RawScript = dyn Fn(&str) -> Vec<RawPart> + Send + Sync;

impl RawOrigin {
    /// `answer` gets each request head (up to its blank line) and says what to send back.
    pub fn start(answer: impl Fn(&str) -> Vec<RawPart> + Send + Sync + 'static) -> RawOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let answer: Arc<RawScript> = Arc::new(answer);
        let (count, log, halt) = (accepted.clone(), heads.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !halt.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let n = count.fetch_add(1, Ordering::SeqCst);
                        let (answer, log, halt) = (answer.clone(), log.clone(), halt.clone());
                        std::thread::spawn(move || raw_connection(n, conn, &*answer, &log, &halt));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        RawOrigin {
            addr,
            accepted,
            heads,
            stop,
            thread: Some(thread),
        }
    }

    /// TCP connections accepted.
    pub fn connections(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Request heads received, in order, each with the number of its connection (0: the
    /// first accepted).
    pub fn heads(&self) -> Vec<(u64, String)> {
        self.heads.lock().unwrap().clone()
    }

    pub fn url(&self, prefix: &str) -> String {
        format!("http://{}{prefix}", self.addr)
    }
}

fn raw_connection(
    n: u64,
    mut conn: TcpStream,
    answer: &RawScript,
    log: &Mutex<Vec<(u64, String)>>,
    halt: &std::sync::atomic::AtomicBool,
) {
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !halt.load(Ordering::SeqCst) && Instant::now() < deadline {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            let mut chunk = [0u8; 4096];
            let Some(got) = read_some(&mut conn, &mut chunk) else {
                return;
            };
            buf.extend_from_slice(&chunk[..got]);
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
        buf.drain(..end + 4);
        log.lock().unwrap().push((n, head.clone()));
        for part in answer(&head) {
            match part {
                RawPart::Bytes(b) => {
                    if conn.write_all(&b).is_err() {
                        return;
                    }
                }
                RawPart::Pause(d) => std::thread::sleep(d),
                RawPart::Drain(mut n) => {
                    let from_buf = n.min(buf.len());
                    buf.drain(..from_buf);
                    n -= from_buf;
                    let mut chunk = [0u8; 16384];
                    while n > 0 && Instant::now() < deadline {
                        let Some(got) = read_some(&mut conn, &mut chunk[..n.min(16384)]) else {
                            return;
                        };
                        n -= got;
                    }
                }
                RawPart::Close => return,
            }
        }
    }
}

/// The `Content-Length` of an HTTP head (any case), if it has a valid one.
pub fn content_length(head: &str) -> Option<usize> {
    head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())?
    })
}

/// One read within the connection's read timeout: `Some(0)` when nothing came in time,
/// `None` at EOF or on an error.
fn read_some(conn: &mut TcpStream, into: &mut [u8]) -> Option<usize> {
    match conn.read(into) {
        Ok(0) => None,
        Ok(n) => Some(n),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Some(0)
        }
        Err(_) => None,
    }
}

impl Drop for RawOrigin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// TLS in front of an origin
// ---------------------------------------------------------------------------------------------

/// An https origin: a TLS terminator (openssl, a fresh self-signed certificate for `name`)
/// in front of a plain test origin at `backend`, each TLS connection forwarded over its own
/// TCP connection to it. Counts TLS handshakes; one runtime thread; stopped on drop.
pub struct TlsFront {
    pub addr: SocketAddr,
    /// The certificate (PEM): a trust store of it (`SSL_CERT_FILE`) makes `name` trusted.
    pub cert_pem: Vec<u8>,
    handshakes: Arc<AtomicU64>,
    _server: ServerHandle,
}

/// A self-signed certificate for DNS name `name` and IP 127.0.0.1, valid for a day.
fn self_signed(
    name: &str,
) -> (
    openssl::x509::X509,
    openssl::pkey::PKey<openssl::pkey::Private>,
) {
    use openssl::asn1::Asn1Time;
    use openssl::bn::BigNum;
    use openssl::ec::{EcGroup, EcKey};
    use openssl::hash::MessageDigest;
    use openssl::nid::Nid;
    use openssl::pkey::PKey;
    use openssl::x509::extension::SubjectAlternativeName;
    use openssl::x509::{X509Builder, X509NameBuilder};
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    let key = PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap();
    let mut subject = X509NameBuilder::new().unwrap();
    subject.append_entry_by_text("CN", name).unwrap();
    let subject = subject.build();
    let mut b = X509Builder::new().unwrap();
    b.set_version(2).unwrap();
    let serial = BigNum::from_u32(SEQ.fetch_add(1, Ordering::SeqCst) as u32).unwrap();
    b.set_serial_number(&serial.to_asn1_integer().unwrap())
        .unwrap();
    b.set_subject_name(&subject).unwrap();
    b.set_issuer_name(&subject).unwrap();
    b.set_pubkey(&key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::days_from_now(1).unwrap())
        .unwrap();
    let san = SubjectAlternativeName::new()
        .dns(name)
        .ip("127.0.0.1")
        .build(&b.x509v3_context(None, None))
        .unwrap();
    b.append_extension(san).unwrap();
    b.sign(&key, MessageDigest::sha256()).unwrap();
    (b.build(), key)
}

impl TlsFront {
    /// TLS on a free 127.0.0.1 port for the origin at `backend`, with a certificate for `name`.
    pub fn start(backend: SocketAddr, name: &str) -> TlsFront {
        use openssl::ssl::{Ssl, SslAcceptor, SslMethod};
        let (cert, key) = self_signed(name);
        let mut acceptor = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
        acceptor.set_private_key(&key).unwrap();
        acceptor.set_certificate(&cert).unwrap();
        let acceptor = acceptor.build();
        let handshakes = Arc::new(AtomicU64::new(0));
        let count = handshakes.clone();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server = ServerHandle::accept_loop("tls-front", listener, move |tcp| {
            let ssl = Ssl::new(acceptor.context()).unwrap();
            let count = count.clone();
            async move {
                let mut tls = tokio_openssl::SslStream::new(ssl, tcp).unwrap();
                if Pin::new(&mut tls).accept().await.is_err() {
                    return;
                }
                count.fetch_add(1, Ordering::SeqCst);
                let Ok(mut back) = tokio::net::TcpStream::connect(backend).await else {
                    return;
                };
                let _ = back.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut back).await;
            }
        });
        TlsFront {
            addr: server.addr,
            cert_pem: cert.to_pem().unwrap(),
            handshakes,
            _server: server,
        }
    }

    /// TLS handshakes completed (= TLS connections a client made).
    pub fn handshakes(&self) -> u64 {
        self.handshakes.load(Ordering::SeqCst)
    }

    /// `https://HOST:PORT{prefix}`: `host` must resolve to 127.0.0.1 for cascade.
    pub fn url(&self, host: &str, prefix: &str) -> String {
        format!("https://{host}:{}{prefix}", self.addr.port())
    }
}

/// A loopback port that was free a moment ago and was not handed out before in this process.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut given = GIVEN.lock().unwrap();
    let given = given.get_or_insert_with(HashSet::new);
    // Below the kernel's ephemeral range: no `bind(0)` (every test server, every outgoing
    // connection of every test process) can take the port between this check and the bind
    // of whoever it is for (cascade, nginx, redis). From inside the range, one did: cascade
    // found its port "in use" and a test origin answered in its place (a CI flake).
    // Processes pick at random (nextest runs each test in its own process).
    if let Some((lo, hi)) = below_ephemeral() {
        let mut x = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            ^ (u64::from(std::process::id()) << 32)
            | 1;
        for _ in 0..1000 {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let port = lo + (x % u64::from(hi - lo + 1)) as u16;
            if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
                given.insert(port);
                return port;
            }
        }
    }
    for _ in 0..100 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if given.insert(port) {
            return port;
        }
    }
    panic!("no free port found");
}

/// Ports from 10000 up to the kernel's ephemeral range (`ip_local_port_range`), if that
/// leaves at least 2000 of them.
fn below_ephemeral() -> Option<(u16, u16)> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let low: u16 = range.split_whitespace().next()?.parse().ok()?;
    (low >= 12_000).then(|| (10_000, low - 1))
}

/// HTTP client: no proxy, no redirects, short timeouts.
pub fn client() -> reqwest::Client {
    client_with_timeout(Duration::from_secs(15))
}

/// HTTP client with a total request timeout.
pub fn client_with_timeout(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .timeout(timeout)
        .build()
        .unwrap()
}

/// A response read off a raw socket.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Status line and headers, as text.
    pub head: String,
    /// Everything after the header block (possibly chunk-encoded, possibly partial).
    pub body: Vec<u8>,
}

impl RawResponse {
    /// Whole response as lossy text, to search for leaked content.
    pub fn text(&self) -> String {
        format!("{}{}", self.head, String::from_utf8_lossy(&self.body))
    }
}

/// Send `request` verbatim (no URL normalisation) and read one response: the header block,
/// then `Content-Length` bytes or until EOF/timeout.
pub fn raw_request(addr: SocketAddr, request: &[u8], timeout: Duration) -> RawResponse {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(timeout)).unwrap();
    s.set_write_timeout(Some(timeout)).unwrap();
    s.write_all(request).expect("write request");
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    let mut head_end = None;
    let mut want: Option<usize> = None;
    while Instant::now() < deadline {
        if let (Some(h), Some(w)) = (head_end, want) {
            if buf.len() >= h + w {
                break;
            }
        }
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => break,
        }
        if head_end.is_none() {
            if let Some(p) = find(&buf, b"\r\n\r\n") {
                head_end = Some(p + 4);
                want = content_length(&String::from_utf8_lossy(&buf[..p]));
            }
        }
    }
    let Some(h) = head_end else {
        panic!(
            "no complete response head within {timeout:?}; got {:?}",
            String::from_utf8_lossy(&buf)
        );
    };
    let head = String::from_utf8_lossy(&buf[..h]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    RawResponse {
        status,
        head,
        body: buf[h..].to_vec(),
    }
}

/// Sends `request`, reads the response head and at least `body` bytes after it (waiting up
/// to 20 s: as long as a loaded machine needs), then hangs up mid-response. Returns the
/// head.
pub fn read_some_then_hang_up(addr: SocketAddr, request: &[u8], body: usize) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request).expect("write request");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        if let Some(p) = find(&buf, b"\r\n\r\n") {
            if buf.len() >= p + 4 + body {
                return String::from_utf8_lossy(&buf[..p + 4]).into_owned();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no head and {body} body bytes within 20 s"
        );
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => panic!(
                "closed before a head and {body} body bytes: {:?}",
                String::from_utf8_lossy(&buf[..buf.len().min(512)])
            ),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A raw `GET` for `target` with `Connection: close`.
pub fn raw_get(addr: SocketAddr, target: &str) -> RawResponse {
    let req = format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    raw_request(addr, req.as_bytes(), Duration::from_secs(10))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A header of a reqwest response as a string ("" if absent).
pub fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

// ---------------------------------------------------------------------------------------------
// The cascade binary
// ---------------------------------------------------------------------------------------------

/// Path of the binary under test.
pub fn cascade_bin() -> &'static str {
    env!("CARGO_BIN_EXE_cascade")
}

/// An origin answering 200 "ok" to everything, behind a cascade with these `server:` lines.
pub fn ok_behind_cascade(server: &[(&str, &str)]) -> (HttpOrigin, Cascade) {
    let origin = HttpOrigin::start();
    origin.set_default(Reply::new(200, "ok"));
    let c = server
        .iter()
        .fold(Cascade::builder(&ok_config(&origin)), |b, (k, v)| {
            b.server(k, v)
        })
        .start();
    (origin, c)
}

/// One route to `origin` as the main of its only group.
pub fn ok_config(origin: &HttpOrigin) -> String {
    format!(
        "origins:\n  web: {{url: \"{}\"}}\ngroups:\n  g: {{main: web}}\nroutes:\n  - {{path: /, group: g}}\n",
        origin.url("")
    )
}

/// Configures and starts a [`Cascade`].
pub struct CascadeBuilder {
    yaml: String,
    /// Extra `server:` lines (each `  key: value\n`).
    server: String,
    env: Vec<(String, String)>,
    ready_timeout: Duration,
    /// Run in a private mount namespace with this file bind-mounted on `/etc/hosts`.
    hosts: Option<PathBuf>,
    /// Start the child with this open-files limit (soft, hard).
    nofile: Option<(u64, u64)>,
}

impl CascadeBuilder {
    /// Set an environment variable on the child.
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_string(), v.to_string()));
        self
    }

    /// Add `key: value` to the `server:` section the harness writes.
    pub fn server(mut self, key: &str, value: &str) -> Self {
        self.server.push_str(&format!("  {key}: {value}\n"));
        self
    }

    /// Run cascade in a private mount namespace where `hosts` is bind-mounted on `/etc/hosts`
    /// (`unshare --mount`; needs root). The file can be rewritten in place (same inode:
    /// truncate and write, see [`rewrite_in_place`]) while cascade runs, to change what its
    /// host names resolve to.
    pub fn hosts_file(mut self, hosts: &Path) -> Self {
        self.hosts = Some(hosts.to_path_buf());
        self
    }

    /// Start cascade with this open-files limit (`RLIMIT_NOFILE` soft and hard).
    pub fn nofile(mut self, soft: u64, hard: u64) -> Self {
        self.nofile = Some((soft, hard));
        self
    }

    /// Set `NAME_AK`/`NAME_SK`-style credential variables to the test keys.
    pub fn test_credentials(self, access_env: &str, secret_env: &str) -> Self {
        self.env(access_env, ACCESS_KEY).env(secret_env, SECRET_KEY)
    }

    /// Write the config, spawn `cascade run -c FILE` and wait until it accepts connections.
    pub fn start(self) -> Cascade {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let metrics_port = free_port();
        let runtime_dir = dir.path().join("run");
        // Private, as cascade requires (a group- or world-writable one is refused).
        std::fs::create_dir_all(&runtime_dir).unwrap();
        std::fs::set_permissions(&runtime_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let config = format!(
            "listen:\n  - addr: \"127.0.0.1:{port}\"\nmetrics:\n  addr: \"127.0.0.1:{metrics_port}\"\n\
             server:\n  threads: 1\n  grace_period: 1s\n  runtime_dir: \"{}\"\n{}{}\n",
            runtime_dir.display(),
            self.server,
            self.yaml
        );
        let config_path = dir.path().join("cascade.yaml");
        std::fs::write(&config_path, &config).unwrap();
        let stderr_path = dir.path().join("stderr.log");
        let stdout_path = dir.path().join("stdout.log");
        let mut cmd = match &self.hosts {
            None => Command::new(cascade_bin()),
            Some(hosts) => {
                // unshare execs sh, which execs cascade: the child's pid stays cascade's.
                let mut c = Command::new("unshare");
                c.arg("--mount")
                    .arg("sh")
                    .arg("-c")
                    .arg(r#"mount --bind "$CASCADE_TEST_HOSTS" /etc/hosts && exec "$0" "$@""#)
                    .arg(cascade_bin())
                    .env("CASCADE_TEST_HOSTS", hosts);
                c
            }
        };
        cmd.arg("run")
            .arg("-c")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(File::create(&stdout_path).unwrap())
            .stderr(File::create(&stderr_path).unwrap());
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some((soft, hard)) = self.nofile {
            use std::os::unix::process::CommandExt;
            let lim = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            // SAFETY: only setrlimit (async-signal-safe) runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("spawn cascade");
        let mut c = Cascade {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], metrics_port)),
            config,
            stderr_path,
            _dir: dir,
        };
        c.wait_ready(self.ready_timeout);
        c
    }
}

/// The admin listener's address in a config, if it has one on a literal address.
fn admin_addr(config: &str) -> Option<SocketAddr> {
    let doc: serde_yaml::Value = serde_yaml::from_str(config).ok()?;
    doc.get("admin")?.get("addr")?.as_str()?.parse().ok()
}

/// A running `cascade run` child process; killed on drop (its stderr is printed if the test
/// is panicking).
pub struct Cascade {
    child: Child,
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// The full YAML it was started with.
    pub config: String,
    stderr_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Cascade {
    /// A builder for the given `origins:`/`groups:`/`routes:` (and optional `timeouts:`) YAML;
    /// `listen`, `metrics` and `server` are added by the harness.
    pub fn builder(yaml: &str) -> CascadeBuilder {
        CascadeBuilder {
            yaml: yaml.to_string(),
            server: String::new(),
            env: Vec::new(),
            ready_timeout: Duration::from_secs(20),
            hosts: None,
            nofile: None,
        }
    }

    /// Start with no extra environment.
    pub fn start(yaml: &str) -> Cascade {
        Cascade::builder(yaml).start()
    }

    /// Waits (bounded) until every listener of the config accepts: the proxy's, the metrics
    /// one and the admin one if any (Pingora starts its services side by side, so the
    /// proxy's being up says nothing of the others: a test that went straight to the admin
    /// listener was once refused).
    fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut listeners = vec![self.addr, self.metrics_addr];
        listeners.extend(admin_addr(&self.config));
        for addr in listeners {
            self.wait_accepting(addr, deadline, timeout);
        }
    }

    fn wait_accepting(&mut self, addr: SocketAddr, deadline: Instant, timeout: Duration) {
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "cascade exited early ({status}) with config:\n{}\n--- stderr ---\n{}",
                    self.config,
                    self.stderr()
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "cascade did not accept connections on {addr} within {timeout:?}; config:\n{}\n\
                     --- stderr ---\n{}",
                    self.config,
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `http://127.0.0.1:PORT{path}`
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Everything the child wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Last `n` lines of stderr.
    pub fn stderr_tail(&self, n: usize) -> String {
        let s = self.stderr();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Process id of the child.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident set size (VmHWM) in KiB.
    pub fn vm_hwm_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM").expect("VmHWM")
    }

    /// Current resident set size (VmRSS) in KiB.
    pub fn vm_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS").expect("VmRSS")
    }

    /// Scrape `/metrics`, waiting (bounded) for the metrics listener to come up.
    pub async fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.metrics_addr);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match client().get(&url).send().await {
                Ok(r) if r.status() == StatusCode::OK => return r.text().await.unwrap(),
                other => {
                    if Instant::now() > deadline {
                        panic!(
                            "metrics endpoint {url} not answering 200: {other:?}\n--- stderr ---\n{}",
                            self.stderr_tail(50)
                        );
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Is the child still running?
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Cascade {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- cascade config ---\n{}\n--- cascade stderr (last 80 lines) ---\n{}",
                self.config,
                self.stderr_tail(80)
            );
        }
    }
}

/// A `kB` field of `/proc/PID/status` (VmHWM, VmRSS, ...).
pub fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

// ---------------------------------------------------------------------------------------------
// Metrics text
// ---------------------------------------------------------------------------------------------

/// Sum of the values of every series called `name` whose labels include all of `labels`;
/// `None` if no such series exists.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (series_name, label_text) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if series_name != name {
            continue;
        }
        let have: Vec<(&str, &str)> = label_text
            .split(',')
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.trim(), v.trim().trim_matches('"')))
            })
            .collect();
        if labels.iter().all(|l| have.contains(l)) {
            let v: f64 = value.parse().unwrap_or(0.0);
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

// ---------------------------------------------------------------------------------------------
// Large deterministic bodies
// ---------------------------------------------------------------------------------------------

/// 8 bytes of the deterministic pattern for word index `i` (splitmix64).
fn pattern_word(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `len` bytes of the pattern starting at byte `offset` (both multiples of 8).
pub fn pattern_chunk(offset: u64, len: usize) -> Bytes {
    assert!(offset % 8 == 0 && len % 8 == 0);
    let mut v = Vec::with_capacity(len);
    let first = offset / 8;
    for i in 0..(len / 8) as u64 {
        v.extend_from_slice(&pattern_word(first + i).to_le_bytes());
    }
    Bytes::from(v)
}

/// A stream of `total` pattern bytes in `chunk`-byte pieces, generated lazily.
pub fn pattern_stream(
    total: u64,
    chunk: usize,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    futures::stream::unfold(0u64, move |off| async move {
        if off >= total {
            return None;
        }
        let n = chunk.min((total - off) as usize);
        Some((Ok(pattern_chunk(off, n)), off + n as u64))
    })
}

/// Running checksum over 8-byte little-endian words; chunk boundaries do not matter.
#[derive(Debug, Default, Clone, Copy)]
pub struct Checksum {
    pub len: u64,
    hash: u64,
    pending: [u8; 8],
    npending: usize,
}

impl Checksum {
    /// Add bytes.
    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        while !data.is_empty() {
            let take = (8 - self.npending).min(data.len());
            self.pending[self.npending..self.npending + take].copy_from_slice(&data[..take]);
            self.npending += take;
            data = &data[take..];
            if self.npending == 8 {
                self.mix(u64::from_le_bytes(self.pending));
                self.npending = 0;
            }
        }
    }

    fn mix(&mut self, w: u64) {
        self.hash = (self.hash.rotate_left(5) ^ w).wrapping_mul(0x0000_0100_0000_01B3);
    }

    /// The final (length, hash), a partial last word zero-padded.
    pub fn finish(&self) -> (u64, u64) {
        let mut c = *self;
        if c.npending > 0 {
            let mut b = [0u8; 8];
            b[..c.npending].copy_from_slice(&c.pending[..c.npending]);
            c.mix(u64::from_le_bytes(b));
        }
        (c.len, c.hash)
    }
}

impl PartialEq for Checksum {
    fn eq(&self, other: &Self) -> bool {
        self.finish() == other.finish()
    }
}

impl Eq for Checksum {}

/// Checksum of the first `total` pattern bytes.
pub fn pattern_checksum(total: u64) -> Checksum {
    let mut c = Checksum::default();
    let mut off = 0;
    while off < total {
        let n = (1 << 20).min(total - off) as usize;
        c.update(&pattern_chunk(off, n));
        off += n as u64;
    }
    c
}

/// Checksum of a file, read in 1 MiB pieces.
pub fn file_checksum(path: &Path) -> std::io::Result<Checksum> {
    let mut f = File::open(path)?;
    let mut c = Checksum::default();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = f.read(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        c.update(&buf[..filled]);
        if filled < buf.len() {
            break;
        }
    }
    Ok(c)
}

/// Replace a file's content keeping its inode (truncate, then write): a bind mount of it
/// (see [`CascadeBuilder::hosts_file`]) sees the new content.
pub fn rewrite_in_place(path: &Path, content: &str) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.write_all(content.as_bytes()).unwrap();
    f.sync_all().unwrap();
}

/// Poll `f` every 50 ms until it returns true or `timeout` passes; returns the last result.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Plugins and signatures
// ---------------------------------------------------------------------------------------------

/// Builds the plugins once per test process (serialized across processes: nextest runs each
/// test in its own) and returns the path of `plugins/dist/<name>.wasm`.
pub fn wasm(name: &str) -> String {
    const ROOT: &str = env!("CARGO_MANIFEST_DIR");
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let out = Command::new("flock")
            .arg(std::env::temp_dir().join("cascade-build-plugins.lock"))
            .arg(format!("{ROOT}/scripts/build-plugins.sh"))
            .stdout(Stdio::null())
            .output()
            .expect("run scripts/build-plugins.sh");
        assert!(
            out.status.success(),
            "scripts/build-plugins.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    format!("{ROOT}/plugins/dist/{name}.wasm")
}

/// HMAC-SHA256 (RFC 2104) over SHA-256.
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |b: u8| k.iter().map(|x| x ^ b).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

// ---------------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------------

/// A real `redis-server` child on a loopback port of its own, without persistence (`--save ''
/// --appendonly no`): a restart comes back empty, as a Redis that lost its data. Killed on
/// drop.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Redis {
    /// Start on a free port and wait (bounded) until it answers `PING`.
    pub fn start() -> Redis {
        let mut r = Redis {
            port: free_port(),
            child: None,
            dir: tempfile::tempdir().unwrap(),
        };
        // The port was free a moment ago; another process may have taken it since.
        for _ in 0..5 {
            match r.spawn() {
                Ok(()) => return r,
                Err(e) if e.contains("Address already in use") => r.port = free_port(),
                Err(e) => panic!("{e}"),
            }
        }
        panic!("redis-server found no free port");
    }

    /// Start on `self.port`; `Err` with its log if it exits.
    fn spawn(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "redis is running");
        let log_path = self.dir.path().join("redis.log");
        let log = File::create(&log_path).unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn redis-server (is it installed? scripts/deps.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!(
                    "redis-server on port {} exited early ({status}):\n{}",
                    self.port,
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                ));
            }
            if self.try_cmd(&["PING"]).is_some_and(|r| r == "+PONG") {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer PING within 10 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis://127.0.0.1:PORT/0`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kill the server (SIGKILL): connections are reset, the port refuses.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on the same port (empty: nothing is persisted). Retried for a while if
    /// something else holds the port meanwhile (an outgoing connection's ephemeral port).
    pub fn restart(&mut self) {
        self.kill();
        let mut last = String::new();
        for _ in 0..20 {
            match self.spawn() {
                Ok(()) => return,
                Err(e) if e.contains("Address already in use") => last = e,
                Err(e) => panic!("{e}"),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("redis-server could not have its port back: {last}");
    }

    /// Freeze the server (SIGSTOP): it keeps its data and its port, and answers nothing.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Let a paused server go on (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("redis is running").id();
        let ok = Command::new("kill")
            .arg(sig)
            .arg(pid.to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid}");
    }

    /// One command; the reply in RESP, trimmed (`+OK`, `:3`, `$5\r\nhello`, `*2\r\n...`).
    pub fn cmd(&self, args: &[&str]) -> String {
        self.try_cmd(args)
            .unwrap_or_else(|| panic!("redis on port {} did not answer {args:?}", self.port))
    }

    fn try_cmd(&self, args: &[&str]) -> Option<String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).ok()?;
        // Replies here are small: read what arrives until a short pause after the first byte.
        let mut buf = Vec::new();
        let mut chunk = [0u8; 65536];
        loop {
            match s.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    s.set_read_timeout(Some(Duration::from_millis(50))).ok()?;
                }
                Err(_) => break,
            }
        }
        (!buf.is_empty()).then(|| String::from_utf8_lossy(&buf).trim_end().to_string())
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if self.child.is_some() {
            // A paused server would not die of SIGTERM; SIGKILL works either way.
            self.kill();
        }
    }
}

// ---- `cascade check`: config errors located in the file

/// `cascade check -c FILE` on `yaml`: exit code and stderr, bounded to 20 s.
pub fn check(yaml: &str) -> (i32, String, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cascade.yaml");
    std::fs::write(&path, yaml).unwrap();
    let err = dir.path().join("stderr");
    let mut child = Command::new(cascade_bin())
        .arg("check")
        .arg("-c")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code().unwrap_or(-1);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`cascade check` did not exit within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (code, std::fs::read_to_string(&err).unwrap(), path, dir)
}

/// `check` fails with `FILE:LINE:COL: FIELD...: ...` on the line marked `# <-`, mentioning
/// every one of `words`.
pub fn assert_located(yaml: &str, field: &str, words: &[&str]) {
    let (code, stderr, path, _dir) = check(yaml);
    let line = yaml
        .lines()
        .position(|l| l.trim_end().ends_with("# <-"))
        .expect("a `# <-` marker")
        + 1;
    let prefix = format!("{}:{line}:", path.display());
    let hit = stderr.lines().any(|l| {
        l.strip_prefix(&prefix).is_some_and(|rest| {
            let rest = rest.split_once(':').map_or("", |(_col, r)| r).trim_start();
            rest.starts_with(field) && words.iter().all(|w| l.contains(w))
        })
    });
    assert!(
        code == 1 && hit,
        "want exit 1 and `{prefix}COL: {field}...` mentioning {words:?}; exit {code}\n\
         --- config ---\n{yaml}\n--- stderr ---\n{stderr}"
    );
}

/// `GET /status` on the admin listener at `admin` with `token`, waiting (bounded) for the
/// listener to answer.
pub async fn admin_status(admin: &str, token: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client()
            .get(format!("{admin}/status"))
            .bearer_auth(token)
            .send()
            .await
        {
            Ok(r) => {
                assert_eq!(r.status(), 200, "GET /status");
                return serde_json::from_str(&r.text().await.unwrap()).unwrap();
            }
            Err(e) => assert!(Instant::now() < deadline, "admin not answering: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
