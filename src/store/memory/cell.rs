//! A bucket of the memory store: a GCRA number updated by compare-and-swap, or another
//! algorithm's state behind a mutex; and holding several buckets for one decision.
//!
//! A GCRA cell keeps its TAT in one atomic, updated by compare-and-swap for charges, and the
//! refunds it gave back (`Gcra`'s `R`) in another, written only while the cell is held (a
//! settlement, a denial, a multi-rule decision): a charge reads `R` after the TAT it
//! replaces, so the pair it sees is one the cell had (a hold that changes `R` also changes
//! the TAT, which only returns to an earlier value through further charges).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::Decided;
use crate::algorithm::{Divisor, Gcra, Limits, PreparedGcra, State};
use crate::rule::{Algorithm, Quota};

/// A locked bucket's state: its algorithm state, the limits it was last charged under (for
/// idle checks) with their window prepared for division, and whether a sweep removed it
/// from the map.
#[derive(Debug)]
pub(super) struct Slot {
    pub(super) state: State,
    pub(super) limits: Limits,
    pub(super) by_window: Divisor,
    pub(super) evicted: bool,
}

impl Slot {
    pub(super) fn new(state: State, limits: Limits) -> Self {
        Self {
            state,
            limits,
            by_window: Divisor::new(limits.window_nanos),
            evicted: false,
        }
    }
}

/// One bucket. GCRA's whole state is one number, its theoretical arrival time, kept in an
/// atomic and updated by compare-and-swap without a lock (as governor does); the other
/// algorithms' states sit behind a small mutex.
#[derive(Debug)]
pub(super) enum Cell {
    Locked(Mutex<Slot>),
    Gcra(GcraCell),
}

/// A GCRA bucket: its TAT, the refunds it gave back, and the limits it was created under
/// prepared for fast decisions (charges under other limits take the general path).
#[derive(Debug)]
pub(super) struct GcraCell {
    pub(super) tat: AtomicU64,
    /// Written only while the cell is held ([`HELD`]), before the TAT is stored back.
    pub(super) refunded: AtomicU64,
    pub(super) prepared: Option<PreparedGcra>,
}

/// A GCRA cell's value once a sweep has removed it: charges seeing it look the bucket up
/// again. (A real TAT is kept below it.)
pub(super) const EVICTED: u64 = u64::MAX;

impl Cell {
    pub(super) fn new(quota: &Quota) -> Self {
        match quota.algorithm() {
            Algorithm::Gcra => Self::Gcra(GcraCell {
                tat: AtomicU64::new(0),
                refunded: AtomicU64::new(0),
                prepared: PreparedGcra::new(quota.limits()),
            }),
            a => Self::Locked(Mutex::new(Slot::new(State::new(a), quota.limits()))),
        }
    }

    /// Whether this cell can hold `quota`'s state (a GCRA cell only GCRA, a locked cell any
    /// other algorithm: [`fit`] resets it to the quota's).
    #[inline]
    pub(super) fn suits(&self, quota: &Quota) -> bool {
        matches!(self, Self::Gcra(_)) == (quota.algorithm() == Algorithm::Gcra)
    }
}

#[inline]
pub(super) fn lock(m: &Mutex<Slot>) -> MutexGuard<'_, Slot> {
    // The algorithms don't panic while holding the lock; if something did, the state is still
    // a valid value, so keep using it rather than poisoning every later request.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A GCRA cell's value while a multi-rule decision holds it (the cell's lock bit).
pub(super) const HELD: u64 = u64::MAX - 1;

/// The largest real TAT a GCRA cell stores (584 years of nanoseconds: never reached).
pub(super) const MAX_TAT: u64 = u64::MAX - 2;

/// Waits a little for a GCRA cell a multi-rule decision holds (for a few dozen
/// nanoseconds: it holds nothing else it could wait for).
pub(super) fn backoff(spins: &mut u32) {
    if *spins < 64 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
    *spins += 1;
}

/// Runs `f` on a GCRA cell's state, holding the cell, and stores the result. `None` if the
/// cell was evicted. (Settlements change the refunds as well as the TAT; the hold keeps the
/// two together.)
pub(super) fn update_gcra<T>(
    cell: &GcraCell,
    limits: &Limits,
    f: impl FnOnce(&mut State, &Limits) -> T,
) -> Option<T> {
    let mut held = hold_gcra(cell, *limits)?;
    Some(f(&mut held.slot().state, limits))
}

