//! GCRA: the generic cell rate algorithm, weighted.

use super::{mul_div_ceil, mul_div_floor, Divisor, Limits, Placement, Snapshot, Verdict};

/// GCRA (ITU-T I.371's virtual scheduling algorithm; the algorithm behind `governor`),
/// weighted: one unit advances the theoretical arrival time (TAT) by the emission interval
/// `T = w / limit`, a charge of `n` units by `n x T` (rounded up, so rounding never admits
/// more).
///
/// A charge of `n` fits when `max(TAT, now) + n x T - now <= burst x T`: the bucket holds
/// `burst` units and drains `limit` per `w`. Any interval of length `d` admits at most
/// `burst + d x limit / w` units. Memory: one `u64`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gcra {
    tat: u64,
}

impl Gcra {
    /// The state whose theoretical arrival time is `tat` (for stores keeping it in an
    /// atomic).
    #[inline]
    pub(crate) const fn from_tat(tat: u64) -> Self {
        Self { tat }
    }

    /// The theoretical arrival time: when the bucket is back to full.
    #[inline]
    pub(crate) const fn tat(&self) -> u64 {
        self.tat
    }

    #[inline]
    fn interval(l: &Limits, units: u64) -> u64 {
        mul_div_ceil(units, l.window_nanos, l.limit)
    }

    /// Nanoseconds of backlog at `now`: how far the TAT is ahead of the clock.
    #[inline]
    fn backlog(&self, now: u64) -> u64 {
        self.tat.saturating_sub(now)
    }

    pub(super) fn check(&mut self, l: &Limits, now: u64, cost: u64) -> Verdict {
        // Compared in units x nanoseconds, exactly: backlog x limit + cost x w <= burst x w.
        // (Equivalent to `max(TAT, now) + cost x T - now <= burst x T` without rounding T.)
        let backlog = self.backlog(now);
        let w = l.window_nanos as u128;
        let used = backlog as u128 * l.limit as u128;
        let capacity = l.burst as u128 * w;
        if used + cost as u128 * w <= capacity {
            return Verdict::Allow;
        }
        if cost > l.burst {
            return Verdict::Deny { retry_after: None };
        }
        // The backlog must shrink to floor((burst - cost) x w / limit).
        let allowed_backlog = mul_div_floor(l.burst - cost, l.window_nanos, l.limit);
        Verdict::Deny {
            retry_after: Some(backlog.saturating_sub(allowed_backlog).max(1)),
        }
    }

    /// `check`, then `charge` if it fits, then `peek`, sharing the work: one 64-bit division
    /// for the interval, and the snapshot without a 128-bit one.
    pub(super) fn acquire(
        &mut self,
        l: &Limits,
        now: u64,
        cost: u64,
    ) -> (Verdict, Placement, Snapshot) {
        let backlog = self.backlog(now);
        let w = l.window_nanos as u128;
        if backlog as u128 * l.limit as u128 + cost as u128 * w <= l.burst as u128 * w {
            let placement = self.charge(l, now, cost);
            return (
                Verdict::Allow,
                placement,
                Self::snapshot(l, self.backlog(now)),
            );
        }
        (
            self.check(l, now, cost),
            Placement::default(),
            Self::snapshot(l, backlog),
        )
    }

    /// The snapshot for a backlog of `backlog` nanoseconds.
    #[inline]
    fn snapshot(l: &Limits, backlog: u64) -> Snapshot {
        // floor((burst x w - backlog x limit) / w), saturated at 0, is
        // burst - ceil(backlog x limit / w): no 128-bit division in the usual case.
        let used = if backlog == 0 {
            0
        } else {
            mul_div_ceil(backlog, l.limit, l.window_nanos)
        };
        Snapshot {
            limit: l.burst,
            remaining: l.burst.saturating_sub(used),
            reset_after_nanos: backlog,
        }
    }

    pub(super) fn charge(&mut self, l: &Limits, now: u64, cost: u64) -> Placement {
        // Rounded up: the stored backlog never understates what was charged.
        self.tat = self.tat.max(now).saturating_add(Self::interval(l, cost));
        Placement(0)
    }

    pub(super) fn adjust(&mut self, l: &Limits, now: u64, _: Placement, charged: u64, actual: u64) {
        if actual > charged {
            self.charge(l, now, actual - charged);
        } else if self.tat > now {
            // Give back what was not used, rounded down; the bucket can't go below empty.
            let back = mul_div_floor(charged - actual, l.window_nanos, l.limit);
            self.tat = self.tat.saturating_sub(back).max(now);
        }
    }

