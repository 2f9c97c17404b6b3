//! A decision still under way whose caller may go away: a store doing I/O, the second
//! attempt of a capacity with tiers, a wait in a capacity's queue.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use http::HeaderMap;

use super::conclude;
use crate::capacity::{Cell, Ticket};
use crate::limiter::{Limiter, Plan, Settling};
use crate::observe::{QueueEvent, QueueOutcome};
use crate::store::{BucketKey, Decision, StoreError};
use crate::tier::Tier;

/// A store's answer still to come.
pub(crate) type PendingDecision =
    Pin<Box<dyn Future<Output = Result<Decision, StoreError>> + Send>>;

/// A decision taken at once (a synchronous store, no queue), or still under way.
// `Now` is a synchronous store's path, which allocates nothing; `Later` is boxed (its path
// allocates its future anyway).
#[allow(clippy::large_enum_variant)]
pub(crate) enum Decided {
    Now(Plan, Result<Decision, StoreError>),
    Later(Box<Acquiring>),
}

/// Asks the store for `plan`'s charges (again for the tier's reserve when a capacity with
/// tiers refused it for saturation); a refusal by a capacity whose tier may wait goes on
/// in the queue.
pub(crate) fn acquire(limiter: &Arc<Limiter>, mut plan: Plan) -> Decided {
    match limiter.acquire(&plan).into_result() {
        Ok(result) => {
            if limiter.retry_reserved(&mut plan, &result) {
                return match limiter.acquire(&plan).into_result() {
                    Ok(result) => settled_or_queued(limiter, plan, result),
                    Err(pending) => {
                        Decided::Later(Box::new(Acquiring::pending(limiter, pending, plan)))
                    }
                };
            }
            settled_or_queued(limiter, plan, result)
        }
        Err(pending) => Decided::Later(Box::new(Acquiring::pending(limiter, pending, plan))),
    }
}

fn settled_or_queued(
    limiter: &Arc<Limiter>,
    plan: Plan,
    result: Result<Decision, StoreError>,
) -> Decided {
    if limiter.queue_for(&plan, &result).is_some() {
        Decided::Later(Box::new(Acquiring {
            limiter: Arc::clone(limiter),
            pending: None,
            answered: Some((plan, result)),
            ticket: None,
            queued: None,
        }))
    } else {
        Decided::Now(plan, result)
    }
}

/// An acquire under way, owned by a response future that may be dropped (the client hangs
/// up while the store decides, or while it waits in a queue). Dropped before the store's
/// answer, it lets the answer arrive in a background task and settles whatever was
/// admitted as a request dropped before its response: concurrency slots released, the
/// other charges kept (see [`crate::settle`]). Otherwise a slot taken by a decision nobody
/// received would stay taken for the whole lease. [`crate::RateLimitLayer::flush`] waits
/// for these tasks too. Dropped while waiting in a queue (holding no slot), it leaves the
/// queue.
pub(crate) struct Acquiring {
    limiter: Arc<Limiter>,
    /// The store's answer to come, and the plan it is for.
    pending: Option<(PendingDecision, Plan)>,
    /// An answer in, not yet judged.
    answered: Option<(Plan, Result<Decision, StoreError>)>,
    /// Its place in a capacity's queue, once it waits.
    ticket: Option<Ticket>,
    /// Where and since when it waits, for the observer.
    queued: Option<Queued>,
}

/// A wait in a capacity's queue, as the observer hears of it.
struct Queued {
    cell: Arc<Cell>,
    bucket: BucketKey,
    tier: Option<Tier>,
    since: tokio::time::Instant,
}

impl Acquiring {
    fn pending(limiter: &Arc<Limiter>, decision: PendingDecision, plan: Plan) -> Self {
        Self {
            limiter: Arc::clone(limiter),
            pending: Some((decision, plan)),
            answered: None,
            ticket: None,
            queued: None,
        }
    }

    /// Tells the observer how the wait ended (after the ticket is gone).
    fn report(&self, outcome: QueueOutcome) {
        let (Some(o), Some(q)) = (&self.limiter.observer, &self.queued) else {
            return;
        };
        o.on_queue(&QueueEvent {
            rule: q.bucket.rule(),
            key: q.bucket.key(),
            tier: q.tier.as_ref().map(Tier::as_str),
            outcome,
            waited: q.since.elapsed(),
            waiting: q.cell.queue.len(),
        });
    }

    /// Asks the store for `plan` again, keeping the answer or what will give it.
    fn ask(&mut self, plan: Plan) {
        match self.limiter.acquire(&plan).into_result() {
            Ok(result) => self.answered = Some((plan, result)),
            Err(pending) => self.pending = Some((pending, plan)),
        }
    }

