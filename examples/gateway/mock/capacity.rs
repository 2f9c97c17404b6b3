//! The mock's capacity model: a GPU's decoding batch in miniature, so that saturation shows
//! without a GPU.
//!
//! A *sequence* is a completion being generated (streamed or not) from the moment it is
//! admitted to its last token. With a `capacity` of `C` (0: no limit, the default):
//! - up to `C` running sequences decode at full speed, one token per `token_delay`;
//! - beyond `C`, every token of every running sequence waits `token_delay x running / C`
//!   (read at each token): the batch no longer fits, so each step takes longer, and the
//!   mock's throughput stays at `C / token_delay` tokens per second however many run. The
//!   time to the first token grows with the same factor;
//! - more than `queue` sequences beyond `C` are refused with 503 (OpenAI-shaped, with
//!   `Retry-After`), as an overloaded vLLM does.
//!
//! A sequence holds its place through a [`Sequence`] guard: dropped when the sequence ends
//! or its client goes away (the response body or the handler dropped), it gives the place
//! back at once. The state is one small mutex-guarded struct, its counts included: each
//! change of `running` and the count it goes with are one critical section, and the stats
//! are copied under one lock, so every snapshot balances (`admitted = running + completed +
//! cancelled`). Nothing grows with the load, and nothing polls.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde_json::{json, Value};

/// `capacity` (0: no limit) and `queue` (sequences admitted beyond it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Limits {
    pub(crate) capacity: u64,
    pub(crate) queue: u64,
}

/// The limits, the sequences running and the counts since the start, changed together.
#[derive(Debug, Default, Clone, Copy)]
struct State {
    limits: Limits,
    running: u64,
    admitted: u64,
    rejected: u64,
    completed: u64,
    cancelled: u64,
    tokens: u64,
}

/// The shared state of the mock's sequences.
#[derive(Debug)]
pub(crate) struct Capacity {
    token_delay: Duration,
    state: Mutex<State>,
}

/// A refused sequence: what the 503 says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Overloaded {
    pub(crate) running: u64,
    pub(crate) limits: Limits,
    /// Whole seconds, at least 1: a full completion's decoding time at the current load.
    pub(crate) retry_after_secs: u64,
}

/// The delay of one token with `running` sequences decoding (`running` counts the one
/// asking).
fn token_delay(base: Duration, running: u64, capacity: u64) -> Duration {
    if capacity == 0 || running <= capacity {
        return base;
    }
    let nanos = base.as_nanos() * u128::from(running) / u128::from(capacity);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

impl Capacity {
    pub(crate) fn new(token_delay: Duration, limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            token_delay,
            state: Mutex::new(State {
                limits,
                ..State::default()
            }),
        })
    }

    /// The state; a panic elsewhere while holding it left nothing half-done (each critical
    /// section is a few additions that cannot panic), so a poisoned lock is used as it is.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// New limits (a reload); sequences running keep running, and the next token of each
    /// is timed by the new capacity.
    pub(crate) fn set_limits(&self, limits: Limits) {
        self.state().limits = limits;
    }

    /// A place for one sequence, or the 503's facts.
    pub(crate) fn admit(self: &Arc<Self>) -> Result<Sequence, Overloaded> {
        let mut s = self.state();
        let Limits { capacity, queue } = s.limits;
        if capacity > 0 && s.running >= capacity.saturating_add(queue) {
            s.rejected += 1;
            let running = s.running;
            drop(s);
            let full = token_delay(self.token_delay, running, capacity)
                .saturating_mul(super::MAX_COMPLETION as u32);
            return Err(Overloaded {
                running,
                limits: Limits { capacity, queue },
                retry_after_secs: full.as_secs_f64().ceil().max(1.0) as u64,
            });
        }
        s.running += 1;
        s.admitted += 1;
        drop(s);
        Ok(Sequence {
            capacity: Arc::clone(self),
            finished: false,
        })
    }

    /// The delay of the next token at the current load, and whether a capacity is set.
    fn current_token_delay(&self) -> (Duration, bool) {
        let s = self.state();
        let capacity = s.limits.capacity;
        (
            token_delay(self.token_delay, s.running, capacity),
            capacity > 0,
        )
    }

    /// `GET /v1/mock/stats`: one snapshot, copied under one lock.
    pub(crate) fn stats(&self) -> Value {
        let s = *self.state();
        let (limits, running) = (s.limits, s.running);
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        json!({
            "capacity": limits.capacity,
            "queue": (limits.capacity > 0).then_some(limits.queue),
            "running": running,
            "waiting": if limits.capacity > 0 { running.saturating_sub(limits.capacity) } else { 0 },
            "token_delay_ms": millis(self.token_delay),
            "current_token_delay_ms":
                millis(token_delay(self.token_delay, running, limits.capacity)),
            "admitted": s.admitted,
            "rejected": s.rejected,
            "completed": s.completed,
            "cancelled": s.cancelled,
            "tokens": s.tokens,
        })
    }
}

