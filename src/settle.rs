//! Settling an admitted request: correcting token charges to the real usage and releasing
//! concurrency slots, exactly once, on every path.
//!
//! The service hands a settlement to the response future. When the inner service answers, the
//! response body is wrapped ([`crate::ResponseBody`]) to watch for `usage` as the bytes stream
//! past (no buffering of the stream, a few comparisons per chunk); at the end of the body the
//! token rules are settled to what the upstream reported. The body is watched when the
//! request has token rules, or for every successful response when the observer asks for
//! every usage ([`crate::observe::Observer::observes_usage`]): one parse serves both, and
//! the observer's [`crate::observe::SettleEvent`] carries what it found. The settlement runs
//! once whatever happens:
//!
//! | what happened | token rules | request rules | concurrency slots |
//! |---|---|---|---|
//! | body ended with `usage` | charged the reported usage (refund or extra charge, even past the limit: the tokens were spent) | kept | released |
//! | body ended or dropped without `usage` (a gRPC error status after response messages included) | [`MissingUsage`]: reservation kept (default) or an estimate of what streamed; a request charged the fallback cost ([`crate::BodyPolicy::Fallback`]) keeps it or pays what streamed, whichever is more | kept | released |
//! | upstream error (HTTP >= 400, gRPC status != 0 before any response message, inner service error) | refunded | kept, or refunded with [`crate::RateLimitLayerBuilder::count_failed_requests`]`(false)` | released |
//! | error response marked [`KeepTokens`] (a gateway's 504: the upstream may have generated the tokens) | reservation kept | as for an upstream error | released |
//! | request dropped before a response (client gone), even while the store was still deciding (the decision is then awaited in the background) | reservation kept | kept | released |
//!
//! A request carrying an idempotency id keeps its request charges when it fails, whatever
//! `count_failed_requests` says, and its failure (either of the last two rows, HTTP >= 400
//! included) is reported to the store, so that its retry is free on request rules instead
//! (see [Idempotent retries](crate::store#idempotent-retries)).
//!
//! A compressed response (`content-encoding` other than `identity`) is not parsed: it counts
//! as a response without `usage`. A gateway in front of upstreams should not forward
//! `accept-encoding` to them (the example gateway strips it).
//!
//! A synchronous store (the memory store) settles on the spot. A store doing I/O (Redis)
//! settles in a task of its own; [`crate::RateLimitLayer::flush`] waits for those, which a
//! server does at shutdown so that the last corrections are not lost with the runtime.

use std::sync::Arc;

use tokio::sync::oneshot;

use http::{Extensions, HeaderMap, StatusCode};

use crate::algorithm::Algorithm;
use crate::capacity::{Cell, Feedback, Signal};
use crate::cost::usage::{Framing, Usage, UsageParser};
use crate::cost::Cost;
use crate::limiter::{Limiter, Pending, Settlement, Settling};
use crate::observe::{
    CapacityEvent, ModelLabel, SettleEvent, SettleOutcome, SettledRule, StoreCall,
};
use crate::reject::GRPC_STATUS;
use crate::rule::Unit;
use crate::store::{Adjustment, Charge, IdempotencyKey, StoreError, StoreFuture};
use crate::tier::Tier;

// Defined with the limiter, which holds the policy; `settle::MissingUsage` is its public path.
pub use crate::limiter::MissingUsage;

/// A response extension by which the inner service says that its error response may still
/// have cost tokens, so the token reservation stays charged instead of being refunded.
///
/// A gateway that gives up waiting for its upstream (504) doesn't know whether the upstream
/// went on generating: refunding would let a caller whose requests always time out use the
/// upstream without paying for it. Request rules and concurrency slots settle as for any
/// other error.
///
/// # Examples
///
/// ```
/// use http::{Response, StatusCode};
/// use tower_llm_ratelimit::settle::KeepTokens;
///
/// let mut timed_out = Response::new(());
/// *timed_out.status_mut() = StatusCode::GATEWAY_TIMEOUT;
/// timed_out.extensions_mut().insert(KeepTokens);
/// assert!(timed_out.extensions().get::<KeepTokens>().is_some());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeepTokens;

