//! What token accounting costs a request: estimating the prompt before admission, and
//! watching the response body for `usage` afterwards.
//!
//! ```text
//! cargo bench --bench tokens                       # the heuristic only
//! cargo bench --bench tokens --features tokenizer  # and the exact tokenizer
//! ```
//!
//! Groups (one `BenchmarkId` per variant and size):
//!
//! - `estimate`: a chat completions body of 1 KB, 16 KB and 256 KB (`gpt-4o`, English prose,
//!   code and JSON in alternating user and assistant messages): `parse_json` is the
//!   `serde_json::from_slice::<Value>` the layer does once per request; `heuristic` and
//!   `tokenizer` are `OpenAiTokens::estimate` through a `RequestView` over the parsed body,
//!   with [`estimate_text_tokens`](tower_llm_ratelimit::cost::estimate_text_tokens) and with
//!   `o200k_base` (feature `tokenizer`); `parse+heuristic` and `parse+tokenizer` are a
//!   request's whole estimation. The tokenizer's vocabulary is loaded before measuring (its
//!   one-time load is printed).
//! - `sse_body`: draining a 1 MB `text/event-stream` response of realistic chat completion
//!   chunks (one event of 220-300 bytes per frame, `usage` in the final event) from a
//!   `service_fn` upstream, `bare`, and through a `RateLimitLayer` with a token rule
//!   (`layer`): the body is then watched by the incremental usage parser and the charge
//!   settled at its end. The request's cost comes from `cost::from_fn`, so the request body is
//!   not read. `layer_requests_only` is the layer with a request rule only: no settlement, the
//!   body is passed through unwatched. `usage_parser` is the incremental usage parser alone,
//!   fed the same chunks. Reported as bytes per second.
//!
//! Everything runs on the bench thread: the memory store answers synchronously and every
//! future and frame is ready at once, so they are polled with a no-op waker (no runtime).

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::Empty;
use serde_json::{json, Value};
use tower::{Layer, Service};
use tower_llm_ratelimit::cost::usage::{Framing, UsageParser, DEFAULT_MAX_BUFFER_BYTES};
use tower_llm_ratelimit::cost::{self, CostEstimator, OpenAiTokens};
use tower_llm_ratelimit::key::{self, RequestView};
use tower_llm_ratelimit::{Quota, RateLimitLayer, Rule};

const CHAT: &str = "/v1/chat/completions";

// ---------------------------------------------------------------------------------------------
// estimate

const PROSE: &str = "Rate limiting protects a service from overload and keeps usage fair \
    between customers. When a request arrives, the middleware estimates how many tokens it will \
    consume, reserves that amount against the caller's quota, and forwards the request only if \
    every rule admits it. When the response ends, the reservation is corrected to the usage \
    the upstream reported, so an over-estimate is refunded within the same window.";

const CODE: &str = "```rust\nfn settle(&mut self, usage: Usage) -> Result<(), StoreError> {\n    \
    let actual = usage.input_tokens + usage.output_tokens;\n    if actual != self.charged {\n        \
    self.store.adjust(&self.bucket, self.charged, actual)?;\n    }\n    Ok(())\n}\n```";

const DATA: &str = r#"{"id":"ord_8Hk2","status":"shipped","items":[{"sku":"A-1042","qty":2,"price":19.99},{"sku":"B-7731","qty":1,"price":149.0}],"customer":{"name":"Ada Lovelace","city":"London"},"created":"2025-03-14T09:26:53Z"}"#;

/// A chat completions body of about `size` bytes.
fn chat_body(size: usize) -> Bytes {
    let pieces = [PROSE, CODE, DATA];
    let mut messages = vec![json!({"role": "system", "content": "You are a concise assistant."})];
    let mut len = 0;
    let mut i = 0;
    while len + 200 < size {
        let mut content = String::new();
        // Messages of up to ~2 KB: 1-4 pieces.
        for k in 0..1 + i % 4 {
            if len + content.len() + 200 >= size {
                break;
            }
            content.push_str(pieces[(i + k) % 3]);
            content.push_str("\n\n");
        }
        if content.is_empty() {
            break;
        }
        len += content.len() + 40;
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        messages.push(json!({"role": role, "content": content}));
        i += 1;
    }
    let body = json!({"model": "gpt-4o", "messages": messages, "max_tokens": 1024});
    Bytes::from(body.to_string())
}

fn heuristic() -> OpenAiTokens {
    #[cfg(feature = "tokenizer")]
    return cost::openai().exact_tokens(false);
    #[cfg(not(feature = "tokenizer"))]
    cost::openai()
}

