//! Gauges read when scraped, from the state that already holds their values.
//!
//! A value the proxy keeps anyway for its own decisions (a peer's attempts in flight, which
//! the least-outstanding balancer reads) need not be kept twice: a second gauge updated next
//! to it costs two more atomic operations per attempt on a line every worker thread shares,
//! and can drift from the value it copies. A [`SampledGaugeVec`] asks its sources at scrape
//! time instead; series with the same label values from two sources (two configs' origins
//! alive at once) are added up, as one shared gauge would have counted them.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;
use prometheus::core::{Collector, Desc};
use prometheus::proto;

/// Writes a source's series, label values then value, into the sink it is given; `false`
/// once what it reads is gone (then it is dropped).
type Source = Box<dyn Fn(&mut dyn FnMut(&[&str], i64)) -> bool + Send + Sync>;

struct Inner {
    desc: Desc,
    sources: Mutex<Vec<Source>>,
}

/// A gauge family whose series come from sources read at every scrape.
#[derive(Clone)]
pub struct SampledGaugeVec {
    inner: Arc<Inner>,
}

impl SampledGaugeVec {
    pub fn new(name: &str, help: &str, labels: &[&str]) -> SampledGaugeVec {
        let desc = super::desc(name, help, labels);
        SampledGaugeVec {
            inner: Arc::new(Inner {
                desc,
                sources: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Adds a source. It is called at every scrape (with the family's lock held: it should
    /// only read) until it returns `false`.
    pub fn add_source(
        &self,
        source: impl Fn(&mut dyn FnMut(&[&str], i64)) -> bool + Send + Sync + 'static,
    ) {
        self.inner.sources.lock().push(Box::new(source));
    }

    /// Every series now: label values and value, sorted by label values.
    fn sample(&self) -> BTreeMap<Vec<String>, i64> {
        let labels = self.inner.desc.variable_labels.len();
        let mut series: BTreeMap<Vec<String>, i64> = BTreeMap::new();
        self.inner.sources.lock().retain(|source| {
            source(&mut |values, v| {
                assert_eq!(values.len(), labels, "{}", self.inner.desc.fq_name);
                let key = values.iter().map(|s| s.to_string()).collect();
                *series.entry(key).or_default() += v;
            })
        });
        series
    }
}

impl Collector for SampledGaugeVec {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.inner.desc]
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let desc = &self.inner.desc;
        let metrics = self
            .sample()
            .into_iter()
            .map(|(values, v)| {
                let mut g = proto::Gauge::default();
                g.set_value(v as f64);
                let mut m = super::labeled_metric(desc, &values);
                m.set_gauge(g);
                m
            })
            .collect();
        super::family(desc, proto::MetricType::GAUGE, metrics)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{IntGaugeVec, Opts, Registry};
    use std::sync::atomic::{AtomicI64, Ordering};

    use crate::metrics::text_of as text;

    /// The exposition is prometheus's own gauge's for the same values; sources with the same
    /// series add up; a source whose state is gone stops being asked and its series go.
    #[test]
    fn reads_its_sources_at_each_scrape() {
        let ours = Registry::new();
        let v = SampledGaugeVec::new("g_in_flight", "help", &["origin", "peer"]);
        ours.register(Box::new(v.clone())).unwrap();
        let a = Arc::new(AtomicI64::new(3));
        let b = Arc::new(AtomicI64::new(0));
        for (state, peers) in [(&a, ["p1", "p2"]), (&b, ["p2", "p3"])] {
            let weak = Arc::downgrade(state);
            v.add_source(move |out| match weak.upgrade() {
                Some(n) => {
                    for p in peers {
                        out(&["o", p], n.load(Ordering::Relaxed));
                    }
                    true
                }
                None => false,
            });
        }
        b.store(2, Ordering::Relaxed);
        let theirs = Registry::new();
        let p = IntGaugeVec::new(Opts::new("g_in_flight", "help"), &["origin", "peer"]).unwrap();
        theirs.register(Box::new(p.clone())).unwrap();
        p.with_label_values(&["o", "p1"]).set(3);
        p.with_label_values(&["o", "p2"]).set(5);
        p.with_label_values(&["o", "p3"]).set(2);
        assert_eq!(text(&ours), text(&theirs));
        // Read again at the next scrape, not kept.
        a.store(0, Ordering::Relaxed);
        assert!(text(&ours).contains("g_in_flight{origin=\"o\",peer=\"p1\"} 0"));
        drop(a);
        let after = text(&ours);
        assert!(!after.contains("peer=\"p1\""), "{after}");
        assert!(after.contains("g_in_flight{origin=\"o\",peer=\"p2\"} 2"));
        assert_eq!(v.inner.sources.lock().len(), 1);
    }
}
