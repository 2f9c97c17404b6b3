//! The gateway's token and spend rules through the real binary: the tiers' `tpm`,
//! `input_tpm`, `output_tpm` and `daily_cost`, and the models' `tpm`, `input_tpm` and
//! `output_tpm`. A request is admitted while what is spent plus its reservation fits, then
//! refused with 429 naming the rule; the reservation is corrected to the usage the upstream
//! reports (JSON and SSE); a failed response refunds it.
//!
//! Every expected number is worked out here by hand. The reservations are exact because the
//! requests are legacy completions whose `prompt` is token ids (the estimate counts ids one
//! each) or chats whose only message is empty (3 tokens for the reply and 4 for the message);
//! the upstream written here reports the usage each request names, and the built-in mock
//! reports prompt words and `min(max_tokens, 16)`. The rate rules use the sliding-window log,
//! so nothing is approximated while a test runs (well within its minute).

use std::time::{Duration, Instant};

use axum::body::Body as AxumBody;
use axum::Router;
use bytes::Bytes;
use http::Response;
use serde_json::{json, Value};

use super::support::{self, spawn_server, TestServer};
use super::{call, client, rule_state, run_to_exit, Answer, Gateway, HttpClient, TempConfig};

// ─── An upstream reporting the usage each request names ──────────────────────────────────

