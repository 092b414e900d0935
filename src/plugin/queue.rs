//! Shared queues (`proxy_register_shared_queue`, `_resolve_`, `_enqueue_`, `_dequeue_`): byte
//! messages any context may enqueue, consumed by the root context of the plugin that
//! registered the queue when `proxy_on_queue_ready` tells it there is something to read.
//!
//! A queue belongs to a plugin (its name plays Envoy's `vm_id`; an empty `vm_id` resolves in
//! the caller's own plugin) and outlives reloads, like shared data. Every instance of the
//! plugin registers the same name at configure time and gets the same id. Enqueueing marks
//! the queue ready; the tick thread then delivers `proxy_on_queue_ready` to one idle instance
//! of the owner (batched: several enqueues between two deliveries make one call). Queues are
//! bounded ([`MAX_ITEMS`], [`MAX_BYTES`]): a full queue drops its oldest messages (counted in
//! `cascade_plugin_queue_dropped_total`), because the SDKs panic on any error status there;
//! a message larger than a whole queue is dropped without being copied. A plugin registers
//! at most `limits::MAX_QUEUES` queues (they live as long as the process).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::metrics::METRICS;

/// Most messages a queue holds.
pub const MAX_ITEMS: usize = 65_536;
/// Most bytes a queue holds.
pub const MAX_BYTES: usize = 16 << 20;

struct Queue {
    /// The plugin that registered it (receives `proxy_on_queue_ready`).
    owner: Arc<str>,
    items: VecDeque<Vec<u8>>,
    bytes: usize,
    /// Enqueued since the owner was last told.
    ready: bool,
}

#[derive(Default)]
struct Registry {
    /// (owner plugin, queue name) → id (index + 1).
    ids: HashMap<(Arc<str>, Vec<u8>), u32>,
    queues: Vec<Queue>,
}

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);

fn with<R>(f: impl FnOnce(&mut Registry) -> R) -> R {
    f(REGISTRY.lock().get_or_insert_with(Registry::default))
}

/// The id of `plugin`'s queue `name`, created on first registration; `None` when that would
/// give the plugin more than `max` queues (queues are never removed).
pub fn register(plugin: &Arc<str>, name: &[u8], max: usize) -> Option<u32> {
    with(|r| {
        let key = (plugin.clone(), name.to_vec());
        if let Some(&id) = r.ids.get(&key) {
            return Some(id);
        }
        if r.queues.iter().filter(|q| q.owner == *plugin).count() >= max {
            return None;
        }
        r.queues.push(Queue {
            owner: plugin.clone(),
            items: VecDeque::new(),
            bytes: 0,
            ready: false,
        });
        let id = r.queues.len() as u32;
        r.ids.insert(key, id);
        Some(id)
    })
}

/// The id of queue `name` of plugin `vm_id` (`""`: the caller's plugin `own`).
pub fn resolve(own: &Arc<str>, vm_id: &[u8], name: &[u8]) -> Option<u32> {
    let owner: Arc<str> = if vm_id.is_empty() {
        own.clone()
    } else {
        Arc::from(std::str::from_utf8(vm_id).ok()?)
    };
    with(|r| r.ids.get(&(owner, name.to_vec())).copied())
}

/// Appends `value`; `false` when there is no queue `id`. A full queue drops its oldest
/// messages to make room (a message larger than the whole queue is dropped itself).
pub fn enqueue(id: u32, value: Vec<u8>) -> bool {
    with(|r| {
        let Some(q) = (id as usize)
            .checked_sub(1)
            .and_then(|i| r.queues.get_mut(i))
        else {
            return false;
        };
        let mut dropped = 0;
        if value.len() > MAX_BYTES {
            dropped += 1;
        } else {
            while q.items.len() >= MAX_ITEMS || q.bytes + value.len() > MAX_BYTES {
                let Some(old) = q.items.pop_front() else {
                    break;
                };
                q.bytes -= old.len();
                dropped += 1;
            }
            q.bytes += value.len();
            q.items.push_back(value);
            q.ready = true;
        }
        if dropped > 0 {
            METRICS
                .plugin_queue_dropped
                .with_label_values(&[&q.owner])
                .inc_by(dropped);
        }
        true
    })
}

