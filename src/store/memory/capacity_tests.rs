//! The store at its bounds: long keys held as digests, and the least recently used buckets
//! making room for new ones at `max_keys`.

use super::*;
use crate::clock::ManualClock;

/// 10,000 keys of 64 KiB each (a header value a client chose) add less than 10 MB.
#[test]
fn long_keys_are_held_as_digests() {
    let store = MemoryStore::builder().clock(ManualClock::new()).build();
    let q = Quota::per_minute(10);
    let base = store.inner.held_bytes();
    let mut value = vec![b'k'; 64 * 1024];
    for i in 0..10_000u32 {
        value[..4].copy_from_slice(&i.to_le_bytes());
        let key = BucketKey::new("r", &value[..]);
        let d = store.try_acquire(&[Charge::new(&key, &q, 1)]).unwrap();
        assert!(d.is_admitted());
        let held = store.inner.held_bytes() - base;
        assert!(held < 10_000_000, "{held} bytes held after {} keys", i + 1);
    }
    assert_eq!(store.len(), 10_000);
}

/// A flood of 1,000,000 distinct keys against `max_keys = 10_000`: the store stays at the
/// cap, each new key is counted (never refused), and a hot key used every 9 ms of clock
/// decides exactly as its algorithm on its own would (so it is never evicted: a fresh
/// bucket would admit what the model denies).
#[test]
fn a_key_flood_evicts_the_least_recently_used_and_a_hot_key_keeps_its_limit() {
    const MAX: usize = 10_000;
    let clock = ManualClock::new();
    let s = MemoryStore::builder()
        .clock(clock.clone())
        .max_keys(MAX)
        .sweep_interval(Duration::from_secs(3_600))
        .build();
    let cold = Quota::per_minute(1);
    let hot_quota = Quota::per_second(10);
    let hot = BucketKey::new("hot", "k");
    let mut model = State::new(hot_quota.algorithm());
    let (mut admitted, mut denied) = (0, 0);
    let mut per_second = std::collections::HashMap::<u64, u64>::new();
    for i in 0..1_000_000u32 {
        clock.advance(Duration::from_millis(3));
        let key = BucketKey::new("cold", i.to_le_bytes().as_slice());
        let d = s.try_acquire(&[Charge::new(&key, &cold, 1)]).unwrap();
        assert!(d.is_admitted(), "new key {i} counted");
        assert!(s.len() <= MAX, "{} keys after {i}", s.len());
        if i as usize >= MAX {
            assert_eq!(s.len(), MAX, "the store stays at the cap");
        }
        if i % 3 == 0 {
            let now = clock.now_nanos();
            let d = s.try_acquire(&[Charge::new(&hot, &hot_quota, 1)]).unwrap();
            let want = one_decision(model.acquire(&hot_quota.limits(), now, 1));
            assert_eq!(d, want, "hot key at step {i}");
            if d.is_admitted() {
                admitted += 1;
                *per_second.entry(now / 1_000_000_000).or_default() += 1;
            } else {
                denied += 1;
            }
        }
    }
    // 3,000 s of clock at 10 a second: the limit was binding the whole time, and held.
    assert!(
        per_second.values().all(|&n| n <= 10),
        "more than 10 in a second"
    );
    assert!((25_000..=30_010).contains(&admitted), "{admitted} admitted");
    assert!(denied > 300_000, "{denied} denied");
    // A new key's second request is counted against its first.
    let key = BucketKey::new("cold", "late");
    assert!(s
        .try_acquire(&[Charge::new(&key, &cold, 1)])
        .unwrap()
        .is_admitted());
    assert!(!s
        .try_acquire(&[Charge::new(&key, &cold, 1)])
        .unwrap()
        .is_admitted());
}
