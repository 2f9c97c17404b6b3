//! The configuration: `gateway.toml`'s schema, its parsing and its validation.
//!
//! Parsing (serde + toml) reports unknown keys and wrong types with the field's path;
//! [`Config::problems`] checks what types can't (limits > 0, tiers that exist, upstream
//! URLs, CA files, header names) and names the field too. At start both end the gateway with
//! exit code 2; on SIGHUP they keep the running configuration (`reload.rs`).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::Uri;
use serde::Deserialize;

/// The built-in configuration: the commented example file itself, so the two can't drift.
pub(crate) const DEFAULT_TOML: &str = include_str!("gateway.toml");

/// The name `[store] kind` and `[models.*] upstream` use for the built-in mock model.
pub(crate) const MOCK: &str = "mock";

/// The longest a `*_secs` timeout may be: a year, already no timeout at all. A value near
/// the largest a TOML integer holds (2^63 - 1) would overflow the clock the timer adds it
/// to, and a timer that panics takes every connection or response with it.
pub(crate) const MAX_TIMEOUT_SECS: u64 = 365 * 86_400;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    #[serde(default = "default_listen")]
    pub(crate) listen: String,
    #[serde(default)]
    pub(crate) server: ServerConfig,
    #[serde(default)]
    pub(crate) store: StoreConfig,
    #[serde(default)]
    pub(crate) limiter: LimiterConfig,
    #[serde(default)]
    pub(crate) mock: MockConfig,
    #[serde(default)]
    pub(crate) models: BTreeMap<String, ModelConfig>,
    #[serde(default)]
    pub(crate) tiers: BTreeMap<String, TierConfig>,
    #[serde(default)]
    pub(crate) keys: BTreeMap<String, KeyConfig>,
}

fn default_listen() -> String {
    "127.0.0.1:8080".to_owned()
}

/// How the gateway treats its clients' connections and what it passes on of their requests.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ServerConfig {
    pub(crate) header_timeout_secs: u64,
    pub(crate) body_timeout_secs: u64,
    pub(crate) max_connections: usize,
    pub(crate) forward_headers: Vec<String>,
    /// Keys that open `/dashboard` (and `/metrics` with `metrics_requires_admin`): none, the
    /// dashboard is off. Never API keys.
    pub(crate) admin_keys: Vec<String>,
    pub(crate) metrics_requires_admin: bool,
    /// Reverse proxies (CIDRs) whose `X-Forwarded-For` names the client, for the admin-key
    /// guess limit (`dashboard/access.rs`).
    pub(crate) trusted_proxies: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            header_timeout_secs: 10,
            body_timeout_secs: 30,
            max_connections: 1024,
            forward_headers: Vec::new(),
            admin_keys: Vec::new(),
            metrics_requires_admin: false,
            trusted_proxies: Vec::new(),
        }
    }
}

impl ServerConfig {
    pub(crate) fn header_timeout(&self) -> Duration {
        Duration::from_secs(self.header_timeout_secs)
    }

