//! An OpenAI-compatible LLM gateway built on `tower-llm-ratelimit`: API keys with tiers (and
//! per-key overrides of a tier's limits), per-user and per-model limits on requests, tokens,
//! concurrency, budgets of spend and tokens per UTC day or month (reset at midnight UTC and on
//! the 1st), upstreams
//! per model, streaming, Prometheus metrics, and a built-in mock model so that it runs with
//! nothing else on the machine (and, with `[mock] capacity`, saturates like a GPU: slower
//! tokens past its capacity, 503 past its queue).
//!
//! ```sh
//! cargo run --release --example gateway                        # 127.0.0.1:8080, mock model
//! cargo run --release --example gateway -- --config my.toml    # your models, tiers and keys
//! cargo run --release --features redis --example gateway -- --redis redis://127.0.0.1:6379
//! cargo run --release --features redis --example gateway -- \
//!     --redis-cluster redis://10.0.0.1:7000,redis://10.0.0.2:7000   # a Redis Cluster
//! cargo run --release --example gateway -- --check-config --config my.toml   # validate only
//! ```
//!
//! Every option has an environment variable (`GATEWAY_LISTEN`, `GATEWAY_CONFIG`,
//! `GATEWAY_REDIS`, `GATEWAY_REDIS_CLUSTER`); the command line wins over it. `--help` lists
//! them.
//!
//! `kill -HUP <pid>` reloads the `--config` file without a restart: API keys, tiers, models
//! and limits change at once, the counts of unchanged rules carry over, requests in flight
//! finish under the configuration they started with, and a file with problems changes
//! nothing (each problem is logged with its field). `gateway.toml` says of each key whether
//! SIGHUP reloads it or it needs a restart (`listen`, `[store]`, ...; a changed one is named
//! in a warning and keeps its running value).
//!
//! | module | what |
//! |---|---|
//! | `main.rs` | start-up (the routes and layer a configuration makes), graceful shutdown |
//! | `cli.rs` | the command line (clap) and its environment variables, `--check-config` |
//! | `reload.rs` | SIGHUP: the file read again, checked, and swapped in (or refused) |
//! | `config.rs` | `gateway.toml`'s schema and validation (the file is also the built-in default) |
//! | `limits.rs` | the rules, tiers (a user whose keys override limits is a tier of its own), estimator, prices and store of the `RateLimitLayer` |
//! | `serve.rs` | client connections: header deadline, connection cap, graceful shutdown |
//! | `server.rs` | routes: the API, `/v1/models`, `/v1/ratelimit` (each limit and budget, with its reset time), `/metrics`, `/healthz` |
//! | `proxy.rs` | auth, body deadline and routing before the limiter; the proxy after it |
//! | `tcp.rs` | `TCP_NODELAY` and `TCP_QUICKACK`: no 40 ms delayed-ACK stalls on keep-alive connections |
//! | `upstream.rs` | a model's upstream: origin and path, HTTP or HTTPS client (rustls, HTTP/2 by ALPN, `ca_file`), credential header |
//! | `forward.rs` | which request headers go upstream (an allowlist) |
//! | `upstream_body.rs` | the upstream's response body: passed through, closed when idle too long |
//! | `dashboard.rs` | the live dashboard (`GET /dashboard`, behind `[server] admin_keys`): `dashboard/access.rs` admin keys and sign-in sessions, `dashboard/tally.rs` its counts and five minutes of samples, `dashboard/data.rs` the JSON of `/dashboard/data`, `dashboard/page.html` the page (inline CSS and JS, SVG charts) |
//! | `metrics.rs` | Prometheus metrics, fed by the limiter's observer (decisions, and the `usage` of every response, which the limiter reads once for its token rules and the metrics) and the proxy |
//! | `mock.rs` | the built-in OpenAI-compatible mock model; `mock/capacity.rs`: its capacity model (full speed up to `[mock] capacity`, every token slower beyond it, 503 past `queue`; `GET /v1/mock/stats` on its port), so that saturation shows without a GPU; `mock/sse.rs`: its streams |
//! | `deploy/` | Kubernetes (gateway as a sidecar of a model server, Redis) and alerting rules, checked by `.ci/deploy-check` |
//!
//! Exit codes: 0 after a clean shutdown (or a valid `--check-config`), 2 for a bad option or
//! configuration (the message names the field), 1 when the gateway can't start (port taken,
//! Redis unreachable).

