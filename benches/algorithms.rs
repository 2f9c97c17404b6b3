//! Per-decision cost of [`MemoryStore::try_acquire`] (the synchronous path behind
//! `Store::acquire` that the layer uses) for each algorithm, next to the peer `governor` keyed
//! keyed limiter (a `DashMap` like ours). Both maps hash with the hasher our store uses
//! (foldhash, seeded per map), so the two sides differ only in what they do per decision;
//! `hot_key` adds governor with its default hasher (std's SipHash) for reference.
//!
//! ```text
//! cargo bench --bench algorithms
//! ```
//!
//! Groups (one `BenchmarkId` per variant, `memory_store/<algorithm>` or `governor/<method>`):
//!
//! - `hot_key`: one key, cost 1;
//! - `hot_key_fixed_clock`: the same with both clocks standing still (no clock cost);
//! - `1m_keys`: 1,000,000 distinct keys, pre-populated, visited round-robin, cost 1;
//! - `weighted`: one key, a 1,000,000 tokens/minute rule charged 37 tokens per call;
//! - `multi_charge_3_rules`: one request charging three rules at once (all-or-nothing path);
//! - `clock`: what reading each clock costs on its own, to read the groups above.
//!
//! Every decision measured is admitted: the work timed is the real charge path, never the
//! cheaper always-deny path (limits and clocks are chosen so, and each benchmark asserts an
//! admitted decision outside the timed loop).
//!
//! Keys: [`BucketKey`] values are built up front. The layer builds one per rule per request
//! (an `Arc` clone of the rule name; a key of up to 22 bytes is stored inline, a longer one
//! takes one small allocation), but governor's keys are pre-built too, so both sides are
//! timed on the decision alone. Governor is keyed by the same `BucketKey` type so both sides
//! hash the same bytes with the same (keyed) hasher.
//!
//! Answers: ours returns a `Decision` (the verdict and each rule's remaining and reset, for
//! the rate-limit headers); governor's `check_key` a `Result<(), NotUntil>`. `hot_key` also
//! times governor with its `StateInformationMiddleware` (`check_key_with_state`, the
//! remaining capacity read from its snapshot): what governor does to answer with headers.
//!
//! Idle sweeps: the store's amortised sweep is pushed out to one hour (`sweep_interval`). It is
//! not per-decision work, and governor's equivalent (`retain_recent`) only runs when called.

use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion};
use foldhash::quality::RandomState;
use governor::clock::{Clock as _, DefaultClock, FakeRelativeClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{DefaultKeyedRateLimiter, Quota as GovernorQuota, RateLimiter};
use tower_llm_ratelimit::clock::{Clock, ManualClock, SystemClock};
use tower_llm_ratelimit::store::{BucketKey, Charge, MemoryStore};
use tower_llm_ratelimit::Quota;

type Group<'a> = BenchmarkGroup<'a, criterion::measurement::WallTime>;

/// Distinct keys in the `1m_keys` group.
const KEYS: usize = 1_000_000;

/// "Unlimited" for cost-1 comparisons with governor: governor's largest burst (`u32::MAX`)
/// per minute. Governor refills one cell every 13 ns; ours, as GCRA, one unit every 14 ns
/// (rounded up). With a real clock the run never gets near the bucket's bottom, so every
/// decision is admitted and does the full charge.
const HUGE: u32 = u32::MAX;

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).expect("non-zero")
}

/// Our quota for `algorithm`, cost-1 groups: `HUGE` per minute.
///
/// The sliding window log keeps one entry per distinct instant in its window. Driven by the
/// real clock at millions of decisions a second, a 60 s window would hold ~10^8 entries by
/// the end of the run, so the log gets a 10 ms window instead: its steady state is the
/// realistic one (each decision pushes one entry and prunes the expired ones), with a bounded
/// log (hot key) and at most one live entry per key (1M keys, where each key comes back every
/// ~0.5 s). The limit is still never reached.
fn huge_quota(algorithm: &str) -> Quota {
    let per_minute = Quota::per_minute(u64::from(HUGE));
    match algorithm {
        "sliding_window_counter" => per_minute.sliding_window_counter(),
        "sliding_window_log" => {
            Quota::new(u64::from(HUGE), Duration::from_millis(10)).sliding_window_log()
        }
        "gcra" => per_minute.gcra(),
        other => unreachable!("{other}"),
    }
}

const ALGORITHMS: [&str; 3] = ["sliding_window_counter", "sliding_window_log", "gcra"];

