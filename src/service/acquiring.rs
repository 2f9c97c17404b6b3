//! A decision still under way whose caller may go away.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use http::HeaderMap;

use super::conclude;
use crate::limiter::{Limiter, Plan, Settling};
use crate::store::{Decision, StoreError};

/// A store's answer still to come.
pub(crate) type PendingDecision =
    Pin<Box<dyn Future<Output = Result<Decision, StoreError>> + Send>>;

/// An acquire under way at a store doing I/O, owned by a response future that may be dropped
/// (the client hangs up while the store decides). Dropped before its answer, it lets the
/// answer arrive in a background task and settles whatever was admitted as a request dropped
/// before its response: concurrency slots released, the other charges kept (see
/// [`crate::settle`]). Otherwise a slot taken by a decision nobody received would stay taken
/// for the whole lease. [`crate::RateLimitLayer::flush`] waits for these tasks too.
pub(crate) struct Acquiring {
    limiter: Arc<Limiter>,
    /// Until the answer is in.
    pending: Option<(PendingDecision, Plan)>,
}

impl Acquiring {
    pub(crate) fn new(limiter: Arc<Limiter>, decision: PendingDecision, plan: Plan) -> Self {
        Self {
            limiter,
            pending: Some((decision, plan)),
        }
    }

    /// The store's answer, and the plan back (after the second attempt of a capacity with
    /// tiers, when the first was refused for saturation).
    pub(crate) async fn decide(mut self) -> (Plan, Result<Decision, StoreError>) {
        loop {
            let result = std::future::poll_fn(|cx| match &mut self.pending {
                Some((decision, _)) => decision.as_mut().poll(cx),
                // Taken only below, once the answer is in.
                None => Poll::Pending,
            })
            .await;
            let (_, plan) = self.pending.take().expect("set until the answer is in");
            match first_answer(&self.limiter, plan, result) {
                Decided::Now(plan, result) => return (plan, result),
                Decided::Later(pending, plan) => self.pending = Some((pending, plan)),
            }
        }
    }
}

/// A decision taken at once (a synchronous store), or still under way.
pub(crate) enum Decided {
    Now(Plan, Result<Decision, StoreError>),
    Later(PendingDecision, Plan),
}

/// Asks the store for `plan`'s charges, and again for the tier's reserve when a capacity
/// with tiers refused it for saturation.
pub(crate) fn acquire(limiter: &Limiter, plan: Plan) -> Decided {
    match limiter.acquire(&plan).into_result() {
        Ok(result) => first_answer(limiter, plan, result),
        Err(pending) => Decided::Later(pending, plan),
    }
}

/// What follows the store's answer to an attempt: the decision, or the second attempt.
fn first_answer(
    limiter: &Limiter,
    mut plan: Plan,
    result: Result<Decision, StoreError>,
) -> Decided {
    if !limiter.retry_reserved(&mut plan, &result) {
        return Decided::Now(plan, result);
    }
    match limiter.acquire(&plan).into_result() {
        Ok(result) => Decided::Now(plan, result),
        Err(pending) => Decided::Later(pending, plan),
    }
}

impl Drop for Acquiring {
    fn drop(&mut self) {
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
