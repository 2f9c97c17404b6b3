//! The command line (clap): `--listen`, `--config`, `--redis`, `--redis-cluster` and their
//! `GATEWAY_*` environment variables, `--check-config`, and the configuration they select.

use std::fmt;
use std::process::ExitCode;

use clap::builder::NonEmptyStringValueParser;
use clap::Parser;

use crate::config::{self, Config, StoreKind};
use crate::rule_problems;
use crate::upstream;

/// An OpenAI-compatible LLM gateway with rate limits (tower-llm-ratelimit example).
///
/// With no options it listens on 127.0.0.1:8080 in front of a built-in mock model, with
/// demo API keys. Every option can also be set by its environment variable; an option on
/// the command line wins over the variable.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "gateway",
    version,
    after_help = "Logs go to stderr, filtered by RUST_LOG (default: info).\n\
                  Exit codes: 0 clean shutdown or valid configuration, 2 bad option or \
                  configuration, 1 could not start."
)]
pub(crate) struct Flags {
    /// Listen on ADDR (default: the configuration's `listen`, 127.0.0.1:8080)
    #[arg(long, env = "GATEWAY_LISTEN", value_name = "ADDR", value_parser = NonEmptyStringValueParser::new())]
    pub(crate) listen: Option<String>,
    /// Read the configuration from FILE (TOML; default: the built-in
    /// examples/gateway/gateway.toml)
    #[arg(long, env = "GATEWAY_CONFIG", value_name = "FILE", value_parser = NonEmptyStringValueParser::new())]
    pub(crate) config: Option<String>,
    /// Keep the counters in Redis at URL, shared by every gateway using it (needs the `redis`
    /// feature: cargo run --features redis --example gateway)
    #[arg(long, env = "GATEWAY_REDIS", value_name = "URL", value_parser = NonEmptyStringValueParser::new())]
    pub(crate) redis: Option<String>,
    /// Keep the counters in the Redis Cluster reachable through these nodes (comma-separated
    /// URLs; the other nodes are found from them); instead of --redis
    #[arg(
        long,
        env = "GATEWAY_REDIS_CLUSTER",
        value_name = "URL,URL,...",
        value_delimiter = ',',
        value_parser = NonEmptyStringValueParser::new(),
        conflicts_with = "redis"
    )]
    pub(crate) redis_cluster: Option<Vec<String>>,
    /// Check the configuration (with the other options applied), print every problem, and
    /// exit: 0 when it is valid, 2 when it is not. Connects to nothing.
    #[arg(long)]
    pub(crate) check_config: bool,
}

/// What is wrong with a configuration: every problem found, each naming its field.
#[derive(Debug)]
pub(crate) struct Problems {
    /// The file (and the options applied to it) the problems are found in, when they are
    /// its fields'.
    pub(crate) source: Option<String>,
    pub(crate) list: Vec<String>,
}

impl Problems {
    fn one(problem: String) -> Self {
        Self {
            source: None,
            list: vec![problem],
        }
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(source) = &self.source {
            writeln!(f, "{source}:")?;
        }
        f.write_str(&self.list.join("\n"))
    }
}

/// `--check-config`: every problem of the configuration, or a line saying it is valid.
pub(crate) fn check_config(flags: &Flags) -> ExitCode {
    let source = source(flags);
    match checked(flags) {
        Ok((cfg, _)) => {
            println!(
                "{source}: the configuration is valid (models: {}, tiers: {}, keys: {})",
                cfg.models.len(),
                cfg.tiers.len(),
                cfg.keys.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gateway: bad configuration:\n{e}");
            ExitCode::from(2)
        }
    }
}

/// Where the configuration comes from, for messages.
pub(crate) fn source(flags: &Flags) -> &str {
    flags.config.as_deref().unwrap_or(BUILT_IN)
}

const BUILT_IN: &str = "built-in gateway.toml";

/// [`load`], then what the library says of the rules and the upstream keys: every problem a
/// start (or a reload) would meet before connecting to anything. `--check-config`, the start
/// and SIGHUP all use it.
pub(crate) fn checked(flags: &Flags) -> Result<(Config, bool), Problems> {
    let (cfg, builtin) = load(flags)?;
    let list: Vec<String> = rule_problems(&cfg)
        .into_iter()
        .chain(
            cfg.models
                .iter()
                .filter_map(|(name, m)| upstream::credential(name, m).err()),
        )
        .collect();
    if list.is_empty() {
        Ok((cfg, builtin))
    } else {
        Err(Problems {
            source: Some(source(flags).to_owned()),
            list,
        })
    }
}

/// Reads, overrides and validates the configuration. True when it is the built-in one.
pub(crate) fn load(flags: &Flags) -> Result<(Config, bool), Problems> {
    let (mut cfg, source) = match &flags.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Problems::one(format!("--config {path}: can't read the file: {e}")))?;
            (
                Config::parse(&text, path).map_err(|e| Problems::one(e.to_string()))?,
                path.clone(),
            )
        }
        None => (
            Config::parse(config::DEFAULT_TOML, BUILT_IN)
                .map_err(|e| Problems::one(e.to_string()))?,
            BUILT_IN.to_owned(),
        ),
    };
    let mut overrides = Vec::new();
    if let Some(listen) = &flags.listen {
        if listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(Problems::one(format!(
                "--listen: {listen:?} is not an IP address and port (e.g. 127.0.0.1:8080)"
            )));
        }
        cfg.listen = listen.clone();
        overrides.push("--listen");
    }
    // Either flag replaces where the file keeps the counters (a server or a cluster).
    if let Some(url) = &flags.redis {
        cfg.store.kind = StoreKind::Redis;
        cfg.store.url = Some(url.clone());
        cfg.store.cluster = None;
        overrides.push("--redis");
    }
    if let Some(nodes) = &flags.redis_cluster {
        cfg.store.kind = StoreKind::Redis;
        cfg.store.url = None;
        cfg.store.cluster = Some(nodes.clone());
        overrides.push("--redis-cluster");
    }
    if cfg.store.kind == StoreKind::Redis && !cfg!(feature = "redis") {
        let what = if flags.redis.is_some() {
            "--redis"
        } else if flags.redis_cluster.is_some() {
            "--redis-cluster"
        } else {
            "field `store.kind`: \"redis\""
        };
        return Err(Problems::one(format!(
            "{what} needs the `redis` feature: \
             cargo run --release --features redis --example gateway -- ..."
        )));
    }
    let list = cfg.problems();
    if !list.is_empty() {
        let with = if overrides.is_empty() {
            String::new()
        } else {
            format!(" with {}", overrides.join(", "))
        };
        return Err(Problems {
            source: Some(format!("{source}{with}")),
            list,
        });
    }
    Ok((cfg, flags.config.is_none()))
}
