//! EXPLAIN of kept slow statements against Postgres (feature `postgres`; skipped without
//! `DATABASE_URL`): plans without literals, writes never run, one statement only, and
//! the recommendations that read the plans.

#![cfg(feature = "postgres")]

use std::time::Duration;

use upcoach_core::postgres::MeteredPool;
use upcoach_perf::advice;
use upcoach_perf::slow::SlowQueryLog;
use upcoach_perf::slow::explain::{explain, plan_nodes, slow_queries_report};
use upcoach_perf::{RequestMetrics, RouteTable};
use upcoach_testing::PgSchema;

async fn counters() -> Option<(PgSchema, MeteredPool)> {
    let schema = PgSchema::create().await?;
    for sql in [
        "CREATE TABLE counters (name text PRIMARY KEY, n int)",
        "INSERT INTO counters VALUES ('hits', 0)",
    ] {
        sqlx::raw_sql(sql).execute(schema.pool()).await.unwrap();
    }
    let pool = MeteredPool::new(schema.pool().clone());
    Some((schema, pool))
}

#[tokio::test]
async fn a_kept_write_is_explained_without_running_it_or_showing_its_literals() {
    let Some((schema, pool)) = counters().await else {
        return;
    };
    let log = SlowQueryLog::new(Duration::from_millis(100), 10);
    log.observe(
        "UPDATE counters SET n = n + 1 WHERE n >= 0 AND name = 'hits'",
        Duration::from_millis(150),
    );
    log.observe(
        "SELECT n FROM counters WHERE name = $1",
        Duration::from_millis(120),
    );
    log.observe("SELECT 1; DROP TABLE counters", Duration::from_millis(110));

    let body = slow_queries_report(&log, Some(&pool), true).await;
    assert_eq!(body["threshold_ms"], 100);
    let digests = body["digests"].as_array().unwrap();
    assert_eq!(digests.len(), 3, "{body}");
    let find = |prefix: &str| {
        digests
            .iter()
            .find(|d| d["digest"].as_str().unwrap().starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in {body}"))
    };
    let update = find("UPDATE counters");
    assert_eq!(
        update["digest"],
        "UPDATE counters SET n = n + ? WHERE n >= ? AND name = ?"
    );
    assert!(
        update["plan"][0]["Plan"]["Node Type"].is_string(),
        "{update}"
    );
    assert!(update.get("plan_error").is_none(), "{update}");
    assert!(!body.to_string().contains("hits"), "no literal: {body}");
    let select = find("SELECT n FROM counters");
    assert!(
        select["plan"][0]["Plan"]["Node Type"].is_string(),
        "a bind parameter's generic plan: {select}"
    );
    let two = find("SELECT ?; DROP");
    assert_eq!(
        two["plan_error"],
        "the statement holds ';' outside a literal; only single statements are explained"
    );
    assert!(two.get("plan").is_none());

    let plain = slow_queries_report(&log, Some(&pool), false).await;
    assert!(
        plain["digests"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d.get("plan").is_none() && d.get("plan_error").is_none())
    );

    let (n,): (i32,) = sqlx::query_as("SELECT n FROM counters WHERE name = 'hits'")
        .fetch_one(schema.pool())
        .await
        .unwrap();
    assert_eq!(n, 0, "explaining the UPDATE did not run it");
    assert!(
        sqlx::query("SELECT 1 FROM counters")
            .fetch_all(schema.pool())
            .await
            .is_ok(),
        "the table is still there"
    );
    assert_eq!(
        explain(&pool, "SELECT * FROM no_such_table").await,
        Err("Postgres could not plan the statement")
    );
}

#[tokio::test]
async fn slow_query_recommendations_read_the_plan() {
    let Some((_schema, pool)) = counters().await else {
        return;
    };
    let log = SlowQueryLog::new(Duration::from_millis(100), 10);
    log.observe(
        "SELECT * FROM counters WHERE n > 5",
        Duration::from_millis(300),
    );
    let plan = explain(&pool, "SELECT * FROM counters WHERE n > 5")
        .await
        .unwrap();
    assert_eq!(plan_nodes(&plan), ["Seq Scan on counters"]);

    let requests = RequestMetrics::new(RouteTable::new(["/health"]).unwrap());
    let out = advice::recommendations(&log, Some(&pool), &requests, None).await;
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0]["kind"], "slow_query");
    assert_eq!(
        out[0]["plan_nodes"],
        serde_json::json!(["Seq Scan on counters"])
    );
    let advice = out[0]["advice"].as_str().unwrap();
    assert!(
        advice.ends_with("an index on the filtered columns may help"),
        "{advice}"
    );
}
