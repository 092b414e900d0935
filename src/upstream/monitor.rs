//! Background work for peers, on the `peer-monitor` thread (never a proxy worker): active
//! health checks, DNS re-resolution, and the `cascade_peer_up` gauges.
//!
//! A check is a real request to the peer, built by the peer's own `rewrite` (its Host, SNI,
//! path prefix, and SigV4 signature on a signed peer), made over a connector of this thread's
//! own, bounded by `health.timeout`. It fails on a connect error, a timeout, a status outside
//! `expected_codes`, or a body without `expected_body` (case-insensitive, within the first
//! 64 KiB). `rise` successes in a row bring a down peer up, `fall` failures take an up peer
//! down; each change is logged once.
//!
//! Readiness: peers serve from the start (as nginx and Pingora do); [`ready`] turns true once
//! every monitored peer has had its first check, for `/readyz`.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pingora_core::connectors::http::Connector;

use super::state::{now_ms, CheckResult};
use crate::config::HealthConfig;
use crate::metrics::METRICS;
use crate::origin::fetch::{fetch, Own};
use crate::origin::{Origin, Peer};

/// Monitored peers that have not had their first check yet.
static PENDING: AtomicUsize = AtomicUsize::new(0);

/// Every monitored peer has had its first check (true when nothing is monitored).
pub fn ready() -> bool {
    PENDING.load(Relaxed) == 0
}

/// The most of a check's body read to look for `expected_body`.
const MAX_CHECK_BODY: usize = 64 * 1024;

/// Starts the monitor thread for `origins`: checks, DNS refresh, gauges.
pub fn start(origins: Arc<[Origin]>) {
    let monitored: usize = origins
        .iter()
        .filter(|o| o.health.is_some())
        .map(|o| o.peers.len())
        .sum();
    PENDING.store(monitored, Relaxed);
    crate::background::spawn("peer-monitor", "peer health checks", move || async move {
        let connector = Arc::new(Connector::new(None));
        let mut tasks = Vec::new();
        for (oi, o) in origins.iter().enumerate() {
            for pi in 0..o.peers.len() {
                if o.health.is_some() {
                    tasks.push(tokio::spawn(check_loop(
                        origins.clone(),
                        oi,
                        pi,
                        connector.clone(),
                    )));
                }
                if o.peers[pi].needs_dns() {
                    tasks.push(tokio::spawn(dns_loop(origins.clone(), oi, pi)));
                }
            }
        }
        // The `up` gauges follow ejections ending too (nobody else sees that moment).
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let now = now_ms();
            for o in origins.iter() {
                for p in &o.peers {
                    p.metrics.up.set(i64::from(p.state.usable(now)));
                }
            }
        }
    });
}

async fn check_loop(origins: Arc<[Origin]>, oi: usize, pi: usize, connector: Arc<Connector>) {
    let origin = &origins[oi];
    let health = origin.health.as_ref().expect("monitored");
    let peer = &origin.peers[pi];
    // Spread the peers' checks over the interval rather than firing them all at once.
    let spread = health.interval.as_millis() as u64 * pi as u64 / origin.peers.len() as u64;
    tokio::time::sleep(Duration::from_millis(spread.min(1000))).await;
    let mut first = true;
    let mut tick = tokio::time::interval(health.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let r = check(&connector, peer, health).await;
        let ok = r.ok;
        let detail = r.detail.clone();
        METRICS
            .health_checks
            .with_label_values(&[
                origin.name.as_str(),
                peer.name.as_str(),
                if ok { "ok" } else { "fail" },
            ])
            .inc();
        match peer.state.checked(r, health.rise, health.fall) {
            Some(true) => log::warn!(
                "origin `{}`: peer `{}` is up ({} checks passed)",
                origin.name,
                peer.name,
                health.rise
            ),
            Some(false) => log::warn!(
                "origin `{}`: peer `{}` is down ({} checks failed; last: {detail})",
                origin.name,
                peer.name,
                health.fall
            ),
            None => {}
        }
        peer.metrics.up.set(i64::from(peer.state.usable(now_ms())));
        if std::mem::take(&mut first) {
            PENDING.fetch_sub(1, Relaxed);
        }
    }
}

/// One active check of `peer`.
pub async fn check(connector: &Connector, peer: &Peer, h: &HealthConfig) -> CheckResult {
    let t0 = Instant::now();
    let outcome = tokio::time::timeout(h.timeout, probe(connector, peer, h)).await;
    let (ok, detail) = match outcome {
        Ok(Ok(())) => (true, "ok".to_string()),
        Ok(Err(why)) => (false, why),
        Err(_) => (false, format!("timeout after {:?}", h.timeout)),
    };
    CheckResult {
        ok,
        detail,
        latency: t0.elapsed(),
        at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    }
}

async fn probe(connector: &Connector, peer: &Peer, h: &HealthConfig) -> Result<(), String> {
    let (key, query) = match h.target.split_once('?') {
        Some((k, q)) => (k, Some(q)),
        None => (h.target.as_str(), None),
    };
    let limit = if h.expected_body.is_some() {
        MAX_CHECK_BODY
    } else {
        0
    };
    let a = fetch(
        connector,
        peer,
        Own {
            method: h.method.clone(),
            key,
            query,
            agent: "cascade-health-check",
            limit,
            pool: false,
        },
    )
    .await?;
    let status = a.status;
    if !h
        .expected
        .iter()
        .any(|&(lo, hi)| (lo..=hi).contains(&status))
    {
        return Err(format!("status {status}"));
    }
    if let Some(want) = &h.expected_body {
        let hay = String::from_utf8_lossy(&a.body).to_ascii_lowercase();
        if !hay.contains(&want.to_ascii_lowercase()) {
            return Err(format!("status {status}, body without {want:?}"));
        }
    }
    Ok(())
}

async fn dns_loop(origins: Arc<[Origin]>, oi: usize, pi: usize) {
    let origin = &origins[oi];
    let peer = &origin.peers[pi];
    let mut tick = tokio::time::interval(origin.dns_refresh);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // resolved at start already
    loop {
        tick.tick().await;
        let Some((host, port)) = peer.dns_name() else {
            return;
        };
        match tokio::net::lookup_host((host, port)).await {
            Ok(found) => {
                let mut addrs: Vec<_> = found.collect();
                addrs.sort();
                addrs.dedup();
                if addrs.is_empty() {
                    log::warn!(
                        "origin `{}`: peer `{}`: {host} resolved to nothing; keeping {:?}",
                        origin.name,
                        peer.name,
                        peer.addrs()
                    );
                } else if peer.replace_addrs(&addrs) {
                    log::info!(
                        "origin `{}`: peer `{}`: {host} now resolves to {addrs:?}",
                        origin.name,
                        peer.name
                    );
                }
            }
            Err(e) => log::warn!(
                "origin `{}`: peer `{}`: cannot resolve {host} ({e}); keeping {:?}",
                origin.name,
                peer.name,
                peer.addrs()
            ),
        }
    }
}
