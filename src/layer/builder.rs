//! [`RateLimitLayerBuilder`]: the layer's configuration, checked once by `build`.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use super::{RateLimitLayer, DEFAULT_MAX_INSPECT_BYTES};
use crate::algorithm::Algorithm;
use crate::capacity::{random_replica_id, RuleCapacity};
use crate::clock::{Clock, SystemClock};
use crate::cost::{Cost, CostEstimator, Weights};
use crate::error::BuildError;
use crate::headers::{HeaderStyle, JoinedPolicies, QuotaHeaders};
use crate::inspect::BodyPolicy;
use crate::limiter::{FailurePolicy, Limiter, MissingUsage, Settling};
use crate::observe::Observer;
use crate::rule::{Quota, Rule, Unit};
use crate::store::{MemoryStore, Store};
use crate::tier::TierResolver;

/// Configures a [`RateLimitLayer`]; [`build`](Self::build) checks everything once.
pub struct RateLimitLayerBuilder {
    rules: Vec<Rule>,
    store: Option<Arc<dyn Store>>,
    tiers: Option<Box<dyn TierResolver>>,
    cost: Option<Box<dyn CostEstimator>>,
    headers: HeaderStyle,
    observer: Option<Arc<dyn Observer>>,
    failure: FailurePolicy,
    weights: Weights,
    max_inspect_bytes: usize,
    body_policy: BodyPolicy,
    fallback_cost: Cost,
    missing_usage: MissingUsage,
    count_failed_requests: bool,
    request_stream_usage: bool,
    idempotency_header: Option<Result<http::HeaderName, String>>,
    clock: Option<Arc<dyn Clock>>,
    replica: Option<String>,
    #[cfg(feature = "metrics")]
    metrics: bool,
    previous: Option<RateLimitLayer>,
}

impl fmt::Debug for RateLimitLayerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayerBuilder")
            .field("rules", &self.rules)
            .field("store", &self.store)
            .field("headers", &self.headers)
            .field("failure", &self.failure)
            .field("previous", &self.previous)
            .finish_non_exhaustive()
    }
}

impl RateLimitLayerBuilder {
    pub(super) fn new() -> Self {
        Self {
            rules: Vec::new(),
            store: None,
            tiers: None,
            cost: None,
            headers: HeaderStyle::default(),
            observer: None,
            failure: FailurePolicy::default(),
            weights: Weights::default(),
            max_inspect_bytes: DEFAULT_MAX_INSPECT_BYTES,
            body_policy: BodyPolicy::default(),
            fallback_cost: Cost::default(),
            missing_usage: MissingUsage::default(),
            count_failed_requests: true,
            request_stream_usage: false,
            idempotency_header: None,
            clock: None,
            replica: None,
            #[cfg(feature = "metrics")]
            metrics: false,
            previous: None,
        }
    }

    /// Adds a rule. Every rule applies to every request; a request is admitted only if all
    /// admit it, and then all are charged.
    pub fn rule(mut self, rule: Rule) -> Self {
        self.rules.push(rule);
        self
    }

    /// Adds several rules.
    pub fn rules(mut self, rules: impl IntoIterator<Item = Rule>) -> Self {
        self.rules.extend(rules);
        self
    }

    /// Where bucket state lives (default: a new [`MemoryStore`]). Pass a clone of a store to
    /// share budgets between layers; rule names then share buckets across them.
    pub fn store(mut self, store: impl Store) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// How the caller's tier is found (default: no tiers; every caller gets base quotas).
    pub fn tiers(mut self, resolver: impl TierResolver) -> Self {
        self.tiers = Some(Box::new(resolver));
        self
    }

    /// How a request's tokens are estimated (required when a rule counts tokens).
    pub fn cost(mut self, estimator: impl CostEstimator) -> Self {
        self.cost = Some(Box::new(estimator));
        self
    }

    /// Which rate-limit headers responses carry (default [`HeaderStyle::BOTH`]).
    pub fn headers(mut self, style: HeaderStyle) -> Self {
        self.headers = style;
        self
    }

    /// Sees every decision (metrics, audit). See [`crate::observe`].
    pub fn observer(mut self, observer: impl Observer) -> Self {
        self.observer = Some(Arc::new(observer));
        self
    }

    /// Records decisions, refusals, estimated and settled tokens, the time and failures of
    /// store calls, and the moves of adaptive capacity through the `metrics` facade, for
    /// whatever exporter the application installs. The metrics, their labels (bounded: rule
    /// and tier names, never keys) and what they cost are listed in [`crate::metrics`].
    /// The [`observer`](Self::observer), if any, sees the same events as without it.
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn metrics(mut self) -> Self {
        self.metrics = true;
        self
    }

