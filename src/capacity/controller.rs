//! The adaptive controller of one bucket: its current limit, moved by the latency and the
//! status of the responses it admitted. Pure arithmetic on times it is given (nanoseconds of
//! the layer's clock): no lock, no clock, no I/O.
//!
//! Feedback is gathered over an interval ([`Capacity::interval`]) and judged once at its end,
//! so that a burst of failures of requests admitted together counts as one signal:
//!
//! - an overload status (429, 502, 503, 504, an inner error), or a caller that gave up past
//!   its patience without the response's head: the limit is multiplied by
//!   [`Capacity::decrease`] (or cut to the knee's figure below, if lower);
//! - else, the *knee*: an upstream answers at its calm latency up to its capacity, and past
//!   it (a GPU's batch that no longer fits) every answer slows with the load. The calm
//!   latency is learned from the intervals below the knee (the mean time to first byte, a
//!   moving average, and the variance of their answers alike); an interval whose mean passes
//!   [`Capacity::latency_tolerance`] times it, and its noise (four standard errors of the
//!   mean, from the larger of the interval's variance and the calm one), is past the knee,
//!   and the limit goes to where the latency would be calm again: the load in flight times
//!   `calm / mean` (Little's law with a latency growing in proportion to the load past the
//!   knee; halved at most). Past the knee the figure is the capacity itself, so one step
//!   lands on it (Envoy's adaptive concurrency and Netflix's Gradient2 scale by a gradient
//!   against a minimum latency the same way, with more headroom);
//! - with a [`Capacity::latency_target`], also: when the requests in flight reached half the
//!   limit, a mean past the target scales the limit by `target / mean` (halved at most);
//! - else, when the requests in flight reached half the limit, it grows: by 10% (at least 1)
//!   per interval, and by 2% while it is within 10% of the mark the last cut left (the knee
//!   found, the limit an overload cut started from). A load past the knee found is a probe,
//!   ended by any rise beyond the noise and half the tolerance, so the limit reads the
//!   capacity, now and then one slot more. A limit 10% past the mark forgets it: the
//!   capacity came back.
//!
//! After a cut, the requests admitted under the old limit keep the upstream as busy as
//! before until enough of them have ended (counted by `Controller::released`; at most
//! five intervals): answers to requests sent before then are not judged, or they would cut
//! again for the same overload.
//!
//! A cut past the knee is checked at the next interval: if the load in flight fell and the
//! latency stayed, the upstream got slower for everyone (longer prompts, a bigger model), not
//! busier: the calm latency moves to the new one and the limit goes back. Before any calm
//! latency is known, a limit in use is calibrated the same way: halved until the latency
//! stops falling with it (see `Controller::calibrate`).

use super::Capacity;

/// Why a controller's limit changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Change {
    /// The upstream answered 429, 502, 503 or 504, or failed.
    Overload,
    /// The mean time to the response head went past the knee (its calm latency times the
    /// tolerance) or past the latency target.
    Latency,
    /// Responses came back calm while the limit was in use.
    Growth,
    /// The upstream's calm latency moved: a cut past the knee lowered the load but not the
    /// latency, so the limit went back and the new latency is the calm one.
    Baseline,
}

impl Change {
    /// A short lower-case name (`overload`, `latency`, `growth`, `baseline`), for a metric's
    /// label or a log.
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Overload => "overload",
            Change::Latency => "latency",
            Change::Growth => "growth",
            Change::Baseline => "baseline",
        }
    }
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
    /// stalled upstream): an overload past the controller's patience, nothing before it (a
    /// lower bound of a latency would bias the mean low).
    Abandoned(u64),
}

impl Signal {
    fn elapsed(self) -> u64 {
        match self {
            Signal::Latency(l) | Signal::Overload(l) | Signal::Abandoned(l) => l,
        }
    }
}

