//! A bucket of the memory store: a GCRA number updated by compare-and-swap, or another
//! algorithm's state behind a mutex; and holding several buckets for one decision.

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

/// A GCRA bucket: its TAT, and the limits it was created under prepared for fast decisions
/// (charges under other limits take the general path).
#[derive(Debug)]
pub(super) struct GcraCell {
    pub(super) tat: AtomicU64,
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

/// Runs `f` on a GCRA cell's state and stores the result by compare-and-swap, retrying if
/// another charge got there first. `None` if the cell was evicted. `f` may run several
/// times, each time on the latest state.
pub(super) fn update_gcra<T>(
    cell: &AtomicU64,
    limits: &Limits,
    mut f: impl FnMut(&mut State, &Limits) -> T,
) -> Option<T> {
    let mut spins = 0;
    let mut cur = cell.load(Ordering::Acquire);
    loop {
        match cur {
            EVICTED => return None,
            HELD => {
                backoff(&mut spins);
                cur = cell.load(Ordering::Acquire);
                continue;
            }
            _ => {}
        }
        let mut state = State::Gcra(Gcra::from_tat(cur));
        let out = f(&mut state, limits);
        let new = gcra_tat(&state);
        if new == cur {
            return Some(out);
        }
        match cell.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Some(out),
            Err(actual) => cur = actual,
        }
    }
}

/// How [`GcraCell::admit`] went.
pub(super) enum Admission<'c> {
    /// Charged: the cell's prepared limits, and the TAT the charge left (not clamped).
    Admitted(&'c PreparedGcra, u64),
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
            return Admission::Admitted(prepared, tat);
        }
    }

    /// A single-rule decision through the general code: denials, and limits other than the
    /// prepared ones. `None` if the cell was evicted.
    #[cold]
    #[inline(never)]
    pub(super) fn acquire_general(&self, quota: &Quota, now: u64, cost: u64) -> Option<Decided> {
        update_gcra(&self.tat, &quota.limits(), |state, limits| {
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

/// The TAT of a GCRA state, as a cell stores it.
#[inline]
pub(super) fn gcra_tat(state: &State) -> u64 {
    match state {
        State::Gcra(g) => g.tat().min(MAX_TAT),
        // Cells hold GCRA states only.
        _ => 0,
    }
}

/// A bucket held by a multi-rule decision: a locked slot, or a GCRA cell whose value is
/// [`HELD`] until the decision ends (its state then stored back, charged or not).
pub(super) enum Held<'b> {
    Locked(MutexGuard<'b, Slot>),
    Gcra { cell: &'b AtomicU64, slot: Slot },
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
            cell.store(gcra_tat(&slot.state), Ordering::Release);
        }
    }
}

/// Holds `cell` for a multi-rule decision; `None` if it was evicted.
pub(super) fn hold_gcra<'b>(cell: &'b AtomicU64, quota: &Quota) -> Option<Held<'b>> {
    let mut spins = 0;
    loop {
        let cur = cell.load(Ordering::Acquire);
        match cur {
            EVICTED => return None,
            HELD => backoff(&mut spins),
            _ => {
                if cell
                    .compare_exchange_weak(cur, HELD, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    return Some(Held::Gcra {
                        cell,
                        slot: Slot {
                            state: State::Gcra(Gcra::from_tat(cur)),
                            limits: quota.limits(),
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
