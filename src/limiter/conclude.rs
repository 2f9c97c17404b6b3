//! Concluding a decision: the store's answer turned into the rate-limit headers and what an
//! admitted request has to settle, or into the rejection.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Response};
use http_body_util::Full;

use super::{FailurePolicy, Limiter, Plan};
use crate::algorithm::{Algorithm, Placement};
use crate::capacity::Feedback;
use crate::cost::Cost;
use crate::headers::{self, RateHeaders, RuleState};
use crate::observe::{ModelLabel, Outcome, RuleDecision};
use crate::reject::{Per, Rejection, Used};
use crate::rule::Quota;
use crate::store::{BucketKey, Charge, Decision, IdempotencyKey, Snapshot, StoreError};
use crate::tier::Tier;

/// An admitted request's headers, and its settlement if it has one.
pub(crate) struct Admit {
    pub(crate) headers: RateHeaders,
    pub(crate) settlement: Option<Settlement>,
}

/// What an admitted request has to settle once its response ends (`settle.rs` watches the
/// response and settles it).
pub(crate) struct Settlement {
    pub(crate) charges: Vec<Pending>,
    pub(crate) estimate: Cost,
    /// `estimate` is the layer's fallback cost, not an estimate of this request.
    pub(crate) fallback: bool,
    pub(crate) model: Option<String>,
    /// The caller's tier, kept for the observer only.
    pub(crate) tier: Option<Tier>,
    /// The request's `ModelLabel`, kept for the observer only.
    pub(crate) label: Option<ModelLabel>,
    /// The request's identity when it carries an idempotency id.
    pub(crate) idempotency: Option<IdempotencyKey>,
    /// What to tell the controllers of its adaptive charges.
    pub(crate) feedback: Option<Feedback>,
}

/// One charge to settle.
#[derive(Debug)]
pub(crate) struct Pending {
    pub(crate) bucket: BucketKey,
    pub(crate) quota: Quota,
    pub(crate) placement: Placement,
    pub(crate) charged: u64,
}

