//! The memory store's table of idempotent requests whose last attempt failed: what
//! [`Store::acquire_once`] and [`Store::fail_attempt`] read and write (see
//! [Idempotent retries](crate::store#idempotent-retries)).
//!
//! Bounded twice: an entry lives for the idempotency TTL (default 120 s, the Redis store's
//! default too), and the table holds at most `max_idempotency_ids` entries (default
//! 100,000). Entries are only made by failed attempts, and expired ones are dropped when the
//! table is full (one scan a second at most). When it is still full, the new failure is not
//! remembered: its retry is charged like a new request (the safe side), and no entry of
//! another request is pushed out for it.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::MemoryStore;
use crate::store::{
    Charge, ChargeState, ChargeStates, Decision, Denial, IdempotencyKey, Store, StoreError,
    MAX_FREE_RETRIES,
};

/// Default [`IdTable`] bound.
pub(super) const DEFAULT_MAX_IDS: usize = 100_000;
/// Default lifetime of an entry.
pub(super) const DEFAULT_TTL: Duration = Duration::from_secs(120);

/// What the store remembers of one idempotent request.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// The last attempt failed: the next one is free (if `free_used` allows).
    failed: bool,
    /// Retries of this request that were free so far.
    free_used: u32,
    /// When the entry is forgotten (the store clock's nanoseconds).
    expires: u64,
}

/// The table; one lock, taken only by requests that carry an idempotency id.
#[derive(Debug)]
pub(super) struct IdTable {
    map: Mutex<Entries>,
    ttl_nanos: u64,
    max: usize,
}

/// A full table is scanned for expired entries at most once a second: a flood of failures
/// at the cap doesn't rescan it per request.
const PURGE_INTERVAL_NANOS: u64 = 1_000_000_000;

#[derive(Debug, Default)]
struct Entries {
    map: HashMap<IdempotencyKey, Entry>,
    /// When a full table may be scanned again.
    next_purge: u64,
}

impl std::ops::Deref for Entries {
    type Target = HashMap<IdempotencyKey, Entry>;
    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl std::ops::DerefMut for Entries {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.map
    }
}

impl IdTable {
    pub(super) fn new(ttl: Duration, max: usize) -> Self {
        Self {
            map: Mutex::new(Entries::default()),
            ttl_nanos: u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX),
            max,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        // The map is consistent after any panic (each write is one insert).
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks `id`'s attempt as failed; not remembered when the table is full (see the module
    /// docs).
    fn fail(&self, id: &IdempotencyKey, now: u64) {
        let mut map = self.lock();
        let expires = now.saturating_add(self.ttl_nanos);
        if let Some(e) = map.get_mut(id) {
            if e.expires <= now {
                // Forgotten already (as an expired Redis record): its free retries too.
                e.free_used = 0;
            }
            e.failed = true;
            e.expires = expires;
            return;
        }
        if map.len() >= self.max && now >= map.next_purge {
            map.next_purge = now.saturating_add(PURGE_INTERVAL_NANOS);
            map.retain(|_, e| e.expires > now);
        }
        if map.len() >= self.max {
            tracing::debug!(
                target: "tower_llm_ratelimit",
                max = self.max,
                "idempotency table full: a retry of this request will be charged"
            );
            return;
        }
        map.insert(
            *id,
            Entry {
                failed: true,
                free_used: 0,
                expires,
            },
        );
    }

    /// Entries held (expired ones included until they are dropped).
    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }
}

