//! A model's adaptive capacity and the tiers' priority in the gateway: the saturating mock
//! behind a model whose `[models.m.capacity]` is at most the mock's capacity; a free flood is
//! shed by the gateway (429) past the saturation threshold while pro keeps its reserved
//! share (200), and the mock, never given more than it runs, answers no 503. Real gateway
//! process, real sockets; the streams use a token delay no test waits out, so they stay open
//! until the test drops them. No durations are asserted: counts and statuses, every wait
//! bounded by [`support::WAIT`].

use std::time::{Duration, Instant};

use http::StatusCode;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{json, Value};

use super::support::{self, within};
use super::{call, send, Gateway, HttpClient, TempConfig};

/// A token delay no test waits out.
const FOREVER_MS: u64 = 600_000;

/// The mock runs 4 at full speed (4 more beyond, slower, before its 503s); the model's
/// capacity is 4, saturated past 2: pro keeps half of it and may wait a minute for a slot,
/// free has no reserve and no wait; carol is a pro user with limits of her own.
fn config() -> String {
    format!(
        r#"
listen = "127.0.0.1:0"

[limiter]
shutdown_grace_secs = 1

[mock]
token_delay_ms = {FOREVER_MS}
capacity = 4
queue = 4

[models.m]
upstream = "mock"

[models.m.capacity]
min = 1
max = 4
latency_target_ms = 600_000
saturation = 0.5

[tiers.free]
rpm = 100000

[tiers.pro]
rpm = 100000
priority = 2
capacity_share = 0.5
max_wait_ms = 60_000

[keys]
free-key = {{ user = "alice", tier = "free" }}
pro-key = {{ user = "bob", tier = "pro" }}
carol-key = {{ user = "carol", tier = "pro", rpm = 90000 }}
"#
    )
}

/// The mock's base URL, from the gateway's banner.
fn mock_url(gw: &Gateway) -> String {
    gw.banner
        .split("built-in mock model at ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no mock URL in the banner:\n{}", gw.banner))
        .to_owned()
}

/// The mock's `GET /v1/mock/stats`.
async fn stats(c: &HttpClient, gw: &Gateway) -> Value {
    let a = call(
        c,
        "GET",
        &format!("{}/mock/stats", mock_url(gw)),
        None,
        None,
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    a.json()
}

fn stream_body() -> Value {
    json!({"model": "m", "stream": true, "max_tokens": 16,
        "messages": [{"role": "user", "content": "tell me a long story"}]})
}

/// Opens `n` streams at once with API key `key`; their responses (heads read, bodies left
/// open), in no order.
async fn open_streams(
    c: &HttpClient,
    gw: &Gateway,
    key: &'static str,
    n: usize,
) -> Vec<hyper::Response<Incoming>> {
    let url = gw.url("/v1/chat/completions");
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(
                async move { send(&c, "POST", &url, Some(key), Some(&stream_body())).await },
            )
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(within("a stream's head", t).await.expect("the stream task"));
    }
    out
}

/// A refusal read whole: its status, `Retry-After` and JSON body.
async fn refusal(r: hyper::Response<Incoming>) -> (StatusCode, Option<String>, Value) {
    let (parts, body) = r.into_parts();
    let bytes = within("a body", body.collect())
        .await
        .expect("the body")
        .to_bytes();
    let json = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&bytes)));
    let retry = parts
        .headers
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (parts.status, retry, json)
}

