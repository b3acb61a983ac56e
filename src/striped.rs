//! Per-thread stripes of state that every request writes: the audit shards and the request
//! counters. One location written by every request, from whichever core runs it, moves its
//! cache line between the cores on every request; a stripe per thread, each on a cache line of
//! its own, keeps those writes local. Readers (metrics scrapes, the audit writer) visit every
//! stripe.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;

/// This thread's number: threads are numbered once, in the order they first ask.
fn thread_number() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static NUMBER: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    NUMBER.with(|n| *n)
}

/// Stripes for twice as many threads as there are cores (the runtime's workers and the
/// blocking threads that also serve requests), within bounds. Threads beyond that share
/// stripes, which stays correct: a stripe is only ever touched through atomics or a lock.
fn stripe_count() -> usize {
    std::thread::available_parallelism()
        .map_or(4, |n| n.get() * 2)
        .clamp(4, 64)
}

/// One `T` per thread stripe, each on its own cache line.
#[derive(Debug)]
pub struct Striped<T> {
    stripes: Box<[CachePadded<T>]>,
}

impl<T> Striped<T> {
    pub fn new(mut make: impl FnMut() -> T) -> Self {
        Striped {
            stripes: (0..stripe_count())
                .map(|_| CachePadded::new(make()))
                .collect(),
        }
    }

    /// The calling thread's stripe.
    pub fn local(&self) -> &T {
        &self.stripes[thread_number() % self.stripes.len()]
    }

    /// Every stripe, for readers.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.stripes.iter().map(|s| &**s)
    }
}

impl<T: Default> Default for Striped<T> {
    fn default() -> Self {
        Striped::new(T::default)
    }
}

/// A counter that requests bump without sharing a cache line; reading it sums the stripes.
#[derive(Debug, Default)]
pub struct Counter(Striped<AtomicU64>);

impl Counter {
    pub fn incr(&self) {
        self.0.local().fetch_add(1, Ordering::Relaxed);
    }

    /// The sum over all threads. Not a snapshot: increments racing with the read may or may
    /// not be in it, as with a single atomic read at some point during the call.
    pub fn get(&self) -> u64 {
        self.0.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn increments_from_many_threads_all_count() {
        let c = Counter::default();
        std::thread::scope(|s| {
            for _ in 0..(stripe_count() + 3) {
                s.spawn(|| {
                    for _ in 0..1000 {
                        c.incr();
                    }
                });
            }
        });
        assert_eq!(c.get(), (stripe_count() as u64 + 3) * 1000);
    }

    #[test]
    fn a_thread_keeps_its_stripe_and_stripes_do_not_share_cache_lines() {
        let s: Striped<AtomicU64> = Striped::default();
        let a: *const AtomicU64 = s.local();
        assert!(std::ptr::eq(a, s.local()));
        let addrs: Vec<usize> = s.iter().map(|t| t as *const AtomicU64 as usize).collect();
        for pair in addrs.windows(2) {
            assert!(
                pair[1] - pair[0] >= 64,
                "stripes {pair:?} share a cache line"
            );
        }
    }
}
