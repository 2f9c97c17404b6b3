//! The controller alone: its rules one by one, then against a simulated upstream whose
//! latency grows past its capacity. Time is a number the tests advance: no clock is read.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use super::controller::{Change, Controller, Signal};
use super::Capacity;

const MS: u64 = 1_000_000;
const S: u64 = 1_000 * MS;

fn cfg() -> Capacity {
    Capacity::adaptive(2, 100)
        .initial(20)
        .latency_target(Duration::from_millis(100))
}

/// Feeds one interval of `n` responses of latency `latency_ms` from a limit in full use,
/// ending at `end`.
fn interval(c: &mut Controller, cfg: &Capacity, end: u64, n: u64, latency_ms: u64) {
    while c.is_draining() {
        c.released(end.saturating_sub(2 * S));
    }
    c.saw_in_flight(c.limit());
    for i in 0..n {
        let at = end - S + (i * S / n.max(1));
        c.sample(cfg, at, Signal::Latency(latency_ms * MS));
    }
}

#[test]
fn grows_while_within_target_and_in_use_up_to_max() {
    let cfg = cfg();
    let mut c = Controller::with_calm(&cfg, 50 * MS);
    assert_eq!(c.limit(), 20);
    let mut last = c.limit();
    for k in 1..=60 {
        interval(&mut c, &cfg, k * S, 20, 50);
        assert!(c.limit() >= last, "never shrinks while healthy");
        last = c.limit();
    }
    assert_eq!(c.limit(), 100, "bounded by max");
}

#[test]
fn does_not_grow_when_the_limit_is_not_in_use() {
    let cfg = cfg();
    let mut c = Controller::new(&cfg);
    for k in 1..=10 {
        c.saw_in_flight(5); // 5 in flight of 20: under half
        for i in 0..10 {
            c.sample(&cfg, (k - 1) * S + i * S / 10, Signal::Latency(50 * MS));
        }
    }
    c.sample(&cfg, 11 * S, Signal::Latency(50 * MS));
    assert_eq!(c.limit(), 20);
}

#[test]
fn a_burst_of_overloads_in_one_interval_cuts_once() {
    let cfg = cfg();
    let mut c = Controller::new(&cfg);
    let mut changes = Vec::new();
    for i in 0..=100 {
        if let Some(ch) = c.sample(&cfg, i * 10 * MS, Signal::Overload(0)) {
            changes.push(ch);
        }
    }
    assert_eq!(
        changes,
        vec![(20, 16, Change::Overload)],
        "x0.8 once per interval"
    );
}

#[test]
fn answers_to_requests_sent_before_a_cut_are_not_judged() {
    let cfg = cfg();
    let mut c = Controller::new(&cfg);
    c.sample(&cfg, 0, Signal::Overload(0));
    c.sample(&cfg, S, Signal::Overload(0));
    assert_eq!(c.limit(), 16);
    // Overloads and slow answers of requests sent before the cut (at 1 s), for 3 s more.
    for i in 1..=30 {
        let now = S + i * S / 10;
        assert_eq!(c.sample(&cfg, now, Signal::Overload(now)), None);
        assert_eq!(c.sample(&cfg, now, Signal::Latency(now)), None);
    }
    assert_eq!(c.limit(), 16);
    // One sent after it counts.
    c.sample(&cfg, 5 * S, Signal::Overload(MS));
    let cut = c.sample(&cfg, 6 * S, Signal::Overload(MS));
    assert_eq!(cut, Some((16, 12, Change::Overload)));
}

#[test]
fn overloads_shrink_down_to_min_and_no_further() {
    let cfg = cfg();
    let mut c = Controller::new(&cfg);
    for k in 0..50 {
        c.sample(&cfg, k * S, Signal::Overload(0));
    }
    assert_eq!(c.limit(), 2);
}

#[test]
fn latency_past_the_target_scales_the_limit_by_the_gradient() {
    let cfg = cfg();
    let mut c = Controller::with_calm(&cfg, 150 * MS);
    // Mean 160 ms against 100 ms: 20 x 100/160 = 12.5.
    interval(&mut c, &cfg, S, 10, 160);
    c.sample(&cfg, S + 1, Signal::Latency(160 * MS));
    assert_eq!(c.limit(), 12);
    // Far past the target (once the requests of the old limit have ended): halved at most.
    while c.is_draining() {
        c.released(2 * S);
    }
    c.saw_in_flight(c.limit());
    for i in 0..=10 {
        c.sample(&cfg, 3 * S + i * S / 10, Signal::Latency(1_000 * MS));
    }
    assert_eq!(c.limit(), 6);
}

