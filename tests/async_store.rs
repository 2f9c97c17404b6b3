//! The layer with a store that answers asynchronously (as a networked store does): the
//! decision is awaited before the inner service is called, and the readied service instance
//! is the one that serves the request.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use tokio::sync::watch;
use tower::{Service, ServiceExt};
use tower_llm_ratelimit::store::{
    Adjustment, BucketKey, Charge, Decision, MemoryStore, Snapshot, Store, StoreError, StoreFuture,
};
use tower_llm_ratelimit::{key, FailurePolicy, Quota, RateLimitLayer, RequestBody, Rule};

/// A real `MemoryStore` whose answers arrive after a task switch, or an error. While
/// `stalled` holds `true` a decision is taken at once but its answer waits until it turns
/// `false` (a networked store that ran the call and then stopped answering, then recovered).
#[derive(Debug, Clone)]
struct Deferred {
    inner: MemoryStore,
    fail: bool,
    stalled: Option<watch::Receiver<bool>>,
}

impl Deferred {
    fn new(inner: MemoryStore) -> Self {
        Self {
            inner,
            fail: false,
            stalled: None,
        }
    }
}

impl Store for Deferred {
    fn acquire(&self, charges: &[Charge<'_>]) -> StoreFuture<Result<Decision, StoreError>> {
        let result = if self.fail {
            Err(StoreError::Backend("connection refused".into()))
        } else {
            self.inner.try_acquire(charges)
        };
        let stalled = self.stalled.clone();
        StoreFuture::pending(async move {
            tokio::task::yield_now().await;
            if let Some(mut stalled) = stalled {
                // A sender dropped counts as recovered.
                let _ = stalled.wait_for(|s| !s).await;
            }
            result
        })
    }
    fn settle(&self, adjustments: &[Adjustment<'_>]) -> StoreFuture<Result<(), StoreError>> {
        self.inner.settle(adjustments)
    }
    fn peek(&self, bucket: &BucketKey, quota: &Quota) -> StoreFuture<Result<Snapshot, StoreError>> {
        self.inner.peek(bucket, quota)
    }
}

fn counting_service(
    calls: Arc<AtomicUsize>,
) -> impl Service<
    Request<RequestBody<String>>,
    Response = Response<String>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    tower::service_fn(move |_req: Request<RequestBody<String>>| {
        let calls = calls.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Infallible>(Response::new("hi".to_owned()))
        }
    })
}

#[tokio::test]
async fn pending_decisions_admit_and_deny() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = RateLimitLayer::builder()
        .rule(Rule::new("global", key::global(), Quota::per_hour(2)))
        .store(Deferred::new(MemoryStore::new()))
        .build()
        .unwrap();
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(counting_service(calls.clone()));
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let res = tokio::time::timeout(
            Duration::from_secs(5),
            svc.clone().oneshot(Request::new(String::new())),
        )
        .await
        .unwrap()
        .unwrap();
        assert!(res.headers().contains_key("ratelimit"));
        statuses.push(res.status());
    }
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn store_errors_follow_the_failure_policy() {
    for (policy, want) in [
        (FailurePolicy::Closed, StatusCode::SERVICE_UNAVAILABLE),
        (FailurePolicy::Open, StatusCode::OK),
    ] {
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = RateLimitLayer::builder()
            .rule(Rule::new("global", key::global(), Quota::per_hour(2)))
            .store(Deferred {
                fail: true,
                ..Deferred::new(MemoryStore::new())
            })
            .on_store_error(policy)
            .build()
            .unwrap();
        let svc = tower::ServiceBuilder::new()
            .layer(layer)
            .service(counting_service(calls.clone()));
        let res = tokio::time::timeout(
            Duration::from_secs(5),
            svc.oneshot(Request::new(String::new())),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(res.status(), want, "{policy:?}");
        assert_eq!(
            calls.load(Ordering::SeqCst),
            usize::from(want == StatusCode::OK)
        );
    }
}

/// The client gives up while the store's answer is pending (its response future is dropped):
/// the answer still arrives once the store recovers, and the concurrency slot it took is
/// released rather than held for the whole lease.
#[tokio::test]
async fn a_decision_nobody_waits_for_releases_its_slot() {
    let memory = MemoryStore::new();
    let (stall, stalled) = watch::channel(true);
    let layer = RateLimitLayer::builder()
        .rule(Rule::new("inflight", key::global(), Quota::concurrent(2)))
        .store(Deferred {
            stalled: Some(stalled),
            ..Deferred::new(memory.clone())
        })
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(counting_service(calls.clone()));
    let bucket = BucketKey::new("inflight", "*");
    let quota = Quota::concurrent(2);

    let gave_up = tokio::time::timeout(
        Duration::from_millis(50),
        svc.clone().oneshot(Request::new(String::new())),
    )
    .await;
    assert!(gave_up.is_err(), "the answer is stalled");
    // The store took the slot; nobody holds the decision.
    let taken = memory.peek(&bucket, &quota).await.unwrap();
    assert_eq!(taken.remaining, 1);

    stall.send(false).unwrap();
    tokio::time::timeout(Duration::from_secs(2), layer.flush())
        .await
        .expect("the abandoned decision is settled within 2 s of recovery");
    let back = memory.peek(&bucket, &quota).await.unwrap();
    assert_eq!(back.remaining, 2);
    assert_eq!(calls.load(Ordering::SeqCst), 0, "nobody was served");
}
