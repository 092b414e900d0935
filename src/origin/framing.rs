//! Where an HTTP/1.1 exchange on one upstream connection stands, from the bytes written and
//! read (pure, no IO): what `pool` needs to know whether a connection Pingora let go of can
//! carry another request. One request head out with its body, if any, framed by
//! `Content-Length` or chunked and written whole *before* any final answer byte came back;
//! then one HTTP/1.1 answer with a known end in (`Content-Length`, chunked, or none by
//! method/status: RFC 9112 §6.3), after any number of interim (`1xx`, not `101`) answers;
//! nothing past that end, no `close`. Anything else, or anything over a bound, and the
//! connection is marked never to be kept.
//!
//! An upload (a request with a body) is kept only after a `2xx` that came once its body was
//! out. An origin that refuses an upload (S3's `NoSuchUpload`, `AccessDenied`,
//! `EntityTooLarge`) often answers before it reads the body and then closes the connection
//! with the body unread and without saying `close`; the body being written says only that
//! the kernel took it, so the close can come after the answer, while the next request is
//! already on the connection, and a request with a body cannot be replayed. nginx keeps a
//! connection only when the body was sent before the answer (`request_body_sent`); cascade
//! also closes after a refusal.

use std::mem::MaybeUninit;
use std::time::Duration;

/// The most bytes read to finish an answer Pingora left unread (a 404's body is a few hundred).
pub const DRAIN_BUDGET: u64 = 64 * 1024;
/// A request head this long (or an answer head) is not followed: the connection is closed
/// after it.
const MAX_HEAD: usize = 64 * 1024;
/// Longest chunk-size line or trailer section followed.
const MAX_LINE: u32 = 4096;
/// Header fields a head may have to be followed (more: the connection is closed after it).
const MAX_FIELDS: usize = 128;
/// An origin's `Keep-Alive: timeout=N` is used as N less this (its clock starts first).
const KEEPALIVE_MARGIN: Duration = Duration::from_millis(500);

/// Where an HTTP/1.1 exchange on one connection stands, from the bytes written and read.
#[derive(Debug, Default)]
pub struct Tracker {
    state: State,
    /// A head (request or answer) split over several reads or writes.
    head: Vec<u8>,
    /// How long the origin said it keeps the connection open when idle (the last answer's
    /// `Keep-Alive: timeout=`), less a margin.
    idle_hint: Option<Duration>,
    /// The current request has a body.
    upload: bool,
    /// The current request is not all out yet (kept when poisoned).
    writing: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between exchanges (a fresh connection, or one taken from the pool).
    #[default]
    Idle,
    /// A request head is being written (`complete`: it is out, with its body if it has
    /// one; `head_method`: its method is HEAD).
    Request {
        head_method: bool,
        complete: bool,
    },
    /// The request head is out; its body is being written.
    Upload(Body),
    /// An answer head came in while the body is still going out: an interim one
    /// (`100 Continue`) lets the body go on, a final one means the connection is not kept.
    Interim(Body),
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

/// What is left of a request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    Length(u64),
    Chunked(Chunk),
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

impl Chunk {
    /// The start of a chunk-size line.
    const NEXT: Chunk = Chunk::Size {
        size: 0,
        digits: 0,
        ext: false,
        len: 0,
    };
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

    /// A request (head or body) is still going out; this survives [`Tracker::poison`], so
    /// the rest of an upload answered early can still be told from a new request.
    pub fn request_open(&self) -> bool {
        self.writing
    }

    pub fn is_unsafe(&self) -> bool {
        self.state == State::Unsafe
    }

    /// The exchange was over and Pingora was told it may not pool the connection (it is
    /// cascade's pool's); a drop after it is the normal end, not an abandoned answer.
    pub fn park(&mut self) {
        if self.is_done() {
            self.state = State::Parked;
        }
    }

    /// Over, and Pingora let go of it without asking to pool it (an answer it abandoned).
    pub fn is_abandoned_done(&self) -> bool {
        self.state == State::Done
    }

    /// How long the origin said it keeps an idle connection (`Keep-Alive: timeout=`), less a
    /// margin.
    pub fn idle_hint(&self) -> Option<Duration> {
        self.idle_hint
    }

