//! The Redis store: one budget shared by many processes (feature `redis`).
//!
//! - **One round trip per decision.** Every rule of a request whose keys share a cluster slot
//!   is checked and charged by one call of one Lua script (`limiter.lua`), all or nothing,
//!   writing nothing on a denial. On Redis >= 7 the script is a function library
//!   (`FCALL tower_llm_ratelimit_<hash>`: its helpers are built once per load, not once per
//!   call, about 2-3 µs of Redis CPU less per decision); the name carries a hash of the code,
//!   so two versions of this crate never replace each other's function. A missing function
//!   (a restart without persistence, `FUNCTION FLUSH`) is answered by loading the library
//!   (on every primary of a cluster) and retrying once. A server without functions (Redis
//!   6, or an ACL user without `FUNCTION`/`FCALL`) is answered by `EVALSHA` from then on;
//!   `NOSCRIPT` (after a restart, a failover or a `SCRIPT FLUSH`) by loading the script and
//!   retrying. Each version leaves its library on the server: `FUNCTION DELETE` old ones
//!   after an upgrade if you care about a few tens of KB.
//!   An acquire whose rules are all sliding window counters (the default algorithm) runs
//!   a path of the script without helper calls or per-call tables; any other call runs the
//!   general one, with the same arithmetic (`tests/store_parity.rs` covers both).
//! - **Same arithmetic as the memory store**, in microseconds of the server's clock (`TIME`),
//!   so clients' clock skew can't matter. `tests/store_parity.rs` runs shared vectors
//!   against both stores. Lua computes in doubles: exact while `limit x window_in_µs` stays
//!   below 2^53 (e.g. 100 million tokens per day); past that a boundary may move by less
//!   than one unit.
//! - **Keys** `prefix:v2:{hash}:rule` (see `keys.rs`; `v2` is the version of the states'
//!   format, see "Upgrades" below): the caller's key is hashed, so no input can reach another
//!   namespace; the hash is the cluster hash tag, so one caller's rules share a slot. Every
//!   key has a TTL: the end of the next window (the counter, at most two windows; set when
//!   its window moves, kept by writes within a window), the time to drain (GCRA), the newest
//!   entry's expiry (log) or the lease (concurrency), so Redis memory is bounded by active
//!   keys. Needs Redis >= 6.0 (`SET ... KEEPTTL`).
//! - **Redis Cluster**: rules whose keys fall in different slots (per user vs per model) are
//!   decided by one script call per slot, sent concurrently; if any denies, the slots that
//!   admitted are refunded. A brief spurious denial of a concurrent request is possible in
//!   that window, over-admission is not.
//! - **Failures**: every call has a timeout (default 50 ms); after 5 consecutive failures a
//!   circuit breaker fails fast for a cooldown (default 1 s), then lets one probe through.
//!   While Redis can't answer, [`RedisFailure`] decides: report the error (the layer's
//!   [`crate::FailurePolicy`] then admits or answers 503), or decide locally with a share of
//!   each limit ([`RedisFailure::LocalFallback`]). Every such decision is logged (`WARN`) and
//!   counted ([`RedisStore::stats`]). When Redis answers again the store uses it again.
//!   [`RedisStoreBuilder::connect_lazy`] starts a store before Redis answers at all (the
//!   first call that reaches it connects); [`RedisStoreBuilder::connect`] needs it at once.
//! - **Idempotency**: [`Store::acquire_once`] with a request id (the layer's
//!   [`crate::RateLimitLayerBuilder::idempotency_header`]) is counted once; a retry gets the
//!   first decision back.
//!
//! # Upgrades
//!
//! Every key names the version of the format its state is stored in (`v2` since the binary
//! states; the keys of earlier versions had none: `prefix:{hash}:rule`). Versions that store
//! states differently therefore use different keys, and during a rolling upgrade old and new
//! replicas sharing one Redis and one prefix neither read, reset nor fail on each other's
//! states: each version enforces its limits on its own keys. The consequence: while both
//! versions run, each admits up to the whole limit, so up to the old plus the new budget can
//! be admitted in one window (at most twice the limit with two versions); idempotency
//! records are not shared either (a retry that reaches the other version is decided afresh);
//! no bucket is reset and no request fails. Once the old version is gone its keys expire
//! with their TTLs (at most about two windows, or the idempotency TTL). The script itself is
//! versioned the same way (`tower_llm_ratelimit_<hash>`, a script SHA), so versions never run
//! each other's code either.

