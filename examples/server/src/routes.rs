//! Routing and the handlers of the routes built so far.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use upcoach_core::{Principal, Role, UserId};

use crate::Body;
use crate::app::App;
use crate::http_util::{ApiError, json_response, read_json};

/// Every route template the server serves, for the timing layer's labels.
pub(crate) const TEMPLATES: &[&str] = &[
    "/health",
    "/metrics",
    "/dev/token",
    "/api/dashboard/realtime/metrics",
    "/api/performance/slow-queries",
    "/api/performance/optimize",
    "/api/analytics/security-events",
    "/api/cache/invalidate",
    "/api/dashboard/realtime/sse",
    "/api/dashboard/realtime/ws",
    "/api/dashboard/realtime/status",
    "/api/dashboard/realtime/broadcast/{room}",
    "/auth/{provider}/authorize",
    "/auth/{provider}/callback",
    "/auth/{provider}/token",
    "/auth/exchange",
    "/auth/refresh",
    "/auth/logout",
    "/auth/me",
    "/auth/link/{provider}",
    "/.well-known/jwks.json",
];

/// The largest body `POST .../broadcast/{room}` reads.
const BROADCAST_BODY_LIMIT: usize = 64 * 1024 + 1024;

/// How long one health check may take before it counts as down.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// A check slower than this is reported as degraded.
const CHECK_SLOW: Duration = Duration::from_millis(250);
/// The largest body `/dev/token` reads.
const DEV_TOKEN_BODY_LIMIT: usize = 16 * 1024;

pub(crate) async fn handle(app: Arc<App>, request: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = match route(&app, request).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    let status = response.status();
    if status.is_server_error() {
        tracing::warn!(%method, %path, status = status.as_u16(), elapsed = ?started.elapsed(), "request failed");
    } else {
        tracing::debug!(%method, %path, status = status.as_u16(), elapsed = ?started.elapsed(), "request");
    }
    response
}

async fn route(app: &Arc<App>, request: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let method = request.method();
    match request.uri().path() {
        "/health" => match *method {
            Method::GET | Method::HEAD => Ok(health(app).await),
            _ => Err(method_not_allowed("GET")),
        },
        "/metrics" => match *method {
            Method::GET | Method::HEAD => {
                if !app.config.metrics_public {
                    admin(app, &request).await?;
                }
                Ok(metrics(app))
            }
            _ => Err(method_not_allowed("GET")),
        },
        "/api/dashboard/realtime/metrics" => match *method {
            Method::GET => {
                admin(app, &request).await?;
                Ok(dashboard_metrics(app))
            }
            _ => Err(method_not_allowed("GET")),
        },
        "/api/performance/slow-queries" => match *method {
            Method::GET => {
                admin(app, &request).await?;
                Ok(crate::perf_routes::slow_queries(app, &request).await)
            }
            _ => Err(method_not_allowed("GET")),
        },
        "/api/performance/optimize" => match *method {
            Method::POST => {
                admin(app, &request).await?;
                Ok(crate::perf_routes::optimize(app).await)
            }
            _ => Err(method_not_allowed("POST")),
        },
        "/api/analytics/security-events" => match *method {
            Method::GET | Method::HEAD => {
                admin(app, &request).await?;
                security_events(app, &request).await
            }
            _ => Err(method_not_allowed("GET")),
        },
        "/api/cache/invalidate" => match *method {
            Method::POST => {
                admin(app, &request).await?;
                invalidate(app, request).await
            }
            _ => Err(method_not_allowed("POST")),
        },
        "/api/dashboard/realtime/ws" => Ok(app.hub.websocket(request).await),
        "/api/dashboard/realtime/sse" => match *method {
            Method::GET => Ok(app.hub.sse(request).await),
            _ => Err(method_not_allowed("GET")),
        },
        "/api/dashboard/realtime/status" => match *method {
            Method::GET => {
                admin(app, &request).await?;
                Ok(json_response(StatusCode::OK, &app.hub.status()))
            }
            _ => Err(method_not_allowed("GET")),
        },
        path if path.starts_with("/api/dashboard/realtime/broadcast/") => match *method {
            Method::POST => broadcast(app, request).await,
            _ => Err(method_not_allowed("POST")),
        },
        "/.well-known/jwks.json" => match *method {
            Method::GET => match &app.tokens {
                Some(tokens) => {
                    let mut response = json_response(StatusCode::OK, &tokens.jwks());
                    response.headers_mut().insert(
                        http::header::CACHE_CONTROL,
                        http::HeaderValue::from_static("public, max-age=300"),
                    );
                    Ok(response)
                }
                None => Ok(json_response(
                    StatusCode::OK,
                    &serde_json::json!({"keys": []}),
                )),
            },
            _ => Err(method_not_allowed("GET")),
        },
        path if path.starts_with("/auth/") => crate::auth_routes::route(app, request).await,
        // Only exists in --dev mode: otherwise it is an unknown route like any other.
        "/dev/token" if app.options.dev => match *method {
            Method::POST => dev_token(app, request).await,
            _ => Err(method_not_allowed("POST")),
        },
        _ => Err(ApiError::not_found()),
    }
}

