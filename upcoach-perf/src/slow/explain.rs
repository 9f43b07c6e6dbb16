//! Plans of slow statements (feature `postgres`): [`explain`] one statement without
//! running it, and [`slow_queries_report`] for the whole slow-query list, each digest
//! with its plan.
//!
//! ```no_run
//! use std::time::Duration;
//! use upcoach_core::postgres::MeteredPool;
//! use upcoach_perf::slow::SlowQueryLog;
//! use upcoach_perf::slow::explain::{explain, plan_nodes, slow_queries_report};
//!
//! # async fn run(pool: MeteredPool) {
//! let plan = explain(&pool, "SELECT * FROM users WHERE email = $1").await.unwrap();
//! println!("{:?}", plan_nodes(&plan)); // ["Seq Scan on users"]
//!
//! // The body of `GET /api/performance/slow-queries?explain=true`.
//! let log = SlowQueryLog::new(Duration::from_millis(200), 100);
//! let body = slow_queries_report(&log, Some(&pool), true).await;
//! assert_eq!(body["threshold_ms"], 200);
//! # }
//! ```

use std::ops::Not;

use serde::Serialize;
use serde_json::Value;
use upcoach_core::postgres::MeteredPool;

use super::{SlowDigest, SlowQueryLog};

/// Digests given a plan per [`slow_queries_report`] at most (each plan is one round
/// trip).
pub const MAX_EXPLAINED: usize = 10;

/// The plan of `sql`, never executing it: `EXPLAIN` without `ANALYZE`, in a read-only
/// transaction with a 2 s statement timeout, on a connection of its own that is closed
/// afterwards (so no session state it leaves can reach another request). A statement
/// with bind parameters is prepared and its *generic* plan explained (what Postgres 16
/// calls `EXPLAIN (GENERIC_PLAN)`), so no value has to be made up.
///
/// Only the shape of the plan is returned (see [`plan_shape`]): conditions and outputs
/// can hold the statement's literals. Errors are reported by a fixed reason, never the
/// database's text; a statement with a `;` outside a literal, a comment or a
/// dollar-quoted body is refused without a round trip.
pub async fn explain(pool: &MeteredPool, sql: &str) -> Result<Value, &'static str> {
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
            sqlx::raw_sql(setup)
                .execute(&mut *conn)
                .await
                .map_err(|_| "could not open a read-only transaction")?;
        }
        let script = if params == 0 {
            format!("EXPLAIN (FORMAT JSON) {sql}")
        } else {
            // Simple-query protocol: the $n inside PREPARE belong to the prepared statement.
            let nulls = vec!["NULL"; params].join(", ");
            format!(
                "PREPARE upcoach_explain AS {sql}; EXPLAIN (FORMAT JSON) EXECUTE upcoach_explain({nulls})"
            )
        };
        let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(script))
            .fetch_all(&mut *conn)
            .await
            .map_err(|_| "Postgres could not plan the statement")?;
        use sqlx::Row;
        rows.last()
            .and_then(|row| row.try_get::<Value, _>(0).ok())
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

/// A plan (`EXPLAIN (FORMAT JSON)` output) with only its shape kept, recursively through
/// `Plan` and `Plans`: node type, relation, index, join type, strategy, parent
/// relationship, estimated costs, rows and width. Conditions, filters and outputs, which
/// can hold literals, are dropped; any other value becomes `null`.
///
/// ```
/// use upcoach_perf::slow::explain::plan_shape;
///
/// let plan = serde_json::json!([{"Plan": {
///     "Node Type": "Seq Scan", "Relation Name": "users",
///     "Filter": "(email = 'a@b.c'::text)",
/// }}]);
/// assert_eq!(
///     plan_shape(&plan),
///     serde_json::json!([{"Plan": {"Node Type": "Seq Scan", "Relation Name": "users"}}])
/// );
/// ```
pub fn plan_shape(plan: &Value) -> Value {
    match plan {
        Value::Array(items) => items.iter().map(plan_shape).collect(),
        Value::Object(map) => {
            let mut out = serde_json::Map::new();
            for (key, value) in map {
                if key == "Plan" || key == "Plans" {
                    out.insert(key.clone(), plan_shape(value));
                } else if PLAN_FIELDS.contains(&key.as_str()) {
                    out.insert(key.clone(), value.clone());
                }
            }
            Value::Object(out)
        }
        _ => Value::Null,
    }
}

