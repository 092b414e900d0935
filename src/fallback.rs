//! The attempt plan: which origin serves attempt k of a request, and whether an origin's
//! answer is replayed to the next fallback. Pure; the proxy asks it at two points
//! (`upstream_peer` and `upstream_response_filter`).
//!
//! Invariants: a write (anything but GET/HEAD) has exactly one attempt, on the main origin,
//! so it can never reach a fallback; in bypass mode (`skip_fallback`) reads have one attempt
//! too and the plan costs nothing beyond the main request.

use http::Method;

use crate::config::GroupConfig;

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
    replay: bool,
}

impl<'a> Plan<'a> {
    pub fn new(group: &'a GroupConfig, method: &Method) -> Plan<'a> {
        let read = method == Method::GET || method == Method::HEAD;
        Plan {
            group,
            replay: read && !group.skip_fallback && !group.fallbacks.is_empty(),
        }
    }

    /// Number of attempts this plan allows.
    pub fn len(&self) -> usize {
        if self.replay {
            1 + self.group.fallbacks.len()
        } else {
            1
        }
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The origin index and role for attempt `k` (0 = main), if the plan has one.
    pub fn origin(&self, k: usize) -> Option<(usize, Role)> {
        match k {
            0 => Some((self.group.main, Role::Main)),
            _ if self.replay => self
                .group
                .fallbacks
                .get(k - 1)
                .map(|&o| (o, Role::Fallback)),
            _ => None,
        }
    }

    /// Whether the answer `status` to attempt `k` is replayed to attempt `k + 1`.
    pub fn should_replay(&self, k: usize, status: u16) -> bool {
        self.replay && k + 1 < self.len() && self.group.fallback_on.contains(&status)
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
        let p = Plan::new(&g, &Method::GET);
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
        assert!(Plan::new(&g, &Method::HEAD).should_replay(0, 404));
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
            let p = Plan::new(&g, &m);
            assert_eq!(p.len(), 1, "{m}");
            assert_eq!(p.origin(1), None);
            assert!(!p.should_replay(0, 404));
        }
    }

    #[test]
    fn bypass_mode_has_one_attempt() {
        let g = group(vec![3], true);
        let p = Plan::new(&g, &Method::GET);
        assert_eq!(p.len(), 1);
        assert!(!p.should_replay(0, 404));
    }
}