    /// Never keep the connection (it failed, or was shut down).
    pub fn poison(&mut self) {
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
                self.upload = false;
                self.writing = true;
                self.state = State::Request {
                    head_method: false,
                    complete: false,
                };
                self.request_bytes(bytes);
            }
            State::Request {
                complete: false, ..
            } => self.request_bytes(bytes),
            State::Upload(_) => self.upload_bytes(bytes),
            // Bytes past the request's end, or a write while an answer is coming.
            _ => self.poison(),
        }
    }

    /// A head split over several reads or writes: `bytes` added to what came before, taken
    /// out of the tracker (empty when `bytes` start the head: they are then all of it so
    /// far); `None` over [`MAX_HEAD`] (the connection is poisoned).
    fn take_head(&mut self, bytes: &[u8]) -> Option<Vec<u8>> {
        if !self.head.is_empty() {
            if self.head.len() + bytes.len() > MAX_HEAD {
                self.poison();
                return None;
            }
            self.head.extend_from_slice(bytes);
        }
        Some(std::mem::take(&mut self.head))
    }

    fn request_bytes(&mut self, bytes: &[u8]) {
        let Some(head) = self.take_head(bytes) else {
            return;
        };
        let whole: &[u8] = if head.is_empty() { bytes } else { &head };
        match parse_request(whole) {
            Parsed::Complete {
                head_method,
                len,
                body,
            } => {
                let rest = &whole[len..];
                match body {
                    None if rest.is_empty() => {
                        self.writing = false;
                        self.state = State::Request {
                            head_method,
                            complete: true,
                        }
                    }
                    // A second request after a bodiless one.
                    None => self.poison(),
                    Some(b) => {
                        self.upload = true;
                        self.state = State::Upload(b);
                        if !rest.is_empty() {
                            self.upload_bytes(rest);
                        }
                    }
                }
            }
            Parsed::Partial if whole.len() <= MAX_HEAD => {
                self.head = if head.is_empty() {
                    bytes.to_vec()
                } else {
                    head
                };
            }
            Parsed::Partial | Parsed::Refused => self.poison(),
        }
    }

    /// Request body bytes that went out.
    fn upload_bytes(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let State::Upload(body) = self.state else {
                // Bytes past the body's end.
                return self.poison();
            };
            match body {
                Body::Length(left) => {
                    let n = bytes.len() as u64;
                    if n > left {
                        return self.poison();
                    }
                    self.state = if n == left {
                        self.writing = false;
                        State::Request {
                            head_method: false,
                            complete: true,
                        }
                    } else {
                        State::Upload(Body::Length(left - n))
                    };
                    return;
                }
                Body::Chunked(c) => match chunk_step(c, bytes) {
                    Some((next, used)) => {
                        bytes = &bytes[used..];
                        self.state = match next {
                            State::Chunked(c) => State::Upload(Body::Chunked(c)),
                            _ => {
                                self.writing = false;
                                State::Request {
                                    head_method: false,
                                    complete: true,
                                }
                            }
                        };
                    }
                    None => return self.poison(),
                },
            }
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
            State::Upload(body) => {
                self.head.clear();
                self.state = State::Interim(body);
                self.answer_bytes(bytes);
            }
            State::Answer { .. } | State::Interim(_) => self.answer_bytes(bytes),
            State::Length(_) | State::Chunked(_) => self.body_bytes(bytes),
            // An answer before the request was out, or data on an idle connection.
            _ => self.poison(),
        }
    }

    fn answer_bytes(&mut self, bytes: &[u8]) {
        let Some(head) = self.take_head(bytes) else {
            return;
        };
        let mut whole: &[u8] = if head.is_empty() { bytes } else { &head };
        // One head per turn: interim answers (`100 Continue`, `103 Early Hints`) are followed
        // by more of the body or by the next answer; a loop, not recursion, since an origin
        // chooses how many come in one read.
        loop {
            let (head_method, upload) = match self.state {
                State::Answer { head_method } => (head_method, None),
                State::Interim(body) => (false, Some(body)),
                _ => return self.poison(),
            };
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
                    let rest = &whole[n..];
                    if resp.version == Some(1) && matches!(resp.code, Some(100 | 102..=199)) {
                        self.state = match upload {
                            Some(body) => State::Upload(body),
                            None => State::Answer { head_method },
                        };
                        if rest.is_empty() {
                            return;
                        }
                        if let State::Upload(body) = self.state {
                            // The next answer while the body is still going out.
                            self.state = State::Interim(body);
                        }
                        whole = rest;
                        continue;
                    }
                    if upload.is_some() {
                        // A final answer before the whole body was out.
                        return self.poison();
                    }
                    if self.upload && !matches!(resp.code, Some(200..=299)) {
                        // An upload refused (or redirected): the origin may not have read
                        // the body, all of which the kernel took, and close with it unread.
                        return self.poison();
                    }
                    let Some(state) = body_state(&resp, head_method, &mut self.idle_hint) else {
                        return self.poison();
                    };
                    self.state = state;
                    if !rest.is_empty() {
                        self.body_bytes(rest);
                    }
                    return;
                }
                Ok(httparse::Status::Partial) => {
                    if whole.len() > MAX_HEAD {
                        return self.poison();
                    }
                    self.head = whole.to_vec();
                    return;
                }
                Err(_) => return self.poison(),
            }
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
    /// One whole request head of `len` bytes (`head_method`: HEAD) and the body that follows
    /// it, if any.
    Complete {
        head_method: bool,
        len: usize,
        body: Option<Body>,
    },
    Partial,
    /// Anything else: the connection is not followed.
    Refused,
}

