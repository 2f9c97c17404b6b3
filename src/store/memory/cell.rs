//! A bucket's state in the memory store: a GCRA cell updated by compare-and-swap, or another
//! algorithm's state behind a mutex; and holding several buckets for one decision.
//!
//! A GCRA cell keeps its TAT in one atomic, updated by compare-and-swap for charges, and the
//! refunds it gave back (`Gcra`'s `R`) in another, written only while the cell is held (a
//! settlement, a denial, a multi-rule decision): a charge reads `R` after the TAT it
//! replaces, so the pair it sees is one the cell had (a hold that changes `R` also changes
//! the TAT, which only returns to an earlier value through further charges).
//!
//! Neither keeps the quota's limits: they come with each charge (a bucket is charged under
//! the quota of the charge, and the quota carries what the GCRA path precomputes). A locked
//! slot keeps only its last window, for the idle sweep, which runs without a quota.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::Decided;
use crate::algorithm::{Gcra, Limits, PreparedGcra, State};
use crate::rule::{Algorithm, Quota};

/// A locked bucket's state: its algorithm's state and the window it was last charged under
/// (for idle checks, which have no quota).
#[derive(Debug)]
pub(super) struct LockedSlot {
    pub(super) state: State,
    window_nanos: u64,
}

impl LockedSlot {
    pub(super) fn new(algorithm: Algorithm, quota: &Quota) -> Self {
        Self {
            state: State::new(algorithm),
            window_nanos: quota.limits().window_nanos,
        }
    }

    /// Makes the state match the quota's algorithm and records its window. Two rules of the
    /// same name with different algorithms (two layers sharing one store) reset each
    /// other's state rather than misread it.
    #[inline]
    pub(super) fn fit(&mut self, quota: &Quota) {
        if self.state.algorithm() != quota.algorithm() {
            self.state = State::new(quota.algorithm());
        }
        self.window_nanos = quota.limits().window_nanos;
    }

    /// Whether the state equals a fresh one at `now` (`unix` for calendar windows).
    pub(super) fn is_idle(&mut self, now: u64, unix: u64) -> bool {
        let at = if self.state.algorithm().is_calendar() {
            unix
        } else {
            now
        };
        // Idle checks read the window alone.
        let limits = Limits::new(0, self.window_nanos, 0);
        self.state.is_idle(&limits, at)
    }
}

#[inline]
pub(super) fn lock(m: &Mutex<LockedSlot>) -> MutexGuard<'_, LockedSlot> {
    // The algorithms don't panic while holding the lock; if something did, the state is still
    // a valid value, so keep using it rather than poisoning every later request.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A GCRA bucket's state: its TAT and the refunds it gave back.
#[derive(Debug, Default)]
pub(super) struct GcraCell {
    tat: AtomicU64,
    /// Written only while the cell is held ([`HELD`]), before the TAT is stored back.
    refunded: AtomicU64,
}

/// A GCRA cell's value while a decision holds it (the cell's lock bit).
const HELD: u64 = u64::MAX;

/// The largest real TAT a GCRA cell stores (584 years of nanoseconds: never reached).
const MAX_TAT: u64 = u64::MAX - 1;

/// Waits a little for a GCRA cell a multi-rule decision holds (for a few dozen
/// nanoseconds: it holds nothing else it could wait for).
fn backoff(spins: &mut u32) {
    if *spins < 64 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
    *spins += 1;
}

impl GcraCell {
    /// Whether a decision holds the cell now.
    pub(super) fn is_held(&self) -> bool {
        self.tat.load(Ordering::Acquire) == HELD
    }

    /// Idle when its TAT has passed and its refunds have decayed too (see `Gcra::adjust`);
    /// a held cell's value never has.
    pub(super) fn is_idle(&self, now: u64) -> bool {
        let tat = self.tat.load(Ordering::Acquire);
        let refunded = self.refunded.load(Ordering::Acquire);
        tat.saturating_add(refunded) <= now
    }

