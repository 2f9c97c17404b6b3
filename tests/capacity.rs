//! Adaptive capacity through the layer: the feedback of responses moves a concurrency
//! rule's limit, which status, headers and the observer show; replicas on one real Redis
//! govern their own shares. Time is a `ManualClock` the upstream advances.

mod support;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use tower::{Service, ServiceExt};
use tower_llm_ratelimit::capacity::{Capacity, Priority};
use tower_llm_ratelimit::clock::ManualClock;
use tower_llm_ratelimit::key::RequestView;
use tower_llm_ratelimit::observe::{CapacityEvent, Change, DecisionEvent, Observer};
use tower_llm_ratelimit::{key, BuildError, Quota, RateLimitLayer, RequestBody, Rule};

/// An upstream that answers the status in `x-status` (200 by default) after advancing the
/// clock by `x-latency-ms`.
fn upstream(
    clock: ManualClock,
) -> impl Service<
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

fn request(status: u16, latency_ms: u64) -> Request<String> {
    request_for("m", status, latency_ms)
}

fn request_for(model: &str, status: u16, latency_ms: u64) -> Request<String> {
    Request::builder()
        .header("x-model", model)
        .header("x-status", status.to_string())
        .header("x-latency-ms", latency_ms.to_string())
        .body(String::new())
        .unwrap()
}

/// A change of capacity: bucket key, old limit, new limit, why.
type Seen = (String, u64, u64, Change);

#[derive(Default, Clone)]
struct Changes(Arc<Mutex<Vec<Seen>>>);

impl Observer for Changes {
    fn on_decision(&self, _: &DecisionEvent<'_>) {}

    fn on_capacity(&self, e: &CapacityEvent<'_>) {
        self.0
            .lock()
            .unwrap()
            .push((e.key.to_string(), e.old, e.new, e.change));
    }
}

fn rule(cap: Capacity) -> Rule {
    Rule::new("model-slots", key::header("x-model"), Quota::concurrent(8)).capacity(cap)
}

async fn limit_in_status(layer: &RateLimitLayer) -> (u64, String) {
    let req = request(200, 0);
    let status = layer.status(RequestView::from_request(&req)).await.unwrap();
    (
        status[0].quota.limit(),
        status[0].key.as_ref().unwrap().to_string(),
    )
}

#[tokio::test]
async fn overloads_shrink_the_limit_once_per_interval_and_everyone_sees_it() {
    let clock = ManualClock::new();
    let changes = Changes::default();
    let layer = RateLimitLayer::builder()
        .rule(rule(
            Capacity::adaptive(2, 8).latency_target(Duration::from_millis(100)),
        ))
        .clock(clock.clone())
        .replica_id("r1")
        .observer(changes.clone())
        .build()
        .unwrap();
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(upstream(clock.clone()));
    assert_eq!(limit_in_status(&layer).await, (8, "m@r1".to_owned()));

    // Five 503s within the first second, then one after it: one cut, 8 x 0.8.
    for _ in 0..5 {
        let res = svc.clone().oneshot(request(503, 10)).await.unwrap();
        assert_eq!(res.status(), 503);
    }
    clock.advance(Duration::from_secs(1));
    svc.clone().oneshot(request(503, 10)).await.unwrap();
    assert_eq!(
        *changes.0.lock().unwrap(),
        vec![("m@r1".to_owned(), 8, 6, Change::Overload)]
    );
    assert_eq!(limit_in_status(&layer).await.0, 6);
    // Six in flight now fill the limit: a seventh is refused. (Seven answers in the
    // interval: too few for the controller to learn a calm latency from, so it only grows.)
    let mut held = Vec::new();
    for _ in 0..6 {
        let res = svc.clone().oneshot(request(200, 10)).await.unwrap();
        assert_eq!(res.status(), 200);
        held.push(res);
    }
    // The IETF headers carry concurrency rules (`x-ratelimit-*` only rates).
    assert!(
        held[0].headers()["ratelimit-policy"]
            .to_str()
            .unwrap()
            .contains("q=6"),
        "{:?}",
        held[0].headers()["ratelimit-policy"]
    );
    let res = svc.clone().oneshot(request(200, 10)).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    drop(held);

    // That interval had the limit in use and fast answers: 6 -> 7. Then slow answers
    // (300 ms and more against a 100 ms target) with four in flight (latency at low load is
    // not judged) cut by the gradient, by half at most: 7 -> 3 -> 2 (min).
    for _ in 0..4 {
        clock.advance(Duration::from_secs(1));
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(svc.clone().oneshot(request(200, 300)).await.unwrap());
        }
        // Ended last sent first: 300 ms, then the earlier ones, 600, 900 and 1200 ms.
        while let Some(res) = held.pop() {
            drop(res);
        }
    }
    assert_eq!(limit_in_status(&layer).await.0, 2);
    let seen: Vec<_> = changes
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|c| (c.1, c.2, c.3))
        .collect();
    assert_eq!(
        seen,
        [
            (8, 6, Change::Overload),
            (6, 7, Change::Growth),
            (7, 3, Change::Latency),
            (3, 2, Change::Latency)
        ]
    );
}

