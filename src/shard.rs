//! Per-thread shard numbers, for state that every worker thread touches on every request
//! (timing histograms, plugin instance pools): each thread works in its own shard, so the
//! cache lines and locks it takes stay in its core's cache instead of moving between cores.
//!
//! A thread takes the next number round-robin the first time it asks and keeps it. There
//! are twice as many shards as cores and the worker threads ask on their first request, so
//! they usually get one each (other threads, e.g. the one that loads the config, take numbers
//! too); a shared shard is only slower, never wrong.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::LazyLock;

/// Shards per sharded structure: a power of two, two per thread that can run at once (at
/// least 4, at most 64).
static SHARDS: LazyLock<usize> = LazyLock::new(|| {
    let threads = std::thread::available_parallelism().map_or(8, |n| n.get());
    (threads * 2).next_power_of_two().clamp(4, 64)
});

/// The number the next thread takes.
static NEXT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static MINE: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// How many shards a sharded structure has (a power of two, 4 to 64).
pub fn count() -> usize {
    *SHARDS
}

/// This thread's shard, in `0..count()`.
#[inline]
pub fn of_thread() -> usize {
    MINE.with(|s| match s.get() {
        usize::MAX => {
            let n = NEXT.fetch_add(1, Ordering::Relaxed) & (count() - 1);
            s.set(n);
            n
        }
        n => n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_keeps_its_shard_and_threads_spread_over_them() {
        let n = count();
        assert!(n.is_power_of_two() && (4..=64).contains(&n));
        let mine = of_thread();
        assert!(mine < n);
        assert_eq!(of_thread(), mine, "a thread keeps its shard");
        // n threads take n consecutive numbers, so they spread over the shards (other tests'
        // threads may take numbers in between under `cargo test`, hence only "not all one").
        let mut got: Vec<usize> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..n).map(|_| s.spawn(of_thread)).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(got.iter().all(|&g| g < n));
        got.sort_unstable();
        got.dedup();
        assert!(got.len() > 1, "{n} threads all took one shard");
    }
}
