//! The Redis store against one local `redis-server` (started here on a free loopback port,
//! never 6379), next to the classic sorted-set sliding log under the same load.
//!
//! ```text
//! cargo bench --bench redis --features redis
//! ```
//!
//! Load: one process, `REDIS_BENCH_TASKS` (64) concurrent tasks on a 1-worker tokio runtime
//! (`REDIS_BENCH_THREADS`), `REDIS_BENCH_DECISIONS` (100,000) decisions per row after a
//! warm-up of 10%, callers rotating over `REDIS_BENCH_USERS` (1,000) users. Every decision is
//! admitted (limits far above the load; each row asserts it), so every call does the full
//! check-and-charge.
//!
//! Rows:
//!
//! - `redis-benchmark EVALSHA "return 1"`: the server's ceiling for a trivial script,
//!   unpipelined, 64 clients (a reference, not our code);
//! - `redis-benchmark EVALSHA "return 1" with the same 3 keys + 1 argument`: what passing
//!   our keys and argument blob costs (the blob replaced by as many bytes of text);
//! - `EVALSHA limiter.lua, 3 hot keys`: our script with fixed arguments on three hot keys,
//!   driven through one plain redis-rs connection by the same tasks (redis-benchmark can't
//!   send its binary argument): the server-side cost of our script without the store;
//! - `ours, 1 rule` / `ours, 3 rules`: `RedisStore::acquire` (one `FCALL` per decision over
//!   the store's multiplexed connection), sliding window counter; 3 rules = per-user requests,
//!   per-user tokens and per-model tokens (one model: a hot key), all in one script call;
//! - `ours, 1 rule, sliding window log`: the exact algorithm, for parity with the sorted set;
//! - `zset log, 1 rule` / `zset log, 3 rules`: the classic design (ZREMRANGEBYSCORE, ZCARD,
//!   ZADD, EXPIRE per rule, in one MULTI/EXEC) over one multiplexed `ConnectionManager`,
//!   counting requests only (it has no weighted charge, no all-or-nothing across rules: it
//!   charges first and checks the count after; its 3 rules are 3 request-count sets on the
//!   same keys as ours).
//!
//! Columns: decisions/s; client-observed p50/p99; Redis CPU per decision from
//! `INFO commandstats` after `CONFIG RESETSTAT` (`usec_per_call` of `FCALL`, or `EVALSHA`
//! on a server without functions or for the references; for the
//! sorted set, `EXEC` plus `MULTI`; both include the commands they run), and from the
//! process's own CPU time (`INFO cpu`: `used_cpu_user + used_cpu_sys`, which includes
//! networking); this (client) process's CPU per decision (`/proc/self/task/*/schedstat`);
//! bytes per key from `MEMORY USAGE key SAMPLES 0` after the row (a user's key, and the
//! model's key for 3 rules). The "nested" line under the table splits commandstats per
//! command called inside the script or transaction.
//!
//! The reference rows use `redis-benchmark` (64 clients), which shares the machine's cores
//! with the server like our client does.

#[allow(dead_code)]
#[path = "support/cpu.rs"]
mod cpu;
#[allow(dead_code, unreachable_pub)]
#[path = "../tests/support/redis.rs"]
mod redis_server;

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::aio::ConnectionManager;
use tower_llm_ratelimit::store::{BucketKey, Charge, RedisStore, Store};
use tower_llm_ratelimit::Quota;

use redis_server::RedisServer;

const SCRIPT: &str = include_str!("../src/store/redis/limiter.lua");

/// Far above the load, and within what the script computes exactly in doubles
/// (`limit x window_in_µs < 2^53` for a minute: limit < ~1.5 x 10^8).
const LIMIT: u64 = 100_000_000;
/// Tokens charged per decision by the token rules.
const TOKENS: u64 = 400;
const WINDOW_US: u64 = 60_000_000;
/// How long one row may take before the bench gives up.
const ROW_LIMIT: Duration = Duration::from_secs(300);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().replace('_', "").parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

struct Config {
    decisions: usize,
    tasks: usize,
    users: usize,
}

