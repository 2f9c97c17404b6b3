//! The request path of the API endpoints:
//!
//! ```text
//! client ─► gate (auth 401, body deadline 408, body size 413, JSON 400, model 404)
//!        ─► RateLimitLayer ─► proxy ─► upstream
//! ```
//!
//! The gate runs before the limiter, so unknown keys and models never reach it (nothing is
//! counted for them). It reads the whole body within `body_timeout_secs` (a slower upload is
//! answered 408) and routes the request by its `model`; the limiter's per-model rules key on
//! that routed model (`limits::ModelKey`), whatever else the body holds.
//!
//! The proxy sends the request on with the allowed headers only (`forward.rs`) and the
//! model's own key, and streams the answer back frame by frame (never buffered), cutting off
//! an upstream that goes idle (`upstream_body.rs`); the limiter reads the answer's `usage` as
//! it streams past, once, for its token rules and the metrics. The gate labels each request
//! with its routed model ([`ModelLabel`]) for the metrics of its usage. An unreachable
//! upstream is a 502, whose tokens the limiter refunds (as for every answer >= 400); an
//! upstream slower than `timeout_secs` is a 504 that keeps the token reservation
//! ([`KeepTokens`]): the upstream may be generating them still.

use std::borrow::Cow;
use std::error::Error as _;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Deserialize;
use serde_json::json;
use tower_llm_ratelimit::key::RequestView;
use tower_llm_ratelimit::observe::ModelLabel;
use tower_llm_ratelimit::settle::KeepTokens;

use crate::limits;
use crate::metrics::{RequestContext, REQUEST};
use crate::server::App;
use crate::upstream::ModelRoute;
use crate::upstream_body::UpstreamBody;

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
pub(crate) fn error(
    status: StatusCode,
    kind: &str,
    code: Option<&str>,
    param: Option<&str>,
    message: impl Into<String>,
) -> Response {
    let body = json!({"error": {"message": message.into(), "type": kind, "param": param,
        "code": code}});
    (status, axum::Json(body)).into_response()
}

/// 401 for a missing or unknown key.
pub(crate) fn unauthorized(req_headers: &HeaderMap) -> Response {
    let (code, message) = if req_headers.contains_key(header::AUTHORIZATION) {
        (
            "invalid_api_key",
            "Incorrect API key provided. Send a configured key as `Authorization: Bearer <key>`.",
        )
    } else {
        (
            "missing_api_key",
            "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
        )
    };
    let mut r = error(
        StatusCode::UNAUTHORIZED,
        "invalid_request_error",
        Some(code),
        None,
        message,
    );
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// The model of an admitted request, for the proxy.
#[derive(Debug, Clone)]
pub(crate) struct Routed {
    pub(crate) model: Arc<ModelRoute>,
}

#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
}

/// Authentication and routing before the limiter.
pub(crate) async fn gate(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let endpoint = req.uri().path().to_owned();
    let (response, who) = gate_inner(&app, req, next, start).await;
    let status = response.status();
    app.metrics.response(&endpoint, status.as_u16());
    match who {
        Some((user, model)) => tracing::info!(
            target: "gateway::access",
            %endpoint, %user, %model, status = status.as_u16(),
            ms = start.elapsed().as_millis() as u64,
            "request"
        ),
        None => tracing::info!(
            target: "gateway::access",
            %endpoint, status = status.as_u16(),
            ms = start.elapsed().as_millis() as u64,
            "request refused"
        ),
    }
    response
}

async fn gate_inner(
    app: &Arc<App>,
    req: Request,
    next: Next,
    start: Instant,
) -> (Response, Option<(Arc<str>, Arc<str>)>) {
    if req.method() != Method::POST {
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            None,
            None,
            format!(
                "{} {} is not supported: use POST.",
                req.method(),
                req.uri().path()
            ),
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return (r, None);
    }
    let Some(caller) = limits::caller(&app.callers, &RequestView::from_request(&req)).cloned()
    else {
        return (unauthorized(req.headers()), None);
    };
    let (mut parts, body) = req.into_parts();
    let reading = Limited::new(body, app.max_body_bytes).collect();
    let Ok(read) = tokio::time::timeout(app.body_timeout, reading).await else {
        let mut r = error(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            Some("request_timeout"),
            None,
            format!(
                "The request body did not arrive within {:?}.",
                app.body_timeout
            ),
        );
        // The rest of the body may still be on its way: this connection can't carry
        // another request.
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return (r, None);
    };
    let bytes = match read {
        Ok(b) => b.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            let r = error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                Some("request_too_large"),
                None,
                format!(
                    "The request body is larger than the gateway's limit of {} bytes.",
                    app.max_body_bytes
                ),
            );
            return (r, None);
        }
        Err(e) => {
            let r = error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                None,
                format!("The request body could not be read: {e}."),
            );
            return (r, None);
        }
    };
    // Only `model` is read here (the rest is skipped, not built); the limiter parses the
    // body for its estimate.
    let model = match serde_json::from_slice::<Head<'_>>(&bytes) {
        Ok(Head { model: Some(m) }) => m.into_owned(),
        Ok(Head { model: None }) => {
            let r = error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("missing_model"),
                Some("model"),
                "You must provide a model parameter.",
            );
            return (r, None);
        }
        Err(e) => {
            let r = error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("invalid_json"),
                None,
                format!("The request body is not a JSON object with a string `model`: {e}."),
            );
            return (r, None);
        }
    };
    let Some(route) = app.models.get(model.as_str()).cloned() else {
        let r = error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("model_not_found"),
            Some("model"),
            format!("The model `{model}` does not exist or you do not have access to it."),
        );
        return (r, None);
    };
    let who = (Arc::clone(&caller.user), Arc::clone(&route.name));
    let ctx = RequestContext {
        start,
        model: Arc::clone(&route.name),
    };
    // The label of this request's usage in the metrics: the routed model, even for a body
    // larger than the limiter reads.
    parts
        .extensions
        .insert(ModelLabel::new(Arc::clone(&route.name)));
    parts.extensions.insert(Routed { model: route });
    // The limiter's keys and tier read the caller from here instead of looking it up again.
    parts.extensions.insert(caller);
    let req = Request::from_parts(parts, Body::from(bytes));
    // The limiter decides while this future is polled, on this task: its observer reads
    // the context.
    let response = REQUEST.scope(ctx, next.run(req)).await;
    (response, Some(who))
}