    /// What to do when the store fails (default [`FailurePolicy::Closed`]).
    pub fn on_store_error(mut self, policy: FailurePolicy) -> Self {
        self.failure = policy;
        self
    }

    /// Prices of input and output tokens per model, for rules counting
    /// [`Unit::Cost`] (default: every token weighs 1).
    pub fn weights(mut self, weights: Weights) -> Self {
        self.weights = weights;
        self
    }

    /// The largest request body read when a key or the cost estimate needs it (default
    /// [`DEFAULT_MAX_INSPECT_BYTES`], 1 MiB). The body is never buffered past this.
    pub fn max_inspect_bytes(mut self, bytes: usize) -> Self {
        self.max_inspect_bytes = bytes;
        self
    }

    /// What to do with a body that is over `max_inspect_bytes`, not JSON, or unreadable when
    /// the estimate needs it (default [`BodyPolicy::Reject`]: 413 / 400 with a JSON body).
    pub fn on_unusable_body(mut self, policy: BodyPolicy) -> Self {
        self.body_policy = policy;
        self
    }

    /// The cost charged under [`BodyPolicy::Fallback`] (default: 0 tokens).
    pub fn fallback_cost(mut self, cost: Cost) -> Self {
        self.fallback_cost = cost;
        self
    }

    /// What to charge when an admitted response reports no `usage` (default
    /// [`MissingUsage::KeepReservation`]).
    pub fn on_missing_usage(mut self, policy: MissingUsage) -> Self {
        self.missing_usage = policy;
        self
    }

    /// Whether requests the upstream failed (HTTP >= 400, gRPC error before any response
    /// message, service error) still count against request rules (default `true`). Their
    /// token charges are refunded, unless the error response carries
    /// [`KeepTokens`](crate::settle::KeepTokens). A failed attempt of a request carrying the
    /// [`idempotency_header`](Self::idempotency_header) stays counted whatever this says
    /// (its retry goes free instead).
    pub fn count_failed_requests(mut self, count: bool) -> Self {
        self.count_failed_requests = count;
        self
    }

    /// Adds `"stream_options": {"include_usage": true}` to streaming chat completion
    /// requests (`"stream": true`), so that OpenAI-compatible upstreams report the usage the
    /// settlement needs (default off). The client then receives one extra final chunk, whose
    /// `choices` is empty and which carries `usage`; clients written against the OpenAI SDKs
    /// handle it, hand-written parsers that index `choices[0]` may not.
    pub fn request_usage_in_streams(mut self, enable: bool) -> Self {
        self.request_stream_usage = enable;
        self
    }

    /// Lets a client's retry after a failure go uncounted a second time on request rules:
    /// a request carrying header `name` (e.g. `x-request-id`) whose earlier attempt with the
    /// same value failed (HTTP >= 400, gRPC error before any response message, service
    /// error, or cut off before its response began) is free on request rules, at most
    /// [`MAX_FREE_RETRIES`](crate::store::MAX_FREE_RETRIES) times in a row. Nothing more:
    /// a repeat of a request that succeeded or is still in flight, or with another body,
    /// method, path or caller, is charged like a new request; every attempt takes its own
    /// concurrency slot and is charged and settled on token rules as usual. The full table is
    /// in [Idempotent retries](crate::store#idempotent-retries).
    ///
    /// The id is scoped to the caller (the buckets of every rule) and to the request (a
    /// digest of method, path and query, and body). To digest the body, the layer reads the
    /// body of a request that carries the header and a `content-length` (or no body) even
    /// when no rule needs it, bounded by [`max_inspect_bytes`](Self::max_inspect_bytes); a
    /// longer body, or a stream of undeclared length that no rule reads (never held back for
    /// this), gives the request no identity (every attempt is charged). A failed attempt
    /// with an id keeps its request charges even with
    /// [`count_failed_requests`](Self::count_failed_requests)`(false)`: its retry is the one
    /// that goes free.
    ///
    /// Both stores remember failed attempts for their idempotency TTL (120 s by default:
    /// [`crate::store::MemoryStoreBuilder::idempotency_ttl`], and the Redis store's
    /// `idempotency_ttl`); a store that remembers nothing charges every attempt.
    ///
    /// A name that is not a valid header name is reported by [`build`](Self::build).
    pub fn idempotency_header(mut self, name: &str) -> Self {
        self.idempotency_header =
            Some(http::HeaderName::try_from(name).map_err(|_| name.to_owned()));
        self
    }

