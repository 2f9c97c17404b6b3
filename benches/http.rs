//! What the layer costs over real HTTP: loopback load against axum servers started in this
//! process, with and without rate limiting, all in one run.
//!
//! ```text
//! cargo bench --bench http
//! ```
//!
//! Servers (each on `127.0.0.1:0`, `POST /v1/chat/completions` answering a 303-byte
//! OpenAI-shaped JSON with `usage`; the handler reads the request body, as a real one would):
//!
//! 1. bare axum (the client sends a small body, ~80 bytes);
//! 2. `tower_governor`: one `GovernorLayer` keyed by the `x-api-key` header, huge quota;
//! 3. `tower_governor` x2: two `GovernorLayer`s (header and global), the same rules as (4);
//! 4. ours, 2 request rules: `key::header("x-api-key")` and `key::global()`, huge limits,
//!    default headers (`HeaderStyle::BOTH`);
//! 5. bare axum, the client sending a 2 KB OpenAI chat body: the baseline of (6) and (8);
//! 6. ours, one `tokens()` rule with `cost::openai()` over the 2 KB body (the layer reads and
//!    parses it, estimates, reserves, replays it, and settles to the response's `usage`);
//! 7. and 8. = 4. and 6. with `HeaderStyle::NONE`: what the rate-limit headers cost.
//! 9. = 2. with `use_headers()`: tower_governor adding its `x-ratelimit-limit` and
//!    `x-ratelimit-remaining` headers, the peer's nearest equivalent of (4).
//!
//! Nothing is ever denied (every response is checked for 200). Load: `HTTP_BENCH_CONNECTIONS`
//! (32) HTTP/1.1 keep-alive connections, each sending requests back to back,
//! `HTTP_BENCH_REQUESTS` (200,000) requests per server, split into `HTTP_BENCH_ROUNDS` (10)
//! rounds; each round runs every server once, in rotated order, and a server's ratio to its
//! baseline is the median of its per-round ratios (background load drifts hit both sides of
//! a ratio alike). A warm-up pass of 10% first. API keys rotate over 1,000 values.
//!
//! Client: hyper's `client::conn::http1` (default), or with `HTTP_BENCH_CLIENT=raw` a minimal
//! client writing pre-serialized requests and reading each response to its
//! `content-length`, which needs less CPU than the server so the server is the bottleneck.
//!
//! Runtimes: the servers run on one 1-worker tokio runtime, the client on another; their
//! workers are pinned to CPUs 0 and 1 with `taskset` (`HTTP_BENCH_PIN=0`: not pinned), so
//! each side has a core of its own and neither steals from the other unevenly.
//!
//! Columns besides throughput and latency: CPU time of the server's and the client's threads
//! per request (`/proc/self/task/*/schedstat`), and `in-process/req`: the same app called with
//! `tower::ServiceExt::oneshot` on a current-thread runtime, no sockets (best of 3 x
//! `HTTP_BENCH_INPROC_REQUESTS`, 100,000), the layer's own CPU cost without network noise.
//!
//! Then the example gateway (`examples/gateway`, built with `cargo build --release --example
//! gateway` if needed, run as its own process with one tokio worker thread like the bare
//! proxy's runtime, every rule of a tier and a model, limits huge) in front of server (5),
//! against calling (5) directly and through a bare axum + hyper-util proxy: latency with one
//! connection (unloaded), throughput with the full load, and the middle hop's CPU per
//! request. `HTTP_BENCH_GATEWAY=0` skips it.
//!
//! Last, the gateway in front of an upstream written like Python's `http.server` (Nagle's
//! algorithm on, a response's head and body in two writes), with the raw client: the
//! latency it adds at p50 and p99 on 1 and 8 keep-alive connections, and its throughput at
//! 8 against the upstream's. The upstream's baseline is taken with a client that
//! acknowledges at once (`TCP_QUICKACK`): with an ordinary client the upstream's own split
//! writes wait ~40 ms for the client's delayed ACK (a row shows it, on a few requests).
//! `HTTP_BENCH_SPLIT_ONLY=1` runs only this part; `HTTP_BENCH_SPLIT_UPSTREAM=HOST:PORT` puts
//! an upstream of your own there instead (Python's `http.server`: see BENCHMARKS.md).
//!
//! `HTTP_BENCH_ONLY=4,7` runs only those servers (for profiling); `HTTP_BENCH_SHOW=1` prints
//! one raw response of each server first. `HTTP_BENCH_INPROC_ONLY=1` stops after the
//! in-process pass (3 x `HTTP_BENCH_INPROC_REQUESTS` requests per server): under callgrind
//! with `--toggle-collect='http::in_process_ns::*'` (the measured loop only, not the setup)
//! the instructions counted, divided by the requests, are the cost per request (README,
//! "What the layer costs in a real server").

