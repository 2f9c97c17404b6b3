//! Calendar window: an exact fixed window aligned on the UTC calendar (hour, day, month).

use std::time::Duration;

use super::{Limits, Placement, Snapshot, Verdict};

const SECOND: u64 = 1_000_000_000;
const HOUR: u64 = 3_600 * SECOND;
const DAY: u64 = 86_400 * SECOND;

/// A UTC calendar period: what a [`CalendarWindow`] counts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CalendarPeriod {
    /// From hh:00:00 to the next hour.
    Hour,
    /// From midnight UTC to the next.
    Day,
    /// From the 1st of the month, 00:00 UTC, to the 1st of the next (28 to 31 days).
    Month,
}

impl CalendarPeriod {
    /// The longest this period lasts (a month: 31 days). Quotas built with
    /// [`crate::Quota::per_calendar_month`] and its kin take it as their window.
    pub const fn longest(self) -> Duration {
        Duration::from_secs(match self {
            Self::Hour => 3_600,
            Self::Day => 86_400,
            Self::Month => 31 * 86_400,
        })
    }

    /// The index of the period containing `unix_nanos` (nanoseconds since 1970-01-01 UTC):
    /// hours or days since the epoch, or months since January 1970.
    pub fn index(self, unix_nanos: u64) -> u64 {
        match self {
            Self::Hour => unix_nanos / HOUR,
            Self::Day => unix_nanos / DAY,
            Self::Month => {
                let (y, m, _) = civil_from_days(unix_nanos / DAY);
                (y - 1970) * 12 + (m - 1)
            }
        }
    }

    /// When period `index` starts, in nanoseconds since the epoch (saturated).
    pub fn start(self, index: u64) -> u64 {
        match self {
            Self::Hour => index.saturating_mul(HOUR),
            Self::Day => index.saturating_mul(DAY),
            // Past the year 2554 nanoseconds overflow anyway: the date arithmetic (which
            // would overflow itself for a large enough year) is skipped.
            Self::Month if index / 12 > 600 => u64::MAX,
            Self::Month => {
                let (y, m) = (1970 + index / 12, index % 12 + 1);
                days_from_civil(y, m, 1).saturating_mul(DAY)
            }
        }
    }

    /// When period `index` ends (the next one starts), in nanoseconds since the epoch.
    pub fn end(self, index: u64) -> u64 {
        self.start(index.saturating_add(1))
    }

    /// When the period containing `unix_nanos` ends: the next UTC hour, midnight or 1st of
    /// the month.
    pub fn next_boundary(self, unix_nanos: u64) -> u64 {
        self.end(self.index(unix_nanos))
    }
}

/// Days since 1970-01-01 of the proleptic Gregorian date `y-m-d` (`y >= 0`), after Howard
/// Hinnant, "chrono-Compatible Low-Level Date Algorithms", `days_from_civil` (the unsigned
/// case: eras start at year 0, March 1st).
pub(crate) fn days_from_civil(y: u64, m: u64, d: u64) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400; // [0, 399]
    let mp = if m > 2 { m - 3 } else { m + 9 }; // March = 0
    let doy = (153 * mp + 2) / 5 + d - 1; // [0, 365]
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy; // [0, 146096]
    (era * 146_097 + doe).saturating_sub(719_468)
}

/// The date `(year, month, day)` of `days` since 1970-01-01: Hinnant's `civil_from_days`.
pub(crate) fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097; // [0, 146096]
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March = 0
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// Calendar window: one count per UTC calendar period (hour, day or month), reset when the
/// next period begins. Exact: a period never admits more than `limit` (a charge is refused
/// once what is counted plus the charge would pass it); the count does not slide, so the
/// last minutes of one period and the first of the next may together admit `2 x limit`.
///
/// Time is **wall-clock** nanoseconds since the Unix epoch (UTC), not the store's monotonic
/// scale: a store passes [`crate::clock::Clock::unix_nanos`] (the memory store) or the
/// server's `TIME` (Redis). A wall clock stepped back keeps counting in the latest period
/// seen. `Limits::window_nanos` is not used: the period is. Memory: two `u64`s and the
/// period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalendarWindow {
    period: CalendarPeriod,
    /// The index of the period counted ([`CalendarPeriod::index`]).
    index: u64,
    used: u64,
}

impl CalendarWindow {
    /// A fresh window counting over `period`.
    pub const fn new(period: CalendarPeriod) -> Self {
        Self {
            period,
            index: 0,
            used: 0,
        }
    }

    /// The period counted over.
    pub const fn period(&self) -> CalendarPeriod {
        self.period
    }

    /// Moves to the period containing `now`; a clock stepped back stays where it was.
    #[inline]
    fn roll(&mut self, now: u64) {
        let k = self.period.index(now);
        if k > self.index {
            self.index = k;
            self.used = 0;
        }
    }

    fn until_end(&self, now: u64) -> u64 {
        self.period.end(self.index).saturating_sub(now).max(1)
    }

    pub(super) fn check(&mut self, l: &Limits, now: u64, cost: u64) -> Verdict {
        self.roll(now);
        if self.used.checked_add(cost).is_some_and(|n| n <= l.limit) {
            return Verdict::Allow;
        }
        if cost > l.limit {
            return Verdict::Deny { retry_after: None };
        }
        Verdict::Deny {
            retry_after: Some(self.until_end(now)),
        }
    }

    pub(super) fn charge(&mut self, _l: &Limits, now: u64, cost: u64) -> Placement {
        self.roll(now);
        self.used = self.used.saturating_add(cost);
        Placement(self.index)
    }

