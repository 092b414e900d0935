//! The local directory origin: a folder on disk served over HTTP with the
//! semantics of an S3 bucket.
//!
//! cascade runs [`DirOrigin`] as a Pingora service (typically on a Unix socket)
//! and proxies to it like any other upstream, so a local folder can stand in
//! for an object store: for demos, as a development "staging bucket" and in
//! tests. The request path is the percent-encoded object key (the query string
//! and the Host header are ignored).
//!
//! This module owns:
//! - mapping a request path to a safe path below the root (`parse_key`):
//!   traversal (`..`, `.`, also when percent-encoded), NUL bytes, backslashes
//!   and empty segments are rejected before the filesystem is touched, and
//!   every resolved path (symlinks included) must stay inside the canonical
//!   root;
//! - `GET`/`HEAD` with streaming bodies, single byte ranges (`206`/`416`),
//!   strong ETags derived from size and mtime (like nginx), `Last-Modified` and
//!   the conditional headers (`If-Match`, `If-None-Match`,
//!   `If-Modified-Since`, `If-Unmodified-Since`, `If-Range`);
//! - atomic `PUT` (stream to a hidden `.cascade-tmp-*` file in the target
//!   directory, then rename or hard-link into place; `If-None-Match: *`);
//! - idempotent `DELETE`;
//! - S3-style XML error bodies (`NoSuchKey`, `PreconditionFailed`, ...).
//!
//! Connections are kept alive whenever the request was consumed completely, so
//! the proxy's upstream connection pool works as usual.

use std::fs::Metadata;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName};
use http::Method;
use log::{debug, warn};
use percent_encoding::percent_decode_str;
use pingora_core::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora_core::protocols::http::ServerSession;
use pingora_core::server::ShutdownWatch;
use pingora_http::ResponseHeader;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

/// Size of one read from disk (and one body chunk written to the client).
const CHUNK_SIZE: usize = 64 * 1024;
/// Read/write timeout applied to every session, so a stalled peer cannot hold
/// a task forever.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Keep-alive timeout (seconds) between requests on one connection.
const KEEPALIVE_SECS: u64 = 60;
/// Prefix of in-flight upload files; such names are never served nor writable.
const TMP_PREFIX: &str = ".cascade-tmp-";
/// Longest request body we read and discard for methods that take none, to
/// keep the connection reusable; beyond that the connection is closed.
const MAX_DISCARD: usize = 1024 * 1024;
/// S3's limit on the length of a key, in bytes.
const MAX_KEY_LEN: usize = 1024;
/// Common filesystem limit on the length of one path component, in bytes.
const MAX_SEGMENT_LEN: usize = 255;
const ALLOW_READ_ONLY: &str = "GET, HEAD";
const ALLOW_READ_WRITE: &str = "GET, HEAD, PUT, DELETE";

/// A local directory served like an S3 bucket. See the module documentation.
#[derive(Debug)]
pub struct DirOrigin {
    /// Canonical (absolute, symlink-free) root directory.
    root: PathBuf,
    /// Refuse `PUT`/`DELETE`/`POST` with `405`.
    read_only: bool,
}

impl DirOrigin {
    /// `root` must exist and be a directory (error otherwise, with the path in the message).
    pub fn new(root: &Path, read_only: bool) -> io::Result<DirOrigin> {
        let canonical = std::fs::canonicalize(root).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("directory origin root {}: {e}", root.display()),
            )
        })?;
        let meta = std::fs::metadata(&canonical).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("directory origin root {}: {e}", root.display()),
            )
        })?;
        if !meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!(
                    "directory origin root {} is not a directory",
                    root.display()
                ),
            ));
        }
        Ok(DirOrigin {
            root: canonical,
            read_only,
        })
    }
}

#[async_trait]
impl HttpServerApp for DirOrigin {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        session.set_read_timeout(Some(IO_TIMEOUT));
        session.set_write_timeout(Some(IO_TIMEOUT));
        match session.read_request().await {
            Ok(true) => {}
            // The client closed an idle keep-alive connection.
            Ok(false) => return None,
            Err(e) => {
                debug!("directory origin: cannot read request: {e}");
                return None;
            }
        }
        if *shutdown.borrow() {
            session.set_keepalive(None);
        } else if session.get_keepalive().is_some() {
            // Keep the client's choice (HTTP/1.0, `Connection: close`) but
            // bound the idle time.
            session.set_keepalive(Some(KEEPALIVE_SECS));
        }

