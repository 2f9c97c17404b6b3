//! [`Capacity`]: the configuration of a concurrency rule whose limit follows the upstream.

use std::sync::Arc;
use std::time::Duration;

/// A tier's place under a saturated capacity: its priority (higher is served first from the
/// queue) and the share of the capacity reserved for it. Set with [`Capacity::tier`].
///
/// ```
/// use tower_llm_ratelimit::capacity::Priority;
///
/// let pro = Priority::new(2).reserve(0.6);
/// assert_eq!((pro.level(), pro.share()), (2, 0.6));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Priority {
    pub(crate) level: u8,
    pub(crate) share: f64,
    pub(crate) max_wait: Option<Duration>,
}

impl Priority {
    /// Priority `level` (higher first), no reserved share, no waiting.
    pub fn new(level: u8) -> Self {
        Self {
            level,
            share: 0.0,
            max_wait: None,
        }
    }

    /// The share of the current capacity this tier keeps when the bucket is saturated, in
    /// [0, 1] (0, the default: no reserve); the shares of a capacity's tiers add up to at
    /// most 1.
    pub fn reserve(mut self, share: f64) -> Self {
        self.share = share;
        self
    }

    /// How long a caller of this tier that finds no capacity may wait in the bucket's queue
    /// for a slot (default: not at all, an immediate 429). See [`Capacity::queue_len`].
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = Some(max_wait).filter(|d| !d.is_zero());
        self
    }

    /// How long a caller of this tier may wait for a slot.
    pub fn wait(&self) -> Option<Duration> {
        self.max_wait
    }

    /// The priority level.
    pub fn level(&self) -> u8 {
        self.level
    }

    /// The reserved share (0 when none).
    pub fn share(&self) -> f64 {
        self.share
    }
}

/// The capacity of a concurrency rule ([`crate::Quota::concurrent`]): a limit of requests in
/// flight per bucket (per model, say) that a controller moves with the upstream's answers,
/// between `min` and `max`. Set with [`crate::Rule::capacity`]; checked by
/// [`crate::RateLimitLayerBuilder::build`].
///
/// The limit applied to a request is the lower of its tier's quota limit and the bucket's
/// current capacity. See the [module docs](crate::capacity) for how the controller moves it.
///
/// ```
/// use std::time::Duration;
/// use tower_llm_ratelimit::capacity::Capacity;
///
/// let c = Capacity::adaptive(4, 64).latency_target(Duration::from_millis(800));
/// assert_eq!((c.min(), c.max()), (4, 64));
/// assert_eq!(c.initial_limit(), 64);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Capacity {
    pub(crate) min: u64,
    pub(crate) max: u64,
    pub(crate) initial: Option<u64>,
    pub(crate) latency_target: Option<Duration>,
    pub(crate) latency_tolerance: f64,
    pub(crate) interval: Duration,
    pub(crate) decrease: f64,
    pub(crate) baseline_window: Duration,
    pub(crate) saturation: f64,
    pub(crate) tiers: Vec<(Arc<str>, Priority)>,
    /// Tiers placed as another: (tier, the tier whose place it takes).
    pub(crate) aliases: Vec<(Arc<str>, Arc<str>)>,
    pub(crate) queue_len: usize,
}

impl Capacity {
    /// A capacity between `min` and `max` requests in flight, starting at `max`.
    pub fn adaptive(min: u64, max: u64) -> Self {
        Self {
            min,
            max,
            initial: None,
            latency_target: None,
            latency_tolerance: 1.05,
            interval: Duration::from_secs(1),
            decrease: 0.8,
            baseline_window: Duration::from_secs(10),
            saturation: 1.0,
            tiers: Vec::new(),
            aliases: Vec::new(),
            queue_len: 64,
        }
    }

    /// A capacity that never moves: `limit` requests in flight.
    pub fn fixed(limit: u64) -> Self {
        Self::adaptive(limit, limit)
    }

    /// The limit before any feedback (default `max`).
    pub fn initial(mut self, limit: u64) -> Self {
        self.initial = Some(limit);
        self
    }

    /// A ceiling on the mean time to the response head (first byte), on top of the knee the
    /// controller finds (see [`latency_tolerance`](Self::latency_tolerance)): when the
    /// requests in flight reach half the limit and the interval's mean passes it, the limit
    /// is scaled by `target / mean`. Also how long a caller may wait for the head before its
    /// leaving counts as an overload (without a target: twice the calm latency). Optional: a
    /// service-level promise, not needed to find the capacity.
    pub fn latency_target(mut self, target: Duration) -> Self {
        self.latency_target = Some(target);
        self
    }

