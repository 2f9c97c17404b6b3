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
//!   its window moves, kept by writes within a window), the time to drain plus the refunds it
//!   gave back (GCRA, see `Gcra::adjust`), the end of the period plus a second (calendar
//!   windows, whose UTC period the script computes from `TIME`), the newest
//!   entry's expiry (log) or the lease (concurrency), so Redis memory is bounded by active
//!   keys. Needs Redis >= 6.0 (`SET ... KEEPTTL`).
//! - **Redis Cluster**: rules whose keys fall in different slots (per user vs per model) are
//!   decided by one script call per slot, sent concurrently; if any denies, the slots that
//!   admitted are refunded. A brief spurious denial of a concurrent request is possible in
//!   that window, over-admission is not.
//! - **Failover** (a primary dies, its replica is promoted): the calls to the dead primary's
//!   slots fail (error or timeout, then the open circuit) and [`RedisFailure`] decides them;
//!   the store then finds the new primary by itself, with no restart and no configuration
//!   change: the redis crate reconnects, follows the `MOVED` answers of the other nodes and
//!   refreshes its slot map (`tests/redis.rs` and the gateway's `tests/gateway/cluster.rs`
//!   kill a primary of a real cluster: a few seconds of failures, then exactly the limit
//!   admitted). **The bound:** Redis replicates asynchronously, so the counts a primary had
//!   acknowledged but not yet sent to its replica when it died are lost with it; the replica
//!   takes over without them and admits that many requests again. The extra admissions
//!   after a failover are at most the admissions written within the replication lag before
//!   the crash (per bucket: the lag x its request rate; the lag shows as the difference of
//!   the primary's and the replica's offsets in `INFO replication`); none when the replica
//!   had caught up. (A single server restarted without persistence loses every count the
//!   same way.) `WAIT` is not used: it would block the connection that all of this process's decisions
//!   on that node share until a replica acknowledges (one replica round trip per decision),
//!   and after a failover the promoted primary has no replica until one rejoins, so a
//!   decision waiting for one would fail for that whole time.
//! - **Failures**: every call has a timeout (default 50 ms); after 5 consecutive failures a
//!   circuit breaker fails fast for a cooldown (default 1 s), then lets one probe through.
//!   While Redis can't answer, [`RedisFailure`] decides: report the error (the layer's
//!   [`crate::FailurePolicy`] then admits or answers 503), or decide locally with a share of
//!   each limit ([`RedisFailure::LocalFallback`]). Every such decision is logged (`WARN`) and
//!   counted ([`RedisStore::stats`]). When Redis answers again the store uses it again.
//!   [`RedisStoreBuilder::connect_lazy`] starts a store before Redis answers at all (the
//!   first call that reaches it connects); [`RedisStoreBuilder::connect`] needs it at once.
//! - **Concurrency slots after failures**: a slot is a sorted-set member named by a lease id
//!   this client picks, so it can always be released, and releasing is idempotent. When an
//!   acquire fails after Redis may have run it (a timeout, a broken connection), or a
//!   settlement that releases slots fails (timeout, error, open circuit), the release is
//!   queued and one background task retries it, oldest first, backing off from 50 ms to 1 s,
//!   so the slot comes back within about a second of Redis answering again instead of at the
//!   end of its lease (10 minutes by default). Redis runs one connection's commands in order,
//!   so a release sent after a timed-out acquire runs after it. Bounded: at most 4,096
//!   releases wait (past that a slot comes back when its lease ends, with a warning), a
//!   release is dropped once its lease has ended, one call is in flight at a time
//!   ([`RedisStats::pending_releases`] counts them). Token corrections that fail are not
//!   retried (not idempotent): the estimate stays charged, the conservative side. A client
//!   that leaves while its decision is pending is handled by the layer (the decision is
//!   awaited in the background and its slots released).
//! - **Idempotent retries** ([Idempotent retries](crate::store#idempotent-retries), the same
//!   table as the memory store): [`Store::fail_attempt`] writes a small record per request
//!   identity (`prefix:v2:{tag}:idem:<digest>`, in the slot of the request's buckets, one per
//!   slot on a cluster) that lives for [`RedisStoreBuilder::idempotency_ttl`] (default
//!   120 s); the acquire of a retry reads it in the same script call as the buckets, skips the
//!   request counts and marks the record used, all atomically, so two concurrent retries
//!   can't both go free. Nothing is written for a request that doesn't fail. The layer
//!   holds the body of the failed answer until the failure is written (one round trip more,
//!   on failed attempts with an id only, bounded by the call timeout), so a retry sent once
//!   the client has read the answer finds it (a client that retries on the status line
//!   alone, before the body, may be charged). A retry is charged (the safe side) when that write failed, when it is
//!   decided by the local fallback, or when another slot of its request denied it (cluster:
//!   the record's free retry is used up by the refunded attempt).
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
//! no bucket is reset and no request fails. (One exception within `v2`: a GCRA state that has
//! given refunds back is 8 bytes longer than before; a replica older than that reads it as a
//! fresh bucket.) Once the old version is gone its keys expire
//! with their TTLs (at most about two windows, or the idempotency TTL). The script itself is
//! versioned the same way (`tower_llm_ratelimit_<hash>`, a script SHA), so versions never run
//! each other's code either.