        if !self.handle(&mut session).await {
            // The response is incomplete or the request body is in an unknown
            // state: dropping the session closes the connection.
            return None;
        }
        let persistent = HttpPersistentSettings::for_session(&session);
        match session.finish().await {
            Ok(Some(stream)) => Some(ReusedHttpStream::from_reusable_stream(stream, persistent)),
            Ok(None) => None,
            Err(e) => {
                debug!("directory origin: cannot finish session: {e}");
                None
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Request handling
// ---------------------------------------------------------------------------

impl DirOrigin {
    /// Serves one request. Returns `false` when the connection must not be
    /// reused (the response could not be written completely).
    async fn handle(&self, session: &mut ServerSession) -> bool {
        let method = session.req_header().method.clone();
        if !session.req_header().raw_path_is_utf8() {
            // The URI holds a lossy replacement of the raw bytes: it does not
            // name what the client asked for.
            discard_body(session).await;
            let reply = Reply::error(400, "InvalidURI", "Couldn't parse the specified URI.");
            return send(session, reply).await;
        }
        let path = session.req_header().uri.path().to_owned();
        let allowed = if self.read_only {
            ALLOW_READ_ONLY
        } else {
            ALLOW_READ_WRITE
        };
        match method {
            Method::GET | Method::HEAD => {
                discard_body(session).await;
                self.get(session, &path).await
            }
            Method::PUT if !self.read_only => self.put(session, &path).await,
            Method::DELETE if !self.read_only => {
                discard_body(session).await;
                self.delete(session, &path).await
            }
            Method::PUT => reject_upload(session, Reply::method_not_allowed(allowed)).await,
            _ => {
                discard_body(session).await;
                send(session, Reply::method_not_allowed(allowed)).await
            }
        }
    }

    async fn get(&self, session: &mut ServerSession, path: &str) -> bool {
        let key = match parse_key(path) {
            Ok(key) if key.class == KeyClass::Object => key,
            Ok(key) => return send(session, Reply::no_such_key(&key.key)).await,
            Err(KeyError::Empty) => return send(session, Reply::no_such_key("")).await,
            Err(KeyError::Invalid) => return send(session, Reply::invalid_uri()).await,
        };
        let (file, meta) = match self.open_object(&key.key).await {
            Ok(Some(found)) => found,
            Ok(None) => return send(session, Reply::no_such_key(&key.key)).await,
            Err(e) => return send(session, Reply::io_error(&e)).await,
        };
        let len = meta.len();
        let mtime = meta.modified().unwrap_or(UNIX_EPOCH);
        let etag = etag_for(len, mtime);
        let last_modified = httpdate::fmt_http_date(mtime);

        let conditions = Conditions {
            if_match: header_str(session, header::IF_MATCH),
            if_none_match: header_str(session, header::IF_NONE_MATCH),
            if_modified_since: header_str(session, header::IF_MODIFIED_SINCE),
            if_unmodified_since: header_str(session, header::IF_UNMODIFIED_SINCE),
        };
        match evaluate_conditions(&conditions, &etag, mtime) {
            Precondition::Proceed => {}
            Precondition::NotModified => {
                let mut reply = Reply::empty(304);
                reply.header(header::ETAG, etag);
                reply.header(header::LAST_MODIFIED, last_modified);
                return send(session, reply).await;
            }
            Precondition::Failed => return send(session, Reply::precondition_failed()).await,
        }

        let range = match header_str(session, header::RANGE) {
            Some(range) => {
                let if_range_ok = header_str(session, header::IF_RANGE)
                    .is_none_or(|v| if_range_matches(v, &etag, mtime));
                if if_range_ok {
                    parse_range(range, len)
                } else {
                    ByteRange::Full
                }
            }
            None => ByteRange::Full,
        };
        let (status, start, count) = match range {
            ByteRange::Full => (200, 0, len),
            ByteRange::Partial { start, end } => (206, start, end - start + 1),
            ByteRange::Unsatisfiable => {
                let mut reply = Reply::error(
                    416,
                    "InvalidRange",
                    "The requested range is not satisfiable",
                );
                reply.header(header::CONTENT_RANGE, format!("bytes */{len}"));
                return send(session, reply).await;
            }
        };

        let mut reply = Reply::empty(status);
        reply.header(header::CONTENT_TYPE, content_type(&key.key).to_owned());
        reply.header(header::CONTENT_LENGTH, count.to_string());
        reply.header(header::ETAG, etag);
        reply.header(header::LAST_MODIFIED, last_modified);
        reply.header(header::ACCEPT_RANGES, "bytes".to_owned());
        if status == 206 {
            let end = start + count - 1;
            reply.header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"));
        }
        let Some(resp) = reply.response_header() else {
            return send(session, Reply::internal_error()).await;
        };
        if let Err(e) = session.write_response_header(Box::new(resp)).await {
            debug!("directory origin: cannot write response header: {e}");
            return false;
        }
        if session.req_header().method == Method::HEAD || count == 0 {
            return true;
        }
        stream_file(session, file, start, count).await
    }

    async fn put(&self, session: &mut ServerSession, path: &str) -> bool {
        let create_only =
            header_str(session, header::IF_NONE_MATCH).is_some_and(|v| v.trim() == "*");
        let (dir, target) = match self.put_destination(path, create_only).await {
            Ok(destination) => destination,
            Err(reply) => return reject_upload(session, reply).await,
        };

        if is_expect_continue(session) {
            let keepalive = session.get_keepalive();
            if let Err(e) = session.write_continue_response().await {
                debug!("directory origin: cannot write 100-continue: {e}");
                return false;
            }
            // Pingora turns keep-alive off when any response header (even a
            // 1xx) goes out before the body is read. The final response will
            // follow the complete body, so the connection stays reusable.
            if keepalive.is_some() {
                session.set_keepalive(keepalive);
            }
        }

        let tmp_path = dir.join(temp_name());
        let file = match tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp_path)
            .await
        {
            Ok(file) => file,
            Err(e) => return reject_upload(session, Reply::io_error(&e)).await,
        };
        // From here on, the temp file is removed on every path (errors, client
        // disconnect, task cancellation) unless it was renamed into place.
        let mut guard = TempFile(Some(tmp_path.clone()));
        if !self.inside_root(&file) {
            return reject_upload(session, Reply::outside_root()).await;
        }

        let meta = match receive_body(session, file).await {
            Ok(meta) => meta,
            Err(UploadError::Client) => return false,
            Err(UploadError::Disk(e)) => {
                warn!("directory origin: writing {}: {e}", tmp_path.display());
                return send(session, Reply::io_error(&e)).await;
            }
        };
        let etag = etag_for(meta.len(), meta.modified().unwrap_or(UNIX_EPOCH));

        let placed = if create_only {
            // A hard link never replaces an existing name, so an object that
            // appeared while the body was uploading is not overwritten.
            match tokio::fs::hard_link(&tmp_path, &target).await {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Err(e),
                Err(e) => {
                    // The filesystem does not support hard links: fall back to
                    // check-then-rename (racy, but only against a concurrent
                    // writer of the same key).
                    debug!("directory origin: hard link unsupported ({e}), renaming");
                    match tokio::fs::symlink_metadata(&target).await {
                        Ok(_) => Ok(false),
                        Err(_) => tokio::fs::rename(&tmp_path, &target).await.map(|()| {
                            guard.disarm();
                            true
                        }),
                    }
                }
            }
        } else {
            tokio::fs::rename(&tmp_path, &target).await.map(|()| {
                guard.disarm();
                true
            })
        };
        drop(guard);
        match placed {
            Ok(true) => {
                let mut reply = Reply::empty(200);
                reply.header(header::ETAG, etag);
                reply.header(header::CONTENT_LENGTH, "0".to_owned());
                send(session, reply).await
            }
            Ok(false) => send(session, Reply::precondition_failed()).await,
            Err(e) if e.kind() == io::ErrorKind::IsADirectory => {
                send(session, Reply::conflict()).await
            }
            Err(e) => send(session, Reply::io_error(&e)).await,
        }
    }

    /// Validates a `PUT` key and prepares its directory. Returns the canonical
    /// directory and the target path in it, or the error to answer with.
    async fn put_destination(
        &self,
        path: &str,
        create_only: bool,
    ) -> Result<(PathBuf, PathBuf), Reply> {
        let key = match parse_key(path) {
            Ok(key) if key.class == KeyClass::Object => key,
            Ok(key) if key.class == KeyClass::Folder => {
                return Err(Reply::error(
                    400,
                    "InvalidArgument",
                    "An object key must not end with '/'.",
                ))
            }
            Ok(_) => {
                return Err(Reply::error(
                    400,
                    "InvalidArgument",
                    "The object key uses a reserved name.",
                ))
            }
            Err(_) => return Err(Reply::invalid_uri()),
        };
        let rel = Path::new(&key.key);
        let Some(name) = rel.file_name() else {
            return Err(Reply::invalid_uri());
        };
        let dir = match self
            .prepare_parent(rel.parent().unwrap_or(Path::new("")))
            .await
        {
            Ok(dir) => dir,
            Err(ParentError::Escapes) => return Err(Reply::outside_root()),
            Err(ParentError::NotADirectory) => return Err(Reply::conflict()),
            Err(ParentError::Io(e)) => return Err(Reply::io_error(&e)),
        };
        let target = dir.join(name);
        match tokio::fs::symlink_metadata(&target).await {
            Ok(meta) if meta.is_dir() => Err(Reply::conflict()),
            Ok(_) if create_only => Err(Reply::precondition_failed()),
            Ok(_) => Ok((dir, target)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok((dir, target)),
            Err(e) => Err(Reply::io_error(&e)),
        }
    }

    async fn delete(&self, session: &mut ServerSession, path: &str) -> bool {
        let key = match parse_key(path) {
            Ok(key) if key.class == KeyClass::Object => key,
            // A folder or a temp file is never an object: nothing to delete.
            Ok(_) => return send(session, Reply::empty(204)).await,
            Err(_) => return send(session, Reply::invalid_uri()).await,
        };
        let rel = Path::new(&key.key);
        let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
            return send(session, Reply::invalid_uri()).await;
        };
        // Resolve the parent (following symlinks) and make sure it is inside
        // the root; the last component itself is never followed, so deleting
        // a symlink removes the link, not its target.
        let dir = match tokio::fs::canonicalize(self.root.join(parent)).await {
            Ok(dir) if dir.starts_with(&self.root) => dir,
            Ok(_) => return send(session, Reply::empty(204)).await,
            Err(e) if is_missing(&e) => return send(session, Reply::empty(204)).await,
            Err(e) => return send(session, Reply::io_error(&e)).await,
        };
        if is_reserved_path(&self.root, &dir) {
            return send(session, Reply::empty(204)).await;
        }
        let target = dir.join(name);
        let result = match tokio::fs::symlink_metadata(&target).await {
            Ok(meta) if meta.is_dir() => Ok(()),
            Ok(_) => tokio::fs::remove_file(&target).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => send(session, Reply::empty(204)).await,
            Err(e) if is_missing(&e) => send(session, Reply::empty(204)).await,
            Err(e) => send(session, Reply::io_error(&e)).await,
        }
    }

    /// Opens the regular file named by a validated key. `Ok(None)` when it does
    /// not exist, is not a regular file, is an upload in progress, or resolves
    /// (through symlinks) outside the root.
    async fn open_object(&self, key: &str) -> io::Result<Option<(tokio::fs::File, Metadata)>> {
        let canonical = match tokio::fs::canonicalize(self.root.join(key)).await {
            Ok(path) => path,
            Err(e) if is_missing(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        if !canonical.starts_with(&self.root) || is_reserved_path(&self.root, &canonical) {
            return Ok(None);
        }
        // Check the type before opening: opening a FIFO would block.
        match tokio::fs::metadata(&canonical).await {
            Ok(meta) if meta.is_file() => {}
            Ok(_) => return Ok(None),
            Err(e) if is_missing(&e) => return Ok(None),
            Err(e) => return Err(e),
        }
        let file = match tokio::fs::File::open(&canonical).await {
            Ok(file) => file,
            Err(e) if is_missing(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        if !self.inside_root(&file) {
            return Ok(None);
        }
        let meta = file.metadata().await?;
        if !meta.is_file() {
            return Ok(None);
        }
        Ok(Some((file, meta)))
    }

    /// Defence in depth against a path being swapped for a symlink between
    /// the checks and the `open`: on Linux, ask the kernel where the opened
    /// file really is. Elsewhere (or without `/proc`) this trusts the checks
    /// already made.
    fn inside_root(&self, file: &tokio::fs::File) -> bool {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let link = format!("/proc/self/fd/{}", file.as_raw_fd());
            if let Ok(actual) = std::fs::read_link(link) {
                return actual.starts_with(&self.root);
            }
        }
        let _ = file;
        true
    }

    /// Creates the directories of `parent` (relative to the root) one at a
    /// time and returns the canonical directory. A component that is a symlink
    /// is followed only when it resolves to a directory inside the root, so
    /// nothing is ever created outside it.
    async fn prepare_parent(&self, parent: &Path) -> Result<PathBuf, ParentError> {
        let mut dir = self.root.clone();
        for component in parent.components() {
            let Component::Normal(name) = component else {
                return Err(ParentError::Escapes);
            };
            let next = dir.join(name);
            let mut attempts = 0;
            dir = loop {
                attempts += 1;
                match tokio::fs::symlink_metadata(&next).await {
                    Ok(meta) if meta.is_dir() => break next,
                    Ok(meta) if meta.file_type().is_symlink() => {
                        let resolved = match tokio::fs::canonicalize(&next).await {
                            Ok(resolved) => resolved,
                            Err(e) if is_missing(&e) => return Err(ParentError::NotADirectory),
                            Err(e) => return Err(ParentError::Io(e)),
                        };
                        if !resolved.starts_with(&self.root) {
                            return Err(ParentError::Escapes);
                        }
                        if is_reserved_path(&self.root, &resolved) {
                            return Err(ParentError::NotADirectory);
                        }
                        match tokio::fs::metadata(&resolved).await {
                            Ok(meta) if meta.is_dir() => break resolved,
                            Ok(_) => return Err(ParentError::NotADirectory),
                            Err(e) => return Err(ParentError::Io(e)),
                        }
                    }
                    Ok(_) => return Err(ParentError::NotADirectory),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        match tokio::fs::create_dir(&next).await {
                            Ok(()) => break next,
                            // Created concurrently: look again (once).
                            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 2 => {
                                continue
                            }
                            Err(e) => return Err(ParentError::Io(e)),
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotADirectory => {
                        return Err(ParentError::NotADirectory)
                    }
                    Err(e) => return Err(ParentError::Io(e)),
                }
            };
        }
        Ok(dir)
    }
}

enum ParentError {
    /// A symlink leads outside the root.
    Escapes,
    /// A component exists but is not a directory.
    NotADirectory,
    Io(io::Error),
}

enum UploadError {
    /// The client went away or sent a malformed body: drop the connection.
    Client,
    /// Writing to disk failed: answer 500.
    Disk(io::Error),
}

/// Streams the request body into `file` and returns its final metadata.
async fn receive_body(
    session: &mut ServerSession,
    mut file: tokio::fs::File,
) -> Result<Metadata, UploadError> {
    loop {
        match session.read_request_body().await {
            Ok(Some(data)) => file.write_all(&data).await.map_err(UploadError::Disk)?,
            Ok(None) => break,
            Err(e) => {
                debug!("directory origin: upload aborted: {e}");
                return Err(UploadError::Client);
            }
        }
    }
    file.flush().await.map_err(UploadError::Disk)?;
    file.sync_data().await.map_err(UploadError::Disk)?;
    file.metadata().await.map_err(UploadError::Disk)
}

/// Streams `count` bytes of `file` from `start` as the response body.
async fn stream_file(
    session: &mut ServerSession,
    mut file: tokio::fs::File,
    start: u64,
    count: u64,
) -> bool {
    if start > 0 {
        if let Err(e) = file.seek(io::SeekFrom::Start(start)).await {
            warn!("directory origin: seek failed: {e}");
            return false;
        }
    }
    let mut remaining = count;
    while remaining > 0 {
        let want = remaining.min(CHUNK_SIZE as u64);
        let mut buf = BytesMut::with_capacity(want as usize);
        match (&mut file).take(want).read_buf(&mut buf).await {
            Ok(0) => {
                // The file shrank after the headers were sent: the response
                // cannot be completed, close the connection.
                warn!("directory origin: file truncated while being served");
                return false;
            }
            Ok(n) => remaining -= n as u64,
            Err(e) => {
                warn!("directory origin: read failed: {e}");
                return false;
            }
        }
        if let Err(e) = session
            .write_response_body(buf.freeze(), remaining == 0)
            .await
        {
            debug!("directory origin: cannot write body: {e}");
            return false;
        }
    }
    true
}

/// Answers a `PUT` without storing its body. A small body is read and dropped
/// so the connection stays reusable; a large one (or one the client holds back
/// until `100 Continue`) is left unread, and Pingora then closes the
/// connection after the response.
async fn reject_upload(session: &mut ServerSession, reply: Reply) -> bool {
    if !is_expect_continue(session) {
        discard_body(session).await;
    }
    send(session, reply).await
}

/// Reads and drops a (small) request body nobody asked for, so that the
/// connection stays usable. A larger body is left unread; Pingora then closes
/// the connection after the response.
async fn discard_body(session: &mut ServerSession) {
    if session.is_body_empty() {
        return;
    }
    let declared =
        header_str(session, header::CONTENT_LENGTH).and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_DISCARD as u64) {
        return;
    }
    let mut total = 0;
    while total <= MAX_DISCARD {
        match session.read_request_body().await {
            Ok(Some(data)) => total += data.len(),
            Ok(None) | Err(_) => return,
        }
    }
}

/// Removes the temp file when dropped, unless disarmed.
struct TempFile(Option<PathBuf>);

impl TempFile {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != io::ErrorKind::NotFound {
                    warn!("directory origin: cannot remove {}: {e}", path.display());
                }
            }
        }
    }
}

fn temp_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{TMP_PREFIX}{}-{n}-{nanos:x}", std::process::id())
}

fn header_str(session: &ServerSession, name: HeaderName) -> Option<&str> {
    session.get_header(name).and_then(|v| v.to_str().ok())
}

fn is_expect_continue(session: &ServerSession) -> bool {
    header_str(session, header::EXPECT)
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("100-continue"))
}

