//! One shard of the memory store's map: a hash table of 4-byte places into two dense
//! vectors of buckets, one per kind of bucket (GCRA's atomic numbers, the other algorithms'
//! locked states), each bucket holding its key inline.
//!
//! The layout is what keeps a key small. A hash table keeps about half its slots empty
//! after it doubles; here those slots are 4 bytes (plus hashbrown's control byte), not a
//! whole bucket, and the buckets themselves sit in vectors that are full but for their
//! growth by doubling. A bucket is one element of its vector: no allocation of its own
//! (a key longer than 22 bytes holds its bytes on the heap, `crate::key::Key`).
//!
//! Removing a bucket moves the last one of its vector into its place (and repoints the
//! table's entry for it), so the vectors stay dense; the index of a bucket is therefore
//! only stable while its shard is locked. Every reader holds the shard's read lock for as
//! long as it uses a bucket, and only a writer (a new key, an eviction, a sweep) removes
//! one: a decision never sees its bucket go.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use foldhash::quality::RandomState;
use hashbrown::HashTable;

use super::cell::{GcraCell, LockedSlot};
use crate::algorithm::State;
use crate::rule::{Algorithm, Quota};
use crate::store::BucketKey;

/// Where a bucket is in its shard: its vector (the top bit: set for the locked buckets)
/// and its index there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Place(u32);

const LOCKED_BIT: u32 = 1 << 31;

impl Place {
    fn new(locked: bool, index: usize) -> Self {
        let index = u32::try_from(index).expect("fewer than 2^31 buckets per shard");
        debug_assert!(index < LOCKED_BIT);
        Self(if locked { index | LOCKED_BIT } else { index })
    }

    fn is_locked(self) -> bool {
        self.0 & LOCKED_BIT != 0
    }

    fn index(self) -> usize {
        (self.0 & !LOCKED_BIT) as usize
    }
}

/// A GCRA bucket: its key, its cell (TAT and refunds), when it was last charged.
#[derive(Debug)]
pub(super) struct GcraBucket {
    key: BucketKey,
    pub(super) cell: GcraCell,
    last_used: AtomicU64,
}

/// Another algorithm's bucket: its key, when it was last charged, its state behind a mutex.
#[derive(Debug)]
pub(super) struct LockedBucket {
    key: BucketKey,
    last_used: AtomicU64,
    pub(super) slot: Mutex<LockedSlot>,
}

/// A bucket found in a shard.
#[derive(Debug, Clone, Copy)]
pub(super) enum BucketRef<'s> {
    Gcra(&'s GcraBucket),
    Locked(&'s LockedBucket),
}

impl BucketRef<'_> {
    /// Whether this bucket can hold `quota`'s state (a GCRA bucket only GCRA, a locked one
    /// any other algorithm: `fit` resets it to the quota's).
    #[inline]
    pub(super) fn suits(self, quota: &Quota) -> bool {
        matches!(self, Self::Gcra(_)) == (quota.algorithm() == Algorithm::Gcra)
    }

    /// Records a decision at `now`.
    #[inline]
    pub(super) fn touch(self, now: u64) {
        match self {
            Self::Gcra(b) => b.last_used.store(now, Ordering::Relaxed),
            Self::Locked(b) => b.last_used.store(now, Ordering::Relaxed),
        }
    }

    /// The bucket's key.
    pub(super) fn key(&self) -> &BucketKey {
        match self {
            Self::Gcra(b) => &b.key,
            Self::Locked(b) => &b.key,
        }
    }

    /// When the bucket was last charged.
    fn last_used(&self) -> u64 {
        match self {
            Self::Gcra(b) => b.last_used.load(Ordering::Relaxed),
            Self::Locked(b) => b.last_used.load(Ordering::Relaxed),
        }
    }

    /// Whether evicting the bucket would lose more than a count: concurrency slots in
    /// flight (a fresh bucket would let the caller past its concurrency limit while they
    /// run), or a decision holding it right now.
    fn is_busy(&self) -> bool {
        match self {
            Self::Locked(b) => match b.slot.try_lock() {
                Ok(slot) => matches!(&slot.state, State::Concurrency(c) if c.in_flight() > 0),
                Err(_) => true,
            },
            Self::Gcra(b) => b.cell.is_held(),
        }
    }

    /// How eviction ranks the bucket: busy ones after idle ones, then the least recently
    /// used first.
    pub(super) fn rank(&self) -> (bool, u64) {
        (self.is_busy(), self.last_used())
    }

    /// Whether the bucket is idle at `now` (`unix`: the wall clock, for calendar windows):
    /// its state equals a fresh one (every charge expired) and no decision holds it.
    pub(super) fn is_idle(&self, now: u64, unix: u64) -> bool {
        match self {
            Self::Locked(b) => b
                .slot
                .try_lock()
                .is_ok_and(|mut slot| slot.is_idle(now, unix)),
            Self::Gcra(b) => b.cell.is_idle(now),
        }
    }
}

