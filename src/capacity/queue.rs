//! The short queue of a bucket: requests that found no capacity wait here (holding no slot)
//! for a local release of the bucket, served by priority, then arrival.
//!
//! Each release wakes the first waiter not woken already; a woken waiter tries its charges
//! again. Admitted, it leaves; refused again, it keeps its place: refused by its tier's
//! reserve or the saturation threshold, it hands the wake-up on to the next waiter, so that
//! a release is not lost to a waiter that can't use it (past the waiters of its own tier,
//! which would be refused alike); refused by the bucket full (the slot went to a request
//! that came in meanwhile), it doesn't (the next would be refused too). A waiter
//! that leaves (its deadline, its client gone) hands on a wake-up it had not used. Callers
//! of a lower priority find the bucket one slot smaller for each waiter above them (see
//! `open_to` in `limiter/capacity.rs`): a waiter that leaves without a slot wakes the first
//! waiter below it, and a bucket whose limit grows wakes as many waiters as it gained
//! slots.

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

/// A waiter's place: higher priority first, then earlier arrival.
type Place = (Reverse<u8>, u64);

#[derive(Debug)]
struct Waiter {
    notify: Arc<Notify>,
    woken: bool,
    /// Its tier's name: waiters of one tier are refused alike. (A name, not an index of the
    /// capacity's tiers: a rebuilt layer shares the queue with another list of tiers.)
    tier: Arc<str>,
}

#[derive(Debug, Default)]
struct Waiters {
    next: u64,
    queue: BTreeMap<Place, Waiter>,
}

impl Waiters {
    /// A waiter at `place` left without a slot: waiters below it found the bucket one slot
    /// smaller for it (outside their reserve, see `open_to` in `limiter/capacity.rs`), so
    /// the first of a lower priority not woken yet tries again, in case that slot is free.
    fn left(&mut self, place: Place) {
        let level = place.0;
        if let Some((_, w)) = self
            .queue
            .range_mut((
                std::ops::Bound::Excluded((level, u64::MAX)),
                std::ops::Bound::Unbounded,
            ))
            .find(|(_, w)| !w.woken)
        {
            w.woken = true;
            w.notify.notify_one();
        }
    }

    /// A waiter at `place` was admitted: if it was the last waiter above the first one below
    /// it not woken yet, that one tries again. While it was being admitted its slot counted
    /// twice for those below (taken, and held back for it): one of them refused meanwhile
    /// may have room now. (With other waiters still above it, it would be held back anyway.)
    fn admitted(&mut self, place: Place) {
        let level = place.0;
        let top = self.queue.keys().next().map(|p| p.0);
        if let Some((p, w)) = self
            .queue
            .range_mut((
                std::ops::Bound::Excluded((level, u64::MAX)),
                std::ops::Bound::Unbounded,
            ))
            .find(|(_, w)| !w.woken)
        {
            if top.is_none_or(|t| t >= p.0) {
                w.woken = true;
                w.notify.notify_one();
            }
        }
    }

    /// Wakes the first waiter after `after` (or from the start) not woken yet and not of
    /// tier `skip`.
    fn wake_first(&mut self, after: Option<Place>, skip: Option<&str>) {
        let range = match after {
            Some(p) => self
                .queue
                .range_mut((std::ops::Bound::Excluded(p), std::ops::Bound::Unbounded)),
            None => self.queue.range_mut(..),
        };
        if let Some((_, w)) = range
            .into_iter()
            .find(|(_, w)| !w.woken && Some(&*w.tier) != skip)
        {
            w.woken = true;
            w.notify.notify_one();
        }
    }
}

/// A bucket's queue, bounded.
#[derive(Debug, Default)]
pub(crate) struct Queue {
    waiters: Mutex<Waiters>,
    /// How many wait, readable without the lock (most requests find nobody waiting).
    len: AtomicUsize,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Requests waiting now.
    pub(crate) fn len(&self) -> usize {
        self.lock().queue.len()
    }

    /// Requests waiting now at priority `level` or higher (served before a caller of `level`).
    pub(crate) fn at_or_above(&self, level: u8) -> usize {
        self.lock()
            .queue
            .range(..=(Reverse(level), u64::MAX))
            .count()
    }

    /// Requests waiting now at a priority higher than `level`.
    pub(crate) fn above(&self, level: u8) -> usize {
        if self.len.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        self.lock().queue.range(..(Reverse(level), 0)).count()
    }

    /// Room for `slots` more in the bucket without a release (its limit went up): wakes as
    /// many waiters.
    pub(crate) fn grew(&self, slots: u64) {
        if self.len.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut w = self.lock();
        for _ in 0..slots.min(w.queue.len() as u64) {
            w.wake_first(None, None);
        }
    }

    /// A slot of the bucket was released: wakes the first waiter not woken yet.
    pub(crate) fn release(&self) {
        self.lock().wake_first(None, None);
    }

