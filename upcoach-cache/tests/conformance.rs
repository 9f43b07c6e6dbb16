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

#[tokio::test]
async fn memory_tag_versions_stay_bounded_and_never_go_back() {
    use upcoach_cache::TagVersions;
    let tags = MemoryTagVersions::with_max_tags(8);
    // An entry computed with "report" never bumped, then the tag is invalidated.
    assert_eq!(tags.versions(&["report"]).await.unwrap(), [0]);
    assert_eq!(tags.bump(&["report"]).await.unwrap(), [1]);
    let mut seen = std::collections::HashMap::from([("report".to_owned(), 1u64)]);
    // A flood of invalidations of made-up tags: 10,000 tags, at most 8 remembered.
    for i in 0..10_000 {
        let tag = format!("flood-{i}");
        let bumped = tags.bump(&[tag.as_str()]).await.unwrap()[0];
        assert!(tags.len() <= 8);
        seen.insert(tag, bumped);
        if i % 997 == 0 {
            // No version ever goes back; "report" never returns to 0 or 1 (which
            // would make the entry computed at 0, or at 1, fresh again).
            for (tag, before) in &mut seen {
                let now = tags.versions(&[tag.as_str()]).await.unwrap()[0];
                assert!(now >= *before, "{tag}: {before} then {now}");
                *before = now;
            }
        }
    }
    // "report" and flood-0 to flood-6 fill it; from flood-7 on, every 8th new tag
    // forgets: 1,250 times, the last at flood-9999, which it then remembers alone.
    assert_eq!(tags.forgotten(), 1_250);
    assert_eq!(tags.len(), 1);
    let report = tags.versions(&["report"]).await.unwrap()[0];
    assert!(report > 1, "{report}");
    assert!(
        tags.versions(&["never-bumped"]).await.unwrap()[0] > 1,
        "a tag it does not know reads above everything given out"
    );
    // A bounded store that never fills is the plain store.
    tag_versions_conformance(&MemoryTagVersions::with_max_tags(64)).await;
}
