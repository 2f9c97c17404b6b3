//! Tier priority under a saturated capacity, on both stores: below the saturation threshold
//! anyone uses idle capacity; past it each tier is held to its reserved share, so the tiers
//! without one are shed first. Responses are held (their slots with them) to saturate.

mod support;

use std::convert::Infallible;

use http::{Request, Response, StatusCode};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tower::ServiceExt;
use tower_llm_ratelimit::capacity::{Capacity, Priority};

use tower_llm_ratelimit::store::{
    Adjustment, BucketKey, Charge, Decision, MemoryStore, Snapshot, Store, StoreError, StoreFuture,
};
use tower_llm_ratelimit::{key, tier, BuildError, Quota, RateLimitLayer, RequestBody, Rule};

type Held = Response<tower_llm_ratelimit::ResponseBody<String>>;

fn layer(store: impl Store) -> RateLimitLayer {
    RateLimitLayer::builder()
        .rule(
            Rule::new("model-slots", key::header("x-model"), Quota::concurrent(10)).capacity(
                Capacity::fixed(10)
                    .saturation(0.5)
                    .tier("pro", Priority::new(2).reserve(0.4))
                    .tier("free", Priority::new(0).reserve(0.1)),
            ),
        )
        .tiers(tier::header("x-tier"))
        .store(store)
        .replica_id("r")
        .build()
        .unwrap()
}

/// Sends a request of `tier` (none for "") and returns its response, slot held.
async fn send(layer: &RateLimitLayer, tier: &str) -> Held {
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(tower::service_fn(|_: Request<RequestBody<String>>| async {
            Ok::<_, Infallible>(Response::new("ok".to_owned()))
        }));
    let mut req = Request::builder().header("x-model", "m");
    if !tier.is_empty() {
        req = req.header("x-tier", tier);
    }
    support::within("a request", svc.oneshot(req.body(String::new()).unwrap()))
        .await
        .unwrap()
}

/// Sends `n` requests of `tier`; returns the statuses and keeps the admitted ones.
async fn burst(layer: &RateLimitLayer, tier: &str, n: usize, held: &mut Vec<Held>) -> Vec<u16> {
    let mut statuses = Vec::new();
    for _ in 0..n {
        let res = send(layer, tier).await;
        statuses.push(res.status().as_u16());
        if res.status() == StatusCode::OK {
            held.push(res);
        }
    }
    statuses
}

async fn shares_hold_under_saturation(layer: RateLimitLayer) {
    let mut free = Vec::new();
    let mut pro = Vec::new();
    // Below the threshold (5 of 10), free callers use the idle capacity...
    assert_eq!(burst(&layer, "free", 5, &mut free).await, [200; 5]);
    // ...past it, free is held to its reserve (1), which it already exceeds: shed.
    assert_eq!(burst(&layer, "free", 2, &mut free).await, [429, 429]);
    // Pro still gets its reserve (4) on top.
    assert_eq!(
        burst(&layer, "pro", 5, &mut pro).await,
        [200, 200, 200, 200, 429]
    );
    // Callers without a tier have no reserve.
    assert_eq!(burst(&layer, "", 1, &mut free).await, [429]);
    let shed = send(&layer, "free").await;
    assert_eq!(shed.status(), StatusCode::TOO_MANY_REQUESTS);
    // The headers show the bucket at its capacity, not the threshold, and one item: no
    // slot left for this caller; the body says 9 of 10 are in flight.
    let ietf = shed.headers()["ratelimit"].to_str().unwrap().to_owned();
    assert_eq!(ietf.matches("model-slots").count(), 1, "{ietf}");
    assert!(ietf.contains(";r=0;"), "{ietf}");
    assert!(shed.headers()["ratelimit-policy"]
        .to_str()
        .unwrap()
        .contains("q=10"));
    let body = http_body_util::BodyExt::collect(shed.into_body())
        .await
        .unwrap()
        .to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("limit 10 in flight, used 9,"), "{body}");
    // Free's slots come back: below the threshold again (4 of 5), free is admitted...
    free.clear();
    assert_eq!(burst(&layer, "free", 1, &mut free).await, [200]);
    // ...and at the threshold again, each tier is held to its reserve, which both fill.
    assert_eq!(burst(&layer, "free", 1, &mut free).await, [429]);
    assert_eq!(burst(&layer, "pro", 1, &mut pro).await, [429]);
    drop(pro);
    drop(free);
}

