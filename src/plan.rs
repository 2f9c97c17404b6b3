//! Planning a request's charges, and turning the store's answer into headers and a
//! settlement, or a rejection.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};
use http_body_util::Full;

use crate::cost::Cost;
use crate::headers::{self, RateHeaders, RuleState};
use crate::inspect::BodyPolicy;
use crate::key::{Key, RequestView};
use crate::layer::{FailurePolicy, Shared};
use crate::observe::{DecisionEvent, Outcome, RuleDecision};
use crate::reject::{Per, Rejection};
use crate::rule::{Algorithm, MissingKey, Quota, Unit};
use crate::settle::{Pending, Settle};
use crate::store::{BucketKey, Charge, Decision, IdempotencyKey, StoreError, StoreFuture};
use crate::tier::Tier;

/// One rule's charge for this request.
pub(crate) struct Planned {
    rule: usize,
    /// Which of the rule's quotas (see `Rule::variant_for`).
    variant: usize,
    bucket: BucketKey,
    quota: Quota,
    amount: u64,
}

/// A request's plan: its tier and charges.
pub(crate) struct Plan {
    tier: Option<Tier>,
    /// The request's identity when it carries an idempotency id (see `idempotency.rs`).
    idempotency: Option<IdempotencyKey>,
    charges: Vec<Planned>,
    estimate: Cost,
    /// The estimate is the layer's fallback cost (the body could not be read or parsed).
    fallback: bool,
    model: Option<String>,
}

/// Why the body the estimate needs can't be used.
pub(crate) enum BodyProblem {
    TooLarge,
    NotJson(String),
}

/// An admitted request's headers and settlement.
pub(crate) struct Admit {
    pub(crate) headers: RateHeaders,
    pub(crate) settle: Option<Box<Settle>>,
}

/// The `model` of the request's JSON body, if the layer read it.
fn body_model(req: &RequestView<'_>) -> Option<String> {
    req.doc()
        .and_then(|j| j.get("model")?.as_str().map(str::to_owned))
}

pub(crate) fn invalid(status: StatusCode, code: &'static str, message: String) -> Rejection {
    Rejection::Invalid {
        status,
        code,
        message,
    }
}

