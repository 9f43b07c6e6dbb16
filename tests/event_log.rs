//! The EventLog conformance suite against both backends, and the Postgres writer through
//! an outage.

use std::time::Duration;

use upcoach_core::event::{
    EventKind, EventLog, EventLogError, MemoryEventLog, PgEventLog, SecurityEvent,
};
use upcoach_core::{SystemClock, postgres, testing};
use upcoach_testing::{FaultProxy, PgSchema};

#[tokio::test]
async fn memory_event_log_conforms() {
    testing::event_log_conformance(&MemoryEventLog::new(100)).await;
}

#[tokio::test]
async fn memory_event_log_evicts_the_oldest_and_counts_it() {
    let log = MemoryEventLog::new(3);
    for i in 0..5 {
        log.record(SecurityEvent::new(format!("e{i}"), &SystemClock).into())
            .unwrap();
    }
    let names: Vec<String> = log
        .recent(EventKind::Security, 10)
        .await
        .unwrap()
        .iter()
        .map(|e| e.name().to_owned())
        .collect();
    assert_eq!(names, ["e4", "e3", "e2"]);
    assert_eq!(log.stats().evicted, 2);
    assert_eq!(log.stats().accepted, 5);
}

#[tokio::test]
async fn memory_event_log_is_bounded_by_bytes_too() {
    let log = MemoryEventLog::new(1_000).max_bytes(64 * 1024);
    let blob = serde_json::json!({ "blob": "x".repeat(10_000) });
    for i in 0..20 {
        log.record(
            SecurityEvent::new(format!("big_{i}"), &SystemClock)
                .details(blob.clone())
                .into(),
        )
        .unwrap();
    }
    let kept = log.recent(EventKind::Security, 100).await.unwrap();
    assert!(
        (5..=6).contains(&kept.len()),
        "64 KiB holds about six 10 kB records: {}",
        kept.len()
    );
    assert_eq!(kept[0].name(), "big_19", "the newest are kept");
    assert_eq!(log.stats().evicted as usize, 20 - kept.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_event_log_conforms() {
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    postgres::migrate(schema.pool()).await.unwrap();
    let log = PgEventLog::new(upcoach_core::postgres::MeteredPool::new(
        schema.pool().clone(),
    ));
    testing::event_log_conformance(&log).await;
}

/// 10,000 events logged while Postgres is cut off all arrive once it is back, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_writer_keeps_every_event_through_an_outage() {
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    postgres::migrate(schema.pool()).await.unwrap();

    let upstream = upcoach_testing::service_addr(schema.url());
    let proxy = FaultProxy::start(upstream).await;
    let options = schema
        .connect_options()
        .host(&proxy.addr().ip().to_string())
        .port(proxy.addr().port());
    let pool = postgres::connect_with(
        options,
        &postgres::PgPoolConfig {
            max_connections: 4,
            acquire_timeout: Duration::from_secs(1),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let log = PgEventLog::builder(upcoach_core::postgres::MeteredPool::new(pool))
        .batch_size(500)
        .backoff(Duration::from_millis(20), Duration::from_millis(200))
        .build();

    // Some events before the outage, written normally.
    for i in 0..100 {
        log.record(SecurityEvent::new(format!("before_{}", i % 3), &SystemClock).into())
            .unwrap();
    }
    log.flush().await.unwrap();

    proxy.cut();
    for i in 0..10_000 {
        log.record(
            SecurityEvent::new("during_outage", &SystemClock)
                .details(serde_json::json!({ "i": i }))
                .into(),
        )
        .expect("the queue has room for the whole outage");
    }
    // Recording never waited on the database, and the writer is failing meanwhile.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = log.stats();
    assert!(stats.retries > 0, "the writer retried while cut: {stats:?}");
    assert!(stats.queued > 0, "events wait in the queue: {stats:?}");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), log.flush())
            .await
            .is_err(),
        "a flush cannot finish while Postgres is unreachable"
    );

    proxy.restore();
    tokio::time::timeout(Duration::from_secs(60), log.flush())
        .await
        .expect("the backlog is written within a minute of the restore")
        .unwrap();

    let (during, distinct): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT (details->>'i')) FROM security_events WHERE event_type = 'during_outage'",
    )
    .fetch_one(schema.pool())
    .await
    .unwrap();
    assert_eq!(
        during, 10_000,
        "every event logged during the outage is stored"
    );
    assert_eq!(distinct, 10_000, "each exactly once");
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM security_events")
        .fetch_one(schema.pool())
        .await
        .unwrap();
    assert_eq!(total, 10_100);
    let stats = log.stats();
    assert_eq!(
        (stats.accepted, stats.written, stats.queued, stats.dropped),
        (10_100, 10_100, 0, 0)
    );
}

/// With the database down and the queue full, a record is refused, counted, and the
/// queue's contents are still written later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_writer_drops_and_counts_when_the_queue_is_full() {
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    postgres::migrate(schema.pool()).await.unwrap();
    let proxy = FaultProxy::start(upcoach_testing::service_addr(schema.url())).await;
    let options = schema
        .connect_options()
        .host(&proxy.addr().ip().to_string())
        .port(proxy.addr().port());
    let pool = postgres::connect_with(
        options,
        &postgres::PgPoolConfig {
            max_connections: 2,
            acquire_timeout: Duration::from_secs(1),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    proxy.cut();
    let log = PgEventLog::builder(upcoach_core::postgres::MeteredPool::new(pool))
        .queue_capacity(50)
        .batch_size(10)
        .backoff(Duration::from_millis(20), Duration::from_millis(100))
        .build();

    let mut refused = 0;
    for _ in 0..200 {
        match log.record(SecurityEvent::new("flood", &SystemClock).into()) {
            Ok(()) => {}
            Err(EventLogError::QueueFull { capacity, .. }) => {
                assert_eq!(capacity, 50);
                refused += 1;
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    let stats = log.stats();
    assert_eq!(stats.dropped, refused);
    assert_eq!(stats.accepted + stats.dropped, 200);
    // The writer holds one batch of 10 out of the channel, so 50 to 60 fit.
    assert!((50..=60).contains(&stats.accepted), "{stats:?}");

    proxy.restore();
    tokio::time::timeout(Duration::from_secs(30), log.flush())
        .await
        .unwrap()
        .unwrap();
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM security_events")
        .fetch_one(schema.pool())
        .await
        .unwrap();
    assert_eq!(
        stored as u64, stats.accepted,
        "everything accepted is stored"
    );
}

/// The byte bound holds whatever the record count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_writer_bounds_queued_bytes() {
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    postgres::migrate(schema.pool()).await.unwrap();
    let proxy = FaultProxy::start(upcoach_testing::service_addr(schema.url())).await;
    let pool = postgres::connect_with(
        schema
            .connect_options()
            .host("127.0.0.1")
            .port(proxy.addr().port()),
        &postgres::PgPoolConfig {
            max_connections: 1,
            acquire_timeout: Duration::from_secs(1),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    proxy.cut();
    let log = PgEventLog::builder(upcoach_core::postgres::MeteredPool::new(pool))
        .max_queued_bytes(100_000)
        .build();
    let big = serde_json::json!({ "blob": "x".repeat(10_000) });
    let mut accepted = 0;
    for _ in 0..100 {
        if log
            .record(
                SecurityEvent::new("big", &SystemClock)
                    .details(big.clone())
                    .into(),
            )
            .is_ok()
        {
            accepted += 1;
        }
    }
    assert!(
        (8..=10).contains(&accepted),
        "about 100 kB of 10 kB records: {accepted}"
    );
    assert_eq!(log.stats().dropped, 100 - accepted);
}