/// Bytes of response payload per output token, for [`MissingUsage::EstimateStreamed`].
const BYTES_PER_STREAMED_TOKEN: u64 = 4;

/// How a request ended.
#[derive(Debug, Clone, Copy)]
enum Ending {
    Usage(Usage),
    NoUsage {
        streamed: u64,
    },
    /// An error; `keep_tokens` when the response carried [`KeepTokens`].
    Failed {
        keep_tokens: bool,
    },
    Dropped,
}

/// The settlement of one admitted request. Settles once: explicitly, or when dropped.
pub(crate) struct Settle {
    limiter: Arc<Limiter>,
    charges: Vec<Pending>,
    estimate: Cost,
    /// `estimate` is the layer's fallback cost, not an estimate of this request.
    fallback: bool,
    model: Option<String>,
    /// The caller's tier, kept for the observer only.
    tier: Option<Tier>,
    /// The request's `ModelLabel`, kept for the observer only.
    label: Option<ModelLabel>,
    /// The request's identity when it carries an idempotency id: a failure is reported to
    /// the store ([`crate::store::Store::fail_attempt`]) so that its retry is free.
    idempotency: Option<IdempotencyKey>,
    /// Ends when the store has recorded this attempt's failure (a store doing I/O): the
    /// response waits for it (see [`Settle::take_recorded`]).
    recorded: Option<oneshot::Receiver<()>>,
    /// For the controllers of adaptive charges, until the upstream's answer is known.
    feedback: Option<Feedback>,
    /// The adaptive buckets whose queues hear of the release.
    released: Vec<Arc<Cell>>,
    /// The request went to the inner service (a caller leaving before its answer then
    /// says something of the upstream).
    sent: bool,
    parser: Option<UsageParser>,
    streamed: u64,
    responded: bool,
    done: bool,
}

impl std::fmt::Debug for Settle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settle")
            .field("charges", &self.charges)
            .field("estimate", &self.estimate)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

/// Largest JSON response body searched for `usage` (streams are parsed line by line).
const MAX_USAGE_BUFFER: usize = 4 << 20;

impl Settle {
    /// The settlement the limiter concluded for an admitted request, to run once its
    /// response ends (or when dropped).
    pub(crate) fn new(limiter: Arc<Limiter>, settlement: Settlement) -> Self {
        let Settlement {
            charges,
            estimate,
            fallback,
            model,
            tier,
            label,
            idempotency,
            feedback,
        } = settlement;
        Self {
            limiter,
            charges,
            estimate,
            fallback,
            model,
            tier,
            label,
            idempotency,
            recorded: None,
            released: feedback
                .as_ref()
                .map(|f| f.cells.iter().map(|a| Arc::clone(&a.cell)).collect())
                .unwrap_or_default(),
            feedback,
            sent: false,
            parser: None,
            streamed: 0,
            responded: false,
            done: false,
        }
    }

    /// The request was handed to the inner service.
    pub(crate) fn sent(&mut self) {
        self.sent = true;
    }

    fn has_token_charges(&self) -> bool {
        self.charges.iter().any(|c| c.quota.unit().is_token_based())
    }