#[allow(dead_code)]
#[path = "support/cpu.rs"]
mod cpu;
#[allow(dead_code)]
#[path = "support/gateway.rs"]
mod gateway;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::routing::post;
use axum::serve::ListenerExt;
use axum::Router;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{HeaderName, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::key_extractor::{GlobalKeyExtractor, KeyExtractor};
use tower_governor::{GovernorError, GovernorLayer};
use tower_llm_ratelimit::headers::HeaderStyle;
use tower_llm_ratelimit::{cost, key, Quota, RateLimitLayer, Rule};

use gateway::Gateway;

const PATH: &str = "/v1/chat/completions";

/// What the servers answer: a small chat completion with `usage` (the token rule settles to
/// it).
const RESPONSE: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":412,"completion_tokens":9,"total_tokens":421}}"#;

const SMALL_BODY: &str =
    r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello there"}]}"#;

/// "Unlimited": nothing is ever denied, every decision does the full charge.
const HUGE: u64 = 1_000_000_000;

/// How long one measured pass may take before the bench gives up.
const PASS_LIMIT: Duration = Duration::from_secs(300);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().replace('_', "").parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

/// A realistic OpenAI chat request of exactly 2,048 bytes: a system prompt, a short
/// conversation, and the last user message padded with prose.
fn chat_body_2k() -> Bytes {
    const PROSE: &str = "The quarterly report shows revenue growth across all regions, with \
        the strongest gains in the enterprise segment. Customer retention improved after the \
        onboarding changes, while support ticket volume fell by a fifth. Please summarise the \
        key findings, list three risks for next quarter, and suggest one experiment we could \
        run to validate the pricing change before the board meeting. ";
    let build = |pad: &str| {
        serde_json::json!({
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "You are a concise analyst. Answer in plain English, use short bullet points, and never invent numbers that are not in the user's text."},
                {"role": "user", "content": "I will paste parts of our quarterly report. Wait for the question."},
                {"role": "assistant", "content": "Understood. Paste the report and ask your question when ready."},
                {"role": "user", "content": pad},
            ],
            "max_tokens": 256,
            "temperature": 0.2,
            "user": "bench-user"
        })
        .to_string()
    };
    let base = build("").len();
    let pad: String = PROSE.chars().cycle().take(2048 - base).collect();
    let body = build(&pad);
    assert_eq!(body.len(), 2048, "the chat body is 2 KB");
    Bytes::from(body)
}

async fn chat(body: Bytes) -> ([(HeaderName, &'static str); 1], &'static str) {
    std::hint::black_box(body);
    ([(CONTENT_TYPE, "application/json")], RESPONSE)
}

fn bare() -> Router {
    Router::new().route(PATH, post(chat))
}

/// tower_governor's key: the `x-api-key` header (it has no built-in header extractor).
#[derive(Debug, Clone, Copy)]
struct ApiKeyHeader;

impl KeyExtractor for ApiKeyHeader {
    type Key = HeaderValue;

    fn extract<T>(&self, req: &Request<T>) -> Result<HeaderValue, GovernorError> {
        req.headers()
            .get("x-api-key")
            .cloned()
            .ok_or(GovernorError::UnableToExtractKey)
    }
}

/// One governor layer keyed by the header: a cell every nanosecond, a burst of `u32::MAX`.
fn governor_header(
) -> GovernorLayer<ApiKeyHeader, governor::middleware::NoOpMiddleware, axum::body::Body> {
    let config = GovernorConfigBuilder::default()
        .per_nanosecond(1)
        .burst_size(u32::MAX)
        .key_extractor(ApiKeyHeader)
        .finish()
        .expect("governor config");
    GovernorLayer::new(config)
}

/// (2) with `use_headers()`: `x-ratelimit-limit` and `x-ratelimit-remaining` on every
/// response, as this layer adds its own (two headers against our five).
fn governor_header_with_headers(
) -> GovernorLayer<ApiKeyHeader, governor::middleware::StateInformationMiddleware, axum::body::Body>
{
    let config = GovernorConfigBuilder::default()
        .per_nanosecond(1)
        .burst_size(u32::MAX)
        .key_extractor(ApiKeyHeader)
        .use_headers()
        .finish()
        .expect("governor config");
    GovernorLayer::new(config)
}

fn governor_global(
) -> GovernorLayer<GlobalKeyExtractor, governor::middleware::NoOpMiddleware, axum::body::Body> {
    let config = GovernorConfigBuilder::default()
        .per_nanosecond(1)
        .burst_size(u32::MAX)
        .key_extractor(GlobalKeyExtractor)
        .finish()
        .expect("governor config");
    GovernorLayer::new(config)
}

fn ours_request_rules(headers: HeaderStyle) -> RateLimitLayer {
    RateLimitLayer::builder()
        .headers(headers)
        .rule(Rule::new(
            "user-rpm",
            key::header("x-api-key"),
            Quota::per_minute(HUGE),
        ))
        .rule(Rule::new(
            "global-rpm",
            key::global(),
            Quota::per_minute(HUGE),
        ))
        .build()
        .expect("layer")
}

fn ours_token_rule(headers: HeaderStyle) -> RateLimitLayer {
    RateLimitLayer::builder()
        .headers(headers)
        .rule(Rule::new(
            "user-tpm",
            key::header("x-api-key"),
            Quota::per_minute(HUGE).tokens(),
        ))
        .cost(cost::openai())
        .build()
        .expect("layer")
}

/// Serves `app` on `127.0.0.1:0` (on the current runtime) with `TCP_NODELAY`.
async fn serve(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move {
        axum::serve(listener, app).await.expect("serve");
    });
    addr
}

/// The app's CPU cost per request without any network: `oneshot` on a current-thread
/// runtime, the response body collected, ns per request (best of 3 runs of `n`).
///
/// The router is given its state first, as `axum::serve` does once per connection: called
/// as it is, axum would build each handler's route (and apply the layers to it) again on
/// every request.
fn in_process_ns(app: Router, body: Bytes, api_keys: &[HeaderValue], n: usize) -> f64 {
    use tower::ServiceExt;
    let app: Router = app.with_state(());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            let start = Instant::now();
            for i in 0..n {
                let req = Request::post(PATH)
                    .header(CONTENT_TYPE, "application/json")
                    .header("x-api-key", api_keys[i % api_keys.len()].clone())
                    .body(axum::body::Body::from(body.clone()))
                    .expect("request");
                let resp = app.clone().oneshot(req).await.expect("infallible");
                assert_eq!(resp.status(), StatusCode::OK);
                let _ = resp.into_body().collect().await.expect("body");
            }
            best = best.min(start.elapsed().as_nanos() as f64 / n as f64);
        }
        best
    })
}

