//! The built-in mock model: an OpenAI-compatible server on a loopback port of its own, so the
//! gateway works with nothing else running.
//!
//! Token counts are predictable: `prompt_tokens` is the number of whitespace-separated words
//! of the prompt (the `content` / `text` strings of chat messages and response items, the
//! `prompt` of completions, the `input` of embeddings and responses), `completion_tokens` is
//! `min(max_tokens, 16)` (`max_completion_tokens` / `max_output_tokens` also read; 16 when
//! unset), one word per token. Streams (`"stream": true`) send one SSE event per token after
//! `token_delay`, and the usage in a final chunk when `stream_options.include_usage` is set
//! (chat, completions) or in `response.completed` (responses).
//!
//! With `[mock] capacity` the mock saturates like a GPU (`mock/capacity.rs`): up to `capacity`
//! completions (streamed or not; a non-streamed one then takes its tokens' time too) decode at
//! full speed, more slow every token in proportion, and more than `queue` beyond capacity are
//! answered 503 with `Retry-After`. Embeddings take no place. `GET /v1/mock/stats` on the
//! mock's port tells how many run, wait beyond capacity and were refused, and the delay a
//! token takes now. `mock/sse.rs` writes the streams; a stream's events wait in its own
//! buffer for a client that reads slowly or not at all, so a completion holds its place for
//! its tokens' time only. A reload's capacity applies from each running completion's next
//! token.

mod capacity;
mod sse;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use http::{header, StatusCode};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::config::{Config, MockConfig, Upstream};
use capacity::{Capacity, Limits, Overloaded};
use sse::sse;

/// The most tokens the mock writes.
const MAX_COMPLETION: u64 = 16;

/// What the mock says, a word per token.
const WORDS: [&str; 16] = [
    "Hello",
    "from",
    "the",
    "mock",
    "model",
    "behind",
    "the",
    "rate-limited",
    "gateway:",
    "every",
    "word",
    "you",
    "read",
    "is",
    "one",
    "token.",
];

#[derive(Debug, Clone)]
struct Mock {
    capacity: Arc<Capacity>,
}

/// Starts the mock on `127.0.0.1:0`, its completions sharing `capacity`; returns its base URL
/// (`http://127.0.0.1:PORT/v1`).
async fn start(capacity: Arc<Capacity>) -> std::io::Result<(String, SocketAddr)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    // Each SSE event is a write of its own: without TCP_NODELAY, an event that follows an
    // unacknowledged one waits for the gateway's delayed ACK (up to 40 ms).
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "setting TCP_NODELAY failed");
        }
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/responses", post(responses))
        .route(
            "/v1/models",
            get(|| async { Json(json!({"object": "list", "data": []})) }),
        )
        .route(
            "/v1/mock/stats",
            get(|State(mock): State<Mock>| async move { Json(mock.capacity.stats()) }),
        )
        .with_state(Mock { capacity });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "mock model server failed");
        }
    });
    Ok((format!("http://{addr}/v1"), addr))
}

/// The mock, started the first time a configuration has a model on it (at start, or by a
/// reload), then kept running: a reload that drops its models leaves it idle. Its token
/// delay is the first configuration's; its capacity and queue follow each configuration
/// applied ([`OnDemand::configure`]).
#[derive(Debug)]
pub(crate) struct OnDemand {
    capacity: Arc<Capacity>,
    url: Option<String>,
}

fn limits(cfg: &MockConfig) -> Limits {
    Limits {
        capacity: cfg.capacity,
        queue: cfg.queue.unwrap_or(cfg.capacity),
    }
}

impl OnDemand {
    pub(crate) fn new(cfg: &MockConfig) -> Self {
        Self {
            capacity: Capacity::new(Duration::from_millis(cfg.token_delay_ms), limits(cfg)),
            url: None,
        }
    }

    /// Applies the capacity and queue of `cfg` (a reload's, once it is accepted).
    pub(crate) fn configure(&self, cfg: &MockConfig) {
        self.capacity.set_limits(limits(cfg));
    }

