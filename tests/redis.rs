//! The Redis store against real `redis-server` processes started by the test harness (a
//! single node, or a 3-primary cluster): through the layer, all or nothing, under
//! concurrency from several store instances, settlement, idempotency, key layout, cluster
//! slots, failures and recovery.
//!
//! Verdicts never depend on wall-clock time: stores take `now` from a frozen [`ManualClock`],
//! or use the server's clock with windows of an hour. Every wait is bounded.
#![cfg(feature = "redis")]

mod support;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use tower::ServiceExt;
use tower_llm_ratelimit::clock::ManualClock;
use tower_llm_ratelimit::store::{
    Adjustment, BucketKey, Charge, Decision, IdempotencyKey, RedisFailure, RedisStore, Snapshot,
    Store, StoreError,
};
use tower_llm_ratelimit::{
    key, Algorithm, FailurePolicy, Quota, RateLimitLayer, RequestBody, ResponseBody, Rule,
};

use support::redis::{RedisCluster, RedisServer};
use support::within;

const WINDOW_ALGORITHMS: [Algorithm; 3] = [
    Algorithm::SlidingWindowCounter,
    Algorithm::SlidingWindowLog,
    Algorithm::Gcra,
];

/// A clock frozen at 1,000 s (away from the edge effects of 0).
fn frozen_clock() -> ManualClock {
    let clock = ManualClock::new();
    clock.set(Duration::from_secs(1_000));
    clock
}

/// A fresh redis-server, a frozen clock and a store on it (prefix `rl`); `None` when no
/// `redis-server` binary is installed (the test then returns).
async fn started() -> Option<(RedisServer, ManualClock, RedisStore)> {
    let server = RedisServer::start()?;
    let clock = frozen_clock();
    let store = connect(server.url(), "rl", &clock).await;
    Some((server, clock, store))
}

/// A store on `url` taking `now` from `clock`, with a generous timeout: a loaded test
/// machine must not turn a slow answer into a failure (the fault test sets its own).
async fn connect(url: String, prefix: &str, clock: &ManualClock) -> RedisStore {
    within(
        "connecting to redis-server",
        RedisStore::builder(url)
            .prefix(prefix)
            .clock(clock.clone())
            .timeout(Duration::from_secs(5))
            .connect(),
    )
    .await
    .expect("connecting to the test redis-server")
}

