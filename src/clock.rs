//! Time behind a trait, so tests can move token lifetimes, refresh schedules, backoff and
//! rate limits forward without waiting (`ManualClock`), and step the wall clock alone.
//!
//! The broker reads two clocks. The wall clock is what tokens and people speak (`exp`,
//! `expires_on`, JWT claims, audit records); it can be stepped, back or forward. The
//! monotonic clock cannot, but means nothing outside the process. A deadline (`Moment`)
//! holds both and counts as reached as soon as either clock reaches it: a wall clock
//! stepped back cannot stretch a token's life or a wait, and one stepped forward (a slow
//! clock corrected, or a host resumed from suspend, during which the monotonic clock stood
//! still) still ends a token when its issuer's clock says so.

use std::fmt;
use std::ops::Add;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::time::Instant;

/// A point in time on both clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moment {
    pub wall: SystemTime,
    pub mono: Instant,
}

impl Moment {
    /// Time left until this moment at `now`: the lesser of the two clocks' answers.
    pub fn until(self, now: Moment) -> Duration {
        let wall = self.wall.duration_since(now.wall).unwrap_or(Duration::ZERO);
        wall.min(self.mono.saturating_duration_since(now.mono))
    }

    /// Time passed since this moment at `now`: the greater of the two clocks' answers.
    pub fn since(self, now: Moment) -> Duration {
        let wall = now.wall.duration_since(self.wall).unwrap_or(Duration::ZERO);
        wall.max(now.mono.saturating_duration_since(self.mono))
    }

    /// Whether `now` is at or past this moment on either clock.
    pub fn reached(self, now: Moment) -> bool {
        self.until(now).is_zero()
    }

    /// Of two deadlines, the one reached first.
    pub fn earlier(self, other: Moment) -> Moment {
        if self.reached(other) { self } else { other }
    }

    /// This moment in wall-clock time as seen at `now`, for those who judge it on their own
    /// wall clock: its own wall time, unless the wall clock has been stepped back since (the
    /// monotonic clock says it comes more than a second sooner), then `now`'s wall time plus
    /// what remains. The second of slack keeps the answer steady while nothing is stepped.
    pub fn wall_at(self, now: Moment) -> SystemTime {
        let by_wall = self.wall.duration_since(now.wall).unwrap_or(Duration::ZERO);
        let by_mono = self.mono.saturating_duration_since(now.mono);
        if by_wall > by_mono + Duration::from_secs(1) {
            now.wall + by_mono
        } else {
            self.wall
        }
    }
}

/// The longest span a `Moment` is moved by: longer spans (from configuration, an upstream's
/// hint) are taken as this one. No deadline the broker keeps is that far, and the clocks'
/// types panic where an addition overflows.
pub const MAX_SPAN: Duration = Duration::from_secs(100 * 365 * 86_400);

impl Add<Duration> for Moment {
    type Output = Moment;

    /// Saturating: a span beyond `MAX_SPAN` counts as `MAX_SPAN`, and a moment that cannot
    /// be moved that far (only near the end of either clock's range) stays where it is.
    fn add(self, d: Duration) -> Moment {
        let d = d.min(MAX_SPAN);
        Moment {
            wall: self.wall.checked_add(d).unwrap_or(self.wall),
            mono: self.mono.checked_add(d).unwrap_or(self.mono),
        }
    }
}

/// The time source for JWT claims, token expiry and the broker's timers.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Wall-clock time: for what is said to others (claims, timestamps), not for waiting.
    fn now(&self) -> SystemTime;

    /// Both clocks at once: for deadlines.
    fn moment(&self) -> Moment;

    /// Resolves once `deadline` is reached (on either clock).
    fn sleep_until(&self, deadline: Moment) -> BoxFuture<'static, ()>;

    fn sleep(&self, d: Duration) -> BoxFuture<'static, ()> {
        self.sleep_until(self.moment() + d)
    }

    /// Seconds since the Unix epoch.
    fn unix(&self) -> u64 {
        self.now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs()
    }
}

/// The system clock; sleeps on tokio's timer (so the monotonic side follows tokio's paused
/// time in tests).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn moment(&self) -> Moment {
        Moment {
            wall: SystemTime::now(),
            mono: Instant::now(),
        }
    }

    fn sleep_until(&self, deadline: Moment) -> BoxFuture<'static, ()> {
        async move {
            // Re-check after each wake: the wall clock can be stepped forward while we sleep.
            loop {
                match deadline.until(SystemClock.moment()) {
                    d if d.is_zero() => return,
                    d => tokio::time::sleep(d.min(Duration::from_secs(60))).await,
                }
            }
        }
        .boxed()
    }
}

