use super::*;
use crate::error::BuildError;
use crate::key;
use crate::rule::Quota;
use std::time::Duration;

fn build(rules: Vec<Rule>) -> Result<RateLimitLayer, BuildError> {
    RateLimitLayer::builder().rules(rules).build()
}

fn k() -> key::Header {
    key::header("x-api-key")
}

#[test]
fn config_errors_are_typed_and_name_the_rule() {
    assert_eq!(build(vec![]).unwrap_err(), BuildError::NoRules);
    let cases: Vec<(Vec<Rule>, &str)> = vec![
        (
            vec![Rule::new("", k(), Quota::per_minute(1))],
            "rule name \"\"",
        ),
        (
            vec![Rule::new("a\"b", k(), Quota::per_minute(1))],
            "printable ASCII",
        ),
        (
            vec![
                Rule::new("a", k(), Quota::per_minute(1)),
                Rule::new("a", k(), Quota::per_minute(2)),
            ],
            "two rules are named `a`",
        ),
        (
            vec![Rule::new("z", k(), Quota::per_minute(0))],
            "limit must be > 0, got 0 for rule `z`",
        ),
        (
            vec![Rule::new("w", k(), Quota::new(1, Duration::ZERO))],
            "window must be > 0",
        ),
        (
            vec![Rule::new("b", k(), Quota::per_minute(5).burst(3))],
            "only applies to GCRA",
        ),
        (
            vec![Rule::new("b0", k(), Quota::per_minute(5).gcra().burst(0))],
            "burst must be > 0",
        ),
        (
            vec![Rule::new("t", k(), Quota::per_minute(5)).tier("pro", Quota::per_hour(50))],
            "tier `pro` of rule `t`: window",
        ),
        (
            vec![Rule::new("t", k(), Quota::per_minute(5))
                .tier("pro", Quota::per_minute(5).tokens())],
            "counts tokens but the rule counts requests",
        ),
        (
            vec![Rule::new("g", k(), Quota::per_minute(5).gcra())
                .tier("pro", Quota::per_minute(9).gcra())],
            "GCRA tiers share the rule's rate",
        ),
        (
            vec![Rule::new("d", k(), Quota::per_minute(5))
                .tier("pro", Quota::per_minute(6))
                .tier("pro", Quota::per_minute(7))],
            "lists tier `pro` twice",
        ),
        (
            vec![Rule::new(
                "ip",
                key::client_ip().trust_proxy("10.0.0.0/99"),
                Quota::per_minute(5),
            )],
            "key of rule `ip`: invalid proxy address or CIDR",
        ),
        (
            vec![Rule::new("tpm", k(), Quota::per_minute(5).tokens())],
            "no cost estimator",
        ),
    ];
    for (rules, want) in cases {
        let err = build(rules).unwrap_err().to_string();
        assert!(err.contains(want), "{err:?} should contain {want:?}");
    }
    let bad_header = RateLimitLayer::builder()
        .rule(Rule::new("r", k(), Quota::per_minute(1)))
        .idempotency_header("x request id")
        .build()
        .unwrap_err();
    assert!(bad_header.to_string().contains("not a valid header name"));
    // GCRA tiers may differ in burst.
    let ok = Rule::new("g", k(), Quota::per_minute(5).gcra())
        .tier("pro", Quota::per_minute(5).gcra().burst(50));
    assert!(build(vec![ok]).is_ok());
}

/// A layer rebuilt on the same store with a rule of the same name (a reloaded
/// configuration) finds the rule's counts: a bucket is the rule's name and the key, nothing
/// of the layer that charged it. A new limit applies to the count so far; a renamed rule
/// starts afresh.
#[tokio::test]
async fn a_layer_rebuilt_on_the_same_store_keeps_the_counts_of_its_rules() {
    use crate::clock::ManualClock;
    use crate::store::MemoryStore;
    use tower::ServiceExt;

    let store = MemoryStore::builder().clock(ManualClock::new()).build();
    let layer = |name: &str, limit: u64| {
        RateLimitLayer::builder()
            .rule(Rule::new(name, k(), Quota::per_minute(limit)))
            .store(store.clone())
            .build()
            .unwrap()
    };
    let send = |layer: &RateLimitLayer| {
        let svc = tower::ServiceBuilder::new()
            .layer(layer.clone())
            .service(tower::service_fn(
                |_: http::Request<crate::RequestBody<String>>| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
                },
            ));
        let req = http::Request::builder()
            .header("x-api-key", "alice")
            .body(String::new())
            .unwrap();
        async move { svc.oneshot(req).await.unwrap().status().as_u16() }
    };

    let first = layer("rpm", 5);
    for _ in 0..3 {
        assert_eq!(send(&first).await, 200);
    }
    // 3 of 5 used; rebuilt with 4: one more.
    let lowered = layer("rpm", 4);
    assert_eq!(send(&lowered).await, 200);
    assert_eq!(send(&lowered).await, 429);
    // Both layers count in one bucket: the first (limit 5) has one left.
    assert_eq!(send(&first).await, 200);
    assert_eq!(send(&first).await, 429);
    // Another name is another bucket.
    assert_eq!(send(&layer("rpm-v2", 4)).await, 200);
}

#[tokio::test]
async fn a_layer_is_unused_once_no_service_body_or_settlement_holds_it() {
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    let layer = RateLimitLayer::builder()
        .rule(Rule::new("inflight", k(), Quota::concurrent(1)))
        .build()
        .unwrap();
    assert!(layer.is_unused());
    let copy = layer.clone();
    assert!(!layer.is_unused(), "another handle");
    drop(copy);
    assert!(layer.is_unused());

    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(tower::service_fn(
            |_: http::Request<crate::RequestBody<String>>| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(String::from("answer")))
            },
        ));
    assert!(!layer.is_unused(), "a service built from it");
    let req = http::Request::builder()
        .header("x-api-key", "alice")
        .body(String::new())
        .unwrap();
    let response = svc.oneshot(req).await.unwrap();
    assert_eq!(response.status(), 200);
    // The service is gone; the response body still holds the request's concurrency slot.
    assert!(!layer.is_unused(), "a response body in flight");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"answer");
    assert!(layer.is_unused(), "the body ended: its slot is released");
}
