//! The tiered cache: conformance as a store, tags across two instances, single-flight,
//! the invalidate-while-loading race, loader errors, compression and fail-open.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use upcoach_cache::testing::{MoveClock, Sleep, cache_store_conformance};
use upcoach_cache::{
    CacheStore, LoadError, MemoryStore, MemoryTagVersions, RedisStore, RedisTagVersions,
    TieredCache, TieredOptions,
};
use upcoach_core::ManualClock;
use upcoach_testing::{FaultProxy, RedisPrefix};

const TTL: Duration = Duration::from_secs(60);

fn in_memory() -> (TieredCache, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::starting_now());
    let l2 = Arc::new(MemoryStore::with_clock(64 << 20, clock.clone()));
    let cache = TieredCache::with_clock(
        l2,
        Arc::new(MemoryTagVersions::default()),
        TieredOptions::default(),
        clock.clone(),
    );
    (cache, clock)
}

/// A connection to one node (`redis://`) or a cluster (`redis+cluster://`).
async fn connect(url: &str) -> upcoach_core::redis::RedisConnection {
    let url = upcoach_core::config::ServiceUrl::parse(url, &["redis", "redis+cluster"]).unwrap();
    upcoach_core::redis::RedisConnection::connect(&url, Default::default())
        .await
        .unwrap()
}

async fn on_redis(url: &str, prefix: &str, options: TieredOptions) -> TieredCache {
    let conn = connect(url).await;
    TieredCache::new(
        Arc::new(RedisStore::new(conn.clone(), prefix)),
        Arc::new(RedisTagVersions::new(conn, prefix)),
        options,
    )
}