mod breaker;
mod keys;

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::Script;

use self::breaker::Breaker;
use super::{
    Adjustment, BucketKey, Charge, ChargeState, ChargeStates, Decision, Denial, MemoryStore,
    Placement, Snapshot, Store, StoreError, StoreFuture,
};
use crate::clock::Clock;
use crate::rule::{Algorithm, Quota};

/// What the store does while Redis can't answer (down, timing out, circuit open).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RedisFailure {
    /// Return the error; the layer's [`crate::FailurePolicy`] admits or answers 503. The
    /// default.
    #[default]
    Error,
    /// Decide in this process with `limit / expected_replicas` of each limit (at least 1),
    /// so that the replicas together stay near the global limit. Decisions and settlements
    /// made locally stay local.
    LocalFallback {
        /// How many processes share the limits.
        expected_replicas: u64,
    },
}

/// Counters of what the store did, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RedisStats {
    /// Calls that failed (error or timeout) or were refused by the open circuit.
    pub errors: u64,
    /// Decisions taken by the local fallback.
    pub fallback_decisions: u64,
    /// Times the circuit breaker opened.
    pub breaker_opened: u64,
    /// Whether the circuit is open now.
    pub circuit_open: bool,
}

const SCRIPT: &str = include_str!("limiter.lua");
/// The script's last line, its entry point as an `EVAL` script; a function library registers
/// `main` instead.
const EVAL_ENTRY: &str = "return main(KEYS, ARGV)";
/// Bit of a placement made by the local fallback, so its settlement stays local.
const LOCAL: u64 = 1 << 63;
/// Lease ids must fit in a Lua double exactly.
const ID_MASK: u64 = (1 << 53) - 1;

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    /// A cluster not reached yet ([`RedisStoreBuilder::connect_lazy`]): the first call that
    /// can reach it connects, within that call's timeout; until then calls fail (and
    /// [`RedisFailure`] decides).
    LazyCluster(Arc<LazyCluster>),
}

struct LazyCluster {
    client: redis::cluster::ClusterClient,
    conn: tokio::sync::OnceCell<ClusterConnection>,
}

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

/// Limits shared across processes through Redis or Redis Cluster: one atomic Lua call per
/// decision (per cluster slot), server time, hashed and hash-tagged keys with TTLs, a call
/// timeout and circuit breaker, a [`RedisFailure`] policy, idempotent acquires. Clones share
/// one connection.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Conn,
    cluster: bool,
    script: Script,
    /// Whether calls go through the function library (`FCALL`, Redis >= 7); false for good
    /// once a server answers that it has no functions (Redis 6) or refuses them (ACL).
    functions: AtomicBool,
    prefix: String,
    timeout: Duration,
    failure: RedisFailure,
    breaker: Breaker,
    local: MemoryStore,
    idempotency_ttl_ms: u64,
    clock: Option<Arc<dyn Clock>>,
    next_lease: AtomicU64,
    errors: AtomicU64,
    fallback_decisions: AtomicU64,
    breaker_opened: AtomicU64,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("cluster", &self.inner.cluster)
            .field("prefix", &self.inner.prefix)
            .field("timeout", &self.inner.timeout)
            .field("failure", &self.inner.failure)
            .field("stats", &self.stats())
            .finish()
    }
}

