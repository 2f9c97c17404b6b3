//! Releasing concurrency slots that a failed call may have left taken.
//!
//! A slot is a member of a sorted set named by its lease id, which this client picks before
//! the call, so the store can always name what to release, and releasing is idempotent
//! (`ZREM`). When an acquire fails after Redis may have run it (a timeout, a broken
//! connection), or a settlement that releases slots fails, the store queues the release and
//! one background task retries the queue, oldest first, with a backoff from 50 ms doubling to
//! 1 s, until Redis answers. Redis runs the commands of one connection in order, so a release
//! sent after a timed-out acquire runs after it. Bounds: at most [`MAX_QUEUED`] releases wait
//! (past that one is dropped with a warning, and its slot comes back when its lease ends), a
//! release is dropped once its lease has ended (the slot has expired by then), and one call is
//! in flight at a time, so a long outage costs neither memory nor load without limit.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::script::Call;
use super::Inner;

/// The most releases waiting for Redis.
pub(super) const MAX_QUEUED: usize = 4_096;
const FIRST_RETRY: Duration = Duration::from_millis(50);
const LAST_RETRY: Duration = Duration::from_secs(1);

/// Releases waiting for Redis, and whether a task is working through them.
#[derive(Debug, Default)]
pub(super) struct Releases {
    queue: Mutex<VecDeque<(Call, Instant)>>,
    running: std::sync::atomic::AtomicBool,
}

impl Releases {
    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<(Call, Instant)>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Releases waiting now.
    pub(super) fn len(&self) -> usize {
        self.queue().len()
    }
}

/// Queues `release` (a settle call of concurrency slots only) until Redis answers it, or its
/// lease of `lease` has ended.
pub(super) fn queue(inner: &Arc<Inner>, release: Call, lease: Duration) {
    let releases = &inner.releases;
    {
        let mut q = releases.queue();
        if q.len() >= MAX_QUEUED {
            tracing::warn!(
                target: "tower_llm_ratelimit",
                "too many concurrency slots waiting for Redis to release them; this one comes back when its lease ends"
            );
            return;
        }
        q.push_back((release, Instant::now() + lease));
    }
    start(inner);
}

fn start(inner: &Arc<Inner>) {
    if inner.releases.running.swap(true, Ordering::AcqRel) {
        return;
    }
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => drop(rt.spawn(work(Arc::clone(inner)))),
        Err(_) => inner.releases.running.store(false, Ordering::Release),
    }
}

async fn work(inner: Arc<Inner>) {
    let mut wait = FIRST_RETRY;
    loop {
        let next = {
            let mut q = inner.releases.queue();
            let now = Instant::now();
            while q.front().is_some_and(|(_, until)| *until <= now) {
                q.pop_front();
            }
            q.front().map(|(call, _)| call.clone())
        };
        let Some(call) = next else {
            inner.releases.running.store(false, Ordering::Release);
            // A release queued after the look above found the task still running: take it.
            if inner.releases.len() > 0 && !inner.releases.running.swap(true, Ordering::AcqRel) {
                continue;
            }
            return;
        };
        match inner.run(&call).await {
            Ok(_) => {
                // Only this task removes from the front.
                inner.releases.queue().pop_front();
                wait = FIRST_RETRY;
            }
            Err(_) => {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(LAST_RETRY);
            }
        }
    }
}
