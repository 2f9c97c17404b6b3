//! An OpenAI-compatible LLM gateway built on `tower-llm-ratelimit`: API keys with tiers,
//! per-user and per-model limits on requests, tokens, concurrency and daily spend, upstreams
//! per model, streaming, Prometheus metrics, and a built-in mock model so that it runs with
//! nothing else on the machine.
//!
//! ```sh
//! cargo run --release --example gateway                        # 127.0.0.1:8080, mock model
//! cargo run --release --example gateway -- --config my.toml    # your models, tiers and keys
//! cargo run --release --features redis --example gateway -- --redis redis://127.0.0.1:6379
//! cargo run --release --example gateway -- --check-config --config my.toml   # validate only
//! ```
//!
//! Every option has an environment variable (`GATEWAY_LISTEN`, `GATEWAY_CONFIG`,
//! `GATEWAY_REDIS`); the command line wins over it. `--help` lists them.
//!
//! | module | what |
//! |---|---|
//! | `main.rs` | start-up, graceful shutdown |
//! | `cli.rs` | the command line (clap) and its environment variables, `--check-config` |
//! | `config.rs` | `gateway.toml`'s schema and validation (the file is also the built-in default) |
//! | `limits.rs` | the rules, tiers, estimator, prices and store of the `RateLimitLayer` |
//! | `serve.rs` | client connections: header deadline, connection cap, graceful shutdown |
//! | `server.rs` | routes: the API, `/v1/models`, `/v1/ratelimit`, `/metrics`, `/healthz` |
//! | `proxy.rs` | auth, body deadline and routing before the limiter; the proxy after it |
//! | `tcp.rs` | `TCP_NODELAY` and `TCP_QUICKACK`: no 40 ms delayed-ACK stalls on keep-alive connections |
//! | `forward.rs` | which request headers go upstream (an allowlist) |
//! | `upstream_body.rs` | the upstream's response body: metered, closed when idle too long |
//! | `metrics.rs` | Prometheus metrics, fed by the limiter's observer and the proxy |
//! | `mock.rs` | the built-in OpenAI-compatible mock model |
//! | `deploy/` | Kubernetes (gateway as a sidecar of a model server, Redis) and alerting rules, checked by `.ci/deploy-check` |
//!
//! Exit codes: 0 after a clean shutdown (or a valid `--check-config`), 2 for a bad option or
//! configuration (the message names the field), 1 when the gateway can't start (port taken,
//! Redis unreachable).

mod cli;
mod config;
mod forward;
mod idle;
mod limits;
mod metrics;
mod mock;
mod proxy;
mod serve;
mod server;
mod tcp;
mod upstream_body;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use http::HeaderValue;
use tracing_subscriber::EnvFilter;

use crate::cli::Flags;
use crate::config::{Config, StoreKind, Upstream};
use crate::metrics::Metrics;
use crate::server::{App, ModelRoute};

/// Why the gateway stopped.
enum Failure {
    /// Bad flags or configuration: exit code 2.
    Config(String),
    /// Could not start or run: exit code 1.
    Runtime(String),
}

fn main() -> ExitCode {
    // A bad option prints clap's message and exits with 2; --help and --version exit with 0.
    let flags = Flags::parse();
    if flags.check_config {
        return cli::check_config(&flags);
    }
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let (cfg, builtin) = match cli::load(&flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gateway: bad configuration:\n{e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gateway: could not start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cfg, builtin)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(e)) => {
            eprintln!("gateway: bad configuration:\n{e}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(e)) => {
            eprintln!("gateway: {e}");
            ExitCode::from(1)
        }
    }
}

/// What the library says of the rules the configuration makes, built on a throwaway memory
/// store (nothing is connected to).
pub(crate) fn rule_problems(cfg: &Config) -> Option<String> {
    let callers = limits::callers(cfg);
    limits::layer(cfg, &callers, limits::Store::memory(cfg), &Metrics::new())
        .err()
        .map(|e| format!("rate-limit rules: {e}"))
}

