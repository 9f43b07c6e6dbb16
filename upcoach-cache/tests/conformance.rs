//! The conformance suite against the in-process store and the Redis store.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use upcoach_cache::testing::{MoveClock, Sleep, cache_store_conformance, tag_versions_conformance};
use upcoach_cache::{CacheStore, MemoryStore, MemoryTagVersions, RedisStore, RedisTagVersions};
use upcoach_core::ManualClock;
use upcoach_core::config::ServiceUrl;
use upcoach_core::redis::RedisConnection;
use upcoach_testing::RedisPrefix;

#[tokio::test]
async fn memory_store_conforms() {
    let clock = Arc::new(ManualClock::starting_now());
    let store = MemoryStore::with_clock(64 * 1024 * 1024, clock.clone());
    cache_store_conformance(&store, &MoveClock(clock)).await;
    tag_versions_conformance(&MemoryTagVersions::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_conforms() {
    if let Some(prefix) = RedisPrefix::create() {
        redis_conforms(prefix).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_conforms_on_a_cluster() {
    if let Some(prefix) = RedisPrefix::on_cluster() {
        redis_conforms(prefix).await;
    }
}

async fn redis_conforms(prefix: RedisPrefix) {
    let url = ServiceUrl::parse(prefix.url(), &["redis", "redis+cluster"]).unwrap();
    let conn = RedisConnection::connect(&url, Default::default())
        .await
        .unwrap();
    let store = RedisStore::new(conn.clone(), prefix.prefix().trim_end_matches(':'));
    cache_store_conformance(&store, &Sleep).await;
    tag_versions_conformance(&RedisTagVersions::new(
        conn,
        prefix.prefix().trim_end_matches(':'),
    ))
    .await;
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