/// One row's measurements.
struct Row {
    name: String,
    decisions: usize,
    elapsed: Duration,
    latencies: Vec<u64>,
    /// `usec_per_call` per decision from commandstats, and what it counts.
    stat_us: Option<f64>,
    stat_note: String,
    /// Redis process CPU per decision, µs.
    cpu_us: Option<f64>,
    /// This (client) process's CPU per decision, µs.
    client_us: Option<f64>,
    bytes: String,
}

impl Row {
    fn rps(&self) -> f64 {
        self.decisions as f64 / self.elapsed.as_secs_f64()
    }

    fn pct_us(&mut self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        self.latencies.sort_unstable();
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[i] as f64 / 1_000.0
    }
}

/// `INFO <section>` as a map.
fn info(server: &RedisServer, section: &str) -> HashMap<String, String> {
    server
        .cli(&["INFO", section])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn cpu_seconds(server: &RedisServer) -> f64 {
    let i = info(server, "cpu");
    let get = |k: &str| i.get(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    get("used_cpu_user") + get("used_cpu_sys")
}

/// `cmdstat_<name>`: (calls, usec).
fn commandstats(server: &RedisServer) -> HashMap<String, (u64, u64)> {
    info(server, "commandstats")
        .into_iter()
        .filter_map(|(k, v)| {
            let name = k.strip_prefix("cmdstat_")?.to_owned();
            let field = |f: &str| {
                v.split(',')
                    .find_map(|kv| kv.strip_prefix(f)?.strip_prefix('='))
                    .and_then(|n| n.parse::<u64>().ok())
            };
            Some((name, (field("calls")?, field("usec")?)))
        })
        .collect()
}

/// `MEMORY USAGE` of the first key matching `pattern`, with its name.
fn memory_of(server: &RedisServer, pattern: &str) -> Option<(String, u64)> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &server.port.to_string()])
        .args(["--scan", "--pattern", pattern])
        .output()
        .ok()?;
    let key = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| !l.is_empty())?
        .to_owned();
    let bytes = server
        .cli(&["MEMORY", "USAGE", &key, "SAMPLES", "0"])?
        .trim()
        .parse()
        .ok()?;
    Some((key, bytes))
}