/// One interval from `start`: `load` in flight, `n` answers of `latency_ms`, then one more
/// at `start` + 1 s that has it judged. Returns the change.
fn judged(
    c: &mut Controller,
    cfg: &Capacity,
    start: u64,
    load: u64,
    n: u64,
    latency_ms: u64,
) -> Option<(u64, u64, Change)> {
    // The requests admitted under a higher limit before a cut have ended.
    while c.is_draining() {
        c.released(start.saturating_sub(S / 2));
    }
    c.saw_in_flight(load);
    for i in 0..n {
        c.sample(cfg, start + i * S / n, Signal::Latency(latency_ms * MS));
    }
    c.sample(cfg, start + S, Signal::Latency(latency_ms * MS))
}

#[test]
fn after_a_cut_answers_are_judged_once_the_requests_admitted_before_it_have_drained() {
    let cfg = Capacity::adaptive(1, 100).initial(40);
    let mut c = Controller::with_calm(&cfg, 100 * MS);
    // 200 ms at 40 in flight: past the knee, cut to 20.
    assert_eq!(
        judged(&mut c, &cfg, 0, 40, 20, 200),
        Some((40, 20, Change::Latency))
    );
    // The 40 admitted before still run: answers of requests sent meanwhile are as slow,
    // and say nothing of 20 in flight.
    for i in 0..30 {
        let now = S + i * S / 10;
        assert_eq!(c.sample(&cfg, now, Signal::Latency(200 * MS)), None);
    }
    // 19 of the 20 too many end: still not judged; the 20th: from now on.
    for _ in 0..19 {
        c.released(4 * S);
    }
    assert_eq!(c.sample(&cfg, 5 * S, Signal::Latency(200 * MS)), None);
    c.released(5 * S);
    assert!(!c.is_draining());
    // 150 ms with 20 in flight: judged, still past the knee: 20 x 100/150.
    c.saw_in_flight(20);
    for i in 0..20 {
        c.sample(
            &cfg,
            5 * S + 200 * MS + i * S / 20,
            Signal::Latency(150 * MS),
        );
    }
    let cut = c.sample(&cfg, 6 * S + 200 * MS, Signal::Latency(150 * MS));
    assert_eq!(cut, Some((20, 13, Change::Latency)));
    // A stream held open for long doesn't freeze it: 5 intervals past the cut (at 1 s),
    // answers are judged anyway.
    let mut c = Controller::with_calm(&cfg, 100 * MS);
    judged(&mut c, &cfg, 0, 40, 20, 200);
    assert!(c.is_draining());
    c.saw_in_flight(20);
    for i in 0..20 {
        c.sample(&cfg, 7 * S + i * S / 20, Signal::Latency(150 * MS));
    }
    let cut = c.sample(&cfg, 8 * S, Signal::Latency(150 * MS));
    assert_eq!(cut, Some((20, 13, Change::Latency)));
}

#[test]
fn past_the_knee_the_limit_goes_to_the_load_at_which_the_latency_is_calm() {
    let cfg = Capacity::adaptive(1, 100).initial(40); // tolerance 1.05, no target
    let mut c = Controller::with_calm(&cfg, 100 * MS);
    // Calm: 100 ms at 40 in flight; it grows, and the calm latency is learned.
    assert_eq!(
        judged(&mut c, &cfg, 0, 40, 20, 100),
        Some((40, 44, Change::Growth))
    );
    assert_eq!(c.calm(), Some(100.0 * MS as f64));
    // 44 in flight answer in 110 ms (10% past calm: past the knee): the latency grew with
    // the load past 40, so the capacity is 44 x 100/110 = 40.
    assert_eq!(
        judged(&mut c, &cfg, 2 * S, 44, 20, 110),
        Some((44, 40, Change::Latency))
    );
    // From the knee it probes by 2% an interval, not 10%: 40.8, 41.6.
    assert_eq!(judged(&mut c, &cfg, 4 * S, 40, 20, 100), None);
    assert_eq!(c.limit(), 40);
    // 4% past calm is within the tolerance: it grows on.
    assert_eq!(
        judged(&mut c, &cfg, 6 * S, 40, 20, 104),
        Some((40, 41, Change::Growth))
    );
}