mod breaker;
mod builder;
mod keys;
mod release;
mod reply;
mod script;

pub use self::builder::RedisStoreBuilder;
use self::release::Releases;
#[cfg(fuzzing)]
#[doc(hidden)]
pub use self::reply::fuzz_acquire_replies;
use self::script::{
    may_have_run, put_f64, Call, ACTUAL_AT, AMOUNT_AT, HEADER, PLACEMENT_AT, RECORD, SCRIPT,
};

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::Script;

use self::breaker::Breaker;
use super::{
    Adjustment, BucketKey, Charge, ChargeStates, Decision, Denial, IdempotencyKey, MemoryStore,
    Placement, Snapshot, Store, StoreError, StoreFuture,
};
use crate::algorithm::Algorithm;
use crate::clock::Clock;
use crate::rule::Quota;

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
    /// Concurrency slots waiting for Redis to release them (after a failed call).
    pub pending_releases: u64,
}

/// Bit of a placement made by the local fallback, so its settlement stays local.
const LOCAL: u64 = 1 << 63;
/// Lease ids must fit in a Lua double exactly.
const ID_MASK: u64 = (1 << 53) - 1;

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    /// A cluster not reached yet ([`RedisStoreBuilder::connect_lazy`]).
    LazyCluster(Arc<LazyCluster>),
}

/// A cluster connection made in the background: a call that finds none starts an attempt
/// (one at a time) and fails at once, so that no call waits for the slot map and the
/// connections to every primary (more round trips than one call's timeout may allow);
/// [`RedisFailure`] decides until the attempt succeeds. A failed attempt is retried by the
/// next call.
struct LazyCluster {
    client: redis::cluster::ClusterClient,
    conn: std::sync::OnceLock<ClusterConnection>,
    connecting: AtomicBool,
}

impl LazyCluster {
    fn new(client: redis::cluster::ClusterClient) -> Self {
        Self {
            client,
            conn: std::sync::OnceLock::new(),
            connecting: AtomicBool::new(false),
        }
    }

    /// The connection once made; `None` while there is none (an attempt is then running).
    fn connection(self: &Arc<Self>) -> Option<ClusterConnection> {
        if let Some(c) = self.conn.get() {
            return Some(c.clone());
        }
        if !self.connecting.swap(true, Ordering::AcqRel) {
            let this = Arc::clone(self);
            let attempt = async move {
                match this.client.get_async_connection().await {
                    Ok(c) => {
                        let _ = this.conn.set(c);
                    }
                    Err(e) => tracing::warn!(
                        target: "tower_llm_ratelimit",
                        error = %e,
                        "connecting to the Redis cluster failed; the next call tries again"
                    ),
                }
                this.connecting.store(false, Ordering::Release);
            };
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn(attempt)),
                Err(_) => self.connecting.store(false, Ordering::Release),
            }
        }
        None
    }
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
    /// Concurrency slots to release once Redis answers (see `release.rs`).
    releases: Releases,
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

    /// A store on the Redis Cluster reachable through `seed_nodes` (some of its nodes, as
    /// `redis://host:port` URLs; the others are found from them). After a failover the store
    /// finds the promoted replica by itself; see the module docs for what a failover may
    /// lose (counts not yet replicated).
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
            pending_releases: i.releases.len() as u64,
        }
    }
}

