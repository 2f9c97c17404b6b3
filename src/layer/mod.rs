//! [`RateLimitLayer`] and its builder.

mod acquiring;
mod builder;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tower_layer::Layer;

use crate::cost::{Cost, CostEstimator, Weights};
use crate::headers::{HeaderStyle, JoinedPolicies, QuotaHeaders};
use crate::inspect::BodyPolicy;
use crate::key::{Key, RequestView};
use crate::observe::{Observer, ObserverDebug};
use crate::rule::{MissingKey, Quota, Rule, Unit};
use crate::service::RateLimit;
use crate::settle::MissingUsage;
use crate::store::{BucketKey, Snapshot, Store, StoreError};
use crate::tier::TierResolver;

pub(crate) use self::acquiring::Acquiring;
pub use self::builder::RateLimitLayerBuilder;

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
    /// The observer wants settlement events (`Observer::observes_settlements`): only then
    /// does a settlement keep its labels (tier, model) and build an event.
    pub(crate) observes_settlements: bool,
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
        RateLimitLayerBuilder::new()
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
    /// once when nothing is running; a synchronous store (the
    /// [`MemoryStore`](crate::store::MemoryStore)) never leaves anything running.
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
