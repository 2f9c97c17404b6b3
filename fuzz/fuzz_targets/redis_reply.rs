//! The Redis store reading the limiter script's replies, on arbitrary bytes off the wire:
//! never panics, and a reply it accepts decides exactly the charges the request made (a
//! denial names one of them).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_llm_ratelimit::store::redis::fuzz_acquire_replies;

// How a request's charges split over cluster slots: one call, or two.
const LAYOUTS: [&[&[usize]]; 4] = [&[&[0]], &[&[0, 1]], &[&[0, 2], &[1]], &[&[1], &[0, 2, 3]]];

fuzz_target!(|data: &[u8]| {
    // First byte: the layout; second: where the first call's reply ends; then the replies.
    let [which, split, rest @ ..] = data else {
        return;
    };
    let layout = LAYOUTS[usize::from(*which) % LAYOUTS.len()];
    let n: usize = layout.iter().map(|m| m.len()).sum();
    let at = usize::from(*split).min(rest.len());
    let (first, second) = rest.split_at(at);
    let calls: Vec<(&[usize], &[u8])> = match layout {
        [one] => vec![(*one, rest)],
        [a, b] => vec![(*a, first), (*b, second)],
        _ => unreachable!("layouts have one or two calls"),
    };
    if let Some(decision) = fuzz_acquire_replies(n, &calls) {
        assert_eq!(decision.charges.len(), n);
        if let Some(denial) = decision.denial {
            assert!(denial.index < n, "a denial names a charge of the request");
            assert!(!decision.free_retry);
        }
    }
});
