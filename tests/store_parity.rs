//! One contract, two stores: the shared vectors in `tests/vectors/store.json` run against the
//! [`MemoryStore`] (the reference: its arithmetic is `src/algorithm`) and, with feature
//! `redis`, against the [`RedisStore`] on a real `redis-server` (its Lua script computes in
//! microseconds and doubles). Both must produce exactly what the file says.
//!
//! Then random sequences (seeded, reproducible) run against both stores side by side and
//! their answers are compared with each other.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;
use tower_llm_ratelimit::clock::ManualClock;
use tower_llm_ratelimit::store::{
    Adjustment, BucketKey, Charge, ChargeState, Decision, MemoryStore, Snapshot, Store,
};
use tower_llm_ratelimit::{Algorithm, Quota};

const VECTORS: &str = include_str!("vectors/store.json");

/// The longest any single store call may take.
const CALL: Duration = Duration::from_secs(10);

// The vectors ----------------------------------------------------------------------------------

/// One bucket under one quota, as the file describes it.
#[derive(Debug, Clone)]
struct Spec {
    bucket: BucketKey,
    quota: Quota,
    /// The amount charged (acquire only).
    amount: u64,
}

#[derive(Debug)]
struct ExpectDecision {
    admitted: bool,
    denied: Option<usize>,
    /// `Some(None)`: never fits.
    retry_after_ms: Option<Option<u64>>,
    remaining: Vec<u64>,
    reset_ms: Vec<u64>,
}

#[derive(Debug)]
struct ExpectSnapshot {
    remaining: u64,
    reset_ms: u64,
}

#[derive(Debug)]
struct SettleSpec {
    of: String,
    charge: usize,
    actual: u64,
}

#[derive(Debug)]
enum Op {
    Acquire {
        id: Option<String>,
        charges: Vec<Spec>,
        expect: ExpectDecision,
    },
    Settle(Vec<SettleSpec>),
    Peek {
        spec: Spec,
        expect: ExpectSnapshot,
    },
}

#[derive(Debug)]
struct Step {
    t_ms: u64,
    op: Op,
}

#[derive(Debug)]
struct Sequence {
    name: String,
    /// Where the clock's wall clock stands at `t = 0` (calendar windows), if set.
    unix_origin_ms: Option<u64>,
    steps: Vec<Step>,
}

struct Vectors {
    origin_ms: u64,
    sequences: Vec<Sequence>,
}

fn u64_of(v: &Value, field: &str, at: &str) -> u64 {
    v.get(field)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{at}: `{field}` must be a non-negative integer"))
}

fn u64_list(v: &Value, field: &str, at: &str) -> Vec<u64> {
    v.get(field)
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("{at}: `{field}` must be an array"))
        .iter()
        .map(|x| {
            x.as_u64()
                .unwrap_or_else(|| panic!("{at}: `{field}` holds non-integers"))
        })
        .collect()
}

fn parse_spec(v: &Value, at: &str, with_amount: bool) -> Spec {
    let s = |f: &str| {
        v.get(f)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("{at}: `{f}` must be a string"))
            .to_owned()
    };
    let limit = u64_of(v, "limit", at);
    let window = v
        .get("window_ms")
        .and_then(Value::as_u64)
        .map(Duration::from_millis);
    let quota = match s("algorithm").as_str() {
        "calendar_hour" => Quota::per_calendar_hour(limit),
        "calendar_day" => Quota::per_calendar_day(limit),
        "calendar_month" => Quota::per_calendar_month(limit),
        "concurrency" => {
            let q = Quota::concurrent(limit);
            match window {
                Some(lease) => q.lease(lease),
                None => q,
            }
        }
        other => {
            let algorithm = match other {
                "counter" => Algorithm::SlidingWindowCounter,
                "log" => Algorithm::SlidingWindowLog,
                "gcra" => Algorithm::Gcra,
                _ => panic!("{at}: unknown algorithm {other:?}"),
            };
            let window = window.unwrap_or_else(|| panic!("{at}: `window_ms` is required"));
            let q = Quota::new(limit, window).using(algorithm);
            match v.get("burst").and_then(Value::as_u64) {
                Some(b) => q.burst(b),
                None => q,
            }
        }
    };
    Spec {
        bucket: BucketKey::new(s("rule"), s("key")),
        quota,
        amount: if with_amount {
            u64_of(v, "amount", at)
        } else {
            0
        },
    }
}

