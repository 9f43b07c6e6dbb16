//! The handlers of the routes that are not a crate's own: health, metrics, the
//! dashboard's snapshot, cached analytics, cache invalidation and broadcasts.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use upcoach_core::http::{ApiError, DEFAULT_JSON_LIMIT, query_param, read_json};

use upcoach_core::health::{Check, Status};

use crate::Body;
use crate::app::App;
use crate::router::{error, json};

/// `GET /api/analytics/security-events?window=1h`: security events counted by type over
/// the window (cached by the response layer: 300 s, tags `analytics` and `dashboard`).
pub(crate) async fn security_events(app: &Arc<App>, request: &Request<Incoming>) -> Response<Body> {
    let window_text = query_param(request.uri().query(), "window");
    let window_text = window_text.as_deref().unwrap_or("1h");
    let Some(window) = upcoach_core::event::parse_window(window_text) else {
        return error(&ApiError::bad_request(
            "invalid_window",
            "window is a number and s, m, h or d, at most 30d (1h, 30m, 7d)",
        ));
    };
    match security_counts(app, window).await {
        Ok(mut body) => {
            body["window"] = window_text.into();
            json(StatusCode::OK, &body)
        }
        Err(e) => {
            tracing::warn!(error = %e, "security event counts failed");
            error(&ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "event_log_unavailable",
                "the event log could not be read",
            ))
        }
    }
}

/// How long counted security events are shared between admins before a recount.
pub(crate) const SECURITY_COUNTS_TTL: Duration = Duration::from_secs(60);

/// The cache key of the security-event counts over `window`.
pub(crate) fn security_counts_key(window: Duration) -> String {
    format!("analytics:security-events:{}s", window.as_secs())
}

