//! Reference-model property tests for the algorithms: random charges, settlements and clock
//! steps against simple, obviously-correct models.

use proptest::prelude::*;
use tower_llm_ratelimit::algorithm::{CalendarPeriod, Limits, Placement, State, Verdict};
use tower_llm_ratelimit::Algorithm;

#[derive(Debug, Clone)]
enum Op {
    /// Advance the clock by `dt`, then try to charge `cost`.
    Charge { dt: u64, cost: u64 },
    /// Settle the `nth` earlier admitted charge (mod count) to `actual_pct`% of its amount.
    Settle { nth: usize, actual_pct: u64 },
}

fn ops(w: u64, limit: u64) -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        4 => (0..w / 2, 0..=limit + 2).prop_map(|(dt, cost)| Op::Charge { dt, cost }),
        1 => (0..w * 3, 0..=limit + 2).prop_map(|(dt, cost)| Op::Charge { dt, cost }),
        1 => (any::<usize>(), 0..=200u64).prop_map(|(nth, actual_pct)| Op::Settle { nth, actual_pct }),
    ];
    prop::collection::vec(op, 1..120)
}

fn params() -> impl Strategy<Value = (u64, u64)> {
    (
        1..20u64,
        prop_oneof![Just(1_000u64), Just(997u64), 10..5_000u64],
    )
}

