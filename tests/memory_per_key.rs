//! What a key costs the memory store, counted by a counting global allocator (this test binary
//! has one test, so nothing else allocates meanwhile): at most one allocation per key (the
//! key's own bytes when longer than 22), and bytes per key within bounds that the previous
//! layout (a map entry, an `Arc`'d bucket and an index entry per key) exceeded.
//!
//! `benches/memory.rs` measures the figures at 1,000,000 keys.

use std::alloc::System;
use std::sync::Arc;
use std::time::Duration;

use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use tower_llm_ratelimit::clock::ManualClock;
use tower_llm_ratelimit::store::{BucketKey, Charge, MemoryStore};
use tower_llm_ratelimit::Quota;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const KEYS: usize = 100_000;

/// Live bytes and blocks per key after inserting `KEYS` keys of `len` bytes under `quota`.
fn per_key(quota: &Quota, len: usize) -> (f64, f64) {
    let region = Region::new(GLOBAL);
    let store = MemoryStore::builder()
        .clock(ManualClock::new())
        .max_keys(2 * KEYS)
        .sweep_interval(Duration::from_secs(3_600))
        .build();
    let rule: Arc<str> = Arc::from("rule");
    let mut buf = [b'k'; 64];
    for i in 0..KEYS {
        buf[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let bucket = BucketKey::new(Arc::clone(&rule), &buf[..len]);
        let d = store
            .try_acquire(&[Charge::new(&bucket, quota, 1)])
            .expect("decided");
        assert!(d.is_admitted());
    }
    assert_eq!(store.len(), KEYS);
    let stats = region.change();
    let bytes = stats.bytes_allocated as f64 - stats.bytes_deallocated as f64;
    let blocks = stats.allocations as f64 - stats.deallocations as f64;
    drop(store);
    (bytes / KEYS as f64, blocks / KEYS as f64)
}

#[test]
fn a_key_costs_at_most_one_allocation_and_a_bounded_number_of_bytes() {
    let gcra = Quota::per_minute(10).gcra();
    let counter = Quota::per_minute(10);
    for (name, quota, max_bytes) in [("gcra", &gcra, 150.0), ("counter", &counter, 250.0)] {
        let (bytes, blocks) = per_key(quota, 20);
        // Only the shards' tables and vectors: a few dozen blocks for all the keys.
        assert!(
            blocks < 0.01,
            "{name}, 20-byte keys: {blocks} allocations per key"
        );
        assert!(
            bytes <= max_bytes,
            "{name}, 20-byte keys: {bytes} bytes per key"
        );
        let (bytes48, blocks48) = per_key(quota, 48);
        // The key's own bytes, nothing else.
        assert!(
            (1.0..1.01).contains(&blocks48),
            "{name}, 48-byte keys: {blocks48} allocations per key"
        );
        assert!(
            bytes48 <= bytes + 48.5,
            "{name}, 48-byte keys: {bytes48} bytes per key"
        );
    }
}
