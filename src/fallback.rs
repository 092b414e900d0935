//! The attempt plan: which origin serves attempt k of a request, and whether an origin's
//! answer is replayed to the next fallback. Pure; the proxy asks it at two points
//! (`upstream_peer` and `upstream_response_filter`).
//!
//! Invariants: a write (anything but GET/HEAD) has exactly one attempt, on the main origin,
//! so it can never reach a fallback; in bypass mode (`skip_fallback`) reads have one attempt
//! too and the plan costs nothing beyond the main request.

use http::Method;

use crate::config::{GroupConfig, MAX_MEMBERS};

/// The origins a plan tries before the fallbacks, when they are not just the group's main
/// (a bucket set: the member that holds the key, or the members in lookup order). Inline and
/// `Copy`: a plan costs no allocation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mains {
    ix: [u16; MAX_MEMBERS],
    len: u8,
}

impl Mains {
    pub fn push(&mut self, origin: usize) {
        if (self.len as usize) < MAX_MEMBERS {
            self.ix[self.len as usize] = origin as u16;
            self.len += 1;
        }
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, k: usize) -> Option<usize> {
        (k < self.len()).then(|| self.ix[k] as usize)
    }
}

/// The role of the origin that serves an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Main,
    Fallback,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Main => "main",
            Role::Fallback => "fallback",
        }
    }
}

/// The ordered origins a request may try.
#[derive(Debug, Clone, Copy)]
pub struct Plan<'a> {
    group: &'a GroupConfig,
    /// Reads go on to the fallbacks.
    replay: bool,
    read: bool,
    /// `None`: the group's main alone.
    mains: Option<Mains>,
}

impl<'a> Plan<'a> {
    pub fn new(group: &'a GroupConfig, method: &Method, mains: Option<Mains>) -> Plan<'a> {
        let read = method == Method::GET || method == Method::HEAD;
        Plan {
            group,
            replay: read && !group.skip_fallback && !group.fallbacks.is_empty(),
            read,
            mains: mains.filter(|m| !m.is_empty()),
        }
    }

    fn mains_len(&self) -> usize {
        self.mains.map_or(1, |m| m.len())
    }

    /// Number of attempts this plan allows.
    pub fn len(&self) -> usize {
        if self.replay {
            self.mains_len() + self.group.fallbacks.len()
        } else {
            self.mains_len()
        }
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The origin index and role for attempt `k` (0 = main), if the plan has one.
    pub fn origin(&self, k: usize) -> Option<(usize, Role)> {
        let mains = self.mains_len();
        if k < mains {
            return Some((
                self.mains
                    .map_or(self.group.main, |m| m.get(k).expect("k < len")),
                Role::Main,
            ));
        }
        if !self.replay {
            return None;
        }
        self.group
            .fallbacks
            .get(k - mains)
            .map(|&o| (o, Role::Fallback))
    }

    /// Whether the answer `status` to attempt `k` is replayed to attempt `k + 1` (the next
    /// member of a bucket set, or the next fallback).
    pub fn should_replay(&self, k: usize, status: u16) -> bool {
        self.read && k + 1 < self.len() && self.group.fallback_on.contains(&status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CacheFallback;

    fn group(fallbacks: Vec<usize>, skip: bool) -> GroupConfig {
        GroupConfig {
            name: "g".into(),
            main: 7,
            fallbacks,
            fallback_on: vec![403, 404],
            skip_fallback: skip,
            cache_fallback: CacheFallback::None,
            ..Default::default()
        }
    }

    #[test]
    fn reads_walk_the_fallbacks_in_order() {
        let g = group(vec![3, 5], false);
        let p = Plan::new(&g, &Method::GET, None);
        assert_eq!(p.len(), 3);
        assert_eq!(p.origin(0), Some((7, Role::Main)));
        assert_eq!(p.origin(1), Some((3, Role::Fallback)));
        assert_eq!(p.origin(2), Some((5, Role::Fallback)));
        assert_eq!(p.origin(3), None);
        assert!(p.should_replay(0, 404));
        assert!(p.should_replay(1, 403));
        assert!(
            !p.should_replay(2, 404),
            "the last answer goes to the client"
        );
        assert!(!p.should_replay(0, 500));
        assert!(!p.should_replay(0, 200));
        assert!(Plan::new(&g, &Method::HEAD, None).should_replay(0, 404));
    }

    #[test]
    fn writes_never_reach_a_fallback() {
        let g = group(vec![3], false);
        for m in [
            Method::PUT,
            Method::POST,
            Method::DELETE,
            Method::PATCH,
            Method::OPTIONS,
        ] {
            let p = Plan::new(&g, &m, None);
            assert_eq!(p.len(), 1, "{m}");
            assert_eq!(p.origin(1), None);
            assert!(!p.should_replay(0, 404));
        }
    }

    #[test]
    fn bypass_mode_has_one_attempt() {
        let g = group(vec![3], true);
        let p = Plan::new(&g, &Method::GET, None);
        assert_eq!(p.len(), 1);
        assert!(!p.should_replay(0, 404));
    }

    #[test]
    fn a_bucket_set_plan_walks_its_members_then_the_fallbacks() {
        let g = group(vec![3], false);
        let mut m = Mains::default();
        for o in [10, 11, 12] {
            m.push(o);
        }
        let p = Plan::new(&g, &Method::GET, Some(m));
        assert_eq!(p.len(), 4);
        assert_eq!(p.origin(0), Some((10, Role::Main)));
        assert_eq!(p.origin(2), Some((12, Role::Main)));
        assert_eq!(p.origin(3), Some((3, Role::Fallback)));
        assert!(p.should_replay(0, 404) && p.should_replay(2, 404));
        // Bypass mode skips the fallbacks, not the members.
        let g = group(vec![3], true);
        let p = Plan::new(&g, &Method::GET, Some(m));
        assert_eq!(p.len(), 3);
        assert!(p.should_replay(1, 404) && !p.should_replay(2, 404));
        // A write has its one member.
        let mut one = Mains::default();
        one.push(11);
        let p = Plan::new(&g, &Method::PUT, Some(one));
        assert_eq!(
            (p.len(), p.origin(0), p.origin(1)),
            (1, Some((11, Role::Main)), None)
        );
        assert!(!p.should_replay(0, 404));
    }
}