    pub(super) fn peek(&mut self, l: &Limits, now: u64) -> Snapshot {
        Self::snapshot(l, self.backlog(now))
    }

    pub(super) fn is_idle(&mut self, _: &Limits, now: u64) -> bool {
        self.tat <= now
    }
}

/// [`Gcra::acquire`] on a bare TAT, for a store that charges a bucket under the same limits
/// decision after decision: what depends on the limits alone is computed once, here, so that
/// admitting one unit divides nothing (the interval and the largest backlog that still admits
/// a unit are known) and the snapshot's division by the window is two multiplications.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PreparedGcra {
    limits: Limits,
    /// The interval of one unit: `ceil(w / limit)`.
    unit: u64,
    /// The largest backlog one unit fits in: `floor((burst - 1) x w / limit)`.
    unit_room: u64,
    by_limit: Divisor,
    by_window: Divisor,
}

impl PreparedGcra {
    /// `None` for limits this shortcut does not cover (a zero limit, window or burst): charge
    /// those with [`Gcra::acquire`].
    pub(crate) fn new(limits: Limits) -> Option<Self> {
        let Limits {
            limit,
            window_nanos: w,
            burst,
        } = limits;
        if limit == 0 || w == 0 || burst == 0 {
            return None;
        }
        Some(Self {
            limits,
            unit: mul_div_ceil(1, w, limit),
            unit_room: mul_div_floor(burst - 1, w, limit),
            by_limit: Divisor::new(limit),
            by_window: Divisor::new(w),
        })
    }

    /// The limits this was prepared for.
    #[inline]
    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The admitted half of [`Gcra::acquire`] on the state whose TAT is `tat`, under
    /// [`Self::limits`]: the TAT after charging `cost` if it fits. `None` when it does not
    /// (or a product overflows 64 bits): ask [`Gcra::acquire`]. The snapshot after it is
    /// [`Self::snapshot`] of the TAT returned.
    #[inline]
    pub(crate) fn admit(&self, tat: u64, now: u64, cost: u64) -> Option<u64> {
        let backlog = tat.saturating_sub(now);
        // `cost` fits when backlog x limit + cost x w <= burst x w, that is when the backlog
        // is at most floor((burst - cost) x w / limit).
        let (room, interval) = if cost == 1 {
            (self.unit_room, self.unit)
        } else {
            self.weighted(cost)?
        };
        (backlog <= room).then(|| tat.max(now).saturating_add(interval))
    }

    /// [`Gcra::acquire`] through [`Self::admit`] and [`Self::snapshot`].
    #[cfg(test)]
    fn acquire(&self, tat: u64, now: u64, cost: u64) -> (u64, Verdict, Snapshot) {
        match self.admit(tat, now, cost) {
            Some(tat) => (tat, Verdict::Allow, self.snapshot(tat, now)),
            None => {
                let mut g = Gcra { tat };
                let (verdict, _, snapshot) = g.acquire(&self.limits, now, cost);
                (g.tat, verdict, snapshot)
            }
        }
    }

    /// The room and interval of a charge of `cost` units; `None` when it can never fit or
    /// a product overflows 64 bits.
    #[inline]
    fn weighted(&self, cost: u64) -> Option<(u64, u64)> {
        let l = &self.limits;
        let room = l.burst.checked_sub(cost)?.checked_mul(l.window_nanos)?;
        let interval = cost.checked_mul(l.window_nanos)?;
        Some((self.by_limit.div(room), self.by_limit.div_ceil(interval)))
    }

