//! Overload: the example gateway in front of its built-in mock saturating like a GPU
//! (`[mock] capacity`), pro callers at half the mock's capacity, free callers ramping to four
//! times it (issue 15, item 6): two runs of static limits and one of adaptive capacity with
//! tier priority, side by side.
//!
//! ```text
//! cargo bench --bench overload
//! ```
//!
//! The gateway (`cargo build --release --example gateway`, built here if needed; memory
//! store) runs as its own process with one model on the mock: `capacity` C = 16 completions at
//! full speed, one token per 20 ms, `queue` = C (so at most 2C run, each token then twice as
//! slow, and the next is answered 503). Every completion streams 16 tokens, so the mock's
//! most is `C / 20 ms` = 800 completion tokens per second, and it finishes `C / (16 x 20 ms)`
//! = 50 completions per second at full speed: its *capacity* in requests per second.
//!
//! Load, open loop (arrivals on a schedule, whatever the answers): pro at 0.5x capacity
//! (25 requests/s, 4 keys); free ramping from 0 to 4x capacity (200 requests/s, 32 keys, each
//! within its tier's own limits: 375 of its 600 requests per minute, about 4 of its 8
//! concurrent), in three phases: `baseline` (pro alone: its unloaded time to first token),
//! `ramp` (free 0 -> 4x), `hold` (free at 4x). Each request is a streamed chat completion read
//! to its end; a success is a 200 whose stream ends with `[DONE]`. Time to first token: from
//! sending the request to the first event with content (the mock's empty role chunk comes
//! with it).
//!
//! Two runs of static limits, each in a fresh gateway:
//! 1. `tier limits`: per-user limits only (free: 600 rpm, 8 concurrent; pro: 6000 rpm, 64
//!    concurrent); the model has none: the mock saturates and answers 503.
//! 2. `+ model concurrent = C`: the model's own concurrency limit at the mock's capacity:
//!    no 503 from the mock, but the gateway answers 429 to whoever finds the model full,
//!    pro as well as free.
//!
//! And the gated run, with the same tier limits:
//! 3. `adaptive + priority`: `[models.mock-gpt.capacity]` from `min = 1` to `max = 2C` (the
//!    most the mock takes before its 503s; the controller starts there and moves with the
//!    mock's answers: its 503s, and its time to first byte, which is its time to first
//!    token), the controller's other settings the gateway's defaults (no latency target: it
//!    finds the mock's knee), `saturation = 0.9` (`OVERLOAD_SATURATION_PCT`, 90); pro has
//!    `priority = 2`, `capacity_share = 0.5` and
//!    `max_wait_ms = 2000`, free nothing (shed first past the threshold). The gate: pro's
//!    success rate at least 99.9% in this run. After it, the gateway's capacity metrics
//!    (current limit, the controller's changes, requests shed by tier) are printed.
//!
//! Printed for each run: per phase and tier, of the requests sent in the phase: sent,
//! successes, 429s (the gateway), 503s of the mock (passed through: the body's error code is
//! the mock's `overloaded`; the gateway's own 503s, a store full or failing, count as other),
//! other failures, time to first token p50 / p99 of the successes; and completion tokens
//! delivered per second: the tier's tokens received during the phase (whenever their request
//! was sent), over its length; tokens received after the last phase are not counted. Then
//! the issue's four figures over the
//! loaded phases (ramp and hold): pro's success rate, pro's p99 time to first token against
//! its unloaded p99, the mock's 503s as a share of all requests, and the tokens per second
//! delivered in `hold` as a share of the mock's most; and the mock's own counts
//! (`GET /v1/mock/stats`).
//!
//! Environment: `OVERLOAD_BASELINE_SECS` (10), `OVERLOAD_RAMP_SECS` (20),
//! `OVERLOAD_HOLD_SECS` (10), `OVERLOAD_CAPACITY` (16), `OVERLOAD_TOKEN_DELAY_MS` (20),
//! `OVERLOAD_CAPACITY_MAX` (the adaptive run's `max`, 2C), `OVERLOAD_SATURATION_PCT` (its
//! `saturation` in hundredths, 90), `OVERLOAD_ONLY=adaptive` (the adaptive run alone),
//! `OVERLOAD_ALLOW_SKIP=1` (a run that can't start is skipped instead of failing; without
//! it, a skip exits 2 and a failed gate exits 1), `OVERLOAD_GATEWAY` (a gateway binary to use instead of building one; the gateway's last
//! lines on stderr are printed if it doesn't start), `OVERLOAD_SCENARIO` (`follow`: instead
//! of the three runs, whether the adaptive capacity follows the mock's capacity halving
//! then coming back, see `overload/follow.rs`; its own `OVERLOAD_FOLLOW_*` variables are
//! there). The client runs on a
//! 2-worker tokio runtime in this process; on a small machine it shares the cores with the
//! gateway, which only adds to the times both runs measure.

