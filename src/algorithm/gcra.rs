//! GCRA: the generic cell rate algorithm, weighted.

use super::{mul_div_ceil, mul_div_floor, Limits, Placement, Snapshot, Verdict};

/// GCRA (ITU-T I.371's virtual scheduling algorithm; the algorithm behind `governor`),
/// weighted: one unit advances the theoretical arrival time (TAT) by the emission interval
/// `T = w / limit`, a charge of `n` units by `n x T` (rounded up, so rounding never admits
/// more).
///
/// A charge of `n` fits when `max(TAT, now) + n x T - now <= burst x T`: the bucket holds
/// `burst` units and drains `limit` per `w`. Any interval of length `d` admits at most
/// `burst + d x limit / w` units, settlements included: a refund
/// ([`State::adjust`](super::State::adjust)) gives back only the part of its charge still
/// queued ahead of the clock. Memory: two `u64`s, the TAT and the refunds given back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gcra {
    tat: u64,
    /// Nanoseconds of refunds given back (`R`): each one moved every charge queued behind
    /// it earlier by as much, so the ends that placements recorded overstate theirs by at
    /// most the refunds given since. Decays once the bucket is empty (see [`Gcra::adjust`]).
    refunded: u64,
}

impl Gcra {
    /// The state whose theoretical arrival time is `tat` and whose refunds given back are
    /// `refunded` (for stores keeping them in atomics).
    #[inline]
    pub(crate) const fn from_parts(tat: u64, refunded: u64) -> Self {
        Self { tat, refunded }
    }

    /// The theoretical arrival time: when the bucket is back to full.
    #[inline]
    pub(crate) const fn tat(&self) -> u64 {
        self.tat
    }

    /// The refunds given back, see [`Gcra::adjust`].
    #[inline]
    pub(crate) const fn refunded(&self) -> u64 {
        self.refunded
    }

