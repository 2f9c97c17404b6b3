//! The gateway against slow or hostile peers: an upstream that stalls (before its headers,
//! or mid-stream), a client that sends its headers or body slowly, more connections than
//! allowed, headers that must not reach the upstream, and bodies too large for the limiter
//! to read. Real gateway process, real sockets; timeouts of 1 s and bounded waits.

use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::support::{self, within};
use super::{
    assert_openai_error, call, chat, client, rule_state, run_to_exit, send, start_upstream,
    test_config, Gateway, TempConfig,
};

/// `test_config` with `server` as its `[server]` table and `model` replacing test-model's
/// `timeout_secs = 5` line.
fn config(upstream: &str, limiter: &str, server: &str, model: &str) -> String {
    let base = test_config(upstream, limiter);
    assert!(base.contains("timeout_secs = 5\n"));
    format!(
        "{}\n[server]\n{server}\n",
        base.replacen("timeout_secs = 5\n", &format!("{model}\n"), 1)
    )
}

/// Waits (bounded) until `rule`'s `remaining` for `key` is `want`.
async fn remaining_becomes(c: &super::HttpClient, gw: &Gateway, key: &str, rule: &str, want: u64) {
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

/// Reads from `stream` until EOF, at most [`support::WAIT`].
async fn read_to_close(stream: &mut TcpStream, what: &str) -> Vec<u8> {
    let mut out = Vec::new();
    // A reset (the gateway closing with unread input) ends the read as well as an EOF.
    let _ = within(what, stream.read_to_end(&mut out)).await;
    out
}

/// Reads from `stream` until `marker` has arrived, at most [`support::WAIT`].
async fn read_until(stream: &mut TcpStream, marker: &[u8], what: &str) -> Vec<u8> {
    let mut out = Vec::new();
    within(what, async {
        let mut buf = [0u8; 4096];
        while !out.windows(marker.len()).any(|w| w == marker) {
            let n = stream.read(&mut buf).await.expect("reading the socket");
            assert!(
                n > 0,
                "closed before {marker:?}: {:?}",
                String::from_utf8_lossy(&out)
            );
            out.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_is_closed_and_its_slots_released() {
    let (up_server, up) = start_upstream().await;
    let cfg = TempConfig::new(&config(
        &up_server.url(),
        "",
        "",
        "timeout_secs = 5\nstream_idle_timeout_secs = 1",
    ));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();
    // The upstream sends its headers and a first chunk, then nothing.
    let body = json!({"model": "test-model", "stream": true, "test_hold": true,
        "max_tokens": 5, "messages": [{"role": "user", "content": "a b"}]});
    let r = send(
        &c,
        "POST",
        &gw.url("/v1/chat/completions"),
        Some("free-a"),
        Some(&body),
    )
    .await;
    assert_eq!(r.status(), 200);
    let mut stream = r.into_body();
    let first = within(
        "the first chunk",
        http_body_util::BodyExt::frame(&mut stream),
    )
    .await
    .expect("a frame")
    .expect("no error");
    assert!(first.data_ref().is_some_and(|d| d.starts_with(b"data: ")));
    // (That the stream holds its slot meanwhile is `concurrency_slots_and_streaming_settlement`;
    // checking it here would race the 1 s timeout on a loaded machine.)

    // The gateway ends the stream (as a broken body: it is incomplete).
    let mut rest = Vec::new();
    while let Some(frame) = within(
        "the end of the idle stream",
        http_body_util::BodyExt::frame(&mut stream),
    )
    .await
    {
        match frame {
            Ok(f) => rest.extend_from_slice(f.data_ref().map_or(&[][..], |d| &d[..])),
            Err(_) => break,
        }
    }
    assert!(
        !String::from_utf8_lossy(&rest).contains("[DONE]"),
        "the stream was not cut off: {rest:?}"
    );
    // Its slot is back, and a new request that needs it gets in.
    remaining_becomes(&c, &gw, "free-a", "user-concurrent", 2).await;
    let a = call(
        &c,
        "POST",
        &gw.url("/v1/chat/completions"),
        Some("free-a"),
        Some(&chat("test-model", "hi", 5)),
    )
    .await;
    assert_eq!(a.status, 200);
    assert!(gw.stderr().contains("went idle"), "{}", gw.stderr());
    up.release.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_504_keeps_the_token_reservation() {
    let (up_server, up) = start_upstream().await;
    let cfg = TempConfig::new(&config(&up_server.url(), "", "", "timeout_secs = 1"));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();
    let mut body = chat("test-model", "one two three", 50);
    body["test_stall"] = json!(true);
    let a = call(
        &c,
        "POST",
        &gw.url("/v1/chat/completions"),
        Some("free-a"),
        Some(&body),
    )
    .await;
    assert_openai_error(&a, 504, "upstream_timeout");
    // What the admission left of the tokens: the estimate stays charged.
    let reserved: u64 = a.header("x-ratelimit-remaining-tokens").parse().unwrap();
    assert!(reserved <= 2000 - 50, "{reserved}");
    let tpm = rule_state(&c, &gw, "free-a", "user-tpm").await;
    assert_eq!(
        tpm["remaining"], reserved,
        "the 504 refunded its tokens: {tpm}"
    );
    // The slot is released, and the request counts.
    let slots = rule_state(&c, &gw, "free-a", "user-concurrent").await;
    assert_eq!(slots["remaining"], 2, "{slots}");
    let rpm = rule_state(&c, &gw, "free-a", "user-rpm").await;
    assert_eq!(rpm["remaining"], 9, "{rpm}");
    up.release.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_body_gets_408() {
    let (up_server, up) = start_upstream().await;
    let cfg = TempConfig::new(&config(
        &up_server.url(),
        "",
        "body_timeout_secs = 1",
        "timeout_secs = 5",
    ));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let mut s = within("connecting", TcpStream::connect(gw.addr))
        .await
        .unwrap();
    // Headers promise 100 bytes; 10 arrive, then nothing.
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer free-a\r\n\
          Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":",
    )
    .await
    .unwrap();
    let answer = read_to_close(&mut s, "the 408 and the close").await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let (_, body) = text.split_once("\r\n\r\n").expect("a body");
    let json: serde_json::Value = serde_json::from_str(body).expect("a JSON body");
    assert_eq!(json["error"]["code"], "request_timeout", "{json}");
    assert!(up.seen.lock().unwrap().is_empty());
    let c = client();
    let rpm = rule_state(&c, &gw, "free-a", "user-rpm").await;
    assert_eq!(rpm["remaining"], 10, "nothing counted: {rpm}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_headers_close_the_connection() {
    let (up_server, _up) = start_upstream().await;
    let cfg = TempConfig::new(&config(
        &up_server.url(),
        "",
        "header_timeout_secs = 1",
        "timeout_secs = 5",
    ));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let mut s = within("connecting", TcpStream::connect(gw.addr))
        .await
        .unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n")
        .await
        .unwrap();
    let answer = read_to_close(&mut s, "the gateway closing a slow connection").await;
    assert!(answer.is_empty(), "{:?}", String::from_utf8_lossy(&answer));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_max_connections_wait_for_a_free_one() {
    let (up_server, _up) = start_upstream().await;
    let cfg = TempConfig::new(&config(
        &up_server.url(),
        "",
        "max_connections = 1\nheader_timeout_secs = 30",
        "timeout_secs = 5",
    ));
    let gw = Gateway::start(&["--config", cfg.path()]);
    const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n";
    const OK: &[u8] = br#"{"status":"ok"}"#;

    // The first connection is served and stays open (keep-alive).
    let mut first = within("connecting", TcpStream::connect(gw.addr))
        .await
        .unwrap();
    first.write_all(HEALTHZ).await.unwrap();
    read_until(&mut first, OK, "the first connection's answer").await;

    // The second waits: connected (the listen queue), not answered.
    let mut second = within("connecting", TcpStream::connect(gw.addr))
        .await
        .unwrap();
    second.write_all(HEALTHZ).await.unwrap();
    let mut buf = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_secs(1), second.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "a connection past max_connections was served: {early:?}"
    );

    // Once the first closes, the second is served.
    drop(first);
    read_until(&mut second, OK, "the waiting connection's answer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowlisted_headers_go_upstream() {
    let (up_server, up) = start_upstream().await;
    let cfg = TempConfig::new(&config(
        &up_server.url(),
        "",
        "forward_headers = [\"X-Trace-Id\"]",
        "timeout_secs = 5",
    ));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();
    let sent = [
        ("openai-organization", "org-attacker"),
        ("openai-project", "proj-attacker"),
        ("cookie", "session=1"),
        ("api-key", "azure-client-key"),
        ("x-api-key", "client-key"),
        ("x-other", "not listed"),
        ("accept-encoding", "gzip"),
        ("openai-beta", "assistants=v2"),
        ("user-agent", "OpenAI/Python 1.0"),
        ("accept", "application/json"),
        ("x-trace-id", "trace-7"),
    ];
    for model in ["test-model", "small-model"] {
        let body = chat(model, "hi", 5);
        let mut req = http::Request::post(gw.url("/v1/chat/completions"))
            .header("authorization", "Bearer pro-a")
            .header("content-type", "application/json");
        for (n, v) in sent {
            req = req.header(n, v);
        }
        let req = req
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_string(),
            )))
            .unwrap();
        let r = within("POST with headers", c.request(req)).await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let seen = up.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    for (s, authorization) in seen.iter().zip([Some("Bearer sk-upstream-secret"), None]) {
        let h = &s.headers;
        assert_eq!(
            h.get("authorization").map(|v| v.to_str().unwrap()),
            authorization,
            "the client's key never goes upstream"
        );
        for (name, value) in [
            ("content-type", "application/json"),
            ("openai-beta", "assistants=v2"),
            ("user-agent", "OpenAI/Python 1.0"),
            ("accept", "application/json"),
            ("x-trace-id", "trace-7"),
        ] {
            assert_eq!(
                h.get(name).map(|v| v.to_str().unwrap()),
                Some(value),
                "{h:?}"
            );
        }
        for name in [
            "openai-organization",
            "openai-project",
            "cookie",
            "api-key",
            "x-api-key",
            "x-other",
            "accept-encoding",
        ] {
            assert!(!h.contains_key(name), "`{name}` went upstream: {h:?}");
        }
        // The framing is the gateway's own: the body (rewritten or not) arrived whole.
        assert!(h.contains_key("content-length") || h.contains_key("transfer-encoding"));
        assert!(s.body["model"].is_string(), "{}", s.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_model_rules_count_bodies_past_max_inspect_bytes() {
    let (up_server, _up) = start_upstream().await;
    let limiter =
        "max_inspect_bytes = 1024\non_unusable_body = \"fallback\"\nfallback_tokens = 500";
    let cfg = TempConfig::new(
        &config(&up_server.url(), limiter, "", "timeout_secs = 5").replacen(
            "rpm = 3\n",
            "rpm = 3\ntpm = 100000\n",
            1,
        ),
    );
    let gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();
    // 2,000 words: about 4 KB, past what the limiter reads.
    let big = chat("small-model", &"word ".repeat(2_000), 5);
    assert!(big.to_string().len() > 1024);
    let a = call(
        &c,
        "POST",
        &gw.url("/v1/chat/completions"),
        Some("pro-a"),
        Some(&big),
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let used = a.json()["usage"]["total_tokens"].as_u64().unwrap();
    assert_eq!(used, 2_000 + 5);
    let rpm = rule_state(&c, &gw, "pro-a", "model-rpm:small-model").await;
    assert_eq!(
        rpm["remaining"], 2,
        "the per-model rule skipped the request: {rpm}"
    );
    remaining_becomes(&c, &gw, "pro-a", "model-tpm:small-model", 100_000 - used).await;
    // The per-user rules count it as well.
    let other = rule_state(&c, &gw, "pro-a", "user-rpm").await;
    assert_eq!(other["remaining"], 599, "{other}");
}

#[test]
fn bad_server_settings_are_named() {
    let good = "[models.m]\nupstream = \"mock\"\n[tiers.free]\nrpm = 10\n\
                [keys]\nk = { user = \"u\", tier = \"free\" }\n";
    for (cfg, want) in [
        (
            format!("[server]\nforward_headers = [\"Authorization\"]\n{good}"),
            vec!["`server.forward_headers[0]`", "never forwarded"],
        ),
        (
            format!("[server]\nforward_headers = [\"x-ok\", \"openai-project\"]\n{good}"),
            vec!["`server.forward_headers[1]`", "never forwarded"],
        ),
        (
            format!("[server]\nforward_headers = [\"bad name\"]\n{good}"),
            vec!["`server.forward_headers[0]`", "not a valid header name"],
        ),
        (
            format!("[server]\nmax_connections = 0\n{good}"),
            vec!["`server.max_connections`", "must be > 0"],
        ),
        (
            format!("[server]\nbody_timeout_secs = 0\n{good}"),
            vec!["`server.body_timeout_secs`", "must be > 0"],
        ),
        (
            format!("[server]\nheader_timeout_secs = 0\n{good}"),
            vec!["`server.header_timeout_secs`", "must be > 0"],
        ),
        (
            good.replace(
                "upstream = \"mock\"",
                "upstream = \"mock\"\nstream_idle_timeout_secs = 0",
            ),
            vec!["`models.m.stream_idle_timeout_secs`", "must be > 0"],
        ),
    ] {
        let file = TempConfig::new(&cfg);
        let (code, _, err) = run_to_exit(&["--config", file.path()]);
        assert_eq!(code, Some(2), "{cfg}\n{err}");
        for w in want {
            assert!(err.contains(w), "{w:?} not in:\n{err}");
        }
    }
}

/// A timeout too long for the clock (TOML's largest integer, 2^63 - 1 s: "no timeout") was
/// valid, and then every connection's header timer (hyper adds it to the time now) and
/// every response's idle timer overflowed `Instant` and panicked: no request answered.
/// Each is now refused naming its field; a year is the longest.
#[test]
fn timeouts_past_a_year_are_refused_naming_the_field() {
    const HUGE: &str = "9223372036854775807";
    let good = "[models.m]\nupstream = \"mock\"\n[tiers.free]\nrpm = 10\n\
                [keys]\nk = { user = \"u\", tier = \"free\" }\n";
    let model = |line: &str| {
        good.replace(
            "upstream = \"mock\"",
            &format!("upstream = \"mock\"\n{line}"),
        )
    };
    for (cfg, field) in [
        (
            format!("[server]\nheader_timeout_secs = {HUGE}\n{good}"),
            "`server.header_timeout_secs`",
        ),
        (
            format!("[server]\nbody_timeout_secs = {HUGE}\n{good}"),
            "`server.body_timeout_secs`",
        ),
        (
            format!("[limiter]\nshutdown_grace_secs = {HUGE}\n{good}"),
            "`limiter.shutdown_grace_secs`",
        ),
        (
            model(&format!("stream_idle_timeout_secs = {HUGE}")),
            "`models.m.stream_idle_timeout_secs`",
        ),
        (model("timeout_secs = 31536001"), "`models.m.timeout_secs`"),
    ] {
        let file = TempConfig::new(&cfg);
        let (code, _, err) = run_to_exit(&["--check-config", "--config", file.path()]);
        assert_eq!(code, Some(2), "{cfg}\n{err}");
        assert!(
            err.contains(field) && err.contains("must be at most 31536000"),
            "{field} not in:\n{err}"
        );
    }
    // A year is accepted.
    let file = TempConfig::new(&model("stream_idle_timeout_secs = 31536000"));
    let (code, _, err) = run_to_exit(&["--check-config", "--config", file.path()]);
    assert_eq!(code, Some(0), "{err}");
}

/// A base URL's user information (`https://user:password@host/v1`) is never sent upstream
/// (the client takes the host alone) and was shown in the banner: refused, without echoing
/// it.
#[test]
fn credentials_in_an_upstream_url_are_refused_unshown() {
    let good = "[models.m]\nupstream = \"mock\"\n[tiers.free]\nrpm = 10\n\
                [keys]\nk = { user = \"u\", tier = \"free\" }\n";
    let file = TempConfig::new(&good.replace(
        "upstream = \"mock\"",
        "upstream = \"https://user:upstream-pw@example.com/v1\"",
    ));
    let (code, _, err) = run_to_exit(&["--check-config", "--config", file.path()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("`models.m.upstream`") && err.contains("can't carry credentials"),
        "{err}"
    );
    assert!(!err.contains("upstream-pw"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_and_frees_its_slot() {
    // An HTTP/2 client answers the gateway's pings by itself, so only an idle deadline
    // closes a connection that never sends a request: without one, `max_connections` such
    // connections would shut everyone else out for good.
    let (up_server, _up) = start_upstream().await;
    let cfg = TempConfig::new(&config(
        &up_server.url(),
        "",
        "max_connections = 1\nheader_timeout_secs = 1",
        "timeout_secs = 5",
    ));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let idle = within("connecting", TcpStream::connect(gw.addr))
        .await
        .unwrap();
    let (_sender, conn) = within(
        "the HTTP/2 handshake",
        hyper::client::conn::http2::handshake::<_, _, http_body_util::Full<bytes::Bytes>>(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(idle),
        ),
    )
    .await
    .unwrap();
    let idle_conn = tokio::spawn(conn);

    const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n";
    let mut next = within("connecting", TcpStream::connect(gw.addr))
        .await
        .unwrap();
    next.write_all(HEALTHZ).await.unwrap();
    read_until(
        &mut next,
        br#"{"status":"ok"}"#,
        "the next connection's answer",
    )
    .await;
    // The idle connection was closed by the gateway (its task ends).
    let _ = within("the idle HTTP/2 connection to end", idle_conn).await;
}
