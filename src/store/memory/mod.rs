//! The in-memory store: one process, no I/O, bounded memory (least recently used buckets
//! make room for new keys at `max_keys`; long keys held as digests).

#[cfg(test)]
mod capacity_tests;
mod cell;
mod digest;
mod ids;
mod resident;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
// Keyed per store with a random seed, like std's SipHash, at a fraction of its cost per
// short key (bucket keys are attacker-chosen strings: an unkeyed hash would invite
// collision floods).
use foldhash::quality::RandomState;

use super::{
    Adjustment, BucketKey, Charge, ChargeState, ChargeStates, Decision, Denial, IdempotencyKey,
    Snapshot, Store, StoreError, StoreFuture,
};
use crate::algorithm::{Divisor, Gcra, Limits, Placement, State, Verdict};
use crate::clock::{Clock, ManualClock, SystemClock};
use crate::rule::{Algorithm, Quota};

use self::cell::{hold_gcra, lock, update_gcra, Admission, Cell, Held, Slot, EVICTED};
use self::digest::KeyDigest;
use self::ids::IdTable;
use self::resident::{Bucket, Resident, Residents};

/// The in-memory store: a sharded concurrent map ([`DashMap`], hashed with foldhash seeded
/// per store) from bucket to algorithm state.
///
/// - **Concurrency**: a GCRA bucket is one atomic number (its theoretical arrival time),
///   which a single-rule charge updates by compare-and-swap under its shard's read lock,
///   without a lock of its own (as governor does), plus the refunds it gave back, written
///   while a settlement or a denial holds the number; the other algorithms' buckets each sit
///   behind a small mutex. A multi-rule decision holds every bucket in address order (locks
///   the mutexes, marks the GCRA numbers held so that lock-free charges wait for it), so two
///   requests can't deadlock, checks them all, then charges them all.
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
///   and one a caller keeps using stays (`resident.rs`); a bucket with concurrency slots in
///   flight (a long stream) goes only when every sampled bucket has some. What a flood of new keys costs is
///   the state of the least recently used callers: an evicted caller starts afresh, as
///   after an idle sweep. A decision on an existing bucket only records its time in the
///   bucket; the index sampled for eviction is locked only when a bucket comes or goes.
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
    map: DashMap<BucketKey, Bucket, RandomState>,
    /// Every bucket of `map`, for eviction at `max_keys`.
    residents: Residents,
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

/// The store's clock: the crate's own clocks are read without a virtual call (one per
/// decision), any other through `dyn Clock`.
enum StoreClock {
    System(SystemClock),
    Manual(ManualClock),
    Other(Box<dyn Clock>),
}

impl fmt::Debug for StoreClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::System(c) => c.fmt(f),
            Self::Manual(c) => c.fmt(f),
            Self::Other(c) => c.fmt(f),
        }
    }
}

impl StoreClock {
    fn new<C: Clock>(clock: C) -> Self {
        let any: &dyn std::any::Any = &clock;
        if let Some(c) = any.downcast_ref::<SystemClock>() {
            Self::System(c.clone())
        } else if let Some(c) = any.downcast_ref::<ManualClock>() {
            Self::Manual(c.clone())
        } else {
            Self::Other(Box::new(clock))
        }
    }

    #[inline]
    fn now_nanos(&self) -> u64 {
        match self {
            Self::System(c) => c.now_nanos(),
            Self::Manual(c) => c.now_nanos(),
            Self::Other(c) => c.now_nanos(),
        }
    }

