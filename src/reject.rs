//! Rejection responses: JSON in the OpenAI error shape for HTTP, trailers-only status for gRPC.
//!
//! | why | HTTP | gRPC (`grpc-status`) | `error.type` / `error.code` |
//! |---|---|---|---|
//! | a rule denied | 429 + `Retry-After`, `retry-after-ms` | 8 `RESOURCE_EXHAUSTED` | `requests` or `tokens` / `rate_limit_exceeded` |
//! | a key is missing | the extractor's status (401 / 400) | mapped from the status: 401 → 16 `UNAUTHENTICATED`, 403 → 7, 400 → 3 `INVALID_ARGUMENT`, ... | `invalid_request_error` / `missing_rate_limit_key` |
//! | the cost can't be estimated | the estimator's status (400) | 3 `INVALID_ARGUMENT` | `invalid_request_error` / `invalid_cost` |
//! | the body is over `max_inspect_bytes` | 413 | 8 `RESOURCE_EXHAUSTED` | `invalid_request_error` / `request_too_large` |
//! | the body is not JSON, or unreadable | 400 | 3 `INVALID_ARGUMENT` | `invalid_request_error` / `invalid_request_body` |
//! | the store failed (fail-closed) | 503 + `Retry-After: 1` | 14 `UNAVAILABLE` | `server_error` / `rate_limit_unavailable` |
//!
//! A denial's message names the rule, its limit and window, what is used and what was
//! requested, like OpenAI's: ``Rate limit reached for rule `user-tpm` on tokens: limit
//! 100000 per 1m0s, used 99500, requested 1200. Please try again in 12s.`` (a calendar
//! budget says `per UTC calendar day`, `hour` or `month`, a concurrency rule `limit 5 in
//! flight`).

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, Response, StatusCode};
use http_body_util::Full;

use crate::algorithm::{Algorithm, CalendarPeriod};
use crate::headers::go_duration;
use crate::rule::Quota;

/// `grpc-status`: a gRPC call's outcome (trailers, or the headers of a trailers-only response).
pub(crate) static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// Whether a request is gRPC (`content-type: application/grpc*`).
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// What a denied rule's limit is per, for its message.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Per {
    /// A window of this length.
    Window(Duration),
    /// A calendar period.
    Calendar(CalendarPeriod),
    /// Requests in flight (a concurrency rule): no window.
    InFlight,
}

impl Per {
    pub(crate) fn of(quota: &Quota) -> Self {
        match quota.algorithm() {
            Algorithm::Calendar(period) => Per::Calendar(period),
            Algorithm::Concurrency => Per::InFlight,
            _ => Per::Window(quota.window()),
        }
    }
}

/// What a denied rule's bucket has used, for its message: a count past a capacity's
/// saturation threshold is known only to be at least the threshold.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Used {
    Exactly(u64),
    AtLeast(u64),
}

impl std::fmt::Display for Used {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Used::Exactly(n) => write!(f, "{n}"),
            Used::AtLeast(n) => write!(f, "{n} or more"),
        }
    }
}

/// Why a request is turned away.
#[derive(Debug)]
pub(crate) enum Rejection {
    RateLimited {
        message: String,
        unit: &'static str,
    },
    /// A request the layer can't decide on: a missing key (`missing_rate_limit_key`), a cost
    /// that can't be estimated (`invalid_cost`), a body too large (`request_too_large`) or
    /// unreadable (`invalid_request_body`).
    Invalid {
        status: StatusCode,
        code: &'static str,
        message: String,
    },
    StoreUnavailable {
        message: String,
    },
}

impl Rejection {
    /// The denial of `rule`.
    pub(crate) fn rate_limited(
        rule: &str,
        unit: &'static str,
        limit: u64,
        per: Per,
        used: Used,
        requested: u64,
        retry_after: Option<Duration>,
    ) -> Self {
        let window = match per {
            Per::Window(w) => format!("per {}", go_duration(w)),
            Per::Calendar(CalendarPeriod::Hour) => "per UTC calendar hour".to_owned(),
            Per::Calendar(CalendarPeriod::Day) => "per UTC calendar day".to_owned(),
            Per::Calendar(CalendarPeriod::Month) => "per UTC calendar month".to_owned(),
            Per::InFlight => "in flight".to_owned(),
        };
        let message = match retry_after {
            Some(wait) => format!(
                "Rate limit reached for rule `{rule}` on {unit}: limit {limit} {window}, \
                 used {used}, requested {requested}. Please try again in {}.",
                go_duration(wait)
            ),
            None => format!(
                "Request too large for rule `{rule}` on {unit}: limit {limit} {window}, \
                 requested {requested}. The request can never fit this limit; reduce its size."
            ),
        };
        Rejection::RateLimited { message, unit }
    }

