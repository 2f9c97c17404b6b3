//! The live dashboard (`/dashboard`): who may see it (admin keys, the sign-in cookie, bearer
//! tokens, `/metrics` behind the admin key), and the page itself in a real browser.
//!
//! The browser is Debian's `chromium`, headless, driven over its DevTools pipe
//! (`chromium.rs`). Without it the browser test fails, unless `GATEWAY_TESTS_WITHOUT_CHROMIUM=1`
//! says to skip it (`apt-get install -y chromium` installs it; `.ci/run` does). The browser signs in through the page's own form, as a person would: the test never hands it
//! a cookie. Every wait is bounded; nothing is asserted about durations.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};

use super::chromium::{chromium, Browser, BROWSER_WAIT};
#[cfg(feature = "redis")]
use super::send;
use super::support::within;
use super::{
    call, chat, client, run_to_exit, start_upstream, test_config, Answer, Gateway, HttpClient,
    TempConfig,
};

const ADMIN: &str = "adm-test-0123456789abcdef";

/// The test configuration with an admin key, `/metrics` behind it, and monthly token budgets
/// (exact counts until the 1st: the page's figures of them can be compared at any moment).
fn dashboard_config(upstream: &str) -> String {
    let base = test_config(upstream, "");
    let with_server = base.replacen(
        "[limiter]\n",
        &format!(
            "[server]\nadmin_keys = [\"{ADMIN}\"]\nmetrics_requires_admin = true\n\n[limiter]\n"
        ),
        1,
    );
    with_server
        .replacen("timeout_secs = 5\n", "timeout_secs = 5\ntpm = 100000\n", 1)
        .replacen(
            "[tiers.free]\n",
            "[tiers.free]\nmonthly_tokens = 1000000\n",
            1,
        )
        .replacen(
            "[tiers.pro]\n",
            "[tiers.pro]\nmonthly_tokens = 1000000\n",
            1,
        )
}

