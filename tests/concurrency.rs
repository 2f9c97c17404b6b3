//! Many threads and many tasks on one key, with the clock frozen: exactly the limit is
//! admitted, never more, for every algorithm and for multi-rule requests.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use tower::{Service, ServiceExt};
use tower_llm_ratelimit::clock::ManualClock;
use tower_llm_ratelimit::cost::TokenEstimate;
use tower_llm_ratelimit::store::{BucketKey, Charge, MemoryStore};
use tower_llm_ratelimit::{cost, key, Algorithm, Quota, RateLimitLayer, RequestBody, Rule};

const ALGORITHMS: [Algorithm; 3] = [
    Algorithm::SlidingWindowCounter,
    Algorithm::SlidingWindowLog,
    Algorithm::Gcra,
];

#[test]
fn threads_on_one_key_admit_exactly_the_limit() {
    for alg in ALGORITHMS {
        let store = MemoryStore::builder().clock(ManualClock::new()).build();
        let quota = Quota::per_minute(5_000).using(alg);
        let admitted = Arc::new(AtomicU64::new(0));
        std::thread::scope(|s| {
            for _ in 0..16 {
                let (store, admitted) = (store.clone(), admitted.clone());
                s.spawn(move || {
                    let bucket = BucketKey::new("r", "hot");
                    for _ in 0..1_000 {
                        let d = store
                            .try_acquire(&[Charge::new(&bucket, &quota, 1)])
                            .unwrap();
                        if d.is_admitted() {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.load(Ordering::Relaxed), 5_000, "{alg:?}");
    }
}

/// GCRA buckets are updated without a lock by single-rule requests and held by multi-rule
/// ones: both kinds on one hot key, with sweeps running, still admit exactly the burst.
#[test]
fn lock_free_and_held_gcra_charges_on_one_key_admit_exactly_the_limit() {
    let store = MemoryStore::builder().clock(ManualClock::new()).build();
    let hot = Quota::per_minute(5_000).gcra();
    let per_thread = Quota::per_minute(1_000_000);
    let admitted = Arc::new(AtomicU64::new(0));
    std::thread::scope(|s| {
        for t in 0..16u64 {
            let (store, admitted) = (store.clone(), admitted.clone());
            s.spawn(move || {
                let bucket = BucketKey::new("hot", "k");
                let own = BucketKey::new("own", format!("t{t}"));
                for i in 0..1_000u64 {
                    let d = if (t + i) % 2 == 0 {
                        store.try_acquire(&[Charge::new(&bucket, &hot, 1)])
                    } else {
                        // Both orders, so the bucket is held first or second.
                        let (a, b) = (
                            Charge::new(&own, &per_thread, 1),
                            Charge::new(&bucket, &hot, 1),
                        );
                        if t % 4 < 2 {
                            store.try_acquire(&[a, b])
                        } else {
                            store.try_acquire(&[b, a])
                        }
                    };
                    if d.unwrap().is_admitted() {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        let store = store.clone();
        s.spawn(move || {
            for _ in 0..2_000 {
                store.sweep();
            }
        });
    });
    assert_eq!(admitted.load(Ordering::Relaxed), 5_000);
}

#[test]
fn threads_with_weighted_multi_rule_requests_never_overshoot() {
    for alg in ALGORITHMS {
        let store = MemoryStore::builder().clock(ManualClock::new()).build();
        let rpm = Quota::per_minute(300).using(alg);
        let tpm = Quota::per_minute(10_000).tokens().using(alg);
        let (req_ok, tok_ok) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let (store, req_ok, tok_ok) = (store.clone(), req_ok.clone(), tok_ok.clone());
                s.spawn(move || {
                    // Each thread is one user sharing a global TPM bucket with the others.
                    let user = BucketKey::new("user-rpm", format!("u{t}"));
                    let model = BucketKey::new("model-tpm", "gpt");
                    for i in 0..500u64 {
                        let tokens = 1 + (i * 7 + t) % 97;
                        let charges = [
                            Charge::new(&user, &rpm, 1),
                            Charge::new(&model, &tpm, tokens),
                        ];
                        if store.try_acquire(&charges).unwrap().is_admitted() {
                            req_ok.fetch_add(1, Ordering::Relaxed);
                            tok_ok.fetch_add(tokens, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert!(tok_ok.load(Ordering::Relaxed) <= 10_000, "{alg:?}");
        assert!(req_ok.load(Ordering::Relaxed) <= 8 * 300, "{alg:?}");
        // The token rule was the binding one: it is (nearly) full, not under-used.
        assert!(tok_ok.load(Ordering::Relaxed) > 10_000 - 97, "{alg:?}");
    }
}

async fn ok(_: Request<RequestBody<String>>) -> Result<Response<String>, Infallible> {
    Ok(Response::new(String::new()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tasks_through_the_layer_admit_exactly_the_limit() {
    for alg in ALGORITHMS {
        let layer = RateLimitLayer::builder()
            .rule(Rule::new(
                "global",
                key::global(),
                Quota::per_minute(1_000).using(alg),
            ))
            .store(MemoryStore::builder().clock(ManualClock::new()).build())
            .build()
            .unwrap();
        let svc = tower::ServiceBuilder::new()
            .layer(layer)
            .service(tower::service_fn(ok));
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let svc = svc.clone();
            tasks.push(tokio::spawn(async move {
                let mut admitted = 0;
                for _ in 0..40 {
                    let res = svc
                        .clone()
                        .oneshot(Request::new(String::new()))
                        .await
                        .unwrap();
                    if res.status() == StatusCode::OK {
                        admitted += 1;
                    }
                }
                admitted
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .unwrap()
                .unwrap();
        }
        assert_eq!(total, 1_000, "{alg:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_token_requests_fit_ten() {
    // 50 concurrent requests estimating 1,000 tokens each against 10,000 TPM: 10 admitted.
    let layer = RateLimitLayer::builder()
        .rule(Rule::new(
            "tpm",
            key::global(),
            Quota::per_minute(10_000).tokens(),
        ))
        .cost(cost::extension())
        .store(MemoryStore::builder().clock(ManualClock::new()).build())
        .build()
        .unwrap();
    let mut svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(tower::service_fn(ok));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let mut req = Request::new(String::new());
        req.extensions_mut().insert(TokenEstimate(1_000));
        let fut = svc.ready().await.unwrap().call(req);
        tasks.push(tokio::spawn(fut));
    }
    let mut admitted = 0;
    for t in tasks {
        let res = tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if res.status() == StatusCode::OK {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 10);
}

/// A concurrency slot comes back on every path: a panic in the inner service, a request
/// cancelled before its response, a response body dropped unread.
#[tokio::test]
async fn concurrency_slots_are_released_on_panic_and_cancellation() {
    use tower_llm_ratelimit::key::RequestView;

    let layer = RateLimitLayer::builder()
        .rule(Rule::new("inflight", key::global(), Quota::concurrent(1)))
        .build()
        .unwrap();
    let in_flight = |layer: RateLimitLayer| async move {
        let req = Request::new(());
        let status = layer.status(RequestView::from_request(&req)).await.unwrap();
        1 - status[0].snapshot.unwrap().remaining
    };

    // A panic inside the inner service.
    let panicking = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(tower::service_fn(
            |_: Request<RequestBody<String>>| async move {
                if true {
                    panic!("inner service panicked");
                }
                Ok::<_, Infallible>(Response::new(String::new()))
            },
        ));
    let joined = tokio::spawn(panicking.oneshot(Request::new(String::new()))).await;
    assert!(joined.unwrap_err().is_panic());
    assert_eq!(in_flight(layer.clone()).await, 0);

    // A request cancelled while the inner service works.
    let never = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(tower::service_fn(|_: Request<RequestBody<String>>| {
            std::future::pending::<Result<Response<String>, Infallible>>()
        }));
    let task = tokio::spawn(never.oneshot(Request::new(String::new())));
    tokio::task::yield_now().await;
    assert_eq!(
        in_flight(layer.clone()).await,
        1,
        "the slot is held meanwhile"
    );
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert_eq!(in_flight(layer.clone()).await, 0);

    // A response whose body is dropped without being read.
    let ok_svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(tower::service_fn(ok));
    let res = ok_svc.oneshot(Request::new(String::new())).await.unwrap();
    assert_eq!(in_flight(layer.clone()).await, 1);
    drop(res);
    assert_eq!(in_flight(layer).await, 0);
}

/// Multi-rule requests hold their buckets in their shards' read locks while other threads
/// write to the map: new keys inserted, idle buckets swept (by the store itself and by hand)
/// as the clock moves, a rule name switching algorithms (its bucket replaced). Nothing
/// deadlocks (the run is bounded), and the shared bucket admits exactly its limit.
#[test]
fn multi_rule_decisions_with_concurrent_inserts_sweeps_and_evictions() {
    const LIMIT: u64 = 3_000;
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        let clock = ManualClock::new();
        let store = MemoryStore::builder()
            .clock(clock.clone())
            .sweep_interval(Duration::from_secs(1))
            .build();
        // A day: the clock moves minutes, so this window never rolls over.
        let global = Quota::per_day(LIMIT);
        let global_log = Quota::per_day(1_000_000).sliding_window_log();
        let admitted = Arc::new(AtomicU64::new(0));
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let (store, admitted) = (store.clone(), admitted.clone());
                s.spawn(move || {
                    let user_quota =
                        Quota::per_minute(1_000_000_000).using(ALGORITHMS[t as usize % 3]);
                    let flip_quota = Quota::per_minute(1_000_000_000).using(if t % 2 == 0 {
                        Algorithm::Gcra
                    } else {
                        Algorithm::SlidingWindowCounter
                    });
                    let g = BucketKey::new("global", "all");
                    let gl = BucketKey::new("global-log", "all");
                    let flip = BucketKey::new("flip", "k");
                    for i in 0..1_000u64 {
                        // A new key every few requests: inserts under the other threads' reads.
                        let user = BucketKey::new("user", format!("u{t}-{}", i / 4));
                        let u = Charge::new(&user, &user_quota, 1);
                        let charges: Vec<Charge<'_>> = match i % 4 {
                            0 => vec![u, Charge::new(&g, &global, 1)],
                            1 => vec![
                                Charge::new(&g, &global, 1),
                                u,
                                Charge::new(&gl, &global_log, 1),
                            ],
                            2 => vec![
                                u,
                                Charge::new(&flip, &flip_quota, 1),
                                Charge::new(&g, &global, 1),
                            ],
                            _ => vec![
                                Charge::new(&flip, &flip_quota, 1),
                                Charge::new(&g, &global, 1),
                            ],
                        };
                        if store.try_acquire(&charges).unwrap().is_admitted() {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
            let sweeper = store.clone();
            s.spawn(move || {
                for _ in 0..500 {
                    sweeper.sweep();
                }
            });
            s.spawn(move || {
                // Past a minute, the user buckets go idle and sweeps remove them.
                for _ in 0..600 {
                    clock.advance(Duration::from_millis(500));
                    std::thread::yield_now();
                }
            });
        });
        done_tx.send(admitted.load(Ordering::Relaxed)).unwrap();
    });
    let admitted = done_rx
        .recv_timeout(Duration::from_secs(120))
        .expect("multi-rule decisions deadlocked (no answer within 120 s)");
    worker.join().unwrap();
    assert_eq!(admitted, LIMIT);
}

/// Many threads on a store far smaller than its key space, so that each new key evicts the
/// least recently used of a sample (another thread's, or its own), with single- and
/// multi-rule requests of every algorithm and sweeps. A bucket's admitted charges report what remains
/// after them: while it stays resident, L-1, L-2, ... each at most once, so over all its
/// lives a key reports each value no more often than the one before it (a lost update, two
/// charges counted as one, would report a value twice in one life). Bounded: a deadlock
/// fails the test in 120 s.
#[test]
fn threads_with_eviction_never_admit_more_than_the_limit_while_resident() {
    use std::collections::HashMap;
    use std::sync::Mutex;

    const LIMIT: u64 = 20;
    const KEYS: u64 = 200;
    const MAX_KEYS: usize = 64;
    type Reports = HashMap<(usize, u64), Vec<u64>>;
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        // The clock stands still: nothing refills, and a GCRA bucket's `remaining` counts
        // its charges exactly (a decision that read the time before another's would report
        // one less). Every bucket was used at the same instant: eviction picks among them.
        let store = MemoryStore::builder()
            .clock(ManualClock::new())
            .max_keys(MAX_KEYS)
            .build();
        let quotas = ALGORITHMS.map(|alg| Quota::per_day(LIMIT).using(alg));
        let rules = ["counter", "log", "gcra"];
        let reports = Mutex::new(Reports::new());
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let (store, quotas, reports) = (store.clone(), &quotas, &reports);
                s.spawn(move || {
                    let mut mine = Reports::new();
                    let mut x = (t + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                    for i in 0..2_000u64 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let (r1, k1) = ((i % 3) as usize, x % KEYS);
                        let (r2, k2) = (((i + 1) % 3) as usize, (x >> 20) % KEYS);
                        let b1 = BucketKey::new(rules[r1], format!("k{k1}"));
                        let b2 = BucketKey::new(rules[r2], format!("k{k2}"));
                        let mut charges = vec![Charge::new(&b1, &quotas[r1], 1)];
                        if i % 2 == 0 {
                            charges.push(Charge::new(&b2, &quotas[r2], 1));
                        }
                        let d = store.try_acquire(&charges).unwrap();
                        if d.is_admitted() {
                            let ids = [(r1, k1), (r2, k2)];
                            for (id, state) in ids.iter().zip(d.charges.iter()) {
                                mine.entry(*id).or_default().push(state.snapshot.remaining);
                            }
                        }
                    }
                    let mut all = reports.lock().unwrap();
                    for (id, values) in mine {
                        all.entry(id).or_default().extend(values);
                    }
                });
            }
            let sweeper = store.clone();
            s.spawn(move || {
                for _ in 0..200 {
                    sweeper.sweep();
                    std::thread::yield_now();
                }
            });
        });
        assert!(store.len() <= MAX_KEYS, "{} buckets", store.len());
        done_tx.send(reports.into_inner().unwrap()).unwrap();
    });
    let reports = done_rx
        .recv_timeout(Duration::from_secs(120))
        .expect("decisions with eviction deadlocked (no answer within 120 s)");
    worker.join().unwrap();
    let mut lives = 0;
    for (id, values) in &reports {
        let mut count = [0u64; LIMIT as usize];
        for &v in values {
            assert!(v < LIMIT, "{id:?} reported {v} remaining");
            count[v as usize] += 1;
        }
        // count[LIMIT - 1] lives started; each reached some depth without repeating one.
        for v in 0..LIMIT as usize - 1 {
            assert!(
                count[v] <= count[v + 1],
                "{id:?}: {} charges left {v} but {} left {}: {values:?}",
                count[v],
                count[v + 1],
                v + 1
            );
        }
        lives += count[LIMIT as usize - 1];
    }
    assert!(
        lives > 2 * reports.len() as u64,
        "eviction was active: {lives} lives for {} buckets",
        reports.len()
    );
}

/// Calendar budgets under many threads while the wall clock crosses Dec 31 -> Jan 1 (a day
/// and a month end at once): weighted requests, some charging a daily and a monthly budget
/// together (the multi-rule path), others the daily budget alone. Every period of each
/// budget admits at most its limit, and is filled up to the last unit or two.
/// (Placements are period indexes: days since the epoch, months since 1970-01.)
#[test]
fn threads_across_midnight_never_overshoot_a_calendar_period() {
    use std::collections::HashMap;
    use std::sync::Mutex;

    const LIMIT: u64 = 3_000;
    // Smaller: the monthly budget fills first, from the requests charging both.
    const MONTHLY: u64 = 1_000;
    let clock = ManualClock::new();
    // 2027-12-31 23:59:59 UTC.
    clock.set_unix(Duration::from_secs(1_830_297_599));
    let store = MemoryStore::builder().clock(clock.clone()).build();
    let daily = Quota::per_calendar_day(LIMIT).tokens();
    let monthly = Quota::per_calendar_month(MONTHLY).tokens();
    let attempts = AtomicU64::new(0);
    // (rule, period index) -> units admitted.
    let landed: Mutex<HashMap<(&str, u64), u64>> = Mutex::new(HashMap::new());
    std::thread::scope(|s| {
        for t in 0..16u64 {
            let (store, clock, daily, monthly) = (store.clone(), clock.clone(), &daily, &monthly);
            let (attempts, landed) = (&attempts, &landed);
            s.spawn(move || {
                let (day, month) = (BucketKey::new("day", "u"), BucketKey::new("month", "u"));
                for i in 0..1_000u64 {
                    // The 4,000th attempt moves the wall clock past midnight.
                    if attempts.fetch_add(1, Ordering::Relaxed) == 4_000 {
                        clock.advance(Duration::from_secs(1));
                    }
                    let amount = 1 + (t + i) % 3;
                    let both = [
                        Charge::new(&day, daily, amount),
                        Charge::new(&month, monthly, amount),
                    ];
                    let charges = if i % 2 == 0 { &both[..] } else { &both[..1] };
                    let d = store.try_acquire(charges).unwrap();
                    if d.is_admitted() {
                        let mut landed = landed.lock().unwrap();
                        for (name, c) in ["day", "month"].into_iter().zip(d.charges.iter()) {
                            *landed.entry((name, c.placement.0)).or_default() += amount;
                        }
                    }
                }
            });
        }
    });
    let landed = landed.into_inner().unwrap();
    let (dec31, jan1) = (21_183, 21_184);
    let (dec, jan) = (57 * 12 + 11, 58 * 12);
    for (key, limit) in [
        (("day", dec31), LIMIT),
        (("day", jan1), LIMIT),
        (("month", dec), MONTHLY),
        (("month", jan), MONTHLY),
    ] {
        let n = landed.get(&key).copied().unwrap_or(0);
        assert!(
            (limit - 2..=limit).contains(&n),
            "{key:?}: {n} admitted, limit {limit} ({landed:?})"
        );
    }
    assert_eq!(landed.len(), 4, "{landed:?}");
}

/// An adaptive concurrency rule under 64 tasks whose upstream answers 503 to one request in
/// three and takes 100 ms (of a manual clock) each: its limit moves all the while, within
/// `[min, max]`, and the upstream never has more than `max` in flight. Then, the clock
/// stopped (the limit frozen where it went), 64 tasks holding their requests open get exactly
/// the limit admitted, and every slot comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adaptive_limits_never_overshoot_while_they_move() {
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;
    use tokio::sync::Semaphore;
    use tower_llm_ratelimit::capacity::Capacity;
    use tower_llm_ratelimit::key::RequestView;
    use tower_llm_ratelimit::observe::{CapacityEvent, DecisionEvent, Observer, Outcome};

    const MIN: u64 = 2;
    const MAX: u64 = 16;

    #[derive(Clone, Default)]
    struct Watch {
        out_of_bounds: Arc<AtomicU64>,
        changes: Arc<Mutex<Vec<u64>>>,
    }
    impl Observer for Watch {
        fn on_decision(&self, e: &DecisionEvent<'_>) {
            if e.outcome == Outcome::Admitted && !(MIN..=MAX).contains(&e.rules[0].limit) {
                self.out_of_bounds.fetch_add(1, Ordering::Relaxed);
            }
        }
        fn on_capacity(&self, e: &CapacityEvent<'_>) {
            self.changes.lock().unwrap().push(e.new);
        }
    }

    let clock = ManualClock::new();
    let watch = Watch::default();
    let layer = RateLimitLayer::builder()
        .rule(
            Rule::new("slots", key::global(), Quota::concurrent(MAX)).capacity(
                Capacity::adaptive(MIN, MAX)
                    .latency_target(Duration::from_millis(150))
                    .interval(Duration::from_millis(200)),
            ),
        )
        .clock(clock.clone())
        .observer(watch.clone())
        .build()
        .unwrap();
    let in_flight = Arc::new(AtomicU64::new(0));
    let peak = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(AtomicU64::new(0));
    let frozen = Arc::new(AtomicBool::new(false));
    let gate = Arc::new(Semaphore::new(0));
    let svc = {
        let (in_flight, peak, calls) = (in_flight.clone(), peak.clone(), calls.clone());
        let (frozen, gate) = (frozen.clone(), gate.clone());
        tower::ServiceBuilder::new()
            .layer(layer.clone())
            .service(tower::service_fn(move |_: Request<RequestBody<String>>| {
                let (in_flight, peak, calls, clock) = (
                    in_flight.clone(),
                    peak.clone(),
                    calls.clone(),
                    clock.clone(),
                );
                let (frozen, gate) = (frozen.clone(), gate.clone());
                async move {
                    let n = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(n, Ordering::SeqCst);
                    let mut res = Response::new(String::new());
                    if frozen.load(Ordering::SeqCst) {
                        gate.acquire().await.unwrap().forget();
                    } else {
                        tokio::task::yield_now().await;
                        clock.advance(Duration::from_millis(100));
                        if calls.fetch_add(1, Ordering::Relaxed) % 3 == 0 {
                            *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                        }
                    }
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    Ok::<_, Infallible>(res)
                }
            }))
    };
    let run = |requests: usize| {
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let svc = svc.clone();
            tasks.push(tokio::spawn(async move {
                let mut admitted = 0;
                for _ in 0..requests {
                    let res = svc
                        .clone()
                        .oneshot(Request::new(String::new()))
                        .await
                        .unwrap();
                    admitted += u64::from(res.status() != StatusCode::TOO_MANY_REQUESTS);
                    tokio::task::yield_now().await;
                }
                admitted
            }));
        }
        tasks
    };
    for t in run(50) {
        tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(watch.out_of_bounds.load(Ordering::Relaxed), 0);
    assert!(peak.load(Ordering::SeqCst) <= MAX);
    let changes = watch.changes.lock().unwrap().clone();
    assert!(changes.len() > 5, "the limit moved: {changes:?}");
    assert!(
        changes.iter().all(|l| (MIN..=MAX).contains(l)),
        "{changes:?}"
    );

    // Frozen: exactly the limit in force is admitted at once.
    let req = Request::new(());
    let limit = layer.status(RequestView::from_request(&req)).await.unwrap()[0]
        .quota
        .limit();
    frozen.store(true, Ordering::SeqCst);
    peak.store(0, Ordering::SeqCst);
    let tasks = run(1);
    tokio::time::timeout(Duration::from_secs(30), async {
        while in_flight.load(Ordering::SeqCst) < limit {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the limit's requests reach the upstream");
    gate.add_permits(64);
    let mut admitted = 0;
    for t in tasks {
        admitted += tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(peak.load(Ordering::SeqCst), limit);
    assert!(admitted >= limit, "{admitted} admitted, limit {limit}");
    let s = layer.status(RequestView::from_request(&req)).await.unwrap()[0]
        .snapshot
        .unwrap();
    assert_eq!(s.remaining, s.limit, "every slot came back");
}

/// Pro and free tasks on many threads against a capacity of 8 with tiers (saturation 4, pro
/// reserve 4, free reserve 2) and a queue that holds them all: the upstream never has more
/// than the capacity in flight, nor a tier more than the most its two attempts allow (the
/// threshold, or its reserve), every request is served, and every slot comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn capacity_tiers_and_queue_never_overshoot_under_many_tasks() {
    use tower_llm_ratelimit::capacity::{Capacity, Priority};
    use tower_llm_ratelimit::key::RequestView;
    use tower_llm_ratelimit::tier;

    let layer = RateLimitLayer::builder()
        .rule(
            Rule::new("slots", key::global(), Quota::concurrent(8)).capacity(
                Capacity::fixed(8)
                    .saturation(0.5)
                    .queue_len(64)
                    .tier(
                        "pro",
                        Priority::new(1)
                            .reserve(0.5)
                            .max_wait(Duration::from_secs(60)),
                    )
                    .tier(
                        "free",
                        Priority::new(0)
                            .reserve(0.25)
                            .max_wait(Duration::from_secs(60)),
                    ),
            ),
        )
        .tiers(tier::header("x-tier"))
        .build()
        .unwrap();
    // In flight: [total, pro, free]; the most seen.
    let now: Arc<[AtomicU64; 3]> = Arc::default();
    let peak: Arc<[AtomicU64; 3]> = Arc::default();
    let svc = {
        let (now, peak) = (now.clone(), peak.clone());
        tower::ServiceBuilder::new()
            .layer(layer.clone())
            .service(tower::service_fn(
                move |req: Request<RequestBody<String>>| {
                    let (now, peak) = (now.clone(), peak.clone());
                    let t = if req.headers()["x-tier"] == "pro" {
                        1
                    } else {
                        2
                    };
                    async move {
                        for i in [0, t] {
                            let n = now[i].fetch_add(1, Ordering::SeqCst) + 1;
                            peak[i].fetch_max(n, Ordering::SeqCst);
                        }
                        for _ in 0..3 {
                            tokio::task::yield_now().await;
                        }
                        for i in [0, t] {
                            now[i].fetch_sub(1, Ordering::SeqCst);
                        }
                        Ok::<_, Infallible>(Response::new(String::new()))
                    }
                },
            ))
    };
    let mut tasks = Vec::new();
    for n in 0..64 {
        let svc = svc.clone();
        let tier = if n % 2 == 0 { "pro" } else { "free" };
        tasks.push(tokio::spawn(async move {
            let mut admitted = 0u64;
            for _ in 0..20 {
                let req = Request::builder()
                    .header("x-tier", tier)
                    .body(String::new())
                    .unwrap();
                let res = svc.clone().oneshot(req).await.unwrap();
                admitted += u64::from(res.status() == StatusCode::OK);
            }
            admitted
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .unwrap()
            .unwrap();
    }
    let peaks: Vec<u64> = peak.iter().map(|p| p.load(Ordering::SeqCst)).collect();
    assert!(peaks[0] <= 8, "total in flight {peaks:?}");
    assert!(
        peaks[1] <= 4,
        "pro: at most max(threshold 4, reserve 4): {peaks:?}"
    );
    assert!(
        peaks[2] <= 4,
        "free: at most max(threshold 4, reserve 2): {peaks:?}"
    );
    // The queue holds every caller, and no release is lost: all are served in the end
    // (a lost wake-up would leave a waiter to its deadline, a minute, and a 429).
    assert_eq!(admitted, 64 * 20);
    let req = Request::new(());
    let s = layer.status(RequestView::from_request(&req)).await.unwrap()[0]
        .snapshot
        .unwrap();
    assert_eq!(s.remaining, s.limit, "every slot came back");
}
