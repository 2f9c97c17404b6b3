//! The layer with a store that answers asynchronously (as a networked store does): the
//! decision is awaited before the inner service is called, and the readied service instance
//! is the one that serves the request.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use tower::{Service, ServiceExt};
use tower_llm_ratelimit::store::{
    Adjustment, BucketKey, Charge, Decision, MemoryStore, Snapshot, Store, StoreError, StoreFuture,
};
use tower_llm_ratelimit::{key, FailurePolicy, Quota, RateLimitLayer, RequestBody, Rule};

/// A real `MemoryStore` whose answers arrive after a task switch, or an error.
#[derive(Debug, Clone)]
struct Deferred {
    inner: MemoryStore,
    fail: bool,
}

impl Store for Deferred {
    fn acquire(&self, charges: &[Charge<'_>]) -> StoreFuture<Result<Decision, StoreError>> {
        let result = if self.fail {
            Err(StoreError::Backend("connection refused".into()))
        } else {
            self.inner.try_acquire(charges)
        };
        StoreFuture::pending(async move {
            tokio::task::yield_now().await;
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
        .store(Deferred {
            inner: MemoryStore::new(),
            fail: false,
        })
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
                inner: MemoryStore::new(),
                fail: true,
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