impl RedisStore {
    /// A store on the single Redis server at `url` (`redis://127.0.0.1:6379`).
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder::new(vec![url.into()], false)
    }

    /// A store on the Redis Cluster reachable through `seed_nodes`.
    pub fn cluster<I, S>(seed_nodes: I) -> RedisStoreBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        RedisStoreBuilder::new(seed_nodes.into_iter().map(Into::into).collect(), true)
    }

    /// Connects to `url` with the default settings.
    pub async fn connect(url: impl Into<String>) -> Result<Self, StoreError> {
        Self::builder(url).connect().await
    }

    /// What the store has done so far.
    pub fn stats(&self) -> RedisStats {
        let i = &*self.inner;
        RedisStats {
            errors: i.errors.load(Ordering::Relaxed),
            fallback_decisions: i.fallback_decisions.load(Ordering::Relaxed),
            breaker_opened: i.breaker_opened.load(Ordering::Relaxed),
            circuit_open: i.breaker.is_open(),
        }
    }
}

impl RedisStoreBuilder {
    fn new(nodes: Vec<String>, cluster: bool) -> Self {
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

    /// How long a request id's decision is remembered (default 120 s).
    pub fn idempotency_ttl(mut self, ttl: Duration) -> Self {
        self.idempotency_ttl = ttl;
        self
    }

    /// Takes `now` from `clock` instead of the server's `TIME`: for deterministic tests
    /// only (in production, clients' clocks would skew the windows).
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
    /// the store runs as if [`connect`](Self::connect)ed. Only bad configuration fails here
    /// (a malformed URL, a prefix with braces). Must be called within a tokio runtime.
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
            Conn::LazyCluster(Arc::new(LazyCluster {
                client: self.cluster_client()?,
                conn: tokio::sync::OnceCell::new(),
            }))
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
                idempotency_ttl_ms: u64::try_from(self.idempotency_ttl.as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1),
                clock: self.clock,
                next_lease: AtomicU64::new(seed),
                errors: AtomicU64::new(0),
                fallback_decisions: AtomicU64::new(0),
                breaker_opened: AtomicU64::new(0),
            }),
        }
    }
}

fn backend(e: redis::RedisError) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// The test clock, shared with the local fallback store.
#[derive(Debug)]
struct SharedClock(Arc<dyn Clock>);

impl Clock for SharedClock {
    fn now_nanos(&self) -> u64 {
        self.0.now_nanos()
    }
}

/// One script call: the keys of one slot and the arguments for them.
struct Call {
    /// Indexes of the charges (or adjustments) in this call.
    members: Vec<usize>,
    keys: Vec<String>,
    /// The script's one argument (see `limiter.lua`): a header, then one record per key.
    args: Vec<u8>,
}

/// The argument blob's layout (little-endian, as the script's `struct.unpack` reads it):
/// header `<Bdd` mode, now (µs, or -1: the server's `TIME`), idempotency TTL (ms, 0 none),
/// then per key `<Bdddddd` algorithm, limit, window (µs), burst, amount (charged), placement,
/// actual. Every number travels as an `f64`: exact below 2^53, as the script's arithmetic
/// (see the module documentation).
const HEADER: usize = 17;
const RECORD: usize = 49;
const IDEM_TTL_AT: usize = 9;
const PLACEMENT_AT: usize = 33;
const ACTUAL_AT: usize = 41;

