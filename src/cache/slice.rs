//! Slice caching (the nginx `slice` module's idea): a client Range on a large object is
//! served from one fixed-size slice, fetched from the origin with its own Range request and
//! cached under its own entry, so a seek into a 2 GiB video costs one slice, not the object.
//!
//! Pure functions: parse the client's Range, name the slice that covers its first byte, turn
//! the origin's `206` into a cacheable slice entry, and cut the client's answer out of it.
//! A range that runs past the slice's end is answered up to that end (a `206` with a shorter
//! `Content-Range`, which HTTP allows and players handle by asking for the next range).

/// Internal header on a cached slice entry: the object's total length. Never sent to clients.
pub const TOTAL_HEADER: &str = "x-cascade-slice-total";

/// A client range request mapped onto one slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SliceReq {
    pub size: u64,
    pub index: u64,
    /// First byte the client asked for.
    pub first: u64,
    /// Last byte the client asked for (inclusive), `None` = to the end.
    pub last: Option<u64>,
    /// HEAD: answer with the object's headers, learned from slice 0.
    pub head: bool,
}

impl SliceReq {
    pub fn start(&self) -> u64 {
        self.index * self.size
    }

    /// The inclusive last byte of this slice.
    pub fn end(&self) -> u64 {
        self.start().saturating_add(self.size - 1)
    }

    /// Range header for the origin request.
    pub fn upstream_range(&self) -> String {
        format!("bytes={}-{}", self.start(), self.end())
    }

    pub fn key_suffix(&self) -> String {
        format!("slice:{}:{}", self.size, self.index)
    }
}

/// Maps a request onto a slice. `None` means "not a slice request" (no Range, a multi-range
/// or suffix range, or slicing off): the caller decides what to do with it.
pub fn plan(range: Option<&str>, is_head: bool, size: u64) -> Option<SliceReq> {
    if size == 0 {
        return None;
    }
    let Some(range) = range else {
        return is_head.then_some(SliceReq {
            size,
            index: 0,
            first: 0,
            last: None,
            head: true,
        });
    };
    if is_head {
        return None;
    }
    let spec = range.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let first: u64 = a.trim().parse().ok()?;
    // A slice must fit in u64 (a client's `bytes=18446744073709551615-` is no slice).
    first.checked_add(size)?;
    let last = match b.trim() {
        "" => None,
        b => {
            let l: u64 = b.parse().ok()?;
            if l < first {
                return None;
            }
            Some(l)
        }
    };
    Some(SliceReq {
        size,
        index: first / size,
        first,
        last,
        head: false,
    })
}

/// Parses `Content-Range: bytes s-e/total` (total must be known).
pub fn parse_content_range(v: &str) -> Option<(u64, u64, u64)> {
    let spec = v.trim().strip_prefix("bytes ")?;
    let (range, total) = spec.split_once('/')?;
    let (s, e) = range.split_once('-')?;
    let (s, e, t) = (
        s.trim().parse().ok()?,
        e.trim().parse().ok()?,
        total.trim().parse().ok()?,
    );
    (s <= e && e < t).then_some((s, e, t))
}

/// How an origin's `206` for a slice's Range covers the slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coverage {
    /// Exactly the slice, or from its start to the object's end: storable.
    Exact,
    /// Starts at the slice but ends elsewhere, and holds the client's first byte: served,
    /// never stored (a stored slice must be the slice, or later hits would be cut short).
    Partial,
    /// Misses the slice's start or the client's first byte: an invalid answer.
    Unusable,
}

/// Checks `Content-Range: bytes first-last/total` against the slice asked for.
pub fn coverage(req: &SliceReq, first: u64, last: u64, total: u64) -> Coverage {
    // A first byte past the object's end is answered 416 from any answer for the slice.
    if first != req.start() || (req.first > last && req.first < total) {
        return Coverage::Unusable;
    }
    if last == req.end().min(total - 1) {
        Coverage::Exact
    } else {
        Coverage::Partial
    }
}

/// What the client gets from a slice entry holding bytes `[slice.start(), +body_len)` of an
/// object of `total` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// 206 with these absolute inclusive bounds; the body is `[lo - start, hi - start]`.
    Partial { lo: u64, hi: u64, total: u64 },
    /// 416: the first byte is past the end.
    Unsatisfiable { total: u64 },
    /// HEAD: 200 with Content-Length = total.
    Head { total: u64 },
}

