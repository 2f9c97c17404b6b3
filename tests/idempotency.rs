//! Idempotent retries through the real layer, in both stores (the memory store, and a real
//! `redis-server` started by the harness): one test per row of the table in the `store`
//! module docs ("Idempotent retries"), and the abuse that the header must not allow (20
//! different requests under one id, against a limit of 10 per minute).
//!
//! Every test is written once, as an `async fn(Env)`, and run against each store by the
//! `both_stores!` macro. Time is a frozen [`ManualClock`]; every wait is bounded.

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use tokio::sync::Semaphore;
use tower::{Service, ServiceExt};
use tower_llm_ratelimit::capacity::{Capacity, Priority};
use tower_llm_ratelimit::clock::ManualClock;
use tower_llm_ratelimit::store::{BucketKey, MemoryStore, Store};
use tower_llm_ratelimit::{
    cost, key, tier, Quota, RateLimitLayer, RateLimitLayerBuilder, RequestBody, ResponseBody, Rule,
};

use support::within;

/// The rules every test uses: a request rule (10 per minute, or what the test sets), a token
/// rule (100 tokens estimated per request, 10,000 per minute) and 2 concurrent requests, all
/// keyed by `x-api-key`.
fn rpm(limit: u64) -> Quota {
    Quota::per_minute(limit)
}
fn tpm() -> Quota {
    Quota::per_minute(10_000).tokens()
}
fn slots() -> Quota {
    Quota::concurrent(2)
}

/// One store under test, and its clock (frozen at 1,000 s).
struct Env {
    store: Arc<dyn Store>,
    clock: ManualClock,
    /// Keeps the Redis server alive for the test.
    _server: Option<Box<dyn std::any::Any + Send>>,
}

impl Env {
    fn memory() -> Self {
        let clock = ManualClock::new();
        clock.set(Duration::from_secs(1_000));
        let store = MemoryStore::builder().clock(clock.clone()).build();
        Env {
            store: Arc::new(store),
            clock,
            _server: None,
        }
    }

    #[cfg(feature = "redis")]
    async fn redis() -> Option<Self> {
        let server = support::redis::RedisServer::start()?;
        let clock = ManualClock::new();
        clock.set(Duration::from_secs(1_000));
        let store = within(
            "connecting to redis-server",
            tower_llm_ratelimit::store::RedisStore::builder(server.url())
                .prefix("rl")
                .clock(clock.clone())
                .timeout(Duration::from_secs(5))
                .connect(),
        )
        .await
        .expect("connect");
        Some(Env {
            store: Arc::new(store),
            clock,
            _server: Some(Box::new(server)),
        })
    }

    fn builder(&self, rpm_limit: u64) -> RateLimitLayerBuilder {
        RateLimitLayer::builder()
            .rule(Rule::new("rpm", key::header("x-api-key"), rpm(rpm_limit)))
            .rule(Rule::new("tpm", key::header("x-api-key"), tpm()))
            .rule(Rule::new("slots", key::header("x-api-key"), slots()))
            .cost(cost::from_fn(|_| Some(100)))
            .idempotency_header("x-request-id")
            .store(Arc::clone(&self.store))
    }

    fn app(&self, rpm_limit: u64) -> App {
        App::new(self.builder(rpm_limit).build().expect("layer"))
    }

    /// `remaining` of `rule`'s bucket for `caller`.
    async fn remaining(&self, rule: &str, caller: &str) -> u64 {
        let quota = match rule {
            "rpm" => rpm(10),
            "tpm" => tpm(),
            _ => slots(),
        };
        let bucket = BucketKey::new(rule, caller);
        within("peek", self.store.peek(&bucket, &quota))
            .await
            .expect("peek")
            .remaining
    }
}

/// The layer around an upstream that answers the status in `x-status` (200 by default), and
/// waits for a permit of `held` first when `x-hold` is set.
#[derive(Clone)]
struct App {
    layer: RateLimitLayer,
    held: Arc<Semaphore>,
    /// Requests that reached the upstream so far.
    entered: Arc<AtomicUsize>,
}

type Svc =
    tower::util::BoxCloneService<Request<String>, Response<ResponseBody<String>>, Infallible>;

