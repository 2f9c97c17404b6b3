//! The adaptive controller of one bucket: its current limit, moved by the latency and the
//! status of the responses it admitted. Pure arithmetic on times it is given (nanoseconds of
//! the layer's clock): no lock, no clock, no I/O.
//!
//! Feedback is gathered over an interval ([`Capacity::interval`]) and judged once at its end,
//! so that a burst of failures of requests admitted together counts as one signal:
//!
//! - an overload status (429, 502, 503, 504, an inner error), or a caller that gave up past
//!   the latency target without the response's head: the limit is multiplied by
//!   [`Capacity::decrease`];
//! - else, if the requests in flight reached half the limit (a limit nobody uses proves
//!   nothing, and a long prompt alone at low load is slow without any overload), a mean
//!   latency past the target: the limit is scaled by `target / latency` (at least by 1/2).
//!   Past a server's capacity, its latency grows with the load in proportion, so this lands
//!   the limit near the load at which the latency meets the target in one step (the
//!   gradient of Envoy's adaptive concurrency filter and of Netflix's Gradient2);
//! - else, if the requests in flight reached half the limit, it grows: by 10% (at least 1)
//!   per interval, and by 2% (at least 1) while it is within 10% of the mark the last cut
//!   left (where a latency cut landed, where an overload cut started), so that it settles
//!   near the capacity instead of swinging past it. A limit 10% past that mark forgets it:
//!   the capacity came back.
//!
//! Answers to requests sent before the last cut are not judged: they were admitted under
//! the higher limit, and would cut it again for the same overload.
//!
//! The latency target is the one configured ([`Capacity::latency_target`]), or
//! [`Capacity::latency_tolerance`] times the baseline: the lower of the 10th percentile of
//! the latencies of this window of [`Capacity::baseline_window`] and the one before (a low
//! percentile, not the minimum, so that a few freak fast answers don't set it; exact up to
//! 320 answers a window, the 32nd lowest past them). Without a target, a workload whose
//! time to first byte varies a lot (short and long prompts) looks slower than its baseline
//! even unloaded: give such a workload a [`Capacity::latency_target`].

use super::Capacity;

/// Why a controller's limit changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Change {
    /// The upstream answered 429, 502, 503 or 504, or failed.
    Overload,
    /// The mean time to the response head went past the latency target.
    Latency,
    /// Responses came back within the target while the limit was in use.
    Growth,
}

/// What the upstream's answer to one admitted request said, and how long after it was sent
/// (nanoseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signal {
    /// The first byte of a response body (or its end, if it had none) arrived after this
    /// long, with a status that says nothing of overload.
    Latency(u64),
    /// 429, 502, 503, 504, or the inner service failed, after this long.
    Overload(u64),
    /// The caller went away after this long without the response's head (its timeout, a
    /// stalled upstream): an overload past the latency target, nothing before it (a lower
    /// bound of a latency would bias the mean low).
    Abandoned(u64),
}

impl Signal {
    fn elapsed(self) -> u64 {
        match self {
            Signal::Latency(l) | Signal::Overload(l) | Signal::Abandoned(l) => l,
        }
    }
}

/// Share of growth per interval, and near the last overload.
const FAST_GROWTH: f64 = 0.10;
const SLOW_GROWTH: f64 = 0.02;
/// How close to the last overloaded limit growth slows, and how far past it it is forgotten.
const NEAR_CEILING: f64 = 0.10;
/// The most one latency judgement cuts the limit by.
const MIN_GRADIENT: f64 = 0.5;

/// One bucket's controller.
#[derive(Debug, Clone)]
pub(crate) struct Controller {
    min: f64,
    max: f64,
    limit: f64,
    /// The mark the last cut left (where a latency cut landed, where an overload cut
    /// started), until the limit passes it by [`NEAR_CEILING`].
    ceiling: Option<f64>,
    /// Feedback of the interval under way.
    window: Window,
    /// A low percentile of the latencies of this baseline window and the one before.
    baseline: Baseline,
    /// When the limit was last cut: answers to requests sent before say nothing of the
    /// limit in force now (they were admitted under a higher one), and are not judged.
    cut_at: Option<u64>,
}

#[derive(Debug, Clone, Default)]
struct Window {
    started: Option<u64>,
    samples: u64,
    latency_sum: u128,
    overloaded: bool,
    peak_in_flight: u64,
}

#[derive(Debug, Clone, Default)]
struct Baseline {
    since: u64,
    current: Lowest,
    /// The previous window's figure.
    previous: Option<u64>,
}

impl Baseline {
    fn record(&mut self, now: u64, latency: u64, window: u64) {
        if now.saturating_sub(self.since) >= window {
            self.previous = self.current.percentile();
            self.current = Lowest::default();
            self.since = now;
        }
        self.current.record(latency);
    }