    /// The final answer, and the plan back: after the second attempt of a capacity with
    /// tiers, and after waiting in a capacity's queue (until admitted or the deadline).
    pub(crate) async fn decide(mut self) -> (Plan, Result<Decision, StoreError>) {
        let mut deadline = None;
        // This waiter was woken by a release and is trying again.
        let mut woken = false;
        // It tried once more after this wake-up, held back for waiters gone since.
        let mut rechecked = false;
        loop {
            let (mut plan, result) = match self.answered.take() {
                Some(answer) => answer,
                None => {
                    let result = std::future::poll_fn(|cx| match &mut self.pending {
                        Some((decision, _)) => decision.as_mut().poll(cx),
                        // Taken only below, once the answer is in.
                        None => Poll::Pending,
                    })
                    .await;
                    let (_, plan) = self.pending.take().expect("set until the answer is in");
                    (plan, result)
                }
            };
            if self.limiter.retry_reserved(&mut plan, &result) {
                self.ask(plan);
                continue;
            }
            if matches!(&result, Ok(d) if d.is_admitted()) {
                if let Some(ticket) = self.ticket.take() {
                    if woken {
                        ticket.admitted();
                    } else {
                        // Admitted by its entry retry, with a slot freed before it entered:
                        // a release that woke it meanwhile is not its own, and goes on.
                        drop(ticket);
                    }
                    self.report(QueueOutcome::Admitted);
                }
                return (plan, result);
            }
            let Some(wait) = self.limiter.queue_for(&plan, &result) else {
                if let Some(ticket) = self.ticket.take() {
                    // Refused by another rule, or the store failed: the wait is over with
                    // that answer (a wake-up it had goes on).
                    drop(ticket);
                    self.report(QueueOutcome::Refused);
                }
                return (plan, result);
            };
            match &self.ticket {
                Some(_)
                    if !rechecked
                        && self.limiter.held_back_by_gone(&plan, wait.cell, wait.level) =>
                {
                    // Held back for a waiter above that was admitted or left while this
                    // answer came back (with a store doing I/O): the slot may be free now.
                    // Once per wake-up (or entry).
                    rechecked = true;
                    self.limiter.retry_from_queue(&mut plan);
                    self.ask(plan);
                    continue;
                }
                Some(ticket) if woken => ticket.refused(wait.full),
                Some(_) => {}
                None => {
                    let entered = wait
                        .cell
                        .queue
                        .enter(wait.level, wait.tier_name, wait.max_len);
                    if self.limiter.observer.is_some() {
                        self.queued = Some(Queued {
                            cell: Arc::clone(wait.cell),
                            bucket: wait.bucket.clone(),
                            tier: wait.tier.cloned(),
                            since: tokio::time::Instant::now(),
                        });
                    }
                    let Some(ticket) = entered else {
                        // The queue is full: refused at once.
                        self.report(QueueOutcome::Full);
                        return (plan, result);
                    };
                    self.ticket = Some(ticket);
                    self.report(QueueOutcome::Entered);
                    deadline = Some(tokio::time::Instant::now() + wait.max_wait);
                    // A slot released between the refusal and the entry would wake nobody:
                    // one more try, now that releases wake this waiter.
                    woken = false;
                    self.limiter.retry_from_queue(&mut plan);
                    self.ask(plan);
                    continue;
                }
            }
            let (Some(ticket), Some(deadline)) = (&self.ticket, deadline) else {
                return (plan, result);
            };
            if tokio::time::timeout_at(deadline, ticket.woken())
                .await
                .is_err()
            {
                // The deadline: the last refusal stands (leaving the queue hands on a
                // wake-up it had).
                self.ticket = None;
                self.report(QueueOutcome::TimedOut);
                return (plan, result);
            }
            woken = true;
            rechecked = false;
            self.limiter.retry_from_queue(&mut plan);
            self.ask(plan);
        }
    }
}

impl Drop for Acquiring {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            // The client went away while waiting.
            drop(ticket);
            self.report(QueueOutcome::Left);
        }
        let Some((decision, plan)) = self.pending.take() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                target: "tower_llm_ratelimit",
                "no tokio runtime to finish an abandoned rate-limit decision on; its concurrency slots stay taken until their lease ends"
            );
            return;
        };
        let limiter = Arc::clone(&self.limiter);
        let running = Settling::start(&limiter);
        rt.spawn(async move {
            let result = decision.await;
            // An admission's settlement runs as its `Settle` drops here, unresponded.
            drop(conclude(&limiter, plan, result, &HeaderMap::new()));
            drop(running);
        });
    }
}