    /// The placement of a charge that left the TAT at `tat` while `refunded` was given
    /// back: its end on the virtual scale `TAT + R`, which never moves back.
    #[inline]
    pub(crate) const fn placement(tat: u64, refunded: u64) -> Placement {
        Placement(tat.saturating_add(refunded))
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
    #[inline]
    pub(crate) fn acquire(
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

    /// Charges `cost` now; the placement is where the charge's interval ends, on the scale
    /// `TAT + R` (see [`Gcra::adjust`]).
    pub(super) fn charge(&mut self, l: &Limits, now: u64, cost: u64) -> Placement {
        // Rounded up: the stored backlog never understates what was charged.
        self.tat = self.tat.max(now).saturating_add(Self::interval(l, cost));
        Self::placement(self.tat, self.refunded)
    }

    /// Settles a charge placed at `placement` to `actual` units.
    ///
    /// The charge occupies `[end - n x T, end)` of the queue that drains as the clock
    /// passes; settling it to `actual < n` may give back the tail of that interval,
    /// `back = floor((n - actual) x T)`, but only the part still ahead of `now`: what has
    /// drained was spent from the bucket's allowance and can't be spent twice. (Refunding the
    /// whole `back` from the current TAT admits past the bound: 50 charged at 0 s and 100 at
    /// 30 s under 100 per 60 s, the first settled to 0 at 31 s, would free 30 s that the
    /// second one holds.)
    ///
    /// The end a charge recorded overstates its real end by what was refunded, since, to
    /// charges queued before it (each refund moves every later charge forward). With `R` the
    /// refunds ever given back and the placement `P = end + R` at charging, the real end is
    /// at least `P - R_now`, so the refund is
    ///
    /// `min(back, max(0, P - R_now - now))`, then `TAT = max(now, TAT - refund)` and `R` grows
    /// by what the TAT moved.
    ///
    /// Every charge queued when the bucket is empty has drained, so `R` may then shrink to
    /// `max(0, TAT + R - now)`: every placement is at most `TAT + R`, so none of them can
    /// bring anything back, and the state is as fresh once `TAT + R <= now` (its idle test).
    /// A placement of 0 (none recorded) gives nothing back. An extra charge lands now.
    pub(super) fn adjust(
        &mut self,
        l: &Limits,
        now: u64,
        placement: Placement,
        charged: u64,
        actual: u64,
    ) {
        if self.tat <= now {
            self.refunded = self.refunded.saturating_sub(now - self.tat);
            self.tat = now;
        }
        if actual > charged {
            self.charge(l, now, actual - charged);
        } else if self.tat > now {
            // Rounded down; the bucket can't go below empty.
            let back = mul_div_floor(charged - actual, l.window_nanos, l.limit);
            let ahead = placement
                .0
                .saturating_sub(self.refunded)
                .saturating_sub(now);
            let tat = self.tat.saturating_sub(back.min(ahead)).max(now);
            self.refunded = self.refunded.saturating_add(self.tat - tat);
            self.tat = tat;
        }
    }

    pub(super) fn peek(&mut self, l: &Limits, now: u64) -> Snapshot {
        Self::snapshot(l, self.backlog(now))
    }

    pub(super) fn is_idle(&mut self, _: &Limits, now: u64) -> bool {
        self.tat.saturating_add(self.refunded) <= now
    }
}

/// [`Gcra::acquire`] on a bare TAT, for a store that charges a bucket under the same limits
/// decision after decision: what depends on the limits alone is computed once, here, so that
/// admitting one unit divides nothing (the interval and the largest backlog that still admits
/// a unit are known).
// Kept: without it a single-rule GCRA decision runs 13% more instructions (callgrind, one
// hot key, clock stopped, as benches/algorithms.rs hot_key_fixed_clock/gcra: 460 against 408).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct PreparedGcra {
    limits: Limits,
    /// The interval of one unit: `ceil(w / limit)`.
    unit: u64,
    /// The largest backlog one unit fits in: `floor((burst - 1) x w / limit)`.
    unit_room: u64,
}

impl PreparedGcra {
    /// `None` for limits this shortcut does not cover (a zero limit, window or burst): charge
    /// those with [`Gcra::acquire`].
    pub(crate) const fn new(limits: Limits) -> Option<Self> {
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
        })
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
                let mut g = Gcra::from_parts(tat, 0);
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
        Some((room / l.limit, interval.div_ceil(l.limit)))
    }

    /// [`Gcra::peek`] of the state whose TAT is `tat`.
    #[inline]
    pub(crate) fn snapshot(&self, tat: u64, now: u64) -> Snapshot {
        let backlog = tat.saturating_sub(now);
        let l = &self.limits;
        let used = match backlog.checked_mul(l.limit) {
            Some(p) => p.div_ceil(l.window_nanos),
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
            let got = Gcra::from_parts(tat, 0).peek(&l, now);
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
        let first = g.charge(&l, 0, 60);
        g.adjust(&l, 0, first, 60, 20);
        assert_eq!(g.peek(&l, 0).remaining, 80);
        let second = g.charge(&l, 0, 20);
        g.adjust(&l, 0, second, 20, 150);
        assert_eq!(g.peek(&l, 0).remaining, 0);
        // A refund never makes the bucket more than empty.
        g.adjust(&l, 500 * S, second, 150, 0);
        assert_eq!(g.peek(&l, 500 * S).remaining, 100);
        assert!(g.is_idle(&l, 500 * S));
    }

    /// The sequence: a refund gives back only the part of its charge that has not
    /// drained yet, not capacity that a later charge already took.
    #[test]
    fn refund_is_bounded_by_what_has_not_drained() {
        // 100 per 60 s, burst 100: one unit per 0.6 s.
        let l = Limits::new(100, 60 * S, 100);
        let mut g = Gcra::default();
        let a = g.charge(&l, 0, 50);
        assert_eq!(g.check(&l, 30 * S, 100), Verdict::Allow);
        g.charge(&l, 30 * S, 100);
        // A's 30 s have drained by 31 s: nothing of it is left to give back.
        g.adjust(&l, 31 * S, a, 50, 0);
        assert!(matches!(g.check(&l, 31 * S, 50), Verdict::Deny { .. }));
        assert_eq!(g.peek(&l, 31 * S).remaining, 1);
    }

    #[test]
    fn refund_gives_back_the_undrained_tail() {
        let l = Limits::new(100, 100 * S, 100);
        let mut g = Gcra::default();
        // 60 units: [0, 60 s). At 20 s, 40 s of it is still ahead.
        let a = g.charge(&l, 0, 60);
        g.adjust(&l, 20 * S, a, 60, 10);
        // Back 50 s asked, 40 s undrained: the bucket is empty again.
        assert_eq!(g.peek(&l, 20 * S).remaining, 100);
        // A refund with no known end gives nothing back.
        let mut g = Gcra::default();
        g.charge(&l, 0, 60);
        g.adjust(&l, 0, Placement(0), 60, 0);
        assert_eq!(g.peek(&l, 0).remaining, 40);
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
