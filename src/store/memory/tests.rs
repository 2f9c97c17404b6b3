use super::*;
use crate::clock::ManualClock;

fn store(max_keys: usize) -> (MemoryStore, ManualClock) {
    let clock = ManualClock::new();
    let s = MemoryStore::builder()
        .clock(clock.clone())
        .max_keys(max_keys)
        .sweep_interval(Duration::from_secs(60))
        .build();
    (s, clock)
}

/// At the cap, a concurrency bucket with a slot in flight is not the one evicted, even when
/// it is the least recently used: a fresh bucket would let its caller past the limit.
#[test]
fn at_capacity_buckets_with_slots_in_flight_stay() {
    let (s, clock) = store(3);
    let one = Quota::concurrent(1);
    let q = Quota::per_minute(10);
    let stream = BucketKey::new("conc", "long-stream");
    let d = s.try_acquire(&[Charge::new(&stream, &one, 1)]).unwrap();
    assert!(d.is_admitted());
    let placement = d.charges[0].placement;
    for k in ["a", "b", "c", "d", "e"] {
        clock.advance(Duration::from_millis(1));
        let key = BucketKey::new("r", k);
        assert!(s
            .try_acquire(&[Charge::new(&key, &q, 1)])
            .unwrap()
            .is_admitted());
        assert!(s.len() <= 3);
    }
    // Still held: a second stream is refused.
    assert!(!s
        .try_acquire(&[Charge::new(&stream, &one, 1)])
        .unwrap()
        .is_admitted());
    // Once released, it may go like any other bucket.
    let release = Adjustment {
        bucket: &stream,
        quota: &one,
        placement,
        charged: 1,
        actual: 0,
    };
    s.settle(&[release]).now().unwrap().unwrap();
    for k in ["f", "g", "h"] {
        clock.advance(Duration::from_millis(1));
        let key = BucketKey::new("r", k);
        assert!(s
            .try_acquire(&[Charge::new(&key, &q, 1)])
            .unwrap()
            .is_admitted());
    }
    assert!(s
        .try_acquire(&[Charge::new(&stream, &one, 1)])
        .unwrap()
        .is_admitted());
}

#[test]
fn idle_buckets_are_swept_automatically() {
    let (s, clock) = store(100);
    let q = Quota::per_second(5);
    for user in ["a", "b", "c"] {
        let k = BucketKey::new("r", user);
        assert!(s
            .try_acquire(&[Charge::new(&k, &q, 1)])
            .unwrap()
            .is_admitted());
    }
    assert_eq!(s.len(), 3);
    // 61 s later the next request triggers a sweep: the three idle buckets go.
    clock.advance(Duration::from_secs(61));
    let k = BucketKey::new("r", "d");
    s.try_acquire(&[Charge::new(&k, &q, 1)]).unwrap();
    assert_eq!(s.len(), 1);
}

#[test]
fn at_capacity_the_least_recently_used_bucket_makes_room() {
    let (s, clock) = store(2);
    let q = Quota::per_minute(10);
    let (a, b, c) = (
        BucketKey::new("r", "a"),
        BucketKey::new("r", "b"),
        BucketKey::new("r", "c"),
    );
    let remaining = |k: &BucketKey| {
        clock.advance(Duration::from_millis(1));
        s.try_acquire(&[Charge::new(k, &q, 1)]).unwrap().charges[0]
            .snapshot
            .remaining
    };
    assert_eq!(remaining(&a), 9);
    assert_eq!(remaining(&b), 9);
    assert_eq!(remaining(&a), 8, "a is now more recent than b");
    // c takes b's place, and is counted.
    assert_eq!(remaining(&c), 9);
    assert_eq!(remaining(&c), 8);
    assert_eq!(s.len(), 2);
    assert_eq!(remaining(&a), 7, "a stayed");
    assert_eq!(
        remaining(&b),
        9,
        "b starts afresh (c goes, a was used after it)"
    );
    assert_eq!(remaining(&a), 6);
    // A request naming more buckets than the store holds can't be decided.
    let charges = [
        Charge::new(&a, &q, 1),
        Charge::new(&b, &q, 1),
        Charge::new(&c, &q, 1),
    ];
    assert_eq!(
        s.try_acquire(&charges),
        Err(StoreError::AtCapacity { max_keys: 2 })
    );
}

