//! [`RateLimitLayer`] and its builder.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tower_layer::Layer;

use crate::cost::{Cost, CostEstimator, Weights};
use crate::error::BuildError;
use crate::headers::{HeaderStyle, JoinedPolicies, QuotaHeaders};
use crate::inspect::BodyPolicy;
use crate::key::{Key, RequestView};
use crate::observe::{Observer, ObserverDebug};
use crate::rule::{Algorithm, MissingKey, Quota, Rule, Unit};
use crate::service::RateLimit;
use crate::settle::MissingUsage;
use crate::store::{BucketKey, MemoryStore, Snapshot, Store, StoreError};
use crate::tier::TierResolver;

/// What the layer does when its store fails (unreachable, full).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// Reject with 503 (gRPC `UNAVAILABLE`), a JSON body and `Retry-After: 1`. The default:
    /// a limiter that can't count doesn't admit.
    #[default]
    Closed,
    /// Admit without counting (and without rate-limit headers). Every such request is logged
    /// at `WARN` and reported to the observer as [`crate::observe::Outcome::StoreError`].
    Open,
}

pub(crate) struct Shared {
    pub(crate) rules: Vec<Rule>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) tiers: Option<Box<dyn TierResolver>>,
    pub(crate) cost: Option<Box<dyn CostEstimator>>,
    pub(crate) headers: HeaderStyle,
    pub(crate) observer: Option<Arc<dyn Observer>>,
    pub(crate) failure: FailurePolicy,
    pub(crate) weights: Weights,
    pub(crate) max_inspect_bytes: usize,
    pub(crate) body_policy: BodyPolicy,
    pub(crate) fallback_cost: Cost,
    pub(crate) missing_usage: MissingUsage,
    pub(crate) count_failed_requests: bool,
    pub(crate) request_stream_usage: bool,
    pub(crate) idempotency_header: Option<http::HeaderName>,
    /// Computed by `build`: some rule's key or the estimate reads the body.
    pub(crate) needs_body: bool,
    /// Computed by `build`: the fixed header parts of each rule's quotas, `[rule][variant]`.
    pub(crate) quota_headers: Vec<Vec<QuotaHeaders>>,
    /// `RateLimit-Policy` of the requests every rule applies to, per tier.
    pub(crate) joined_policies: JoinedPolicies,
    /// Settlements running in the background (stores doing I/O), for [`RateLimitLayer::flush`].
    pub(crate) settling: Settling,
}

/// Counts the settlements running in background tasks and wakes [`RateLimitLayer::flush`]
/// when none is left.
#[derive(Debug, Default)]
pub(crate) struct Settling {
    running: AtomicUsize,
    idle: tokio::sync::Notify,
}

impl Settling {
    /// One more settlement in the background, until the guard is dropped.
    pub(crate) fn start(shared: &Arc<Shared>) -> SettlingGuard {
        shared.settling.running.fetch_add(1, Ordering::AcqRel);
        SettlingGuard(Arc::clone(shared))
    }
}

/// A background settlement in progress (see [`Settling`]).
pub(crate) struct SettlingGuard(Arc<Shared>);

impl Drop for SettlingGuard {
    fn drop(&mut self) {
        let s = &self.0.settling;
        if s.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            s.idle.notify_waiters();
        }
    }
}

/// The default bound on a request body the layer reads: 1 MiB.
pub const DEFAULT_MAX_INSPECT_BYTES: usize = 1 << 20;

/// Applies rate limiting to a service. Cheap to clone; clones (and every service they build)
/// share one configuration and one store, so one budget.
///
/// Build one with [`RateLimitLayer::builder`].
#[derive(Clone)]
pub struct RateLimitLayer {
    pub(crate) shared: Arc<Shared>,
}

impl fmt::Debug for RateLimitLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &*self.shared;
        f.debug_struct("RateLimitLayer")
            .field("rules", &s.rules)
            .field("store", &s.store)
            .field("headers", &s.headers)
            .field("failure", &s.failure)
            .field("observer", &ObserverDebug(&s.observer))
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit::new(inner, self.clone())
    }
}