/// The value of the metric line starting with `series` (name and labels).
async fn metric(c: &HttpClient, gw: &Gateway, series: &str) -> Option<f64> {
    let a = call(c, "GET", &gw.url("/metrics"), None, None).await;
    let text = String::from_utf8_lossy(&a.body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Polls the metrics (bounded) until `series` reads `want`.
async fn metric_until(c: &HttpClient, gw: &Gateway, series: &str, want: f64) {
    let deadline = Instant::now() + support::WAIT;
    loop {
        let v = metric(c, gw, series).await;
        if v == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "`{series}` is {v:?}, not {want}, after {:?}",
            support::WAIT
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_free_flood_is_shed_while_pro_keeps_its_share_and_the_mock_never_overloads() {
    let cfg = TempConfig::new(&config());
    let gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();

    // Free floods: 8 streams at once. The model's 4 are saturated past 2: free, without a
    // reserve, gets 2; the 6 others are shed by the gateway at once (free may not wait).
    let flood = open_streams(&c, &gw, "free-key", 8).await;
    let (mut open, shed): (Vec<_>, Vec<_>) = flood
        .into_iter()
        .partition(|r| r.status() == StatusCode::OK);
    assert_eq!(open.len(), 2, "free streams admitted");
    assert_eq!(shed.len(), 6);
    for r in shed {
        let (status, retry, body) = refusal(r).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
        assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
        let secs: u64 = retry.expect("Retry-After").parse().expect("whole seconds");
        assert!(secs >= 1, "{secs}");
    }

    // Pro keeps being served: its reserve is half the capacity, which a pro user with limits
    // of its own (carol, the tier `pro+carol`) shares with the tier's other callers.
    let mut pro = open_streams(&c, &gw, "pro-key", 1).await;
    pro.extend(open_streams(&c, &gw, "carol-key", 1).await);
    assert!(
        pro.iter().all(|r| r.status() == StatusCode::OK),
        "{:?}",
        pro.iter().map(|r| r.status()).collect::<Vec<_>>()
    );
    open.extend(pro);
    // Free is still refused, the capacity full.
    let (status, _, body) = refusal(open_streams(&c, &gw, "free-key", 1).await.remove(0)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");

    // The mock was never given more than the capacity: 4 running, no 503.
    let s = stats(&c, &gw).await;
    assert_eq!(s["running"], 4, "{s}");
    assert_eq!(s["rejected"], 0, "{s}");

    // /v1/ratelimit shows the model's capacity.
    let a = call(
        &c,
        "GET",
        &gw.url("/v1/ratelimit?model=m"),
        Some("pro-key"),
        None,
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let rules = a.json()["rules"].clone();
    let cap = rules
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rule"] == "model-capacity:m")
        .unwrap_or_else(|| panic!("no capacity rule in {rules}"))
        .clone();
    assert_eq!(cap["kind"], "capacity", "{cap}");
    assert_eq!(cap["model"], "m", "{cap}");
    assert_eq!(
        cap["capacity"],
        json!({"current": 4, "in_flight": 4, "min": 1, "max": 4}),
        "{cap}"
    );

    // Metrics: the limit, in flight, shed by tier.
    assert_eq!(
        metric(&c, &gw, "gateway_capacity_limit{model=\"m\"}").await,
        Some(4.0)
    );
    assert_eq!(
        metric(&c, &gw, "gateway_capacity_in_flight{model=\"m\"}").await,
        Some(4.0)
    );
    assert_eq!(
        metric(
            &c,
            &gw,
            "gateway_capacity_shed_total{model=\"m\",tier=\"free\"}"
        )
        .await,
        Some(7.0)
    );

    // A third pro caller past its reserve may wait (`max_wait_ms`) rather than be refused:
    // it shows in the queue's length, and is served once a pro stream ends. (The queue's
    // order, deadlines and departures are the library's tests, on a paused clock.)
    let waiter = {
        let (c, url) = (c.clone(), gw.url("/v1/chat/completions"));
        tokio::spawn(
            async move { send(&c, "POST", &url, Some("pro-key"), Some(&stream_body())).await },
        )
    };
    metric_until(&c, &gw, "gateway_capacity_queue_length{model=\"m\"}", 1.0).await;
    drop(open.pop()); // carol's stream (the last opened) ends: the reserve has room again
    let served = within("the waiting pro caller", waiter)
        .await
        .expect("the waiter's task");
    assert_eq!(served.status(), StatusCode::OK);
    open.push(served);
    metric_until(&c, &gw, "gateway_capacity_queue_length{model=\"m\"}", 0.0).await;
    let s = stats(&c, &gw).await;
    assert_eq!(s["rejected"], 0, "{s}");
    drop(open);
    metric_until(&c, &gw, "gateway_capacity_in_flight{model=\"m\"}", 0.0).await;
}

fn client() -> HttpClient {
    super::client()
}

#[test]
fn each_bad_capacity_field_is_named() {
    let good = config();
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            good.replace("min = 1\nmax = 4", "min = 5\nmax = 4"),
            vec!["`models.m.capacity.min`", "must be at most max (4), got 5"],
        ),
        (
            good.replace("min = 1\nmax = 4\n", "min = 1\n"),
            vec!["`models.m.capacity.max`", "is required"],
        ),
        (
            good.replace("min = 1\n", "min = 0\n"),
            vec!["`models.m.capacity.min`", "must be > 0"],
        ),
        (
            good.replace("saturation = 0.5", "saturation = 1.5"),
            vec![
                "`models.m.capacity.saturation`",
                "must be in (0, 1], got 1.5",
            ],
        ),
        (
            good.replace("saturation = 0.5", "decrease = 1.0"),
            vec!["`models.m.capacity.decrease`", "must be in (0, 1), got 1"],
        ),
        (
            good.replace("saturation = 0.5", "latency_tolerance = 1.0"),
            vec!["`models.m.capacity.latency_tolerance`", "must be > 1"],
        ),
        (
            good.replace("saturation = 0.5", "interval_ms = 0"),
            vec!["`models.m.capacity.interval_ms`", "must be > 0"],
        ),
        (
            good.replace("latency_target_ms = 600_000", "latency_target_ms = 0"),
            vec!["`models.m.capacity.latency_target_ms`", "must be > 0"],
        ),
        (
            good.replace("saturation = 0.5", "initial = 9"),
            vec![
                "`models.m.capacity.initial`",
                "within [min, max] = [1, 4], got 9",
            ],
        ),
        (
            good.replace("saturation = 0.5", "bogus = 1"),
            vec!["unknown field `bogus`"],
        ),
        (
            good.replace("saturation = 0.5", "queue_len = 0"),
            vec![
                "`models.m.capacity.queue_len`",
                "must be within [1, 10000], got 0",
            ],
        ),
        (
            good.replace("saturation = 0.5", "queue_len = 10001"),
            vec![
                "`models.m.capacity.queue_len`",
                "must be within [1, 10000], got 10001",
            ],
        ),
        (
            good.replace("capacity_share = 0.5", "capacity_share = 0"),
            vec!["`tiers.pro.capacity_share`", "must be in (0, 1], got 0"],
        ),
        (
            good.replace("[tiers.free]\n", "[tiers.free]\ncapacity_share = 0.6\n"),
            vec![
                "`tiers.*.capacity_share`",
                "add up to 1.1, more than 1",
                "free 0.6",
                "pro 0.5",
            ],
        ),
        (
            good.replace("max_wait_ms = 60_000", "max_wait_ms = 0"),
            vec!["`tiers.pro.max_wait_ms`", "must be in [1, 60000]"],
        ),
        (
            good.replace("priority = 2", "priority = 300"),
            vec!["`tiers.pro.priority`"],
        ),
    ];
    let ok = TempConfig::new(&good);
    let (code, out, err) = super::run_to_exit(&["--check-config", "--config", ok.path()]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    for (text, wants) in cases {
        let cfg = TempConfig::new(&text);
        let (code, _, err) = super::run_to_exit(&["--check-config", "--config", cfg.path()]);
        assert_eq!(code, Some(2), "config:\n{text}\nstderr:\n{err}");
        for want in wants {
            assert!(
                err.contains(want),
                "{want:?} not in the error for:\n{text}\n---\n{err}"
            );
        }
    }
}

/// `[models.m.capacity]` with `max`, over a mock with a single place and no queue: a second
/// completion at once is answered 503, an overload for the controller, judged every 1 ms.
fn reload_config(max: u64, free_rpm: u64) -> String {
    format!(
        r#"
listen = "127.0.0.1:0"

[limiter]
shutdown_grace_secs = 1

[mock]
token_delay_ms = {FOREVER_MS}
capacity = 1
queue = 0

[models.m]
upstream = "mock"

[models.m.capacity]
min = 1
max = {max}
interval_ms = 1
latency_target_ms = 600_000

[tiers.free]
rpm = {free_rpm}

[keys]
free-key = {{ user = "alice", tier = "free" }}
"#
    )
}

/// `gateway_config_reloads_total{result="ok"}`.
async fn reloads_ok(c: &HttpClient, gw: &Gateway) -> Option<f64> {
    metric(c, gw, "gateway_config_reloads_total{result=\"ok\"}").await
}

/// Rewrites the file, sends SIGHUP, waits (bounded) until the reload is counted.
async fn reload(c: &HttpClient, gw: &Gateway, file: &TempConfig, text: &str) {
    let before = reloads_ok(c, gw).await;
    std::fs::write(file.path(), text).expect("rewriting the config");
    let ok = std::process::Command::new("kill")
        .args(["-HUP", &gw.child.id().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -HUP failed");
    let deadline = Instant::now() + support::WAIT;
    while reloads_ok(c, gw).await == before {
        assert!(
            Instant::now() < deadline,
            "no reload counted; stderr:\n{}",
            gw.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The model's current capacity, from `/v1/ratelimit`.
async fn current_capacity(c: &HttpClient, gw: &Gateway) -> Value {
    let a = call(
        c,
        "GET",
        &gw.url("/v1/ratelimit?model=m"),
        Some("free-key"),
        None,
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let rules = a.json()["rules"].clone();
    rules
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rule"] == "model-capacity:m")
        .unwrap_or_else(|| panic!("no capacity rule in {rules}"))["capacity"]["current"]
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_the_learned_capacity_unless_the_capacity_changed() {
    let cfg = TempConfig::new(&reload_config(8, 100_000));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();
    assert_eq!(current_capacity(&c, &gw).await, 8);

    // The mock's one place taken; then completions answered 503 until the controller cuts.
    let held = open_streams(&c, &gw, "free-key", 1).await;
    assert_eq!(held[0].status(), StatusCode::OK);
    let overloads = "gateway_capacity_changes_total{model=\"m\",change=\"overload\"}";
    let deadline = Instant::now() + support::WAIT;
    while metric(&c, &gw, overloads).await.is_none() {
        let (status, _, body) = refusal(open_streams(&c, &gw, "free-key", 1).await.remove(0)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(
            Instant::now() < deadline,
            "no overload cut; {}",
            gw.stderr()
        );
    }
    let learned = current_capacity(&c, &gw).await;
    let learned = learned.as_u64().unwrap_or_else(|| panic!("{learned}"));
    assert!((1..8).contains(&learned), "{learned}");
    assert_eq!(
        metric(&c, &gw, "gateway_capacity_limit{model=\"m\"}").await,
        Some(learned as f64)
    );

    // A reload that leaves the capacity alone keeps what was learned.
    reload(&c, &gw, &cfg, &reload_config(8, 99_999)).await;
    assert_eq!(current_capacity(&c, &gw).await, learned);
    assert_eq!(
        metric(&c, &gw, "gateway_capacity_limit{model=\"m\"}").await,
        Some(learned as f64)
    );
    // One that changes it starts afresh, at the new max.
    reload(&c, &gw, &cfg, &reload_config(7, 99_999)).await;
    assert_eq!(current_capacity(&c, &gw).await, 7);
    assert_eq!(
        metric(&c, &gw, "gateway_capacity_limit{model=\"m\"}").await,
        Some(7.0)
    );
    drop(held);
}