fn content_type(key: &str) -> &'static str {
    mime_guess::from_path(key)
        .first_raw()
        .unwrap_or("application/octet-stream")
}

/// Errors that mean "there is no such file": missing, a path component that is
/// not a directory, a symlink loop, a name too long.
fn is_missing(e: &io::Error) -> bool {
    if matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    ) {
        return true;
    }
    #[cfg(target_os = "linux")]
    const LOOP_OR_TOO_LONG: [i32; 2] = [40, 36]; // ELOOP, ENAMETOOLONG
    #[cfg(target_os = "macos")]
    const LOOP_OR_TOO_LONG: [i32; 2] = [62, 63]; // ELOOP, ENAMETOOLONG
    #[cfg(not(any(target_os = "linux", target_os = "macos")))]
    const LOOP_OR_TOO_LONG: [i32; 0] = [];
    e.raw_os_error()
        .is_some_and(|code| LOOP_OR_TOO_LONG.contains(&code))
}

/// Whether a canonical path below `root` goes through a temp upload file.
fn is_reserved_path(root: &Path, path: &Path) -> bool {
    path.strip_prefix(root).is_ok_and(|rel| {
        rel.components().any(|c| {
            c.as_os_str()
                .as_encoded_bytes()
                .starts_with(TMP_PREFIX.as_bytes())
        })
    })
}

// ---------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------

/// A response whose body fits in memory (errors, empty responses).
struct Reply {
    status: u16,
    headers: Vec<(HeaderName, String)>,
    body: Bytes,
}