impl Shared {
    pub(crate) fn plan(
        &self,
        req: &RequestView<'_>,
        problem: Option<&BodyProblem>,
    ) -> Result<Plan, Rejection> {
        let tier = self.tiers.as_ref().and_then(|t| t.resolve(req));
        let tier_name = tier.as_ref().map(Tier::as_str);
        let mut estimate: Option<Cost> = None;
        let mut model = None;
        let mut charges = Vec::with_capacity(self.rules.len());
        for (i, rule) in self.rules.iter().enumerate() {
            let key = match (rule.key.extract(req), problem) {
                (Some(k), _) => k,
                // A key the body would have given: not a missing key, or a caller could
                // escape a per-body rule by sending a body too large or not JSON.
                (None, Some(problem)) if rule.key.needs_body() => {
                    match (self.body_policy, rule.on_missing) {
                        (BodyPolicy::Fallback, MissingKey::Skip | MissingKey::Shared) => {
                            Key::anonymous()
                        }
                        _ => {
                            self.observe(tier_name, Outcome::MissingKey { rule: &rule.name }, &[]);
                            return Err(self.unusable_body(problem));
                        }
                    }
                }
                (None, _) => match rule.on_missing {
                    MissingKey::Skip => continue,
                    MissingKey::Shared => Key::anonymous(),
                    MissingKey::Reject => {
                        self.observe(tier_name, Outcome::MissingKey { rule: &rule.name }, &[]);
                        return Err(invalid(
                            rule.key.missing_status(),
                            "missing_rate_limit_key",
                            format!(
                                "Missing rate-limit key: rule `{}` needs the {} of the request.",
                                rule.name,
                                rule.key.describe()
                            ),
                        ));
                    }
                },
            };
            let (variant, quota) = rule.variant_for(tier_name);
            let quota = *quota;
            let unit = quota.unit();
            let amount = if quota.algorithm() == Algorithm::Concurrency || unit == Unit::Requests {
                1
            } else {
                let cost = match estimate {
                    Some(c) => c,
                    None => *estimate.insert(self.estimate(req, problem, tier_name)?),
                };
                match unit {
                    Unit::InputTokens => cost.input_tokens(),
                    Unit::OutputTokens => cost.output_tokens(),
                    Unit::Cost => {
                        let m = model.get_or_insert_with(|| body_model(req));
                        self.weights
                            .weigh(m.as_deref(), cost.input_tokens(), cost.output_tokens())
                    }
                    _ => cost.tokens(),
                }
            };
            charges.push(Planned {
                rule: i,
                variant,
                bucket: BucketKey::new(rule.name.clone(), key),
                quota,
                amount,
            });
        }
        if self.observes_settlements && estimate.is_some() {
            // The settlement's observer labels its event with the model (the body is parsed
            // already: a token estimate read it).
            model.get_or_insert_with(|| body_model(req));
        }
        // A body the layer could not read whole gives no identity: each attempt is charged.
        let idempotency = match (&self.idempotency_header, req.body(), problem) {
            (Some(h), Some(body), None | Some(BodyProblem::NotJson(_))) => {
                req.headers().get(h).and_then(|id| {
                    crate::idempotency::key(
                        id.as_bytes(),
                        req.method(),
                        req.uri(),
                        body,
                        charges.iter().map(|p| &p.bucket),
                    )
                })
            }
            _ => None,
        };
        // The estimate is the fallback when an estimator that reads the body met one it can't
        // use (`estimate` would have refused the request otherwise).
        let fallback = estimate.is_some()
            && problem.is_some()
            && self.cost.as_ref().is_some_and(|c| c.needs_body());
        Ok(Plan {
            tier,
            idempotency,
            charges,
            fallback,
            estimate: estimate.unwrap_or_default(),
            model: model.flatten(),
        })
    }

    fn estimate(
        &self,
        req: &RequestView<'_>,
        problem: Option<&BodyProblem>,
        tier: Option<&str>,
    ) -> Result<Cost, Rejection> {
        // `build` guarantees an estimator when a rule counts tokens.
        let Some(estimator) = &self.cost else {
            return Ok(Cost::default());
        };
        if problem.is_none() && estimator.needs_body() && req.body().is_some_and(Bytes::is_empty) {
            // A request without a body (`GET /v1/models`) runs no inference: no tokens.
            return Ok(Cost::default());
        }
        if let (Some(problem), true) = (problem, estimator.needs_body()) {
            if self.body_policy == BodyPolicy::Fallback {
                return Ok(self.fallback_cost);
            }
            self.observe(tier, Outcome::CostError, &[]);
            return Err(self.unusable_body(problem));
        }
        estimator.estimate(req).map_err(|e| {
            self.observe(tier, Outcome::CostError, &[]);
            invalid(e.status, "invalid_cost", e.message)
        })
    }

    /// The answer to a body the rules need but can't use: 413 when it is over
    /// `max_inspect_bytes`, 400 when it is not JSON.
    fn unusable_body(&self, problem: &BodyProblem) -> Rejection {
        match problem {
            BodyProblem::TooLarge => invalid(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                format!(
                    "The request body is larger than the {} bytes the rate limiter reads \
                     to apply its limits.",
                    self.max_inspect_bytes
                ),
            ),
            BodyProblem::NotJson(e) => invalid(
                StatusCode::BAD_REQUEST,
                "invalid_request_body",
                format!("The request body is not valid JSON: {e}."),
            ),
        }
    }

