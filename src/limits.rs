//! Per-caller and global request limits: a token bucket per caller identity (at most
//! `max_callers`, each kept until idle, new callers refused past that, so memory stays
//! bounded however many identities appear and none escapes its rate by being one too many),
//! a cap on requests in flight, beyond which requests are shed rather than queued, and the
//! bucket type the bearer-token verifier uses to limit failed authentications per address.

use std::borrow::Borrow;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_utils::CachePadded;
use tokio::time::Instant;

use crate::config::LimitsConfig;

/// The lowest rate a limit may be configured with (a request in about 17 minutes): below it,
/// the time until the next token is beyond any useful `retry-after`.
pub const MIN_RATE: f64 = 0.001;
/// The longest wait a bucket tells of, whatever its rate.
const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);
/// The longest an idle bucket is kept for it to refill (the cache library needs a bound; a
/// bucket slower than this, a burst of millions at the lowest rate, is forgotten sooner).
const MAX_REFILL_KEPT: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Refills for the time since the last look; whether a token is there, or how long
    /// until one is.
    fn refill(&mut self, now: Instant, rate: f64, burst: f64) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            Ok(())
        } else {
            // A tiny rate makes this huge (or infinite): bounded, never a panic.
            Err(Duration::try_from_secs_f64((1.0 - self.tokens) / rate)
                .map_or(MAX_WAIT, |d| d.min(MAX_WAIT)))
        }
    }
}

/// Why a bucket gave no token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The key's bucket is empty: a token is there after this wait.
    Wait(Duration),
    /// The key has no bucket and none can be kept for it (`Buckets::kept`: every place is
    /// held by a key seen within the idle time); one frees within this wait at the latest.
    Full(Duration),
}

/// A key's bucket, and its requests in flight (counted only by `Limits`, per caller).
#[derive(Debug)]
struct Entry {
    bucket: Mutex<Bucket>,
    in_flight: AtomicUsize,
}

/// Token buckets by key, in a map whose idle entries are dropped (an idle bucket refills to
/// full anyway: dropping it loses nothing). Bounded in one of two ways: `new` drops the
/// least useful entry when full (a bucket dropped early is a full one for its key: fine for
/// failed authentications, whose keys are addresses anyone can present); `kept` never drops
/// a bucket before it is idle, and refuses new keys while full (a caller's rate).
pub struct Buckets<K> {
    rate: f64,
    burst: f64,
    map: moka::sync::Cache<K, Arc<Entry>>,
    /// For `kept`: the entries held and the most there may be.
    held: Option<Arc<Held>>,
    /// How long an unused entry is kept.
    idle: Duration,
}

#[derive(Debug)]
struct Held {
    count: AtomicUsize,
    max: usize,
}

