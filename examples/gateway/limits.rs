//! From the configuration to a `RateLimitLayer`: the API keys, one rule per kind of per-user
//! limit (with a quota per tier, and per user whose keys override their tier's limits), one
//! rule per per-model limit, the OpenAI token estimator, prices for the spend budgets, and
//! the store; and per model with a `[models.NAME.capacity]`, a concurrency rule whose limit
//! follows the upstream, with the tiers' priorities (`capacity.rs`). Budgets (`daily_cost`, `monthly_cost`, `monthly_tokens`) are calendar windows:
//! exact counts per UTC day or month, reset at midnight UTC or on the 1st.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use tower_llm_ratelimit::cost::{self, Cost, Weights};
use tower_llm_ratelimit::headers::HeaderStyle;
use tower_llm_ratelimit::key::{self, Key, KeyExtractor, RequestView};
use tower_llm_ratelimit::settle::MissingUsage;
use tower_llm_ratelimit::store::MemoryStore;
use tower_llm_ratelimit::{
    tier, BodyPolicy, BuildError, FailurePolicy, MissingKey, Quota, RateLimitLayer, Rule,
};

use crate::config::{self, AlgorithmName, Config, OnFailure};
use crate::metrics::Metrics;
use crate::proxy::Routed;

/// Who an API key belongs to.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub(crate) user: Arc<str>,
    pub(crate) tier: Arc<str>,
    /// The tier whose quotas the rules apply: `tier`, or `TIER+USER` when the user's keys
    /// override some of its limits (see [`limit_tiers`]).
    pub(crate) limits: Arc<str>,
    /// The limits the key overrides, by name.
    pub(crate) overrides: Arc<[(&'static str, u64)]>,
}

/// API key -> caller, shared by the auth check, the rules' keys and the tier lookup.
pub(crate) type Callers = Arc<HashMap<Key, Caller>>;

pub(crate) fn callers(cfg: &Config) -> Callers {
    Arc::new(
        cfg.keys
            .iter()
            .map(|(k, c)| {
                (
                    Key::from(k.as_str()),
                    Caller {
                        user: c.user.as_str().into(),
                        tier: c.tier.as_str().into(),
                        limits: c.limits_tier().into(),
                        overrides: c
                            .overrides()
                            .limits()
                            .into_iter()
                            .filter_map(|(name, v)| Some((name, v?)))
                            .collect(),
                    },
                )
            })
            .collect(),
    )
}

/// The caller of a request: its bearer token, if it is a configured API key.
pub(crate) fn caller<'a>(callers: &'a Callers, req: &RequestView<'_>) -> Option<&'a Caller> {
    callers.get(&key::bearer_token().extract(req)?)
}

/// The caller the gate found (it stores it as a request extension), else [`caller`]: the
/// rules' keys and the tier read it once per request, not once per rule.
fn resolved<'a>(callers: &'a Callers, req: &RequestView<'a>) -> Option<&'a Caller> {
    match req.extensions().get::<Caller>() {
        Some(c) => Some(c),
        None => caller(callers, req),
    }
}

/// Where the counters live. Clones share the counters: a reload builds its layer on a clone
/// of the running store, so the buckets of unchanged rules keep their counts.
#[derive(Clone)]
pub(crate) enum Store {
    Memory(MemoryStore),
    #[cfg(feature = "redis")]
    Redis(tower_llm_ratelimit::store::RedisStore),
}

impl Store {
    pub(crate) fn memory(cfg: &Config) -> Self {
        Store::Memory(MemoryStore::builder().max_keys(cfg.store.max_keys).build())
    }

    #[cfg(feature = "redis")]
    pub(crate) async fn redis(
        cfg: &Config,
    ) -> Result<Self, tower_llm_ratelimit::store::StoreError> {
        use std::time::Duration;
        use tower_llm_ratelimit::store::{RedisFailure, RedisStore};
        let s = &cfg.store;
        let failure = match s.on_failure {
            OnFailure::Fallback => RedisFailure::LocalFallback {
                expected_replicas: s.expected_replicas,
            },
            OnFailure::Closed | OnFailure::Open => RedisFailure::Error,
        };
        // A cluster's slot map is refreshed by the store on `MOVED` answers and broken
        // connections: after a failover it finds the promoted replica by itself.
        let builder = match &s.cluster {
            Some(nodes) => RedisStore::cluster(nodes.iter().cloned()),
            None => RedisStore::builder(s.url.clone().unwrap_or_default()),
        };
        let store = builder
            .prefix(s.prefix.clone())
            .timeout(Duration::from_millis(s.timeout_ms))
            .on_failure(failure)
            .connect()
            .await?;
        Ok(Store::Redis(store))
    }
}

/// A per-model rule's key: the model the gate routed the request to (its `Routed`
/// extension), for one model only (the other models' requests skip the rule). A rule has one
/// quota, so models with different limits need a rule each.
///
/// The routed model, not the body's `model` read again by the limiter: the limiter reads at
/// most `max_inspect_bytes` of a body, and a rule keyed by the body would be skipped for a
/// larger one (charged `fallback_tokens` on the per-user rules only). Every request the
/// gateway forwards to a model is counted by that model's rules.
#[derive(Debug, Clone)]
struct ModelKey {
    model: Key,
    name: String,
}

impl KeyExtractor for ModelKey {
    fn extract(&self, req: &RequestView<'_>) -> Option<Key> {
        let routed = req.extensions().get::<Routed>()?;
        (*routed.model.name == *self.name).then(|| self.model.clone())
    }

    fn describe(&self) -> String {
        format!("the routed model {:?}", self.name)
    }
}

/// The tiers the rules know, by name, with their limits: the configured tiers, and for each
/// user whose keys override limits of their tier, a tier of its own, `TIER+USER`, made of
/// the tier's limits with the overrides in their place. Limits count per user, so overrides
/// are per user too (validation makes every key of a user set the same ones).
///
/// The library picks a rule's quota by tier name; a user with overrides is a tier of one.
/// Each such user adds a quota to every rule it is given (a short list scanned per request):
/// overrides suit a handful of large customers, not every user.
pub(crate) fn limit_tiers(cfg: &Config) -> BTreeMap<String, config::TierConfig> {
    let mut tiers = cfg.tiers.clone();
    for k in cfg.keys.values() {
        let name = k.limits_tier();
        if name != k.tier {
            if let Some(t) = cfg.tiers.get(&k.tier) {
                tiers.insert(name, t.overridden_by(&k.overrides()));
            }
        }
    }
    tiers
}

/// Each tier the limiter knows (see [`limit_tiers`]) with the configured tier it stems from.
fn tiers_of_limits(cfg: &Config) -> Vec<(String, &str)> {
    let mut tiers: Vec<(String, &str)> =
        cfg.tiers.keys().map(|t| (t.clone(), t.as_str())).collect();
    for k in cfg.keys.values() {
        let name = k.limits_tier();
        if name != k.tier && !tiers.iter().any(|(t, _)| *t == name) {
            tiers.push((name, k.tier.as_str()));
        }
    }
    tiers
}

/// A per-user rule's key: the user of the request's API key, for the callers whose tier has
/// the limit (the others skip the rule: a tier without a limit is not limited).
fn user_key(callers: &Callers, tiers: HashSet<Arc<str>>) -> impl KeyExtractor {
    let callers = Arc::clone(callers);
    key::from_fn(move |req: &RequestView<'_>| {
        let c = resolved(&callers, req)?;
        tiers.contains(&c.limits).then(|| Key::from(&*c.user))
    })
    .describe_as("user of the API key")
}