impl App {
    fn new(layer: RateLimitLayer) -> Self {
        Self {
            layer,
            held: Arc::new(Semaphore::new(0)),
            entered: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn service(&self) -> Svc {
        let held = Arc::clone(&self.held);
        let entered = Arc::clone(&self.entered);
        let upstream = tower::service_fn(move |req: Request<RequestBody<String>>| {
            let held = Arc::clone(&held);
            entered.fetch_add(1, Ordering::SeqCst);
            async move {
                if req.headers().contains_key("x-hold") {
                    let permit = held.acquire().await.expect("semaphore open");
                    permit.forget();
                }
                let status = req
                    .headers()
                    .get("x-status")
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .unwrap_or(200);
                let mut res = Response::new(String::new());
                *res.status_mut() = StatusCode::from_u16(status).expect("status");
                Ok::<_, Infallible>(res)
            }
        });
        tower::util::BoxCloneService::new(
            tower::ServiceBuilder::new()
                .layer(self.layer.clone())
                .service(upstream),
        )
    }

    /// Sends `req`, reads the whole response (so it settles), and waits for the settlements
    /// running in the background (Redis).
    async fn send(&self, req: Request<String>) -> StatusCode {
        let res = within("the response", self.service().oneshot(req))
            .await
            .expect("infallible");
        let status = res.status();
        let _ = within(
            "the body",
            http_body_util::BodyExt::collect(res.into_body()),
        )
        .await;
        within("background settlements", self.layer.flush()).await;
        status
    }

    /// Starts `req` (it must carry `x-hold`) and returns once the upstream holds it.
    async fn start_held(&self, req: Request<String>) -> tokio::task::JoinHandle<StatusCode> {
        let mut svc = self.service();
        let this = self.clone();
        let before = self.entered.load(Ordering::SeqCst);
        let task = tokio::spawn(async move {
            let res = svc
                .ready()
                .await
                .expect("ready")
                .call(req)
                .await
                .expect("infallible");
            let status = res.status();
            let _ = http_body_util::BodyExt::collect(res.into_body()).await;
            this.layer.flush().await;
            status
        });
        within("the request to reach the upstream", async {
            while self.entered.load(Ordering::SeqCst) == before {
                tokio::task::yield_now().await;
            }
        })
        .await;
        task
    }

    fn release(&self, n: usize) {
        self.held.add_permits(n);
    }
}

/// A chat request of `caller` with id `id` and body `body`.
fn req(caller: &str, id: &str, body: &str) -> http::request::Builder {
    Request::builder()
        .method(Method::POST)
        .uri("/v1/chat/completions")
        .header("x-api-key", caller)
        .header("x-request-id", id)
        .header("content-type", "application/json")
        .header("content-length", body.len())
}

fn ok(caller: &str, id: &str, body: &str) -> Request<String> {
    req(caller, id, body).body(body.to_owned()).unwrap()
}

fn failing(caller: &str, id: &str, body: &str, status: u16) -> Request<String> {
    req(caller, id, body)
        .header("x-status", status)
        .body(body.to_owned())
        .unwrap()
}

fn held(caller: &str, id: &str, body: &str) -> Request<String> {
    req(caller, id, body)
        .header("x-hold", "1")
        .body(body.to_owned())
        .unwrap()
}

const BODY: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;

/// Row "failed": a retry of an attempt the upstream failed is free on the request rule; the
/// token rule charges its estimate and settles it; each attempt has its own slot.
async fn a_retry_after_an_upstream_error_is_free_on_request_rules(env: Env) {
    let app = env.app(10);
    assert_eq!(
        app.send(failing("alice", "r1", BODY, 503)).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        env.remaining("rpm", "alice").await,
        9,
        "the failure counted"
    );
    assert_eq!(
        env.remaining("tpm", "alice").await,
        10_000,
        "tokens refunded"
    );
    assert_eq!(env.remaining("slots", "alice").await, 2, "slot released");

    assert_eq!(app.send(ok("alice", "r1", BODY)).await, StatusCode::OK);
    assert_eq!(env.remaining("rpm", "alice").await, 9, "the retry is free");
    assert_eq!(
        env.remaining("tpm", "alice").await,
        9_900,
        "the retry's tokens are charged (no usage: the estimate is kept)"
    );
    assert_eq!(env.remaining("slots", "alice").await, 2);

    // That retry succeeded: a repeat of it is a new request.
    assert_eq!(app.send(ok("alice", "r1", BODY)).await, StatusCode::OK);
    assert_eq!(env.remaining("rpm", "alice").await, 8);
}

/// Row "failed", for an answer the layer treats as failed other than a 5xx (a 4xx), and
/// with `count_failed_requests(false)`: the failed attempt stays counted (its retry goes
/// free instead), so the request and its retry count once, not zero times.
async fn a_failed_attempt_with_an_id_stays_counted_whatever_count_failed_requests_says(env: Env) {
    let app = App::new(
        env.builder(10)
            .count_failed_requests(false)
            .build()
            .expect("layer"),
    );
    assert_eq!(
        app.send(failing("alice", "r1", BODY, 429)).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(env.remaining("rpm", "alice").await, 9);
    assert_eq!(app.send(ok("alice", "r1", BODY)).await, StatusCode::OK);
    assert_eq!(env.remaining("rpm", "alice").await, 9);
    // Without an id, a failure is refunded as configured.
    let no_id = Request::builder()
        .header("x-api-key", "alice")
        .header("x-status", 500)
        .body(String::new())
        .unwrap();
    assert_eq!(app.send(no_id).await, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(env.remaining("rpm", "alice").await, 9);
}

/// Row "cut off before its response began": free, as a failure.
async fn a_retry_after_an_attempt_cut_off_before_its_response_is_free(env: Env) {
    let app = env.app(10);
    let attempt = app.start_held(held("alice", "r1", BODY)).await;
    assert_eq!(env.remaining("slots", "alice").await, 1, "in the upstream");
    attempt.abort();
    let _ = within("the aborted attempt", attempt).await;
    within("background settlements", app.layer.flush()).await;
    assert_eq!(env.remaining("rpm", "alice").await, 9);
    assert_eq!(env.remaining("slots", "alice").await, 2, "slot released");

    assert_eq!(app.send(ok("alice", "r1", BODY)).await, StatusCode::OK);
    assert_eq!(env.remaining("rpm", "alice").await, 9, "the retry is free");
}

/// Row "succeeded": a repeat is charged like a new request, up to the limit.
async fn a_repeat_of_a_request_that_succeeded_is_charged(env: Env) {
    let app = env.app(10);
    for _ in 0..10 {
        assert_eq!(app.send(ok("alice", "r1", BODY)).await, StatusCode::OK);
    }
    assert_eq!(env.remaining("rpm", "alice").await, 0);
    assert_eq!(
        app.send(ok("alice", "r1", BODY)).await,
        StatusCode::TOO_MANY_REQUESTS
    );
}

/// Row "still in flight": a repeat is charged, and takes a slot of its own.
async fn a_repeat_of_a_request_in_flight_is_charged(env: Env) {
    let app = env.app(10);
    let first = app.start_held(held("alice", "r1", BODY)).await;
    let second = app.start_held(held("alice", "r1", BODY)).await;
    assert_eq!(env.remaining("rpm", "alice").await, 8);
    assert_eq!(env.remaining("slots", "alice").await, 0, "a slot each");
    app.release(2);
    for t in [first, second] {
        assert_eq!(within("a held attempt", t).await.unwrap(), StatusCode::OK);
    }
    assert_eq!(env.remaining("slots", "alice").await, 2);
    assert_eq!(env.remaining("rpm", "alice").await, 8);
}

/// Row "other body, method, path or query": not a retry.
async fn a_repeat_with_another_body_method_or_path_is_charged(env: Env) {
    let app = env.app(10);
    assert_eq!(
        app.send(failing("alice", "r1", BODY, 500)).await,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(env.remaining("rpm", "alice").await, 9);
    let other_body = BODY.replace("hi", "ho");
    assert_eq!(
        app.send(ok("alice", "r1", &other_body)).await,
        StatusCode::OK
    );
    assert_eq!(env.remaining("rpm", "alice").await, 8);
    let other_path = req("alice", "r1", BODY)
        .uri("/v1/completions")
        .body(BODY.to_owned())
        .unwrap();
    assert_eq!(app.send(other_path).await, StatusCode::OK);
    let other_method = req("alice", "r1", BODY)
        .method(Method::PUT)
        .body(BODY.to_owned())
        .unwrap();
    assert_eq!(app.send(other_method).await, StatusCode::OK);
    assert_eq!(env.remaining("rpm", "alice").await, 6);
    // The real retry is still free.
    assert_eq!(app.send(ok("alice", "r1", BODY)).await, StatusCode::OK);
    assert_eq!(env.remaining("rpm", "alice").await, 6);
}

/// Row "other rules or keys": another caller's request with the same id and body is its own
/// request, decided afresh; the first caller's retry stays free.
async fn a_repeat_by_another_caller_is_charged(env: Env) {
    let app = env.app(10);
    assert_eq!(
        app.send(failing("alice", "r1", BODY, 500)).await,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(app.send(ok("bob", "r1", BODY)).await, StatusCode::OK);
    assert_eq!(env.remaining("rpm", "bob").await, 9);
    assert_eq!(env.remaining("rpm", "alice").await, 9);
    // A layer with one rule more names other buckets: decided afresh.
    let more = App::new(
        env.builder(10)
            .rule(Rule::new("global", key::global(), Quota::per_minute(100)))
            .build()
            .expect("layer"),
    );
    assert_eq!(more.send(ok("alice", "r1", BODY)).await, StatusCode::OK);
    assert_eq!(env.remaining("rpm", "alice").await, 8);
    assert_eq!(app.send(ok("alice", "r1", BODY)).await, StatusCode::OK);
    assert_eq!(
        env.remaining("rpm", "alice").await,
        8,
        "alice's retry is free"
    );
}

/// Row "failed, but the free retries are used up": a request that always fails is charged
/// again after `MAX_FREE_RETRIES` free retries.
async fn free_retries_of_one_request_are_bounded(env: Env) {
    assert_eq!(tower_llm_ratelimit::store::MAX_FREE_RETRIES, 3);
    let app = env.app(10);
    for expected in [9, 9, 9, 9, 8, 7] {
        assert_eq!(
            app.send(failing("alice", "r1", BODY, 500)).await,
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(env.remaining("rpm", "alice").await, expected);
    }
}

/// A free retry is still decided: a concurrency (or token) rule may deny it, and a denied
/// retry keeps the failure for the next one.
async fn a_free_retry_is_still_decided_by_the_other_rules(env: Env) {
    let app = env.app(10);
    assert_eq!(
        app.send(failing("alice", "r1", BODY, 500)).await,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    let a = app.start_held(held("alice", "other-1", BODY)).await;
    let b = app.start_held(held("alice", "other-2", BODY)).await;
    assert_eq!(env.remaining("slots", "alice").await, 0);
    assert_eq!(
        app.send(ok("alice", "r1", BODY)).await,
        StatusCode::TOO_MANY_REQUESTS,
        "no slot for the retry"
    );
    app.release(2);
    for t in [a, b] {
        assert_eq!(within("a held attempt", t).await.unwrap(), StatusCode::OK);
    }
    assert_eq!(env.remaining("rpm", "alice").await, 7);
    assert_eq!(app.send(ok("alice", "r1", BODY)).await, StatusCode::OK);
    assert_eq!(env.remaining("rpm", "alice").await, 7, "still free");
}

/// The abuse of the issue: 20 different requests that all carry one id, against 10 per
/// minute, admit exactly 10; 5 more with fresh ids are denied.
async fn one_id_on_many_requests_admits_exactly_the_limit(env: Env) {
    let app = env.app(10);
    let mut admitted = 0;
    for i in 0..20 {
        let body = format!(r#"{{"model":"m","messages":[{{"role":"user","content":"{i}"}}]}}"#);
        if app.send(ok("alice", "same-id", &body)).await == StatusCode::OK {
            admitted += 1;
        }
    }
    // The same body again and again, too.
    for _ in 0..5 {
        if app.send(ok("alice", "same-id", BODY)).await == StatusCode::OK {
            admitted += 1;
        }
    }
    for i in 0..5 {
        let status = app.send(ok("alice", &format!("fresh-{i}"), BODY)).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    }
    assert_eq!(admitted, 10);
}

/// An adaptive capacity's buckets are per replica (`{key}@{replica}`, and with tiers the
/// tier's own `{rule}#{tier}`): a retry through another replica, or after a restart with
/// another replica id, is still the same request, free on the request rule.
async fn a_retry_through_another_replica_is_free(env: Env) {
    let replica = |id: &str| {
        App::new(
            env.builder(10)
                .rule(
                    Rule::new(
                        "model-slots",
                        key::header("x-api-key"),
                        Quota::concurrent(8),
                    )
                    .capacity(
                        Capacity::fixed(8)
                            .saturation(0.5)
                            .tier("pro", Priority::new(1).reserve(0.5)),
                    ),
                )
                .tiers(tier::header("x-tier"))
                .replica_id(id)
                .build()
                .expect("layer"),
        )
    };
    let (r1, r2) = (replica("r1"), replica("r2"));
    assert_eq!(
        r1.send(failing("alice", "r1", BODY, 503)).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        env.remaining("rpm", "alice").await,
        9,
        "the failure counted"
    );
    assert_eq!(r2.send(ok("alice", "r1", BODY)).await, StatusCode::OK);
    assert_eq!(env.remaining("rpm", "alice").await, 9, "the retry is free");
}

macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Env::memory()).await;
                }
            )*
        }
        #[cfg(feature = "redis")]
        mod redis {
            $(
                #[tokio::test]
                async fn $name() {
                    let Some(env) = super::Env::redis().await else {
                        return;
                    };
                    super::$name(env).await;
                }
            )*
        }
    };
}

both_stores!(
    a_retry_after_an_upstream_error_is_free_on_request_rules,
    a_retry_through_another_replica_is_free,
    a_failed_attempt_with_an_id_stays_counted_whatever_count_failed_requests_says,
    a_retry_after_an_attempt_cut_off_before_its_response_is_free,
    a_repeat_of_a_request_that_succeeded_is_charged,
    a_repeat_of_a_request_in_flight_is_charged,
    a_repeat_with_another_body_method_or_path_is_charged,
    a_repeat_by_another_caller_is_charged,
    free_retries_of_one_request_are_bounded,
    a_free_retry_is_still_decided_by_the_other_rules,
    one_id_on_many_requests_admits_exactly_the_limit,
);

/// Row "forgotten", memory store: past its TTL, and when the table is full (the new failure
/// isn't remembered: its retry is charged, the safe side).
#[tokio::test]
async fn memory_forgets_past_the_ttl_and_at_the_cap() {
    let env = Env::memory();
    let app = env.app(10);
    assert_eq!(
        app.send(failing("alice", "r1", BODY, 500)).await.as_u16(),
        500
    );
    env.clock.advance(Duration::from_secs(121));
    assert_eq!(app.send(ok("alice", "r1", BODY)).await, StatusCode::OK);
    // The failure's own charge has left the window by now: only the retry's is left.
    assert_eq!(env.remaining("rpm", "alice").await, 9, "forgotten: charged");

    let clock = ManualClock::new();
    let store = Arc::new(
        MemoryStore::builder()
            .clock(clock.clone())
            .max_idempotency_ids(1)
            .build(),
    );
    let env = Env {
        store: store.clone(),
        clock,
        _server: None,
    };
    let app = env.app(10);
    assert_eq!(
        app.send(failing("alice", "r1", BODY, 500)).await.as_u16(),
        500
    );
    assert_eq!(
        app.send(failing("alice", "r2", BODY, 500)).await.as_u16(),
        500
    );
    assert_eq!(store.idempotency_ids(), 1, "bounded");
    assert_eq!(env.remaining("rpm", "alice").await, 8);
    assert_eq!(app.send(ok("alice", "r2", BODY)).await, StatusCode::OK);
    assert_eq!(
        env.remaining("rpm", "alice").await,
        7,
        "not remembered: charged"
    );
    assert_eq!(app.send(ok("alice", "r1", BODY)).await, StatusCode::OK);
    assert_eq!(env.remaining("rpm", "alice").await, 7, "remembered: free");
}

/// Row "forgotten", Redis: the record of a failure expires with the idempotency TTL, and a
/// request that never fails writes none.
#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_records_only_failures_and_expire_them() {
    let Some(env) = Env::redis().await else {
        return;
    };
    let server = env
        ._server
        .as_ref()
        .and_then(|s| s.downcast_ref::<support::redis::RedisServer>())
        .expect("the server");
    let app = env.app(10);
    assert_eq!(app.send(ok("alice", "r1", BODY)).await, StatusCode::OK);
    let idem = |server: &support::redis::RedisServer| -> Vec<String> {
        server
            .keys()
            .into_iter()
            .filter(|k| k.contains(":idem:"))
            .collect()
    };
    assert!(idem(server).is_empty(), "{:?}", server.keys());
    assert_eq!(
        app.send(failing("alice", "r1", BODY, 500)).await.as_u16(),
        500
    );
    let keys = idem(server);
    assert_eq!(keys.len(), 1, "{keys:?}");
    let ttl: i64 = server
        .cli(&["PTTL", &keys[0]])
        .and_then(|o| o.trim().parse().ok())
        .expect("PTTL");
    assert!(ttl <= 120_000 && ttl > 110_000, "{ttl}");
    // Gone (expired, as Redis would after the TTL): the retry is charged.
    server.cli(&["DEL", &keys[0]]).expect("DEL");
    assert_eq!(app.send(ok("alice", "r1", BODY)).await, StatusCode::OK);
    assert_eq!(env.remaining("rpm", "alice").await, 7);
}

/// An idempotency TTL past what Redis takes (`Duration::MAX`) is clamped: failures are still
/// recorded, and their retries free.
#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_a_huge_idempotency_ttl_still_records_failures() {
    let Some(server) = support::redis::RedisServer::start() else {
        return;
    };
    let clock = ManualClock::new();
    clock.set(Duration::from_secs(1_000));
    let store = within(
        "connecting to redis-server",
        tower_llm_ratelimit::store::RedisStore::builder(server.url())
            .prefix("rl")
            .clock(clock.clone())
            .timeout(Duration::from_secs(5))
            .idempotency_ttl(Duration::MAX)
            .connect(),
    )
    .await
    .expect("connect");
    let env = Env {
        store: Arc::new(store),
        clock,
        _server: Some(Box::new(server)),
    };
    let app = env.app(10);
    assert_eq!(
        app.send(failing("alice", "r1", BODY, 500)).await.as_u16(),
        500
    );
    assert_eq!(app.send(ok("alice", "r1", BODY)).await, StatusCode::OK);
    assert_eq!(env.remaining("rpm", "alice").await, 9, "the retry was free");
}

/// A streamed request body (no `content-length`: gRPC, a chunked upload) is never held back
/// to digest it: the upstream gets the request while the client still sends, and the
/// request has no identity (charged).
#[tokio::test]
async fn a_streamed_body_is_not_held_back_for_its_digest() {
    let env = Env::memory();
    let layer = env.builder(10).build().expect("layer");
    let (reached_tx, reached_rx) = tokio::sync::oneshot::channel::<()>();
    let reached_tx = Arc::new(std::sync::Mutex::new(Some(reached_tx)));
    let upstream = tower::service_fn(move |_req: Request<RequestBody<Streamed>>| {
        if let Some(tx) = reached_tx.lock().unwrap().take() {
            let _ = tx.send(());
        }
        async { Ok::<_, Infallible>(Response::new(String::new())) }
    });
    let svc = tower::ServiceBuilder::new().layer(layer).service(upstream);
    let (sender, rx) = tokio::sync::mpsc::channel(1);
    let body = Streamed(rx);
    let req = Request::builder()
        .method(Method::POST)
        .uri("/v1/chat/completions")
        .header("x-api-key", "alice")
        .header("x-request-id", "r1")
        .body(body)
        .unwrap();
    sender
        .send(bytes::Bytes::from_static(b"{\"model\":"))
        .await
        .expect("send");
    let call = tokio::spawn(svc.oneshot(req));
    within(
        "the upstream to get the request, the body still open",
        reached_rx,
    )
    .await
    .expect("reached");
    drop(sender);
    let res = within("the response", call).await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(env.remaining("rpm", "alice").await, 9);
}

/// A request body streamed by the test, of undeclared length.
struct Streamed(tokio::sync::mpsc::Receiver<bytes::Bytes>);

impl http_body::Body for Streamed {
    type Data = bytes::Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(http_body::Frame::data(c))))
    }
}

