//! Seeing every decision: a hook for metrics, audit logs and dashboards.
//!
//! An [`Observer`] set with [`crate::RateLimitLayerBuilder::observer`] is called once per
//! request that reaches a decision, with a [`DecisionEvent`]: the caller's tier, the outcome
//! and, per rule, the cost charged (or that would have been), the limit and what remains.
//! [`Observer::on_settle`] then sees the settlement ([`SettleEvent`]) of each admitted
//! request the layer settles: how it ended ([`SettleOutcome`]: the [`Usage`] the response
//! reported, input and output tokens, or none, or a failure), the estimate charged per rule
//! and what it really cost, for "tokens estimated vs settled" metrics, labelled with the
//! caller's tier, the request's model ([`ModelLabel`], else the body's `model` when the
//! layer parsed the body) and each bucket's key.
//!
//! By default the layer settles requests with token or concurrency charges or an
//! idempotency id (or all of them under `count_failed_requests(false)`), and reads `usage`
//! only from the responses of requests with token rules; it does not settle a request
//! admitted by the store failure policy ([`crate::FailurePolicy::Open`]). An observer whose
//! [`Observer::observes_usage`] answers `true` hears every admitted request's settlement,
//! each successful response's `usage` read once for the limiter and the observer: the
//! source of a "tokens by model" metric over every answer (a gateway needs no parser of its
//! own). A free retry of an idempotent request
//! ([Idempotent retries](crate::store#idempotent-retries)) reports its request rules as
//! charged 0. Both hooks run on the request's path (`on_settle` where the response body
//! ends): keep them cheap (increment counters, don't do I/O).
//!
//! An observer whose [`Observer::observes_store_calls`] answers `true` also hears each call
//! to the store on a request's path ([`StoreCallEvent`]: acquire, settle, a failed attempt's
//! record), how long it took by the layer's clock
//! ([`crate::RateLimitLayerBuilder::clock`]) and how it failed, if it did. The layer reads
//! no clock for the others.
//!
//! With the `metrics` feature, `RateLimitLayerBuilder::metrics` adds a built-in observer
//! that records all of this through the `metrics` facade (the crate's `metrics` module lists
//! what it records), beside the observer set here, if any.
//!
//! Independently, the layer emits `tracing` events (target `tower_llm_ratelimit`): a
//! `DEBUG` event per denial naming the rule, key and retry delay (fields `rule`, `key`,
//! `tier`, `cost`, `remaining`, `retry_after_ms`), and a `WARN` event per store failure
//! (`error`, and for a decision `admitted`: what the failure policy did).
//!
//! # Examples
//!
//! ```
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use std::sync::Arc;
//! use tower_llm_ratelimit::observe::{DecisionEvent, Outcome};
//! use tower_llm_ratelimit::{key, Quota, RateLimitLayer, Rule};
//!
//! let denied = Arc::new(AtomicU64::new(0));
//! let counter = denied.clone();
//! let layer = RateLimitLayer::builder()
//!     .rule(Rule::new("ip-rps", key::global(), Quota::per_second(10)))
//!     .observer(move |event: &DecisionEvent<'_>| {
//!         if let Outcome::Denied { .. } = event.outcome {
//!             counter.fetch_add(1, Ordering::Relaxed);
//!         }
//!     })
//!     .build()
//!     .unwrap();
//! # let _ = layer;
//! ```

use std::fmt;
use std::time::Duration;

pub use crate::capacity::Change;
use crate::cost::usage::Usage;
use crate::key::Key;
use crate::rule::Unit;
use crate::store::StoreError;

/// What happened to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome<'a> {
    /// Every rule admitted it; all were charged.
    Admitted,
    /// A rule denied it; nothing was charged.
    Denied {
        /// The rule that denied: the rule's own name, also when the tier's own bucket of a
        /// capacity denied (whose [`RuleDecision::rule`] entry is `{rule}#{tier}`).
        rule: &'a str,
        /// How long until it could pass; `None` when its cost exceeds the limit.
        retry_after: Option<Duration>,
    },
    /// A rule's key was missing and its policy is to reject, or a rule keyed by the body
    /// met a body it can't use (too large, not JSON) and refused it.
    MissingKey {
        /// The rule.
        rule: &'a str,
    },
    /// The request's cost could not be estimated.
    CostError,
    /// The store failed; `admitted` tells what the failure policy did.
    StoreError {
        /// True under [`crate::FailurePolicy::Open`].
        admitted: bool,
    },
}

