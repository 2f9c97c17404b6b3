//! The window algorithms, as pure code: no I/O, no locks, no clock.
//!
//! Each algorithm is a small state value plus functions of `(state, limits, now, cost)`.
//! Every charge is *weighted*: one request costs 1, a chat completion may cost 3,412 tokens.
//! Each supports:
//!
//! - [`State::check`]: would `cost` fit now? If not, how long until it would
//!   ([`Verdict::Deny`]);
//! - [`State::charge`]: count `cost` now and say where it landed ([`Placement`]);
//! - [`State::adjust`]: settle an earlier charge to its real amount: a refund goes back into
//!   the window the charge was counted in (and is dropped if that window has slid out of
//!   view; GCRA gives back only the part of the charge's interval not drained yet), an extra
//!   charge lands now, even past the limit (the tokens were spent);
//! - [`State::peek`]: remaining capacity and time to full reset, without charging.
//!
//! | algorithm | memory per key | exact? | notes |
//! |---|---|---|---|
//! | [`SlidingWindowCounter`] (default) | O(1), 24 bytes | approximate | the previous fixed window is weighted by the part of it still inside the sliding window; any window of length `w` admits at most `2 x limit`, each fixed window at most `limit` |
//! | [`SlidingWindowLog`] | O(charges in the window) | exact | never more than `limit` in any window of length `w` |
//! | [`Gcra`] | O(1), 16 bytes | exact for its model | a leaky bucket of capacity `burst` draining `limit` per `w`; any interval of length `d` admits at most `burst + d x limit / w`, settlements included |
//! | [`Concurrency`] | O(1), 8 bytes | exact | at most `limit` in flight; a charge is released by settling it to 0 |
//! | [`CalendarWindow`] | O(1), 24 bytes | exact | at most `limit` per UTC calendar hour, day or month (a fixed window of varying length, reset at the boundary); time is wall-clock |
//!
//! Time is nanoseconds on the store's monotonic scale ([`crate::clock`]), except for the
//! calendar window, whose `now` is wall-clock time since the Unix epoch.
//!
//! # Examples
//!
//! ```
//! use tower_llm_ratelimit::algorithm::{Limits, State, Verdict};
//! use tower_llm_ratelimit::Algorithm;
//!
//! const SEC: u64 = 1_000_000_000;
//! // 100 tokens per 10 seconds, exact log.
//! let limits = Limits::new(100, 10 * SEC, 100);
//! let mut state = State::new(Algorithm::SlidingWindowLog);
//!
//! assert_eq!(state.check(&limits, 0, 60), Verdict::Allow);
//! let placed = state.charge(&limits, 0, 60);
//! // 60 + 50 > 100: denied until the first charge leaves the window.
//! assert_eq!(state.check(&limits, SEC, 50), Verdict::Deny { retry_after: Some(9 * SEC) });
//! // The upstream reported only 20 tokens: refund 40 into the window it was charged in.
//! state.adjust(&limits, 2 * SEC, placed, 60, 20);
//! assert_eq!(state.peek(&limits, 2 * SEC).remaining, 80);
//! ```

mod calendar;
mod concurrency;
mod counter;
mod gcra;
mod log;

pub use self::calendar::{CalendarPeriod, CalendarWindow};
pub use self::concurrency::{Concurrency, CONCURRENCY_RETRY_NANOS};
pub use self::counter::SlidingWindowCounter;
pub use self::gcra::Gcra;
pub(crate) use self::gcra::PreparedGcra;

/// What the memory store's single-rule GCRA path derives from a quota's limits, computed
/// once with the quota (not per bucket).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Prepared {
    pub(crate) gcra: Option<PreparedGcra>,
}

impl Prepared {
    pub(crate) const fn new(limits: Limits) -> Self {
        Self {
            gcra: PreparedGcra::new(limits),
        }
    }
}
pub use self::log::SlidingWindowLog;

/// How a quota is enforced. See the [module docs](self) for the trade-offs.
///
/// Non-exhaustive: more algorithms may come in a minor release, so a `match` outside this
/// crate needs a `_` arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Algorithm {
    /// O(1) memory, approximate (at most 2x the limit in a worst-case window). The default.
    #[default]
    SlidingWindowCounter,
    /// Exact, memory grows with the number of charges in the window.
    SlidingWindowLog,
    /// Generic cell rate algorithm: O(1), smooth, with an optional burst.
    Gcra,
    /// At most `limit` requests in flight; see [`Quota::concurrent`](crate::Quota::concurrent).
    Concurrency,
    /// An exact count per UTC calendar period, reset at the boundary (midnight, the 1st of
    /// the month); see [`Quota::per_calendar_day`](crate::Quota::per_calendar_day). The
    /// quota's window is not used.
    Calendar(CalendarPeriod),
}

impl Algorithm {
    /// True for [`Algorithm::Calendar`]: its time is the wall clock's
    /// ([`crate::clock::Clock::unix_nanos`]), not the monotonic one.
    #[inline]
    pub const fn is_calendar(self) -> bool {
        matches!(self, Algorithm::Calendar(_))
    }
}

