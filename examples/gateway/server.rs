//! The gateway's routes and shared state.
//!
//! | route | auth | limited | what |
//! |---|---|---|---|
//! | `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `/v1/responses` | yes | yes | proxied to the model's upstream |
//! | `GET /v1/models` | yes | no | the configured models |
//! | `GET /v1/ratelimit[?model=NAME]` | yes | no (charges nothing) | the caller's state under every rule that applies to it (its effective limits): limit, used, remaining, reset (in seconds and as an RFC 3339 UTC time); budgets name their calendar period; the limits its key overrides |
//! | `GET /metrics` | no (the admin key with `[server] metrics_requires_admin`) | no | Prometheus text format |
//! | `GET /healthz` | no | no | `{"status":"ok"}` |
//! | `/dashboard`, `/dashboard/data` | admin key | no | the live dashboard (`dashboard.rs`); 404 without `[server] admin_keys` |

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{middleware, Json, Router};
use http::{header, HeaderValue, StatusCode};
use serde_json::{json, Value};
use tower_llm_ratelimit::algorithm::CalendarPeriod;
use tower_llm_ratelimit::headers::go_duration;
use tower_llm_ratelimit::key::RequestView;
use tower_llm_ratelimit::{Algorithm, RateLimitLayer};

use crate::config::Config;
use crate::forward::Forward;
use crate::limits::{self, Callers};
use crate::metrics::Metrics;
use crate::proxy::{self, error};
use crate::upstream::ModelRoute;

pub(crate) struct App {
    pub(crate) callers: Callers,
    pub(crate) models: BTreeMap<String, Arc<ModelRoute>>,
    pub(crate) layer: RateLimitLayer,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) max_body_bytes: usize,
    pub(crate) body_timeout: Duration,
    pub(crate) forward: Forward,
    pub(crate) dashboard: crate::dashboard::Settings,
}

impl App {
    pub(crate) fn new(
        cfg: &Config,
        callers: Callers,
        routes: BTreeMap<String, Arc<ModelRoute>>,
        layer: RateLimitLayer,
        metrics: Arc<Metrics>,
        sessions_generation: u64,
    ) -> Self {
        Self {
            callers,
            models: routes,
            layer,
            metrics,
            max_body_bytes: cfg.limiter.max_body_bytes,
            body_timeout: cfg.server.body_timeout(),
            forward: Forward::new(&cfg.server.forward_headers),
            dashboard: crate::dashboard::Settings::new(cfg, sessions_generation),
        }
    }
}

pub(crate) fn router(app: Arc<App>) -> Router {
    // The limiter wraps only the model endpoints; the gate (auth, model) runs before it.
    let api = Router::new()
        .route("/v1/chat/completions", post(proxy::proxy))
        .route("/v1/completions", post(proxy::proxy))
        .route("/v1/embeddings", post(proxy::proxy))
        .route("/v1/responses", post(proxy::proxy))
        .with_state(Arc::clone(&app))
        .layer(app.layer.clone())
        .layer(middleware::from_fn_with_state(
            Arc::clone(&app),
            proxy::gate,
        ));
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/ratelimit", get(ratelimit))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .merge(crate::dashboard::routes())
        .with_state(app)
        .merge(api)
        .fallback(|req: Request| async move {
            error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("unknown_url"),
                None,
                format!(
                    "Unknown request URL: {} {}.",
                    req.method(),
                    req.uri().path()
                ),
            )
        })
}