impl RedisStore {
    fn acquire_inner(
        &self,
        charges: &[Charge<'_>],
        idempotency: Option<&IdempotencyKey>,
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
                // The last field flags the charges a free retry doesn't pay (`limiter.lua`).
                .map(|(c, &id)| {
                    let flag = u64::from(idempotency.is_some() && c.is_request_count());
                    (c.bucket, c.quota, c.amount, id, flag)
                }),
            idempotency,
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
            // A reply that doesn't fit its call is the call's error.
            let results: Vec<_> = inner
                .run_all(calls)
                .await
                .into_iter()
                .map(|(call, r)| {
                    let r = r.and_then(|reply| reply::check_acquire(reply, call.members.len()));
                    (call, r)
                })
                .collect();
            if results.len() != n_calls {
                // A call's task panicked or was cancelled: its slot's answer is unknown.
                refund_admitted(&inner, &results).await;
                return Err(StoreError::Backend("a Redis call task failed".into()));
            }
            if let Some(e) = results.iter().find_map(|(_, r)| r.as_ref().err()).cloned() {
                // A call that may have run took its slots for nobody: release them once Redis
                // answers. Give back what the slots that did answer admitted, then fall back
                // or fail.
                for (call, r) in &results {
                    if matches!(r, Err(e) if may_have_run(e)) {
                        release_slots(&inner, call);
                    }
                }
                refund_admitted(&inner, &results).await;
                return match owned {
                    Some(owned) => Ok(decide_locally(&inner, &owned, &e)),
                    None => Err(e),
                };
            }
            let decision = reply::decision(
                n,
                results.iter().filter_map(|(call, r)| {
                    r.as_ref()
                        .ok()
                        .map(|reply| (call.members.as_slice(), reply.as_slice()))
                }),
            );
            if decision.denial.is_some() {
                refund_admitted(&inner, &results).await;
            }
            Ok(decision)
        })
    }
}

/// Refunds the charges of the calls that admitted (their requests were denied elsewhere, or
/// another slot failed): a settle of each to 0.
async fn refund_admitted(inner: &Arc<Inner>, results: &[(Call, Result<Vec<i64>, StoreError>)]) {
    for (call, reply) in results {
        let Ok(reply) = reply else { continue };
        let free_retry = match reply.first() {
            Some(-1) => false,
            Some(-3) => true,
            _ => continue,
        };
        // The same call in settle mode: charged = amount, the placement it got, actual 0.
        // A free retry's request counts were not charged: charged 0, nothing to refund. Its
        // idempotency record stays used (the retry after this one is charged: the safe side).
        let mut args = call.args.clone();
        args[0] = b's';
        for j in 0..call.members.len() {
            let b = HEADER + RECORD * j;
            if free_retry && args[b + ACTUAL_AT..b + ACTUAL_AT + 8] == 1f64.to_le_bytes() {
                put_f64(&mut args, b + AMOUNT_AT, 0.0);
            }
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
            // Sent or not, the slots it gives back are still taken.
            release_slots(inner, &refund);
        }
    }
}

/// Queues the release of the concurrency slots `call` takes or gives back, if any, to run
/// once Redis answers (see `release.rs`).
fn release_slots(inner: &Arc<Inner>, call: &Call) {
    if let Some((release, lease)) = call.slot_releases() {
        release::queue(inner, release, lease);
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
            free_retry: false,
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
        id: &IdempotencyKey,
    ) -> StoreFuture<Result<Decision, StoreError>> {
        self.acquire_inner(charges, Some(id))
    }

    fn fail_attempt(
        &self,
        charges: &[Charge<'_>],
        id: &IdempotencyKey,
    ) -> StoreFuture<Result<(), StoreError>> {
        let inner = Arc::clone(&self.inner);
        let calls = inner.fail_calls(charges.iter().map(|c| c.bucket), id);
        StoreFuture::pending(async move {
            for (_, r) in inner.run_all(calls).await {
                r?;
            }
            Ok(())
        })
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
            let mut result = Ok(());
            for (call, r) in inner.run_all(calls).await {
                if let Err(e) = r {
                    // The slots this settlement releases are released later, whatever else
                    // it corrected (token corrections are not retried: they are not
                    // idempotent, and a lost one keeps the estimate, the conservative side).
                    release_slots(&inner, &call);
                    result = Err(e);
                }
            }
            result
        })
    }

    fn peek(&self, bucket: &BucketKey, quota: &Quota) -> StoreFuture<Result<Snapshot, StoreError>> {
        let inner = Arc::clone(&self.inner);
        let calls = inner.calls(b'p', std::iter::once((bucket, quota, 0, 0, 0)), None);
        let fallback = inner.fallback_quota(quota).map(|q| (bucket.clone(), q));
        StoreFuture::pending(async move {
            let mut results = inner.run_all(calls).await;
            match results.pop().map(|(_, r)| r) {
                Some(Ok(reply)) if reply.len() >= 6 => {
                    Ok(reply::snapshot(reply[2], reply[3], reply[4]))
                }
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
