//! Prometheus metrics (`GET /metrics`, text format 0.0.4).
//!
//! | metric | labels | from |
//! |---|---|---|
//! | `gateway_ratelimit_admitted_total` | tier (the key's configured tier, also for a user whose keys override its limits) | the limiter's observer |
//! | `gateway_ratelimit_denied_total` | rule, tier | the limiter's observer |
//! | `gateway_ratelimit_rejected_total` | reason (`missing_key`, `cost_error`) | the limiter's observer |
//! | `gateway_ratelimit_store_errors_total` | action (`admitted`, `rejected`): what the failure policy did | the limiter's observer |
//! | `gateway_ratelimit_decision_seconds` | outcome | the observer, timed from the request's arrival (a task-local set by the auth check) |
//! | `gateway_tokens_estimated_total` | model | the observer: a token rule's charge on admission |
//! | `gateway_tokens_settled_total` | model, kind (`input`, `output`) | the observer: the `usage` of every successful upstream response, which the limiter reads once as it streams past (for its token rules and this metric), labelled with the routed model |
//! | `gateway_upstream_responses_total` | model, status (a code, `unreachable`, `timeout`) | the proxy |
//! | `gateway_upstream_response_seconds` | model | the proxy: time to the upstream's response headers |
//! | `gateway_responses_total` | endpoint, status | every answer of the API endpoints |
//! | `gateway_config_reloads_total` | result (`ok`, `failed`) | SIGHUP: each reload of the configuration file (`reload.rs`) |
//! | `gateway_config_last_reload_success_timestamp_seconds` | | when the running configuration was loaded (at start, then at each successful reload), Unix time |
//! | `gateway_store_redis_*` | | `RedisStore::stats()` at each scrape (feature `redis`) |
//! | `gateway_capacity_limit` | model | a model's adaptive capacity (`[models.NAME.capacity]`): its current limit, read from the running layer at each scrape |
//! | `gateway_capacity_in_flight` | model | the observer: requests admitted under the capacity and not yet ended |
//! | `gateway_capacity_queue_length` | model | the observer: requests waiting for a slot (up at each entry, down at each end of a wait) |
//! | `gateway_capacity_queue_wait_seconds` | model, outcome (`admitted`, `timed_out`, `full`, `left`, `refused`: woken, then refused by another rule or a store error) | the observer: each wait in the queue |
//! | `gateway_capacity_shed_total` | model, tier | the observer: requests the capacity refused (429) |
//! | `gateway_capacity_changes_total` | model, change (`overload`, `latency`, `growth`) | the observer: the controller's changes of the limit |

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tower_llm_ratelimit::observe::{
    CapacityEvent, DecisionEvent, Observer, Outcome, QueueEvent, SettleEvent, SettleOutcome,
};
use tower_llm_ratelimit::{RateLimitLayer, Unit};

mod capacity;

pub(crate) use self::capacity::{rule_name as capacity_rule_name, CapacityRules};
use self::capacity::{ModelChangeLabels, ModelOutcomeLabels, ModelTierLabels};

tokio::task_local! {
    /// The request being decided: set by the auth check around the limiter, read by the
    /// observer (which the limiter calls on the request's task, during its decision).
    pub(crate) static REQUEST: RequestContext;
}