/// Answers like an OpenAI-compatible server, with the usage the request names in
/// `test_usage: [prompt_tokens, completion_tokens]` (JSON: in the body; SSE: in a last chunk
/// before `[DONE]`). `test_status` answers that status with an error body instead.
async fn usage_upstream(body: Bytes) -> Response<AxumBody> {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if let Some(status) = body["test_status"].as_u64() {
        return Response::builder()
            .status(status as u16)
            .header("content-type", "application/json")
            .body(AxumBody::from(
                r#"{"error":{"message":"upstream says no","type":"server_error","param":null,"code":null}}"#,
            ))
            .unwrap();
    }
    let usage = body["test_usage"].as_array().map(|u| {
        let (p, c) = (u[0].as_u64().unwrap(), u[1].as_u64().unwrap());
        json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
    });
    let model = body["model"].clone();
    if body["stream"] != Value::Bool(true) {
        let mut answer = json!({"id": "cmpl-1", "object": "text_completion", "model": model,
            "choices": [{"index": 0, "text": "words", "finish_reason": "stop"}]});
        if let Some(u) = usage {
            answer["usage"] = u;
        }
        return Response::builder()
            .header("content-type", "application/json")
            .body(AxumBody::from(answer.to_string()))
            .unwrap();
    }
    let mut sse = String::new();
    for (text, finish) in [("some ", Value::Null), ("words", json!("stop"))] {
        let c = json!({"id": "cmpl-1", "object": "text_completion", "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish}]});
        sse.push_str(&format!("data: {c}\n\n"));
    }
    if let Some(u) = usage {
        let c = json!({"id": "cmpl-1", "object": "text_completion", "model": model,
            "choices": [], "usage": u});
        sse.push_str(&format!("data: {c}\n\n"));
    }
    sse.push_str("data: [DONE]\n\n");
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(AxumBody::from(sse))
        .unwrap()
}

async fn start_usage_upstream() -> TestServer {
    let app = Router::new().fallback(usage_upstream);
    spawn_server(|listener, shutdown| async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .unwrap();
    })
    .await
}

// ─── Configuration and requests ──────────────────────────────────────────────────────────

/// One model `m` on `upstream` (a base URL, or "mock") with `model` lines, a tier `t` with
/// `tier` lines (and `rpm = 1000`, so that the tier always has a rule), keys `k1` and `k2`
/// of two users of tier `t`.
fn config(upstream: &str, model: &str, tier: &str) -> String {
    format!(
        r#"
listen = "127.0.0.1:0"

[limiter]
algorithm = "sliding_window_log"
default_output_tokens = 25

[mock]
token_delay_ms = 0

[models.m]
upstream = "{upstream}"
{model}

[tiers.t]
rpm = 1000
{tier}

[keys]
k1 = {{ user = "u1", tier = "t" }}
k2 = {{ user = "u2", tier = "t" }}
"#
    )
}

/// A legacy completion whose prompt is `prompt` token ids: the gateway reserves exactly
/// `prompt` input tokens and `max_tokens` output tokens. The upstream reports `usage`.
fn completion(prompt: usize, max_tokens: u64, usage: (u64, u64)) -> Value {
    json!({"model": "m", "prompt": vec![1; prompt], "max_tokens": max_tokens,
        "test_usage": [usage.0, usage.1]})
}

/// [`completion`], streamed.
fn streamed(prompt: usize, max_tokens: u64, usage: (u64, u64)) -> Value {
    let mut body = completion(prompt, max_tokens, usage);
    body["stream"] = json!(true);
    body
}

async fn complete(c: &HttpClient, gw: &Gateway, key: &str, body: &Value) -> Answer {
    call(c, "POST", &gw.url("/v1/completions"), Some(key), Some(body)).await
}

async fn chat(c: &HttpClient, gw: &Gateway, key: &str, body: &Value) -> Answer {
    call(
        c,
        "POST",
        &gw.url("/v1/chat/completions"),
        Some(key),
        Some(body),
    )
    .await
}

fn admitted(a: &Answer) {
    assert_eq!(a.status, 200, "{:?}", String::from_utf8_lossy(&a.body));
}

/// `a` is a 429 of `rule` (unit `unit`) saying `used` was spent and `requested` asked.
fn denied(a: &Answer, rule: &str, unit: &str, used: u64, requested: u64) {
    assert_eq!(a.status, 429, "{:?}", String::from_utf8_lossy(&a.body));
    assert!(
        a.header("content-type").starts_with("application/json"),
        "{:?}",
        a.headers
    );
    let e = &a.json()["error"];
    assert_eq!(e["code"], "rate_limit_exceeded", "{e}");
    assert_eq!(e["type"], unit, "{e}");
    let message = e["message"].as_str().unwrap();
    assert!(message.contains(&format!("`{rule}`")), "{message}");
    assert!(
        message.contains(&format!("used {used}, requested {requested}.")),
        "{message}"
    );
}

/// Waits (bounded) until `rule`'s `remaining` for `key` is `want`: the memory store settles
/// when the response body ends, which may be just after the client has read it.
async fn settles_to(c: &HttpClient, gw: &Gateway, key: &str, rule: &str, want: u64) {
    let deadline = Instant::now() + support::WAIT;
    loop {
        let state = rule_state(c, gw, key, rule).await;
        if state["remaining"] == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{rule} of {key}: {state}, want remaining {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `RateLimit` item of `rule` in an answer (`"rule";r=..;t=..`): its remaining units.
fn ietf_remaining(a: &Answer, rule: &str) -> u64 {
    let header = a.header("ratelimit");
    let item = header
        .split(", ")
        .find(|i| i.starts_with(&format!("\"{rule}\";")))
        .unwrap_or_else(|| panic!("no `{rule}` in RateLimit: {header}"));
    item.split(';')
        .find_map(|p| p.strip_prefix("r="))
        .unwrap()
        .parse()
        .unwrap()
}

// ─── The tests ───────────────────────────────────────────────────────────────────────────

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tier_tpm_admits_while_spent_plus_reserved_fits_and_settles_to_usage() {
    let up = start_usage_upstream().await;
    let cfg = TempConfig::new(&config(&format!("{}/v1", up.url()), "", "tpm = 100"));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();

    // Reserves 10 + 20; the upstream reports 10 + 5: 15 of the output reservation refunded.
    let a = complete(&c, &gw, "k1", &completion(10, 20, (10, 5))).await;
    admitted(&a);
    assert_eq!(a.header("x-ratelimit-limit-tokens"), "100");
    assert_eq!(a.header("x-ratelimit-remaining-tokens"), "70");
    settles_to(&c, &gw, "k1", "user-tpm", 100 - 15).await;

    // Streamed: reserves 30 of the 85 left; the last chunk reports 8 + 12.
    let a = complete(&c, &gw, "k1", &streamed(10, 20, (8, 12))).await;
    admitted(&a);
    assert!(a.header("content-type").starts_with("text/event-stream"));
    assert_eq!(a.header("x-ratelimit-remaining-tokens"), "55");
    settles_to(&c, &gw, "k1", "user-tpm", 85 - 20).await;

    // 50 + 20 doesn't fit in the 65 left: refused, nothing charged.
    let a = complete(&c, &gw, "k1", &completion(50, 20, (50, 20))).await;
    denied(&a, "user-tpm", "tokens", 35, 70);
    assert_eq!(a.header("x-ratelimit-remaining-tokens"), "65");
    assert_eq!(rule_state(&c, &gw, "k1", "user-tpm").await["remaining"], 65);

    // 45 + 20 fits exactly.
    let a = complete(&c, &gw, "k1", &completion(45, 20, (45, 20))).await;
    admitted(&a);
    assert_eq!(a.header("x-ratelimit-remaining-tokens"), "0");
    settles_to(&c, &gw, "k1", "user-tpm", 0).await;
    let a = complete(&c, &gw, "k1", &completion(1, 1, (1, 1))).await;
    denied(&a, "user-tpm", "tokens", 100, 2);

    // The other user of the tier has the whole budget.
    assert_eq!(
        rule_state(&c, &gw, "k2", "user-tpm").await["remaining"],
        100
    );
    let a = complete(&c, &gw, "k2", &completion(1, 1, (1, 1))).await;
    admitted(&a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_above_the_reservation_is_charged() {
    let up = start_usage_upstream().await;
    let cfg = TempConfig::new(&config(
        &format!("{}/v1", up.url()),
        "",
        "tpm = 100\noutput_tpm = 50",
    ));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();
    // Reserves 5 + 5; the upstream reports 20 + 40 (a reasoning model's hidden tokens, say).
    let a = complete(&c, &gw, "k1", &streamed(5, 5, (20, 40))).await;
    admitted(&a);
    settles_to(&c, &gw, "k1", "user-tpm", 100 - 60).await;
    settles_to(&c, &gw, "k1", "user-output-tpm", 50 - 40).await;
    let a = complete(&c, &gw, "k1", &completion(1, 11, (1, 11))).await;
    denied(&a, "user-output-tpm", "output_tokens", 40, 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_and_output_tpm_count_their_side_and_the_default_reservation() {
    let up = start_usage_upstream().await;
    let cfg = TempConfig::new(&config(
        &format!("{}/v1", up.url()),
        "",
        "input_tpm = 50\noutput_tpm = 40",
    ));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();

    // Reserves 10 in, 30 out; the headers show the tighter of the two after the charge.
    let a = complete(&c, &gw, "k1", &completion(10, 30, (8, 5))).await;
    admitted(&a);
    assert_eq!(a.header("x-ratelimit-remaining-tokens"), "10");
    assert_eq!(a.header("x-ratelimit-limit-tokens"), "40");
    assert_eq!(ietf_remaining(&a, "user-input-tpm"), 40);
    assert_eq!(ietf_remaining(&a, "user-output-tpm"), 10);
    settles_to(&c, &gw, "k1", "user-input-tpm", 50 - 8).await;
    settles_to(&c, &gw, "k1", "user-output-tpm", 40 - 5).await;

    let a = complete(&c, &gw, "k1", &completion(43, 1, (43, 1))).await;
    denied(&a, "user-input-tpm", "input_tokens", 8, 43);
    let a = complete(&c, &gw, "k1", &completion(1, 36, (1, 36))).await;
    denied(&a, "user-output-tpm", "output_tokens", 5, 36);

    // A chat without `max_tokens` reserves `default_output_tokens` (25) and, for one empty
    // message, 3 + 4 input tokens. Streamed; the upstream reports 0 + 30.
    let empty = json!({"model": "m", "stream": true, "test_usage": [0, 30],
        "messages": [{"role": "user", "content": ""}]});
    let a = chat(&c, &gw, "k1", &empty).await;
    admitted(&a);
    assert_eq!(ietf_remaining(&a, "user-input-tpm"), 42 - 7);
    assert_eq!(ietf_remaining(&a, "user-output-tpm"), 35 - 25);
    settles_to(&c, &gw, "k1", "user-input-tpm", 42).await;
    settles_to(&c, &gw, "k1", "user-output-tpm", 35 - 30).await;
    let a = chat(&c, &gw, "k1", &empty).await;
    denied(&a, "user-output-tpm", "output_tokens", 35, 25);
    // ... and 7 input tokens: fits in the 42 left.
    let a = chat(
        &c,
        &gw,
        "k1",
        &json!({"model": "m", "max_tokens": 5, "test_usage": [0, 0],
            "messages": [{"role": "user", "content": ""}]}),
    )
    .await;
    admitted(&a);
    assert_eq!(ietf_remaining(&a, "user-input-tpm"), 42 - 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_upstream_response_refunds_tokens_and_spend() {
    let up = start_usage_upstream().await;
    let cfg = TempConfig::new(&config(
        &format!("{}/v1", up.url()),
        "input_price = 1.0\noutput_price = 2.0",
        "tpm = 100\ninput_tpm = 100\noutput_tpm = 100\ndaily_cost = 1000",
    ));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();
    for body in [completion(10, 20, (10, 20)), streamed(10, 20, (10, 20))] {
        let mut body = body;
        body["test_status"] = json!(500);
        let a = complete(&c, &gw, "k1", &body).await;
        assert_eq!(a.status, 500, "{:?}", a.body);
        // Charged while in flight: 30 tokens, 10 + 40 cost units.
        assert_eq!(a.header("x-ratelimit-remaining-tokens"), "70");
        assert_eq!(ietf_remaining(&a, "user-daily-cost"), 1000 - 50);
        settles_to(&c, &gw, "k1", "user-tpm", 100).await;
        settles_to(&c, &gw, "k1", "user-input-tpm", 100).await;
        settles_to(&c, &gw, "k1", "user-output-tpm", 100).await;
        settles_to(&c, &gw, "k1", "user-daily-cost", 1000).await;
    }
    // Failed requests still count as requests (`count_failed_requests = true`).
    assert_eq!(
        rule_state(&c, &gw, "k1", "user-rpm").await["remaining"],
        998
    );
}

/// Cost units of `input` and `output` tokens at 0.1 and 0.3 units a token, rounded up:
/// `(input + 3 output) / 10` in integers, so no floating point is involved.
fn cost(input: u64, output: u64) -> u64 {
    (input + 3 * output).div_ceil(10)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daily_cost_charges_the_models_prices() {
    let up = start_usage_upstream().await;
    let cfg = TempConfig::new(&config(
        &format!("{}/v1", up.url()),
        "input_price = 0.1\noutput_price = 0.3",
        "daily_cost = 100",
    ));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();

    // Reserves 24 in, 10 out: 2.4 + 3 = 5.4, so 6 units. The usage, 24 in and 2 out, costs
    // 2.4 + 0.6 = 3 units exactly (in floating point, 0.1 x 24 + 0.3 x 2 is a hair above 3).
    assert_eq!(cost(24, 10), 6);
    assert_eq!(cost(24, 2), 3);
    let a = complete(&c, &gw, "k1", &completion(24, 10, (24, 2))).await;
    admitted(&a);
    assert_eq!(ietf_remaining(&a, "user-daily-cost"), 100 - 6);
    let mut spent = cost(24, 2);
    settles_to(&c, &gw, "k1", "user-daily-cost", 100 - spent).await;

    // Streamed: reserves 100 in, 100 out (40 units); reports 100 in, 51 out (25.3: 26).
    assert_eq!(cost(100, 100), 40);
    assert_eq!(cost(100, 51), 26);
    let a = complete(&c, &gw, "k1", &streamed(100, 100, (100, 51))).await;
    admitted(&a);
    assert_eq!(ietf_remaining(&a, "user-daily-cost"), 100 - spent - 40);
    spent += cost(100, 51);
    settles_to(&c, &gw, "k1", "user-daily-cost", 100 - spent).await;

    // 300 in, 200 out: 90 units, more than the 71 left.
    assert_eq!(cost(300, 200), 90);
    let a = complete(&c, &gw, "k1", &completion(300, 200, (300, 200))).await;
    denied(&a, "user-daily-cost", "cost", spent, 90);

    // What is left, to the unit: 71 = 0.1 x 710.
    let left = 100 - spent;
    let a = complete(
        &c,
        &gw,
        "k1",
        &completion(10 * left as usize, 0, (10 * left, 0)),
    )
    .await;
    admitted(&a);
    settles_to(&c, &gw, "k1", "user-daily-cost", 0).await;
    let a = complete(&c, &gw, "k1", &completion(1, 0, (1, 0))).await;
    denied(&a, "user-daily-cost", "cost", 100, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_wide_token_limits_are_shared_by_every_caller() {
    let up = start_usage_upstream().await;
    let cfg = TempConfig::new(&config(
        &format!("{}/v1", up.url()),
        "tpm = 100\ninput_tpm = 60\noutput_tpm = 50",
        "",
    ));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();

    let a = complete(&c, &gw, "k1", &completion(20, 30, (20, 10))).await;
    admitted(&a);
    assert_eq!(ietf_remaining(&a, "model-tpm:m"), 50);
    assert_eq!(ietf_remaining(&a, "model-input-tpm:m"), 40);
    assert_eq!(ietf_remaining(&a, "model-output-tpm:m"), 20);
    assert_eq!(a.header("x-ratelimit-remaining-tokens"), "20");
    settles_to(&c, &gw, "k1", "model-tpm:m", 70).await;
    settles_to(&c, &gw, "k1", "model-output-tpm:m", 40).await;

    // Another user meets what the first spent.
    settles_to(&c, &gw, "k2", "model-input-tpm:m", 40).await;
    let a = complete(&c, &gw, "k2", &completion(41, 1, (41, 1))).await;
    denied(&a, "model-input-tpm:m", "input_tokens", 20, 41);
    let a = complete(&c, &gw, "k2", &completion(1, 41, (1, 41))).await;
    denied(&a, "model-output-tpm:m", "output_tokens", 10, 41);
    let a = complete(&c, &gw, "k2", &completion(40, 40, (40, 40))).await;
    denied(&a, "model-tpm:m", "tokens", 30, 80);

    // 35 + 35 fits all three; streamed.
    let a = complete(&c, &gw, "k2", &streamed(35, 35, (35, 35))).await;
    admitted(&a);
    assert_eq!(a.header("x-ratelimit-remaining-tokens"), "0");
    settles_to(&c, &gw, "k1", "model-tpm:m", 0).await;
    settles_to(&c, &gw, "k1", "model-input-tpm:m", 5).await;
    settles_to(&c, &gw, "k1", "model-output-tpm:m", 5).await;
    let a = complete(&c, &gw, "k1", &completion(1, 1, (1, 1))).await;
    denied(&a, "model-tpm:m", "tokens", 100, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mock_models_usage_settles_every_token_rule() {
    // Prices exact in binary, so that the expected costs are exact too.
    let cfg = TempConfig::new(&config(
        "mock",
        "input_price = 0.5\noutput_price = 2.5\ntpm = 10000",
        "tpm = 1000\ninput_tpm = 500\noutput_tpm = 300\ndaily_cost = 10000",
    ));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();
    let chat_of = |content: &str, max_tokens: u64, stream: bool| {
        json!({"model": "m", "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": content}]})
    };
    // The mock answers 0 prompt tokens (no words) and min(100, 16) completion tokens; the
    // reservation was 7 + 100.
    let a = chat(&c, &gw, "k1", &chat_of("", 100, false)).await;
    admitted(&a);
    assert_eq!(a.json()["usage"]["completion_tokens"], 16);
    assert_eq!(ietf_remaining(&a, "user-tpm"), 1000 - 107);
    assert_eq!(ietf_remaining(&a, "user-output-tpm"), 300 - 100);
    // ceil(7 x 0.5 + 100 x 2.5) = 254 cost units reserved.
    assert_eq!(ietf_remaining(&a, "user-daily-cost"), 10000 - 254);
    let (mut tokens, mut input, mut output, mut cost) = (16, 0, 16, 40);
    settles_to(&c, &gw, "k1", "user-tpm", 1000 - tokens).await;
    settles_to(&c, &gw, "k1", "user-input-tpm", 500 - input).await;
    settles_to(&c, &gw, "k1", "user-output-tpm", 300 - output).await;
    settles_to(&c, &gw, "k1", "user-daily-cost", 10000 - cost).await;
    settles_to(&c, &gw, "k1", "model-tpm:m", 10000 - tokens).await;

    // Streamed: 5 words, 4 tokens: 9 tokens, 2.5 + 10 = 12.5 cost units, so 13.
    let a = chat(&c, &gw, "k1", &chat_of("one two three four five", 4, true)).await;
    admitted(&a);
    assert!(String::from_utf8_lossy(&a.body).ends_with("data: [DONE]\n\n"));
    (tokens, input, output, cost) = (tokens + 9, input + 5, output + 4, cost + 13);
    settles_to(&c, &gw, "k1", "user-tpm", 1000 - tokens).await;
    settles_to(&c, &gw, "k1", "user-input-tpm", 500 - input).await;
    settles_to(&c, &gw, "k1", "user-output-tpm", 300 - output).await;
    settles_to(&c, &gw, "k1", "user-daily-cost", 10000 - cost).await;

    // A legacy completion of 3 words and 2 tokens: 1.5 + 5 = 6.5, so 7.
    let a = complete(
        &c,
        &gw,
        "k1",
        &json!({"model": "m", "prompt": "a b c", "max_tokens": 2}),
    )
    .await;
    admitted(&a);
    (tokens, input, output, cost) = (tokens + 5, input + 3, output + 2, cost + 7);
    settles_to(&c, &gw, "k1", "user-tpm", 1000 - tokens).await;
    settles_to(&c, &gw, "k1", "user-input-tpm", 500 - input).await;
    settles_to(&c, &gw, "k1", "user-output-tpm", 300 - output).await;
    settles_to(&c, &gw, "k1", "user-daily-cost", 10000 - cost).await;
    settles_to(&c, &gw, "k2", "model-tpm:m", 10000 - tokens).await;
    // The other user's own budgets are untouched.
    settles_to(&c, &gw, "k2", "user-tpm", 1000).await;

    // Output: 300 - 22 = 278 left; 279 doesn't fit.
    let a = chat(&c, &gw, "k1", &chat_of("", 279, false)).await;
    denied(&a, "user-output-tpm", "output_tokens", output, 279);
}

// ─── Per-key overrides of a tier's limits ────────────────────────────────────────────────

/// Tier `pro` (100 tokens a minute, no request limit); user acme's two keys raise its tokens
/// and add a request and a concurrency limit, user carl's key lowers its tokens, user bob keeps the tier's.
const OVERRIDES: &str = r#"
[tiers.pro]
tpm = 100

[keys]
big-1 = { user = "acme", tier = "pro", tpm = 1_000, rpm = 3, concurrent = 5 }
big-2 = { user = "acme", tier = "pro", tpm = 1_000, rpm = 3, concurrent = 5 }
tiny = { user = "carl", tier = "pro", tpm = 10 }
small = { user = "bob", tier = "pro" }
"#;

fn overrides_config(upstream: &str) -> String {
    format!(
        r#"
listen = "127.0.0.1:0"

[limiter]
algorithm = "sliding_window_log"

[models.m]
upstream = "{upstream}/v1"
{OVERRIDES}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_overrides_apply_to_its_user_and_others_keep_the_tiers_limits() {
    let up = start_usage_upstream().await;
    let cfg = TempConfig::new(&overrides_config(&up.url()));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();

    // The banner shows each key's effective limits.
    for want in [
        "user acme, tier pro with rpm, tpm, concurrent overridden (3 requests/min, \
         1000 tokens/min, 5 concurrent)",
        "user carl, tier pro with tpm overridden (10 tokens/min)",
        "user bob, tier pro (100 tokens/min)",
    ] {
        assert!(gw.banner.contains(want), "{want:?} not in:\n{}", gw.banner);
    }

    // So does /v1/ratelimit.
    let status = |key: &'static str| {
        let c = c.clone();
        let url = gw.url("/v1/ratelimit");
        async move { call(&c, "GET", &url, Some(key), None).await.json() }
    };
    let big = status("big-2").await;
    assert_eq!(big["tier"], "pro", "{big}");
    assert_eq!(
        big["overrides"],
        json!({"rpm": 3, "tpm": 1000, "concurrent": 5}),
        "{big}"
    );
    let limits = |s: &Value| -> Vec<(String, u64)> {
        s["rules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["rule"].as_str().unwrap().to_owned(),
                    r["limit"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let pair = |r: &str, n: u64| (r.to_owned(), n);
    assert_eq!(
        limits(&big),
        [
            pair("user-rpm", 3),
            pair("user-tpm", 1000),
            pair("user-concurrent", 5)
        ],
        "{big}"
    );
    let small = status("small").await;
    assert_eq!(small["overrides"], json!({}), "{small}");
    assert_eq!(limits(&small), [pair("user-tpm", 100)], "{small}");
    assert_eq!(limits(&status("tiny").await), [pair("user-tpm", 10)]);

    // acme: 300 tokens fit its 1000.
    let a = complete(&c, &gw, "big-1", &completion(200, 100, (200, 100))).await;
    admitted(&a);
    assert_eq!(a.header("x-ratelimit-limit-tokens"), "1000");
    assert_eq!(a.header("x-ratelimit-limit-requests"), "3");
    // Its other key spends the same budget.
    settles_to(&c, &gw, "big-2", "user-tpm", 700).await;
    let a = complete(&c, &gw, "big-2", &completion(500, 200, (500, 200))).await;
    admitted(&a);
    settles_to(&c, &gw, "big-1", "user-tpm", 0).await;
    // Three requests a minute, from either key.
    let a = complete(&c, &gw, "big-1", &completion(0, 0, (0, 0))).await;
    admitted(&a);
    let a = complete(&c, &gw, "big-2", &completion(0, 0, (0, 0))).await;
    denied(&a, "user-rpm", "requests", 3, 1);

    // bob: the tier's 100 tokens, and no request limit.
    let a = complete(&c, &gw, "small", &completion(50, 30, (50, 30))).await;
    admitted(&a);
    assert_eq!(a.header("x-ratelimit-limit-tokens"), "100");
    assert!(a.headers.get("x-ratelimit-limit-requests").is_none());
    settles_to(&c, &gw, "small", "user-tpm", 20).await;
    let a = complete(&c, &gw, "small", &completion(20, 10, (20, 10))).await;
    denied(&a, "user-tpm", "tokens", 80, 30);
    for _ in 0..4 {
        let a = complete(&c, &gw, "small", &completion(1, 1, (1, 1))).await;
        admitted(&a);
    }

    // carl: 10.
    let a = complete(&c, &gw, "tiny", &completion(5, 5, (5, 5))).await;
    admitted(&a);
    settles_to(&c, &gw, "tiny", "user-tpm", 0).await;
    let a = complete(&c, &gw, "tiny", &completion(1, 1, (1, 1))).await;
    denied(&a, "user-tpm", "tokens", 10, 2);
}

/// The limiter's metrics count a caller under its configured tier: a user whose keys
/// override limits is limited as a tier of its own (`pro+acme`), but that name is the
/// limiter's, not a tier of the file: it must not split `sum by (tier)` (the alert on a
/// tier's denials) nor put user names into label values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_user_with_overrides_under_its_tier() {
    let up = start_usage_upstream().await;
    let cfg = TempConfig::new(&overrides_config(&up.url()));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();
    // acme (overrides) admitted 3 times, then denied by its rpm of 3; bob (none) admitted.
    for _ in 0..3 {
        admitted(&complete(&c, &gw, "big-1", &completion(0, 0, (0, 0))).await);
    }
    let a = complete(&c, &gw, "big-2", &completion(0, 0, (0, 0))).await;
    denied(&a, "user-rpm", "requests", 3, 1);
    admitted(&complete(&c, &gw, "small", &completion(0, 0, (0, 0))).await);
    let text =
        String::from_utf8_lossy(&call(&c, "GET", &gw.url("/metrics"), None, None).await.body)
            .into_owned();
    assert!(
        text.contains("gateway_ratelimit_admitted_total{tier=\"pro\"} 4"),
        "{text}"
    );
    assert!(
        text.contains("gateway_ratelimit_denied_total{rule=\"user-rpm\",tier=\"pro\"} 1"),
        "{text}"
    );
    assert!(!text.contains("acme"), "{text}");
}

#[test]
fn bad_overrides_are_configuration_errors_naming_the_field() {
    let valid = TempConfig::new(&overrides_config("http://127.0.0.1:9"));
    let (code, out, err) = run_to_exit(&["--check-config", "--config", valid.path()]);
    assert_eq!(code, Some(0), "{out}\n{err}");

    let check = |text: String, wants: &[&str]| {
        let cfg = TempConfig::new(&text);
        let (code, out, err) = run_to_exit(&["--check-config", "--config", cfg.path()]);
        assert_eq!(code, Some(2), "stdout:\n{out}\nstderr:\n{err}");
        for want in wants {
            assert!(err.contains(want), "{want:?} not in:\n{err}");
        }
    };
    let base = overrides_config("http://127.0.0.1:9");
    // Not a limit.
    check(
        base.replace("tpm = 10 }", "tmp = 10 }"),
        &["`keys[***].tmp`", "unknown field `tmp`, expected one of"],
    );
    // Not a number.
    check(
        base.replace("tpm = 10 }", "tpm = \"ten\" }"),
        &["`keys[***].tpm`", "expected u64"],
    );
    // Every other problem at once: a user's keys that disagree (a value; a limit one sets
    // and the other doesn't), a zero, a tier of overrides named like a configured tier, and
    // two users whose tiers of overrides would have one name.
    check(
        base.replace(
            "big-2 = { user = \"acme\", tier = \"pro\", tpm = 1_000, rpm = 3, concurrent = 5 }",
            "big-2 = { user = \"acme\", tier = \"pro\", tpm = 2_000, concurrent = 5 }",
        )
        .replace("tpm = 10 }", "tpm = 0 }")
        .replace(
            "[tiers.pro]",
            "[tiers.\"pro+carl\"]\nrpm = 1\n[tiers.\"pro+x\"]\nrpm = 1\n[tiers.pro]",
        )
        .replace(
            "small = {",
            "c1 = { user = \"y\", tier = \"pro+x\", tpm = 1 }\n\
             c2 = { user = \"x+y\", tier = \"pro\", tpm = 1 }\nsmall = {",
        ),
        &[
            "field `keys[***].tpm`: the keys of user \"acme\" share its limits, so they must \
             override the same ones: this key sets 2000, key [***] sets 1000\n",
            "field `keys[***].rpm`: the keys of user \"acme\" share its limits, so they must \
             override the same ones: this key sets none, key [***] sets 3\n",
            "field `keys[***].tpm (user \"carl\")`: must be > 0 (omit it to keep the tier's)\n",
            "field `keys[***]`: the limits of user \"carl\" with its overrides make a tier named \
             \"pro+carl\", which is also a configured tier: rename that tier",
            "field `keys[***]`: user \"x+y\" of tier \"pro\" and user \"y\" of tier \"pro+x\" both \
             make a tier named \"pro+x+y\" with their overrides: rename one",
        ],
    );
}

/// A configuration error never prints an API key: not in a field's path, not in a problem's
/// message, not in toml's copy of the offending line (a line under `[keys]` is a key's).
#[test]
fn configuration_errors_never_print_an_api_key() {
    const KEY: &str = "sk-live-0123456789abcdef";
    let base = overrides_config("http://127.0.0.1:9").replace(
        "tiny = {",
        &format!("\"{KEY}\" = {{ user = \"dora\", tier = \"pro\" }}\ntiny = {{"),
    );
    let valid = TempConfig::new(&base);
    let (code, out, err) = run_to_exit(&["--check-config", "--config", valid.path()]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let line = format!("\"{KEY}\" = {{ user = \"dora\", tier = \"pro\" }}");
    for (bad, wants) in [
        // A syntax error on the key's line: toml would quote the line.
        (
            line.replace("user = ", "user == "),
            vec!["TOML parse error at line 16, column "],
        ),
        // An unknown field: its path goes through the key.
        (
            line.replace("tier = ", "tierx = "),
            vec!["`keys[sk-l...].tierx`", "unknown field `tierx`"],
        ),
        // A problem found after parsing.
        (
            line.replace("\"pro\"", "\"gold\""),
            vec![
                "`keys[sk-l...].tier (user \"dora\")`",
                "unknown tier \"gold\"",
            ],
        ),
        (
            line.replace(" }", ", rpm = 0 }"),
            vec!["`keys[sk-l...].rpm (user \"dora\")`", "must be > 0"],
        ),
        // The key written where a number goes: serde quotes the value it got.
        (
            line.replace(" }", &format!(", rpm = \"{KEY}\" }}")),
            vec!["invalid type: string \"sk-l...\", expected u64"],
        ),
        // The upstream's key put in the wrong field of a model.
        (
            format!("{line}\u{0}[models.m2]\nupstream = \"http://127.0.0.1:9/v1\"\napi_key_env = \"{KEY}\"\n"),
            vec!["`models.m2.api_key_env`", "\"sk-l...\" is no such name"],
        ),
        (
            format!("{line}\u{0}[models.m2]\nupstream = \"http://127.0.0.1:9/v1\"\napi_key = \"x\"\napi_key_header = \"Bearer {KEY}\"\n"),
            vec!["`models.m2.api_key_header`", "\"Bear...\" is not a valid header name"],
        ),
        (
            format!("{line}\u{0}[models.m2]\nupstream = \"{KEY}\"\n"),
            vec!["`models.m2.upstream`", "\"sk-l...\" is neither \"mock\" nor"],
        ),
    ] {
        // What follows a NUL goes at the end of the file (a table of its own).
        let (bad, appended) = bad.split_once('\0').unwrap_or((&bad, ""));
        let cfg = TempConfig::new(&format!("{}\n{appended}", base.replace(&line, bad)));
        let (code, out, err) = run_to_exit(&["--check-config", "--config", cfg.path()]);
        assert_eq!(code, Some(2), "stdout:\n{out}\nstderr:\n{err}");
        for want in wants {
            assert!(err.contains(want), "{want:?} not in:\n{err}");
        }
        assert!(
            !err.contains("0123456789") && !out.contains("0123456789"),
            "the key is printed:\n{out}\n{err}"
        );
    }
}
