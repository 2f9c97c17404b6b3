//! The [`Limiter`]: a layer's rules, store and policies, and what it does with them.
//!
//! [`build`](crate::RateLimitLayerBuilder::build) makes one limiter; the layer, its clones
//! and every service they build share it behind an `Arc`, so one budget. For each request
//! the limiter plans the charges (`plan.rs`: the tier, each rule's key and amount), asks the
//! store, and concludes (`conclude.rs`): the rate-limit headers and what the admitted
//! request has to settle, or the rejection. It also counts the settlements running in the
//! background ([`Settling`], for [`RateLimitLayer::flush`](crate::RateLimitLayer::flush)) and
//! reads a caller's state without charging ([`Limiter::status`]).
//!
//! The modules around it depend on it, one way: the layer builds it, the service asks it to
//! decide, a settlement (`settle.rs`) reads its store and policies. It knows none of them;
//! it uses the lower modules (rules, keys, costs, the store, headers, rejections).

mod capacity;
mod conclude;
mod plan;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::capacity::{replica_key, RuleCapacity};
use crate::clock::Clock;
use crate::cost::{Cost, CostEstimator, Weights};
use crate::headers::{HeaderStyle, JoinedPolicies, QuotaHeaders};
use crate::inspect::BodyPolicy;
use crate::key::{Key, RequestView};
use crate::observe::{DecisionEvent, Observer, Outcome, RuleDecision, StoreCall, StoreCallEvent};
use crate::rule::{MissingKey, Quota, Rule, Unit};
use crate::store::{BucketKey, Snapshot, Store, StoreError, StoreFuture};
use crate::tier::TierResolver;

pub(crate) use self::conclude::{Pending, Settlement};
pub(crate) use self::plan::{invalid, BodyProblem, Plan};

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

/// What the layer charges when an admitted response carries no `usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissingUsage {
    /// Keep the estimate charged before admission. The default (the conservative side).
    /// A request admitted with the fallback cost ([`crate::BodyPolicy::Fallback`]: its body
    /// could not be read) is no estimate of it: it keeps that cost, or pays the estimate of
    /// what streamed ([`MissingUsage::EstimateStreamed`]) when that is more.
    #[default]
    KeepReservation,
    /// Charge the input estimate plus an estimate of the output from the bytes streamed to
    /// the client (about 4 bytes per token of SSE/JSON payload, counting its framing, so it
    /// errs high).
    EstimateStreamed,
}

/// A layer's configuration, checked by `build`, and the state its requests share.
pub(crate) struct Limiter {
    pub(crate) rules: Vec<Rule>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) tiers: Option<Box<dyn TierResolver>>,
    pub(crate) cost: Option<Box<dyn CostEstimator>>,
    pub(crate) headers: HeaderStyle,
    pub(crate) observer: Option<Arc<dyn Observer>>,
    /// The observer wants settlement events (`Observer::observes_settlements`): only then
    /// does a settlement keep its labels (tier, model) and build an event.
    pub(crate) observes_settlements: bool,
    /// The observer wants the usage of every admitted response (`Observer::observes_usage`):
    /// every admitted request is settled, and every successful response watched.
    pub(crate) observes_usage: bool,
    /// The observer wants each store call timed (`Observer::observes_store_calls`): only
    /// then is the clock read around them.
    pub(crate) observes_store_calls: bool,
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
    /// Settlements running in the background (stores doing I/O), for [`Limiter::flush`].
    pub(crate) settling: Settling,
    /// Per rule (same index), its adaptive capacity and controllers, if it has one.
    pub(crate) capacity: Vec<Option<RuleCapacity>>,
    /// The time of adaptive capacity (latency of responses, intervals).
    pub(crate) clock: Arc<dyn Clock>,
    /// This layer's replica id, in the bucket keys of adaptive rules.
    pub(crate) replica: Arc<str>,
}

/// Counts the settlements running in background tasks and wakes [`Limiter::flush`] when none
/// is left.
#[derive(Debug, Default)]
pub(crate) struct Settling {
    running: AtomicUsize,
    idle: tokio::sync::Notify,
}

impl Settling {
    /// One more settlement in the background, until the guard is dropped.
    pub(crate) fn start(limiter: &Arc<Limiter>) -> SettlingGuard {
        limiter.settling.running.fetch_add(1, Ordering::AcqRel);
        SettlingGuard(Arc::clone(limiter))
    }
}

