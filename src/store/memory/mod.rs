//! The in-memory store: one process, no I/O, bounded memory (least recently used buckets
//! make room for new keys at `max_keys`; long keys held as digests).
//!
//! # Layout
//!
//! The map is split into shards (four per core), each a reader-writer lock over a hash table
//! of 4-byte places into two dense vectors of buckets (`shard.rs`): one of GCRA buckets, one
//! of the other algorithms' buckets. A bucket holds its key inline (the rule's shared name
//! and up to 22 key bytes; a longer key's bytes are its one allocation) and its state sized
//! for its kind, without the quota's limits (each charge brings its quota, which carries
//! what the GCRA path precomputes):
//!
//! | bucket | bytes | what |
//! |---|---|---|
//! | GCRA | 64 | key (40), TAT and refunds (16), time of last use (8) |
//! | counter, log, calendar, concurrency | 104 | key (40), time of last use (8), a mutex over the algorithm's state and its last window (56) |
//!
//! A hash table keeps up to half its slots empty after doubling, and at that point its
//! slots here are 5 bytes, not a bucket; the vectors grow by doubling too. At 1,000,000
//! keys of 20 bytes (`benches/memory.rs`, a counting allocator) a key costs 78 bytes with
//! GCRA, 120 with a counter or a calendar window, 184 with a log holding one charge (its
//! entries are one more allocation); governor's keyed limiter 89. A 48-byte key adds its
//! 48 bytes.

#[cfg(test)]
mod capacity_tests;
mod cell;
mod digest;
mod ids;
mod shard;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLockReadGuard};

use smallvec::SmallVec;
use std::time::Duration;

use super::{
    Adjustment, BucketKey, Charge, ChargeState, ChargeStates, Decision, Denial, IdempotencyKey,
    Snapshot, Store, StoreError, StoreFuture,
};
use crate::algorithm::{Gcra, Limits, Placement, State, Verdict};
use crate::clock::{Clock, SystemClock};
use crate::rule::{Algorithm, Quota};

use self::cell::{lock, Held};
use self::digest::KeyDigest;
use self::ids::IdTable;
use self::shard::{BucketRef, Buckets, Place, Shard};

/// The in-memory store: a sharded concurrent map (hashed with foldhash seeded per store) from
/// bucket to algorithm state, laid out to keep each key small (see the module docs).
///
/// - **Concurrency**: a GCRA bucket is one atomic number (its theoretical arrival time),
///   which a single-rule charge updates by compare-and-swap under its shard's read lock,
///   without a lock of its own (as governor does), plus the refunds it gave back, written
///   while a settlement or a denial holds the number; the other algorithms' buckets each sit
///   behind a small mutex. A multi-rule decision read-locks its buckets' shards in shard order,
///   then holds every bucket in (shard, place) order (locks the mutexes, marks the GCRA
///   numbers held so that lock-free charges wait for it), so two requests can't deadlock,
///   checks them all, then charges them all. Every decision uses its buckets under their
///   shards' read locks: nothing removes a bucket while it is decided on.
/// - **Idle eviction**: no cleanup task to run. At most once per
///   [`sweep_interval`](MemoryStoreBuilder::sweep_interval) (default 10 s), the request that
///   notices starts a sweep that removes every bucket whose state equals a fresh one (its
///   charges have all expired), so eviction never changes a decision. Inside a tokio runtime
///   the sweep runs on its blocking pool, not on the request (a million keys take ~0.1 s to
///   scan); it reads the map under shard read locks (lookups go on; new keys wait for the
///   shard) and removes each idle bucket under a write lock held for that key alone, at most
///   65,536 a sweep (the next request starts another).
/// - **Bounded memory**: at most [`max_keys`](MemoryStoreBuilder::max_keys) buckets (default
///   1,000,000), each holding at most 256 bytes of key: a longer key (a 64 KiB header value)
///   is held as a 128-bit keyed digest of it (`digest.rs`). A charge to a new bucket when
///   the map is full first evicts the least recently used of 5 buckets sampled at random
///   (Redis' `allkeys-lru`; nginx's `limit_req` zone evicts its least recently used state
///   when full too), so a new key is always counted: never refused, never let through
///   uncounted. The evicted bucket is never used more recently than the other sampled ones,
///   and one a caller keeps using stays; a bucket with concurrency slots in flight (a long
///   stream) goes only when every sampled bucket has some. What a flood of new keys costs
///   is the state of the least recently used callers: an evicted caller starts afresh, as
///   after an idle sweep. A decision on an existing bucket only records its time in the
///   bucket; the samples are read from the shards themselves (no index of its own).
///   A request naming more buckets than `max_keys` holds fails with
///   [`StoreError::AtCapacity`].
/// - **Idempotent retries**: failed attempts of requests carrying an idempotency id are
///   remembered in a table of their own, bounded by a TTL and a count (`ids.rs`;
///   [`idempotency_ttl`](MemoryStoreBuilder::idempotency_ttl),
///   [`max_idempotency_ids`](MemoryStoreBuilder::max_idempotency_ids)), so that one retry
///   after each failure is free on request rules, as with Redis.
///
/// Clones share the same state.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// The buckets, in shards (`shard.rs`).
    buckets: Buckets,
    /// The sampling generator's state (splitmix64, advanced atomically).
    rng: AtomicU64,
    digest: KeyDigest,
    clock: StoreClock,
    len: AtomicUsize,
    max_keys: usize,
    sweep_interval: u64,
    last_sweep: AtomicU64,
    /// A sweep is under way (on another thread).
    sweeping: AtomicBool,
    /// Idempotent requests whose last attempt failed (`ids.rs`).
    ids: IdTable,
}

