//! The command line (clap): `--listen`, `--config`, `--redis` and their `GATEWAY_*`
//! environment variables, `--check-config`, and the configuration they select.

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
#[derive(Debug, Parser)]
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
    /// Check the configuration (with the other options applied), print every problem, and
    /// exit: 0 when it is valid, 2 when it is not. Connects to nothing.
    #[arg(long)]
    pub(crate) check_config: bool,
}

/// `--check-config`: every problem of the configuration, or a line saying it is valid.
pub(crate) fn check_config(flags: &Flags) -> ExitCode {
    let source = flags.config.as_deref().unwrap_or("built-in gateway.toml");
    let checked = load(flags).and_then(|(cfg, _)| {
        let problems: Vec<String> = rule_problems(&cfg)
            .into_iter()
            .chain(
                cfg.models
                    .iter()
                    .filter_map(|(name, m)| upstream::credential(name, m).err()),
            )
            .collect();
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(format!("{source}:\n{}", problems.join("\n")))
        }
    });
    match checked {
        Ok(cfg) => {
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

/// Reads, overrides and validates the configuration. True when it is the built-in one.
pub(crate) fn load(flags: &Flags) -> Result<(Config, bool), String> {
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