/// The numbers an algorithm needs from a quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limits {
    /// Units allowed per window.
    pub limit: u64,
    /// The window, in nanoseconds (> 0).
    pub window_nanos: u64,
    /// GCRA's bucket capacity in units (equal to `limit` unless configured); ignored by the
    /// window algorithms.
    pub burst: u64,
}

impl Limits {
    /// Limits of `limit` units per `window_nanos`, with a GCRA capacity of `burst`.
    pub const fn new(limit: u64, window_nanos: u64, burst: u64) -> Self {
        Self {
            limit,
            window_nanos,
            burst,
        }
    }
}

/// The answer of [`State::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The cost fits now.
    Allow,
    /// The cost does not fit now.
    Deny {
        /// Nanoseconds until the same cost would fit if nothing else were charged, or `None`
        /// when it never can (the cost alone is larger than the limit).
        retry_after: Option<u64>,
    },
}

/// A bucket's state without charging anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Snapshot {
    /// The capacity: the limit (window algorithms) or the burst (GCRA).
    pub limit: u64,
    /// Units that could be charged now.
    pub remaining: u64,
    /// Nanoseconds until the bucket is back to full capacity if nothing more is charged.
    pub reset_after_nanos: u64,
}

/// Where a charge landed, so that settling it later refunds the right place: the fixed
/// window's index (counter), the entry's timestamp (log), the TAT just after the charge, where
/// its interval ends (GCRA: a refund gives back only what is still ahead of the clock), the
/// lease id (concurrency in Redis).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Placement(pub u64);

/// The state of one bucket, whichever its algorithm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// See [`SlidingWindowCounter`].
    Counter(SlidingWindowCounter),
    /// See [`SlidingWindowLog`].
    Log(SlidingWindowLog),
    /// See [`Gcra`].
    Gcra(Gcra),
    /// See [`Concurrency`].
    Concurrency(Concurrency),
    /// See [`CalendarWindow`].
    Calendar(CalendarWindow),
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            State::Counter($s) => $e,
            State::Log($s) => $e,
            State::Gcra($s) => $e,
            State::Concurrency($s) => $e,
            State::Calendar($s) => $e,
        }
    };
}

impl State {
    /// A fresh (empty) state for `algorithm`.
    pub fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::SlidingWindowCounter => State::Counter(SlidingWindowCounter::default()),
            Algorithm::SlidingWindowLog => State::Log(SlidingWindowLog::default()),
            Algorithm::Gcra => State::Gcra(Gcra::default()),
            Algorithm::Concurrency => State::Concurrency(Concurrency::default()),
            Algorithm::Calendar(period) => State::Calendar(CalendarWindow::new(period)),
        }
    }

    /// The algorithm this state belongs to.
    pub fn algorithm(&self) -> Algorithm {
        match self {
            State::Counter(_) => Algorithm::SlidingWindowCounter,
            State::Log(_) => Algorithm::SlidingWindowLog,
            State::Gcra(_) => Algorithm::Gcra,
            State::Concurrency(_) => Algorithm::Concurrency,
            State::Calendar(s) => Algorithm::Calendar(s.period()),
        }
    }

    /// [`State::check`], then [`State::charge`] if it fits, then [`State::peek`], in one pass:
    /// the single-charge decision of a store. Returns the verdict, where the charge landed
    /// ([`Placement::default`] on a denial: nothing was charged) and the snapshot after it.
    #[inline(always)]
    pub(crate) fn acquire(
        &mut self,
        limits: &Limits,
        now: u64,
        cost: u64,
    ) -> (Verdict, Placement, Snapshot) {
        match self {
            State::Counter(s) => return s.acquire(limits, now, cost),
            State::Gcra(s) => return s.acquire(limits, now, cost),
            _ => {}
        }
        // The others: `check` drops what expired, so `charge` and `peek` right after it find
        // nothing more to do.
        let verdict = self.check(limits, now, cost);
        let placement = if verdict == Verdict::Allow {
            self.charge(limits, now, cost)
        } else {
            Placement::default()
        };
        (verdict, placement, self.peek(limits, now))
    }

    /// Would `cost` fit at `now`? Only drops what has expired; counts nothing.
    #[inline(always)]
    pub fn check(&mut self, limits: &Limits, now: u64, cost: u64) -> Verdict {
        dispatch!(self, s => s.check(limits, now, cost))
    }

    /// Counts `cost` at `now`, without checking (call [`State::check`] first).
    #[inline]
    pub fn charge(&mut self, limits: &Limits, now: u64, cost: u64) -> Placement {
        dispatch!(self, s => s.charge(limits, now, cost))
    }

    /// Settles an earlier charge of `charged` units, placed at `placement`, to `actual` units.
    #[inline]
    pub fn adjust(
        &mut self,
        limits: &Limits,
        now: u64,
        placement: Placement,
        charged: u64,
        actual: u64,
    ) {
        dispatch!(self, s => s.adjust(limits, now, placement, charged, actual))
    }

    /// Remaining capacity and time to full reset at `now`.
    #[inline]
    pub fn peek(&mut self, limits: &Limits, now: u64) -> Snapshot {
        dispatch!(self, s => s.peek(limits, now))
    }

    /// True when the state is indistinguishable from a fresh one at `now`, so a store may
    /// drop it.
    #[inline]
    pub fn is_idle(&mut self, limits: &Limits, now: u64) -> bool {
        dispatch!(self, s => s.is_idle(limits, now))
    }
}