/// Share of growth per interval, and near the last mark.
const FAST_GROWTH: f64 = 0.10;
const SLOW_GROWTH: f64 = 0.02;
/// How close to the last mark growth slows, and how far past it it is forgotten.
const NEAR_CEILING: f64 = 0.10;
/// The most one latency judgement cuts the limit by.
const MIN_GRADIENT: f64 = 0.5;
/// Fewest answers in an interval for its mean to say anything of the knee.
const MIN_SAMPLES: u64 = 8;
/// How many standard errors of an interval's mean past the calm latency count as a rise
/// (so that a mix of short and long prompts is not taken for a knee by chance: about once
/// in 30,000 intervals for a normal mean; such a cut is undone by the check of the next
/// interval if that one looks past the knee too, else the limit grows back from it).
const NOISE: f64 = 4.0;
/// A cut past the knee is checked at the next interval: if the load fell by this share at
/// least and the latency by no more than this share (or within its noise), the upstream is
/// slower for everyone, not busier.
const LOAD_FALL: f64 = 0.10;
const LATENCY_FALL: f64 = 0.05;
/// The longest wait (in intervals) for the requests admitted under a higher limit to drain
/// after a cut before answers are judged again.
const MAX_DRAIN_INTERVALS: u64 = 5;
/// Without a target, a caller gone after this many times the calm latency without the
/// response's head counts as an overload.
const PATIENCE: f64 = 2.0;

/// One bucket's controller.
#[derive(Debug, Clone)]
pub(crate) struct Controller {
    min: f64,
    max: f64,
    limit: f64,
    /// The mark the last cut left (the knee found, where an overload cut started), until
    /// the limit passes it by [`NEAR_CEILING`].
    ceiling: Option<f64>,
    /// Feedback of the interval under way.
    window: Window,
    /// The mean latency below the knee (nanoseconds), a moving average of calm intervals.
    calm: Option<f64>,
    /// The variance of the latencies of calm intervals, a moving average alike.
    calm_variance: f64,
    /// The last cut past the knee (or of the calibration), to check at the next interval.
    check: Option<Check>,
    /// From when answers say something of the limit in force (nanoseconds): after a cut,
    /// once the requests admitted under the higher limit have drained. Answers to requests
    /// sent before are not judged.
    cut_at: Option<u64>,
    /// Releases still to come before the requests in flight at the last cut fit the new
    /// limit.
    drain: u64,
}

/// An interval's mean latency (nanoseconds), its standard error and the mean load in flight.
#[derive(Debug, Clone, Copy)]
struct Point {
    load: f64,
    mean: f64,
    variance: f64,
    error: f64,
}

impl Point {
    /// An interval's point under `limit`, when it has enough answers and decisions to say
    /// anything. Its load is the most in flight a decision saw, up to the limit: a limit in
    /// use is the load (a mean over decisions would count a burst's first admissions, at
    /// 1, 2, 3... in flight, as a light load), and requests still in flight from before a
    /// cut are not the new limit's.
    ///
    /// Its standard error takes the larger of the interval's variance and the calm
    /// intervals' (`calm_variance`): a skewed draw of a mix of short and long prompts has a
    /// small variance of its own just when its mean is far off.
    fn of(w: &Window, limit: f64, calm_variance: f64) -> Option<Point> {
        (w.samples >= MIN_SAMPLES && w.peak_in_flight > 0).then_some(())?;
        Some(Point {
            load: (w.peak_in_flight as f64).min(slots(limit).max(1.0)),
            mean: w.mean(),
            variance: w.variance(),
            error: (w.variance().max(calm_variance) / w.samples as f64).sqrt(),
        })
    }

    /// The point to check after a cut from `limit`.
    fn at(self, limit: f64) -> Check {
        Check { limit, point: self }
    }

    /// How the latency moved from the checked point's: -1 fell, 1 rose, 0 the same (within
    /// [`LATENCY_FALL`] or the noise of both).
    fn moved_from(&self, c: &Check) -> i8 {
        let before = c.point;
        let delta = self.mean - before.mean;
        let noise = (before.mean * LATENCY_FALL)
            .max(NOISE * (before.error.powi(2) + self.error.powi(2)).sqrt());
        if delta.abs() <= noise {
            0
        } else if delta < 0.0 {
            -1
        } else {
            1
        }
    }
}

