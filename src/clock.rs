//! Wall-clock time and sleeping behind a trait, so tests can move token lifetimes, refresh
//! schedules, backoff and rate limits forward without waiting (`ManualClock`).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::FutureExt;
use futures::future::BoxFuture;

/// Wall-clock time source for JWT claims, token expiry and the broker's timers.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    fn now(&self) -> SystemTime;

    /// Resolves once `now() >= deadline`.
    fn sleep_until(&self, deadline: SystemTime) -> BoxFuture<'static, ()>;

    fn sleep(&self, d: Duration) -> BoxFuture<'static, ()> {
        self.sleep_until(self.now() + d)
    }

    /// Seconds since the Unix epoch.
    fn unix(&self) -> u64 {
        self.now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs()
    }
}

/// The system clock; sleeps on tokio's timer.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn sleep_until(&self, deadline: SystemTime) -> BoxFuture<'static, ()> {
        async move {
            // Re-check after each wake: the wall clock can be stepped while we sleep.
            loop {
                match deadline.duration_since(SystemTime::now()) {
                    Ok(d) if !d.is_zero() => {
                        tokio::time::sleep(d.min(Duration::from_secs(60))).await
                    }
                    _ => return,
                }
            }
        }
        .boxed()
    }
}

/// A clock that moves only when told to. Sleepers wake as soon as an `advance` reaches
/// their deadline.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<tokio::sync::watch::Sender<SystemTime>>,
}

impl ManualClock {
    /// Starts at the current system time.
    pub fn new() -> Self {
        ManualClock {
            now: Arc::new(tokio::sync::watch::channel(SystemTime::now()).0),
        }
    }

    pub fn advance(&self, d: Duration) {
        self.now.send_modify(|t| *t += d);
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.now.borrow()
    }

    fn sleep_until(&self, deadline: SystemTime) -> BoxFuture<'static, ()> {
        let mut rx = self.now.subscribe();
        async move {
            let _ = rx.wait_for(|t| *t >= deadline).await;
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
}