#[test]
fn a_rise_within_the_noise_of_a_mix_of_prompts_is_not_a_knee() {
    // Short (20 ms) and long (200 ms) prompts drawn at random, 30 answers an interval, the
    // limit in use, for an hour: interval means wander by ~15% around 110 ms, often past
    // 1.05 x calm, but within four standard errors. The first interval in use halves the
    // limit to learn the calm latency (a calibration), the next puts it back; then no cut.
    let cfg = Capacity::adaptive(1, 64).initial(32);
    let mut c = Controller::new(&cfg);
    let mut x: u64 = 0;
    let mut changes = Vec::new();
    for k in 1..=3_600 {
        c.saw_in_flight(c.limit());
        for i in 0..30 {
            // splitmix64
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            let ms = if z >> 63 == 0 { 20 } else { 200 };
            let now = (k - 1) * S + i * S / 30;
            changes.extend(c.sample(&cfg, now, Signal::Latency(ms * MS)));
            c.released(now);
        }
    }
    assert_eq!(
        changes[..2],
        [(32, 16, Change::Latency), (16, 32, Change::Baseline)]
    );
    assert!(
        changes[2..].iter().all(|ch| ch.2 == Change::Growth),
        "{changes:?}"
    );
    assert_eq!(c.limit(), 64);
}

#[test]
fn an_upstream_slower_for_everyone_moves_the_calm_latency_after_one_cut() {
    let cfg = Capacity::adaptive(1, 100).initial(40);
    let mut c = Controller::with_calm(&cfg, 100 * MS);
    judged(&mut c, &cfg, 0, 40, 20, 100);
    assert_eq!(c.limit(), 44);
    // Every answer now takes 200 ms (longer prompts), whatever the load: past the knee,
    // cut by half at most.
    assert_eq!(
        judged(&mut c, &cfg, 2 * S, 44, 20, 200),
        Some((44, 22, Change::Latency))
    );
    // Half the load, the same latency: not a knee. The limit goes back, 200 ms is calm.
    assert_eq!(
        judged(&mut c, &cfg, 4 * S, 22, 20, 200),
        Some((22, 44, Change::Baseline))
    );
    assert_eq!(c.calm(), Some(200.0 * MS as f64));
    assert_eq!(
        judged(&mut c, &cfg, 6 * S, 44, 20, 200),
        Some((44, 48, Change::Growth))
    );
}

#[test]
fn latency_at_low_load_is_not_judged() {
    let cfg = cfg(); // target 100 ms, limit 20
    let mut c = Controller::with_calm(&cfg, 400 * MS);
    // One request in flight of 20, slow (a long prompt): no cut.
    for k in 1..=5 {
        c.saw_in_flight(1);
        c.sample(&cfg, k * S, Signal::Latency(400 * MS));
        c.sample(&cfg, k * S + S / 2, Signal::Latency(400 * MS));
    }
    assert_eq!(c.limit(), 20);
    // Half the limit in flight, as slow: cut (by half at most).
    c.saw_in_flight(10);
    c.sample(&cfg, 6 * S, Signal::Latency(400 * MS));
    let cut = c.sample(&cfg, 7 * S, Signal::Latency(400 * MS));
    assert_eq!(cut, Some((20, 10, Change::Latency)));
}

#[test]
fn a_few_freak_fast_answers_do_not_make_the_others_look_slow() {
    let cfg = Capacity::adaptive(1, 100).initial(40);
    let mut c = Controller::with_calm(&cfg, 95 * MS);
    // 1 answer in 20 is 1 ms (an error body, a cached reply), the rest 100 ms: the calm
    // latency is their mean, and the same mix again is calm.
    let mut judged = Vec::new();
    for k in 0..10 {
        c.saw_in_flight(c.limit());
        for i in 0..20 {
            let latency = if i == 0 { MS } else { 100 * MS };
            judged.extend(c.sample(&cfg, k * S + i * S / 20, Signal::Latency(latency)));
        }
    }
    assert!(judged.len() >= 4, "{judged:?}");
    assert!(judged.iter().all(|j| j.2 == Change::Growth), "{judged:?}");
}