#[tokio::test]
async fn shares_hold_under_saturation_in_memory() {
    shares_hold_under_saturation(layer(tower_llm_ratelimit::store::MemoryStore::new())).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn shares_hold_under_saturation_in_redis() {
    use support::redis::RedisServer;
    use tower_llm_ratelimit::store::RedisStore;

    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = support::within(
        "connecting to redis-server",
        RedisStore::builder(server.url()).prefix("prio").connect(),
    )
    .await
    .expect("connects");
    shares_hold_under_saturation(layer(store)).await;
}

/// On a Redis Cluster: the tier's bucket shares the rule's bucket's key, so both are decided
/// in one slot's call.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shares_hold_under_saturation_in_a_redis_cluster() {
    use support::redis::RedisCluster;
    use tower_llm_ratelimit::store::RedisStore;

    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    let store = support::within(
        "connecting to the cluster",
        RedisStore::cluster(cluster.urls()).prefix("prio").connect(),
    )
    .await
    .expect("connects");
    shares_hold_under_saturation(layer(store)).await;
}

#[test]
fn shares_are_checked_at_build() {
    let build = |cap: Capacity| {
        RateLimitLayer::builder()
            .rule(Rule::new("slots", key::global(), Quota::concurrent(10)).capacity(cap))
            .build()
    };
    let err = build(
        Capacity::fixed(10)
            .tier("pro", Priority::new(1).reserve(0.7))
            .tier("free", Priority::new(0).reserve(0.4)),
    )
    .unwrap_err();
    assert!(matches!(err, BuildError::InvalidCapacity { .. }));
    assert!(err.to_string().contains("add up to"), "{err}");
    for bad in [1.5, -0.1, f64::NAN] {
        let err =
            build(Capacity::fixed(10).tier("pro", Priority::new(1).reserve(bad))).unwrap_err();
        assert!(err.to_string().contains("share of tier `pro`"), "{err}");
    }
    let err = build(Capacity::fixed(10).saturation(0.0)).unwrap_err();
    assert!(err.to_string().contains("saturation"), "{err}");
    let err = build(
        Capacity::fixed(10)
            .tier("pro", Priority::new(1))
            .tier("pro", Priority::new(2)),
    )
    .unwrap_err();
    assert!(err.to_string().contains("twice"), "{err}");
}

/// A real axum server whose upstream is saturated (it holds every request until released),
/// reached over TCP by a hyper client: a free flood is shed past the saturation threshold
/// while pro callers are still served from their reserve.
#[tokio::test]
async fn a_saturated_upstream_sheds_free_callers_while_pro_is_served() {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use axum::routing::post;
    use axum::Router;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use tokio::net::TcpStream;
    use tokio::sync::Semaphore;

    let gate = Arc::new(Semaphore::new(0));
    let waiting = Arc::new(AtomicUsize::new(0));
    let layer = RateLimitLayer::builder()
        .rule(
            Rule::new("model-slots", key::header("x-model"), Quota::concurrent(8)).capacity(
                Capacity::fixed(8)
                    .saturation(0.5)
                    .tier("pro", Priority::new(1).reserve(0.5))
                    .tier("free", Priority::new(0).reserve(0.125)),
            ),
        )
        .tiers(tier::header("x-tier"))
        .build()
        .unwrap();
    let app = {
        let (gate, waiting) = (gate.clone(), waiting.clone());
        Router::new()
            .route(
                "/v1/chat/completions",
                post(move || {
                    let (gate, waiting) = (gate.clone(), waiting.clone());
                    async move {
                        waiting.fetch_add(1, Ordering::SeqCst);
                        gate.acquire().await.unwrap().forget();
                        "ok"
                    }
                }),
            )
            .layer(layer)
    };
    let server = support::spawn_server(|listener, shutdown| async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .unwrap();
    })
    .await;
    let send = |addr: SocketAddr, tier: &'static str| {
        tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await.unwrap();
            let io = hyper_util::rt::TokioIo::new(stream);
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            let req = Request::post("/v1/chat/completions")
                .header("host", "localhost")
                .header("x-model", "llama")
                .header("x-tier", tier)
                .body(Empty::<Bytes>::new())
                .unwrap();
            let res = sender.send_request(req).await.unwrap();
            let status = res.status().as_u16();
            res.into_body().collect().await.unwrap();
            status
        })
    };
    let wait_for = |n: usize| {
        let waiting = waiting.clone();
        support::within("requests reaching the upstream", async move {
            while waiting.load(Ordering::SeqCst) < n {
                tokio::task::yield_now().await;
            }
        })
    };
    // A free flood: the threshold (4) is admitted and waits upstream; the rest is shed
    // (free's reserve, 1, is long exceeded).
    let free: Vec<_> = (0..10).map(|_| send(server.addr(), "free")).collect();
    wait_for(4).await;
    // Pro is served past the threshold, up to its reserve (4).
    let pro: Vec<_> = (0..4).map(|_| send(server.addr(), "pro")).collect();
    wait_for(8).await;
    // One pro more is over its reserve.
    let extra = support::within("a pro request", send(server.addr(), "pro"))
        .await
        .unwrap();
    assert_eq!(extra, 429);
    gate.add_permits(64);
    let mut free_statuses = Vec::new();
    for t in free {
        free_statuses.push(support::within("a free request", t).await.unwrap());
    }
    free_statuses.sort_unstable();
    assert_eq!(
        free_statuses,
        [200, 200, 200, 200, 429, 429, 429, 429, 429, 429]
    );
    for t in pro {
        assert_eq!(support::within("a pro request", t).await.unwrap(), 200);
    }
    server.shutdown().await;
}