    /// How many times its calm latency (the mean time to first byte below the upstream's
    /// knee, learned as it answers) an interval's mean may reach before the load counts as
    /// past the knee (default 1.05; > 1). Past it, the limit goes to the load at which the
    /// latency would be calm again: the upstream's capacity, for a server that slows in
    /// proportion to the load past it. A rise within four standard errors of the interval's
    /// mean is noise, not a knee, so a mix of short and long prompts needs no wider
    /// tolerance. A wider one lets the load run further past the knee (a GPU whose
    /// throughput still grows a little while its latency rises).
    pub fn latency_tolerance(mut self, tolerance: f64) -> Self {
        self.latency_tolerance = tolerance;
        self
    }

    /// How long feedback is gathered before the controller judges it (default 1 s): the
    /// limit changes at most once per interval, so a burst of failures of requests sent
    /// together shrinks it once. Make it longer than a typical time to first byte.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// What the limit is multiplied by when the upstream signals overload (429, 502, 503,
    /// 504, an error) in an interval (default 0.8; in (0, 1)).
    pub fn decrease(mut self, factor: f64) -> Self {
        self.decrease = factor;
        self
    }

    /// How long the calm latency remembers (default 10 s): each calm interval moves it by
    /// `interval / baseline_window` of the way to its own mean. A cut past the knee after
    /// which the load fell and the latency did not (the upstream got slower for everyone:
    /// longer prompts, another model) moves it at once.
    pub fn baseline_window(mut self, window: Duration) -> Self {
        self.baseline_window = window;
        self
    }

    /// The share of the current capacity past which the bucket counts as saturated (default
    /// 1, in (0, 1]): below it, any caller may use idle capacity; past it, each tier is held
    /// to its reserved share ([`Capacity::tier`]), so the tiers without one are shed first.
    /// Only with tiers. What lies past the threshold is held for the reserves, used or not:
    /// with an exact capacity, a threshold of 0.5 leaves half of it to the reserved tiers
    /// alone. Waiting callers of a higher priority are served first at any threshold (see
    /// [`Capacity::queue_len`]), so a threshold of 1 with `max_wait` for the important tiers
    /// lets the others fill the capacity and still serves the important ones first (at the
    /// cost of their wait for a slot to come back).
    pub fn saturation(mut self, share: f64) -> Self {
        self.saturation = share;
        self
    }

    /// Gives callers of `tier` a priority and a reserved share of the capacity (see
    /// [`Capacity::saturation`]). Callers of other tiers, or without one, have priority 0 and
    /// no reserve.
    ///
    /// With tiers, a request is admitted when the bucket's requests in flight stay under
    /// `saturation x capacity`, or, past it, when its tier's stay under `share x capacity`
    /// (and the bucket's under the capacity): two all-or-nothing attempts at the store, each
    /// charging the bucket and the tier's own bucket (`{rule}#{tier}`), the second
    /// only after the first was refused for saturation.
    ///
    /// Several rules of a layer may have tiers (one per model, each keyed by its model); a
    /// request that several of them charge is sorted by tier under the first only, and
    /// charged at the others' capacity.
    pub fn tier(mut self, tier: impl Into<String>, priority: Priority) -> Self {
        let tier: String = tier.into();
        self.tiers.push((tier.into(), priority));
        self
    }

    /// Places callers of `tier` as callers of `as_tier` (a tier given with
    /// [`Capacity::tier`]): its priority, its wait, and its reserve, which they share with
    /// it (the same tier bucket, `{rule}#{as_tier}`, so the shares still add up to at most
    /// the capacity). For tiers that are variants of another, such as a customer with limits
    /// of its own within the `pro` tier. (The `metrics` feature labels by the rule's tiers:
    /// a tier only placed here, and listed by no rule, is counted as `other`.)
    ///
    /// ```
    /// use tower_llm_ratelimit::capacity::{Capacity, Priority};
    ///
    /// let c = Capacity::adaptive(1, 64)
    ///     .tier("pro", Priority::new(2).reserve(0.5))
    ///     .tier_as("pro+acme", "pro");
    /// assert_eq!(c.priority_of(Some("pro+acme")), c.priority_of(Some("pro")));
    /// ```
    pub fn tier_as(mut self, tier: impl Into<String>, as_tier: impl Into<String>) -> Self {
        let (tier, as_tier): (String, String) = (tier.into(), as_tier.into());
        self.aliases.push((tier.into(), as_tier.into()));
        self
    }

    /// The tier whose place callers of `tier` take: `tier` itself, or the one given with
    /// [`Capacity::tier_as`].
    pub(crate) fn place<'a>(&'a self, tier: Option<&'a str>) -> Option<&'a str> {
        let tier = tier?;
        Some(
            self.aliases
                .iter()
                .find(|(alias, _)| &**alias == tier)
                .map_or(tier, |(_, base)| &**base),
        )
    }

