//! Metrics of the models' adaptive capacities (`[models.NAME.capacity]`), by model: the
//! current limit (read from the running layer at each scrape), requests in flight under it,
//! the queue, the waits in it, the requests shed, the controller's changes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use tower_llm_ratelimit::key::Key;
use tower_llm_ratelimit::observe::{
    CapacityEvent, DecisionEvent, Outcome, QueueEvent, QueueOutcome, SettleEvent,
};
use tower_llm_ratelimit::RateLimitLayer;

use super::{HistogramFamily, ModelLabel};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ModelTierLabels {
    model: String,
    tier: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ModelOutcomeLabels {
    model: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ModelChangeLabels {
    model: String,
    change: &'static str,
}

fn wait_histogram() -> Histogram {
    // 1 ms .. ~33 s
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// The capacity rules of a layer: rule name -> model.
pub(crate) type CapacityRules = Arc<HashMap<String, String>>;

/// The name of model `model`'s capacity rule.
pub(crate) fn rule_name(model: &str) -> String {
    format!("model-capacity:{model}")
}

/// The families (registered by `Metrics::new`, which holds clones of them) and the layer
/// the limits are read from.
pub(super) struct CapacityMetrics {
    pub(super) limit: Family<ModelLabel, Gauge>,
    pub(super) in_flight: Family<ModelLabel, Gauge>,
    pub(super) queue: Family<ModelLabel, Gauge>,
    pub(super) queue_wait: HistogramFamily<ModelOutcomeLabels>,
    pub(super) shed: Family<ModelTierLabels, Counter>,
    pub(super) changes: Family<ModelChangeLabels, Counter>,
    /// The running layer and its capacity rules, read at each scrape.
    watched: Mutex<Option<(RateLimitLayer, CapacityRules)>>,
}

impl CapacityMetrics {
    pub(super) fn new() -> Self {
        Self {
            limit: Family::default(),
            in_flight: Family::default(),
            queue: Family::default(),
            queue_wait: Family::new_with_constructor(wait_histogram),
            shed: Family::default(),
            changes: Family::default(),
            watched: Mutex::new(None),
        }
    }

    /// The layer the gauge of current limits reads from now on.
    pub(super) fn watch(&self, layer: &RateLimitLayer, rules: &CapacityRules) {
        *self.watched.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((layer.clone(), Arc::clone(rules)));
    }

    /// Reads the current limits (before an encoding): only the running layer's models.
    pub(super) fn refresh(&self) {
        let watched = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
        self.limit.clear();
        let Some((layer, rules)) = &*watched else {
            return;
        };
        for (rule, model) in rules.iter() {
            if let Some(limit) = layer.capacity_limit(rule, &Key::from(model.as_str())) {
                self.limit
                    .get_or_create(&ModelLabel {
                        model: model.clone(),
                    })
                    .set(i64::try_from(limit).unwrap_or(i64::MAX));
            }
        }
    }

    /// A decision: admitted under a capacity (one more in flight) or shed by it.
    pub(super) fn on_decision(&self, rules: &CapacityRules, event: &DecisionEvent<'_>) {
        match event.outcome {
            Outcome::Admitted => {
                if let Some(model) = event.rules.iter().find_map(|r| rules.get(r.rule)) {
                    self.in_flight
                        .get_or_create(&ModelLabel {
                            model: model.clone(),
                        })
                        .inc();
                }
            }
            Outcome::Denied { rule, .. } => {
                if let Some(model) = rules.get(rule) {
                    self.shed
                        .get_or_create(&ModelTierLabels {
                            model: model.clone(),
                            tier: event.tier.unwrap_or("").to_owned(),
                        })
                        .inc();
                }
            }
            _ => {}
        }
    }

    /// A request admitted under a capacity ended (the layer settles every request with a
    /// concurrency rule).
    pub(super) fn on_settle(&self, rules: &CapacityRules, event: &SettleEvent<'_>) {
        if let Some(model) = event.rules.iter().find_map(|r| rules.get(r.rule)) {
            self.in_flight
                .get_or_create(&ModelLabel {
                    model: model.clone(),
                })
                .dec();
        }
    }

    pub(super) fn on_capacity(&self, rules: &CapacityRules, event: &CapacityEvent<'_>) {
        let Some(model) = rules.get(event.rule) else {
            return;
        };
        let change = event.change.as_str();
        self.changes
            .get_or_create(&ModelChangeLabels {
                model: model.clone(),
                change,
            })
            .inc();
    }

    pub(super) fn on_queue(&self, rules: &CapacityRules, event: &QueueEvent<'_>) {
        let Some(model) = rules.get(event.rule) else {
            return;
        };
        if event.outcome.ends_a_wait() {
            self.queue_wait
                .get_or_create(&ModelOutcomeLabels {
                    model: model.clone(),
                    outcome: event.outcome.as_str(),
                })
                .observe(event.waited.as_secs_f64());
        }
        // Counted up and down by the events themselves (each entry ends once; a request
        // that found the queue full never entered): a length read in each event could be
        // set out of order by two tasks.
        let length = self.queue.get_or_create(&ModelLabel {
            model: model.clone(),
        });
        match event.outcome {
            QueueOutcome::Entered => {
                length.inc();
            }
            QueueOutcome::Full => {}
            _ => {
                length.dec();
            }
        }
    }
}