/// A cut to check at the next interval: the limit before it and the point that made it.
#[derive(Debug, Clone, Copy)]
struct Check {
    limit: f64,
    point: Point,
}

#[derive(Debug, Clone, Default)]
struct Window {
    started: Option<u64>,
    samples: u64,
    /// Sum and sum of squares of the latencies (nanoseconds).
    latency_sum: f64,
    latency_squares: f64,
    overloaded: bool,
    peak_in_flight: u64,
    /// What the interval's last decision saw in flight.
    last_in_flight: u64,
}

impl Window {
    fn mean(&self) -> f64 {
        self.latency_sum / self.samples as f64
    }

    /// The variance of the latencies (0 below two samples).
    fn variance(&self) -> f64 {
        if self.samples < 2 {
            return 0.0;
        }
        let n = self.samples as f64;
        ((self.latency_squares - self.latency_sum * self.latency_sum / n) / (n - 1.0)).max(0.0)
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
            calm: None,
            calm_variance: 0.0,
            check: None,
            cut_at: None,
            drain: 0,
        }
    }

    /// A request of the bucket ended at `now` (its slot is back): counts towards the drain
    /// after a cut.
    pub(crate) fn released(&mut self, now: u64) {
        if self.drain > 0 {
            self.drain -= 1;
            if self.drain == 0 {
                self.cut_at = self.cut_at.map(|at| at.min(now));
            }
        }
    }

    /// Whether releases are still counted towards a drain.
    pub(crate) fn is_draining(&self) -> bool {
        self.drain > 0
    }

    /// The limit in force: whole slots, within `[min, max]`.
    pub(crate) fn limit(&self) -> u64 {
        (slots(self.limit) as u64).clamp(self.min as u64, self.max as u64)
    }

    /// A controller that knows its upstream's calm latency already (nanoseconds).
    #[cfg(test)]
    pub(crate) fn with_calm(cfg: &Capacity, calm: u64) -> Self {
        Self {
            calm: Some(calm as f64),
            ..Self::new(cfg)
        }
    }

    /// The calm latency learned (nanoseconds), if any.
    #[cfg(test)]
    pub(crate) fn calm(&self) -> Option<f64> {
        self.calm
    }

    /// A decision on a request saw `in_flight` slots taken (itself included when admitted).
    pub(crate) fn saw_in_flight(&mut self, in_flight: u64) {
        self.window.peak_in_flight = self.window.peak_in_flight.max(in_flight);
        self.window.last_in_flight = in_flight;
    }

    /// Feedback from one response at `now`; judges the interval when it is over. Returns the
    /// change of limit, if any, as (old, new, why).
    pub(crate) fn sample(
        &mut self,
        cfg: &Capacity,
        now: u64,
        signal: Signal,
    ) -> Option<(u64, u64, Change)> {
        let sent = now.saturating_sub(signal.elapsed());
        if self.cut_at.is_some_and(|cut| sent < cut) {
            return None;
        }
        if let Signal::Abandoned(l) = signal {
            if !self.patience(cfg).is_some_and(|t| l as f64 > t) {
                return None;
            }
        }
        let started = *self.window.started.get_or_insert(now);
        match signal {
            Signal::Overload(_) | Signal::Abandoned(_) => self.window.overloaded = true,
            Signal::Latency(l) => {
                let l = l as f64;
                self.window.samples += 1;
                self.window.latency_sum += l;
                self.window.latency_squares += l * l;
            }
        }
        if now.saturating_sub(started) < nanos(cfg.interval) {
            return None;
        }
        let window = std::mem::take(&mut self.window);
        let before = self.limit();
        let in_flight = window.last_in_flight.min(before);
        let why = self.judge(cfg, &window);
        let after = self.limit();
        if matches!(why, Some(Change::Overload | Change::Latency)) {
            // The requests admitted under the old limit (as many as the interval's last
            // decision saw in flight) keep the upstream as busy as before until enough have
            // ended to fit the new one: the answers of requests sent meanwhile would judge
            // the old load again (cut again, or look like an upstream slower for everyone).
            // Bounded: a stream held open for long doesn't freeze it.
            self.drain = in_flight.saturating_sub(after);
            self.cut_at = Some(if self.drain == 0 {
                now
            } else {
                now.saturating_add(nanos(cfg.interval).saturating_mul(MAX_DRAIN_INTERVALS))
            });
        }
        (after != before).then_some((before, after, why?))
    }

    fn judge(&mut self, cfg: &Capacity, w: &Window) -> Option<Change> {
        let point = Point::of(w, self.limit, self.calm_variance);
        let in_use = (w.peak_in_flight as f64) * 2.0 >= self.limit;
        let calm = self.calm.unwrap_or(f64::INFINITY);
        // Past the knee: the mean beyond the tolerance and the noise. A load past the knee
        // found is a probe, and any rise beyond the noise (and half the tolerance) ends it.
        let past_knee = point.is_some_and(|p| {
            let probing = self.ceiling.is_some_and(|c| p.load > c);
            let tolerance = if probing {
                half_way(cfg.latency_tolerance)
            } else {
                cfg.latency_tolerance
            };
            p.mean > (calm * tolerance).max(calm + NOISE * p.error)
        });
        if w.overloaded {
            // Answers that did come back past the knee, the limit in use, tell how far past
            // it the load is: the cut goes no higher than the knee (halved at most, unless
            // `decrease` says more).
            let knee = match point {
                Some(p) if past_knee && in_use => p.load * calm / p.mean,
                _ => f64::INFINITY,
            };
            let to = (self.limit * cfg.decrease)
                .min(knee)
                .max(self.limit * cfg.decrease.min(MIN_GRADIENT));
            match &mut self.check {
                // A calibration under way compares its next clean interval still; going
                // back, it goes no higher than this cut.
                Some(c) if self.calm.is_none() => c.limit = c.limit.min(to),
                _ => self.check = None,
            }
            self.cut(to);
            return Some(Change::Overload);
        }
        if w.samples == 0 {
            return None;
        }
        // A cut waits for an interval that says something to be checked.
        let check = if point.is_some() {
            self.check.take()
        } else {
            None
        };
        if let (None, Some(p)) = (self.calm, point) {
            return Some(self.calibrate(cfg, check, p, in_use));
        }
        if let (true, Some(c), Some(p)) = (past_knee, check, point) {
            if p.load <= c.point.load * (1.0 - LOAD_FALL) && p.moved_from(&c) == 0 {
                // Less load, the same latency: the upstream is slower for everyone (or the
                // cut was the noise's).
                self.calm = Some(p.mean.max(calm));
                self.calm_variance = self.calm_variance.max(p.variance);
                self.limit = c.limit.max(self.limit);
                self.ceiling = None;
                return Some(Change::Baseline);
            }
        }
        let mean = w.mean();
        // Where the limit goes for latency: past the knee, the load at which the latency
        // would be calm; past a target (in use), the load at which it would meet it.
        let mut to = point.filter(|_| past_knee).map(|p| p.load * calm / p.mean);
        if let Some(target) = cfg.latency_target.map(|t| nanos(t) as f64) {
            if in_use && mean > target {
                let at_target = self.limit * target / mean;
                to = Some(to.map_or(at_target, |k| k.min(at_target)));
            }
        }
        if let Some(to) = to {
            let to = to.max(self.limit * MIN_GRADIENT);
            if to >= self.limit {
                // Past the knee at a load under the limit: nothing to cut yet.
                return None;
            }
            // A run of cuts at the same latency is checked against its first: a rise that
            // stays (longer prompts) would else be cut a step at a time, never 10% at once.
            self.check = point.filter(|_| past_knee).map(|p| match check {
                Some(first) if p.moved_from(&first) == 0 => first,
                _ => p.at(self.limit),
            });
            self.limit = to.max(self.min);
            // Growth is slow from here: this is where the upstream's capacity is.
            self.ceiling = Some(self.limit);
            return Some(Change::Latency);
        }
        // Calm: its mean teaches the calm latency.
        if let (Some(p), true) = (point, calm.is_finite()) {
            // Only from loads under the knee found, and means within half the tolerance (or
            // two standard errors): answers at the knee, or a little past it, are slower by
            // a little, and would creep the calm latency (and the knee with it) up.
            let under_knee = !self.ceiling.is_some_and(|c| p.load >= c);
            let near_calm =
                p.mean <= (calm * half_way(cfg.latency_tolerance)).max(calm + 2.0 * p.error);
            if under_knee && near_calm {
                let gain =
                    (nanos(cfg.interval) as f64 / nanos(cfg.baseline_window) as f64).min(1.0);
                self.calm = Some(calm + gain * (p.mean - calm));
                self.calm_variance += gain * (p.variance - self.calm_variance);
            }
        }
        self.grow(in_use)
    }

    /// Before the calm latency is known. At low load the first interval's mean is taken as
    /// calm. A limit in use may already be past the knee (a start at `max` under full load),
    /// where every answer is slow: halving the limit tells. If the latency does not fall
    /// with the load, both loads were below the knee (the limit goes back); if it falls less
    /// than in proportion, the knee is between them, at `load x new mean / old mean`; if in
    /// proportion, both were past it: halve again.
    fn calibrate(
        &mut self,
        cfg: &Capacity,
        check: Option<Check>,
        p: Point,
        in_use: bool,
    ) -> Change {
        let Some(c) = check else {
            if !in_use || self.limit <= self.min {
                self.calm = Some(p.mean);
                self.calm_variance = p.variance;
                return self.grow(in_use).unwrap_or(Change::Growth);
            }
            self.check = Some(p.at(self.limit));
            self.limit = (p.load.min(self.limit) * MIN_GRADIENT).max(self.min);
            return Change::Latency;
        };
        let moved = p.moved_from(&c);
        if p.load > c.point.load * (1.0 - LOAD_FALL) || moved == 0 {
            // The load did not fall (nothing to compare), or the latency stayed: calm.
            self.calm = Some(p.mean);
            self.calm_variance = p.variance;
            self.limit = c.limit.max(self.limit);
            return Change::Baseline;
        }
        let ratio = p.mean / c.point.mean;
        if (moved < 0 && ratio > p.load / c.point.load * cfg.latency_tolerance)
            || self.limit <= self.min
        {
            // The knee is between the two loads (or the limit can't go lower).
            self.calm = Some(p.mean);
            self.calm_variance = p.variance;
            self.limit = (c.point.load * ratio).clamp(self.min, c.limit);
            self.ceiling = Some(self.limit);
            return Change::Latency;
        }
        self.check = Some(p.at(self.limit));
        self.limit = (p.load.min(self.limit) * MIN_GRADIENT).max(self.min);
        Change::Latency
    }

    fn grow(&mut self, in_use: bool) -> Option<Change> {
        if !in_use {
            return None;
        }
        let share = match self.ceiling {
            Some(c) if self.limit >= c * (1.0 - NEAR_CEILING) => SLOW_GROWTH * self.limit,
            _ => (FAST_GROWTH * self.limit).max(1.0),
        };
        self.limit = (self.limit + share).min(self.max);
        if self
            .ceiling
            .is_some_and(|c| self.limit > c * (1.0 + NEAR_CEILING))
        {
            self.ceiling = None;
        }
        Some(Change::Growth)
    }

    /// How long (nanoseconds) a caller may wait for the response's head before its leaving
    /// says the upstream is overloaded: the latency target, or twice the calm latency.
    fn patience(&self, cfg: &Capacity) -> Option<f64> {
        match cfg.latency_target {
            Some(t) => Some(nanos(t) as f64),
            None => self.calm.map(|c| c * PATIENCE),
        }
    }

    fn cut(&mut self, to: f64) {
        self.ceiling = Some(self.limit);
        self.limit = to.max(self.min);
    }
}

/// The whole slots of a limit: the small margin keeps 7.9999999 (a knee found by a ratio)
/// at 8.
fn slots(limit: f64) -> f64 {
    (limit + 1e-6).floor()
}

/// Half the way from 1 to `tolerance`.
fn half_way(tolerance: f64) -> f64 {
    1.0 + (tolerance - 1.0) / 2.0
}

fn nanos(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