fn put_f64(buf: &mut [u8], at: usize, v: f64) {
    buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn algorithm_code(a: Algorithm) -> u8 {
    match a {
        Algorithm::SlidingWindowCounter => 0,
        Algorithm::SlidingWindowLog => 1,
        Algorithm::Gcra => 2,
        Algorithm::Concurrency => 3,
    }
}

fn window_us(q: &Quota) -> u64 {
    u64::try_from(q.window().as_micros())
        .unwrap_or(u64::MAX)
        .max(1)
}

impl Inner {
    fn now_arg(&self) -> f64 {
        match &self.clock {
            Some(c) => (c.now_nanos() / 1_000) as f64,
            None => -1.0,
        }
    }

    /// Groups per slot (one group on a single node), each with the script's arguments.
    fn calls<'a>(
        &self,
        mode: u8,
        items: impl Iterator<Item = (&'a BucketKey, &'a Quota, u64, u64, u64)>,
        request_id: Option<&str>,
    ) -> Vec<Call> {
        let now = self.now_arg();
        let mut calls: Vec<(u16, Call)> = Vec::with_capacity(1);
        for (i, (bucket, quota, amount, placement, actual)) in items.enumerate() {
            let key = keys::bucket_key(&self.prefix, bucket);
            let slot = if self.cluster { keys::slot(&key) } else { 0 };
            let at = match calls.iter().position(|(s, _)| *s == slot) {
                Some(at) => at,
                None => {
                    let mut args = Vec::with_capacity(HEADER + 3 * RECORD);
                    args.push(mode);
                    args.extend_from_slice(&now.to_le_bytes());
                    args.extend_from_slice(&0f64.to_le_bytes());
                    calls.push((
                        slot,
                        Call {
                            members: Vec::new(),
                            keys: Vec::new(),
                            args,
                        },
                    ));
                    calls.len() - 1
                }
            };
            let call = &mut calls[at].1;
            call.members.push(i);
            call.keys.push(key);
            call.args.push(algorithm_code(quota.algorithm()));
            for v in [
                quota.limit(),
                window_us(quota),
                quota.effective_burst(),
                amount,
                placement,
                actual,
            ] {
                call.args.extend_from_slice(&(v as f64).to_le_bytes());
            }
        }
        let mut calls: Vec<Call> = calls.into_iter().map(|(_, c)| c).collect();
        if let Some(id) = request_id {
            for call in &mut calls {
                let idem = keys::idempotency_key(&self.prefix, &call.keys[0], id);
                call.keys.push(idem);
                put_f64(&mut call.args, IDEM_TTL_AT, self.idempotency_ttl_ms as f64);
            }
        }
        calls
    }

    async fn run(&self, call: &Call) -> Result<Vec<i64>, StoreError> {
        if !self.breaker.allow() {
            self.errors.fetch_add(1, Ordering::Relaxed);
            return Err(StoreError::Backend(
                "circuit open after repeated Redis failures".into(),
            ));
        }
        let result = match self.conn.clone() {
            Conn::Single(mut c) => {
                tokio::time::timeout(self.timeout, self.invoke(call, &mut c)).await
            }
            Conn::Cluster(mut c) => {
                tokio::time::timeout(self.timeout, self.invoke(call, &mut c)).await
            }
            Conn::LazyCluster(lazy) => {
                tokio::time::timeout(self.timeout, async {
                    let mut c = lazy
                        .conn
                        .get_or_try_init(|| lazy.client.get_async_connection())
                        .await?
                        .clone();
                    self.invoke(call, &mut c).await
                })
                .await
            }
        };
        let error = match result.map(|r| r.map(|v| decode_reply(&v))) {
            Ok(Ok(Ok(reply))) => {
                self.breaker.success();
                return Ok(reply);
            }
            Ok(Ok(Err(e))) | Ok(Err(e)) => e.to_string(),
            Err(_) => format!("Redis did not answer within {:?}", self.timeout),
        };
        self.errors.fetch_add(1, Ordering::Relaxed);
        if self.breaker.failure() {
            self.breaker_opened.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(target: "tower_llm_ratelimit", error, "Redis circuit opened");
        }
        Err(StoreError::Backend(error))
    }

    /// One call of the script: `FCALL` of the library's function while the servers have
    /// functions, else `EVALSHA`.
    async fn invoke(
        &self,
        call: &Call,
        con: &mut impl redis::aio::ConnectionLike,
    ) -> redis::RedisResult<redis::Value> {
        if self.functions.load(Ordering::Relaxed) {
            let lib = library();
            let mut cmd = redis::cmd("FCALL");
            cmd.arg(&lib.name)
                .arg(call.keys.len())
                .arg(&call.keys)
                .arg(&call.args[..]);
            match self.fcall(&cmd, lib, con).await {
                Err(e) if functions_unavailable(&e) => {
                    // Nothing ran: fall back to EVALSHA, for good (Redis 6, or an ACL
                    // without functions).
                    if self.functions.swap(false, Ordering::Relaxed) {
                        tracing::info!(target: "tower_llm_ratelimit", error = %e, "Redis functions unavailable: using EVALSHA");
                    }
                }
                other => return other,
            }
        }
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.script.get_hash())
            .arg(call.keys.len())
            .arg(&call.keys)
            .arg(&call.args[..]);
        self.evalsha(&cmd, con).await
    }

    /// `FCALL`; when the function is missing (a restart without persistence, a failover to a
    /// node without it, `FUNCTION FLUSH`), loads the library (on every primary of a cluster)
    /// and retries once.
    async fn fcall(
        &self,
        cmd: &redis::Cmd,
        lib: &Library,
        con: &mut impl redis::aio::ConnectionLike,
    ) -> redis::RedisResult<redis::Value> {
        match cmd.query_async(con).await {
            Err(e) if function_missing(&e) => {
                // REPLACE only ever replaces this very body: the name carries its hash.
                redis::cmd("FUNCTION")
                    .arg("LOAD")
                    .arg("REPLACE")
                    .arg(&lib.code)
                    .query_async::<redis::Value>(con)
                    .await?;
                cmd.query_async(con).await
            }
            other => other,
        }
    }

    /// `EVALSHA`; on `NOSCRIPT` (a restart, a failover, `SCRIPT FLUSH`) loads the script
    /// and retries once.
    async fn evalsha(
        &self,
        cmd: &redis::Cmd,
        con: &mut impl redis::aio::ConnectionLike,
    ) -> redis::RedisResult<redis::Value> {
        match cmd.query_async(con).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                self.script.prepare_invoke().load_async(con).await?;
                cmd.query_async(con).await
            }
            other => other,
        }
    }

    /// Runs every call, concurrently when there are several.
    async fn run_all(
        self: &Arc<Self>,
        calls: Vec<Call>,
    ) -> Vec<(Call, Result<Vec<i64>, StoreError>)> {
        if calls.len() == 1 {
            let call = calls.into_iter().next().expect("one call");
            let result = self.run(&call).await;
            return vec![(call, result)];
        }
        let mut set = tokio::task::JoinSet::new();
        for (i, call) in calls.into_iter().enumerate() {
            let inner = Arc::clone(self);
            set.spawn(async move {
                let result = inner.run(&call).await;
                (i, call, result)
            });
        }
        let mut out = Vec::with_capacity(set.len());
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok(done) => out.push(done),
                Err(e) => {
                    // A panicked or cancelled task: report as a failure of an unknown call.
                    tracing::warn!(target: "tower_llm_ratelimit", error = %e, "Redis call task failed");
                }
            }
        }
        out.sort_by_key(|(i, _, _)| *i);
        out.into_iter().map(|(_, c, r)| (c, r)).collect()
    }

    fn fallback_quota(&self, q: &Quota) -> Option<Quota> {
        match self.failure {
            RedisFailure::Error => None,
            RedisFailure::LocalFallback { expected_replicas } => {
                let share = (q.limit() / expected_replicas.max(1)).max(1);
                Some(q.with_limit(share))
            }
        }
    }
}

