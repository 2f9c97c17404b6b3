//! Token rules end to end: estimate before admission, settle to the real usage (JSON and
//! SSE, with chunk boundaries anywhere), concurrency slots, upstream errors, interrupted
//! streams, and bounded body inspection. A real upstream (axum) behind the layer, a real TCP
//! listener and a real HTTP client.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body as AxumBody;
use axum::extract::State;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tower_llm_ratelimit::cost::usage::Usage;
use tower_llm_ratelimit::key::{KeyExtractorExt, RequestView};
use tower_llm_ratelimit::observe::{
    DecisionEvent, ModelLabel, Observer, Outcome, SettleEvent, SettleOutcome,
};
use tower_llm_ratelimit::settle::{KeepTokens, MissingUsage};
use tower_llm_ratelimit::store::MemoryStore;
use tower_llm_ratelimit::{cost, key, BodyPolicy, Quota, RateLimitLayer, Rule, RuleStatus};

const WAIT: Duration = Duration::from_secs(10);

/// A response body fed by a channel: the upstream decides when each chunk goes out.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// What the test upstream shares with the test.
#[derive(Clone)]
struct Upstream {
    /// Streams in `hold` mode wait for a permit before their final chunk.
    gate: Arc<Semaphore>,
}

/// The upstream: answers like an OpenAI-compatible server. The request's test headers pick
/// the behaviour: `x-mode` (`json`, `sse`, `sse-no-usage`, `error`, `timeout` (a 504 marked
/// [`KeepTokens`]), `echo`, `framing` (the request's framing headers)), `x-usage`
/// (`prompt,completion`), `x-chunk` (bytes per SSE chunk), `x-hold` (wait at the gate).
async fn upstream(State(up): State<Upstream>, req: Request<AxumBody>) -> Response<AxumBody> {
    let (mode, usage, chunk, hold) = {
        let h = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        (h("x-mode"), h("x-usage"), h("x-chunk"), h("x-hold"))
    };
    let (prompt, completion) = usage
        .split_once(',')
        .map(|(p, c)| (p.parse::<u64>().unwrap(), c.parse::<u64>().unwrap()))
        .unwrap_or((0, 0));
    let total = prompt + completion;
    match mode.as_str() {
        "error" => Response::builder()
            .status(500)
            .header("content-type", "application/json")
            .body(AxumBody::from(r#"{"error":{"message":"boom"}}"#))
            .unwrap(),
        "timeout" => {
            let mut r = Response::builder()
                .status(504)
                .header("content-type", "application/json")
                .body(AxumBody::from(r#"{"error":{"message":"too slow"}}"#))
                .unwrap();
            r.extensions_mut().insert(KeepTokens);
            r
        }
        "echo" => {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            Response::new(AxumBody::from(body))
        }
        "framing" => {
            // The framing headers the upstream got, and the length of the body it read.
            let (te, cl) = {
                let h = |name| {
                    req.headers()
                        .get(name)
                        .map_or("-", |v| v.to_str().unwrap_or("?"))
                        .to_owned()
                };
                (h("transfer-encoding"), h("content-length"))
            };
            let body = req.into_body().collect().await.unwrap().to_bytes();
            Response::new(AxumBody::from(format!("{te}|{cl}|{}", body.len())))
        }
        "json" | "json-gzip" => {
            let body = format!(
                r#"{{"id":"x","choices":[{{"message":{{"content":"hi"}}}}],"usage":{{"prompt_tokens":{prompt},"completion_tokens":{completion},"total_tokens":{total}}}}}"#
            );
            let mut res = Response::builder().header("content-type", "application/json");
            if mode == "json-gzip" {
                // (Not really compressed: the layer must not try to read it either way.)
                res = res.header("content-encoding", "gzip");
            }
            res.body(AxumBody::from(body)).unwrap()
        }
        _ => {
            let mut sse = String::new();
            for word in ["Hel", "lo", " wor", "ld"] {
                sse.push_str(&format!(
                    "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{word}\"}}}}],\"usage\":null}}\n\n"
                ));
            }
            if mode != "sse-no-usage" {
                sse.push_str(&format!(
                    "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":{prompt},\"completion_tokens\":{completion},\"total_tokens\":{total}}}}}\r\n\r\n"
                ));
            }
            sse.push_str("data: [DONE]\n\n");
            let size: usize = chunk.parse().unwrap_or(usize::MAX).max(1);
            let chunks: VecDeque<Bytes> = sse
                .as_bytes()
                .chunks(size.min(sse.len()))
                .map(Bytes::copy_from_slice)
                .collect();
            let (tx, rx) = mpsc::channel(1);
            tokio::spawn(async move {
                let n = chunks.len();
                for (i, c) in chunks.into_iter().enumerate() {
                    if i + 1 == n && hold == "1" {
                        let _permit = up.gate.acquire().await.unwrap();
                    }
                    if tx.send(c).await.is_err() {
                        return; // the client went away
                    }
                }
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(AxumBody::new(ChannelBody(rx)))
                .unwrap()
        }
    }
}

struct Server {
    addr: SocketAddr,
    layer: RateLimitLayer,
    gate: Arc<Semaphore>,
}

/// In front of the layer: a request's `x-label` header becomes its [`ModelLabel`], as a
/// gateway would label each request with the model it routes to.
async fn label(mut req: Request<AxumBody>) -> Request<AxumBody> {
    let label = req
        .headers()
        .get("x-label")
        .and_then(|v| v.to_str().ok())
        .map(ModelLabel::new);
    if let Some(l) = label {
        req.extensions_mut().insert(l);
    }
    req
}

async fn serve(layer: RateLimitLayer) -> Server {
    let gate = Arc::new(Semaphore::new(0));
    let app = Router::new()
        .route("/v1/chat/completions", post(upstream))
        .route("/v1/embeddings", post(upstream))
        .with_state(Upstream { gate: gate.clone() })
        .layer(layer.clone())
        .layer(axum::middleware::map_request(label));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Server { addr, layer, gate }
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

async fn open(
    addr: SocketAddr,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Response<hyper::body::Incoming> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = Request::post("/v1/chat/completions").header("host", "test");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body.into())).unwrap();
    tokio::time::timeout(WAIT, sender.send_request(req))
        .await
        .expect("response timed out")
        .unwrap()
}

async fn send(addr: SocketAddr, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Reply {
    let res = open(addr, headers, body).await;
    let status = res.status();
    let headers = res.headers().clone();
    let body = tokio::time::timeout(WAIT, res.into_body().collect())
        .await
        .expect("body timed out")
        .unwrap()
        .to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

fn chat(max_tokens: u64) -> String {
    format!(
        r#"{{"model":"m","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"hi"}}]}}"#
    )
}

/// The estimate: the body's `max_tokens` (a stand-in for `cost::openai()`).
fn max_tokens_estimate() -> impl tower_llm_ratelimit::cost::CostEstimator {
    cost::from_fn(|req: &RequestView<'_>| req.json()?.get("max_tokens")?.as_u64()).reading_body()
}

async fn status(layer: &RateLimitLayer) -> Vec<RuleStatus> {
    let req = Request::new(());
    layer.status(RequestView::from_request(&req)).await.unwrap()
}

/// Remaining of rule `i` for the global key, once the settlement (which runs when the
/// server finishes the body, just after the client got it) has happened.
async fn remaining_eventually(layer: &RateLimitLayer, i: usize, want: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = status(layer).await[i].snapshot.unwrap().remaining;
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "remaining {got}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn tpm_layer() -> tower_llm_ratelimit::RateLimitLayerBuilder {
    RateLimitLayer::builder()
        .rule(Rule::new(
            "tpm",
            key::global(),
            Quota::per_hour(10_000).tokens(),
        ))
        .rule(Rule::new("rph", key::global(), Quota::per_hour(1_000)))
        .cost(max_tokens_estimate())
}

#[tokio::test]
async fn json_usage_settles_to_exactly_the_reported_tokens() {
    let s = serve(tpm_layer().build().unwrap()).await;
    let r = send(
        s.addr,
        &[("x-mode", "json"), ("x-usage", "200,121")],
        chat(1000),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    // The headers show the reservation (pre-settlement).
    assert_eq!(r.headers["x-ratelimit-remaining-tokens"], "9000");
    assert!(std::str::from_utf8(&r.body)
        .unwrap()
        .contains("\"total_tokens\":321"));
    remaining_eventually(&s.layer, 0, 10_000 - 321).await;
    // Usage above the estimate is charged too (the tokens were spent).
    send(
        s.addr,
        &[("x-mode", "json"), ("x-usage", "900,600")],
        chat(1000),
    )
    .await;
    remaining_eventually(&s.layer, 0, 10_000 - 321 - 1_500).await;
}

#[tokio::test]
async fn sse_usage_settles_whatever_the_chunk_boundaries() {
    for chunk in ["1", "2", "3", "7", "13", "64", "100000"] {
        let s = serve(tpm_layer().build().unwrap()).await;
        let r = send(
            s.addr,
            &[("x-mode", "sse"), ("x-usage", "40,17"), ("x-chunk", chunk)],
            chat(2_000),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(
            r.body.ends_with(b"data: [DONE]\n\n"),
            "streamed through unchanged"
        );
        remaining_eventually(&s.layer, 0, 10_000 - 57).await;
    }
}

#[tokio::test]
async fn missing_usage_keeps_the_reservation_or_estimates_the_stream() {
    let s = serve(tpm_layer().build().unwrap()).await;
    let r = send(s.addr, &[("x-mode", "sse-no-usage")], chat(1_000)).await;
    assert_eq!(r.status, StatusCode::OK);
    remaining_eventually(&s.layer, 0, 9_000).await;

    let layer = tpm_layer()
        .on_missing_usage(MissingUsage::EstimateStreamed)
        .build()
        .unwrap();
    let s = serve(layer).await;
    let r = send(s.addr, &[("x-mode", "sse-no-usage")], chat(1_000)).await;
    // The estimator gives everything as input (1,000) plus ~1 token per 4 bytes streamed.
    let streamed = r.body.len() as u64;
    remaining_eventually(&s.layer, 0, 10_000 - 1_000 - streamed.div_ceil(4)).await;
}

#[tokio::test]
async fn upstream_errors_refund_tokens_and_optionally_requests() {
    let s = serve(tpm_layer().build().unwrap()).await;
    let r = send(s.addr, &[("x-mode", "error")], chat(1_000)).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    remaining_eventually(&s.layer, 0, 10_000).await;
    assert_eq!(
        status(&s.layer).await[1].snapshot.unwrap().remaining,
        999,
        "request still counted"
    );

    let s = serve(tpm_layer().count_failed_requests(false).build().unwrap()).await;
    send(s.addr, &[("x-mode", "error")], chat(1_000)).await;
    remaining_eventually(&s.layer, 1, 1_000).await;
    remaining_eventually(&s.layer, 0, 10_000).await;
}

#[tokio::test]
async fn an_error_marked_keep_tokens_keeps_the_reservation() {
    let s = serve(tpm_layer().count_failed_requests(false).build().unwrap()).await;
    let r = send(s.addr, &[("x-mode", "timeout")], chat(1_000)).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    // Request rules settle as for any error (refunded here); the tokens stay charged.
    remaining_eventually(&s.layer, 1, 1_000).await;
    remaining_eventually(&s.layer, 0, 9_000).await;
}

#[tokio::test]
async fn an_interrupted_stream_keeps_the_reservation_and_frees_its_slot() {
    let layer = tpm_layer()
        .rule(Rule::new("inflight", key::global(), Quota::concurrent(1)))
        .build()
        .unwrap();
    let s = serve(layer).await;
    let hdrs = [
        ("x-mode", "sse-no-usage"),
        ("x-chunk", "10"),
        ("x-hold", "1"),
    ];
    let res = open(s.addr, &hdrs, chat(1_000)).await;
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.into_body();
    // Read one chunk, then hang up.
    tokio::time::timeout(WAIT, body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // The slot is taken while the stream is open.
    let r = send(s.addr, &[("x-mode", "json")], chat(1)).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(std::str::from_utf8(&r.body).unwrap().contains("`inflight`"));
    drop(body);
    s.gate.add_permits(1);
    // The slot comes back and the 1,000-token reservation stays charged (no usage seen).
    remaining_eventually(&s.layer, 2, 1).await;
    remaining_eventually(&s.layer, 0, 9_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_requests_reserve_then_return_capacity() {
    let decided = Arc::new(AtomicUsize::new(0));
    let admitted = Arc::new(AtomicUsize::new(0));
    let (d, a) = (decided.clone(), admitted.clone());
    let layer = tpm_layer()
        .observer(move |e: &DecisionEvent<'_>| {
            d.fetch_add(1, Ordering::SeqCst);
            if e.outcome == Outcome::Admitted {
                a.fetch_add(1, Ordering::SeqCst);
            }
        })
        .build()
        .unwrap();
    let s = serve(layer).await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let addr = s.addr;
        tasks.push(tokio::spawn(async move {
            let hdrs = [("x-mode", "sse"), ("x-usage", "60,40"), ("x-hold", "1")];
            send(addr, &hdrs, chat(1_000)).await.status
        }));
    }
    // Wait (bounded) until all 50 are decided, with the admitted streams held open.
    let deadline = tokio::time::Instant::now() + WAIT;
    while decided.load(Ordering::SeqCst) < 50 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {decided:?} decided"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // 10 x 1,000 tokens reserved at once: nothing else fits.
    assert_eq!(admitted.load(Ordering::SeqCst), 10);
    assert_eq!(status(&s.layer).await[0].snapshot.unwrap().remaining, 0);
    s.gate.add_permits(50);
    let (mut ok, mut denied) = (0, 0);
    for t in tasks {
        match tokio::time::timeout(WAIT, t).await.unwrap().unwrap() {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => denied += 1,
            other => panic!("{other}"),
        }
    }
    assert_eq!((ok, denied), (10, 40));
    // Each used 100 tokens: capacity returns as the usage says.
    remaining_eventually(&s.layer, 0, 10_000 - 10 * 100).await;
}

#[tokio::test]
async fn bodies_are_bounded_checked_and_passed_on_byte_identical() {
    let layer = tpm_layer().max_inspect_bytes(256).build().unwrap();
    let s = serve(layer).await;
    // Echo: the upstream gets exactly the bytes sent.
    let body = chat(5);
    let r = send(s.addr, &[("x-mode", "echo")], body.clone()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, body.as_bytes());
    // Over the bound: 413 with a JSON body.
    let big = format!(r#"{{"max_tokens":5,"pad":"{}"}}"#, "x".repeat(400));
    let r = send(s.addr, &[("x-mode", "echo")], big.clone()).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["error"]["code"], "request_too_large");
    // Not JSON: 400 saying so.
    let r = send(
        s.addr,
        &[("x-mode", "echo"), ("content-type", "text/plain")],
        "hello",
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["error"]["code"], "invalid_request_body");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));

    // Fallback: admitted with the fallback cost, the whole body still reaches the upstream.
    let layer = tpm_layer()
        .max_inspect_bytes(256)
        .on_unusable_body(BodyPolicy::Fallback)
        .fallback_cost(tower_llm_ratelimit::cost::Cost::tokens_of(777))
        .build()
        .unwrap();
    let s = serve(layer).await;
    let r = send(s.addr, &[("x-mode", "echo")], big.clone()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, big.as_bytes());
    assert_eq!(r.headers["x-ratelimit-remaining-tokens"], "9223");
}

#[tokio::test]
async fn per_model_rules_read_the_body_once() {
    let layer = RateLimitLayer::builder()
        .rule(Rule::new(
            "model-rph",
            key::json_field("model"),
            Quota::per_hour(1),
        ))
        .rule(Rule::new(
            "user-model-rph",
            key::header("x-user").and(key::json_field("model")),
            Quota::per_hour(5),
        ))
        .build()
        .unwrap();
    let s = serve(layer).await;
    let m = |model: &str| format!(r#"{{"model":"{model}"}}"#);
    let hdr = [("x-mode", "echo"), ("x-user", "u")];
    assert_eq!(send(s.addr, &hdr, m("a")).await.status, StatusCode::OK);
    assert_eq!(send(s.addr, &hdr, m("b")).await.status, StatusCode::OK);
    let r = send(s.addr, &hdr, m("a")).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(std::str::from_utf8(&r.body)
        .unwrap()
        .contains("`model-rph`"));
    // No model field: the key is missing (400 naming the field).
    let r = send(s.addr, &hdr, "{}").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(std::str::from_utf8(&r.body)
        .unwrap()
        .contains("JSON body field `/model`"));
}

#[tokio::test]
async fn streaming_requests_can_ask_for_usage() {
    let layer = tpm_layer().request_usage_in_streams(true).build().unwrap();
    let s = serve(layer).await;
    // The upstream gets the client's bytes with the member spliced in: the members' order,
    // whitespace and escapes as sent.
    let body = r#"{"max_tokens":5, "stream":true,"messages":[{"content":"\u00e9"}]}"#;
    let r = send(s.addr, &[("x-mode", "echo")], body).await;
    assert_eq!(
        std::str::from_utf8(&r.body).unwrap(),
        r#"{"stream_options":{"include_usage":true},"max_tokens":5, "stream":true,"messages":[{"content":"\u00e9"}]}"#
    );
    let body = r#"{"stream":true,"max_tokens":5,"stream_options":{"z":1},"messages":[]}"#;
    let r = send(s.addr, &[("x-mode", "echo")], body).await;
    assert_eq!(
        std::str::from_utf8(&r.body).unwrap(),
        r#"{"stream":true,"max_tokens":5,"stream_options":{"include_usage":true,"z":1},"messages":[]}"#
    );
}

/// A streaming request admitted with the fallback cost (its body too large to read, so no
/// `stream_options` could be added) whose stream carries no `usage`: the fallback says
/// nothing of this request, so what streamed is charged when it is more. Otherwise a caller
/// would pad a streaming request past `max_inspect_bytes` (whitespace costs no tokens) and
/// pay the fallback for any length of answer.
#[tokio::test]
async fn a_fallback_admission_without_usage_is_charged_what_streamed() {
    let layer = tpm_layer()
        .max_inspect_bytes(64)
        .on_unusable_body(BodyPolicy::Fallback)
        .fallback_cost(tower_llm_ratelimit::cost::Cost::tokens_of(10))
        .build()
        .unwrap();
    let s = serve(layer).await;
    let padded = format!(r#"{{"stream":true,"max_tokens":9000{}}}"#, " ".repeat(100));
    let r = send(s.addr, &[("x-mode", "sse-no-usage")], padded).await;
    assert_eq!(r.status, StatusCode::OK);
    let streamed = r.body.len() as u64;
    assert!(streamed > 200, "{streamed}");
    // The fallback's 10 input tokens, and the stream at 4 bytes a token.
    remaining_eventually(&s.layer, 0, 10_000 - 10 - streamed.div_ceil(4)).await;

    // A readable body keeps its reservation (the default `MissingUsage`), as before.
    let layer = tpm_layer().build().unwrap();
    let s = serve(layer).await;
    let r = send(s.addr, &[("x-mode", "sse-no-usage")], chat(5)).await;
    assert_eq!(r.status, StatusCode::OK);
    remaining_eventually(&s.layer, 0, 10_000 - 5).await;
}

/// A chunked request (no `content-length`) whose body the layer rewrites reaches the inner
/// service with one framing: the new `content-length`, and no `transfer-encoding` beside it
/// (both together is a request a proxy forwarding the headers would send ambiguously framed,
/// RFC 9112 section 6.3).
#[tokio::test]
async fn a_rewritten_chunked_body_is_framed_by_its_new_length_alone() {
    let layer = tpm_layer().request_usage_in_streams(true).build().unwrap();
    let s = serve(layer).await;
    let stream = TcpStream::connect(s.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let body = r#"{"max_tokens":5,"stream":true,"messages":[]}"#;
    let (tx, rx) = mpsc::channel(1);
    tx.send(Bytes::from_static(body.as_bytes())).await.unwrap();
    drop(tx);
    let req = Request::post("/v1/chat/completions")
        .header("host", "test")
        .header("x-mode", "framing")
        .body(ChannelBody(rx))
        .unwrap();
    let res = tokio::time::timeout(WAIT, sender.send_request(req))
        .await
        .expect("response timed out")
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let got = tokio::time::timeout(WAIT, res.into_body().collect())
        .await
        .expect("body timed out")
        .unwrap()
        .to_bytes();
    let new_len = body.len() + r#""stream_options":{"include_usage":true},"#.len();
    assert_eq!(
        std::str::from_utf8(&got).unwrap(),
        format!("-|{new_len}|{new_len}")
    );
}

/// `cost::openai()` through the layer: what is reserved is exactly the estimator's answer
/// for the body the client sent (n > 1, missing max_tokens, embeddings arrays).
#[tokio::test]
async fn openai_estimates_are_reserved_over_http() {
    use tower_llm_ratelimit::cost::CostEstimator;

    let layer = RateLimitLayer::builder()
        .rule(Rule::new(
            "tpm",
            key::global(),
            Quota::per_hour(1_000_000).tokens(),
        ))
        .rule(Rule::new(
            "otpm",
            key::global(),
            Quota::per_hour(1_000_000).output_tokens(),
        ))
        .cost(cost::openai().default_output_tokens(512))
        .build()
        .unwrap();
    let s = serve(layer).await;
    let cases = [
        (
            "/v1/chat/completions",
            r#"{"model":"m","n":2,"max_tokens":100,"messages":[{"role":"user","content":"Say hello to the world, twice."}]}"#,
            200,
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"m","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":[{"type":"text","text":"Hi"}]}]}"#,
            512,
        ),
        (
            "/v1/embeddings",
            r#"{"model":"e","input":["first text","second, longer text to embed"]}"#,
            0,
        ),
    ];
    let (mut used, mut used_out) = (0, 0);
    for (path, body, output) in cases {
        let req = Request::post(path).body(()).unwrap();
        let bytes = Bytes::from_static(body.as_bytes());
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let want = cost::openai()
            .default_output_tokens(512)
            .estimate(&RequestView::from_request(&req).with_body(&bytes, Some(&json)))
            .unwrap();
        assert_eq!(want.output_tokens(), output, "{body}");
        assert!(want.input_tokens() > 0);

        let stream = TcpStream::connect(s.addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = Request::post(path)
            .header("host", "test")
            .header("x-mode", "echo")
            .body(Full::new(bytes.clone()))
            .unwrap();
        let res = tokio::time::timeout(WAIT, sender.send_request(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        used += want.tokens();
        used_out += want.output_tokens();
        // The tightest token rule is `tpm` (it counts input and output).
        let remaining = (1_000_000 - used).to_string();
        assert_eq!(
            res.headers()["x-ratelimit-remaining-tokens"],
            remaining.as_str()
        );
        let echoed = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(echoed, bytes, "the upstream got the body unchanged");
    }
    let status = status(&s.layer).await;
    assert_eq!(status[1].snapshot.unwrap().remaining, 1_000_000 - used_out);
}

/// A layer reading bodies also wraps body-less routes: they cost no tokens.
#[tokio::test]
async fn requests_without_a_body_cost_no_tokens() {
    let s = serve(tpm_layer().build().unwrap()).await;
    let r = send(s.addr, &[("x-mode", "echo")], Bytes::new()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["x-ratelimit-remaining-tokens"], "10000");
}

/// A compressed response can't be read as it streams: it counts as one without usage.
#[tokio::test]
async fn compressed_responses_keep_the_reservation() {
    let s = serve(tpm_layer().build().unwrap()).await;
    let r = send(
        s.addr,
        &[("x-mode", "json-gzip"), ("x-usage", "1,1")],
        chat(1_000),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    // Settled when the body ended: the reservation stays, and a request without usage
    // next to it shows the settlement has run.
    send(
        s.addr,
        &[("x-mode", "json"), ("x-usage", "3,4")],
        chat(1_000),
    )
    .await;
    remaining_eventually(&s.layer, 0, 10_000 - 1_000 - 7).await;
}

/// The observer sees each settlement: the estimate charged and the real cost, with the
/// caller's tier, the body's model and each bucket's key as labels.
#[tokio::test]
async fn observers_see_settlements() {
    type Seen = (
        Option<String>,
        Option<String>,
        Vec<(String, String, u64, u64, bool)>,
    );
    type Log = Arc<std::sync::Mutex<Vec<Seen>>>;
    struct Probe(Log);
    impl Observer for Probe {
        fn on_decision(&self, _: &DecisionEvent<'_>) {}
        fn on_settle(&self, e: &SettleEvent<'_>) {
            let usage = matches!(e.outcome, SettleOutcome::Usage(_));
            let rules = e
                .rules
                .iter()
                .map(|r| {
                    let key = r.key.to_string();
                    (r.rule.to_owned(), key, r.charged, r.actual, usage)
                })
                .collect();
            let labels = (e.tier.map(str::to_owned), e.model.map(str::to_owned));
            self.0.lock().unwrap().push((labels.0, labels.1, rules));
        }
    }
    let seen: Log = Arc::default();
    let layer = tpm_layer()
        .rule(Rule::new(
            "user-rph",
            key::header("x-user"),
            Quota::per_hour(1_000),
        ))
        .tiers(tower_llm_ratelimit::tier::header("x-tier"))
        .observer(Probe(seen.clone()))
        .build()
        .unwrap();
    let s = serve(layer).await;
    send(
        s.addr,
        &[
            ("x-mode", "json"),
            ("x-usage", "200,121"),
            ("x-user", "alice"),
            ("x-tier", "pro"),
        ],
        chat(1000),
    )
    .await;
    remaining_eventually(&s.layer, 0, 10_000 - 321).await;
    let global = "*".to_owned(); // the global key
    assert_eq!(
        *seen.lock().unwrap(),
        [(
            Some("pro".to_owned()),
            Some("m".to_owned()),
            vec![
                ("tpm".to_owned(), global.clone(), 1000, 321, true),
                ("rph".to_owned(), global, 1, 1, true),
                ("user-rph".to_owned(), "alice".to_owned(), 1, 1, true),
            ]
        )]
    );
}

/// What an observer of usage saw of one settlement: the model label, the outcome, and
/// how many rules it settled.
type Heard = (Option<String>, SettleOutcome, usize);

/// An observer that records each settlement; `usage` is its `observes_usage`.
struct Ears {
    heard: Arc<std::sync::Mutex<Vec<Heard>>>,
    usage: bool,
}

impl Ears {
    fn new(usage: bool) -> (Self, Arc<std::sync::Mutex<Vec<Heard>>>) {
        let heard = Arc::default();
        let ears = Self {
            heard: Arc::clone(&heard),
            usage,
        };
        (ears, heard)
    }
}

impl Observer for Ears {
    fn on_decision(&self, _: &DecisionEvent<'_>) {}
    fn on_settle(&self, e: &SettleEvent<'_>) {
        let model = e.model.map(str::to_owned);
        self.heard
            .lock()
            .unwrap()
            .push((model, e.outcome, e.rules.len()));
    }
    fn observes_usage(&self) -> bool {
        self.usage
    }
}

/// Waits (bounded) until `heard` holds `n` settlements, and returns them.
async fn heard_eventually(heard: &std::sync::Mutex<Vec<Heard>>, n: usize) -> Vec<Heard> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = heard.lock().unwrap().clone();
        if got.len() >= n {
            return got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "heard {got:?}, want {n} settlements"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// An observer of usage hears the `usage` of every admitted response, read by the layer as
/// it streams past, for a request with request rules only (which has nothing to settle
/// otherwise): a JSON body, an SSE stream split anywhere, a stream without usage, an
/// upstream error. Each settlement carries the request's `ModelLabel` when it has one.
#[tokio::test]
async fn an_observer_of_usage_hears_every_response() {
    let (ears, heard) = Ears::new(true);
    let layer = RateLimitLayer::builder()
        .rule(Rule::new("rph", key::global(), Quota::per_hour(1_000)))
        .observer(ears)
        .build()
        .unwrap();
    let s = serve(layer).await;
    let usage = |input_tokens, output_tokens| {
        SettleOutcome::Usage(Usage {
            input_tokens,
            output_tokens,
            total_tokens: input_tokens + output_tokens,
        })
    };
    let r = send(
        s.addr,
        &[
            ("x-mode", "json"),
            ("x-usage", "200,121"),
            ("x-label", "gpt-x"),
        ],
        chat(1_000),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        heard_eventually(&heard, 1).await[0],
        (Some("gpt-x".to_owned()), usage(200, 121), 1)
    );
    let r = send(
        s.addr,
        &[("x-mode", "sse"), ("x-usage", "9,3"), ("x-chunk", "7")],
        chat(1_000),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(heard_eventually(&heard, 2).await[1], (None, usage(9, 3), 1));
    let r = send(s.addr, &[("x-mode", "sse-no-usage")], chat(1_000)).await;
    assert_eq!(r.status, StatusCode::OK);
    let streamed = r.body.len() as u64;
    assert_eq!(
        heard_eventually(&heard, 3).await[2].1,
        SettleOutcome::NoUsage { streamed }
    );
    let r = send(
        s.addr,
        &[("x-mode", "error"), ("x-usage", "5,5")],
        chat(1_000),
    )
    .await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        heard_eventually(&heard, 4).await[3].1,
        SettleOutcome::Failed
    );
}

/// A request admitted while the store fails ([`FailurePolicy::Open`]) is charged nothing, so
/// has nothing to settle: an observer of usage still hears its response's usage (with no
/// rules), so a metric of tokens counts every answer.
#[tokio::test]
async fn an_observer_of_usage_hears_responses_admitted_by_a_failing_store() {
    let (ears, heard) = Ears::new(true);
    // Two buckets per request in a store that holds one: every decision fails.
    let layer = RateLimitLayer::builder()
        .rule(Rule::new("rph", key::global(), Quota::per_hour(1_000)))
        .rule(Rule::new("rpd", key::global(), Quota::per_day(10_000)))
        .store(MemoryStore::builder().max_keys(1).build())
        .on_store_error(tower_llm_ratelimit::FailurePolicy::Open)
        .observer(ears)
        .build()
        .unwrap();
    let s = serve(layer).await;
    let r = send(
        s.addr,
        &[("x-mode", "sse"), ("x-usage", "40,2"), ("x-label", "m")],
        chat(1_000),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers.get("ratelimit").is_none(), "not counted");
    let usage = Usage {
        input_tokens: 40,
        output_tokens: 2,
        total_tokens: 42,
    };
    assert_eq!(
        heard_eventually(&heard, 1).await,
        [(Some("m".to_owned()), SettleOutcome::Usage(usage), 0)]
    );
}

/// By default (`observes_usage` false) the layer reads `usage` only for token rules: a
/// request with request rules only is not settled, one with a token rule is, the body's
/// `model` as its label.
#[tokio::test]
async fn by_default_only_token_rules_have_their_usage_read() {
    let (ears, heard) = Ears::new(false);
    let layer = RateLimitLayer::builder()
        .rule(Rule::new("rph", key::global(), Quota::per_hour(1_000)))
        .rule(
            Rule::new(
                "user-tph",
                key::header("x-user"),
                Quota::per_hour(10_000).tokens(),
            )
            .on_missing_key(tower_llm_ratelimit::MissingKey::Skip),
        )
        .cost(max_tokens_estimate())
        .observer(ears)
        .build()
        .unwrap();
    let s = serve(layer).await;
    // No `x-user`: request rules only, nothing to settle, no usage read.
    let r = send(s.addr, &[("x-mode", "json"), ("x-usage", "1,1")], chat(10)).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = send(
        s.addr,
        &[("x-mode", "json"), ("x-usage", "3,4"), ("x-user", "u")],
        chat(10),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let usage = Usage {
        input_tokens: 3,
        output_tokens: 4,
        total_tokens: 7,
    };
    assert_eq!(
        heard_eventually(&heard, 1).await,
        [(Some("m".to_owned()), SettleOutcome::Usage(usage), 2)]
    );
}

/// A monthly token budget through the layer: the estimate is reserved, settled to the real
/// usage, the headers' reset is the end of the month (UTC), a request whose reservation would
/// pass the budget is refused until the 1st, and the new month admits again. The wall clock
/// is a manual one, standing an hour before March 1st, 2028 (after a leap day).
#[tokio::test]
async fn a_monthly_token_budget_resets_on_the_first() {
    use tower_llm_ratelimit::clock::ManualClock;
    use tower_llm_ratelimit::store::MemoryStore;

    let clock = ManualClock::new();
    // 2028-02-29 23:00:00 UTC.
    clock.set_unix(Duration::from_secs(1_835_478_000));
    let layer = RateLimitLayer::builder()
        .rule(Rule::new(
            "budget",
            key::global(),
            Quota::per_calendar_month(1_000).tokens(),
        ))
        .cost(max_tokens_estimate())
        .store(MemoryStore::builder().clock(clock.clone()).build())
        .build()
        .unwrap();
    let s = serve(layer).await;

    let r = send(
        s.addr,
        &[("x-mode", "json"), ("x-usage", "200,100")],
        chat(600),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["x-ratelimit-remaining-tokens"], "400");
    assert_eq!(r.headers["x-ratelimit-reset-tokens"], "1h0m0s");
    assert_eq!(r.headers["ratelimit"], "\"budget\";r=400;t=3600");
    // Settled to the 300 tokens used.
    remaining_eventually(&s.layer, 0, 700).await;

    // 300 used + 800 reserved would pass 1,000: refused until the 1st.
    clock.advance(Duration::from_secs(1_800));
    let r = send(s.addr, &[("x-mode", "json")], chat(800)).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.headers["retry-after"], "1800");
    let body = std::str::from_utf8(&r.body).unwrap();
    assert!(
        body.contains("limit 1000 per UTC calendar month, used 300, requested 800"),
        "{body}"
    );
    // 700 fits exactly: the budget is spent + reserved <= limit, not <.
    let r = send(
        s.addr,
        &[("x-mode", "json"), ("x-usage", "400,300")],
        chat(700),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["x-ratelimit-remaining-tokens"], "0");
    remaining_eventually(&s.layer, 0, 0).await;

    // March 1st, 00:00:00 UTC: a new month, 31 days long.
    clock.advance(Duration::from_secs(1_800));
    let r = send(
        s.addr,
        &[("x-mode", "json"), ("x-usage", "10,10")],
        chat(800),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["x-ratelimit-remaining-tokens"], "200");
    assert_eq!(r.headers["ratelimit"], "\"budget\";r=200;t=2678400");
    remaining_eventually(&s.layer, 0, 980).await;
}
