//! The README quick start: an axum app with a per-key request limit and a per-key token limit.
//!
//! ```sh
//! cargo run --example axum
//! curl -i -H 'x-api-key: alice' -H 'x-max-tokens: 500' -X POST localhost:3000/v1/chat/completions
//! ```

use std::net::SocketAddr;

use axum::routing::post;
use axum::serve::ListenerExt;
use axum::Router;
use tower_llm_ratelimit::{cost, key, Quota, RateLimitLayer, Rule};

async fn handler() -> &'static str {
    "{\"choices\":[]}"
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let layer = RateLimitLayer::builder()
        .rule(Rule::new(
            "user-rpm",
            key::header("x-api-key"),
            Quota::per_minute(60),
        ))
        .rule(Rule::new(
            "user-tpm",
            key::header("x-api-key"),
            Quota::per_minute(100_000).tokens(),
        ))
        // Tokens a request may use: here the client's `x-max-tokens` header, default 1,000.
        // (The OpenAI body estimator reads the request body instead.)
        .cost(cost::from_fn(|req| {
            Some(
                req.headers()
                    .get("x-max-tokens")
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .unwrap_or(1_000),
            )
        }))
        .build()?;

    let app = Router::new()
        .route("/v1/chat/completions", post(handler))
        .layer(layer);

    let addr: SocketAddr = std::env::var("LISTEN")
        .unwrap_or_else(|_| "127.0.0.1:3000".to_owned())
        .parse()?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    // hyper writes a response's head and body separately; without TCP_NODELAY the body
    // waits for the client's delayed ACK, ~40 ms per request on a keep-alive connection.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            eprintln!("TCP_NODELAY: {e}");
        }
    });
    axum::serve(listener, app).await?;
    Ok(())
}
