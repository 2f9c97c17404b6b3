//! The numbers `GET /dashboard/data` answers: the tally's totals and samples, and each
//! limit's use as the layer's status reads it (the same reading as `/v1/ratelimit`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tower_llm_ratelimit::key::RequestView;
use tower_llm_ratelimit::Algorithm;

use crate::config;
use crate::limits;
use crate::proxy;
use crate::server::App;

/// Users in the table of top callers.
const TOP_USERS: usize = 10;

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One limit's state for the page: its rule, unit, kind, limit and use.
fn limit_json(s: &tower_llm_ratelimit::RuleStatus) -> Option<Value> {
    let snapshot = s.snapshot.as_ref()?;
    let kind = match s.quota.algorithm() {
        Algorithm::Concurrency => "concurrency",
        Algorithm::Calendar(_) => "budget",
        _ => "window",
    };
    Some(json!({
        "rule": s.rule,
        "unit": s.unit.as_str(),
        "kind": kind,
        "limit": snapshot.limit,
        "used": snapshot.limit.saturating_sub(snapshot.remaining),
    }))
}

/// The refusals decided without a routed model (`tally::Tally::refused`): their total and
/// their count by rule.
fn unrouted_refusals(past: &super::tally::Snapshot) -> Value {
    json!({
        "total": past.unrouted_refused.values().sum::<u64>(),
        "by_rule": past.unrouted_refused,
    })
}

/// The layer's status for a request of `parts`; `None` when the store fails, its error then
/// kept in `store_error`. Once it is set, the store is not asked again in this poll (each
/// call would wait for the store's timeout): `None` too.
async fn status(
    app: &App,
    parts: &http::request::Parts,
    store_error: &mut Option<String>,
) -> Option<Vec<tower_llm_ratelimit::RuleStatus>> {
    if store_error.is_some() {
        return None;
    }
    match app.layer.status(RequestView::from_parts(parts)).await {
        Ok(s) => Some(s),
        Err(e) => {
            *store_error = Some(e.to_string());
            None
        }
    }
}