#[tokio::test]
async fn a_limit_in_use_grows_back_while_answers_are_fast() {
    let clock = ManualClock::new();
    let layer = RateLimitLayer::builder()
        .rule(rule(
            Capacity::adaptive(1, 8)
                .initial(2)
                .latency_target(Duration::from_millis(100)),
        ))
        .clock(clock.clone())
        .build()
        .unwrap();
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(upstream(clock.clone()));
    // Two requests at a time, answered in 10 ms: it grows while two is at least half
    // the limit, to 5 (2 -> 3 -> 4 -> 5), and no further: a limit nobody uses proves
    // nothing.
    for _ in 0..10 {
        let a = svc.clone().oneshot(request(200, 10)).await.unwrap();
        let b = svc.clone().oneshot(request(200, 10)).await.unwrap();
        assert_eq!((a.status(), b.status()), (StatusCode::OK, StatusCode::OK));
        drop((a, b));
        clock.advance(Duration::from_millis(500));
    }
    assert_eq!(limit_in_status(&layer).await.0, 5);
    // The whole limit in use: the first interval with enough answers to learn the calm
    // latency from halves the limit once (a start past the knee would show in the latency;
    // the same latency at half the load says both are below it), the next puts it back,
    // and it grows to max, no further.
    for _ in 0..20 {
        let limit = limit_in_status(&layer).await.0;
        let mut held = Vec::new();
        for _ in 0..limit {
            let res = svc.clone().oneshot(request(200, 10)).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            held.push(res);
        }
        drop(held);
        clock.advance(Duration::from_millis(500));
    }
    assert_eq!(limit_in_status(&layer).await.0, 8);
}

#[test]
fn a_replica_id_with_an_at_sign_is_refused_at_build() {
    // `m@r2` on replica `r1` and `m` on replica `r2@r1` would share the bucket `m@r2@r1`.
    for id in ["r2@r1", ""] {
        let err = RateLimitLayer::builder()
            .rule(rule(Capacity::fixed(4)))
            .replica_id(id)
            .build()
            .unwrap_err();
        assert_eq!(err, BuildError::InvalidReplicaId { id: id.to_owned() });
        assert!(err.to_string().contains("replica id"), "{err}");
    }
}

#[test]
fn a_capacity_is_checked_at_build() {
    let err = RateLimitLayer::builder()
        .rule(Rule::new("rpm", key::global(), Quota::per_minute(10)).capacity(Capacity::fixed(4)))
        .build()
        .unwrap_err();
    assert!(matches!(err, BuildError::InvalidCapacity { ref rule, .. } if rule == "rpm"));
    assert!(err.to_string().contains("concurrency rule"), "{err}");
    let err = RateLimitLayer::builder()
        .rule(rule(Capacity::adaptive(4, 2)))
        .build()
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "capacity of rule `model-slots`: min 4 is above max 2"
    );
    let err = RateLimitLayer::builder()
        .rule(rule(Capacity::adaptive(1, 16)))
        .build()
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "capacity of rule `model-slots`: max 16 is above the rule's quota limit 8"
    );
    // One capacity with tiers per model: several rules may have them.
    let tiered = || Capacity::fixed(4).tier("pro", Priority::new(1).reserve(0.5));
    RateLimitLayer::builder()
        .rule(rule(tiered()))
        .rule(Rule::new("other", key::global(), Quota::concurrent(4)).capacity(tiered()))
        .build()
        .unwrap();
}