/// One admitted sequence's place; given back when dropped.
#[derive(Debug)]
pub(crate) struct Sequence {
    capacity: Arc<Capacity>,
    finished: bool,
}

impl Sequence {
    /// Waits one token's delay at the current load, then counts the token.
    pub(crate) async fn token(&mut self) {
        self.step(false).await;
    }

    /// One token: its delay at the current load (none when `only_under_capacity` and no
    /// capacity is set), then counted.
    async fn step(&mut self, only_under_capacity: bool) {
        let (delay, limited) = self.capacity.current_token_delay();
        if !delay.is_zero() && (limited || !only_under_capacity) {
            tokio::time::sleep(delay).await;
        }
        self.capacity.state().tokens += 1;
    }

    /// Generates `n` tokens without streaming them, then gives the place back. They take
    /// their time only under a capacity, read at each token: without one (or after a reload
    /// removes it, from the next token on), a non-streamed completion is answered at once,
    /// as the mock always did.
    pub(crate) async fn generate(mut self, n: u64) {
        for _ in 0..n {
            self.step(true).await;
        }
        self.finish();
    }

    /// Every token was generated: the place is given back, counted as completed.
    pub(crate) fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for Sequence {
    fn drop(&mut self) {
        let mut s = self.capacity.state();
        s.running -= 1;
        if self.finished {
            s.completed += 1;
        } else {
            s.cancelled += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn tokens_slow_in_proportion_beyond_capacity() {
        let d = Duration::from_millis(20);
        assert_eq!(token_delay(d, 1, 0), d);
        assert_eq!(token_delay(d, 1000, 0), d, "no capacity: no limit");
        assert_eq!(token_delay(d, 4, 4), d);
        assert_eq!(token_delay(d, 6, 4), 30 * MS);
        assert_eq!(token_delay(d, 12, 4), 60 * MS);
        assert_eq!(token_delay(Duration::ZERO, 12, 4), Duration::ZERO);
        // The throughput stays at capacity / delay: running / (delay x running / capacity).
        for running in 5..50u64 {
            let per_token = token_delay(d, running, 4).as_secs_f64();
            assert!((running as f64 / per_token - 4.0 / 0.02).abs() < 1e-6);
        }
    }

    #[test]
    fn admits_capacity_plus_queue_then_refuses_until_a_place_frees() {
        let c = Capacity::new(
            10 * MS,
            Limits {
                capacity: 2,
                queue: 1,
            },
        );
        let mut held: Vec<Sequence> = (0..3).map(|_| c.admit().expect("a place")).collect();
        let refused = c.admit().expect_err("full");
        assert_eq!(refused.running, 3);
        assert_eq!(refused.retry_after_secs, 1, "16 tokens x 15 ms, rounded up");
        assert_eq!(c.stats()["waiting"], 1);
        assert_eq!(c.stats()["current_token_delay_ms"], 15);
        held.pop().unwrap().finish();
        drop(held.pop());
        let s = c.stats();
        assert_eq!(
            (
                &s["running"],
                &s["completed"],
                &s["cancelled"],
                &s["rejected"]
            ),
            (&json!(1), &json!(1), &json!(1), &json!(1))
        );
        let again = c.admit().expect("a place again");
        drop((again, held));
        assert_eq!(c.stats()["running"], 0);
        assert_eq!(c.stats()["admitted"], 4);
    }

    #[test]
    fn a_lower_capacity_refuses_until_the_running_drain_below_it() {
        let c = Capacity::new(MS, Limits::default());
        let held: Vec<Sequence> = (0..5).map(|_| c.admit().expect("no limit")).collect();
        c.set_limits(Limits {
            capacity: 2,
            queue: 0,
        });
        assert!(c.admit().is_err());
        assert_eq!(
            c.stats()["current_token_delay_ms"],
            2,
            "1 ms x 5 / 2, in whole ms"
        );
        drop(held);
        assert!(c.admit().is_ok());
    }

    /// Many threads admitting and releasing at once never hold more than capacity + queue
    /// places, and every place comes back.
    #[test]
    fn never_more_than_capacity_plus_queue_under_contention() {
        let c = Capacity::new(
            Duration::ZERO,
            Limits {
                capacity: 3,
                queue: 2,
            },
        );
        let peak = Arc::new(AtomicU64::new(0));
        std::thread::scope(|scope| {
            for _ in 0..8 {
                let (c, peak) = (Arc::clone(&c), Arc::clone(&peak));
                scope.spawn(move || {
                    for _ in 0..2000 {
                        if let Ok(seq) = c.admit() {
                            let running = c.state().running;
                            peak.fetch_max(running, Ordering::Relaxed);
                            seq.finish();
                        }
                    }
                });
            }
        });
        assert!(peak.load(Ordering::Relaxed) <= 5);
        let s = c.stats();
        assert_eq!(s["running"], 0);
        assert_eq!(
            s["admitted"].as_u64().unwrap() + s["rejected"].as_u64().unwrap(),
            16_000
        );
        assert_eq!(s["completed"], s["admitted"]);
    }

    /// Every snapshot of the stats balances: each admitted sequence is running, completed or
    /// cancelled, whatever the other threads are doing at that moment.
    #[test]
    fn every_snapshot_balances_under_contention() {
        let c = Capacity::new(
            Duration::ZERO,
            Limits {
                capacity: 3,
                queue: 2,
            },
        );
        let stop = std::sync::atomic::AtomicBool::new(false);
        let snapshots = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..6u64)
                .map(|t| {
                    let c = Arc::clone(&c);
                    scope.spawn(move || {
                        for i in 0..20_000u64 {
                            if let Ok(seq) = c.admit() {
                                if (i + t) % 2 == 0 {
                                    seq.finish();
                                } else {
                                    drop(seq);
                                }
                            }
                        }
                    })
                })
                .collect();
            let checker = scope.spawn(|| {
                let mut n = 0u64;
                loop {
                    let last = stop.load(Ordering::Acquire);
                    let s = c.stats();
                    let get = |k: &str| s[k].as_u64().unwrap_or_else(|| panic!("{k}: {s}"));
                    assert_eq!(
                        get("admitted"),
                        get("running") + get("completed") + get("cancelled"),
                        "snapshot {n}: {s}"
                    );
                    assert!(get("running") <= 5, "{s}");
                    n += 1;
                    if last {
                        return (n, s);
                    }
                }
            });
            for w in workers {
                w.join().expect("a worker");
            }
            stop.store(true, Ordering::Release);
            checker.join().expect("the checker")
        });
        let (n, s) = snapshots;
        assert!(n > 1, "{n}");
        assert_eq!(s["running"], 0, "{s}");
        assert_eq!(
            s["admitted"].as_u64().unwrap() + s["rejected"].as_u64().unwrap(),
            120_000,
            "{s}"
        );
    }