    /// The wall clock, for calendar windows.
    fn unix_nanos(&self) -> u64 {
        match self {
            Self::System(c) => c.unix_nanos(),
            Self::Manual(c) => c.unix_nanos(),
            Self::Other(c) => c.unix_nanos(),
        }
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

/// Whether a bucket is idle at `now` (`unix`: the wall clock, for calendar windows): its state
/// equals a fresh one (every charge expired) and nobody is using it. With `evict`, an idle
/// bucket is also marked evicted (locked slots) or set to [`EVICTED`] (GCRA cells), so that a
/// decision holding a clone of it looks again.
fn is_idle(bucket: &Cell, now: u64, unix: u64, evict: bool) -> bool {
    match bucket {
        Cell::Locked(m) => {
            // A bucket locked by a request in flight is busy, not idle.
            let Ok(mut slot) = m.try_lock() else {
                return false;
            };
            let limits = slot.limits;
            let at = if slot.state.algorithm().is_calendar() {
                unix
            } else {
                now
            };
            let idle = slot.state.is_idle(&limits, at);
            if idle && evict {
                slot.evicted = true;
            }
            idle
        }
        // Idle when its TAT has passed (a held cell's value never has).
        Cell::Gcra(cell) => {
            let cur = cell.tat.load(Ordering::Acquire);
            // Fresh again once its refunds have decayed too (see `Gcra::adjust`).
            let refunded = cell.refunded.load(Ordering::Acquire);
            cur.saturating_add(refunded) <= now
                && (!evict
                    || cell
                        .tat
                        .compare_exchange(cur, EVICTED, Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok())
        }
    }
}

/// Charges per request whose buckets and locks are held on the stack (more use the heap).
const INLINE_CHARGES: usize = 8;

impl MemoryStoreBuilder {
    /// Takes time from `clock` (default [`SystemClock`]).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Some(StoreClock::new(clock));
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
                map: DashMap::with_hasher(RandomState::default()),
                residents: Residents::new(digest::random_seed()),
                digest: KeyDigest::new(),
                clock: self
                    .clock
                    .unwrap_or_else(|| StoreClock::System(SystemClock::new())),
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
        // Matched here rather than in a function of its own: the answer is built straight
        // into the caller's (returned through one more frame, it costs 7% more instructions).
        match charges {
            _ if charges.iter().any(|c| KeyDigest::is_long(c.bucket)) => {
                inner.acquire_digested(charges, now)
            }
            [one] => inner.acquire_one(one, now),
            [] => Ok(Decision {
                denial: None,
                charges: ChargeStates::filled(0),
                free_retry: false,
            }),
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

    /// Removes idle buckets, in two passes so that no shard is write-locked for long: the
    /// map is read (shard read locks: lookups go on, only new keys wait) for up to
    /// [`SWEEP_BATCH`] idle keys, then each is removed under its shard's write lock if it is
    /// still idle. A bucket in use (locked, or held by a decision) is not idle.
    fn sweep(&self, now: u64) {
        let unix = self.clock.unix_nanos();
        let mut idle = Vec::new();
        for entry in self.map.iter() {
            if idle.len() == SWEEP_BATCH {
                // More next time: the next request may sweep again.
                self.last_sweep.store(0, Ordering::Relaxed);
                break;
            }
            if is_idle(entry.value(), now, unix, false) {
                idle.push(entry.key().clone());
            }
        }
        for key in &idle {
            if let Some((_, bucket)) = self.map.remove_if(key, |_, b| is_idle(b, now, unix, true)) {
                self.len.fetch_sub(1, Ordering::Relaxed);
                self.residents.remove(&bucket);
            }
        }
    }

    /// Removes `key`'s bucket if it can't hold `quota`'s state (another algorithm's cell:
    /// two layers sharing a rule name with different algorithms reset each other's state).
    #[cold]
    #[inline(never)]
    fn evict_unsuited(&self, key: &BucketKey, quota: &Quota) {
        if let Some((_, bucket)) = self.map.remove_if(key, |_, b| !b.suits(quota)) {
            bucket.evict_now();
            self.len.fetch_sub(1, Ordering::AcqRel);
            self.residents.remove(&bucket);
        }
    }

    /// Adds a fresh bucket for `key` unless one exists; at `max_keys`, first evicts the
    /// least recently used of a few buckets sampled at random (as many times as it takes:
    /// concurrent inserts may take the room it made).
    #[cold]
    #[inline(never)]
    fn insert(&self, key: &BucketKey, quota: &Quota, now: u64) {
        while self.len.fetch_add(1, Ordering::AcqRel) >= self.max_keys {
            self.len.fetch_sub(1, Ordering::AcqRel);
            self.evict_least_recent();
        }
        match self.map.entry(key.clone()) {
            Entry::Occupied(_) => {
                self.len.fetch_sub(1, Ordering::AcqRel);
            }
            Entry::Vacant(v) => {
                let bucket = Resident::new(Cell::new(quota), now);
                // Indexed under the shard's write lock: the index has every bucket the map has.
                self.residents.add(key.clone(), Arc::clone(&bucket));
                v.insert(bucket);
            }
        }
    }

    /// Evicts the least recently used of a sample of buckets, unless a decision holds it
    /// right now (the caller then tries again with another sample).
    #[cold]
    fn evict_least_recent(&self) {
        let Some((key, victim)) = self.residents.least_recent_of_sample() else {
            // The buckets counted are still being inserted by other threads.
            std::thread::yield_now();
            return;
        };
        if let Some((_, bucket)) = self
            .map
            .remove_if(&key, |_, b| Arc::ptr_eq(b, &victim) && b.evict())
        {
            self.len.fetch_sub(1, Ordering::AcqRel);
            self.residents.remove(&bucket);
        }
    }

    /// A decision on charges some of whose keys are stored as digests.
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
        // The general path even for one charge: `acquire_one` stays inlined in its one caller.
        self.acquire_many(&charges, now)
    }

    /// A single charge's decision.
    #[inline]
    fn acquire_one(&self, c: &Charge<'_>, now: u64) -> Result<Decision, StoreError> {
        loop {
            let Some(bucket) = self.map.get(c.bucket) else {
                self.insert(c.bucket, c.quota, now);
                continue;
            };
            bucket.touch(now);
            let cell: &Cell = &bucket;
            // Holding the shard's read lock: no sweep can evict this bucket meanwhile. Each
            // answer is built where it is decided, straight into the caller's: a value merged
            // from several paths first would be moved through the stack (reading back 8-byte
            // stores with 16-byte loads, which stalls).
            match (cell, c.quota.algorithm()) {
                (Cell::Gcra(cell), Algorithm::Gcra) => match cell.admit(c.quota, now, c.amount) {
                    Admission::Admitted(prepared, tat, refunded) => {
                        let snapshot = prepared.snapshot(tat, now);
                        let placement = Gcra::placement(tat, refunded);
                        return Ok(one_decision((Verdict::Allow, placement, snapshot)));
                    }
                    Admission::General => {
                        if let Some(decided) = cell.acquire_general(c.quota, now, c.amount) {
                            return Ok(one_decision(decided));
                        }
                    }
                    Admission::Evicted => {}
                },
                (Cell::Locked(m), algorithm) if algorithm != Algorithm::Gcra => {
                    let mut guard = lock(m);
                    let slot = &mut *guard;
                    let limits = c.quota.limits();
                    let decided = match (&mut slot.state, algorithm) {
                        // A counter charged under the limits it was last charged under.
                        (State::Counter(s), Algorithm::SlidingWindowCounter)
                            if slot.limits == limits =>
                        {
                            let by_window = slot.by_window;
                            match s.admit_with(&limits, now, c.amount, |p| by_window.div_ceil(p)) {
                                Some((placement, snapshot)) => {
                                    drop(guard);
                                    return Ok(one_decision((Verdict::Allow, placement, snapshot)));
                                }
                                None => s.deny(&limits, now, c.amount),
                            }
                        }
                        _ => {
                            let at = self.clock.time_for(algorithm, now);
                            acquire_slot(slot, c.quota, at, c.amount)
                        }
                    };
                    drop(guard);
                    return Ok(one_decision(decided));
                }
                // Another algorithm's cell.
                _ => {}
            }
            // Another algorithm's bucket, or evicted meanwhile.
            drop(bucket);
            self.evict_unsuited(c.bucket, c.quota);
        }
    }

    #[inline(never)]
    fn acquire_many(&self, charges: &[Charge<'_>], now: u64) -> Result<Decision, StoreError> {
        let n = charges.len();
        if n > self.max_keys {
            // Each new bucket would evict another of the same request.
            return Err(StoreError::AtCapacity {
                max_keys: self.max_keys,
            });
        }
        loop {
            // Up to `INLINE_CHARGES` charges, the buckets and their guards live on the stack:
            // the decision's own `Vec` is the only allocation.
            let decided = if n <= INLINE_CHARGES {
                let mut buckets: [Option<(usize, Bucket)>; INLINE_CHARGES] = Default::default();
                let mut guards: [Option<Held<'_>>; INLINE_CHARGES] = Default::default();
                self.decide_many(charges, now, &mut buckets[..n], &mut guards[..n])?
            } else {
                let mut buckets = vec![None; n];
                let mut guards: Vec<_> = std::iter::repeat_with(|| None).take(n).collect();
                self.decide_many(charges, now, &mut buckets, &mut guards)?
            };
            if let Some(decision) = decided {
                return Ok(decision);
            }
            // A sweep removed a bucket between lookup and lock: look up again.
        }
    }

    /// Looks up every charge's bucket, holds them all in address order (locking the
    /// mutexes, marking the GCRA cells held), checks every charge and charges all of them
    /// only if all fit. `None` when a bucket was evicted meanwhile. `buckets` and `guards`
    /// are scratch space of `charges.len()` entries.
    fn decide_many<'b>(
        &self,
        charges: &[Charge<'_>],
        now: u64,
        buckets: &'b mut [Option<(usize, Bucket)>],
        guards: &mut [Option<Held<'b>>],
    ) -> Result<Option<Decision>, StoreError> {
        for (entry, (i, c)) in buckets.iter_mut().zip(charges.iter().enumerate()) {
            let bucket = loop {
                match self.map.get(c.bucket) {
                    Some(b) if b.suits(c.quota) => {
                        b.touch(now);
                        break Arc::clone(&b);
                    }
                    Some(b) => {
                        drop(b);
                        self.evict_unsuited(c.bucket, c.quota);
                    }
                    None => self.insert(c.bucket, c.quota, now),
                }
            };
            *entry = Some((i, bucket));
        }
        // A fixed global order (by address) makes multi-bucket holding deadlock-free.
        buckets.sort_unstable_by_key(|e| e.as_ref().map_or(0, |(_, b)| Arc::as_ptr(b) as usize));
        let buckets: &'b [Option<(usize, Bucket)>] = buckets;
        let sorted = || buckets.iter().flatten();
        if let Some(i) = sorted()
            .zip(sorted().skip(1))
            .find(|(a, b)| Arc::ptr_eq(&a.1, &b.1))
            .map(|(a, _)| a.0)
        {
            return Err(StoreError::DuplicateBucket(format!(
                "{:?}",
                charges[i].bucket
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
        for (guard, (i, bucket)) in guards.iter_mut().zip(sorted()) {
            let cell: &Cell = bucket;
            let held = match cell {
                Cell::Locked(m) => Held::Locked(lock(m)),
                Cell::Gcra(cell) => match hold_gcra(cell, charges[*i].quota.limits()) {
                    Some(held) => held,
                    None => return Ok(None),
                },
            };
            if guard.insert(held).slot().evicted {
                return Ok(None);
            }
        }

        // Checked and charged in address order; a tie between denials goes to the first.
        let mut denial: Option<(usize, Option<u64>)> = None;
        for (guard, &(i, _)) in guards.iter_mut().zip(sorted()) {
            let (slot, c) = (guard.as_mut().expect("held above").slot(), &charges[i]);
            fit(slot, c.quota);
            let (limits, by_window) = (slot.limits, slot.by_window);
            let now = time_for(c);
            let verdict = match &mut slot.state {
                // A counter that fits says so without the general check's 128-bit arithmetic.
                State::Counter(s) => {
                    if s.fits_with(&limits, now, c.amount, |p| by_window.div_ceil(p)) {
                        Verdict::Allow
                    } else {
                        s.check(&limits, now, c.amount)
                    }
                }
                state => state.check(&limits, now, c.amount),
            };
            if let Verdict::Deny { retry_after } = verdict {
                // Report the rule that keeps the request out longest ("never" beats any wait).
                let worse = match denial {
                    None => true,
                    Some((_, None)) => false,
                    Some((_, Some(prev))) => retry_after.is_none_or(|r| r > prev),
                };
                if worse {
                    denial = Some((i, retry_after));
                }
            }
        }
        for (guard, &(i, _)) in guards.iter_mut().zip(sorted()) {
            let (slot, c) = (guard.as_mut().expect("held above").slot(), &charges[i]);
            let (limits, by_window) = (slot.limits, slot.by_window);
            let now = time_for(c);
            // Every charge fits (checked above): a counter's admitted path charges and
            // answers in one pass, dividing by its prepared window.
            let admitted = match (&mut slot.state, denial) {
                (State::Counter(s), None) => {
                    s.admit_with(&limits, now, c.amount, |p| by_window.div_ceil(p))
                }
                _ => None,
            };
            // Back to the caller's order.
            states[i] = match admitted {
                Some((placement, snapshot)) => ChargeState {
                    snapshot,
                    placement,
                },
                None => {
                    let placement = if denial.is_none() {
                        slot.state.charge(&limits, now, c.amount)
                    } else {
                        Placement::default()
                    };
                    ChargeState {
                        snapshot: slot.state.peek(&limits, now),
                        placement,
                    }
                }
            };
        }
        Ok(Some(Decision {
            denial: denial.map(|(index, retry)| Denial {
                index,
                retry_after: retry.map(Duration::from_nanos),
            }),
            charges: states,
            free_retry: false,
        }))
    }

    /// Runs `f` on `key`'s state (creating the bucket if `create`); `None` if there is no
    /// bucket and `create` is false. `f` may run more than once (when a sweep evicted the
    /// bucket meanwhile), each time on the latest state.
    fn with_bucket<T>(
        &self,
        key: &BucketKey,
        quota: &Quota,
        now: u64,
        create: bool,
        mut f: impl FnMut(&mut State, &Limits) -> T,
    ) -> Result<Option<T>, StoreError> {
        loop {
            if let Some(bucket) = self.map.get(key) {
                let cell: &Cell = &bucket;
                let out = match cell {
                    _ if !bucket.suits(quota) => None,
                    Cell::Gcra(cell) => update_gcra(cell, &quota.limits(), &mut f),
                    Cell::Locked(m) => {
                        let mut slot = lock(m);
                        fit(&mut slot, quota);
                        let limits = slot.limits;
                        Some(f(&mut slot.state, &limits))
                    }
                };
                drop(bucket);
                match out {
                    Some(out) => return Ok(Some(out)),
                    None => {
                        self.evict_unsuited(key, quota);
                        continue;
                    }
                }
            }
            if !create {
                return Ok(None);
            }
            self.insert(key, quota, now);
        }
    }
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

/// A single-charge decision of a locked slot, through [`fit`]: every algorithm but a counter
/// charged under its last limits (whose path is inlined in [`Inner::acquire_one`]).
#[inline(never)]
fn acquire_slot(slot: &mut Slot, quota: &Quota, now: u64, cost: u64) -> Decided {
    fit(slot, quota);
    let limits = slot.limits;
    match &mut slot.state {
        State::Counter(s) => {
            let by_window = slot.by_window;
            s.acquire_with(&limits, now, cost, |p| by_window.div_ceil(p))
        }
        state => state.acquire(&limits, now, cost),
    }
}

/// Makes a slot's state match the quota's algorithm and limits. Two rules of the same name
/// with different algorithms (two layers sharing one store) reset each other's state rather
/// than misread it.
#[inline]
fn fit(slot: &mut Slot, quota: &Quota) {
    if slot.state.algorithm() != quota.algorithm() {
        slot.state = State::new(quota.algorithm());
    }
    let limits = quota.limits();
    if slot.limits != limits {
        refit(slot, limits);
    }
}

/// A slot charged under other limits than last time: its divisor follows.
#[cold]
#[inline(never)]
fn refit(slot: &mut Slot, limits: Limits) {
    slot.limits = limits;
    slot.by_window = Divisor::new(limits.window_nanos);
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
    /// Bytes held by the map's keys and buckets and by the eviction index (an upper bound:
    /// shared rule names counted once per key; the map's own table not counted).
    fn held_bytes(&self) -> usize {
        let map: usize = self
            .map
            .iter()
            .map(|e| e.key().held_bytes() + std::mem::size_of::<Resident>())
            .sum();
        map + self.residents.held_bytes()
    }
}