    /// The inner service answered with `status` and `headers`. Returns false when the
    /// request is already settled (an error status), so the body needs no watching.
    pub(crate) fn on_response(
        &mut self,
        status: StatusCode,
        headers: &HeaderMap,
        extensions: &Extensions,
    ) -> bool {
        self.responded = true;
        let grpc_failed = headers
            .get(&GRPC_STATUS)
            .is_some_and(|v| v.as_bytes() != b"0");
        if status.is_client_error() || status.is_server_error() || grpc_failed {
            if is_overload(status) {
                self.signal(Signal::Overload);
            }
            self.finish(Ending::Failed {
                keep_tokens: extensions.get::<KeepTokens>().is_some(),
            });
            return false;
        }
        // A compressed body can't be read as it streams past: no usage will be found (the
        // missing-usage policy applies). Gateways should ask upstreams for identity encoding.
        let compressed = headers
            .get(http::header::CONTENT_ENCODING)
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
        // Read for the token rules, and for an observer that hears every response's usage:
        // one parse for both.
        if (self.has_token_charges() || self.limiter.observes_usage) && !compressed {
            self.parser = headers
                .get(http::header::CONTENT_TYPE)
                .and_then(Framing::from_content_type)
                .map(|f| UsageParser::new(f, MAX_USAGE_BUFFER));
        }
        true
    }

    /// Once the request failed: what ends when the store has recorded the failure, if it is
    /// still being written. The layer holds the failed response's body until then, so that
    /// a client's retry, sent once it has read the answer, finds the record (one store
    /// round trip more on a failed attempt with an idempotency id, bounded by the store's
    /// call timeout).
    pub(crate) fn take_recorded(&mut self) -> Option<oneshot::Receiver<()>> {
        self.recorded.take()
    }

    /// The inner service failed.
    pub(crate) fn on_error(&mut self) {
        self.signal(Signal::Overload);
        self.finish(Ending::Failed { keep_tokens: false });
    }

    /// A chunk of the response body went past.
    #[inline]
    pub(crate) fn on_data(&mut self, chunk: &[u8]) {
        self.streamed = self.streamed.saturating_add(chunk.len() as u64);
        if self.feedback.is_some() && !chunk.is_empty() {
            self.first_byte();
        }
        if let Some(p) = &mut self.parser {
            p.feed(chunk);
        }
    }

    /// Trailers went past (gRPC reports its status there). An error status after response
    /// messages ends an answer the caller has had, at least in part: it settles as the end
    /// of the body (not a failure), or a client could end its streams with an error of its
    /// choosing (`grpc-timeout` just before the last message) to have every streamed token
    /// refunded and its retry made free.
    pub(crate) fn on_trailers(&mut self, trailers: &HeaderMap) {
        if self.streamed == 0
            && trailers
                .get(&GRPC_STATUS)
                .is_some_and(|v| v.as_bytes() != b"0")
        {
            self.finish(Ending::Failed { keep_tokens: false });
        }
    }

    /// The first byte of the response body (or its end, when it had none) arrived: its
    /// latency is what the adaptive controllers judge.
    fn first_byte(&mut self) {
        self.signal(Signal::Latency);
    }

    /// Tells the adaptive controllers of the request's charges what the upstream's answer
    /// said (overload, its latency, or none in time), once.
    fn signal(&mut self, signal: fn(u64) -> Signal) {
        let Some(feedback) = self.feedback.take() else {
            return;
        };
        let now = self.limiter.clock.now_nanos();
        let signal = signal(now.saturating_sub(feedback.started));
        for a in &feedback.cells {
            let Some(cap) = &self.limiter.capacity[a.rule] else {
                continue;
            };
            let Some((old, new, change)) = a.cell.sample(&cap.config, now, signal) else {
                continue;
            };
            let Some(bucket) = self.charges.get(a.charge).map(|c| &c.bucket) else {
                continue;
            };
            tracing::debug!(
                target: "tower_llm_ratelimit",
                rule = bucket.rule(),
                key = %bucket.key(),
                old,
                new,
                ?change,
                "adaptive capacity changed"
            );
            if let Some(o) = &self.limiter.observer {
                o.on_capacity(&CapacityEvent {
                    rule: bucket.rule(),
                    key: bucket.key(),
                    old,
                    new,
                    change,
                });
            }
        }
    }