/// One rule's part in a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleDecision<'a> {
    /// The rule's name; for the tier's own bucket of a capacity with tiers,
    /// `{rule}#{tier}` (`{rule}#` for a caller of no listed tier: see [`crate::capacity`]).
    pub rule: &'a str,
    /// The bucket's key.
    pub key: &'a Key,
    /// What the rule counts.
    pub unit: Unit,
    /// Units charged (or that would have been, on a denial).
    pub cost: u64,
    /// The limit applied (tier resolved).
    pub limit: u64,
    /// What remains after the decision.
    pub remaining: u64,
    /// True for the rule that denied.
    pub denied: bool,
}

/// One request's decision.
#[derive(Debug, Clone, Copy)]
pub struct DecisionEvent<'a> {
    /// The caller's tier, if any.
    pub tier: Option<&'a str>,
    /// The outcome.
    pub outcome: Outcome<'a>,
    /// The rules that were checked (empty unless the store decided).
    pub rules: &'a [RuleDecision<'a>],
}

/// How an admitted request ended, as its settlement saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SettleOutcome {
    /// The response reported this usage.
    Usage(Usage),
    /// The response ended (or was cut off) without usage; `streamed` bytes went out.
    NoUsage {
        /// Bytes of response body seen.
        streamed: u64,
    },
    /// The upstream failed (HTTP >= 400, gRPC error, service error).
    Failed,
    /// The request was dropped before any response (client gone).
    Dropped,
}

/// One rule's settlement: what was charged before admission and what it really cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SettledRule<'a> {
    /// The rule's name.
    pub rule: &'a str,
    /// The bucket's key (whose request it was: the user, the model, ...).
    pub key: &'a Key,
    /// What the rule counts.
    pub unit: Unit,
    /// Units charged at admission (the estimate).
    pub charged: u64,
    /// Units after settlement (equal to `charged` when nothing changed).
    pub actual: u64,
}

/// One admitted request's settlement.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct SettleEvent<'a> {
    /// The caller's tier, if any (as in its [`DecisionEvent`]).
    pub tier: Option<&'a str>,
    /// The request's model: its [`ModelLabel`] extension when it has one, else the `model`
    /// of its JSON body when the layer parsed the body (a rule or the estimate reads it, and
    /// it fits in `max_inspect_bytes`) and estimated tokens from it or has an observer that
    /// [observes usage](Observer::observes_usage): a label for "tokens by model" metrics
    /// with no second parse of the request or of the response.
    pub model: Option<&'a str>,
    /// How the request ended.
    pub outcome: SettleOutcome,
    /// Every charge of the request, settled.
    pub rules: &'a [SettledRule<'a>],
}

/// An adaptive bucket's capacity changed (see [`crate::capacity`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CapacityEvent<'a> {
    /// The rule's name.
    pub rule: &'a str,
    /// The bucket's key (this replica's: `{key}@{replica}`).
    pub key: &'a Key,
    /// The limit before.
    pub old: u64,
    /// The limit now.
    pub new: u64,
    /// Why.
    pub change: Change,
}

/// How a wait in a capacity's queue ended, or that one began (see [`crate::capacity`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueueOutcome {
    /// A slot came back in time: the request was admitted.
    Admitted,
    /// The deadline (the tier's `max_wait`) passed: refused with 429.
    TimedOut,
    /// The queue was full: refused at once, without waiting.
    Full,
    /// The client went away while waiting.
    Left,
    /// Woken, it was refused by something other than the capacity (another rule, a
    /// store error): it left the queue with that answer.
    Refused,
    /// It entered the queue to wait (`waited` is about zero, `waiting` counts it): exactly
    /// one other event tells how the wait ends (`Admitted` at once if its first retry, made
    /// on entering, gets in). A queue length gauge goes up here and down at that end. (An
    /// observer that counted every event as a finished wait, before this variant, now
    /// counts each wait twice: filter with [`QueueOutcome::ends_a_wait`].)
    Entered,
}