/// A request with any headers and body.
async fn raw(
    client: &HttpClient,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Answer {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body = Full::new(Bytes::from(body.unwrap_or_default().to_owned()));
    let response = within(
        &format!("{method} {url}"),
        client.request(req.body(body).unwrap()),
    )
    .await
    .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
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

fn text(a: &Answer) -> String {
    String::from_utf8_lossy(&a.body).into_owned()
}

fn assert_unauthorized_json(a: &Answer) {
    assert_eq!(a.status, 401, "{}", text(a));
    assert!(a.header("content-type").starts_with("application/json"));
    let e = &a.json()["error"];
    assert_eq!(e["code"], "invalid_admin_key", "{e}");
    assert!(e["message"]
        .as_str()
        .is_some_and(|m| m.contains("admin key")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_is_off_without_an_admin_key() {
    let (up, _) = start_upstream().await;
    let cfg = TempConfig::new(&test_config(&up.url(), ""));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();
    for (method, path) in [
        ("GET", "/dashboard"),
        ("POST", "/dashboard"),
        ("GET", "/dashboard/data"),
        ("POST", "/dashboard/sign-out"),
    ] {
        let a = raw(&c, method, &gw.url(path), &[], Some("key=anything")).await;
        assert_eq!(a.status, 404, "{method} {path}: {}", text(&a));
    }
    // The API key of a caller opens nothing either.
    let a = call(&c, "GET", &gw.url("/dashboard/data"), Some("pro-a"), None).await;
    assert_eq!(a.status, 404);
    // /metrics stays open unless configured otherwise.
    let a = call(&c, "GET", &gw.url("/metrics"), None, None).await;
    assert_eq!(a.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_keys_sessions_and_the_metrics_guard() {
    let (up, _) = start_upstream().await;
    let cfg = TempConfig::new(&dashboard_config(&up.url()));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();
    let data = gw.url("/dashboard/data");

    // The data: 401 JSON without a key, with a wrong one, with an API key; 200 with the
    // admin key as a bearer token.
    assert_unauthorized_json(&call(&c, "GET", &data, None, None).await);
    assert_unauthorized_json(&call(&c, "GET", &data, Some("adm-test-wrong-key-000"), None).await);
    assert_unauthorized_json(&call(&c, "GET", &data, Some("pro-a"), None).await);
    let a = call(&c, "GET", &data, Some(ADMIN), None).await;
    assert_eq!(a.status, 200, "{}", text(&a));
    let body = a.json();
    let models: Vec<&str> = body["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(models, ["dead-model", "small-model", "test-model"]);
    // Each tier's users are those its keys name, whether they sent anything yet or not.
    let users: Vec<(&str, u64)> = body["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["name"].as_str().unwrap(), t["users"].as_u64().unwrap()))
        .collect();
    assert_eq!(users, [("free", 2), ("pro", 3)], "{}", body["tiers"]);

    // The page: the sign-in form until signed in.
    let a = raw(&c, "GET", &gw.url("/dashboard"), &[], None).await;
    assert_eq!(a.status, 200);
    assert!(a.header("content-type").starts_with("text/html"));
    assert!(text(&a).contains("name=\"key\""), "{}", text(&a));
    assert!(!text(&a).contains("id=\"models\""));
    assert!(a
        .header("content-security-policy")
        .contains("default-src 'none'"));
    // Scripts: only the page's own, by its hash (the browser test shows that it runs).
    let csp = a.header("content-security-policy");
    let script_src = csp
        .split(';')
        .map(str::trim)
        .find(|d| d.starts_with("script-src "))
        .unwrap_or_else(|| panic!("no script-src in {csp}"));
    assert!(script_src.starts_with("script-src 'sha256-"), "{csp}");
    assert!(!script_src.contains("unsafe-inline"), "{csp}");

    // A wrong key, or an API key: the form again, with the problem, and no cookie.
    let form = [("content-type", "application/x-www-form-urlencoded")];
    for key in ["adm-test-wrong-key-000", "pro-a", ""] {
        let a = raw(
            &c,
            "POST",
            &gw.url("/dashboard"),
            &form,
            Some(&format!("key={key}")),
        )
        .await;
        assert_eq!(a.status, 401, "{key}: {}", text(&a));
        assert!(text(&a).contains("not an admin key"), "{}", text(&a));
        assert!(text(&a).contains("name=\"key\""));
        assert!(a.headers.get("set-cookie").is_none());
    }

    // The admin key: a session cookie (not the key), HttpOnly, SameSite=Strict, for
    // /dashboard only; then a redirect to the page.
    let a = raw(
        &c,
        "POST",
        &gw.url("/dashboard"),
        &form,
        Some(&format!("key={ADMIN}")),
    )
    .await;
    assert_eq!(a.status, 303, "{}", text(&a));
    assert_eq!(a.header("location"), "/dashboard");
    let set_cookie = a.header("set-cookie").to_owned();
    let attributes: Vec<&str> = set_cookie.split(';').map(str::trim).collect();
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/dashboard"] {
        assert!(attributes.contains(&flag), "{flag} in {set_cookie}");
    }
    let pair = attributes[0];
    let (name, value) = pair.split_once('=').unwrap();
    assert_eq!(name, "gateway_dashboard");
    assert!(value.len() >= 32, "{value}");
    assert!(!set_cookie.contains(ADMIN) && !set_cookie.contains("adm-"));
    let cookie = format!("{name}={value}");

    let a = raw(
        &c,
        "GET",
        &gw.url("/dashboard"),
        &[("cookie", &cookie)],
        None,
    )
    .await;
    assert_eq!(a.status, 200);
    assert!(text(&a).contains("id=\"models\""), "the page, not the form");
    // The CSP's script hash is the page's script's, as a browser hashes it (the text between
    // the tags, line endings as LF).
    let page = text(&a);
    let script = page
        .split_once("<script>")
        .and_then(|(_, rest)| rest.split_once("</script>"))
        .map(|(script, _)| script.replace("\r\n", "\n").replace('\r', "\n"))
        .expect("the page's script");
    assert!(script.len() > 100, "{script}");
    let sha256 = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
        .tls13()
        .unwrap()
        .common
        .hash_provider
        .hash(script.as_bytes());
    let expected = format!(
        "script-src 'sha256-{}'",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, sha256.as_ref())
    );
    let csp = a.header("content-security-policy");
    assert!(
        csp.split(';').map(str::trim).any(|d| d == expected),
        "{expected} in {csp}"
    );
    let a = raw(&c, "GET", &data, &[("cookie", &cookie)], None).await;
    assert_eq!(a.status, 200, "{}", text(&a));
    assert!(a.json()["models"].is_array());
    // A made-up session, or the admin key itself as the cookie, opens nothing.
    for fake in [
        "gateway_dashboard=00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
            .to_owned(),
        format!("gateway_dashboard={ADMIN}"),
    ] {
        let a = raw(&c, "GET", &data, &[("cookie", &fake)], None).await;
        assert_unauthorized_json(&a);
    }

    // /metrics: the admin key as a bearer token, nothing else.
    let metrics = gw.url("/metrics");
    assert_unauthorized_json(&call(&c, "GET", &metrics, None, None).await);
    assert_unauthorized_json(&call(&c, "GET", &metrics, Some("pro-a"), None).await);
    let a = raw(&c, "GET", &metrics, &[("cookie", &cookie)], None).await;
    assert_unauthorized_json(&a);
    let a = call(&c, "GET", &metrics, Some(ADMIN), None).await;
    assert_eq!(a.status, 200);
    assert!(
        text(&a).contains("gateway_config_reloads_total"),
        "{}",
        text(&a)
    );

    // Signing out ends the session.
    let a = raw(
        &c,
        "POST",
        &gw.url("/dashboard/sign-out"),
        &[("cookie", &cookie)],
        None,
    )
    .await;
    assert_eq!(a.status, 303);
    assert!(a.header("set-cookie").contains("Max-Age=0"));
    assert_unauthorized_json(&raw(&c, "GET", &data, &[("cookie", &cookie)], None).await);
}

/// Rewrites the configuration, sends SIGHUP, and waits (bounded) until `applied` holds.
async fn reload_until<F, Fut>(gw: &Gateway, cfg: &TempConfig, text: &str, what: &str, applied: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    std::fs::write(&cfg.0, text).expect("rewriting the config");
    let ok = Command::new("kill")
        .args(["-HUP", &gw.child.id().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -HUP failed");
    let deadline = Instant::now() + super::support::WAIT;
    while !applied().await {
        assert!(
            Instant::now() < deadline,
            "{what}: not applied within {:?}; stderr:\n{}",
            super::support::WAIT,
            gw.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_changes_the_admin_keys_and_ends_their_sessions() {
    let (up, _) = start_upstream().await;
    let with_keys = |keys: &str| {
        test_config(&up.url(), "").replacen(
            "[limiter]\n",
            &format!("[server]\nadmin_keys = [{keys}]\n\n[limiter]\n"),
            1,
        )
    };
    let cfg = TempConfig::new(&with_keys(&format!("\"{ADMIN}\"")));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();
    let data = gw.url("/dashboard/data");
    let a = raw(
        &c,
        "POST",
        &gw.url("/dashboard"),
        &[("content-type", "application/x-www-form-urlencoded")],
        Some(&format!("key={ADMIN}")),
    )
    .await;
    assert_eq!(a.status, 303, "{}", text(&a));
    let cookie = a.header("set-cookie").split(';').next().unwrap().to_owned();
    assert_eq!(
        raw(&c, "GET", &data, &[("cookie", &cookie)], None)
            .await
            .status,
        200
    );

    // Another key: it opens the data, the old one no longer does, nor its session.
    let other = "adm-test-another-key-42";
    reload_until(
        &gw,
        &cfg,
        &with_keys(&format!("\"{other}\"")),
        "the new admin key",
        || async { call(&c, "GET", &data, Some(other), None).await.status == 200 },
    )
    .await;
    assert_unauthorized_json(&call(&c, "GET", &data, Some(ADMIN), None).await);
    assert_unauthorized_json(&raw(&c, "GET", &data, &[("cookie", &cookie)], None).await);

    // A session of the other key, not looked at while the next configuration has no key.
    let a = raw(
        &c,
        "POST",
        &gw.url("/dashboard"),
        &[("content-type", "application/x-www-form-urlencoded")],
        Some(&format!("key={other}")),
    )
    .await;
    assert_eq!(a.status, 303, "{}", text(&a));
    let other_cookie = a.header("set-cookie").split(';').next().unwrap().to_owned();
    assert_eq!(
        raw(&c, "GET", &data, &[("cookie", &other_cookie)], None)
            .await
            .status,
        200
    );

    // No key: the dashboard is off again.
    reload_until(&gw, &cfg, &with_keys(""), "no admin key", || async {
        raw(&c, "GET", &gw.url("/dashboard"), &[], None)
            .await
            .status
            == 404
    })
    .await;
    assert_eq!(call(&c, "GET", &data, Some(other), None).await.status, 404);

    // The key again: its old session stays ended (the reload that removed the key ended it).
    reload_until(
        &gw,
        &cfg,
        &with_keys(&format!("\"{other}\"")),
        "the other key again",
        || async { call(&c, "GET", &data, Some(other), None).await.status == 200 },
    )
    .await;
    assert_unauthorized_json(&raw(&c, "GET", &data, &[("cookie", &other_cookie)], None).await);
}

/// A model's dashboard entry in `/dashboard/data`.
fn model_data<'a>(data: &'a Value, name: &str) -> &'a Value {
    data["models"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == name))
        .unwrap_or_else(|| panic!("no model {name} in {data}"))
}

/// Redis down, `on_failure = "open"`: the limiter admits without an `Admitted` event, yet
/// the request is in flight on the dashboard until its answer ends, then no longer; the
/// data still answers (the counts, `limits: null` and the store's error).
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_the_dashboard_counts_fail_open_requests_in_flight() {
    let Some(mut redis) = super::support::redis::RedisServer::start() else {
        return; // redis-server is not installed (outside CI): skipped, as the other Redis tests.
    };
    let (up_server, up) = start_upstream().await;
    let cfg = TempConfig::new(&format!(
        "{}\n[store]\non_failure = \"open\"\n",
        dashboard_config(&up_server.url())
    ));
    let gw = Gateway::start(&["--config", cfg.path(), "--redis", &redis.url()]);
    redis.stop();
    let c = client();
    let held = json!({"model": "test-model", "stream": true, "test_hold": true,
        "max_tokens": 5, "messages": [{"role": "user", "content": "one two"}]});
    let r = send(
        &c,
        "POST",
        &gw.url("/v1/chat/completions"),
        Some("pro-a"),
        Some(&held),
    )
    .await;
    assert_eq!(r.status(), 200);
    let mut body = r.into_body();
    within("the first SSE chunk", body.frame())
        .await
        .expect("a frame")
        .expect("no error");

    let data = call(&c, "GET", &gw.url("/dashboard/data"), Some(ADMIN), None).await;
    assert_eq!(data.status, 200, "{}", text(&data));
    let data = data.json();
    assert!(data["store_error"].is_string(), "{data}");
    let m = model_data(&data, "test-model");
    assert_eq!(m["in_flight"], 1, "{m}");
    assert_eq!(m["limits"], Value::Null, "{m}");

    up.release.add_permits(1);
    within("the held stream's end", body.collect())
        .await
        .expect("the stream ends");
    let deadline = Instant::now() + super::support::WAIT;
    loop {
        let data = call(&c, "GET", &gw.url("/dashboard/data"), Some(ADMIN), None).await;
        let data = data.json();
        if model_data(&data, "test-model")["in_flight"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "still in flight: {data}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The sign-in form, unauthenticated, is read within `body_timeout_secs` like the API's
/// bodies: a body that stops arriving gets 408 and the connection closes (no slowloris on
/// the connection limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_sign_in_form_gets_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (up, _) = start_upstream().await;
    let cfg = TempConfig::new(&dashboard_config(&up.url()).replacen(
        "metrics_requires_admin = true\n",
        "metrics_requires_admin = true\nbody_timeout_secs = 1\n",
        1,
    ));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let mut s = within("connecting", tokio::net::TcpStream::connect(gw.addr))
        .await
        .unwrap();
    // Headers promise 100 bytes; 4 arrive, then nothing.
    s.write_all(
        b"POST /dashboard HTTP/1.1\r\nHost: gw\r\n\
          Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\nkey=",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    // A reset (the gateway closing with unread input) ends the read as well as an EOF.
    let _ = within("the 408 and the close", s.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
}

/// Guessing admin keys is bounded per address: after 20 wrong ones on the dashboard (the
/// form, a bearer on the data), every try there from that address is 429, the right key
/// too, for a quarter of an hour (far longer than this test). `/metrics` counts its own:
/// a dashboard guesser behind the scraper's address doesn't lock Prometheus out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_key_guesses_are_limited_per_address() {
    let (up, _) = start_upstream().await;
    let cfg = TempConfig::new(&dashboard_config(&up.url()));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();
    let wrong = "adm-test-wrong-0123456789";
    for i in 0..20 {
        let a = if i % 2 == 0 {
            raw(
                &c,
                "POST",
                &gw.url("/dashboard"),
                &[("content-type", "application/x-www-form-urlencoded")],
                Some(&format!("key={wrong}")),
            )
            .await
        } else {
            call(&c, "GET", &gw.url("/dashboard/data"), Some(wrong), None).await
        };
        assert_eq!(a.status, 401, "guess {i}: {}", text(&a));
    }
    let a = raw(
        &c,
        "POST",
        &gw.url("/dashboard"),
        &[("content-type", "application/x-www-form-urlencoded")],
        Some(&format!("key={ADMIN}")),
    )
    .await;
    assert_eq!(a.status, 429, "{}", text(&a));
    assert!(a.headers.contains_key("retry-after"));
    let a = call(&c, "GET", &gw.url("/dashboard/data"), Some(ADMIN), None).await;
    assert_eq!(a.status, 429, "{}", text(&a));
    // /metrics: its own count, untouched by the dashboard's guesses.
    let metrics = gw.url("/metrics");
    let a = call(&c, "GET", &metrics, Some(ADMIN), None).await;
    assert_eq!(a.status, 200, "{}", text(&a));
    for i in 0..20 {
        let a = call(&c, "GET", &metrics, Some(wrong), None).await;
        assert_eq!(a.status, 401, "/metrics guess {i}: {}", text(&a));
    }
    let a = call(&c, "GET", &metrics, Some(ADMIN), None).await;
    assert_eq!(a.status, 429, "{}", text(&a));
    assert!(a.headers.contains_key("retry-after"));
    // The API itself is not this limiter's business.
    let a = call(
        &c,
        "POST",
        &gw.url("/v1/chat/completions"),
        Some("pro-a"),
        Some(&chat("test-model", "hi", 5)),
    )
    .await;
    assert_eq!(a.status, 200);
    // Per count, one warning for the first wrong key and one when the address is refused,
    // not 20.
    let deadline = Instant::now() + super::support::WAIT;
    let log = loop {
        let log = gw.stderr();
        if log.matches("wrong admin key").count() >= 4 || Instant::now() > deadline {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(log.matches("wrong admin key").count(), 4, "{log}");
    assert_eq!(log.matches("/metrics: ").count(), 2, "{log}");
}

/// Behind a trusted proxy (`[server] trusted_proxies`), guesses count by the client address
/// the proxy appended to `X-Forwarded-For`, so one guesser doesn't lock out the other clients;
/// from an untrusted peer the header is the client's own words and is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_key_guesses_behind_a_trusted_proxy_count_by_forwarded_address() {
    let (up, _) = start_upstream().await;
    let c = client();
    let wrong = "adm-test-wrong-0123456789";
    let data = |gw: &Gateway| gw.url("/dashboard/data");
    async fn get(c: &HttpClient, url: &str, key: &str, xff: &str) -> Answer {
        let bearer = format!("Bearer {key}");
        raw(
            c,
            "GET",
            url,
            &[("authorization", &bearer), ("x-forwarded-for", xff)],
            None,
        )
        .await
    }

    // The peer (127.0.0.1) is a trusted proxy.
    let trusted = dashboard_config(&up.url()).replacen(
        "[server]\n",
        "[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"127.0.0.1/32\"]\n",
        1,
    );
    let cfg = TempConfig::new(&trusted);
    let gw = Gateway::start(&["--config", cfg.path()]);
    for i in 0..20 {
        // The client's own claim (6.6.6.6) and a trusted hop (10.1.1.1) are skipped.
        let a = get(&c, &data(&gw), wrong, "6.6.6.6, 203.0.113.7, 10.1.1.1").await;
        assert_eq!(a.status, 401, "guess {i}: {}", text(&a));
    }
    let a = get(&c, &data(&gw), ADMIN, "203.0.113.7").await;
    assert_eq!(a.status, 429, "{}", text(&a));
    let a = get(&c, &data(&gw), ADMIN, "203.0.113.8").await;
    assert_eq!(
        a.status,
        200,
        "another client behind the proxy: {}",
        text(&a)
    );
    let a = get(&c, &data(&gw), ADMIN, "6.6.6.6, 203.0.113.8").await;
    assert_eq!(a.status, 200, "{}", text(&a));
    // The sign-in form counts by the same address.
    async fn form(c: &HttpClient, url: &str, xff: &str) -> Answer {
        let headers = [
            ("content-type", "application/x-www-form-urlencoded"),
            ("x-forwarded-for", xff),
        ];
        raw(c, "POST", url, &headers, Some(&format!("key={ADMIN}"))).await
    }
    let sign_in = gw.url("/dashboard");
    assert_eq!(form(&c, &sign_in, "203.0.113.7").await.status, 429);
    assert_eq!(form(&c, &sign_in, "203.0.113.8").await.status, 303);
    // /metrics too, in its own count.
    let metrics = gw.url("/metrics");
    for i in 0..20 {
        let a = get(&c, &metrics, wrong, "203.0.113.7").await;
        assert_eq!(a.status, 401, "/metrics guess {i}: {}", text(&a));
    }
    let a = get(&c, &metrics, ADMIN, "203.0.113.7").await;
    assert_eq!(a.status, 429, "{}", text(&a));
    let a = get(&c, &metrics, ADMIN, "203.0.113.8").await;
    assert_eq!(a.status, 200, "{}", text(&a));
    drop(gw);

    // No trusted proxy: the header is ignored, the peer counts.
    let cfg = TempConfig::new(&dashboard_config(&up.url()));
    let gw = Gateway::start(&["--config", cfg.path()]);
    for i in 0..20 {
        let xff = format!("203.0.113.{i}");
        let a = get(&c, &data(&gw), wrong, &xff).await;
        assert_eq!(a.status, 401, "guess {i}: {}", text(&a));
    }
    let a = get(&c, &data(&gw), ADMIN, "203.0.113.99").await;
    assert_eq!(
        a.status,
        429,
        "a spoofed header from an untrusted peer: {}",
        text(&a)
    );
}

/// Sign-ins sent together from one address can't go past the guess limit: each of
/// `3 * MAX` forms is held back (`Expect: 100-continue`) until the gateway has started
/// reading every one of them (each `100 Continue` seen), then all are sent. At most the
/// limit's 20 are compared (401); the rest are 429 whatever the order the gateway takes them
/// in (counts only, no timing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sign_ins_from_one_address_stay_within_the_guess_limit() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const N: usize = 60;
    let (up, _) = start_upstream().await;
    let cfg = TempConfig::new(&dashboard_config(&up.url()));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let body = "key=adm-test-wrong-0123456789";
    let mut held = Vec::with_capacity(N);
    for i in 0..N {
        let mut s = within("connecting", tokio::net::TcpStream::connect(gw.addr))
            .await
            .unwrap();
        let head = format!(
            "POST /dashboard HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nExpect: 100-continue\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        // The gateway is reading this form's body (its handler runs): `100 Continue`.
        let mut got = Vec::new();
        while !got.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            let n = within(&format!("form {i}: 100 Continue"), s.read(&mut byte))
                .await
                .unwrap();
            assert_eq!(n, 1, "form {i}: closed before 100 Continue: {got:?}");
            got.push(byte[0]);
        }
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with("HTTP/1.1 100"), "form {i}: {got}");
        held.push(s);
    }
    let mut answers = tokio::task::JoinSet::new();
    for mut s in held {
        answers.spawn(async move {
            s.write_all(body.as_bytes()).await.unwrap();
            let mut answer = Vec::new();
            within("an answer", s.read_to_end(&mut answer))
                .await
                .unwrap();
            String::from_utf8_lossy(&answer).into_owned()
        });
    }
    let mut by_status = BTreeMap::<String, usize>::new();
    while let Some(answer) = answers.join_next().await {
        let answer = answer.unwrap();
        let status = answer.get(9..12).unwrap_or("").to_owned();
        *by_status.entry(status).or_default() += 1;
    }
    assert_eq!(by_status.get("401").copied(), Some(20), "{by_status:?}");
    assert_eq!(by_status.get("429").copied(), Some(N - 20), "{by_status:?}");
}

/// The dashboard's forms take no cross-site posts (`Sec-Fetch-Site`, or an `Origin` that
/// isn't the gateway): 403. A sign-in ends the session the browser already had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_posts_are_refused_and_sign_in_replaces_the_session() {
    let (up, _) = start_upstream().await;
    let cfg = TempConfig::new(&dashboard_config(&up.url()));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();
    let form = ("content-type", "application/x-www-form-urlencoded");
    let key = format!("key={ADMIN}");
    for extra in [
        ("sec-fetch-site", "cross-site"),
        ("origin", "https://evil.example"),
        ("origin", "null"),
    ] {
        let a = raw(
            &c,
            "POST",
            &gw.url("/dashboard"),
            &[form, extra],
            Some(&key),
        )
        .await;
        assert_eq!(a.status, 403, "{extra:?}: {}", text(&a));
        assert!(!a.headers.contains_key("set-cookie"), "{extra:?}");
    }
    // The pages send their own origin with their forms (`Referrer-Policy: same-origin`; with
    // `no-referrer` a browser without Fetch Metadata sends `Origin: null`, refused above).
    let page = raw(&c, "GET", &gw.url("/dashboard"), &[], None).await;
    assert_eq!(page.header("referrer-policy"), "same-origin");
    assert!(
        text(&page).contains(r#"<meta name="referrer" content="same-origin">"#),
        "{}",
        text(&page)
    );
    let own = format!("http://{}", gw.addr);
    // No `Sec-Fetch-Site`, the gateway's own `Origin`: signed in.
    let a = raw(
        &c,
        "POST",
        &gw.url("/dashboard"),
        &[form, ("origin", &own)],
        Some(&key),
    )
    .await;
    assert_eq!(a.status, 303, "{}", text(&a));
    let sign_in = || async {
        let a = raw(
            &c,
            "POST",
            &gw.url("/dashboard"),
            &[form, ("origin", &own), ("sec-fetch-site", "same-origin")],
            Some(&key),
        )
        .await;
        assert_eq!(a.status, 303, "{}", text(&a));
        a.header("set-cookie").split(';').next().unwrap().to_owned()
    };
    let first = sign_in().await;
    let data = gw.url("/dashboard/data");
    let status = |cookie: String| {
        let (c, data) = (c.clone(), data.clone());
        async move {
            raw(&c, "GET", &data, &[("cookie", &cookie)], None)
                .await
                .status
        }
    };
    assert_eq!(status(first.clone()).await, 200);
    // A cross-site sign-out does nothing.
    let a = raw(
        &c,
        "POST",
        &gw.url("/dashboard/sign-out"),
        &[("cookie", &first), ("sec-fetch-site", "cross-site")],
        None,
    )
    .await;
    assert_eq!(a.status, 403, "{}", text(&a));
    assert_eq!(status(first.clone()).await, 200);
    // Signing in again with the first session's cookie: a new session, the first ended.
    let a = raw(
        &c,
        "POST",
        &gw.url("/dashboard"),
        &[form, ("cookie", &first), ("origin", &own)],
        Some(&key),
    )
    .await;
    assert_eq!(a.status, 303, "{}", text(&a));
    let second = a.header("set-cookie").split(';').next().unwrap().to_owned();
    assert_ne!(second, first);
    assert_eq!(status(second.clone()).await, 200);
    assert_eq!(status(first.clone()).await, 401);
    // Two cookies of the name (a stale one from another path first): the valid one counts.
    assert_eq!(status(format!("{first}; {second}")).await, 200);
}

#[test]
fn bad_admin_settings_are_named() {
    let base = test_config("http://127.0.0.1:9", "");
    for (server, field) in [
        ("admin_keys = [\"short\"]", "server.admin_keys[0]"),
        ("admin_keys = [\"pro-a\"]", "server.admin_keys[0]"),
        (
            "admin_keys = [\"has a space in it, long\"]",
            "server.admin_keys[0]",
        ),
        (
            "metrics_requires_admin = true",
            "server.metrics_requires_admin",
        ),
        (
            "trusted_proxies = [\"10.0.0.0/8\", \"10.0.0.300/8\"]",
            "server.trusted_proxies[1]",
        ),
        (
            "trusted_proxies = [\"127.0.0.1/33\"]",
            "server.trusted_proxies[0]",
        ),
    ] {
        let cfg = TempConfig::new(&base.replacen(
            "[limiter]\n",
            &format!("[server]\n{server}\n\n[limiter]\n"),
            1,
        ));
        let (code, out, err) = run_to_exit(&["--check-config", "--config", cfg.path()]);
        assert_eq!(code, Some(2), "{server}: {out}{err}");
        assert!(
            format!("{out}{err}").contains(&format!("field `{field}`")),
            "{server}: {out}{err}"
        );
    }
    // An API key given as an admin key is named masked, never whole.
    let long_key = "sk-live-0123456789abcdef";
    let cfg = TempConfig::new(
        &base
            .replacen(
                "[limiter]\n",
                &format!("[server]\nadmin_keys = [\"{long_key}\"]\n\n[limiter]\n"),
                1,
            )
            .replacen(
                "[keys]\n",
                &format!("[keys]\n\"{long_key}\" = {{ user = \"zed\", tier = \"pro\" }}\n"),
                1,
            ),
    );
    let (code, out, err) = run_to_exit(&["--check-config", "--config", cfg.path()]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(!format!("{out}{err}").contains(long_key), "{out}{err}");
    assert!(
        format!("{out}{err}").contains("also an API key"),
        "{out}{err}"
    );
}

/// What the page shows, read from its data attributes.
const READ_PAGE: &str = r##"JSON.stringify({
  served: Number(document.body.dataset.served),
  models: Object.fromEntries([...document.querySelectorAll("article.model")].map((e) => [e.dataset.model, {
    requests: Number(e.dataset.requests), refused: Number(e.dataset.refused),
    input: Number(e.dataset.inputTokens), output: Number(e.dataset.outputTokens),
    in_flight: Number(e.dataset.inFlight),
    rules: Object.fromEntries([...e.querySelectorAll("[data-rule]")].map((r) => [r.dataset.rule, Number(r.dataset.used)])),
    refused_by: Object.fromEntries([...e.querySelectorAll("[data-refused-by]")].map((r) => [r.dataset.refusedBy, Number(r.dataset.count)])),
  }])),
  refused: Object.fromEntries([...document.querySelectorAll("[data-refused-rule]")].map((r) => [r.dataset.refusedRule, Number(r.dataset.count)])),
  callers: Object.fromEntries([...document.querySelectorAll("#callers [data-user]")].map((r) => [r.dataset.user, Number(r.dataset.tokens)])),
  tiers: [...document.querySelectorAll("#tiers [data-limit-name]")].map((r) => [r.dataset.tier, r.dataset.limitName, Number(r.dataset.used), Number(r.dataset.limit)]),
})"##;

/// The sum of a Prometheus counter's series whose labels include every pair of `labels`.
fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            (metric == name).then_some(())?;
            let set = rest.strip_suffix('}')?;
            labels
                .iter()
                .all(|(k, v)| set.split(',').any(|p| p == format!("{k}=\"{v}\"")))
                .then(|| value.parse::<f64>().ok().map(|v| v as u64))?
        })
        .sum()
}

/// `used` of `rule` in the caller `key`'s `/v1/ratelimit`.
async fn used(c: &HttpClient, gw: &Gateway, key: &str, rule: &str) -> u64 {
    super::rule_state(c, gw, key, rule).await["used"]
        .as_u64()
        .unwrap()
}

/// Sends `n` chat requests from `key` to `model`: how many were admitted (200) and refused
/// (429).
async fn traffic(c: &HttpClient, gw: &Gateway, key: &str, model: &str, n: usize) -> (u64, u64) {
    let (mut ok, mut refused) = (0, 0);
    for i in 0..n {
        let body = chat(model, &format!("hello dashboard number {i}"), 8);
        let a = call(
            c,
            "POST",
            &gw.url("/v1/chat/completions"),
            Some(key),
            Some(&body),
        )
        .await;
        match a.status.as_u16() {
            200 => ok += 1,
            429 => refused += 1,
            s => panic!("{key} -> {model}: {s} {}", text(&a)),
        }
    }
    (ok, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_in_chromium_shows_what_the_gateway_counts() {
    let Some(binary) = chromium() else {
        // Skipped only when asked: a missing browser must not pass for a tested page.
        assert!(
            std::env::var_os("GATEWAY_TESTS_WITHOUT_CHROMIUM").is_some_and(|v| v == "1"),
            "no chromium (/usr/bin/chromium): install it (`apt-get install -y chromium`; \
             .ci/run does), or set GATEWAY_TESTS_WITHOUT_CHROMIUM=1 to skip this test"
        );
        eprintln!(
            "\n\n!!! SKIPPED the_page_in_chromium_shows_what_the_gateway_counts: no chromium, \
             and GATEWAY_TESTS_WITHOUT_CHROMIUM=1.\n\n"
        );
        return;
    };
    let (up, upstream) = start_upstream().await;
    // The refusals come from limits that don't slide (a monthly budget, a concurrency), so
    // that the counts hold however long the traffic takes on a loaded machine: the free
    // tier's budget of 60 tokens a month (about five requests), the small model's one slot.
    let cfg = TempConfig::new(
        &dashboard_config(&up.url())
            .replacen(
                "[tiers.free]\nmonthly_tokens = 1000000\n",
                "[tiers.free]\nmonthly_tokens = 60\n",
                1,
            )
            .replacen("rpm = 3\n", "concurrent = 1\n", 1),
    );
    let gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();
    let shots = std::env::temp_dir().join(format!("gateway-dashboard-test-{}", std::process::id()));
    std::fs::create_dir_all(&shots).unwrap();

    // The browser runs on a thread of its own (its pipe is blocking I/O); the test talks to
    // it through closures.
    let (to_browser, jobs) = mpsc::channel::<Box<dyn FnOnce(&mut Browser) + Send>>();
    let browser_thread = std::thread::spawn(move || {
        let mut b = Browser::start(&binary);
        for job in jobs {
            job(&mut b);
        }
    });
    let on_browser = |job: Box<dyn FnOnce(&mut Browser) -> Value + Send>| {
        let (tx, rx) = tokio::sync::oneshot::channel();
        to_browser
            .send(Box::new(move |b: &mut Browser| {
                let _ = tx.send(job(b));
            }))
            .expect("the browser thread is running");
        async move {
            tokio::time::timeout(BROWSER_WAIT * 4, rx)
                .await
                .expect("the browser thread answered in time")
                .expect("the browser thread did not panic")
        }
    };

    // Sign in through the page's own form.
    let dashboard = gw.url("/dashboard");
    on_browser(Box::new(move |b| {
        b.viewport(1280, 800, false);
        b.page("Page.navigate", json!({"url": dashboard}));
        b.wait_until(
            "document.readyState === 'complete' && !!document.getElementById('key')",
            "the sign-in form",
        );
        b.eval(&format!(
            "document.getElementById('key').value = {ADMIN:?}; \
             document.querySelector('form').submit(); true"
        ));
        b.wait_until(
            "Number((document.body && document.body.dataset.updates) || 0) >= 1",
            "a first update after signing in",
        );
        // The cookie as the browser holds it: HttpOnly (the page's script can't read it),
        // SameSite=Strict, for /dashboard.
        assert_eq!(b.eval("document.cookie"), Some(json!("")));
        let cookies = b.command("Storage.getCookies", json!({}), None);
        let cookie = cookies["cookies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "gateway_dashboard")
            .unwrap_or_else(|| panic!("no session cookie in {cookies}"))
            .clone();
        assert_eq!(cookie["httpOnly"], true, "{cookie}");
        assert_eq!(cookie["sameSite"], "Strict", "{cookie}");
        assert_eq!(cookie["path"], "/dashboard", "{cookie}");
        Value::Null
    }))
    .await;

    // Traffic while the page is open: the page follows it.
    let (pro_ok, pro_refused) = traffic(&c, &gw, "pro-a", "test-model", 6).await;
    assert_eq!((pro_ok, pro_refused), (6, 0));
    on_browser(Box::new(move |b| {
        b.wait_until(
            &format!(
                "Number(document.querySelector('article.model[data-model=\"test-model\"]')\
                 ?.dataset.requests) >= {pro_ok}"
            ),
            "the first requests, live",
        );
        Value::Null
    }))
    .await;
    // The free tier's monthly budget: requests until the first refusal, then one more
    // (refused too: nothing gives the budget back this month).
    let (mut free_ok, mut free_refused) = (0, 0);
    while free_refused == 0 {
        let (ok, refused) = traffic(&c, &gw, "free-a", "test-model", 1).await;
        (free_ok, free_refused) = (free_ok + ok, free_refused + refused);
        assert!(
            free_ok < 10,
            "60 tokens a month admitted {free_ok} requests"
        );
    }
    let (ok, refused) = traffic(&c, &gw, "free-a", "test-model", 1).await;
    assert_eq!((ok, refused), (0, 1));
    free_refused += 1;
    assert!(free_ok > 0);
    // The small model's one slot: held by a stream, two more refused by
    // `model-concurrent:small-model`; then free again.
    let held = json!({"model": "small-model", "stream": true, "test_hold": true,
        "max_tokens": 8, "messages": [{"role": "user", "content": "hold the slot"}]});
    let r = super::send(
        &c,
        "POST",
        &gw.url("/v1/chat/completions"),
        Some("pro-b"),
        Some(&held),
    )
    .await;
    assert_eq!(r.status(), 200);
    let mut body = r.into_body();
    within("the held stream's first chunk", body.frame())
        .await
        .expect("a frame")
        .expect("no error");
    let (ok, small_refused) = traffic(&c, &gw, "pro-b", "small-model", 2).await;
    assert_eq!((ok, small_refused), (0, 2));
    upstream.release.add_permits(1);
    within("the held stream's end", body.collect())
        .await
        .expect("the stream ends");
    let (ok, refused) = traffic(&c, &gw, "pro-b", "small-model", 1).await;
    assert_eq!((ok, refused), (1, 0));
    let small_ok = 2;

    // Traffic stopped. The page's next refresh, after this answer, must match the gateway's
    // own figures. Token windows slide (tokens per minute fall as time passes): they are
    // compared when `/v1/ratelimit` reads the same before and after the page's refresh.
    let mut attempts = 0;
    let page = loop {
        attempts += 1;
        let before = used(&c, &gw, "pro-a", "model-tpm:test-model").await;
        let mark = call(&c, "GET", &gw.url("/dashboard/data"), Some(ADMIN), None).await;
        assert_eq!(mark.status, 200);
        let served = mark.json()["served"].as_u64().unwrap();
        let shown = on_browser(Box::new(move |b| {
            b.wait_until(
                &format!("Number(document.body.dataset.served) > {served}"),
                "a refresh after the traffic stopped",
            );
            b.eval(READ_PAGE).expect("the page's numbers")
        }))
        .await;
        let after = used(&c, &gw, "pro-a", "model-tpm:test-model").await;
        let shown: Value = serde_json::from_str(shown.as_str().unwrap()).unwrap();
        if before == after {
            assert_eq!(
                shown["models"]["test-model"]["rules"]["model-tpm:test-model"], before,
                "{shown}"
            );
            break shown;
        }
        assert!(
            attempts < 5,
            "the token window kept moving: {before} then {after}"
        );
    };

    // Against /metrics.
    let metrics = text(&call(&c, "GET", &gw.url("/metrics"), Some(ADMIN), None).await);
    for model in ["test-model", "small-model"] {
        let m = &page["models"][model];
        let requests = metric_sum(
            &metrics,
            "gateway_upstream_responses_total",
            &[("model", model)],
        );
        assert_eq!(m["requests"], requests, "{model}: {m}");
        for (field, kind) in [("input", "input"), ("output", "output")] {
            let tokens = metric_sum(
                &metrics,
                "gateway_tokens_settled_total",
                &[("model", model), ("kind", kind)],
            );
            assert_eq!(m[field], tokens, "{model} {kind}: {m}");
            assert!(tokens > 0, "{model} {kind}");
        }
        assert_eq!(m["in_flight"], 0, "{m}");
    }
    assert_eq!(page["models"]["test-model"]["requests"], pro_ok + free_ok);
    assert_eq!(page["models"]["small-model"]["requests"], small_ok);
    assert_eq!(page["models"]["test-model"]["refused"], free_refused);
    assert_eq!(page["models"]["small-model"]["refused"], small_refused);
    // Each model's refusals by the rule that refused.
    assert_eq!(
        page["models"]["test-model"]["refused_by"],
        json!({"user-monthly-tokens": free_refused}),
        "{page}"
    );
    assert_eq!(
        page["models"]["small-model"]["refused_by"],
        json!({"model-concurrent:small-model": small_refused}),
        "{page}"
    );
    let refused: BTreeMap<String, u64> = serde_json::from_value(page["refused"].clone()).unwrap();
    assert_eq!(
        refused,
        BTreeMap::from([
            ("model-concurrent:small-model".to_owned(), small_refused),
            ("user-monthly-tokens".to_owned(), free_refused),
        ])
    );
    for (rule, n) in &refused {
        assert_eq!(
            metric_sum(
                &metrics,
                "gateway_ratelimit_denied_total",
                &[("rule", rule)]
            ),
            *n,
            "{rule}"
        );
    }

    // Against /v1/ratelimit: each caller's tokens are its monthly budget's use (every
    // request reported its usage), and each tier's row shows its busiest user's.
    for (key, user) in [("pro-a", "carol"), ("free-a", "alice"), ("pro-b", "dave")] {
        let month = used(&c, &gw, key, "user-monthly-tokens").await;
        assert!(month > 0);
        assert_eq!(page["callers"][user], month, "{user}: {}", page["callers"]);
    }
    let tier_row = |tier: &str, limit: &str| {
        page["tiers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r[0] == tier && r[1] == limit)
            .unwrap_or_else(|| panic!("no {tier} {limit} row in {}", page["tiers"]))
            .clone()
    };
    let alice = used(&c, &gw, "free-a", "user-monthly-tokens").await;
    assert_eq!(tier_row("free", "monthly_tokens")[2], alice);
    assert_eq!(tier_row("free", "monthly_tokens")[3], 60);
    let busiest_pro = used(&c, &gw, "pro-a", "user-monthly-tokens")
        .await
        .max(used(&c, &gw, "pro-b", "user-monthly-tokens").await);
    assert_eq!(tier_row("pro", "monthly_tokens")[2], busiest_pro);
    assert_eq!(tier_row("free", "rpm")[3], 10);

    // No horizontal scrolling on a laptop or a phone; the screenshots for people.
    let laptop = shots.join("dashboard-1280x800.png");
    let phone = shots.join("dashboard-390x844.png");
    let (l, p) = (laptop.clone(), phone.clone());
    on_browser(Box::new(move |b| {
        let no_scroll =
            "document.documentElement.scrollWidth <= document.documentElement.clientWidth";
        b.viewport(1280, 800, false);
        b.wait_until(no_scroll, "no horizontal scrolling at 1280x800");
        b.screenshot(&l);
        b.viewport(390, 844, true);
        b.wait_until(no_scroll, "no horizontal scrolling at 390x844");
        b.screenshot(&p);
        Value::Null
    }))
    .await;
    eprintln!(
        "dashboard screenshots: {} and {}",
        laptop.display(),
        phone.display()
    );
    drop(to_browser);
    let _ = within(
        "the browser closing",
        tokio::task::spawn_blocking(move || browser_thread.join()),
    )
    .await;
}
