//! What the dashboard counts as requests pass: per model, per rule that refused, per user;
//! and the last five minutes as one sample a second.
//!
//! Fed by the same observer hooks as the Prometheus metrics (`metrics.rs` calls in here),
//! so that its totals equal theirs. Every table is bounded: models and rules by the
//! configuration (names that come from it), users by [`MAX_USERS`] (the least used tenth
//! makes room, in one pass), the samples by [`SAMPLES`]. In flight is not an observer count
//! but a guard ([`InFlight`]) the proxy holds until the answer's body ends.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tower_llm_ratelimit::observe::{SettleEvent, SettleOutcome};

/// Samples kept: five minutes of one a second.
pub(crate) const SAMPLES: usize = 300;
/// Users tracked for the table of top callers.
pub(crate) const MAX_USERS: usize = 1_000;

/// A model's counts since the gateway started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ModelTotals {
    /// Answers of its upstream (any status, unreachable, timeout): the requests that reached it.
    pub(crate) requests: u64,
    /// Admitted requests whose answer has not ended: counted up and down by one guard
    /// ([`InFlight`]) that the proxy holds until the response body ends, so that it can't
    /// drift (an admission the observer saw without a model, a fail-open admission).
    pub(crate) in_flight: u64,
    /// Requests the limiter refused (429).
    pub(crate) refused: u64,
    /// Tokens the upstream reported in `usage`.
    pub(crate) input_tokens: u64,
    pub(crate) output_tokens: u64,
}

impl ModelTotals {
    pub(crate) fn in_flight(&self) -> u64 {
        self.in_flight
    }
}

/// One admitted request of a model in flight, until this is dropped (with the response body).
#[derive(Debug)]
pub(crate) struct InFlight {
    board: Arc<super::Board>,
    model: Arc<str>,
}

impl InFlight {
    /// `model`'s request reached its upstream (the limiter admitted it): in flight until
    /// the returned guard drops.
    pub(crate) fn begin(board: &Arc<super::Board>, model: Arc<str>) -> Self {
        board.tally.with(|c| model_entry(c, &model).in_flight += 1);
        Self {
            board: Arc::clone(board),
            model,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.board.tally.with(|c| {
            let m = model_entry(c, &self.model);
            m.in_flight = m.in_flight.saturating_sub(1);
        });
    }
}

/// A user's counts since the gateway started (or since it was last tracked).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct UserTotals {
    pub(crate) requests: u64,
    pub(crate) tokens: u64,
}

/// One second of a model's traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Point {
    pub(crate) requests: u64,
    pub(crate) tokens: u64,
    pub(crate) refused: u64,
    pub(crate) in_flight: u64,
}

/// One sample: Unix time in milliseconds and each model's second.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sample {
    pub(crate) at_ms: u64,
    pub(crate) models: BTreeMap<String, Point>,
}

#[derive(Debug, Default)]
struct Counts {
    models: BTreeMap<String, ModelTotals>,
    /// Refusals (429) by the rule that refused.
    refused_by_rule: BTreeMap<String, u64>,
    /// Refusals (429) by model, then by the rule that refused.
    refused_by_model: BTreeMap<String, BTreeMap<String, u64>>,
    /// Refusals (429) whose request had no routed model by the time the limiter decided (the
    /// client left while a store call was pending and the decision ended in the background),
    /// by the rule that refused: with `refused_by_model`, they add up to `refused_by_rule`.
    unrouted_refused: BTreeMap<String, u64>,
    /// Requests refused before a decision, by reason (`missing_key`, `cost_error`).
    rejected: BTreeMap<&'static str, u64>,
    users: HashMap<String, UserTotals>,
    /// Shared with the snapshots: a poll copies 300 pointers under the lock, not 300 maps.
    samples: VecDeque<Arc<Sample>>,
    /// The totals at the last sample, to take differences from.
    last: BTreeMap<String, ModelTotals>,
    /// Samples taken since the start.
    taken: u64,
}

/// What the dashboard shows of the past, as one copy.
#[derive(Debug, Clone, Default)]
pub(crate) struct Snapshot {
    pub(crate) models: BTreeMap<String, ModelTotals>,
    pub(crate) refused_by_rule: BTreeMap<String, u64>,
    pub(crate) refused_by_model: BTreeMap<String, BTreeMap<String, u64>>,
    /// Refusals without a routed model, by rule.
    pub(crate) unrouted_refused: BTreeMap<String, u64>,
    pub(crate) rejected: BTreeMap<&'static str, u64>,
    /// The users with the most tokens, most first.
    pub(crate) top_users: Vec<(String, UserTotals)>,
    pub(crate) samples: Vec<Arc<Sample>>,
    pub(crate) taken: u64,
}

