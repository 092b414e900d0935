//! Origins of several peers: which peer an attempt goes to, and whether peers are healthy.
//!
//! ```text
//!  proxy::upstream_peer ─► Origin::pick (origin/) ─► Selector::pick (select.rs)
//!                                │                    tiers by priority, then balance:
//!                                │                    round_robin | least_outstanding |
//!                                │                    hash (ketama) | random
//!                                └─ eligibility: PeerState::usable (state.rs)
//!                                     active monitor up · not drained · not ejected
//!  attempt outcome ─► PeerState::success / failure (passive: outlier ejection)
//!                 ─► Budget::try_retry (budget.rs: retries ≤ 20% of attempts)
//!  background thread (monitor.rs) ─► active checks per peer (own Host/SNI/prefix/signature)
//!                                 ─► DNS re-resolution every `dns_refresh`
//! ```
//!
//! What comes from Pingora and what is ours: the consistent-hash ring is `pingora_ketama`'s
//! (pingora-load-balancing's own `KetamaHashing` uses it), keyed by a stable identity derived
//! from each peer's *name*. pingora-load-balancing's other parts do not fit: its `Backend` is
//! identified by IP:port and weight (two buckets behind one MinIO would be one backend, a
//! weight change a new backend with fresh health), its weighted selection weights only the
//! first pick, it has no least-outstanding selection and no passive health, and its
//! `HttpHealthCheck` has one Host/SNI template for every backend and cannot sign. So
//! selection, passive health, the retry budget, the monitor and DNS refresh are written here,
//! small and lock-free on the request path.

pub mod budget;
pub mod monitor;
pub mod select;
pub mod state;

pub use budget::Budget;
pub use select::{Member, Selector};
pub use state::{now_ms, CheckResult, PeerState, Status, Verdict};