mod capacity;
mod cli;
mod config;
mod dashboard;
mod forward;
mod idle;
mod limits;
mod metrics;
mod mock;
mod proxy;
mod reload;
mod serve;
mod server;
mod tcp;
mod upstream;
mod upstream_body;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::cli::Flags;
use crate::config::{Config, StoreKind, Upstream};
use crate::metrics::Metrics;
use crate::server::App;
use crate::upstream::ModelRoute;

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
    upstream::install_crypto_provider();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let (cfg, builtin) = match cli::checked(&flags) {
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
    match runtime.block_on(run(cfg, builtin, flags)) {
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
    match limits::layer(
        cfg,
        &callers,
        &limits::Store::memory(cfg),
        &Metrics::new(),
        None,
    ) {
        Err(e) => Some(format!("rate-limit rules: {e}")),
        Ok(_) => max_keys_problem(cfg),
    }
}

/// A memory store must hold every bucket one request charges at once (a bucket per rule of
/// its tier and of its model): one that can't would answer every such request 503. A reload
/// checks this again once the running `[store]` is put back in its configuration.
pub(crate) fn max_keys_problem(cfg: &Config) -> Option<String> {
    let most = limits::most_buckets_per_request(cfg, &limits::callers(cfg));
    (cfg.store.kind == config::StoreKind::Memory && cfg.store.max_keys < most).then(|| {
        format!(
            "field `store.max_keys`: must be at least {most}: one request may charge {most} \
             buckets at once (a bucket per rule of its tier and of its model)"
        )
    })
}

/// Where the requests to each model go, for `cfg`: both the start and a reload build them
/// here, on `clients` (whose connection pools every configuration shares). `mock_url` is the
/// built-in mock's base URL, when it runs.
pub(crate) fn routes(
    cfg: &Config,
    clients: &upstream::Clients,
    mock_url: Option<&str>,
) -> Result<BTreeMap<String, Arc<ModelRoute>>, String> {
    let mut routes = BTreeMap::new();
    for (name, m) in &cfg.models {
        routes.insert(name.clone(), Arc::new(clients.route(name, m, mock_url)?));
    }
    Ok(routes)
}

/// What requests use of a configuration: its callers, routes and rate-limit layer (on
/// `store`, whose counters every layer shares). The start and every reload build one.
/// A reload's (`previous` given) signs in to the dashboard for the sessions' next
/// generation, which its `retain_keys` starts (`dashboard::access::Sessions`).
pub(crate) fn build(
    cfg: &Config,
    store: &limits::Store,
    metrics: &Arc<Metrics>,
    clients: &upstream::Clients,
    mock_url: Option<&str>,
    previous: Option<&tower_llm_ratelimit::RateLimitLayer>,
) -> Result<Arc<App>, String> {
    let routes = routes(cfg, clients, mock_url)?;
    let callers = limits::callers(cfg);
    let layer = limits::layer(cfg, &callers, store, metrics, previous)
        .map_err(|e| format!("rate-limit rules: {e}"))?;
    metrics.watch_capacity(&layer, &limits::capacity_rules(cfg));
    // Reloads are one at a time (`reload::Reloader`): nothing else starts a generation.
    let generation = metrics.board.sessions.generation() + u64::from(previous.is_some());
    Ok(Arc::new(App::new(
        cfg,
        callers,
        routes,
        layer,
        Arc::clone(metrics),
        generation,
    )))
}

async fn run(cfg: Config, builtin: bool, flags: Flags) -> Result<(), Failure> {
    // Before anything can take long: SIGHUP's default action would end the process.
    let mut hangups = reload::Hangups::new();
    let metrics = Metrics::new();
    let store = match cfg.store.kind {
        StoreKind::Memory => limits::Store::memory(&cfg),
        #[cfg(feature = "redis")]
        StoreKind::Redis => connect_redis(&cfg).await?,
        #[cfg(not(feature = "redis"))]
        StoreKind::Redis => unreachable!("checked by load()"),
    };
    #[cfg(feature = "redis")]
    if let limits::Store::Redis(s) = &store {
        metrics.watch_redis(s.clone());
    }
    // The mock model, when a model uses it.
    let mut mock = mock::OnDemand::new(&cfg.mock);
    let mock_url = mock
        .url_for(&cfg)
        .await
        .map_err(|e| Failure::Runtime(format!("could not start the mock model: {e}")))?;
    let clients = upstream::Clients::new();
    let app = build(&cfg, &store, &metrics, &clients, mock_url.as_deref(), None)
        .map_err(Failure::Config)?;

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
            &app.models,
            mock_url.as_deref()
        )
    );

    metrics.config_loaded();
    metrics.board.start_sampling();
    let router = Arc::new(ArcSwap::from_pointee(server::router(Arc::clone(&app))));
    let connections = serve::Limits {
        header_timeout: cfg.server.header_timeout(),
        max_connections: cfg.server.max_connections,
    };
    let mut gateway = reload::Reloader::new(reload::Running {
        flags,
        builtin,
        cfg,
        store,
        metrics,
        mock,
        clients,
        router: Arc::clone(&router),
        layer: app.layer.clone(),
    });
    drop(app);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(serve::serve(listener, router, connections, async {
        let _ = stop_rx.await;
    }));
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut prunes = tokio::time::interval(reload::PRUNE_EVERY);
    prunes.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            signal = &mut shutdown => {
                // The running configuration's grace (a reload may have changed it).
                let grace = Duration::from_secs(gateway.config().limiter.shutdown_grace_secs);
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
                if tokio::time::timeout(grace, gateway.flush()).await.is_err() {
                    tracing::warn!(?grace, "rate-limit settlements still running after the grace period");
                }
                return Ok(());
            }
            result = &mut server => return match result {
                Ok(()) => Ok(()),
                Err(e) => Err(Failure::Runtime(format!("server failed: {e}"))),
            },
            () = hangups.next() => gateway.reload().await,
            _ = prunes.tick() => gateway.prune_retired(),
        }
    }
}