/// The live counts; one per process (it outlives reloads, as the metrics do).
#[derive(Debug, Default)]
pub(crate) struct Tally {
    counts: Mutex<Counts>,
}

impl Tally {
    fn with<R>(&self, f: impl FnOnce(&mut Counts) -> R) -> R {
        // A panic elsewhere while the lock was held leaves counts, not broken invariants.
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut counts)
    }

    /// The limiter refused a request routed to `model` by `rule` (`None`: a decision made
    /// without the request's context, counted apart from every model's).
    pub(crate) fn refused(&self, model: Option<&str>, rule: &str) {
        self.with(|c| {
            match model {
                Some(m) => {
                    model_entry(c, m).refused += 1;
                    let by_rule = match c.refused_by_model.get_mut(m) {
                        Some(r) => r,
                        None => c.refused_by_model.entry(m.to_owned()).or_default(),
                    };
                    count(by_rule, rule);
                }
                None => count(&mut c.unrouted_refused, rule),
            }
            count(&mut c.refused_by_rule, rule);
        });
    }

    /// The limiter rejected a request before deciding.
    pub(crate) fn rejected(&self, reason: &'static str) {
        self.with(|c| *c.rejected.entry(reason).or_default() += 1);
    }

    /// A model's upstream answered (or failed to).
    pub(crate) fn upstream(&self, model: &str) {
        self.with(|c| model_entry(c, model).requests += 1);
    }

    /// An admitted request settled: its tokens go to its model and to its user (the key of
    /// its `user-*` rules, when its tier has one).
    pub(crate) fn settled(&self, event: &SettleEvent<'_>) {
        let tokens = match event.outcome {
            SettleOutcome::Usage(u) => Some((u.input_tokens, u.output_tokens)),
            _ => None,
        };
        let user = event
            .rules
            .iter()
            .find(|r| r.rule.starts_with("user-"))
            .map(|r| String::from_utf8_lossy(r.key.as_bytes()));
        self.with(|c| {
            if let (Some(model), Some((input, output))) = (event.model, tokens) {
                let m = model_entry(c, model);
                m.input_tokens += input;
                m.output_tokens += output;
            }
            if let Some(user) = user.as_deref() {
                let spent = tokens.map_or(0, |(i, o)| i + o);
                let totals = match c.users.get_mut(user) {
                    Some(t) => t,
                    None => {
                        if c.users.len() >= MAX_USERS {
                            evict_least(&mut c.users, EVICT_BATCH);
                        }
                        c.users.entry(user.to_owned()).or_default()
                    }
                };
                totals.requests += 1;
                totals.tokens += spent;
            }
        });
    }

    /// Takes this second's sample, at `at_ms` (Unix time): the differences since the last.
    pub(crate) fn sample(&self, at_ms: u64) {
        self.with(|c| {
            let models = c
                .models
                .iter()
                .map(|(name, now)| {
                    let before = c.last.get(name).copied().unwrap_or_default();
                    let point = Point {
                        requests: now.requests.saturating_sub(before.requests),
                        tokens: (now.input_tokens + now.output_tokens)
                            .saturating_sub(before.input_tokens + before.output_tokens),
                        refused: now.refused.saturating_sub(before.refused),
                        in_flight: now.in_flight(),
                    };
                    (name.clone(), point)
                })
                .collect();
            c.last = c.models.clone();
            if c.samples.len() == SAMPLES {
                c.samples.pop_front();
            }
            c.samples.push_back(Arc::new(Sample { at_ms, models }));
            c.taken += 1;
        });
    }

    /// A copy of what the dashboard shows, with the `top` users by tokens.
    pub(crate) fn snapshot(&self, top: usize) -> Snapshot {
        self.with(|c| {
            let mut users: Vec<(String, UserTotals)> =
                c.users.iter().map(|(u, t)| (u.clone(), *t)).collect();
            users.sort_by(|a, b| b.1.tokens.cmp(&a.1.tokens).then_with(|| a.0.cmp(&b.0)));
            users.truncate(top);
            Snapshot {
                models: c.models.clone(),
                refused_by_rule: c.refused_by_rule.clone(),
                refused_by_model: c.refused_by_model.clone(),
                unrouted_refused: c.unrouted_refused.clone(),
                rejected: c.rejected.clone(),
                top_users: users,
                samples: c.samples.iter().cloned().collect(),
                taken: c.taken,
            }
        })
    }
}