/// What the observer can't see in a `DecisionEvent`.
#[derive(Debug, Clone)]
pub(crate) struct RequestContext {
    pub(crate) start: Instant,
    pub(crate) model: Arc<str>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierLabel {
    tier: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleTierLabels {
    rule: String,
    tier: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabel {
    action: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabel {
    model: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelKindLabels {
    model: String,
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelStatusLabels {
    model: String,
    status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointStatusLabels {
    endpoint: String,
    status: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 20 µs .. ~0.65 s
    Histogram::new(exponential_buckets(0.000_02, 2.0, 16))
}

fn upstream_histogram() -> Histogram {
    // 1 ms .. ~33 s
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// The limiter's observer: decisions, and the usage of every admitted response
/// ([`Observer::observes_usage`]: the limiter reads it for the metrics too, not only for the
/// token rules, so the gateway needs no parser of its own).
pub(crate) struct MetricsObserver {
    metrics: Arc<Metrics>,
    /// The configured tier of each tier the limiter knows by another name (a user with
    /// overrides is limited as `TIER+USER`): decisions are counted under the configured one,
    /// so that its series isn't split and no user name becomes a label value.
    configured: HashMap<String, String>,
    /// The layer's capacity rules, by name, with their models.
    capacity_rules: CapacityRules,
}

impl Observer for MetricsObserver {
    fn on_decision(&self, event: &DecisionEvent<'_>) {
        let tier = event
            .tier
            .map(|t| self.configured.get(t).map_or(t, String::as_str));
        let event = DecisionEvent { tier, ..*event };
        self.metrics.on_decision(&event);
        self.metrics
            .capacity
            .on_decision(&self.capacity_rules, &event);
    }

    fn on_settle(&self, event: &SettleEvent<'_>) {
        self.metrics.on_settle(event);
        self.metrics.capacity.on_settle(&self.capacity_rules, event);
    }

    fn on_capacity(&self, event: &CapacityEvent<'_>) {
        self.metrics
            .capacity
            .on_capacity(&self.capacity_rules, event);
    }

    fn on_queue(&self, event: &QueueEvent<'_>) {
        self.metrics.capacity.on_queue(&self.capacity_rules, event);
    }

    fn observes_usage(&self) -> bool {
        true
    }
}

pub(crate) struct Metrics {
    registry: Mutex<Registry>,
    admitted: Family<TierLabel, Counter>,
    denied: Family<RuleTierLabels, Counter>,
    rejected: Family<ReasonLabel, Counter>,
    store_errors: Family<ActionLabel, Counter>,
    decision_seconds: HistogramFamily<OutcomeLabel>,
    tokens_estimated: Family<ModelLabel, Counter>,
    tokens_settled: Family<ModelKindLabels, Counter>,
    upstream: Family<ModelStatusLabels, Counter>,
    upstream_seconds: HistogramFamily<ModelLabel>,
    responses: Family<EndpointStatusLabels, Counter>,
    reloads: Family<ResultLabel, Counter>,
    last_reload: Gauge,
    capacity_limit: Family<ModelLabel, Gauge>,
    capacity_in_flight: Family<ModelLabel, Gauge>,
    capacity_queue_length: Family<ModelLabel, Gauge>,
    capacity_queue_wait: HistogramFamily<ModelOutcomeLabels>,
    capacity_shed: Family<ModelTierLabels, Counter>,
    capacity_changes: Family<ModelChangeLabels, Counter>,
    /// The same families (clones), and what the observer and the scrape do with them.
    capacity: capacity::CapacityMetrics,
    /// The dashboard's counts (fed here, beside the metrics, so that their totals agree)
    /// and sessions: like the metrics, they outlive reloads.
    pub(crate) board: Arc<crate::dashboard::Board>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub(crate) fn new() -> Arc<Self> {
        let capacity = capacity::CapacityMetrics::new();
        let m = Self {
            capacity_limit: capacity.limit.clone(),
            capacity_in_flight: capacity.in_flight.clone(),
            capacity_queue_length: capacity.queue.clone(),
            capacity_queue_wait: capacity.queue_wait.clone(),
            capacity_shed: capacity.shed.clone(),
            capacity_changes: capacity.changes.clone(),
            capacity,
            registry: Mutex::new(Registry::with_prefix("gateway")),
            admitted: Family::default(),
            denied: Family::default(),
            rejected: Family::default(),
            store_errors: Family::default(),
            decision_seconds: Family::new_with_constructor(latency_histogram),
            tokens_estimated: Family::default(),
            tokens_settled: Family::default(),
            upstream: Family::default(),
            upstream_seconds: Family::new_with_constructor(upstream_histogram),
            responses: Family::default(),
            reloads: Family::default(),
            last_reload: Gauge::default(),
            board: Arc::default(),
        };
        {
            let mut r = m.registry.lock().unwrap();
            r.register(
                "ratelimit_admitted",
                "Requests the rate limiter admitted",
                m.admitted.clone(),
            );
            r.register(
                "ratelimit_denied",
                "Requests the rate limiter denied (429), by the rule that denied",
                m.denied.clone(),
            );
            r.register(
                "ratelimit_rejected",
                "Requests the rate limiter rejected before deciding",
                m.rejected.clone(),
            );
            r.register(
                "ratelimit_store_errors",
                "Decisions the store could not make, by what the failure policy did",
                m.store_errors.clone(),
            );
            r.register(
                "ratelimit_decision_seconds",
                "Time from a request's arrival to the limiter's decision (body read included)",
                m.decision_seconds.clone(),
            );
            r.register(
                "tokens_estimated",
                "Tokens reserved before admission (the estimate)",
                m.tokens_estimated.clone(),
            );
            r.register(
                "tokens_settled",
                "Tokens the upstreams reported in `usage`",
                m.tokens_settled.clone(),
            );
            r.register(
                "upstream_responses",
                "Upstream answers by status code, or unreachable / timeout",
                m.upstream.clone(),
            );
            r.register(
                "upstream_response_seconds",
                "Time to the upstream's response headers",
                m.upstream_seconds.clone(),
            );
            r.register(
                "responses",
                "Answers of the gateway's API endpoints by status",
                m.responses.clone(),
            );
            r.register(
                "config_reloads",
                "Reloads of the configuration file (SIGHUP), by result",
                m.reloads.clone(),
            );
            r.register(
                "config_last_reload_success_timestamp_seconds",
                "When the running configuration was loaded (start or last successful reload), \
                 Unix time",
                m.last_reload.clone(),
            );
            r.register(
                "capacity_limit",
                "The current limit of requests in flight to a model with an adaptive capacity",
                m.capacity_limit.clone(),
            );
            r.register(
                "capacity_in_flight",
                "Requests in flight under a model's adaptive capacity (admitted, not yet ended)",
                m.capacity_in_flight.clone(),
            );
            r.register(
                "capacity_queue_length",
                "Requests waiting for a slot of a model's capacity",
                m.capacity_queue_length.clone(),
            );
            r.register(
                "capacity_queue_wait_seconds",
                "Time requests waited in a model's capacity queue, by how the wait ended \
                 (admitted, timed_out, full, left, refused)",
                m.capacity_queue_wait.clone(),
            );
            r.register(
                "capacity_shed",
                "Requests refused (429) by a model's capacity, by tier",
                m.capacity_shed.clone(),
            );
            r.register(
                "capacity_changes",
                "Changes of a model's capacity by its controller, by cause (overload, latency, \
                 growth)",
                m.capacity_changes.clone(),
            );
            // Both results show from the start (at 0), so a rate or an alert on failures
            // has a series before the first one.
            for result in ["ok", "failed"] {
                let _ = m.reloads.get_or_create(&ResultLabel { result });
            }
        }
        Arc::new(m)
    }

    /// The limiter's observer.
    /// The layer's observer; `configured` maps the limiter's tiers made of overrides to the
    /// configured tier they count under.
    pub(crate) fn observer(
        this: &Arc<Self>,
        configured: HashMap<String, String>,
        capacity_rules: CapacityRules,
    ) -> MetricsObserver {
        MetricsObserver {
            metrics: Arc::clone(this),
            configured,
            capacity_rules,
        }
    }

    /// The layer whose capacities `gateway_capacity_limit` shows from now on (the running
    /// one: the start's, then each reload's).
    pub(crate) fn watch_capacity(&self, layer: &RateLimitLayer, rules: &CapacityRules) {
        self.capacity.watch(layer, rules);
    }

    fn on_decision(&self, event: &DecisionEvent<'_>) {
        let tier = event.tier.unwrap_or("").to_owned();
        let ctx = REQUEST.try_with(Clone::clone).ok();
        let outcome = match event.outcome {
            Outcome::Admitted => {
                self.admitted.get_or_create(&TierLabel { tier }).inc();
                // Every token rule charges the same estimate; take the first.
                let estimate = event
                    .rules
                    .iter()
                    .find(|r| r.unit == Unit::Tokens)
                    .map(|r| r.cost);
                if let (Some(tokens), Some(ctx)) = (estimate, &ctx) {
                    self.tokens_estimated
                        .get_or_create(&ModelLabel {
                            model: ctx.model.to_string(),
                        })
                        .inc_by(tokens);
                }
                "admitted"
            }
            Outcome::Denied { rule, .. } => {
                self.board
                    .tally
                    .refused(ctx.as_ref().map(|c| &*c.model), rule);
                self.denied
                    .get_or_create(&RuleTierLabels {
                        rule: rule.to_owned(),
                        tier,
                    })
                    .inc();
                "denied"
            }
            Outcome::MissingKey { .. } => {
                self.board.tally.rejected("missing_key");
                self.rejected
                    .get_or_create(&ReasonLabel {
                        reason: "missing_key",
                    })
                    .inc();
                "rejected"
            }
            Outcome::CostError => {
                self.board.tally.rejected("cost_error");
                self.rejected
                    .get_or_create(&ReasonLabel {
                        reason: "cost_error",
                    })
                    .inc();
                "rejected"
            }
            Outcome::StoreError { admitted } => {
                let action = if admitted { "admitted" } else { "rejected" };
                self.store_errors
                    .get_or_create(&ActionLabel { action })
                    .inc();
                "store_error"
            }
            _ => "other",
        };
        if let Some(ctx) = ctx {
            self.decision_seconds
                .get_or_create(&OutcomeLabel { outcome })
                .observe(ctx.start.elapsed().as_secs_f64());
        }
    }

    /// The usage an upstream response reported (`SettleOutcome::Usage`), by the request's
    /// routed model (its `ModelLabel`, set by the gate).
    fn on_settle(&self, event: &SettleEvent<'_>) {
        self.board.tally.settled(event);
        if let SettleOutcome::Usage(u) = event.outcome {
            self.settled(
                event.model.unwrap_or_default(),
                u.input_tokens,
                u.output_tokens,
            );
        }
    }

    fn settled(&self, model: &str, input: u64, output: u64) {
        for (kind, n) in [("input", input), ("output", output)] {
            self.tokens_settled
                .get_or_create(&ModelKindLabels {
                    model: model.to_owned(),
                    kind,
                })
                .inc_by(n);
        }
    }

    pub(crate) fn upstream(&self, model: &str, status: String, seconds: Option<f64>) {
        self.board.tally.upstream(model);
        self.upstream
            .get_or_create(&ModelStatusLabels {
                model: model.to_owned(),
                status,
            })
            .inc();
        if let Some(s) = seconds {
            self.upstream_seconds
                .get_or_create(&ModelLabel {
                    model: model.to_owned(),
                })
                .observe(s);
        }
    }

    pub(crate) fn response(&self, endpoint: &str, status: u16) {
        self.responses
            .get_or_create(&EndpointStatusLabels {
                endpoint: endpoint.to_owned(),
                status: status.to_string(),
            })
            .inc();
    }

    /// The configuration now running was loaded now: at start, or by a successful reload.
    pub(crate) fn config_loaded(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.last_reload.set(i64::try_from(now).unwrap_or(i64::MAX));
    }

    /// A reload of the configuration file ended: applied (`ok`) or refused (`failed`).
    pub(crate) fn reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.reloads.get_or_create(&ResultLabel { result }).inc();
        if ok {
            self.config_loaded();
        }
    }

    /// Exports the Redis store's counters at each scrape.
    #[cfg(feature = "redis")]
    pub(crate) fn watch_redis(&self, store: tower_llm_ratelimit::store::RedisStore) {
        self.registry
            .lock()
            .unwrap()
            .register_collector(Box::new(redis_stats::RedisCollector(store)));
    }

    /// The Prometheus text exposition, and its content type.
    pub(crate) fn encode(&self) -> (String, &'static str) {
        use prometheus_client::encoding::prometheus_text;
        self.capacity.refresh();
        let mut out = String::new();
        let registry = self.registry.lock().unwrap();
        prometheus_text::encode(&mut out, &registry).expect("writing to a String can't fail");
        (out, prometheus_text::CONTENT_TYPE)
    }
}

#[cfg(feature = "redis")]
mod redis_stats {
    use prometheus_client::collector::Collector;
    use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
    use prometheus_client::metrics::counter::ConstCounter;
    use prometheus_client::metrics::gauge::ConstGauge;
    use tower_llm_ratelimit::store::RedisStore;

    #[derive(Debug)]
    pub(super) struct RedisCollector(pub(super) RedisStore);

    impl Collector for RedisCollector {
        fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
            let s = self.0.stats();
            let counters = [
                (
                    "store_redis_errors",
                    "Redis calls that failed, timed out or were refused by the open circuit",
                    s.errors,
                ),
                (
                    "store_redis_fallback_decisions",
                    "Decisions taken locally while Redis could not answer (on_failure = fallback)",
                    s.fallback_decisions,
                ),
                (
                    "store_redis_breaker_opened",
                    "Times the Redis circuit breaker opened",
                    s.breaker_opened,
                ),
            ];
            for (name, help, value) in counters {
                let c = ConstCounter::new(value);
                let e = encoder.encode_descriptor(name, help, None, c.metric_type())?;
                c.encode(e)?;
            }
            let g = ConstGauge::new(i64::from(s.circuit_open));
            let e = encoder.encode_descriptor(
                "store_redis_circuit_open",
                "1 while the Redis circuit breaker is open (the store fails fast or falls back)",
                None,
                g.metric_type(),
            )?;
            g.encode(e)
        }
    }
}