/// The script as a Redis 7 function library: the same code, its `main` registered as a
/// function instead of run per call, so the helpers' closures are built once per load rather
/// than once per `EVALSHA`.
struct Library {
    /// The library's and its one function's name: `tower_llm_ratelimit_` and 16 hex digits
    /// of the SHA-1 of the library's code, so that two versions of this crate sharing a Redis
    /// use two libraries and never replace each other's.
    name: String,
    /// The `FUNCTION LOAD` payload.
    code: String,
}

fn library() -> &'static Library {
    static LIBRARY: OnceLock<Library> = OnceLock::new();
    LIBRARY.get_or_init(|| {
        let body = SCRIPT
            .trim_end()
            .strip_suffix(EVAL_ENTRY)
            .expect("limiter.lua ends with its EVAL entry point");
        // `@` stands for the name, which is derived from the rest.
        let register = "redis.register_function('@', main)\n";
        let mut hash = sha1_smol::Sha1::new();
        hash.update(body.as_bytes());
        hash.update(register.as_bytes());
        let name = format!("tower_llm_ratelimit_{}", &hash.digest().to_string()[..16]);
        let code = format!("#!lua name={name}\n{body}{}", register.replace('@', &name));
        Library { name, code }
    })
}

/// `FCALL` of a function the server doesn't have.
fn function_missing(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError)
        && e.detail()
            .is_some_and(|d| d.starts_with("Function not found"))
}