fn parse(text: &str) -> Vectors {
    let root: Value = serde_json::from_str(text).expect("tests/vectors/store.json is not JSON");
    let origin_ms = u64_of(&root, "origin_ms", "root");
    let mut sequences = Vec::new();
    for (i, seq) in root["sequences"]
        .as_array()
        .expect("`sequences` must be an array")
        .iter()
        .enumerate()
    {
        let name = seq["name"].as_str().unwrap_or("unnamed").to_owned();
        let unix_origin_ms = seq.get("unix_origin_ms").map(|v| {
            v.as_u64()
                .unwrap_or_else(|| panic!("sequence {i}: bad `unix_origin_ms`"))
        });
        let mut steps = Vec::new();
        let mut ids: HashMap<String, usize> = HashMap::new();
        let mut last_t = 0;
        for (j, step) in seq["steps"]
            .as_array()
            .expect("`steps` must be an array")
            .iter()
            .enumerate()
        {
            let at = format!("sequence {i} ({name}) step {j}");
            let t_ms = u64_of(step, "t", &at);
            assert!(t_ms >= last_t, "{at}: time goes backwards");
            last_t = t_ms;
            let op = if let Some(charges) = step.get("acquire") {
                let charges: Vec<Spec> = charges
                    .as_array()
                    .unwrap_or_else(|| panic!("{at}: `acquire` must be an array"))
                    .iter()
                    .map(|c| parse_spec(c, &at, true))
                    .collect();
                let e = &step["expect"];
                let admitted = e["admitted"]
                    .as_bool()
                    .unwrap_or_else(|| panic!("{at}: `expect.admitted` must be a bool"));
                let (denied, retry_after_ms) = if admitted {
                    (None, None)
                } else {
                    let denied = u64_of(e, "denied", &at) as usize;
                    let retry = match e.get("retry_after_ms") {
                        Some(Value::Null) => None,
                        Some(v) => Some(
                            v.as_u64()
                                .unwrap_or_else(|| panic!("{at}: bad `retry_after_ms`")),
                        ),
                        None => panic!("{at}: a denial needs `retry_after_ms` (null: never)"),
                    };
                    (Some(denied), Some(retry))
                };
                let expect = ExpectDecision {
                    admitted,
                    denied,
                    retry_after_ms,
                    remaining: u64_list(e, "remaining", &at),
                    reset_ms: u64_list(e, "reset_ms", &at),
                };
                assert_eq!(expect.remaining.len(), charges.len(), "{at}: remaining");
                assert_eq!(expect.reset_ms.len(), charges.len(), "{at}: reset_ms");
                let id = step.get("id").and_then(Value::as_str).map(str::to_owned);
                if let Some(id) = &id {
                    assert!(admitted, "{at}: only admitted charges can be settled");
                    ids.insert(id.clone(), charges.len());
                }
                Op::Acquire {
                    id,
                    charges,
                    expect,
                }
            } else if let Some(adjustments) = step.get("settle") {
                Op::Settle(
                    adjustments
                        .as_array()
                        .unwrap_or_else(|| panic!("{at}: `settle` must be an array"))
                        .iter()
                        .map(|a| {
                            let of = a["of"].as_str().expect("`of` names an acquire").to_owned();
                            let charge = a.get("charge").and_then(Value::as_u64).unwrap_or(0);
                            let n = ids
                                .get(&of)
                                .unwrap_or_else(|| panic!("{at}: no earlier acquire {of:?}"));
                            assert!((charge as usize) < *n, "{at}: no charge {charge} in {of}");
                            SettleSpec {
                                of,
                                charge: charge as usize,
                                actual: u64_of(a, "actual", &at),
                            }
                        })
                        .collect(),
                )
            } else if let Some(spec) = step.get("peek") {
                let e = &step["expect"];
                Op::Peek {
                    spec: parse_spec(spec, &at, false),
                    expect: ExpectSnapshot {
                        remaining: u64_of(e, "remaining", &at),
                        reset_ms: u64_of(e, "reset_ms", &at),
                    },
                }
            } else {
                panic!("{at}: a step is an acquire, a settle or a peek");
            };
            steps.push(Step { t_ms, op });
        }
        sequences.push(Sequence {
            name,
            unix_origin_ms,
            steps,
        });
    }
    Vectors {
        origin_ms,
        sequences,
    }
}

