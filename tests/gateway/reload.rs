//! SIGHUP in a running gateway: the configuration file rewritten, `kill -HUP`, and the next
//! requests served by the new configuration (keys, tiers, limits, models), with the counts
//! of unchanged rules carried over; a bad file refused; keys that need a restart named and
//! kept. Real gateway process, real sockets; every wait for a reload polls `/metrics` (or
//! the log), bounded by [`support::WAIT`].

use std::process::Command;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use serde_json::{json, Value};

use super::support::{self, within};
use super::{
    assert_openai_error, call, chat, client, rule_state, send, start_upstream, Gateway, HttpClient,
    TempConfig,
};

/// A configuration on the test upstream: `test-model` (no limit of its own), the tiers and
/// keys given (TOML), and `rest` appended.
fn config(upstream: &str, tiers_and_keys: &str, rest: &str) -> String {
    format!(
        r#"
listen = "127.0.0.1:0"

[limiter]
default_output_tokens = 10
shutdown_grace_secs = 5

[models.test-model]
upstream = "{upstream}/v1"
timeout_secs = 5

{tiers_and_keys}
{rest}
"#
    )
}

/// `gateway_config_reloads_total{result=...}` from `/metrics`.
async fn reloads(c: &HttpClient, gw: &Gateway, result: &str) -> u64 {
    let a = call(c, "GET", &gw.url("/metrics"), None, None).await;
    assert_eq!(a.status, 200);
    let text = String::from_utf8_lossy(&a.body).into_owned();
    let series = format!("gateway_config_reloads_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .unwrap_or_else(|| panic!("no {series} in the metrics:\n{text}"))
        .trim()
        .parse()
        .expect("a count")
}

/// Sends SIGHUP to the gateway.
fn hup(gw: &Gateway) {
    let ok = Command::new("kill")
        .args(["-HUP", &gw.child.id().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -HUP failed");
}

/// Writes `text` to `file`, sends SIGHUP, and waits (bounded) until the gateway counted the
/// reload as `result` ("ok" or "failed").
async fn reload(c: &HttpClient, gw: &Gateway, file: &TempConfig, text: &str, result: &str) {
    let before = reloads(c, gw, result).await;
    std::fs::write(&file.0, text).expect("rewriting the config");
    hup(gw);
    let deadline = Instant::now() + support::WAIT;
    while reloads(c, gw, result).await == before {
        assert!(
            Instant::now() < deadline,
            "no {result:?} reload counted within {:?}; stderr:\n{}",
            support::WAIT,
            gw.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (bounded) until the gateway's log satisfies `shows` (the log reaches the test
/// through a pipe and a thread: a line written before a reload was counted may still be on
/// its way); returns the log.
async fn log_where(gw: &Gateway, what: &str, shows: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + support::WAIT;
    loop {
        let log = gw.stderr();
        if shows(&log) {
            return log;
        }
        assert!(Instant::now() < deadline, "{what} not in the log:\n{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A line of `log` at `level` containing `text`.
fn has_line(log: &str, level: &str, text: &str) -> bool {
    log.lines().any(|l| l.contains(level) && l.contains(text))
}

/// The status of a chat request to `model` with `key`.
async fn status(c: &HttpClient, gw: &Gateway, key: &str, model: &str) -> u16 {
    let a = call(
        c,
        "POST",
        &gw.url("/v1/chat/completions"),
        Some(key),
        Some(&chat(model, "hi", 5)),
    )
    .await;
    a.status.as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_added_removed_and_moved_to_another_tier() {
    let (up_server, _up) = start_upstream().await;
    let before = r#"
[tiers.free]
rpm = 5
[tiers.basic]
rpm = 4
[keys]
k-old = { user = "alice", tier = "free" }
k-move = { user = "bob", tier = "free" }
"#;
    let after = r#"
[tiers.free]
rpm = 5
[tiers.basic]
rpm = 4
[keys]
k-new = { user = "carol", tier = "free" }
k-move = { user = "bob", tier = "basic" }
"#;
    let url = up_server.url();
    let file = TempConfig::new(&config(&url, before, ""));
    let gw = Gateway::start(&["--config", file.path()]);
    let c = client();

    assert_eq!(status(&c, &gw, "k-new", "test-model").await, 401);
    assert_eq!(status(&c, &gw, "k-old", "test-model").await, 200);
    for _ in 0..3 {
        assert_eq!(status(&c, &gw, "k-move", "test-model").await, 200);
    }
    assert_eq!(
        rule_state(&c, &gw, "k-move", "user-rpm").await["remaining"],
        2
    );

    reload(&c, &gw, &file, &config(&url, after, ""), "ok").await;
    assert_eq!(status(&c, &gw, "k-new", "test-model").await, 200);
    let gone = call(
        &c,
        "POST",
        &gw.url("/v1/chat/completions"),
        Some("k-old"),
        Some(&chat("test-model", "hi", 5)),
    )
    .await;
    assert_openai_error(&gone, 401, "invalid_api_key");
    // bob's 3 requests count under basic's 4 per minute: one more, then 429.
    let state = rule_state(&c, &gw, "k-move", "user-rpm").await;
    assert_eq!(
        (state["limit"].clone(), state["remaining"].clone()),
        (json!(4), json!(1))
    );
    assert_eq!(status(&c, &gw, "k-move", "test-model").await, 200);
    assert_eq!(status(&c, &gw, "k-move", "test-model").await, 429);

    let log = log_where(&gw, "the reload's changes", |log| {
        has_line(
            log,
            "INFO",
            "keys_added=1 keys_removed=1 keys_changed=1 limiter_changed=false server_changed=false",
        )
    })
    .await;
    let metrics = call(&c, "GET", &gw.url("/metrics"), None, None).await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    let loaded: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("gateway_config_last_reload_success_timestamp_seconds "))
        .unwrap_or_else(|| panic!("no reload timestamp in the metrics:\n{text}"))
        .trim()
        .parse()
        .expect("a timestamp");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(loaded > now - 600 && loaded <= now, "{loaded} vs now {now}");
    // Key values are secrets: never in the log.
    for key in ["k-old", "k-new", "k-move"] {
        assert!(!log.contains(key), "{key} in the log:\n{log}");
    }
    up_server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lowered_limit_applies_to_the_count_so_far() {
    let (up_server, _up) = start_upstream().await;
    let tiers = |rpm: u64, model_rpm: u64| {
        format!(
            "[tiers.free]\nrpm = {rpm}\n[keys]\nk = {{ user = \"alice\", tier = \"free\" }}\n\
             [models.small-model]\nupstream = \"{}/v1\"\nrpm = {model_rpm}\n",
            up_server.url()
        )
    };
    let file = TempConfig::new(&config(&up_server.url(), &tiers(5, 10), ""));
    let gw = Gateway::start(&["--config", file.path()]);
    let c = client();
    for _ in 0..3 {
        assert_eq!(status(&c, &gw, "k", "small-model").await, 200);
    }

    // The tier's rpm 5 -> 4 and the model's 10 -> 4: 3 used of each, one more admitted.
    reload(
        &c,
        &gw,
        &file,
        &config(&up_server.url(), &tiers(4, 4), ""),
        "ok",
    )
    .await;
    assert_eq!(rule_state(&c, &gw, "k", "user-rpm").await["remaining"], 1);
    let a = call(
        &c,
        "GET",
        &gw.url("/v1/ratelimit?model=small-model"),
        Some("k"),
        None,
    )
    .await;
    let model_rpm = a.json()["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rule"] == "model-rpm:small-model")
        .cloned()
        .unwrap_or_else(|| panic!("no model-rpm rule: {}", a.json()));
    assert_eq!(model_rpm["remaining"], 1, "{model_rpm}");
    assert_eq!(status(&c, &gw, "k", "small-model").await, 200);
    let denied = call(
        &c,
        "POST",
        &gw.url("/v1/chat/completions"),
        Some("k"),
        Some(&chat("small-model", "hi", 5)),
    )
    .await;
    assert_openai_error(&denied, 429, "rate_limit_exceeded");

    // Raised again: the same count, now under 5.
    reload(
        &c,
        &gw,
        &file,
        &config(&up_server.url(), &tiers(5, 10), ""),
        "ok",
    )
    .await;
    assert_eq!(status(&c, &gw, "k", "small-model").await, 200);
    assert_eq!(status(&c, &gw, "k", "small-model").await, 429);
    up_server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_added_on_the_mock_and_a_model_removed() {
    let (up_server, _up) = start_upstream().await;
    let keys = "[tiers.free]\nrpm = 100\n[keys]\nk = { user = \"alice\", tier = \"free\" }\n";
    let file = TempConfig::new(&config(&up_server.url(), keys, ""));
    let gw = Gateway::start(&["--config", file.path()]);
    let c = client();
    assert!(!gw.banner.contains("mock"), "{}", gw.banner);
    let a = call(
        &c,
        "POST",
        &gw.url("/v1/chat/completions"),
        Some("k"),
        Some(&chat("mock-gpt", "hi", 5)),
    )
    .await;
    assert_openai_error(&a, 404, "model_not_found");

    // The mock was not running: the reload starts it. test-model goes.
    let with_mock = format!(
        "listen = \"127.0.0.1:0\"\n{keys}\n[models.mock-gpt]\nupstream = \"mock\"\nrpm = 2\n"
    );
    reload(&c, &gw, &file, &with_mock, "ok").await;
    let a = call(
        &c,
        "POST",
        &gw.url("/v1/chat/completions"),
        Some("k"),
        Some(&chat("mock-gpt", "Hello there", 5)),
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.json()["usage"]["prompt_tokens"], 2, "{}", a.json());
    let a = call(
        &c,
        "POST",
        &gw.url("/v1/chat/completions"),
        Some("k"),
        Some(&chat("test-model", "hi", 5)),
    )
    .await;
    assert_openai_error(&a, 404, "model_not_found");
    let models = call(&c, "GET", &gw.url("/v1/models"), Some("k"), None).await;
    let ids: Vec<Value> = models.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(ids, vec![json!("mock-gpt")]);
    log_where(&gw, "the models added and removed", |log| {
        has_line(
            log,
            "INFO",
            r#"models_added=["mock-gpt"] models_removed=["test-model"]"#,
        )
    })
    .await;
    up_server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_keeps_the_running_configuration() {
    let (up_server, _up) = start_upstream().await;
    let good = "[tiers.free]\nrpm = 3\n[keys]\nk = { user = \"alice\", tier = \"free\" }\n";
    let file = TempConfig::new(&config(&up_server.url(), good, ""));
    let gw = Gateway::start(&["--config", file.path()]);
    let c = client();
    assert_eq!(status(&c, &gw, "k", "test-model").await, 200);

    // Two problems, each logged with its field; k2 is not admitted, k still is, counted
    // as before (rpm 3).
    let bad = "[tiers.free]\nrpm = 0\n[keys]\nk = { user = \"alice\", tier = \"free\" }\n\
               k2 = { user = \"bob\", tier = \"gold\" }\n";
    reload(&c, &gw, &file, &config(&up_server.url(), bad, ""), "failed").await;
    for problem in [
        "field `tiers.free.rpm`: must be > 0",
        "field `keys[***].tier (user \"bob\")`: unknown tier \"gold\"",
        "configuration not reloaded: keeping the running one",
    ] {
        log_where(&gw, problem, |log| has_line(log, "ERROR", problem)).await;
    }
    assert!(
        has_line(&gw.stderr(), "problems=2", "configuration not reloaded"),
        "{}",
        gw.stderr()
    );
    assert_eq!(status(&c, &gw, "k2", "test-model").await, 401);
    assert_eq!(status(&c, &gw, "k", "test-model").await, 200);
    assert_eq!(status(&c, &gw, "k", "test-model").await, 200);
    assert_eq!(status(&c, &gw, "k", "test-model").await, 429);

    // Not TOML at all: refused too, the parser's message names the file.
    reload(&c, &gw, &file, "[tiers.free\nrpm = ", "failed").await;
    assert_eq!(reloads(&c, &gw, "failed").await, 2);
    assert_eq!(reloads(&c, &gw, "ok").await, 0);
    let parse_error = format!("{}: TOML parse error", file.path());
    log_where(&gw, &parse_error, |log| {
        has_line(log, "ERROR", &parse_error)
    })
    .await;
    assert_eq!(status(&c, &gw, "k", "test-model").await, 429);
    up_server.shutdown().await;
}

/// `store.max_keys` needs a restart, so a reload checks the rules it brings against the
/// running store's bound, not the file's: more rules per request than the running store can
/// hold at once are refused instead of answering every request 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_checks_its_rules_against_the_running_store_bound() {
    let (up_server, _up) = start_upstream().await;
    let with = |tier: &str, max_keys: u64| {
        config(
            &up_server.url(),
            &format!("[tiers.free]\n{tier}\n[keys]\nk = {{ user = \"alice\", tier = \"free\" }}\n"),
            &format!("[store]\nmax_keys = {max_keys}\n"),
        )
    };
    let file = TempConfig::new(&with("rpm = 1000\ntpm = 100000", 2));
    let gw = Gateway::start(&["--config", file.path()]);
    let c = client();
    assert_eq!(status(&c, &gw, "k", "test-model").await, 200);

    // A third rule with a larger bound in the file: the bound is kept at 2, so refused.
    reload(
        &c,
        &gw,
        &file,
        &with("rpm = 1000\ntpm = 100000\nconcurrent = 5", 100),
        "failed",
    )
    .await;
    let problem = "field `store.max_keys`: must be at least 3";
    log_where(&gw, problem, |log| has_line(log, "ERROR", problem)).await;
    assert_eq!(status(&c, &gw, "k", "test-model").await, 200);
    up_server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_that_need_a_restart_are_named_and_kept() {
    let (up_server, _up) = start_upstream().await;
    let free_port = || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (port, other) = (free_port(), free_port());
    let file_with = |port: u16, max_connections: u64, key: &str| {
        config(
            &up_server.url(),
            &format!("[tiers.free]\nrpm = 100\n[keys]\n{key} = {{ user = \"alice\", tier = \"free\" }}\n"),
            &format!("[server]\nmax_connections = {max_connections}\n[store]\nprefix = \"p{max_connections}\"\n"),
        )
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:{port}\""))
    };
    let file = TempConfig::new(&file_with(port, 100, "k"));
    // No --listen: the file's `listen` applies.
    let gw = Gateway::start_exact(&["--config", file.path()], &[]);
    assert_eq!(gw.addr.port(), port);
    let c = client();

    reload(&c, &gw, &file, &file_with(other, 50, "k-next"), "ok").await;
    for key in ["listen", "server.max_connections", "store.prefix"] {
        let warning = format!("`{key}` changed in the file, but only a restart applies it");
        log_where(&gw, &warning, |log| has_line(log, "WARN", &warning)).await;
    }
    let log = log_where(&gw, "the reload", |log| {
        has_line(log, "INFO", "configuration reloaded")
    })
    .await;
    assert!(!log.contains("`store.kind`"), "{log}");
    // The old port still serves, under the rest of the new file; the new one is closed.
    assert_eq!(status(&c, &gw, "k-next", "test-model").await, 200);
    assert_eq!(status(&c, &gw, "k", "test-model").await, 401);
    assert!(
        std::net::TcpStream::connect_timeout(
            &format!("127.0.0.1:{other}").parse().unwrap(),
            Duration::from_secs(2)
        )
        .is_err(),
        "something listens on the new port"
    );
    up_server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_open_across_a_reload_releases_its_slot_once() {
    let (up_server, up) = start_upstream().await;
    let tiers = |concurrent: u64| {
        format!(
            "[tiers.free]\nconcurrent = {concurrent}\n[keys]\nk = {{ user = \"alice\", tier = \"free\" }}\n"
        )
    };
    let file = TempConfig::new(&config(&up_server.url(), &tiers(2), ""));
    let gw = Gateway::start(&["--config", file.path()]);
    let c = client();
    let url = gw.url("/v1/chat/completions");
    let held = json!({"model": "test-model", "stream": true, "test_hold": true,
        "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]});
    let open = || async {
        let r = send(&c, "POST", &url, Some("k"), Some(&held)).await;
        assert_eq!(r.status(), 200);
        let mut body = r.into_body();
        within("the first SSE chunk", body.frame())
            .await
            .expect("a frame")
            .expect("no error");
        body
    };
    let finish = |mut body: hyper::body::Incoming| async move {
        let mut text = String::new();
        while let Some(frame) = within("the rest of the stream", body.frame()).await {
            if let Ok(data) = frame.expect("stream error").into_data() {
                text.push_str(&String::from_utf8_lossy(&data));
            }
        }
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    };

    let before = open().await;
    assert_eq!(
        rule_state(&c, &gw, "k", "user-concurrent").await["remaining"],
        1
    );
    reload(
        &c,
        &gw,
        &file,
        &config(&up_server.url(), &tiers(3), ""),
        "ok",
    )
    .await;
    // The stream from before the reload holds its slot under the new limit.
    let state = rule_state(&c, &gw, "k", "user-concurrent").await;
    assert_eq!(
        (state["limit"].clone(), state["remaining"].clone()),
        (json!(3), json!(2))
    );
    let after = open().await;
    assert_eq!(
        rule_state(&c, &gw, "k", "user-concurrent").await["remaining"],
        1
    );

    // The old stream ends (on the old configuration): one slot back, not two.
    up.release.add_permits(1);
    finish(before).await;
    remaining_becomes(&c, &gw, "k", 2).await;
    // The stream after the reload still holds its slot: a second release of the first
    // would have given it back.
    let a = call(
        &c,
        "POST",
        &url,
        Some("k"),
        Some(&chat("test-model", "hi", 2)),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(
        rule_state(&c, &gw, "k", "user-concurrent").await["remaining"],
        2
    );
    up.release.add_permits(1);
    finish(after).await;
    remaining_becomes(&c, &gw, "k", 3).await;
    up_server.shutdown().await;
}

/// Waits (bounded) until `user-concurrent`'s `remaining` for `key` is `want`.
async fn remaining_becomes(c: &HttpClient, gw: &Gateway, key: &str, want: u64) {
    let deadline = Instant::now() + support::WAIT;
    loop {
        let state = rule_state(c, gw, key, "user-concurrent").await;
        if state["remaining"] == want {
            break;
        }
        assert!(Instant::now() < deadline, "{state}, want remaining {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_the_built_in_configuration_reloads_nothing() {
    let gw = Gateway::start(&[]);
    let c = client();
    hup(&gw);
    log_where(&gw, "the SIGHUP", |log| {
        has_line(log, "WARN", "SIGHUP: no configuration file to reload")
    })
    .await;
    assert_eq!(reloads(&c, &gw, "ok").await, 0);
    assert_eq!(reloads(&c, &gw, "failed").await, 0);
    assert_eq!(status(&c, &gw, "demo-free", "mock-gpt").await, 200);
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_on_redis_keeps_the_store_and_its_counts() {
    let Some(redis) = support::redis::RedisServer::start() else {
        return; // redis-server is not installed (outside CI): skipped, said why.
    };
    let (up_server, _up) = start_upstream().await;
    let file_with = |rpm: u64, prefix: &str| {
        config(
            &up_server.url(),
            &format!(
                "[tiers.free]\nrpm = {rpm}\n[keys]\nk = {{ user = \"alice\", tier = \"free\" }}\n"
            ),
            &format!("[store]\nprefix = \"{prefix}\"\n"),
        )
        // The exact log, so that no window boundary can blur the count.
        .replace(
            "[limiter]\n",
            "[limiter]\nalgorithm = \"sliding_window_log\"\n",
        )
    };
    let file = TempConfig::new(&file_with(5, "first"));
    let url = redis.url();
    let mut gw = Gateway::start(&["--config", file.path(), "--redis", &url]);
    let c = client();
    for _ in 0..3 {
        assert_eq!(status(&c, &gw, "k", "test-model").await, 200);
    }
    // A new prefix would be new counters: it needs a restart, and is kept.
    reload(&c, &gw, &file, &file_with(4, "second"), "ok").await;
    let warning = "`store.prefix` changed in the file, but only a restart applies it";
    log_where(&gw, warning, |log| has_line(log, "WARN", warning)).await;
    assert_eq!(status(&c, &gw, "k", "test-model").await, 200);
    assert_eq!(status(&c, &gw, "k", "test-model").await, 429);

    // The Redis store's metrics are exported once, not once per layer built.
    let metrics = call(&c, "GET", &gw.url("/metrics"), None, None).await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    let types: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("# TYPE gateway_store_redis_"))
        .collect();
    assert!(!types.is_empty(), "{text}");
    let mut unique = types.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(types.len(), unique.len(), "{text}");

    // Shutdown waits for the settlements of the layers before and after the reload.
    gw.terminate();
    let exit = gw.wait_exit(Duration::from_secs(15));
    assert_eq!(exit.code(), Some(0), "stderr:\n{}", gw.stderr());
    up_server.shutdown().await;
}