    /// [`Gcra::peek`] of the state whose TAT is `tat`, dividing by the window with
    /// [`Divisor`].
    #[inline]
    pub(crate) fn snapshot(&self, tat: u64, now: u64) -> Snapshot {
        let backlog = tat.saturating_sub(now);
        let l = &self.limits;
        let used = match backlog.checked_mul(l.limit) {
            Some(p) => self.by_window.div_ceil(p),
            None => mul_div_ceil(backlog, l.limit, l.window_nanos),
        };
        Snapshot {
            limit: l.burst,
            remaining: l.burst.saturating_sub(used),
            reset_after_nanos: backlog,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithm::TestRng;
    const S: u64 = 1_000_000_000;

    /// The snapshot as first written, with a 128-bit division: the faster one must agree.
    #[test]
    fn snapshot_matches_the_plain_arithmetic() {
        let mut rng = TestRng::new(13);
        for _ in 0..200_000 {
            let l = Limits::new(rng.edgy().max(1), rng.edgy().max(1), rng.edgy());
            let (tat, now) = (rng.edgy(), rng.edgy());
            let backlog = tat.saturating_sub(now);
            let w = l.window_nanos as u128;
            let free = (l.burst as u128 * w).saturating_sub(backlog as u128 * l.limit as u128);
            let remaining = u64::try_from(free / w).unwrap_or(u64::MAX).min(l.burst);
            let got = Gcra { tat }.peek(&l, now);
            assert_eq!(got.remaining, remaining, "{l:?} tat={tat} now={now}");
            assert_eq!(got.reset_after_nanos, backlog);
        }
    }

    #[test]
    fn burst_then_rate() {
        // 10 per 10s: one unit per second, burst 10.
        let l = Limits::new(10, 10 * S, 10);
        let mut g = Gcra::default();
        for _ in 0..10 {
            assert_eq!(g.check(&l, 0, 1), Verdict::Allow);
            g.charge(&l, 0, 1);
        }
        assert_eq!(
            g.check(&l, 0, 1),
            Verdict::Deny {
                retry_after: Some(S)
            }
        );
        assert_eq!(
            g.check(&l, 0, 3),
            Verdict::Deny {
                retry_after: Some(3 * S)
            }
        );
        assert_eq!(g.peek(&l, S / 2).remaining, 0);
        assert_eq!(g.peek(&l, S).remaining, 1);
        assert_eq!(g.peek(&l, 0).reset_after_nanos, 10 * S);
        assert_eq!(g.check(&l, 0, 11), Verdict::Deny { retry_after: None });
    }

    #[test]
    fn burst_smaller_than_limit() {
        let l = Limits::new(10, 10 * S, 2);
        let mut g = Gcra::default();
        g.charge(&l, 0, 2);
        assert!(matches!(g.check(&l, 0, 1), Verdict::Deny { .. }));
        assert_eq!(g.peek(&l, 0).limit, 2);
    }

    #[test]
    fn refund_and_extra() {
        let l = Limits::new(100, 100 * S, 100);
        let mut g = Gcra::default();
        g.charge(&l, 0, 60);
        g.adjust(&l, 0, Placement(0), 60, 20);
        assert_eq!(g.peek(&l, 0).remaining, 80);
        g.adjust(&l, 0, Placement(0), 20, 150);
        assert_eq!(g.peek(&l, 0).remaining, 0);
        // A refund never makes the bucket more than empty.
        g.adjust(&l, 500 * S, Placement(0), 150, 0);
        assert_eq!(g.peek(&l, 500 * S).remaining, 100);
        assert!(g.is_idle(&l, 500 * S));
    }

    /// The prepared shortcut decides exactly as the general code, admitted or denied.
    #[test]
    fn prepared_acquire_matches_acquire() {
        let mut rng = TestRng::new(17);
        for case in 0..3_000 {
            // Products of the admission test stay below 2^127 (the general code's u128
            // arithmetic); the shortcut must also cover the 64-bit overflows in between.
            let limit = 1 + rng.below(if case % 2 == 0 { 1_000 } else { 1 << 40 });
            let window = 1 + rng.below(if case % 3 == 0 { 1 << 20 } else { 1 << 62 });
            let burst = match rng.below(3) {
                0 => limit,
                1 => 1 + rng.below(limit.saturating_mul(2)),
                _ => 1 + rng.below(1 << 40),
            };
            let l = Limits::new(limit, window, burst);
            let p = PreparedGcra::new(l).expect("non-zero limits");
            let mut g = Gcra::default();
            let mut now = rng.below(1 << 40);
            for _ in 0..100 {
                now = now.saturating_add(rng.below(window / 4 + 2));
                let cost = match rng.below(5) {
                    0 | 1 => 1,
                    2 => rng.below(burst / 4 + 2),
                    3 => rng.below(burst.saturating_mul(2) + 1),
                    _ => 0,
                };
                let tat = g.tat;
                let want = g.acquire(&l, now, cost);
                let got = p.acquire(tat, now, cost);
                assert_eq!(
                    (got.0, got.1, got.2),
                    (g.tat, want.0, want.2),
                    "{l:?} tat={tat} now={now} cost={cost}"
                );
            }
        }
        assert_eq!(PreparedGcra::new(Limits::new(0, S, 1)), None);
        assert_eq!(PreparedGcra::new(Limits::new(1, 0, 1)), None);
        assert_eq!(PreparedGcra::new(Limits::new(1, S, 0)), None);
    }
}
