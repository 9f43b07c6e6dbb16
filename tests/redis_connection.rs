//! The self-reconnecting Redis connection through a cut and a restore, and through a
//! link that goes silent without closing.

use std::time::Duration;

use upcoach_core::config::ServiceUrl;
use upcoach_core::redis::{RedisConnection, RedisOptions, RedisState};
use upcoach_testing::{FaultProxy, RedisPrefix};

/// A connection to the test's Redis through a fault proxy, with 300 ms timeouts.
async fn through_proxy(prefix: &RedisPrefix) -> (FaultProxy, RedisConnection) {
    let proxy = FaultProxy::start(upcoach_testing::service_addr(prefix.url())).await;
    let url = ServiceUrl::parse(
        &upcoach_testing::url_via(prefix.url(), proxy.addr()),
        &["redis"],
    )
    .unwrap();
    let options = RedisOptions {
        connection_timeout: Duration::from_millis(300),
        response_timeout: Duration::from_millis(300),
        reconnect_retries: 1,
    };
    let redis = RedisConnection::connect(&url, options).await.unwrap();
    (proxy, redis)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_by_itself_and_reports_its_state() {
    let Some(prefix) = RedisPrefix::create() else {
        return;
    };
    let (proxy, redis) = through_proxy(&prefix).await;
    assert_eq!(redis.state(), RedisState::Connected);
    redis.ping().await.unwrap();

    let key = prefix.key("greeting");
    let mut conn = redis.clone();
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("hi")
        .query_async(&mut conn)
        .await
        .unwrap();

    proxy.cut();
    assert!(redis.ping().await.is_err(), "the cut is seen");
    assert_eq!(redis.state(), RedisState::Disconnected);

    proxy.restore();
    let monitor = redis.spawn_monitor(Duration::from_millis(50));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while redis.state() != RedisState::Connected {
        assert!(
            tokio::time::Instant::now() < deadline,
            "reconnected within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    monitor.abort();
    let value: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        value, "hi",
        "the same handle works again after the reconnect"
    );
    assert!(proxy.forwarded() >= 2, "a new connection was made");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_that_goes_silent_is_replaced() {
    let Some(prefix) = RedisPrefix::create() else {
        return;
    };
    let (proxy, redis) = through_proxy(&prefix).await;
    let key = prefix.key("counter");
    let mut conn = redis.clone();
    let incr = async |conn: &mut RedisConnection| -> redis::RedisResult<u64> {
        redis::cmd("INCR").arg(&key).query_async(conn).await
    };
    assert_eq!(incr(&mut conn).await.unwrap(), 1);

    // The link stays open but nothing comes back: the manager alone would time out
    // on it for ever, since a timeout is not a closed connection.
    proxy.stall();
    let mut timeouts = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let value = loop {
        match incr(&mut conn).await {
            Ok(value) => break value,
            Err(e) => {
                assert!(e.is_timeout(), "{e}");
                timeouts += 1;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still failing after {timeouts} timeouts"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        timeouts >= upcoach_core::redis::STALL_TIMEOUTS,
        "{timeouts} timeouts"
    );
    assert!(
        (2..=3).contains(&value),
        "every INCR ran at most once more: {value}"
    );
    assert_eq!(redis.replacements(), 1);
    assert!(proxy.forwarded() >= 2, "a new link");
}

#[tokio::test]
async fn connect_fails_clearly_when_redis_is_unreachable() {
    // A port nothing listens on: bind one, learn its number, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = ServiceUrl::parse(&format!("redis://:pw@127.0.0.1:{port}"), &["redis"]).unwrap();
    let err = RedisConnection::connect(&url, RedisOptions::default())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    assert!(!text.contains(":pw@"), "no password in errors: {text}");
}