/// `{"since_ms","counts"}` over the last `window`: counted from the event log once per
/// [`SECURITY_COUNTS_TTL`] and shared by every admin (each admin's rendered answer is
/// then cached per user by the response layer).
pub(crate) async fn security_counts(
    app: &Arc<App>,
    window: Duration,
) -> Result<serde_json::Value, Box<dyn std::error::Error + Send + Sync>> {
    let bytes = app
        .cache
        .get_or_load(
            &security_counts_key(window),
            SECURITY_COUNTS_TTL,
            &["analytics"],
            || count_security_events(app.clone(), window),
        )
        .await?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// Counts security events over `window` from the event log, as cached bytes.
pub(crate) async fn count_security_events(
    app: Arc<App>,
    window: Duration,
) -> Result<bytes::Bytes, upcoach_core::event::EventLogError> {
    let now = std::time::SystemTime::now();
    let counts = upcoach_core::event::count_security_events(&*app.event_log, window, now).await?;
    Ok(serde_json::to_vec(&counts).unwrap_or_default().into())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InvalidateRequest {
    tags: Vec<String>,
}

/// `POST /api/cache/invalidate {"tags":[...]}`.
pub(crate) async fn invalidate(app: &Arc<App>, request: Request<Incoming>) -> Response<Body> {
    let body: InvalidateRequest = match read_json(request, DEFAULT_JSON_LIMIT).await {
        Ok(body) => body,
        Err(e) => return error(&e),
    };
    let tags: Vec<&str> = body.tags.iter().map(String::as_str).collect();
    if tags.is_empty() {
        return error(&ApiError::bad_request(
            "invalid_tags",
            "name at least one tag",
        ));
    }
    match app.cache.invalidate_tags(&tags).await {
        Ok(_) => json(StatusCode::OK, &serde_json::json!({ "invalidated": tags })),
        Err(e) => {
            if e.is_retryable() {
                tracing::warn!(error = %e, "tag invalidation failed");
            }
            error(&e)
        }
    }
}

/// `GET /metrics`: Prometheus text exposition.
pub(crate) fn metrics(app: &Arc<App>) -> Response<Body> {
    let body = Full::new(bytes::Bytes::from(app.perf.render_prometheus()));
    let mut response = Response::new(body.boxed());
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(upcoach_perf::CONTENT_TYPE),
    );
    response
}

/// `GET /api/dashboard/realtime/metrics`: the JSON snapshot.
pub(crate) fn dashboard_metrics(app: &Arc<App>) -> Response<Body> {
    let snapshot = app.perf.snapshot();
    let redis = app.backends.redis.as_ref().map(|redis| {
        serde_json::json!({ "state": redis.state().as_str(), "last_latency_ms": redis.last_latency().as_secs_f64() * 1000.0 })
    });
    json(
        StatusCode::OK,
        &serde_json::json!({
            "routes": snapshot.routes,
            "overall": snapshot.overall,
            "process": snapshot.process,
            "pools": pools(app),
            "redis": redis,
            "alerts": snapshot.alerts,
            "cache": app.cache.stats(),
            "realtime": app.hub.stats(),
            "event_log": app.event_log.stats(),
        }),
    )
}

/// The connection pools: `{}` in memory, else Postgres's size, idle, waiters and cap.
fn pools(app: &App) -> serde_json::Value {
    match &app.backends.postgres {
        None => serde_json::json!({}),
        Some(pool) => serde_json::json!({
            "postgres": { "size": pool.size(), "idle": pool.num_idle(), "waiting": pool.waiting(), "max": pool.max_connections() }
        }),
    }
}

/// What the `metrics` room receives every 5 s: the dashboard's headline figures, and
/// each route that had requests in the last minute with its rate and p95 there.
pub(crate) fn realtime_snapshot(app: &Arc<App>) -> serde_json::Value {
    let snapshot = app.perf.snapshot();
    let cache = app.cache.stats();
    let routes: Vec<_> = snapshot.routes.iter().filter_map(|r| r.recent()).collect();
    serde_json::json!({
        "routes": routes,
        "pools": pools(app),
        "overall": snapshot.overall,
        "process": snapshot.process,
        "alerts": snapshot.alerts,
        "cache": { "hit_rate": cache.hit_rate, "l1_hits": cache.l1_hits, "l2_hits": cache.l2_hits, "misses": cache.misses },
        "realtime": app.hub.stats(),
    })
}

/// `GET /health`: each configured dependency's status and latency; 503 when Postgres
/// or Redis is down. The cache fails open (its L2 down is degraded); realtime keeps
/// serving this process's events while its broker is away (degraded).
pub(crate) async fn health(app: &Arc<App>) -> Response<Body> {
    // Each probe at most once a second, shared (`App::probes`); boxed: kilobytes each.
    let ([pg, rd, l2], backends, cache) = (&app.probes, app.backends.clone(), app.cache.clone());
    let postgres = async {
        let pool = backends.postgres?;
        Some(Box::pin(pg.run(|| async move { upcoach_core::postgres::ping(&pool).await })).await)
    };
    let redis = async {
        let redis = backends.redis?;
        Some(Box::pin(rd.run(|| async move { redis.ping().await })).await)
    };
    let cache = l2.run(|| async move { cache.health().await });
    let (postgres, redis, cache) = tokio::join!(postgres, redis, cache);
    let cache = cache.failing_open();
    let realtime = app.hub.health_check();
    let status = [&postgres, &redis]
        .into_iter()
        .flatten()
        .map(|c| c.status)
        .fold(cache.status.worst(realtime.status), Status::worst);
    let code = match status {
        Status::Down => StatusCode::SERVICE_UNAVAILABLE,
        Status::Ok | Status::Degraded => StatusCode::OK,
    };
    let health = Health {
        status,
        checks: Checks {
            cache,
            postgres,
            realtime,
            redis,
        },
        version: env!("CARGO_PKG_VERSION"),
        uptime_s: app.started.elapsed().as_secs(),
    };
    // Load balancers poll this route: the body is written again only when it changes.
    app.health_body
        .response::<Full<bytes::Bytes>>(code, health)
        .map(BodyExt::boxed)
}

/// `GET /health`'s answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Health {
    status: Status,
    checks: Checks,
    version: &'static str,
    uptime_s: u64,
}

/// Each dependency's check; Postgres and Redis only when configured.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct Checks {
    cache: Check,
    #[serde(skip_serializing_if = "Option::is_none")]
    postgres: Option<Check>,
    realtime: upcoach_realtime::RealtimeCheck,
    #[serde(skip_serializing_if = "Option::is_none")]
    redis: Option<Check>,
}
