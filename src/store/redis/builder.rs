//! [`RedisStoreBuilder`]: the store's settings, and connecting (now, or lazily).

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::Script;

use super::breaker::Breaker;
use super::{Conn, Inner, LazyCluster, RedisFailure, RedisStore, SCRIPT};
use crate::clock::Clock;
use crate::store::{MemoryStore, StoreError};

/// The longest idempotency TTL the store sends to Redis: a year, in milliseconds.
const MAX_IDEMPOTENCY_TTL_MS: u64 = 365 * 24 * 3_600 * 1_000;

/// Configures a [`RedisStore`].
#[derive(Debug, Clone)]
pub struct RedisStoreBuilder {
    nodes: Vec<String>,
    cluster: bool,
    prefix: String,
    timeout: Duration,
    failure: RedisFailure,
    breaker_threshold: u32,
    breaker_cooldown: Duration,
    idempotency_ttl: Duration,
    clock: Option<Arc<dyn Clock>>,
}

impl RedisStoreBuilder {
    pub(super) fn new(nodes: Vec<String>, cluster: bool) -> Self {
        Self {
            nodes,
            cluster,
            prefix: "rl".to_owned(),
            timeout: Duration::from_millis(50),
            failure: RedisFailure::default(),
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(1),
            idempotency_ttl: Duration::from_secs(120),
            clock: None,
        }
    }

    /// The namespace of every key (default `rl`). Stores with different prefixes share
    /// nothing. It must not contain `{` or `}` ([`connect`](Self::connect) refuses it): in a
    /// cluster a brace would make it every key's hash tag.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The longest a call may take before it counts as a failure (default 50 ms).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// What to do while Redis can't answer (default [`RedisFailure::Error`]).
    pub fn on_failure(mut self, failure: RedisFailure) -> Self {
        self.failure = failure;
        self
    }

    /// Consecutive failures that open the circuit (default 5) and how long it stays open
    /// before a probe (default 1 s).
    pub fn circuit_breaker(mut self, failures: u32, cooldown: Duration) -> Self {
        self.breaker_threshold = failures;
        self.breaker_cooldown = cooldown;
        self
    }

    /// How long a failed attempt of an idempotent request is remembered, so that its retry
    /// is free on request rules (default 120 s; at least 1 ms, at most a year; see
    /// [Idempotent retries](crate::store#idempotent-retries)).
    pub fn idempotency_ttl(mut self, ttl: Duration) -> Self {
        self.idempotency_ttl = ttl;
        self
    }

    /// Takes `now` from `clock` instead of the server's `TIME` (and, for calendar windows,
    /// the date from its [`Clock::unix_nanos`]): for deterministic tests only (in
    /// production, clients' clocks would skew the windows).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// Connects. The script is loaded lazily, by the first call that finds it missing.
    ///
    /// Fails when Redis can't be reached now; [`connect_lazy`](Self::connect_lazy) starts
    /// without it.
    pub async fn connect(self) -> Result<RedisStore, StoreError> {
        self.check()?;
        let conn = if self.cluster {
            Conn::Cluster(
                self.cluster_client()?
                    .get_async_connection()
                    .await
                    .map_err(backend)?,
            )
        } else {
            let (client, config) = self.single_client()?;
            Conn::Single(
                ConnectionManager::new_with_config(client, config)
                    .await
                    .map_err(backend)?,
            )
        };
        Ok(self.build(conn))
    }