/// The store's clock.
#[derive(Debug)]
struct StoreClock(Box<dyn Clock>);

impl StoreClock {
    #[inline]
    fn now_nanos(&self) -> u64 {
        self.0.now_nanos()
    }

    /// The wall clock, for calendar windows.
    fn unix_nanos(&self) -> u64 {
        self.0.unix_nanos()
    }

    /// The time `algorithm` counts in: the wall clock for a calendar window (`now` is the
    /// monotonic time of the decision), `now` for the others.
    #[inline]
    fn time_for(&self, algorithm: Algorithm, now: u64) -> u64 {
        if algorithm.is_calendar() {
            self.unix_nanos()
        } else {
            now
        }
    }
}

/// Configures a [`MemoryStore`].
#[derive(Debug)]
pub struct MemoryStoreBuilder {
    clock: Option<StoreClock>,
    max_keys: usize,
    sweep_interval: Duration,
    idempotency_ttl: Duration,
    max_idempotency_ids: usize,
}

/// Idle keys a sweep removes at most (a bounded list of keys to remove).
const SWEEP_BATCH: usize = 1 << 16;

/// Buckets compared per eviction: Redis' `maxmemory-samples` default. A sampled bucket with
/// concurrency slots in flight goes only when every sampled one has some; otherwise the
/// bucket evicted is never used more recently than any other sampled one, so a bucket that
/// only `r` others were used after goes only when every sample falls among those `r + 1`: at
/// most `((r + 1) / len)^5` per eviction (a key used every few new keys in a store of 10,000:
/// about 1e-17).
const SAMPLES: usize = 5;

impl MemoryStoreBuilder {
    /// Takes time from `clock` (default [`SystemClock`]).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Some(StoreClock(Box::new(clock)));
        self
    }

    /// Tracks at most `max_keys` buckets (default 1,000,000; at least 1); at the cap, a new
    /// key evicts the least recently used of a few sampled buckets.
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys.max(1);
        self
    }

    /// Sweeps idle buckets at most this often (default 10 s).
    pub fn sweep_interval(mut self, every: Duration) -> Self {
        self.sweep_interval = every;
        self
    }

    /// How long a failed attempt of an idempotent request is remembered, so that its retry
    /// is free on request rules (default 120 s; see
    /// [Idempotent retries](crate::store#idempotent-retries)).
    pub fn idempotency_ttl(mut self, ttl: Duration) -> Self {
        self.idempotency_ttl = ttl;
        self
    }

    /// Remembers at most this many idempotent requests (default 100,000). When the table is
    /// full of live entries, a new failure is not remembered and its retry is charged.
    pub fn max_idempotency_ids(mut self, max: usize) -> Self {
        self.max_idempotency_ids = max;
        self
    }

    /// The store.
    pub fn build(self) -> MemoryStore {
        MemoryStore {
            inner: Arc::new(Inner {
                buckets: Buckets::new(shard_count()),
                rng: AtomicU64::new(digest::random_seed()),
                digest: KeyDigest::new(),
                clock: self
                    .clock
                    .unwrap_or_else(|| StoreClock(Box::new(SystemClock::new()))),
                len: AtomicUsize::new(0),
                max_keys: self.max_keys,
                sweep_interval: u64::try_from(self.sweep_interval.as_nanos()).unwrap_or(u64::MAX),
                last_sweep: AtomicU64::new(0),
                sweeping: AtomicBool::new(false),
                ids: IdTable::new(self.idempotency_ttl, self.max_idempotency_ids),
            }),
        }
    }
}

