//! One call of the limiter script: its keys and packed arguments, sending it (`FCALL` of
//! the function library, or `EVALSHA`), and reading its reply.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::{keys, Conn, Inner, RedisFailure};
use crate::algorithm::{Algorithm, CalendarPeriod};
use crate::rule::Quota;
use crate::store::{BucketKey, IdempotencyKey, StoreError};

pub(super) const SCRIPT: &str = include_str!("limiter.lua");
/// The script's last line, its entry point as an `EVAL` script; a function library registers
/// `main` instead.
pub(super) const EVAL_ENTRY: &str = "return main(KEYS, ARGV)";

/// One script call: the keys of one slot and the arguments for them.
#[derive(Debug, Clone)]
pub(super) struct Call {
    /// Indexes of the charges (or adjustments) in this call.
    pub(super) members: Vec<usize>,
    pub(super) keys: Vec<String>,
    /// The script's one argument (see `limiter.lua`): a header, then one record per key.
    pub(super) args: Vec<u8>,
}

/// The argument blob's layout (little-endian, as the script's `struct.unpack` reads it):
/// header `<Bddd` mode, now (µs, or -1: the server's `TIME`), idempotency TTL (ms, 0 none),
/// wall-clock now for calendar windows (µs since the epoch, or -1: `TIME`), then per key `<Bdddddd` algorithm, limit, window (µs), burst, amount (charged), placement,
/// actual. Every number travels as an `f64`: exact below 2^53, as the script's arithmetic
/// (see the module documentation).
pub(super) const HEADER: usize = 25;
pub(super) const RECORD: usize = 49;
pub(super) const IDEM_TTL_AT: usize = 9;
const UNIX_AT: usize = 17;
const WINDOW_AT: usize = 9;
pub(super) const AMOUNT_AT: usize = 25;
pub(super) const PLACEMENT_AT: usize = 33;
pub(super) const ACTUAL_AT: usize = 41;

/// The error of a call refused by the open circuit: nothing was sent.
pub(super) const CIRCUIT_OPEN: &str = "circuit open after repeated Redis failures";
/// The error of a call made before the cluster connection exists: nothing was sent.
const NOT_CONNECTED: &str = "not connected to the Redis cluster yet (connecting in the background)";

/// Whether a failed call may have run on Redis (it timed out, or its connection broke after
/// sending it), rather than failing before anything was sent.
pub(super) fn may_have_run(e: &StoreError) -> bool {
    !matches!(e, StoreError::Backend(m) if m == CIRCUIT_OPEN || m.contains(NOT_CONNECTED))
}

fn get_f64(buf: &[u8], at: usize) -> f64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    f64::from_le_bytes(b)
}

impl Call {
    /// The settle call that releases the concurrency slots this call takes (an acquire) or
    /// gives back (a settlement), and the longest of their leases; `None` when it names none.
    /// Idempotent: it removes the slots' members, whether or not this call ran.
    pub(super) fn slot_releases(&self) -> Option<(Call, Duration)> {
        let concurrency = algorithm_code(Algorithm::Concurrency);
        let acquire = self.args.first() == Some(&b'a');
        let mut args = Vec::with_capacity(HEADER + RECORD);
        args.push(b's');
        args.extend_from_slice(&self.args[1..IDEM_TTL_AT]);
        args.extend_from_slice(&0f64.to_le_bytes());
        args.extend_from_slice(&self.args[UNIX_AT..HEADER]);
        let (mut keys, mut lease_us) = (Vec::new(), 0f64);
        for (j, key) in self.keys.iter().enumerate() {
            let at = HEADER + RECORD * j;
            let Some(record) = self.args.get(at..at + RECORD) else {
                break; // the idempotency key has no record
            };
            let (amount, actual) = (get_f64(record, AMOUNT_AT), get_f64(record, ACTUAL_AT));
            if record[0] != concurrency || (!acquire && actual >= amount) {
                continue;
            }
            lease_us = lease_us.max(get_f64(record, WINDOW_AT));
            let from = args.len();
            args.extend_from_slice(record);
            put_f64(&mut args, from + ACTUAL_AT, 0.0);
            keys.push(key.clone());
        }
        (!keys.is_empty()).then(|| {
            let call = Call {
                members: (0..keys.len()).collect(),
                keys,
                args,
            };
            (call, Duration::from_micros(lease_us as u64))
        })
    }
}

