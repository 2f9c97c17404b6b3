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
//! back at once. The state is one small mutex-guarded struct and a few counters: nothing
//! grows with the load, and nothing polls.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde_json::{json, Value};

/// `capacity` (0: no limit) and `queue` (sequences admitted beyond it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Limits {
    pub(crate) capacity: u64,
    pub(crate) queue: u64,
}

#[derive(Debug, Default)]
struct State {
    limits: Limits,
    running: u64,
}

/// The shared state of the mock's sequences.
#[derive(Debug)]
pub(crate) struct Capacity {
    token_delay: Duration,
    state: Mutex<State>,
    admitted: AtomicU64,
    rejected: AtomicU64,
    completed: AtomicU64,
    cancelled: AtomicU64,
    tokens: AtomicU64,
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
            state: Mutex::new(State { limits, running: 0 }),
            admitted: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            tokens: AtomicU64::new(0),
        })
    }

    /// The state; a panic elsewhere while holding it left nothing half-done (each critical
    /// section is one assignment), so a poisoned lock is used as it is.
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
            let running = s.running;
            drop(s);
            self.rejected.fetch_add(1, Ordering::Relaxed);
            let full = token_delay(self.token_delay, running, capacity)
                .saturating_mul(super::MAX_COMPLETION as u32);
            return Err(Overloaded {
                running,
                limits: Limits { capacity, queue },
                retry_after_secs: full.as_secs_f64().ceil().max(1.0) as u64,
            });
        }
        s.running += 1;
        drop(s);
        self.admitted.fetch_add(1, Ordering::Relaxed);
        Ok(Sequence {
            capacity: Arc::clone(self),
            finished: false,
        })
    }

    /// The delay of the next token at the current load.
    fn current_token_delay(&self) -> Duration {
        let s = self.state();
        token_delay(self.token_delay, s.running, s.limits.capacity)
    }

    /// `GET /v1/mock/stats`.
    pub(crate) fn stats(&self) -> Value {
        let (limits, running) = {
            let s = self.state();
            (s.limits, s.running)
        };
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let count = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "capacity": limits.capacity,
            "queue": (limits.capacity > 0).then_some(limits.queue),
            "running": running,
            "waiting": if limits.capacity > 0 { running.saturating_sub(limits.capacity) } else { 0 },
            "token_delay_ms": millis(self.token_delay),
            "current_token_delay_ms":
                millis(token_delay(self.token_delay, running, limits.capacity)),
            "admitted": count(&self.admitted),
            "rejected": count(&self.rejected),
            "completed": count(&self.completed),
            "cancelled": count(&self.cancelled),
            "tokens": count(&self.tokens),
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
        let delay = self.capacity.current_token_delay();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        self.capacity.tokens.fetch_add(1, Ordering::Relaxed);
    }

    /// Generates `n` tokens without streaming them, then gives the place back. They take
    /// their time only under a capacity: without one, a non-streamed completion is answered
    /// at once, as the mock always did.
    pub(crate) async fn generate(mut self, n: u64) {
        let timed = self.capacity.state().limits.capacity > 0;
        for _ in 0..n {
            if timed {
                self.token().await;
            } else {
                self.capacity.tokens.fetch_add(1, Ordering::Relaxed);
            }
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
        let c = &self.capacity;
        c.state().running -= 1;
        let counter = if self.finished {
            &c.completed
        } else {
            &c.cancelled
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
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
}