pub fn answer(req: &SliceReq, total: u64, body_len: u64) -> Answer {
    if req.head {
        return Answer::Head { total };
    }
    if req.first >= total {
        return Answer::Unsatisfiable { total };
    }
    let slice_last = req.start().saturating_add(body_len.max(1) - 1);
    let hi = req.last.unwrap_or(u64::MAX).min(slice_last).min(total - 1);
    if hi < req.first {
        // Not in this entry (only an entry that is not the slice could say so).
        return Answer::Unsatisfiable { total };
    }
    Answer::Partial {
        lo: req.first,
        hi,
        total,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn ranges_map_to_slices() {
        let r = plan(Some("bytes=0-0"), false, MIB).unwrap();
        assert_eq!((r.index, r.first, r.last), (0, 0, Some(0)));
        assert_eq!(r.upstream_range(), "bytes=0-1048575");
        let r = plan(Some("bytes=5000000-"), false, MIB).unwrap();
        assert_eq!(r.index, 4);
        assert_eq!(r.upstream_range(), "bytes=4194304-5242879");
        assert!(plan(Some("bytes=-500"), false, MIB).is_none(), "suffix");
        assert!(plan(Some("bytes=0-1,5-6"), false, MIB).is_none(), "multi");
        assert!(plan(Some("bytes=9-3"), false, MIB).is_none(), "backwards");
        assert!(plan(Some("items=0-1"), false, MIB).is_none());
        assert!(plan(None, false, MIB).is_none(), "no range: whole object");
        assert!(plan(Some("bytes=0-0"), false, 0).is_none(), "slicing off");
        assert!(plan(Some("bytes=18446744073709551615-"), false, 1_000_000).is_none());
        let near = plan(Some("bytes=18446744073708551615-"), false, 1_000_000).unwrap();
        assert!(near.end() >= near.start());
        assert!(plan(None, true, MIB).unwrap().head);
    }

    #[test]
    fn answers() {
        let r = plan(Some("bytes=10-20"), false, MIB).unwrap();
        assert_eq!(
            answer(&r, 100, 100),
            Answer::Partial {
                lo: 10,
                hi: 20,
                total: 100
            }
        );
        // Past the slice end: cut at the slice.
        let r = plan(Some("bytes=1048000-1049000"), false, MIB).unwrap();
        assert_eq!(
            answer(&r, 10 * MIB, MIB),
            Answer::Partial {
                lo: 1048000,
                hi: MIB - 1,
                total: 10 * MIB
            }
        );
        // Open-ended in the last, short slice.
        let r = plan(Some("bytes=2097200-"), false, MIB).unwrap();
        assert_eq!(
            answer(&r, 2 * MIB + 100, 100),
            Answer::Partial {
                lo: 2097200,
                hi: 2 * MIB + 99,
                total: 2 * MIB + 100
            }
        );
        let r = plan(Some("bytes=500-"), false, MIB).unwrap();
        assert_eq!(answer(&r, 100, 100), Answer::Unsatisfiable { total: 100 });
    }

    #[test]
    fn coverages() {
        let r = plan(Some("bytes=10-20"), false, MIB).unwrap();
        assert_eq!(coverage(&r, 0, MIB - 1, 10 * MIB), Coverage::Exact);
        assert_eq!(coverage(&r, 0, 99, 100), Coverage::Exact, "short object");
        assert_eq!(coverage(&r, 0, 99, 10 * MIB), Coverage::Partial);
        assert_eq!(coverage(&r, 0, 2 * MIB, 10 * MIB), Coverage::Partial);
        assert_eq!(coverage(&r, 0, 5, 10 * MIB), Coverage::Unusable);
        assert_eq!(coverage(&r, 1, MIB, 10 * MIB), Coverage::Unusable);
        let last = plan(Some("bytes=2097200-"), false, MIB).unwrap();
        assert_eq!(
            coverage(&last, 2 * MIB, 2 * MIB + 99, 2 * MIB + 100),
            Coverage::Exact
        );
        assert_eq!(
            coverage(&last, 2 * MIB, 2 * MIB + 98, 2 * MIB + 100),
            Coverage::Partial
        );
    }

    #[test]
    fn content_range() {
        assert_eq!(parse_content_range("bytes 0-99/1000"), Some((0, 99, 1000)));
        assert_eq!(parse_content_range("bytes 0-99/*"), None);
        assert_eq!(parse_content_range("bytes 5-4/10"), None);
        assert_eq!(parse_content_range("bytes 0-10/10"), None);
    }

    mod prop {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            /// A client range maps to the slice holding its first byte; the origin's exact
            /// answer for that slice is storable, and the cut served from it lies inside the
            /// slice, the object and the client's range.
            #[test]
            fn slice_arithmetic(
                size in 1u64..5000,
                first in 0u64..100_000,
                len in proptest::option::of(0u64..20_000),
                total in 1u64..120_000,
            ) {
                let last = len.map(|l| first + l);
                let range = match last {
                    Some(l) => format!("bytes={first}-{l}"),
                    None => format!("bytes={first}-"),
                };
                let s = plan(Some(&range), false, size).unwrap();
                prop_assert_eq!(s.index, first / size);
                prop_assert!(s.start() <= first && first <= s.end());
                if s.start() >= total {
                    prop_assert_eq!(answer(&s, total, 0), Answer::Unsatisfiable { total });
                    return Ok(());
                }
                // Past the end but inside the last slice: a 416 from the slice's answer.
                let hi = s.end().min(total - 1);
                prop_assert_eq!(coverage(&s, s.start(), hi, total), Coverage::Exact);
                let body_len = hi - s.start() + 1;
                match answer(&s, total, body_len) {
                    Answer::Partial { lo, hi: h, total: t } => {
                        prop_assert_eq!(t, total);
                        prop_assert_eq!(lo, first);
                        prop_assert!(lo <= h && h <= hi && h < total);
                        prop_assert!(last.is_none_or(|l| h <= l));
                    }
                    Answer::Unsatisfiable { .. } => prop_assert!(first >= total),
                    Answer::Head { .. } => prop_assert!(false, "not a HEAD"),
                }
                // A shorter answer that still holds the first byte is served, never stored.
                if hi > s.start() && first < hi {
                    prop_assert_eq!(coverage(&s, s.start(), hi - 1, total), Coverage::Partial);
                }
            }
        }
    }
}
