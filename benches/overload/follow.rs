//! `OVERLOAD_SCENARIO=follow`: does a model's adaptive capacity follow the mock when the
//! mock's capacity halves, then comes back (issue 15, item 1: "the limit settles within 10%
//! of the new capacity in under 10 s; when it comes back, the limit regains it within
//! 30 s")? Measured against the real gateway and its built-in saturating mock.
//!
//! One gateway (memory store), one model on the mock at capacity C (`OVERLOAD_CAPACITY`,
//! 16) and `queue` C, one token per `OVERLOAD_TOKEN_DELAY_MS` (20); the model's
//! `[models.mock-gpt.capacity]` from `min = 1` to `max = 4C`, the controller's settings the
//! gateway's defaults (no latency target: the controller finds the mock's knee). First, 4
//! clients (well under C) stream completions back to back for 3 s: their median time to
//! first token is printed as the unloaded one, and the controller learns its calm latency
//! from them. With `OVERLOAD_FOLLOW_TARGET` (a factor > 1), a `latency_target_ms` of that
//! many times the unloaded time to first token is set by SIGHUP before the load (a new
//! target starts the controller afresh, at `max`).
//!
//! Then the load, closed loop: 4C clients (`OVERLOAD_FOLLOW_CLIENTS`), each streaming a
//! completion of 16 tokens to its end and sending the next at once; after an answer that
//! is not a completed stream (the gateway's 429, the mock's 503) a client waits 25 ms
//! before it sends again (without it the refused clients would spin on the 2 cores the
//! gateway and the mock need). Three phases: `full` (`OVERLOAD_FOLLOW_FULL_SECS`, 30), at
//! t0 the configuration rewritten with the mock's capacity and queue at C/2 and SIGHUP
//! (`half`, `OVERLOAD_FOLLOW_HALF_SECS`, 30), at t1 back to C (`back`,
//! `OVERLOAD_FOLLOW_BACK_SECS`, 40). Every 200 ms: `gateway_capacity_limit` and
//! `_in_flight` of the model (`GET /metrics`), and the mock's sequences running
//! (`GET /v1/mock/stats`).
//!
//! Printed: the unloaded time to first token; the limit (and the mock's running) once a
//! second; per phase, the answers (completed, 429, 503, other) and the limit over the last
//! 10 s of the phase (mean, min, max). The level the controller found at full capacity,
//! `C_found`, is that mean over the last 10 s of `full`. Then the figures, each against the
//! nominal level and the found one: after t0, against C/2 and C_found/2; after t1, against C
//! and C_found:
//! - `settled`: the time from the signal until the first sample of the first run of
//!   samples within ±10% of the level that lasts [`HOLD`] (3 s);
//! - `stays`: the time from the signal until the sample after the last one out of the band
//!   in the phase (it stays within the band from there to the phase's end);
//! - after t1 also `reached`: the time until the limit first reaches 90% of the level.
//!
//! The goals: `settled` after t0 under 10 s, `reached` (and `settled`) after t1 under 30 s.
//!
//! What to expect: past C the mock delivers no more tokens per second, only a later first
//! token (`token_delay x running / C`), so the controller's knee (the load past which the
//! time to first token rises 5% over its calm mean) is C itself; it probes 2% past it now
//! and then, so the limit reads C, now and then C + 1. With a latency target, a target
//! above the unloaded time lets the limit run past C to where the first token meets it
//! unless the knee stops it first.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use super::gateway::{start_gateway, Gateway};
use super::{env_u64, mock_stats, one, HttpClient, Outcome, Setup};

/// How often the limit is sampled.
const SAMPLE: Duration = Duration::from_millis(200);
/// How long the limit must stay within the band to count as settled.
const HOLD: Duration = Duration::from_secs(3);
/// The tail of each phase over which its level is measured.
const TAIL: Duration = Duration::from_secs(10);
/// A client's pause after an answer that is not a completed stream.
const BACKOFF: Duration = Duration::from_millis(25);
/// How long a reload may take to show in the metrics.
const RELOAD: Duration = Duration::from_secs(10);
const MODEL: &str = "mock-gpt";
const KEY: &str = "bench-0";

#[derive(Debug, Clone, Copy)]
struct Follow {
    capacity: u64,
    token_delay_ms: u64,
    clients: u64,
    /// `OVERLOAD_FOLLOW_TARGET`: a latency target of this many times the unloaded time to
    /// first token; none by default (the controller's knee alone).
    target_factor: Option<f64>,
    full: Duration,
    half: Duration,
    back: Duration,
}