/// Which scope a rule applies to, from its name: `user-*` or `model-*:<model>`.
pub(crate) fn rule_model(rule: &str) -> Option<&str> {
    rule.strip_prefix("model-")?.split_once(':').map(|(_, m)| m)
}

type Limit = fn(&config::TierConfig) -> Option<u64>;
type ModelLimit = fn(&config::ModelConfig) -> Option<u64>;
/// A kind of limit: its name, where tiers and models set it, its quota.
type Kind<'a> = (
    &'static str,
    Limit,
    ModelLimit,
    Box<dyn Fn(u64) -> Quota + 'a>,
);

/// The rules: per user (quota per tier), then per model.
pub(crate) fn rules(cfg: &Config, callers: &Callers) -> Vec<Rule> {
    let rate = |q: Quota| match cfg.limiter.algorithm {
        AlgorithmName::SlidingWindowCounter => q.sliding_window_counter(),
        AlgorithmName::SlidingWindowLog => q.sliding_window_log(),
    };
    let kinds: [Kind<'_>; 8] = [
        (
            "rpm",
            |t| t.rpm,
            |m| m.rpm,
            Box::new(|n| rate(Quota::per_minute(n))),
        ),
        (
            "tpm",
            |t| t.tpm,
            |m| m.tpm,
            Box::new(|n| rate(Quota::per_minute(n).tokens())),
        ),
        (
            "input-tpm",
            |t| t.input_tpm,
            |m| m.input_tpm,
            Box::new(|n| rate(Quota::per_minute(n).input_tokens())),
        ),
        (
            "output-tpm",
            |t| t.output_tpm,
            |m| m.output_tpm,
            Box::new(|n| rate(Quota::per_minute(n).output_tokens())),
        ),
        (
            "concurrent",
            |t| t.concurrent,
            |m| m.concurrent,
            Box::new(Quota::concurrent),
        ),
        (
            // Budgets: calendar windows (UTC), whatever the rate limits' algorithm.
            "daily-cost",
            |t| t.daily_cost,
            |_| None,
            Box::new(|n| Quota::per_calendar_day(n).cost_units()),
        ),
        (
            "monthly-cost",
            |t| t.monthly_cost,
            |_| None,
            Box::new(|n| Quota::per_calendar_month(n).cost_units()),
        ),
        (
            "monthly-tokens",
            |t| t.monthly_tokens,
            |_| None,
            Box::new(|n| Quota::per_calendar_month(n).tokens()),
        ),
    ];
    let limit_tiers = limit_tiers(cfg);
    let mut rules = Vec::new();
    for (name, tier_limit, _, quota) in &kinds {
        let tiers: Vec<(&String, u64)> = limit_tiers
            .iter()
            .filter_map(|(t, c)| Some((t, tier_limit(c)?)))
            .collect();
        // The base quota applies to no one (callers whose tier lacks the limit skip the
        // rule); it is the smallest, the safe side.
        let Some(base) = tiers.iter().map(|(_, n)| *n).min() else {
            continue;
        };
        let with: HashSet<Arc<str>> = tiers.iter().map(|(t, _)| t.as_str().into()).collect();
        let mut rule = Rule::new(format!("user-{name}"), user_key(callers, with), quota(base))
            .on_missing_key(MissingKey::Skip);
        for (t, n) in tiers {
            rule = rule.tier(t.as_str(), quota(n));
        }
        rules.push(rule);
    }
    let tiers_of_limits = tiers_of_limits(cfg);
    for (model, m) in &cfg.models {
        if let Some(cap) = crate::capacity::of_model(cfg, model, &tiers_of_limits) {
            let key = ModelKey {
                model: Key::from(model.as_str()),
                name: model.clone(),
            };
            rules.push(
                Rule::new(
                    crate::metrics::capacity_rule_name(model),
                    key,
                    Quota::concurrent(cap.max()),
                )
                .on_missing_key(MissingKey::Skip)
                .capacity(cap),
            );
        }
        for (name, _, model_limit, quota) in &kinds {
            let Some(n) = model_limit(m) else { continue };
            let key = ModelKey {
                model: Key::from(model.as_str()),
                name: model.clone(),
            };
            rules.push(
                Rule::new(format!("model-{name}:{model}"), key, quota(n))
                    .on_missing_key(MissingKey::Skip),
            );
        }
    }
    rules
}

