//! Sliding window counter: O(1) memory, approximate.

use super::{mul_div_ceil, Limits, Placement, Snapshot, Verdict};

/// Sliding window counter (the approach Cloudflare described in "How we built rate limiting
/// capable of scaling to millions of domains", 2017).
///
/// Time is cut into fixed windows of length `w`. The state holds the sum charged in the current
/// fixed window and in the previous one. The usage of the sliding window ending now is
/// estimated as `previous x (w - elapsed) / w + current`: the previous window counts for the
/// part of it still inside the sliding window, as if its charges had been spread evenly.
///
/// Bounds: every fixed window admits at most `limit` (the estimate is never below `current`),
/// and any window of length `w` at most `2 x limit` (when the previous window's charges all
/// came at its very end). Memory: three `u64`s.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlidingWindowCounter {
    /// Index of the current fixed window (`now / w`).
    window: u64,
    current: u64,
    previous: u64,
}

impl SlidingWindowCounter {
    /// Moves the state to the fixed window containing `now`; what it forgets had expired.
    #[inline]
    fn roll(&mut self, w: u64, now: u64) {
        // Still in the current fixed window (or before it): nothing to do, and no division.
        // When the window's end overflows, `now / w` can't exceed `window` either.
        if now < self.window.saturating_add(1).saturating_mul(w) {
            return;
        }
        let k = now / w;
        if k <= self.window {
            return;
        }
        self.previous = if k == self.window + 1 {
            self.current
        } else {
            0
        };
        self.current = 0;
        self.window = k;
    }

    /// [`Self::roll`], then [`Self::elapsed`]: in the usual case (`now` still in the current
    /// fixed window) one multiplication.
    #[inline]
    fn roll_elapsed(&mut self, w: u64, now: u64) -> u64 {
        match now.checked_sub(self.window.saturating_mul(w)) {
            Some(e) if e < w => e,
            // Before the current window: nothing to roll, nothing elapsed.
            None => 0,
            _ => {
                self.roll(w, now);
                self.elapsed(w, now)
            }
        }
    }

    /// Nanoseconds elapsed in the current fixed window.
    #[inline]
    fn elapsed(&self, w: u64, now: u64) -> u64 {
        now.saturating_sub(self.window.saturating_mul(w)).min(w)
    }

    /// The previous window's share of the sliding window, in units, rounded up:
    /// `ceil(previous x (w - e) / w)`, `e` being [`Self::elapsed`]. With it, the estimate
    /// `used_scaled <= k x w` is exactly `current + carried <= k` (for whole `k`).
    #[inline]
    fn carried(&self, w: u64, e: u64) -> u64 {
        if self.previous == 0 {
            return 0;
        }
        mul_div_ceil(self.previous, w - e, w)
    }

    /// The fit test: rolls to `now` and returns whether `cost` fits, the time elapsed in the
    /// current window and the previous window's share (see [`Self::carried`]).
    #[inline]
    fn fit(&mut self, l: &Limits, now: u64, cost: u64) -> (bool, u64, u64) {
        let w = l.window_nanos;
        let e = self.roll_elapsed(w, now);
        let carried = self.carried(w, e);
        let fits = self
            .current
            .checked_add(cost)
            .and_then(|n| n.checked_add(carried))
            .is_some_and(|n| n <= l.limit);
        (fits, e, carried)
    }

    #[inline]
    pub(super) fn check(&mut self, l: &Limits, now: u64, cost: u64) -> Verdict {
        if self.fit(l, now, cost).0 {
            return Verdict::Allow;
        }
        self.denial(l, now, cost)
    }

    /// `check`, then `charge` if it fits, then `peek`, sharing the work.
    #[inline(always)]
    pub(super) fn acquire(
        &mut self,
        l: &Limits,
        now: u64,
        cost: u64,
    ) -> (Verdict, Placement, Snapshot) {
        let (fits, e, carried) = self.fit(l, now, cost);
        if !fits {
            let verdict = self.denial(l, now, cost);
            return (verdict, Placement::default(), self.snapshot(l, e, carried));
        }
        self.current += cost;
        (
            Verdict::Allow,
            Placement(self.window),
            self.snapshot(l, e, carried),
        )
    }

    /// The answer when `cost` does not fit (the state already rolled to `now`): how long
    /// until it would.
    #[cold]
    fn denial(&self, l: &Limits, now: u64, cost: u64) -> Verdict {
        if cost > l.limit {
            return Verdict::Deny { retry_after: None };
        }
        // Need used(t) <= room, where room = (limit - cost) x w.
        let w = l.window_nanos;
        let room = (l.limit - cost) as u128 * w as u128;
        let e = self.elapsed(w, now) as u128;
        let cur = self.current as u128 * w as u128;
        let wait = if cur <= room {
            // Within this window: previous x (w - e') <= room - cur.
            // previous > 0 here, otherwise the charge would have fit.
            let slack = (room - cur) / (self.previous.max(1) as u128);
            let e_needed = (w as u128).saturating_sub(slack);
            e_needed.saturating_sub(e)
        } else {
            // Next window: current becomes previous; current x (w - e2) <= room.
            let slack = room / self.current.max(1) as u128;
            let e2 = (w as u128).saturating_sub(slack);
            (w as u128 - e) + e2
        };
        Verdict::Deny {
            retry_after: Some(u64::try_from(wait.max(1)).unwrap_or(u64::MAX)),
        }
    }

