//! End to end over real TCP: a tonic server with the layer (`Server::builder().layer(..)`),
//! serving tonic-health's prebuilt `grpc.health.v1.Health`, and a real tonic client.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tower::util::MapRequestLayer;
use tower_llm_ratelimit::key;
use tower_llm_ratelimit::{Quota, RateLimitLayer, RequestBody, Rule};

use support::{within, TestServer};

/// Serves the health service behind `layer`; the returned counter counts the calls that got
/// past the layer.
async fn start(layer: RateLimitLayer) -> (TestServer, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let server = support::spawn_server(move |listener, shutdown| async move {
        // The reporter must outlive the server: it holds the statuses the service reports.
        let (_reporter, health) = tonic_health::server::health_reporter();
        Server::builder()
            .layer(layer)
            // Inside the limiter: sees admitted calls only.
            .layer(MapRequestLayer::new(
                move |req: http::Request<RequestBody<tonic::body::Body>>| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    req
                },
            ))
            .serve_with_incoming_shutdown(health, TcpIncoming::from(listener), shutdown)
            .await
            .expect("tonic server failed");
    })
    .await;
    (server, calls)
}

async fn connect(server: &TestServer) -> HealthClient<Channel> {
    let endpoint = Endpoint::from_shared(server.url())
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    let channel = within("connect", endpoint.connect())
        .await
        .expect("connect failed");
    HealthClient::new(channel)
}

/// One `Check` of the overall server health, with `api_key` as `x-api-key` metadata.
async fn check(
    client: &mut HealthClient<Channel>,
    api_key: Option<&str>,
) -> Result<tonic::Response<tonic_health::pb::HealthCheckResponse>, Status> {
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    if let Some(k) = api_key {
        req.metadata_mut().insert("x-api-key", k.parse().unwrap());
    }
    within("health check", client.check(req)).await
}

fn metadata_u64(map: &tonic::metadata::MetadataMap, name: &str) -> u64 {
    map.get(name)
        .unwrap_or_else(|| panic!("missing metadata `{name}` in {map:?}"))
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

const N: u64 = 3;

#[tokio::test]
async fn admits_n_then_resource_exhausted() {
    let layer = RateLimitLayer::builder()
        .rule(Rule::new("grpc-global", key::global(), Quota::per_hour(N)))
        .build()
        .unwrap();
    let (server, calls) = start(layer).await;
    let mut client = connect(&server).await;

    for i in 0..N {
        let response = check(&mut client, None)
            .await
            .unwrap_or_else(|s| panic!("call {i} denied: {s:?}"));
        assert_eq!(
            response.get_ref().status(),
            ServingStatus::Serving,
            "call {i}"
        );
        // Rate-limit headers arrive as response metadata.
        let md = response.metadata();
        assert_eq!(
            metadata_u64(md, "x-ratelimit-remaining-requests"),
            N - 1 - i
        );
        assert!(md.get("ratelimit").is_some(), "{md:?}");
    }

    let status = check(&mut client, None)
        .await
        .expect_err("call past the limit was admitted");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("`grpc-global`"), "{status:?}");
    assert!(status.message().contains("requests"), "{status:?}");
    assert!(
        metadata_u64(status.metadata(), "retry-after") >= 1,
        "{status:?}"
    );

    // The service keeps denying without reaching the health service.
    let status = check(&mut client, None).await.expect_err("admitted");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(calls.load(Ordering::SeqCst) as u64, N);

    drop(client);
    server.shutdown().await;
}

#[tokio::test]
async fn missing_api_key_is_unauthenticated() {
    let layer = RateLimitLayer::builder()
        .rule(Rule::new(
            "api-key",
            key::header("x-api-key"),
            Quota::per_hour(2),
        ))
        .build()
        .unwrap();
    let (server, calls) = start(layer).await;
    let mut client = connect(&server).await;

    let status = check(&mut client, None)
        .await
        .expect_err("admitted without a key");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("`api-key`"), "{status:?}");
    assert!(status.message().contains("x-api-key"), "{status:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    // With a key: one budget per key.
    for _ in 0..2 {
        check(&mut client, Some("k1"))
            .await
            .expect("k1 within its quota");
    }
    let status = check(&mut client, Some("k1"))
        .await
        .expect_err("k1 over quota");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    check(&mut client, Some("k2"))
        .await
        .expect("k2 has its own budget");
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    drop(client);
    server.shutdown().await;
}
