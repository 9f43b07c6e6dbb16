//! The performance routes: /metrics, the admin JSON snapshot, and the switch that turns
//! the timing layer off.

mod support;

use http::{Method, StatusCode};
use support::Running;
use upcoach_server::{Options, ServerConfig};

async fn dev_token(server: &Running, roles: &str) -> String {
    let answer = server
        .post("/dev/token", &format!(r#"{{"roles":{roles}}}"#))
        .await;
    answer.json["access_token"].as_str().unwrap().to_owned()
}

async fn get_with_token(server: &Running, path: &str, token: Option<&str>) -> support::Answer {
    support::request_with(server.addr, Method::GET, path, None, token).await
}

#[tokio::test]
async fn metrics_counts_requests_by_route_template() {
    let server = Running::start(ServerConfig::default(), Options::default()).await;
    for _ in 0..3 {
        server.get("/health").await;
    }
    server.get("/no/such/page").await;
    let text = support::get_text(server.addr, "/metrics").await;
    assert!(
        text.contains(r#"http_requests_total{method="GET",route="/health",status="2xx"} 3"#),
        "{text}"
    );
    assert!(
        text.contains(r#"http_requests_total{method="GET",route="unmatched",status="4xx"} 1"#),
        "{text}"
    );
    assert!(
        text.contains("# TYPE http_request_duration_seconds histogram"),
        "{text}"
    );
    assert!(
        text.contains("process_resident_memory_bytes "),
        "process gauges are exported:\n{text}"
    );
    for lost in ["cache_coherence_dropped 0", "slow_queries_redis_skipped 0"] {
        assert!(
            text.lines().any(|line| line.starts_with(lost)),
            "{lost} in:\n{text}"
        );
    }
    assert!(
        !text.contains("/no/such/page"),
        "raw paths never become labels"
    );
    server.stop().await;
}

#[tokio::test]
async fn the_router_s_match_is_the_route_recorded() {
    // Where the timing layer's own table would say otherwise, the router's word counts:
    // a 405 is `unmatched`, and `/auth/link/token` is a link (the table, in its order,
    // would take it for `/auth/{provider}/token`).
    let server = Running::start(ServerConfig::default(), Options::default()).await;
    let refused = support::request(server.addr, Method::GET, "/auth/refresh", None).await;
    assert_eq!(refused.status, StatusCode::METHOD_NOT_ALLOWED);
    let link = support::request(server.addr, Method::POST, "/auth/link/token", Some("{}")).await;
    assert_eq!(link.status, StatusCode::UNAUTHORIZED);
    let text = support::get_text(server.addr, "/metrics").await;
    for line in [
        r#"http_requests_total{method="GET",route="unmatched",status="4xx"} 1"#,
        r#"http_requests_total{method="POST",route="/auth/link/{provider}",status="4xx"} 1"#,
    ] {
        assert!(text.contains(line), "{line} in:\n{text}");
    }
    assert!(!text.contains(r#"route="/auth/refresh""#), "{text}");
    assert!(
        !text.contains(r#"route="/auth/{provider}/token""#),
        "{text}"
    );
    server.stop().await;
}

#[tokio::test]
async fn metrics_can_be_limited_to_admins() {
    let mut config = ServerConfig::default();
    config.metrics_public = false;
    let server = Running::start(
        config,
        Options {
            dev: true,
            ..Default::default()
        },
    )
    .await;
    let answer = get_with_token(&server, "/metrics", None).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    let admin = dev_token(&server, r#"["admin"]"#).await;
    let (status, _, body) = support::raw_with(server.addr, "/metrics", &admin).await;
    assert_eq!(status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&body).contains("# TYPE http_requests_total counter"));
    server.stop().await;
}

#[tokio::test]
async fn the_dashboard_snapshot_is_for_admins_only() {
    let server = Running::start(
        ServerConfig::default(),
        Options {
            dev: true,
            ..Default::default()
        },
    )
    .await;
    server.get("/health").await;

    let answer = get_with_token(&server, "/api/dashboard/realtime/metrics", None).await;
    assert_eq!(
        (answer.status, answer.json["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("token_missing"))
    );
    let answer = get_with_token(
        &server,
        "/api/dashboard/realtime/metrics",
        Some("not-a-jwt"),
    )
    .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    let coach = dev_token(&server, r#"["coach"]"#).await;
    let answer = get_with_token(&server, "/api/dashboard/realtime/metrics", Some(&coach)).await;
    assert_eq!(
        (answer.status, answer.json["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden"))
    );

    let admin = dev_token(&server, r#"["admin"]"#).await;
    let answer = get_with_token(&server, "/api/dashboard/realtime/metrics", Some(&admin)).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    let routes = answer.json["routes"].as_array().unwrap();
    let health = routes
        .iter()
        .find(|r| r["route"] == "/health" && r["method"] == "GET")
        .unwrap();
    assert_eq!(health["count"], 1);
    for field in ["p50_ms", "p95_ms", "p99_ms", "max_ms", "errors"] {
        assert!(health[field].is_number(), "{field} in {health}");
    }
    assert!(health["window"]["rate_per_s"].is_number());
    assert!(answer.json["process"]["rss_bytes"].as_u64().unwrap() > 0);
    assert!(answer.json["alerts"].as_array().unwrap().is_empty());
    server.stop().await;
}

#[tokio::test]
async fn with_monitoring_off_the_layer_records_nothing() {
    let mut config = ServerConfig::default();
    config.perf.enabled = false;
    let server = Running::start(config, Options::default()).await;
    server.get("/health").await;
    assert!(server.app.perf().requests().snapshot().is_empty());
    let text = support::get_text(server.addr, "/metrics").await;
    assert!(!text.contains("route=\"/health\""), "{text}");
    server.stop().await;
}

/// A database URL for the test's schema.
fn schema_url(schema: &upcoach_testing::PgSchema) -> upcoach_core::config::ServiceUrl {
    let mut url = url::Url::parse(schema.url()).unwrap();
    url.query_pairs_mut()
        .append_pair("options", &format!("-c search_path={}", schema.name()));
    upcoach_core::config::ServiceUrl::parse(url.as_str(), &["postgres"]).unwrap()
}

/// A `--dev` server on a fresh schema whose SQL is timed, slow from `threshold_ms`. Keep
/// the guard: it is the thread's subscriber (current-thread runtime, so it sees the
/// server's statements).
async fn timed_server(
    threshold_ms: u64,
) -> Option<(
    Running,
    tracing::subscriber::DefaultGuard,
    upcoach_testing::PgSchema,
)> {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;

    let schema = upcoach_testing::PgSchema::create().await?;
    let mut config = ServerConfig::default();
    config.services.database_url = Some(schema_url(&schema));
    config.perf.slow_query_threshold = std::time::Duration::from_millis(threshold_ms);
    let sinks = upcoach_server::PerfSinks::new(&config.perf);
    let layer = sinks
        .sql_layer()
        .with_filter(tracing_subscriber::filter::filter_fn(
            upcoach_perf::slow::SqlTimingLayer::wants,
        ));
    let guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));
    let options = Options {
        dev: true,
        sinks: Some(sinks),
        ..Default::default()
    };
    Some((Running::start(config, options).await, guard, schema))
}

#[tokio::test]
async fn slow_queries_are_listed_explained_and_recommended() {
    let Some((server, _guard, _schema)) = timed_server(200).await else {
        return;
    };
    let pool = server
        .app
        .backends()
        .postgres
        .clone()
        .unwrap()
        .inner()
        .clone();

    sqlx::query("SELECT pg_sleep(0.25)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("SELECT pg_sleep($1::float8), 'with a bind'")
        .bind(0.21f64)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("SELECT pg_sleep(0.01)")
        .execute(&pool)
        .await
        .unwrap();

    let admin = dev_token(&server, r#"["admin"]"#).await;
    let coach = dev_token(&server, r#"["coach"]"#).await;
    let denied = get_with_token(&server, "/api/performance/slow-queries", Some(&coach)).await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);

    let answer = get_with_token(
        &server,
        "/api/performance/slow-queries?explain=true",
        Some(&admin),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    assert_eq!(answer.json["threshold_ms"], 200);
    let digests = answer.json["digests"].as_array().unwrap();
    let names: Vec<&str> = digests
        .iter()
        .map(|d| d["digest"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"SELECT pg_sleep(?)"), "{names:?}");
    assert!(
        names.contains(&"SELECT pg_sleep(?::float8), ?"),
        "{names:?}"
    );
    let literal = digests
        .iter()
        .find(|d| d["digest"] == "SELECT pg_sleep(?)")
        .unwrap();
    assert_eq!(literal["count"], 1, "the 10 ms statement is not slow");
    for digest in digests
        .iter()
        .filter(|d| d["digest"].as_str().unwrap().contains("pg_sleep"))
    {
        assert!(
            digest["plan"][0]["Plan"]["Node Type"].is_string(),
            "a plan for {digest}"
        );
    }

    let answer = support::request_with(
        server.addr,
        Method::POST,
        "/api/performance/optimize",
        Some("{}"),
        Some(&admin),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    let kinds: Vec<&str> = answer.json["recommendations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.iter().filter(|k| **k == "slow_query").count() >= 2,
        "{}",
        answer.json
    );
    let action = &answer.json["actions"][0];
    assert_eq!(action["kind"], "warm_cache", "{}", answer.json);
    assert_eq!(action["loaded"], 3, "the three usual windows were counted");
    assert!(
        server
            .app
            .cache()
            .get("analytics:security-events:3600s")
            .await
            .unwrap()
            .is_some(),
        "the warmed counts are in the cache"
    );
    let again = support::request_with(
        server.addr,
        Method::POST,
        "/api/performance/optimize",
        Some("{}"),
        Some(&admin),
    )
    .await;
    assert_eq!(
        again.json["actions"][0]["already_cached"], 3,
        "warming twice loads nothing"
    );
    server.stop().await;
}

/// Requests queued for a Postgres connection show in the snapshot while they wait, and in
/// `/metrics` as the peak of the interval once the next sample is taken.
#[tokio::test]
async fn requests_waiting_for_a_database_connection_are_counted() {
    let Some(schema) = upcoach_testing::PgSchema::create().await else {
        return;
    };
    let mut config = ServerConfig::default();
    config.services.database_url = Some(schema_url(&schema));
    config.services.database_max_connections = 2;
    let options = Options {
        dev: true,
        ..Default::default()
    };
    let server = Running::start(config, options).await;
    let admin = dev_token(&server, r#"["admin"]"#).await;
    let pool = server.app.backends().postgres.clone().unwrap();
    let snapshot = || async {
        get_with_token(&server, "/api/dashboard/realtime/metrics", Some(&admin))
            .await
            .json["pools"]["postgres"]
            .clone()
    };
    let text = support::get_text(server.addr, "/metrics").await;
    assert!(text.contains("# TYPE db_pool_waiters gauge"), "{text}");
    assert!(text.contains("db_pool_waiters_peak "), "{text}");
    assert_eq!(snapshot().await["waiting"], 0);
    assert_eq!(snapshot().await["max"], 2);

    // Both connections held outside the pool's count, then two requests that need one.
    let held = [
        pool.inner().acquire().await.unwrap(),
        pool.inner().acquire().await.unwrap(),
    ];
    let requests: Vec<_> = (0..2)
        .map(|_| {
            let addr = server.addr;
            let admin = admin.clone();
            tokio::spawn(async move {
                support::request_with(addr, Method::GET, "/auth/me", None, Some(&admin)).await
            })
        })
        .collect();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(4);
    loop {
        let waiting = snapshot().await["waiting"].as_u64().unwrap();
        if waiting >= 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the snapshot showed {waiting} waiting"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    drop(held);
    for request in requests {
        let answer = request.await.unwrap();
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    }
    assert_eq!(snapshot().await["waiting"], 0);

    // The gauges are sampled every 5 s: the next sample reports the queue as its peak.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(12);
    loop {
        let text = support::get_text(server.addr, "/metrics").await;
        let peak = text
            .lines()
            .find_map(|line| line.strip_prefix("db_pool_waiters_peak "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap();
        if peak >= 2.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no sample showed the queue:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    server.stop().await;
}

/// EXPLAIN of a slow write never runs it, and a plan shows no literal.
#[tokio::test]
async fn explaining_a_slow_write_changes_nothing_and_shows_no_literal() {
    let Some((server, _guard, _schema)) = timed_server(100).await else {
        return;
    };
    let pool = server
        .app
        .backends()
        .postgres
        .clone()
        .unwrap()
        .inner()
        .clone();

    sqlx::query("CREATE TABLE counters (name text PRIMARY KEY, n int)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO counters VALUES ('hits', 0)")
        .execute(&pool)
        .await
        .unwrap();
    // Slow, with a literal in it.
    sqlx::query("UPDATE counters SET n = n + 1 WHERE name = 'hits' AND pg_sleep(0.15) IS NOT NULL")
        .execute(&pool)
        .await
        .unwrap();

    let admin = dev_token(&server, r#"["admin"]"#).await;
    for _ in 0..3 {
        let answer = get_with_token(
            &server,
            "/api/performance/slow-queries?explain=true",
            Some(&admin),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
        let update = answer.json["digests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["digest"].as_str().unwrap().starts_with("UPDATE counters"))
            .unwrap_or_else(|| panic!("no UPDATE digest in {}", answer.json))
            .clone();
        assert!(
            update["plan"][0]["Plan"]["Node Type"].is_string(),
            "{update}"
        );
        assert!(
            !update.to_string().contains("hits"),
            "no literal in the answer: {update}"
        );
    }
    let n: i32 = sqlx::query_scalar("SELECT n FROM counters WHERE name = 'hits'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 1, "explaining the UPDATE three times did not run it");
    server.stop().await;
}

#[tokio::test]
async fn security_event_analytics_are_cached_per_admin_and_invalidated_by_tag() {
    let server = Running::start(
        ServerConfig::default(),
        Options {
            dev: true,
            ..Default::default()
        },
    )
    .await;
    let record = |kind: &'static str| {
        server
            .app
            .event_log()
            .record(
                upcoach_core::event::SecurityEvent::new(kind, &upcoach_core::SystemClock).into(),
            )
            .unwrap();
    };
    for kind in ["login_failed", "login_failed", "login_succeeded"] {
        record(kind);
    }
    let admin = dev_token(&server, r#"["admin"]"#).await;
    let path = "/api/analytics/security-events?window=1h";

    let first = get_with_token(&server, path, Some(&admin)).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.json);
    assert_eq!(
        first.json["counts"][0],
        serde_json::json!({"event_type": "login_failed", "count": 2})
    );
    assert_eq!(first.headers["x-cache"], "MISS");
    let etag = first.headers["etag"].to_str().unwrap().to_owned();
    let second = get_with_token(&server, path, Some(&admin)).await;
    assert_eq!(second.headers["x-cache"], "HIT");
    assert_eq!(second.json, first.json);

    // A new event is not visible until the tag is invalidated.
    record("login_succeeded");
    assert_eq!(
        get_with_token(&server, path, Some(&admin)).await.json,
        first.json
    );
    let answer = support::request_with(
        server.addr,
        Method::POST,
        "/api/cache/invalidate",
        Some(r#"{"tags":["analytics"]}"#),
        Some(&admin),
    )
    .await;
    assert_eq!(
        answer.json,
        serde_json::json!({"invalidated": ["analytics"]})
    );
    let third = get_with_token(&server, path, Some(&admin)).await;
    assert_eq!(third.headers["x-cache"], "MISS");
    assert_ne!(third.headers["etag"].to_str().unwrap(), etag);
    assert_eq!(
        third.json["counts"][1]["count"], 2,
        "the new event is counted"
    );

    // Refusals, none of them cached.
    let bad = get_with_token(
        &server,
        "/api/analytics/security-events?window=forever",
        Some(&admin),
    )
    .await;
    assert_eq!(bad.json["error"]["code"], "invalid_window");
    let coach = dev_token(&server, r#"["coach"]"#).await;
    assert_eq!(
        get_with_token(&server, path, Some(&coach)).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        get_with_token(&server, path, None).await.status,
        StatusCode::UNAUTHORIZED
    );
    let empty = support::request_with(
        server.addr,
        Method::POST,
        "/api/cache/invalidate",
        Some(r#"{"tags":[]}"#),
        Some(&admin),
    )
    .await;
    assert_eq!(empty.json["error"]["code"], "invalid_tags");
    server.stop().await;
}