impl QueueOutcome {
    /// A short lower-case name (`admitted`, `timed_out`, `full`, `left`, `refused`,
    /// `entered`), for a metric's label or a log.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueOutcome::Admitted => "admitted",
            QueueOutcome::TimedOut => "timed_out",
            QueueOutcome::Full => "full",
            QueueOutcome::Left => "left",
            QueueOutcome::Refused => "refused",
            QueueOutcome::Entered => "entered",
        }
    }

    /// Whether the event ends a wait (or a request's attempt to wait): all but
    /// [`QueueOutcome::Entered`].
    pub fn ends_a_wait(self) -> bool {
        self != QueueOutcome::Entered
    }
}

/// A request entered a capacity's queue, or left it (or found it full).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueEvent<'a> {
    /// The rule's name.
    pub rule: &'a str,
    /// The bucket's key (this replica's).
    pub key: &'a Key,
    /// The caller's tier.
    pub tier: Option<&'a str>,
    /// How the wait ended (or [`QueueOutcome::Entered`]: it begins).
    pub outcome: QueueOutcome,
    /// How long it waited.
    pub waited: Duration,
    /// Requests still waiting in this bucket's queue.
    pub waiting: usize,
}

/// Which call to the store a [`StoreCallEvent`] times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreCall {
    /// Deciding a request: [`crate::store::Store::acquire`] (or `acquire_once`, for a
    /// request with an idempotency id); a second attempt (a capacity's reserve, a retry from
    /// its queue) is a call of its own.
    Acquire,
    /// Correcting an admitted request's charges: [`crate::store::Store::settle`].
    Settle,
    /// Recording a failed idempotent attempt: [`crate::store::Store::fail_attempt`].
    FailAttempt,
}

impl StoreCall {
    /// `acquire`, `settle` or `fail_attempt`: a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreCall::Acquire => "acquire",
            StoreCall::Settle => "settle",
            StoreCall::FailAttempt => "fail_attempt",
        }
    }
}

/// One call to the store, timed (see [`Observer::observes_store_calls`]).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct StoreCallEvent<'a> {
    /// Which call.
    pub call: StoreCall,
    /// From the call to its answer, by the layer's clock
    /// ([`crate::RateLimitLayerBuilder::clock`]). A store doing I/O is timed to the end of
    /// its future (a decision whose client left is timed in the background).
    pub elapsed: Duration,
    /// Why it failed, if it did.
    pub error: Option<&'a StoreError>,
}