#[tokio::test]
async fn tiered_cache_conforms_over_memory() {
    let (cache, clock) = in_memory();
    cache_store_conformance(&cache, &MoveClock(clock)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiered_cache_conforms_over_redis() {
    if let Some(prefix) = RedisPrefix::create() {
        conforms_over(prefix).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiered_cache_conforms_over_a_redis_cluster() {
    if let Some(prefix) = RedisPrefix::on_cluster() {
        conforms_over(prefix).await;
    }
}

async fn conforms_over(prefix: RedisPrefix) {
    let cache = on_redis(
        prefix.url(),
        prefix.prefix().trim_end_matches(':'),
        TieredOptions::default(),
    )
    .await;
    cache_store_conformance(&cache, &Sleep).await;
}

/// Without pub/sub notices a tag invalidation still reaches another process: at once
/// for what it reads from L2, and within the L1 maximum age for its L1 copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_invalidated_on_one_instance_is_seen_by_the_other() {
    let Some(prefix) = RedisPrefix::create() else {
        return;
    };
    let name = prefix.prefix().trim_end_matches(':').to_owned();
    let options = TieredOptions {
        l1_max_age: Duration::from_millis(300),
        ..TieredOptions::default()
    };
    let a = on_redis(prefix.url(), &name, options.clone()).await;
    let b = on_redis(prefix.url(), &name, options).await;

    a.set_tagged(
        "report",
        Bytes::from_static(b"v1"),
        TTL,
        &["analytics", "dashboard"],
    )
    .await
    .unwrap();
    a.set_tagged("other", Bytes::from_static(b"o"), TTL, &["users"])
        .await
        .unwrap();
    a.set_tagged("unread", Bytes::from_static(b"u"), TTL, &["analytics"])
        .await
        .unwrap();
    assert_eq!(
        b.get("report").await.unwrap().as_deref(),
        Some(&b"v1"[..]),
        "B reads A's entry"
    );
    assert_eq!(
        b.get("report").await.unwrap().as_deref(),
        Some(&b"v1"[..]),
        "now from B's L1"
    );
    assert_eq!(b.stats().l1_hits, 1);

    a.invalidate_tags(&["analytics"]).await.unwrap();
    assert_eq!(
        a.get("report").await.unwrap(),
        None,
        "the invalidating process sees it at once"
    );
    assert_eq!(
        b.get("unread").await.unwrap(),
        None,
        "B's reads from L2 see it at once"
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(
        b.get("report").await.unwrap(),
        None,
        "B's L1 copy within its maximum age"
    );
    assert_eq!(
        b.get("other").await.unwrap().as_deref(),
        Some(&b"o"[..]),
        "other tags untouched"
    );
    assert_eq!(a.stats().invalidations, 1);
    assert!(b.stats().stale >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_loads_of_one_cold_key_run_the_loader_once() {
    let (cache, _) = in_memory();
    let cache = Arc::new(cache);
    let runs = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..1_000 {
        let cache = cache.clone();
        let runs = runs.clone();
        tasks.push(tokio::spawn(async move {
            cache
                .get_or_load("cold", TTL, &["t"], || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok::<_, Infallible>(Bytes::from_static(b"computed"))
                })
                .await
                .unwrap()
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().as_ref(), b"computed");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(cache.stats().loads, 1);
}

#[tokio::test]
async fn a_value_loaded_across_an_invalidation_is_not_served_as_fresh() {
    let (cache, _) = in_memory();
    let cache = Arc::new(cache);
    let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let loading = {
        let cache = cache.clone();
        tokio::spawn(async move {
            cache
                .get_or_load("report", TTL, &["analytics"], || async move {
                    let _ = started_tx.send(());
                    let _ = released.await;
                    // Computed from data as it was before the invalidation below.
                    Ok::<_, Infallible>(Bytes::from_static(b"old data"))
                })
                .await
        })
    };
    started.await.unwrap();
    cache.invalidate_tags(&["analytics"]).await.unwrap();
    release.send(()).unwrap();
    assert_eq!(
        loading.await.unwrap().unwrap().as_ref(),
        b"old data",
        "its caller gets it"
    );
    assert_eq!(
        cache.get("report").await.unwrap(),
        None,
        "but it is not cached as fresh"
    );

    // Without the race, the loaded value is served.
    let v = cache
        .get_or_load("report", TTL, &["analytics"], || async {
            Ok::<_, Infallible>(Bytes::from_static(b"new"))
        })
        .await
        .unwrap();
    assert_eq!(v.as_ref(), b"new");
    assert_eq!(
        cache.get("report").await.unwrap().as_deref(),
        Some(&b"new"[..])
    );
}

#[tokio::test]
async fn loader_errors_are_returned_and_not_cached() {
    let (cache, _) = in_memory();
    let err = cache
        .get_or_load("k", TTL, &[], || async { Err::<Bytes, _>("database down") })
        .await
        .unwrap_err();
    assert!(matches!(err, LoadError::Loader("database down")));
    let v = cache
        .get_or_load("k", TTL, &[], || async {
            Ok::<_, &str>(Bytes::from_static(b"ok"))
        })
        .await
        .unwrap();
    assert_eq!(v.as_ref(), b"ok");
    let stats = cache.stats();
    assert_eq!((stats.loads, stats.load_errors), (2, 1));
    let n = cache
        .warm(&["w1", "w2", "k"], TTL, &[], |key| async move {
            Ok::<_, &str>(Bytes::from(key))
        })
        .await
        .unwrap();
    assert_eq!(n, 2, "k was cached already");
    assert_eq!(cache.get("w2").await.unwrap().as_deref(), Some(&b"w2"[..]));
}

#[tokio::test]
async fn large_values_are_compressed_and_counted() {
    let (cache, _) = in_memory();
    let json = serde_json::to_vec(&serde_json::json!({
        "routes": (0..300).map(|i| serde_json::json!({"route": format!("/api/items/{i}"), "count": i})).collect::<Vec<_>>()
    }))
    .unwrap();
    cache
        .set("snapshot", Bytes::from(json.clone()), TTL)
        .await
        .unwrap();
    assert!(cache.stats().bytes_saved as usize > json.len() / 2);
    assert_eq!(
        cache.get("snapshot").await.unwrap().unwrap().as_ref(),
        &json[..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_cut_the_cache_fails_open_and_recovers() {
    let Some(prefix) = RedisPrefix::create() else {
        return;
    };
    let proxy = FaultProxy::start(upcoach_testing::service_addr(prefix.url())).await;
    let url = upcoach_testing::url_via(prefix.url(), proxy.addr());
    let client = redis::Client::open(url.as_str()).unwrap();
    let config = upcoach_core::redis::RedisOptions {
        connection_timeout: Duration::from_millis(200),
        response_timeout: Duration::from_millis(200),
        reconnect_retries: 1,
    };
    let conn = upcoach_core::redis::RedisConnection::from_client(client, config, "test")
        .await
        .unwrap();
    let name = prefix.prefix().trim_end_matches(':');
    let options = TieredOptions {
        l2_timeout: Duration::from_millis(300),
        ..TieredOptions::default()
    };
    let cache = TieredCache::new(
        Arc::new(RedisStore::new(conn.clone(), name)),
        Arc::new(RedisTagVersions::new(conn, name)),
        options,
    );
    cache
        .set("warm", Bytes::from_static(b"w"), TTL)
        .await
        .unwrap();

    proxy.cut();
    let started = std::time::Instant::now();
    assert_eq!(
        cache.get("warm").await.unwrap().as_deref(),
        Some(&b"w"[..]),
        "L1 still answers"
    );
    let v = cache
        .get_or_load("cold", TTL, &[], || async {
            Ok::<_, Infallible>(Bytes::from_static(b"loaded"))
        })
        .await
        .unwrap();
    assert_eq!(v.as_ref(), b"loaded", "a miss falls back to the loader");
    cache
        .set("written", Bytes::from_static(b"x"), TTL)
        .await
        .unwrap();
    let err = cache
        .delete("nothing")
        .await
        .expect_err("a delete that cannot reach L2 says so");
    assert!(err.is_retryable());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "no call hangs past the timeout"
    );
    assert!(cache.stats().l2_errors >= 2, "{:?}", cache.stats());

    proxy.restore();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        cache
            .set("after", Bytes::from_static(b"back"), TTL)
            .await
            .unwrap();
        if cache.health().await.is_ok() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "L2 is back within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cache
        .set("after", Bytes::from_static(b"back"), TTL)
        .await
        .unwrap();
    let mut direct = redis::Client::open(prefix.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let stored: Option<Vec<u8>> = redis::cmd("GET")
        .arg(format!("{name}:v:after"))
        .query_async(&mut direct)
        .await
        .unwrap();
    assert!(stored.is_some(), "writes reach Redis again");
}

/// A cache with coherence on; `node` picks the cluster seed its subscription starts at
/// (ignored on one node).
async fn coherent(prefix: &RedisPrefix, options: TieredOptions, node: usize) -> TieredCache {
    let name = prefix.prefix().trim_end_matches(':');
    let url = if prefix.is_cluster() {
        upcoach_testing::rotated_cluster_url(prefix.url(), node)
    } else {
        prefix.url().to_owned()
    };
    let conn = connect(&url).await;
    let cache = TieredCache::new(
        Arc::new(RedisStore::new(conn.clone(), name)),
        Arc::new(RedisTagVersions::new(conn.clone(), name)),
        options,
    );
    let pubsub = conn.pubsub().unwrap().clone();
    cache.enable_coherence(pubsub, conn, format!("{name}:invalidate"));
    cache
}

/// Polls `check` for up to two seconds.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..100 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what} did not happen within 2 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overwrites_deletes_and_tags_on_one_process_evict_the_others_l1() {
    if let Some(prefix) = RedisPrefix::create() {
        evict_the_others_l1(prefix).await;
    }
}

/// On a cluster, A and B subscribe on different nodes: each notice crosses the cluster
/// bus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_writes_on_one_process_evict_the_others_l1() {
    if let Some(prefix) = RedisPrefix::on_cluster() {
        evict_the_others_l1(prefix).await;
    }
}

async fn evict_the_others_l1(prefix: RedisPrefix) {
    // A long L1 age, so only the notices can explain B seeing the changes.
    let options = TieredOptions {
        l1_max_age: Duration::from_secs(600),
        ..TieredOptions::default()
    };
    let a = coherent(&prefix, options.clone(), 0).await;
    let b = coherent(&prefix, options, 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await; // both subscribed

    a.set("k", Bytes::from_static(b"v1"), TTL).await.unwrap();
    // B's first reads may race A's notice about this very write (and then skip filling
    // L1); soon B holds it.
    eventually("B holds it in L1", async || {
        assert_eq!(b.get("k").await.unwrap().as_deref(), Some(&b"v1"[..]));
        b.stats().l1_hits >= 1
    })
    .await;

    a.set("k", Bytes::from_static(b"v2"), TTL).await.unwrap();
    eventually("B sees the overwrite", async || {
        b.get("k").await.unwrap().as_deref() == Some(&b"v2"[..])
    })
    .await;

    a.delete("k").await.unwrap();
    eventually("B sees the delete", async || {
        b.get("k").await.unwrap().is_none()
    })
    .await;

    a.set_tagged("report", Bytes::from_static(b"r"), TTL, &["analytics"])
        .await
        .unwrap();
    assert!(b.get("report").await.unwrap().is_some());
    a.invalidate_tags(&["analytics"]).await.unwrap();
    eventually("B sees the tag invalidation", async || {
        b.get("report").await.unwrap().is_none()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_is_refreshed_before_it_expires() {
    let clock = Arc::new(ManualClock::starting_now());
    let l2 = Arc::new(MemoryStore::with_clock(64 << 20, clock.clone()));
    let options = TieredOptions {
        refresh_ahead: 0.2,
        l1_max_age: Duration::from_secs(60),
        ..TieredOptions::default()
    };
    let cache = Arc::new(TieredCache::with_clock(
        l2,
        Arc::new(MemoryTagVersions::default()),
        options,
        clock.clone(),
    ));
    let loads = Arc::new(AtomicUsize::new(0));
    let loader = {
        let loads = loads.clone();
        move || {
            let n = loads.fetch_add(1, Ordering::SeqCst) + 1;
            async move { Ok::<_, Infallible>(Bytes::from(format!("v{n}"))) }
        }
    };
    let ttl = Duration::from_secs(10);
    assert_eq!(
        cache
            .get_or_refresh("hot", ttl, &[], loader.clone())
            .await
            .unwrap()
            .as_ref(),
        b"v1"
    );

    clock.advance(Duration::from_secs(7));
    assert_eq!(
        cache
            .get_or_refresh("hot", ttl, &[], loader.clone())
            .await
            .unwrap()
            .as_ref(),
        b"v1"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        loads.load(Ordering::SeqCst),
        1,
        "3 s left of 10: not yet due"
    );

    clock.advance(Duration::from_millis(1500));
    let served = cache
        .get_or_refresh("hot", ttl, &[], loader.clone())
        .await
        .unwrap();
    assert_eq!(
        served.as_ref(),
        b"v1",
        "the caller does not wait for the refresh"
    );
    for _ in 0..100 {
        if cache.get("hot").await.unwrap().as_deref() == Some(&b"v2"[..]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(loads.load(Ordering::SeqCst), 2, "one background reload");

    // Past the first value's expiry the refreshed one is still there.
    clock.advance(Duration::from_secs(5));
    assert_eq!(
        cache
            .get_or_refresh("hot", ttl, &[], loader)
            .await
            .unwrap()
            .as_ref(),
        b"v2"
    );
    assert_eq!(loads.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn l1_never_outlives_the_entry_it_copies() {
    let (cache, clock) = in_memory();
    cache
        .set("short", Bytes::from_static(b"s"), Duration::from_secs(2))
        .await
        .unwrap();
    clock.advance(Duration::from_millis(2100));
    assert_eq!(cache.get("short").await.unwrap(), None);
}

#[tokio::test]
async fn l1_evictions_are_counted() {
    let options = TieredOptions {
        l1_max_bytes: 64 * 1024,
        ..TieredOptions::default()
    };
    let cache = TieredCache::new(
        Arc::new(MemoryStore::new(64 << 20)),
        Arc::new(MemoryTagVersions::default()),
        options,
    );
    for i in 0..200 {
        cache
            .set(&format!("k{i}"), Bytes::from(vec![0u8; 4096]), TTL)
            .await
            .unwrap();
    }
    let stats = cache.stats();
    assert!(stats.l1_evictions > 0, "{stats:?}");
    assert!(stats.l1_entries < 200);
    // What L1 gave up is still in L2.
    assert!(cache.get("k0").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notices_that_cannot_be_published_are_counted() {
    let Some(prefix) = RedisPrefix::create() else {
        return;
    };
    let name = prefix.prefix().trim_end_matches(':');
    let direct = redis::Client::open(prefix.url()).unwrap();
    let conn = upcoach_core::redis::RedisConnection::from_client(
        direct.clone(),
        Default::default(),
        "test",
    )
    .await
    .unwrap();
    // Only the publisher goes through the proxy, so the cache itself keeps working.
    let proxy = FaultProxy::start(upcoach_testing::service_addr(prefix.url())).await;
    let via = redis::Client::open(upcoach_testing::url_via(prefix.url(), proxy.addr())).unwrap();
    let config = upcoach_core::redis::RedisOptions {
        connection_timeout: Duration::from_millis(200),
        response_timeout: Duration::from_millis(200),
        reconnect_retries: 1,
    };
    let publisher = upcoach_core::redis::RedisConnection::from_client(via, config, "test")
        .await
        .unwrap();
    let cache = TieredCache::new(
        Arc::new(RedisStore::new(conn.clone(), name)),
        Arc::new(RedisTagVersions::new(conn, name)),
        TieredOptions::default(),
    );
    cache.enable_coherence(direct, publisher, format!("{name}:invalidate"));

    cache.set("k", Bytes::from_static(b"1"), TTL).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(cache.stats().coherence_dropped, 0, "published");

    proxy.cut();
    for i in 0..3u8 {
        cache.set("k", Bytes::from(vec![i]), TTL).await.unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while cache.stats().coherence_dropped < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the failed notices are counted: {:?}",
            cache.stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        cache.get("k").await.unwrap().as_deref(),
        Some(&[2u8][..]),
        "the cache itself carries on"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_that_goes_silent_is_replaced_and_l1_emptied() {
    let Some(prefix) = RedisPrefix::create() else {
        return;
    };
    let options = TieredOptions {
        l1_max_age: Duration::from_secs(600),
        coherence_ping_interval: Duration::from_millis(200),
        ..TieredOptions::default()
    };
    let a = coherent(&prefix, options.clone(), 0).await;
    // B listens through the proxy; everything else of B goes straight to Redis.
    let name = prefix.prefix().trim_end_matches(':');
    let direct = redis::Client::open(prefix.url()).unwrap();
    let conn =
        upcoach_core::redis::RedisConnection::from_client(direct, Default::default(), "test")
            .await
            .unwrap();
    let proxy = FaultProxy::start(upcoach_testing::service_addr(prefix.url())).await;
    let via = redis::Client::open(upcoach_testing::url_via(prefix.url(), proxy.addr())).unwrap();
    let b = TieredCache::new(
        Arc::new(RedisStore::new(conn.clone(), name)),
        Arc::new(RedisTagVersions::new(conn.clone(), name)),
        options,
    );
    b.enable_coherence(via, conn, format!("{name}:invalidate"));
    tokio::time::sleep(Duration::from_millis(300)).await; // both subscribed

    a.set("k", Bytes::from_static(b"v1"), TTL).await.unwrap();
    eventually("B holds v1 in L1", async || {
        assert_eq!(b.get("k").await.unwrap().as_deref(), Some(&b"v1"[..]));
        b.stats().l1_hits >= 1
    })
    .await;
    assert_eq!(proxy.forwarded(), 1);

    // B's subscription goes silent without closing: A's next notice cannot reach it,
    // and only B's ping can tell.
    proxy.stall();
    a.set("k", Bytes::from_static(b"v2"), TTL).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while b.get("k").await.unwrap().as_deref() != Some(&b"v2"[..]) {
        assert!(
            std::time::Instant::now() < deadline,
            "B still serves v1 from L1 after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(proxy.forwarded() >= 2, "B subscribed again");
}

/// A Redis that restarts empty (a `redis-server` of the test's own): L2 and every tag
/// version are gone, and notices sent meanwhile are lost. Each process empties its L1
/// when its subscription comes back, so nothing cached before the restart is served
/// after it, although L1 would keep it for ten minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_that_loses_every_key_empties_each_l1() {
    let Some(mut redis) = upcoach_testing::PrivateRedis::start().await else {
        return;
    };
    let options = TieredOptions {
        l1_max_age: Duration::from_secs(600),
        coherence_ping_interval: Duration::from_millis(200),
        ..TieredOptions::default()
    };
    let url = redis.url();
    let coherent_on = async |name: &str| {
        let conn = connect(&url).await;
        let cache = TieredCache::new(
            Arc::new(RedisStore::new(conn.clone(), name)),
            Arc::new(RedisTagVersions::new(conn.clone(), name)),
            options.clone(),
        );
        let pubsub = conn.pubsub().unwrap().clone();
        cache.enable_coherence(pubsub, conn, "restart:invalidate".to_owned());
        cache
    };
    let a = coherent_on("restart").await;
    let b = coherent_on("restart").await;
    tokio::time::sleep(Duration::from_millis(300)).await; // both subscribed

    a.set_tagged("report", Bytes::from_static(b"r1"), TTL, &["analytics"])
        .await
        .unwrap();
    eventually("B holds the report in L1", async || {
        b.get("report").await.unwrap().as_deref() == Some(&b"r1"[..]) && b.stats().l1_hits >= 1
    })
    .await;

    redis.restart().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    for cache in [&a, &b] {
        // A read that fails while the link reconnects fails open (a miss), never stale.
        while cache.get("report").await.ok().flatten().is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "a process still serves the report from before the restart after 5 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for _ in 0..10 {
        for cache in [&a, &b] {
            let read = cache.get("report").await.ok().flatten();
            assert!(read.is_none(), "stale again: {read:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And the caches work on the new Redis: a write on A reaches B, an invalidation
    // (versions start again from nothing) evicts it.
    a.set_tagged("report", Bytes::from_static(b"r2"), TTL, &["analytics"])
        .await
        .unwrap();
    eventually("B reads the new report", async || {
        b.get("report").await.unwrap().as_deref() == Some(&b"r2"[..])
    })
    .await;
    a.invalidate_tags(&["analytics"]).await.unwrap();
    eventually("B sees the invalidation", async || {
        b.get("report").await.unwrap().is_none()
    })
    .await;
}

/// L1 remembers at most 100,000 tags' versions (the ones it learned from invalidations
/// and notices). Past that it starts over, and drops its entries with the versions: a
/// forgotten version must not let a stale tagged copy look fresh.
#[tokio::test]
async fn past_a_hundred_thousand_known_tags_l1_starts_over() {
    let (cache, _clock) = in_memory();
    cache
        .set_tagged("report", Bytes::from_static(b"r1"), TTL, &["analytics"])
        .await
        .unwrap();
    assert_eq!(
        cache.get("report").await.unwrap().as_deref(),
        Some(&b"r1"[..])
    );
    let hits = cache.stats().l1_hits;
    assert_eq!(hits, 1, "precondition: the report is served from L1");

    // A flood of invalidations of tags nobody uses, 25 per call (at most 32 a call).
    let tags: Vec<String> = (0..100_100).map(|i| format!("flood-{i}")).collect();
    for chunk in tags.chunks(25) {
        let chunk: Vec<&str> = chunk.iter().map(String::as_str).collect();
        cache.invalidate_tags(&chunk).await.unwrap();
    }
    // L1 started over: the next read is not an L1 hit; L2 still has the report, and it
    // is current (its own tag was never invalidated).
    let read = cache.get("report").await.unwrap();
    assert_eq!(
        cache.stats().l1_hits,
        hits,
        "L1 forgot its entries with the versions"
    );
    assert!(
        read.as_ref().is_none_or(|r| r.as_ref() == b"r1"),
        "{read:?}"
    );
    // And an invalidation after the flood still evicts the report everywhere.
    cache.invalidate_tags(&["analytics"]).await.unwrap();
    assert!(cache.get("report").await.unwrap().is_none());
}
