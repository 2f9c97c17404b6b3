//! The gateway on a Redis Cluster of 3 primaries with a replica each (real `redis-server`
//! processes): a primary is killed, its replica promoted; the gateway finds the new primary by
//! itself, the requests in between follow `on_failure`, and with replication caught up before
//! the kill exactly the limit is admitted across the failover. Also the configuration of a
//! cluster (`[store] cluster`, `--redis-cluster`) and its mistakes.

use std::time::{Duration, Instant};

use super::support::redis::{RedisCluster, FAILOVER};
use super::{
    assert_openai_error, call, chat, client, rule_state, run_to_exit, run_to_exit_with_env,
    start_upstream, Answer, Gateway, HttpClient, TempConfig,
};

/// The limit of the test: requests per minute of the `free` tier.
const RPM: u64 = 20;

/// One model, one tier of [`RPM`], one key; the store on the cluster at `nodes` (none: set by
/// the command line). The exact log, so no window boundary blurs the count; a call timeout
/// of 2 s, so that a loaded machine can't turn a call Redis ran into a failure (a 503 that
/// was counted would make fewer than the limit admitted).
fn config(upstream: &str, nodes: Option<&[String]>, on_failure: &str) -> String {
    let cluster = match nodes {
        Some(nodes) => format!(
            "kind = \"redis\"\ncluster = [{}]",
            nodes
                .iter()
                .map(|n| format!("{n:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => String::new(),
    };
    format!(
        r#"
listen = "127.0.0.1:0"

[store]
{cluster}
on_failure = "{on_failure}"
timeout_ms = 2000

[limiter]
algorithm = "sliding_window_log"
shutdown_grace_secs = 5

[models.test-model]
upstream = "{upstream}/v1"
timeout_secs = 5

[tiers.free]
rpm = {RPM}

[keys]
free-a = {{ user = "alice", tier = "free" }}
"#
    )
}

async fn ask(c: &HttpClient, gw: &Gateway, i: usize) -> Answer {
    call(
        c,
        "POST",
        &gw.url("/v1/chat/completions"),
        Some("free-a"),
        Some(&chat("test-model", &format!("question {i}"), 5)),
    )
    .await
}

/// Whether an admitted answer was counted by the store (an answer admitted by
/// `on_failure = "open"` carries no rate-limit headers).
fn counted(a: &Answer) -> bool {
    a.headers.contains_key("x-ratelimit-remaining-requests")
}

/// What happened to the requests of a run.
#[derive(Debug, Default)]
struct Tally {
    /// Admitted and counted by the store.
    counted: u64,
    /// Admitted without counting (`on_failure = "open"` while the store failed).
    uncounted: u64,
    /// 503 from the closed failure policy.
    unavailable: u64,
}

impl Tally {
    /// Records an answer that must not be a 429 (the limit isn't reached yet).
    fn record(&mut self, a: &Answer, on_failure: &str) {
        match a.status.as_u16() {
            200 if counted(a) => {
                self.counted += 1;
                assert!(
                    self.counted <= RPM,
                    "admitted past the limit: {:?}",
                    a.headers
                );
                assert_eq!(
                    a.header("x-ratelimit-remaining-requests"),
                    (RPM - self.counted).to_string(),
                    "{self:?}"
                );
            }
            200 if on_failure == "open" => self.uncounted += 1,
            503 if on_failure == "closed" => {
                assert_openai_error(a, 503, "rate_limit_unavailable");
                assert_eq!(a.header("retry-after"), "1");
                self.unavailable += 1;
            }
            _ => panic!(
                "{on_failure}: unexpected {} {:?} {:?} after {self:?}",
                a.status, a.headers, a.body
            ),
        }
    }
}

/// The run of the issue: some requests, replication caught up, the primary of the caller's
/// slot killed, requests during the failover (the failure policy's answers, or decisions of
/// the new primary), then requests until 429: exactly [`RPM`] counted in all.
async fn failover(on_failure: &str, by_flag: bool) {
    let Some(mut cluster) = RedisCluster::start_with_replicas() else {
        return; // redis-server is not installed (outside CI): skipped, said why.
    };
    let (up_server, _up) = start_upstream().await;
    let urls = cluster.urls();
    let cfg = TempConfig::new(&config(
        &up_server.url(),
        (!by_flag).then_some(urls.as_slice()),
        on_failure,
    ));
    let joined = urls.join(",");
    let gw = if by_flag {
        Gateway::start(&["--config", cfg.path(), "--redis-cluster", &joined])
    } else {
        Gateway::start(&["--config", cfg.path()])
    };
    assert!(
        gw.banner
            .contains(&format!("store:  redis cluster {joined}")),
        "{}",
        gw.banner
    );
    let c = client();
    let mut tally = Tally::default();
    let mut sent = 0;
    for _ in 0..5 {
        let a = ask(&c, &gw, sent).await;
        sent += 1;
        assert_eq!(a.status, 200, "{:?}", a.body);
        tally.record(&a, on_failure);
    }

    // The node that holds alice's counter, and its replica; a quiet moment for replication.
    let key = cluster
        .nodes
        .iter()
        .flat_map(|n| n.keys())
        .find(|k| k.contains("user-rpm"))
        .expect("alice's counter in the cluster");
    let primary = cluster.primary_of(&key);
    let replica = cluster.replica_of(primary);
    cluster.wait_caught_up(primary, replica);
    cluster.kill(primary);

    // During the failover every answer is the failure policy's, until the gateway reaches
    // the promoted replica and answers a counted decision.
    let deadline = Instant::now() + FAILOVER;
    while tally.counted == 5 {
        assert!(
            Instant::now() < deadline,
            "the gateway never reached the promoted replica: {tally:?}\n{}",
            gw.stderr()
        );
        let a = ask(&c, &gw, sent).await;
        sent += 1;
        tally.record(&a, on_failure);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match on_failure {
        "closed" => assert!(tally.unavailable > 0, "no request met the failover"),
        _ => assert!(tally.uncounted > 0, "no request met the failover"),
    }
    cluster.wait_promoted(replica);
    assert_eq!(
        cluster.primary_of(&key),
        replica,
        "the replica took the slot"
    );

    // Up to the limit, then 429: nothing counted before the kill was lost.
    while tally.counted < RPM {
        let a = ask(&c, &gw, sent).await;
        sent += 1;
        tally.record(&a, on_failure);
    }
    let a = ask(&c, &gw, sent).await;
    assert_openai_error(&a, 429, "rate_limit_exceeded");
    let rpm = rule_state(&c, &gw, "free-a", "user-rpm").await;
    assert_eq!(rpm["remaining"], 0, "{rpm}");
    assert_eq!(tally.counted, RPM, "{tally:?}");
    let metrics = call(&c, "GET", &gw.url("/metrics"), None, None).await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(
        !text.contains("gateway_store_redis_errors_total 0\n"),
        "the failover's errors are counted:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_failover_closed_admits_exactly_the_limit() {
    failover("closed", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_failover_open_counts_exactly_the_limit() {
    failover("open", true).await;
}

/// `[store] cluster` and `--redis-cluster` mistakes name the field or the flag; checking
/// connects to nothing.
#[test]
fn bad_cluster_settings_are_named() {
    let base = config("http://127.0.0.1:1", None, "closed");
    let with =
        |store: &str| TempConfig::new(&base.replace("[store]\n", &format!("[store]\n{store}\n")));
    let cases: &[(&str, &[&str])] = &[
        (
            "kind = \"redis\"\nurl = \"redis://127.0.0.1:1\"\ncluster = [\"redis://127.0.0.1:2\"]",
            &["`store.cluster`", "not both"],
        ),
        (
            "kind = \"redis\"\ncluster = []",
            &["`store.cluster`", "lists no node"],
        ),
        (
            "kind = \"redis\"\ncluster = [\"redis://127.0.0.1:2\", \"http://x:1\"]",
            &["`store.cluster[1]`", "not a Redis node URL"],
        ),
        ("kind = \"redis\"", &["`store.url`", "store.cluster"]),
        (
            "kind = \"redis\"\ncluster = \"redis://x:1\"",
            &["`store.cluster`", "invalid type"],
        ),
    ];
    for (store, wants) in cases {
        let cfg = with(store);
        let (code, _, err) = run_to_exit(&["--check-config", "--config", cfg.path()]);
        assert_eq!(code, Some(2), "{store}: {err}");
        for want in *wants {
            assert!(err.contains(want), "{store}: {want:?} not in:\n{err}");
        }
    }
    // A valid cluster, from the file, the flag or the variable.
    let cfg = with("kind = \"redis\"\ncluster = [\"redis://127.0.0.1:2\"]");
    let (code, _, err) = run_to_exit(&["--check-config", "--config", cfg.path()]);
    assert_eq!(code, Some(0), "{err}");
    let plain = with("");
    let nodes = "redis://127.0.0.1:1,redis://127.0.0.1:2";
    let (code, _, err) = run_to_exit(&[
        "--check-config",
        "--config",
        plain.path(),
        "--redis-cluster",
        nodes,
    ]);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = run_to_exit_with_env(
        &["--check-config", "--config", plain.path()],
        &[("GATEWAY_REDIS_CLUSTER", nodes)],
    );
    assert_eq!(code, Some(0), "{err}");
    // The flag replaces the file's single server...
    let single = with("kind = \"redis\"\nurl = \"redis://127.0.0.1:1\"");
    let (code, _, err) = run_to_exit(&[
        "--check-config",
        "--config",
        single.path(),
        "--redis-cluster",
        nodes,
    ]);
    assert_eq!(code, Some(0), "{err}");
    // ...but the two flags can't go together, and each node is checked.
    let (code, _, err) = run_to_exit(&[
        "--check-config",
        "--redis",
        "redis://127.0.0.1:1",
        "--redis-cluster",
        nodes,
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot be used with"), "{err}");
    let (code, _, err) = run_to_exit(&["--check-config", "--redis-cluster", "redis://a:1,b:2"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--redis-cluster") && err.contains("`store.cluster[1]`"),
        "{err}"
    );
    // Nothing answers at these nodes: a start-up failure naming the cluster.
    let (code, _, err) = run_to_exit(&["--config", plain.path(), "--redis-cluster", nodes]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("could not connect to Redis at cluster redis://127.0.0.1:1"),
        "{err}"
    );
}