impl Limiter {
    /// Turns the store's answer into the headers and settlement of an admitted request, or a
    /// rejection (to the request whose headers are `request`: see `Rejection::into_response`).
    pub(crate) fn conclude(
        &self,
        plan: Plan,
        result: Result<Decision, StoreError>,
        request: &HeaderMap,
    ) -> Result<Admit, Box<Response<Full<Bytes>>>> {
        let tier = plan.tier.as_ref().map(Tier::as_str);
        let decision = match result {
            Ok(d) => d,
            Err(e) => {
                let admitted = self.failure == FailurePolicy::Open;
                tracing::warn!(
                    target: "tower_llm_ratelimit",
                    error = %e,
                    admitted,
                    "rate-limit store failed"
                );
                self.observe(tier, Outcome::StoreError { admitted }, &[]);
                if admitted {
                    // Nothing was charged, so nothing to settle; an observer of every
                    // response's usage still hears this one's.
                    let settlement = self.observes_usage.then(|| Settlement {
                        charges: Vec::new(),
                        estimate: Cost::default(),
                        fallback: false,
                        model: plan.model,
                        tier: plan.tier,
                        label: plan.label,
                        idempotency: None,
                        feedback: None,
                    });
                    return Ok(Admit {
                        headers: RateHeaders::default(),
                        settlement,
                    });
                }
                let mut h = HeaderMap::new();
                headers::write_retry_after(&mut h, Duration::from_secs(1));
                return Err(Box::new(
                    Rejection::StoreUnavailable {
                        message: format!("Rate limiting is unavailable: {e}. Please try again."),
                    }
                    .into_response(request, h),
                ));
            }
        };
        let mut decision = decision;
        if let Some(d) = &mut decision.denial {
            // A capacity's slots free up as requests complete: the wait is the bucket's
            // queue at its recent completion rate, not a clock's.
            if let Some(a) = self.capacity_of(&plan, d.index) {
                // Callers without a priority are served after every waiter.
                let level = self.capacity[a.rule]
                    .as_ref()
                    .and_then(|c| c.config.priority_of(plan.tier.as_ref().map(Tier::as_str)))
                    .map_or(0, |p| p.level);
                d.retry_after = Some(a.cell.retry_after(self.clock.now_nanos(), level));
            }
        }
        let reserve = plan.reserve.as_ref();
        let refused_by_capacity = match (reserve, decision.denial) {
            (Some(r), Some(d)) => d.index == r.shared || d.index == r.tier,
            _ => false,
        };
        let states = plan
            .charges
            .iter()
            .zip(&decision.charges)
            .enumerate()
            // A tier's own bucket under a capacity is the rule's business, not the caller's.
            .filter(|(i, _)| reserve.is_none_or(|r| r.tier != *i))
            .map(|(i, (p, s))| RuleState {
                rule: &self.rules[p.rule].name,
                quota: &p.quota,
                variant: p.variant,
                // The bucket's charge at the saturation threshold: shown at the capacity, with
                // nothing left for a caller it refused.
                snapshot: match reserve {
                    Some(r) if r.shared == i => Snapshot {
                        limit: r.capacity,
                        remaining: if refused_by_capacity {
                            0
                        } else {
                            r.capacity.saturating_sub(
                                s.snapshot.limit.saturating_sub(s.snapshot.remaining),
                            )
                        },
                        ..s.snapshot
                    },
                    _ => s.snapshot,
                },
                cached: &self.quota_headers[p.rule][p.variant],
            });
        let h = headers::write(
            self.headers,
            &self.joined_policies,
            self.rules.len(),
            states,
        );
        if self.observer.is_some() {
            let denied = decision.denial.map(|d| d.index);
            let rules: Vec<RuleDecision<'_>> = plan
                .charges
                .iter()
                .zip(&decision.charges)
                .enumerate()
                .map(|(i, (p, s))| RuleDecision {
                    // The bucket's rule: a capacity's tier bucket is named `{rule}#{tier}`
                    // (as in settlements), so that the rule counts once per decision.
                    rule: p.bucket.rule(),
                    key: p.bucket.key(),
                    unit: p.quota.unit(),
                    cost: p.amount,
                    limit: s.snapshot.limit,
                    remaining: s.snapshot.remaining,
                    denied: denied == Some(i),
                })
                .collect();
            let outcome = match decision.denial {
                None => Outcome::Admitted,
                Some(d) => Outcome::Denied {
                    rule: &self.rules[plan.charges[d.index].rule].name,
                    retry_after: d.retry_after,
                },
            };
            self.observe(tier, outcome, &rules);
        }
        // The load the controllers judge by: a refusal shows the bucket in use as well as an
        // admission does.
        if let Some(f) = &plan.feedback {
            for a in &f.cells {
                let s = decision.charges[a.charge].snapshot;
                a.cell.saw_in_flight(s.limit.saturating_sub(s.remaining));
            }
        }
        let Some(denial) = decision.denial else {
            // An attempt with an idempotency id is settled whatever its rules: its failure is
            // what makes its retry free.
            let needs_settling = plan.idempotency.is_some()
                || !self.count_failed_requests
                || self.observes_usage
                || plan.charges.iter().any(|p| {
                    p.quota.unit().is_token_based() || p.quota.algorithm() == Algorithm::Concurrency
                });
            let settlement = needs_settling.then(|| self.settlement(plan, &decision));
            return Ok(Admit {
                headers: h,
                settlement,
            });
        };
        let p = &plan.charges[denial.index];
        let mut snapshot = decision.charges[denial.index].snapshot;
        // A capacity with tiers: its limit is the capacity, and what is used is the bucket's
        // count (its tier's bucket is the rule's business). A count at its charge's limit may
        // be past it (the saturation threshold, a capacity that shrank).
        let mut used = Used::Exactly(snapshot.limit.saturating_sub(snapshot.remaining));
        if let Some(r) = reserve.filter(|_| refused_by_capacity) {
            let shared = decision.charges[r.shared].snapshot;
            let count = shared.limit.saturating_sub(shared.remaining);
            used = if shared.remaining == 0 {
                Used::AtLeast(count)
            } else {
                Used::Exactly(count)
            };
            snapshot.limit = r.capacity;
        }
        let rule = &*self.rules[p.rule].name;
        tracing::debug!(
            target: "tower_llm_ratelimit",
            rule,
            key = %p.bucket.key(),
            tier,
            cost = p.amount,
            remaining = snapshot.remaining,
            retry_after_ms = denial.retry_after.map(|d| d.as_millis() as u64),
            "request rate limited"
        );
        // A request that can never fit is told to wait a whole window, never 0.
        let mut h = h.into_map();
        headers::write_retry_after(&mut h, denial.retry_after.unwrap_or(p.quota.window()));
        Err(Box::new(
            Rejection::rate_limited(
                rule,
                p.quota.unit().as_str(),
                snapshot.limit,
                Per::of(&p.quota),
                used,
                p.amount,
                denial.retry_after,
            )
            .into_response(request, h),
        ))
    }

    /// What an admitted request, planned as `plan` and placed as `decision` says, has to
    /// settle.
    fn settlement(&self, plan: Plan, decision: &Decision) -> Settlement {
        // A new vector, not `collect` (which would reuse the plan's and shrink it: a
        // reallocation).
        let mut charges = Vec::with_capacity(plan.charges.len());
        charges.extend(
            plan.charges
                .into_iter()
                .zip(&decision.charges)
                .map(|(p, s)| {
                    // A free retry's request charges were not counted: nothing to settle.
                    let waived = decision.free_retry
                        && Charge::new(&p.bucket, &p.quota, p.amount).is_request_count();
                    Pending {
                        bucket: p.bucket,
                        quota: p.quota,
                        placement: s.placement,
                        charged: if waived { 0 } else { p.amount },
                    }
                }),
        );
        Settlement {
            charges,
            estimate: plan.estimate,
            fallback: plan.fallback,
            model: plan.model,
            tier: self.observes_settlements.then_some(plan.tier).flatten(),
            label: plan.label,
            idempotency: plan.idempotency,
            feedback: plan.feedback,
        }
    }
}
