//! Rules and quotas: plain configuration values.
//!
//! A [`Rule`] names a limit, says how to key it ([`crate::key`]) and what it allows
//! ([`Quota`]), optionally with a different quota per tier. Nothing here does I/O; a layer
//! checks the whole set once, in [`crate::RateLimitLayerBuilder::build`].
//!
//! # Examples
//!
//! ```
//! use std::time::Duration;
//! use tower_llm_ratelimit::{key, Algorithm, MissingKey, Quota, Rule, Unit};
//!
//! // 60 requests a minute per API key, sliding window counter (the default algorithm).
//! let rpm = Rule::new("user-rpm", key::header("x-api-key"), Quota::per_minute(60));
//! assert_eq!(rpm.quota().unit(), Unit::Requests);
//!
//! // 100k tokens a minute per API key, 10x more for the `pro` tier, exact log.
//! let tpm = Rule::new(
//!     "user-tpm",
//!     key::bearer_token(),
//!     Quota::per_minute(100_000).tokens().sliding_window_log(),
//! )
//! .tier("pro", Quota::per_minute(1_000_000).tokens().sliding_window_log())
//! .on_missing_key(MissingKey::Shared);
//! assert_eq!(tpm.quota_for(Some("pro")).limit(), 1_000_000);
//! assert_eq!(tpm.quota_for(Some("unknown")).limit(), 100_000);
//!
//! // GCRA: 5 per second with bursts of 20.
//! let q = Quota::new(5, Duration::from_secs(1)).gcra().burst(20);
//! assert_eq!(q.algorithm(), Algorithm::Gcra);
//! assert_eq!(q.effective_burst(), 20);
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

// `Algorithm` lives with the algorithms; `rule::Algorithm` stays a public path.
pub use crate::algorithm::Algorithm;
use crate::algorithm::{CalendarPeriod, Limits, Prepared};
use crate::capacity::Capacity;
use crate::key::KeyExtractor;

/// What a quota counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Unit {
    /// One per request.
    Requests,
    /// LLM tokens, input plus output: estimated by the layer's
    /// [`crate::cost::CostEstimator`] before admission, settled to the `usage` the upstream
    /// reports.
    Tokens,
    /// Prompt tokens only (like providers' ITPM limits).
    InputTokens,
    /// Output tokens only (like providers' OTPM limits); the reservation is `max_tokens x n`.
    OutputTokens,
    /// Spend: input and output tokens weighted per model by the layer's
    /// [`crate::cost::Weights`] (e.g. micro-dollars), rounded up.
    Cost,
}

impl Unit {
    /// The word used in headers and error bodies: `requests`, `tokens`, `input_tokens`,
    /// `output_tokens`, `cost`.
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Requests => "requests",
            Unit::Tokens => "tokens",
            Unit::InputTokens => "input_tokens",
            Unit::OutputTokens => "output_tokens",
            Unit::Cost => "cost",
        }
    }

    /// True for the units a [`crate::cost::CostEstimator`] estimates and usage settles.
    pub fn is_token_based(self) -> bool {
        !matches!(self, Unit::Requests)
    }
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A limit over a window, in a unit, enforced by an algorithm.
///
/// Constructors never fail; [`crate::RateLimitLayerBuilder::build`] rejects a zero limit or
/// window, or a burst on a window algorithm, with a [`crate::BuildError`] naming the rule.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    limit: u64,
    window: Duration,
    /// `window` in nanoseconds (saturated), kept so that [`Quota::limits`] converts nothing
    /// on every decision.
    window_nanos: u64,
    unit: Unit,
    algorithm: Algorithm,
    burst: Option<u64>,
    /// Derived from the limits whenever they change, for the memory store's fast paths (so
    /// that no bucket keeps a copy).
    prepared: Prepared,
}

impl Quota {
    /// `limit` requests per `window`, sliding window counter.
    pub const fn new(limit: u64, window: Duration) -> Self {
        Self {
            limit,
            window,
            window_nanos: nanos(window),
            unit: Unit::Requests,
            algorithm: Algorithm::SlidingWindowCounter,
            burst: None,
            prepared: Prepared::new(Limits::new(limit, nanos(window), limit)),
        }
    }

