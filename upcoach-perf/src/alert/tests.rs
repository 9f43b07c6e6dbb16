use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use upcoach_core::ManualClock;
use upcoach_core::event::{AlertLevel, Event, EventKind, EventLog, MemoryEventLog};

use super::*;

fn engine() -> (AlertEngine, Arc<ManualClock>, Arc<MemoryEventLog>) {
    let clock = Arc::new(ManualClock::new(
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
    ));
    let log = Arc::new(MemoryEventLog::new(100));
    let rule = AlertRule::new(
        "http_p95_latency",
        metrics::HTTP_P95_MS,
        Breach::Above,
        1000.0,
        AlertLevel::Warning,
    );
    (
        AlertEngine::new(vec![rule], log.clone(), clock.clone()),
        clock,
        log,
    )
}

fn p95(v: f64) -> HashMap<&'static str, f64> {
    HashMap::from([(metrics::HTTP_P95_MS, v)])
}

fn states(t: &[AlertTransition]) -> Vec<AlertState> {
    t.iter().map(|t| t.state).collect()
}

#[tokio::test]
async fn fires_only_after_the_minimum_duration_and_does_not_refire() {
    let (engine, clock, log) = engine();
    let mut hook = engine.subscribe();
    assert!(
        engine.evaluate(&p95(1500.0)).is_empty(),
        "pending, not firing"
    );
    clock.advance(Duration::from_secs(29));
    assert!(engine.evaluate(&p95(1500.0)).is_empty());
    assert!(engine.firing().is_empty());
    clock.advance(Duration::from_secs(1));
    let fired = engine.evaluate(&p95(1600.0));
    assert_eq!(states(&fired), [AlertState::Firing]);
    assert_eq!(fired[0].value, 1600.0);
    assert_eq!(engine.firing().len(), 1);
    assert_eq!(hook.try_recv().unwrap(), fired[0]);

    for _ in 0..10 {
        clock.advance(Duration::from_secs(5));
        assert!(
            engine.evaluate(&p95(2000.0)).is_empty(),
            "no re-fire while firing"
        );
    }
    let alerts = log.recent(EventKind::Alert, 10).await.unwrap();
    assert_eq!(alerts.len(), 1);
    let Event::Alert(alert) = &alerts[0] else {
        panic!()
    };
    assert_eq!(alert.level, AlertLevel::Warning);
    assert_eq!(alert.source, "perf");
    assert_eq!(alert.metadata["state"], "firing");
}

#[tokio::test]
async fn a_breach_shorter_than_the_duration_never_fires() {
    let (engine, clock, log) = engine();
    for _ in 0..20 {
        assert!(engine.evaluate(&p95(1500.0)).is_empty());
        clock.advance(Duration::from_secs(20));
        assert!(
            engine.evaluate(&p95(500.0)).is_empty(),
            "recovered before 30 s"
        );
        clock.advance(Duration::from_secs(20));
    }
    assert!(log.recent(EventKind::Alert, 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn resolves_only_past_the_hysteresis_for_the_resolve_time() {
    let (engine, clock, log) = engine();
    engine.evaluate(&p95(1500.0));
    clock.advance(Duration::from_secs(30));
    assert_eq!(states(&engine.evaluate(&p95(1500.0))), [AlertState::Firing]);

    // Flapping around the threshold: just under it is not recovered (hysteresis 10 %).
    for v in [950.0, 1050.0, 901.0, 1200.0] {
        clock.advance(Duration::from_secs(30));
        assert!(engine.evaluate(&p95(v)).is_empty(), "{v}");
    }
    // Recovered, then bad again before the resolve time: still the same firing alert.
    assert!(engine.evaluate(&p95(800.0)).is_empty());
    clock.advance(Duration::from_secs(59));
    assert!(engine.evaluate(&p95(1300.0)).is_empty());
    assert_eq!(engine.firing().len(), 1);
    // Recovered for the whole resolve time.
    assert!(engine.evaluate(&p95(700.0)).is_empty());
    clock.advance(Duration::from_secs(30));
    assert!(engine.evaluate(&p95(700.0)).is_empty());
    clock.advance(Duration::from_secs(30));
    let resolved = engine.evaluate(&p95(650.0));
    assert_eq!(states(&resolved), [AlertState::Resolved]);
    assert_eq!(resolved[0].level, AlertLevel::Info);
    assert!(engine.firing().is_empty());

    let alerts = log.recent(EventKind::Alert, 10).await.unwrap();
    let kinds: Vec<_> = alerts
        .iter()
        .map(|e| match e {
            Event::Alert(a) => a.metadata["state"].as_str().unwrap().to_owned(),
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(
        kinds,
        ["resolved", "firing"],
        "exactly one firing and one resolved row"
    );
}

#[test]
fn below_rules_and_missing_values() {
    let clock = Arc::new(ManualClock::starting_now());
    let log = Arc::new(MemoryEventLog::new(10));
    let mut rule = AlertRule::new(
        "cache_hit_rate",
        metrics::CACHE_HIT_RATE,
        Breach::Below,
        0.8,
        AlertLevel::Warning,
    );
    rule.for_duration = Duration::ZERO;
    let engine = AlertEngine::new(vec![rule], log, clock.clone());
    assert!(
        engine.evaluate(&HashMap::new()).is_empty(),
        "no value: nothing to say"
    );
    let fired = engine.evaluate(&HashMap::from([(metrics::CACHE_HIT_RATE, 0.5)]));
    assert_eq!(
        states(&fired),
        [AlertState::Firing],
        "zero duration fires at once"
    );
    assert!(
        engine.evaluate(&HashMap::new()).is_empty(),
        "a missing value keeps the state"
    );
    assert_eq!(engine.firing().len(), 1);
    assert!(
        engine
            .evaluate(&HashMap::from([(metrics::CACHE_HIT_RATE, 0.85)]))
            .is_empty(),
        "inside hysteresis"
    );
    assert!(
        engine
            .evaluate(&HashMap::from([(metrics::CACHE_HIT_RATE, f64::NAN)]))
            .is_empty()
    );
    engine.evaluate(&HashMap::from([(metrics::CACHE_HIT_RATE, 0.9)]));
    clock.advance(Duration::from_secs(60));
    let resolved = engine.evaluate(&HashMap::from([(metrics::CACHE_HIT_RATE, 0.95)]));
    assert_eq!(states(&resolved), [AlertState::Resolved]);
}

#[test]
fn the_defaults_are_the_reference_thresholds() {
    let rules = AlertRule::defaults();
    let by_name: HashMap<&str, &AlertRule> = rules.iter().map(|r| (r.name.as_str(), r)).collect();
    assert_eq!(by_name["http_p95_latency"].threshold, 1000.0);
    assert_eq!(by_name["http_error_rate"].threshold, 0.05);
    assert_eq!(by_name["cache_hit_rate"].threshold, 0.80);
    assert_eq!(by_name["cache_hit_rate"].breach, Breach::Below);
    assert_eq!(by_name["active_connections"].threshold, 5000.0);
    assert_eq!(by_name["memory_usage"].threshold, 0.90);
}