impl Reply {
    fn empty(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    fn header(&mut self, name: HeaderName, value: String) {
        self.headers.push((name, value));
    }

    /// An S3-style XML error.
    fn error(status: u16, code: &str, message: &str) -> Reply {
        Reply::xml(status, error_xml(code, message, None))
    }

    fn xml(status: u16, body: String) -> Reply {
        let mut reply = Reply::empty(status);
        reply.header(header::CONTENT_TYPE, "application/xml".to_owned());
        reply.header(header::CONTENT_LENGTH, body.len().to_string());
        reply.body = Bytes::from(body);
        reply
    }

    fn no_such_key(key: &str) -> Reply {
        Reply::xml(
            404,
            error_xml("NoSuchKey", "The specified key does not exist.", Some(key)),
        )
    }

    fn invalid_uri() -> Reply {
        Reply::error(400, "InvalidURI", "Couldn't parse the specified URI.")
    }

    fn precondition_failed() -> Reply {
        Reply::error(
            412,
            "PreconditionFailed",
            "At least one of the pre-conditions you specified did not hold",
        )
    }

    fn outside_root() -> Reply {
        Reply::error(403, "AccessDenied", "The key resolves outside the bucket.")
    }

    fn conflict() -> Reply {
        Reply::error(
            409,
            "InvalidRequest",
            "The key conflicts with an existing directory or file.",
        )
    }

    fn method_not_allowed(allow: &str) -> Reply {
        let mut reply = Reply::error(
            405,
            "MethodNotAllowed",
            "The specified method is not allowed against this resource.",
        );
        reply.header(header::ALLOW, allow.to_owned());
        reply
    }

    fn internal_error() -> Reply {
        Reply::error(500, "InternalError", "We encountered an internal error.")
    }

    fn io_error(e: &io::Error) -> Reply {
        if e.kind() == io::ErrorKind::PermissionDenied {
            Reply::error(403, "AccessDenied", "Access Denied")
        } else {
            warn!("directory origin: I/O error: {e}");
            Reply::internal_error()
        }
    }

    fn response_header(&self) -> Option<ResponseHeader> {
        let mut resp = ResponseHeader::build(self.status, Some(self.headers.len() + 2)).ok()?;
        for (name, value) in &self.headers {
            resp.insert_header(name.clone(), value.as_str()).ok()?;
        }
        Some(resp)
    }
}

/// Writes a complete in-memory response. Returns `false` when the connection
/// is unusable.
async fn send(session: &mut ServerSession, reply: Reply) -> bool {
    let resp = match reply.response_header() {
        Some(resp) => resp,
        None => match Reply::internal_error().response_header() {
            Some(resp) => resp,
            None => return false,
        },
    };
    if let Err(e) = session.write_response_header(Box::new(resp)).await {
        debug!("directory origin: cannot write response header: {e}");
        return false;
    }
    let no_body = session.req_header().method == Method::HEAD
        || matches!(reply.status, 204 | 304)
        || reply.body.is_empty();
    if !no_body {
        if let Err(e) = session.write_response_body(reply.body, true).await {
            debug!("directory origin: cannot write response body: {e}");
            return false;
        }
    }
    true
}

fn error_xml(code: &str, message: &str, key: Option<&str>) -> String {
    let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>");
    xml.push_str(&xml_escape(code));
    xml.push_str("</Code><Message>");
    xml.push_str(&xml_escape(message));
    xml.push_str("</Message>");
    if let Some(key) = key {
        xml.push_str("<Key>");
        xml.push_str(&xml_escape(key));
        xml.push_str("</Key>");
    }
    xml.push_str("</Error>");
    xml
}

/// Escapes text for XML 1.0 character data; characters XML 1.0 cannot carry
/// at all (most control characters) become U+FFFD.
pub(crate) fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if c < ' ' || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Pure parts: key validation, ranges, validators, preconditions
// ---------------------------------------------------------------------------

/// A decoded, validated object key: relative, `/`-separated, no empty, `.` or
/// `..` segments, no NUL or backslash. Joining it to the root cannot leave
/// the root lexically (symlinks are checked separately).
#[derive(Debug, Clone, PartialEq, Eq)]
struct ObjectKey {
    /// The decoded key, without the leading `/`.
    key: String,
    class: KeyClass,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyClass {
    /// Names a (possible) object.
    Object,
    /// Ends with `/`: a "folder", never an object here.
    Folder,
    /// Goes through an in-flight upload file (`.cascade-tmp-*`).
    Reserved,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyError {
    /// The path is `/`: no key at all.
    Empty,
    /// The path cannot name an object under the root.
    Invalid,
}

/// Turns a request path (percent-encoded, leading `/`, optional query) into a
/// validated key. Decoding happens exactly once, and validation runs on the
/// decoded text, so `%2e%2e` and `%2F..` are caught like `..`.
fn parse_key(path: &str) -> Result<ObjectKey, KeyError> {
    let path = path.split_once('?').map_or(path, |(path, _query)| path);
    let encoded = path.strip_prefix('/').ok_or(KeyError::Invalid)?;
    let decoded: Vec<u8> = percent_decode_str(encoded).collect();
    let key = String::from_utf8(decoded).map_err(|_| KeyError::Invalid)?;
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > MAX_KEY_LEN || key.contains(['\0', '\\']) {
        return Err(KeyError::Invalid);
    }
    let (body, folder) = match key.strip_suffix('/') {
        Some(body) => (body, true),
        None => (key.as_str(), false),
    };
    let mut reserved = false;
    for segment in body.split('/') {
        if segment.is_empty()
            || segment == "."
            || segment == ".."
            || segment.len() > MAX_SEGMENT_LEN
        {
            return Err(KeyError::Invalid);
        }
        reserved |= segment.starts_with(TMP_PREFIX);
    }
    // Belt and braces: the key must be a plain relative path.
    if !Path::new(body)
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(KeyError::Invalid);
    }
    let class = if reserved {
        KeyClass::Reserved
    } else if folder {
        KeyClass::Folder
    } else {
        KeyClass::Object
    };
    Ok(ObjectKey { key, class })
}

/// The outcome of a `Range` header against a representation of known length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ByteRange {
    /// Serve everything (no range, or a range we ignore: malformed, multiple
    /// ranges, another unit).
    Full,
    /// Serve `start..=end` (inclusive, `end < len`).
    Partial { start: u64, end: u64 },
    /// `416`.
    Unsatisfiable,
}

/// Parses a single-range `Range` header (`bytes=a-b`, `bytes=a-`, `bytes=-n`).
fn parse_range(value: &str, len: u64) -> ByteRange {
    let Some((unit, spec)) = value.trim().split_once('=') else {
        return ByteRange::Full;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") || spec.contains(',') {
        return ByteRange::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return ByteRange::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        // Suffix range: the last `n` bytes.
        let Some(n) = parse_digits(last) else {
            return ByteRange::Full;
        };
        if n == 0 || len == 0 {
            return ByteRange::Unsatisfiable;
        }
        return ByteRange::Partial {
            start: len.saturating_sub(n),
            end: len - 1,
        };
    }
    let Some(start) = parse_digits(first) else {
        return ByteRange::Full;
    };
    let end = if last.is_empty() {
        u64::MAX
    } else {
        match parse_digits(last) {
            Some(end) => end,
            None => return ByteRange::Full,
        }
    };
    if end < start {
        return ByteRange::Full;
    }
    if start >= len {
        return ByteRange::Unsatisfiable;
    }
    ByteRange::Partial {
        start,
        end: end.min(len - 1),
    }
}

/// ASCII digits only (no sign, no spaces); saturates instead of overflowing.
fn parse_digits(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(text.bytes().fold(0u64, |acc, b| {
        acc.saturating_mul(10).saturating_add(u64::from(b - b'0'))
    }))
}

/// A strong ETag from size and modification time in nanoseconds, like nginx
/// (`"<mtime hex>-<size hex>"`, nginx uses seconds). Cheap: no hashing.
fn etag_for(len: u64, mtime: SystemTime) -> String {
    let nanos = match mtime.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos(),
        Err(e) => e.duration().as_nanos(),
    };
    format!("\"{nanos:x}-{len:x}\"")
}

/// Whole seconds since the epoch (HTTP dates have one-second resolution).
fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Whether an `If-Match`/`If-None-Match` list matches `etag`. `*` matches any
/// existing representation. Weak comparison ignores `W/`; strong comparison
/// never matches a weak tag.
fn etag_list_matches(list: &str, etag: &str, strong: bool) -> bool {
    let list = list.trim();
    if list == "*" {
        return true;
    }
    list.split(',')
        .map(str::trim)
        .filter(|tag| !tag.is_empty())
        .any(|tag| match tag.strip_prefix("W/") {
            Some(weak_tag) => !strong && weak_tag == etag,
            None => tag == etag,
        })
}

/// The conditional request headers of a `GET`/`HEAD`.
#[derive(Debug, Default, Clone, Copy)]
struct Conditions<'a> {
    if_match: Option<&'a str>,
    if_none_match: Option<&'a str>,
    if_modified_since: Option<&'a str>,
    if_unmodified_since: Option<&'a str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Precondition {
    Proceed,
    /// `304`.
    NotModified,
    /// `412`.
    Failed,
}

/// Evaluates preconditions in the order of RFC 9110 §13.2.2 for a `GET` or
/// `HEAD` of an existing object. `If-None-Match` takes precedence over
/// `If-Modified-Since`, `If-Match` over `If-Unmodified-Since`; unparsable dates
/// are ignored.
fn evaluate_conditions(c: &Conditions<'_>, etag: &str, mtime: SystemTime) -> Precondition {
    let modified = unix_secs(mtime);
    if let Some(list) = c.if_match {
        if !etag_list_matches(list, etag, true) {
            return Precondition::Failed;
        }
    } else if let Some(Ok(date)) = c.if_unmodified_since.map(httpdate::parse_http_date) {
        if modified > unix_secs(date) {
            return Precondition::Failed;
        }
    }
    if let Some(list) = c.if_none_match {
        if etag_list_matches(list, etag, false) {
            return Precondition::NotModified;
        }
    } else if let Some(Ok(date)) = c.if_modified_since.map(httpdate::parse_http_date) {
        if modified <= unix_secs(date) {
            return Precondition::NotModified;
        }
    }
    Precondition::Proceed
}

