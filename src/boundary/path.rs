//! The canonical request path: what the route match, the plugin chain, the cache key, the
//! upstream key and the signature all see.
//!
//! A client's path is percent-decoded **once**, checked, and re-encoded in one *normal form*:
//! every byte outside RFC 3986's `pchar` set (and `;`, see below) is written `%XX` (upper-case
//! hex), every byte inside it is written as itself. The normal form is a bijection with the
//! decoded bytes, so two spellings of one path (`/a%2Fb`-style tricks aside, which are
//! refused) become one string, and a string in normal form is its own canonical form
//! (idempotence: [`canonicalize`] of a normal form returns it unchanged).
//!
//! Refused always (hard errors, 400): a target that is not an absolute path, malformed
//! percent-encoding, decoded bytes that are not UTF-8, and NUL.
//!
//! Refused unless the route says `keys: raw` ([`Violation`]s): `.` and `..` segments in any
//! encoding (also `..;x`, which Java servers read as `..`), empty segments (`//`; a trailing
//! `/` is allowed), an encoded `/` or `\` inside a segment, `\` anywhere, other control
//! characters, and a segment that a second decode would turn into any of those (a
//! double-decoding origin would otherwise resolve `%252e%252e`).
//!
//! `;` is encoded (`%3B`) in the normal form: servers that strip `;params` from segments
//! (Tomcat, Jetty) would otherwise read `/private;x/a` as `/private/a` while cascade routed it
//! as another prefix. `+` is encoded (`%2B`): unsigned S3 (and form-decoding servers) read a
//! literal `+` in a path as a space, so the origin would serve another object than the route
//! and the plugins decided on.

use std::fmt;

/// Why a path was refused outright.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    NotAbsolute,
    BadPercent,
    InvalidUtf8,
    Nul,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathError::NotAbsolute => "the request target must be an absolute path",
            PathError::BadPercent => "the path has a malformed percent-encoding",
            PathError::InvalidUtf8 => "the path is not valid UTF-8 once percent-decoded",
            PathError::Nul => "the path contains a NUL character",
        })
    }
}

/// A path feature refused unless the route takes raw keys. A bit set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Violations(u8);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Violation {
    DotSegment = 1,
    EmptySegment = 2,
    EncodedSlash = 4,
    Backslash = 8,
    Control = 16,
    DoubleEncoded = 32,
}

const ALL: [Violation; 6] = [
    Violation::DotSegment,
    Violation::EmptySegment,
    Violation::EncodedSlash,
    Violation::Backslash,
    Violation::Control,
    Violation::DoubleEncoded,
];

impl Violation {
    pub fn describe(self) -> &'static str {
        match self {
            Violation::DotSegment => "a `.` or `..` segment",
            Violation::EmptySegment => "an empty segment (`//`)",
            Violation::EncodedSlash => "an encoded `/` or `\\` inside a segment",
            Violation::Backslash => "a `\\`",
            Violation::Control => "a control character",
            Violation::DoubleEncoded => {
                "a double-encoded `.`, `/`, `\\` or control character (`%25XX`)"
            }
        }
    }
}

impl Violations {
    fn add(&mut self, v: Violation) {
        self.0 |= v as u8;
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn contains(self, v: Violation) -> bool {
        self.0 & v as u8 != 0
    }

    /// The first violation, for an error message.
    pub fn first(self) -> Option<Violation> {
        ALL.into_iter().find(|v| self.contains(*v))
    }
}

/// A path in normal form, and what it would need a raw-keys route for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonPath {
    pub path: String,
    pub violations: Violations,
}

/// Bytes written as themselves in the normal form: RFC 3986 `pchar` without `;`, `+` and `%`
/// (unreserved, sub-delims but `;` and `+`, `:`, `@`), plus the separator `/`.
const fn keep_table() -> [bool; 256] {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b','
                    | b'='
                    | b':'
                    | b'@'
                    | b'/'
            );
        b += 1;
    }
    t
}

