//! A plain hyper 1 server (no framework) rate limited per client IP and globally.
//!
//! hyper has no `ConnectInfo`: the accept loop knows each connection's peer address and
//! puts it in every request as [`PeerAddr`], which `key::client_ip()` reads.
//!
//! ```text
//! cargo run --example hyper                  # listens on 127.0.0.1:3001
//! cargo run --example hyper -- 127.0.0.1:8080
//! ADDR=3002 cargo run --example hyper        # a bare port means 127.0.0.1:<port>
//!
//! for i in $(seq 6); do curl -si http://127.0.0.1:3001/ | head -n1; done
//! ```
//!
//! The sixth request within a minute answers `429 Too Many Requests` with `Retry-After`
//! and an OpenAI-style JSON error. Stop with Ctrl-C.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use tower_llm_ratelimit::key::{self, PeerAddr};
use tower_llm_ratelimit::{Quota, RateLimitLayer, RequestBody, Rule};

const DEFAULT_ADDR: &str = "127.0.0.1:3001";

/// The application: what the limiter protects.
async fn hello(req: Request<RequestBody<Incoming>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = format!("hello from {}\n", req.uri().path());
    Ok(Response::new(Full::new(Bytes::from(body))))
}

/// The address to listen on: the first argument, else `$ADDR`, else 127.0.0.1:3001. A bare
/// port is a port on 127.0.0.1.
fn listen_addr() -> Result<SocketAddr, String> {
    let raw = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("ADDR").ok())
        .unwrap_or_else(|| DEFAULT_ADDR.to_owned());
    if let Ok(port) = raw.parse::<u16>() {
        return Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    }
    raw.parse()
        .map_err(|e| format!("bad listen address {raw:?}: {e}"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Every rule applies to every request; a request passes only if all admit it.
    let layer = RateLimitLayer::builder()
        .rule(Rule::new("per-ip", key::client_ip(), Quota::per_minute(5)))
        .rule(Rule::new("global", key::global(), Quota::per_minute(100)))
        .build()?;

    let listener = TcpListener::bind(listen_addr()?).await?;
    println!("listening on http://{}", listener.local_addr()?);

    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    eprintln!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut ctrl_c => break,
        };

        // hyper writes a response's head and body separately; without TCP_NODELAY the body
        // waits for the client's delayed ACK, ~40 ms per request on a keep-alive connection.
        if let Err(e) = stream.set_nodelay(true) {
            eprintln!("TCP_NODELAY for {remote}: {e}");
        }

        // One service per connection: it tags requests with this connection's peer, then
        // rate limits them. Layer clones share one store, so one budget for all connections.
        let svc = ServiceBuilder::new()
            .map_request(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(PeerAddr(remote));
                req
            })
            .layer(layer.clone())
            .service_fn(hello);

        tokio::spawn(async move {
            let conn = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc));
            if let Err(e) = conn.await {
                eprintln!("connection from {remote}: {e}");
            }
        });
    }
    println!("shutting down");
    Ok(())
}