/// The `Authorization` header the gateway sends to a model's upstream, if it has a key.
pub(crate) fn upstream_auth(
    name: &str,
    m: &config::ModelConfig,
) -> Result<Option<HeaderValue>, String> {
    m.upstream_key()
        .map(|k| {
            HeaderValue::try_from(format!("Bearer {k}"))
                .map_err(|_| format!("field `models.{name}.api_key`: not a valid header value"))
        })
        .transpose()
}

async fn run(cfg: Config, builtin: bool) -> Result<(), Failure> {
    let metrics = Metrics::new();
    let callers = limits::callers(&cfg);
    // Check the rules on a throwaway memory store before connecting to anything, so that
    // configuration errors come first.
    if let Some(problem) = rule_problems(&cfg) {
        return Err(Failure::Config(problem));
    }
    let store = match cfg.store.kind {
        StoreKind::Memory => limits::Store::memory(&cfg),
        #[cfg(feature = "redis")]
        StoreKind::Redis => connect_redis(&cfg).await?,
        #[cfg(not(feature = "redis"))]
        StoreKind::Redis => unreachable!("checked by load()"),
    };
    let layer = limits::layer(&cfg, &callers, store, &metrics)
        .map_err(|e| Failure::Config(format!("rate-limit rules: {e}")))?;

    // The mock model, when a model uses it.
    let mut mock_url = None;
    if cfg
        .models
        .values()
        .any(|m| matches!(m.upstream(), Upstream::Mock))
    {
        let (url, _) = mock::start(Duration::from_millis(cfg.mock.token_delay_ms))
            .await
            .map_err(|e| Failure::Runtime(format!("could not start the mock model: {e}")))?;
        mock_url = Some(url);
    }
    let mut routes = BTreeMap::new();
    for (name, m) in &cfg.models {
        let (origin, path) = match m.upstream() {
            Upstream::Http { origin, path } => (origin, path),
            Upstream::Mock => {
                let url = mock_url.as_deref().expect("started above");
                let (origin, path) = url.rsplit_once("/v1").expect("mock URL ends with /v1");
                (origin.to_owned(), format!("{path}/v1"))
            }
        };
        let api_key = upstream_auth(name, m).map_err(Failure::Config)?;
        routes.insert(
            name.clone(),
            Arc::new(ModelRoute {
                name: name.as_str().into(),
                origin,
                path,
                api_key,
                timeout: m.timeout(),
                stream_idle_timeout: m.stream_idle_timeout(),
            }),
        );
    }

    let listener = tokio::net::TcpListener::bind(cfg.listen_addr())
        .await
        .map_err(|e| Failure::Runtime(format!("could not listen on {}: {e}", cfg.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Failure::Runtime(e.to_string()))?;
    println!(
        "{}",
        banner(
            &cfg,
            builtin,
            &addr.to_string(),
            &routes,
            mock_url.as_deref()
        )
    );

    let limiter = layer.clone();
    let app = Arc::new(App::new(&cfg, callers, routes, layer, metrics));
    let router = server::router(app);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let connections = serve::Limits {
        header_timeout: cfg.server.header_timeout(),
        max_connections: cfg.server.max_connections,
    };
    let mut server = tokio::spawn(serve::serve(listener, router, connections, async {
        let _ = stop_rx.await;
    }));
    let grace = Duration::from_secs(cfg.limiter.shutdown_grace_secs);
    tokio::select! {
        signal = shutdown_signal() => {
            tracing::info!(
                %signal,
                ?grace,
                "shutting down: no new connections, waiting for requests in flight"
            );
            let _ = stop_tx.send(());
            match tokio::time::timeout(grace, &mut server).await {
                Ok(_) => tracing::info!("every request finished"),
                Err(_) => {
                    server.abort();
                    tracing::warn!(?grace, "requests still in flight after the grace period; exiting")
                }
            }
            // Settlements with a store that does I/O (Redis) finish in background tasks:
            // let them reach the store before the runtime goes.
            if tokio::time::timeout(grace, limiter.flush()).await.is_err() {
                tracing::warn!(?grace, "rate-limit settlements still running after the grace period");
            }
            Ok(())
        }
        result = &mut server => match result {
            Ok(()) => Ok(()),
            Err(e) => Err(Failure::Runtime(format!("server failed: {e}"))),
        },
    }
}

/// Connects to Redis, retrying for a few seconds (a Redis started alongside the gateway, as in
/// a fresh deployment, may not answer yet).
#[cfg(feature = "redis")]
async fn connect_redis(cfg: &Config) -> Result<limits::Store, Failure> {
    const PATIENCE: Duration = Duration::from_secs(10);
    let url = cfg.store.url.as_deref().unwrap_or_default();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match limits::Store::redis(cfg).await {
            Ok(store) => return Ok(store),
            Err(e) if tokio::time::Instant::now() + Duration::from_secs(1) < deadline => {
                tracing::warn!(%url, error = %e, "Redis not reachable yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                return Err(Failure::Runtime(format!(
                    "could not connect to Redis at {url} within {PATIENCE:?}: {e}"
                )))
            }
        }
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM, naming it.
async fn shutdown_signal() -> &'static str {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    };
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                s = ctrl_c => s,
                _ = term.recv() => "SIGTERM",
            },
            Err(_) => ctrl_c.await,
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await
}

