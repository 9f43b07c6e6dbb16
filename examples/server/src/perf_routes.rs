//! `GET /api/performance/slow-queries` and `POST /api/performance/optimize`.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use upcoach_perf::advice::{self, CacheReads};
use upcoach_perf::slow::explain::slow_queries_report;

use crate::Body;
use crate::app::App;
use crate::router::json as json_response;

/// Whether `?explain=true` (or `1`) was asked.
fn wants_explain(request: &Request<Incoming>) -> bool {
    request.uri().query().is_some_and(|q| {
        q.split('&')
            .any(|pair| matches!(pair, "explain=true" | "explain=1"))
    })
}

/// `GET /api/performance/slow-queries[?explain=true]`.
pub(crate) async fn slow_queries(app: &Arc<App>, request: &Request<Incoming>) -> Response<Body> {
    let body = slow_queries_report(
        &app.slow_queries,
        app.backends.postgres.as_ref(),
        wants_explain(request),
    )
    .await;
    json_response(StatusCode::OK, &body)
}

/// `POST /api/performance/optimize`: what was measured and what could be done about it.
///
/// Nothing here changes schema, data or settings. The one action is safe and
/// reversible: it warms the shared security-event counts of the dashboard's usual
/// windows (1 h, 24 h, 7 d) into the cache, where they expire within a minute or go at
/// once with `POST /api/cache/invalidate {"tags":["analytics"]}`.
pub(crate) async fn optimize(app: &Arc<App>) -> Response<Body> {
    let cache = app.cache.stats();
    let recommendations = advice::recommendations(
        &app.slow_queries,
        app.backends.postgres.as_ref(),
        app.perf.requests(),
        Some(CacheReads {
            reads: cache.l1_hits + cache.l2_hits + cache.misses,
            hit_rate: cache.hit_rate,
        }),
    )
    .await;

    let windows = [3_600u64, 86_400, 7 * 86_400].map(Duration::from_secs);
    let keys: Vec<String> = windows
        .iter()
        .map(|w| crate::routes::security_counts_key(*w))
        .collect();
    let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let started = std::time::Instant::now();
    let warmed = app
        .cache
        .warm(
            &key_refs,
            crate::routes::SECURITY_COUNTS_TTL,
            &["analytics"],
            |key| {
                let window = windows[keys.iter().position(|k| *k == key).unwrap_or(0)];
                crate::routes::count_security_events(app.clone(), window)
            },
        )
        .await;
    let action = match warmed {
        Ok(loaded) => serde_json::json!({
            "kind": "warm_cache",
            "keys": keys,
            "loaded": loaded,
            "already_cached": keys.len() - loaded,
            "elapsed_ms": started.elapsed().as_secs_f64() * 1000.0,
            "expires_in_s": crate::routes::SECURITY_COUNTS_TTL.as_secs(),
            "undo": "POST /api/cache/invalidate {\"tags\":[\"analytics\"]}",
        }),
        Err(e) => {
            tracing::warn!(error = %e, "warming the security-event counts failed");
            serde_json::json!({
                "kind": "warm_cache",
                "keys": keys,
                "failed": "the event log or the cache could not be read; nothing changed",
            })
        }
    };

    json_response(
        StatusCode::OK,
        &serde_json::json!({
            "recommendations": recommendations,
            "actions": [action],
        }),
    )
}