    /// The snapshot, `e` nanoseconds into the current window with `carried` units of the
    /// previous one still counted.
    #[inline]
    fn snapshot(&self, l: &Limits, e: u64, carried: u64) -> Snapshot {
        let w = l.window_nanos;
        let reset_after_nanos = if self.current > 0 {
            (w - e).saturating_add(w)
        } else if self.previous > 0 {
            w - e
        } else {
            0
        };
        Snapshot {
            limit: l.limit,
            remaining: l.limit.saturating_sub(self.current).saturating_sub(carried),
            reset_after_nanos,
        }
    }

    pub(super) fn charge(&mut self, l: &Limits, now: u64, cost: u64) -> Placement {
        self.roll(l.window_nanos, now);
        self.current = self.current.saturating_add(cost);
        Placement(self.window)
    }

    pub(super) fn adjust(
        &mut self,
        l: &Limits,
        now: u64,
        at: Placement,
        charged: u64,
        actual: u64,
    ) {
        self.roll(l.window_nanos, now);
        if actual > charged {
            self.current = self.current.saturating_add(actual - charged);
        } else {
            let refund = charged - actual;
            if at.0 == self.window {
                self.current -= refund.min(self.current);
            } else if at.0.checked_add(1) == Some(self.window) {
                self.previous -= refund.min(self.previous);
            }
            // Older windows no longer count: the refund has nothing left to correct.
        }
    }

    pub(super) fn peek(&mut self, l: &Limits, now: u64) -> Snapshot {
        let w = l.window_nanos;
        self.roll(w, now);
        let e = self.elapsed(w, now);
        self.snapshot(l, e, self.carried(w, e))
    }

