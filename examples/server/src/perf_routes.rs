//! `GET /api/performance/slow-queries` and `POST /api/performance/optimize`.

use std::ops::Not;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Serialize;
use upcoach_core::postgres::MeteredPool;
use upcoach_perf::slow::SlowDigest;

use crate::Body;
use crate::app::App;
use crate::http_util::json_response;

/// Digests given a plan per request at most (each plan is one round trip).
const MAX_EXPLAINED: usize = 10;

#[derive(Debug, Serialize)]
struct ExplainedDigest {
    #[serde(flatten)]
    digest: SlowDigest,
    #[serde(skip_serializing_if = "Option::is_none")]
    plan: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    plan_error: Option<&'static str>,
}

/// Whether `?explain=true` (or `1`) was asked.
fn wants_explain(request: &Request<Incoming>) -> bool {
    request.uri().query().is_some_and(|q| {
        q.split('&')
            .any(|pair| matches!(pair, "explain=true" | "explain=1"))
    })
}

/// The plan of `sql`, never executing it: `EXPLAIN` without `ANALYZE`, in a read-only
/// transaction with a 2 s statement timeout, on a connection of its own that is closed
/// afterwards (so no session state it leaves can reach another request). A statement
/// with bind parameters is prepared and its *generic* plan explained (what Postgres 16
/// calls `EXPLAIN (GENERIC_PLAN)`), so no value has to be made up.
///
/// Only the shape of the plan is returned (node types, relations, indexes, estimated
/// costs and rows): conditions and outputs can hold the statement's literals. Errors are
/// reported by a fixed reason, never the database's text.
pub(crate) async fn explain(
    pool: &MeteredPool,
    sql: &str,
) -> Result<serde_json::Value, &'static str> {
    if has_statement_separator(sql) {
        return Err(
            "the statement holds ';' outside a literal; only single statements are explained",
        );
    }
    let params = max_bind_parameter(sql);
    let mut conn = pool
        .acquire()
        .await
        .map_err(|_| "no database connection was available")?;
    // Never back to the pool, even if this request is dropped halfway, yet counted
    // against its size until closed.
    conn.close_on_drop();
    let plan = async {
        for setup in [
            "BEGIN READ ONLY",
            "SET LOCAL statement_timeout = '2s'",
            "SET LOCAL plan_cache_mode = force_generic_plan",
        ] {
            sqlx::raw_sql(setup).execute(&mut *conn).await.map_err(|_| "could not open a read-only transaction")?;
        }
        let script = if params == 0 {
            format!("EXPLAIN (FORMAT JSON) {sql}")
        } else {
            // Simple-query protocol: the $n inside PREPARE belong to the prepared statement.
            let nulls = vec!["NULL"; params].join(", ");
            format!("PREPARE upcoach_explain AS {sql}; EXPLAIN (FORMAT JSON) EXECUTE upcoach_explain({nulls})")
        };
        let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(script))
            .fetch_all(&mut *conn)
            .await
            .map_err(|_| "Postgres could not plan the statement")?;
        use sqlx::Row;
        rows.last()
            .and_then(|row| row.try_get::<serde_json::Value, _>(0).ok())
            .ok_or("Postgres returned no plan")
    }
    .await;
    let _ = conn.close().await;
    plan.map(|plan| plan_shape(&plan))
}

/// The fields of a plan node that describe its shape and cost, never its conditions.
const PLAN_FIELDS: [&str; 10] = [
    "Node Type",
    "Relation Name",
    "Index Name",
    "Join Type",
    "Strategy",
    "Parent Relationship",
    "Startup Cost",
    "Total Cost",
    "Plan Rows",
    "Plan Width",
];

/// A plan with only [`PLAN_FIELDS`] kept, recursively through `Plan` and `Plans`.
fn plan_shape(plan: &serde_json::Value) -> serde_json::Value {
    match plan {
        serde_json::Value::Array(items) => items.iter().map(plan_shape).collect(),
        serde_json::Value::Object(map) => {
            let mut out = serde_json::Map::new();
            for (key, value) in map {
                if key == "Plan" || key == "Plans" {
                    out.insert(key.clone(), plan_shape(value));
                } else if PLAN_FIELDS.contains(&key.as_str()) {
                    out.insert(key.clone(), value.clone());
                }
            }
            serde_json::Value::Object(out)
        }
        _ => serde_json::Value::Null,
    }
}