/// The caller's principal from `Authorization: Bearer`, if it is an admin.
async fn admin(app: &Arc<App>, request: &Request<Incoming>) -> Result<Principal, ApiError> {
    let principal = crate::auth_routes::bearer(app, request).await?;
    if !principal.is_admin() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this route needs the admin role",
        ));
    }
    Ok(principal)
}

/// `1h`, `30m`, `7d`, `90s`: at most 30 days.
fn parse_window(text: &str) -> Option<Duration> {
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = number.parse().ok().filter(|n| *n > 0)?;
    let seconds = match unit {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86_400)?,
        _ => return None,
    };
    (seconds <= 30 * 86_400).then(|| Duration::from_secs(seconds))
}

/// `GET /api/analytics/security-events?window=1h`: security events counted by type over
/// the window (cached by the response layer: 300 s, tags `analytics` and `dashboard`).
async fn security_events(
    app: &Arc<App>,
    request: &Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let window_text = request
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("window=")))
        .unwrap_or("1h");
    let window = parse_window(window_text).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_window",
            "window is a number and s, m, h or d, at most 30d (1h, 30m, 7d)",
        )
    })?;
    let counts = security_counts(app, window).await.map_err(|e| {
        tracing::warn!(error = %e, "security event counts failed");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "event_log_unavailable",
            "the event log could not be read",
        )
    })?;
    let mut body = counts;
    body["window"] = window_text.into();
    Ok(json_response(StatusCode::OK, &body))
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
    let since = std::time::SystemTime::now() - window;
    let counts = app.event_log.security_event_counts(since).await?;
    let since_ms = since
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let body = serde_json::json!({ "since_ms": since_ms, "counts": counts });
    Ok(bytes::Bytes::from(body.to_string()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InvalidateRequest {
    tags: Vec<String>,
}

/// `POST /api/cache/invalidate {"tags":[...]}`.
async fn invalidate(
    app: &Arc<App>,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body: InvalidateRequest = read_json(request.into_body(), 16 * 1024).await?;
    let tags: Vec<&str> = body.tags.iter().map(String::as_str).collect();
    if tags.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_tags",
            "name at least one tag",
        ));
    }
    app.cache
        .invalidate_tags(&tags)
        .await
        .map_err(|e| match e {
            upcoach_cache::Error::InvalidTag { reason } => {
                ApiError::bad_request("invalid_tags", reason)
            }
            e => {
                tracing::warn!(error = %e, "tag invalidation failed");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cache_unavailable",
                    "the cache could not be reached",
                )
            }
        })?;
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({ "invalidated": tags }),
    ))
}

/// `GET /metrics`: Prometheus text exposition.
fn metrics(app: &Arc<App>) -> Response<Body> {
    let mut response = Response::new(crate::http_util::full(app.perf.render_prometheus()));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(upcoach_perf::CONTENT_TYPE),
    );
    response
}