/// `retry_after` is exact: the cost fits at `now + retry` and not a nanosecond earlier,
/// with nothing else charged meanwhile.
fn check_retry(state: &State, l: &Limits, now: u64, cost: u64, retry: Option<u64>) {
    let Some(retry) = retry else {
        assert!(
            cost > l.limit,
            "never-fits only when the cost exceeds the limit"
        );
        return;
    };
    assert!(retry >= 1);
    assert_eq!(
        state.clone().check(l, now + retry, cost),
        Verdict::Allow,
        "fits after retry_after"
    );
    if retry > 1 {
        assert!(
            matches!(
                state.clone().check(l, now + retry - 1, cost),
                Verdict::Deny { .. }
            ),
            "retry_after is not later than needed"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// The log decides exactly like the definition: admit iff the (settled) amounts charged
    /// in (now - w, now] plus the cost fit the limit.
    #[test]
    fn log_matches_the_exact_reference((limit, w) in params(), ops in ops(1_000, 20)) {
        let l = Limits::new(limit, w, limit);
        let mut state = State::new(Algorithm::SlidingWindowLog);
        let mut reference: Vec<(u64, u64)> = Vec::new(); // (time, amount)
        let mut admitted: Vec<(Placement, u64, usize)> = Vec::new(); // placement, charged, ref index
        let mut now = 0;
        for op in ops {
            match op {
                Op::Charge { dt, cost } => {
                    now += dt;
                    let used: u64 = reference.iter().filter(|(t, _)| t + w > now).map(|e| e.1).sum();
                    let want = used + cost <= limit;
                    let got = state.check(&l, now, cost);
                    prop_assert_eq!(got == Verdict::Allow, want, "used {} cost {} at {}", used, cost, now);
                    match got {
                        Verdict::Allow => {
                            let p = state.charge(&l, now, cost);
                            reference.push((now, cost));
                            admitted.push((p, cost, reference.len() - 1));
                        }
                        Verdict::Deny { retry_after } => check_retry(&state, &l, now, cost, retry_after),
                    }
                    let peek = state.peek(&l, now);
                    let used: u64 = reference.iter().filter(|(t, _)| t + w > now).map(|e| e.1).sum();
                    prop_assert_eq!(peek.remaining, limit.saturating_sub(used));
                }
                Op::Settle { nth, actual_pct } => {
                    if admitted.is_empty() { continue; }
                    let (p, charged, idx) = admitted.swap_remove(nth % admitted.len());
                    let actual = charged * actual_pct / 100;
                    state.adjust(&l, now, p, charged, actual);
                    if actual > charged {
                        reference.push((now, actual - charged));
                    } else if reference[idx].0 + w > now {
                        reference[idx].1 -= charged - actual;
                    }
                }
            }
        }
    }

    /// Counter: every fixed window admits at most `limit`, any window of length `w` at most
    /// `2 x limit`; after `2w` of silence any cost <= limit fits.
    #[test]
    fn counter_stays_within_its_documented_bound((limit, w) in params(), ops in ops(1_000, 20)) {
        let l = Limits::new(limit, w, limit);
        let mut state = State::new(Algorithm::SlidingWindowCounter);
        let mut log: Vec<(u64, u64)> = Vec::new();
        let mut now = 0;
        let mut last = 0;
        for op in ops {
            let Op::Charge { dt, cost } = op else { continue };
            now += dt;
            if now >= last + 2 * w && cost <= limit {
                prop_assert_eq!(state.check(&l, now, cost), Verdict::Allow);
            }
            match state.check(&l, now, cost) {
                Verdict::Allow => {
                    state.charge(&l, now, cost);
                    log.push((now, cost));
                    last = now;
                }
                Verdict::Deny { retry_after } => check_retry(&state, &l, now, cost, retry_after),
            }
            let fixed: u64 = log.iter().filter(|(t, _)| t / w == now / w).map(|e| e.1).sum();
            prop_assert!(fixed <= limit);
            let sliding: u64 = log.iter().filter(|(t, _)| t + w > now).map(|e| e.1).sum();
            prop_assert!(sliding <= 2 * limit, "{} in one window, limit {}", sliding, limit);
        }
    }

    /// GCRA: what the admitted requests were finally charged (after refunds; an extra charge
    /// lands past the limit by design, so only up to what was admitted counts here), over
    /// any interval [a, b] of admissions, is at most burst + (b - a) x limit / w (rounded
    /// up), whatever settlements (refunds and extra charges, in any order) come between; and
    /// once the clock passes every charge's end, any cost <= burst fits.
    #[test]
    fn gcra_stays_within_its_bound((limit, w) in params(), burst_extra in 0..5u64, ops in ops(1_000, 25)) {
        let burst = limit + burst_extra;
        let l = Limits::new(limit, w, burst);
        let mut state = State::new(Algorithm::Gcra);
        // (admitted at, charged, finally charged, placement, settled)
        let mut log: Vec<(u64, u64, u64, Placement, bool)> = Vec::new();
        let mut now = 0;
        // A TAT no smaller than the state's: every charge and extra charge, no refund.
        let mut quiet = 0;
        for op in ops {
            match op {
                Op::Charge { dt, cost } => {
                    now += dt;
                    if now >= quiet && cost <= burst {
                        prop_assert_eq!(state.check(&l, now, cost), Verdict::Allow);
                    }
                    match state.check(&l, now, cost) {
                        Verdict::Allow => {
                            let p = state.charge(&l, now, cost);
                            log.push((now, cost, cost, p, false));
                            quiet = quiet.max(now) + (cost * w).div_ceil(limit);
                        }
                        Verdict::Deny { retry_after } => {
                            prop_assert_eq!(retry_after.is_none(), cost > burst);
                            if let Some(r) = retry_after {
                                prop_assert_eq!(state.clone().check(&l, now + r, cost), Verdict::Allow);
                            }
                        }
                    }
                }
                Op::Settle { nth, actual_pct } => {
                    // Each admitted charge settles once, as a store's lease does.
                    let open: Vec<usize> = (0..log.len()).filter(|&i| !log[i].4).collect();
                    if open.is_empty() { continue; }
                    let i = open[nth % open.len()];
                    let (_, charged, _, p, _) = log[i];
                    let actual = charged * actual_pct / 100;
                    state.adjust(&l, now, p, charged, actual);
                    log[i].2 = actual.min(charged);
                    log[i].4 = true;
                    if actual > charged {
                        quiet = quiet.max(now) + ((actual - charged) * w).div_ceil(limit);
                    }
                }
            }
        }
        for i in 0..log.len() {
            let mut sum = 0;
            for j in i..log.len() {
                sum += log[j].2;
                let allowance = burst + ((log[j].0 - log[i].0) * limit).div_ceil(w);
                prop_assert!(sum <= allowance, "{} finally charged over [{}, {}], allowance {}", sum, log[i].0, log[j].0, allowance);
            }
        }
    }

    /// Settlement never panics or wraps, whatever the order and amounts, for every algorithm.
    #[test]
    fn settlements_are_total(alg in prop_oneof![
        Just(Algorithm::SlidingWindowCounter), Just(Algorithm::SlidingWindowLog), Just(Algorithm::Gcra)
    ], (limit, w) in params(), ops in ops(1_000, 20)) {
        let l = Limits::new(limit, w, limit);
        let mut state = State::new(alg);
        let mut admitted = Vec::new();
        let mut now = 0;
        // GCRA stays distinct from a fresh state until its refunds have decayed too: at
        // most what the settlements could give back.
        let mut refunds = 0;
        for op in ops {
            match op {
                Op::Charge { dt, cost } => {
                    now += dt;
                    if state.check(&l, now, cost) == Verdict::Allow {
                        admitted.push((state.charge(&l, now, cost), cost));
                    }
                }
                Op::Settle { nth, actual_pct } => {
                    if admitted.is_empty() { continue; }
                    let (p, charged) = admitted.swap_remove(nth % admitted.len());
                    state.adjust(&l, now, p, charged, charged * actual_pct / 100);
                    refunds += (charged * w).div_ceil(limit);
                }
            }
            let s = state.peek(&l, now);
            prop_assert!(s.remaining <= s.limit);
        }
        // Everything drains: far in the future the bucket is idle and full.
        let later = now + 10 * w + refunds;
        prop_assert!(state.is_idle(&l, later));
        prop_assert_eq!(state.peek(&l, later).remaining, limit);
    }

    /// Calendar window against a naive model: the UTC date of each charge is found by
    /// counting days from 1970 (not by the algorithm's arithmetic), and the window admits iff
    /// what the current period holds (settlements included) plus the cost fits the limit.
    /// The clock starts a little before a month's end around a leap day and moves by up to
    /// two days, so runs cross hours, days, month ends and Dec 31 -> Jan 1.
    #[test]
    fn calendar_window_matches_a_naive_calendar(
        period in prop_oneof![Just(CalendarPeriod::Hour), Just(CalendarPeriod::Day), Just(CalendarPeriod::Month)],
        limit in 1..20u64,
        start in prop_oneof![Just((2027u64, 12u64)), Just((2028, 2)), Just((2100, 2)), Just((2000, 2)), Just((2031, 4))],
        before_end in 0..3 * DAY,
        ops in calendar_ops(),
    ) {
        let l = Limits::new(limit, period.longest().as_nanos() as u64, limit);
        let mut state = State::new(Algorithm::Calendar(period));
        let (y, m) = start;
        let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
        let mut now = naive_day(ny, nm, 1) * DAY - before_end;
        // (period key, amount) of every admitted charge, settlements applied.
        let mut reference: Vec<((u64, u64, u64, u64), u64)> = Vec::new();
        let mut admitted: Vec<(Placement, u64, usize)> = Vec::new();
        let key = |t: u64| {
            let (y, m, d) = naive_date(t / DAY);
            let h = t % DAY / HOUR;
            match period {
                CalendarPeriod::Hour => (y, m, d, h),
                CalendarPeriod::Day => (y, m, d, 0),
                _ => (y, m, 0, 0),
            }
        };
        for op in ops {
            match op {
                Op::Charge { dt, cost } => {
                    now += dt;
                    let used: u64 = reference.iter().filter(|(k, _)| *k == key(now)).map(|e| e.1).sum();
                    let got = state.check(&l, now, cost);
                    prop_assert_eq!(got == Verdict::Allow, used + cost <= limit, "used {} cost {}", used, cost);
                    match got {
                        Verdict::Allow => {
                            let p = state.charge(&l, now, cost);
                            reference.push((key(now), cost));
                            admitted.push((p, cost, reference.len() - 1));
                        }
                        Verdict::Deny { retry_after } => check_retry(&state, &l, now, cost, retry_after),
                    }
                    let used: u64 = reference.iter().filter(|(k, _)| *k == key(now)).map(|e| e.1).sum();
                    let peek = state.peek(&l, now);
                    prop_assert_eq!(peek.remaining, limit.saturating_sub(used));
                    // The reset is the first instant of another period.
                    let end = now + peek.reset_after_nanos;
                    prop_assert_ne!(key(end), key(now));
                    prop_assert_eq!(key(end - 1), key(now));
                }
                Op::Settle { nth, actual_pct } => {
                    if admitted.is_empty() { continue; }
                    let (p, charged, idx) = admitted.swap_remove(nth % admitted.len());
                    let actual = charged * actual_pct / 100;
                    state.adjust(&l, now, p, charged, actual);
                    if actual > charged {
                        reference.push((key(now), actual - charged));
                    } else if reference[idx].0 == key(now) {
                        reference[idx].1 -= charged - actual;
                    }
                }
            }
        }
    }
}

const HOUR: u64 = 3_600_000_000_000;
const DAY: u64 = 24 * HOUR;

fn calendar_ops() -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        4 => (0..HOUR / 2, 0..=22u64).prop_map(|(dt, cost)| Op::Charge { dt, cost }),
        1 => (0..2 * DAY, 0..=22u64).prop_map(|(dt, cost)| Op::Charge { dt, cost }),
        1 => (any::<usize>(), 0..=200u64).prop_map(|(nth, actual_pct)| Op::Settle { nth, actual_pct }),
    ];
    prop::collection::vec(op, 1..120)
}

fn leap(y: u64) -> bool {
    (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400)
}

fn month_days(y: u64, m: u64) -> u64 {
    [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31][m as usize - 1] + u64::from(m == 2 && leap(y))
}

/// Days from 1970-01-01 to `y-m-d`, counted year by year and month by month.
fn naive_day(y: u64, m: u64, d: u64) -> u64 {
    let years: u64 = (1970..y).map(|y| if leap(y) { 366 } else { 365 }).sum();
    let months: u64 = (1..m).map(|m| month_days(y, m)).sum();
    years + months + d - 1
}

/// The date of day `n` since 1970-01-01, counted the same way.
fn naive_date(mut n: u64) -> (u64, u64, u64) {
    let mut y = 1970;
    loop {
        let len = if leap(y) { 366 } else { 365 };
        if n < len {
            break;
        }
        n -= len;
        y += 1;
    }
    let mut m = 1;
    while n >= month_days(y, m) {
        n -= month_days(y, m);
        m += 1;
    }
    (y, m, n + 1)
}