/// The server has no functions (`FCALL`/`FUNCTION` unknown: Redis 6) or this user may not use
/// them (ACL): nothing ran, and `EVALSHA` is the way.
fn functions_unavailable(e: &redis::RedisError) -> bool {
    match e.kind() {
        redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm) => true,
        redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError) => {
            e.detail().is_some_and(|d| {
                let d = d.to_ascii_lowercase();
                d.starts_with("unknown command") && (d.contains("fcall") || d.contains("function"))
            })
        }
        _ => false,
    }
}

/// The script's reply as integers: a string of little-endian doubles (acquire, peek), or an
/// array of integers (settle).
fn decode_reply(v: &redis::Value) -> redis::RedisResult<Vec<i64>> {
    match v {
        redis::Value::BulkString(bytes) if bytes.len() % 8 == 0 => Ok(bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as i64)
            .collect()),
        redis::Value::Array(items) if items.iter().all(|i| matches!(i, redis::Value::Int(_))) => {
            Ok(items
                .iter()
                .map(|i| match i {
                    redis::Value::Int(n) => *n,
                    _ => 0,
                })
                .collect())
        }
        other => Err(redis::RedisError::from((
            redis::ErrorKind::Parse,
            "unexpected script reply",
            format!("{other:?}"),
        ))),
    }
}

/// A snapshot from the script's microseconds.
fn snapshot(limit: i64, remaining: i64, reset_us: i64) -> Snapshot {
    Snapshot {
        limit: limit.max(0) as u64,
        remaining: remaining.max(0) as u64,
        reset_after_nanos: (reset_us.max(0) as u64).saturating_mul(1_000),
    }
}