/// A store reading `clock`, big enough for the 1M-key group, that never sweeps during a run.
fn store(clock: impl Clock) -> MemoryStore {
    MemoryStore::builder()
        .clock(clock)
        .max_keys(2 * KEYS)
        .sweep_interval(Duration::from_secs(3600))
        .build()
}

/// One decision through the store, asserting it was admitted (outside the timed loop).
fn assert_admitted(store: &MemoryStore, charges: &[Charge<'_>]) {
    let d = store.try_acquire(charges).expect("store error");
    assert!(d.is_admitted(), "benchmark decision denied: {d:?}");
}

/// Governor keyed like our store: a `DashMap` hashed with foldhash.
type GovernorKeyed<C = DefaultClock> = RateLimiter<
    BucketKey,
    DashMapStateStore<BucketKey, RandomState>,
    C,
    governor::middleware::NoOpMiddleware<<C as governor::clock::Clock>::Instant>,
>;

fn governor_keyed(quota: GovernorQuota) -> GovernorKeyed {
    RateLimiter::dashmap_with_hasher(quota, RandomState::default())
}

/// (a) One hot key, cost 1. Clocks: our [`SystemClock`] (the store's default, what the layer
/// runs with) against governor's default clock (quanta); see the `clock` group for what each
/// read costs.
fn hot_key(c: &mut Criterion) {
    let mut g = c.benchmark_group("hot_key");
    configure(&mut g);
    let key = BucketKey::new("rpm", "user-42");
    for algorithm in ALGORITHMS {
        let s = store(SystemClock::new());
        let quota = huge_quota(algorithm);
        let charges = [Charge::new(&key, &quota, 1)];
        assert_admitted(&s, &charges);
        g.bench_function(BenchmarkId::new("memory_store", algorithm), |b| {
            b.iter(|| s.try_acquire(black_box(&charges)))
        });
        assert_admitted(&s, &charges);
    }

    let gov = governor_keyed(GovernorQuota::per_minute(nz(HUGE)));
    assert!(gov.check_key(&key).is_ok());
    g.bench_function(BenchmarkId::new("governor", "check_key"), |b| {
        b.iter(|| gov.check_key(black_box(&key)))
    });
    let one = nz(1);
    g.bench_function(BenchmarkId::new("governor", "check_key_n"), |b| {
        b.iter(|| gov.check_key_n(black_box(&key), black_box(one)))
    });
    assert!(gov.check_key(&key).is_ok());
    // With the state a `RateLimit`/`x-ratelimit-remaining` header needs (what tower_governor
    // runs with its headers on): the peer of our answer, which carries remaining and reset.
    let with_state = governor_keyed(GovernorQuota::per_minute(nz(HUGE)))
        .with_middleware::<StateInformationMiddleware>();
    g.bench_function(BenchmarkId::new("governor", "check_key_with_state"), |b| {
        b.iter(|| {
            with_state
                .check_key(black_box(&key))
                .map(|s| s.remaining_burst_capacity())
        })
    });
    assert!(with_state.check_key(&key).is_ok());
    let siphash: DefaultKeyedRateLimiter<BucketKey> =
        RateLimiter::keyed(GovernorQuota::per_minute(nz(HUGE)));
    g.bench_function(BenchmarkId::new("governor_siphash", "check_key"), |b| {
        b.iter(|| siphash.check_key(black_box(&key)))
    });
    g.finish();
}

/// (a') `hot_key` with the clocks taken out: ours on a [`ManualClock`], governor on its
/// [`FakeRelativeClock`], both standing still (a plain atomic load per read on each side), so
/// what remains is the map, the lock and the algorithm. Still admitted throughout: at a fixed
/// instant the huge limit takes ~4 x 10^9 decisions to exhaust. The sliding window log is left
/// out: at one instant all its charges merge into one entry, which is not its real path.
fn hot_key_fixed_clock(c: &mut Criterion) {
    let mut g = c.benchmark_group("hot_key_fixed_clock");
    configure(&mut g);
    let key = BucketKey::new("rpm", "user-42");
    for algorithm in ["sliding_window_counter", "gcra"] {
        let s = store(ManualClock::new());
        let quota = huge_quota(algorithm);
        let charges = [Charge::new(&key, &quota, 1)];
        g.bench_function(BenchmarkId::new("memory_store", algorithm), |b| {
            b.iter(|| s.try_acquire(black_box(&charges)))
        });
        assert_admitted(&s, &charges);
    }

    let gov: GovernorKeyed<FakeRelativeClock> = RateLimiter::dashmap_with_clock_and_hasher(
        GovernorQuota::per_minute(nz(HUGE)),
        FakeRelativeClock::default(),
        RandomState::default(),
    );
    g.bench_function(BenchmarkId::new("governor", "check_key"), |b| {
        b.iter(|| gov.check_key(black_box(&key)))
    });
    let one = nz(1);
    g.bench_function(BenchmarkId::new("governor", "check_key_n"), |b| {
        b.iter(|| gov.check_key_n(black_box(&key), black_box(one)))
    });
    assert!(gov.check_key(&key).is_ok());
    g.finish();
}

/// (b) 1,000,000 distinct keys, pre-populated, visited round-robin (each decision misses the
/// caches the way a large key space does), cost 1. Same clocks as `hot_key`. Each limiter is
/// populated when its benchmark starts (so a filtered run skips it) and dropped when it ends:
/// at most one 1M-key map is alive at a time.
fn many_keys(c: &mut Criterion) {
    let mut g = c.benchmark_group("1m_keys");
    configure(&mut g);
    let rule: Arc<str> = "rpm".into();
    let keys: Vec<BucketKey> = (0..KEYS)
        .map(|i| BucketKey::new(rule.clone(), format!("user-{i:07}")))
        .collect();
    let next = |i: &mut usize| {
        let k = &keys[*i];
        *i = if *i + 1 == KEYS { 0 } else { *i + 1 };
        k
    };

    for algorithm in ALGORITHMS {
        let quota = huge_quota(algorithm);
        let mut populated = None;
        let mut i = 0;
        g.bench_function(BenchmarkId::new("memory_store", algorithm), |b| {
            let s = populated.get_or_insert_with(|| {
                let s = store(SystemClock::new());
                for k in &keys {
                    assert_admitted(&s, &[Charge::new(k, &quota, 1)]);
                }
                s
            });
            b.iter(|| s.try_acquire(&[Charge::new(next(&mut i), &quota, 1)]))
        });
        if let Some(s) = populated {
            assert_admitted(&s, &[Charge::new(next(&mut i), &quota, 1)]);
            assert_eq!(
                s.len(),
                KEYS,
                "no bucket was created or evicted while measuring"
            );
        }
    }

    let mut populated = None;
    let mut populate = || {
        populated
            .get_or_insert_with(|| {
                let gov = governor_keyed(GovernorQuota::per_minute(nz(HUGE)));
                for k in &keys {
                    assert!(gov.check_key(k).is_ok());
                }
                Arc::new(gov)
            })
            .clone()
    };
    let mut i = 0;
    g.bench_function(BenchmarkId::new("governor", "check_key"), |b| {
        let gov = populate();
        b.iter(|| gov.check_key(next(&mut i)))
    });
    let one = nz(1);
    g.bench_function(BenchmarkId::new("governor", "check_key_n"), |b| {
        let gov = populate();
        b.iter(|| gov.check_key_n(next(&mut i), black_box(one)))
    });
    if let Some(gov) = populated {
        assert!(gov.check_key(next(&mut i)).is_ok());
        assert_eq!(gov.len(), KEYS);
    }
    g.finish();
}

/// Weighted-cost group: 1,000,000 tokens per minute, 37 tokens per call.
const TPM: u32 = 1_000_000;
const COST: u32 = 37;
/// Simulated time between two calls: twice what 37 tokens take to refill (2.22 ms), so the
/// rule runs at half its capacity and every decision is admitted.
const STEP: Duration = Duration::from_micros(4_440);

/// (c) Weighted cost, hot key: a real token rule (1,000,000 tokens/minute, 37 tokens a call),
/// so the clock must be simulated: ours runs on a [`ManualClock`], governor on its
/// [`FakeRelativeClock`], each advanced by [`STEP`] inside the timed loop (one atomic
/// read-modify-write on both sides, ~the cost of a clock read; see the `clock` group).
fn weighted(c: &mut Criterion) {
    let mut g = c.benchmark_group("weighted");
    configure(&mut g);
    let key = BucketKey::new("tpm", "user-42");
    for algorithm in ALGORITHMS {
        let clock = ManualClock::new();
        let s = store(clock.clone());
        let quota = Quota::per_minute(u64::from(TPM)).tokens();
        let quota = match algorithm {
            "sliding_window_counter" => quota.sliding_window_counter(),
            "sliding_window_log" => quota.sliding_window_log(),
            _ => quota.gcra(),
        };
        let charges = [Charge::new(&key, &quota, u64::from(COST))];
        g.bench_function(BenchmarkId::new("memory_store", algorithm), |b| {
            b.iter(|| {
                clock.advance(STEP);
                s.try_acquire(black_box(&charges))
            })
        });
        clock.advance(STEP);
        assert_admitted(&s, &charges);
    }

    let clock = FakeRelativeClock::default();
    let gov: GovernorKeyed<FakeRelativeClock> = RateLimiter::dashmap_with_clock_and_hasher(
        GovernorQuota::per_minute(nz(TPM)),
        clock.clone(),
        RandomState::default(),
    );
    let n = nz(COST);
    g.bench_function(BenchmarkId::new("governor", "check_key_n"), |b| {
        b.iter(|| {
            clock.advance(STEP);
            gov.check_key_n(black_box(&key), black_box(n))
        })
    });
    clock.advance(STEP);
    assert!(matches!(gov.check_key_n(&key, n), Ok(Ok(_))));
    g.finish();
}

/// (d) One request charging three rules of the same algorithm at once (per-user requests,
/// per-user tokens, per-model tokens): the all-or-nothing multi-bucket path. Real clocks and
/// huge limits, as in `hot_key`. Governor has no all-or-nothing check; three sequential
/// `check_key`/`check_key_n` calls on three limiters are shown as a lower bound, not an
/// equivalent.
fn multi_charge(c: &mut Criterion) {
    let mut g = c.benchmark_group("multi_charge_3_rules");
    configure(&mut g);
    let user_rpm = BucketKey::new("user-rpm", "user-42");
    let user_tpm = BucketKey::new("user-tpm", "user-42");
    let model_tpm = BucketKey::new("model-tpm", "gpt-4o");
    for algorithm in ALGORITHMS {
        let s = store(SystemClock::new());
        let rpm = huge_quota(algorithm);
        let tpm = rpm.tokens();
        let charges = [
            Charge::new(&user_rpm, &rpm, 1),
            Charge::new(&user_tpm, &tpm, u64::from(COST)),
            Charge::new(&model_tpm, &tpm, u64::from(COST)),
        ];
        assert_admitted(&s, &charges);
        g.bench_function(BenchmarkId::new("memory_store", algorithm), |b| {
            b.iter(|| s.try_acquire(black_box(&charges)))
        });
        assert_admitted(&s, &charges);
    }

    let rpm = governor_keyed(GovernorQuota::per_minute(nz(HUGE)));
    let tpm = governor_keyed(GovernorQuota::per_minute(nz(HUGE)));
    let model = governor_keyed(GovernorQuota::per_minute(nz(HUGE)));
    let n = nz(COST);
    g.bench_function(BenchmarkId::new("governor", "3_sequential_checks"), |b| {
        b.iter(|| {
            rpm.check_key(black_box(&user_rpm)).is_ok()
                && matches!(tpm.check_key_n(black_box(&user_tpm), n), Ok(Ok(_)))
                && matches!(model.check_key_n(black_box(&model_tpm), n), Ok(Ok(_)))
        })
    });
    g.finish();
}

/// What one clock read costs: our clocks, and governor's.
fn clocks(c: &mut Criterion) {
    let mut g = c.benchmark_group("clock");
    configure(&mut g);
    g.measurement_time(Duration::from_secs(1));
    let system: Arc<dyn Clock> = Arc::new(SystemClock::new());
    g.bench_function("system_clock_now", |b| {
        b.iter(|| black_box(&system).now_nanos())
    });
    let manual = ManualClock::new();
    g.bench_function("manual_clock_advance_and_now", |b| {
        b.iter(|| {
            manual.advance(STEP);
            black_box(&manual).now_nanos()
        })
    });
    let quanta = DefaultClock::default();
    g.bench_function("governor_default_clock_now", |b| {
        b.iter(|| black_box(&quanta).now())
    });
    let fake = FakeRelativeClock::default();
    g.bench_function("governor_fake_clock_advance_and_now", |b| {
        b.iter(|| {
            fake.advance(STEP);
            black_box(&fake).now()
        })
    });
    g.finish();
}

/// Short runs: the whole bench takes about two and a half minutes on 2 cores.
fn configure(g: &mut Group<'_>) {
    g.warm_up_time(Duration::from_millis(700))
        .measurement_time(Duration::from_secs(3))
        .sample_size(40);
}

criterion_group!(
    benches,
    hot_key,
    hot_key_fixed_clock,
    many_keys,
    weighted,
    multi_charge,
    clocks
);
criterion_main!(benches);
