//! The built-in mock's capacity model (`[mock] capacity` and `queue`): up to `capacity`
//! sequences decode at full speed, more slow every token in proportion, and more than `queue`
//! beyond capacity are answered 503 with an OpenAI-shaped error and `Retry-After`. Real
//! gateway process, real sockets; the mock's state is read from its `GET /v1/mock/stats`
//! (its address is in the gateway's banner). No durations are asserted: the streams use a
//! token delay far longer than any test, so they stay open until the test drops them, and
//! every wait polls the stats, bounded by [`support::WAIT`].

use std::process::Command;
use std::time::{Duration, Instant};

use http::StatusCode;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{json, Value};

use super::support::{self, within};
use super::{assert_openai_error, call, chat, client, send, Gateway, HttpClient, TempConfig};

/// A configuration with one model on the mock, `[mock]` holding `mock` (TOML lines), and one
/// key (`k`) whose tier limits nothing the tests reach.
fn config(mock: &str) -> String {
    format!(
        r#"
listen = "127.0.0.1:0"

[limiter]
shutdown_grace_secs = 1

[mock]
{mock}

[models.m]
upstream = "mock"

[tiers.free]
rpm = 100000

[keys]
k = {{ user = "alice", tier = "free" }}
"#
    )
}

/// A token delay no test waits out: a stream stays open until its client leaves.
const FOREVER_MS: u64 = 600_000;

/// The mock's base URL, from the gateway's banner (`... -> built-in mock model at URL`).
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

