//! Where an HTTP/1.1 exchange on one upstream connection stands, from the bytes written and
//! read (pure, no IO): what `pool` needs to know whether a connection Pingora let go of can
//! carry another request. One bodiless GET/HEAD head out, one HTTP/1.1 answer with a known
//! end in (`Content-Length`, chunked, or none by method/status: RFC 9112 §6.3), nothing past
//! that end, no `close`: anything else, or anything over a bound, and the connection is
//! marked never to be kept.

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
}
