//! The flow store: the conformance suite against memory and Redis, takes racing on
//! several threads, the memory store's bounds, Redis keys and TTLs, and a Redis outage.

use std::sync::Arc;
use std::time::Duration;

use upcoach_auth::flow::{FlowError, FlowStore, MemoryFlowStore, RedisFlowStore};
use upcoach_auth::testing::flow::{MoveClock, Sleep, flow_store_conformance};
use upcoach_core::ManualClock;
use upcoach_testing::{FaultProxy, RedisPrefix};

const TTL: Duration = Duration::from_secs(60);

/// A store on the prefix's Redis: one node or a cluster.
async fn redis_store(prefix: &RedisPrefix) -> RedisFlowStore {
    let url =
        upcoach_core::config::ServiceUrl::parse(prefix.url(), &["redis", "redis+cluster"]).unwrap();
    let conn = upcoach_core::redis::RedisConnection::connect(&url, Default::default())
        .await
        .unwrap();
    RedisFlowStore::new(conn).with_prefix(prefix.prefix())
}

#[tokio::test]
async fn memory_store_conforms() {
    let clock = Arc::new(ManualClock::starting_now());
    let store = MemoryFlowStore::builder().clock(clock.clone()).build();
    flow_store_conformance(&store, &MoveClock(clock)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_conforms() {
    let Some(prefix) = RedisPrefix::create() else {
        return;
    };
    flow_store_conformance(&redis_store(&prefix).await, &Sleep).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_conforms_on_a_cluster() {
    let Some(prefix) = RedisPrefix::on_cluster() else {
        return;
    };
    flow_store_conformance(&redis_store(&prefix).await, &Sleep).await;
}

/// 50 tasks on 4 threads take one key at once, 20 times over: exactly one value each.
async fn racing_takes(store: Arc<dyn FlowStore>) {
    for round in 0..20 {
        let key = format!("race:{round}");
        store.put(&key, b"prize", TTL).await.unwrap();
        let start = Arc::new(tokio::sync::Barrier::new(50));
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let (store, key, start) = (store.clone(), key.clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    store.take(&key).await.unwrap()
                })
            })
            .collect();
        let mut got = 0;
        for task in tasks {
            if let Some(value) = task.await.unwrap() {
                assert_eq!(value, b"prize");
                got += 1;
            }
        }
        assert_eq!(
            got, 1,
            "round {round}: exactly one of 50 takes gets the value"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_takes_race_on_threads() {
    racing_takes(Arc::new(MemoryFlowStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_takes_race_on_threads() {
    let Some(prefix) = RedisPrefix::create() else {
        return;
    };
    racing_takes(Arc::new(redis_store(&prefix).await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_cluster_takes_race_on_threads() {
    let Some(prefix) = RedisPrefix::on_cluster() else {
        return;
    };
    racing_takes(Arc::new(redis_store(&prefix).await)).await;
}

#[tokio::test]
async fn memory_expiry_is_exact() {
    let clock = Arc::new(ManualClock::starting_now());
    let store = MemoryFlowStore::builder().clock(clock.clone()).build();
    store.put("a", b"1", Duration::from_secs(10)).await.unwrap();
    store.put("b", b"2", Duration::from_secs(10)).await.unwrap();
    clock.advance(Duration::from_secs(10) - Duration::from_nanos(1));
    assert_eq!(store.take("a").await.unwrap().as_deref(), Some(&b"1"[..]));
    clock.advance(Duration::from_nanos(1));
    assert_eq!(
        store.take("b").await.unwrap(),
        None,
        "gone at its expiry instant"
    );
}

#[tokio::test]
async fn memory_store_refuses_when_full_and_makes_room_as_entries_go() {
    let clock = Arc::new(ManualClock::starting_now());
    let store = MemoryFlowStore::builder()
        .clock(clock.clone())
        .max_entries(3)
        .build();
    store.put("a", b"", Duration::from_secs(1)).await.unwrap();
    store.put("b", b"", Duration::from_secs(5)).await.unwrap();
    store.put("c", b"", Duration::from_secs(5)).await.unwrap();
    match store.put("d", b"", TTL).await {
        Err(e @ FlowError::Full { entries: 3, .. }) => {
            assert!(e.is_retryable());
            assert_eq!(e.code(), "flow_store_full");
        }
        other => panic!("a full store: {other:?}"),
    }
    assert_eq!(store.len(), 3, "nothing was evicted to make room");

    // An expired entry is swept to make room.
    clock.advance(Duration::from_secs(1));
    store.put("d", b"", TTL).await.unwrap();
    assert!(store.put("e", b"", TTL).await.is_err());
    // A taken entry makes room.
    store.take("b").await.unwrap().unwrap();
    store.put("e", b"", TTL).await.unwrap();
    assert_eq!(store.len(), 3);
}

#[tokio::test]
async fn memory_store_is_bounded_by_bytes() {
    let store = MemoryFlowStore::builder().max_bytes(1000).build();
    store.put("k1", &[0; 400], TTL).await.unwrap();
    store.put("k2", &[0; 400], TTL).await.unwrap();
    assert_eq!(store.bytes(), 804);
    assert!(matches!(
        store.put("k3", &[0; 400], TTL).await,
        Err(FlowError::Full { bytes: 804, .. })
    ));
    store.put("k3", &[0; 194], TTL).await.unwrap();
    assert_eq!(store.bytes(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_keys_live_under_the_prefix_with_their_ttl() {
    let Some(prefix) = RedisPrefix::create() else {
        return;
    };
    let store = redis_store(&prefix).await;
    assert_eq!(store.redis_key("state:x"), prefix.key("state:x"));
    assert_eq!(
        RedisFlowStore::DEFAULT_PREFIX,
        "upcoach:flow:",
        "documented default"
    );
    store
        .put("state:x", b"v", Duration::from_secs(600))
        .await
        .unwrap();
    let client = redis::Client::open(prefix.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let pttl: i64 = redis::cmd("PTTL")
        .arg(prefix.key("state:x"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((590_000..=600_000).contains(&pttl), "PTTL {pttl}");
    let raw: Vec<u8> = redis::cmd("GET")
        .arg(prefix.key("state:x"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(raw, b"v", "stored as the bytes given");
    store.take("state:x").await.unwrap();
    let exists: i64 = redis::cmd("EXISTS")
        .arg(prefix.key("state:x"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 0, "a take deletes the key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_is_a_retryable_error_and_passes() {
    let Some(prefix) = RedisPrefix::create() else {
        return;
    };
    let proxy = FaultProxy::start(upcoach_testing::service_addr(prefix.url())).await;
    let url = upcoach_testing::url_via(prefix.url(), proxy.addr());
    let config = upcoach_core::redis::RedisOptions {
        connection_timeout: Duration::from_millis(200),
        response_timeout: Duration::from_millis(200),
        reconnect_retries: 1,
    };
    let conn = upcoach_core::redis::RedisConnection::from_client(
        redis::Client::open(url).unwrap(),
        config,
        "test",
    )
    .await
    .unwrap();
    let store = RedisFlowStore::new(conn).with_prefix(prefix.prefix());
    store.put("before", b"v", TTL).await.unwrap();

    proxy.cut();
    let started = std::time::Instant::now();
    let err = store.take("before").await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert_eq!(err.code(), "flow_store_unavailable");
    assert!(
        store
            .put("during", b"v", TTL)
            .await
            .unwrap_err()
            .is_retryable()
    );
    assert!(started.elapsed() < Duration::from_secs(3), "no call hangs");

    proxy.restore();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let value = loop {
        match store.take("before").await {
            Ok(value) => break value,
            Err(e) => {
                assert!(e.is_retryable(), "{e:?}");
                assert!(
                    std::time::Instant::now() < deadline,
                    "Redis is back within 10 s"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(
        value.as_deref(),
        Some(&b"v"[..]),
        "the value outlived the outage"
    );
}
