//! A circuit breaker: after repeated failures, stop calling Redis for a while, then let one
//! probe through; its success closes the circuit again.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub(crate) struct Breaker {
    origin: Instant,
    failures: AtomicU32,
    /// Milliseconds since `origin` until which calls are refused; 0 when closed.
    open_until: AtomicU64,
    threshold: u32,
    cooldown: u64,
}

impl Breaker {
    pub(crate) fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            origin: Instant::now(),
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            threshold: threshold.max(1),
            cooldown: u64::try_from(cooldown.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// May a call go to Redis now? When the cooldown is over, exactly one caller gets to
    /// probe (the others keep failing fast until it reports).
    pub(crate) fn allow(&self) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        let now = self.now();
        now >= until
            && self
                .open_until
                .compare_exchange(
                    until,
                    now.saturating_add(self.cooldown),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
    }

    pub(crate) fn is_open(&self) -> bool {
        self.open_until.load(Ordering::Acquire) != 0
    }

    pub(crate) fn success(&self) {
        self.failures.store(0, Ordering::Release);
        self.open_until.store(0, Ordering::Release);
    }

    /// Records a failure; returns true when it opened the circuit.
    pub(crate) fn failure(&self) -> bool {
        let failures = self
            .failures
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        if failures >= self.threshold {
            let until = self.now().saturating_add(self.cooldown).max(1);
            return self.open_until.swap(until, Ordering::AcqRel) == 0;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_and_closes_on_success() {
        let b = Breaker::new(2, Duration::from_secs(3600));
        assert!(b.allow());
        assert!(!b.failure());
        assert!(b.failure(), "second failure opens");
        assert!(!b.allow(), "open: fail fast");
        b.success();
        assert!(b.allow());
        // A zero-length cooldown lets one probe through at once.
        let b = Breaker::new(1, Duration::ZERO);
        b.failure();
        assert!(b.is_open());
    }
}