    pub(super) fn is_idle(&mut self, l: &Limits, now: u64) -> bool {
        self.roll(l.window_nanos, now);
        self.current == 0 && self.previous == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithm::TestRng;
    const S: u64 = 1_000_000_000;

    /// `roll` and `peek` as first written (a division per roll, a 128-bit division per peek):
    /// the faster versions must agree with them everywhere.
    #[test]
    fn fast_roll_and_peek_match_the_plain_arithmetic() {
        fn roll_plain(c: &mut SlidingWindowCounter, w: u64, now: u64) {
            let k = now / w;
            if k <= c.window {
                return;
            }
            c.previous = if k == c.window + 1 { c.current } else { 0 };
            c.current = 0;
            c.window = k;
        }
        let mut rng = TestRng::new(11);
        for _ in 0..200_000 {
            let w = rng.edgy().max(1);
            let now = rng.edgy();
            let l = Limits::new(rng.edgy(), w, 0);
            // A state in the window containing some time near `now` (or anywhere).
            let window = if rng.below(2) == 0 {
                (now / w).saturating_sub(rng.below(3))
            } else {
                rng.edgy()
            };
            let mut c = SlidingWindowCounter {
                window,
                current: rng.edgy() >> rng.below(64),
                previous: rng.edgy() >> rng.below(64),
            };
            let mut plain = c.clone();
            let mut fused = c.clone();
            c.roll(w, now);
            roll_plain(&mut plain, w, now);
            assert_eq!(c, plain, "w={w} now={now}");
            let e = fused.roll_elapsed(w, now);
            assert_eq!(fused, plain, "roll_elapsed w={w} now={now}");
            assert_eq!(e, plain.elapsed(w, now), "roll_elapsed w={w} now={now}");
            if c.window.checked_mul(w).is_none() {
                continue; // Unreachable through `roll`: the window starts at or before now.
            }
            let e = c.elapsed(w, now);
            // (The plain sum overflows 128 bits for counts and windows near `u64::MAX`.)
            let Some(used) =
                (c.previous as u128 * (w - e) as u128).checked_add(c.current as u128 * w as u128)
            else {
                continue;
            };
            let remaining = (l.limit as u128 * w as u128).saturating_sub(used) / w as u128;
            assert_eq!(
                c.peek(&l, now).remaining,
                remaining as u64,
                "{c:?} {l:?} now={now}"
            );
        }
    }

    /// Counts near 2^64 under a window of centuries: the denial's 128-bit sums saturate
    /// (a deny), never overflow (a panic in debug builds, a wrong answer in release ones).
    #[test]
    fn extreme_counts_and_windows_never_overflow() {
        let l = Limits::new(u64::MAX, u64::MAX, 0);
        let mut c = SlidingWindowCounter {
            window: 0,
            current: u64::MAX,
            previous: u64::MAX,
        };
        let (verdict, _, snapshot) = c.acquire(&l, 1, u64::MAX);
        assert!(matches!(verdict, Verdict::Deny { .. }), "{verdict:?}");
        assert_eq!(snapshot.remaining, 0);
        assert_eq!(c.current, u64::MAX, "a denial charges nothing");
    }

    /// The fit test in whole units (`current + carried <= limit - cost`) answers as the
    /// estimate it stands for, in units x nanoseconds:
    /// `previous x (w - e) + (current + cost) x w <= limit x w`.
    #[test]
    fn fit_test_matches_the_scaled_estimate() {
        let mut rng = TestRng::new(19);
        for _ in 0..3_000 {
            let w = match rng.below(3) {
                0 => 1 + rng.below(1_000),
                1 => 1 + rng.below(3_600 * S),
                _ => 1 + rng.below(1 << 62),
            };
            let bits = rng.below(41);
            let l = Limits::new(1 + rng.below(1 << bits), w, 0);
            let mut c = SlidingWindowCounter::default();
            let mut now = rng.below(10 * S);
            for _ in 0..100 {
                now = now.saturating_add(rng.below(w / 3 + 2));
                let cost = match rng.below(3) {
                    0 => 1,
                    1 => rng.below(l.limit / 3 + 2),
                    _ => rng.below(2 * l.limit + 1),
                };
                let mut rolled = c.clone();
                rolled.roll(w, now);
                let e = rolled.elapsed(w, now) as u128;
                let used = rolled.previous as u128 * (w as u128 - e)
                    + (rolled.current as u128 + cost as u128) * w as u128;
                let fits = used <= l.limit as u128 * w as u128;
                let (verdict, _, _) = c.acquire(&l, now, cost);
                assert_eq!(
                    verdict == Verdict::Allow,
                    fits,
                    "{l:?} now={now} cost={cost}"
                );
            }
        }
    }

    fn limits() -> Limits {
        Limits::new(10, 10 * S, 10)
    }

    #[test]
    fn admits_up_to_limit_in_one_window() {
        let l = limits();
        let mut c = SlidingWindowCounter::default();
        for _ in 0..10 {
            assert_eq!(c.check(&l, S, 1), Verdict::Allow);
            c.charge(&l, S, 1);
        }
        assert!(matches!(
            c.check(&l, S, 1),
            Verdict::Deny {
                retry_after: Some(_)
            }
        ));
        assert_eq!(c.peek(&l, S).remaining, 0);
    }

    #[test]
    fn previous_window_is_weighted() {
        let l = limits();
        let mut c = SlidingWindowCounter::default();
        c.charge(&l, 9 * S, 10);
        // At 12s, 80% of the previous window is still inside: estimate 8.
        assert_eq!(c.peek(&l, 12 * S).remaining, 2);
        assert_eq!(c.check(&l, 12 * S, 2), Verdict::Allow);
        // 3 needs the estimate to fall to 7: at 13s.
        assert_eq!(
            c.check(&l, 12 * S, 3),
            Verdict::Deny {
                retry_after: Some(S)
            }
        );
    }

    #[test]
    fn retry_after_spans_into_next_window() {
        let l = limits();
        let mut c = SlidingWindowCounter::default();
        c.charge(&l, 5 * S, 10);
        // Needs 4: the window ends at 10s; then 10 x (10 - e)/10 <= 6 at e = 4s.
        assert_eq!(
            c.check(&l, 5 * S, 4),
            Verdict::Deny {
                retry_after: Some(5 * S + 4 * S)
            }
        );
        assert_eq!(c.check(&l, 14 * S, 4), Verdict::Allow);
        assert!(matches!(c.check(&l, 14 * S - 1, 4), Verdict::Deny { .. }));
    }

    #[test]
    fn cost_over_limit_never_fits() {
        let l = limits();
        let mut c = SlidingWindowCounter::default();
        assert_eq!(c.check(&l, 0, 11), Verdict::Deny { retry_after: None });
    }

    #[test]
    fn refunds_land_in_their_window_or_are_dropped() {
        let l = limits();
        let mut c = SlidingWindowCounter::default();
        let p = c.charge(&l, S, 8);
        c.adjust(&l, 2 * S, p, 8, 3);
        assert_eq!(c.peek(&l, 2 * S).remaining, 7);
        // A refund for the previous window reduces `previous`.
        let p = c.charge(&l, 3 * S, 4);
        c.adjust(&l, 10 * S, p, 4, 0);
        assert_eq!(c.previous, 3);
        // Two windows later the refund is dropped.
        let p = c.charge(&l, 10 * S, 5);
        c.adjust(&l, 30 * S, p, 5, 0);
        assert_eq!((c.current, c.previous), (0, 0));
        // Extra charges land now, even past the limit.
        let p = c.charge(&l, 31 * S, 10);
        c.adjust(&l, 31 * S, p, 10, 25);
        assert_eq!(c.current, 25);
        assert_eq!(c.peek(&l, 31 * S).remaining, 0);
    }

    #[test]
    fn reset_and_idle() {
        let l = limits();
        let mut c = SlidingWindowCounter::default();
        assert!(c.is_idle(&l, 0));
        c.charge(&l, 2 * S, 1);
        assert_eq!(c.peek(&l, 2 * S).reset_after_nanos, 18 * S);
        assert!(!c.is_idle(&l, 19 * S));
        assert!(c.is_idle(&l, 20 * S));
    }
}
