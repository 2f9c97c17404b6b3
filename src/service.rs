//! [`RateLimit`]: the service that decides per request.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::Full;
use tower_service::Service;

use crate::body::ResponseBody;
use crate::cost::Cost;
use crate::future::{Next, ResponseFuture};
use crate::headers::{self, RuleState};
use crate::inspect::{self, BodyPolicy, Read, RequestBody};
use crate::key::{Key, RequestView};
use crate::layer::{FailurePolicy, RateLimitLayer, Shared};
use crate::observe::{DecisionEvent, Outcome, RuleDecision};
use crate::reject::{is_grpc, Rejection};
use crate::rule::{Algorithm, MissingKey, Quota, Unit};
use crate::settle::{Pending, Settle};
use crate::store::{BucketKey, Charge, Decision, StoreError, StoreFuture};
use crate::tier::Tier;

/// Rate limits the requests of an inner service. Built by [`RateLimitLayer`].
///
/// Decides in [`call`](Service::call), never in `poll_ready` (which it forwards): a denied
/// request is answered with a rejection response and never reaches the inner service.
/// `Error = S::Error`: a rejection is a response, so no `HandleErrorLayer` is needed.
///
/// The inner service receives `Request<RequestBody<B>>`: the client's body, untouched, or
/// replayed byte for byte after the layer read it (see [`RequestBody`]).
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

/// A request's plan: its tier and charges.
struct Plan {
    tier: Option<Tier>,
    request_id: Option<String>,
    charges: Vec<Planned>,
    estimate: Cost,
    model: Option<String>,
}

/// Why the body the estimate needs can't be used.
enum BodyProblem {
    TooLarge,
    NotJson(String),
}

/// An admitted request's headers and settlement.
struct Admit {
    headers: HeaderMap,
    settle: Option<Settle>,
}

fn invalid(status: StatusCode, code: &'static str, message: String) -> Rejection {
    Rejection::Invalid {
        status,
        code,
        message,
    }
}