/// Sees every decision, and the settlements (see the [module docs](self) for which requests
/// are settled). Closures `Fn(&DecisionEvent)` are observers (of decisions only).
pub trait Observer: Send + Sync + 'static {
    /// Called once per decided request.
    fn on_decision(&self, event: &DecisionEvent<'_>);

    /// Called once per admitted request that had something to settle (token or concurrency
    /// rules, or an idempotency id; not a store-failure admission), when its response ended
    /// or was dropped: estimated vs real tokens for metrics. With
    /// [`observes_usage`](Self::observes_usage), once per admitted request.
    fn on_settle(&self, event: &SettleEvent<'_>) {
        let _ = event;
    }

    /// Called when the controller of an adaptive bucket changes its limit (at most once per
    /// interval and bucket), from the path of the response that completed the interval.
    fn on_capacity(&self, event: &CapacityEvent<'_>) {
        let _ = event;
    }

    /// Called when a request enters a capacity's queue, leaves it, or finds it full: a queue
    /// wait histogram (of the events that end a wait, [`QueueOutcome::ends_a_wait`]),
    /// requests shed by tier, the queue's length.
    fn on_queue(&self, event: &QueueEvent<'_>) {
        let _ = event;
    }

    /// Called after each call to the store on a request's path, with how long it took and
    /// its error, if any; only for an observer whose
    /// [`observes_store_calls`](Self::observes_store_calls) answers `true`. Reads of
    /// [`crate::RateLimitLayer::status`] are not reported.
    fn on_store_call(&self, event: &StoreCallEvent<'_>) {
        let _ = event;
    }

    /// Whether this observer wants [`on_store_call`](Self::on_store_call) called (default
    /// `false`: the layer then reads no clock around its store calls).
    fn observes_store_calls(&self) -> bool {
        false
    }

    /// Whether this observer wants [`on_settle`](Self::on_settle) called (default `true`).
    /// The layer builds no settlement event (nor keeps its labels) for one that doesn't:
    /// closures, which observe decisions only, answer `false`.
    fn observes_settlements(&self) -> bool {
        true
    }

    /// Whether this observer wants the usage of **every** admitted response (default
    /// `false`; only with [`observes_settlements`](Self::observes_settlements)).
    ///
    /// By default the layer reads a response's `usage` only when the request has token
    /// rules to settle. An observer answering `true` makes it watch every successful
    /// response, and settle every admitted request (those of request-only rules, and those
    /// admitted by [`crate::FailurePolicy::Open`] while the store is down, whose event has
    /// no rules): [`on_settle`](Self::on_settle) then hears the usage of every answer, read
    /// once for the token rules and the observer together. A gateway's "tokens by model"
    /// metric needs no parser of its own. The cost: a settlement (two small allocations)
    /// per request that had none, and the usage search (a few comparisons per chunk) on
    /// every response.
    fn observes_usage(&self) -> bool {
        false
    }
}

/// A request extension naming the request's model for the [`SettleEvent::model`] label,
/// in place of the body's `model`.
///
/// The layer reads the body's `model` only when it parsed the body (a rule or the estimate
/// reads it, and it fits in `max_inspect_bytes`). A gateway that routes requests by model
/// knows it for every request: set this before the layer, and the settlement of each request
/// is labelled with it, whatever the body's size. It labels the observer's events only; the
/// [`crate::cost::Weights`] of a `cost` rule still read the body's `model`.
///
/// # Examples
///
/// ```
/// use http::Request;
/// use tower_llm_ratelimit::observe::ModelLabel;
///
/// let mut req = Request::new(());
/// req.extensions_mut().insert(ModelLabel::new("gpt-4o"));
/// assert_eq!(req.extensions().get::<ModelLabel>().unwrap().as_str(), "gpt-4o");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelLabel(std::sync::Arc<str>);

impl ModelLabel {
    /// A label naming `model`.
    pub fn new(model: impl Into<std::sync::Arc<str>>) -> Self {
        Self(model.into())
    }

    /// The model's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<F> Observer for F
where
    F: Fn(&DecisionEvent<'_>) + Send + Sync + 'static,
{
    fn on_decision(&self, event: &DecisionEvent<'_>) {
        self(event)
    }

    fn observes_settlements(&self) -> bool {
        false
    }
}

pub(crate) struct ObserverDebug<'a>(pub(crate) &'a Option<std::sync::Arc<dyn Observer>>);

impl fmt::Debug for ObserverDebug<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() { "Some(..)" } else { "None" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A closure observes decisions only, so the layer builds it no settlement events; an
    /// `Observer` gets them unless it says otherwise.
    #[test]
    fn closures_observe_decisions_only() {
        struct Both;
        impl Observer for Both {
            fn on_decision(&self, _: &DecisionEvent<'_>) {}
        }
        let closure = |_: &DecisionEvent<'_>| {};
        assert!(!Observer::observes_settlements(&closure));
        assert!(Both.observes_settlements());
        // The usage of every response is asked for, never assumed.
        assert!(!Observer::observes_usage(&closure));
        assert!(!Both.observes_usage());
        // Nor is the time of store calls.
        assert!(!Observer::observes_store_calls(&closure));
        assert!(!Both.observes_store_calls());
    }
}
