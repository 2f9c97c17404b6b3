//! The capacity queue on tokio's paused clock: waiters are served by priority then arrival,
//! refused at their deadline with a `Retry-After` from the bucket's completion rate, leave
//! cleanly when their client goes away, and the queue is bounded.

mod support;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tower::ServiceExt;
use tower_llm_ratelimit::capacity::{Capacity, Priority};
use tower_llm_ratelimit::clock::Clock;
use tower_llm_ratelimit::observe::{DecisionEvent, Observer, QueueEvent, QueueOutcome};
use tower_llm_ratelimit::store::{
    Adjustment, BucketKey, Charge, Decision, MemoryStore, Snapshot, Store, StoreError, StoreFuture,
};
use tower_llm_ratelimit::{key, tier, Quota, RateLimitLayer, RequestBody, ResponseBody, Rule};

/// Adaptive capacity's time on tokio's (paused) clock.
#[derive(Debug)]
struct TokioClock(Instant);

impl Clock for TokioClock {
    fn now_nanos(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
}

type Res = Response<ResponseBody<String>>;

/// A memory store whose decisions and settlements answer after a task switch, as a
/// networked store's do.
#[derive(Debug, Clone)]
struct Deferred(MemoryStore);

impl Store for Deferred {
    fn acquire(&self, charges: &[Charge<'_>]) -> StoreFuture<Result<Decision, StoreError>> {
        let result = self.0.try_acquire(charges);
        StoreFuture::pending(async move {
            tokio::task::yield_now().await;
            result
        })
    }
    fn settle(&self, adjustments: &[Adjustment<'_>]) -> StoreFuture<Result<(), StoreError>> {
        let result = self.0.settle(adjustments).now().ok().unwrap();
        StoreFuture::pending(async move {
            tokio::task::yield_now().await;
            result
        })
    }
    fn peek(&self, bucket: &BucketKey, quota: &Quota) -> StoreFuture<Result<Snapshot, StoreError>> {
        self.0.peek(bucket, quota)
    }
}

/// What the observer heard of the queue: the waits' ends (tier, outcome, waited), and the
/// queue's length as each waiter entered.
#[derive(Clone, Default)]
struct Queued(
    Arc<Mutex<Vec<(String, QueueOutcome, Duration)>>>,
    Arc<Mutex<Vec<usize>>>,
);

impl Observer for Queued {
    fn on_decision(&self, _: &DecisionEvent<'_>) {}

    fn on_queue(&self, e: &QueueEvent<'_>) {
        assert_eq!(e.key.to_string(), "m@r");
        if e.outcome == QueueOutcome::Entered {
            assert_eq!(e.waited, Duration::ZERO);
            self.1.lock().unwrap().push(e.waiting);
            return;
        }
        self.0
            .lock()
            .unwrap()
            .push((e.tier.unwrap_or("").to_owned(), e.outcome, e.waited));
    }
}

struct Setup {
    layer: RateLimitLayer,
    queued: Queued,
    /// The tiers of the requests the upstream received, in order.
    served: Arc<Mutex<Vec<String>>>,
}

fn setup(queue_len: usize) -> Setup {
    setup_with(queue_len, MemoryStore::new())
}

fn setup_with(queue_len: usize, store: impl Store) -> Setup {
    let queued = Queued::default();
    let layer = RateLimitLayer::builder()
        .observer(queued.clone())
        .replica_id("r")
        .store(store)
        .rule(
            Rule::new("model-slots", key::header("x-model"), Quota::concurrent(1)).capacity(
                Capacity::fixed(1)
                    .queue_len(queue_len)
                    .tier("pro", Priority::new(2).max_wait(Duration::from_secs(5)))
                    .tier("std", Priority::new(1).max_wait(Duration::from_secs(5)))
                    .tier("free", Priority::new(0).max_wait(Duration::from_secs(1))),
            ),
        )
        .tiers(tier::header("x-tier"))
        .clock(TokioClock(Instant::now()))
        .build()
        .unwrap();
    Setup {
        layer,
        queued,
        served: Arc::default(),
    }
}

impl Setup {
    /// A request of `tier` (with a name for the record), answered at once by the upstream.
    fn send(&self, tier: &str, name: &str) -> impl std::future::Future<Output = Res> + Send {
        let served = self.served.clone();
        let name = name.to_owned();
        let svc = tower::ServiceBuilder::new()
            .layer(self.layer.clone())
            .service(tower::service_fn(move |_: Request<RequestBody<String>>| {
                served.lock().unwrap().push(name.clone());
                async { Ok::<_, Infallible>(Response::new(String::new())) }
            }));
        let req = Request::builder()
            .header("x-model", "m")
            .header("x-tier", tier)
            .body(String::new())
            .unwrap();
        async move { svc.oneshot(req).await.unwrap() }
    }

    /// Spawns a request that drops its response (its slot) as soon as it has it.
    fn spawn(&self, tier: &str, name: &str) -> JoinHandle<(StatusCode, Option<String>)> {
        let fut = self.send(tier, name);
        tokio::spawn(async move {
            let res = fut.await;
            let retry = res
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            (res.status(), retry)
        })
    }

    fn served(&self) -> Vec<String> {
        self.served.lock().unwrap().clone()
    }

    fn queue_events(&self) -> Vec<(String, QueueOutcome, Duration)> {
        self.queued.0.lock().unwrap().clone()
    }
}

/// Lets every spawned task run as far as it can without time passing.
async fn settle_tasks() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn waiters_are_served_by_priority_then_arrival() {
    served_by_priority_then_arrival(setup(16)).await;
}

#[tokio::test(start_paused = true)]
async fn waiters_are_served_by_priority_then_arrival_with_a_store_doing_io() {
    served_by_priority_then_arrival(setup_with(16, Deferred(MemoryStore::new()))).await;
}

async fn served_by_priority_then_arrival(s: Setup) {
    let held = s.send("std", "holder").await;
    assert_eq!(held.status(), StatusCode::OK);
    let mut tasks = Vec::new();
    for (tier, name) in [
        ("free", "free-1"),
        ("pro", "pro-1"),
        ("std", "std-1"),
        ("pro", "pro-2"),
        ("free", "free-2"),
    ] {
        tasks.push(s.spawn(tier, name));
        settle_tasks().await;
    }
    let start = Instant::now();
    assert_eq!(s.served(), ["holder"], "everyone waits, holding no slot");
    assert_eq!(
        *s.queued.1.lock().unwrap(),
        [1, 2, 3, 4, 5],
        "the queue's length"
    );
    drop(held);
    for t in tasks {
        let (status, _) = support::within("a waiter", t).await.unwrap();
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(
        s.served(),
        ["holder", "pro-1", "pro-2", "std-1", "free-1", "free-2"]
    );
    assert_eq!(start.elapsed(), Duration::ZERO, "served as slots came back");
    let events = s.queue_events();
    assert_eq!(events.len(), 5);
    assert!(
        events.iter().all(|e| e.1 == QueueOutcome::Admitted),
        "{events:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_waiter_is_refused_at_its_deadline_with_a_retry_after_from_the_completion_rate() {
    let s = setup(16);
    // Two completions 10 s apart: about one every 6 s over the rate's window.
    drop(s.send("pro", "a").await);
    tokio::time::advance(Duration::from_secs(10)).await;
    drop(s.send("pro", "b").await);
    let held = s.send("pro", "holder").await;
    let start = Instant::now();
    let free = s.spawn("free", "late");
    let (status, retry) = support::within("the free waiter", free).await.unwrap();
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(1),
        "free waits up to 1 s"
    );
    // 2 completions over 5 s + 1 s: 3 s each, for itself alone in the queue.
    assert_eq!(retry.as_deref(), Some("3"));
    assert_eq!(
        s.queue_events(),
        [(
            "free".to_owned(),
            QueueOutcome::TimedOut,
            Duration::from_secs(1)
        )]
    );
    assert_eq!(s.served(), ["a", "b", "holder"]);
    drop(held);
    // The queue is empty again: the slot is free for the next caller.
    assert_eq!(s.send("free", "next").await.status(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_whose_client_leaves_leaves_the_queue() {
    let s = setup(16);
    let held = s.send("std", "holder").await;
    // Gone while waiting: the queue forgets it.
    let gone = s.spawn("pro", "gone");
    settle_tasks().await;
    gone.abort();
    assert!(gone.await.unwrap_err().is_cancelled());
    // Gone after a release woke it, before it could use it: the wake-up goes on.
    let woken_then_gone = s.spawn("pro", "woken-then-gone");
    let after = s.spawn("std", "after");
    settle_tasks().await;
    drop(held);
    woken_then_gone.abort();
    let (status, _) = support::within("the next waiter", after).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(s.served(), ["holder", "after"]);
    let outcomes: Vec<_> = s.queue_events().into_iter().map(|e| (e.0, e.1)).collect();
    assert_eq!(
        outcomes,
        [
            ("pro".to_owned(), QueueOutcome::Left),
            ("pro".to_owned(), QueueOutcome::Left),
            ("std".to_owned(), QueueOutcome::Admitted)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn past_its_bound_the_queue_refuses_at_once() {
    let s = setup(2);
    let held = s.send("std", "holder").await;
    let waiting = [s.spawn("pro", "w1"), s.spawn("pro", "w2")];
    settle_tasks().await;
    let start = Instant::now();
    let res = s.send("pro", "third").await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(start.elapsed(), Duration::ZERO, "refused without waiting");
    assert!(res.headers().contains_key("retry-after"));
    assert_eq!(
        s.queue_events(),
        [("pro".to_owned(), QueueOutcome::Full, Duration::ZERO)]
    );
    drop(held);
    for t in waiting {
        assert_eq!(
            support::within("a waiter", t).await.unwrap().0,
            StatusCode::OK
        );
    }
    assert_eq!(s.served(), ["holder", "w1", "w2"]);
}

#[tokio::test(start_paused = true)]
async fn a_tier_without_max_wait_is_refused_at_once() {
    let s = setup(16);
    let held = s.send("std", "holder").await;
    let start = Instant::now();
    let res = s.send("none", "untiered").await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(start.elapsed(), Duration::ZERO);
    drop(held);
}

/// A request of `tier` for model `model` through `layer`, answered at once.
fn send_to(
    layer: &RateLimitLayer,
    model: &str,
    tier: &str,
) -> impl std::future::Future<Output = Res> + Send {
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(tower::service_fn(|_: Request<RequestBody<String>>| async {
            Ok::<_, Infallible>(Response::new(String::new()))
        }));
    let req = Request::builder()
        .header("x-model", model)
        .header("x-tier", tier)
        .header("x-user", "u")
        .body(String::new())
        .unwrap();
    async move { svc.oneshot(req).await.unwrap() }
}

/// A memory store whose decisions are taken when asked but answered only when the test
/// gives a permit (in order), as a networked store's round trip; settlements at once.
#[derive(Debug, Clone)]
struct Gated(MemoryStore, Arc<tokio::sync::Semaphore>);

impl Store for Gated {
    fn acquire(&self, charges: &[Charge<'_>]) -> StoreFuture<Result<Decision, StoreError>> {
        let result = self.0.try_acquire(charges);
        let gate = self.1.clone();
        StoreFuture::pending(async move {
            gate.acquire().await.unwrap().forget();
            result
        })
    }
    fn settle(&self, adjustments: &[Adjustment<'_>]) -> StoreFuture<Result<(), StoreError>> {
        self.0.settle(adjustments)
    }
    fn peek(&self, bucket: &BucketKey, quota: &Quota) -> StoreFuture<Result<Snapshot, StoreError>> {
        self.0.peek(bucket, quota)
    }
}

/// A release that reaches a waiter whose entry retry (the try made right after entering
/// the queue, not woken) is admitted with an earlier slot goes on to the next waiter.
#[tokio::test(start_paused = true)]
async fn a_release_during_an_entry_retry_goes_on_to_the_next_waiter() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let layer = RateLimitLayer::builder()
        .replica_id("r")
        .store(Gated(MemoryStore::new(), gate.clone()))
        .rule(
            Rule::new("model-slots", key::header("x-model"), Quota::concurrent(2)).capacity(
                Capacity::fixed(2)
                    .tier("pro", Priority::new(2).max_wait(Duration::from_secs(5)))
                    .tier("std", Priority::new(1).max_wait(Duration::from_secs(5))),
            ),
        )
        .tiers(tier::header("x-tier"))
        .clock(TokioClock(Instant::now()))
        .build()
        .unwrap();
    gate.add_permits(2);
    let h1 = send_to(&layer, "m", "std").await;
    let h2 = send_to(&layer, "m", "std").await;
    assert_eq!((h1.status(), h2.status()), (StatusCode::OK, StatusCode::OK));
    // A (pro) and B (std) are refused; their answers wait for the gate.
    let a = tokio::spawn(send_to(&layer, "m", "pro"));
    settle_tasks().await;
    let b = tokio::spawn(send_to(&layer, "m", "std"));
    settle_tasks().await;
    // A slot comes back while nobody waits.
    drop(h1);
    // A hears its refusal, enters the queue and tries again: admitted (answer gated).
    gate.add_permits(1);
    settle_tasks().await;
    // B hears its refusal, enters the queue behind A and tries again: refused.
    gate.add_permits(1);
    settle_tasks().await;
    // The second slot comes back: its wake-up goes to A, first in the queue.
    drop(h2);
    let start = Instant::now();
    gate.add_permits(100);
    let a = support::within("A", a).await.unwrap();
    assert_eq!(a.status(), StatusCode::OK);
    // A holds one slot of two: B has the other at once.
    let b = support::within("B", b).await.unwrap();
    assert_eq!(
        (b.status(), start.elapsed()),
        (StatusCode::OK, Duration::ZERO)
    );
    drop(a);
}

/// Past the most controllers a rule keeps (4096), the idle ones least recently used make
/// room: a flood of client-chosen model names leaves a later model a working queue.
#[tokio::test(start_paused = true)]
async fn after_a_flood_of_keys_a_new_models_waiter_is_still_woken() {
    let layer = RateLimitLayer::builder()
        .replica_id("r")
        .rule(
            Rule::new("model-slots", key::header("x-model"), Quota::concurrent(1)).capacity(
                Capacity::fixed(1).tier("pro", Priority::new(2).max_wait(Duration::from_secs(5))),
            ),
        )
        .tiers(tier::header("x-tier"))
        .clock(TokioClock(Instant::now()))
        .build()
        .unwrap();
    for i in 0..5000 {
        let res = send_to(&layer, &format!("junk-{i}"), "pro").await;
        assert_eq!(res.status(), StatusCode::OK);
    }
    let held = send_to(&layer, "m", "pro").await;
    assert_eq!(held.status(), StatusCode::OK);
    let waiter = tokio::spawn(send_to(&layer, "m", "pro"));
    settle_tasks().await;
    let start = Instant::now();
    drop(held);
    let res = support::within("the waiter", waiter).await.unwrap();
    assert_eq!(
        (res.status(), start.elapsed()),
        (StatusCode::OK, Duration::ZERO),
        "the released slot goes to the waiter at once"
    );
}

/// A waiter woken, then refused by another rule (its user's requests per minute), is
/// reported as refused, not as a client that left.
#[tokio::test(start_paused = true)]
async fn a_waiter_refused_by_another_rule_is_reported_as_refused() {
    let queued = Queued::default();
    let layer = RateLimitLayer::builder()
        .replica_id("r")
        .observer(queued.clone())
        .rule(
            Rule::new("model-slots", key::header("x-model"), Quota::concurrent(1)).capacity(
                Capacity::fixed(1).tier("pro", Priority::new(2).max_wait(Duration::from_secs(5))),
            ),
        )
        .rule(Rule::new(
            "rpm",
            key::header("x-user"),
            Quota::per_minute(2),
        ))
        .tiers(tier::header("x-tier"))
        .clock(TokioClock(Instant::now()))
        .build()
        .unwrap();
    let held = send_to(&layer, "m", "pro").await;
    let waiter = tokio::spawn(send_to(&layer, "m", "pro"));
    settle_tasks().await;
    // The user's last request of the minute, on another model.
    assert_eq!(send_to(&layer, "m2", "pro").await.status(), StatusCode::OK);
    drop(held);
    let res = support::within("the waiter", waiter).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let outcomes: Vec<_> = queued.0.lock().unwrap().iter().map(|e| e.1).collect();
    assert_eq!(outcomes, [QueueOutcome::Refused]);
}

/// A memory store that counts its decisions.
#[derive(Debug, Clone, Default)]
struct Counted(MemoryStore, Arc<std::sync::atomic::AtomicUsize>);

impl Counted {
    fn calls(&self) -> usize {
        self.1.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Store for Counted {
    fn acquire(&self, charges: &[Charge<'_>]) -> StoreFuture<Result<Decision, StoreError>> {
        self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.0.acquire(charges)
    }
    fn settle(&self, adjustments: &[Adjustment<'_>]) -> StoreFuture<Result<(), StoreError>> {
        self.0.settle(adjustments)
    }
    fn peek(&self, bucket: &BucketKey, quota: &Quota) -> StoreFuture<Result<Snapshot, StoreError>> {
        self.0.peek(bucket, quota)
    }
}

/// A release whose slot a newcomer takes before the woken waiter tries again: the waiter,
/// refused by the full bucket, keeps its place and wakes nobody else (they would all be
/// refused by the same full bucket, a store call each).
#[tokio::test(start_paused = true)]
async fn a_waiter_refused_by_a_full_bucket_does_not_wake_the_next() {
    let store = Counted::default();
    let s = setup_with(16, store.clone());
    let held = s.send("std", "holder").await;
    let waiters: Vec<_> = (0..5).map(|i| s.spawn("pro", &format!("w{i}"))).collect();
    settle_tasks().await;
    let before = store.calls();
    // The slot comes back, and a newcomer takes it before the woken waiter runs.
    drop(held);
    let newcomer = s.send("std", "newcomer").await;
    assert_eq!(newcomer.status(), StatusCode::OK);
    settle_tasks().await;
    assert_eq!(store.calls() - before, 2, "the newcomer's and one waiter's");
    // The newcomer's slot comes back: the waiters are served in order all the same.
    drop(newcomer);
    for w in waiters {
        assert_eq!(
            support::within("a waiter", w).await.unwrap().0,
            StatusCode::OK
        );
    }
    assert_eq!(
        s.served(),
        ["holder", "newcomer", "w0", "w1", "w2", "w3", "w4"]
    );
}

/// A refusal's `Retry-After` counts the waiters that would be served before the caller
/// (of its priority or higher), not those of lower tiers.
#[tokio::test(start_paused = true)]
async fn a_retry_after_counts_only_the_waiters_ahead_of_the_caller() {
    let s = setup(2);
    // Two completions 10 s apart: 2 over the last 5 s window and the one under way.
    drop(s.send("pro", "a").await);
    tokio::time::advance(Duration::from_secs(10)).await;
    drop(s.send("pro", "b").await);
    let held = s.send("pro", "holder").await;
    let free = [s.spawn("free", "f1"), s.spawn("free", "f2")];
    settle_tasks().await;
    // The queue is full: pro is refused at once, with nobody ahead of it.
    let res = s.send("pro", "p").await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers()["retry-after"], "3", "2.5 s for itself alone");
    // A free caller has both free waiters ahead.
    let res = s.send("free", "f3").await;
    assert_eq!(res.headers()["retry-after"], "8", "7.5 s for three");
    drop(held);
    for t in free {
        assert_eq!(
            support::within("a waiter", t).await.unwrap().0,
            StatusCode::OK
        );
    }
}

/// A waiter refused at the saturation threshold hands the wake-up on past the waiters of
/// its own tier (they would be refused the same way, a store call each) to the next tier.
#[tokio::test(start_paused = true)]
async fn a_wake_up_handed_on_skips_the_waiters_of_the_refused_tier() {
    let store = Counted::default();
    let wait = Duration::from_secs(5);
    let layer = RateLimitLayer::builder()
        .replica_id("r")
        .store(store.clone())
        .rule(
            Rule::new("model-slots", key::header("x-model"), Quota::concurrent(4)).capacity(
                Capacity::fixed(4)
                    .saturation(0.5)
                    .tier("pro", Priority::new(2).reserve(0.5).max_wait(wait))
                    .tier("free", Priority::new(1).max_wait(wait))
                    .tier("batch", Priority::new(0).reserve(0.25).max_wait(wait)),
            ),
        )
        .tiers(tier::header("x-tier"))
        .clock(TokioClock(Instant::now()))
        .build()
        .unwrap();
    // Free fills the threshold (2), pro its reserve (2): the capacity is full.
    let mut held = Vec::new();
    for t in ["free", "free", "pro", "pro"] {
        let res = send_to(&layer, "m", t).await;
        assert_eq!(res.status(), StatusCode::OK);
        held.push(res);
    }
    let free: Vec<_> = (0..3)
        .map(|_| tokio::spawn(send_to(&layer, "m", "free")))
        .collect();
    settle_tasks().await;
    let batch = tokio::spawn(send_to(&layer, "m", "batch"));
    settle_tasks().await;
    let before = store.calls();
    // A pro slot comes back: 3 in flight, past the threshold. The first free waiter is
    // refused; batch (its reserve, 1, free) is admitted.
    drop(held.pop());
    let batch = support::within("batch", batch).await.unwrap();
    assert_eq!(batch.status(), StatusCode::OK);
    assert_eq!(store.calls() - before, 3, "free once, batch's two attempts");
    drop(held);
    drop(batch);
    for f in free {
        assert_eq!(
            support::within("a free waiter", f).await.unwrap().status(),
            StatusCode::OK
        );
    }
}

/// A rebuilt layer that lists the same tiers in another order shares the queues of its
/// predecessor: a wake-up handed on past the waiters of a refused tier skips that tier by
/// name, not by its place in either configuration's list.
#[tokio::test(start_paused = true)]
async fn a_reload_reordering_tiers_hands_wake_ups_on_by_tier_name() {
    let wait = Duration::from_secs(5);
    let capacity = |tiers: &[&str]| {
        tiers
            .iter()
            .fold(Capacity::fixed(4).saturation(0.5), |c, t| {
                let p = match *t {
                    "pro" => Priority::new(2).reserve(0.5),
                    "free" => Priority::new(1),
                    _ => Priority::new(0).reserve(0.25),
                };
                c.tier(*t, p.max_wait(wait))
            })
    };
    let rule = |tiers: &[&str]| {
        Rule::new("model-slots", key::header("x-model"), Quota::concurrent(4))
            .capacity(capacity(tiers))
    };
    let store = MemoryStore::new();
    let old = RateLimitLayer::builder()
        .replica_id("r")
        .store(store.clone())
        .rule(rule(&["pro", "free", "batch"]))
        .tiers(tier::header("x-tier"))
        .clock(TokioClock(Instant::now()))
        .build()
        .unwrap();
    // Free fills the threshold (2), pro its reserve (2): the capacity is full.
    let mut held = Vec::new();
    for t in ["free", "free", "pro", "pro"] {
        let res = send_to(&old, "m", t).await;
        assert_eq!(res.status(), StatusCode::OK);
        held.push(res);
    }
    // Same controller settings: the new layer shares the old one's controller of `m`, and
    // its queue. `batch` is now where `free` was.
    let new = RateLimitLayer::builder()
        .store(store)
        .rule(rule(&["pro", "batch", "free"]))
        .tiers(tier::header("x-tier"))
        .continue_capacity_of(&old)
        .build()
        .unwrap();
    let free = tokio::spawn(send_to(&old, "m", "free"));
    settle_tasks().await;
    let batch = tokio::spawn(send_to(&new, "m", "batch"));
    settle_tasks().await;
    // A pro slot comes back: 3 in flight, past the threshold. The free waiter is refused and
    // hands the wake-up on to batch (its reserve, 1, free), admitted at once.
    drop(held.pop());
    let start = Instant::now();
    let batch = support::within("batch", batch).await.unwrap();
    assert_eq!(
        (batch.status(), start.elapsed()),
        (StatusCode::OK, Duration::ZERO)
    );
    drop(held);
    drop(batch);
    assert_eq!(
        support::within("the free waiter", free)
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
}

/// A rebuilt layer whose capacity moves the limit otherwise (its controller starts afresh)
/// still shares its predecessor's queue: a slot released by a request the old layer
/// admitted wakes a waiter of the new one.
#[tokio::test(start_paused = true)]
async fn a_reload_changing_the_capacity_keeps_the_queue_woken_by_old_releases() {
    let rule = |cap: Capacity| {
        Rule::new("model-slots", key::header("x-model"), Quota::concurrent(1))
            .capacity(cap.tier("pro", Priority::new(1).max_wait(Duration::from_secs(5))))
    };
    let store = MemoryStore::new();
    let old = RateLimitLayer::builder()
        .replica_id("r")
        .store(store.clone())
        .rule(rule(Capacity::fixed(1)))
        .tiers(tier::header("x-tier"))
        .clock(TokioClock(Instant::now()))
        .build()
        .unwrap();
    let held = send_to(&old, "m", "pro").await;
    assert_eq!(held.status(), StatusCode::OK);
    let new = RateLimitLayer::builder()
        .store(store)
        .rule(rule(Capacity::fixed(1).interval(Duration::from_secs(2))))
        .tiers(tier::header("x-tier"))
        .continue_capacity_of(&old)
        .build()
        .unwrap();
    let waiter = tokio::spawn(send_to(&new, "m", "pro"));
    settle_tasks().await;
    // The old layer's request ends: its slot goes to the new layer's waiter at once.
    drop(held);
    let start = Instant::now();
    let waiter = support::within("the waiter", waiter).await.unwrap();
    assert_eq!(
        (waiter.status(), start.elapsed()),
        (StatusCode::OK, Duration::ZERO)
    );
}

/// A slot released while a caller of a higher priority waits goes to it, not to a newcomer
/// of a lower priority that comes first: outside a tier's reserve, the bucket is open to a
/// caller less one slot per waiter above it. So a saturation of 1 (no threshold) lets free
/// fill the whole capacity and still gives pro the next slot.
#[tokio::test(start_paused = true)]
async fn a_newcomer_of_a_lower_priority_does_not_take_a_slot_from_a_waiter_above_it() {
    let layer = RateLimitLayer::builder()
        .replica_id("r")
        .rule(
            Rule::new("model-slots", key::header("x-model"), Quota::concurrent(2)).capacity(
                Capacity::fixed(2)
                    .tier("pro", Priority::new(2).max_wait(Duration::from_secs(5)))
                    .tier("free", Priority::new(0)),
            ),
        )
        .tiers(tier::header("x-tier"))
        .clock(TokioClock(Instant::now()))
        .build()
        .unwrap();
    // Free fills the capacity; pro waits.
    let mut held = Vec::new();
    for _ in 0..2 {
        let res = send_to(&layer, "m", "free").await;
        assert_eq!(res.status(), StatusCode::OK);
        held.push(res);
    }
    let pro = tokio::spawn(send_to(&layer, "m", "pro"));
    settle_tasks().await;
    assert!(!pro.is_finished(), "pro waits");
    // A slot comes back, and a free newcomer asks before the woken waiter runs: refused.
    drop(held.pop());
    let newcomer = send_to(&layer, "m", "free").await;
    assert_eq!(newcomer.status(), StatusCode::TOO_MANY_REQUESTS);
    let pro = support::within("the pro waiter", pro).await.unwrap();
    assert_eq!(pro.status(), StatusCode::OK);
    // With nobody above it waiting, free has the whole capacity again.
    drop(pro);
    let again = send_to(&layer, "m", "free").await;
    assert_eq!(again.status(), StatusCode::OK);
}

/// A waiter held back for one above it (the bucket one slot smaller for it) whose answer
/// comes back after that one was admitted tries once more: the slot it was held back for is
/// free. (With a store doing I/O, both retries are at the store at once.)
#[tokio::test(start_paused = true)]
async fn a_waiter_held_back_for_one_admitted_meanwhile_tries_again() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let layer = RateLimitLayer::builder()
        .replica_id("r")
        .store(Gated(MemoryStore::new(), gate.clone()))
        .rule(
            Rule::new("model-slots", key::header("x-model"), Quota::concurrent(2)).capacity(
                Capacity::fixed(2)
                    .tier("pro", Priority::new(2).max_wait(Duration::from_secs(5)))
                    .tier("std", Priority::new(1).max_wait(Duration::from_secs(5)))
                    .tier("free", Priority::new(0)),
            ),
        )
        .tiers(tier::header("x-tier"))
        .clock(TokioClock(Instant::now()))
        .build()
        .unwrap();
    gate.add_permits(2);
    let h1 = send_to(&layer, "m", "free").await;
    let h2 = send_to(&layer, "m", "free").await;
    assert_eq!((h1.status(), h2.status()), (StatusCode::OK, StatusCode::OK));
    // H (pro), then L (std), refused twice each (first try, entry retry): both wait.
    let h = tokio::spawn(send_to(&layer, "m", "pro"));
    settle_tasks().await;
    gate.add_permits(2);
    settle_tasks().await;
    let l = tokio::spawn(send_to(&layer, "m", "std"));
    settle_tasks().await;
    gate.add_permits(2);
    settle_tasks().await;
    // A slot comes back: H tries again (admitted, its answer gated). The other: L tries
    // again while H still waits, so at a bucket of 1 for it, with H's slot taken: refused.
    drop(h1);
    settle_tasks().await;
    drop(h2);
    settle_tasks().await;
    // H hears it is admitted and leaves the queue; then L hears its refusal.
    let start = Instant::now();
    gate.add_permits(1);
    settle_tasks().await;
    gate.add_permits(100);
    let h = support::within("H", h).await.unwrap();
    assert_eq!(h.status(), StatusCode::OK);
    let l = support::within("L", l).await.unwrap();
    assert_eq!(
        (l.status(), start.elapsed()),
        (StatusCode::OK, Duration::ZERO)
    );
}