#[test]
fn a_caller_gone_past_its_patience_without_an_answer_is_an_overload() {
    // No target: twice the calm latency (100 ms) = 200 ms.
    let cfg = Capacity::adaptive(1, 100).initial(40);
    let mut c = Controller::new(&cfg);
    // Before any calm latency is known, a caller gone says nothing.
    c.sample(&cfg, 0, Signal::Abandoned(10 * S));
    // 100 ms at low load (10 in flight of 40): the calm latency.
    judged(&mut c, &cfg, 0, 10, 20, 100);
    assert_eq!(c.calm(), Some(100.0 * MS as f64));
    // Gone after 150 ms: nothing to judge.
    c.sample(&cfg, 2 * S, Signal::Abandoned(150 * MS));
    assert_eq!(c.sample(&cfg, 3 * S, Signal::Abandoned(150 * MS)), None);
    assert_eq!(c.limit(), 40);
    // Gone after 10 s: an overload, at any load.
    c.sample(&cfg, 4 * S, Signal::Abandoned(10 * S));
    let cut = c.sample(&cfg, 5 * S, Signal::Abandoned(10 * S));
    assert_eq!(cut, Some((40, 32, Change::Overload)));
}

#[test]
fn a_start_past_the_knee_halves_the_limit_until_the_latency_stops_falling_with_it() {
    // A server of capacity 40 at 100 ms, a start at 256 under full load: 640 ms.
    let cfg = Capacity::adaptive(1, 256);
    let mut c = Controller::new(&cfg);
    let latency = |load: u64| 100 * load.max(40) / 40;
    let mut changes = Vec::new();
    for k in 0..6 {
        let load = c.limit();
        changes.extend(judged(&mut c, &cfg, 2 * k * S, load, 20, latency(load)));
    }
    assert_eq!(
        changes[..4],
        [
            // 640 ms at 256, 320 at 128: in proportion, both past the knee.
            (256, 128, Change::Latency),
            (128, 64, Change::Latency),
            // 160 ms at 64, 100 at 32: the knee is between, at 64 x 100/160.
            (64, 32, Change::Latency),
            (32, 40, Change::Latency),
        ]
    );
    assert_eq!(c.calm(), Some(100.0 * MS as f64));
    // A limit under the knee: one halving, then back.
    let mut c = Controller::new(&cfg.clone().initial(20));
    assert_eq!(
        judged(&mut c, &cfg, 0, 20, 20, 100),
        Some((20, 10, Change::Latency))
    );
    assert_eq!(
        judged(&mut c, &cfg, 2 * S, 10, 20, 100),
        Some((10, 20, Change::Baseline))
    );
}

#[test]
fn a_configuration_problem_is_named() {
    assert!(Capacity::adaptive(0, 4).problem().unwrap().contains("min"));
    assert!(Capacity::adaptive(5, 4)
        .problem()
        .unwrap()
        .contains("above max"));
    assert!(Capacity::adaptive(1, 4).initial(9).problem().is_some());
    assert!(Capacity::adaptive(1, 4).decrease(1.0).problem().is_some());
    assert!(Capacity::adaptive(1, 4)
        .latency_tolerance(0.9)
        .problem()
        .is_some());
    assert!(Capacity::adaptive(1, 4)
        .interval(Duration::ZERO)
        .problem()
        .is_some());
    assert!(Capacity::adaptive(1, 4)
        .latency_target(Duration::ZERO)
        .problem()
        .is_some());
    assert_eq!(Capacity::adaptive(1, 4).problem(), None);
    assert!(!Capacity::fixed(4).is_adaptive());
}

/// An upstream that serves `capacity` requests at `base` latency and slows every request
/// in proportion past it (as a GPU batch does), under a load that always wants more than the
/// limit. Returns the limit at every tick (10 ms).
fn simulate(cfg: &Capacity, base: u64, phases: &[(u64, u64)]) -> Vec<(u64, u64)> {
    const TICK: u64 = 10 * MS;
    let mut c = Controller::new(cfg);
    let mut in_flight: BinaryHeap<Reverse<(u64, u64)>> = BinaryHeap::new();
    let mut trace = Vec::new();
    let end = phases.last().map_or(0, |p| p.0);
    let mut now = 0;
    while now < end {
        let capacity = phases.iter().find(|p| now < p.0).map_or(1, |p| p.1);
        while let Some(Reverse((done, started))) = in_flight.peek().copied() {
            if done > now {
                break;
            }
            in_flight.pop();
            c.sample(cfg, now, Signal::Latency(done - started));
            c.released(now);
        }
        // The requests admitted together run together: each is as slow as the load once
        // they are all in.
        let admitted = c.limit().saturating_sub(in_flight.len() as u64);
        let n = in_flight.len() as u64 + admitted;
        let latency = base * n.max(capacity) / capacity;
        for _ in 0..admitted {
            c.saw_in_flight(n);
            in_flight.push(Reverse((now + latency, now)));
        }
        trace.push((now, c.limit()));
        now += TICK;
    }
    trace
}

