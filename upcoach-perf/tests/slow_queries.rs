//! Slow-query detection against Postgres: sqlx's statement log feeds the digests, the
//! statement and pool-wait histograms, and (with Redis) the `slow_queries` list.

use std::sync::Arc;
use std::time::Duration;

use tracing_subscriber::Layer;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt;
use upcoach_core::postgres::{self, PgPoolConfig};
use upcoach_perf::MemoryMetrics;
use upcoach_perf::slow::{SlowQueryLog, SqlTimingLayer};
use upcoach_testing::{PgSchema, RedisPrefix};

#[tokio::test]
async fn a_slow_statement_becomes_one_digest_without_its_literal() {
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    let redis = RedisPrefix::create();
    let metrics = Arc::new(MemoryMetrics::default());
    let mut slow = SlowQueryLog::new(Duration::from_millis(200), 100);
    let list_key = redis.as_ref().map(|p| p.key("slow_queries"));
    if let (Some(prefix), Some(key)) = (&redis, &list_key) {
        let client = redis::Client::open(prefix.url()).unwrap();
        let manager =
            upcoach_core::redis::RedisConnection::from_client(client, Default::default(), "test")
                .await
                .unwrap();
        slow = slow.with_redis(manager, key.clone(), 1000);
    }
    let slow = Arc::new(slow);
    let layer = SqlTimingLayer::new(slow.clone(), metrics.clone())
        .with_filter(filter_fn(SqlTimingLayer::wants));
    // The test runs on one thread (current-thread runtime), so a thread-local default
    // subscriber sees every statement.
    let _guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));

    let pool = postgres::connect_with(
        schema.connect_options(),
        &PgPoolConfig {
            slow_statement_threshold: Duration::from_millis(200),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    for seconds in ["0.3", "0.05", "0.25"] {
        sqlx::query(sqlx::AssertSqlSafe(format!("SELECT pg_sleep({seconds})")))
            .execute(&pool)
            .await
            .unwrap();
    }

    let digests = slow.digests();
    assert_eq!(digests.len(), 1, "{digests:?}");
    assert_eq!(digests[0].digest, "SELECT pg_sleep(?)");
    assert_eq!(
        digests[0].count, 2,
        "the 50 ms statement is below the threshold"
    );
    assert!(
        digests[0].max_ms >= 290.0 && digests[0].max_ms < 1000.0,
        "{:?}",
        digests[0]
    );
    assert!(digests[0].p95_ms >= 240.0);

    let statements = metrics
        .histogram("db_statement_duration_seconds", &[("kind", "select")])
        .unwrap();
    assert!(
        statements.count() >= 3,
        "every statement is timed, slow or not"
    );
    let waits = metrics
        .histogram("db_pool_acquire_duration_seconds", &[])
        .unwrap();
    assert!(
        waits.count() >= 3,
        "and so is each wait for a pooled connection"
    );

    if let (Some(prefix), Some(key)) = (&redis, &list_key) {
        let client = redis::Client::open(prefix.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let mut entries: Vec<String> = Vec::new();
        for _ in 0..50 {
            entries = redis::cmd("LRANGE")
                .arg(key)
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await
                .unwrap();
            if entries.len() >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(entries.len(), 2, "{entries:?}");
        let newest: serde_json::Value = serde_json::from_str(&entries[0]).unwrap();
        assert_eq!(newest["digest"], "SELECT pg_sleep(?)");
        assert!(newest["elapsed_ms"].as_f64().unwrap() >= 240.0);
    }
}

#[tokio::test]
async fn the_redis_list_is_trimmed() {
    if let Some(prefix) = RedisPrefix::create() {
        list_is_trimmed(prefix).await;
    }
}

#[tokio::test]
async fn the_redis_list_is_trimmed_on_a_cluster() {
    if let Some(prefix) = RedisPrefix::on_cluster() {
        list_is_trimmed(prefix).await;
    }
}

async fn list_is_trimmed(prefix: RedisPrefix) {
    let url =
        upcoach_core::config::ServiceUrl::parse(prefix.url(), &["redis", "redis+cluster"]).unwrap();
    let manager = upcoach_core::redis::RedisConnection::connect(&url, Default::default())
        .await
        .unwrap();
    let key = prefix.key("slow_queries");
    let slow = SlowQueryLog::new(Duration::ZERO, 10).with_redis(manager.clone(), key.clone(), 5);
    for i in 0..20 {
        slow.observe(&format!("SELECT {i}"), Duration::from_millis(1));
    }
    let mut conn = manager;
    let mut len: usize = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        len = redis::cmd("LLEN")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let last: Vec<String> = redis::cmd("LRANGE")
            .arg(&key)
            .arg(0)
            .arg(0)
            .query_async(&mut conn)
            .await
            .unwrap();
        if last.first().is_some_and(|e| e.contains("\"SELECT ?\"")) && len == 5 {
            break;
        }
    }
    assert_eq!(len, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_that_miss_redis_are_counted_and_the_digests_kept() {
    let Some(prefix) = RedisPrefix::create() else {
        return;
    };
    let proxy =
        upcoach_testing::FaultProxy::start(upcoach_testing::service_addr(prefix.url())).await;
    let client = redis::Client::open(upcoach_testing::url_via(prefix.url(), proxy.addr())).unwrap();
    let config = upcoach_core::redis::RedisOptions {
        connection_timeout: Duration::from_millis(200),
        response_timeout: Duration::from_millis(200),
        reconnect_retries: 1,
    };
    let manager = upcoach_core::redis::RedisConnection::from_client(client, config, "test")
        .await
        .unwrap();
    let slow =
        SlowQueryLog::new(Duration::ZERO, 10).with_redis(manager, prefix.key("slow_queries"), 5);
    slow.observe("SELECT 1", Duration::from_millis(1));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(slow.redis_skipped(), 0, "written");

    proxy.cut();
    // More than the queue holds: some wait for a dead Redis, the rest find it full.
    for i in 0..2_000 {
        slow.observe(&format!("SELECT {i} FROM t"), Duration::from_millis(1));
    }
    assert!(
        slow.redis_skipped() >= 2_000 - 1_024 - 1,
        "{}",
        slow.redis_skipped()
    );
    assert_eq!(slow.digests().len(), 2, "the digests themselves are kept");
    assert_eq!(SlowQueryLog::new(Duration::ZERO, 10).redis_skipped(), 0);
}