    /// The clock of adaptive capacity ([`crate::capacity`]): the latency of responses and
    /// the controllers' intervals; and of the store calls an observer times
    /// ([`Observer::observes_store_calls`]) (default [`SystemClock`]). Tests pass a
    /// [`crate::clock::ManualClock`]. The stores keep their own clocks.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// This layer's replica id (default: a random id per layer). The buckets of adaptive
    /// rules are keyed `{key}@{replica}`: each replica (process) sharing a store governs its
    /// own share of the capacity, from the latency it sees (see [`crate::capacity`]). Give a
    /// stable id (a pod name) so that a restarted replica finds its slots; ids must differ
    /// between replicas, and be non-empty without `@` (checked by `build`).
    pub fn replica_id(mut self, id: impl Into<String>) -> Self {
        self.replica = Some(id.into());
        self
    }

    /// Makes the layer being built continue `previous`'s adaptive capacity (a configuration
    /// reloaded, say): each rule of the same name whose [`Capacity`](crate::capacity::Capacity)
    /// moves its limit alike (same `min`, `max`, `initial`, latency target and tolerance,
    /// interval, decrease, baseline window) shares `previous`'s controllers, with the limits
    /// they learned, their queues and completion rates; tiers, saturation and queue length
    /// may differ. The layer also takes `previous`'s replica id and clock unless
    /// [`replica_id`](Self::replica_id) or [`clock`](Self::clock) set them: the slots held by
    /// `previous`'s requests stay in the buckets the new layer charges, and the controllers'
    /// times stay on one clock. A rule whose capacity changed otherwise starts its
    /// controllers afresh, at their initial limit, but still shares their queues and
    /// completion rates, so that the slots `previous`'s requests release wake the new
    /// layer's waiters.
    pub fn continue_capacity_of(mut self, previous: &RateLimitLayer) -> Self {
        self.previous = Some(previous.clone());
        self
    }

    /// Checks the configuration and builds the layer.
    pub fn build(self) -> Result<RateLimitLayer, BuildError> {
        if self.rules.is_empty() {
            return Err(BuildError::NoRules);
        }
        let mut names = HashSet::new();
        for rule in &self.rules {
            validate_rule(rule)?;
            if !names.insert(&*rule.name) {
                return Err(BuildError::DuplicateRule {
                    rule: rule.name.to_string(),
                });
            }
            if self.cost.is_none()
                && std::iter::once(&rule.quota)
                    .chain(rule.tiers.iter().map(|(_, q)| q))
                    .any(|q| q.unit().is_token_based())
            {
                return Err(BuildError::MissingCostEstimator {
                    rule: rule.name.to_string(),
                });
            }
        }
        let idempotency_header = match self.idempotency_header {
            Some(Err(name)) => return Err(BuildError::InvalidHeaderName { name }),
            Some(Ok(h)) => Some(h),
            None => None,
        };
        let counts_tokens = self
            .rules
            .iter()
            .any(|r| r.variants().any(|q| q.unit().is_token_based()));
        let quota_headers: Vec<Vec<QuotaHeaders>> = self
            .rules
            .iter()
            .map(|r| {
                r.variants()
                    .map(|q| QuotaHeaders::new(&r.name, q))
                    .collect()
            })
            .collect();
        // Every tier a rule names, and no tier: the quota combinations requests can meet.
        let mut tiers: Vec<Option<&str>> = vec![None];
        tiers.extend(self.rules.iter().flat_map(|r| r.tier_names().map(Some)));
        let joined_policies = JoinedPolicies::new(
            &quota_headers,
            tiers
                .into_iter()
                .map(|t| self.rules.iter().map(|r| r.variant_for(t).0).collect()),
        );
        let previous = self.previous.as_ref().map(|l| &*l.limiter);
        if let Some(id) = self
            .replica
            .as_ref()
            .filter(|id| id.is_empty() || id.contains('@'))
        {
            return Err(BuildError::InvalidReplicaId { id: id.clone() });
        }
        let capacity = self
            .rules
            .iter()
            .map(|r| {
                let mut cap = RuleCapacity::new(r.capacity.clone()?, &r.name);
                if let Some(old) = previous.and_then(|p| {
                    let i = p.rules.iter().position(|o| o.name == r.name)?;
                    p.capacity[i].as_ref()
                }) {
                    cap.continue_from(old);
                }
                Some(cap)
            })
            .collect();
        #[cfg(feature = "metrics")]
        let observer: Option<Arc<dyn Observer>> = if self.metrics {
            Some(Arc::new(crate::metrics::MetricsObserver::new(
                &self.rules,
                self.observer,
            )))
        } else {
            self.observer
        };
        #[cfg(not(feature = "metrics"))]
        let observer = self.observer;
        let needs_body = self.request_stream_usage
            || self.rules.iter().any(|r| r.key.needs_body())
            || (counts_tokens && self.cost.as_ref().is_some_and(|c| c.needs_body()));
        Ok(RateLimitLayer {
            limiter: Arc::new(Limiter {
                settling: Settling::default(),
                rules: self.rules,
                store: self.store.unwrap_or_else(|| Arc::new(MemoryStore::new())),
                tiers: self.tiers,
                cost: self.cost,
                headers: self.headers,
                observes_settlements: observer.as_ref().is_some_and(|o| o.observes_settlements()),
                observes_usage: observer
                    .as_ref()
                    .is_some_and(|o| o.observes_settlements() && o.observes_usage()),
                observes_store_calls: observer.as_ref().is_some_and(|o| o.observes_store_calls()),
                observer,
                failure: self.failure,
                weights: self.weights,
                max_inspect_bytes: self.max_inspect_bytes,
                body_policy: self.body_policy,
                fallback_cost: self.fallback_cost,
                missing_usage: self.missing_usage,
                count_failed_requests: self.count_failed_requests,
                request_stream_usage: self.request_stream_usage,
                idempotency_header,
                needs_body,
                quota_headers,
                joined_policies,
                capacity,
                clock: self
                    .clock
                    .or_else(|| previous.map(|p| Arc::clone(&p.clock)))
                    .unwrap_or_else(|| Arc::new(SystemClock::new())),
                replica: match (self.replica, previous) {
                    (Some(r), _) => r.into(),
                    (None, Some(p)) => Arc::clone(&p.replica),
                    (None, None) => random_replica_id().into(),
                },
            }),
        })
    }
}

