//! Planning a request's charges: its tier, each rule's bucket key and amount, its
//! idempotency identity; and asking the store for them, all or nothing.

use bytes::Bytes;
use http::StatusCode;

use super::Limiter;
use crate::algorithm::Algorithm;
use crate::capacity::Feedback;
use crate::cost::Cost;
use crate::inspect::BodyPolicy;
use crate::key::{Key, RequestView};
use crate::observe::{ModelLabel, Outcome, StoreCall};
use crate::reject::Rejection;
use crate::rule::{MissingKey, Quota, Unit};
use crate::store::{BucketKey, Charge, Decision, IdempotencyKey, StoreError, StoreFuture};
use crate::tier::Tier;

/// One rule's charge for this request.
pub(super) struct Planned {
    pub(super) rule: usize,
    /// Which of the rule's quotas (see `Rule::variant_for`).
    pub(super) variant: usize,
    pub(super) bucket: BucketKey,
    pub(super) quota: Quota,
    pub(super) amount: u64,
}

/// A request's plan: its tier and charges.
pub(crate) struct Plan {
    pub(super) tier: Option<Tier>,
    /// The request's identity when it carries an idempotency id (see `idempotency.rs`).
    pub(super) idempotency: Option<IdempotencyKey>,
    pub(super) charges: Vec<Planned>,
    pub(super) estimate: Cost,
    /// The estimate is the layer's fallback cost (the body could not be read or parsed).
    pub(super) fallback: bool,
    pub(super) model: Option<String>,
    /// The request's `ModelLabel` extension, kept for the observer only.
    pub(super) label: Option<ModelLabel>,
    /// The controllers of its adaptive charges, if it has any.
    pub(super) feedback: Option<Feedback>,
    /// A capacity with tiers: its saturation attempt and reserve attempt.
    pub(super) reserve: Option<super::capacity::Reserve>,
}

/// Why the body the estimate needs can't be used.
pub(crate) enum BodyProblem {
    TooLarge,
    NotJson(String),
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

impl Limiter {
    /// The request's tier and charges, or its rejection: a missing key whose rule rejects,
    /// a body the rules need but can't use, an estimate that fails. `problem` is what made
    /// the body unusable, if it is.
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
        let mut feedback: Option<Feedback> = None;
        let mut reserve = None;
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
            if let Some(cap) = &self.capacity[i] {
                let bucket = BucketKey::new(rule.name.clone(), key);
                let at = charges.len();
                charges.extend(self.plan_capacity(
                    cap,
                    i,
                    variant,
                    bucket,
                    quota,
                    tier_name,
                    at,
                    &mut feedback,
                    &mut reserve,
                ));
                continue;
            }
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
        // The settlement's observer labels its event with the model: the request's label,
        // else its body's (parsed already, if at all: nothing more is read for it).
        let label = if self.observes_settlements {
            req.extensions().get::<ModelLabel>().cloned()
        } else {
            None
        };
        if label.is_none()
            && self.observes_settlements
            && (estimate.is_some() || self.observes_usage)
        {
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
                        self.identity_buckets(&charges, feedback.as_ref(), reserve.as_ref()),
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
            label,
            feedback,
            reserve,
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

    /// Asks the store for every charge of `plan`, all or nothing (counted once per
    /// idempotency identity when the request has one).
    pub(crate) fn acquire<'a>(
        &'a self,
        plan: &'a Plan,
    ) -> StoreFuture<Result<Decision, StoreError>> {
        let started = self.store_call_started();
        let charge = |p: &'a Planned| Charge::new(&p.bucket, &p.quota, p.amount);
        let ask = |charges: &[Charge<'_>]| match &plan.idempotency {
            Some(id) => self.store.acquire_once(charges, id),
            None => self.store.acquire(charges),
        };
        // Up to 8 charges (every realistic request) without a heap allocation.
        let decision = match plan.charges.first() {
            None => ask(&[]),
            Some(first) if plan.charges.len() <= 8 => {
                let mut buf = [charge(first); 8];
                for (slot, p) in buf.iter_mut().zip(&plan.charges).skip(1) {
                    *slot = charge(p);
                }
                ask(&buf[..plan.charges.len()])
            }
            Some(_) => ask(&plan.charges.iter().map(charge).collect::<Vec<_>>()),
        };
        self.timed(StoreCall::Acquire, started, decision)
    }
}