impl<K> std::fmt::Debug for Buckets<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buckets")
            .field("rate", &self.rate)
            .field("burst", &self.burst)
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Send + Sync + 'static> Buckets<K> {
    /// How long an unused bucket is kept: `idle`, but not less than the time it takes to
    /// refill: a bucket forgotten is a full one, and an empty one forgotten early would let
    /// its key past its rate (a burst every `idle` seconds, whatever the rate).
    fn kept_idle(rate: f64, burst: u32, idle: Duration) -> Duration {
        let refill = Duration::try_from_secs_f64(f64::from(burst) / rate)
            .map_or(MAX_REFILL_KEPT, |d| d.min(MAX_REFILL_KEPT));
        idle.max(refill)
    }

    /// `rate` tokens a second up to `burst`, for at most `max_keys` keys, each forgotten
    /// after `idle` without use (not before it has had the time to refill), or sooner when
    /// the map is full and the cache's policy prefers another key.
    pub fn new(rate: f64, burst: u32, max_keys: u64, idle: Duration) -> Self {
        let idle = Self::kept_idle(rate, burst, idle);
        Buckets {
            rate,
            burst: f64::from(burst),
            map: moka::sync::Cache::builder()
                .max_capacity(max_keys)
                .time_to_idle(idle)
                .build(),
            held: None,
            idle,
        }
    }

    /// Like `new`, but a bucket is never dropped before it has been unused for the idle
    /// time: a key that would need one while `max_keys` are held is refused
    /// (`Refused::Full`). A bounded cache's eviction (or its refusal to admit a new key)
    /// would hand the key a full bucket on each request: a rate escaped by being one of many.
    pub fn kept(rate: f64, burst: u32, max_keys: u64, idle: Duration) -> Self {
        let idle = Self::kept_idle(rate, burst, idle);
        let held = Arc::new(Held {
            count: AtomicUsize::new(0),
            max: usize::try_from(max_keys).unwrap_or(usize::MAX),
        });
        let counted = held.clone();
        Buckets {
            rate,
            burst: f64::from(burst),
            map: moka::sync::Cache::builder()
                .time_to_idle(idle)
                // Every removal but a replacement (never made: entries are only inserted
                // when absent, an expired one being removed as expired) frees a place.
                .eviction_listener(move |_, _, cause| {
                    if cause != moka::notification::RemovalCause::Replaced {
                        counted.count.fetch_sub(1, Ordering::Release);
                    }
                })
                .build(),
            held: Some(held),
            idle,
        }
    }

    /// `key`'s entry, made when missing; `None` when it would be one more than a `kept`
    /// map holds.
    fn entry<Q>(&self, key: &Q, now: Instant) -> Option<Arc<Entry>>
    where
        K: Borrow<Q>,
        Q: ToOwned<Owned = K> + Hash + Eq + ?Sized,
    {
        let fresh = || {
            Arc::new(Entry {
                bucket: Mutex::new(Bucket {
                    tokens: self.burst,
                    at: now,
                }),
                in_flight: AtomicUsize::new(0),
            })
        };
        let Some(held) = &self.held else {
            return Some(self.map.get_with_by_ref(key, fresh));
        };
        if let Some(e) = self.map.get(key) {
            return Some(e);
        }
        // A place is reserved before the entry is made, so keys arriving together cannot
        // overshoot; entries idle past their time are only counted out once the cache
        // has run its pending work, done here rather than refusing while one is due.
        let mut reserved = false;
        for first in [true, false] {
            if held.count.fetch_add(1, Ordering::Acquire) < held.max {
                reserved = true;
                break;
            }
            held.count.fetch_sub(1, Ordering::Release);
            if first {
                self.map.run_pending_tasks();
            }
        }
        if !reserved {
            return None;
        }
        let e = self.map.entry_by_ref(key).or_insert_with(fresh);
        if !e.is_fresh() {
            // Made meanwhile by another request for the same key.
            held.count.fetch_sub(1, Ordering::Release);
        }
        Some(e.into_value())
    }

    /// Takes one token from `key`'s bucket, or says why not and for how long.
    pub fn try_take<Q>(&self, key: &Q) -> Result<(), Refused>
    where
        K: Borrow<Q>,
        Q: ToOwned<Owned = K> + Hash + Eq + ?Sized,
    {
        let now = Instant::now();
        let entry = self.entry_or_full(key, now)?;
        take_from(&entry, now, self.rate, self.burst).map_err(Refused::Wait)
    }

    /// `key`'s entry, or `Refused::Full` with how long until a place frees at the latest.
    fn entry_or_full<Q>(&self, key: &Q, now: Instant) -> Result<Arc<Entry>, Refused>
    where
        K: Borrow<Q>,
        Q: ToOwned<Owned = K> + Hash + Eq + ?Sized,
    {
        self.entry(key, now)
            .ok_or(Refused::Full(self.idle.min(MAX_WAIT)))
    }

    /// Takes one token from `key`'s bucket, or says how long until one is available.
    pub fn take<Q>(&self, key: &Q) -> Result<(), Duration>
    where
        K: Borrow<Q>,
        Q: ToOwned<Owned = K> + Hash + Eq + ?Sized,
    {
        self.try_take(key)
            .map_err(|(Refused::Wait(d) | Refused::Full(d))| d)
    }

    /// Hands back a token taken from `key`'s bucket (what it was taken for did not count).
    pub fn give_back<Q>(&self, key: &Q)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        // A bucket dropped meanwhile is full again anyway.
        if let Some(bucket) = self.map.get(key) {
            let full = {
                let mut b = bucket.bucket.lock().unwrap_or_else(|p| p.into_inner());
                b.tokens = (b.tokens + 1.0).min(self.burst);
                b.tokens >= self.burst
            };
            // A full bucket is what a missing one stands for: dropped, so that keys that
            // never fail (valid callers' addresses) do not crowd out the bounded map's
            // entries for keys that do.
            if full {
                self.map.invalidate(key);
            }
        }
    }

    /// Whether a bucket is held for `key` (tests; only the JWT tests on the emulator ask).
    #[cfg(all(test, feature = "emulator"))]
    pub(crate) fn holds<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.contains_key(key)
    }

    /// Whether `key`'s bucket has a token (none is taken), or how long until it has one.
    pub fn peek<Q>(&self, key: &Q) -> Result<(), Duration>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match self.map.get(key) {
            // Never seen, or idle long enough to be dropped: full.
            None => Ok(()),
            Some(e) => e.bucket.lock().unwrap_or_else(|p| p.into_inner()).refill(
                Instant::now(),
                self.rate,
                self.burst,
            ),
        }
    }
}