/// The models' capacity rules (of the models whose `[models.NAME.capacity]` is enabled):
/// rule name -> model.
pub(crate) fn capacity_rules(cfg: &Config) -> crate::metrics::CapacityRules {
    Arc::new(
        cfg.models
            .iter()
            .filter(|(_, m)| m.capacity.as_ref().is_some_and(|c| c.enabled))
            .map(|(model, _)| (crate::metrics::capacity_rule_name(model), model.clone()))
            .collect(),
    )
}

/// The most buckets one request charges at once: the rules of the tier that has the most
/// (a user's overrides count as a tier) plus those of the model that has the most.
pub(crate) fn most_buckets_per_request(cfg: &Config, callers: &Callers) -> usize {
    let per_tier = limit_tiers(cfg)
        .values()
        .map(|t| t.limits().iter().filter(|(_, v)| v.is_some()).count())
        .max()
        .unwrap_or(0);
    let mut per_model: HashMap<&str, usize> = HashMap::new();
    let rules = rules(cfg, callers);
    for rule in &rules {
        if let Some(model) = rule_model(rule.name()) {
            // A capacity with tiers charges the tier's own bucket too.
            let tiered = rule.capacity_config().is_some()
                && cfg.tiers.values().any(crate::capacity::has_priority);
            *per_model.entry(model).or_default() += 1 + usize::from(tiered);
        }
    }
    per_tier + per_model.values().copied().max().unwrap_or(0)
}

