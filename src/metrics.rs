//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (feature `metrics`).
//!
//! [`RateLimitLayerBuilder::metrics`](crate::RateLimitLayerBuilder::metrics) makes the layer
//! record what it decides and settles, the time and failures of its store calls, and the
//! moves of adaptive capacity, through the `metrics` crate's macros: whichever exporter the
//! application installs (`metrics-exporter-prometheus`, a StatsD or OpenTelemetry one)
//! publishes them; without one, recording is a no-op. The library depends on the facade
//! only. The built-in observer runs beside the layer's own [`crate::observe::Observer`],
//! if it has one, which sees the same events as without it.
//!
//! # Metrics
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `ratelimit_decisions_total` | counter | `tier`, `outcome` | decided requests, once each: `outcome` is `admitted`, `denied` (a rule refused it: 429), `missing_key` (a rule's key is missing, or the body it reads is unusable: 4xx), `cost_error` (its tokens could not be estimated: 4xx), `store_error_admitted` or `store_error_refused` (the store failed; [`crate::FailurePolicy`] `Open` or `Closed`) |
//! | `ratelimit_rule_decisions_total` | counter | `rule`, `tier`, `decision` | per rule the store checked: `admitted`, once for each rule of an admitted request (each was charged; a capacity with tiers counts its tier's own bucket as well, under `{rule}#{tier}` or `{rule}#`); `denied`, for the rule that refused a request (its other rules were charged nothing and are not counted) |
//! | `ratelimit_refusals_total` | counter | `rule`, `tier`, `reason` | requests refused by a rule: `reason` is `rate_limited` (over the limit now; `Retry-After` says when it passes), `over_limit` (its cost exceeds the rule's limit: it never will) or `missing_key` |
//! | `ratelimit_tokens_estimated_total` | counter | `rule`, `tier`, `unit` | token-based rules ([`crate::Unit`] `tokens`, `input_tokens`, `output_tokens`, `cost`), counted when an admitted request settles: the units charged at admission (the estimate) |
//! | `ratelimit_tokens_settled_total` | counter | `rule`, `tier`, `unit` | the same charges after settlement: the usage the response reported, or what [`crate::settle`] charges without it (0 for a failed request, the estimate kept, ...) |
//! | `ratelimit_tokens_settle_difference` | histogram | `rule`, `tier`, `unit` | per settled token charge: settled minus estimated (negative: a refund; positive: the estimate was short) |
//! | `ratelimit_settlements_total` | counter | `tier`, `outcome` | settled requests, by how they ended: `usage` (the response reported it), `no_usage`, `failed` (upstream error), `dropped` (the client left before a response) |
//! | `ratelimit_store_duration_seconds` | histogram | `call` | each store call on a request's path, from the call to its answer, by the layer's clock ([`crate::RateLimitLayerBuilder::clock`]): `call` is `acquire`, `settle` or `fail_attempt` ([`crate::observe::StoreCall`]) |
//! | `ratelimit_store_failures_total` | counter | `call`, `kind` | store calls that failed: `kind` is `at_capacity`, `duplicate_bucket` or `backend` ([`crate::store::StoreError`]) |
//! | `ratelimit_capacity_changes_total` | counter | `rule`, `change` | an adaptive bucket's limit moved ([`crate::capacity`]): `change` is `overload`, `latency` or `growth` |
//! | `ratelimit_queue_total` | counter | `rule`, `tier`, `outcome` | requests that left a capacity's queue, or found it full: `admitted`, `timed_out`, `full`, `left` (the client went away), `refused` (woken, then refused by another rule or a store error) |
//! | `ratelimit_queue_wait_seconds` | histogram | `rule`, `tier`, `outcome` | how long each waited |
//!
//! # Labels are bounded
//!
//! Labels name only what the configuration names: `rule` is a rule's name (or, for the
//! tiers' own buckets of a capacity with tiers, `{rule}#{tier}` and `{rule}#`); `tier` is a
//! tier some rule or capacity lists, `""` for a caller without a tier, and `other` for a
//! tier no rule lists (a resolver reading a header could name any); the other labels take
//! the fixed values above. Keys (users, API keys, IPs) and models are never labels, so a
//! flood of new keys creates no new series. (An observer of your own sees them: see
//! [`crate::observe`].)
//!
//! A bucket's current capacity is not a gauge here: it is per bucket key, and keys are not
//! labels. An application that knows its keys (a gateway's models) records it from
//! [`crate::observe::Observer::on_capacity`].
//!
//! # Cost
//!
//! Without `metrics()`, nothing is recorded and no clock is read. With it, each decided
//! request records a few counters (the facade looks up each series in the installed
//! recorder), its decision and settlement build their observer events, and each store call
//! reads the layer's clock twice; a store doing I/O has its answer's future wrapped in one
//! more allocation.
//!
//! # Examples
//!
//! An application installs its exporter as the global recorder (e.g.
//! `metrics_exporter_prometheus::PrometheusBuilder::new().install()`); here, a debugging
//! recorder reads back what one request recorded.
//!
//! ```
//! use std::convert::Infallible;
//! use http::{Request, Response};
//! use metrics_util::debugging::{DebugValue, DebuggingRecorder};
//! use tower::ServiceExt;
//! use tower_llm_ratelimit::{key, Quota, RateLimitLayer, RequestBody, Rule};
//!
//! let layer = RateLimitLayer::builder()
//!     .rule(Rule::new("user-rpm", key::header("x-api-key"), Quota::per_minute(60)))
//!     .metrics()
//!     .build()
//!     .unwrap();
//! let app = tower::ServiceBuilder::new().layer(layer).service(tower::service_fn(
//!     |_: Request<RequestBody<String>>| async { Ok::<_, Infallible>(Response::new(String::new())) },
//! ));
//! let request = Request::builder().header("x-api-key", "k1").body(String::new()).unwrap();
//!
//! let recorder = DebuggingRecorder::new();
//! let snapshotter = recorder.snapshotter();
//! metrics::with_local_recorder(&recorder, || {
//!     let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
//!     rt.block_on(app.oneshot(request)).unwrap();
//! });
//! let admitted: Vec<_> = snapshotter
//!     .snapshot()
//!     .into_vec()
//!     .into_iter()
//!     .filter(|(key, ..)| key.key().name() == "ratelimit_decisions_total")
//!     .map(|(key, _, _, value)| {
//!         let labels: Vec<_> = key.key().labels().map(|l| (l.key().to_owned(), l.value().to_owned())).collect();
//!         (labels, value)
//!     })
//!     .collect();
//! let labels = vec![("tier".to_owned(), String::new()), ("outcome".to_owned(), "admitted".to_owned())];
//! assert_eq!(admitted, [(labels, DebugValue::Counter(1))]);
//! ```

use std::sync::Arc;

use ::metrics::{counter, describe_counter, describe_histogram, histogram, SharedString, Unit};

use crate::observe::{
    CapacityEvent, DecisionEvent, Observer, Outcome, QueueEvent, SettleEvent, SettleOutcome,
    StoreCallEvent,
};
use crate::rule::Rule;
use crate::store::StoreError;

const DECISIONS: &str = "ratelimit_decisions_total";
const RULE_DECISIONS: &str = "ratelimit_rule_decisions_total";
const REFUSALS: &str = "ratelimit_refusals_total";
const TOKENS_ESTIMATED: &str = "ratelimit_tokens_estimated_total";
const TOKENS_SETTLED: &str = "ratelimit_tokens_settled_total";
const TOKENS_DIFFERENCE: &str = "ratelimit_tokens_settle_difference";
const SETTLEMENTS: &str = "ratelimit_settlements_total";
const STORE_DURATION: &str = "ratelimit_store_duration_seconds";
const STORE_FAILURES: &str = "ratelimit_store_failures_total";
const CAPACITY_CHANGES: &str = "ratelimit_capacity_changes_total";
const QUEUE: &str = "ratelimit_queue_total";
const QUEUE_WAIT: &str = "ratelimit_queue_wait_seconds";

/// The `tier` label of a tier no rule lists.
const OTHER_TIER: &str = "other";

/// Describes the layer's metrics (their units and help texts) to the installed recorder.
///
/// [`build`](crate::RateLimitLayerBuilder::build) calls it for a layer with
/// [`metrics`](crate::RateLimitLayerBuilder::metrics); call it again if the recorder is
/// installed after the layer is built (exporters keep what they are told first).
pub fn describe() {
    describe_counter!(DECISIONS, Unit::Count, "Requests decided, by outcome.");
    describe_counter!(
        RULE_DECISIONS,
        Unit::Count,
        "Per rule: requests it admitted (charged), or refused."
    );
    describe_counter!(
        REFUSALS,
        Unit::Count,
        "Requests refused by a rule, by reason."
    );
    describe_counter!(
        TOKENS_ESTIMATED,
        "Units charged at admission (the estimate) by token rules, counted at settlement."
    );
    describe_counter!(
        TOKENS_SETTLED,
        "Units of the same charges after settlement (the reported usage)."
    );
    describe_histogram!(
        TOKENS_DIFFERENCE,
        "Per settled token charge: settled minus estimated units."
    );
    describe_counter!(
        SETTLEMENTS,
        Unit::Count,
        "Admitted requests settled, by how they ended."
    );
    describe_histogram!(
        STORE_DURATION,
        Unit::Seconds,
        "Time of each rate-limit store call."
    );
    describe_counter!(
        STORE_FAILURES,
        Unit::Count,
        "Rate-limit store calls that failed."
    );
    describe_counter!(
        CAPACITY_CHANGES,
        Unit::Count,
        "Moves of an adaptive bucket's limit, by cause."
    );
    describe_counter!(
        QUEUE,
        Unit::Count,
        "Requests out of a capacity's queue, by outcome."
    );
    describe_histogram!(
        QUEUE_WAIT,
        Unit::Seconds,
        "Time spent in a capacity's queue."
    );
}

/// The label values the configuration names, shared (no allocation per event).
#[derive(Debug)]
struct Labels {
    rules: Vec<Arc<str>>,
    tiers: Vec<Arc<str>>,
}

impl Labels {
    fn new(rules: &[Rule]) -> Self {
        let mut tiers: Vec<Arc<str>> = Vec::new();
        for rule in rules {
            let listed = rule.tiers.iter().map(|(t, _)| t);
            let prioritized = rule
                .capacity
                .iter()
                .flat_map(|c| c.tiers.iter().map(|(t, _)| t));
            for t in listed.chain(prioritized) {
                if !tiers.contains(t) {
                    tiers.push(Arc::clone(t));
                }
            }
        }
        let mut names: Vec<Arc<str>> = rules.iter().map(|r| Arc::clone(&r.name)).collect();
        // The tiers' own buckets of a capacity with tiers.
        for rule in rules {
            let Some(cap) = rule.capacity.as_ref().filter(|c| c.has_tiers()) else {
                continue;
            };
            let own = cap.tiers.iter().map(|(t, _)| format!("{}#{t}", rule.name));
            names.extend(own.chain([format!("{}#", rule.name)]).map(Arc::from));
        }
        Self {
            rules: names,
            tiers,
        }
    }

    fn rule(&self, name: &str) -> SharedString {
        match self.rules.iter().find(|r| &***r == name) {
            Some(r) => SharedString::from(Arc::clone(r)),
            // Not a name the layer's events use.
            None => SharedString::from(name.to_owned()),
        }
    }

    fn tier(&self, tier: Option<&str>) -> SharedString {
        let Some(tier) = tier else {
            return SharedString::const_str("");
        };
        match self.tiers.iter().find(|t| &***t == tier) {
            Some(t) => SharedString::from(Arc::clone(t)),
            None => SharedString::const_str(OTHER_TIER),
        }
    }
}

/// Records the layer's events through the `metrics` facade, and passes them on to the
/// layer's own observer, if it has one.
pub(crate) struct MetricsObserver {
    labels: Labels,
    observer: Option<Arc<dyn Observer>>,
    /// The layer's own observer wants settlements (it may not: a closure).
    settlements: bool,
    /// The layer's own observer wants store calls.
    store_calls: bool,
}

impl MetricsObserver {
    /// Records the events of a layer of `rules`, beside `observer`.
    pub(crate) fn new(rules: &[Rule], observer: Option<Arc<dyn Observer>>) -> Self {
        describe();
        Self {
            labels: Labels::new(rules),
            settlements: observer.as_ref().is_some_and(|o| o.observes_settlements()),
            store_calls: observer.as_ref().is_some_and(|o| o.observes_store_calls()),
            observer,
        }
    }
}

fn outcome_label(outcome: &Outcome<'_>) -> &'static str {
    match outcome {
        Outcome::Admitted => "admitted",
        Outcome::Denied { .. } => "denied",
        Outcome::MissingKey { .. } => "missing_key",
        Outcome::CostError => "cost_error",
        Outcome::StoreError { admitted: true } => "store_error_admitted",
        Outcome::StoreError { admitted: false } => "store_error_refused",
    }
}

fn error_kind(error: &StoreError) -> &'static str {
    match error {
        StoreError::AtCapacity { .. } => "at_capacity",
        StoreError::DuplicateBucket(_) => "duplicate_bucket",
        StoreError::Backend(_) => "backend",
    }
}

impl Observer for MetricsObserver {
    fn on_decision(&self, event: &DecisionEvent<'_>) {
        let tier = self.labels.tier(event.tier);
        counter!(DECISIONS, "tier" => tier.clone(), "outcome" => outcome_label(&event.outcome))
            .increment(1);
        match event.outcome {
            Outcome::Admitted => {
                for r in event.rules {
                    counter!(
                        RULE_DECISIONS,
                        "rule" => self.labels.rule(r.rule),
                        "tier" => tier.clone(),
                        "decision" => "admitted"
                    )
                    .increment(1);
                }
            }
            Outcome::Denied { rule, retry_after } => {
                let rule = self.labels.rule(rule);
                counter!(
                    RULE_DECISIONS,
                    "rule" => rule.clone(),
                    "tier" => tier.clone(),
                    "decision" => "denied"
                )
                .increment(1);
                let reason = if retry_after.is_some() {
                    "rate_limited"
                } else {
                    "over_limit"
                };
                counter!(REFUSALS, "rule" => rule, "tier" => tier, "reason" => reason).increment(1);
            }
            Outcome::MissingKey { rule } => {
                counter!(
                    REFUSALS,
                    "rule" => self.labels.rule(rule),
                    "tier" => tier,
                    "reason" => "missing_key"
                )
                .increment(1);
            }
            _ => {}
        }
        if let Some(o) = &self.observer {
            o.on_decision(event);
        }
    }

    fn on_settle(&self, event: &SettleEvent<'_>) {
        let tier = self.labels.tier(event.tier);
        let outcome = match event.outcome {
            SettleOutcome::Usage(_) => "usage",
            SettleOutcome::NoUsage { .. } => "no_usage",
            SettleOutcome::Failed => "failed",
            SettleOutcome::Dropped => "dropped",
        };
        counter!(SETTLEMENTS, "tier" => tier.clone(), "outcome" => outcome).increment(1);
        for r in event.rules.iter().filter(|r| r.unit.is_token_based()) {
            let rule = self.labels.rule(r.rule);
            let unit = r.unit.as_str();
            counter!(TOKENS_ESTIMATED, "rule" => rule.clone(), "tier" => tier.clone(), "unit" => unit)
                .increment(r.charged);
            counter!(TOKENS_SETTLED, "rule" => rule.clone(), "tier" => tier.clone(), "unit" => unit)
                .increment(r.actual);
            histogram!(TOKENS_DIFFERENCE, "rule" => rule, "tier" => tier.clone(), "unit" => unit)
                .record(r.actual as f64 - r.charged as f64);
        }
        if let Some(o) = self.observer.as_ref().filter(|_| self.settlements) {
            o.on_settle(event);
        }
    }

    fn on_capacity(&self, event: &CapacityEvent<'_>) {
        let rule = self.labels.rule(event.rule);
        counter!(CAPACITY_CHANGES, "rule" => rule, "change" => event.change.as_str()).increment(1);
        if let Some(o) = &self.observer {
            o.on_capacity(event);
        }
    }

    fn on_queue(&self, event: &QueueEvent<'_>) {
        if event.outcome.ends_a_wait() {
            let rule = self.labels.rule(event.rule);
            let tier = self.labels.tier(event.tier);
            let outcome = event.outcome.as_str();
            counter!(QUEUE, "rule" => rule.clone(), "tier" => tier.clone(), "outcome" => outcome)
                .increment(1);
            histogram!(QUEUE_WAIT, "rule" => rule, "tier" => tier, "outcome" => outcome)
                .record(event.waited.as_secs_f64());
        }
        if let Some(o) = &self.observer {
            o.on_queue(event);
        }
    }

    fn on_store_call(&self, event: &StoreCallEvent<'_>) {
        let call = event.call.as_str();
        histogram!(STORE_DURATION, "call" => call).record(event.elapsed.as_secs_f64());
        if let Some(e) = event.error {
            counter!(STORE_FAILURES, "call" => call, "kind" => error_kind(e)).increment(1);
        }
        if let Some(o) = self.observer.as_ref().filter(|_| self.store_calls) {
            o.on_store_call(event);
        }
    }

    fn observes_settlements(&self) -> bool {
        true
    }

    fn observes_usage(&self) -> bool {
        self.settlements && self.observer.as_ref().is_some_and(|o| o.observes_usage())
    }

    fn observes_store_calls(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capacity::{Capacity, Priority};
    use crate::{key, Quota};

    /// Tier labels are the tiers the configuration lists; any other is `other`, none is
    /// `""`: a resolver that reads a header can't make new series.
    #[test]
    fn tier_labels_are_bounded_by_the_configuration() {
        let rules = [
            Rule::new("a", key::global(), Quota::per_minute(1)).tier("pro", Quota::per_minute(2)),
            Rule::new("b", key::global(), Quota::concurrent(4))
                .capacity(Capacity::adaptive(1, 4).tier("gold", Priority::new(1))),
        ];
        let labels = Labels::new(&rules);
        assert_eq!(&*labels.tier(Some("pro")), "pro");
        assert_eq!(&*labels.tier(Some("gold")), "gold");
        assert_eq!(&*labels.tier(Some("x-9f3a")), OTHER_TIER);
        assert_eq!(&*labels.tier(None), "");
        assert_eq!(&*labels.rule("b"), "b");
        assert!(labels.rules.iter().any(|r| &**r == "b#gold"));
        assert!(labels.rules.iter().any(|r| &**r == "b#"));
    }
}