async fn models(State(app): State<Arc<App>>, req: Request) -> Response {
    if limits::caller(&app.callers, &RequestView::from_request(&req)).is_none() {
        return proxy::unauthorized(req.headers());
    }
    let data: Vec<Value> = app
        .models
        .keys()
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "gateway"}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The caller's state under every rule that applies to it, charging nothing.
async fn ratelimit(State(app): State<Arc<App>>, req: Request) -> Response {
    let (mut parts, _) = req.into_parts();
    let Some(caller) = limits::caller(&app.callers, &RequestView::from_parts(&parts)).cloned()
    else {
        return proxy::unauthorized(&parts.headers);
    };
    let query = parts.uri.query().map(str::to_owned);
    let models: Vec<&Arc<ModelRoute>> = match query_param(query.as_deref(), "model") {
        Some(m) if app.models.contains_key(m) => app.models.get(m).into_iter().collect(),
        Some(m) => {
            return error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model_not_found"),
                Some("model"),
                format!("The model `{m}` does not exist or you do not have access to it."),
            )
        }
        None => app.models.values().collect(),
    };
    let mut seen = HashSet::new();
    let mut rules = Vec::new();
    // The per-model rules read the model the gate routed to: ask once per model, as if routed
    // to it.
    for model in models {
        parts.extensions.insert(proxy::Routed {
            model: Arc::clone(model),
        });
        let view = RequestView::from_parts(&parts);
        let statuses = match app.layer.status(view).await {
            Ok(s) => s,
            Err(e) => {
                let mut r = error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    Some("rate_limit_unavailable"),
                    None,
                    format!("Rate limiting is unavailable: {e}."),
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                return r;
            }
        };
        for s in statuses {
            // No key: the rule doesn't apply to this caller (its tier has no such limit, or
            // it is another model's).
            let Some(snapshot) = s.snapshot else { continue };
            if !seen.insert(s.rule.clone()) {
                continue;
            }
            let concurrency = s.quota.algorithm() == Algorithm::Concurrency;
            let period = match s.quota.algorithm() {
                Algorithm::Calendar(CalendarPeriod::Hour) => Some("hour"),
                Algorithm::Calendar(CalendarPeriod::Day) => Some("day"),
                Algorithm::Calendar(CalendarPeriod::Month) => Some("month"),
                _ => None,
            };
            let reset = Duration::from_nanos(snapshot.reset_after_nanos);
            // A model's adaptive capacity: its limit now (the controller's) and its bounds.
            let capacity = app
                .layer
                .rules()
                .iter()
                .find(|r| r.name() == s.rule)
                .and_then(|r| r.capacity_config())
                .map(|c| {
                    json!({
                        "current": snapshot.limit,
                        "in_flight": snapshot.limit.saturating_sub(snapshot.remaining),
                        "min": c.min(),
                        "max": c.max(),
                    })
                });
            let mut rule = json!({
                "rule": s.rule,
                "scope": if limits::rule_model(&s.rule).is_some() { "model" } else { "user" },
                "model": limits::rule_model(&s.rule),
                "unit": s.unit.as_str(),
                "kind": match (concurrency, period) {
                    (true, _) if capacity.is_some() => "capacity",
                    (true, _) => "concurrency",
                    (_, Some(_)) => "budget",
                    _ => "window",
                },
                "window_seconds": (!concurrency && period.is_none())
                    .then(|| s.quota.window().as_secs_f64()),
                // A budget's UTC calendar period: `day` or `month`.
                "period": period,
                "limit": snapshot.limit,
                "used": snapshot.limit.saturating_sub(snapshot.remaining),
                "remaining": snapshot.remaining,
                "reset": go_duration(reset),
                "reset_ms": reset.as_millis() as u64,
                "reset_seconds": reset.as_secs() + u64::from(reset.subsec_nanos() > 0),
                "resets_at": resets_at(reset),
            });
            if let Some(c) = capacity {
                rule["capacity"] = c;
            }
            rules.push(rule);
        }
    }
    let overrides: serde_json::Map<String, Value> = caller
        .overrides
        .iter()
        .map(|(name, v)| ((*name).to_owned(), json!(v)))
        .collect();
    Json(json!({
        "user": &*caller.user,
        "tier": &*caller.tier,
        "overrides": overrides,
        "rules": rules,
    }))
    .into_response()
}

/// When a reset `after` from now happens, RFC 3339 UTC to the second (rounded to the nearest:
/// a budget's reset is midnight or the 1st, and the snapshot was taken a moment ago).
fn resets_at(after: Duration) -> String {
    let at = SystemTime::now() + after;
    let since_epoch = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = (since_epoch + Duration::from_millis(500)).as_secs();
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

async fn metrics(State(app): State<Arc<App>>, req: axum::extract::Request) -> Response {
    let peer = app.dashboard.proxies.client(&req);
    if let Some(refused) = crate::dashboard::metrics_guard(&app, req.headers(), peer) {
        return refused;
    }
    let (text, content_type) = app.metrics.encode();
    ([(header::CONTENT_TYPE, content_type)], text).into_response()
}
