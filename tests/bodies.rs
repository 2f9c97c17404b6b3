//! Request bodies a hostile caller might send: shapes that are costly to read (huge objects,
//! deep nesting, many tiny values) and bodies a rule keyed by the body can't use (too large,
//! not JSON). Through the real layer on a real TCP listener, and through the estimator and a
//! `json_field` key directly.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::{Body as AxumBody, Bytes as AxumBytes};
use axum::extract::DefaultBodyLimit;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tower_llm_ratelimit::cost::{self, CostEstimator};
use tower_llm_ratelimit::key::{self, KeyExtractor, RequestView};
use tower_llm_ratelimit::{BodyPolicy, MissingKey, Quota, RateLimitLayer, Rule};

#[path = "../benches/support/hostile.rs"]
mod hostile;

use hostile::hostile_shapes;

const WAIT: Duration = Duration::from_secs(30);

/// Serves `layer` in front of an upstream that answers 200 with the body it received.
async fn serve(layer: RateLimitLayer) -> SocketAddr {
    let app = Router::new()
        .fallback(post(|body: AxumBytes| async move { AxumBody::from(body) }))
        .layer(DefaultBodyLimit::disable())
        .layer(layer);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// POSTs `body` to `path`: the status and the JSON of the reply (`Null` if it isn't JSON).
async fn post_to(addr: SocketAddr, path: &str, body: impl Into<Bytes>) -> (StatusCode, Value) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::post(path)
        .header("host", "test")
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .unwrap();
    let res = tokio::time::timeout(WAIT, sender.send_request(req))
        .await
        .expect("response timed out")
        .unwrap();
    let status = res.status();
    let body = tokio::time::timeout(WAIT, res.into_body().collect())
        .await
        .expect("body timed out")
        .unwrap()
        .to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

const CHAT: &str = "/v1/chat/completions";

/// A body over `max_inspect_bytes` (256 below).
fn too_large() -> String {
    format!(r#"{{"model":"a","pad":"{}"}}"#, "x".repeat(400))
}

fn per_model(on_missing: MissingKey) -> Rule {
    Rule::new("model-rph", key::json_field("model"), Quota::per_hour(2)).on_missing_key(on_missing)
}

/// A rule keyed by the body, whose policy for a missing key is to skip (or share), refuses a
/// body it can't read instead of skipping: 413 when too large, 400 when not JSON, in the
/// OpenAI error shape. A JSON body without the field still follows the rule's policy.
#[tokio::test]
async fn body_keyed_rules_refuse_unusable_bodies() {
    for on_missing in [MissingKey::Skip, MissingKey::Shared, MissingKey::Reject] {
        let layer = RateLimitLayer::builder()
            .rule(per_model(on_missing))
            .max_inspect_bytes(256)
            .build()
            .unwrap();
        let addr = serve(layer).await;
        let (status, v) = post_to(addr, CHAT, too_large()).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{on_missing:?}");
        assert_eq!(v["error"]["code"], "request_too_large");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        let (status, v) = post_to(addr, CHAT, "model=a").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{on_missing:?}");
        assert_eq!(v["error"]["code"], "invalid_request_body");
        // Nesting past serde_json's limit: not JSON to the layer, a clean 400.
        let deep = "[".repeat(100_000);
        let layer = RateLimitLayer::builder()
            .rule(per_model(on_missing))
            .build()
            .unwrap();
        let deep_addr = serve(layer).await;
        let (status, v) = post_to(deep_addr, CHAT, deep).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{on_missing:?}");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("recursion limit"));
    }
    // JSON without the field: the rule's own policy (skip: never limited).
    let layer = RateLimitLayer::builder()
        .rule(per_model(MissingKey::Skip))
        .max_inspect_bytes(256)
        .build()
        .unwrap();
    let addr = serve(layer).await;
    for _ in 0..4 {
        assert_eq!(post_to(addr, CHAT, "{}").await.0, StatusCode::OK);
    }
    for expected in [
        StatusCode::OK,
        StatusCode::OK,
        StatusCode::TOO_MANY_REQUESTS,
    ] {
        assert_eq!(post_to(addr, CHAT, r#"{"model":"a"}"#).await.0, expected);
    }
}

/// Under `BodyPolicy::Fallback`, a rule keyed by the body charges its shared bucket for a
/// body it can't read (skip and shared alike): two unusable bodies use up its 2 per hour,
/// the third is limited. A `Reject` rule still refuses.
#[tokio::test]
async fn body_keyed_rules_charge_the_fallback_bucket() {
    for on_missing in [MissingKey::Skip, MissingKey::Shared] {
        let layer = RateLimitLayer::builder()
            .rule(per_model(on_missing))
            .max_inspect_bytes(256)
            .on_unusable_body(BodyPolicy::Fallback)
            .build()
            .unwrap();
        let addr = serve(layer).await;
        let (status, echoed) = post_to(addr, CHAT, too_large()).await;
        assert_eq!(status, StatusCode::OK, "{on_missing:?}");
        // The whole body still reaches the upstream.
        assert_eq!(echoed["pad"].as_str().map(str::len), Some(400));
        assert_eq!(post_to(addr, CHAT, "not json").await.0, StatusCode::OK);
        let (status, v) = post_to(addr, CHAT, too_large()).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{on_missing:?}");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`model-rph`"));
        // A readable body has its own bucket.
        assert_eq!(
            post_to(addr, CHAT, r#"{"model":"b"}"#).await.0,
            StatusCode::OK
        );
    }
    let layer = RateLimitLayer::builder()
        .rule(per_model(MissingKey::Reject))
        .max_inspect_bytes(256)
        .on_unusable_body(BodyPolicy::Fallback)
        .build()
        .unwrap();
    let addr = serve(layer).await;
    assert_eq!(
        post_to(addr, CHAT, too_large()).await.0,
        StatusCode::PAYLOAD_TOO_LARGE
    );
}

/// Each hostile shape, at its largest, is estimated and keyed right: the estimator's input
/// tokens as worked out by hand, the key the value at the pointer.
#[test]
fn hostile_shapes_are_estimated_and_keyed_right() {
    let est = heuristic();
    for shape in hostile_shapes(100_000) {
        assert!(
            shape.body.len() < 4 << 20,
            "{}: {}",
            shape.name,
            shape.body.len()
        );
        let req = Request::post(shape.path).body(()).unwrap();
        let bytes = Bytes::from(shape.body);
        let view = RequestView::from_request(&req).with_body(&bytes, None);
        let cost = est.estimate(&view).unwrap();
        assert_eq!(cost.input_tokens(), shape.input_tokens, "{}", shape.name);
        let key = key::json_field(&shape.pointer).extract(&view);
        assert_eq!(key, Some(shape.key.as_str().into()), "{}", shape.name);
        // The same answers from a `serde_json::Value` of the body.
        let value: Value = serde_json::from_slice(&bytes).unwrap();
        let view = RequestView::from_request(&req).with_body(&bytes, Some(&value));
        assert_eq!(est.estimate(&view).unwrap(), cost, "{}", shape.name);
    }
}

/// The largest hostile shapes through the real layer: every one admitted with the tokens
/// estimated (the layer's one parse, shared by the key and the estimate).
#[tokio::test]
async fn hostile_shapes_pass_through_the_layer() {
    for shape in hostile_shapes(100_000) {
        let layer = RateLimitLayer::builder()
            .rule(Rule::new(
                "per-key-tokens",
                key::json_field(&shape.pointer),
                Quota::per_hour(100_000_000).tokens(),
            ))
            .cost(heuristic())
            .max_inspect_bytes(8 << 20)
            .build()
            .unwrap();
        let addr = serve(layer.clone()).await;
        let (status, _) = post_to(addr, shape.path, shape.body).await;
        assert_eq!(status, StatusCode::OK, "{}", shape.name);
    }
}

fn heuristic() -> cost::OpenAiTokens {
    #[cfg(feature = "tokenizer")]
    return cost::openai().exact_tokens(false);
    #[cfg(not(feature = "tokenizer"))]
    cost::openai()
}