/// Counts a message too large for any queue as dropped by queue `id` without taking it;
/// `false` when there is no queue `id`.
pub fn drop_one(id: u32) -> bool {
    with(|r| {
        let Some(q) = (id as usize).checked_sub(1).and_then(|i| r.queues.get(i)) else {
            return false;
        };
        METRICS
            .plugin_queue_dropped
            .with_label_values(&[&q.owner])
            .inc();
        true
    })
}

/// The oldest message: `Err(())` when there is no queue `id`, `Ok(None)` when it is empty.
pub fn dequeue(id: u32) -> Result<Option<Vec<u8>>, ()> {
    with(|r| {
        let q = (id as usize)
            .checked_sub(1)
            .and_then(|i| r.queues.get_mut(i))
            .ok_or(())?;
        let item = q.items.pop_front();
        if let Some(v) = &item {
            q.bytes -= v.len();
        }
        Ok(item)
    })
}

/// The queues with news for their owner: `(owner, id)`, each marked told.
pub fn take_ready() -> Vec<(Arc<str>, u32)> {
    with(|r| {
        r.queues
            .iter_mut()
            .enumerate()
            .filter_map(|(i, q)| {
                std::mem::take(&mut q.ready).then(|| (q.owner.clone(), i as u32 + 1))
            })
            .collect()
    })
}

/// Marks queue `id` ready again (its owner had no idle instance to tell).
pub fn mark_ready(id: u32) {
    with(|r| {
        if let Some(q) = (id as usize)
            .checked_sub(1)
            .and_then(|i| r.queues.get_mut(i))
        {
            q.ready = true;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_are_per_plugin_bounded_and_fifo() {
        let a: Arc<str> = Arc::from("queue-test-a");
        let b: Arc<str> = Arc::from("queue-test-b");
        let id = register(&a, b"events", 2).unwrap();
        assert_eq!(
            register(&a, b"events", 2),
            Some(id),
            "same plugin, same name, same id"
        );
        assert_ne!(register(&b, b"events", 2), Some(id));
        assert!(register(&a, b"second", 2).is_some());
        assert_eq!(register(&a, b"third", 2), None, "two queues at most");
        assert_eq!(
            register(&a, b"events", 2),
            Some(id),
            "an existing one resolves"
        );
        assert_eq!(resolve(&a, b"", b"events"), Some(id));
        assert_eq!(resolve(&b, b"queue-test-a", b"events"), Some(id));
        assert_eq!(resolve(&a, b"nope", b"events"), None);
        assert_eq!(dequeue(id), Ok(None));
        assert!(enqueue(id, b"1".to_vec()) && enqueue(id, b"2".to_vec()));
        assert!(take_ready()
            .iter()
            .any(|(o, i)| *i == id && **o == *"queue-test-a"));
        assert!(!take_ready().iter().any(|(_, i)| *i == id), "told once");
        assert_eq!(dequeue(id), Ok(Some(b"1".to_vec())));
        assert_eq!(dequeue(id), Ok(Some(b"2".to_vec())));
        assert!(!enqueue(u32::MAX, Vec::new()));
        assert_eq!(dequeue(0), Err(()));
        // Full: the oldest go.
        let big = vec![7u8; MAX_BYTES / 2];
        for _ in 0..3 {
            assert!(enqueue(id, big.clone()));
        }
        assert!(dequeue(id).unwrap().is_some());
        assert!(dequeue(id).unwrap().is_some());
        assert_eq!(
            dequeue(id),
            Ok(None),
            "two halves fit; the first was dropped"
        );
    }
}
