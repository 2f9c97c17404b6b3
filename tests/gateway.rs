//! The gateway example (`examples/gateway/`) end to end: the compiled binary in real
//! processes on real sockets, in front of an OpenAI-shaped upstream (axum) started here,
//! driven by a real HTTP client.
//!
//! The binary is `target/<profile>/examples/gateway`, built (or found fresh) once per run by
//! `cargo build --example gateway` with this test's features, so the test never runs a stale
//! or differently-featured gateway. Every process is killed by a guard; every wait is bounded.

mod support;

// Timeouts, connection bounds and forwarded headers (a file of its own; it uses this file's
// gateway, upstream and client).
#[path = "gateway/hardening.rs"]
mod hardening;

// No delayed-ACK stalls, HTTP/2 (h2c).
#[path = "gateway/wire.rs"]
mod wire;

// The command line: --check-config, environment variables, --version.
#[path = "gateway/cli.rs"]
mod cli;

// A Redis Cluster with replicas: a primary killed, its replica promoted; cluster settings.
#[cfg(feature = "redis")]
#[path = "gateway/cluster.rs"]
mod cluster;

// The token and spend rules (tiers' and models'), and per-key overrides of a tier's limits.
#[path = "gateway/rules.rs"]
mod rules;

// SIGHUP: the configuration file reloaded in a running gateway.
#[path = "gateway/reload.rs"]
mod reload;

// gateway.toml: every key says whether SIGHUP reloads it.
#[path = "gateway/annotations.rs"]
mod annotations;

// Budgets per UTC day and month: refused until midnight or the 1st, shown with their reset.
#[path = "gateway/budgets.rs"]
mod budgets;

// HTTPS upstreams (rustls, HTTP/2 by ALPN, a model's CA file and credential header) and
// `rediss://` stores, against TLS servers with a CA made by the test.
#[path = "gateway/https.rs"]
mod https;

// The built-in mock's capacity model: full speed up to `capacity`, slower beyond, 503 past
// its queue; places freed by finished and departed clients; SIGHUP changes the capacity.
#[path = "gateway/saturation.rs"]
mod saturation;

// A model's adaptive capacity and the tiers' priority: a free flood shed by the gateway
// while pro keeps its share, the saturating mock never overloaded.
#[path = "gateway/capacity.rs"]
mod capacity;

// The live dashboard: admin keys, the sign-in cookie, /metrics behind the admin key, and the
// page in headless Chromium showing what /metrics and /v1/ratelimit say.
#[path = "gateway/dashboard.rs"]
mod dashboard;

// Headless Chromium over its DevTools pipe, for the dashboard's test.
#[path = "gateway/chromium.rs"]
mod chromium;

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc as std_mpsc, Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body as AxumBody;
use axum::extract::State;
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};

use support::{spawn_server, within, TestServer};

/// How long the gateway binary may take to build (once per run; usually already built).
const BUILD: Duration = Duration::from_secs(20 * 60);
/// How long a gateway may take to print its address, or to exit.
const START: Duration = Duration::from_secs(30);

// ─── The gateway binary and processes ────────────────────────────────────────────────────

/// `target/<profile>/examples/gateway`, built with this test's features.
fn gateway_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test's own path");
        // target/<profile>/deps/gateway-<hash>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("the test runs from target/<profile>/deps/");
        let bin = profile_dir
            .join("examples")
            .join(format!("gateway{}", std::env::consts::EXE_SUFFIX));
        build_gateway(profile_dir);
        assert!(
            bin.is_file(),
            "the gateway example is not at {}: build it with \
             `cargo build --example gateway` (add `--features redis` for the Redis test)",
            bin.display()
        );
        bin
    })
}

/// `cargo build --example gateway` with the features this test was built with: a no-op when
/// `cargo test` already built it, a rebuild when it is stale or built with other features.
fn build_gateway(profile_dir: &Path) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--example", "gateway", "--manifest-path"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"));
    // Cargo runs this test with the package's variables (`CARGO_PKG_NAME`,
    // `CARGO_MANIFEST_DIR`, ...), which the outer `cargo test` didn't have: passed on, they
    // would rerun the build scripts that watch them (ring's), rebuilding ring, rustls and
    // everything above them on each run, and again at the next `cargo test`.
    for (name, _) in std::env::vars_os() {
        let Some(n) = name.to_str() else { continue };
        let per_crate = ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_BIN_"]
            .iter()
            .any(|p| n.starts_with(p))
            || [
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "OUT_DIR",
            ]
            .contains(&n);
        if per_crate {
            cmd.env_remove(&name);
        }
    }
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let features: Vec<&str> = [
        ("axum", cfg!(feature = "axum")),
        ("redis", cfg!(feature = "redis")),
    ]
    .iter()
    .filter(|(_, on)| *on)
    .map(|(f, _)| *f)
    .collect();
    if features.len() == 2 {
        cmd.arg("--all-features");
    } else if !features.is_empty() {
        cmd.arg("--features").arg(features.join(","));
    }
    let log = std::env::temp_dir().join(format!("gateway-test-build-{}.log", std::process::id()));
    let file = std::fs::File::create(&log).expect("build log file");
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .expect("running cargo to build the gateway example");
    let deadline = Instant::now() + BUILD;
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for cargo") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("building the gateway example took longer than {BUILD:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    assert!(
        status.success(),
        "`cargo build --example gateway` failed:\n{output}"
    );
}

/// A running gateway; killed when dropped.
struct Gateway {
    child: Child,
    addr: SocketAddr,
    banner: String,
    stderr: Arc<Mutex<String>>,
}

impl Gateway {
    /// Starts the gateway with `args` (plus `--listen 127.0.0.1:0` unless given) and waits
    /// for the address it prints.
    fn start(args: &[&str]) -> Self {
        Self::start_with_env(args, &[])
    }