    fn get(&self) -> Option<u64> {
        match (self.current.percentile(), self.previous) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// How many of a window's lowest latencies are kept for its percentile.
const LOWEST: usize = 32;
/// The percentile of the baseline, in tenths.
const BASELINE_DECILE: u64 = 1;

/// The lowest latencies of a window (ascending, at most [`LOWEST`]) and how many it saw.
#[derive(Debug, Clone, Default)]
struct Lowest {
    seen: u64,
    lowest: Vec<u64>,
}

impl Lowest {
    fn record(&mut self, latency: u64) {
        self.seen += 1;
        let at = self.lowest.partition_point(|&l| l <= latency);
        if at < LOWEST {
            self.lowest.insert(at, latency);
            self.lowest.truncate(LOWEST);
        }
    }

    /// The 10th percentile (nearest rank), or the highest kept past [`LOWEST`] x 10 answers.
    fn percentile(&self) -> Option<u64> {
        let rank = (self.seen * BASELINE_DECILE).div_ceil(10).max(1);
        let index = usize::try_from(rank - 1).unwrap_or(usize::MAX);
        self.lowest
            .get(index.min(self.lowest.len().checked_sub(1)?))
            .copied()
    }
}

impl Controller {
    /// A controller at the configuration's initial limit.
    pub(crate) fn new(cfg: &Capacity) -> Self {
        Self {
            min: cfg.min as f64,
            max: cfg.max as f64,
            limit: cfg.initial_limit() as f64,
            ceiling: None,
            window: Window::default(),
            baseline: Baseline::default(),
            cut_at: None,
        }
    }

    /// The limit in force: whole slots, within `[min, max]`.
    pub(crate) fn limit(&self) -> u64 {
        (self.limit.floor() as u64).clamp(self.min as u64, self.max as u64)
    }

    /// A decision on a request saw `in_flight` slots taken (itself included when admitted).
    pub(crate) fn saw_in_flight(&mut self, in_flight: u64) {
        self.window.peak_in_flight = self.window.peak_in_flight.max(in_flight);
    }

    /// Feedback from one response at `now`; judges the interval when it is over. Returns the
    /// change of limit, if any, as (old, new, why).
    pub(crate) fn sample(
        &mut self,
        cfg: &Capacity,
        now: u64,
        signal: Signal,
    ) -> Option<(u64, u64, Change)> {
        if let Signal::Latency(l) = signal {
            self.baseline.record(now, l, nanos(cfg.baseline_window));
        }
        let sent = now.saturating_sub(signal.elapsed());
        if self.cut_at.is_some_and(|cut| sent < cut) {
            return None;
        }
        if let Signal::Abandoned(l) = signal {
            if !self.target(cfg).is_some_and(|t| l as f64 > t) {
                return None;
            }
        }
        let started = *self.window.started.get_or_insert(now);
        match signal {
            Signal::Overload(_) | Signal::Abandoned(_) => self.window.overloaded = true,
            Signal::Latency(l) => {
                self.window.samples += 1;
                self.window.latency_sum += u128::from(l);
            }
        }
        if now.saturating_sub(started) < nanos(cfg.interval) {
            return None;
        }
        let window = std::mem::take(&mut self.window);
        let before = self.limit();
        let why = self.judge(cfg, &window)?;
        if why != Change::Growth {
            self.cut_at = Some(now);
        }
        let after = self.limit();
        (after != before).then_some((before, after, why))
    }

    fn judge(&mut self, cfg: &Capacity, w: &Window) -> Option<Change> {
        if w.overloaded {
            self.cut(self.limit * cfg.decrease);
            return Some(Change::Overload);
        }
        if w.samples == 0 {
            return None;
        }
        // At low load a slow answer is a long prompt, not an overload.
        if (w.peak_in_flight as f64) * 2.0 < self.limit {
            return None;
        }
        let mean = (w.latency_sum / u128::from(w.samples)) as f64;
        if let Some(target) = self.target(cfg).filter(|&t| mean > t) {
            let gradient = (target / mean).max(MIN_GRADIENT);
            self.cut(self.limit * gradient);
            // The gradient estimates the load at which the latency meets its target: the
            // limit grows slowly from there, not fast back towards where it was.
            self.ceiling = Some(self.limit);
            return Some(Change::Latency);
        }
        let share = match self.ceiling {
            Some(c) if self.limit >= c * (1.0 - NEAR_CEILING) => SLOW_GROWTH,
            _ => FAST_GROWTH,
        };
        self.limit = (self.limit + (self.limit * share).max(1.0)).min(self.max);
        if self
            .ceiling
            .is_some_and(|c| self.limit > c * (1.0 + NEAR_CEILING))
        {
            self.ceiling = None;
        }
        Some(Change::Growth)
    }

    /// The latency target (nanoseconds): the configured one, or the tolerance times the
    /// baseline once there is one.
    fn target(&self, cfg: &Capacity) -> Option<f64> {
        match cfg.latency_target {
            Some(t) => Some(nanos(t) as f64),
            None => self
                .baseline
                .get()
                .map(|b| b as f64 * cfg.latency_tolerance),
        }
    }

    fn cut(&mut self, to: f64) {
        self.ceiling = Some(self.limit);
        self.limit = to.max(self.min);
    }
}

fn nanos(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