    pub(super) fn adjust(
        &mut self,
        _l: &Limits,
        now: u64,
        at: Placement,
        charged: u64,
        actual: u64,
    ) {
        self.roll(now);
        if actual > charged {
            // An extra charge lands now, in the current period.
            self.used = self.used.saturating_add(actual - charged);
        } else if at.0 == self.index {
            // A refund into a period that has ended is dropped.
            self.used -= (charged - actual).min(self.used);
        }
    }

    /// The reset is always the end of the period (a calendar budget resets at midnight or
    /// on the 1st whatever it holds).
    pub(super) fn peek(&mut self, l: &Limits, now: u64) -> Snapshot {
        self.roll(now);
        Snapshot {
            limit: l.limit,
            remaining: l.limit.saturating_sub(self.used),
            reset_after_nanos: self.until_end(now),
        }
    }

    pub(super) fn is_idle(&mut self, _l: &Limits, now: u64) -> bool {
        self.roll(now);
        self.used == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unix seconds of a UTC date at midnight, by the counting the algorithm replaces: whole
    /// years and months of known lengths.
    fn naive_days(y: u64, m: u64, d: u64) -> u64 {
        let leap =
            |y: u64| (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400);
        let mut days = 0;
        for year in 1970..y {
            days += if leap(year) { 366 } else { 365 };
        }
        let lengths = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
        for month in 1..m {
            days += lengths[month as usize - 1] + u64::from(month == 2 && leap(y));
        }
        days + d - 1
    }

    #[test]
    fn civil_dates_match_naive_counting() {
        for y in 1970..2500 {
            for m in 1..=12 {
                assert_eq!(days_from_civil(y, m, 1), naive_days(y, m, 1), "{y}-{m}");
                assert_eq!(civil_from_days(days_from_civil(y, m, 1)), (y, m, 1));
            }
        }
        // Every day of a leap century round-trips.
        for d in days_from_civil(1999, 1, 1)..days_from_civil(2101, 1, 1) {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2028, 2, 29), 21_243);
        assert_eq!(civil_from_days(21_243), (2028, 2, 29));
    }

    #[test]
    fn boundaries_of_each_period() {
        let at = |y, m, d| days_from_civil(y, m, d) * DAY;
        // 2028-02-29 12:30 UTC (a leap day).
        let t = at(2028, 2, 29) + 12 * HOUR + 30 * 60 * SECOND;
        assert_eq!(
            CalendarPeriod::Hour.next_boundary(t),
            at(2028, 2, 29) + 13 * HOUR
        );
        assert_eq!(CalendarPeriod::Day.next_boundary(t), at(2028, 3, 1));
        assert_eq!(CalendarPeriod::Month.next_boundary(t), at(2028, 3, 1));
        // Dec 31 -> Jan 1.
        let t = at(2027, 12, 31) + DAY - 1;
        assert_eq!(CalendarPeriod::Month.next_boundary(t), at(2028, 1, 1));
        assert_eq!(CalendarPeriod::Day.next_boundary(t), at(2028, 1, 1));
        assert_eq!(
            CalendarPeriod::Month.next_boundary(at(2028, 1, 1)),
            at(2028, 2, 1)
        );
        // February of a common year.
        let feb = CalendarPeriod::Month.index(at(2027, 2, 10));
        assert_eq!(CalendarPeriod::Month.start(feb), at(2027, 2, 1));
        assert_eq!(CalendarPeriod::Month.end(feb), at(2027, 3, 1));
    }

    /// `start` and `end` are public and documented as saturated: an index past the last
    /// period a `u64` of nanoseconds reaches (year 2554) gives `u64::MAX`, never an overflow
    /// (the month's date arithmetic used to overflow for indexes past about 6 x 10^17).
    #[test]
    fn starts_and_ends_past_the_clocks_range_saturate() {
        for period in [
            CalendarPeriod::Hour,
            CalendarPeriod::Day,
            CalendarPeriod::Month,
        ] {
            for index in [u64::MAX, u64::MAX / 2, 1 << 60, period.index(u64::MAX) + 1] {
                assert_eq!(period.start(index), u64::MAX, "{period:?} {index}");
                assert_eq!(period.end(index), u64::MAX, "{period:?} {index}");
            }
            // The last period the clock reaches starts within it.
            let last = period.index(u64::MAX);
            assert!(period.start(last) < u64::MAX, "{period:?}");
            assert_eq!(period.index(period.start(last)), last, "{period:?}");
        }
    }

    #[test]
    fn counts_reset_at_the_boundary_and_late_refunds_are_dropped() {
        let l = Limits::new(10, CalendarPeriod::Month.longest().as_nanos() as u64, 10);
        let mut w = CalendarWindow::new(CalendarPeriod::Month);
        let jan31 = days_from_civil(2028, 1, 31) * DAY + 23 * HOUR;
        assert_eq!(w.check(&l, jan31, 8), Verdict::Allow);
        let p = w.charge(&l, jan31, 8);
        let wait = DAY - 23 * HOUR;
        assert_eq!(
            w.check(&l, jan31, 3),
            Verdict::Deny {
                retry_after: Some(wait)
            }
        );
        assert_eq!(w.check(&l, jan31, 11), Verdict::Deny { retry_after: None });
        assert_eq!(w.peek(&l, jan31).remaining, 2);
        assert_eq!(w.peek(&l, jan31).reset_after_nanos, wait);
        let feb1 = days_from_civil(2028, 2, 1) * DAY;
        assert_eq!(w.peek(&l, feb1).remaining, 10);
        // The refund of January's charge, settled in February, is dropped.
        w.charge(&l, feb1, 4);
        w.adjust(&l, feb1, p, 8, 0);
        assert_eq!(w.peek(&l, feb1).remaining, 6);
        // A wall clock stepped back stays in February.
        assert_eq!(w.peek(&l, jan31).remaining, 6);
    }
}
