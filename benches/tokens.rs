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
//!   code and JSON in alternating user and assistant messages: escapes every few bytes in
//!   the JSON parts), and `16KB_prose` (prose paragraphs only: an escape per paragraph),
//!   reported per call and as bytes of body per second:
//!   - `parse+heuristic` is the layer's real per-request cost: `OpenAiTokens::estimate` with
//!     [`estimate_text_tokens`](tower_llm_ratelimit::cost::estimate_text_tokens) on a view
//!     built with `RequestView::with_body(&bytes, None)` inside the timed closure, so the
//!     estimator parses the bytes into the crate's borrowed JSON document, exactly as the
//!     layer parses a request body once. `parse+tokenizer` is the same with `o200k_base`
//!     (feature `tokenizer`).
//!   - `parse_doc` is that parse alone, as near as the public API gets: `key::json_field`
//!     (`model`) on a `with_body(&bytes, None)` view, the borrowed parse plus one member
//!     lookup. `parse+heuristic` minus `parse_doc` is the estimate itself.
//!   - `parse_json` is `serde_json::from_slice::<Value>` alone: no longer on the layer's
//!     path, only a reference for what `RequestView::json()` costs when a user's closure
//!     asks for the body as a `serde_json::Value`.
//!   - `heuristic` and `tokenizer` are the estimate over a view given a pre-parsed `Value`
//!     (`with_body(&bytes, Some(&json))`). That path converts the `Value` into the borrowed
//!     document on every call, so it is the estimate plus that conversion, not the layer's
//!     path: what a user calling an estimator on their own `Value` pays.
//!
//!   Before measuring, the heuristic's count is checked to be the same on both paths, and
//!   the tokenizer's vocabulary is loaded (its one-time load is printed).
//! - `hostile bodies`: request bodies shaped to be costly to read, each at two sizes
//!   (`50k`, `100k`): a tool schema of that many properties (1.3 / 2.7 MB), that many
//!   members all named `dup` (0.7 / 1.5 MB), a 25th as many arrays 120 deep (0.5 / 1 MB),
//!   that many one-letter strings (0.2 / 0.4 MB), a 10th as many tool calls (0.35 / 0.7 MB).
//!   `parse+estimate` is `OpenAiTokens::estimate` on a `with_body(&bytes, None)` view (the
//!   layer's parse and the estimate), `parse+key` a `json_field` key deep in the body (the
//!   parse and a lookup). Each size's answers are checked before measuring. The time should
//!   grow with the bytes: the 100k size at most 2.5 times the 50k one.
//! - `sse_body`: draining a 1 MB `text/event-stream` response of realistic chat completion
//!   chunks (one event of 220-300 bytes per frame, `usage` in the final event) from a
//!   `service_fn` upstream in memory: `bare`, and through a `RateLimitLayer` with a token
//!   rule (`layer`): the body is then watched by the incremental usage parser and the charge
//!   settled at its end. The request's cost comes from `cost::from_fn`, so the request body
//!   is not read. `layer_requests_only` is the layer with a request rule only: no
//!   settlement, the body is passed through unwatched. `usage_parser` is the incremental
//!   usage parser alone, fed the same chunks. Reported as bytes per second. `bare` is a
//!   pointer hand-off per frame, so `layer`/`bare` here is the parser's cost against almost
//!   nothing, not what a server sees.
//! - `usage_json`: the usage parser alone on a non-streaming chat completion of 1 KB (its
//!   content padded with prose, `usage` near the end), fed whole (`1KB`) and in 4 chunks.
//! - `sse_socket`: the `sse_body` stream served over loopback HTTP/1.1, what a server actually
//!   does with it. Three hyper 1 servers (`http1::Builder` defaults, the services adapted
//!   with hyper-util's `TowerToHyperService`, `TCP_NODELAY`) on `127.0.0.1:0`, each serving
//!   the same upstream (`content-type: text/event-stream`, one event per frame, so one HTTP
//!   chunk per event): `bare`, `layer` (the same token rule as `sse_body`: watched and
//!   settled) and `layer_requests_only`. The client is a minimal raw HTTP/1.1 client on one
//!   keep-alive connection per server: it writes a pre-serialized `POST` and reads each
//!   chunked response whole, counting its data bytes. Reported as SSE data bytes per second
//!   (the chunk framing, ~2.5% more on the wire, and the headers are not counted). Checked
//!   before measuring: every variant receives the whole stream, and the layer's charge was
//!   settled to the usage's 5,555 tokens. Then a summary line on stderr: `layer`/`bare` and
//!   `layer_requests_only`/`bare` throughput (median of per-round ratios over rounds of
//!   back-to-back fetches, variants in rotated order), with the server's and the client's
//!   CPU time per fetch (`/proc/.../schedstat`), which shows which side bounds the
//!   throughput.
//!
//! `estimate` and `sse_body` run on the bench thread: the memory store answers
//! synchronously and every future and frame is ready at once, so they are polled with a
//! no-op waker (no runtime). `sse_socket` uses two threads, one per side, each with a
//! current-thread tokio runtime: the servers on a thread of their own (`sse-server`), the
//! client on the bench thread (`block_on` per fetch). With two cores, each side then has one
//! (the OS places them; they are not pinned), nothing migrates between workers, and the
//! server's CPU per fetch is that one thread's. A multi-thread runtime would add a third
//! busy thread (the bench thread's `block_on`) or share one pool between both sides.