    /// `token()` sleeps the base delay times running / capacity beyond capacity (the paused
    /// clock advances by exactly that), and the base delay again once they are back within it.
    #[tokio::test(start_paused = true)]
    async fn a_token_waits_in_proportion_to_the_running_beyond_capacity() {
        let c = Capacity::new(
            10 * MS,
            Limits {
                capacity: 2,
                queue: 2,
            },
        );
        let mut held: Vec<Sequence> = (0..4).map(|_| c.admit().expect("a place")).collect();
        let t0 = tokio::time::Instant::now();
        held[0].token().await;
        assert_eq!(t0.elapsed(), 20 * MS, "4 running on a capacity of 2");
        held.truncate(2);
        let t1 = tokio::time::Instant::now();
        held[0].token().await;
        assert_eq!(t1.elapsed(), 10 * MS, "2 running on a capacity of 2");
        let s = c.stats();
        assert_eq!(
            (&s["tokens"], &s["cancelled"]),
            (&json!(2), &json!(2)),
            "{s}"
        );
    }

    /// `generate` times each token by the capacity of the moment: 3 tokens on 4 running for
    /// a capacity of 2 take 3 x 2 x the base delay.
    #[tokio::test(start_paused = true)]
    async fn generate_takes_its_tokens_time_at_the_current_load() {
        let c = Capacity::new(
            10 * MS,
            Limits {
                capacity: 2,
                queue: 2,
            },
        );
        let held: Vec<Sequence> = (0..3).map(|_| c.admit().expect("a place")).collect();
        let t0 = tokio::time::Instant::now();
        c.admit().expect("a place").generate(3).await;
        assert_eq!(t0.elapsed(), 60 * MS);
        let s = c.stats();
        assert_eq!(
            (&s["tokens"], &s["completed"]),
            (&json!(3), &json!(1)),
            "{s}"
        );
        drop(held);
    }

    /// A reload to no capacity during a non-streamed completion: the token under way ends,
    /// the others are answered at once, as without a capacity.
    #[tokio::test(start_paused = true)]
    async fn a_reload_to_no_capacity_answers_a_running_completion_at_once() {
        let c = Capacity::new(
            1000 * MS,
            Limits {
                capacity: 1,
                queue: 0,
            },
        );
        let seq = c.admit().expect("a place");
        let t0 = tokio::time::Instant::now();
        let generating = tokio::spawn(seq.generate(16));
        tokio::time::sleep(500 * MS).await;
        c.set_limits(Limits::default());
        generating.await.expect("generate");
        assert_eq!(t0.elapsed(), 1000 * MS, "one token's time, not 16");
        let s = c.stats();
        assert_eq!(
            (&s["tokens"], &s["completed"]),
            (&json!(16), &json!(1)),
            "{s}"
        );
    }
}