/// One rule's state for a caller, as [`RateLimitLayer::status`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleStatus {
    /// The rule's name.
    pub rule: String,
    /// What it counts.
    pub unit: Unit,
    /// The quota applied to this caller (tier resolved).
    pub quota: Quota,
    /// The caller's bucket key (`None` when the key is missing and the rule would reject or
    /// skip the request).
    pub key: Option<Key>,
    /// The bucket's state (`None` when `key` is `None`).
    pub snapshot: Option<Snapshot>,
}

impl RateLimitLayer {
    /// Starts a configuration.
    pub fn builder() -> RateLimitLayerBuilder {
        RateLimitLayerBuilder {
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
        }
    }

    /// The rules, in the order they were added.
    pub fn rules(&self) -> &[Rule] {
        &self.shared.rules
    }

    /// Waits until every settlement this layer (and its clones) started in the background
    /// has reached the store. A store that does I/O ([`crate::store::RedisStore`]) settles
    /// a response's real usage in a task of its own once the response ends; at shutdown,
    /// after the server has stopped taking requests and drained the ones in flight, await
    /// this (under a timeout of your own) before the runtime goes, or the last corrections
    /// (refunds, and extra tokens charged past the estimate) are lost with it. Returns at
    /// once when nothing is running; a synchronous store (the [`MemoryStore`]) never leaves
    /// anything running.
    ///
    /// ```
    /// # async fn run() {
    /// # use tower_llm_ratelimit::{key, Quota, RateLimitLayer, Rule};
    /// # let layer = RateLimitLayer::builder()
    /// #     .rule(Rule::new("rpm", key::global(), Quota::per_minute(60)))
    /// #     .build()
    /// #     .unwrap();
    /// // ... the server stopped and drained its requests:
    /// let flushed = tokio::time::timeout(std::time::Duration::from_secs(5), layer.flush()).await;
    /// assert!(flushed.is_ok());
    /// # }
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(run());
    /// ```
    pub async fn flush(&self) {
        let s = &self.shared.settling;
        loop {
            // Registered before the check, so a wake-up between the two isn't lost.
            let mut idle = std::pin::pin!(s.idle.notified());
            idle.as_mut().enable();
            if s.running.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }

    /// The caller's current state under every rule, charging nothing: for status endpoints
    /// and dashboards. Keys and tier are resolved as for a real request.
    pub async fn status(&self, req: RequestView<'_>) -> Result<Vec<RuleStatus>, StoreError> {
        let shared = &*self.shared;
        let tier = shared.tiers.as_ref().and_then(|t| t.resolve(&req));
        let mut out = Vec::with_capacity(shared.rules.len());
        for rule in &shared.rules {
            let quota = *rule.quota_for(tier.as_ref().map(|t| t.as_str()));
            let key = match rule.key.extract(&req) {
                Some(k) => Some(k),
                None if rule.on_missing == MissingKey::Shared => Some(Key::anonymous()),
                None => None,
            };
            let snapshot = match &key {
                Some(k) => {
                    let bucket = BucketKey::new(rule.name.clone(), k.clone());
                    Some(shared.store.peek(&bucket, &quota).await?)
                }
                None => None,
            };
            out.push(RuleStatus {
                rule: rule.name.to_string(),
                unit: quota.unit(),
                quota,
                key,
                snapshot,
            });
        }
        Ok(out)
    }
}

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
}

impl fmt::Debug for RateLimitLayerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayerBuilder")
            .field("rules", &self.rules)
            .field("store", &self.store)
            .field("headers", &self.headers)
            .field("failure", &self.failure)
            .finish_non_exhaustive()
    }
}

impl RateLimitLayerBuilder {
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

