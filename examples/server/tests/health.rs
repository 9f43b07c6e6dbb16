//! `GET /health` in in-memory mode and against real Redis and Postgres, up and down.

mod support;

use std::time::Duration;

use http::StatusCode;
use support::Running;
use upcoach_core::config::ServiceUrl;
use upcoach_core::health::{Check, Status};
use upcoach_server::{Options, ServerConfig};
use upcoach_testing::{FaultProxy, PgSchema, RedisPrefix};

#[tokio::test]
async fn in_memory_mode_is_healthy_and_reports_no_service_checks() {
    let server = Running::start(ServerConfig::default(), Options::default()).await;
    let answer = server.get("/health").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json["status"], "ok");
    let checks = answer.json["checks"].as_object().unwrap();
    let names: Vec<&String> = checks.keys().collect();
    assert_eq!(
        names,
        ["cache", "realtime"],
        "no postgres or redis check in memory mode"
    );
    assert_eq!(answer.json["checks"]["cache"]["status"], "ok");
    assert_eq!(answer.json["checks"]["realtime"]["status"], "ok");
    assert_eq!(
        answer.json["checks"]["realtime"]["broker"]["kind"],
        "memory"
    );
    assert_eq!(answer.json["version"], env!("CARGO_PKG_VERSION"));
    assert!(server.app.backends().postgres.is_none() && server.app.backends().redis.is_none());
    server.stop().await;
}

#[tokio::test]
async fn the_health_body_keeps_its_form_byte_for_byte() {
    // The bytes are what serde writes from the crates' types, keys in this order, no
    // spaces (the route keeps them while they stand). A field added to one of those types
    // shows up here.
    let server = Running::start(ServerConfig::default(), Options::default()).await;
    let answer = server.get("/health").await;
    assert_eq!(answer.headers["content-type"], "application/json");
    let text = std::str::from_utf8(&answer.body).unwrap();
    let cache = Check {
        status: Status::Ok,
        latency_ms: answer.json["checks"]["cache"]["latency_ms"]
            .as_f64()
            .unwrap(),
        error: None,
    };
    let expected = format!(
        r#"{{"status":"ok","checks":{{"cache":{},"realtime":{{"status":"ok","broker":{},"connections":{}}}}},"version":"{}","uptime_s":{}}}"#,
        serde(&cache),
        serde(&server.app.hub().broker_state()),
        serde(&server.app.hub().connection_counts()),
        env!("CARGO_PKG_VERSION"),
        answer.json["uptime_s"],
    );
    assert_eq!(text, expected);
    server.stop().await;
}

#[tokio::test]
async fn the_kept_health_body_follows_its_figures() {
    // The route keeps its last body while what it says stands: a connection opened or
    // closed between two polls must show in the second (`KeptJson`'s own tests hold the kept
    // body to the same bytes for the same figures).
    let dev = Options {
        dev: true,
        ..Options::default()
    };
    let server = Running::start(ServerConfig::default(), dev).await;
    let connections =
        |answer: &support::Answer| answer.json["checks"]["realtime"]["connections"].clone();
    let before = server.get("/health").await;
    assert_eq!(connections(&before), serde_json::json!({"ws": 0, "sse": 0}));
    let token = server.post("/dev/token", r#"{"roles":[]}"#).await;
    let token = token.json["access_token"].as_str().unwrap().to_owned();
    let ws = support::ws(&server, &token).await;
    sockets_counted(&server, 1).await;
    let open = server.get("/health").await;
    assert_eq!(connections(&open), serde_json::json!({"ws": 1, "sse": 0}));
    drop(ws);
    sockets_counted(&server, 0).await;
    let closed = server.get("/health").await;
    assert_eq!(connections(&closed), serde_json::json!({"ws": 0, "sse": 0}));
    server.stop().await;
}

/// Waits (at most 10 s) until the hub counts `n` WebSockets.
async fn sockets_counted(server: &Running, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while server.app.hub().connection_counts().ws != n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} sockets counted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What serde writes for `value`.
fn serde<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap()
}