    /// The response body ended, or broke, or was dropped.
    pub(crate) fn on_end(&mut self) {
        if self.feedback.is_some() {
            self.first_byte();
        }
        let usage = self.parser.as_mut().and_then(UsageParser::finish);
        self.finish(match usage {
            Some(u) => Ending::Usage(u),
            None => Ending::NoUsage {
                streamed: self.streamed,
            },
        });
    }

    /// What a token-based unit really cost.
    fn actual(&self, unit: Unit, charged: u64, ending: Ending) -> u64 {
        let (input, output) = match ending {
            Ending::Failed { keep_tokens: false } => return 0,
            Ending::Failed { keep_tokens: true } | Ending::Dropped => return charged,
            Ending::NoUsage { .. } if self.keeps_reservation() && !self.fallback => return charged,
            Ending::NoUsage { streamed } => {
                let streamed = self.weigh(
                    unit,
                    (
                        self.estimate.input_tokens(),
                        streamed.div_ceil(BYTES_PER_STREAMED_TOKEN),
                    ),
                );
                // The fallback cost says nothing of this request (a streaming request padded
                // past `max_inspect_bytes` would pay it for any length of answer): kept, or
                // what streamed when that is more.
                return if self.keeps_reservation() {
                    streamed.max(charged)
                } else {
                    streamed
                };
            }
            Ending::Usage(u) => {
                if unit == Unit::Tokens {
                    return u.total_tokens;
                }
                (u.input_tokens, u.output_tokens)
            }
        };
        self.weigh(unit, (input, output))
    }

    fn keeps_reservation(&self) -> bool {
        self.limiter.missing_usage == MissingUsage::KeepReservation
    }

    /// `unit`'s amount of `input` and `output` tokens.
    fn weigh(&self, unit: Unit, (input, output): (u64, u64)) -> u64 {
        match unit {
            Unit::InputTokens => input,
            Unit::OutputTokens => output,
            Unit::Cost => self
                .limiter
                .weights
                .weigh(self.model.as_deref(), input, output),
            _ => input.saturating_add(output),
        }
    }

    fn finish(&mut self, ending: Ending) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        // A caller that gave up before the response's head: how long it waited is all there
        // is to tell (the controller judges it against the latency target).
        if matches!(ending, Ending::Dropped) && self.sent {
            self.signal(Signal::Abandoned);
        }
        // Failed without a sign of overload, or never sent: nothing to tell.
        self.feedback = None;
        let adjustments: Vec<Adjustment<'_>> = self
            .charges
            .iter()
            .filter_map(|c| {
                let actual = if c.quota.algorithm() == Algorithm::Concurrency {
                    0
                } else if c.quota.unit().is_token_based() {
                    self.actual(c.quota.unit(), c.charged, ending)
                } else if matches!(ending, Ending::Failed { .. })
                    && !self.limiter.count_failed_requests
                    // A failed attempt with an id stays counted: its retry is free instead.
                    && self.idempotency.is_none()
                {
                    0
                } else {
                    c.charged
                };
                (actual != c.charged).then_some(Adjustment {
                    bucket: &c.bucket,
                    quota: &c.quota,
                    placement: c.placement,
                    charged: c.charged,
                    actual,
                })
            })
            .collect();
        if let Some(observer) = self
            .limiter
            .observer
            .as_ref()
            .filter(|_| self.limiter.observes_settlements)
        {
            let rules: Vec<SettledRule<'_>> = self
                .charges
                .iter()
                .map(|c| SettledRule {
                    rule: c.bucket.rule(),
                    key: c.bucket.key(),
                    unit: c.quota.unit(),
                    charged: c.charged,
                    actual: adjustments
                        .iter()
                        .find(|a| std::ptr::eq(a.bucket, &c.bucket))
                        .map_or(c.charged, |a| a.actual),
                })
                .collect();
            let outcome = match ending {
                Ending::Usage(u) => SettleOutcome::Usage(u),
                Ending::NoUsage { streamed } => SettleOutcome::NoUsage { streamed },
                Ending::Failed { .. } => SettleOutcome::Failed,
                Ending::Dropped => SettleOutcome::Dropped,
            };
            observer.on_settle(&SettleEvent {
                tier: self.tier.as_ref().map(Tier::as_str),
                model: self
                    .label
                    .as_ref()
                    .map(ModelLabel::as_str)
                    .or(self.model.as_deref()),
                outcome,
                rules: &rules,
            });
        }
        if !adjustments.is_empty() {
            let started = self.limiter.store_call_started();
            let settling = self.limiter.timed(
                StoreCall::Settle,
                started,
                self.limiter.store.settle(&adjustments),
            );
            // Nobody waits for a settlement (the next request is decided as it stands).
            // The queues of adaptive buckets hear of the release once the store has it.
            let released = Released {
                cells: std::mem::take(&mut self.released),
                limiter: Arc::clone(&self.limiter),
            };
            drop(drive(
                &self.limiter,
                settling,
                "settling a rate-limit charge failed",
                released,
            ));
        }
        if let (Some(id), Ending::Failed { .. } | Ending::Dropped) = (&self.idempotency, ending) {
            let charges: Vec<Charge<'_>> = self
                .charges
                .iter()
                .map(|c| Charge::new(&c.bucket, &c.quota, c.charged))
                .collect();
            let started = self.limiter.store_call_started();
            let failing = self.limiter.timed(
                StoreCall::FailAttempt,
                started,
                self.limiter.store.fail_attempt(&charges, id),
            );
            self.recorded = drive(
                &self.limiter,
                failing,
                "remembering a failed attempt failed (its retry will be charged)",
                Released::none(&self.limiter),
            );
        }
    }
}