    /// [`Gateway::start`] with environment variables (no `--listen` is added when `env`
    /// has `GATEWAY_LISTEN`).
    fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut all: Vec<&str> = args.to_vec();
        if !args.contains(&"--listen") && !env.iter().any(|(k, _)| *k == "GATEWAY_LISTEN") {
            all.extend(["--listen", "127.0.0.1:0"]);
        }
        Self::start_exact(&all, env)
    }

    /// Starts the gateway with exactly `args` (no `--listen` added: the configuration's
    /// `listen` applies when they have none).
    fn start_exact(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = gateway_command()
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the gateway");
        let stderr = Arc::new(Mutex::new(String::new()));
        {
            let stderr = Arc::clone(&stderr);
            let mut pipe = child.stderr.take().expect("stderr");
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    stderr
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        let (tx, rx) = std_mpsc::channel::<String>();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    // Nobody listens any more: keep draining so the gateway never blocks.
                    continue;
                }
            }
        });
        let mut gw = Gateway {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            banner: String::new(),
            stderr,
        };
        let deadline = Instant::now() + START;
        let mut addr = None;
        // The banner: the address line, then indented lines, ending with the first line
        // not indented or a pause.
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let wait = if addr.is_some() {
                Duration::from_millis(300).min(left)
            } else {
                left
            };
            match rx.recv_timeout(wait) {
                Ok(line) => {
                    if let Some(a) = line.split("listening on http://").nth(1) {
                        addr = Some(a.trim().parse().expect("the printed address"));
                    }
                    gw.banner.push_str(&line);
                    gw.banner.push('\n');
                }
                Err(_) if addr.is_some() => break,
                Err(_) => {
                    let status = gw.child.try_wait().ok().flatten();
                    panic!(
                        "the gateway printed no address within {START:?} (exit: {status:?})\n\
                         stdout:\n{}\nstderr:\n{}",
                        gw.banner,
                        gw.stderr()
                    );
                }
            }
        }
        gw.addr = addr.unwrap();
        gw
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends SIGTERM.
    fn terminate(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -TERM failed");
    }

    /// Waits at most `limit` for the process to exit.
    fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "the gateway did not exit within {limit:?}; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the gateway expecting it to stop at once (a configuration error): its exit status
/// and stderr.
fn run_to_exit(args: &[&str]) -> (Option<i32>, String, String) {
    run_to_exit_with_env(args, &[])
}

/// The gateway binary, with the `GATEWAY_*` variables of the environment the tests run in
/// removed: each test sets the ones it means to.
fn gateway_command() -> Command {
    let mut cmd = Command::new(gateway_binary());
    for var in [
        "GATEWAY_LISTEN",
        "GATEWAY_CONFIG",
        "GATEWAY_REDIS",
        "GATEWAY_REDIS_CLUSTER",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// [`run_to_exit`] with environment variables.
fn run_to_exit_with_env(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut child = gateway_command()
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning the gateway");
    let deadline = Instant::now() + START;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the gateway with {args:?} did not exit within {START:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.code(), out, err)
}

/// A configuration file in the temp dir, removed when dropped.
struct TempConfig(PathBuf);

impl TempConfig {
    fn new(text: &str) -> Self {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("gateway-test-{}-{n}.toml", std::process::id()));
        std::fs::write(&path, text).expect("writing the config");
        Self(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

// ─── The upstream: an OpenAI-shaped server ───────────────────────────────────────────────

/// A request the upstream received.
#[derive(Debug, Clone)]
struct Seen {
    /// HTTP/1.1 or HTTP/2.
    version: Version,
    path: String,
    authorization: Option<String>,
    headers: HeaderMap,
    body: Value,
}

#[derive(Clone)]
struct Upstream {
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Streams with `"test_hold": true` send their first chunk, then wait for a permit.
    release: Arc<Semaphore>,
}

/// A response body fed by a channel: each chunk goes out when the upstream sends it.
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

fn words(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.split_whitespace().count() as u64,
        Value::Array(a) => a.iter().map(words).sum(),
        Value::Object(o) => o.get("content").map_or(0, words),
        _ => 0,
    }
}

/// Answers like an OpenAI-compatible server: prompt tokens = words of the messages / prompt /
/// input, completion tokens = min(max_tokens, 16). Body fields for the tests: `test_status`
/// (answer that status), `test_hold` (streams wait for a permit after their first chunk),
/// `test_stall` (wait for a permit before answering at all).
async fn upstream(State(up): State<Upstream>, req: Request<AxumBody>) -> Response<AxumBody> {
    let version = req.version();
    let path = req.uri().path().to_owned();
    let headers = req.headers().clone();
    let authorization = req
        .headers()
        .get("authorization")
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = req.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    up.seen.lock().unwrap().push(Seen {
        version,
        path: path.clone(),
        authorization,
        headers,
        body: body.clone(),
    });
    if body["test_stall"] == Value::Bool(true) {
        match up.release.acquire().await {
            Ok(permit) => permit.forget(),
            Err(_) => return Response::new(AxumBody::empty()),
        }
    }
    if let Some(status) = body["test_status"].as_u64() {
        return Response::builder()
            .status(status as u16)
            .header("content-type", "application/json")
            .body(AxumBody::from(
                r#"{"error":{"message":"upstream says no","type":"server_error","param":null,"code":null}}"#,
            ))
            .unwrap();
    }
    let prompt = words(&body["messages"]) + words(&body["prompt"]) + words(&body["input"]);
    let completion = if path.ends_with("/embeddings") {
        0
    } else {
        body["max_tokens"].as_u64().unwrap_or(16).min(16)
    };
    let usage = json!({"prompt_tokens": prompt, "completion_tokens": completion,
        "total_tokens": prompt + completion});
    let model = body["model"].clone();
    if body["stream"] != Value::Bool(true) {
        let answer = json!({"id": "up-1", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant",
                "content": "word ".repeat(completion as usize).trim_end()},
                "finish_reason": "stop"}],
            "usage": usage});
        return Response::builder()
            .header("content-type", "application/json")
            // The upstream's own limits must not leak to the gateway's clients.
            .header("x-ratelimit-limit-requests", "99999")
            .body(AxumBody::from(answer.to_string()))
            .unwrap();
    }
    let include_usage = body["stream_options"]["include_usage"] == Value::Bool(true);
    let hold = body["test_hold"] == Value::Bool(true);
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let chunk = |delta: Value, finish: Value| {
            let c = json!({"id": "up-1", "object": "chat.completion.chunk", "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
            Bytes::from(format!("data: {c}\n\n"))
        };
        if tx
            .send(chunk(
                json!({"role": "assistant", "content": ""}),
                Value::Null,
            ))
            .await
            .is_err()
        {
            return;
        }
        if hold {
            match up.release.acquire().await {
                Ok(permit) => permit.forget(),
                Err(_) => return,
            }
        }
        for _ in 0..completion {
            if tx
                .send(chunk(json!({"content": "word "}), Value::Null))
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = tx.send(chunk(json!({}), json!("stop"))).await;
        if include_usage {
            let c = json!({"id": "up-1", "object": "chat.completion.chunk", "model": model,
                "choices": [], "usage": usage});
            let _ = tx.send(Bytes::from(format!("data: {c}\n\n"))).await;
        }
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(AxumBody::new(ChannelBody(rx)))
        .unwrap()
}

async fn start_upstream() -> (TestServer, Upstream) {
    let up = Upstream {
        seen: Arc::default(),
        release: Arc::new(Semaphore::new(0)),
    };
    let app = Router::new().fallback(upstream).with_state(up.clone());
    let server = spawn_server(|listener, shutdown| async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .unwrap();
    })
    .await;
    (server, up)
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The test configuration: models on the test upstream (one with a global limit, one on a
/// closed port), tiers free / pro, and keys.
fn test_config(upstream: &str, extra_limiter: &str) -> String {
    format!(
        r#"
listen = "127.0.0.1:0"

[limiter]
default_output_tokens = 100
shutdown_grace_secs = 5
{extra_limiter}

[models.test-model]
upstream = "{upstream}/v1"
api_key = "sk-upstream-secret"
timeout_secs = 5

[models.small-model]
upstream = "{upstream}/v1"
rpm = 3

[models.dead-model]
upstream = "http://127.0.0.1:{dead}/v1"

[tiers.free]
rpm = 10
tpm = 2000
concurrent = 2

[tiers.pro]
rpm = 600
tpm = 200000
concurrent = 20

[keys]
free-a = {{ user = "alice", tier = "free" }}
free-b = {{ user = "bob", tier = "free" }}
pro-a = {{ user = "carol", tier = "pro" }}
pro-b = {{ user = "dave", tier = "pro" }}
pro-c = {{ user = "erin", tier = "pro" }}
"#,
        dead = closed_port()
    )
}

// ─── The client ──────────────────────────────────────────────────────────────────────────

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no `{name}` header in {:?}", self.headers))
            .to_str()
            .unwrap()
    }
}

async fn send(
    client: &HttpClient,
    method: &str,
    url: &str,
    key: Option<&str>,
    body: Option<&Value>,
) -> Response<Incoming> {
    let mut req = Request::builder().method(method).uri(url);
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let body = match body {
        Some(b) => {
            req = req.header("content-type", "application/json");
            Full::new(Bytes::from(b.to_string()))
        }
        None => Full::new(Bytes::new()),
    };
    within(
        &format!("{method} {url}"),
        client.request(req.body(body).unwrap()),
    )
    .await
    .unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

async fn call(
    client: &HttpClient,
    method: &str,
    url: &str,
    key: Option<&str>,
    body: Option<&Value>,
) -> Answer {
    let response = send(client, method, url, key, body).await;
    let (parts, body) = response.into_parts();
    let body = within("reading a response body", body.collect())
        .await
        .unwrap()
        .to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

fn chat(model: &str, content: &str, max_tokens: u64) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens})
}

/// The caller's state of `rule` from `GET /v1/ratelimit`.
async fn rule_state(client: &HttpClient, gw: &Gateway, key: &str, rule: &str) -> Value {
    let a = call(client, "GET", &gw.url("/v1/ratelimit"), Some(key), None).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    a.json()["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rule"] == rule)
        .unwrap_or_else(|| panic!("no rule `{rule}` in {}", a.json()))
        .clone()
}