    /// The mock's base URL: started now if a model of `cfg` uses it and it isn't running
    /// yet; `None` while no configuration has used it.
    pub(crate) async fn url_for(&mut self, cfg: &Config) -> std::io::Result<Option<String>> {
        let wanted = cfg
            .models
            .values()
            .any(|m| matches!(m.upstream(), Upstream::Mock));
        if wanted && self.url.is_none() {
            let (url, _) = start(Arc::clone(&self.capacity)).await?;
            self.url = Some(url);
        }
        Ok(self.url.clone())
    }
}

/// The words of every string in `v` that a model reads.
fn words(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.split_whitespace().count() as u64,
        Value::Array(items) => items.iter().map(words).sum(),
        Value::Object(o) => ["content", "text"]
            .iter()
            .filter_map(|k| o.get(*k))
            .map(words)
            .sum(),
        _ => 0,
    }
}

fn completion_tokens(body: &Value) -> u64 {
    ["max_completion_tokens", "max_tokens", "max_output_tokens"]
        .iter()
        .find_map(|k| body.get(*k)?.as_u64())
        .unwrap_or(MAX_COMPLETION)
        .min(MAX_COMPLETION)
}

fn text(n: u64) -> Vec<String> {
    (0..n as usize)
        .map(|i| {
            let w = WORDS[i % WORDS.len()];
            if i == 0 {
                w.to_owned()
            } else {
                format!(" {w}")
            }
        })
        .collect()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The body as a JSON object.
fn parse(body: &Bytes) -> Option<Value> {
    serde_json::from_slice::<Value>(body)
        .ok()
        .filter(Value::is_object)
}

fn bad_request() -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(
            json!({"error": {"message": "the body must be a JSON object",
            "type": "invalid_request_error", "param": null, "code": null}}),
        ),
    )
        .into_response()
}

/// The 503 of a saturated mock, shaped like OpenAI's errors.
fn overloaded(o: Overloaded) -> Response {
    let message = format!(
        "the mock model is overloaded: {} completions running for a capacity of {} and a \
         queue of {}; retry after {} s",
        o.running, o.limits.capacity, o.limits.queue, o.retry_after_secs
    );
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, o.retry_after_secs.to_string())],
        Json(
            json!({"error": {"message": message, "type": "server_error", "param": null,
            "code": "overloaded"}}),
        ),
    )
        .into_response()
}

fn model(body: &Value) -> String {
    body.get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-gpt")
        .to_owned()
}

fn streaming(body: &Value) -> bool {
    body.get("stream") == Some(&Value::Bool(true))
}

fn include_usage(body: &Value) -> bool {
    body.pointer("/stream_options/include_usage") == Some(&Value::Bool(true))
}

fn usage(prompt: u64, completion: u64) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion,
        "total_tokens": prompt + completion})
}

fn finish_reason(body: &Value, n: u64) -> &'static str {
    if n < MAX_COMPLETION && completion_tokens(body) == n {
        "length"
    } else {
        "stop"
    }
}

async fn chat(State(mock): State<Mock>, body: Bytes) -> Response {
    let Some(body) = parse(&body) else {
        return bad_request();
    };
    let prompt = body.get("messages").map_or(0, words);
    let n = completion_tokens(&body);
    let model = model(&body);
    let id = format!("chatcmpl-mock-{}", now());
    let reason = finish_reason(&body, n);
    let seq = match mock.capacity.admit() {
        Ok(seq) => seq,
        Err(o) => return overloaded(o),
    };
    if !streaming(&body) {
        seq.generate(n).await;
        return Json(json!({
            "id": id, "object": "chat.completion", "created": now(), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text(n).concat()},
                "logprobs": null, "finish_reason": reason}],
            "usage": usage(prompt, n),
        }))
        .into_response();
    }
    let with_usage = include_usage(&body);
    let chunk = |delta: Value, finish: Value| {
        let mut c = json!({"id": id, "object": "chat.completion.chunk", "created": now(),
            "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": null,
            "finish_reason": finish}]});
        if with_usage {
            c["usage"] = Value::Null;
        }
        (None, c)
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    let mut tokens = Vec::new();
    for w in text(n) {
        tokens.push(events.len());
        events.push(chunk(json!({"content": w}), Value::Null));
    }
    events.push(chunk(json!({}), json!(reason)));
    if with_usage {
        events.push((
            None,
            json!({"id": id, "object": "chat.completion.chunk", "created": now(), "model": model,
                "choices": [], "usage": usage(prompt, n)}),
        ));
    }
    sse(events, tokens, seq, true)
}

