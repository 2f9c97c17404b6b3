//! The layer in a real axum server over real TCP, driven by a real HTTP client.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tower_llm_ratelimit::key::RequestView;
use tower_llm_ratelimit::observe::{DecisionEvent, Outcome};
use tower_llm_ratelimit::store::MemoryStore;
use tower_llm_ratelimit::{
    cost, key, tier, FailurePolicy, MissingKey, Quota, RateLimitLayer, Rule,
};

const WAIT: Duration = Duration::from_secs(10);

/// A running server; dropped → shut down.
struct Server {
    addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    _stop: oneshot::Sender<()>,
}

async fn serve(layer: RateLimitLayer) -> Server {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let app = Router::new()
        .route(
            "/v1/chat/completions",
            post(move || {
                let c = c.clone();
                async move {
                    c.fetch_add(1, Ordering::SeqCst);
                    "ok"
                }
            }),
        )
        .layer(layer);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    Server {
        addr,
        calls,
        _stop: stop,
    }
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: serde_json::Value,
}

/// One request over a fresh HTTP/1.1 connection.
async fn send(addr: SocketAddr, headers: &[(&str, &str)]) -> Reply {
    tokio::time::timeout(WAIT, async {
        let stream = TcpStream::connect(addr).await.unwrap();
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let mut req = Request::post("/v1/chat/completions").header("host", "localhost");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = sender
            .send_request(req.body(Empty::<Bytes>::new()).unwrap())
            .await
            .unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        Reply {
            status,
            headers,
            body,
        }
    })
    .await
    .expect("request timed out")
}

fn h<'a>(r: &'a Reply, name: &str) -> &'a str {
    r.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