/// `ceil(a * b / c)` in 128 bits, saturated to `u64`.
#[inline]
pub(crate) const fn mul_div_ceil(a: u64, b: u64, c: u64) -> u64 {
    let c = if c == 0 { 1 } else { c };
    // The usual case fits in 64 bits: one hardware division instead of a 128-bit one.
    if let Some(p) = a.checked_mul(b) {
        return p.div_ceil(c);
    }
    let p = a as u128 * b as u128;
    saturate(p.div_ceil(c as u128))
}

/// `floor(a * b / c)` in 128 bits, saturated to `u64`.
#[inline]
pub(crate) const fn mul_div_floor(a: u64, b: u64, c: u64) -> u64 {
    let c = if c == 0 { 1 } else { c };
    if let Some(p) = a.checked_mul(b) {
        return p / c;
    }
    let p = a as u128 * b as u128;
    saturate(p / c as u128)
}

/// `n` saturated to `u64`.
const fn saturate(n: u128) -> u64 {
    if n > u64::MAX as u128 {
        u64::MAX
    } else {
        n as u64
    }
}

/// A tiny deterministic generator for the equivalence tests (no dependency, reproducible).
#[cfg(test)]
pub(crate) struct TestRng(u64);

#[cfg(test)]
impl TestRng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// xorshift64*.
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Below `n` (> 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A value biased to the edges: small, 32-bit, any 64-bit, or close to `u64::MAX`.
    pub(crate) fn edgy(&mut self) -> u64 {
        match self.below(4) {
            0 => self.below(100),
            1 => self.below(1 << 32),
            2 => self.next(),
            _ => u64::MAX - self.below(100),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mul_div_matches_128_bit_arithmetic() {
        let mut rng = TestRng::new(7);
        for _ in 0..100_000 {
            let (a, b, c) = (rng.edgy(), rng.edgy(), rng.edgy());
            let p = a as u128 * b as u128;
            let d = c.max(1) as u128;
            let floor = u64::try_from(p / d).unwrap_or(u64::MAX);
            let ceil = u64::try_from(p.div_ceil(d)).unwrap_or(u64::MAX);
            assert_eq!(mul_div_floor(a, b, c), floor, "{a} {b} {c}");
            assert_eq!(mul_div_ceil(a, b, c), ceil, "{a} {b} {c}");
        }
    }

    /// The fused single-charge decision is exactly `check`, `charge` if allowed, `peek`.
    #[test]
    fn acquire_is_check_then_charge_then_peek() {
        const S: u64 = 1_000_000_000;
        let algorithms = [
            Algorithm::SlidingWindowCounter,
            Algorithm::SlidingWindowLog,
            Algorithm::Gcra,
        ];
        for (seed, algorithm) in (0..600).zip(algorithms.iter().cycle()) {
            let mut rng = TestRng::new(seed);
            let limit = match rng.below(3) {
                0 => 1 + rng.below(20),
                1 => 1 + rng.below(1_000_000),
                _ => 1 + rng.below(u64::from(u32::MAX)),
            };
            let window = match rng.below(3) {
                0 => 1 + rng.below(1_000),
                1 => 1 + rng.below(3_600 * S),
                _ => 1 + rng.below(u64::MAX / 4),
            };
            let burst = if rng.below(2) == 0 {
                limit
            } else {
                1 + rng.below(limit.saturating_mul(2))
            };
            let l = Limits::new(limit, window, burst);
            let (mut fused, mut apart) = (State::new(*algorithm), State::new(*algorithm));
            let mut now = rng.below(10 * S);
            for _ in 0..300 {
                now = now.saturating_add(rng.below(window / 8 + 2));
                let cost = match rng.below(4) {
                    0 => 1,
                    1 => rng.below(limit / 4 + 2),
                    2 => rng.below(limit.saturating_mul(2)),
                    _ => 0,
                };
                let got = fused.acquire(&l, now, cost);
                let verdict = apart.check(&l, now, cost);
                let placement = if verdict == Verdict::Allow {
                    apart.charge(&l, now, cost)
                } else {
                    Placement::default()
                };
                let want = (verdict, placement, apart.peek(&l, now));
                assert_eq!(got, want, "{algorithm:?} {l:?} now={now} cost={cost}");
                assert_eq!(fused, apart);
                if rng.below(8) == 0 && verdict == Verdict::Allow {
                    let actual = rng.below(cost.saturating_mul(2).saturating_add(1));
                    fused.adjust(&l, now, placement, cost, actual);
                    apart.adjust(&l, now, placement, cost, actual);
                }
            }
        }
    }
}