async fn acquire(store: &impl Store, charges: &[Charge<'_>]) -> Decision {
    within("acquire", store.acquire(charges))
        .await
        .expect("acquire")
}

async fn peek(store: &impl Store, bucket: &BucketKey, quota: &Quota) -> Snapshot {
    within("peek", store.peek(bucket, quota))
        .await
        .expect("peek")
}

async fn settle(store: &impl Store, adjustments: &[Adjustment<'_>]) {
    within("settle", store.settle(adjustments))
        .await
        .expect("settle")
}

async fn ok(_: Request<RequestBody<String>>) -> Result<Response<String>, Infallible> {
    Ok(Response::new(String::new()))
}

/// A service answering 200 behind `layer`.
type App =
    tower::util::BoxCloneService<Request<String>, Response<ResponseBody<String>>, Infallible>;

fn app(layer: RateLimitLayer) -> App {
    tower::util::BoxCloneService::new(
        tower::ServiceBuilder::new()
            .layer(layer)
            .service(tower::service_fn(ok)),
    )
}

/// Sends `req` and returns the response (its body still held: a concurrency slot is released
/// when it is dropped).
fn send(
    svc: &App,
    req: Request<String>,
) -> impl std::future::Future<Output = Response<ResponseBody<String>>> + Send {
    let call = svc.clone().oneshot(req);
    async move { within("request through the layer", call).await.unwrap() }
}

fn request() -> Request<String> {
    Request::new(String::new())
}

#[tokio::test]
async fn smoke_every_algorithm() {
    let Some((_server, _clock, store)) = started().await else {
        return;
    };
    for alg in WINDOW_ALGORITHMS {
        let q = Quota::per_minute(3).using(alg);
        let b = BucketKey::new(format!("{alg:?}"), "k");
        let mut admitted = 0;
        for _ in 0..5 {
            if acquire(&store, &[Charge::new(&b, &q, 1)])
                .await
                .is_admitted()
            {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 3, "{alg:?}");
        assert_eq!(peek(&store, &b, &q).await.remaining, 0, "{alg:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_layer_n_plus_k_requests_admit_n() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    // The server's clock, as in production; windows of an hour make the verdicts timeless.
    let store = within(
        "connect",
        RedisStore::builder(server.url())
            .timeout(Duration::from_secs(5))
            .connect(),
    )
    .await
    .unwrap();
    let layer = RateLimitLayer::builder()
        .rule(Rule::new("global", key::global(), Quota::per_hour(5)))
        .store(store.clone())
        .build()
        .unwrap();
    let svc = app(layer);
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let res = send(&svc, request()).await;
        if res.status() == StatusCode::TOO_MANY_REQUESTS {
            assert!(res.headers().contains_key("retry-after"), "{res:?}");
        }
        statuses.push(res.status());
    }
    let admitted = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert_eq!(admitted, 5, "{statuses:?}");
    assert!(statuses[5..]
        .iter()
        .all(|s| *s == StatusCode::TOO_MANY_REQUESTS));

    // Concurrent requests through the layer: exactly the limit again.
    let layer = RateLimitLayer::builder()
        .rule(Rule::new(
            "global-concurrent",
            key::global(),
            Quota::per_hour(10),
        ))
        .store(store)
        .build()
        .unwrap();
    let svc = app(layer);
    let tasks: Vec<_> = (0..30)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move { send(&svc, request()).await.status() })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        if within("request task", t).await.unwrap() == StatusCode::OK {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 10);
}

#[tokio::test]
async fn a_denial_charges_no_rule() {
    let Some((_server, _clock, store)) = started().await else {
        return;
    };
    let rpm = Quota::per_minute(10);
    let tpm = Quota::per_minute(1_000).tokens().sliding_window_log();
    let gcra = Quota::per_minute(100).gcra();
    let slots = Quota::concurrent(5);
    let b: Vec<BucketKey> = ["rpm", "tpm", "gcra", "slots"]
        .iter()
        .map(|r| BucketKey::new(*r, "alice"))
        .collect();
    let charges = |tokens| {
        [
            Charge::new(&b[0], &rpm, 1),
            Charge::new(&b[1], &tpm, tokens),
            Charge::new(&b[2], &gcra, 1),
            Charge::new(&b[3], &slots, 1),
        ]
    };
    assert!(acquire(&store, &charges(900)).await.is_admitted());
    let d = acquire(&store, &charges(200)).await;
    let denial = d.denial.expect("900 + 200 tokens > 1,000");
    assert_eq!(denial.index, 1);
    assert_eq!(denial.retry_after, Some(Duration::from_secs(60)));
    let remaining = |s: Snapshot| s.remaining;
    assert_eq!(remaining(peek(&store, &b[0], &rpm).await), 9);
    assert_eq!(remaining(peek(&store, &b[1], &tpm).await), 100);
    assert_eq!(remaining(peek(&store, &b[2], &gcra).await), 99);
    assert_eq!(remaining(peek(&store, &b[3], &slots).await), 4);
    // The snapshots of the denial show the same: nothing was charged.
    let got: Vec<u64> = d.charges.iter().map(|c| c.snapshot.remaining).collect();
    assert_eq!(got, [9, 100, 99, 4]);

    // One request charging one bucket twice is refused, as by the memory store (the script
    // would read the bucket once per charge and keep only the last write).
    let twice = [Charge::new(&b[0], &rpm, 1), Charge::new(&b[0], &rpm, 1)];
    let err = within("acquire", store.acquire(&twice)).await.unwrap_err();
    assert!(matches!(err, StoreError::DuplicateBucket(_)), "{err:?}");
    assert_eq!(remaining(peek(&store, &b[0], &rpm).await), 9);
}

/// Runs `tasks` tasks, task `i` using `stores[i % stores.len()]` for `attempts` requests of
/// `cost(i, attempt)` units on one bucket; returns the admitted (requests, units).
async fn hammer(
    stores: &[RedisStore],
    bucket: &BucketKey,
    quota: Quota,
    tasks: usize,
    attempts: u64,
    cost: fn(usize, u64) -> u64,
) -> (u64, u64) {
    let handles: Vec<_> = (0..tasks)
        .map(|i| {
            let store = stores[i % stores.len()].clone();
            let bucket = bucket.clone();
            tokio::spawn(async move {
                let (mut requests, mut units) = (0, 0);
                for a in 0..attempts {
                    let amount = cost(i, a);
                    let d = acquire(&store, &[Charge::new(&bucket, &quota, amount)]).await;
                    if d.is_admitted() {
                        requests += 1;
                        units += amount;
                    }
                }
                (requests, units)
            })
        })
        .collect();
    let (mut requests, mut units) = (0, 0);
    for h in handles {
        let (r, u) = within("hammering task", h).await.unwrap();
        requests += r;
        units += u;
    }
    (requests, units)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_and_three_replicas_admit_exactly_the_limit() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    // Three independent stores (three connections), as three replicas of a service would
    // have, all at the same frozen instant.
    let clock = frozen_clock();
    let mut stores = Vec::new();
    for _ in 0..3 {
        stores.push(connect(server.url(), "rl", &clock).await);
    }
    for alg in WINDOW_ALGORITHMS {
        let quota = Quota::per_minute(300).using(alg);
        let bucket = BucketKey::new(format!("hot-{alg:?}"), "k");
        let (admitted, _) = hammer(&stores, &bucket, quota, 64, 10, |_, _| 1).await;
        assert_eq!(admitted, 300, "{alg:?}: 640 attempts on a limit of 300");
        assert_eq!(peek(&stores[0], &bucket, &quota).await.remaining, 0);

        // Weighted: 1 to 97 tokens per request, far more asked than the 10,000 allowed.
        let quota = Quota::per_minute(10_000).tokens().using(alg);
        let bucket = BucketKey::new(format!("tokens-{alg:?}"), "k");
        let cost = |i: usize, a: u64| 1 + (a * 7 + i as u64 * 13) % 97;
        let (_, tokens) = hammer(&stores, &bucket, quota, 64, 20, cost).await;
        assert!(tokens <= 10_000, "{alg:?}: {tokens} tokens admitted");
        // Once one request was denied, less room was left than its cost: the limit is
        // (nearly) used, not wasted.
        assert!(
            tokens > 10_000 - 97,
            "{alg:?}: only {tokens} tokens admitted"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlement_refunds_releases_and_expires_leases() {
    let Some((_server, clock, store)) = started().await else {
        return;
    };

    // A token charge of 1,000 settled to 250: 750 come back, for every window algorithm.
    for alg in WINDOW_ALGORITHMS {
        let q = Quota::per_hour(10_000).tokens().using(alg);
        let b = BucketKey::new(format!("tpm-{alg:?}"), "alice");
        let d = acquire(&store, &[Charge::new(&b, &q, 1_000)]).await;
        assert_eq!(d.charges[0].snapshot.remaining, 9_000, "{alg:?}");
        clock.advance(Duration::from_secs(5));
        settle(
            &store,
            &[Adjustment {
                bucket: &b,
                quota: &q,
                placement: d.charges[0].placement,
                charged: 1_000,
                actual: 250,
            }],
        )
        .await;
        // (GCRA drains meanwhile: 5 s of 10,000 per hour is 13.9 tokens, rounded down.)
        let want = if alg == Algorithm::Gcra { 9_763 } else { 9_750 };
        assert_eq!(peek(&store, &b, &q).await.remaining, want, "{alg:?}");
    }
    assert_eq!(store.stats().errors, 0, "a settle is not a failure");

    // A concurrency slot is released by settling it to 0.
    let q = Quota::concurrent(2);
    let b = BucketKey::new("inflight", "alice");
    let one = [Charge::new(&b, &q, 1)];
    let first = acquire(&store, &one).await;
    assert!(acquire(&store, &one).await.is_admitted());
    let full = acquire(&store, &one).await;
    assert_eq!(
        full.denial.map(|d| d.retry_after),
        Some(Some(Duration::from_secs(1)))
    );
    settle(
        &store,
        &[Adjustment {
            bucket: &b,
            quota: &q,
            placement: first.charges[0].placement,
            charged: 1,
            actual: 0,
        }],
    )
    .await;
    assert_eq!(peek(&store, &b, &q).await.remaining, 1);

    // A slot never released (its process died) is reclaimed once its lease is over.
    let q = Quota::concurrent(1).lease(Duration::from_secs(30));
    let b = BucketKey::new("leased", "alice");
    let one = [Charge::new(&b, &q, 1)];
    assert!(acquire(&store, &one).await.is_admitted());
    clock.advance(Duration::from_secs(29));
    assert!(
        !acquire(&store, &one).await.is_admitted(),
        "lease still held"
    );
    clock.advance(Duration::from_secs(2));
    assert_eq!(peek(&store, &b, &q).await.remaining, 1, "lease expired");
    assert!(acquire(&store, &one).await.is_admitted());

    // Through the layer: the slot comes back when the response body is dropped.
    let layer = RateLimitLayer::builder()
        .rule(Rule::new("slots", key::global(), Quota::concurrent(1)))
        .store(store.clone())
        .build()
        .unwrap();
    let svc = app(layer);
    let slots = BucketKey::new("slots", tower_llm_ratelimit::key::Key::new(b"*"));
    let held = send(&svc, request()).await;
    assert_eq!(held.status(), StatusCode::OK);
    assert_eq!(
        send(&svc, request()).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    drop(held);
    // The release is a Redis call made from a spawned task: wait for it, boundedly.
    within("the slot to be released", async {
        while peek(&store, &slots, &Quota::concurrent(1)).await.remaining != 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(send(&svc, request()).await.status(), StatusCode::OK);
}

fn pttl(server: &RedisServer, key: &str) -> i64 {
    server
        .cli(&["PTTL", key])
        .and_then(|o| o.trim().parse().ok())
        .unwrap_or_else(|| panic!("PTTL {key}"))
}

fn memory_usage(server: &RedisServer, key: &str) -> u64 {
    server
        .cli(&["MEMORY", "USAGE", key, "SAMPLES", "0"])
        .and_then(|o| o.trim().parse().ok())
        .unwrap_or_else(|| panic!("MEMORY USAGE {key}"))
}

/// `prefix:v2:{<32 hex>}:<rule>`: the tag, or `None` when `key` is not a bucket key of `rule`.
fn tag_of<'k>(key: &'k str, prefix: &str, rule: &str) -> Option<&'k str> {
    let rest = key.strip_prefix(prefix)?.strip_prefix(":v2:{")?;
    let (tag, rule_part) = rest.split_once("}:")?;
    let hex = tag.len() == 32
        && tag
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    (hex && rule_part == rule).then_some(tag)
}

#[tokio::test]
async fn a_prefix_with_braces_is_refused() {
    // Checked before connecting: no server needed.
    let err = RedisStore::builder("redis://127.0.0.1:1")
        .prefix("app{1}")
        .connect()
        .await
        .expect_err("a brace in the prefix");
    assert!(err.to_string().contains("must not contain"), "{err}");
}

#[tokio::test]
async fn keys_are_hashed_tagged_and_expire() {
    let Some((server, clock, store)) = started().await else {
        return;
    };
    let minute = Duration::from_secs(60);
    let counter = Quota::new(100, minute);
    let log = Quota::new(100, minute).sliding_window_log();
    let gcra = Quota::new(10, minute).gcra();
    let slots = Quota::concurrent(2).lease(Duration::from_secs(30));
    let rules = ["counter", "log", "gcra", "slots"];
    let b: Vec<BucketKey> = rules.iter().map(|r| BucketKey::new(*r, "alice")).collect();
    let charges = [
        Charge::new(&b[0], &counter, 1),
        Charge::new(&b[1], &log, 1),
        Charge::new(&b[2], &gcra, 1),
        Charge::new(&b[3], &slots, 1),
    ];
    let d = acquire(&store, &charges).await;
    assert!(d.is_admitted());
    // The record of a failed attempt of an idempotent request.
    within(
        "fail_attempt",
        store.fail_attempt(&charges, &IdempotencyKey::from_bytes([1; 16])),
    )
    .await
    .unwrap();

    let keys = server.keys();
    assert_eq!(keys.len(), 5, "{keys:?}");
    let find = |rule: &str| -> String {
        keys.iter()
            .find(|k| tag_of(k, "rl", rule).is_some())
            .unwrap_or_else(|| panic!("no key for rule {rule} in {keys:?}"))
            .clone()
    };
    let by_rule: Vec<String> = rules.iter().map(|r| find(r)).collect();
    // One caller's rules share one tag (one cluster slot, one script call).
    let tag = tag_of(&by_rule[0], "rl", "counter").unwrap();
    for (k, r) in by_rule.iter().zip(rules) {
        assert_eq!(tag_of(k, "rl", r), Some(tag), "{k}");
    }
    let idem = keys
        .iter()
        .find(|k| k.starts_with(&format!("rl:v2:{{{tag}}}:idem:")))
        .unwrap_or_else(|| panic!("no idempotency key in {keys:?}"));
    let idem_hash = idem.rsplit(':').next().unwrap();
    assert_eq!(idem_hash.len(), 32, "{idem}");
    // The caller's key never appears in clear.
    assert!(keys.iter().all(|k| !k.contains("alice")), "{keys:?}");

    // TTLs (real milliseconds left, a little less than what was set): the end of the next
    // window for the counter (the clock is at 1,000 s: window 16 of 60 s, the next ends at
    // 1,080 s), the newest entry's expiry for the log, the backlog for GCRA (one unit of 10
    // per minute: 6 s), the lease for concurrency, the idempotency TTL (default 120 s).
    let ttls: Vec<i64> = by_rule.iter().map(|k| pttl(&server, k)).collect();
    let expected = [80_001, 60_001, 6_001, 30_001];
    for ((k, ttl), want) in by_rule.iter().zip(&ttls).zip(expected) {
        assert!(
            *ttl <= want && *ttl > want - 5_000,
            "{k}: PTTL {ttl}, expected about {want}"
        );
    }
    // A write within the window keeps the counter's expiry; one in the next window moves it.
    std::thread::sleep(Duration::from_millis(50));
    acquire(&store, &[Charge::new(&b[0], &counter, 1)]).await;
    let kept = pttl(&server, &by_rule[0]);
    assert!(kept <= ttls[0] - 40, "{kept} vs {}", ttls[0]);
    // 1,050 s: window 17, the next ends at 1,140 s.
    clock.advance(Duration::from_secs(50));
    acquire(&store, &[Charge::new(&b[0], &counter, 1)]).await;
    let moved = pttl(&server, &by_rule[0]);
    assert!(moved > 85_000 && moved <= 90_001, "{moved}");
    clock.set(Duration::from_secs(1_000));
    let idem_ttl = pttl(&server, idem);
    assert!(
        idem_ttl <= 120_000 && idem_ttl > 115_000,
        "{idem}: {idem_ttl}"
    );

    // Another caller: another tag.
    let bob = BucketKey::new("counter", "bob");
    acquire(&store, &[Charge::new(&bob, &counter, 1)]).await;
    let bob_key = server
        .keys()
        .into_iter()
        .find(|k| tag_of(k, "rl", "counter").is_some_and(|t| t != tag))
        .expect("bob's counter key");
    assert_ne!(bob_key, by_rule[0]);

    // Memory per key, for the README.
    let usage: Vec<u64> = by_rule.iter().map(|k| memory_usage(&server, k)).collect();
    eprintln!(
        "MEMORY USAGE per key: counter {} B, log (1 entry) {} B, gcra {} B, concurrency (1 slot) {} B, idempotency {} B",
        usage[0],
        usage[1],
        usage[2],
        usage[3],
        memory_usage(&server, idem)
    );
    // The log grows with the distinct instants in its window.
    for _ in 0..99 {
        clock.advance(Duration::from_millis(100));
        assert!(acquire(&store, &[Charge::new(&b[1], &log, 1)])
            .await
            .is_admitted());
    }
    let log_100 = memory_usage(&server, &by_rule[1]);
    eprintln!(
        "MEMORY USAGE: log with 100 entries {log_100} B ({:.1} B per entry)",
        (log_100 - usage[1]) as f64 / 99.0
    );
    assert!(usage[0] < 200 && usage[2] < 200, "{usage:?}");
}

/// Values not in this version's format where its states belong (text values, a log kept as a
/// list, an idempotency record as text) or keys of another type: the bucket starts afresh,
/// without an error, and a foreign idempotency record is ignored and replaced. (Older
/// versions' states use other keys: `versions_use_separate_keys`.)
#[tokio::test]
async fn old_and_foreign_states_start_afresh() {
    let Some((server, clock, store)) = started().await else {
        return;
    };
    let minute = Duration::from_secs(60);
    let quotas = [
        Quota::new(5, minute),
        Quota::new(5, minute).sliding_window_log(),
        Quota::new(5, minute).gcra().burst(5),
        Quota::concurrent(5),
    ];
    let rules = ["counter", "log", "gcra", "slots"];
    let b: Vec<BucketKey> = rules.iter().map(|r| BucketKey::new(*r, "alice")).collect();
    let charges = |n: u64| -> Vec<Charge<'_>> {
        b.iter()
            .zip(&quotas)
            .map(|(b, q)| Charge::new(b, q, n))
            .collect()
    };
    assert!(acquire(&store, &charges(1)).await.is_admitted());
    let keys = server.keys();
    let key = |rule: &str| -> String {
        keys.iter()
            .find(|k| tag_of(k, "rl", rule).is_some())
            .unwrap_or_else(|| panic!("no key for rule {rule} in {keys:?}"))
            .clone()
    };
    let (counter, log, gcra, slots) = (key("counter"), key("log"), key("gcra"), key("slots"));
    let cli = |args: &[&str]| server.cli(args).expect("redis-cli");
    // The text states of older versions, each claiming the bucket is full or nearly.
    cli(&["SET", &counter, "16 5 5", "PX", "100000"]);
    cli(&["DEL", &log]);
    cli(&["RPUSH", &log, "999000000 4", "999500000 1"]);
    cli(&["PEXPIRE", &log, "100000"]);
    cli(&["SET", &gcra, "1060000000", "PX", "100000"]);
    cli(&["DEL", &slots]);
    cli(&["SET", &slots, "a string", "PX", "100000"]);
    let d = acquire(&store, &charges(5)).await;
    assert!(d.is_admitted(), "{d:?}");
    let remaining: Vec<u64> = d.charges.iter().map(|c| c.snapshot.remaining).collect();
    assert_eq!(remaining, [0, 0, 0, 0]);
    assert_eq!(store.stats().errors, 0, "{:?}", store.stats());

    // Keys of another type (a list where a string state belongs, a string state of another
    // algorithm).
    clock.advance(Duration::from_secs(600));
    cli(&["DEL", &counter, &gcra]);
    cli(&["RPUSH", &counter, "x"]);
    cli(&["PEXPIRE", &counter, "100000"]);
    let log_state = cli(&["GET", &log]);
    assert!(!log_state.trim().is_empty(), "the log is a string now");
    let three = [
        Charge::new(&b[0], &quotas[0], 5),
        Charge::new(&b[2], &quotas[2], 5),
    ];
    let gcra_as_counter = BucketKey::new("gcra", "alice");
    assert!(acquire(&store, &three).await.is_admitted());
    let counter_quota = Quota::new(5, minute);
    assert_eq!(
        peek(&store, &gcra_as_counter, &counter_quota)
            .await
            .remaining,
        5,
        "a GCRA state read by a counter rule is another algorithm's"
    );
    assert_eq!(store.stats().errors, 0, "{:?}", store.stats());

    // An idempotency record in an earlier format (text, or the replayed reply of tag 4)
    // is none: the acquire is charged and the record left as it is.
    let one = [Charge::new(&b[0], &quotas[0], 1)];
    let id = IdempotencyKey::from_bytes([7; 16]);
    clock.advance(Duration::from_secs(600));
    within("fail_attempt", store.fail_attempt(&one, &id))
        .await
        .unwrap();
    let idem = server
        .keys()
        .into_iter()
        .find(|k| k.contains(":idem:"))
        .expect("the idempotency key");
    for old in ["-1,-1,5,2,60000000,30", "\x04garbage"] {
        cli(&["SET", &idem, old, "PX", "100000"]);
        let again = within("acquire_once", store.acquire_once(&one, &id))
            .await
            .unwrap();
        assert!(again.is_admitted() && !again.free_retry, "{again:?}");
    }
    assert_eq!(peek(&store, &b[0], &quotas[0]).await.remaining, 3);
    within("fail_attempt", store.fail_attempt(&one, &id))
        .await
        .unwrap();
    let third = within("acquire_once", store.acquire_once(&one, &id))
        .await
        .unwrap();
    assert!(third.is_admitted() && third.free_retry, "{third:?}");
    assert_eq!(third.charges[0].snapshot.remaining, 3);
    assert_eq!(store.stats().errors, 0, "{:?}", store.stats());
}

/// Versions that store states differently use different keys (the format's version is part
/// of every key): during a rolling upgrade the old and the new version each keep their own
/// states under one prefix, and neither reads, resets or replays the other's.
#[tokio::test]
async fn versions_use_separate_keys() {
    let Some((server, _clock, store)) = started().await else {
        return;
    };
    let q = Quota::per_minute(5);
    let b = BucketKey::new("counter", "alice");
    let d = acquire(&store, &[Charge::new(&b, &q, 1)]).await;
    assert!(d.is_admitted());
    within(
        "fail_attempt",
        store.fail_attempt(
            &[Charge::new(&b, &q, 1)],
            &IdempotencyKey::from_bytes([1; 16]),
        ),
    )
    .await
    .unwrap();
    let keys = server.keys();
    let counter = keys
        .iter()
        .find(|k| tag_of(k, "rl", "counter").is_some())
        .unwrap_or_else(|| panic!("no counter key in {keys:?}"))
        .clone();
    let idem = keys
        .iter()
        .find(|k| k.contains(":idem:"))
        .unwrap_or_else(|| panic!("no idempotency key in {keys:?}"))
        .clone();
    // The previous version's layout: the same names without the version.
    let old_counter = counter.replacen(":v2:", ":", 1);
    let old_idem = idem.replacen(":v2:", ":", 1);
    assert_ne!(old_counter, counter);
    let cli = |args: &[&str]| server.cli(args).expect("redis-cli");
    // An old replica's full counter and its record of another request.
    cli(&["SET", &old_counter, "16 5 0", "PX", "100000"]);
    cli(&["SET", &old_idem, "-1,-1,5,0,60000000,16", "PX", "100000"]);
    for left in [3, 2, 1, 0] {
        let d = acquire(&store, &[Charge::new(&b, &q, 1)]).await;
        assert!(d.is_admitted(), "{d:?}");
        assert_eq!(d.charges[0].snapshot.remaining, left);
    }
    assert!(!acquire(&store, &[Charge::new(&b, &q, 1)])
        .await
        .is_admitted());
    // The old replica's states are untouched.
    assert_eq!(cli(&["GET", &old_counter]).trim(), "16 5 0");
    assert_eq!(cli(&["GET", &old_idem]).trim(), "-1,-1,5,0,60000000,16");
    assert_eq!(server.keys().len(), 4, "{:?}", server.keys());
    assert_eq!(store.stats().errors, 0, "{:?}", store.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_refunds_across_slots_and_admits_exactly_the_limit() {
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    let clock = frozen_clock();
    let connect_cluster = || {
        within(
            "connecting to the cluster",
            RedisStore::cluster(cluster.urls())
                .clock(clock.clone())
                .timeout(Duration::from_secs(5))
                .connect(),
        )
    };
    let store = connect_cluster().await.unwrap();
    let per_user = Quota::per_hour(100);
    let global = Quota::per_hour(3);
    let user = BucketKey::new("user-rph", "alice");
    let all = BucketKey::new("global-rph", "*");
    let charges = [
        Charge::new(&user, &per_user, 1),
        Charge::new(&all, &global, 1),
    ];
    for _ in 0..3 {
        assert!(acquire(&store, &charges).await.is_admitted());
    }
    let d = acquire(&store, &charges).await;
    assert_eq!(d.denial.map(|d| d.index), Some(1), "{d:?}");
    // The per-user slot admitted the fourth request, then was refunded.
    assert_eq!(peek(&store, &user, &per_user).await.remaining, 97);
    assert_eq!(peek(&store, &all, &global).await.remaining, 0);
    assert_eq!(store.stats().errors, 0, "{:?}", store.stats());

    // The two rules' keys are in different slots.
    let keys: Vec<String> = cluster.nodes.iter().flat_map(|n| n.keys()).collect();
    let key_of = |rule: &str| {
        keys.iter()
            .find(|k| tag_of(k, "rl", rule).is_some())
            .unwrap_or_else(|| panic!("no key for {rule} in {keys:?}"))
            .clone()
    };
    let slot = |key: &str| -> u16 {
        cluster.nodes[0]
            .cli(&["CLUSTER", "KEYSLOT", key])
            .and_then(|o| o.trim().parse().ok())
            .expect("CLUSTER KEYSLOT")
    };
    let (user_key, global_key) = (key_of("user-rph"), key_of("global-rph"));
    assert_ne!(
        slot(&user_key),
        slot(&global_key),
        "{user_key} {global_key}"
    );

    // Many tasks on two store instances: each request charges its user's rule and a global
    // rule in another slot. The users' rules never deny, so the global one decides alone:
    // exactly its limit is admitted, and every denied request's user charge is refunded.
    let stores = [store.clone(), connect_cluster().await.unwrap()];
    let per_user = Quota::per_hour(1_000);
    let global = Quota::per_hour(150);
    let users: Vec<BucketKey> = (0..8)
        .map(|u| BucketKey::new("user-rph-2", format!("user{u}")))
        .collect();
    let all = BucketKey::new("global-rph-2", "*");
    let handles: Vec<_> = (0..64)
        .map(|i| {
            let store = stores[i % 2].clone();
            let u = i % users.len();
            let user = users[u].clone();
            let all = all.clone();
            tokio::spawn(async move {
                let mut admitted = 0u64;
                for _ in 0..10 {
                    let charges = [
                        Charge::new(&user, &per_user, 1),
                        Charge::new(&all, &global, 1),
                    ];
                    if acquire(&store, &charges).await.is_admitted() {
                        admitted += 1;
                    }
                }
                (u, admitted)
            })
        })
        .collect();
    let mut per_user_admitted = vec![0u64; users.len()];
    for h in handles {
        let (u, n) = within("cluster task", h).await.unwrap();
        per_user_admitted[u] += n;
    }
    let total: u64 = per_user_admitted.iter().sum();
    assert_eq!(total, 150, "640 attempts on a global limit of 150");
    for (u, bucket) in users.iter().enumerate() {
        let left = peek(&stores[0], bucket, &per_user).await.remaining;
        assert_eq!(
            1_000 - left,
            per_user_admitted[u],
            "user{u}: only admitted requests stay charged"
        );
    }
    for s in &stores {
        assert_eq!(s.stats().errors, 0, "{:?}", s.stats());
    }

    // `FUNCTION FLUSH` on every primary: the library is loaded on all of them again.
    for n in &cluster.nodes {
        n.cli(&["FUNCTION", "FLUSH"]).expect("FUNCTION FLUSH");
    }
    let fresh = BucketKey::new("user-rph", "carol");
    let d = acquire(&stores[1], &[Charge::new(&fresh, &per_user, 1)]).await;
    assert!(d.is_admitted(), "{d:?}");
    for n in &cluster.nodes {
        let libraries = n.cli(&["FUNCTION", "LIST"]).unwrap_or_default();
        assert!(
            libraries.contains("tower_llm_ratelimit_"),
            "port {}: {libraries}",
            n.port
        );
    }
    assert_eq!(stores[1].stats().errors, 0, "{:?}", stores[1].stats());
}

/// A bounded poll: calls `f` until it returns `Some`, for at most 10 s.
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    within(what, async {
        loop {
            if let Some(v) = f().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_fail_fast_fall_back_and_recover() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    // The server's clock and windows of an hour; a 50 ms timeout and a breaker opening after
    // 2 failures for 100 ms.
    let builder = |prefix: &str| {
        RedisStore::builder(server.url())
            .prefix(prefix)
            .timeout(Duration::from_millis(50))
            .circuit_breaker(2, Duration::from_millis(100))
    };
    let store = within("connect", builder("err").connect()).await.unwrap();
    let fallback = within(
        "connect",
        builder("fb")
            .on_failure(RedisFailure::LocalFallback {
                expected_replicas: 2,
            })
            .connect(),
    )
    .await
    .unwrap();
    let q = Quota::per_hour(10);
    let b = BucketKey::new("global", "*");
    let one = [Charge::new(&b, &q, 1)];
    // While Redis is up, calls succeed (retried: on a loaded machine 50 ms can pass).
    // (`fallback` is not called before the crash, so its local share starts untouched.)
    let ok_now = || async {
        tokio::time::timeout(Duration::from_secs(2), store.acquire(&one))
            .await
            .ok()?
            .ok()
    };
    assert!(eventually("an acquire", ok_now).await.is_admitted());
    let layer = |policy| {
        RateLimitLayer::builder()
            .rule(Rule::new("global", key::global(), Quota::per_hour(10)))
            .store(store.clone())
            .on_store_error(policy)
            .build()
            .unwrap()
    };
    let closed = app(layer(FailurePolicy::Closed));
    let open = app(layer(FailurePolicy::Open));
    let admitted_by = |svc: &App| {
        let svc = svc.clone();
        async move { (send(&svc, request()).await.status() == StatusCode::OK).then_some(()) }
    };
    eventually("a request admitted through the layer", || {
        admitted_by(&closed)
    })
    .await;

    server.stop();

    // RedisFailure::Error: every call fails, each within a bound (the 50 ms timeout, or at
    // once while the circuit is open; 2 s leaves room for a loaded machine).
    for i in 0..6 {
        let started = Instant::now();
        let result = within("acquire with Redis down", store.acquire(&one)).await;
        assert!(
            matches!(result, Err(StoreError::Backend(_))),
            "call {i}: {result:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "call {i} took {:?}",
            started.elapsed()
        );
    }
    let stats = store.stats();
    assert!(stats.errors >= 6, "{stats:?}");
    assert!(stats.breaker_opened >= 1, "{stats:?}");
    assert_eq!(stats.fallback_decisions, 0, "{stats:?}");
    assert!(within("peek", store.peek(&b, &q)).await.is_err());

    // Through the layer: FailurePolicy::Closed answers 503, Open admits.
    assert_eq!(
        send(&closed, request()).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(send(&open, request()).await.status(), StatusCode::OK);

    // LocalFallback with 2 replicas: half the limit, decided in this process.
    let mut admitted = 0;
    for _ in 0..8 {
        if acquire(&fallback, &one).await.is_admitted() {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 5, "10 per hour over 2 replicas");
    let local = peek(&fallback, &b, &q).await;
    assert_eq!((local.limit, local.remaining), (5, 0), "{local:?}");
    let stats = fallback.stats();
    assert_eq!(stats.fallback_decisions, 8, "{stats:?}");
    assert!(stats.errors >= 8 && stats.breaker_opened >= 1, "{stats:?}");

    // Redis comes back (empty: no persistence): both stores use it again by themselves once
    // the breaker's cooldown lets a probe through.
    server.restart();
    let d = eventually("the store to recover", ok_now).await;
    // The restarted server is empty (no persistence): the two charges made before the crash
    // are gone. (A probe that timed out may still have been counted by the server.)
    assert!(d.charges[0].snapshot.remaining > 7, "a fresh Redis: {d:?}");
    assert!(!store.stats().circuit_open, "{:?}", store.stats());
    eventually("the fallback store to use Redis again", || async {
        let d = tokio::time::timeout(Duration::from_secs(2), fallback.acquire(&one))
            .await
            .ok()?
            .ok()?;
        // The local fallback answers with its share (5); Redis with the whole limit.
        (d.charges[0].snapshot.limit == 10).then_some(())
    })
    .await;
    assert!(!fallback.stats().circuit_open, "{:?}", fallback.stats());
    eventually("the layer to admit again", || admitted_by(&closed)).await;
}

/// `calls` of `command` (lowercase) in `INFO commandstats`, 0 when never called.
fn calls_of(server: &RedisServer, command: &str) -> u64 {
    let stats = server.cli(&["INFO", "commandstats"]).unwrap_or_default();
    stats
        .lines()
        .find_map(|l| l.trim().strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// `FUNCTION FLUSH` (or a restart that lost the functions) mid-run: the library is loaded
/// again and the call retried, as `NOSCRIPT` is answered for `EVALSHA`.
#[tokio::test]
async fn function_flush_is_survived() {
    let Some((server, _clock, store)) = started().await else {
        return;
    };
    let q = Quota::per_hour(10);
    let b = BucketKey::new("rph", "alice");
    let one = [Charge::new(&b, &q, 1)];
    assert_eq!(acquire(&store, &one).await.charges[0].snapshot.remaining, 9);
    let libraries = server.cli(&["FUNCTION", "LIST"]).unwrap_or_default();
    assert!(
        libraries.contains("tower_llm_ratelimit_"),
        "the library is loaded: {libraries}"
    );
    assert!(calls_of(&server, "fcall") >= 1, "decided by FCALL");
    assert_eq!(
        server
            .cli(&["FUNCTION", "FLUSH"])
            .map(|o| o.trim().to_owned()),
        Some("OK".to_owned())
    );
    assert_eq!(acquire(&store, &one).await.charges[0].snapshot.remaining, 8);
    server.cli(&["FUNCTION", "FLUSH"]).expect("FUNCTION FLUSH");
    assert_eq!(peek(&store, &b, &q).await.remaining, 8);
    // Functions and scripts are independent: flushing scripts changes nothing.
    server.cli(&["SCRIPT", "FLUSH"]).expect("SCRIPT FLUSH");
    assert_eq!(acquire(&store, &one).await.charges[0].snapshot.remaining, 7);
    assert_eq!(store.stats().errors, 0, "{:?}", store.stats());
    assert_eq!(
        calls_of(&server, "evalsha"),
        0,
        "never fell back to EVALSHA"
    );
}

/// A server without functions (Redis 6; here Redis 7 with `FCALL` and `FUNCTION` renamed
/// away): the store falls back to `EVALSHA` for good, without an error, and still survives
/// `SCRIPT FLUSH`.
#[tokio::test]
async fn a_server_without_functions_is_served_by_evalsha() {
    let Some(server) = RedisServer::start_with(&[
        "--rename-command",
        "FCALL",
        "",
        "--rename-command",
        "FUNCTION",
        "",
    ]) else {
        return;
    };
    let clock = frozen_clock();
    let store = connect(server.url(), "rl", &clock).await;
    let q = Quota::per_hour(10);
    let b = BucketKey::new("rph", "alice");
    let one = [Charge::new(&b, &q, 1)];
    assert_eq!(acquire(&store, &one).await.charges[0].snapshot.remaining, 9);
    assert_eq!(acquire(&store, &one).await.charges[0].snapshot.remaining, 8);
    server.cli(&["SCRIPT", "FLUSH"]).expect("SCRIPT FLUSH");
    assert_eq!(acquire(&store, &one).await.charges[0].snapshot.remaining, 7);
    assert_eq!(store.stats().errors, 0, "{:?}", store.stats());
    let evalsha = calls_of(&server, "evalsha");
    assert!(evalsha >= 3, "decided by EVALSHA: {evalsha} calls");
}

/// Clones share one connection; the store is usable behind an `Arc<dyn Store>` too.
#[tokio::test]
async fn a_shared_store_behind_a_trait_object() {
    let Some((_server, _clock, store)) = started().await else {
        return;
    };
    let store: Arc<dyn Store> = Arc::new(store);
    let q = Quota::per_hour(1);
    let b = BucketKey::new("rph", "alice");
    assert!(acquire(&store, &[Charge::new(&b, &q, 1)])
        .await
        .is_admitted());
    assert!(!acquire(&store, &[Charge::new(&b, &q, 1)])
        .await
        .is_admitted());
}

/// `connect_lazy` starts while Redis is down: calls fail within their timeout (and the
/// failure policy decides: here the local fallback) until Redis comes up, then go to Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_store_starts_while_redis_is_down_and_uses_it_once_up() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    server.stop();
    let clock = frozen_clock();
    let lazy = |failure| {
        RedisStore::builder(server.url())
            .prefix("lazy")
            .clock(clock.clone())
            .timeout(Duration::from_millis(200))
            .circuit_breaker(2, Duration::from_millis(50))
            .on_failure(failure)
            .connect_lazy()
            .expect("connect_lazy needs no server")
    };
    let plain = lazy(RedisFailure::Error);
    let fallback = lazy(RedisFailure::LocalFallback {
        expected_replicas: 2,
    });
    let q = Quota::per_hour(10);
    let b = BucketKey::new("global", "*");
    let one = [Charge::new(&b, &q, 1)];

    // Redis down: errors (each within a bound), or the local share of the limit.
    for i in 0..3 {
        let started = Instant::now();
        let result = within("acquire with Redis down", plain.acquire(&one)).await;
        assert!(
            matches!(result, Err(StoreError::Backend(_))),
            "call {i}: {result:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(3), "call {i}");
    }
    let d = acquire(&fallback, &one).await;
    assert!(d.is_admitted());
    assert_eq!(
        d.charges[0].snapshot.limit, 5,
        "half of 10 over 2 replicas: {d:?}"
    );
    assert!(fallback.stats().fallback_decisions >= 1);

    // Redis comes up: both stores use it, and share its count.
    server.restart();
    let from_redis = |store: RedisStore| async move {
        let d = tokio::time::timeout(Duration::from_secs(2), store.acquire(&one))
            .await
            .ok()?
            .ok()?;
        (d.charges[0].snapshot.limit == 10).then_some(d)
    };
    let first = eventually("the lazy store to reach Redis", || {
        from_redis(plain.clone())
    })
    .await;
    let second = eventually("the fallback store to reach Redis", || {
        from_redis(fallback.clone())
    })
    .await;
    assert!(
        second.charges[0].snapshot.remaining < first.charges[0].snapshot.remaining,
        "one count in Redis: {first:?} then {second:?}"
    );
    assert!(server.keys().iter().any(|k| k.starts_with("lazy:")));
}

/// A lazy cluster store connects on its first call; an unreachable one fails each call
/// within its timeout instead of at start-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_cluster_store_connects_on_first_use() {
    let unreachable =
        RedisStore::cluster([format!("redis://127.0.0.1:{}", support::redis::free_port())])
            .timeout(Duration::from_millis(200))
            .connect_lazy()
            .expect("connect_lazy needs no server");
    let q = Quota::per_hour(10);
    let b = BucketKey::new("global", "*");
    let one = [Charge::new(&b, &q, 1)];
    let started = Instant::now();
    let result = within("acquire on no cluster", unreachable.acquire(&one)).await;
    assert!(matches!(result, Err(StoreError::Backend(_))), "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(3));

    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    let clock = frozen_clock();
    // A short call timeout: the connection (slot map, every primary) takes more round trips
    // than one call may, so it is made in the background while calls fail at once.
    let lazy = RedisStore::cluster(cluster.urls())
        .clock(clock.clone())
        .timeout(Duration::from_millis(200))
        .circuit_breaker(1_000, Duration::from_millis(10))
        .connect_lazy()
        .expect("connect_lazy");
    let d = eventually("the lazy cluster store to connect", || async {
        tokio::time::timeout(Duration::from_secs(2), lazy.acquire(&one))
            .await
            .ok()?
            .ok()
    })
    .await;
    assert!(d.is_admitted());
    // (A call that timed out after reaching the cluster may have been counted too.)
    let s = d.charges[0].snapshot;
    assert!(s.limit == 10 && s.remaining <= 9, "{d:?}");
}

/// Outside a tokio runtime `connect_lazy` answers an error, never a panic.
#[test]
fn connect_lazy_outside_a_runtime_is_an_error() {
    let result = RedisStore::builder("redis://127.0.0.1:1").connect_lazy();
    assert!(
        matches!(&result, Err(StoreError::Backend(m)) if m.contains("tokio runtime")),
        "{:?}",
        result.err()
    );
    let result = RedisStore::builder("not a url").connect_lazy();
    assert!(result.is_err());
}

/// With Redis a response's settlement runs in a background task once the response ends;
/// `RateLimitLayer::flush` waits for it (what a server does at shutdown).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_waits_for_background_settlements() {
    let Some((_server, _clock, store)) = started().await else {
        return;
    };
    let tph = Quota::per_hour(1_000).tokens();
    let layer = RateLimitLayer::builder()
        .rule(Rule::new("tph", key::global(), tph))
        .cost(tower_llm_ratelimit::cost::from_fn(|_| Some(300)))
        .store(store.clone())
        .build()
        .unwrap();
    let upstream = tower::service_fn(|_: Request<RequestBody<String>>| async {
        let usage = r#"{"usage":{"prompt_tokens":20,"completion_tokens":22,"total_tokens":42}}"#;
        Ok::<_, Infallible>(
            Response::builder()
                .header("content-type", "application/json")
                .body(usage.to_owned())
                .unwrap(),
        )
    });
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(upstream);
    within("flush with nothing running", layer.flush()).await;
    for round in 1..=3u64 {
        let response = within("request", svc.clone().oneshot(request()))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        // Reading the body to its end starts the settlement (300 estimated, 42 used).
        let body = http_body_util::BodyExt::collect(response.into_body());
        within("the response body", body).await.unwrap();
        within("flush", layer.flush()).await;
        let s = peek(&store, &BucketKey::new("tph", "*"), &tph).await;
        assert_eq!(s.remaining, 1_000 - 42 * round, "round {round}: {s:?}");
    }
}

/// Idempotent retries on a cluster: a request whose buckets span two slots has a record in
/// each; a free retry skips the request counts in both; when one slot denies it, the other's
/// refund gives back what it charged and nothing it waived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_free_retries_span_slots() {
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    let store = within(
        "connecting to the cluster",
        RedisStore::cluster(cluster.urls())
            .clock(frozen_clock())
            .timeout(Duration::from_secs(5))
            .connect(),
    )
    .await
    .unwrap();
    let (user_rph, user_tph) = (Quota::per_hour(100), Quota::per_hour(1_000).tokens());
    let (global_rph, global_tph) = (Quota::per_hour(3), Quota::per_hour(350).tokens());
    let buckets = [
        BucketKey::new("user-rph", "alice"),
        BucketKey::new("user-tph", "alice"),
        BucketKey::new("global-rph", "*"),
        BucketKey::new("global-tph", "*"),
    ];
    let quotas = [user_rph, user_tph, global_rph, global_tph];
    let charges = [
        Charge::new(&buckets[0], &quotas[0], 1),
        Charge::new(&buckets[1], &quotas[1], 100),
        Charge::new(&buckets[2], &quotas[2], 1),
        Charge::new(&buckets[3], &quotas[3], 100),
    ];
    let id = IdempotencyKey::from_bytes([9; 16]);
    let remaining = || async {
        let mut out = Vec::new();
        for (b, q) in buckets.iter().zip(&quotas) {
            out.push(peek(&store, b, q).await.remaining);
        }
        out
    };
    let once = || within("acquire_once", store.acquire_once(&charges, &id));
    let fail = || within("fail_attempt", store.fail_attempt(&charges, &id));

    let d = once().await.unwrap();
    assert!(d.is_admitted() && !d.free_retry, "{d:?}");
    fail().await.unwrap();
    let d = once().await.unwrap();
    assert!(d.is_admitted() && d.free_retry, "{d:?}");
    assert_eq!(
        remaining().await,
        [99, 800, 2, 150],
        "counts skipped in both slots"
    );
    let d = once().await.unwrap();
    assert!(d.is_admitted() && !d.free_retry, "used up: {d:?}");
    assert_eq!(remaining().await, [98, 700, 1, 50]);

    // The next failure's retry: the user slot admits it, the global token rule denies it.
    fail().await.unwrap();
    let d = once().await.unwrap();
    assert_eq!(d.denial.map(|d| d.index), Some(3), "{d:?}");
    assert_eq!(
        remaining().await,
        [98, 700, 1, 50],
        "the user slot's tokens refunded, its waived count not refunded"
    );
    assert_eq!(store.stats().errors, 0, "{:?}", store.stats());
}

/// A primary of a cluster dies and its replica is promoted: the store finds the new primary
/// by itself (the redis crate follows the `MOVED` answers of the other nodes and refreshes
/// its slot map), the calls in between fail (the layer's failure policy decides them), and
/// with replication caught up before the kill no count is lost: exactly the limit is
/// admitted across the failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_failover_finds_the_promoted_replica_and_keeps_the_count() {
    let Some(mut cluster) = RedisCluster::start_with_replicas() else {
        return;
    };
    let store = within(
        "connecting to the cluster",
        RedisStore::cluster(cluster.urls())
            .clock(frozen_clock())
            .timeout(Duration::from_secs(2))
            .connect(),
    )
    .await
    .unwrap();
    let quota = Quota::per_hour(10);
    let bucket = BucketKey::new("user-rph", "alice");
    let charges = [Charge::new(&bucket, &quota, 1)];
    for _ in 0..4 {
        assert!(acquire(&store, &charges).await.is_admitted());
    }
    // The primary holding the bucket, and its replica.
    let key = cluster
        .nodes
        .iter()
        .flat_map(|n| n.keys())
        .next()
        .expect("the bucket's key");
    let primary = cluster.primary_of(&key);
    let replica = cluster.replica_of(primary);
    cluster.wait_caught_up(primary, replica);
    cluster.kill(primary);

    // Until the store reaches the promoted replica, calls fail (never admit).
    let deadline = Instant::now() + support::redis::FAILOVER;
    let (mut admitted, mut failed) = (4, 0);
    loop {
        match within("acquire", store.acquire(&charges)).await {
            Ok(d) => {
                assert!(d.is_admitted(), "{d:?}");
                admitted += 1;
                break;
            }
            Err(_) => failed += 1,
        }
        assert!(
            Instant::now() < deadline,
            "the store never reached the promoted replica ({failed} calls failed)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(failed > 0, "the dead primary was never asked");
    cluster.wait_promoted(replica);
    assert_eq!(cluster.primary_of(&key), replica);
    loop {
        let d = acquire(&store, &charges).await;
        if !d.is_admitted() {
            break;
        }
        admitted += 1;
        assert!(admitted <= 10, "over-admitted after the failover: {d:?}");
    }
    assert_eq!(admitted, 10);
    assert_eq!(peek(&store, &bucket, &quota).await.remaining, 0);
}

/// A calendar bucket's key lives until its UTC period ends (plus a second), computed by the
/// script: across Dec 31 -> Jan 1, and before the leap day of 2028.
#[tokio::test]
async fn calendar_keys_expire_when_their_period_ends() {
    let Some((server, clock, store)) = started().await else {
        return;
    };
    let near = |got: i64, want: i64| got <= want && got > want - 5_000;
    // 2027-12-31 23:59:00 UTC: both periods end in a minute.
    let (d, m) = calendar_ttls(&server, &store, &clock, 1_830_297_540).await;
    assert!(near(d, 61_000) && near(m, 61_000), "{d} {m}");
    // 2028-02-28 23:59:00 UTC: the day ends in a minute, the month after Feb 29.
    let (d, m) = calendar_ttls(&server, &store, &clock, 1_835_395_140).await;
    assert!(near(d, 61_000), "{d}");
    assert!(near(m, 86_461_000), "{m}");
}

/// At `unix_secs` on the wall clock, charges a daily and a monthly budget; their keys' PTTLs.
async fn calendar_ttls(
    server: &RedisServer,
    store: &RedisStore,
    clock: &ManualClock,
    unix_secs: u64,
) -> (i64, i64) {
    clock.set_unix(Duration::from_secs(unix_secs));
    let (daily, monthly) = (Quota::per_calendar_day(100), Quota::per_calendar_month(100));
    let (day, month) = (BucketKey::new("day", "u"), BucketKey::new("month", "u"));
    let d = acquire(
        store,
        &[
            Charge::new(&day, &daily, 1),
            Charge::new(&month, &monthly, 1),
        ],
    )
    .await;
    assert!(d.is_admitted());
    let keys = server.keys();
    let find = |rule: &str| {
        let k = keys
            .iter()
            .find(|k| tag_of(k, "rl", rule).is_some())
            .unwrap_or_else(|| panic!("no key for {rule} in {keys:?}"));
        pttl(server, k)
    };
    (find("day"), find("month"))
}

/// Without a test clock the script takes the date from the server's `TIME`: a calendar day's
/// reset is the next UTC midnight by this machine's clock (the same clock; a few seconds of
/// slack for the time between the two reads).
#[tokio::test]
async fn calendar_windows_use_the_servers_clock() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = within(
        "connecting to redis-server",
        RedisStore::builder(server.url())
            .timeout(Duration::from_secs(5))
            .connect(),
    )
    .await
    .expect("connecting");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let to_midnight = 86_400 - now % 86_400;
    let s = peek(
        &store,
        &BucketKey::new("day", "u"),
        &Quota::per_calendar_day(5),
    )
    .await;
    let reset = Duration::from_nanos(s.reset_after_nanos).as_secs();
    assert!(
        reset.abs_diff(to_midnight) <= 5 || reset.abs_diff(to_midnight + 86_400) <= 5,
        "reset in {reset}s, midnight in {to_midnight}s"
    );
    assert_eq!(s.remaining, 5);
}