fn take_from(entry: &Entry, now: Instant, rate: f64, burst: f64) -> Result<(), Duration> {
    let mut b = entry.bucket.lock().unwrap_or_else(|p| p.into_inner());
    b.refill(now, rate, burst)?;
    b.tokens -= 1.0;
    Ok(())
}

/// The key failed authentications from `ip` are counted under: the address itself, or for
/// IPv6 its /64 (one host commonly holds a whole /64).
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        v4 => v4,
    }
}

/// Failed bearer-token authentications per client address, from the configuration; `None`
/// when `failed_auth_per_sec` is 0.
pub fn failed_auth(cfg: &LimitsConfig) -> Option<Buckets<IpAddr>> {
    (cfg.failed_auth_per_sec > 0.0).then(|| {
        Buckets::new(
            cfg.failed_auth_per_sec,
            cfg.failed_auth_burst,
            cfg.max_callers,
            cfg.caller_idle,
        )
    })
}

/// Request limits. Cheap to share.
#[derive(Debug)]
pub struct Limits {
    callers: Buckets<String>,
    // A count, not a semaphore: nothing ever waits for a slot, and releasing a semaphore's
    // permit takes its waiters' lock on every request. On a cache line of its own: every
    // request writes it from whichever thread, and the fields beside it are read as often.
    in_flight: CachePadded<AtomicUsize>,
    max_in_flight: usize,
    /// Each caller's requests in flight are counted in its bucket's entry (kept while
    /// they run: a request holds it, and the entry is not dropped before it is idle).
    max_in_flight_per_caller: usize,
    watches: Arc<Watches>,
}

/// The `WatchToken` streams open, per caller and in all. A watch is long-lived and, once
/// admitted, holds no request slot: without this, one caller could hold any number.
#[derive(Debug)]
struct Watches {
    open: Mutex<WatchCounts>,
    per_caller: u32,
    max: usize,
}

#[derive(Debug, Default)]
struct WatchCounts {
    /// Only callers with a watch open: an entry goes with its last watch.
    by_caller: std::collections::HashMap<String, u32>,
    total: usize,
}

/// Why a watch was not opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchRefused {
    /// The caller has this many open, its limit.
    Caller(u32),
    /// The broker has this many open, its limit.
    Broker(usize),
}

/// One open watch; closed when dropped (the stream ends or the caller goes away).
#[derive(Debug)]
pub struct WatchSlot {
    watches: Arc<Watches>,
    caller: String,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut open = self.watches.open.lock().unwrap_or_else(|p| p.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.by_caller.get_mut(&self.caller) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.by_caller.remove(&self.caller);
            }
        }
    }
}

/// Why a caller's request was not admitted by its own limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallerRefused {
    /// Over its rate: a token is there after this wait.
    Rate(Duration),
    /// No bucket can be kept for it (`max_callers` held); one frees within this wait.
    Full(Duration),
    /// It has this many requests in flight, its limit.
    InFlight(usize),
}

impl From<Refused> for CallerRefused {
    fn from(r: Refused) -> Self {
        match r {
            Refused::Wait(d) => CallerRefused::Rate(d),
            Refused::Full(d) => CallerRefused::Full(d),
        }
    }
}

/// One request's place among its caller's in flight; freed when dropped.
#[derive(Debug)]
pub struct CallerSlot(Arc<Entry>);