#[allow(dead_code)]
#[path = "support/gateway.rs"]
mod gateway;

#[path = "overload/follow.rs"]
mod follow;

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use gateway::{gateway_binary, start_gateway, Gateway};

/// Tokens of every completion (the mock's most, asked for).
const TOKENS: u64 = 16;
const PRO_KEYS: usize = 4;
const FREE_KEYS: usize = 32;
/// How long one request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the arrival schedule is read.
const TICK: Duration = Duration::from_millis(5);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Debug, Clone, Copy)]
struct Setup {
    capacity: u64,
    token_delay_ms: u64,
    baseline: Duration,
    ramp: Duration,
    hold: Duration,
    /// The adaptive run's `max`.
    capacity_max: u64,
    /// The adaptive run's `saturation`, in hundredths.
    saturation_pct: u64,
    /// Only the adaptive run (`OVERLOAD_ONLY=adaptive`).
    only_adaptive: bool,
}

impl Setup {
    fn from_env() -> Self {
        Self {
            capacity: env_u64("OVERLOAD_CAPACITY", 16).max(1),
            token_delay_ms: env_u64("OVERLOAD_TOKEN_DELAY_MS", 20).max(1),
            baseline: Duration::from_secs(env_u64("OVERLOAD_BASELINE_SECS", 10)),
            ramp: Duration::from_secs(env_u64("OVERLOAD_RAMP_SECS", 20)),
            hold: Duration::from_secs(env_u64("OVERLOAD_HOLD_SECS", 10)),
            capacity_max: 0,
            saturation_pct: env_u64("OVERLOAD_SATURATION_PCT", 90).clamp(1, 100),
            only_adaptive: std::env::var("OVERLOAD_ONLY").is_ok_and(|v| v == "adaptive"),
        }
        .with_capacity_max()
    }

    fn with_capacity_max(mut self) -> Self {
        self.capacity_max = env_u64("OVERLOAD_CAPACITY_MAX", 2 * self.capacity).max(1);
        self
    }

    /// Completions per second the mock finishes at full speed.
    fn capacity_rps(&self) -> f64 {
        self.capacity as f64 * 1000.0 / (TOKENS * self.token_delay_ms) as f64
    }

    /// Completion tokens per second the mock generates at most.
    fn max_tokens_per_sec(&self) -> f64 {
        self.capacity as f64 * 1000.0 / self.token_delay_ms as f64
    }

    fn total(&self) -> Duration {
        self.baseline + self.ramp + self.hold
    }

    /// The phase at `t` from the start, `None` after the last.
    fn phase_at(&self, t: Duration) -> Option<Phase> {
        (t < self.total()).then(|| self.phase(t))
    }

    fn phase(&self, t: Duration) -> Phase {
        if t < self.baseline {
            Phase::Baseline
        } else if t < self.baseline + self.ramp {
            Phase::Ramp
        } else {
            Phase::Hold
        }
    }

    /// Free requests per second at `t`.
    fn free_rate(&self, t: Duration) -> f64 {
        let top = 4.0 * self.capacity_rps();
        match self.phase(t) {
            Phase::Baseline => 0.0,
            Phase::Ramp => top * (t - self.baseline).as_secs_f64() / self.ramp.as_secs_f64(),
            Phase::Hold => top,
        }
    }