impl Follow {
    fn from_env(setup: &Setup) -> Self {
        let factor = std::env::var("OVERLOAD_FOLLOW_TARGET")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|f| *f > 1.0);
        Self {
            capacity: setup.capacity.max(2),
            token_delay_ms: setup.token_delay_ms,
            clients: env_u64("OVERLOAD_FOLLOW_CLIENTS", 4 * setup.capacity.max(2)).max(1),
            target_factor: factor,
            full: Duration::from_secs(env_u64("OVERLOAD_FOLLOW_FULL_SECS", 30).max(5)),
            half: Duration::from_secs(env_u64("OVERLOAD_FOLLOW_HALF_SECS", 30).max(5)),
            back: Duration::from_secs(env_u64("OVERLOAD_FOLLOW_BACK_SECS", 40).max(5)),
        }
    }

    /// The configuration: the mock at `mock_capacity` (queue alike), the model's capacity
    /// with `target_ms` if given.
    fn config(&self, mock_capacity: u64, target_ms: Option<u64>) -> String {
        let target = target_ms.map_or(String::new(), |t| format!("latency_target_ms = {t}\n"));
        format!(
            r#"listen = "127.0.0.1:0"
[server]
max_connections = 10000
[limiter]
shutdown_grace_secs = 1
[mock]
token_delay_ms = {delay}
capacity = {mock_capacity}
queue = {mock_capacity}
[models.{MODEL}]
upstream = "mock"
timeout_secs = 60
[models.{MODEL}.capacity]
min = 1
max = {max}
{target}[tiers.bench]
[keys]
{KEY} = {{ user = "bench-user", tier = "bench" }}
"#,
            delay = self.token_delay_ms,
            max = 4 * self.capacity,
        )
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// The `/metrics` text, or empty.
async fn metrics(client: &HttpClient, gw: &Gateway) -> String {
    metrics_at(client, gw.addr).await
}

/// The value of the metric line `name{labels...}` whose labels contain `label`.
fn metric(text: &str, name: &str, label: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter(|l| l.contains(label))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

fn reloads_ok(text: &str) -> f64 {
    metric(text, "gateway_config_reloads_total", r#"result="ok""#).unwrap_or(0.0)
}

/// Rewrites the configuration, signals the gateway and waits until its reload counter
/// moves; the time it took.
async fn reload(client: &HttpClient, gw: &Gateway, config: &str) -> Result<Duration, String> {
    let before = reloads_ok(&metrics(client, gw).await);
    let sent = Instant::now();
    gw.reload(config)?;
    while reloads_ok(&metrics(client, gw).await) <= before {
        if sent.elapsed() > RELOAD {
            return Err(format!("no reload within {RELOAD:?}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(sent.elapsed())
}

/// The median time to first token of 4 clients streaming back to back for 3 s.
async fn unloaded_ttft(client: &HttpClient, gw: &Gateway, setup: Setup) -> Option<Duration> {
    let url = format!("http://{}/v1/chat/completions", gw.addr);
    let until = Instant::now() + Duration::from_secs(3);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (client, url) = (client.clone(), url.clone());
        tasks.spawn(async move {
            let mut ttfts = Vec::new();
            while Instant::now() < until {
                let (outcome, ttft, _) = one(
                    client.clone(),
                    url.clone(),
                    KEY.into(),
                    setup,
                    Instant::now(),
                )
                .await;
                if outcome == Outcome::Ok {
                    ttfts.extend(ttft);
                }
            }
            ttfts
        });
    }
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r.unwrap_or_default());
    }
    all.sort();
    all.get(all.len() / 2).copied()
}

#[derive(Debug, Clone, Copy)]
struct Point {
    /// Since the load started.
    t: Duration,
    limit: f64,
    in_flight: f64,
    running: f64,
}

/// The answers of one phase: completed, 429, 503 of the mock, other.
type Answers = [u64; 4];

fn outcome_index(o: Outcome) -> usize {
    match o {
        Outcome::Ok => 0,
        Outcome::Limited => 1,
        Outcome::Overloaded => 2,
        Outcome::Failed => 3,
    }
}

/// The phase (0 `full`, 1 `half`, 2 `back`) of `t`, given the signals' times.
fn phase_of(t: Duration, t0: Option<Duration>, t1: Option<Duration>) -> usize {
    match (t0, t1) {
        (_, Some(t1)) if t >= t1 => 2,
        (Some(t0), _) if t >= t0 => 1,
        _ => 0,
    }
}

/// The samples of `[from, to)`.
fn between(points: &[Point], from: Duration, to: Duration) -> Vec<Point> {
    points
        .iter()
        .filter(|p| p.t >= from && p.t < to)
        .copied()
        .collect()
}

/// Mean, min, max of the limits of `points`.
fn stats(points: &[Point]) -> Option<(f64, f64, f64)> {
    if points.is_empty() {
        return None;
    }
    let sum: f64 = points.iter().map(|p| p.limit).sum();
    let min = points.iter().map(|p| p.limit).fold(f64::MAX, f64::min);
    let max = points.iter().map(|p| p.limit).fold(f64::MIN, f64::max);
    Some((sum / points.len() as f64, min, max))
}

fn within(limit: f64, level: f64) -> bool {
    (limit - level).abs() <= 0.1 * level
}

/// Of the samples of a phase that started at `signal` and ends at `end`: the time from the
/// signal to the first sample of the first run within the band of `level` lasting `HOLD`.
fn settled(points: &[Point], signal: Duration, level: f64) -> Option<Duration> {
    let mut run_start: Option<Duration> = None;
    for p in points {
        if within(p.limit, level) {
            let s = *run_start.get_or_insert(p.t);
            if p.t - s >= HOLD {
                return Some(s - signal);
            }
        } else {
            run_start = None;
        }
    }
    None
}

/// The time from the signal to the sample after the last one out of the band (`None` if
/// the last sample is out of it).
fn stays(points: &[Point], signal: Duration, level: f64) -> Option<Duration> {
    let last_out = points.iter().rposition(|p| !within(p.limit, level));
    match last_out {
        None => points.first().map(|p| p.t - signal),
        Some(i) => points.get(i + 1).map(|p| p.t - signal),
    }
}

/// The time from the signal to the first sample at 90% of `level` or more.
fn reached(points: &[Point], signal: Duration, level: f64) -> Option<Duration> {
    points
        .iter()
        .find(|p| p.limit >= 0.9 * level)
        .map(|p| p.t - signal)
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("never".into(), |d| format!("{:.1} s", d.as_secs_f64()))
}

fn verdict(d: Option<Duration>, goal: Duration) -> &'static str {
    match d {
        Some(d) if d < goal => "pass",
        _ => "FAIL",
    }
}

pub(crate) fn run(setup: Setup, bin: &std::path::Path, runtime: &tokio::runtime::Runtime) {
    let f = Follow::from_env(&setup);
    let c = f.capacity;
    println!(
        "follow: mock capacity C = {c} (queue C) at {} ms per token, model capacity min 1 \
         max {}; {} closed-loop clients; phases full {}s / half (C/2 = {}) {}s / back {}s; \
         load average before: {}",
        f.token_delay_ms,
        4 * c,
        f.clients,
        f.full.as_secs(),
        c / 2,
        f.half.as_secs(),
        f.back.as_secs(),
        load_average(),
    );
    let gw = match start_gateway(bin, &f.config(c, None), &[("RUST_LOG", "error")]) {
        Ok(gw) if gw.mock.is_some() => gw,
        Ok(_) => {
            println!("follow: skipped (the gateway's banner names no mock model)");
            return;
        }
        Err(e) => {
            println!("follow: skipped ({e})");
            return;
        }
    };
    runtime.block_on(follow(f, setup, &gw));
}

async fn follow(f: Follow, setup: Setup, gw: &Gateway) {
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build_http();
    let Some(unloaded) = unloaded_ttft(&client, gw, setup).await else {
        println!("follow: no completion while measuring the unloaded time to first token");
        return;
    };
    let target_ms = f
        .target_factor
        .map(|factor| (unloaded.as_secs_f64() * 1000.0 * factor).ceil() as u64);
    println!(
        "unloaded time to first token (median, 4 clients, 3 s): {:.1} ms; {}",
        unloaded.as_secs_f64() * 1000.0,
        match (target_ms, f.target_factor) {
            (Some(t), Some(factor)) => format!("latency_target_ms = {t} ({factor} x)"),
            _ => "no latency target (the controller's knee alone)".into(),
        }
    );
    let c = f.capacity;
    if target_ms.is_some() {
        if let Err(e) = reload(&client, gw, &f.config(c, target_ms)).await {
            println!("follow: setting the target: {e}");
            return;
        }
    }

    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    // The signals' times since the start, once sent.
    let signals: Arc<Mutex<(Option<Duration>, Option<Duration>)>> = Arc::default();
    let answers: Arc<Mutex<[Answers; 3]>> = Arc::default();
    let url = format!("http://{}/v1/chat/completions", gw.addr);
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..f.clients {
        let (client, url, stop) = (client.clone(), url.clone(), Arc::clone(&stop));
        let (signals, answers) = (Arc::clone(&signals), Arc::clone(&answers));
        clients.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let sent = start.elapsed();
                let (outcome, _, _) =
                    one(client.clone(), url.clone(), KEY.into(), setup, start).await;
                let (t0, t1) = *signals.lock().expect("signals");
                answers.lock().expect("answers")[phase_of(sent, t0, t1)][outcome_index(outcome)] +=
                    1;
                if outcome != Outcome::Ok {
                    tokio::time::sleep(BACKOFF).await;
                }
            }
        });
    }
    let points: Arc<Mutex<Vec<Point>>> = Arc::default();
    let sampler = {
        let (client, points, stop) = (client.clone(), Arc::clone(&points), Arc::clone(&stop));
        let gw_addr = gw.addr;
        let mock = gw.mock.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let t = start.elapsed();
                let text = metrics_at(&client, gw_addr).await;
                let label = format!("model=\"{MODEL}\"");
                let (Some(limit), Some(in_flight)) = (
                    metric(&text, "gateway_capacity_limit", &label),
                    metric(&text, "gateway_capacity_in_flight", &label),
                ) else {
                    continue;
                };
                let running = match &mock {
                    Some(m) => mock_running(&client, m).await,
                    None => f64::NAN,
                };
                points.lock().expect("points").push(Point {
                    t,
                    limit,
                    in_flight,
                    running,
                });
            }
        })
    };

    let mut failed = None;
    tokio::time::sleep_until((start + f.full).into()).await;
    let t0 = start.elapsed();
    signals.lock().expect("signals").0 = Some(t0);
    let half = reload(&client, gw, &f.config(c / 2, target_ms)).await;
    if let Err(e) = &half {
        failed = Some(format!("halving: {e}"));
    }
    tokio::time::sleep_until((start + f.full + f.half).into()).await;
    let t1 = start.elapsed();
    signals.lock().expect("signals").1 = Some(t1);
    let back = reload(&client, gw, &f.config(c, target_ms)).await;
    if let Err(e) = &back {
        failed.get_or_insert(format!("restoring: {e}"));
    }
    tokio::time::sleep_until((start + f.full + f.half + f.back).into()).await;
    let end = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    // Each request is bounded by the request timeout.
    while clients.join_next().await.is_some() {}
    let points = std::mem::take(&mut *points.lock().expect("points"));
    let answers = *answers.lock().expect("answers");
    let stats_after = mock_stats(gw).await;
    let changes = metrics(&client, gw)
        .await
        .lines()
        .filter(|l| l.starts_with("gateway_capacity_changes_total{"))
        .collect::<Vec<_>>()
        .join("\n");

    if let Some(e) = failed {
        println!("follow: FAILED to reconfigure the mock ({e}); figures below are void");
    }
    println!(
        "reloads applied (SIGHUP -> reload counted): halving {}, restoring {}",
        half.map_or("-".into(), |d| format!(
            "{:.0} ms",
            d.as_secs_f64() * 1000.0
        )),
        back.map_or("-".into(), |d| format!(
            "{:.0} ms",
            d.as_secs_f64() * 1000.0
        )),
    );
    print_series(&points, t0, t1);

    let names = ["full", "half", "back"];
    let bounds = [(Duration::ZERO, t0), (t0, t1), (t1, end)];
    let mut levels = [0.0; 3];
    println!(
        "{:<5} {:>6} {:>9} {:>7} {:>7} {:>6}   limit over the last {}s: mean / min / max",
        "phase",
        "secs",
        "completed",
        "429",
        "503",
        "other",
        TAIL.as_secs()
    );
    for (i, name) in names.iter().enumerate() {
        let (from, to) = bounds[i];
        let tail = between(&points, to.saturating_sub(TAIL).max(from), to);
        let s = stats(&tail);
        if let Some((mean, _, _)) = s {
            levels[i] = mean;
        }
        let a = answers[i];
        println!(
            "{name:<5} {:>6.1} {:>9} {:>7} {:>7} {:>6}   {}",
            (to - from).as_secs_f64(),
            a[0],
            a[1],
            a[2],
            a[3],
            s.map_or("-".into(), |(m, lo, hi)| format!("{m:.1} / {lo} / {hi}")),
        )
    }
    let c_found = levels[0];
    println!(
        "C = {c}; C_found (the mean limit over the last {}s of full) = {c_found:.1} = {:.2} C",
        TAIL.as_secs(),
        c_found / c as f64
    );
    let goal_settle = Duration::from_secs(10);
    let goal_regain = Duration::from_secs(30);
    let half_points = between(&points, t0, t1);
    for (what, level) in [("C/2", c as f64 / 2.0), ("C_found/2", c_found / 2.0)] {
        let s = settled(&half_points, t0, level);
        println!(
            "after t0, against {what} = {level:.1} (band {:.1}..{:.1}): settled {} ({} the \
             goal < 10 s), stays from {}",
            0.9 * level,
            1.1 * level,
            secs(s),
            verdict(s, goal_settle),
            secs(stays(&half_points, t0, level)),
        );
    }
    let back_points = between(&points, t1, end);
    for (what, level) in [("C", c as f64), ("C_found", c_found)] {
        let r = reached(&back_points, t1, level);
        let s = settled(&back_points, t1, level);
        println!(
            "after t1, against {what} = {level:.1} (band {:.1}..{:.1}): reached 90% {} ({} \
             the goal < 30 s), settled {} ({}), stays from {}",
            0.9 * level,
            1.1 * level,
            secs(r),
            verdict(r, goal_regain),
            secs(s),
            verdict(s, goal_regain),
            secs(stays(&back_points, t1, level)),
        );
    }
    println!("controller changes:\n{changes}");
    println!("mock: {stats_after}");
    println!("load average after: {}", load_average());
}