/// Shards of the map: four per core (at least 4), a power of two, as `DashMap` chooses.
fn shard_count() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    (cores * 4).max(4).next_power_of_two()
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("keys", &self.len())
            .field("max_keys", &self.inner.max_keys)
            .field("clock", &self.inner.clock)
            .finish()
    }
}

impl MemoryStore {
    /// A store with the default settings.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// Configures a store.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder {
            clock: None,
            max_keys: 1_000_000,
            sweep_interval: Duration::from_secs(10),
            idempotency_ttl: ids::DEFAULT_TTL,
            max_idempotency_ids: ids::DEFAULT_MAX_IDS,
        }
    }

    /// Buckets currently tracked.
    pub fn len(&self) -> usize {
        self.inner.len.load(Ordering::Relaxed)
    }

    /// True when no bucket is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes every idle bucket now (the store also does this by itself).
    pub fn sweep(&self) {
        let now = self.inner.clock.now_nanos();
        self.inner.last_sweep.store(now, Ordering::Relaxed);
        self.inner.sweep(now);
    }

    /// Decides synchronously; what [`Store::acquire`] returns, without the future.
    pub fn try_acquire(&self, charges: &[Charge<'_>]) -> Result<Decision, StoreError> {
        let inner = &*self.inner;
        let now = inner.clock.now_nanos();
        self.inner.maybe_sweep(now);
        if charges.iter().any(|c| KeyDigest::is_long(c.bucket)) {
            return inner.acquire_digested(charges, now);
        }
        match charges {
            [one] => inner.acquire_one(one, now),
            many => inner.acquire_many(many, now),
        }
    }
}

impl Inner {
    /// Sweeps when the interval has passed: on a blocking thread of the tokio runtime the
    /// request runs on, if there is one (the request doesn't wait for it), else right here.
    #[inline]
    fn maybe_sweep(self: &Arc<Self>, now: u64) {
        let last = self.last_sweep.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= self.sweep_interval {
            self.start_sweep(last, now);
        }
    }