/// The statuses by which an upstream (or a gateway's timeout) says it is overloaded.
fn is_overload(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::TOO_MANY_REQUESTS
            | StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT
    )
}

/// Runs a store call to its end: on the spot for a synchronous store, else in a task of its
/// own (this may run in `Drop`), counted for [`crate::RateLimitLayer::flush`]. Returns,
/// for a call in a task, what tells when it is done.
fn drive(
    limiter: &Arc<Limiter>,
    call: StoreFuture<Result<(), StoreError>>,
    failure: &'static str,
    then: Released,
) -> Option<oneshot::Receiver<()>> {
    match call.now() {
        Ok(Ok(())) => {
            then.wake();
            None
        }
        Ok(Err(e)) => {
            log_failure(&e, failure);
            then.wake();
            None
        }
        Err(pending) => match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let running = Settling::start(limiter);
                let (done, recorded) = oneshot::channel();
                rt.spawn(async move {
                    if let Err(e) = pending.await {
                        log_failure(&e, failure);
                    }
                    then.wake();
                    drop(running);
                    let _ = done.send(());
                });
                Some(recorded)
            }
            Err(_) => {
                tracing::warn!(
                    target: "tower_llm_ratelimit",
                    "no tokio runtime to settle a rate-limit charge on; the estimate stays charged"
                );
                None
            }
        },
    }
}

/// The adaptive buckets whose slots a settlement gives back: their queues are woken, and
/// their completion rates count it, once the store has the release.
struct Released {
    cells: Vec<Arc<Cell>>,
    limiter: Arc<Limiter>,
}

impl Released {
    fn none(limiter: &Arc<Limiter>) -> Self {
        Self {
            cells: Vec::new(),
            limiter: Arc::clone(limiter),
        }
    }

    fn wake(self) {
        if self.cells.is_empty() {
            return;
        }
        let now = self.limiter.clock.now_nanos();
        for cell in &self.cells {
            cell.released(now);
        }
    }
}

fn log_failure(e: &StoreError, what: &'static str) {
    tracing::warn!(target: "tower_llm_ratelimit", error = %e, "{what}");
}

impl Drop for Settle {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if self.responded {
            self.on_end();
        } else {
            self.finish(Ending::Dropped);
        }
    }
}