/// `GET /api/dashboard/realtime/metrics`: the JSON snapshot.
fn dashboard_metrics(app: &Arc<App>) -> Response<Body> {
    let snapshot = app.perf.snapshot();
    let pools = app.backends.postgres.as_ref().map(|pool| {
        serde_json::json!({
            "postgres": { "size": pool.size(), "idle": pool.num_idle(), "waiting": pool.waiting(), "max": pool.max_connections() }
        })
    });
    let redis = app.backends.redis.as_ref().map(|redis| {
        serde_json::json!({ "state": redis.state().as_str(), "last_latency_ms": redis.last_latency().as_secs_f64() * 1000.0 })
    });
    json_response(
        StatusCode::OK,
        &serde_json::json!({
            "routes": snapshot.routes,
            "overall": snapshot.overall,
            "process": snapshot.process,
            "pools": pools.unwrap_or_else(|| serde_json::json!({})),
            "redis": redis,
            "alerts": snapshot.alerts,
            "cache": app.cache.stats(),
            "realtime": app.hub.stats(),
            "event_log": app.event_log.stats(),
        }),
    )
}

/// What the `metrics` room receives every 5 s: the dashboard's headline figures.
pub(crate) fn realtime_snapshot(app: &Arc<App>) -> serde_json::Value {
    let snapshot = app.perf.snapshot();
    let cache = app.cache.stats();
    serde_json::json!({
        "overall": snapshot.overall,
        "process": snapshot.process,
        "alerts": snapshot.alerts,
        "cache": { "hit_rate": cache.hit_rate, "l1_hits": cache.l1_hits, "l2_hits": cache.l2_hits, "misses": cache.misses },
        "realtime": app.hub.stats(),
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BroadcastBody {
    event: String,
    #[serde(default)]
    data: serde_json::Value,
}

/// `POST /api/dashboard/realtime/broadcast/{room}`: 202 `{"room","seq"}`.
async fn broadcast(app: &Arc<App>, request: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    admin(app, &request).await?;
    let room = request
        .uri()
        .path()
        .trim_start_matches("/api/dashboard/realtime/broadcast/")
        .to_owned();
    let body: BroadcastBody = read_json(request.into_body(), BROADCAST_BODY_LIMIT).await?;
    match app.hub.publish(&room, &body.event, body.data).await {
        Ok(event) => Ok(json_response(
            StatusCode::ACCEPTED,
            &serde_json::json!({ "room": event.room, "seq": event.seq }),
        )),
        Err(e) => {
            let status = match &e {
                upcoach_realtime::Error::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                e if e.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::BAD_REQUEST,
            };
            if status == StatusCode::SERVICE_UNAVAILABLE {
                tracing::warn!(error = %e, room, "a broadcast failed");
            }
            let message = if status == StatusCode::SERVICE_UNAVAILABLE {
                "the realtime broker is unavailable; retry".to_owned()
            } else {
                e.to_string()
            };
            Err(ApiError::new(status, e.code(), message))
        }
    }
}

fn method_not_allowed(allowed: &'static str) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("this route accepts {allowed}"),
    )
}

#[derive(Debug, Serialize)]
struct Check {
    status: &'static str,
    latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'static str>,
}

impl Check {
    fn from_result<E>(result: Result<Result<Duration, E>, tokio::time::error::Elapsed>) -> Self {
        match result {
            Ok(Ok(latency)) => Check {
                status: if latency > CHECK_SLOW {
                    "degraded"
                } else {
                    "ok"
                },
                latency_ms: (latency.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0,
                error: None,
            },
            Ok(Err(_)) => Check {
                status: "down",
                latency_ms: 0.0,
                error: Some("unreachable"),
            },
            Err(_) => Check {
                status: "down",
                latency_ms: CHECK_TIMEOUT.as_secs_f64() * 1000.0,
                error: Some("timeout"),
            },
        }
    }
}

/// The body of `GET /health`, serialized straight from these types: the route is polled
/// by load balancers, so it builds no JSON tree.
#[derive(Debug, Serialize)]
struct HealthBody {
    status: &'static str,
    checks: HealthChecks,
    version: &'static str,
    uptime_s: u64,
}

#[derive(Debug, Serialize)]
struct HealthChecks {
    cache: Check,
    #[serde(skip_serializing_if = "Option::is_none")]
    postgres: Option<Check>,
    realtime: RealtimeCheck,
    #[serde(skip_serializing_if = "Option::is_none")]
    redis: Option<Check>,
}

#[derive(Debug, Serialize)]
struct RealtimeCheck {
    status: &'static str,
    broker: upcoach_realtime::BrokerState,
    connections: upcoach_realtime::ConnectionCounts,
}

/// `GET /health`: each configured dependency's status and latency; 503 when a required
/// dependency is down. In-memory mode has no dependency to check.
async fn health(app: &Arc<App>) -> Response<Body> {
    let postgres = async {
        match &app.backends.postgres {
            Some(pool) => Some(Check::from_result(
                tokio::time::timeout(CHECK_TIMEOUT, upcoach_core::postgres::ping(pool)).await,
            )),
            None => None,
        }
    };
    let redis = async {
        match &app.backends.redis {
            Some(redis) => Some(Check::from_result(
                tokio::time::timeout(CHECK_TIMEOUT, redis.ping()).await,
            )),
            None => None,
        }
    };
    let cache =
        async { Check::from_result(tokio::time::timeout(CHECK_TIMEOUT, app.cache.health()).await) };
    let (postgres, redis, mut cache) = tokio::join!(postgres, redis, cache);
    // The cache fails open: its L2 being unreachable slows the service, it does not stop
    // it.
    if cache.status == "down" {
        cache.status = "degraded";
    }
    // Realtime keeps serving what this process publishes when its broker link is down,
    // and repairs the hole when it returns: degraded, not down.
    let broker = app.hub.broker_state();
    let realtime = RealtimeCheck {
        status: if broker.connected { "ok" } else { "degraded" },
        broker,
        connections: app.hub.connection_counts(),
    };
    let status = [
        postgres.as_ref().map(|c| c.status),
        redis.as_ref().map(|c| c.status),
        Some(cache.status),
        Some(realtime.status),
    ]
    .into_iter()
    .flatten()
    .fold("ok", |worst, status| match (worst, status) {
        (_, "down") | ("down", _) => "down",
        (_, "degraded") | ("degraded", _) => "degraded",
        _ => "ok",
    });
    let body = HealthBody {
        status,
        checks: HealthChecks {
            cache,
            postgres,
            realtime,
            redis,
        },
        version: env!("CARGO_PKG_VERSION"),
        uptime_s: app.started.elapsed().as_secs(),
    };
    let code = if status == "down" {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    json_response(code, &body)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DevTokenRequest {
    /// A user id (UUID); a new one when absent.
    sub: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
}

/// `POST /dev/token` (`--dev` only): an access token for any user and roles.
async fn dev_token(app: &Arc<App>, request: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    app.tokens.as_ref().ok_or_else(ApiError::not_found)?;
    let body: DevTokenRequest = read_json(request.into_body(), DEV_TOKEN_BODY_LIMIT).await?;
    let user_id = match &body.sub {
        Some(sub) => sub
            .parse::<UserId>()
            .map_err(|e| ApiError::bad_request("invalid_sub", e.to_string()))?,
        None => UserId::new(),
    };
    if body.roles.len() > 16 {
        return Err(ApiError::bad_request("invalid_roles", "at most 16 roles"));
    }
    let mut roles = Vec::with_capacity(body.roles.len());
    for role in &body.roles {
        let role: Role = role
            .parse()
            .map_err(|e: upcoach_core::principal::InvalidRole| {
                ApiError::bad_request("invalid_roles", e.to_string())
            })?;
        if !roles.contains(&role) {
            roles.push(role);
        }
    }
    // Roles of an existing user stay as they are; a new one gets the asked roles.
    let mut user = app
        .auth
        .users
        .provision(user_id, &roles)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.code(), e.to_string()))?;
    if user.roles != roles {
        user = app
            .auth
            .users
            .set_roles(user_id, &roles)
            .await
            .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.code(), e.to_string()))?;
    }
    Ok(json_response(
        StatusCode::OK,
        &crate::auth_routes::open_session(app, &user).await?,
    ))
}
