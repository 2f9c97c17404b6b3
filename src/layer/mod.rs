//! [`RateLimitLayer`] and its builder: the configuration, checked once by `build` into the
//! [`Limiter`] its services share. The layer's `Layer` impl sits with the service it builds
//! (`service/`), so that this module depends on the limiter alone, not on the service.

mod builder;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;

use crate::key::RequestView;
use crate::limiter::{Limiter, RuleStatus};
use crate::observe::ObserverDebug;
use crate::rule::Rule;
use crate::store::StoreError;

pub use self::builder::RateLimitLayerBuilder;

/// The default bound on a request body the layer reads: 1 MiB.
pub const DEFAULT_MAX_INSPECT_BYTES: usize = 1 << 20;

/// Applies rate limiting to a service. Cheap to clone; clones (and every service they build)
/// share one configuration and one store, so one budget.
///
/// Build one with [`RateLimitLayer::builder`].
#[derive(Clone)]
pub struct RateLimitLayer {
    pub(crate) limiter: Arc<Limiter>,
}

impl fmt::Debug for RateLimitLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &*self.limiter;
        f.debug_struct("RateLimitLayer")
            .field("rules", &s.rules)
            .field("store", &s.store)
            .field("headers", &s.headers)
            .field("failure", &s.failure)
            .field("observer", &ObserverDebug(&s.observer))
            .finish_non_exhaustive()
    }
}

impl RateLimitLayer {
    /// Starts a configuration.
    pub fn builder() -> RateLimitLayerBuilder {
        RateLimitLayerBuilder::new()
    }

    /// The rules, in the order they were added.
    pub fn rules(&self) -> &[Rule] {
        &self.limiter.rules
    }

    /// Waits until every settlement this layer (and its clones) started in the background
    /// has reached the store. A store that does I/O (`RedisStore`, feature `redis`) settles
    /// a response's real usage in a task of its own once the response ends; at shutdown,
    /// after the server has stopped taking requests and drained the ones in flight, await
    /// this (under a timeout of your own) before the runtime goes, or the last corrections
    /// (refunds, and extra tokens charged past the estimate) are lost with it. Returns at
    /// once when nothing is running; a synchronous store (the
    /// [`MemoryStore`](crate::store::MemoryStore)) never leaves anything running.
    ///
    /// ```
    /// # async fn run() {
    /// # use tower_llm_ratelimit::{key, Quota, RateLimitLayer, Rule};
    /// # let layer = RateLimitLayer::builder()
    /// #     .rule(Rule::new("rpm", key::global(), Quota::per_minute(60)))
    /// #     .build()
    /// #     .unwrap();
    /// // ... the server stopped and drained its requests:
    /// let flushed = tokio::time::timeout(std::time::Duration::from_secs(5), layer.flush()).await;
    /// assert!(flushed.is_ok());
    /// # }
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(run());
    /// ```
    pub async fn flush(&self) {
        self.limiter.flush().await;
    }

    /// True when nothing but this handle uses the layer: no service built from it, no
    /// request or response body in flight, no settlement running in the background. A
    /// handle kept only to [`flush`](Self::flush) a layer that has been replaced (by a
    /// configuration reload, say) can then be dropped: nothing can settle through it any
    /// more.
    pub fn is_unused(&self) -> bool {
        // Services, response bodies and background settlements each hold the limiter.
        Arc::strong_count(&self.limiter) == 1
    }

    /// The current limit of the adaptive capacity of rule `rule` for bucket `key` (the key
    /// before this replica's suffix, a model's name, say): its controller's, or the
    /// capacity's initial limit when no request of that bucket came yet; `None` when the
    /// layer has no rule `rule` with a capacity. Without a store call, for metrics.
    ///
    /// ```
    /// use tower_llm_ratelimit::capacity::Capacity;
    /// use tower_llm_ratelimit::key::Key;
    /// use tower_llm_ratelimit::{key, Quota, RateLimitLayer, Rule};
    ///
    /// let layer = RateLimitLayer::builder()
    ///     .rule(Rule::new("slots", key::header("x-model"), Quota::concurrent(64))
    ///         .capacity(Capacity::adaptive(4, 64).initial(16)))
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(layer.capacity_limit("slots", &Key::from("m")), Some(16));
    /// assert_eq!(layer.capacity_limit("other", &Key::from("m")), None);
    /// ```
    pub fn capacity_limit(&self, rule: &str, key: &crate::key::Key) -> Option<u64> {
        let l = &self.limiter;
        let i = l.rules.iter().position(|r| &*r.name == rule)?;
        Some(l.capacity[i].as_ref()?.limit_of(key))
    }

    /// The caller's current state under every rule, charging nothing: for status endpoints
    /// and dashboards. Keys and tier are resolved as for a real request.
    pub async fn status(&self, req: RequestView<'_>) -> Result<Vec<RuleStatus>, StoreError> {
        self.limiter.status(req).await
    }
}
