//! Sliding window log: exact, memory grows with the charges in the window.

use std::collections::VecDeque;

use super::{Limits, Placement, Snapshot, Verdict};

/// Sliding window log: every charge is kept as `(time, amount)` until it leaves the window,
/// with the running sum of the amounts.
///
/// Exact: no window of length `w` ever holds more than `limit` charged units (refunds only
/// lower the sum; extra charges at settlement are the one way past it, and they record tokens
/// that were really spent). Charges at the same instant share one entry, so memory is at most
/// one entry (16 bytes) per distinct instant in the window, and never more than `limit`
/// entries for unit-or-larger charges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlidingWindowLog {
    entries: VecDeque<(u64, u64)>,
    total: u64,
}

impl SlidingWindowLog {
    /// Drops the entries that have left the window `(now - w, now]`.
    #[inline]
    fn prune(&mut self, w: u64, now: u64) {
        while let Some(&(t, amount)) = self.entries.front() {
            if t.saturating_add(w) > now {
                break;
            }
            self.entries.pop_front();
            self.total -= amount;
        }
        if self.entries.is_empty() && self.entries.capacity() > 64 {
            // A burst is over: give its memory back.
            self.entries.shrink_to_fit();
        }
    }

    pub(super) fn check(&mut self, l: &Limits, now: u64, cost: u64) -> Verdict {
        let w = l.window_nanos;
        self.prune(w, now);
        if self.total.saturating_add(cost) <= l.limit {
            return Verdict::Allow;
        }
        if cost > l.limit {
            return Verdict::Deny { retry_after: None };
        }
        // Walk the entries oldest first until enough has expired for `cost` to fit.
        let mut total = self.total;
        for &(t, amount) in &self.entries {
            total -= amount;
            if total + cost <= l.limit {
                let wait = t.saturating_add(w).saturating_sub(now).max(1);
                return Verdict::Deny {
                    retry_after: Some(wait),
                };
            }
        }
        // Unreachable in practice: once every entry expired, total is 0 and cost <= limit.
        Verdict::Deny {
            retry_after: Some(w),
        }
    }

    pub(super) fn charge(&mut self, l: &Limits, now: u64, cost: u64) -> Placement {
        self.prune(l.window_nanos, now);
        self.add(now, cost);
        Placement(now)
    }

    fn add(&mut self, now: u64, cost: u64) {
        if cost == 0 {
            return;
        }
        match self.entries.back_mut() {
            Some((t, amount)) if *t >= now => *amount = amount.saturating_add(cost),
            _ => self.entries.push_back((now, cost)),
        }
        self.total = self.total.saturating_add(cost);
    }

    pub(super) fn adjust(
        &mut self,
        l: &Limits,
        now: u64,
        at: Placement,
        charged: u64,
        actual: u64,
    ) {
        self.prune(l.window_nanos, now);
        if actual > charged {
            self.add(now, actual - charged);
            return;
        }
        let refund = charged - actual;
        // Entries are sorted by time; entries at one instant were merged, and expire together,
        // so taking the refund from the merged entry is exact.
        if let Ok(i) = self.entries.binary_search_by_key(&at.0, |&(t, _)| t) {
            let entry = &mut self.entries[i];
            let taken = refund.min(entry.1);
            entry.1 -= taken;
            self.total -= taken;
            if entry.1 == 0 {
                self.entries.remove(i);
            }
        }
    }

    pub(super) fn peek(&mut self, l: &Limits, now: u64) -> Snapshot {
        let w = l.window_nanos;
        self.prune(w, now);
        Snapshot {
            limit: l.limit,
            remaining: l.limit.saturating_sub(self.total),
            reset_after_nanos: self
                .entries
                .back()
                .map_or(0, |&(t, _)| t.saturating_add(w).saturating_sub(now)),
        }
    }

    pub(super) fn is_idle(&mut self, l: &Limits, now: u64) -> bool {
        self.prune(l.window_nanos, now);
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    const S: u64 = 1_000_000_000;

    #[test]
    fn exact_window_and_retry_after() {
        let l = Limits::new(10, 10 * S, 10);
        let mut log = SlidingWindowLog::default();
        log.charge(&l, 0, 4);
        log.charge(&l, 3 * S, 6);
        assert_eq!(
            log.check(&l, 5 * S, 1),
            Verdict::Deny {
                retry_after: Some(5 * S)
            }
        );
        assert_eq!(
            log.check(&l, 5 * S, 5),
            Verdict::Deny {
                retry_after: Some(8 * S)
            }
        );
        // The first entry leaves the window at exactly 10s.
        assert_eq!(log.check(&l, 10 * S, 4), Verdict::Allow);
        assert_eq!(log.peek(&l, 10 * S).reset_after_nanos, 3 * S);
        assert_eq!(log.check(&l, 0, 11), Verdict::Deny { retry_after: None });
    }

    #[test]
    fn merges_same_instant_and_refunds_exactly() {
        let l = Limits::new(100, 10 * S, 100);
        let mut log = SlidingWindowLog::default();
        let a = log.charge(&l, S, 30);
        let b = log.charge(&l, S, 20);
        assert_eq!(log.entries.len(), 1);
        log.adjust(&l, 2 * S, a, 30, 10);
        assert_eq!(log.total, 30);
        log.adjust(&l, 2 * S, b, 20, 0);
        assert_eq!(log.total, 10);
        // A refund after expiry is dropped.
        log.adjust(&l, 11 * S, a, 10, 0);
        assert_eq!(log.total, 0);
        assert!(log.is_idle(&l, 11 * S));
        // Extra charges land now.
        let c = log.charge(&l, 12 * S, 5);
        log.adjust(&l, 13 * S, c, 5, 9);
        assert_eq!(log.entries, VecDeque::from(vec![(12 * S, 5), (13 * S, 4)]));
    }
}