    /// A store that connects on its first call instead of now, so that a process can start
    /// while Redis is down (or not yet up): until Redis answers, every call fails within its
    /// timeout and [`on_failure`](Self::on_failure) decides (the layer's
    /// [`crate::FailurePolicy`], or the local fallback); from the first call that reaches it,
    /// the store runs as if [`connect`](Self::connect)ed. A single node connects within the
    /// calls (the redis crate's lazy connection manager, retried with backoff); a cluster
    /// connects in a background task that the first call starts (one attempt at a time,
    /// each bounded by the connection timeout, the next call retrying a failed one), while
    /// calls fail at once. Only bad configuration fails here (a malformed URL, a prefix with
    /// braces). Must be called within a tokio runtime.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use tower_llm_ratelimit::store::{RedisFailure, RedisStore};
    ///
    /// let store = RedisStore::builder("redis://redis:6379")
    ///     .on_failure(RedisFailure::LocalFallback { expected_replicas: 3 })
    ///     .connect_lazy()?; // no round trip: starts even while Redis is down
    /// # let _ = store; Ok(()) }
    /// ```
    pub fn connect_lazy(self) -> Result<RedisStore, StoreError> {
        self.check()?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(StoreError::Backend(
                "RedisStoreBuilder::connect_lazy must be called within a tokio runtime".into(),
            ));
        }
        let conn = if self.cluster {
            Conn::LazyCluster(Arc::new(LazyCluster::new(self.cluster_client()?)))
        } else {
            let (client, config) = self.single_client()?;
            Conn::Single(ConnectionManager::new_lazy_with_config(client, config).map_err(backend)?)
        };
        Ok(self.build(conn))
    }

    /// Refuses what no connection can fix.
    fn check(&self) -> Result<(), StoreError> {
        if self.prefix.contains(['{', '}']) {
            // A brace in the prefix would become every key's cluster hash tag: one slot for
            // the whole store.
            return Err(StoreError::Backend(format!(
                "the key prefix `{}` must not contain `{{` or `}}` (they would put every key \
                 in one cluster slot)",
                self.prefix
            )));
        }
        Ok(())
    }

    fn cluster_client(&self) -> Result<redis::cluster::ClusterClient, StoreError> {
        redis::cluster::ClusterClient::builder(self.nodes.clone())
            .connection_timeout(self.timeout.max(Duration::from_millis(200)))
            .response_timeout(self.timeout)
            .retries(1)
            .build()
            .map_err(backend)
    }

    fn single_client(
        &self,
    ) -> Result<(redis::Client, redis::aio::ConnectionManagerConfig), StoreError> {
        let url = self.nodes.first().cloned().unwrap_or_default();
        let client = redis::Client::open(url).map_err(backend)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout.max(Duration::from_millis(200))))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        Ok((client, config))
    }

    fn build(self, conn: Conn) -> RedisStore {
        let seed = {
            use std::hash::{BuildHasher, Hasher};
            std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish()
        };
        RedisStore {
            inner: Arc::new(Inner {
                conn,
                cluster: self.cluster,
                script: Script::new(SCRIPT),
                functions: AtomicBool::new(true),
                prefix: self.prefix,
                timeout: self.timeout,
                failure: self.failure,
                breaker: Breaker::new(self.breaker_threshold, self.breaker_cooldown),
                local: match &self.clock {
                    Some(c) => MemoryStore::builder()
                        .clock(SharedClock(Arc::clone(c)))
                        .build(),
                    None => MemoryStore::new(),
                },
                // Redis takes `PX` as a 64-bit integer the script formats from a double: a
                // year keeps it exact and far from any overflow.
                idempotency_ttl_ms: u64::try_from(self.idempotency_ttl.as_millis())
                    .unwrap_or(u64::MAX)
                    .clamp(1, MAX_IDEMPOTENCY_TTL_MS),
                clock: self.clock,
                next_lease: AtomicU64::new(seed),
                errors: AtomicU64::new(0),
                fallback_decisions: AtomicU64::new(0),
                breaker_opened: AtomicU64::new(0),
                releases: Default::default(),
            }),
        }
    }
}

pub(super) fn backend(e: redis::RedisError) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// The test clock, shared with the local fallback store.
#[derive(Debug)]
pub(super) struct SharedClock(Arc<dyn Clock>);

impl Clock for SharedClock {
    fn now_nanos(&self) -> u64 {
        self.0.now_nanos()
    }

    fn unix_nanos(&self) -> u64 {
        self.0.unix_nanos()
    }
}
