//! An OpenAI-compatible LLM gateway built on `tower-llm-ratelimit`: API keys with tiers,
//! per-user and per-model limits on requests, tokens, concurrency and daily spend, upstreams
//! per model, streaming, Prometheus metrics, and a built-in mock model so that it runs with
//! nothing else on the machine.
//!
//! ```sh
//! cargo run --release --example gateway                        # 127.0.0.1:8080, mock model
//! cargo run --release --example gateway -- --config my.toml    # your models, tiers and keys
//! cargo run --release --features redis --example gateway -- --redis redis://127.0.0.1:6379
//! ```
//!
//! | module | what |
//! |---|---|
//! | `main.rs` | flags, start-up, graceful shutdown |
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
//! | `deploy/` | Kubernetes (gateway as a sidecar of a model server, Redis) and alerting rules |
//!
//! Exit codes: 0 after a clean shutdown, 2 for a bad flag or configuration (the message
//! names the field), 1 when the gateway can't start (port taken, Redis unreachable).

mod config;
mod forward;
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

use http::HeaderValue;
use tracing_subscriber::EnvFilter;

use crate::config::{Config, StoreKind, Upstream};
use crate::metrics::Metrics;
use crate::server::{App, ModelRoute};

const USAGE: &str = "\
An OpenAI-compatible LLM gateway with rate limits (tower-llm-ratelimit example).

Usage: gateway [OPTIONS]

Options:
  --listen ADDR    Listen on ADDR (default: the config's `listen`, 127.0.0.1:8080)
  --config FILE    Read the configuration from FILE (TOML; default: the built-in
                   examples/gateway/gateway.toml)
  --redis URL      Keep the counters in Redis at URL, shared by every gateway using it
                   (needs the `redis` feature: cargo run --features redis --example gateway)
  -h, --help       Print this help

Logs go to stderr, filtered by RUST_LOG (default: info).";

/// What the command line asked for.
#[derive(Debug, Default)]
struct Flags {
    listen: Option<String>,
    config: Option<String>,
    redis: Option<String>,
    help: bool,
}

fn parse_flags(args: impl IntoIterator<Item = String>) -> Result<Flags, String> {
    let mut flags = Flags::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            flags.help = true;
            continue;
        }
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let slot = match name.as_str() {
            "--listen" => &mut flags.listen,
            "--config" => &mut flags.config,
            "--redis" => &mut flags.redis,
            _ if name.starts_with('-') => return Err(format!("unknown flag `{name}`")),
            _ => return Err(format!("unexpected argument `{arg}`")),
        };
        let value = match inline {
            Some(v) => v,
            None => args
                .next()
                .filter(|v| !v.starts_with("--"))
                .ok_or_else(|| format!("`{name}` needs a value"))?,
        };
        if value.is_empty() {
            return Err(format!("`{name}` needs a value"));
        }
        if slot.replace(value).is_some() {
            return Err(format!("`{name}` is given twice"));
        }
    }
    Ok(flags)
}

/// Why the gateway stopped.
enum Failure {
    /// Bad flags or configuration: exit code 2.
    Config(String),
    /// Could not start or run: exit code 1.
    Runtime(String),
}

fn main() -> ExitCode {
    let flags = match parse_flags(std::env::args().skip(1)) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("gateway: {e}\nRun with --help for the usage.");
            return ExitCode::from(2);
        }
    };
    if flags.help {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let (cfg, builtin) = match load(&flags) {
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

/// Reads, overrides and validates the configuration. True when it is the built-in one.
fn load(flags: &Flags) -> Result<(Config, bool), String> {
    let (mut cfg, source) = match &flags.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--config {path}: can't read the file: {e}"))?;
            (
                Config::parse(&text, path).map_err(|e| e.to_string())?,
                path.clone(),
            )
        }
        None => (
            Config::parse(config::DEFAULT_TOML, "built-in gateway.toml")
                .map_err(|e| e.to_string())?,
            "built-in gateway.toml".to_owned(),
        ),
    };
    let mut overrides = Vec::new();
    if let Some(listen) = &flags.listen {
        if listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(format!(
                "--listen: {listen:?} is not an IP address and port (e.g. 127.0.0.1:8080)"
            ));
        }
        cfg.listen = listen.clone();
        overrides.push("--listen");
    }
    if let Some(url) = &flags.redis {
        cfg.store.kind = StoreKind::Redis;
        cfg.store.url = Some(url.clone());
        overrides.push("--redis");
    }
    if cfg.store.kind == StoreKind::Redis && !cfg!(feature = "redis") {
        let what = if flags.redis.is_some() {
            "--redis"
        } else {
            "field `store.kind`: \"redis\""
        };
        return Err(format!(
            "{what} needs the `redis` feature: \
             cargo run --release --features redis --example gateway -- ..."
        ));
    }
    cfg.validate().map_err(|e| {
        let with = if overrides.is_empty() {
            String::new()
        } else {
            format!(" with {}", overrides.join(", "))
        };
        format!("{source}{with}:\n{e}")
    })?;
    Ok((cfg, flags.config.is_none()))
}

async fn run(cfg: Config, builtin: bool) -> Result<(), Failure> {
    let metrics = Metrics::new();
    let callers = limits::callers(&cfg);
    // Check the rules on a throwaway memory store before connecting to anything, so that
    // configuration errors come first.
    limits::layer(&cfg, &callers, limits::Store::memory(&cfg), &Metrics::new())
        .map_err(|e| Failure::Config(format!("rate-limit rules: {e}")))?;
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
        let api_key = match m.upstream_key() {
            Some(k) => Some(HeaderValue::try_from(format!("Bearer {k}")).map_err(|_| {
                Failure::Config(format!(
                    "field `models.{name}.api_key`: not a valid header value"
                ))
            })?),
            None => None,
        };
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