/// What a load pass sends.
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    body: Bytes,
    /// Fixed headers (content-type, authorization).
    headers: Vec<(HeaderName, HeaderValue)>,
    /// Rotate `x-api-key` over these values, one per request.
    api_keys: Arc<Vec<HeaderValue>>,
    /// Send with the minimal raw HTTP/1.1 client instead of hyper's.
    raw: bool,
    /// The raw client acknowledges what it receives at once (`TCP_QUICKACK` before each
    /// read, Linux), so a server's split writes don't wait for its delayed ACK.
    quick_ack: bool,
}

impl Target {
    /// Every request the raw client sends, serialized up front (one per API key).
    fn raw_requests(&self) -> Vec<Vec<u8>> {
        let one = |key: Option<&HeaderValue>| {
            let mut r = format!("POST {PATH} HTTP/1.1\r\nhost: {}\r\n", self.addr).into_bytes();
            for (name, value) in &self.headers {
                r.extend_from_slice(name.as_str().as_bytes());
                r.extend_from_slice(b": ");
                r.extend_from_slice(value.as_bytes());
                r.extend_from_slice(b"\r\n");
            }
            if let Some(k) = key {
                r.extend_from_slice(b"x-api-key: ");
                r.extend_from_slice(k.as_bytes());
                r.extend_from_slice(b"\r\n");
            }
            r.extend_from_slice(format!("content-length: {}\r\n\r\n", self.body.len()).as_bytes());
            r.extend_from_slice(&self.body);
            r
        };
        if self.api_keys.is_empty() {
            vec![one(None)]
        } else {
            self.api_keys.iter().map(|k| one(Some(k))).collect()
        }
    }
}

/// One request with the raw client: the response as received (for `HTTP_BENCH_SHOW=1`).
async fn show_response(target: &Target) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = TcpStream::connect(target.addr).await else {
        return "(connect failed)".into();
    };
    let request = &target.raw_requests()[0];
    if stream.write_all(request).await.is_err() {
        return "(write failed)".into();
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    // Read what arrives within 200 ms.
    while let Ok(Ok(n)) =
        tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf[got..])).await
    {
        if n == 0 {
            break;
        }
        got += n;
    }
    format!("{} bytes:\n{}", got, String::from_utf8_lossy(&buf[..got]))
}

/// The raw client's side of one connection: pre-serialized requests written back to back,
/// each response read up to its `content-length` (status checked, nothing else parsed).
async fn raw_connection(
    target: Target,
    requests: Arc<Vec<Vec<u8>>>,
    next: Arc<AtomicUsize>,
    total: usize,
) -> Result<Vec<u64>, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(target.addr)
        .await
        .map_err(|e| format!("connect {}: {e}", target.addr))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut buf = bytes::BytesMut::with_capacity(16 * 1024);
    let mut latencies = Vec::with_capacity(total / 16 + 16);
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= total {
            return Ok(latencies);
        }
        let start = Instant::now();
        stream
            .write_all(&requests[i % requests.len()])
            .await
            .map_err(|e| format!("write: {e}"))?;
        // Headers.
        let head_end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            if target.quick_ack {
                quick_ack(&stream);
            }
            if stream.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
                return Err("connection closed by the server".into());
            }
        };
        let head = &buf[..head_end];
        if !head.starts_with(b"HTTP/1.1 200 ") {
            return Err(format!(
                "response: {}",
                String::from_utf8_lossy(&head[..head.len().min(200)])
            ));
        }
        let length = head
            .split(|&b| b == b'\n')
            .find_map(|line| {
                let line = std::str::from_utf8(line).ok()?;
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            })
            .ok_or("the raw client needs responses with content-length")?;
        while buf.len() < head_end + length {
            if target.quick_ack {
                quick_ack(&stream);
            }
            if stream.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
                return Err("connection closed mid-body".into());
            }
        }
        let _ = buf.split_to(head_end + length);
        latencies.push(start.elapsed().as_nanos() as u64);
    }
}

/// Acknowledges at once what has arrived on `tcp` (Linux's `TCP_QUICKACK`, which the kernel
/// turns off again when the socket sends); nothing elsewhere.
fn quick_ack(tcp: &TcpStream) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let _ = socket2::SockRef::from(tcp).set_tcp_quickack(true);
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = tcp;
}

/// The result of one pass.
#[derive(Default)]
struct Pass {
    requests: usize,
    elapsed: Duration,
    /// Per-request latency, nanoseconds.
    latencies: Vec<u64>,
    /// CPU time of the server's and the client's threads during the pass, nanoseconds.
    server_cpu: u64,
    client_cpu: u64,
}

impl Pass {
    fn merge(&mut self, other: Pass) {
        self.requests += other.requests;
        self.elapsed += other.elapsed;
        self.latencies.extend(other.latencies);
        self.server_cpu += other.server_cpu;
        self.client_cpu += other.client_cpu;
    }

    /// Server CPU per request, µs.
    fn server_us(&self) -> f64 {
        self.server_cpu as f64 / 1_000.0 / self.requests as f64
    }

    /// Client CPU per request, µs.
    fn client_us(&self) -> f64 {
        self.client_cpu as f64 / 1_000.0 / self.requests as f64
    }

    /// Share of the wall time the server thread was on a CPU.
    fn server_busy(&self) -> f64 {
        self.server_cpu as f64 / self.elapsed.as_nanos() as f64
    }

    fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile_us(&mut self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        self.latencies.sort_unstable();
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[i] as f64 / 1_000.0
    }
}

/// One keep-alive connection sending requests back to back until `next` reaches `total`.
async fn connection(
    target: Target,
    next: Arc<AtomicUsize>,
    total: usize,
) -> Result<Vec<u64>, String> {
    let stream = TcpStream::connect(target.addr)
        .await
        .map_err(|e| format!("connect {}: {e}", target.addr))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let conn = tokio::spawn(conn);
    let host = HeaderValue::from_str(&target.addr.to_string()).expect("host");
    let uri: http::Uri = PATH.parse().expect("uri");
    let mut latencies = Vec::with_capacity(total / 16 + 16);
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= total {
            break;
        }
        let mut req = Request::post(uri.clone())
            .body(Full::new(target.body.clone()))
            .expect("request");
        let h = req.headers_mut();
        h.insert(HOST, host.clone());
        for (name, value) in &target.headers {
            h.insert(name.clone(), value.clone());
        }
        if !target.api_keys.is_empty() {
            h.insert(
                "x-api-key",
                target.api_keys[i % target.api_keys.len()].clone(),
            );
        }
        std::future::poll_fn(|cx| sender.poll_ready(cx))
            .await
            .map_err(|e| format!("connection closed: {e}"))?;
        let start = Instant::now();
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("response body: {e}"))?
            .to_bytes();
        latencies.push(start.elapsed().as_nanos() as u64);
        if status != StatusCode::OK {
            return Err(format!(
                "status {status}: {}",
                String::from_utf8_lossy(&body)
            ));
        }
    }
    drop(sender);
    let _ = conn.await;
    Ok(latencies)
}

/// `total` requests over `connections` connections, on the current (client) runtime.
async fn load(target: &Target, total: usize, connections: usize) -> Pass {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let raw = target.raw.then(|| Arc::new(target.raw_requests()));
    let tasks: Vec<_> = (0..connections)
        .map(|_| match &raw {
            Some(requests) => tokio::spawn(raw_connection(
                target.clone(),
                Arc::clone(requests),
                Arc::clone(&next),
                total,
            )),
            None => tokio::spawn(connection(target.clone(), Arc::clone(&next), total)),
        })
        .collect();
    let mut latencies = Vec::with_capacity(total);
    for t in tasks {
        match t.await.expect("client task") {
            Ok(l) => latencies.extend(l),
            Err(e) => panic!("load against {} failed: {e}", target.addr),
        }
    }
    let elapsed = start.elapsed();
    assert_eq!(latencies.len(), total, "every request answered");
    Pass {
        requests: total,
        elapsed,
        latencies,
        server_cpu: 0,
        client_cpu: 0,
    }
}

fn load_bounded(client: &Runtime, target: &Target, total: usize, connections: usize) -> Pass {
    let (server0, client0) = (
        cpu::threads_cpu_ns("self", Some(SERVER)),
        cpu::threads_cpu_ns("self", Some(CLIENT)),
    );
    let mut pass = client.block_on(async {
        tokio::time::timeout(PASS_LIMIT, load(target, total, connections))
            .await
            .unwrap_or_else(|_| panic!("a pass against {} took over {PASS_LIMIT:?}", target.addr))
    });
    pass.server_cpu = cpu::threads_cpu_ns("self", Some(SERVER)).saturating_sub(server0);
    pass.client_cpu = cpu::threads_cpu_ns("self", Some(CLIENT)).saturating_sub(client0);
    pass
}

const SERVER: &str = "bench-server";
const CLIENT: &str = "bench-client";
const PROXY: &str = "bench-proxy";

/// A runtime with one worker thread, pinned to `cpu` when given (with `taskset`, so each
/// side has a core of its own and the scheduler never puts both on one).
fn one_worker_runtime(name: &str, cpu: Option<usize>) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .on_thread_start(move || {
            if let Some(cpu) = cpu {
                pin_current_thread(cpu);
            }
        })
        .enable_all()
        .build()
        .expect("runtime")
}