/// One shard: the table and the buckets it points into.
#[derive(Debug, Default)]
pub(super) struct Shard {
    table: HashTable<Place>,
    gcra: Vec<GcraBucket>,
    locked: Vec<LockedBucket>,
}

impl Shard {
    /// Buckets in the shard.
    pub(super) fn len(&self) -> usize {
        self.gcra.len() + self.locked.len()
    }

    /// `key`'s bucket, if the shard has it (`hash`: [`Buckets::hash`] of `key`).
    #[inline]
    pub(super) fn find(&self, hash: u64, key: &BucketKey) -> Option<Place> {
        self.table
            .find(hash, |&p| *self.get(p).key() == *key)
            .copied()
    }

    /// The bucket at `place` (a place [`Shard::find`] returned under the same lock).
    #[inline]
    pub(super) fn get(&self, place: Place) -> BucketRef<'_> {
        if place.is_locked() {
            BucketRef::Locked(&self.locked[place.index()])
        } else {
            BucketRef::Gcra(&self.gcra[place.index()])
        }
    }

    /// The `n`-th bucket, counting the GCRA ones first (for sampling and sweeping).
    pub(super) fn nth(&self, n: usize) -> Option<BucketRef<'_>> {
        match n.checked_sub(self.gcra.len()) {
            None => Some(BucketRef::Gcra(&self.gcra[n])),
            Some(i) => self.locked.get(i).map(BucketRef::Locked),
        }
    }

    /// Adds a fresh bucket for `quota` (the caller checked that `key` has none).
    pub(super) fn insert(
        &mut self,
        hasher: &RandomState,
        hash: u64,
        key: BucketKey,
        quota: &Quota,
        now: u64,
    ) {
        let last_used = AtomicU64::new(now);
        let place = match quota.algorithm() {
            Algorithm::Gcra => {
                self.gcra.push(GcraBucket {
                    key,
                    cell: GcraCell::default(),
                    last_used,
                });
                Place::new(false, self.gcra.len() - 1)
            }
            algorithm => {
                self.locked.push(LockedBucket {
                    key,
                    last_used,
                    slot: Mutex::new(LockedSlot::new(algorithm, quota)),
                });
                Place::new(true, self.locked.len() - 1)
            }
        };
        let Self {
            table,
            gcra,
            locked,
        } = self;
        table.insert_unique(hash, place, |&p| hasher.hash_one(key_at(gcra, locked, p)));
    }

    /// Removes `key`'s bucket if `remove` says so, given exclusive access to it; true if
    /// removed.
    pub(super) fn remove_if(
        &mut self,
        hasher: &RandomState,
        hash: u64,
        key: &BucketKey,
        remove: impl FnOnce(BucketRef<'_>) -> bool,
    ) -> bool {
        let Some(place) = self.find(hash, key) else {
            return false;
        };
        if !remove(self.get(place)) {
            return false;
        }
        let Self {
            table,
            gcra,
            locked,
        } = self;
        if let Ok(entry) = table.find_entry(hash, |&p| p == place) {
            entry.remove();
        }
        let i = place.index();
        // The last bucket of the vector moves into the hole: its entry follows.
        let moved = if place.is_locked() {
            locked.swap_remove(i);
            (i < locked.len()).then(|| (hasher.hash_one(&locked[i].key), locked.len()))
        } else {
            gcra.swap_remove(i);
            (i < gcra.len()).then(|| (hasher.hash_one(&gcra[i].key), gcra.len()))
        };
        if let Some((moved_hash, from)) = moved {
            let from = Place::new(place.is_locked(), from);
            if let Some(p) = table.find_mut(moved_hash, |&p| p == from) {
                *p = place;
            }
        }
        true
    }

    /// Bytes the shard holds (its table, its vectors, keys' heap bytes counting a rule name
    /// as if it weren't shared: an upper bound).
    #[cfg(test)]
    pub(super) fn held_bytes(&self) -> usize {
        use std::mem::size_of;
        self.table.capacity() * (size_of::<Place>() + 1)
            + self.gcra.capacity() * size_of::<GcraBucket>()
            + self.locked.capacity() * size_of::<LockedBucket>()
            + (0..self.len())
                .filter_map(|n| self.nth(n))
                .map(|b| b.key().held_bytes() - size_of::<BucketKey>())
                .sum::<usize>()
    }
}

fn key_at<'s>(gcra: &'s [GcraBucket], locked: &'s [LockedBucket], place: Place) -> &'s BucketKey {
    if place.is_locked() {
        &locked[place.index()].key
    } else {
        &gcra[place.index()].key
    }
}