/// A background settlement in progress (see [`Settling`]).
pub(crate) struct SettlingGuard(Arc<Limiter>);

impl Drop for SettlingGuard {
    fn drop(&mut self) {
        let s = &self.0.settling;
        if s.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            s.idle.notify_waiters();
        }
    }
}

/// One rule's state for a caller, as [`RateLimitLayer::status`](crate::RateLimitLayer::status)
/// reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleStatus {
    /// The rule's name.
    pub rule: String,
    /// What it counts.
    pub unit: Unit,
    /// The quota applied to this caller (tier resolved; for a rule with a
    /// [`Capacity`](crate::capacity::Capacity), at the bucket's current capacity).
    pub quota: Quota,
    /// The caller's bucket key (`None` when the key is missing and the rule would reject or
    /// skip the request; for a rule with a capacity, this replica's: `{key}@{replica}`).
    pub key: Option<Key>,
    /// The bucket's state (`None` when `key` is `None`).
    pub snapshot: Option<Snapshot>,
}

impl Limiter {
    /// Waits until no settlement runs in the background (see
    /// [`RateLimitLayer::flush`](crate::RateLimitLayer::flush)).
    pub(crate) async fn flush(&self) {
        let s = &self.settling;
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

    /// The caller's current state under every rule, charging nothing (see
    /// [`RateLimitLayer::status`](crate::RateLimitLayer::status)).
    pub(crate) async fn status(&self, req: RequestView<'_>) -> Result<Vec<RuleStatus>, StoreError> {
        let tier = self.tiers.as_ref().and_then(|t| t.resolve(&req));
        let mut out = Vec::with_capacity(self.rules.len());
        for (i, rule) in self.rules.iter().enumerate() {
            let mut quota = *rule.quota_for(tier.as_ref().map(|t| t.as_str()));
            let mut key = match rule.key.extract(&req) {
                Some(k) => Some(k),
                None if rule.on_missing == MissingKey::Shared => Some(Key::anonymous()),
                None => None,
            };
            // An adaptive rule: this replica's bucket, at its current capacity.
            if let (Some(cap), Some(k)) = (&self.capacity[i], &mut key) {
                quota = quota.with_limit(quota.limit().min(cap.limit_of(k)));
                *k = replica_key(k, &self.replica);
            }
            let snapshot = match &key {
                Some(k) => {
                    let bucket = BucketKey::new(rule.name.clone(), k.clone());
                    Some(self.store.peek(&bucket, &quota).await?)
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

    /// The time a store call starts, when the observer times store calls (the clock is read
    /// for no one else).
    pub(crate) fn store_call_started(&self) -> Option<u64> {
        self.observes_store_calls.then(|| self.clock.now_nanos())
    }

    /// `future`, a store call started at `started` (see [`Limiter::store_call_started`]),
    /// reporting its time and error to the observer when it answers: at once for an answer
    /// already there, else at the end of a future wrapped around it.
    pub(crate) fn timed<T: Send + 'static>(
        &self,
        call: StoreCall,
        started: Option<u64>,
        future: StoreFuture<Result<T, StoreError>>,
    ) -> StoreFuture<Result<T, StoreError>> {
        let (Some(started), Some(observer)) = (started, &self.observer) else {
            return future;
        };
        match future.now() {
            Ok(result) => {
                report_store_call(&**observer, &*self.clock, call, started, &result);
                StoreFuture::ready(result)
            }
            Err(pending) => {
                let observer = Arc::clone(observer);
                let clock = Arc::clone(&self.clock);
                StoreFuture::pending(async move {
                    let result = pending.await;
                    report_store_call(&*observer, &*clock, call, started, &result);
                    result
                })
            }
        }
    }

    /// Reports a decision to the observer, if there is one.
    fn observe(&self, tier: Option<&str>, outcome: Outcome<'_>, rules: &[RuleDecision<'_>]) {
        if let Some(o) = &self.observer {
            o.on_decision(&DecisionEvent {
                tier,
                outcome,
                rules,
            });
        }
    }
}

fn report_store_call<T>(
    observer: &dyn Observer,
    clock: &dyn Clock,
    call: StoreCall,
    started: u64,
    result: &Result<T, StoreError>,
) {
    observer.on_store_call(&StoreCallEvent {
        call,
        elapsed: Duration::from_nanos(clock.now_nanos().saturating_sub(started)),
        error: result.as_ref().err(),
    });
}