/// How [`GcraCell::admit`] went.
pub(super) enum Admission<'c> {
    /// Charged: the cell's prepared limits, the TAT the charge left (not clamped) and the
    /// refunds given back then (for the placement).
    Admitted(&'c PreparedGcra, u64, u64),
    /// Denied, or other limits than the prepared ones: ask [`GcraCell::acquire_general`].
    General,
    /// The cell was evicted.
    Evicted,
}

impl GcraCell {
    /// A single-rule charge under the cell's prepared limits, by compare-and-swap. Only the
    /// admitted case is decided here; the answer is built by the caller from the TAT (the
    /// snapshot is computed once the charge is in, and nothing is carried through retries).
    #[inline]
    pub(super) fn admit(&self, quota: &Quota, now: u64, cost: u64) -> Admission<'_> {
        let prepared = match &self.prepared {
            Some(p) if *p.limits() == quota.limits() => p,
            _ => return Admission::General,
        };
        let mut cur = self.tat.load(Ordering::Acquire);
        loop {
            if cur > MAX_TAT {
                match self.wait(cur) {
                    Some(c) => cur = c,
                    None => return Admission::Evicted,
                }
                continue;
            }
            // Read after the TAT it goes with (see the module docs).
            let refunded = self.refunded.load(Ordering::Acquire);
            // `None`: denied, or a product past 64 bits.
            let Some(tat) = prepared.admit(cur, now, cost) else {
                return Admission::General;
            };
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
            return Admission::Admitted(prepared, tat, refunded);
        }
    }

    /// A single-rule decision through the general code: denials, and limits other than the
    /// prepared ones. `None` if the cell was evicted.
    #[cold]
    #[inline(never)]
    pub(super) fn acquire_general(&self, quota: &Quota, now: u64, cost: u64) -> Option<Decided> {
        update_gcra(self, &quota.limits(), |state, limits| {
            state.acquire(limits, now, cost)
        })
    }

    /// The cell's value once a multi-rule decision no longer holds it; `None` if it was
    /// evicted.
    #[cold]
    pub(super) fn wait(&self, mut cur: u64) -> Option<u64> {
        let mut spins = 0;
        while cur == HELD {
            backoff(&mut spins);
            cur = self.tat.load(Ordering::Acquire);
        }
        (cur != EVICTED).then_some(cur)
    }
}

/// The TAT and refunds of a GCRA state, as a cell stores them.
#[inline]
pub(super) fn gcra_parts(state: &State) -> (u64, u64) {
    match state {
        State::Gcra(g) => (g.tat().min(MAX_TAT), g.refunded()),
        // Cells hold GCRA states only.
        _ => (0, 0),
    }
}

/// A bucket held by a multi-rule decision: a locked slot, or a GCRA cell whose value is
/// [`HELD`] until the decision ends (its state then stored back, charged or not).
pub(super) enum Held<'b> {
    Locked(MutexGuard<'b, Slot>),
    Gcra { cell: &'b GcraCell, slot: Slot },
}

impl Held<'_> {
    #[inline]
    pub(super) fn slot(&mut self) -> &mut Slot {
        match self {
            Held::Locked(guard) => guard,
            Held::Gcra { slot, .. } => slot,
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Held::Gcra { cell, slot } = self {
            let (tat, refunded) = gcra_parts(&slot.state);
            // The refunds first: a charge reading this TAT then reads them too.
            cell.refunded.store(refunded, Ordering::Release);
            cell.tat.store(tat, Ordering::Release);
        }
    }
}

/// Holds `cell` (for a multi-rule decision, a settlement, a denial) under `limits`; `None`
/// if it was evicted.
pub(super) fn hold_gcra(cell: &GcraCell, limits: Limits) -> Option<Held<'_>> {
    let mut spins = 0;
    loop {
        let cur = cell.tat.load(Ordering::Acquire);
        match cur {
            EVICTED => return None,
            HELD => backoff(&mut spins),
            _ => {
                if cell
                    .tat
                    .compare_exchange_weak(cur, HELD, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    let refunded = cell.refunded.load(Ordering::Acquire);
                    return Some(Held::Gcra {
                        cell,
                        slot: Slot {
                            state: State::Gcra(Gcra::from_parts(cur, refunded)),
                            limits,
                            // Read by the counter's path only: not worth a division here.
                            by_window: Divisor::new(1),
                            evicted: false,
                        },
                    });
                }
            }
        }
    }
}
