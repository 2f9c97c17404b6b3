//! [`RateLimit`]: the service that decides per request, and the `Layer` impl of the
//! [`RateLimitLayer`] that builds it. The service asks the layer's limiter to plan, acquire
//! and conclude, then forwards the request with its settlement (`settle.rs`); a decision
//! whose caller left is finished in the background (`acquiring.rs`).

mod acquiring;

use std::sync::Arc;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::Full;
use tower_layer::Layer;
use tower_service::Service;

use self::acquiring::Decided;
use crate::body::ResponseBody;
use crate::document::Json;
use crate::future::{Next, ResponseFuture};
use crate::headers::RateHeaders;
use crate::inspect::{self, Read, RequestBody};
use crate::key::RequestView;
use crate::layer::RateLimitLayer;
use crate::limiter::{invalid, BodyProblem, Limiter, Plan};
use crate::settle::Settle;
use crate::store::{Decision, StoreError};
use crate::stream_usage::{wants_stream_usage, with_stream_usage};

/// An admitted request's rate-limit headers and the settlement that watches its response.
type Admitted = (RateHeaders, Option<Box<Settle>>);

/// The limiter's conclusion on a decision, with the settlement of an admitted request ready
/// to watch its response (dropped unused, it settles the request as one dropped before its
/// response).
fn conclude(
    limiter: &Arc<Limiter>,
    plan: Plan,
    result: Result<Decision, StoreError>,
    request: &HeaderMap,
) -> Result<Admitted, Box<Response<Full<Bytes>>>> {
    let admit = limiter.conclude(plan, result, request)?;
    let settle = admit
        .settlement
        .map(|s| Box::new(Settle::new(Arc::clone(limiter), s)));
    Ok((admit.headers, settle))
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit::new(inner, self.clone())
    }
}

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
        let limiter = &self.layer.limiter;
        // A request with an idempotency id is read too: its body is part of its identity.
        // Only a body of declared length (or none): a stream (gRPC, a chunked upload) is
        // never held back for it, and without a body to digest the request has no identity
        // (each attempt is charged).
        if limiter.needs_body
            || (limiter
                .idempotency_header
                .as_ref()
                .is_some_and(|h| req.headers().contains_key(h))
                && (req.headers().contains_key(http::header::CONTENT_LENGTH)
                    || req.body().is_end_stream()))
        {
            return self.call_with_body(req);
        }
        let plan = match limiter.plan(&RequestView::from_request(&req), None) {
            Ok(plan) => plan,
            Err(r) => {
                return ResponseFuture::rejected(r.into_response(req.headers(), HeaderMap::new()))
            }
        };
        let req = req.map(RequestBody::original);
        match acquiring::acquire(limiter, plan) {
            // A synchronous store (memory): no task switch, and no allocation for up to two
            // rules (the decision's states are inline).
            Decided::Now(plan, result) => match conclude(limiter, plan, result, req.headers()) {
                Ok((headers, settle)) => {
                    ResponseFuture::inner(self.inner.call(req), headers, settle)
                }
                Err(response) => ResponseFuture::rejected(*response),
            },
            Decided::Later(acquiring) => {
                let limiter = Arc::clone(limiter);
                let mut inner = self.take_ready();
                ResponseFuture::deciding(Box::pin(async move {
                    let (plan, result) = (*acquiring).decide().await;
                    match conclude(&limiter, plan, result, req.headers()) {
                        Ok((headers, settle)) => Next::Call(inner.call(req), headers, settle),
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
        let limiter = Arc::clone(&self.layer.limiter);
        let mut inner = self.take_ready();
        // Split before the future captures them: a captured request would keep its own
        // place in the future next to its parts (the future is boxed, and over 1 KiB the
        // allocation leaves the allocator's fast path).
        let (mut parts, body) = req.into_parts();
        ResponseFuture::deciding(Box::pin(async move {
            let max = limiter.max_inspect_bytes;
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
                        return Next::Reject(r.into_response(&parts.headers, HeaderMap::new()));
                    }
                }
            };
            // Parsed once, borrowing the bytes, for every rule and the estimate; the
            // `serde_json::Value` of `RequestView::json` only if something asks for it.
            let lazy_json = OnceLock::new();
            let (plan, stream_usage) = {
                let mut problem = problem;
                let doc = match problem {
                    Some(_) => None,
                    // Read only for an idempotency id: not parsed.
                    None if bytes.is_empty() || !limiter.needs_body => None,
                    None => match Json::parse(&bytes) {
                        Ok(doc) => Some(doc),
                        Err(e) => {
                            problem = Some(BodyProblem::NotJson(e.to_string()));
                            None
                        }
                    },
                };
                let view = RequestView::from_parts(&parts).with_parsed_body(
                    &bytes,
                    doc.as_ref(),
                    &lazy_json,
                );
                let stream_usage = limiter.request_stream_usage
                    && doc
                        .as_ref()
                        .is_some_and(|d| wants_stream_usage(parts.uri.path(), d));
                (limiter.plan(&view, problem.as_ref()), stream_usage)
            };
            let plan = match plan {
                Ok(plan) => plan,
                Err(r) => return Next::Reject(r.into_response(&parts.headers, HeaderMap::new())),
            };
            // A synchronous store answers at once; only a pending answer (already boxed) is
            // awaited.
            let (plan, result) = match acquiring::acquire(&limiter, plan) {
                Decided::Now(plan, result) => (plan, result),
                Decided::Later(acquiring) => (*acquiring).decide().await,
            };
            let (headers, settle) = match conclude(&limiter, plan, result, &parts.headers) {
                Ok(admitted) => admitted,
                Err(response) => return Next::Reject(*response),
            };
            if stream_usage {
                if let Some(new) = with_stream_usage(&bytes) {
                    // Framed by its new length alone: a chunked request keeping its
                    // `transfer-encoding` beside it would reach a proxy ambiguously framed
                    // (RFC 9112 section 6.3).
                    parts.headers.remove(http::header::TRANSFER_ENCODING);
                    parts
                        .headers
                        .insert(http::header::CONTENT_LENGTH, HeaderValue::from(new.len()));
                    bytes = new;
                }
            }
            let req = Request::from_parts(parts, RequestBody::replay(bytes, trailers, rest));
            Next::Call(inner.call(req), headers, settle)
        }))
    }
}
