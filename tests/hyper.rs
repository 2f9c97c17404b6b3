//! End to end over real TCP: a plain hyper 1 server (as in `examples/hyper.rs`) with the
//! layer, and hyper-util's client.

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tower::ServiceBuilder;
use tower_llm_ratelimit::clock::ManualClock;
use tower_llm_ratelimit::key::{self, PeerAddr};
use tower_llm_ratelimit::store::MemoryStore;
use tower_llm_ratelimit::{FailurePolicy, Quota, RateLimitLayer, RequestBody, Rule};

use support::{within, Shutdown, TestServer};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Accepts connections until `shutdown`, serving each with `layer` over a handler that
/// counts its calls. With `tag_peer`, requests carry the connection's [`PeerAddr`].
async fn serve(
    listener: TcpListener,
    mut shutdown: Shutdown,
    layer: RateLimitLayer,
    calls: Arc<AtomicUsize>,
    tag_peer: bool,
) {
    let mut conns = JoinSet::new();
    loop {
        let (stream, remote) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => accepted.expect("accept"),
        };
        let calls = Arc::clone(&calls);
        let svc = ServiceBuilder::new()
            .map_request(move |mut req: Request<Incoming>| {
                if tag_peer {
                    req.extensions_mut().insert(PeerAddr(remote));
                }
                req
            })
            .layer(layer.clone())
            .service_fn(move |_req: Request<RequestBody<Incoming>>| {
                calls.fetch_add(1, Ordering::SeqCst);
                async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"hello"))))
                }
            });
        conns.spawn(async move {
            // A client closing its connection is not a server failure.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
                .await;
        });
    }
    // Aborts the connections still open (idle pooled ones) and waits for them.
    conns.shutdown().await;
}

async fn start(layer: RateLimitLayer, tag_peer: bool) -> (TestServer, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let server = support::spawn_server(move |listener, shutdown| {
        serve(listener, shutdown, layer, counter, tag_peer)
    })
    .await;
    (server, calls)
}

fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends a GET with `headers` and reads the whole response.
async fn get(client: &HttpClient, url: &str, headers: &[(&str, &str)]) -> (Response<()>, Bytes) {
    let raw: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
    get_raw(client, url, &raw).await
}

/// [`get`] with header values of any bytes, each a line of its own.
async fn get_raw(
    client: &HttpClient,
    url: &str,
    headers: &[(&str, &[u8])],
) -> (Response<()>, Bytes) {
    let mut req = Request::get(url);
    for (name, value) in headers {
        let value = hyper::header::HeaderValue::from_bytes(value).expect("header value");
        req = req.header(*name, value);
    }
    let req = req.body(Full::default()).unwrap();
    let response = within("response", client.request(req))
        .await
        .expect("request failed");
    let (parts, body) = response.into_parts();
    let body = within("response body", body.collect())
        .await
        .expect("body failed")
        .to_bytes();
    (Response::from_parts(parts, ()), body)
}

fn header<'a>(r: &'a Response<()>, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .unwrap_or_else(|| panic!("missing header `{name}` in {:?}", r.headers()))
        .to_str()
        .unwrap()
}

fn header_u64(r: &Response<()>, name: &str) -> u64 {
    header(r, name)
        .parse()
        .unwrap_or_else(|e| panic!("header `{name}` is not a number: {e}"))
}

const N: u64 = 3;
const K: u64 = 2;

fn per_ip_layer() -> RateLimitLayer {
    RateLimitLayer::builder()
        // Hour-long windows: nothing refills while the test runs.
        .rule(Rule::new("per-ip", key::client_ip(), Quota::per_hour(N)))
        .rule(Rule::new("global", key::global(), Quota::per_hour(100)))
        .build()
        .unwrap()
}