    /// At most `limit` requests in flight per key. A slot is taken when the request is
    /// admitted and given back when its response body ends or is dropped, on every path
    /// (error, cancellation, panic in the inner service).
    ///
    /// The window is the slot's lease (default 10 minutes, set with [`Quota::lease`]): a
    /// shared store (Redis) reclaims the slots of a process that died holding them after
    /// that long, so it should exceed your longest request. The memory store ignores it.
    pub const fn concurrent(limit: u64) -> Self {
        Self::new(limit, Duration::from_secs(600)).using(Algorithm::Concurrency)
    }

    /// Sets a concurrency quota's lease (see [`Quota::concurrent`]); for other quotas, the
    /// window.
    pub const fn lease(mut self, lease: Duration) -> Self {
        self.window = lease;
        self.window_nanos = nanos(lease);
        self.prepare()
    }

    /// `limit` per second.
    pub const fn per_second(limit: u64) -> Self {
        Self::new(limit, Duration::from_secs(1))
    }

    /// `limit` per minute.
    pub const fn per_minute(limit: u64) -> Self {
        Self::new(limit, Duration::from_secs(60))
    }

    /// `limit` per hour.
    pub const fn per_hour(limit: u64) -> Self {
        Self::new(limit, Duration::from_secs(3600))
    }

    /// `limit` per day (24 hours).
    pub const fn per_day(limit: u64) -> Self {
        Self::new(limit, Duration::from_secs(86_400))
    }

    /// `limit` per UTC calendar hour (from hh:00 to the next hour), an exact count reset at
    /// the boundary ([`Algorithm::Calendar`]).
    pub const fn per_calendar_hour(limit: u64) -> Self {
        Self::calendar(limit, CalendarPeriod::Hour)
    }

    /// `limit` per UTC calendar day, reset at midnight UTC: a daily budget. Exact: no
    /// charge is admitted once what the day has counted plus the charge would pass the limit
    /// (a token charge's settlement to real usage may still take it over, as on any token
    /// rule). Unlike [`Quota::per_day`], the day does not slide, so the end of one day and
    /// the start of the next may together admit `2 x limit`.
    pub const fn per_calendar_day(limit: u64) -> Self {
        Self::calendar(limit, CalendarPeriod::Day)
    }

    /// `limit` per UTC calendar month, reset at 00:00 UTC on the 1st (see
    /// [`Quota::per_calendar_day`]).
    ///
    /// ```
    /// use tower_llm_ratelimit::{algorithm::CalendarPeriod, Algorithm, Quota};
    ///
    /// let budget = Quota::per_calendar_month(5_000_000).tokens();
    /// assert_eq!(budget.algorithm(), Algorithm::Calendar(CalendarPeriod::Month));
    /// ```
    pub const fn per_calendar_month(limit: u64) -> Self {
        Self::calendar(limit, CalendarPeriod::Month)
    }

    /// `limit` per calendar `period`; the window is the period's longest length (31 days for
    /// a month), which only Redis' key expiry and the `RateLimit-Policy` header's `w` read.
    pub const fn calendar(limit: u64, period: CalendarPeriod) -> Self {
        Self::new(limit, period.longest()).using(Algorithm::Calendar(period))
    }

    /// Counts tokens instead of requests.
    pub const fn tokens(self) -> Self {
        self.counting(Unit::Tokens)
    }

    /// Counts prompt tokens only.
    pub const fn input_tokens(self) -> Self {
        self.counting(Unit::InputTokens)
    }

    /// Counts output tokens only.
    pub const fn output_tokens(self) -> Self {
        self.counting(Unit::OutputTokens)
    }

    /// Counts spend: tokens weighted per model (see [`crate::cost::Weights`]).
    pub const fn cost_units(self) -> Self {
        self.counting(Unit::Cost)
    }

    /// Counts requests (the default).
    pub const fn requests(self) -> Self {
        self.counting(Unit::Requests)
    }

    /// Counts `unit`.
    pub const fn counting(mut self, unit: Unit) -> Self {
        self.unit = unit;
        self
    }

    /// Enforces with `algorithm`.
    pub const fn using(mut self, algorithm: Algorithm) -> Self {
        self.algorithm = algorithm;
        self
    }

    /// Sliding window counter (the default).
    pub const fn sliding_window_counter(self) -> Self {
        self.using(Algorithm::SlidingWindowCounter)
    }

    /// Sliding window log (exact).
    pub const fn sliding_window_log(self) -> Self {
        self.using(Algorithm::SlidingWindowLog)
    }

