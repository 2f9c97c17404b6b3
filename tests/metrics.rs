//! The `metrics` feature: what the layer records, read back through `metrics-util`'s
//! `DebuggingRecorder` (a recorder per test, set for the test's thread with
//! `metrics::with_local_recorder`; each test runs on a current-thread runtime, so the
//! server's tasks record there too). A real upstream (axum) behind the layer on a real TCP
//! listener and a real HTTP client, or a real `redis-server`; time from injected clocks.
#![cfg(feature = "metrics")]

mod support;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body as AxumBody;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;
use tower_llm_ratelimit::capacity::{Capacity, Priority};
use tower_llm_ratelimit::clock::ManualClock;
use tower_llm_ratelimit::key::RequestView;
use tower_llm_ratelimit::observe::{DecisionEvent, Observer, Outcome};
use tower_llm_ratelimit::store::{
    Adjustment, BucketKey, Charge, Decision, MemoryStore, Snapshot, Store, StoreError, StoreFuture,
};
use tower_llm_ratelimit::{
    cost, key, tier, FailurePolicy, Quota, RateLimitLayer, RequestBody, Rule,
};

use support::{within, WAIT};

/// A series: its name and its labels, sorted.
type Series = (String, Vec<(String, String)>);

/// What the test's recorder holds, accumulated (a snapshot drains the recorder).
struct Readings {
    snapshotter: Snapshotter,
    counters: BTreeMap<Series, u64>,
    histograms: BTreeMap<Series, Vec<f64>>,
}

fn series(name: &str, labels: &[(&str, &str)]) -> Series {
    let mut labels: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    labels.sort();
    (name.to_owned(), labels)
}

impl Readings {
    fn read(&mut self) {
        for (key, _, _, value) in self.snapshotter.snapshot().into_vec() {
            let mut labels: Vec<(String, String)> = key
                .key()
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            let s = (key.key().name().to_owned(), labels);
            match value {
                DebugValue::Counter(n) => *self.counters.entry(s).or_default() += n,
                DebugValue::Histogram(v) => self
                    .histograms
                    .entry(s)
                    .or_default()
                    .extend(v.into_iter().map(|f| f.into_inner())),
                DebugValue::Gauge(_) => panic!("no gauges are recorded: {s:?}"),
            }
        }
    }

    /// The counter `name` with exactly `labels` (0 if never recorded).
    fn counter(&mut self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.read();
        self.counters
            .get(&series(name, labels))
            .copied()
            .unwrap_or(0)
    }