#[allow(dead_code)]
#[path = "support/cpu.rs"]
mod cpu;
#[path = "support/hostile.rs"]
mod hostile;

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::net::SocketAddr;
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
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde_json::{json, Value};
use tower::{Layer, Service};
use tower_llm_ratelimit::cost::usage::{Framing, UsageParser, DEFAULT_MAX_BUFFER_BYTES};
use tower_llm_ratelimit::cost::{self, CostEstimator, OpenAiTokens};
use tower_llm_ratelimit::key::{self, KeyExtractor, RequestView};
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
    chat_body_of(size, &[PROSE, CODE, DATA])
}

/// A chat completions body of about `size` bytes whose messages cycle through `pieces`.
fn chat_body_of(size: usize, pieces: &[&str]) -> Bytes {
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
            content.push_str(pieces[(i + k) % pieces.len()]);
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
    let model = key::json_field("model");
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
    for (label, size, prose_only) in [
        ("1KB", 1 << 10, false),
        ("16KB", 16 << 10, false),
        ("16KB_prose", 16 << 10, true),
        ("256KB", 256 << 10, false),
    ] {
        let bytes = if prose_only {
            chat_body_of(size, &[PROSE])
        } else {
            chat_body(size)
        };
        assert!(
            bytes.len().abs_diff(size) < size / 10 + 100,
            "{label}: {} bytes",
            bytes.len()
        );
        let json: Value = serde_json::from_slice(&bytes).unwrap();
        let view = RequestView::from_request(&req).with_body(&bytes, Some(&json));
        let h = heuristic.estimate(&view).unwrap();
        // The layer's path (the estimator parses the bytes) counts what the Value path does.
        let layer_view = RequestView::from_request(&req).with_body(&bytes, None);
        assert_eq!(
            heuristic.estimate(&layer_view).unwrap().input_tokens(),
            h.input_tokens()
        );
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
        // The borrowed parse alone: an extractor on a view without a document parses the
        // bytes as the layer does, then looks up one member.
        group.bench_function(BenchmarkId::new("parse_doc", label), |b| {
            b.iter(|| {
                let view = RequestView::from_request(&req).with_body(black_box(&bytes), None);
                model.extract(&view).unwrap()
            })
        });
        // The layer's path: the estimator parses the bytes into the borrowed document.
        group.bench_function(BenchmarkId::new("parse+heuristic", label), |b| {
            b.iter(|| {
                let view = RequestView::from_request(&req).with_body(black_box(&bytes), None);
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
                    let view = RequestView::from_request(&req).with_body(black_box(&bytes), None);
                    exact.estimate(&view).unwrap()
                })
            });
        }
    }
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// hostile bodies