    /// GCRA.
    pub const fn gcra(self) -> Self {
        self.using(Algorithm::Gcra)
    }

    /// GCRA's bucket capacity: how many units may pass at once after an idle period
    /// (default: the limit). Only valid with [`Algorithm::Gcra`].
    pub const fn burst(mut self, burst: u64) -> Self {
        self.burst = Some(burst);
        self.prepare()
    }

    /// Derives [`Quota::prepared`] from the limits as they are now.
    const fn prepare(mut self) -> Self {
        self.prepared = Prepared::new(Limits::new(
            self.limit,
            self.window_nanos,
            self.effective_burst(),
        ));
        self
    }

    /// The limit per window.
    pub const fn limit(&self) -> u64 {
        self.limit
    }

    /// The window.
    pub const fn window(&self) -> Duration {
        self.window
    }

    /// What is counted.
    pub const fn unit(&self) -> Unit {
        self.unit
    }

    /// The algorithm.
    pub const fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The configured burst, if any.
    pub const fn configured_burst(&self) -> Option<u64> {
        self.burst
    }

    /// The GCRA capacity in force: the burst if set, else the limit.
    pub const fn effective_burst(&self) -> u64 {
        match self.burst {
            Some(b) => b,
            None => self.limit,
        }
    }

    /// The same quota with another limit (and, for GCRA, the burst scaled alike).
    pub(crate) fn with_limit(mut self, limit: u64) -> Self {
        if let Some(b) = self.burst {
            let scaled = (u128::from(b) * u128::from(limit)) / u128::from(self.limit.max(1));
            self.burst = Some(u64::try_from(scaled).unwrap_or(u64::MAX).max(1));
        }
        self.limit = limit;
        self.prepare()
    }

    /// The numbers the algorithms work with.
    #[inline]
    pub fn limits(&self) -> Limits {
        Limits::new(self.limit, self.window_nanos, self.effective_burst())
    }

    /// What the memory store's fast paths derive from [`Quota::limits`].
    #[inline]
    pub(crate) fn prepared(&self) -> &Prepared {
        &self.prepared
    }
}

impl fmt::Debug for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // What was configured; `prepared` is derived from it.
        f.debug_struct("Quota")
            .field("limit", &self.limit)
            .field("window", &self.window)
            .field("window_nanos", &self.window_nanos)
            .field("unit", &self.unit)
            .field("algorithm", &self.algorithm)
            .field("burst", &self.burst)
            .finish()
    }
}

/// `d` in nanoseconds, saturated to `u64`.
const fn nanos(d: Duration) -> u64 {
    let n = d.as_nanos();
    if n > u64::MAX as u128 {
        u64::MAX
    } else {
        n as u64
    }
}

/// What a rule does when its key can't be extracted from a request (no `x-api-key` header,
/// no peer address, a JSON body without the field, ...).
///
/// A key read from a body the layer can't use (over `max_inspect_bytes`, not JSON) is not a
/// missing key: the request is refused (413 / 400), or, under
/// [`BodyPolicy::Fallback`](crate::BodyPolicy::Fallback), charged to the shared bucket unless
/// the policy is `Reject`. Such a body never skips a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissingKey {
    /// Answer with the extractor's status (401 for credentials, 400 otherwise) and a JSON
    /// body saying which key is missing. The default.
    #[default]
    Reject,
    /// Count every such request in one shared anonymous bucket of this rule.
    Shared,
    /// Don't apply this rule to the request.
    Skip,
}

/// One limit: a name, a key, a quota, optionally a quota per tier.
#[derive(Clone)]
pub struct Rule {
    pub(crate) name: Arc<str>,
    pub(crate) key: Arc<dyn KeyExtractor>,
    pub(crate) quota: Quota,
    pub(crate) tiers: Vec<(Arc<str>, Quota)>,
    pub(crate) on_missing: MissingKey,
    pub(crate) capacity: Option<Capacity>,
}

impl Rule {
    /// A rule named `name` (unique in a layer; it namespaces the rule's buckets in the store),
    /// keyed by `key`, allowing `quota` to callers without a tier.
    pub fn new(name: impl Into<String>, key: impl KeyExtractor, quota: Quota) -> Self {
        let name: String = name.into();
        Self {
            name: name.into(),
            key: Arc::new(key),
            quota,
            tiers: Vec::new(),
            on_missing: MissingKey::default(),
            capacity: None,
        }
    }

