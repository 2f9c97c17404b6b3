//! Rate limiting for LLM inference services, as [tower] middleware.
//!
//! [`RateLimitLayer`] wraps any tower `Service` over [`http::Request`]s (axum routers, tonic
//! servers, hyper services) and limits callers by API key, bearer token, client IP, model,
//! any combination, or anything a closure computes; by requests **or LLM tokens**; with a
//! quota per tier (free / standard / premium); with several rules checked together, all or
//! nothing.
//!
//! # Quick start
//!
//! ```
//! use axum::{routing::post, Router};
//! use tower_llm_ratelimit::{cost, key, Quota, RateLimitLayer, Rule};
//!
//! # fn main() -> Result<(), tower_llm_ratelimit::BuildError> {
//! let layer = RateLimitLayer::builder()
//!     .rule(Rule::new("user-rpm", key::header("x-api-key"), Quota::per_minute(60)))
//!     .rule(Rule::new("user-tpm", key::header("x-api-key"), Quota::per_minute(100_000).tokens()))
//!     .cost(cost::extension()) // tokens per request: a `TokenEstimate` set by an earlier layer
//!     .build()?;               // a typed error for bad config
//! let app: Router = Router::new()
//!     .route("/v1/chat/completions", post(|| async { "ok" }))
//!     .layer(layer);
//! # Ok(()) }
//! ```
//!
//! # One request's path
//!
//! ```text
//! request ──► RateLimit::call
//!   0. inspect  : only if a key or the estimate reads the body: read it, bounded by
//!                 max_inspect_bytes, parse JSON once (serde_json, borrowed);
//!                 413/400 or fallback                                      (inspect, document)
//!                 (a request with the idempotency header is read too, for its digest)
//!   1. tier     : TierResolver → the caller's tier, once                   (tier)
//!   2. keys     : each Rule's KeyExtractor → bucket key                    (key)
//!                 an adaptive concurrency rule: this replica's bucket, at the limit its
//!                 controller holds now                                     (capacity)
//!                 missing → the rule's MissingKey: reject 401/400, shared bucket, or skip;
//!                 a body key of an unusable body: 413/400, or the shared bucket under fallback
//!   3. cost     : 1 per request rule and concurrency slot; CostEstimator → input and
//!                 output tokens, weighted per model for spend rules        (cost)
//!   4. acquire  : Store::acquire(all charges) → all-or-nothing Decision   (store → algorithm)
//!                 (with an idempotency id: acquire_once; a retry of a failed attempt is
//!                 free on request rules)                                   (idempotency)
//!                 (a capacity with tiers refused for saturation: a second attempt at
//!                 the tier's reserve; refused by a capacity whose tier may wait: the
//!                 bucket's queue, holding no slot, until a release or the deadline)
//!                                                                          (capacity, service/acquiring)
//!   5a. denied  : 429 (gRPC: RESOURCE_EXHAUSTED) + Retry-After + rate-limit headers;
//!                 the inner service is never called                       (reject, headers)
//!   5b. allowed : inner service called with the body replayed byte for byte; rate-limit
//!                 headers added to its response; the response body is watched for `usage`
//!                 (JSON or SSE, incrementally) and at its end, or when dropped, the token
//!                 charges are settled to the real usage and concurrency slots released
//!                 (a failed attempt with an id: Store::fail_attempt); the time to the
//!                 first body byte, or an overload status, is fed to the controllers of
//!                 adaptive rules                                           (settle, cost::usage,
//!                                                                           capacity)
//! ```
//! A store failure follows the layer's [`FailurePolicy`]: 503 (default) or admit.
//! Steps 1 to 4 and the answer of step 5 (headers, or the rejection) are the limiter's
//! (`limiter/`); the service (`service/`) reads the body, calls the inner service and hands
//! the response body the settlement the limiter concluded.
//!
//! # The map of the crate
//!
//! | module | what it holds |
//! |---|---|
//! | [`RateLimitLayer`], [`RateLimitLayerBuilder`] (`layer/`) | configuration, validated once by `build()` (a [`BuildError`]) into the limiter the layer, its clones and their services share; [`RateLimitLayer::status`] reads a caller's state without charging; [`RateLimitLayer::flush`] waits for settlements running in the background (at shutdown) |
//! | the limiter (`limiter/`) | the shared state (rules, store, estimator, observer, policies such as [`FailurePolicy`] and [`settle::MissingUsage`], the header parts computed by `build`, the count of background settlements) and its logic: planning a request's charges (`plan.rs`: tier, keys, amounts, idempotency identity; `capacity.rs`: a capacity's charges, its second attempt, which refusals wait in its queue), acquiring them, concluding (`conclude.rs`: headers and what to settle, or the rejection), [`RuleStatus`] |
//! | [`RateLimit`] (`service/`) | the service (and the layer's `Layer` impl): asks the limiter to decide, answers or forwards; a decision whose caller left is finished in the background, a capacity's second attempt and queue wait (`service/acquiring.rs`) |
//! | [`ResponseFuture`], [`ResponseBody`] | the future and response body types (any inner body with `Bytes` data); the body settles the request when it ends or is dropped |
//! | [`RequestBody`], [`BodyPolicy`] (`inspect.rs`, `document.rs`, `stream_usage.rs`) | bounded reading of request bodies, replayed unchanged to the inner service; the body's one JSON parse (serde_json, linear in its size), into a document whose strings borrow the bytes (`RequestView::json`'s `serde_json::Value` is built only if asked for); `stream_options.include_usage` spliced into streaming requests, every other byte kept |
//! | [`settle`] | correcting token charges to the real usage, releasing concurrency slots, reporting a failed idempotent attempt to the store, [`settle::MissingUsage`], [`settle::KeepTokens`] (an error response that keeps its token reservation) |
//! | `idempotency.rs` | an idempotent request's identity: the digest of its id, method, path, body and buckets |
//! | [`rule`] | [`Rule`], [`Quota`], [`Unit`], [`MissingKey`] |
//! | [`capacity`] | [`capacity::Capacity`]: a concurrency rule's limit moved per bucket by a controller (`controller.rs`: pure arithmetic on the latency and status of responses; `state.rs`: the controllers of a rule, one per key, their completion rates, this replica's bucket keys); tiers' [`capacity::Priority`] and reserved shares past a saturation threshold (two all-or-nothing attempts: `limiter/capacity.rs` plans them, `service/acquiring.rs` makes the second); a bucket's short queue (`queue.rs`: by priority then arrival, bounded; the waiting is in `service/acquiring.rs`) |
//! | [`key`] | [`key::KeyExtractor`] and the built-ins: header, bearer token, client IP behind trusted proxies (`key/ip.rs`; `key/forwarding.rs` reads the one forwarding header they write); `key/digest.rs` holds a long key (over 256 bytes) as a keyed 128-bit digest, for the memory store and the capacities' controllers, JSON body field, global, closure, composite |
//! | [`tier`] | [`tier::TierResolver`]: from a request extension, a header, a lookup table, a closure |
//! | [`cost`] | [`cost::CostEstimator`]: tokens from a request extension or a closure; [`cost::Weights`] for spend rules; [`cost::openai`] (`cost/openai/`: the estimator, the text heuristic, the exact tokenizers); [`cost::usage`] (`cost/usage/`: the incremental `usage` watch of a response body: `json.rs` buffers the object to its closing brace, `sse.rs` splits the stream into lines with memchr and buffers one event's data, both within a bound; `document.rs` reads `usage` from either with serde_json) |
//! | [`algorithm`] | [`Algorithm`] and the algorithms: sliding window counter, sliding window log, GCRA, calendar window (UTC hour, day, month): pure, weighted, with refund and peek (a GCRA refund gives back only what is still queued ahead of the clock) |
//! | [`store`] | the [`store::Store`] contract (acquire / settle / peek; idempotent retries: `acquire_once` / `fail_attempt`, the table of what a retry is charged) and the [`store::MemoryStore`] (`store/memory/`: the decisions, sweeps and least-recently-used eviction at `max_keys`; one file for the shards' layout, one for a bucket's state, one for long keys held as digests, one for the table of failed idempotent attempts); `store::RedisStore` (feature `redis`, `store/redis/`: the Lua limiter run as a Redis function or by `EVALSHA`, its replies checked against the call that asked (`reply.rs`), versioned key layout, circuit breaker, lazy connection, concurrency slots released in the background after failed calls) |
//! | [`headers`] | IETF `RateLimit` / `RateLimit-Policy` and OpenAI `x-ratelimit-*` headers (the fixed parts computed once per rule and tier by `build`, written straight into the response) |
//! | [`observe`] | [`observe::Observer`]: a hook that sees every decision and each settlement, with the usage the response reported (of every response, on request: `observes_usage`), and, on request, each store call timed (`observes_store_calls`) |
//! | `metrics` (feature `metrics`) | the built-in observer that records the layer's events through the `metrics` facade (`RateLimitLayerBuilder::metrics`), its table of metric names and labels, and `metrics::describe` |
//! | [`clock`] | [`clock::SystemClock`] and [`clock::ManualClock`] for tests: monotonic time, and the wall clock for calendar windows |
//!
//! Arrows point one way (`tests/module_graph.rs` checks that no import goes back): the
//! service uses the layer; the service, the layer and the settlement use the limiter, which
//! knows none of them; the limiter uses rules, keys, costs, stores, headers and rejections;
//! rules and stores use the algorithms; algorithms know nothing of HTTP, locks, rules or
//! time sources.
//!
//! # Algorithms
//!
//! Every algorithm is weighted (a charge may be 1 request or 3,412 tokens):
//!
//! ```
//! use tower_llm_ratelimit::Quota;
//!
//! let counter = Quota::per_minute(60);                     // default: O(1), approximate
//! let exact = Quota::per_minute(60).sliding_window_log();   // exact, memory per charge
//! let smooth = Quota::per_second(5).gcra().burst(20);       // GCRA with a burst of 20
//! let budget = Quota::per_calendar_month(2_000_000).tokens(); // resets on the 1st, UTC
//! # let _ = (counter, exact, smooth, budget);
//! ```
//! See [`algorithm`] for their bounds. [`Quota::concurrent`] limits requests in flight
//! instead of a rate.
//!
//! Budgets that reset on the calendar ([`Quota::per_calendar_hour`],
//! [`Quota::per_calendar_day`], [`Quota::per_calendar_month`]) are exact fixed windows aligned
//! on UTC hours, midnights and 1sts of the month: no charge is admitted once what the period
//! counted plus the charge would pass the limit (a token rule's settlement may still take it
//! over), and `reset` in headers and snapshots is the period's end. Their time is the wall
//! clock ([`clock::Clock::unix_nanos`]; Redis: the server's `TIME`), the date computed
//! without a date library (Hinnant's civil-date algorithms, in Rust and in the Lua script).
//!
//! # Tokens: reserve, then settle
//!
//! A token rule charges the estimate **before** the request is admitted, so concurrent
//! requests can't overshoot a tokens-per-minute limit; when the response ends, the charge is
//! corrected to the `usage` the upstream reported (a refund, or an extra charge past the
//! limit: the tokens were spent). Rules may count all tokens ([`Quota::tokens`]), prompt
//! tokens ([`Quota::input_tokens`]), output tokens ([`Quota::output_tokens`]) or spend
//! ([`Quota::cost_units`] with [`cost::Weights`]). See [`settle`] for what happens on errors,
//! interrupted streams and responses without usage.
//!
//! # Rules together, tiers
//!
//! All rules of a request are acquired **all or nothing**: if any rule denies, no rule is
//! charged. A rule may list a quota per tier; callers without a tier (or with one the rule
//! doesn't list) get its base quota:
//!
//! ```
//! use tower_llm_ratelimit::{cost, key, tier, Quota, RateLimitLayer, Rule};
//!
//! let layer = RateLimitLayer::builder()
//!     .rule(Rule::new("user-rpm", key::bearer_token(), Quota::per_minute(10))
//!         .tier("pro", Quota::per_minute(600)))
//!     .rule(Rule::new("user-tpm", key::bearer_token(), Quota::per_minute(2_000).tokens())
//!         .tier("pro", Quota::per_minute(200_000).tokens()))
//!     // One bucket per model shared by everyone: free callers may use at most half of it,
//!     // which keeps the other half for pro callers.
//!     .rule(Rule::new("model-tpm", key::header("x-model"), Quota::per_minute(500_000).tokens())
//!         .tier("free", Quota::per_minute(250_000).tokens()))
//!     .tiers(tier::lookup(key::bearer_token(), [("sk-demo-pro", "pro"), ("sk-demo-free", "free")]))
//!     .cost(cost::extension())
//!     .build()
//!     .unwrap();
//! assert_eq!(layer.rules().len(), 3);
//! ```
//!
//! # Capacity that follows the upstream
//!
//! A model server's capacity moves. A concurrency rule given a [`capacity::Capacity`]
//! ([`Rule::capacity`]) has per bucket (per model) a controller that shrinks its limit when
//! the upstream answers 429/502/503/504 or fails, finds the upstream's knee (the load past
//! which its time to first byte rises above the calm one it learned: the limit goes to the
//! load at which it would be calm again) or a latency target's, and grows it while answers
//! are calm and the limit is in use, between `min` and `max`. The store enforces the limit the controller picks with the same all-or-nothing
//! acquire, so it works with memory and Redis; each replica governs its own share. Tiers may
//! get a priority and a reserved share of the capacity past a saturation threshold, so that
//! the lowest are shed first, and may wait a short while in a queue for a slot instead of
//! an instant 429 (served before newcomers of a lower priority). A layer rebuilt from a reloaded configuration keeps the limits its
//! predecessor learned ([`RateLimitLayerBuilder::continue_capacity_of`]); metrics read the
//! current limit with [`RateLimitLayer::capacity_limit`]. See [`capacity`].
//!
//! ```
//! use std::time::Duration;
//! use tower_llm_ratelimit::capacity::Capacity;
//! use tower_llm_ratelimit::{key, Quota, RateLimitLayer, Rule};
//!
//! let layer = RateLimitLayer::builder()
//!     .rule(Rule::new("model-slots", key::header("x-model"), Quota::concurrent(256))
//!         .capacity(Capacity::adaptive(8, 256).latency_target(Duration::from_secs(2))))
//!     .build()
//!     .unwrap();
//! # let _ = layer;
//! ```
//!
//! # Responses
//!
//! A denial is a response, never an error (`Error = S::Error`, no `HandleErrorLayer`): 429
//! with a JSON body in OpenAI's error shape, `Retry-After` (whole seconds, rounded up, never
//! 0), `retry-after-ms` and the rate-limit headers; gRPC requests get a trailers-only
//! `RESOURCE_EXHAUSTED`. See [`headers`] for the header formats.
//!
//! # Feature flags
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `axum` | no | [`key::client_ip`] reads axum's `ConnectInfo<SocketAddr>` |
//! | `redis` | no | `store::RedisStore`: limits shared by many processes through Redis or Redis Cluster |
//! | `tokenizer` | no | exact prompt token counts in [`cost::openai`] with OpenAI's tokenizers (o200k_base, cl100k_base, compiled in) for known models |
//! | `metrics` | no | `RateLimitLayerBuilder::metrics`: decisions, refusals, estimated vs settled tokens, store latency and failures, adaptive capacity, recorded through the [`metrics`](https://docs.rs/metrics) facade for any exporter (the table of names and labels is in `metrics`) |
//!
//! # Integration
//!
//! - axum: `Router::layer(layer)`; for [`key::client_ip`], serve with
//!   `into_make_service_with_connect_info::<SocketAddr>()` and enable `axum`.
//! - hyper: wrap with `tower::ServiceBuilder` and `hyper_util::service::TowerToHyperService`;
//!   insert [`key::PeerAddr`] per connection (see `examples/hyper.rs`).
//! - Set `TCP_NODELAY` on accepted sockets: hyper writes a response's head and body
//!   separately, and without it the body waits ~40 ms for the client's delayed ACK on a
//!   keep-alive connection. axum 0.8: `axum::serve(listener.tap_io(|tcp| { let _ =
//!   tcp.set_nodelay(true); }), app)` (`use axum::serve::ListenerExt`); hyper:
//!   `stream.set_nodelay(true)` after `accept()`.
//! - tonic: `Server::builder().layer(layer)` (see `examples/tonic.rs`). tonic puts the peer
//!   address in its own `TcpConnectInfo` extension; for [`key::client_ip`] read it with
//!   `client_ip().peer_from(|ext| ext.get::<TcpConnectInfo>()?.remote_addr().map(|a| a.ip()))`.
//!
//! [tower]: https://docs.rs/tower

#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod algorithm;
pub mod capacity;
pub mod clock;
pub mod cost;
pub mod headers;
pub mod key;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
pub mod observe;
pub mod rule;
pub mod settle;
pub mod store;
pub mod tier;

mod body;
mod document;
mod error;
mod future;
mod idempotency;
mod inspect;
mod layer;
mod limiter;
mod reject;
mod service;
mod stream_usage;

pub use algorithm::Algorithm;
pub use body::ResponseBody;
pub use error::BuildError;
pub use future::ResponseFuture;
pub use inspect::{BodyPolicy, RequestBody};
pub use layer::{RateLimitLayer, RateLimitLayerBuilder, DEFAULT_MAX_INSPECT_BYTES};
pub use limiter::{FailurePolicy, RuleStatus};
pub use rule::{MissingKey, Quota, Rule, Unit};
pub use service::RateLimit;

// The README's examples are compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