#[tokio::test]
async fn n_plus_k_requests_admit_n() {
    let layer = RateLimitLayer::builder()
        .rule(Rule::new(
            "user-rph",
            key::header("x-api-key"),
            Quota::per_hour(5),
        ))
        .build()
        .unwrap();
    let server = serve(layer).await;
    for i in 0..5 {
        let r = send(server.addr, &[("x-api-key", "alice")]).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(h(&r, "x-ratelimit-limit-requests"), "5");
        assert_eq!(h(&r, "x-ratelimit-remaining-requests"), (4 - i).to_string());
        assert_eq!(h(&r, "ratelimit-policy"), r#""user-rph";q=5;w=3600"#);
        assert!(h(&r, "ratelimit").starts_with(&format!(r#""user-rph";r={};t="#, 4 - i)));
    }
    for _ in 0..2 {
        let r = send(server.addr, &[("x-api-key", "alice")]).await;
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.body["error"]["code"], "rate_limit_exceeded");
        assert_eq!(r.body["error"]["type"], "requests");
        let msg = r.body["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("`user-rph`") && msg.contains("limit 5") && msg.contains("used 5"),
            "{msg}"
        );
        let retry: u64 = h(&r, "retry-after").parse().unwrap();
        assert!((1..=7200).contains(&retry), "{retry}");
        let retry_ms: u64 = h(&r, "retry-after-ms").parse().unwrap();
        assert!(retry_ms.div_ceil(1000) == retry, "{retry_ms} vs {retry}");
        assert_eq!(h(&r, "x-ratelimit-remaining-requests"), "0");
        assert_eq!(h(&r, "content-type"), "application/json");
    }
    assert_eq!(
        server.calls.load(Ordering::SeqCst),
        5,
        "denied requests never reach the service"
    );
    // Another key has its own bucket.
    assert_eq!(
        send(server.addr, &[("x-api-key", "bob")]).await.status,
        StatusCode::OK
    );
}

fn tokens_from_header() -> impl tower_llm_ratelimit::cost::CostEstimator {
    cost::from_fn(|req: &RequestView<'_>| {
        req.headers().get("x-tokens")?.to_str().ok()?.parse().ok()
    })
}

#[tokio::test]
async fn rules_are_all_or_nothing() {
    let layer = RateLimitLayer::builder()
        .rule(Rule::new(
            "user-rph",
            key::header("x-api-key"),
            Quota::per_hour(10),
        ))
        .rule(Rule::new(
            "user-tph",
            key::header("x-api-key"),
            Quota::per_hour(100).tokens(),
        ))
        .cost(tokens_from_header())
        .build()
        .unwrap();
    let server = serve(layer).await;
    let a = send(server.addr, &[("x-api-key", "u"), ("x-tokens", "60")]).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(h(&a, "x-ratelimit-remaining-tokens"), "40");
    let b = send(server.addr, &[("x-api-key", "u"), ("x-tokens", "60")]).await;
    assert_eq!(b.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(b.body["error"]["type"], "tokens");
    // The denied request did not charge the request rule either.
    assert_eq!(h(&b, "x-ratelimit-remaining-requests"), "9");
    let c = send(server.addr, &[("x-api-key", "u"), ("x-tokens", "40")]).await;
    assert_eq!(c.status, StatusCode::OK);
    assert_eq!(h(&c, "x-ratelimit-remaining-requests"), "8");
    assert_eq!(h(&c, "x-ratelimit-remaining-tokens"), "0");
    // A request that can never fit says so, and still gets a non-zero Retry-After.
    let d = send(server.addr, &[("x-api-key", "v"), ("x-tokens", "101")]).await;
    assert_eq!(d.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(d.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("can never fit"));
    assert_eq!(h(&d, "retry-after"), "3600");
    // No estimate: 400 with a JSON body, nothing charged.
    let e = send(server.addr, &[("x-api-key", "u")]).await;
    assert_eq!(e.status, StatusCode::BAD_REQUEST);
    assert_eq!(e.body["error"]["code"], "invalid_cost");
    assert_eq!(server.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn missing_key_policies() {
    let layer = RateLimitLayer::builder()
        .rule(Rule::new(
            "by-key",
            key::header("x-api-key"),
            Quota::per_hour(100),
        ))
        .rule(
            Rule::new("by-team", key::header("x-team"), Quota::per_hour(2))
                .on_missing_key(MissingKey::Shared),
        )
        .rule(
            Rule::new("by-org", key::header("x-org"), Quota::per_hour(1))
                .on_missing_key(MissingKey::Skip),
        )
        .build()
        .unwrap();
    let server = serve(layer).await;
    let r = send(server.addr, &[]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.body["error"]["code"], "missing_rate_limit_key");
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("header `x-api-key`"));
    // No team: two different keys share the anonymous team bucket (limit 2); no org: skipped.
    assert_eq!(
        send(server.addr, &[("x-api-key", "a")]).await.status,
        StatusCode::OK
    );
    assert_eq!(
        send(server.addr, &[("x-api-key", "b")]).await.status,
        StatusCode::OK
    );
    let r = send(server.addr, &[("x-api-key", "c")]).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("`by-team`"));
    // With a team, its own bucket; an org is limited to 1.
    let with_org = [("x-api-key", "a"), ("x-team", "t1"), ("x-org", "o")];
    assert_eq!(send(server.addr, &with_org).await.status, StatusCode::OK);
    assert_eq!(
        send(server.addr, &with_org).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    let bad = RateLimitLayer::builder()
        .rule(Rule::new(
            "x",
            key::header("bad header"),
            Quota::per_hour(1),
        ))
        .build();
    assert!(bad.unwrap_err().to_string().contains("invalid header name"));
}

#[cfg(feature = "axum")]
#[tokio::test]
async fn client_ip_trusts_forwarded_headers_only_from_proxies() {
    // The test client connects from 127.0.0.1, which is trusted here.
    let trusted = RateLimitLayer::builder()
        .rule(Rule::new(
            "ip",
            key::client_ip().trust_proxy("127.0.0.1/32"),
            Quota::per_hour(1),
        ))
        .build()
        .unwrap();
    let server = serve(trusted).await;
    let from = |ip: &'static str| [("x-forwarded-for", ip)];
    assert_eq!(
        send(server.addr, &from("203.0.113.1")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        send(server.addr, &from("203.0.113.2")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        send(server.addr, &from("203.0.113.1")).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Forged left entries don't matter: the rightmost untrusted address is the client.
    let forged = [("x-forwarded-for", "6.6.6.6, 203.0.113.2")];
    assert_eq!(
        send(server.addr, &forged).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );

    // Without trust, the headers are ignored and the peer (127.0.0.1) is the key.
    let untrusted = RateLimitLayer::builder()
        .rule(Rule::new("ip", key::client_ip(), Quota::per_hour(1)))
        .build()
        .unwrap();
    let server = serve(untrusted).await;
    assert_eq!(
        send(server.addr, &from("203.0.113.1")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        send(server.addr, &from("203.0.113.9")).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test]
async fn tiers_pick_the_quota() {
    let layer = RateLimitLayer::builder()
        .rule(
            Rule::new("user-rph", key::bearer_token(), Quota::per_hour(1))
                .tier("pro", Quota::per_hour(3)),
        )
        .tiers(tier::lookup(
            key::bearer_token(),
            [("sk-pro", "pro"), ("sk-free", "free")],
        ))
        .build()
        .unwrap();
    let server = serve(layer).await;
    let auth = |k: &'static str| [("authorization", k)];
    let mut ok = 0;
    for _ in 0..5 {
        if send(server.addr, &auth("Bearer sk-pro")).await.status == StatusCode::OK {
            ok += 1;
        }
    }
    assert_eq!(ok, 3);
    // `free` is not listed by the rule: the base quota (the default for callers without a tier).
    assert_eq!(
        send(server.addr, &auth("Bearer sk-free")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        send(server.addr, &auth("Bearer sk-free")).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        send(server.addr, &auth("Bearer sk-none")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        send(server.addr, &[]).await.status,
        StatusCode::UNAUTHORIZED
    );
}

/// The `RateLimit-Policy` of several rules names each rule's quota for the caller's tier
/// (the layer precomputes the joined value per tier; a skipped rule is left out).
#[tokio::test]
async fn policy_header_follows_tiers_and_skipped_rules() {
    let layer = RateLimitLayer::builder()
        .tiers(tier::header("x-tier"))
        .rule(
            Rule::new("a", key::header("x-user"), Quota::per_minute(10))
                .tier("pro", Quota::per_minute(100)),
        )
        .rule(
            Rule::new("b", key::header("x-org"), Quota::per_minute(20))
                .on_missing_key(MissingKey::Skip)
                .tier("ent", Quota::per_minute(2000)),
        )
        .rule(
            Rule::new("c", key::header("x-user"), Quota::per_hour(30))
                .tier("pro", Quota::per_hour(300))
                .tier("ent", Quota::per_hour(3000)),
        )
        .build()
        .unwrap();
    let server = serve(layer).await;
    for (tier, org, want) in [
        (
            None,
            true,
            r#""a";q=10;w=60, "b";q=20;w=60, "c";q=30;w=3600"#,
        ),
        (
            Some("pro"),
            true,
            r#""a";q=100;w=60, "b";q=20;w=60, "c";q=300;w=3600"#,
        ),
        (
            Some("ent"),
            true,
            r#""a";q=10;w=60, "b";q=2000;w=60, "c";q=3000;w=3600"#,
        ),
        (
            Some("other"),
            true,
            r#""a";q=10;w=60, "b";q=20;w=60, "c";q=30;w=3600"#,
        ),
        (Some("pro"), false, r#""a";q=100;w=60, "c";q=300;w=3600"#),
    ] {
        let mut headers = vec![("x-user", "u1")];
        if org {
            headers.push(("x-org", "o1"));
        }
        if let Some(t) = tier {
            headers.push(("x-tier", t));
        }
        let r = send(server.addr, &headers).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(h(&r, "ratelimit-policy"), want, "{tier:?}, org: {org}");
    }
}

#[tokio::test]
async fn observer_status_and_failure_policy() {
    let events: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = events.clone();
    let store = MemoryStore::builder().max_keys(1).build();
    // A request with `x-org` names two buckets, more than the store can hold: a store error.
    let per_org = || {
        Rule::new("org", key::header("x-org"), Quota::per_hour(10)).on_missing_key(MissingKey::Skip)
    };
    let layer = RateLimitLayer::builder()
        .rule(Rule::new("k", key::header("x-api-key"), Quota::per_hour(1)))
        .rule(per_org())
        .store(store.clone())
        .observer(move |e: &DecisionEvent<'_>| {
            let line = match e.outcome {
                Outcome::Admitted => format!("admitted {}", e.rules[0].remaining),
                Outcome::Denied { rule, .. } => format!("denied {rule}"),
                Outcome::StoreError { admitted } => format!("store error {admitted}"),
                other => format!("{other:?}"),
            };
            seen.lock().unwrap().push(line);
        })
        .build()
        .unwrap();
    // The status API reads without charging.
    let req = Request::get("/").header("x-api-key", "a").body(()).unwrap();
    let status = layer.status(RequestView::from_request(&req)).await.unwrap();
    assert_eq!(status[0].snapshot.unwrap().remaining, 1);
    assert_eq!(store.len(), 0);

    let server = serve(layer.clone()).await;
    assert_eq!(
        send(server.addr, &[("x-api-key", "a")]).await.status,
        StatusCode::OK
    );
    assert_eq!(
        send(server.addr, &[("x-api-key", "a")]).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    let status = layer.status(RequestView::from_request(&req)).await.unwrap();
    assert_eq!(status[0].snapshot.unwrap().remaining, 0);
    // The store can't hold the request's buckets: it fails closed with 503.
    let r = send(server.addr, &[("x-api-key", "b"), ("x-org", "o")]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.body["error"]["code"], "rate_limit_unavailable");
    assert_eq!(h(&r, "retry-after"), "1");
    assert_eq!(
        *events.lock().unwrap(),
        ["admitted 0", "denied k", "store error false"]
    );

    // Fail-open admits without counting.
    let open = RateLimitLayer::builder()
        .rule(Rule::new("k", key::header("x-api-key"), Quota::per_hour(1)))
        .rule(per_org())
        .store(store)
        .on_store_error(FailurePolicy::Open)
        .build()
        .unwrap();
    let server = serve(open).await;
    let both = [("x-api-key", "c"), ("x-org", "o")];
    assert_eq!(send(server.addr, &both).await.status, StatusCode::OK);
    assert_eq!(send(server.addr, &both).await.status, StatusCode::OK);
}

#[tokio::test]
async fn clones_share_one_budget_across_routes() {
    let layer = RateLimitLayer::builder()
        .rule(Rule::new("global", key::global(), Quota::per_hour(2)))
        .build()
        .unwrap();
    let app = Router::new()
        .route("/a", get(|| async { "a" }).layer(layer.clone()))
        .route("/b", get(|| async { "b" }).layer(layer));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let mut statuses = Vec::new();
    for path in ["/a", "/b", "/a"] {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut s, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = Request::get(path)
            .header("host", "x")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let res = tokio::time::timeout(WAIT, s.send_request(req))
            .await
            .unwrap()
            .unwrap();
        statuses.push(res.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 429]);
}
