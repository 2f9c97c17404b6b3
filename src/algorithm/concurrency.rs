//! Concurrency: in-flight requests, not a rate.

use super::{Limits, Placement, Snapshot, Verdict};

/// How long a denied caller is told to wait for a concurrency slot: slots free up when other
/// requests finish, which no clock predicts, so this is a hint, not a promise.
pub const CONCURRENCY_RETRY_NANOS: u64 = 1_000_000_000;

/// A count of requests in flight: a charge takes slots, settling it to 0 gives them back.
/// The window plays no part. Memory: one `u64`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Concurrency {
    in_flight: u64,
}

impl Concurrency {
    /// Slots taken now.
    pub(crate) fn in_flight(&self) -> u64 {
        self.in_flight
    }

    pub(super) fn check(&mut self, l: &Limits, _: u64, cost: u64) -> Verdict {
        if self.in_flight.saturating_add(cost) <= l.limit {
            Verdict::Allow
        } else if cost > l.limit {
            Verdict::Deny { retry_after: None }
        } else {
            Verdict::Deny {
                retry_after: Some(CONCURRENCY_RETRY_NANOS),
            }
        }
    }

    pub(super) fn charge(&mut self, _: &Limits, _: u64, cost: u64) -> Placement {
        self.in_flight = self.in_flight.saturating_add(cost);
        Placement(0)
    }

    pub(super) fn adjust(&mut self, _: &Limits, _: u64, _: Placement, charged: u64, actual: u64) {
        self.in_flight = self
            .in_flight
            .saturating_sub(charged)
            .saturating_add(actual);
    }

    pub(super) fn peek(&mut self, l: &Limits, _: u64) -> Snapshot {
        Snapshot {
            limit: l.limit,
            remaining: l.limit.saturating_sub(self.in_flight),
            reset_after_nanos: 0,
        }
    }

    pub(super) fn is_idle(&mut self, _: &Limits, _: u64) -> bool {
        self.in_flight == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_taken_and_given_back() {
        let l = Limits::new(2, 1, 2);
        let mut c = Concurrency::default();
        let p = c.charge(&l, 0, 1);
        c.charge(&l, 0, 1);
        assert!(matches!(
            c.check(&l, 0, 1),
            Verdict::Deny {
                retry_after: Some(_)
            }
        ));
        c.adjust(&l, 0, p, 1, 0);
        assert_eq!(c.check(&l, 0, 1), Verdict::Allow);
        assert_eq!(c.peek(&l, 0).remaining, 1);
        assert_eq!(c.check(&l, 0, 3), Verdict::Deny { retry_after: None });
    }
}