/// Whether `sql` has a `;` outside quotes and comments (a second statement).
fn has_statement_separator(sql: &str) -> bool {
    let bytes = sql.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\'' | b'"' => {
                let quote = bytes[i];
                i += 1;
                while i < bytes.len() && bytes[i] != quote {
                    i += 1;
                }
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                // A comment could hide anything: refuse it rather than parse nesting.
                return true;
            }
            b'$' if !bytes.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                // Dollar-quoted bodies: refuse rather than parse them.
                return true;
            }
            b';' => return sql[i + 1..].trim().is_empty().not(),
            _ => {}
        }
        i += 1;
    }
    false
}

/// The highest `$n` in `sql` outside quotes (0 when none).
fn max_bind_parameter(sql: &str) -> usize {
    let bytes = sql.as_bytes();
    let mut max = 0;
    let mut i = 0;
    let mut quoted = false;
    while i < bytes.len() {
        match bytes[i] {
            b'\'' => quoted = !quoted,
            b'$' if !quoted => {
                let start = i + 1;
                let mut end = start;
                while end < bytes.len() && bytes[end].is_ascii_digit() {
                    end += 1;
                }
                if end > start {
                    max = max.max(sql[start..end].parse().unwrap_or(0));
                }
                i = end;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    max
}

/// `GET /api/performance/slow-queries[?explain=true]`.
pub(crate) async fn slow_queries(app: &Arc<App>, request: &Request<Incoming>) -> Response<Body> {
    let digests = app.slow_queries.digests();
    let explain_them = wants_explain(request);
    let mut out = Vec::with_capacity(digests.len());
    for (i, digest) in digests.into_iter().enumerate() {
        let (plan, plan_error) = match (&app.backends.postgres, explain_them && i < MAX_EXPLAINED) {
            (Some(pool), true) => match app.slow_queries.sample(&digest.digest) {
                Some(sql) => match explain(pool, &sql).await {
                    Ok(plan) => (Some(plan), None),
                    Err(e) => (None, Some(e)),
                },
                None => (None, Some("the statement is no longer kept")),
            },
            (None, true) => (None, Some("no database is configured")),
            _ => (None, None),
        };
        out.push(ExplainedDigest {
            digest,
            plan,
            plan_error,
        });
    }
    json_response(
        StatusCode::OK,
        &serde_json::json!({
            "threshold_ms": app.slow_queries.threshold().as_millis() as u64,
            "digests": out,
        }),
    )
}

/// Node types in a plan, for a recommendation's one-line reason.
fn plan_nodes(plan: &serde_json::Value, out: &mut Vec<String>) {
    match plan {
        serde_json::Value::Object(map) => {
            if let Some(node) = map.get("Node Type").and_then(|n| n.as_str()) {
                let relation = map.get("Relation Name").and_then(|r| r.as_str());
                out.push(match relation {
                    Some(rel) => format!("{node} on {rel}"),
                    None => node.to_owned(),
                });
            }
            for value in map.values() {
                plan_nodes(value, out);
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| plan_nodes(v, out)),
        _ => {}
    }
}

/// `POST /api/performance/optimize`: what was measured and what could be done about it.
///
/// Nothing here changes schema, data or settings. The one action is safe and
/// reversible: it warms the shared security-event counts of the dashboard's usual
/// windows (1 h, 24 h, 7 d) into the cache, where they expire within a minute or go at
/// once with `POST /api/cache/invalidate {"tags":["analytics"]}`.
pub(crate) async fn optimize(app: &Arc<App>) -> Response<Body> {
    let mut recommendations = Vec::new();

    for digest in app.slow_queries.digests().into_iter().take(5) {
        let mut reason = format!(
            "{} ran slower than {} ms {} times (p95 {} ms, max {} ms)",
            digest.digest,
            app.slow_queries.threshold().as_millis(),
            digest.count,
            digest.p95_ms,
            digest.max_ms
        );
        let mut plan = None;
        if let (Some(pool), Some(sql)) = (
            &app.backends.postgres,
            app.slow_queries.sample(&digest.digest),
        ) && let Ok(p) = explain(pool, &sql).await
        {
            let mut nodes = Vec::new();
            plan_nodes(&p, &mut nodes);
            if nodes.iter().any(|n| n.starts_with("Seq Scan")) {
                reason.push_str(
                    "; the plan scans whole tables: an index on the filtered columns may help",
                );
            }
            plan = Some(nodes);
        }
        recommendations.push(serde_json::json!({
            "kind": "slow_query",
            "digest": digest.digest,
            "count": digest.count,
            "p95_ms": digest.p95_ms,
            "plan_nodes": plan,
            "advice": reason,
        }));
    }

    let mut routes = app.perf.requests().snapshot();
    routes.retain(|r| r.count >= 10 && r.route != upcoach_perf::UNMATCHED);
    routes.sort_by(|a, b| b.latency.p95_ms.total_cmp(&a.latency.p95_ms));
    for route in routes.into_iter().take(3) {
        let slow = route.latency.p95_ms >= 500.0;
        recommendations.push(serde_json::json!({
            "kind": "slow_route",
            "method": route.method,
            "route": route.route,
            "count": route.count,
            "p95_ms": route.latency.p95_ms,
            "advice": if slow {
                format!("{} {} has p95 {} ms: cache its response or look at its queries", route.method, route.route, route.latency.p95_ms)
            } else {
                format!("{} {} is among the slowest routes (p95 {} ms), within budget", route.method, route.route, route.latency.p95_ms)
            },
        }));
    }

    let cache = app.cache.stats();
    let reads = cache.l1_hits + cache.l2_hits + cache.misses;
    if reads >= upcoach_perf::MIN_REQUESTS_FOR_ERROR_RATE && cache.hit_rate < 0.8 {
        recommendations.push(serde_json::json!({
            "kind": "cache_hit_rate",
            "hit_rate": cache.hit_rate,
            "reads": reads,
            "advice": format!(
                "the cache answers {:.0} % of {reads} reads (under 80 %): longer TTLs or fewer tag invalidations would help",
                cache.hit_rate * 100.0
            ),
        }));
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_single_statements_are_explained() {
        assert!(!has_statement_separator("SELECT 1"));
        assert!(!has_statement_separator("SELECT 1;"));
        assert!(!has_statement_separator("SELECT ';' FROM t"));
        assert!(has_statement_separator("SELECT 1; COMMIT"));
        assert!(has_statement_separator("SELECT 1 /* ; */"));
        assert!(has_statement_separator("SELECT $$;$$"));
    }

    #[test]
    fn plans_keep_their_shape_and_lose_their_conditions() {
        let plan = serde_json::json!([{"Plan": {
            "Node Type": "Seq Scan", "Relation Name": "users", "Total Cost": 1.5,
            "Filter": "(email = 'a@b.c'::text)", "Output": ["secret"],
            "Plans": [{"Node Type": "Index Scan", "Index Cond": "(id = 42)"}]
        }}]);
        let shape = plan_shape(&plan);
        let text = shape.to_string();
        assert!(
            !text.contains("a@b.c") && !text.contains("42") && !text.contains("secret"),
            "{text}"
        );
        assert_eq!(shape[0]["Plan"]["Node Type"], "Seq Scan");
        assert_eq!(shape[0]["Plan"]["Plans"][0]["Node Type"], "Index Scan");
    }

    #[test]
    fn bind_parameters_are_counted_outside_quotes() {
        assert_eq!(max_bind_parameter("SELECT 1"), 0);
        assert_eq!(max_bind_parameter("SELECT $1, $12, $3"), 12);
        assert_eq!(max_bind_parameter("SELECT '$9' WHERE x = $2"), 2);
    }
}