/// The store's map: shards chosen by a key's hash, each behind a reader-writer lock.
#[derive(Debug)]
pub(super) struct Buckets {
    shards: Box<[RwLock<Shard>]>,
    hasher: RandomState,
    /// `64 - log2(shards)`.
    shift: u32,
}

impl Buckets {
    /// A map of `shards` shards (a power of two, at least 2).
    pub(super) fn new(shards: usize) -> Self {
        debug_assert!(shards.is_power_of_two() && shards >= 2);
        Self {
            shards: (0..shards).map(|_| RwLock::default()).collect(),
            hasher: RandomState::default(),
            shift: 64 - shards.trailing_zeros(),
        }
    }

    pub(super) fn hasher(&self) -> &RandomState {
        &self.hasher
    }

    /// `key`'s hash and its shard.
    #[inline]
    pub(super) fn locate(&self, key: &BucketKey) -> (u64, usize) {
        let hash = self.hasher.hash_one(key);
        // The top 7 bits are hashbrown's tag inside the shard: the shard takes the next ones.
        (hash, ((hash << 7) >> self.shift) as usize)
    }

    pub(super) fn shards(&self) -> usize {
        self.shards.len()
    }

    #[inline]
    pub(super) fn read(&self, shard: usize) -> RwLockReadGuard<'_, Shard> {
        // Nothing panics while holding a shard; if something did, the shard is still valid.
        self.shards[shard]
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn write(&self, shard: usize) -> RwLockWriteGuard<'_, Shard> {
        self.shards[shard]
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithm::TestRng;
    use std::mem::size_of;

    /// Each bucket is sized for its kind, and keeps no limits: a GCRA bucket is its key, two
    /// numbers and its time of last use; a locked one its key, its time and its state with
    /// the window of its last charge, behind a mutex.
    #[test]
    fn buckets_are_sized_for_their_kind() {
        assert_eq!(size_of::<BucketKey>(), 40);
        assert_eq!(size_of::<GcraBucket>(), 64);
        assert_eq!(size_of::<LockedBucket>(), 104);
        assert_eq!(size_of::<Place>(), 4);
    }

    /// Removing buckets in any order (each removal moves its vector's last bucket into the
    /// hole) leaves every other key found at its own bucket, and the removed ones gone.
    #[test]
    fn removals_keep_every_other_key_in_place() {
        let hasher = RandomState::default();
        let mut shard = Shard::default();
        let (gcra, counter) = (Quota::per_second(1).gcra(), Quota::per_second(1));
        let keys: Vec<BucketKey> = (0..2_000u32)
            .map(|i| BucketKey::new("r", i.to_le_bytes().as_slice()))
            .collect();
        for (i, key) in keys.iter().enumerate() {
            let quota = if i % 3 == 0 { &gcra } else { &counter };
            shard.insert(&hasher, hasher.hash_one(key), key.clone(), quota, i as u64);
        }
        assert_eq!(shard.len(), keys.len());
        let mut rng = TestRng::new(3);
        let mut present = vec![true; keys.len()];
        for _ in 0..1_500 {
            let i = rng.below(keys.len() as u64) as usize;
            let hash = hasher.hash_one(&keys[i]);
            let removed = shard.remove_if(&hasher, hash, &keys[i], |_| true);
            assert_eq!(removed, present[i], "key {i}");
            present[i] = false;
        }
        assert_eq!(shard.len(), present.iter().filter(|p| **p).count());
        for (i, key) in keys.iter().enumerate() {
            let found = shard.find(hasher.hash_one(key), key);
            assert_eq!(found.is_some(), present[i], "key {i}");
            if let Some(place) = found {
                let bucket = shard.get(place);
                assert_eq!(bucket.key(), key);
                assert_eq!(matches!(bucket, BucketRef::Gcra(_)), i % 3 == 0);
                // Its own bucket: the time it was inserted at.
                assert_eq!(bucket.last_used(), i as u64);
            }
        }
        // `remove_if` asks before removing.
        let i = present.iter().position(|p| *p).expect("some left");
        let hash = hasher.hash_one(&keys[i]);
        assert!(!shard.remove_if(&hasher, hash, &keys[i], |_| false));
        assert!(shard.find(hash, &keys[i]).is_some());
    }

    /// Keys land in every shard, and the shard of a key is stable.
    #[test]
    fn keys_spread_over_the_shards() {
        let buckets = Buckets::new(8);
        let mut seen = [0usize; 8];
        for i in 0..8_000u32 {
            let key = BucketKey::new("r", i.to_le_bytes().as_slice());
            let (hash, s) = buckets.locate(&key);
            assert_eq!(buckets.locate(&key), (hash, s));
            seen[s] += 1;
        }
        assert!(seen.iter().all(|&n| n > 700), "{seen:?}");
    }
}