/// Pins the calling thread to `cpu` (Linux, `taskset`); does nothing where that fails.
fn pin_current_thread(cpu: usize) {
    let Ok(link) = std::fs::read_link("/proc/thread-self") else {
        return;
    };
    let Some(tid) = link.file_name().and_then(|t| t.to_str()) else {
        return;
    };
    let _ = Command::new("taskset")
        .args(["-pc", &cpu.to_string(), tid])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

struct Scenario {
    /// 1-based, as in the table.
    number: usize,
    name: &'static str,
    target: Target,
    /// Number of the scenario whose throughput is this one's 100%.
    baseline: usize,
    pass: Pass,
    round_rps: Vec<f64>,
}

fn main() {
    // `cargo bench` passes `--bench`; a filter is not supported (every server runs together).
    let total = env_usize("HTTP_BENCH_REQUESTS", 200_000);
    let connections = env_usize("HTTP_BENCH_CONNECTIONS", 32);
    let rounds = env_usize("HTTP_BENCH_ROUNDS", 10);
    let raw = std::env::var("HTTP_BENCH_CLIENT").is_ok_and(|v| v == "raw");
    // Pin the server's worker to CPU 0 and the client's to CPU 1 (`HTTP_BENCH_PIN=0`: don't).
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pin = cpus >= 2 && !std::env::var("HTTP_BENCH_PIN").is_ok_and(|v| v == "0");
    let server = one_worker_runtime(SERVER, pin.then_some(0));
    let client = one_worker_runtime(CLIENT, pin.then_some(1));
    if std::env::var("HTTP_BENCH_SPLIT_ONLY").is_ok_and(|v| v == "1") {
        gateway_over_split_writes(&server, &client, total, rounds);
        return;
    }

    let small = Bytes::from_static(SMALL_BODY.as_bytes());
    let big = chat_body_2k();
    let api_keys: Arc<Vec<HeaderValue>> = Arc::new(
        (0..1_000)
            .map(|i| HeaderValue::from_str(&format!("sk-bench-{i:04}")).expect("key"))
            .collect(),
    );
    let json = vec![(CONTENT_TYPE, HeaderValue::from_static("application/json"))];

    let apps: Vec<(&'static str, Router, &Bytes, usize)> = vec![
        ("bare axum", bare(), &small, 0),
        (
            "tower_governor (header)",
            bare().layer(governor_header()),
            &small,
            0,
        ),
        (
            "tower_governor x2 (header + global)",
            bare().layer(governor_header()).layer(governor_global()),
            &small,
            0,
        ),
        (
            "ours: 2 request rules",
            bare().layer(ours_request_rules(HeaderStyle::BOTH)),
            &small,
            0,
        ),
        ("bare axum, 2 KB body", bare(), &big, 4),
        (
            "ours: token rule, cost::openai(), 2 KB body",
            bare().layer(ours_token_rule(HeaderStyle::BOTH)),
            &big,
            4,
        ),
        (
            "ours: 2 request rules, headers off",
            bare().layer(ours_request_rules(HeaderStyle::NONE)),
            &small,
            0,
        ),
        (
            "ours: token rule, 2 KB body, headers off",
            bare().layer(ours_token_rule(HeaderStyle::NONE)),
            &big,
            4,
        ),
        (
            "tower_governor (header), with its headers",
            bare().layer(governor_header_with_headers()),
            &small,
            0,
        ),
    ];
    // `HTTP_BENCH_ONLY=4,7` runs only those servers (for profiling one of them).
    let only: Option<Vec<usize>> = std::env::var("HTTP_BENCH_ONLY")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect());
    let apps: Vec<(usize, &'static str, Router, &Bytes, usize)> = apps
        .into_iter()
        .enumerate()
        .map(|(i, (name, app, body, baseline))| (i + 1, name, app, body, baseline + 1))
        .filter(|(number, ..)| only.as_ref().is_none_or(|o| o.contains(number)))
        .collect();
    let inproc_n = env_usize("HTTP_BENCH_INPROC_REQUESTS", 100_000);
    let inproc: Vec<f64> = apps
        .iter()
        .map(|(_, _, app, body, _)| {
            in_process_ns(app.clone(), (*body).clone(), &api_keys, inproc_n)
        })
        .collect();
    if std::env::var("HTTP_BENCH_INPROC_ONLY").is_ok_and(|v| v == "1") {
        // No sockets, no load: for counting instructions per request under callgrind.
        for ((number, name, ..), ns) in apps.iter().zip(&inproc) {
            println!("({number}) {name}: in-process {ns:.0} ns/req (3 x {inproc_n} requests)");
        }
        return;
    }
    let mut scenarios: Vec<Scenario> = apps
        .into_iter()
        .map(|(number, name, app, body, baseline)| {
            let _guard = server.enter();
            let addr = server.block_on(serve(app));
            Scenario {
                number,
                name,
                target: Target {
                    addr,
                    body: body.clone(),
                    headers: json.clone(),
                    api_keys: Arc::clone(&api_keys),
                    raw,
                    quick_ack: false,
                },
                baseline,
                pass: Pass::default(),
                round_rps: Vec::new(),
            }
        })
        .collect();

    println!(
        "http bench: {total} requests per server, {connections} keep-alive connections, \
         {rounds} interleaved rounds, 1 server worker + 1 client worker ({}), {} client",
        if pin {
            "pinned to CPUs 0 and 1"
        } else {
            "not pinned"
        },
        if raw { "raw HTTP/1.1" } else { "hyper" }
    );
    if std::env::var("HTTP_BENCH_SHOW").is_ok_and(|v| v == "1") {
        for s in &scenarios {
            let head = client.block_on(show_response(&s.target));
            println!("({}) {}:\n{head}", s.number, s.name);
        }
    }
    // Warm-up: 10% of the load on each server (connections, allocators, maps, caches).
    for s in &scenarios {
        let _ = load_bounded(
            &client,
            &s.target,
            (total / 10).max(connections),
            connections,
        );
    }
    let per_round = total.div_ceil(rounds);
    let n = scenarios.len();
    for round in 0..rounds {
        for k in 0..n {
            let s = &mut scenarios[(round + k) % n];
            let pass = load_bounded(&client, &s.target, per_round, connections);
            s.round_rps.push(pass.rps());
            s.pass.merge(pass);
        }
    }

    // Ratios are paired by round (each round runs every server back to back, so slow drifts
    // in background load hit both sides of a ratio alike): the median of the per-round
    // ratios, with their range.
    let paired = |number: usize, baseline: usize| -> Option<(f64, f64, f64)> {
        let a = scenarios.iter().find(|s| s.number == number)?;
        let b = scenarios.iter().find(|s| s.number == baseline)?;
        let mut r: Vec<f64> = a
            .round_rps
            .iter()
            .zip(&b.round_rps)
            .map(|(x, y)| x / y)
            .collect();
        r.sort_by(f64::total_cmp);
        let median = if r.len() % 2 == 1 {
            r[r.len() / 2]
        } else {
            (r[r.len() / 2 - 1] + r[r.len() / 2]) / 2.0
        };
        Some((median, *r.first()?, *r.last()?))
    };
    let ratio = |number: usize, baseline: usize| paired(number, baseline).map(|r| r.0);
    let (ours, gov, gov2, tokens) = (ratio(4, 1), ratio(2, 1), ratio(3, 1), ratio(6, 5));
    println!();
    println!(
        "| server | requests/s | vs baseline: median of rounds (range) | p50 | p99 | server CPU/req | client CPU/req | in-process/req |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let rows: Vec<(usize, usize)> = scenarios.iter().map(|s| (s.number, s.baseline)).collect();
    let table: Vec<String> = rows
        .iter()
        .map(|&(number, baseline)| {
            if baseline == number {
                "100% (baseline)".to_owned()
            } else {
                match paired(number, baseline) {
                    Some((m, lo, hi)) => format!(
                        "{:.1}% of ({baseline}) ({:.0}–{:.0}%)",
                        m * 100.0,
                        lo * 100.0,
                        hi * 100.0
                    ),
                    None => "–".to_owned(),
                }
            }
        })
        .collect();
    for (i, s) in scenarios.iter_mut().enumerate() {
        let p50 = s.pass.percentile_us(0.50);
        let p99 = s.pass.percentile_us(0.99);
        println!(
            "| ({}) {} | {:.0} | {} | {:.0} µs | {:.0} µs | {:.1} µs ({:.0}% busy) | {:.1} µs | {:.2} µs |",
            s.number,
            s.name,
            s.pass.rps(),
            table[i],
            p50,
            p99,
            s.pass.server_us(),
            s.pass.server_busy() * 100.0,
            s.pass.client_us(),
            inproc[i] / 1_000.0,
        );
    }
    println!();
    if let (Some(ours), Some(gov), Some(gov2), Some(tokens)) = (ours, gov, gov2, tokens) {
        println!(
            "targets: (4) >= 97% of bare: {:.1}% {}; (4) ahead of (2) tower_governor: {:.1}% vs {:.1}% {} \
             (and vs (3) governor x2: {:.1}%); (6) >= 90% of its bare: {:.1}% {}",
            ours * 100.0,
            verdict(ours >= 0.97),
            ours * 100.0,
            gov * 100.0,
            verdict(ours > gov),
            gov2 * 100.0,
            tokens * 100.0,
            verdict(tokens >= 0.90),
        );
    }

    if std::env::var("HTTP_BENCH_GATEWAY").is_ok_and(|v| v == "0") {
        println!("\ngateway: skipped (HTTP_BENCH_GATEWAY=0)");
    } else {
        match scenarios.iter().find(|s| s.number == 5) {
            Some(s) => gateway(&client, &s.target, total, connections, rounds),
            None => println!("\ngateway: skipped (it runs in front of server (5))"),
        }
        gateway_over_split_writes(&server, &client, total, rounds);
    }
    server.shutdown_timeout(Duration::from_secs(1));
    client.shutdown_timeout(Duration::from_secs(1));
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "(met)"
    } else {
        "(NOT met)"
    }
}

// ─── The example gateway ─────────────────────────────────────────────────────────────────

/// The gateway (`support/gateway.rs`: built if needed, its own process, killed when
/// dropped) in front of `upstream`; `None`, with the reason printed, when it can't be.
fn start_gateway(upstream: SocketAddr) -> Option<Gateway> {
    let bin = match gateway::gateway_binary(None) {
        Ok(bin) => bin,
        Err(e) => {
            println!("\ngateway: skipped ({e})");
            return None;
        }
    };
    // Every rule the gateway has, limits huge: per user rpm, tpm, input and output tpm,
    // concurrency and daily spend; per model rpm and tpm.
    let config = format!(
        r#"listen = "127.0.0.1:0"
[store]
kind = "memory"
[limiter]
request_usage_in_streams = true
[mock]
token_delay_ms = 0
[models."gpt-4o-mini"]
upstream = "http://{upstream}/v1"
rpm = {HUGE}
tpm = {HUGE}
input_price = 0.15
output_price = 0.60
[tiers.bench]
rpm = {HUGE}
tpm = {HUGE}
input_tpm = {HUGE}
output_tpm = {HUGE}
concurrent = 100000
daily_cost = {HUGE}
[keys]
bench-key = {{ user = "bench-user", tier = "bench" }}
"#
    );
    let env = [
        ("RUST_LOG", "warn"),
        // One worker thread, as the bare proxy it is compared with has: with one per core
        // (tokio's default), hyper-util's connection tasks and the request hop between
        // threads, and the measured difference would be the runtime's, not the gateway's.
        ("TOKIO_WORKER_THREADS", "1"),
    ];
    match gateway::start_gateway(&bin, &config, &env) {
        Ok(gw) => Some(gw),
        Err(e) => {
            println!("\ngateway: skipped ({e})");
            None
        }
    }
}

/// A bare reverse proxy (axum + hyper-util's pooled client, nothing else) in front of
/// `upstream`: what a second hop costs by itself, to read the gateway's numbers against.
async fn bare_proxy(upstream: SocketAddr) -> SocketAddr {
    use axum::extract::State;
    use hyper_util::client::legacy::{connect::HttpConnector, Client};
    type Proxy = (Client<HttpConnector, axum::body::Body>, SocketAddr);
    async fn forward(
        State((client, upstream)): State<Proxy>,
        req: Request<axum::body::Body>,
    ) -> http::Response<axum::body::Body> {
        let (mut parts, body) = req.into_parts();
        parts.uri = format!("http://{upstream}{}", parts.uri.path())
            .parse()
            .expect("uri");
        match client.request(Request::from_parts(parts, body)).await {
            Ok(resp) => resp.map(axum::body::Body::new),
            Err(e) => http::Response::builder()
                .status(StatusCode::BAD_GATEWAY)
                .body(axum::body::Body::from(e.to_string()))
                .expect("response"),
        }
    }
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client = Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector);
    serve(
        Router::new()
            .route(PATH, post(forward))
            .with_state((client, upstream)),
    )
    .await
}