/// `If-Range`: the range applies only if the validator still matches (strong
/// ETag comparison, or the exact `Last-Modified` date).
fn if_range_matches(value: &str, etag: &str, mtime: SystemTime) -> bool {
    let value = value.trim();
    if value.starts_with('"') || value.starts_with("W/") {
        return value == etag;
    }
    httpdate::parse_http_date(value).is_ok_and(|date| unix_secs(date) == unix_secs(mtime))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::{UnixListener, UnixStream};
    use tokio::sync::watch;

    // -- pure functions -----------------------------------------------------

    #[test]
    fn parse_key_accepts_and_decodes() {
        use KeyClass::*;
        let cases: &[(&str, &str, KeyClass)] = &[
            ("/a", "a", Object),
            ("/photos/a%20b.jpg", "photos/a b.jpg", Object),
            ("/photos/a%20b.jpg?versionId=x", "photos/a b.jpg", Object),
            ("/%C3%A9t%C3%A9/%E2%9C%93.txt", "été/✓.txt", Object),
            ("/a%2Fb", "a/b", Object),
            ("/a+b", "a+b", Object),
            ("/%252e%252e/x", "%2e%2e/x", Object),
            ("/.../x", ".../x", Object),
            ("/a..b/.c", "a..b/.c", Object),
            ("/.hidden", ".hidden", Object),
            ("/dir/", "dir/", Folder),
            ("/a/b%2F", "a/b/", Folder),
            ("/.cascade-tmp-1-2-3", ".cascade-tmp-1-2-3", Reserved),
            ("/d/.cascade-tmp-x/y", "d/.cascade-tmp-x/y", Reserved),
            ("/%2Ecascade-tmp-x", ".cascade-tmp-x", Reserved),
        ];
        for (path, key, class) in cases {
            let parsed = parse_key(path).unwrap_or_else(|e| panic!("{path}: {e:?}"));
            assert_eq!(parsed.key, *key, "{path}");
            assert_eq!(parsed.class, *class, "{path}");
        }
    }

    #[test]
    fn parse_key_rejects_traversal_and_junk() {
        let long_key = format!("/{}", "a/".repeat(600));
        let long_segment = format!("/{}", "x".repeat(MAX_SEGMENT_LEN + 1));
        let invalid: &[&str] = &[
            "/../etc/passwd",
            "/..",
            "/../",
            "/a/..",
            "/a/../b",
            "/%2e%2e/x",
            "/%2E%2E",
            "/a/%2E%2E/%2e%2e/x",
            "/.%2e/x",
            "/%2e./x",
            "/a/%2e",
            "/./a",
            "/a/./b",
            "/.",
            "/%2F..",
            "/%2f../x",
            "/a%2F..%2F..%2Fetc%2Fpasswd",
            "/a%2F%2E%2E",
            "/a%00b",
            "/a%00",
            "/a\\b",
            "/a%5Cb",
            "/a%5c..%5cb",
            "/..%5Cx",
            "//",
            "//a",
            "/a//b",
            "/%2F",
            "/%2Fetc/passwd",
            "/a%2F%2Fb",
            "/%ff",
            "/%C3",
            "relative",
            "",
            long_key.as_str(),
            long_segment.as_str(),
        ];
        for path in invalid {
            assert_eq!(parse_key(path), Err(KeyError::Invalid), "{path:?}");
        }
        assert_eq!(parse_key("/"), Err(KeyError::Empty));
        assert_eq!(parse_key("/?list-type=2"), Err(KeyError::Empty));
    }

    #[test]
    fn parsed_keys_stay_below_the_root() {
        for path in ["/a", "/a/b/c.txt", "/x%2Fy", "/...", "/a..b"] {
            let key = parse_key(path).unwrap();
            let joined = Path::new("/root").join(&key.key);
            assert!(joined.starts_with("/root"), "{path}");
            assert!(Path::new(&key.key)
                .components()
                .all(|c| matches!(c, Component::Normal(_))));
        }
    }

    #[test]
    fn parse_range_table() {
        use ByteRange::*;
        let p = |start, end| Partial { start, end };
        let cases: &[(&str, u64, ByteRange)] = &[
            ("bytes=0-9", 100, p(0, 9)),
            ("bytes=0-0", 100, p(0, 0)),
            ("bytes=90-", 100, p(90, 99)),
            ("bytes=99-", 100, p(99, 99)),
            ("bytes=-10", 100, p(90, 99)),
            ("bytes=-100", 100, p(0, 99)),
            ("bytes=-200", 100, p(0, 99)),
            ("bytes=50-500", 100, p(50, 99)),
            ("BYTES=1-2", 100, p(1, 2)),
            (" bytes = 1-2 ", 100, p(1, 2)),
            ("bytes=0-99999999999999999999999", 100, p(0, 99)),
            ("bytes=-99999999999999999999999", 100, p(0, 99)),
            ("bytes=100-", 100, Unsatisfiable),
            ("bytes=100-200", 100, Unsatisfiable),
            ("bytes=99999999999999999999999-", 100, Unsatisfiable),
            ("bytes=-0", 100, Unsatisfiable),
            ("bytes=0-", 0, Unsatisfiable),
            ("bytes=-5", 0, Unsatisfiable),
            ("bytes=5-1", 100, Full),
            ("bytes=0-1,3-4", 100, Full),
            ("bytes=0-1,", 100, Full),
            ("bytes=", 100, Full),
            ("bytes=-", 100, Full),
            ("bytes=abc", 100, Full),
            ("bytes=1-2-3", 100, Full),
            ("bytes=+1-2", 100, Full),
            ("bytes=1--2", 100, Full),
            ("bytes=0x10-", 100, Full),
            ("items=0-1", 100, Full),
            ("bytes 0-1", 100, Full),
            ("", 100, Full),
        ];
        for (header, len, expected) in cases {
            assert_eq!(parse_range(header, *len), *expected, "{header:?} len={len}");
        }
    }

    #[test]
    fn etag_is_strong_quoted_and_changes_with_size_and_mtime() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        let etag = etag_for(1234, t);
        assert!(etag.starts_with('"') && etag.ends_with('"'));
        assert!(!etag.starts_with("W/"));
        assert_eq!(etag, etag_for(1234, t));
        assert_eq!(
            etag,
            format!("\"{:x}-{:x}\"", 1_700_000_000_123_456_789u128, 1234)
        );
        assert_ne!(etag, etag_for(1235, t));
        assert_ne!(etag, etag_for(1234, t + Duration::from_nanos(1)));
        assert_eq!(etag_for(0, UNIX_EPOCH), "\"0-0\"");
    }

    #[test]
    fn etag_lists() {
        let e = "\"abc-1\"";
        let cases: &[(&str, bool, bool)] = &[
            // (list, weak match, strong match)
            ("\"abc-1\"", true, true),
            ("*", true, true),
            (" * ", true, true),
            ("W/\"abc-1\"", true, false),
            ("\"x\", \"abc-1\"", true, true),
            ("\"x\",W/\"abc-1\"", true, false),
            ("\"x\"", false, false),
            ("abc-1", false, false),
            ("", false, false),
            ("\"abc-1", false, false),
        ];
        for (list, weak, strong) in cases {
            assert_eq!(etag_list_matches(list, e, false), *weak, "weak {list:?}");
            assert_eq!(etag_list_matches(list, e, true), *strong, "strong {list:?}");
        }
    }

    #[test]
    fn conditions_table() {
        use Precondition::*;
        let mtime = UNIX_EPOCH + Duration::new(1_700_000_000, 500_000_000);
        let etag = etag_for(10, mtime);
        let same = httpdate::fmt_http_date(mtime);
        let before = httpdate::fmt_http_date(mtime - Duration::from_secs(10));
        let after = httpdate::fmt_http_date(mtime + Duration::from_secs(10));
        let none = Conditions::default();
        let cases: Vec<(Conditions<'_>, Precondition)> = vec![
            (none, Proceed),
            (
                Conditions {
                    if_none_match: Some(&etag),
                    ..none
                },
                NotModified,
            ),
            (
                Conditions {
                    if_none_match: Some("*"),
                    ..none
                },
                NotModified,
            ),
            (
                Conditions {
                    if_none_match: Some("W/\"x\", \"y\""),
                    ..none
                },
                Proceed,
            ),
            (
                Conditions {
                    if_modified_since: Some(&same),
                    ..none
                },
                NotModified,
            ),
            (
                Conditions {
                    if_modified_since: Some(&after),
                    ..none
                },
                NotModified,
            ),
            (
                Conditions {
                    if_modified_since: Some(&before),
                    ..none
                },
                Proceed,
            ),
            (
                Conditions {
                    if_modified_since: Some("garbage"),
                    ..none
                },
                Proceed,
            ),
            // If-None-Match takes precedence over If-Modified-Since.
            (
                Conditions {
                    if_none_match: Some("\"other\""),
                    if_modified_since: Some(&after),
                    ..none
                },
                Proceed,
            ),
            (
                Conditions {
                    if_none_match: Some(&etag),
                    if_modified_since: Some(&before),
                    ..none
                },
                NotModified,
            ),
            (
                Conditions {
                    if_match: Some(&etag),
                    ..none
                },
                Proceed,
            ),
            (
                Conditions {
                    if_match: Some("*"),
                    ..none
                },
                Proceed,
            ),
            (
                Conditions {
                    if_match: Some("\"other\""),
                    ..none
                },
                Failed,
            ),
            (
                Conditions {
                    if_unmodified_since: Some(&before),
                    ..none
                },
                Failed,
            ),
            (
                Conditions {
                    if_unmodified_since: Some(&same),
                    ..none
                },
                Proceed,
            ),
            (
                Conditions {
                    if_unmodified_since: Some("garbage"),
                    ..none
                },
                Proceed,
            ),
            // If-Match takes precedence over If-Unmodified-Since.
            (
                Conditions {
                    if_match: Some(&etag),
                    if_unmodified_since: Some(&before),
                    ..none
                },
                Proceed,
            ),
            (
                Conditions {
                    if_match: Some("\"other\""),
                    if_none_match: Some(&etag),
                    ..none
                },
                Failed,
            ),
        ];
        for (i, (conditions, expected)) in cases.iter().enumerate() {
            assert_eq!(
                evaluate_conditions(conditions, &etag, mtime),
                *expected,
                "case {i}: {conditions:?}"
            );
        }
    }

    #[test]
    fn if_range_table() {
        let mtime = UNIX_EPOCH + Duration::new(1_700_000_000, 1);
        let etag = etag_for(10, mtime);
        assert!(if_range_matches(&etag, &etag, mtime));
        assert!(!if_range_matches(&format!("W/{etag}"), &etag, mtime));
        assert!(!if_range_matches("\"other\"", &etag, mtime));
        assert!(if_range_matches(
            &httpdate::fmt_http_date(mtime),
            &etag,
            mtime
        ));
        let later = httpdate::fmt_http_date(mtime + Duration::from_secs(5));
        assert!(!if_range_matches(&later, &etag, mtime));
        assert!(!if_range_matches("garbage", &etag, mtime));
    }

    #[test]
    fn xml_is_escaped() {
        assert_eq!(
            error_xml("NoSuchKey", "m", Some("a&b<c>\"'\u{1}")),
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>NoSuchKey</Code>\
             <Message>m</Message><Key>a&amp;b&lt;c&gt;&quot;&apos;\u{FFFD}</Key></Error>"
        );
    }

    #[test]
    fn reserved_paths() {
        let root = Path::new("/r");
        assert!(is_reserved_path(root, Path::new("/r/.cascade-tmp-1")));
        assert!(is_reserved_path(root, Path::new("/r/a/.cascade-tmp-1/b")));
        assert!(!is_reserved_path(root, Path::new("/r/a/b")));
        assert!(!is_reserved_path(root, Path::new("/r/x.cascade-tmp-1")));
    }

    #[test]
    fn new_requires_an_existing_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("missing");
        let err = DirOrigin::new(&missing, false).unwrap_err();
        assert!(
            err.to_string().contains(&*missing.to_string_lossy()),
            "{err}"
        );
        let file = tmp.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let err = DirOrigin::new(&file, false).unwrap_err();
        assert!(err.to_string().contains(&*file.to_string_lossy()), "{err}");
        let origin = DirOrigin::new(tmp.path(), true).unwrap();
        assert_eq!(origin.root, std::fs::canonicalize(tmp.path()).unwrap());
        assert!(origin.read_only);
    }

    // -- over a real socket -------------------------------------------------

    /// A running origin on a Unix socket, served by Pingora's own
    /// `ServerApp` loop (keep-alive included), as in production.
    struct Harness {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        outside: PathBuf,
        socket: PathBuf,
        _shutdown: watch::Sender<bool>,
    }

    async fn start(read_only: bool) -> Harness {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("bucket");
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir(&outside).unwrap();
        let socket = tmp.path().join("origin.sock");
        let app = Arc::new(DirOrigin::new(&root, read_only).unwrap());
        let listener = UnixListener::bind(&socket).unwrap();
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let app = app.clone();
                let rx = rx.clone();
                tokio::spawn(async move {
                    let stream: pingora_core::protocols::Stream =
                        Box::new(pingora_core::protocols::l4::stream::Stream::from(conn));
                    pingora_core::apps::ServerApp::process_new(&app, stream, &rx).await;
                });
            }
        });
        Harness {
            root: std::fs::canonicalize(&root).unwrap(),
            outside,
            _tmp: tmp,
            socket,
            _shutdown: tx,
        }
    }

    #[derive(Debug)]
    struct Resp {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Resp {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
        fn text(&self) -> &str {
            std::str::from_utf8(&self.body).unwrap()
        }
    }

    struct Client {
        io: BufReader<UnixStream>,
    }

    impl Harness {
        async fn connect(&self) -> Client {
            Client {
                io: BufReader::new(UnixStream::connect(&self.socket).await.unwrap()),
            }
        }

        /// One request on a fresh connection.
        async fn once(
            &self,
            method: &str,
            path: &str,
            headers: &[(&str, &str)],
            body: &[u8],
        ) -> Resp {
            self.connect()
                .await
                .request(method, path, headers, body)
                .await
        }

        async fn wait_for_temp_file(&self) {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while self.temp_files().is_empty() {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no upload in flight"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        fn temp_files(&self) -> Vec<PathBuf> {
            fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
                for entry in std::fs::read_dir(dir).unwrap() {
                    let entry = entry.unwrap();
                    let path = entry.path();
                    if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                        out.push(path.clone());
                    }
                    if entry.file_type().unwrap().is_dir() {
                        walk(&path, out);
                    }
                }
            }
            let mut out = Vec::new();
            walk(&self.root, &mut out);
            out
        }
    }

    impl Client {
        async fn send_raw(&mut self, raw: &[u8]) {
            self.io.get_mut().write_all(raw).await.unwrap();
        }

        async fn request(
            &mut self,
            method: &str,
            path: &str,
            headers: &[(&str, &str)],
            body: &[u8],
        ) -> Resp {
            let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: any.example\r\n");
            for (name, value) in headers {
                raw.push_str(&format!("{name}: {value}\r\n"));
            }
            if !body.is_empty() || method == "PUT" {
                raw.push_str(&format!("Content-Length: {}\r\n", body.len()));
            }
            raw.push_str("\r\n");
            let mut raw = raw.into_bytes();
            raw.extend_from_slice(body);
            self.send_raw(&raw).await;
            self.read_response(method == "HEAD").await
        }

        async fn read_response(&mut self, head: bool) -> Resp {
            let read = async {
                let mut line = String::new();
                self.io.read_line(&mut line).await.unwrap();
                let status: u16 = line
                    .split(' ')
                    .nth(1)
                    .unwrap_or_else(|| panic!("bad status line {line:?}"))
                    .parse()
                    .unwrap();
                let mut headers = Vec::new();
                loop {
                    let mut line = String::new();
                    self.io.read_line(&mut line).await.unwrap();
                    let line = line.trim_end();
                    if line.is_empty() {
                        break;
                    }
                    let (name, value) = line.split_once(':').unwrap();
                    headers.push((name.trim().to_owned(), value.trim().to_owned()));
                }
                let mut resp = Resp {
                    status,
                    headers,
                    body: Vec::new(),
                };
                if !head && !matches!(status, 100..=199 | 204 | 304) {
                    let len: usize = resp
                        .header("content-length")
                        .expect("responses carry Content-Length")
                        .parse()
                        .unwrap();
                    resp.body = vec![0; len];
                    self.io.read_exact(&mut resp.body).await.unwrap();
                }
                resp
            };
            tokio::time::timeout(Duration::from_secs(10), read)
                .await
                .expect("response timed out")
        }

        /// Whether the server closed the connection.
        async fn is_closed(&mut self) -> bool {
            let mut byte = [0u8; 1];
            matches!(
                tokio::time::timeout(Duration::from_secs(2), self.io.read(&mut byte)).await,
                Ok(Ok(0)) | Ok(Err(_))
            )
        }
    }

    fn no_such_key(key: &str) -> String {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>NoSuchKey</Code>\
             <Message>The specified key does not exist.</Message><Key>{key}</Key></Error>"
        )
    }

    #[tokio::test]
    async fn put_then_get_head_range_and_conditionals_on_one_connection() {
        let h = start(false).await;
        let mut c = h.connect().await;
        let body = b"0123456789abcdefghij";

        let put = c
            .request("PUT", "/photos/a%20b.jpg?x-id=PutObject", &[], body)
            .await;
        assert_eq!(put.status, 200, "{put:?}");
        let etag = put.header("etag").unwrap().to_owned();
        assert!(etag.starts_with('"') && etag.ends_with('"'));
        assert_eq!(std::fs::read(h.root.join("photos/a b.jpg")).unwrap(), body);
        assert!(h.temp_files().is_empty());

        let get = c
            .request("GET", "/photos/a%20b.jpg?versionId=x", &[], b"")
            .await;
        assert_eq!(get.status, 200);
        assert_eq!(get.body, body);
        assert_eq!(get.header("content-length"), Some("20"));
        assert_eq!(get.header("content-type"), Some("image/jpeg"));
        assert_eq!(get.header("etag"), Some(etag.as_str()));
        assert_eq!(get.header("accept-ranges"), Some("bytes"));
        let last_modified = get.header("last-modified").unwrap().to_owned();
        assert!(httpdate::parse_http_date(&last_modified).is_ok());

        let head = c.request("HEAD", "/photos/a%20b.jpg", &[], b"").await;
        assert_eq!(head.status, 200);
        assert!(head.body.is_empty());
        assert_eq!(head.header("content-length"), Some("20"));
        assert_eq!(head.header("etag"), Some(etag.as_str()));

        let range = c
            .request("GET", "/photos/a%20b.jpg", &[("Range", "bytes=2-5")], b"")
            .await;
        assert_eq!(range.status, 206);
        assert_eq!(range.body, b"2345");
        assert_eq!(range.header("content-range"), Some("bytes 2-5/20"));
        assert_eq!(range.header("content-length"), Some("4"));

        let suffix = c
            .request("GET", "/photos/a%20b.jpg", &[("Range", "bytes=-3")], b"")
            .await;
        assert_eq!(suffix.status, 206);
        assert_eq!(suffix.body, b"hij");
        assert_eq!(suffix.header("content-range"), Some("bytes 17-19/20"));

        let open = c
            .request("GET", "/photos/a%20b.jpg", &[("Range", "bytes=15-")], b"")
            .await;
        assert_eq!((open.status, open.body.as_slice()), (206, &b"fghij"[..]));

        let unsat = c
            .request("GET", "/photos/a%20b.jpg", &[("Range", "bytes=20-")], b"")
            .await;
        assert_eq!(unsat.status, 416);
        assert_eq!(unsat.header("content-range"), Some("bytes */20"));
        assert!(unsat.text().contains("<Code>InvalidRange</Code>"));

        let multi = c
            .request(
                "GET",
                "/photos/a%20b.jpg",
                &[("Range", "bytes=0-1,4-5")],
                b"",
            )
            .await;
        assert_eq!((multi.status, multi.body.as_slice()), (200, &body[..]));
        let bad = c
            .request("GET", "/photos/a%20b.jpg", &[("Range", "bytes=9-2")], b"")
            .await;
        assert_eq!((bad.status, bad.body.as_slice()), (200, &body[..]));

        let stale = c
            .request(
                "GET",
                "/photos/a%20b.jpg",
                &[("Range", "bytes=0-1"), ("If-Range", "\"stale\"")],
                b"",
            )
            .await;
        assert_eq!((stale.status, stale.body.as_slice()), (200, &body[..]));
        let fresh = c
            .request(
                "GET",
                "/photos/a%20b.jpg",
                &[("Range", "bytes=0-1"), ("If-Range", &etag)],
                b"",
            )
            .await;
        assert_eq!((fresh.status, fresh.body.as_slice()), (206, &b"01"[..]));

        for headers in [
            vec![("If-None-Match", etag.as_str())],
            vec![("If-None-Match", "*")],
            vec![("If-Modified-Since", last_modified.as_str())],
        ] {
            let r = c.request("GET", "/photos/a%20b.jpg", &headers, b"").await;
            assert_eq!(r.status, 304, "{headers:?}");
            assert!(r.body.is_empty());
            assert_eq!(r.header("etag"), Some(etag.as_str()));
            let r = c.request("HEAD", "/photos/a%20b.jpg", &headers, b"").await;
            assert_eq!(r.status, 304, "HEAD {headers:?}");
        }
        // If-None-Match wins over If-Modified-Since.
        let r = c
            .request(
                "GET",
                "/photos/a%20b.jpg",
                &[
                    ("If-None-Match", "\"other\""),
                    ("If-Modified-Since", &last_modified),
                ],
                b"",
            )
            .await;
        assert_eq!((r.status, r.body.as_slice()), (200, &body[..]));
        let old = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(1_000_000));
        let r = c
            .request(
                "GET",
                "/photos/a%20b.jpg",
                &[("If-Modified-Since", &old)],
                b"",
            )
            .await;
        assert_eq!(r.status, 200);
        let r = c
            .request(
                "GET",
                "/photos/a%20b.jpg",
                &[("If-Match", "\"other\"")],
                b"",
            )
            .await;
        assert_eq!(r.status, 412);
        assert!(r.text().contains("<Code>PreconditionFailed</Code>"));

        // Overwrite: new content, new ETag.
        let put2 = c.request("PUT", "/photos/a%20b.jpg", &[], b"new").await;
        assert_eq!(put2.status, 200);
        assert_ne!(put2.header("etag"), Some(etag.as_str()));
        let get2 = c.request("GET", "/photos/a%20b.jpg", &[], b"").await;
        assert_eq!(get2.body, b"new");
        assert_eq!(get2.header("etag"), put2.header("etag"));

        // Empty object.
        assert_eq!(c.request("PUT", "/empty", &[], b"").await.status, 200);
        let empty = c.request("GET", "/empty", &[], b"").await;
        assert_eq!(
            (empty.status, empty.header("content-length")),
            (200, Some("0"))
        );
        assert_eq!(
            c.request("GET", "/empty", &[("Range", "bytes=0-")], b"")
                .await
                .status,
            416
        );

        // Everything above went over one kept-alive connection.
        assert_eq!(get2.header("connection"), Some("keep-alive"));
        assert!(!c.is_closed().await);
    }

    #[tokio::test]
    async fn large_files_stream_in_chunks() {
        let h = start(false).await;
        let data: Vec<u8> = (0..(3 * CHUNK_SIZE + 12345) as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        std::fs::write(h.root.join("big.bin"), &data).unwrap();
        let mut c = h.connect().await;
        let full = c.request("GET", "/big.bin", &[], b"").await;
        assert_eq!(full.status, 200);
        assert_eq!(
            full.header("content-type"),
            Some("application/octet-stream")
        );
        assert!(full.body == data);
        let (a, b) = (CHUNK_SIZE as u64 - 10, 2 * CHUNK_SIZE as u64 + 10);
        let range = c
            .request(
                "GET",
                "/big.bin",
                &[("Range", &format!("bytes={a}-{b}"))],
                b"",
            )
            .await;
        assert_eq!(range.status, 206);
        assert!(range.body == data[a as usize..=b as usize]);

        // Upload it back through PUT (several body reads) and compare.
        let put = c.request("PUT", "/copy/big.bin", &[], &data).await;
        assert_eq!(put.status, 200);
        assert!(std::fs::read(h.root.join("copy/big.bin")).unwrap() == data);
        assert!(!c.is_closed().await);
    }

    #[tokio::test]
    async fn missing_keys_directories_and_temp_files_are_404_xml() {
        let h = start(false).await;
        std::fs::create_dir_all(h.root.join("dir/sub")).unwrap();
        std::fs::write(h.root.join(".cascade-tmp-123"), b"partial").unwrap();
        std::fs::write(h.root.join("dir/.cascade-tmp-9"), b"partial").unwrap();
        let mut c = h.connect().await;

        let r = c.request("GET", "/no/such%20key.txt", &[], b"").await;
        assert_eq!(r.status, 404);
        assert_eq!(r.header("content-type"), Some("application/xml"));
        assert_eq!(r.text(), no_such_key("no/such key.txt"));

        let r = c.request("GET", "/a%26b%3C", &[], b"").await;
        assert_eq!(r.text(), no_such_key("a&amp;b&lt;"));

        for (path, key) in [
            ("/dir", "dir"),
            ("/dir/", "dir/"),
            ("/dir/sub", "dir/sub"),
            ("/.cascade-tmp-123", ".cascade-tmp-123"),
            ("/dir/.cascade-tmp-9", "dir/.cascade-tmp-9"),
            ("/", ""),
            ("/dir/x/y", "dir/x/y"),
        ] {
            let r = c.request("GET", path, &[], b"").await;
            assert_eq!(r.status, 404, "{path}");
            assert_eq!(r.text(), no_such_key(key), "{path}");
        }
        // A file used as a directory.
        std::fs::write(h.root.join("file"), b"x").unwrap();
        assert_eq!(c.request("GET", "/file/x", &[], b"").await.status, 404);

        let r = c.request("HEAD", "/nope", &[], b"").await;
        assert_eq!(r.status, 404);
        assert!(r.body.is_empty());

        // A symlink pointing at an in-flight upload is not served either.
        std::os::unix::fs::symlink(h.root.join(".cascade-tmp-123"), h.root.join("peek")).unwrap();
        assert_eq!(c.request("GET", "/peek", &[], b"").await.status, 404);
        assert!(!c.is_closed().await);
    }

    #[tokio::test]
    async fn traversal_attempts_are_rejected() {
        let h = start(false).await;
        std::fs::write(h.outside.join("secret"), b"secret").unwrap();
        std::fs::write(h.root.join("ok"), b"ok").unwrap();
        let attempts = [
            "/../etc/passwd",
            "/../outside/secret",
            "/%2e%2e/outside/secret",
            "/%2E%2E/outside/secret",
            "/a/%2E%2E/%2e%2e/outside/secret",
            "/%2F..%2Foutside%2Fsecret",
            "/ok%2F..%2F..%2Foutside%2Fsecret",
            "/a%00b",
            "/a%5C..%5C..%5Coutside%5Csecret",
            "/./ok",
            "//ok",
        ];
        let mut c = h.connect().await;
        for path in attempts {
            for method in ["GET", "HEAD", "PUT", "DELETE"] {
                let r = c.request(method, path, &[], b"").await;
                assert_eq!(r.status, 400, "{method} {path}");
                assert_eq!(
                    r.header("connection"),
                    Some("keep-alive"),
                    "{method} {path}"
                );
            }
        }
        // Raw backslash in the request line.
        let r = h.once("GET", "/a\\..\\..\\outside\\secret", &[], b"").await;
        assert_eq!(r.status, 400, "{r:?}");
        // PUT /  → 400, PUT of a folder key → 400.
        assert_eq!(c.request("PUT", "/", &[], b"x").await.status, 400);
        assert_eq!(c.request("PUT", "/dir/", &[], b"").await.status, 400);
        assert_eq!(
            c.request("PUT", "/.cascade-tmp-x", &[], b"").await.status,
            400
        );
        assert_eq!(std::fs::read(h.outside.join("secret")).unwrap(), b"secret");
        assert_eq!(std::fs::read_dir(&h.outside).unwrap().count(), 1);
        assert!(!h.root.join("dir").exists());
    }

    #[tokio::test]
    async fn symlinks_never_escape_the_root() {
        let h = start(false).await;
        std::fs::write(h.outside.join("secret"), b"secret").unwrap();
        std::fs::create_dir(h.root.join("real")).unwrap();
        std::fs::write(h.root.join("real/x"), b"inside").unwrap();
        let link = |target: &Path, name: &str| {
            std::os::unix::fs::symlink(target, h.root.join(name)).unwrap();
        };
        link(&h.outside.join("secret"), "file-out");
        link(&h.outside, "dir-out");
        link(Path::new("../outside"), "rel-out");
        link(&h.root.join("real"), "dir-in");
        link(Path::new("real/x"), "file-in");
        link(Path::new("loop"), "loop");

        let mut c = h.connect().await;
        for path in [
            "/file-out",
            "/dir-out/secret",
            "/rel-out/secret",
            "/loop",
            "/loop/x",
        ] {
            let r = c.request("GET", path, &[], b"").await;
            assert_eq!(r.status, 404, "{path}");
            assert!(r.text().contains("<Code>NoSuchKey</Code>"));
        }
        // Symlinks that stay inside the root are followed.
        let r = c.request("GET", "/dir-in/x", &[], b"").await;
        assert_eq!((r.status, r.text()), (200, "inside"));
        assert_eq!(
            c.request("GET", "/file-in", &[], b"").await.text(),
            "inside"
        );

        // PUT never writes (or creates directories) through an escaping parent.
        for path in ["/dir-out/new", "/dir-out/sub/new", "/rel-out/new"] {
            let r = c.request("PUT", path, &[], b"pwned").await;
            assert_eq!(r.status, 403, "{path}");
        }
        assert!(!h.outside.join("new").exists());
        assert!(!h.outside.join("sub").exists());
        // ... but through a parent that stays inside, it does.
        assert_eq!(c.request("PUT", "/dir-in/y", &[], b"yy").await.status, 200);
        assert_eq!(std::fs::read(h.root.join("real/y")).unwrap(), b"yy");
        // PUT onto a symlink replaces the link, not its target.
        assert_eq!(
            c.request("PUT", "/file-out", &[], b"replaced").await.status,
            200
        );
        assert_eq!(std::fs::read(h.outside.join("secret")).unwrap(), b"secret");
        assert!(!std::fs::symlink_metadata(h.root.join("file-out"))
            .unwrap()
            .file_type()
            .is_symlink());

        // DELETE does not reach outside either; deleting a link removes the link.
        assert_eq!(
            c.request("DELETE", "/dir-out/secret", &[], b"")
                .await
                .status,
            204
        );
        assert_eq!(
            c.request("DELETE", "/rel-out/secret", &[], b"")
                .await
                .status,
            204
        );
        assert_eq!(std::fs::read(h.outside.join("secret")).unwrap(), b"secret");
        assert_eq!(c.request("DELETE", "/dir-out", &[], b"").await.status, 204);
        assert!(std::fs::symlink_metadata(h.root.join("dir-out")).is_err());
        assert!(h.outside.join("secret").exists());
        assert!(h.temp_files().is_empty());
    }

    #[tokio::test]
    async fn read_only_refuses_writes() {
        let h = start(true).await;
        std::fs::write(h.root.join("k"), b"v").unwrap();
        let mut c = h.connect().await;
        for method in ["PUT", "DELETE", "POST", "PATCH"] {
            let r = c.request(method, "/k", &[], b"").await;
            assert_eq!(r.status, 405, "{method}");
            assert_eq!(r.header("allow"), Some("GET, HEAD"), "{method}");
            assert!(r.text().contains("<Code>MethodNotAllowed</Code>"));
        }
        assert_eq!(std::fs::read(h.root.join("k")).unwrap(), b"v");
        let r = c.request("GET", "/k", &[], b"").await;
        assert_eq!((r.status, r.text()), (200, "v"));
        // A refused small upload is drained: the connection stays usable.
        let r = c.request("PUT", "/new", &[], b"some body").await;
        assert_eq!(r.status, 405);
        assert_eq!(r.header("connection"), Some("keep-alive"));
        assert_eq!(c.request("GET", "/k", &[], b"").await.status, 200);
        // A refused large upload is not read: the connection is closed.
        c.send_raw(b"PUT /new HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\nstart")
            .await;
        let r = c.read_response(false).await;
        assert_eq!(r.status, 405);
        assert_eq!(r.header("connection"), Some("close"));
        assert!(c.is_closed().await);
        assert!(!h.root.join("new").exists());
    }

    #[tokio::test]
    async fn other_methods_and_bodies_on_get() {
        let h = start(false).await;
        std::fs::write(h.root.join("k"), b"v").unwrap();
        let mut c = h.connect().await;
        for method in ["POST", "PATCH", "OPTIONS"] {
            let r = c.request(method, "/k", &[], b"ignored").await;
            assert_eq!(r.status, 405, "{method}");
            assert_eq!(r.header("allow"), Some("GET, HEAD, PUT, DELETE"));
        }
        // A GET with a (small) body: drained, connection reused.
        let r = c.request("GET", "/k", &[], b"unexpected body").await;
        assert_eq!((r.status, r.text()), (200, "v"));
        assert_eq!(r.header("connection"), Some("keep-alive"));
        let r = c.request("GET", "/k", &[], b"").await;
        assert_eq!(r.status, 200);
        assert!(!c.is_closed().await);
    }

    #[tokio::test]
    async fn put_if_none_match_star() {
        let h = start(false).await;
        let mut c = h.connect().await;
        let r = c
            .request("PUT", "/once", &[("If-None-Match", "*")], b"first")
            .await;
        assert_eq!(r.status, 200);
        // Existing object, empty body: 412, connection still usable.
        let r = c
            .request("PUT", "/once", &[("If-None-Match", "*")], b"")
            .await;
        assert_eq!(r.status, 412);
        assert!(r.text().contains("<Code>PreconditionFailed</Code>"));
        assert_eq!(r.header("connection"), Some("keep-alive"));
        // Existing object, small body: checked before the body is stored,
        // body drained, connection still usable.
        let r = c
            .request("PUT", "/once", &[("If-None-Match", "*")], b"second")
            .await;
        assert_eq!(r.status, 412);
        assert_eq!(r.header("connection"), Some("keep-alive"));
        // With `Expect: 100-continue` the body is never solicited: 412 without
        // `100 Continue`, and the connection is closed.
        c.send_raw(
            b"PUT /once HTTP/1.1\r\nHost: x\r\nIf-None-Match: *\r\n\
              Expect: 100-continue\r\nContent-Length: 6\r\n\r\n",
        )
        .await;
        let r = c.read_response(false).await;
        assert_eq!(r.status, 412);
        assert_eq!(r.header("connection"), Some("close"));
        assert!(c.is_closed().await);
        // A large body is not read either.
        let mut c = h.connect().await;
        c.send_raw(
            b"PUT /once HTTP/1.1\r\nHost: x\r\nIf-None-Match: *\r\n\
              Content-Length: 50000000\r\n\r\nsecond",
        )
        .await;
        let r = c.read_response(false).await;
        assert_eq!(r.status, 412);
        assert_eq!(r.header("connection"), Some("close"));
        assert!(c.is_closed().await);
        assert_eq!(std::fs::read(h.root.join("once")).unwrap(), b"first");
        assert!(h.temp_files().is_empty());
    }

    #[tokio::test]
    async fn put_if_none_match_star_does_not_overwrite_an_object_created_meanwhile() {
        let h = start(false).await;
        let mut c = h.connect().await;
        c.send_raw(
            b"PUT /race HTTP/1.1\r\nHost: x\r\nIf-None-Match: *\r\n\
              Content-Length: 10\r\n\r\nfirst",
        )
        .await;
        h.wait_for_temp_file().await;
        std::fs::write(h.root.join("race"), b"winner").unwrap();
        c.send_raw(b"-half").await;
        let r = c.read_response(false).await;
        assert_eq!(r.status, 412);
        assert_eq!(r.header("connection"), Some("keep-alive"));
        assert_eq!(std::fs::read(h.root.join("race")).unwrap(), b"winner");
        assert!(h.temp_files().is_empty());
        // Without the precondition the upload replaces it.
        let r = c.request("PUT", "/race", &[], b"second").await;
        assert_eq!(r.status, 200);
        assert_eq!(std::fs::read(h.root.join("race")).unwrap(), b"second");
    }

    #[tokio::test]
    async fn put_aborted_by_client_leaves_nothing() {
        let h = start(false).await;
        std::fs::write(h.root.join("keep"), b"old").unwrap();
        for key in ["fresh", "keep", "deep/er/key"] {
            let mut c = h.connect().await;
            c.send_raw(
                format!("PUT /{key} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\npartial")
                    .as_bytes(),
            )
            .await;
            // Wait for the upload to be in flight, then vanish.
            h.wait_for_temp_file().await;
            drop(c);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while !h.temp_files().is_empty() {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "temp file left behind"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        assert!(!h.root.join("fresh").exists());
        assert!(!h.root.join("deep/er/key").exists());
        assert_eq!(std::fs::read(h.root.join("keep")).unwrap(), b"old");
    }

    #[tokio::test]
    async fn put_chunked_and_expect_continue() {
        let h = start(false).await;
        let mut c = h.connect().await;
        c.send_raw(
            b"PUT /chunked.txt HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
              5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        )
        .await;
        let r = c.read_response(false).await;
        assert_eq!(r.status, 200);
        assert_eq!(
            std::fs::read(h.root.join("chunked.txt")).unwrap(),
            b"hello world"
        );

        c.send_raw(b"PUT /expect.txt HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
            .await;
        let cont = c.read_response(false).await;
        assert_eq!(cont.status, 100);
        c.send_raw(b"body").await;
        let r = c.read_response(false).await;
        assert_eq!(r.status, 200);
        assert_eq!(std::fs::read(h.root.join("expect.txt")).unwrap(), b"body");
        assert_eq!(r.header("connection"), Some("keep-alive"));
        let r = c.request("GET", "/chunked.txt", &[], b"").await;
        assert_eq!((r.status, r.text()), (200, "hello world"));
        assert_eq!(r.header("content-type"), Some("text/plain"));
        assert!(!c.is_closed().await);
    }

    #[tokio::test]
    async fn put_conflicts_with_files_and_directories() {
        let h = start(false).await;
        let mut c = h.connect().await;
        assert_eq!(c.request("PUT", "/a", &[], b"file").await.status, 200);
        assert_eq!(c.request("PUT", "/a/b", &[], b"x").await.status, 409);
        assert_eq!(c.request("PUT", "/d/e", &[], b"x").await.status, 200);
        assert_eq!(c.request("PUT", "/d", &[], b"x").await.status, 409);
        assert_eq!(std::fs::read(h.root.join("a")).unwrap(), b"file");
        assert!(h.temp_files().is_empty());
    }

    #[tokio::test]
    async fn delete_is_idempotent() {
        let h = start(false).await;
        let mut c = h.connect().await;
        assert_eq!(c.request("PUT", "/dir/k", &[], b"v").await.status, 200);
        let r = c.request("DELETE", "/dir/k", &[], b"").await;
        assert_eq!(r.status, 204);
        assert!(!h.root.join("dir/k").exists());
        assert_eq!(c.request("DELETE", "/dir/k", &[], b"").await.status, 204);
        assert_eq!(
            c.request("DELETE", "/never/existed", &[], b"").await.status,
            204
        );
        // Directories are not objects: nothing is removed.
        assert_eq!(c.request("DELETE", "/dir", &[], b"").await.status, 204);
        assert_eq!(c.request("DELETE", "/dir/", &[], b"").await.status, 204);
        assert!(h.root.join("dir").is_dir());
        assert_eq!(c.request("DELETE", "/", &[], b"").await.status, 400);
        assert_eq!(c.request("GET", "/dir/k", &[], b"").await.status, 404);
        assert!(h.root.is_dir());
        assert!(!c.is_closed().await);
    }
}