// Running them ---------------------------------------------------------------------------------

/// The capacity a snapshot reports: the burst for GCRA, the limit otherwise.
fn capacity(q: &Quota) -> u64 {
    if q.algorithm() == Algorithm::Gcra {
        q.effective_burst()
    } else {
        q.limit()
    }
}

fn check_snapshot(
    failures: &mut Vec<String>,
    at: &str,
    got: &Snapshot,
    quota: &Quota,
    remaining: u64,
    reset_ms: u64,
) {
    let want = Snapshot {
        limit: capacity(quota),
        remaining,
        reset_after_nanos: reset_ms * 1_000_000,
    };
    if *got != want {
        failures.push(format!("{at}: snapshot {got:?}, expected {want:?}"));
    }
}

/// Runs one sequence; returns what differed from the file.
async fn run_sequence(
    store: &dyn Store,
    clock: &ManualClock,
    origin_ms: u64,
    seq: &Sequence,
) -> Vec<String> {
    let mut failures = Vec::new();
    // Per acquire id: the charges as made and where they landed in this store.
    let mut placed: HashMap<&str, (&[Spec], Vec<ChargeState>)> = HashMap::new();
    for (j, step) in seq.steps.iter().enumerate() {
        let at = format!("{:?} step {j} (t={} ms)", seq.name, step.t_ms);
        clock.set(Duration::from_millis(origin_ms + step.t_ms));
        if let Some(unix_ms) = seq.unix_origin_ms {
            clock.set_unix(Duration::from_millis(unix_ms + step.t_ms));
        }
        match &step.op {
            Op::Acquire {
                id,
                charges,
                expect,
            } => {
                let list: Vec<Charge<'_>> = charges
                    .iter()
                    .map(|c| Charge::new(&c.bucket, &c.quota, c.amount))
                    .collect();
                let d: Decision = match tokio::time::timeout(CALL, store.acquire(&list)).await {
                    Ok(Ok(d)) => d,
                    Ok(Err(e)) => {
                        failures.push(format!("{at}: acquire failed: {e}"));
                        return failures;
                    }
                    Err(_) => panic!("{at}: acquire took over {CALL:?}"),
                };
                if d.is_admitted() != expect.admitted {
                    failures.push(format!(
                        "{at}: admitted {}, expected {} ({d:?})",
                        d.is_admitted(),
                        expect.admitted
                    ));
                }
                if let (Some(denial), Some(index), Some(retry)) =
                    (d.denial, expect.denied, expect.retry_after_ms)
                {
                    if denial.index != index {
                        failures.push(format!(
                            "{at}: denied by {}, expected {index}",
                            denial.index
                        ));
                    }
                    let want = retry.map(Duration::from_millis);
                    if denial.retry_after != want {
                        failures.push(format!(
                            "{at}: retry after {:?}, expected {want:?}",
                            denial.retry_after
                        ));
                    }
                }
                if d.charges.len() != charges.len() {
                    failures.push(format!(
                        "{at}: {} charge states for {} charges",
                        d.charges.len(),
                        charges.len()
                    ));
                    return failures;
                }
                for (k, (state, spec)) in d.charges.iter().zip(charges).enumerate() {
                    check_snapshot(
                        &mut failures,
                        &format!("{at} charge {k}"),
                        &state.snapshot,
                        &spec.quota,
                        expect.remaining[k],
                        expect.reset_ms[k],
                    );
                }
                if let Some(id) = id {
                    placed.insert(id, (charges, d.charges.to_vec()));
                }
            }
            Op::Settle(adjustments) => {
                let list: Vec<Adjustment<'_>> = adjustments
                    .iter()
                    .map(|a| {
                        let (charges, states) = &placed[a.of.as_str()];
                        let c = &charges[a.charge];
                        Adjustment {
                            bucket: &c.bucket,
                            quota: &c.quota,
                            placement: states[a.charge].placement,
                            charged: c.amount,
                            actual: a.actual,
                        }
                    })
                    .collect();
                match tokio::time::timeout(CALL, store.settle(&list)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => failures.push(format!("{at}: settle failed: {e}")),
                    Err(_) => panic!("{at}: settle took over {CALL:?}"),
                }
            }
            Op::Peek { spec, expect } => {
                match tokio::time::timeout(CALL, store.peek(&spec.bucket, &spec.quota)).await {
                    Ok(Ok(s)) => check_snapshot(
                        &mut failures,
                        &format!("{at} peek"),
                        &s,
                        &spec.quota,
                        expect.remaining,
                        expect.reset_ms,
                    ),
                    Ok(Err(e)) => failures.push(format!("{at}: peek failed: {e}")),
                    Err(_) => panic!("{at}: peek took over {CALL:?}"),
                }
            }
        }
    }
    failures
}