#[tokio::test]
async fn admits_n_then_rejects_with_429() {
    let (server, calls) = start(per_ip_layer(), true).await;
    let client = http_client();
    let url = format!("{}/v1/chat/completions", server.url());

    for i in 0..N {
        let (r, body) = get(&client, &url, &[]).await;
        assert_eq!(r.status(), StatusCode::OK, "request {i}");
        assert_eq!(&body[..], b"hello");
        assert_eq!(
            header(&r, "ratelimit-policy"),
            format!(r#""per-ip";q={N};w=3600, "global";q=100;w=3600"#)
        );
        let state = header(&r, "ratelimit");
        assert!(
            state.starts_with(&format!(r#""per-ip";r={};t="#, N - 1 - i)),
            "{state}"
        );
        assert!(
            state.contains(&format!(r#""global";r={};t="#, 100 - 1 - i)),
            "{state}"
        );
        // The tightest request rule is the per-IP one.
        assert_eq!(header_u64(&r, "x-ratelimit-limit-requests"), N);
        assert_eq!(header_u64(&r, "x-ratelimit-remaining-requests"), N - 1 - i);
        assert!(!header(&r, "x-ratelimit-reset-requests").is_empty());
        assert!(r.headers().get("retry-after").is_none());
    }

    for i in 0..K {
        let (r, body) = get(&client, &url, &[]).await;
        assert_eq!(
            r.status(),
            StatusCode::TOO_MANY_REQUESTS,
            "request {}",
            N + i
        );
        assert_eq!(header(&r, "content-type"), "application/json");
        let retry_after = header_u64(&r, "retry-after");
        let retry_after_ms = header_u64(&r, "retry-after-ms");
        assert!(retry_after >= 1, "retry-after {retry_after}");
        assert!(retry_after_ms >= 1, "retry-after-ms {retry_after_ms}");
        assert!(
            retry_after * 1000 >= retry_after_ms,
            "retry-after {retry_after}s rounds retry-after-ms {retry_after_ms} up"
        );
        assert_eq!(header_u64(&r, "x-ratelimit-remaining-requests"), 0);
        // All or nothing: the denied request charged no rule, not even the global one.
        let state = header(&r, "ratelimit");
        assert!(
            state.contains(&format!(r#""global";r={};t="#, 100 - N)),
            "{state}"
        );

        let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON body");
        let error = &json["error"];
        assert_eq!(error["code"], "rate_limit_exceeded", "{json}");
        assert_eq!(error["type"], "requests", "{json}");
        let message = error["message"].as_str().expect("error.message");
        assert!(message.contains("`per-ip`"), "{message}");
    }

    assert_eq!(
        calls.load(Ordering::SeqCst) as u64,
        N,
        "the handler ran only for admitted requests"
    );
    drop(client);
    server.shutdown().await;
}

#[tokio::test]
async fn forwarding_headers_count_only_from_trusted_proxies() {
    // Untrusted peer (the default): a client can't pick its own bucket with X-Forwarded-For.
    let (server, calls) = start(per_ip_layer(), true).await;
    let client = http_client();
    let url = server.url();
    let statuses = {
        let mut out = Vec::new();
        for i in 0..N + 1 {
            let xff = format!("203.0.113.{i}");
            let (r, _) = get(&client, &url, &[("x-forwarded-for", &xff)]).await;
            out.push(r.status());
        }
        out
    };
    assert_eq!(&statuses[..N as usize], vec![StatusCode::OK; N as usize]);
    assert_eq!(statuses[N as usize], StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(calls.load(Ordering::SeqCst) as u64, N);
    drop(client);
    server.shutdown().await;

    // The test client is the trusted proxy: each forwarded client has its own bucket.
    let layer = RateLimitLayer::builder()
        .rule(Rule::new(
            "per-ip",
            key::client_ip().trust_proxy("127.0.0.1"),
            Quota::per_hour(1),
        ))
        .build()
        .unwrap();
    let (server, calls) = start(layer, true).await;
    let client = http_client();
    let url = server.url();
    for i in 0..3 {
        let xff = format!("203.0.113.{i}");
        let (r, _) = get(&client, &url, &[("x-forwarded-for", &xff)]).await;
        assert_eq!(r.status(), StatusCode::OK, "client {xff}");
    }
    let (r, _) = get(&client, &url, &[("x-forwarded-for", "203.0.113.0")]).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    drop(client);
    server.shutdown().await;
}

/// Behind a proxy that appends `X-Forwarded-For` (the test client, trusted): a `Forwarded`
/// header the client adds picks no bucket, and a non-ASCII byte the client put in front of
/// the address its proxy appended neither hides that address nor lands in the proxy's bucket.
#[tokio::test]
async fn a_client_cannot_pick_its_bucket_through_forwarding_headers() {
    let layer = RateLimitLayer::builder()
        .rule(Rule::new(
            "per-ip",
            key::client_ip().trust_proxy("127.0.0.1"),
            Quota::per_hour(1),
        ))
        .build()
        .unwrap();
    let (server, calls) = start(layer, true).await;
    let client = http_client();
    let url = server.url();
    let mut statuses = Vec::new();
    for i in 0..3 {
        let forged = format!("for=6.6.6.{i}");
        let headers = [
            ("forwarded", &forged[..]),
            ("x-forwarded-for", "203.0.113.7"),
        ];
        statuses.push(get(&client, &url, &headers).await.0.status());
    }
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::TOO_MANY_REQUESTS
        ],
        "one bucket for 203.0.113.7, whatever `Forwarded` says"
    );

    let appended: [(&str, &[u8]); 1] = [("x-forwarded-for", b"\x80, 198.51.100.1")];
    let (r, _) = get_raw(&client, &url, &appended).await;
    assert_eq!(r.status(), StatusCode::OK);
    let (r, _) = get(&client, &url, &[("x-forwarded-for", "198.51.100.1")]).await;
    assert_eq!(
        r.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "the request with the bad byte was counted as 198.51.100.1"
    );
    let alone: [(&str, &[u8]); 1] = [("x-forwarded-for", b"\x80")];
    let (r, _) = get_raw(&client, &url, &alone).await;
    assert_eq!(r.status(), StatusCode::OK);
    // The proxy's own bucket is untouched by it.
    let (r, _) = get(&client, &url, &[]).await;
    assert_eq!(r.status(), StatusCode::OK, "the proxy's own request");
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    drop(client);
    server.shutdown().await;
}

/// A memory store at its `max_keys`, with a layer that admits on store errors: a flood of
/// new keys is still counted, each key's second request denied (the least recently used
/// buckets make room; a refused key would be admitted uncounted).
#[tokio::test]
async fn at_max_keys_a_flood_of_new_keys_is_counted_under_fail_open() {
    const MAX_KEYS: usize = 50;
    let store = MemoryStore::builder()
        .clock(ManualClock::new())
        .max_keys(MAX_KEYS)
        .build();
    let layer = RateLimitLayer::builder()
        .rule(Rule::new(
            "per-key",
            key::header("x-api-key"),
            Quota::per_hour(1),
        ))
        .store(store.clone())
        .on_store_error(FailurePolicy::Open)
        .build()
        .unwrap();
    let (server, calls) = start(layer, true).await;
    let client = http_client();
    let url = server.url();
    for i in 0..4 * MAX_KEYS {
        let key = format!("key-{i}");
        let (first, _) = get(&client, &url, &[("x-api-key", &key)]).await;
        assert_eq!(first.status(), StatusCode::OK, "{key}");
        let (second, _) = get(&client, &url, &[("x-api-key", &key)]).await;
        assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS, "{key}");
        assert!(store.len() <= MAX_KEYS);
    }
    assert_eq!(store.len(), MAX_KEYS);
    assert_eq!(calls.load(Ordering::SeqCst), 4 * MAX_KEYS);
    drop(client);
    server.shutdown().await;
}

#[tokio::test]
async fn without_a_peer_address_client_ip_is_missing() {
    // A server that forgets to insert `PeerAddr`: the rule can't key the request.
    let (server, calls) = start(per_ip_layer(), false).await;
    let client = http_client();
    let (r, body) = get(&client, &server.url(), &[]).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON body");
    assert_eq!(json["error"]["code"], "missing_rate_limit_key", "{json}");
    assert_eq!(json["error"]["type"], "invalid_request_error", "{json}");
    let message = json["error"]["message"].as_str().unwrap();
    assert!(message.contains("client IP address"), "{message}");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    drop(client);
    server.shutdown().await;
}
