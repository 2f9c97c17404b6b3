//! GCRA: the generic cell rate algorithm, weighted.

use super::{mul_div_ceil, mul_div_floor, Limits, Placement, Snapshot, Verdict};

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
}