pub(super) fn put_f64(buf: &mut [u8], at: usize, v: f64) {
    buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

pub(super) fn algorithm_code(a: Algorithm) -> u8 {
    match a {
        Algorithm::SlidingWindowCounter => 0,
        Algorithm::SlidingWindowLog => 1,
        Algorithm::Gcra => 2,
        Algorithm::Concurrency => 3,
        Algorithm::Calendar(CalendarPeriod::Hour) => 4,
        Algorithm::Calendar(CalendarPeriod::Day) => 5,
        Algorithm::Calendar(CalendarPeriod::Month) => 6,
    }
}

pub(super) fn window_us(q: &Quota) -> u64 {
    u64::try_from(q.window().as_micros())
        .unwrap_or(u64::MAX)
        .max(1)
}

impl Inner {
    pub(super) fn now_arg(&self) -> f64 {
        match &self.clock {
            Some(c) => (c.now_nanos() / 1_000) as f64,
            None => -1.0,
        }
    }

    /// The wall clock for calendar windows: the test clock's, or -1 (the server's `TIME`).
    pub(super) fn unix_arg(&self) -> f64 {
        match &self.clock {
            Some(c) => (c.unix_nanos() / 1_000) as f64,
            None => -1.0,
        }
    }

    /// Groups per slot (one group on a single node), each with the script's arguments.
    pub(super) fn calls<'a>(
        &self,
        mode: u8,
        items: impl Iterator<Item = (&'a BucketKey, &'a Quota, u64, u64, u64)>,
        idempotency: Option<&IdempotencyKey>,
    ) -> Vec<Call> {
        let (now, unix) = (self.now_arg(), self.unix_arg());
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
                    args.extend_from_slice(&unix.to_le_bytes());
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
        if let Some(id) = idempotency {
            for call in &mut calls {
                let idem = keys::idempotency_key(&self.prefix, &call.keys[0], id);
                call.keys.push(idem);
                put_f64(&mut call.args, IDEM_TTL_AT, self.idempotency_ttl_ms as f64);
            }
        }
        calls
    }

    /// The calls of [`crate::store::Store::fail_attempt`]: one per slot of `buckets`, each
    /// naming only the idempotency record of that slot (mode `f`, no bucket).
    pub(super) fn fail_calls<'a>(
        &self,
        buckets: impl Iterator<Item = &'a BucketKey>,
        id: &IdempotencyKey,
    ) -> Vec<Call> {
        let mut calls: Vec<(u16, Call)> = Vec::with_capacity(1);
        for bucket in buckets {
            let key = keys::bucket_key(&self.prefix, bucket);
            let slot = if self.cluster { keys::slot(&key) } else { 0 };
            if calls.iter().any(|(s, _)| *s == slot) {
                continue;
            }
            let mut args = Vec::with_capacity(HEADER);
            args.push(b'f');
            args.extend_from_slice(&self.now_arg().to_le_bytes());
            args.extend_from_slice(&(self.idempotency_ttl_ms as f64).to_le_bytes());
            args.extend_from_slice(&self.unix_arg().to_le_bytes());
            calls.push((
                slot,
                Call {
                    members: Vec::new(),
                    keys: vec![keys::idempotency_key(&self.prefix, &key, id)],
                    args,
                },
            ));
        }
        calls.into_iter().map(|(_, c)| c).collect()
    }

    pub(super) async fn run(&self, call: &Call) -> Result<Vec<i64>, StoreError> {
        if !self.breaker.allow() {
            self.errors.fetch_add(1, Ordering::Relaxed);
            return Err(StoreError::Backend(CIRCUIT_OPEN.into()));
        }
        let result = match self.conn.clone() {
            Conn::Single(mut c) => {
                tokio::time::timeout(self.timeout, self.invoke(call, &mut c)).await
            }
            Conn::Cluster(mut c) => {
                tokio::time::timeout(self.timeout, self.invoke(call, &mut c)).await
            }
            Conn::LazyCluster(lazy) => match lazy.connection() {
                Some(mut c) => tokio::time::timeout(self.timeout, self.invoke(call, &mut c)).await,
                None => Ok(Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    NOT_CONNECTED,
                )))),
            },
        };
        let error = match result.map(|r| r.map(|v| super::reply::decode(&v))) {
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
    pub(super) async fn invoke(
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
    pub(super) async fn fcall(
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
    pub(super) async fn evalsha(
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
    pub(super) async fn run_all(
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

    pub(super) fn fallback_quota(&self, q: &Quota) -> Option<Quota> {
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
pub(super) struct Library {
    /// The library's and its one function's name: `tower_llm_ratelimit_` and 16 hex digits
    /// of the SHA-1 of the library's code, so that two versions of this crate sharing a Redis
    /// use two libraries and never replace each other's.
    name: String,
    /// The `FUNCTION LOAD` payload.
    code: String,
}

pub(super) fn library() -> &'static Library {
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
pub(super) fn function_missing(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError)
        && e.detail()
            .is_some_and(|d| d.starts_with("Function not found"))
}

/// The server has no functions (`FCALL`/`FUNCTION` unknown: Redis 6) or this user may not use
/// them (ACL): nothing ran, and `EVALSHA` is the way.
pub(super) fn functions_unavailable(e: &redis::RedisError) -> bool {
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
