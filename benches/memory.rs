//! Memory per key of the memory store at 1,000,000 keys, for each algorithm, next to
//! governor's keyed limiter.
//!
//! ```text
//! cargo bench --bench memory
//! ```
//!
//! Each case inserts 1,000,000 distinct keys (one admitted charge of 1 each, the clock
//! standing still so nothing expires) and reports:
//!
//! - **bytes per key**: bytes allocated and still live afterwards, through a counting global
//!   allocator ([`stats_alloc`]: what was asked of the allocator, not its own overhead),
//!   divided by the keys;
//! - **allocations per key**: blocks allocated and still live, per key;
//! - **RSS per key**: the growth of the resident set (`/proc/self/statm`), per key: what the
//!   allocator really took from the system, its overhead and free space included.
//!
//! Keys are 20 and 48 bytes (an API key or user id; a 48-byte token). Each case runs in a
//! child process of its own (this binary run again with the case's name), so that one
//! case's freed memory doesn't serve the next. The store holds up to 2,000,000 keys (no
//! eviction) and never sweeps during the run; governor's limiter is keyed by `String` (what
//! a keyed user of governor holds) and hashes with its default hasher.
//!
//! The figures depend on the count: hash tables and vectors grow by doubling, so a count
//! just past a power of two pays for the empty half of a table. Both sides are measured at
//! the same count.

use std::alloc::System;
use std::num::NonZeroU32;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use governor::{Quota as GovernorQuota, RateLimiter};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use tower_llm_ratelimit::clock::ManualClock;
use tower_llm_ratelimit::store::{BucketKey, Charge, MemoryStore};
use tower_llm_ratelimit::Quota;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Distinct keys per case.
const KEYS: usize = 1_000_000;

/// Every case, by name.
const CASES: [&str; 5] = ["counter", "gcra", "log", "calendar", "governor"];

/// Key lengths measured.
const KEY_LENGTHS: [usize; 2] = [20, 48];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes `--bench`; a child gets `--case NAME LEN`.
    if let Some(i) = args.iter().position(|a| a == "--case") {
        let name = args.get(i + 1).expect("a case name");
        let len: usize = args
            .get(i + 2)
            .and_then(|l| l.parse().ok())
            .expect("a key length");
        run_case(name, len);
        return;
    }
    let exe = std::env::current_exe().expect("this binary's path");
    println!(
        "memory per key at {KEYS} keys (bytes allocated and live / allocations live / RSS growth)"
    );
    println!(
        "{:<10} {:>8} {:>14} {:>12} {:>14}",
        "case", "key", "bytes/key", "allocs/key", "RSS bytes/key"
    );
    for len in KEY_LENGTHS {
        for name in CASES {
            let out = Command::new(&exe)
                .args(["--case", name, &len.to_string()])
                .output()
                .expect("the bench binary runs");
            assert!(
                out.status.success(),
                "case {name} {len}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            print!("{}", String::from_utf8_lossy(&out.stdout));
        }
    }
}

/// A distinct key of `len` bytes (at least 20) for `i`.
fn key(buf: &mut [u8; 64], i: usize, len: usize) -> &[u8] {
    let digits = format_args!("{i:0len$}").to_string();
    buf[..len].copy_from_slice(digits.as_bytes());
    &buf[..len]
}

/// Resident set size in bytes.
fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn run_case(name: &str, len: usize) {
    let mut buf = [0u8; 64];
    let rss_before = rss();
    let region = Region::new(GLOBAL);
    // Kept alive until measured.
    let held: Box<dyn std::any::Any> = if name == "governor" {
        let quota = GovernorQuota::per_minute(NonZeroU32::new(10).expect("non-zero"));
        let limiter = RateLimiter::keyed(quota);
        for i in 0..KEYS {
            let k = String::from_utf8(key(&mut buf, i, len).to_vec()).expect("ASCII");
            assert!(limiter.check_key(&k).is_ok());
        }
        Box::new(limiter)
    } else {
        let quota = match name {
            "counter" => Quota::per_minute(10),
            "gcra" => Quota::per_minute(10).gcra(),
            "log" => Quota::per_minute(10).sliding_window_log(),
            "calendar" => Quota::per_calendar_day(10),
            other => panic!("unknown case {other}"),
        };
        let store = MemoryStore::builder()
            .clock(ManualClock::new())
            .max_keys(2 * KEYS)
            .sweep_interval(Duration::from_secs(3_600))
            .build();
        let rule: Arc<str> = Arc::from(name);
        for i in 0..KEYS {
            let bucket = BucketKey::new(Arc::clone(&rule), key(&mut buf, i, len));
            let decision = store
                .try_acquire(&[Charge::new(&bucket, &quota, 1)])
                .expect("decided");
            assert!(decision.is_admitted());
        }
        assert_eq!(store.len(), KEYS);
        Box::new(store)
    };
    let stats = region.change();
    let rss_after = rss();
    // A reallocation is counted in `bytes_allocated` or `bytes_deallocated` already (by
    // how much it grew or shrank).
    let live = stats.bytes_allocated as isize - stats.bytes_deallocated as isize;
    let blocks = stats.allocations as isize - stats.deallocations as isize;
    println!(
        "{:<10} {:>6} B {:>14.1} {:>12.2} {:>14.1}",
        name,
        len,
        live as f64 / KEYS as f64,
        blocks as f64 / KEYS as f64,
        rss_after.saturating_sub(rss_before) as f64 / KEYS as f64
    );
    drop(held);
}