    /// A single-rule charge under `prepared` (the quota's), by compare-and-swap: the TAT the
    /// charge left (not clamped) and the refunds given back then (for the placement); `None`
    /// when denied (or a product overflows 64 bits): ask [`GcraCell::acquire`].
    /// Only the admitted case is decided here; the answer is built by the caller from the
    /// TAT (the snapshot is computed once the charge is in, and nothing is carried through
    /// retries).
    #[inline]
    pub(super) fn admit(&self, prepared: &PreparedGcra, now: u64, cost: u64) -> Option<(u64, u64)> {
        let mut cur = self.tat.load(Ordering::Acquire);
        loop {
            if cur == HELD {
                cur = self.wait();
                continue;
            }
            // Read after the TAT it goes with (see the module docs).
            let refunded = self.refunded.load(Ordering::Acquire);
            let tat = prepared.admit(cur, now, cost)?;
            let new = tat.min(MAX_TAT);
            if new != cur {
                if let Err(actual) =
                    self.tat
                        .compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire)
                {
                    cur = actual;
                    continue;
                }
            }
            return Some((tat, refunded));
        }
    }

    /// A single-rule decision by compare-and-swap, without holding the cell (as governor
    /// does): GCRA on the value read, stored back if it charged; read again and decided
    /// again if another charge stored first.
    #[inline]
    pub(super) fn acquire(&self, limits: &Limits, now: u64, cost: u64) -> Decided {
        let mut cur = self.tat.load(Ordering::Acquire);
        loop {
            if cur == HELD {
                cur = self.wait();
                continue;
            }
            // Read after the TAT it goes with (see the module docs).
            let refunded = self.refunded.load(Ordering::Acquire);
            let mut gcra = Gcra::from_parts(cur, refunded);
            let decided = gcra.acquire(limits, now, cost);
            let new = gcra.tat().min(MAX_TAT);
            if new != cur {
                if let Err(actual) =
                    self.tat
                        .compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire)
                {
                    cur = actual;
                    continue;
                }
            }
            return decided;
        }
    }

    /// The cell's value once no decision holds it.
    #[cold]
    fn wait(&self) -> u64 {
        let mut spins = 0;
        loop {
            let cur = self.tat.load(Ordering::Acquire);
            if cur != HELD {
                return cur;
            }
            backoff(&mut spins);
        }
    }

    /// Holds the cell (for a multi-rule decision, a settlement, a denial) until the
    /// returned value is dropped, which stores its state back.
    pub(super) fn hold(&self) -> Held<'_> {
        let mut spins = 0;
        loop {
            let cur = self.tat.load(Ordering::Acquire);
            if cur == HELD {
                backoff(&mut spins);
                continue;
            }
            if self
                .tat
                .compare_exchange_weak(cur, HELD, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                let refunded = self.refunded.load(Ordering::Acquire);
                return Held::Gcra {
                    cell: self,
                    state: State::Gcra(Gcra::from_parts(cur, refunded)),
                };
            }
        }
    }
}

/// A bucket held by a decision: a locked slot, or a GCRA cell whose value is [`HELD`] until
/// the decision ends (its state then stored back, charged or not).
pub(super) enum Held<'b> {
    Locked(MutexGuard<'b, LockedSlot>),
    Gcra { cell: &'b GcraCell, state: State },
}

impl Held<'_> {
    /// The state held.
    #[inline]
    pub(super) fn state(&mut self) -> &mut State {
        match self {
            Held::Locked(guard) => &mut guard.state,
            Held::Gcra { state, .. } => state,
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Held::Gcra { cell, state } = self {
            let (tat, refunded) = match state {
                State::Gcra(g) => (g.tat().min(MAX_TAT), g.refunded()),
                // A held cell's state stays GCRA.
                _ => (0, 0),
            };
            // The refunds first: a charge reading this TAT then reads them too.
            cell.refunded.store(refunded, Ordering::Release);
            cell.tat.store(tat, Ordering::Release);
        }
    }
}