/// Every limit of `trace` between `from` and `to`.
fn limits(trace: &[(u64, u64)], from: u64, to: u64) -> impl Iterator<Item = u64> + '_ {
    trace
        .iter()
        .filter(move |(t, _)| (from..to).contains(t))
        .map(|&(_, l)| l)
}

fn within(l: u64, capacity: u64, share: f64) -> bool {
    (l as f64 - capacity as f64).abs() <= capacity as f64 * share
}

/// The limit of `cfg` against a simulated server of 200 ms whose capacity is 64, then 32
/// from 60 s, then 64 again from 120 s: settled on 64 before the drop, within 10% of 32 in
/// under 10 s and for good, back within 10% of 64 in under 30 s and for good.
fn assert_follows(cfg: &Capacity) {
    let trace = simulate(cfg, 200 * MS, &[(60 * S, 64), (120 * S, 32), (200 * S, 64)]);
    for l in limits(&trace, 40 * S, 60 * S) {
        assert!(within(l, 64, 0.10), "before the drop: {l}");
    }
    let first_within = |from: u64, level: u64| {
        trace
            .iter()
            .find(|&&(t, l)| t >= from && within(l, level, 0.10))
            .map(|&(t, _)| t - from)
    };
    let settled = first_within(60 * S, 32).expect("settles on 32");
    assert!(settled < 10 * S, "settled after {} ms", settled / MS);
    for l in limits(&trace, 70 * S, 120 * S) {
        assert!(within(l, 32, 0.10), "after the drop: {l}");
    }
    let regained = first_within(120 * S, 64).expect("regains 64");
    assert!(regained < 30 * S, "regained after {} ms", regained / MS);
    for l in limits(&trace, 150 * S, 200 * S) {
        assert!(within(l, 64, 0.10), "after the recovery: {l}");
    }
}

#[test]
fn follows_a_capacity_that_halves_then_comes_back() {
    // A target 5% above the unloaded time to first byte (200 ms).
    assert_follows(&Capacity::adaptive(1, 128).latency_target(Duration::from_millis(210)));
}

#[test]
fn follows_the_capacity_with_the_defaults() {
    // No target, the default tolerance, from a start at max: the knee.
    assert_follows(&Capacity::adaptive(1, 256));
}

#[test]
fn an_hour_past_the_knee_does_not_creep() {
    // Saturated for an hour: the calm latency is not learned from answers past the knee,
    // so the limit stays on the capacity instead of creeping up with it.
    let cfg = Capacity::adaptive(1, 256);
    let trace = simulate(&cfg, 200 * MS, &[(3_600 * S, 40)]);
    for l in limits(&trace, 60 * S, 3_600 * S) {
        assert!(within(l, 40, 0.10), "{l}");
    }
}

proptest::proptest! {
    /// Whatever the upstream answers and whenever: the limit stays within `[min, max]`, and
    /// changes at most once per interval.
    #[test]
    fn any_feedback_keeps_the_limit_in_bounds_and_changes_it_once_per_interval(
        min in 1u64..20,
        span in 0u64..100,
        events in proptest::collection::vec((0u64..400, 0u64..2_000, proptest::bool::weighted(0.2), 0u64..200), 1..300),
    ) {
        let max = min + span;
        let cfg = Capacity::adaptive(min, max).latency_target(Duration::from_millis(300));
        let mut c = Controller::new(&cfg);
        let mut now = 0;
        let mut last_change: Option<u64> = None;
        for (step_ms, latency_ms, overload, in_flight) in events {
            now += step_ms * MS;
            c.saw_in_flight(in_flight);
            let signal = if overload { Signal::Overload(0) } else { Signal::Latency(latency_ms * MS) };
            if c.sample(&cfg, now, signal).is_some() {
                if let Some(at) = last_change {
                    proptest::prop_assert!(now - at >= S, "two changes within an interval");
                }
                last_change = Some(now);
            }
            proptest::prop_assert!((min..=max).contains(&c.limit()), "{} outside [{min}, {max}]", c.limit());
        }
    }
}