#[test]
fn multi_charge_is_all_or_nothing_and_ordered() {
    let (s, _) = store(100);
    let small = Quota::per_minute(1);
    let big = Quota::per_minute(100);
    let (a, b) = (BucketKey::new("big", "u"), BucketKey::new("small", "u"));
    let d = s
        .try_acquire(&[Charge::new(&a, &big, 1), Charge::new(&b, &small, 1)])
        .unwrap();
    assert!(d.is_admitted());
    assert_eq!(d.charges[0].snapshot.remaining, 99);
    assert_eq!(d.charges[1].snapshot.remaining, 0);
    let d = s
        .try_acquire(&[Charge::new(&a, &big, 1), Charge::new(&b, &small, 1)])
        .unwrap();
    assert_eq!(d.denial.map(|d| d.index), Some(1));
    assert_eq!(
        d.charges[0].snapshot.remaining, 99,
        "nothing charged on denial"
    );
    let dup = s.try_acquire(&[Charge::new(&a, &big, 1), Charge::new(&a, &big, 1)]);
    assert!(matches!(dup, Err(StoreError::DuplicateBucket(_))));
}

#[test]
fn settle_and_peek() {
    let (s, _) = store(100);
    let q = Quota::per_minute(1000).tokens();
    let k = BucketKey::new("tpm", "u");
    let d = s.try_acquire(&[Charge::new(&k, &q, 600)]).unwrap();
    assert_eq!(d.charges[0].snapshot.remaining, 400);
    s.settle(&[Adjustment {
        bucket: &k,
        quota: &q,
        placement: d.charges[0].placement,
        charged: 600,
        actual: 250,
    }])
    .now()
    .unwrap()
    .unwrap();
    assert_eq!(s.peek(&k, &q).now().unwrap().unwrap().remaining, 750);
    let other = BucketKey::new("tpm", "nobody");
    assert_eq!(s.peek(&other, &q).now().unwrap().unwrap().remaining, 1000);
    assert_eq!(s.len(), 1, "peek creates nothing");
}

#[test]
fn a_bucket_switching_algorithms_starts_afresh() {
    let (s, clock) = store(100);
    let k = BucketKey::new("r", "u");
    let counter = Quota::per_minute(10);
    let gcra = Quota::per_minute(10).gcra();
    let remaining = |q: &Quota| {
        s.try_acquire(&[Charge::new(&k, q, 1)]).unwrap().charges[0]
            .snapshot
            .remaining
    };
    assert_eq!(remaining(&counter), 9);
    assert_eq!(remaining(&counter), 8);
    assert_eq!(remaining(&gcra), 9, "a GCRA cell replaces the counter's");
    assert_eq!(s.len(), 1);
    assert_eq!(remaining(&gcra), 8);
    assert_eq!(remaining(&counter), 9, "and the counter's replaces it");
    assert_eq!(s.len(), 1);
    // GCRA cells settle, peek and get swept like the others.
    let tpm = Quota::per_minute(1000).tokens().gcra();
    let t = BucketKey::new("tpm", "u");
    let d = s.try_acquire(&[Charge::new(&t, &tpm, 600)]).unwrap();
    s.settle(&[Adjustment {
        bucket: &t,
        quota: &tpm,
        placement: d.charges[0].placement,
        charged: 600,
        actual: 100,
    }])
    .now()
    .unwrap()
    .unwrap();
    assert_eq!(s.peek(&t, &tpm).now().unwrap().unwrap().remaining, 900);
    let both = s
        .try_acquire(&[Charge::new(&t, &tpm, 950), Charge::new(&k, &counter, 1)])
        .unwrap();
    assert_eq!(both.denial.map(|d| d.index), Some(0), "all or nothing");
    assert_eq!(s.peek(&k, &counter).now().unwrap().unwrap().remaining, 9);
    clock.advance(Duration::from_secs(121));
    s.sweep();
    assert_eq!(s.len(), 0);
    assert_eq!(remaining(&gcra), 9);
}

/// Drives one key of a store through random charges under `quotas` (mostly the seed's
/// own, sometimes another one: another tier's quota on the same key) and checks every
/// decision against `algorithm` on its own, the store sweeping every `sweep`.
fn decides_as_the_model(
    algorithm: Algorithm,
    quotas: &[Quota; 4],
    sweep: Duration,
    max_step_nanos: u64,
    cost: impl Fn(&mut crate::algorithm::TestRng) -> u64,
) {
    for seed in 0..20 {
        let mut rng = crate::algorithm::TestRng::new(seed);
        let clock = ManualClock::new();
        let s = MemoryStore::builder()
            .clock(clock.clone())
            .sweep_interval(sweep)
            .build();
        let k = BucketKey::new("r", "u");
        let mut model = State::new(algorithm);
        for _ in 0..400 {
            clock.advance(Duration::from_nanos(rng.below(max_step_nanos)));
            let now = clock.now_nanos();
            let q = if rng.below(4) == 0 {
                &quotas[rng.below(4) as usize]
            } else {
                &quotas[seed as usize % 4]
            };
            let cost = cost(&mut rng);
            let d = s.try_acquire(&[Charge::new(&k, q, cost)]).unwrap();
            let want = one_decision(model.acquire(&q.limits(), now, cost));
            assert_eq!(d, want, "seed {seed} {q:?} cost {cost} at {now}");
        }
    }
}