/// Headers that describe one connection, not the message (RFC 9110 section 7.6.1): not
/// passed back to the client from the upstream's response.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names first: most messages carry none of these, and each removal
    // by name is a lookup of its own.
    if !headers.keys().any(|n| HOP_BY_HOP.contains(&n.as_str())) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::try_from(n.trim()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in HOP_BY_HOP {
        headers.remove(n);
    }
}

/// Sends an admitted request to its model's upstream.
pub(crate) async fn proxy(State(app): State<Arc<App>>, req: Request) -> Response {
    let Some(routed) = req.extensions().get::<Routed>().cloned() else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            None,
            None,
            "request not routed",
        );
    };
    let route = routed.model;
    // Only admitted requests get here: the dashboard's in flight for the model, until the
    // response body ends (or this future is dropped).
    let in_flight =
        crate::dashboard::tally::InFlight::begin(&app.metrics.board, Arc::clone(&route.name));
    let (parts, body) = req.into_parts();
    let suffix = parts
        .uri
        .path()
        .strip_prefix("/v1")
        .unwrap_or(parts.uri.path());
    let path_and_query = match parts.uri.query() {
        Some(q) => format!("{}{suffix}?{q}", route.path),
        None => format!("{}{suffix}", route.path),
    };
    let uri: Uri = match format!("{}{path_and_query}", route.origin).parse() {
        Ok(u) => u,
        Err(e) => {
            return error(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                Some("bad_upstream_uri"),
                None,
                format!("bad upstream URI: {e}"),
            )
        }
    };
    let headers = app
        .forward
        .upstream_headers(&parts.headers, route.credential.as_ref());
    let mut upstream_req = http::Request::new(body);
    *upstream_req.method_mut() = parts.method;
    *upstream_req.uri_mut() = uri;
    *upstream_req.headers_mut() = headers;

    let sent = Instant::now();
    let result = tokio::time::timeout(route.timeout, route.client.request(upstream_req)).await;
    let response = match result {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let mut reason = e.to_string();
            let mut source = e.source();
            while let Some(s) = source {
                reason.push_str(": ");
                reason.push_str(&s.to_string());
                source = s.source();
            }
            tracing::warn!(model = %route.name, error = %reason, "upstream unreachable");
            app.metrics
                .upstream(&route.name, "unreachable".into(), None);
            return error(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                Some("upstream_unreachable"),
                None,
                format!(
                    "The upstream of model `{}` could not be reached ({reason}). Please try again.",
                    route.name
                ),
            );
        }
        Err(_) => {
            tracing::warn!(model = %route.name, timeout = ?route.timeout, "upstream timed out");
            app.metrics.upstream(&route.name, "timeout".into(), None);
            let mut r = error(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_error",
                Some("upstream_timeout"),
                None,
                format!(
                    "The upstream of model `{}` did not answer within {:?}.",
                    route.name, route.timeout
                ),
            );
            // The upstream had the request: it may be generating the tokens anyway.
            r.extensions_mut().insert(KeepTokens);
            return r;
        }
    };
    app.metrics.upstream(
        &route.name,
        response.status().as_u16().to_string(),
        Some(sent.elapsed().as_secs_f64()),
    );
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // The gateway's limits are the ones its clients see.
    let upstream_limits: Vec<HeaderName> = parts
        .headers
        .keys()
        .filter(|n| {
            let n = n.as_str();
            n.starts_with("x-ratelimit-") || n == "ratelimit" || n == "ratelimit-policy"
        })
        .cloned()
        .collect();
    for n in upstream_limits {
        parts.headers.remove(n);
    }
    let body = UpstreamBody::new(body, Arc::clone(&route.name), route.stream_idle_timeout);
    let body = crate::idle::Tracked::new(Body::new(body), in_flight);
    Response::from_parts(parts, Body::new(body))
}
