//! Adaptive capacity per model and priority per tier: `[models.NAME.capacity]` and the
//! tiers' `priority`, `capacity_share` and `max_wait_ms`, checked (each problem naming its
//! field) and turned into the library's [`Capacity`] of the model's `model-capacity:NAME`
//! rule (see `limits.rs`).
//!
//! The rule counts the requests in flight to the model, at a limit that a controller moves
//! with the model server's answers: down on 429/502/503/504, failures, a time to first byte
//! past the server's knee (its calm latency times `latency_tolerance`) or past the target;
//! up while answers are calm and the limit is in use; between `min` and `max`. Past `saturation x` the current limit, each tier with a `capacity_share` keeps
//! that share of it and the others are shed (429) first; a tier with `max_wait_ms` waits
//! that long in the model's queue for a slot (by `priority`, then arrival) before its 429.
//!
//! A user whose keys override limits of its tier is limited as a tier of its own,
//! `TIER+USER` (see `limits.rs`): under the capacity it takes its tier's place
//! ([`Capacity::tier_as`]): its priority, its wait, and a part of its reserved share, which
//! all the tier's callers hold together.

use std::time::Duration;

use serde::Deserialize;
use tower_llm_ratelimit::capacity::{Capacity, Priority};

use crate::config::{Config, TierConfig};

/// `[models.NAME.capacity]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct CapacityConfig {
    pub(crate) enabled: bool,
    pub(crate) min: u64,
    /// Required.
    pub(crate) max: Option<u64>,
    pub(crate) initial: Option<u64>,
    pub(crate) latency_target_ms: Option<u64>,
    pub(crate) latency_tolerance: f64,
    pub(crate) saturation: f64,
    pub(crate) interval_ms: u64,
    pub(crate) decrease: f64,
    pub(crate) baseline_window_secs: u64,
    pub(crate) queue_len: usize,
}

impl Default for CapacityConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            min: 1,
            max: None,
            initial: None,
            latency_target_ms: None,
            latency_tolerance: 1.05,
            saturation: 0.8,
            interval_ms: 1_000,
            decrease: 0.8,
            baseline_window_secs: 10,
            queue_len: 64,
        }
    }
}

/// The longest queue of a model's capacity (each waiter is a request held in memory).
const MAX_QUEUE_LEN: usize = 10_000;

/// The longest a tier may wait for a slot: a minute (a client waiting longer has gone).
const MAX_WAIT_MS: u64 = 60_000;