static KEEP: [bool; 256] = keep_table();

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Appends `bytes` to `out` in normal form.
pub fn encode_into(out: &mut String, bytes: &[u8]) {
    for &b in bytes {
        if KEEP[b as usize] {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 15) as usize] as char);
        }
    }
}

/// Percent-decodes `s` once. `None`: malformed (`%` not followed by two hex digits).
pub fn decode(s: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            let hi = hex_val(*s.get(i + 1)?)?;
            let lo = hex_val(*s.get(i + 2)?)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Is this path already in normal form with nothing to flag? One pass, no allocation: the
/// common case (`/img/a.jpg`) is checked here and copied as is.
fn is_plain(raw: &[u8]) -> bool {
    if raw.first() != Some(&b'/') {
        return false;
    }
    // Every byte kept as itself (no `%`, `;`, `\`, controls, non-ASCII)...
    if !raw.iter().all(|&b| KEEP[b as usize]) {
        return false;
    }
    // ... and no empty (but the last) or dot segment.
    let body = &raw[1..];
    let mut start = 0;
    for (i, &b) in body.iter().enumerate() {
        if b == b'/' {
            if matches!(&body[start..i], b"" | b"." | b"..") {
                return false;
            }
            start = i + 1;
        }
    }
    !matches!(&body[start..], b"." | b"..")
}

/// Decodes, checks and re-encodes a request path (without its query).
pub fn canonicalize(raw: &[u8]) -> Result<CanonPath, PathError> {
    if raw.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    if is_plain(raw) {
        // Every byte is ASCII (checked by `is_plain`).
        let path = String::from_utf8(raw.to_vec()).map_err(|_| PathError::InvalidUtf8)?;
        return Ok(CanonPath {
            path,
            violations: Violations::default(),
        });
    }
    let mut violations = Violations::default();
    // Segments are split on the client's own `/` only; an encoded one stays inside its
    // segment (and is flagged).
    let segments: Vec<&[u8]> = raw[1..].split(|&b| b == b'/').collect();
    let n = segments.len();
    let mut out = String::with_capacity(raw.len() + 8);
    let mut decoded_segments: Vec<Vec<u8>> = Vec::with_capacity(n);
    for (i, seg) in segments.iter().enumerate() {
        let d = decode(seg).ok_or(PathError::BadPercent)?;
        if d.contains(&0) {
            return Err(PathError::Nul);
        }
        if d.is_empty() && i + 1 != n {
            violations.add(Violation::EmptySegment);
        }
        if is_dot(&d) {
            violations.add(Violation::DotSegment);
        }
        if d.contains(&b'/') {
            violations.add(Violation::EncodedSlash);
        }
        if d.contains(&b'\\') {
            // A raw `\` is a separator to some servers; an encoded one is one to others.
            violations.add(if seg.contains(&b'\\') {
                Violation::Backslash
            } else {
                Violation::EncodedSlash
            });
        }
        if d.iter().any(|&b| b < 0x20 || b == 0x7f) {
            violations.add(Violation::Control);
        }
        if d.contains(&b'%') {
            match decode(&d) {
                Some(dd)
                    if is_dot(&dd)
                        || dd
                            .iter()
                            .any(|&b| b == b'/' || b == b'\\' || b < 0x20 || b == 0x7f) =>
                {
                    violations.add(Violation::DoubleEncoded)
                }
                _ => {}
            }
        }
        // `/` is ASCII: the whole is UTF-8 exactly when every segment is.
        if std::str::from_utf8(&d).is_err() {
            return Err(PathError::InvalidUtf8);
        }
        decoded_segments.push(d);
    }
    for d in &decoded_segments {
        out.push('/');
        encode_into(&mut out, d);
    }
    Ok(CanonPath {
        path: out,
        violations,
    })
}

/// `.` or `..`, also with Java-style path parameters (`..;jsessionid=x`).
fn is_dot(seg: &[u8]) -> bool {
    let name = match seg.iter().position(|&b| b == b';') {
        Some(i) => &seg[..i],
        None => seg,
    };
    name == b"." || name == b".."
}

/// The decoded form of a normal-form path (for messages and the local directory origin).
pub fn decoded(normal: &str) -> String {
    match decode(normal.as_bytes()) {
        Some(d) => String::from_utf8_lossy(&d).into_owned(),
        None => normal.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> String {
        let c = canonicalize(raw.as_bytes()).unwrap();
        assert!(c.violations.is_empty(), "{raw}: {:?}", c.violations);
        c.path
    }

    fn flagged(raw: &str) -> Violation {
        canonicalize(raw.as_bytes())
            .unwrap()
            .violations
            .first()
            .unwrap_or_else(|| panic!("{raw} passed"))
    }

    #[test]
    fn normal_forms() {
        assert_eq!(ok("/img/a.jpg"), "/img/a.jpg");
        assert_eq!(ok("/"), "/");
        assert_eq!(ok("/dir/"), "/dir/");
        assert_eq!(ok("/a%20b"), "/a%20b");
        assert_eq!(ok("/a b"), "/a%20b");
        assert_eq!(ok("/%61%62"), "/ab");
        assert_eq!(ok("/caf%c3%a9"), "/caf%C3%A9");
        assert_eq!(ok("/café"), "/caf%C3%A9");
        assert_eq!(ok("/a(1)!.jpg"), "/a(1)!.jpg");
        assert_eq!(ok("/a%281%29"), "/a(1)");
        assert_eq!(ok("/100%25"), "/100%25");
        assert_eq!(ok("/a;b"), "/a%3Bb");
        assert_eq!(ok("/a+b"), "/a%2Bb");
        assert_eq!(ok("/a%2Bb"), "/a%2Bb");
        assert_eq!(ok("/a%3fb"), "/a%3Fb");
        assert_eq!(ok("/...a/.b/c."), "/...a/.b/c.");
        assert_eq!(ok("/%2541"), "/%2541");
    }

    #[test]
    fn refused_always() {
        let e = |raw: &[u8]| canonicalize(raw).unwrap_err();
        assert_eq!(e(b"*"), PathError::NotAbsolute);
        assert_eq!(e(b"a/b"), PathError::NotAbsolute);
        assert_eq!(e(b""), PathError::NotAbsolute);
        assert_eq!(e(b"/a%zz"), PathError::BadPercent);
        assert_eq!(e(b"/a%2"), PathError::BadPercent);
        assert_eq!(e(b"/a%c0%ae"), PathError::InvalidUtf8);
        assert_eq!(e(b"/a\xff"), PathError::InvalidUtf8);
        assert_eq!(e(b"/v.mp4%00slice"), PathError::Nul);
    }

    #[test]
    fn refused_unless_raw() {
        use Violation::*;
        for (raw, want) in [
            ("/a/../b", DotSegment),
            ("/a/./b", DotSegment),
            ("/..", DotSegment),
            ("/a/%2e%2e/b", DotSegment),
            ("/a/.%2E/b", DotSegment),
            ("/a/%2e/b", DotSegment),
            ("/a/..;x/b", DotSegment),
            ("/a//b", EmptySegment),
            ("//private/x", EmptySegment),
            ("/a%2fb", EncodedSlash),
            ("/a%2Fb", EncodedSlash),
            ("/a%5cb", EncodedSlash),
            ("/a\\b", Backslash),
            ("/a%0ab", Control),
            ("/a%7f", Control),
            ("/a/%252e%252e/b", DoubleEncoded),
            ("/a%252fb", DoubleEncoded),
            ("/a%2500", DoubleEncoded),
        ] {
            assert_eq!(flagged(raw), want, "{raw}");
        }
        // Raw mode keeps such keys whole: decoded once, in normal form.
        let c = canonicalize(b"/a//b/../c%2fd").unwrap();
        assert_eq!(c.path, "/a//b/../c/d");
    }

    #[test]
    fn idempotent_on_examples() {
        for raw in ["/a b/c%2Fd", "/x/%2e%2e/y", "/caf%C3%A9;1", "/a%25b"] {
            let once = canonicalize(raw.as_bytes()).unwrap();
            let twice = canonicalize(once.path.as_bytes()).unwrap();
            assert_eq!(once.path, twice.path, "{raw}");
        }
    }

    mod prop {
        use super::super::*;
        use proptest::collection::vec;
        use proptest::prelude::*;

        /// Paths built from the pieces attacks are made of.
        fn hostile_path() -> impl Strategy<Value = Vec<u8>> {
            let piece = prop_oneof![
                Just(b"/".to_vec()),
                Just(b".".to_vec()),
                Just(b"..".to_vec()),
                Just(b"%2e".to_vec()),
                Just(b"%2E".to_vec()),
                Just(b"%2f".to_vec()),
                Just(b"%5c".to_vec()),
                Just(b"%25".to_vec()),
                Just(b"%00".to_vec()),
                Just(b";".to_vec()),
                Just(b"\\".to_vec()),
                Just(b"%c3%a9".to_vec()),
                Just(b"%ff".to_vec()),
                "[a-z0-9]{1,3}".prop_map(String::into_bytes),
                any::<u8>().prop_map(|b| vec![b]),
            ];
            vec(piece, 0..12).prop_map(|ps| {
                let mut p = b"/".to_vec();
                for x in ps {
                    p.extend(x);
                }
                p
            })
        }

        proptest! {
            /// The normal form is a fixed point: canonical twice is canonical once.
            #[test]
            fn idempotent(raw in hostile_path()) {
                if let Ok(once) = canonicalize(&raw) {
                    let twice = canonicalize(once.path.as_bytes()).expect("a normal form is valid");
                    prop_assert_eq!(&twice.path, &once.path);
                }
            }

            /// A path with nothing flagged has no dot or empty segment, no separator in a
            /// segment, no control character, and is plain ASCII in normal form.
            #[test]
            fn accepted_paths_are_clean(raw in hostile_path()) {
                if let Ok(c) = canonicalize(&raw) {
                    if c.violations.is_empty() {
                        let p = &c.path;
                        prop_assert!(p.starts_with('/'));
                        prop_assert!(p.is_ascii());
                        let segs: Vec<&str> = p[1..].split('/').collect();
                        for (i, seg) in segs.iter().enumerate() {
                            prop_assert!(!seg.is_empty() || i + 1 == segs.len(), "{}", p);
                            let d = decode(seg.as_bytes()).unwrap();
                            prop_assert!(!is_dot(&d), "{}", p);
                            prop_assert!(!d.iter().any(|&b| b == b'/' || b == b'\\' || b < 0x20 || b == 0x7f), "{}", p);
                        }
                        prop_assert!(!p.contains(';'));
                    }
                }
            }

            /// Decoding the normal form gives back exactly the client's decoded bytes
            /// (nothing gained, nothing lost), and the normal form is injective.
            #[test]
            fn normal_form_is_the_decoded_path(a in hostile_path(), b in hostile_path()) {
                if let (Ok(ca), Ok(cb)) = (canonicalize(&a), canonicalize(&b)) {
                    let (da, db) = (decode(ca.path.as_bytes()).unwrap(), decode(cb.path.as_bytes()).unwrap());
                    prop_assert_eq!(&da, &decode(&a).unwrap());
                    prop_assert_eq!(ca.path == cb.path, da == db);
                }
            }

            /// Arbitrary bytes never panic.
            #[test]
            fn never_panics(raw in vec(any::<u8>(), 0..64)) {
                let _ = canonicalize(&raw);
            }
        }
    }
}
