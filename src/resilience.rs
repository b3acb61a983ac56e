//! Upstream protection on the broker's clock: token-bucket budgets (Key Vault signs per
//! vault, Entra exchanges per tenant), circuit breakers with half-open probes, and
//! full-jitter exponential backoff. Written against `Clock` rather than a rate-limit crate
//! so that tests drive them with `ManualClock` exactly like token lifetimes. Budgets and
//! breakers measure only spans of time, so they read the monotonic clock: a wall clock
//! stepped either way changes nothing.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use rand::Rng;
use tokio::time::Instant;

use crate::clock::{Clock, Moment};

/// Full-jitter exponential backoff: uniform in [0, min(cap, base × 2^attempt)].
pub fn backoff(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let ceiling = base
        .checked_mul(1u32 << attempt.min(16))
        .unwrap_or(cap)
        .min(cap);
    ceiling.mul_f64(rand::rng().random::<f64>())
}

/// An upstream's retry hint, from Azure's `x-ms-retry-after-ms` / `retry-after-ms` (ms) or
/// the standard `Retry-After` (seconds or an HTTP date). `header` looks a header up by its
/// lower-case name.
pub fn retry_after(header: impl Fn(&str) -> Option<String>, now: SystemTime) -> Option<Duration> {
    for name in ["x-ms-retry-after-ms", "retry-after-ms"] {
        if let Some(ms) = header(name).and_then(|v| v.trim().parse::<u64>().ok()) {
            return Some(Duration::from_millis(ms));
        }
    }
    let v = header("retry-after")?;
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate_to_system_time(v)?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

fn httpdate_to_system_time(v: &str) -> Option<SystemTime> {
    let format = time::format_description::well_known::Rfc2822;
    let t = time::OffsetDateTime::parse(&v.replace("GMT", "+0000"), &format).ok()?;
    let secs = u64::try_from(t.unix_timestamp()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// A token bucket: `rate` per second, at most `burst` at once.
#[derive(Debug)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    pub fn new(rate: f64, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Bucket {
            rate: rate.max(0.001),
            burst,
            state: Mutex::new((burst, now)),
        }
    }

    /// Takes a token now, or says how long until one is available (taking nothing).
    pub fn try_take(&self, now: Instant) -> Result<(), Duration> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(s.1);
        s.0 = (s.0 + elapsed.as_secs_f64() * self.rate).min(self.burst);
        // Callers read the time before taking the lock, so `now` can trail the last take by
        // a little: keep the later time then.
        s.1 = now.max(s.1);
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - s.0) / self.rate))
        }
    }

    /// Waits for a token, but not past `deadline`: `false` if the budget cannot cover it.
    pub async fn take(&self, clock: &dyn Clock, deadline: Moment) -> bool {
        loop {
            let now = clock.moment();
            match self.try_take(now.mono) {
                Ok(()) => return true,
                Err(wait) if wait <= deadline.until(now) => clock.sleep(wait).await,
                Err(_) => return false,
            }
        }
    }
}

/// Breaker states, also exported as a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

/// Opens after `threshold` consecutive transient failures (for the longer of `cool_down`
/// and the upstream's `Retry-After`), or at once for a throttled call until the time its
/// `Retry-After` names; then lets one probe through (half-open); a success closes it, a
/// failure re-opens it.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cool_down: Duration,
    state: Mutex<BreakerInner>,
}

#[derive(Debug)]
struct BreakerInner {
    failures: u32,
    open_until: Option<Instant>,
    probing: bool,
}

impl Breaker {
    pub fn new(threshold: u32, cool_down: Duration) -> Self {
        Breaker {
            threshold: threshold.max(1),
            cool_down,
            state: Mutex::new(BreakerInner {
                failures: 0,
                open_until: None,
                probing: false,
            }),
        }
    }