    pub(crate) fn body_timeout(&self) -> Duration {
        Duration::from_secs(self.body_timeout_secs)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub(crate) enum StoreKind {
    #[default]
    Memory,
    Redis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub(crate) enum OnFailure {
    #[default]
    Closed,
    Open,
    Fallback,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct StoreConfig {
    pub(crate) kind: StoreKind,
    pub(crate) url: Option<String>,
    /// Seed nodes of a Redis Cluster, instead of `url`.
    pub(crate) cluster: Option<Vec<String>>,
    pub(crate) prefix: String,
    pub(crate) timeout_ms: u64,
    pub(crate) on_failure: OnFailure,
    pub(crate) expected_replicas: u64,
    pub(crate) max_keys: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            kind: StoreKind::Memory,
            url: None,
            cluster: None,
            prefix: "llm-gateway".to_owned(),
            timeout_ms: 50,
            on_failure: OnFailure::Closed,
            expected_replicas: 2,
            max_keys: 1_000_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Headers {
    #[default]
    Both,
    Ietf,
    Openai,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub(crate) enum AlgorithmName {
    #[default]
    SlidingWindowCounter,
    SlidingWindowLog,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub(crate) enum UnusableBody {
    #[default]
    Reject,
    Fallback,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub(crate) enum MissingUsage {
    #[default]
    Keep,
    Estimate,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct LimiterConfig {
    pub(crate) headers: Headers,
    pub(crate) algorithm: AlgorithmName,
    pub(crate) max_body_bytes: usize,
    pub(crate) max_inspect_bytes: usize,
    pub(crate) on_unusable_body: UnusableBody,
    pub(crate) fallback_tokens: u64,
    pub(crate) default_output_tokens: u64,
    pub(crate) on_missing_usage: MissingUsage,
    pub(crate) count_failed_requests: bool,
    pub(crate) request_usage_in_streams: bool,
    pub(crate) idempotency_header: Option<String>,
    pub(crate) shutdown_grace_secs: u64,
}

impl Default for LimiterConfig {
    fn default() -> Self {
        Self {
            headers: Headers::Both,
            algorithm: AlgorithmName::SlidingWindowCounter,
            max_body_bytes: 4 << 20,
            max_inspect_bytes: 1 << 20,
            on_unusable_body: UnusableBody::Reject,
            fallback_tokens: 4_096,
            default_output_tokens: 256,
            on_missing_usage: MissingUsage::Keep,
            count_failed_requests: true,
            request_usage_in_streams: true,
            idempotency_header: None,
            shutdown_grace_secs: 10,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct MockConfig {
    pub(crate) token_delay_ms: u64,
    /// Completions decoding at full speed (0: no limit).
    pub(crate) capacity: u64,
    /// Completions admitted beyond `capacity` (slowing all) before a 503; `capacity` when
    /// absent.
    pub(crate) queue: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct ModelConfig {
    pub(crate) upstream: String,
    pub(crate) api_key: Option<String>,
    pub(crate) api_key_env: Option<String>,
    /// The header the key goes in: `authorization` (as `Bearer <key>`) when absent.
    pub(crate) api_key_header: Option<String>,
    /// PEM certificates trusted for this model's HTTPS upstream besides the built-in roots.
    pub(crate) ca_file: Option<PathBuf>,
    /// Whether an HTTPS upstream may be spoken to in HTTP/2 (offered by ALPN).
    #[serde(default = "yes")]
    pub(crate) http2: bool,
    #[serde(default = "default_timeout_secs")]
    pub(crate) timeout_secs: u64,
    #[serde(default = "default_timeout_secs")]
    pub(crate) stream_idle_timeout_secs: u64,
    pub(crate) rpm: Option<u64>,
    pub(crate) tpm: Option<u64>,
    pub(crate) input_tpm: Option<u64>,
    pub(crate) output_tpm: Option<u64>,
    pub(crate) concurrent: Option<u64>,
    pub(crate) default_output_tokens: Option<u64>,
    #[serde(default = "one")]
    pub(crate) input_price: f64,
    #[serde(default = "one")]
    pub(crate) output_price: f64,
    /// `[models.NAME.capacity]`: a concurrency limit that follows the upstream.
    pub(crate) capacity: Option<crate::capacity::CapacityConfig>,
}

fn default_timeout_secs() -> u64 {
    60
}

fn one() -> f64 {
    1.0
}

fn yes() -> bool {
    true
}

/// One caller's limits; every one optional.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TierConfig {
    pub(crate) rpm: Option<u64>,
    pub(crate) tpm: Option<u64>,
    pub(crate) input_tpm: Option<u64>,
    pub(crate) output_tpm: Option<u64>,
    pub(crate) concurrent: Option<u64>,
    /// Spend per UTC calendar day, reset at midnight UTC.
    pub(crate) daily_cost: Option<u64>,
    /// Spend per UTC calendar month, reset on the 1st.
    pub(crate) monthly_cost: Option<u64>,
    /// Input + output tokens per UTC calendar month, reset on the 1st.
    pub(crate) monthly_tokens: Option<u64>,
    /// Under a saturated model capacity: the priority in its queue (higher first)...
    pub(crate) priority: Option<u8>,
    /// ...the share of the capacity reserved for the tier...
    pub(crate) capacity_share: Option<f64>,
    /// ...and how long a caller may wait for a slot.
    pub(crate) max_wait_ms: Option<u64>,
}

impl TierConfig {
    /// Every limit by its name in the file.
    pub(crate) fn limits(&self) -> [(&'static str, Option<u64>); 8] {
        // Destructured, so that a new limit can't be forgotten here.
        let TierConfig {
            rpm,
            tpm,
            input_tpm,
            output_tpm,
            concurrent,
            daily_cost,
            monthly_cost,
            monthly_tokens,
            priority: _,
            capacity_share: _,
            max_wait_ms: _,
        } = *self;
        [
            ("rpm", rpm),
            ("tpm", tpm),
            ("input_tpm", input_tpm),
            ("output_tpm", output_tpm),
            ("concurrent", concurrent),
            ("daily_cost", daily_cost),
            ("monthly_cost", monthly_cost),
            ("monthly_tokens", monthly_tokens),
        ]
    }

    /// These limits with those `overrides` sets in their place.
    pub(crate) fn overridden_by(&self, overrides: &TierConfig) -> TierConfig {
        let TierConfig {
            rpm,
            tpm,
            input_tpm,
            output_tpm,
            concurrent,
            daily_cost,
            monthly_cost,
            monthly_tokens,
            priority: _,
            capacity_share: _,
            max_wait_ms: _,
        } = *overrides;
        TierConfig {
            rpm: rpm.or(self.rpm),
            tpm: tpm.or(self.tpm),
            input_tpm: input_tpm.or(self.input_tpm),
            output_tpm: output_tpm.or(self.output_tpm),
            concurrent: concurrent.or(self.concurrent),
            daily_cost: daily_cost.or(self.daily_cost),
            monthly_cost: monthly_cost.or(self.monthly_cost),
            monthly_tokens: monthly_tokens.or(self.monthly_tokens),
            priority: self.priority,
            capacity_share: self.capacity_share,
            max_wait_ms: self.max_wait_ms,
        }
    }
}

/// An API key: whose it is, its tier, and the limits of the tier it overrides (per user:
/// every key of a user sets the same ones).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct KeyConfig {
    pub(crate) user: String,
    pub(crate) tier: String,
    pub(crate) rpm: Option<u64>,
    pub(crate) tpm: Option<u64>,
    pub(crate) input_tpm: Option<u64>,
    pub(crate) output_tpm: Option<u64>,
    pub(crate) concurrent: Option<u64>,
    pub(crate) daily_cost: Option<u64>,
    pub(crate) monthly_cost: Option<u64>,
    pub(crate) monthly_tokens: Option<u64>,
}

impl KeyConfig {
    /// The limits this key sets in place of its tier's (all `None`: none).
    pub(crate) fn overrides(&self) -> TierConfig {
        TierConfig {
            rpm: self.rpm,
            tpm: self.tpm,
            input_tpm: self.input_tpm,
            output_tpm: self.output_tpm,
            concurrent: self.concurrent,
            daily_cost: self.daily_cost,
            monthly_cost: self.monthly_cost,
            monthly_tokens: self.monthly_tokens,
            ..TierConfig::default()
        }
    }

    /// The name of the tier the limiter applies to this key: its own tier, or, when it
    /// overrides limits, `TIER+USER` (a tier of the user's own, made of the tier's limits
    /// and the overrides).
    pub(crate) fn limits_tier(&self) -> String {
        if self.overrides().limits().iter().any(|(_, v)| v.is_some()) {
            format!("{}+{}", self.tier, self.user)
        } else {
            self.tier.clone()
        }
    }
}

/// A configuration problem, for the operator: where it is and what is wrong.
#[derive(Debug)]
pub(crate) struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An upstream, checked: the built-in mock or an `http://` or `https://` base URL.
#[derive(Debug, Clone)]
pub(crate) enum Upstream {
    Mock,
    Http {
        /// `http://host:port` or `https://host:port`
        origin: String,
        /// The base path without a trailing `/` (e.g. `/v1`).
        path: String,
    },
}

impl Config {
    /// Parses TOML; `source` names the file in messages.
    pub(crate) fn parse(text: &str, source: &str) -> Result<Self, ConfigError> {
        // Messages give the line and column, not toml's copy of the line: the line may be an
        // API key's (`[keys]`), and keys are never printed whole.
        let at = |e: &toml::de::Error| {
            let message = e.message().trim_end();
            match e.span() {
                Some(span) => {
                    let before = text.get(..span.start).unwrap_or(text);
                    let line = before.matches('\n').count() + 1;
                    let column = before.chars().rev().take_while(|&c| c != '\n').count() + 1;
                    format!(
                        "TOML parse error at line {line}, column {column}: {}",
                        masked_strings(message)
                    )
                }
                None => masked_strings(message),
            }
        };
        let de = toml::Deserializer::parse(text)
            .map_err(|e| ConfigError(format!("{source}: {}", at(&e))))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = masked_path(e.path());
            let inner = at(e.inner());
            if path.is_empty() || path == "." {
                ConfigError(format!("{source}: {inner}"))
            } else {
                ConfigError(format!("{source}: field `{path}`: {inner}"))
            }
        })
    }

    /// Every problem the types don't catch, each naming its field.
    pub(crate) fn problems(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let mut err = |field: String, what: String| errors.push(format!("field `{field}`: {what}"));

        if self.listen.parse::<SocketAddr>().is_err() {
            err(
                "listen".into(),
                format!(
                    "{:?} is not an IP address and port (e.g. \"127.0.0.1:8080\")",
                    self.listen
                ),
            );
        }

        let sv = &self.server;
        for (field, v) in [
            ("header_timeout_secs", sv.header_timeout_secs),
            ("body_timeout_secs", sv.body_timeout_secs),
            ("max_connections", sv.max_connections as u64),
        ] {
            if v == 0 {
                err(format!("server.{field}"), "must be > 0".into());
            }
        }
        let too_long = |v: u64| {
            (v > MAX_TIMEOUT_SECS)
                .then(|| format!("must be at most {MAX_TIMEOUT_SECS} (a year), got {v}"))
        };
        for (field, v) in [
            ("server.header_timeout_secs", sv.header_timeout_secs),
            ("server.body_timeout_secs", sv.body_timeout_secs),
            (
                "limiter.shutdown_grace_secs",
                self.limiter.shutdown_grace_secs,
            ),
        ] {
            if let Some(e) = too_long(v) {
                err(field.into(), e);
            }
        }
        for (i, name) in sv.forward_headers.iter().enumerate() {
            if let Err(e) = crate::forward::configured(name) {
                err(format!("server.forward_headers[{i}]"), e);
            } else if let Some(model) = self.models.iter().find_map(|(model, m)| {
                let h = m.api_key_header.as_deref()?;
                h.eq_ignore_ascii_case(name).then_some(model)
            }) {
                // A client's value would reach every other model's upstream as a credential.
                err(
                    format!("server.forward_headers[{i}]"),
                    format!(
                        "`{name}` carries the key of model `{model}` (its api_key_header): \
                         a client's value is never forwarded"
                    ),
                );
            }
        }

        for (i, key) in sv.admin_keys.iter().enumerate() {
            if let Some(problem) = crate::dashboard::admin_key_problem(key) {
                err(format!("server.admin_keys[{i}]"), problem);
            } else if self.keys.contains_key(key) {
                err(
                    format!("server.admin_keys[{i}]"),
                    format!(
                        "{} is also an API key ([keys]): an admin key must be one of its own",
                        masked_key(key)
                    ),
                );
            }
        }
        for (i, cidr) in sv.trusted_proxies.iter().enumerate() {
            if let Some(problem) = crate::dashboard::access::trusted_proxy_problem(cidr) {
                err(format!("server.trusted_proxies[{i}]"), problem);
            }
        }
        if sv.metrics_requires_admin && sv.admin_keys.is_empty() {
            err(
                "server.metrics_requires_admin".into(),
                "needs at least one key in server.admin_keys (else /metrics opens to no one)"
                    .into(),
            );
        }

        let s = &self.store;
        match (&s.url, &s.cluster) {
            (Some(_), Some(_)) if s.kind == StoreKind::Redis => err(
                "store.cluster".into(),
                "set either store.url (one Redis server) or store.cluster (a Redis Cluster), \
                 not both"
                    .into(),
            ),
            (None, None) if s.kind == StoreKind::Redis => err(
                "store.url".into(),
                "is required when store.kind = \"redis\" (or set store.cluster for a Redis \
                 Cluster; or pass --redis URL or --redis-cluster URL,URL,...)"
                    .into(),
            ),
            _ => {}
        }
        if let (Some(url), StoreKind::Redis) = (&s.url, s.kind) {
            if !url.starts_with("redis://")
                && !url.starts_with("rediss://")
                && !url.starts_with("unix://")
            {
                err(
                    "store.url".into(),
                    format!(
                        "{:?} is not a Redis URL (redis://host:port)",
                        redacted_url(url)
                    ),
                );
            }
        }
        if let (Some(nodes), StoreKind::Redis) = (&s.cluster, s.kind) {
            if nodes.is_empty() {
                err(
                    "store.cluster".into(),
                    "lists no node: give one or more of the cluster's nodes \
                     ([\"redis://host:7000\", ...])"
                        .into(),
                );
            }
            for (i, url) in nodes.iter().enumerate() {
                if !url.starts_with("redis://") && !url.starts_with("rediss://") {
                    err(
                        format!("store.cluster[{i}]"),
                        format!(
                            "{:?} is not a Redis node URL (redis://host:port)",
                            redacted_url(url)
                        ),
                    );
                }
            }
        }
        if s.prefix.is_empty() {
            err("store.prefix".into(), "must not be empty".into());
        }
        if s.prefix.contains(['{', '}']) {
            err(
                "store.prefix".into(),
                "must not contain `{` or `}` (they would put every key in one cluster slot)".into(),
            );
        }
        if s.timeout_ms == 0 {
            err("store.timeout_ms".into(), "must be > 0".into());
        }
        if s.on_failure == OnFailure::Fallback && s.kind != StoreKind::Redis {
            err(
                "store.on_failure".into(),
                "\"fallback\" only applies to the Redis store (store.kind = \"redis\")".into(),
            );
        }
        if s.expected_replicas == 0 {
            err("store.expected_replicas".into(), "must be > 0".into());
        }
        if s.max_keys == 0 {
            err("store.max_keys".into(), "must be > 0".into());
        }

        if self.mock.capacity == 0 && self.mock.queue.is_some() {
            err(
                "mock.queue".into(),
                "applies only with a `mock.capacity` > 0 (0, the default, admits everything)"
                    .into(),
            );
        }

        let l = &self.limiter;
        if l.max_body_bytes == 0 {
            err("limiter.max_body_bytes".into(), "must be > 0".into());
        }
        if l.max_inspect_bytes == 0 {
            err("limiter.max_inspect_bytes".into(), "must be > 0".into());
        }
        if let Some(h) = &l.idempotency_header {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                err(
                    "limiter.idempotency_header".into(),
                    format!("{h:?} is not a valid header name"),
                );
            } else if h.bytes().any(|b| b.is_ascii_uppercase()) {
                err(
                    "limiter.idempotency_header".into(),
                    format!("{h:?}: write header names in lowercase"),
                );
            }
        }

        if self.models.is_empty() {
            err(
                "models".into(),
                "no model is configured: add a [models.NAME] table".into(),
            );
        }
        for (name, m) in &self.models {
            let at = |f: &str| format!("models.{name}.{f}");
            if !is_rule_safe(name) {
                err(
                    format!("models.{name}"),
                    "a model name must be printable ASCII without spaces, `\"` or `\\`".into(),
                );
            }
            let upstream = parse_upstream(&m.upstream);
            if let Err(e) = &upstream {
                err(at("upstream"), e.clone());
            }
            if let Some(path) = &m.ca_file {
                let https = matches!(&upstream, Ok(Upstream::Http { origin, .. })
                    if origin.starts_with("https://"));
                if upstream.is_ok() && !https {
                    err(
                        at("ca_file"),
                        "applies to https:// upstreams only (this one is not)".into(),
                    );
                }
                if let Err(e) = crate::upstream::ca_certificates(path) {
                    err(at("ca_file"), e);
                }
            }
            if let Some(h) = &m.api_key_header {
                if let Err(e) = crate::upstream::credential_header(h) {
                    err(at("api_key_header"), e);
                } else if m.api_key.is_none() && m.api_key_env.is_none() {
                    err(
                        at("api_key_header"),
                        "names the header of the upstream's key: set api_key or api_key_env too"
                            .into(),
                    );
                }
            }
            if m.api_key.is_some() && m.api_key_env.is_some() {
                err(
                    at("api_key_env"),
                    "set either api_key or api_key_env, not both".into(),
                );
            }
            if let Some(var) = &m.api_key_env {
                let is_name = var.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                    && var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                if !is_name {
                    err(
                        at("api_key_env"),
                        format!(
                            "names the environment variable that holds the upstream's key \
                             (letters, digits and `_`), and {} is no such name: a key itself \
                             goes in api_key",
                            masked_value(var)
                        ),
                    );
                } else if std::env::var(var).map_or(true, |v| v.is_empty()) {
                    err(
                        at("api_key_env"),
                        format!("the environment variable `{var}` is not set"),
                    );
                }
            }
            if m.timeout_secs == 0 {
                err(at("timeout_secs"), "must be > 0".into());
            }
            if m.stream_idle_timeout_secs == 0 {
                err(at("stream_idle_timeout_secs"), "must be > 0".into());
            }
            for (field, v) in [
                ("timeout_secs", m.timeout_secs),
                ("stream_idle_timeout_secs", m.stream_idle_timeout_secs),
            ] {
                if let Some(e) = too_long(v) {
                    err(at(field), e);
                }
            }
            for (field, v) in [
                ("rpm", m.rpm),
                ("tpm", m.tpm),
                ("input_tpm", m.input_tpm),
                ("output_tpm", m.output_tpm),
                ("concurrent", m.concurrent),
            ] {
                if v == Some(0) {
                    err(at(field), "must be > 0 (omit it for no limit)".into());
                }
            }
            for (field, v) in [
                ("input_price", m.input_price),
                ("output_price", m.output_price),
            ] {
                if !v.is_finite() || v < 0.0 {
                    err(at(field), format!("must be a number >= 0, got {v}"));
                }
            }
        }

        if self.tiers.is_empty() {
            err(
                "tiers".into(),
                "no tier is configured: add a [tiers.NAME] table".into(),
            );
        }
        for (name, t) in &self.tiers {
            if name.trim().is_empty() {
                err("tiers".into(), "a tier name must not be empty".into());
            }
            for (field, v) in t.limits() {
                if v == Some(0) {
                    err(
                        format!("tiers.{name}.{field}"),
                        "must be > 0 (omit it for no limit)".into(),
                    );
                }
            }
        }

        if self.keys.is_empty() {
            err(
                "keys".into(),
                "no API key is configured: add one under [keys]".into(),
            );
        }
        for (key, k) in &self.keys {
            if key.is_empty() || key.bytes().any(|b| !b.is_ascii_graphic()) {
                err(
                    format!("keys{} (user {:?})", key_ref(key), k.user),
                    "an API key must be printable ASCII without spaces".into(),
                );
            }
            if k.user.trim().is_empty() {
                err(
                    format!("keys{}.user", key_ref(key)),
                    "must not be empty".into(),
                );
            }
            for (field, v) in k.overrides().limits() {
                if v == Some(0) {
                    err(
                        format!("keys{}.{field} (user {:?})", key_ref(key), k.user),
                        "must be > 0 (omit it to keep the tier's)".into(),
                    );
                }
            }
            if !self.tiers.contains_key(&k.tier) {
                let known: Vec<&str> = self.tiers.keys().map(String::as_str).collect();
                err(
                    format!("keys{}.tier (user {:?})", key_ref(key), k.user),
                    format!(
                        "unknown tier {:?} (configured tiers: {})",
                        k.tier,
                        if known.is_empty() {
                            "none".to_owned()
                        } else {
                            known.join(", ")
                        }
                    ),
                );
            }
        }

        self.check_overrides(&mut err);
        crate::capacity::problems(self, &mut err);

        errors
    }

    /// Where the Redis store is, for messages and logs: its URL, or the cluster's seed
    /// nodes, each without its password ([`redacted_url`]).
    pub(crate) fn redis_location(&self) -> String {
        match &self.store.cluster {
            Some(nodes) => {
                let nodes: Vec<String> = nodes.iter().map(|n| redacted_url(n)).collect();
                format!("cluster {}", nodes.join(","))
            }
            None => redacted_url(self.store.url.as_deref().unwrap_or_default()),
        }
    }

    /// Limits count per user, so a user's keys must agree on the limits they override; and
    /// the tiers made of overrides (`TIER+USER`) must not take a configured tier's name.
    fn check_overrides(&self, err: &mut impl FnMut(String, String)) {
        let mut first_key_of_user: BTreeMap<&str, (&str, TierConfig)> = BTreeMap::new();
        let mut made: BTreeMap<String, (&str, &str)> = BTreeMap::new();
        for (key, k) in &self.keys {
            let overrides = k.overrides();
            match first_key_of_user.get(k.user.as_str()) {
                None => {
                    first_key_of_user.insert(&k.user, (key, overrides));
                }
                Some((first, theirs)) => {
                    for ((field, mine), (_, other)) in
                        overrides.limits().into_iter().zip(theirs.limits())
                    {
                        if mine != other {
                            let shown = |v: Option<u64>| {
                                v.map_or_else(|| "none".to_owned(), |n| n.to_string())
                            };
                            err(
                                format!("keys{}.{field}", key_ref(key)),
                                format!(
                                    "the keys of user {:?} share its limits, so they must override \
                                     the same ones: this key sets {}, key {} sets {}",
                                    k.user,
                                    shown(mine),
                                    key_ref(first),
                                    shown(other)
                                ),
                            );
                        }
                    }
                }
            }
            let tier = k.limits_tier();
            if tier == k.tier {
                continue;
            }
            if self.tiers.contains_key(&tier) {
                err(
                    format!("keys{}", key_ref(key)),
                    format!(
                        "the limits of user {:?} with its overrides make a tier named {tier:?}, \
                         which is also a configured tier: rename that tier",
                        k.user
                    ),
                );
            }
            match made.get(&tier) {
                Some((t, u)) if (*t, *u) != (k.tier.as_str(), k.user.as_str()) => err(
                    format!("keys{}", key_ref(key)),
                    format!(
                        "user {:?} of tier {:?} and user {u:?} of tier {t:?} both make a tier \
                         named {tier:?} with their overrides: rename one",
                        k.user, k.tier
                    ),
                ),
                Some(_) => {}
                None => {
                    made.insert(tier, (&k.tier, &k.user));
                }
            }
        }
    }

    /// The listen address (after `problems` found none).
    pub(crate) fn listen_addr(&self) -> SocketAddr {
        self.listen.parse().expect("validated")
    }
}

/// An API key as messages and logs show it: masked ([`masked_key`]), in brackets
/// (`keys[sk-l...].tier`).
fn key_ref(key: &str) -> String {
    format!("[{}]", masked_key(key))
}

/// An API key masked: its first 4 characters when it has 12 or more and they are printable
/// ASCII, else nothing of it.
pub(crate) fn masked_key(key: &str) -> String {
    match key.get(..4) {
        Some(head) if key.len() >= 12 && head.bytes().all(|b| b.is_ascii_graphic()) => {
            format!("{head}...")
        }
        _ => "***".to_owned(),
    }
}

/// A value of the file that may be a secret put in the wrong place, quoted: whole when it is
/// shorter than 12 bytes (a name, a word), else masked as [`masked_key`] masks keys.
pub(crate) fn masked_value(value: &str) -> String {
    if value.len() < 12 {
        format!("{value:?}")
    } else {
        format!("\"{}\"", masked_key(value))
    }
}

/// A deserializer's message with each string value it quotes (`invalid type: string "..."`)
/// passed through [`masked_value`]: a key written in the wrong place is not printed.
fn masked_strings(message: &str) -> String {
    const QUOTE: &str = "string \"";
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find(QUOTE) {
        let (before, after) = rest.split_at(i + QUOTE.len());
        out.push_str(&before[..before.len() - 1]);
        // The value ends at the last `"` before the message goes on (`", expected`).
        let end = after
            .find("\", expected")
            .or_else(|| after.rfind('"'))
            .unwrap_or(after.len());
        out.push_str(&masked_value(&after[..end]));
        rest = after.get(end + 1..).unwrap_or("");
    }
    out.push_str(rest);
    out
}

/// A path of the configuration, each API key in it masked (`keys[sk-l...].tier`).
fn masked_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    let mut in_keys = false;
    for segment in path.iter() {
        let after_keys = std::mem::replace(&mut in_keys, false);
        match segment {
            Segment::Map { key } if after_keys => out.push_str(&key_ref(key)),
            Segment::Map { key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
                in_keys = out == "keys";
            }
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Enum { variant } => {
                out.push('.');
                out.push_str(variant);
            }
            Segment::Unknown => out.push_str(".?"),
        }
    }
    out
}

/// `url` without its secrets, for messages and logs: the password of its user information
/// (`redis://user:PASSWORD@host`, `redis://:PASSWORD@host`) and the `pass` or `password` of
/// its query (`redis+unix:///run/redis.sock?pass=PASSWORD`, as the redis crate reads it) are
/// `***`. A user information without `:` is all password to Redis 5 and older (`AUTH
/// secret`): shown as `***` too.
pub(crate) fn redacted_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => format!("***@{host}"),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k == "pass" || k == "password" => format!("{k}=***"),
                    _ => kv.to_owned(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}://{authority}{tail}")
}

impl ModelConfig {
    pub(crate) fn upstream(&self) -> Upstream {
        parse_upstream(&self.upstream).expect("validated")
    }

    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }

    pub(crate) fn stream_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.stream_idle_timeout_secs)
    }

    /// The key sent upstream (after `problems` found none).
    pub(crate) fn upstream_key(&self) -> Option<String> {
        match (&self.api_key, &self.api_key_env) {
            (Some(k), _) => Some(k.clone()),
            (None, Some(var)) => std::env::var(var).ok(),
            (None, None) => None,
        }
    }
}

/// Names go into rule names, which go into headers as structured-field strings.
fn is_rule_safe(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
}

fn parse_upstream(s: &str) -> Result<Upstream, String> {
    if s == MOCK {
        return Ok(Upstream::Mock);
    }
    // A value that isn't a URL may be a key put in the wrong place: shown masked.
    let shown = if s.contains("://") && !s.contains('@') {
        format!("{s:?}")
    } else {
        masked_value(s)
    };
    let uri: Uri = s.parse().map_err(|_| {
        format!("{shown} is neither \"mock\" nor a URL (e.g. \"http://127.0.0.1:8000/v1\")")
    })?;
    let scheme = match uri.scheme_str() {
        Some(scheme @ ("http" | "https")) => scheme,
        _ => {
            return Err(format!(
                "{shown} is neither \"mock\" nor an http:// or https:// URL \
                 (e.g. \"https://api.openai.com/v1\")"
            ))
        }
    };
    let Some(authority) = uri.authority() else {
        return Err(format!("{s:?} has no host"));
    };
    if uri.query().is_some() {
        return Err(format!("{s:?}: a base URL can't have a query"));
    }
    if authority.as_str().contains('@') {
        // Never sent (the client takes the host alone), and would be shown in the banner.
        return Err(format!(
            "{:?}: a base URL can't carry credentials (user:password@): put the upstream's \
             key in api_key or api_key_env",
            format!("{scheme}://***@{}{}", authority.host(), uri.path())
        ));
    }
    Ok(Upstream::Http {
        origin: format!("{scheme}://{authority}"),
        path: uri.path().trim_end_matches('/').to_owned(),
    })
}
