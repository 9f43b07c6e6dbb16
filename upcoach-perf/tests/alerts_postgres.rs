//! Alert transitions land in Postgres's `system_alerts` through the event log.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use upcoach_core::event::{AlertLevel, EventLog, PgEventLog};
use upcoach_core::{ManualClock, postgres};
use upcoach_perf::alert::metrics;
use upcoach_perf::{AlertEngine, AlertRule, AlertState, Breach};
use upcoach_testing::PgSchema;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firing_and_resolved_rows_land_in_system_alerts() {
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    postgres::migrate(schema.pool()).await.unwrap();
    let log = Arc::new(PgEventLog::new(upcoach_core::postgres::MeteredPool::new(
        schema.pool().clone(),
    )));
    let clock = Arc::new(ManualClock::starting_now());
    let rule = AlertRule::new(
        "http_error_rate",
        metrics::HTTP_ERROR_RATE,
        Breach::Above,
        0.05,
        AlertLevel::Critical,
    );
    let engine = AlertEngine::new(vec![rule], log.clone(), clock.clone());

    let at = |v: f64| HashMap::from([(metrics::HTTP_ERROR_RATE, v)]);
    engine.evaluate(&at(0.2));
    clock.advance(Duration::from_secs(30));
    assert_eq!(engine.evaluate(&at(0.3))[0].state, AlertState::Firing);
    engine.evaluate(&at(0.01));
    clock.advance(Duration::from_secs(60));
    assert_eq!(engine.evaluate(&at(0.01))[0].state, AlertState::Resolved);
    log.flush().await.unwrap();

    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT level, source, metadata->>'state' FROM system_alerts ORDER BY created_at",
    )
    .fetch_all(schema.pool())
    .await
    .unwrap();
    assert_eq!(
        rows,
        [
            ("critical".into(), "perf".into(), "firing".into()),
            ("info".into(), "perf".into(), "resolved".into())
        ]
    );
}