/// Bodies shaped to be costly to read (`support/hostile.rs`), at 50,000 and 100,000 (members,
/// strings; a 25th as many deep arrays, a 10th as many tool calls): the estimate of the body
/// as the layer makes it (parse, then estimate) and a `json_field` key deep inside it (parse,
/// then look up). Both sizes of a shape should cost in proportion to their bytes.
fn hostile_bodies(c: &mut Criterion) {
    let mut group = c.benchmark_group("hostile bodies");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let est = heuristic();
    for (label, n) in [("50k", 50_000), ("100k", 100_000)] {
        for shape in hostile::hostile_shapes(n) {
            let req = Request::post(shape.path).body(()).unwrap();
            let bytes = Bytes::from(shape.body);
            let key = key::json_field(&shape.pointer);
            // Checked once: the bench measures right answers.
            let view = RequestView::from_request(&req).with_body(&bytes, None);
            assert_eq!(
                est.estimate(&view).unwrap().input_tokens(),
                shape.input_tokens
            );
            assert_eq!(key.extract(&view), Some(shape.key.as_str().into()));
            eprintln!("{} {label}: {} bytes", shape.name, bytes.len());
            group.throughput(Throughput::Bytes(bytes.len() as u64));
            let id = format!("{}/parse+estimate", shape.name);
            group.bench_function(BenchmarkId::new(id, label), |b| {
                b.iter(|| {
                    let view = RequestView::from_request(&req).with_body(black_box(&bytes), None);
                    est.estimate(&view).unwrap()
                })
            });
            let id = format!("{}/parse+key", shape.name);
            group.bench_function(BenchmarkId::new(id, label), |b| {
                b.iter(|| {
                    let view = RequestView::from_request(&req).with_body(black_box(&bytes), None);
                    key.extract(&view).unwrap()
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

/// A token rule (global key, a limit never reached) charging 1 per request up front
/// (`cost::from_fn`, so the request body is not read): every response body is watched for
/// `usage` and the charge settled to it at the end.
fn token_layer() -> RateLimitLayer {
    RateLimitLayer::builder()
        .rule(Rule::new(
            "tokens",
            key::global(),
            Quota::per_hour(u64::MAX / 2).tokens(),
        ))
        .cost(cost::from_fn(|_| Some(1)))
        .build()
        .unwrap()
}

/// The layer's own cost without the body watch: a request rule needs no settlement.
fn requests_layer() -> RateLimitLayer {
    RateLimitLayer::builder()
        .rule(Rule::new(
            "requests",
            key::global(),
            Quota::per_hour(u64::MAX / 2),
        ))
        .build()
        .unwrap()
}

/// What `layer`'s only rule has consumed in its current window.
fn consumed(layer: &RateLimitLayer) -> u64 {
    let req = Request::post(CHAT).body(()).unwrap();
    let status = now(layer.status(RequestView::from_request(&req))).unwrap();
    let snapshot = status[0].snapshot.as_ref().unwrap();
    snapshot.limit - snapshot.remaining
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
    let layer = token_layer();
    let mut bare = upstream::<Empty<Bytes>>(Arc::clone(&chunks));
    let mut limited = layer.layer(upstream(Arc::clone(&chunks)));
    let mut requests_only = requests_layer().layer(upstream(Arc::clone(&chunks)));

    // The layer did watch the stream: the charge of 1 was settled to the usage's 5,555.
    assert_eq!(round_trip(&mut bare), total);
    assert_eq!(round_trip(&mut limited), total);
    assert_eq!(round_trip(&mut requests_only), total);
    assert_eq!(consumed(&layer), 5_555);

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

/// A non-streaming chat completion of `size` bytes (its content padded with prose), `usage`
/// near the end as OpenAI writes it.
fn json_response(size: usize) -> Vec<u8> {
    let body = |content: &str| {
        serde_json::json!({
            "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
            "object": "chat.completion",
            "created": 1741569952,
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": null, "annotations": []},
                "logprobs": null,
                "finish_reason": "stop",
            }],
            "usage": {
                "prompt_tokens": 1234, "completion_tokens": 4321, "total_tokens": 5555,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                    "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
            },
            "service_tier": "default",
            "system_fingerprint": "fp_eb9dce56a8",
        })
        .to_string()
        .into_bytes()
    };
    let frame = body("").len();
    let content: String = PROSE
        .chars()
        .cycle()
        .take(size.saturating_sub(frame))
        .collect();
    body(&content)
}

/// The usage parser alone on a 1 KB JSON response, fed whole and in 4 chunks.
fn usage_json(c: &mut Criterion) {
    let body = json_response(1024);
    let mut group = c.benchmark_group("usage_json");
    group
        .throughput(Throughput::Bytes(body.len() as u64))
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for (id, parts) in [("1KB", 1), ("1KB_4_chunks", 4)] {
        let chunks: Vec<&[u8]> = body.chunks(body.len().div_ceil(parts)).collect();
        let parse = || {
            let mut parser = UsageParser::new(Framing::Json, DEFAULT_MAX_BUFFER_BYTES);
            for chunk in &chunks {
                parser.feed(black_box(chunk));
            }
            parser.finish()
        };
        assert_eq!(parse().map(|u| u.total_tokens), Some(5_555), "{id}");
        group.bench_function(BenchmarkId::new("usage_parser", id), |b| b.iter(parse));
    }
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// sse_socket

/// The thread the servers run on (its CPU time is read from `/proc`).
const SERVER_THREAD: &str = "sse-server";

/// Serves `svc` over HTTP/1.1 on `listener`, on the current runtime: hyper's
/// `http1::Builder` with its defaults (what `axum::serve` uses), `TCP_NODELAY`.
async fn serve<S, B>(listener: std::net::TcpListener, svc: S)
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    listener.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        tcp.set_nodelay(true).unwrap();
        let svc = TowerToHyperService::new(svc.clone());
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

/// The three servers on their own thread and current-thread runtime, until dropped.
struct Servers {
    /// `bare`, `layer`, `layer_requests_only`.
    addrs: [SocketAddr; 3],
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Servers {
    fn start(chunks: &Arc<[Bytes]>, layer: &RateLimitLayer) -> Self {
        let listeners: [std::net::TcpListener; 3] =
            std::array::from_fn(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
        let addrs = std::array::from_fn(|i| listeners[i].local_addr().unwrap());
        let bare = upstream(Arc::clone(chunks));
        let limited = layer.layer(upstream(Arc::clone(chunks)));
        let requests_only = requests_layer().layer(upstream(Arc::clone(chunks)));
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(SERVER_THREAD.into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let [l0, l1, l2] = listeners;
                    tokio::spawn(serve(l0, bare));
                    tokio::spawn(serve(l1, limited));
                    tokio::spawn(serve(l2, requests_only));
                    let _ = stop.await;
                });
            })
            .unwrap();
        Self {
            addrs,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        drop(self.shutdown.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A minimal HTTP/1.1 client on one keep-alive connection: writes a pre-serialized request,
/// reads the chunked response whole into a reused buffer, and counts its data bytes.
struct RawClient {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

const REQUEST: &[u8] =
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 0\r\n\r\n";

impl RawClient {
    async fn connect(addr: SocketAddr) -> Self {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Self {
            stream,
            buf: vec![0; 2 << 20],
        }
    }

    /// One request; the response body's data bytes (chunk framing not counted).
    async fn fetch(&mut self) -> usize {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.stream.write_all(REQUEST).await.unwrap();
        let mut len = 0;
        let mut head = None;
        loop {
            if len == self.buf.len() {
                self.buf.resize(len * 2, 0);
            }
            let n = self.stream.read(&mut self.buf[len..]).await.unwrap();
            assert!(n > 0, "the server closed the connection");
            len += n;
            if head.is_none() {
                head = self.buf[..len]
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .map(|i| i + 4);
            }
            // The last chunk: a size line of `0` after a chunk's CRLF, no trailers. (SSE data
            // ends its lines with `\n\n`, and a size line is followed by data, not by CRLF.)
            if let Some(head) = head {
                if self.buf[head..len].ends_with(b"\r\n0\r\n\r\n") {
                    return dechunked_len(&self.buf[..head], &self.buf[head..len]);
                }
            }
        }
    }
}

/// The data bytes of a chunked body, after checking the response is a chunked 200.
fn dechunked_len(head: &[u8], mut body: &[u8]) -> usize {
    assert!(head.starts_with(b"HTTP/1.1 200 "), "not a 200");
    assert!(
        head.windows(26)
            .any(|w| w.eq_ignore_ascii_case(b"transfer-encoding: chunked")),
        "not chunked"
    );
    let mut total = 0;
    loop {
        let eol = body.iter().position(|&b| b == b'\n').unwrap();
        let line = std::str::from_utf8(&body[..eol - 1]).unwrap();
        let size = usize::from_str_radix(line.split(';').next().unwrap(), 16).unwrap();
        body = &body[eol + 1..];
        if size == 0 {
            assert_eq!(body, b"\r\n");
            return total;
        }
        assert_eq!(&body[size..size + 2], b"\r\n");
        total += size;
        body = &body[size + 2..];
    }
}

/// One variant's pass of back-to-back fetches in the summary.
#[derive(Clone, Copy, Default)]
struct Pass {
    mib_per_s: f64,
    /// CPU time per fetch of the server thread and of the client (bench) thread.
    server_us: f64,
    client_us: f64,
}

/// A round of the summary: one pass per variant.
type Round = [Pass; 3];

fn sse_socket(c: &mut Criterion) {
    const VARIANTS: [&str; 3] = ["bare", "layer", "layer_requests_only"];
    let chunks = sse_chunks(1 << 20);
    let total: usize = chunks.iter().map(Bytes::len).sum();
    let layer = token_layer();
    let servers = Servers::start(&chunks, &layer);
    // The client: a current-thread runtime driven by the bench thread itself.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut clients = servers
        .addrs
        .map(|addr| rt.block_on(RawClient::connect(addr)));

    // Every variant sends the whole stream, and the layer did watch it: the charge of 1 was
    // settled to the usage's 5,555 (when the server dropped the body, which may be just
    // after the client read its end).
    for client in &mut clients {
        assert_eq!(rt.block_on(client.fetch()), total);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while consumed(&layer) != 5_555 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(consumed(&layer), 5_555);

    let mut group = c.benchmark_group("sse_socket");
    group
        .throughput(Throughput::Bytes(total as u64))
        .sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for (variant, client) in VARIANTS.iter().zip(&mut clients) {
        group.bench_function(BenchmarkId::new(*variant, "1MB"), |b| {
            b.iter(|| rt.block_on(client.fetch()))
        });
    }
    group.finish();

    // The summary: rounds of back-to-back fetches, the variants in rotated order; a ratio is
    // the median of its per-round ratios. With each side's CPU per fetch, which tells which
    // side bounds the throughput.
    const ROUNDS: usize = 7;
    const FETCHES: usize = 100;
    let mut rounds: Vec<Round> = Vec::new();
    for round in 0..ROUNDS {
        let mut row = Round::default();
        for k in 0..3 {
            let i = (round + k) % 3;
            let (server, client) = (
                cpu::threads_cpu_ns("self", Some(SERVER_THREAD)),
                cpu::this_thread_cpu_ns(),
            );
            let start = std::time::Instant::now();
            for _ in 0..FETCHES {
                black_box(rt.block_on(clients[i].fetch()));
            }
            let secs = start.elapsed().as_secs_f64();
            let per_fetch_us = |ns: u64| ns as f64 / FETCHES as f64 / 1e3;
            row[i] = Pass {
                mib_per_s: (total * FETCHES) as f64 / secs / f64::from(1 << 20),
                server_us: per_fetch_us(cpu::threads_cpu_ns("self", Some(SERVER_THREAD)) - server),
                client_us: per_fetch_us(cpu::this_thread_cpu_ns() - client),
            };
        }
        rounds.push(row);
    }
    let median = |f: &dyn Fn(&Round) -> f64| {
        let mut v: Vec<f64> = rounds.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    eprintln!(
        "sse_socket summary ({ROUNDS} rounds x {FETCHES} fetches, medians): \
         bare {:.0} MiB/s, layer {:.0} MiB/s, layer_requests_only {:.0} MiB/s; \
         layer/bare {:.3}, layer_requests_only/bare {:.3}; CPU per fetch: server {:.0} / {:.0} \
         / {:.0} us, client {:.0} / {:.0} / {:.0} us (bare / layer / layer_requests_only)",
        median(&|r| r[0].mib_per_s),
        median(&|r| r[1].mib_per_s),
        median(&|r| r[2].mib_per_s),
        median(&|r| r[1].mib_per_s / r[0].mib_per_s),
        median(&|r| r[2].mib_per_s / r[0].mib_per_s),
        median(&|r| r[0].server_us),
        median(&|r| r[1].server_us),
        median(&|r| r[2].server_us),
        median(&|r| r[0].client_us),
        median(&|r| r[1].client_us),
        median(&|r| r[2].client_us),
    );
    drop(clients);
    drop(servers);
}

criterion_group!(
    benches,
    estimate,
    hostile_bodies,
    sse_body,
    usage_json,
    sse_socket
);
criterion_main!(benches);
