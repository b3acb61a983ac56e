//! Per-caller and global request limits: a token bucket per caller identity (in a bounded
//! map whose idle entries expire, so memory stays bounded however many identities appear)
//! and a cap on requests in flight, beyond which requests are shed rather than queued.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_utils::CachePadded;
use tokio::time::Instant;

use crate::config::LimitsConfig;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Request limits. Cheap to share.
#[derive(Debug)]
pub struct Limits {
    rate: f64,
    burst: f64,
    buckets: moka::sync::Cache<String, Arc<Mutex<Bucket>>>,
    // A count, not a semaphore: nothing ever waits for a slot, and releasing a semaphore's
    // permit takes its waiters' lock on every request. On a cache line of its own: every
    // request writes it from whichever thread, and the fields beside it are read as often.
    in_flight: CachePadded<AtomicUsize>,
    max_in_flight: usize,
}

/// One request's slot among those in flight; freed when dropped.
#[derive(Debug)]
pub struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Release);
    }
}

impl Limits {
    pub fn new(cfg: &LimitsConfig) -> Self {
        Limits {
            rate: cfg.caller_rate_per_sec,
            burst: f64::from(cfg.caller_burst),
            // An idle caller's bucket refills to full anyway: dropping it loses nothing.
            buckets: moka::sync::Cache::builder()
                .max_capacity(cfg.max_callers)
                .time_to_idle(cfg.caller_idle)
                .build(),
            in_flight: CachePadded::new(AtomicUsize::new(0)),
            max_in_flight: cfg.max_in_flight,
        }
    }

    /// Takes one token from the caller's bucket, or says how long until one is available.
    pub fn check_caller(&self, caller: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let bucket = self.buckets.get_with_by_ref(caller, || {
            Arc::new(Mutex::new(Bucket {
                tokens: self.burst,
                at: now,
            }))
        });
        let mut b = bucket.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / self.rate))
        }
    }

    /// A slot for one request in flight, or `None` when the broker is at its limit.
    pub fn enter(&self) -> Option<InFlight<'_>> {
        let before = self.in_flight.fetch_add(1, Ordering::Acquire);
        // Holds the count just taken: handed back at once when over the limit.
        let slot = InFlight(&self.in_flight);
        (before < self.max_in_flight).then_some(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(rate: f64, burst: u32, in_flight: usize) -> LimitsConfig {
        LimitsConfig {
            caller_rate_per_sec: rate,
            caller_burst: burst,
            max_callers: 1000,
            caller_idle: Duration::from_secs(600),
            max_in_flight: in_flight,
            max_request_bytes: 16 * 1024,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_over_the_limit_waits_for_refill_and_other_callers_are_unaffected() {
        let l = Limits::new(&cfg(2.0, 3, 10));
        for _ in 0..3 {
            l.check_caller("a").unwrap();
        }
        let wait = l.check_caller("a").unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        l.check_caller("b").unwrap();
        tokio::time::advance(Duration::from_millis(500)).await;
        l.check_caller("a").unwrap();
        assert!(l.check_caller("a").is_err());
        // A long pause refills to the burst, not beyond.
        tokio::time::advance(Duration::from_secs(60)).await;
        for _ in 0..3 {
            l.check_caller("a").unwrap();
        }
        assert!(l.check_caller("a").is_err());
    }

    #[test]
    fn in_flight_requests_are_capped_and_released() {
        let l = Limits::new(&cfg(1.0, 1, 2));
        let a = l.enter().unwrap();
        let b = l.enter().unwrap();
        // Refused requests hand their count back.
        for _ in 0..5 {
            assert!(l.enter().is_none());
        }
        drop(a);
        let c = l.enter().unwrap();
        assert!(l.enter().is_none());
        drop((b, c));
        let _both = (l.enter().unwrap(), l.enter().unwrap());
        assert!(l.enter().is_none());
    }
}
