//! A tonic gRPC server rate limited with `Server::builder().layer(..)`: tonic-health's
//! `grpc.health.v1.Health` service, 3 calls a minute for everyone.
//!
//! ```text
//! cargo run --example tonic                         # serves on 127.0.0.1:50051
//! cargo run --example tonic -- serve 127.0.0.1:6000
//! cargo run --example tonic -- client               # 5 checks against 127.0.0.1:50051
//! ADDR=6000 cargo run --example tonic -- client     # a bare port means 127.0.0.1:<port>
//! ```
//!
//! The client's first three checks answer `SERVING`; the next ones fail with
//! `RESOURCE_EXHAUSTED` and a message naming the rule, until the minute has passed.
//! `grpc_health_probe -addr=127.0.0.1:50051` works too. Stop the server with Ctrl-C.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Endpoint, Server};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tower_llm_ratelimit::{key, Quota, RateLimitLayer, Rule};

const DEFAULT_ADDR: &str = "127.0.0.1:50051";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `raw`, else `$ADDR`, else 127.0.0.1:50051. A bare port is a port on 127.0.0.1.
fn parse_addr(raw: Option<String>) -> Result<SocketAddr, BoxError> {
    let raw = raw
        .or_else(|| std::env::var("ADDR").ok())
        .unwrap_or_else(|| DEFAULT_ADDR.to_owned());
    if let Ok(port) = raw.parse::<u16>() {
        return Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    }
    raw.parse()
        .map_err(|e| format!("bad address {raw:?}: {e}").into())
}

async fn serve(addr: SocketAddr) -> Result<(), BoxError> {
    // One bucket for every caller. gRPC rejections are trailers-only responses: status 8
    // RESOURCE_EXHAUSTED when denied (16 UNAUTHENTICATED / 3 INVALID_ARGUMENT for a missing
    // key, with a rule keyed by e.g. `key::header("x-api-key")`).
    let layer = RateLimitLayer::builder()
        .rule(Rule::new(
            "grpc-global",
            key::global(),
            Quota::per_minute(3),
        ))
        .build()?;

    // Keep the reporter: it is how a real server would flip services to NOT_SERVING.
    let (_reporter, health) = tonic_health::server::health_reporter();

    let listener = TcpListener::bind(addr).await?;
    println!("gRPC health service on {}", listener.local_addr()?);

    Server::builder()
        .layer(layer)
        .serve_with_incoming_shutdown(health, TcpIncoming::from(listener), async {
            let _ = tokio::signal::ctrl_c().await;
            println!("shutting down");
        })
        .await?;
    Ok(())
}

async fn client(addr: SocketAddr) -> Result<(), BoxError> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await?;
    let mut health = HealthClient::new(channel);
    for i in 1..=5 {
        let req = HealthCheckRequest {
            service: String::new(),
        };
        match health.check(req).await {
            Ok(r) => {
                let remaining = r
                    .metadata()
                    .get("x-ratelimit-remaining-requests")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("?");
                println!(
                    "check {i}: {:?} (remaining {remaining})",
                    r.get_ref().status()
                );
            }
            Err(status) => println!("check {i}: {:?}: {}", status.code(), status.message()),
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        None | Some("serve") => serve(parse_addr(args.next())?).await,
        Some("client") => client(parse_addr(args.next())?).await,
        // `cargo run --example tonic -- 127.0.0.1:6000`: serve there.
        Some(addr) => serve(parse_addr(Some(addr.to_owned()))?).await,
    }
}