/// A GCRA bucket decides through its prepared limits, or through the general code when
/// charged under other limits: either way exactly as the algorithm on its own.
#[test]
fn gcra_cells_decide_as_the_algorithm_under_any_limits() {
    let quotas = [
        Quota::per_minute(10).gcra(),
        Quota::per_minute(10).gcra().burst(3),
        Quota::per_second(1_000).tokens().gcra(),
        Quota::new(7, Duration::from_millis(1_500)).gcra().burst(20),
    ];
    let sweep = Duration::from_secs(60);
    decides_as_the_model(
        Algorithm::Gcra,
        &quotas,
        sweep,
        200_000_000,
        |rng| match rng.below(4) {
            0 => rng.below(30),
            _ => 1,
        },
    );
}

/// A counter bucket charged under other limits (another window) still decides exactly as
/// the algorithm on its own. No sweep: a counter left idle under one window and charged under another
/// would start afresh where the model carries its old window index.
#[test]
fn counter_cells_decide_as_the_algorithm_under_any_limits() {
    let quotas = [
        Quota::per_minute(10),
        Quota::per_second(1_000).tokens(),
        Quota::new(7, Duration::from_millis(1_500)),
        Quota::new(u64::MAX / 3, Duration::from_nanos(u64::MAX / 5)),
    ];
    decides_as_the_model(
        Algorithm::SlidingWindowCounter,
        &quotas,
        Duration::from_secs(3_600),
        400_000_000,
        |rng| match rng.below(4) {
            0 => rng.below(30),
            1 => rng.edgy(),
            _ => 1,
        },
    );
}

#[test]
fn inside_a_runtime_the_sweep_runs_off_the_request_path() {
    let (s, clock) = store(100);
    let q = Quota::per_second(5);
    for user in ["a", "b", "c"] {
        let k = BucketKey::new("r", user);
        s.try_acquire(&[Charge::new(&k, &q, 1)]).unwrap();
    }
    clock.advance(Duration::from_secs(61));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let k = BucketKey::new("r", "d");
        assert!(s
            .try_acquire(&[Charge::new(&k, &q, 1)])
            .unwrap()
            .is_admitted());
    });
    // The sweep ran on the runtime's blocking pool; wait for it (bounded).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.len() != 1 && std::time::Instant::now() < deadline {
        std::thread::yield_now();
    }
    assert_eq!(s.len(), 1, "the three idle buckets were swept");
    drop(runtime);
}

#[test]
fn a_sweep_removes_a_bounded_batch_and_the_next_one_goes_on() {
    let (s, clock) = store(SWEEP_BATCH * 2);
    let q = Quota::per_second(5);
    for i in 0..SWEEP_BATCH + 10 {
        let k = BucketKey::new("r", i.to_string());
        s.try_acquire(&[Charge::new(&k, &q, 1)]).unwrap();
    }
    clock.advance(Duration::from_secs(61));
    s.sweep();
    assert_eq!(s.len(), 10);
    // The sweep asked for another one at the next request.
    let k = BucketKey::new("r", "new");
    s.try_acquire(&[Charge::new(&k, &q, 1)]).unwrap();
    assert_eq!(s.len(), 1);
}