fn estimate(c: &mut Criterion) {
    let mut group = c.benchmark_group("estimate");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let req = Request::post(CHAT).body(()).unwrap();
    let heuristic = heuristic();
    #[cfg(feature = "tokenizer")]
    let exact = {
        let est = cost::openai();
        let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
        let bytes = Bytes::new();
        let view = RequestView::from_request(&req).with_body(&bytes, Some(&body));
        let start = std::time::Instant::now();
        est.estimate(&view).unwrap();
        eprintln!(
            "o200k_base loaded in {:?} (once per process)",
            start.elapsed()
        );
        est
    };
    for (label, size) in [("1KB", 1 << 10), ("16KB", 16 << 10), ("256KB", 256 << 10)] {
        let bytes = chat_body(size);
        assert!(
            bytes.len().abs_diff(size) < size / 10 + 100,
            "{label}: {} bytes",
            bytes.len()
        );
        let json: Value = serde_json::from_slice(&bytes).unwrap();
        let view = RequestView::from_request(&req).with_body(&bytes, Some(&json));
        let h = heuristic.estimate(&view).unwrap();
        #[cfg(feature = "tokenizer")]
        {
            let e = exact.estimate(&view).unwrap();
            eprintln!(
                "{label} ({} bytes): input tokens {} (heuristic) / {} (o200k_base) = {:.2}",
                bytes.len(),
                h.input_tokens(),
                e.input_tokens(),
                h.input_tokens() as f64 / e.input_tokens() as f64
            );
        }
        #[cfg(not(feature = "tokenizer"))]
        eprintln!(
            "{label} ({} bytes): input tokens {} (heuristic)",
            bytes.len(),
            h.input_tokens()
        );
        group.throughput(Throughput::Bytes(bytes.len() as u64));

        group.bench_function(BenchmarkId::new("parse_json", label), |b| {
            b.iter(|| serde_json::from_slice::<Value>(black_box(&bytes)).unwrap())
        });
        group.bench_function(BenchmarkId::new("heuristic", label), |b| {
            b.iter(|| heuristic.estimate(black_box(&view)).unwrap())
        });
        group.bench_function(BenchmarkId::new("parse+heuristic", label), |b| {
            b.iter(|| {
                let json: Value = serde_json::from_slice(black_box(&bytes)).unwrap();
                let view = RequestView::from_request(&req).with_body(&bytes, Some(&json));
                heuristic.estimate(&view).unwrap()
            })
        });
        #[cfg(feature = "tokenizer")]
        {
            group.bench_function(BenchmarkId::new("tokenizer", label), |b| {
                b.iter(|| exact.estimate(black_box(&view)).unwrap())
            });
            group.bench_function(BenchmarkId::new("parse+tokenizer", label), |b| {
                b.iter(|| {
                    let json: Value = serde_json::from_slice(black_box(&bytes)).unwrap();
                    let view = RequestView::from_request(&req).with_body(&bytes, Some(&json));
                    exact.estimate(&view).unwrap()
                })
            });
        }
    }
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// sse_body

const WORDS: &[&str] = &[
    " the",
    " request",
    " is",
    " charged",
    " an",
    " estimate",
    " before",
    " it",
    " runs",
    ",",
    " and",
    " the",
    " real",
    " usage",
    " afterwards",
    ".",
    " Tokens",
    " per",
    " minute",
    " are",
    " counted",
    " per",
    " key",
    ";",
    " each",
    " rule",
    " has",
    " its",
    " own",
    " window",
    "\\n\\n",
    " **Note**:",
    " `max_tokens`",
    " 4096",
    " 12",
    "%",
];

/// SSE events of a streamed chat completion, about `size` bytes in all, one per chunk:
/// the role, content deltas of 1-8 words, the finish reason, the usage, `[DONE]`.
fn sse_chunks(size: usize) -> Arc<[Bytes]> {
    const HEAD: &str = r#"data: {"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk","created":1741569952,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_eb9dce56a8","choices":[{"index":0,"delta":"#;
    const TAIL: &str = r#","logprobs":null,"finish_reason":null}],"usage":null}"#;
    let event = |delta: &str| Bytes::from(format!("{HEAD}{delta}{TAIL}\n\n"));
    let mut chunks = vec![event(r#"{"role":"assistant","content":"","refusal":null}"#)];
    let mut total = chunks[0].len();
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state as usize
    };
    while total < size - 700 {
        let words = 1 + next() % 8;
        let content: String = (0..words).map(|_| WORDS[next() % WORDS.len()]).collect();
        let chunk = event(&format!(r#"{{"content":"{content}"}}"#));
        total += chunk.len();
        chunks.push(chunk);
    }
    chunks.push(Bytes::from(format!(
        "{HEAD}{{}},\"logprobs\":null,\"finish_reason\":\"stop\"}}],\"usage\":null}}\n\n"
    )));
    chunks.push(Bytes::from_static(
        br#"data: {"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk","created":1741569952,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_eb9dce56a8","choices":[],"usage":{"prompt_tokens":1234,"completion_tokens":4321,"total_tokens":5555,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}

"#,
    ));
    chunks.push(Bytes::from_static(b"data: [DONE]\n\n"));
    chunks.into()
}

/// A response body that hands out pre-built chunks, each ready at once.
struct Chunks {
    chunks: Arc<[Bytes]>,
    next: usize,
}

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let chunk = self.chunks.get(self.next).cloned();
        self.next += 1;
        Poll::Ready(chunk.map(|c| Ok(Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        self.next >= self.chunks.len()
    }
}

/// The upstream: answers every request with the stream.
fn upstream<B>(
    chunks: Arc<[Bytes]>,
) -> impl Service<
    Request<B>,
    Response = Response<Chunks>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Chunks>, Infallible>> + Send + 'static,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |_req: Request<B>| {
        let response = Response::builder()
            .header("content-type", "text/event-stream; charset=utf-8")
            .body(Chunks {
                chunks: Arc::clone(&chunks),
                next: 0,
            })
            .unwrap();
        std::future::ready(Ok(response))
    })
}

/// The output of `future`, which must be ready at once.
fn now<F: Future>(future: F) -> F::Output {
    match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("the bench's futures are all ready at once"),
    }
}

/// One request through `svc`, its response body drained; the bytes received.
fn round_trip<S, B>(svc: &mut S) -> usize
where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    assert!(svc.poll_ready(&mut cx).is_ready());
    let req = Request::post(CHAT).body(Empty::new()).unwrap();
    let response = now(svc.call(req)).unwrap();
    let mut body = pin!(response.into_body());
    let mut received = 0;
    loop {
        match body.as_mut().poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    received += black_box(data).len();
                }
            }
            Poll::Ready(None) => return received,
            Poll::Ready(Some(Err(e))) => panic!("{e:?}"),
            Poll::Pending => panic!("the bench's bodies are all ready at once"),
        }
    }
}