/// What the gateway prints at start-up: the address, the models, the keys.
fn banner(
    cfg: &Config,
    builtin: bool,
    addr: &str,
    routes: &BTreeMap<String, Arc<ModelRoute>>,
    mock_url: Option<&str>,
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "LLM gateway listening on http://{addr}");
    let store = match cfg.store.kind {
        StoreKind::Memory => "memory (this process)".to_owned(),
        StoreKind::Redis => format!(
            "redis {} (prefix {:?})",
            cfg.store.url.as_deref().unwrap_or_default(),
            cfg.store.prefix
        ),
    };
    let _ = writeln!(out, "  store:  {store}");
    let _ = writeln!(out, "  models:");
    for (name, r) in routes {
        let m = &cfg.models[name];
        let upstream = match m.upstream() {
            Upstream::Mock => format!(
                "built-in mock model at {}",
                mock_url.unwrap_or("(not started)")
            ),
            Upstream::Http { .. } => format!("{}{}", r.origin, r.path),
        };
        let _ = writeln!(out, "    {name:<16} -> {upstream}{}", limits_of_model(m));
    }
    let _ = writeln!(
        out,
        "  API keys{}:",
        if builtin {
            " (demo)"
        } else {
            " (shown masked)"
        }
    );
    for (key, k) in &cfg.keys {
        let shown = if builtin { key.clone() } else { mask(key) };
        let t = &cfg.tiers[&k.tier];
        let _ = writeln!(
            out,
            "    {shown:<16} user {}, tier {} ({})",
            k.user,
            k.tier,
            limits_of_tier(t)
        );
    }
    if let (true, Some(model)) = (builtin, routes.keys().next()) {
        let _ = write!(
            out,
            "  try:\n    curl -s http://{addr}/v1/chat/completions -H 'Authorization: Bearer demo-free' \
             -d '{{\"model\":\"{model}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello there\"}}]}}'"
        );
    }
    out.trim_end().to_owned()
}

/// A key of a configuration file, masked (keys are validated as printable ASCII).
fn mask(key: &str) -> String {
    if key.len() >= 12 {
        format!("{}...", &key[..4])
    } else {
        "***".to_owned()
    }
}

fn limits_of_tier(t: &config::TierConfig) -> String {
    let parts: Vec<String> = [
        (t.rpm, "requests/min"),
        (t.tpm, "tokens/min"),
        (t.input_tpm, "input tokens/min"),
        (t.output_tpm, "output tokens/min"),
        (t.concurrent, "concurrent"),
        (t.daily_cost, "cost units/day"),
    ]
    .iter()
    .filter_map(|(v, what)| v.map(|n| format!("{n} {what}")))
    .collect();
    if parts.is_empty() {
        "no limits".to_owned()
    } else {
        parts.join(", ")
    }
}

fn limits_of_model(m: &config::ModelConfig) -> String {
    let parts: Vec<String> = [
        (m.rpm, "requests/min"),
        (m.tpm, "tokens/min"),
        (m.input_tpm, "input tokens/min"),
        (m.output_tpm, "output tokens/min"),
        (m.concurrent, "concurrent"),
    ]
    .iter()
    .filter_map(|(v, what)| v.map(|n| format!("{n} {what}")))
    .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!(" (all callers: {})", parts.join(", "))
    }
}