fn report(store: &str, failures: Vec<String>) {
    assert!(
        failures.is_empty(),
        "{store} differs from tests/vectors/store.json in {} place(s):\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

#[test]
fn the_vector_file_covers_every_algorithm_and_operation() {
    let v = parse(VECTORS);
    let mut algorithms = std::collections::HashSet::new();
    let (mut multi, mut settles, mut peeks, mut never) = (0, 0, 0, 0);
    for seq in &v.sequences {
        for step in &seq.steps {
            match &step.op {
                Op::Acquire {
                    charges, expect, ..
                } => {
                    algorithms.extend(charges.iter().map(|c| c.quota.algorithm()));
                    multi += usize::from(charges.len() > 1);
                    never += usize::from(expect.retry_after_ms == Some(None));
                }
                Op::Settle(_) => settles += 1,
                Op::Peek { .. } => peeks += 1,
            }
        }
    }
    // The four algorithms, and the calendar window over each of its three periods.
    assert_eq!(algorithms.len(), 7, "{algorithms:?}");
    assert!(multi > 0 && settles > 0 && peeks > 0 && never > 0);
}

#[tokio::test]
async fn memory_store_matches_the_vectors() {
    let v = parse(VECTORS);
    let mut failures = Vec::new();
    for seq in &v.sequences {
        let clock = ManualClock::new();
        let store = MemoryStore::builder().clock(clock.clone()).build();
        failures.extend(run_sequence(&store, &clock, v.origin_ms, seq).await);
    }
    report("MemoryStore", failures);
}

#[cfg(feature = "redis")]
mod redis {
    use super::*;
    use crate::support::redis::RedisServer;
    use tower_llm_ratelimit::store::RedisStore;

    async fn connect(server: &RedisServer, prefix: &str, clock: &ManualClock) -> RedisStore {
        let connecting = RedisStore::builder(server.url())
            .prefix(prefix)
            .clock(clock.clone())
            // Generous: a loaded test machine must not turn a slow answer into a failure.
            .timeout(Duration::from_secs(5))
            .connect();
        tokio::time::timeout(CALL, connecting)
            .await
            .expect("connecting took too long")
            .expect("connecting to the test redis-server")
    }

    #[tokio::test]
    async fn redis_store_matches_the_vectors() {
        let Some(server) = RedisServer::start() else {
            return;
        };
        let v = parse(VECTORS);
        let mut failures = Vec::new();
        for (i, seq) in v.sequences.iter().enumerate() {
            let clock = ManualClock::new();
            let store = connect(&server, &format!("parity{i}"), &clock).await;
            failures.extend(run_sequence(&store, &clock, v.origin_ms, seq).await);
        }
        report("RedisStore", failures);
    }

    // Random sequences, both stores side by side ----------------------------------------------

    /// xorshift64*: reproducible, no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// The quotas of the random sequences. Times move in whole seconds and every GCRA
    /// emission interval is a whole second, so each key's Redis TTL, taken in real time from
    /// a write, is at least a second: far more than a sequence takes, so no key expires in
    /// Redis while the test's frozen clock still counts it.
    fn random_quotas() -> Vec<(BucketKey, Quota)> {
        vec![
            (
                BucketKey::new("counter", "k"),
                Quota::new(20, Duration::from_secs(10)),
            ),
            (
                BucketKey::new("counter-tokens", "k"),
                Quota::new(1_000, Duration::from_secs(60)).tokens(),
            ),
            (
                BucketKey::new("log", "k"),
                Quota::new(15, Duration::from_secs(10)).sliding_window_log(),
            ),
            (
                BucketKey::new("gcra", "k"),
                Quota::new(10, Duration::from_secs(10)).gcra(),
            ),
            (
                BucketKey::new("gcra-burst", "k"),
                Quota::new(100, Duration::from_secs(100)).gcra().burst(30),
            ),
            (BucketKey::new("slots", "k"), Quota::concurrent(3)),
            // The sequences cross 02:00 on the wall clock (see `random_sequences`).
            (
                BucketKey::new("calendar", "k"),
                Quota::per_calendar_hour(40).tokens(),
            ),
        ]
    }

    fn amount(rng: &mut Rng, q: &Quota) -> u64 {
        let limit = q.limit();
        match rng.below(10) {
            0 => 0,
            1 => limit + 1 + rng.below(3),
            2..=4 => 1,
            _ => 1 + rng.below(limit / 3 + 1),
        }
    }

    /// A retry-after computed in nanoseconds and one computed in microseconds differ by less
    /// than a microsecond (the floor of a division in each unit).
    fn close(a: Option<Duration>, b: Option<Duration>) -> bool {
        match (a, b) {
            (Some(a), Some(b)) => a.abs_diff(b) < Duration::from_micros(1),
            (None, None) => true,
            _ => false,
        }
    }

    fn same_decision(m: &Decision, r: &Decision) -> Result<(), String> {
        let snaps = |d: &Decision| d.charges.iter().map(|c| c.snapshot).collect::<Vec<_>>();
        if snaps(m) != snaps(r) {
            return Err("snapshots differ".into());
        }
        match (m.denial, r.denial) {
            (None, None) => Ok(()),
            (Some(a), Some(b)) if a.index == b.index && close(a.retry_after, b.retry_after) => {
                Ok(())
            }
            // Two rules denying with the same wait: the contract leaves the tie open.
            (Some(a), Some(b)) if close(a.retry_after, b.retry_after) => Ok(()),
            _ => Err("denials differ".into()),
        }
    }

    /// Counters only, of several sizes: every acquire runs the script's inline counter path
    /// (and hands over to its general path on a denial).
    fn random_counter_quotas() -> Vec<(BucketKey, Quota)> {
        vec![
            (
                BucketKey::new("counter", "k"),
                Quota::new(20, Duration::from_secs(10)),
            ),
            (
                BucketKey::new("counter-tokens", "k"),
                Quota::new(1_000, Duration::from_secs(60)).tokens(),
            ),
            (
                BucketKey::new("counter-short", "k"),
                Quota::new(5, Duration::from_secs(3)),
            ),
            (
                BucketKey::new("counter-model", "m"),
                Quota::new(300, Duration::from_secs(20)).tokens(),
            ),
        ]
    }

    #[tokio::test]
    async fn random_sequences_agree_between_stores() {
        random_sequences("random", random_quotas()).await;
    }

    #[tokio::test]
    async fn random_counter_sequences_agree_between_stores() {
        random_sequences("counters", random_counter_quotas()).await;
    }

    async fn random_sequences(name: &str, quotas: Vec<(BucketKey, Quota)>) {
        let Some(server) = RedisServer::start() else {
            return;
        };
        // admitted, denied, settled, peeked
        let mut counts = [0u32; 4];
        for seed in 1..=12u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let clock = ManualClock::new();
            clock.set(Duration::from_secs(1_000));
            // Five minutes before 02:00 UTC on the wall clock: calendar hours roll over
            // mid-sequence.
            clock.set_unix(Duration::from_secs(2 * 3_600 - 300));
            let memory = MemoryStore::builder().clock(clock.clone()).build();
            let redis = connect(&server, &format!("{name}{seed}"), &clock).await;
            // Admitted charges not yet settled: (quota index, amount, memory and Redis placement).
            let mut open: Vec<(usize, u64, ChargeState, ChargeState)> = Vec::new();
            let mut history: Vec<String> = Vec::new();
            for op in 0..150 {
                clock.advance(Duration::from_secs(match rng.below(10) {
                    0..=3 => 0,
                    4..=8 => 1 + rng.below(3),
                    _ => 5 + rng.below(40),
                }));
                let fail = |what: String, history: &[String]| -> ! {
                    panic!(
                        "{name}: seed {seed}, op {op}: {what}\nhistory (newest last):\n  {}",
                        history.join("\n  ")
                    )
                };
                match rng.below(10) {
                    0..=5 => {
                        // A request of one to three distinct rules.
                        let mut picked: Vec<usize> = Vec::new();
                        for _ in 0..1 + rng.below(3) {
                            let i = rng.below(quotas.len() as u64) as usize;
                            if !picked.contains(&i) {
                                picked.push(i);
                            }
                        }
                        let amounts: Vec<u64> = picked
                            .iter()
                            .map(|&i| amount(&mut rng, &quotas[i].1))
                            .collect();
                        let charges: Vec<Charge<'_>> = picked
                            .iter()
                            .zip(&amounts)
                            .map(|(&i, &a)| Charge::new(&quotas[i].0, &quotas[i].1, a))
                            .collect();
                        let m = memory.acquire(&charges).await.unwrap();
                        let r = tokio::time::timeout(CALL, redis.acquire(&charges))
                            .await
                            .expect("Redis acquire took too long")
                            .unwrap();
                        history.push(format!(
                            "t={:?} acquire {:?}: {}",
                            Duration::from_nanos(clock_now(&clock)),
                            charges
                                .iter()
                                .map(|c| format!("{:?}={}", c.bucket, c.amount))
                                .collect::<Vec<_>>(),
                            if m.is_admitted() {
                                "admitted"
                            } else {
                                "denied"
                            }
                        ));
                        if let Err(e) = same_decision(&m, &r) {
                            fail(format!("{e}:\n memory {m:?}\n redis  {r:?}"), &history);
                        }
                        counts[usize::from(!m.is_admitted())] += 1;
                        if m.is_admitted() {
                            for (k, &i) in picked.iter().enumerate() {
                                open.push((i, amounts[k], m.charges[k], r.charges[k]));
                            }
                        }
                    }
                    6..=7 if !open.is_empty() => {
                        let at = rng.below(open.len() as u64) as usize;
                        let (i, charged, ms, rs) = open.swap_remove(at);
                        let actual = match rng.below(4) {
                            0 => 0,
                            1 => charged + 1 + rng.below(5),
                            _ => rng.below(charged + 1),
                        };
                        let (b, q) = (&quotas[i].0, &quotas[i].1);
                        let adj = |placement| Adjustment {
                            bucket: b,
                            quota: q,
                            placement,
                            charged,
                            actual,
                        };
                        memory.settle(&[adj(ms.placement)]).await.unwrap();
                        tokio::time::timeout(CALL, redis.settle(&[adj(rs.placement)]))
                            .await
                            .expect("Redis settle took too long")
                            .unwrap();
                        counts[2] += 1;
                        history.push(format!(
                            "t={:?} settle {b:?} {charged} -> {actual}",
                            Duration::from_nanos(clock_now(&clock))
                        ));
                    }
                    _ => {
                        let (b, q) = &quotas[rng.below(quotas.len() as u64) as usize];
                        let m = memory.peek(b, q).await.unwrap();
                        let r = tokio::time::timeout(CALL, redis.peek(b, q))
                            .await
                            .expect("Redis peek took too long")
                            .unwrap();
                        counts[3] += 1;
                        history.push(format!(
                            "t={:?} peek {b:?}",
                            Duration::from_nanos(clock_now(&clock))
                        ));
                        if m != r {
                            fail(format!("peek differs: memory {m:?}, redis {r:?}"), &history);
                        }
                    }
                }
            }
        }
        let [admitted, denied, settled, peeked] = counts;
        eprintln!(
            "{name} sequences: {admitted} admitted and {denied} denied acquires, \
             {settled} settlements, {peeked} peeks, identical in both stores"
        );
        assert!(
            admitted > 100 && denied > 100 && settled > 100,
            "{counts:?}"
        );
    }

    fn clock_now(clock: &ManualClock) -> u64 {
        use tower_llm_ratelimit::clock::Clock;
        clock.now_nanos()
    }
}