impl Drop for CallerSlot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Release);
    }
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
            callers: Buckets::kept(
                cfg.caller_rate_per_sec,
                cfg.caller_burst,
                cfg.max_callers,
                cfg.caller_idle,
            ),
            in_flight: CachePadded::new(AtomicUsize::new(0)),
            max_in_flight: cfg.max_in_flight,
            max_in_flight_per_caller: cfg.max_in_flight_per_caller,
            watches: Arc::new(Watches {
                open: Mutex::default(),
                per_caller: cfg.max_watches_per_caller,
                max: cfg.max_watches,
            }),
        }
    }

    /// Opens a watch for `caller`, within its limit and the broker's.
    pub fn open_watch(&self, caller: &str) -> Result<WatchSlot, WatchRefused> {
        let w = &self.watches;
        let mut open = w.open.lock().unwrap_or_else(|p| p.into_inner());
        let mine = open.by_caller.get(caller).copied().unwrap_or(0);
        if mine >= w.per_caller {
            return Err(WatchRefused::Caller(mine));
        }
        if open.total >= w.max {
            return Err(WatchRefused::Broker(open.total));
        }
        open.total += 1;
        *open.by_caller.entry(caller.to_owned()).or_default() += 1;
        Ok(WatchSlot {
            watches: w.clone(),
            caller: caller.to_owned(),
        })
    }

    /// A place among the caller's requests in flight, and a token from its bucket; or why
    /// not. Past its in-flight bound no token is taken: the request is not made.
    pub fn check_caller(&self, caller: &str) -> Result<CallerSlot, CallerRefused> {
        let now = Instant::now();
        let entry = self
            .callers
            .entry_or_full(caller, now)
            .map_err(CallerRefused::from)?;
        let before = entry.in_flight.fetch_add(1, Ordering::Acquire);
        // Holds the count just taken: handed back at once when refused.
        let slot = CallerSlot(entry);
        if before >= self.max_in_flight_per_caller {
            return Err(CallerRefused::InFlight(self.max_in_flight_per_caller));
        }
        take_from(&slot.0, now, self.callers.rate, self.callers.burst)
            .map_err(CallerRefused::Rate)?;
        Ok(slot)
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
            max_in_flight_per_caller: in_flight,
            max_request_bytes: 16 * 1024,
            failed_auth_per_sec: 1.0,
            failed_auth_burst: 20,
            max_watches_per_caller: 2,
            max_watches: 3,
        }
    }

    #[test]
    fn watches_are_bounded_per_caller_and_in_all_and_closing_one_frees_its_place() {
        let l = Limits::new(&cfg(1.0, 1, 1));
        let a1 = l.open_watch("a").unwrap();
        let a2 = l.open_watch("a").unwrap();
        assert_eq!(l.open_watch("a").unwrap_err(), WatchRefused::Caller(2));
        let b1 = l.open_watch("b").unwrap();
        assert_eq!(
            l.open_watch("c").unwrap_err(),
            WatchRefused::Broker(3),
            "the broker's limit holds for a caller with none open"
        );
        drop(a1);
        let a3 = l.open_watch("a").unwrap();
        drop((a2, a3, b1));
        let open = l.watches.open.lock().unwrap();
        assert_eq!(open.total, 0);
        assert!(
            open.by_caller.is_empty(),
            "a caller's entry goes with its last watch"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_over_the_limit_waits_for_refill_and_other_callers_are_unaffected() {
        let l = Limits::new(&cfg(2.0, 3, 10));
        for _ in 0..3 {
            l.check_caller("a").unwrap();
        }
        let wait = l.check_caller("a").unwrap_err();
        assert_eq!(wait, CallerRefused::Rate(Duration::from_millis(500)));
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
    fn the_wait_for_a_token_is_bounded_however_small_the_rate() {
        let now = Instant::now();
        for rate in [1e-300, f64::MIN_POSITIVE, 5e-324, 1e-9] {
            let mut empty = Bucket {
                tokens: 0.0,
                at: now,
            };
            assert_eq!(empty.refill(now, rate, 1.0), Err(MAX_WAIT), "{rate}");
        }
        let mut slow = Bucket {
            tokens: 0.0,
            at: now,
        };
        assert_eq!(
            slow.refill(now, MIN_RATE, 1.0),
            Err(Duration::from_secs(1000))
        );
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

    #[tokio::test(start_paused = true)]
    async fn peeking_takes_nothing_and_failures_empty_an_address_bucket() {
        let b: Buckets<IpAddr> = Buckets::new(0.5, 2, 100, Duration::from_secs(600));
        let a = address_key("192.0.2.7".parse().unwrap());
        assert!(b.peek(&a).is_ok(), "an address never seen has its burst");
        b.take(&a).unwrap();
        for _ in 0..5 {
            assert!(b.peek(&a).is_ok(), "peeking takes nothing");
        }
        b.take(&a).unwrap();
        assert_eq!(b.peek(&a), Err(Duration::from_secs(2)));
        assert!(b.take(&a).is_err());
        assert!(b.peek(&address_key("192.0.2.8".parse().unwrap())).is_ok());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(b.peek(&a).is_ok(), "refilled at the rate");
    }

    #[tokio::test(start_paused = true)]
    async fn a_bucket_is_not_forgotten_before_it_has_refilled() {
        // One request every 100 s, two at once, and idle callers forgotten after a second:
        // forgetting an empty bucket would hand the caller a full one, 100 s early.
        let l = Limits::new(&LimitsConfig {
            caller_idle: Duration::from_secs(1),
            ..cfg(0.01, 2, 10)
        });
        l.check_caller("dns:a").unwrap();
        l.check_caller("dns:a").unwrap();
        assert!(l.check_caller("dns:a").is_err());
        // The map forgets on its own (real) clock: what it is told is what it keeps.
        assert_eq!(
            l.callers.map.policy().time_to_idle(),
            Some(Duration::from_secs(200)),
            "kept idle until refilled (2 at 0.01 a second), past caller_idle"
        );
        // A fast rate refills within caller_idle: that stays the bound.
        let fast = Limits::new(&LimitsConfig {
            caller_idle: Duration::from_secs(600),
            ..cfg(10.0, 2, 10)
        });
        assert_eq!(
            fast.callers.map.policy().time_to_idle(),
            Some(Duration::from_secs(600))
        );
    }

    #[test]
    fn a_callers_requests_in_flight_are_bounded_and_a_refusal_takes_no_token() {
        let l = Limits::new(&LimitsConfig {
            max_in_flight_per_caller: 2,
            ..cfg(0.001, 3, 10)
        });
        let (a1, a2) = (l.check_caller("a").unwrap(), l.check_caller("a").unwrap());
        for _ in 0..5 {
            assert_eq!(l.check_caller("a").unwrap_err(), CallerRefused::InFlight(2));
        }
        let b = l.check_caller("b").unwrap();
        drop(a1);
        // The third token is still there: the refusals took none.
        let a3 = l.check_caller("a").unwrap();
        drop((a2, a3, b));
        assert!(matches!(l.check_caller("a"), Err(CallerRefused::Rate(_))));
        let e = l.callers.map.get("a").unwrap();
        assert_eq!(e.in_flight.load(Ordering::Relaxed), 0, "all handed back");
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_beyond_max_callers_is_refused_and_no_kept_bucket_is_dropped() {
        let l = Limits::new(&LimitsConfig {
            max_callers: 2,
            ..cfg(0.001, 1, 10)
        });
        for round in 0..50 {
            for c in ["a", "b"] {
                assert_eq!(l.check_caller(c).is_ok(), round == 0, "{c} {round}");
            }
            // Whatever the cache would prefer to keep, once it has done its pending work.
            l.callers.map.run_pending_tasks();
            assert_eq!(
                l.check_caller("c").unwrap_err(),
                CallerRefused::Full(Duration::from_secs(1000)),
                "{round}: refused for as long as a kept bucket may be (1 at 0.001 a second)"
            );
        }
        // A bucket gone (as one idle past its time goes) frees its place.
        l.callers.map.invalidate("a");
        l.check_caller("c").unwrap();
        assert!(matches!(l.check_caller("a"), Err(CallerRefused::Full(_))));
    }

    #[test]
    fn ipv6_addresses_count_by_their_64_and_mapped_ipv4_as_ipv4() {
        let k = |s: &str| address_key(s.parse().unwrap());
        assert_eq!(k("2001:db8:1:2:aaaa::1"), k("2001:db8:1:2:bbbb::9"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
        assert_eq!(k("::ffff:192.0.2.7"), k("192.0.2.7"));
        assert_ne!(k("192.0.2.7"), k("192.0.2.8"));
    }
}