/// Multi-rule decisions against a model: every charge checked on its own bucket's state,
/// all charged only if all fit (then each answers its snapshot after the charge), none
/// otherwise (each answers its snapshot as it is), the denial reported by a charge that
/// needs the longest wait. Counters (the one-pass admitted path), a log and GCRA cells, with
/// random subsets, costs and clock steps.
#[test]
fn multi_rule_decisions_match_the_model() {
    use crate::algorithm::TestRng;
    let quotas = [
        Quota::per_second(20).tokens(),
        Quota::new(7, Duration::from_millis(700)),
        Quota::per_second(50).sliding_window_log(),
        Quota::per_second(30).gcra().burst(10),
        Quota::new(u64::MAX / 3, Duration::from_nanos(u64::MAX / 5)),
    ];
    let keys: Vec<BucketKey> = (0..quotas.len())
        .map(|i| BucketKey::new(format!("r{i}"), "u"))
        .collect();
    for seed in 0..30 {
        let mut rng = TestRng::new(seed);
        let clock = ManualClock::new();
        let s = MemoryStore::builder()
            .clock(clock.clone())
            .sweep_interval(Duration::from_secs(3_600))
            .build();
        let mut model: Vec<State> = quotas.iter().map(|q| State::new(q.algorithm())).collect();
        for step in 0..300 {
            clock.advance(Duration::from_nanos(rng.below(80_000_000)));
            let now = clock.now_nanos();
            // 2-4 distinct buckets, in a random order.
            let mut picked: Vec<usize> = (0..quotas.len()).collect();
            for i in (1..picked.len()).rev() {
                picked.swap(i, rng.below(i as u64 + 1) as usize);
            }
            picked.truncate(2 + rng.below(3) as usize);
            let costs: Vec<u64> = picked
                .iter()
                .map(|_| match rng.below(5) {
                    0 => 0,
                    1 => rng.below(12),
                    _ => 1,
                })
                .collect();
            let charges: Vec<Charge<'_>> = picked
                .iter()
                .zip(&costs)
                .map(|(&b, &cost)| Charge::new(&keys[b], &quotas[b], cost))
                .collect();
            let d = s.try_acquire(&charges).unwrap();

            let verdicts: Vec<Verdict> = picked
                .iter()
                .zip(&costs)
                .map(|(&b, &cost)| model[b].check(&quotas[b].limits(), now, cost))
                .collect();
            let admitted = verdicts.iter().all(|v| *v == Verdict::Allow);
            let why = format!("seed {seed} step {step} buckets {picked:?} costs {costs:?}");
            assert_eq!(d.is_admitted(), admitted, "{why}: {d:?}");
            for (j, (&b, &cost)) in picked.iter().zip(&costs).enumerate() {
                let l = quotas[b].limits();
                let placement = if admitted {
                    model[b].charge(&l, now, cost)
                } else {
                    Placement::default()
                };
                let snapshot = model[b].peek(&l, now);
                assert_eq!(d.charges[j].snapshot, snapshot, "{why}: charge {j}");
                if admitted {
                    assert_eq!(d.charges[j].placement, placement, "{why}: charge {j}");
                }
            }
            if let Some(denial) = d.denial {
                let wait = |v: &Verdict| match v {
                    Verdict::Deny { retry_after } => Some(*retry_after),
                    Verdict::Allow => None,
                };
                let longest = verdicts
                    .iter()
                    .filter_map(wait)
                    .max_by_key(|r| r.map_or(u64::MAX, |n| n.saturating_add(0)))
                    .expect("a denial has a denying charge");
                assert_eq!(
                    wait(&verdicts[denial.index]),
                    Some(longest),
                    "{why}: the denial names a charge with the longest wait"
                );
                assert_eq!(
                    denial.retry_after,
                    longest.map(Duration::from_nanos),
                    "{why}"
                );
            }
        }
    }
}

/// Issue 12's sequence through the store, single-rule (the prepared path) and with a second
/// rule in the same request (the held path): a refund of a charge that has drained gives
/// nothing back, so the third request is denied.
#[test]
fn gcra_refunds_only_what_has_not_drained() {
    let q = Quota::per_minute(100).tokens().gcra();
    let rpm = Quota::per_minute(1_000);
    for with_second_rule in [false, true] {
        let (s, clock) = store(100);
        let k = BucketKey::new("tpm", "u");
        let r = BucketKey::new("rpm", "u");
        let acquire = |amount: u64| {
            let mut charges = vec![Charge::new(&k, &q, amount)];
            if with_second_rule {
                charges.push(Charge::new(&r, &rpm, 1));
            }
            s.try_acquire(&charges).unwrap()
        };
        let a = acquire(50);
        clock.advance(Duration::from_secs(30));
        assert!(acquire(100).is_admitted());
        clock.advance(Duration::from_secs(1));
        s.settle(&[Adjustment {
            bucket: &k,
            quota: &q,
            placement: a.charges[0].placement,
            charged: 50,
            actual: 0,
        }])
        .now()
        .unwrap()
        .unwrap();
        let c = acquire(50);
        assert!(!c.is_admitted(), "second rule: {with_second_rule}");
        assert_eq!(c.charges[0].snapshot.remaining, 1);
    }
}