/// The numbers `/dashboard/data` answers. A store that can't be read (Redis down) blanks
/// only the limits' use (`limits: null`, the error in `store_error`): the counts are this
/// process's own and still shown.
pub(crate) async fn numbers(app: &App) -> Value {
    let mut store_error: Option<String> = None;
    let board = &app.metrics.board;
    let past = board.tally.snapshot(TOP_USERS);
    let served = board.served.fetch_add(1, Ordering::Relaxed) + 1;

    let mut models = Vec::new();
    for (name, route) in &app.models {
        let (mut parts, ()) = http::Request::new(()).into_parts();
        parts.extensions.insert(proxy::Routed {
            model: Arc::clone(route),
        });
        let statuses = status(app, &parts, &mut store_error).await;
        let statuses = statuses.as_deref().unwrap_or_default();
        let limits: Option<Vec<Value>> = store_error.is_none().then(|| {
            statuses
                .iter()
                .filter(|s| limits::rule_model(&s.rule) == Some(name.as_str()))
                .filter_map(limit_json)
                .collect()
        });
        // The model's adaptive capacity (`[models.NAME.capacity]`): the limit its controller
        // holds now, the one the capacity rule's status reports.
        let capacity = statuses
            .iter()
            .filter(|s| limits::rule_model(&s.rule) == Some(name.as_str()))
            .find(|s| {
                app.layer
                    .rules()
                    .iter()
                    .any(|r| r.name() == s.rule && r.capacity_config().is_some())
            })
            .and_then(|s| s.snapshot.as_ref())
            .map(|snapshot| snapshot.limit);
        let totals = past.models.get(name).copied().unwrap_or_default();
        let last = past
            .samples
            .last()
            .and_then(|s| s.models.get(name).copied());
        let tokens_last_minute: u64 = past
            .samples
            .iter()
            .rev()
            .take(60)
            .filter_map(|s| s.models.get(name))
            .map(|p| p.tokens)
            .sum();
        models.push(json!({
            "name": name,
            "requests_per_second": last.map_or(0, |p| p.requests),
            "tokens_last_minute": tokens_last_minute,
            "in_flight": totals.in_flight(),
            // Without an adaptive capacity `null`: the page shows in flight against the
            // `concurrent` limit, if any.
            "capacity": capacity,
            "totals": {
                "requests": totals.requests,
                "refused": totals.refused,
                "refused_by_rule": past.refused_by_model.get(name).cloned().unwrap_or_default(),
                "input_tokens": totals.input_tokens,
                "output_tokens": totals.output_tokens,
            },
            "limits": limits,
        }));
    }

    // Each tracked user's limits: the callers' table, and the tiers' (the most any of a
    // tier's tracked users uses of each limit).
    let mut callers = Vec::new();
    let mut tiers: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
    // Each tier's users: those its keys name (a user's keys share its tier), not only the
    // top callers.
    let mut tier_users: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (_, caller) in app.callers.iter() {
        tier_users
            .entry(&caller.tier)
            .or_default()
            .insert(&caller.user);
    }
    for (user, totals) in &past.top_users {
        let keys: Vec<(&tower_llm_ratelimit::key::Key, &limits::Caller)> = app
            .callers
            .iter()
            .filter(|(_, c)| &*c.user == user.as_str())
            .collect();
        // A user no key of the running configuration names (a reload removed it).
        let Some((_, caller)) = keys.first() else {
            continue;
        };
        let masked: Vec<String> = keys
            .iter()
            .map(|(k, _)| config::masked_key(&String::from_utf8_lossy(k.as_bytes())))
            .collect();
        let (mut parts, ()) = http::Request::new(()).into_parts();
        parts.extensions.insert((*caller).clone());
        let statuses = status(app, &parts, &mut store_error).await;
        let limits: Option<Vec<Value>> = statuses.map(|statuses| {
            statuses
                .iter()
                .filter(|s| limits::rule_model(&s.rule).is_none())
                .filter_map(limit_json)
                .collect()
        });
        let tier = tiers.entry(caller.tier.to_string()).or_default();
        for l in limits.iter().flatten() {
            let rule = l["rule"].as_str().unwrap_or_default().to_owned();
            let busier = tier
                .get(&rule)
                .is_none_or(|b| b["used"].as_u64() < l["used"].as_u64());
            if busier {
                tier.insert(rule, l.clone());
            }
        }
        callers.push(json!({
            "user": user,
            "tier": &*caller.tier,
            "keys": masked,
            "requests": totals.requests,
            "tokens": totals.tokens,
            "limits": limits,
        }));
    }
    let tiers: Vec<Value> = app
        .dashboard
        .tiers
        .iter()
        .map(|(name, configured)| {
            json!({
                "name": name,
                "configured": configured,
                "users": tier_users.get(name.as_str()).map_or(0, BTreeSet::len),
                "limits": tiers.remove(name).map_or_else(Vec::new, |l| l.into_values().collect()),
            })
        })
        .collect();

    let series: Vec<Value> = past
        .samples
        .iter()
        .map(|s| {
            let models: serde_json::Map<String, Value> = s
                .models
                .iter()
                .map(|(m, p)| {
                    (
                        m.clone(),
                        json!([p.requests, p.tokens, p.refused, p.in_flight]),
                    )
                })
                .collect();
            json!({"at_ms": s.at_ms, "models": models})
        })
        .collect();

    json!({
        "served": served,
        // The store's error when the limits' use could not be read (their `limits` are
        // `null` then); `null` otherwise.
        "store_error": store_error,
        "generated_at_ms": unix_ms(),
        "samples_taken": past.taken,
        "models": models,
        "tiers": tiers,
        "callers": callers,
        "refused_by_rule": past.refused_by_rule,
        // Refusals of requests without a routed model, apart from every model's (they are
        // in `refused_by_rule` too).
        "unrouted_refusals": unrouted_refusals(&past),
        "rejected": past.rejected,
        // Each sample: per model, [requests, tokens, refused, in flight] in that second.
        "series": series,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::tally::Tally;

    #[test]
    fn unrouted_refusals_are_shown_apart() {
        let t = Tally::default();
        t.refused(Some("(unknown)"), "model-rpm");
        t.refused(None, "user-rpm");
        t.refused(None, "user-rpm");
        t.refused(None, "user-tpm");
        assert_eq!(
            super::unrouted_refusals(&t.snapshot(10)),
            json!({"total": 3, "by_rule": {"user-rpm": 2, "user-tpm": 1}})
        );
        assert_eq!(
            super::unrouted_refusals(&Tally::default().snapshot(10)),
            json!({"total": 0, "by_rule": {}})
        );
    }
}
