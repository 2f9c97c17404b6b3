//! The `tracing` events the crate docs promise (see `observe`): a `DEBUG` event per denial
//! naming the rule, key and retry delay, a `WARN` event per store failure. Captured by a
//! subscriber set for the test's thread (the test runs on a current-thread runtime, so the
//! server's tasks emit there too), through the real layer over a real TCP server and client;
//! the fields' values are checked, not only their presence.

mod support;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use tokio::net::{TcpListener, TcpStream};
use tower_llm_ratelimit::clock::ManualClock;
use tower_llm_ratelimit::store::MemoryStore;
use tower_llm_ratelimit::{key, tier, FailurePolicy, Quota, RateLimitLayer, Rule};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

use support::within;

/// One event: its level, target and fields (`message` among them), each as text.
#[derive(Debug, Clone)]
struct Captured {
    level: Level,
    target: String,
    fields: BTreeMap<String, String>,
}

/// Keeps every event.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Captured>>>);

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl<S: Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut fields = BTreeMap::new();
        event.record(&mut Fields(&mut fields));
        self.0.lock().unwrap().push(Captured {
            level: *event.metadata().level(),
            target: event.metadata().target().to_owned(),
            fields,
        });
    }
}

impl Capture {
    /// The crate's events whose message is `message`.
    fn events(&self, message: &str) -> Vec<Captured> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.fields.get("message").map(String::as_str) == Some(message))
            .cloned()
            .collect()
    }
}

/// The layer in front of an upstream answering `ok`, on `127.0.0.1:<free port>`.
async fn serve(layer: RateLimitLayer) -> SocketAddr {
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(layer);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A GET over a new connection: the status and headers.
async fn send(addr: SocketAddr, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap) {
    let stream = within("connect", TcpStream::connect(addr)).await.unwrap();
    let (mut sender, conn) = within(
        "handshake",
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut req = Request::get("/").header("host", "test");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = within(
        "response",
        sender.send_request(req.body(Empty::<Bytes>::new()).unwrap()),
    )
    .await
    .unwrap();
    let (parts, body) = res.into_parts();
    within("body", body.collect()).await.unwrap();
    (parts.status, parts.headers)
}

/// A denial is a `DEBUG` event naming the rule, the key, the tier, the cost, what remains
/// and the retry delay the response carries.
#[tokio::test]
async fn a_denial_is_a_debug_event_with_its_rule_key_and_retry_delay() {
    let capture = Capture::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(capture.clone()));
    let layer = RateLimitLayer::builder()
        .rule(Rule::new(
            "user-rpm",
            key::header("x-user"),
            Quota::per_minute(2),
        ))
        .tiers(tier::header("x-tier"))
        .store(MemoryStore::builder().clock(ManualClock::new()).build())
        .build()
        .unwrap();
    let addr = serve(layer).await;
    let alice = [("x-user", "alice"), ("x-tier", "free")];
    for _ in 0..2 {
        assert_eq!(send(addr, &alice).await.0, StatusCode::OK);
    }
    assert!(capture.events("request rate limited").is_empty());
    let (status, headers) = send(addr, &alice).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);

    let denials = capture.events("request rate limited");
    assert_eq!(denials.len(), 1, "{denials:?}");
    let e = &denials[0];
    assert_eq!(e.level, Level::DEBUG);
    assert_eq!(e.target, "tower_llm_ratelimit");
    let retry_after_ms = headers["retry-after-ms"].to_str().unwrap();
    let want: BTreeMap<String, String> = [
        ("message", "request rate limited"),
        ("rule", "user-rpm"),
        ("key", "alice"),
        ("tier", "free"),
        ("cost", "1"),
        ("remaining", "0"),
        ("retry_after_ms", retry_after_ms),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(e.fields, want);
}

/// A store failure is a `WARN` event with the error and what the failure policy did.
#[tokio::test]
async fn a_store_failure_is_a_warn_event_with_the_error_and_the_policy() {
    let capture = Capture::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(capture.clone()));
    for (policy, status, admitted) in [
        (
            FailurePolicy::Closed,
            StatusCode::SERVICE_UNAVAILABLE,
            "false",
        ),
        (FailurePolicy::Open, StatusCode::OK, "true"),
    ] {
        // Two buckets per request in a store that holds one: every decision fails.
        let layer = RateLimitLayer::builder()
            .rule(Rule::new("rph", key::global(), Quota::per_hour(1_000)))
            .rule(Rule::new("rpd", key::global(), Quota::per_day(10_000)))
            .store(MemoryStore::builder().max_keys(1).build())
            .on_store_error(policy)
            .build()
            .unwrap();
        let addr = serve(layer).await;
        assert_eq!(send(addr, &[]).await.0, status);
        let failures = capture.events("rate-limit store failed");
        let e = failures.last().expect("a store failure event");
        assert_eq!(e.level, Level::WARN);
        assert_eq!(e.target, "tower_llm_ratelimit");
        assert_eq!(e.fields["admitted"], admitted);
        assert_eq!(
            e.fields["error"],
            "rate-limit store is full: it holds at most 1 keys and can't make room for this request's"
        );
    }
    assert_eq!(capture.events("rate-limit store failed").len(), 2);
}
