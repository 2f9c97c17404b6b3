//! The short queue of a bucket: requests that found no capacity wait here (holding no slot)
//! for a local release of the bucket, served by priority, then arrival.
//!
//! Each release wakes the first waiter not woken already; a woken waiter tries its charges
//! again. Admitted, it leaves; refused again, it keeps its place: refused by its tier's
//! reserve or the saturation threshold, it hands the wake-up on to the next waiter, so that
//! a release is not lost to a waiter that can't use it (past the waiters of its own tier,
//! which would be refused alike); refused by the bucket full (the slot went to a request
//! that came in meanwhile), it doesn't (the next would be refused too). A waiter
//! that leaves (its deadline, its client gone) hands on a wake-up it had not used.

use std::cmp::Reverse;
use std::collections::BTreeMap;
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
        self.lock().queue.range(..(Reverse(level), 0)).count()
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
        Some(Ticket {
            queue: Arc::clone(self),
            place,
            notify,
        })
    }
}

/// A waiter's place in a queue; leaving (dropped) hands on a wake-up it had not used.
#[derive(Debug)]
pub(crate) struct Ticket {
    queue: Arc<Queue>,
    place: Place,
    notify: Arc<Notify>,
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
    pub(crate) fn admitted(self) {
        let mut w = self.queue.lock();
        if let Some(me) = w.queue.get_mut(&self.place) {
            me.woken = false;
        }
        drop(w);
        drop(self);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut w = self.queue.lock();
        if w.queue.remove(&self.place).is_some_and(|me| me.woken) {
            w.wake_first(None, None);
        }
    }
}