    /// Uses `quota` for callers of tier `tier` (see [`crate::tier`]). Tiers share the rule's
    /// buckets, window, unit and algorithm: a tier changes the limit applied, so on a shared
    /// bucket (a model's global TPM) a lower limit for `free` leaves the rest of the capacity
    /// to higher tiers. Callers without a tier, or with a tier not listed, get the rule's
    /// base quota.
    pub fn tier(mut self, tier: impl Into<String>, quota: Quota) -> Self {
        let tier: String = tier.into();
        self.tiers.push((tier.into(), quota));
        self
    }

    /// What to do when the key is missing (default [`MissingKey::Reject`]).
    pub fn on_missing_key(mut self, policy: MissingKey) -> Self {
        self.on_missing = policy;
        self
    }

    /// Makes a concurrency rule's limit follow the upstream (see [`crate::capacity`]): per
    /// bucket, a controller moves it between the capacity's `min` and `max` with the
    /// latency and status of the responses. A caller's limit is the lower of its tier's
    /// quota limit and the bucket's current capacity. Only for a rule whose quotas are
    /// [`Quota::concurrent`] (checked by [`crate::RateLimitLayerBuilder::build`]).
    pub fn capacity(mut self, capacity: Capacity) -> Self {
        self.capacity = Some(capacity);
        self
    }

    /// The rule's capacity, if its limit adapts.
    pub fn capacity_config(&self) -> Option<&Capacity> {
        self.capacity.as_ref()
    }

    /// The rule's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The base quota (callers without a tier).
    pub fn quota(&self) -> &Quota {
        &self.quota
    }

    /// The quota applied to a caller of `tier`.
    #[inline]
    pub fn quota_for(&self, tier: Option<&str>) -> &Quota {
        self.variant_for(tier).1
    }

    /// The quota for `tier` and its index: 0 for the base quota, `i + 1` for `tiers[i]`.
    pub(crate) fn variant_for(&self, tier: Option<&str>) -> (usize, &Quota) {
        if let Some(tier) = tier {
            for (i, (name, quota)) in self.tiers.iter().enumerate() {
                if &**name == tier {
                    return (i + 1, quota);
                }
            }
        }
        (0, &self.quota)
    }

    /// The names of the tiers the rule has a quota of its own for.
    pub(crate) fn tier_names(&self) -> impl Iterator<Item = &str> {
        self.tiers.iter().map(|(name, _)| &**name)
    }

    /// Every quota of the rule, in variant order (base first, then the tiers').
    pub(crate) fn variants(&self) -> impl Iterator<Item = &Quota> {
        std::iter::once(&self.quota).chain(self.tiers.iter().map(|(_, q)| q))
    }

    /// The key extractor.
    pub fn key(&self) -> &dyn KeyExtractor {
        &*self.key
    }

    /// The missing-key policy.
    pub fn missing_key_policy(&self) -> MissingKey {
        self.on_missing
    }
}

impl fmt::Debug for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rule")
            .field("name", &self.name)
            .field("key", &self.key.describe())
            .field("quota", &self.quota)
            .field("tiers", &self.tiers)
            .field("on_missing", &self.on_missing)
            .field("capacity", &self.capacity)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the memory store's fast paths read from a quota always matches its limits,
    /// whichever builder set them last.
    #[test]
    fn prepared_numbers_follow_the_limits() {
        let quotas = [
            Quota::per_minute(10),
            Quota::per_second(3).gcra(),
            Quota::per_second(3).gcra().burst(7),
            Quota::per_second(3).burst(7).gcra().tokens(),
            Quota::per_hour(100).lease(Duration::from_millis(1_500)),
            Quota::concurrent(4),
            Quota::concurrent(4).lease(Duration::from_secs(5)),
            Quota::per_calendar_month(1_000),
            Quota::per_minute(10).gcra().burst(20).with_limit(40),
            Quota::per_minute(0).gcra(),
        ];
        for q in quotas {
            assert_eq!(*q.prepared(), Prepared::new(q.limits()), "{q:?}");
        }
        assert!(Quota::per_minute(0).gcra().prepared().gcra.is_none());
        // Debug shows what was configured, not the derived numbers.
        assert!(!format!("{:?}", Quota::per_minute(1)).contains("prepared"));
    }
}