    /// Sees every decision (metrics, audit).
    pub fn observer(mut self, observer: impl Observer) -> Self {
        self.observer = Some(Arc::new(observer));
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

    /// Whether requests the upstream failed (HTTP >= 400, gRPC error, service error) still
    /// count against request rules (default `true`). Their token charges are always refunded.
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

    /// Counts a request carrying header `name` (e.g. `x-request-id`) once per value: a
    /// client's retry with the same id gets the first decision again instead of being charged
    /// twice. Needs a store that remembers ids ([`crate::store::Store::acquire_once`]; the
    /// Redis store does, for its idempotency TTL).
    ///
    /// A name that is not a valid header name is reported by [`build`](Self::build).
    pub fn idempotency_header(mut self, name: &str) -> Self {
        self.idempotency_header =
            Some(http::HeaderName::try_from(name).map_err(|_| name.to_owned()));
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
        let needs_body = self.request_stream_usage
            || self.rules.iter().any(|r| r.key.needs_body())
            || (counts_tokens && self.cost.as_ref().is_some_and(|c| c.needs_body()));
        Ok(RateLimitLayer {
            shared: Arc::new(Shared {
                settling: Settling::default(),
                rules: self.rules,
                store: self.store.unwrap_or_else(|| Arc::new(MemoryStore::new())),
                tiers: self.tiers,
                cost: self.cost,
                headers: self.headers,
                observer: self.observer,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key;
    use std::time::Duration;

    fn build(rules: Vec<Rule>) -> Result<RateLimitLayer, BuildError> {
        RateLimitLayer::builder().rules(rules).build()
    }

    fn k() -> key::Header {
        key::header("x-api-key")
    }

    #[test]
    fn config_errors_are_typed_and_name_the_rule() {
        assert_eq!(build(vec![]).unwrap_err(), BuildError::NoRules);
        let cases: Vec<(Vec<Rule>, &str)> = vec![
            (
                vec![Rule::new("", k(), Quota::per_minute(1))],
                "rule name \"\"",
            ),
            (
                vec![Rule::new("a\"b", k(), Quota::per_minute(1))],
                "printable ASCII",
            ),
            (
                vec![
                    Rule::new("a", k(), Quota::per_minute(1)),
                    Rule::new("a", k(), Quota::per_minute(2)),
                ],
                "two rules are named `a`",
            ),
            (
                vec![Rule::new("z", k(), Quota::per_minute(0))],
                "limit must be > 0, got 0 for rule `z`",
            ),
            (
                vec![Rule::new("w", k(), Quota::new(1, Duration::ZERO))],
                "window must be > 0",
            ),
            (
                vec![Rule::new("b", k(), Quota::per_minute(5).burst(3))],
                "only applies to GCRA",
            ),
            (
                vec![Rule::new("b0", k(), Quota::per_minute(5).gcra().burst(0))],
                "burst must be > 0",
            ),
            (
                vec![Rule::new("t", k(), Quota::per_minute(5)).tier("pro", Quota::per_hour(50))],
                "tier `pro` of rule `t`: window",
            ),
            (
                vec![Rule::new("t", k(), Quota::per_minute(5))
                    .tier("pro", Quota::per_minute(5).tokens())],
                "counts tokens but the rule counts requests",
            ),
            (
                vec![Rule::new("g", k(), Quota::per_minute(5).gcra())
                    .tier("pro", Quota::per_minute(9).gcra())],
                "GCRA tiers share the rule's rate",
            ),
            (
                vec![Rule::new("d", k(), Quota::per_minute(5))
                    .tier("pro", Quota::per_minute(6))
                    .tier("pro", Quota::per_minute(7))],
                "lists tier `pro` twice",
            ),
            (
                vec![Rule::new(
                    "ip",
                    key::client_ip().trust_proxy("10.0.0.0/99"),
                    Quota::per_minute(5),
                )],
                "key of rule `ip`: invalid proxy address or CIDR",
            ),
            (
                vec![Rule::new("tpm", k(), Quota::per_minute(5).tokens())],
                "no cost estimator",
            ),
        ];
        for (rules, want) in cases {
            let err = build(rules).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
        let bad_header = RateLimitLayer::builder()
            .rule(Rule::new("r", k(), Quota::per_minute(1)))
            .idempotency_header("x request id")
            .build()
            .unwrap_err();
        assert!(bad_header.to_string().contains("not a valid header name"));
        // GCRA tiers may differ in burst.
        let ok = Rule::new("g", k(), Quota::per_minute(5).gcra())
            .tier("pro", Quota::per_minute(5).gcra().burst(50));
        assert!(build(vec![ok]).is_ok());
    }
}