/// The metrics' observer, told each caller's configured tier: a user with overrides is
/// limited as a tier of its own (`TIER+USER`, see [`limit_tiers`]), which is no tier of the
/// file; counted under it, it would split the series of its tier and put user names into
/// label values.
fn metrics_observer(cfg: &Config, metrics: &Arc<Metrics>) -> crate::metrics::MetricsObserver {
    let configured: HashMap<String, String> = cfg
        .keys
        .values()
        .map(|k| (k.limits_tier(), k.tier.clone()))
        .filter(|(limits, tier)| limits != tier)
        .collect();
    Metrics::observer(metrics, configured, capacity_rules(cfg))
}

/// `name` as a `&'static str` (the layer's builder takes one for the idempotency header):
/// leaked once per distinct name, however many times a configuration is loaded (each
/// reload builds layers again).
fn static_name(name: &str) -> &'static str {
    static NAMES: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
    let mut names = NAMES.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(n) = names.iter().find(|n| **n == name) {
        return n;
    }
    let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
    names.push(leaked);
    leaked
}

/// The layer, on `store` (a clone of it: the counters are shared).
///
/// A bucket is the rule's name and the key (`BucketKey`): a layer rebuilt from a reloaded
/// configuration on the same store finds the counts of the rules it keeps, with their new
/// limits applied to them.
///
/// `previous`, the layer this one replaces (a reload): the models' capacities whose
/// controller settings are unchanged keep the limits they learned, and the layer keeps its
/// replica id and clock (`continue_capacity_of`).
pub(crate) fn layer(
    cfg: &Config,
    callers: &Callers,
    store: &Store,
    metrics: &Arc<Metrics>,
    previous: Option<&RateLimitLayer>,
) -> Result<RateLimitLayer, BuildError> {
    let l = &cfg.limiter;
    let mut estimator = cost::openai().default_output_tokens(l.default_output_tokens);
    let mut weights = Weights::new(1.0, 1.0);
    for (model, m) in &cfg.models {
        if let Some(n) = m.default_output_tokens {
            estimator = estimator.model_output_tokens(model.as_str(), n);
        }
        weights = weights.model(model.as_str(), m.input_price, m.output_price);
    }
    let tiers = {
        let callers = Arc::clone(callers);
        tier::from_fn(move |req| {
            resolved(&callers, req).map(|c| tier::Tier::new(Arc::clone(&c.limits)))
        })
    };
    let mut builder = RateLimitLayer::builder()
        .rules(rules(cfg, callers))
        .tiers(tiers)
        .cost(estimator)
        .weights(weights)
        .headers(match l.headers {
            config::Headers::Both => HeaderStyle::BOTH,
            config::Headers::Ietf => HeaderStyle::IETF,
            config::Headers::Openai => HeaderStyle::OPENAI,
            config::Headers::None => HeaderStyle::NONE,
        })
        .max_inspect_bytes(l.max_inspect_bytes)
        .on_unusable_body(match l.on_unusable_body {
            config::UnusableBody::Reject => BodyPolicy::Reject,
            config::UnusableBody::Fallback => BodyPolicy::Fallback,
        })
        .fallback_cost(Cost::tokens_of(l.fallback_tokens))
        .on_missing_usage(match l.on_missing_usage {
            config::MissingUsage::Keep => MissingUsage::KeepReservation,
            config::MissingUsage::Estimate => MissingUsage::EstimateStreamed,
        })
        .count_failed_requests(l.count_failed_requests)
        .request_usage_in_streams(l.request_usage_in_streams)
        .on_store_error(match cfg.store.on_failure {
            OnFailure::Open => FailurePolicy::Open,
            OnFailure::Closed | OnFailure::Fallback => FailurePolicy::Closed,
        })
        .observer(metrics_observer(cfg, metrics));
    if let Some(h) = &l.idempotency_header {
        builder = builder.idempotency_header(static_name(h));
    }
    if let Some(p) = previous {
        builder = builder.continue_capacity_of(p);
    }
    builder = match store {
        Store::Memory(s) => builder.store(s.clone()),
        #[cfg(feature = "redis")]
        Store::Redis(s) => builder.store(s.clone()),
    };
    builder.build()
}