fn describe_memory(server: &RedisServer, patterns: &[(&str, &str)]) -> String {
    patterns
        .iter()
        .map(|(what, pattern)| match memory_of(server, pattern) {
            Some((_, b)) => format!("{what} {b} B"),
            None => format!("{what} ?"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs `n` decisions of `decide` on `tasks` tasks; returns the elapsed time and latencies.
/// `decide(i)` must return `Ok(true)` for an admitted decision.
async fn drive<F, Fut>(n: usize, tasks: usize, decide: F) -> (Duration, Vec<u64>)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<bool, String>> + Send,
{
    let decide = Arc::new(decide);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let decide = Arc::clone(&decide);
            let next = Arc::clone(&next);
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(n / tasks + 1);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return Ok::<_, String>(lat);
                    }
                    let t = Instant::now();
                    let admitted = decide(i).await?;
                    lat.push(t.elapsed().as_nanos() as u64);
                    if !admitted {
                        return Err(format!("decision {i} was denied"));
                    }
                }
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(n);
    for h in handles {
        match h.await.expect("task") {
            Ok(l) => latencies.extend(l),
            Err(e) => panic!("{e}"),
        }
    }
    (start.elapsed(), latencies)
}

/// Warm-up, reset the stats, measure, read the stats.
/// A one-rule decision: `quota` charged 1 on the key of user `i % keys.len()`.
async fn one_rule(
    store: RedisStore,
    keys: Arc<Vec<BucketKey>>,
    quota: Quota,
    i: usize,
) -> Result<bool, String> {
    let k = &keys[i % keys.len()];
    let d = store
        .acquire(&[Charge::new(k, &quota, 1)])
        .await
        .map_err(|e| e.to_string())?;
    Ok(d.is_admitted())
}

async fn measure<F, Fut>(
    server: &RedisServer,
    cfg: &Config,
    name: &str,
    stat: &[&str],
    decide: F,
) -> Row
where
    F: Fn(usize) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = Result<bool, String>> + Send,
{
    let warm = (cfg.decisions / 10).max(cfg.tasks);
    let w = decide.clone();
    tokio::time::timeout(
        ROW_LIMIT,
        drive(warm, cfg.tasks, move |i| w(i + 1_000_000_000)),
    )
    .await
    .unwrap_or_else(|_| panic!("{name}: warm-up took over {ROW_LIMIT:?}"));
    server
        .cli(&["CONFIG", "RESETSTAT"])
        .expect("CONFIG RESETSTAT");
    let cpu0 = cpu_seconds(server);
    let own0 = cpu::threads_cpu_ns("self", None);
    let (elapsed, latencies) =
        tokio::time::timeout(ROW_LIMIT, drive(cfg.decisions, cfg.tasks, decide))
            .await
            .unwrap_or_else(|_| panic!("{name}: took over {ROW_LIMIT:?}"));
    let own1 = cpu::threads_cpu_ns("self", None);
    let cpu1 = cpu_seconds(server);
    let stats = commandstats(server);
    let n = cfg.decisions as f64;
    let usec: u64 = stat.iter().filter_map(|c| stats.get(*c)).map(|s| s.1).sum();
    let mut others: Vec<String> = stats
        .iter()
        .filter(|(k, _)| !stat.contains(&k.as_str()) && k.as_str() != "config|resetstat")
        .map(|(k, (calls, usec))| {
            format!(
                "{k} {:.2} calls {:.2} µs",
                *calls as f64 / n,
                *usec as f64 / n
            )
        })
        .collect();
    others.sort();
    Row {
        name: name.to_owned(),
        decisions: cfg.decisions,
        elapsed,
        latencies,
        stat_us: (usec > 0).then(|| usec as f64 / n),
        stat_note: format!(
            "{} (per decision; nested: {})",
            stat.join("+"),
            others.join("; ")
        ),
        cpu_us: Some((cpu1 - cpu0) * 1e6 / n),
        client_us: (own1 > own0).then(|| (own1 - own0) as f64 / 1e3 / n),
        bytes: String::new(),
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_micros() as u64
}

/// `redis-benchmark` on `args` with 64 clients, unpipelined: requests per second.
fn redis_benchmark(server: &RedisServer, n: usize, clients: usize, args: &[&str]) -> Option<f64> {
    let out = Command::new("timeout")
        .arg("300")
        .arg("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &server.port.to_string()])
        .args(["-n", &n.to_string(), "-c", &clients.to_string(), "-q"])
        .args(args)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "EVALSHA ...: 81234.57 requests per second, p50=0.391 msec"
    let last = text
        .rsplit('\r')
        .find(|s| s.contains("requests per second"))?;
    let before = last.split(" requests per second").next()?;
    before.rsplit(':').next()?.trim().parse().ok()
}

fn main() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let cfg = Config {
        decisions: env_usize("REDIS_BENCH_DECISIONS", 100_000),
        tasks: env_usize("REDIS_BENCH_TASKS", 64),
        users: env_usize("REDIS_BENCH_USERS", 1_000),
    };
    let threads = env_usize("REDIS_BENCH_THREADS", 1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "redis bench: redis-server {} on 127.0.0.1:{}, {} decisions per row, {} tasks, \
         {} users, {threads} client worker thread(s)",
        info(&server, "server")
            .get("redis_version")
            .map_or("?", String::as_str),
        server.port,
        cfg.decisions,
        cfg.tasks,
        cfg.users
    );
    let mut rows = Vec::new();

    // References: redis-benchmark, trivial script and ours.
    let trivial = server
        .cli(&["SCRIPT", "LOAD", "return 1"])
        .expect("SCRIPT LOAD")
        .trim()
        .to_owned();
    let ours_sha = server
        .cli(&["SCRIPT", "LOAD", SCRIPT])
        .expect("SCRIPT LOAD limiter.lua")
        .trim()
        .to_owned();
    let mut reference = |name: &str, args: Vec<String>, stat: &str| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let _ = redis_benchmark(&server, cfg.decisions / 10, cfg.tasks, &args);
        server.cli(&["CONFIG", "RESETSTAT"]);
        let cpu0 = cpu_seconds(&server);
        let start = Instant::now();
        let rps = redis_benchmark(&server, cfg.decisions, cfg.tasks, &args);
        let elapsed = start.elapsed();
        let cpu1 = cpu_seconds(&server);
        let stats = commandstats(&server);
        let (calls, usec) = stats.get(stat).copied().unwrap_or((0, 0));
        let n = calls.max(1) as f64;
        rows.push(Row {
            name: name.to_owned(),
            decisions: cfg.decisions,
            // redis-benchmark's own figure, as an elapsed time for the table.
            elapsed: rps.map_or(elapsed, |r| {
                Duration::from_secs_f64(cfg.decisions as f64 / r)
            }),
            latencies: Vec::new(),
            stat_us: (usec > 0).then(|| usec as f64 / n),
            stat_note: stat.to_owned(),
            cpu_us: Some((cpu1 - cpu0) * 1e6 / n),
            client_us: None,
            bytes: String::new(),
        });
        let _ = server.cli(&["FLUSHALL"]);
    };
    reference(
        "redis-benchmark EVALSHA \"return 1\" (reference)",
        vec!["EVALSHA".into(), trivial.clone(), "0".into()],
        "evalsha",
    );
    // The script's one argument (see limiter.lua): header (mode, now, idempotency TTL, wall
    // clock), then 3 counter rules.
    let mut blob: Vec<u8> = vec![b'a'];
    blob.extend_from_slice(&(-1f64).to_le_bytes());
    blob.extend_from_slice(&0f64.to_le_bytes());
    blob.extend_from_slice(&(-1f64).to_le_bytes());
    for amount in [1, TOKENS, TOKENS] {
        // algorithm, limit, window_us, burst, amount, placement, actual
        blob.push(0);
        for v in [LIMIT * 100, WINDOW_US, LIMIT * 100, amount, 0, 0] {
            blob.extend_from_slice(&(v as f64).to_le_bytes());
        }
    }
    let hot_keys = ["rb:{u}:user-rpm", "rb:{u}:user-tpm", "rb:{m}:model-tpm"];
    // A script that ignores its arguments, given as many bytes (redis-benchmark can't pass
    // binary arguments; the trivial script doesn't read them): what passing them costs.
    let mut trivial_args: Vec<String> = vec!["EVALSHA".into(), trivial.clone(), "3".into()];
    trivial_args.extend(hot_keys.map(String::from));
    trivial_args.push("x".repeat(blob.len()));
    reference(
        "redis-benchmark EVALSHA \"return 1\" with the same 3 keys + 1 argument of 172 bytes (reference)",
        trivial_args,
        "evalsha",
    );

    runtime.block_on(async {
        let url = server.url();
        let store = RedisStore::builder(url.clone())
            .prefix("b1")
            .timeout(Duration::from_secs(2))
            .connect()
            .await
            .expect("connect");
        // Keys built up front (the layer builds one per rule per request; not what is timed).
        let users: Arc<Vec<String>> =
            Arc::new((0..cfg.users).map(|u| format!("user-{u:05}")).collect());
        let keys = |rule: &str| -> Arc<Vec<BucketKey>> {
            let rule: Arc<str> = rule.into();
            Arc::new(
                users
                    .iter()
                    .map(|u| BucketKey::new(rule.clone(), u.as_str()))
                    .collect(),
            )
        };
        let rpm_keys = keys("user-rpm");
        let tpm_keys = keys("user-tpm");
        let model = Arc::new(BucketKey::new("model-tpm", "gpt-4o-mini"));
        let rpm = Quota::per_minute(LIMIT);
        let tpm = Quota::per_minute(LIMIT).tokens();
        let users_n = cfg.users;

        // Our script with fixed arguments on three hot keys, driven through a plain redis-rs
        // connection (redis-benchmark can't send its binary argument): the server-side cost
        // of the script without the store's client code.
        let plain = redis::Client::open(url.as_str())
            .expect("client")
            .get_connection_manager()
            .await
            .expect("connection manager");
        let decide = {
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(&ours_sha).arg(3).arg(&hot_keys[..]).arg(&blob[..]);
            let cmd = Arc::new(cmd);
            move |_: usize| {
                let mut conn = plain.clone();
                let cmd = Arc::clone(&cmd);
                async move {
                    let reply: Vec<u8> = cmd.query_async(&mut conn).await.map_err(|e| e.to_string())?;
                    // The first double is the denied index: -1 when admitted.
                    Ok(reply.get(..8) == Some(&(-1f64).to_le_bytes()[..]))
                }
            }
        };
        let row = measure(
            &server,
            &cfg,
            "EVALSHA limiter.lua, 3 hot keys, fixed arguments over one redis-rs connection (reference)",
            &["evalsha"],
            decide,
        )
        .await;
        rows.push(row);
        let _ = server.cli(&["FLUSHALL"]);

        // Ours, 1 rule.
        let decide = {
            let (store, keys) = (store.clone(), Arc::clone(&rpm_keys));
            move |i| one_rule(store.clone(), Arc::clone(&keys), rpm, i)
        };
        let mut row = measure(
            &server,
            &cfg,
            "ours: 1 rule (sliding window counter)",
            &["fcall", "evalsha"],
            decide,
        )
        .await;
        row.bytes = describe_memory(&server, &[("user key", "b1:*:user-rpm")]);
        rows.push(row);
        let _ = server.cli(&["FLUSHALL"]);

        // Ours, 3 rules.
        let store3 = RedisStore::builder(url.clone())
            .prefix("b3")
            .timeout(Duration::from_secs(2))
            .connect()
            .await
            .expect("connect");
        let decide = {
            let store = store3.clone();
            let (rpm_keys, tpm_keys, model) = (
                Arc::clone(&rpm_keys),
                Arc::clone(&tpm_keys),
                Arc::clone(&model),
            );
            move |i: usize| {
                let store = store.clone();
                let (rpm_keys, tpm_keys, model) = (
                    Arc::clone(&rpm_keys),
                    Arc::clone(&tpm_keys),
                    Arc::clone(&model),
                );
                async move {
                    let u = i % users_n;
                    let charges = [
                        Charge::new(&rpm_keys[u], &rpm, 1),
                        Charge::new(&tpm_keys[u], &tpm, TOKENS),
                        Charge::new(&model, &tpm, TOKENS),
                    ];
                    let d = store.acquire(&charges).await.map_err(|e| e.to_string())?;
                    Ok(d.is_admitted())
                }
            }
        };
        let mut row = measure(
            &server,
            &cfg,
            "ours: 3 rules (sliding window counter)",
            &["fcall", "evalsha"],
            decide,
        )
        .await;
        row.bytes = describe_memory(
            &server,
            &[
                ("user key", "b3:*:user-rpm"),
                ("model key", "b3:*:model-tpm"),
            ],
        );
        rows.push(row);
        let _ = server.cli(&["FLUSHALL"]);

        // Ours, 1 rule, sliding window log (exact, like the sorted set).
        let store_log = RedisStore::builder(url.clone())
            .prefix("bl")
            .timeout(Duration::from_secs(2))
            .connect()
            .await
            .expect("connect");
        let log = Quota::per_minute(LIMIT).sliding_window_log();
        let decide = {
            let (store, keys) = (store_log.clone(), Arc::clone(&rpm_keys));
            move |i| one_rule(store.clone(), Arc::clone(&keys), log, i)
        };
        let mut row = measure(
            &server,
            &cfg,
            "ours: 1 rule (sliding window log)",
            &["fcall", "evalsha"],
            decide,
        )
        .await;
        row.bytes = describe_memory(&server, &[("user key", "bl:*:user-rpm")]);
        rows.push(row);
        let _ = server.cli(&["FLUSHALL"]);

        for (name, store) in [
            ("1 rule", &store),
            ("3 rules", &store3),
            ("log", &store_log),
        ] {
            let s = store.stats();
            assert_eq!(s.errors, 0, "{name}: the store reported errors: {s:?}");
        }

        // The classic sorted-set sliding log, one MULTI/EXEC per decision.
        let conn = redis::Client::open(url.as_str())
            .expect("client")
            .get_connection_manager()
            .await
            .expect("connection manager");
        let zset = |rules: &'static [&'static str]| {
            let conn = conn.clone();
            let users = Arc::clone(&users);
            move |i: usize| {
                let mut conn: ConnectionManager = conn.clone();
                let users = Arc::clone(&users);
                async move {
                    let now = now_us();
                    let member = format!("{now}-{i}");
                    let user = &users[i % users_n];
                    let mut pipe = redis::pipe();
                    pipe.atomic();
                    for rule in rules {
                        let key = if *rule == "model-tpm" {
                            "zs:model-tpm:gpt-4o-mini".to_owned()
                        } else {
                            format!("zs:{rule}:{user}")
                        };
                        pipe.cmd("ZREMRANGEBYSCORE")
                            .arg(&key)
                            .arg("-inf")
                            .arg(now - WINDOW_US)
                            .ignore()
                            .cmd("ZCARD")
                            .arg(&key)
                            .cmd("ZADD")
                            .arg(&key)
                            .arg(now)
                            .arg(&member)
                            .ignore()
                            .cmd("EXPIRE")
                            .arg(&key)
                            .arg(WINDOW_US / 1_000_000)
                            .ignore();
                    }
                    let counts: Vec<u64> = pipe
                        .query_async(&mut conn)
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(counts.len() == rules.len() && counts.iter().all(|&c| c < LIMIT))
                }
            }
        };
        let mut row = measure(
            &server,
            &cfg,
            "zset log: 1 rule (MULTI/EXEC of 4 commands)",
            &["multi", "exec"],
            zset(&["user-rpm"]),
        )
        .await;
        row.bytes = describe_memory(&server, &[("user key", "zs:user-rpm:*")]);
        rows.push(row);
        let _ = server.cli(&["FLUSHALL"]);

        let mut row = measure(
            &server,
            &cfg,
            "zset log: 3 rules (MULTI/EXEC of 12 commands)",
            &["multi", "exec"],
            zset(&["user-rpm", "user-tpm", "model-tpm"]),
        )
        .await;
        row.bytes = describe_memory(
            &server,
            &[
                ("user key", "zs:user-rpm:*"),
                ("model key", "zs:model-tpm:*"),
            ],
        );
        rows.push(row);
        let _ = server.cli(&["FLUSHALL"]);
    });

    println!();
    println!(
        "| row | decisions/s | p50 | p99 | Redis CPU/decision: commandstats | Redis process CPU/decision | client CPU/decision | bytes per key |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---|");
    for r in &mut rows {
        let (p50, p99) = if r.latencies.is_empty() {
            ("–".to_owned(), "–".to_owned())
        } else {
            (
                format!("{:.0} µs", r.pct_us(0.5)),
                format!("{:.0} µs", r.pct_us(0.99)),
            )
        };
        println!(
            "| {} | {:.0} | {} | {} | {} | {} | {} | {} |",
            r.name,
            r.rps(),
            p50,
            p99,
            r.stat_us.map_or("?".to_owned(), |u| format!("{u:.1} µs")),
            r.cpu_us.map_or("?".to_owned(), |u| format!("{u:.1} µs")),
            r.client_us.map_or("–".to_owned(), |u| format!("{u:.1} µs")),
            if r.bytes.is_empty() { "–" } else { &r.bytes },
        );
    }
    println!();
    for r in &rows {
        println!("{}: commandstats = {}", r.name, r.stat_note);
    }
    let three = rows.iter().find(|r| r.name.starts_with("ours: 3 rules"));
    if let Some(r) = three {
        let rps = r.rps();
        let cpu = r.stat_us.unwrap_or(f64::NAN);
        println!(
            "\ntargets: >= 60,000 3-rule decisions/s: {rps:.0} {}; <= 15 µs Redis CPU per 3-rule \
             call (fcall/evalsha usec_per_call): {cpu:.1} µs {}",
            if rps >= 60_000.0 {
                "(met)"
            } else {
                "(NOT met)"
            },
            if cpu <= 15.0 { "(met)" } else { "(NOT met)" },
        );
    }
    drop(server);
}