/// Polls the stats (bounded) until `field` is `want`; returns them.
async fn stats_until(c: &HttpClient, gw: &Gateway, field: &str, want: u64) -> Value {
    let deadline = Instant::now() + support::WAIT;
    loop {
        let s = stats(c, gw).await;
        if s[field] == want {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "`{field}` did not become {want} within {:?}: {s}",
            support::WAIT
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn stream_body() -> Value {
    json!({"model": "m", "stream": true, "max_tokens": 16,
        "messages": [{"role": "user", "content": "tell me a long story"}]})
}

/// Opens `n` streams at once; their responses (heads read, bodies left open), in no order.
async fn open_streams(c: &HttpClient, gw: &Gateway, n: usize) -> Vec<hyper::Response<Incoming>> {
    let url = gw.url("/v1/chat/completions");
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(
                async move { send(&c, "POST", &url, Some("k"), Some(&stream_body())).await },
            )
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(within("a stream's head", t).await.expect("the stream task"));
    }
    out
}

/// Reads a response whole.
async fn answer(r: hyper::Response<Incoming>) -> (StatusCode, http::HeaderMap, Value) {
    let (parts, body) = r.into_parts();
    let bytes = within("a body", body.collect())
        .await
        .expect("the body")
        .to_bytes();
    let json = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&bytes)));
    (parts.status, parts.headers, json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_streams_on_a_capacity_of_two_and_a_queue_of_one_get_one_503() {
    let cfg = TempConfig::new(&config(&format!(
        "token_delay_ms = {FOREVER_MS}\ncapacity = 2\nqueue = 1"
    )));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();
    let s = stats(&c, &gw).await;
    assert_eq!(s["capacity"], 2, "{s}");
    assert_eq!(s["queue"], 1, "{s}");
    assert_eq!(s["running"], 0, "{s}");

    let responses = open_streams(&c, &gw, 4).await;
    let (open, refused): (Vec<_>, Vec<_>) = responses
        .into_iter()
        .partition(|r| r.status() == StatusCode::OK);
    assert_eq!(
        open.len(),
        3,
        "statuses: {:?}",
        refused.iter().map(|r| r.status()).collect::<Vec<_>>()
    );
    assert_eq!(refused.len(), 1);
    let (status, headers, body) = answer(refused.into_iter().next().unwrap()).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"),
        "{headers:?}"
    );
    let retry_after: u64 = headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in seconds");
    assert!(retry_after >= 1, "{retry_after}");
    let e = &body["error"];
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("overloaded")),
        "{e}"
    );
    assert_eq!(e["type"], "server_error", "{e}");
    assert!(e.get("param").is_some(), "{e}");

    // Two at full speed, one beyond capacity: every token of the three slows by 3/2.
    let s = stats(&c, &gw).await;
    assert_eq!(s["running"], 3, "{s}");
    assert_eq!(s["waiting"], 1, "{s}");
    assert_eq!(s["admitted"], 3, "{s}");
    assert_eq!(s["rejected"], 1, "{s}");
    assert_eq!(s["token_delay_ms"], FOREVER_MS, "{s}");
    assert_eq!(s["current_token_delay_ms"], FOREVER_MS * 3 / 2, "{s}");

    // The gateway counts the upstream's 503.
    let metrics = call(&c, "GET", &gw.url("/metrics"), None, None).await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(
        text.lines()
            .any(|l| l.starts_with("gateway_upstream_responses_total") && l.contains("503")),
        "{text}"
    );
    drop(open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_frees_its_place() {
    let cfg = TempConfig::new(&config(&format!(
        "token_delay_ms = {FOREVER_MS}\ncapacity = 1\nqueue = 1"
    )));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();
    let mut open = open_streams(&c, &gw, 2).await;
    assert!(open.iter().all(|r| r.status() == 200));
    stats_until(&c, &gw, "running", 2).await;
    let (status, _, body) = answer(open_streams(&c, &gw, 1).await.remove(0)).await;
    assert_eq!(status, 503, "{body}");

    // One client goes away mid-stream: its place is free, and a new stream takes it.
    drop(open.pop());
    let s = stats_until(&c, &gw, "running", 1).await;
    assert_eq!(s["cancelled"], 1, "{s}");
    assert_eq!(s["waiting"], 0, "{s}");
    assert_eq!(s["current_token_delay_ms"], FOREVER_MS, "{s}");
    open.extend(open_streams(&c, &gw, 1).await);
    assert!(open.iter().all(|r| r.status() == 200));
    stats_until(&c, &gw, "running", 2).await;

    // Non-streaming requests decode too, and hold a place while they do; one whose client
    // leaves frees it.
    drop(open);
    stats_until(&c, &gw, "running", 0).await;
    let waiting = {
        let (c, url) = (c.clone(), gw.url("/v1/chat/completions"));
        tokio::spawn(
            async move { call(&c, "POST", &url, Some("k"), Some(&chat("m", "hi", 16))).await },
        )
    };
    stats_until(&c, &gw, "running", 1).await;
    waiting.abort();
    let _ = waiting.await;
    let s = stats_until(&c, &gw, "running", 0).await;
    assert_eq!(s["cancelled"], 4, "{s}");
    assert_eq!(s["completed"], 0, "{s}");
}

/// A client that opens a stream and never reads it holds the place for its tokens' time
/// only: then the sequence is complete and the place is another's, the events waiting for
/// the client. (Over real sockets a stream this short also fits in the kernel's buffers; the
/// unit test in `mock/sse.rs` holds a response body unread, where only the mock's own buffer
/// can take the events.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_holds_no_place_after_its_tokens() {
    let cfg = TempConfig::new(&config("token_delay_ms = 1\ncapacity = 1\nqueue = 0"));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();
    let unread = open_streams(&c, &gw, 1).await;
    assert_eq!(unread[0].status(), 200);
    let s = stats_until(&c, &gw, "completed", 1).await;
    assert_eq!(s["running"], 0, "{s}");
    assert_eq!(s["cancelled"], 0, "{s}");
    assert_eq!(s["tokens"], 16, "{s}");
    let next = open_streams(&c, &gw, 1).await;
    assert_eq!(next[0].status(), 200, "the place is free");
    let body = unread.into_iter().next().expect("a stream").into_body();
    let events = within("the unread stream", body.collect())
        .await
        .expect("its body")
        .to_bytes();
    drop(next);
    assert!(
        String::from_utf8_lossy(&events).ends_with("data: [DONE]\n\n"),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_sequences_give_their_place_back() {
    // No delay: each request decodes at once, and releases its place when it ends.
    let cfg = TempConfig::new(&config("token_delay_ms = 0\ncapacity = 1\nqueue = 0"));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();
    for i in 0..5 {
        let a = call(
            &c,
            "POST",
            &gw.url("/v1/chat/completions"),
            Some("k"),
            Some(&chat("m", "hi", 3)),
        )
        .await;
        assert_eq!(a.status, 200, "request {i}: {:?}", a.body);
        let a = call(
            &c,
            "POST",
            &gw.url("/v1/chat/completions"),
            Some("k"),
            Some(&json!({"model": "m", "stream": true, "max_tokens": 3,
                "messages": [{"role": "user", "content": "hi"}]})),
        )
        .await;
        assert_eq!(a.status, 200, "stream {i}: {:?}", a.body);
        assert!(String::from_utf8_lossy(&a.body).ends_with("data: [DONE]\n\n"));
    }
    let s = stats_until(&c, &gw, "completed", 10).await;
    assert_eq!(s["running"], 0, "{s}");
    assert_eq!(s["admitted"], 10, "{s}");
    assert_eq!(s["rejected"], 0, "{s}");
    assert_eq!(s["cancelled"], 0, "{s}");
    assert_eq!(s["tokens"], 30, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_capacity_the_mock_admits_everything_at_full_speed() {
    let cfg = TempConfig::new(&config(&format!("token_delay_ms = {FOREVER_MS}")));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();
    let open = open_streams(&c, &gw, 6).await;
    assert!(open.iter().all(|r| r.status() == 200));
    let s = stats_until(&c, &gw, "running", 6).await;
    assert_eq!(s["capacity"], 0, "{s}");
    assert_eq!(s["waiting"], 0, "{s}");
    assert_eq!(s["rejected"], 0, "{s}");
    assert_eq!(s["current_token_delay_ms"], FOREVER_MS, "{s}");
}

/// `gateway_config_reloads_total{result="ok"}`.
async fn reloads_ok(c: &HttpClient, gw: &Gateway) -> String {
    let a = call(c, "GET", &gw.url("/metrics"), None, None).await;
    let text = String::from_utf8_lossy(&a.body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("gateway_config_reloads_total{result=\"ok\"} "))
        .unwrap_or("0")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_changes_the_capacity_of_a_running_mock() {
    let text = |capacity: u64, queue: u64, delay: u64| {
        config(&format!(
            "token_delay_ms = {delay}\ncapacity = {capacity}\nqueue = {queue}"
        ))
    };
    let cfg = TempConfig::new(&text(1, 0, FOREVER_MS));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();
    let mut open = open_streams(&c, &gw, 2).await;
    open.sort_by_key(|r| r.status());
    assert_eq!(
        open.iter().map(|r| r.status().as_u16()).collect::<Vec<_>>(),
        [200, 503]
    );
    open.pop();

    // Capacity 1 -> 2 (and a new token delay, which needs a restart: kept, with a WARN).
    let before = reloads_ok(&c, &gw).await;
    std::fs::write(&cfg.0, text(2, 0, 1)).expect("rewriting the config");
    let ok = Command::new("kill")
        .args(["-HUP", &gw.child.id().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -HUP failed");
    let deadline = Instant::now() + support::WAIT;
    while reloads_ok(&c, &gw).await == before {
        assert!(
            Instant::now() < deadline,
            "no reload; stderr:\n{}",
            gw.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = stats(&c, &gw).await;
    assert_eq!(s["capacity"], 2, "{s}");
    let deadline = Instant::now() + support::WAIT;
    while !gw
        .stderr()
        .lines()
        .any(|l| l.contains("configuration reloaded") && l.contains("mock_changed=true"))
    {
        assert!(Instant::now() < deadline, "{}", gw.stderr());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s["token_delay_ms"], FOREVER_MS, "{s}");
    assert!(
        gw.stderr()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("`mock.token_delay_ms` changed")),
        "{}",
        gw.stderr()
    );
    open.extend(open_streams(&c, &gw, 1).await);
    assert!(open.iter().all(|r| r.status() == 200));
    let (status, _, body) = answer(open_streams(&c, &gw, 1).await.remove(0)).await;
    assert_eq!(status, 503, "{body}");
    stats_until(&c, &gw, "running", 2).await;
}

#[test]
fn a_queue_without_a_capacity_is_refused() {
    let cfg = TempConfig::new(&config("queue = 4"));
    let (code, _, err) = super::run_to_exit(&["--config", cfg.path()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("`mock.queue`"), "{err}");
    assert!(err.contains("mock.capacity"), "{err}");
}

/// The mock's errors keep the OpenAI shape through the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_of_the_mock_is_an_openai_error() {
    let cfg = TempConfig::new(&config(&format!(
        "token_delay_ms = {FOREVER_MS}\ncapacity = 1\nqueue = 0"
    )));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();
    let open = open_streams(&c, &gw, 1).await;
    assert_eq!(open[0].status(), 200);
    stats_until(&c, &gw, "running", 1).await;
    let a = call(
        &c,
        "POST",
        &gw.url("/v1/completions"),
        Some("k"),
        Some(&json!({"model": "m", "prompt": "hi"})),
    )
    .await;
    assert_openai_error(&a, 503, "overloaded");
}
