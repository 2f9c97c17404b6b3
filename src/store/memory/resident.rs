//! Which buckets the store holds, and which goes when a new one needs room: each bucket
//! records when it was last charged, and an index of every resident bucket lets the store
//! sample a few at random and evict the least recently used of them (as Redis'
//! `allkeys-lru` does), so a full store makes room for a new key instead of refusing it.
//!
//! The index is one `Vec` behind a mutex, touched only when a bucket comes or goes (a new
//! key, an eviction, a sweep), never by a decision on a resident bucket: a decision only
//! stores its time into its own bucket.

use std::ops::Deref;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::cell::{lock, Cell, EVICTED, HELD};
use crate::algorithm::State;
use crate::store::BucketKey;

/// A bucket as the map holds it: its cell, the time it was last charged and its place in
/// the index.
#[derive(Debug)]
pub(super) struct Resident {
    cell: Cell,
    last_used: AtomicU64,
    /// Its position in [`Residents`]; written under the index's lock.
    index: AtomicUsize,
}

pub(super) type Bucket = Arc<Resident>;

impl Deref for Resident {
    type Target = Cell;

    #[inline]
    fn deref(&self) -> &Cell {
        &self.cell
    }
}

impl Resident {
    pub(super) fn new(cell: Cell, now: u64) -> Bucket {
        Arc::new(Self {
            cell,
            last_used: AtomicU64::new(now),
            index: AtomicUsize::new(usize::MAX),
        })
    }

    /// Records a decision at `now`.
    #[inline]
    pub(super) fn touch(&self, now: u64) {
        self.last_used.store(now, Ordering::Relaxed);
    }

    /// Marks the bucket evicted, so that a decision holding a clone of it looks again; false
    /// when a decision holds it now (or it is already gone). Called under its shard's write
    /// lock, as it leaves the map.
    pub(super) fn evict(&self) -> bool {
        match &self.cell {
            Cell::Locked(m) => match m.try_lock() {
                Ok(mut slot) => {
                    slot.evicted = true;
                    true
                }
                Err(_) => false,
            },
            Cell::Gcra(cell) => {
                let cur = cell.tat.load(Ordering::Acquire);
                cur != HELD
                    && cur != EVICTED
                    && cell
                        .tat
                        .compare_exchange(cur, EVICTED, Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok()
            }
        }
    }

    /// Whether evicting the bucket would lose more than a count: concurrency slots in
    /// flight (a fresh bucket would let the caller past its concurrency limit while they
    /// run), or a decision holding it right now.
    fn is_busy(&self) -> bool {
        match &self.cell {
            Cell::Locked(m) => match m.try_lock() {
                Ok(slot) => matches!(&slot.state, State::Concurrency(c) if c.in_flight() > 0),
                Err(_) => true,
            },
            Cell::Gcra(cell) => cell.tat.load(Ordering::Acquire) == HELD,
        }
    }

    /// Marks the bucket evicted, waiting for a decision that holds it.
    pub(super) fn evict_now(&self) {
        match &self.cell {
            Cell::Locked(m) => lock(m).evicted = true,
            Cell::Gcra(cell) => cell.tat.store(EVICTED, Ordering::Release),
        }
    }
}

/// Buckets compared per eviction: Redis' `maxmemory-samples` default. A sampled bucket with
/// concurrency slots in flight goes only when every sampled one has some; otherwise the
/// bucket evicted is never used more recently than any other sampled one, so a bucket that only `r` others
/// were used after goes only when every sample falls among those `r + 1`: at most
/// `((r + 1) / len)^5` per eviction (a key used every few new keys in a store of 10,000:
/// about 1e-17).
const SAMPLES: usize = 5;

/// Every resident bucket, for sampling.
#[derive(Debug)]
pub(super) struct Residents(Mutex<Index>);

#[derive(Debug)]
struct Index {
    buckets: Vec<(BucketKey, Bucket)>,
    /// xorshift64 state: the sample needs spread, not secrecy (a caller can't see it, and
    /// could only choose when its keys were used, which is what LRU goes by anyway).
    rng: u64,
}

impl Residents {
    pub(super) fn new(seed: u64) -> Self {
        Self(Mutex::new(Index {
            buckets: Vec::new(),
            rng: seed | 1,
        }))
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        // Nothing panics while holding it; if something did, the index is still valid.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a bucket just inserted into the map (called under its shard's write lock, so the
    /// index never lacks a bucket the map has).
    pub(super) fn add(&self, key: BucketKey, bucket: Bucket) {
        let mut index = self.index();
        bucket.index.store(index.buckets.len(), Ordering::Relaxed);
        index.buckets.push((key, bucket));
    }

    /// Removes a bucket that has left the map (no-op if it isn't indexed).
    pub(super) fn remove(&self, bucket: &Bucket) {
        let mut index = self.index();
        let i = bucket.index.load(Ordering::Relaxed);
        if index
            .buckets
            .get(i)
            .is_some_and(|(_, b)| Arc::ptr_eq(b, bucket))
        {
            index.buckets.swap_remove(i);
            if let Some((_, moved)) = index.buckets.get(i) {
                moved.index.store(i, Ordering::Relaxed);
            }
            bucket.index.store(usize::MAX, Ordering::Relaxed);
        }
    }

    /// The least recently used of [`SAMPLES`] buckets picked at random, preferring those
    /// without concurrency slots in flight; `None` when no bucket is indexed.
    pub(super) fn least_recent_of_sample(&self) -> Option<(BucketKey, Bucket)> {
        let mut index = self.index();
        let n = index.buckets.len() as u64;
        if n == 0 {
            return None;
        }
        // Busy buckets rank after idle ones, then the least recently used first.
        let rank = |index: &Index, i: usize| {
            let b = &index.buckets[i].1;
            (b.is_busy(), b.last_used.load(Ordering::Relaxed))
        };
        let mut oldest: Option<(usize, (bool, u64))> = None;
        for round in 0..SAMPLES {
            // A store of a few buckets compares them all.
            let i = if n as usize <= SAMPLES {
                if round as u64 >= n {
                    break;
                }
                round
            } else {
                // xorshift64 (Marsaglia, "Xorshift RNGs", 2003).
                let mut x = index.rng;
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                index.rng = x;
                (x % n) as usize
            };
            let r = rank(&index, i);
            if oldest.is_none_or(|(_, o)| r < o) {
                oldest = Some((i, r));
            }
        }
        oldest.map(|(i, _)| index.buckets[i].clone())
    }

    #[cfg(test)]
    pub(super) fn held_bytes(&self) -> usize {
        let index = self.index();
        index.buckets.capacity() * std::mem::size_of::<(BucketKey, Bucket)>()
            + index
                .buckets
                .iter()
                .map(|(k, _)| k.held_bytes())
                .sum::<usize>()
    }
}