    /// A place for a waiter of priority `level` and tier `tier`, or `None` when `max_len`
    /// wait already.
    pub(crate) fn enter(
        self: &Arc<Self>,
        level: u8,
        tier: Arc<str>,
        max_len: usize,
    ) -> Option<Ticket> {
        let mut w = self.lock();
        if w.queue.len() >= max_len {
            return None;
        }
        let place = (Reverse(level), w.next);
        w.next += 1;
        let notify = Arc::new(Notify::new());
        w.queue.insert(
            place,
            Waiter {
                notify: Arc::clone(&notify),
                woken: false,
                tier,
            },
        );
        self.len.store(w.queue.len(), Ordering::Relaxed);
        Some(Ticket {
            queue: Arc::clone(self),
            place,
            notify,
            admitted: false,
        })
    }
}

/// A waiter's place in a queue; leaving (dropped) hands on a wake-up it had not used.
#[derive(Debug)]
pub(crate) struct Ticket {
    queue: Arc<Queue>,
    place: Place,
    notify: Arc<Notify>,
    /// Leaves with a slot: the waiters below it gain no room by its leaving.
    admitted: bool,
}

impl Ticket {
    /// Until a release wakes this waiter.
    pub(crate) async fn woken(&self) {
        self.notify.notified().await;
    }

    /// The waiter was woken but refused again: it keeps its place, and the wake-up goes on
    /// to the next waiter of another tier (one of its own would be refused alike, a store
    /// call each), unless `full` (the bucket itself refused it, full: so would it anyone).
    pub(crate) fn refused(&self, full: bool) {
        let mut w = self.queue.lock();
        let Some(me) = w.queue.get_mut(&self.place) else {
            return;
        };
        me.woken = false;
        let tier = Arc::clone(&me.tier);
        if !full {
            w.wake_first(Some(self.place), Some(&tier));
        }
    }

    /// The waiter was admitted after a release woke it: it leaves, its wake-up used. (A
    /// waiter admitted without having been woken is dropped instead, so that a wake-up it
    /// received meanwhile goes on.)
    pub(crate) fn admitted(mut self) {
        let mut w = self.queue.lock();
        if let Some(me) = w.queue.get_mut(&self.place) {
            me.woken = false;
        }
        drop(w);
        self.admitted = true;
        drop(self);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut w = self.queue.lock();
        let Some(me) = w.queue.remove(&self.place) else {
            return;
        };
        self.queue.len.store(w.queue.len(), Ordering::Relaxed);
        if me.woken {
            w.wake_first(None, None);
        }
        // Leaving without a slot (its deadline, its client gone), it no longer holds the
        // bucket smaller for those below: a slot may be theirs now. Admitted, it holds the
        // slot it held back, but a waiter below refused while it was being admitted found
        // both.
        if self.admitted {
            w.admitted(self.place);
        } else {
            w.left(self.place);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn woken(q: &Queue, t: &Ticket) -> bool {
        q.lock().queue.get(&t.place).is_some_and(|w| w.woken)
    }

    #[test]
    fn a_waiter_leaving_wakes_the_first_below_it_which_it_held_back() {
        let q = Arc::new(Queue::default());
        let pro = q.enter(2, "pro".into(), 8).unwrap();
        let pro_2 = q.enter(2, "pro".into(), 8).unwrap();
        let free = q.enter(0, "free".into(), 8).unwrap();
        assert_eq!((q.above(0), q.above(2)), (2, 0));
        // A pro waiter admitted, another pro still waiting: free is held back anyway.
        pro.admitted();
        assert!(!woken(&q, &free));
        // The last one above it leaving without a slot (its deadline): free may have room.
        drop(pro_2);
        assert!(woken(&q, &free));
        assert_eq!(q.above(0), 0);
    }

    #[test]
    fn the_last_waiter_above_admitted_wakes_one_refused_while_it_was_being_admitted() {
        // Both woken; free's retry, at a bucket one smaller for pro, is refused before pro's
        // admission comes back (a store doing I/O): pro's slot counted twice for it.
        let q = Arc::new(Queue::default());
        let pro = q.enter(2, "pro".into(), 8).unwrap();
        let free = q.enter(0, "free".into(), 8).unwrap();
        q.release();
        q.release();
        assert!(woken(&q, &pro) && woken(&q, &free));
        free.refused(true);
        assert!(!woken(&q, &free));
        pro.admitted();
        assert!(woken(&q, &free), "free tries again");
    }

    #[test]
    fn a_limit_that_grows_wakes_as_many_waiters_as_it_gained_slots() {
        let q = Arc::new(Queue::default());
        let a = q.enter(1, "std".into(), 8).unwrap();
        let b = q.enter(1, "std".into(), 8).unwrap();
        let c = q.enter(0, "free".into(), 8).unwrap();
        q.grew(2);
        assert!(woken(&q, &a) && woken(&q, &b) && !woken(&q, &c));
        // Nobody waiting: nothing to do, no lock taken.
        let empty = Queue::default();
        empty.grew(3);
        assert_eq!(empty.above(0), 0);
    }
}