    fn phase_secs(&self, p: Phase) -> f64 {
        match p {
            Phase::Baseline => self.baseline,
            Phase::Ramp => self.ramp,
            Phase::Hold => self.hold,
        }
        .as_secs_f64()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Baseline,
    Ramp,
    Hold,
}

const PHASES: [Phase; 3] = [Phase::Baseline, Phase::Ramp, Phase::Hold];

impl Phase {
    fn index(self) -> usize {
        self as usize
    }
}

/// Completion tokens received in each phase, by [`Phase::index`].
type Received = [u64; 3];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tier {
    Pro,
    Free,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    /// 429 from the gateway.
    Limited,
    /// 503 from the mock: its error code, `overloaded`.
    Overloaded,
    /// Another status (a 503 of the gateway's own among them), a cut stream, a timeout or a
    /// connection error.
    Failed,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    tier: Tier,
    phase: Phase,
    outcome: Outcome,
    ttft: Option<Duration>,
    /// Its tokens, by the phase they were received in.
    tokens: Received,
}

/// The limits of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    TierLimits,
    ModelConcurrency,
    Adaptive,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::TierLimits => "static limits: tier limits",
            Variant::ModelConcurrency => "static limits: + model concurrent = C",
            Variant::Adaptive => "adaptive capacity + priority",
        }
    }
}

fn config(setup: &Setup, variant: Variant) -> String {
    let (model_limit, pro_priority) = match variant {
        Variant::TierLimits => (String::new(), ""),
        Variant::ModelConcurrency => (format!("concurrent = {}", setup.capacity), ""),
        Variant::Adaptive => (
            format!(
                "[models.mock-gpt.capacity]\nmin = 1\nmax = {}\nsaturation = {}",
                setup.capacity_max,
                setup.saturation_pct as f64 / 100.0
            ),
            "priority = 2\ncapacity_share = 0.5\nmax_wait_ms = 2000",
        ),
    };
    let mut keys = String::new();
    for i in 0..PRO_KEYS {
        let _ = writeln!(
            keys,
            "pro-{i} = {{ user = \"pro-user-{i}\", tier = \"pro\" }}"
        );
    }
    for i in 0..FREE_KEYS {
        let _ = writeln!(
            keys,
            "free-{i} = {{ user = \"free-user-{i}\", tier = \"free\" }}"
        );
    }
    format!(
        r#"listen = "127.0.0.1:0"
[server]
max_connections = 10000
[limiter]
shutdown_grace_secs = 1
[mock]
token_delay_ms = {delay}
capacity = {capacity}
queue = {capacity}
[models.mock-gpt]
upstream = "mock"
timeout_secs = 60
{model_limit}
[tiers.free]
rpm = 600
concurrent = 8
[tiers.pro]
rpm = 6000
concurrent = 64
{pro_priority}
[keys]
{keys}"#,
        delay = setup.token_delay_ms,
        capacity = setup.capacity,
    )
}

// ─── The load ────────────────────────────────────────────────────────────────────────────

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Whether a 503's body is the mock's (`{"error": {"code": "overloaded", ...}}`), not the
/// gateway's own.
async fn from_the_mock(body: hyper::body::Incoming) -> bool {
    let Ok(body) = body.collect().await else {
        return false;
    };
    serde_json::from_slice::<Value>(&body.to_bytes())
        .is_ok_and(|v| v.pointer("/error/code") == Some(&Value::from("overloaded")))
}