    pub(crate) fn acquire<'a>(
        &'a self,
        plan: &'a Plan,
    ) -> StoreFuture<Result<Decision, StoreError>> {
        let charge = |p: &'a Planned| Charge::new(&p.bucket, &p.quota, p.amount);
        let ask = |charges: &[Charge<'_>]| match &plan.idempotency {
            Some(id) => self.store.acquire_once(charges, id),
            None => self.store.acquire(charges),
        };
        // Up to 8 charges (every realistic request) without a heap allocation.
        match plan.charges.first() {
            None => ask(&[]),
            Some(first) if plan.charges.len() <= 8 => {
                let mut buf = [charge(first); 8];
                for (slot, p) in buf.iter_mut().zip(&plan.charges).skip(1) {
                    *slot = charge(p);
                }
                ask(&buf[..plan.charges.len()])
            }
            Some(_) => ask(&plan.charges.iter().map(charge).collect::<Vec<_>>()),
        }
    }

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

/// Turns the store's answer into the headers and settlement of an admitted request, or a
/// rejection (to the request whose headers are `request`: see `Rejection::into_response`).
pub(crate) fn conclude(
    shared: &Arc<Shared>,
    plan: Plan,
    result: Result<Decision, StoreError>,
    request: &HeaderMap,
) -> Result<Admit, Box<Response<Full<Bytes>>>> {
    let tier = plan.tier.as_ref().map(Tier::as_str);
    let decision = match result {
        Ok(d) => d,
        Err(e) => {
            let admitted = shared.failure == FailurePolicy::Open;
            tracing::warn!(
                target: "tower_llm_ratelimit",
                error = %e,
                admitted,
                "rate-limit store failed"
            );
            shared.observe(tier, Outcome::StoreError { admitted }, &[]);
            if admitted {
                return Ok(Admit {
                    headers: RateHeaders::default(),
                    settle: None,
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
    let states = plan
        .charges
        .iter()
        .zip(&decision.charges)
        .map(|(p, s)| RuleState {
            rule: &shared.rules[p.rule].name,
            quota: &p.quota,
            variant: p.variant,
            snapshot: s.snapshot,
            cached: &shared.quota_headers[p.rule][p.variant],
        });
    let h = headers::write(
        shared.headers,
        &shared.joined_policies,
        shared.rules.len(),
        states,
    );
    if shared.observer.is_some() {
        let denied = decision.denial.map(|d| d.index);
        let rules: Vec<RuleDecision<'_>> = plan
            .charges
            .iter()
            .zip(&decision.charges)
            .enumerate()
            .map(|(i, (p, s))| RuleDecision {
                rule: &shared.rules[p.rule].name,
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
                rule: &shared.rules[plan.charges[d.index].rule].name,
                retry_after: d.retry_after,
            },
        };
        shared.observe(tier, outcome, &rules);
    }
    let Some(denial) = decision.denial else {
        // An attempt with an idempotency id is settled whatever its rules: its failure is
        // what makes its retry free.
        let needs_settling = plan.idempotency.is_some()
            || !shared.count_failed_requests
            || plan.charges.iter().any(|p| {
                p.quota.unit().is_token_based() || p.quota.algorithm() == Algorithm::Concurrency
            });
        let settle = needs_settling.then(|| {
            // A new vector, not `collect` (which would reuse the plan's and shrink it: a
            // reallocation).
            let mut pending = Vec::with_capacity(plan.charges.len());
            pending.extend(
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
            Box::new(Settle::new(
                Arc::clone(shared),
                pending,
                plan.estimate,
                plan.fallback,
                plan.model,
                shared
                    .observes_settlements
                    .then(|| plan.tier.clone())
                    .flatten(),
                plan.idempotency,
            ))
        });
        return Ok(Admit { headers: h, settle });
    };
    let p = &plan.charges[denial.index];
    let snapshot = decision.charges[denial.index].snapshot;
    let rule = &*shared.rules[p.rule].name;
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
            snapshot.limit.saturating_sub(snapshot.remaining),
            p.amount,
            denial.retry_after,
        )
        .into_response(request, h),
    ))
}