impl MemoryStore {
    /// [`Store::acquire_once`], synchronously.
    pub(super) fn try_acquire_once(
        &self,
        charges: &[Charge<'_>],
        id: &IdempotencyKey,
    ) -> Result<Decision, StoreError> {
        let now = self.inner.clock.now_nanos();
        let ids = &self.inner.ids;
        // Held while deciding, so two concurrent retries can't both use one failure.
        let mut map = ids.lock();
        let free = map
            .get(id)
            .is_some_and(|e| e.failed && e.expires > now && e.free_used < MAX_FREE_RETRIES);
        if !free {
            drop(map);
            return self.try_acquire(charges);
        }
        let paid: Vec<Charge<'_>> = charges
            .iter()
            .filter(|c| !c.is_request_count())
            .copied()
            .collect();
        let decision = self.try_acquire(&paid)?;
        let mut states = ChargeStates::filled(charges.len());
        let mut paid_states = decision.charges.iter();
        let mut paid_index = Vec::with_capacity(paid.len());
        for (i, c) in charges.iter().enumerate() {
            states[i] = if c.is_request_count() {
                // Not charged: the bucket as it is.
                let snapshot = match self.peek(c.bucket, c.quota).now() {
                    Ok(result) => result?,
                    Err(_) => Default::default(),
                };
                ChargeState {
                    snapshot,
                    ..ChargeState::default()
                }
            } else {
                paid_index.push(i);
                paid_states.next().copied().unwrap_or_default()
            };
        }
        let denial = decision.denial.map(|d| Denial {
            index: paid_index.get(d.index).copied().unwrap_or(d.index),
            ..d
        });
        if denial.is_none() {
            if let Some(e) = map.get_mut(id) {
                e.failed = false;
                e.free_used += 1;
                // Remembered for a TTL from now, as the Redis store rewrites its record.
                e.expires = now.saturating_add(ids.ttl_nanos);
            }
        }
        Ok(Decision {
            free_retry: denial.is_none(),
            denial,
            charges: states,
        })
    }

    /// [`Store::fail_attempt`], synchronously.
    pub(super) fn fail_attempt_now(&self, id: &IdempotencyKey) {
        let now = self.inner.clock.now_nanos();
        self.inner.ids.fail(id, now);
    }

    /// Idempotent requests remembered (their last attempt failed, or one of their retries
    /// was free), expired ones included until the table drops them.
    pub fn idempotency_ids(&self) -> usize {
        self.inner.ids.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_cap_expired_entries_make_room_and_live_ones_stay() {
        let table = IdTable::new(Duration::from_secs(10), 2);
        let id = |n: u8| IdempotencyKey::from_bytes([n; 16]);
        let sec = 1_000_000_000;
        table.fail(&id(1), 0);
        table.fail(&id(2), 5 * sec);
        // Full of live entries: the new failure is not remembered, none is pushed out.
        table.fail(&id(3), 9 * sec);
        assert_eq!(table.len(), 2);
        assert!(!table.lock().contains_key(&id(3)));
        // At 11 s the first has expired: it makes room.
        table.fail(&id(3), 11 * sec);
        let map = table.lock();
        assert!(map.contains_key(&id(2)) && map.contains_key(&id(3)));
        assert!(!map.contains_key(&id(1)));
    }

    /// Past its TTL an entry is forgotten, its free retries too (as a Redis record that
    /// expired): a failure of the same request then starts a new entry.
    #[test]
    fn an_expired_entry_is_forgotten_with_its_free_retries() {
        use crate::clock::ManualClock;
        use crate::rule::Quota;
        use crate::store::BucketKey;

        let clock = ManualClock::new();
        let store = MemoryStore::builder()
            .clock(clock.clone())
            .idempotency_ttl(Duration::from_secs(10))
            .build();
        let rpm = Quota::per_minute(1_000);
        let bucket = BucketKey::new("rpm", "alice");
        let charges = [Charge::new(&bucket, &rpm, 1)];
        let id = IdempotencyKey::from_bytes([7; 16]);
        let attempt = |store: &MemoryStore| store.try_acquire_once(&charges, &id).unwrap();
        assert!(!attempt(&store).free_retry);
        for _ in 0..MAX_FREE_RETRIES {
            store.fail_attempt_now(&id);
            assert!(attempt(&store).free_retry);
        }
        store.fail_attempt_now(&id);
        assert!(!attempt(&store).free_retry, "free retries used up");
        // Long after the entry expired, the same request fails again: a new entry.
        clock.advance(Duration::from_secs(60));
        store.fail_attempt_now(&id);
        assert!(attempt(&store).free_retry);

        // A free retry keeps the entry for a TTL from its own time (the Redis store writes
        // its record again): its last free retry at 8 s is still remembered at 12 s.
        let id = IdempotencyKey::from_bytes([8; 16]);
        let attempt = |store: &MemoryStore| store.try_acquire_once(&charges, &id).unwrap();
        for _ in 0..MAX_FREE_RETRIES - 1 {
            store.fail_attempt_now(&id);
            assert!(attempt(&store).free_retry);
        }
        store.fail_attempt_now(&id);
        clock.advance(Duration::from_secs(8));
        assert!(attempt(&store).free_retry);
        clock.advance(Duration::from_secs(4));
        store.fail_attempt_now(&id);
        assert!(!attempt(&store).free_retry, "still remembered, used up");
    }

    #[test]
    fn a_full_table_is_scanned_at_most_once_a_second() {
        let table = IdTable::new(Duration::from_secs(1), 2);
        let id = |n: u8| IdempotencyKey::from_bytes([n; 16]);
        let ms = 1_000_000;
        table.fail(&id(1), 0);
        table.fail(&id(2), 500 * ms);
        // 1.2 s: a scan drops id 1 (expired at 1 s).
        table.fail(&id(3), 1_200 * ms);
        assert!(table.lock().contains_key(&id(3)));
        // 1.6 s: id 2 has expired, but the last scan was 0.4 s ago: not remembered.
        table.fail(&id(4), 1_600 * ms);
        assert!(!table.lock().contains_key(&id(4)));
        // 2.2 s: scanned again.
        table.fail(&id(4), 2_200 * ms);
        assert!(table.lock().contains_key(&id(4)));
    }
}