    /// Most requests waiting for a slot of one bucket (default 64); past it, a caller that
    /// finds no capacity is refused at once. Waiting is per tier:
    /// [`Priority::max_wait`]. A waiter holds no slot; each release of a slot by this layer
    /// wakes the first waiter, by priority then arrival, which tries its charges again.
    /// Outside its tier's reserve, a caller finds the bucket one slot smaller for each
    /// waiter of a higher priority (at least one slot stays open), so a newcomer of a lower
    /// priority doesn't take the slot a waiter above it was woken for; one of the same or a
    /// higher priority may, and the waiter waits on. (The rate-limit headers keep showing
    /// the bucket's capacity and what is left of it: a caller held back may see room left
    /// and still get a 429.) At its deadline it is refused with 429 and a `Retry-After` from
    /// the bucket's recent completion rate. A waiter whose client goes away leaves the queue.
    pub fn queue_len(mut self, max_len: usize) -> Self {
        self.queue_len = max_len;
        self
    }

    /// The priority of callers of `tier`, if the capacity lists it (or places it as a tier it
    /// lists, [`Capacity::tier_as`]).
    pub fn priority_of(&self, tier: Option<&str>) -> Option<&Priority> {
        let tier = self.place(tier)?;
        self.tiers
            .iter()
            .find(|(name, _)| &**name == tier)
            .map(|(_, p)| p)
    }

    /// Whether `other`'s controllers move a limit exactly as this one's would: everything
    /// but the tiers, the saturation threshold and the queue length is the same.
    pub(crate) fn moves_like(&self, other: &Capacity) -> bool {
        let (a, b) = (self, other);
        a.min == b.min
            && a.max == b.max
            && a.initial == b.initial
            && a.latency_target == b.latency_target
            && a.latency_tolerance == b.latency_tolerance
            && a.interval == b.interval
            && a.decrease == b.decrease
            && a.baseline_window == b.baseline_window
    }

    /// Whether callers are sorted by tier under saturation.
    pub(crate) fn has_tiers(&self) -> bool {
        !self.tiers.is_empty()
    }

    /// The lowest limit.
    pub fn min(&self) -> u64 {
        self.min
    }

    /// The highest limit.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The limit before any feedback.
    pub fn initial_limit(&self) -> u64 {
        self.initial.unwrap_or(self.max)
    }

    /// Whether the limit can move at all.
    pub fn is_adaptive(&self) -> bool {
        self.min < self.max
    }

    /// What is wrong with this configuration, if anything.
    pub(crate) fn problem(&self) -> Option<String> {
        let s = self;
        if s.min == 0 {
            return Some("min must be > 0".into());
        }
        if s.min > s.max {
            return Some(format!("min {} is above max {}", s.min, s.max));
        }
        if let Some(i) = s.initial.filter(|&i| i < s.min || i > s.max) {
            return Some(format!(
                "initial {i} is outside [min, max] = [{}, {}]",
                s.min, s.max
            ));
        }
        if s.latency_target == Some(Duration::ZERO) {
            return Some("latency_target must be > 0".into());
        }
        if s.latency_tolerance.is_nan() || s.latency_tolerance <= 1.0 {
            return Some(format!(
                "latency_tolerance must be > 1, got {}",
                s.latency_tolerance
            ));
        }
        if s.interval.is_zero() {
            return Some("interval must be > 0".into());
        }
        if s.baseline_window.is_zero() {
            return Some("baseline_window must be > 0".into());
        }
        if !(s.decrease > 0.0 && s.decrease < 1.0) {
            return Some(format!("decrease must be in (0, 1), got {}", s.decrease));
        }
        if !(s.saturation > 0.0 && s.saturation <= 1.0) {
            return Some(format!(
                "saturation must be in (0, 1], got {}",
                s.saturation
            ));
        }
        let mut total = 0.0;
        for (i, (tier, p)) in s.tiers.iter().enumerate() {
            if s.tiers[..i].iter().any(|(t, _)| t == tier) {
                return Some(format!("tier `{tier}` is listed twice"));
            }
            if !(p.share >= 0.0 && p.share <= 1.0) {
                return Some(format!(
                    "the share of tier `{tier}` must be in [0, 1], got {}",
                    p.share
                ));
            }
            total += p.share;
        }
        if total > 1.0 + 1e-9 {
            return Some(format!("the tiers' shares add up to {total}, more than 1"));
        }
        for (i, (alias, base)) in s.aliases.iter().enumerate() {
            if s.aliases[..i].iter().any(|(a, _)| a == alias) {
                return Some(format!("tier `{alias}` is placed twice"));
            }
            if s.tiers.iter().any(|(t, _)| t == alias) {
                return Some(format!(
                    "tier `{alias}` has a priority of its own and can't take `{base}`'s place"
                ));
            }
            if !s.tiers.iter().any(|(t, _)| t == base) {
                return Some(format!(
                    "tier `{alias}` takes the place of `{base}`, which has no priority"
                ));
            }
        }
        None
    }
}