    /// The response to the request whose headers are `request` (a gRPC call is answered the
    /// gRPC way; they are read only here, so an admitted request never pays for it);
    /// `headers` (rate-limit and retry headers) are added to it.
    pub(crate) fn into_response(
        self,
        request: &HeaderMap,
        headers: HeaderMap,
    ) -> Response<Full<Bytes>> {
        let (status, grpc_status, kind, code, message) = match self {
            Rejection::RateLimited { message, unit } => (
                StatusCode::TOO_MANY_REQUESTS,
                8,
                unit,
                "rate_limit_exceeded",
                message,
            ),
            Rejection::Invalid {
                status,
                code,
                message,
            } => (
                status,
                grpc_code(status),
                "invalid_request_error",
                code,
                message,
            ),
            Rejection::StoreUnavailable { message } => (
                StatusCode::SERVICE_UNAVAILABLE,
                14,
                "server_error",
                "rate_limit_unavailable",
                message,
            ),
        };
        let mut response = if is_grpc(request) {
            grpc_response(grpc_status, &message)
        } else {
            json_response(status, kind, code, &message)
        };
        response.headers_mut().extend(headers);
        response
    }
}

/// The gRPC status for an HTTP status (the gRPC "HTTP to gRPC status code mapping", extended
/// to the statuses a rejection can carry).
fn grpc_code(status: StatusCode) -> u8 {
    match status.as_u16() {
        401 => 16,       // UNAUTHENTICATED
        403 => 7,        // PERMISSION_DENIED
        404 => 5,        // NOT_FOUND
        413 | 429 => 8,  // RESOURCE_EXHAUSTED
        503 => 14,       // UNAVAILABLE
        500..=599 => 13, // INTERNAL
        _ => 3,          // INVALID_ARGUMENT
    }
}

fn json_response(
    status: StatusCode,
    kind: &str,
    code: &str,
    message: &str,
) -> Response<Full<Bytes>> {
    let body = serde_json::json!({
        "error": { "message": message, "type": kind, "param": null, "code": code }
    });
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// A trailers-only gRPC response: HTTP 200 with the status in the headers and no body
/// (gRPC over HTTP/2, "Responses").
fn grpc_response(code: u8, message: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    let h = response.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert(&GRPC_STATUS, HeaderValue::from(u16::from(code)));
    if let Ok(v) = HeaderValue::try_from(percent_encode(message)) {
        h.insert("grpc-message", v);
    }
    response
}

/// gRPC's `grpc-message` encoding: bytes outside printable ASCII, and `%`, as `%XX`.
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for &b in message.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn json_denial_shape() {
        let r = Rejection::rate_limited(
            "user-tpm",
            "tokens",
            100,
            Per::Window(Duration::from_secs(60)),
            Used::Exactly(90),
            20,
            Some(Duration::from_millis(1500)),
        )
        .into_response(&HeaderMap::new(), HeaderMap::new());
        assert_eq!(r.status(), 429);
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["type"], "tokens");
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        assert_eq!(
            v["error"]["message"],
            "Rate limit reached for rule `user-tpm` on tokens: limit 100 per 1m0s, used 90, \
             requested 20. Please try again in 1.5s."
        );
    }

    #[tokio::test]
    async fn a_calendar_denial_names_its_period() {
        let r = Rejection::rate_limited(
            "user-monthly-tokens",
            "tokens",
            100,
            Per::Calendar(CalendarPeriod::Month),
            Used::Exactly(90),
            20,
            Some(Duration::from_secs(3_600)),
        )
        .into_response(&HeaderMap::new(), HeaderMap::new());
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v["error"]["message"],
            "Rate limit reached for rule `user-monthly-tokens` on tokens: limit 100 per UTC \
             calendar month, used 90, requested 20. Please try again in 1h0m0s."
        );
    }

    #[tokio::test]
    async fn a_concurrency_denial_counts_in_flight() {
        let r = Rejection::rate_limited(
            "slots",
            "requests",
            5,
            Per::InFlight,
            Used::AtLeast(5),
            1,
            Some(Duration::from_secs(1)),
        )
        .into_response(&HeaderMap::new(), HeaderMap::new());
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v["error"]["message"],
            "Rate limit reached for rule `slots` on requests: limit 5 in flight, used 5 or \
             more, requested 1. Please try again in 1s."
        );
    }

    #[test]
    fn grpc_denial_is_trailers_only() {
        let mut grpc_request = HeaderMap::new();
        grpc_request.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        let r = Rejection::rate_limited(
            "r",
            "requests",
            1,
            Per::Window(Duration::from_secs(1)),
            Used::Exactly(1),
            1,
            None,
        )
        .into_response(&grpc_request, HeaderMap::new());
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["grpc-status"], "8");
        assert_eq!(percent_encode("a%b\né"), "a%25b%0A%C3%A9");
        assert_eq!(grpc_code(StatusCode::UNAUTHORIZED), 16);
        assert_eq!(grpc_code(StatusCode::FORBIDDEN), 7);
        assert_eq!(grpc_code(StatusCode::BAD_REQUEST), 3);
    }
}
