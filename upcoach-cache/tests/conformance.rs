//! The conformance suite against the in-process store and the Redis store.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use upcoach_cache::testing::{MoveClock, Sleep, cache_store_conformance};
use upcoach_cache::{CacheStore, MemoryStore, RedisStore};
use upcoach_core::ManualClock;
use upcoach_testing::RedisPrefix;

#[tokio::test]
async fn memory_store_conforms() {
    let clock = Arc::new(ManualClock::starting_now());
    let store = MemoryStore::with_clock(64 * 1024 * 1024, clock.clone());
    cache_store_conformance(&store, &MoveClock(clock)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_conforms() {
    let Some(prefix) = RedisPrefix::create() else {
        return;
    };
    let client = redis::Client::open(prefix.url()).unwrap();
    let conn =
        upcoach_core::redis::RedisConnection::from_client(client, Default::default(), "test")
            .await
            .unwrap();
    let store = RedisStore::new(conn, prefix.prefix().trim_end_matches(':'));
    cache_store_conformance(&store, &Sleep).await;
}

#[tokio::test]
async fn memory_store_stays_within_its_byte_bound() {
    let store = MemoryStore::new(1024 * 1024);
    for i in 0..1_000 {
        store
            .set(
                &format!("k{i}"),
                Bytes::from(vec![0u8; 10_000]),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
    }
    assert!(
        store.weight() <= 1024 * 1024,
        "{} bytes held",
        store.weight()
    );
    assert!(store.len() < 1_000, "entries were evicted to make room");
    // The newest entry is still there.
    assert!(store.get("k999").await.unwrap().is_some());
}
