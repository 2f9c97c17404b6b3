//! [`RateLimit`]: the service that decides per request.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::Full;
use tower_service::Service;

use crate::body::ResponseBody;
use crate::future::{Next, ResponseFuture};
use crate::headers::{self, RuleState};
use crate::key::{Key, RequestView};
use crate::layer::{FailurePolicy, RateLimitLayer, Shared};
use crate::observe::{DecisionEvent, Outcome, RuleDecision};
use crate::reject::{is_grpc, Rejection};
use crate::rule::{MissingKey, Quota, Unit};
use crate::store::{BucketKey, Charge, Decision, StoreError};
use crate::tier::Tier;

/// Rate limits the requests of an inner service. Built by [`RateLimitLayer`].
///
/// Decides in [`call`](Service::call), never in `poll_ready` (which it forwards): a denied
/// request is answered with a rejection response and never reaches the inner service.
/// `Error = S::Error`: a rejection is a response, so no `HandleErrorLayer` is needed.
#[derive(Debug, Clone)]
pub struct RateLimit<S> {
    inner: S,
    layer: RateLimitLayer,
}

impl<S> RateLimit<S> {
    /// Wraps `inner` with `layer`'s rules.
    pub fn new(inner: S, layer: RateLimitLayer) -> Self {
        Self { inner, layer }
    }

    /// A layer that wraps services with `layer`'s rules (the same as `layer` itself).
    pub fn layer(layer: RateLimitLayer) -> RateLimitLayer {
        layer
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// One rule's charge for this request.
struct Planned {
    rule: usize,
    bucket: BucketKey,
    quota: Quota,
    amount: u64,
}

/// A request's plan: its tier and charges, or a rejection before the store is asked.
struct Plan {
    tier: Option<Tier>,
    charges: Vec<Planned>,
}

impl Shared {
    fn plan(&self, req: &RequestView<'_>) -> Result<Plan, Rejection> {
        let tier = self.tiers.as_ref().and_then(|t| t.resolve(req));
        let tier_name = tier.as_ref().map(Tier::as_str);
        let mut tokens: Option<u64> = None;
        let mut charges = Vec::with_capacity(self.rules.len());
        for (i, rule) in self.rules.iter().enumerate() {
            let key = match rule.key.extract(req) {
                Some(k) => k,
                None => match rule.on_missing {
                    MissingKey::Skip => continue,
                    MissingKey::Shared => Key::anonymous(),
                    MissingKey::Reject => {
                        self.observe(tier_name, Outcome::MissingKey { rule: &rule.name }, &[]);
                        return Err(Rejection::MissingKey {
                            status: rule.key.missing_status(),
                            message: format!(
                                "Missing rate-limit key: rule `{}` needs the {} of the request.",
                                rule.name,
                                rule.key.describe()
                            ),
                        });
                    }
                },
            };
            let quota = *rule.quota_for(tier_name);
            let amount = match quota.unit() {
                Unit::Requests => 1,
                Unit::Tokens => match tokens {
                    Some(t) => t,
                    None => {
                        // `build` guarantees an estimator when a rule counts tokens.
                        let estimate = match &self.cost {
                            Some(c) => c.estimate(req),
                            None => Ok(Default::default()),
                        };
                        let t = estimate
                            .map_err(|e| {
                                self.observe(tier_name, Outcome::CostError, &[]);
                                Rejection::Cost {
                                    status: e.status,
                                    message: e.message,
                                }
                            })?
                            .tokens();
                        *tokens.insert(t)
                    }
                },
            };
            charges.push(Planned {
                rule: i,
                bucket: BucketKey::new(rule.name.clone(), key),
                quota,
                amount,
            });
        }
        Ok(Plan { tier, charges })
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

    /// Turns the store's answer into the headers to add (admitted) or a rejection.
    fn conclude(
        &self,
        plan: &Plan,
        result: Result<Decision, StoreError>,
        grpc: bool,
    ) -> Result<HeaderMap, Box<Response<Full<Bytes>>>> {
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
                    return Ok(HeaderMap::new());
                }
                let mut h = HeaderMap::new();
                headers::write_retry_after(&mut h, Duration::from_secs(1));
                return Err(Box::new(
                    Rejection::StoreUnavailable {
                        message: format!("Rate limiting is unavailable: {e}. Please try again."),
                    }
                    .into_response(grpc, h),
                ));
            }
        };
        let mut h = HeaderMap::new();
        let states: Vec<RuleState<'_>> = plan
            .charges
            .iter()
            .zip(&decision.charges)
            .map(|(p, s)| RuleState {
                rule: &self.rules[p.rule].name,
                quota: &p.quota,
                snapshot: s.snapshot,
            })
            .collect();
        headers::write(&mut h, self.headers, &states);
        if self.observer.is_some() {
            let denied = decision.denial.map(|d| d.index);
            let rules: Vec<RuleDecision<'_>> = plan
                .charges
                .iter()
                .zip(&decision.charges)
                .enumerate()
                .map(|(i, (p, s))| RuleDecision {
                    rule: &self.rules[p.rule].name,
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
        let Some(denial) = decision.denial else {
            return Ok(h);
        };
        let p = &plan.charges[denial.index];
        let snapshot = decision.charges[denial.index].snapshot;
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
        headers::write_retry_after(&mut h, denial.retry_after.unwrap_or(p.quota.window()));
        Err(Box::new(
            Rejection::rate_limited(
                rule,
                p.quota.unit().as_str(),
                snapshot.limit,
                p.quota.window(),
                snapshot.limit.saturating_sub(snapshot.remaining),
                p.amount,
                denial.retry_after,
            )
            .into_response(grpc, h),
        ))
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let shared: &Arc<Shared> = &self.layer.shared;
        let view = RequestView::from_request(&req);
        let grpc = is_grpc(req.headers());
        let plan = match shared.plan(&view) {
            Ok(plan) => plan,
            Err(rejection) => {
                return ResponseFuture::rejected(rejection.into_response(grpc, HeaderMap::new()))
            }
        };
        let acquiring = {
            let charges: Vec<Charge<'_>> = plan
                .charges
                .iter()
                .map(|p| Charge::new(&p.bucket, &p.quota, p.amount))
                .collect();
            shared.store.acquire(&charges)
        };
        match acquiring.now() {
            // A synchronous store (memory): no allocation, no task switch.
            Ok(result) => match shared.conclude(&plan, result, grpc) {
                Ok(headers) => ResponseFuture::inner(self.inner.call(req), headers),
                Err(response) => ResponseFuture::rejected(*response),
            },
            Err(pending) => {
                // The inner service is called after the decision: take the instance that
                // `poll_ready` readied and leave a fresh clone in its place.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                let shared = Arc::clone(shared);
                ResponseFuture::deciding(Box::pin(async move {
                    let result = pending.await;
                    match shared.conclude(&plan, result, grpc) {
                        Ok(headers) => Next::Call(inner.call(req), headers),
                        Err(response) => Next::Reject(*response),
                    }
                }))
            }
        }
    }
}