/// A request without a body (and without `content-length`) has an identity too: the retry
/// of a failed `GET` is free.
#[tokio::test]
async fn a_bodiless_request_has_an_identity() {
    let env = Env::memory();
    let app = env.app(10);
    let get = |status: u16| {
        Request::builder()
            .uri("/v1/models")
            .header("x-api-key", "alice")
            .header("x-request-id", "g1")
            .header("x-status", status)
            .body(String::new())
            .unwrap()
    };
    assert_eq!(app.send(get(502)).await, StatusCode::BAD_GATEWAY);
    assert_eq!(app.send(get(200)).await, StatusCode::OK);
    assert_eq!(env.remaining("rpm", "alice").await, 9, "the retry is free");
}

/// A store that records failures slowly (as a networked store, after a round trip), to show
/// that the failed answer waits for the record.
#[derive(Debug)]
struct SlowToRecord(MemoryStore);

impl Store for SlowToRecord {
    fn acquire(
        &self,
        charges: &[tower_llm_ratelimit::store::Charge<'_>],
    ) -> tower_llm_ratelimit::store::StoreFuture<
        Result<tower_llm_ratelimit::store::Decision, tower_llm_ratelimit::store::StoreError>,
    > {
        self.0.acquire(charges)
    }
    fn acquire_once(
        &self,
        charges: &[tower_llm_ratelimit::store::Charge<'_>],
        id: &tower_llm_ratelimit::store::IdempotencyKey,
    ) -> tower_llm_ratelimit::store::StoreFuture<
        Result<tower_llm_ratelimit::store::Decision, tower_llm_ratelimit::store::StoreError>,
    > {
        self.0.acquire_once(charges, id)
    }
    fn fail_attempt(
        &self,
        charges: &[tower_llm_ratelimit::store::Charge<'_>],
        id: &tower_llm_ratelimit::store::IdempotencyKey,
    ) -> tower_llm_ratelimit::store::StoreFuture<Result<(), tower_llm_ratelimit::store::StoreError>>
    {
        let store = self.0.clone();
        let owned: Vec<(BucketKey, Quota, u64)> = charges
            .iter()
            .map(|c| (c.bucket.clone(), *c.quota, c.amount))
            .collect();
        let id = *id;
        tower_llm_ratelimit::store::StoreFuture::pending(async move {
            // A round trip's worth of waiting: the runtime runs other tasks meanwhile.
            for _ in 0..100 {
                tokio::task::yield_now().await;
            }
            let charges: Vec<_> = owned
                .iter()
                .map(|(b, q, a)| tower_llm_ratelimit::store::Charge::new(b, q, *a))
                .collect();
            store.fail_attempt(&charges, &id).await
        })
    }
    fn settle(
        &self,
        adjustments: &[tower_llm_ratelimit::store::Adjustment<'_>],
    ) -> tower_llm_ratelimit::store::StoreFuture<Result<(), tower_llm_ratelimit::store::StoreError>>
    {
        self.0.settle(adjustments)
    }
    fn peek(
        &self,
        bucket: &BucketKey,
        quota: &Quota,
    ) -> tower_llm_ratelimit::store::StoreFuture<
        Result<tower_llm_ratelimit::store::Snapshot, tower_llm_ratelimit::store::StoreError>,
    > {
        self.0.peek(bucket, quota)
    }
}

/// With a store that writes the failure over the network, the body of the failed answer
/// reaches the client only once the failure is recorded: a retry sent the moment the answer
/// has been read is free (the memory store beneath decides the retry without yielding: without the wait, it
/// would be decided before the record is written).
#[tokio::test]
async fn a_retry_sent_as_soon_as_the_failure_arrives_is_free() {
    let clock = ManualClock::new();
    let memory = MemoryStore::builder().clock(clock.clone()).build();
    let env = Env {
        store: Arc::new(SlowToRecord(memory)),
        clock,
        _server: None,
    };
    let app = env.app(10);
    let once = |req| {
        let svc = app.service();
        async move {
            let res = svc.oneshot(req).await.expect("infallible");
            let status = res.status();
            let _ = http_body_util::BodyExt::collect(res.into_body()).await;
            status
        }
    };
    let failed = within(
        "the failed attempt",
        once(failing("alice", "r1", BODY, 500)),
    )
    .await;
    assert_eq!(failed, StatusCode::INTERNAL_SERVER_ERROR);
    let retry = within("the retry", once(ok("alice", "r1", BODY))).await;
    assert_eq!(retry, StatusCode::OK);
    assert_eq!(env.remaining("rpm", "alice").await, 9, "the retry is free");
}