    /// [`Inner::maybe_sweep`] once the interval has passed: starts the sweep unless another
    /// request did.
    #[cold]
    #[inline(never)]
    fn start_sweep(self: &Arc<Self>, last: u64, now: u64) {
        if self
            .last_sweep
            .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
            || self.sweeping.swap(true, Ordering::AcqRel)
        {
            return;
        }
        /// Ends the sweep, also when a runtime shutting down drops it before it runs.
        struct Done(Arc<Inner>);
        impl Drop for Done {
            fn drop(&mut self) {
                self.0.sweeping.store(false, Ordering::Release);
            }
        }
        let done = Done(Arc::clone(self));
        let run = move || done.0.sweep(now);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(run)),
            Err(_) => run(),
        }
    }

    /// Removes idle buckets, in two passes so that no shard is write-locked for long: each
    /// shard is read (its read lock: lookups go on, only new keys wait) for up to
    /// [`SWEEP_BATCH`] idle keys in all, then each is removed under its shard's write lock
    /// if it is still idle. A bucket in use (locked, or held by a decision) is not idle.
    fn sweep(&self, now: u64) {
        let unix = self.clock.unix_nanos();
        let mut idle = Vec::new();
        'shards: for s in 0..self.buckets.shards() {
            let shard = self.buckets.read(s);
            for n in 0..shard.len() {
                if idle.len() == SWEEP_BATCH {
                    // More next time: the next request may sweep again.
                    self.last_sweep.store(0, Ordering::Relaxed);
                    break 'shards;
                }
                let bucket = shard.nth(n).expect("below the shard's length");
                if bucket.is_idle(now, unix) {
                    idle.push(bucket.key().clone());
                }
            }
        }
        for key in &idle {
            let (hash, s) = self.buckets.locate(key);
            let removed = self
                .buckets
                .write(s)
                .remove_if(self.buckets.hasher(), hash, key, |b| b.is_idle(now, unix));
            if removed {
                self.len.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Removes `key`'s bucket if it can't hold `quota`'s state (another algorithm's cell:
    /// two layers sharing a rule name with different algorithms reset each other's state).
    #[cold]
    #[inline(never)]
    fn evict_unsuited(&self, key: &BucketKey, (hash, s): (u64, usize), quota: &Quota) {
        let removed = self
            .buckets
            .write(s)
            .remove_if(self.buckets.hasher(), hash, key, |b| !b.suits(quota));
        if removed {
            self.len.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Adds a fresh bucket for `key` unless one exists; at `max_keys`, first evicts the
    /// least recently used of a few buckets sampled at random (as many times as it takes:
    /// concurrent inserts may take the room it made). Called holding no shard.
    #[cold]
    #[inline(never)]
    fn insert(&self, key: &BucketKey, (hash, s): (u64, usize), quota: &Quota, now: u64) {
        while self.len.fetch_add(1, Ordering::AcqRel) >= self.max_keys {
            self.len.fetch_sub(1, Ordering::AcqRel);
            self.evict_least_recent();
        }
        let mut shard = self.buckets.write(s);
        if shard.find(hash, key).is_some() {
            self.len.fetch_sub(1, Ordering::AcqRel);
        } else {
            shard.insert(self.buckets.hasher(), hash, key.clone(), quota, now);
        }
    }

    /// A random number (splitmix64 over an atomic counter: the sample needs spread, not
    /// secrecy; a caller can't see it, and could only choose when its keys were used, which
    /// is what LRU goes by anyway).
    fn random(&self) -> u64 {
        let mut z = self
            .rng
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Evicts the least recently used of [`SAMPLES`] buckets picked at random (each from a
    /// random shard), preferring those without concurrency slots in flight; a store of a few
    /// buckets compares them all. Called holding no shard.
    #[cold]
    fn evict_least_recent(&self) {
        let shards = self.buckets.shards();
        // Candidates: their key and rank (busy ones after idle ones, then the least
        // recently used first).
        let mut oldest: Option<((bool, u64), BucketKey)> = None;
        let mut consider = |bucket: BucketRef<'_>| {
            let rank = bucket.rank();
            if oldest.as_ref().is_none_or(|(o, _)| rank < *o) {
                oldest = Some((rank, bucket.key().clone()));
            }
        };
        if self.len.load(Ordering::Relaxed) <= SAMPLES {
            for s in 0..shards {
                let shard = self.buckets.read(s);
                (0..shard.len())
                    .filter_map(|n| shard.nth(n))
                    .for_each(&mut consider);
            }
        } else {
            // A few tries per sample: some shards may be empty.
            let mut sampled = 0;
            for _ in 0..SAMPLES * 4 {
                let r = self.random();
                let shard = self.buckets.read((r as usize) & (shards - 1));
                if shard.len() == 0 {
                    continue;
                }
                let n = ((r >> 32) % shard.len() as u64) as usize;
                if let Some(bucket) = shard.nth(n) {
                    consider(bucket);
                    sampled += 1;
                    if sampled == SAMPLES {
                        break;
                    }
                }
            }
        }
        let Some((_, key)) = oldest else {
            // The buckets counted are still being inserted by other threads.
            std::thread::yield_now();
            return;
        };
        let (hash, s) = self.buckets.locate(&key);
        if self
            .buckets
            .write(s)
            .remove_if(self.buckets.hasher(), hash, &key, |_| true)
        {
            self.len.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// A decision on charges some of whose keys are stored as digests: the same decision on
    /// the keys as stored.
    #[cold]
    fn acquire_digested(&self, charges: &[Charge<'_>], now: u64) -> Result<Decision, StoreError> {
        let keys: Vec<_> = charges
            .iter()
            .map(|c| self.digest.stored(c.bucket))
            .collect();
        let charges: Vec<_> = charges
            .iter()
            .zip(&keys)
            .map(|(c, key)| Charge::new(key, c.quota, c.amount))
            .collect();
        // The all-or-nothing path even for one charge: the single-charge one stays inlined
        // in its one caller.
        self.acquire_many(&charges, now)
    }

    /// A single charge's decision.
    #[inline]
    fn acquire_one(&self, c: &Charge<'_>, now: u64) -> Result<Decision, StoreError> {
        let located = self.buckets.locate(c.bucket);
        loop {
            let shard = self.buckets.read(located.1);
            let Some(place) = shard.find(located.0, c.bucket) else {
                drop(shard);
                self.insert(c.bucket, located, c.quota, now);
                continue;
            };
            let bucket = shard.get(place);
            // Holding the shard's read lock: no sweep nor eviction can remove the bucket
            // meanwhile.
            match (bucket, c.quota.algorithm()) {
                (BucketRef::Gcra(b), Algorithm::Gcra) => {
                    bucket.touch(now);
                    if let Some(p) = &c.quota.prepared().gcra {
                        if let Some((tat, refunded)) = b.cell.admit(p, now, c.amount) {
                            let snapshot = p.snapshot(tat, now);
                            let placement = Gcra::placement(tat, refunded);
                            return Ok(one_decision((Verdict::Allow, placement, snapshot)));
                        }
                    }
                    let limits = c.quota.limits();
                    return Ok(one_decision(b.cell.acquire(&limits, now, c.amount)));
                }
                (BucketRef::Locked(b), algorithm) if algorithm != Algorithm::Gcra => {
                    bucket.touch(now);
                    let mut slot = lock(&b.slot);
                    slot.fit(c.quota);
                    let at = self.clock.time_for(algorithm, now);
                    let decided = slot.state.acquire(&c.quota.limits(), at, c.amount);
                    drop(slot);
                    return Ok(one_decision(decided));
                }
                // Another algorithm's bucket.
                _ => {}
            }
            drop(shard);
            self.evict_unsuited(c.bucket, located, c.quota);
        }
    }

    /// Several charges, all or nothing: finds every charge's bucket (creating those missing,
    /// holding no shard), read-locks their shards in shard order, holds the buckets in
    /// (shard, place) order (locking the mutexes, marking the GCRA cells held), checks every
    /// charge and charges all of them only if all fit.
    fn acquire_many(&self, charges: &[Charge<'_>], now: u64) -> Result<Decision, StoreError> {
        if charges.len() > self.max_keys {
            // Each new bucket would evict another of the same request.
            return Err(StoreError::AtCapacity {
                max_keys: self.max_keys,
            });
        }
        let mut found: SmallVec<[Found; MANY]> = SmallVec::new();
        for (i, c) in charges.iter().enumerate() {
            let (hash, shard) = self.buckets.locate(c.bucket);
            found.push(Found {
                charge: i,
                hash,
                shard,
                place: None,
            });
        }
        // A fixed global order (shards by index, then buckets by place) makes holding several
        // deadlock-free: writers (new keys, evictions, sweeps) lock one shard at a time.
        found.sort_unstable_by_key(|f| f.shard);
        let mut shards: SmallVec<[ShardGuard<'_>; MANY]> = SmallVec::new();
        'find: loop {
            // Each shard once, in order.
            for f in &found {
                if shards.last().map(|g| g.0) != Some(f.shard) {
                    shards.push((f.shard, self.buckets.read(f.shard)));
                }
            }
            for f in found.iter_mut() {
                let shard = shard_of(&shards, f.shard);
                let c = &charges[f.charge];
                let missing = match shard.find(f.hash, c.bucket) {
                    Some(place) if shard.get(place).suits(c.quota) => {
                        f.place = Some(place);
                        continue;
                    }
                    Some(_) => false,
                    None => true,
                };
                shards.clear();
                if missing {
                    self.insert(c.bucket, (f.hash, f.shard), c.quota, now);
                } else {
                    self.evict_unsuited(c.bucket, (f.hash, f.shard), c.quota);
                }
                continue 'find;
            }
            break;
        }
        found.sort_unstable_by_key(|f| (f.shard, f.place));
        if let Some(f) = found
            .windows(2)
            .find(|w| (w[0].shard, w[0].place) == (w[1].shard, w[1].place))
        {
            return Err(StoreError::DuplicateBucket(format!(
                "{:?}",
                charges[f[0].charge].bucket
            )));
        }
        // Allocated before holding anything, to keep the critical section short.
        let mut states = ChargeStates::filled(charges.len());
        // Calendar windows count in wall-clock time, read once for the whole decision.
        let unix = if charges.iter().any(|c| c.quota.algorithm().is_calendar()) {
            self.clock.unix_nanos()
        } else {
            0
        };
        let time_for = |c: &Charge<'_>| {
            if c.quota.algorithm().is_calendar() {
                unix
            } else {
                now
            }
        };
        let mut held: SmallVec<[Held<'_>; MANY]> = SmallVec::new();
        for f in &found {
            let bucket = shard_of(&shards, f.shard).get(f.place.expect("found above"));
            bucket.touch(now);
            held.push(match bucket {
                BucketRef::Locked(b) => {
                    let mut slot = lock(&b.slot);
                    slot.fit(charges[f.charge].quota);
                    Held::Locked(slot)
                }
                BucketRef::Gcra(b) => b.cell.hold(),
            });
        }

        // Checked, then charged, in (shard, place) order; a tie between denials goes to the
        // first.
        let mut denial: Option<(usize, Option<u64>)> = None;
        for (h, f) in held.iter_mut().zip(&found) {
            let c = &charges[f.charge];
            let verdict = h.state().check(&c.quota.limits(), time_for(c), c.amount);
            if let Verdict::Deny { retry_after } = verdict {
                // Report the rule that keeps the request out longest ("never" beats any wait).
                let worse = match denial {
                    None => true,
                    Some((_, None)) => false,
                    Some((_, Some(prev))) => retry_after.is_none_or(|r| r > prev),
                };
                if worse {
                    denial = Some((f.charge, retry_after));
                }
            }
        }
        for (h, f) in held.iter_mut().zip(&found) {
            let (state, c) = (h.state(), &charges[f.charge]);
            let (limits, at) = (c.quota.limits(), time_for(c));
            // Back to the caller's order.
            states[f.charge] = if denial.is_none() {
                // Fits (checked above): charged, and answered after the charge.
                let (verdict, placement, snapshot) = state.acquire(&limits, at, c.amount);
                debug_assert_eq!(verdict, Verdict::Allow, "checked above under the same hold");
                ChargeState {
                    snapshot,
                    placement,
                }
            } else {
                ChargeState {
                    snapshot: state.peek(&limits, at),
                    placement: Placement::default(),
                }
            };
        }
        Ok(Decision {
            denial: denial.map(|(index, retry)| Denial {
                index,
                retry_after: retry.map(Duration::from_nanos),
            }),
            charges: states,
            free_retry: false,
        })
    }

    /// Runs `f` on `key`'s state (creating the bucket if `create`), holding it; `None` if
    /// there is no bucket and `create` is false.
    fn with_bucket<T>(
        &self,
        key: &BucketKey,
        quota: &Quota,
        now: u64,
        create: bool,
        f: impl FnOnce(&mut State, &Limits) -> T,
    ) -> Result<Option<T>, StoreError> {
        let located = self.buckets.locate(key);
        let limits = quota.limits();
        loop {
            let shard = self.buckets.read(located.1);
            match shard.find(located.0, key).map(|p| shard.get(p)) {
                Some(bucket) if bucket.suits(quota) => {
                    let mut held = match bucket {
                        BucketRef::Gcra(b) => b.cell.hold(),
                        BucketRef::Locked(b) => {
                            let mut slot = lock(&b.slot);
                            slot.fit(quota);
                            Held::Locked(slot)
                        }
                    };
                    return Ok(Some(f(held.state(), &limits)));
                }
                Some(_) => {
                    drop(shard);
                    self.evict_unsuited(key, located, quota);
                }
                None => {
                    drop(shard);
                    if !create {
                        return Ok(None);
                    }
                    self.insert(key, located, quota, now);
                }
            }
        }
    }
}

/// Charges per request whose buckets and locks a multi-rule decision keeps inline (more
/// take one allocation each).
// Kept inline: `Vec`s here cost 13% more instructions per three-rule counter decision
// (callgrind, as `benches/algorithms.rs` multi_charge_3_rules: 2,954 against 2,609).
const MANY: usize = 4;

/// A shard read-locked by a multi-rule decision, and its index.
type ShardGuard<'s> = (usize, RwLockReadGuard<'s, Shard>);

/// The shard of index `shard` among those a multi-rule decision read-locked.
fn shard_of<'a>(shards: &'a [ShardGuard<'_>], shard: usize) -> &'a Shard {
    &shards
        .iter()
        .find(|g| g.0 == shard)
        .expect("locked by the decision")
        .1
}

/// Where a multi-rule decision found a charge's bucket.
#[derive(Debug, Clone, Copy, Default)]
struct Found {
    /// The charge's index in the request.
    charge: usize,
    hash: u64,
    shard: usize,
    place: Option<Place>,
}

/// What a single charge's decision is made of.
pub(super) type Decided = (Verdict, Placement, Snapshot);

/// The decision of a single charge.
#[inline]
fn one_decision((verdict, placement, snapshot): Decided) -> Decision {
    Decision {
        denial: match verdict {
            Verdict::Allow => None,
            Verdict::Deny { retry_after } => Some(Denial {
                index: 0,
                retry_after: retry_after.map(Duration::from_nanos),
            }),
        },
        charges: ChargeStates::one(ChargeState {
            snapshot,
            placement,
        }),
        free_retry: false,
    }
}

impl Store for MemoryStore {
    fn acquire(&self, charges: &[Charge<'_>]) -> StoreFuture<Result<Decision, StoreError>> {
        StoreFuture::ready(self.try_acquire(charges))
    }

    fn acquire_once(
        &self,
        charges: &[Charge<'_>],
        id: &IdempotencyKey,
    ) -> StoreFuture<Result<Decision, StoreError>> {
        StoreFuture::ready(self.try_acquire_once(charges, id))
    }

    fn fail_attempt(
        &self,
        _charges: &[Charge<'_>],
        id: &IdempotencyKey,
    ) -> StoreFuture<Result<(), StoreError>> {
        self.fail_attempt_now(id);
        StoreFuture::ready(Ok(()))
    }

    fn settle(&self, adjustments: &[Adjustment<'_>]) -> StoreFuture<Result<(), StoreError>> {
        let inner = &*self.inner;
        let now = inner.clock.now_nanos();
        let result = adjustments.iter().try_for_each(|a| {
            // A refund to an evicted bucket has nothing left to correct; an extra charge
            // creates the bucket again.
            let create = a.actual > a.charged;
            let at = inner.clock.time_for(a.quota.algorithm(), now);
            inner
                .with_bucket(
                    &inner.digest.stored(a.bucket),
                    a.quota,
                    now,
                    create,
                    |state, limits| {
                        state.adjust(limits, at, a.placement, a.charged, a.actual);
                    },
                )
                .map(drop)
        });
        StoreFuture::ready(result)
    }

    fn peek(&self, bucket: &BucketKey, quota: &Quota) -> StoreFuture<Result<Snapshot, StoreError>> {
        let inner = &*self.inner;
        let now = inner.clock.now_nanos();
        let at = inner.clock.time_for(quota.algorithm(), now);
        let fresh = || {
            let limits = quota.limits();
            State::new(quota.algorithm()).peek(&limits, at)
        };
        let result = inner
            .with_bucket(
                &inner.digest.stored(bucket),
                quota,
                now,
                false,
                |state, limits| state.peek(limits, at),
            )
            .map(|s| s.unwrap_or_else(fresh));
        StoreFuture::ready(result)
    }
}

#[cfg(test)]
impl Inner {
    /// Bytes held by the shards: their tables, their buckets and the keys' heap bytes (an
    /// upper bound: shared rule names counted once per key).
    fn held_bytes(&self) -> usize {
        (0..self.buckets.shards())
            .map(|s| self.buckets.read(s).held_bytes())
            .sum()
    }
}
