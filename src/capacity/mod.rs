//! Adaptive capacity: a concurrency limit that follows the upstream.
//!
//! A model server's real capacity moves (prompt lengths, batch mix, a replica going away).
//! A concurrency rule ([`crate::Quota::concurrent`]) given a [`Capacity`]
//! ([`crate::Rule::capacity`]) has, per bucket key (per model, say), a controller that
//! picks the current limit from what the upstream answers: the time to the first byte of
//! each response body, and its status. It shrinks the limit multiplicatively on 429, 502,
//! 503, 504, an error of the inner service or a caller that gave up past its patience
//! without the response's head (a stalled upstream); to the upstream's knee when the mean
//! latency rises past the calm one it learned (or past an optional latency target); it
//! grows it while responses come back calm and the limit is in use; always within
//! `[min, max]`, and at most once per interval (see the controller's rules below).
//!
//! The controller is local to the layer and only picks the limit; the store enforces it
//! with the same all-or-nothing acquire as any other (the limit travels in the charge), so
//! adaptive capacity works with the memory store and with Redis alike.
//!
//! A rule keeps at most 4,096 controllers (keys over 256 bytes held as a keyed 128-bit
//! digest): the key may be a header a client sets. At that bound the idle ones (no request
//! of theirs in flight or waiting), least recently used first, make room, and come back at
//! the initial limit when used again; with none idle, a new bucket runs at the initial
//! limit without a queue (its refusals are immediate).
//!
//! # Several replicas on one Redis
//!
//! Each layer (each process) governs **its own share** of a model's capacity: its
//! controller sees only the latency of its own requests, so its adaptive buckets are keyed
//! per replica, `{key}@{replica}`, the replica id being the layer's
//! ([`crate::RateLimitLayerBuilder::replica_id`], default a random id per layer). Two
//! gateways in front of one model server thus each find their own limit, and together
//! stay under what the server sustains: when it saturates, both see its latency rise and
//! both shrink. Redis still reclaims the slots of a replica that died (the lease). To cap
//! the replicas' sum as well, add a second, static concurrency rule on the same key.
//!
//! # Priority under saturation
//!
//! A capacity may list tiers ([`Capacity::tier`]) with a [`Priority`]: a level and a
//! reserved share of the current capacity. Below the saturation threshold
//! ([`Capacity::saturation`], a share of the current capacity) anyone uses idle capacity;
//! past it, each tier is held to its reserved share, so tiers without a reserve (and callers
//! without a tier) are shed first, and a free-tier flood within its own limits can't take
//! the premium callers' slots. It stays all or nothing at the store, in at most two
//! attempts, each charging the rule's bucket and the tier's own bucket
//! (its rule named `{rule}#{tier}`, its key the bucket's, so that a Redis Cluster
//! decides both in one call) together with the request's other charges:
//!
//! | attempt | the bucket's limit | the tier's bucket's limit |
//! |---|---|---|
//! | 1 | `floor(saturation x capacity)` (at least 1) | the capacity |
//! | 2, only when attempt 1 was refused by a threshold below the capacity | the capacity | `floor(share x capacity)` |
//!
//! Headers show the bucket at its capacity (the tier's bucket is not shown), with no slot
//! remaining for a caller the capacity refused; the 429's message gives the capacity and
//! the requests in flight (`used 5 or more` when refused at a threshold of 5: the count past
//! it is not known). The observer sees both charges, the tier's under its bucket's rule name.
//!
//! ```
//! use tower_llm_ratelimit::capacity::{Capacity, Priority};
//! use tower_llm_ratelimit::{key, tier, Quota, RateLimitLayer, Rule};
//!
//! let layer = RateLimitLayer::builder()
//!     .rule(
//!         Rule::new("model-slots", key::header("x-model"), Quota::concurrent(64)).capacity(
//!             Capacity::adaptive(4, 64)
//!                 .saturation(0.8)
//!                 .tier("pro", Priority::new(2).reserve(0.6))
//!                 .tier("free", Priority::new(0).reserve(0.1)),
//!         ),
//!     )
//!     .tiers(tier::header("x-tier"))
//!     .build()
//!     .unwrap();
//! # let _ = layer;
//! ```
//!
//! # A short queue instead of an instant 429
//!
//! A tier may wait for a slot: [`Priority::max_wait`]. A request of that tier refused by
//! the capacity (the bucket full, or past the saturation threshold its tier's reserve full)
//! waits in the bucket's queue, holding no slot, for a release of a slot by this layer or
//! its deadline. Waiters are served by priority, then arrival: each release wakes the first
//! waiter, which tries its charges again, and hands the wake-up on to the next if it is
//! refused again by its tier's reserve or the saturation threshold (so a full reserve does
//! not block the waiters behind it), skipping the waiters of its own tier (refused alike);
//! not when the bucket itself is full (a request that came in meanwhile took the slot: the
//! next would be refused too). A release thus costs at most one store call per tier
//! waiting. The queue is
//! bounded ([`Capacity::queue_len`], default 64): past it, an immediate 429. A waiter whose
//! client goes away leaves the queue (a wake-up it had not used goes on to the next). At the
//! deadline: 429. Refusals by a capacity carry a `Retry-After` from the bucket's recent
//! completion rate: the waiters ahead (of the caller's priority or higher) and the caller,
//! at the completions per second of the last 5 to 10 s (1 s without completions, 60 s at
//! most).
//!
//! Requests that arrive while others wait are not held back for them: one may take a slot
//! released before the woken waiter tries again (the waiter then waits on, in its place).
//! Only releases by this layer wake waiters: with several replicas on one Redis each governs
//! its own share, so the releases that matter are its own.
//!
//! ```
//! use std::time::Duration;
//! use tower_llm_ratelimit::capacity::{Capacity, Priority};
//!
//! let capacity = Capacity::adaptive(4, 64)
//!     .queue_len(100)
//!     .tier("pro", Priority::new(2).reserve(0.5).max_wait(Duration::from_secs(5)))
//!     .tier("free", Priority::new(0).max_wait(Duration::from_millis(500)));
//! assert_eq!(capacity.priority_of(Some("pro")).unwrap().wait(), Some(Duration::from_secs(5)));
//! ```
//!
//! # What is visible
//!
//! The current limit is the `limit` of the rule's charge: [`crate::RateLimitLayer::status`]
//! reports it as the quota's limit and the snapshot's, the IETF rate-limit headers carry it
//! (`RateLimit-Policy`'s `q`, `RateLimit`'s `r`; the `x-ratelimit-*` headers show rates
//! only), the observer's [`crate::observe::RuleDecision::limit`] too,
//! [`crate::observe::Observer::on_capacity`] hears every change, with its cause, and
//! [`crate::observe::Observer::on_queue`] every wait in a queue.
//!
//! # A layer rebuilt
//!
//! A configuration reloaded builds a new layer; built with
//! [`crate::RateLimitLayerBuilder::continue_capacity_of`] the old one, it shares the
//! controllers (learned limits, queues, completion rates) of each rule of the same name whose
//! capacity moves the limit alike, and keeps the old layer's replica id and clock, so that the
//! slots held by requests in flight stay in the buckets it charges. A rule whose capacity
//! moves the limit otherwise starts its controllers afresh but still shares the queues and
//! completion rates: the slots the old layer's requests release wake the new layer's waiters.
//! Waiters are told apart by tier name, so the two configurations may list other tiers, in
//! another order. Only the buckets the old layer knows at the rebuild are shared.
//!
//! # The controller
//!
//! Feedback is gathered over an interval ([`Capacity::interval`], default 1 s) and judged
//! at its end:
//!
//! - an overload status, an inner error, or a caller gone without the response's head past
//!   its patience (the latency target, or twice the calm latency), in the interval: the limit
//!   is multiplied by [`Capacity::decrease`] (default 0.8), or cut to the knee's figure
//!   below when the answers that did come back show it lower (halved at most, unless
//!   `decrease` says more); a caller gone sooner says nothing;
//! - else, **the knee**. A model server answers at its calm latency up to its capacity;
//!   past it (a batch that no longer fits) every answer slows with the load. The controller
//!   learns the calm latency (a moving average of the mean time to first byte of the
//!   intervals below the knee, [`Capacity::baseline_window`]), and an interval whose mean
//!   passes [`Capacity::latency_tolerance`] times it (default 1.05), and its noise (four
//!   standard errors of the interval's mean, from the larger of its variance and the calm
//!   intervals', so a mix of short and long prompts is not taken for a knee), is past the
//!   knee: the limit goes to `load x calm / mean` (halved at most),
//!   the load in flight at which the latency would be calm again. Past the knee the latency
//!   grows in proportion to the load, so that figure is the capacity itself and one step
//!   lands on it. (Envoy's adaptive concurrency filter and Netflix's Gradient2 scale by a
//!   gradient against a minimum latency the same way, with a headroom that settles them
//!   well past the knee.) A cut after which the load fell but the latency did not was no
//!   knee: the upstream got slower for everyone (longer prompts, another model), and the
//!   limit goes back with the new latency as the calm one;
//! - with a [`Capacity::latency_target`], also: when the requests in flight reached half the
//!   limit (at low load a slow answer is a long prompt, not an overload), a mean past the
//!   target scales the limit by `target / mean` (by 1/2 at most);
//! - else, when the requests in flight reached half the limit: +10% (at least 1), or +2%
//!   within 10% of the mark the last cut left (the knee found, the limit an overload cut
//!   started from), so that it probes gently past the capacity rather than swinging past it;
//!   10% past that mark, it is forgotten (the capacity came back).
//!
//! After a cut, answers are judged again once the requests admitted under the old limit
//! have drained (as many have ended as the interval saw in flight over the new limit, or
//! five intervals at most): until then the upstream is as busy as before, and their
//! answers would cut the limit again for the same overload. Near the knee found the limit
//! probes one slot past it now and then, and any rise of the latency beyond the noise ends
//! the probe.
//!
//! On a server that slows in proportion to its load past its capacity (the gateway's
//! saturating mock), the limit settles within 10% of the capacity, follows it down when it
//! halves within a few intervals and regains it within about fifteen when it comes back (the
//! controller's simulation tests and `benches/overload.rs` check both). The calm latency is
//! learned from answers below the knee: before it knows one, a limit in use is calibrated
//! by halving it (from the load in flight) until the latency stops falling with the load,
//! so a layer started at `max` under full load finds the knee too; a start at low load
//! takes its first interval's mean as calm, which a later, lower mean corrects.
//! On a GPU whose latency rises slowly well before its throughput stops growing, the
//! tolerance is where the limit stops: widen it to trade latency for throughput.
//!
//! # Examples
//!
//! ```
//! use std::time::Duration;
//! use tower_llm_ratelimit::capacity::Capacity;
//! use tower_llm_ratelimit::{key, Quota, RateLimitLayer, Rule};
//!
//! let layer = RateLimitLayer::builder()
//!     .rule(
//!         Rule::new("model-slots", key::header("x-model"), Quota::concurrent(64))
//!             .capacity(Capacity::adaptive(4, 64).latency_target(Duration::from_millis(800))),
//!     )
//!     .build()
//!     .unwrap();
//! assert_eq!(layer.rules()[0].capacity_config().map(Capacity::max), Some(64));
//! ```

mod config;
mod controller;
mod queue;
mod state;
#[cfg(test)]
mod tests;

pub use self::config::{Capacity, Priority};
pub use self::controller::Change;
pub(crate) use self::controller::Signal;
pub(crate) use self::queue::Ticket;
pub(crate) use self::state::{random_replica_id, replica_key, Adapt, Cell, Feedback, RuleCapacity};