/// Connects to Redis, retrying for a few seconds (a Redis started alongside the gateway, as in
/// a fresh deployment, may not answer yet).
#[cfg(feature = "redis")]
async fn connect_redis(cfg: &Config) -> Result<limits::Store, Failure> {
    const PATIENCE: Duration = Duration::from_secs(10);
    let url = cfg.redis_location();
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
            cfg.redis_location(),
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
    let tiers = limits::limit_tiers(cfg);
    for (key, k) in &cfg.keys {
        let shown = if builtin {
            key.clone()
        } else {
            config::masked_key(key)
        };
        let overridden: Vec<&str> = k
            .overrides()
            .limits()
            .iter()
            .filter(|(_, v)| v.is_some())
            .map(|(name, _)| *name)
            .collect();
        let overridden = if overridden.is_empty() {
            String::new()
        } else {
            format!(" with {} overridden", overridden.join(", "))
        };
        let _ = writeln!(
            out,
            "    {shown:<16} user {}, tier {}{overridden} ({})",
            k.user,
            k.tier,
            limits_of_tier(&tiers[&k.limits_tier()])
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

fn limits_of_tier(t: &config::TierConfig) -> String {
    let parts: Vec<String> = [
        (t.rpm, "requests/min"),
        (t.tpm, "tokens/min"),
        (t.input_tpm, "input tokens/min"),
        (t.output_tpm, "output tokens/min"),
        (t.concurrent, "concurrent"),
        (t.daily_cost, "cost units/UTC day"),
        (t.monthly_cost, "cost units/UTC month"),
        (t.monthly_tokens, "tokens/UTC month"),
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
