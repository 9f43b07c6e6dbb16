//! The rate limiters: both backends through the conformance suite, one budget shared
//! by two limiters on separate Redis connections, a Redis outage, and the in-memory
//! bound on keys and blocks.
//!
//! Redis tests need `REDIS_URL` (skipped, said so, without it; failing instead with
//! `UPCOACH_REQUIRE_SERVICES=1`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use upcoach_core::ManualClock;
use upcoach_core::limit::{LimitError, MemoryLimiter, Quota, RateLimiter, RedisLimiter};
use upcoach_core::redis::{RedisConnection, RedisOptions};
use upcoach_core::testing::{MoveClock, Sleep, rate_limiter_conformance};
use upcoach_testing::{FaultProxy, RedisPrefix};

/// Emission interval and slack of the suite on real time. The slack covers a stall of
/// the test between two calls: `.ci/run` runs many test binaries at once on two cores,
/// and an 83 ms stall failed the Redis run at 80 ms (2026-12-07).
const REAL_EMISSION: Duration = Duration::from_millis(250);
const REAL_SLACK: Duration = Duration::from_millis(150);

/// A connection of its own to `url`, with `timeout` for connecting and answers.
/// One Redis node (`redis://`) or a Redis Cluster (`redis+cluster://`).
async fn connect(url: &str, timeout: Duration) -> RedisConnection {
    let url = upcoach_core::config::ServiceUrl::parse(url, &["redis", "redis+cluster"]).unwrap();
    let options = RedisOptions {
        connection_timeout: timeout,
        response_timeout: timeout,
        reconnect_retries: 1,
    };
    RedisConnection::connect(&url, options)
        .await
        .unwrap_or_else(|e| panic!("{url} is set but Redis does not answer: {e}"))
}

#[tokio::test]
async fn memory_limiter_conforms_on_a_manual_clock() {
    let clock = Arc::new(ManualClock::starting_now());
    let limiter = MemoryLimiter::with_clock(clock.clone());
    rate_limiter_conformance(
        &limiter,
        &MoveClock(clock),
        Duration::from_secs(1),
        Duration::ZERO,
    )
    .await;
    // Odd emission intervals too (a third of a second does not divide evenly).
    let clock = Arc::new(ManualClock::starting_now());
    let limiter = MemoryLimiter::with_clock(clock.clone());
    rate_limiter_conformance(
        &limiter,
        &MoveClock(clock),
        Duration::from_nanos(333_333_333),
        Duration::ZERO,
    )
    .await;
}