async fn completions(State(mock): State<Mock>, body: Bytes) -> Response {
    let Some(body) = parse(&body) else {
        return bad_request();
    };
    let prompt = body.get("prompt").map_or(0, words);
    let n = completion_tokens(&body);
    let model = model(&body);
    let id = format!("cmpl-mock-{}", now());
    let reason = finish_reason(&body, n);
    let seq = match mock.capacity.admit() {
        Ok(seq) => seq,
        Err(o) => return overloaded(o),
    };
    if !streaming(&body) {
        seq.generate(n).await;
        return Json(json!({
            "id": id, "object": "text_completion", "created": now(), "model": model,
            "choices": [{"index": 0, "text": text(n).concat(), "logprobs": null,
                "finish_reason": reason}],
            "usage": usage(prompt, n),
        }))
        .into_response();
    }
    let chunk = |t: &str, finish: Value| {
        (
            None,
            json!({"id": id, "object": "text_completion", "created": now(), "model": model,
                "choices": [{"index": 0, "text": t, "logprobs": null, "finish_reason": finish}]}),
        )
    };
    let mut events = Vec::new();
    let mut tokens = Vec::new();
    for w in text(n) {
        tokens.push(events.len());
        events.push(chunk(&w, Value::Null));
    }
    events.push(chunk("", json!(reason)));
    if include_usage(&body) {
        events.push((
            None,
            json!({"id": id, "object": "text_completion", "created": now(), "model": model,
                "choices": [], "usage": usage(prompt, n)}),
        ));
    }
    sse(events, tokens, seq, true)
}

async fn embeddings(body: Bytes) -> Response {
    let Some(body) = parse(&body) else {
        return bad_request();
    };
    let inputs: Vec<Value> = match body.get("input") {
        Some(Value::Array(a)) => a.clone(),
        Some(v) => vec![v.clone()],
        None => Vec::new(),
    };
    let prompt: u64 = inputs.iter().map(words).sum();
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, v)| {
            // A small deterministic vector from the input's words.
            let n = words(v) as f64;
            let embedding: Vec<f64> = (0..8).map(|d| ((n + d as f64) * 0.37).sin()).collect();
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Json(
        json!({"object": "list", "data": data, "model": model(&body),
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}),
    )
    .into_response()
}

async fn responses(State(mock): State<Mock>, body: Bytes) -> Response {
    let Some(body) = parse(&body) else {
        return bad_request();
    };
    let prompt = body.get("input").map_or(0, words);
    let n = completion_tokens(&body);
    let model = model(&body);
    let id = format!("resp_mock_{}", now());
    let usage = json!({"input_tokens": prompt, "output_tokens": n, "total_tokens": prompt + n});
    let response = |status: &str, content: Value, usage: Value| {
        json!({"id": id, "object": "response", "created_at": now(), "status": status,
            "model": model, "output": content, "usage": usage})
    };
    let output = json!([{"type": "message", "id": "msg_mock", "status": "completed",
        "role": "assistant", "content": [{"type": "output_text", "text": text(n).concat(),
        "annotations": []}]}]);
    let seq = match mock.capacity.admit() {
        Ok(seq) => seq,
        Err(o) => return overloaded(o),
    };
    if !streaming(&body) {
        seq.generate(n).await;
        return Json(response("completed", output, usage)).into_response();
    }
    let mut events = vec![(
        Some("response.created"),
        json!({"type": "response.created",
            "response": response("in_progress", json!([]), Value::Null)}),
    )];
    let mut tokens = Vec::new();
    for w in text(n) {
        tokens.push(events.len());
        events.push((
            Some("response.output_text.delta"),
            json!({"type": "response.output_text.delta", "item_id": "msg_mock",
                "output_index": 0, "content_index": 0, "delta": w}),
        ));
    }
    events.push((
        Some("response.completed"),
        json!({"type": "response.completed", "response": response("completed", output, usage)}),
    ));
    sse(events, tokens, seq, false)
}