/// A clock that moves only when told to. Sleepers wake as soon as the time reaches their
/// deadline.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<tokio::sync::watch::Sender<Moment>>,
}

impl ManualClock {
    /// Starts at the current system time.
    pub fn new() -> Self {
        ManualClock {
            now: Arc::new(tokio::sync::watch::channel(SystemClock.moment()).0),
        }
    }

    /// Time passes: both clocks move forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.now.send_modify(|t| *t = *t + d);
    }

    /// The wall clock is set to `wall` (stepped back or forward); the monotonic clock stays.
    pub fn set_wall(&self, wall: SystemTime) {
        self.now.send_modify(|t| t.wall = wall);
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        self.now.borrow().wall
    }

    fn moment(&self) -> Moment {
        *self.now.borrow()
    }

    fn sleep_until(&self, deadline: Moment) -> BoxFuture<'static, ()> {
        let mut rx = self.now.subscribe();
        async move {
            let _ = rx.wait_for(|t| deadline.reached(*t)).await;
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn manual_sleepers_wake_when_time_reaches_them() {
        let clock = ManualClock::new();
        let mut early = clock.sleep(Duration::from_secs(10));
        let mut late = clock.sleep(Duration::from_secs(60));
        assert!((&mut early).now_or_never().is_none());
        clock.advance(Duration::from_secs(10));
        early.await;
        assert!((&mut late).now_or_never().is_none());
        clock.advance(Duration::from_secs(50));
        late.await;
    }

    #[test]
    fn of_two_deadlines_the_earlier_is_the_one_reached_first() {
        let now = SystemClock.moment();
        let soon = now + Duration::from_secs(10);
        let late = now + Duration::from_secs(60);
        assert_eq!(soon.earlier(late).until(now), Duration::from_secs(10));
        assert_eq!(late.earlier(soon).until(now), Duration::from_secs(10));
    }

    #[tokio::test]
    async fn a_wall_clock_step_neither_stretches_nor_loses_a_deadline() {
        let clock = ManualClock::new();
        let start = clock.moment();
        let deadline = start + Duration::from_secs(60);

        assert_eq!(deadline.wall_at(clock.moment()), deadline.wall);

        // Stepped back an hour: the monotonic clock still counts the minute, and the deadline
        // is told in the new wall time.
        let back = start.wall - Duration::from_secs(3600);
        clock.set_wall(back);
        assert_eq!(deadline.until(clock.moment()), Duration::from_secs(60));
        assert_eq!(
            deadline.wall_at(clock.moment()),
            back + Duration::from_secs(60)
        );
        let mut sleeper = clock.sleep_until(deadline);
        clock.advance(Duration::from_secs(59));
        assert!((&mut sleeper).now_or_never().is_none());
        assert!(!deadline.reached(clock.moment()));
        clock.advance(Duration::from_secs(1));
        sleeper.await;
        assert!(deadline.reached(clock.moment()));
        assert_eq!(start.since(clock.moment()), Duration::from_secs(60));

        // Stepped forward past it: reached at once, though little time has passed.
        let clock = ManualClock::new();
        let deadline = clock.moment() + Duration::from_secs(60);
        let sleeper = clock.sleep_until(deadline);
        clock.set_wall(deadline.wall + Duration::from_secs(1));
        sleeper.await;
        assert_eq!(deadline.until(clock.moment()), Duration::ZERO);
        assert_eq!(deadline.wall_at(clock.moment()), deadline.wall);
    }

    #[test]
    fn a_moment_moved_by_an_absurd_span_saturates_instead_of_panicking() {
        let now = SystemClock.moment();
        let far = now + Duration::MAX;
        assert_eq!(far, now + MAX_SPAN);
        assert!(!far.reached(now));
        assert!(far.until(now) >= Duration::from_secs(99 * 365 * 86_400));
        assert!(!(far + Duration::from_secs(u64::MAX)).reached(far));
    }

    #[test]
    fn a_small_difference_between_the_clocks_does_not_move_the_wall_time() {
        let now = SystemClock.moment();
        let deadline = now + Duration::from_secs(60);
        let slewed = Moment {
            wall: now.wall - Duration::from_millis(900),
            mono: now.mono,
        };
        assert_eq!(deadline.wall_at(slewed), deadline.wall);
    }
}