impl RedisStore {
    fn acquire_inner(
        &self,
        charges: &[Charge<'_>],
        request_id: Option<&str>,
    ) -> StoreFuture<Result<Decision, StoreError>> {
        // As the memory store: one request charges a bucket once (the script would read the
        // bucket once per charge and count only the last write).
        if let Some(dup) = charges
            .iter()
            .enumerate()
            .find(|(i, c)| charges[..*i].iter().any(|p| p.bucket == c.bucket))
        {
            return StoreFuture::ready(Err(StoreError::DuplicateBucket(format!(
                "{:?}",
                dup.1.bucket
            ))));
        }
        let inner = Arc::clone(&self.inner);
        let leases: Vec<u64> = charges
            .iter()
            .map(|c| {
                if c.quota.algorithm() == Algorithm::Concurrency {
                    inner.next_lease.fetch_add(1, Ordering::Relaxed) & ID_MASK
                } else {
                    0
                }
            })
            .collect();
        let calls = inner.calls(
            b'a',
            charges
                .iter()
                .zip(&leases)
                .map(|(c, &id)| (c.bucket, c.quota, c.amount, id, 0)),
            request_id,
        );
        // Owned copies for the fallback, only when there is one.
        let owned: Option<Vec<(BucketKey, Quota, u64)>> =
            matches!(inner.failure, RedisFailure::LocalFallback { .. }).then(|| {
                charges
                    .iter()
                    .map(|c| (c.bucket.clone(), *c.quota, c.amount))
                    .collect()
            });
        let n = charges.len();
        StoreFuture::pending(async move {
            let n_calls = calls.len();
            let results = inner.run_all(calls).await;
            if results.len() != n_calls {
                // A call's task panicked or was cancelled: its slot's answer is unknown.
                refund_admitted(&inner, &results).await;
                return Err(StoreError::Backend("a Redis call task failed".into()));
            }
            if let Some(e) = results.iter().find_map(|(_, r)| r.as_ref().err()).cloned() {
                // Give back what the slots that did answer admitted, then fall back or fail.
                refund_admitted(&inner, &results).await;
                return match owned {
                    Some(owned) => Ok(decide_locally(&inner, &owned, &e)),
                    None => Err(e),
                };
            }
            let mut states = ChargeStates::filled(n);
            let mut denial: Option<(usize, i64)> = None;
            let mut replayed = false;
            for (call, reply) in &results {
                let reply = reply.as_ref().map_err(Clone::clone)?;
                if reply.len() != 2 + 4 * call.members.len() {
                    return Err(StoreError::Backend(format!(
                        "unexpected script reply of {} values",
                        reply.len()
                    )));
                }
                for (j, &i) in call.members.iter().enumerate() {
                    let r = &reply[2 + 4 * j..6 + 4 * j];
                    states[i] = ChargeState {
                        snapshot: snapshot(r[0], r[1], r[2]),
                        placement: Placement(r[3].max(0) as u64),
                    };
                }
                replayed |= reply[0] == -3;
                if reply[0] >= 0 {
                    let index = call.members[reply[0] as usize];
                    let retry = reply[1];
                    let worse = match denial {
                        None => true,
                        Some((_, -2)) => false,
                        Some((_, prev)) => retry == -2 || retry > prev,
                    };
                    if worse {
                        denial = Some((index, retry));
                    }
                }
            }
            if denial.is_some() {
                refund_admitted(&inner, &results).await;
            }
            Ok(Decision {
                denial: denial.map(|(index, retry)| Denial {
                    index,
                    retry_after: (retry >= 0).then(|| Duration::from_micros(retry as u64)),
                }),
                charges: states,
                replayed: replayed && denial.is_none(),
            })
        })
    }
}

/// Refunds the charges of the calls that admitted (their requests were denied elsewhere, or
/// another slot failed): a settle of each to 0.
async fn refund_admitted(inner: &Arc<Inner>, results: &[(Call, Result<Vec<i64>, StoreError>)]) {
    for (call, reply) in results {
        let Ok(reply) = reply else { continue };
        if reply.first() != Some(&-1) {
            continue;
        }
        // The same call in settle mode: charged = amount, the placement it got, actual 0.
        // With a request id, the settle also forgets the remembered decision, so a retry is
        // decided afresh rather than told "admitted" by a slot that was refunded.
        let mut args = call.args.clone();
        args[0] = b's';
        for j in 0..call.members.len() {
            let b = HEADER + RECORD * j;
            put_f64(&mut args, b + PLACEMENT_AT, reply[2 + 4 * j + 3] as f64);
            put_f64(&mut args, b + ACTUAL_AT, 0.0);
        }
        let refund = Call {
            members: call.members.clone(),
            keys: call.keys.clone(),
            args,
        };
        if let Err(e) = inner.run(&refund).await {
            tracing::warn!(target: "tower_llm_ratelimit", error = %e, "refunding a cross-slot reservation failed");
        }
    }
}

/// The local fallback's decision, with placements marked local.
fn decide_locally(
    inner: &Inner,
    owned: &[(BucketKey, Quota, u64)],
    error: &StoreError,
) -> Decision {
    inner.fallback_decisions.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(target: "tower_llm_ratelimit", %error, "Redis unavailable: deciding with the local fallback");
    let quotas: Vec<Quota> = owned
        .iter()
        .map(|(_, q, _)| inner.fallback_quota(q).unwrap_or(*q))
        .collect();
    let charges: Vec<Charge<'_>> = owned
        .iter()
        .zip(&quotas)
        .map(|((b, _, amount), q)| Charge::new(b, q, *amount))
        .collect();
    match inner.local.try_acquire(&charges) {
        Ok(mut d) => {
            for s in d.charges.iter_mut() {
                s.placement = Placement(s.placement.0 | LOCAL);
            }
            d
        }
        // The local store is unbounded enough that this only happens at its key cap: deny.
        Err(_) => Decision {
            denial: Some(Denial {
                index: 0,
                retry_after: Some(Duration::from_secs(1)),
            }),
            charges: ChargeStates::filled(owned.len()),
            replayed: false,
        },
    }
}

impl Store for RedisStore {
    fn acquire(&self, charges: &[Charge<'_>]) -> StoreFuture<Result<Decision, StoreError>> {
        self.acquire_inner(charges, None)
    }

    fn acquire_once(
        &self,
        charges: &[Charge<'_>],
        request_id: &str,
    ) -> StoreFuture<Result<Decision, StoreError>> {
        self.acquire_inner(charges, Some(request_id))
    }

    fn settle(&self, adjustments: &[Adjustment<'_>]) -> StoreFuture<Result<(), StoreError>> {
        let inner = Arc::clone(&self.inner);
        // Local placements settle locally, synchronously.
        let local: Vec<(Adjustment<'_>, Quota)> = adjustments
            .iter()
            .filter(|a| a.placement.0 & LOCAL != 0)
            .map(|a| (*a, inner.fallback_quota(a.quota).unwrap_or(*a.quota)))
            .collect();
        if !local.is_empty() {
            let local: Vec<Adjustment<'_>> = local
                .iter()
                .map(|(a, q)| Adjustment {
                    quota: q,
                    placement: Placement(a.placement.0 & !LOCAL),
                    ..*a
                })
                .collect();
            let _ = inner.local.settle(&local).now();
        }
        let remote: Vec<&Adjustment<'_>> = adjustments
            .iter()
            .filter(|a| a.placement.0 & LOCAL == 0)
            .collect();
        if remote.is_empty() {
            return StoreFuture::ready(Ok(()));
        }
        let calls = inner.calls(
            b's',
            remote
                .iter()
                .map(|a| (a.bucket, a.quota, a.charged, a.placement.0, a.actual)),
            None,
        );
        StoreFuture::pending(async move {
            for (_, r) in inner.run_all(calls).await {
                r?;
            }
            Ok(())
        })
    }

    fn peek(&self, bucket: &BucketKey, quota: &Quota) -> StoreFuture<Result<Snapshot, StoreError>> {
        let inner = Arc::clone(&self.inner);
        let calls = inner.calls(b'p', std::iter::once((bucket, quota, 0, 0, 0)), None);
        let fallback = inner.fallback_quota(quota).map(|q| (bucket.clone(), q));
        StoreFuture::pending(async move {
            let mut results = inner.run_all(calls).await;
            match results.pop().map(|(_, r)| r) {
                Some(Ok(reply)) if reply.len() >= 6 => Ok(snapshot(reply[2], reply[3], reply[4])),
                Some(Ok(reply)) => Err(StoreError::Backend(format!(
                    "unexpected script reply of {} values",
                    reply.len()
                ))),
                Some(Err(e)) => match fallback {
                    Some((b, q)) => inner.local.peek(&b, &q).await,
                    None => Err(e),
                },
                None => Err(StoreError::Backend("no reply".into())),
            }
        })
    }
}
