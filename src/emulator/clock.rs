//! The emulator's notion of "now": real time plus an offset that tests move forward with
//! `POST /clock/advance` (or [`super::Emulator::advance_clock`]), so that a broker running on an
//! injected manual clock can issue assertions dated in the simulated future and have them
//! accepted. Every time check and every issued timestamp of the emulated services reads this
//! clock; fault durations (`duration_ms`) and the TLS certificates keep real time.
//!
//! One per emulator (in `Shared`), not a global: tests run several emulators in one process.

use std::sync::atomic::{AtomicI64, Ordering};

use time::OffsetDateTime;

/// Real time shifted by a forward offset (milliseconds, cumulative, reset to 0 by `POST /reset`).
#[derive(Debug, Default)]
pub(crate) struct EmuClock {
    offset_ms: AtomicI64,
}

impl EmuClock {
    /// The current time as the emulator sees it.
    pub fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc() + time::Duration::milliseconds(self.offset_ms())
    }

    /// Unix seconds as the emulator sees them.
    pub fn now_secs(&self) -> i64 {
        self.now().unix_timestamp()
    }

    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::SeqCst)
    }

    /// Moves the clock forward by `ms` milliseconds (saturating); returns the new offset.
    pub fn advance_ms(&self, ms: i64) -> i64 {
        let ms = ms.max(0);
        let previous = self
            .offset_ms
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |o| {
                Some(o.saturating_add(ms))
            })
            .unwrap_or_else(|o| o);
        previous.saturating_add(ms)
    }

    pub fn reset(&self) {
        self.offset_ms.store(0, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advances_cumulatively_and_resets() {
        let c = EmuClock::default();
        let real = OffsetDateTime::now_utc().unix_timestamp();
        assert!((c.now_secs() - real).abs() <= 1);
        assert_eq!(c.advance_ms(7_200_000), 7_200_000);
        assert_eq!(c.advance_ms(500), 7_200_500);
        assert_eq!(c.advance_ms(-5), 7_200_500, "never backwards");
        assert!((c.now_secs() - real - 7200).abs() <= 2);
        c.reset();
        assert_eq!(c.offset_ms(), 0);
    }
}