    /// The sum of counter `name` over all its series.
    fn total(&mut self, name: &str) -> u64 {
        self.read();
        self.counters
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|(_, v)| v)
            .sum()
    }

    /// The values histogram `name` with exactly `labels` recorded, in order.
    fn histogram(&mut self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        self.read();
        self.histograms
            .get(&series(name, labels))
            .cloned()
            .unwrap_or_default()
    }

    /// Every series recorded so far.
    fn all_series(&mut self) -> Vec<Series> {
        self.read();
        self.counters
            .keys()
            .chain(self.histograms.keys())
            .cloned()
            .collect()
    }

    /// Waits (bounded) until the counters `name` add up to `want` (settlements run when the
    /// server has sent the body, just after the client has read it).
    async fn total_eventually(&mut self, name: &str, want: u64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let got = self.total(name);
            if got == want {
                return;
            }
            assert!(
                got < want && tokio::time::Instant::now() < deadline,
                "{name}: {got}, want {want}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Runs `test` on a current-thread runtime with a recorder of its own.
fn with_recorder<F: Future<Output = ()>>(paused: bool, test: impl FnOnce(Readings) -> F) {
    let recorder = DebuggingRecorder::new();
    let readings = Readings {
        snapshotter: recorder.snapshotter(),
        counters: BTreeMap::new(),
        histograms: BTreeMap::new(),
    };
    let mut rt = tokio::runtime::Builder::new_current_thread();
    rt.enable_all();
    if paused {
        rt.start_paused(true);
    }
    let rt = rt.build().unwrap();
    metrics::with_local_recorder(&recorder, || rt.block_on(test(readings)));
}

/// The upstream: `x-mode: json` answers with the usage `x-usage` (`prompt,completion`),
/// `x-mode: error` with a 500.
async fn upstream(req: Request<AxumBody>) -> Response<AxumBody> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    if header("x-mode") == "error" {
        return Response::builder()
            .status(500)
            .header("content-type", "application/json")
            .body(AxumBody::from(r#"{"error":{"message":"boom"}}"#))
            .unwrap();
    }
    let (prompt, completion) = header("x-usage")
        .split_once(',')
        .map(|(p, c)| (p.parse::<u64>().unwrap(), c.parse::<u64>().unwrap()))
        .unwrap_or((0, 0));
    let total = prompt + completion;
    Response::builder()
        .header("content-type", "application/json")
        .body(AxumBody::from(format!(
            r#"{{"choices":[],"usage":{{"prompt_tokens":{prompt},"completion_tokens":{completion},"total_tokens":{total}}}}}"#
        )))
        .unwrap()
}

/// The layer in front of the upstream on `127.0.0.1:<free port>`.
async fn serve(layer: RateLimitLayer) -> SocketAddr {
    let app = Router::new()
        .route("/v1/chat/completions", post(upstream))
        .layer(layer);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// Sends a chat request with `headers` over a new connection; the status and body.
async fn send(addr: SocketAddr, headers: &[(&str, &str)], body: &str) -> (StatusCode, Bytes) {
    let stream = within("connect", TcpStream::connect(addr)).await.unwrap();
    let (mut sender, conn) = within(
        "handshake",
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut req = Request::post("/v1/chat/completions").header("host", "test");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
    let res = within("response", sender.send_request(req)).await.unwrap();
    let status = res.status();
    let body = within("body", res.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    (status, body)
}

fn chat(max_tokens: u64) -> String {
    format!(r#"{{"model":"m","max_tokens":{max_tokens},"messages":[]}}"#)
}

/// The estimate: the body's `max_tokens`.
fn max_tokens_estimate() -> impl tower_llm_ratelimit::cost::CostEstimator {
    cost::from_fn(|req: &RequestView<'_>| req.json()?.get("max_tokens")?.as_u64()).reading_body()
}

/// A memory store on a frozen clock: windows don't move during a test.
fn frozen_store() -> MemoryStore {
    MemoryStore::builder().clock(ManualClock::new()).build()
}

const DECISIONS: &str = "ratelimit_decisions_total";
const RULE_DECISIONS: &str = "ratelimit_rule_decisions_total";
const REFUSALS: &str = "ratelimit_refusals_total";
const STORE_DURATION: &str = "ratelimit_store_duration_seconds";
const STORE_FAILURES: &str = "ratelimit_store_failures_total";
const SETTLEMENTS: &str = "ratelimit_settlements_total";

/// Three requests admitted and one denied for `user-rpm`, one refused for its missing key,
/// one of tier `pro`: counted per request, per rule and per refusal, with exact values.
#[test]
fn decisions_and_refusals_are_counted_by_rule_and_tier() {
    with_recorder(false, |mut m| async move {
        let heard = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&heard);
        let layer = RateLimitLayer::builder()
            .rule(
                Rule::new("user-rpm", key::header("x-user"), Quota::per_minute(3))
                    .tier("pro", Quota::per_minute(5)),
            )
            .rule(Rule::new(
                "global-rph",
                key::global(),
                Quota::per_hour(1_000),
            ))
            .tiers(tier::header("x-tier"))
            .store(frozen_store())
            // The layer's own observer hears every decision beside the metrics.
            .observer(move |_: &DecisionEvent<'_>| {
                counter.fetch_add(1, Ordering::Relaxed);
            })
            .metrics()
            .build()
            .unwrap();
        let addr = serve(layer).await;
        let alice = [("x-user", "alice")];
        for _ in 0..3 {
            assert_eq!(send(addr, &alice, "").await.0, StatusCode::OK);
        }
        assert_eq!(
            send(addr, &alice, "").await.0,
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(send(addr, &[], "").await.0, StatusCode::BAD_REQUEST);
        let bob = [("x-user", "bob"), ("x-tier", "pro")];
        assert_eq!(send(addr, &bob, "").await.0, StatusCode::OK);

        let outcome = |tier, outcome| [("tier", tier), ("outcome", outcome)];
        assert_eq!(m.counter(DECISIONS, &outcome("", "admitted")), 3);
        assert_eq!(m.counter(DECISIONS, &outcome("", "denied")), 1);
        assert_eq!(m.counter(DECISIONS, &outcome("", "missing_key")), 1);
        assert_eq!(m.counter(DECISIONS, &outcome("pro", "admitted")), 1);
        assert_eq!(m.total(DECISIONS), 6);
        assert_eq!(heard.load(Ordering::Relaxed), 6);

        let rule = |rule, tier, decision| [("rule", rule), ("tier", tier), ("decision", decision)];
        assert_eq!(
            m.counter(RULE_DECISIONS, &rule("user-rpm", "", "admitted")),
            3
        );
        assert_eq!(
            m.counter(RULE_DECISIONS, &rule("global-rph", "", "admitted")),
            3
        );
        assert_eq!(
            m.counter(RULE_DECISIONS, &rule("user-rpm", "", "denied")),
            1
        );
        assert_eq!(
            m.counter(RULE_DECISIONS, &rule("user-rpm", "pro", "admitted")),
            1
        );
        assert_eq!(
            m.counter(RULE_DECISIONS, &rule("global-rph", "pro", "admitted")),
            1
        );
        assert_eq!(
            m.total(RULE_DECISIONS),
            9,
            "a denied request's other rules are not counted"
        );

        let refusal = |reason| [("rule", "user-rpm"), ("tier", ""), ("reason", reason)];
        assert_eq!(m.counter(REFUSALS, &refusal("rate_limited")), 1);
        assert_eq!(m.counter(REFUSALS, &refusal("missing_key")), 1);
        assert_eq!(m.total(REFUSALS), 2);

        // Each request that reached the store is one acquire (the missing key never did);
        // the frozen layer clock (a `SystemClock` by default would do too) times them.
        assert_eq!(m.histogram(STORE_DURATION, &[("call", "acquire")]).len(), 5);
        assert_eq!(m.total(STORE_FAILURES), 0);
        // Request rules settle nothing.
        assert_eq!(m.total(SETTLEMENTS), 0);
    });
}

/// Per token rule: the estimate charged (100) and the usage settled (42), their
/// difference, a failed request refunded, and a request whose estimate exceeds the limit
/// refused as `over_limit`.
#[test]
fn estimated_and_settled_tokens_per_rule() {
    with_recorder(false, |mut m| async move {
        let layer = RateLimitLayer::builder()
            .rule(
                Rule::new("tph", key::global(), Quota::per_hour(10_000).tokens())
                    .tier("pro", Quota::per_hour(20_000).tokens()),
            )
            .rule(Rule::new(
                "input-tph",
                key::global(),
                Quota::per_hour(20_000).input_tokens(),
            ))
            .rule(Rule::new("rph", key::global(), Quota::per_hour(1_000)))
            .tiers(tier::header("x-tier"))
            .cost(max_tokens_estimate())
            .store(frozen_store())
            .metrics()
            .build()
            .unwrap();
        let addr = serve(layer).await;
        let ok = [("x-mode", "json"), ("x-usage", "30,12"), ("x-tier", "pro")];
        assert_eq!(send(addr, &ok, &chat(100)).await.0, StatusCode::OK);
        m.total_eventually(SETTLEMENTS, 1).await;
        let failed = [("x-mode", "error"), ("x-tier", "pro")];
        assert_eq!(
            send(addr, &failed, &chat(50)).await.0,
            StatusCode::INTERNAL_SERVER_ERROR
        );
        m.total_eventually(SETTLEMENTS, 2).await;
        // More than the base limit of `tph` could ever give.
        assert_eq!(
            send(addr, &[], &chat(10_001)).await.0,
            StatusCode::TOO_MANY_REQUESTS
        );

        let tph = [("rule", "tph"), ("tier", "pro"), ("unit", "tokens")];
        let input = [
            ("rule", "input-tph"),
            ("tier", "pro"),
            ("unit", "input_tokens"),
        ];
        assert_eq!(m.counter("ratelimit_tokens_estimated_total", &tph), 150);
        assert_eq!(m.counter("ratelimit_tokens_settled_total", &tph), 42);
        assert_eq!(
            m.histogram("ratelimit_tokens_settle_difference", &tph),
            [-58.0, -50.0]
        );
        // The estimate's tokens are all input tokens (`cost::from_fn`); 30 were reported.
        assert_eq!(m.counter("ratelimit_tokens_estimated_total", &input), 150);
        assert_eq!(m.counter("ratelimit_tokens_settled_total", &input), 30);
        // Request rules have no token series.
        assert!(m
            .all_series()
            .iter()
            .filter(|(name, _)| name.starts_with("ratelimit_tokens_"))
            .all(|(_, labels)| !labels.contains(&("rule".to_owned(), "rph".to_owned()))));

        let settled = |outcome| [("tier", "pro"), ("outcome", outcome)];
        assert_eq!(m.counter(SETTLEMENTS, &settled("usage")), 1);
        assert_eq!(m.counter(SETTLEMENTS, &settled("failed")), 1);
        let over = [("rule", "tph"), ("tier", ""), ("reason", "over_limit")];
        assert_eq!(m.counter(REFUSALS, &over), 1);
        assert_eq!(m.histogram(STORE_DURATION, &[("call", "acquire")]).len(), 3);
        assert_eq!(m.histogram(STORE_DURATION, &[("call", "settle")]).len(), 2);
    });
}

/// A memory store whose calls take time on the layer's clock: acquire 7 ms, settle 3 ms.
#[derive(Debug, Clone)]
struct Slow {
    store: MemoryStore,
    clock: ManualClock,
}

impl Store for Slow {
    fn acquire(&self, charges: &[Charge<'_>]) -> StoreFuture<Result<Decision, StoreError>> {
        self.clock.advance(Duration::from_millis(7));
        self.store.acquire(charges)
    }
    fn settle(&self, adjustments: &[Adjustment<'_>]) -> StoreFuture<Result<(), StoreError>> {
        self.clock.advance(Duration::from_millis(3));
        self.store.settle(adjustments)
    }
    fn peek(&self, bucket: &BucketKey, quota: &Quota) -> StoreFuture<Result<Snapshot, StoreError>> {
        self.store.peek(bucket, quota)
    }
}

/// Store calls are timed by the layer's clock, exactly; failures are counted by call and
/// kind, and the decision by what the failure policy did.
#[test]
fn store_latency_and_failures() {
    with_recorder(false, |mut m| async move {
        let clock = ManualClock::new();
        let layer = RateLimitLayer::builder()
            .rule(Rule::new(
                "tph",
                key::global(),
                Quota::per_hour(10_000).tokens(),
            ))
            .cost(max_tokens_estimate())
            .store(Slow {
                store: frozen_store(),
                clock: clock.clone(),
            })
            .clock(clock)
            .metrics()
            .build()
            .unwrap();
        let addr = serve(layer).await;
        let ok = [("x-mode", "json"), ("x-usage", "1,1")];
        assert_eq!(send(addr, &ok, &chat(10)).await.0, StatusCode::OK);
        m.total_eventually(SETTLEMENTS, 1).await;
        assert_eq!(m.histogram(STORE_DURATION, &[("call", "acquire")]), [0.007]);
        assert_eq!(m.histogram(STORE_DURATION, &[("call", "settle")]), [0.003]);

        // Two buckets per request in a store that holds one: every acquire fails.
        for (policy, status, outcome) in [
            (
                FailurePolicy::Closed,
                StatusCode::SERVICE_UNAVAILABLE,
                "store_error_refused",
            ),
            (FailurePolicy::Open, StatusCode::OK, "store_error_admitted"),
        ] {
            let layer = RateLimitLayer::builder()
                .rule(Rule::new("rph", key::global(), Quota::per_hour(1_000)))
                .rule(Rule::new("rpd", key::global(), Quota::per_day(10_000)))
                .store(MemoryStore::builder().max_keys(1).build())
                .on_store_error(policy)
                .metrics()
                .build()
                .unwrap();
            let addr = serve(layer).await;
            assert_eq!(send(addr, &[], "").await.0, status);
            assert_eq!(
                m.counter(DECISIONS, &[("tier", ""), ("outcome", outcome)]),
                1
            );
        }
        let failed = [("call", "acquire"), ("kind", "at_capacity")];
        assert_eq!(m.counter(STORE_FAILURES, &failed), 2);
        assert_eq!(m.total(STORE_FAILURES), 2);
    });
}

/// A store doing I/O: a real `redis-server`. Its calls are timed to the end of their
/// futures (a decision, a settlement in the background); once the server is gone, its
/// failures count as `backend`.
#[cfg(feature = "redis")]
#[test]
fn a_store_doing_io_is_timed_and_its_failures_counted() {
    use support::redis::RedisServer;
    use tower_llm_ratelimit::store::RedisStore;

    let Some(mut server) = RedisServer::start() else {
        return;
    };
    with_recorder(false, |mut m| async move {
        let clock = ManualClock::new();
        let store = within(
            "connecting to redis-server",
            RedisStore::builder(server.url())
                .clock(ManualClock::new())
                .timeout(Duration::from_secs(5))
                .connect(),
        )
        .await
        .unwrap();
        let layer = RateLimitLayer::builder()
            .rule(Rule::new(
                "tph",
                key::global(),
                Quota::per_hour(10_000).tokens(),
            ))
            .cost(max_tokens_estimate())
            .store(store)
            .clock(clock)
            .metrics()
            .build()
            .unwrap();
        let addr = serve(layer.clone()).await;
        let ok = [("x-mode", "json"), ("x-usage", "30,12")];
        assert_eq!(send(addr, &ok, &chat(100)).await.0, StatusCode::OK);
        m.total_eventually(SETTLEMENTS, 1).await;
        within("flush", layer.flush()).await;
        let tph = [("rule", "tph"), ("tier", ""), ("unit", "tokens")];
        assert_eq!(m.counter("ratelimit_tokens_estimated_total", &tph), 100);
        assert_eq!(m.counter("ratelimit_tokens_settled_total", &tph), 42);
        // The layer's clock is frozen: each call is timed, at 0 s.
        assert_eq!(m.histogram(STORE_DURATION, &[("call", "acquire")]), [0.0]);
        assert_eq!(m.histogram(STORE_DURATION, &[("call", "settle")]), [0.0]);

        server.stop();
        assert_eq!(
            send(addr, &ok, &chat(100)).await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        let failed = [("call", "acquire"), ("kind", "backend")];
        assert_eq!(m.counter(STORE_FAILURES, &failed), 1);
        // The failed call is timed too (the readings accumulate).
        assert_eq!(
            m.histogram(STORE_DURATION, &[("call", "acquire")]),
            [0.0, 0.0]
        );
    });
}

/// A flood of callers with new keys and made-up tiers adds no series: keys are never
/// labels, and a tier no rule lists is `other`.
#[test]
fn labels_stay_bounded_under_a_key_flood() {
    with_recorder(false, |mut m| async move {
        let layer = RateLimitLayer::builder()
            .rule(
                Rule::new("user-rpm", key::header("x-user"), Quota::per_minute(1))
                    .tier("pro", Quota::per_minute(2)),
            )
            .tiers(tier::header("x-tier"))
            .store(frozen_store())
            .metrics()
            .build()
            .unwrap();
        let addr = serve(layer).await;
        for i in 0..20 {
            let (user, tier) = (format!("caller-{i}"), format!("tier-{i}"));
            let headers = [("x-user", user.as_str()), ("x-tier", tier.as_str())];
            assert_eq!(send(addr, &headers, "").await.0, StatusCode::OK);
            assert_eq!(
                send(addr, &headers, "").await.0,
                StatusCode::TOO_MANY_REQUESTS
            );
        }
        let outcome = |outcome| [("tier", "other"), ("outcome", outcome)];
        assert_eq!(m.counter(DECISIONS, &outcome("admitted")), 20);
        assert_eq!(m.counter(DECISIONS, &outcome("denied")), 20);
        let series = m.all_series();
        assert_eq!(series.len(), 6, "{series:?}");
        for (name, labels) in &series {
            for (label, value) in labels {
                assert!(
                    !value.starts_with("caller-") && !value.starts_with("tier-"),
                    "{name}: {label}={value}"
                );
            }
        }
    });
}

/// An upstream that answers `x-status` after `x-latency-ms` on `clock`; its bodies are one
/// SSE event.
fn capacity_upstream(
    clock: ManualClock,
) -> impl tower::Service<
    Request<RequestBody<String>>,
    Response = Response<String>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send {
    tower::service_fn(move |req: Request<RequestBody<String>>| {
        let clock = clock.clone();
        async move {
            let header = |name: &str| {
                req.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            };
            clock.advance(Duration::from_millis(header("x-latency-ms").unwrap_or(0)));
            let mut res = Response::new("data: {}\n\n".to_owned());
            *res.status_mut() =
                StatusCode::from_u16(header("x-status").unwrap_or(200) as u16).unwrap();
            Ok::<_, Infallible>(res)
        }
    })
}

fn model_request(tier: &str, status: u16) -> Request<String> {
    Request::builder()
        .header("x-model", "m")
        .header("x-tier", tier)
        .header("x-status", status.to_string())
        .header("x-latency-ms", "10")
        .body(String::new())
        .unwrap()
}

/// Adaptive capacity: an overload cut counted by cause. The capacity's queue (on tokio's
/// paused clock): a waiter timed out after its 5 s, a request that found the queue full.
#[test]
fn capacity_changes_and_queue_outcomes() {
    with_recorder(true, |mut m| async move {
        let clock = ManualClock::new();
        let layer = RateLimitLayer::builder()
            .rule(
                Rule::new("model-slots", key::header("x-model"), Quota::concurrent(8)).capacity(
                    Capacity::adaptive(1, 8)
                        .latency_target(Duration::from_millis(100))
                        .queue_len(1)
                        .tier("pro", Priority::new(1).max_wait(Duration::from_secs(5))),
                ),
            )
            .tiers(tier::header("x-tier"))
            .clock(clock.clone())
            .replica_id("r")
            .metrics()
            .build()
            .unwrap();
        let svc = tower::ServiceBuilder::new()
            .layer(layer.clone())
            .service(capacity_upstream(clock.clone()));
        // 503s within the first interval, then one after it: one cut (8 x 0.8 = 6).
        for _ in 0..2 {
            let res = svc
                .clone()
                .oneshot(model_request("pro", 503))
                .await
                .unwrap();
            assert_eq!(res.status(), 503);
        }
        clock.advance(Duration::from_secs(1));
        drop(
            svc.clone()
                .oneshot(model_request("pro", 503))
                .await
                .unwrap(),
        );
        let change = [("rule", "model-slots"), ("change", "overload")];
        assert_eq!(m.counter("ratelimit_capacity_changes_total", &change), 1);

        // Six slots held: a seventh waits, an eighth finds the queue (of 1) full.
        let mut held = Vec::new();
        for _ in 0..6 {
            let res = svc
                .clone()
                .oneshot(model_request("pro", 200))
                .await
                .unwrap();
            assert_eq!(res.status(), 200);
            held.push(res);
        }
        let waiter = tokio::spawn(svc.clone().oneshot(model_request("pro", 200)));
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        let full = svc
            .clone()
            .oneshot(model_request("pro", 200))
            .await
            .unwrap();
        assert_eq!(full.status(), StatusCode::TOO_MANY_REQUESTS);
        let waited = within("the waiter", waiter).await.unwrap().unwrap();
        assert_eq!(waited.status(), StatusCode::TOO_MANY_REQUESTS);
        drop(held);

        let queue = |outcome| {
            [
                ("rule", "model-slots"),
                ("tier", "pro"),
                ("outcome", outcome),
            ]
        };
        assert_eq!(m.counter("ratelimit_queue_total", &queue("full")), 1);
        assert_eq!(m.counter("ratelimit_queue_total", &queue("timed_out")), 1);
        assert_eq!(
            m.histogram("ratelimit_queue_wait_seconds", &queue("full")),
            [0.0]
        );
        assert_eq!(
            m.histogram("ratelimit_queue_wait_seconds", &queue("timed_out")),
            [5.0]
        );

        // Nine admissions, each charging the bucket and the tier's own bucket: the rule
        // counts each once, the tier's bucket under its own name.
        let admitted = |rule| [("rule", rule), ("tier", "pro"), ("decision", "admitted")];
        assert_eq!(
            m.counter(DECISIONS, &[("tier", "pro"), ("outcome", "admitted")]),
            9
        );
        assert_eq!(m.counter(RULE_DECISIONS, &admitted("model-slots")), 9);
        assert_eq!(m.counter(RULE_DECISIONS, &admitted("model-slots#pro")), 9);
    });
}

/// Without `metrics()`, the layer records nothing, even with the feature on.
#[test]
fn a_layer_without_metrics_records_nothing() {
    with_recorder(false, |mut m| async move {
        let layer = RateLimitLayer::builder()
            .rule(Rule::new("rph", key::global(), Quota::per_hour(1)))
            .store(frozen_store())
            .build()
            .unwrap();
        let addr = serve(layer).await;
        assert_eq!(send(addr, &[], "").await.0, StatusCode::OK);
        assert_eq!(send(addr, &[], "").await.0, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(m.all_series(), []);
    });
}

/// An observer of the layer's own keeps hearing exactly what it asked for beside the
/// metrics: decisions, and no store calls unless it asks.
#[test]
fn the_layers_observer_is_kept_beside_the_metrics() {
    struct Denials(Arc<AtomicU64>);
    impl Observer for Denials {
        fn on_decision(&self, e: &DecisionEvent<'_>) {
            if let Outcome::Denied { .. } = e.outcome {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        fn on_store_call(&self, _: &tower_llm_ratelimit::observe::StoreCallEvent<'_>) {
            panic!("this observer does not observe store calls");
        }
    }
    with_recorder(false, |mut m| async move {
        let denials = Arc::new(AtomicU64::new(0));
        let layer = RateLimitLayer::builder()
            .rule(Rule::new("rph", key::global(), Quota::per_hour(1)))
            .store(frozen_store())
            .observer(Denials(Arc::clone(&denials)))
            .metrics()
            .build()
            .unwrap();
        let addr = serve(layer).await;
        assert_eq!(send(addr, &[], "").await.0, StatusCode::OK);
        assert_eq!(send(addr, &[], "").await.0, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(denials.load(Ordering::Relaxed), 1);
        assert_eq!(m.total(DECISIONS), 2);
        assert_eq!(m.histogram(STORE_DURATION, &[("call", "acquire")]).len(), 2);
    });
}