/// One streamed completion, read to its end; its completion tokens counted by the phase
/// (from `start`) they are received in.
async fn one(
    client: HttpClient,
    url: String,
    key: String,
    setup: Setup,
    start: Instant,
) -> (Outcome, Option<Duration>, Received) {
    let body = format!(
        r#"{{"model":"mock-gpt","stream":true,"max_tokens":{TOKENS},"messages":[{{"role":"user","content":"tell me a story"}}]}}"#
    );
    let req = Request::post(url)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("a request");
    let sent = Instant::now();
    let none: Received = [0; 3];
    let run = async {
        let res = match client.request(req).await {
            Ok(r) => r,
            Err(_) => return (Outcome::Failed, None, none),
        };
        match res.status() {
            StatusCode::OK => {}
            StatusCode::TOO_MANY_REQUESTS => return (Outcome::Limited, None, none),
            StatusCode::SERVICE_UNAVAILABLE => {
                let outcome = if from_the_mock(res.into_body()).await {
                    Outcome::Overloaded
                } else {
                    Outcome::Failed
                };
                return (outcome, None, none);
            }
            _ => return (Outcome::Failed, None, none),
        }
        let mut body = res.into_body();
        let (mut pending, mut ttft, mut tokens, mut done) = (Vec::new(), None, none, false);
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                return (Outcome::Failed, ttft, tokens);
            };
            let Some(data) = frame.data_ref() else {
                continue;
            };
            pending.extend_from_slice(data);
            while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = pending.drain(..end + 2).collect();
                let Some(data) = event.strip_prefix(b"data: ") else {
                    continue;
                };
                let data = &data[..data.len() - 2];
                if data == b"[DONE]" {
                    done = true;
                    continue;
                }
                let Ok(v) = serde_json::from_slice::<Value>(data) else {
                    continue;
                };
                let content = v
                    .pointer("/choices/0/delta/content")
                    .and_then(Value::as_str);
                if content.is_some_and(|c| !c.is_empty()) {
                    let received = Instant::now();
                    if let Some(p) = setup.phase_at(received.duration_since(start)) {
                        tokens[p.index()] += 1;
                    }
                    ttft.get_or_insert_with(|| received.duration_since(sent));
                }
            }
        }
        let outcome = if done { Outcome::Ok } else { Outcome::Failed };
        (outcome, ttft, tokens)
    };
    tokio::time::timeout(REQUEST_TIMEOUT, run)
        .await
        .unwrap_or((Outcome::Failed, None, none))
}

/// Runs the schedule against `gw`; every request's sample.
async fn load(setup: Setup, gw: &Gateway) -> Vec<Sample> {
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build_http();
    let url = format!("http://{}/v1/chat/completions", gw.addr);
    let samples = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = tokio::task::JoinSet::new();
    let pro_rate = 0.5 * setup.capacity_rps();
    let (mut pro_credit, mut free_credit) = (0.0f64, 0.0f64);
    let (mut pro_n, mut free_n) = (0usize, 0usize);
    let start = tokio::time::Instant::now();
    let start_std = start.into_std();
    let mut last = Duration::ZERO;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let t = start.elapsed();
        if t >= setup.total() {
            break;
        }
        let dt = (t - last).as_secs_f64();
        last = t;
        pro_credit += pro_rate * dt;
        free_credit += setup.free_rate(t) * dt;
        let phase = setup.phase(t);
        let mut spawn = |tier: Tier, key: String| {
            let (client, url, samples) = (client.clone(), url.clone(), Arc::clone(&samples));
            tasks.spawn(async move {
                let (outcome, ttft, tokens) = one(client, url, key, setup, start_std).await;
                samples.lock().expect("samples").push(Sample {
                    tier,
                    phase,
                    outcome,
                    ttft,
                    tokens,
                });
            });
        };
        while pro_credit >= 1.0 {
            pro_credit -= 1.0;
            spawn(Tier::Pro, format!("pro-{}", pro_n % PRO_KEYS));
            pro_n += 1;
        }
        while free_credit >= 1.0 {
            free_credit -= 1.0;
            spawn(Tier::Free, format!("free-{}", free_n % FREE_KEYS));
            free_n += 1;
        }
        // Finished requests don't pile up in the set.
        while tasks.try_join_next().is_some() {}
    }
    // Each request is bounded by REQUEST_TIMEOUT.
    while tasks.join_next().await.is_some() {}
    let mut all = samples.lock().expect("samples");
    std::mem::take(&mut *all)
}

async fn mock_stats(gw: &Gateway) -> Value {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let Some(mock) = &gw.mock else {
        return Value::Null;
    };
    let uri = format!("{mock}/mock/stats");
    let req = Request::get(uri)
        .body(Full::new(Bytes::new()))
        .expect("a request");
    let Ok(Ok(res)) = tokio::time::timeout(Duration::from_secs(5), client.request(req)).await
    else {
        return Value::Null;
    };
    match res.into_body().collect().await {
        Ok(b) => serde_json::from_slice(&b.to_bytes()).unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

// ─── The report ──────────────────────────────────────────────────────────────────────────

fn percentile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    Some(sorted[i])
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| {
        format!("{:.0} ms", d.as_secs_f64() * 1000.0)
    })
}