fn gateway(client: &Runtime, upstream: &Target, total: usize, connections: usize, rounds: usize) {
    let Some(gw) = start_gateway(upstream.addr) else {
        return;
    };
    // The bare proxy gets a runtime of its own (1 worker, not pinned), like the gateway
    // process gets its own threads.
    let proxy_rt = one_worker_runtime(PROXY, None);
    let proxy_addr = proxy_rt.block_on(bare_proxy(upstream.addr));
    let direct = Target {
        api_keys: Arc::new(Vec::new()),
        raw: false,
        ..upstream.clone()
    };
    let mut proxied = direct.clone();
    proxied.addr = proxy_addr;
    let mut via = direct.clone();
    via.addr = gw.addr;
    via.headers
        .push((AUTHORIZATION, HeaderValue::from_static("Bearer bench-key")));
    let gw_pid = gw.pid();
    // Each path with the CPU of its middle hop (none for the direct path).
    type Cpu = Box<dyn Fn() -> u64>;
    let paths: [(&str, Target, Option<Cpu>); 3] = [
        ("upstream directly", direct, None),
        (
            "through a bare axum + hyper-util proxy",
            proxied,
            Some(Box::new(|| cpu::threads_cpu_ns("self", Some(PROXY)))),
        ),
        (
            "through the gateway",
            via,
            Some(Box::new(move || {
                cpu::threads_cpu_ns(&gw_pid.to_string(), None)
            })),
        ),
    ];
    let measure = |i: usize, n: usize, conns: usize| -> (Pass, u64) {
        let cpu = |i: usize| paths[i].2.as_ref().map_or(0, |f| f());
        let c0 = cpu(i);
        let pass = load_bounded(client, &paths[i].1, n, conns);
        (pass, cpu(i).saturating_sub(c0))
    };

    // Unloaded: one connection, requests one after the other. Loaded: every connection.
    let sequential = (total / 20).max(1_000);
    let loaded = (total / 4).max(connections);
    for i in 0..paths.len() {
        let _ = measure(i, sequential / 5, 1);
        let _ = measure(i, loaded / 5, connections);
    }
    let mut one: Vec<Pass> = (0..paths.len()).map(|_| Pass::default()).collect();
    let mut many: Vec<Pass> = (0..paths.len()).map(|_| Pass::default()).collect();
    let mut hop_cpu = vec![0u64; paths.len()];
    for round in 0..rounds {
        for k in 0..paths.len() {
            let i = (round + k) % paths.len();
            one[i].merge(measure(i, sequential.div_ceil(rounds), 1).0);
            let (pass, cpu) = measure(i, loaded.div_ceil(rounds), connections);
            hop_cpu[i] += cpu;
            many[i].merge(pass);
        }
    }
    println!(
        "\ngateway (examples/gateway in its own process, 1 worker thread, 8 rules: per user rpm, tpm, input tpm, \
         output tpm, concurrency, daily cost; per model rpm, tpm; limits huge; 2 KB body; \
         hyper client) in front of server (5):"
    );
    println!(
        "| path | 1 connection: p50 | p99 | {connections} connections: requests/s | p50 | p99 | middle hop CPU/req |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut p50s = vec![0.0; paths.len()];
    for i in 0..paths.len() {
        p50s[i] = one[i].percentile_us(0.5);
        let cpu = if paths[i].2.is_some() {
            format!(
                "{:.1} µs",
                hop_cpu[i] as f64 / 1e3 / many[i].requests as f64
            )
        } else {
            "–".to_owned()
        };
        println!(
            "| {} | {:.0} µs | {:.0} µs | {:.0} | {:.0} µs | {:.0} µs | {cpu} |",
            paths[i].0,
            p50s[i],
            one[i].percentile_us(0.99),
            many[i].rps(),
            many[i].percentile_us(0.5),
            many[i].percentile_us(0.99),
        );
    }
    println!(
        "added latency at p50, 1 connection: bare proxy {:.0} µs, gateway {:.0} µs \
         (gateway over the bare proxy: {:.0} µs)",
        p50s[1] - p50s[0],
        p50s[2] - p50s[0],
        p50s[2] - p50s[1],
    );
    drop(gw);
    proxy_rt.shutdown_timeout(Duration::from_secs(1));
}

// ─── The gateway in front of a server that splits its writes ─────────────────────────────

/// How many requests the row of the ordinary client against the split-write upstream sends
/// per connection: each waits ~40 ms.
const STALLING_REQUESTS: usize = 50;

/// An upstream written like Python's `http.server` on `127.0.0.1:0`: keep-alive HTTP/1.1,
/// Nagle's algorithm on (no `TCP_NODELAY`), each response's head and body in two writes.
/// Answers every request with [`RESPONSE`].
async fn split_write_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(split_write_connection(stream));
        }
    });
    addr
}

