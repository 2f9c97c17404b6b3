//! Concurrency slots held in Redis come back after failures: a call that timed out after
//! Redis ran it, a settlement that failed, a client that left while the decision was
//! pending. The server is really paused (SIGSTOP) past the call timeout, then resumed
//! (SIGCONT); the slot must be free again within 2 s of the resume. This is the one place a
//! test waits on wall time (the server is a real process): the bounds are generous and the
//! waits end as soon as the slot is back.
#![cfg(feature = "redis")]

mod support;

use std::convert::Infallible;
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use tower::ServiceExt;
use tower_llm_ratelimit::store::{Adjustment, BucketKey, Charge, RedisStore, Store};
use tower_llm_ratelimit::{key, Quota, RateLimitLayer, RequestBody, Rule};

use support::redis::RedisServer;
use support::within;

/// The store's call timeout: short, so that a paused server makes calls fail fast.
const CALL_TIMEOUT: Duration = Duration::from_millis(100);
/// How soon after the resume the slot must be back.
const RECOVERY: Duration = Duration::from_secs(2);
/// Failures that open the store's circuit, and how long it then stays open.
const BREAKER_FAILURES: u32 = 3;
const BREAKER_COOLDOWN: Duration = Duration::from_millis(300);

async fn store(server: &RedisServer) -> RedisStore {
    within(
        "connecting to redis-server",
        RedisStore::builder(server.url())
            .prefix("slots")
            .timeout(CALL_TIMEOUT)
            .circuit_breaker(BREAKER_FAILURES, BREAKER_COOLDOWN)
            .connect(),
    )
    .await
    .expect("connects")
}

/// Polls the slot bucket until all `limit` slots are free again, for at most [`RECOVERY`]
/// from `resumed`; returns what it saw last.
async fn remaining_after_recovery(
    store: &RedisStore,
    bucket: &BucketKey,
    quota: &Quota,
    resumed: Instant,
) -> u64 {
    let mut last = 0;
    while resumed.elapsed() < RECOVERY {
        if let Ok(Ok(s)) = tokio::time::timeout(RECOVERY, store.peek(bucket, quota)).await {
            last = s.remaining;
            if last == quota.limit() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    last
}

/// Pauses `server` long enough for calls to time out; resumed by the caller.
async fn pause_past_the_timeout(server: &RedisServer) {
    server.pause();
    // Nothing to wait for but the timeout itself.
    tokio::time::sleep(CALL_TIMEOUT / 4).await;
}

#[tokio::test]
async fn an_acquire_that_timed_out_after_redis_ran_it_releases_its_slot() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = store(&server).await;
    let quota = Quota::concurrent(2);
    let bucket = BucketKey::new("inflight", "u");
    // The script is loaded before the pause.
    let warm = within("peek", store.peek(&bucket, &quota)).await.unwrap();
    assert_eq!(warm.remaining, 2);

    pause_past_the_timeout(&server).await;
    let timed_out = within("acquire", store.acquire(&[Charge::new(&bucket, &quota, 1)])).await;
    assert!(timed_out.is_err(), "the paused server can't answer in time");
    server.resume();
    let resumed = Instant::now();
    // Redis now runs the acquire it had received, and then the release.
    let remaining = remaining_after_recovery(&store, &bucket, &quota, resumed).await;
    assert_eq!(
        remaining, 2,
        "the slot is back within {RECOVERY:?} of the resume"
    );
    assert_eq!(store.stats().pending_releases, 0);
}

#[tokio::test]
async fn a_settlement_that_failed_releases_its_slot_when_redis_answers_again() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = store(&server).await;
    let quota = Quota::concurrent(2);
    let bucket = BucketKey::new("inflight", "u");
    let d = within("acquire", store.acquire(&[Charge::new(&bucket, &quota, 1)]))
        .await
        .unwrap();
    assert_eq!(d.charges[0].snapshot.remaining, 1);

    // The circuit opens while the server is paused: the settlement is refused without
    // reaching Redis at all (a timed-out one would still run once Redis resumes).
    pause_past_the_timeout(&server).await;
    for _ in 0..BREAKER_FAILURES {
        assert!(within("peek", store.peek(&bucket, &quota)).await.is_err());
    }
    assert!(store.stats().circuit_open);
    let release = [Adjustment {
        bucket: &bucket,
        quota: &quota,
        placement: d.charges[0].placement,
        charged: 1,
        actual: 0,
    }];
    let failed = within("settle", store.settle(&release)).await;
    assert!(failed.is_err(), "the circuit is open");
    assert_eq!(store.stats().pending_releases, 1);
    server.resume();
    let resumed = Instant::now();
    let remaining = remaining_after_recovery(&store, &bucket, &quota, resumed).await;
    assert_eq!(
        remaining, 2,
        "the slot is back within {RECOVERY:?} of the resume"
    );
}

/// Through the layer: the client gives up while the decision is pending (its response
/// future is dropped); the decision still arrives, and its slot is released.
#[tokio::test]
async fn a_client_leaving_during_the_decision_leaves_no_slot_taken() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = store(&server).await;
    let quota = Quota::concurrent(2);
    let layer = RateLimitLayer::builder()
        .rule(Rule::new("inflight", key::global(), quota))
        .store(store.clone())
        .build()
        .unwrap();
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(tower::service_fn(
            |_req: Request<RequestBody<String>>| async {
                Ok::<_, Infallible>(Response::new(String::new()))
            },
        ));
    let bucket = BucketKey::new("inflight", "*");
    let warm = within("peek", store.peek(&bucket, &quota)).await.unwrap();
    assert_eq!(warm.remaining, 2);

    server.pause();
    let gave_up = tokio::time::timeout(
        CALL_TIMEOUT / 2,
        svc.clone().oneshot(Request::new(String::new())),
    )
    .await;
    assert!(gave_up.is_err(), "the client leaves before the decision");
    tokio::time::sleep(CALL_TIMEOUT).await;
    server.resume();
    let resumed = Instant::now();
    let remaining = remaining_after_recovery(&store, &bucket, &quota, resumed).await;
    assert_eq!(
        remaining, 2,
        "the slot is back within {RECOVERY:?} of the resume"
    );
    within("background settlements", layer.flush()).await;

    // And the layer still admits two at a time.
    let res = within("request", svc.oneshot(Request::new(String::new())))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}