fn sse_body(c: &mut Criterion) {
    let chunks = sse_chunks(1 << 20);
    let total: usize = chunks.iter().map(Bytes::len).sum();
    let sizes = chunks.iter().map(Bytes::len);
    eprintln!(
        "SSE stream: {total} bytes in {} events of {}-{} bytes",
        chunks.len(),
        sizes.clone().min().unwrap(),
        sizes.max().unwrap()
    );
    let layer = RateLimitLayer::builder()
        .rule(Rule::new(
            "tokens",
            key::global(),
            Quota::per_hour(u64::MAX / 2).tokens(),
        ))
        .cost(cost::from_fn(|_| Some(1)))
        .build()
        .unwrap();
    let mut bare = upstream::<Empty<Bytes>>(Arc::clone(&chunks));
    let mut limited = layer.layer(upstream(Arc::clone(&chunks)));
    // The layer's own cost without the body watch: a request rule needs no settlement.
    let mut requests_only = RateLimitLayer::builder()
        .rule(Rule::new(
            "requests",
            key::global(),
            Quota::per_hour(u64::MAX / 2),
        ))
        .build()
        .unwrap()
        .layer(upstream(Arc::clone(&chunks)));

    // The layer did watch the stream: the charge of 1 was settled to the usage's 5,555.
    assert_eq!(round_trip(&mut bare), total);
    assert_eq!(round_trip(&mut limited), total);
    assert_eq!(round_trip(&mut requests_only), total);
    let req = Request::post(CHAT).body(()).unwrap();
    let status = now(layer.status(RequestView::from_request(&req))).unwrap();
    let snapshot = status[0].snapshot.as_ref().unwrap();
    assert_eq!(snapshot.limit - snapshot.remaining, 5_555);

    let mut group = c.benchmark_group("sse_body");
    group
        .throughput(Throughput::Bytes(total as u64))
        .sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    group.bench_function(BenchmarkId::new("bare", "1MB"), |b| {
        b.iter(|| round_trip(&mut bare))
    });
    group.bench_function(BenchmarkId::new("layer", "1MB"), |b| {
        b.iter(|| round_trip(&mut limited))
    });
    group.bench_function(BenchmarkId::new("layer_requests_only", "1MB"), |b| {
        b.iter(|| round_trip(&mut requests_only))
    });
    group.bench_function(BenchmarkId::new("usage_parser", "1MB"), |b| {
        b.iter(|| {
            let mut parser = UsageParser::new(Framing::Sse, DEFAULT_MAX_BUFFER_BYTES);
            for chunk in chunks.iter() {
                parser.feed(black_box(chunk));
            }
            parser.finish().unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, estimate, sse_body);
criterion_main!(benches);