/// One connection of [`split_write_upstream`], until the client closes it.
async fn split_write_connection(mut stream: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        RESPONSE.len()
    );
    let mut buf = bytes::BytesMut::with_capacity(16 * 1024);
    loop {
        let head_end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        };
        let length = buf[..head_end]
            .split(|&b| b == b'\n')
            .find_map(|line| {
                let line = std::str::from_utf8(line).ok()?;
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        while buf.len() < head_end + length {
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
        let _ = buf.split_to(head_end + length);
        if stream.write_all(head.as_bytes()).await.is_err()
            || stream.flush().await.is_err()
            || stream.write_all(RESPONSE.as_bytes()).await.is_err()
        {
            return;
        }
    }
}

/// The gateway (one worker thread, every rule) in front of [`split_write_upstream`]: added
/// latency at 1 and 8 keep-alive connections, throughput at 8, against the upstream called
/// directly by a client that acknowledges at once. Raw client, 2 KB chat body.
fn gateway_over_split_writes(server: &Runtime, client: &Runtime, total: usize, rounds: usize) {
    const CONNECTIONS: usize = 8;
    // `HTTP_BENCH_SPLIT_UPSTREAM=HOST:PORT`: an upstream of your own instead (one that
    // answers `POST /v1/chat/completions` with a `content-length`, e.g. Python's).
    let upstream = match std::env::var("HTTP_BENCH_SPLIT_UPSTREAM") {
        Ok(addr) => match addr.parse() {
            Ok(a) => a,
            Err(e) => {
                println!("\nsplit-write upstream: skipped (HTTP_BENCH_SPLIT_UPSTREAM={addr}: {e})");
                return;
            }
        },
        Err(_) => {
            let _guard = server.enter();
            server.block_on(split_write_upstream())
        }
    };
    let Some(gw) = start_gateway(upstream) else {
        return;
    };
    let json = (CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let direct = Target {
        addr: upstream,
        body: chat_body_2k(),
        headers: vec![json.clone()],
        api_keys: Arc::new(Vec::new()),
        raw: true,
        quick_ack: true,
    };
    let via = Target {
        addr: gw.addr,
        headers: vec![
            json,
            (AUTHORIZATION, HeaderValue::from_static("Bearer bench-key")),
        ],
        quick_ack: false,
        ..direct.clone()
    };
    let ordinary = Target {
        quick_ack: false,
        ..direct.clone()
    };
    let paths = [
        ("upstream directly (client acknowledging at once)", direct),
        ("through the gateway (ordinary client)", via),
    ];

    let sequential = (total / 20).max(1_000);
    let loaded = (total / 4).max(CONNECTIONS);
    for (_, target) in &paths {
        let _ = load_bounded(client, target, sequential / 5, 1);
        let _ = load_bounded(client, target, loaded / 5, CONNECTIONS);
    }
    let mut one: Vec<Pass> = paths.iter().map(|_| Pass::default()).collect();
    let mut many: Vec<Pass> = paths.iter().map(|_| Pass::default()).collect();
    let mut ratios = Vec::new();
    for round in 0..rounds {
        let mut rps = [0.0; 2];
        for k in 0..paths.len() {
            let i = (round + k) % paths.len();
            one[i].merge(load_bounded(
                client,
                &paths[i].1,
                sequential.div_ceil(rounds),
                1,
            ));
            let pass = load_bounded(client, &paths[i].1, loaded.div_ceil(rounds), CONNECTIONS);
            rps[i] = pass.rps();
            many[i].merge(pass);
        }
        ratios.push(rps[1] / rps[0]);
    }
    ratios.sort_by(f64::total_cmp);
    let ratio = ratios[ratios.len() / 2];
    // The upstream's own stall, on a few requests: an ordinary client delays its ACK.
    let mut stalled_one = load_bounded(client, &ordinary, STALLING_REQUESTS, 1);
    let mut stalled_many = load_bounded(
        client,
        &ordinary,
        STALLING_REQUESTS * CONNECTIONS,
        CONNECTIONS,
    );

    println!(
        "\ngateway (1 worker thread, every rule, limits huge) in front of an upstream that \
         writes a response's head and body separately without TCP_NODELAY (like Python's \
         http.server); raw client, 2 KB body; {sequential} requests on 1 connection and \
         {loaded} on {CONNECTIONS}, {rounds} interleaved rounds:"
    );
    println!(
        "| path | 1 connection: p50 | p99 | {CONNECTIONS} connections: requests/s | p50 | p99 |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for (i, (name, _)) in paths.iter().enumerate() {
        println!(
            "| {name} | {:.0} µs | {:.0} µs | {:.0} | {:.0} µs | {:.0} µs |",
            one[i].percentile_us(0.5),
            one[i].percentile_us(0.99),
            many[i].rps(),
            many[i].percentile_us(0.5),
            many[i].percentile_us(0.99),
        );
    }
    println!(
        "| upstream directly, ordinary client ({STALLING_REQUESTS} requests per connection) \
         | {:.0} µs | {:.0} µs | {:.0} | {:.0} µs | {:.0} µs |",
        stalled_one.percentile_us(0.5),
        stalled_one.percentile_us(0.99),
        stalled_many.rps(),
        stalled_many.percentile_us(0.5),
        stalled_many.percentile_us(0.99),
    );
    let added =
        |p: f64, passes: &mut [Pass]| passes[1].percentile_us(p) - passes[0].percentile_us(p);
    let added_p50 = added(0.5, &mut one);
    println!(
        "added by the gateway: 1 connection p50 {added_p50:.0} µs, p99 {:.0} µs; \
         {CONNECTIONS} connections p50 {:.0} µs, p99 {:.0} µs",
        added(0.99, &mut one),
        added(0.5, &mut many),
        added(0.99, &mut many),
    );
    println!(
        "targets: added p50 on 1 connection < 300 µs: {added_p50:.0} µs {}; throughput at \
         {CONNECTIONS} connections >= 0.8x the upstream's: {ratio:.2}x (median of rounds, \
         {:.2}–{:.2}) {}",
        verdict(added_p50 < 300.0),
        ratios[0],
        ratios[ratios.len() - 1],
        verdict(ratio >= 0.8),
    );
}