/// One more for `rule` (rule names come from the configuration: the map stays small).
fn count(by_rule: &mut BTreeMap<String, u64>, rule: &str) {
    match by_rule.get_mut(rule) {
        Some(n) => *n += 1,
        None => {
            by_rule.insert(rule.to_owned(), 1);
        }
    }
}

fn model_entry<'a>(c: &'a mut Counts, model: &str) -> &'a mut ModelTotals {
    // Model names come from the configuration (the routed model), so this map stays as small
    // as the configured models (plus those removed by a reload).
    if !c.models.contains_key(model) {
        c.models.insert(model.to_owned(), ModelTotals::default());
    }
    c.models.get_mut(model).expect("inserted above")
}

/// Users dropped at once when the table is full: one pass over it makes room for this many
/// new users (not one pass, under the lock, for each).
const EVICT_BATCH: usize = MAX_USERS / 10;

/// Drops the `n` users with the fewest tokens, to make room for new ones.
fn evict_least(users: &mut HashMap<String, UserTotals>, n: usize) {
    let n = n.min(users.len());
    if n == 0 {
        return;
    }
    let mut by_use: Vec<((u64, u64), &String)> = users
        .iter()
        .map(|(u, t)| ((t.tokens, t.requests), u))
        .collect();
    by_use.select_nth_unstable_by_key(n - 1, |(used, _)| *used);
    let least: Vec<String> = by_use[..n].iter().map(|(_, u)| (*u).clone()).collect();
    for u in least {
        users.remove(&u);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_differences_and_keep_five_minutes() {
        let t = Tally::default();
        t.upstream("m");
        t.upstream("m");
        t.refused(Some("m"), "user-rpm");
        t.sample(1_000);
        t.upstream("m");
        t.sample(2_000);
        let s = t.snapshot(10);
        assert_eq!(s.samples[0].models["m"].requests, 2);
        assert_eq!(s.samples[0].models["m"].refused, 1);
        assert_eq!(s.samples[1].models["m"].requests, 1);
        assert_eq!(s.samples[1].models["m"].refused, 0);
        assert_eq!(s.refused_by_rule["user-rpm"], 1);
        assert_eq!(s.refused_by_model["m"]["user-rpm"], 1);
        for i in 0..(SAMPLES as u64 + 5) {
            t.sample(3_000 + i);
        }
        let s = t.snapshot(10);
        assert_eq!(s.samples.len(), SAMPLES);
        assert_eq!(s.samples[0].at_ms, 3_005);
        assert_eq!(s.taken, SAMPLES as u64 + 7);
    }

    /// A refusal decided without a routed model is counted apart: under no model, not even
    /// one configured as `(unknown)`, and still in the refusals by rule.
    #[test]
    fn unrouted_refusals_are_their_own_count() {
        let t = Tally::default();
        t.refused(Some("(unknown)"), "model-rpm");
        t.refused(None, "user-rpm");
        t.refused(None, "user-rpm");
        t.sample(1_000);
        let s = t.snapshot(10);
        assert_eq!(s.unrouted_refused.len(), 1);
        assert_eq!(s.unrouted_refused["user-rpm"], 2);
        assert_eq!(s.models["(unknown)"].refused, 1);
        assert_eq!(s.refused_by_model.len(), 1);
        assert_eq!(s.refused_by_model["(unknown)"].len(), 1);
        assert_eq!(s.refused_by_model["(unknown)"]["model-rpm"], 1);
        assert_eq!(s.samples[0].models.len(), 1);
        assert_eq!(s.samples[0].models["(unknown)"].refused, 1);
        assert_eq!(s.refused_by_rule["user-rpm"], 2);
    }

    #[test]
    fn users_are_bounded_and_the_least_used_makes_room() {
        let mut users = HashMap::new();
        for i in 0..MAX_USERS as u64 {
            users.insert(
                format!("u{i}"),
                UserTotals {
                    requests: 1,
                    tokens: i + 1,
                },
            );
        }
        evict_least(&mut users, 1);
        assert_eq!(users.len(), MAX_USERS - 1);
        assert!(!users.contains_key("u0"));
        evict_least(&mut users, EVICT_BATCH);
        assert_eq!(users.len(), MAX_USERS - 1 - EVICT_BATCH);
        for i in 0..=EVICT_BATCH {
            assert!(!users.contains_key(&format!("u{i}")), "u{i}");
        }
        assert!(users.contains_key(&format!("u{}", EVICT_BATCH + 1)));
    }
}