#[tokio::test]
async fn memory_limiter_conforms_on_its_own_clock() {
    rate_limiter_conformance(&MemoryLimiter::new(), &Sleep, REAL_EMISSION, REAL_SLACK).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_limiter_conforms() {
    if let Some(prefix) = RedisPrefix::create() {
        redis_conforms(prefix).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_limiter_conforms_on_a_cluster() {
    if let Some(prefix) = RedisPrefix::on_cluster() {
        redis_conforms(prefix).await;
    }
}

async fn redis_conforms(prefix: RedisPrefix) {
    let redis = connect(prefix.url(), Duration::from_secs(2)).await;
    let limiter = RedisLimiter::new(redis, prefix.prefix());
    rate_limiter_conformance(&limiter, &Sleep, REAL_EMISSION, REAL_SLACK).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_rule_key_expires_when_the_bucket_is_full_again() {
    let Some(prefix) = RedisPrefix::create() else {
        return;
    };
    let redis = connect(prefix.url(), Duration::from_secs(2)).await;
    let limiter = RedisLimiter::new(redis.clone(), prefix.prefix());
    let quota = Quota::new(10, Duration::from_secs(10)).unwrap();
    for _ in 0..3 {
        limiter.check("r", "user:1", quota).await.unwrap();
    }
    let key = limiter.rule_key("r", "user:1");
    assert!(
        key.contains("{user:1}"),
        "the subject is the hash tag: {key}"
    );
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut redis.clone())
        .await
        .unwrap();
    assert!(
        (2_900..=3_000).contains(&ttl),
        "three requests' worth of the window: {ttl} ms"
    );
}

/// 1,000 requests, alternating between two limiters on separate connections, 50 at a
/// time, against 100 a minute: one budget, not two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_redis_limiters_share_one_budget() {
    if let Some(prefix) = RedisPrefix::create() {
        share_one_budget(prefix).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_redis_limiters_share_one_budget_on_a_cluster() {
    if let Some(prefix) = RedisPrefix::on_cluster() {
        share_one_budget(prefix).await;
    }
}

async fn share_one_budget(prefix: RedisPrefix) {
    let limiters = [
        Arc::new(RedisLimiter::new(
            connect(prefix.url(), Duration::from_secs(5)).await,
            prefix.prefix(),
        )),
        Arc::new(RedisLimiter::new(
            connect(prefix.url(), Duration::from_secs(5)).await,
            prefix.prefix(),
        )),
    ];
    let quota = Quota::new(100, Duration::from_secs(60)).unwrap();
    let semaphore = Arc::new(tokio::sync::Semaphore::new(50));
    let mut tasks = Vec::new();
    for i in 0..1_000 {
        let limiter = limiters[i % 2].clone();
        let permit = semaphore.clone().acquire_owned().await.unwrap();
        tasks.push(tokio::spawn(async move {
            let d = limiter.check("api", "user:shared", quota).await.unwrap();
            drop(permit);
            (i % 2, d.allowed)
        }));
    }
    let mut admitted = [0u32; 2];
    for task in tasks {
        let (which, allowed) = task.await.unwrap();
        admitted[which] += u32::from(allowed);
    }
    let total = admitted[0] + admitted[1];
    eprintln!("admitted {total} of 1000 (per limiter {admitted:?})");
    assert!(
        (100..=101).contains(&total),
        "one budget of 100 (+1 for refill), got {total}"
    );
    assert!(
        admitted[0] > 0 && admitted[1] > 0,
        "both limiters took part"
    );
}

/// Redis cut off: a check answers `Unavailable` within the timeout instead of hanging,
/// and works again once Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_is_unavailable_within_the_timeout() {
    let Some(prefix) = RedisPrefix::create() else {
        return;
    };
    let proxy = FaultProxy::start(upcoach_testing::service_addr(prefix.url())).await;
    let url = upcoach_testing::url_via(prefix.url(), proxy.addr());
    let timeout = Duration::from_millis(300);
    let limiter = RedisLimiter::new(connect(&url, Duration::from_secs(2)).await, prefix.prefix())
        .with_timeout(timeout);
    let quota = Quota::new(100, Duration::from_secs(60)).unwrap();
    assert!(limiter.check("r", "user:1", quota).await.unwrap().allowed);

    proxy.cut();
    for _ in 0..3 {
        let start = Instant::now();
        let result = limiter.check("r", "user:1", quota).await;
        let took = start.elapsed();
        assert!(
            matches!(result, Err(LimitError::Unavailable(_))),
            "cut: {result:?}"
        );
        assert!(
            took <= timeout + Duration::from_millis(200),
            "answered in {took:?}, timeout {timeout:?}"
        );
        let result = limiter.block("user:1", Duration::from_secs(1)).await;
        assert!(
            matches!(result, Err(LimitError::Unavailable(_))),
            "{result:?}"
        );
    }

    // A silent link (open, nothing comes back) hits the timeout rather than hanging.
    proxy.restore();
    let deadline = Instant::now() + Duration::from_secs(10);
    while limiter.check("r", "user:1", quota).await.is_err() {
        assert!(Instant::now() < deadline, "works again within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.stall();
    let start = Instant::now();
    let result = limiter.check("r", "user:1", quota).await;
    assert!(
        matches!(result, Err(LimitError::Unavailable(_))),
        "stalled: {result:?}"
    );
    assert!(start.elapsed() <= timeout + Duration::from_millis(200));

    proxy.cut();
    proxy.restore();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match limiter.check("r", "user:1", quota).await {
            Ok(d) => {
                // Earlier checks counted; the budget survived the outage in Redis.
                assert!(d.allowed && d.remaining < 99, "{d:?}");
                break;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "works again within 10 s: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Past the key cap new keys are refused (and counted), known keys keep working, and
/// room comes back as buckets refill.
#[tokio::test]
async fn memory_keys_are_capped() {
    let clock = Arc::new(ManualClock::starting_now());
    let limiter = MemoryLimiter::with_clock(clock.clone()).with_max_keys(100);
    let quota = Quota::new(5, Duration::from_secs(60)).unwrap();
    for i in 0..1_000 {
        let d = limiter
            .check("login", &format!("ip:10.0.{}.{}", i / 256, i % 256), quota)
            .await
            .unwrap();
        assert_eq!(d.allowed, i < 100, "request {i}: {d:?}");
        if !d.allowed {
            assert_eq!(d.retry_after, MemoryLimiter::FULL_RETRY_AFTER);
        }
    }
    let stats = limiter.stats();
    eprintln!("after 1,000 subjects against a cap of 100: {stats:?}");
    assert_eq!(stats.keys, 100, "{stats:?}");
    assert_eq!(stats.refused_full, 900);
    // A known key is not a new one.
    let d = limiter.check("login", "ip:10.0.0.7", quota).await.unwrap();
    assert!(d.allowed && d.remaining == 3, "{d:?}");

    // Keys whose bucket is full again make room.
    clock.advance(Duration::from_secs(61));
    assert!(
        limiter
            .check("login", "ip:192.0.2.1", quota)
            .await
            .unwrap()
            .allowed
    );
    assert!(limiter.stats().keys <= 100);
}

/// The block list is bounded: past the cap a block fails (and is counted), until
/// blocks end.
#[tokio::test]
async fn memory_blocks_are_capped() {
    let clock = Arc::new(ManualClock::starting_now());
    let limiter = MemoryLimiter::with_clock(clock.clone()).with_max_blocks(10);
    for i in 0..10 {
        limiter
            .block(&format!("ip:10.0.0.{i}"), Duration::from_secs(60))
            .await
            .unwrap();
    }
    // Lengthening a present block needs no room.
    limiter
        .block("ip:10.0.0.1", Duration::from_secs(120))
        .await
        .unwrap();
    let full = limiter.block("ip:10.0.0.99", Duration::from_secs(60)).await;
    assert!(matches!(full, Err(LimitError::Unavailable(_))), "{full:?}");
    assert_eq!(limiter.stats().blocks_refused, 1);
    clock.advance(Duration::from_secs(61));
    limiter
        .block("ip:10.0.0.99", Duration::from_secs(60))
        .await
        .unwrap();
    let stats = limiter.stats();
    assert_eq!(stats.blocks, 2, "ended blocks were dropped: {stats:?}");
}

/// Many threads on one limiter admit exactly the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_limiter_admits_the_budget_under_contention() {
    let limiter = Arc::new(MemoryLimiter::new());
    let quota = Quota::new(100, Duration::from_secs(3600)).unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let limiter = limiter.clone();
        tasks.push(tokio::spawn(async move {
            let mut admitted = 0;
            for _ in 0..100 {
                admitted += u32::from(limiter.check("api", "user:1", quota).await.unwrap().allowed);
                tokio::task::yield_now().await;
            }
            admitted
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    assert_eq!(total, 100);
}
