//! The Redis store against real `redis-server` processes started by the test harness.
#![cfg(feature = "redis")]

mod support;

use std::time::Duration;

use tower_llm_ratelimit::clock::ManualClock;
use tower_llm_ratelimit::store::{BucketKey, Charge, RedisStore, Store};
use tower_llm_ratelimit::{Algorithm, Quota};

use support::redis::RedisServer;

#[tokio::test]
async fn smoke_every_algorithm() {
    let Some(server) = RedisServer::start() else { return };
    let clock = ManualClock::new();
    clock.set(Duration::from_secs(1_000));
    let store = RedisStore::builder(server.url()).clock(clock.clone()).connect().await.unwrap();
    for alg in [Algorithm::SlidingWindowCounter, Algorithm::SlidingWindowLog, Algorithm::Gcra] {
        let q = Quota::per_minute(3).using(alg);
        let b = BucketKey::new(format!("{alg:?}"), "k");
        let mut admitted = 0;
        for _ in 0..5 {
            let d = store.acquire(&[Charge::new(&b, &q, 1)]).await.unwrap();
            if d.is_admitted() {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 3, "{alg:?}");
        let snap = store.peek(&b, &q).await.unwrap();
        assert_eq!(snap.remaining, 0, "{alg:?}");
    }
}