impl Shared {
    fn plan(
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
            let key = match rule.key.extract(req) {
                Some(k) => k,
                None => match rule.on_missing {
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
            let quota = *rule.quota_for(tier_name);
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
                        let m = model.get_or_insert_with(|| {
                            req.json()
                                .and_then(|j| j.get("model")?.as_str())
                                .map(str::to_owned)
                        });
                        self.weights
                            .weigh(m.as_deref(), cost.input_tokens(), cost.output_tokens())
                    }
                    _ => cost.tokens(),
                }
            };
            charges.push(Planned {
                rule: i,
                bucket: BucketKey::new(rule.name.clone(), key),
                quota,
                amount,
            });
        }
        let request_id = self.idempotency_header.as_ref().and_then(|h| {
            let v = req.headers().get(h)?.to_str().ok()?.trim();
            (!v.is_empty()).then(|| v.to_owned())
        });
        Ok(Plan {
            tier,
            request_id,
            charges,
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
            return Err(match problem {
                BodyProblem::TooLarge => invalid(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request_too_large",
                    format!(
                        "The request body is larger than the {} bytes the rate limiter reads \
                         to estimate its cost.",
                        self.max_inspect_bytes
                    ),
                ),
                BodyProblem::NotJson(e) => invalid(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_body",
                    format!("The request body is not valid JSON: {e}."),
                ),
            });
        }
        estimator.estimate(req).map_err(|e| {
            self.observe(tier, Outcome::CostError, &[]);
            invalid(e.status, "invalid_cost", e.message)
        })
    }

    fn acquire(&self, plan: &Plan) -> StoreFuture<Result<Decision, StoreError>> {
        let charges: Vec<Charge<'_>> = plan
            .charges
            .iter()
            .map(|p| Charge::new(&p.bucket, &p.quota, p.amount))
            .collect();
        match &plan.request_id {
            Some(id) => self.store.acquire_once(&charges, id),
            None => self.store.acquire(&charges),
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
/// rejection.
fn conclude(
    shared: &Arc<Shared>,
    plan: Plan,
    result: Result<Decision, StoreError>,
    grpc: bool,
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
                    headers: HeaderMap::new(),
                    settle: None,
                });
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
            rule: &shared.rules[p.rule].name,
            quota: &p.quota,
            snapshot: s.snapshot,
        })
        .collect();
    headers::write(&mut h, shared.headers, &states);
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
        let needs_settling = !shared.count_failed_requests
            || plan.charges.iter().any(|p| {
                p.quota.unit().is_token_based() || p.quota.algorithm() == Algorithm::Concurrency
            });
        let settle = needs_settling.then(|| {
            let pending = plan
                .charges
                .into_iter()
                .zip(&decision.charges)
                .map(|(p, s)| Pending {
                    bucket: p.bucket,
                    quota: p.quota,
                    placement: s.placement,
                    charged: p.amount,
                })
                .collect();
            Settle::new(Arc::clone(shared), pending, plan.estimate, plan.model)
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

/// Adds `stream_options.include_usage = true` to a streaming chat request. Returns the new
/// body, or `None` to keep the original.
fn request_stream_usage(path: &str, json: &serde_json::Value) -> Option<Bytes> {
    if !path.ends_with("/chat/completions")
        || json.get("stream") != Some(&serde_json::Value::Bool(true))
    {
        return None;
    }
    let mut json = json.clone();
    let options = json
        .as_object_mut()?
        .entry("stream_options")
        .or_insert_with(|| serde_json::Value::Object(Default::default()));
    let options = options.as_object_mut()?;
    if options.get("include_usage") == Some(&serde_json::Value::Bool(true)) {
        return None;
    }
    options.insert("include_usage".to_owned(), serde_json::Value::Bool(true));
    serde_json::to_vec(&json).ok().map(Bytes::from)
}

impl<S> RateLimit<S> {
    /// Takes the instance `poll_ready` readied, leaving a fresh clone in its place, for a
    /// call made after an asynchronous decision.
    fn take_ready(&mut self) -> S
    where
        S: Clone,
    {
        let clone = self.inner.clone();
        std::mem::replace(&mut self.inner, clone)
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: std::fmt::Display,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let shared = &self.layer.shared;
        let grpc = is_grpc(req.headers());
        if shared.needs_body {
            return self.call_with_body(req, grpc);
        }
        let plan = match shared.plan(&RequestView::from_request(&req), None) {
            Ok(plan) => plan,
            Err(r) => return ResponseFuture::rejected(r.into_response(grpc, HeaderMap::new())),
        };
        let req = req.map(RequestBody::original);
        match shared.acquire(&plan).now() {
            // A synchronous store (memory): no allocation, no task switch.
            Ok(result) => match conclude(shared, plan, result, grpc) {
                Ok(a) => ResponseFuture::inner(self.inner.call(req), a.headers, a.settle),
                Err(response) => ResponseFuture::rejected(*response),
            },
            Err(pending) => {
                let shared = Arc::clone(shared);
                let mut inner = self.take_ready();
                ResponseFuture::deciding(Box::pin(async move {
                    match conclude(&shared, plan, pending.await, grpc) {
                        Ok(a) => Next::Call(inner.call(req), a.headers, a.settle),
                        Err(response) => Next::Reject(*response),
                    }
                }))
            }
        }
    }
}

impl<S> RateLimit<S> {
    /// The path of a layer that reads the body: read it (bounded), parse it once, decide,
    /// then hand the inner service the same bytes.
    fn call_with_body<ReqBody, ResBody>(
        &mut self,
        req: Request<ReqBody>,
        grpc: bool,
    ) -> ResponseFuture<S::Future>
    where
        S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        ReqBody: Body<Data = Bytes> + Send + 'static,
        ReqBody::Error: std::fmt::Display,
    {
        let shared = Arc::clone(&self.layer.shared);
        let mut inner = self.take_ready();
        ResponseFuture::deciding(Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            let max = shared.max_inspect_bytes;
            let declared_too_large = parts
                .headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                .is_some_and(|n| n > max as u64);
            let (mut bytes, trailers, rest, problem) = if declared_too_large {
                // Don't read what we'd refuse anyway; the body goes on untouched.
                (
                    Bytes::new(),
                    None,
                    Some(Box::pin(body)),
                    Some(BodyProblem::TooLarge),
                )
            } else {
                match inspect::read_bounded(body, max).await {
                    Read::Complete(b, t) => (b, t, None, None),
                    Read::TooLarge(b, rest) => (b, None, Some(rest), Some(BodyProblem::TooLarge)),
                    Read::Failed(e) => {
                        let r = invalid(
                            StatusCode::BAD_REQUEST,
                            "invalid_request_body",
                            format!("The request body could not be read: {e}."),
                        );
                        return Next::Reject(r.into_response(grpc, HeaderMap::new()));
                    }
                }
            };
            let (json, problem) = match problem {
                Some(p) => (None, Some(p)),
                None if bytes.is_empty() => (None, None),
                None => match serde_json::from_slice::<serde_json::Value>(&bytes) {
                    Ok(v) => (Some(v), None),
                    Err(e) => (None, Some(BodyProblem::NotJson(e.to_string()))),
                },
            };
            let plan = {
                let view = RequestView::from_parts(&parts).with_body(&bytes, json.as_ref());
                shared.plan(&view, problem.as_ref())
            };
            let plan = match plan {
                Ok(plan) => plan,
                Err(r) => return Next::Reject(r.into_response(grpc, HeaderMap::new())),
            };
            let result = shared.acquire(&plan).await;
            let admit = match conclude(&shared, plan, result, grpc) {
                Ok(a) => a,
                Err(response) => return Next::Reject(*response),
            };
            if shared.request_stream_usage {
                if let Some(new) = json
                    .as_ref()
                    .and_then(|j| request_stream_usage(parts.uri.path(), j))
                {
                    parts
                        .headers
                        .insert(http::header::CONTENT_LENGTH, HeaderValue::from(new.len()));
                    bytes = new;
                }
            }
            let req = Request::from_parts(parts, RequestBody::replay(bytes, trailers, rest));
            Next::Call(inner.call(req), admit.headers, admit.settle)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_usage_is_requested_only_for_streaming_chat() {
        let chat = serde_json::json!({"model": "m", "stream": true, "messages": []});
        let new = request_stream_usage("/v1/chat/completions", &chat).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&new).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "m");
        let not_streaming = serde_json::json!({"model": "m", "messages": []});
        assert!(request_stream_usage("/v1/chat/completions", &not_streaming).is_none());
        assert!(request_stream_usage("/v1/embeddings", &chat).is_none());
        let already =
            serde_json::json!({"stream": true, "stream_options": {"include_usage": true}});
        assert!(request_stream_usage("/v1/chat/completions", &already).is_none());
    }
}