/// One interval from `start` like [`judged`], with one overload among its answers.
fn overloaded(
    c: &mut Controller,
    cfg: &Capacity,
    start: u64,
    load: u64,
    latency_ms: u64,
) -> Option<(u64, u64, Change)> {
    while c.is_draining() {
        c.released(start.saturating_sub(S / 2));
    }
    c.saw_in_flight(load);
    for i in 0..20 {
        c.sample(cfg, start + i * S / 20, Signal::Latency(latency_ms * MS));
    }
    c.sample(cfg, start + S / 2, Signal::Overload(MS));
    c.sample(cfg, start + S, Signal::Latency(latency_ms * MS))
}

#[test]
fn a_small_rise_that_stays_is_cut_for_two_intervals_then_taken_as_calm() {
    // Every answer 7% slower from now on (longer prompts), the knee far away: a run of cuts
    // at the same latency is checked against its first, so the limit goes back once the
    // load has fallen 10% without the latency following, instead of a cut at a time.
    let cfg = Capacity::adaptive(1, 100).initial(40);
    let mut c = Controller::with_calm(&cfg, 100 * MS);
    let mut limits = Vec::new();
    for k in 0..4 {
        let load = c.limit();
        let change = judged(&mut c, &cfg, 2 * k * S, load, 20, 107);
        limits.push((c.limit(), change.map(|ch| ch.2)));
    }
    assert_eq!(
        limits,
        [
            (37, Some(Change::Latency)),
            (34, Some(Change::Latency)),
            (40, Some(Change::Baseline)),
            (44, Some(Change::Growth)),
        ]
    );
    assert_eq!(c.calm(), Some(107.0 * MS as f64));
}

#[test]
fn a_calibration_halves_from_the_load_in_flight_not_the_limit() {
    // A start at 64 with 33 in flight (the limit in use) on a server of capacity 8: halving
    // the limit to 32 would change nothing; halving the load does, down to the knee.
    let cfg = Capacity::adaptive(1, 64);
    let mut c = Controller::new(&cfg);
    let latency = |load: u64| 100 * load.max(8) / 8;
    let mut load = 33;
    for k in 0..6 {
        judged(&mut c, &cfg, 2 * k * S, load, 20, latency(load));
        load = load.min(c.limit());
        if c.calm().is_some() {
            break;
        }
    }
    assert_eq!(c.calm(), Some(100.0 * MS as f64));
    assert_eq!(c.limit(), 8);
}

#[test]
fn an_overload_cut_honours_a_decrease_below_one_half() {
    let cfg = Capacity::adaptive(1, 100).initial(40).decrease(0.25);
    let mut c = Controller::with_calm(&cfg, 100 * MS);
    assert_eq!(
        overloaded(&mut c, &cfg, 0, 40, 100),
        Some((40, 10, Change::Overload))
    );
}

#[test]
fn an_overload_at_low_load_is_cut_by_decrease_not_by_the_knee() {
    // 10 in flight of 40, answers 10% slower than calm, one 503: x0.8, not 10 x 100/110.
    let cfg = Capacity::adaptive(1, 100).initial(40);
    let mut c = Controller::with_calm(&cfg, 100 * MS);
    assert_eq!(
        overloaded(&mut c, &cfg, 0, 10, 110),
        Some((40, 32, Change::Overload))
    );
}

#[test]
fn overloads_during_a_calibration_do_not_halve_it_to_min() {
    // A flat 100 ms upstream that answers a 429 every other interval (a provider's quota),
    // the limit always in use: the calibration compares its next clean interval with the
    // first one, learns the calm latency, and only the overload cuts remain.
    let cfg = Capacity::adaptive(1, 64);
    let mut c = Controller::new(&cfg);
    for k in 0..8 {
        let load = c.limit();
        if k % 2 == 1 {
            overloaded(&mut c, &cfg, 2 * k * S, load, 100);
        } else {
            judged(&mut c, &cfg, 2 * k * S, load, 20, 100);
        }
    }
    // Four overload cuts of x0.8 from 32 with growth between them: 15. (Halving on every
    // clean interval instead: 1.)
    assert_eq!(c.calm(), Some(100.0 * MS as f64));
    assert_eq!(c.limit(), 15);
}