/// A database URL that points at `addr` and puts every table in the test's schema.
fn schema_url(schema: &PgSchema, addr: std::net::SocketAddr) -> ServiceUrl {
    let mut url = url::Url::parse(&upcoach_testing::url_via(schema.url(), addr)).unwrap();
    url.query_pairs_mut()
        .append_pair("options", &format!("-c search_path={}", schema.name()));
    ServiceUrl::parse(url.as_str(), &["postgres", "postgresql"]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_services_health_reports_each_check_and_follows_outages() {
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    let Some(prefix) = RedisPrefix::create() else {
        return;
    };
    let pg_proxy = FaultProxy::start(upcoach_testing::service_addr(schema.url())).await;
    let redis_proxy = FaultProxy::start(upcoach_testing::service_addr(prefix.url())).await;

    let mut config = ServerConfig::default();
    // Every key the server writes (cache, realtime history) under the test's prefix,
    // which is deleted when the test ends.
    config.cache.prefix = prefix.prefix().trim_end_matches(':').to_owned();
    config.services.database_url = Some(schema_url(&schema, pg_proxy.addr()));
    config.services.redis_url = Some(
        ServiceUrl::parse(
            &upcoach_testing::url_via(prefix.url(), redis_proxy.addr()),
            &["redis"],
        )
        .unwrap(),
    );
    let server = Running::start(config, Options::default()).await;

    // The migrations ran at start, in the test's schema.
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = $1 AND table_name = 'security_events'",
    )
    .bind(schema.name())
    .fetch_one(schema.pool())
    .await
    .unwrap();
    assert_eq!(tables, 1);

    let answer = server.get("/health").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    assert_eq!(answer.json["status"], "ok");
    let text = std::str::from_utf8(&answer.body).unwrap();
    let at = |key: &str| text.find(&format!(r#""{key}":{{"status""#)).unwrap();
    assert!(
        at("cache") < at("postgres")
            && at("postgres") < at("realtime")
            && at("realtime") < at("redis"),
        "the checks in their order: {text}"
    );
    for check in ["postgres", "redis"] {
        assert_eq!(
            answer.json["checks"][check]["status"], "ok",
            "{}",
            answer.json
        );
        let latency = answer.json["checks"][check]["latency_ms"].as_f64().unwrap();
        assert!(
            latency > 0.0 && latency < 2000.0,
            "{check} latency {latency}"
        );
    }

    pg_proxy.cut();
    let answer = until(&server, |json| {
        json["checks"]["postgres"]["status"] == "down"
    })
    .await;
    assert_eq!(
        answer.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        answer.json
    );
    assert_eq!(answer.json["status"], "down");
    assert_eq!(answer.json["checks"]["postgres"]["status"], "down");
    assert!(
        ["unreachable", "timeout"]
            .contains(&answer.json["checks"]["postgres"]["error"].as_str().unwrap()),
        "{}",
        answer.json
    );
    assert_eq!(answer.json["checks"]["redis"]["status"], "ok");
    pg_proxy.restore();

    redis_proxy.cut();
    // The cache's probe (its L2 is this Redis) keeps its own second.
    let answer = until(&server, |json| {
        json["checks"]["redis"]["status"] == "down" && json["checks"]["cache"]["status"] != "ok"
    })
    .await;
    assert_eq!(
        answer.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        answer.json
    );
    assert_eq!(answer.json["checks"]["redis"]["status"], "down");
    assert_eq!(
        answer.json["checks"]["cache"]["status"], "degraded",
        "the cache fails open"
    );
    redis_proxy.restore();

    // Both come back by themselves.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let answer = server.get("/health").await;
        if answer.status == StatusCode::OK && answer.json["status"] == "ok" {
            assert_eq!(answer.json["checks"]["postgres"]["status"], "ok");
            assert_eq!(answer.json["checks"]["redis"]["status"], "ok");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "healthy again: {}",
            answer.json
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A cut closes the link: the manager reconnects it, nothing is replaced.
    assert_eq!(
        server.app.backends().redis.as_ref().unwrap().replacements(),
        0
    );
    let metrics = support::get_text(server.addr, "/metrics").await;
    let replaced = metrics
        .lines()
        .find_map(|l| l.strip_prefix("redis_links_replaced "))
        .and_then(|v| v.parse::<f64>().ok());
    assert_eq!(replaced, Some(0.0), "{metrics}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_service_that_does_not_answer_stops_the_start() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = ServerConfig::default();
    config.services.redis_url =
        Some(ServiceUrl::parse(&format!("redis://127.0.0.1:{port}"), &["redis"]).unwrap());
    let err = upcoach_server::App::start(config, Options::default())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );

    let mut config = ServerConfig::default();
    config.services.database_url = Some(
        ServiceUrl::parse(
            &format!("postgres://u:secretpw@127.0.0.1:{port}/db"),
            &["postgres"],
        )
        .unwrap(),
    );
    let err = upcoach_server::App::start(config, Options::default())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("Postgres") && !text.contains("secretpw"),
        "{text}"
    );
}

/// `/health` once `ready` holds of its body (or after 5 s): each probe runs at most
/// once a second (shared by every caller), so an outage shows within about a second.
async fn until(server: &Running, ready: impl Fn(&serde_json::Value) -> bool) -> support::Answer {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let answer = server.get("/health").await;
        if ready(&answer.json) || tokio::time::Instant::now() > deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
