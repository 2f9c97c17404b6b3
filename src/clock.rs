//! Where a store gets `now` from.
//!
//! Every algorithm in this crate is a pure function of `(state, now, cost)`; the clock is the
//! only thing that tells a store what `now` is. Time is a count of nanoseconds on a monotonic
//! scale whose origin is the clock's own (a [`SystemClock`] starts at its creation), so wall
//! clock jumps (NTP steps, leap smear) can never move a window backwards.
//!
//! Calendar windows ([`crate::Quota::per_calendar_day`]) need the date as well: a clock also
//! tells the wall-clock time, [`Clock::unix_nanos`], read only for those.
//!
//! Tests use a [`ManualClock`] and advance it by hand: no test in this crate sleeps.
//!
//! # Examples
//!
//! ```
//! use std::time::Duration;
//! use tower_llm_ratelimit::clock::{Clock, ManualClock};
//!
//! let clock = ManualClock::new();
//! assert_eq!(clock.now_nanos(), 0);
//! clock.advance(Duration::from_millis(1500));
//! assert_eq!(clock.now_nanos(), 1_500_000_000);
//!
//! // One second before 2028-01-01 00:00 UTC on the wall clock; the monotonic one goes on.
//! clock.set_unix(Duration::from_secs(1_830_297_599));
//! clock.advance(Duration::from_secs(1));
//! assert_eq!(clock.unix_nanos(), 1_830_297_600_000_000_000);
//! assert_eq!(clock.now_nanos(), 2_500_000_000);
//! ```

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A monotonic source of time, in nanoseconds since the clock's own origin.
///
/// Implementations must never go backwards; stores clamp `now` to the last value they saw
/// anyway, so a misbehaving clock degrades to "time stood still", never to a wrong count.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Nanoseconds since this clock's origin.
    fn now_nanos(&self) -> u64;

    /// Wall-clock time: nanoseconds since 1970-01-01 00:00 UTC. Only calendar windows read
    /// it (to know the date); it may jump either way, and they never count backwards for it.
    ///
    /// The default reads the system's clock ([`SystemTime`]); a test clock overrides it.
    fn unix_nanos(&self) -> u64 {
        system_unix_nanos()
    }
}

/// The system's wall clock in nanoseconds since the epoch (0 before it; saturated in 2554).
fn system_unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The real clock: monotonic time since the clock was created, read with
/// [`quanta`](https://docs.rs/quanta) (the CPU's invariant TSC, calibrated against the OS
/// monotonic clock, where there is one: a few nanoseconds per read instead of a
/// `clock_gettime` call; the OS clock elsewhere).
#[derive(Debug, Clone)]
pub struct SystemClock {
    clock: quanta::Clock,
    origin: u64,
}

impl SystemClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        let clock = quanta::Clock::new();
        let origin = clock.raw();
        Self { clock, origin }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    #[inline]
    fn now_nanos(&self) -> u64 {
        // u64 nanoseconds cover 584 years of uptime.
        self.clock.delta_as_nanos(self.origin, self.clock.raw())
    }

    #[inline]
    fn unix_nanos(&self) -> u64 {
        system_unix_nanos()
    }
}

/// A clock that only moves when told to. Clones share the same time.
///
/// Its wall clock ([`Clock::unix_nanos`]) is its monotonic time plus an offset, 0 unless
/// [`ManualClock::set_unix`] moves it: a new clock stands at 1970-01-01 00:00 UTC.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    nanos: Arc<AtomicU64>,
    /// Wall clock minus monotonic clock, in nanoseconds, wrapping (two's complement).
    unix_offset: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock standing at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.nanos
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_add(by))
            })
            .ok();
    }

    /// Sets the clock to `at` since its origin; a value in the past is ignored, so the clock
    /// stays monotonic.
    pub fn set(&self, at: Duration) {
        let at = u64::try_from(at.as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_max(at, Ordering::AcqRel);
    }

    /// Sets the wall clock to `at` since the Unix epoch (forwards or back, as an NTP step
    /// would); the monotonic clock doesn't move. [`ManualClock::advance`] moves both.
    pub fn set_unix(&self, at: Duration) {
        let at = u64::try_from(at.as_nanos()).unwrap_or(u64::MAX);
        let offset = at.wrapping_sub(self.now_nanos());
        self.unix_offset.store(offset, Ordering::Release);
    }
}

impl Clock for ManualClock {
    #[inline]
    fn now_nanos(&self) -> u64 {
        self.nanos.load(Ordering::Acquire)
    }

    #[inline]
    fn unix_nanos(&self) -> u64 {
        self.now_nanos()
            .wrapping_add(self.unix_offset.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_is_shared_and_monotonic() {
        let a = ManualClock::new();
        let b = a.clone();
        a.advance(Duration::from_secs(2));
        assert_eq!(b.now_nanos(), 2_000_000_000);
        b.set(Duration::from_secs(1));
        assert_eq!(a.now_nanos(), 2_000_000_000, "set into the past is ignored");
        b.set(Duration::from_secs(3));
        assert_eq!(a.now_nanos(), 3_000_000_000);
    }

    #[test]
    fn manual_wall_clock_follows_the_monotonic_one_from_where_it_is_set() {
        let a = ManualClock::new();
        assert_eq!(a.unix_nanos(), 0);
        a.advance(Duration::from_secs(5));
        assert_eq!(a.unix_nanos(), 5_000_000_000);
        a.clone().set_unix(Duration::from_secs(1_000_000));
        a.advance(Duration::from_secs(1));
        assert_eq!(a.unix_nanos(), 1_000_001_000_000_000);
        // Stepped back: the wall clock may; the monotonic one doesn't.
        a.set_unix(Duration::from_secs(7));
        assert_eq!(a.unix_nanos(), 7_000_000_000);
        assert_eq!(a.now_nanos(), 6_000_000_000);
    }

    #[test]
    fn system_clock_moves_forward() {
        let c = SystemClock::new();
        let t1 = c.now_nanos();
        let t2 = c.now_nanos();
        assert!(t2 >= t1);
        // Clones share the origin.
        assert!(c.clone().now_nanos() >= t2);
    }
}