/// A 429 of a capacity shows the bucket with no slot left for the caller, and its body the
/// capacity and the requests in flight: at the saturation threshold (a tier without a
/// reserve), and at a tier's full reserve.
#[tokio::test]
async fn a_capacity_429_says_no_slot_remains_and_how_many_are_in_flight() {
    let layer = RateLimitLayer::builder()
        .rule(
            Rule::new("model-slots", key::header("x-model"), Quota::concurrent(10)).capacity(
                Capacity::fixed(10)
                    .saturation(0.5)
                    .tier("pro", Priority::new(2).reserve(0.4))
                    .tier("free", Priority::new(0)),
            ),
        )
        .tiers(tier::header("x-tier"))
        .replica_id("r")
        .build()
        .unwrap();
    let mut held = Vec::new();
    assert_eq!(burst(&layer, "free", 5, &mut held).await, [200; 5]);
    let refusal = |res: Held| async move {
        let header = res.headers()["ratelimit"].to_str().unwrap().to_owned();
        let body = http_body_util::BodyExt::collect(res.into_body())
            .await
            .unwrap()
            .to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        (
            header,
            body["error"]["message"].as_str().unwrap().to_owned(),
        )
    };
    // Free, past the threshold (5 of 10): refused.
    let res = send(&layer, "free").await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let (header, message) = refusal(res).await;
    assert_eq!(header, "\"model-slots\";r=0;t=0");
    assert!(
        message.contains("limit 10 in flight, used 5 or more"),
        "{message}"
    );
    // Pro, up to its reserve (4): then refused, 9 in flight.
    assert_eq!(burst(&layer, "pro", 4, &mut held).await, [200; 4]);
    let res = send(&layer, "pro").await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let (header, message) = refusal(res).await;
    assert_eq!(header, "\"model-slots\";r=0;t=0");
    assert!(message.contains("limit 10 in flight, used 9,"), "{message}");
}

/// A memory store that counts its decisions.
#[derive(Debug, Clone, Default)]
struct Counted(MemoryStore, Arc<AtomicUsize>);

impl Store for Counted {
    fn acquire(&self, charges: &[Charge<'_>]) -> StoreFuture<Result<Decision, StoreError>> {
        self.1.fetch_add(1, Ordering::SeqCst);
        self.0.acquire(charges)
    }
    fn settle(&self, adjustments: &[Adjustment<'_>]) -> StoreFuture<Result<(), StoreError>> {
        self.0.settle(adjustments)
    }
    fn peek(&self, bucket: &BucketKey, quota: &Quota) -> StoreFuture<Result<Snapshot, StoreError>> {
        self.0.peek(bucket, quota)
    }
}

/// With the saturation threshold at the capacity (the default), a refusal is final: no
/// second attempt at the tier's reserve, which could only be refused by the same count.
#[tokio::test]
async fn at_a_threshold_of_the_whole_capacity_a_refusal_costs_one_store_call() {
    let store = Counted::default();
    let layer = RateLimitLayer::builder()
        .rule(
            Rule::new("model-slots", key::header("x-model"), Quota::concurrent(2))
                .capacity(Capacity::fixed(2).tier("pro", Priority::new(2).reserve(0.5))),
        )
        .tiers(tier::header("x-tier"))
        .store(store.clone())
        .replica_id("r")
        .build()
        .unwrap();
    let mut held = Vec::new();
    assert_eq!(burst(&layer, "pro", 2, &mut held).await, [200, 200]);
    let before = store.1.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(burst(&layer, "pro", 1, &mut held).await, [429]);
    assert_eq!(
        store.1.load(std::sync::atomic::Ordering::SeqCst) - before,
        1
    );
}