    /// May a call go through now? `Ok(true)` when it is the half-open probe (which must end
    /// with `success`, `failure`, `neutral` or `release`); `Err(remaining)` while open (or
    /// while a probe is out).
    pub fn admit(&self, now: Instant) -> Result<bool, Duration> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match s.open_until {
            None => Ok(false),
            Some(until) if now < until => Err(until - now),
            Some(_) if s.probing => Err(Duration::from_secs(1)),
            Some(_) => {
                s.probing = true;
                Ok(true)
            }
        }
    }

    /// The probe ended without saying anything about the upstream (the broker's own budget
    /// refused it, another upstream failed inside it, it panicked): the next call probes.
    pub fn release(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.probing = false;
    }

    pub fn success(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.failures = 0;
        s.open_until = None;
        s.probing = false;
    }

    /// Records a transient failure (configuration errors are not the upstream's health).
    /// `hint`: the upstream's own word on when to ask again (`Retry-After`, bounded by the
    /// caller); opened by the count, the breaker stays open for the longer of the cool-down
    /// and the hint. `throttled`: the upstream refused the call rate itself, so the hint
    /// opens the breaker at once, whatever the count: a call before it would only be
    /// throttled again. (An outage's hint is an estimate: a call before it may succeed.)
    /// `probe`: the failing call is the half-open probe (`admit` said `Ok(true)`); a call
    /// admitted before the breaker opened that fails meanwhile leaves the probe out.
    pub fn failure(&self, now: Instant, hint: Option<Duration>, throttled: bool, probe: bool) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.failures += 1;
        let hint = hint.filter(|h| !h.is_zero());
        let until = if probe || s.failures >= self.threshold {
            Some(now + self.cool_down.max(hint.unwrap_or_default()))
        } else {
            hint.filter(|_| throttled).map(|h| now + h)
        };
        if let Some(until) = until {
            // A call admitted before the breaker opened must not shorten a longer hold.
            s.open_until = Some(s.open_until.map_or(until, |o| o.max(until)));
        }
        if probe {
            s.probing = false;
        }
    }

    /// The probe was answered, but not with the upstream's health (e.g. a configuration
    /// error): the upstream is up, so the breaker closes.
    pub fn neutral(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.probing {
            s.probing = false;
            s.failures = 0;
            s.open_until = None;
        }
    }

    pub fn state(&self, now: Instant) -> BreakerState {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match s.open_until {
            None => BreakerState::Closed,
            Some(until) if now < until => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    #[tokio::test]
    async fn a_wall_clock_stepped_back_neither_starves_a_bucket_nor_holds_a_breaker_open() {
        let clock = ManualClock::new();
        let t0 = clock.moment();
        let b = Bucket::new(1.0, 1, t0.mono);
        let breaker = Breaker::new(1, Duration::from_secs(30));
        assert!(b.take(&clock, t0).await);
        breaker.failure(clock.moment().mono, None, false, false);

        clock.set_wall(t0.wall - Duration::from_secs(3600));
        assert!(b.try_take(clock.moment().mono).is_err());
        assert_eq!(
            breaker.admit(clock.moment().mono),
            Err(Duration::from_secs(30))
        );
        // A second on, the bucket has refilled, whatever the wall clock said.
        clock.advance(Duration::from_millis(1100));
        assert!(b.take(&clock, clock.moment()).await);
        // And the breaker stays open one cool-down, not an hour and one.
        clock.advance(Duration::from_secs(29));
        assert_eq!(breaker.state(clock.moment().mono), BreakerState::HalfOpen);
        assert!(breaker.admit(clock.moment().mono).is_ok());
    }

    #[test]
    fn bucket_refills_at_its_rate_and_caps_at_burst() {
        let t0 = Instant::now();
        let b = Bucket::new(2.0, 2, t0);
        assert!(b.try_take(t0).is_ok());
        assert!(b.try_take(t0).is_ok());
        let wait = b.try_take(t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        assert!(b.try_take(t0 + Duration::from_millis(500)).is_ok());
        // A long idle time refills only up to the burst.
        let later = t0 + Duration::from_secs(100);
        assert!(b.try_take(later).is_ok());
        assert!(b.try_take(later).is_ok());
        assert!(b.try_take(later).is_err());
    }

    #[tokio::test]
    async fn bucket_wait_is_bounded_by_the_deadline() {
        let clock = ManualClock::new();
        let b = Bucket::new(1.0, 1, clock.moment().mono);
        assert!(b.take(&clock, clock.moment()).await);
        // The next token is 1 s away: a deadline 0.5 s out cannot cover it.
        assert!(
            !b.take(&clock, clock.moment() + Duration::from_millis(500))
                .await
        );
    }

    #[test]
    fn breaker_opens_then_probes_then_closes() {
        let t0 = Instant::now();
        let b = Breaker::new(3, Duration::from_secs(30));
        for _ in 0..2 {
            assert!(b.admit(t0).is_ok());
            b.failure(t0, None, false, false);
        }
        assert_eq!(b.state(t0), BreakerState::Closed);
        b.failure(t0, None, false, false);
        assert_eq!(b.state(t0), BreakerState::Open);
        assert_eq!(
            b.admit(t0 + Duration::from_secs(10)),
            Err(Duration::from_secs(20))
        );
        let t1 = t0 + Duration::from_secs(30);
        assert!(b.admit(t1).is_ok(), "one probe after the cool-down");
        assert!(b.admit(t1).is_err(), "only one probe at a time");
        b.failure(t1, None, false, true);
        assert_eq!(b.state(t1), BreakerState::Open, "a failed probe re-opens");
        let t2 = t1 + Duration::from_secs(30);
        assert_eq!(b.admit(t2), Ok(true), "the probe");
        // A probe released without a verdict: still half-open, and the next call probes.
        b.release();
        assert_eq!(b.state(t2), BreakerState::HalfOpen);
        assert_eq!(b.admit(t2), Ok(true));
        b.success();
        assert_eq!(b.state(t2), BreakerState::Closed);
        assert_eq!(b.admit(t2), Ok(false), "closed: not a probe");
    }

    #[test]
    fn a_call_from_before_the_breaker_opened_failing_leaves_the_probe_out() {
        let t0 = Instant::now();
        let b = Breaker::new(1, Duration::from_secs(30));
        assert_eq!(b.admit(t0), Ok(false));
        b.failure(t0, None, false, false);
        let t1 = t0 + Duration::from_secs(30);
        assert_eq!(b.admit(t1), Ok(true), "the probe");
        // A call let through before the breaker opened fails while the probe is out: the
        // breaker opens again, and the probe is still the one out.
        b.failure(t1, None, false, false);
        let t2 = t1 + Duration::from_secs(30);
        assert!(
            b.admit(t2).is_err(),
            "no second probe while the first is out"
        );
        b.success();
        assert_eq!(b.state(t2), BreakerState::Closed);
    }

    #[test]
    fn a_retry_after_holds_the_breaker_open_until_the_hinted_time() {
        let t0 = Instant::now();
        let b = Breaker::new(5, Duration::from_secs(30));
        // An outage's hint below the count opens nothing.
        b.failure(t0, Some(Duration::from_secs(90)), false, false);
        assert_eq!(b.admit(t0), Ok(false));
        b.success();
        // One throttled answer, far below the count: open at once, for the hint.
        b.failure(t0, Some(Duration::from_secs(90)), true, false);
        assert_eq!(
            b.admit(t0 + Duration::from_secs(10)),
            Err(Duration::from_secs(80))
        );
        // An answer to a call let through before it opened does not shorten the hold.
        b.failure(
            t0 + Duration::from_secs(1),
            Some(Duration::from_secs(2)),
            true,
            false,
        );
        assert_eq!(b.state(t0 + Duration::from_secs(89)), BreakerState::Open);
        // Then one probe, as after a cool-down.
        let t1 = t0 + Duration::from_secs(90);
        assert_eq!(b.admit(t1), Ok(true));
        assert!(b.admit(t1).is_err(), "one probe at a time");
        b.success();
        // A hint of zero is no hold; a hint shorter than the cool-down does not shorten
        // a breaker opened by the count (and a longer one would lengthen it).
        b.failure(t1, Some(Duration::ZERO), true, false);
        assert_eq!(b.admit(t1), Ok(false));
        for _ in 0..4 {
            b.failure(t1, Some(Duration::from_secs(1)), false, false);
        }
        assert_eq!(
            b.admit(t1 + Duration::from_secs(2)),
            Err(Duration::from_secs(28))
        );
    }

    #[test]
    fn retry_after_reads_azure_and_standard_headers() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let h = |pairs: &'static [(&'static str, &'static str)]| {
            move |n: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == n)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            retry_after(h(&[("retry-after", "7")]), now),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            retry_after(
                h(&[("retry-after", "7"), ("x-ms-retry-after-ms", "1500")]),
                now
            ),
            Some(Duration::from_millis(1500)),
            "Azure's millisecond hint is the more precise one"
        );
        // 2001-09-09T01:46:40Z is the epoch + 1e9 s; ten seconds later:
        assert_eq!(
            retry_after(h(&[("retry-after", "Sun, 09 Sep 2001 01:46:50 GMT")]), now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(retry_after(h(&[("retry-after", "soon")]), now), None);
        assert_eq!(retry_after(h(&[]), now), None);
    }

    #[test]
    fn backoff_is_full_jitter_under_the_cap() {
        for attempt in 0..20 {
            let d = backoff(attempt, Duration::from_millis(500), Duration::from_secs(30));
            assert!(d <= Duration::from_secs(30));
            assert!(d <= Duration::from_millis(500) * (1 << attempt.min(16)));
        }
        // Full jitter: spread over the whole range (here up to 4 s), not pinned to its top.
        let waits: Vec<Duration> = (0..200)
            .map(|_| backoff(3, Duration::from_millis(500), Duration::from_secs(30)))
            .collect();
        let (min, max) = (waits.iter().min().unwrap(), waits.iter().max().unwrap());
        assert!(
            *min < Duration::from_secs(1) && *max > Duration::from_secs(3),
            "{min:?}..{max:?}"
        );
    }
}