async fn metrics_at(client: &HttpClient, addr: std::net::SocketAddr) -> String {
    let req = Request::get(format!("http://{addr}/metrics"))
        .body(Full::new(Bytes::new()))
        .expect("a request");
    let Ok(Ok(res)) = tokio::time::timeout(Duration::from_secs(5), client.request(req)).await
    else {
        return String::new();
    };
    match res.into_body().collect().await {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
        Err(_) => String::new(),
    }
}

async fn mock_running(client: &HttpClient, mock: &str) -> f64 {
    let req = Request::get(format!("{mock}/mock/stats"))
        .body(Full::new(Bytes::new()))
        .expect("a request");
    let Ok(Ok(res)) = tokio::time::timeout(Duration::from_secs(5), client.request(req)).await
    else {
        return f64::NAN;
    };
    let Ok(b) = res.into_body().collect().await else {
        return f64::NAN;
    };
    serde_json::from_slice::<Value>(&b.to_bytes())
        .ok()
        .and_then(|v| v["running"].as_f64())
        .unwrap_or(f64::NAN)
}

/// The limit once a second (the first sample of each second), 10 to a line, with the
/// signals marked; then the mock's running sequences and the gateway's in flight alike.
fn print_series(points: &[Point], t0: Duration, t1: Duration) {
    let mut per_second: Vec<Point> = Vec::new();
    for p in points {
        if per_second
            .last()
            .is_none_or(|q| q.t.as_secs() != p.t.as_secs())
        {
            per_second.push(*p);
        }
    }
    let row = |label: &str, value: fn(&Point) -> f64| {
        println!(
            "{label} (one sample a second; | marks t0 at {:.1} s and t1 at {:.1} s):",
            t0.as_secs_f64(),
            t1.as_secs_f64()
        );
        for chunk in per_second.chunks(10) {
            let first = chunk[0].t.as_secs();
            let mut line = format!("  {first:>3}s:");
            for p in chunk {
                let mark = if p.t.as_secs() == t0.as_secs() || p.t.as_secs() == t1.as_secs() {
                    '|'
                } else {
                    ' '
                };
                line.push_str(&format!("{mark}{:>3.0}", value(p)));
            }
            println!("{line}");
        }
    };
    row("limit", |p| p.limit);
    row("mock running", |p| p.running);
    row("gateway in flight", |p| p.in_flight);
}