fn assert_openai_error(a: &Answer, status: u16, code: &str) {
    assert_eq!(a.status, status, "{:?}", String::from_utf8_lossy(&a.body));
    assert!(
        a.header("content-type").starts_with("application/json"),
        "{:?}",
        a.headers
    );
    let e = &a.json()["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    assert!(e["type"].is_string(), "{e}");
    assert!(e.get("param").is_some(), "{e}");
    assert_eq!(e["code"], code, "{e}");
}

// ─── The tests ───────────────────────────────────────────────────────────────────────────

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn built_in_config_serves_the_mock_model() {
    let gw = Gateway::start(&[]);
    for want in [
        "listening on http://127.0.0.1:",
        "mock-gpt",
        "demo-free",
        "demo-pro",
    ] {
        assert!(gw.banner.contains(want), "{want:?} not in:\n{}", gw.banner);
    }
    let c = client();
    // prompt_tokens = 5 words, completion_tokens = min(max_tokens, 16) = 16.
    let body = json!({"model": "mock-gpt", "messages": [{"role": "user",
        "content": "Hello there how are you"}]});
    let a = call(
        &c,
        "POST",
        &gw.url("/v1/chat/completions"),
        Some("demo-free"),
        Some(&body),
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(
        a.json()["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 16, "total_tokens": 21})
    );
    assert_eq!(a.header("x-ratelimit-limit-requests"), "10");
    assert_eq!(a.header("x-ratelimit-remaining-requests"), "9");

    // Streaming: the limiter asks for usage, the mock reports it in the last chunk, and the
    // caller's token budget settles to it.
    let body = json!({"model": "mock-gpt", "stream": true, "max_tokens": 4,
        "messages": [{"role": "user", "content": "one two three"}]});
    let a = call(
        &c,
        "POST",
        &gw.url("/v1/chat/completions"),
        Some("demo-pro"),
        Some(&body),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("content-type"), "text/event-stream");
    let text = String::from_utf8_lossy(&a.body).into_owned();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(
        text.contains(r#""usage":{"completion_tokens":4,"prompt_tokens":3,"total_tokens":7}"#),
        "{text}"
    );
    let tpm = rule_state(&c, &gw, "demo-pro", "user-tpm").await;
    assert_eq!(tpm["limit"], 200_000);
    assert_eq!(tpm["remaining"], 200_000 - 7, "{tpm}");

    // The other endpoints of the mock.
    let a = call(
        &c,
        "POST",
        &gw.url("/v1/embeddings"),
        Some("demo-pro"),
        Some(&json!({"model": "mock-gpt", "input": ["a b c", "d e"]})),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(
        a.json()["usage"],
        json!({"prompt_tokens": 5, "total_tokens": 5})
    );
    let a = call(
        &c,
        "POST",
        &gw.url("/v1/completions"),
        Some("demo-pro"),
        Some(&json!({"model": "mock-gpt", "prompt": "a b c", "max_tokens": 2})),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["usage"]["total_tokens"], 5);
    let a = call(
        &c,
        "POST",
        &gw.url("/v1/responses"),
        Some("demo-pro"),
        Some(&json!({"model": "mock-gpt", "input": "a b c d", "max_output_tokens": 3})),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(
        a.json()["usage"],
        json!({"input_tokens": 4, "output_tokens": 3, "total_tokens": 7})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_tier_gets_429_after_10_requests_with_headers() {
    let (up_server, _up) = start_upstream().await;
    let cfg = TempConfig::new(&test_config(&up_server.url(), ""));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();
    let url = gw.url("/v1/chat/completions");
    for i in 1..=10u64 {
        let a = call(
            &c,
            "POST",
            &url,
            Some("free-a"),
            Some(&chat("test-model", "hi", 5)),
        )
        .await;
        assert_eq!(a.status, 200, "request {i}: {:?}", a.body);
        // The gateway's limits, not the upstream's.
        assert_eq!(a.header("x-ratelimit-limit-requests"), "10");
        assert_eq!(
            a.header("x-ratelimit-remaining-requests"),
            (10 - i).to_string()
        );
        assert!(a
            .header("ratelimit-policy")
            .contains(r#""user-rpm";q=10;w=60"#));
    }
    let a = call(
        &c,
        "POST",
        &url,
        Some("free-a"),
        Some(&chat("test-model", "hi", 5)),
    )
    .await;
    assert_openai_error(&a, 429, "rate_limit_exceeded");
    let retry: u64 = a.header("retry-after").parse().unwrap();
    assert!((1..=120).contains(&retry), "retry-after {retry}");
    let retry_ms: u64 = a.header("retry-after-ms").parse().unwrap();
    assert!(
        retry_ms > 0 && retry_ms <= retry * 1000,
        "{retry_ms} vs {retry}"
    );
    assert_eq!(a.header("x-ratelimit-limit-requests"), "10");
    assert_eq!(a.header("x-ratelimit-remaining-requests"), "0");
    assert!(a.header("ratelimit").contains(r#""user-rpm";r=0"#));
    let e = &a.json()["error"];
    assert_eq!(e["type"], "requests");
    assert!(e["message"].as_str().unwrap().contains("`user-rpm`"), "{e}");

    // Another free user and a pro user are not affected.
    let a = call(
        &c,
        "POST",
        &url,
        Some("free-b"),
        Some(&chat("test-model", "hi", 5)),
    )
    .await;
    assert_eq!(a.status, 200);
    let a = call(
        &c,
        "POST",
        &url,
        Some("pro-a"),
        Some(&chat("test-model", "hi", 5)),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("x-ratelimit-limit-requests"), "600");

    // /v1/ratelimit reads without charging.
    for _ in 0..3 {
        let rpm = rule_state(&c, &gw, "free-b", "user-rpm").await;
        assert_eq!(rpm["remaining"], 9, "{rpm}");
        assert_eq!(rpm["limit"], 10);
        assert_eq!(rpm["scope"], "user");
    }
    let status = call(&c, "GET", &gw.url("/v1/ratelimit"), Some("free-a"), None).await;
    let status = status.json();
    assert_eq!(status["user"], "alice");
    assert_eq!(status["tier"], "free");
    let rpm = &status["rules"].as_array().unwrap()[0];
    assert_eq!(rpm["rule"], "user-rpm");
    assert_eq!(rpm["remaining"], 0);
    assert!(rpm["reset_ms"].as_u64().unwrap() > 0);
    // The per-model rule of small-model is listed for it.
    let small = call(
        &c,
        "GET",
        &gw.url("/v1/ratelimit?model=small-model"),
        Some("free-a"),
        None,
    )
    .await
    .json();
    assert!(
        small["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["rule"] == "model-rpm:small-model" && r["remaining"] == 3),
        "{small}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_model_global_limit_is_shared_by_all_callers() {
    let (up_server, _up) = start_upstream().await;
    let cfg = TempConfig::new(&test_config(&up_server.url(), ""));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();
    let url = gw.url("/v1/chat/completions");
    for key in ["pro-a", "pro-b", "pro-c"] {
        let a = call(
            &c,
            "POST",
            &url,
            Some(key),
            Some(&chat("small-model", "hi", 5)),
        )
        .await;
        assert_eq!(a.status, 200, "{key}");
    }
    let a = call(
        &c,
        "POST",
        &url,
        Some("pro-a"),
        Some(&chat("small-model", "hi", 5)),
    )
    .await;
    assert_openai_error(&a, 429, "rate_limit_exceeded");
    assert!(
        a.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`model-rpm:small-model`"),
        "{}",
        a.json()
    );
    // Other models are not limited by it.
    let a = call(
        &c,
        "POST",
        &url,
        Some("pro-a"),
        Some(&chat("test-model", "hi", 5)),
    )
    .await;
    assert_eq!(a.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_slots_and_streaming_settlement() {
    let (up_server, up) = start_upstream().await;
    let cfg = TempConfig::new(&test_config(&up_server.url(), ""));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();
    let url = gw.url("/v1/chat/completions");
    let held = |content: &str| {
        json!({"model": "test-model", "stream": true, "test_hold": true, "max_tokens": 5,
            "messages": [{"role": "user", "content": content}]})
    };

    // Two streams in flight: the free tier's 2 slots.
    let mut streams = Vec::new();
    for content in ["one two three four", "five six"] {
        let r = send(&c, "POST", &url, Some("free-a"), Some(&held(content))).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        let mut body = r.into_body();
        // The first chunk arrives while the upstream still holds the rest: streamed through,
        // not buffered.
        let first = within("the first SSE chunk", body.frame())
            .await
            .expect("a frame")
            .expect("no error")
            .into_data()
            .expect("data");
        assert!(first.starts_with(b"data: "), "{first:?}");
        streams.push(body);
    }
    let a = call(
        &c,
        "POST",
        &url,
        Some("free-a"),
        Some(&chat("test-model", "hi", 5)),
    )
    .await;
    assert_openai_error(&a, 429, "rate_limit_exceeded");
    assert!(
        a.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`user-concurrent`"),
        "{}",
        a.json()
    );
    let slots = rule_state(&c, &gw, "free-a", "user-concurrent").await;
    assert_eq!(slots["remaining"], 0);
    assert_eq!(slots["kind"], "concurrency");

    // The limiter asked the upstream for usage; the upstream got its own key, not the
    // client's.
    {
        let seen = up.seen.lock().unwrap();
        let last = seen.last().expect("the upstream saw the streams");
        assert_eq!(last.path, "/v1/chat/completions");
        assert_eq!(last.body["stream_options"]["include_usage"], true);
        assert_eq!(
            last.authorization.as_deref(),
            Some("Bearer sk-upstream-secret")
        );
    }

    // Release both streams and read them to the end.
    up.release.add_permits(2);
    let mut total = 0;
    for mut body in streams {
        let mut text = String::new();
        while let Some(frame) = within("the rest of the stream", body.frame()).await {
            if let Ok(data) = frame.expect("stream error").into_data() {
                text.push_str(&String::from_utf8_lossy(&data));
            }
        }
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        let usage_line = text
            .lines()
            .find(|l| l.contains(r#""usage""#))
            .expect("a usage chunk");
        let usage: Value = serde_json::from_str(usage_line.trim_start_matches("data: ")).unwrap();
        total += usage["usage"]["total_tokens"].as_u64().unwrap();
    }
    assert_eq!(total, (4 + 5) + (2 + 5));

    // Settled: the token budget shows exactly the reported usage, the slots are free again.
    let deadline = Instant::now() + support::WAIT;
    loop {
        let tpm = rule_state(&c, &gw, "free-a", "user-tpm").await;
        let slots = rule_state(&c, &gw, "free-a", "user-concurrent").await;
        if tpm["remaining"] == 2000 - total && slots["remaining"] == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not settled: {tpm} {slots} (want remaining {})",
            2000 - total
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let a = call(
        &c,
        "POST",
        &url,
        Some("free-a"),
        Some(&chat("test-model", "hi", 5)),
    )
    .await;
    assert_eq!(a.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_401_404_502_and_metrics() {
    let (up_server, _up) = start_upstream().await;
    let cfg = TempConfig::new(&test_config(&up_server.url(), ""));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();
    let url = gw.url("/v1/chat/completions");
    let body = chat("test-model", "hi", 5);

    // 401: no key, an unknown key; never counted.
    let a = call(&c, "POST", &url, None, Some(&body)).await;
    assert_openai_error(&a, 401, "missing_api_key");
    assert_eq!(a.header("www-authenticate"), "Bearer");
    let a = call(&c, "POST", &url, Some("sk-nope"), Some(&body)).await;
    assert_openai_error(&a, 401, "invalid_api_key");
    let a = call(&c, "GET", &gw.url("/v1/ratelimit"), Some("sk-nope"), None).await;
    assert_openai_error(&a, 401, "invalid_api_key");
    let metrics = call(&c, "GET", &gw.url("/metrics"), None, None).await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(
        !text.contains("gateway_ratelimit_admitted_total{"),
        "{text}"
    );
    assert!(
        !text.contains("gateway_ratelimit_rejected_total{"),
        "{text}"
    );

    // 404: an unknown model, before the limiter.
    let a = call(
        &c,
        "POST",
        &url,
        Some("free-a"),
        Some(&chat("gpt-9", "hi", 5)),
    )
    .await;
    assert_openai_error(&a, 404, "model_not_found");
    assert_eq!(a.json()["error"]["param"], "model");
    let rpm = rule_state(&c, &gw, "free-a", "user-rpm").await;
    assert_eq!(rpm["remaining"], 10, "a 404 is not counted: {rpm}");

    // 400: not JSON.
    let r = Request::post(&url)
        .header("authorization", "Bearer free-a")
        .body(Full::new(Bytes::from_static(b"not json")))
        .unwrap();
    let r = within("POST not json", c.request(r)).await.unwrap();
    assert_eq!(r.status(), 400);

    // 502: the upstream is unreachable; the tokens are refunded, the request counts.
    let a = call(
        &c,
        "POST",
        &url,
        Some("free-a"),
        Some(&chat("dead-model", "hi", 5)),
    )
    .await;
    assert_openai_error(&a, 502, "upstream_unreachable");
    assert_eq!(a.json()["error"]["type"], "upstream_error");
    let tpm = rule_state(&c, &gw, "free-a", "user-tpm").await;
    assert_eq!(tpm["remaining"], 2000, "refunded: {tpm}");
    let rpm = rule_state(&c, &gw, "free-a", "user-rpm").await;
    assert_eq!(rpm["remaining"], 9, "{rpm}");

    // An upstream error status is passed through, and refunded too.
    let mut failing = chat("test-model", "hi", 5);
    failing["test_status"] = json!(500);
    let a = call(&c, "POST", &url, Some("free-a"), Some(&failing)).await;
    assert_eq!(a.status, 500);
    let tpm = rule_state(&c, &gw, "free-a", "user-tpm").await;
    assert_eq!(tpm["remaining"], 2000, "refunded: {tpm}");

    // A successful request settles to the reported usage: 1 word + 5.
    let a = call(&c, "POST", &url, Some("free-a"), Some(&body)).await;
    assert_eq!(a.status, 200);
    let tpm = rule_state(&c, &gw, "free-a", "user-tpm").await;
    assert_eq!(tpm["remaining"], 2000 - 6, "{tpm}");
    // Fill the free tier (the 502 and the 500 counted) to get a denial into the metrics.
    for _ in 0..7 {
        let a = call(&c, "POST", &url, Some("free-a"), Some(&body)).await;
        assert_eq!(a.status, 200);
    }
    let a = call(&c, "POST", &url, Some("free-a"), Some(&body)).await;
    assert_eq!(a.status, 429);

    // GET endpoints.
    let a = call(&c, "GET", &gw.url("/healthz"), None, None).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["status"], "ok");
    let a = call(&c, "GET", &gw.url("/v1/models"), Some("free-b"), None).await;
    assert_eq!(a.status, 200);
    let ids: Vec<String> = a.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["dead-model", "small-model", "test-model"]);
    let a = call(&c, "GET", &gw.url("/v1/models"), None, None).await;
    assert_openai_error(&a, 401, "missing_api_key");

    let metrics = call(&c, "GET", &gw.url("/metrics"), None, None).await;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .header("content-type")
            .starts_with("text/plain; version=0.0.4"),
        "{:?}",
        metrics.headers
    );
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    for want in [
        r#"gateway_ratelimit_admitted_total{tier="free"} 10"#,
        r#"gateway_ratelimit_denied_total{rule="user-rpm",tier="free"} 1"#,
        r#"gateway_ratelimit_decision_seconds_count{outcome="admitted"} 10"#,
        r#"gateway_ratelimit_decision_seconds_count{outcome="denied"} 1"#,
        r#"gateway_tokens_settled_total{model="test-model",kind="input"} 8"#,
        r#"gateway_tokens_settled_total{model="test-model",kind="output"} 40"#,
        r#"gateway_tokens_estimated_total{model="test-model"}"#,
        r#"gateway_upstream_responses_total{model="test-model",status="200"} 8"#,
        r#"gateway_upstream_responses_total{model="test-model",status="500"} 1"#,
        r#"gateway_upstream_responses_total{model="dead-model",status="unreachable"} 1"#,
        r#"gateway_upstream_response_seconds_count{model="test-model"} 9"#,
        r#"gateway_responses_total{endpoint="/v1/chat/completions",status="401"} 2"#,
        r#"gateway_responses_total{endpoint="/v1/chat/completions",status="404"} 1"#,
        r#"gateway_responses_total{endpoint="/v1/chat/completions",status="429"} 1"#,
        r#"gateway_responses_total{endpoint="/v1/chat/completions",status="502"} 1"#,
        "# TYPE gateway_ratelimit_decision_seconds histogram",
    ] {
        assert!(text.contains(want), "{want:?} not in:\n{text}");
    }
}

/// The token metrics count the `usage` of every answer, which the limiter reads once as it
/// streams past (the proxy no longer parses it): a caller with token limits and one without
/// (whose requests the limiter has nothing to settle for), JSON and a stream, a body larger
/// than the limiter reads (labelled by its routed model all the same), two models; an
/// upstream error counts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_metrics_count_the_usage_of_every_answer() {
    let (up_server, _up) = start_upstream().await;
    let config = format!(
        "{}\n[tiers.basic]\nrpm = 100\n\n[keys.basic-a]\nuser = \"frank\"\ntier = \"basic\"\n",
        test_config(&up_server.url(), "max_inspect_bytes = 2048")
    );
    let cfg = TempConfig::new(&config);
    let gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();
    let url = gw.url("/v1/chat/completions");

    // No token limits: 3 words in, 5 out.
    let a = call(
        &c,
        "POST",
        &url,
        Some("basic-a"),
        Some(&chat("test-model", "one two three", 5)),
    )
    .await;
    assert_eq!(a.status, 200);
    // A body of 1,500 words, over the 2,048 bytes the limiter reads: 1,500 in, 2 out.
    let long = "w ".repeat(1_500);
    let a = call(
        &c,
        "POST",
        &url,
        Some("basic-a"),
        Some(&chat("test-model", &long, 2)),
    )
    .await;
    assert_eq!(a.status, 200);
    // The other model: 2 in, 1 out.
    let a = call(
        &c,
        "POST",
        &url,
        Some("basic-a"),
        Some(&chat("small-model", "x y", 1)),
    )
    .await;
    assert_eq!(a.status, 200);
    // Token limits, a stream (the limiter asks for its usage): 2 in, 4 out.
    let mut stream = chat("test-model", "a b", 4);
    stream["stream"] = json!(true);
    let a = call(&c, "POST", &url, Some("pro-a"), Some(&stream)).await;
    assert_eq!(a.status, 200);
    assert!(
        String::from_utf8_lossy(&a.body).contains(r#""usage":{"#),
        "the stream carried its usage"
    );
    // An upstream error: no usage.
    let mut failing = chat("test-model", "not counted", 9);
    failing["test_status"] = json!(500);
    let a = call(&c, "POST", &url, Some("basic-a"), Some(&failing)).await;
    assert_eq!(a.status, 500);

    // The settlements run as the bodies end, just after the client read them.
    let want = [
        r#"gateway_tokens_settled_total{model="test-model",kind="input"} 1505"#,
        r#"gateway_tokens_settled_total{model="test-model",kind="output"} 11"#,
        r#"gateway_tokens_settled_total{model="small-model",kind="input"} 2"#,
        r#"gateway_tokens_settled_total{model="small-model",kind="output"} 1"#,
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = call(&c, "GET", &gw.url("/metrics"), None, None).await;
        let text = String::from_utf8_lossy(&metrics.body).into_owned();
        let settled: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("gateway_tokens_settled_total{"))
            .collect();
        if want.iter().all(|w| settled.contains(w)) {
            assert_eq!(settled.len(), want.len(), "{settled:#?}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "want {want:#?}, got {settled:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_streams_finish() {
    let (up_server, up) = start_upstream().await;
    let cfg = TempConfig::new(&test_config(&up_server.url(), ""));
    let mut gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();
    let body = json!({"model": "test-model", "stream": true, "test_hold": true,
        "max_tokens": 3, "messages": [{"role": "user", "content": "a b"}]});
    let r = send(
        &c,
        "POST",
        &gw.url("/v1/chat/completions"),
        Some("pro-a"),
        Some(&body),
    )
    .await;
    assert_eq!(r.status(), 200);
    let mut stream = r.into_body();
    within("the first chunk", stream.frame())
        .await
        .unwrap()
        .unwrap();

    gw.terminate();
    // New connections are refused while the stream goes on.
    let deadline = Instant::now() + support::WAIT;
    loop {
        let fresh = client();
        let req = Request::get(gw.url("/healthz"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        match tokio::time::timeout(Duration::from_secs(2), fresh.request(req)).await {
            Ok(Err(_)) => break,
            _ => {
                assert!(Instant::now() < deadline, "still accepting after SIGTERM");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    assert!(
        gw.child.try_wait().unwrap().is_none(),
        "exited with a stream in flight"
    );
    up.release.add_permits(1);
    let mut text = String::new();
    while let Some(frame) = within("the rest of the stream", stream.frame()).await {
        if let Ok(data) = frame.expect("stream error").into_data() {
            text.push_str(&String::from_utf8_lossy(&data));
        }
    }
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let status = gw.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "stderr:\n{}", gw.stderr());
    let log = gw.stderr();
    assert!(log.contains("SIGTERM"), "{log}");
    assert!(log.contains("every request finished"), "{log}");
}

#[test]
fn help_and_bad_flags() {
    let (code, out, _) = run_to_exit(&["--help"]);
    assert_eq!(code, Some(0));
    for flag in [
        "--listen",
        "--config",
        "--redis",
        "--redis-cluster",
        "--check-config",
        "--version",
        "--help",
        "GATEWAY_LISTEN",
        "GATEWAY_CONFIG",
        "GATEWAY_REDIS",
        "GATEWAY_REDIS_CLUSTER",
    ] {
        assert!(out.contains(flag), "{flag} not in:\n{out}");
    }
    let cases: &[(&[&str], &str)] = &[
        (&["--bogus"], "unexpected argument '--bogus'"),
        (&["--listen"], "a value is required for '--listen <ADDR>'"),
        (
            &["--listen", "nowhere"],
            "--listen: \"nowhere\" is not an IP address and port",
        ),
        (
            &["--config", "/nonexistent/gateway.toml"],
            "can't read the file",
        ),
        (&["--config"], "a value is required for '--config <FILE>'"),
        (&["extra"], "unexpected argument 'extra'"),
        (
            &["--listen", ""],
            "a value is required for '--listen <ADDR>'",
        ),
    ];
    for (args, want) in cases {
        let (code, _, err) = run_to_exit(args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {want:?} not in:\n{err}");
    }
    let (code, _, err) = run_to_exit(&["--redis", "redis://127.0.0.1:1"]);
    if cfg!(feature = "redis") {
        // Nothing listens there: a start-up failure, not a configuration error.
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains("could not connect to Redis"), "{err}");
    } else {
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains("--redis needs the `redis` feature"), "{err}");
    }
}

/// `store.max_keys` is checked against the buckets one request charges (the rules of its
/// tier and of its model), not against every rule of the file.
#[test]
fn max_keys_counts_the_buckets_of_one_request() {
    let text = |max_keys: u64| {
        format!(
            "[store]\nmax_keys = {max_keys}\n\
             [models.a]\nupstream = \"mock\"\nrpm = 100\n\
             [models.b]\nupstream = \"mock\"\nrpm = 100\ntpm = 1000\n\
             [tiers.free]\nrpm = 10\n[tiers.pro]\nconcurrent = 2\n\
             [keys]\nk = {{ user = \"u\", tier = \"free\" }}\n"
        )
    };
    // At most 1 rule of a tier + 2 of model b: 3, though the file has 5 rules.
    let ok = TempConfig::new(&text(3));
    let (code, out, err) = run_to_exit(&["--check-config", "--config", ok.path()]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let bad = TempConfig::new(&text(2));
    let (code, _, err) = run_to_exit(&["--check-config", "--config", bad.path()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("field `store.max_keys`: must be at least 3"),
        "{err}"
    );
}

#[test]
fn each_bad_config_field_is_named() {
    let base = |tiers: &str, rest: &str| {
        format!(
            "[models.m]\nupstream = \"mock\"\n{rest}\n[tiers.free]\n{tiers}\n\
             [keys]\nk = {{ user = \"u\", tier = \"free\" }}\n"
        )
    };
    let good = base("rpm = 10", "");
    let cases: Vec<(String, Vec<&str>)> = vec![
        (base("rpm = 0", ""), vec!["`tiers.free.rpm`", "must be > 0"]),
        (
            base("rpm = \"ten\"", ""),
            vec!["`tiers.free.rpm`", "invalid type", "expected u64"],
        ),
        (base("rpmx = 10", ""), vec!["unknown field `rpmx`"]),
        (
            base("rpm = 10\ntpm = 100", "[store]\nmax_keys = 1"),
            vec!["`store.max_keys`", "must be at least 2"],
        ),
        (base("daily_cost = -1", ""), vec!["`tiers.free.daily_cost`"]),
        (
            base("monthly_tokens = 0", ""),
            vec!["`tiers.free.monthly_tokens`", "must be > 0"],
        ),
        (
            base("monthly_cost = 1.5", ""),
            vec!["`tiers.free.monthly_cost`", "expected u64"],
        ),
        (
            good.replace("tier = \"free\"", "tier = \"gold\""),
            vec!["`keys[***].tier (user ", "unknown tier \"gold\"", "free"],
        ),
        (
            good.replace("upstream = \"mock\"", "upstream = \"ftp://x\""),
            vec![
                "`models.m.upstream`",
                "neither \"mock\" nor an http:// or https:// URL",
            ],
        ),
        (
            base("rpm = 10", "timeout_secs = 0"),
            vec!["`models.m.timeout_secs`", "must be > 0"],
        ),
        (
            base("rpm = 10", "tpm = 0"),
            vec!["`models.m.tpm`", "must be > 0"],
        ),
        (
            base("rpm = 10", "api_key_env = \"GATEWAY_TEST_SURELY_UNSET\""),
            vec![
                "`models.m.api_key_env`",
                "GATEWAY_TEST_SURELY_UNSET",
                "not set",
            ],
        ),
        (
            format!("listen = \"nope\"\n{good}"),
            vec!["`listen`", "\"nope\" is not an IP address and port"],
        ),
        (
            format!("[limiter]\nheaders = \"fancy\"\n{good}"),
            vec!["`limiter.headers`", "unknown variant `fancy`", "both"],
        ),
        (
            format!("[limiter]\nmax_body_bytes = 0\n{good}"),
            vec!["`limiter.max_body_bytes`", "must be > 0"],
        ),
        (
            format!("[limiter]\nidempotency_header = \"bad header\"\n{good}"),
            vec!["`limiter.idempotency_header`", "not a valid header name"],
        ),
        (
            format!("[store]\non_failure = \"fallback\"\n{good}"),
            vec!["`store.on_failure`", "only applies to the Redis store"],
        ),
        (
            format!("[store]\nkind = \"sqlite\"\n{good}"),
            vec!["`store.kind`", "unknown variant `sqlite`"],
        ),
        (
            format!("[store]\nprefix = \"app{{1}}\"\n{good}"),
            vec!["`store.prefix`", "must not contain"],
        ),
        (
            "[tiers.free]\nrpm = 1\n[keys]\nk = { user = \"u\", tier = \"free\" }\n".to_owned(),
            vec!["`models`", "no model is configured"],
        ),
        (
            good.replace("[keys]\nk = { user = \"u\", tier = \"free\" }\n", ""),
            vec!["`keys`", "no API key"],
        ),
        (
            good.replace("[models.m]", "[models.\"a b\"]"),
            vec!["`models.a b`", "printable ASCII without spaces"],
        ),
        (
            format!("{good}\n[tiers.free\n"),
            vec!["TOML parse error", "line"],
        ),
    ];
    {
        // The good base configuration starts (checked up to its address, then killed).
        let cfg = TempConfig::new(&good);
        let gw = Gateway::start(&["--config", cfg.path()]);
        assert!(gw.banner.contains("listening on"), "{}", gw.banner);
        // Keys of a configuration file are not printed in full.
        assert!(
            gw.banner.contains("***  ") && !gw.banner.contains(" k "),
            "{}",
            gw.banner
        );
    }
    for (text, wants) in cases {
        let cfg = TempConfig::new(&text);
        let (code, _, err) = run_to_exit(&["--config", cfg.path()]);
        assert_eq!(code, Some(2), "config:\n{text}\nstderr:\n{err}");
        for want in wants {
            assert!(
                err.contains(want),
                "{want:?} not in the error for:\n{text}\n---\n{err}"
            );
        }
    }
    // Several problems are all reported at once.
    let cfg = TempConfig::new(&base("rpm = 0\ntpm = 0", ""));
    let (code, _, err) = run_to_exit(&["--config", cfg.path()]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("`tiers.free.rpm`") && err.contains("`tiers.free.tpm`"),
        "{err}"
    );
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_limits_through_redis() {
    let Some(redis) = support::redis::RedisServer::start() else {
        return; // redis-server is not installed (outside CI): skipped, said why.
    };
    let (up_server, _up) = start_upstream().await;
    // The exact log, so that no window boundary can blur the count.
    let cfg = TempConfig::new(&test_config(
        &up_server.url(),
        "algorithm = \"sliding_window_log\"",
    ));
    let url = redis.url();
    let a = Gateway::start(&["--config", cfg.path(), "--redis", &url]);
    let b = Gateway::start(&["--config", cfg.path(), "--redis", &url]);
    assert!(a.banner.contains("store:  redis"), "{}", a.banner);
    let c = client();
    let body = chat("test-model", "hi", 5);
    // Alternate between the two: together they admit the free tier's 10.
    for i in 0..10 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let r = call(
            &c,
            "POST",
            &gw.url("/v1/chat/completions"),
            Some("free-a"),
            Some(&body),
        )
        .await;
        assert_eq!(r.status, 200, "request {i}: {:?}", r.body);
        assert_eq!(
            r.header("x-ratelimit-remaining-requests"),
            (9 - i).to_string()
        );
    }
    for gw in [&a, &b] {
        let r = call(
            &c,
            "POST",
            &gw.url("/v1/chat/completions"),
            Some("free-a"),
            Some(&body),
        )
        .await;
        assert_openai_error(&r, 429, "rate_limit_exceeded");
        let rpm = rule_state(&c, gw, "free-a", "user-rpm").await;
        assert_eq!(rpm["remaining"], 0, "{rpm}");
    }
    // Token settlements land in the shared store too: 10 x (1 word + 5).
    let deadline = Instant::now() + support::WAIT;
    loop {
        let tpm = rule_state(&c, &b, "free-a", "user-tpm").await;
        if tpm["remaining"] == 2000 - 60 {
            break;
        }
        assert!(Instant::now() < deadline, "not settled in Redis: {tpm}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Another user still has its own budget on both.
    let r = call(
        &c,
        "POST",
        &b.url("/v1/chat/completions"),
        Some("free-b"),
        Some(&body),
    )
    .await;
    assert_eq!(r.status, 200);
    let metrics = call(&c, "GET", &a.url("/metrics"), None, None).await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(
        text.contains("gateway_store_redis_circuit_open 0"),
        "{text}"
    );
    assert!(
        text.contains("gateway_store_redis_errors_total 0"),
        "{text}"
    );
}

/// A Redis URL's password is used, never shown: the banner and the log name the store with
/// `***` in its place (a `rediss://` managed Redis is reached with one in its URL).
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_password_never_reaches_the_banner_or_the_log() {
    let Some(redis) = support::redis::RedisServer::start() else {
        return; // redis-server is not installed (outside CI): skipped, said why.
    };
    const SECRET: &str = "s3cret-redis-pw";
    // Set once the server runs (its readiness check speaks without a password).
    redis
        .cli(&["CONFIG", "SET", "requirepass", SECRET])
        .expect("CONFIG SET requirepass");
    let (up_server, _up) = start_upstream().await;
    let cfg = TempConfig::new(&test_config(&up_server.url(), ""));
    let url = format!("redis://:{SECRET}@127.0.0.1:{}", redis.port);
    let gw = Gateway::start(&["--config", cfg.path(), "--redis", &url]);
    let shown = format!("redis://:***@127.0.0.1:{}", redis.port);
    assert!(gw.banner.contains(&shown), "{}", gw.banner);
    // The password is used: the request is counted in Redis.
    let r = call(
        &client(),
        "POST",
        &gw.url("/v1/chat/completions"),
        Some("free-a"),
        Some(&chat("test-model", "hi", 5)),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}\n{}", r.body, gw.stderr());
    assert!(!gw.banner.contains(SECRET), "{}", gw.banner);
    assert!(!gw.stderr().contains(SECRET), "{}", gw.stderr());
}

/// The abuse of issue 12: on Redis, with `idempotency_header = "x-request-id"` and a tier of
/// 10 requests per minute, 20 different requests that all carry `x-request-id: same-id`
/// admit exactly 10, and 5 more with fresh ids after them are denied.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_id_on_twenty_requests_admits_ten_through_redis() {
    let Some(redis) = support::redis::RedisServer::start() else {
        return; // redis-server is not installed (outside CI): skipped, said why.
    };
    let (up_server, _up) = start_upstream().await;
    let cfg = TempConfig::new(&test_config(
        &up_server.url(),
        "algorithm = \"sliding_window_log\"\nidempotency_header = \"x-request-id\"",
    ));
    let gw = Gateway::start(&["--config", cfg.path(), "--redis", &redis.url()]);
    let c = client();
    let post = |id: String, content: String| {
        let req = Request::builder()
            .method("POST")
            .uri(gw.url("/v1/chat/completions"))
            .header("authorization", "Bearer free-a")
            .header("content-type", "application/json")
            .header("x-request-id", id)
            .body(Full::new(Bytes::from(
                chat("test-model", &content, 5).to_string(),
            )))
            .unwrap();
        let c = c.clone();
        async move {
            let res = within("a chat request", c.request(req)).await.unwrap();
            let status = res.status();
            within("its body", res.into_body().collect()).await.unwrap();
            status
        }
    };
    let mut admitted = 0;
    for i in 0..20 {
        let status = post("same-id".into(), format!("question {i}")).await;
        assert!(status == 200 || status == 429, "{status}");
        admitted += usize::from(status == 200);
    }
    assert_eq!(admitted, 10);
    for i in 0..5 {
        let status = post(format!("fresh-{i}"), "hi".into()).await;
        assert_eq!(status, 429);
    }
}