#[tokio::test]
async fn a_request_that_two_capacities_with_tiers_charge_is_sorted_by_the_first_only() {
    let clock = ManualClock::new();
    // Rule `a` (first) sorts by tier at no threshold below its capacity; rule `b`, were it to
    // sort, would refuse a caller without a reserve past 1 in flight.
    let layer = RateLimitLayer::builder()
        .rule(rule(
            Capacity::fixed(4).tier("pro", Priority::new(1).reserve(0.5)),
        ))
        .rule(
            Rule::new("b", key::global(), Quota::concurrent(4)).capacity(
                Capacity::fixed(4)
                    .saturation(0.25)
                    .tier("pro", Priority::new(1).reserve(0.25)),
            ),
        )
        .clock(clock.clone())
        .build()
        .unwrap();
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(upstream(clock.clone()));
    // `b` charges at its capacity: 4 in flight, then a refusal.
    let mut held = Vec::new();
    for _ in 0..4 {
        let res = svc.clone().oneshot(request(200, 10)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        held.push(res);
    }
    let res = svc.clone().oneshot(request(200, 10)).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn a_rebuilt_layer_continues_the_learned_limit_of_an_unchanged_capacity() {
    let clock = ManualClock::new();
    let cap = || Capacity::adaptive(2, 8).latency_target(Duration::from_millis(100));
    let store = tower_llm_ratelimit::store::MemoryStore::new();
    let old = RateLimitLayer::builder()
        .rule(rule(cap()))
        .store(store.clone())
        .clock(clock.clone())
        .replica_id("r1")
        .build()
        .unwrap();
    let svc = tower::ServiceBuilder::new()
        .layer(old.clone())
        .service(upstream(clock.clone()));
    svc.clone().oneshot(request(503, 10)).await.unwrap();
    clock.advance(Duration::from_secs(1));
    svc.clone().oneshot(request(503, 10)).await.unwrap();
    assert_eq!(limit_in_status(&old).await, (6, "m@r1".to_owned()));
    // A slot held across the rebuild.
    let held = svc.clone().oneshot(request(200, 10)).await.unwrap();

    // Same controller settings, other tiers: the learned 6, the replica id and the slot
    // held carry over (five more fill the 6).
    let new = RateLimitLayer::builder()
        .rule(rule(cap().tier("pro", Priority::new(1).reserve(0.5))))
        .store(store)
        .continue_capacity_of(&old)
        .build()
        .unwrap();
    assert_eq!(limit_in_status(&new).await, (6, "m@r1".to_owned()));
    let svc2 = tower::ServiceBuilder::new()
        .layer(new.clone())
        .service(upstream(clock.clone()));
    let mut more = Vec::new();
    for _ in 0..5 {
        let res = svc2.clone().oneshot(request(200, 10)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        more.push(res);
    }
    let res = svc2.clone().oneshot(request(200, 10)).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    drop((held, more));

    // A changed max starts afresh, at its initial limit.
    let changed = RateLimitLayer::builder()
        .rule(rule(
            Capacity::adaptive(2, 7).latency_target(Duration::from_millis(100)),
        ))
        .continue_capacity_of(&new)
        .build()
        .unwrap();
    assert_eq!(limit_in_status(&changed).await, (7, "m@r1".to_owned()));
}

/// A key longer than a rule holds as it is (256 bytes: held as a keyed digest) finds its
/// learned limit in the rebuilt layer too: the digest's secret carries over with it.
#[tokio::test]
async fn a_rebuilt_layer_continues_the_learned_limit_of_a_long_key() {
    let clock = ManualClock::new();
    let cap = || Capacity::adaptive(2, 8).latency_target(Duration::from_millis(100));
    let model = format!("model-{}", "x".repeat(300));
    let limit_of = |layer: RateLimitLayer| {
        let req = request_for(&model, 200, 0);
        async move {
            let status = layer.status(RequestView::from_request(&req)).await.unwrap();
            status[0].quota.limit()
        }
    };
    let old = RateLimitLayer::builder()
        .rule(rule(cap()))
        .clock(clock.clone())
        .replica_id("r1")
        .build()
        .unwrap();
    let svc = tower::ServiceBuilder::new()
        .layer(old.clone())
        .service(upstream(clock.clone()));
    svc.clone()
        .oneshot(request_for(&model, 503, 10))
        .await
        .unwrap();
    clock.advance(Duration::from_secs(1));
    svc.clone()
        .oneshot(request_for(&model, 503, 10))
        .await
        .unwrap();
    assert_eq!(limit_of(old.clone()).await, 6);

    let new = RateLimitLayer::builder()
        .rule(rule(cap()))
        .continue_capacity_of(&old)
        .build()
        .unwrap();
    assert_eq!(limit_of(new).await, 6, "the learned limit carried over");
}

#[cfg(feature = "redis")]
mod redis {
    use super::*;
    use support::redis::RedisServer;
    use support::within;
    use tower_llm_ratelimit::store::RedisStore;

    async fn replica(server: &RedisServer, id: &str, clock: &ManualClock) -> RateLimitLayer {
        let store = within(
            "connecting to redis-server",
            RedisStore::builder(server.url()).prefix("cap").connect(),
        )
        .await
        .expect("connects");
        RateLimitLayer::builder()
            .rule(rule(
                Capacity::adaptive(1, 4).latency_target(Duration::from_millis(100)),
            ))
            .store(store)
            .clock(clock.clone())
            .replica_id(id)
            .build()
            .unwrap()
    }

    /// Sends `n` requests and keeps their responses (their slots held).
    async fn hold<S, B>(svc: &S, n: usize) -> (Vec<Response<B>>, Vec<u16>)
    where
        S: Service<Request<String>, Response = Response<B>, Error = Infallible> + Clone,
    {
        let mut held = Vec::new();
        let mut statuses = Vec::new();
        for _ in 0..n {
            let res = within("a request", svc.clone().oneshot(request(200, 1)))
                .await
                .unwrap();
            statuses.push(res.status().as_u16());
            held.push(res);
        }
        (held, statuses)
    }

    /// Two processes' layers (their own stores and controllers) on one redis-server: the one
    /// whose upstream is overloaded shrinks, the other keeps its whole share.
    #[tokio::test]
    async fn replicas_on_one_redis_govern_their_own_shares() {
        let Some(server) = RedisServer::start() else {
            return;
        };
        let (clock_a, clock_b) = (ManualClock::new(), ManualClock::new());
        let a = replica(&server, "a", &clock_a).await;
        let b = replica(&server, "b", &clock_b).await;
        let svc_a = tower::ServiceBuilder::new()
            .layer(a.clone())
            .service(upstream(clock_a.clone()));
        let svc_b = tower::ServiceBuilder::new()
            .layer(b.clone())
            .service(upstream(clock_b.clone()));

        within("a's overloads", async {
            svc_a.clone().oneshot(request(503, 10)).await.unwrap();
            clock_a.advance(Duration::from_secs(1));
            svc_a.clone().oneshot(request(503, 10)).await.unwrap();
        })
        .await;
        assert_eq!(limit_in_status(&a).await, (3, "m@a".to_owned()));
        assert_eq!(limit_in_status(&b).await, (4, "m@b".to_owned()));

        // Each holds what its own limit allows, at the same time, in Redis.
        let (_held_a, statuses_a) = hold(&svc_a, 4).await;
        let (_held_b, statuses_b) = hold(&svc_b, 5).await;
        assert_eq!(statuses_a, [200, 200, 200, 429]);
        assert_eq!(statuses_b, [200, 200, 200, 200, 429]);
        let req = request(200, 0);
        let in_a = a.status(RequestView::from_request(&req)).await.unwrap()[0]
            .snapshot
            .unwrap();
        assert_eq!((in_a.limit, in_a.remaining), (3, 0));
    }
}

#[tokio::test]
async fn client_errors_say_nothing_of_the_upstreams_load() {
    let clock = ManualClock::new();
    let changes = Changes::default();
    let layer = RateLimitLayer::builder()
        .rule(rule(
            Capacity::adaptive(2, 8).latency_target(Duration::from_millis(100)),
        ))
        .clock(clock.clone())
        .observer(changes.clone())
        .build()
        .unwrap();
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(upstream(clock.clone()));
    // Slow 400s and 404s over three intervals: neither overload nor latency samples.
    for status in [400, 404, 400, 422] {
        svc.clone().oneshot(request(status, 500)).await.unwrap();
        clock.advance(Duration::from_secs(1));
    }
    assert!(changes.0.lock().unwrap().is_empty());
    assert_eq!(limit_in_status(&layer).await.0, 8);
    // A 502 (a gateway's upstream refusing connections) is one.
    svc.clone().oneshot(request(502, 1)).await.unwrap();
    clock.advance(Duration::from_secs(1));
    svc.clone().oneshot(request(502, 1)).await.unwrap();
    assert_eq!(limit_in_status(&layer).await.0, 6);
}

/// Adaptive capacity's time on tokio's (paused) clock.
#[derive(Debug)]
struct TokioClock(tokio::time::Instant);

impl tower_llm_ratelimit::clock::Clock for TokioClock {
    fn now_nanos(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
}

/// The whole layer against a simulated model server on tokio's paused clock: up to its
/// capacity it answers in 200 ms, past it every request slows in proportion (a GPU's
/// batch); its capacity is 64, then 32 from 60 s, then 64 again from 120 s. 100 callers
/// send without pause (a 429 is retried after 50 ms). The limit settles within 10% of the
/// capacity within 10 s of the drop, and regains it within 30 s of the recovery.
#[tokio::test(start_paused = true)]
async fn the_layer_follows_a_simulated_server_whose_capacity_halves_then_comes_back() {
    follow(Capacity::adaptive(1, 128).latency_target(Duration::from_millis(210))).await;
}

/// The same with the controller's defaults (no latency target): it finds the knee.
#[tokio::test(start_paused = true)]
async fn with_its_defaults_the_layer_finds_the_knee_of_a_simulated_server() {
    follow(Capacity::adaptive(1, 128)).await;
}

async fn follow(capacity: Capacity) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use tokio::time::Instant;

    const S: u64 = 1_000;
    let start = Instant::now();
    let capacity_at = move |now: Instant| -> u64 {
        match now.duration_since(start).as_secs() {
            0..60 => 64,
            60..120 => 32,
            _ => 64,
        }
    };
    let layer = RateLimitLayer::builder()
        .rule(
            Rule::new(
                "model-slots",
                key::header("x-model"),
                Quota::concurrent(128),
            )
            .capacity(capacity),
        )
        .clock(TokioClock(start))
        .build()
        .unwrap();
    let in_flight = Arc::new(AtomicU64::new(0));
    let server = {
        let in_flight = in_flight.clone();
        tower::service_fn(move |_: Request<RequestBody<String>>| {
            let in_flight = in_flight.clone();
            async move {
                let n = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                let c = capacity_at(Instant::now());
                let ms = 200 * n.max(c) / c;
                tokio::time::sleep(Duration::from_millis(ms)).await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, Infallible>(Response::new("data: {}\n\n".to_owned()))
            }
        })
    };
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(server);
    let stop = Arc::new(AtomicBool::new(false));
    let mut callers = Vec::new();
    for _ in 0..100 {
        let (svc, stop) = (svc.clone(), stop.clone());
        callers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let res = svc.clone().oneshot(request(200, 0)).await.unwrap();
                if res.status() == StatusCode::TOO_MANY_REQUESTS {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    // The limit every 100 ms for 200 s.
    let mut trace = Vec::new();
    for tick in 0..2_000u64 {
        tokio::time::sleep_until(start + Duration::from_millis(tick * 100)).await;
        trace.push((tick * 100, limit_in_status(&layer).await.0));
    }
    stop.store(true, Ordering::Relaxed);
    for c in callers {
        support::within("a caller", c).await.unwrap();
    }
    let within = |l: u64, c: u64| (l as f64 - c as f64).abs() <= c as f64 * 0.10;
    let first = |from: u64, c: u64| {
        trace
            .iter()
            .find(|&&(t, l)| t >= from && within(l, c))
            .map(|&(t, _)| t - from)
    };
    let all = |from: u64, to: u64, c: u64| {
        trace
            .iter()
            .filter(|&&(t, _)| (from..to).contains(&t))
            .all(|&(_, l)| within(l, c))
    };
    let show = |from: u64, to: u64| -> Vec<u64> {
        trace
            .iter()
            .filter(|&&(t, _)| (from..to).contains(&t))
            .map(|&(_, l)| l)
            .collect()
    };
    assert!(all(40 * S, 60 * S, 64), "{:?}", show(40 * S, 60 * S));
    let settled = first(60 * S, 32).expect("settles on 32");
    assert!(settled < 10 * S, "settled after {settled} ms");
    assert!(all(70 * S, 120 * S, 32), "{:?}", show(70 * S, 120 * S));
    let regained = first(120 * S, 64).expect("regains 64");
    assert!(regained < 30 * S, "regained after {regained} ms");
    assert!(all(150 * S, 200 * S, 64), "{:?}", show(150 * S, 200 * S));
}

/// Without a latency target, a workload whose time to first byte varies (short and long
/// prompts) at low load is not cut: one request in flight of 8 says nothing of overload.
#[tokio::test]
async fn an_idle_upstream_with_varied_latency_keeps_its_limit() {
    let clock = ManualClock::new();
    let layer = RateLimitLayer::builder()
        .rule(rule(Capacity::adaptive(1, 8)))
        .clock(clock.clone())
        .replica_id("r")
        .build()
        .unwrap();
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(upstream(clock.clone()));
    for i in 0..40 {
        // One request at a time: 10 ms (a short prompt) and 100 ms (a long one) in turn.
        let ms = if i % 2 == 0 { 10 } else { 100 };
        let res = svc.clone().oneshot(request(200, ms)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        drop(res);
        clock.advance(Duration::from_millis(200));
    }
    assert_eq!(limit_in_status(&layer).await.0, 8);
}

/// An upstream that never answers (a stalled model server): every caller gives up (its
/// timeout, above the layer) past the latency target, and each such interval counts as an
/// overload.
#[tokio::test(start_paused = true)]
async fn requests_abandoned_past_the_target_without_an_answer_shrink_the_limit() {
    let clock = ManualClock::new();
    let changes = Changes::default();
    let layer = RateLimitLayer::builder()
        .rule(rule(
            Capacity::adaptive(1, 8).latency_target(Duration::from_millis(500)),
        ))
        .clock(clock.clone())
        .replica_id("r")
        .observer(changes.clone())
        .build()
        .unwrap();
    let stalled = {
        let clock = clock.clone();
        tower::service_fn(move |_: Request<RequestBody<String>>| {
            let clock = clock.clone();
            async move {
                clock.advance(Duration::from_secs(30));
                std::future::pending::<Result<Response<String>, Infallible>>().await
            }
        })
    };
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(stalled);
    for _ in 0..4 {
        let gave_up = tokio::time::timeout(
            Duration::from_secs(30),
            svc.clone().oneshot(request(200, 0)),
        )
        .await;
        assert!(gave_up.is_err());
        clock.advance(Duration::from_secs(2));
    }
    // Two intervals, each judged at its second abandon: 8 x 0.8 = 6.4, then 5.12.
    let seen: Vec<_> = changes
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|c| (c.1, c.2, c.3))
        .collect();
    assert_eq!(seen, [(8, 6, Change::Overload), (6, 5, Change::Overload)]);
    assert_eq!(limit_in_status(&layer).await.0, 5);
}

/// A caller that gives up before the latency target says nothing of the upstream.
#[tokio::test(start_paused = true)]
async fn requests_abandoned_within_the_target_say_nothing() {
    let clock = ManualClock::new();
    let layer = RateLimitLayer::builder()
        .rule(rule(
            Capacity::adaptive(1, 8).latency_target(Duration::from_millis(500)),
        ))
        .clock(clock.clone())
        .replica_id("r")
        .build()
        .unwrap();
    let slow = {
        let clock = clock.clone();
        tower::service_fn(move |_: Request<RequestBody<String>>| {
            let clock = clock.clone();
            async move {
                clock.advance(Duration::from_millis(100));
                std::future::pending::<Result<Response<String>, Infallible>>().await
            }
        })
    };
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(slow);
    for _ in 0..6 {
        let gave_up =
            tokio::time::timeout(Duration::from_secs(1), svc.clone().oneshot(request(200, 0)))
                .await;
        assert!(gave_up.is_err());
        clock.advance(Duration::from_secs(2));
    }
    assert_eq!(limit_in_status(&layer).await.0, 8);
}
