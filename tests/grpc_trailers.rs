//! A gRPC error status that arrives in the trailers after response messages were streamed:
//! the caller has had (part of) its answer, so it is settled as an answer without `usage`
//! (tokens kept, by the default `MissingUsage`), and with an idempotency id its retry is
//! charged ("its response had begun" in the store's table). Only an error before any
//! message is a failed attempt (tokens refunded, the retry free on request rules).
//!
//! A client can make a server end a stream with an error at a moment of its choosing
//! (`grpc-timeout: DEADLINE_EXCEEDED` just before the last message), so treating such a
//! stream as failed would refund every token it streamed and make its retry free.

mod support;

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body, Frame};
use tower::ServiceExt;
use tower_llm_ratelimit::clock::ManualClock;
use tower_llm_ratelimit::store::{BucketKey, MemoryStore, Store};
use tower_llm_ratelimit::{cost, key, Quota, RateLimitLayer, RequestBody, Rule};

use support::within;

/// A gRPC response body: `messages` data frames, then trailers with `grpc-status: status`.
struct GrpcBody {
    messages: usize,
    status: u16,
    done: bool,
}

impl Body for GrpcBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.messages > 0 {
            self.messages -= 1;
            // A length-prefixed message of 5 bytes.
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                b"\0\0\0\0\x05hello",
            )))));
        }
        if std::mem::replace(&mut self.done, true) {
            return Poll::Ready(None);
        }
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from(self.status));
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }
}

fn rpm() -> Quota {
    Quota::per_minute(10)
}
fn tpm() -> Quota {
    Quota::per_minute(10_000).tokens()
}

/// Sends one call with id `id` to an upstream that streams `messages` messages and ends
/// with `status`; reads the whole response.
async fn call(layer: &RateLimitLayer, id: &str, messages: usize, status: u16) {
    let upstream = tower::service_fn(move |_: Request<RequestBody<String>>| async move {
        let mut res = Response::new(GrpcBody {
            messages,
            status,
            done: false,
        });
        res.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/grpc"));
        Ok::<_, Infallible>(res)
    });
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(upstream);
    let req = Request::builder()
        .method("POST")
        .uri("/llm.Generate/Stream")
        .header("x-api-key", "alice")
        .header("x-request-id", id)
        .header("content-length", 2)
        .body("{}".to_owned())
        .unwrap();
    let res = within("the response", svc.oneshot(req))
        .await
        .expect("infallible");
    let _ = within(
        "the body",
        http_body_util::BodyExt::collect(res.into_body()),
    )
    .await;
    within("settlements", layer.flush()).await;
}

async fn remaining(store: &MemoryStore, rule: &str, quota: Quota) -> u64 {
    within("peek", store.peek(&BucketKey::new(rule, "alice"), &quota))
        .await
        .expect("peek")
        .remaining
}

fn layer(store: &MemoryStore) -> RateLimitLayer {
    RateLimitLayer::builder()
        .rule(Rule::new("rpm", key::header("x-api-key"), rpm()))
        .rule(Rule::new("tpm", key::header("x-api-key"), tpm()))
        .cost(cost::from_fn(|_| Some(100)))
        .idempotency_header("x-request-id")
        .store(store.clone())
        .build()
        .expect("layer")
}

fn store() -> MemoryStore {
    let clock = ManualClock::new();
    clock.set(Duration::from_secs(1_000));
    MemoryStore::builder().clock(clock).build()
}

#[tokio::test]
async fn a_grpc_error_after_streamed_messages_keeps_the_tokens_and_its_retry_is_charged() {
    let store = store();
    let layer = layer(&store);
    // DEADLINE_EXCEEDED after three messages: the caller has them.
    call(&layer, "r1", 3, 4).await;
    assert_eq!(remaining(&store, "rpm", rpm()).await, 9);
    assert_eq!(
        remaining(&store, "tpm", tpm()).await,
        9_900,
        "what streamed is not refunded"
    );
    call(&layer, "r1", 3, 0).await;
    assert_eq!(
        remaining(&store, "rpm", rpm()).await,
        8,
        "not a failed attempt: its repeat is charged"
    );
}

#[tokio::test]
async fn a_grpc_error_before_any_message_is_a_failed_attempt() {
    let store = store();
    let layer = layer(&store);
    call(&layer, "r1", 0, 13).await;
    assert_eq!(remaining(&store, "rpm", rpm()).await, 9);
    assert_eq!(remaining(&store, "tpm", tpm()).await, 10_000, "refunded");
    call(&layer, "r1", 1, 0).await;
    assert_eq!(
        remaining(&store, "rpm", rpm()).await,
        9,
        "the retry is free"
    );
}