fn validate_quota(rule: &str, tier: Option<&str>, q: &Quota) -> Result<(), BuildError> {
    let rule = rule.to_owned();
    let tier = tier.map(str::to_owned);
    if q.limit() == 0 {
        return Err(BuildError::ZeroLimit { rule, tier });
    }
    if q.window().as_nanos() == 0 {
        return Err(BuildError::ZeroWindow { rule, tier });
    }
    match q.configured_burst() {
        Some(_) if q.algorithm() != Algorithm::Gcra => Err(BuildError::InvalidBurst {
            rule,
            tier,
            reason: "a burst only applies to GCRA (use `.gcra()`)",
        }),
        Some(0) => Err(BuildError::InvalidBurst {
            rule,
            tier,
            reason: "burst must be > 0",
        }),
        _ => Ok(()),
    }
}

fn validate_rule(rule: &Rule) -> Result<(), BuildError> {
    let name = &*rule.name;
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| (0x20..=0x7e).contains(&b) && b != b'"' && b != b'\\')
    {
        return Err(BuildError::InvalidRuleName {
            rule: name.to_owned(),
        });
    }
    rule.key
        .validate()
        .map_err(|reason| BuildError::InvalidKey {
            rule: name.to_owned(),
            reason,
        })?;
    let base = &rule.quota;
    validate_quota(name, None, base)?;
    if let Some(cap) = &rule.capacity {
        let reason = if base.algorithm() != Algorithm::Concurrency {
            Some("only a concurrency rule (`Quota::concurrent`) has a capacity".to_owned())
        } else if cap.max() > base.limit() {
            // The controller would move a limit the quota caps below it.
            Some(format!(
                "max {} is above the rule's quota limit {}",
                cap.max(),
                base.limit()
            ))
        } else {
            cap.problem()
        };
        if let Some(reason) = reason {
            return Err(BuildError::InvalidCapacity {
                rule: name.to_owned(),
                reason,
            });
        }
    }
    let mut tiers = HashSet::new();
    for (tier, q) in &rule.tiers {
        validate_quota(name, Some(tier), q)?;
        if !tiers.insert(&**tier) {
            return Err(BuildError::DuplicateTier {
                rule: name.to_owned(),
                tier: tier.to_string(),
            });
        }
        let mismatch = if q.window() != base.window() {
            Some(format!(
                "window {:?} differs from the rule's {:?}",
                q.window(),
                base.window()
            ))
        } else if q.unit() != base.unit() {
            Some(format!(
                "counts {} but the rule counts {}",
                q.unit(),
                base.unit()
            ))
        } else if q.algorithm() != base.algorithm() {
            Some(format!(
                "uses {:?} but the rule uses {:?}",
                q.algorithm(),
                base.algorithm()
            ))
        } else if q.algorithm() == Algorithm::Concurrency && q.unit() != Unit::Requests {
            Some("a concurrency quota counts requests".to_owned())
        } else if q.algorithm() == Algorithm::Gcra && q.limit() != base.limit() {
            // GCRA's state is a time whose scale is window / limit: tiers sharing a bucket
            // must drain it at one rate. They may differ in burst.
            Some(format!(
                "GCRA tiers share the rule's rate; limit {} differs from {} (vary `.burst()` instead)",
                q.limit(),
                base.limit()
            ))
        } else {
            None
        };
        if let Some(reason) = mismatch {
            return Err(BuildError::TierMismatch {
                rule: name.to_owned(),
                tier: tier.to_string(),
                reason,
            });
        }
    }
    Ok(())
}