/// Every problem of the models' capacities and the tiers' priorities, each naming its field.
pub(crate) fn problems(cfg: &Config, err: &mut impl FnMut(String, String)) {
    for (name, m) in &cfg.models {
        let Some(c) = &m.capacity else { continue };
        let at = |f: &str| format!("models.{name}.capacity.{f}");
        let Some(max) = c.max else {
            err(
                at("max"),
                "is required: the most requests in flight the limit may reach".into(),
            );
            continue;
        };
        if c.min == 0 {
            err(at("min"), "must be > 0".into());
        }
        if max == 0 {
            err(at("max"), "must be > 0".into());
        }
        if c.min > max {
            err(
                at("min"),
                format!("must be at most max ({max}), got {}", c.min),
            );
        }
        if let Some(i) = c.initial.filter(|&i| i < c.min || i > max) {
            err(
                at("initial"),
                format!("must be within [min, max] = [{}, {max}], got {i}", c.min),
            );
        }
        if c.latency_target_ms == Some(0) {
            err(
                at("latency_target_ms"),
                "must be > 0 (omit it for no target)".into(),
            );
        }
        if c.latency_tolerance.is_nan() || c.latency_tolerance <= 1.0 {
            err(
                at("latency_tolerance"),
                format!("must be > 1, got {}", c.latency_tolerance),
            );
        }
        if !(c.saturation > 0.0 && c.saturation <= 1.0) {
            err(
                at("saturation"),
                format!("must be in (0, 1], got {}", c.saturation),
            );
        }
        if c.interval_ms == 0 {
            err(at("interval_ms"), "must be > 0".into());
        }
        if !(c.decrease > 0.0 && c.decrease < 1.0) {
            err(
                at("decrease"),
                format!("must be in (0, 1), got {}", c.decrease),
            );
        }
        // 0 would silently turn every tier's max_wait_ms off.
        if !(1..=MAX_QUEUE_LEN).contains(&c.queue_len) {
            err(
                at("queue_len"),
                format!("must be within [1, {MAX_QUEUE_LEN}], got {}", c.queue_len),
            );
        }
        if c.baseline_window_secs == 0 {
            err(at("baseline_window_secs"), "must be > 0".into());
        }
        for (field, v) in [
            ("interval_ms", c.interval_ms / 1000),
            ("baseline_window_secs", c.baseline_window_secs),
            ("latency_target_ms", c.latency_target_ms.unwrap_or(0) / 1000),
        ] {
            if v > crate::config::MAX_TIMEOUT_SECS {
                err(at(field), "must be at most a year".into());
            }
        }
    }
    let mut total = 0.0;
    for (name, t) in &cfg.tiers {
        let at = |f: &str| format!("tiers.{name}.{f}");
        if let Some(s) = t.capacity_share {
            if !(s > 0.0 && s <= 1.0) {
                err(at("capacity_share"), format!("must be in (0, 1], got {s}"));
            } else {
                total += s;
            }
        }
        if let Some(w) = t.max_wait_ms {
            if w == 0 || w > MAX_WAIT_MS {
                err(
                    at("max_wait_ms"),
                    format!("must be in [1, {MAX_WAIT_MS}] (omit it for no wait), got {w}"),
                );
            }
        }
    }
    if total > 1.0 + 1e-9 {
        let shares: Vec<String> = cfg
            .tiers
            .iter()
            .filter_map(|(n, t)| Some(format!("{n} {}", t.capacity_share?)))
            .collect();
        err(
            "tiers.*.capacity_share".into(),
            format!(
                "the tiers' shares add up to {total}, more than 1 ({})",
                shares.join(", ")
            ),
        );
    }
}

/// Whether `tier` sets anything of priority.
pub(crate) fn has_priority(t: &TierConfig) -> bool {
    t.priority.is_some() || t.capacity_share.is_some() || t.max_wait_ms.is_some()
}

/// The capacity of model `model`'s rule, if it has one (and it is enabled): its controller
/// settings, and a [`Priority`] for each tier (of `limit_tiers`, the tiers the limiter
/// knows, `TIER+USER` ones included) that sets one. `base` is the tier of each limit tier.
pub(crate) fn of_model(
    cfg: &Config,
    model: &str,
    limit_tiers: &[(String, &str)],
) -> Option<Capacity> {
    let c = cfg.models.get(model)?.capacity.as_ref()?;
    if !c.enabled {
        return None;
    }
    let max = c.max?;
    let mut cap = Capacity::adaptive(c.min, max)
        .latency_tolerance(c.latency_tolerance)
        .saturation(c.saturation)
        .interval(Duration::from_millis(c.interval_ms))
        .decrease(c.decrease)
        .baseline_window(Duration::from_secs(c.baseline_window_secs))
        .queue_len(c.queue_len);
    if let Some(i) = c.initial {
        cap = cap.initial(i);
    }
    if let Some(ms) = c.latency_target_ms {
        cap = cap.latency_target(Duration::from_millis(ms));
    }
    for (limits, base) in limit_tiers {
        let Some(t) = cfg.tiers.get(*base).filter(|t| has_priority(t)) else {
            continue;
        };
        if limits != base {
            // A user's own tier takes its tier's place: see the module docs.
            cap = cap.tier_as(limits.as_str(), *base);
            continue;
        }
        let mut p = Priority::new(t.priority.unwrap_or(0)).reserve(t.capacity_share.unwrap_or(0.0));
        if let Some(ms) = t.max_wait_ms {
            p = p.max_wait(Duration::from_millis(ms));
        }
        cap = cap.tier(limits.as_str(), p);
    }
    Some(cap)
}