/// Is `whole` an HTTP/1.1 request head that leaves the connection open, with a body of a
/// known end (`Content-Length`, or a lone `chunked`) or none?
fn parse_request(whole: &[u8]) -> Parsed {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(whole, &mut fields) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Refused,
    };
    let head_method = match req.method {
        Some("HEAD") => true,
        // A tunnel: what follows is not HTTP.
        Some("CONNECT") | None => return Parsed::Refused,
        Some(_) => false,
    };
    if req.version != Some(1) {
        return Parsed::Refused;
    }
    let mut length: Option<u64> = None;
    let mut chunked = false;
    for f in req.headers.iter() {
        let v = f.value;
        if f.name.eq_ignore_ascii_case("content-length") {
            let Some(n) = parse_length(v) else {
                return Parsed::Refused;
            };
            if length.is_some_and(|l| l != n) {
                return Parsed::Refused;
            }
            length = Some(n);
        } else if f.name.eq_ignore_ascii_case("transfer-encoding") {
            if chunked || !v.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Parsed::Refused;
            }
            chunked = true;
        } else if f.name.eq_ignore_ascii_case("upgrade")
            || (f.name.eq_ignore_ascii_case("connection")
                && (has_token(v, b"close") || has_token(v, b"upgrade")))
        {
            return Parsed::Refused;
        }
    }
    let body = match (length, chunked) {
        (Some(_), true) => return Parsed::Refused,
        (None, false) | (Some(0), false) => None,
        (Some(n), false) => Some(Body::Length(n)),
        (None, true) => Some(Body::Chunked(Chunk::NEXT)),
    };
    if head_method && body.is_some() {
        return Parsed::Refused;
    }
    Parsed::Complete {
        head_method,
        len,
        body,
    }
}