struct Group {
    sent: usize,
    ok: usize,
    limited: usize,
    overloaded: usize,
    failed: usize,
    ttft: Vec<Duration>,
}

/// The tokens of `samples` received in `phase`, per second of it.
fn tokens_per_sec<'a>(
    setup: &Setup,
    samples: impl Iterator<Item = &'a Sample>,
    phase: Phase,
) -> f64 {
    let n: u64 = samples.map(|s| s.tokens[phase.index()]).sum();
    n as f64 / setup.phase_secs(phase)
}

fn group<'a>(samples: impl Iterator<Item = &'a Sample>) -> Group {
    let mut g = Group {
        sent: 0,
        ok: 0,
        limited: 0,
        overloaded: 0,
        failed: 0,
        ttft: Vec::new(),
    };
    for s in samples {
        g.sent += 1;
        match s.outcome {
            Outcome::Ok => g.ok += 1,
            Outcome::Limited => g.limited += 1,
            Outcome::Overloaded => g.overloaded += 1,
            Outcome::Failed => g.failed += 1,
        }
        if s.outcome == Outcome::Ok {
            g.ttft.extend(s.ttft);
        }
    }
    g.ttft.sort();
    g
}

fn rate(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

/// Prints a run's figures; false when it is the gated run and the gate failed.
fn report(setup: &Setup, variant: Variant, samples: &[Sample], stats: &Value) -> bool {
    match variant {
        Variant::Adaptive => println!(
            "\n## {} (max = {}, saturation {}, pro share 0.5)",
            variant.name(),
            setup.capacity_max,
            setup.saturation_pct as f64 / 100.0
        ),
        _ => println!("\n## {}", variant.name()),
    }
    println!(
        "{:<9} {:<5} {:>6} {:>8} {:>6} {:>6} {:>6} {:>10} {:>10} {:>10}",
        "phase",
        "tier",
        "sent",
        "success",
        "429",
        "503",
        "other",
        "TTFT p50",
        "TTFT p99",
        "tokens/s"
    );
    for phase in PHASES {
        for tier in [Tier::Pro, Tier::Free] {
            let g = group(
                samples
                    .iter()
                    .filter(|s| s.phase == phase && s.tier == tier),
            );
            let tokens = tokens_per_sec(setup, samples.iter().filter(|s| s.tier == tier), phase);
            if g.sent == 0 {
                continue;
            }
            println!(
                "{:<9} {:<5} {:>6} {:>7.1}% {:>6} {:>6} {:>6} {:>10} {:>10} {:>10.0}",
                format!("{phase:?}").to_lowercase(),
                format!("{tier:?}").to_lowercase(),
                g.sent,
                rate(g.ok, g.sent),
                g.limited,
                g.overloaded,
                g.failed,
                ms(percentile(&g.ttft, 0.5)),
                ms(percentile(&g.ttft, 0.99)),
                tokens,
            );
        }
    }
    let unloaded = group(
        samples
            .iter()
            .filter(|s| s.phase == Phase::Baseline && s.tier == Tier::Pro),
    );
    let loaded = |s: &&Sample| s.phase != Phase::Baseline;
    let pro = group(
        samples
            .iter()
            .filter(loaded)
            .filter(|s| s.tier == Tier::Pro),
    );
    let all = group(samples.iter().filter(loaded));
    let (p99, p99_unloaded) = (
        percentile(&pro.ttft, 0.99),
        percentile(&unloaded.ttft, 0.99),
    );
    let ratio = match (p99, p99_unloaded) {
        (Some(a), Some(b)) if !b.is_zero() => format!("{:.1}x", a.as_secs_f64() / b.as_secs_f64()),
        _ => "-".into(),
    };
    let delivered = tokens_per_sec(setup, samples.iter(), Phase::Hold);
    println!(
        "loaded (ramp + hold): pro success {:.2}% (goal >= 99.9%) | pro p99 TTFT {} vs {} \
         unloaded = {ratio} (goal <= 2x) | upstream 503s {:.2}% of {} requests (goal < 0.1%) | \
         delivered in hold {:.0} tokens/s = {:.0}% of the mock's {:.0} (goal >= 90%)",
        rate(pro.ok, pro.sent),
        ms(p99),
        ms(p99_unloaded),
        rate(all.overloaded, all.sent),
        all.sent,
        delivered,
        100.0 * delivered / setup.max_tokens_per_sec(),
        setup.max_tokens_per_sec(),
    );
    println!("mock: {stats}");
    if variant == Variant::Adaptive {
        let gate = rate(pro.ok, pro.sent) >= 99.9;
        println!(
            "GATE (pro success >= 99.9% with adaptive capacity + priority): {}",
            if gate { "pass" } else { "FAIL" }
        );
        return gate;
    }
    true
}

/// The gateway's `gateway_capacity_*` metric lines (`GET /metrics`), but the histograms'.
async fn capacity_metrics(gw: &Gateway) -> String {
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let req = Request::get(format!("http://{}/metrics", gw.addr))
        .body(Full::new(Bytes::new()))
        .expect("a request");
    let Ok(Ok(res)) = tokio::time::timeout(Duration::from_secs(5), client.request(req)).await
    else {
        return String::new();
    };
    let Ok(body) = res.into_body().collect().await else {
        return String::new();
    };
    String::from_utf8_lossy(&body.to_bytes())
        .lines()
        .filter(|l| l.starts_with("gateway_capacity_") && !l.contains("_bucket{"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn main() {
    // `cargo bench` passes `--bench`; there is nothing to filter.
    let setup = Setup::from_env();
    println!(
        "overload: mock capacity {} at {} ms per token ({:.0} completions/s, {:.0} tokens/s at \
         most), queue {}; pro {:.1} requests/s, free 0 -> {:.1} requests/s; phases {}s / {}s / {}s",
        setup.capacity,
        setup.token_delay_ms,
        setup.capacity_rps(),
        setup.max_tokens_per_sec(),
        setup.capacity,
        0.5 * setup.capacity_rps(),
        4.0 * setup.capacity_rps(),
        setup.baseline.as_secs(),
        setup.ramp.as_secs(),
        setup.hold.as_secs(),
    );
    let bin = match gateway_binary(Some("OVERLOAD_GATEWAY")) {
        Ok(b) => b,
        Err(e) => {
            println!("overload: skipped ({e})");
            skipped();
            return;
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    if std::env::var("OVERLOAD_SCENARIO").is_ok_and(|s| s == "follow") {
        follow::run(setup, &bin, &runtime);
        return;
    }
    for variant in [
        Variant::TierLimits,
        Variant::ModelConcurrency,
        Variant::Adaptive,
    ] {
        if setup.only_adaptive && variant != Variant::Adaptive {
            continue;
        }
        let started = start_gateway(&bin, &config(&setup, variant), &[("RUST_LOG", "error")])
            .and_then(|gw| match gw.mock {
                Some(_) => Ok(gw),
                None => Err("its banner names no mock model".into()),
            });
        let gw = match started {
            Ok(gw) => gw,
            Err(e) => {
                println!("overload: {}: skipped ({e})", variant.name());
                skipped();
                continue;
            }
        };
        let (samples, stats, metrics) = runtime.block_on(async {
            let samples = load(setup, &gw).await;
            (samples, mock_stats(&gw).await, capacity_metrics(&gw).await)
        });
        let passed = report(&setup, variant, &samples, &stats);
        if variant == Variant::Adaptive {
            println!("gateway capacity metrics:\n{metrics}");
        }
        if !passed {
            // The gate fails the run (exit status 1), so a script or CI job can rely on it;
            // the gateway first (`exit` runs no destructor).
            drop(gw);
            std::process::exit(1);
        }
    }
}

/// A run that couldn't take place fails, unless `OVERLOAD_ALLOW_SKIP=1` says a skip is fine.
fn skipped() {
    if std::env::var("OVERLOAD_ALLOW_SKIP").is_ok_and(|v| v == "1") {
        return;
    }
    eprintln!("overload: a run was skipped (set OVERLOAD_ALLOW_SKIP=1 to allow it)");
    std::process::exit(2);
}