/// The nodes of a plan, outermost first, as `"<Node Type> on <Relation Name>"` (or the
/// node type alone), for a one-line reason.
///
/// ```
/// use upcoach_perf::slow::explain::plan_nodes;
///
/// let plan = serde_json::json!([{"Plan": {
///     "Node Type": "Hash Join",
///     "Plans": [{"Node Type": "Seq Scan", "Relation Name": "users"}],
/// }}]);
/// assert_eq!(plan_nodes(&plan), ["Hash Join", "Seq Scan on users"]);
/// ```
pub fn plan_nodes(plan: &Value) -> Vec<String> {
    let mut out = Vec::new();
    collect_plan_nodes(plan, &mut out);
    out
}

fn collect_plan_nodes(plan: &Value, out: &mut Vec<String>) {
    match plan {
        Value::Object(map) => {
            if let Some(node) = map.get("Node Type").and_then(|n| n.as_str()) {
                let relation = map.get("Relation Name").and_then(|r| r.as_str());
                out.push(match relation {
                    Some(rel) => format!("{node} on {rel}"),
                    None => node.to_owned(),
                });
            }
            for value in map.values() {
                collect_plan_nodes(value, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_plan_nodes(v, out)),
        _ => {}
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

/// One digest of [`slow_queries_report`], with its plan or why it has none.
#[derive(Debug, Serialize)]
struct ExplainedDigest {
    #[serde(flatten)]
    digest: SlowDigest,
    #[serde(skip_serializing_if = "Option::is_none")]
    plan: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    plan_error: Option<&'static str>,
}

/// The body of `GET /api/performance/slow-queries[?explain=true]`:
/// `{"threshold_ms": .., "digests": [..]}`, the digests of `log` the most total time
/// first (each a [`SlowDigest`]).
///
/// With `explain`, the first [`MAX_EXPLAINED`] digests also get a `plan` (from
/// [`explain`] of the statement `log` kept for them, on `pool`) or a `plan_error`: the
/// reason it has none, including `"no database is configured"` when `pool` is `None`
/// and `"the statement is no longer kept"` when the digest was evicted meanwhile.
pub async fn slow_queries_report(
    log: &SlowQueryLog,
    pool: Option<&MeteredPool>,
    explain: bool,
) -> Value {
    let digests = log.digests();
    let mut out = Vec::with_capacity(digests.len());
    for (i, digest) in digests.into_iter().enumerate() {
        let (plan, plan_error) = match (pool, explain && i < MAX_EXPLAINED) {
            (Some(pool), true) => match log.sample(&digest.digest) {
                Some(sql) => match self::explain(pool, &sql).await {
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
    serde_json::json!({
        "threshold_ms": log.threshold().as_millis() as u64,
        "digests": out,
    })
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

    #[test]
    fn plan_nodes_name_each_node_and_its_relation() {
        let plan = serde_json::json!([{"Plan": {
            "Node Type": "Nested Loop",
            "Plans": [
                {"Node Type": "Seq Scan", "Relation Name": "users"},
                {"Node Type": "Index Scan", "Relation Name": "links", "Index Name": "links_pkey"}
            ]
        }}]);
        assert_eq!(
            plan_nodes(&plan),
            ["Nested Loop", "Seq Scan on users", "Index Scan on links"]
        );
        assert!(plan_nodes(&Value::Null).is_empty());
    }

    #[tokio::test]
    async fn without_a_database_the_report_says_so_instead_of_a_plan() {
        let log = SlowQueryLog::new(std::time::Duration::from_millis(50), 10);
        log.observe(
            "SELECT pg_sleep(0.2)",
            std::time::Duration::from_millis(200),
        );
        let plain = slow_queries_report(&log, None, false).await;
        assert_eq!(plain["threshold_ms"], 50);
        assert_eq!(plain["digests"][0]["digest"], "SELECT pg_sleep(?)");
        assert_eq!(plain["digests"][0]["count"], 1);
        assert!(plain["digests"][0].get("plan").is_none());
        assert!(plain["digests"][0].get("plan_error").is_none());
        let asked = slow_queries_report(&log, None, true).await;
        assert_eq!(
            asked["digests"][0]["plan_error"],
            "no database is configured"
        );
    }
}