/// A `Content-Length` value: digits only (no sign, no list), at most 19 of them.
fn parse_length(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
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
            let n = parse_length(f.value)?;
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
        (None, true) => Some(State::Chunked(Chunk::NEXT)),
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
        Chunk::DataLf if b == b'\n' => (next(Chunk::NEXT), 1),
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

    /// `answer` read in two parts, cut at every point: each time the exchange ends (`Keep`).
    fn kept_at_every_cut(answer: &[u8]) {
        for cut in 1..answer.len() {
            let t = exchange(GET, &[&answer[..cut], &answer[cut..]]);
            assert_eq!(t.verdict(), Verdict::Keep, "cut at {cut}");
        }
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
        kept_at_every_cut(whole);
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
        kept_at_every_cut(whole);
        for cut in 1..whole.len() {
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
            // requests whose end is unknown, or that were answered before they were out
            (
                b"GET /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                &[b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
            ),
            (
                b"PUT /a HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nab",
                &[b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
            ),
            (
                b"PUT /a HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nab",
                &[b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
            ),
            (
                b"PUT /a HTTP/1.1\r\nContent-Length: -2\r\n\r\nab",
                &[b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
            ),
            (
                b"PUT /a HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
                &[b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
            ),
            (
                b"HEAD /a HTTP/1.1\r\nContent-Length: 2\r\n\r\nab",
                &[b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
            ),
            (
                b"CONNECT o:443 HTTP/1.1\r\nHost: o:443\r\n\r\n",
                &[b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
            ),
            (
                b"PUT /a HTTP/1.1\r\nContent-Length: 4\r\n\r\nab",
                &[b"HTTP/1.1 400 X\r\nContent-Length: 0\r\n\r\n"],
            ),
            // a smuggled second request in the body's write
            (
                b"PUT /a HTTP/1.1\r\nContent-Length: 2\r\n\r\nabGET /b HTTP/1.1\r\n\r\n",
                &[b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
            ),
            (
                b"PUT /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
                &[b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
            ),
            // upgrades
            (
                b"GET /a HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
                &[b"HTTP/1.1 101 Switching\r\nConnection: upgrade\r\n\r\n"],
            ),
            (GET, &[b"HTTP/1.1 101 Switching\r\n\r\n"]),
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

    const PUT: &[u8] = b"PUT /a HTTP/1.1\r\nHost: o\r\nContent-Length: 11\r\n\r\nhello world";
    const CHUNKED_PUT: &[u8] = b"PUT /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nX-Amz-Checksum-Crc32: AAAA\r\n\r\n";
    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nETag: \"x\"\r\nContent-Length: 0\r\n\r\n";
    const NOT_FOUND: &[u8] = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";

    #[test]
    fn uploads_written_whole_before_their_answer_are_kept() {
        for req in [PUT, CHUNKED_PUT] {
            // The request (head and body) written in two parts, cut at every point.
            for cut in 1..req.len() {
                let mut t = Tracker::default();
                t.on_write(&req[..cut]);
                t.on_write(&req[cut..]);
                t.on_read(OK);
                assert_eq!(t.verdict(), Verdict::Keep, "cut at {cut}");
            }
            // Byte by byte, then exchange after exchange on the same connection.
            let mut t = Tracker::default();
            for _ in 0..3 {
                for b in req.chunks(1) {
                    t.on_write(b);
                }
                t.on_read(OK);
                assert_eq!(t.verdict(), Verdict::Keep);
            }
        }
        // A bodiless write, and a GET with a framed body.
        for req in [
            &b"DELETE /a HTTP/1.1\r\nHost: o\r\n\r\n"[..],
            b"PUT /a HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            b"GET /a HTTP/1.1\r\nContent-Length: 2\r\n\r\nab",
        ] {
            assert_eq!(exchange(req, &[OK]).verdict(), Verdict::Keep);
        }
    }

    #[test]
    fn an_upload_refused_after_its_body_is_not_kept() {
        for code in ["400", "403", "404", "307", "500", "503"] {
            let a = format!("HTTP/1.1 {code} X\r\nContent-Length: 3\r\n\r\nerr");
            assert_eq!(
                exchange(PUT, &[a.as_bytes()]).verdict(),
                Verdict::Close,
                "{code}"
            );
            assert_eq!(
                exchange(CHUNKED_PUT, &[a.as_bytes()]).verdict(),
                Verdict::Close,
                "{code}"
            );
            // Without a body, a refusal is an answer like any other.
            let bodiless = b"PUT /a HTTP/1.1\r\nContent-Length: 0\r\n\r\n";
            assert_eq!(exchange(bodiless, &[a.as_bytes()]).verdict(), Verdict::Keep);
        }
        for code in ["200", "201", "204"] {
            let a = format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n");
            assert_eq!(
                exchange(PUT, &[a.as_bytes()]).verdict(),
                Verdict::Keep,
                "{code}"
            );
        }
        // The next exchange starts afresh.
        let mut t = exchange(PUT, &[OK]);
        t.on_write(GET);
        t.on_read(b"HTTP/1.1 404 X\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(t.verdict(), Verdict::Keep);
    }

    #[test]
    fn an_answer_before_the_body_is_out_is_never_kept() {
        // The origin answered (S3's NoSuchUpload, AccessDenied) before it read the body: it
        // may close the connection with the rest unread, whatever is written after.
        for req in [PUT, CHUNKED_PUT] {
            let head = req.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            for (cut, answer) in (head..req.len()).flat_map(|c| [(c, OK), (c, NOT_FOUND)]) {
                let mut t = Tracker::default();
                t.on_write(&req[..cut]);
                t.on_read(answer);
                t.on_write(&req[cut..]);
                assert_eq!(t.verdict(), Verdict::Close, "cut at {cut}");
                assert!(!t.is_done());
                // A later exchange does not make it keepable.
                t.on_write(GET);
                t.on_read(OK);
                assert_eq!(t.verdict(), Verdict::Close, "cut at {cut}");
            }
        }
    }

    #[test]
    fn a_request_is_open_until_it_is_all_out_even_when_poisoned() {
        let mut t = Tracker::default();
        assert!(!t.request_open());
        t.on_write(&PUT[..20]);
        assert!(t.request_open());
        t.on_write(&PUT[20..PUT.len() - 3]);
        assert!(t.request_open());
        // Answered early: never kept, but the rest of the body is not a new request.
        t.on_read(NOT_FOUND);
        assert_eq!(t.verdict(), Verdict::Close);
        assert!(t.request_open());
        // A GET is out with its head; bytes past its answer poison it, and a write then
        // would be a new request.
        let mut t = Tracker::default();
        t.on_write(GET);
        assert!(!t.request_open());
        t.on_read(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxy");
        assert_eq!(t.verdict(), Verdict::Close);
        assert!(!t.request_open());
        for req in [PUT, CHUNKED_PUT] {
            let t = exchange(req, &[]);
            assert!(!t.request_open(), "all out");
        }
    }

    #[test]
    fn interim_answers_let_the_body_and_the_final_answer_follow() {
        let put = b"PUT /a HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n";
        // Expect: 100-continue: head, 100, body, final answer.
        let mut t = Tracker::default();
        t.on_write(put);
        t.on_read(b"HTTP/1.1 100 Continue\r\n\r\n");
        t.on_write(b"body");
        t.on_read(OK);
        assert_eq!(t.verdict(), Verdict::Keep);
        // A 100 split anywhere, and a 100 with the final answer in the same read once the
        // body is out.
        let cont: &[u8] = b"HTTP/1.1 100 Continue\r\nX: y\r\n\r\n";
        for cut in 1..cont.len() {
            let mut t = Tracker::default();
            t.on_write(put);
            t.on_read(&cont[..cut]);
            t.on_read(&cont[cut..]);
            t.on_write(b"body");
            t.on_read(OK);
            assert_eq!(t.verdict(), Verdict::Keep, "cut at {cut}");
        }
        let mut t = Tracker::default();
        t.on_write(put);
        t.on_write(b"body");
        t.on_read(&[cont, OK].concat());
        assert_eq!(t.verdict(), Verdict::Keep);
        // 103 Early Hints before a GET's answer.
        let t = exchange(
            GET,
            &[b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"],
        );
        assert_eq!(t.verdict(), Verdict::Keep);
        // A 100 and then a final answer before the body: not kept.
        let mut t = Tracker::default();
        t.on_write(put);
        t.on_read(&[cont, b"HTTP/1.1 413 X\r\nContent-Length: 0\r\n\r\n"].concat());
        t.on_write(b"body");
        assert_eq!(t.verdict(), Verdict::Close);
        // A write while an interim answer's head is half read.
        let mut t = Tracker::default();
        t.on_write(put);
        t.on_read(&cont[..10]);
        t.on_write(b"body");
        assert_eq!(t.verdict(), Verdict::Close);
        // An HTTP/1.0 interim answer is a final one.
        let mut t = Tracker::default();
        t.on_write(put);
        t.on_write(b"body");
        t.on_read(b"HTTP/1.0 100 Continue\r\n\r\n");
        assert_eq!(t.verdict(), Verdict::Close);
    }

    #[test]
    fn any_number_of_interim_answers_in_one_read_is_followed_without_recursion() {
        // An origin chooses how many interim heads come in one read: 100,000 of them (1.9 MB)
        // are followed in a loop, not a stack frame each.
        let mut many = b"HTTP/1.1 100 Continue\r\n\r\n".repeat(100_000);
        many.extend_from_slice(OK);
        let t = exchange(GET, &[&many]);
        assert_eq!(t.verdict(), Verdict::Keep);
        let mut t = Tracker::default();
        t.on_write(b"PUT /a HTTP/1.1\r\nContent-Length: 1\r\n\r\n");
        t.on_read(&many);
        assert_eq!(t.verdict(), Verdict::Close);
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
}
